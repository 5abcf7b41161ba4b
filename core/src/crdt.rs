//! Convergent data types: counters, sets and maps that merge without siblings (a shopping
//! cart, a like counter, a session of named fields).
//!
//! A client sends *operations* (increment, add, remove, change a field: [`CrdtOp`]); the
//! coordinator applies them to its replica's state ([`Crdt::apply`]) and replicates the merged
//! state, which every replica joins into its own ([`Crdt::join`]). No application writes merge
//! code and no add is lost to a concurrent write.
//!
//! # Representation: one causal context, dot stores under it
//!
//! The state of a key is a *causal* CRDT in the sense of Almeida, Shoker and Baquero ("Delta
//! State Replicated Data Types", 2018): one version vector for the key (`clock`, actors as in
//! `dvv.rs`, a server node in an epoch), and *slots* that hold what survives, each tagged with
//! the dot (actor, event) of the request that wrote it. An actor holds at most one slot per
//! element or field, its latest:
//!
//! - **counter**: per actor, the totals it has added and subtracted since the last removal it
//!   saw (`Tally`). The value is the sum of what survives.
//! - **set** (add-wins observed-remove): per element, the dots of the adds that survive. An add
//!   replaces the element's dots with its own; a remove drops them.
//! - **map**: fields keyed by name *and* kind, each a store of its own kind: a register (per
//!   actor its latest assignment, read as the one with the latest stamp), a counter, a set, or an
//!   enable-wins flag (the dots of the enables that survive).
//!
//! A request takes one new dot of its coordinator's actor, whatever it changes.
//!
//! # Merge, and the rules users see
//!
//! Two states of one generation (below) join slot by slot: a slot survives if both hold it, or
//! if the other side's clock has not seen its dot. A dot the other side has seen but does not
//! hold was removed there. So:
//!
//! - **A remove removes what its coordinator has seen.** An add it has not seen survives (the
//!   add wins, as a concurrent one would). No client reads before it removes.
//! - **Removing a map field concurrently with an update keeps the field**, with what the
//!   update's coordinator had: for a counter field, that coordinator's total (its earlier counts
//!   included); for a set field, the elements it added; for a register, its value.
//! - **Deleting the whole key** (DELETE, coordinated by the key's first reachable home like the
//!   operations) removes everything its coordinator has seen; the key
//!   reads as missing, and anti-entropy reaps it like a tombstone once every replica agrees. A
//!   later operation starts from nothing: the old elements do not come back, and no sibling is
//!   left. An increment concurrent with the deletion keeps its coordinator's total, as above.
//! - A key has one type. The *generation* is the stamp of the whole-key write the state replaced
//!   (0 for a key that never held anything, the expired state's latest stamp for a key that
//!   expired): a state of a later generation replaces an earlier one entirely, so an operation
//!   on an expired key starts afresh, as in Redis. Against a plain value or a Redis hash (the
//!   `lww` objects), a convergent state behaves as a whole-key write stamped with its
//!   generation ([`crate::object::Object::merge`]): a `SET` after it replaces it (and increments
//!   concurrent with that `SET` are lost, as in Redis), and it replaces what it was created
//!   over.
//!
//! Retries: an [`ringkv_net::Apply`] may carry a client operation id. The coordinator records
//! the last [`OP_LOG_MAX`] ids of its actor in the state (a slot like any other, so the ids
//! replicate with it), and a request whose id any actor recorded is acknowledged without being
//! applied again. Operations are coordinated by the key's first reachable home, so a retry
//! meets the replica that applied the first attempt while that home is up, and another home
//! once the first attempt has replicated there. A retry counts again if it comes after more
//! than [`OP_LOG_MAX`] later identified operations through the same actor, through a replica
//! that has not received the first attempt (the first attempt's coordinator was cut off, which
//! is also why the client got no answer: the simulator sees this under partitions), or after
//! anti-entropy reaped the emptied key, whose ids went with it.
//!
//! # Laws
//!
//! [`Crdt::join`] is commutative, associative and idempotent for states built by
//! [`Crdt::apply`] and joins (a join-semilattice: per generation, the product of the clock's
//! pointwise maximum, the dot stores and the expiry register; a later generation above all of an
//! earlier one). The property tests below check the laws, and that every acknowledged add and
//! increment is in every state that has seen it and no remove that saw it: *no acknowledged add
//! is lost* against a model of every operation's dot.
//!
//! # Limits
//!
//! A set holds at most [`ELEMENTS_MAX`] elements and a map [`FIELDS_MAX`] fields (a set field
//! counts its elements against the map's limit): an add beyond them is refused (`too_large`),
//! removes always work. Metadata per element or field is at most one slot per actor, and a key
//! has at most [`CONTEXT_ENTRIES_MAX`] actors (as a causal key). A counter's value saturates at
//! the `i64` range if concurrent increments pass it; a coordinator refuses an increment that
//! would take its own view past it.
//!
//! # Encoding (inside [`crate::object::Object`]'s, after its tag)
//!
//! ```text
//! generation ts u64 node u32 | clock u16 × (actor | counter u64)
//! | expiry: 0x00 | 0x01 stamp (never) | 0x02 stamp at u64
//! | oplog u16 × (actor | dot u64 | ids u8 × u64)
//! | counter: tallies
//! | set: elements
//! | map u32 × (name u16 len bytes | kind u8 | store)
//! store: 0x01 register u16 × (actor | dot u64 | stamp | len u32 bytes)
//!      | 0x02 tallies | 0x03 elements | 0x04 flag dots
//! tallies: u16 × (actor | dot u64 | added u64 | subtracted u64)
//! elements: u32 × (len u32 bytes | dots)
//! dots: u16 × (actor | dot u64)
//! actor: node u32 | epoch u32        stamp: ts u64 | node u32
//! ```
//!
//! Everything is in key order, no element or field is empty, every dot is in the clock: the
//! encoding is canonical (anti-entropy compares digests), and the decoder refuses any other.

use std::collections::BTreeMap;

use bytes::Bytes;
use ringkv_net::{CrdtOp, CrdtType, CrdtValue, Expiry, FieldOp, FieldValue};

