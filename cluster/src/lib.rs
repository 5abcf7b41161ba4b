//! ringkv-cluster: the Dynamo layer and the node runtime.
//!
//! This crate will own the sans-IO state machines of the Dynamo design (ring and claim function,
//! dotted version vectors, quorum coordination, sloppy quorum and hinted handoff, gossip membership,
//! Merkle anti-entropy), each driven by `handle_*(now, input)` and returning outputs, plus the thin
//! glommio shell that runs one shard per core and the `ringkv` binary.
//!
//! What exists now: the first building blocks, plain data structures and pure functions with no
//! IO, no clock and no randomness, so that every node computes the same result from the same input
//! (except `node::server`, the runtime shell):
//!
//! - [`node`]: [`NodeId`], the identity of a node in the ring and as a causality actor, and the
//!   single-node runtime (one shard per core, the client protocol, shutdown) behind `ringkv serve`.
//! - [`ring`]: partitions (`Q`, a power of two), the key → partition hash, the claim function that
//!   balances ownership with minimal movement, and preference lists with their fallbacks.
//! - [`dvv`]: dotted version vector sets (causality and siblings per key) and the version vectors
//!   clients carry as opaque contexts.
//!
//! What comes later: the coordinator (quorum reads and writes over preference lists), membership
//! and gossip (which orders ring versions), hinted handoff, anti-entropy, and peer links.
//!
//! It uses `ringkv-engine` for storage and `ringkv-net` for the wire protocol; neither of those knows
//! about this crate. See `docs/ARCHITECTURE.md` for the layers.

pub mod bucket;
pub mod coordinator;
pub mod dvv;
pub mod node;
pub mod object;
pub mod ring;

pub use dvv::{DvvSet, Put, VersionVector};
pub use node::NodeId;
pub use ring::{PartitionCount, PartitionId, Ring};
