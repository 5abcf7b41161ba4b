//! Node identity: the one name a node has in the ring and in causality metadata.
//!
//! A [`NodeId`] is a small integer rather than a host name so that the ring (one owner per partition,
//! gossiped whole) and every dotted version vector stored with every key stay compact, and so that
//! ordering nodes is cheap and the same everywhere. Mapping ids to addresses is membership's job
//! (later); this module only defines the id.
//!
//! Its submodules are the node runtime: [`config`] (settings from file and flags, sans-IO),
//! [`peer`] (peer messages on the wire and hints in the engine, sans-IO), [`epochs`] (the
//! persisted epoch lease of a shard), [`identity`] (the node id and incarnation a data directory
//! is bound to), [`cluster_state`] (the node's persisted membership),
//! [`metrics`] (counters, Prometheus text and admin HTTP answers, sans-IO),
//! [`route`] (partition, shard and engine key of a request, sans-IO), [`resp`] (Redis commands onto
//! requests, sans-IO), [`session`] (a connection's
//! protocol state, sans-IO), [`preflight`] (what the runtime needs from the kernel, checked before
//! it starts) and [`server`] (the glommio shell: one executor and engine per shard, listeners, the
//! channel mesh, shutdown).
//!
//! Limits and obligations: ids are assigned once, by the operator or by the node itself on an
//! empty data directory ([`identity`]), and are never reused for a different node. A node that may have lost acknowledged writes (a wiped or
//! replaced disk, or buffered writes lost in a crash) must come back under a **new** id: it is also
//! the actor of its dotted version vectors (`dvv.rs`), and an actor that restarts its counter would
//! issue a dot that already names another value, which silently breaks causality for that key.

pub mod cluster_state;
pub mod config;
pub mod epochs;
pub mod identity;
pub mod metrics;
pub mod peer;
pub mod preflight;
pub mod resp;
pub mod route;
pub mod server;
pub mod session;

use std::fmt;

/// Identity of a cluster node; also the actor id in dotted version vectors.
///
/// Ordered by its integer value; every deterministic choice in this crate (claim tie-breaks,
/// clock entry order) uses that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}
