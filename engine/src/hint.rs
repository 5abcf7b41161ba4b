//! Hint files: a compact listing of a sealed segment's records, so restart rebuilds the index
//! without reading any value (the Bitcask idea).
//!
//! ```text
//! header (32 bytes): magic "RKHT" u32 | version u16 | zero u16 | segment id u64 |
//!                    created seqno u64 | data_len u32 | count u32
//! entries (32 bytes each, sorted by offset):
//!                    digest u64 | seqno u64 | partition u32 | offset u32 |
//!                    len u32 (low 28 bits) + kind (high 4 bits) | check u16 | value digest u16
//! trailer (4 bytes): CRC-32 over header and entries
//! ```
//!
//! `data_len` is the segment's length when the hint was written; a segment file shorter than that
//! (truncated behind our back) makes the hint unusable and recovery scans the segment instead. A
//! hint with a bad CRC is ignored the same way: hints are an optimisation, never the only copy.
//! Hint files are written once and never modified, which is what makes reading them through an
//! mmap at startup sound. Compaction reads them with IO instead, a piece at a time, and checks
//! them as they come ([`HintStream`]).

use crate::index::KeyHash;
use crate::record::{RecordKind, read_u16, read_u32, read_u64};

/// Bytes of the hint file header.
pub const HINT_HEADER_BYTES: usize = 32;
/// Bytes of one hint entry.
pub const HINT_ENTRY_BYTES: usize = 32;
const HINT_MAGIC: u32 = u32::from_le_bytes(*b"RKHT");
const HINT_VERSION: u16 = 1;
const LEN_MASK: u32 = (1 << 28) - 1;
const _: () = assert!(crate::record::RECORD_BYTES_MAX < LEN_MASK as usize);

/// One record as listed in a hint file (or produced by scanning a segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintEntry {
    /// Key fingerprint (zero for drop-partition and segment-header records).
    pub key: KeyHash,
    /// Sequence number of the record.
    pub seqno: u64,
    /// Partition of the record.
    pub partition: u32,
    /// Offset of the record in its segment.
    pub offset: u32,
    /// Padded length of the record.
    pub len: u32,
    /// Kind of the record.
    pub kind: RecordKind,
    /// 15-bit value digest (see [`crate::index::value_digest`]).
    pub version: u16,
}

impl HintEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.len <= LEN_MASK);
        out.extend_from_slice(&self.key.digest.to_le_bytes());
        out.extend_from_slice(&self.seqno.to_le_bytes());
        out.extend_from_slice(&self.partition.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&(self.len | (self.kind as u32) << 28).to_le_bytes());
        out.extend_from_slice(&self.key.check.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let len_kind = read_u32(b, 24);
        Some(Self {
            key: KeyHash {
                digest: read_u64(b, 0),
                check: read_u16(b, 28),
            },
            seqno: read_u64(b, 8),
            partition: read_u32(b, 16),
            offset: read_u32(b, 20),
            len: len_kind & LEN_MASK,
            kind: RecordKind::from_u8((len_kind >> 28) as u8)?,
            version: read_u16(b, 30),
        })
    }
}

/// What a hint file says about its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintHeader {
    /// Segment id.
    pub segment_id: u64,
    /// Seqno counter when the segment was created.
    pub created_seqno: u64,
    /// Valid length of the segment.
    pub data_len: u32,
    /// Number of entries.
    pub count: u32,
}

/// Encodes a complete hint file.
pub fn encode(h: HintHeader, entries: &[HintEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HINT_HEADER_BYTES + entries.len() * HINT_ENTRY_BYTES + 4);
    let mut enc = HintEncoder::new(h, &mut out);
    for e in entries {
        enc.entry(e, &mut out);
    }
    enc.finish(&mut out);
    out
}

