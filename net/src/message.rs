//! The messages of the framed protocol: kinds, typed bodies and their encodings.
//!
//! Each message kind has one struct (or a unit variant for empty bodies) and one body layout,
//! documented byte by byte in `docs/PROTOCOL.md`. This module turns typed messages into bodies and
//! back; the frame header around them is `frame.rs`'s business.
//!
//! Kind numbering: `0x01..=0x0F` connection requests (both roles), `0x10..=0x3F` client requests,
//! `0x40..=0x7F` peer requests; a reply's kind is its request's kind with the high bit set, and
//! `0x80` (the reply bit alone) is ERROR, which may answer any request. New kinds are added inside
//! these ranges; a receiver that does not know a kind answers `unknown_kind` and carries on.
//!
//! What the codec checks: lengths against the limits in [`crate::limits`], tags and enums against
//! their allowed values, strings for UTF-8, and a few structural relations: `shard <
//! shard_count`, a GET_OK with map fields or a convergent value has no siblings, and a
//! convergent value's set elements and map fields are in strictly increasing order (the
//! submodule `crdt` encodes APPLY, APPLY_OK and those values). What it does not check: anything
//! that needs node state or configuration beyond [`Limits`] (whether `r <= n`, whether a bucket
//! exists, whether a client may send peer requests, whether an APPLY's operations fit its type).
//! Those are request-level errors the node answers without closing the connection.
//!
//! Byte fields are [`Bytes`] so messages can be moved across cores and cloned without copying;
//! decoding copies each field once out of the receive buffer.

use std::fmt;

use bytes::{BufMut, Bytes};

use crate::error::{BodyError, EncodeError};
use crate::limits::{
    BUCKET_BYTES_MAX, CONTEXT_BYTES_MAX, ERROR_MESSAGE_BYTES_MAX, Limits, NAME_BYTES_MAX,
    SIBLINGS_MAX, VALUE_BYTES_MAX,
};
use crate::wire::{LenWidth, Reader, Writer, check_len, opt_prefixed_len, prefixed_len};

mod crdt;

/// The kind byte of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Handshake request, the first frame on every connection.
    Hello = 0x01,
    /// Liveness probe.
    Ping = 0x02,
    /// Client read.
    Get = 0x10,
    /// Client write.
    Put = 0x11,
    /// Client delete (writes a tombstone).
    Delete = 0x12,
    /// Client write of some fields of a map (a Redis hash).
    Update = 0x13,
    /// Client operations on a convergent data type (a counter, a set, a map).
    Apply = 0x14,
    /// Operator command (cluster membership and status), answered with a text body.
    Admin = 0x20,
    /// Replica write from a coordinator to a shard.
    ReplicaPut = 0x40,
    /// Replica read from a coordinator to a shard.
    ReplicaGet = 0x41,
    /// Cluster control between nodes (gossip, anti-entropy, transfers, hint credit): a sub-kind
    /// and a payload whose layout the cluster layer owns.
    Cluster = 0x42,
    /// A PUT one node forwards to a home of its key, with the time after which the home must
    /// not apply it.
    ForwardPut = 0x43,
    /// Error reply to any request.
    Error = 0x80,
    /// Reply to [`Kind::Hello`].
    HelloOk = 0x81,
    /// Reply to [`Kind::Ping`].
    Pong = 0x82,
    /// Reply to [`Kind::Get`].
    GetOk = 0x90,
    /// Reply to [`Kind::Put`].
    PutOk = 0x91,
    /// Reply to [`Kind::Delete`].
    DeleteOk = 0x92,
    /// Reply to [`Kind::Update`].
    UpdateOk = 0x93,
    /// Reply to [`Kind::Apply`].
    ApplyOk = 0x94,
    /// Reply to [`Kind::Admin`].
    AdminOk = 0xA0,
    /// Reply to [`Kind::ReplicaPut`].
    ReplicaPutOk = 0xC0,
    /// Reply to [`Kind::ReplicaGet`].
    ReplicaGetOk = 0xC1,
    /// Reply to [`Kind::Cluster`].
    ClusterOk = 0xC2,
    /// Reply to [`Kind::ForwardPut`].
    ForwardPutOk = 0xC3,
}

/// The bit that turns a request kind into its reply kind.
pub const REPLY_BIT: u8 = 0x80;

impl Kind {
    /// Every kind, in numeric order.
    pub const ALL: [Kind; 25] = [
        Kind::Hello,
        Kind::Ping,
        Kind::Get,
        Kind::Put,
        Kind::Delete,
        Kind::Update,
        Kind::Apply,
        Kind::Admin,
        Kind::ReplicaPut,
        Kind::ReplicaGet,
        Kind::Cluster,
        Kind::ForwardPut,
        Kind::Error,
        Kind::HelloOk,
        Kind::Pong,
        Kind::GetOk,
        Kind::PutOk,
        Kind::DeleteOk,
        Kind::UpdateOk,
        Kind::ApplyOk,
        Kind::AdminOk,
        Kind::ReplicaPutOk,
        Kind::ReplicaGetOk,
        Kind::ClusterOk,
        Kind::ForwardPutOk,
    ];

    /// Decodes a kind byte; `None` for kinds this build does not know.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Hello,
            0x02 => Self::Ping,
            0x10 => Self::Get,
            0x11 => Self::Put,
            0x12 => Self::Delete,
            0x13 => Self::Update,
            0x14 => Self::Apply,
            0x20 => Self::Admin,
            0x40 => Self::ReplicaPut,
            0x41 => Self::ReplicaGet,
            0x42 => Self::Cluster,
            0x43 => Self::ForwardPut,
            0x80 => Self::Error,
            0x81 => Self::HelloOk,
            0x82 => Self::Pong,
            0x90 => Self::GetOk,
            0x91 => Self::PutOk,
            0x92 => Self::DeleteOk,
            0x93 => Self::UpdateOk,
            0x94 => Self::ApplyOk,
            0xA0 => Self::AdminOk,
            0xC0 => Self::ReplicaPutOk,
            0xC1 => Self::ReplicaGetOk,
            0xC2 => Self::ClusterOk,
            0xC3 => Self::ForwardPutOk,
            _ => return None,
        })
    }

    /// Whether this kind is a request (high bit clear).
    pub fn is_request(self) -> bool {
        (self as u8) & REPLY_BIT == 0
    }

    /// The success reply of a request kind; `None` for replies.
    pub fn reply(self) -> Option<Self> {
        if self.is_request() {
            let reply = Self::from_u8(self as u8 | REPLY_BIT);
            // Every request kind has a reply kind: the table above is built that way.
            assert!(reply.is_some(), "request kind {self} has no reply kind");
            reply
        } else {
            None
        }
    }

    /// The protocol's name of the kind, as in `docs/PROTOCOL.md`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "HELLO",
            Self::Ping => "PING",
            Self::Get => "GET",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Update => "UPDATE",
            Self::Apply => "APPLY",
            Self::Admin => "ADMIN",
            Self::ReplicaPut => "REPLICA_PUT",
            Self::ReplicaGet => "REPLICA_GET",
            Self::Cluster => "CLUSTER",
            Self::ForwardPut => "FORWARD_PUT",
            Self::Error => "ERROR",
            Self::HelloOk => "HELLO_OK",
            Self::Pong => "PONG",
            Self::GetOk => "GET_OK",
            Self::PutOk => "PUT_OK",
            Self::DeleteOk => "DELETE_OK",
            Self::UpdateOk => "UPDATE_OK",
            Self::ApplyOk => "APPLY_OK",
            Self::AdminOk => "ADMIN_OK",
            Self::ReplicaPutOk => "REPLICA_PUT_OK",
            Self::ReplicaGetOk => "REPLICA_GET_OK",
            Self::ClusterOk => "CLUSTER_OK",
            Self::ForwardPutOk => "FORWARD_PUT_OK",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who opens a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// An application client.
    Client = 1,
    /// Another node of the cluster.
    Peer = 2,
}

