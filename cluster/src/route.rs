//! Where a request goes: partition and owning shard (sans-IO).
//!
//! A node hashes `(bucket, key)` onto the ring's `Q` = 256 partitions ([`PARTITIONS`]) and gives
//! partition `p` to shard `p % shards`, the rule `docs/PROTOCOL.md` §3.1 promises to shard-aware
//! clients. How a key is stored in the engine is [`crate::replica`]'s.
//!
//! This module also parses the kernel's CPU list format (`0-3,8`), used to default the shard count
//! to the CPUs of the process's affinity mask. No IO here: callers read `/proc` themselves.

use ringkv_core::ring::{PartitionCount, PartitionId};

/// The ring's partition count for a node; fixed until the Dynamo layer makes it a cluster setting.
pub const PARTITIONS: PartitionCount = PartitionCount::DEFAULT;

/// Most shards a node runs; HELLO_OK carries the count as a u16, and a node with more cores than
/// this would be better split into several nodes anyway.
pub const SHARDS_MAX: usize = 1024;

/// The partition of `(bucket, key)`.
pub fn partition_of(bucket: &[u8], key: &[u8]) -> PartitionId {
    PARTITIONS.partition_of(bucket, key)
}

/// The shard that owns `partition` on a node with `shards` shards.
pub fn shard_of(partition: PartitionId, shards: usize) -> usize {
    assert!(shards > 0);
    assert!(shards <= SHARDS_MAX);
    // u32 -> usize is lossless on every platform glommio supports (64-bit Linux).
    partition.0 as usize % shards
}

/// A CPU list that is not in the kernel's `Cpus_allowed_list` format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse CPU list {list:?}: {reason}")]
pub struct CpuListError {
    /// The text given.
    pub list: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses a CPU list like `0-3,8,10-11` into sorted, distinct CPU ids.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, CpuListError> {
    let err = |reason| CpuListError {
        list: list.to_owned(),
        reason,
    };
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let lo: usize = lo.trim().parse().map_err(|_| err("not a number"))?;
        let hi: usize = hi.trim().parse().map_err(|_| err("not a number"))?;
        if lo > hi {
            return Err(err("descending range"));
        }
        // Bounds the work a hostile or garbled list can cause; no machine has this many CPUs.
        if hi >= 1 << 16 {
            return Err(err("CPU id above 65535"));
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(err("no CPU listed"));
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every partition has exactly one owner and the owners cycle through all shards.
    #[test]
    fn partitions_spread_over_shards() {
        for shards in 1..=8 {
            let mut owned = vec![0; shards];
            for p in 0..PARTITIONS.get() {
                owned[shard_of(PartitionId(p), shards)] += 1;
            }
            assert!(
                owned
                    .iter()
                    .all(|&n| n >= PARTITIONS.get() as usize / shards)
            );
        }
    }

    /// The formats the kernel writes parse; garbage is refused.
    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Ok(vec![0, 1]));
        assert_eq!(parse_cpu_list("3"), Ok(vec![3]));
        assert_eq!(parse_cpu_list("0-2,8,10-11"), Ok(vec![0, 1, 2, 8, 10, 11]));
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("0-99999999").is_err());
    }
}
