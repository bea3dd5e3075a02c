/* SPDX-License-Identifier: ((GPL-2.0 WITH Linux-syscall-note) OR Apache-2.0) */
/*
 * virtio_ism: user-space interface of /dev/ismN (the virtio-ism guest driver).
 *
 * This header is the single source of the ioctl numbers and structures. The Rust
 * crate `ism` (guest-driver/ism) mirrors them and its tests compile this header to
 * check every size, offset and number against the Rust side.
 *
 * Every structure is made of naturally aligned __u64/__u32 fields with explicit
 * padding, so its layout is the same for every ABI Linux supports.
 */
#ifndef _UAPI_LINUX_VIRTIO_ISM_H
#define _UAPI_LINUX_VIRTIO_ISM_H

#include <linux/types.h>
#include <linux/ioctl.h>

/* Permission bits: GRANT permissions and ATTACH's perm (same values as the device). */
#define VIRTIO_ISM_PERM_READ		(1ULL << 0)
#define VIRTIO_ISM_PERM_WRITE		(1ULL << 1)
#define VIRTIO_ISM_PERM_ATTACH		(1ULL << 2)
#define VIRTIO_ISM_PERM_MANAGE		(1ULL << 3)
#define VIRTIO_ISM_PERM_CLEAN_DEFAULT	(1ULL << 4)

/* Region flags reported by ALLOC, ATTACH and REGION_INFO. */
#define VIRTIO_ISM_REGION_F_WRITE	(1U << 0) /* mapped writable by the device */
#define VIRTIO_ISM_REGION_F_OWNER	(1U << 1) /* allocated by this device */
#define VIRTIO_ISM_REGION_F_BOUND	(1U << 2) /* kicks raise an interrupt (BIND) */
#define VIRTIO_ISM_REGION_F_KEPT	(1U << 3) /* held by the driver, not by a file */
#define VIRTIO_ISM_REGION_F_MINE	(1U << 4) /* held by the file asking */
#define VIRTIO_ISM_REGION_F_HOTPLUGGED	(1U << 5) /* attached by the host */

/* Device feature bits, as reported in virtio_ism_info.features (bit numbers). */
#define VIRTIO_ISM_INFO_F_EVENT_QUEUE	(1ULL << 1)
#define VIRTIO_ISM_INFO_F_QUERY		(1ULL << 2)

struct virtio_ism_info {
	__u64 gid;		/* group id of the device's pool */
	__u64 devid;		/* this device's id (named by per-device grants) */
	__u64 chunk_size;	/* allocation granule */
	__u64 notify_size;	/* doorbell bytes per chunk */
	__u64 features;		/* negotiated device feature bits (VIRTIO_ISM_INFO_F_*) */
	__u64 shm_size;		/* bytes of the region window (shmid 1) */
	__u64 nr_regions;	/* regions the driver holds on this device */
	__u32 instance;		/* N of /dev/ismN */
	__u32 reserved;
};

/*
 * A region as returned by ALLOC and ATTACH. mmap() the region with
 * offset = map_offset and length <= size: its areas appear back to back.
 */
struct virtio_ism_region {
	__u64 token;		/* ALLOC: out; ATTACH: in */
	__u64 size;		/* ALLOC: in (bytes wanted) and out (bytes mapped); ATTACH: out */
	__u64 map_offset;	/* out: the mmap offset of this region on this file */
	__u32 perm;		/* ATTACH in: READ|WRITE wanted, 0 = as granted; else 0 */
	__u32 flags;		/* out: VIRTIO_ISM_REGION_F_* */
};

struct virtio_ism_grant {
	__u64 token;
	__u64 perms;		/* VIRTIO_ISM_PERM_* */
	__u64 peer_devid;	/* 0: the default grant; else that device's grant */
};

struct virtio_ism_area {
	__u64 offset;		/* in the region window (shmid 1) */
	__u64 size;
};

/* REGION_INFO: describe a region the driver holds. */
struct virtio_ism_region_info {
	__u64 token;		/* in */
	__u64 size;		/* out */
	__u64 map_offset;	/* out (meaningful only with VIRTIO_ISM_REGION_F_MINE) */
	__u64 areas;		/* in: user pointer to struct virtio_ism_area[max_areas] or 0 */
	__u32 max_areas;	/* in */
	__u32 nr_areas;		/* out: areas of the region (may exceed max_areas) */
	__u32 flags;		/* out: VIRTIO_ISM_REGION_F_* */
	__u32 reserved;
};

/* LIST: tokens of every region the driver holds on this device. */
struct virtio_ism_list {
	__u64 tokens;		/* in: user pointer to __u64[max_tokens] or 0 */
	__u32 max_tokens;	/* in */
	__u32 nr_tokens;	/* out: regions held (may exceed max_tokens) */
};

struct virtio_ism_counters {
	__u64 ctrl_commands;	/* control commands completed */
	__u64 ctrl_errors;	/* ... with a status other than OK */
	__u64 ctrl_timeouts;	/* commands the device did not answer in time */
	__u64 bad_replies;	/* replies refused: bad offset, size or count */
	__u64 kicks_sent;
	__u64 kick_irqs;	/* kick interrupts received */
	__u64 events;		/* event queue entries received */
	__u64 events_lost;	/* events dropped because a reader's queue was full */
};

/* Event types read() returns: the device's event types plus KICK. */
#define VIRTIO_ISM_EV_UPDATE		(1ULL << 0)
#define VIRTIO_ISM_EV_ATTACH		(1ULL << 1)
#define VIRTIO_ISM_EV_DETACH		(1ULL << 2)
#define VIRTIO_ISM_EV_REVOKE		(1ULL << 3)
#define VIRTIO_ISM_EV_REGION_ADDED	(1ULL << 4)
#define VIRTIO_ISM_EV_OVERFLOW		(1ULL << 5)
/* A peer kicked a bound region. Kicks share one interrupt: token is 0. */
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
/* Argument: the token (__u64). Unmaps it from every process first. */
#define VIRTIO_ISM_IOC_DETACH		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x03, __u64)
#define VIRTIO_ISM_IOC_GRANT		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x04, struct virtio_ism_grant)
/* Argument: the token. Kicks raise this device's config interrupt; see docs. */
#define VIRTIO_ISM_IOC_BIND		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x05, __u64)
#define VIRTIO_ISM_IOC_UNBIND		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x06, __u64)
#define VIRTIO_ISM_IOC_KICK		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x07, __u64)
#define VIRTIO_ISM_IOC_REGION_INFO	_IOWR(VIRTIO_ISM_IOC_MAGIC, 0x08, struct virtio_ism_region_info)
#define VIRTIO_ISM_IOC_LIST		_IOWR(VIRTIO_ISM_IOC_MAGIC, 0x09, struct virtio_ism_list)
#define VIRTIO_ISM_IOC_COUNTERS		_IOR(VIRTIO_ISM_IOC_MAGIC, 0x0a, struct virtio_ism_counters)
/*
 * Argument: the token. Moves a region from this file to the driver: it outlives the
 * file until a later ATTACH of the same token (any file) takes it back.
 */
#define VIRTIO_ISM_IOC_KEEP		_IOW(VIRTIO_ISM_IOC_MAGIC, 0x0b, __u64)

#endif /* _UAPI_LINUX_VIRTIO_ISM_H */
