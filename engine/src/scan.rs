//! Segment scanner (sans-IO): turns a segment's bytes into hint entries plus a damage report.
//!
//! Used by recovery and by compaction for segments without a usable hint file (compaction must not
//! copy damaged bytes; with a hint it checks each record it copies instead). The rules:
//! - records are decoded from offset 0 in order; each must pass its CRC;
//! - at an invalid position the scanner probes every following 8-byte aligned offset for a valid
//!   record; if it finds one, the bytes in between are a *corrupt region* (counted and reported) and
//!   scanning continues there, so one flipped bit costs one record, not the rest of the segment;
//! - if no valid record follows, the rest is the tail: all zeros is unwritten space (normal, the
//!   last flush pads to the IO block), anything else is a *torn tail* (an interrupted write) and
//!   recovery truncates it.
//!
//! Limit: a value that itself contains the bytes of a valid record could be mistaken for a record
//! when resynchronising after damage. Only damaged segments are exposed to that.

use crate::hint::HintEntry;
use crate::index::{KeyHash, value_digest};
use crate::record::{self, HEADER_BYTES, Invalid, RECORD_ALIGN, RecordKind};

/// Result of scanning one segment.
#[derive(Debug, Default)]
pub struct ScanOutcome {
    /// Valid records in offset order (segment headers included).
    pub entries: Vec<HintEntry>,
    /// (segment id, created seqno) from the segment header record, if it survived.
    pub header: Option<(u64, u64)>,
    /// End of the last valid record: the length the segment should be truncated to.
    pub valid_len: u64,
    /// Damaged byte ranges followed by valid records.
    pub corrupt_regions: Vec<(u64, u64)>,
    /// A non-zero, unparseable range running to the end of the segment.
    pub torn_tail: Option<(u64, u64)>,
}

impl ScanOutcome {
    /// Whether the scan found any damage.
    pub fn damaged(&self) -> bool {
        !self.corrupt_regions.is_empty() || self.torn_tail.is_some()
    }
}

/// Scans a whole segment held in memory.
pub fn scan(bytes: &[u8]) -> ScanOutcome {
    let mut out = ScanOutcome::default();
    let mut off = 0usize;
    while off < bytes.len() {
        match record::decode(&bytes[off..]) {
            Ok(r) => {
                out.entries.push(entry_of(&r, off));
                if r.kind == RecordKind::SegmentHeader && out.header.is_none() {
                    out.header = record::parse_segment_header_value(r.value);
                }
                off += r.len;
                out.valid_len = off as u64;
            }
            Err(first) => {
                let next = (off + RECORD_ALIGN..bytes.len().saturating_sub(HEADER_BYTES - 1))
                    .step_by(RECORD_ALIGN)
                    .find(|&p| record::decode(&bytes[p..]).is_ok());
                match next {
                    Some(p) => {
                        out.corrupt_regions.push((off as u64, p as u64));
                        off = p;
                    }
                    None => {
                        // Zero bytes are unwritten space; anything else is an interrupted write.
                        let zero = first == Invalid::Zero || first == Invalid::Truncated;
                        if !(zero && bytes[off..].iter().all(|&b| b == 0)) {
                            out.torn_tail = Some((off as u64, bytes.len() as u64));
                        }
                        break;
                    }
                }
            }
        }
    }
    out
}

/// The hint entry describing a decoded record at `offset`.
pub fn entry_of(r: &record::RecordView<'_>, offset: usize) -> HintEntry {
    let keyed = matches!(r.kind, RecordKind::Put | RecordKind::Tombstone);
    HintEntry {
        key: if keyed {
            KeyHash::of(r.key)
        } else {
            KeyHash {
                digest: 0,
                check: 0,
            }
        },
        seqno: r.seqno,
        partition: r.partition,
        offset: u32::try_from(offset).expect("segments are at most 1 GiB"),
        len: r.len as u32,
        kind: r.kind,
        version: if r.kind == RecordKind::Put {
            value_digest(r.value)
        } else {
            0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut b = Vec::new();
        let mut starts = Vec::new();
        for i in 0..n {
            starts.push(b.len());
            record::encode(
                &mut b,
                RecordKind::Put,
                i as u64,
                0,
                format!("k{i}").as_bytes(),
                &vec![i as u8; i * 3],
            );
        }
        (b, starts)
    }

    #[test]
    fn clean_segment_with_zero_padding_has_no_damage() {
        let (mut b, _) = segment(20);
        let len = b.len() as u64;
        b.resize(b.len().next_multiple_of(4096), 0);
        let s = scan(&b);
        assert_eq!(s.entries.len(), 20);
        assert_eq!(s.valid_len, len);
        assert!(!s.damaged());
    }

    #[test]
    fn damage_in_the_middle_costs_only_that_record() {
        let (mut b, starts) = segment(20);
        b[starts[7] + HEADER_BYTES + 1] ^= 0x40;
        let s = scan(&b);
        assert_eq!(s.entries.len(), 19);
        assert_eq!(
            s.corrupt_regions,
            vec![(starts[7] as u64, starts[8] as u64)]
        );
        assert!(s.torn_tail.is_none());
    }

    #[test]
    fn garbage_at_the_end_is_a_torn_tail() {
        let (mut b, starts) = segment(5);
        let cut = starts[4] + 20;
        b.truncate(cut);
        let s = scan(&b);
        assert_eq!(s.entries.len(), 4);
        assert_eq!(s.valid_len, starts[4] as u64);
        assert_eq!(s.torn_tail, Some((starts[4] as u64, cut as u64)));
    }
}
