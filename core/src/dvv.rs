//! Causality: dotted version vector sets (DVVSet) and the version vectors clients carry as context.
//!
//! A [`DvvSet`] is the causal metadata stored with a key on every replica, together with the key's
//! concurrent values (siblings). It follows Almeida, Baquero, Gonçalves, Preguiça and Fonte,
//! "Scalable and Accurate Causality Tracking for Eventually Consistent Stores" (DAIS 2014), the
//! structure Riak's `dvvset` module implements. Actors are **server nodes** ([`NodeId`]), never
//! clients, so a clock has at most one entry per node that ever coordinated a write of the key,
//! and siblings appear only for writes that were really concurrent, not for every client retry.
//!
//! # Representation
//!
//! A clock is a list of entries `(actor, counter, values)` sorted by actor. The entry says that
//! the actor's events `1..=counter` are in the clock's causal history, and that the last
//! `values.len()` of them are still live, one value each: value `i` (oldest first) has the *dot*
//! `(actor, counter − len + 1 + i)`. Every value therefore has exactly one dot, and the dots an
//! entry keeps are always the newest ones, because a context (a version vector) can only cover a
//! prefix of an actor's events. The form is canonical: sorted, no entry with counter 0, so two
//! clocks with the same history and the same live dots are equal (`==`).
//!
//! # Operations
//!
//! - [`Put::new`] / [`Put::new_with_context`]: a client's write: a value and the context of the
//!   read it is based on (`new/1`, `new/2` in `dvvset.erl`).
//! - [`DvvSet::update`]: the coordinator's event: the client's context is merged into the
//!   replica's clock, values whose dots the context covers are discarded, and the value gets the
//!   next dot of the coordinating actor.
//! - [`DvvSet::sync`]: merge two replicas' clocks; a value survives unless the other clock's
//!   history covers its dot without holding it (then something superseded it).
//! - [`DvvSet::join`]: the causal context (version vector) handed to clients with a read.
//! - [`DvvSet::discard`]: drop the values a context covers and absorb the context.
//!
//! # Laws (checked by the property tests in `cluster/tests/dvv.rs`)
//!
//! For clocks produced by these operations (so that a dot names one value):
//!
//! 1. `sync` is commutative, associative and idempotent, compared by canonical form, with the
//!    empty clock as identity: replicas converge whatever the order of anti-entropy exchanges.
//! 2. `join(sync(a, b)) = join(a) ⊔ join(b)` (pointwise max), so it dominates both.
//! 3. A put whose context comes from a read of the same replica supersedes exactly the values that
//!    read returned: `values(update(put(join(R), v), S)) = {v} ∪ (values(S) ∖ values(R))` for any
//!    later state `S` of that replica. Values written concurrently with the read survive as
//!    siblings. In general (read and put on different replicas) a put removes exactly the values
//!    whose dots its context covers.
//! 4. Two puts with the same stale context, on one coordinator or two, produce two siblings.
//! 5. A put with the context of a read that returned all siblings resolves them to one value.
//! 6. The values of any replica are exactly the writes its history covers that no write in its
//!    history superseded (checked against a model of every write's dot and context).
//!
//! # Deviation from `dvvset.erl`
//!
//! Riak's clocks also hold *anonymous* values (without a dot), used to carry a client's new value
//! into `update`. Mixed into replicated clocks they make `sync` non-associative (whether an
//! anonymous value survives depends on which clock it meets first). Here a client's write is a
//! separate type, [`Put`], and a [`DvvSet`] only ever holds dotted values, so `sync` is a lattice
//! join. There are no `lww`/`reconcile` helpers: `lww` buckets use another mechanism.
//!
//! # Contexts on the wire, and limits
//!
//! [`VersionVector::encode`] produces the opaque context bytes clients carry (format in
//! [`VersionVector::encode`]). [`VersionVector::decode`] accepts only the canonical encoding, at
//! most [`CONTEXT_ENTRIES_MAX`] entries ([`CONTEXT_BYTES_MAX`] bytes), and checks the length
//! before allocating anything, so a hostile context costs nothing. A clock gains an actor for each
//! node that coordinates the key, and more with epochs (a write coordinated away from every home,
//! each crash of a `buffered` node); the coordinator refuses a write that would give a key more
//! actors than a context carries, and actor pruning, which would bound clocks, does not exist
//! yet. Contexts are not authenticated: a forged context can supersede values the client never
//! read, and even writes the forged counters run ahead of; the coordinator only refuses counters
//! too large to be real.
//!
//! The number of siblings is not bounded here; the coordinator enforces a sibling limit.
//! An actor must never issue the same dot twice: see [`NodeId`] on node ids after data loss.

