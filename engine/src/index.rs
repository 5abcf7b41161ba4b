//! In-memory index: per partition, key digest → record location, in 20-byte slots.
//!
//! Keys are identified by an 80-bit fingerprint of xxh3-128 (64 bits used as the hash-table hash,
//! 16 more stored as a check), so the index size does not depend on key length. Two distinct keys
//! of one partition share a fingerprint with probability about n²/2⁸¹ (≈ 6·10⁻¹⁶ for 40,000 keys in
//! a partition); the full key is compared on every read, so such a collision shows as a missing key,
//! never as another key's value.
//!
//! A slot packs the location into one u64: segment slot (15 bits), offset in 8-byte units (27 bits,
//! segments up to 1 GiB) and record length in 8-byte units (22 bits, records up to 32 MiB), plus a
//! 15-bit digest of the value (for anti-entropy) and a tombstone flag. Slots are stored as u32
//! pairs so the entry needs 4-byte alignment only: three of them and a 4-byte count fill a 64-byte
//! line of the partition's table (`table`), so 21⅓ bytes and the table's free space are the whole
//! per-key cost.
//!
//! Tombstones stay in the index until compaction proves no older record of the key survives in any
//! segment; a get of a tombstoned key answers "absent" without IO.
//!
//! Each partition also keeps the bytes of the live (not tombstone) records its entries point at,
//! kept up to date by every change of an entry, so the cluster can tell how much data a partition
//! holds (what moving it would copy) without walking the table.

use rustc_hash::FxHashMap;

use crate::record::RECORD_ALIGN;

mod table;

/// How many entries ahead of its lookup a walk over hint entries (compaction's, recovery's) asks
/// for an entry's index line: enough lookups in flight to cover a miss's latency, few enough that
/// the lines are still cached when their turn comes.
pub(crate) const PREFETCH_AHEAD: usize = 8;

/// Most segments the index can address.
pub const SEGMENT_SLOTS_MAX: usize = 1 << 15;
const OFFSET_BITS: u32 = 27;
const LEN_BITS: u32 = 22;
const SLOT_BITS: u32 = 15;
const _: () = assert!(OFFSET_BITS + LEN_BITS + SLOT_BITS == 64);
const _: () =
    assert!((1u64 << OFFSET_BITS) * RECORD_ALIGN as u64 >= crate::config::SEGMENT_BYTES_MAX_HARD);
const _: () = assert!((1usize << LEN_BITS) * RECORD_ALIGN >= crate::record::RECORD_BYTES_MAX);
const _: () = assert!(std::mem::size_of::<Slot>() == 20);
const _: () = assert!(std::mem::align_of::<Slot>() == 4);

/// Fingerprint of a key: the table hash plus a 16-bit check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyHash {
    /// 64-bit digest, also the hash-table hash.
    pub digest: u64,
    /// 16 more bits to tell apart keys whose digests collide.
    pub check: u16,
}

impl KeyHash {
    /// Fingerprints a key.
    pub fn of(key: &[u8]) -> Self {
        let h = xxhash_rust::xxh3::xxh3_128(key);
        Self {
            digest: h as u64,
            check: (h >> 112) as u16,
        }
    }
}

/// 15-bit digest of a value, stored in the index for anti-entropy comparisons.
pub fn value_digest(value: &[u8]) -> u16 {
    (xxhash_rust::xxh3::xxh3_64(value) as u16) & 0x7fff
}

/// Where a record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Segment slot (index into the engine's segment table).
    pub slot: u16,
    /// Byte offset of the record in the segment (multiple of 8).
    pub offset: u64,
    /// Padded record length in bytes (multiple of 8).
    pub len: u32,
}

impl Location {
    fn pack(self) -> u64 {
        assert!((self.slot as usize) < SEGMENT_SLOTS_MAX);
        assert!(self.offset.is_multiple_of(RECORD_ALIGN as u64));
        assert!((self.len as usize).is_multiple_of(RECORD_ALIGN));
        let off = self.offset / RECORD_ALIGN as u64;
        let len = self.len as u64 / RECORD_ALIGN as u64;
        assert!(off < 1 << OFFSET_BITS);
        assert!(len < 1 << LEN_BITS);
        (self.slot as u64) << (OFFSET_BITS + LEN_BITS) | off << LEN_BITS | len
    }