use crate::NodeId;
use crate::dvv::{Actor, CONTEXT_ENTRIES_MAX, COUNTER_MAX};
use crate::map::{Stamp, expiry_out, stamp_out};
use crate::object::{Cursor, ObjectError};

/// Operation ids an actor remembers for deduplication (module docs).
pub const OP_LOG_MAX: usize = 64;
/// Most elements of a set.
pub const ELEMENTS_MAX: usize = 10_000;
/// Most fields of a map (a set field's elements count too).
pub const FIELDS_MAX: usize = 10_000;

/// The key's causal history: per actor, the last event seen.
type Clock = BTreeMap<Actor, u64>;

fn seen(clock: &Clock, actor: &Actor) -> u64 {
    clock.get(actor).copied().unwrap_or(0)
}

/// Per actor, its latest surviving event (the dot's counter) and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slots<P>(BTreeMap<Actor, (u64, P)>);

impl<P> Default for Slots<P> {
    fn default() -> Self {
        Slots(BTreeMap::new())
    }
}

impl<P: Clone + PartialEq + std::fmt::Debug> Slots<P> {
    /// The join of two replicas' slots under their clocks `mine` and `theirs` (module docs).
    fn join(&self, mine: &Clock, other: &Slots<P>, theirs: &Clock) -> Slots<P> {
        let mut out = BTreeMap::new();
        for (actor, (n, p)) in &self.0 {
            let both = other.0.get(actor).is_some_and(|(m, _)| m == n);
            if both || *n > seen(theirs, actor) {
                out.insert(*actor, (*n, p.clone()));
            }
        }
        for (actor, (m, q)) in &other.0 {
            if *m > seen(mine, actor) {
                // Every dot is in its own clock, so one side's slot and a newer slot of the same
                // actor on the other side cannot both be unseen by the other side.
                let earlier = out.insert(*actor, (*m, q.clone()));
                debug_assert!(
                    earlier.as_ref().is_none_or(|(n, _)| n == m),
                    "two slots of {actor} survive a join: {earlier:?} and {m}"
                );
            }
        }
        Slots(out)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Replaces every slot with the actor's new one: what an add or an assignment does to
    /// what its coordinator has seen.
    fn only(actor: Actor, dot: u64, payload: P) -> Slots<P> {
        Slots(BTreeMap::from([(actor, (dot, payload))]))
    }
}

/// What one actor added to and subtracted from a counter, in total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// The sum of its increments.
    pub added: u64,
    /// The sum of its decrements (as positive numbers).
    pub subtracted: u64,
}

type Elements = BTreeMap<Bytes, Slots<()>>;

fn counter_value(slots: &Slots<Tally>) -> i64 {
    let sum: i128 = slots
        .0
        .values()
        .map(|(_, t)| i128::from(t.added) - i128::from(t.subtracted))
        .sum();
    i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX })
}

fn join_elements(a: &Elements, ca: &Clock, b: &Elements, cb: &Clock) -> Elements {
    let empty = Slots::default();
    let mut out = BTreeMap::new();
    for name in a.keys().chain(b.keys()) {
        if out.contains_key(name) {
            continue;
        }
        let joined = a
            .get(name)
            .unwrap_or(&empty)
            .join(ca, b.get(name).unwrap_or(&empty), cb);
        if !joined.is_empty() {
            out.insert(name.clone(), joined);
        }
    }
    out
}

/// The kind of a map field; part of its key, so two kinds of one name never merge into each
/// other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum FieldKind {
    /// A last-write-wins register.
    Register = 1,
    /// A counter.
    Counter = 2,
    /// A set.
    Set = 3,
    /// An enable-wins flag.
    Flag = 4,
}

/// The store of one map field.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Store {
    Register(Slots<(Stamp, Bytes)>),
    Counter(Slots<Tally>),
    Set(Elements),
    Flag(Slots<()>),
}

impl Store {
    fn empty(kind: FieldKind) -> Store {
        match kind {
            FieldKind::Register => Store::Register(Slots::default()),
            FieldKind::Counter => Store::Counter(Slots::default()),
            FieldKind::Set => Store::Set(BTreeMap::new()),
            FieldKind::Flag => Store::Flag(Slots::default()),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Store::Register(s) => s.is_empty(),
            Store::Counter(s) => s.is_empty(),
            Store::Set(e) => e.is_empty(),
            Store::Flag(s) => s.is_empty(),
        }
    }

    /// Elements or fields it counts against the map's limit.
    fn weight(&self) -> usize {
        match self {
            Store::Set(e) => e.len().max(1),
            _ => 1,
        }
    }

    fn join(&self, mine: &Clock, other: &Store, theirs: &Clock) -> Store {
        match (self, other) {
            (Store::Register(a), Store::Register(b)) => Store::Register(a.join(mine, b, theirs)),
            (Store::Counter(a), Store::Counter(b)) => Store::Counter(a.join(mine, b, theirs)),
            (Store::Set(a), Store::Set(b)) => Store::Set(join_elements(a, mine, b, theirs)),
            (Store::Flag(a), Store::Flag(b)) => Store::Flag(a.join(mine, b, theirs)),
            _ => unreachable!("fields are keyed by kind, so a join meets stores of one kind"),
        }
    }

    fn value(&self) -> FieldValue {
        match self {
            Store::Register(s) => {
                let latest = s.0.values().map(|(_, (stamp, v))| (stamp, v)).max();
                FieldValue::Register(latest.map(|(_, v)| v.clone()).unwrap_or_default())
            }
            Store::Counter(s) => FieldValue::Counter(counter_value(s)),
            Store::Set(e) => FieldValue::Set(e.keys().cloned().collect()),
            Store::Flag(_) => FieldValue::Flag,
        }
    }
}

