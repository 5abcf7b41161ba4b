//! A deterministic simulator of a ringkv cluster: the real sans-IO [`Core`] on every node, an
//! in-memory store, virtual time, and a network and a nemesis driven by one seed.
//!
//! What is simulated:
//! - **Storage**: per node, the real replica layout on the shared in-memory store
//!   (`ringkv_cluster::replica::MemoryStore`) and a copy of what is synced. A write completes
//!   after a random delay; `durable` writes (and a periodic flush every 5 ms up to
//!   [`Params::flush_ms_max`], like the engine's group commit) bring the synced copy up to date.
//!   A crash loses what was not synced and every operation in flight. In 30% of the runs
//!   ([`Params::store_faults`]) the nemesis arms storage faults: the next write or sync of a
//!   node's store fails (EIO), and the store then fails every operation, as the engine after a
//!   failed write or fsync, until a supervisor stops the node 5-200 ms later and restarts it
//!   20-300 ms after that.
//! - **Network**: every message gets a random delay (so messages reorder), may be dropped or
//!   duplicated, and is lost between partitioned nodes. Messages are addressed to an incarnation:
//!   a node that restarted never receives what was sent to (or answered for) its previous life,
//!   as with TCP connections that die with a process.
//! - **Nemesis**: partitions that isolate a random subset, crash-restarts with random downtime,
//!   message loss and duplication, storage faults, all during the fault phase only. In
//!   group-crash runs ([`Params::group_crashes`]) half the crashes take several nodes down at once
//!   (half of those every node), and once a run every node loses power a few ms after a write is
//!   acknowledged, before most flush.
//! - **Membership**: in about half the runs an operator script changes the cluster while clients
//!   write and faults strike: a spare node joins, a node leaves, a node is removed, or a join
//!   then a leave; each staged change is committed, retried until the claimant accepts it.
//!   Every node runs the real [`Membership`] (gossip, claimant, flips) and the cores pull and
//!   hand off partitions; membership state survives crashes as the node's state file does. A
//!   node out of the cluster stops for good once membership says others know it
//!   ([`Membership::retired`]) and its core holds no partition to hand off and no hint, as a
//!   real node stops itself; hints for it then go to current replicas.
//! - **Clients**: each runs one operation at a time against a random node: read-modify-write of
//!   a register (siblings merged by taking the largest), set-add (siblings merged by union), and
//!   blind writes, on a `siblings` bucket; plain writes on an `lww` bucket. Each bucket has its
//!   own `dw`, 0, 1 or 2. Three operations in fourteen are convergent (`workload.rs`): APPLYs
//!   that increment a key of a counter bucket, add a unique element to a key of a set bucket, or
//!   remove an element the client added and saw acknowledged; the typed buckets replicate as the
//!   `siblings` bucket does. Each carries an operation id, and a failed increment is re-sent once
//!   with the same id.
//!
//! Checkers:
//! - after every read a client gets: no two siblings where one's write saw the other (each write
//!   records the values of the read its context came from; "saw" is the transitive closure);
//!   an `lww` read has at most one sibling;
//! - every replica write a node acknowledges is in its store (durably, if the acknowledgement
//!   says so) when the acknowledgement leaves;
//! - durability (`durability.rs`): a write acknowledged with `w` and `dw = k` has a stored
//!   copy (a replica or a hint, including the coordinator's own) on `w` nodes and a synced copy on
//!   `k` nodes when the client gets PUT_OK (a delete: what it superseded, when it gets DELETE_OK);
//!   at the end, an acknowledged write (or delete) with `dw = 0` may be missing only if no synced
//!   copy ever covered it and a crash erased an unsynced one; every other is kept to the final
//!   checks below;
//! - after every event, hint credit: a holder never has more hints in flight to a home than the
//!   grant it uses, and that grant is one the home sent it (the simulator records every
//!   HINT_CREDIT answer the network delivers); no grant is above `hint_credit_max`;
//! - at the end, after faults stop, every node is up (but the retired ones, which must hold
//!   nothing at all), hints have drained, membership changes are
//!   complete (no pending ring, every node holds the same state, no transfer or handoff left),
//!   and every key has been read with `r = n`: every acknowledged write is a sibling of the final
//!   state or was seen by a write whose value is (transitively), or was superseded by a delete
//!   that was acknowledged or provably applied (a store took a superseding object; a delete that
//!   failed before reaching any store excuses nothing), or lost as `dw = 0` allows;
//!   every acknowledged set element is
//!   in the final set; all home replicas of every key (in the final ring) hold identical objects;
//!   no node keeps replica data of a partition it does not replicate; no hint is left;
//! - convergent types (`checkers.rs`, `check_convergent`), at the end: the homes of every
//!   counter and set key hold one convergent state (or nothing) and the final read returns its
//!   value; every acknowledged operation is named by that state's operation log, or was lost as
//!   `dw = 0` allows (the durability checker judges operations by the states whose logs name
//!   them, and holds APPLY_OK to `w` and `dw` as PUT_OK); a counter is at least the sum of its
//!   acknowledged increments and at most the sum of those sent (a retried one counted twice: a
//!   retry whose coordinator had not received the first attempt applies it again, as `crdt.rs`
//!   documents; but not one that reached a home whose replica already named it, which must
//!   acknowledge it without applying it), and exactly the increments its log names, each once
//!   or, retried, at most twice; a set
//!   holds only elements added to it and every acknowledged add whose element no remove was sent
//!   for. A remove removes what its coordinator had received, which under a sloppy quorum may
//!   miss an acknowledged add; the simulator sees the state the coordinator made (the first
//!   replica write naming the remove), and an acknowledged remove whose coordinator held the add
//!   must have taken the element out then and keep it out for good.
//!
//! A quarter of the seeds run with the buckets and durability a node resolves from its default
//! settings ([`Params::defaults`]).
//!
//! A quarter of the seeds run with a tiny hint store ([`Params::hint_bytes_max`]), so fallbacks
//! refuse most hints. The promises above still hold there: acknowledgements come from replicas
//! that stored the write, and the final `r = n` read repairs the homes that missed a refused
//! hint. (Nothing else would: until anti-entropy runs, a home that missed a refused hint for a
//! key nobody reads again stays stale, which is why the final pass reads every key.)
//!
//! Everything iterates `BTreeMap`s and draws from one `StdRng`, so a seed replays exactly; the
//! run's trace hash ([`Outcome::trace`]) proves it.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringkv_cluster::config::{FileConfig, Settings};
use ringkv_core::NodeId;
use ringkv_core::bucket::{BucketProps, BucketType, Buckets, ConflictMode};
use ringkv_core::coordinator::{
    Core, CoreConfig, EpochLease, Output, PeerMsg, Space, StoreKey, StoreOp, hint_bytes,
};
use ringkv_core::membership::{AdminError, Membership, MembershipConfig, MembershipOutput};
use ringkv_core::object::{Object, Val};
use ringkv_core::ring::PartitionCount;
use ringkv_engine::Durability;
use ringkv_net::{CrdtValue, Message};

mod checkers;
mod durability;
mod nemesis;
mod network;
mod store;
mod workload;

use nemesis::ScriptStep;
use network::{Envelope, SimMsg};
use store::{Fault, Store};
use workload::{Client, ClientState, CrdtRecord, DeleteRecord, FinalRead, WriteRecord};

