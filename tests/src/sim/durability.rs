//! The durability checker: which nodes ever stored, and ever synced, a copy of each written value,
//! and what acknowledgements and the final state owe to that.
//!
//! A stored object *covers* a value written to its key if it holds the value or something that
//! superseded it: a `siblings` object's clock contains one of the value's dots; an `lww` object's
//! stamp is at least one the value was stored with. It *supersedes* the value if it covers it
//! without holding that dot. Values are unique (the workload tags them), so a value names a write.
//! For every value the simulator records on which nodes a sync ever made a covering (and a
//! superseding) object durable (the store's sync log), and whether a crash ever erased an
//! unsynced copy that covered (or superseded) it where the synced copy did not.
//!
//! What is checked:
//! - when a client receives PUT_OK, `w` distinct nodes have stored a copy that covers the write
//!   (a replica or a hint; so a coordinator that counts its own write before storing it, or one
//!   acknowledgement too many, is caught), and `dw` of them have synced one;
//!   when it receives DELETE_OK, every value its read returned is superseded by a synced copy on
//!   `dw` nodes. A store that failed syncs nothing, so a node whose write failed never counts;
//! - at the end, an acknowledged write that the final state neither holds nor superseded, or a
//!   value an acknowledged delete superseded that comes back, is a violation unless the write (the
//!   delete) asked for `dw = 0` and it was lost the only way `dw = 0` allows: no synced copy ever
//!   covered (superseded) the value on any node, and on every node that stored a copy a crash
//!   erased an unsynced one. Crashes here
//!   lose only unsynced data, so a write acknowledged with `dw >= 1` (synced on that many nodes
//!   when acknowledged) must survive whatever crashed.
//!
//! Convergent operations (increments, set adds and removes) are judged the same way, each under
//! a name of its own ([`Sim::note_op`]): a stored `Object::Crdt` covers an operation when its
//! operation log names the operation's id ([`Crdt::saw_op`]; every simulated operation carries
//! one, and a key sees fewer than the log keeps per actor, so a state holds an operation's effect
//! exactly when its log names it). Nothing supersedes one here: removes are operations of their
//! own. An APPLY_OK is held to `w` and `dw` as a PUT_OK, and the final convergent checks
//! (`checkers.rs`, [`Sim::check_convergent`]) excuse a missing operation only as `dw = 0`
//! allows, through [`Sim::lost_unsynced`].
//!
//! Limits: "ever" is the whole run. Values a write stored twice under two dots (a forward retried
//! on a second coordinator) are covered by either, and an increment retried on a second
//! coordinator by either attempt.
//!
//! [`Crdt::saw_op`]: ringkv_core::crdt::Crdt::saw_op

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_cluster::replica;
use ringkv_core::coordinator::StoreKey;
use ringkv_core::dvv::Dot;
use ringkv_core::object::{Object, Val};

use super::Sim;
use super::store::Entry;
use super::workload::key_bytes;

/// Nodes by value: where a value was ever covered (or superseded) in some way.
type Where = BTreeMap<Bytes, BTreeSet<usize>>;

/// The durability checker's records (module docs).
#[derive(Default)]
pub(super) struct Copies {
    /// Every dot each value was stored with.
    dots: BTreeMap<Bytes, BTreeSet<Dot>>,
    /// The values written to each (bucket, key).
    by_key: BTreeMap<(Bytes, Bytes), BTreeSet<Bytes>>,
    /// Nodes whose store took a write of a covering object (a replica or a hint).
    stored: Where,
    /// Nodes whose store took a write of a superseding object.
    superseded_stored: Where,
    /// Nodes where a sync made a covering object durable.
    synced: Where,
    /// Nodes where a sync made a superseding object durable.
    superseded_synced: Where,
    /// Nodes where a crash erased an unsynced copy covering the value.
    erased: Where,
    /// Nodes where a crash erased an unsynced copy superseding the value.
    unsuperseded: Where,
    /// The operation id of each convergent operation's name.
    op_ids: BTreeMap<Bytes, u64>,
}

fn value_of(val: &Val) -> Option<&Bytes> {
    match val {
        Val::Value(v) | Val::Expiring { value: v, .. } => Some(v),
        Val::Tombstone => None,
    }
}

impl Sim {
    /// Records convergent operation `op_id` on `bucket`/`key` under `name`, before it is sent,
    /// so every copy of the key is judged for it from then on.
    pub(super) fn note_op(&mut self, bucket: &'static [u8], key: usize, name: &Bytes, op_id: u64) {
        self.copies
            .by_key
            .entry((Bytes::from_static(bucket), key_bytes(key)))
            .or_default()
            .insert(name.clone());
        self.copies.op_ids.insert(name.clone(), op_id);
    }

