//! Bounded per-shard cache of values, so hot keys are served without disk reads.
//!
//! Entries are keyed by (partition, key fingerprint) and remember the location of the record
//! their value is; a lookup only hits when the index still points at that location, so an entry
//! that missed a change of its key is never served. Writes keep entries current (`refresh`),
//! a partition drop removes its entries, and compaction carries an entry to the copy of its
//! record (`relocate`), which holds the same value.
//! Eviction is CLOCK (second chance): a hit sets a reference bit, the hand evicts entries whose
//! bit is clear. The budget counts value bytes plus a fixed per-entry overhead.

use std::collections::VecDeque;

use bytes::Bytes;
use hashbrown::HashTable;

use crate::index::{KeyHash, Location};

/// Bookkeeping bytes charged per cached entry on top of the value.
const ENTRY_OVERHEAD_BYTES: usize = 96;

type Key = (u32, u64, u16);

/// Values up to this size are copied out of the cache on a hit, larger ones shared.
const COPY_BYTES_MAX: usize = 256;

/// A written value as the cache may keep it: the writer's own buffer when it hands one over,
/// kept as it is, or a slice, copied only if the cache keeps it.
pub(crate) enum Written<'a> {
    /// Borrowed from the writer.
    Slice(&'a [u8]),
    /// Handed over by the writer.
    Owned(Bytes),
}

impl Written<'static> {
    /// A value its writer hands over: a boxed slice gives back any spare capacity (none for an
    /// encoding sized in advance), so the cache's count of value bytes is what the buffer holds.
    pub(crate) fn handed_over(value: Vec<u8>) -> Self {
        Written::Owned(Bytes::from(value.into_boxed_slice()))
    }
}

impl Written<'_> {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Written::Slice(s) => s,
            Written::Owned(b) => b,
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Written::Slice(s) => Bytes::copy_from_slice(s),
            Written::Owned(b) => b,
        }
    }
}

/// A small value copied out of the cache on a hit ([`copy_out`]).
struct SmallCopy {
    len: u16,
    bytes: [u8; COPY_BYTES_MAX],
}

const _: () = assert!(COPY_BYTES_MAX <= u16::MAX as usize);