/// Size of an epoch lease; small so renewals happen in simulations.
const LEASE_EPOCHS: u32 = 16;
const SIBLINGS_BUCKET: &[u8] = b"default";
const LWW_BUCKET: &[u8] = b"sessions";
/// Set-add keys are numbered from here; registers from 0.
const SET_KEYS: usize = 1000;
/// The counter bucket (`data_type = counter`); the name of a node's built-in one, so runs with
/// the default settings use the bucket a node has without configuration.
const COUNTERS_BUCKET: &[u8] = b"counters";
/// The add-wins set bucket (`data_type = set`), likewise the built-in one's name.
const SETS_BUCKET: &[u8] = b"sets";
/// Counter keys are numbered from here, and convergent set keys from [`CRDT_SET_KEYS`]: keys of
/// their own, so a failure message names the key without its bucket being ambiguous.
const COUNTER_KEYS: usize = 2000;
const CRDT_SET_KEYS: usize = 3000;
/// Anti-entropy round interval.
const AE_INTERVAL_MS: u64 = 200;
/// Tombstone grace period: above how long a hint can wait on a fallback after its home got the
/// tombstone in these runs (partitions last at most 2 s, hints are retried every 200 ms).
const TOMBSTONE_GRACE_MS: u64 = 3_000;
/// Bound on the time replicas take to converge by anti-entropy once faults stop.
const CONVERGE_MS_MAX: u64 = 60_000;
/// A client marker for requests the harness makes itself and waits for.
const HARNESS: usize = usize::MAX - 1;
/// Most hints a home grants at once; small so windows fill.
const HINT_CREDIT_MAX: u32 = 3;

/// Knobs of one run, all derived from the seed by [`Params::from_seed`].
#[derive(Clone, Debug)]
pub struct Params {
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Operations per client during the fault phase.
    pub ops_per_client: usize,
    /// Distinct keys per bucket.
    pub keys: usize,
    /// Whether replica writes are synced (`sync`) or buffered.
    pub durable_writes: bool,
    /// Probability (per mille) that a message is dropped.
    pub drop_permille: u32,
    /// Probability (per mille) that a message is duplicated.
    pub dup_permille: u32,
    /// Whether nodes crash and restart.
    pub crashes: bool,
    /// Whether the network partitions.
    pub partitions: bool,
    /// Durable acknowledgements a write to the `siblings` bucket needs.
    pub dw: u8,
    /// Durable acknowledgements a write to the `lww` bucket needs.
    pub lww_dw: u8,
    /// Longest pause between two periodic flushes of a node's store, in ms: the bound of the
    /// engine's group commit on what a crash can lose. Long in some runs, so crashes often
    /// find unsynced writes.
    pub flush_ms_max: u64,
    /// Whether a crash may take several nodes down at once (a rack losing power): their
    /// unsynced writes are lost together, so a write acknowledged with `dw = 0` can be lost.
    pub group_crashes: bool,
    /// Whether stores fail writes and syncs (EIO): a failed store refuses every later
    /// operation until its node restarts, as the engine does, and a supervisor restarts it.
    pub store_faults: bool,
    /// Largest one-way message delay in ms.
    pub delay_max_ms: u64,
    /// Whether writes can be hinted. Without handoff the run has three nodes, so every node is
    /// a home of every key and no fallback exists: replicas that missed writes are repaired by
    /// read repair and anti-entropy alone.
    pub handoff: bool,
    /// Whether a crashed node may stay down longer than the tombstone grace period, so that
    /// the others hold tombstones past their grace period that it has not received.
    pub long_outages: bool,
    /// The hint store's bound per node, when it is tiny (overflow runs).
    pub hint_bytes_max: Option<u64>,
    /// The membership change the operator script makes, if any.
    pub change: Option<Change>,
    /// The buckets and durability are what a node resolves from no flags and no config file
    /// (`Settings::resolve`), not the knobs above: the defaults users run are simulated too.
    pub defaults: bool,
    /// Whether nodes freeze (a stopped process, a long stall): a frozen node handles nothing,
    /// and what reaches it (messages, client requests, its timers, storage completions) waits
    /// and is handled in order when it thaws, possibly long after its senders gave up.
    pub freezes: bool,
}

/// A membership change scripted during the fault phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A spare node joins.
    Join,
    /// A node leaves.
    Leave,
    /// A node is removed by another.
    Remove,
    /// A spare joins, then a node leaves.
    JoinLeave,
}