/// An operation that cannot be applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    /// The key, or the field, holds another type.
    #[error("the {what} holds a {holds}, not a {wanted}")]
    WrongType {
        /// "key" or "field NAME".
        what: String,
        /// The type it holds.
        holds: &'static str,
        /// The type the operation works on.
        wanted: &'static str,
    },
    /// An operation of another type than the request's.
    #[error("a {op} operation in a request on a {crdt}")]
    Mismatch {
        /// The operation.
        op: &'static str,
        /// The request's type.
        crdt: &'static str,
    },
    /// An increment of a register field that does not hold an integer.
    #[error("field {0} holds a value that is not an integer")]
    NotAnInteger(String),
    /// A counter would leave the `i64` range.
    #[error("increment or decrement would overflow")]
    Overflow,
    /// A set or map would pass its limit.
    #[error("the {what} would hold {count} elements or fields, above the limit of {limit}")]
    TooMany {
        /// "set" or "map".
        what: &'static str,
        /// How many it would hold.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The key would name more actors than a clock may.
    #[error("the key's causal history would name {0} actors, above {CONTEXT_ENTRIES_MAX}")]
    TooManyActors(usize),
}

/// The name of a convergent type, as errors and tools print it.
pub fn type_name(crdt: CrdtType) -> &'static str {
    match crdt {
        CrdtType::Counter => "counter",
        CrdtType::Set => "set",
        CrdtType::Map => "map",
    }
}

fn kind_name(kind: FieldKind) -> &'static str {
    match kind {
        FieldKind::Register => "register",
        FieldKind::Counter => "counter",
        FieldKind::Set => "set",
        FieldKind::Flag => "flag",
    }
}

/// The state of a convergent data type under one key (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crdt {
    generation: Stamp,
    clock: Clock,
    expiry: Option<(Stamp, Option<u64>)>,
    oplog: Slots<Vec<u64>>,
    counter: Slots<Tally>,
    set: Elements,
    map: BTreeMap<(Bytes, FieldKind), Store>,
}

/// The generation of a key that never held anything.
pub const FIRST_GENERATION: Stamp = (0, NodeId(0));

impl Crdt {
    /// The empty state of `generation` (module docs).
    pub fn new(generation: Stamp) -> Crdt {
        Crdt {
            generation,
            clock: Clock::new(),
            expiry: None,
            oplog: Slots::default(),
            counter: Slots::default(),
            set: BTreeMap::new(),
            map: BTreeMap::new(),
        }
    }

    /// The whole-key write this state replaced (module docs).
    pub fn generation(&self) -> Stamp {
        self.generation
    }

    /// The latest stamp anywhere in the state: its generation, its expiry register, its
    /// registers. A coordinator's clock stays above it, and a state that expired starts its
    /// next generation here.
    pub fn latest(&self) -> Stamp {
        let registers = self.map.values().flat_map(|s| match s {
            Store::Register(slots) => slots.0.values().map(|(_, (stamp, _))| *stamp).max(),
            _ => None,
        });
        let expiry = self.expiry.iter().map(|(s, _)| *s);
        registers.chain(expiry).fold(self.generation, Stamp::max)
    }

