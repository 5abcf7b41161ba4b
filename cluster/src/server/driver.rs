//! The driver of a shard's core: the only code that feeds the core ([`Shard::drive`], one
//! [`Input`] at a time, at the shard's clock) and carries out its outputs (storage, scans,
//! replies, peer messages, epochs); it also runs the core's timers and admission control.
//!
//! Every other part of the shell turns what happened (a request, an answer, a finished storage
//! operation, a lost link, a new view) into an [`Input`] and hands it here, so the borrow of
//! the core, the reading of the clock and the dispatch of outputs are written once. The core is
//! never borrowed while outputs are carried out, since carrying one out can feed the core again.

use ringkv_core::NodeId;
use ringkv_core::coordinator::{EpochLease, PeerMsg, ScanPage};
use ringkv_core::object::Object;
use ringkv_core::request::KeyRequest;
use ringkv_core::ring::Ring;
use std::cell::Cell;
use std::path::Path;
use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::Bytes;
use ringkv_engine::Durability;

use ringkv_core::coordinator::{Output, StoreKey, StoreOp};

use crate::epochs::{self, EPOCH_LEASE_SIZE};
use crate::metrics::CoreFigures;
use crate::peer::{self};

use super::stop::StopToken;
use super::store::DurableWait;

use super::stop::unless;
use super::{BACKGROUND_SHARES_MAX, Shard, TICK_MS};

/// What the shell tells the core. Each variant is one of the core's entry points.
pub(super) enum Input {
    /// A client request for a partition this shard owns (`Core::handle_client`).
    Client { req: u64, request: KeyRequest },
    /// A request or an answer from another node (`Core::handle_peer`).
    Peer { from: NodeId, msg: PeerMsg },
    /// A peer link failed or could not connect (`Core::handle_unreachable`).
    Unreachable { node: NodeId },
    /// A storage operation finished (`Core::handle_stored`).
    Stored {
        id: u64,
        result: Result<Option<Object>, String>,
    },
    /// A page of a partition was read for a transfer (`Core::handle_scanned`).
    Scanned {
        id: u64,
        result: Result<ScanPage, String>,
    },
    /// A handed-off partition was dropped from the engine (`Core::partition_dropped`).
    PartitionDropped { partition: u32 },
    /// The core's next deadline has passed (`Core::handle_tick`).
    Tick,
    /// A new view of the cluster (`Core::set_view`); at start, with the partitions the engine
    /// holds (`Core::set_stored_partitions`).
    View {
        ring: Ring,
        pending: Option<(u64, Ring)>,
        stored: Option<Vec<u32>>,
    },
    /// An operator dropped every hint (`Core::truncate_hints`).
    TruncateHints,
    /// A replica object read back by the tree load (`Core::load_replica`).
    LoadReplica { key: StoreKey, object: Object },
    /// The tree load read these partitions whole (`Core::trees_loaded`).
    TreesLoaded { partitions: Vec<u32> },
    /// A new epoch lease was persisted (`Core::handle_epochs`).
    Epochs { lease: EpochLease },
    /// A raised epoch floor was persisted (`Core::handle_floor_persisted`).
    FloorPersisted { floor: u32 },
    /// Admission control changed the background share (`Core::set_background_share`).
    BackgroundShare { share: f64 },
}

impl Shard {
    /// Feeds `input` to the core at the shard's clock and carries out what it asks for.
    pub(super) fn drive(self: &Rc<Self>, input: Input) {
        // One reading of the clock for the whole call: what follows runs without yielding, in
        // microseconds, and the core's time is in milliseconds (a reading costs more than a
        // small request's storage operation).
        self.drive_at(self.clock.now_ms(), input);
    }

    /// [`drive`](Self::drive) at `now`, a reading the caller already took (a batch of requests
    /// shares one).
    pub(super) fn drive_at(self: &Rc<Self>, now: u64, input: Input) {
        self.feed(now, input);
        // Storage operations that finished as they were issued, in the order they were issued,
        // each after the outputs it came with.
        loop {
            let next = self.finished.borrow_mut().pop_front();
            match next {
                Some(input) => self.feed(now, input),
                None => break,
            }
        }
    }

    /// An input that carrying out an output produced at once: fed to the core by [`drive`]
    /// after the outputs being carried out, in order, never in the middle of them.
    ///
    /// [`drive`]: Shard::drive
    fn report(&self, input: Input) {
        self.finished.borrow_mut().push_back(input);
    }

