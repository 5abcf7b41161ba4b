//! A map with a last-write-wins register per field: what a Redis hash was here before maps became
//! a convergent type (`crdt.rs`). Nodes still decode, merge and read these objects (older nodes
//! wrote them), and convert one at its next UPDATE or APPLY; they write no new ones. What follows
//! is how they were written and how they merge.
//!
//! Session stores write a hash one field at a time (`HSET session:1 user alice`); two
//! application servers updating different fields of one session at once must both keep their
//! field. So the map is not one last-write-wins value: every field is its own register,
//! stamped with the hybrid-logical-clock timestamp and node of the write that set or deleted
//! it, and concurrent writes to *different* fields both survive; concurrent writes to the *same*
//! field resolve by stamp (the later wins, as for an `lww` value). The key's expiry is one more
//! register (`EXPIRE` on a hash), stamped the same way.
//!
//! A write that replaces the whole key (a string `SET` or a `DEL`, an [`crate::object::Lww`] version) clears
//! every field stamped before it: [`LwwMap::cleared`] remembers the latest such stamp, and
//! [`crate::object::Object::merge`] keeps whichever is newer, the whole-key write or the map.
//!
//! # Laws
//!
//! [`LwwMap::join`] is commutative, associative and idempotent (a join-semilattice: per field
//! the maximum by stamp, then value; the maximum clear; the maximum expiry register), and it
//! only drops what a clear superseded, so replicas converge whatever order the exchanges take.
//! `core/src/object.rs`'s proptest checks the laws together with the other object kinds.
//!
//! # Encoding (inside [`crate::object::Object`]'s)
//!
//! ```text
//! cleared ts u64 | cleared node u32
//! | expiry: 0x00 (none) | 0x01 ts u64 node u32 (never) | 0x02 ts u64 node u32 at u64
//! | fields u32 | fields × (name len u16 | name | ts u64 | node u32 | 0x00 (deleted) | 0x01 len u32 bytes)
//! ```
//!
//! Fields are in name order and stamped after the clear, and an expiry register is too: the
//! encoding is canonical, so equal maps have equal digests (anti-entropy relies on it).
//!
//! Limits: field names are at most 64 KiB (u16), values as the object's limit allows; a deleted
//! field keeps its stamp (a field tombstone) until a whole-key write clears it, so a map whose
//! fields churn grows until then.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::NodeId;
use crate::object::{Cursor, ObjectError};

/// When a write happened, as the map orders writes: the coordinator's hybrid logical clock
/// timestamp, then its node.
pub type Stamp = (u64, NodeId);

/// One field: its latest write.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cell {
    /// The write that set or deleted it.
    pub stamp: Stamp,
    /// The value; `None` for a deleted field.
    pub value: Option<Bytes>,
}

impl Cell {
    fn key(&self) -> (Stamp, Option<&[u8]>) {
        (self.stamp, self.value.as_deref())
    }
}

/// One change a map write makes, at the write's stamp. Nodes no longer write these maps (an
/// UPDATE writes the convergent map, `crdt.rs`); tests build the ones older nodes stored.
#[cfg(test)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapChange {
    /// Set a field.
    Set(Bytes, Bytes),
    /// Delete a field.
    Delete(Bytes),
    /// Set the key's expiry (Unix ms), or remove it.
    Expire(Option<u64>),
}

/// A map of last-write-wins fields (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LwwMap {
    cleared: Stamp,
    fields: BTreeMap<Bytes, Cell>,
    /// The expiry register: its stamp and the expiry (`None`: never).
    expiry: Option<(Stamp, Option<u64>)>,
}

impl Default for LwwMap {
    /// The empty map, cleared at no time.
    fn default() -> Self {
        LwwMap {
            cleared: (0, NodeId(0)),
            fields: BTreeMap::new(),
            expiry: None,
        }
    }
}

impl LwwMap {
    /// The map a write at `stamp` makes of `changes` (later changes of a field win).
    #[cfg(test)]
    pub fn from_changes(stamp: Stamp, changes: &[MapChange]) -> LwwMap {
        let mut map = LwwMap::default();
        assert!(
            stamp > map.cleared,
            "a write's stamp is above the empty map's clear (hybrid clocks start above 0)"
        );
        for change in changes {
            match change {
                MapChange::Set(field, value) => {
                    map.fields.insert(
                        field.clone(),
                        Cell {
                            stamp,
                            value: Some(value.clone()),
                        },
                    );
                }
                MapChange::Delete(field) => {
                    map.fields
                        .insert(field.clone(), Cell { stamp, value: None });
                }
                MapChange::Expire(at) => map.expiry = Some((stamp, *at)),
            }
        }
        map
    }

    /// The latest whole-key write this map has seen superseded by its own fields.
    pub fn cleared(&self) -> Stamp {
        self.cleared
    }

