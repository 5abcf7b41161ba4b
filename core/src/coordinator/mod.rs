//! The Dynamo request path as a sans-IO state machine: quorum reads and writes, sloppy quorum with
//! hinted handoff, read repair and forwarding.
//!
//! One [`Core`] runs per shard (in the simulator: per node). It never reads a clock, a socket or
//! randomness: the shell feeds it client requests ([`Core::handle_client`]), peer messages
//! ([`Core::handle_peer`]), storage results ([`Core::handle_stored`]), unreachable peers
//! ([`Core::handle_unreachable`]) and time ([`Core::handle_tick`]), each with `now` in
//! milliseconds, and carries out the [`Output`]s they return: messages to send, storage
//! operations to run, replies to clients. [`Core::next_deadline`] says when to tick next.
//!
//! # Request paths
//!
//! - **put / delete** (a delete writes a [`Val::Tombstone`]): a node that is not one of the key's
//!   `n` home replicas (its *preference list*) forwards the request to the first home it believes
//!   reachable. The coordinator (a home) reads its local replica, applies the client's context and
//!   a new dot ([`DvvSet::update`]; in `lww` buckets a hybrid-logical-clock stamp instead), checks
//!   the sibling and size limits, writes locally, and then sends the new object to the other homes.
//!   It answers once `w` replicas (itself included) acknowledged and `dw` of them durably; the
//!   rest complete in the background until the request's deadline.
//! - **forwarding to a silent home**: a forward waits for its home, however long, because a
//!   home that is slow, stopped or cut off may still apply it, and a second home applying it
//!   too would write it twice. The one forward that may move is an unconditional put in a
//!   last-write-wins bucket (sessions): it carries an *apply-by* time, half the replica
//!   timeout after it is sent, and a home refuses it with `expired`, writing nothing, if it reads
//!   it after that time (it was stopped or cut off with the request in its socket) or would
//!   stamp it after that time (it started it in time and stalled before its local read
//!   completed). If the home has not answered a full replica timeout after the send, the
//!   forwarder moves it to the next home (and coordinates it itself once every home stayed
//!   silent, as when none is reachable); if the home refused it, at once (and once every home
//!   refused, it answers the client `timeout`: the homes are up, and its own clock is behind).
//!   So a home that applies it anyway stamped it by the apply-by time, and the next home
//!   stamps it half a replica timeout later: the first copy overwrites neither the moved write
//!   nor anything written after it, as long as node clocks (which lead the stamps) agree within
//!   that half timeout. The apply-by time is never after the client's deadline, and a forward
//!   whose deadline comes before its move would is refused late but never moved. Siblings
//!   buckets, conditional writes and convergent operations never move: a second dot, a second
//!   decision or a second increment would show. A home that answers `unknown_kind` (an older
//!   build) gets plain forwards, which never move, until its connection is lost.
//! - **conditional put** (`condition`: if absent, if present; Redis's `SET NX|XX`): decided by
//!   the key's *first reachable home* (the first of its preference list this node believes up),
//!   to which every other node forwards it, even another home. There the condition is checked
//!   against the local replica under the key's job lock, the same lock every write of the key on
//!   that node takes, so conditional writes through any nodes are serialized while that home is
//!   reachable: of two racing `SET NX`, one succeeds and the other fails `condition_failed`. What
//!   that home has not received (a write coordinated elsewhere while it was unreachable, not yet
//!   repaired) it does not see; with no home reachable the condition is checked against nothing.
//! - **get**: any node coordinates. It asks the `n` replicas, answers after `r` replies with the
//!   merge of what they returned (siblings and context), and once every replica answered (or the
//!   deadline passed) sends the merged object to each replica that returned something older: read
//!   repair.
//! - **local reads and writes**: a GET whose only replica is this node (its bucket's `n` is 1,
//!   or the ring has one member) and that asks for `r = 1` has nothing to wait for, merge or
//!   repair: the coordinated read would read this node's store once and answer what it found.
//!   The shell reads such a key itself ([`Core::local_read`]) and answers with
//!   [`Core::local_read_reply`], the same answer, without an op, a slot or a pending entry. So
//!   does an unconditional PUT of an `lww` bucket with that one replica and `w = 1`, with no
//!   ring change pending (whose new replicas get a copy of every write), when its key has no
//!   job in flight or queued and it could be written blind (its stored stamp known,
//!   `Core::blind_lww`): [`Core::local_write`] stamps the object the coordinated write would
//!   have written, the shell writes it, and [`Core::local_write_done`] updates the tree and
//!   answers. The write holds the put's key and value, moved out of the request
//!   ([`LocalWrite::give_back`] returns them if the shell cannot write it), and finds the key's
//!   tree by the request's own placement hash ([`KeyRequest::key_hash`]), so the key is hashed
//!   once. Nothing runs between the two calls, so the key's lock is not needed. A synced
//!   write (a `sync` node, or `dw = 1`) is answered once the group commit that holds it is
//!   durable, as the coordinated write is, but it holds no lock meanwhile: a later synced write
//!   of the key is not held back by it, and is acknowledged only with its own commit, which
//!   comes no earlier; and a read, or a conditional write's check, may see its value before
//!   it is durable (a read may on the coordinated path too; a conditional write there waits
//!   for the lock). A read or write that would wait for storage to take it, or fails, is
//!   coordinated as any other.
//! - **sloppy quorum**: each of the `n` slots of a request is served by its home node, or, if the
//!   coordinator believes that home unreachable (see failure detection below), by the next node
//!   of the ring walk not already serving a slot. A fallback stores what it receives as a
//!   *hint* naming the home, in a separate storage space ([`Space::Hint`]), always synced
//!   whatever the durability mode, and answers reads of that slot from it. When a slot's replica
//!   times out (or refuses a hint) during a request, the slot moves on to the next fallback.
//! - **hinted handoff** (`hints.rs`): hints live in a store bounded in bytes (`hint_bytes_max`;
//!   past it a fallback refuses hints with `overloaded` and the slot moves on). Every
//!   `hint_retry_ms` the core asks each reachable home with hints for credit; the home grants
//!   from its own load and the background share, and the holder never has more hints in flight
//!   to it than granted. Once the home acknowledges a durable write, the hint is removed unless
//!   it changed meanwhile.
//! - **failure detection** (`liveness.rs`): "believed unreachable" is local: a phi-accrual
//!   detector per peer, fed by every message from it and by a heartbeat every `heartbeat_ms`,
//!   plus explicit suspicion for `down_ms` after a request to the peer timed out or its
//!   connection failed.
//!
//! # Dots must never repeat: actors and epochs
//!
//! A coordinator continues the numbering of its actor from its local replica, so the numbering is
//! only safe while that replica holds every dot the actor issued for the key. The rules:
//!
//! - A home coordinator continues its actor with the highest epoch among its entries in the local
//!   replica, provided that epoch is not below `floor`; otherwise it starts its *primary epoch*
//!   for the key (a new clock entry). The shell persists `floor` ([`CoreConfig::epoch_floor`]):
//!   it stays where it was while every run keeps every dot it issued (runs in `sync` durability,
//!   where the local write is synced before the object leaves the node, and runs that close
//!   cleanly); after a crash in `buffered` durability, which may have lost local writes peers had
//!   already received, it moves up to the next run's primary epoch, so each key coordinated
//!   afterwards starts a new clock entry. Clocks thus grow by one entry per key per such crash.
//! - A coordinator outside the preference list (all homes unreachable) has no replica to continue
//!   from, so each such write takes a fresh epoch of its own (dot `(node, epoch, 1)`).
//! - Epochs come from an [`EpochLease`] the shell persists: each run gets epochs above every
//!   earlier run's. When fewer than a quarter are left, [`Output::RenewEpochs`] asks for more; a
//!   non-home write that finds none left fails with `overloaded`.
//!
//! Obligation for later layers: whatever removes a home replica's objects without a tombstone
//! (partition transfer, tombstone reaping) must raise `floor` for the keys it removes.
//!
//! # Concurrency
//!
//! Every read-modify-write of one stored key (coordination, replica merge, hint removal) holds a
//! per-key lock inside the core, so two merges never interleave and a dot is never issued twice
//! from the same local state. Plain reads (replica reads, hint delivery) take no lock.
//!
//! Limits: the sibling limit is enforced where writes are coordinated; merges of concurrent writes
//! on replicas may exceed it, and a read whose merge has more than the wire's `SIBLINGS_MAX`
//! siblings fails with `too_many_siblings`. A simulated run is a function of its seed: maps that
//! are walked in order are `BTreeMap`s, the tables of work in flight hash without a random seed
//! (`Table`), and what walks one of those where order matters sorts what it found.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;
use ringkv_net::limits::SIBLINGS_MAX;
use ringkv_net::{
    ApplyOk, Condition, CrdtOp, CrdtType, CrdtValue, ErrorBody, ErrorCode, Expiry, FieldValue,
    GetOk, Message, PutOk, Sibling,
};
use smallvec::SmallVec;

use crate::NodeId;
use crate::bucket::{BucketProps, BucketType, Buckets, ConflictMode, Overrides, Quorum};
use crate::crdt::{self, Crdt};
use crate::dvv::{Actor, CONTEXT_ENTRIES_MAX, DvvSet, Put, VersionVector};
use crate::object::{Lww, Object, Val, hlc_next};
use crate::request::{KeyBody, KeyOp, KeyRequest};
use crate::ring::{PartitionId, Ring};
use convergent::{apply_write, crdt_base, crdt_error, update_write};

mod antientropy;
use antientropy::AntiEntropy;
pub use antientropy::{AeKey, TreeRoot};
mod context;
mod convergent;
mod hints;
mod key_table;
mod liveness;

use hints::HintStore;
pub use hints::{HintWindow, hint_bytes};
use liveness::Liveness;

/// Longest deadline a request may ask for (`timeout_ms`), in ms: ten minutes. A larger one is
/// cut to this, so an operation never holds its slot longer.
pub const REQUEST_DEADLINE_MS_MAX: u64 = 600_000;

/// Default of [`CoreConfig::hint_bytes_max`]: 256 MiB per core.
pub const HINT_BYTES_MAX_DEFAULT: u64 = 256 << 20;

/// Output lists [`Core::recycle`] keeps, and the most outputs one of them may have room for.
const SPARE_LISTS_MAX: usize = 4;
const SPARE_OUTPUTS_MAX: usize = 256;
mod transfer;
pub use transfer::{HANDOFFS_MAX, PAGE_BYTES, PAGE_ITEMS, PULLS_MAX, ScanItem, ScanPage};

/// Settings of a [`Core`].
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This node.
    pub node: NodeId,
    /// Bucket properties.
    pub buckets: Buckets,
    /// Whether local writes are synced (`sync` durability): every replica write is then durable.
    pub durable_writes: bool,
    /// The lowest epoch whose actors may be continued (module docs): `Some(f)` when every dot of
    /// epochs `f` and above is known to be in local storage, `None` to start at this run's
    /// primary epoch (after a crash that may have lost dots).
    pub epoch_floor: Option<u32>,
    /// Deadline of a request that names none.
    pub request_timeout_ms: u64,
    /// A replica that has not answered within this is believed unreachable; its slot moves on.
    pub replica_timeout_ms: u64,
    /// How long a node stays believed unreachable without news from it.
    pub down_ms: u64,
    /// Interval between hinted-handoff rounds.
    pub hint_retry_ms: u64,
    /// Most hints in delivery at once (scaled down by the background share).
    pub hint_inflight_max: usize,
    /// Bytes of hints this core stores at most (keys and objects); past it hints are refused.
    pub hint_bytes_max: u64,
    /// Most hints one credit grant allows.
    pub hint_credit_max: u32,
    /// Requests and key jobs in flight at which this core grants no hint credit.
    pub hint_busy_ops: usize,
    /// Interval between heartbeats to every other member.
    pub heartbeat_ms: u64,
    /// Suspicion level above which a silent peer is believed unreachable.
    pub phi_threshold: f64,
    /// Largest encoded object a write may produce (the engine's value limit).
    pub object_bytes_max: usize,
    /// Most keys coordinated at once (client requests beyond it are refused `overloaded`).
    pub ops_max: usize,
    /// Interval between anti-entropy rounds (one exchange of one partition tree with one other
    /// replica); 0 turns anti-entropy off. The pacing knob of `antientropy.rs`.
    pub ae_interval_ms: u64,
    /// Most keys one anti-entropy exchange lists, and most it repairs in each direction.
    pub ae_keys_max: usize,
    /// How long a tombstone is kept after this replica stored it before it may be reaped.
    pub tombstone_grace_ms: u64,
    /// How long an expired object is kept after its expiry (or after this replica stored it,
    /// if later) before it may be reaped.
    pub expiry_grace_ms: u64,
    /// This core handles the partitions `p` with `p % shards == shard`.
    pub shard: u32,
    /// Cores of the node.
    pub shards: u32,
    /// Replicas partition transfers are computed for (the largest bucket `n`).
    pub target_n: usize,
}

impl CoreConfig {
    /// Defaults for `node`.
    pub fn new(node: NodeId) -> Self {
        CoreConfig {
            node,
            buckets: Buckets::default(),
            durable_writes: true,
            epoch_floor: Some(0),
            request_timeout_ms: 10_000,
            replica_timeout_ms: 1_000,
            down_ms: 2_000,
            hint_retry_ms: 1_000,
            hint_inflight_max: 64,
            hint_bytes_max: HINT_BYTES_MAX_DEFAULT,
            hint_credit_max: 64,
            hint_busy_ops: 1024,
            heartbeat_ms: 1_000,
            phi_threshold: crate::phi::PHI_THRESHOLD_DEFAULT,
            object_bytes_max: 1 << 20,
            ops_max: 65_536,
            ae_interval_ms: 1_000,
            ae_keys_max: 256,
            tombstone_grace_ms: 86_400_000,
            expiry_grace_ms: 3_600_000,
            shard: 0,
            shards: 1,
            target_n: 3,
        }
    }
}

/// Epochs this core may use (module docs). The shell persists `end` before handing a lease over,
/// so a later run's lease starts above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochLease {
    /// The epoch home coordination uses in this run.
    pub primary: u32,
    /// Next fresh epoch for non-home coordination.
    pub next: u32,
    /// End (exclusive) of the leased range.
    pub end: u32,
    /// Size of the lease when granted; renewal is asked for below a quarter of it.
    pub size: u32,
}

impl EpochLease {
    /// A lease of `[start, start + size)`, the first epoch being the primary one.
    pub fn new(start: u32, size: u32) -> Self {
        assert!(size >= 2, "a lease needs a primary and a fresh epoch");
        let end = start.checked_add(size).expect("epoch space exhausted");
        EpochLease {
            primary: start,
            next: start + 1,
            end,
            size,
        }
    }
}

