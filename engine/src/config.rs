//! Engine configuration, durability modes and hard limits.
//!
//! Every limit has a name with its unit last. Defaults are what `ringkv serve` uses with no flags;
//! [`EngineConfig::validate`] rejects values outside the hard limits with a clear message instead
//! of failing later in the write path.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::EngineError;

/// Largest key any configuration may allow (the default allows 1 KiB).
pub const KEY_BYTES_MAX_HARD: usize = 4096;
/// Largest value any configuration may allow (the default allows 1 MiB).
pub const VALUE_BYTES_MAX_HARD: usize = 16 << 20;
/// Largest segment file: offsets are stored in 27 bits of 8-byte units in the index.
pub const SEGMENT_BYTES_MAX_HARD: u64 = 1 << 30;
/// Smallest segment file allowed (keeps the number of files sane).
pub const SEGMENT_BYTES_MIN: u64 = 1 << 20;

/// When a write's future resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Durability {
    /// After the record is written and `fdatasync` returned: it survives a power loss.
    Sync,
    /// As soon as the record is buffered in memory: it is written and synced within
    /// [`EngineConfig::flush_interval`], and a crash before then may lose it.
    Buffered,
}

/// Settings of one engine instance (one shard's store).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Directory holding this engine's segment and hint files. Created if missing.
    pub dir: PathBuf,
    /// Segments are sealed and a new one started once they would grow past this size.
    pub segment_bytes: u64,
    /// Largest accepted key. Default 1 KiB.
    pub key_bytes_max: usize,
    /// Largest accepted value. Default 1 MiB, at most 16 MiB.
    pub value_bytes_max: usize,
    /// Upper bound on appended-but-unwritten bytes; writers wait for a flush past it.
    pub write_buffer_bytes_max: usize,
    /// Buffered writes are written and synced at most this long after they were accepted.
    pub flush_interval: Duration,
    /// A sealed segment is compacted once this fraction of its bytes is garbage.
    pub compaction_garbage_ratio: f64,
    /// Most segments rewritten by one compaction pass.
    pub compaction_segments_max: usize,
    /// How often the background compactor looks for work; `None` disables it (tests, benches
    /// and callers that schedule [`crate::Engine::compact`] themselves).
    pub compaction_interval: Option<Duration>,
    /// CPU shares of the compaction task queue (foreground work runs in the caller's queue).
    pub compaction_shares: usize,
    /// Budget of the per-shard cache of recently read or written values, in bytes; 0 disables it.
    pub cache_bytes: usize,
    /// Durability used by callers that do not choose one per write.
    pub default_durability: Durability,
}

impl EngineConfig {
    /// Defaults for a store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            key_bytes_max: 1024,
            value_bytes_max: 1 << 20,
            write_buffer_bytes_max: 8 << 20,
            flush_interval: Duration::from_millis(10),
            compaction_garbage_ratio: 0.5,
            compaction_segments_max: 4,
            compaction_interval: Some(Duration::from_secs(1)),
            compaction_shares: 100,
            cache_bytes: 64 << 20,
            default_durability: Durability::Sync,
        }
    }

    /// Checks every setting against its hard limit.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX_HARD).contains(&self.segment_bytes) {
            return bad(format!(
                "segment_bytes {} outside [{SEGMENT_BYTES_MIN}, {SEGMENT_BYTES_MAX_HARD}]",
                self.segment_bytes
            ));
        }
        if self.key_bytes_max == 0 || self.key_bytes_max > KEY_BYTES_MAX_HARD {
            return bad(format!(
                "key_bytes_max {} outside [1, {KEY_BYTES_MAX_HARD}]",
                self.key_bytes_max
            ));
        }
        if self.value_bytes_max > VALUE_BYTES_MAX_HARD {
            return bad(format!(
                "value_bytes_max {} above the hard limit {VALUE_BYTES_MAX_HARD}",
                self.value_bytes_max
            ));
        }
        let biggest = crate::record::record_len(self.key_bytes_max, self.value_bytes_max) as u64;
        if biggest + crate::io::IO_BLOCK_BYTES > self.segment_bytes {
            return bad(format!(
                "segment_bytes {} must hold the largest record ({biggest} bytes) plus 4 KiB",
                self.segment_bytes
            ));
        }
        if self.write_buffer_bytes_max < 64 << 10 {
            return bad(format!(
                "write_buffer_bytes_max {} below 64 KiB",
                self.write_buffer_bytes_max
            ));
        }
        if self.flush_interval.is_zero() || self.flush_interval > Duration::from_secs(10) {
            return bad(format!(
                "flush_interval {:?} outside (0, 10s]",
                self.flush_interval
            ));
        }
        if !(self.compaction_garbage_ratio > 0.0 && self.compaction_garbage_ratio <= 1.0) {
            return bad(format!(
                "compaction_garbage_ratio {} outside (0, 1]",
                self.compaction_garbage_ratio
            ));
        }
        if self.compaction_segments_max == 0 {
            return bad("compaction_segments_max must be at least 1".into());
        }
        if self.compaction_shares == 0 || self.compaction_shares > 1000 {
            return bad(format!(
                "compaction_shares {} outside [1, 1000]",
                self.compaction_shares
            ));
        }
        Ok(())
    }
}