    fn unpack(p: u64) -> Self {
        Self {
            slot: (p >> (OFFSET_BITS + LEN_BITS)) as u16,
            offset: ((p >> LEN_BITS) & ((1 << OFFSET_BITS) - 1)) * RECORD_ALIGN as u64,
            len: ((p & ((1 << LEN_BITS) - 1)) * RECORD_ALIGN as u64) as u32,
        }
    }
}

/// What the index knows about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Where the newest record of the key lives.
    pub loc: Location,
    /// The newest record is a tombstone.
    pub tombstone: bool,
    /// 15-bit digest of the value (0 for tombstones).
    pub version: u16,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    digest: [u32; 2],
    loc: [u32; 2],
    check: u16,
    meta: u16,
}

const TOMBSTONE_BIT: u16 = 0x8000;

impl Slot {
    /// A free slot of the index's table: no entry packs its location to zero, because a record
    /// is never empty.
    const EMPTY: Slot = Slot {
        digest: [0; 2],
        loc: [0; 2],
        check: 0,
        meta: 0,
    };

    fn is_free(&self) -> bool {
        self.loc == [0; 2]
    }

    fn digest(&self) -> u64 {
        join(self.digest)
    }
    fn entry(&self) -> Entry {
        Entry {
            loc: Location::unpack(join(self.loc)),
            tombstone: self.meta & TOMBSTONE_BIT != 0,
            version: self.meta & !TOMBSTONE_BIT,
        }
    }
    fn new(kh: KeyHash, e: Entry) -> Self {
        assert!(e.version & TOMBSTONE_BIT == 0);
        assert!(e.loc.len > 0, "a record is never empty");
        Self {
            digest: split(kh.digest),
            loc: split(e.loc.pack()),
            check: kh.check,
            meta: e.version | if e.tombstone { TOMBSTONE_BIT } else { 0 },
        }
    }
}

fn split(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}
fn join(v: [u32; 2]) -> u64 {
    v[0] as u64 | (v[1] as u64) << 32
}

/// Bytes an entry charges to its partition's live bytes: its record's, unless it is a tombstone
/// (nothing reads or copies a tombstone's record).
fn live_len(e: Entry) -> u64 {
    if e.tombstone { 0 } else { u64::from(e.loc.len) }
}

/// One partition's entries.
#[derive(Default)]
struct Part {
    table: table::Table,
    /// Sum of [`live_len`] over `table`.
    live_bytes: u64,
}

impl Part {
    /// Moves the live bytes from `old` (if any) to `new` (if any).
    fn account(&mut self, old: Option<Entry>, new: Option<Entry>) {
        let old = old.map_or(0, live_len);
        assert!(
            self.live_bytes >= old,
            "live bytes below a record still counted"
        );
        self.live_bytes = self.live_bytes - old + new.map_or(0, live_len);
    }
}

/// Index of all partitions of one engine.
#[derive(Default)]
pub struct Index {
    /// Looked up by every key operation, twice for each record compaction reads, so found by a
    /// hash of the id: a search of an ordered map of a shard's 256 partitions was 2% of a
    /// pipelined SET's CPU. Walks visit partitions in id order ([`Index::ids`]), so anything that
    /// walks the index is deterministic.
    parts: FxHashMap<u32, Part>,
    /// Entries with the tombstone flag (compaction rewrites old segments when they pile up).
    tombstones: usize,
}

impl Index {
    /// Looks up a key.
    pub fn get(&self, partition: u32, kh: KeyHash) -> Option<Entry> {
        let t = &self.parts.get(&partition)?.table;
        t.find(kh.digest, kh.check).map(Slot::entry)
    }