/// Where a key is stored on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Space {
    /// The node's own replica (it is a home of the key, or was sent a repair).
    Primary,
    /// A fallback's copy held for the named home node (sloppy quorum).
    Hint(NodeId),
}

/// One stored key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreKey {
    /// Ring partition of the key.
    pub partition: u32,
    /// Replica or hint.
    pub space: Space,
    /// Bucket.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
}

impl StoreKey {
    /// The same key in buffers of its own. A request's bucket and key may be slices of the
    /// buffer its connection read them into (a whole read's worth of memory), so what keeps a
    /// key beyond the request (the hint store) keeps a copy.
    pub fn detached(&self) -> StoreKey {
        StoreKey {
            partition: self.partition,
            space: self.space,
            bucket: Bytes::copy_from_slice(&self.bucket),
            key: Bytes::copy_from_slice(&self.key),
        }
    }
}

/// A storage operation for the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Read the object; answer `Ok(Some)` or `Ok(None)`.
    Read,
    /// Replace the object, synced before answering if `durable`; answer `Ok(None)`.
    Write {
        /// The new object.
        object: Object,
        /// Sync before answering.
        durable: bool,
    },
    /// Remove the object (a delivered hint); answer `Ok(None)`.
    Remove,
    /// Make every write stored so far durable, answer `Ok(None)`: asked instead of a durable
    /// write of an object the store already holds unchanged (a merge that added nothing, as
    /// most keys of a handoff after a join are), whose earlier write may not be synced yet.
    Sync,
}

/// A client PUT that [`Core::local_write`] lets the shell write itself: the storage write to
/// carry out at once, then to hand back to [`Core::local_write_done`]. It holds the PUT's key
/// and value, moved out of the request; a write the shell cannot carry out gives them back
/// ([`LocalWrite::give_back`]).
#[derive(Debug)]
pub struct LocalWrite {
    /// The key written.
    pub key: StoreKey,
    /// The write: an `lww` object, synced when the node syncs its writes or the put asks for
    /// `dw = 1`.
    pub op: StoreOp,
    /// The key's placement hash, from the request.
    placement: u64,
}

impl LocalWrite {
    /// Puts the key and value back into the request they were moved out of, for the
    /// coordinated path to take it as it came.
    pub fn give_back(self, request: &mut KeyRequest) {
        let StoreOp::Write { object, .. } = self.op else {
            unreachable!("a local write writes an object")
        };
        put_back(request, self.key.key, object);
    }
}

/// Moves `key` and the value of the `lww` object a local write built back into the PUT
/// `request` they came from.
fn put_back(request: &mut KeyRequest, key: Bytes, object: Object) {
    let KeyBody::Put(put) = request.body_mut() else {
        unreachable!("a local write is a PUT's")
    };
    let Object::Lww(Lww { val, .. }) = object else {
        unreachable!("a local write is an lww object")
    };
    debug_assert!(put.key.is_empty() && put.value.is_empty());
    put.key = key;
    put.value = match val {
        Val::Value(value) | Val::Expiring { value, .. } => value,
        Val::Tombstone => unreachable!("a PUT writes a value"),
    };
}

/// Messages between cores of different nodes. `id`s are chosen by the sender of a request,
/// unique among its outstanding requests, and echoed by the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    /// Merge `object` into the replica (or the hint for `hint`).
    ReplicaPut {
        /// Request id.
        id: u64,
        /// Where to store it.
        key: StoreKey,
        /// What to merge.
        object: Object,
        /// Sync before acknowledging.
        durable: bool,
    },
    /// The merge is done.
    ReplicaPutOk {
        /// Request id.
        id: u64,
        /// Whether it was synced.
        durable: bool,
    },
    /// Read the replica (or hint).
    ReplicaGet {
        /// Request id.
        id: u64,
        /// What to read.
        key: StoreKey,
    },
    /// The replica's object, if any.
    ReplicaGetOk {
        /// Request id.
        id: u64,
        /// The object.
        object: Option<Object>,
    },
    /// Coordinate this client request (GET, PUT, DELETE or UPDATE) for the sender.
    Forward {
        /// Request id.
        id: u64,
        /// The client's request.
        request: KeyRequest,
        /// The time (the cores' Unix milliseconds) after which the home must not apply it:
        /// set on a forward the sender may move to another home (module docs, "forwarding to a
        /// silent home"), absent on the others.
        apply_by: Option<u64>,
    },
    /// The answer to a [`PeerMsg::Forward`]: the reply for the client.
    ForwardReply {
        /// Request id.
        id: u64,
        /// The reply.
        reply: Message,
    },
    /// Anti-entropy: the sender's hashes of some nodes of level `depth` of its tree for
    /// `(partition, n)`; the answer names those that differ here.
    AeLevel {
        /// Request id.
        id: u64,
        /// Ring partition.
        partition: u32,
        /// Replica count of the tree (module docs of `antientropy.rs`).
        n: u8,
        /// Tree level (0 = root).
        depth: u8,
        /// (node index, hash) pairs.
        hashes: Vec<(u32, u64)>,
    },
    /// The nodes of an [`PeerMsg::AeLevel`] whose hashes differ here.
    AeLevelOk {
        /// Request id.
        id: u64,
        /// Node indexes.
        differing: Vec<u32>,
    },
    /// Anti-entropy: the sender's keys (with digests) in some leaves of its tree. The receiver
    /// sends back, as replica writes, its objects for keys that differ or the sender lacks, and
    /// answers with the keys it wants the sender's objects for.
    AeKeys {
        /// Request id.
        id: u64,
        /// Ring partition.
        partition: u32,
        /// Replica count of the tree.
        n: u8,
        /// Leaf indexes covered.
        leaves: Vec<u32>,
        /// Every key of those leaves on the sender.
        keys: Vec<AeKey>,
    },
    /// The keys of an [`PeerMsg::AeKeys`] the receiver wants the sender's objects for.
    AeKeysOk {
        /// Request id.
        id: u64,
        /// (bucket, key) pairs.
        want: Vec<(Bytes, Bytes)>,
    },
    /// Tombstone reaping: does the receiver hold these tombstones (same digest) and allow them
    /// to be reaped?
    AeReap {
        /// Request id.
        id: u64,
        /// Ring partition.
        partition: u32,
        /// Replica count of the tree.
        n: u8,
        /// The tombstones.
        keys: Vec<AeKey>,
    },
    /// The tombstones of an [`PeerMsg::AeReap`] the receiver holds and allows to be reaped.
    AeReapOk {
        /// Request id.
        id: u64,
        /// (bucket, key) pairs.
        held: Vec<(Bytes, Bytes)>,
    },
    /// Tombstone reaping: every replica holds these tombstones; remove each that is unchanged.
    AeDrop {
        /// Request id.
        id: u64,
        /// Ring partition.
        partition: u32,
        /// Replica count of the tree.
        n: u8,
        /// The tombstones.
        keys: Vec<AeKey>,
    },
    /// An [`PeerMsg::AeDrop`] was received (the removals run in the background).
    AeDropOk {
        /// Request id.
        id: u64,
    },
    /// May the sender deliver up to `wanted` hints to the receiver (their home)?
    HintCredit {
        /// Request id.
        id: u64,
        /// Ring partition of one of the hints (on a node with several cores, the core that owns
        /// it, which will receive the hints, grants).
        partition: u32,
        /// Hints the sender has ready for the receiver (bounded by its in-flight budget).
        wanted: u32,
    },
    /// The answer to [`PeerMsg::HintCredit`]: at most `granted` hints in flight (0: not now).
    HintCreditOk {
        /// Request id.
        id: u64,
        /// Hints the holder may have in flight to the receiver until they are all answered.
        granted: u32,
    },
    /// A heartbeat: proof of life for the failure detector of the sender.
    Ping {
        /// Request id.
        id: u64,
    },
    /// The answer to [`PeerMsg::Ping`].
    Pong {
        /// Request id.
        id: u64,
    },
    /// Send a page of the receiver's replica of `partition`, after cursor `after`
    /// (`transfer.rs`).
    TransferPull {
        /// Request id.
        id: u64,
        /// The partition.
        partition: u32,
        /// Where the previous page ended; `None` for the first page.
        after: Option<Bytes>,
    },
    /// A page of a partition.
    TransferPage {
        /// Request id.
        id: u64,
        /// The keys and the next cursor.
        page: ScanPage,
    },
    /// A request failed on the receiver (storage error, bad input).
    Failed {
        /// Request id.
        id: u64,
        /// Why.
        error: ErrorBody,
    },
}

impl PeerMsg {
    /// The id a request carries and its answer echoes.
    pub fn id(&self) -> u64 {
        match self {
            PeerMsg::ReplicaPut { id, .. }
            | PeerMsg::ReplicaPutOk { id, .. }
            | PeerMsg::ReplicaGet { id, .. }
            | PeerMsg::ReplicaGetOk { id, .. }
            | PeerMsg::Forward { id, .. }
            | PeerMsg::ForwardReply { id, .. }
            | PeerMsg::TransferPull { id, .. }
            | PeerMsg::TransferPage { id, .. }
            | PeerMsg::AeLevel { id, .. }
            | PeerMsg::AeLevelOk { id, .. }
            | PeerMsg::AeKeys { id, .. }
            | PeerMsg::AeKeysOk { id, .. }
            | PeerMsg::AeReap { id, .. }
            | PeerMsg::AeReapOk { id, .. }
            | PeerMsg::AeDrop { id, .. }
            | PeerMsg::AeDropOk { id }
            | PeerMsg::HintCredit { id, .. }
            | PeerMsg::HintCreditOk { id, .. }
            | PeerMsg::Ping { id }
            | PeerMsg::Pong { id }
            | PeerMsg::Failed { id, .. } => *id,
        }
    }

    /// Whether this message answers a request (rather than being one).
    pub fn is_answer(&self) -> bool {
        matches!(
            self,
            PeerMsg::ReplicaPutOk { .. }
                | PeerMsg::ReplicaGetOk { .. }
                | PeerMsg::ForwardReply { .. }
                | PeerMsg::AeLevelOk { .. }
                | PeerMsg::AeKeysOk { .. }
                | PeerMsg::AeReapOk { .. }
                | PeerMsg::AeDropOk { .. }
                | PeerMsg::HintCreditOk { .. }
                | PeerMsg::Pong { .. }
                | PeerMsg::TransferPage { .. }
                | PeerMsg::Failed { .. }
        )
    }

    /// Whether this message is a heartbeat or its answer (no request waits for it).
    pub fn is_heartbeat(&self) -> bool {
        matches!(self, PeerMsg::Ping { .. } | PeerMsg::Pong { .. })
    }
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `msg` to node `to`. Delivery is best effort: the core times out what is lost.
    Send {
        /// Destination.
        to: NodeId,
        /// The message.
        msg: PeerMsg,
    },
    /// Answer request `msg.id()` of node `to` with `msg`, on the connection the request came
    /// on. Apart from [`Output::Send`], whose requests go on this node's own link to the peer
    /// and are timed out by the core: an answer goes back where its request came from.
    Answer {
        /// The node that asked.
        to: NodeId,
        /// The answer (one that [`PeerMsg::is_answer`]).
        msg: PeerMsg,
    },
    /// Run a storage operation and report it with [`Core::handle_stored`] and the same `id`.
    Store {
        /// Operation id.
        id: u64,
        /// The key.
        key: StoreKey,
        /// The operation.
        op: StoreOp,
    },
    /// Answer client request `req` (the id the shell gave [`Core::handle_client`]).
    Reply {
        /// The client request.
        req: u64,
        /// GET_OK, PUT_OK, DELETE_OK or ERROR.
        message: Message,
    },
    /// Persist a new epoch range above every range handed out so far and give it to
    /// [`Core::handle_epochs`].
    RenewEpochs,
    /// Persist `floor` as the epoch floor (in `sync` durability; a `buffered` run keeps no floor
    /// file while it runs), then report it with [`Core::handle_floor_persisted`]. Tombstone
    /// reaping raises the floor (module docs of `antientropy.rs`).
    PersistFloor {
        /// The new floor.
        floor: u32,
    },
    /// Read a page of the replica of `partition`: up to `max_items` keys after cursor `after`
    /// (and stop adding keys past `max_bytes`, keeping at least one), in a stable order; report
    /// with [`Core::handle_scanned`] and the same `id`.
    Scan {
        /// Operation id.
        id: u64,
        /// The partition.
        partition: u32,
        /// Cursor from the previous page.
        after: Option<Bytes>,
        /// Most keys.
        max_items: usize,
        /// Byte budget.
        max_bytes: usize,
    },
    /// This node now holds `partition` for the pending ring of `epoch`: tell membership
    /// (`Membership::transfer_done`).
    TransferDone {
        /// The pending ring's epoch.
        epoch: u64,
        /// The partition.
        partition: u32,
    },
    /// Drop the replica of `partition` (handed off), then call [`Core::partition_dropped`].
    DropPartition {
        /// The partition.
        partition: u32,
    },
}

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Requests forwarded to a home node.
    pub forwarded: u64,
    /// Forwarded requests moved on to another home: the connection to the first was lost, or
    /// it stayed silent for a replica timeout after a movable forward, or refused it.
    pub forwards_moved: u64,
    /// Forwards this node refused as a home because it read them, or would have stamped them,
    /// after their apply-by time.
    pub forwards_refused: u64,
    /// Replica writes sent to fallbacks with a hint.
    pub hinted_writes: u64,
    /// Hints delivered to their home and removed.
    pub hints_delivered: u64,
    /// Hints removed undelivered by [`Core::truncate_hints`].
    pub hints_truncated: u64,
    /// Read-repair writes sent.
    pub read_repairs: u64,
    /// Slots moved to a fallback after a replica failed during a request.
    pub slot_moves: u64,
    /// Jobs that shared a read and a write of their key with a job ahead of them.
    pub batched_jobs: u64,
    /// `lww` writes that skipped reading the local replica (`Core::blind_lww`): coordinated
    /// puts (one then refused, too large or a forward past its apply-by time, included), local
    /// puts ([`Core::local_write`]) and replica merges of a newer value.
    pub blind_writes: u64,
    /// Client GETs answered from this node's own store without being coordinated
    /// ([`Core::local_read`]).
    pub local_reads: u64,
    /// Client PUTs written to this node's own store without being coordinated
    /// ([`Core::local_write`]); each is a blind write too.
    pub local_writes: u64,
    /// Anti-entropy exchanges started (one tree with one other replica).
    pub ae_exchanges: u64,
    /// Anti-entropy exchanges that found the two trees equal.
    pub ae_in_sync: u64,
    /// Objects anti-entropy sent to a replica whose version differed or was missing.
    pub ae_keys_repaired: u64,
    /// Tombstones this replica removed after every replica held them past the grace period.
    pub tombstones_reaped: u64,
    /// Times tombstone reaping raised the epoch floor.
    pub floor_raises: u64,
    /// Hint writes refused because the hint store was full.
    pub hint_overflow: u64,
    /// Credit requests sent to homes.
    pub credit_requests: u64,
    /// Hints granted to holders, summed over grants.
    pub credits_granted: u64,
    /// Heartbeats sent.
    pub heartbeats: u64,
    /// Partitions pulled for a pending ring.
    pub partitions_received: u64,
    /// Keys merged from pulled pages.
    pub transferred_keys: u64,
    /// Keys pushed to the current replicas by handoffs.
    pub handed_off_keys: u64,
    /// Partitions dropped after their handoff.
    pub partitions_dropped: u64,
    /// Write copies sent to the replicas a pending ring adds.
    pub pending_copies: u64,
}

