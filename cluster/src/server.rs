//! The glommio shell of a node: one executor per shard, listeners, connections, the channel mesh
//! between shards, and shutdown.
//!
//! [`serve`] checks that nothing listens on the listen address (glommio's listener always sets
//! SO_REUSEPORT, so a second node would otherwise silently share the port; connections left over
//! from a crashed run do not count) and that the kernel gives the process io_uring and enough
//! locked memory ([`crate::preflight`]), blocks SIGTERM and SIGINT, starts a small signal executor
//! that reports the first signal, and one `LocalExecutor` per shard pinned to its CPU
//! (`Placement::Fixed`). Each shard opens its own engine in `<data-dir>/shard-<i>`, binds its own
//! listener on the shared address, joins two channel meshes (requests and replies between shards)
//! and accepts connections. The thread that called [`serve`] holds the one cancellation token
//! every executor watches and waits for the shards to end.
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
//! [`PEER_BACKOFF_MIN_MS`] to [`PEER_BACKOFF_MAX_MS`]. Answers on an outbound connection go to the
//! core of the shard that owns it, which sent the request. A request arriving on an inbound peer
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
//! (see `Shard::execute`).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{CancellationToken as NodeStop, ForeignCancellation, Gate, Semaphore};
use glommio::{
    ExecutorJoinHandle, Latency, LocalExecutorBuilder, Placement, Shares, TaskQueueHandle,
    yield_if_needed,
};
use ringkv_engine::{Durability, Engine, EngineConfig, EngineError};
use ringkv_net::limits::{PUT_OVERHEAD_BYTES_MAX, VALUE_BYTES_MAX};
use ringkv_net::resp::{RespLimits, decode_command, encode_reply as encode_resp};
use ringkv_net::{
    Admin, AdminOk, ErrorBody, ErrorCode, Frame, Hello, Limits, Message, PROTOCOL_VERSION, Role,
    decode_frame, encode_frame,
};

use ringkv_core::admission::{AdmissionConfig, AdmissionController};
use ringkv_core::bucket::{BucketProps, Buckets};
use ringkv_core::coordinator::{
    Core, CoreConfig, EpochLease, Output, PeerMsg, ScanItem, ScanPage, StoreKey, StoreOp,
    hint_bytes,
};
use ringkv_core::membership::{Membership, MembershipConfig};
use ringkv_core::object::Object;
use ringkv_core::ring::PartitionId;

use crate::cluster_state;
use crate::config;
use crate::epochs::{self, EPOCH_LEASE_SIZE, EPOCHS_FILE};
use crate::identity::{self, Identity};
use crate::metrics::{self, CoreFigures, Op, ShardMetrics};
use crate::peer::{self, HINT_KEY_PREFIX_BYTES, HINT_PARTITION_BASE};
use crate::preflight;
use crate::resp::{self, RespPlan};
use crate::route::{PARTITIONS, engine_key_bytes_max, partition_of, shard_of};
use crate::session::{NodeInfo, Session, Step};
use ringkv_core::NodeId;

mod members;
mod stop;
mod trees;
mod view;

use stop::StopToken;
use view::{CONTROL_QUEUE_MESSAGES_MAX, Control, ShardView};

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
/// Request id of the HELLO on an outbound peer connection; the core's ids count up from 1.
const PEER_HELLO_ID: u64 = u64::MAX;

/// Everything a node needs to run.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Root of the node's data; shard `i` keeps its engine in `shard-<i>` below it.
    pub data_dir: PathBuf,
    /// Client protocol address, shared by every shard's listener.
    pub listen: SocketAddr,
    /// RESP2 (Redis protocol) address, shared by every shard's listener; `None` disables it.
    pub resp_listen: Option<SocketAddr>,
    /// Admin HTTP address (`/metrics`, `/health`), served by shard 0; `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// One CPU per shard: shard `i` runs pinned to `cpus[i]`.
    pub cpus: Vec<usize>,
    /// When a PUT or DELETE is acknowledged.
    pub durability: Durability,
    /// Cluster name clients must give in HELLO.
    pub cluster_name: String,
    /// This node's name, sent in HELLO_OK.
    pub node_name: String,
    /// Frame and key limits of the client protocol.
    pub limits: Limits,
    /// Largest value stored (the engine's limit); a larger PUT is answered `too_large`.
    pub value_bytes_max: usize,
    /// Most requests executing at once per connection; the reader stops reading beyond it.
    pub inflight_per_connection_max: usize,
    /// Capacity of each shard-to-shard queue of the request and reply meshes, in messages.
    pub mesh_queue_messages_max: usize,
    /// Most requests from other shards a shard executes at once.
    pub peer_inflight_max: usize,
    /// Deadline of a request that names none (`timeout_ms` absent), in milliseconds.
    pub request_timeout_ms: u64,
    /// How long shutdown waits for connections to write their last replies before dropping the
    /// ones that are stuck (a client that stopped reading), in milliseconds.
    pub shutdown_drain_ms: u64,
    /// This node's id.
    pub node_id: NodeId,
    /// The identity the caller resolved for `node_id` ([`identity::resolve`]); `None` makes
    /// [`serve`] resolve it. [`serve`] writes `<data-dir>/node-identity` if it is new.
    pub identity: Option<Identity>,
    /// Peer protocol address, shared by every shard's listener; `None` for a node alone.
    pub peer_listen: Option<SocketAddr>,
    /// Every other member's peer address.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Peer addresses (`HOST:PORT`) of members this node, new and alone, asks to join.
    pub contact_seeds: Vec<String>,
    /// Bucket properties.
    pub buckets: Buckets,
    /// Time a replica has to answer before its slot moves on, in milliseconds.
    pub replica_timeout_ms: u64,
    /// Interval between hinted-handoff rounds, in milliseconds.
    pub hint_retry_ms: u64,
    /// Interval between anti-entropy rounds of each shard, in milliseconds (0: off).
    pub ae_interval_ms: u64,
    /// Most keys one anti-entropy exchange lists, and repairs in each direction.
    pub ae_keys_max: usize,
    /// How long every replica must have held a tombstone before it is reaped, in milliseconds.
    pub tombstone_grace_ms: u64,
    /// Interval between membership gossip rounds, in milliseconds.
    pub gossip_ms: u64,
    /// Bytes of hints the node stores at most; each shard's core gets an even part.
    pub hint_bytes_max: u64,
    /// Interval between failure-detector heartbeats to each peer, in milliseconds.
    pub heartbeat_ms: u64,
    /// Suspicion level (phi) above which a silent peer is believed down.
    pub phi_threshold: u32,
    /// Client p99 latency above which background work backs off, in microseconds.
    pub admission_p99_threshold_us: u64,
}

impl ServeConfig {
    /// Defaults for a node on `listen` with data in `data_dir`, one shard per CPU in `cpus`.
    pub fn new(data_dir: PathBuf, listen: SocketAddr, cpus: Vec<usize>) -> Self {
        Self {
            data_dir,
            listen,
            resp_listen: None,
            admin_listen: None,
            cpus,
            durability: Durability::Sync,
            cluster_name: config::NAME_DEFAULT.to_owned(),
            node_name: config::NAME_DEFAULT.to_owned(),
            limits: Limits::DEFAULT,
            value_bytes_max: config::VALUE_BYTES_MAX_DEFAULT,
            inflight_per_connection_max: config::INFLIGHT_PER_CONNECTION_MAX_DEFAULT,
            mesh_queue_messages_max: config::MESH_QUEUE_MESSAGES_MAX_DEFAULT,
            peer_inflight_max: config::PEER_INFLIGHT_MAX_DEFAULT,
            shutdown_drain_ms: config::SHUTDOWN_DRAIN_MS_DEFAULT,
            request_timeout_ms: config::REQUEST_TIMEOUT_MS_DEFAULT,
            node_id: NodeId(config::NODE_ID_DEFAULT),
            identity: None,
            peer_listen: None,
            peers: BTreeMap::new(),
            contact_seeds: Vec::new(),
            buckets: Buckets {
                default: BucketProps::default(),
                named: BTreeMap::new(),
            },
            replica_timeout_ms: config::REPLICA_TIMEOUT_MS_DEFAULT,
            hint_retry_ms: config::HINT_RETRY_MS_DEFAULT,
            ae_interval_ms: config::AE_INTERVAL_MS_DEFAULT,
            ae_keys_max: config::AE_KEYS_MAX_DEFAULT,
            tombstone_grace_ms: config::TOMBSTONE_GRACE_MS_DEFAULT,
            gossip_ms: config::GOSSIP_MS_DEFAULT,
            hint_bytes_max: config::HINT_BYTES_MAX_DEFAULT,
            heartbeat_ms: config::HEARTBEAT_MS_DEFAULT,
            phi_threshold: config::PHI_THRESHOLD_DEFAULT,
            admission_p99_threshold_us: config::ADMISSION_P99_THRESHOLD_US_DEFAULT,
        }
    }

    /// Largest encoded object a shard stores or sends: the engine's hard value limit, and small
    /// enough that a REPLICA_PUT carrying it fits a frame.
    fn object_bytes_max(&self) -> usize {
        VALUE_BYTES_MAX.min(self.limits.frame_bytes_max - PUT_OVERHEAD_BYTES_MAX)
    }
}

/// Why a node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Another process listens on the address (and still did after a short wait).
    #[error("address {addr} is already in use (another ringkv node or another server?)")]
    AddrInUse {
        /// The listen address.
        addr: SocketAddr,
    },
    /// The address could not be bound for another reason.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The node's membership could not be restored or started.
    #[error("membership: {0}")]
    Membership(String),
    /// The node's identity could not be established, or the cluster knows its id from another
    /// data directory.
    #[error("node identity: {0}")]
    Identity(String),
    /// A shard's epoch lease could not be read or persisted.
    #[error("shard {shard}: {source}")]
    Epochs {
        /// The shard.
        shard: usize,
        /// What went wrong.
        source: epochs::EpochError,
    },
    /// A shard's engine failed to open or to close.
    #[error("shard {shard}: engine in {dir}: {source}")]
    Engine {
        /// The shard.
        shard: usize,
        /// Its engine directory.
        dir: PathBuf,
        /// The engine's error.
        source: EngineError,
    },
    /// The kernel refuses this process an io_uring, which every executor is built on.
    #[error("io_uring is not available: {reason}; {hint}")]
    IoUringUnavailable {
        /// What failed and the errno it failed with.
        reason: String,
        /// What to check or change.
        hint: String,
    },
    /// The locked-memory limit (RLIMIT_MEMLOCK) is too low for the runtime.
    #[error(
        "not enough locked memory: RLIMIT_MEMLOCK is {limit_bytes} bytes and {cause}; this node \
         alone needs at least {required_bytes} bytes: raise the limit for the user or service \
         that runs ringkv (`ulimit -l {kib}` or more in its shell, LimitMEMLOCK= in its systemd \
         unit, memlock in /etc/security/limits.conf, --ulimit memlock= for Docker)",
        kib = .required_bytes.div_ceil(1024)
    )]
    LockedMemory {
        /// What failed under the limit.
        cause: String,
        /// The soft limit this process runs under, in bytes.
        limit_bytes: u64,
        /// The least this node needs, in bytes, if no other process of the user holds any.
        required_bytes: u64,
    },
    /// The runtime refused something (executor, listener, mesh, signals).
    #[error("{what}: {message}")]
    Runtime {
        /// What was being done.
        what: String,
        /// The runtime's error.
        message: String,
    },
}

