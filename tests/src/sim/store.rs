//! The simulated store of a node: the shared in-memory store
//! ([`MemoryStore`](ringkv_cluster::replica::MemoryStore)) beneath the node's real replica
//! layout, and what the simulator adds to it: writes that are not synced yet, which a crash
//! loses.
//!
//! Two in-memory stores hold the node's bytes: `live`, what reads and scans see, and `durable`,
//! what a crash would leave; the locations written since the last sync are the only ones where
//! the two may differ. A sync copies those from `live` to `durable`, a crash copies them back.
//! Every sync is logged with the bytes it made durable, so the durability checker learns which
//! writes ever had a synced copy on which node (`durability.rs`).
//!
//! Storage faults, as the engine has them: a fault armed by the nemesis fails the next write (its
//! bytes reach the live store but never a sync, as a record appended to the memory tail whose
//! flush failed) or the next sync with something to write (a durable write's, an explicit one,
//! or the periodic flush).
//! The store is then *failed*, as the engine after EIO: every later operation, reads included,
//! fails, and nothing more is synced, until the node crashes (a restart reopens the store, and
//! recovery keeps only what was synced). The harness's own inspection ([`Store::read`],
//! [`Store::keys`]) sees through a failure.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;

use bytes::Bytes;
use ringkv_cluster::replica::memory::MemoryScan;
use ringkv_cluster::replica::{self, MemoryStore, PartitionStore};
use ringkv_core::coordinator::{ScanPage, Space, StoreKey, StoreOp};
use ringkv_core::object::Object;
use ringkv_engine::Durability;
use ringkv_engine::index::KeyHash;

use super::{Event, Sim};

/// Where the engine keeps a value: engine partition and engine key.
pub(super) type Location = (u32, Vec<u8>);

/// A location's bytes at a moment (absent: removed).
pub(super) type Entry = (Location, Option<Bytes>);

/// A storage fault the nemesis armed, struck by the next operation of its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    /// The next write (or removal) fails.
    Write,
    /// The next sync fails: a durable write's, an explicit one, or the periodic flush.
    Sync,
}

/// What a failed store answers, as the engine's `EngineError::Failed` reads.
const FAILED: &str = "store failed and must be reopened: injected EIO";

/// A node's bytes as its engine keeps them, beneath the real replica layout
/// (`ringkv_cluster::replica`): stored keys become engine partitions and keys, objects their
/// encoding, scans walk fingerprints and return the engine's cursors.
#[derive(Default)]
pub(super) struct Store {
    /// Every write, synced or not: what reads and scans see.
    live: MemoryStore,
    /// The writes synced so far: what a crash leaves.
    durable: MemoryStore,
    /// Locations written (or removed) since the last sync, where `live` and `durable` may
    /// differ.
    unsynced: RefCell<BTreeSet<Location>>,
    /// What syncs made durable since the simulator last took the log.
    synced: RefCell<Vec<Entry>>,
    /// The fault the next operation of its kind meets.
    armed: Cell<Option<Fault>>,
    /// Failed after a storage fault: every operation fails until the node restarts.
    failed: Cell<bool>,
    /// Failed since the simulator last asked ([`Store::newly_failed`]).
    newly_failed: Cell<bool>,
}

impl PartitionStore for Store {
    type Scan = MemoryScan;

    async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Bytes>, String> {
        self.usable()?;
        self.live.get(partition, key).await
    }

    async fn put(
        &self,
        partition: u32,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), String> {
        self.usable()?;
        self.live.put(partition, key, value, durability).await?;
        self.unsynced.borrow_mut().insert((partition, key.to_vec()));
        self.strike(Fault::Write)?;
        // As the engine's group commit: a synced write syncs everything written before it.
        if durability == Durability::Sync {
            self.try_sync()?;
        }
        Ok(())
    }

    async fn delete(
        &self,
        partition: u32,
        key: &[u8],
        durability: Durability,
    ) -> Result<(), String> {
        self.usable()?;
        self.live.delete(partition, key, durability).await?;
        self.unsynced.borrow_mut().insert((partition, key.to_vec()));
        self.strike(Fault::Write)?;
        if durability == Durability::Sync {
            self.try_sync()?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), String> {
        self.usable()?;
        self.try_sync()
    }

    fn scan_after(&self, partition: u32, after: Option<KeyHash>) -> MemoryScan {
        self.live.scan_after(partition, after)
    }
}

/// Runs a store operation that completes without waiting: the in-memory store never waits.
fn now<T>(work: impl std::future::Future<Output = T>) -> T {
    futures_lite::future::block_on(work)
}

/// Makes `to`'s entry at `at` what `from`'s is (absent if `from` has none).
fn copy_entry(from: &MemoryStore, to: &MemoryStore, at: &Location) {
    let (partition, key) = at;
    let value = now(from.get(*partition, key)).expect("the in-memory store does not fail");
    match value {
        Some(bytes) => now(to.put(*partition, key, &bytes, Durability::Buffered)),
        None => now(to.delete(*partition, key, Durability::Buffered)),
    }
    .expect("the in-memory store does not fail");
}

impl Store {
    /// The object stored under `key`, as a read of the core sees it.
    pub(super) fn read(&self, key: &StoreKey) -> Option<Object> {
        now(replica::apply(&self.live, key, StoreOp::Read)).expect("stored objects decode")
    }

