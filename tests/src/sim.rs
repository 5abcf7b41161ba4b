//! A deterministic simulator of a ringkv cluster: the real sans-IO [`Core`] on every node, an
//! in-memory store, virtual time, and a network and a nemesis driven by one seed.
//!
//! What is simulated:
//! - **Storage**: per node, a durable map and an unsynced overlay. A write completes after a
//!   random delay; `durable` writes (and a periodic flush, like the engine's group commit) move
//!   the overlay into the durable map. A crash loses the overlay and every operation in flight.
//! - **Network**: every message gets a random delay (so messages reorder), may be dropped or
//!   duplicated, and is lost between partitioned nodes. Messages are addressed to an incarnation:
//!   a node that restarted never receives what was sent to (or answered for) its previous life,
//!   as with TCP connections that die with a process.
//! - **Nemesis**: partitions that isolate a random subset, crash-restarts with random downtime,
//!   message loss and duplication, all during the fault phase only.
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
//!   blind writes, on a `siblings` bucket; plain writes on an `lww` bucket.
//!
//! Checkers:
//! - after every read a client gets: no two siblings where one's write saw the other (each write
//!   records the values of the read its context came from; "saw" is the transitive closure);
//!   an `lww` read has at most one sibling;
//! - every replica write a node acknowledges is in its store (durably, if the acknowledgement
//!   says so) when the acknowledgement leaves;
//! - after every event, hint credit: a holder never has more hints in flight to a home than the
//!   grant it uses, and that grant is one the home sent it (the simulator records every
//!   HINT_CREDIT answer the network delivers); no grant is above `hint_credit_max`;
//! - at the end, after faults stop, every node is up (but the retired ones, which must hold
//!   nothing at all), hints have drained, membership changes are
//!   complete (no pending ring, every node holds the same state, no transfer or handoff left),
//!   and every key has been read with `r = n`: every acknowledged write is a sibling of the final
//!   state or was seen by a write whose value is (transitively); every acknowledged set element is
//!   in the final set; all home replicas of every key (in the final ring) hold identical objects;
//!   no node keeps replica data of a partition it does not replicate; no hint is left.
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
use ringkv_core::bucket::{BucketProps, Buckets, ConflictMode};
use ringkv_core::coordinator::{
    Core, CoreConfig, EpochLease, Output, PeerMsg, ScanItem, ScanPage, Space, StoreKey, StoreOp,
    hint_bytes,
};
use ringkv_core::membership::{
    AdminCmd, AdminError, Membership, MembershipConfig, MembershipMsg, MembershipOutput,
};
use ringkv_core::object::{Object, Val};
use ringkv_core::ring::{PartitionCount, PartitionId, Ring};
use ringkv_engine::Durability;
use ringkv_net::{Delete, Get, Message, Put, Sibling};

