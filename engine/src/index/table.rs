//! The index's hash table: 64-byte lines of three slots, so that the line a key's lookup reads
//! first follows from its digest alone.
//!
//! Why not a general-purpose table (hashbrown's SwissTable was used here before): a SwissTable
//! lookup reads a group of control bytes, then the slot those bytes point at. That is two cache
//! misses per key, and the second address is known only once the first has arrived. The index's
//! lookups come in batches (a pipelined round, compaction's hint entries) and each asks for its
//! slot ahead of use, so that request itself waited out the control group's miss: in a profile of
//! pipelined SETs the prefetches were 8.7% of the node's CPU. Here a prefetch computes the home
//! line's address and waits for nothing, and a lookup reads that one line in most cases.
//!
//! Layout and probing:
//! - A line holds three 20-byte [`Slot`]s and a 4-byte overflow count; a slot whose location is
//!   zero is free (a record is never empty, so no entry packs to zero).
//! - A key's probe sequence is its home line (low bits of the digest), then steps of an odd stride
//!   taken from the digest's high bits (double hashing: chains of neighbouring lines do not merge
//!   into clusters, as they do under linear probing). A key lives in the first line of its sequence
//!   that had a free slot when it was inserted.
//! - A line's overflow count is the number of keys stored past it whose probe sequence passes
//!   through it. A lookup stops at the first line with a count of zero, so a missing key usually
//!   costs one line too.
//! - Removing a key empties its slot and lowers the counts on its path. Nothing moves and nothing
//!   is left behind, so removals never lengthen later probes.
//!
//! Load: the table doubles before more than 7/8 of its slots are used (hashbrown's bound too),
//! 24 to 49 bytes per key. At 7/8 a hit reads about 1.5 lines on average and a miss about 2.2
//! (simulated; `probes_stay_short_at_the_highest_load` checks the hits).

use super::Slot;

/// Slots per line.
const WIDTH: usize = 3;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line {
    slots: [Slot; WIDTH],
    /// Keys stored past this line whose probe sequence passes through it.
    overflow: u32,
}

const _: () = assert!(std::mem::size_of::<Line>() == 64);

impl Line {
    const EMPTY: Line = Line {
        slots: [Slot::EMPTY; WIDTH],
        overflow: 0,
    };

    /// The position in this line of the key with `digest` and `check`, if it is here.
    fn position(&self, digest: u64, check: u16) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| !s.is_free() && s.digest() == digest && s.check == check)
    }
}

/// Lines of a key's probe sequence, home line first; visits every line once.
struct Probe {
    at: usize,
    stride: usize,
    mask: usize,
    left: usize,
}

impl Probe {
    fn new(digest: u64, lines: usize) -> Self {
        debug_assert!(lines.is_power_of_two());
        let mask = lines - 1;
        Self {
            at: digest as usize & mask,
            // Odd, so over a power-of-two count of lines it visits each line once.
            stride: ((digest >> 32) as usize | 1) & mask,
            mask,
            left: lines,
        }
    }
}

impl Iterator for Probe {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.at;
        self.at = (self.at + self.stride) & self.mask;
        Some(at)
    }
}

/// The entries of one partition (see the module doc).
#[derive(Default)]
pub(super) struct Table {
    /// A power of two of them, or none before the first insert.
    lines: Vec<Line>,
    len: usize,
}

impl Table {
    /// Number of entries.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes held.
    pub(super) fn allocation_size(&self) -> usize {
        self.lines.capacity() * std::mem::size_of::<Line>()
    }

    /// Where the key's slot is: (line, position in it).
    fn locate(&self, digest: u64, check: u16) -> Option<(usize, usize)> {
        self.probe(digest, check).0
    }

    /// [`locate`](Self::locate), with the number of lines it read (tests count them).
    #[inline(always)]
    fn probe(&self, digest: u64, check: u16) -> (Option<(usize, usize)>, usize) {
        let mut read = 0;
        if self.lines.is_empty() {
            return (None, read);
        }
        for at in Probe::new(digest, self.lines.len()) {
            read += 1;
            let line = &self.lines[at];
            if let Some(i) = line.position(digest, check) {
                return (Some((at, i)), read);
            }
            if line.overflow == 0 {
                return (None, read);
            }
        }
        (None, read)
    }

    pub(super) fn find(&self, digest: u64, check: u16) -> Option<&Slot> {
        let (at, i) = self.locate(digest, check)?;
        Some(&self.lines[at].slots[i])
    }

    pub(super) fn find_mut(&mut self, digest: u64, check: u16) -> Option<&mut Slot> {
        let (at, i) = self.locate(digest, check)?;
        Some(&mut self.lines[at].slots[i])
    }

