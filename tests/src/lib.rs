//! ringkv-tests: integration tests that span crates or whole processes, and the cluster
//! simulator they use.
//!
//! - [`sim`]: a deterministic, seeded simulator running the real sans-IO coordinator of every
//!   node over the real replica layout on an in-memory store and a faulty virtual network, with checkers for the promises
//!   of `docs/ARCHITECTURE.md` (no acknowledged write lost, siblings only for concurrent writes,
//!   convergence, counters and sets that count and keep every acknowledged operation). `tests/tests/sim.rs` runs it over many seeds. Its files: `mod.rs` (settings,
//!   the event loop, the nodes), `network.rs`, `store.rs`, `nemesis.rs` (crashes and membership
//!   changes), `workload.rs` (clients and their records) and `checkers.rs`.
//! - `tests/tests/`: the simulator runs and shard-per-core runs of several engines. Tests of one
//!   crate alone stay in that crate (the engine's model, crash, corruption and fault tests are in
//!   `engine/tests/`; the node's end-to-end tests in `cluster/tests/`).

pub mod sim;
