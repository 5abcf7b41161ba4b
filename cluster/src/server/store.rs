//! The shard's replica store: the core's storage operations and transfer scans run through the
//! replica layout ([`crate::replica`]) onto the shard's engine; and the hints found in the
//! engine at start, listed for the core.

use bytes::Bytes;
use ringkv_engine::{Engine, EngineError};

use ringkv_core::coordinator::{ScanPage, StoreKey, StoreOp, hint_bytes};
use ringkv_core::object::Object;
use ringkv_core::ring::PartitionId;

use crate::replica::{self, HINT_PARTITION_BASE};
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
            match replica::hint_from_engine(partition, &key) {
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
    /// [`store`](Self::store) when the operation needs no wait, else `None` (nothing done).
    pub(super) fn store_now(
        &self,
        key: &StoreKey,
        op: &StoreOp,
    ) -> Option<Result<Option<Object>, String>> {
        replica::apply_now(&self.engine, key, op)
    }

    /// One storage operation of the core on this shard's engine.
    pub(super) async fn store(
        &self,
        key: &StoreKey,
        op: StoreOp,
    ) -> Result<Option<Object>, String> {
        replica::apply(&self.engine, key, op).await
    }

    /// A page of a partition's replicas for a transfer or handoff.
    pub(super) async fn scan(
        &self,
        partition: u32,
        after: Option<Bytes>,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, String> {
        replica::scan_page(&self.engine, partition, after, max_items, max_bytes).await
    }
}
