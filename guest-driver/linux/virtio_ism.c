// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_ism: Linux driver for the virtio-ism device (virtio device 44).
 *
 * Binds the device through the virtio core, maps its two shared-memory regions
 * (shmid 1: the region window, shmid 2: the doorbells), runs the control queue
 * and, when offered, the event queue, and exposes /dev/ismN to user space:
 * ioctls (include/uapi/linux/virtio_ism.h), mmap of held regions, read/poll of
 * events. The protocol is docs/protocol.md; the numbers are virtio_ism_wire.h.
 *
 * Locking: ctrl_lock serializes ioctls that talk to the device (one control
 * command at a time); regions_lock protects the region list and is taken inside
 * ctrl_lock, by mmap (under mmap_lock) and by the event worker. Nothing copies
 * to or from user memory while holding regions_lock.
 */

#include <linux/module.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/mm.h>
#include <linux/io.h>
#include <linux/idr.h>
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/scatterlist.h>
#include <linux/workqueue.h>
#include <linux/version.h>
#include <asm/unaligned.h>

#include "virtio_ism_wire.h"
#include "include/uapi/linux/virtio_ism.h"

#define ISM_CTRL_TIMEOUT	(5 * HZ)
#define ISM_EVENT_BUFS		16
#define ISM_FILE_EVENTS		64
/* Areas asked for on the first try of ALLOC/ATTACH; E2BIG says how many are needed. */
#define ISM_FIRST_AREAS		4
/* No reply may claim more areas or tokens than this, whatever the window size. */
#define ISM_MAX_ENTRIES		4096
/* mmap offsets: region i is at i << ISM_MAP_SHIFT (1 TiB apart). */
#define ISM_MAP_SHIFT		40
#define ISM_PERM_ALL		(VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE | \
				 VIRTIO_ISM_PERM_ATTACH | VIRTIO_ISM_PERM_MANAGE | \
				 VIRTIO_ISM_PERM_CLEAN_DEFAULT)

static DEFINE_IDA(ism_ida);

struct ism_region {
	struct list_head node;		/* ism_dev.regions */
	struct ism_file *holder;	/* NULL: kept by the driver */
	u64 token;
	u64 size;
	u64 map_key;			/* the mmap offset */
	u32 flags;			/* VIRTIO_ISM_REGION_F_{WRITE,OWNER,BOUND,HOTPLUGGED} */
	u32 nr_areas;
	struct virtio_ism_area areas[];
};

struct ism_file {
	struct ism_dev *ism;
	struct list_head node;		/* ism_dev.files */
	spinlock_t ev_lock;
	unsigned int ev_head;
	unsigned int ev_count;
	bool ev_lost;
	struct virtio_ism_event_record ev[ISM_FILE_EVENTS];
};

struct ism_dev {
	struct virtio_device *vdev;
	struct kref ref;
	int instance;
	char name[16];
	struct miscdevice misc;
	bool misc_registered;

	u64 gid, devid, chunk_size, notify_size, features;
	struct virtio_shm_region shm, notify_shm;
	void *shm_base;
	void __iomem *notify_base;

	struct virtqueue *ctrl_vq;
	struct virtqueue *event_vq;
	struct mutex ctrl_lock;
	struct completion ctrl_done;
	bool broken;			/* a command timed out: the queue state is unknown */
	bool gone;			/* removed: every operation fails with ENODEV */

	struct mutex regions_lock;
	struct list_head regions;
	u64 next_map_index;
	struct address_space *mapping;	/* shared by every file, for unmap_mapping_range */
	struct inode *mapping_inode;

	spinlock_t files_lock;
	struct list_head files;
	wait_queue_head_t wq;

	struct work_struct event_work;
	u8 *event_bufs;

	atomic64_t ctrl_commands, ctrl_errors, ctrl_timeouts, bad_replies;
	atomic64_t kicks_sent, kick_irqs, events, events_lost;
};

