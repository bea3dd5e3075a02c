// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_ism: Linux driver for the virtio-ism device (virtio device 44).
 *
 * Binds the device through the virtio core, maps its two shared-memory regions
 * (shmid 1: the region window, shmid 2: the doorbells), runs the control queue
 * and, when offered, the event queue, and exposes /dev/ismN to user space:
 * ioctls (include/uapi/linux/virtio_ism_ioctl.h), mmap of held regions, read/poll
 * of events, counters in sysfs (/sys/class/misc/ismN/counters/). Kernel users get
 * virtio_ism_set_kick_handler() (include/linux/virtio_ism.h). The protocol is
 * docs/protocol.md; the device interface is include/uapi/linux/virtio_ism.h.
 * Each device is also offered to the kernel's SMC as an SMC-D device where the
 * kernel allows it (virtio_ism_smc.c, docs/smc.md), through the kernel regions below
 * (virtio_ism_internal.h).
 *
 * Kicks: a bound region gets an MSI-X vector of its own when the transport can
 * allocate one at run time (PCI, Linux 6.2+, pci_msix_can_alloc_dyn()), so a kick
 * names its region. Otherwise regions share the config vector; with
 * VIRTIO_ISM_F_KICK_PENDING each gets a bit in ism_dev.pending that the device
 * sets before raising the vector, so a kick still names its region. Without it a
 * config interrupt is reported as a kick of every region bound to it.
 *
 * Locking: ctrl_lock serializes control commands and is held by whoever adds or
 * removes a region (so a region found under ctrl_lock stays valid); regions_lock
 * protects the region list and is taken inside ctrl_lock, by mmap (under mmap_lock)
 * and by kick. kick_lock (a spinlock, taken in hard IRQ) protects the shared-vector
 * list and the in-kernel kick handlers. Nothing copies to or from user memory while
 * holding regions_lock.
 */

#include <linux/module.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/mount.h>
#include <linux/pseudo_fs.h>
#include <linux/mm.h>
#include <linux/io.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/pci.h>
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/scatterlist.h>
#include <linux/workqueue.h>
#include <linux/version.h>
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)
#include <linux/unaligned.h>
#else
#include <asm/unaligned.h>
#endif

#include <linux/virtio_ism.h>
#include <uapi/linux/virtio_ism_ioctl.h>
#include "virtio_ism_status.h"
#include "virtio_ism_internal.h"

#define ISM_EVENT_BUFS		16
#define ISM_FILE_EVENTS		64
/* Areas asked for on the first try of ALLOC/ATTACH; E2BIG says how many are needed. */
#define ISM_FIRST_AREAS		4
/* No reply may claim more areas or tokens than this, whatever the window size. */
#define ISM_MAX_ENTRIES		4096
/* Pending bits for regions on the shared vector; more bound regions go without. */
#define ISM_PENDING_BITS	1024
#define ISM_PENDING_WORDS	(ISM_PENDING_BITS / 64)
/* Regions a late reply to a timed-out ALLOC/ATTACH left on the device, to detach. */
#define ISM_MAX_ORPHANS		16
/* mmap offsets: region i is at i << ISM_MAP_SHIFT (1 TiB apart). */
#define ISM_MAP_SHIFT		40
/* The config vector of virtio-pci's MSI-X set-up (VP_MSIX_CONFIG_VECTOR). */
#define ISM_CONFIG_VECTOR	0
#define ISM_PERM_ALL		(VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE | \
				 VIRTIO_ISM_PERM_ATTACH | VIRTIO_ISM_PERM_MANAGE | \
				 VIRTIO_ISM_PERM_CLEAN_DEFAULT)
#define ISM_FS_MAGIC		0x69736d31	/* "ism1" */

/*
 * Longer than the device's own wait for its host pool (5 s; docs/pool.md): a host
 * pool that does not answer gives the device's EAGAIN status, not a timeout here.
 */
static unsigned int ctrl_timeout_ms = 10000;
module_param(ctrl_timeout_ms, uint, 0644);
MODULE_PARM_DESC(ctrl_timeout_ms,
		 "Milliseconds a control command waits for the device (default 10000, at least 100)");

static bool kick_vectors = true;
module_param(kick_vectors, bool, 0444);
MODULE_PARM_DESC(kick_vectors,
		 "Give each bound region an MSI-X vector of its own when the transport can (default on)");

static bool draft;
module_param(draft, bool, 0444);
MODULE_PARM_DESC(draft,
		 "Negotiate only what the virtio-ism draft defines: no event queue, QUERY or GRANT");

static DEFINE_MUTEX(ism_devs_lock);
static DEFINE_IDR(ism_devs);

struct ism_region {
	struct list_head node;		/* ism_dev.regions */
	struct list_head kick_node;	/* ism_dev.shared_kicks, under kick_lock */
	struct ism_dev *ism;
	struct ism_file *holder;	/* NULL: kept by the driver */
	u64 token;
	u64 size;
	u64 map_key;			/* the mmap offset */
	u32 flags;			/* VIRTIO_ISM_REGION_F_*, not KEPT or MINE */
	int vector;			/* own MSI-X vector (OWN_VECTOR) */
	int irq;			/* its Linux irq */
	int pending_bit;		/* in ism_dev.pending, -1: none; under kick_lock */
	bool kernel;			/* a kernel region (ism_k_*): never a file's */
	virtio_ism_kick_fn kick_fn;	/* in-kernel handler, under kick_lock */
	void *kick_data;
	atomic64_t kicks;
	char irq_name[32];
	u32 nr_areas;
	struct virtio_ism_region_area areas[];
};

struct ism_file {
	struct ism_dev *ism;
	struct list_head node;		/* ism_dev.files */
	spinlock_t ev_lock;		/* the event ring below */
	unsigned int ev_head;
	unsigned int ev_count;
	bool ev_lost;
	struct virtio_ism_event_record ev[ISM_FILE_EVENTS];
};

/* One control command; the control queue's token. */
struct ism_cmd {
	u8 class;
	u8 cmd;
	u64 token;			/* ATTACH: the region asked for */
	size_t in_len;
	u8 *out;			/* header + payload */
	u8 in[];			/* status + reply */
};

struct ism_dev {
	struct virtio_device *vdev;
	struct kref ref;
	int instance;
	char name[16];
	struct miscdevice misc;

	u64 gid, devid, chunk_size, notify_size, features;
	struct virtio_shm_region shm, notify_shm;
	void *shm_base;
	void __iomem *notify_base;

	struct virtqueue *ctrl_vq;
	struct virtqueue *event_vq;
	struct mutex ctrl_lock;		/* one control command at a time; region add/remove */
	struct completion ctrl_done;
	bool gone;			/* removed: every operation fails with ENODEV */
	bool reaping;
	unsigned int nr_orphans;
	u64 orphans[ISM_MAX_ORPHANS];

	struct mutex regions_lock;	/* the regions list and region fields */
	struct list_head regions;
	u64 next_map_index;
	struct inode *mapping_inode;	/* anonymous, one per device */
	struct address_space *mapping;	/* its i_mapping, every file's f_mapping */

	spinlock_t kick_lock;		/* shared_kicks, kick_fn/kick_data; hard IRQ */
	struct list_head shared_kicks;	/* regions bound to the config vector */
	/*
	 * With VIRTIO_ISM_F_KICK_PENDING: ISM_PENDING_WORDS le64 words the device
	 * ORs kicked regions' bits into (it reaches them by physical address: the
	 * device does not use VIRTIO_F_ACCESS_PLATFORM). NULL without the feature.
	 */
	atomic64_t *pending;
	struct ida pending_ida;		/* bits given to regions */

	spinlock_t files_lock;		/* the files list; any context */
	struct list_head files;
	wait_queue_head_t wq;

	struct work_struct event_work;
	struct virtio_ism_event *event_bufs;

	atomic64_t ctrl_commands, ctrl_errors, ctrl_timeouts, late_replies, bad_replies;
	atomic64_t orphans_detached;
	atomic64_t kicks_sent, kick_irqs, config_irqs, events, events_lost;

	struct ism_smcd_counters smcd;
	void *smc_priv;			/* virtio_ism_smc.c's */
	spinlock_t smcd_state_lock;
	char smcd_state[128];		/* /sys/class/misc/ismN/smcd */
};

/* ---- the anonymous inode every file of a device maps through ---------------- */

static struct vfsmount *ism_mnt;
static int ism_mnt_count;

static int ism_fs_init_fs_context(struct fs_context *fc)
{
	return init_pseudo(fc, ISM_FS_MAGIC) ? 0 : -ENOMEM;
}

/* No .owner: a pinned mount must not hold the module (rmmod removes the devices). */
static struct file_system_type ism_fs_type = {
	.name = "virtio_ism",
	.init_fs_context = ism_fs_init_fs_context,
	.kill_sb = kill_anon_super,
};

static struct inode *ism_inode_new(void)
{
	struct inode *inode;
	int ret;

	ret = simple_pin_fs(&ism_fs_type, &ism_mnt, &ism_mnt_count);
	if (ret)
		return ERR_PTR(ret);
	inode = alloc_anon_inode(ism_mnt->mnt_sb);
	if (IS_ERR(inode))
		simple_release_fs(&ism_mnt, &ism_mnt_count);
	return inode;
}

static void ism_inode_put(struct inode *inode)
{
	iput(inode);
	simple_release_fs(&ism_mnt, &ism_mnt_count);
}

static void ism_free(struct kref *ref)
{
	struct ism_dev *ism = container_of(ref, struct ism_dev, ref);

	if (ism->mapping_inode)
		ism_inode_put(ism->mapping_inode);
	kfree(ism->event_bufs);
	/* Only after the device was reset: it may write the pending words until then. */
	kfree(ism->pending);
	ida_destroy(&ism->pending_ida);
	kfree(ism);
}

/* ---- events to user space ------------------------------------------------ */

static void ism_post_one(struct ism_dev *ism, struct ism_file *f,
			 const struct virtio_ism_event_record *rec)
{
	unsigned long flags;

	spin_lock_irqsave(&f->ev_lock, flags);
	if (f->ev_count == ISM_FILE_EVENTS) {
		f->ev_lost = true;
		atomic64_inc(&ism->events_lost);
	} else {
		f->ev[(f->ev_head + f->ev_count) % ISM_FILE_EVENTS] = *rec;
		f->ev_count++;
	}
	spin_unlock_irqrestore(&f->ev_lock, flags);
}

/*
 * Queue @rec for @only, or for every open file when @only is NULL. Any context.
 * @only is compared, never dereferenced, unless it is still on the files list.
 */
static void ism_post(struct ism_dev *ism, struct ism_file *only,
		     const struct virtio_ism_event_record *rec)
{
	struct ism_file *f;
	unsigned long flags;

	spin_lock_irqsave(&ism->files_lock, flags);
	list_for_each_entry(f, &ism->files, node)
		if (!only || f == only)
			ism_post_one(ism, f, rec);
	spin_unlock_irqrestore(&ism->files_lock, flags);
	wake_up_interruptible(&ism->wq);
}