    /// The latest stamp anywhere in the map.
    pub fn latest(&self) -> Stamp {
        let fields = self.fields.values().map(|c| c.stamp);
        let expiry = self.expiry.iter().map(|(s, _)| *s);
        fields.chain(expiry).fold(self.cleared, Stamp::max)
    }

    /// The map with everything stamped at or before `stamp` cleared (a whole-key write at
    /// `stamp` that this map's newer writes supersede).
    pub fn cleared_at(mut self, stamp: Stamp) -> LwwMap {
        self.cleared = self.cleared.max(stamp);
        let cleared = self.cleared;
        self.fields.retain(|_, c| c.stamp > cleared);
        self.expiry = self.expiry.filter(|(s, _)| *s > cleared);
        self
    }

    /// The join of two replicas' maps (module docs, laws).
    pub fn join(self, other: LwwMap) -> LwwMap {
        let cleared = self.cleared.max(other.cleared);
        let (mut big, small) = if self.fields.len() >= other.fields.len() {
            (self, other)
        } else {
            (other, self)
        };
        for (name, cell) in small.fields {
            match big.fields.get_mut(&name) {
                Some(mine) if mine.key() >= cell.key() => {}
                Some(mine) => *mine = cell,
                None => {
                    big.fields.insert(name, cell);
                }
            }
        }
        big.expiry = match (big.expiry, small.expiry) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        big.cleared_at(cleared)
    }

    /// The live fields (set, not deleted) in name order, or none once the key expired at
    /// `now_ms`.
    pub fn live(&self, now_ms: u64) -> Vec<(Bytes, Bytes)> {
        if self.expires_at_ms().is_some_and(|at| at <= now_ms) {
            return Vec::new();
        }
        self.fields
            .iter()
            .filter_map(|(name, c)| Some((name.clone(), c.value.clone()?)))
            .collect()
    }

    /// When the key expires, if it does.
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.expiry.and_then(|(_, at)| at)
    }

    /// From when the map reads as missing: 0 if no field is set, its expiry if it has one,
    /// never (`None`) otherwise.
    pub fn dead_from(&self) -> Option<u64> {
        if self.fields.values().all(|c| c.value.is_none()) {
            return Some(0);
        }
        self.expires_at_ms()
    }

    /// The length of [`LwwMap::encode_into`]'s output.
    pub fn encoded_len(&self) -> usize {
        let expiry = match self.expiry {
            None => 1,
            Some((_, None)) => 1 + 12,
            Some((_, Some(_))) => 1 + 20,
        };
        12 + expiry
            + 4
            + self
                .fields
                .iter()
                .map(|(n, c)| 2 + n.len() + 12 + c.value.as_ref().map_or(1, |v| 5 + v.len()))
                .sum::<usize>()
    }

    /// Feeds the encoding (module docs) to `sink`.
    pub fn encode_into(&self, sink: &mut impl FnMut(&[u8])) {
        stamp_out(&self.cleared, sink);
        expiry_out(&self.expiry, sink);
        let count =
            u32::try_from(self.fields.len()).expect("fields are bounded by the object size");
        sink(&count.to_le_bytes());
        for (name, cell) in &self.fields {
            let len = u16::try_from(name.len()).expect("field names are checked at 64 KiB");
            sink(&len.to_le_bytes());
            sink(name);
            stamp_out(&cell.stamp, sink);
            match &cell.value {
                None => sink(&[0]),
                Some(v) => {
                    sink(&[1]);
                    let len = u32::try_from(v.len()).expect("values are bounded far below 4 GiB");
                    sink(&len.to_le_bytes());
                    sink(v);
                }
            }
        }
    }

    /// Decodes the encoding at `r`'s position; refuses one that is not canonical (module docs).
    /// Values are slices of the input (no copy).
    pub(crate) fn decode(r: &mut Cursor<'_>) -> Result<LwwMap, ObjectError> {
        let stamp =
            |r: &mut Cursor<'_>| -> Result<Stamp, ObjectError> { Ok((r.u64()?, NodeId(r.u32()?))) };
        let cleared = stamp(r)?;
        let expiry = match r.u8()? {
            0 => None,
            tag @ (1 | 2) => {
                let s = stamp(r)?;
                if s <= cleared {
                    return Err(ObjectError::NotCanonical(
                        "map expiry at or before the clear",
                    ));
                }
                let at = if tag == 2 { Some(r.u64()?) } else { None };
                Some((s, at))
            }
            _ => return Err(ObjectError::NotCanonical("map expiry tag")),
        };
        let count = r.u32()? as usize;
        // Each field takes at least 15 bytes: the count is checked before anything is built.
        if count > r.remaining() / 15 {
            return Err(r.truncated());
        }
        let mut fields = BTreeMap::new();
        let mut last: Option<Bytes> = None;
        for _ in 0..count {
            let len = usize::from(r.u16()?);
            let name = r.bytes(len)?;
            if last.as_ref().is_some_and(|l| *l >= name) {
                return Err(ObjectError::NotCanonical("map fields out of order"));
            }
            let stamp = stamp(r)?;
            if stamp <= cleared {
                return Err(ObjectError::NotCanonical(
                    "map field at or before the clear",
                ));
            }
            let value = match r.u8()? {
                0 => None,
                1 => Some(r.value()?),
                _ => return Err(ObjectError::NotCanonical("map field tag")),
            };
            last = Some(name.clone());
            fields.insert(name, Cell { stamp, value });
        }
        Ok(LwwMap {
            cleared,
            fields,
            expiry,
        })
    }
}