use std::collections::BTreeMap;

use crate::NodeId;

/// The author of causal events: a node in one of its *epochs*.
///
/// A node numbers the writes it coordinates per key, and a dot `(actor, n)` must name one value
/// forever. A node can lose the local state its numbering continues from (a crash in `buffered`
/// durability, a coordination with no local replica, a partition that moved away and back), so
/// it never continues an actor whose history it may have lost: it starts a new epoch instead,
/// which is a new actor with its own counters. Which epoch a coordinator may continue is the
/// coordinator's rule (`coordinator.rs`); here an actor is just an ordered pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Actor {
    /// The node.
    pub node: NodeId,
    /// The node's epoch; a node issues epochs in increasing order and never reuses one.
    pub epoch: u32,
}

impl Actor {
    /// `node` in `epoch`.
    pub const fn new(node: NodeId, epoch: u32) -> Self {
        Actor { node, epoch }
    }
}

impl From<NodeId> for Actor {
    /// The node's epoch 0.
    fn from(node: NodeId) -> Self {
        Actor { node, epoch: 0 }
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.node, self.epoch)
    }
}

/// Most entries a decoded context may have.
pub const CONTEXT_ENTRIES_MAX: usize = 256;
/// Format version written in the first byte of an encoded context.
const CONTEXT_FORMAT_VERSION: u8 = 2;
/// Format version byte plus the `u32` entry count.
const CONTEXT_HEADER_BYTES: usize = 1 + 4;
/// Actor (node `u32`, epoch `u32`) plus counter `u64`.
const CONTEXT_ENTRY_BYTES: usize = 4 + 4 + 8;
/// Largest context [`VersionVector::decode`] accepts, in bytes.
pub const CONTEXT_BYTES_MAX: usize =
    CONTEXT_HEADER_BYTES + CONTEXT_ENTRIES_MAX * CONTEXT_ENTRY_BYTES;

/// Largest counter a clock or a context may hold: far above any count a key reaches (a dot per
/// write), far below where `counter + 1` overflows. Decoded clocks and contexts are refused
/// above it, so damaged or hostile bytes cannot bring a counter that the next write, or a
/// merge's arithmetic, would overflow.
pub const COUNTER_MAX: u64 = 1 << 62;
const _: () = assert!(CONTEXT_ENTRIES_MAX as u64 <= u32::MAX as u64);
const _: () = assert!(CONTEXT_BYTES_MAX == 4101);

/// Why context bytes were rejected. Every variant is a client error: the bytes were not produced
/// by [`VersionVector::encode`] (or were damaged or forged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header.
    #[error("context of {len} bytes is shorter than its {CONTEXT_HEADER_BYTES}-byte header")]
    Truncated {
        /// Length of the input.
        len: usize,
    },
    /// The format version byte is not one this build knows.
    #[error("unknown context format version {version}")]
    UnknownVersion {
        /// The version found.
        version: u8,
    },
    /// The header announces more entries than [`CONTEXT_ENTRIES_MAX`].
    #[error("context announces {count} entries, more than the limit of {CONTEXT_ENTRIES_MAX}")]
    TooManyEntries {
        /// The announced count.
        count: u32,
    },
    /// The length does not match the announced entry count.
    #[error("context of {len} bytes should be {expected} bytes for {count} entries")]
    LengthMismatch {
        /// Length of the input.
        len: usize,
        /// Length implied by the count.
        expected: usize,
        /// The announced count.
        count: u32,
    },
    /// Actors are not strictly ascending (unsorted or repeated).
    #[error("context entry {index} is not in strictly ascending actor order")]
    Unordered {
        /// Index of the offending entry.
        index: usize,
    },
    /// A counter of zero (absent actors are left out, never written as 0).
    #[error("context entry {index} has a zero counter")]
    ZeroCounter {
        /// Index of the offending entry.
        index: usize,
    },
    /// A counter above [`COUNTER_MAX`]: forged or damaged, and it would overflow the next dot.
    #[error("context entry {index} has a counter above {COUNTER_MAX}")]
    CounterTooLarge {
        /// Index of the offending entry.
        index: usize,
    },
}