fn runtime(what: impl Into<String>, e: impl std::fmt::Display) -> ServeError {
    ServeError::Runtime {
        what: what.into(),
        message: e.to_string(),
    }
}

/// A GET, PUT or DELETE sent to the shard that owns its partition.
#[derive(Debug)]
struct ShardRequest {
    /// Chosen by the sending shard to match the reply; unique among its requests in flight.
    tag: u64,
    /// The sending shard, where the reply goes.
    origin: usize,
    /// The key's partition (computed once, by the sender).
    partition: u32,
    /// The decoded request.
    message: Message,
    /// For a request from another node: that node (the owner runs it as a peer request).
    peer: Option<NodeId>,
}

/// The answer to a [`ShardRequest`].
#[derive(Debug)]
struct ShardReply {
    tag: u64,
    message: Message,
}

/// Replies this shard waits for from other shards, by tag.
#[derive(Default)]
struct Waiting {
    next_tag: Cell<u64>,
    replies: RefCell<HashMap<u64, LocalSender<Message>>>,
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
    waiting: Rc<Waiting>,
    metrics: Arc<ShardMetrics>,
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
    node_id: NodeId,
    node_name: String,
    cluster_name: String,
    /// Client requests waiting for the core's reply, by the id given to `handle_client`.
    clients: RefCell<HashMap<u64, LocalSender<Message>>>,
    next_client: Cell<u64>,
    /// Peer requests waiting for the core's answer, by the id given to `handle_peer`.
    inbound: RefCell<HashMap<u64, LocalSender<Message>>>,
    next_inbound: Cell<u64>,
    /// Outbound queue of each peer node this shard has talked to.
    links: RefCell<HashMap<NodeId, LocalSender<Frame>>>,
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
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX / 2);
        self.base_unix_ms.saturating_add(elapsed)
    }
}

/// Runs a node until SIGTERM or SIGINT, then shuts it down cleanly.
///
/// If a shard fails (to start, or to close), every other shard is stopped and closes its engine,
/// and the first error is returned once all of them have ended.
///
/// Must be called from a thread that is not a glommio executor, before any other thread is
/// started (the signal mask is inherited by threads started afterwards).
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    let shards = cfg.cpus.len();
    if shards == 0 || shards > crate::route::SHARDS_MAX {
        return Err(ServeError::Config(format!(
            "shard count {shards} outside [1, {}]",
            crate::route::SHARDS_MAX
        )));
    }
    let mut cfg = cfg;
    cfg.listen = check_port_free(cfg.listen)?;
    if let Some(addr) = cfg.resp_listen {
        let addr = check_port_free(addr)?;
        if addr == cfg.listen {
            return Err(ServeError::Config(format!(
                "the RESP listener cannot share the client protocol's address {addr}"
            )));
        }
        cfg.resp_listen = Some(addr);
    }
    if let Some(addr) = cfg.admin_listen {
        let addr = check_port_free(addr)?;
        if addr == cfg.listen || Some(addr) == cfg.resp_listen {
            return Err(ServeError::Config(format!(
                "the admin listener cannot share another listener's address {addr}"
            )));
        }
        cfg.admin_listen = Some(addr);
    }
    if let Some(addr) = cfg.peer_listen {
        let addr = check_port_free(addr)?;
        if addr == cfg.listen || Some(addr) == cfg.resp_listen || Some(addr) == cfg.admin_listen {
            return Err(ServeError::Config(format!(
                "the peer listener cannot share another listener's address {addr}"
            )));
        }
        cfg.peer_listen = Some(addr);
    }
    if !cfg.peers.is_empty() && cfg.peer_listen.is_none() {
        return Err(ServeError::Config(
            "a node with peers needs a peer listen address".into(),
        ));
    }
    if cfg.peers.contains_key(&cfg.node_id) {
        return Err(ServeError::Config(format!(
            "{} is listed as its own peer",
            cfg.node_id
        )));
    }
    cfg.buckets
        .validate()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let members: Vec<NodeId> = cfg
        .peers
        .keys()
        .copied()
        .chain(std::iter::once(cfg.node_id))
        .collect();
    let identity = match cfg.identity {
        Some(identity) if identity.id == cfg.node_id => identity,
        Some(identity) => {
            return Err(ServeError::Config(format!(
                "the identity of {} was given for {}",
                identity.id, cfg.node_id
            )));
        }
        None => identity::resolve(&cfg.data_dir, Some(cfg.node_id.0))
            .map_err(|e| ServeError::Identity(e.to_string()))?,
    };
    let target_n = cfg.buckets.max_n();
    let membership = start_membership(&cfg, &identity, &members, target_n)?;
    let view = Arc::new(ShardView::from_view(cfg.node_id, &membership.view()));
    let mut membership = Some(membership);
    // One executor per shard and the signal executor.
    let budget = preflight::check(shards + 1)?;
    // Written only now: a node refused by the checks above leaves its data directory untouched.
    identity::persist(&cfg.data_dir, &identity).map_err(|e| ServeError::Identity(e.to_string()))?;
    let clock = Clock::new();
    glommio::signal::block(&[libc::SIGTERM, libc::SIGINT])
        .map_err(|e| runtime("cannot block SIGTERM and SIGINT", e))?;

    // Whatever stops the node cancels this token: the first signal, or the end of any shard (a
    // shard ends before a signal only when it failed, and then the others must stop too). It
    // lives on this thread, which runs no executor; each executor attaches a foreign child of it.
    let stop = NodeStop::new();
    let (events_tx, events) = mpsc::channel::<Event>();
    let signal_thread = watch_signals(stop.foreign_child(), events_tx.clone(), &budget)?;

    let requests = MeshBuilder::<ShardRequest, _>::full(shards, cfg.mesh_queue_messages_max);
    let replies = MeshBuilder::<ShardReply, _>::full(shards, cfg.mesh_queue_messages_max);
    let control = MeshBuilder::<Control, _>::full(shards, CONTROL_QUEUE_MESSAGES_MAX);
    let metrics: Arc<[Arc<ShardMetrics>]> = (0..shards)
        .map(|_| Arc::new(ShardMetrics::default()))
        .collect();
    let mut threads: Vec<Option<ExecutorJoinHandle<()>>> = (0..shards).map(|_| None).collect();
    let mut first_error = None;
    for (id, cpu) in cfg.cpus.iter().copied().enumerate() {
        let meshes = Meshes {
            requests: requests.clone(),
            replies: replies.clone(),
            control: control.clone(),
        };
        let (cfg, metrics, view) = (cfg.clone(), metrics.clone(), view.clone());
        // The node's membership lives on its first shard.
        let membership = if id == 0 { membership.take() } else { None };
        let shutdown = stop.foreign_child();
        let stop_node = events_tx.clone();
        let report = EndReport {
            id,
            events: Some(events_tx.clone()),
        };
        let spawned = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            .spawn(move || async move {
                let replication = Replication {
                    view,
                    clock,
                    membership,
                    stop_node,
                };
                let result = run_shard(id, cfg, meshes, shutdown, metrics, replication).await;
                report.send(result);
            });
        match spawned {
            Ok(thread) => threads[id] = Some(thread),
            Err(e) => {
                // The shards already started wait in the mesh for this one; the stop below
                // releases them.
                first_error = Some(preflight::executor_error(
                    format!("cannot start shard {id} on CPU {cpu}"),
                    e,
                    &budget,
                ));
                break;
            }
        }
    }
    drop(events_tx);
    if first_error.is_some() {
        stop.cancel();
    }

    let mut running = threads.iter().filter(|t| t.is_some()).count();
    let mut ended = vec![false; shards];
    while running > 0 {
        let Ok(event) = events.recv() else {
            // Each running shard's report holds a sender until it has sent, so this cannot be.
            keep_first(
                &mut first_error,
                runtime("shard executors", "a shard ended without a report"),
            );
            break;
        };
        let (id, result) = match event {
            Event::Stop => {
                stop.cancel();
                continue;
            }
            Event::Failed(e) => {
                keep_first(&mut first_error, e);
                stop.cancel();
                continue;
            }
            Event::ShardEnded { id, result } => (id, result),
        };
        // A report from a shard whose thread never started (its spawn failed) is not a running
        // shard's end.
        if threads[id].is_none() || ended[id] {
            continue;
        }
        ended[id] = true;
        running -= 1;
        let result = match result {
            Some(result) => result,
            // The thread ended without running the shard to its end; its result says why.
            None => match threads[id].take().map(ExecutorJoinHandle::join) {
                Some(Err(e)) => Err(preflight::executor_error(format!("shard {id}"), e, &budget)),
                Some(Ok(())) | None => {
                    Err(runtime(format!("shard {id}"), "ended without a result"))
                }
            },
        };
        if let Err(e) = result {
            keep_first(&mut first_error, e);
        }
        // However a shard ended, the node cannot go on without it.
        stop.cancel();
    }
    for (id, thread) in threads.into_iter().enumerate() {
        if let Some(Err(e)) = thread.map(ExecutorJoinHandle::join) {
            keep_first(&mut first_error, runtime(format!("shard {id}"), e));
        }
    }
    // Ends the signal thread if no signal did.
    stop.cancel();
    if let Err(e) = signal_thread.join() {
        tracing::warn!(error = %e, "signal executor failed");
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What the shard and signal threads tell [`serve`].
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

/// Reports a shard's end to [`serve`] exactly once, however the shard's thread ends: dropped
/// without [`EndReport::send`] (its executor was never built, or it panicked), it reports an end
/// without a result, so `serve` never waits for a shard that will not report.
struct EndReport {
    id: usize,
    events: Option<mpsc::Sender<Event>>,
}

impl EndReport {
    fn send(mut self, result: Result<(), ServeError>) {
        if let Some(events) = self.events.take() {
            // Fails only if `serve` is gone, and then nobody is waiting.
            let _ = events.send(Event::ShardEnded {
                id: self.id,
                result: Some(result),
            });
        }
    }
}

impl Drop for EndReport {
    fn drop(&mut self) {
        if let Some(events) = self.events.take() {
            let _ = events.send(Event::ShardEnded {
                id: self.id,
                result: None,
            });
        }
    }
}

/// Keeps the first error, the root cause; later ones (shards that failed while stopping because
/// of it) are logged.
fn keep_first(first: &mut Option<ServeError>, e: ServeError) {
    match first {
        None => *first = Some(e),
        Some(_) => tracing::error!(error = %e, "also failed while stopping"),
    }
}

/// Starts the executor that turns the first SIGTERM or SIGINT into [`Event::Stop`]; it ends once
/// `stop` is cancelled, by the signal or otherwise. Returns once the signals are watched.
fn watch_signals(
    stop: ForeignCancellation,
    events: mpsc::Sender<Event>,
    budget: &preflight::MemlockBudget,
) -> Result<ExecutorJoinHandle<()>, ServeError> {
    let (ready_tx, ready) = mpsc::sync_channel::<Result<(), String>>(1);
    let thread = LocalExecutorBuilder::new(Placement::Unbound)
        .name("ringkv-signals")
        .spawn(move || async move {
            let stop = StopToken::attached(&stop);
            let signals = match glommio::signal::Signals::new(&[libc::SIGTERM, libc::SIGINT]) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            if ready_tx.send(Ok(())).is_err() {
                return;
            }
            match unless(signals.recv(), stop.cancelled()).await {
                // The node stops for another reason.
                None => return,
                Some(Ok(signal)) => tracing::info!(signal, "shutting down on signal"),
                Some(Err(e)) => tracing::error!(error = %e, "cannot read signals; shutting down"),
            }
            let _ = events.send(Event::Stop);
        })
        .map_err(|e| preflight::executor_error("cannot start the signal executor", e, budget))?;
    match ready.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(runtime("cannot watch SIGTERM and SIGINT", e))
        }
        // The executor was never built, so the closure never ran; the thread's result says why.
        Err(_) => Err(match thread.join() {
            Err(e) => preflight::executor_error("cannot start the signal executor", e, budget),
            Ok(()) => runtime("signal executor", "ended before watching signals"),
        }),
    }
}