impl Params {
    /// Parameters drawn from `seed`: every run explores a different mix.
    pub fn from_seed(seed: u64) -> Params {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed);
        Params {
            nodes: rng.gen_range(3..=5),
            clients: rng.gen_range(2..=4),
            ops_per_client: rng.gen_range(10..=25),
            keys: rng.gen_range(1..=3),
            durable_writes: rng.gen_bool(0.5),
            drop_permille: [0, 10, 50][rng.gen_range(0..3)],
            dup_permille: [0, 10, 30][rng.gen_range(0..3)],
            crashes: rng.gen_bool(0.6),
            partitions: rng.gen_bool(0.6),
            delay_max_ms: [2, 10, 40][rng.gen_range(0..3)],
            dw: rng.gen_range(0..=1),
            handoff: true,
            long_outages: rng.gen_bool(0.3),
            // Drawn last so the other knobs of a seed stay what they were.
            hint_bytes_max: rng.gen_bool(0.25).then(|| rng.gen_range(0..200)),
            // From a stream of its own, so the other knobs of a seed stay what they were.
            defaults: StdRng::seed_from_u64(seed ^ 0x00de_fa17).gen_bool(0.25),
            freezes: StdRng::seed_from_u64(seed ^ 0x0f4e_e2e5).gen_bool(0.3),
            // Durability and storage faults from a stream of their own too; `dw` stays the
            // main stream's draw in two thirds of the runs and is 2 in the rest.
            lww_dw: 0,
            flush_ms_max: 30,
            group_crashes: false,
            store_faults: false,
            change: {
                let mut rng = StdRng::seed_from_u64(seed ^ 0x00c1_a55e);
                match rng.gen_range(0..8) {
                    0 => Some(Change::Join),
                    1 => Some(Change::Leave),
                    2 => Some(Change::Remove),
                    3 => Some(Change::JoinLeave),
                    _ => None,
                }
            },
        }
        .with_handoff(rng.gen_bool(0.8))
        .with_durability(&mut StdRng::seed_from_u64(seed ^ 0x0d0a_b1e5))
        .with_defaults()
    }

    fn with_durability(mut self, rng: &mut StdRng) -> Params {
        if rng.gen_bool(1.0 / 3.0) {
            self.dw = 2;
        }
        self.lww_dw = rng.gen_range(0..=2);
        self.flush_ms_max = [30, 300, 1_000][rng.gen_range(0..3)];
        self.group_crashes = self.crashes && rng.gen_bool(0.5);
        self.store_faults = rng.gen_bool(0.3);
        self
    }

    /// With `defaults`, the durability knobs are what the default settings resolve to, so the
    /// simulator's model of syncs and epoch floors matches the buckets `Sim::config` gives.
    fn with_defaults(mut self) -> Params {
        if self.defaults {
            let settings = default_settings();
            self.durable_writes = settings.durability == Durability::Sync;
            self.dw = settings.buckets.default.dw;
            self.lww_dw = settings.buckets.default.dw;
        }
        self
    }

    fn with_handoff(mut self, handoff: bool) -> Params {
        self.handoff = handoff;
        if !handoff {
            self.nodes = 3;
        }
        self
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// Hash of every event in order: equal for equal seeds.
    pub trace: u64,
    /// Events processed.
    pub events: u64,
    /// Writes acknowledged.
    pub acked_writes: usize,
    /// Reads that returned more than one sibling.
    pub sibling_reads: usize,
    /// Hinted writes, over all nodes.
    pub hinted_writes: u64,
    /// Forwards moved to another home, and forwards a home refused as read or stamped after
    /// their apply-by time, over all nodes.
    pub forwards: (u64, u64),
    /// Hints delivered, over all nodes.
    pub hints_delivered: u64,
    /// Read repairs sent, over all nodes.
    pub read_repairs: u64,
    /// Crashes injected.
    pub crashes: usize,
    /// Freezes injected.
    pub freezes: usize,
    /// Freeze events that found every node down (nothing to freeze).
    pub freezes_blocked: usize,
    /// Messages dropped, messages duplicated and network partitions started by the fault
    /// injection.
    pub injected: (u64, u64, u64),
    /// The parameters the seed drew.
    pub params: Params,
    /// Jobs that shared a key's read and write with another, over all nodes.
    pub batched_jobs: u64,
    /// `lww` writes made without reading the local replica, over all nodes.
    pub blind_writes: u64,
    /// Deletes acknowledged.
    pub acked_deletes: usize,
    /// Anti-entropy exchanges, over all nodes.
    pub ae_exchanges: u64,
    /// Objects anti-entropy sent to replicas that differed, over all nodes.
    pub ae_keys_repaired: u64,
    /// Tombstones reaped, over all replicas.
    pub tombstones_reaped: u64,
    /// Epoch floor raises for reaping, over all nodes.
    pub floor_raises: u64,
    /// Writes made after reaping with a context from before the deletion.
    pub stale_writes: usize,
    /// Virtual ms from the end of the faults until every replica set's trees were equal.
    pub converge_ms: u64,
    /// Hint writes refused by a full hint store, over all nodes.
    pub hint_overflow: u64,
    /// Hint credit granted, over all nodes.
    pub credits_granted: u64,
    /// Membership changes committed (joins, leaves, removals).
    pub changes: usize,
    /// Partitions pulled for pending rings, over all nodes.
    pub partitions_received: u64,
    /// Partitions dropped after handoff, over all nodes.
    pub partitions_dropped: u64,
    /// Nodes that left the cluster, handed everything off and stopped.
    pub retired: usize,
    /// Storage faults the nemesis armed, and those that struck (each failed a store until its
    /// node restarted; one armed on a node that stores nothing more in the fault phase never
    /// strikes).
    pub store_faults: (usize, usize),
    /// Writes acknowledged, by the `dw` they asked for (0, 1, 2).
    pub acked_by_dw: [usize; 3],
    /// Acknowledged `dw = 0` writes (and deletes, and convergent operations) that crashes lost
    /// before any sync, as `dw = 0` allows.
    pub lost_unsynced: usize,
    /// Convergent operations (increments, adds, removes) acknowledged.
    pub crdt_acked: usize,
    /// Increments re-sent with the same operation id after a failed attempt.
    pub crdt_retries: usize,
    /// Of those, retries whose coordinator's replica held the first attempt: each must count
    /// once.
    pub retries_held: usize,
    /// How much the final counters exceed the increments they name (a retry applied again by
    /// a coordinator that had not received the first attempt), summed over counter keys.
    pub double_counted: i64,
    /// Acknowledged removes whose coordinator held the add, so the element must stay removed.
    pub removes_checked: usize,
    /// Acknowledged removes whose coordinator had not received the add: the add may win, so
    /// nothing is required of them.
    pub removes_unseen: usize,
    /// Acknowledged convergent operations (`dw = 0`) that crashes lost before any sync (counted
    /// in [`Outcome::lost_unsynced`] too).
    pub crdt_lost_unsynced: usize,
}

#[derive(Debug)]
enum Event {
    Deliver(Envelope),
    Stored {
        node: usize,
        incarnation: u32,
        id: u64,
        key: StoreKey,
        op: StoreOp,
    },
    Tick {
        node: usize,
        incarnation: u32,
    },
    Scanned {
        node: usize,
        incarnation: u32,
        id: u64,
        partition: u32,
        after: Option<Bytes>,
        max_items: usize,
        max_bytes: usize,
    },
    MemberTick {
        node: usize,
        incarnation: u32,
    },
    /// A restarted node's tree load reads one partition from its store...
    TreeRead {
        node: usize,
        incarnation: u32,
        partition: u32,
    },
    /// ...and the objects it read reach the core later, after whatever writes came between.
    TreeLoad {
        node: usize,
        incarnation: u32,
        partition: u32,
        items: Vec<(StoreKey, Object)>,
    },
    Admin,
    Flush {
        node: usize,
    },
    ClientStart {
        client: usize,
    },
    Crash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    /// Every node loses power at once (a targeted crash: see `Sim::maybe_power_loss`).
    PowerLoss,
    /// The nemesis arms a storage fault on a node's store.
    StoreFault {
        node: usize,
    },
    /// A supervisor restarts a node whose store failed.
    Supervise {
        node: usize,
        incarnation: u32,
    },
    Partition,
    Heal,
    /// The nemesis freezes a running node for a while ([`Params::freezes`]).
    Freeze,
    /// A client request that reached a frozen node, handled when it thaws.
    ClientRequest {
        node: usize,
        incarnation: u32,
        req: u64,
        message: Message,
    },
}

struct SimNode {
    id: NodeId,
    core: Option<Core>,
    incarnation: u32,
    store: Store,
    /// Next unleased epoch, durable.
    epoch_next: u32,
    /// The persisted epoch floor (`None` while a buffered run may lose dots), as the node's
    /// floor file.
    floor: Option<u32>,
    /// When the node has a tick scheduled.
    tick_at: Option<u64>,
    membership: Option<Membership>,
    /// The persisted membership state (the node's cluster-state file).
    cluster_state: Option<Vec<u8>>,
    /// Out of the cluster with nothing left to hand off: stopped for good, as a real node
    /// stops itself.
    retired: bool,
    /// Frozen until then: every event for the node waits for that time.
    frozen_until: Option<u64>,
}

