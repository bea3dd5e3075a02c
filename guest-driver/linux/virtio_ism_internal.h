/* SPDX-License-Identifier: GPL-2.0 */
/*
 * virtio_ism: what virtio_ism_main.c offers the module's other parts (the SMC-D
 * glue, virtio_ism_smc.c), and what they offer back. Not exported to other modules.
 *
 * Kernel regions: regions the driver holds for a kernel user ("kept by the driver":
 * no file holds them, user space cannot ATTACH, DETACH or map them), each mapped as
 * one contiguous range of the memremap'd window, freed at remove. Every function
 * that talks to the device sleeps (control queue, ctrl_lock): process context only.
 * ism_k_kick() does not sleep and may be called from any context.
 */
#ifndef _VIRTIO_ISM_INTERNAL_H
#define _VIRTIO_ISM_INTERNAL_H

#include <linux/types.h>
#include <linux/atomic.h>
#include <linux/virtio_ism.h>

struct ism_dev;
struct device;

/* A kernel region's mapping; valid until ism_k_detach() or a REVOKE of it. */
struct ism_kmap {
	u64 token;
	u64 size;			/* bytes, a page multiple */
	void *addr;			/* kernel address: inside the memremap'd window */
	phys_addr_t phys;		/* guest-physical address of addr */
	void __iomem *doorbell;		/* its first chunk's doorbell */
	bool owner;			/* allocated here (vs attached) */
};

/* What the module knows about a device, for the SMC-D glue. */
struct ism_k_info {
	u64 gid;			/* the host pool's id */
	u64 devid;			/* this device in the pool */
	u64 chunk_size;
	u64 features;			/* VIRTIO_ISM_INFO_F_* negotiated */
	const char *name;		/* "ismN" */
	struct device *pci;		/* the transport's PCI function, or NULL */
};

/* SMC-D counters, in /sys/class/misc/ismN/counters/ next to the device's own. */
struct ism_smcd_counters {
	atomic64_t dmbs_registered;	/* register_dmb that succeeded */
	atomic64_t dmbs_unregistered;
	atomic64_t dmbs;		/* registered now */
	atomic64_t peer_attaches;	/* peer DMBs attached (first use of a token) */
	atomic64_t peer_attach_errors;
	atomic64_t peer_detaches;
	atomic64_t moves;		/* move_data calls that succeeded */
	atomic64_t move_bytes;
	atomic64_t moves_deferred;	/* queued while the peer DMB was being attached */
	atomic64_t move_errors;
	atomic64_t signals;		/* move_data with the signal flag: kicks sent */
	atomic64_t irqs;		/* kicks of our DMBs handed to smcd_handle_irq */
	atomic64_t gid_queries;		/* query_remote_gid */
	atomic64_t gid_refusals;	/* ... that said "cannot talk" */
};

void ism_k_info(struct ism_dev *ism, struct ism_k_info *info);
struct ism_smcd_counters *ism_k_counters(struct ism_dev *ism);
/* The text of /sys/class/misc/ismN/smcd (one line, no newline needed). */
void ism_k_set_smcd_state(struct ism_dev *ism, const char *fmt, ...) __printf(2, 3);
/* Per-device state of the SMC-D glue (virtio_ism_smc.c owns what it points to). */
void ism_k_set_smc_priv(struct ism_dev *ism, void *priv);
void *ism_k_smc_priv(struct ism_dev *ism);

/* ALLOC @size bytes as one contiguous range; kept by the driver. */
int ism_k_alloc(struct ism_dev *ism, u64 size, struct ism_kmap *map);
/* ATTACH @token writable (READ|WRITE) as one contiguous range; kept by the driver. */
int ism_k_attach(struct ism_dev *ism, u64 token, struct ism_kmap *map);
/* DETACH a kernel region (the device frees it when it was the last holder). */
int ism_k_detach(struct ism_dev *ism, u64 token);
/* GRANT_SET_FOR_DEVICE: @perms (VIRTIO_ISM_PERM_*) on @token for device @devid. */
int ism_k_grant(struct ism_dev *ism, u64 token, u64 devid, u64 perms);
/* Route kicks of kernel region @token to @fn (hard IRQ), binding it; NULL stops them. */
int ism_k_set_kick(struct ism_dev *ism, u64 token, virtio_ism_kick_fn fn, void *data);
/* Ring @map's doorbell. Any context. */
void ism_k_kick(struct ism_dev *ism, const struct ism_kmap *map);

/*
 * The SMC-D glue (virtio_ism_smc.c). probe: after the device is up (may defer its
 * work); remove: before the device goes away, while control commands still work.
 * region_event: a REVOKE or a peer's DETACH of a kernel region (event work, process
 * context, no driver lock held).
 */
void virtio_ism_smc_probe(struct ism_dev *ism);
void virtio_ism_smc_remove(struct ism_dev *ism);
void virtio_ism_smc_region_event(struct ism_dev *ism, u64 type, u64 token, u64 devid);

#endif /* _VIRTIO_ISM_INTERNAL_H */
