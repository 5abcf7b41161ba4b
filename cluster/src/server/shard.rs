//! One shard's life on its executor: open the engine, lease epochs, join the meshes, start the
//! core and the listeners, serve, drain at shutdown and hand the engine back for closing.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::net::TcpListener;
use glommio::sync::{ForeignCancellation, Gate};
use glommio::{Latency, Shares};
use ringkv_engine::{Durability, Engine, EngineConfig};

use ringkv_core::admission::{AdmissionConfig, AdmissionController};
use ringkv_core::coordinator::{Core, CoreConfig, EpochLease, StoreKey};
use ringkv_core::membership::Membership;

use crate::epochs::{self, EPOCH_LEASE_SIZE, EPOCHS_FILE};
use crate::metrics::{self, ShardMetrics};
use crate::replica::{HINT_KEY_PREFIX_BYTES, HINT_PARTITION_BASE, engine_key_bytes_max};
use crate::session::NodeInfo;

use super::Event;
use super::connection::{Listeners, serve_listeners};
use super::driver::{BackgroundShares, run_ticks};
use super::readiness::Readiness;
use super::request::{MeshService, spawn_reply_loops};
use super::stop::StopToken;
use super::stop::unless;
use super::store::{run_durable_waits, scan_hints};
use super::view::{Control, ShardView};
use super::{
    Clock, STOP_POLLS_MAX, ServeConfig, ServeError, Shard, ShardReply, ShardRequest, Waiters,
    runtime,
};
use super::{members, trees};

/// What a shard's core starts from, and how it learns of later views.
pub(super) struct Replication {
    pub(super) view: Arc<ShardView>,
    pub(super) clock: Clock,
    /// The node's membership, for shard 0.
    pub(super) membership: Option<Membership>,
    /// Stops the node (shard 0: a removed node that handed everything off).
    pub(super) stop_node: mpsc::Sender<Event>,
}

/// One shard's life: open its engine, start (listeners, meshes), serve until the node stops, close
/// the engine. Once opened, the engine is closed however the start went.
pub(super) async fn run_shard(
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
    let dir = cfg.settings.data_dir.join(format!("shard-{id}"));
    let mut ecfg = EngineConfig::new(&dir);
    // Hint keys carry the home node's id before the replica key.
    ecfg.key_bytes_max =
        engine_key_bytes_max(cfg.settings.limits.key_bytes_max) + HINT_KEY_PREFIX_BYTES;
    // The engine stores whole objects (every sibling and the clock), not single values; the
    // node's value limit is checked on client requests.
    ecfg.value_bytes_max = cfg.object_bytes_max();
    ecfg.default_durability = cfg.settings.durability;
    ecfg.cache_bytes = cfg.cache_bytes_per_shard();
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
    let sync = cfg.settings.durability == Durability::Sync;
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
    let hints = match scan_hints(&engine, id, cfg.cpus.shards()).await {
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
            core.trees_loading(trees::partitions(id, cfg.cpus.shards()));
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
pub(super) fn start_core(
    id: usize,
    cfg: &ServeConfig,
    replication: Replication,
    lease: EpochLease,
    floor: u32,
    hints: Vec<(StoreKey, u64)>,
) -> (Core, Replication) {
    let mut core_cfg = CoreConfig::new(cfg.node_id);
    core_cfg.buckets = cfg.settings.buckets.clone();
    core_cfg.durable_writes = cfg.settings.durability == Durability::Sync;
    core_cfg.epoch_floor = Some(floor);
    core_cfg.request_timeout_ms = cfg.settings.request_timeout_ms;
    core_cfg.replica_timeout_ms = cfg.settings.replica_timeout_ms;
    core_cfg.hint_retry_ms = cfg.settings.hint_retry_ms;
    core_cfg.ae_interval_ms = cfg.settings.ae_interval_ms;
    core_cfg.ae_keys_max = cfg.settings.ae_keys_max;
    core_cfg.tombstone_grace_ms = cfg.settings.tombstone_grace_ms;
    core_cfg.expiry_grace_ms = cfg.settings.expiry_grace_ms;
    core_cfg.hint_bytes_max = cfg.settings.hint_bytes_max / cfg.cpus.shards().max(1) as u64;
    core_cfg.heartbeat_ms = cfg.settings.heartbeat_ms;
    core_cfg.phi_threshold = f64::from(cfg.settings.phi_threshold);
    core_cfg.object_bytes_max = cfg.object_bytes_max();
    core_cfg.shard = u32::try_from(id).expect("serve bounds the shard count");
    core_cfg.shards = u32::try_from(cfg.cpus.shards()).expect("serve bounds the shard count");
    core_cfg.target_n = cfg.settings.buckets.max_n();
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
pub(super) async fn mark_floor(id: usize, dir: PathBuf, floor: u32) -> Result<(), ServeError> {
    glommio::executor()
        .spawn_blocking(move || epochs::write_floor(&dir, Some(floor)))
        .await
        .map_err(|source| ServeError::Epochs { shard: id, source })
}

/// Flushes, syncs and closes a shard's engine, releasing its directory.
pub(super) async fn close_engine(
    id: usize,
    engine: Engine,
    dir: PathBuf,
) -> Result<(), ServeError> {
    engine.close().await.map_err(|source| ServeError::Engine {
        shard: id,
        dir,
        source,
    })?;
    tracing::info!(shard = id, "shard closed");
    Ok(())
}

/// What a shard serves with, once every shard has started.
pub(super) struct Started {
    pub(super) listener: TcpListener,
    pub(super) resp_listener: Option<TcpListener>,
    pub(super) peer_listener: Option<TcpListener>,
    pub(super) admin_listener: Option<TcpListener>,
    pub(super) requests: (Senders<ShardRequest>, Receivers<ShardRequest>),
    pub(super) replies: (Senders<ShardReply>, Receivers<ShardReply>),
    pub(super) control: (Senders<Control>, Receivers<Control>),
}

/// The node's channel meshes between shards, as each shard joins them.
pub(super) struct Meshes {
    pub(super) requests: MeshBuilder<ShardRequest, Full>,
    pub(super) replies: MeshBuilder<ShardReply, Full>,
    /// Views from shard 0 to the others.
    pub(super) control: MeshBuilder<Control, Full>,
}

/// Binds the shard's listeners and joins the meshes. Joining completes only once every shard
/// has joined, so it is abandoned when the node stops first (another shard failed to start):
/// then the answer is `None`.
pub(super) async fn start_shard(
    id: usize,
    cfg: &ServeConfig,
    meshes: Meshes,
    stop: &StopToken,
) -> Result<Option<Started>, ServeError> {
    let listener = TcpListener::bind(cfg.settings.listen).map_err(|e| {
        runtime(
            format!("shard {id}: cannot listen on {}", cfg.settings.listen),
            e,
        )
    })?;
    let resp_listener = match cfg.settings.resp_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .map_err(|e| runtime(format!("shard {id}: cannot listen on {addr}"), e))?,
        ),
        None => None,
    };
    let peer_listener = match cfg.settings.peer_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .map_err(|e| runtime(format!("shard {id}: cannot listen on {addr}"), e))?,
        ),
        None => None,
    };
    let admin_listener = match cfg.settings.admin_listen {
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
pub(super) async fn join_mesh<T: Send + 'static>(
    mesh: MeshBuilder<T, Full>,
    stop: &StopToken,
) -> Option<glommio::Result<(Senders<T>, Receivers<T>), ()>> {
    unless(mesh.join(), stop.cancelled()).await
}