    /// One input to the core at `now`, and its outputs carried out.
    fn feed(self: &Rc<Self>, now: u64, input: Input) {
        // A drive nested in this one (a view applied while outputs are carried out) may have
        // fed a later reading: the core never sees its time go back.
        let now = now.max(self.fed_at.get());
        self.fed_at.set(now);
        let outputs = {
            let mut core = self.core.borrow_mut();
            match input {
                Input::Client { req, request } => core.handle_client(now, req, request),
                Input::Peer { from, msg } => core.handle_peer(now, from, msg),
                Input::Unreachable { node } => core.handle_unreachable(now, node),
                Input::Stored { id, result } => core.handle_stored(now, id, result),
                Input::Scanned { id, result } => core.handle_scanned(now, id, result),
                Input::PartitionDropped { partition } => core.partition_dropped(now, partition),
                Input::Tick => core.handle_tick(now),
                Input::View {
                    ring,
                    pending,
                    stored,
                } => {
                    let mut outputs = core.set_view(now, ring, pending);
                    if let Some(stored) = stored {
                        let mut more = core.set_stored_partitions(now, stored);
                        outputs.append(&mut more);
                        core.recycle(more);
                    }
                    outputs
                }
                Input::TruncateHints => core.truncate_hints(now).1,
                Input::LoadReplica { key, object } => {
                    core.load_replica(now, &key, &object);
                    Vec::new()
                }
                Input::TreesLoaded { partitions } => {
                    for p in partitions {
                        core.trees_loaded(p);
                    }
                    Vec::new()
                }
                Input::Epochs { lease } => {
                    core.handle_epochs(lease);
                    Vec::new()
                }
                Input::FloorPersisted { floor } => {
                    core.handle_floor_persisted(floor);
                    Vec::new()
                }
                Input::BackgroundShare { share } => {
                    core.set_background_share(share);
                    Vec::new()
                }
            }
        };
        if outputs.is_empty() {
            self.core.borrow_mut().recycle(outputs);
        } else {
            self.carry_out(outputs);
        }
    }

    /// Carries out what the core asked for. Never called with the core borrowed.
    fn carry_out(self: &Rc<Self>, mut outputs: Vec<Output>) {
        for output in outputs.drain(..) {
            match output {
                Output::Reply { req, message } => {
                    // The request task may be gone (its deadline passed first): nothing to do.
                    self.clients.answer(req, message);
                }
                Output::Answer { msg, .. } => {
                    let (id, message) = peer::to_wire(msg);
                    self.inbound.answer(id, message);
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
        // The core is not borrowed here (the calls above borrow it only for their own feeds).
        self.core.borrow_mut().recycle(outputs);
    }

    /// Runs one storage operation of the core and reports the result: a request's operation at
    /// once when it needs no wait (a cached or buffered value, a buffered write: most of them),
    /// else in a task of its own. A task per operation cost a spawn and a turn of the scheduler
    /// for each of a request's reads and writes.
    fn spawn_store(self: &Rc<Self>, id: u64, key: StoreKey, op: StoreOp) {
        // Background work (hints, anti-entropy, reaping) always runs in the background queue,
        // whose shares admission control lowers when requests suffer; only a request's own
        // operations are tried at once: first by the store's calls that never wait, which
        // build no future at all (most operations), then by polling the operation's future.
        let background = self.core.borrow().is_background(id);
        if !background && let Some(result) = self.store_now(&key, &op) {
            self.report(Input::Stored { id, result });
            return;
        }
        // A synced write waits for its flush beside the others of its group commit
        // (`store.rs`). Not once the shard stops: the watcher may be gone.
        if !background
            && !self.stop.is_cancelled()
            && let Some(appended) = self.durable_write_now(&key, &op)
        {
            match appended {
                Ok(epoch) => self.await_durable(epoch, DurableWait::Core(id)),
                Err(e) => self.report(Input::Stored { id, result: Err(e) }),
            }
            return;
        }
        let shard = self.clone();
        let mut work = Box::pin(async move { shard.store(&key, op).await });
        if !background {
            // Polled once with a waker that does nothing: a future that is not ready yet is
            // polled again by its task, and a future must wake the waker of its latest poll.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if let std::task::Poll::Ready(result) = work.as_mut().poll(&mut cx) {
                self.report(Input::Stored { id, result });
                return;
            }
        }
        let shard = self.clone();
        let queue = if background {
            self.background
        } else {
            self.foreground
        };
        let spawned = self.store_work.spawn_into(
            async move {
                let result = work.await;
                shard.drive(Input::Stored { id, result });
            },
            queue,
        );
        match spawned {
            Ok(task) => {
                task.detach();
            }
            Err(_) => {
                // Shutting down: the operation fails, so nothing waits for it.
                let result = Err("the shard is stopping".into());
                self.report(Input::Stored { id, result });
            }
        }
    }
}

impl Shard {
    /// Reads a page of a partition's replicas for a transfer or handoff and reports it, in the
    /// background queue (its shares follow the admission controller).
    pub(super) fn spawn_scan(
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
                shard.drive(Input::Scanned { id, result });
            },
            self.background,
        );
        if let Ok(task) = spawned {
            task.detach();
        }
    }
}