fn error(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error(ErrorBody::new(code, message))
}

/// A forward refused because it reached its home, or its stamp, `now - by` ms after its apply-by
/// time `by`: nothing was written. Given by [`Core::refuse_late`].
fn expired(now: u64, by: u64) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Expired,
        format!(
            "the forwarded write was due on its home {} ms after its apply-by time (read or \
             stamped late) and was not applied",
            now - by
        ),
    )
}

/// The client operation of a request, decoded.
#[derive(Clone, Debug)]
enum Write {
    /// A value, when it expires (Unix milliseconds, stamped by this coordinator), and the
    /// condition the local replica must meet.
    Put(Bytes, Option<u64>, Option<Condition>),
    Delete,
    /// Operations on a convergent data type (expiries already absolute); `update` for an
    /// UPDATE's field changes, which are a map's register operations answered UPDATE_OK.
    Crdt {
        crdt: CrdtType,
        ops: Vec<CrdtOp>,
        op_id: Option<u64>,
        return_value: bool,
        update: bool,
    },
}

/// One of the `n` replica positions of a request.
#[derive(Clone, Debug)]
struct Slot {
    /// The home node of the slot.
    home: NodeId,
    /// The node serving it now (the home or a fallback).
    holder: Option<NodeId>,
    /// Outstanding message to the holder, if any.
    pending: Option<u64>,
    /// The holder answered (ack or read reply).
    done: bool,
    /// Read result of the holder (gets).
    read: Option<Option<Object>>,
}

impl Slot {
    fn key(&self, partition: u32, bucket: &Bytes, key: &Bytes) -> StoreKey {
        let holder = self
            .holder
            .expect("a slot with a pending request has a holder");
        StoreKey {
            partition,
            space: if holder == self.home {
                Space::Primary
            } else {
                Space::Hint(self.home)
            },
            bucket: bucket.clone(),
            key: key.clone(),
        }
    }
}

#[derive(Debug)]
enum OpKind {
    /// A write being coordinated; `object` is set once the local update is computed.
    Write {
        write: Write,
        context: Option<VersionVector>,
        object: Option<Object>,
        acks: u8,
        durable_acks: u8,
        /// Replicas asked to sync.
        want_durable: bool,
    },
    /// A read.
    Read { replies: u8, merged: Option<Object> },
    /// A request forwarded to a home node.
    Forwarded {
        request: KeyRequest,
        tried: BTreeSet<NodeId>,
        pending: Option<(NodeId, u64)>,
    },
}

/// Who waits for what this core does: the answer of a request it coordinates
/// ([`Core::answer`]: a client or a peer that forwarded it), or the outcome of a replica read or
/// write it runs for a coordinator ([`Core::replica_done`]: a peer, one of its own ops' slots, a
/// partition pull, or nobody). One type routes every answer, so each outcome is delivered in one
/// place whatever started the work.
#[derive(Clone, Copy, Debug)]
enum ReplyTo {
    /// A client of this shard, by the id the shell gave [`Core::handle_client`].
    Client(u64),
    /// Request `id` of peer `node`.
    Peer(NodeId, u64),
    /// Slot `slot` of op `op` of this core, whose replica is this node.
    Slot { op: u64, slot: usize },
    /// A key of a page pulled for `partition` (`transfer.rs`).
    Transfer { partition: u32 },
    /// Nobody: a read repair of this node's own replica.
    Nobody,
}

/// Nodes a request keeps inline (its homes, the nodes that served it) before they spill to the
/// heap: more than the replica counts buckets use in practice.
const USED_INLINE: usize = 5;

#[derive(Debug)]
struct Op {
    reply_to: ReplyTo,
    replied: bool,
    partition: u32,
    bucket: Bytes,
    key: Bytes,
    quorum: Quorum,
    deadline: u64,
    /// A forward's apply-by time: the write is refused, not applied, if it would be stamped
    /// after it (module docs, "forwarding to a silent home").
    apply_by: Option<u64>,
    slots: Vec<Slot>,
    /// Every node that served a slot of this request (a fallback is used once). Inline: a
    /// request has a few homes, and most use no fallback.
    used: SmallVec<[NodeId; USED_INLINE]>,
    kind: OpKind,
}

impl Op {
    /// Records that `node` served a slot of this request.
    fn use_node(&mut self, node: NodeId) {
        if !self.used.contains(&node) {
            self.used.push(node);
        }
    }
}

/// What an outstanding message or storage operation belongs to. Every request's slots and
/// storage operations go in and out of the table of these, so the variants of background work
/// that carry a key or an object box them: the type stays a few words, moved inline.
#[derive(Debug)]
enum Pending {
    /// A replica write or read of slot `slot` of op `op`, sent to `node` (maybe this node).
    Slot { op: u64, slot: usize, node: NodeId },
    /// A forwarded request; `apply_by` whether it carried an apply-by time.
    Forward {
        op: u64,
        node: NodeId,
        apply_by: bool,
    },
    /// A read repair sent to `node`; nothing waits for it.
    Repair { node: NodeId },
    /// A hint sent to `to`: its home, or a current replica if the home left the ring.
    Delivery {
        hint: Box<StoreKey>,
        object: Box<Object>,
        to: NodeId,
    },
    /// A replica read for a peer (or this node) that is a plain storage read.
    PeerRead { to: ReplyTo },
    /// A hint read before its delivery to `to`.
    HintRead { hint: Box<StoreKey>, to: NodeId },
    /// A credit request to `home`.
    Credit { home: NodeId },
    /// A page asked for by the pull of `partition`.
    Pull { partition: u32 },
    /// A scan for a peer's pull, answered to `to` with `id`.
    ServeScan { to: NodeId, id: u64 },
    /// A scan of a partition being handed off.
    HandoffScan { partition: u32 },
    /// A key of a handoff page pushed to a replica.
    HandoffPut { partition: u32 },
    /// A message of the running anti-entropy exchange, sent to `node` (`antientropy.rs`).
    Exchange { node: NodeId },
    /// A read of `key` whose object anti-entropy sends to `to`.
    Push { to: NodeId, key: Box<StoreKey> },
    /// A storage operation of per-key job `job`.
    Job { job: u64 },
}

/// The jobs of one stored key: the one holding its lock, then the ones waiting. The holder is
/// kept inline, so the lock of a key nobody waits for (most of them) allocates nothing.
#[derive(Debug)]
struct LockQueue {
    holder: u64,
    waiting: VecDeque<u64>,
}

impl LockQueue {
    fn new(holder: u64) -> Self {
        LockQueue {
            holder,
            waiting: VecDeque::new(),
        }
    }

    /// The holder is done: the next job holds the lock, and is answered; `None` if nobody
    /// waits (the queue is then to be dropped).
    fn release(&mut self) -> Option<u64> {
        self.holder = self.waiting.pop_front()?;
        Some(self.holder)
    }
}

/// A read-modify-write of one stored key, run under that key's lock.
#[derive(Debug)]
struct Job {
    key: StoreKey,
    kind: JobKind,
    /// Storage operation in flight for the job.
    stage: Stage,
    /// Jobs queued behind this one for the same key that run with it: one read, one write.
    riders: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Queued,
    Reading,
    Writing,
}

#[derive(Debug)]
enum JobKind {
    /// Compute and write the coordinated update of op `op`.
    Coordinate { op: u64 },
    /// Merge `object` into the stored key, then acknowledge.
    Apply {
        object: Object,
        durable: bool,
        then: ReplyTo,
    },
    /// Remove a delivered hint if it still holds `delivered`.
    DropHint { delivered: Option<Object> },
    /// Remove a reaped tombstone if its digest is still `digest`.
    Reap { digest: u64 },
}

/// The core's tables of what is in flight, keyed by its ids or by stored keys. Hashed: every
/// request inserts into and removes from several of them, and a B-tree moved entries of hundreds
/// of bytes around at each. The hash has no random seed, so a simulated run replays; what
/// iterates one where order matters sorts what it found.
type Table<K, V> = rustc_hash::FxHashMap<K, V>;

/// The request-path state machine of one shard (module docs).
pub struct Core {
    cfg: CoreConfig,
    ring: Ring,
    /// Walk order of every partition, computed once per ring.
    walks: Vec<Vec<NodeId>>,
    epochs: EpochLease,
    renewing: bool,
    floor: u32,
    hlc_last: u64,
    next_id: u64,
    ops: Table<u64, Op>,
    /// Deadlines of ops, for ticks.
    op_deadlines: BTreeSet<(u64, u64)>,
    pending: Table<u64, Pending>,
    /// Timeouts of outstanding messages: (deadline, id).
    timeouts: BTreeSet<(u64, u64)>,
    /// Homes that answered `unknown_kind` to a forward with an apply-by time: an older build,
    /// sent plain forwards until the connection to it is lost (module docs).
    plain_forwards: BTreeSet<NodeId>,
    jobs: Table<u64, Job>,
    /// Per stored key: the job holding the lock first, then the ones waiting.
    locks: Table<StoreKey, LockQueue>,
    live: Liveness,
    hints: HintStore,
    out: Vec<Output>,
    /// Emptied output lists the shell gave back ([`Core::recycle`]), so that a call's first
    /// output does not allocate: one list per nested call at most.
    spare: Vec<Vec<Output>>,
    stats: CoreStats,
    ae: AntiEntropy,
    transfers: transfer::Transfers,
}

impl Core {
    /// A core for `cfg.node` on `ring`, with the epochs of this run and the hints found in storage
    /// (keys in [`Space::Hint`], each with its size as [`hint_bytes`] counts it).
    pub fn new(
        cfg: CoreConfig,
        ring: Ring,
        epochs: EpochLease,
        hints: impl IntoIterator<Item = (StoreKey, u64)>,
    ) -> Core {
        assert!(cfg.replica_timeout_ms > 0);
        assert!(cfg.hint_retry_ms > 0);
        assert!(cfg.hint_inflight_max > 0);
        assert!(
            cfg.shard < cfg.shards,
            "a core's shard index is below the shard count"
        );
        let floor = cfg.epoch_floor.unwrap_or(epochs.primary);
        assert!(
            floor <= epochs.primary,
            "the floor is at or below this run's epochs"
        );
        let mut core = Core {
            walks: Vec::new(),
            ring,
            epochs,
            renewing: false,
            floor,
            hlc_last: 0,
            next_id: 1,
            ops: Table::default(),
            op_deadlines: BTreeSet::new(),
            pending: Table::default(),
            timeouts: BTreeSet::new(),
            plain_forwards: BTreeSet::new(),
            jobs: Table::default(),
            locks: Table::default(),
            live: Liveness::new(cfg.node, cfg.heartbeat_ms, cfg.down_ms, cfg.phi_threshold),
            hints: HintStore::new(cfg.hint_bytes_max, cfg.hint_inflight_max),

            out: Vec::new(),
            spare: Vec::new(),
            stats: CoreStats::default(),
            ae: AntiEntropy::new(floor),
            transfers: transfer::Transfers::default(),
            cfg,
        };
        core.set_ring(core.ring.clone());
        core.load_hints(hints);
        core
    }

    /// Replaces the ring (a membership change).
    pub fn set_ring(&mut self, ring: Ring) {
        self.walks = (0..ring.partition_count().get())
            .map(|p| ring.walk(PartitionId(p)).collect())
            .collect();
        self.ring = ring;
        self.ae_set_ring();
    }

    /// The ring in use.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Counters.
    pub fn stats(&self) -> CoreStats {
        self.stats
    }

    /// Hints stored here and not yet delivered.
    pub fn hint_count(&self) -> usize {
        self.hints.len()
    }