/* ---- kicks ----------------------------------------------------------------- */

/* A peer kicked @r. Hard IRQ; caller holds kick_lock. */
static void ism_region_kicked(struct ism_dev *ism, struct ism_region *r)
{
	struct virtio_ism_event_record rec = {
		.type = VIRTIO_ISM_EV_KICK,
		.token = r->token,
	};

	atomic64_inc(&r->kicks);
	if (r->kick_fn)
		r->kick_fn(r->token, r->kick_data);
	else
		ism_post(ism, READ_ONCE(r->holder), &rec);
}

/*
 * The config vector: a config change, or a kick of a region bound to it (no
 * vector of its own). A region with a pending bit is reported if its bit was
 * set; one without (no VIRTIO_ISM_F_KICK_PENDING, or out of bits) on every
 * interrupt, since the device does not say which region it was. Hard IRQ.
 */
static void ism_config_changed(struct virtio_device *vdev)
{
	struct ism_dev *ism = vdev->priv;
	u64 seen[ISM_PENDING_WORDS] = {};
	struct ism_region *r;
	unsigned long flags;
	unsigned int i;
	int bit;

	atomic64_inc(&ism->config_irqs);
	if (ism->pending)
		for (i = 0; i < ISM_PENDING_WORDS; i++)
			seen[i] = le64_to_cpu((__force __le64)atomic64_xchg(&ism->pending[i], 0));
	spin_lock_irqsave(&ism->kick_lock, flags);
	list_for_each_entry(r, &ism->shared_kicks, kick_node) {
		bit = r->pending_bit;
		if (bit < 0 || (seen[bit / 64] & BIT_ULL(bit % 64)))
			ism_region_kicked(ism, r);
	}
	spin_unlock_irqrestore(&ism->kick_lock, flags);
}

/* The transport's PCI function, or NULL (virtio-mmio). */
static struct pci_dev *ism_pci_dev(struct ism_dev *ism)
{
	struct device *parent = ism->vdev->dev.parent;

	return parent && dev_is_pci(parent) ? to_pci_dev(parent) : NULL;
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0) && IS_ENABLED(CONFIG_PCI_MSI)
static irqreturn_t ism_region_irq(int irq, void *data)
{
	struct ism_region *r = data;
	struct ism_dev *ism = r->ism;
	unsigned long flags;

	atomic64_inc(&ism->kick_irqs);
	spin_lock_irqsave(&ism->kick_lock, flags);
	ism_region_kicked(ism, r);
	spin_unlock_irqrestore(&ism->kick_lock, flags);
	return IRQ_HANDLED;
}

static bool ism_can_own_vectors(struct ism_dev *ism)
{
	struct pci_dev *pdev = ism_pci_dev(ism);

	return kick_vectors && pdev && pdev->msix_enabled && pci_msix_can_alloc_dyn(pdev);
}

/* Allocate an MSI-X vector of the transport's PCI function for @r and request it. */
static int ism_vector_alloc(struct ism_dev *ism, struct ism_region *r)
{
	struct pci_dev *pdev = ism_pci_dev(ism);
	struct msi_map map;
	int ret;

	if (!ism_can_own_vectors(ism))
		return -EOPNOTSUPP;
	map = pci_msix_alloc_irq_at(pdev, MSI_ANY_INDEX, NULL);
	if (map.index < 0)
		return map.index;
	snprintf(r->irq_name, sizeof(r->irq_name), "%s-%llx", ism->name, r->token);
	ret = request_irq(map.virq, ism_region_irq, 0, r->irq_name, r);
	if (ret) {
		pci_msix_free_irq(pdev, map);
		return ret;
	}
	r->vector = map.index;
	r->irq = map.virq;
	return 0;
}

static void ism_vector_free(struct ism_dev *ism, struct ism_region *r)
{
	struct msi_map map = { .index = r->vector, .virq = r->irq };

	free_irq(r->irq, r);
	pci_msix_free_irq(ism_pci_dev(ism), map);
}
#else
static bool ism_can_own_vectors(struct ism_dev *ism)
{
	return false;
}

static int ism_vector_alloc(struct ism_dev *ism, struct ism_region *r)
{
	return -EOPNOTSUPP;
}

static void ism_vector_free(struct ism_dev *ism, struct ism_region *r)
{
}
#endif

/* Stop delivering kicks of @r (the device side is unbound, detached or reset). */
static void ism_region_unbind_local(struct ism_dev *ism, struct ism_region *r)
{
	unsigned long flags;
	int bit;

	if (r->flags & VIRTIO_ISM_REGION_F_OWN_VECTOR)
		ism_vector_free(ism, r);
	spin_lock_irqsave(&ism->kick_lock, flags);
	list_del_init(&r->kick_node);
	r->kick_fn = NULL;
	r->kick_data = NULL;
	bit = r->pending_bit;
	r->pending_bit = -1;
	spin_unlock_irqrestore(&ism->kick_lock, flags);
	if (bit >= 0) {
		/* A kick not yet handled must not be reported for the bit's next region. */
		atomic64_andnot((__force s64)cpu_to_le64(BIT_ULL(bit % 64)),
				&ism->pending[bit / 64]);
		ida_free(&ism->pending_ida, bit);
	}
	r->flags &= ~(VIRTIO_ISM_REGION_F_BOUND | VIRTIO_ISM_REGION_F_OWN_VECTOR);
}

/* Forget a region already off the regions list. Caller holds ctrl_lock. */
static void ism_region_free(struct ism_dev *ism, struct ism_region *r)
{
	ism_region_unbind_local(ism, r);
	kfree(r);
}

/* ---- control queue -------------------------------------------------------- */

static void ism_ctrl_vq_done(struct virtqueue *vq)
{
	struct ism_dev *ism = vq->vdev->priv;

	complete(&ism->ctrl_done);
}

static void ism_cmd_free(struct ism_cmd *c)
{
	kfree(c->out);
	kfree(c);
}

/*
 * The device answered a command after it timed out. A region it allocated or
 * attached then is unknown to the driver: note it so it is detached.
 */
static void ism_cmd_late(struct ism_dev *ism, struct ism_cmd *c, unsigned int used)
{
	u64 token = 0;

	atomic64_inc(&ism->late_replies);
	if (used >= 1 && c->in[0] == VIRTIO_ISM_OK) {
		if (c->class == VIRTIO_ISM_CTRL_ALLOC &&
		    used >= 1 + sizeof(struct virtio_ism_ctrl_alloc_reply))
			token = get_unaligned_le64(c->in + 1);
		else if (c->class == VIRTIO_ISM_CTRL_ATTACH)
			token = c->token;
	}
	if (token && ism->nr_orphans < ISM_MAX_ORPHANS)
		ism->orphans[ism->nr_orphans++] = token;
	else if (token)
		dev_warn(&ism->vdev->dev, "region %llx left attached by a late reply\n", token);
	ism_cmd_free(c);
}

/*
 * Run one control command; caller holds ctrl_lock. On success *status is the
 * device's status byte and @reply holds *reply_len (<= @reply_cap) reply bytes.
 * A command the device does not answer in time stays on the queue; its buffers
 * are freed when the answer comes (ism_cmd_late) or at remove.
 */