/// The code of an ERROR frame.
///
/// Codes are grouped by what the client should do: `0x00xx` the frame or connection was wrong,
/// `0x01xx` the request was rejected and retrying it unchanged will not help, `0x02xx` transient
/// conditions where a later retry may succeed, `0x03xx` internal failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A frame that does not decode (bad magic, flags, tags, UTF-8, trailing bytes...).
    BadFrame,
    /// A frame or field over a limit.
    TooLarge,
    /// A protocol version the receiver does not speak.
    UnsupportedVersion,
    /// A message kind the receiver does not know.
    UnknownKind,
    /// A request before a successful HELLO.
    HandshakeRequired,
    /// HELLO named another cluster.
    WrongCluster,
    /// The request is well-formed but invalid (e.g. `r` larger than `n`, a peer request on a
    /// client connection).
    InvalidRequest,
    /// A peer request for a partition this shard does not hold.
    WrongShard,
    /// The key has more siblings than the node allows; read, merge and write back first.
    TooManySiblings,
    /// The causal context does not decode.
    BadContext,
    /// A conditional write's condition did not hold (the key existed, or did not).
    ConditionFailed,
    /// The key holds another type than the request works on: a plain value or an UPDATE map
    /// under an APPLY, another convergent data type, or a map field of another kind.
    WrongType,
    /// Fewer replicas than requested (`r`, `w` or `dw`) answered.
    NotEnoughReplicas,
    /// The request's deadline passed. A write may or may not have been applied.
    Timeout,
    /// The node sheds load; retry later, ideally elsewhere.
    Overloaded,
    /// The node is shutting down.
    ShuttingDown,
    /// A FORWARD_PUT was read, or was due to be stamped, by its home after its apply-by time;
    /// nothing was written, so its sender may send it to another home.
    Expired,
    /// A bug or an unexpected failure on the node.
    Internal,
    /// A code this build does not know (from a newer node); treat it like [`ErrorCode::Internal`].
    /// Holds only values that are not the code of another variant.
    Other(u16),
}

impl ErrorCode {
    /// The code on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::BadFrame => 0x0001,
            Self::TooLarge => 0x0002,
            Self::UnsupportedVersion => 0x0003,
            Self::UnknownKind => 0x0004,
            Self::HandshakeRequired => 0x0005,
            Self::WrongCluster => 0x0006,
            Self::InvalidRequest => 0x0101,
            Self::WrongShard => 0x0102,
            Self::TooManySiblings => 0x0103,
            Self::BadContext => 0x0104,
            Self::ConditionFailed => 0x0105,
            Self::WrongType => 0x0106,
            Self::NotEnoughReplicas => 0x0201,
            Self::Timeout => 0x0202,
            Self::Overloaded => 0x0203,
            Self::ShuttingDown => 0x0204,
            Self::Expired => 0x0205,
            Self::Internal => 0x0301,
            Self::Other(code) => code,
        }
    }

    /// Decodes a code; unknown codes become [`ErrorCode::Other`] so that a newer node's errors
    /// still reach the application.
    pub fn from_u16(code: u16) -> Self {
        match code {
            0x0001 => Self::BadFrame,
            0x0002 => Self::TooLarge,
            0x0003 => Self::UnsupportedVersion,
            0x0004 => Self::UnknownKind,
            0x0005 => Self::HandshakeRequired,
            0x0006 => Self::WrongCluster,
            0x0101 => Self::InvalidRequest,
            0x0102 => Self::WrongShard,
            0x0103 => Self::TooManySiblings,
            0x0104 => Self::BadContext,
            0x0105 => Self::ConditionFailed,
            0x0106 => Self::WrongType,
            0x0201 => Self::NotEnoughReplicas,
            0x0202 => Self::Timeout,
            0x0203 => Self::Overloaded,
            0x0204 => Self::ShuttingDown,
            0x0205 => Self::Expired,
            0x0301 => Self::Internal,
            other => Self::Other(other),
        }
    }

    /// Whether a later retry of the same request may succeed.
    pub fn is_transient(self) -> bool {
        self.to_u16() & 0xFF00 == 0x0200
    }

    /// The protocol's name of the code, as in `docs/PROTOCOL.md`.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::TooLarge => "too_large",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnknownKind => "unknown_kind",
            Self::HandshakeRequired => "handshake_required",
            Self::WrongCluster => "wrong_cluster",
            Self::InvalidRequest => "invalid_request",
            Self::WrongShard => "wrong_shard",
            Self::TooManySiblings => "too_many_siblings",
            Self::BadContext => "bad_context",
            Self::ConditionFailed => "condition_failed",
            Self::WrongType => "wrong_type",
            Self::NotEnoughReplicas => "not_enough_replicas",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::Expired => "expired",
            Self::Internal => "internal",
            Self::Other(_) => "other",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(code) => write!(f, "error {code:#06x}"),
            known => f.write_str(known.name()),
        }
    }
}

/// HELLO: the first frame on every connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hello {
    /// Protocol version the sender speaks.
    pub protocol_version: u8,
    /// Client or peer.
    pub role: Role,
    /// Cluster the sender expects to join; a node of another cluster answers `wrong_cluster`.
    pub cluster_name: String,
    /// The sending node's name; required by nodes for [`Role::Peer`], absent for clients.
    pub node_name: Option<String>,
}

/// HELLO_OK: the handshake succeeded.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HelloOk {
    /// Protocol version both sides now speak.
    pub protocol_version: u8,
    /// The answering node's name.
    pub node_name: String,
    /// Number of shards (cores) of the node, at least 1.
    pub shard_count: u16,
    /// Shard that owns this connection, below `shard_count`.
    pub shard: u16,
}

/// GET: read a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Get {
    /// Bucket name.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
    /// Read quorum; the bucket's default when absent.
    pub r: Option<u8>,
    /// Deadline in milliseconds; the node's default when absent.
    pub timeout_ms: Option<u32>,
}

/// One concurrent version of a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Sibling {
    /// A value.
    Value(Bytes),
    /// A deletion concurrent with the other siblings.
    Tombstone,
}

/// GET_OK: every concurrent sibling and the causal context that covers them. A missing key has
/// no siblings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GetOk {
    /// Concurrent versions, at most [`SIBLINGS_MAX`].
    pub siblings: Vec<Sibling>,
    /// Opaque causal context to pass to the next PUT or DELETE of the key.
    pub context: Bytes,
    /// When the key expires (Unix milliseconds): the latest expiry of its value siblings, if
    /// every one of them expires; `None` if one never does, or if no value was found.
    pub expires_at_ms: Option<u64>,
    /// For a key holding a map (a Redis hash): its live fields in name order, and no siblings.
    pub fields: Option<Vec<(Bytes, Bytes)>>,
    /// For a key holding a convergent data type: its value, and no siblings.
    pub crdt: Option<CrdtValue>,
}

/// One change of an [`Update`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MapOp {
    /// Set a field.
    Set {
        /// The field's name.
        field: Bytes,
        /// Its value.
        value: Bytes,
    },
    /// Delete a field.
    Delete {
        /// The field's name.
        field: Bytes,
    },
    /// Set or remove the key's expiry.
    Expire(Expiry),
}

/// UPDATE: change some fields of the map under a key (a Redis hash), each field a
/// last-write-wins register of the convergent map type ([`Apply`]'s register operations); a
/// missing key becomes a map, a key holding a plain value answers `wrong_type`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Update {
    /// Bucket name.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
    /// The changes, applied in order (at most [`MAP_OPS_MAX`]).
    pub ops: Vec<MapOp>,
    /// Write quorum; the bucket's default when absent.
    pub w: Option<u8>,
    /// Durable-write quorum; the bucket's default when absent.
    pub dw: Option<u8>,
    /// Deadline in milliseconds; the node's default when absent.
    pub timeout_ms: Option<u32>,
}

/// The convergent data type an [`Apply`] works on (the key's type once it exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CrdtType {
    /// A counter: increments and decrements by any node all count.
    Counter = 1,
    /// An add-wins set of byte strings.
    Set = 2,
    /// A map of named fields, each a register, a counter, a set or a flag.
    Map = 3,
}