/// One simulated cluster run.
pub struct Sim {
    rng: StdRng,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    nodes: Vec<SimNode>,
    clients: Vec<Client>,
    params: Params,
    /// Nodes cut off from the rest, while partitioned.
    island: BTreeSet<usize>,
    faults: bool,
    /// Answers owed: (answering node, requester, request id) → requester's incarnation.
    owed: BTreeMap<(usize, usize, network::MsgId), u32>,
    /// Client requests in flight: (node, req) → client.
    requests: BTreeMap<(usize, u64), usize>,
    next_req: u64,
    writes: BTreeMap<u64, WriteRecord>,
    /// Value → write id.
    by_value: BTreeMap<Bytes, u64>,
    /// Value of an lww write → the stamps (timestamp, node) it was stored with: the one its
    /// coordinator gave it, and another if a forward moved to a second coordinator after a
    /// lost connection. What the last-write-wins check compares.
    lww_stamps: BTreeMap<Bytes, BTreeSet<(u64, NodeId)>>,
    trace: u64,
    event_count: u64,
    sibling_reads: usize,
    crashes: usize,
    /// Freezes injected, and freeze events that found no running node to freeze.
    freezes: usize,
    freezes_blocked: usize,
    /// Drops, duplicates and partitions injected (see [`Outcome::injected`]).
    injected: (u64, u64, u64),
    /// Final-phase reads: (bucket, key) → result.
    final_reads: BTreeMap<(Vec<u8>, usize), FinalRead>,
    /// Print every output (`RINGKV_SIM_TRACE=1`).
    verbose: bool,
    /// Final-phase read requests → the key they read.
    final_keys: BTreeMap<u64, (&'static [u8], usize)>,
    deletes: Vec<DeleteRecord>,
    /// The first context read per register key during the faults, with the values it covered.
    stale: BTreeMap<usize, (Bytes, Vec<Bytes>)>,
    /// The answer to the harness's own request.
    harness_reply: Option<Message>,
    stale_writes: usize,
    /// Hint credit the network delivered: (holder, its incarnation, request id) → granted.
    grants: BTreeMap<(usize, u32, u64), u32>,
    /// Replica writes delivered and not yet acknowledged: (receiver, sender, request id) → what
    /// and where (the acknowledgement checker).
    puts: BTreeMap<(usize, usize, u64), (StoreKey, Object)>,
    /// Nodes clients use (a spare joins later and is not one of them).
    client_nodes: usize,
    /// Operator steps left; the first runs (and is retried) until it succeeds.
    script: std::collections::VecDeque<ScriptStep>,
    /// The ADMIN request of the step in progress, and its answer once it came.
    admin: Option<(u64, Option<Result<String, AdminError>>)>,
    changes: usize,
    /// Where every written value was stored and synced (the durability checker).
    copies: durability::Copies,
    store_faults_armed: usize,
    store_failures: usize,
    /// Whether the run's targeted power loss was scheduled.
    power_loss: bool,
    /// Acknowledged writes, deletes and convergent operations the final checks let go as lost
    /// unsynced (`dw = 0`).
    lost_unsynced: std::cell::Cell<usize>,
    /// Convergent operations clients issued, by record id (the operation id is derived from it).
    crdt_ops: Vec<CrdtRecord>,
    /// Removes whose coordinator's state (the first replica write naming the remove's operation
    /// id) has not been seen yet.
    removes_pending: BTreeSet<usize>,
    /// Final-phase reads of convergent keys: (bucket, key) → the value GET_OK carried.
    final_crdt: BTreeMap<(Vec<u8>, usize), Option<CrdtValue>>,
    /// Convergent keys (bucket, key) whose home replica some store removed: reaped by
    /// anti-entropy once empty, which takes the key's operation log with it.
    crdt_reaped: BTreeSet<(Bytes, Bytes)>,
    /// Retried increments forwarded to a home: (forwarding node, forward's id) → record.
    retry_forwards: BTreeMap<(usize, u64), usize>,
}

fn node_index(id: NodeId) -> usize {
    id.0 as usize - 1
}

impl Sim {
    /// A cluster for `seed`.
    pub fn new(seed: u64) -> Sim {
        let params = Params::from_seed(seed);
        let spare = matches!(params.change, Some(Change::Join | Change::JoinLeave));
        let total = params.nodes + usize::from(spare);
        let mut nodes = Vec::new();
        for i in 0..total {
            nodes.push(SimNode {
                id: NodeId(i as u32 + 1),
                core: None,
                incarnation: 0,
                store: Store::default(),
                epoch_next: 1,
                floor: Some(0),
                tick_at: None,
                frozen_until: None,
                membership: None,
                cluster_state: None,
                retired: false,
            });
        }
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            nodes,
            clients: (0..params.clients)
                .map(|_| Client {
                    state: ClientState::Idle,
                    ops_left: params.ops_per_client,
                    seq: 0,
                    added: Vec::new(),
                    retry: None,
                })
                .collect(),
            params,
            island: BTreeSet::new(),
            faults: true,
            owed: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_req: 1,
            writes: BTreeMap::new(),
            by_value: BTreeMap::new(),
            lww_stamps: BTreeMap::new(),
            trace: 0xcbf2_9ce4_8422_2325,
            event_count: 0,
            sibling_reads: 0,
            crashes: 0,
            freezes: 0,
            freezes_blocked: 0,
            injected: (0, 0, 0),
            final_reads: BTreeMap::new(),
            final_keys: BTreeMap::new(),
            deletes: Vec::new(),
            stale: BTreeMap::new(),
            harness_reply: None,
            stale_writes: 0,
            grants: BTreeMap::new(),
            puts: BTreeMap::new(),
            verbose: std::env::var_os("RINGKV_SIM_TRACE").is_some(),
            client_nodes: 0,
            script: std::collections::VecDeque::new(),
            admin: None,
            changes: 0,
            copies: durability::Copies::default(),
            store_faults_armed: 0,
            store_failures: 0,
            power_loss: false,
            lost_unsynced: std::cell::Cell::new(0),
            crdt_ops: Vec::new(),
            removes_pending: BTreeSet::new(),
            final_crdt: BTreeMap::new(),
            crdt_reaped: BTreeSet::new(),
            retry_forwards: BTreeMap::new(),
        };
        sim.client_nodes = sim.params.nodes;
        for n in 0..sim.nodes.len() {
            sim.boot(n);
        }
        sim.plan_script();
        for c in 0..sim.clients.len() {
            let at = sim.rng.gen_range(0..50);
            sim.schedule(at, Event::ClientStart { client: c });
        }
        for n in 0..sim.nodes.len() {
            sim.schedule(10, Event::Flush { node: n });
        }
        // The first partition and the first crash come early: a fault phase lasts only as long
        // as the clients' operations, often a few hundred ms.
        if sim.params.partitions {
            let at = sim.rng.gen_range(20..200);
            sim.schedule(at, Event::Partition);
        }
        if sim.params.crashes {
            let at = sim.rng.gen_range(20..200);
            let node = sim.rng.gen_range(0..sim.nodes.len());
            sim.schedule(at, Event::Crash { node });
        }
        if sim.params.store_faults {
            let at = sim.rng.gen_range(20..200);
            let node = sim.rng.gen_range(0..sim.nodes.len());
            sim.schedule(at, Event::StoreFault { node });
        }
        if sim.params.freezes {
            let at = sim.rng.gen_range(10..100);
            sim.schedule(at, Event::Freeze);
        }
        sim
    }

    /// The properties of `bucket` every node runs with.
    pub(super) fn bucket_props(&self, bucket: &[u8]) -> BucketProps {
        let data_type = match bucket {
            COUNTERS_BUCKET => Some(BucketType::Counter),
            SETS_BUCKET => Some(BucketType::Set),
            _ => None,
        };
        if self.params.defaults {
            // What `ringkv serve` resolves with no flags and no file; only the time scale
            // (timeouts, intervals) stays the simulator's.
            let settings = default_settings();
            if data_type.is_some() {
                // The node's built-in bucket of that type.
                let props = *settings.buckets.props(bucket);
                assert_eq!(props.data_type, data_type, "a built-in typed bucket");
                return props;
            }
            let props = settings.buckets.default;
            return if bucket == LWW_BUCKET {
                BucketProps {
                    mode: ConflictMode::Lww,
                    ..props
                }
            } else {
                props
            };
        }
        let props = BucketProps {
            n: 3,
            r: 2,
            w: 2,
            // With dw = 0 in a buffered run an acknowledged write may sit unsynced on every
            // replica that acknowledged it, and a crash of all of them together loses it (the
            // durability checker allows exactly that); dw = 1 syncs the coordinator's own
            // write, dw = 2 one replica's more.
            dw: self.params.dw,
            mode: ConflictMode::Siblings,
            max_siblings: 64,
            data_type: None,
            ttl_ms: None,
        };
        if bucket == LWW_BUCKET {
            BucketProps {
                mode: ConflictMode::Lww,
                dw: self.params.lww_dw,
                ..props
            }
        } else {
            // The typed buckets replicate as the siblings bucket does; their keys hold
            // convergent states, which merge without siblings.
            BucketProps { data_type, ..props }
        }
    }

