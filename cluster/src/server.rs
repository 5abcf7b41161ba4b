//! The glommio shell of a node: one executor per shard, listeners, connections, the channel mesh
//! between shards, and shutdown.
//!
//! One module per effect; this file holds what they share (the settings, the errors, the
//! [`Shard`] state every task of a shard holds, and the mesh messages):
//!
//! | module | what it does |
//! |---|---|
//! | [`lifecycle`] | [`serve`]: checks, the signal executor, one executor per shard, the wait for their ends |
//! | [`shard`] | one shard's life: engine, epochs, meshes, core, serving, drain, close |
//! | [`request`] | request routing: the owning shard (here or over the mesh), deadlines, counting |
//! | [`driver`] | carries out the core's outputs; its timers and admission control |
//! | [`store`] | the replica store: the core's storage operations on the engine, scans |
//! | [`links`] | the peer transport: outbound links, HELLO, peer requests arriving |
//! | [`connection`] | client and RESP connections and the accept loops |
//! | [`frames`] | the read buffer every connection decodes from |
//! | [`readiness`] | one edge-triggered epoll set per shard that wakes accepted sockets' readers |
//! | [`admin`] | the admin HTTP listener |
//! | [`members`], [`view`] | the node's membership on shard 0 and the view every shard works from |
//! | [`trees`] | building the anti-entropy trees from the engine after a start |
//! | [`stop`] | the stop signal tasks wait on |
//!
//! [`serve`] checks that nothing listens on the listen address (glommio's listener always sets
//! SO_REUSEPORT, so a second node would otherwise silently share the port; connections left over
//! from a crashed run do not count) and that the kernel gives the process io_uring and enough
//! locked memory ([`crate::preflight`]), blocks SIGTERM and SIGINT, starts a small signal executor
//! that reports the first signal, and one `LocalExecutor` per shard, pinned to its CPU when each
//! shard has one of its own and otherwise free over the allowed CPUs ([`ShardCpus`]). Each shard
//! opens its own engine in `<data-dir>/shard-<i>`, binds its own listener on the shared address,
//! joins two channel meshes (requests and replies between shards) and accepts connections. The
//! thread that called [`serve`] holds the one cancellation token every executor watches and waits
//! for the shards to end.
//!
//! A connection is a reader task and a writer task joined by a bounded queue. The reader decodes
//! frames, asks the [`Session`] what each one means and spawns one task per GET/PUT/DELETE, so
//! replies leave in completion order (pipelining with out-of-order replies). At most
//! [`ServeConfig::inflight_per_connection_max`] requests run per connection; beyond that the reader
//! stops reading and TCP pushes back. A request whose partition belongs to another shard crosses
//! the request mesh as the decoded [`Message`] (never re-encoded), the owner executes it and sends
//! the reply back over the reply mesh, where a waiting table routes it to the request's task.
//! With `resp_listen` set, each shard also listens for Redis clients ([`crate::resp`] maps their
//! commands onto the same requests; pipelined commands on distinct keys run together, commands
//! on one key in order, and replies stay in command order, as RESP requires).
//! A frame the codec rejects gets the codec's error frame; unless the codec says the stream can
//! continue, the connection then stops reading, finishes what is in flight and closes. Other
//! connections are not affected.
//!
//! Shutdown, on the first SIGTERM or SIGINT: every shard stops accepting, stops reading from its
//! connections, lets in-flight requests finish and their replies be written (for at most
//! [`ServeConfig::shutdown_drain_ms`]; a connection whose client stopped reading is then dropped,
//! its requests still finish in the engine), closes its side of the
//! request mesh, keeps serving other shards' requests until they have all closed theirs, then
//! closes (flushes and syncs) its engine. [`serve`] returns once every shard has done so.
//!
//! # Replication
//!
//! Every shard runs one [`Core`] (the sans-IO coordinator) for the partitions it owns. A client
//! GET, PUT or DELETE reaches the owner shard as before and is handed to its core; the shell
//! carries out the core's [`Output`]s: storage operations on the shard's engine (objects encoded
//! with [`Object::encode`]; hints in their own engine partitions, see [`crate::peer`]), replies
//! to the waiting request task, and messages to other nodes. Time reaches the core through a
//! ticker that wakes every [`TICK_MS`] and calls `handle_tick` when `next_deadline` has passed
//! (a fixed period keeps the shell simple; the cost is up to one tick of lateness on timeouts).
//! Its clock is wall-clock milliseconds at startup plus monotonic time since, so last-write-wins
//! timestamps compare across nodes and never go backwards within a run.
//!
//! Peer links: every shard listens on `peer_listen` (SO_REUSEPORT, like the other listeners) and
//! keeps at most one outbound connection per remote node, opened lazily on the first message,
//! greeted with HELLO (role peer, `<id>@<name>`), fed by a bounded queue (a full queue drops the
//! message; the core times it out). A failed connect or a lost connection is reported to the core
//! (`handle_unreachable`), and the next connect waits a backoff that doubles from
//! [`PEER_BACKOFF_MIN_MS`] to [`PEER_BACKOFF_MAX_MS`]. A link gives every request it carries a
//! wire id of its own and remembers whose request it is (the core's, or on shard 0
//! membership's), so an answer on an outbound connection goes back to whoever sent the request
//! ([`links`]). A request arriving on an inbound peer
//! connection goes to the shard owning its partition (over the mesh when that is another shard),
//! whose core executes it; the answer returns on the same connection with the same request id.
//!
//! Anti-entropy trees: a shard serves as soon as its engine is open and every shard has started;
//! its core's Merkle trees are then built from the engine in the background ([`trees`]), and
//! anti-entropy leaves each partition alone until its trees are built.
//!
//! Membership: shard 0 owns the node's [`ringkv_core::membership::Membership`] (restored from
//! `<data-dir>/cluster-state`, else bootstrapped from the seeds) and its shell, [`members`]:
//! ADMIN frames from any shard and CLUSTER frames without a partition reach it there. Every
//! shard takes its ring and its peer addresses from the latest view shard 0 published over a
//! third mesh ([`view`]); a link to a member that was removed or moved is closed.
//!
//! A shard that fails (its executor cannot be created, its engine does not open, a listener
//! cannot be bound, or it panics) ends the node the same way: its end cancels the token, shards
//! still starting stop waiting for the mesh, every engine that was opened is closed (flushed,
//! synced, its directory lock released), and [`serve`] returns the first error, the root cause,
//! once every shard has ended; errors that follow it while stopping are logged.
//!
//! Limits: a shard still recovering its engine when another fails finishes the recovery before it
//! stops (opening cannot be interrupted), so a failed start can take as long as a recovery. A
//! shard that panics or whose engine cannot be handed back at close drops its engine unclosed,
//! which the next start recovers like a crash. A request's deadline (`timeout_ms`, or
//! `request_timeout_ms`) bounds when it is answered, not the work: timed-out work runs to its end
//! (see `Shard::execute_at_once`).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use glommio::TaskQueueHandle;
use glommio::channels::channel_mesh::Senders;
use glommio::sync::Gate;
use ringkv_engine::Engine;
use ringkv_net::limits::{PUT_OVERHEAD_BYTES_MAX, VALUE_BYTES_MAX};
use ringkv_net::{Admin, ErrorBody, ErrorCode, Limits, Message};