impl AsRef<[u8]> for SmallCopy {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// A copy of `value`, at most [`COPY_BYTES_MAX`] bytes, in one allocation with its count. A
/// `Bytes` made from a `Vec` allocates its count apart, when it is first cloned or sliced, which
/// a reader decoding the value does at once: two allocations per hit, and two frees. A buffer
/// shared by the copies of many hits would cost none, but one copy kept by a request waiting
/// out a silent replica would keep the whole buffer. Every copy takes a block of
/// `COPY_BYTES_MAX` bytes and a few more whatever its length, for as long as the read's answer
/// lives (`engine/tests/allocation.rs` checks the one allocation).
fn copy_out(value: &[u8]) -> Bytes {
    debug_assert!(
        value.len() <= COPY_BYTES_MAX,
        "only small values are copied"
    );
    let mut copy = SmallCopy {
        // Checked by the caller: at most `COPY_BYTES_MAX`, which fits 16 bits.
        len: value.len() as u16,
        bytes: [0; COPY_BYTES_MAX],
    };
    copy.bytes[..value.len()].copy_from_slice(value);
    Bytes::from_owner(copy)
}

struct Slot {
    key: Key,
    loc: Location,
    value: Bytes,
    referenced: bool,
    generation: u64,
}

pub(crate) struct ValueCache {
    budget_bytes: usize,
    used_bytes: usize,
    /// Found by the key's digest, which is already a hash of the key (xxh3): nothing is hashed
    /// again, as in the index (`index.rs`).
    map: HashTable<Slot>,
    clock: VecDeque<(Key, u64)>,
    generation: u64,
}

impl ValueCache {
    pub(crate) fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            used_bytes: 0,
            map: HashTable::new(),
            clock: VecDeque::new(),
            generation: 0,
        }
    }

    fn key(partition: u32, kh: KeyHash) -> Key {
        (partition, kh.digest, kh.check)
    }

    fn find_mut(&mut self, k: Key) -> Option<&mut Slot> {
        self.map.find_mut(k.1, |s| s.key == k)
    }

    /// Hands `hint` the (address, bytes) of each slot a coming lookup or refresh of the key
    /// compares, for it to ask the CPU to load them (`crate::prefetch::range`).
    pub(crate) fn prefetch(&self, kh: KeyHash, hint: &mut impl FnMut(*const u8, usize)) {
        for slot in self.map.iter_hash(kh.digest) {
            hint((slot as *const Slot).cast(), std::mem::size_of::<Slot>());
        }
    }

    /// Hands `hint` the value cached for the key, if its slot is found, with the word before
    /// it: a hit copies the value, and a write of the key frees its block, which reads the
    /// allocator's size of the block first. Best after [`prefetch`](Self::prefetch) of the
    /// key, when the slot has had time to arrive.
    pub(crate) fn prefetch_value(
        &self,
        partition: u32,
        kh: KeyHash,
        hint: &mut impl FnMut(*const u8, usize),
    ) {
        let k = Self::key(partition, kh);
        if let Some(slot) = self.map.find(k.1, |s| s.key == k) {
            hint(slot.value.as_ptr().wrapping_sub(8), slot.value.len() + 8);
        }
    }

    pub(crate) fn get(&mut self, partition: u32, kh: KeyHash, loc: Location) -> Option<Bytes> {
        let k = Self::key(partition, kh);
        let slot = self.find_mut(k)?;
        if slot.loc != loc {
            self.remove(k);
            return None;
        }
        slot.referenced = true;
        // A small value is copied rather than shared: sharing touches the count kept beside
        // the buffer, a cache miss of its own for a key not read lately, while the copy reads
        // the bytes the caller reads next anyway. Measured on GETs of 100-byte values: about 5%
        // less CPU per read (docs/BENCHMARKS.md, "Results: reads and writes served by the
        // shard itself").
        Some(if slot.value.len() <= COPY_BYTES_MAX {
            copy_out(&slot.value)
        } else {
            slot.value.clone()
        })
    }

    pub(crate) fn insert(&mut self, partition: u32, kh: KeyHash, loc: Location, value: Bytes) {
        if self.admissible(value.len()) {
            let len = value.len();
            self.place(Self::key(partition, kh), loc, len, || value, true);
        }
    }

    /// Compaction copied the record at `from` to `to`, and the index points at the copy now:
    /// a value cached from `from` is the copy's value, so it stays cached under its new place.
    /// Without this, every pass would drop the cached values of all the records it moves, and
    /// their next reads would go to the disk.
    pub(crate) fn relocate(&mut self, partition: u32, kh: KeyHash, from: Location, to: Location) {
        if let Some(slot) = self.find_mut(Self::key(partition, kh))
            && slot.loc == from
        {
            slot.loc = to;
        }
    }

    /// Whether a value of `len` bytes may be cached at all: one value must not wipe out a large
    /// share of the cache.
    fn admissible(&self, len: usize) -> bool {
        len + ENTRY_OVERHEAD_BYTES <= self.budget_bytes / 8
    }

    /// Caches `value` (`len` bytes) for `k`. A key cached already (most writes of a hot key)
    /// keeps its slot and its place in the clock when the new value fits the room left, so
    /// overwrites leave no stale clock entries behind; otherwise it is cached anew, evicting
    /// what it must. A key not cached yet is cached only if `admit_new`. One lookup when the
    /// key is cached and fits.
    fn place(
        &mut self,
        k: Key,
        loc: Location,
        len: usize,
        value: impl FnOnce() -> Bytes,
        admit_new: bool,
    ) {
        let (budget, used) = (self.budget_bytes, self.used_bytes);
        let cached = match self.find_mut(k) {
            Some(slot) => {
                let old = slot.value.len();
                if used - old + len <= budget {
                    slot.loc = loc;
                    slot.value = value();
                    slot.referenced = true;
                    self.used_bytes = used - old + len;
                    return;
                }
                true
            }
            None => false,
        };
        if cached || admit_new {
            self.remove(k);
            self.insert_new(k, loc, value());
        }
    }

    /// Caches `k`, which is not cached, evicting what it must.
    fn insert_new(&mut self, k: Key, loc: Location, value: Bytes) {
        let cost = value.len() + ENTRY_OVERHEAD_BYTES;
        while self.used_bytes + cost > self.budget_bytes {
            if !self.evict_one() {
                break;
            }
        }
        self.generation += 1;
        self.used_bytes += cost;
        self.map.insert_unique(
            k.1,
            Slot {
                key: k,
                loc,
                value,
                referenced: false,
                generation: self.generation,
            },
            |s| s.key.1,
        );
        self.clock.push_back((k, self.generation));
        // Stale clock entries (removed or replaced slots) are skipped lazily; keep them bounded.
        if self.clock.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.clock.retain(|(k, g)| {
                map.find(k.1, |s| s.key == *k)
                    .is_some_and(|s| s.generation == *g)
            });
        }
    }

    /// A write of a key: keep a cached entry current, forget it when the key was deleted (or
    /// its new value is too large to cache), and admit a key not cached yet while the cache has
    /// room. A write evicts only to make room for a cached key's grown value: a write-heavy load
    /// must not push out what reads brought in, but a data set that fits the budget is cached as
    /// it is written, not only once each key has been read from disk. A write of a cached key
    /// finds its slot once.
    pub(crate) fn refresh(
        &mut self,
        partition: u32,
        kh: KeyHash,
        loc: Location,
        value: Option<Written<'_>>,
    ) {
        let k = Self::key(partition, kh);
        match value {
            Some(v) if self.admissible(v.as_slice().len()) => {
                let len = v.as_slice().len();
                let room = self.has_room_for(len);
                self.place(k, loc, len, || v.into_bytes(), room);
            }
            // Too large to cache: a cached older value must not be served for it.
            Some(_) | None => self.remove(k),
        }
    }

    /// Whether a value of `len` bytes fits without evicting anything.
    fn has_room_for(&self, len: usize) -> bool {
        self.used_bytes + len + ENTRY_OVERHEAD_BYTES <= self.budget_bytes
    }

    pub(crate) fn drop_partition(&mut self, partition: u32) {
        let mut freed = 0;
        self.map.retain(|s| {
            let keep = s.key.0 != partition;
            if !keep {
                freed += s.value.len() + ENTRY_OVERHEAD_BYTES;
            }
            keep
        });
        self.used_bytes -= freed;
    }

    fn remove(&mut self, k: Key) {
        if let Ok(o) = self.map.find_entry(k.1, |s| s.key == k) {
            let (s, _) = o.remove();
            self.used_bytes -= s.value.len() + ENTRY_OVERHEAD_BYTES;
        }
    }

    fn evict_one(&mut self) -> bool {
        while let Some((k, g)) = self.clock.pop_front() {
            match self.find_mut(k) {
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

    /// A relocated entry is a hit at its new location only, and only an entry cached from the
    /// location the record moved from follows it: one cached from another location (a newer
    /// write the move did not see) stays where it is.
    #[test]
    fn relocation_follows_only_the_moved_location() {
        let mut c = ValueCache::new(1 << 20);
        let kh = KeyHash {
            digest: 7,
            check: 1,
        };
        c.insert(0, kh, loc(1), Bytes::from_static(b"v"));
        c.relocate(0, kh, loc(1), loc(5));
        assert_eq!(c.get(0, kh, loc(5)), Some(Bytes::from_static(b"v")));
        c.relocate(0, kh, loc(2), loc(9));
        c.relocate(1, kh, loc(5), loc(9));
        assert_eq!(c.get(0, kh, loc(5)), Some(Bytes::from_static(b"v")));
        assert_eq!(c.len(), 1);
        assert!(
            c.get(0, kh, loc(1)).is_none(),
            "the old location no longer hits"
        );
        assert_eq!(c.len(), 0, "and a miss at a stale location drops the entry");
    }

    /// The prefetch hands over the slot of a cached key (one of the ranges holds it) and, for
    /// its value, the value's bytes and the word before them; a key not cached hands over no
    /// value.
    #[test]
    fn prefetch_hints_the_slot_and_the_value_of_the_key() {
        let mut c = ValueCache::new(1 << 20);
        let kh = |digest: u64| KeyHash {
            digest: digest.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            check: 1,
        };
        for i in 0..500u64 {
            c.insert(3, kh(i), loc(i), Bytes::from(vec![i as u8; 100]));
        }
        for i in (0..500u64).step_by(11) {
            let k = ValueCache::key(3, kh(i));
            let slot = c.map.find(k.1, |s| s.key == k).unwrap();
            let (slot_at, value_at) = (slot as *const Slot as usize, slot.value.as_ptr() as usize);
            let mut hinted = Vec::new();
            c.prefetch(kh(i), &mut |at, len| hinted.push((at as usize, len)));
            assert!(
                hinted
                    .iter()
                    .any(|&(at, len)| at == slot_at && len == std::mem::size_of::<Slot>()),
                "{i}: {hinted:?}"
            );
            let mut values = Vec::new();
            c.prefetch_value(3, kh(i), &mut |at, len| values.push((at as usize, len)));
            assert_eq!(values, vec![(value_at - 8, 108)], "{i}");
        }
        let mut none = Vec::new();
        c.prefetch_value(4, kh(1), &mut |at, len| none.push((at as usize, len)));
        assert!(none.is_empty(), "another partition's key: {none:?}");
    }

    /// Hits of small values (the largest included) are copies, not the cached buffer: each
    /// equal to what was cached, sliced as a decoder slices it, and unchanged when the cached
    /// value changes. A larger value is shared.
    #[test]
    fn hits_are_copies_of_small_values() {
        let kh = |digest| KeyHash { digest, check: 0 };
        let value = |i: u64| {
            let len = match i {
                0 => 0,
                1 => 1,
                2 => COPY_BYTES_MAX,
                _ => COPY_BYTES_MAX - (i % 7) as usize * 30,
            };
            Bytes::from(
                (0..len)
                    .map(|j| (i as usize * 31 + j) as u8)
                    .collect::<Vec<_>>(),
            )
        };
        let keys = 64u64;
        let mut c = ValueCache::new(1 << 20);
        for i in 0..keys {
            c.insert(0, kh(i), loc(i), value(i));
        }
        let rounds = 3;
        let mut hits = Vec::new();
        for _ in 0..rounds {
            for i in 0..keys {
                hits.push((i, c.get(0, kh(i), loc(i)).expect("cached")));
            }
        }
        for i in 0..keys {
            c.insert(0, kh(i), loc(i), Bytes::from(vec![0xee; 10]));
        }
        for (i, hit) in &hits {
            assert_eq!(hit, &value(*i), "hit of key {i}");
            // A slice of a copy (a decoder's) sees the same bytes.
            let from = hit.len().min(1);
            assert_eq!(hit.slice(from..), value(*i).slice(from..));
        }
        let cached = value(2);
        c.insert(0, kh(2), loc(2), cached.clone());
        let hit = c.get(0, kh(2), loc(2)).expect("cached");
        assert_eq!(hit, cached);
        assert_ne!(hit.as_ptr(), cached.as_ptr(), "a small value is copied");
        let large = Bytes::from(vec![9u8; COPY_BYTES_MAX + 1]);
        c.insert(0, kh(1000), loc(1000), large.clone());
        let hit = c.get(0, kh(1000), loc(1000)).expect("cached");
        assert_eq!(hit.as_ptr(), large.as_ptr(), "a large value is shared");
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
            c.refresh(0, kh(i), loc(i), Some(Written::Slice(&[2u8; 100])));
        }
        assert_eq!(c.len(), 16);
        for i in 0..8 {
            assert!(c.get(0, kh(i), loc(i)).is_some(), "read-admitted key {i}");
        }
        assert!(c.get(0, kh(107), loc(107)).is_some());
        assert!(c.get(0, kh(108), loc(108)).is_none());
        // A write of a cached key keeps it current; a deletion forgets it.
        c.refresh(0, kh(1), loc(21), Some(Written::Slice(&[3u8; 100])));
        assert_eq!(c.get(0, kh(1), loc(21)).as_deref(), Some(&[3u8; 100][..]));
        c.refresh(0, kh(1), loc(22), None);
        assert!(c.get(0, kh(1), loc(21)).is_none());
        assert_eq!(c.len(), 15);
    }

    /// A write too large to cache forgets the key's older value, and dropping a partition
    /// gives back the bytes of its entries only.
    #[test]
    fn oversized_writes_and_dropped_partitions_free_their_bytes() {
        let kh = |digest| KeyHash { digest, check: 0 };
        let mut c = ValueCache::new(16 * (ENTRY_OVERHEAD_BYTES + 100));
        c.refresh(0, kh(1), loc(1), Some(Written::Slice(&[1u8; 100])));
        c.refresh(1, kh(2), loc(2), Some(Written::Slice(&[2u8; 100])));
        assert_eq!(c.used_bytes(), 2 * (ENTRY_OVERHEAD_BYTES + 100));
        let huge = vec![3u8; 16 * 100];
        c.refresh(0, kh(1), loc(3), Some(Written::Slice(&huge)));
        assert!(c.get(0, kh(1), loc(3)).is_none());
        assert_eq!(c.len(), 1);
        assert_eq!(c.used_bytes(), ENTRY_OVERHEAD_BYTES + 100);
        c.refresh(0, kh(4), loc(4), Some(Written::Slice(&[4u8; 50])));
        c.drop_partition(0);
        assert_eq!(c.used_bytes(), ENTRY_OVERHEAD_BYTES + 100);
        assert_eq!(c.get(1, kh(2), loc(2)).as_deref(), Some(&[2u8; 100][..]));
    }
}