    /// The actors of the key's history.
    pub fn actors(&self) -> impl Iterator<Item = Actor> + '_ {
        self.clock.keys().copied()
    }

    /// The type the key holds: the one with content (`None` when empty). Concurrent first
    /// operations of two types on one key can leave two; the order below picks one to show.
    pub fn crdt_type(&self) -> Option<CrdtType> {
        if !self.map.is_empty() {
            Some(CrdtType::Map)
        } else if !self.set.is_empty() {
            Some(CrdtType::Set)
        } else if !self.counter.is_empty() {
            Some(CrdtType::Counter)
        } else {
            None
        }
    }

    /// When the key expires, if it does.
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.expiry.and_then(|(_, at)| at)
    }

    /// From when the key reads as missing: 0 when nothing is left in it, its expiry if it has
    /// one, never (`None`) otherwise; anti-entropy reaps it from then on, like a tombstone.
    pub fn dead_from(&self) -> Option<u64> {
        if self.crdt_type().is_none() {
            return Some(0);
        }
        self.expires_at_ms()
    }

    /// The value as a reader at `now_ms` sees it; `None` when the key is empty or expired.
    pub fn value(&self, now_ms: u64) -> Option<CrdtValue> {
        if self.expires_at_ms().is_some_and(|at| at <= now_ms) {
            return None;
        }
        Some(match self.crdt_type()? {
            CrdtType::Counter => CrdtValue::Counter(counter_value(&self.counter)),
            CrdtType::Set => CrdtValue::Set(self.set.keys().cloned().collect()),
            CrdtType::Map => {
                // One value per name: the highest kind, if two first writes of one name raced.
                let mut fields: Vec<(Bytes, FieldValue)> = Vec::with_capacity(self.map.len());
                for ((name, _), store) in &self.map {
                    match fields.last_mut() {
                        Some((last, value)) if last == name => *value = store.value(),
                        _ => fields.push((name.clone(), store.value())),
                    }
                }
                CrdtValue::Map(fields)
            }
        })
    }

    /// The join of two replicas' states (module docs, laws).
    pub fn join(self, other: Crdt) -> Crdt {
        if self.generation != other.generation {
            return if self.generation > other.generation {
                self
            } else {
                other
            };
        }
        let (ca, cb) = (&self.clock, &other.clock);
        let mut clock = ca.clone();
        for (actor, n) in cb {
            let e = clock.entry(*actor).or_insert(0);
            *e = (*e).max(*n);
        }
        let mut map = BTreeMap::new();
        for key in self.map.keys().chain(other.map.keys()) {
            if map.contains_key(key) {
                continue;
            }
            let empty = Store::empty(key.1);
            let joined = self.map.get(key).unwrap_or(&empty).join(
                ca,
                other.map.get(key).unwrap_or(&empty),
                cb,
            );
            if !joined.is_empty() {
                map.insert(key.clone(), joined);
            }
        }
        Crdt {
            generation: self.generation,
            expiry: self.expiry.max(other.expiry),
            oplog: self.oplog.join(ca, &other.oplog, cb),
            counter: self.counter.join(ca, &other.counter, cb),
            set: join_elements(&self.set, ca, &other.set, cb),
            map,
            clock,
        }
    }

    /// Whether an operation with this client id was applied (module docs, retries).
    pub fn saw_op(&self, op_id: u64) -> bool {
        self.oplog.0.values().any(|(_, ids)| ids.contains(&op_id))
    }

    /// Applies a request's operations as `actor` at `stamp` (the coordinator's hybrid clock),
    /// reading expiries at `now_ms`: all of them or none. The caller has checked that the
    /// request is not a retry ([`Crdt::saw_op`]) and that the state is live (an expired one is
    /// replaced by a new generation first).
    pub fn apply(
        &mut self,
        actor: Actor,
        stamp: Stamp,
        crdt: CrdtType,
        ops: &[CrdtOp],
        op_id: Option<u64>,
        now_ms: u64,
    ) -> Result<(), CrdtError> {
        if let Some(holds) = self.crdt_type().filter(|&t| t != crdt) {
            return Err(CrdtError::WrongType {
                what: "key".into(),
                holds: type_name(holds),
                wanted: type_name(crdt),
            });
        }
        let mut next = self.clone();
        let dot = seen(&next.clock, &actor) + 1;
        assert!(
            dot <= COUNTER_MAX,
            "decoded clocks are bounded, and a key sees far fewer writes"
        );
        next.clock.insert(actor, dot);
        for op in ops {
            next.apply_one(actor, dot, stamp, crdt, op, now_ms)?;
        }
        if let Some(id) = op_id {
            let mut ids = next
                .oplog
                .0
                .get(&actor)
                .map(|(_, ids)| ids.clone())
                .unwrap_or_default();
            if ids.len() == OP_LOG_MAX {
                ids.remove(0);
            }
            ids.push(id);
            next.oplog.0.insert(actor, (dot, ids));
        }
        next.check_limits()?;
        *self = next;
        Ok(())
    }

    /// Removes everything in the state (a DELETE of the key, module docs): what a later join
    /// brings that this state has not seen survives.
    pub fn clear(&mut self) {
        self.counter = Slots::default();
        self.set.clear();
        self.map.clear();
    }

    fn apply_one(
        &mut self,
        actor: Actor,
        dot: u64,
        stamp: Stamp,
        crdt: CrdtType,
        op: &CrdtOp,
        now_ms: u64,
    ) -> Result<(), CrdtError> {
        let mismatch = |op: &'static str| CrdtError::Mismatch {
            op,
            crdt: type_name(crdt),
        };
        match (crdt, op) {
            (_, CrdtOp::Expire(e)) => {
                let at = match *e {
                    Expiry::Ttl { ms } => Some(now_ms.saturating_add(ms)),
                    Expiry::At { unix_ms } => Some(unix_ms),
                    Expiry::Never => None,
                };
                self.expiry = Some((stamp, at));
            }
            (CrdtType::Counter, CrdtOp::Increment(by)) => {
                increment(&mut self.counter, actor, dot, *by)?;
            }
            (CrdtType::Set, CrdtOp::Add(e)) => {
                self.set.insert(e.clone(), Slots::only(actor, dot, ()));
            }
            (CrdtType::Set, CrdtOp::Remove(e)) => {
                self.set.remove(e);
            }
            (CrdtType::Map, CrdtOp::Field { name, op }) => {
                self.field(actor, dot, stamp, name, op)?;
            }
            (CrdtType::Map, CrdtOp::RemoveField(name)) => {
                self.map.retain(|(n, _), _| n != name);
            }
            (_, CrdtOp::Increment(_)) => return Err(mismatch("counter")),
            (_, CrdtOp::Add(_) | CrdtOp::Remove(_)) => return Err(mismatch("set")),
            (_, CrdtOp::Field { .. } | CrdtOp::RemoveField(_)) => return Err(mismatch("map")),
        }
        Ok(())
    }

    fn field(
        &mut self,
        actor: Actor,
        dot: u64,
        stamp: Stamp,
        name: &Bytes,
        op: &FieldOp,
    ) -> Result<(), CrdtError> {
        let kind = match op {
            FieldOp::Assign(_) => FieldKind::Register,
            FieldOp::Increment(_) => FieldKind::Counter,
            FieldOp::Add(_) | FieldOp::Remove(_) => FieldKind::Set,
            FieldOp::Enable | FieldOp::Disable => FieldKind::Flag,
        };
        let other = self
            .map
            .keys()
            .find(|(n, k)| n == name && *k != kind)
            .map(|(_, k)| *k);
        let mut start = None;
        match (other, op) {
            (None, _) => {}
            // An assignment replaces a field of any kind, as Redis's HSET does; an increment
            // turns a register holding an integer into a counter from it, as HINCRBY does.
            (Some(_), FieldOp::Assign(_)) => self.map.retain(|(n, _), _| n != name),
            (Some(FieldKind::Register), FieldOp::Increment(_)) => {
                let key = (name.clone(), FieldKind::Register);
                let number = match self.map.get(&key).map(Store::value) {
                    Some(FieldValue::Register(v)) => std::str::from_utf8(&v)
                        .ok()
                        .and_then(|t| t.parse::<i64>().ok()),
                    _ => None,
                };
                let Some(n) = number else {
                    return Err(CrdtError::NotAnInteger(
                        String::from_utf8_lossy(name).into_owned(),
                    ));
                };
                self.map.remove(&key);
                start = Some(n);
            }
            (Some(holds), _) => {
                return Err(CrdtError::WrongType {
                    what: format!("field {}", String::from_utf8_lossy(name)),
                    holds: kind_name(holds),
                    wanted: kind_name(kind),
                });
            }
        }
        let key = (name.clone(), kind);
        let store = self
            .map
            .entry(key.clone())
            .or_insert_with(|| Store::empty(kind));
        // The register's integer is the counter's start, counted as this operation's too.
        if let (Some(n), Store::Counter(s)) = (start, &mut *store) {
            increment(s, actor, dot, n)?;
        }
        match (&mut *store, op) {
            (Store::Register(s), FieldOp::Assign(v)) => {
                *s = Slots::only(actor, dot, (stamp, v.clone()))
            }
            (Store::Counter(s), FieldOp::Increment(by)) => increment(s, actor, dot, *by)?,
            (Store::Set(e), FieldOp::Add(x)) => {
                e.insert(x.clone(), Slots::only(actor, dot, ()));
            }
            (Store::Set(e), FieldOp::Remove(x)) => {
                e.remove(x);
            }
            (Store::Flag(s), FieldOp::Enable) => *s = Slots::only(actor, dot, ()),
            (Store::Flag(s), FieldOp::Disable) => *s = Slots::default(),
            _ => unreachable!("the store was made for the operation's kind"),
        }
        if self.map.get(&key).is_some_and(Store::is_empty) {
            self.map.remove(&key);
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), CrdtError> {
        if self.set.len() > ELEMENTS_MAX {
            return Err(CrdtError::TooMany {
                what: "set",
                count: self.set.len(),
                limit: ELEMENTS_MAX,
            });
        }
        let fields: usize = self.map.values().map(Store::weight).sum();
        if fields > FIELDS_MAX {
            return Err(CrdtError::TooMany {
                what: "map",
                count: fields,
                limit: FIELDS_MAX,
            });
        }
        if self.clock.len() > CONTEXT_ENTRIES_MAX {
            return Err(CrdtError::TooManyActors(self.clock.len()));
        }
        Ok(())
    }

    /// The length of [`Crdt::encode_into`]'s output.
    pub fn encoded_len(&self) -> usize {
        let mut len = 0;
        self.encode_into(&mut |b: &[u8]| len += b.len());
        len
    }

    /// Feeds the encoding (module docs) to `sink`.
    pub fn encode_into(&self, sink: &mut impl FnMut(&[u8])) {
        stamp_out(&self.generation, sink);
        sink(&count16(self.clock.len()).to_le_bytes());
        for (actor, n) in &self.clock {
            actor_out(actor, sink);
            sink(&n.to_le_bytes());
        }
        expiry_out(&self.expiry, sink);
        slots_out(&self.oplog, sink, |ids, sink| {
            sink(&[u8::try_from(ids.len()).expect("the op log is bounded")]);
            for id in ids {
                sink(&id.to_le_bytes());
            }
        });
        slots_out(&self.counter, sink, tally_out);
        elements_out(&self.set, sink);
        let count = u32::try_from(self.map.len()).expect("fields are bounded");
        sink(&count.to_le_bytes());
        for ((name, kind), store) in &self.map {
            let len = u16::try_from(name.len()).expect("field names are checked at 64 KiB");
            sink(&len.to_le_bytes());
            sink(name);
            sink(&[*kind as u8]);
            match store {
                Store::Register(s) => slots_out(s, sink, |(stamp, v), sink| {
                    stamp_out(stamp, sink);
                    bytes_out(v, sink);
                }),
                Store::Counter(s) => slots_out(s, sink, tally_out),
                Store::Set(e) => elements_out(e, sink),
                Store::Flag(s) => slots_out(s, sink, |_, _| {}),
            }
        }
    }

    /// Decodes the encoding at `r`'s position; refuses one that is not canonical (module docs).
    pub(crate) fn decode(r: &mut Cursor<'_>) -> Result<Crdt, ObjectError> {
        let generation = stamp_in(r)?;
        let n = usize::from(r.u16()?);
        if n > r.remaining() / 16 || n > CONTEXT_ENTRIES_MAX {
            return Err(r.truncated());
        }
        let mut clock = Clock::new();
        let mut last = None;
        for _ in 0..n {
            let actor = actor_in(r)?;
            let counter = r.u64()?;
            if last.is_some_and(|l| l >= actor) || counter == 0 || counter > COUNTER_MAX {
                return Err(ObjectError::NotCanonical("crdt clock"));
            }
            last = Some(actor);
            clock.insert(actor, counter);
        }
        let expiry = match r.u8()? {
            0 => None,
            1 => Some((stamp_in(r)?, None)),
            2 => Some((stamp_in(r)?, Some(r.u64()?))),
            _ => return Err(ObjectError::NotCanonical("crdt expiry tag")),
        };
        let oplog = slots_in(r, &clock, |r| {
            let n = usize::from(r.u8()?);
            if n == 0 || n > OP_LOG_MAX || n > r.remaining() / 8 {
                return Err(ObjectError::NotCanonical("crdt op log"));
            }
            (0..n).map(|_| r.u64()).collect()
        })?;
        let counter = slots_in(r, &clock, tally_in)?;
        let set = elements_in(r, &clock)?;
        let n = r.u32()? as usize;
        if n > r.remaining() / 6 {
            return Err(r.truncated());
        }
        let mut map = BTreeMap::new();
        let mut last: Option<(Bytes, FieldKind)> = None;
        for _ in 0..n {
            let len = usize::from(r.u16()?);
            let name = r.bytes(len)?;
            let kind = match r.u8()? {
                1 => FieldKind::Register,
                2 => FieldKind::Counter,
                3 => FieldKind::Set,
                4 => FieldKind::Flag,
                _ => return Err(ObjectError::NotCanonical("crdt field kind")),
            };
            let key = (name, kind);
            if last.as_ref().is_some_and(|l| *l >= key) {
                return Err(ObjectError::NotCanonical("crdt fields out of order"));
            }
            let store = match kind {
                FieldKind::Register => {
                    Store::Register(slots_in(r, &clock, |r| Ok((stamp_in(r)?, r.value()?)))?)
                }
                FieldKind::Counter => Store::Counter(slots_in(r, &clock, tally_in)?),
                FieldKind::Set => Store::Set(elements_in(r, &clock)?),
                FieldKind::Flag => Store::Flag(slots_in(r, &clock, |_| Ok(()))?),
            };
            if store.is_empty() {
                return Err(ObjectError::NotCanonical("empty crdt field"));
            }
            last = Some(key.clone());
            map.insert(key, store);
        }
        Ok(Crdt {
            generation,
            clock,
            expiry,
            oplog,
            counter,
            set,
            map,
        })
    }
}