    /// The hints stored here, with whether each is being delivered.
    pub fn hints(&self) -> impl Iterator<Item = (&StoreKey, bool)> + '_ {
        self.hints.iter()
    }

    /// Hints being delivered now.
    pub fn hints_in_flight(&self) -> usize {
        self.hints.in_flight()
    }

    /// Partitions held that this node no longer replicates, waiting to be handed off and
    /// dropped.
    pub fn handoff_count(&self) -> usize {
        self.transfers.handoff_count()
    }

    /// The epoch floor in use (module docs), for the shell to persist.
    pub fn epoch_floor(&self) -> u32 {
        self.floor
    }

    /// Requests being coordinated or forwarded.
    pub fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }

    /// When [`Core::handle_tick`] has work next, if ever.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut next = [
            self.timeouts.first().map(|(t, _)| *t),
            self.op_deadlines.first().map(|(t, _)| *t),
            self.hints.deadline(),
            self.ae_deadline(),
            Some(self.live.next_heartbeat()),
            self.transfer_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(n) = next.as_mut() {
            *n = (*n).max(1);
        }
        next
    }

    fn take_output(&mut self) -> Vec<Output> {
        let next = self.spare.pop().unwrap_or_default();
        std::mem::replace(&mut self.out, next)
    }

    /// Gives back a list of outputs the shell has carried out, for the core to fill again: on
    /// the request path every call returns outputs, and a fresh list cost an allocation each.
    /// Kept only while few (calls nest when carrying out one feeds the core again) and small
    /// (a burst of outputs does not stay allocated).
    pub fn recycle(&mut self, mut outputs: Vec<Output>) {
        outputs.clear();
        // A list that never held anything would only allocate when used.
        if self.spare.len() < SPARE_LISTS_MAX
            && (1..=SPARE_OUTPUTS_MAX).contains(&outputs.capacity())
        {
            self.spare.push(outputs);
        }
    }

    fn id(&mut self) -> u64 {
        self.outbox().id()
    }

    /// Sends a request to `to` under a fresh id, remembering what its answer is for
    /// (`pending`) and failing it after the replica timeout if none comes. Returns the id.
    fn send_request(
        &mut self,
        now: u64,
        to: NodeId,
        pending: Pending,
        msg: impl FnOnce(u64) -> PeerMsg,
    ) -> u64 {
        let timeout = self.cfg.replica_timeout_ms;
        self.outbox().request(now, timeout, to, pending, msg)
    }

    /// A new epoch range (answer to [`Output::RenewEpochs`]).
    pub fn handle_epochs(&mut self, lease: EpochLease) {
        assert!(lease.next > self.epochs.next.max(self.epochs.primary));
        self.renewing = false;
        self.epochs = EpochLease {
            primary: self.epochs.primary,
            ..lease
        };
    }

    fn fresh_epoch(&mut self) -> Option<u32> {
        if self.epochs.next >= self.epochs.end {
            return None;
        }
        let e = self.epochs.next;
        self.epochs.next += 1;
        if !self.renewing && self.epochs.end - self.epochs.next < self.epochs.size / 4 {
            self.renewing = true;
            self.out.push(Output::RenewEpochs);
        }
        Some(e)
    }

    // ----- client requests -----

    /// A client request: GET, PUT, DELETE or UPDATE. The answer comes as [`Output::Reply`] with `req`.
    pub fn handle_client(&mut self, now: u64, req: u64, request: KeyRequest) -> Vec<Output> {
        self.start(now, ReplyTo::Client(req), request, false, None);
        self.take_output()
    }

    /// The stored key a client GET reads when this node can answer it from its own store alone
    /// (module docs, "local reads and writes"), `None` when the GET must be coordinated. The
    /// shell reads the key at once and answers with [`Core::local_read_reply`]; if the read
    /// would wait for storage or fails, it hands the request to [`Core::handle_client`]
    /// instead, which reads again and handles it like any other.
    pub fn local_read(&mut self, now: u64, request: &KeyRequest) -> Option<StoreKey> {
        let KeyBody::Get(get) = request.body() else {
            return None;
        };
        let (bucket, key) = request.key();
        let overrides = Overrides {
            r: get.r,
            ..Overrides::default()
        };
        let props = self.cfg.buckets.props(bucket);
        let quorum = self.sole_replica(request, props, overrides)?;
        if quorum.r != 1 {
            return None;
        }
        self.ae.foreground(now);
        Some(StoreKey {
            partition: request.partition().0,
            space: Space::Primary,
            bucket: bucket.clone(),
            key: key.clone(),
        })
    }

    /// The quorum of a client request of a bucket with `props` and the request's `overrides`,
    /// if this node is its key's only replica (the bucket's `n` is 1, or the ring has one
    /// member): a request [`Core::local_read`] or [`Core::local_write`] may let the shell
    /// serve alone.
    fn sole_replica(
        &self,
        request: &KeyRequest,
        props: &BucketProps,
        overrides: Overrides,
    ) -> Option<Quorum> {
        let members = self.ring.members().len();
        let quorum = props.quorum_among(overrides, members).ok()?;
        let partition = request.partition().0 as usize;
        let alone = usize::from(quorum.n).min(members) == 1
            && self.walks[partition].first() == Some(&self.cfg.node);
        alone.then_some(quorum)
    }

    /// The answer to a GET that [`Core::local_read`] let the shell read itself, from what the
    /// store held: the answer the coordinated read gives for the same object. It takes the
    /// object, so that a plain last-write-wins value (most reads) moves into the answer: a copy
    /// of a cached value's handle is an atomic count up, and its drop one down.
    pub fn local_read_reply(&mut self, now: u64, stored: Option<Object>) -> Message {
        self.stats.local_reads += 1;
        match stored {
            Some(Object::Lww(lww)) => lww_read_reply(lww, now),
            other => read_reply(other.as_ref(), now),
        }
    }

    /// The storage write of a client PUT this node can make alone, without coordinating it
    /// (module docs, "local reads and writes"), `None` when the PUT must be coordinated. The
    /// shell carries the write out at once and answers with [`Core::local_write_done`], once
    /// the write is durable if it is a synced one; if the write would wait for storage to take
    /// it, or fails, the shell hands the request to [`Core::handle_client`] instead, which
    /// stamps and writes it again (the stamp taken here is then skipped, as any stamp of a
    /// write that failed), once [`LocalWrite::give_back`] has put back the key and value the
    /// write moved out of the request. A request whose write was carried out is left without
    /// them: it is only to be dropped.
    pub fn local_write(&mut self, now: u64, request: &mut KeyRequest) -> Option<LocalWrite> {
        let KeyBody::Put(put) = request.body() else {
            return None;
        };
        // A context is checked, and refused if malformed, by the coordinated path.
        let plain = put.condition.is_none() && put.context.as_ref().is_none_or(Bytes::is_empty);
        if !plain {
            return None;
        }
        let (bucket, _) = request.key();
        let props = *self.cfg.buckets.props(bucket);
        if !plain_lww(&props) {
            return None;
        }
        let overrides = Overrides {
            w: put.w,
            dw: put.dw,
            ..Overrides::default()
        };
        let quorum = self.sole_replica(request, &props, overrides)?;
        let partition = request.partition().0;
        // During a ring change a write also goes to the pending ring's replicas (`transfer.rs`),
        // which only the coordinated path sends.
        if quorum.w != 1
            || quorum.dw > 1
            || self.dropping(partition)
            || self.transfers.pending().is_some()
        {
            return None;
        }
        let Ok(expires_at_ms) = expires_at(put.expiry, &props, now) else {
            return None;
        };
        // The key and value move into the write, so that neither is shared twice (each share
        // and its drop is a locked count update); every refusal below puts them back.
        let bucket = bucket.clone();
        let placement = request.key_hash();
        let KeyBody::Put(put) = request.body_mut() else {
            unreachable!("matched above")
        };
        let key = StoreKey {
            partition,
            space: Space::Primary,
            bucket,
            key: std::mem::take(&mut put.key),
        };
        let value = std::mem::take(&mut put.value);
        // A job of the key in flight or queued writes first: this one would overtake it.
        let stored = if self.locks.contains_key(&key) {
            None
        } else {
            self.passable_lww((&key, placement))
        };
        let Some(stored) = stored else {
            put.key = key.key;
            put.value = value;
            return None;
        };
        // As a blind coordinated write (`Core::lock`): the clock passes the stored stamp, and
        // the write is made as from an absent key.
        self.hlc_last = self.hlc_last.max(stored);
        let object = self.lww_version(None, Val::new(value, expires_at_ms), now);
        // As `check_size`, which the coordinated path then refuses it with.
        if object.encoded_len() > self.cfg.object_bytes_max {
            put_back(request, key.key, object);
            return None;
        }
        self.ae.foreground(now);
        // Synced as the coordinated write syncs its home's copy, which is then its one
        // durable acknowledgement.
        let durable = self.cfg.durable_writes || quorum.dw > 0;
        Some(LocalWrite {
            key,
            op: StoreOp::Write { object, durable },
            placement,
        })
    }

    /// The answer to a PUT [`Core::local_write`] let the shell write, once the store took it
    /// (a synced write's answer then waits for its flush): the replica's tree and the transfers
    /// follow the write, as after a coordinated one.
    pub fn local_write_done(&mut self, now: u64, write: LocalWrite) -> Message {
        self.ae_written(now, (&write.key, write.placement), &write.op);
        self.stored_write(now, &write.key);
        self.stats.blind_writes += 1;
        self.stats.local_writes += 1;
        Message::PutOk(PutOk {
            context: Bytes::new(),
        })
    }

    /// Answers a coordinated request.
    fn answer(&mut self, to: ReplyTo, message: Message) {
        match to {
            ReplyTo::Client(req) => self.out.push(Output::Reply { req, message }),
            ReplyTo::Peer(node, id) => self.out.push(Output::Answer {
                to: node,
                msg: PeerMsg::ForwardReply { id, reply: message },
            }),
            ReplyTo::Slot { .. } | ReplyTo::Transfer { .. } | ReplyTo::Nobody => {
                unreachable!("requests are coordinated for clients and peers only")
            }
        }
    }

    /// Delivers the outcome of a replica read or write run here: `Ok` with what it did, or
    /// `Err` with why it failed.
    fn replica_done(&mut self, now: u64, to: ReplyTo, outcome: Result<SlotResult, ErrorBody>) {
        match (to, outcome) {
            (ReplyTo::Peer(node, id), Ok(SlotResult::Written { durable })) => {
                self.out.push(Output::Answer {
                    to: node,
                    msg: PeerMsg::ReplicaPutOk { id, durable },
                })
            }
            (ReplyTo::Peer(node, id), Ok(SlotResult::Read(object))) => {
                self.out.push(Output::Answer {
                    to: node,
                    msg: PeerMsg::ReplicaGetOk { id, object },
                })
            }
            (ReplyTo::Peer(node, id), Err(error)) => self.out.push(Output::Answer {
                to: node,
                msg: PeerMsg::Failed { id, error },
            }),
            (ReplyTo::Peer(..), Ok(SlotResult::Failed)) => {
                unreachable!("a failed replica operation carries its error")
            }
            (ReplyTo::Slot { op, slot }, outcome) => {
                self.pending_slot_done(op, slot);
                self.slot_answered(now, op, slot, outcome.unwrap_or(SlotResult::Failed));
            }
            (ReplyTo::Transfer { partition }, outcome) => {
                let ok = matches!(outcome, Ok(SlotResult::Written { .. }));
                self.transfer_applied(now, partition, ok);
            }
            (ReplyTo::Nobody, _) => {}
            (ReplyTo::Client(_), _) => {
                unreachable!("replica operations run for coordinators, not clients")
            }
        }
    }

    fn start(
        &mut self,
        now: u64,
        reply_to: ReplyTo,
        request: KeyRequest,
        forwarded: bool,
        apply_by: Option<u64>,
    ) {
        self.ae.foreground(now);
        let overrides = match request.body() {
            KeyBody::Get(m) => Overrides {
                r: m.r,
                ..Overrides::default()
            },
            KeyBody::Put(ringkv_net::Put { w, dw, .. })
            | KeyBody::Delete(ringkv_net::Delete { w, dw, .. })
            | KeyBody::Update(ringkv_net::Update { w, dw, .. })
            | KeyBody::Apply(ringkv_net::Apply { w, dw, .. }) => Overrides {
                w: *w,
                dw: *dw,
                ..Overrides::default()
            },
        };
        let (bucket, key) = request.key();
        let (bucket, key) = (bucket.clone(), key.clone());
        let timeout_ms = request.timeout_ms();
        if self.ops.len() >= self.cfg.ops_max {
            return self.answer(
                reply_to,
                error(
                    ErrorCode::Overloaded,
                    format!("{} requests in flight on this shard", self.ops.len()),
                ),
            );
        }
        let props = *self.cfg.buckets.props(&bucket);
        let members = self.ring.members().len();
        let quorum = match props.quorum_among(overrides, members) {
            Ok(q) => q,
            Err(e) => return self.answer(reply_to, error(ErrorCode::InvalidRequest, e.0)),
        };
        let n = usize::from(quorum.n).min(members);
        // Hashed once, where the request was parsed.
        let partition = request.partition().0;
        debug_assert_eq!(partition, self.ring.partition_of(&bucket, &key).0);
        let deadline = now.saturating_add(
            timeout_ms
                .map_or(self.cfg.request_timeout_ms, u64::from)
                .clamp(1, REQUEST_DEADLINE_MS_MAX),
        );
        // Copied out of the walk (the core is borrowed mutably below), on the stack for the
        // usual replica counts.
        let homes: SmallVec<[NodeId; USED_INLINE]> =
            SmallVec::from_slice(&self.walks[partition as usize][..n]);
        let is_home = homes.contains(&self.cfg.node);
        // Conditional writes, and operations on convergent types, go to the key's first
        // reachable home. For the latter it is not needed for convergence (replicas merge), but
        // a retry then meets the replica that recorded the first attempt's id, and a hot key's
        // operations queue at one replica (one state change replicated at a time) instead of
        // every home merging the others' states concurrently: measured on carts, coordinating at
        // any home gave a 2-3x longer p99.9 (docs/BENCHMARKS.md, "Carts").
        // So do an UPDATE (a map's register operations) and, where keys may hold convergent
        // types (an lww or a typed bucket), a DELETE: it clears what its coordinator has seen of
        // a convergent key, and a home that never received the key would write a tombstone
        // instead, which replaces the state whole, increments that reach the others later
        // included (`crdt.rs`, merge).
        let first_home = match request.body() {
            KeyBody::Put(p) => p.condition.is_some(),
            KeyBody::Apply(_) | KeyBody::Update(_) => true,
            KeyBody::Delete(_) => props.mode == ConflictMode::Lww || props.data_type.is_some(),
            KeyBody::Get(_) => false,
        };
        let id = self.id();
        let op = Op {
            reply_to,
            replied: false,
            partition,
            bucket,
            key,
            quorum,
            deadline,
            apply_by,
            slots: homes
                .iter()
                .map(|&home| Slot {
                    home,
                    holder: None,
                    pending: None,
                    done: false,
                    read: None,
                })
                .collect(),
            used: SmallVec::new(),
            kind: OpKind::Read {
                replies: 0,
                merged: None,
            },
        };
        // With fewer members than `n`, every member is a home; the bucket's quorums were capped
        // at the member count, and a request's own quorum above it is refused below with the
        // counts.
        let (r, w) = (usize::from(quorum.r), usize::from(quorum.w));
        match request.op() {
            KeyOp::Get => {
                if r > n {
                    return self.answer(reply_to, not_enough("read", 0, r, n));
                }
                self.ops.insert(id, op);
                self.op_deadlines.insert((deadline, id));
                for slot in 0..n {
                    self.assign_slot(now, id, slot);
                }
                self.check_read(now, id);
            }
            KeyOp::Put | KeyOp::Delete | KeyOp::Update | KeyOp::Apply if w > n => {
                self.answer(reply_to, not_enough("write", 0, w, n));
            }
            // A conditional write is decided by the key's first reachable home, under the
            // key's lock there, so conditional writes through any node serialize while it is
            // reachable (module docs, "conditional put").
            KeyOp::Put | KeyOp::Delete | KeyOp::Update | KeyOp::Apply
                if first_home && !forwarded =>
            {
                let me = self.cfg.node;
                let primary = homes
                    .iter()
                    .copied()
                    .find(|&h| h == me || self.live.believed_up(h, now));
                match primary {
                    Some(home) if home != me => {
                        self.forward_new(now, id, op, request, deadline, home)
                    }
                    _ => self.start_write(now, id, op, request, is_home),
                }
            }
            KeyOp::Put | KeyOp::Delete | KeyOp::Update | KeyOp::Apply if !is_home && !forwarded => {
                let up = self
                    .live
                    .forward_target(homes.iter().copied(), &BTreeSet::new(), now);
                match up {
                    Some(home) => self.forward_new(now, id, op, request, deadline, home),
                    None => self.start_write(now, id, op, request, false),
                }
            }
            KeyOp::Put | KeyOp::Delete | KeyOp::Update | KeyOp::Apply => {
                self.start_write(now, id, op, request, is_home)
            }
        }
    }

    /// Starts op `id` as a write forwarded to `home`.
    fn forward_new(
        &mut self,
        now: u64,
        id: u64,
        mut op: Op,
        request: KeyRequest,
        deadline: u64,
        home: NodeId,
    ) {
        op.kind = OpKind::Forwarded {
            request,
            tried: BTreeSet::new(),
            pending: None,
        };
        self.ops.insert(id, op);
        self.op_deadlines.insert((deadline, id));
        self.forward(now, id, home);
    }

    fn forward(&mut self, now: u64, id: u64, home: NodeId) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        let OpKind::Forwarded {
            request,
            tried,
            pending,
        } = &mut op.kind
        else {
            return;
        };
        tried.insert(home);
        let msg_id = self.next_id;
        self.next_id += 1;
        *pending = Some((home, msg_id));
        // The home gets what is left of the deadline, not the client's whole timeout again, so
        // it stops when the client stopped waiting.
        let left = u32::try_from(op.deadline.saturating_sub(now).max(1)).unwrap_or(u32::MAX);
        let mut request = request.clone();
        debug_assert!(request.op() != KeyOp::Get, "only writes are forwarded");
        request.set_timeout_ms(left);
        // Only a forward that may move has a timeout (module docs, "forwarding to a silent
        // home"): any other waits for its home, however slow, because a second home would apply
        // it twice (under siblings a second dot, which could come back after a client resolved
        // it). The request's deadline bounds that wait, and a lost connection
        // (`handle_unreachable`) moves it to the next home.
        let movable = !self.plain_forwards.contains(&home) && {
            let lww = self.cfg.buckets.props(&op.bucket).mode == ConflictMode::Lww;
            lww && matches!(request.body(), KeyBody::Put(p) if p.condition.is_none())
        };
        // Such a forward always carries its apply-by time, never later than the client's
        // deadline, so a home that reads it after the client gave up refuses it; it moves on
        // silence only if the move comes before that deadline (after it, a move could only
        // apply the write a second time).
        let timeout = self.cfg.replica_timeout_ms;
        let apply_by = movable.then(|| now.saturating_add(timeout / 2).min(op.deadline));
        if movable && now.saturating_add(timeout) < op.deadline {
            self.timeouts.insert((now.saturating_add(timeout), msg_id));
        }
        self.pending.insert(
            msg_id,
            Pending::Forward {
                op: id,
                node: home,
                apply_by: movable,
            },
        );
        self.stats.forwarded += 1;
        self.out.push(Output::Send {
            to: home,
            msg: PeerMsg::Forward {
                id: msg_id,
                request,
                apply_by,
            },
        });
    }

    fn start_write(&mut self, now: u64, id: u64, mut op: Op, request: KeyRequest, is_home: bool) {
        let props = *self.cfg.buckets.props(&op.bucket);
        let plain = match request.op() {
            KeyOp::Put => true,
            // An UPDATE's fields are a map's registers.
            KeyOp::Update => props.data_type != Some(BucketType::Map),
            KeyOp::Get | KeyOp::Delete | KeyOp::Apply => false,
        };
        if let Some(t) = props.data_type
            && plain
        {
            return self.answer(
                op.reply_to,
                error(
                    ErrorCode::InvalidRequest,
                    format!(
                        "the bucket holds {}s: change its keys with APPLY, or delete them",
                        crdt::type_name(t.crdt())
                    ),
                ),
            );
        }
        let (write, context) = match request.into_body() {
            KeyBody::Put(m) => {
                let expires_at_ms = match expires_at(m.expiry, &props, now) {
                    Ok(at) => at,
                    Err(e) => return self.answer(op.reply_to, Message::Error(e)),
                };
                (Write::Put(m.value, expires_at_ms, m.condition), m.context)
            }
            KeyBody::Delete(m) => (Write::Delete, m.context),
            // An UPDATE's fields are registers of the map type (`crdt.rs`).
            KeyBody::Update(m) => match update_write(m, &props, now) {
                Ok(write) => (write, None),
                Err(e) => return self.answer(op.reply_to, Message::Error(e)),
            },
            KeyBody::Apply(m) => match apply_write(m, &props, now) {
                Ok(write) => (write, None),
                Err(e) => return self.answer(op.reply_to, Message::Error(e)),
            },
            KeyBody::Get(_) => unreachable!("start_write is called for writes"),
        };
        let context = match context.filter(|c| !c.is_empty()) {
            None => None,
            Some(bytes) => match VersionVector::decode(&bytes) {
                // Counters above `COUNTER_MAX` are refused by the decoder.
                Ok(vv) => Some(vv),
                Err(e) => {
                    return self.answer(op.reply_to, error(ErrorCode::BadContext, e.to_string()));
                }
            },
        };
        // A home coordinator syncs its own write in `sync` mode and whenever `dw > 0`, and that
        // write counts as one durable acknowledgement.
        let local_durable = is_home && (self.cfg.durable_writes || op.quorum.dw > 0);
        let want_durable = op.quorum.dw > u8::from(local_durable);
        op.kind = OpKind::Write {
            write,
            context,
            object: None,
            acks: 0,
            durable_acks: 0,
            want_durable,
        };
        let deadline = op.deadline;
        let key = StoreKey {
            partition: op.partition,
            space: Space::Primary,
            bucket: op.bucket.clone(),
            key: op.key.clone(),
        };
        self.ops.insert(id, op);
        self.op_deadlines.insert((deadline, id));
        if is_home {
            // The coordinator's own slot is served by the local update.
            let me = self.cfg.node;
            let op = self.ops.get_mut(&id).expect("inserted above");
            op.use_node(me);
            if let Some(slot) = op.slots.iter_mut().find(|s| s.home == me) {
                slot.holder = Some(me);
            }
            self.lock(now, key, JobKind::Coordinate { op: id });
        } else {
            // No home reachable: coordinate without a local replica, on a fresh epoch.
            let Some(epoch) = self.fresh_epoch() else {
                return self.fail_op(
                    id,
                    error(
                        ErrorCode::Overloaded,
                        "no home replica reachable and no fresh epoch left to coordinate elsewhere",
                    ),
                );
            };
            let actor = Actor::new(self.cfg.node, epoch);
            match self.updated(id, None, actor, now) {
                Ok(object) => self.replicate(now, id, object),
                Err(e) => self.fail_op(id, Message::Error(e)),
            }
        }
    }

    /// The object a write produces from the local replica `local` (module docs on epochs).
    fn updated(
        &mut self,
        id: u64,
        local: Option<Object>,
        actor: Actor,
        now: u64,
    ) -> Result<Object, ErrorBody> {
        let op = self.ops.get(&id).expect("the op of a running write exists");
        // Checked where the stamp is taken: a home that started the forward in time may have
        // stalled since (stopped, or behind a slow storage read), and its sender may have moved
        // it meanwhile (module docs, "forwarding to a silent home").
        if let Some(refused) = self.refuse_late(now, op.apply_by) {
            return Err(refused);
        }
        let op = &self.ops[&id];
        let OpKind::Write { write, context, .. } = &op.kind else {
            unreachable!("updated is called for writes");
        };
        let props = *self.cfg.buckets.props(&op.bucket);
        let val = match write {
            Write::Put(v, expires_at_ms, condition) => {
                if let Some(condition) = condition {
                    let present = local.as_ref().is_some_and(|o| !o.is_deleted_at(now));
                    let holds = match condition {
                        Condition::IfAbsent => !present,
                        Condition::IfPresent => present,
                    };
                    if !holds {
                        return Err(ErrorBody::new(
                            ErrorCode::ConditionFailed,
                            if present {
                                "the key holds a value"
                            } else {
                                "the key holds no value"
                            },
                        ));
                    }
                }
                Val::new(v.clone(), *expires_at_ms)
            }
            // A DELETE of a convergent key removes what this replica has seen of it (`crdt.rs`):
            // a tombstone would replace it whole, concurrent adds included.
            Write::Delete
                if matches!(local, Some(Object::Crdt(_))) || props.data_type.is_some() =>
            {
                let mut state = match local {
                    Some(Object::Crdt(c)) => c,
                    _ => Box::new(Crdt::new(crdt::FIRST_GENERATION)),
                };
                state.clear();
                return Ok(Object::Crdt(state));
            }
            Write::Delete => Val::Tombstone,
            Write::Crdt {
                crdt, ops, op_id, ..
            } => {
                let stamp = (
                    lww_stamp(&mut self.hlc_last, local.as_ref(), now),
                    self.cfg.node,
                );
                let (mut state, ops) = crdt_base(local, *crdt, ops, now)?;
                if op_id.is_some_and(|id| state.saw_op(id)) {
                    // A retry of an applied operation: acknowledged again, applied once.
                    return Ok(Object::Crdt(Box::new(state)));
                }
                state
                    .apply(actor, stamp, *crdt, &ops, *op_id, now)
                    .map_err(crdt_error)?;
                return self.check_size(Object::Crdt(Box::new(state)));
            }
        };
        let object = match props.mode {
            ConflictMode::Siblings => {
                let server = match local {
                    Some(Object::Causal(c)) => c,
                    Some(Object::Lww(_) | Object::Map(_) | Object::Crdt(_)) | None => {
                        DvvSet::empty()
                    }
                };
                let put = match context {
                    Some(vv) => Put::new_with_context(vv.clone(), val),
                    None => Put::new(val),
                };
                let clock = DvvSet::update(put, server, actor);
                if clock.size() > usize::from(props.max_siblings) {
                    return Err(ErrorBody::new(
                        ErrorCode::TooManySiblings,
                        format!(
                            "the write would leave {} siblings, above the bucket's limit of {}; \
                             read the key, merge its siblings and write back with the context",
                            clock.size(),
                            props.max_siblings
                        ),
                    ));
                }
                Object::Causal(clock)
            }
            // The key still holds siblings from before the bucket became `lww`: a plain lww
            // version would lose every merge against them (causal objects win, so that a mode
            // change never drops siblings silently). The write supersedes them causally instead.
            ConflictMode::Lww if matches!(local, Some(Object::Causal(_))) => {
                let Some(Object::Causal(server)) = local else {
                    unreachable!("matched above")
                };
                let context = server.join();
                Object::Causal(DvvSet::update(
                    Put::new_with_context(context, val),
                    server,
                    actor,
                ))
            }
            ConflictMode::Lww => {
                let new = self.lww_version(local.as_ref(), val, now);
                match local {
                    Some(l) => l.merge(new),
                    None => new,
                }
            }
        };
        if let Object::Causal(clock) = &object {
            let actors = clock.entries().count();
            if actors > CONTEXT_ENTRIES_MAX {
                return Err(ErrorBody::new(
                    ErrorCode::TooLarge,
                    format!(
                        "the key's causal history would name {actors} actors, more than a \
                         context carries ({CONTEXT_ENTRIES_MAX}); write it under a new key"
                    ),
                ));
            }
        }
        self.check_size(object)
    }

    /// A new `lww` version of `val` from this coordinator, stamped past every stamp it has seen
    /// and past the local replica's `local`.
    fn lww_version(&mut self, local: Option<&Object>, val: Val, now: u64) -> Object {
        Object::Lww(Lww {
            timestamp: lww_stamp(&mut self.hlc_last, local, now),
            node: self.cfg.node,
            val,
        })
    }

    /// Refuses an object above the size limit.
    fn check_size(&self, object: Object) -> Result<Object, ErrorBody> {
        let size = object.encoded_len();
        if size > self.cfg.object_bytes_max {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                format!(
                    "the key's object would be {size} bytes with its siblings or fields, above \
                     the limit of {}; merge the siblings or delete fields first",
                    self.cfg.object_bytes_max
                ),
            ));
        }
        Ok(object)
    }

    /// The actor a home coordinator uses for a key whose local replica is `local`.
    fn home_actor(&self, local: Option<&Object>) -> Actor {
        let me = self.cfg.node;
        let continued = local.and_then(|o| {
            o.actors()
                .filter(|a| a.node == me && a.epoch >= self.floor)
                .max()
        });
        continued.unwrap_or(Actor::new(me, self.epochs.primary))
    }

    /// Sends the written object to every slot other than the coordinator's own.
    fn replicate(&mut self, now: u64, id: u64, object: Object) {
        let me = self.cfg.node;
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        if let OpKind::Write { object: o, .. } = &mut op.kind {
            *o = Some(object);
        }
        for slot in 0..op.slots.len() {
            let op = &self.ops[&id];
            if op.slots[slot].holder == Some(me) && op.slots[slot].home == me {
                continue;
            }
            self.assign_slot(now, id, slot);
        }
        if self.transfers.pending().is_some()
            && let Some(op) = self.ops.get(&id)
            && let OpKind::Write {
                object: Some(object),
                want_durable,
                ..
            } = &op.kind
        {
            let homes: Vec<NodeId> = op.slots.iter().map(|s| s.home).collect();
            let key = StoreKey {
                partition: op.partition,
                space: Space::Primary,
                bucket: op.bucket.clone(),
                key: op.key.clone(),
            };
            let (object, durable) = (object.clone(), *want_durable);
            self.send_to_pending(now, key, &homes, &object, durable);
        }
        self.check_write(now, id);
    }

    /// Gives slot `slot` of op `id` a holder (its home if believed up, else the next unused
    /// fallback believed up, else, as a last resort, the suspected home if this op has not tried
    /// it) and sends it the request; a slot with nobody left stays empty.
    ///
    /// The last resort is for suspicion that is out of date: a node that just started (or
    /// restarted) is suspected by peers whose first heartbeats it missed, for up to `down_ms`,
    /// and with no fallback to stand in (a cluster of `n` nodes) failing at once would refuse
    /// writes a live node could take. A home that is really down fails the slot once (at its
    /// connection's failure or the replica timeout), and the slot then stays empty.
    fn assign_slot(&mut self, now: u64, id: u64, slot: usize) {
        let me = self.cfg.node;
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        let home = op.slots[slot].home;
        let walk = &self.walks[op.partition as usize];
        let n = op.slots.len();
        let untried = !op.used.contains(&home);
        let holder = if untried && self.live.believed_up(home, now) {
            Some(home)
        } else {
            // The ring may have changed (and shrunk) since the op began.
            walk.get(n..)
                .unwrap_or_default()
                .iter()
                .copied()
                .find(|f| !op.used.contains(f) && self.live.believed_up(*f, now))
                .or(untried.then_some(home))
        };
        let op = self.ops.get_mut(&id).expect("looked up above");
        let s = &mut op.slots[slot];
        let moved = s.holder.is_some();
        s.holder = holder;
        s.pending = None;
        s.done = false;
        let Some(holder) = holder else {
            return;
        };
        let key = s.key(op.partition, &op.bucket, &op.key);
        op.use_node(holder);
        let msg_id = self.next_id;
        self.next_id += 1;
        let op = self.ops.get_mut(&id).expect("looked up above");
        op.slots[slot].pending = Some(msg_id);
        if holder != home && matches!(op.kind, OpKind::Write { .. }) {
            self.stats.hinted_writes += 1;
        }
        if moved {
            self.stats.slot_moves += 1;
        }
        let msg = match &op.kind {
            OpKind::Write {
                object: Some(object),
                want_durable,
                ..
            } => PeerMsg::ReplicaPut {
                id: msg_id,
                key,
                object: object.clone(),
                durable: *want_durable,
            },
            OpKind::Write { object: None, .. } => {
                unreachable!("slots are assigned once the object exists")
            }
            OpKind::Read { .. } => PeerMsg::ReplicaGet { id: msg_id, key },
            OpKind::Forwarded { .. } => unreachable!("forwarded ops have no slots"),
        };
        self.pending.insert(
            msg_id,
            Pending::Slot {
                op: id,
                slot,
                node: holder,
            },
        );
        if holder == me {
            self.local(now, msg, ReplyTo::Slot { op: id, slot });
        } else {
            self.timeouts
                .insert((now + self.cfg.replica_timeout_ms, msg_id));
            self.out.push(Output::Send { to: holder, msg });
        }
    }

    /// Runs a replica request addressed to this node.
    fn local(&mut self, now: u64, msg: PeerMsg, to: ReplyTo) {
        match msg {
            PeerMsg::ReplicaPut {
                key,
                object,
                durable,
                ..
            } => {
                self.lock(
                    now,
                    key,
                    JobKind::Apply {
                        object,
                        durable,
                        then: to,
                    },
                );
            }
            PeerMsg::ReplicaGet { key, .. } => {
                let sid = self.id();
                self.pending.insert(sid, Pending::PeerRead { to });
                self.out.push(Output::Store {
                    id: sid,
                    key,
                    op: StoreOp::Read,
                });
            }
            _ => unreachable!("only replica requests run locally"),
        }
    }

    fn check_write(&mut self, now: u64, id: u64) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        let OpKind::Write {
            acks, durable_acks, ..
        } = op.kind
        else {
            return;
        };
        let (w, dw) = (op.quorum.w, op.quorum.dw);
        if !op.replied && acks >= w && durable_acks >= dw {
            // As a read answers: only causal objects have a context to write back with.
            let context = match &op.kind {
                OpKind::Write {
                    object: Some(o @ Object::Causal(_)),
                    ..
                } => Bytes::from(o.context().encode()),
                _ => Bytes::new(),
            };
            let reply = match &op.kind {
                OpKind::Write {
                    write: Write::Delete,
                    ..
                } => Message::DeleteOk,
                OpKind::Write {
                    write: Write::Crdt { update: true, .. },
                    ..
                } => Message::UpdateOk,
                OpKind::Write {
                    write: Write::Crdt { return_value, .. },
                    object,
                    ..
                } => Message::ApplyOk(ApplyOk {
                    value: match object {
                        Some(Object::Crdt(c)) if *return_value => c.value(now),
                        _ => None,
                    },
                }),
                _ => Message::PutOk(PutOk { context }),
            };
            let to = op.reply_to;
            self.ops.get_mut(&id).expect("exists").replied = true;
            self.answer(to, reply);
        }
        self.finish_if_done(now, id);
    }

    fn check_read(&mut self, now: u64, id: u64) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        let OpKind::Read { replies, merged } = &op.kind else {
            return;
        };
        if !op.replied && *replies >= op.quorum.r {
            let reply = read_reply(merged.as_ref(), now);
            let to = op.reply_to;
            self.ops.get_mut(&id).expect("exists").replied = true;
            self.answer(to, reply);
        }
        self.finish_if_done(now, id);
    }

    /// Ends an op whose slots have all answered or have nobody left: a write that never reached
    /// its quorum fails with the counts; a read sends its repairs.
    fn finish_if_done(&mut self, now: u64, id: u64) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        if matches!(op.kind, OpKind::Forwarded { .. }) {
            return;
        }
        let settled = op.slots.iter().all(|s| s.done || s.holder.is_none());
        if !settled {
            return;
        }
        self.end_op(now, id, false);
    }

    /// Removes op `id`, answering it if it has not been answered: `timeout` if its deadline
    /// passed, else `not_enough_replicas` with the counts.
    fn end_op(&mut self, now: u64, id: u64, timed_out: bool) {
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        self.op_deadlines.remove(&(op.deadline, id));
        for slot in &op.slots {
            if let Some(p) = slot.pending {
                // Late answers find no op and are ignored; the message timeout goes too.
                self.pending.remove(&p);
            }
        }
        match &op.kind {
            OpKind::Write {
                acks, durable_acks, ..
            } if !op.replied => {
                let message = if timed_out {
                    error(
                        ErrorCode::Timeout,
                        format!(
                            "{acks} of {} write acknowledgements ({durable_acks} of {} durable) \
                             before the deadline; the write may still be applied",
                            op.quorum.w, op.quorum.dw
                        ),
                    )
                } else if *acks < op.quorum.w {
                    not_enough(
                        "write",
                        usize::from(*acks),
                        usize::from(op.quorum.w),
                        op.slots.len(),
                    )
                } else {
                    error(
                        ErrorCode::NotEnoughReplicas,
                        format!(
                            "{durable_acks} of {} durable write acknowledgements",
                            op.quorum.dw
                        ),
                    )
                };
                self.answer(op.reply_to, message);
            }
            OpKind::Read { replies, merged } => {
                if !op.replied {
                    let message = if timed_out {
                        error(
                            ErrorCode::Timeout,
                            format!(
                                "{replies} of {} read replies before the deadline",
                                op.quorum.r
                            ),
                        )
                    } else {
                        not_enough(
                            "read",
                            usize::from(*replies),
                            usize::from(op.quorum.r),
                            op.slots.len(),
                        )
                    };
                    self.answer(op.reply_to, message);
                }
                if let Some(merged) = merged {
                    self.repair(now, &op, merged);
                }
            }
            OpKind::Forwarded { pending, .. } => {
                if let Some((_, p)) = pending {
                    self.pending.remove(p);
                }
                if !op.replied {
                    self.answer(
                        op.reply_to,
                        error(
                            ErrorCode::Timeout,
                            "no home replica answered the forwarded request before the deadline",
                        ),
                    );
                }
            }
            OpKind::Write { .. } => {}
        }
    }

    /// Read repair: every slot holder that answered with something other than the merge gets it.
    fn repair(&mut self, now: u64, op: &Op, merged: &Object) {
        for slot in &op.slots {
            let (Some(holder), Some(read)) = (slot.holder, &slot.read) else {
                continue;
            };
            if read.as_ref() == Some(merged) {
                continue;
            }
            let key = StoreKey {
                partition: op.partition,
                space: if holder == slot.home {
                    Space::Primary
                } else {
                    Space::Hint(slot.home)
                },
                bucket: op.bucket.clone(),
                key: op.key.clone(),
            };
            self.stats.read_repairs += 1;
            let msg_id = self.id();
            let msg = PeerMsg::ReplicaPut {
                id: msg_id,
                key: key.clone(),
                object: merged.clone(),
                durable: false,
            };
            if holder == self.cfg.node {
                self.lock(
                    now,
                    key,
                    JobKind::Apply {
                        object: merged.clone(),
                        durable: false,
                        then: ReplyTo::Nobody,
                    },
                );
            } else {
                self.pending
                    .insert(msg_id, Pending::Repair { node: holder });
                // Nobody waits for a repair; its timeout cleans up the entry and, like any
                // unanswered request, makes the node suspect.
                self.timeouts
                    .insert((now + self.cfg.replica_timeout_ms, msg_id));
                self.out.push(Output::Send { to: holder, msg });
            }
        }
    }

    fn fail_op(&mut self, id: u64, message: Message) {
        if let Some(op) = self.ops.remove(&id) {
            self.op_deadlines.remove(&(op.deadline, id));
            for slot in &op.slots {
                if let Some(p) = slot.pending {
                    self.pending.remove(&p);
                }
            }
            if !op.replied {
                self.answer(op.reply_to, message);
            }
        }
    }

    // ----- answers from slots -----

    fn slot_answered(&mut self, now: u64, op_id: u64, slot: usize, result: SlotResult) {
        let Some(op) = self.ops.get_mut(&op_id) else {
            return;
        };
        let s = &mut op.slots[slot];
        s.pending = None;
        match result {
            // The next fallback takes the slot, if any is left.
            SlotResult::Failed => self.assign_slot(now, op_id, slot),
            SlotResult::Written { durable } => {
                s.done = true;
                if let OpKind::Write {
                    acks, durable_acks, ..
                } = &mut op.kind
                {
                    *acks += 1;
                    *durable_acks += u8::from(durable);
                }
                self.check_write(now, op_id);
            }
            SlotResult::Read(object) => {
                s.done = true;
                s.read = Some(object.clone());
                if let OpKind::Read { replies, merged } = &mut op.kind {
                    *replies += 1;
                    if let Some(o) = object {
                        *merged = Some(match merged.take() {
                            Some(m) => m.merge(o),
                            None => o,
                        });
                    }
                }
                self.check_read(now, op_id);
            }
        }
        // A request whose remaining slots can no longer reach its quorum ends now rather than at
        // its deadline.
        if let Some(op) = self.ops.get(&op_id)
            && !op.replied
        {
            let open = op
                .slots
                .iter()
                .filter(|s| s.holder.is_some() && !s.done)
                .count();
            let (have, need) = match op.kind {
                OpKind::Write { acks, .. } => (acks, op.quorum.w),
                OpKind::Read { replies, .. } => (replies, op.quorum.r),
                OpKind::Forwarded { .. } => return,
            };
            if usize::from(have) + open < usize::from(need) {
                self.end_op(now, op_id, false);
                return;
            }
        }
        self.finish_if_done(now, op_id);
    }

    // ----- peers -----

    /// A message from node `from`.
    pub fn handle_peer(&mut self, now: u64, from: NodeId, msg: PeerMsg) -> Vec<Output> {
        self.heard_from(from, now);
        // An error answer is a failure however it travelled: a core answers a forward's error as
        // its reply, and the wire delivers every ERROR frame as `Failed`.
        let msg = match msg {
            PeerMsg::ForwardReply {
                id,
                reply: Message::Error(error),
            } => PeerMsg::Failed { id, error },
            other => other,
        };
        match msg {
            PeerMsg::ReplicaPut { id, ref key, .. } => {
                self.ae.foreground(now);
                if key.space == Space::Primary && !self.replicates(key.partition) {
                    // A coordinator with an older ring: keep the write, and hand it on.
                    self.handoff_needed(now, key.partition);
                }
                self.local(now, msg, ReplyTo::Peer(from, id));
            }
            PeerMsg::ReplicaGet { id, .. } => {
                self.ae.foreground(now);
                self.local(now, msg, ReplyTo::Peer(from, id));
            }
            PeerMsg::TransferPull {
                id,
                partition,
                after,
            } => self.serve_pull(from, id, partition, after),
            PeerMsg::TransferPage { id, page } => match self.pending.remove(&id) {
                Some(Pending::Pull { partition }) => self.pull_page(now, partition, page),
                Some(other) => {
                    self.pending.insert(id, other);
                }
                None => {}
            },
            PeerMsg::Forward {
                id,
                request,
                apply_by,
            } => match self.refuse_late(now, apply_by) {
                // Its sender may already have moved it to another home (module docs).
                Some(refused) => self.answer(ReplyTo::Peer(from, id), Message::Error(refused)),
                None => self.start(now, ReplyTo::Peer(from, id), request, true, apply_by),
            },
            PeerMsg::AeLevel { .. }
            | PeerMsg::AeKeys { .. }
            | PeerMsg::AeReap { .. }
            | PeerMsg::AeDrop { .. }
            | PeerMsg::AeDropOk { .. } => self.ae_handle_peer(now, from, msg),
            PeerMsg::AeLevelOk { id, .. }
            | PeerMsg::AeKeysOk { id, .. }
            | PeerMsg::AeReapOk { id, .. } => {
                if matches!(self.pending.get(&id), Some(Pending::Exchange { node }) if *node == from)
                {
                    self.pending.remove(&id);
                    self.ae_handle_peer(now, from, msg);
                }
            }
            PeerMsg::ReplicaPutOk { id, durable } => match self.pending.remove(&id) {
                Some(Pending::Slot { op, slot, .. }) => {
                    self.slot_answered(now, op, slot, SlotResult::Written { durable })
                }
                Some(Pending::Delivery { hint, object, to }) => {
                    self.hint_settled(now, &hint, to, durable);
                    if durable {
                        self.lock(
                            now,
                            *hint,
                            JobKind::DropHint {
                                delivered: Some(*object),
                            },
                        );
                    }
                }
                Some(Pending::HandoffPut { partition }) => {
                    self.handoff_acked(now, partition, durable)
                }
                Some(Pending::Repair { .. }) | None => {}
                Some(other) => {
                    self.pending.insert(id, other);
                }
            },
            PeerMsg::ReplicaGetOk { id, object } => match self.pending.remove(&id) {
                Some(Pending::Slot { op, slot, .. }) => {
                    self.slot_answered(now, op, slot, SlotResult::Read(object))
                }
                // An answer of the wrong kind leaves what it does not answer in place.
                Some(other) => {
                    self.pending.insert(id, other);
                }
                None => {}
            },
            PeerMsg::ForwardReply { id, reply } => match self.pending.remove(&id) {
                Some(Pending::Forward { op, .. }) => {
                    if let Some(o) = self.ops.remove(&op) {
                        self.op_deadlines.remove(&(o.deadline, op));
                        self.answer(o.reply_to, reply);
                    }
                }
                Some(other) => {
                    self.pending.insert(id, other);
                }
                None => {}
            },
            PeerMsg::HintCredit { id, wanted, .. } => self.grant_credit(from, id, wanted),
            PeerMsg::HintCreditOk { id, granted } => match self.pending.remove(&id) {
                Some(Pending::Credit { home }) => self.credit_answered(home, Some((id, granted))),
                Some(other) => {
                    self.pending.insert(id, other);
                }
                None => {}
            },
            PeerMsg::Ping { id } => self.out.push(Output::Answer {
                to: from,
                msg: PeerMsg::Pong { id },
            }),
            // Its arrival is all it carries (`heard_from` above).
            PeerMsg::Pong { .. } => {}
            PeerMsg::Failed { id, error: e } => {
                match self.pending.remove(&id) {
                    Some(Pending::Slot { op, slot, node }) => {
                        self.write_missed(op, node);
                        self.slot_answered(now, op, slot, SlotResult::Failed)
                    }
                    // An older home that does not know forwards with an apply-by time: it gets
                    // plain forwards from now on (module docs).
                    Some(Pending::Forward {
                        op, apply_by: true, ..
                    }) if e.code == ErrorCode::UnknownKind => {
                        self.plain_forwards.insert(from);
                        self.forward(now, op, from);
                    }
                    // Refused unapplied, read late (or its clock is ahead): the next home.
                    Some(Pending::Forward {
                        op, apply_by: true, ..
                    }) if e.code == ErrorCode::Expired => self.forward_refused(now, op),
                    Some(Pending::Forward { op, .. }) => {
                        // The home coordinated and failed: its answer is the client's answer.
                        if let Some(o) = self.ops.remove(&op) {
                            self.op_deadlines.remove(&(o.deadline, op));
                            self.answer(o.reply_to, Message::Error(e));
                        }
                    }
                    Some(Pending::Delivery { hint, to, .. }) => {
                        self.hint_settled(now, &hint, to, false)
                    }
                    Some(Pending::Credit { home }) => self.credit_answered(home, None),
                    Some(Pending::Pull { partition }) => self.pull_failed(now, partition),
                    Some(Pending::HandoffPut { partition }) => {
                        self.handoff_acked(now, partition, false)
                    }
                    Some(Pending::Exchange { node }) if node == from => self.ae.failed(from, id),
                    Some(Pending::Repair { .. }) | None => {}
                    // From another node than the one asked, or an id of a storage operation:
                    // not its answer, which is left in place.
                    Some(other) => {
                        self.pending.insert(id, other);
                    }
                }
            }
        }
        self.take_output()
    }

    /// The shell lost its connection to `node` (or could not open one): everything outstanding
    /// there fails now instead of at its timeout, and the node is believed unreachable.
    pub fn handle_unreachable(&mut self, now: u64, node: NodeId) -> Vec<Output> {
        self.live.mark_down(node, now);
        // It may come back as a newer build.
        self.plain_forwards.remove(&node);
        let mut ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| match p {
                Pending::Slot { node: n, .. }
                | Pending::Forward { node: n, .. }
                | Pending::Repair { node: n }
                | Pending::Exchange { node: n } => *n == node,
                Pending::Delivery { to, .. } => *to == node,
                Pending::Credit { home } => *home == node,
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        // In the order they were sent (the table's own order is its hash's).
        ids.sort_unstable();
        for id in ids {
            self.expire(now, id);
        }
        self.take_output()
    }

    /// A replica write of write op `op` to `node` failed or timed out: anti-entropy looks at
    /// that replica of the key's tree ahead of its round (`antientropy.rs`, *Pacing*).
    fn write_missed(&mut self, op: u64, node: NodeId) {
        let Some(o) = self.ops.get(&op) else {
            return;
        };
        if matches!(o.kind, OpKind::Write { .. }) {
            let (partition, bucket) = (o.partition, o.bucket.clone());
            self.ae_suspect(partition, &bucket, node);
        }
    }

    /// As a home, the refusal of a forward whose apply-by time `apply_by` has passed at `now`
    /// (counted), or `None` if it may still be applied: checked when it arrives and again
    /// where its stamp is taken.
    fn refuse_late(&mut self, now: u64, apply_by: Option<u64>) -> Option<ErrorBody> {
        let by = apply_by.filter(|&by| now > by)?;
        self.stats.forwards_refused += 1;
        Some(expired(now, by))
    }

    /// A home refused forwarded op `op` unapplied (`expired`): the next home it has not tried,
    /// if any. With none left the client is answered `timeout` rather than the write being
    /// coordinated here: the homes answer, so they are up, and refusals from all of them mean
    /// this node's clock is behind theirs, where a stamp of its own could lose to older writes.
    fn forward_refused(&mut self, now: u64, op: u64) {
        if self.move_forward(now, op) {
            return;
        }
        if let Some(o) = self.ops.remove(&op) {
            self.op_deadlines.remove(&(o.deadline, op));
            self.answer(
                o.reply_to,
                error(
                    ErrorCode::Timeout,
                    "every home refused the forwarded write as reaching it after its apply-by \
                     time; nothing was written (is this node's clock behind its peers'?)",
                ),
            );
        }
    }

    /// Sends forwarded op `op` to the next home it has not tried; false if none is left (or
    /// the op is gone).
    fn move_forward(&mut self, now: u64, op: u64) -> bool {
        let next = self.ops.get(&op).and_then(|o| match &o.kind {
            OpKind::Forwarded { tried, .. } => {
                self.live
                    .forward_target(o.slots.iter().map(|s| s.home), tried, now)
            }
            _ => None,
        });
        let Some(home) = next else {
            return false;
        };
        self.stats.forwards_moved += 1;
        self.forward(now, op, home);
        true
    }

    /// Coordinates forwarded op `op` here after all: every home failed.
    fn coordinate_forward_here(&mut self, now: u64, op: u64) {
        let Some(mut o) = self.ops.remove(&op) else {
            return;
        };
        self.op_deadlines.remove(&(o.deadline, op));
        let OpKind::Forwarded { request, .. } = std::mem::replace(
            &mut o.kind,
            OpKind::Read {
                replies: 0,
                merged: None,
            },
        ) else {
            return;
        };
        self.start_write(now, op, o, request, false);
    }

    /// Message `id` is given up on (timeout or lost connection).
    fn expire(&mut self, now: u64, id: u64) {
        match self.pending.remove(&id) {
            Some(Pending::Slot { op, slot, node }) => {
                self.live.mark_down(node, now);
                self.write_missed(op, node);
                self.slot_answered(now, op, slot, SlotResult::Failed);
            }
            Some(Pending::Forward { op, node, .. }) => {
                self.live.mark_down(node, now);
                if !self.move_forward(now, op) {
                    self.coordinate_forward_here(now, op);
                }
            }
            Some(Pending::Repair { node }) => self.live.mark_down(node, now),
            Some(Pending::Pull { partition }) => self.pull_failed(now, partition),
            Some(Pending::HandoffPut { partition }) => self.handoff_acked(now, partition, false),
            Some(Pending::Delivery { hint, to, .. }) => {
                self.live.mark_down(to, now);
                self.hint_settled(now, &hint, to, false);
            }
            Some(Pending::Credit { home }) => {
                self.live.mark_down(home, now);
                self.credit_answered(home, None);
            }
            Some(Pending::Exchange { .. }) => self.ae.expired(id),
            Some(other) => {
                self.pending.insert(id, other);
            }
            None => {}
        }
    }

    // ----- time -----

    /// Time passed: expires messages and requests, and runs a hinted-handoff round when due.
    pub fn handle_tick(&mut self, now: u64) -> Vec<Output> {
        while let Some(&(t, id)) = self.timeouts.first() {
            if t > now {
                break;
            }
            self.timeouts.pop_first();
            self.expire(now, id);
        }
        while let Some(&(t, id)) = self.op_deadlines.first() {
            if t > now {
                break;
            }
            self.op_deadlines.pop_first();
            self.end_op(now, id, true);
        }
        self.hint_tick(now);
        self.ae_tick(now);
        self.heartbeat(now);
        self.transfer_round(now);
        self.take_output()
    }

    // ----- storage -----

    /// The result of [`Output::Store`] `id`: for a read the object, for a write or removal
    /// `Ok(None)`; `Err` with the storage's message on failure.
    pub fn handle_stored(
        &mut self,
        now: u64,
        id: u64,
        result: Result<Option<Object>, String>,
    ) -> Vec<Output> {
        match self.pending.remove(&id) {
            Some(Pending::Job { job }) => self.job_step(now, job, result),
            Some(Pending::PeerRead { to }) => {
                let outcome = result
                    .map(SlotResult::Read)
                    .map_err(|e| ErrorBody::new(ErrorCode::Internal, e));
                self.replica_done(now, to, outcome);
            }
            Some(Pending::HintRead { hint, to }) => match result {
                Ok(Some(object)) => {
                    let key = StoreKey {
                        space: Space::Primary,
                        ..(*hint).clone()
                    };
                    let pending = Pending::Delivery {
                        hint,
                        object: Box::new(object.clone()),
                        to,
                    };
                    self.send_request(now, to, pending, |id| PeerMsg::ReplicaPut {
                        id,
                        key,
                        object,
                        durable: true,
                    });
                }
                Ok(None) | Err(_) => {
                    self.hint_settled(now, &hint, to, false);
                    if result.is_ok() {
                        self.hint_gone(&hint);
                    }
                }
            },
            Some(Pending::Push { to, key }) => self.ae_push_read(now, (to, *key), result),
            Some(other) => {
                self.pending.insert(id, other);
            }
            None => {}
        }
        self.take_output()
    }

    /// A local slot request finished; its pending entry (keyed by the slot's message id) goes.
    fn pending_slot_done(&mut self, op: u64, slot: usize) {
        if let Some(p) = self
            .ops
            .get(&op)
            .and_then(|o| o.slots.get(slot))
            .and_then(|s| s.pending)
        {
            self.pending.remove(&p);
        }
    }

    // ----- per-key jobs -----

    fn lock(&mut self, now: u64, key: StoreKey, kind: JobKind) {
        if key.space == Space::Primary && self.dropping(key.partition) {
            // The shell is dropping the partition (a handoff finished): a write landing now
            // could be dropped after it is acknowledged. The request fails; its coordinator
            // moves on.
            let job = Job {
                key,
                kind,
                stage: Stage::Queued,
                riders: Vec::new(),
            };
            return self.job_failed(now, job, "the partition is being dropped here".into());
        }
        let id = self.id();
        self.jobs.insert(
            id,
            Job {
                key: key.clone(),
                kind,
                stage: Stage::Queued,
                riders: Vec::new(),
            },
        );
        let blind = self.blind_lww(&key, id);
        match self.locks.entry(key) {
            Entry::Occupied(mut queue) => queue.get_mut().waiting.push_back(id),
            Entry::Vacant(slot) => {
                slot.insert(LockQueue::new(id));
                match blind {
                    None => self.job_read(id),
                    // Nothing to read (`blind_lww`). A coordination's clock passes the stored
                    // stamp, as `lww_stamp` does with a read object; the write is made from
                    // there, and a replica's newer value replaces the stored one.
                    Some(blind) => {
                        if let Blind::Coordinate { stored } = blind {
                            self.hlc_last = self.hlc_last.max(stored);
                        }
                        self.jobs.get_mut(&id).expect("inserted above").stage = Stage::Reading;
                        self.stats.blind_writes += 1;
                        self.job_read_done(now, id, Local::Blind);
                    }
                }
            }
        }
    }

    /// Whether job `id`, about to take `key`'s free lock, may skip reading the local replica,
    /// because the stored object is known to be a plain `lww` value (its anti-entropy entry
    /// keeps the stamp) that the job's write replaces whatever it holds:
    /// - a coordinated unconditional PUT of an `lww` bucket: stamped above the stored stamp
    ///   (the clock passes it first), the write made from an absent key is the one the read
    ///   would have given (`lww_stamp`);
    /// - a replica's `lww` value stamped above the stored one: the merge keeps it.
    ///
    /// Anything else reads: a new key, a condition, a map or siblings in storage, an older or
    /// equal stamp, a tree still loading or being refilled by a handoff pass.
    fn blind_lww(&self, key: &StoreKey, id: u64) -> Option<Blind> {
        match &self.jobs.get(&id)?.kind {
            JobKind::Coordinate { op } => {
                let op = self.ops.get(op)?;
                let props = self.cfg.buckets.props(&op.bucket);
                let plain = matches!(
                    op.kind,
                    OpKind::Write {
                        write: Write::Put(_, _, None),
                        ..
                    }
                ) && plain_lww(props);
                if !plain {
                    return None;
                }
                let stored = self.passable_lww((key, antientropy::placement(key)))?;
                Some(Blind::Coordinate { stored })
            }
            JobKind::Apply {
                object: Object::Lww(new),
                ..
            } => {
                let stored = self.known_lww((key, antientropy::placement(key)))?;
                (new.timestamp > stored).then_some(Blind::Apply)
            }
            JobKind::Apply { .. } | JobKind::DropHint { .. } | JobKind::Reap { .. } => None,
        }
    }

    /// Hands `hint` the memory that coming local writes of `keys` (partition, bucket, placement
    /// hash: [`KeyRequest::key_hash`]) look up first in the core's own tables (their
    /// anti-entropy entries), as (address, bytes), for a batch served together: the shell's
    /// `hint` asks the CPU to load it, which the core, free of architecture code, does not do
    /// itself. Reads look at none of it.
    pub fn prefetch<'k>(
        &self,
        keys: impl IntoIterator<Item = (u32, &'k [u8], u64)>,
        mut hint: impl FnMut(*const u8, usize),
    ) {
        self.ae.prefetch(&self.view(), keys, &mut hint);
    }

    /// The stamp of the plain `lww` value `key` holds, when its anti-entropy entry knows it and
    /// the entry can be trusted: not while a handoff pass may be refilling the partition's trees
    /// from pages scanned before the latest writes ([`Core::blind_lww`]).
    fn known_lww(&self, key: (&StoreKey, u64)) -> Option<u64> {
        if self.transfers.handing_off(key.0.partition) {
            return None;
        }
        self.ae.stored_lww(&self.view(), key)
    }

    /// [`Core::known_lww`] when a put can be stamped above it: a stamp at the clock's end
    /// cannot be passed (`hlc_next` saturates), so such a write must merge with what is stored.
    fn passable_lww(&self, key: (&StoreKey, u64)) -> Option<u64> {
        self.known_lww(key)
            .filter(|&stamp| stamp.max(self.hlc_last) < u64::MAX)
    }

    /// Starts the job first in line for its key, taking along the coordinations and merges
    /// queued right behind it (at most [`BATCH_JOBS_MAX`]): they share one read and one write, so
    /// a hot key costs one synced write per batch rather than per request.
    fn job_read(&mut self, job: u64) {
        let sid = self.id();
        let key = self
            .jobs
            .get(&job)
            .expect("a queued job exists")
            .key
            .clone();
        let batchable =
            |kind: &JobKind| !matches!(kind, JobKind::DropHint { .. } | JobKind::Reap { .. });
        let mut riders = Vec::new();
        if batchable(&self.jobs[&job].kind) {
            let queue = self
                .locks
                .get_mut(&key)
                .expect("a queued job has a lock queue");
            assert_eq!(queue.holder, job, "the job to start is first in line");
            while riders.len() < BATCH_JOBS_MAX
                && let Some(&next) = queue.waiting.front()
                && batchable(&self.jobs[&next].kind)
            {
                queue.waiting.pop_front();
                riders.push(next);
            }
        }
        self.stats.batched_jobs += riders.len() as u64;
        for r in &riders {
            self.jobs.get_mut(r).expect("queued").stage = Stage::Reading;
        }
        let j = self.jobs.get_mut(&job).expect("a queued job exists");
        j.stage = Stage::Reading;
        j.riders = riders;
        self.pending.insert(sid, Pending::Job { job });
        self.out.push(Output::Store {
            id: sid,
            key,
            op: StoreOp::Read,
        });
    }

    fn job_write(&mut self, now: u64, job: u64, op: StoreOp) {
        let sid = self.id();
        let j = self.jobs.get_mut(&job).expect("a running job exists");
        j.stage = Stage::Writing;
        let key = j.key.clone();
        // The replica's tree follows every write of it (anti-entropy).
        self.ae_written(now, (&key, antientropy::placement(&key)), &op);
        self.pending.insert(sid, Pending::Job { job });
        self.out.push(Output::Store { id: sid, key, op });
    }

    /// The jobs that rode along with `j` (its batch), taken out of the job table.
    fn take_riders(&mut self, j: &Job) -> Vec<Job> {
        j.riders
            .iter()
            .map(|r| {
                self.jobs
                    .remove(r)
                    .expect("a rider exists until its batch ends")
            })
            .collect()
    }

    /// Ends a job and starts the next one waiting for the same key.
    fn unlock(&mut self, job: u64) -> Job {
        let j = self.jobs.remove(&job).expect("a running job exists");
        let queue = self
            .locks
            .get_mut(&j.key)
            .expect("a running job holds its lock");
        assert_eq!(queue.holder, job, "the running job is first in line");
        match queue.release() {
            Some(next) => self.job_read(next),
            None => {
                self.locks.remove(&j.key);
            }
        }
        j
    }

    fn job_step(&mut self, now: u64, job: u64, result: Result<Option<Object>, String>) {
        let stage = self
            .jobs
            .get(&job)
            .expect("a job with a store op exists")
            .stage;
        match (stage, result) {
            (Stage::Reading, Ok(local)) => self.job_read_done(now, job, Local::Read(local)),
            (Stage::Writing, Ok(_)) => self.job_written(now, job),
            (_, Err(e)) => {
                let j = self.unlock(job);
                if stage == Stage::Writing {
                    self.hint_write_ended(&j.key);
                }
                for rider in self.take_riders(&j) {
                    self.job_failed(now, rider, e.clone());
                }
                self.job_failed(now, j, e);
            }
            (Stage::Queued, Ok(_)) => unreachable!("a queued job has no store op"),
        }
    }

    fn job_read_done(&mut self, now: u64, job: u64, local: Local) {
        let (local, blind) = match local {
            Local::Read(local) => (local, false),
            Local::Blind => (None, true),
        };
        let j = self.jobs.get(&job).expect("exists");
        assert!(
            !blind
                || (j.riders.is_empty()
                    && matches!(j.kind, JobKind::Coordinate { .. } | JobKind::Apply { .. })),
            "only a lone coordination or merge writes blind"
        );
        if let JobKind::DropHint { delivered } = &j.kind {
            // A delivered hint goes only if unchanged; a truncated one (`None`) whatever it holds.
            let remove = match delivered {
                Some(d) => local.as_ref() == Some(d),
                None => local.is_some(),
            };
            if remove {
                self.job_write(now, job, StoreOp::Remove);
            } else {
                // Changed since it was sent (or already gone): kept for the next round.
                if local.is_none() {
                    let key = j.key.clone();
                    self.hint_gone(&key);
                }
                self.unlock(job);
            }
            return;
        }
        if let JobKind::Reap { digest } = &j.kind {
            if local.as_ref().map(Object::digest) == Some(*digest) {
                self.job_write(now, job, StoreOp::Remove);
            } else {
                // Written again since every replica confirmed it: kept.
                self.unlock(job);
            }
            return;
        }
        // The batch, in arrival order: each coordination continues from the object the ones
        // before it produced (so dots stay consecutive), each merge folds into it.
        let key = j.key.clone();
        let batch: SmallVec<[u64; 8]> = std::iter::once(job)
            .chain(j.riders.iter().copied())
            .collect();
        let mut running = local.clone();
        let mut durable = false;
        for id in batch {
            match &self.jobs[&id].kind {
                JobKind::Coordinate { op } => {
                    let op = *op;
                    if !self.ops.contains_key(&op) {
                        continue;
                    }
                    let actor = self.home_actor(running.as_ref());
                    match self.updated(op, running.clone(), actor, now) {
                        Ok(object) => {
                            if let Some(o) = self.ops.get_mut(&op)
                                && let OpKind::Write { object: slot, .. } = &mut o.kind
                            {
                                *slot = Some(object.clone());
                            }
                            durable |= self.cfg.durable_writes
                                || self.ops.get(&op).is_some_and(|o| o.quorum.dw > 0);
                            running = Some(object);
                        }
                        // The op is answered and gone; its job completes as a no-op.
                        Err(e) => self.fail_op(op, Message::Error(e)),
                    }
                }
                JobKind::Apply {
                    object,
                    durable: asked,
                    ..
                } => {
                    // Hints are always synced: a fallback's copy may be the only one a write
                    // has beyond its coordinator, and it must survive until it is handed off.
                    durable |= *asked || self.cfg.durable_writes || is_hint(&key);
                    running = Some(match running.take() {
                        Some(r) => r.merge(object.clone()),
                        None => object.clone(),
                    });
                }
                JobKind::DropHint { .. } | JobKind::Reap { .. } => {
                    unreachable!("removals run alone")
                }
            }
        }
        if let Some(object) = &running
            && is_hint(&key)
            && let Err(e) = self.hint_reserve(&key, object)
        {
            return self.refuse_hint_batch(now, job, e);
        }
        match running {
            Some(object) if local.as_ref() != Some(&object) => {
                self.job_write(now, job, StoreOp::Write { object, durable });
            }
            Some(_) if durable => {
                // Unchanged: rewriting it would only add a record (and garbage for compaction);
                // what the store holds must still be durable before the job answers.
                self.ae_stored(now, &key, local.as_ref());
                self.job_write(now, job, StoreOp::Sync);
            }
            _ => {
                // Nothing to write: the replica's tree is re-checked against what is stored
                // (anti-entropy), so a tree that missed a write heals when the key is merged.
                // A blind write's failure read nothing to check the tree against.
                if !blind {
                    self.ae_stored(now, &key, local.as_ref());
                }
                self.job_written(now, job)
            }
        }
    }

    /// The batch's write is done (or was not needed): every job of it completes.
    fn job_written(&mut self, now: u64, job: u64) {
        let j = self.unlock(job);
        self.hint_write_ended(&j.key);
        self.stored_write(now, &j.key);
        let riders = self.take_riders(&j);
        self.job_done(now, j);
        for rider in riders {
            self.job_done(now, rider);
        }
    }

    fn job_done(&mut self, now: u64, j: Job) {
        match j.kind {
            JobKind::Coordinate { op } => {
                let durable =
                    self.cfg.durable_writes || self.ops.get(&op).is_some_and(|o| o.quorum.dw > 0);
                let object = match self.ops.get_mut(&op) {
                    Some(o) => {
                        if let OpKind::Write {
                            acks, durable_acks, ..
                        } = &mut o.kind
                        {
                            *acks += 1;
                            *durable_acks += u8::from(durable);
                        }
                        let me = self.cfg.node;
                        if let Some(s) = o.slots.iter_mut().find(|s| s.home == me) {
                            s.done = true;
                        }
                        match &o.kind {
                            OpKind::Write { object, .. } => object.clone(),
                            _ => None,
                        }
                    }
                    None => None,
                };
                if let Some(object) = object {
                    self.replicate(now, op, object);
                }
            }
            JobKind::Apply { durable, then, .. } => {
                let durable = durable || self.cfg.durable_writes || is_hint(&j.key);
                self.replica_done(now, then, Ok(SlotResult::Written { durable }));
            }
            JobKind::DropHint { delivered } => {
                self.hint_gone(&j.key);
                if delivered.is_some() {
                    self.stats.hints_delivered += 1;
                } else {
                    self.stats.hints_truncated += 1;
                }
            }
            JobKind::Reap { .. } => self.stats.tombstones_reaped += 1,
        }
    }

    fn job_failed(&mut self, now: u64, j: Job, e: String) {
        match j.kind {
            JobKind::Coordinate { op } => {
                self.fail_op(
                    op,
                    error(ErrorCode::Internal, format!("local write failed: {e}")),
                );
            }
            JobKind::Apply { then, .. } => {
                self.replica_done(now, then, Err(ErrorBody::new(ErrorCode::Internal, e)));
            }
            JobKind::DropHint { .. } | JobKind::Reap { .. } => {}
        }
    }
}

