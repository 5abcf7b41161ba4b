//! The replica store: the core's storage operations on the shard's engine (objects encoded
//! with their storage-key layout from [`crate::peer`], hints in their own partitions), scans
//! for transfers and the hint scan at start.

use bytes::Bytes;
use glommio::yield_if_needed;
use ringkv_engine::{Durability, Engine, EngineError};

use ringkv_core::coordinator::{ScanItem, ScanPage, StoreKey, StoreOp, hint_bytes};
use ringkv_core::object::Object;
use ringkv_core::ring::PartitionId;

use crate::peer::{self, HINT_PARTITION_BASE};
use crate::route::{PARTITIONS, shard_of};

use super::Shard;

/// Every hint stored in the hint partitions of the ring partitions `shard` owns, with the bytes
/// it counts for in the hint store's bound.
pub(super) async fn scan_hints(
    engine: &Engine,
    shard: usize,
    shard_count: usize,
) -> Result<Vec<(StoreKey, u64)>, EngineError> {
    let mut hints = Vec::new();
    for partition in
        (0..PARTITIONS.get()).filter(|p| shard_of(PartitionId(*p), shard_count) == shard)
    {
        let mut keys = engine.iter_partition(HINT_PARTITION_BASE | partition);
        while let Some(item) = keys.next().await {
            let (key, object) = item?;
            match peer::hint_from_engine(partition, &key) {
                Some(hint) => {
                    let bytes = hint_bytes(&hint, object.len());
                    hints.push((hint, bytes));
                }
                None => tracing::warn!(shard, partition, "ignoring a malformed hint key"),
            }
        }
    }
    Ok(hints)
}

impl Shard {
    /// One storage operation on the engine: objects encoded, hints in their own partitions.
    pub(super) async fn store(
        &self,
        key: &StoreKey,
        op: StoreOp,
    ) -> Result<Option<Object>, String> {
        let (partition, engine_key) = peer::engine_location(key);
        match op {
            StoreOp::Read => match self.engine.get(partition, &engine_key).await {
                Ok(None) => Ok(None),
                Ok(Some(bytes)) => Object::decode(&bytes).map(Some).map_err(|e| {
                    format!("stored object in partition {partition} does not decode: {e}")
                }),
                Err(e) => Err(e.to_string()),
            },
            StoreOp::Write { object, durable } => {
                let durability = if durable {
                    Durability::Sync
                } else {
                    Durability::Buffered
                };
                self.engine
                    .put(partition, &engine_key, &object.encode(), durability)
                    .await
                    .map(|()| None)
                    .map_err(|e| e.to_string())
            }
            StoreOp::Sync => self
                .engine
                .flush()
                .await
                .map(|()| None)
                .map_err(|e| e.to_string()),
            // Losing a removal in a crash only delivers the hint again, and merging is idempotent.
            StoreOp::Remove => self
                .engine
                .delete(partition, &engine_key, Durability::Buffered)
                .await
                .map(|_| None)
                .map_err(|e| e.to_string()),
        }
    }
}

impl Shard {
    pub(super) async fn scan(
        &self,
        partition: u32,
        after: Option<Bytes>,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, String> {
        let after = match after {
            Some(c) => Some(
                peer::cursor_from_bytes(&c).ok_or_else(|| "a malformed scan cursor".to_string())?,
            ),
            None => None,
        };
        let mut it = self.engine.iter_partition_after(partition, after);
        let mut page = ScanPage::default();
        let mut bytes = 0;
        let mut last = None;
        while page.items.len() < max_items && (page.items.is_empty() || bytes < max_bytes) {
            let Some(entry) = it.next_entry().await else {
                return Ok(page);
            };
            let (kh, engine_key, value) = entry.map_err(|e| e.to_string())?;
            last = Some(kh);
            let Some((bucket, key)) = peer::key_from_engine(&engine_key) else {
                tracing::warn!(
                    shard = self.id,
                    partition,
                    "skipping a malformed replica key"
                );
                continue;
            };
            let object = Object::decode(&value).map_err(|e| {
                format!("stored object in partition {partition} does not decode: {e}")
            })?;
            bytes += value.len();
            page.items.push(ScanItem {
                bucket,
                key,
                object,
            });
            yield_if_needed().await;
        }
        // Full page: the next one starts after its last key (an empty remainder gives an empty
        // last page, which ends the scan).
        page.next = last.map(peer::cursor_bytes);
        Ok(page)
    }
}
