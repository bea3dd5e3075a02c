// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_ism: each virtio-ism device as an SMC-D device of the kernel's own SMC
 * (net/smc), so that TCP sockets between two guests of one host pool can move their
 * data through shared memory (docs/smc.md).
 *
 * Linux 6.1 exports smcd_alloc_dev() & co. and calls a device's struct smcd_ops
 * (include/net/smc.h). Later kernels take SMC-D devices only from s390's ism driver
 * and SMC's own loopback device: there the module serves /dev/ismN as always and
 * says once why it offers no SMC-D device (also in /sys/class/misc/ismN/smcd).
 *
 * The smc module is optional: its symbols are taken with symbol_get() after
 * request_module("smc"), so virtio_ism loads (and /dev/ismN works) without it.
 *
 * Mapping of SMC-D onto the device:
 *  - GID = pool tag << 32 | devid, the tag being the pool gid folded to 32 bits.
 *    CHID and the system EID are derived from the tag too: every device of a pool
 *    agrees on them, devices of other pools (other hosts) do not.
 *  - query_remote_gid: the tag must be ours and the device must accept a grant to
 *    the GID's devid (a pool refuses grants to devices that are not connected).
 *  - A DMB is a kernel region: ALLOCed, GRANTed READ|WRITE|ATTACH to the remote
 *    GID's device only, bound for kicks; a kick of it calls smcd_handle_irq() for
 *    its sba index. dmb_tok is the region's token.
 *  - move_data writes into the peer's DMB, ATTACHed by token on first use and kept
 *    until the peer lets go of it (its DETACH event) or the device goes away; the
 *    signal flag kicks it.
 *
 * Contexts (read from 6.1's net/smc): register_dmb, unregister_dmb and
 * query_remote_gid run in process context and may sleep (they send control
 * commands). move_data runs under spin_lock_bh(&conn->send_lock) or in the receive
 * tasklet, add_vlan_id/del_vlan_id under spin_lock_irqsave(&smcd->lock): those
 * never sleep. So move_data cannot ATTACH: the first write to a peer DMB starts an
 * ATTACH on a work item and queues the write (a copy); the work writes the queued
 * data, in order, once attached, and later writes go straight to the mapping.
 *
 * Locking: vsmc_lock (a mutex) orders probe/remove against region events; dmbs_lock
 * (a mutex) our DMBs and their sba bitmap; peers_lock (a spinlock, any context) the
 * peer DMB table, each entry's state and its queue. A peer mapping is written
 * outside peers_lock with the entry's users count raised; it is only detached
 * after the entry left the table and users dropped to zero.
 */

#include <linux/module.h>
#include <linux/version.h>
#include <linux/slab.h>
#include <linux/kmod.h>
#include <linux/bitmap.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include <uapi/linux/virtio_ism_ioctl.h>
#include "virtio_ism_internal.h"

static bool smcd = true;
module_param(smcd, bool, 0444);
MODULE_PARM_DESC(smcd,
		 "Offer each device to the kernel's SMC as an SMC-D device where the kernel allows it (default on)");

#if IS_ENABLED(CONFIG_SMC) && LINUX_VERSION_CODE < KERNEL_VERSION(6, 2, 0)

#include <net/smc.h>

/* conn[] entries SMC allocates for the device: DMBs at once (sba 0 is not used). */
#define VSMC_MAX_DMBS		1920
/* Peer DMBs one device writes into at once. */
#define VSMC_MAX_PEERS		1024
/* Bytes queued for one peer DMB while it is being attached (SMC-D DMBs are <= 1 MiB). */
#define VSMC_PENDING_MAX	(4U << 20)
#define VSMC_EID_LEN		32	/* SMC_MAX_EID_LEN, net/smc/smc_clc.h */
#define VSMC_DEVID_MASK		0xffffffffULL

/* The smc module's exports, taken with symbol_get() (no hard dependency on smc.ko). */
struct vsmc_syms {
	typeof(&smcd_alloc_dev) alloc_dev;
	typeof(&smcd_register_dev) register_dev;
	typeof(&smcd_unregister_dev) unregister_dev;
	typeof(&smcd_free_dev) free_dev;
	typeof(&smcd_handle_irq) handle_irq;
	typeof(&smcd_handle_event) handle_event;
};

struct vsmc_dev {
	struct ism_dev *ism;
	struct ism_smcd_counters *cnt;
	struct ism_k_info info;
	u32 tag;			/* the pool gid folded to 32 bits */
	u64 local_gid;
	u16 chid;
	struct vsmc_syms syms;
	bool have_syms;
	struct smcd_dev *smcd;		/* registered with SMC when set */
	struct work_struct register_work;
	struct workqueue_struct *wq;	/* peer ATTACHes */
	u64 probe_token;		/* a region to test grants to remote devids; 0: none */

	struct mutex dmbs_lock;
	struct list_head dmbs;
	DECLARE_BITMAP(sba, VSMC_MAX_DMBS);

	spinlock_t peers_lock;
	struct list_head peers;
	unsigned int nr_peers;
	bool dying;			/* no new peer entries */
	wait_queue_head_t users_wq;
};

/* One of our DMBs. */
struct vsmc_dmb {
	struct list_head node;		/* vsmc_dev.dmbs */
	struct vsmc_dev *v;
	struct ism_kmap map;
	u32 sba_idx;
	u64 rgid;
	u64 rdevid;
};

enum vsmc_peer_state {
	VSMC_PEER_ATTACHING,		/* writes are queued */
	VSMC_PEER_READY,		/* writes go to map */
	VSMC_PEER_FAILED,		/* writes fail with err */
};

/* A write queued for a peer DMB not attached yet. */
struct vsmc_write {
	struct list_head node;
	u32 offset;
	u32 len;
	bool sf;
	u8 data[];
};

/* A peer's DMB we write into. */
struct vsmc_peer {
	struct list_head node;		/* vsmc_dev.peers, under peers_lock */
	struct vsmc_dev *v;
	u64 token;
	enum vsmc_peer_state state;	/* under peers_lock */
	int err;
	bool attached;			/* map is ours to detach */
	struct ism_kmap map;
	atomic_t users;			/* move_data writing into map outside the lock */
	struct list_head queue;		/* vsmc_write, under peers_lock */
	u32 queued;			/* their bytes */
	struct work_struct work;
};

static DEFINE_MUTEX(vsmc_lock);
/* The system EID: SMC asks the first registered device only (no device argument). */
static u8 vsmc_seid[VSMC_EID_LEN + 1];

static u32 vsmc_tag(u64 pool_gid)
{
	return lower_32_bits(pool_gid) ^ upper_32_bits(pool_gid);
}

static u64 vsmc_gid(u32 tag, u64 devid)
{
	return (u64)tag << 32 | devid;
}

static struct vsmc_dev *vsmc_from(struct smcd_dev *smcd)
{
	return smcd->priv;
}

/* ---- peer DMBs: move_data ------------------------------------------------- */

/* Caller holds peers_lock. */
static struct vsmc_peer *vsmc_peer_find(struct vsmc_dev *v, u64 token)
{
	struct vsmc_peer *p;

	list_for_each_entry(p, &v->peers, node)
		if (p->token == token)
			return p;
	return NULL;
}

static void vsmc_free_writes(struct list_head *list)
{
	struct vsmc_write *w, *tmp;

	list_for_each_entry_safe(w, tmp, list, node) {
		list_del(&w->node);
		kfree(w);
	}
}

/* Write @len bytes at @offset of an attached peer DMB; kick it when @sf. */
static int vsmc_peer_write(struct vsmc_dev *v, struct vsmc_peer *p, u32 offset,
			   const void *data, u32 len, bool sf)
{
	if (offset > p->map.size || len > p->map.size - offset)
		return -EINVAL;
	memcpy(p->map.addr + offset, data, len);
	if (sf) {
		ism_k_kick(v->ism, &p->map);
		atomic64_inc(&v->cnt->signals);
	}
	return 0;
}

/* ATTACH a peer DMB, then write what was queued meanwhile, in order. */
static void vsmc_peer_work(struct work_struct *work)
{
	struct vsmc_peer *p = container_of(work, struct vsmc_peer, work);
	struct vsmc_dev *v = p->v;
	u64 token = p->token;
	struct vsmc_write *w;
	struct ism_kmap map;
	unsigned long flags;
	LIST_HEAD(drop);
	int ret;

	ret = ism_k_attach(v->ism, token, &map);
	spin_lock_irqsave(&v->peers_lock, flags);
	if (ret) {
		/* FAILED and not attached: vsmc_peer_new may free p once we unlock. */
		p->state = VSMC_PEER_FAILED;
		p->err = ret;
		list_splice_init(&p->queue, &drop);
		p->queued = 0;
		spin_unlock_irqrestore(&v->peers_lock, flags);
		vsmc_free_writes(&drop);
		atomic64_inc(&v->cnt->peer_attach_errors);
		dev_warn_ratelimited(v->info.pci, "%s: SMC-D: cannot attach peer DMB %llx: %d\n",
				     v->info.name, token, ret);
		return;
	}
	p->map = map;
	p->attached = true;
	spin_unlock_irqrestore(&v->peers_lock, flags);
	atomic64_inc(&v->cnt->peer_attaches);

	/* Still ATTACHING: move_data keeps queueing behind what is written here. */
	for (;;) {
		spin_lock_irqsave(&v->peers_lock, flags);
		w = list_first_entry_or_null(&p->queue, struct vsmc_write, node);
		if (!w) {
			p->state = VSMC_PEER_READY;
			spin_unlock_irqrestore(&v->peers_lock, flags);
			return;
		}
		list_del(&w->node);
		p->queued -= w->len;
		spin_unlock_irqrestore(&v->peers_lock, flags);
		ret = vsmc_peer_write(v, p, w->offset, w->data, w->len, w->sf);
		kfree(w);
		if (ret) {
			spin_lock_irqsave(&v->peers_lock, flags);
			p->state = VSMC_PEER_FAILED;
			p->err = ret;
			list_splice_init(&p->queue, &drop);
			p->queued = 0;
			spin_unlock_irqrestore(&v->peers_lock, flags);
			vsmc_free_writes(&drop);
			atomic64_inc(&v->cnt->move_errors);
			return;
		}
	}
}

/*
 * Queue a write for a peer DMB being attached, in page-sized pieces (atomic
 * allocations of order 0; SMC writes up to a whole DMB at once), the signal flag on
 * the last. All or nothing. Caller holds peers_lock.
 */
static int vsmc_peer_queue(struct vsmc_peer *p, u32 offset, const void *data, u32 len,
			   bool sf)
{
	const u32 piece = PAGE_SIZE - sizeof(struct vsmc_write);
	struct vsmc_write *w;
	LIST_HEAD(ws);
	u32 done = 0, n;

	if (len > VSMC_PENDING_MAX - p->queued)
		return -ENOBUFS;
	do {
		n = min(len - done, piece);
		w = kmalloc(struct_size(w, data, n), GFP_ATOMIC);
		if (!w) {
			vsmc_free_writes(&ws);
			return -ENOMEM;
		}
		w->offset = offset + done;
		w->len = n;
		w->sf = sf && done + n == len;
		memcpy(w->data, data + done, n);
		list_add_tail(&w->node, &ws);
		done += n;
	} while (done < len);
	list_splice_tail(&ws, &p->queue);
	p->queued += len;
	return 0;
}

/*
 * Make room in a full table: free an entry whose ATTACH failed (its connection was
 * aborted by the failure; nothing is mapped; its work touches it no more once it
 * set FAILED and unlocked). Caller holds peers_lock.
 */
static bool vsmc_peer_evict(struct vsmc_dev *v)
{
	struct vsmc_peer *p;

	list_for_each_entry(p, &v->peers, node) {
		if (p->state == VSMC_PEER_FAILED && !p->attached && !atomic_read(&p->users)) {
			list_del(&p->node);
			v->nr_peers--;
			vsmc_free_writes(&p->queue);
			kfree(p);
			return true;
		}
	}
	return false;
}

/* A new entry for @token, its ATTACH started. Caller holds peers_lock. */
static struct vsmc_peer *vsmc_peer_new(struct vsmc_dev *v, u64 token)
{
	struct vsmc_peer *p;

	if (v->nr_peers >= VSMC_MAX_PEERS && !vsmc_peer_evict(v))
		return ERR_PTR(-ENOSPC);
	p = kzalloc(sizeof(*p), GFP_ATOMIC);
	if (!p)
		return ERR_PTR(-ENOMEM);
	p->v = v;
	p->token = token;
	p->state = VSMC_PEER_ATTACHING;
	atomic_set(&p->users, 0);
	INIT_LIST_HEAD(&p->queue);
	INIT_WORK(&p->work, vsmc_peer_work);
	list_add_tail(&p->node, &v->peers);
	v->nr_peers++;
	queue_work(v->wq, &p->work);
	return p;
}

/*
 * Write into the peer DMB @dmb_tok (softirq or bh disabled: never sleeps). @idx (the
 * DMB element) is not used: an SMC-D DMB here has one element, as SMC uses them.
 */
static int vsmc_move_data(struct smcd_dev *smcd, u64 dmb_tok, unsigned int idx, bool sf,
			  unsigned int offset, void *data, unsigned int size)
{
	struct vsmc_dev *v = vsmc_from(smcd);
	struct vsmc_peer *p;
	unsigned long flags;
	int ret;

	spin_lock_irqsave(&v->peers_lock, flags);
	if (v->dying) {
		ret = -ENODEV;
		goto unlock;
	}
	p = vsmc_peer_find(v, dmb_tok);
	if (!p) {
		p = vsmc_peer_new(v, dmb_tok);
		if (IS_ERR(p)) {
			ret = PTR_ERR(p);
			goto unlock;
		}
	}
	switch (p->state) {
	case VSMC_PEER_READY:
		atomic_inc(&p->users);
		spin_unlock_irqrestore(&v->peers_lock, flags);
		ret = vsmc_peer_write(v, p, offset, data, size, sf);
		if (atomic_dec_and_test(&p->users))
			wake_up_all(&v->users_wq);
		goto out;
	case VSMC_PEER_ATTACHING:
		ret = vsmc_peer_queue(p, offset, data, size, sf);
		if (!ret)
			atomic64_inc(&v->cnt->moves_deferred);
		break;
	default:
		ret = p->err ? p->err : -EIO;
		break;
	}
unlock:
	spin_unlock_irqrestore(&v->peers_lock, flags);
out:
	if (ret) {
		atomic64_inc(&v->cnt->move_errors);
		return ret;
	}
	atomic64_inc(&v->cnt->moves);
	atomic64_add(size, &v->cnt->move_bytes);
	return 0;
}

/* Forget a peer DMB that left the table: wait for writers, detach, free. Sleeps. */
static void vsmc_peer_drop(struct vsmc_dev *v, struct vsmc_peer *p)
{
	cancel_work_sync(&p->work);
	wait_event(v->users_wq, !atomic_read(&p->users));
	if (p->attached && ism_k_detach(v->ism, p->token) == 0)
		atomic64_inc(&v->cnt->peer_detaches);
	vsmc_free_writes(&p->queue);
	kfree(p);
}

/* ---- our DMBs -------------------------------------------------------------- */

/* A peer kicked one of our DMBs. Hard IRQ. */
static void vsmc_dmb_kicked(u64 token, void *data)
{
	struct vsmc_dmb *d = data;
	struct vsmc_dev *v = d->v;

	atomic64_inc(&v->cnt->irqs);
	/* 6.1's smcd_handle_irq() ignores the DMB element mask. */
	v->syms.handle_irq(v->smcd, d->sba_idx, 0);
}

/* The devid a GID of our pool names, or 0. */
static u64 vsmc_gid_devid(struct vsmc_dev *v, u64 gid)
{
	if (upper_32_bits(gid) != v->tag)
		return 0;
	return gid & VSMC_DEVID_MASK;
}

static int vsmc_register_dmb(struct smcd_dev *smcd, struct smcd_dmb *dmb)
{
	struct vsmc_dev *v = vsmc_from(smcd);
	struct vsmc_dmb *d;
	unsigned long idx;
	int ret;

	d = kzalloc(sizeof(*d), GFP_KERNEL);
	if (!d)
		return -ENOMEM;
	d->v = v;
	d->rgid = dmb->rgid;
	d->rdevid = vsmc_gid_devid(v, dmb->rgid);
	if (!dmb->dmb_len || !d->rdevid) {
		kfree(d);
		return -EINVAL;
	}

	mutex_lock(&v->dmbs_lock);
	if (dmb->sba_idx) {
		idx = dmb->sba_idx;
		if (idx >= VSMC_MAX_DMBS || test_bit(idx, v->sba))
			idx = VSMC_MAX_DMBS;
	} else {
		idx = find_next_zero_bit(v->sba, VSMC_MAX_DMBS, 1);
	}
	if (idx >= VSMC_MAX_DMBS) {
		mutex_unlock(&v->dmbs_lock);
		kfree(d);
		return dmb->sba_idx ? -EINVAL : -ENOSPC;
	}
	set_bit(idx, v->sba);
	d->sba_idx = idx;
	mutex_unlock(&v->dmbs_lock);

	/* -ENOMEM (also: no contiguous range) makes SMC try a smaller DMB. */
	ret = ism_k_alloc(v->ism, dmb->dmb_len, &d->map);
	if (ret)
		goto err_sba;
	/* SMC expects a zeroed DMB (s390's are fresh DMA memory); a region may be reused. */
	memset(d->map.addr, 0, dmb->dmb_len);
	ret = ism_k_grant(v->ism, d->map.token, d->rdevid,
			  VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE | VIRTIO_ISM_PERM_ATTACH);
	if (ret)
		goto err_region;
	ret = ism_k_set_kick(v->ism, d->map.token, vsmc_dmb_kicked, d);
	if (ret)
		goto err_region;

	mutex_lock(&v->dmbs_lock);
	list_add_tail(&d->node, &v->dmbs);
	mutex_unlock(&v->dmbs_lock);
	dmb->sba_idx = d->sba_idx;
	dmb->dmb_tok = d->map.token;
	dmb->cpu_addr = d->map.addr;
	/* Never 0: SMC skips unregister_dmb for a DMB without a DMA address. */
	dmb->dma_addr = d->map.phys;
	atomic64_inc(&v->cnt->dmbs_registered);
	atomic64_inc(&v->cnt->dmbs);
	return 0;

err_region:
	ism_k_detach(v->ism, d->map.token);
err_sba:
	mutex_lock(&v->dmbs_lock);
	clear_bit(d->sba_idx, v->sba);
	mutex_unlock(&v->dmbs_lock);
	kfree(d);
	/* SMC reads -ENOMEM and -ENOSPC (try smaller); anything else is -EIO to it. */
	return ret;
}

static int vsmc_unregister_dmb(struct smcd_dev *smcd, struct smcd_dmb *dmb)
{
	struct vsmc_dev *v = vsmc_from(smcd);
	struct vsmc_dmb *d, *found = NULL;
	int ret;

	mutex_lock(&v->dmbs_lock);
	list_for_each_entry(d, &v->dmbs, node) {
		if (d->map.token == dmb->dmb_tok && d->sba_idx == dmb->sba_idx) {
			found = d;
			list_del(&d->node);
			break;
		}
	}
	mutex_unlock(&v->dmbs_lock);
	if (!found)
		return -ENOENT;
	/* Unbinds it first: its kick handler is not called after this. */
	ret = ism_k_detach(v->ism, found->map.token);
	if (ret && ret != -ENOENT)	/* -ENOENT: revoked by the host already */
		dev_warn(v->info.pci, "%s: SMC-D: detach of DMB %llx: %d\n", v->info.name,
			 found->map.token, ret);
	mutex_lock(&v->dmbs_lock);
	clear_bit(found->sba_idx, v->sba);
	mutex_unlock(&v->dmbs_lock);
	kfree(found);
	atomic64_inc(&v->cnt->dmbs_unregistered);
	atomic64_dec(&v->cnt->dmbs);
	/* The region is gone whatever the device said: SMC may forget the DMB. */
	return 0;
}

/* ---- the other ops ---------------------------------------------------------- */

/*
 * Can we talk to @rgid? Process context (SMC holds smcd_dev_list.mutex). The device
 * has no "is this devid in my pool" command; it does refuse a per-device grant naming
 * a devid that is not connected to its pool, so a grant of nothing on our probe region
 * answers it (together with the pool tag in the GID).
 */
static int vsmc_query_remote_gid(struct smcd_dev *smcd, u64 rgid, u32 vid_valid, u32 vid)
{
	struct vsmc_dev *v = vsmc_from(smcd);
	u64 devid = vsmc_gid_devid(v, rgid);
	int ret;

	atomic64_inc(&v->cnt->gid_queries);
	/* Our own GID: a loopback connection would attach its own DMB; TCP serves it. */
	if (!devid || rgid == v->local_gid || !v->probe_token)
		ret = -ENOENT;
	else
		ret = ism_k_grant(v->ism, v->probe_token, devid, 0);
	if (ret)
		atomic64_inc(&v->cnt->gid_refusals);
	return ret ? -ENOENT : 0;
}

/*
 * VLANs: the device has none; every device of the pool reaches every other. SMC
 * keeps its own VLAN bookkeeping (smc_ism_get_vlan) and calls these under a spinlock.
 */
static int vsmc_add_vlan_id(struct smcd_dev *smcd, u64 vlan_id)
{
	return 0;
}

static int vsmc_del_vlan_id(struct smcd_dev *smcd, u64 vlan_id)
{
	return 0;
}

static int vsmc_set_vlan_required(struct smcd_dev *smcd)
{
	return 0;
}

static int vsmc_reset_vlan_required(struct smcd_dev *smcd)
{
	return 0;
}

/*
 * Software events to a peer (6.1: link group shutdown, and the answer to a test
 * link request that nothing sends). The device cannot deliver them; the peer learns
 * that we are gone when we DETACH its DMBs (vsmc_region_detached) or by its own
 * timers. Succeeds, so SMC goes on tearing down.
 */
static int vsmc_signal_event(struct smcd_dev *smcd, u64 rgid, u32 trigger_irq,
			     u32 event_code, u64 info)
{
	return 0;
}

static u8 *vsmc_get_system_eid(void)
{
	return vsmc_seid;
}

static u16 vsmc_get_chid(struct smcd_dev *smcd)
{
	return vsmc_from(smcd)->chid;
}

static const struct smcd_ops vsmc_ops = {
	.query_remote_gid = vsmc_query_remote_gid,
	.register_dmb = vsmc_register_dmb,
	.unregister_dmb = vsmc_unregister_dmb,
	.add_vlan_id = vsmc_add_vlan_id,
	.del_vlan_id = vsmc_del_vlan_id,
	.set_vlan_required = vsmc_set_vlan_required,
	.reset_vlan_required = vsmc_reset_vlan_required,
	.signal_event = vsmc_signal_event,
	.move_data = vsmc_move_data,
	.get_system_eid = vsmc_get_system_eid,
	.get_chid = vsmc_get_chid,
};

/* ---- region events: a peer let go, or the host revoked ---------------------- */

/*
 * A kernel region was revoked, or a peer DETACHed it. Event work: process context.
 * - A peer DMB we write into: its owner let go of it (SMC unregistered it, or the
 *   peer's VM or driver went away): detach ours. A later write to it fails.
 * - One of our DMBs, detached by the device it is granted to (whose SMC only lets
 *   go when its device goes away: it never unregisters our DMBs), or revoked: tell
 *   SMC the peer GID is gone, which ends the link groups with it.
 */
void virtio_ism_smc_region_event(struct ism_dev *ism, u64 type, u64 token, u64 devid)
{
	struct smcd_event ev = { .type = ISM_EVENT_GID };
	struct vsmc_dev *v;
	struct vsmc_peer *p;
	struct vsmc_dmb *d;
	unsigned long flags;
	bool gone = false;

	mutex_lock(&vsmc_lock);
	v = ism_k_smc_priv(ism);
	if (!v || !v->smcd)
		goto out;
	spin_lock_irqsave(&v->peers_lock, flags);
	p = vsmc_peer_find(v, token);
	if (p) {
		list_del(&p->node);
		v->nr_peers--;
	}
	spin_unlock_irqrestore(&v->peers_lock, flags);
	if (p) {
		vsmc_peer_drop(v, p);
		goto out;
	}
	mutex_lock(&v->dmbs_lock);
	list_for_each_entry(d, &v->dmbs, node) {
		if (d->map.token == token &&
		    (type == VIRTIO_ISM_EVENT_REVOKE || devid == d->rdevid)) {
			ev.tok = d->rgid;
			gone = true;
			break;
		}
	}
	mutex_unlock(&v->dmbs_lock);
	if (gone)
		v->syms.handle_event(v->smcd, &ev);
out:
	mutex_unlock(&vsmc_lock);
}

/* ---- registration ------------------------------------------------------------ */

static void vsmc_put_syms(struct vsmc_dev *v)
{
	if (v->syms.alloc_dev)
		symbol_put(smcd_alloc_dev);
	if (v->syms.register_dev)
		symbol_put(smcd_register_dev);
	if (v->syms.unregister_dev)
		symbol_put(smcd_unregister_dev);
	if (v->syms.free_dev)
		symbol_put(smcd_free_dev);
	if (v->syms.handle_irq)
		symbol_put(smcd_handle_irq);
	if (v->syms.handle_event)
		symbol_put(smcd_handle_event);
	memset(&v->syms, 0, sizeof(v->syms));
}

static bool vsmc_get_syms(struct vsmc_dev *v)
{
	/* Loads smc.ko if it is installed and not loaded (no error if it is built in). */
	request_module("smc");
	v->syms.alloc_dev = symbol_get(smcd_alloc_dev);
	v->syms.register_dev = symbol_get(smcd_register_dev);
	v->syms.unregister_dev = symbol_get(smcd_unregister_dev);
	v->syms.free_dev = symbol_get(smcd_free_dev);
	v->syms.handle_irq = symbol_get(smcd_handle_irq);
	v->syms.handle_event = symbol_get(smcd_handle_event);
	if (v->syms.alloc_dev && v->syms.register_dev && v->syms.unregister_dev &&
	    v->syms.free_dev && v->syms.handle_irq && v->syms.handle_event)
		return true;
	vsmc_put_syms(v);
	return false;
}

/* Why @v cannot be an SMC-D device, or NULL. */
static const char *vsmc_unfit(struct vsmc_dev *v)
{
	if (!v->info.pci)
		return "needs the virtio-pci transport (SMC reads PCI ids of its parent)";
	if (!(v->info.features & VIRTIO_ISM_INFO_F_GRANT))
		return "needs VIRTIO_ISM_F_GRANT (not negotiated, or draft=1)";
	if (v->info.devid > VSMC_DEVID_MASK)
		return "devid does not fit the GID's 32 bits";
	return NULL;
}

static void vsmc_register_work(struct work_struct *work)
{
	struct vsmc_dev *v = container_of(work, struct vsmc_dev, register_work);
	struct smcd_dev *smcd;
	struct ism_kmap probe;
	const char *why;
	int ret;

	why = vsmc_unfit(v);
	if (why)
		goto off;
	if (!vsmc_get_syms(v)) {
		why = "the smc module is not available (modprobe smc)";
		goto off;
	}
	v->have_syms = true;
	ret = ism_k_alloc(v->ism, PAGE_SIZE, &probe);
	if (ret) {
		why = "cannot allocate the region that checks remote GIDs";
		goto off;
	}
	v->probe_token = probe.token;
	smcd = v->syms.alloc_dev(v->info.pci, v->info.name, &vsmc_ops, VSMC_MAX_DMBS);
	if (!smcd) {
		why = "smcd_alloc_dev failed";
		goto off;
	}
	smcd->priv = v;
	smcd->local_gid = v->local_gid;
	mutex_lock(&vsmc_lock);
	if (!vsmc_seid[0])
		snprintf(vsmc_seid, sizeof(vsmc_seid), "VIRTIO-ISM-SEID-%08XP%03X%04X",
			 v->tag, v->tag >> 20, v->chid);
	/* Set before SMC can call an op: region events look at v->smcd under vsmc_lock. */
	v->smcd = smcd;
	mutex_unlock(&vsmc_lock);
	ret = v->syms.register_dev(smcd);
	if (ret) {
		mutex_lock(&vsmc_lock);
		v->smcd = NULL;
		mutex_unlock(&vsmc_lock);
		v->syms.free_dev(smcd);
		why = "smcd_register_dev failed";
		goto off;
	}
	ism_k_set_smcd_state(v->ism, "on: gid 0x%016llx chid 0x%04x pnetid %.16s", v->local_gid,
			     v->chid, smcd->pnetid[0] ? (char *)smcd->pnetid : "(none)");
	dev_info(v->info.pci, "%s: SMC-D device, gid 0x%016llx chid 0x%04x\n", v->info.name,
		 v->local_gid, v->chid);
	return;
off:
	/* Whatever was set up stays until remove (vsmc_teardown). */
	ism_k_set_smcd_state(v->ism, "off: %s", why);
	pr_notice_once("virtio_ism: no SMC-D device: %s\n", why);
}

void virtio_ism_smc_probe(struct ism_dev *ism)
{
	struct vsmc_dev *v;

	if (!smcd) {
		ism_k_set_smcd_state(ism, "off: smcd=0");
		return;
	}
	v = kzalloc(sizeof(*v), GFP_KERNEL);
	if (!v) {
		ism_k_set_smcd_state(ism, "off: out of memory");
		return;
	}
	v->ism = ism;
	v->cnt = ism_k_counters(ism);
	ism_k_info(ism, &v->info);
	v->tag = vsmc_tag(v->info.gid);
	v->local_gid = vsmc_gid(v->tag, v->info.devid & VSMC_DEVID_MASK);
	v->chid = (u16)(v->tag ^ (v->tag >> 16));
	if (!v->chid)
		v->chid = 1;	/* SMC reads CHID 0 as "no device" */
	mutex_init(&v->dmbs_lock);
	INIT_LIST_HEAD(&v->dmbs);
	spin_lock_init(&v->peers_lock);
	INIT_LIST_HEAD(&v->peers);
	init_waitqueue_head(&v->users_wq);
	INIT_WORK(&v->register_work, vsmc_register_work);
	v->wq = alloc_workqueue("%s-smcd", 0, 0, v->info.name);
	if (!v->wq) {
		kfree(v);
		ism_k_set_smcd_state(ism, "off: out of memory");
		return;
	}
	mutex_lock(&vsmc_lock);
	ism_k_set_smc_priv(ism, v);
	mutex_unlock(&vsmc_lock);
	/* Off the probe path: it may load smc.ko. */
	ism_k_set_smcd_state(ism, "off: registering");
	schedule_work(&v->register_work);
}

void virtio_ism_smc_remove(struct ism_dev *ism)
{
	struct vsmc_dev *v;
	struct vsmc_peer *p, *ptmp;
	struct vsmc_dmb *d, *dtmp;
	unsigned long flags;
	LIST_HEAD(peers);

	mutex_lock(&vsmc_lock);
	v = ism_k_smc_priv(ism);
	ism_k_set_smc_priv(ism, NULL);
	mutex_unlock(&vsmc_lock);
	if (!v)
		return;
	cancel_work_sync(&v->register_work);
	if (v->smcd) {
		/* Ends every link group: SMC unregisters our DMBs through the ops. */
		v->syms.unregister_dev(v->smcd);
		v->syms.free_dev(v->smcd);
		v->smcd = NULL;
	}
	spin_lock_irqsave(&v->peers_lock, flags);
	v->dying = true;
	list_splice_init(&v->peers, &peers);
	v->nr_peers = 0;
	spin_unlock_irqrestore(&v->peers_lock, flags);
	list_for_each_entry_safe(p, ptmp, &peers, node) {
		list_del(&p->node);
		vsmc_peer_drop(v, p);
	}
	destroy_workqueue(v->wq);
	/* SMC unregistered them all; anything left is a leak on its side: free it here. */
	list_for_each_entry_safe(d, dtmp, &v->dmbs, node) {
		dev_warn(v->info.pci, "%s: SMC-D: DMB %llx left at remove\n", v->info.name,
			 d->map.token);
		list_del(&d->node);
		ism_k_detach(ism, d->map.token);
		kfree(d);
	}
	if (v->probe_token)
		ism_k_detach(ism, v->probe_token);
	if (v->have_syms)
		vsmc_put_syms(v);
	ism_k_set_smcd_state(ism, "off: removed");
	kfree(v);
}

#else /* no SMC-D device from this kernel */

#if !IS_ENABLED(CONFIG_SMC)
#define VSMC_WHY "the kernel has no SMC (CONFIG_SMC)"
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
#define VSMC_WHY "this kernel's SMC takes SMC-D devices from s390's ism driver and its own loopback only"
#else
#define VSMC_WHY "the module implements Linux 6.1's SMC-D device interface only"
#endif

void virtio_ism_smc_probe(struct ism_dev *ism)
{
	if (!smcd) {
		ism_k_set_smcd_state(ism, "off: smcd=0");
		return;
	}
	ism_k_set_smcd_state(ism, "off: %s", VSMC_WHY);
	pr_notice_once("virtio_ism: no SMC-D device: %s (docs/smc.md)\n", VSMC_WHY);
}

void virtio_ism_smc_remove(struct ism_dev *ism)
{
}

void virtio_ism_smc_region_event(struct ism_dev *ism, u64 type, u64 token, u64 devid)
{
}

#endif
