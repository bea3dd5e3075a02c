/* SPDX-License-Identifier: GPL-2.0 */
/*
 * virtio_ism: the in-kernel interface of the virtio-ism driver (for SMC-D and other
 * kernel users). The device interface is <uapi/linux/virtio_ism.h>.
 */
#ifndef _LINUX_VIRTIO_ISM_H
#define _LINUX_VIRTIO_ISM_H

#include <linux/types.h>
#include <uapi/linux/virtio_ism.h>

/*
 * Called in hard-IRQ context when a peer kicks region @token; must not sleep.
 * Kicks are not counted: several may arrive as one call.
 */
typedef void (*virtio_ism_kick_fn)(u64 token, void *data);

int virtio_ism_set_kick_handler(unsigned int instance, u64 token,
				virtio_ism_kick_fn fn, void *data);

#endif /* _LINUX_VIRTIO_ISM_H */