/// A change of one field of a map ([`CrdtOp::Field`]). The first change of a field gives it
/// its kind; a change of another kind on an existing field is refused (`wrong_type`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FieldOp {
    /// A register field: set its value (last write wins).
    Assign(Bytes),
    /// A counter field: add this (negative: subtract).
    Increment(i64),
    /// A set field: add an element.
    Add(Bytes),
    /// A set field: remove an element (the adds the coordinator has seen).
    Remove(Bytes),
    /// A flag field: enable it (an enable concurrent with a disable wins).
    Enable,
    /// A flag field: disable it.
    Disable,
}

/// One operation of an [`Apply`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CrdtOp {
    /// A counter: add this (negative: subtract).
    Increment(i64),
    /// A set: add an element.
    Add(Bytes),
    /// A set: remove an element (the adds the coordinator has seen; an add it has not seen
    /// survives, as a concurrent one would).
    Remove(Bytes),
    /// A map: change a field.
    Field {
        /// The field's name.
        name: Bytes,
        /// The change.
        op: FieldOp,
    },
    /// A map: remove a field (what the coordinator has seen of it).
    RemoveField(Bytes),
    /// Any type: set or remove the key's expiry.
    Expire(Expiry),
}

/// APPLY: operations on the convergent data type under a key. The coordinator applies them to
/// its replica and replicates the merged state; nothing is read first by the client, and no
/// siblings result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Apply {
    /// Bucket name.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
    /// The key's type; operations of another type are refused (`invalid_request`), and a key
    /// holding another type answers `wrong_type`.
    pub crdt: CrdtType,
    /// The operations, applied in order (at most [`CRDT_OPS_MAX`]).
    pub ops: Vec<CrdtOp>,
    /// The client's id for this operation: a retry with the same id is applied once (within
    /// the window `docs/ARCHITECTURE.md` states); `None` for no deduplication.
    pub op_id: Option<u64>,
    /// Whether APPLY_OK carries the value after the operations.
    pub return_value: bool,
    /// Write quorum; the bucket's default when absent.
    pub w: Option<u8>,
    /// Durable-write quorum; the bucket's default when absent.
    pub dw: Option<u8>,
    /// Deadline in milliseconds; the node's default when absent.
    pub timeout_ms: Option<u32>,
}

/// Most operations one [`Apply`] carries.
pub const CRDT_OPS_MAX: usize = 4096;

/// The value of one field of a map, as read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FieldValue {
    /// A register's value.
    Register(Bytes),
    /// A counter's value.
    Counter(i64),
    /// A set's elements, in byte order.
    Set(Vec<Bytes>),
    /// An enabled flag (a disabled flag is absent).
    Flag,
}

/// The value of a convergent data type, as read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CrdtValue {
    /// A counter's value.
    Counter(i64),
    /// A set's elements, in byte order.
    Set(Vec<Bytes>),
    /// A map's present fields, in name order.
    Map(Vec<(Bytes, FieldValue)>),
}

/// APPLY_OK: the operations were applied (and replicated as the quorums asked).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ApplyOk {
    /// The value after the operations, when the request asked for it.
    pub value: Option<CrdtValue>,
}

/// Most changes one [`Update`] carries.
pub const MAP_OPS_MAX: usize = 4096;
/// Longest map field name.
pub const FIELD_BYTES_MAX: usize = u16::MAX as usize;

/// When a written value expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Expiry {
    /// This many milliseconds after the coordinator receives the write (at least 1).
    Ttl {
        /// The time to live.
        ms: u64,
    },
    /// At this Unix time in milliseconds; a time already past writes a value that is expired
    /// on arrival (a read finds nothing), as Redis's `EXAT` does.
    At {
        /// The expiry time.
        unix_ms: u64,
    },
    /// Never, even in a bucket with a default time to live.
    Never,
}

/// Expiry tags on the wire.
const EXPIRY_TTL: u8 = 1;
const EXPIRY_AT: u8 = 2;
const EXPIRY_NEVER: u8 = 3;

/// PUT condition tags on the wire, after the expiry tags in the same trailing list.
const CONDITION_IF_ABSENT: u8 = 4;
const CONDITION_IF_PRESENT: u8 = 5;

impl Expiry {
    fn encoded_len(expiry: Option<Expiry>) -> usize {
        match expiry {
            None => 0,
            Some(Expiry::Never) => 1,
            Some(_) => 1 + 8,
        }
    }
}

/// PUT: write a value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Put {
    /// Bucket name.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
    /// Value.
    pub value: Bytes,
    /// Context from the GET this write is based on; absent for a blind write, which becomes a
    /// sibling of whatever exists.
    pub context: Option<Bytes>,
    /// Write quorum; the bucket's default when absent.
    pub w: Option<u8>,
    /// Durable-write quorum; the bucket's default when absent.
    pub dw: Option<u8>,
    /// Deadline in milliseconds; the node's default when absent.
    pub timeout_ms: Option<u32>,
    /// When the value expires; the bucket's default time to live (if any) when absent.
    pub expiry: Option<Expiry>,
    /// Write only if the key holds a live value (or only if it does not), as the key's first
    /// reachable home sees it; `condition_failed` otherwise.
    pub condition: Option<Condition>,
}

/// The condition of a conditional PUT (Redis's `SET NX` and `SET XX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Condition {
    /// Only if the key holds no live value.
    IfAbsent,
    /// Only if the key holds a live value.
    IfPresent,
}

/// PUT_OK: the write reached its quorum.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PutOk {
    /// Causal context of the written value.
    pub context: Bytes,
}

/// DELETE: write a tombstone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Delete {
    /// Bucket name.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
    /// Context from the GET this delete is based on.
    pub context: Option<Bytes>,
    /// Write quorum; the bucket's default when absent.
    pub w: Option<u8>,
    /// Durable-write quorum; the bucket's default when absent.
    pub dw: Option<u8>,
    /// Deadline in milliseconds; the node's default when absent.
    pub timeout_ms: Option<u32>,
}

/// REPLICA_PUT: a coordinator asks a shard to merge a versioned object into its replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReplicaPut {
    /// Ring partition of the key.
    pub partition: u32,
    /// Acknowledge only once the write is durable (the coordinator counts it towards `dw`).
    pub durable: bool,
    /// Bucket name.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
    /// For a fallback replica (sloppy quorum): the id of the home node the object is meant for;
    /// the receiver keeps it as a hint and hands it off once that node is reachable again.
    pub hint: Option<u32>,
    /// The versioned object (values and causal history), opaque to the codec.
    pub object: Bytes,
}

/// REPLICA_GET: a coordinator asks a shard for its replica of a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReplicaGet {
    /// Ring partition of the key.
    pub partition: u32,
    /// Read the hint kept for this home node (sloppy quorum) instead of the receiver's replica.
    pub hint: Option<u32>,
    /// Bucket name.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
}

/// FORWARD_PUT: a PUT that a node outside its key's homes forwards to one of them, which must
/// not apply it after `apply_by_ms` (`docs/PROTOCOL.md` §5.6.1). Answered FORWARD_PUT_OK (a PUT_OK
/// body) or ERROR.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ForwardPut {
    /// Unix milliseconds after which the home refuses it (`expired`) instead of applying it.
    pub apply_by_ms: u64,
    /// The client's PUT.
    pub put: Put,
}

/// REPLICA_PUT_OK: the object was merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReplicaPutOk {
    /// Whether the merged object was synced before this answer (counts towards `dw`).
    pub durable: bool,
}

/// REPLICA_GET_OK: the shard's replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReplicaGetOk {
    /// The versioned object, or `None` if the shard holds nothing for the key.
    pub object: Option<Bytes>,
}

/// ADMIN: an operator command (`docs/PROTOCOL.md` §5.8), e.g. `cluster-status`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Admin {
    /// The command's name, at most [`NAME_BYTES_MAX`] bytes of UTF-8.
    pub command: String,
    /// Its arguments, as the command defines them (UTF-8 text for every command so far).
    pub args: Bytes,
}

/// ADMIN_OK: the command's result, as the command defines it (UTF-8 text for every command so far).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdminOk {
    /// The result.
    pub body: Bytes,
}

/// CLUSTER: a cluster-control message between nodes (`docs/PROTOCOL.md` §5.9). The codec checks
/// only the envelope; the cluster layer defines and checks each sub-kind's payload.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cluster {
    /// What the payload is.
    pub sub: u8,
    /// The ring partition the message is about, which decides the shard that handles it on the
    /// receiving node; `None` for node-wide messages (gossip), handled by the node's first shard.
    pub partition: Option<u32>,
    /// The payload.
    pub payload: Bytes,
}

