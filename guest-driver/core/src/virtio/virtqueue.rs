// SPDX-License-Identifier: Apache-2.0
//! The driver side of a split virtqueue (virtio 1.2, 2.7).
//!
//! The descriptor table, available ring and used ring live in one DMA region. Which
//! descriptors are free and how chains are linked is kept privately, never read back from
//! memory the device can write, and every used element is checked against what was offered.

use core::sync::atomic::{Ordering, fence};

use crate::platform::{DmaRegion, Platform};

/// Largest queue this driver builds (its bookkeeping is fixed-size).
pub const MAX_QUEUE_SIZE: u16 = 256;
const DESC_SIZE: usize = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const USED_F_NO_NOTIFY: u16 = 1;
const NONE: u16 = u16::MAX;

/// Errors of the split virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// Queue sizes must be powers of two up to [`MAX_QUEUE_SIZE`].
    #[error("Queue size {0} is not a power of two up to 256")]
    BadSize(u16),
    /// The platform could not provide DMA memory.
    #[error("No DMA memory for the queue")]
    NoMemory,
    /// A chain needs at least one buffer.
    #[error("Empty buffer chain")]
    EmptyChain,
    /// A buffer of zero length.
    #[error("Zero-length buffer")]
    ZeroLength,
    /// Not enough free descriptors.
    #[error("Queue full: {needed} descriptors needed, {free} free")]
    Full {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: u16,
    },
    /// The device moved the used index by more than the queue size.
    #[error("Device used index jumped by {0}")]
    UsedIndexJump(u16),
    /// The device returned a head that is not a descriptor index.
    #[error("Device returned descriptor id {0} past the queue")]
    UsedIdOutOfRange(u32),
    /// The device returned a head that is not in flight.
    #[error("Device returned descriptor {0}, which is not in flight")]
    UsedIdNotInFlight(u32),
    /// The device claims to have written more than the writable buffers hold.
    #[error("Device wrote {len} bytes into {capacity} writable bytes")]
    UsedLenTooLarge {
        /// Reported length.
        len: u32,
        /// Writable capacity of the chain.
        capacity: u64,
    },
    /// An earlier device error left the queue unusable until the device is reset.
    #[error("Queue broken by an earlier device error")]
    Broken,
}

/// One buffer of a chain: guest-physical address, length and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// True if the device writes it (device-to-driver).
    pub device_writable: bool,
}

/// A completed chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index, as returned by [`SplitQueue::add`].
    pub head: u16,
    /// Bytes the device wrote, checked to be at most the chain's writable capacity.
    pub len: u32,
}

/// A split virtqueue, driver side.
pub struct SplitQueue {
    mem: DmaRegion,
    size: u16,
    avail_offset: usize,
    used_offset: usize,
    free_head: u16,
    num_free: u16,
    next_avail: u16,
    last_used: u16,
    broken: bool,
    /// Private copy of each descriptor's `next` link.
    next: [u16; MAX_QUEUE_SIZE as usize],
    /// For chain heads in flight: number of descriptors (0 = not a head in flight).
    chain_len: [u16; MAX_QUEUE_SIZE as usize],
    /// For chain heads in flight: bytes the device may write.
    writable: [u64; MAX_QUEUE_SIZE as usize],
}

impl SplitQueue {
    /// Bytes of DMA memory a queue of `size` entries needs (descriptor table, available ring
    /// and 4-aligned used ring).
    pub fn memory_size(size: u16) -> usize {
        let n = usize::from(size);
        let avail_end = n * DESC_SIZE + 6 + 2 * n;
        avail_end.next_multiple_of(4) + 6 + 8 * n
    }