/// How long a start waits for a listening socket of a previous run of this node to go away
/// before it reports the address in use.
const PORT_FREE_WAIT_MS: u64 = 3000;
/// Pause between two looks at a port that is still in use.
const PORT_FREE_POLL_MS: u64 = 50;

/// Fails when something keeps listening on `addr` for [`PORT_FREE_WAIT_MS`], and resolves port 0
/// to a free port so every shard binds the same one.
///
/// Why wait at all: a node killed with SIGKILL has been reaped before the kernel finishes tearing
/// down its io_uring instances, and requests still pending there (the listeners' accepts) keep
/// the listening sockets open, accepting connections into their backlogs, for a few
/// milliseconds after the process is gone. A supervisor that restarts the node at once would
/// otherwise be told, falsely, that another server holds the port. A real other server still
/// listens after the wait, and the start fails then, as clearly as before.
fn check_port_free(addr: SocketAddr) -> Result<SocketAddr, ServeError> {
    let polls = PORT_FREE_WAIT_MS / PORT_FREE_POLL_MS;
    for poll in 0..=polls {
        match port_state(addr)? {
            Some(free) => return Ok(free),
            None if poll == 0 => tracing::info!(
                %addr,
                wait_ms = PORT_FREE_WAIT_MS,
                "something listens on the address; waiting for a previous run's socket to close"
            ),
            None => {}
        }
        if poll < polls {
            std::thread::sleep(std::time::Duration::from_millis(PORT_FREE_POLL_MS));
        }
    }
    Err(ServeError::AddrInUse { addr })
}

/// One look at `addr`: the address to bind if no listener holds it (port 0 resolved), `None` if
/// one does.
fn port_state(addr: SocketAddr) -> Result<Option<SocketAddr>, ServeError> {
    // std's listener does not set SO_REUSEPORT, so this bind fails if any socket holds the port.
    match std::net::TcpListener::bind(addr) {
        Ok(probe) => probe
            .local_addr()
            .map(Some)
            .map_err(|source| ServeError::Bind { addr, source }),
        // Connections of a previous run hold the port too, for as long as their clients keep
        // their end open (FIN-WAIT-2 here): glommio's listeners do not set SO_REUSEADDR, so
        // neither do the sockets they accepted, and the probe's bind is refused. The listeners'
        // own SO_REUSEPORT bind coexists with such sockets, so only a listener is a conflict, and
        // a listener answers a connection attempt.
        Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
            if something_listens(addr) {
                Ok(None)
            } else {
                Ok(Some(addr))
            }
        }
        Err(source) => Err(ServeError::Bind { addr, source }),
    }
}

/// What a shard's core starts from, and how it learns of later views.
struct Replication {
    view: Arc<ShardView>,
    clock: Clock,
    /// The node's membership, for shard 0.
    membership: Option<Membership>,
    /// Stops the node (shard 0: a removed node that handed everything off).
    stop_node: mpsc::Sender<Event>,
}

/// The node's membership: restored from `<data-dir>/cluster-state` if an earlier run persisted
/// one (then `--seeds` are not used), else a new cluster of `members` (all Valid; this node
/// alone without seeds).
fn start_membership(
    cfg: &ServeConfig,
    identity: &Identity,
    members: &[NodeId],
    target_n: usize,
) -> Result<Membership, ServeError> {
    let mcfg = MembershipConfig {
        node: cfg.node_id,
        peer_addr: cfg.peer_listen.map(|a| a.to_string()).unwrap_or_default(),
        client_addr: cfg.listen.to_string(),
        gossip_ms: cfg.gossip_ms,
        // Membership's requests (gossip, join, commit) are answered at once by a live peer.
        request_timeout_ms: cfg.replica_timeout_ms,
        target_n,
        partitions: PARTITIONS,
        incarnation: identity.incarnation,
        fresh: identity.fresh,
        contact_seeds: cfg.contact_seeds.clone(),
    };
    let persisted =
        cluster_state::read(&cfg.data_dir).map_err(|e| ServeError::Membership(e.to_string()))?;
    let membership = match persisted {
        Some(bytes) => {
            tracing::info!(node = %cfg.node_id, "membership restored from the cluster state file");
            Membership::restore(mcfg, &bytes)
        }
        None => {
            let seeds: Vec<(NodeId, String)> = if cfg.peers.is_empty() {
                Vec::new()
            } else {
                members
                    .iter()
                    .map(|id| {
                        let addr = cfg.peers.get(id).copied().or(cfg.peer_listen);
                        (*id, addr.map(|a| a.to_string()).unwrap_or_default())
                    })
                    .collect()
            };
            Membership::bootstrap(mcfg, &seeds)
        }
    };
    membership.map_err(|e| ServeError::Membership(e.to_string()))
}

/// Bound on the connection attempt that tells a listener from leftover connections.
const LISTENER_PROBE_TIMEOUT_MS: u64 = 1000;

/// Whether a connection to `addr` (its loopback, for a wildcard address) is accepted. Anything but
/// a refusal counts as a listener, so a doubtful case still fails fast rather than sharing a port.
fn something_listens(addr: SocketAddr) -> bool {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = std::time::Duration::from_millis(LISTENER_PROBE_TIMEOUT_MS);
    match std::net::TcpStream::connect_timeout(&target, timeout) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::ConnectionRefused,
    }
}

/// One shard's life: open its engine, start (listeners, meshes), serve until the node stops, close
/// the engine. Once opened, the engine is closed however the start went.
async fn run_shard(
    id: usize,
    cfg: ServeConfig,
    meshes: Meshes,
    origin: ForeignCancellation,
    all_metrics: Arc<[Arc<ShardMetrics>]>,
    replication: Replication,
) -> Result<(), ServeError> {
    let shutdown = StopToken::attached(&origin);
    // Another shard failed before this one began: opening the engine only to close it would
    // delay the exit by a recovery.
    if shutdown.is_cancelled() {
        return Ok(());
    }
    let dir = cfg.data_dir.join(format!("shard-{id}"));
    let mut ecfg = EngineConfig::new(&dir);
    // Hint keys carry the home node's id before the replica key.
    ecfg.key_bytes_max = engine_key_bytes_max(cfg.limits.key_bytes_max) + HINT_KEY_PREFIX_BYTES;
    // The engine stores whole objects (every sibling and the clock), not single values; the
    // node's value limit is checked on client requests.
    ecfg.value_bytes_max = cfg.object_bytes_max();
    ecfg.default_durability = cfg.durability;
    let engine = Engine::open(ecfg)
        .await
        .map_err(|source| ServeError::Engine {
            shard: id,
            dir: dir.clone(),
            source,
        })?;
    // The run mark and the lease are read and persisted (file writes and syncs) off the shard
    // thread, and only once the engine holds the directory's lock: a second node refused by the
    // lock must not touch them.
    let lease_dir = dir.clone();
    let sync = cfg.durability == Durability::Sync;
    let leased = glommio::executor()
        .spawn_blocking(move || {
            // Read before the lease: a directory without a lease file has issued nothing.
            let floor = epochs::read_floor(&lease_dir)?;
            let lease = epochs::lease(&lease_dir.join(EPOCHS_FILE), id, EPOCH_LEASE_SIZE)?;
            let floor = floor.unwrap_or(lease.primary);
            // A floor is always an epoch an earlier run leased, below this run's.
            if floor > lease.primary {
                return Err(epochs::EpochError::Damaged {
                    path: lease_dir.join(epochs::FLOOR_FILE).display().to_string(),
                    text: floor.to_string(),
                });
            }
            // A sync run loses no dot however it ends; a buffered one only once it closed.
            epochs::write_floor(&lease_dir, sync.then_some(floor))?;
            Ok((lease, floor))
        })
        .await;
    let (lease, floor) = match leased {
        Ok(leased) => leased,
        Err(source) => {
            if let Err(closing) = close_engine(id, engine, dir.clone()).await {
                tracing::error!(shard = id, error = %closing, "engine did not close cleanly");
            }
            return Err(ServeError::Epochs { shard: id, source });
        }
    };
    let hints = match scan_hints(&engine, id, cfg.cpus.len()).await {
        Ok(hints) => hints,
        Err(source) => {
            if let Err(closing) = close_engine(id, engine, dir.clone()).await {
                tracing::error!(shard = id, error = %closing, "engine did not close cleanly");
            }
            return Err(ServeError::Engine {
                shard: id,
                dir,
                source,
            });
        }
    };
    let started = match start_shard(id, &cfg, meshes, &shutdown).await {
        Ok(started) => started,
        Err(e) => {
            // The start's error is the one to report; a failed close after it is only logged.
            if let Err(closing) = close_engine(id, engine, dir).await {
                tracing::error!(shard = id, error = %closing, "engine did not close cleanly");
            }
            return Err(e);
        }
    };
    let engine = match started {
        Some(started) => {
            let (mut core, replication) = start_core(id, &cfg, replication, lease, floor, hints);
            // The trees are built from the engine while the shard serves (`server/trees.rs`);
            // until a partition's are, anti-entropy leaves them alone.
            core.trees_loading(trees::partitions(id, cfg.cpus.len()));
            let (engine, floor) = serve_shard(
                id,
                &cfg,
                engine,
                started,
                shutdown,
                all_metrics,
                (core, replication),
            )
            .await?;
            // Served and stopping: once every write is synced, nothing this run issued can be
            // lost, so the floor holds for the next run. Recorded while the engine still holds
            // the directory's lock, so no later run can have started meanwhile.
            match engine.flush().await {
                Ok(()) => mark_floor(id, dir.clone(), floor).await?,
                Err(e) => tracing::error!(shard = id, error = %e, "final flush failed"),
            }
            engine
        }
        // The node stopped before every shard had started: nothing was served.
        None => engine,
    };
    close_engine(id, engine, dir).await
}

/// The coordinator of a shard, with the hints found in its engine.
fn start_core(
    id: usize,
    cfg: &ServeConfig,
    replication: Replication,
    lease: EpochLease,
    floor: u32,
    hints: Vec<(StoreKey, u64)>,
) -> (Core, Replication) {
    let mut core_cfg = CoreConfig::new(cfg.node_id);
    core_cfg.buckets = cfg.buckets.clone();
    core_cfg.durable_writes = cfg.durability == Durability::Sync;
    core_cfg.epoch_floor = Some(floor);
    core_cfg.request_timeout_ms = cfg.request_timeout_ms;
    core_cfg.replica_timeout_ms = cfg.replica_timeout_ms;
    core_cfg.hint_retry_ms = cfg.hint_retry_ms;
    core_cfg.ae_interval_ms = cfg.ae_interval_ms;
    core_cfg.ae_keys_max = cfg.ae_keys_max;
    core_cfg.tombstone_grace_ms = cfg.tombstone_grace_ms;
    core_cfg.hint_bytes_max = cfg.hint_bytes_max / cfg.cpus.len().max(1) as u64;
    core_cfg.heartbeat_ms = cfg.heartbeat_ms;
    core_cfg.phi_threshold = f64::from(cfg.phi_threshold);
    core_cfg.object_bytes_max = cfg.object_bytes_max();
    core_cfg.shard = u32::try_from(id).expect("serve bounds the shard count");
    core_cfg.shards = u32::try_from(cfg.cpus.len()).expect("serve bounds the shard count");
    core_cfg.target_n = cfg.buckets.max_n();
    tracing::info!(
        shard = id,
        node = %cfg.node_id,
        hints = hints.len(),
        epoch = lease.primary,
        epoch_floor = floor,
        "coordinator ready"
    );
    let core = Core::new(core_cfg, replication.view.ring.clone(), lease, hints);
    (core, replication)
}