    /// Hands `hint` the (address, bytes) of the line a coming [`get`](Self::get) or
    /// [`upsert`](Self::upsert) of the key reads first, for it to ask the CPU to load it
    /// (`crate::prefetch::range`). Waits for no memory but the partition map's and the partition
    /// table's headers, which a batch's other keys keep cached.
    pub fn prefetch(&self, partition: u32, kh: KeyHash, hint: &mut impl FnMut(*const u8, usize)) {
        if let Some(part) = self.parts.get(&partition) {
            part.table.prefetch(kh.digest, hint);
        }
    }

    /// [`prefetch`](Self::prefetch) of the key a hint entry names, if it names one (a put or a
    /// tombstone). The walks over hint entries (compaction's, recovery's) call it
    /// [`PREFETCH_AHEAD`] entries ahead of their lookups.
    pub(crate) fn prefetch_hinted(&self, e: &crate::hint::HintEntry) {
        if matches!(
            e.kind,
            crate::record::RecordKind::Put | crate::record::RecordKind::Tombstone
        ) {
            self.prefetch(e.partition, e.key, &mut crate::prefetch::range);
        }
    }

    /// Inserts or replaces a key's entry; returns the entry it replaced.
    pub fn upsert(&mut self, partition: u32, kh: KeyHash, e: Entry) -> Option<Entry> {
        let part = self.parts.entry(partition).or_default();
        let old = part.table.upsert(Slot::new(kh, e)).map(|s| s.entry());
        self.tombstones -= old.is_some_and(|o| o.tombstone) as usize;
        self.tombstones += e.tombstone as usize;
        part.account(old, Some(e));
        old
    }

    /// Replaces the entry only if it still points at `expected` (compaction moving a record while
    /// writers may have superseded it). Returns whether it did.
    pub fn replace_if(
        &mut self,
        partition: u32,
        kh: KeyHash,
        expected: Location,
        e: Entry,
    ) -> bool {
        let Some(part) = self.parts.get_mut(&partition) else {
            return false;
        };
        match part.table.find_mut(kh.digest, kh.check) {
            Some(s) if s.entry().loc == expected => {
                let old = s.entry();
                *s = Slot::new(kh, e);
                self.tombstones -= old.tombstone as usize;
                self.tombstones += e.tombstone as usize;
                part.account(Some(old), Some(e));
                true
            }
            _ => false,
        }
    }

    /// Removes the entry only if it still points at `expected`. Returns the removed entry.
    pub fn remove_if(&mut self, partition: u32, kh: KeyHash, expected: Location) -> Option<Entry> {
        let part = self.parts.get_mut(&partition)?;
        let old = part
            .table
            .remove_if(kh.digest, kh.check, |s| s.entry().loc == expected)?
            .entry();
        self.tombstones -= old.tombstone as usize;
        part.account(Some(old), None);
        Some(old)
    }

    /// Removes a whole partition, returning its table for accounting.
    pub fn drop_partition(&mut self, partition: u32) -> Vec<Entry> {
        let gone: Vec<Entry> = self
            .parts
            .remove(&partition)
            .map(|part| part.table.iter().map(Slot::entry).collect())
            .unwrap_or_default();
        self.tombstones -= gone.iter().filter(|e| e.tombstone).count();
        gone
    }

    /// Key digests and entries of one partition (unordered).
    pub fn partition_entries(&self, partition: u32) -> Vec<(KeyHash, Entry)> {
        let mut out = Vec::with_capacity(self.parts.get(&partition).map_or(0, |p| p.table.len()));
        self.for_each_in(partition, |kh, e| out.push((kh, e)));
        out
    }

    /// Partition ids in order.
    fn ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.parts.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Visits every entry of every partition, partition by partition in id order.
    pub fn for_each(&self, mut f: impl FnMut(u32, KeyHash, Entry)) {
        for p in self.ids() {
            self.for_each_in(p, |kh, e| f(p, kh, e));
        }
    }

    /// Visits every entry of one partition (unordered).
    pub fn for_each_in(&self, partition: u32, mut f: impl FnMut(KeyHash, Entry)) {
        if let Some(part) = self.parts.get(&partition) {
            for s in part.table.iter() {
                f(
                    KeyHash {
                        digest: s.digest(),
                        check: s.check,
                    },
                    s.entry(),
                );
            }
        }
    }