static int __ism_ctrl(struct ism_dev *ism, u8 class, u8 cmd, u64 token,
		      const void *payload, size_t payload_len,
		      void *reply, size_t reply_cap, size_t *reply_len, u8 *status)
{
	struct virtio_ism_ctrl_hdr *hdr;
	struct scatterlist out_sg, in_sg, *sgs[2];
	unsigned long left = msecs_to_jiffies(max(READ_ONCE(ctrl_timeout_ms), 100U));
	unsigned int used = 0;
	struct ism_cmd *c, *done;
	int ret;

	lockdep_assert_held(&ism->ctrl_lock);
	if (ism->gone)
		return -ENODEV;

	c = kzalloc(struct_size(c, in, 1 + reply_cap), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	c->out = kmalloc(sizeof(*hdr) + payload_len, GFP_KERNEL);
	if (!c->out) {
		kfree(c);
		return -ENOMEM;
	}
	c->class = class;
	c->cmd = cmd;
	c->token = token;
	c->in_len = 1 + reply_cap;
	hdr = (struct virtio_ism_ctrl_hdr *)c->out;
	hdr->class = class;
	hdr->cmd = cmd;
	if (payload_len)
		memcpy(c->out + sizeof(*hdr), payload, payload_len);
	sg_init_one(&out_sg, c->out, sizeof(*hdr) + payload_len);
	sg_init_one(&in_sg, c->in, c->in_len);
	sgs[0] = &out_sg;
	sgs[1] = &in_sg;

	reinit_completion(&ism->ctrl_done);
	ret = virtqueue_add_sgs(ism->ctrl_vq, sgs, 1, 1, c, GFP_KERNEL);
	if (ret) {
		/* ENOSPC: the queue is full of commands the device never answered. */
		ism_cmd_free(c);
		return ret == -ENOSPC ? -EBUSY : ret;
	}
	virtqueue_kick(ism->ctrl_vq);

	for (;;) {
		while ((done = virtqueue_get_buf(ism->ctrl_vq, &used))) {
			if (done == c)
				goto answered;
			ism_cmd_late(ism, done, used);
		}
		if (!left) {
			atomic64_inc(&ism->ctrl_timeouts);
			dev_err(&ism->vdev->dev, "control command %u/%u timed out\n", class, cmd);
			return -ETIMEDOUT;
		}
		left = wait_for_completion_timeout(&ism->ctrl_done, left);
	}
answered:
	if (used < 1 || used > c->in_len) {
		atomic64_inc(&ism->bad_replies);
		ism_cmd_free(c);
		return -EIO;
	}
	*status = c->in[0];
	*reply_len = used - 1;
	memcpy(reply, c->in + 1, *reply_len);
	ism_cmd_free(c);
	atomic64_inc(&ism->ctrl_commands);
	if (*status != VIRTIO_ISM_OK)
		atomic64_inc(&ism->ctrl_errors);
	return 0;
}

/* Detach what late replies left attached. Caller holds ctrl_lock. */
static void ism_reap_orphans(struct ism_dev *ism)
{
	struct virtio_ism_ctrl_detach req;
	size_t got;
	u8 status, dummy;

	if (ism->reaping)
		return;
	ism->reaping = true;
	while (ism->nr_orphans && !ism->gone) {
		req.token = cpu_to_le64(ism->orphans[--ism->nr_orphans]);
		if (!__ism_ctrl(ism, VIRTIO_ISM_CTRL_DETACH, VIRTIO_ISM_CTRL_DETACH_REGION, 0,
				&req, sizeof(req), &dummy, 0, &got, &status) &&
		    status == VIRTIO_ISM_OK)
			atomic64_inc(&ism->orphans_detached);
	}
	ism->reaping = false;
}

static int ism_ctrl(struct ism_dev *ism, u8 class, u8 cmd, u64 token,
		    const void *payload, size_t payload_len,
		    void *reply, size_t reply_cap, size_t *reply_len, u8 *status)
{
	int ret;

	ret = __ism_ctrl(ism, class, cmd, token, payload, payload_len, reply, reply_cap,
			 reply_len, status);
	if (ism->nr_orphans)
		ism_reap_orphans(ism);
	return ret;
}

/* A command without a reply; returns 0 or a negative errno (device status mapped). */
static int ism_ctrl_simple(struct ism_dev *ism, u8 class, u8 cmd,
			   const void *payload, size_t payload_len)
{
	size_t got;
	u8 status;
	u8 dummy;
	int ret;

	ret = ism_ctrl(ism, class, cmd, 0, payload, payload_len, &dummy, 0, &got, &status);
	return ret ? ret : virtio_ism_status_errno(status);
}

/* ---- regions ------------------------------------------------------------- */

static u64 ism_max_areas(struct ism_dev *ism)
{
	return min_t(u64, div64_u64(ism->shm.len, ism->chunk_size), ISM_MAX_ENTRIES);
}

/*
 * Check @num areas the device returned at @area and build a region of them. Every
 * area must lie inside shmid 1, start on a chunk, cover whole pages, and the sizes
 * must add up to @want (0: any).
 */
static struct ism_region *ism_region_from_areas(struct ism_dev *ism,
						const struct virtio_ism_area *area,
						u64 num, u64 want)
{
	struct ism_region *r;
	u64 total = 0, i;

	if (num == 0 || num > ism_max_areas(ism))
		goto bad;
	r = kzalloc(struct_size(r, areas, num), GFP_KERNEL);
	if (!r)
		return ERR_PTR(-ENOMEM);
	for (i = 0; i < num; i++) {
		u64 off = le64_to_cpu(area[i].offset);
		u64 size = le64_to_cpu(area[i].size);

		if (!size || !IS_ALIGNED(off, ism->chunk_size) || !PAGE_ALIGNED(size) ||
		    off >= ism->shm.len || size > ism->shm.len - off ||
		    size > ism->shm.len - total) {
			kfree(r);
			goto bad;
		}
		total += size;
		r->areas[i].offset = off;
		r->areas[i].size = size;
	}
	if (want && total != want) {
		kfree(r);
		goto bad;
	}
	r->ism = ism;
	r->pending_bit = -1;
	INIT_LIST_HEAD(&r->kick_node);
	atomic64_set(&r->kicks, 0);
	r->nr_areas = num;
	r->size = total;
	return r;
bad:
	atomic64_inc(&ism->bad_replies);
	dev_warn(&ism->vdev->dev, "device returned invalid areas\n");
	return ERR_PTR(-EIO);
}

/* Caller holds regions_lock. */
static struct ism_region *ism_find(struct ism_dev *ism, u64 token)
{
	struct ism_region *r;

	list_for_each_entry(r, &ism->regions, node)
		if (r->token == token)
			return r;
	return NULL;
}

/* Caller holds ctrl_lock and regions_lock. */
static void ism_track(struct ism_dev *ism, struct ism_region *r, struct ism_file *holder)
{
	r->holder = holder;
	r->map_key = ++ism->next_map_index << ISM_MAP_SHIFT;
	list_add_tail(&r->node, &ism->regions);
}

/* Remove every user mapping of @r; the pages become SIGBUS. No regions_lock needed. */
static void ism_zap(struct ism_dev *ism, struct ism_region *r)
{
	unmap_mapping_range(ism->mapping, r->map_key, PAGE_ALIGN(r->size), 1);
}

static void ism_detach_on_device(struct ism_dev *ism, u64 token)
{
	struct virtio_ism_ctrl_detach req = { .token = cpu_to_le64(token) };
	int ret;

	ret = ism_ctrl_simple(ism, VIRTIO_ISM_CTRL_DETACH, VIRTIO_ISM_CTRL_DETACH_REGION,
			      &req, sizeof(req));
	if (ret)
		dev_warn(&ism->vdev->dev, "detach of %llx failed: %d\n", token, ret);
}

/*
 * ALLOC or ATTACH with E2BIG retries. @hdr_size is the reply header before the
 * areas; the area count is the header's last le64. Caller holds ctrl_lock.
 */
static struct ism_region *ism_map_cmd(struct ism_dev *ism, u8 class, const void *req,
				      size_t req_len, size_t hdr_size, u64 want, u64 *token)
{
	u64 cap = ISM_FIRST_AREAS, num;
	struct ism_region *r;
	int tries, ret;

	for (tries = 0; tries < 3; tries++) {
		size_t cap_bytes = hdr_size + cap * sizeof(struct virtio_ism_area), got;
		u8 *reply = kzalloc(cap_bytes, GFP_KERNEL);
		u8 status;

		if (!reply)
			return ERR_PTR(-ENOMEM);
		ret = ism_ctrl(ism, class, 0, *token, req, req_len, reply, cap_bytes, &got,
			       &status);
		if (ret) {
			kfree(reply);
			return ERR_PTR(ret);
		}
		/* A refusal may be the status byte alone: only OK and E2BIG carry a header. */
		if (status != VIRTIO_ISM_OK && status != VIRTIO_ISM_E2BIG) {
			kfree(reply);
			return ERR_PTR(virtio_ism_status_errno(status));
		}
		if (got < hdr_size) {
			kfree(reply);
			atomic64_inc(&ism->bad_replies);
			return ERR_PTR(-EIO);
		}
		num = le64_to_cpup((__le64 *)(reply + hdr_size - sizeof(__le64)));
		if (status == VIRTIO_ISM_E2BIG) {
			kfree(reply);
			if (num <= cap || num > ism_max_areas(ism)) {
				atomic64_inc(&ism->bad_replies);
				return ERR_PTR(-EIO);
			}
			cap = num;
			continue;
		}
		if (class == VIRTIO_ISM_CTRL_ALLOC)
			*token = le64_to_cpu(((struct virtio_ism_ctrl_alloc_reply *)reply)->token);
		if (num > cap || got < hdr_size + num * sizeof(struct virtio_ism_area))
			r = ERR_PTR(-EIO);
		else
			r = ism_region_from_areas(ism, (struct virtio_ism_area *)(reply + hdr_size),
						  num, want);
		kfree(reply);
		if (IS_ERR(r))
			/* The device holds something we refuse to use: give it back. */
			ism_detach_on_device(ism, *token);
		return r;
	}
	return ERR_PTR(-EAGAIN);
}

/* QUERY_REGION (needs VIRTIO_ISM_F_QUERY): describe a region the device holds. */
static struct ism_region *ism_query_region(struct ism_dev *ism, u64 token)
{
	struct virtio_ism_ctrl_query_region req = { .token = cpu_to_le64(token) };
	struct virtio_ism_ctrl_query_region_reply *rep;
	const size_t hdr = sizeof(*rep);
	struct ism_region *r;
	u64 cap = ISM_FIRST_AREAS, num, size, flags;
	int tries, ret;

	for (tries = 0; tries < 3; tries++) {
		size_t cap_bytes = hdr + cap * sizeof(struct virtio_ism_area);
		size_t got;
		u8 status;

		rep = kzalloc(cap_bytes, GFP_KERNEL);
		if (!rep)
			return ERR_PTR(-ENOMEM);
		ret = ism_ctrl(ism, VIRTIO_ISM_CTRL_QUERY, VIRTIO_ISM_CTRL_QUERY_REGION, 0,
			       &req, sizeof(req), rep, cap_bytes, &got, &status);
		/* A refusal may be the status byte alone: only OK and E2BIG carry a header. */
		if (!ret && status != VIRTIO_ISM_OK && status != VIRTIO_ISM_E2BIG) {
			ret = virtio_ism_status_errno(status);
		} else if (!ret && got < hdr) {
			atomic64_inc(&ism->bad_replies);
			ret = -EIO;
		}
		if (ret) {
			kfree(rep);
			return ERR_PTR(ret);
		}
		size = le64_to_cpu(rep->size);
		flags = le64_to_cpu(rep->flags);
		num = le64_to_cpu(rep->num);
		if (status == VIRTIO_ISM_E2BIG && num > cap && num <= ism_max_areas(ism)) {
			kfree(rep);
			cap = num;
			continue;
		}
		if (status != VIRTIO_ISM_OK) {
			kfree(rep);
			atomic64_inc(&ism->bad_replies);
			return ERR_PTR(-EIO);
		}
		if (num > cap || got < hdr + num * sizeof(struct virtio_ism_area))
			r = ERR_PTR(-EIO);
		else
			r = ism_region_from_areas(ism, rep->area, num, size);
		kfree(rep);
		if (!IS_ERR(r)) {
			r->token = token;
			if (flags & VIRTIO_ISM_QREGION_WRITE)
				r->flags |= VIRTIO_ISM_REGION_F_WRITE;
			if (flags & VIRTIO_ISM_QREGION_OWNER)
				r->flags |= VIRTIO_ISM_REGION_F_OWNER;
			if (flags & VIRTIO_ISM_QREGION_HOTPLUGGED)
				r->flags |= VIRTIO_ISM_REGION_F_HOTPLUGGED;
		}
		return r;
	}
	return ERR_PTR(-EAGAIN);
}

/*
 * EVENT_VECTOR_SET, or EVENT_VECTOR_PENDING_SET when @bit (in ism->pending) is
 * given. Caller holds ctrl_lock.
 */
static int ism_send_vector(struct ism_dev *ism, struct ism_region *r, u64 vector, int bit)
{
	struct virtio_ism_ctrl_event_vector_pending pending = {
		.token = cpu_to_le64(r->token),
		.vector = cpu_to_le64(vector),
	};
	struct virtio_ism_ctrl_event_vector req = {
		.token = cpu_to_le64(r->token),
		.vector = cpu_to_le64(vector),
	};

	if (bit < 0)
		return ism_ctrl_simple(ism, VIRTIO_ISM_CTRL_EVENT_VECTOR,
				       VIRTIO_ISM_CTRL_EVENT_VECTOR_SET, &req, sizeof(req));
	pending.pending_addr = cpu_to_le64(virt_to_phys(&ism->pending[bit / 64]));
	pending.pending_bit = cpu_to_le64(bit % 64);
	return ism_ctrl_simple(ism, VIRTIO_ISM_CTRL_EVENT_VECTOR,
			       VIRTIO_ISM_CTRL_EVENT_VECTOR_PENDING_SET, &pending, sizeof(pending));
}

/*
 * Bind @r's kicks to a vector of its own, else to the config vector (with a
 * pending bit when the device offers them), or unbind.
 * Caller holds ctrl_lock; @r is on the regions list.
 */
static int ism_region_bind(struct ism_dev *ism, struct ism_region *r, bool bind)
{
	unsigned long flags;
	int bit = -1;
	bool own;
	int ret;

	if (bind == !!(r->flags & VIRTIO_ISM_REGION_F_BOUND))
		return 0;
	if (!bind) {
		ret = ism_send_vector(ism, r, VIRTIO_ISM_MSI_NO_VECTOR, -1);
		/* Even if the device refused: stop listening. */
		mutex_lock(&ism->regions_lock);
		ism_region_unbind_local(ism, r);
		mutex_unlock(&ism->regions_lock);
		return ret;
	}
	own = !ism_vector_alloc(ism, r);
	if (!own) {
		/* Out of bits (or none offered): the region hears every config interrupt. */
		if (ism->pending)
			bit = ida_alloc_max(&ism->pending_ida, ISM_PENDING_BITS - 1, GFP_KERNEL);
		if (bit < 0)
			bit = -1;
		/* Listening before the device records kicks for the region: none is missed. */
		mutex_lock(&ism->regions_lock);
		spin_lock_irqsave(&ism->kick_lock, flags);
		r->pending_bit = bit;
		list_add_tail(&r->kick_node, &ism->shared_kicks);
		spin_unlock_irqrestore(&ism->kick_lock, flags);
		mutex_unlock(&ism->regions_lock);
	}
	ret = ism_send_vector(ism, r, own ? r->vector : ISM_CONFIG_VECTOR, bit);
	mutex_lock(&ism->regions_lock);
	if (ret) {
		if (own)
			ism_vector_free(ism, r);
		ism_region_unbind_local(ism, r);
	} else {
		r->flags |= VIRTIO_ISM_REGION_F_BOUND;
		if (own)
			r->flags |= VIRTIO_ISM_REGION_F_OWN_VECTOR;
	}
	mutex_unlock(&ism->regions_lock);
	return ret;
}

/*
 * Set @token's kick handler (binding it when @fn is set). @kernel: only a kernel
 * region (ism_k_set_kick); else any region the driver holds (the exported API).
 */
static int ism_set_kick(struct ism_dev *ism, u64 token, virtio_ism_kick_fn fn, void *data,
			bool kernel)
{
	struct ism_region *r;
	unsigned long flags;
	int ret = 0;

	mutex_lock(&ism->ctrl_lock);
	mutex_lock(&ism->regions_lock);
	r = ism->gone ? NULL : ism_find(ism, token);
	if (r && kernel && !r->kernel)
		r = NULL;
	mutex_unlock(&ism->regions_lock);
	if (!r)
		ret = ism->gone ? -ENODEV : -ENOENT;
	else if (r->kernel && !kernel)
		ret = -EBUSY;	/* the SMC-D glue's: not another module's */
	else if (fn)
		ret = ism_region_bind(ism, r, true);
	if (!ret) {
		spin_lock_irqsave(&ism->kick_lock, flags);
		r->kick_fn = fn;
		r->kick_data = data;
		spin_unlock_irqrestore(&ism->kick_lock, flags);
	}
	mutex_unlock(&ism->ctrl_lock);
	return ret;
}

/**
 * virtio_ism_set_kick_handler - route kicks of a region to a kernel function
 * @instance: N of /dev/ismN
 * @token: a region the driver holds on that device (e.g. one user space ATTACHed
 *	   and KEEPs, or one the host hot-added)
 * @fn: called in hard-IRQ context for each kick (kicks may merge); NULL stops it
 * @data: passed to @fn
 *
 * Binds the region for kicks if it is not bound yet. While @fn is set, kicks of the
 * region are not reported to user space. When the region goes away (detach,
 * revoke, remove) the handler is dropped; it is never called after that.
 *
 * Return: 0, -ENODEV (no such device), -ENOENT (region not held), -EBUSY (a region
 * the module holds for SMC-D) or a bind error.
 */
int virtio_ism_set_kick_handler(unsigned int instance, u64 token,
				virtio_ism_kick_fn fn, void *data)
{
	struct ism_dev *ism;
	int ret;

	mutex_lock(&ism_devs_lock);
	ism = idr_find(&ism_devs, instance);
	ret = ism ? ism_set_kick(ism, token, fn, data, false) : -ENODEV;
	mutex_unlock(&ism_devs_lock);
	return ret;
}
EXPORT_SYMBOL_GPL(virtio_ism_set_kick_handler);

/* ---- kernel regions (virtio_ism_internal.h) -------------------------------- */

static u32 ism_attached_flags(struct ism_dev *ism, u64 token, u32 perm);

void ism_k_info(struct ism_dev *ism, struct ism_k_info *info)
{
	struct pci_dev *pdev = ism_pci_dev(ism);

	info->gid = ism->gid;
	info->devid = ism->devid;
	info->chunk_size = ism->chunk_size;
	info->features = ism->features;
	info->name = ism->name;
	info->pci = pdev ? &pdev->dev : NULL;
}

struct ism_smcd_counters *ism_k_counters(struct ism_dev *ism)
{
	return &ism->smcd;
}

void ism_k_set_smcd_state(struct ism_dev *ism, const char *fmt, ...)
{
	unsigned long flags;
	va_list args;

	spin_lock_irqsave(&ism->smcd_state_lock, flags);
	va_start(args, fmt);
	vsnprintf(ism->smcd_state, sizeof(ism->smcd_state), fmt, args);
	va_end(args);
	spin_unlock_irqrestore(&ism->smcd_state_lock, flags);
}

void ism_k_set_smc_priv(struct ism_dev *ism, void *priv)
{
	WRITE_ONCE(ism->smc_priv, priv);
}

void *ism_k_smc_priv(struct ism_dev *ism)
{
	return READ_ONCE(ism->smc_priv);
}

/*
 * Fill @map for kernel region @r: its areas must be back to back in the window (one
 * kernel range); else -ENOMEM, which SMC takes as "try a smaller buffer".
 * Caller holds ctrl_lock.
 */
static int ism_k_map(struct ism_dev *ism, struct ism_region *r, struct ism_kmap *map)
{
	u64 slot, off;
	u32 i;

	for (i = 1; i < r->nr_areas; i++)
		if (r->areas[i].offset != r->areas[i - 1].offset + r->areas[i - 1].size)
			return -ENOMEM;
	slot = div64_u64(r->areas[0].offset, ism->chunk_size);
	off = slot * ism->notify_size;
	if (off >= ism->notify_shm.len || ism->notify_size > ism->notify_shm.len - off)
		return -EIO;
	map->token = r->token;
	map->size = r->size;
	map->addr = ism->shm_base + r->areas[0].offset;
	map->phys = ism->shm.addr + r->areas[0].offset;
	map->doorbell = ism->notify_base + off;
	map->owner = !!(r->flags & VIRTIO_ISM_REGION_F_OWNER);
	return 0;
}

/* Track @r (just ALLOCed or ATTACHed) as a kernel region, or give it back. */
static int ism_k_track(struct ism_dev *ism, struct ism_region *r, struct ism_kmap *map)
{
	int ret = ism_k_map(ism, r, map);

	if (ret) {
		ism_detach_on_device(ism, r->token);
		kfree(r);
		return ret;
	}
	r->kernel = true;
	mutex_lock(&ism->regions_lock);
	ism_track(ism, r, NULL);
	mutex_unlock(&ism->regions_lock);
	return 0;
}

int ism_k_alloc(struct ism_dev *ism, u64 size, struct ism_kmap *map)
{
	struct virtio_ism_ctrl_alloc req = { .size = cpu_to_le64(size) };
	struct ism_region *r;
	u64 token = 0;
	int ret;

	if (!size || size > ism->shm.len)
		return -EINVAL;
	mutex_lock(&ism->ctrl_lock);
	if (ism->gone) {
		ret = -ENODEV;
		goto out;
	}
	r = ism_map_cmd(ism, VIRTIO_ISM_CTRL_ALLOC, &req, sizeof(req),
			sizeof(struct virtio_ism_ctrl_alloc_reply), round_up(size, PAGE_SIZE),
			&token);
	if (IS_ERR(r)) {
		ret = PTR_ERR(r);
		goto out;
	}
	r->token = token;
	r->flags = VIRTIO_ISM_REGION_F_WRITE | VIRTIO_ISM_REGION_F_OWNER;
	ret = ism_k_track(ism, r, map);
out:
	mutex_unlock(&ism->ctrl_lock);
	return ret;
}

int ism_k_attach(struct ism_dev *ism, u64 token, struct ism_kmap *map)
{
	struct virtio_ism_ctrl_attach req = {
		.token = cpu_to_le64(token),
		.rw_perm = cpu_to_le32(VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE),
	};
	struct ism_region *r;
	bool held;
	int ret;

	mutex_lock(&ism->ctrl_lock);
	if (ism->gone) {
		ret = -ENODEV;
		goto out;
	}
	/* Held already (ours, or a file's): not shared with a kernel user. */
	mutex_lock(&ism->regions_lock);
	held = ism_find(ism, token);
	mutex_unlock(&ism->regions_lock);
	if (held) {
		ret = -EBUSY;
		goto out;
	}
	r = ism_map_cmd(ism, VIRTIO_ISM_CTRL_ATTACH, &req, sizeof(req),
			sizeof(struct virtio_ism_ctrl_attach_reply), 0, &token);
	if (IS_ERR(r)) {
		ret = PTR_ERR(r);
		goto out;
	}
	r->token = token;
	/* Asked for WRITE: the device refused the ATTACH (PERM_EWRITE) or maps it writable. */
	r->flags = ism_attached_flags(ism, token, VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE);
	if (!(r->flags & VIRTIO_ISM_REGION_F_WRITE)) {
		ism_detach_on_device(ism, token);
		kfree(r);
		ret = -EACCES;
		goto out;
	}
	ret = ism_k_track(ism, r, map);
out:
	mutex_unlock(&ism->ctrl_lock);
	return ret;
}

int ism_k_detach(struct ism_dev *ism, u64 token)
{
	struct ism_region *r;
	int ret = 0;

	mutex_lock(&ism->ctrl_lock);
	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, token);
	if (r && r->kernel)
		list_del(&r->node);
	else
		r = NULL;
	mutex_unlock(&ism->regions_lock);
	if (!r) {
		ret = ism->gone ? -ENODEV : -ENOENT;
	} else {
		if (!ism->gone)
			ism_detach_on_device(ism, token);
		/* Unbinds too: the kick handler is never called after this. */
		ism_region_free(ism, r);
	}
	mutex_unlock(&ism->ctrl_lock);
	return ret;
}