fn increment(slots: &mut Slots<Tally>, actor: Actor, dot: u64, by: i64) -> Result<(), CrdtError> {
    let mut tally = slots.0.get(&actor).map(|(_, t)| *t).unwrap_or_default();
    if by >= 0 {
        tally.added = tally
            .added
            .checked_add(by.unsigned_abs())
            .ok_or(CrdtError::Overflow)?;
    } else {
        tally.subtracted = tally
            .subtracted
            .checked_add(by.unsigned_abs())
            .ok_or(CrdtError::Overflow)?;
    }
    let value = i128::from(counter_value(slots)) + i128::from(by);
    if i64::try_from(value).is_err() {
        return Err(CrdtError::Overflow);
    }
    slots.0.insert(actor, (dot, tally));
    Ok(())
}

fn count16(n: usize) -> u16 {
    u16::try_from(n)
        .expect("slots and clocks have at most one entry per actor, and actors are bounded")
}

fn actor_out(a: &Actor, sink: &mut impl FnMut(&[u8])) {
    sink(&a.node.0.to_le_bytes());
    sink(&a.epoch.to_le_bytes());
}

fn bytes_out(b: &Bytes, sink: &mut impl FnMut(&[u8])) {
    let len = u32::try_from(b.len()).expect("values are bounded far below 4 GiB");
    sink(&len.to_le_bytes());
    sink(b);
}