    /// Keeps the entries `keep` accepts, partition by partition in id order.
    pub fn retain(&mut self, mut keep: impl FnMut(u32, Entry) -> bool) {
        let mut removed_tombstones = 0;
        for p in self.ids() {
            let Some(part) = self.parts.get_mut(&p) else {
                continue;
            };
            let mut removed_live = 0;
            part.table.retain(|s| {
                let e = s.entry();
                let k = keep(p, e);
                removed_tombstones += (!k && e.tombstone) as usize;
                removed_live += if k { 0 } else { live_len(e) };
                k
            });
            assert!(part.live_bytes >= removed_live);
            part.live_bytes -= removed_live;
        }
        self.tombstones -= removed_tombstones;
    }

    /// Entries that are tombstones.
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    /// Number of entries (live keys plus tombstones).
    pub fn len(&self) -> usize {
        self.parts.values().map(|part| part.table.len()).sum()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes held by the index tables (what "index bytes per key" reports).
    pub fn heap_bytes(&self) -> usize {
        self.parts
            .values()
            .map(|part| part.table.allocation_size())
            .sum::<usize>()
            // The map's buckets (a power of two, at most 7/8 used), each with a control byte.
            + (self.parts.capacity() * 8 / 7).next_power_of_two()
                * (std::mem::size_of::<(u32, Part)>() + 1)
    }

    /// Partitions that currently have entries, in id order.
    pub fn partitions(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .parts
            .iter()
            .filter(|(_, part)| !part.table.is_empty())
            .map(|(&p, _)| p)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// `(partition, bytes)` for every partition with live records, in partition order: the bytes
    /// of the live records its entries point at (padded record lengths, key and headers
    /// included). Costs one step per partition, not per key.
    pub fn partition_live_bytes(&self) -> Vec<(u32, u64)> {
        let mut bytes: Vec<(u32, u64)> = self
            .parts
            .iter()
            .filter(|(_, part)| part.live_bytes > 0)
            .map(|(&p, part)| (p, part.live_bytes))
            .collect();
        bytes.sort_unstable();
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_packing_roundtrips_at_the_limits() {
        for loc in [
            Location {
                slot: 0,
                offset: 0,
                len: 8,
            },
            Location {
                slot: (SEGMENT_SLOTS_MAX - 1) as u16,
                offset: (1 << 30) - 8,
                len: (32 << 20) - 8,
            },
            Location {
                slot: 12345,
                offset: 4096 * 7 + 16,
                len: 1048,
            },
        ] {
            assert_eq!(Location::unpack(loc.pack()), loc);
        }
    }

    /// The prefetch hands over the line that holds the key's slot for the keys stored in their
    /// home line (most of them), and nothing for a partition the index does not have.
    #[test]
    fn prefetch_hints_the_slot_of_the_key() {
        let mut ix = Index::default();
        let entry = Entry {
            loc: Location {
                slot: 1,
                offset: 0,
                len: 8,
            },
            tombstone: false,
            version: 0,
        };
        for i in 0..1000u32 {
            ix.upsert(5, KeyHash::of(&i.to_le_bytes()), entry);
        }
        let mut covered = 0;
        for i in 0..1000u32 {
            let kh = KeyHash::of(&i.to_le_bytes());
            let slot =
                ix.parts[&5].table.find(kh.digest, kh.check).unwrap() as *const Slot as usize;
            let mut hinted = Vec::new();
            ix.prefetch(5, kh, &mut |at, len| hinted.push((at as usize, len)));
            assert_eq!(hinted.len(), 1, "{i}: {hinted:?}");
            covered += hinted
                .iter()
                .any(|&(at, len)| (at..at + len).contains(&slot)) as usize;
            let mut other = Vec::new();
            ix.prefetch(6, kh, &mut |at, len| other.push((at as usize, len)));
            assert!(other.is_empty(), "{other:?}");
        }
        // 1,000 keys fill 65% of 512 lines; about one in eight waits for a second line.
        assert!(covered >= 800, "{covered} of 1000 keys in the hinted line");
    }

    #[test]
    fn upsert_replace_and_remove_follow_locations() {
        let mut ix = Index::default();
        let kh = KeyHash::of(b"a");
        let e1 = Entry {
            loc: Location {
                slot: 1,
                offset: 8,
                len: 40,
            },
            tombstone: false,
            version: 3,
        };
        let e2 = Entry {
            loc: Location {
                slot: 2,
                offset: 16,
                len: 40,
            },
            tombstone: true,
            version: 0,
        };
        assert_eq!(ix.upsert(5, kh, e1), None);
        assert_eq!(ix.get(5, kh), Some(e1));
        assert_eq!(ix.get(6, kh), None);
        assert_eq!(ix.partition_live_bytes(), vec![(5, 40)]);
        // A compaction move that lost the race must not overwrite the newer entry.
        assert!(ix.replace_if(5, kh, e1.loc, e2));
        assert!(!ix.replace_if(5, kh, e1.loc, e1));
        assert_eq!(ix.get(5, kh), Some(e2));
        assert_eq!(ix.tombstones(), 1);
        // A tombstone's record is not live data.
        assert_eq!(ix.partition_live_bytes(), vec![]);
        assert_eq!(ix.remove_if(5, kh, e1.loc), None);
        assert_eq!(ix.remove_if(5, kh, e2.loc), Some(e2));
        assert!(ix.is_empty());
        assert_eq!(ix.tombstones(), 0);
    }

    /// Live bytes follow every change of an entry: a replaced value, a retain, a dropped
    /// partition; partitions stay apart.
    #[test]
    fn live_bytes_follow_entries() {
        let mut ix = Index::default();
        let entry = |offset: u64, len: u32| Entry {
            loc: Location {
                slot: 1,
                offset,
                len,
            },
            tombstone: false,
            version: 1,
        };
        let (a, b) = (KeyHash::of(b"a"), KeyHash::of(b"b"));
        ix.upsert(1, a, entry(0, 64));
        ix.upsert(1, b, entry(64, 128));
        ix.upsert(2, a, entry(192, 8));
        assert_eq!(ix.partition_live_bytes(), vec![(1, 192), (2, 8)]);
        // A new value of a key replaces its old record's bytes.
        ix.upsert(1, a, entry(200, 16));
        assert_eq!(ix.partition_live_bytes(), vec![(1, 144), (2, 8)]);
        ix.retain(|p, e| !(p == 1 && e.loc.len == 128));
        assert_eq!(ix.partition_live_bytes(), vec![(1, 16), (2, 8)]);
        ix.drop_partition(1);
        assert_eq!(ix.partition_live_bytes(), vec![(2, 8)]);
    }

    /// Every walk visits partitions in id order, whatever order they were made in: anything
    /// that walks the index stays deterministic.
    #[test]
    fn walks_visit_partitions_in_id_order() {
        let mut ix = Index::default();
        let ids = [300, 7, 1 << 31, 42, 0, (1 << 31) + 5, 65_535];
        for (i, &p) in ids.iter().enumerate() {
            for k in 0..3u32 {
                let e = Entry {
                    loc: Location {
                        slot: 1,
                        offset: 8 * u64::from(k),
                        len: 8 * (i as u32 + 1),
                    },
                    tombstone: false,
                    version: 0,
                };
                ix.upsert(p, KeyHash::of(&k.to_le_bytes()), e);
            }
        }
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        assert_eq!(ix.partitions(), sorted);
        let live: Vec<u32> = ix.partition_live_bytes().iter().map(|&(p, _)| p).collect();
        assert_eq!(live, sorted);
        let mut walked = Vec::new();
        ix.for_each(|p, _, _| walked.push(p));
        walked.dedup();
        assert_eq!(walked, sorted);
        let mut kept = Vec::new();
        ix.retain(|p, _| {
            kept.push(p);
            true
        });
        kept.dedup();
        assert_eq!(kept, sorted);
    }
}
