//! What each node stores per partition, as gossiped, and the byte figures `cluster plan` and
//! `cluster status` print from it (sans-IO).
//!
//! Owns: the table of reported sizes ([`StoredSizes`]), its merge, its encoding (the payload of
//! the SIZES sub-kind, `docs/PROTOCOL.md` §5.9.1), and the arithmetic and wording of byte sums
//! ([`ByteSum`]). Does not own: where the figures come from (the shell copies them from the
//! node's engines, [`super::Membership::handle_stored`]) or when they travel (membership's
//! gossip round, which sends the table to the same partner as the state).
//!
//! # Entries and their merge
//!
//! One entry per node: `(partition, bytes)` for every ring partition it stores data of (bytes
//! of live engine records: keys, values and record headers, padded as stored), with a sequence
//! number. Only the node itself writes its entry, raising the number by one whenever its figures
//! change. Entries merge by the highest `(seq, bytes)`, a maximum, so the merge is commutative,
//! associative and idempotent. The figures compare only to break a tie, which happens after a
//! restart: the numbers are not persisted, so a restarted node may reuse one its previous run
//! sent; membership then raises its own entry above any copy it hears of, so its current
//! figures win within a gossip round.
//!
//! # Soft state
//!
//! The table is advisory: it is not part of the [`super::ClusterState`], never persisted, never
//! in a view, and a change of it publishes nothing. That keeps the persisted state and the
//! GOSSIP payload unchanged, so nodes of earlier versions (which refuse the SIZES sub-kind and
//! never send it) keep gossiping with newer ones; partitions whose replicas reported nothing
//! print as "size unknown", never as 0 bytes.
//!
//! # Limits
//!
//! An entry holds at most one figure per partition, partition ids below
//! [`PARTITION_COUNT_MAX`]; a table at most [`MEMBERS_MAX`] entries; both are checked before
//! decoding goes on. Cluster-wide the table holds about `Q × n` figures of 12 bytes (every
//! replica of every partition): with the default 256 partitions and `n = 3`, about 9 KiB per
//! gossip round. Clusters are meant to run with a partition count of at most a few hundred to a
//! few thousand; at the largest count (65,536) the table would be megabytes per round.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ringkv_net::BodyError;
use ringkv_net::wire::{Reader, Writer};

use super::bounded;
use crate::NodeId;
use crate::ring::{MEMBERS_MAX, PARTITION_COUNT_MAX};

/// The table's encoding: the only one so far.
const SIZES_FORMAT: u8 = 1;

/// One node's report of what it stores.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeSizes {
    /// Raised by the node on every change of `bytes`.
    pub seq: u64,
    /// Bytes stored per ring partition; a partition absent holds nothing on the node.
    pub bytes: BTreeMap<u32, u64>,
}

/// The gossiped table of what each node stores (module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredSizes {
    nodes: BTreeMap<NodeId, NodeSizes>,
}

impl StoredSizes {
    /// Whether no node has reported.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The report of `node`, if one arrived.
    pub fn get(&self, node: NodeId) -> Option<&NodeSizes> {
        self.nodes.get(&node)
    }