int ism_k_grant(struct ism_dev *ism, u64 token, u64 devid, u64 perms)
{
	struct virtio_ism_ctrl_grant req = {
		.token = cpu_to_le64(token),
		.permissions = cpu_to_le64(perms),
		.peer_devid = cpu_to_le64(devid),
	};
	int ret;

	if (!devid || (perms & ~ISM_PERM_ALL))
		return -EINVAL;
	mutex_lock(&ism->ctrl_lock);
	ret = ism->gone ? -ENODEV :
	      ism_ctrl_simple(ism, VIRTIO_ISM_CTRL_GRANT, VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE,
			      &req, sizeof(req));
	mutex_unlock(&ism->ctrl_lock);
	return ret;
}

int ism_k_set_kick(struct ism_dev *ism, u64 token, virtio_ism_kick_fn fn, void *data)
{
	return ism_set_kick(ism, token, fn, data, true);
}

void ism_k_kick(struct ism_dev *ism, const struct ism_kmap *map)
{
	/* The peer reads what was written before it sees the kick. */
	wmb();
	iowrite8(1, map->doorbell);
	atomic64_inc(&ism->kicks_sent);
}

/* ---- event queue ---------------------------------------------------------- */

static int ism_post_event_buf(struct ism_dev *ism, struct virtio_ism_event *buf)
{
	struct scatterlist sg;

	sg_init_one(&sg, buf, sizeof(*buf));
	return virtqueue_add_inbuf(ism->event_vq, &sg, 1, buf, GFP_KERNEL);
}

