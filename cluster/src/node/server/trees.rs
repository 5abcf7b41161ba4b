//! Building a shard's anti-entropy trees from its engine after a restart, while the shard serves.
//!
//! Owns the load's task and its pacing; the rules that keep a tree built beside running writes
//! exact, and that keep anti-entropy off a tree not yet built, are the core's (module docs of
//! `coordinator/antientropy.rs`, "Building the trees at startup"). Before the shard serves, it
//! marks every partition it owns as loading ([`partitions`], `Core::trees_loading`); this task
//! then reads every replica object of those partitions and hands each to
//! `Core::load_replica`, and reports each partition read whole (`Core::trees_loaded`).
//!
//! The engine reads a partition one object at a time (an O_DIRECT read of the record's blocks,
//! in the index's order, which is random on disk), so one reader waits out the device's latency
//! for every key. [`TREE_LOAD_READERS`] partitions are read at once, which keeps that many reads
//! in flight through io_uring. The task runs in the shard's background queue, whose shares follow
//! admission control, so client requests keep their latency while it runs; it yields between
//! objects when its slice is used up.
//!
//! Limits: the load holds one object per reader at a time. It stops when the shard stops (a node
//! stopped before its trees were built loads them again at its next start). An object that does
//! not decode, or a record that fails its checksum, is left out of the tree (anti-entropy then
//! repairs the key from another replica, as it would an absent one). Any other engine error ends
//! the load: the partitions not yet loaded keep anti-entropy off until the next start, and the
//! error is logged; such an engine refuses every later operation anyway.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use ringkv_engine::EngineError;

use crate::coordinator::{Space, StoreKey};
use crate::object::Object;
use crate::ring::PartitionId;

use super::super::peer;
use super::super::route::{PARTITIONS, shard_of};
use super::Shard;

/// Partitions read at once by a shard's tree load, so as many engine reads are in flight.
pub(super) const TREE_LOAD_READERS: usize = 32;

/// The ring partitions whose replicas shard `shard` of `shard_count` stores, in order.
pub(super) fn partitions(shard: usize, shard_count: usize) -> Vec<u32> {
    (0..PARTITIONS.get())
        .filter(|p| shard_of(PartitionId(*p), shard_count) == shard)
        .collect()
}

/// A load's shared state: partitions not yet taken by a reader, and totals.
struct Load {
    queue: RefCell<VecDeque<u32>>,
    keys: Cell<u64>,
    skipped: Cell<u64>,
    failed: RefCell<Option<EngineError>>,
}

/// How the load of one partition ended.
enum Loaded {
    /// Every object was read (or left out, see the module docs): keys and undecodable objects.
    Whole { keys: u64, skipped: u64 },
    /// The shard is stopping.
    Stopped,
    /// The engine failed.
    Failed(EngineError),
}

impl Shard {
    /// Starts loading the trees of `partitions` (already marked loading in the core) in the
    /// background queue; the shard serves meanwhile.
    pub(super) fn spawn_tree_load(self: &Rc<Self>, partitions: Vec<u32>) {
        let shard = self.clone();
        let spawned = self.store_work.spawn_into(
            async move { shard.load_trees(partitions).await },
            self.background,
        );
        match spawned {
            Ok(task) => {
                task.detach();
            }
            // Only when the shard is already stopping: the next start loads them.
            Err(e) => tracing::warn!(shard = self.id, error = %e, "tree load not started"),
        }
    }

    async fn load_trees(self: Rc<Self>, partitions: Vec<u32>) {
        let started = Instant::now();
        let count = partitions.len();
        let load = Rc::new(Load {
            queue: RefCell::new(VecDeque::from(partitions)),
            keys: Cell::new(0),
            skipped: Cell::new(0),
            failed: RefCell::new(None),
        });
        // The readers are tasks of their own (so their reads are in flight together), awaited
        // here, so the store-work gate this task holds covers them.
        let mut readers = Vec::new();
        for _ in 0..TREE_LOAD_READERS.min(count) {
            let (shard, load) = (self.clone(), load.clone());
            match glommio::spawn_local_into(shard.tree_reader(load), self.background) {
                Ok(task) => readers.push(task),
                Err(e) => tracing::warn!(shard = self.id, error = %e, "tree reader not started"),
            }
        }
        for reader in readers {
            reader.await;
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let left = self.core.borrow().trees_loading_count();
        if let Some(e) = load.failed.borrow_mut().take() {
            tracing::error!(
                shard = self.id,
                error = %e,
                partitions_loading = left,
                "anti-entropy tree load failed; anti-entropy stays off for the partitions not loaded"
            );
        } else if left > 0 {
            tracing::info!(
                shard = self.id,
                partitions_loading = left,
                "anti-entropy tree load stopped with the shard"
            );
        } else {
            tracing::info!(
                shard = self.id,
                partitions = count,
                keys = load.keys.get(),
                skipped = load.skipped.get(),
                elapsed_ms,
                "anti-entropy trees built"
            );
        }
    }

    /// One reader of a load: takes partitions from the queue until it is empty, the shard
    /// stops or the engine fails.
    async fn tree_reader(self: Rc<Self>, load: Rc<Load>) {
        loop {
            if load.failed.borrow().is_some() {
                return;
            }
            let Some(partition) = load.queue.borrow_mut().pop_front() else {
                return;
            };
            match self.load_partition(partition).await {
                Loaded::Whole { keys, skipped } => {
                    self.core.borrow_mut().trees_loaded(partition);
                    load.keys.set(load.keys.get() + keys);
                    load.skipped.set(load.skipped.get() + skipped);
                }
                Loaded::Stopped => return,
                Loaded::Failed(e) => {
                    load.failed.borrow_mut().get_or_insert(e);
                    return;
                }
            }
        }
    }

    /// Reads every replica object of `partition` into the core's trees.
    async fn load_partition(&self, partition: u32) -> Loaded {
        let mut items = self.engine.iter_partition(partition);
        let (mut keys, mut skipped) = (0, 0);
        loop {
            if self.stop.is_cancelled() {
                return Loaded::Stopped;
            }
            let Some(item) = items.next().await else {
                return Loaded::Whole { keys, skipped };
            };
            let (engine_key, bytes) = match item {
                Ok(item) => item,
                Err(EngineError::Corrupt { path, offset, .. }) => {
                    tracing::warn!(
                        shard = self.id,
                        partition,
                        path = %path.display(),
                        offset,
                        "a record failed its checksum; left out of the tree"
                    );
                    skipped += 1;
                    continue;
                }
                Err(e) => return Loaded::Failed(e),
            };
            let Some((bucket, key)) = peer::key_from_engine(&engine_key) else {
                tracing::warn!(
                    shard = self.id,
                    partition,
                    "ignoring a malformed replica key"
                );
                skipped += 1;
                continue;
            };
            let key = StoreKey {
                partition,
                space: Space::Primary,
                bucket,
                key,
            };
            match Object::decode(&bytes) {
                Ok(object) => {
                    // The clock is read after the engine's read: a tombstone's grace period
                    // counts from when the tree learns of it, never from before.
                    let now = self.clock.now_ms();
                    self.core.borrow_mut().load_replica(now, &key, &object);
                    keys += 1;
                }
                Err(e) => {
                    tracing::warn!(shard = self.id, partition, error = %e, "undecodable object");
                    skipped += 1;
                }
            }
            glommio::yield_if_needed().await;
        }
    }
}