/// Why a job may write without reading the local replica ([`Core::blind_lww`]).
enum Blind {
    /// A coordinated `lww` put, over a stored value with this stamp.
    Coordinate { stored: u64 },
    /// A replica's `lww` value newer than the stored one.
    Apply,
}

/// What a job starts from: the local replica's object as read, or, for a blind `lww` write
/// ([`Core::blind_lww`]), nothing read (the write replaces whatever is stored).
enum Local {
    Read(Option<Object>),
    Blind,
}

#[derive(Debug)]
enum SlotResult {
    Written { durable: bool },
    Read(Option<Object>),
    Failed,
}

/// Most jobs sharing one read and one write of a key.
const BATCH_JOBS_MAX: usize = 64;

/// The stamp of a new `lww` version (or map change) of a key whose replica holds `local`: the
/// hybrid logical clock past everything the core (`hlc_last`) and the replica have seen.
fn lww_stamp(hlc_last: &mut u64, local: Option<&Object>, now: u64) -> u64 {
    let seen = local.map_or(0, Object::timestamp);
    *hlc_last = hlc_next((*hlc_last).max(seen), now);
    *hlc_last
}

fn is_hint(key: &StoreKey) -> bool {
    matches!(key.space, Space::Hint(_))
}

fn not_enough(what: &str, got: usize, need: usize, replicas: usize) -> Message {
    error(
        ErrorCode::NotEnoughReplicas,
        format!(
            "{got} of {need} {what} replies needed; {replicas} replicas for the key, the others \
             unreachable or failed and no fallback left"
        ),
    )
}

