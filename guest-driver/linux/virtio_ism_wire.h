/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The virtio-ism wire protocol (docs/protocol.md), hand-mirrored from the Rust crate
 * virtio-ism-proto (virtio-ism/proto/src/defs.rs), which is the source of truth.
 * guest-driver/ism/tests/c_layout.rs compiles this file and compares every value
 * with the Rust constants. Include <linux/errno.h> or <errno.h> first.
 */
#ifndef _VIRTIO_ISM_WIRE_H
#define _VIRTIO_ISM_WIRE_H

#define VIRTIO_ID_ISM			44

#define VIRTIO_ISM_F_EVENT_IRQ		0
#define VIRTIO_ISM_F_EVENT_QUEUE	1
#define VIRTIO_ISM_F_QUERY		2

#define VIRTIO_ISM_CTRL_QUEUE		0
#define VIRTIO_ISM_EVENT_QUEUE		1

#define VIRTIO_ISM_SHM_ID_REGIONS	1
#define VIRTIO_ISM_SHM_ID_NOTIFY	2

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
#define VIRTIO_ISM_CTRL_QUERY			5
#define VIRTIO_ISM_CTRL_QUERY_LIST		0
#define VIRTIO_ISM_CTRL_QUERY_REGION		1

#define VIRTIO_ISM_OK			0
#define VIRTIO_ISM_ENOENT		2
#define VIRTIO_ISM_E2BIG		7
#define VIRTIO_ISM_ENOMEM		12
#define VIRTIO_ISM_ENOSPC		28
#define VIRTIO_ISM_PERM_EATTACH		100
#define VIRTIO_ISM_PERM_EREAD		101
#define VIRTIO_ISM_PERM_EWRITE		102
#define VIRTIO_ISM_ERR			255

/* Device event types (the uapi VIRTIO_ISM_EV_* use the same values). */
#define VIRTIO_ISM_EVENT_UPDATE		(1ULL << 0)
#define VIRTIO_ISM_EVENT_ATTACH		(1ULL << 1)
#define VIRTIO_ISM_EVENT_DETACH		(1ULL << 2)
#define VIRTIO_ISM_EVENT_REVOKE		(1ULL << 3)
#define VIRTIO_ISM_EVENT_REGION_ADDED	(1ULL << 4)
#define VIRTIO_ISM_EVENT_OVERFLOW	(1ULL << 5)

#define VIRTIO_ISM_QREGION_READ		(1ULL << 0)
#define VIRTIO_ISM_QREGION_WRITE	(1ULL << 1)
#define VIRTIO_ISM_QREGION_OWNER	(1ULL << 8)
#define VIRTIO_ISM_QREGION_HOTPLUGGED	(1ULL << 9)

#define VIRTIO_ISM_MSI_NO_VECTOR	0xffff

/* Sizes of the wire structures (all fields le64 unless noted). */
#define VIRTIO_ISM_CONFIG_SIZE		32	/* gid, devid, chunk_size, notify_size */
#define VIRTIO_ISM_CTRL_HDR_SIZE	2	/* u8 class, u8 cmd */
#define VIRTIO_ISM_ATTACH_REQ_SIZE	16	/* le64 token, le32 rw_perm, 4 pad */
#define VIRTIO_ISM_AREA_SIZE		16	/* offset, size */
#define VIRTIO_ISM_ALLOC_REPLY_HDR_SIZE	16	/* token, num */
#define VIRTIO_ISM_ATTACH_REPLY_HDR_SIZE 8	/* num */
#define VIRTIO_ISM_QLIST_REPLY_HDR_SIZE	8	/* num */
#define VIRTIO_ISM_QREGION_REPLY_HDR_SIZE 32	/* size, flags, vector, num */
#define VIRTIO_ISM_EVENT_SIZE		40	/* ev_type, offset, devid, peers, token */

/* Config space field offsets. */
#define VIRTIO_ISM_CFG_GID		0
#define VIRTIO_ISM_CFG_DEVID		8
#define VIRTIO_ISM_CFG_CHUNK_SIZE	16
#define VIRTIO_ISM_CFG_NOTIFY_SIZE	24

/* Event field offsets. */
#define VIRTIO_ISM_EV_OFF_TYPE		0
#define VIRTIO_ISM_EV_OFF_OFFSET	8
#define VIRTIO_ISM_EV_OFF_DEVID		16
#define VIRTIO_ISM_EV_OFF_PEERS		24
#define VIRTIO_ISM_EV_OFF_TOKEN		32

/*
 * The errno the driver returns for a device status (needs the E* constants of
 * <linux/errno.h> or <errno.h>). The Rust crate maps it back; tests check both ways.
 */
static inline int virtio_ism_status_errno(unsigned char status)
{
	switch (status) {
	case VIRTIO_ISM_OK:
		return 0;
	case VIRTIO_ISM_ENOENT:
		return -ENOENT;
	case VIRTIO_ISM_E2BIG:
		return -E2BIG;
	case VIRTIO_ISM_ENOMEM:
		return -ENOMEM;
	case VIRTIO_ISM_ENOSPC:
		return -ENOSPC;
	case VIRTIO_ISM_PERM_EATTACH:
		return -EACCES;
	case VIRTIO_ISM_PERM_EREAD:
		return -EPERM;
	case VIRTIO_ISM_PERM_EWRITE:
		return -EROFS;
	case VIRTIO_ISM_ERR:
		return -EINVAL;
	default:
		return -EPROTO;
	}
}

#endif /* _VIRTIO_ISM_WIRE_H */
