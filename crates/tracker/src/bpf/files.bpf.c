// SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0-only)
/*
 * File-write tracker: reports the byte ranges of a tracked file (keyed by device and
 * inode) that change, through a ring buffer, in 512-byte sectors of the file:
 *
 * - tp_btf/block_dirty_buffer: ext4 marks a block of a page-cache folio dirty
 *   (mark_buffer_dirty), with the block's range, once the data is in the page. Every
 *   buffered write (write, pwrite, io_uring, splice) does so for each block it touches,
 *   whether the block was dirty already or not. A store through a shared mapping only
 *   marks its folio's blocks when the page is first written after being clean (the
 *   page_mkwrite fault): user space writes the file back after each take (src/files.rs),
 *   so every mapped page is write-protected again and the next store reports it.
 * - tp_btf/iomap_dio_rw_begin and tp_btf/iomap_dio_complete: a direct-I/O write, at
 *   submission and again at completion (as the block tracker does), its range kept in
 *   `inflight`, keyed by the kiocb.
 * - ext4's punch-hole and zero-range tracepoints: the range reads as zeros afterwards.
 * - ext4's truncate, collapse-range and insert-range tracepoints: the data moves or
 *   goes, so the file's drop counter is raised and user space compares it whole.
 *
 * Anything that cannot be recorded raises the file's drop counter as well.
 */
#include "kernel.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "slots.h"

#define PG_HEAD 6

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The page size's shift, set by user space before load. */
const volatile __u32 page_shift = 12;

/* A tracked file: the kernel's dev_t of its filesystem (s_dev) and its inode number. */
struct file_key {
	__u64 ino;
	__u32 dev;
	__u32 pad;
};

/* File -> slot. Filled by user space before attaching. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SLOTS);
	__type(key, struct file_key);
	__type(value, __u32);
} files SEC(".maps");

/* A direct-I/O write waiting for its completion, keyed by the kiocb's address. */
struct dio {
	__u64 pos;
	__u64 len;
	__u32 slot;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct dio);
} inflight SEC(".maps");

static __always_inline __u32 *slot_of(struct inode *inode)
{
	struct file_key key = {};

	key.ino = BPF_CORE_READ(inode, i_ino);
	key.dev = BPF_CORE_READ(inode, i_sb, s_dev);
	return bpf_map_lookup_elem(&files, &key);
}

/* Reports bytes [pos, pos + len) of the file in `slot`, widened to whole sectors. */
static __always_inline void emit(__u32 slot, __u64 pos, __u64 len)
{
	__u64 first = pos >> 9, end = (pos + len + 511) >> 9;

	if (len == 0)
		return;
	if (end - first > 0xffffffffull) {
		count_drop(slot);
		return;
	}
	emit_sectors(slot, first, end - first);
}

SEC("tp_btf/block_dirty_buffer")
int BPF_PROG(on_dirty_buffer, struct buffer_head *bh)
{
	struct folio *folio = BPF_CORE_READ(bh, b_folio);
	__u64 flags = 0, size = 1ull << page_shift, pos;
	struct address_space *mapping;
	__u32 *slot;

	mapping = BPF_CORE_READ(folio, mapping);
	if (!mapping)
		return 0;
	slot = slot_of(BPF_CORE_READ(mapping, host));
	if (!slot)
		return 0;
	/*
	 * A large folio's page count is in its second page; the flags word opens every
	 * folio. A folio is naturally aligned in memory, so the buffer's offset in it is
	 * its address modulo the folio's size (or the address itself, for highmem).
	 */
	bpf_probe_read_kernel(&flags, sizeof(flags), folio);
	if (flags & (1ull << PG_HEAD))
		size = (__u64)BPF_CORE_READ(folio, _nr_pages) << page_shift;
	pos = ((__u64)BPF_CORE_READ(folio, index) << page_shift) + ((__u64)BPF_CORE_READ(bh, b_data) & (size - 1));
	emit(*slot, pos, BPF_CORE_READ(bh, b_size));
	return 0;
}

SEC("tp_btf/iomap_dio_rw_begin")
int BPF_PROG(on_dio_begin, struct kiocb *iocb, struct iov_iter *iter, unsigned int dio_flags, size_t done_before)
{
	__u64 key = (__u64)iocb;
	struct dio f = {};
	__u32 *slot;

	if (!BPF_CORE_READ(iter, data_source))
		return 0;
	slot = slot_of(BPF_CORE_READ(iocb, ki_filp, f_inode));
	if (!slot)
		return 0;
	f.pos = BPF_CORE_READ(iocb, ki_pos);
	f.len = BPF_CORE_READ(iter, count);
	f.slot = *slot;
	if (f.len == 0)
		return 0;
	emit(f.slot, f.pos, f.len);
	if (bpf_map_update_elem(&inflight, &key, &f, BPF_ANY))
		count_drop(f.slot);
	return 0;
}

SEC("tp_btf/iomap_dio_complete")
int BPF_PROG(on_dio_complete, struct kiocb *iocb, int error, long ret)
{
	__u64 key = (__u64)iocb;
	struct dio *f = bpf_map_lookup_elem(&inflight, &key);

	if (!f)
		return 0;
	emit(f->slot, f->pos, f->len);
	bpf_map_delete_elem(&inflight, &key);
	return 0;
}

/* The range reads as zeros afterwards. */
static __always_inline int zeroed(struct inode *inode, long long offset, long long len)
{
	__u32 *slot = slot_of(inode);

	if (slot)
		emit(*slot, offset, len);
	return 0;
}

SEC("tp_btf/ext4_punch_hole")
int BPF_PROG(on_punch_hole, struct inode *inode, long long offset, long long len, int mode)
{
	return zeroed(inode, offset, len);
}

SEC("tp_btf/ext4_zero_range")
int BPF_PROG(on_zero_range, struct inode *inode, long long offset, long long len, int mode)
{
	return zeroed(inode, offset, len);
}

/* The data moves or goes: the file must be compared whole. */
static __always_inline int moved(struct inode *inode)
{
	__u32 *slot = slot_of(inode);

	if (slot)
		count_drop(*slot);
	return 0;
}

SEC("tp_btf/ext4_truncate_enter")
int BPF_PROG(on_truncate, struct inode *inode)
{
	return moved(inode);
}

SEC("tp_btf/ext4_collapse_range")
int BPF_PROG(on_collapse_range, struct inode *inode, long long offset, long long len)
{
	return moved(inode);
}

SEC("tp_btf/ext4_insert_range")
int BPF_PROG(on_insert_range, struct inode *inode, long long offset, long long len)
{
	return moved(inode);
}