use ringkv_core::admission::AdmissionController;
use ringkv_core::coordinator::Core;

use crate::config::{self, Settings};
pub use crate::error::ServeError;
use crate::identity::Identity;
use crate::metrics::ShardMetrics;
use crate::peer::PeerRequest;
use crate::session::NodeInfo;
use ringkv_core::NodeId;
use ringkv_core::request::KeyRequest;

mod admin;
mod connection;
mod driver;
mod frames;
mod lifecycle;
mod links;
mod members;
mod readiness;
mod request;
mod shard;
mod stop;
mod store;
mod trees;
mod view;

use driver::BackgroundShares;
pub use lifecycle::serve;

use stop::StopToken;
use view::Control;

/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Most reply bytes gathered into one write.
const WRITE_BATCH_BYTES_MAX: usize = 64 << 10;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY_DELAY_MS: u64 = 10;
/// ADMIN command that drops every hint the node holds (`ringkv cluster truncate-hints`).
pub const HINTS_TRUNCATE: &str = "hints-truncate";
/// The per-shard part of [`HINTS_TRUNCATE`], sent between shards only.
const HINTS_TRUNCATE_SHARD: &str = "hints-truncate-shard";

/// Period of the ticker that drives each core's timeouts and hinted handoff.
pub const TICK_MS: u64 = 10;
/// CPU shares of the background queue at the full background share (foreground: 1000).
pub const BACKGROUND_SHARES_MAX: usize = 250;
/// Frames queued for one peer node before further ones are dropped (the core times them out).
pub const PEER_QUEUE_FRAMES_MAX: usize = 4096;
/// First wait before reconnecting to a peer after a failed connect or a lost connection.
pub const PEER_BACKOFF_MIN_MS: u64 = 50;
/// Longest wait between reconnection attempts to a peer. Frames queued meanwhile wait for the
/// next attempt, so this must stay well below the replica timeout (1 s by default): a peer that
/// returns is reached within it. A down peer still costs at most one connect per shard per
/// this interval, and only while something is queued for it (heartbeats once a second,
/// last-resort replica requests).
pub const PEER_BACKOFF_MAX_MS: u64 = 250;
/// Most 1 ms waits at shutdown for request tasks to let go of the shard.
const STOP_POLLS_MAX: usize = 1000;
/// Request id of the HELLO on an outbound peer connection. The HELLO is answered before any
/// request is written, so the id only has to differ from nothing; a link's request ids count up
/// from 1 and never reach it anyway.
const PEER_HELLO_ID: u64 = u64::MAX;

