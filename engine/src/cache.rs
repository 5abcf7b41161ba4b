//! Bounded per-shard cache of values, so hot keys are served without disk reads.
//!
//! Entries are keyed by (partition, key fingerprint) and remember the record location they were
//! read from; a lookup only hits when the index still points at that location, so an update,
//! delete, drop or compaction move invalidates an entry without any explicit bookkeeping.
//! Eviction is CLOCK (second chance): a hit sets a reference bit, the hand evicts entries whose
//! bit is clear. The budget counts value bytes plus a fixed per-entry overhead.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::index::{KeyHash, Location};

/// Bookkeeping bytes charged per cached entry on top of the value.
const ENTRY_OVERHEAD_BYTES: usize = 96;

type Key = (u32, u64, u16);

struct Slot {
    loc: Location,
    value: Bytes,
    referenced: bool,
    generation: u64,
}

pub(crate) struct ValueCache {
    budget_bytes: usize,
    used_bytes: usize,
    map: HashMap<Key, Slot>,
    clock: VecDeque<(Key, u64)>,
    generation: u64,
}

impl ValueCache {
    pub(crate) fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            used_bytes: 0,
            map: HashMap::new(),
            clock: VecDeque::new(),
            generation: 0,
        }
    }

    fn key(partition: u32, kh: KeyHash) -> Key {
        (partition, kh.digest, kh.check)
    }

    pub(crate) fn get(&mut self, partition: u32, kh: KeyHash, loc: Location) -> Option<Bytes> {
        let k = Self::key(partition, kh);
        let slot = self.map.get_mut(&k)?;
        if slot.loc != loc {
            self.remove(k);
            return None;
        }
        slot.referenced = true;
        Some(slot.value.clone())
    }

    pub(crate) fn insert(&mut self, partition: u32, kh: KeyHash, loc: Location, value: Bytes) {
        let cost = value.len() + ENTRY_OVERHEAD_BYTES;
        if cost > self.budget_bytes / 8 {
            return; // one value must not wipe out a large share of the cache
        }
        let k = Self::key(partition, kh);
        if let Some(slot) = self.map.get_mut(&k) {
            // A key cached already (most writes of a hot key) keeps its slot and its place in
            // the clock, so overwrites leave no stale clock entries behind, unless it grows
            // past the room left.
            let old = slot.value.len();
            if self.used_bytes - old + value.len() <= self.budget_bytes {
                self.used_bytes = self.used_bytes - old + value.len();
                slot.loc = loc;
                slot.value = value;
                slot.referenced = true;
                return;
            }
        }
        self.remove(k);
        while self.used_bytes + cost > self.budget_bytes {
            if !self.evict_one() {
                break;
            }
        }
        self.generation += 1;
        self.used_bytes += cost;
        self.map.insert(
            k,
            Slot {
                loc,
                value,
                referenced: false,
                generation: self.generation,
            },
        );
        self.clock.push_back((k, self.generation));
        // Stale clock entries (removed or replaced slots) are skipped lazily; keep them bounded.
        if self.clock.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.clock
                .retain(|(k, g)| map.get(k).is_some_and(|s| s.generation == *g));
        }
    }

    /// A write of a key: keep a cached entry current, forget it when the key was deleted, and
    /// admit a key not cached yet while the cache has room. A write never evicts: a write-heavy
    /// load must not push out what reads brought in, but a data set that fits the budget is
    /// cached as it is written, not only once each key has been read from disk.
    pub(crate) fn refresh(
        &mut self,
        partition: u32,
        kh: KeyHash,
        loc: Location,
        value: Option<&[u8]>,
    ) {
        let k = Self::key(partition, kh);
        let cached = self.map.contains_key(&k);
        match value {
            Some(v) if cached || self.has_room_for(v.len()) => {
                self.insert(partition, kh, loc, Bytes::copy_from_slice(v));
            }
            Some(_) => {}
            None if cached => self.remove(k),
            None => {}
        }
    }

    /// Whether a value of `len` bytes fits without evicting anything.
    fn has_room_for(&self, len: usize) -> bool {
        self.used_bytes + len + ENTRY_OVERHEAD_BYTES <= self.budget_bytes
    }

    pub(crate) fn drop_partition(&mut self, partition: u32) {
        let gone: Vec<Key> = self
            .map
            .keys()
            .filter(|k| k.0 == partition)
            .copied()
            .collect();
        for k in gone {
            self.remove(k);
        }
    }

    fn remove(&mut self, k: Key) {
        if let Some(s) = self.map.remove(&k) {
            self.used_bytes -= s.value.len() + ENTRY_OVERHEAD_BYTES;
        }
    }

    fn evict_one(&mut self) -> bool {
        while let Some((k, g)) = self.clock.pop_front() {
            match self.map.get_mut(&k) {
                Some(s) if s.generation == g => {
                    if s.referenced {
                        s.referenced = false;
                        self.clock.push_back((k, g));
                    } else {
                        self.remove(k);
                        return true;
                    }
                }
                _ => {}
            }
        }
        false
    }

    pub(crate) fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(o: u64) -> Location {
        Location {
            slot: 0,
            offset: o * 8,
            len: 8,
        }
    }

    /// Overwriting a cached key updates its slot: the clock keeps one entry for it, the value
    /// and location are the new ones, and the bytes are counted once.
    #[test]
    fn overwrites_keep_one_clock_entry() {
        let mut c = ValueCache::new(8 * (ENTRY_OVERHEAD_BYTES + 100));
        let kh = KeyHash {
            digest: 7,
            check: 1,
        };
        for i in 0..10_000u64 {
            c.insert(0, kh, loc(i), Bytes::from(vec![(i % 256) as u8; 100]));
        }
        assert_eq!(c.clock.len(), 1);
        assert_eq!(c.used_bytes(), ENTRY_OVERHEAD_BYTES + 100);
        assert!(c.get(0, kh, loc(9_998)).is_none(), "the old location");
        c.insert(0, kh, loc(1), Bytes::from(vec![3u8; 50]));
        assert_eq!(c.get(0, kh, loc(1)), Some(Bytes::from(vec![3u8; 50])));
        assert_eq!(c.used_bytes(), ENTRY_OVERHEAD_BYTES + 50);
    }

    #[test]
    fn stays_within_budget_and_invalidates_by_location() {
        let mut c = ValueCache::new(8 * (ENTRY_OVERHEAD_BYTES + 100));
        for i in 0..100u64 {
            c.insert(
                0,
                KeyHash {
                    digest: i,
                    check: 0,
                },
                loc(i),
                Bytes::from(vec![0u8; 100]),
            );
            assert!(c.used_bytes() <= 8 * (ENTRY_OVERHEAD_BYTES + 100));
        }
        assert_eq!(c.len(), 8);
        let kh = KeyHash {
            digest: 99,
            check: 0,
        };
        assert!(c.get(0, kh, loc(99)).is_some());
        // The index moved on: the entry must not be served.
        assert!(c.get(0, kh, loc(100)).is_none());
        assert!(c.get(0, kh, loc(99)).is_none());
    }

    #[test]
    fn writes_fill_free_room_and_never_evict() {
        let kh = |digest| KeyHash { digest, check: 0 };
        let mut c = ValueCache::new(16 * (ENTRY_OVERHEAD_BYTES + 100));
        // Read-admitted keys fill half the budget.
        for i in 0..8 {
            c.insert(0, kh(i), loc(i), Bytes::from(vec![1u8; 100]));
        }
        // Writes of new keys take the free room, then are not admitted.
        for i in 100..120 {
            c.refresh(0, kh(i), loc(i), Some(&[2u8; 100]));
        }
        assert_eq!(c.len(), 16);
        for i in 0..8 {
            assert!(c.get(0, kh(i), loc(i)).is_some(), "read-admitted key {i}");
        }
        assert!(c.get(0, kh(107), loc(107)).is_some());
        assert!(c.get(0, kh(108), loc(108)).is_none());
        // A write of a cached key keeps it current; a deletion forgets it.
        c.refresh(0, kh(1), loc(21), Some(&[3u8; 100]));
        assert_eq!(c.get(0, kh(1), loc(21)).as_deref(), Some(&[3u8; 100][..]));
        c.refresh(0, kh(1), loc(22), None);
        assert!(c.get(0, kh(1), loc(21)).is_none());
        assert_eq!(c.len(), 15);
    }
}
