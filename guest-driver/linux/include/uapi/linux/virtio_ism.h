/* SPDX-License-Identifier: ((GPL-2.0 WITH Linux-syscall-note) OR Apache-2.0) */
/*
 * Virtio ISM (inter-VM shared memory) device interface: device id 44.
 *
 * Feature bits, config space, control commands, statuses and event records of the
 * device, as docs/protocol.md describes them. The Rust crate virtio-ism-proto
 * (virtio-ism/proto/src/defs.rs) holds the same numbers; guest-driver/ism/tests/c_layout.rs
 * compiles this header and compares them. All multi-byte fields are little endian.
 */
#ifndef _UAPI_LINUX_VIRTIO_ISM_H
#define _UAPI_LINUX_VIRTIO_ISM_H

#include <linux/types.h>
#include <linux/virtio_types.h>

#ifndef VIRTIO_ID_ISM
#define VIRTIO_ID_ISM			44
#endif

/* Feature bits */
#define VIRTIO_ISM_F_EVENT_IRQ		0	/* draft: region events raise an interrupt */
#define VIRTIO_ISM_F_EVENT_QUEUE	1	/* events arrive on queue 1 */
#define VIRTIO_ISM_F_QUERY		2	/* QUERY_LIST and QUERY_REGION */
#define VIRTIO_ISM_F_GRANT		3	/* regions are owner-only until GRANTed */
#define VIRTIO_ISM_F_VECTOR_EVENTS	4	/* region events also raise the region's vector */
#define VIRTIO_ISM_F_KICK_PENDING	5	/* EVENT_VECTOR_PENDING_SET: kicks set a driver bit */
#define VIRTIO_ISM_F_EAGAIN		6	/* VIRTIO_ISM_EAGAIN (11) instead of ERR: pool away */

/* Virtqueues */
#define VIRTIO_ISM_CTRL_QUEUE		0
#define VIRTIO_ISM_EVENT_QUEUE		1

/* Shared-memory region ids */
#define VIRTIO_ISM_SHM_ID_REGIONS	1	/* the region window */
#define VIRTIO_ISM_SHM_ID_NOTIFY	2	/* one doorbell slot per chunk */

struct virtio_ism_config {
	__le64 gid;		/* group id of the device's pool */
	__le64 devid;		/* this device's id */
	__le64 chunk_size;	/* allocation granule, a power of two */
	__le64 notify_size;	/* bytes of one doorbell slot */
};

/* Control queue: the header, then a command payload; the device writes status + reply. */
struct virtio_ism_ctrl_hdr {
	__u8 class;
	__u8 cmd;
};

#define VIRTIO_ISM_CTRL_ALLOC			0
#define VIRTIO_ISM_CTRL_ALLOC_REGION		0
#define VIRTIO_ISM_CTRL_ATTACH			1
#define VIRTIO_ISM_CTRL_ATTACH_REGION		0
#define VIRTIO_ISM_CTRL_DETACH			2
#define VIRTIO_ISM_CTRL_DETACH_REGION		0
#define VIRTIO_ISM_CTRL_GRANT			3
#define VIRTIO_ISM_CTRL_GRANT_SET_DEFAULT	0
#define VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE	1
#define VIRTIO_ISM_CTRL_EVENT_VECTOR		4
#define VIRTIO_ISM_CTRL_EVENT_VECTOR_SET	0
#define VIRTIO_ISM_CTRL_EVENT_VECTOR_PENDING_SET	1	/* needs VIRTIO_ISM_F_KICK_PENDING */
#define VIRTIO_ISM_CTRL_QUERY			5
#define VIRTIO_ISM_CTRL_QUERY_LIST		0
#define VIRTIO_ISM_CTRL_QUERY_REGION		1

/* Status byte, the first byte the device writes */
#define VIRTIO_ISM_OK			0
#define VIRTIO_ISM_ENOENT		2
#define VIRTIO_ISM_E2BIG		7
#define VIRTIO_ISM_ENOMEM		12
/* Extension: the host pool is temporarily unavailable; the command may be retried. */
#define VIRTIO_ISM_EAGAIN		11
#define VIRTIO_ISM_ENOSPC		28
#define VIRTIO_ISM_PERM_EATTACH		100
#define VIRTIO_ISM_PERM_EREAD		101
#define VIRTIO_ISM_PERM_EWRITE		102
#define VIRTIO_ISM_ERR			255