/// What a node runs with: its resolved settings, and what the caller resolved from them for
/// this machine and this start (CPUs, identity, peer addresses).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The node's settings, flags over file over defaults ([`Settings::resolve`]).
    pub settings: Settings,
    /// How many shards, and where they run.
    pub cpus: ShardCpus,
    /// This node's id.
    pub node_id: NodeId,
    /// The identity the caller resolved for `node_id` ([`identity::resolve`]); `None` makes
    /// [`serve`] resolve it. [`serve`] writes `<data-dir>/node-identity` if it is new.
    pub identity: Option<Identity>,
    /// Every other member's peer address.
    pub peers: BTreeMap<NodeId, SocketAddr>,
}

impl ServeConfig {
    /// A node with `settings`, its shards placed as `cpus` says, and no peers.
    pub fn new(settings: Settings, cpus: ShardCpus) -> Self {
        Self {
            node_id: settings.node_id.unwrap_or(NodeId(config::NODE_ID_DEFAULT)),
            settings,
            cpus,
            identity: None,
            peers: BTreeMap::new(),
        }
    }

    /// Each shard's share of the node's value cache (`serve` settles the node's budget first).
    fn cache_bytes_per_shard(&self) -> usize {
        let node = self
            .settings
            .cache_bytes
            .unwrap_or_else(crate::preflight::default_cache_bytes);
        let shards = u64::try_from(self.cpus.shards().max(1)).unwrap_or(u64::MAX);
        usize::try_from(node / shards).unwrap_or(usize::MAX)
    }

    /// Largest encoded object a shard stores or sends: the engine's hard value limit, and small
    /// enough that a REPLICA_PUT carrying it fits a frame.
    fn object_bytes_max(&self) -> usize {
        VALUE_BYTES_MAX.min(self.settings.limits.frame_bytes_max - PUT_OVERHEAD_BYTES_MAX)
    }
}

/// How many shards a node runs and where the kernel may run them.
///
/// Thread-per-core pays when a shard has a core to itself: its caches stay warm and nothing
/// else is scheduled under it. A node that shares its CPUs (fewer shards than the CPUs it may
/// use, or several nodes on one machine started with `--shards 1`) must not pin: every such node
/// would pin its first shard to the same first CPU and queue behind the others there while the
/// rest of the machine idles. Such shards float over the allowed CPUs and the kernel balances them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardCpus {
    /// Shard `i` runs pinned to CPU `cpus[i]`.
    Pinned(Vec<usize>),
    /// `shards` shards, each free to run on any CPU of `cpus`.
    Shared {
        /// Number of shards.
        shards: usize,
        /// The CPUs they may run on.
        cpus: Vec<usize>,
    },
}