    /// Merges `other` into `self` (each entry the highest `(seq, bytes)`); returns whether `self`
    /// changed.
    pub fn merge(&mut self, other: &StoredSizes) -> bool {
        let mut changed = false;
        for (id, theirs) in &other.nodes {
            match self.nodes.get(id) {
                Some(ours) if ours >= theirs => {}
                _ => {
                    self.nodes.insert(*id, theirs.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    /// Makes `bytes` the report of `node` (which must be this node: only a node writes its own
    /// entry), under a sequence number above the one held, if the figures differ from it.
    /// Returns whether the entry changed.
    pub fn publish(&mut self, node: NodeId, bytes: &BTreeMap<u32, u64>) -> bool {
        let held = self.nodes.get(&node);
        if held.is_some_and(|h| h.bytes == *bytes) {
            return false;
        }
        let seq = held.map_or(1, |h| h.seq + 1);
        self.nodes.insert(
            node,
            NodeSizes {
                seq,
                bytes: bytes.clone(),
            },
        );
        true
    }

    /// Keeps only the entries of the nodes `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(NodeId) -> bool) {
        self.nodes.retain(|id, _| keep(*id));
    }

    /// The size of `partition` as its replicas reported it: the largest figure among the
    /// `replicas` that reported (a replica that reported without naming the partition holds
    /// none of it), or `None` when none of them reported.
    pub fn partition_bytes(&self, partition: u32, replicas: &[NodeId]) -> Option<u64> {
        replicas
            .iter()
            .filter_map(|r| self.nodes.get(r))
            .map(|s| s.bytes.get(&partition).copied().unwrap_or(0))
            .max()
    }

    /// Encodes the table (the SIZES payload).
    pub fn encode(&self, w: &mut Writer<'_, Vec<u8>>) {
        assert!(self.nodes.len() <= MEMBERS_MAX, "more entries than members");
        w.u8(SIZES_FORMAT);
        w.u32(self.nodes.len() as u32);
        for (id, s) in &self.nodes {
            assert!(s.bytes.len() <= PARTITION_COUNT_MAX as usize);
            w.u32(id.0);
            w.u64(s.seq);
            w.u32(s.bytes.len() as u32);
            for (p, b) in &s.bytes {
                w.u32(*p);
                w.u64(*b);
            }
        }
    }

    /// Decodes what [`StoredSizes::encode`] wrote, checking every count before reading on.
    /// Node ids and partitions must ascend (the encoding is canonical, and a repeated one would
    /// be silently merged away).
    pub fn decode(r: &mut Reader<'_>) -> Result<StoredSizes, BodyError> {
        let format = r.u8("sizes_format")?;
        if format != SIZES_FORMAT {
            return Err(BodyError::BadValue {
                field: "sizes_format",
                value: u64::from(format),
            });
        }
        let count = bounded(r.u32("sizes_nodes")?, MEMBERS_MAX, "sizes_nodes")?;
        let mut nodes = BTreeMap::new();
        let mut last_node = None;
        for _ in 0..count {
            let id = NodeId(r.u32("sizes_node")?);
            if last_node.is_some_and(|l| l >= id) {
                return Err(BodyError::BadValue {
                    field: "sizes_node",
                    value: u64::from(id.0),
                });
            }
            last_node = Some(id);
            let seq = r.u64("sizes_seq")?;
            let n = bounded(
                r.u32("sizes_partitions")?,
                PARTITION_COUNT_MAX as usize,
                "sizes_partitions",
            )?;
            let mut bytes = BTreeMap::new();
            let mut last = None;
            for _ in 0..n {
                let p = r.u32("sizes_partition")?;
                if p >= PARTITION_COUNT_MAX || last.is_some_and(|l| l >= p) {
                    return Err(BodyError::BadValue {
                        field: "sizes_partition",
                        value: u64::from(p),
                    });
                }
                last = Some(p);
                bytes.insert(p, r.u64("sizes_bytes")?);
            }
            nodes.insert(id, NodeSizes { seq, bytes });
        }
        Ok(StoredSizes { nodes })
    }
}

/// A sum of sizes of replica copies, some of which may be unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteSum {
    /// Bytes of the copies whose size is known.
    pub bytes: u64,
    /// Copies whose size is known.
    pub known: usize,
    /// Copies whose size no replica reported.
    pub unknown: usize,
}

impl ByteSum {
    /// Adds one copy of size `bytes` (`None`: unknown).
    pub fn add(&mut self, bytes: Option<u64>) {
        match bytes {
            Some(b) => {
                self.bytes = self.bytes.saturating_add(b);
                self.known += 1;
            }
            None => self.unknown += 1,
        }
    }

    /// Whether copies were counted and none of their sizes is known.
    fn all_unknown(&self) -> bool {
        self.known == 0 && self.unknown > 0
    }

    /// The sum for a person: `about 12.4 MiB`; `size unknown` when no copy's size is known;
    /// how many copies are left out when some are unknown.
    pub fn about(&self) -> String {
        if self.all_unknown() {
            return "size unknown".into();
        }
        let mut s = format!("about {}", human_bytes(self.bytes));
        self.note_unknown(&mut s);
        s
    }

    /// `self` as the part of `total` still to go: `about 3.1 MiB of 12.4 MiB`; `size unknown`
    /// when no copy's size is known; how many copies of `total` are left out when some are
    /// unknown.
    pub fn about_of(&self, total: &ByteSum) -> String {
        assert!(self.bytes <= total.bytes, "a part is larger than its whole");
        assert!(
            self.known <= total.known,
            "a part has more copies than its whole"
        );
        assert!(
            self.unknown <= total.unknown,
            "a part has more copies than its whole"
        );
        if total.all_unknown() {
            return "size unknown".into();
        }
        let mut s = format!(
            "about {} of {}",
            human_bytes(self.bytes),
            human_bytes(total.bytes)
        );
        total.note_unknown(&mut s);
        s
    }

    fn note_unknown(&self, s: &mut String) {
        match self.unknown {
            0 => {}
            1 => s.push_str("; size of 1 copy unknown"),
            n => {
                let _ = write!(s, "; sizes of {n} copies unknown");
            }
        }
    }
}

/// `n` bytes for a person, in binary units with one decimal: `512 B`, `1.5 KiB`, `12.4 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    // Precision lost converting to f64 is far below the one decimal printed.
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(seq: u64, figures: &[(u32, u64)]) -> NodeSizes {
        NodeSizes {
            seq,
            bytes: figures.iter().copied().collect(),
        }
    }

    fn table(entries: &[(u32, NodeSizes)]) -> StoredSizes {
        StoredSizes {
            nodes: entries
                .iter()
                .map(|(id, s)| (NodeId(*id), s.clone()))
                .collect(),
        }
    }

    /// The merge takes the highest `(seq, bytes)` per node, so it commutes, associates and is
    /// idempotent, even for two entries of one node with equal numbers (a restarted node).
    #[test]
    fn merge_is_a_maximum() {
        let a = table(&[(1, entry(3, &[(0, 10)])), (2, entry(1, &[(1, 5)]))]);
        let b = table(&[(1, entry(2, &[(0, 99)])), (2, entry(1, &[(1, 7)]))]);
        let c = table(&[(3, entry(1, &[])), (2, entry(2, &[]))]);
        let merged = |x: &StoredSizes, y: &StoredSizes| {
            let mut m = x.clone();
            m.merge(y);
            m
        };
        assert_eq!(merged(&a, &b), merged(&b, &a));
        assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        let ab = merged(&a, &b);
        assert_eq!(ab.get(NodeId(1)), Some(&entry(3, &[(0, 10)])));
        assert_eq!(ab.get(NodeId(2)), Some(&entry(1, &[(1, 7)])));
        let mut again = ab.clone();
        assert!(!again.merge(&ab));
        assert_eq!(again, ab);
    }

    /// Publishing raises the number only when the figures change.
    #[test]
    fn publish_raises_the_number_on_change_only() {
        let mut t = StoredSizes::default();
        let figures: BTreeMap<u32, u64> = [(0, 10)].into_iter().collect();
        assert!(t.publish(NodeId(1), &figures));
        assert!(!t.publish(NodeId(1), &figures));
        assert_eq!(t.get(NodeId(1)).unwrap().seq, 1);
        assert!(t.publish(NodeId(1), &BTreeMap::new()));
        assert_eq!(t.get(NodeId(1)), Some(&entry(2, &[])));
    }

    /// A partition's size is the largest any of its replicas reported; a replica that reported
    /// without the partition holds none of it; no report at all is unknown.
    #[test]
    fn partition_size_is_the_largest_replica_report() {
        let t = table(&[(1, entry(1, &[(0, 10), (1, 3)])), (2, entry(1, &[(0, 12)]))]);
        let replicas = [NodeId(1), NodeId(2), NodeId(3)];
        assert_eq!(t.partition_bytes(0, &replicas), Some(12));
        assert_eq!(t.partition_bytes(1, &replicas), Some(3));
        assert_eq!(t.partition_bytes(2, &replicas), Some(0));
        assert_eq!(t.partition_bytes(0, &[NodeId(3), NodeId(4)]), None);
    }

    /// The table survives its encoding; a cut one, a repeated partition or node, a partition
    /// out of range and an unknown format are errors, not panics.
    #[test]
    fn table_round_trips_and_rejects_garbage() {
        let t = table(&[
            (1, entry(4, &[(0, 10), (255, u64::MAX)])),
            (9, entry(1, &[])),
        ]);
        let mut out = Vec::new();
        t.encode(&mut Writer::new(&mut out));
        let mut r = Reader::new(&out);
        assert_eq!(StoredSizes::decode(&mut r).unwrap(), t);
        r.finish().unwrap();
        for cut in 0..out.len() {
            assert!(StoredSizes::decode(&mut Reader::new(&out[..cut])).is_err());
        }
        let encode = |f: &dyn Fn(&mut Writer<'_, Vec<u8>>)| {
            let mut out = Vec::new();
            f(&mut Writer::new(&mut out));
            out
        };
        let bad = [
            encode(&|w| w.u8(2)),
            // Partition 5 twice.
            encode(&|w| {
                w.u8(1);
                w.u32(1);
                w.u32(1);
                w.u64(1);
                w.u32(2);
                for _ in 0..2 {
                    w.u32(5);
                    w.u64(1);
                }
            }),
            // A partition no ring has.
            encode(&|w| {
                w.u8(1);
                w.u32(1);
                w.u32(1);
                w.u64(1);
                w.u32(1);
                w.u32(PARTITION_COUNT_MAX);
                w.u64(1);
            }),
            // Node 3 twice.
            encode(&|w| {
                w.u8(1);
                w.u32(2);
                for _ in 0..2 {
                    w.u32(3);
                    w.u64(1);
                    w.u32(0);
                }
            }),
            // More nodes than a cluster has.
            encode(&|w| {
                w.u8(1);
                w.u32(MEMBERS_MAX as u32 + 1);
            }),
        ];
        for payload in bad {
            assert!(
                StoredSizes::decode(&mut Reader::new(&payload)).is_err(),
                "{payload:?}"
            );
        }
    }

    /// Byte figures read as a person expects, and unknown sizes never print as 0 bytes.
    #[test]
    fn byte_sums_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(13_002_342), "12.4 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");

        let mut total = ByteSum::default();
        assert_eq!(total.about(), "about 0 B");
        total.add(Some(13_002_342));
        let mut left = ByteSum::default();
        left.add(Some(3_250_585));
        assert_eq!(total.about(), "about 12.4 MiB");
        assert_eq!(left.about_of(&total), "about 3.1 MiB of 12.4 MiB");
        total.add(None);
        assert_eq!(total.about(), "about 12.4 MiB; size of 1 copy unknown");
        assert_eq!(
            left.about_of(&total),
            "about 3.1 MiB of 12.4 MiB; size of 1 copy unknown"
        );
        total.add(None);
        assert_eq!(total.about(), "about 12.4 MiB; sizes of 2 copies unknown");

        let mut unknown = ByteSum::default();
        unknown.add(None);
        unknown.add(None);
        assert_eq!(unknown.about(), "size unknown");
        let mut part = ByteSum::default();
        part.add(None);
        assert_eq!(part.about_of(&unknown), "size unknown");
        // A copy known to be empty is known: the sum is not unknown.
        let mut empty = ByteSum::default();
        empty.add(Some(0));
        empty.add(None);
        assert_eq!(empty.about(), "about 0 B; size of 1 copy unknown");
    }
}
