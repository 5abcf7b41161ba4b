//! The simulated store of a node: a durable map and an unsynced overlay that a crash loses, of
//! bytes by engine partition and key, beneath the node's real replica layout.

use std::collections::{BTreeMap, BTreeSet};

use std::cell::RefCell;

use bytes::Bytes;
use ringkv_cluster::replica::{self, Entry, PartitionScan, PartitionStore};
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
    durable: RefCell<BTreeMap<Location, Bytes>>,
    /// Unsynced changes (`None` = removed), lost on crash.
    overlay: RefCell<BTreeMap<Location, Option<Bytes>>>,
}

impl PartitionStore for Store {
    type Scan = SimScan;

    async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Bytes>, String> {
        let at = (partition, key.to_vec());
        Ok(match self.overlay.borrow().get(&at) {
            Some(v) => v.clone(),
            None => self.durable.borrow().get(&at).cloned(),
        })
    }

    async fn put(
        &self,
        partition: u32,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), String> {
        let value = Bytes::copy_from_slice(value);
        self.overlay
            .borrow_mut()
            .insert((partition, key.to_vec()), Some(value));
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
        self.overlay
            .borrow_mut()
            .insert((partition, key.to_vec()), None);
        if durability == Durability::Sync {
            self.sync();
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), String> {
        self.sync();
        Ok(())
    }

    fn scan_after(&self, partition: u32, after: Option<KeyHash>) -> SimScan {
        let mut entries: Vec<Entry> = self
            .live()
            .into_iter()
            .filter(|((p, _), _)| *p == partition)
            .map(|((_, key), value)| (KeyHash::of(&key), key, value))
            .filter(|(kh, _, _)| after.is_none_or(|a| *kh > a))
            .collect();
        // Popped from the back: the lowest fingerprint first, as the engine walks.
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        SimScan(entries)
    }
}

/// A partition walk over a snapshot of the store.
pub(super) struct SimScan(Vec<Entry>);

impl PartitionScan for SimScan {
    async fn next_entry(&mut self) -> Option<Result<Entry, String>> {
        self.0.pop().map(Ok)
    }
}

/// Runs a store operation that completes without waiting: the simulated store never waits.
fn now<T>(work: impl std::future::Future<Output = T>) -> T {
    futures_lite::future::block_on(work)
}

impl Store {
    /// The object stored under `key`, as a read of the core sees it.
    pub(super) fn read(&self, key: &StoreKey) -> Option<Object> {
        now(replica::apply(self, key, StoreOp::Read)).expect("stored objects decode")
    }

    /// The object stored durably under `key`: what a crash now would leave.
    pub(super) fn read_durable(&self, key: &StoreKey) -> Option<Object> {
        let at = replica::engine_location(key);
        let bytes = self.durable.borrow().get(&at).cloned()?;
        Some(Object::decode(&bytes).expect("stored objects decode"))
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
        let mut durable = self.durable.borrow_mut();
        for (at, v) in std::mem::take(&mut *self.overlay.borrow_mut()) {
            match v {
                Some(bytes) => durable.insert(at, bytes),
                None => durable.remove(&at),
            };
        }
    }

    /// A crash: what was not synced is gone.
    pub(super) fn crash(&self) {
        self.overlay.borrow_mut().clear();
    }

    /// Drops every replica of ring partition `partition` durably, as the engine does.
    pub(super) fn drop_partition(&self, partition: u32) {
        self.sync();
        self.durable
            .borrow_mut()
            .retain(|(p, _), _| *p != partition);
    }

    /// Every value a read sees now, by location.
    fn live(&self) -> BTreeMap<Location, Bytes> {
        let mut live = self.durable.borrow().clone();
        for (at, v) in self.overlay.borrow().iter() {
            match v {
                Some(bytes) => live.insert(at.clone(), bytes.clone()),
                None => live.remove(at),
            };
        }
        live
    }

    /// Every stored key, replicas and hints, read back through the layout.
    pub(super) fn keys(&self) -> BTreeSet<StoreKey> {
        self.live()
            .into_keys()
            .map(|(partition, key)| {
                replica::store_key(partition, &key).expect("stored keys decode")
            })
            .collect()
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