impl ShardCpus {
    /// Placement for a process allowed to run on `allowed` that asked for `shards` shards (none:
    /// one per allowed CPU). Pinned exactly when every shard gets a CPU of its own and every
    /// allowed CPU gets a shard; otherwise shared.
    pub fn choose(allowed: Vec<usize>, shards: Option<usize>) -> Self {
        match shards {
            Some(n) if n != allowed.len() => Self::Shared {
                shards: n,
                cpus: allowed,
            },
            _ => Self::Pinned(allowed),
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        match self {
            Self::Pinned(cpus) => cpus.len(),
            Self::Shared { shards, .. } => *shards,
        }
    }

    /// Where each shard runs, for glommio, and the same in words for errors and logs. The online
    /// CPUs are read once, whatever the shard count.
    fn placements(&self) -> Result<Vec<(glommio::Placement, String)>, ServeError> {
        match self {
            Self::Pinned(cpus) => Ok(cpus
                .iter()
                .map(|&cpu| (glommio::Placement::Fixed(cpu), format!("CPU {cpu}")))
                .collect()),
            Self::Shared { shards, cpus } => {
                let set = glommio::CpuSet::online()
                    .map_err(|e| runtime("cannot list the online CPUs", e))?
                    .filter(|l| cpus.contains(&l.cpu));
                let words = format!("CPUs {cpus:?}");
                if set.is_empty() {
                    return Err(runtime(
                        format!("cannot start a shard on {words}"),
                        "none of them is online",
                    ));
                }
                Ok((0..*shards)
                    .map(|_| (glommio::Placement::Fenced(set.clone()), words.clone()))
                    .collect())
            }
        }
    }
}

fn runtime(what: impl Into<String>, e: impl std::fmt::Display) -> ServeError {
    ServeError::Runtime {
        what: what.into(),
        message: e.to_string(),
    }
}

/// What the shard and signal threads tell [`serve`] (on the thread that called it).
enum Event {
    /// The first SIGTERM or SIGINT arrived, or signals could no longer be read.
    Stop,
    /// The node must stop and exit with this error (its id belongs to another incarnation).
    Failed(ServeError),
    /// A shard ended. Without a result, its thread ended without running it to its end (the
    /// executor could not be built, or the shard panicked): joining the thread says why.
    ShardEnded {
        id: usize,
        result: Option<Result<(), ServeError>>,
    },
}

/// A GET, PUT or DELETE sent to the shard that owns its partition.
#[derive(Debug)]
struct ShardRequest {
    /// Chosen by the sending shard to match the reply; unique among its requests in flight.
    tag: u64,
    /// The sending shard, where the reply goes.
    origin: usize,
    /// What the owner runs.
    work: MeshWork,
}

/// What one shard asks another to run.
#[derive(Debug)]
enum MeshWork {
    /// A client's key request for a partition the receiving shard owns.
    Key(KeyRequest),
    /// A request from node `from` for a partition the receiving shard owns (or, without a
    /// partition, for the node: shard 0).
    Peer { from: NodeId, request: PeerRequest },
    /// An operator command, for shard 0 (or a shard's part of `hints-truncate`).
    Admin(Admin),
}

/// The answer to a [`ShardRequest`].
#[derive(Debug)]
struct ShardReply {
    tag: u64,
    message: Message,
}

/// Values kept under ids this table hands out, until their answer takes them: the one
/// correlation mechanism of the shell. A shard keeps one per kind of thing waiting:
///
/// - through [`Waiters`], tasks waiting for one answer each: client requests waiting for the
///   core's reply (`Output::Reply`), peer and membership requests waiting for an answer
///   (`Output::Answer`), requests sent to another shard waiting for its reply over
///   the mesh, and on shard 0 operator commands waiting for membership's answer;
/// - per outbound peer link, the owner of every request queued or sent on it (`links`): its
///   ids are the wire ids of the link's requests, so the core's and membership's requests
///   share the link without sharing an id space, and each answer goes back to its owner under
///   the owner's own id.
///
/// Ids count up from 1 in the order they are handed out, so 0 is never a live id and a
/// table's live ids are ordered by age.
struct Pending<V> {
    next: Cell<u64>,
    /// Hashed without a random seed: ids are not chosen by a peer, and every request inserts
    /// and removes one.
    entries: RefCell<rustc_hash::FxHashMap<u64, V>>,
}

impl<V> Default for Pending<V> {
    fn default() -> Self {
        Pending {
            next: Cell::new(1),
            entries: RefCell::new(HashMap::default()),
        }
    }
}

impl<V> Pending<V> {
    /// Keeps `value` under a new id, which it returns.
    fn insert(&self, value: V) -> u64 {
        let id = self.next.get();
        self.next.set(id + 1);
        let previous = self.entries.borrow_mut().insert(id, value);
        assert!(previous.is_none(), "id {id} handed out twice");
        id
    }

