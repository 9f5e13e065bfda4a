/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0-only) */
/*
 * What both trackers (tracker.bpf.c, files.bpf.c) share: the ring buffer of ranges and
 * the per-slot counters user space reads (src/worker.rs) and pins (src/pin.rs). A slot is
 * a tracked disk or file; the program's own filter map says which.
 *
 * A newer build takes over pinned maps of an older one (src/pin.rs): raise MAPS_VERSION
 * there with any change to what a pinned map (here or in a program) holds or means.
 */
#ifndef TRACKER_SLOTS_H
#define TRACKER_SLOTS_H

/* Slots per tracker (MAX_SLOTS in src/worker.rs). */
#define MAX_SLOTS 64

/* One record per reported range, in 512-byte sectors; parsed in src/worker.rs (Event). */
struct event {
	__u32 slot;
	__u32 nr_sectors;
	__u64 sector;
};

/* Per-slot count of changes that could not be recorded. Only ever grows. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

/*
 * The drop counters as of user space's last take, per slot. Only user space reads and
 * writes it: it keeps that baseline with the pinned maps, so a tracker that resumes
 * pinned maps after its process restarted (src/pin.rs) knows which drops it has not
 * seen yet.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");

/*
 * 1 when the user-space tracker owning the pinned maps suspended cleanly after its last
 * take (it drained nothing since), 0 while one runs. Only user space uses it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} suspended SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
} events SEC(".maps");

static __always_inline void count_drop(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&drops, &slot);

	if (n)
		__sync_fetch_and_add(n, 1);
}

/* Reports sectors [sector, sector + nr_sectors) of the disk or file in `slot`. */
static __always_inline void emit_sectors(__u32 slot, __u64 sector, __u32 nr_sectors)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count_drop(slot);
		return;
	}
	e->slot = slot;
	e->nr_sectors = nr_sectors;
	e->sector = sector;
	bpf_ringbuf_submit(e, 0);
}

#endif