static void ism_event_vq_done(struct virtqueue *vq)
{
	struct ism_dev *ism = vq->vdev->priv;

	schedule_work(&ism->event_work);
}

static void ism_handle_event(struct ism_dev *ism, const struct virtio_ism_event *ev)
{
	struct virtio_ism_event_record rec = {
		.type = le64_to_cpu(ev->ev_type),
		.devid = le64_to_cpu(ev->devid),
		.peers = le64_to_cpu(ev->peers),
		.token = le64_to_cpu(ev->token),
	};
	struct ism_region *r, *added;
	struct ism_file *to = NULL;
	bool kernel = false;

	atomic64_inc(&ism->events);
	switch (rec.type) {
	case VIRTIO_ISM_EVENT_REVOKE:
		/* The device has already unmapped it: drop user mappings, forget it. */
		mutex_lock(&ism->ctrl_lock);
		mutex_lock(&ism->regions_lock);
		r = ism_find(ism, rec.token);
		if (r) {
			list_del(&r->node);
			to = r->holder;
			kernel = r->kernel;
		}
		mutex_unlock(&ism->regions_lock);
		if (r) {
			ism_zap(ism, r);
			ism_region_free(ism, r);
		}
		mutex_unlock(&ism->ctrl_lock);
		if (kernel)
			virtio_ism_smc_region_event(ism, rec.type, rec.token, rec.devid);
		break;
	case VIRTIO_ISM_EVENT_REGION_ADDED:
		if (!(ism->features & VIRTIO_ISM_INFO_F_QUERY))
			break;
		mutex_lock(&ism->ctrl_lock);
		added = ism->gone ? ERR_PTR(-ENODEV) : ism_query_region(ism, rec.token);
		if (IS_ERR(added)) {
			mutex_unlock(&ism->ctrl_lock);
			dev_warn(&ism->vdev->dev, "hot-added region %llx: query failed\n",
				 rec.token);
			break;
		}
		mutex_lock(&ism->regions_lock);
		if (ism_find(ism, rec.token))
			kfree(added);
		else
			ism_track(ism, added, NULL);
		mutex_unlock(&ism->regions_lock);
		mutex_unlock(&ism->ctrl_lock);
		break;
	case VIRTIO_ISM_EVENT_UPDATE:
	case VIRTIO_ISM_EVENT_ATTACH:
	case VIRTIO_ISM_EVENT_DETACH:
		mutex_lock(&ism->regions_lock);
		r = ism_find(ism, rec.token);
		to = r ? r->holder : NULL;
		kernel = r && r->kernel;
		mutex_unlock(&ism->regions_lock);
		if (kernel && rec.type == VIRTIO_ISM_EVENT_DETACH)
			virtio_ism_smc_region_event(ism, rec.type, rec.token, rec.devid);
		break;
	case VIRTIO_ISM_EVENT_OVERFLOW:
		break;
	default:
		atomic64_inc(&ism->bad_replies);
		return;
	}
	/* ism_post compares @to with the files still open; it may have closed since. */
	ism_post(ism, to, &rec);
}

static void ism_event_work(struct work_struct *work)
{
	struct ism_dev *ism = container_of(work, struct ism_dev, event_work);
	struct virtio_ism_event *buf;
	unsigned int len;

	for (;;) {
		virtqueue_disable_cb(ism->event_vq);
		while (!READ_ONCE(ism->gone) && (buf = virtqueue_get_buf(ism->event_vq, &len))) {
			if (len >= sizeof(*buf))
				ism_handle_event(ism, buf);
			else
				atomic64_inc(&ism->bad_replies);
			if (ism_post_event_buf(ism, buf))
				dev_warn(&ism->vdev->dev, "cannot repost an event buffer\n");
		}
		if (READ_ONCE(ism->gone))
			return;
		virtqueue_kick(ism->event_vq);
		if (virtqueue_enable_cb(ism->event_vq))
			return;
	}
}

/* ---- file operations ------------------------------------------------------ */

static int ism_open(struct inode *inode, struct file *file)
{
	struct ism_dev *ism = container_of(file->private_data, struct ism_dev, misc);
	struct ism_file *f;

	f = kzalloc(sizeof(*f), GFP_KERNEL);
	if (!f)
		return -ENOMEM;
	f->ism = ism;
	spin_lock_init(&f->ev_lock);

	mutex_lock(&ism->regions_lock);
	if (ism->gone) {
		mutex_unlock(&ism->regions_lock);
		kfree(f);
		return -ENODEV;
	}
	/* Every file maps through the device's own inode, so revocation reaches all. */
	file->f_mapping = ism->mapping;
	mutex_unlock(&ism->regions_lock);

	kref_get(&ism->ref);
	spin_lock_irq(&ism->files_lock);
	list_add_tail(&f->node, &ism->files);
	spin_unlock_irq(&ism->files_lock);
	file->private_data = f;
	return 0;
}

static int ism_release(struct inode *inode, struct file *file)
{
	struct ism_file *f = file->private_data;
	struct ism_dev *ism = f->ism;
	struct ism_region *r, *tmp;
	LIST_HEAD(mine);

	mutex_lock(&ism->ctrl_lock);
	mutex_lock(&ism->regions_lock);
	list_for_each_entry_safe(r, tmp, &ism->regions, node)
		if (r->holder == f)
			list_move_tail(&r->node, &mine);
	mutex_unlock(&ism->regions_lock);
	list_for_each_entry_safe(r, tmp, &mine, node) {
		/* No VMA can map it any more (a VMA holds the file), but be thorough. */
		ism_zap(ism, r);
		if (!ism->gone)
			ism_detach_on_device(ism, r->token);
		list_del(&r->node);
		ism_region_free(ism, r);
	}
	mutex_unlock(&ism->ctrl_lock);

	spin_lock_irq(&ism->files_lock);
	list_del(&f->node);
	spin_unlock_irq(&ism->files_lock);
	kfree(f);
	kref_put(&ism->ref, ism_free);
	return 0;
}

static u32 ism_user_flags(const struct ism_region *r, const struct ism_file *f)
{
	u32 flags = r->flags;

	if (!r->holder)
		flags |= VIRTIO_ISM_REGION_F_KEPT;
	if (r->holder == f)
		flags |= VIRTIO_ISM_REGION_F_MINE;
	return flags;
}

static long ism_ioc_alloc(struct ism_file *f, struct virtio_ism_region __user *arg)
{
	struct ism_dev *ism = f->ism;
	struct virtio_ism_region ureg;
	struct virtio_ism_ctrl_alloc req;
	struct ism_region *r;
	u64 token = 0, want;

	if (copy_from_user(&ureg, arg, sizeof(ureg)))
		return -EFAULT;
	if (ureg.perm || ureg.flags || ureg.reserved0 || ureg.reserved[0] || ureg.reserved[1])
		return -EINVAL;
	if (!ureg.size || ureg.size > ism->shm.len)
		return -EINVAL;
	want = round_up(ureg.size, PAGE_SIZE);
	req.size = cpu_to_le64(ureg.size);
	r = ism_map_cmd(ism, VIRTIO_ISM_CTRL_ALLOC, &req, sizeof(req),
			sizeof(struct virtio_ism_ctrl_alloc_reply), want, &token);
	if (IS_ERR(r))
		return PTR_ERR(r);
	r->token = token;
	r->flags = VIRTIO_ISM_REGION_F_WRITE | VIRTIO_ISM_REGION_F_OWNER;
	mutex_lock(&ism->regions_lock);
	ism_track(ism, r, f);
	ureg.token = token;
	ureg.size = r->size;
	ureg.map_offset = r->map_key;
	ureg.region_flags = ism_user_flags(r, f);
	mutex_unlock(&ism->regions_lock);
	return copy_to_user(arg, &ureg, sizeof(ureg)) ? -EFAULT : 0;
}

/*
 * Is the device's mapping of a region just attached writable? QUERY says; without
 * it the device maps writable iff WRITE was granted and asked for (or perm 0),
 * which a READ-only request rules out and anything else leaves to the grant: the
 * driver then trusts the request (a wrong guess makes writes fault, never more).
 */
static u32 ism_attached_flags(struct ism_dev *ism, u64 token, u32 perm)
{
	struct ism_region *q;
	u32 flags;

	if (!(ism->features & VIRTIO_ISM_INFO_F_QUERY))
		return perm == VIRTIO_ISM_PERM_READ ? 0 : VIRTIO_ISM_REGION_F_WRITE;
	q = ism_query_region(ism, token);
	if (IS_ERR(q))
		return 0;
	flags = q->flags & (VIRTIO_ISM_REGION_F_WRITE | VIRTIO_ISM_REGION_F_OWNER);
	kfree(q);
	return flags;
}

static long ism_ioc_attach(struct ism_file *f, struct virtio_ism_region __user *arg)
{
	struct ism_dev *ism = f->ism;
	struct virtio_ism_region ureg;
	struct virtio_ism_ctrl_attach req = {};
	struct ism_region *r;
	u64 token;
	long ret = 0;

	if (copy_from_user(&ureg, arg, sizeof(ureg)))
		return -EFAULT;
	if (ureg.perm & ~(u32)(VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE))
		return -EINVAL;
	if (ureg.flags || ureg.reserved0 || ureg.reserved[0] || ureg.reserved[1])
		return -EINVAL;
	token = ureg.token;

	/* A region the driver already holds: take a kept one, refuse a busy one. */
	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, token);
	if (r) {
		if (r->kernel || (r->holder && r->holder != f))
			ret = -EBUSY;
		else if ((ureg.perm & VIRTIO_ISM_PERM_WRITE) &&
			 !(r->flags & VIRTIO_ISM_REGION_F_WRITE))
			ret = -EROFS;
		else
			WRITE_ONCE(r->holder, f);
	}
	mutex_unlock(&ism->regions_lock);
	if (ret)
		return ret;

	if (!r) {
		req.token = cpu_to_le64(token);
		req.rw_perm = cpu_to_le32(ureg.perm);
		r = ism_map_cmd(ism, VIRTIO_ISM_CTRL_ATTACH, &req, sizeof(req),
				sizeof(struct virtio_ism_ctrl_attach_reply), 0, &token);
		if (IS_ERR(r))
			return PTR_ERR(r);
		r->token = token;
		r->flags = ism_attached_flags(ism, token, ureg.perm);
		mutex_lock(&ism->regions_lock);
		ism_track(ism, r, f);
	} else {
		mutex_lock(&ism->regions_lock);
	}
	ureg.size = r->size;
	ureg.map_offset = r->map_key;
	ureg.region_flags = ism_user_flags(r, f);
	mutex_unlock(&ism->regions_lock);
	return copy_to_user(arg, &ureg, sizeof(ureg)) ? -EFAULT : 0;
}