    /// Hands `hint` the line a lookup of `digest` reads first. Reads nothing from the table.
    pub(super) fn prefetch(&self, digest: u64, hint: &mut impl FnMut(*const u8, usize)) {
        if !self.lines.is_empty() {
            let home = digest as usize & (self.lines.len() - 1);
            hint(
                (&self.lines[home] as *const Line).cast(),
                std::mem::size_of::<Line>(),
            );
        }
    }

    /// Stores `slot`, replacing the entry of the same key; returns the one it replaced.
    pub(super) fn upsert(&mut self, slot: Slot) -> Option<Slot> {
        assert!(!slot.is_free(), "an entry never packs to a free slot");
        if let Some(s) = self.find_mut(slot.digest(), slot.check) {
            return Some(std::mem::replace(s, slot));
        }
        if (self.len + 1) * 8 > self.lines.len() * WIDTH * 7 {
            self.grow();
        }
        self.place(slot);
        self.len += 1;
        None
    }

    /// Puts a key the table does not hold in the first line of its sequence with room.
    fn place(&mut self, slot: Slot) {
        let lines = self.lines.len();
        for at in Probe::new(slot.digest(), lines) {
            let line = &mut self.lines[at];
            if let Some(free) = line.slots.iter_mut().find(|s| s.is_free()) {
                *free = slot;
                return;
            }
            line.overflow += 1;
        }
        unreachable!("the load bound leaves a free slot in every table");
    }

    /// Doubles the lines and places every entry again.
    fn grow(&mut self) {
        let lines = (self.lines.len() * 2).max(1);
        let old = std::mem::replace(&mut self.lines, vec![Line::EMPTY; lines]);
        for line in &old {
            for s in line.slots.iter().filter(|s| !s.is_free()) {
                self.place(*s);
            }
        }
    }

    /// Empties the slot at (`at`, `i`) and lowers the counts of the lines its key passed.
    fn remove_at(&mut self, at: usize, i: usize) -> Slot {
        let slot = std::mem::replace(&mut self.lines[at].slots[i], Slot::EMPTY);
        assert!(!slot.is_free(), "removing a free slot");
        for passed in Probe::new(slot.digest(), self.lines.len()) {
            if passed == at {
                self.len -= 1;
                return slot;
            }
            let line = &mut self.lines[passed];
            assert!(
                line.overflow > 0,
                "a key stored past a line it did not count in"
            );
            line.overflow -= 1;
        }
        unreachable!("a key is stored on its own probe sequence");
    }

    /// Removes the key's entry if `pred` accepts it; returns the removed entry.
    pub(super) fn remove_if(
        &mut self,
        digest: u64,
        check: u16,
        pred: impl FnOnce(&Slot) -> bool,
    ) -> Option<Slot> {
        let (at, i) = self.locate(digest, check)?;
        if !pred(&self.lines[at].slots[i]) {
            return None;
        }
        Some(self.remove_at(at, i))
    }