/// CLUSTER_OK: the answer to a [`Cluster`] request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterOk {
    /// What the payload is.
    pub sub: u8,
    /// The payload.
    pub payload: Bytes,
}

/// ERROR: a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ErrorBody {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail, at most [`ERROR_MESSAGE_BYTES_MAX`] bytes of UTF-8.
    pub message: String,
}

impl ErrorBody {
    /// An error body, its message cut at a character boundary to fit
    /// [`ERROR_MESSAGE_BYTES_MAX`]: an error path must not fail because its message is long.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > ERROR_MESSAGE_BYTES_MAX {
            let mut end = ERROR_MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        assert!(message.len() <= ERROR_MESSAGE_BYTES_MAX);
        Self { code, message }
    }
}

/// A typed message: the body of one frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Message {
    /// HELLO.
    Hello(Hello),
    /// HELLO_OK.
    HelloOk(HelloOk),
    /// PING.
    Ping,
    /// PONG.
    Pong,
    /// GET.
    Get(Get),
    /// GET_OK.
    GetOk(GetOk),
    /// PUT.
    Put(Put),
    /// PUT_OK.
    PutOk(PutOk),
    /// DELETE.
    Delete(Delete),
    /// DELETE_OK.
    DeleteOk,
    /// UPDATE.
    Update(Update),
    /// UPDATE_OK.
    UpdateOk,
    /// APPLY.
    Apply(Apply),
    /// APPLY_OK.
    ApplyOk(ApplyOk),
    /// REPLICA_PUT.
    ReplicaPut(ReplicaPut),
    /// REPLICA_PUT_OK.
    ReplicaPutOk(ReplicaPutOk),
    /// REPLICA_GET.
    ReplicaGet(ReplicaGet),
    /// REPLICA_GET_OK.
    ReplicaGetOk(ReplicaGetOk),
    /// ADMIN.
    Admin(Admin),
    /// ADMIN_OK.
    AdminOk(AdminOk),
    /// CLUSTER.
    Cluster(Cluster),
    /// CLUSTER_OK.
    ClusterOk(ClusterOk),
    /// FORWARD_PUT.
    ForwardPut(ForwardPut),
    /// FORWARD_PUT_OK.
    ForwardPutOk(PutOk),
    /// ERROR.
    Error(ErrorBody),
}

/// One frame: a request id and a message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Chosen by the requester, unique among its requests in flight on the connection, never 0;
    /// copied into the reply. Replies may come in any order. ERROR frames about the connection as a
    /// whole carry 0.
    pub request_id: u64,
    /// The message.
    pub message: Message,
}

// Field names used in errors. One place, so encoder and decoder report the same names.
const F_PROTOCOL_VERSION: &str = "protocol_version";
const F_ROLE: &str = "role";
const F_CLUSTER_NAME: &str = "cluster_name";
const F_NODE_NAME: &str = "node_name";
const F_SHARD_COUNT: &str = "shard_count";
const F_SHARD: &str = "shard";
const F_BUCKET: &str = "bucket";
const F_KEY: &str = "key";
const F_VALUE: &str = "value";
const F_CONTEXT: &str = "context";
const F_R: &str = "r";
const F_W: &str = "w";
const F_DW: &str = "dw";
const F_TIMEOUT_MS: &str = "timeout_ms";
const F_SIBLINGS: &str = "siblings";
const F_SIBLING: &str = "sibling";
const F_PARTITION: &str = "partition";
const F_DURABLE: &str = "durable";
const F_HINT: &str = "hint";
const F_OBJECT: &str = "object";
const F_COMMAND: &str = "command";
const F_ARGS: &str = "args";
const F_BODY: &str = "body";
const F_SUB: &str = "sub";
const F_PAYLOAD: &str = "payload";
const F_CODE: &str = "code";
const F_MESSAGE: &str = "message";
const F_EXPIRY: &str = "expiry";
const F_APPLY_BY_MS: &str = "apply_by_ms";
const F_EXPIRES_AT_MS: &str = "expires_at_ms";
const F_EXTENSION: &str = "extension";
const F_CONDITION: &str = "condition";
const F_FIELDS: &str = "fields";
const F_FIELD: &str = "field";
const F_OPS: &str = "ops";
const F_OP: &str = "op";
const F_CRDT: &str = "crdt";

/// GET_OK's optional trailing extensions, each a tag and its payload, in tag order.
const GET_OK_EXPIRES_AT: u8 = 1;
const GET_OK_FIELDS: u8 = 2;
const GET_OK_CRDT: u8 = 3;
/// UPDATE change tags.
const OP_SET: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_EXPIRE: u8 = 3;

/// Sibling tags on the wire.
const SIBLING_TOMBSTONE: u8 = 0;
const SIBLING_VALUE: u8 = 1;

fn write_expiry<B: BufMut>(w: &mut Writer<'_, B>, e: Expiry) {
    match e {
        Expiry::Ttl { ms } => {
            w.u8(EXPIRY_TTL);
            w.u64(ms);
        }
        Expiry::At { unix_ms } => {
            w.u8(EXPIRY_AT);
            w.u64(unix_ms);
        }
        Expiry::Never => w.u8(EXPIRY_NEVER),
    }
}

fn read_expiry(r: &mut Reader<'_>) -> Result<Expiry, BodyError> {
    Ok(match r.u8(F_EXPIRY)? {
        EXPIRY_TTL => Expiry::Ttl {
            ms: r.u64(F_EXPIRY)?,
        },
        EXPIRY_AT => Expiry::At {
            unix_ms: r.u64(F_EXPIRY)?,
        },
        EXPIRY_NEVER => Expiry::Never,
        value => {
            return Err(BodyError::BadValue {
                field: F_EXPIRY,
                value: u64::from(value),
            });
        }
    })
}

/// Exact length of a PUT body (also the tail of a FORWARD_PUT's).
fn put_len(m: &Put) -> usize {
    use LenWidth::U32;
    opt_len(m.w, 1)
        + opt_len(m.dw, 1)
        + opt_len(m.timeout_ms, 4)
        + bucket_key_len(&m.bucket, &m.key)
        + opt_prefixed_len(U32, m.context.as_deref())
        + prefixed_len(U32, m.value.len())
        + Expiry::encoded_len(m.expiry)
        + usize::from(m.condition.is_some())
}

/// Writes a PUT body (also the tail of a FORWARD_PUT's).
fn write_put<B: BufMut>(w: &mut Writer<'_, B>, m: &Put) {
    use LenWidth::{U8, U16, U32};
    w.opt_u8(m.w);
    w.opt_u8(m.dw);
    w.opt_u32(m.timeout_ms);
    w.prefixed(U8, &m.bucket);
    w.prefixed(U16, &m.key);
    w.opt_prefixed(U32, m.context.as_deref());
    w.prefixed(U32, &m.value);
    // Optional trailing extensions, in tag order (expiry 1..=3, condition 4..=5): absent when
    // `None`, so older bodies still decode.
    if let Some(e) = m.expiry {
        write_expiry(w, e);
    }
    match m.condition {
        None => {}
        Some(Condition::IfAbsent) => w.u8(CONDITION_IF_ABSENT),
        Some(Condition::IfPresent) => w.u8(CONDITION_IF_PRESENT),
    }
}