/// Records the epoch floor after a clean close (`epochs::FLOOR_FILE`).
async fn mark_floor(id: usize, dir: PathBuf, floor: u32) -> Result<(), ServeError> {
    glommio::executor()
        .spawn_blocking(move || epochs::write_floor(&dir, Some(floor)))
        .await
        .map_err(|source| ServeError::Epochs { shard: id, source })
}

/// Flushes, syncs and closes a shard's engine, releasing its directory.
async fn close_engine(id: usize, engine: Engine, dir: PathBuf) -> Result<(), ServeError> {
    engine.close().await.map_err(|source| ServeError::Engine {
        shard: id,
        dir,
        source,
    })?;
    tracing::info!(shard = id, "shard closed");
    Ok(())
}

/// What a shard serves with, once every shard has started.
struct Started {
    listener: TcpListener,
    resp_listener: Option<TcpListener>,
    peer_listener: Option<TcpListener>,
    admin_listener: Option<TcpListener>,
    requests: (Senders<ShardRequest>, Receivers<ShardRequest>),
    replies: (Senders<ShardReply>, Receivers<ShardReply>),
    control: (Senders<Control>, Receivers<Control>),
}

/// The node's channel meshes between shards, as each shard joins them.
struct Meshes {
    requests: MeshBuilder<ShardRequest, Full>,
    replies: MeshBuilder<ShardReply, Full>,
    /// Views from shard 0 to the others.
    control: MeshBuilder<Control, Full>,
}

/// Binds the shard's listeners and joins the meshes. Joining completes only once every shard
/// has joined, so it is abandoned when the node stops first (another shard failed to start):
/// then the answer is `None`.
async fn start_shard(
    id: usize,
    cfg: &ServeConfig,
    meshes: Meshes,
    stop: &StopToken,
) -> Result<Option<Started>, ServeError> {
    let listener = TcpListener::bind(cfg.listen)
        .map_err(|e| runtime(format!("shard {id}: cannot listen on {}", cfg.listen), e))?;
    let resp_listener = match cfg.resp_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .map_err(|e| runtime(format!("shard {id}: cannot listen on {addr}"), e))?,
        ),
        None => None,
    };
    let peer_listener = match cfg.peer_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .map_err(|e| runtime(format!("shard {id}: cannot listen on {addr}"), e))?,
        ),
        None => None,
    };
    let admin_listener = match cfg.admin_listen {
        Some(addr) if id == 0 => Some(
            TcpListener::bind(addr)
                .map_err(|e| runtime(format!("shard {id}: cannot listen on {addr}"), e))?,
        ),
        _ => None,
    };
    let Some(requests) = join_mesh(meshes.requests, stop).await else {
        return Ok(None);
    };
    let requests = requests.map_err(|e| runtime(format!("shard {id}: request mesh"), e))?;
    let Some(replies) = join_mesh(meshes.replies, stop).await else {
        return Ok(None);
    };
    let replies = replies.map_err(|e| runtime(format!("shard {id}: reply mesh"), e))?;
    let Some(control) = join_mesh(meshes.control, stop).await else {
        return Ok(None);
    };
    let control = control.map_err(|e| runtime(format!("shard {id}: control mesh"), e))?;
    Ok(Some(Started {
        listener,
        resp_listener,
        peer_listener,
        admin_listener,
        requests,
        replies,
        control,
    }))
}

/// Joins a channel mesh, or answers `None` once the node stops first (a shard that failed to
/// start never joins, and the others must not wait for it). glommio's join waits for the last
/// shard by yielding in a loop, polling the stop each time: with glommio's own token every such
/// poll kept one more waker (memory grew by megabytes a second); a [`StopToken`] keeps one.
async fn join_mesh<T: Send + 'static>(
    mesh: MeshBuilder<T, Full>,
    stop: &StopToken,
) -> Option<glommio::Result<(Senders<T>, Receivers<T>), ()>> {
    unless(mesh.join(), stop.cancelled()).await
}

/// Serves until the node stops, drains, and hands the engine back for closing.
async fn serve_shard(
    id: usize,
    cfg: &ServeConfig,
    engine: Engine,
    started: Started,
    shutdown: StopToken,
    all_metrics: Arc<[Arc<ShardMetrics>]>,
    (core, replication): (Core, Replication),
) -> Result<(Engine, u32), ServeError> {
    let Replication {
        view,
        clock,
        membership,
        stop_node,
    } = replication;
    let shard_count = cfg.cpus.len();
    let dir = cfg.data_dir.join(format!("shard-{id}"));
    let Started {
        listener,
        resp_listener,
        peer_listener,
        admin_listener,
        requests: (req_tx, mut req_rx),
        replies: (rep_tx, mut rep_rx),
        control: (control_tx, mut control_rx),
    } = started;
    // Client requests preempt background work (compaction runs in the engine's own queue).
    let foreground = glommio::executor().create_task_queue(
        Shares::Static(1000),
        Latency::Matters(Duration::from_millis(1)),
        "requests",
    );
    // Background work of the replication layer (hint delivery, the tree build after a start);
    // its shares, and the engine's compaction shares, follow the admission controller.
    let background_shares = Rc::new(BackgroundShares::default());
    let background = glommio::executor().create_task_queue(
        Shares::Dynamic(background_shares.clone()),
        Latency::NotImportant,
        "background",
    );
    let admission = AdmissionController::new(AdmissionConfig {
        p99_threshold_us: cfg.admission_p99_threshold_us,
        ..AdmissionConfig::default()
    });
    let waiting = Rc::new(Waiting::default());
    let stop = StopToken::new();
    let shard = Rc::new(Shard {
        id,
        shard_count,
        engine,
        info: NodeInfo {
            cluster_name: cfg.cluster_name.clone(),
            node_name: cfg.node_name.clone(),
            shard_count: u16::try_from(shard_count).expect("serve bounds the shard count"),
        },
        limits: cfg.limits,
        inflight_per_connection_max: cfg.inflight_per_connection_max,
        requests: req_tx,
        waiting: waiting.clone(),
        metrics: all_metrics[id].clone(),
        request_timeout_ms: cfg.request_timeout_ms,
        replica_timeout_ms: cfg.replica_timeout_ms,
        value_bytes_max: cfg.value_bytes_max,
        core: RefCell::new(core),
        admission: RefCell::new(admission),
        background,
        background_shares,
        clock,
        node_id: cfg.node_id,
        node_name: cfg.node_name.clone(),
        cluster_name: cfg.cluster_name.clone(),
        clients: RefCell::new(HashMap::new()),
        next_client: Cell::new(1),
        inbound: RefCell::new(HashMap::new()),
        next_inbound: Cell::new(1),
        links: RefCell::new(HashMap::new()),
        members: membership.map(|m| {
            members::Driver::new(
                m,
                cfg.data_dir.clone(),
                cfg.peer_listen,
                all_metrics.clone(),
                stop_node,
            )
        }),
        peers: RefCell::new(view.peers.clone()),
        view_version: Cell::new(view.version),
        control: control_tx,
        epochs_path: dir.join(EPOCHS_FILE),
        floor_file: cfg.durability == Durability::Sync,
        store_work: Gate::new(),
        stop: stop.clone(),
        foreground,
    });
    glommio::spawn_local_into(run_ticks(Rc::downgrade(&shard), stop.clone()), foreground)
        .map_err(|e| runtime(format!("shard {id}: ticker"), e))?
        .detach();
    shard.start_view(&view);
    shard.start_membership(stop.clone());
    shard.spawn_tree_load(trees::partitions(id, shard_count));

    // Engine figures for the admin listener; a weak handle so the engine can still be closed.
    let weak = Rc::downgrade(&shard);
    let refresh_stop = shutdown.clone();
    glommio::spawn_local(async move {
        loop {
            match weak.upgrade() {
                Some(shard) => {
                    shard.metrics.set_engine(&shard.engine.stats());
                    let trees = shard.core.borrow_mut().merkle_roots();
                    shard.metrics.set_trees(trees);
                    // Hints are kept in engine partitions of their own: not replica data.
                    let mut bytes = shard.engine.partition_live_bytes();
                    bytes.retain(|(p, _)| *p < HINT_PARTITION_BASE);
                    shard.metrics.set_partition_bytes(bytes);
                }
                None => break,
            }
            let stopped = futures_lite::future::or(
                async {
                    refresh_stop.cancelled().await;
                    true
                },
                async {
                    glommio::timer::sleep(Duration::from_millis(metrics::ENGINE_REFRESH_MS)).await;
                    false
                },
            )
            .await;
            if stopped {
                break;
            }
        }
    })
    .detach();

    // Views from shard 0. A weak handle: the loop must not keep the shard from closing.
    for (_, rx) in control_rx.streams() {
        let weak = Rc::downgrade(&shard);
        glommio::spawn_local_into(
            async move {
                // Drained until every sender closed, even once the shard is gone, so a sender
                // never waits on a full queue at shutdown.
                while let Some(message) = rx.recv().await {
                    let Some(shard) = weak.upgrade() else {
                        continue;
                    };
                    match message {
                        Control::View(view) => shard.apply_view(&view),
                        Control::TransferDone { epoch, partition } => {
                            shard.membership_transfer_done(epoch, partition)
                        }
                    }
                }
            },
            foreground,
        )
        .map_err(|e| runtime(format!("shard {id}: control loop"), e))?
        .detach();
    }

    // Replies from other shards: hand each to the task waiting for it.
    for (_, rx) in rep_rx.streams() {
        let waiting = waiting.clone();
        glommio::spawn_local(async move {
            while let Some(reply) = rx.recv().await {
                let sender = waiting.replies.borrow_mut().remove(&reply.tag);
                if let Some(sender) = sender {
                    // The waiter may have gone (its connection died); nothing to do then.
                    let _ = sender.try_send(reply.message);
                }
            }
        })
        .detach();
    }
    // Requests from other shards, executed here and answered on the reply mesh.
    let rep_tx = Rc::new(rep_tx);
    let peer_slots = Rc::new(Semaphore::new(cfg.peer_inflight_max as u64));
    let peer_work = Gate::new();
    let mut peer_loops = Vec::new();
    for (_, rx) in req_rx.streams() {
        let (shard, rep_tx, slots, work) = (
            shard.clone(),
            rep_tx.clone(),
            peer_slots.clone(),
            peer_work.clone(),
        );
        peer_loops.push(glommio::spawn_local_into(
            async move {
                while let Some(req) = rx.recv().await {
                    let Ok(permit) = slots.acquire_static_permit(1).await else {
                        break;
                    };
                    let (shard, rep_tx) = (shard.clone(), rep_tx.clone());
                    let spawned = work.spawn(async move {
                        let message = match (req.peer, req.message) {
                            (Some(from), message) => shard.serve_peer(from, message).await,
                            (None, Message::Admin(admin))
                                if admin.command == HINTS_TRUNCATE_SHARD =>
                            {
                                shard.truncate_hints_here()
                            }
                            (None, Message::Admin(admin)) => shard.admin_command(admin).await,
                            (None, message) => shard.execute_local(req.partition, message).await,
                        };
                        let reply = ShardReply {
                            tag: req.tag,
                            message,
                        };
                        // Fails only if the origin shard is gone; then nobody waits for it.
                        let _ = rep_tx.send_to(req.origin, reply).await;
                        drop(permit);
                    });
                    if let Ok(task) = spawned {
                        task.detach();
                    }
                }
            },
            foreground,
        ));
    }

    tracing::info!(shard = id, addr = %cfg.listen, "shard serving");
    let connections = Gate::new();
    // Cancelled when the drain after shutdown takes too long: stuck writers give up.
    let abort = StopToken::new();
    if let Some(resp_listener) = resp_listener {
        let (shard, shutdown, abort, gate) = (
            shard.clone(),
            shutdown.clone(),
            abort.clone(),
            connections.clone(),
        );
        let resp_loop = async move {
            accept_until(&resp_listener, "RESP", shard.id, &shutdown, |stream| {
                let conn = serve_resp(shard.clone(), stream, shutdown.clone(), abort.clone());
                spawn_connection(&gate, conn, foreground)
            })
            .await;
        };
        if let Ok(task) = connections.spawn_into(resp_loop, foreground) {
            task.detach();
        }
    }
    if let Some(peer_listener) = peer_listener {
        let (shard, shutdown, abort, gate) = (
            shard.clone(),
            shutdown.clone(),
            abort.clone(),
            connections.clone(),
        );
        let peer_loop = async move {
            accept_until(&peer_listener, "peer", shard.id, &shutdown, |stream| {
                let conn = serve_connection(
                    shard.clone(),
                    stream,
                    shutdown.clone(),
                    abort.clone(),
                    Role::Peer,
                );
                spawn_connection(&gate, conn, foreground)
            })
            .await;
        };
        if let Ok(task) = connections.spawn_into(peer_loop, foreground) {
            task.detach();
        }
    }
    if let Some(admin_listener) = admin_listener {
        let (shutdown, all) = (shutdown.clone(), all_metrics.clone());
        let admin_loop = async move {
            // One request at a time: scrapes are rare and answering one is cheap, so an admin
            // client can never pile up tasks on the shard.
            accept_until(&admin_listener, "admin", id, &shutdown, |stream| {
                serve_admin(stream, &all, &shutdown)
            })
            .await;
        };
        if let Ok(task) = connections.spawn(admin_loop) {
            task.detach();
        }
    }
    accept_until(&listener, "client", id, &shutdown, |stream| {
        let conn = serve_connection(
            shard.clone(),
            stream,
            shutdown.clone(),
            abort.clone(),
            Role::Client,
        );
        spawn_connection(&connections, conn, foreground)
    })
    .await;
    drop(listener);
    // Every connection has stopped reading; wait (bounded) for their last replies to be written.
    let drained = futures_lite::future::or(
        async {
            let _ = connections.close().await;
            true
        },
        async {
            glommio::timer::sleep(Duration::from_millis(cfg.shutdown_drain_ms)).await;
            false
        },
    )
    .await;
    if !drained {
        tracing::warn!(
            shard = id,
            drain_ms = cfg.shutdown_drain_ms,
            "connections still writing at the end of the drain; dropping them"
        );
        abort.cancel();
        // Closing again waits for the close already begun; aborted writers end promptly.
        let _ = connections.close().await;
    }
    // No request from this shard can follow; peers' loops end once every shard got here.
    shard.requests.close();
    shard.control.close();
    for task in peer_loops.into_iter().flatten() {
        task.await;
    }
    let _ = peer_work.close().await;
    rep_tx.close();
    drop(rep_tx);
    shard.stop_replication().await;
    let shard = Rc::try_unwrap(shard)
        .map_err(|_| runtime(format!("shard {id}"), "tasks still hold the shard at close"))?;
    // Tombstone reaping may have raised the floor during the run.
    let floor = shard.core.borrow().epoch_floor();
    Ok((shard.engine, floor))
}

