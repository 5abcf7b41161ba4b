//! ringkv-cluster: the Dynamo layer and the node runtime.
//!
//! This crate will own the sans-IO state machines of the Dynamo design (ring and claim function,
//! dotted version vectors, quorum coordination, sloppy quorum and hinted handoff, gossip membership,
//! Merkle anti-entropy), each driven by `handle_*(now, input)` and returning outputs, plus the thin
//! glommio shell that runs one shard per core and the `ringkv` binary.
//!
//! It uses `ringkv-engine` for storage and `ringkv-net` for the wire protocol; neither of those knows
//! about this crate. See `docs/ARCHITECTURE.md` for the layers. Until the node exists this crate is
//! intentionally empty.