/// Why stored clock entries were rejected by [`DvvSet::from_entries`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// Actors are not strictly ascending.
    #[error("clock entry {index} is not in strictly ascending actor order")]
    Unordered {
        /// Index of the offending entry.
        index: usize,
    },
    /// A zero counter, one above [`COUNTER_MAX`], or more live values than events.
    #[error(
        "clock entry {index} has a zero counter, one above the limit, or more values than events"
    )]
    BadCounter {
        /// Index of the offending entry.
        index: usize,
    },
}

/// One event of one actor: the `counter`-th write coordinated by `actor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    /// The coordinating node and epoch.
    pub actor: Actor,
    /// Its event number, from 1.
    pub counter: u64,
}

/// A version vector: for each actor, how many of its events are known. Actors absent are at 0.
///
/// As the causal context of a read it says which writes the client has seen; a later put with it
/// supersedes exactly those. Ordered pointwise; [`VersionVector::merge`] is the least upper bound.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct VersionVector {
    /// No zero counters, so equal histories are equal maps.
    counters: BTreeMap<Actor, u64>,
}

impl VersionVector {
    /// The empty vector (no events known).
    pub fn new() -> Self {
        VersionVector::default()
    }

    /// How many of `actor`'s events are known.
    pub fn get(&self, actor: Actor) -> u64 {
        self.counters.get(&actor).copied().unwrap_or(0)
    }

    /// Whether `dot` is among the known events.
    pub fn contains(&self, dot: Dot) -> bool {
        dot.counter <= self.get(dot.actor)
    }

    /// Raises `actor`'s counter to at least `counter`.
    pub fn advance(&mut self, actor: Actor, counter: u64) {
        if counter > 0 {
            let known = self.counters.entry(actor).or_insert(0);
            *known = (*known).max(counter);
        }
    }