    /// The value kept under `id`, which the table forgets; `None` if it is not kept (never
    /// handed out, taken already, or forgotten).
    fn take(&self, id: u64) -> Option<V> {
        self.entries.borrow_mut().remove(&id)
    }

    /// `f` applied to the value kept under `id`, if it is kept.
    fn update<R>(&self, id: u64, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.entries.borrow_mut().get_mut(&id).map(f)
    }

    /// Forgets every entry for which `take` holds, handing them out.
    fn take_if(&self, mut take: impl FnMut(&V) -> bool) -> Vec<V> {
        self.entries
            .borrow_mut()
            .extract_if(|_, v| take(v))
            .map(|(_, v)| v)
            .collect()
    }

    /// Keeps only the entries for which `keep` holds.
    fn retain(&self, mut keep: impl FnMut(u64) -> bool) {
        self.entries.borrow_mut().retain(|id, _| keep(*id));
    }

    /// Entries kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.borrow().len()
    }
}

/// Tasks of a shard waiting for one answer each, by an id handed out by a [`Pending`] table.
///
/// An answer waits in the table until its task takes it; one whose waiter is gone (its deadline
/// passed, its connection closed: the [`Ticket`] was dropped) is dropped. No channel and no
/// allocation per request: a request answered at once (most buffered writes and cached reads)
/// costs an insertion and a removal.
struct Waiters<T = Message> {
    waiting: Pending<Answer<T>>,
}

/// A waiter's entry.
enum Answer<T> {
    /// Not answered yet; the waker of the task once it has looked.
    Awaited(Option<Waker>),
    /// Answered, not taken yet.
    Ready(T),
}

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Waiters {
            waiting: Pending::default(),
        }
    }
}

impl<T> Waiters<T> {
    /// A new id, and the ticket its answer is taken with.
    fn register(self: &Rc<Self>) -> Ticket<T> {
        Ticket {
            id: self.waiting.insert(Answer::Awaited(None)),
            table: self.clone(),
        }
    }

    /// Hands `message` to the task waiting on `id`, if it still waits.
    fn answer(&self, id: u64, message: T) {
        let waker = self.waiting.update(id, |entry| match entry {
            Answer::Awaited(waker) => {
                let waker = waker.take();
                *entry = Answer::Ready(message);
                waker
            }
            // Answered twice: the first answer stands.
            Answer::Ready(_) => None,
        });
        if let Some(waker) = waker.flatten() {
            waker.wake();
        }
    }

    /// Whether a waiter still waits on `id`: not yet answered, forgotten or cleared.
    fn waits(&self, id: u64) -> bool {
        self.waiting
            .update(id, |entry| matches!(entry, Answer::Awaited(_)))
            .unwrap_or(false)
    }

    /// Stops waiting on `id` (its waiter gave up).
    fn forget(&self, id: u64) {
        self.waiting.take(id);
    }

    /// Fails every waiter still awaiting its answer: each finds it will not come. An answer
    /// already given stays for its ticket: the work it reports was done (a write applied), and
    /// answering `shutting_down` instead would invite a retry that applies it twice.
    fn clear(&self) {
        for entry in self
            .waiting
            .take_if(|entry| matches!(entry, Answer::Awaited(_)))
        {
            if let Answer::Awaited(Some(waker)) = entry {
                waker.wake();
            }
        }
    }

    /// The answer to `id` if it came (taken from the table), `None` if it will not come
    /// (forgotten or cleared), or pending with `cx`'s waker kept.
    fn poll_answer(&self, id: u64, cx: &mut std::task::Context<'_>) -> Poll<Option<T>> {
        // A waker replaced is dropped after the table's borrow ends: dropping it may drop a task
        // that holds a ticket of this table.
        let mut replaced = None;
        let ready = self.waiting.update(id, |entry| match entry {
            Answer::Ready(_) => true,
            Answer::Awaited(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    replaced = waker.replace(cx.waker().clone());
                }
                false
            }
        });
        drop(replaced);
        match ready {
            None => Poll::Ready(None),
            Some(false) => Poll::Pending,
            Some(true) => match self.waiting.take(id) {
                Some(Answer::Ready(answer)) => Poll::Ready(Some(answer)),
                _ => Poll::Ready(None),
            },
        }
    }
}

