//! ringkv-cluster: the node runtime behind `ringkv serve`.
//!
//! The Dynamo logic lives in `ringkv-core` (sans-IO, no executor, no clock); this crate is the
//! shell that feeds it: one glommio executor and one engine per core, the listeners, the channel
//! mesh between shards, peer links, persistence of what the core decides, and shutdown. It uses
//! `ringkv-engine` for storage and `ringkv-net` for the wire protocol; neither of those knows
//! about this crate.
//!
//! Sans-IO parts (pure functions and state, tested without a runtime): [`config`] (settings from
//! file and flags), [`peer`] (peer messages on the wire), [`metrics`]
//! (counters, Prometheus text and admin HTTP answers), [`route`] (partition and shard
//! of a request), [`resp`] (Redis commands onto requests), [`session`] (a connection's protocol
//! state), [`replica`] (the replica store and the storage-key layout, over the engine or the
//! in-memory store the simulator and the hand-driven core tests use).
//!
//! [`error`] is the one error type of a node's start and stop.
//!
//! Parts that touch the machine: [`epochs`] (the persisted epoch lease of a shard), [`identity`]
//! (the node id and incarnation a data directory is bound to), [`cluster_state`] (the node's
//! persisted membership), [`preflight`] (what the runtime needs from the kernel, checked before it
//! starts) and [`server`] (the glommio shell: executors, listeners, the mesh, shutdown).
//!
//! What it must not own: Dynamo decisions (placement, causality, quorum counting, merge rules,
//! membership transitions). Those belong to `ringkv-core`; a decision made here would not run
//! under the simulator.
//!
//! Limits and obligations: node ids are assigned once, by the operator or by the node itself on an
//! empty data directory ([`identity`]), and are never reused for a different node. A node that may
//! have lost acknowledged writes (a wiped or replaced disk, or buffered writes lost in a crash)
//! must come back under a **new** id: the id is also the actor of its dotted version vectors, and
//! an actor that restarts its counter would issue a dot that already names another value, which
//! silently breaks causality for that key.

pub mod cluster_state;
pub mod config;
pub mod epochs;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod peer;
pub mod preflight;
pub mod replica;
pub mod resp;
pub mod route;
pub mod server;
pub mod session;