    /// The object stored durably under `key`: what a crash now would leave.
    pub(super) fn read_durable(&self, key: &StoreKey) -> Option<Object> {
        now(replica::apply(&self.durable, key, StoreOp::Read)).expect("stored objects decode")
    }

    /// Fails if the store failed.
    fn usable(&self) -> Result<(), String> {
        if self.failed.get() {
            return Err(FAILED.to_owned());
        }
        Ok(())
    }

    /// Fails the store if a fault of `kind` is armed.
    fn strike(&self, kind: Fault) -> Result<(), String> {
        if self.armed.get() != Some(kind) {
            return Ok(());
        }
        self.armed.set(None);
        self.failed.set(true);
        self.newly_failed.set(true);
        Err(format!("injected EIO on {kind:?}"))
    }

    /// A sync that an armed fault can fail, if it has anything to write: as the engine's, a
    /// flush with nothing pending does no IO.
    fn try_sync(&self) -> Result<(), String> {
        if !self.unsynced.borrow().is_empty() {
            self.strike(Fault::Sync)?;
        }
        self.sync();
        Ok(())
    }

    /// Arms `fault` for the next operation of its kind.
    pub(super) fn arm(&self, fault: Fault) {
        self.armed.set(Some(fault));
    }

    /// Takes back a fault armed and not yet struck.
    pub(super) fn disarm(&self) {
        self.armed.set(None);
    }

    /// Whether the store failed and refuses everything until its node restarts.
    pub(super) fn failed(&self) -> bool {
        self.failed.get()
    }

    /// Whether the store failed since the last call.
    pub(super) fn newly_failed(&self) -> bool {
        self.newly_failed.replace(false)
    }

    /// The periodic flush of the engine's group commit, which an armed fault can fail (the core
    /// learns of it from its next operation).
    pub(super) fn flush_periodic(&self) {
        if !self.failed.get() {
            // The error goes nowhere but the store's state, as a failed background flush.
            let _ = self.try_sync();
        }
    }

    /// What syncs made durable since the last call, in order.
    pub(super) fn take_synced(&self) -> Vec<Entry> {
        std::mem::take(&mut *self.synced.borrow_mut())
    }

    /// Carries out one storage operation of the core.
    pub(super) fn apply(&self, key: &StoreKey, op: StoreOp) -> Result<Option<Object>, String> {
        now(replica::apply(self, key, op))
    }

    /// A page of `partition`'s replicas for a transfer.
    pub(super) fn scan(
        &self,
        partition: u32,
        after: Option<Bytes>,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, String> {
        self.usable()?;
        now(replica::scan_page(
            self, partition, after, max_items, max_bytes,
        ))
    }

    /// Makes every write durable; a failed store syncs nothing (its engine refuses).
    pub(super) fn sync(&self) {
        if self.failed.get() {
            return;
        }
        for at in std::mem::take(&mut *self.unsynced.borrow_mut()) {
            copy_entry(&self.live, &self.durable, &at);
            let (partition, key) = &at;
            let bytes =
                now(self.live.get(*partition, key)).expect("the in-memory store does not fail");
            self.synced.borrow_mut().push((at, bytes));
        }
    }

    /// A crash: what was not synced is gone, and the restart reopens a failed store. Returns
    /// what the lost locations held just before.
    pub(super) fn crash(&self) -> Vec<Entry> {
        self.failed.set(false);
        self.newly_failed.set(false);
        self.armed.set(None);
        let mut lost = Vec::new();
        for at in std::mem::take(&mut *self.unsynced.borrow_mut()) {
            let (partition, key) = &at;
            let bytes =
                now(self.live.get(*partition, key)).expect("the in-memory store does not fail");
            copy_entry(&self.durable, &self.live, &at);
            lost.push((at, bytes));
        }
        lost
    }

    /// Drops every replica of ring partition `partition` durably, as the engine does; a failed
    /// store refuses.
    pub(super) fn drop_partition(&self, partition: u32) -> Result<(), String> {
        self.usable()?;
        self.sync();
        self.live.drop_partition(partition);
        self.durable.drop_partition(partition);
        Ok(())
    }

    /// Every stored key, replicas and hints, read back through the layout.
    pub(super) fn keys(&self) -> BTreeSet<StoreKey> {
        self.live.keys().expect("stored keys decode")
    }
}

impl Sim {
    /// Whether a store operation has been issued and not yet carried out.
    pub(super) fn store_ops_pending(&self) -> bool {
        self.events
            .values()
            .any(|e| matches!(e, Event::Stored { .. }))
    }

    /// Tombstones stored in home replicas, over all nodes.
    pub(super) fn tombstones_stored(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| {
                n.store
                    .keys()
                    .into_iter()
                    .filter(|k| k.space == Space::Primary)
                    .filter(|k| n.store.read(k).is_some_and(|o| o.is_deleted_at(self.now)))
                    .count()
            })
            .sum()
    }
}
