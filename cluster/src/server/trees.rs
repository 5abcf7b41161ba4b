//! Building a shard's anti-entropy trees from its engine after a restart, while the shard serves.
//!
//! Owns the load's task and its pacing; the rules that keep a tree built beside running writes
//! exact, and that keep anti-entropy off a tree not yet built, are the core's (module docs of
//! `coordinator/antientropy.rs`, "Building the trees at startup"). Before the shard serves, it
//! marks every partition it owns as loading ([`partitions`], `Core::trees_loading`); this task
//! then reads every replica object of those partitions and hands each to
//! `Core::load_replica`, and reports each partition read whole (`Core::trees_loaded`).
//!
//! The objects are read with the engine's live scan (`Engine::scan_live`): the live records of
//! the shard's replica partitions in storage order, with large sequential reads, rather than one
//! random read per key (`Engine::iter_partition`), which costs the device's latency for every
//! key. The scan's order is the disk's, not the partitions', so every partition's trees are
//! reported loaded together at the end. The task runs in the shard's background queue, whose
//! shares follow admission control, and it pauses for a moment after every millisecond of work
//! (`ringkv_engine::pace`): it is always runnable, and glommio would otherwise poll for the
//! requests that arrived only after its 100 ms preempt period.
//!
//! Limits: the load holds one scan window (at most `ringkv_engine::live_scan::WINDOW_BYTES_MAX`
//! bytes of records) and the locations of one group of segments at a time. It stops when the
//! shard stops (a node stopped before its trees were built loads them again at its next start).
//! An object that does not decode, or a record that fails its checksum, is left out of the tree
//! (anti-entropy then repairs the key from another replica, as it would an absent one). An
//! engine error ends the load: the partitions keep anti-entropy off until the next start, and
//! the error is logged; such an engine refuses every later operation anyway.

use super::driver::Input;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Instant;

use ringkv_core::coordinator::{Space, StoreKey};
use ringkv_core::object::Object;
use ringkv_core::ring::PartitionId;

use super::Shard;
use crate::replica;
use crate::route::{PARTITIONS, shard_of};

/// The ring partitions whose replicas shard `shard` of `shard_count` stores, in order.
pub(super) fn partitions(shard: usize, shard_count: usize) -> Vec<u32> {
    (0..PARTITIONS.get())
        .filter(|p| shard_of(PartitionId(*p), shard_count) == shard)
        .collect()
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
        let wanted: BTreeSet<u32> = partitions.iter().copied().collect();
        // Replica partitions only: hint partitions (2^31 | p) are not in the set.
        let mut scan = self.engine.scan_live(move |p| wanted.contains(&p));
        let (mut keys, mut skipped) = (0u64, 0u64);
        let mut pace = ringkv_engine::Pace::new();
        loop {
            if self.stop.is_cancelled() {
                tracing::info!(
                    shard = self.id,
                    "anti-entropy tree load stopped with the shard"
                );
                return;
            }
            let batch = match scan.next_batch().await {
                None => break,
                Some(Ok(batch)) => batch,
                Some(Err(e)) => {
                    tracing::error!(
                        shard = self.id,
                        error = %e,
                        "anti-entropy tree load failed; anti-entropy stays off on this shard"
                    );
                    return;
                }
            };
            for record in batch {
                let Some((bucket, key)) = replica::key_from_engine(&record.key) else {
                    tracing::warn!(
                        shard = self.id,
                        partition = record.partition,
                        "ignoring a malformed replica key"
                    );
                    skipped += 1;
                    continue;
                };
                let key = StoreKey {
                    partition: record.partition,
                    space: Space::Primary,
                    bucket,
                    key,
                };
                match Object::decode(&record.value) {
                    Ok(object) => {
                        // The clock is read after the engine's read (by `drive`): a
                        // tombstone's grace period counts from when the tree learns of it,
                        // never from before.
                        self.drive(Input::LoadReplica { key, object });
                        keys += 1;
                    }
                    Err(e) => {
                        tracing::warn!(
                            shard = self.id,
                            partition = record.partition,
                            error = %e,
                            "undecodable object; left out of the tree"
                        );
                        skipped += 1;
                    }
                }
                pace.step().await;
            }
        }
        let count = partitions.len();
        self.drive(Input::TreesLoaded { partitions });
        tracing::info!(
            shard = self.id,
            partitions = count,
            keys,
            skipped = skipped + scan.corrupt_records(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "anti-entropy trees built"
        );
    }
}
