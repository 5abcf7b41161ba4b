//! ringkv-core: the Dynamo design as sans-IO state machines and pure functions.
//!
//! Everything here computes; nothing here does IO, reads a clock or draws a random number. Time
//! enters as `now_ms` arguments, storage as [`coordinator::StoreOp`] outputs the caller carries out,
//! and the network as [`coordinator::Output`] messages the caller sends. So every node computes the
//! same result from the same input, and the simulator in `ringkv-tests` runs exactly this code
//! under its own clock, network and faults.
//!
//! - [`ring`]: partitions (`Q`, a power of two), the key → partition hash, the claim function that
//!   balances ownership with minimal movement, and preference lists with their fallbacks.
//! - [`dvv`]: dotted version vector sets (causality and siblings per key), actors `(node, epoch)`,
//!   and the version vectors clients carry as opaque contexts.
//! - [`object`]: what a replica stores per key (siblings with their clock, an lww version, or a
//!   map of lww fields from [`map`]), how replicas merge, and expiry as part of a version.
//!   [`bucket`]: bucket properties and per-request quorums.
//! - [`coordinator`]: the request path: quorum reads and writes, sloppy quorum and hinted
//!   handoff, read repair, forwarding, epochs, partition transfer and anti-entropy.
//! - [`membership`]: gossiped cluster state (members, the ring in force and the pending one,
//!   transfer reports) that merges deterministically, and the staged join/leave/remove changes a
//!   claimant commits and flips once partitions are transferred.
//! - [`merkle`]: incremental per-partition Merkle trees for anti-entropy; [`phi`]: phi-accrual
//!   failure detection, which each coordinator keeps per peer.
//! - [`admission`]: admission control of background work (Dynamo §6.5): the foreground's tail
//!   latency sets the share background work gets.
//! - [`request`]: a client's GET, PUT, DELETE or UPDATE parsed once, with its key's partition.
//! - [`NodeId`]: the one name a node has in the ring and in causality metadata.
//!
//! What it must not own: sockets, files, executors, signals, the engine, configuration files. Its
//! dependencies are the wire codec of `ringkv-net` (messages are its inputs and outputs), hashing
//! and error derives. The node runtime that feeds it is `ringkv-cluster`; see
//! `docs/ARCHITECTURE.md` for the layers.

pub mod admission;
pub mod bucket;
pub mod coordinator;
pub mod crdt;
pub mod dvv;
#[cfg(test)]
mod fuzz;
pub mod map;
pub mod membership;
pub mod merkle;
pub mod object;
pub mod phi;
pub mod request;
pub mod ring;

pub use dvv::{DvvSet, Put, VersionVector};
pub use ring::{PartitionCount, PartitionId, Ring};

use std::fmt;

/// Identity of a cluster node; also the actor id in dotted version vectors.
///
/// A small integer rather than a host name, so that the ring (one owner per partition, gossiped
/// whole) and every dotted version vector stored with every key stay compact, and so that ordering
/// nodes is cheap and the same everywhere. Mapping ids to addresses is membership's job.
///
/// Ordered by its integer value; every deterministic choice in this crate (claim tie-breaks,
/// clock entry order) uses that order.
///
/// Ids are assigned once and never reused for a different node: the id is also the actor of its
/// dotted version vectors, and an actor that restarts its counter would issue a dot that already
/// names another value (see the node runtime's `identity` module for how a data directory is bound
/// to its id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}