fn error_message(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error(ErrorBody::new(code, message))
}

impl Shard {
    /// Executes a GET, PUT or DELETE here or on the shard owning its partition, and counts it.
    ///
    /// The answer is `timeout` if the work takes longer than the request's `timeout_ms` (or the
    /// node's `request_timeout_ms`). The work itself is never cancelled halfway, since a write
    /// may already be in the engine's group commit: it runs on in its own task, holding `hold`
    /// (the connection's in-flight slot) until it ends, so timed-out work still counts against
    /// the connection's bound.
    async fn execute<H: 'static>(self: &Rc<Self>, message: Message, hold: H) -> Message {
        let (op, requested_ms) = match &message {
            Message::Get(m) => (Some(Op::Get), m.timeout_ms),
            Message::Put(m) => (Some(Op::Put), m.timeout_ms),
            Message::Delete(m) => (Some(Op::Delete), m.timeout_ms),
            _ => (None, None),
        };
        let timeout_ms = requested_ms
            .map_or(self.request_timeout_ms, u64::from)
            .clamp(1, config::REQUEST_TIMEOUT_MS_MAX);
        if let Message::Put(m) = &message
            && m.value.len() > self.value_bytes_max
        {
            return error_message(
                ErrorCode::TooLarge,
                format!(
                    "value of {} bytes above the node's limit of {}",
                    m.value.len(),
                    self.value_bytes_max
                ),
            );
        }
        let start = Instant::now();
        let shard = self.clone();
        let mut work = glommio::spawn_local(async move {
            let reply = shard.route(message).await;
            drop(hold);
            reply
        });
        let finished = unless(
            &mut work,
            glommio::timer::sleep(Duration::from_millis(timeout_ms)),
        )
        .await;
        let reply = match finished {
            Some(reply) => reply,
            None => {
                work.detach();
                error_message(
                    ErrorCode::Timeout,
                    format!("no answer within {timeout_ms} ms; a write may still be applied"),
                )
            }
        };
        if let Some(op) = op {
            let elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.admission.borrow_mut().record(elapsed_us);
            let ok = !matches!(reply, Message::Error(_));
            self.metrics.record(op, elapsed_us, ok);
        }
        reply
    }

    /// `hints-truncate`: every shard of this node drops the hints it holds.
    async fn truncate_hints_everywhere(self: &Rc<Self>) -> Message {
        let mut total = 0u64;
        for shard in 0..self.shard_count {
            let answer = if shard == self.id {
                self.truncate_hints_here()
            } else {
                let ask = Message::Admin(Admin {
                    command: HINTS_TRUNCATE_SHARD.into(),
                    args: Bytes::new(),
                });
                self.forward(shard, 0, ask, None).await
            };
            match answer {
                Message::AdminOk(ok) => {
                    total += std::str::from_utf8(&ok.body)
                        .ok()
                        .and_then(|t| t.parse::<u64>().ok())
                        .unwrap_or(0);
                }
                other => return other,
            }
        }
        Message::AdminOk(AdminOk {
            body: Bytes::from(format!(
                "removing {total} hints; the writes they carried stay on the replicas that \
                 acknowledged them, and anti-entropy repairs their homes\n"
            )),
        })
    }

    /// This shard's part of `hints-truncate`: the count of hints queued for removal.
    fn truncate_hints_here(self: &Rc<Self>) -> Message {
        let (count, outputs) = self.core.borrow_mut().truncate_hints(self.clock.now_ms());
        self.carry_out(outputs);
        tracing::warn!(
            shard = self.id,
            hints = count,
            "hints truncated by an operator"
        );
        Message::AdminOk(AdminOk {
            body: Bytes::from(count.to_string()),
        })
    }

    async fn route(self: &Rc<Self>, message: Message) -> Message {
        // Operator commands are answered by the first shard, which owns cluster-wide state.
        let message = match message {
            Message::Admin(admin) if admin.command == HINTS_TRUNCATE => {
                return self.truncate_hints_everywhere().await;
            }
            Message::Admin(admin) if self.id == 0 => return self.admin_command(admin).await,
            admin @ Message::Admin(_) => return self.forward(0, 0, admin, None).await,
            other => other,
        };
        let (bucket, key) = match &message {
            Message::Get(m) => (&m.bucket, &m.key),
            Message::Put(m) => (&m.bucket, &m.key),
            Message::Delete(m) => (&m.bucket, &m.key),
            other => {
                return error_message(
                    ErrorCode::Internal,
                    format!("{} reached the executor", other.kind()),
                );
            }
        };
        let partition = partition_of(bucket, key);
        let owner = shard_of(partition, self.shard_count);
        if owner == self.id {
            return self.execute_local(partition.0, message).await;
        }
        self.forward(owner, partition.0, message, None).await
    }

    async fn forward(
        &self,
        owner: usize,
        partition: u32,
        message: Message,
        peer: Option<NodeId>,
    ) -> Message {
        let tag = self.waiting.next_tag.get();
        self.waiting.next_tag.set(tag + 1);
        let (tx, rx) = local_channel::new_bounded(1);
        self.waiting.replies.borrow_mut().insert(tag, tx);
        let request = ShardRequest {
            tag,
            origin: self.id,
            partition,
            message,
            peer,
        };
        if self.requests.send_to(owner, request).await.is_err() {
            self.waiting.replies.borrow_mut().remove(&tag);
            return error_message(
                ErrorCode::ShuttingDown,
                format!("shard {owner} is stopping"),
            );
        }
        match rx.recv().await {
            Some(reply) => reply,
            None => error_message(
                ErrorCode::Internal,
                format!("shard {owner} dropped a reply"),
            ),
        }
    }

    /// Executes a client request for a partition this shard owns: its core coordinates it.
    async fn execute_local(self: &Rc<Self>, partition: u32, message: Message) -> Message {
        debug_assert_eq!(partition as usize % self.shard_count, self.id);
        let req = self.next_client.get();
        self.next_client.set(req + 1);
        let (tx, rx) = local_channel::new_bounded(1);
        self.clients.borrow_mut().insert(req, tx);
        let outputs = self
            .core
            .borrow_mut()
            .handle_client(self.clock.now_ms(), req, message);
        self.carry_out(outputs);
        match rx.recv().await {
            Some(reply) => reply,
            None => error_message(ErrorCode::ShuttingDown, "the shard stopped"),
        }
    }
}