    fn config(&self, node: NodeId) -> CoreConfig {
        let mut cfg = CoreConfig::new(node);
        let mut named = BTreeMap::new();
        for bucket in [LWW_BUCKET, COUNTERS_BUCKET, SETS_BUCKET] {
            named.insert(bucket.to_vec(), self.bucket_props(bucket));
        }
        cfg.buckets = Buckets {
            default: self.bucket_props(SIBLINGS_BUCKET),
            named,
        };
        // With `defaults`, `Params::with_defaults` set this from the default settings.
        cfg.durable_writes = self.params.durable_writes;
        // The simulator's time scale and bounds.
        cfg.request_timeout_ms = 1_500;
        cfg.replica_timeout_ms = 150;
        cfg.down_ms = 400;
        cfg.hint_retry_ms = 200;
        cfg.hint_inflight_max = 4;
        cfg.ae_interval_ms = AE_INTERVAL_MS;
        cfg.ae_keys_max = 8;
        cfg.tombstone_grace_ms = TOMBSTONE_GRACE_MS;
        cfg.hint_credit_max = HINT_CREDIT_MAX;
        cfg.heartbeat_ms = 100;
        if let Some(max) = self.params.hint_bytes_max {
            cfg.hint_bytes_max = max;
        }
        cfg
    }

    fn member_config(&self, n: usize) -> MembershipConfig {
        MembershipConfig {
            node: self.nodes[n].id,
            peer_addr: format!("n{n}"),
            client_addr: format!("c{n}"),
            gossip_ms: 200,
            request_timeout_ms: 500,
            target_n: 3,
            partitions: PartitionCount::new(16).expect("16 is a valid count"),
            // One data directory per simulated node for the whole run.
            incarnation: n as u64 + 1,
            fresh: false,
            contact_seeds: Vec::new(),
        }
    }

    /// The node's membership: restored from its state file, or the initial cluster (the spare
    /// starts as a cluster of its own).
    fn boot_membership(&self, n: usize) -> Membership {
        let cfg = self.member_config(n);
        if let Some(bytes) = &self.nodes[n].cluster_state {
            return Membership::restore(cfg, bytes).expect("the state file reads back");
        }
        let seeds: Vec<(NodeId, String)> = if n < self.params.nodes {
            (0..self.params.nodes)
                .map(|i| (self.nodes[i].id, format!("n{i}")))
                .collect()
        } else {
            Vec::new()
        };
        Membership::bootstrap(cfg, &seeds).expect("valid seeds")
    }

    fn boot(&mut self, n: usize) {
        let mut membership = self.boot_membership(n);
        let view = membership.view();
        let ring = view.ring.clone();
        let cfg = self.config(self.nodes[n].id);
        let node = &mut self.nodes[n];
        let lease = EpochLease::new(node.epoch_next, LEASE_EPOCHS);
        node.epoch_next += LEASE_EPOCHS;
        // As the node does: a sync run keeps the floor it starts with whatever happens; a
        // buffered run removes it (and a crash leaves it removed).
        let floor = node.floor.unwrap_or(lease.primary);
        node.floor = self.params.durable_writes.then_some(floor);
        let mut cfg = cfg;
        cfg.epoch_floor = Some(floor);
        let hints: Vec<(StoreKey, u64)> = node
            .store
            .keys()
            .into_iter()
            .filter(|k| matches!(k.space, Space::Hint(_)))
            .map(|k| {
                let object = node.store.read(&k).expect("a listed key is stored");
                let bytes = hint_bytes(&k, object.encoded_len());
                (k, bytes)
            })
            .collect();
        let stored: BTreeSet<u32> = node
            .store
            .keys()
            .into_iter()
            .filter(|k| k.space == Space::Primary)
            .map(|k| k.partition)
            .collect();
        let mut core = Core::new(cfg, ring, lease, hints);
        let now = self.now;
        let partitions = core.ring().partition_count().get();
        // As a shard does at startup: the trees are loaded from storage while the node serves,
        // each partition read at a random time and loaded later still, so writes and
        // anti-entropy messages race the load. Half the boots load before serving instead (the
        // former startup), so both paths stay checked against each other.
        let background = self.rng.gen_bool(0.5);
        if background {
            core.trees_loading(0..partitions);
        }
        let mut outputs = core.set_view(now, view.ring, view.pending);
        outputs.extend(core.set_stored_partitions(now, stored));
        if !background {
            for key in node.store.keys() {
                if key.space == Space::Primary
                    && let Some(object) = node.store.read(&key)
                {
                    core.load_replica(now, &key, &object);
                }
            }
        }
        node.core = Some(core);
        node.tick_at = None;
        let member_outputs = membership.start();
        node.membership = Some(membership);
        self.outputs(n, outputs);
        self.member_outputs(n, member_outputs);
        self.reschedule_tick(n);
        let incarnation = self.nodes[n].incarnation;
        self.schedule(
            1,
            Event::MemberTick {
                node: n,
                incarnation,
            },
        );
        if background {
            for partition in 0..partitions {
                let delay = self.rng.gen_range(0..300);
                self.schedule(
                    delay,
                    Event::TreeRead {
                        node: n,
                        incarnation,
                        partition,
                    },
                );
            }
        }
    }

    fn member_outputs(&mut self, n: usize, outputs: Vec<MembershipOutput>) {
        for out in outputs {
            if self.verbose {
                println!("{:>6} node-{} {out:?}", self.now, n + 1);
            }
            match out {
                MembershipOutput::Send { to, msg } => {
                    let to = node_index(to);
                    self.mix(0x4000 + to as u64);
                    self.send(n, to, SimMsg::Member(msg));
                }
                MembershipOutput::SendAddr { addr, msg } => {
                    let to: usize = addr
                        .strip_prefix('n')
                        .and_then(|i| i.parse().ok())
                        .expect("sim addresses are n<index>");
                    self.send(n, to, SimMsg::Member(msg));
                }
                MembershipOutput::AdminReply { req, result } => {
                    if let Some((r, answer)) = &mut self.admin
                        && *r == req
                    {
                        *answer = Some(result);
                    }
                }
                MembershipOutput::View(view) => {
                    let now = self.now;
                    if let Some(core) = self.nodes[n].core.as_mut() {
                        let outputs = core.set_view(now, view.ring, view.pending);
                        self.outputs(n, outputs);
                    }
                }
                MembershipOutput::Persist(bytes) => self.nodes[n].cluster_state = Some(bytes),
                // Every simulated node keeps its identity for the whole run.
                MembershipOutput::IdentityTaken(text) => {
                    panic!("node-{} lost its identity: {text}", n + 1)
                }
            }
        }
    }

