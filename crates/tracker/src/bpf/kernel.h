/* SPDX-License-Identifier: (BSD-2-Clause OR GPL-2.0-only) */
/*
 * The few kernel types and constants tracker.bpf.c and files.bpf.c need, declared by hand instead of
 * a generated vmlinux.h: with preserve_access_index, libbpf relocates every field
 * access against the running kernel's BTF (CO-RE), so only the field names and types
 * have to match, not the layout, and the build needs no kernel headers.
 */
#ifndef TRACKER_KERNEL_H
#define TRACKER_KERNEL_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef __u64 sector_t;
typedef __u32 dev_t;

/* uapi/linux/bpf.h: stable ABI values. */
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_RINGBUF = 27,
};
enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
};

/* include/linux/blk_types.h: the operation is the low byte of bi_opf. */
#define REQ_OP_MASK 0xffu
#define REQ_OP_WRITE 1u
#define REQ_OP_DISCARD 3u
#define REQ_OP_SECURE_ERASE 5u
#define REQ_OP_WRITE_ZEROES 9u

struct block_device {
	dev_t bd_dev;
	struct gendisk *bd_disk;
} __attribute__((preserve_access_index));

struct request_queue {
	const void *mq_ops;
	struct gendisk *disk;
} __attribute__((preserve_access_index));

struct gendisk {
	struct block_device *part0;
	struct request_queue *queue;
} __attribute__((preserve_access_index));

struct bvec_iter {
	sector_t bi_sector;
	unsigned int bi_size;
} __attribute__((preserve_access_index));

struct bio {
	struct block_device *bi_bdev;
	__u32 bi_opf;
	struct bvec_iter bi_iter;
} __attribute__((preserve_access_index));

struct request {
	struct request_queue *q;
	__u32 cmd_flags;
	unsigned int __data_len;
	sector_t __sector;
} __attribute__((preserve_access_index));

typedef __u8 blk_status_t;

/* The file tracker (files.bpf.c). */
typedef unsigned long size_t;

struct super_block {
	dev_t s_dev;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));

struct address_space {
	struct inode *host;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
} __attribute__((preserve_access_index));

struct folio {
	struct address_space *mapping;
	unsigned long index;
	unsigned int _nr_pages;
} __attribute__((preserve_access_index));

struct buffer_head {
	struct folio *b_folio;
	size_t b_size;
	char *b_data;
} __attribute__((preserve_access_index));

struct kiocb {
	struct file *ki_filp;
	long long ki_pos;
} __attribute__((preserve_access_index));

struct iov_iter {
	_Bool data_source;
	size_t count;
} __attribute__((preserve_access_index));

#endif
