//! The simulated store of a node: the shared in-memory store
//! ([`MemoryStore`](ringkv_cluster::replica::MemoryStore)) beneath the node's real replica
//! layout, and what the simulator adds to it: writes that are not synced yet, which a crash
//! loses.
//!
//! Two in-memory stores hold the node's bytes: `live`, what reads and scans see, and `durable`,
//! what a crash would leave; the locations written since the last sync are the only ones where
//! the two may differ. A sync copies those from `live` to `durable`, a crash copies them back.

use std::cell::RefCell;
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
type Location = (u32, Vec<u8>);

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
}

impl PartitionStore for Store {
    type Scan = MemoryScan;

    async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Bytes>, String> {
        self.live.get(partition, key).await
    }

    async fn put(
        &self,
        partition: u32,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), String> {
        self.live.put(partition, key, value, durability).await?;
        self.unsynced.borrow_mut().insert((partition, key.to_vec()));
        // As the engine's group commit: a synced write syncs everything written before it.
        if durability == Durability::Sync {
            self.sync();
        }
        Ok(())
    }

    async fn delete(
        &self,
        partition: u32,
        key: &[u8],
        durability: Durability,
    ) -> Result<(), String> {
        self.live.delete(partition, key, durability).await?;
        self.unsynced.borrow_mut().insert((partition, key.to_vec()));
        if durability == Durability::Sync {
            self.sync();
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), String> {
        self.sync();
        Ok(())
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
        now(replica::apply(self, key, StoreOp::Read)).expect("stored objects decode")
    }

    /// The object stored durably under `key`: what a crash now would leave.
    pub(super) fn read_durable(&self, key: &StoreKey) -> Option<Object> {
        now(replica::apply(&self.durable, key, StoreOp::Read)).expect("stored objects decode")
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
        now(replica::scan_page(
            self, partition, after, max_items, max_bytes,
        ))
    }

    /// Makes every write durable.
    pub(super) fn sync(&self) {
        for at in std::mem::take(&mut *self.unsynced.borrow_mut()) {
            copy_entry(&self.live, &self.durable, &at);
        }
    }

    /// A crash: what was not synced is gone.
    pub(super) fn crash(&self) {
        for at in std::mem::take(&mut *self.unsynced.borrow_mut()) {
            copy_entry(&self.durable, &self.live, &at);
        }
    }

    /// Drops every replica of ring partition `partition` durably, as the engine does.
    pub(super) fn drop_partition(&self, partition: u32) {
        self.sync();
        self.live.drop_partition(partition);
        self.durable.drop_partition(partition);
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