    fn schedule(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.events.insert((self.now + delay, self.seq), event);
    }

    fn mix(&mut self, x: u64) {
        self.trace = (self.trace ^ x).wrapping_mul(0x0100_0000_01b3);
    }

    fn reschedule_tick(&mut self, n: usize) {
        let Some(core) = self.nodes[n].core.as_ref() else {
            return;
        };
        let Some(at) = core.next_deadline() else {
            return;
        };
        let at = at.max(self.now);
        if self.nodes[n]
            .tick_at
            .is_some_and(|t| t <= at && t >= self.now)
        {
            return;
        }
        self.nodes[n].tick_at = Some(at);
        let incarnation = self.nodes[n].incarnation;
        self.schedule(
            at - self.now,
            Event::Tick {
                node: n,
                incarnation,
            },
        );
    }

    /// Runs the fault phase, heals, drains and checks. Panics with the seed on a violation.
    pub fn run(mut self) -> Outcome {
        // Fault phase: until every client finished its operations (bounded in virtual time).
        let fault_end = 60_000;
        while self.now < fault_end
            && self
                .clients
                .iter()
                .any(|c| !matches!(c.state, ClientState::Done))
        {
            if !self.step() {
                break;
            }
        }
        // Heal: no more faults, every node up.
        self.faults = false;
        self.island.clear();
        // A store that failed cannot sync: its supervisor restarts the node now, losing what
        // it had not synced, before the others sync what they hold. Faults armed and not yet
        // struck never strike.
        for n in self.serving() {
            self.nodes[n].store.disarm();
            if self.nodes[n].store.failed() && self.nodes[n].core.is_some() {
                self.crash(n);
            }
        }
        for node in &mut self.nodes {
            node.store.sync();
        }
        for n in self.serving() {
            if self.nodes[n].core.is_none() {
                self.restart(n);
            }
        }
        // Drain: let requests finish, hints reach their homes, and the membership script and the
        // transfers it started complete.
        let drain_end = self.now + 60_000;
        while self.now < drain_end {
            let busy = self.nodes.iter().any(|n| {
                n.core.as_ref().is_some_and(|c| {
                    c.hint_count() > 0
                        || c.ops_in_flight() > 0
                        || c.transfers_in_progress() != (0, 0)
                })
            });
            if !busy && self.requests.is_empty() && self.membership_settled() {
                break;
            }
            if !self.step() {
                break;
            }
        }
        assert!(
            self.script.is_empty(),
            "the membership script did not finish: {:?} left",
            self.script
        );
        assert!(
            self.membership_settled(),
            "membership did not settle within the drain time"
        );
        // Anti-entropy alone (no read of the final pass has run yet) makes every replica set's
        // trees equal within a bound.
        let healed_at = self.now;
        self.converge("after the faults");
        let converge_ms = self.now - healed_at;
        // Tombstones past their grace period are reaped; the replicas stay converged.
        let reap_end = self.now + TOMBSTONE_GRACE_MS * 2 + 2_000;
        let mut next_check = self.now;
        while self.now < reap_end {
            if self.now >= next_check {
                next_check = self.now + 200;
                if self.tombstones_stored() == 0 {
                    break;
                }
            }
            if !self.step() {
                break;
            }
        }
        if self.verbose {
            println!(
                "{:>6} tombstones left: {}",
                self.now,
                self.tombstones_stored()
            );
        }
        self.converge("after reaping");
        // Writes after the reaping: a blind write, then a write with a context read before the
        // key's deletion. If the blind write reused a dot that old context covers, the second
        // write would silently supersede it, and the final check finds it lost.
        self.stale_phase();
        for n in 0..self.nodes.len() {
            if let Some(core) = self.nodes[n].core.as_mut() {
                core.set_ae_interval_ms(0);
            }
        }
        // Beliefs that a node is down expire (down_ms) before the final pass, as they would
        // in a cluster that has been healthy for a while.
        let quiet_end = self.now + 1_000;
        while self.now < quiet_end && self.step() {}
        // Final read pass: every key read with r = n from a member, repairing stale replicas.
        for (bucket, k) in self.all_keys() {
            self.final_read(bucket, k);
        }
        // Settle: requests, repairs and the hints they may leave behind all finish.
        let settle_end = self.now + 30_000;
        while self.now < settle_end && self.busy() {
            if !self.step() {
                break;
            }
        }
        self.check_trees();
        self.check_final();
        let convergent = self.check_convergent();
        let mut stats = (0, 0, 0, 0, 0, 0, 0, 0);
        let mut ae = (0, 0, 0, 0);
        let mut forwards = (0, 0);
        let mut blind_writes = 0;
        for n in &self.nodes {
            if let Some(c) = &n.core {
                let s = c.stats();
                blind_writes += s.blind_writes;
                forwards.0 += s.forwards_moved;
                forwards.1 += s.forwards_refused;
                stats.0 += s.hinted_writes;
                stats.1 += s.hints_delivered;
                stats.2 += s.read_repairs;
                stats.3 += s.batched_jobs;
                ae.0 += s.ae_exchanges;
                ae.1 += s.ae_keys_repaired;
                ae.2 += s.tombstones_reaped;
                ae.3 += s.floor_raises;
                stats.4 += s.partitions_received;
                stats.5 += s.partitions_dropped;
                stats.6 += s.hint_overflow;
                stats.7 += s.credits_granted;
            }
        }
        Outcome {
            trace: self.trace,
            events: self.event_count,
            acked_writes: self.writes.values().filter(|w| w.acked).count(),
            sibling_reads: self.sibling_reads,
            hinted_writes: stats.0,
            forwards,
            hints_delivered: stats.1,
            read_repairs: stats.2,
            crashes: self.crashes,
            injected: self.injected,
            freezes: self.freezes,
            freezes_blocked: self.freezes_blocked,
            params: self.params.clone(),
            batched_jobs: stats.3,
            blind_writes,
            changes: self.changes,
            partitions_received: stats.4,
            partitions_dropped: stats.5,
            retired: self.nodes.iter().filter(|n| n.retired).count(),
            hint_overflow: stats.6,
            credits_granted: stats.7,
            acked_deletes: self.deletes.iter().filter(|d| d.acked).count(),
            ae_exchanges: ae.0,
            ae_keys_repaired: ae.1,
            tombstones_reaped: ae.2,
            floor_raises: ae.3,
            stale_writes: self.stale_writes,
            converge_ms,
            store_faults: (self.store_faults_armed, self.store_failures),
            acked_by_dw: {
                let mut by = [0; 3];
                for w in self.writes.values().filter(|w| w.acked) {
                    by[usize::from(w.dw.min(2))] += 1;
                }
                by
            },
            lost_unsynced: self.lost_unsynced.get(),
            crdt_acked: self.crdt_ops.iter().filter(|o| o.acked).count(),
            crdt_retries: self.crdt_ops.iter().filter(|o| o.attempts > 1).count(),
            retries_held: self.crdt_ops.iter().filter(|o| o.retry_must_dedup).count(),
            double_counted: convergent.double_counted,
            removes_checked: convergent.removes_checked,
            removes_unseen: convergent.removes_unseen,
            crdt_lost_unsynced: convergent.lost_unsynced,
        }
    }

