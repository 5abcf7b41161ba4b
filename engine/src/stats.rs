//! Counters and gauges of one engine, for `/metrics` and benchmarks.
//!
//! Counters are plain `Cell`s: the engine is single-threaded, so an increment is a load and a
//! store, cheap enough for every operation.

use std::cell::Cell;
use std::time::Duration;

use crate::engine::Inner;

/// Upper bounds, in microseconds, of the buckets of a latency histogram (`+Inf` is implied): the
/// engine's group commits here, a node's requests in its metrics.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 250_000, 1_000_000,
];
/// Buckets of a latency histogram, the `+Inf` one included.
pub const LATENCY_BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;

/// The bucket of [`LATENCY_BUCKETS_US`] that `us` falls in.
pub fn latency_bucket(us: u64) -> usize {
    LATENCY_BUCKETS_US
        .iter()
        .position(|&b| us <= b)
        .unwrap_or(LATENCY_BUCKETS_US.len())
}

/// Monotonic counters, updated in place.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) puts: Cell<u64>,
    pub(crate) gets: Cell<u64>,
    pub(crate) deletes: Cell<u64>,
    pub(crate) cache_hits: Cell<u64>,
    pub(crate) disk_reads: Cell<u64>,
    pub(crate) bytes_written: Cell<u64>,
    pub(crate) zeroed_bytes: Cell<u64>,
    pub(crate) zero_write_failures: Cell<u64>,
    pub(crate) corrupt_reads: Cell<u64>,
    pub(crate) hint_write_failures: Cell<u64>,
    pub(crate) compactions: Cell<u64>,
    pub(crate) compaction_bytes_reclaimed: Cell<u64>,
    pub(crate) compaction_bytes_read: Cell<u64>,
    pub(crate) tombstones_reaped: Cell<u64>,
    pub(crate) compaction_damaged_records: Cell<u64>,
    pub(crate) segment_prepare_failures: Cell<u64>,
    /// Group commits by how long their durable writes took, per [`LATENCY_BUCKETS_US`].
    pub(crate) flush_buckets: [Cell<u64>; LATENCY_BUCKETS],
    pub(crate) flush_us_total: Cell<u64>,
}

impl Counters {
    /// Counts one group commit that took `elapsed`.
    pub(crate) fn record_flush(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = &self.flush_buckets[latency_bucket(us)];
        bucket.set(bucket.get() + 1);
        self.flush_us_total
            .set(self.flush_us_total.get().saturating_add(us));
    }
}

/// A snapshot of an engine's counters and gauges.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    /// Put operations accepted.
    pub puts: u64,
    /// Get operations.
    pub gets: u64,
    /// Delete operations.
    pub deletes: u64,
    /// Gets answered from the value cache.
    pub cache_hits: u64,
    /// Gets that read the disk.
    pub disk_reads: u64,
    /// Group commits (each one durable write per pending segment).
    pub flushes: u64,
    /// Group commits by how long their durable writes took, per bucket of
    /// [`LATENCY_BUCKETS_US`] (not cumulative; the last bucket is `+Inf`). A disk that stops
    /// completing writes for a while shows here first: every synced write waits for it.
    pub flush_latency_buckets: [u64; LATENCY_BUCKETS],
    /// Summed duration of the group commits, in microseconds.
    pub flush_latency_sum_us: u64,
    /// Bytes handed to the disk by flushes (including rewritten partial blocks).
    pub bytes_written: u64,
    /// Bytes of zeros written ahead of log segments' tails, so that group commits overwrite
    /// instead of growing the file (`engine/src/ahead.rs`).
    pub zeroed_bytes: u64,
    /// Zero writes ahead of a log tail that failed (not fatal: that segment's group commits
    /// grow the file instead).
    pub zero_write_failures: u64,
    /// Reads that found a record failing its checksum.
    pub corrupt_reads: u64,
    /// Hint files that could not be written.
    pub hint_write_failures: u64,
    /// Compaction passes that rewrote at least one segment.
    pub compactions: u64,
    /// Segment bytes freed by compaction.
    pub compaction_bytes_reclaimed: u64,
    /// Segment bytes compaction read to copy live records out (a hint file lets it skip dead
    /// ones).
    pub compaction_bytes_read: u64,
    /// Tombstones removed for good by compaction.
    pub tombstones_reaped: u64,
    /// Damaged records compaction found (and could not copy).
    pub compaction_damaged_records: u64,
    /// Spare segment files that could not be prepared (the flusher then creates files itself).
    pub segment_prepare_failures: u64,
    /// Index entries (live keys plus tombstones).
    pub index_entries: u64,
    /// Heap bytes of the index tables.
    pub index_bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Bytes of records in segment files (valid data, excluding alignment padding of the last
    /// block, and the zeros written ahead of the log).
    pub segment_bytes: u64,
    /// Bytes of records the index points at.
    pub live_bytes: u64,
    /// Bytes charged to the value cache.
    pub cache_bytes: u64,
    /// Damaged regions found by the recovery that opened this engine.
    pub recovery_corrupt_regions: u64,
    /// Torn-tail bytes truncated by that recovery.
    pub recovery_torn_bytes: u64,
}

pub(crate) fn snapshot(inner: &Inner) -> EngineStats {
    let c = &inner.counters;
    let st = inner.st.borrow();
    let segs = st.segments.iter().flatten();
    let (mut segments, mut segment_bytes, mut live_bytes) = (0, 0, 0);
    for s in segs {
        segments += 1;
        segment_bytes += s.len.get();
        live_bytes += s.live_bytes.get();
    }
    EngineStats {
        puts: c.puts.get(),
        gets: c.gets.get(),
        deletes: c.deletes.get(),
        cache_hits: c.cache_hits.get(),
        disk_reads: c.disk_reads.get(),
        // Every group commit lands in one bucket.
        flushes: c.flush_buckets.iter().map(Cell::get).sum(),
        flush_latency_buckets: std::array::from_fn(|b| c.flush_buckets[b].get()),
        flush_latency_sum_us: c.flush_us_total.get(),
        bytes_written: c.bytes_written.get(),
        zeroed_bytes: c.zeroed_bytes.get(),
        zero_write_failures: c.zero_write_failures.get(),
        corrupt_reads: c.corrupt_reads.get(),
        hint_write_failures: c.hint_write_failures.get(),
        compactions: c.compactions.get(),
        compaction_bytes_reclaimed: c.compaction_bytes_reclaimed.get(),
        compaction_bytes_read: c.compaction_bytes_read.get(),
        tombstones_reaped: c.tombstones_reaped.get(),
        compaction_damaged_records: c.compaction_damaged_records.get(),
        segment_prepare_failures: c.segment_prepare_failures.get(),
        index_entries: st.index.len() as u64,
        index_bytes: st.index.heap_bytes() as u64,
        segments,
        segment_bytes,
        live_bytes,
        cache_bytes: inner.cache.borrow().used_bytes() as u64,
        recovery_corrupt_regions: inner.recovery.corrupt_regions.len() as u64,
        recovery_torn_bytes: inner.recovery.torn_tail_bytes,
    }
}
