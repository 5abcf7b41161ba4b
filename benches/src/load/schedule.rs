//! The open-loop schedule: when each operation is meant to start, independent of when earlier
//! operations finished.
//!
//! At `--rate R`, operation `i` of the run (counted from 0 over all connections) is intended to
//! start `i / R` seconds after the measured phase begins. Connection `c` of `C` takes the
//! operations `c, c + C, c + 2C, ...`, so the connections interleave evenly and together keep
//! exactly the global rate. Latency is measured from this intended start, not from the moment
//! the request was sent: when the server (or the generator) falls behind, the operations that
//! should have started in the meantime are charged the wait, which is the fix for coordinated
//! omission (Tene, "How NOT to measure latency"). A closed loop cannot do this: it only starts an
//! operation when a previous one finished, so a stall hides the requests that would have queued
//! behind it.
//!
//! Pure integer arithmetic on nanosecond offsets: no clock, so the schedule is tested exactly.

/// The intended start of operation `i` at `rate_per_sec`, in nanoseconds after the start of the
/// schedule. Exact (rounded down to the nanosecond), never drifting however large `i` grows.
pub fn intended_offset_ns(i: u64, rate_per_sec: u64) -> u64 {
    assert!(rate_per_sec > 0, "a schedule needs a positive rate");
    let ns = u128::from(i) * 1_000_000_000 / u128::from(rate_per_sec);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The operations intended to start in the first `elapsed_ns` nanoseconds (offsets strictly
/// below `elapsed_ns`), over all lanes.
pub fn ops_due_before(elapsed_ns: u64, rate_per_sec: u64) -> u64 {
    assert!(rate_per_sec > 0, "a schedule needs a positive rate");
    // Operation i is due before t iff i * 1e9 / rate < t (exactly, before rounding down), i.e.
    // i < t * rate / 1e9; count the i satisfying it.
    let scaled = u128::from(elapsed_ns) * u128::from(rate_per_sec);
    let count = scaled.div_ceil(1_000_000_000);
    u64::try_from(count).unwrap_or(u64::MAX)
}

/// One connection's share of the global schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lane {
    /// This lane's number, `0..lanes`.
    pub index: u64,
    /// Number of lanes sharing the schedule.
    pub lanes: u64,
    /// Global rate of the schedule, operations per second.
    pub rate_per_sec: u64,
}

impl Lane {
    /// Lane `index` of `lanes` of a schedule at `rate_per_sec`.
    pub fn new(index: u64, lanes: u64, rate_per_sec: u64) -> Self {
        assert!(lanes > 0, "a schedule needs a lane");
        assert!(index < lanes, "lane index out of range");
        assert!(rate_per_sec > 0, "a schedule needs a positive rate");
        Self {
            index,
            lanes,
            rate_per_sec,
        }
    }

    /// The global number of this lane's `k`-th operation.
    pub fn op_number(&self, k: u64) -> u64 {
        self.index.saturating_add(k.saturating_mul(self.lanes))
    }

    /// Intended start of this lane's `k`-th operation, in nanoseconds after the schedule start.
    pub fn intended_offset_ns(&self, k: u64) -> u64 {
        intended_offset_ns(self.op_number(k), self.rate_per_sec)
    }
}