    /// Number of actors with a non-zero counter.
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    /// Whether no event is known.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    /// `(actor, counter)` pairs in actor order, counters non-zero.
    pub fn iter(&self) -> impl Iterator<Item = (Actor, u64)> + '_ {
        self.counters.iter().map(|(a, c)| (*a, *c))
    }

    /// Whether every event `other` knows is known here (`self ≥ other` pointwise).
    pub fn descends(&self, other: &VersionVector) -> bool {
        other
            .iter()
            .all(|(actor, counter)| self.get(actor) >= counter)
    }

    /// The pointwise maximum: the events known to either.
    pub fn merge(&self, other: &VersionVector) -> VersionVector {
        let mut merged = self.clone();
        for (actor, counter) in other.iter() {
            merged.advance(actor, counter);
        }
        merged
    }

    /// The opaque context bytes for clients. Little-endian:
    ///
    /// ```text
    /// version u8 = 2 | count u32 | count × (node u32 | epoch u32 | counter u64),
    ///                   actors (node, epoch) strictly ascending, counters ≥ 1
    /// ```
    ///
    /// Exactly `5 + 16 · count` bytes. Vectors with more than [`CONTEXT_ENTRIES_MAX`] entries are
    /// encoded too, but [`VersionVector::decode`] rejects them (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let count = u32::try_from(self.counters.len())
            .expect("actors are distinct u32 ids and 2^32 of them would not fit in memory");
        let mut bytes =
            Vec::with_capacity(CONTEXT_HEADER_BYTES + self.counters.len() * CONTEXT_ENTRY_BYTES);
        bytes.push(CONTEXT_FORMAT_VERSION);
        bytes.extend_from_slice(&count.to_le_bytes());
        for (actor, counter) in self.iter() {
            assert!(counter > 0, "version vectors hold no zero counters");
            bytes.extend_from_slice(&actor.node.0.to_le_bytes());
            bytes.extend_from_slice(&actor.epoch.to_le_bytes());
            bytes.extend_from_slice(&counter.to_le_bytes());
        }
        assert_eq!(
            bytes.len(),
            CONTEXT_HEADER_BYTES + self.counters.len() * CONTEXT_ENTRY_BYTES
        );
        bytes
    }

    /// Parses context bytes produced by [`VersionVector::encode`]. Only the canonical encoding is
    /// accepted (so `encode(decode(b)) == b`), with at most [`CONTEXT_ENTRIES_MAX`] entries; the
    /// count and the length are checked before anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<VersionVector, DecodeError> {
        let Some((header, body)) = bytes.split_first_chunk::<CONTEXT_HEADER_BYTES>() else {
            return Err(DecodeError::Truncated { len: bytes.len() });
        };
        let [version, count @ ..] = *header;
        if version != CONTEXT_FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion { version });
        }
        let count = u32::from_le_bytes(count);
        if count as usize > CONTEXT_ENTRIES_MAX {
            return Err(DecodeError::TooManyEntries { count });
        }
        // count ≤ CONTEXT_ENTRIES_MAX, so this cannot overflow.
        let expected = CONTEXT_HEADER_BYTES + count as usize * CONTEXT_ENTRY_BYTES;
        if bytes.len() != expected {
            return Err(DecodeError::LengthMismatch {
                len: bytes.len(),
                expected,
                count,
            });
        }
        let mut counters = BTreeMap::new();
        let mut previous: Option<Actor> = None;
        for (index, entry) in body.chunks_exact(CONTEXT_ENTRY_BYTES).enumerate() {
            let (node, rest) = entry.split_at(4);
            let (epoch, counter) = rest.split_at(4);
            let actor = Actor {
                node: NodeId(u32::from_le_bytes(
                    node.try_into()
                        .expect("chunks are 16 bytes: 4 for the node"),
                )),
                epoch: u32::from_le_bytes(
                    epoch
                        .try_into()
                        .expect("chunks are 16 bytes: 4 for the epoch"),
                ),
            };
            let counter = u64::from_le_bytes(
                counter
                    .try_into()
                    .expect("chunks are 16 bytes: 8 for the counter"),
            );
            if previous.is_some_and(|p| p >= actor) {
                return Err(DecodeError::Unordered { index });
            }
            if counter == 0 {
                return Err(DecodeError::ZeroCounter { index });
            }
            if counter > COUNTER_MAX {
                return Err(DecodeError::CounterTooLarge { index });
            }
            previous = Some(actor);
            counters.insert(actor, counter);
        }
        assert_eq!(counters.len(), count as usize);
        Ok(VersionVector { counters })
    }
}

impl FromIterator<(Actor, u64)> for VersionVector {
    /// Collects `(actor, counter)` pairs; repeated actors keep the largest counter, zeros vanish.
    fn from_iter<I: IntoIterator<Item = (Actor, u64)>>(iter: I) -> Self {
        let mut vv = VersionVector::new();
        for (actor, counter) in iter {
            vv.advance(actor, counter);
        }
        vv
    }
}

/// A client's write as the coordinator receives it: the new value and the causal context of the
/// read it is based on (empty for a blind write). Consumed by [`DvvSet::update`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Put<V> {
    context: VersionVector,
    value: V,
}

impl<V> Put<V> {
    /// A write with no causal context: it supersedes nothing and becomes a sibling of whatever the
    /// replica holds.
    pub fn new(value: V) -> Self {
        Put {
            context: VersionVector::new(),
            value,
        }
    }

    /// A write based on a read that returned `context`: it supersedes every value that read saw.
    pub fn new_with_context(context: VersionVector, value: V) -> Self {
        Put { context, value }
    }

    /// The causal context.
    pub fn context(&self) -> &VersionVector {
        &self.context
    }

    /// The value.
    pub fn value(&self) -> &V {
        &self.value
    }
}

/// One actor's entry: events `1..=counter` known, the last `values.len()` of them live.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Entry<V> {
    actor: Actor,
    counter: u64,
    /// Oldest first: `values[i]` has the dot `counter − len + 1 + i`.
    values: Vec<V>,
}