/// Serves until the node stops, drains, and hands the engine back for closing.
pub(super) async fn serve_shard(
    id: usize,
    cfg: &ServeConfig,
    engine: Engine,
    started: Started,
    shutdown: StopToken,
    all_metrics: Arc<[Arc<ShardMetrics>]>,
    (core, replication): (Core, Replication),
) -> Result<(Engine, u32), ServeError> {
    let Started {
        listener,
        resp_listener,
        peer_listener,
        admin_listener,
        requests: (req_tx, req_rx),
        replies: (rep_tx, rep_rx),
        control: (control_tx, control_rx),
    } = started;
    let view = replication.view.clone();
    let shard = new_shard(
        id,
        cfg,
        engine,
        (req_tx, control_tx),
        &all_metrics,
        core,
        replication,
    );
    glommio::spawn_local_into(
        run_ticks(Rc::downgrade(&shard), shard.stop.clone()),
        shard.foreground,
    )
    .map_err(|e| runtime(format!("shard {id}: ticker"), e))?
    .detach();
    shard
        .store_work
        .spawn_into(
            run_durable_waits(Rc::downgrade(&shard), shard.stop.clone()),
            shard.foreground,
        )
        .map_err(|e| runtime(format!("shard {id}: durable writes"), e))?
        .detach();
    shard.start_view(&view);
    shard.start_membership(shard.stop.clone());
    shard.spawn_tree_load(trees::partitions(id, shard.shard_count));
    spawn_engine_refresh(&shard, shutdown.clone());
    spawn_control_loops(&shard, control_rx)?;
    spawn_reply_loops(&shard.waiting, rep_rx);
    let mesh = MeshService::start(&shard, req_rx, rep_tx, cfg.settings.peer_inflight_max);

    tracing::info!(shard = id, addr = %cfg.settings.listen, "shard serving");
    let listeners = Listeners {
        client: listener,
        resp: resp_listener,
        peer: peer_listener,
        admin: admin_listener,
        readiness: Readiness::new().map_err(|e| runtime(format!("shard {id}: epoll"), e))?,
    };
    serve_listeners(
        &shard,
        listeners,
        &shutdown,
        &all_metrics,
        cfg.settings.shutdown_drain_ms,
    )
    .await;
    // No request from this shard can follow; peers' loops end once every shard got here.
    shard.requests.close();
    shard.control.close();
    mesh.finish().await;
    shard.stop_replication().await;
    let shard = Rc::try_unwrap(shard)
        .map_err(|_| runtime(format!("shard {id}"), "tasks still hold the shard at close"))?;
    // Tombstone reaping may have raised the floor during the run.
    let floor = shard.core.borrow().epoch_floor();
    Ok((shard.engine, floor))
}

