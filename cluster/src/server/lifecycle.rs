//! The node's life on the calling thread: checks before start, one executor per shard, the
//! signal executor, and the wait for every shard's end ([`serve`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::sync::{CancellationToken as NodeStop, ForeignCancellation};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use ringkv_core::membership::{Membership, MembershipConfig};

use crate::cluster_state;
use crate::identity::{self, Identity};
use crate::metrics::ShardMetrics;
use crate::preflight;
use crate::route::PARTITIONS;
use ringkv_core::NodeId;

use super::stop::StopToken;
use super::view::{CONTROL_QUEUE_MESSAGES_MAX, Control, ShardView};

use super::shard::{Meshes, Replication, run_shard};
use super::stop::unless;
use super::{Clock, Event, ServeConfig, ServeError, ShardCpus, ShardReply, ShardRequest, runtime};

/// Runs a node until SIGTERM or SIGINT, then shuts it down cleanly.
///
/// If a shard fails (to start, or to close), every other shard is stopped and closes its engine,
/// and the first error is returned once all of them have ended.
///
/// Must be called from a thread that is not a glommio executor, before any other thread is
/// started (the signal mask is inherited by threads started afterwards).
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    let mut cfg = cfg;
    check_config(&mut cfg)?;
    match &cfg.cpus {
        ShardCpus::Pinned(cpus) => tracing::info!(?cpus, "each shard pinned to its own CPU"),
        ShardCpus::Shared { shards, cpus } => tracing::info!(
            shards,
            ?cpus,
            "shards not pinned: they share these CPUs with each other and other processes \
             (a shard per allowed CPU pins each, e.g. `taskset -c 0 ringkv serve --shards 1`)"
        ),
    }
    tracing::info!(
        bytes_per_shard = cfg.cache_bytes_per_shard(),
        shards = cfg.cpus.shards(),
        "value cache budget"
    );
    let syncing = cfg.settings.syncing_buckets();
    if !syncing.is_empty() {
        tracing::warn!(
            buckets = %syncing.join(", "),
            "durability is buffered, but writes to these buckets still wait for synced \
             acknowledgements: their tables set dw above 0 (dw = 0 acknowledges once buffered)"
        );
    }
    let shards = cfg.cpus.shards();
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
        None => identity::resolve(&cfg.settings.data_dir, Some(cfg.node_id.0))
            .map_err(|e| ServeError::Identity(e.to_string()))?,
    };
    let target_n = cfg.settings.buckets.max_n();
    let membership = start_membership(&cfg, &identity, &members, target_n)?;
    let view = Arc::new(ShardView::from_view(cfg.node_id, &membership.view()));
    // One executor per shard and the signal executor.
    let budget = preflight::check(shards + 1)?;
    // Written only now: a node refused by the checks above leaves its data directory untouched.
    identity::persist(&cfg.settings.data_dir, &identity)
        .map_err(|e| ServeError::Identity(e.to_string()))?;
    let clock = Clock::new();
    glommio::signal::block(&[libc::SIGTERM, libc::SIGINT])
        .map_err(|e| runtime("cannot block SIGTERM and SIGINT", e))?;

    // Whatever stops the node cancels this token: the first signal, or the end of any shard (a
    // shard ends before a signal only when it failed, and then the others must stop too). It
    // lives on this thread, which runs no executor; each executor attaches a foreign child of it.
    let stop = NodeStop::new();
    let (events_tx, events) = mpsc::channel::<Event>();
    let signal_thread = watch_signals(stop.foreign_child(), events_tx.clone(), &budget)?;
    let start = ShardStart {
        cfg: &cfg,
        view,
        clock,
        membership: Some(membership),
        stop: &stop,
        events: events_tx,
        budget: &budget,
    };
    let (threads, mut first_error) = start.spawn_all();
    if first_error.is_some() {
        stop.cancel();
    }
    wait_for_shards(threads, &events, &stop, &budget, &mut first_error);
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

/// Checks the settings `serve` cannot run with, and that nothing else listens on the node's
/// addresses (resolving port 0 to a free port, so every shard binds the same one).
fn check_config(cfg: &mut ServeConfig) -> Result<(), ServeError> {
    let shards = cfg.cpus.shards();
    if shards == 0 || shards > crate::route::SHARDS_MAX {
        return Err(ServeError::Config(format!(
            "shard count {shards} outside [1, {}]",
            crate::route::SHARDS_MAX
        )));
    }
    // The machine's memory is read once, here, not by every shard.
    cfg.settings
        .cache_bytes
        .get_or_insert_with(crate::preflight::default_cache_bytes);
    cfg.settings.listen = check_port_free(cfg.settings.listen)?;
    if let Some(addr) = cfg.settings.resp_listen {
        let addr = check_port_free(addr)?;
        if addr == cfg.settings.listen {
            return Err(ServeError::Config(format!(
                "the RESP listener cannot share the client protocol's address {addr}"
            )));
        }
        cfg.settings.resp_listen = Some(addr);
    }
    if let Some(addr) = cfg.settings.admin_listen {
        let addr = check_port_free(addr)?;
        if addr == cfg.settings.listen || Some(addr) == cfg.settings.resp_listen {
            return Err(ServeError::Config(format!(
                "the admin listener cannot share another listener's address {addr}"
            )));
        }
        cfg.settings.admin_listen = Some(addr);
    }
    if let Some(addr) = cfg.settings.peer_listen {
        let addr = check_port_free(addr)?;
        if addr == cfg.settings.listen
            || Some(addr) == cfg.settings.resp_listen
            || Some(addr) == cfg.settings.admin_listen
        {
            return Err(ServeError::Config(format!(
                "the peer listener cannot share another listener's address {addr}"
            )));
        }
        cfg.settings.peer_listen = Some(addr);
    }
    if !cfg.peers.is_empty() && cfg.settings.peer_listen.is_none() {
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
    cfg.settings
        .buckets
        .validate()
        .map_err(|e| ServeError::Config(e.to_string()))
}

/// What every shard's executor starts from.
struct ShardStart<'a> {
    cfg: &'a ServeConfig,
    view: Arc<ShardView>,
    clock: Clock,
    /// The node's membership, handed to the first shard.
    membership: Option<Membership>,
    stop: &'a NodeStop,
    events: mpsc::Sender<Event>,
    budget: &'a preflight::MemlockBudget,
}