fn tally_out(t: &Tally, sink: &mut impl FnMut(&[u8])) {
    sink(&t.added.to_le_bytes());
    sink(&t.subtracted.to_le_bytes());
}

fn slots_out<P, S: FnMut(&[u8])>(
    slots: &Slots<P>,
    sink: &mut S,
    mut payload: impl FnMut(&P, &mut S),
) {
    sink(&count16(slots.0.len()).to_le_bytes());
    for (actor, (dot, p)) in &slots.0 {
        actor_out(actor, sink);
        sink(&dot.to_le_bytes());
        payload(p, sink);
    }
}

fn elements_out(elements: &Elements, sink: &mut impl FnMut(&[u8])) {
    let count = u32::try_from(elements.len()).expect("elements are bounded");
    sink(&count.to_le_bytes());
    for (e, dots) in elements {
        bytes_out(e, sink);
        slots_out(dots, sink, |_, _| {});
    }
}

fn stamp_in(r: &mut Cursor<'_>) -> Result<Stamp, ObjectError> {
    Ok((r.u64()?, NodeId(r.u32()?)))
}

fn actor_in(r: &mut Cursor<'_>) -> Result<Actor, ObjectError> {
    Ok(Actor::new(NodeId(r.u32()?), r.u32()?))
}

fn tally_in(r: &mut Cursor<'_>) -> Result<Tally, ObjectError> {
    Ok(Tally {
        added: r.u64()?,
        subtracted: r.u64()?,
    })
}

