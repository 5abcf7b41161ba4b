//! ringkv-net: the wire side of ringkv.
//!
//! This crate owns the framed binary protocol shared by clients and peers and the RESP2 codec for
//! Redis clients. The protocol is specified in `docs/PROTOCOL.md`; this crate is its reference
//! implementation.
//!
//! - [`frame`]: the 20-byte frame header, [`decode_frame`] and [`encode_frame`].
//! - [`message`]: message kinds and typed bodies (handshake, client ops including operations on
//!   convergent data types, peer replica ops, errors).
//! - [`limits`]: every size limit, as named constants and the configurable [`Limits`].
//! - [`error`]: typed errors naming the frame, field and limit at fault.
//! - [`wire`]: the bounds-checked field reader and writer every body uses, public so the cluster
//!   layer writes CLUSTER and ADMIN payloads with the same encodings.
//! - [`resp`]: an incremental RESP2 request parser and reply encoder (and a reply parser).
//! - [`client`]: clients: a blocking one on `std::net` and a thread-safe pool of them, and (feature
//!   `tokio`, on by default) a multiplexed async connection and a pool of those, all reconnecting
//!   through their pools.
//!
//! The codecs are runtime-free: they never touch a socket, a clock or an executor, so the glommio node,
//! a tokio client and a blocking client all use the same code. Decoders are incremental and
//! stateless (they take the bytes received so far and answer "need more", a message with the
//! number of bytes it used, or a typed error) and check every declared size against a limit before
//! allocating for it, so hostile input costs at most memory proportional to the bytes actually
//! received and never more than the configured limits.
//!
//! Besides the [`client`] it contains no connection management and no request execution.
//! It knows nothing of the engine or of the cluster logic
//! (dependencies point one way: `cluster` uses `net`, never the reverse).

pub mod client;
pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod resp;
pub mod wire;

#[cfg(feature = "tokio")]
pub use client::{AsyncConnection, AsyncPool};
pub use client::{
    Client, ClientConfig, ClientError, GetReply, Pool, PoolConfig, PoolStats, Reply, Request,
};
pub use error::{BodyError, EncodeError, FrameError};
pub use frame::{
    FrameHeader, MAGIC, PROTOCOL_VERSION, decode_frame, decode_header, encode_frame,
    encode_frame_to_vec,
};
pub use limits::{Limits, LimitsError};
pub use message::{
    Admin, AdminOk, Apply, ApplyOk, CRDT_OPS_MAX, Cluster, ClusterOk, Condition, CrdtOp, CrdtType,
    CrdtValue, Delete, ErrorBody, ErrorCode, Expiry, FieldOp, FieldValue, ForwardPut, Frame, Get,
    GetOk, Hello, HelloOk, Kind, MapOp, Message, Put, PutOk, ReplicaGet, ReplicaGetOk, ReplicaPut,
    ReplicaPutOk, Role, Sibling, Update,
};