/// Encodes a hint file piece by piece, so a large one can be written in chunks (the caller may
/// drain `out` between calls; the CRC runs over everything produced).
pub struct HintEncoder {
    crc: crc32fast::Hasher,
    remaining: u32,
}

impl HintEncoder {
    /// Starts a hint file: appends the header to `out`.
    pub fn new(h: HintHeader, out: &mut Vec<u8>) -> Self {
        let start = out.len();
        out.extend_from_slice(&HINT_MAGIC.to_le_bytes());
        out.extend_from_slice(&HINT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0u8; 2]);
        out.extend_from_slice(&h.segment_id.to_le_bytes());
        out.extend_from_slice(&h.created_seqno.to_le_bytes());
        out.extend_from_slice(&h.data_len.to_le_bytes());
        out.extend_from_slice(&h.count.to_le_bytes());
        debug_assert_eq!(out.len() - start, HINT_HEADER_BYTES);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out[start..]);
        Self {
            crc,
            remaining: h.count,
        }
    }

    /// Appends one entry to `out`.
    pub fn entry(&mut self, e: &HintEntry, out: &mut Vec<u8>) {
        assert!(self.remaining > 0, "more entries than the header announced");
        debug_assert!((e.offset as usize).is_multiple_of(crate::record::RECORD_ALIGN));
        self.remaining -= 1;
        let start = out.len();
        e.encode(out);
        self.crc.update(&out[start..]);
    }

    /// Appends the trailer (CRC) to `out`.
    pub fn finish(self, out: &mut Vec<u8>) {
        assert_eq!(self.remaining, 0, "fewer entries than the header announced");
        out.extend_from_slice(&self.crc.finalize().to_le_bytes());
    }
}

/// A validated view over hint-file bytes (an mmap at startup, or a vector built by scanning).
pub struct HintTable<B> {
    bytes: B,
    header: HintHeader,
}

/// The header of a hint file from its first [`HINT_HEADER_BYTES`], if they are one this
/// engine writes, and the length of header and entries (what the trailer's CRC covers).
fn header_of(b: &[u8]) -> Option<(HintHeader, usize)> {
    if read_u32(b, 0) != HINT_MAGIC || read_u16(b, 4) != HINT_VERSION {
        return None;
    }
    let header = HintHeader {
        segment_id: read_u64(b, 8),
        created_seqno: read_u64(b, 16),
        data_len: read_u32(b, 24),
        count: read_u32(b, 28),
    };
    // Everything the index will be built from must fit its packing; a hint with a valid CRC
    // but impossible fields (a bug, or a crafted file) is refused like a damaged one.
    if header.data_len as u64 > crate::config::SEGMENT_BYTES_MAX_HARD {
        return None;
    }
    let end =
        HINT_HEADER_BYTES.checked_add((header.count as usize).checked_mul(HINT_ENTRY_BYTES)?)?;
    Some((header, end))
}

/// Entry `b` of a hint of `header`, if it decodes, is possible, and starts at or past
/// `prev_end`, the end of the entry before it (entries are sorted by offset: binary search
/// relies on it); `prev_end` then moves past it.
fn entry_checked(b: &[u8], header: &HintHeader, prev_end: &mut u64) -> Option<HintEntry> {
    let e = HintEntry::decode(b)?;
    let align = crate::record::RECORD_ALIGN as u32;
    let plausible = e.len > 0
        && e.len as usize <= crate::record::RECORD_BYTES_MAX
        && e.len.is_multiple_of(align)
        && e.offset.is_multiple_of(align)
        && e.version & 0x8000 == 0;
    let end = e.offset as u64 + e.len as u64;
    if !plausible || (e.offset as u64) < *prev_end || end > header.data_len as u64 {
        return None;
    }
    *prev_end = end;
    Some(e)
}