/// Reads a PUT body (also the tail of a FORWARD_PUT's), up to the end of the body.
fn read_put(r: &mut Reader<'_>, limits: &Limits) -> Result<Put, BodyError> {
    use LenWidth::U32;
    let w = r.opt(F_W, Reader::u8)?;
    let dw = r.opt(F_DW, Reader::u8)?;
    let timeout_ms = r.opt(F_TIMEOUT_MS, Reader::u32)?;
    let (bucket, key) = read_bucket_key(r, limits)?;
    let context = r.opt(F_CONTEXT, |r, f| r.bytes(f, U32, CONTEXT_BYTES_MAX))?;
    let value = r.bytes(F_VALUE, U32, VALUE_BYTES_MAX)?;
    let mut expiry = None;
    let mut condition = None;
    while r.remaining() > 0 {
        let tag = r.peek_u8(F_EXPIRY)?;
        match tag {
            EXPIRY_TTL | EXPIRY_AT | EXPIRY_NEVER if expiry.is_none() && condition.is_none() => {
                expiry = Some(read_expiry(r)?)
            }
            CONDITION_IF_ABSENT | CONDITION_IF_PRESENT if condition.is_none() => {
                r.u8(F_CONDITION)?;
                condition = Some(if tag == CONDITION_IF_ABSENT {
                    Condition::IfAbsent
                } else {
                    Condition::IfPresent
                });
            }
            other => {
                return Err(BodyError::BadValue {
                    field: F_EXTENSION,
                    value: u64::from(other),
                });
            }
        }
    }
    Ok(Put {
        bucket,
        key,
        value,
        context,
        w,
        dw,
        timeout_ms,
        expiry,
        condition,
    })
}

/// Encoded size of an `Option<u8>` / `Option<u32>` field.
fn opt_len<T>(v: Option<T>, size: usize) -> usize {
    1 + if v.is_some() { size } else { 0 }
}

/// Largest object blob: only the frame bounds it, since it holds every sibling of a key.
fn object_bytes_max(limits: &Limits) -> usize {
    limits.frame_bytes_max
}

/// Largest ADMIN / CLUSTER payload: only the frame bounds it.
fn payload_bytes_max(limits: &Limits) -> usize {
    limits.frame_bytes_max
}

fn check_bucket_key(bucket: &[u8], key: &[u8], limits: &Limits) -> Result<(), EncodeError> {
    check_len(F_BUCKET, LenWidth::U8, bucket.len(), BUCKET_BYTES_MAX)?;
    check_len(F_KEY, LenWidth::U16, key.len(), limits.key_bytes_max)
}

fn read_bucket_key(r: &mut Reader<'_>, limits: &Limits) -> Result<(Bytes, Bytes), BodyError> {
    let bucket = r.bytes(F_BUCKET, LenWidth::U8, BUCKET_BYTES_MAX)?;
    let key = r.bytes(F_KEY, LenWidth::U16, limits.key_bytes_max)?;
    Ok((bucket, key))
}

fn bucket_key_len(bucket: &[u8], key: &[u8]) -> usize {
    prefixed_len(LenWidth::U8, bucket.len()) + prefixed_len(LenWidth::U16, key.len())
}