/// Serves one connection of `role` (a client, or another node on the peer port) until it closes,
/// fails a frame, or the node shuts down.
async fn serve_connection(
    shard: Rc<Shard>,
    stream: TcpStream,
    shutdown: StopToken,
    abort: StopToken,
    role: Role,
) {
    // Small replies must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    shard.metrics.connection_opened();
    let _counted = scopeguard(&shard.metrics);
    let (mut reader, writer) = futures_lite::io::split(stream);
    let (replies, outbox) = local_channel::new_bounded::<Frame>(shard.inflight_per_connection_max);
    // Shared by the reader and every request task; the channel closes when the last one is gone.
    let replies = Rc::new(replies);
    let limits = shard.limits;
    let writer = glommio::spawn_local(write_replies(writer, outbox, limits, abort));
    let slots = Rc::new(Semaphore::new(shard.inflight_per_connection_max as u64));
    let shard_index = u16::try_from(shard.id).expect("serve bounds the shard count");
    let mut session = match role {
        Role::Client => Session::new(shard.info.clone(), shard_index),
        Role::Peer => Session::for_peers(shard.info.clone(), shard_index),
    };
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    'read: loop {
        // Decode every complete frame buffered so far.
        let mut used = 0;
        loop {
            match decode_frame(&buf[used..], &limits) {
                Ok(None) => break,
                Ok(Some((frame, len))) => {
                    used += len;
                    match session.on_frame(frame) {
                        Step::Reply(reply) => {
                            if replies.send(reply).await.is_err() {
                                break 'read;
                            }
                        }
                        Step::ReplyAndClose(reply) => {
                            let _ = replies.send(reply).await;
                            break 'read;
                        }
                        Step::Execute(request) => {
                            let Ok(permit) = slots.acquire_static_permit(1).await else {
                                break 'read;
                            };
                            let (shard, replies) = (shard.clone(), replies.clone());
                            let peer = session.peer();
                            glommio::spawn_local(async move {
                                let message = match peer {
                                    Some(from) => {
                                        let reply = shard.route_peer(from, request.message).await;
                                        drop(permit);
                                        reply
                                    }
                                    None => shard.execute(request.message, permit).await,
                                };
                                let reply = Frame {
                                    request_id: request.request_id,
                                    message,
                                };
                                let _ = replies.send(reply).await;
                            })
                            .detach();
                        }
                    }
                }
                Err(e) => {
                    let _ = replies.send(e.error_frame()).await;
                    match e.skip_len() {
                        Some(len) => used += len,
                        None => break 'read,
                    }
                }
            }
        }
        buf.drain(..used);
        let read = unless(reader.read(&mut chunk), shutdown.cancelled()).await;
        match read {
            None | Some(Ok(0)) | Some(Err(_)) => break,
            Some(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    // In-flight requests keep clones of the sender; the writer ends after their replies.
    drop(replies);
    writer.await;
}

/// Serves one RESP2 connection: pipelined commands run in waves of distinct keys ([`RespWave`]),
/// so each key sees its commands in order, and replies go out in command order, as Redis clients
/// expect; replies to pipelined commands are written together.
async fn serve_resp(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    shutdown: StopToken,
    abort: StopToken,
) {
    let _ = stream.set_nodelay(true);
    shard.metrics.connection_opened();
    let _counted = scopeguard(&shard.metrics);
    let limits = RespLimits::DEFAULT;
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut out = Vec::new();
    'read: loop {
        let mut used = 0;
        let mut close = false;
        let mut wave = RespWave::default();
        loop {
            match decode_command(&buf[used..], &limits) {
                Ok(None) => break,
                Ok(Some((cmd, len))) => {
                    used += len;
                    // Redis ignores empty commands.
                    if cmd.is_empty() {
                        continue;
                    }
                    let plan = resp::plan(&cmd);
                    if !wave.admits(&plan) {
                        wave.run(&shard, &mut out).await;
                    }
                    match plan {
                        RespPlan::Reply(v) => wave.push_ready(v),
                        RespPlan::ReplyAndClose(v) => {
                            wave.push_ready(v);
                            close = true;
                            break;
                        }
                        RespPlan::Execute(requests, how) => wave.push_execute(requests, how),
                    }
                    // Bounds the reply buffer when a client pipelines reads of large values.
                    if out.len() >= WRITE_BATCH_BYTES_MAX {
                        if !write_or_abort(&mut stream, &out, &abort).await {
                            break 'read;
                        }
                        out.clear();
                    }
                }
                Err(e) => {
                    // The stream can no longer be framed: answer as Redis does and close.
                    wave.push_ready(e.reply());
                    close = true;
                    break;
                }
            }
        }
        wave.run(&shard, &mut out).await;
        buf.drain(..used);
        if !out.is_empty() {
            if !write_or_abort(&mut stream, &out, &abort).await {
                break;
            }
            out.clear();
        }
        if close {
            break;
        }
        let read = unless(stream.read(&mut chunk), shutdown.cancelled()).await;
        match read {
            None | Some(Ok(0)) | Some(Err(_)) => break,
            Some(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = stream.close().await;
}

/// Most pipelined RESP commands executed at once on one connection.
const RESP_WAVE_COMMANDS_MAX: usize = 128;

/// Pipelined RESP commands that run together: Redis clients expect each connection's commands
/// to take effect in order, so a wave holds commands on distinct keys only (a command touching
/// a key already in the wave starts the next wave), runs them concurrently (so synced writes on
/// one connection share group commits) and encodes the replies in command order.
#[derive(Default)]
struct RespWave {
    commands: Vec<WaveCommand>,
    keys: std::collections::BTreeSet<(bytes::Bytes, bytes::Bytes)>,
}

enum WaveCommand {
    Ready(ringkv_net::resp::RespValue),
    Execute(Vec<Message>, resp::Combine),
}

fn request_key(m: &Message) -> Option<(bytes::Bytes, bytes::Bytes)> {
    match m {
        Message::Get(g) => Some((g.bucket.clone(), g.key.clone())),
        Message::Put(p) => Some((p.bucket.clone(), p.key.clone())),
        Message::Delete(d) => Some((d.bucket.clone(), d.key.clone())),
        _ => None,
    }
}

impl RespWave {
    /// Whether `plan` may join the wave without overtaking a command on the same key.
    fn admits(&self, plan: &RespPlan) -> bool {
        if self.commands.len() >= RESP_WAVE_COMMANDS_MAX {
            return false;
        }
        match plan {
            RespPlan::Execute(requests, _) => requests
                .iter()
                .filter_map(request_key)
                .all(|k| !self.keys.contains(&k)),
            RespPlan::Reply(_) | RespPlan::ReplyAndClose(_) => true,
        }
    }

    fn push_ready(&mut self, v: ringkv_net::resp::RespValue) {
        self.commands.push(WaveCommand::Ready(v));
    }

    fn push_execute(&mut self, requests: Vec<Message>, how: resp::Combine) {
        self.keys.extend(requests.iter().filter_map(request_key));
        self.commands.push(WaveCommand::Execute(requests, how));
    }

    /// Runs the wave's commands (each one's requests in order, the commands concurrently) and
    /// appends their replies to `out` in command order.
    async fn run(&mut self, shard: &Rc<Shard>, out: &mut Vec<u8>) {
        self.keys.clear();
        let mut tasks = Vec::with_capacity(self.commands.len());
        for command in self.commands.drain(..) {
            tasks.push(match command {
                WaveCommand::Ready(v) => Err(v),
                WaveCommand::Execute(requests, how) => {
                    let shard = shard.clone();
                    Ok(glommio::spawn_local(async move {
                        let mut replies = Vec::with_capacity(requests.len());
                        for request in requests {
                            replies.push(shard.execute(request, ()).await);
                        }
                        resp::combine(how, &replies)
                    }))
                }
            });
        }
        for task in tasks {
            let reply = match task {
                Err(v) => v,
                Ok(task) => task.await,
            };
            encode_resp(&reply, out);
        }
    }
}

/// Counts a connection as closed when dropped, however its task ends.
struct ConnectionCount<'a>(&'a ShardMetrics);

impl Drop for ConnectionCount<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

fn scopeguard(metrics: &ShardMetrics) -> ConnectionCount<'_> {
    ConnectionCount(metrics)
}

/// Answers one admin HTTP request (bounded head, bounded by shutdown) and closes.
async fn serve_admin(mut stream: TcpStream, all: &[Arc<ShardMetrics>], shutdown: &StopToken) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !metrics::head_complete(&head) {
        if head.len() >= metrics::ADMIN_REQUEST_BYTES_MAX {
            return;
        }
        let read = unless(stream.read(&mut chunk), shutdown.cancelled()).await;
        match read {
            Some(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    let shards: Vec<&ShardMetrics> = all.iter().map(|m| m.as_ref()).collect();
    let response = metrics::admin_response(&head, &shards);
    let _ = stream.write_all(&response).await;
    let _ = stream.close().await;
}

/// Writes `bytes`, unless the connection fails or shutdown's drain runs out first.
async fn write_or_abort(stream: &mut TcpStream, bytes: &[u8], abort: &StopToken) -> bool {
    futures_lite::future::or(async { stream.write_all(bytes).await.is_ok() }, async {
        abort.cancelled().await;
        false
    })
    .await
}

/// Writes replies in the order they complete, then closes the write side.
///
/// Replies already queued when the writer wakes are encoded into one buffer (up to
/// [`WRITE_BATCH_BYTES_MAX`]) and sent with one write, so a pipelining client costs one syscall per
/// batch rather than per reply.
async fn write_replies(
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    outbox: local_channel::LocalReceiver<Frame>,
    limits: Limits,
    abort: StopToken,
) {
    let mut out = Vec::new();
    while let Some(frame) = outbox.recv().await {
        out.clear();
        encode_reply(&frame, &limits, &mut out);
        while out.len() < WRITE_BATCH_BYTES_MAX {
            // Take what is already queued without waiting for more.
            match futures_lite::future::poll_once(outbox.recv()).await {
                Some(Some(frame)) => encode_reply(&frame, &limits, &mut out),
                Some(None) | None => break,
            }
        }
        let written =
            futures_lite::future::or(async { writer.write_all(&out).await.is_ok() }, async {
                abort.cancelled().await;
                false
            })
            .await;
        if !written {
            // The peer is gone or the drain ran out; dropping the queue fails the request tasks'
            // sends, so nothing waits on this connection any more.
            return;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.close().await;
}

/// Appends `frame` to `out`, or an error frame saying why it could not be sent.
fn encode_reply(frame: &Frame, limits: &Limits, out: &mut Vec<u8>) {
    let start = out.len();
    if let Err(e) = encode_frame(frame, limits, out) {
        // A reply over the frame limit (a value stored under larger limits): say so instead.
        out.truncate(start);
        let fallback = Frame {
            request_id: frame.request_id,
            message: error_message(ErrorCode::TooLarge, format!("reply not sent: {e}")),
        };
        // An error body is bounded far below any frame limit the codec accepts.
        if encode_frame(&fallback, limits, out).is_err() {
            out.truncate(start);
        }
    }
}

/// Runs a connection as a task of `gate` (so shutdown can wait for its last replies) in `queue`;
/// the accept loop goes on at once.
fn spawn_connection(
    gate: &Gate,
    conn: impl Future<Output = ()> + 'static,
    queue: glommio::TaskQueueHandle,
) -> std::future::Ready<()> {
    if let Ok(task) = gate.spawn_into(conn, queue) {
        task.detach();
    }
    std::future::ready(())
}

/// Accepts connections on `listener` and hands each to `accepted` until `stop` is cancelled. A
/// failed accept (e.g. out of file descriptors) is logged and retried after a pause, so the loop
/// never spins.
async fn accept_until<F: Future<Output = ()>>(
    listener: &TcpListener,
    what: &str,
    shard: usize,
    stop: &StopToken,
    mut accepted: impl FnMut(TcpStream) -> F,
) {
    loop {
        match unless(listener.accept(), stop.cancelled()).await {
            None => break,
            Some(Ok(stream)) => accepted(stream).await,
            Some(Err(e)) => {
                tracing::warn!(shard, listener = what, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(ACCEPT_RETRY_DELAY_MS)).await;
            }
        }
    }
}

/// Runs `work` unless `stop` completes first, in which case it answers `None`: how every accept
/// and read loop stops at shutdown, and how a request meets its deadline.
async fn unless<T>(
    work: impl std::future::Future<Output = T>,
    stop: impl std::future::Future<Output = ()>,
) -> Option<T> {
    futures_lite::future::or(async { Some(work.await) }, async {
        stop.await;
        None
    })
    .await
}

/// Every hint stored in the hint partitions of the ring partitions `shard` owns, with the bytes
/// it counts for in the hint store's bound.
async fn scan_hints(
    engine: &Engine,
    shard: usize,
    shard_count: usize,
) -> Result<Vec<(StoreKey, u64)>, EngineError> {
    let mut hints = Vec::new();
    for partition in
        (0..PARTITIONS.get()).filter(|p| shard_of(PartitionId(*p), shard_count) == shard)
    {
        let mut keys = engine.iter_partition(HINT_PARTITION_BASE | partition);
        while let Some(item) = keys.next().await {
            let (key, object) = item?;
            match peer::hint_from_engine(partition, &key) {
                Some(hint) => {
                    let bytes = hint_bytes(&hint, object.len());
                    hints.push((hint, bytes));
                }
                None => tracing::warn!(shard, partition, "ignoring a malformed hint key"),
            }
        }
    }
    Ok(hints)
}

impl Shard {
    /// Carries out what the core asked for. Never called with the core borrowed.
    fn carry_out(self: &Rc<Self>, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Reply { req, message } => {
                    // The request task may be gone (its deadline passed first): nothing to do.
                    if let Some(waiter) = self.clients.borrow_mut().remove(&req) {
                        let _ = waiter.try_send(message);
                    }
                }
                Output::Send { msg, .. } if msg.is_answer() => {
                    let (id, message) = peer::to_wire(msg);
                    if let Some(waiter) = self.inbound.borrow_mut().remove(&id) {
                        let _ = waiter.try_send(message);
                    }
                }
                Output::Send { to, msg } => self.send_to_peer(to, msg),
                Output::Store { id, key, op } => self.spawn_store(id, key, op),
                Output::RenewEpochs => self.spawn_renewal(),
                Output::PersistFloor { floor } => self.spawn_floor(floor),
                Output::Scan {
                    id,
                    partition,
                    after,
                    max_items,
                    max_bytes,
                } => self.spawn_scan(id, partition, after, max_items, max_bytes),
                Output::DropPartition { partition } => {
                    tracing::info!(
                        shard = self.id,
                        partition,
                        "dropping a handed-off partition"
                    );
                    self.spawn_drop(partition)
                }
                Output::TransferDone { epoch, partition } => self.transfer_done(epoch, partition),
            }
        }
    }

    /// Runs one storage operation of the core in its own task and reports the result.
    fn spawn_store(self: &Rc<Self>, id: u64, key: StoreKey, op: StoreOp) {
        let shard = self.clone();
        let queue = if self.core.borrow().is_background(id) {
            self.background
        } else {
            self.foreground
        };
        let spawned = self.store_work.spawn_into(
            async move {
                let result = shard.store(&key, op).await;
                let outputs =
                    shard
                        .core
                        .borrow_mut()
                        .handle_stored(shard.clock.now_ms(), id, result);
                shard.carry_out(outputs);
            },
            queue,
        );
        match spawned {
            Ok(task) => {
                task.detach();
            }
            Err(_) => {
                // Shutting down: the operation fails, so nothing waits for it.
                let outputs = self.core.borrow_mut().handle_stored(
                    self.clock.now_ms(),
                    id,
                    Err("the shard is stopping".into()),
                );
                self.carry_out(outputs);
            }
        }
    }

    /// One storage operation on the engine: objects encoded, hints in their own partitions.
    async fn store(&self, key: &StoreKey, op: StoreOp) -> Result<Option<Object>, String> {
        let (partition, engine_key) = peer::engine_location(key);
        match op {
            StoreOp::Read => match self.engine.get(partition, &engine_key).await {
                Ok(None) => Ok(None),
                Ok(Some(bytes)) => Object::decode(&bytes).map(Some).map_err(|e| {
                    format!("stored object in partition {partition} does not decode: {e}")
                }),
                Err(e) => Err(e.to_string()),
            },
            StoreOp::Write { object, durable } => {
                let durability = if durable {
                    Durability::Sync
                } else {
                    Durability::Buffered
                };
                self.engine
                    .put(partition, &engine_key, &object.encode(), durability)
                    .await
                    .map(|()| None)
                    .map_err(|e| e.to_string())
            }
            StoreOp::Sync => self
                .engine
                .flush()
                .await
                .map(|()| None)
                .map_err(|e| e.to_string()),
            // Losing a removal in a crash only delivers the hint again, and merging is idempotent.
            StoreOp::Remove => self
                .engine
                .delete(partition, &engine_key, Durability::Buffered)
                .await
                .map(|_| None)
                .map_err(|e| e.to_string()),
        }
    }

    /// Reads a page of a partition's replicas for a transfer or handoff and reports it, in the
    /// background queue (its shares follow the admission controller).
    fn spawn_scan(
        self: &Rc<Self>,
        id: u64,
        partition: u32,
        after: Option<Bytes>,
        max_items: usize,
        max_bytes: usize,
    ) {
        let shard = self.clone();
        let spawned = self.store_work.spawn_into(
            async move {
                let result = shard.scan(partition, after, max_items, max_bytes).await;
                let outputs =
                    shard
                        .core
                        .borrow_mut()
                        .handle_scanned(shard.clock.now_ms(), id, result);
                shard.carry_out(outputs);
            },
            self.background,
        );
        if let Ok(task) = spawned {
            task.detach();
        }
    }

    async fn scan(
        &self,
        partition: u32,
        after: Option<Bytes>,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, String> {
        let after = match after {
            Some(c) => Some(
                peer::cursor_from_bytes(&c).ok_or_else(|| "a malformed scan cursor".to_string())?,
            ),
            None => None,
        };
        let mut it = self.engine.iter_partition_after(partition, after);
        let mut page = ScanPage::default();
        let mut bytes = 0;
        let mut last = None;
        while page.items.len() < max_items && (page.items.is_empty() || bytes < max_bytes) {
            let Some(entry) = it.next_entry().await else {
                return Ok(page);
            };
            let (kh, engine_key, value) = entry.map_err(|e| e.to_string())?;
            last = Some(kh);
            let Some((bucket, key)) = peer::key_from_engine(&engine_key) else {
                tracing::warn!(
                    shard = self.id,
                    partition,
                    "skipping a malformed replica key"
                );
                continue;
            };
            let object = Object::decode(&value).map_err(|e| {
                format!("stored object in partition {partition} does not decode: {e}")
            })?;
            bytes += value.len();
            page.items.push(ScanItem {
                bucket,
                key,
                object,
            });
            yield_if_needed().await;
        }
        // Full page: the next one starts after its last key (an empty remainder gives an empty
        // last page, which ends the scan).
        page.next = last.map(peer::cursor_bytes);
        Ok(page)
    }

    /// Drops a handed-off partition and tells the core.
    fn spawn_drop(self: &Rc<Self>, partition: u32) {
        let shard = self.clone();
        let spawned = self.store_work.spawn_into(
            async move {
                match shard
                    .engine
                    .drop_partition(partition, Durability::Sync)
                    .await
                {
                    Ok(_) => {
                        let outputs = shard
                            .core
                            .borrow_mut()
                            .partition_dropped(shard.clock.now_ms(), partition);
                        shard.carry_out(outputs);
                    }
                    // The core keeps refusing writes to it; the operator sees why.
                    Err(e) => tracing::error!(
                        shard = shard.id,
                        partition,
                        error = %e,
                        "cannot drop a handed-off partition"
                    ),
                }
            },
            self.background,
        );
        if let Ok(task) = spawned {
            task.detach();
        }
    }

    /// Persists a new epoch lease off the shard thread (it syncs a file) and hands it over.
    fn spawn_renewal(self: &Rc<Self>) {
        let shard = self.clone();
        let (path, id) = (self.epochs_path.clone(), self.id);
        let spawned = self.store_work.spawn(async move {
            let leased = glommio::executor()
                .spawn_blocking(move || epochs::lease(&path, id, EPOCH_LEASE_SIZE))
                .await;
            match leased {
                Ok(lease) => shard.core.borrow_mut().handle_epochs(lease),
                // The core keeps its remaining epochs and does not ask again; home writes are
                // unaffected, writes coordinated away from every home fail once they run out.
                Err(e) => tracing::error!(shard = id, error = %e, "cannot renew the epoch lease"),
            }
        });
        if let Ok(task) = spawned {
            task.detach();
        }
    }

    /// Persists a raised epoch floor (tombstone reaping) off the shard thread, then tells the
    /// core. A `buffered` run keeps no floor file while it runs (a crash must leave none), so the
    /// floor counts as persisted at once: the next run after a crash starts above it anyway.
    fn spawn_floor(self: &Rc<Self>, floor: u32) {
        if !self.floor_file {
            self.core.borrow_mut().handle_floor_persisted(floor);
            return;
        }
        let shard = self.clone();
        let id = self.id;
        let Some(dir) = self.epochs_path.parent().map(Path::to_path_buf) else {
            return;
        };
        let spawned = self.store_work.spawn(async move {
            let written = glommio::executor()
                .spawn_blocking(move || epochs::write_floor(&dir, Some(floor)))
                .await;
            match written {
                Ok(()) => shard.core.borrow_mut().handle_floor_persisted(floor),
                // Reaping of the tombstones the old floor keeps stays blocked (logged once).
                Err(e) => tracing::error!(shard = id, error = %e, "cannot persist the epoch floor"),
            }
        });
        if let Ok(task) = spawned {
            task.detach();
        }
    }

    /// Queues `msg` for node `to`, opening the link on first use.
    fn send_to_peer(self: &Rc<Self>, to: NodeId, msg: PeerMsg) {
        let (request_id, message) = peer::to_wire(msg);
        self.send_frame(
            to,
            Frame {
                request_id,
                message,
            },
        );
    }

    /// Queues `frame` for node `to`, opening the link on first use.
    fn send_frame(self: &Rc<Self>, to: NodeId, frame: Frame) {
        let mut links = self.links.borrow_mut();
        let queue = match links.entry(to) {
            std::collections::hash_map::Entry::Occupied(queue) => queue.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let Some(addr) = self.peers.borrow().get(&to).copied() else {
                    // Not a member of the view in use: the core times it out.
                    tracing::warn!(shard = self.id, node = %to, "message for an unknown node dropped");
                    return;
                };
                let (tx, rx) = local_channel::new_bounded(PEER_QUEUE_FRAMES_MAX);
                let link = run_link(Rc::downgrade(self), to, addr, rx, self.stop.clone());
                match glommio::spawn_local_into(link, self.foreground) {
                    Ok(task) => {
                        task.detach();
                    }
                    Err(_) => return,
                }
                slot.insert(tx)
            }
        };
        if queue.try_send(frame).is_err() {
            tracing::debug!(shard = self.id, node = %to, "peer queue full; message dropped");
        }
    }

    /// HELLO for an outbound peer connection.
    fn peer_hello(&self) -> Frame {
        Frame {
            request_id: PEER_HELLO_ID,
            message: Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::Peer,
                cluster_name: self.cluster_name.clone(),
                node_name: Some(peer::hello_name(self.node_id, &self.node_name)),
            }),
        }
    }

    /// A request from node `from` received by this shard: run here or on the owner shard.
    async fn route_peer(self: &Rc<Self>, from: NodeId, message: Message) -> Message {
        let partition = match peer::request_partition(&message) {
            Ok(p) => p,
            Err(e) => return Message::Error(e),
        };
        // Node-wide cluster messages (gossip) belong to the first shard, which owns membership.
        let owner = partition.map_or(0, |p| shard_of(PartitionId(p), self.shard_count));
        if owner == self.id {
            self.serve_peer(from, message).await
        } else {
            // The partition field only matters for client requests; peer requests carry theirs.
            self.forward(owner, partition.unwrap_or(0), message, Some(from))
                .await
        }
    }

    /// Runs a request from node `from` through this shard's core and returns its answer.
    async fn serve_peer(self: &Rc<Self>, from: NodeId, message: Message) -> Message {
        // Node-wide CLUSTER messages of membership go to it (on shard 0), the rest to the core.
        let message = match message {
            Message::Cluster(c) if c.partition.is_none() => {
                match self.serve_membership(from, c).await {
                    Ok(answer) => return answer,
                    Err(c) => Message::Cluster(c),
                }
            }
            other => other,
        };
        let id = self.next_inbound.get();
        self.next_inbound.set(id + 1);
        let msg = match peer::request_from_wire(id, message) {
            Ok(m) => m,
            Err(e) => return Message::Error(e),
        };
        let (tx, rx) = local_channel::new_bounded(1);
        self.inbound.borrow_mut().insert(id, tx);
        let outputs = self
            .core
            .borrow_mut()
            .handle_peer(self.clock.now_ms(), from, msg);
        self.carry_out(outputs);
        // The core answers every request by its deadline; this bound only guards the waiter.
        let bound = Duration::from_millis(self.request_timeout_ms.saturating_mul(2));
        match unless(rx.recv(), glommio::timer::sleep(bound)).await {
            Some(Some(answer)) => answer,
            Some(None) => error_message(ErrorCode::ShuttingDown, "the shard stopped"),
            None => {
                self.inbound.borrow_mut().remove(&id);
                error_message(ErrorCode::Timeout, "no answer from the coordinator")
            }
        }
    }

    /// Ends the ticker and the peer links, waits for storage work, and fails whatever still
    /// waits for the core, so the shard can be closed.
    async fn stop_replication(self: &Rc<Self>) {
        self.stop.cancel();
        self.links.borrow_mut().clear();
        let _ = self.store_work.close().await;
        self.clients.borrow_mut().clear();
        self.inbound.borrow_mut().clear();
        // Tasks whose waiter was just dropped finish on their next poll; give them a moment.
        for _ in 0..STOP_POLLS_MAX {
            if Rc::strong_count(self) == 1 {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The CPU shares of the background queue: [`BACKGROUND_SHARES_MAX`] scaled by the admission
/// controller's share, read by glommio every adjustment period.
struct BackgroundShares {
    share: Cell<f64>,
}

impl Default for BackgroundShares {
    fn default() -> Self {
        BackgroundShares {
            share: Cell::new(1.0),
        }
    }
}

impl glommio::SharesManager for BackgroundShares {
    fn shares(&self) -> usize {
        scaled_shares(BACKGROUND_SHARES_MAX, self.share.get())
    }
}

/// `max` shares scaled by `share`, at least 1.
fn scaled_shares(max: usize, share: f64) -> usize {
    ((max as f64 * share) as usize).clamp(1, max)
}

impl Shard {
    /// Runs the admission controller and applies a changed share to the background queue, the
    /// engine's compaction queue and the core; publishes the coordinator's figures.
    fn admit(&self, now: u64) {
        let changed = self.admission.borrow_mut().tick(now);
        if let Some(share) = changed {
            self.background_shares.share.set(share);
            ringkv_engine::set_compaction_shares(scaled_shares(
                self.engine.config().compaction_shares,
                share,
            ));
            self.core.borrow_mut().set_background_share(share);
        }
        let core = self.core.borrow();
        self.metrics.set_core(
            &CoreFigures {
                stats: core.stats(),
                hints: core.hint_count() as u64,
                hint_bytes: core.hint_bytes(),
                hints_in_flight: core.hints_in_flight() as u64,
                peers_suspected: core.suspected_count(now) as u64,
                handoffs: core.handoff_count() as u64,
                trees_loading: core.trees_loading_count() as u64,
            },
            self.view_version.get(),
        );
        self.metrics.set_admission(&self.admission.borrow().state());
    }
}

/// Tells the core of the shard behind `shard` that `node` cannot be reached.
fn peer_unreachable(shard: &Weak<Shard>, node: NodeId) {
    if let Some(shard) = shard.upgrade() {
        let outputs = shard
            .core
            .borrow_mut()
            .handle_unreachable(shard.clock.now_ms(), node);
        shard.carry_out(outputs);
    }
}

/// Calls `tick` with the shard every `period` until `stop` is cancelled, the shard is gone, or
/// `tick` returns `false`. The shard is held only while `tick` runs.
async fn run_periodic(
    shard: Weak<Shard>,
    stop: StopToken,
    period: Duration,
    mut tick: impl FnMut(&Rc<Shard>) -> bool,
) {
    loop {
        let slept = unless(glommio::timer::sleep(period), stop.cancelled()).await;
        if slept.is_none() {
            return;
        }
        let Some(shard) = shard.upgrade() else {
            return;
        };
        if !tick(&shard) {
            return;
        }
    }
}

/// Drives the core's timers: every [`TICK_MS`], a tick if the core has something due.
async fn run_ticks(shard: Weak<Shard>, stop: StopToken) {
    run_periodic(shard, stop, Duration::from_millis(TICK_MS), |shard| {
        let now = shard.clock.now_ms();
        shard.admit(now);
        let due = shard
            .core
            .borrow()
            .next_deadline()
            .is_some_and(|deadline| deadline <= now);
        if due {
            let outputs = shard.core.borrow_mut().handle_tick(now);
            shard.carry_out(outputs);
        }
        true
    })
    .await;
}

/// The outbound link of one shard to one peer node: connects when there is something to send,
/// writes queued frames in batches, hands answers to the core, and reports failures.
async fn run_link(
    shard: Weak<Shard>,
    node: NodeId,
    addr: SocketAddr,
    queue: LocalReceiver<Frame>,
    stop: StopToken,
) {
    let mut backoff_ms = PEER_BACKOFF_MIN_MS;
    loop {
        let Some(Some(first)) = unless(queue.recv(), stop.cancelled()).await else {
            return;
        };
        // A connect is bounded like a replica request: a slower peer is as good as down.
        let Some((hello, limits, connect_ms)) = shard
            .upgrade()
            .map(|s| (s.peer_hello(), s.limits, s.replica_timeout_ms))
        else {
            return;
        };
        let connected = unless(
            connect_peer(addr, hello, limits),
            glommio::timer::sleep(Duration::from_millis(connect_ms)),
        )
        .await;
        let stream = match connected {
            Some(Ok(stream)) => Some(stream),
            Some(Err(e)) => {
                tracing::debug!(node = %node, %addr, error = %e, "cannot connect to peer");
                None
            }
            None => {
                tracing::debug!(node = %node, %addr, "peer connect timed out");
                None
            }
        };
        match stream {
            None => {
                drop(first);
                peer_unreachable(&shard, node);
                // What was queued meanwhile failed with the connection; drop it.
                while let Some(Some(_)) = futures_lite::future::poll_once(queue.recv()).await {}
                let waited = unless(
                    glommio::timer::sleep(Duration::from_millis(backoff_ms)),
                    stop.cancelled(),
                )
                .await;
                if waited.is_none() {
                    return;
                }
                backoff_ms = (backoff_ms * 2).min(PEER_BACKOFF_MAX_MS);
            }
            Some(stream) => {
                tracing::info!(node = %node, %addr, "peer link up");
                backoff_ms = PEER_BACKOFF_MIN_MS;
                let (reader, writer) = futures_lite::io::split(stream);
                let stopped = futures_lite::future::or(
                    async {
                        futures_lite::future::or(
                            read_answers(&shard, node, reader, limits),
                            write_requests(writer, first, &queue, limits),
                        )
                        .await;
                        false
                    },
                    async {
                        stop.cancelled().await;
                        true
                    },
                )
                .await;
                if stopped {
                    return;
                }
                tracing::info!(node = %node, %addr, "peer link lost");
                peer_unreachable(&shard, node);
            }
        }
    }
}

/// Opens a peer connection and completes the handshake.
async fn connect_peer(addr: SocketAddr, hello: Frame, limits: Limits) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut out = Vec::new();
    encode_frame(&hello, &limits, &mut out).map_err(|e| e.to_string())?;
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        if let Some((frame, _)) = decode_frame(&buf, &limits).map_err(|e| e.to_string())? {
            // Nothing else was sent, so nothing else can be buffered behind the reply.
            return match frame.message {
                Message::HelloOk(_) => Ok(stream),
                Message::Error(e) => Err(format!("refused: {}: {}", e.code, e.message)),
                other => Err(format!("answered HELLO with {}", other.kind())),
            };
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed during the handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads answers on an outbound peer connection and gives them to the core, until the
/// connection fails or sends something undecodable.
async fn read_answers(
    shard: &Weak<Shard>,
    node: NodeId,
    mut reader: futures_lite::io::ReadHalf<TcpStream>,
    limits: Limits,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let mut used = 0;
        loop {
            match decode_frame(&buf[used..], &limits) {
                Ok(None) => break,
                Ok(Some((frame, len))) => {
                    used += len;
                    let Some(shard) = shard.upgrade() else {
                        return;
                    };
                    // Membership's requests share the link; their ids are marked.
                    if members::is_membership_id(frame.request_id) {
                        shard.membership_answer(node, frame);
                        continue;
                    }
                    let msg = peer::answer_from_wire(frame.request_id, frame.message);
                    let outputs =
                        shard
                            .core
                            .borrow_mut()
                            .handle_peer(shard.clock.now_ms(), node, msg);
                    shard.carry_out(outputs);
                }
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "undecodable frame from peer");
                    return;
                }
            }
        }
        buf.drain(..used);
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes queued requests on an outbound peer connection, batched like replies.
async fn write_requests(
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    first: Frame,
    queue: &LocalReceiver<Frame>,
    limits: Limits,
) {
    let mut out = Vec::new();
    let mut next = Some(first);
    loop {
        let frame = match next.take() {
            Some(frame) => frame,
            None => match queue.recv().await {
                Some(frame) => frame,
                None => return,
            },
        };
        out.clear();
        encode_request(&frame, &limits, &mut out);
        while out.len() < WRITE_BATCH_BYTES_MAX {
            match futures_lite::future::poll_once(queue.recv()).await {
                Some(Some(frame)) => encode_request(&frame, &limits, &mut out),
                Some(None) | None => break,
            }
        }
        if writer.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Appends a request frame to `out`; one that cannot be encoded (an object over the frame
/// limit) is dropped and the core times it out.
fn encode_request(frame: &Frame, limits: &Limits, out: &mut Vec<u8>) {
    let start = out.len();
    if let Err(e) = encode_frame(frame, limits, out) {
        out.truncate(start);
        tracing::warn!(kind = %frame.message.kind(), error = %e, "peer request not sent");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// A shard whose peer never joins leaves the join once the node stops, although the join
    /// keeps its executor busy while it waits.
    #[test]
    fn a_mesh_join_ends_when_the_node_stops_before_every_shard_joined() {
        let origin = NodeStop::new();
        let foreign = origin.foreign_child();
        let joining = Arc::new(AtomicBool::new(false));
        let seen = joining.clone();
        let shard = LocalExecutorBuilder::default()
            .spawn(move || async move {
                let stop = StopToken::attached(&foreign);
                let mesh = MeshBuilder::<u8, Full>::full(2, 1);
                let join = join_mesh(mesh, &stop);
                seen.store(true, Ordering::SeqCst);
                join.await.is_none()
            })
            .expect("an executor starts");
        while !joining.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // Let the join spin a little first, as a shard waiting for a failed one does; how long
        // is immaterial.
        std::thread::sleep(Duration::from_millis(20));
        origin.cancel();
        assert!(shard.join().expect("the shard's executor ends"));
    }
}