/// Slots whose dots the clock holds, in actor order.
fn slots_in<P>(
    r: &mut Cursor<'_>,
    clock: &Clock,
    mut payload: impl FnMut(&mut Cursor<'_>) -> Result<P, ObjectError>,
) -> Result<Slots<P>, ObjectError> {
    let n = usize::from(r.u16()?);
    if n > r.remaining() / 16 {
        return Err(r.truncated());
    }
    let mut slots = BTreeMap::new();
    let mut last = None;
    for _ in 0..n {
        let actor = actor_in(r)?;
        let dot = r.u64()?;
        if last.is_some_and(|l| l >= actor) || dot == 0 || dot > seen(clock, &actor) {
            return Err(ObjectError::NotCanonical("crdt slot"));
        }
        last = Some(actor);
        slots.insert(actor, (dot, payload(r)?));
    }
    Ok(Slots(slots))
}

fn elements_in(r: &mut Cursor<'_>, clock: &Clock) -> Result<Elements, ObjectError> {
    let n = r.u32()? as usize;
    if n > r.remaining() / 6 {
        return Err(r.truncated());
    }
    let mut elements = BTreeMap::new();
    let mut last: Option<Bytes> = None;
    for _ in 0..n {
        let e = r.value()?;
        if last.as_ref().is_some_and(|l| *l >= e) {
            return Err(ObjectError::NotCanonical("crdt elements out of order"));
        }
        let dots = slots_in(r, clock, |_| Ok(()))?;
        if dots.is_empty() {
            return Err(ObjectError::NotCanonical("crdt element without a dot"));
        }
        last = Some(e.clone());
        elements.insert(e, dots);
    }
    Ok(elements)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::object::Object;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    fn actor(n: u32) -> Actor {
        Actor::new(NodeId(n), 1)
    }

    fn apply(c: &mut Crdt, n: u32, ts: u64, crdt: CrdtType, ops: &[CrdtOp]) {
        c.apply(actor(n), (ts, NodeId(n)), crdt, ops, None, 0)
            .unwrap();
    }

    /// Two nodes increment one counter while apart: both count; a decrement counts too.
    #[test]
    fn concurrent_increments_both_count() {
        let mut a = Crdt::new(FIRST_GENERATION);
        let mut c = Crdt::new(FIRST_GENERATION);
        apply(&mut a, 1, 1, CrdtType::Counter, &[CrdtOp::Increment(5)]);
        apply(&mut c, 2, 1, CrdtType::Counter, &[CrdtOp::Increment(3)]);
        apply(&mut c, 2, 2, CrdtType::Counter, &[CrdtOp::Increment(-1)]);
        let m = a.clone().join(c.clone());
        assert_eq!(m.value(0), Some(CrdtValue::Counter(7)));
        assert_eq!(m, c.join(a));
    }

    /// A remove drops the adds its coordinator saw; a concurrent add survives; a delete of the
    /// whole key followed by new adds brings none of the old elements back.
    #[test]
    fn removes_drop_what_they_saw_and_adds_win() {
        let mut a = Crdt::new(FIRST_GENERATION);
        apply(
            &mut a,
            1,
            1,
            CrdtType::Set,
            &[CrdtOp::Add(b("x")), CrdtOp::Add(b("y"))],
        );
        let mut c = a.clone();
        apply(&mut c, 2, 2, CrdtType::Set, &[CrdtOp::Remove(b("x"))]);
        apply(&mut a, 1, 3, CrdtType::Set, &[CrdtOp::Add(b("x"))]);
        let m = a.clone().join(c.clone());
        assert_eq!(m.value(0), Some(CrdtValue::Set(vec![b("x"), b("y")])));
        // The delete saw everything: nothing comes back, and the key reads as missing.
        let mut d = m.clone();
        d.clear();
        assert_eq!(d.value(0), None);
        assert_eq!(d.dead_from(), Some(0));
        let mut later = d.clone();
        apply(&mut later, 2, 5, CrdtType::Set, &[CrdtOp::Add(b("z"))]);
        let all = later.join(m).join(a).join(c);
        assert_eq!(all.value(0), Some(CrdtValue::Set(vec![b("z")])));
    }

    /// A field removed concurrently with an update stays, with the update's coordinator's view;
    /// two kinds of one field are refused at the coordinator.
    #[test]
    fn map_fields_follow_the_stated_rules() {
        let f = |name: &str, op| CrdtOp::Field { name: b(name), op };
        let mut a = Crdt::new(FIRST_GENERATION);
        apply(
            &mut a,
            1,
            1,
            CrdtType::Map,
            &[
                f("qty", FieldOp::Increment(2)),
                f("note", FieldOp::Assign(b("gift"))),
                f("paid", FieldOp::Enable),
            ],
        );
        let mut c = a.clone();
        apply(
            &mut c,
            2,
            2,
            CrdtType::Map,
            &[CrdtOp::RemoveField(b("qty"))],
        );
        apply(
            &mut a,
            1,
            3,
            CrdtType::Map,
            &[f("qty", FieldOp::Increment(1))],
        );
        apply(
            &mut c,
            2,
            4,
            CrdtType::Map,
            &[f("note", FieldOp::Assign(b("none")))],
        );
        let m = a.clone().join(c.clone());
        assert_eq!(
            m.value(0),
            Some(CrdtValue::Map(vec![
                (b("note"), FieldValue::Register(b("none"))),
                (b("paid"), FieldValue::Flag),
                (b("qty"), FieldValue::Counter(3)),
            ]))
        );
        let err = m
            .clone()
            .apply(
                actor(1),
                (9, NodeId(1)),
                CrdtType::Map,
                &[f("qty", FieldOp::Add(b("x")))],
                None,
                0,
            )
            .unwrap_err();
        assert!(matches!(err, CrdtError::WrongType { .. }), "{err}");
        // As Redis's HSET and HINCRBY: an assignment replaces a field of another kind, and an
        // increment turns a register holding an integer into a counter.
        let mut r = m.clone();
        apply(
            &mut r,
            1,
            10,
            CrdtType::Map,
            &[f("qty", FieldOp::Assign(b("41")))],
        );
        apply(
            &mut r,
            1,
            11,
            CrdtType::Map,
            &[f("qty", FieldOp::Increment(1))],
        );
        let Some(CrdtValue::Map(fields)) = r.value(0) else {
            panic!("a map")
        };
        assert!(
            fields.contains(&(b("qty"), FieldValue::Counter(42))),
            "{fields:?}"
        );
        let err = r
            .clone()
            .apply(
                actor(1),
                (12, NodeId(1)),
                CrdtType::Map,
                &[f("note", FieldOp::Increment(1))],
                None,
                0,
            )
            .unwrap_err();
        assert!(matches!(err, CrdtError::NotAnInteger(_)), "{err}");
        let err = m
            .clone()
            .apply(
                actor(1),
                (9, NodeId(1)),
                CrdtType::Set,
                &[CrdtOp::Add(b("x"))],
                None,
                0,
            )
            .unwrap_err();
        assert!(matches!(err, CrdtError::WrongType { .. }), "{err}");
    }

    /// A retried operation id is recognised through any replica that has the first attempt,
    /// until the actor has recorded `OP_LOG_MAX` later ids.
    #[test]
    fn retried_operation_ids_are_recognised() {
        let mut a = Crdt::new(FIRST_GENERATION);
        let inc = [CrdtOp::Increment(1)];
        a.apply(
            actor(1),
            (1, NodeId(1)),
            CrdtType::Counter,
            &inc,
            Some(77),
            0,
        )
        .unwrap();
        let other = Crdt::new(FIRST_GENERATION).join(a.clone());
        assert!(other.saw_op(77));
        for id in 0..OP_LOG_MAX as u64 - 1 {
            a.apply(
                actor(1),
                (2 + id, NodeId(1)),
                CrdtType::Counter,
                &inc,
                Some(1000 + id),
                0,
            )
            .unwrap();
        }
        assert!(a.saw_op(77));
        a.apply(
            actor(1),
            (999, NodeId(1)),
            CrdtType::Counter,
            &inc,
            Some(5),
            0,
        )
        .unwrap();
        assert!(!a.saw_op(77));
    }

    /// An increment that would take the counter out of `i64` is refused and changes nothing.
    #[test]
    fn overflow_is_refused_whole() {
        let mut a = Crdt::new(FIRST_GENERATION);
        apply(
            &mut a,
            1,
            1,
            CrdtType::Counter,
            &[CrdtOp::Increment(i64::MAX)],
        );
        let before = a.clone();
        let err = a
            .apply(
                actor(1),
                (2, NodeId(1)),
                CrdtType::Counter,
                &[CrdtOp::Increment(-1), CrdtOp::Increment(2)],
                None,
                0,
            )
            .unwrap_err();
        assert_eq!(err, CrdtError::Overflow);
        assert_eq!(a, before);
    }

    /// One step of a history on three replicas of one key.
    #[derive(Clone, Debug)]
    enum Step {
        Add(usize, u8),
        Remove(usize, u8),
        Increment(usize, i8),
        Clear(usize),
        Assign(usize, u8),
        RemoveField(usize),
        /// Replica `.0` joins replica `.1`'s state.
        Sync(usize, usize),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        let step = prop_oneof![
            (0..3usize, 0..4u8).prop_map(|(r, e)| Step::Add(r, e)),
            (0..3usize, 0..4u8).prop_map(|(r, e)| Step::Remove(r, e)),
            (0..3usize, any::<i8>()).prop_map(|(r, k)| Step::Increment(r, k)),
            (0..3usize).prop_map(Step::Clear),
            (0..3usize, 0..4u8).prop_map(|(r, v)| Step::Assign(r, v)),
            (0..3usize).prop_map(Step::RemoveField),
            (0..3usize, 0..3usize).prop_map(|(r, s)| Step::Sync(r, s)),
        ];
        prop::collection::vec(step, 0..40)
    }

    /// What every event did, to judge states against: each event's dot, and for removes the
    /// clock they saw.
    #[derive(Default)]
    struct Model {
        /// (element, dot) of every set add.
        adds: Vec<(u8, Actor, u64)>,
        /// (element or None for a clear, dot, what its coordinator had seen).
        removes: Vec<(Option<u8>, Actor, u64, Clock)>,
        /// (dot, amount) of every increment.
        increments: Vec<(Actor, u64, i64)>,
        cleared: bool,
    }

    fn covers(clock: &Clock, actor: &Actor, dot: u64) -> bool {
        seen(clock, actor) >= dot
    }

    /// Runs a history; one key per type, each replica n acting as actor n.
    fn run(steps: &[Step]) -> ([Crdt; 3], [Crdt; 3], [Crdt; 3], Model) {
        let new = || std::array::from_fn::<_, 3, _>(|_| Crdt::new(FIRST_GENERATION));
        let (mut sets, mut counters, mut maps) = (new(), new(), new());
        let mut model = Model::default();
        for (ts, step) in steps.iter().enumerate() {
            let ts = ts as u64 + 1;
            let at = |r: usize| (actor(r as u32 + 1), (ts, NodeId(r as u32 + 1)));
            match *step {
                Step::Add(r, e) => {
                    let (a, s) = at(r);
                    sets[r]
                        .apply(
                            a,
                            s,
                            CrdtType::Set,
                            &[CrdtOp::Add(Bytes::from(vec![e]))],
                            None,
                            0,
                        )
                        .unwrap();
                    model.adds.push((e, a, seen(&sets[r].clock, &a)));
                }
                Step::Remove(r, e) => {
                    let (a, s) = at(r);
                    let saw = sets[r].clock.clone();
                    sets[r]
                        .apply(
                            a,
                            s,
                            CrdtType::Set,
                            &[CrdtOp::Remove(Bytes::from(vec![e]))],
                            None,
                            0,
                        )
                        .unwrap();
                    model
                        .removes
                        .push((Some(e), a, seen(&sets[r].clock, &a), saw));
                }
                Step::Clear(r) => {
                    // A DELETE: the coordinator's clear, as one event of its own (so later
                    // states can tell whether they saw it, as the model needs).
                    let (a, s) = at(r);
                    let saw = sets[r].clock.clone();
                    sets[r].apply(a, s, CrdtType::Set, &[], None, 0).unwrap();
                    sets[r].clear();
                    model.removes.push((None, a, seen(&sets[r].clock, &a), saw));
                    counters[r].clear();
                    model.cleared = true;
                }
                Step::Increment(r, k) => {
                    let (a, s) = at(r);
                    let k = i64::from(k);
                    counters[r]
                        .apply(a, s, CrdtType::Counter, &[CrdtOp::Increment(k)], None, 0)
                        .unwrap();
                    model.increments.push((a, seen(&counters[r].clock, &a), k));
                }
                Step::Assign(r, v) => {
                    let (a, s) = at(r);
                    let op = CrdtOp::Field {
                        name: b("f"),
                        op: FieldOp::Assign(Bytes::from(vec![v])),
                    };
                    maps[r].apply(a, s, CrdtType::Map, &[op], None, 0).unwrap();
                }
                Step::RemoveField(r) => {
                    let (a, s) = at(r);
                    maps[r]
                        .apply(a, s, CrdtType::Map, &[CrdtOp::RemoveField(b("f"))], None, 0)
                        .unwrap();
                }
                Step::Sync(r, s) => {
                    sets[r] = sets[r].clone().join(sets[s].clone());
                    counters[r] = counters[r].clone().join(counters[s].clone());
                    maps[r] = maps[r].clone().join(maps[s].clone());
                }
            }
        }
        (sets, counters, maps, model)
    }

    /// The elements a state must hold: every add it has seen that no remove it has seen had
    /// observed (a remove of that element, or a clear).
    fn expected_elements(state: &Crdt, model: &Model) -> BTreeSet<u8> {
        model
            .adds
            .iter()
            .filter(|(e, a, dot)| {
                covers(&state.clock, a, *dot)
                    && !model.removes.iter().any(|(which, ra, rdot, saw)| {
                        which.is_none_or(|w| w == *e)
                            && covers(&state.clock, ra, *rdot)
                            && covers(saw, a, *dot)
                    })
                    // A later add of the element by a state that saw this one replaced its
                    // dot; the element is then judged by that add.
                    && !model.adds.iter().any(|(e2, a2, d2)| {
                        e2 == e && (a2, d2) != (a, dot) && covers(&state.clock, a2, *d2) && a2 == a && d2 > dot
                    })
            })
            .map(|(e, _, _)| *e)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Replicas that apply operations and exchange states in any order: the join laws hold
        /// on every state they reach, the encoding round-trips, every acknowledged add is in
        /// every state that saw it unless a remove that saw it is too, and without deletions a
        /// counter is the sum of the increments it has seen.
        #[test]
        fn histories_converge_and_lose_no_acknowledged_add(steps in steps()) {
            let (sets, counters, maps, model) = run(&steps);
            for states in [&sets, &counters, &maps] {
                let [x, y, z] = states.clone();
                prop_assert_eq!(x.clone().join(y.clone()), y.clone().join(x.clone()));
                prop_assert_eq!(
                    x.clone().join(y.clone()).join(z.clone()),
                    x.clone().join(y.clone().join(z.clone()))
                );
                prop_assert_eq!(x.clone().join(x.clone()), x.clone());
                for s in states {
                    let object = Object::Crdt(Box::new(s.clone()));
                    let bytes = Bytes::from(object.encode());
                    prop_assert_eq!(object.encoded_len(), bytes.len());
                    prop_assert_eq!(Object::decode(&bytes).unwrap(), object);
                }
            }
            let all = sets.iter().cloned().reduce(Crdt::join).unwrap();
            for state in sets.iter().chain([&all]) {
                let held: BTreeSet<u8> = state.set.keys().map(|e| e[0]).collect();
                prop_assert_eq!(held, expected_elements(state, &model));
            }
            if !model.cleared {
                let all = counters.iter().cloned().reduce(Crdt::join).unwrap();
                for state in counters.iter().chain([&all]) {
                    let sum: i64 = model
                        .increments
                        .iter()
                        .filter(|(a, dot, _)| covers(&state.clock, a, *dot))
                        .map(|(_, _, k)| k)
                        .sum();
                    let value = match state.value(0) {
                        Some(CrdtValue::Counter(v)) => v,
                        _ => 0,
                    };
                    prop_assert_eq!(value, sum);
                }
            }
        }
    }
}
