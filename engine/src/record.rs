//! On-disk record format of segment files (sans-IO: bytes in, bytes out).
//!
//! Every segment is a sequence of records, each starting at an 8-byte aligned offset:
//!
//! ```text
//! offset size field
//!  0     4    crc        CRC-32 (crc32fast, IEEE) over bytes [4, 32 + key_len + value_len)
//!  4     2    magic      0x4B52 ("RK" little-endian)
//!  6     1    version    FORMAT_VERSION
//!  7     1    kind       1 put, 2 tombstone, 3 drop-partition, 4 segment header
//!  8     8    seqno      engine-wide sequence number; the highest seqno of a key wins
//! 16     4    partition  ring partition the key belongs to
//! 20     2    key_len
//! 22     2    reserved   zero
//! 24     4    value_len
//! 28     4    reserved   zero
//! 32     ..   key bytes, then value bytes, then zero padding to the next multiple of 8
//! ```
//!
//! The CRC covers the header (after the CRC itself) and the body, so a torn or flipped length is
//! caught as surely as a flipped value byte. Padding is not covered: it carries no information.
//! Alignment to 8 bytes lets recovery resynchronise after a damaged region by probing only aligned
//! offsets, and lets the index store offsets and lengths in 8-byte units.
//!
//! This module does no IO and knows nothing about files; the scanner and the engine build on it.

use crate::config::{KEY_BYTES_MAX_HARD, VALUE_BYTES_MAX_HARD};

/// Size of the fixed record header in bytes.
pub const HEADER_BYTES: usize = 32;
/// Records start at multiples of this many bytes.
pub const RECORD_ALIGN: usize = 8;
/// Magic number in every record header ("RK").
pub const MAGIC: u16 = 0x4B52;
/// Version of the record format written by this build.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the value of a segment header record: segment id (u64) and created seqno (u64).
pub const SEGMENT_HEADER_VALUE_BYTES: usize = 16;
/// Largest record this build can write or accept when reading.
pub const RECORD_BYTES_MAX: usize =
    align_up(HEADER_BYTES + KEY_BYTES_MAX_HARD + VALUE_BYTES_MAX_HARD);

const _: () = assert!(HEADER_BYTES.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(RECORD_ALIGN.is_power_of_two());
const _: () = assert!(KEY_BYTES_MAX_HARD <= u16::MAX as usize);
const _: () = assert!(VALUE_BYTES_MAX_HARD <= u32::MAX as usize);

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKind {
    /// A key with a value.
    Put = 1,
    /// A deletion marker for a key; empty value.
    Tombstone = 2,
    /// Every record of `partition` with a lower seqno is void; empty key and value.
    DropPartition = 3,
    /// First record of a segment: its id and the seqno counter when it was created.
    SegmentHeader = 4,
}

impl RecordKind {
    /// Decodes a kind byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Put),
            2 => Some(Self::Tombstone),
            3 => Some(Self::DropPartition),
            4 => Some(Self::SegmentHeader),
            _ => None,
        }
    }
}

/// Rounds `n` up to the record alignment.
pub const fn align_up(n: usize) -> usize {
    (n + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

/// Total on-disk length of a record with these key and value lengths, padding included.
pub const fn record_len(key_len: usize, value_len: usize) -> usize {
    align_up(HEADER_BYTES + key_len + value_len)
}

/// Appends one encoded record to `out` and returns its padded length.
///
/// Panics if the key or value exceed the hard limits: callers validate sizes first and return
/// typed errors, so reaching this with oversized input is a programming error.
pub fn encode(
    out: &mut Vec<u8>,
    kind: RecordKind,
    seqno: u64,
    partition: u32,
    key: &[u8],
    value: &[u8],
) -> usize {
    assert!(
        key.len() <= KEY_BYTES_MAX_HARD,
        "key length checked by caller"
    );
    assert!(
        value.len() <= VALUE_BYTES_MAX_HARD,
        "value length checked by caller"
    );
    let start = out.len();
    let len = record_len(key.len(), value.len());
    out.reserve(len);
    out.extend_from_slice(&[0u8; 4]); // CRC, filled below
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&seqno.to_le_bytes());
    out.extend_from_slice(&partition.to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0u8; 2]);
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    debug_assert_eq!(out.len() - start, HEADER_BYTES);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    out.resize(start + len, 0);
    len
}