/* The region @token this file holds, or NULL. Caller holds ctrl_lock. */
static struct ism_region *ism_find_mine(struct ism_file *f, u64 token)
{
	struct ism_dev *ism = f->ism;
	struct ism_region *r;

	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, token);
	if (r && r->holder != f)
		r = NULL;
	mutex_unlock(&ism->regions_lock);
	return r;
}

static long ism_ioc_detach(struct ism_file *f, u64 token)
{
	struct ism_dev *ism = f->ism;
	struct ism_region *r = ism_find_mine(f, token);

	if (!r)
		return -ENOENT;
	mutex_lock(&ism->regions_lock);
	list_del(&r->node);
	mutex_unlock(&ism->regions_lock);
	/* Unmap from every process before the device may reuse the chunks. */
	ism_zap(ism, r);
	ism_detach_on_device(ism, token);
	ism_region_free(ism, r);
	return 0;
}

static long ism_ioc_grant(struct ism_file *f, struct virtio_ism_grant __user *arg)
{
	struct virtio_ism_grant g;
	struct virtio_ism_ctrl_grant req;

	if (copy_from_user(&g, arg, sizeof(g)))
		return -EFAULT;
	if (g.perms & ~ISM_PERM_ALL)
		return -EINVAL;
	if (g.flags || g.reserved0 || g.reserved[0] || g.reserved[1])
		return -EINVAL;
	req.token = cpu_to_le64(g.token);
	req.permissions = cpu_to_le64(g.perms);
	req.peer_devid = cpu_to_le64(g.peer_devid);
	if (!g.peer_devid)
		return ism_ctrl_simple(f->ism, VIRTIO_ISM_CTRL_GRANT,
				       VIRTIO_ISM_CTRL_GRANT_SET_DEFAULT, &req,
				       offsetof(struct virtio_ism_ctrl_grant, peer_devid));
	return ism_ctrl_simple(f->ism, VIRTIO_ISM_CTRL_GRANT,
			       VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE, &req, sizeof(req));
}

static long ism_ioc_bind(struct ism_file *f, u64 token, bool bind)
{
	struct ism_region *r = ism_find_mine(f, token);

	return r ? ism_region_bind(f->ism, r, bind) : -ENOENT;
}

/* Ring the doorbell of the region's first chunk. Needs no control command. */
static long ism_ioc_kick(struct ism_file *f, u64 token)
{
	struct ism_dev *ism = f->ism;
	struct ism_region *r;
	u64 slot, off;
	long ret = 0;

	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, token);
	if (ism->gone) {
		ret = -ENODEV;
	} else if (!r || r->holder != f) {
		ret = -ENOENT;
	} else {
		slot = div64_u64(r->areas[0].offset, ism->chunk_size);
		off = slot * ism->notify_size;
		if (off >= ism->notify_shm.len || ism->notify_size > ism->notify_shm.len - off) {
			ret = -EIO;
		} else {
			iowrite8(1, ism->notify_base + off);
			atomic64_inc(&ism->kicks_sent);
		}
	}
	mutex_unlock(&ism->regions_lock);
	return ret;
}

static long ism_ioc_region_info(struct ism_file *f, struct virtio_ism_region_info __user *arg)
{
	struct ism_dev *ism = f->ism;
	struct virtio_ism_region_info info;
	struct virtio_ism_region_area *areas = NULL;
	struct ism_region *r;
	u32 n = 0;

	if (copy_from_user(&info, arg, sizeof(info)))
		return -EFAULT;
	if (info.flags || info.reserved[0] || info.reserved[1])
		return -EINVAL;
	if (info.max_areas > ISM_MAX_ENTRIES)
		info.max_areas = ISM_MAX_ENTRIES;
	if (info.areas && info.max_areas) {
		areas = kcalloc(info.max_areas, sizeof(*areas), GFP_KERNEL);
		if (!areas)
			return -ENOMEM;
	}
	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, info.token);
	if (r) {
		info.size = r->size;
		info.map_offset = r->holder == f ? r->map_key : 0;
		info.region_flags = ism_user_flags(r, f);
		info.nr_areas = r->nr_areas;
		info.kicks = atomic64_read(&r->kicks);
		if (areas) {
			n = min(info.max_areas, r->nr_areas);
			memcpy(areas, r->areas, n * sizeof(*areas));
		}
	}
	mutex_unlock(&ism->regions_lock);
	if (!r) {
		kfree(areas);
		return -ENOENT;
	}
	if ((n && copy_to_user(u64_to_user_ptr(info.areas), areas, n * sizeof(*areas))) ||
	    copy_to_user(arg, &info, sizeof(info))) {
		kfree(areas);
		return -EFAULT;
	}
	kfree(areas);
	return 0;
}

static long ism_ioc_list(struct ism_file *f, struct virtio_ism_list __user *arg)
{
	struct ism_dev *ism = f->ism;
	struct virtio_ism_list list;
	struct ism_region *r;
	u64 *tokens = NULL;
	u32 n = 0;

	if (copy_from_user(&list, arg, sizeof(list)))
		return -EFAULT;
	if (list.flags || list.reserved0 || list.reserved)
		return -EINVAL;
	if (list.max_tokens > ISM_MAX_ENTRIES)
		list.max_tokens = ISM_MAX_ENTRIES;
	if (list.tokens && list.max_tokens) {
		tokens = kcalloc(list.max_tokens, sizeof(*tokens), GFP_KERNEL);
		if (!tokens)
			return -ENOMEM;
	}
	list.nr_tokens = 0;
	mutex_lock(&ism->regions_lock);
	list_for_each_entry(r, &ism->regions, node) {
		if (tokens && n < list.max_tokens)
			tokens[n++] = r->token;
		list.nr_tokens++;
	}
	mutex_unlock(&ism->regions_lock);
	if ((n && copy_to_user(u64_to_user_ptr(list.tokens), tokens, n * sizeof(*tokens))) ||
	    copy_to_user(arg, &list, sizeof(list))) {
		kfree(tokens);
		return -EFAULT;
	}
	kfree(tokens);
	return 0;
}

static long ism_ioc_info(struct ism_file *f, struct virtio_ism_info __user *arg)
{
	struct ism_dev *ism = f->ism;
	struct virtio_ism_info info = {
		.gid = ism->gid,
		.devid = ism->devid,
		.chunk_size = ism->chunk_size,
		.notify_size = ism->notify_size,
		.features = ism->features,
		.shm_size = ism->shm.len,
		.instance = ism->instance,
		.flags = (ism_can_own_vectors(ism) ? VIRTIO_ISM_INFO_KICK_VECTORS : 0) |
			 (ism->pending ? VIRTIO_ISM_INFO_KICK_PENDING : 0),
	};
	struct ism_region *r;

	mutex_lock(&ism->regions_lock);
	list_for_each_entry(r, &ism->regions, node)
		info.nr_regions++;
	mutex_unlock(&ism->regions_lock);
	return copy_to_user(arg, &info, sizeof(info)) ? -EFAULT : 0;
}

static long ism_ioc_keep(struct ism_file *f, u64 token)
{
	struct ism_dev *ism = f->ism;
	struct ism_region *r;
	long ret = 0;

	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, token);
	if (!r || r->holder != f)
		ret = -ENOENT;
	else
		WRITE_ONCE(r->holder, NULL);
	mutex_unlock(&ism->regions_lock);
	/* Mappings of this file stay; new ones need the region back (ATTACH). */
	return ret;
}

static long ism_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct ism_file *f = file->private_data;
	struct ism_dev *ism = f->ism;
	void __user *uarg = (void __user *)arg;
	struct virtio_ism_token_op op = {};
	long ret;

	switch (cmd) {
	case VIRTIO_ISM_IOC_DETACH:
	case VIRTIO_ISM_IOC_BIND:
	case VIRTIO_ISM_IOC_UNBIND:
	case VIRTIO_ISM_IOC_KICK:
	case VIRTIO_ISM_IOC_KEEP:
		if (copy_from_user(&op, uarg, sizeof(op)))
			return -EFAULT;
		if (op.flags || op.reserved0 || op.reserved)
			return -EINVAL;
		break;
	default:
		break;
	}
	/* Kicks are the data path: they never wait behind a control command. */
	if (cmd == VIRTIO_ISM_IOC_KICK)
		return ism_ioc_kick(f, op.token);

	mutex_lock(&ism->ctrl_lock);
	if (ism->gone) {
		mutex_unlock(&ism->ctrl_lock);
		return -ENODEV;
	}
	switch (cmd) {
	case VIRTIO_ISM_IOC_INFO:
		ret = ism_ioc_info(f, uarg);
		break;
	case VIRTIO_ISM_IOC_ALLOC:
		ret = ism_ioc_alloc(f, uarg);
		break;
	case VIRTIO_ISM_IOC_ATTACH:
		ret = ism_ioc_attach(f, uarg);
		break;
	case VIRTIO_ISM_IOC_DETACH:
		ret = ism_ioc_detach(f, op.token);
		break;
	case VIRTIO_ISM_IOC_GRANT:
		ret = ism_ioc_grant(f, uarg);
		break;
	case VIRTIO_ISM_IOC_BIND:
	case VIRTIO_ISM_IOC_UNBIND:
		ret = ism_ioc_bind(f, op.token, cmd == VIRTIO_ISM_IOC_BIND);
		break;
	case VIRTIO_ISM_IOC_REGION_INFO:
		ret = ism_ioc_region_info(f, uarg);
		break;
	case VIRTIO_ISM_IOC_LIST:
		ret = ism_ioc_list(f, uarg);
		break;
	case VIRTIO_ISM_IOC_KEEP:
		ret = ism_ioc_keep(f, op.token);
		break;
	default:
		ret = -ENOTTY;
		break;
	}
	mutex_unlock(&ism->ctrl_lock);
	return ret;
}