/// GET_OK for a merged object at `now`: its siblings (tombstones only when a value is
/// concurrent with them; a key whose versions are all deletions reads as missing; a value past
/// its expiry reads as a deletion) and its context.
fn read_reply(merged: Option<&Object>, now: u64) -> Message {
    let Some(object) = merged else {
        return Message::GetOk(GetOk {
            siblings: Vec::new(),
            context: Bytes::new(),
            expires_at_ms: None,
            fields: None,
            crdt: None,
        });
    };
    if let Object::Lww(lww) = object {
        // One version: the answer [`Core::local_read_reply`] gives, which takes the object.
        return lww_read_reply(lww.clone(), now);
    }
    if let Object::Crdt(c) = object {
        let value = c.value(now);
        return Message::GetOk(GetOk {
            siblings: Vec::new(),
            context: Bytes::new(),
            expires_at_ms: c.expires_at_ms().filter(|_| value.is_some()),
            fields: None,
            crdt: value,
        });
    }
    // A hash written before maps were a convergent type reads as one: its fields are registers.
    if let Object::Map(map) = object {
        let fields = map.live(now);
        let found = !fields.is_empty();
        let fields = fields
            .into_iter()
            .map(|(name, value)| (name, FieldValue::Register(value)))
            .collect();
        return Message::GetOk(GetOk {
            siblings: Vec::new(),
            context: Bytes::new(),
            expires_at_ms: map.expires_at_ms().filter(|_| found),
            fields: None,
            crdt: found.then_some(CrdtValue::Map(fields)),
        });
    }
    let context = match object {
        Object::Causal(_) => Bytes::from(object.context().encode()),
        Object::Lww(_) | Object::Map(_) | Object::Crdt(_) => Bytes::new(),
    };
    if object.is_deleted_at(now) {
        return Message::GetOk(GetOk {
            siblings: Vec::new(),
            context,
            expires_at_ms: None,
            fields: None,
            crdt: None,
        });
    }
    // The key expires when its last live value does; a live value that never expires keeps it.
    let expires_at_ms = object
        .versions()
        .filter(|v| v.live(now).is_some())
        .map(Val::expires_at_ms)
        .try_fold(0u64, |latest, at| at.map(|at| latest.max(at)));
    let siblings: Vec<Sibling> = object
        .versions()
        .map(|v| match v.live(now) {
            Some(b) => Sibling::Value(b.clone()),
            None => Sibling::Tombstone,
        })
        .collect();
    if siblings.len() > SIBLINGS_MAX {
        return error(
            ErrorCode::TooManySiblings,
            format!(
                "the key has {} siblings, more than a reply carries ({SIBLINGS_MAX})",
                siblings.len()
            ),
        );
    }
    Message::GetOk(GetOk {
        siblings,
        context,
        expires_at_ms,
        fields: None,
        crdt: None,
    })
}