/// Feeds a stamp's encoding (`ts u64 | node u32`) to `sink`.
pub(crate) fn stamp_out(s: &Stamp, sink: &mut impl FnMut(&[u8])) {
    sink(&s.0.to_le_bytes());
    sink(&s.1.0.to_le_bytes());
}

/// Feeds an expiry register's encoding to `sink`: `0x00` (none) | `0x01 stamp` (never) |
/// `0x02 stamp at u64`. Maps and convergent states write it alike.
pub(crate) fn expiry_out(expiry: &Option<(Stamp, Option<u64>)>, sink: &mut impl FnMut(&[u8])) {
    match expiry {
        None => sink(&[0]),
        Some((s, None)) => {
            sink(&[1]);
            stamp_out(s, sink);
        }
        Some((s, Some(at))) => {
            sink(&[2]);
            stamp_out(s, sink);
            sink(&at.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    /// Concurrent writes of different fields both survive; of one field, the later stamp wins;
    /// a clear drops what it superseded and nothing newer.
    #[test]
    fn fields_merge_one_by_one() {
        let a = LwwMap::from_changes((10, NodeId(1)), &[MapChange::Set(b("user"), b("alice"))]);
        let c = LwwMap::from_changes((11, NodeId(2)), &[MapChange::Set(b("cart"), b("3"))]);
        let merged = a.clone().join(c.clone());
        assert_eq!(
            merged.live(0),
            vec![(b("cart"), b("3")), (b("user"), b("alice"))]
        );
        let later = LwwMap::from_changes((12, NodeId(1)), &[MapChange::Set(b("user"), b("bob"))]);
        assert_eq!(
            merged.clone().join(later.clone()).live(0)[1],
            (b("user"), b("bob"))
        );
        let cleared = merged.join(later).cleared_at((11, NodeId(2)));
        assert_eq!(cleared.live(0), vec![(b("user"), b("bob"))]);
        let expiring = cleared.join(LwwMap::from_changes(
            (13, NodeId(3)),
            &[MapChange::Expire(Some(500))],
        ));
        assert_eq!(expiring.dead_from(), Some(500));
        assert!(expiring.live(500).is_empty());
        assert_eq!(expiring.live(499).len(), 1);
    }

    fn maps() -> impl Strategy<Value = LwwMap> {
        let change = prop_oneof![
            (0..3u8, 0..3u8)
                .prop_map(|(f, v)| MapChange::Set(b(&format!("f{f}")), b(&format!("v{v}")))),
            (0..3u8).prop_map(|f| MapChange::Delete(b(&format!("f{f}")))),
            prop::option::of(0..9u64).prop_map(MapChange::Expire),
        ];
        (
            prop::collection::vec(
                ((0..6u64, 1..3u32), prop::collection::vec(change, 1..3)),
                0..4,
            ),
            prop::option::of((0..6u64, 1..3u32)),
        )
            .prop_map(|(writes, clear)| {
                let mut map = LwwMap::default();
                for ((ts, node), changes) in writes {
                    map = map.join(LwwMap::from_changes((ts, NodeId(node)), &changes));
                }
                match clear {
                    Some((ts, node)) => map.cleared_at((ts, NodeId(node))),
                    None => map,
                }
            })
    }

    proptest! {
        /// The join laws, and the encoding round-trips canonically.
        #[test]
        fn join_is_a_semilattice(a in maps(), b in maps(), c in maps()) {
            prop_assert_eq!(a.clone().join(b.clone()), b.clone().join(a.clone()));
            prop_assert_eq!(
                a.clone().join(b.clone()).join(c.clone()),
                a.clone().join(b.clone().join(c))
            );
            prop_assert_eq!(a.clone().join(a.clone()), a.clone());
            let mut bytes = Vec::new();
            a.encode_into(&mut |s: &[u8]| bytes.extend_from_slice(s));
            prop_assert_eq!(bytes.len(), a.encoded_len());
            let object = crate::object::Object::Map(a);
            prop_assert_eq!(bytes.len() + 1, object.encoded_len());
            let decoded = crate::object::Object::decode(&Bytes::from(object.encode())).unwrap();
            prop_assert_eq!(decoded, object);
        }
    }
}
