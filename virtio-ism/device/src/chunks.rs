// SPDX-License-Identifier: Apache-2.0
//! Which chunk slots of shmid 1 are free, and which region owns each used one.

use std::collections::BTreeMap;

use virtio_ism_pool_api::Token;

/// A run of consecutive chunk slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub first: u64,
    pub count: u64,
}

/// Free-slot bitmap plus an index from each used run to its region.
pub struct ChunkMap {
    /// Bit set = slot free.
    free: Vec<u64>,
    chunks: u64,
    free_count: u64,
    /// First slot of each used run -> (run length, owning region).
    used: BTreeMap<u64, (u64, Token)>,
}

impl ChunkMap {
    pub fn new(chunks: u64) -> Self {
        let words = chunks.div_ceil(64) as usize;
        let mut free = vec![u64::MAX; words];
        let tail = chunks % 64;
        if tail != 0
            && let Some(last) = free.last_mut()
        {
            *last = (1u64 << tail) - 1;
        }
        Self {
            free,
            chunks,
            free_count: chunks,
            used: BTreeMap::new(),
        }
    }

    pub fn free_count(&self) -> u64 {
        self.free_count
    }

    fn is_free(&self, slot: u64) -> bool {
        self.free[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    fn set_free(&mut self, slot: u64, free: bool) {
        let word = &mut self.free[(slot / 64) as usize];
        if free {
            *word |= 1 << (slot % 64);
        } else {
            *word &= !(1 << (slot % 64));
        }
    }

    /// Free runs in slot order.
    fn free_runs(&self) -> impl Iterator<Item = Extent> + '_ {
        let mut slot = 0u64;
        std::iter::from_fn(move || {
            while slot < self.chunks {
                if self.free[(slot / 64) as usize] == 0 {
                    slot = (slot / 64 + 1) * 64;
                    continue;
                }
                if !self.is_free(slot) {
                    slot += 1;
                    continue;
                }
                let first = slot;
                while slot < self.chunks && self.is_free(slot) {
                    slot += 1;
                }
                return Some(Extent {
                    first,
                    count: slot - first,
                });
            }
            None
        })
    }

    /// Choose slots for `count` chunks without taking them: the first run long enough, or
    /// else the first free runs in slot order. None if fewer than `count` slots are free.
    pub fn plan(&self, count: u64) -> Option<Vec<Extent>> {
        if count == 0 || count > self.free_count {
            return None;
        }
        if let Some(run) = self.free_runs().find(|run| run.count >= count) {
            return Some(vec![Extent {
                first: run.first,
                count,
            }]);
        }
        let mut plan = Vec::new();
        let mut missing = count;
        for run in self.free_runs() {
            let take = run.count.min(missing);
            plan.push(Extent {
                first: run.first,
                count: take,
            });
            missing -= take;
            if missing == 0 {
                break;
            }
        }
        Some(plan)
    }

    /// Take the slots of a plan for `token`. The plan must come from `plan` with no change
    /// in between.
    pub fn commit(&mut self, plan: &[Extent], token: Token) {
        for extent in plan {
            for slot in extent.first..extent.first + extent.count {
                debug_assert!(self.is_free(slot));
                self.set_free(slot, false);
            }
            self.free_count -= extent.count;
            self.used.insert(extent.first, (extent.count, token));
        }
    }

    /// Give back the slots of a region.
    pub fn release(&mut self, extents: &[Extent]) {
        for extent in extents {
            if self.used.remove(&extent.first).is_none() {
                continue;
            }
            for slot in extent.first..extent.first + extent.count {
                self.set_free(slot, true);
            }
            self.free_count += extent.count;
        }
    }

    /// The region owning `slot`, if any.
    pub fn owner(&self, slot: u64) -> Option<Token> {
        let (first, (count, token)) = self.used.range(..=slot).next_back()?;
        (slot < first + count).then_some(*token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_plan_prefers_one_contiguous_run() {
        let mut map = ChunkMap::new(8);
        let a = map.plan(2).unwrap();
        map.commit(&a, Token(1));
        let b = map.plan(1).unwrap();
        map.commit(&b, Token(2));
        map.release(&a);
        // Slots 0,1 free, 2 used, 3..8 free: a 3-chunk request fits contiguously at 3.
        assert_eq!(map.plan(3).unwrap(), vec![Extent { first: 3, count: 3 }]);
        // 7 chunks cannot be contiguous: scattered over the free runs in order.
        assert_eq!(
            map.plan(7).unwrap(),
            vec![Extent { first: 0, count: 2 }, Extent { first: 3, count: 5 }]
        );
        assert_eq!(map.plan(8), None);
        assert_eq!(map.owner(2), Some(Token(2)));
        assert_eq!(map.owner(0), None);
        assert_eq!(map.free_count(), 7);
    }

    #[test]
    fn test_bitmap_tail_and_word_skip() {
        let mut map = ChunkMap::new(130);
        let all = map.plan(130).unwrap();
        assert_eq!(
            all,
            vec![Extent {
                first: 0,
                count: 130
            }]
        );
        map.commit(&all, Token(9));
        assert_eq!(map.plan(1), None);
        assert_eq!(map.owner(129), Some(Token(9)));
        assert_eq!(map.owner(130), None);
        map.release(&all);
        assert_eq!(map.free_count(), 130);
        let first = map.plan(100).unwrap();
        map.commit(&first, Token(1));
        assert_eq!(
            map.plan(30).unwrap(),
            vec![Extent {
                first: 100,
                count: 30
            }]
        );
    }
}
