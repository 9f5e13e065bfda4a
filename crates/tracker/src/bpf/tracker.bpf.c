// SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0-only)
/*
 * Block-write tracker: reports the sector range of every write, discard, secure-erase
 * and write-zeroes submitted to a tracked disk, through a ring buffer, twice:
 *
 * - at submission, tp_btf/block_bio_queue: fires once per bio in
 *   submit_bio_noacct_nocheck(), after partition remapping (the sector is absolute on
 *   the whole disk) and before blk-mq splits or merges it, so each written range is
 *   seen whole, whatever the driver does with it afterwards;
 * - at completion, because a block the agent reads while its write is still in flight
 *   may hold the old data: the second record puts it in the next dirty set. blk-mq
 *   disks (loop, nvme, sd, virtio) trace completions per request,
 *   tp_btf/block_rq_complete, with the range completed; bio-based disks (dm, md, zram)
 *   trace tp_btf/block_bio_complete, where the bio's range is already consumed, so
 *   their range is remembered at submission in `inflight`, keyed by the bio.
 *
 * Anything that cannot be recorded (ring buffer full, in-flight table full) increments
 * the disk's drop counter, which user space checks on every take: a drop means the
 * dirty set is incomplete and the disk must be resynchronised.
 */
#include "kernel.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "slots.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* A bio-based write waiting for its completion, keyed by the bio's address. */
struct inflight {
	__u64 sector;
	__u32 nr_sectors;
	__u32 slot;
};

/* Whole-disk dev_t (kernel encoding, MKDEV) -> slot of that disk. Filled by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} disks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct inflight);
} inflight SEC(".maps");

static __always_inline int is_write(__u32 opf)
{
	switch (opf & REQ_OP_MASK) {
	case REQ_OP_WRITE:
	case REQ_OP_DISCARD:
	case REQ_OP_SECURE_ERASE:
	case REQ_OP_WRITE_ZEROES:
		return 1;
	default:
		return 0;
	}
}

SEC("tp_btf/block_bio_queue")
int BPF_PROG(on_bio_queue, struct bio *bio)
{
	struct inflight f;
	struct gendisk *disk;
	__u64 key = (__u64)bio;
	__u32 *slot, dev, size;

	if (!is_write(BPF_CORE_READ(bio, bi_opf)))
		return 0;
	/* An empty write is a flush (REQ_PREFLUSH): nothing changes on the medium. */
	size = BPF_CORE_READ(bio, bi_iter.bi_size);
	if (size == 0)
		return 0;
	disk = BPF_CORE_READ(bio, bi_bdev, bd_disk);
	dev = BPF_CORE_READ(disk, part0, bd_dev);
	slot = bpf_map_lookup_elem(&disks, &dev);
	if (!slot)
		return 0;

	f.sector = BPF_CORE_READ(bio, bi_iter.bi_sector);
	f.nr_sectors = size >> 9;
	f.slot = *slot;
	emit_sectors(f.slot, f.sector, f.nr_sectors);
	/* blk-mq disks report completions per request (on_rq_complete). */
	if (BPF_CORE_READ(disk, queue, mq_ops))
		return 0;
	if (bpf_map_update_elem(&inflight, &key, &f, BPF_ANY))
		count_drop(f.slot);
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(on_rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	__u32 *slot, dev;

	if (nr_bytes < 512 || !is_write(BPF_CORE_READ(rq, cmd_flags)))
		return 0;
	dev = BPF_CORE_READ(rq, q, disk, part0, bd_dev);
	slot = bpf_map_lookup_elem(&disks, &dev);
	if (!slot)
		return 0;
	emit_sectors(*slot, BPF_CORE_READ(rq, __sector), nr_bytes >> 9);
	return 0;
}

SEC("tp_btf/block_bio_complete")
int BPF_PROG(on_bio_complete, struct request_queue *q, struct bio *bio)
{
	__u64 key = (__u64)bio;
	struct inflight *f = bpf_map_lookup_elem(&inflight, &key);

	if (!f)
		return 0;
	emit_sectors(f->slot, f->sector, f->nr_sectors);
	bpf_map_delete_elem(&inflight, &key);
	return 0;
}