impl ShardStart<'_> {
    /// Starts one executor per shard where [`ShardCpus`] places it. Stops at the first that
    /// cannot be started and returns its error beside the threads already running (they wait in
    /// the mesh for the missing shard until the node's stop releases them).
    fn spawn_all(mut self) -> (Vec<Option<ExecutorJoinHandle<()>>>, Option<ServeError>) {
        let cfg = self.cfg;
        let shards = cfg.cpus.shards();
        let requests =
            MeshBuilder::<ShardRequest, _>::full(shards, cfg.settings.mesh_queue_messages_max);
        let replies =
            MeshBuilder::<ShardReply, _>::full(shards, cfg.settings.mesh_queue_messages_max);
        let control = MeshBuilder::<Control, _>::full(shards, CONTROL_QUEUE_MESSAGES_MAX);
        let metrics: Arc<[Arc<ShardMetrics>]> = (0..shards)
            .map(|_| Arc::new(ShardMetrics::default()))
            .collect();
        let mut threads: Vec<Option<ExecutorJoinHandle<()>>> = (0..shards).map(|_| None).collect();
        let placements = match cfg.cpus.placements() {
            Ok(p) => p,
            Err(e) => return (threads, Some(e)),
        };
        for (id, (placement, place)) in placements.into_iter().enumerate() {
            let meshes = Meshes {
                requests: requests.clone(),
                replies: replies.clone(),
                control: control.clone(),
            };
            let (cfg, metrics, view, clock) =
                (cfg.clone(), metrics.clone(), self.view.clone(), self.clock);
            // The node's membership lives on its first shard.
            let membership = if id == 0 {
                self.membership.take()
            } else {
                None
            };
            let shutdown = self.stop.foreign_child();
            let stop_node = self.events.clone();
            let report = EndReport {
                id,
                events: Some(self.events.clone()),
            };
            let spawned = LocalExecutorBuilder::new(placement)
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
                    let what = format!("cannot start shard {id} on {place}");
                    let error = preflight::executor_error(what, e, self.budget);
                    return (threads, Some(error));
                }
            }
        }
        (threads, None)
    }
}

/// Waits until every started shard has reported its end, cancelling `stop` at the first signal
/// or the first end (the node cannot go on without a shard), then joins the threads. Keeps the
/// first error in `first_error`.
fn wait_for_shards(
    mut threads: Vec<Option<ExecutorJoinHandle<()>>>,
    events: &mpsc::Receiver<Event>,
    stop: &NodeStop,
    budget: &preflight::MemlockBudget,
    first_error: &mut Option<ServeError>,
) {
    let mut running = threads.iter().filter(|t| t.is_some()).count();
    let mut ended = vec![false; threads.len()];
    while running > 0 {
        let Ok(event) = events.recv() else {
            // Each running shard's report holds a sender until it has sent, so this cannot be.
            keep_first(
                first_error,
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
                keep_first(first_error, e);
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
                Some(Err(e)) => Err(preflight::executor_error(format!("shard {id}"), e, budget)),
                Some(Ok(())) | None => {
                    Err(runtime(format!("shard {id}"), "ended without a result"))
                }
            },
        };
        if let Err(e) = result {
            keep_first(first_error, e);
        }
        // However a shard ended, the node cannot go on without it.
        stop.cancel();
    }
    for (id, thread) in threads.into_iter().enumerate() {
        if let Some(Err(e)) = thread.map(ExecutorJoinHandle::join) {
            keep_first(first_error, runtime(format!("shard {id}"), e));
        }
    }
}

/// Reports a shard's end to [`serve`] exactly once, however the shard's thread ends: dropped
/// without [`EndReport::send`] (its executor was never built, or it panicked), it reports an end
/// without a result, so `serve` never waits for a shard that will not report.
pub(super) struct EndReport {
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
        peer_addr: cfg
            .settings
            .peer_listen
            .map(|a| a.to_string())
            .unwrap_or_default(),
        client_addr: cfg.settings.listen.to_string(),
        gossip_ms: cfg.settings.gossip_ms,
        // Membership's requests (gossip, join, commit) are answered at once by a live peer.
        request_timeout_ms: cfg.settings.replica_timeout_ms,
        target_n,
        partitions: PARTITIONS,
        incarnation: identity.incarnation,
        fresh: identity.fresh,
        contact_seeds: cfg.settings.contact_seeds.clone(),
    };
    let persisted = cluster_state::read(&cfg.settings.data_dir)
        .map_err(|e| ServeError::Membership(e.to_string()))?;
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
                        let addr = cfg.peers.get(id).copied().or(cfg.settings.peer_listen);
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