impl<V> Entry<V> {
    /// Events `1..=floor` are in the history but their values are not live here.
    fn floor(&self) -> u64 {
        self.counter - self.values.len() as u64
    }
}

/// A dotted version vector set: a key's causal history and its live, concurrent values.
///
/// See the module docs for the representation, the operations and the laws. Canonical: equal
/// clocks compare equal. Values are kept in actor order, oldest first within an actor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DvvSet<V> {
    /// Sorted by actor, strictly; counters ≥ 1; `values.len() ≤ counter`.
    entries: Vec<Entry<V>>,
}

impl<V> Default for DvvSet<V> {
    fn default() -> Self {
        DvvSet {
            entries: Vec::new(),
        }
    }
}

impl<V: Eq> DvvSet<V> {
    /// The clock of a key never written: no history, no values.
    pub fn empty() -> Self {
        DvvSet::default()
    }

    /// The coordinator's event for a client's `put` on a replica whose clock is `server`: the
    /// values `put`'s context covers are discarded, the context joins the history, and the value
    /// gets the dot `(actor, counter + 1)`. Values the context does not cover stay as siblings.
    ///
    /// `actor` must be the node running the update, and its counter must only ever grow (see
    /// [`Actor`]): the result is causally newer than both `server` and the context.
    pub fn update(put: Put<V>, server: DvvSet<V>, actor: Actor) -> DvvSet<V> {
        let Put { context, value } = put;
        let mut clock = server.discard(&context);
        let at = clock.entries.partition_point(|e| e.actor < actor);
        if clock.entries.get(at).is_none_or(|e| e.actor != actor) {
            clock.entries.insert(
                at,
                Entry {
                    actor,
                    counter: 0,
                    values: Vec::new(),
                },
            );
        }
        let entry = &mut clock.entries[at];
        entry.counter = entry
            .counter
            .checked_add(1)
            .expect("an actor cannot coordinate 2^64 writes of one key");
        entry.values.push(value);
        clock.assert_invariants();
        clock
    }

    /// Merges two replicas' clocks. The history is the union; a value survives unless the other
    /// clock's history covers its dot without holding it, which means a write that saw the value
    /// superseded it. Commutative, associative and idempotent (module docs, laws 1–2).
    pub fn sync(self, other: DvvSet<V>) -> DvvSet<V> {
        let mut merged = Vec::with_capacity(self.entries.len().max(other.entries.len()));
        let mut left = self.entries.into_iter().peekable();
        let mut right = other.entries.into_iter().peekable();
        loop {
            let next = match (left.peek(), right.peek()) {
                (None, None) => break,
                (Some(_), None) => left.next(),
                (None, Some(_)) => right.next(),
                (Some(l), Some(r)) if l.actor < r.actor => left.next(),
                (Some(l), Some(r)) if l.actor > r.actor => right.next(),
                (Some(_), Some(_)) => match (left.next(), right.next()) {
                    (Some(l), Some(r)) => Some(merge_entries(l, r)),
                    _ => unreachable!("both sides were peeked"),
                },
            };
            merged.extend(next);
        }
        let clock = DvvSet { entries: merged };
        clock.assert_invariants();
        clock
    }

    /// The causal history as a version vector: the context returned to clients with a read.
    pub fn join(&self) -> VersionVector {
        VersionVector {
            counters: self.entries.iter().map(|e| (e.actor, e.counter)).collect(),
        }
    }

    /// Drops the values whose dots `context` covers and adds `context` to the history, as a write
    /// based on `context` does. Equivalent to `sync` with a clock that has `context`'s history
    /// and no values.
    pub fn discard(self, context: &VersionVector) -> DvvSet<V> {
        let history = DvvSet {
            entries: context
                .iter()
                .map(|(actor, counter)| Entry {
                    actor,
                    counter,
                    values: Vec::new(),
                })
                .collect(),
        };
        self.sync(history)
    }

