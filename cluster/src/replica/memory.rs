//! An in-memory [`PartitionStore`] for the simulator and the tests that drive a core by hand.
//!
//! It owns bytes by engine partition and key, nothing more: the storage-key layout, the object
//! encoding and the scan cursors stay those of [`replica`](super) ([`apply`](super::apply),
//! [`scan_page`](super::scan_page)), so whatever runs over this store runs the real layout
//! rather than a copy of it. Scans walk a partition's live entries in the order of their engine
//! fingerprint ([`KeyHash`]), as the engine's partition walk does.
//!
//! What it does not model: durability and failure. Every write is visible and kept at once,
//! `flush` has nothing to do and no operation fails; a store that loses unsynced writes in a
//! crash, or fails writes, wraps this one. Its operations never wait, so an executor is only
//! needed to call them through the trait (`futures_lite::future::block_on` is enough).
//!
//! Limits: none of its own; every entry is held in memory, and a scan copies the entries of its
//! partition when it starts (it does not see writes made during the walk).

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_core::coordinator::StoreKey;
use ringkv_core::object::{Object, ObjectError};
use ringkv_engine::Durability;
use ringkv_engine::index::KeyHash;

use super::{Entry, PartitionScan, PartitionStore, store_key};

/// Bytes by engine partition and key, every write kept at once.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    /// Engine partition and engine key → value. A `BTreeMap`, so that listings come in one order
    /// from run to run (a simulated trace must not depend on hashing).
    entries: RefCell<BTreeMap<(u32, Vec<u8>), Bytes>>,
}

/// A stored entry that does not read back through the layout: bytes something other than the
/// replica layout wrote.
#[derive(Debug, thiserror::Error)]
pub enum MemoryStoreError {
    /// The key is not a replica or hint key of the layout.
    #[error("a key in engine partition {partition} is not a replica or hint key: {key:?}")]
    Key {
        /// The engine partition.
        partition: u32,
        /// The engine key.
        key: Vec<u8>,
    },
    /// The value is not an encoded object.
    #[error("the stored object of {key:?} does not decode: {source}")]
    Object {
        /// The stored key.
        key: StoreKey,
        /// Why it does not decode.
        source: ObjectError,
    },
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Every stored key, replicas and hints, as the layout reads it back from its engine
    /// partition and key.
    pub fn keys(&self) -> Result<BTreeSet<StoreKey>, MemoryStoreError> {
        self.entries
            .borrow()
            .keys()
            .map(|(partition, engine_key)| read_key(*partition, engine_key))
            .collect()
    }

    /// Every stored object, replicas and hints, by the stored key the layout reads back from its
    /// engine partition and key.
    pub fn objects(&self) -> Result<BTreeMap<StoreKey, Object>, MemoryStoreError> {
        self.entries
            .borrow()
            .iter()
            .map(|((partition, engine_key), value)| {
                let key = read_key(*partition, engine_key)?;
                match Object::decode(value) {
                    Ok(object) => Ok((key, object)),
                    Err(source) => Err(MemoryStoreError::Object { key, source }),
                }
            })
            .collect()
    }

    /// Removes every entry of engine partition `partition` (a ring partition's replicas, not
    /// the hints kept for it, which live in a partition of their own), as the engine drops a
    /// partition.
    pub fn drop_partition(&self, partition: u32) {
        self.entries
            .borrow_mut()
            .retain(|(p, _), _| *p != partition);
    }
}

/// The stored key at `partition` and `engine_key`, as the layout reads it back.
fn read_key(partition: u32, engine_key: &[u8]) -> Result<StoreKey, MemoryStoreError> {
    store_key(partition, engine_key).ok_or_else(|| MemoryStoreError::Key {
        partition,
        key: engine_key.to_vec(),
    })
}

impl PartitionStore for MemoryStore {
    type Scan = MemoryScan;

    async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Bytes>, String> {
        Ok(self
            .entries
            .borrow()
            .get(&(partition, key.to_vec()))
            .cloned())
    }

    async fn put(
        &self,
        partition: u32,
        key: &[u8],
        value: &[u8],
        _durability: Durability,
    ) -> Result<(), String> {
        self.entries
            .borrow_mut()
            .insert((partition, key.to_vec()), Bytes::copy_from_slice(value));
        Ok(())
    }

    async fn delete(
        &self,
        partition: u32,
        key: &[u8],
        _durability: Durability,
    ) -> Result<(), String> {
        self.entries.borrow_mut().remove(&(partition, key.to_vec()));
        Ok(())
    }

    async fn flush(&self) -> Result<(), String> {
        Ok(())
    }

    fn scan_after(&self, partition: u32, after: Option<KeyHash>) -> MemoryScan {
        let mut entries: Vec<Entry> = self
            .entries
            .borrow()
            .range((partition, Vec::new())..)
            .take_while(|((p, _), _)| *p == partition)
            .map(|((_, key), value)| (KeyHash::of(key), key.clone(), value.clone()))
            .filter(|(kh, _, _)| after.is_none_or(|a| *kh > a))
            .collect();
        // Popped from the back: the lowest fingerprint first, as the engine walks. The sort is
        // stable, so keys with equal fingerprints keep one order from run to run.
        entries.sort_by_key(|e| Reverse(e.0));
        MemoryScan(entries)
    }
}