/* Permission bits of GRANT */
#define VIRTIO_ISM_PERM_READ		(1ULL << 0)
#define VIRTIO_ISM_PERM_WRITE		(1ULL << 1)
#define VIRTIO_ISM_PERM_ATTACH		(1ULL << 2)
#define VIRTIO_ISM_PERM_MANAGE		(1ULL << 3)
#define VIRTIO_ISM_PERM_CLEAN_DEFAULT	(1ULL << 4)

/* EVENT_VECTOR's vector that unbinds */
#define VIRTIO_ISM_MSI_NO_VECTOR	0xffff

/* A run of chunks of a region, relative to the start of shmid 1. */
struct virtio_ism_area {
	__le64 offset;
	__le64 size;
};

struct virtio_ism_ctrl_alloc {
	__le64 size;
};

struct virtio_ism_ctrl_alloc_reply {
	__le64 token;
	__le64 num;
	struct virtio_ism_area area[];
};

struct virtio_ism_ctrl_attach {
	__le64 token;
	__le32 rw_perm;		/* VIRTIO_ISM_PERM_READ | _WRITE, 0: as granted */
	__le32 padding;
};

struct virtio_ism_ctrl_attach_reply {
	__le64 num;
	struct virtio_ism_area area[];
};

struct virtio_ism_ctrl_detach {
	__le64 token;
};

/* GRANT_SET_DEFAULT sends token and permissions; GRANT_SET_FOR_DEVICE all three. */
struct virtio_ism_ctrl_grant {
	__le64 token;
	__le64 permissions;
	__le64 peer_devid;
};

struct virtio_ism_ctrl_event_vector {
	__le64 token;
	__le64 vector;		/* MSI-X table index, or VIRTIO_ISM_MSI_NO_VECTOR */
};

/*
 * EVENT_VECTOR_PENDING_SET: bind like EVENT_VECTOR_SET; before raising the vector
 * for a peer's kick the device sets bit pending_bit (0..63) of the le64 at
 * guest-physical pending_addr (8-byte aligned) with an atomic OR.
 */
struct virtio_ism_ctrl_event_vector_pending {
	__le64 token;
	__le64 vector;		/* MSI-X table index */
	__le64 pending_addr;
	__le64 pending_bit;
};

struct virtio_ism_ctrl_query_list_reply {
	__le64 num;
	__le64 token[];
};

struct virtio_ism_ctrl_query_region {
	__le64 token;
};

#define VIRTIO_ISM_QREGION_READ		(1ULL << 0)
#define VIRTIO_ISM_QREGION_WRITE	(1ULL << 1)
#define VIRTIO_ISM_QREGION_OWNER	(1ULL << 8)
#define VIRTIO_ISM_QREGION_HOTPLUGGED	(1ULL << 9)

struct virtio_ism_ctrl_query_region_reply {
	__le64 size;
	__le64 flags;		/* VIRTIO_ISM_QREGION_* */
	__le64 vector;
	__le64 num;
	struct virtio_ism_area area[];
};

/* Event queue records (VIRTIO_ISM_F_EVENT_QUEUE) */
#define VIRTIO_ISM_EVENT_UPDATE		(1ULL << 0)
#define VIRTIO_ISM_EVENT_ATTACH		(1ULL << 1)
#define VIRTIO_ISM_EVENT_DETACH		(1ULL << 2)
#define VIRTIO_ISM_EVENT_REVOKE		(1ULL << 3)
#define VIRTIO_ISM_EVENT_REGION_ADDED	(1ULL << 4)
#define VIRTIO_ISM_EVENT_OVERFLOW	(1ULL << 5)

struct virtio_ism_event {
	__le64 ev_type;		/* VIRTIO_ISM_EVENT_* */
	__le64 offset;
	__le64 devid;		/* the peer, for ATTACH and DETACH */
	__le64 peers;		/* other holders after the event */
	__le64 token;
};

#endif /* _UAPI_LINUX_VIRTIO_ISM_H */