impl Shard {
    /// Drops a handed-off partition and tells the core.
    pub(super) fn spawn_drop(self: &Rc<Self>, partition: u32) {
        let shard = self.clone();
        let spawned = self.store_work.spawn_into(
            async move {
                match shard
                    .engine
                    .drop_partition(partition, Durability::Sync)
                    .await
                {
                    Ok(_) => shard.drive(Input::PartitionDropped { partition }),
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
    pub(super) fn spawn_renewal(self: &Rc<Self>) {
        let shard = self.clone();
        let (path, id) = (self.epochs_path.clone(), self.id);
        let spawned = self.store_work.spawn(async move {
            let leased = glommio::executor()
                .spawn_blocking(move || epochs::lease(&path, id, EPOCH_LEASE_SIZE))
                .await;
            match leased {
                Ok(lease) => shard.drive(Input::Epochs { lease }),
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
            self.report(Input::FloorPersisted { floor });
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
                Ok(()) => shard.drive(Input::FloorPersisted { floor }),
                // Reaping of the tombstones the old floor keeps stays blocked (logged once).
                Err(e) => tracing::error!(shard = id, error = %e, "cannot persist the epoch floor"),
            }
        });
        if let Ok(task) = spawned {
            task.detach();
        }
    }
}

/// The CPU shares of the background queue: [`BACKGROUND_SHARES_MAX`] scaled by the admission
/// controller's share, read by glommio every adjustment period.
pub(super) struct BackgroundShares {
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
pub(super) fn scaled_shares(max: usize, share: f64) -> usize {
    ((max as f64 * share) as usize).clamp(1, max)
}

impl Shard {
    /// Runs the admission controller and applies a changed share to the background queue, the
    /// engine's compaction queue and the core; publishes the coordinator's figures.
    pub(super) fn admit(self: &Rc<Self>, now: u64) {
        let changed = self.admission.borrow_mut().tick(now);
        if let Some(share) = changed {
            self.background_shares.share.set(share);
            ringkv_engine::set_compaction_shares(scaled_shares(
                self.engine.config().compaction_shares,
                share,
            ));
            self.drive(Input::BackgroundShare { share });
        }
        let core = self.core.borrow();
        self.metrics.set_core(
            &CoreFigures {
                stats: core.stats(),
                hints: core.hint_count() as u64,
                hint_bytes: core.hint_bytes(),
                hints_in_flight: core.hints_in_flight() as u64,
                ops_in_flight: core.ops_in_flight() as u64,
                peers_suspected: core.suspected_count(now) as u64,
                handoffs: core.handoff_count() as u64,
                trees_loading: core.trees_loading_count() as u64,
            },
            self.view_version.get(),
        );
        self.metrics.set_admission(&self.admission.borrow().state());
    }
}

/// Calls `tick` with the shard every `period` until `stop` is cancelled, the shard is gone, or
/// `tick` returns `false`. The shard is held only while `tick` runs.
pub(super) async fn run_periodic(
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
pub(super) async fn run_ticks(shard: Weak<Shard>, stop: StopToken) {
    run_periodic(shard, stop, Duration::from_millis(TICK_MS), |shard| {
        let now = shard.clock.now_ms();
        shard.admit(now);
        let due = shard
            .core
            .borrow()
            .next_deadline()
            .is_some_and(|deadline| deadline <= now);
        if due {
            shard.drive(Input::Tick);
        }
        true
    })
    .await;
}