    /// Allocate a queue of `size` entries from the platform's DMA memory.
    pub fn new<P: Platform>(platform: &P, size: u16) -> Result<Self, QueueError> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(QueueError::BadSize(size));
        }
        let mem = platform
            .dma_alloc(Self::memory_size(size), 4096)
            .ok_or(QueueError::NoMemory)?;
        Self::with_memory(mem, size)
    }

    /// Build a queue of `size` entries in `mem` (zeroed, 16-byte aligned, at least
    /// [`SplitQueue::memory_size`] bytes).
    pub fn with_memory(mem: DmaRegion, size: u16) -> Result<Self, QueueError> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(QueueError::BadSize(size));
        }
        if mem.len() < Self::memory_size(size) || !mem.phys().is_multiple_of(16) {
            return Err(QueueError::NoMemory);
        }
        let n = usize::from(size);
        let avail_offset = n * DESC_SIZE;
        let used_offset = (avail_offset + 6 + 2 * n).next_multiple_of(4);
        let mut next = [NONE; MAX_QUEUE_SIZE as usize];
        for (i, link) in next.iter_mut().enumerate().take(n - 1) {
            *link = (i + 1) as u16;
        }
        Ok(Self {
            mem,
            size,
            avail_offset,
            used_offset,
            free_head: 0,
            num_free: size,
            next_avail: 0,
            last_used: 0,
            broken: false,
            next,
            chain_len: [0; MAX_QUEUE_SIZE as usize],
            writable: [0; MAX_QUEUE_SIZE as usize],
        })
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        let base = self.mem.phys();
        (
            base,
            base + self.avail_offset as u64,
            base + self.used_offset as u64,
        )
    }

    /// Offer a chain of buffers to the device and publish it in the available ring. Returns
    /// the head descriptor index, which [`SplitQueue::pop_used`] reports when it completes.
    pub fn add(&mut self, buffers: &[Buffer]) -> Result<u16, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        if buffers.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        if buffers.len() > usize::from(self.num_free) {
            return Err(QueueError::Full {
                needed: buffers.len(),
                free: self.num_free,
            });
        }
        if buffers.iter().any(|b| b.len == 0) {
            return Err(QueueError::ZeroLength);
        }
        let head = self.free_head;
        let mut index = head;
        let mut writable = 0u64;
        for (i, buffer) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let mut flags = 0;
            if buffer.device_writable {
                flags |= DESC_F_WRITE;
                writable += u64::from(buffer.len);
            }
            let next = self.next[usize::from(index)];
            if !last {
                flags |= DESC_F_NEXT;
            }
            let d = usize::from(index) * DESC_SIZE;
            self.mem.write_u64(d, buffer.addr);
            self.mem.write_u32(d + 8, buffer.len);
            self.mem.write_u16(d + 12, flags);
            self.mem.write_u16(d + 14, if last { 0 } else { next });
            if last {
                self.free_head = next;
            } else {
                index = next;
            }
        }
        self.num_free -= buffers.len() as u16;
        self.chain_len[usize::from(head)] = buffers.len() as u16;
        self.writable[usize::from(head)] = writable;

        let slot = usize::from(self.next_avail % self.size);
        self.mem.write_u16(self.avail_offset + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        // The descriptors and ring entry must be visible before the index that publishes them.
        fence(Ordering::SeqCst);
        self.mem.write_u16(self.avail_offset + 2, self.next_avail);
        fence(Ordering::SeqCst);
        Ok(head)
    }

    /// Whether the device wants a notification for new buffers (it may suppress them).
    pub fn should_notify(&self) -> bool {
        self.mem.read_u16(self.used_offset) & USED_F_NO_NOTIFY == 0
    }

    /// Chains offered and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    /// Take the next completed chain, if any, after checking it: the id must be a chain head
    /// in flight and the length at most its writable capacity. A device that breaks these
    /// rules leaves the queue [`QueueError::Broken`] until it is rebuilt.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        let used_idx = self.mem.read_u16(self.used_offset + 2);
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.in_flight() {
            self.broken = true;
            return Err(QueueError::UsedIndexJump(pending));
        }
        // Read the element only after seeing the index that published it.
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used % self.size);
        let elem = self.used_offset + 4 + 8 * slot;
        let id = self.mem.read_u32(elem);
        let len = self.mem.read_u32(elem + 4);
        if id >= u32::from(self.size) {
            self.broken = true;
            return Err(QueueError::UsedIdOutOfRange(id));
        }
        let head = id as u16;
        let count = self.chain_len[usize::from(head)];
        if count == 0 {
            self.broken = true;
            return Err(QueueError::UsedIdNotInFlight(id));
        }
        let capacity = self.writable[usize::from(head)];
        if u64::from(len) > capacity {
            self.broken = true;
            return Err(QueueError::UsedLenTooLarge { len, capacity });
        }
        self.free_chain(head, count);
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(UsedElem { head, len }))
    }

    fn free_chain(&mut self, head: u16, count: u16) {
        let mut tail = head;
        for _ in 1..count {
            tail = self.next[usize::from(tail)];
        }
        self.next[usize::from(tail)] = self.free_head;
        self.free_head = head;
        self.num_free += count;
        self.chain_len[usize::from(head)] = 0;
        self.writable[usize::from(head)] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeQueueDevice, host_dma};

    fn queue(size: u16) -> (SplitQueue, FakeQueueDevice) {
        let q =
            SplitQueue::with_memory(host_dma(SplitQueue::memory_size(size), 4096), size).unwrap();
        let dev = FakeQueueDevice::new(size, q.addresses());
        (q, dev)
    }

    fn writable(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr,
            len,
            device_writable: true,
        }
    }

    #[test]
    fn test_add_publishes_chain_the_device_can_walk() {
        let (mut q, mut dev) = queue(8);
        let out = Buffer {
            addr: 0x1000,
            len: 12,
            device_writable: false,
        };
        let head = q.add(&[out, writable(0x2000, 64)]).unwrap();
        assert_eq!(q.num_free(), 6);
        let (dev_head, chain) = dev.pop().unwrap();
        assert_eq!(dev_head, head);
        assert_eq!(chain.len(), 2);
        assert_eq!(
            (chain[0].addr, chain[0].len, chain[0].flags),
            (0x1000, 12, 1)
        );
        assert_eq!(
            (chain[1].addr, chain[1].len, chain[1].flags),
            (0x2000, 64, 2)
        );
        assert!(dev.pop().is_none());
    }

    #[test]
    fn test_pop_used_returns_completion_and_frees_descriptors() {
        let (mut q, mut dev) = queue(4);
        let head = q.add(&[writable(0x2000, 64)]).unwrap();
        assert_eq!(q.pop_used().unwrap(), None);
        let (h, _) = dev.pop().unwrap();
        dev.push_used(h.into(), 10);
        assert_eq!(q.pop_used().unwrap(), Some(UsedElem { head, len: 10 }));
        assert_eq!(q.num_free(), 4);
        assert_eq!(q.pop_used().unwrap(), None);
    }

    #[test]
    fn test_queue_wraps_many_times_out_of_order() {
        let (mut q, mut dev) = queue(4);
        for round in 0..1000u32 {
            let a = q.add(&[writable(0x1000, 8), writable(0x2000, 8)]).unwrap();
            let b = q.add(&[writable(0x3000, 4)]).unwrap();
            let (ha, _) = dev.pop().unwrap();
            let (hb, _) = dev.pop().unwrap();
            // Complete in reverse order.
            dev.push_used(hb.into(), 4);
            dev.push_used(ha.into(), round % 17);
            assert_eq!(q.pop_used().unwrap(), Some(UsedElem { head: b, len: 4 }));
            assert_eq!(
                q.pop_used().unwrap(),
                Some(UsedElem {
                    head: a,
                    len: round % 17
                })
            );
            assert_eq!(q.num_free(), 4);
        }
    }

    #[test]
    fn test_add_rejects_full_queue_and_bad_chains() {
        let (mut q, _dev) = queue(2);
        assert_eq!(q.add(&[]), Err(QueueError::EmptyChain));
        assert_eq!(q.add(&[writable(0x1000, 0)]), Err(QueueError::ZeroLength));
        q.add(&[writable(0x1000, 1), writable(0x1000, 1)]).unwrap();
        assert_eq!(
            q.add(&[writable(0x1000, 1)]),
            Err(QueueError::Full { needed: 1, free: 0 })
        );
    }

    #[test]
    fn test_bad_sizes_are_refused() {
        for size in [0u16, 3, 512] {
            assert_eq!(
                SplitQueue::with_memory(host_dma(65536, 4096), size).err(),
                Some(QueueError::BadSize(size))
            );
        }
        assert_eq!(
            SplitQueue::with_memory(host_dma(16, 4096), 8).err(),
            Some(QueueError::NoMemory)
        );
    }

    #[test]
    fn test_used_id_out_of_range_breaks_queue() {
        let (mut q, mut dev) = queue(4);
        q.add(&[writable(0x1000, 8)]).unwrap();
        dev.pop().unwrap();
        dev.push_used(4, 0);
        assert_eq!(q.pop_used(), Err(QueueError::UsedIdOutOfRange(4)));
        assert_eq!(q.pop_used(), Err(QueueError::Broken));
        assert_eq!(q.add(&[writable(0x1000, 8)]), Err(QueueError::Broken));
    }

    #[test]
    fn test_used_id_not_in_flight_is_refused() {
        let (mut q, mut dev) = queue(4);
        let head = q.add(&[writable(0x1000, 8), writable(0x1000, 8)]).unwrap();
        dev.pop().unwrap();
        // Descriptor head + 1 is part of the chain but not its head.
        dev.push_used(u32::from(head) + 1, 0);
        assert_eq!(
            q.pop_used(),
            Err(QueueError::UsedIdNotInFlight(u32::from(head) + 1))
        );
    }

    #[test]
    fn test_used_id_returned_twice_is_refused() {
        let (mut q, mut dev) = queue(4);
        let head = q.add(&[writable(0x1000, 8)]).unwrap();
        q.add(&[writable(0x1000, 8)]).unwrap();
        dev.pop().unwrap();
        dev.push_used(head.into(), 1);
        dev.push_used(head.into(), 1);
        assert!(q.pop_used().unwrap().is_some());
        assert_eq!(
            q.pop_used(),
            Err(QueueError::UsedIdNotInFlight(head.into()))
        );
    }

    #[test]
    fn test_used_len_beyond_writable_capacity_is_refused() {
        let (mut q, mut dev) = queue(4);
        let out = Buffer {
            addr: 0x1000,
            len: 100,
            device_writable: false,
        };
        let head = q.add(&[out, writable(0x2000, 16)]).unwrap();
        dev.pop().unwrap();
        dev.push_used(head.into(), 17);
        assert_eq!(
            q.pop_used(),
            Err(QueueError::UsedLenTooLarge {
                len: 17,
                capacity: 16
            })
        );
    }

    #[test]
    fn test_used_index_jump_is_refused() {
        let (mut q, dev) = queue(8);
        q.add(&[writable(0x1000, 8)]).unwrap();
        dev.set_used_idx(5);
        assert_eq!(q.pop_used(), Err(QueueError::UsedIndexJump(5)));
    }

    #[test]
    fn test_device_rewriting_descriptors_does_not_corrupt_free_list() {
        let (mut q, mut dev) = queue(4);
        let head = q.add(&[writable(0x1000, 8), writable(0x2000, 8)]).unwrap();
        dev.pop().unwrap();
        // The device scribbles over the descriptor table's next fields.
        let (desc, _, _) = q.addresses();
        for i in 0..4u64 {
            // SAFETY: the table is a live host_dma allocation of 4 descriptors.
            unsafe { ((desc + 16 * i + 14) as *mut u16).write_volatile(3) };
        }
        dev.push_used(head.into(), 16);
        assert_eq!(q.pop_used().unwrap().unwrap().head, head);
        assert_eq!(q.num_free(), 4);
        // All four descriptors are distinct and usable again.
        let h = q
            .add(&[
                writable(0x1, 1),
                writable(0x2, 1),
                writable(0x3, 1),
                writable(0x4, 1),
            ])
            .unwrap();
        let (_, chain) = dev.pop().unwrap();
        assert_eq!(chain.len(), 4);
        let _ = h;
    }
}