/*
 * mmap(offset = map_offset of a region this file holds, plus a page multiple): the
 * region's areas back to back from there, each from its own offset in the window.
 * Read-only regions cannot be mapped writable, now or later (VM_MAYWRITE off).
 * The memory is host RAM shared between VMs, so it is mapped cached, like the
 * kernel's own memremap(MEMREMAP_WB) of the window. remap_pfn_range() fills the
 * whole VMA now, so there is no fault path; ism_zap() empties it on detach.
 */
static int ism_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct ism_file *f = file->private_data;
	struct ism_dev *ism = f->ism;
	u64 key = (u64)vma->vm_pgoff << PAGE_SHIFT, skip;
	unsigned long len = vma->vm_end - vma->vm_start, addr = vma->vm_start;
	struct ism_region *r = NULL, *it;
	int ret = 0;
	u32 i;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	mutex_lock(&ism->regions_lock);
	if (ism->gone) {
		ret = -ENODEV;
		goto out;
	}
	list_for_each_entry(it, &ism->regions, node) {
		if (it->holder == f && key >= it->map_key &&
		    key - it->map_key < PAGE_ALIGN(it->size)) {
			r = it;
			break;
		}
	}
	if (!r) {
		ret = -ENOENT;
		goto out;
	}
	skip = key - r->map_key;
	if (len > PAGE_ALIGN(r->size) - skip) {
		ret = -EINVAL;
		goto out;
	}
	if (!(r->flags & VIRTIO_ISM_REGION_F_WRITE)) {
		if (vma->vm_flags & VM_WRITE) {
			ret = -EPERM;
			goto out;
		}
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
		vm_flags_clear(vma, VM_MAYWRITE);
#else
		vma->vm_flags &= ~VM_MAYWRITE;
#endif
	}
	for (i = 0; i < r->nr_areas && len; i++) {
		u64 area_off = r->areas[i].offset, area_len = r->areas[i].size;
		unsigned long chunk;

		if (skip >= area_len) {
			skip -= area_len;
			continue;
		}
		area_off += skip;
		area_len -= skip;
		skip = 0;
		chunk = min_t(u64, len, area_len);
		ret = remap_pfn_range(vma, addr, PHYS_PFN(ism->shm.addr + area_off),
				      chunk, vma->vm_page_prot);
		if (ret)
			goto out;
		addr += chunk;
		len -= chunk;
	}
out:
	mutex_unlock(&ism->regions_lock);
	return ret;
}

static ssize_t ism_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	struct ism_file *f = file->private_data;
	struct ism_dev *ism = f->ism;
	struct virtio_ism_event_record recs[8];
	size_t want = min_t(size_t, count / sizeof(recs[0]), ARRAY_SIZE(recs)), n = 0;
	int ret;

	if (!want)
		return -EINVAL;
	for (;;) {
		spin_lock_irq(&f->ev_lock);
		if (f->ev_lost) {
			recs[n++] = (struct virtio_ism_event_record){ .type = VIRTIO_ISM_EV_LOST };
			f->ev_lost = false;
		}
		while (n < want && f->ev_count) {
			recs[n++] = f->ev[f->ev_head];
			f->ev_head = (f->ev_head + 1) % ISM_FILE_EVENTS;
			f->ev_count--;
		}
		spin_unlock_irq(&f->ev_lock);
		if (n)
			break;
		if (READ_ONCE(ism->gone))
			return -ENODEV;
		if (file->f_flags & O_NONBLOCK)
			return -EAGAIN;
		ret = wait_event_interruptible(ism->wq, READ_ONCE(f->ev_count) ||
					       READ_ONCE(f->ev_lost) || READ_ONCE(ism->gone));
		if (ret)
			return ret;
	}
	if (copy_to_user(buf, recs, n * sizeof(recs[0])))
		return -EFAULT;
	return n * sizeof(recs[0]);
}

static __poll_t ism_poll(struct file *file, poll_table *wait)
{
	struct ism_file *f = file->private_data;
	struct ism_dev *ism = f->ism;
	__poll_t mask = 0;

	poll_wait(file, &ism->wq, wait);
	if (READ_ONCE(f->ev_count) || READ_ONCE(f->ev_lost))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (READ_ONCE(ism->gone))
		mask |= EPOLLHUP | EPOLLERR;
	return mask;
}

static const struct file_operations ism_fops = {
	.owner = THIS_MODULE,
	.open = ism_open,
	.release = ism_release,
	.unlocked_ioctl = ism_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = ism_mmap,
	.read = ism_read,
	.poll = ism_poll,
	.llseek = noop_llseek,
};

/* ---- sysfs: /sys/class/misc/ismN/kick_vectors and counters/ ------------------ */

static struct ism_dev *ism_from_dev(struct device *dev)
{
	struct miscdevice *misc = dev_get_drvdata(dev);

	return container_of(misc, struct ism_dev, misc);
}

#define ISM_COUNTER_ATTR(_name)							\
static ssize_t _name##_show(struct device *dev, struct device_attribute *attr,	\
			    char *buf)						\
{										\
	return sysfs_emit(buf, "%llu\n",					\
			  (u64)atomic64_read(&ism_from_dev(dev)->_name));	\
}										\
static DEVICE_ATTR_RO(_name)

ISM_COUNTER_ATTR(ctrl_commands);
ISM_COUNTER_ATTR(ctrl_errors);
ISM_COUNTER_ATTR(ctrl_timeouts);
ISM_COUNTER_ATTR(late_replies);
ISM_COUNTER_ATTR(orphans_detached);
ISM_COUNTER_ATTR(bad_replies);
ISM_COUNTER_ATTR(kicks_sent);
ISM_COUNTER_ATTR(kick_irqs);
ISM_COUNTER_ATTR(config_irqs);
ISM_COUNTER_ATTR(events);
ISM_COUNTER_ATTR(events_lost);

#define ISM_SMCD_COUNTER_ATTR(_name)						\
static ssize_t smcd_##_name##_show(struct device *dev,				\
				   struct device_attribute *attr, char *buf)	\
{										\
	return sysfs_emit(buf, "%llu\n",					\
			  (u64)atomic64_read(&ism_from_dev(dev)->smcd._name));	\
}										\
static DEVICE_ATTR_RO(smcd_##_name)

ISM_SMCD_COUNTER_ATTR(dmbs_registered);
ISM_SMCD_COUNTER_ATTR(dmbs_unregistered);
ISM_SMCD_COUNTER_ATTR(dmbs);
ISM_SMCD_COUNTER_ATTR(peer_attaches);
ISM_SMCD_COUNTER_ATTR(peer_attach_errors);
ISM_SMCD_COUNTER_ATTR(peer_detaches);
ISM_SMCD_COUNTER_ATTR(moves);
ISM_SMCD_COUNTER_ATTR(move_bytes);
ISM_SMCD_COUNTER_ATTR(moves_deferred);
ISM_SMCD_COUNTER_ATTR(move_errors);
ISM_SMCD_COUNTER_ATTR(signals);
ISM_SMCD_COUNTER_ATTR(irqs);
ISM_SMCD_COUNTER_ATTR(gid_queries);
ISM_SMCD_COUNTER_ATTR(gid_refusals);

static struct attribute *ism_counter_attrs[] = {
	&dev_attr_ctrl_commands.attr,
	&dev_attr_ctrl_errors.attr,
	&dev_attr_ctrl_timeouts.attr,
	&dev_attr_late_replies.attr,
	&dev_attr_orphans_detached.attr,
	&dev_attr_bad_replies.attr,
	&dev_attr_kicks_sent.attr,
	&dev_attr_kick_irqs.attr,
	&dev_attr_config_irqs.attr,
	&dev_attr_events.attr,
	&dev_attr_events_lost.attr,
	&dev_attr_smcd_dmbs_registered.attr,
	&dev_attr_smcd_dmbs_unregistered.attr,
	&dev_attr_smcd_dmbs.attr,
	&dev_attr_smcd_peer_attaches.attr,
	&dev_attr_smcd_peer_attach_errors.attr,
	&dev_attr_smcd_peer_detaches.attr,
	&dev_attr_smcd_moves.attr,
	&dev_attr_smcd_move_bytes.attr,
	&dev_attr_smcd_moves_deferred.attr,
	&dev_attr_smcd_move_errors.attr,
	&dev_attr_smcd_signals.attr,
	&dev_attr_smcd_irqs.attr,
	&dev_attr_smcd_gid_queries.attr,
	&dev_attr_smcd_gid_refusals.attr,
	NULL,
};

static const struct attribute_group ism_counter_group = {
	.name = "counters",
	.attrs = ism_counter_attrs,
};

/*
 * How kicks of bound regions arrive: "per-region" (own vectors), "pending-bits"
 * (the shared vector plus the device's pending bits) or "shared".
 */
static const char *ism_kick_mode(struct ism_dev *ism)
{
	if (ism_can_own_vectors(ism))
		return "per-region";
	return ism->pending ? "pending-bits" : "shared";
}

static ssize_t kick_vectors_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%s\n", ism_kick_mode(ism_from_dev(dev)));
}
static DEVICE_ATTR_RO(kick_vectors);

/* Whether the device is an SMC-D device, or why not (docs/smc.md). */
static ssize_t smcd_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct ism_dev *ism = ism_from_dev(dev);
	unsigned long flags;
	ssize_t ret;

	spin_lock_irqsave(&ism->smcd_state_lock, flags);
	ret = sysfs_emit(buf, "%s\n", ism->smcd_state);
	spin_unlock_irqrestore(&ism->smcd_state_lock, flags);
	return ret;
}
static DEVICE_ATTR_RO(smcd);

static struct attribute *ism_dev_attrs[] = {
	&dev_attr_kick_vectors.attr,
	&dev_attr_smcd.attr,
	NULL,
};

static const struct attribute_group ism_dev_group = {
	.attrs = ism_dev_attrs,
};

static const struct attribute_group *ism_groups[] = {
	&ism_dev_group,
	&ism_counter_group,
	NULL,
};

/* ---- probe / remove ------------------------------------------------------- */

static int ism_read_config(struct ism_dev *ism)
{
	struct device *dev = &ism->vdev->dev;
	u64 slots;

	virtio_cread_le(ism->vdev, struct virtio_ism_config, gid, &ism->gid);
	virtio_cread_le(ism->vdev, struct virtio_ism_config, devid, &ism->devid);
	virtio_cread_le(ism->vdev, struct virtio_ism_config, chunk_size, &ism->chunk_size);
	virtio_cread_le(ism->vdev, struct virtio_ism_config, notify_size, &ism->notify_size);

	if (!ism->devid || ism->chunk_size < PAGE_SIZE || !is_power_of_2(ism->chunk_size) ||
	    !ism->notify_size || ism->notify_size > 4096 || !is_power_of_2(ism->notify_size)) {
		dev_err(dev, "bad config: devid %llu chunk %llu notify %llu\n",
			ism->devid, ism->chunk_size, ism->notify_size);
		return -EINVAL;
	}
	if (!virtio_get_shm_region(ism->vdev, &ism->shm, VIRTIO_ISM_SHM_ID_REGIONS) ||
	    !virtio_get_shm_region(ism->vdev, &ism->notify_shm, VIRTIO_ISM_SHM_ID_NOTIFY)) {
		dev_err(dev, "shared-memory regions missing\n");
		return -ENODEV;
	}
	slots = div64_u64(ism->shm.len, ism->chunk_size);
	if (!slots || ism->shm.len % ism->chunk_size || !PAGE_ALIGNED(ism->shm.addr) ||
	    ism->shm.addr + ism->shm.len < ism->shm.addr ||
	    ism->notify_shm.len / ism->notify_size < slots) {
		dev_err(dev, "bad shared-memory regions: %llx+%llx, notify %llx+%llx\n",
			ism->shm.addr, ism->shm.len, ism->notify_shm.addr, ism->notify_shm.len);
		return -EINVAL;
	}
	return 0;
}