    /// The live values (siblings), in actor order, oldest first within an actor.
    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.entries.iter().flat_map(|e| e.values.iter())
    }

    /// The live values with their dots, in the order of [`DvvSet::values`].
    pub fn dots(&self) -> impl Iterator<Item = (Dot, &V)> + '_ {
        self.entries.iter().flat_map(|e| {
            let floor = e.floor();
            e.values.iter().zip(1..).map(move |(v, i)| {
                (
                    Dot {
                        actor: e.actor,
                        counter: floor + i,
                    },
                    v,
                )
            })
        })
    }

    /// The number of live values.
    pub fn size(&self) -> usize {
        self.entries.iter().map(|e| e.values.len()).sum()
    }

    /// Whether there is no live value (a never-written key, or a history whose values were all
    /// discarded).
    pub fn is_empty(&self) -> bool {
        self.size() == 0
    }

    /// The clock's entries in actor order: `(actor, counter, live values oldest first)`. With
    /// [`DvvSet::from_entries`], the way objects are stored and sent.
    pub fn entries(&self) -> impl Iterator<Item = (Actor, u64, &[V])> + '_ {
        self.entries
            .iter()
            .map(|e| (e.actor, e.counter, e.values.as_slice()))
    }

    /// Rebuilds a clock from [`DvvSet::entries`], checking what a clock must satisfy: actors
    /// strictly ascending, counters ≥ 1, at most `counter` values per entry.
    pub fn from_entries(
        entries: impl IntoIterator<Item = (Actor, u64, Vec<V>)>,
    ) -> Result<DvvSet<V>, ClockError> {
        let mut clock = DvvSet::empty();
        for (index, (actor, counter, values)) in entries.into_iter().enumerate() {
            if clock
                .entries
                .last()
                .is_some_and(|e: &Entry<V>| e.actor >= actor)
            {
                return Err(ClockError::Unordered { index });
            }
            if counter == 0 || counter > COUNTER_MAX || values.len() as u64 > counter {
                return Err(ClockError::BadCounter { index });
            }
            clock.entries.push(Entry {
                actor,
                counter,
                values,
            });
        }
        clock.assert_invariants();
        Ok(clock)
    }

    /// Maps every live value, keeping the dots.
    pub fn map<W: Eq>(self, mut f: impl FnMut(V) -> W) -> DvvSet<W> {
        DvvSet {
            entries: self
                .entries
                .into_iter()
                .map(|e| Entry {
                    actor: e.actor,
                    counter: e.counter,
                    values: e.values.into_iter().map(&mut f).collect(),
                })
                .collect(),
        }
    }

    fn assert_invariants(&self) {
        for pair in self.entries.windows(2) {
            assert!(pair[0].actor < pair[1].actor, "entries sorted by actor");
        }
        for e in &self.entries {
            assert!(e.counter > 0, "no empty entries");
            assert!(e.values.len() as u64 <= e.counter, "one dot per value");
        }
    }
}

