/* SPDX-License-Identifier: ((GPL-2.0 WITH Linux-syscall-note) OR Apache-2.0) */
/*
 * virtio_ism_ioctl: user-space interface of /dev/ismN (the virtio-ism guest driver).
 *
 * The device interface (permission bits, statuses) is <linux/virtio_ism.h>. The Rust
 * crate `ism` (guest-driver/ism) mirrors this header and its tests compile it to check
 * every size, offset and number against the Rust side.
 *
 * Every structure is made of naturally aligned __u64/__u32 fields with explicit padding,
 * so its layout is the same for every ABI Linux supports. Extensibility: every ioctl
 * argument has a `flags` field and reserved fields; the driver refuses (EINVAL) a flag
 * it does not know and a reserved field that is not zero, so later versions can give
 * them a meaning.
 */
#ifndef _UAPI_LINUX_VIRTIO_ISM_IOCTL_H
#define _UAPI_LINUX_VIRTIO_ISM_IOCTL_H

#include <linux/types.h>
#include <linux/ioctl.h>
#include <linux/virtio_ism.h>

/* Region flags reported by ALLOC, ATTACH and REGION_INFO (region_flags). */
#define VIRTIO_ISM_REGION_F_WRITE	(1U << 0) /* mapped writable by the device */
#define VIRTIO_ISM_REGION_F_OWNER	(1U << 1) /* allocated by this device */
#define VIRTIO_ISM_REGION_F_BOUND	(1U << 2) /* kicks are delivered (BIND) */
#define VIRTIO_ISM_REGION_F_KEPT	(1U << 3) /* held by the driver, not by a file */
#define VIRTIO_ISM_REGION_F_MINE	(1U << 4) /* held by the file asking */
#define VIRTIO_ISM_REGION_F_HOTPLUGGED	(1U << 5) /* attached by the host */
#define VIRTIO_ISM_REGION_F_OWN_VECTOR	(1U << 6) /* bound to a vector of its own */

/* virtio_ism_info.features: negotiated device feature bits (1 << VIRTIO_ISM_F_*). */
#define VIRTIO_ISM_INFO_F_EVENT_QUEUE	(1ULL << VIRTIO_ISM_F_EVENT_QUEUE)
#define VIRTIO_ISM_INFO_F_QUERY		(1ULL << VIRTIO_ISM_F_QUERY)
#define VIRTIO_ISM_INFO_F_GRANT		(1ULL << VIRTIO_ISM_F_GRANT)
#define VIRTIO_ISM_INFO_F_KICK_PENDING	(1ULL << VIRTIO_ISM_F_KICK_PENDING)

/* virtio_ism_info.flags */
#define VIRTIO_ISM_INFO_KICK_VECTORS	(1U << 0) /* BIND gives regions vectors of their own */
#define VIRTIO_ISM_INFO_KICK_PENDING	(1U << 1) /* on the shared vector kicks name their region */

struct virtio_ism_info {
	__u64 gid;		/* group id of the device's pool */
	__u64 devid;		/* this device's id (named by per-device grants) */
	__u64 chunk_size;	/* allocation granule */
	__u64 notify_size;	/* doorbell bytes per chunk */
	__u64 features;		/* negotiated device feature bits (VIRTIO_ISM_INFO_F_*) */
	__u64 shm_size;		/* bytes of the region window (shmid 1) */
	__u64 nr_regions;	/* regions the driver holds on this device */
	__u32 instance;		/* N of /dev/ismN */
	__u32 flags;		/* out: VIRTIO_ISM_INFO_* */
	__u64 reserved[4];	/* out: 0 */
};

/*
 * A region as returned by ALLOC and ATTACH. mmap() the region with
 * offset = map_offset (+ a page multiple) and length <= size: its areas appear back
 * to back, whichever offset of the window each of them has.
 */
struct virtio_ism_region {
	__u64 token;		/* ALLOC: out; ATTACH: in */
	__u64 size;		/* ALLOC: in (bytes wanted) and out (bytes mapped); ATTACH: out */
	__u64 map_offset;	/* out: the mmap offset of this region on this file */
	__u32 perm;		/* ATTACH in: READ|WRITE wanted, 0 = as granted; ALLOC: 0 */
	__u32 flags;		/* in: 0 (no flags defined) */
	__u32 region_flags;	/* out: VIRTIO_ISM_REGION_F_* */
	__u32 reserved0;	/* in: 0 */
	__u64 reserved[2];	/* in: 0 */
};

/* GRANT: permissions of a region this device owns. */
struct virtio_ism_grant {
	__u64 token;
	__u64 perms;		/* VIRTIO_ISM_PERM_* */
	__u64 peer_devid;	/* 0: the default grant; else that device's grant */
	__u32 flags;		/* in: 0 */
	__u32 reserved0;	/* in: 0 */
	__u64 reserved[2];	/* in: 0 */
};

/* DETACH, BIND, UNBIND, KICK, KEEP: one region of this file. */
struct virtio_ism_token_op {
	__u64 token;
	__u32 flags;		/* in: 0 */
	__u32 reserved0;	/* in: 0 */
	__u64 reserved;		/* in: 0 */
};