/// [`read_reply`] of a plain last-write-wins object, taking it so that its value moves into the
/// answer: one version, no context; a deleted or expired one answers no sibling and no expiry.
fn lww_read_reply(lww: Lww, now: u64) -> Message {
    let expires_at_ms = lww.val.expires_at_ms();
    let siblings = match lww.val.into_live(now) {
        Some(value) => vec![Sibling::Value(value)],
        None => Vec::new(),
    };
    Message::GetOk(GetOk {
        expires_at_ms: expires_at_ms.filter(|_| !siblings.is_empty()),
        siblings,
        context: Bytes::new(),
        fields: None,
        crdt: None,
    })
}

/// Whether a bucket's keys are plain last-write-wins values, which an unconditional put
/// replaces whatever they hold (`Core::blind_lww`).
fn plain_lww(props: &BucketProps) -> bool {
    props.mode == ConflictMode::Lww && props.data_type.is_none()
}

/// When a put's value expires, as its coordinator stamps it: the put's own expiry, else the
/// bucket's time to live. The coordinator turns a time to live into an absolute time, once, so
/// every replica stores the same expiry (module docs of `object`).
fn expires_at(
    expiry: Option<Expiry>,
    props: &BucketProps,
    now: u64,
) -> Result<Option<u64>, ErrorBody> {
    match expiry {
        Some(e) => absolute(e, now),
        None => Ok(props.ttl_ms.map(|ms| now.saturating_add(ms))),
    }
}

/// An expiry as absolute Unix milliseconds (`None`: never), from this coordinator's clock.
fn absolute(expiry: Expiry, now: u64) -> Result<Option<u64>, ErrorBody> {
    match expiry {
        Expiry::Ttl { ms: 0 } => Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            "a time to live is at least 1 ms",
        )),
        Expiry::Ttl { ms } => Ok(Some(now.saturating_add(ms))),
        Expiry::At { unix_ms } => Ok(Some(unix_ms)),
        Expiry::Never => Ok(None),
    }
}