impl Message {
    /// The kind byte this message is sent with.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Hello(_) => Kind::Hello,
            Self::HelloOk(_) => Kind::HelloOk,
            Self::Ping => Kind::Ping,
            Self::Pong => Kind::Pong,
            Self::Get(_) => Kind::Get,
            Self::GetOk(_) => Kind::GetOk,
            Self::Put(_) => Kind::Put,
            Self::PutOk(_) => Kind::PutOk,
            Self::Delete(_) => Kind::Delete,
            Self::DeleteOk => Kind::DeleteOk,
            Self::Update(_) => Kind::Update,
            Self::UpdateOk => Kind::UpdateOk,
            Self::Apply(_) => Kind::Apply,
            Self::ApplyOk(_) => Kind::ApplyOk,
            Self::ReplicaPut(_) => Kind::ReplicaPut,
            Self::ReplicaPutOk(_) => Kind::ReplicaPutOk,
            Self::ReplicaGet(_) => Kind::ReplicaGet,
            Self::ReplicaGetOk(_) => Kind::ReplicaGetOk,
            Self::Admin(_) => Kind::Admin,
            Self::AdminOk(_) => Kind::AdminOk,
            Self::Cluster(_) => Kind::Cluster,
            Self::ClusterOk(_) => Kind::ClusterOk,
            Self::ForwardPut(_) => Kind::ForwardPut,
            Self::ForwardPutOk(_) => Kind::ForwardPutOk,
            Self::Error(_) => Kind::Error,
        }
    }

    /// Checks every field against the limits the receiver applies, so the encoder never produces
    /// a frame the other side must reject.
    pub(crate) fn check(&self, limits: &Limits) -> Result<(), EncodeError> {
        match self {
            Self::Hello(m) => {
                check_len(
                    F_CLUSTER_NAME,
                    LenWidth::U8,
                    m.cluster_name.len(),
                    NAME_BYTES_MAX,
                )?;
                if let Some(name) = &m.node_name {
                    check_len(F_NODE_NAME, LenWidth::U8, name.len(), NAME_BYTES_MAX)?;
                }
            }
            Self::HelloOk(m) => {
                check_len(F_NODE_NAME, LenWidth::U8, m.node_name.len(), NAME_BYTES_MAX)?;
                if m.shard_count == 0 {
                    return Err(EncodeError::InvalidField {
                        field: F_SHARD_COUNT,
                        reason: "a node has at least one shard",
                    });
                }
                if m.shard >= m.shard_count {
                    return Err(EncodeError::InvalidField {
                        field: F_SHARD,
                        reason: "shard index must be below shard_count",
                    });
                }
            }
            Self::Ping | Self::Pong | Self::DeleteOk | Self::UpdateOk | Self::ReplicaPutOk(_) => {}
            Self::Get(m) => check_bucket_key(&m.bucket, &m.key, limits)?,
            Self::Update(m) => {
                check_bucket_key(&m.bucket, &m.key, limits)?;
                if m.ops.is_empty() || m.ops.len() > MAP_OPS_MAX {
                    return Err(EncodeError::InvalidField {
                        field: F_OPS,
                        reason: "an update carries 1 to MAP_OPS_MAX changes",
                    });
                }
                for op in &m.ops {
                    match op {
                        MapOp::Set { field, value } => {
                            check_len(F_FIELD, LenWidth::U16, field.len(), FIELD_BYTES_MAX)?;
                            check_len(F_VALUE, LenWidth::U32, value.len(), VALUE_BYTES_MAX)?;
                        }
                        MapOp::Delete { field } => {
                            check_len(F_FIELD, LenWidth::U16, field.len(), FIELD_BYTES_MAX)?
                        }
                        MapOp::Expire(_) => {}
                    }
                }
            }
            Self::GetOk(m) => {
                if m.siblings.len() > SIBLINGS_MAX {
                    return Err(EncodeError::FieldTooLarge {
                        field: F_SIBLINGS,
                        len: m.siblings.len(),
                        max: SIBLINGS_MAX,
                    });
                }
                for s in &m.siblings {
                    if let Sibling::Value(v) = s {
                        check_len(F_VALUE, LenWidth::U32, v.len(), VALUE_BYTES_MAX)?;
                    }
                }
                check_len(F_CONTEXT, LenWidth::U32, m.context.len(), CONTEXT_BYTES_MAX)?;
                if let Some(fields) = &m.fields {
                    if !m.siblings.is_empty() {
                        return Err(EncodeError::InvalidField {
                            field: F_FIELDS,
                            reason: "a map reads with its fields and no siblings",
                        });
                    }
                    for (f, v) in fields {
                        check_len(F_FIELD, LenWidth::U16, f.len(), FIELD_BYTES_MAX)?;
                        check_len(F_VALUE, LenWidth::U32, v.len(), VALUE_BYTES_MAX)?;
                    }
                }
                if let Some(value) = &m.crdt {
                    if !m.siblings.is_empty() || m.fields.is_some() {
                        return Err(EncodeError::InvalidField {
                            field: F_CRDT,
                            reason: "a convergent data type reads with its value, no siblings \
                                     and no map fields",
                        });
                    }
                    crdt::check_value(value)?;
                }
            }
            Self::Apply(m) => crdt::check_apply(m, limits)?,
            Self::ApplyOk(m) => crdt::check_apply_ok(m)?,
            Self::Put(m) | Self::ForwardPut(ForwardPut { put: m, .. }) => {
                check_bucket_key(&m.bucket, &m.key, limits)?;
                if let Some(c) = &m.context {
                    check_len(F_CONTEXT, LenWidth::U32, c.len(), CONTEXT_BYTES_MAX)?;
                }
                check_len(F_VALUE, LenWidth::U32, m.value.len(), VALUE_BYTES_MAX)?;
            }
            Self::PutOk(m) | Self::ForwardPutOk(m) => {
                check_len(F_CONTEXT, LenWidth::U32, m.context.len(), CONTEXT_BYTES_MAX)?;
            }
            Self::Delete(m) => {
                check_bucket_key(&m.bucket, &m.key, limits)?;
                if let Some(c) = &m.context {
                    check_len(F_CONTEXT, LenWidth::U32, c.len(), CONTEXT_BYTES_MAX)?;
                }
            }
            Self::ReplicaPut(m) => {
                check_bucket_key(&m.bucket, &m.key, limits)?;
                check_len(
                    F_OBJECT,
                    LenWidth::U32,
                    m.object.len(),
                    object_bytes_max(limits),
                )?;
            }
            Self::ReplicaGet(m) => check_bucket_key(&m.bucket, &m.key, limits)?,
            Self::ReplicaGetOk(m) => {
                if let Some(o) = &m.object {
                    check_len(F_OBJECT, LenWidth::U32, o.len(), object_bytes_max(limits))?;
                }
            }
            Self::Admin(m) => {
                check_len(F_COMMAND, LenWidth::U8, m.command.len(), NAME_BYTES_MAX)?;
                check_len(
                    F_ARGS,
                    LenWidth::U32,
                    m.args.len(),
                    payload_bytes_max(limits),
                )?;
            }
            Self::AdminOk(m) => {
                check_len(
                    F_BODY,
                    LenWidth::U32,
                    m.body.len(),
                    payload_bytes_max(limits),
                )?;
            }
            Self::Cluster(m) => {
                check_len(
                    F_PAYLOAD,
                    LenWidth::U32,
                    m.payload.len(),
                    payload_bytes_max(limits),
                )?;
            }
            Self::ClusterOk(m) => {
                check_len(
                    F_PAYLOAD,
                    LenWidth::U32,
                    m.payload.len(),
                    payload_bytes_max(limits),
                )?;
            }
            Self::Error(m) => {
                check_len(
                    F_MESSAGE,
                    LenWidth::U16,
                    m.message.len(),
                    ERROR_MESSAGE_BYTES_MAX,
                )?;
            }
        }
        Ok(())
    }

    /// Exact length of the encoded body.
    pub fn body_len(&self) -> usize {
        use LenWidth::{U8, U16, U32};
        match self {
            Self::Hello(m) => {
                1 + 1
                    + prefixed_len(U8, m.cluster_name.len())
                    + opt_prefixed_len(U8, m.node_name.as_deref().map(str::as_bytes))
            }
            Self::HelloOk(m) => 1 + 2 + 2 + prefixed_len(U8, m.node_name.len()),
            Self::Ping | Self::Pong | Self::DeleteOk | Self::UpdateOk => 0,
            Self::ReplicaPutOk(_) => 1,
            Self::Get(m) => {
                opt_len(m.r, 1) + opt_len(m.timeout_ms, 4) + bucket_key_len(&m.bucket, &m.key)
            }
            Self::GetOk(m) => {
                let siblings: usize = m
                    .siblings
                    .iter()
                    .map(|s| match s {
                        Sibling::Tombstone => 1,
                        Sibling::Value(v) => 1 + prefixed_len(U32, v.len()),
                    })
                    .sum();
                2 + siblings
                    + prefixed_len(U32, m.context.len())
                    + if m.expires_at_ms.is_some() { 1 + 8 } else { 0 }
                    + m.fields.as_ref().map_or(0, |fields| {
                        1 + 4
                            + fields
                                .iter()
                                .map(|(f, v)| {
                                    prefixed_len(U16, f.len()) + prefixed_len(U32, v.len())
                                })
                                .sum::<usize>()
                    })
                    + m.crdt.as_ref().map_or(0, |v| 1 + crdt::value_len(v))
            }
            Self::Apply(m) => crdt::apply_len(m),
            Self::ApplyOk(m) => crdt::apply_ok_len(m),
            Self::Put(m) => put_len(m),
            Self::ForwardPut(m) => 8 + put_len(&m.put),
            Self::Update(m) => {
                opt_len(m.w, 1)
                    + opt_len(m.dw, 1)
                    + opt_len(m.timeout_ms, 4)
                    + bucket_key_len(&m.bucket, &m.key)
                    + 2
                    + m.ops
                        .iter()
                        .map(|op| match op {
                            MapOp::Set { field, value } => {
                                1 + prefixed_len(U16, field.len()) + prefixed_len(U32, value.len())
                            }
                            MapOp::Delete { field } => 1 + prefixed_len(U16, field.len()),
                            MapOp::Expire(e) => 1 + Expiry::encoded_len(Some(*e)),
                        })
                        .sum::<usize>()
            }
            Self::PutOk(m) | Self::ForwardPutOk(m) => prefixed_len(U32, m.context.len()),
            Self::Delete(m) => {
                opt_len(m.w, 1)
                    + opt_len(m.dw, 1)
                    + opt_len(m.timeout_ms, 4)
                    + bucket_key_len(&m.bucket, &m.key)
                    + opt_prefixed_len(U32, m.context.as_deref())
            }
            Self::ReplicaPut(m) => {
                4 + 1
                    + bucket_key_len(&m.bucket, &m.key)
                    + opt_len(m.hint, 4)
                    + prefixed_len(U32, m.object.len())
            }
            Self::ReplicaGet(m) => 4 + opt_len(m.hint, 4) + bucket_key_len(&m.bucket, &m.key),
            Self::ReplicaGetOk(m) => opt_prefixed_len(U32, m.object.as_deref()),
            Self::Admin(m) => prefixed_len(U8, m.command.len()) + prefixed_len(U32, m.args.len()),
            Self::AdminOk(m) => prefixed_len(U32, m.body.len()),
            Self::Cluster(m) => 1 + opt_len(m.partition, 4) + prefixed_len(U32, m.payload.len()),
            Self::ClusterOk(m) => 1 + prefixed_len(U32, m.payload.len()),
            Self::Error(m) => 2 + prefixed_len(U16, m.message.len()),
        }
    }

    /// Writes the body. Fields were checked by [`Message::check`].
    pub(crate) fn write<B: BufMut>(&self, w: &mut Writer<'_, B>) {
        use LenWidth::{U8, U16, U32};
        match self {
            Self::Hello(m) => {
                w.u8(m.protocol_version);
                w.u8(m.role as u8);
                w.prefixed(U8, m.cluster_name.as_bytes());
                w.opt_prefixed(U8, m.node_name.as_deref().map(str::as_bytes));
            }
            Self::HelloOk(m) => {
                w.u8(m.protocol_version);
                w.u16(m.shard_count);
                w.u16(m.shard);
                w.prefixed(U8, m.node_name.as_bytes());
            }
            Self::Ping | Self::Pong | Self::DeleteOk | Self::UpdateOk => {}
            Self::ReplicaPutOk(m) => w.flag(m.durable),
            Self::Get(m) => {
                w.opt_u8(m.r);
                w.opt_u32(m.timeout_ms);
                w.prefixed(U8, &m.bucket);
                w.prefixed(U16, &m.key);
            }
            Self::GetOk(m) => {
                // Checked against SIBLINGS_MAX, which fits a u16 (compile-time assert).
                w.u16(m.siblings.len() as u16);
                for s in &m.siblings {
                    match s {
                        Sibling::Tombstone => w.u8(SIBLING_TOMBSTONE),
                        Sibling::Value(v) => {
                            w.u8(SIBLING_VALUE);
                            w.prefixed(U32, v);
                        }
                    }
                }
                w.prefixed(U32, &m.context);
                // Optional trailing extensions, in tag order; absent when unused, so bodies
                // without them are what older builds sent.
                if let Some(at) = m.expires_at_ms {
                    w.u8(GET_OK_EXPIRES_AT);
                    w.u64(at);
                }
                if let Some(fields) = &m.fields {
                    w.u8(GET_OK_FIELDS);
                    // Bounded by the frame: far below 2^32 fields.
                    w.u32(fields.len() as u32);
                    for (f, v) in fields {
                        w.prefixed(U16, f);
                        w.prefixed(U32, v);
                    }
                }
                if let Some(v) = &m.crdt {
                    w.u8(GET_OK_CRDT);
                    crdt::write_value(w, v);
                }
            }
            Self::Apply(m) => crdt::write_apply(w, m),
            Self::ApplyOk(m) => crdt::write_apply_ok(w, m),
            Self::Put(m) => write_put(w, m),
            Self::ForwardPut(m) => {
                w.u64(m.apply_by_ms);
                write_put(w, &m.put);
            }
            Self::Update(m) => {
                w.opt_u8(m.w);
                w.opt_u8(m.dw);
                w.opt_u32(m.timeout_ms);
                w.prefixed(U8, &m.bucket);
                w.prefixed(U16, &m.key);
                // Checked against MAP_OPS_MAX, which fits a u16.
                w.u16(m.ops.len() as u16);
                for op in &m.ops {
                    match op {
                        MapOp::Set { field, value } => {
                            w.u8(OP_SET);
                            w.prefixed(U16, field);
                            w.prefixed(U32, value);
                        }
                        MapOp::Delete { field } => {
                            w.u8(OP_DELETE);
                            w.prefixed(U16, field);
                        }
                        MapOp::Expire(e) => {
                            w.u8(OP_EXPIRE);
                            write_expiry(w, *e);
                        }
                    }
                }
            }
            Self::PutOk(m) | Self::ForwardPutOk(m) => w.prefixed(U32, &m.context),
            Self::Delete(m) => {
                w.opt_u8(m.w);
                w.opt_u8(m.dw);
                w.opt_u32(m.timeout_ms);
                w.prefixed(U8, &m.bucket);
                w.prefixed(U16, &m.key);
                w.opt_prefixed(U32, m.context.as_deref());
            }
            Self::ReplicaPut(m) => {
                w.u32(m.partition);
                w.flag(m.durable);
                w.prefixed(U8, &m.bucket);
                w.prefixed(U16, &m.key);
                w.opt_u32(m.hint);
                w.prefixed(U32, &m.object);
            }
            Self::ReplicaGet(m) => {
                w.u32(m.partition);
                w.opt_u32(m.hint);
                w.prefixed(U8, &m.bucket);
                w.prefixed(U16, &m.key);
            }
            Self::ReplicaGetOk(m) => w.opt_prefixed(U32, m.object.as_deref()),
            Self::Admin(m) => {
                w.prefixed(U8, m.command.as_bytes());
                w.prefixed(U32, &m.args);
            }
            Self::AdminOk(m) => w.prefixed(U32, &m.body),
            Self::Cluster(m) => {
                w.u8(m.sub);
                w.opt_u32(m.partition);
                w.prefixed(U32, &m.payload);
            }
            Self::ClusterOk(m) => {
                w.u8(m.sub);
                w.prefixed(U32, &m.payload);
            }
            Self::Error(m) => {
                w.u16(m.code.to_u16());
                w.prefixed(U16, m.message.as_bytes());
            }
        }
    }

    /// Decodes the body of a frame of `kind`. The body is fully buffered and at most
    /// `frame_bytes_max` long; every length inside it is checked before anything is copied.
    pub(crate) fn read(kind: Kind, body: &[u8], limits: &Limits) -> Result<Self, BodyError> {
        use LenWidth::{U8, U16, U32};
        let mut r = Reader::new(body);
        let msg = match kind {
            Kind::Hello => {
                let protocol_version = r.u8(F_PROTOCOL_VERSION)?;
                let role = match r.u8(F_ROLE)? {
                    1 => Role::Client,
                    2 => Role::Peer,
                    value => {
                        return Err(BodyError::BadValue {
                            field: F_ROLE,
                            value: u64::from(value),
                        });
                    }
                };
                let cluster_name = r.string(F_CLUSTER_NAME, U8, NAME_BYTES_MAX)?;
                let node_name = r.opt(F_NODE_NAME, |r, f| r.string(f, U8, NAME_BYTES_MAX))?;
                Self::Hello(Hello {
                    protocol_version,
                    role,
                    cluster_name,
                    node_name,
                })
            }
            Kind::HelloOk => {
                let protocol_version = r.u8(F_PROTOCOL_VERSION)?;
                let shard_count = r.u16(F_SHARD_COUNT)?;
                if shard_count == 0 {
                    return Err(BodyError::BadValue {
                        field: F_SHARD_COUNT,
                        value: 0,
                    });
                }
                let shard = r.u16(F_SHARD)?;
                if shard >= shard_count {
                    return Err(BodyError::BadValue {
                        field: F_SHARD,
                        value: u64::from(shard),
                    });
                }
                let node_name = r.string(F_NODE_NAME, U8, NAME_BYTES_MAX)?;
                Self::HelloOk(HelloOk {
                    protocol_version,
                    node_name,
                    shard_count,
                    shard,
                })
            }
            Kind::Ping => Self::Ping,
            Kind::Pong => Self::Pong,
            Kind::DeleteOk => Self::DeleteOk,
            Kind::ReplicaPutOk => Self::ReplicaPutOk(ReplicaPutOk {
                durable: r.flag(F_DURABLE)?,
            }),
            Kind::Get => {
                let rq = r.opt(F_R, Reader::u8)?;
                let timeout_ms = r.opt(F_TIMEOUT_MS, Reader::u32)?;
                let (bucket, key) = read_bucket_key(&mut r, limits)?;
                Self::Get(Get {
                    bucket,
                    key,
                    r: rq,
                    timeout_ms,
                })
            }
            Kind::GetOk => {
                let count = usize::from(r.u16(F_SIBLINGS)?);
                if count > SIBLINGS_MAX {
                    return Err(BodyError::TooLarge {
                        field: F_SIBLINGS,
                        len: count as u64,
                        max: SIBLINGS_MAX,
                    });
                }
                // Each sibling takes at least its tag byte, so a count the body cannot hold is
                // rejected before the vector is allocated.
                if count > r.remaining() {
                    return Err(BodyError::Truncated {
                        field: F_SIBLINGS,
                        need: count as u64,
                        remaining: r.remaining(),
                    });
                }
                let mut siblings = Vec::with_capacity(count);
                for _ in 0..count {
                    let sibling = match r.u8(F_SIBLING)? {
                        SIBLING_TOMBSTONE => Sibling::Tombstone,
                        SIBLING_VALUE => Sibling::Value(r.bytes(F_VALUE, U32, VALUE_BYTES_MAX)?),
                        value => {
                            return Err(BodyError::BadValue {
                                field: F_SIBLING,
                                value: u64::from(value),
                            });
                        }
                    };
                    siblings.push(sibling);
                }
                let context = r.bytes(F_CONTEXT, U32, CONTEXT_BYTES_MAX)?;
                let mut expires_at_ms = None;
                let mut fields = None;
                let mut crdt_value = None;
                let mut last_tag = 0;
                while r.remaining() > 0 {
                    let tag = r.u8(F_EXTENSION)?;
                    if tag <= last_tag {
                        return Err(BodyError::BadValue {
                            field: F_EXTENSION,
                            value: u64::from(tag),
                        });
                    }
                    last_tag = tag;
                    match tag {
                        GET_OK_EXPIRES_AT => expires_at_ms = Some(r.u64(F_EXPIRES_AT_MS)?),
                        GET_OK_FIELDS => {
                            let count = r.u32(F_FIELDS)? as usize;
                            // Each field takes at least its two length prefixes.
                            if count > r.remaining() / 6 {
                                return Err(BodyError::Truncated {
                                    field: F_FIELDS,
                                    need: count as u64 * 6,
                                    remaining: r.remaining(),
                                });
                            }
                            let mut list = Vec::with_capacity(count);
                            for _ in 0..count {
                                let f = r.bytes(F_FIELD, U16, FIELD_BYTES_MAX)?;
                                let v = r.bytes(F_VALUE, U32, VALUE_BYTES_MAX)?;
                                list.push((f, v));
                            }
                            fields = Some(list);
                        }
                        GET_OK_CRDT => crdt_value = Some(crdt::read_value(&mut r)?),
                        other => {
                            return Err(BodyError::BadValue {
                                field: F_EXTENSION,
                                value: u64::from(other),
                            });
                        }
                    }
                }
                if fields.is_some() && !siblings.is_empty() {
                    return Err(BodyError::BadValue {
                        field: F_FIELDS,
                        value: siblings.len() as u64,
                    });
                }
                // A convergent data type reads as its value alone: the error names the sibling
                // count beside it, or the tag of the map fields beside it.
                if crdt_value.is_some() && !siblings.is_empty() {
                    return Err(BodyError::BadValue {
                        field: F_CRDT,
                        value: siblings.len() as u64,
                    });
                }
                if crdt_value.is_some() && fields.is_some() {
                    return Err(BodyError::BadValue {
                        field: F_CRDT,
                        value: u64::from(GET_OK_FIELDS),
                    });
                }
                Self::GetOk(GetOk {
                    siblings,
                    context,
                    expires_at_ms,
                    fields,
                    crdt: crdt_value,
                })
            }
            Kind::Apply => Self::Apply(crdt::read_apply(&mut r, limits)?),
            Kind::ApplyOk => Self::ApplyOk(crdt::read_apply_ok(&mut r)?),
            Kind::Put => Self::Put(read_put(&mut r, limits)?),
            Kind::ForwardPut => Self::ForwardPut(ForwardPut {
                apply_by_ms: r.u64(F_APPLY_BY_MS)?,
                put: read_put(&mut r, limits)?,
            }),
            Kind::Update => {
                let w = r.opt(F_W, Reader::u8)?;
                let dw = r.opt(F_DW, Reader::u8)?;
                let timeout_ms = r.opt(F_TIMEOUT_MS, Reader::u32)?;
                let (bucket, key) = read_bucket_key(&mut r, limits)?;
                let count = usize::from(r.u16(F_OPS)?);
                if count == 0 || count > MAP_OPS_MAX {
                    return Err(BodyError::BadValue {
                        field: F_OPS,
                        value: count as u64,
                    });
                }
                // Each change takes at least two bytes.
                if count > r.remaining() / 2 {
                    return Err(BodyError::Truncated {
                        field: F_OPS,
                        need: count as u64 * 2,
                        remaining: r.remaining(),
                    });
                }
                let mut ops = Vec::with_capacity(count);
                for _ in 0..count {
                    ops.push(match r.u8(F_OP)? {
                        OP_SET => MapOp::Set {
                            field: r.bytes(F_FIELD, U16, FIELD_BYTES_MAX)?,
                            value: r.bytes(F_VALUE, U32, VALUE_BYTES_MAX)?,
                        },
                        OP_DELETE => MapOp::Delete {
                            field: r.bytes(F_FIELD, U16, FIELD_BYTES_MAX)?,
                        },
                        OP_EXPIRE => MapOp::Expire(read_expiry(&mut r)?),
                        value => {
                            return Err(BodyError::BadValue {
                                field: F_OP,
                                value: u64::from(value),
                            });
                        }
                    });
                }
                Self::Update(Update {
                    bucket,
                    key,
                    ops,
                    w,
                    dw,
                    timeout_ms,
                })
            }
            Kind::UpdateOk => Self::UpdateOk,
            Kind::PutOk | Kind::ForwardPutOk => {
                let ok = PutOk {
                    context: r.bytes(F_CONTEXT, U32, CONTEXT_BYTES_MAX)?,
                };
                if kind == Kind::PutOk {
                    Self::PutOk(ok)
                } else {
                    Self::ForwardPutOk(ok)
                }
            }
            Kind::Delete => {
                let w = r.opt(F_W, Reader::u8)?;
                let dw = r.opt(F_DW, Reader::u8)?;
                let timeout_ms = r.opt(F_TIMEOUT_MS, Reader::u32)?;
                let (bucket, key) = read_bucket_key(&mut r, limits)?;
                let context = r.opt(F_CONTEXT, |r, f| r.bytes(f, U32, CONTEXT_BYTES_MAX))?;
                Self::Delete(Delete {
                    bucket,
                    key,
                    context,
                    w,
                    dw,
                    timeout_ms,
                })
            }
            Kind::ReplicaPut => {
                let partition = r.u32(F_PARTITION)?;
                let durable = r.flag(F_DURABLE)?;
                let (bucket, key) = read_bucket_key(&mut r, limits)?;
                let hint = r.opt(F_HINT, Reader::u32)?;
                let object = r.bytes(F_OBJECT, U32, object_bytes_max(limits))?;
                Self::ReplicaPut(ReplicaPut {
                    partition,
                    durable,
                    bucket,
                    key,
                    hint,
                    object,
                })
            }
            Kind::ReplicaGet => {
                let partition = r.u32(F_PARTITION)?;
                let hint = r.opt(F_HINT, Reader::u32)?;
                let (bucket, key) = read_bucket_key(&mut r, limits)?;
                Self::ReplicaGet(ReplicaGet {
                    partition,
                    hint,
                    bucket,
                    key,
                })
            }
            Kind::ReplicaGetOk => Self::ReplicaGetOk(ReplicaGetOk {
                object: r.opt(F_OBJECT, |r, f| r.bytes(f, U32, object_bytes_max(limits)))?,
            }),
            Kind::Admin => Self::Admin(Admin {
                command: r.string(F_COMMAND, U8, NAME_BYTES_MAX)?,
                args: r.bytes(F_ARGS, U32, payload_bytes_max(limits))?,
            }),
            Kind::AdminOk => Self::AdminOk(AdminOk {
                body: r.bytes(F_BODY, U32, payload_bytes_max(limits))?,
            }),
            Kind::Cluster => Self::Cluster(Cluster {
                sub: r.u8(F_SUB)?,
                partition: r.opt(F_PARTITION, Reader::u32)?,
                payload: r.bytes(F_PAYLOAD, U32, payload_bytes_max(limits))?,
            }),
            Kind::ClusterOk => Self::ClusterOk(ClusterOk {
                sub: r.u8(F_SUB)?,
                payload: r.bytes(F_PAYLOAD, U32, payload_bytes_max(limits))?,
            }),
            Kind::Error => {
                let code = ErrorCode::from_u16(r.u16(F_CODE)?);
                let message = r.string(F_MESSAGE, U16, ERROR_MESSAGE_BYTES_MAX)?;
                Self::Error(ErrorBody { code, message })
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kind table is consistent: every byte maps back to its kind, every request has a reply
    /// with the high bit set, and the ranges in the module doc hold.
    #[test]
    fn kind_table() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_u8(kind as u8), Some(kind));
            if kind.is_request() {
                let reply = kind.reply().expect("requests have replies");
                assert_eq!(reply as u8, kind as u8 | REPLY_BIT);
                assert!((0x01..=0x7F).contains(&(kind as u8)));
            } else {
                assert_eq!(kind.reply(), None);
            }
        }
        let known = (0..=255u8).filter(|b| Kind::from_u8(*b).is_some()).count();
        assert_eq!(known, Kind::ALL.len());
        assert_eq!(Kind::from_u8(0), None);
    }

    /// Error codes round-trip through their wire value, including codes from a newer node.
    #[test]
    fn error_codes_round_trip() {
        for code in 0..=u16::MAX {
            assert_eq!(ErrorCode::from_u16(code).to_u16(), code);
        }
        assert!(ErrorCode::Timeout.is_transient());
        assert!(!ErrorCode::BadFrame.is_transient());
        assert_eq!(ErrorCode::from_u16(0x0106), ErrorCode::WrongType);
        assert_eq!(ErrorCode::WrongType.name(), "wrong_type");
        assert!(!ErrorCode::WrongType.is_transient());
        assert_eq!(ErrorCode::Other(0x7777).to_string(), "error 0x7777");
    }

    /// Long error messages are cut at a character boundary, never mid-character.
    #[test]
    fn error_message_truncation() {
        let long = "é".repeat(ERROR_MESSAGE_BYTES_MAX); // 2 bytes per character
        let e = ErrorBody::new(ErrorCode::Internal, long);
        assert_eq!(e.message.len(), ERROR_MESSAGE_BYTES_MAX);
        let odd = format!("x{}", "é".repeat(ERROR_MESSAGE_BYTES_MAX));
        let e = ErrorBody::new(ErrorCode::Internal, odd);
        assert_eq!(e.message.len(), ERROR_MESSAGE_BYTES_MAX - 1);
    }
}