/// Merges two entries of the same actor. The live dots are those above both floors: a dot at or
/// below one side's floor is dead there, and that side has seen it (floor < counter), so a write
/// that saw it superseded it. The side with the higher counter holds every dot above both floors
/// (its own floor is at most the larger one), so it keeps its newest values down to that floor; on
/// equal counters either side gives the same result.
fn merge_entries<V: Eq>(left: Entry<V>, right: Entry<V>) -> Entry<V> {
    assert_eq!(left.actor, right.actor);
    let floor = left.floor().max(right.floor());
    let (mut high, low) = if left.counter >= right.counter {
        (left, right)
    } else {
        (right, left)
    };
    let keep = high.counter - floor;
    assert!(keep <= high.values.len() as u64);
    let drop = high.values.len() - keep as usize;
    high.values.drain(..drop);
    // A dot names one value: where both sides hold it, they must agree. Comparing values can be
    // expensive (they may be large), hence debug only.
    debug_assert!(
        (floor + 1..=low.counter).all(|dot| {
            let in_high = (dot - high.floor() - 1) as usize;
            let in_low = (dot - low.floor() - 1) as usize;
            high.values.get(in_high) == low.values.get(in_low)
        }),
        "the same dot holds different values"
    );
    high
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const A: Actor = Actor::new(NodeId(1), 0);
    const B: Actor = Actor::new(NodeId(2), 0);

    fn values<V: Eq + Clone>(clock: &DvvSet<V>) -> Vec<V> {
        clock.values().cloned().collect()
    }

    /// The classic lost-update scenario: Mary and Peter both read v1; Mary writes v2 blind, then
    /// Peter writes v3 with v1's context. v3 supersedes v1 only; v2 survives as a sibling.
    #[test]
    fn concurrent_writers_keep_only_unseen_values() {
        let a0 = DvvSet::update(Put::new("v1"), DvvSet::empty(), A);
        let peter_context = a0.join();
        let a1 = DvvSet::update(Put::new("v2"), a0, A);
        assert_eq!(values(&a1), ["v1", "v2"]);
        let a2 = DvvSet::update(Put::new_with_context(peter_context, "v3"), a1, A);
        assert_eq!(values(&a2), ["v2", "v3"]);
        assert_eq!(a2.join().get(A), 3);
        let dots: Vec<u64> = a2.dots().map(|(d, _)| d.counter).collect();
        assert_eq!(dots, [2, 3]);
    }

    /// A replica that has seen a value superseded drops it on sync; the other keeps its own
    /// concurrent values.
    #[test]
    fn sync_drops_superseded_values() {
        let a = DvvSet::update(Put::new(1), DvvSet::empty(), A);
        let b = DvvSet::update(Put::new_with_context(a.join(), 2), a.clone(), B);
        assert_eq!(values(&b), [2]);
        assert_eq!(values(&a.clone().sync(b.clone())), [2]);
        assert_eq!(a.clone().sync(b.clone()), b.clone().sync(a));
        let c = DvvSet::update(Put::new(3), DvvSet::empty(), Actor::from(NodeId(3)));
        assert_eq!(values(&b.sync(c)), [2, 3]);
    }

    #[test]
    fn context_encoding_is_canonical_and_checked() {
        let vv: VersionVector = [(A, 3), (B, 1), (Actor::from(NodeId(7)), 0)]
            .into_iter()
            .collect();
        assert_eq!(vv.len(), 2);
        let bytes = vv.encode();
        assert_eq!(bytes.len(), 5 + 2 * 16);
        assert_eq!(VersionVector::decode(&bytes).unwrap(), vv);
        assert_eq!(
            VersionVector::decode(&[2, 0, 0, 0, 0]).unwrap(),
            VersionVector::new()
        );

        assert_eq!(
            VersionVector::decode(&bytes[..3]),
            Err(DecodeError::Truncated { len: 3 })
        );
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 1;
        assert_eq!(
            VersionVector::decode(&wrong_version),
            Err(DecodeError::UnknownVersion { version: 1 })
        );
        // A hostile count is rejected from the header alone.
        assert_eq!(
            VersionVector::decode(&[2, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::TooManyEntries { count: u32::MAX })
        );
        assert!(matches!(
            VersionVector::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::LengthMismatch { .. })
        ));
        let mut swapped = bytes.clone();
        swapped[5..21].copy_from_slice(&bytes[21..37]);
        swapped[21..37].copy_from_slice(&bytes[5..21]);
        assert_eq!(
            VersionVector::decode(&swapped),
            Err(DecodeError::Unordered { index: 1 })
        );
        let mut zero = bytes.clone();
        zero[13..21].fill(0);
        assert_eq!(
            VersionVector::decode(&zero),
            Err(DecodeError::ZeroCounter { index: 0 })
        );
    }

    /// The largest accepted context is exactly `CONTEXT_BYTES_MAX` bytes; one more entry is not.
    #[test]
    fn context_entry_limit() {
        let full: VersionVector = (0..CONTEXT_ENTRIES_MAX as u32)
            .map(|i| (Actor::from(NodeId(i)), 1))
            .collect();
        let bytes = full.encode();
        assert_eq!(bytes.len(), CONTEXT_BYTES_MAX);
        assert_eq!(VersionVector::decode(&bytes).unwrap(), full);
        let over: VersionVector = (0..=CONTEXT_ENTRIES_MAX as u32)
            .map(|i| (Actor::from(NodeId(i)), 1))
            .collect();
        assert_eq!(
            VersionVector::decode(&over.encode()),
            Err(DecodeError::TooManyEntries {
                count: CONTEXT_ENTRIES_MAX as u32 + 1
            })
        );
    }
}