/// A record decoded in place from a byte slice.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    /// What the record says.
    pub kind: RecordKind,
    /// Engine-wide sequence number.
    pub seqno: u64,
    /// Ring partition.
    pub partition: u32,
    /// Key bytes.
    pub key: &'a [u8],
    /// Value bytes (empty for tombstones and drop markers).
    pub value: &'a [u8],
    /// Padded on-disk length.
    pub len: usize,
}

/// Why the bytes at an offset are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Fewer bytes remain than a header, or than the lengths in the header announce.
    Truncated,
    /// The header is all zero bytes: unwritten space (normal at the end of a segment).
    Zero,
    /// Magic, version, kind or lengths are not plausible.
    BadHeader,
    /// The header is plausible but the checksum does not match.
    BadCrc,
}

pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes and verifies the record at the start of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<RecordView<'_>, Invalid> {
    if bytes.len() < HEADER_BYTES {
        return Err(Invalid::Truncated);
    }
    let h = &bytes[..HEADER_BYTES];
    if h.iter().all(|&b| b == 0) {
        return Err(Invalid::Zero);
    }
    let kind = RecordKind::from_u8(h[7]);
    let key_len = le_u16(h, 20) as usize;
    let value_len = le_u32(h, 24) as usize;
    let (Some(kind), MAGIC, FORMAT_VERSION) = (kind, le_u16(h, 4), h[6]) else {
        return Err(Invalid::BadHeader);
    };
    if key_len > KEY_BYTES_MAX_HARD
        || value_len > VALUE_BYTES_MAX_HARD
        || le_u16(h, 22) != 0
        || le_u32(h, 28) != 0
    {
        return Err(Invalid::BadHeader);
    }
    let body_end = HEADER_BYTES + key_len + value_len;
    if bytes.len() < body_end {
        return Err(Invalid::Truncated);
    }
    let crc = le_u32(h, 0);
    if crc32fast::hash(&bytes[4..body_end]) != crc {
        return Err(Invalid::BadCrc);
    }
    Ok(RecordView {
        kind,
        seqno: le_u64(h, 8),
        partition: le_u32(h, 16),
        key: &bytes[HEADER_BYTES..HEADER_BYTES + key_len],
        value: &bytes[HEADER_BYTES + key_len..body_end],
        len: align_up(body_end),
    })
}

/// Encodes the value of a segment header record.
pub fn segment_header_value(
    segment_id: u64,
    created_seqno: u64,
) -> [u8; SEGMENT_HEADER_VALUE_BYTES] {
    let mut v = [0u8; SEGMENT_HEADER_VALUE_BYTES];
    v[..8].copy_from_slice(&segment_id.to_le_bytes());
    v[8..].copy_from_slice(&created_seqno.to_le_bytes());
    v
}

/// Decodes the value of a segment header record into (segment id, created seqno).
pub fn parse_segment_header_value(v: &[u8]) -> Option<(u64, u64)> {
    (v.len() == SEGMENT_HEADER_VALUE_BYTES).then(|| (le_u64(v, 0), le_u64(v, 8)))
}

pub(crate) use {le_u16 as read_u16, le_u32 as read_u32, le_u64 as read_u64};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_every_single_bit_flip_is_caught() {
        // A record must decode to exactly what was encoded, and flipping any one bit of its
        // covered bytes must make it invalid (CRC-32 detects all single-bit errors).
        let mut buf = Vec::new();
        let len = encode(&mut buf, RecordKind::Put, 42, 7, b"key", b"value!");
        assert_eq!(len, buf.len());
        assert_eq!(len % RECORD_ALIGN, 0);
        let r = decode(&buf).unwrap();
        assert_eq!((r.kind, r.seqno, r.partition), (RecordKind::Put, 42, 7));
        assert_eq!((r.key, r.value, r.len), (&b"key"[..], &b"value!"[..], len));
        let covered = HEADER_BYTES + 3 + 6;
        for bit in 0..covered * 8 {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&b).is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn zero_and_short_inputs_are_classified() {
        assert_eq!(decode(&[0u8; 64]).unwrap_err(), Invalid::Zero);
        assert_eq!(decode(&[1u8; 8]).unwrap_err(), Invalid::Truncated);
        let mut buf = Vec::new();
        encode(&mut buf, RecordKind::Put, 1, 0, b"k", &[9u8; 100]);
        assert_eq!(decode(&buf[..60]).unwrap_err(), Invalid::Truncated);
    }
}