/// The claim of one waiting task on its answer ([`Waiters::register`]); dropping it forgets the
/// id, so an answer that comes later is dropped, not kept.
struct Ticket<T = Message> {
    id: u64,
    table: Rc<Waiters<T>>,
}

impl<T> Ticket<T> {
    fn id(&self) -> u64 {
        self.id
    }

    /// The answer, or `None` if it will not come (the table was cleared: the shard stops).
    async fn recv(&self) -> Option<T> {
        std::future::poll_fn(|cx| self.table.poll_answer(self.id, cx)).await
    }
}

impl<T> Drop for Ticket<T> {
    fn drop(&mut self) {
        self.table.forget(self.id);
    }
}

/// One shard's state, shared by its tasks (never across threads).
struct Shard {
    id: usize,
    shard_count: usize,
    engine: Engine,
    info: NodeInfo,
    limits: Limits,
    inflight_per_connection_max: usize,
    requests: Senders<ShardRequest>,
    /// Requests sent to other shards, waiting for their replies over the mesh.
    waiting: Rc<Waiters>,
    metrics: Arc<ShardMetrics>,
    /// Every shard's metrics, for figures about the whole node (RESP's `DBSIZE`).
    all_metrics: Arc<[Arc<ShardMetrics>]>,
    request_timeout_ms: u64,
    replica_timeout_ms: u64,
    value_bytes_max: usize,
    /// The coordinator of this shard's partitions.
    core: RefCell<Core>,
    /// Admission control of background work, fed with client request latencies.
    admission: RefCell<AdmissionController>,
    /// Hint delivery's storage work; its shares follow the admission controller.
    background: TaskQueueHandle,
    background_shares: Rc<BackgroundShares>,
    clock: Clock,
    /// The time the core was last fed at ([`Shard::drive`]).
    fed_at: Cell<u64>,
    /// RESP connections accepted, for their ids.
    resp_clients: Cell<u64>,
    node_id: NodeId,
    node_name: String,
    cluster_name: String,
    /// Client requests waiting for the core's reply, by the id given to `handle_client`.
    clients: Rc<Waiters>,
    /// Peer requests waiting for the core's or membership's answer, by the id given to
    /// `handle_peer` or `handle_msg`.
    inbound: Rc<Waiters>,
    /// Outbound link of each peer node this shard has talked to: its queue and the owners of
    /// its requests.
    links: RefCell<HashMap<NodeId, links::Link>>,
    /// The node's membership (shard 0 only).
    members: Option<members::Driver>,
    /// Peer address of every other member, from the view in use.
    peers: RefCell<BTreeMap<NodeId, SocketAddr>>,
    /// Version of the view in use ([`view`]).
    view_version: Cell<u64>,
    /// The control mesh: views from shard 0 to the others.
    control: Senders<Control>,
    epochs_path: PathBuf,
    /// Whether this run keeps its floor file while it runs (`sync` durability).
    floor_file: bool,
    /// Storage operations and epoch renewals in flight; closed at shutdown.
    store_work: Gate,
    /// Storage operations that finished as they were issued, waiting to be fed to the core
    /// once the outputs that issued them are carried out ([`Shard::drive`]). Never holds more
    /// than one carry-out's operations: it is emptied before `drive` returns.
    finished: std::cell::RefCell<std::collections::VecDeque<driver::Input>>,
    /// Synced writes appended to the engine and waiting for their flush: (flush epoch, who
    /// waits: a core operation or a client's ticket), epochs in order. One watcher reports a
    /// whole flush's writes when it completes (`store.rs`), instead of a task per write.
    /// Bounded by the core's operations in flight and the connections' requests in flight
    /// (and, past their deadlines, by the flushes the disk still owes them).
    durable_waits: std::cell::RefCell<std::collections::VecDeque<(u64, store::DurableWait)>>,
    /// The watcher's waker while it waits for a first write.
    durable_watcher: Cell<Option<std::task::Waker>>,
    /// Cancelled at shutdown once no request can arrive any more: ends the ticker and links.
    stop: StopToken,
    foreground: TaskQueueHandle,
}