/// A partition walk over a copy of the partition's entries taken when it started.
#[derive(Debug)]
pub struct MemoryScan(Vec<Entry>);

impl PartitionScan for MemoryScan {
    async fn next_entry(&mut self) -> Option<Result<Entry, String>> {
        self.0.pop().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::{apply, engine_location, scan_page};
    use futures_lite::future::block_on;
    use ringkv_core::NodeId;
    use ringkv_core::coordinator::{Space, StoreOp};
    use ringkv_core::object::{Lww, Val};

    fn key(i: u32, space: Space) -> StoreKey {
        StoreKey {
            partition: 3,
            space,
            bucket: Bytes::from_static(b"b"),
            key: Bytes::from(format!("k{i}")),
        }
    }

    fn object(i: u32) -> Object {
        Object::Lww(Lww {
            timestamp: u64::from(i),
            node: NodeId(1),
            val: Val::Value(Bytes::from(format!("v{i}"))),
        })
    }

    fn write(store: &MemoryStore, key: &StoreKey, object: Object) {
        let op = StoreOp::Write {
            object,
            durable: false,
        };
        assert_eq!(block_on(apply(store, key, op)), Ok(None));
    }

    /// Objects written through the layout read back, list back under their stored keys (hints
    /// apart from replicas), and are gone once removed.
    #[test]
    fn objects_come_back_through_the_layout() {
        let store = MemoryStore::new();
        let replica = key(1, Space::Primary);
        let hint = key(1, Space::Hint(NodeId(7)));
        write(&store, &replica, object(1));
        write(&store, &hint, object(2));
        assert_eq!(
            block_on(apply(&store, &replica, StoreOp::Read)),
            Ok(Some(object(1)))
        );
        let listed = store.objects().expect("written through the layout");
        assert_eq!(
            listed,
            BTreeMap::from([(replica.clone(), object(1)), (hint.clone(), object(2))])
        );
        assert_eq!(block_on(apply(&store, &hint, StoreOp::Remove)), Ok(None));
        assert_eq!(block_on(apply(&store, &hint, StoreOp::Read)), Ok(None));
        assert_eq!(store.objects().expect("listed").len(), 1);
        assert_eq!(store.keys().expect("listed"), BTreeSet::from([replica]));
    }

    /// A scan in pages returns every replica of the partition once, hints left out, in
    /// fingerprint order, ending with a page whose cursor is `None`.
    #[test]
    fn paged_scans_return_each_replica_once_in_fingerprint_order() {
        let store = MemoryStore::new();
        for i in 0..10 {
            write(&store, &key(i, Space::Primary), object(i));
        }
        write(&store, &key(0, Space::Hint(NodeId(7))), object(99));
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = block_on(scan_page(&store, 3, after, 3, usize::MAX)).expect("a page");
            assert!(page.items.len() <= 3);
            seen.extend(page.items.into_iter().map(|item| item.key));
            match page.next {
                Some(cursor) => after = Some(cursor),
                None => break,
            }
        }
        let mut expected: Vec<(KeyHash, Bytes)> = (0..10)
            .map(|i| {
                let k = key(i, Space::Primary);
                (KeyHash::of(&engine_location(&k).1), k.key)
            })
            .collect();
        expected.sort();
        let expected: Vec<Bytes> = expected.into_iter().map(|(_, k)| k).collect();
        assert_eq!(seen, expected);
    }

    /// Dropping a partition drops its replicas, not the hints kept for it.
    #[test]
    fn dropping_a_partition_keeps_its_hints() {
        let store = MemoryStore::new();
        let hint = key(1, Space::Hint(NodeId(7)));
        write(&store, &key(1, Space::Primary), object(1));
        write(&store, &hint, object(2));
        store.drop_partition(3);
        assert_eq!(
            store.objects().expect("listed"),
            BTreeMap::from([(hint, object(2))])
        );
    }

    /// Bytes the layout did not write are reported, not skipped.
    #[test]
    fn foreign_entries_are_reported() {
        let store = MemoryStore::new();
        let at = engine_location(&key(1, Space::Primary));
        block_on(store.put(at.0, &at.1, b"not an object", Durability::Buffered))
            .expect("the in-memory store does not fail");
        assert!(matches!(
            store.objects(),
            Err(MemoryStoreError::Object { .. })
        ));
        let store = MemoryStore::new();
        block_on(store.put(3, &[], b"x", Durability::Buffered))
            .expect("the in-memory store does not fail");
        assert!(matches!(
            store.objects(),
            Err(MemoryStoreError::Key { partition: 3, .. })
        ));
        assert!(matches!(
            store.keys(),
            Err(MemoryStoreError::Key { partition: 3, .. })
        ));
    }
}