/// Size of an epoch lease; small so renewals happen in simulations.
const LEASE_EPOCHS: u32 = 16;
const SIBLINGS_BUCKET: &[u8] = b"default";
const LWW_BUCKET: &[u8] = b"sessions";
/// Set-add keys are numbered from here; registers from 0.
const SET_KEYS: usize = 1000;
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
    /// Durable acknowledgements a write needs.
    pub dw: u8,
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
            // From a stream of its own, so the other knobs of a seed stay what they were.
            defaults: StdRng::seed_from_u64(seed ^ 0x00de_fa17).gen_bool(0.25),
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
        .with_defaults()
    }

    /// With `defaults`, the durability knobs are what the default settings resolve to, so the
    /// simulator's model of syncs and epoch floors matches the buckets `Sim::config` gives.
    fn with_defaults(mut self) -> Params {
        if self.defaults {
            let settings = default_settings();
            self.durable_writes = settings.durability == Durability::Sync;
            self.dw = settings.buckets.default.dw;
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
    /// Hints delivered, over all nodes.
    pub hints_delivered: u64,
    /// Read repairs sent, over all nodes.
    pub read_repairs: u64,
    /// Crashes injected.
    pub crashes: usize,
    /// Messages dropped, messages duplicated and network partitions started by the fault
    /// injection.
    pub injected: (u64, u64, u64),
    /// The parameters the seed drew.
    pub params: Params,
    /// Jobs that shared a key's read and write with another, over all nodes.
    pub batched_jobs: u64,
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
}

/// What travels between simulated nodes.
#[derive(Clone, Debug)]
enum SimMsg {
    Core(PeerMsg),
    Member(MembershipMsg),
}

impl SimMsg {
    fn is_answer(&self) -> bool {
        match self {
            SimMsg::Core(m) => m.is_answer(),
            SimMsg::Member(m) => m.is_answer(),
        }
    }

    /// A failure-detector heartbeat or its answer.
    fn is_heartbeat(&self) -> bool {
        matches!(self, SimMsg::Core(m) if m.is_heartbeat())
    }

    /// The id a request and its answer share, apart for the two kinds.
    fn id(&self) -> u64 {
        match self {
            SimMsg::Core(m) => m.id(),
            SimMsg::Member(m) => m.id() | 1 << 63,
        }
    }
}

/// One operator step of the membership script.
#[derive(Clone, Debug)]
struct ScriptStep {
    node: usize,
    cmd: AdminCmd,
}

#[derive(Clone, Debug)]
struct Envelope {
    from: usize,
    to: usize,
    to_incarnation: u32,
    from_incarnation: u32,
    msg: SimMsg,
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
    Partition,
    Heal,
}

#[derive(Default)]
struct Store {
    durable: BTreeMap<StoreKey, Object>,
    /// Unsynced changes (`None` = removed), lost on crash.
    overlay: BTreeMap<StoreKey, Option<Object>>,
}

impl Store {
    fn read(&self, key: &StoreKey) -> Option<Object> {
        match self.overlay.get(key) {
            Some(o) => o.clone(),
            None => self.durable.get(key).cloned(),
        }
    }

    fn sync(&mut self) {
        for (k, v) in std::mem::take(&mut self.overlay) {
            match v {
                Some(o) => self.durable.insert(k, o),
                None => self.durable.remove(&k),
            };
        }
    }

    /// Up to `max` replica keys of `partition` after the cursor (an encoded bucket and key).
    fn scan(&self, partition: u32, after: Option<Bytes>, max: usize) -> ScanPage {
        let after = after.map(|c| {
            let (len, rest) = c.split_first().expect("sim cursors are non-empty");
            let (b, k) = rest.split_at(usize::from(*len));
            (Bytes::copy_from_slice(b), Bytes::copy_from_slice(k))
        });
        let mut items = Vec::new();
        for key in self.keys() {
            if key.partition != partition || key.space != Space::Primary {
                continue;
            }
            if let Some((b, k)) = &after
                && (&key.bucket, &key.key) <= (b, k)
            {
                continue;
            }
            if items.len() == max {
                let last: &ScanItem = items.last().expect("max > 0");
                let mut cursor = vec![last.bucket.len() as u8];
                cursor.extend_from_slice(&last.bucket);
                cursor.extend_from_slice(&last.key);
                return ScanPage {
                    items,
                    next: Some(Bytes::from(cursor)),
                };
            }
            if let Some(object) = self.read(&key) {
                items.push(ScanItem {
                    bucket: key.bucket.clone(),
                    key: key.key.clone(),
                    object,
                });
            }
        }
        ScanPage { items, next: None }
    }

    fn keys(&self) -> BTreeSet<StoreKey> {
        let mut keys: BTreeSet<StoreKey> = self.durable.keys().cloned().collect();
        for (k, v) in &self.overlay {
            if v.is_some() {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        keys
    }
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
}

/// What a client's current operation is waiting for.
#[derive(Clone, Debug)]
enum ClientState {
    Idle,
    /// Read of a read-modify-write; then write `kind`.
    Reading {
        key: usize,
        bucket: &'static [u8],
        kind: WriteKind,
    },
    Writing {
        write: u64,
    },
    Deleting {
        delete: usize,
    },
    Done,
}

#[derive(Clone, Copy, Debug)]
enum WriteKind {
    Register,
    SetAdd,
    Blind,
    Lww,
    Delete,
}

/// A delete a client issued (read-modify-delete on a register key).
#[derive(Clone, Debug)]
struct DeleteRecord {
    key: usize,
    /// Values returned by the read whose context the delete carried.
    saw: Vec<Bytes>,
    acked: bool,
}

/// A write a client issued.
#[derive(Clone, Debug)]
struct WriteRecord {
    bucket: &'static [u8],
    key: usize,
    value: Bytes,
    /// Values returned by the read whose context the write carried.
    saw: Vec<Bytes>,
    /// The set element it added (set-add writes).
    element: Option<String>,
    acked: bool,
    /// When the client sent it, and when it was acknowledged.
    started_at: u64,
    acked_at: Option<u64>,
}

struct Client {
    state: ClientState,
    ops_left: usize,
    seq: u64,
}

/// A final-phase read: the sibling values and context, or why it failed.
type FinalRead = Result<(Vec<Bytes>, Bytes), String>;

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
    owed: BTreeMap<(usize, usize, u64), u32>,
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
}

fn key_bytes(k: usize) -> Bytes {
    Bytes::from(format!("k{k}"))
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
        sim
    }

    fn config(&self, node: NodeId) -> CoreConfig {
        let mut cfg = CoreConfig::new(node);
        let props = if self.params.defaults {
            // What `ringkv serve` resolves with no flags and no file; only the time scale below
            // (timeouts, intervals) stays the simulator's.
            default_settings().buckets.default
        } else {
            BucketProps {
                n: 3,
                r: 2,
                w: 2,
                // With dw = 0 in a buffered run an acknowledged write may sit unsynced on every
                // replica that acknowledged it; it is still safe here because crashes are at
                // least 300 ms apart and every node flushes at least every 30 ms, so one crash
                // never meets another's unsynced writes. dw = 1 syncs the coordinator's own write.
                dw: self.params.dw,
                mode: ConflictMode::Siblings,
                max_siblings: 64,
            }
        };
        let mut named = BTreeMap::new();
        named.insert(
            LWW_BUCKET.to_vec(),
            BucketProps {
                mode: ConflictMode::Lww,
                ..props
            },
        );
        cfg.buckets = Buckets {
            default: props,
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

    /// The operator's steps for the run's change, starting during the fault phase.
    fn plan_script(&mut self) {
        let Some(change) = self.params.change else {
            return;
        };
        let originals = self.params.nodes;
        let pick = |sim: &mut Sim| sim.rng.gen_range(0..originals);
        let mut steps = Vec::new();
        if matches!(change, Change::Join | Change::JoinLeave) {
            let seed = pick(self);
            steps.push(ScriptStep {
                node: originals,
                cmd: AdminCmd::Join {
                    seed: format!("n{seed}"),
                },
            });
            let at = pick(self);
            steps.push(ScriptStep {
                node: at,
                cmd: AdminCmd::Commit,
            });
        }
        if matches!(change, Change::Leave | Change::JoinLeave) {
            let who = pick(self);
            steps.push(ScriptStep {
                node: who,
                cmd: AdminCmd::Leave,
            });
            let at = pick(self);
            steps.push(ScriptStep {
                node: at,
                cmd: AdminCmd::Commit,
            });
        }
        if change == Change::Remove {
            let who = pick(self);
            let by = (who + 1 + self.rng.gen_range(0..originals - 1)) % originals;
            steps.push(ScriptStep {
                node: by,
                cmd: AdminCmd::Remove {
                    node: self.nodes[who].id,
                },
            });
            let at = pick(self);
            steps.push(ScriptStep {
                node: at,
                cmd: AdminCmd::Commit,
            });
        }
        self.script = steps.into();
        let at = self.rng.gen_range(100..1500);
        self.schedule(at, Event::Admin);
    }

    /// Runs (or retries) the script's next step, or records the answer of the one in progress.
    fn admin_step(&mut self) {
        if let Some((_, Some(result))) = &self.admin {
            let step = self.script.front().expect("an answered step is first");
            // An answer lost on the way makes a retry find the step already done.
            let done = match result {
                Ok(_) => true,
                Err(AdminError::Refused(e)) => {
                    e.contains("nothing is staged")
                        || e.contains("already leaving")
                        || e.contains("already removed")
                        || e.contains("only a fresh node joins")
                }
                Err(AdminError::Unreachable(_)) => false,
            };
            if done {
                if matches!(step.cmd, AdminCmd::Commit) {
                    self.changes += 1;
                }
                self.script.pop_front();
            }
            self.admin = None;
        }
        if self.admin.is_some() {
            // Still waiting: retry later (a lost request never answers).
            self.admin = None;
        }
        let Some(mut step) = self.script.front().cloned() else {
            return;
        };
        if self.nodes[step.node].retired && matches!(step.cmd, AdminCmd::Commit) {
            // The commit took effect and the node it was asked of left and stopped before the
            // answer arrived: the operator asks another node (which finds nothing staged).
            step.node = self.serving()[0];
            if let Some(front) = self.script.front_mut() {
                front.node = step.node;
            }
        }
        let pause = self.rng.gen_range(200..800);
        self.schedule(pause, Event::Admin);
        if self.nodes[step.node].membership.is_none() {
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        self.admin = Some((req, None));
        let now = self.now;
        let outputs = self.nodes[step.node]
            .membership
            .as_mut()
            .expect("checked above")
            .admin(now, req, step.cmd);
        self.member_outputs(step.node, outputs);
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
        let mut stats = (0, 0, 0, 0, 0, 0, 0, 0);
        let mut ae = (0, 0, 0, 0);
        for n in &self.nodes {
            if let Some(c) = &n.core {
                let s = c.stats();
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
            hints_delivered: stats.1,
            read_repairs: stats.2,
            crashes: self.crashes,
            injected: self.injected,
            params: self.params.clone(),
            batched_jobs: stats.3,
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
        }
    }

    /// Every core's trees describe its storage: a core built from the node's store has the same
    /// roots and key counts.
    fn check_trees(&mut self) {
        for n in self.serving() {
            let id = self.nodes[n].id;
            let ring = self.nodes[n].core.as_ref().expect("up").ring().clone();
            let mut fresh = Core::new(
                self.config(id),
                ring,
                EpochLease::new(1, LEASE_EPOCHS),
                Vec::<(StoreKey, u64)>::new(),
            );
            let store = &self.nodes[n].store;
            for key in store.keys() {
                if key.space == Space::Primary
                    && let Some(object) = store.read(&key)
                {
                    fresh.load_replica(0, &key, &object);
                }
            }
            let live = self.nodes[n].core.as_mut().expect("up").merkle_roots();
            assert_eq!(
                fresh.merkle_roots(),
                live,
                "node {id}'s trees do not describe its storage"
            );
        }
    }

    /// Every tree of every node, by (partition, n): each home's root.
    fn roots(&mut self) -> BTreeMap<(u32, u8), BTreeMap<NodeId, u64>> {
        let mut all: BTreeMap<(u32, u8), BTreeMap<NodeId, u64>> = BTreeMap::new();
        for node in self.nodes.iter_mut().filter(|n| !n.retired) {
            let id = node.id;
            let core = node
                .core
                .as_mut()
                .expect("every node is up after the faults");
            for t in core.merkle_roots() {
                all.entry((t.partition, t.n))
                    .or_default()
                    .insert(id, t.root);
            }
        }
        all
    }

    /// The trees whose replicas' roots differ.
    fn diverged(&mut self) -> Vec<(u32, u8)> {
        let ring = self.final_ring();
        let roots = self.roots();
        let mut out = Vec::new();
        for (&(p, n), by_node) in &roots {
            let homes =
                ring.preference_list(PartitionId(p), usize::from(n).min(ring.members().len()));
            assert_eq!(
                homes.iter().copied().collect::<BTreeSet<_>>(),
                by_node.keys().copied().collect::<BTreeSet<_>>(),
                "tree ({p}, {n}) is kept by exactly its homes"
            );
            if by_node.values().collect::<BTreeSet<_>>().len() > 1 {
                out.push((p, n));
            }
        }
        out
    }

    /// Steps until every replica set's trees are equal; panics past [`CONVERGE_MS_MAX`], and
    /// if the homes' stores then differ (once no store operation is in flight).
    fn converge(&mut self, when: &str) {
        let end = self.now + CONVERGE_MS_MAX;
        let mut next_check = self.now;
        loop {
            if self.now >= next_check {
                next_check = self.now + 250;
                // Equal roots are judged on the stores too, once no store operation is in
                // flight (a tree follows a write when it is issued): equal trees over
                // differing stores would be repaired later by the final reads, unseen.
                if self.diverged().is_empty() && !self.store_ops_pending() {
                    let ring = self.final_ring();
                    let differ = self.homes_differ(&ring);
                    assert!(
                        differ.is_empty(),
                        "replica trees agree {when} but the stores differ: {differ:?}"
                    );
                    return;
                }
            }
            assert!(
                self.now < end,
                "replica trees still differ {CONVERGE_MS_MAX} ms {when}: {:?}",
                self.diverged()
            );
            if !self.step() {
                panic!("the simulation ran out of events {when}");
            }
        }
    }

    /// Whether a store operation has been issued and not yet carried out.
    fn store_ops_pending(&self) -> bool {
        self.events
            .values()
            .any(|e| matches!(e, Event::Stored { .. }))
    }

    /// Tombstones stored in home replicas, over all nodes.
    fn tombstones_stored(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| {
                n.store
                    .keys()
                    .into_iter()
                    .filter(|k| k.space == Space::Primary)
                    .filter(|k| n.store.read(k).is_some_and(|o| o.is_deleted()))
                    .count()
            })
            .sum()
    }

    /// Sends `message` from the harness to a random node and steps until the answer (bounded).
    fn call(&mut self, message: Message) -> Option<Message> {
        self.harness_reply = None;
        let req = self.next_req;
        self.next_req += 1;
        let serving = self.serving();
        let n = serving[self.rng.gen_range(0..serving.len())];
        self.requests.insert((n, req), HARNESS);
        self.client_request(n, req, message);
        let end = self.now + 10_000;
        while self.harness_reply.is_none() && self.now < end && self.step() {}
        self.harness_reply.take()
    }

    fn stale_phase(&mut self) {
        let stale: Vec<(usize, (Bytes, Vec<Bytes>))> =
            std::mem::take(&mut self.stale).into_iter().collect();
        for (k, (context, saw)) in stale {
            for (tag, context, saw) in [("blind", None, Vec::new()), ("stale", Some(context), saw)]
            {
                let value = Bytes::from(format!("post-k{k}-{tag}|"));
                let id = self.writes.len() as u64;
                self.by_value.insert(value.clone(), id);
                self.writes.insert(
                    id,
                    WriteRecord {
                        bucket: SIBLINGS_BUCKET,
                        key: k,
                        value: value.clone(),
                        saw,
                        element: None,
                        acked: false,
                        started_at: self.now,
                        acked_at: None,
                    },
                );
                let reply = self.call(Message::Put(Put {
                    bucket: Bytes::from_static(SIBLINGS_BUCKET),
                    key: key_bytes(k),
                    value,
                    context,
                    w: None,
                    dw: None,
                    timeout_ms: None,
                }));
                if let Some(Message::PutOk(_)) = reply {
                    let now = self.now;
                    let w = self.writes.get_mut(&id).expect("recorded above");
                    w.acked = true;
                    w.acked_at = Some(now);
                    self.stale_writes += 1;
                }
            }
        }
    }

    /// No script step left, no pending ring, every node up with the same membership state.
    fn membership_settled(&self) -> bool {
        if !self.script.is_empty() {
            return false;
        }
        let mut states = self
            .nodes
            .iter()
            .filter(|n| !n.retired)
            .map(|n| n.membership.as_ref().map(|m| m.state()));
        let Some(Some(first)) = states.next() else {
            return false;
        };
        first.pending.is_none() && states.all(|s| s == Some(first))
    }

    /// The node final reads go through: the first member of the final ring.
    fn reader(&self) -> usize {
        let ring = self.final_ring();
        node_index(*ring.members().first().expect("a ring has members"))
    }

    fn final_ring(&self) -> Ring {
        self.nodes[self.serving()[0]]
            .membership
            .as_ref()
            .expect("every node is up at the end")
            .state()
            .ring
            .clone()
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

    /// Every (bucket, key) a client may write.
    fn all_keys(&self) -> Vec<(&'static [u8], usize)> {
        let keys = self.params.keys;
        (0..keys)
            .map(|k| (SIBLINGS_BUCKET, k))
            .chain((0..keys).map(|k| (SIBLINGS_BUCKET, SET_KEYS + k)))
            .chain((0..keys).map(|k| (LWW_BUCKET, k)))
            .collect()
    }

    fn final_read(&mut self, bucket: &'static [u8], k: usize) {
        let req = self.next_req;
        self.next_req += 1;
        let reader = self.reader();
        // usize::MAX marks a final read rather than a client's.
        self.requests.insert((reader, req), usize::MAX);
        self.final_reads
            .insert((bucket.to_vec(), k), Err("no answer".to_owned()));
        let message = Message::Get(Get {
            bucket: Bytes::from_static(bucket),
            key: key_bytes(k),
            // Every replica: three, or fewer when the cluster shrank below three.
            r: Some(self.final_ring().members().len().min(3) as u8),
            timeout_ms: Some(5_000),
        });
        // Remember which key the request was for (the answer may come at once).
        self.final_keys.insert(req, (bucket, k));
        self.client_request(reader, req, message);
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
        for n in 0..self.nodes.len() {
            self.maybe_retire(n);
        }
        true
    }

    /// Stops node `n` for good once membership says it is out of the cluster and its core holds
    /// nothing for others (no partition to hand off, no hint), as a real node stops itself:
    /// a clean stop (its store synced), never restarted.
    fn maybe_retire(&mut self, n: usize) {
        let node = &self.nodes[n];
        let (Some(core), Some(membership)) = (&node.core, &node.membership) else {
            return;
        };
        if !membership.retired() || core.handoff_count() > 0 || core.hint_count() > 0 {
            return;
        }
        if self.verbose {
            println!("{:>6} node-{} retires", self.now, n + 1);
        }
        self.nodes[n].store.sync();
        self.crash(n);
        self.crashes -= 1;
        self.nodes[n].retired = true;
    }

    /// Nodes still in service: every node but the retired ones.
    fn serving(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|n| !self.nodes[*n].retired)
            .collect()
    }

    fn handle(&mut self, event: Event) {
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
                if let StoreOp::Write {
                    object: Object::Lww(l),
                    ..
                } = &op
                    && let Val::Value(v) = &l.val
                {
                    // Every copy of a write carries the stamp its coordinator chose.
                    self.lww_stamps
                        .entry(v.clone())
                        .or_default()
                        .insert((l.timestamp, l.node));
                }
                let store = &mut self.nodes[node].store;
                let result = match op {
                    StoreOp::Read => Ok(store.read(&key)),
                    StoreOp::Write { object, durable } => {
                        store.overlay.insert(key, Some(object));
                        if durable {
                            store.sync();
                        }
                        Ok(None)
                    }
                    StoreOp::Remove => {
                        store.overlay.insert(key, None);
                        Ok(None)
                    }
                    StoreOp::Sync => {
                        store.sync();
                        Ok(None)
                    }
                };
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
            } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].core.is_none() {
                    return;
                }
                let page = self.nodes[node].store.scan(partition, after, max_items);
                let now = self.now;
                let outputs = self.core(node).handle_scanned(now, id, Ok(page));
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
                self.nodes[node].store.sync();
                // Once faults stop nothing crashes, so what is unsynced no longer matters: the
                // periodic flush stops (every store is synced at the heal) and the long quiet
                // phases cost fewer events.
                if self.faults {
                    let every = self.rng.gen_range(5..30);
                    self.schedule(every, Event::Flush { node });
                }
            }
            Event::ClientStart { client } => self.client_start(client),
            Event::Crash { node } => {
                if self.faults && self.nodes[node].core.is_some() {
                    self.crash(node);
                    let down = if self.params.long_outages && self.rng.gen_bool(0.5) {
                        self.rng
                            .gen_range(TOMBSTONE_GRACE_MS..TOMBSTONE_GRACE_MS * 4)
                    } else {
                        self.rng.gen_range(50..2_000)
                    };
                    self.schedule(down, Event::Restart { node });
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
            Event::Heal => {
                self.island.clear();
                if self.faults {
                    let next = self.rng.gen_range(200..3_000);
                    self.schedule(next, Event::Partition);
                }
            }
        }
    }

    fn core(&mut self, n: usize) -> &mut Core {
        self.nodes[n]
            .core
            .as_mut()
            .expect("events for a crashed node are filtered out")
    }

    fn crash(&mut self, n: usize) {
        self.crashes += 1;
        let node = &mut self.nodes[n];
        node.core = None;
        node.membership = None;
        node.store.overlay.clear();
        node.incarnation += 1;
        node.tick_at = None;
        self.owed.retain(|(at, _, _), _| *at != n);
        self.puts.retain(|(at, _, _), _| *at != n);
        // Client requests the node was coordinating are lost: their clients see a timeout.
        let lost: Vec<(usize, u64)> = self
            .requests
            .keys()
            .filter(|(at, _)| *at == n)
            .copied()
            .collect();
        for key in lost {
            if let Some(client) = self.requests.remove(&key) {
                self.client_failed(client, key.1);
            }
        }
    }

    fn restart(&mut self, n: usize) {
        self.boot(n);
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.island.contains(&a) == self.island.contains(&b)
    }

    fn send(&mut self, from: usize, to: usize, msg: SimMsg) {
        if let SimMsg::Core(PeerMsg::ReplicaPutOk { id, durable }) = &msg {
            self.check_ack(from, to, *id, *durable);
        }
        let from_incarnation = self.nodes[from].incarnation;
        let to_incarnation = if msg.is_answer() {
            let id = msg.id();
            // Kept after the first answer: a duplicated request's second answer belongs to the
            // same incarnation of the requester.
            match self.owed.get(&(from, to, id)).copied() {
                Some(inc) => inc,
                // Not owed (a duplicate's second answer): the requester still gets it.
                None => self.nodes[to].incarnation,
            }
        } else {
            self.nodes[to].incarnation
        };
        let env = Envelope {
            from,
            to,
            to_incarnation,
            from_incarnation,
            msg,
        };
        if self.faults && self.rng.gen_range(0..1000) < self.params.drop_permille {
            self.injected.0 += 1;
            return;
        }
        // Peer links are TCP: a message is never delivered twice by the network. Duplicates
        // stand for retries; a forwarded client request is not retried (a retry would be a new
        // write), so it is never duplicated.
        let duplicable = !matches!(env.msg, SimMsg::Core(PeerMsg::Forward { .. }));
        let copies = if duplicable
            && self.faults
            && self.rng.gen_range(0..1000) < self.params.dup_permille
        {
            2
        } else {
            1
        };
        self.injected.1 += copies - 1;
        for _ in 0..copies {
            let delay = self.rng.gen_range(1..=self.params.delay_max_ms);
            self.schedule(delay, Event::Deliver(env.clone()));
        }
    }

    fn deliver(&mut self, env: Envelope) {
        let Envelope {
            from,
            to,
            to_incarnation,
            from_incarnation,
            msg,
        } = env;
        if self.nodes[to].incarnation != to_incarnation || self.nodes[to].core.is_none() {
            return;
        }
        if !self.reachable(from, to) {
            return;
        }
        if !msg.is_answer() {
            if self.nodes[from].incarnation != from_incarnation {
                // The requester restarted: its connection, and so this request, is gone.
                return;
            }
            // Nothing waits for a heartbeat's answer: not recorded (it would pile up).
            if !msg.is_heartbeat() {
                self.owed.insert((to, from, msg.id()), from_incarnation);
            }
        }
        if let SimMsg::Core(PeerMsg::ReplicaPut {
            id, key, object, ..
        }) = &msg
        {
            self.puts
                .insert((to, from, *id), (key.clone(), object.clone()));
        }
        if let SimMsg::Core(PeerMsg::HintCreditOk { id, granted }) = &msg {
            assert!(
                *granted <= HINT_CREDIT_MAX,
                "node {} granted {granted} hints, above the limit",
                from + 1
            );
            // A duplicated request is answered twice; the holder uses the first answer.
            self.grants
                .entry((to, to_incarnation, *id))
                .or_insert(*granted);
        }
        self.mix(0x1000 + to as u64);
        if self.verbose {
            println!(
                "{:>6} node-{} <- node-{}: {msg:?}",
                self.now,
                to + 1,
                from + 1
            );
        }
        let now = self.now;
        let from_id = self.nodes[from].id;
        match msg {
            SimMsg::Core(msg) => {
                let outputs = self.core(to).handle_peer(now, from_id, msg);
                self.outputs(to, outputs);
            }
            SimMsg::Member(msg) => {
                if let Some(m) = self.nodes[to].membership.as_mut() {
                    let outputs = m.handle_msg(now, Some(from_id), msg);
                    self.member_outputs(to, outputs);
                }
            }
        }
    }

    /// An acknowledged replica write is stored: what node `n` holds for the key (durably, if it
    /// said so) already contains the object it was sent.
    fn check_ack(&mut self, n: usize, requester: usize, id: u64, durable: bool) {
        let Some((key, object)) = self.puts.remove(&(n, requester, id)) else {
            return;
        };
        let store = &self.nodes[n].store;
        let held = if durable {
            store.durable.get(&key).cloned()
        } else {
            store.read(&key)
        };
        let contains = held
            .as_ref()
            .is_some_and(|h| h.clone().merge(object.clone()) == *h);
        assert!(
            contains,
            "node {} acknowledged a replica write of {key:?} (durable: {durable}) it does not hold",
            n + 1
        );
    }

    /// Hint credit (module docs): every window of node `n` uses a grant its home sent, and has
    /// no more hints in flight than that grant.
    fn check_credit(&self, n: usize) {
        let node = &self.nodes[n];
        let Some(core) = node.core.as_ref() else {
            return;
        };
        let mut in_flight = 0;
        for w in core.hint_windows() {
            let sent = self.grants.get(&(n, node.incarnation, w.grant_id));
            assert_eq!(
                sent,
                Some(&w.granted),
                "node {} uses a grant of {} from {} that the home did not send ({sent:?})",
                n + 1,
                w.granted,
                w.home
            );
            assert!(
                w.in_flight <= w.granted,
                "node {} has {} hints in flight to {}, above the {} granted",
                n + 1,
                w.in_flight,
                w.home,
                w.granted
            );
            in_flight += w.in_flight as usize;
        }
        assert_eq!(
            in_flight,
            core.hints_in_flight(),
            "node {}: every hint in flight belongs to a window",
            n + 1
        );
    }

    fn outputs(&mut self, n: usize, outputs: Vec<Output>) {
        for out in outputs {
            if self.verbose {
                println!("{:>6} node-{} {out:?}", self.now, n + 1);
            }
            match out {
                Output::Send { to, msg } => {
                    let to = node_index(to);
                    self.mix(0x2000 + to as u64);
                    self.send(n, to, SimMsg::Core(msg));
                }
                Output::Scan {
                    id,
                    partition,
                    after,
                    max_items,
                    ..
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
                    // As the engine does: the drop is durable before it is reported.
                    let store = &mut self.nodes[n].store;
                    store.sync();
                    store
                        .durable
                        .retain(|k, _| !(k.partition == partition && k.space == Space::Primary));
                    let now = self.now;
                    let outputs = self.core(n).partition_dropped(now, partition);
                    self.outputs(n, outputs);
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

    fn client_start(&mut self, c: usize) {
        if !matches!(self.clients[c].state, ClientState::Idle) {
            return;
        }
        if self.clients[c].ops_left == 0 {
            self.clients[c].state = ClientState::Done;
            return;
        }
        self.clients[c].ops_left -= 1;
        let kind = match self.rng.gen_range(0..11) {
            0..=3 => WriteKind::Register,
            4..=6 => WriteKind::SetAdd,
            7 => WriteKind::Blind,
            8 | 9 => WriteKind::Lww,
            _ => WriteKind::Delete,
        };
        // Sets live on their own keys: a register write would legitimately replace a set.
        let key = self.rng.gen_range(0..self.params.keys)
            + if matches!(kind, WriteKind::SetAdd) {
                SET_KEYS
            } else {
                0
            };
        match kind {
            WriteKind::Blind | WriteKind::Lww => {
                let bucket = if matches!(kind, WriteKind::Lww) {
                    LWW_BUCKET
                } else {
                    SIBLINGS_BUCKET
                };
                self.client_write(c, bucket, key, kind, Vec::new(), None);
            }
            WriteKind::Register | WriteKind::SetAdd | WriteKind::Delete => {
                self.clients[c].state = ClientState::Reading {
                    key,
                    bucket: SIBLINGS_BUCKET,
                    kind,
                };
                let message = Message::Get(Get {
                    bucket: Bytes::from_static(SIBLINGS_BUCKET),
                    key: key_bytes(key),
                    r: None,
                    timeout_ms: None,
                });
                self.client_send(c, message);
            }
        }
    }

    fn client_send(&mut self, c: usize, message: Message) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        // A random live node; if none is up the request fails at once.
        let up: Vec<usize> = (0..self.client_nodes)
            .filter(|&n| self.nodes[n].core.is_some())
            .collect();
        if up.is_empty() {
            self.client_failed(c, req);
            return req;
        }
        let n = up[self.rng.gen_range(0..up.len())];
        self.requests.insert((n, req), c);
        self.client_request(n, req, message);
        req
    }

    fn client_request(&mut self, n: usize, req: u64, message: Message) {
        let now = self.now;
        let outputs = self.core(n).handle_client(now, req, message);
        self.outputs(n, outputs);
    }

    fn client_write(
        &mut self,
        c: usize,
        bucket: &'static [u8],
        key: usize,
        kind: WriteKind,
        saw: Vec<Bytes>,
        context: Option<Bytes>,
    ) {
        self.clients[c].seq += 1;
        let tag = format!("c{c}s{}", self.clients[c].seq);
        let (value, element) = match kind {
            WriteKind::SetAdd => {
                // The set is the union of every sibling read, plus the new element.
                let mut set: BTreeSet<String> = BTreeSet::new();
                for v in &saw {
                    set.extend(decode_set(v));
                }
                set.insert(tag.clone());
                (encode_set(&tag, &set), Some(tag.clone()))
            }
            _ => (Bytes::from(format!("{tag}|")), None),
        };
        let id = self.writes.len() as u64;
        self.writes.insert(
            id,
            WriteRecord {
                bucket,
                key,
                value: value.clone(),
                saw,
                element,
                acked: false,
                started_at: self.now,
                acked_at: None,
            },
        );
        self.by_value.insert(value.clone(), id);
        self.clients[c].state = ClientState::Writing { write: id };
        let message = Message::Put(Put {
            bucket: Bytes::from_static(bucket),
            key: key_bytes(key),
            value,
            context,
            w: None,
            dw: None,
            timeout_ms: None,
        });
        self.client_send(c, message);
    }

    fn client_delete(&mut self, c: usize, key: usize, saw: Vec<Bytes>, context: Option<Bytes>) {
        self.deletes.push(DeleteRecord {
            key,
            saw,
            acked: false,
        });
        self.clients[c].state = ClientState::Deleting {
            delete: self.deletes.len() - 1,
        };
        let message = Message::Delete(Delete {
            bucket: Bytes::from_static(SIBLINGS_BUCKET),
            key: key_bytes(key),
            context,
            w: None,
            dw: None,
            timeout_ms: None,
        });
        self.client_send(c, message);
    }

    fn client_failed(&mut self, c: usize, _req: u64) {
        if c == usize::MAX {
            return;
        }
        if c == HARNESS {
            self.harness_reply = Some(Message::Error(ringkv_net::ErrorBody::new(
                ringkv_net::ErrorCode::Internal,
                "no node answered",
            )));
            return;
        }
        self.clients[c].state = ClientState::Idle;
        let pause = self.rng.gen_range(1..50);
        self.schedule(pause, Event::ClientStart { client: c });
    }

    fn reply(&mut self, n: usize, req: u64, message: Message) {
        let Some(c) = self.requests.remove(&(n, req)) else {
            return;
        };
        self.mix(0x3000 + req);
        if c == HARNESS {
            self.harness_reply = Some(message);
            return;
        }
        if c == usize::MAX {
            let (bucket, k) = self.final_keys[&req];
            let result = match message {
                Message::GetOk(ok) => {
                    let values = self.check_read(bucket, &ok.siblings);
                    Ok((values, ok.context))
                }
                other => Err(format!("{other:?}")),
            };
            self.final_reads.insert((bucket.to_vec(), k), result);
            return;
        }
        match (self.clients[c].state.clone(), message) {
            (ClientState::Reading { key, bucket, kind }, Message::GetOk(ok)) => {
                let values = self.check_read(bucket, &ok.siblings);
                let context = (!ok.context.is_empty()).then_some(ok.context);
                if let (WriteKind::Register, Some(ctx)) = (kind, &context) {
                    self.stale
                        .entry(key)
                        .or_insert_with(|| (ctx.clone(), values.clone()));
                }
                match kind {
                    WriteKind::Delete => self.client_delete(c, key, values, context),
                    _ => self.client_write(c, bucket, key, kind, values, context),
                }
            }
            (ClientState::Deleting { delete }, Message::DeleteOk) => {
                self.deletes[delete].acked = true;
                self.clients[c].state = ClientState::Idle;
                let pause = self.rng.gen_range(1..30);
                self.schedule(pause, Event::ClientStart { client: c });
            }
            (ClientState::Writing { write }, Message::PutOk(_)) => {
                let now = self.now;
                let record = self
                    .writes
                    .get_mut(&write)
                    .expect("a write being acknowledged was recorded");
                record.acked = true;
                record.acked_at = Some(now);
                self.clients[c].state = ClientState::Idle;
                let pause = self.rng.gen_range(1..30);
                self.schedule(pause, Event::ClientStart { client: c });
            }
            (_, _) => self.client_failed(c, req),
        }
    }

    /// Checks a read's siblings (none saw another; lww has one) and returns their values.
    fn check_read(&mut self, bucket: &[u8], siblings: &[Sibling]) -> Vec<Bytes> {
        let values: Vec<Bytes> = siblings
            .iter()
            .filter_map(|s| match s {
                Sibling::Value(v) => Some(v.clone()),
                Sibling::Tombstone => None,
            })
            .collect();
        if bucket == LWW_BUCKET {
            assert!(
                siblings.len() <= 1,
                "an lww read returned {} siblings",
                siblings.len()
            );
        }
        if values.len() > 1 {
            self.sibling_reads += 1;
        }
        for a in &values {
            let seen = self.seen_by(a);
            for b in &values {
                assert!(
                    a == b || !seen.contains(b),
                    "siblings {a:?} and {b:?} are not concurrent: the write of the first saw \
                     the second"
                );
            }
        }
        values
    }

    /// Every value the write of `value` saw, transitively.
    fn seen_by(&self, value: &Bytes) -> BTreeSet<Bytes> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![value.clone()];
        while let Some(v) = todo.pop() {
            let Some(id) = self.by_value.get(&v) else {
                continue;
            };
            for s in &self.writes[id].saw {
                if seen.insert(s.clone()) {
                    todo.push(s.clone());
                }
            }
        }
        seen
    }

    fn check_final(&self) {
        for n in &self.nodes {
            let stored: Vec<StoreKey> = n
                .store
                .keys()
                .into_iter()
                .filter(|k| matches!(k.space, Space::Hint(_)))
                .collect();
            assert!(
                stored.is_empty(),
                "node {} still stores hints: {stored:?}",
                n.id
            );
            if n.retired {
                // It handed everything off before it stopped.
                let kept = n.store.keys();
                assert!(
                    kept.is_empty(),
                    "node {} retired still holding {kept:?}",
                    n.id
                );
                continue;
            }
            let core = n.core.as_ref().expect("every node is up at the end");
            let hints: Vec<_> = core.hints().collect();
            assert!(
                hints.is_empty(),
                "node {} still holds hints ({} in flight): {hints:?}",
                n.id,
                core.hints_in_flight()
            );
        }
        // Values a delete superseded: what its read returned, and what those writes saw.
        let mut deleted: BTreeMap<usize, BTreeSet<Bytes>> = BTreeMap::new();
        for d in &self.deletes {
            let set = deleted.entry(d.key).or_default();
            for v in &d.saw {
                set.insert(v.clone());
                set.extend(self.seen_by(v));
            }
        }
        // A deleted value never comes back: no final sibling is a value an acknowledged delete
        // superseded (tombstone reaping must not let an older copy return).
        for d in self.deletes.iter().filter(|d| d.acked) {
            let Some(Ok((values, _))) = self.final_reads.get(&(SIBLINGS_BUCKET.to_vec(), d.key))
            else {
                panic!("final read of k{} failed", d.key);
            };
            for v in values {
                let superseded =
                    d.saw.contains(v) || d.saw.iter().any(|s| self.seen_by(s).contains(v));
                assert!(
                    !superseded,
                    "deleted value {v:?} of k{} came back: final siblings {values:?}",
                    d.key
                );
            }
        }
        // Every acknowledged write survives, or was seen by a surviving write, or was
        // superseded by a delete.
        for w in self.writes.values().filter(|w| w.acked) {
            let Some(Ok((values, _))) = self.final_reads.get(&(w.bucket.to_vec(), w.key)) else {
                panic!(
                    "final read of {}/k{} failed: {:?}",
                    String::from_utf8_lossy(w.bucket),
                    w.key,
                    self.final_reads.get(&(w.bucket.to_vec(), w.key))
                );
            };
            if w.bucket == LWW_BUCKET {
                // Last-write-wins loses concurrent writes by design, but never to a write with
                // a lower stamp (whether or not that one was acknowledged), and never to one
                // that was acknowledged before it started (all nodes share the virtual clock).
                assert_eq!(values.len(), 1, "an lww key lost every write");
                let stamps = |v: &Bytes| {
                    self.lww_stamps
                        .get(v)
                        .expect("a stored lww value has the stamps it was stored with")
                };
                let (lost, won) = (stamps(&w.value), stamps(&values[0]));
                assert!(
                    won.last() >= lost.first(),
                    "lww write {:?} (stamps {lost:?}) lost to {:?} (stamps {won:?})",
                    w.value,
                    values[0],
                );
                let winner = self
                    .by_value
                    .get(&values[0])
                    .map(|id| &self.writes[id])
                    .expect("the final lww value was written by a client");
                if let Some(acked_at) = winner.acked_at {
                    assert!(
                        w.started_at <= acked_at,
                        "lww write {:?} started after {:?} was acknowledged, yet lost to it",
                        w.value,
                        winner.value
                    );
                }
                continue;
            }
            let present = values.contains(&w.value)
                || values.iter().any(|f| self.seen_by(f).contains(&w.value))
                || deleted.get(&w.key).is_some_and(|d| d.contains(&w.value));
            assert!(
                present,
                "acknowledged write {:?} to k{} is lost: final siblings {:?}",
                w.value, w.key, values
            );
            if let Some(element) = &w.element {
                let union: BTreeSet<String> = values.iter().flat_map(decode_set).collect();
                assert!(
                    union.contains(element),
                    "acknowledged set element {element} is lost"
                );
            }
        }
        // Every node has the final ring, and no node keeps replica data it does not replicate.
        let ring = self.final_ring();
        for n in self.nodes.iter().filter(|n| !n.retired) {
            let core = n.core.as_ref().expect("every node is up at the end");
            assert_eq!(core.ring(), &ring, "{} runs an older ring", n.id);
            for key in n.store.keys() {
                if key.space == Space::Primary {
                    let homes = ring.preference_list(PartitionId(key.partition), 3);
                    assert!(
                        homes.contains(&n.id),
                        "{} still holds {key:?} of a partition it does not replicate",
                        n.id
                    );
                }
            }
        }
        // Home replicas converged, and each home holds something for a key with an
        // acknowledged write that the final read found.
        for (bucket, k) in self.all_keys() {
            let written = self
                .writes
                .values()
                .any(|w| w.bucket == bucket && w.key == k && w.acked);
            let read_values = self
                .final_reads
                .get(&(bucket.to_vec(), k))
                .is_some_and(|r| r.as_ref().is_ok_and(|(v, _)| !v.is_empty()));
            if written && read_values {
                let (home, object) = self.home_objects(&ring, bucket, k).swap_remove(0);
                assert!(object.is_some(), "home {home} has nothing for k{k}");
            }
        }
        let differ = self.homes_differ(&ring);
        assert!(differ.is_empty(), "home replicas differ: {differ:?}");
    }

    /// What each home of `bucket`/`k` in `ring` stores for it, first home first.
    fn home_objects(
        &self,
        ring: &Ring,
        bucket: &'static [u8],
        k: usize,
    ) -> Vec<(NodeId, Option<Object>)> {
        let key = key_bytes(k);
        let partition = ring.partition_of(bucket, &key);
        let store_key = StoreKey {
            partition: partition.0,
            space: Space::Primary,
            bucket: Bytes::from_static(bucket),
            key,
        };
        ring.preference_list(partition, 3)
            .into_iter()
            .map(|h| (h, self.nodes[node_index(h)].store.read(&store_key)))
            .collect()
    }

    /// The keys whose homes in `ring` store different objects, with what each home holds.
    fn homes_differ(&self, ring: &Ring) -> Vec<String> {
        let mut out = Vec::new();
        for (bucket, k) in self.all_keys() {
            let objects = self.home_objects(ring, bucket, k);
            if objects.iter().any(|(_, o)| o != &objects[0].1) {
                out.push(format!(
                    "{}/k{k}: {objects:?}",
                    String::from_utf8_lossy(bucket)
                ));
            }
        }
        out
    }
}

/// What `ringkv serve` resolves with no flags and no config file.
fn default_settings() -> Settings {
    Settings::resolve(FileConfig::default(), FileConfig::default())
        .expect("the default settings resolve")
}

fn encode_set(tag: &str, set: &BTreeSet<String>) -> Bytes {
    let elements: Vec<&str> = set.iter().map(String::as_str).collect();
    Bytes::from(format!("{tag}|{}", elements.join(",")))
}

fn decode_set(v: &Bytes) -> BTreeSet<String> {
    let text = String::from_utf8_lossy(v);
    match text.split_once('|') {
        Some((_, rest)) if !rest.is_empty() => rest.split(',').map(str::to_owned).collect(),
        _ => BTreeSet::new(),
    }
}
