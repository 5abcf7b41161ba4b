//! The workload both stores run, so the two sides measure exactly the same thing: key and value
//! generation, the stop rule of a timed phase, and latency histograms.
//!
//! Keys are 16 bytes (`k` and 15 decimal digits of the key number), spread over a fixed number of
//! ring partitions by key number. RocksDB has no partitions, so its key is the 4-byte big-endian
//! partition followed by the same 16 bytes. Values are random bytes (incompressible), the same
//! buffer for every write of a phase.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::StdRng};

pub(crate) use ringkv_bench::load::keygen::{KEY_LEN, key_of};

/// The ring partition key number `n` belongs to.
pub(crate) fn partition_of(n: u64, partitions: u32) -> u32 {
    (n % u64::from(partitions.max(1))) as u32
}

/// The key RocksDB stores for key number `n`: partition (big-endian) then [`key_of`].
#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
pub(crate) fn flat_key_of(n: u64, partitions: u32) -> [u8; 4 + KEY_LEN] {
    let mut k = [0u8; 4 + KEY_LEN];
    k[..4].copy_from_slice(&partition_of(n, partitions).to_be_bytes());
    k[4..].copy_from_slice(&key_of(n));
    k
}

/// `len` random (incompressible) bytes.
pub(crate) fn random_value(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// A seeded random generator for worker `worker` of a phase.
pub(crate) fn worker_rng(phase_seed: u64, worker: usize) -> StdRng {
    StdRng::seed_from_u64(phase_seed ^ (worker as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Uniform random key number below `keys`.
pub(crate) fn random_key(rng: &mut StdRng, keys: u64) -> u64 {
    rng.gen_range(0..keys.max(1))
}

/// Write durability of a put phase: `Sync` waits for `fdatasync` (RocksDB: `sync = true`),
/// `Buffered` returns once the write is in memory (RocksDB: WAL written, not synced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Durable when acknowledged.
    Sync,
    /// Buffered, synced within the flush interval.
    Buffered,
}

impl Mode {
    /// Lower-case name, as in the report.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Buffered => "buffered",
        }
    }
}

/// What every worker of a timed phase needs to know: when to stop (at `until` or once `ops_max`
/// operations were started over all workers, whichever comes first) and which keys to use.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Phase {
    /// Deadline of the phase.
    pub(crate) until: Instant,
    /// Most operations in the phase, over all workers.
    pub(crate) ops_max: u64,
    /// Key numbers are drawn uniformly below this.
    pub(crate) keys: u64,
    /// Ring partitions the keys are spread over.
    pub(crate) partitions: u32,
    /// Seed of the workers' random generators.
    pub(crate) seed: u64,
    /// With a non-zero value, gets pick a key below this (the hot set) with probability
    /// `HOT_SHARE`, else uniformly below `keys`.
    pub(crate) hot_keys: u64,
}

/// Share of gets that go to the hot set in a hot-set phase.
pub(crate) const HOT_SHARE: f64 = 0.9;

/// The key of a get: uniform, or skewed to the hot set (see [`Phase::hot_keys`]).
pub(crate) fn get_key(rng: &mut StdRng, phase: &Phase) -> u64 {
    if phase.hot_keys > 0 && rng.gen_bool(HOT_SHARE) {
        random_key(rng, phase.hot_keys)
    } else {
        random_key(rng, phase.keys)
    }
}

impl Phase {
    /// A phase starting now and lasting `duration`.
    pub(crate) fn starting_now(
        duration: Duration,
        ops_max: u64,
        keys: u64,
        partitions: u32,
        seed: u64,
    ) -> Self {
        Self {
            until: Instant::now() + duration,
            ops_max,
            keys,
            partitions,
            seed,
            hot_keys: 0,
        }
    }
}

/// An empty latency histogram in nanoseconds (1 ns to 100 s, 3 significant digits).
pub(crate) fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 100_000_000_000, 3)?)
}

/// Records the time since `since` in `h`, in nanoseconds.
pub(crate) fn record_since(h: &mut Histogram<u64>, since: Instant) {
    let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    h.saturating_record(ns.max(1));
}

/// Merges per-worker histograms into one.
pub(crate) fn merge(
    hs: impl IntoIterator<Item = Histogram<u64>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut all = new_histogram()?;
    for h in hs {
        all.add(&h)?;
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fixed_width_and_distinct() {
        assert_eq!(&key_of(0), b"k000000000000000");
        assert_eq!(&key_of(1234567), b"k000000001234567");
        assert_eq!(&flat_key_of(17, 16)[..4], &1u32.to_be_bytes());
        assert_eq!(&flat_key_of(17, 16)[4..], &key_of(17));
    }
}
