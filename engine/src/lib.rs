//! ringkv-engine: the per-shard log-structured store.
//!
//! One [`Engine`] per shard, owned by that shard's thread (glommio executor): no locks, no shared
//! state. It stores opaque keys (≤ 1 KiB by default) and values (≤ 1 MiB by default, 16 MiB at most)
//! grouped in ring partitions, in append-only segment files written with O_DIRECT through io_uring.
//!
//! What it does: group-committed writes with per-write durability ([`Durability::Sync`] or
//! [`Durability::Buffered`]), tombstone deletes, partition iteration and dropping, scans of the
//! live records of chosen partitions in storage order ([`LiveScan`]), a bounded value cache,
//! background compaction in its own task queue, and crash recovery (hint files for speed,
//! scanning with CRC checks for robustness, torn tails truncated, damaged records reported).
//!
//! What it does not do: no causality or replication (the cluster layer stores its version vectors
//! inside values), no range scans across keys (the index is a hash table), no TTL, no transactions
//! across keys. Values are kept whole in memory while read or written.
//!
//! Layout of the crate: [`record`] and [`hint`] are the file formats, [`scan`] the recovery
//! scanner, [`index`] the in-memory index and `group_commit` the rule for when a flush starts,
//! all sans-IO; `engine`, `recovery` and `compaction` do the IO through the seam in [`io`]. The
//! file formats are documented in `docs/ARCHITECTURE.md`.

mod ahead;
mod cache;
mod compaction;
pub mod config;
mod engine;
pub mod error;
mod group_commit;
pub mod hint;
pub mod index;
pub mod io;
pub mod live_scan;
mod maintenance;
pub mod pace;
pub mod prefetch;
pub mod record;
mod recovery;
pub mod scan;
mod segment;
mod stats;

pub use compaction::CompactionReport;
pub use config::{Durability, EngineConfig};
pub use engine::{Engine, PartitionIter};
pub use error::EngineError;
pub use io::{CompactionStep, FaultPlan, IoClass, SyncFailure};
pub use live_scan::{LiveRecord, LiveScan};
pub use pace::Pace;
pub use recovery::{DamagedRegion, RecoveryReport, set_compaction_shares};
pub use stats::{EngineStats, LATENCY_BUCKETS, LATENCY_BUCKETS_US, latency_bucket};