    /// Every entry, in slot order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.lines
            .iter()
            .flat_map(|line| line.slots.iter())
            .filter(|s| !s.is_free())
    }

    /// Removes every entry `keep` rejects.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&Slot) -> bool) {
        for at in 0..self.lines.len() {
            for i in 0..WIDTH {
                let s = &self.lines[at].slots[i];
                if !s.is_free() && !keep(s) {
                    self.remove_at(at, i);
                }
            }
        }
    }

    /// Checks every count against the entries (tests).
    #[cfg(test)]
    fn check(&self) {
        let mut counts = vec![0u32; self.lines.len()];
        let mut len = 0;
        for (at, line) in self.lines.iter().enumerate() {
            for s in line.slots.iter().filter(|s| !s.is_free()) {
                len += 1;
                let path: Vec<usize> = Probe::new(s.digest(), self.lines.len())
                    .take_while(|&p| p != at)
                    .collect();
                assert!(path.len() < self.lines.len(), "a key off its sequence");
                // A line on the path may have room again since: removals move nothing.
                for p in path {
                    counts[p] += 1;
                }
            }
        }
        assert_eq!(len, self.len);
        let stored: Vec<u32> = self.lines.iter().map(|l| l.overflow).collect();
        assert_eq!(counts, stored);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::index::{Entry, KeyHash, Location};

    fn slot(key: u64, offset: u64) -> Slot {
        Slot::new(
            KeyHash::of(&key.to_le_bytes()),
            Entry {
                loc: Location {
                    slot: 1,
                    offset: offset * 8,
                    len: 8,
                },
                tombstone: false,
                version: 0,
            },
        )
    }

    #[derive(Clone, Debug)]
    enum Op {
        Upsert(u64, u64),
        Remove(u64),
        RemoveIfOffset(u64, u64),
        RetainOdd,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few keys, so that removals hit and lines fill, overflow and empty again.
        prop_oneof![
            6 => (0..200u64, 0..4u64).prop_map(|(k, o)| Op::Upsert(k, o)),
            3 => (0..200u64).prop_map(Op::Remove),
            1 => (0..200u64, 0..4u64).prop_map(|(k, o)| Op::RemoveIfOffset(k, o)),
            1 => Just(Op::RetainOdd),
        ]
    }

    proptest! {
        /// The table answers as a map does after any sequence of changes, and its overflow
        /// counts stay exact (a stale count would lengthen probes; a missing one loses keys).
        #[test]
        fn table_behaves_as_a_map(ops in proptest::collection::vec(op(), 1..400)) {
            let mut t = Table::default();
            let mut model: HashMap<u64, u64> = HashMap::new();
            let offset = |s: &Slot| s.entry().loc.offset / 8;
            for op in ops {
                match op {
                    Op::Upsert(k, o) => {
                        let old = t.upsert(slot(k, o)).map(|s| offset(&s));
                        prop_assert_eq!(old, model.insert(k, o));
                    }
                    Op::Remove(k) => {
                        let kh = KeyHash::of(&k.to_le_bytes());
                        let gone = t.remove_if(kh.digest, kh.check, |_| true).map(|s| offset(&s));
                        prop_assert_eq!(gone, model.remove(&k));
                    }
                    Op::RemoveIfOffset(k, o) => {
                        let kh = KeyHash::of(&k.to_le_bytes());
                        let gone = t
                            .remove_if(kh.digest, kh.check, |s| offset(s) == o)
                            .map(|s| offset(&s));
                        let expected = (model.get(&k) == Some(&o)).then(|| model.remove(&k));
                        prop_assert_eq!(gone, expected.flatten());
                    }
                    Op::RetainOdd => {
                        t.retain(|s| offset(s) % 2 == 1);
                        model.retain(|_, o| *o % 2 == 1);
                    }
                }
                t.check();
                prop_assert_eq!(t.len(), model.len());
            }
            for k in 0..200u64 {
                let kh = KeyHash::of(&k.to_le_bytes());
                prop_assert_eq!(t.find(kh.digest, kh.check).map(offset), model.get(&k).copied());
            }
            let mut all: Vec<u64> = t.iter().map(offset).collect();
            let mut expected: Vec<u64> = model.values().copied().collect();
            all.sort_unstable();
            expected.sort_unstable();
            prop_assert_eq!(all, expected);
        }
    }

    /// Filled to the load bound, hits read under two lines on average and misses under three: the
    /// stride spreads chains (a stride of one, linear probing by line, reads 2.0 and 8.3).
    #[test]
    fn probes_stay_short_at_the_highest_load() {
        let mut t = Table::default();
        let mut k = 0u64;
        // Fill until the next insert would double the table.
        loop {
            t.upsert(slot(k, 0));
            k += 1;
            if (t.len() + 1) * 8 > t.lines.len() * WIDTH * 7 && t.lines.len() >= 4096 {
                break;
            }
        }
        t.check();
        let read = |range: std::ops::Range<u64>| {
            let n = range.end - range.start;
            let total: usize = range
                .map(|k| {
                    let kh = KeyHash::of(&k.to_le_bytes());
                    t.probe(kh.digest, kh.check).1
                })
                .sum();
            total as f64 / n as f64
        };
        let hits = read(0..k);
        let misses = read(k..k + 10_000);
        assert!(hits < 1.7, "hits read {hits} lines");
        assert!(misses < 3.0, "misses read {misses} lines");
    }

    /// The table doubles when an insert would fill more than 7/8 of its slots, and not before:
    /// 8 lines hold 21 keys, the 22nd doubles them.
    #[test]
    fn the_table_doubles_past_seven_eighths() {
        let mut t = Table::default();
        let mut lines = Vec::new();
        for k in 0..43 {
            t.upsert(slot(k, k));
            lines.push(t.lines.len());
        }
        assert_eq!(lines[20], 8, "21 keys in 8 lines");
        assert_eq!(lines[21], 16, "the 22nd key doubles them");
        assert_eq!(lines[41], 16, "42 keys in 16 lines");
        assert_eq!(lines[42], 32);
    }

    #[test]
    fn prefetch_hints_the_home_line_only() {
        let mut t = Table::default();
        let mut hinted = Vec::new();
        t.prefetch(7, &mut |at, len| hinted.push((at as usize, len)));
        assert!(hinted.is_empty(), "an empty table has no lines");
        for k in 0..100 {
            t.upsert(slot(k, k));
        }
        let kh = KeyHash::of(&5u64.to_le_bytes());
        t.prefetch(kh.digest, &mut |at, len| hinted.push((at as usize, len)));
        let home = &t.lines[kh.digest as usize & (t.lines.len() - 1)] as *const Line as usize;
        assert_eq!(hinted, vec![(home, 64)]);
    }
}