/// The core's clock: wall-clock milliseconds at startup plus monotonic time since.
#[derive(Clone, Copy, Debug)]
struct Clock {
    base_unix_ms: u64,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        let base_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2));
        Clock {
            base_unix_ms,
            start: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// The clock's time at `at` (a reading taken earlier, or the start for one before it).
    fn ms_at(&self, at: Instant) -> u64 {
        let elapsed = at.saturating_duration_since(self.start).as_millis();
        self.base_unix_ms
            .saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX / 2))
    }
}

fn error_message(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error(ErrorBody::new(code, message))
}

/// The answer to a request whose shard closed its table of waiters before answering.
fn shard_stopped() -> Message {
    error_message(ErrorCode::ShuttingDown, "the shard stopped")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Wake};

    use super::*;

    /// Pinned only with exactly one shard per allowed CPU; fewer or more shards share the CPUs.
    #[test]
    fn shards_pin_only_when_each_has_a_cpu() {
        let allowed = vec![2, 5];
        assert_eq!(
            ShardCpus::choose(allowed.clone(), None),
            ShardCpus::Pinned(vec![2, 5])
        );
        assert_eq!(
            ShardCpus::choose(allowed.clone(), Some(2)),
            ShardCpus::Pinned(vec![2, 5])
        );
        for n in [1, 3] {
            let chosen = ShardCpus::choose(allowed.clone(), Some(n));
            assert_eq!(
                chosen,
                ShardCpus::Shared {
                    shards: n,
                    cpus: vec![2, 5]
                }
            );
            assert_eq!(chosen.shards(), n);
        }
    }

    /// Counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An empty table, and a waker whose wakes `Count` counts.
    fn table_and_waker() -> (Rc<Waiters<u32>>, Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        (Rc::new(Waiters::default()), count, waker)
    }

    fn poll(ticket: &Ticket<u32>, waker: &Waker) -> Poll<Option<u32>> {
        ticket
            .table
            .poll_answer(ticket.id(), &mut Context::from_waker(waker))
    }

    /// An answer before the task looks is kept for it; one after wakes it; either is taken once
    /// and leaves nothing behind.
    #[test]
    fn answers_reach_their_ticket_early_or_late() {
        let (table, count, waker) = table_and_waker();
        let early = table.register();
        table.answer(early.id(), 1);
        assert!(!table.waits(early.id()));
        assert_eq!(poll(&early, &waker), Poll::Ready(Some(1)));
        assert_eq!(table.waiting.len(), 0);

        let late = table.register();
        assert_eq!(poll(&late, &waker), Poll::Pending);
        assert!(table.waits(late.id()));
        table.answer(late.id(), 2);
        table.answer(late.id(), 3);
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "woken once");
        assert_eq!(
            poll(&late, &waker),
            Poll::Ready(Some(2)),
            "the first answer"
        );
        assert_eq!(table.waiting.len(), 0);
    }

    /// A dropped ticket forgets its id, so an answer that comes later is not kept; clearing
    /// wakes every waiter still awaiting, which then finds no answer will come, and keeps an
    /// answer already given for its ticket.
    #[test]
    fn dropped_tickets_keep_nothing_and_clearing_wakes_waiters() {
        let (table, count, waker) = table_and_waker();
        let gone = table.register();
        let id = gone.id();
        drop(gone);
        table.answer(id, 1);
        assert_eq!(table.waiting.len(), 0);

        let answered = table.register();
        table.answer(answered.id(), 2);
        drop(answered);
        assert_eq!(
            table.waiting.len(),
            0,
            "an answer not taken goes with its ticket"
        );

        let waiting = table.register();
        assert_eq!(poll(&waiting, &waker), Poll::Pending);
        let answered = table.register();
        table.answer(answered.id(), 4);
        table.clear();
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert_eq!(poll(&waiting, &waker), Poll::Ready(None));
        assert_eq!(
            poll(&answered, &waker),
            Poll::Ready(Some(4)),
            "an answer given before the clearing is still taken"
        );
    }
}