/// The shard's state, with its task queues and its core, before anything runs.
fn new_shard(
    id: usize,
    cfg: &ServeConfig,
    engine: Engine,
    (requests, control): (Senders<ShardRequest>, Senders<Control>),
    all_metrics: &Arc<[Arc<ShardMetrics>]>,
    core: Core,
    replication: Replication,
) -> Rc<Shard> {
    let Replication {
        view,
        clock,
        membership,
        stop_node,
    } = replication;
    let shard_count = cfg.cpus.shards();
    let dir = cfg.settings.data_dir.join(format!("shard-{id}"));
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
        p99_threshold_us: cfg.settings.admission_p99_threshold_us,
        ..AdmissionConfig::default()
    });
    Rc::new(Shard {
        id,
        shard_count,
        engine,
        info: NodeInfo {
            cluster_name: cfg.settings.cluster_name.clone(),
            node_name: cfg.settings.node_name.clone(),
            shard_count: u16::try_from(shard_count).expect("serve bounds the shard count"),
        },
        limits: cfg.settings.limits,
        inflight_per_connection_max: cfg.settings.inflight_per_connection_max,
        requests,
        waiting: Rc::new(Waiters::default()),
        metrics: all_metrics[id].clone(),
        all_metrics: all_metrics.clone(),
        request_timeout_ms: cfg.settings.request_timeout_ms,
        replica_timeout_ms: cfg.settings.replica_timeout_ms,
        value_bytes_max: cfg.settings.value_bytes_max,
        core: RefCell::new(core),
        admission: RefCell::new(admission),
        background,
        background_shares,
        clock,
        fed_at: Cell::new(0),
        resp_clients: Cell::new(0),
        node_id: cfg.node_id,
        node_name: cfg.settings.node_name.clone(),
        cluster_name: cfg.settings.cluster_name.clone(),
        clients: Rc::new(Waiters::default()),
        inbound: Rc::new(Waiters::default()),
        links: RefCell::new(HashMap::new()),
        members: membership.map(|m| {
            members::Driver::new(
                m,
                cfg.settings.data_dir.clone(),
                cfg.settings.peer_listen,
                all_metrics.clone(),
                stop_node,
            )
        }),
        peers: RefCell::new(view.peers.clone()),
        view_version: Cell::new(view.version),
        control,
        epochs_path: dir.join(EPOCHS_FILE),
        floor_file: cfg.settings.durability == Durability::Sync,
        store_work: Gate::new(),
        finished: Default::default(),
        durable_waits: Default::default(),
        durable_watcher: Cell::new(None),
        stop: StopToken::new(),
        foreground,
    })
}

/// Publishes the engine's figures for the admin listener every `ENGINE_REFRESH_MS` until the
/// node stops; holds the shard weakly, so the engine can still be closed.
fn spawn_engine_refresh(shard: &Rc<Shard>, stop: StopToken) {
    let weak = Rc::downgrade(shard);
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
            let period = Duration::from_millis(metrics::ENGINE_REFRESH_MS);
            if unless(glommio::timer::sleep(period), stop.cancelled())
                .await
                .is_none()
            {
                break;
            }
        }
    })
    .detach();
}

/// Applies the views and transfer reports shard 0 sends over the control mesh. Holds the shard
/// weakly: the loops must not keep it from closing.
fn spawn_control_loops(
    shard: &Rc<Shard>,
    mut control: Receivers<Control>,
) -> Result<(), ServeError> {
    for (_, rx) in control.streams() {
        let weak = Rc::downgrade(shard);
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
            shard.foreground,
        )
        .map_err(|e| runtime(format!("shard {}: control loop", shard.id), e))?
        .detach();
    }
    Ok(())
}

impl Shard {
    /// Ends the ticker and the peer links, waits for storage work, and fails whatever still
    /// waits for the core, so the shard can be closed.
    pub(super) async fn stop_replication(self: &Rc<Self>) {
        self.stop.cancel();
        self.links.borrow_mut().clear();
        let _ = self.store_work.close().await;
        self.clients.clear();
        self.inbound.clear();
        // Tasks whose waiter was just dropped finish on their next poll; give them a moment.
        for _ in 0..STOP_POLLS_MAX {
            if Rc::strong_count(self) == 1 {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use glommio::LocalExecutorBuilder;
    use glommio::sync::CancellationToken as NodeStop;

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