    /// Whether anything is still in motion: requests, hints, messages or storage operations.
    fn busy(&self) -> bool {
        self.nodes.iter().any(|n| {
            n.core
                .as_ref()
                .is_some_and(|c| c.hint_count() > 0 || c.ops_in_flight() > 0)
        }) || !self.requests.is_empty()
            || self.events.values().any(|e| match e {
                Event::Stored { .. } => true,
                // Heartbeats and gossip never stop; they are not work in progress (membership
                // has its own test, `membership_settled`).
                Event::Deliver(env) => {
                    !env.msg.is_heartbeat() && !matches!(env.msg, SimMsg::Member(_))
                }
                _ => false,
            })
    }

    fn step(&mut self) -> bool {
        let Some(((at, seq), event)) = self.events.pop_first() else {
            return false;
        };
        assert!(at >= self.now, "time never goes back");
        self.now = at;
        self.event_count += 1;
        self.mix(at);
        self.mix(seq);
        self.handle(event);
        self.note_synced();
        for n in 0..self.nodes.len() {
            if self.nodes[n].store.newly_failed() {
                self.store_failed(n);
            }
            self.maybe_retire(n);
        }
        true
    }

    /// Nodes still in service: every node but the retired ones.
    fn serving(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|n| !self.nodes[*n].retired)
            .collect()
    }

    /// The node an event happens on, if it is one a frozen node would hold.
    fn held_by(event: &Event) -> Option<usize> {
        match event {
            Event::Deliver(env) => Some(env.to),
            Event::Stored { node, .. }
            | Event::Tick { node, .. }
            | Event::Scanned { node, .. }
            | Event::MemberTick { node, .. }
            | Event::TreeRead { node, .. }
            | Event::TreeLoad { node, .. }
            | Event::ClientRequest { node, .. } => Some(*node),
            _ => None,
        }
    }

    fn handle(&mut self, event: Event) {
        // A forwarded write is what a node acts on late to most effect (its sender may have
        // moved on): some freezes strike a node just as one reaches it.
        if let Event::Deliver(env) = &event
            && matches!(env.msg, SimMsg::Core(PeerMsg::Forward { .. }))
            && self.params.freezes
            && self.faults
            && self.running(env.to)
            && self.rng.gen_range(0..10) == 0
        {
            self.freeze(env.to);
        }
        if let Some(node) = Self::held_by(&event)
            && let Some(until) = self.nodes[node].frozen_until
            && self.now < until
        {
            // Handled in order when the node thaws.
            if let Event::Tick { .. } = event {
                self.nodes[node].tick_at = Some(until);
            }
            self.seq += 1;
            self.events.insert((until, self.seq), event);
            return;
        }
        match event {
            Event::Deliver(env) => self.deliver(env),
            Event::Stored {
                node,
                incarnation,
                id,
                key,
                op,
            } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].core.is_none() {
                    return;
                }
                if let StoreOp::Write { object, .. } = &op {
                    self.note_lww_stamp(object);
                }
                let written = match &op {
                    StoreOp::Write { object, .. } => {
                        self.note_values(&key, object);
                        Some(object.clone())
                    }
                    StoreOp::Remove
                        if key.space == Space::Primary
                            && [COUNTERS_BUCKET, SETS_BUCKET].contains(&&key.bucket[..]) =>
                    {
                        self.crdt_reaped
                            .insert((key.bucket.clone(), key.key.clone()));
                        None
                    }
                    _ => None,
                };
                let result = self.nodes[node].store.apply(&key, op);
                if let (Ok(_), Some(object)) = (&result, written) {
                    self.note_stored(node, &key, &object);
                }
                let now = self.now;
                let outputs = self.core(node).handle_stored(now, id, result);
                self.outputs(node, outputs);
            }
            Event::Tick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation {
                    return;
                }
                if self.nodes[node].tick_at == Some(self.now) {
                    self.nodes[node].tick_at = None;
                }
                if self.nodes[node].core.is_some() {
                    let now = self.now;
                    let outputs = self.core(node).handle_tick(now);
                    self.outputs(node, outputs);
                }
            }
            Event::Scanned {
                node,
                incarnation,
                id,
                partition,
                after,
                max_items,
                max_bytes,
            } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].core.is_none() {
                    return;
                }
                let page = self.nodes[node]
                    .store
                    .scan(partition, after, max_items, max_bytes);
                let now = self.now;
                let outputs = self.core(node).handle_scanned(now, id, page);
                self.outputs(node, outputs);
            }
            Event::MemberTick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation {
                    return;
                }
                let random = self.rng.r#gen::<u64>();
                let now = self.now;
                if let Some(m) = self.nodes[node].membership.as_mut() {
                    let outputs = m.handle_tick(now, random);
                    self.member_outputs(node, outputs);
                    self.schedule(100, Event::MemberTick { node, incarnation });
                }
            }
            Event::TreeRead {
                node,
                incarnation,
                partition,
            } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].core.is_none() {
                    return;
                }
                let store = &self.nodes[node].store;
                // As a shard does: a failed engine ends the load, and the partition keeps
                // anti-entropy off until the next start.
                if store.failed() {
                    return;
                }
                let items: Vec<(StoreKey, Object)> = store
                    .keys()
                    .into_iter()
                    .filter(|k| k.partition == partition && k.space == Space::Primary)
                    .filter_map(|k| store.read(&k).map(|o| (k, o)))
                    .collect();
                let delay = self.rng.gen_range(1..100);
                self.schedule(
                    delay,
                    Event::TreeLoad {
                        node,
                        incarnation,
                        partition,
                        items,
                    },
                );
            }
            Event::TreeLoad {
                node,
                incarnation,
                partition,
                items,
            } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].core.is_none() {
                    return;
                }
                let now = self.now;
                let core = self.core(node);
                for (key, object) in &items {
                    core.load_replica(now, key, object);
                }
                core.trees_loaded(partition);
            }
            Event::Admin => self.admin_step(),
            Event::Flush { node } => {
                // A node that is down has no flusher running.
                if self.nodes[node].core.is_some() {
                    self.nodes[node].store.flush_periodic();
                }
                // Once faults stop nothing crashes, so what is unsynced no longer matters: the
                // periodic flush stops (every store is synced at the heal) and the long quiet
                // phases cost fewer events.
                if self.faults {
                    let every = self.rng.gen_range(5..self.params.flush_ms_max);
                    self.schedule(every, Event::Flush { node });
                }
            }
            Event::ClientStart { client } => self.client_start(client),
            Event::Crash { node } => {
                if self.faults && self.nodes[node].core.is_some() {
                    // Half the crashes of a group-crash run take more nodes down in the same
                    // instant (half of those every node: a power loss), each losing what it
                    // had not synced.
                    let mut size = 1;
                    if self.params.group_crashes && self.rng.gen_bool(0.5) {
                        size = if self.rng.gen_bool(0.5) {
                            self.nodes.len()
                        } else {
                            self.rng.gen_range(2..=self.nodes.len())
                        };
                    }
                    self.crash_group(node, size);
                }
                if self.faults {
                    let next = self.rng.gen_range(300..3_000);
                    let node = self.rng.gen_range(0..self.nodes.len());
                    self.schedule(next, Event::Crash { node });
                }
            }
            Event::Restart { node } => {
                if self.nodes[node].core.is_none() && !self.nodes[node].retired {
                    self.restart(node);
                }
            }
            Event::PowerLoss => {
                if self.faults {
                    let up = self
                        .serving()
                        .into_iter()
                        .find(|n| self.nodes[*n].core.is_some());
                    if let Some(node) = up {
                        self.crash_group(node, self.nodes.len());
                    }
                }
            }
            Event::StoreFault { node } => {
                if self.faults {
                    let fault = if self.rng.gen_bool(0.5) {
                        Fault::Write
                    } else {
                        Fault::Sync
                    };
                    self.nodes[node].store.arm(fault);
                    self.store_faults_armed += 1;
                    let next = self.rng.gen_range(300..3_000);
                    let node = self.rng.gen_range(0..self.nodes.len());
                    self.schedule(next, Event::StoreFault { node });
                }
            }
            Event::Supervise { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation
                    && self.nodes[node].core.is_some()
                    && !self.nodes[node].retired
                {
                    self.crash(node);
                    let down = self.rng.gen_range(20..300);
                    self.schedule(down, Event::Restart { node });
                }
            }
            Event::Partition => {
                if self.faults {
                    self.injected.2 += 1;
                    self.island.clear();
                    let size = self.rng.gen_range(1..self.nodes.len());
                    while self.island.len() < size {
                        let n = self.rng.gen_range(0..self.nodes.len());
                        self.island.insert(n);
                    }
                    let heal = self.rng.gen_range(100..2_000);
                    self.schedule(heal, Event::Heal);
                }
            }
            Event::Freeze if self.faults => {
                let running: Vec<usize> =
                    (0..self.nodes.len()).filter(|&n| self.running(n)).collect();
                let next = if running.is_empty() {
                    // Every node down (a power loss): soon again.
                    self.freezes_blocked += 1;
                    self.rng.gen_range(10..50)
                } else {
                    let node = running[self.rng.gen_range(0..running.len())];
                    self.freeze(node);
                    self.rng.gen_range(300..3_000)
                };
                self.schedule(next, Event::Freeze);
            }
            // The fault phase is over: no more freezes.
            Event::Freeze => {}
            Event::ClientRequest {
                node,
                incarnation,
                req,
                message,
            } => {
                // A request in the socket of a node killed meanwhile is lost with it.
                if self.nodes[node].incarnation == incarnation && self.nodes[node].core.is_some() {
                    self.client_request(node, req, message);
                }
            }
            Event::Heal => {
                self.island.clear();
                if self.faults {
                    let next = self.rng.gen_range(200..3_000);
                    self.schedule(next, Event::Partition);
                }
            }
        }
    }

    /// Whether node `n` is up and not frozen.
    fn running(&self, n: usize) -> bool {
        self.nodes[n].core.is_some() && !self.frozen(n)
    }

    /// Whether node `n` is frozen now.
    pub(super) fn frozen(&self, n: usize) -> bool {
        self.nodes[n].frozen_until.is_some_and(|t| self.now < t)
    }

    /// Freezes node `n` for 200 ms to 2 s.
    fn freeze(&mut self, n: usize) {
        let until = self.now + self.rng.gen_range(200..2_000);
        self.nodes[n].frozen_until = Some(until);
        self.freezes += 1;
    }

    /// Records the stamp an `lww` value was written with: every copy of a write carries the
    /// stamp its coordinator chose.
    fn note_lww_stamp(&mut self, object: &Object) {
        if let Object::Lww(l) = object
            && let Val::Value(v) = &l.val
        {
            self.lww_stamps
                .entry(v.clone())
                .or_default()
                .insert((l.timestamp, l.node));
        }
    }

    fn core(&mut self, n: usize) -> &mut Core {
        self.nodes[n]
            .core
            .as_mut()
            .expect("events for a crashed node are filtered out")
    }

    fn outputs(&mut self, n: usize, outputs: Vec<Output>) {
        for out in outputs {
            if self.verbose {
                println!("{:>6} node-{} {out:?}", self.now, n + 1);
            }
            let answer = matches!(out, Output::Answer { .. });
            match out {
                Output::Send { to, msg } | Output::Answer { to, msg } => {
                    if let PeerMsg::ReplicaPut {
                        key,
                        object: Object::Crdt(state),
                        ..
                    } = &msg
                    {
                        self.note_coordinated(key, state);
                    }
                    // A write's stamp is known from its replica writes too: a home that batched
                    // it under a higher-stamped one never stores it as itself.
                    if let PeerMsg::ReplicaPut { object, .. } = &msg {
                        self.note_lww_stamp(object);
                    }
                    // Requests and answers travel alike here; the node's shell sends an answer
                    // on the connection its request came on, so the core must tell them apart.
                    assert!(
                        msg.is_answer() == answer,
                        "node-{}: {msg:?} output as {}",
                        n + 1,
                        if answer { "an answer" } else { "a request" }
                    );
                    let to = node_index(to);
                    self.mix(0x2000 + to as u64);
                    self.send(n, to, SimMsg::Core(msg));
                }
                Output::Scan {
                    id,
                    partition,
                    after,
                    max_items,
                    max_bytes,
                } => {
                    let delay = self.rng.gen_range(0..=3);
                    let incarnation = self.nodes[n].incarnation;
                    self.schedule(
                        delay,
                        Event::Scanned {
                            node: n,
                            incarnation,
                            id,
                            partition,
                            after,
                            max_items,
                            max_bytes,
                        },
                    );
                }
                Output::TransferDone { epoch, partition } => {
                    let now = self.now;
                    if let Some(m) = self.nodes[n].membership.as_mut() {
                        let outputs = m.transfer_done(now, epoch, partition);
                        self.member_outputs(n, outputs);
                    }
                }
                Output::DropPartition { partition } => {
                    // As the engine does: the drop is durable before it is reported. A failed
                    // store refuses it, and the node, as a shard does, reports nothing: the
                    // core keeps refusing writes to the partition until the restart.
                    if self.nodes[n].store.drop_partition(partition).is_ok() {
                        let now = self.now;
                        let outputs = self.core(n).partition_dropped(now, partition);
                        self.outputs(n, outputs);
                    }
                }
                Output::Store { id, key, op } => {
                    let delay = self.rng.gen_range(0..=3);
                    let incarnation = self.nodes[n].incarnation;
                    self.schedule(
                        delay,
                        Event::Stored {
                            node: n,
                            incarnation,
                            id,
                            key,
                            op,
                        },
                    );
                }
                Output::Reply { req, message } => self.reply(n, req, message),
                Output::RenewEpochs => {
                    let node = &mut self.nodes[n];
                    let lease = EpochLease::new(node.epoch_next, LEASE_EPOCHS);
                    node.epoch_next += LEASE_EPOCHS;
                    if let Some(core) = node.core.as_mut() {
                        core.handle_epochs(lease);
                    }
                }
                Output::PersistFloor { floor } => {
                    // As the node does: a sync run writes its floor file; a buffered run keeps
                    // none while it runs, so its next run starts above this floor anyway.
                    let node = &mut self.nodes[n];
                    if self.params.durable_writes {
                        node.floor = Some(floor);
                    }
                    if let Some(core) = node.core.as_mut() {
                        core.handle_floor_persisted(floor);
                    }
                }
            }
        }
        self.check_credit(n);
        self.reschedule_tick(n);
    }

    // ----- clients -----
}

/// What `ringkv serve` resolves with no flags and no config file.
fn default_settings() -> Settings {
    Settings::resolve(FileConfig::default(), FileConfig::default())
        .expect("the default settings resolve")
}
