//! ringkv-tests: integration tests that span crates or whole processes.
//!
//! The tests live in `tests/tests/`: shard-per-core runs of several engines today; the
//! deterministic cluster simulator, multi-process clusters on loopback and fault-injection runs
//! join them as the node and the Dynamo layer land. Tests of one crate alone stay in that crate
//! (the engine's model, crash, corruption and fault tests are in `engine/tests/`).