static void ism_free(struct kref *ref)
{
	struct ism_dev *ism = container_of(ref, struct ism_dev, ref);

	if (ism->mapping_inode)
		iput(ism->mapping_inode);
	kfree(ism->event_bufs);
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

/* Queue @rec for @only, or for every open file when @only is NULL. Any context. */
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

/* ---- control queue -------------------------------------------------------- */

static void ism_ctrl_vq_done(struct virtqueue *vq)
{
	struct ism_dev *ism = vq->vdev->priv;

	complete(&ism->ctrl_done);
}

/*
 * Run one control command; caller holds ctrl_lock. On success *status is the
 * device's status byte and @reply holds *reply_len (<= @reply_cap) reply bytes.
 */
static int ism_ctrl(struct ism_dev *ism, u8 class, u8 cmd,
		    const void *payload, size_t payload_len,
		    void *reply, size_t reply_cap, size_t *reply_len, u8 *status)
{
	struct scatterlist out_sg, in_sg, *sgs[2];
	unsigned long left = ISM_CTRL_TIMEOUT;
	unsigned int used = 0;
	u8 *out, *in;
	void *done = NULL;
	int ret;

	lockdep_assert_held(&ism->ctrl_lock);
	if (ism->gone)
		return -ENODEV;
	if (ism->broken)
		return -EIO;

	out = kmalloc(VIRTIO_ISM_CTRL_HDR_SIZE + payload_len, GFP_KERNEL);
	in = kzalloc(1 + reply_cap, GFP_KERNEL);
	if (!out || !in) {
		kfree(out);
		kfree(in);
		return -ENOMEM;
	}
	out[0] = class;
	out[1] = cmd;
	if (payload_len)
		memcpy(out + VIRTIO_ISM_CTRL_HDR_SIZE, payload, payload_len);
	sg_init_one(&out_sg, out, VIRTIO_ISM_CTRL_HDR_SIZE + payload_len);
	sg_init_one(&in_sg, in, 1 + reply_cap);
	sgs[0] = &out_sg;
	sgs[1] = &in_sg;

	reinit_completion(&ism->ctrl_done);
	ret = virtqueue_add_sgs(ism->ctrl_vq, sgs, 1, 1, in, GFP_KERNEL);
	if (ret) {
		kfree(out);
		kfree(in);
		return ret;
	}
	virtqueue_kick(ism->ctrl_vq);

	while (!done) {
		done = virtqueue_get_buf(ism->ctrl_vq, &used);
		if (done)
			break;
		left = wait_for_completion_timeout(&ism->ctrl_done, left);
		if (!left) {
			done = virtqueue_get_buf(ism->ctrl_vq, &used);
			if (done)
				break;
			/* The device still owns both buffers: leak them, stop using the queue. */
			ism->broken = true;
			atomic64_inc(&ism->ctrl_timeouts);
			dev_err(&ism->vdev->dev, "control command %u/%u timed out\n", class, cmd);
			return -ETIMEDOUT;
		}
	}
	kfree(out);
	if (done != in || used < 1 || used > 1 + reply_cap) {
		atomic64_inc(&ism->bad_replies);
		kfree(in);
		if (done != in)
			ism->broken = true;
		return -EIO;
	}
	*status = in[0];
	*reply_len = used - 1;
	memcpy(reply, in + 1, *reply_len);
	kfree(in);
	atomic64_inc(&ism->ctrl_commands);
	if (*status != VIRTIO_ISM_OK)
		atomic64_inc(&ism->ctrl_errors);
	return 0;
}

/* A command without a reply; returns 0 or a negative errno (device status mapped). */
static int ism_ctrl_simple(struct ism_dev *ism, u8 class, u8 cmd,
			   const void *payload, size_t payload_len)
{
	size_t got;
	u8 status;
	u8 dummy;
	int ret;

	ret = ism_ctrl(ism, class, cmd, payload, payload_len, &dummy, 0, &got, &status);
	return ret ? ret : virtio_ism_status_errno(status);
}

/* ---- regions ------------------------------------------------------------- */

static u64 ism_max_areas(struct ism_dev *ism)
{
	return min_t(u64, div64_u64(ism->shm.len, ism->chunk_size), ISM_MAX_ENTRIES);
}

/*
 * Check @num areas the device returned at @buf (le64 offset, le64 size each) and
 * build a region of them. Every area must lie inside shmid 1, start on a chunk,
 * cover whole pages, and the sizes must add up to @want (0: any).
 */
static struct ism_region *ism_region_from_areas(struct ism_dev *ism, const u8 *buf,
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
		u64 off = get_unaligned_le64(buf + i * VIRTIO_ISM_AREA_SIZE);
		u64 size = get_unaligned_le64(buf + i * VIRTIO_ISM_AREA_SIZE + 8);

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

/* Caller holds regions_lock. */
static void ism_track(struct ism_dev *ism, struct ism_region *r, struct ism_file *holder)
{
	r->holder = holder;
	r->map_key = ++ism->next_map_index << ISM_MAP_SHIFT;
	list_add_tail(&r->node, &ism->regions);
}

/* Remove every user mapping of @r; the pages become SIGBUS. No regions_lock needed. */
static void ism_zap(struct ism_dev *ism, struct ism_region *r)
{
	if (ism->mapping)
		unmap_mapping_range(ism->mapping, r->map_key, PAGE_ALIGN(r->size), 1);
}

static void ism_detach_on_device(struct ism_dev *ism, u64 token)
{
	__le64 req = cpu_to_le64(token);
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
		size_t cap_bytes = hdr_size + cap * VIRTIO_ISM_AREA_SIZE, got;
		u8 *reply = kzalloc(cap_bytes, GFP_KERNEL);
		u8 status;

		if (!reply)
			return ERR_PTR(-ENOMEM);
		ret = ism_ctrl(ism, class, 0, req, req_len, reply, cap_bytes, &got, &status);
		if (ret) {
			kfree(reply);
			return ERR_PTR(ret);
		}
		/* A refusal may come with the status byte alone: only OK and E2BIG carry a header. */
		if (status != VIRTIO_ISM_OK && status != VIRTIO_ISM_E2BIG) {
			kfree(reply);
			return ERR_PTR(virtio_ism_status_errno(status));
		}
		if (got < hdr_size) {
			kfree(reply);
			atomic64_inc(&ism->bad_replies);
			return ERR_PTR(-EIO);
		}
		num = get_unaligned_le64(reply + hdr_size - 8);
		if (status == VIRTIO_ISM_E2BIG) {
			kfree(reply);
			if (num <= cap || num > ism_max_areas(ism)) {
				atomic64_inc(&ism->bad_replies);
				return ERR_PTR(-EIO);
			}
			cap = num;
			continue;
		}
		*token = hdr_size == VIRTIO_ISM_ALLOC_REPLY_HDR_SIZE ?
			 get_unaligned_le64(reply) : *token;
		if (num > cap || got < hdr_size + num * VIRTIO_ISM_AREA_SIZE)
			r = ERR_PTR(-EIO);
		else
			r = ism_region_from_areas(ism, reply + hdr_size, num, want);
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
	__le64 req = cpu_to_le64(token);
	struct ism_region *r;
	u64 cap = ISM_FIRST_AREAS, num, size, flags;
	int tries, ret;

	for (tries = 0; tries < 3; tries++) {
		size_t cap_bytes = VIRTIO_ISM_QREGION_REPLY_HDR_SIZE + cap * VIRTIO_ISM_AREA_SIZE;
		size_t got;
		u8 *reply = kzalloc(cap_bytes, GFP_KERNEL);
		u8 status;

		if (!reply)
			return ERR_PTR(-ENOMEM);
		ret = ism_ctrl(ism, VIRTIO_ISM_CTRL_QUERY, VIRTIO_ISM_CTRL_QUERY_REGION,
			       &req, sizeof(req), reply, cap_bytes, &got, &status);
		/* A refusal may come with the status byte alone: only OK and E2BIG carry a header. */
		if (!ret && status != VIRTIO_ISM_OK && status != VIRTIO_ISM_E2BIG) {
			ret = virtio_ism_status_errno(status);
		} else if (!ret && got < VIRTIO_ISM_QREGION_REPLY_HDR_SIZE) {
			atomic64_inc(&ism->bad_replies);
			ret = -EIO;
		}
		if (ret) {
			kfree(reply);
			return ERR_PTR(ret);
		}
		size = get_unaligned_le64(reply);
		flags = get_unaligned_le64(reply + 8);
		num = get_unaligned_le64(reply + 24);
		if (status == VIRTIO_ISM_E2BIG && num > cap && num <= ism_max_areas(ism)) {
			kfree(reply);
			cap = num;
			continue;
		}
		if (status != VIRTIO_ISM_OK) {
			kfree(reply);
			return ERR_PTR(status == VIRTIO_ISM_E2BIG ? -EIO : virtio_ism_status_errno(status));
		}
		if (num > cap || got < VIRTIO_ISM_QREGION_REPLY_HDR_SIZE + num * VIRTIO_ISM_AREA_SIZE)
			r = ERR_PTR(-EIO);
		else
			r = ism_region_from_areas(ism, reply + VIRTIO_ISM_QREGION_REPLY_HDR_SIZE,
						  num, size);
		kfree(reply);
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

/* ---- event queue ---------------------------------------------------------- */

static int ism_post_event_buf(struct ism_dev *ism, u8 *buf)
{
	struct scatterlist sg;

	sg_init_one(&sg, buf, VIRTIO_ISM_EVENT_SIZE);
	return virtqueue_add_inbuf(ism->event_vq, &sg, 1, buf, GFP_KERNEL);
}

static void ism_event_vq_done(struct virtqueue *vq)
{
	struct ism_dev *ism = vq->vdev->priv;

	schedule_work(&ism->event_work);
}

static void ism_handle_event(struct ism_dev *ism, const u8 *ev)
{
	struct virtio_ism_event_record rec = {
		.type = get_unaligned_le64(ev + VIRTIO_ISM_EV_OFF_TYPE),
		.devid = get_unaligned_le64(ev + VIRTIO_ISM_EV_OFF_DEVID),
		.peers = get_unaligned_le64(ev + VIRTIO_ISM_EV_OFF_PEERS),
		.token = get_unaligned_le64(ev + VIRTIO_ISM_EV_OFF_TOKEN),
	};
	struct ism_region *r, *added;
	struct ism_file *to = NULL;

	atomic64_inc(&ism->events);
	switch (rec.type) {
	case VIRTIO_ISM_EVENT_REVOKE:
		/* The device has already unmapped it: drop user mappings, forget it. */
		mutex_lock(&ism->regions_lock);
		r = ism_find(ism, rec.token);
		if (r) {
			list_del(&r->node);
			to = r->holder;
		}
		mutex_unlock(&ism->regions_lock);
		if (r) {
			ism_zap(ism, r);
			kfree(r);
		}
		break;
	case VIRTIO_ISM_EVENT_REGION_ADDED:
		if (!(ism->features & VIRTIO_ISM_INFO_F_QUERY))
			break;
		mutex_lock(&ism->ctrl_lock);
		added = ism_query_region(ism, rec.token);
		mutex_unlock(&ism->ctrl_lock);
		if (IS_ERR(added)) {
			dev_warn(&ism->vdev->dev, "hot-added region %llx: query failed\n", rec.token);
			break;
		}
		mutex_lock(&ism->regions_lock);
		if (ism_find(ism, rec.token))
			kfree(added);
		else
			ism_track(ism, added, NULL);
		mutex_unlock(&ism->regions_lock);
		break;
	case VIRTIO_ISM_EVENT_UPDATE:
	case VIRTIO_ISM_EVENT_ATTACH:
	case VIRTIO_ISM_EVENT_DETACH:
		mutex_lock(&ism->regions_lock);
		r = ism_find(ism, rec.token);
		to = r ? r->holder : NULL;
		mutex_unlock(&ism->regions_lock);
		break;
	case VIRTIO_ISM_EVENT_OVERFLOW:
		break;
	default:
		atomic64_inc(&ism->bad_replies);
		return;
	}
	/*
	 * A file pointer read under regions_lock stays valid here: a file removes its
	 * regions (under regions_lock) before it leaves the files list, and
	 * ism_post only delivers to files still on that list.
	 */
	ism_post(ism, to, &rec);
}

static void ism_event_work(struct work_struct *work)
{
	struct ism_dev *ism = container_of(work, struct ism_dev, event_work);
	unsigned int len;
	u8 *buf;

	for (;;) {
		virtqueue_disable_cb(ism->event_vq);
		while (!ism->gone && (buf = virtqueue_get_buf(ism->event_vq, &len))) {
			if (len >= VIRTIO_ISM_EVENT_SIZE)
				ism_handle_event(ism, buf);
			else
				atomic64_inc(&ism->bad_replies);
			if (ism_post_event_buf(ism, buf))
				dev_warn(&ism->vdev->dev, "cannot repost an event buffer\n");
		}
		if (ism->gone)
			return;
		virtqueue_kick(ism->event_vq);
		if (virtqueue_enable_cb(ism->event_vq))
			return;
	}
}

/* Kicks arrive on the config vector (see docs/guest-driver.md). Hard IRQ context. */
static void ism_config_changed(struct virtio_device *vdev)
{
	struct ism_dev *ism = vdev->priv;
	struct virtio_ism_event_record rec = { .type = VIRTIO_ISM_EV_KICK };

	atomic64_inc(&ism->kick_irqs);
	ism_post(ism, NULL, &rec);
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
	/* One address_space for every node of this device, so revocation reaches all. */
	if (!ism->mapping) {
		ihold(inode);
		ism->mapping_inode = inode;
		ism->mapping = inode->i_mapping;
	}
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
		kfree(r);
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
	struct ism_region *r;
	__le64 req;
	u64 token = 0, want;

	if (copy_from_user(&ureg, arg, sizeof(ureg)))
		return -EFAULT;
	if (!ureg.size || ureg.size > ism->shm.len)
		return -EINVAL;
	want = round_up(ureg.size, PAGE_SIZE);
	req = cpu_to_le64(ureg.size);
	r = ism_map_cmd(ism, VIRTIO_ISM_CTRL_ALLOC, &req, sizeof(req),
			VIRTIO_ISM_ALLOC_REPLY_HDR_SIZE, want, &token);
	if (IS_ERR(r))
		return PTR_ERR(r);
	r->token = token;
	r->flags = VIRTIO_ISM_REGION_F_WRITE | VIRTIO_ISM_REGION_F_OWNER;
	mutex_lock(&ism->regions_lock);
	ism_track(ism, r, f);
	ureg.token = token;
	ureg.size = r->size;
	ureg.map_offset = r->map_key;
	ureg.flags = ism_user_flags(r, f);
	mutex_unlock(&ism->regions_lock);
	ureg.perm = 0;
	return copy_to_user(arg, &ureg, sizeof(ureg)) ? -EFAULT : 0;
}

static long ism_ioc_attach(struct ism_file *f, struct virtio_ism_region __user *arg)
{
	struct ism_dev *ism = f->ism;
	struct virtio_ism_region ureg;
	struct ism_region *r;
	u8 req[VIRTIO_ISM_ATTACH_REQ_SIZE] = {};
	u64 token;
	long ret = 0;

	if (copy_from_user(&ureg, arg, sizeof(ureg)))
		return -EFAULT;
	if (ureg.perm & ~(u32)(VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE))
		return -EINVAL;
	token = ureg.token;

	/* A region the driver already holds: take a kept one, refuse a busy one. */
	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, token);
	if (r) {
		if (r->holder && r->holder != f)
			ret = -EBUSY;
		else if ((ureg.perm & VIRTIO_ISM_PERM_WRITE) && !(r->flags & VIRTIO_ISM_REGION_F_WRITE))
			ret = -EROFS;
		else
			r->holder = f;
	}
	mutex_unlock(&ism->regions_lock);
	if (ret)
		return ret;

	if (!r) {
		put_unaligned_le64(token, req);
		put_unaligned_le32(ureg.perm, req + 8);
		r = ism_map_cmd(ism, VIRTIO_ISM_CTRL_ATTACH, req, sizeof(req),
				VIRTIO_ISM_ATTACH_REPLY_HDR_SIZE, 0, &token);
		if (IS_ERR(r))
			return PTR_ERR(r);
		r->token = token;
		if (ism->features & VIRTIO_ISM_INFO_F_QUERY) {
			struct ism_region *q = ism_query_region(ism, token);

			if (!IS_ERR(q)) {
				r->flags = q->flags & VIRTIO_ISM_REGION_F_WRITE;
				kfree(q);
			}
		} else if (ureg.perm != VIRTIO_ISM_PERM_READ) {
			/* Without QUERY the mapping is writable iff WRITE was granted; assume so. */
			r->flags = VIRTIO_ISM_REGION_F_WRITE;
		}
		mutex_lock(&ism->regions_lock);
		ism_track(ism, r, f);
	} else {
		mutex_lock(&ism->regions_lock);
		r = ism_find(ism, token);
		if (!r || r->holder != f) {
			mutex_unlock(&ism->regions_lock);
			return -ENOENT;
		}
	}
	ureg.size = r->size;
	ureg.map_offset = r->map_key;
	ureg.flags = ism_user_flags(r, f);
	mutex_unlock(&ism->regions_lock);
	return copy_to_user(arg, &ureg, sizeof(ureg)) ? -EFAULT : 0;
}

static long ism_ioc_detach(struct ism_file *f, u64 token)
{
	struct ism_dev *ism = f->ism;
	struct ism_region *r;

	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, token);
	if (!r || r->holder != f) {
		mutex_unlock(&ism->regions_lock);
		return -ENOENT;
	}
	list_del(&r->node);
	mutex_unlock(&ism->regions_lock);
	/* Unmap from every process before the device may reuse the chunks. */
	ism_zap(ism, r);
	ism_detach_on_device(ism, token);
	kfree(r);
	return 0;
}

static long ism_ioc_grant(struct ism_file *f, struct virtio_ism_grant __user *arg)
{
	struct virtio_ism_grant g;
	__le64 req[3];

	if (copy_from_user(&g, arg, sizeof(g)))
		return -EFAULT;
	if (g.perms & ~ISM_PERM_ALL)
		return -EINVAL;
	req[0] = cpu_to_le64(g.token);
	req[1] = cpu_to_le64(g.perms);
	req[2] = cpu_to_le64(g.peer_devid);
	if (!g.peer_devid)
		return ism_ctrl_simple(f->ism, VIRTIO_ISM_CTRL_GRANT,
				       VIRTIO_ISM_CTRL_GRANT_SET_DEFAULT, req, 16);
	return ism_ctrl_simple(f->ism, VIRTIO_ISM_CTRL_GRANT,
			       VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE, req, 24);
}

/* Bind kicks of a region this file holds to the config vector (0), or unbind. */
static long ism_ioc_bind(struct ism_file *f, u64 token, bool bind)
{
	struct ism_dev *ism = f->ism;
	struct ism_region *r;
	__le64 req[2];
	long ret;

	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, token);
	ret = (!r || r->holder != f) ? -ENOENT : 0;
	mutex_unlock(&ism->regions_lock);
	if (ret)
		return ret;
	req[0] = cpu_to_le64(token);
	req[1] = cpu_to_le64(bind ? 0 : VIRTIO_ISM_MSI_NO_VECTOR);
	ret = ism_ctrl_simple(ism, VIRTIO_ISM_CTRL_EVENT_VECTOR,
			      VIRTIO_ISM_CTRL_EVENT_VECTOR_SET, req, sizeof(req));
	if (ret)
		return ret;
	mutex_lock(&ism->regions_lock);
	r = ism_find(ism, token);
	if (r && bind)
		r->flags |= VIRTIO_ISM_REGION_F_BOUND;
	else if (r)
		r->flags &= ~VIRTIO_ISM_REGION_F_BOUND;
	mutex_unlock(&ism->regions_lock);
	return 0;
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
	struct virtio_ism_area *areas = NULL;
	struct ism_region *r;
	u32 n = 0;

	if (copy_from_user(&info, arg, sizeof(info)))
		return -EFAULT;
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
		info.flags = ism_user_flags(r, f);
		info.nr_areas = r->nr_areas;
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
	info.reserved = 0;
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
	};
	struct ism_region *r;

	mutex_lock(&ism->regions_lock);
	list_for_each_entry(r, &ism->regions, node)
		info.nr_regions++;
	mutex_unlock(&ism->regions_lock);
	return copy_to_user(arg, &info, sizeof(info)) ? -EFAULT : 0;
}