static int ism_setup_vqs(struct ism_dev *ism)
{
	struct virtqueue *vqs[2];
	unsigned int nvqs = (ism->features & VIRTIO_ISM_INFO_F_EVENT_QUEUE) ? 2 : 1;
	int ret;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	struct virtqueue_info vqs_info[2] = {
		{ "control", ism_ctrl_vq_done },
		{ "events", ism_event_vq_done },
	};

	ret = virtio_find_vqs(ism->vdev, nvqs, vqs, vqs_info, NULL);
#else
	vq_callback_t *callbacks[2] = { ism_ctrl_vq_done, ism_event_vq_done };
	static const char * const names[2] = { "control", "events" };

	ret = virtio_find_vqs(ism->vdev, nvqs, vqs, callbacks, names, NULL);
#endif
	if (ret)
		return ret;
	ism->ctrl_vq = vqs[0];
	ism->event_vq = nvqs == 2 ? vqs[1] : NULL;
	return 0;
}

static int ism_fill_event_queue(struct ism_dev *ism)
{
	unsigned int i;
	int ret;

	if (!ism->event_vq)
		return 0;
	ism->event_bufs = kcalloc(ISM_EVENT_BUFS, sizeof(*ism->event_bufs), GFP_KERNEL);
	if (!ism->event_bufs)
		return -ENOMEM;
	for (i = 0; i < ISM_EVENT_BUFS; i++) {
		ret = ism_post_event_buf(ism, &ism->event_bufs[i]);
		if (ret)
			return ret;
	}
	virtqueue_kick(ism->event_vq);
	return 0;
}

/* After a reset: take back what the device never returned, then drop the queues. */
static void ism_del_vqs(struct ism_dev *ism)
{
	struct ism_cmd *c;

	while ((c = virtqueue_detach_unused_buf(ism->ctrl_vq)))
		ism_cmd_free(c);
	if (ism->event_vq)
		while (virtqueue_detach_unused_buf(ism->event_vq))
			;	/* ism->event_bufs, freed with the device */
	ism->vdev->config->del_vqs(ism->vdev);
}

static int ism_probe(struct virtio_device *vdev)
{
	struct ism_dev *ism;
	struct inode *inode;
	int ret;

	if (!vdev->config->get_shm_region) {
		dev_err(&vdev->dev, "transport has no shared-memory regions\n");
		return -ENODEV;
	}
	ism = kzalloc(sizeof(*ism), GFP_KERNEL);
	if (!ism)
		return -ENOMEM;
	kref_init(&ism->ref);
	ism->vdev = vdev;
	vdev->priv = ism;
	mutex_init(&ism->ctrl_lock);
	mutex_init(&ism->regions_lock);
	init_completion(&ism->ctrl_done);
	INIT_LIST_HEAD(&ism->regions);
	INIT_LIST_HEAD(&ism->files);
	INIT_LIST_HEAD(&ism->shared_kicks);
	spin_lock_init(&ism->files_lock);
	spin_lock_init(&ism->kick_lock);
	spin_lock_init(&ism->smcd_state_lock);
	strscpy(ism->smcd_state, "off: not set up yet", sizeof(ism->smcd_state));
	init_waitqueue_head(&ism->wq);
	INIT_WORK(&ism->event_work, ism_event_work);
	ida_init(&ism->pending_ida);

	if (virtio_has_feature(vdev, VIRTIO_ISM_F_EVENT_QUEUE))
		ism->features |= VIRTIO_ISM_INFO_F_EVENT_QUEUE;
	if (virtio_has_feature(vdev, VIRTIO_ISM_F_QUERY))
		ism->features |= VIRTIO_ISM_INFO_F_QUERY;
	if (virtio_has_feature(vdev, VIRTIO_ISM_F_GRANT))
		ism->features |= VIRTIO_ISM_INFO_F_GRANT;
	if (virtio_has_feature(vdev, VIRTIO_ISM_F_KICK_PENDING)) {
		ism->features |= VIRTIO_ISM_INFO_F_KICK_PENDING;
		ism->pending = kcalloc(ISM_PENDING_WORDS, sizeof(*ism->pending), GFP_KERNEL);
		if (!ism->pending) {
			ret = -ENOMEM;
			goto err_free;
		}
	}

	inode = ism_inode_new();
	if (IS_ERR(inode)) {
		ret = PTR_ERR(inode);
		goto err_free;
	}
	ism->mapping_inode = inode;
	ism->mapping = inode->i_mapping;

	ret = ism_read_config(ism);
	if (ret)
		goto err_free;
	ism->shm_base = memremap(ism->shm.addr, ism->shm.len, MEMREMAP_WB);
	if (!ism->shm_base) {
		ret = -ENOMEM;
		goto err_free;
	}
	ism->notify_base = ioremap(ism->notify_shm.addr, ism->notify_shm.len);
	if (!ism->notify_base) {
		ret = -ENOMEM;
		goto err_shm;
	}
	ret = ism_setup_vqs(ism);
	if (ret)
		goto err_notify;
	virtio_device_ready(vdev);
	ret = ism_fill_event_queue(ism);
	if (ret)
		goto err_reset;

	mutex_lock(&ism_devs_lock);
	ism->instance = idr_alloc(&ism_devs, ism, 0, 0, GFP_KERNEL);
	mutex_unlock(&ism_devs_lock);
	if (ism->instance < 0) {
		ret = ism->instance;
		goto err_reset;
	}
	snprintf(ism->name, sizeof(ism->name), "ism%d", ism->instance);
	ism->misc.minor = MISC_DYNAMIC_MINOR;
	ism->misc.name = ism->name;
	ism->misc.fops = &ism_fops;
	ism->misc.parent = &vdev->dev;
	ism->misc.groups = ism_groups;
	ret = misc_register(&ism->misc);
	if (ret)
		goto err_idr;
	dev_info(&vdev->dev, "/dev/%s: gid %llu devid %llu chunk %llu window %llu MiB%s%s%s, kicks: %s\n",
		 ism->name, ism->gid, ism->devid, ism->chunk_size, ism->shm.len >> 20,
		 ism->event_vq ? " events" : "",
		 (ism->features & VIRTIO_ISM_INFO_F_QUERY) ? " query" : "",
		 (ism->features & VIRTIO_ISM_INFO_F_GRANT) ? " grant" : "",
		 ism_kick_mode(ism));
	virtio_ism_smc_probe(ism);
	return 0;

err_idr:
	mutex_lock(&ism_devs_lock);
	idr_remove(&ism_devs, ism->instance);
	mutex_unlock(&ism_devs_lock);
err_reset:
	virtio_reset_device(vdev);
	cancel_work_sync(&ism->event_work);
	ism_del_vqs(ism);
err_notify:
	iounmap(ism->notify_base);
err_shm:
	memunmap(ism->shm_base);
err_free:
	vdev->priv = NULL;
	kref_put(&ism->ref, ism_free);
	return ret;
}

static void ism_remove(struct virtio_device *vdev)
{
	struct ism_dev *ism = vdev->priv;
	struct ism_region *r, *tmp;
	LIST_HEAD(all);

	/* SMC first: it unregisters its DMBs through the device, which must still work. */
	virtio_ism_smc_remove(ism);
	mutex_lock(&ism_devs_lock);
	idr_remove(&ism_devs, ism->instance);
	mutex_unlock(&ism_devs_lock);
	misc_deregister(&ism->misc);

	mutex_lock(&ism->ctrl_lock);
	mutex_lock(&ism->regions_lock);
	WRITE_ONCE(ism->gone, true);
	list_splice_init(&ism->regions, &all);
	mutex_unlock(&ism->regions_lock);
	wake_up_all(&ism->wq);

	/* Reset drops every region on the device side; no process may keep a mapping. */
	unmap_mapping_range(ism->mapping, 0, 0, 1);
	/* Own vectors go before the transport frees its MSI-X set-up (del_vqs). */
	list_for_each_entry_safe(r, tmp, &all, node) {
		list_del(&r->node);
		ism_region_free(ism, r);
	}
	mutex_unlock(&ism->ctrl_lock);

	virtio_reset_device(vdev);
	cancel_work_sync(&ism->event_work);
	ism_del_vqs(ism);
	iounmap(ism->notify_base);
	memunmap(ism->shm_base);
	kref_put(&ism->ref, ism_free);
}

/* Before the features are finalized: draft mode drops every extension. */
static int ism_validate(struct virtio_device *vdev)
{
	if (draft) {
		__virtio_clear_bit(vdev, VIRTIO_ISM_F_EVENT_QUEUE);
		__virtio_clear_bit(vdev, VIRTIO_ISM_F_QUERY);
		__virtio_clear_bit(vdev, VIRTIO_ISM_F_GRANT);
		__virtio_clear_bit(vdev, VIRTIO_ISM_F_KICK_PENDING);
		__virtio_clear_bit(vdev, VIRTIO_ISM_F_EAGAIN);
	}
	return 0;
}

static unsigned int ism_features[] = {
	VIRTIO_ISM_F_EVENT_QUEUE,
	VIRTIO_ISM_F_QUERY,
	VIRTIO_ISM_F_GRANT,
	VIRTIO_ISM_F_KICK_PENDING,
	VIRTIO_ISM_F_EAGAIN,
	/*
	 * Not VIRTIO_ISM_F_VECTOR_EVENTS: events come on the event queue, so region
	 * vectors carry kicks only.
	 */
};

static const struct virtio_device_id ism_id_table[] = {
	{ VIRTIO_ID_ISM, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, ism_id_table);

static struct virtio_driver ism_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = ism_id_table,
	.feature_table = ism_features,
	.feature_table_size = ARRAY_SIZE(ism_features),
	.validate = ism_validate,
	.probe = ism_probe,
	.remove = ism_remove,
	.config_changed = ism_config_changed,
};

module_virtio_driver(ism_driver);

MODULE_DESCRIPTION("virtio-ism inter-VM shared memory driver");
MODULE_LICENSE("GPL");