    /// Records the dots and values of an object about to be written under `key` (with its lww
    /// stamps already recorded).
    pub(super) fn note_values(&mut self, key: &StoreKey, object: &Object) {
        let values = self
            .copies
            .by_key
            .entry((key.bucket.clone(), key.key.clone()))
            .or_default();
        match object {
            Object::Causal(c) => {
                for (dot, val) in c.dots() {
                    if let Some(v) = value_of(val) {
                        values.insert(v.clone());
                        self.copies.dots.entry(v.clone()).or_default().insert(dot);
                    }
                }
            }
            Object::Lww(l) => {
                if let Some(v) = value_of(&l.val)
                    && values.insert(v.clone())
                {
                    // An lww value is covered by any version with a higher stamp, which may
                    // have been stored before this value existed: every copy of the key is
                    // judged now. (A causal value's dot is covered only by objects that
                    // descend from the first write of it, all written after this.)
                    self.note_held(key, v);
                }
            }
            // Maps of registers are not simulated; convergent operations are named when they
            // are sent (`note_op`).
            Object::Map(_) | Object::Crdt(_) => {}
        }
    }

    /// Records where copies of `key` now cover `value`, and where synced ones do.
    fn note_held(&mut self, key: &StoreKey, value: &Bytes) {
        for n in 0..self.nodes.len() {
            let store = &self.nodes[n].store;
            let copies: Vec<StoreKey> = store
                .keys()
                .into_iter()
                .filter(|k| k.bucket == key.bucket && k.key == key.key)
                .collect();
            for k in copies {
                if store
                    .read(&k)
                    .is_some_and(|o| self.covering(&k, &o).0.contains(value))
                {
                    self.copies
                        .stored
                        .entry(value.clone())
                        .or_default()
                        .insert(n);
                }
                if store
                    .read_durable(&k)
                    .is_some_and(|o| self.covering(&k, &o).0.contains(value))
                {
                    self.copies
                        .synced
                        .entry(value.clone())
                        .or_default()
                        .insert(n);
                }
            }
        }
    }

    /// The values written to `key` that `object` covers, and those of them it supersedes.
    fn covering(&self, key: &StoreKey, object: &Object) -> (Vec<Bytes>, Vec<Bytes>) {
        let (mut covered, mut superseded) = (Vec::new(), Vec::new());
        let Some(values) = self
            .copies
            .by_key
            .get(&(key.bucket.clone(), key.key.clone()))
        else {
            return (covered, superseded);
        };
        match object {
            Object::Causal(c) => {
                let clock = c.join();
                let held: BTreeSet<Dot> = c.dots().map(|(d, _)| d).collect();
                for v in values {
                    let Some(dots) = self.copies.dots.get(v) else {
                        continue;
                    };
                    let mut seen = dots.iter().filter(|d| clock.contains(**d)).peekable();
                    if seen.peek().is_none() {
                        continue;
                    }
                    covered.push(v.clone());
                    if seen.any(|d| !held.contains(d)) {
                        superseded.push(v.clone());
                    }
                }
            }
            Object::Lww(l) => {
                let stamp = (l.timestamp, l.node);
                for v in values {
                    let Some(stamps) = self.lww_stamps.get(v) else {
                        continue;
                    };
                    if stamps.first().is_some_and(|s| *s <= stamp) {
                        covered.push(v.clone());
                        if value_of(&l.val) != Some(v) {
                            superseded.push(v.clone());
                        }
                    }
                }
            }
            Object::Crdt(state) => {
                for v in values {
                    if let Some(id) = self.copies.op_ids.get(v)
                        && state.saw_op(*id)
                    {
                        covered.push(v.clone());
                    }
                }
            }
            // Maps of registers are not simulated.
            Object::Map(_) => {}
        }
        (covered, superseded)
    }

    /// Takes every store's sync log: what was synced where.
    pub(super) fn note_synced(&mut self) {
        for n in 0..self.nodes.len() {
            for (key, object) in decoded(self.nodes[n].store.take_synced()) {
                let (covered, superseded) = self.covering(&key, &object);
                for v in covered {
                    self.copies.synced.entry(v).or_default().insert(n);
                }
                for v in superseded {
                    self.copies
                        .superseded_synced
                        .entry(v)
                        .or_default()
                        .insert(n);
                }
            }
        }
    }

    /// Node `n` crashed and lost `lost` (what those locations held before): values covered (or
    /// superseded) there that the synced copy left behind does not cover (supersede) were erased.
    pub(super) fn note_crash(&mut self, n: usize, lost: Vec<Entry>) {
        for (key, object) in decoded(lost) {
            let (covered, superseded) = self.covering(&key, &object);
            let (kept, kept_superseded) = match self.nodes[n].store.read_durable(&key) {
                Some(durable) => self.covering(&key, &durable),
                None => (Vec::new(), Vec::new()),
            };
            for v in covered.into_iter().filter(|v| !kept.contains(v)) {
                self.copies.erased.entry(v).or_default().insert(n);
            }
            for v in superseded
                .into_iter()
                .filter(|v| !kept_superseded.contains(v))
            {
                self.copies.unsuperseded.entry(v).or_default().insert(n);
            }
        }
    }

    /// Node `n`'s store took a write of `object` under `key`.
    pub(super) fn note_stored(&mut self, n: usize, key: &StoreKey, object: &Object) {
        let (covered, superseded) = self.covering(key, object);
        for v in covered {
            self.copies.stored.entry(v).or_default().insert(n);
        }
        for v in superseded {
            self.copies
                .superseded_stored
                .entry(v)
                .or_default()
                .insert(n);
        }
    }