static long ism_ioc_counters(struct ism_file *f, struct virtio_ism_counters __user *arg)
{
	struct ism_dev *ism = f->ism;
	struct virtio_ism_counters c = {
		.ctrl_commands = atomic64_read(&ism->ctrl_commands),
		.ctrl_errors = atomic64_read(&ism->ctrl_errors),
		.ctrl_timeouts = atomic64_read(&ism->ctrl_timeouts),
		.bad_replies = atomic64_read(&ism->bad_replies),
		.kicks_sent = atomic64_read(&ism->kicks_sent),
		.kick_irqs = atomic64_read(&ism->kick_irqs),
		.events = atomic64_read(&ism->events),
		.events_lost = atomic64_read(&ism->events_lost),
	};

	return copy_to_user(arg, &c, sizeof(c)) ? -EFAULT : 0;
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
		r->holder = NULL;
	mutex_unlock(&ism->regions_lock);
	/* Mappings of this file stay; new ones need the region back (ATTACH). */
	return ret;
}

static long ism_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct ism_file *f = file->private_data;
	struct ism_dev *ism = f->ism;
	void __user *uarg = (void __user *)arg;
	u64 token = 0;
	long ret;

	switch (cmd) {
	case VIRTIO_ISM_IOC_DETACH:
	case VIRTIO_ISM_IOC_BIND:
	case VIRTIO_ISM_IOC_UNBIND:
	case VIRTIO_ISM_IOC_KICK:
	case VIRTIO_ISM_IOC_KEEP:
		if (copy_from_user(&token, uarg, sizeof(token)))
			return -EFAULT;
		break;
	default:
		break;
	}
	/* Kicks are the data path: they never wait behind a control command. */
	if (cmd == VIRTIO_ISM_IOC_KICK)
		return ism_ioc_kick(f, token);

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
		ret = ism_ioc_detach(f, token);
		break;
	case VIRTIO_ISM_IOC_GRANT:
		ret = ism_ioc_grant(f, uarg);
		break;
	case VIRTIO_ISM_IOC_BIND:
	case VIRTIO_ISM_IOC_UNBIND:
		ret = ism_ioc_bind(f, token, cmd == VIRTIO_ISM_IOC_BIND);
		break;
	case VIRTIO_ISM_IOC_REGION_INFO:
		ret = ism_ioc_region_info(f, uarg);
		break;
	case VIRTIO_ISM_IOC_LIST:
		ret = ism_ioc_list(f, uarg);
		break;
	case VIRTIO_ISM_IOC_COUNTERS:
		ret = ism_ioc_counters(f, uarg);
		break;
	case VIRTIO_ISM_IOC_KEEP:
		ret = ism_ioc_keep(f, token);
		break;
	default:
		ret = -ENOTTY;
		break;
	}
	mutex_unlock(&ism->ctrl_lock);
	return ret;
}

