/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The errno the driver returns for a device status byte. Needs <linux/virtio_ism.h>
 * (include/uapi/linux/virtio_ism.h) and the E* constants of <linux/errno.h> or <errno.h>.
 * The Rust crate `ism` maps the errno back; guest-driver/ism/tests/c_layout.rs checks both.
 */
#ifndef _VIRTIO_ISM_STATUS_H
#define _VIRTIO_ISM_STATUS_H

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
	case VIRTIO_ISM_EAGAIN:
		return -EAGAIN;
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

#endif /* _VIRTIO_ISM_STATUS_H */
