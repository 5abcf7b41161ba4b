//! ringkv-net: the wire side of ringkv.
//!
//! This crate will own the framed binary protocol shared by clients and peers (frame header, message
//! bodies, handshake, typed error frames, size limits checked before allocation), the RESP2 codec for
//! Redis clients, and the Rust client library. It is runtime-free: the codec never touches a socket,
//! so the glommio server, a tokio client and a blocking client all use the same code.
//!
//! It knows nothing of the engine or of the cluster logic (dependencies point one way: `cluster`
//! uses `net`, never the reverse). The protocol is specified in `docs/PROTOCOL.md` once it exists;
//! until then this crate is intentionally empty.
