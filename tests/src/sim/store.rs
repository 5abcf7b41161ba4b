//! The simulated store of a node: a durable map and an unsynced overlay that a crash loses.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_core::coordinator::{ScanItem, ScanPage, Space, StoreKey};
use ringkv_core::object::Object;

use super::{Event, Sim};

#[derive(Default)]
pub(super) struct Store {
    pub(super) durable: BTreeMap<StoreKey, Object>,
    /// Unsynced changes (`None` = removed), lost on crash.
    pub(super) overlay: BTreeMap<StoreKey, Option<Object>>,
}

impl Store {
    pub(super) fn read(&self, key: &StoreKey) -> Option<Object> {
        match self.overlay.get(key) {
            Some(o) => o.clone(),
            None => self.durable.get(key).cloned(),
        }
    }

    pub(super) fn sync(&mut self) {
        for (k, v) in std::mem::take(&mut self.overlay) {
            match v {
                Some(o) => self.durable.insert(k, o),
                None => self.durable.remove(&k),
            };
        }
    }

    /// Up to `max` replica keys of `partition` after the cursor (an encoded bucket and key).
    pub(super) fn scan(&self, partition: u32, after: Option<Bytes>, max: usize) -> ScanPage {
        let after = after.map(|c| {
            let (len, rest) = c.split_first().expect("sim cursors are non-empty");
            let (b, k) = rest.split_at(usize::from(*len));
            (Bytes::copy_from_slice(b), Bytes::copy_from_slice(k))
        });
        let mut items = Vec::new();
        for key in self.keys() {
            if key.partition != partition || key.space != Space::Primary {
                continue;
            }
            if let Some((b, k)) = &after
                && (&key.bucket, &key.key) <= (b, k)
            {
                continue;
            }
            if items.len() == max {
                let last: &ScanItem = items.last().expect("max > 0");
                let mut cursor = vec![last.bucket.len() as u8];
                cursor.extend_from_slice(&last.bucket);
                cursor.extend_from_slice(&last.key);
                return ScanPage {
                    items,
                    next: Some(Bytes::from(cursor)),
                };
            }
            if let Some(object) = self.read(&key) {
                items.push(ScanItem {
                    bucket: key.bucket.clone(),
                    key: key.key.clone(),
                    object,
                });
            }
        }
        ScanPage { items, next: None }
    }

    pub(super) fn keys(&self) -> BTreeSet<StoreKey> {
        let mut keys: BTreeSet<StoreKey> = self.durable.keys().cloned().collect();
        for (k, v) in &self.overlay {
            if v.is_some() {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        keys
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
                    .filter(|k| n.store.read(k).is_some_and(|o| o.is_deleted()))
                    .count()
            })
            .sum()
    }
}
