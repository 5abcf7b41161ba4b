//! The driver of a shard's core: carries out the core's outputs (storage, scans, replies, peer
//! messages, epochs), runs its timers and admission control.

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

use super::stop::unless;
use super::{BACKGROUND_SHARES_MAX, Shard, TICK_MS};

impl Shard {
    /// Carries out what the core asked for. Never called with the core borrowed.
    pub(super) fn carry_out(self: &Rc<Self>, outputs: Vec<Output>) {
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
    pub(super) fn spawn_store(self: &Rc<Self>, id: u64, key: StoreKey, op: StoreOp) {
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
    pub(super) fn spawn_renewal(self: &Rc<Self>) {
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
    pub(super) fn spawn_floor(self: &Rc<Self>, floor: u32) {
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
    pub(super) fn admit(&self, now: u64) {
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
            let outputs = shard.core.borrow_mut().handle_tick(now);
            shard.carry_out(outputs);
        }
        true
    })
    .await;
}