    /// Whether some node's store ever took an object that supersedes `value` (a write that saw
    /// it, or a delete's tombstone): what makes a delete that was never acknowledged provably
    /// applied.
    pub(super) fn ever_superseded(&self, value: &Bytes) -> bool {
        self.copies.superseded_stored.contains_key(value)
    }

    /// A client was told its write of `value` succeeded: `w` nodes stored it, and `dw` of them
    /// synced it.
    pub(super) fn check_acked_write(&mut self, value: &Bytes, w: u8, dw: u8) {
        self.note_synced();
        let mut stored = self.copies.stored.get(value).cloned().unwrap_or_default();
        let mut synced = self.copies.synced.get(value).cloned().unwrap_or_default();
        if stored.len() < usize::from(w) || synced.len() < usize::from(dw) {
            let (held, held_durably) = self.held_above(value);
            stored.extend(held);
            synced.extend(held_durably);
        }
        assert!(
            stored.len() >= usize::from(w),
            "write {value:?} acknowledged with w = {w} but stored on {} nodes ({stored:?})",
            stored.len()
        );
        assert!(
            synced.len() >= usize::from(dw),
            "write {value:?} acknowledged with dw = {dw} but synced on {} nodes ({synced:?})",
            synced.len()
        );
    }

    /// A client was told its delete succeeded: every value its read returned is superseded by a
    /// synced copy on `dw` nodes.
    pub(super) fn check_acked_delete(&mut self, saw: &[Bytes], dw: u8) {
        self.note_synced();
        for value in saw {
            let synced = self
                .copies
                .superseded_synced
                .get(value)
                .map_or(0, BTreeSet::len);
            assert!(
                synced >= usize::from(dw),
                "a delete of {value:?} acknowledged with dw = {dw} but superseded durably on \
                 {synced} nodes"
            );
        }
    }

    /// Whether an acknowledged write of `value` with `dw` may be missing at the end: `dw = 0`,
    /// no synced copy ever covered it, and on every node that stored a copy a crash erased one.
    pub(super) fn lost_unsynced(&self, value: &Bytes, dw: u8) -> bool {
        dw == 0
            && !self.copies.synced.contains_key(value)
            && all_erased(self.copies.stored.get(value), self.copies.erased.get(value))
    }

    /// Whether `value`, superseded by an acknowledged delete with `dw`, may come back: `dw = 0`,
    /// no synced copy ever superseded it, and on every node that stored a superseding copy a
    /// crash erased one.
    pub(super) fn unsuperseded_unsynced(&self, value: &Bytes, dw: u8) -> bool {
        dw == 0
            && !self.copies.superseded_synced.contains_key(value)
            && all_erased(
                self.copies.superseded_stored.get(value),
                self.copies.unsuperseded.get(value),
            )
    }

    /// For a last-write-wins value: the nodes whose store now holds its key (as a replica or
    /// a hint) at its coordinator's stamp or a higher one, and those that hold it durably. A
    /// home that batches concurrent writes of one key stores only the highest-stamped, so a
    /// lower-stamped write is acknowledged without ever being stored as itself; the copies of
    /// the higher stamp are what stand for it. Empty for anything else.
    fn held_above(&self, value: &Bytes) -> (BTreeSet<usize>, BTreeSet<usize>) {
        let (mut held, mut durably) = (BTreeSet::new(), BTreeSet::new());
        let Some(&stamp) = self.lww_stamps.get(value).and_then(BTreeSet::first) else {
            return (held, durably);
        };
        let Some(write) = self.by_value.get(value).map(|id| &self.writes[id]) else {
            return (held, durably);
        };
        let (bucket, key) = (write.bucket, super::workload::key_bytes(write.key));
        let above =
            |o: Option<Object>| matches!(o, Some(Object::Lww(l)) if (l.timestamp, l.node) >= stamp);
        for (n, node) in self.nodes.iter().enumerate() {
            for k in node.store.keys() {
                if k.bucket != bucket || k.key != key {
                    continue;
                }
                if above(node.store.read(&k)) {
                    held.insert(n);
                }
                if above(node.store.read_durable(&k)) {
                    durably.insert(n);
                }
            }
        }
        (held, durably)
    }
}

/// Whether crashes erased a copy on every node that stored one (and there was one): only then
/// can a copy nobody synced be gone from every node without a bug.
fn all_erased(stored: Option<&BTreeSet<usize>>, erased: Option<&BTreeSet<usize>>) -> bool {
    match (stored, erased) {
        (Some(stored), Some(erased)) => stored.is_subset(erased),
        _ => false,
    }
}

/// The stored keys and objects of logged entries (removals left out).
fn decoded(entries: Vec<Entry>) -> Vec<(StoreKey, Object)> {
    entries
        .into_iter()
        .filter_map(|((partition, engine_key), bytes)| {
            let key = replica::store_key(partition, &engine_key).expect("stored keys decode");
            let object = Object::decode(&bytes?).expect("stored objects decode");
            Some((key, object))
        })
        .collect()
}