/* An area of a region (REGION_INFO). */
struct virtio_ism_region_area {
	__u64 offset;		/* in the region window (shmid 1) */
	__u64 size;
};

/* REGION_INFO: describe a region the driver holds. */
struct virtio_ism_region_info {
	__u64 token;		/* in */
	__u64 size;		/* out */
	__u64 map_offset;	/* out (meaningful only with VIRTIO_ISM_REGION_F_MINE) */
	__u64 areas;		/* in: user pointer to virtio_ism_region_area[max_areas], or 0 */
	__u32 max_areas;	/* in */
	__u32 nr_areas;		/* out: areas of the region (may exceed max_areas) */
	__u32 flags;		/* in: 0 */
	__u32 region_flags;	/* out: VIRTIO_ISM_REGION_F_* */
	__u64 kicks;		/* out: kicks received for this region (BIND) */
	__u64 reserved[2];	/* in: 0 */
};

/* LIST: tokens of every region the driver holds on this device. */
struct virtio_ism_list {
	__u64 tokens;		/* in: user pointer to __u64[max_tokens] or 0 */
	__u32 max_tokens;	/* in */
	__u32 nr_tokens;	/* out: regions held (may exceed max_tokens) */
	__u32 flags;		/* in: 0 */
	__u32 reserved0;	/* in: 0 */
	__u64 reserved;		/* in: 0 */
};

/* Event types read() returns: the device's event types plus KICK and LOST. */
#define VIRTIO_ISM_EV_UPDATE		VIRTIO_ISM_EVENT_UPDATE
#define VIRTIO_ISM_EV_ATTACH		VIRTIO_ISM_EVENT_ATTACH
#define VIRTIO_ISM_EV_DETACH		VIRTIO_ISM_EVENT_DETACH
#define VIRTIO_ISM_EV_REVOKE		VIRTIO_ISM_EVENT_REVOKE
#define VIRTIO_ISM_EV_REGION_ADDED	VIRTIO_ISM_EVENT_REGION_ADDED
#define VIRTIO_ISM_EV_OVERFLOW		VIRTIO_ISM_EVENT_OVERFLOW
/*
 * A peer kicked a bound region: token names it. With a vector per region
 * (VIRTIO_ISM_INFO_KICK_VECTORS) or the device's pending bits on the shared vector
 * (VIRTIO_ISM_INFO_KICK_PENDING) only the kicked region is reported; otherwise
 * every region bound to the shared vector is (receivers check the shared memory).
 */
#define VIRTIO_ISM_EV_KICK		(1ULL << 16)
/* This file's own event queue overflowed; events were lost. */
#define VIRTIO_ISM_EV_LOST		(1ULL << 17)

/* What read() returns, one or more whole records. */
struct virtio_ism_event_record {
	__u64 type;		/* VIRTIO_ISM_EV_* */
	__u64 token;		/* the region, or 0 */
	__u64 devid;		/* the peer for ATTACH/DETACH, else 0 */
	__u64 peers;		/* other holders known after the event */
};

#define VIRTIO_ISM_IOC_MAGIC 0xC5

#define VIRTIO_ISM_IOC_INFO		_IOR(VIRTIO_ISM_IOC_MAGIC, 0x00, struct virtio_ism_info)
#define VIRTIO_ISM_IOC_ALLOC		_IOWR(VIRTIO_ISM_IOC_MAGIC, 0x01, struct virtio_ism_region)
#define VIRTIO_ISM_IOC_ATTACH		_IOWR(VIRTIO_ISM_IOC_MAGIC, 0x02, struct virtio_ism_region)
/* Unmaps the region from every process first. */
#define VIRTIO_ISM_IOC_DETACH		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x03, struct virtio_ism_token_op)
#define VIRTIO_ISM_IOC_GRANT		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x04, struct virtio_ism_grant)
/* Kicks of the region are delivered as VIRTIO_ISM_EV_KICK records (and in-kernel handlers). */
#define VIRTIO_ISM_IOC_BIND		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x05, struct virtio_ism_token_op)
#define VIRTIO_ISM_IOC_UNBIND		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x06, struct virtio_ism_token_op)
#define VIRTIO_ISM_IOC_KICK		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x07, struct virtio_ism_token_op)
#define VIRTIO_ISM_IOC_REGION_INFO	_IOWR(VIRTIO_ISM_IOC_MAGIC, 0x08, \
					      struct virtio_ism_region_info)
#define VIRTIO_ISM_IOC_LIST		_IOWR(VIRTIO_ISM_IOC_MAGIC, 0x09, struct virtio_ism_list)
/* 0x0a was COUNTERS: the counters are in sysfs (/sys/class/misc/ismN/counters/). */
/*
 * Moves a region from this file to the driver: it outlives the file until a later
 * ATTACH of the same token (any file) takes it back.
 */
#define VIRTIO_ISM_IOC_KEEP		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x0b, struct virtio_ism_token_op)

#endif /* _UAPI_LINUX_VIRTIO_ISM_IOCTL_H */
