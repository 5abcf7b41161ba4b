//! ringkv-cluster: the Dynamo layer and the node runtime.
//!
//! The Dynamo design as sans-IO state machines and pure functions (no IO, no clock, no
//! randomness: every node computes the same result from the same input, and the simulator in
//! `ringkv-tests` runs the same code), plus the glommio shell that runs one shard per core and the
//! `ringkv` binary:
//!
//! - [`ring`]: partitions (`Q`, a power of two), the key → partition hash, the claim function that
//!   balances ownership with minimal movement, and preference lists with their fallbacks.
//! - [`dvv`]: dotted version vector sets (causality and siblings per key), actors `(node, epoch)`,
//!   and the version vectors clients carry as opaque contexts.
//! - [`object`]: what a replica stores per key (siblings with their clock, or an lww version) and
//!   how replicas merge. [`bucket`]: bucket properties and per-request quorums.
//! - [`coordinator`]: the request path: quorum reads and writes, sloppy quorum and hinted
//!   handoff, read repair, forwarding, epochs.
//! - [`membership`]: gossiped cluster state (members, the ring in force and the pending one,
//!   transfer reports) that merges deterministically, and the staged join/leave/remove changes a
//!   claimant commits and flips once partitions are transferred.
//! - [`merkle`]: incremental per-partition Merkle trees for anti-entropy; [`phi`]: phi-accrual
//!   failure detection, which each coordinator keeps per peer.
//! - [`admission`]: admission control of background work (Dynamo §6.5): the foreground's tail
//!   latency sets the share background work gets.
//! - [`node`]: [`NodeId`] and the node runtime (one shard per core, the client protocol,
//!   shutdown) behind `ringkv serve`.
//!
//! It uses `ringkv-engine` for storage and `ringkv-net` for the wire protocol; neither of those knows
//! about this crate. See `docs/ARCHITECTURE.md` for the layers.

pub mod admission;
pub mod bucket;
pub mod coordinator;
pub mod dvv;
#[cfg(test)]
mod fuzz;
pub mod membership;
pub mod merkle;
pub mod node;
pub mod object;
pub mod phi;
pub mod ring;

pub use dvv::{DvvSet, Put, VersionVector};
pub use node::NodeId;
pub use ring::{PartitionCount, PartitionId, Ring};