/*
 * mmap(offset = map_offset of a region this file holds): its areas back to back.
 * Read-only regions cannot be mapped writable, now or later (VM_MAYWRITE off).
 * The memory is host RAM shared between VMs, so it is mapped cached, like the
 * kernel's own memremap(MEMREMAP_WB) of the window.
 */
static int ism_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct ism_file *f = file->private_data;
	struct ism_dev *ism = f->ism;
	u64 key = (u64)vma->vm_pgoff << PAGE_SHIFT;
	unsigned long len = vma->vm_end - vma->vm_start, addr = vma->vm_start;
	struct ism_region *r;
	int ret = 0;
	u32 i;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	mutex_lock(&ism->regions_lock);
	r = NULL;
	if (!ism->gone) {
		list_for_each_entry(r, &ism->regions, node)
			if (r->map_key == key && r->holder == f)
				break;
		if (list_entry_is_head(r, &ism->regions, node))
			r = NULL;
	}
	if (!r) {
		ret = ism->gone ? -ENODEV : -ENOENT;
		goto out;
	}
	if (len > PAGE_ALIGN(r->size)) {
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
		unsigned long chunk = min_t(u64, len, r->areas[i].size);

		ret = remap_pfn_range(vma, addr, PHYS_PFN(ism->shm.addr + r->areas[i].offset),
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

/* ---- probe / remove ------------------------------------------------------- */

static u64 ism_cread64(struct virtio_device *vdev, unsigned int off)
{
	__le64 v;

	virtio_cread_bytes(vdev, off, &v, sizeof(v));
	return le64_to_cpu(v);
}

static int ism_read_config(struct ism_dev *ism)
{
	struct device *dev = &ism->vdev->dev;
	u64 slots;

	ism->gid = ism_cread64(ism->vdev, VIRTIO_ISM_CFG_GID);
	ism->devid = ism_cread64(ism->vdev, VIRTIO_ISM_CFG_DEVID);
	ism->chunk_size = ism_cread64(ism->vdev, VIRTIO_ISM_CFG_CHUNK_SIZE);
	ism->notify_size = ism_cread64(ism->vdev, VIRTIO_ISM_CFG_NOTIFY_SIZE);

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
	vq_callback_t *callbacks[2] = { ism_ctrl_vq_done, ism_event_vq_done };
	static const char * const names[2] = { "control", "events" };
	unsigned int nvqs = (ism->features & VIRTIO_ISM_INFO_F_EVENT_QUEUE) ? 2 : 1;
	int ret;

	ret = virtio_find_vqs(ism->vdev, nvqs, vqs, callbacks, names, NULL);
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
	ism->event_bufs = kcalloc(ISM_EVENT_BUFS, VIRTIO_ISM_EVENT_SIZE, GFP_KERNEL);
	if (!ism->event_bufs)
		return -ENOMEM;
	for (i = 0; i < ISM_EVENT_BUFS; i++) {
		ret = ism_post_event_buf(ism, ism->event_bufs + i * VIRTIO_ISM_EVENT_SIZE);
		if (ret)
			return ret;
	}
	virtqueue_kick(ism->event_vq);
	return 0;
}

static int ism_probe(struct virtio_device *vdev)
{
	struct ism_dev *ism;
	int ret;

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
	spin_lock_init(&ism->files_lock);
	init_waitqueue_head(&ism->wq);
	INIT_WORK(&ism->event_work, ism_event_work);

	if (virtio_has_feature(vdev, VIRTIO_ISM_F_EVENT_QUEUE))
		ism->features |= VIRTIO_ISM_INFO_F_EVENT_QUEUE;
	if (virtio_has_feature(vdev, VIRTIO_ISM_F_QUERY))
		ism->features |= VIRTIO_ISM_INFO_F_QUERY;

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

	ism->instance = ida_alloc(&ism_ida, GFP_KERNEL);
	if (ism->instance < 0) {
		ret = ism->instance;
		goto err_reset;
	}
	snprintf(ism->name, sizeof(ism->name), "ism%d", ism->instance);
	ism->misc.minor = MISC_DYNAMIC_MINOR;
	ism->misc.name = ism->name;
	ism->misc.fops = &ism_fops;
	ism->misc.parent = &vdev->dev;
	ret = misc_register(&ism->misc);
	if (ret)
		goto err_ida;
	ism->misc_registered = true;
	dev_info(&vdev->dev, "/dev/%s: gid %llu devid %llu chunk %llu window %llu MiB%s%s\n",
		 ism->name, ism->gid, ism->devid, ism->chunk_size, ism->shm.len >> 20,
		 ism->event_vq ? " events" : "",
		 (ism->features & VIRTIO_ISM_INFO_F_QUERY) ? " query" : "");
	return 0;

err_ida:
	ida_free(&ism_ida, ism->instance);
err_reset:
	virtio_reset_device(vdev);
	cancel_work_sync(&ism->event_work);
	vdev->config->del_vqs(vdev);
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

	misc_deregister(&ism->misc);
	mutex_lock(&ism->ctrl_lock);
	mutex_lock(&ism->regions_lock);
	ism->gone = true;
	mutex_unlock(&ism->regions_lock);
	mutex_unlock(&ism->ctrl_lock);
	wake_up_all(&ism->wq);

	/* Reset drops every region on the device side; no process may keep a mapping. */
	if (ism->mapping)
		unmap_mapping_range(ism->mapping, 0, 0, 1);
	virtio_reset_device(vdev);
	cancel_work_sync(&ism->event_work);
	vdev->config->del_vqs(vdev);

	mutex_lock(&ism->regions_lock);
	list_for_each_entry_safe(r, tmp, &ism->regions, node) {
		list_del(&r->node);
		kfree(r);
	}
	mutex_unlock(&ism->regions_lock);
	iounmap(ism->notify_base);
	memunmap(ism->shm_base);
	ida_free(&ism_ida, ism->instance);
	kref_put(&ism->ref, ism_free);
}

static unsigned int ism_features[] = {
	VIRTIO_ISM_F_EVENT_QUEUE,
	VIRTIO_ISM_F_QUERY,
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
	.probe = ism_probe,
	.remove = ism_remove,
	.config_changed = ism_config_changed,
};

module_virtio_driver(ism_driver);

MODULE_DESCRIPTION("virtio-ism inter-VM shared memory driver");
MODULE_LICENSE("GPL");