impl<B: AsRef<[u8]>> HintTable<B> {
    /// Validates `bytes` as a hint file. Trailing bytes (alignment padding) are ignored.
    pub fn parse(bytes: B) -> Option<Self> {
        let b = bytes.as_ref();
        if b.len() < HINT_HEADER_BYTES + 4 {
            return None;
        }
        let (header, end) = header_of(b)?;
        if b.len() < end + 4 || crc32fast::hash(&b[..end]) != read_u32(b, end) {
            return None;
        }
        let mut prev_end = 0u64;
        for at in (HINT_HEADER_BYTES..end).step_by(HINT_ENTRY_BYTES) {
            entry_checked(&b[at..at + HINT_ENTRY_BYTES], &header, &mut prev_end)?;
        }
        Some(Self { bytes, header })
    }

    /// Header of the hint file.
    pub fn header(&self) -> HintHeader {
        self.header
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.header.count as usize
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i` (validated at parse time).
    pub fn get(&self, i: usize) -> HintEntry {
        let at = HINT_HEADER_BYTES + i * HINT_ENTRY_BYTES;
        HintEntry::decode(&self.bytes.as_ref()[at..at + HINT_ENTRY_BYTES])
            .expect("entries were validated when the table was parsed")
    }

    /// The entry of the record at `offset`, if any (binary search; entries are sorted by offset).
    pub fn find_offset(&self, offset: u64) -> Option<HintEntry> {
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            let e = self.get(mid);
            match (e.offset as u64).cmp(&offset) {
                std::cmp::Ordering::Equal => return Some(e),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        None
    }

    /// Iterates the entries in offset order.
    pub fn iter(&self) -> impl Iterator<Item = HintEntry> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// Checks a hint file handed over a piece at a time, for a reader that must not hold its thread
/// for a whole file (compaction): the checks of [`HintTable::parse`], entry by entry as the
/// bytes come. The entries it hands out are only to be acted on once [`HintStream::finish`]
/// says the whole file was valid, its CRC included.
#[derive(Default)]
pub struct HintStream {
    /// The header and where its entries end, once read.
    header: Option<(HintHeader, usize)>,
    /// Bytes of a header, an entry or the trailer split between two pieces.
    partial: Vec<u8>,
    /// Bytes taken so far.
    taken: usize,
    crc: crc32fast::Hasher,
    prev_end: u64,
    trailer: Option<u32>,
    bad: bool,
}

impl HintStream {
    /// A check of a new file.
    pub fn new() -> HintStream {
        HintStream::default()
    }

    /// Takes the file's next bytes, handing `entry` each entry they complete. `false` once the
    /// bytes cannot be a valid hint file: nothing more need be fed.
    pub fn feed(&mut self, mut bytes: &[u8], mut entry: impl FnMut(HintEntry)) -> bool {
        while !bytes.is_empty() && !self.bad && self.trailer.is_none() {
            let want = match self.header {
                None => HINT_HEADER_BYTES,
                Some((_, end)) if self.taken < end => HINT_ENTRY_BYTES,
                Some(_) => 4,
            };
            // A whole unit straight from `bytes` when none is split, else through `partial`.
            let unit: &[u8] = if self.partial.is_empty() && bytes.len() >= want {
                let (unit, rest) = bytes.split_at(want);
                bytes = rest;
                unit
            } else {
                let n = (want - self.partial.len()).min(bytes.len());
                self.partial.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.partial.len() < want {
                    continue;
                }
                &self.partial
            };
            match self.header {
                None => match header_of(unit) {
                    Some(h) => self.header = Some(h),
                    None => self.bad = true,
                },
                Some((header, end)) if self.taken < end => {
                    match entry_checked(unit, &header, &mut self.prev_end) {
                        Some(e) => entry(e),
                        None => self.bad = true,
                    }
                }
                Some(_) => self.trailer = Some(read_u32(unit, 0)),
            }
            if self.trailer.is_none() {
                self.crc.update(unit);
            }
            self.taken += want;
            self.partial.clear();
        }
        !self.bad
    }

    /// The file's header, if every byte fed made a valid hint file, its CRC included.
    pub fn finish(self) -> Option<HintHeader> {
        let (header, _) = self.header?;
        (!self.bad && self.trailer == Some(self.crc.finalize())).then_some(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` entries of records of 64 bytes, one after the other from offset 48.
    fn listed(n: u32) -> Vec<HintEntry> {
        (0..n)
            .map(|i| HintEntry {
                key: KeyHash::of(&i.to_le_bytes()),
                seqno: 100 + i as u64,
                partition: i % 3,
                offset: 48 + i * 64,
                len: 64,
                kind: if i % 4 == 0 {
                    RecordKind::Tombstone
                } else {
                    RecordKind::Put
                },
                version: (i * 7) as u16,
            })
            .collect()
    }

    #[test]
    fn roundtrip_and_damage_is_refused() {
        let entries = listed(10);
        let h = HintHeader {
            segment_id: 9,
            created_seqno: 99,
            data_len: 48 + 640,
            count: 10,
        };
        let mut bytes = encode(h, &entries);
        bytes.resize(4096, 0);
        let t = HintTable::parse(bytes.clone()).unwrap();
        assert_eq!(t.header(), h);
        assert_eq!(t.iter().collect::<Vec<_>>(), entries);
        assert_eq!(t.find_offset(48 + 3 * 64), Some(entries[3]));
        assert_eq!(t.find_offset(50), None);
        let mut odd = entries.clone();
        odd[2].version = 0x8001;
        let h2 = HintHeader { count: 10, ..h };
        assert!(
            HintTable::parse(encode(h2, &odd)).is_none(),
            "impossible value digest accepted"
        );
        let mut odd = entries.clone();
        odd[4].len = 60;
        assert!(
            HintTable::parse(encode(h2, &odd)).is_none(),
            "unaligned length accepted"
        );
        for i in [0, 9, 40, 200, 351] {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(HintTable::parse(b).is_none(), "flip at {i} accepted");
        }
        assert!(HintTable::parse(&bytes[..100]).is_none());
    }

    /// Fed in pieces of every size, a hint file passes the stream's check exactly when it
    /// passes `HintTable::parse`, with the same header and the same entries in order.
    #[test]
    fn a_stream_accepts_what_parse_accepts_in_pieces_of_any_size() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let entries = listed(200);
        let h = HintHeader {
            segment_id: 3,
            created_seqno: 5,
            data_len: 48 + 200 * 64,
            count: 200,
        };
        let mut valid = encode(h, &entries);
        valid.resize(valid.len().next_multiple_of(4096), 0);
        let mut rng = StdRng::seed_from_u64(11);
        let mut accepted = 0;
        for case in 0..400 {
            let mut b = valid.clone();
            // Half the cases damage one byte (of the header, an entry, the CRC or the padding),
            // some cut the file short.
            if case % 2 == 1 {
                let at = rng.gen_range(0..b.len());
                b[at] ^= 1 << rng.gen_range(0..8);
            }
            if case % 7 == 3 {
                b.truncate(rng.gen_range(0..b.len()));
            }
            let parsed = HintTable::parse(&b[..]).map(|t| (t.header(), t.iter().collect()));
            let mut stream = HintStream::new();
            let mut seen = Vec::new();
            let mut rest = &b[..];
            while !rest.is_empty() {
                let n = rng.gen_range(1..=rest.len().min(700));
                if !stream.feed(&rest[..n], |e| seen.push(e)) {
                    break;
                }
                rest = &rest[n..];
            }
            let streamed = stream.finish().map(|header| (header, seen));
            accepted += streamed.is_some() as usize;
            assert_eq!(streamed, parsed, "case {case}");
        }
        // Both answers were exercised: the intact files and the ones damaged in their padding
        // pass, the others fail.
        assert!((1..400).contains(&accepted), "{accepted} of 400 accepted");
    }
}
