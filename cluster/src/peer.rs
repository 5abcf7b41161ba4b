//! Peer traffic on the wire (sans-IO).
//!
//! The coordinator ([`ringkv_core::coordinator`]) speaks [`PeerMsg`]; nodes exchange frames of the
//! binary protocol (`docs/PROTOCOL.md` §5.5–5.6). This module converts between the two:
//!
//! - REPLICA_PUT / REPLICA_GET ↔ [`PeerMsg::ReplicaPut`] / [`PeerMsg::ReplicaGet`]; the `hint`
//!   field names the home node of a [`Space::Hint`] key.
//! - REPLICA_PUT_OK / REPLICA_GET_OK ↔ the answers; an object that does not decode is a failed
//!   replica ([`PeerMsg::Failed`]), never a panic and never a partial object.
//! - A client GET, PUT, DELETE or UPDATE on a peer connection is a [`PeerMsg::Forward`]; whatever
//!   answers it (GET_OK, PUT_OK, DELETE_OK, UPDATE_OK) is the [`PeerMsg::ForwardReply`]. A forward
//!   with an apply-by time is a FORWARD_PUT (a PUT and that time), answered FORWARD_PUT_OK. A
//!   request is parsed once on arrival ([`PeerRequest::parse`]), so a forwarded one's key is
//!   hashed once.
//! - ERROR answers any request: [`PeerMsg::Failed`].
//! - Cluster control (gossip, anti-entropy, transfers, hint credit) travels in CLUSTER /
//!   CLUSTER_OK frames: a sub-kind byte from [`sub`] and a payload written with
//!   `ringkv_net::wire::Writer` and read back with its `Reader`, which checks every length
//!   against the bytes received (`docs/PROTOCOL.md` §5.9). A sub-kind this build does not know is
//!   answered `invalid_request`, so a newer peer learns it and carries on.
//!
//! How stored keys map onto engine partitions and keys is [`crate::replica`]'s.

use bytes::Bytes;
use ringkv_net::limits::BUCKET_BYTES_MAX;
use ringkv_net::wire::{LenWidth, Reader, Writer};
use ringkv_net::{
    BodyError, Cluster, ClusterOk, ErrorBody, ErrorCode, ForwardPut, Message, ReplicaGet,
    ReplicaGetOk, ReplicaPut, ReplicaPutOk,
};

use crate::route::{PARTITIONS, partition_of};
use ringkv_core::NodeId;
use ringkv_core::coordinator::{AeKey, PeerMsg, ScanItem, ScanPage, Space, StoreKey};
use ringkv_core::object::Object;
use ringkv_core::request::KeyRequest;

/// The name a node gives in a peer HELLO: `<id>@<name>` (`docs/PROTOCOL.md` §5.1).
pub fn hello_name(node: NodeId, name: &str) -> String {
    format!("{}@{name}", node.0)
}

/// Sub-kinds of CLUSTER frames (`docs/PROTOCOL.md` §5.9.1), all in one table. A request and its
/// answer share the sub-kind unless noted. Numbers are never reused.
pub mod sub {
    pub use ringkv_core::membership::sub::{COMMIT, GOSSIP, JOIN, OUTCOME};
    /// TRANSFER_PULL / TRANSFER_PAGE: a page of a partition (`coordinator/transfer.rs`).
    pub const TRANSFER: u8 = 16;
    /// [`PeerMsg::HintCredit`](ringkv_core::coordinator::PeerMsg::HintCredit) /
    /// [`PeerMsg::HintCreditOk`](ringkv_core::coordinator::PeerMsg::HintCreditOk): request `wanted: u32`,
    /// answer `granted: u32`; sent with the partition of a hint the holder has ready, so the
    /// shard that will receive the hints grants.
    pub const HINT_CREDIT: u8 = 32;
    /// [`PeerMsg::Ping`](ringkv_core::coordinator::PeerMsg::Ping) /
    /// [`PeerMsg::Pong`](ringkv_core::coordinator::PeerMsg::Pong): failure-detector heartbeat, empty
    /// payloads, node-wide.
    pub const HEARTBEAT: u8 = 33;
    /// Anti-entropy: hashes of some nodes of one tree level ([`ringkv_core::coordinator::PeerMsg::AeLevel`]).
    pub const AE_LEVEL: u8 = 48;
    /// Anti-entropy: the keys of some leaves ([`ringkv_core::coordinator::PeerMsg::AeKeys`]).
    pub const AE_KEYS: u8 = 49;
    /// Tombstone reaping: confirm tombstones ([`ringkv_core::coordinator::PeerMsg::AeReap`]).
    pub const AE_REAP: u8 = 50;
    /// Tombstone reaping: remove them ([`ringkv_core::coordinator::PeerMsg::AeDrop`]).
    pub const AE_DROP: u8 = 51;
}

/// Longest transfer cursor (it is the store's, opaque to peers).
const CURSOR_BYTES_MAX: usize = 255;
/// Most keys a TRANSFER_PAGE may carry.
const PAGE_ITEMS_WIRE_MAX: usize = 4096;

fn write_payload(write: impl FnOnce(&mut Writer<'_, Vec<u8>>)) -> Bytes {
    let mut out = Vec::new();
    write(&mut Writer::new(&mut out));
    Bytes::from(out)
}

fn read_payload<T>(
    payload: &[u8],
    read: impl FnOnce(&mut Reader<'_>) -> Result<T, BodyError>,
) -> Result<T, BodyError> {
    let mut r = Reader::new(payload);
    let value = read(&mut r)?;
    r.finish()?;
    Ok(value)
}

fn read_page(r: &mut Reader<'_>) -> Result<Result<ScanPage, String>, BodyError> {
    let count = r.u32("items")? as usize;
    if count > PAGE_ITEMS_WIRE_MAX {
        return Err(BodyError::TooLarge {
            field: "items",
            len: count as u64,
            max: PAGE_ITEMS_WIRE_MAX,
        });
    }
    let mut items = Vec::with_capacity(count.min(r.remaining()));
    let mut bad = None;
    for _ in 0..count {
        let bucket = r.bytes("bucket", LenWidth::U8, BUCKET_BYTES_MAX)?;
        let key = r.bytes("key", LenWidth::U16, u16::MAX as usize)?;
        let object = r.bytes("object", LenWidth::U32, u32::MAX as usize)?;
        match decode_object(&object) {
            Ok(object) => items.push(ScanItem {
                bucket,
                key,
                object,
            }),
            Err(e) => bad = Some(e),
        }
    }
    let next = r.opt("cursor", |r, f| r.bytes(f, LenWidth::U8, CURSOR_BYTES_MAX))?;
    Ok(match bad {
        Some(e) => Err(e),
        None => Ok(ScanPage { items, next }),
    })
}

/// A CLUSTER request as the core's message. Each sub-kind of [`sub`] gets an arm that reads its
/// payload with `ringkv_net::wire::Reader` (which must consume it all) and maps a body error to
/// `invalid_request`.
fn cluster_request(id: u64, c: Cluster) -> Result<PeerMsg, ErrorBody> {
    let bad = |e: BodyError| invalid(format!("CLUSTER sub-kind {}: {e}", c.sub));
    match (c.sub, c.partition) {
        (sub::TRANSFER, Some(partition)) => {
            let after = read_payload(&c.payload, |r| {
                r.opt("cursor", |r, f| r.bytes(f, LenWidth::U8, CURSOR_BYTES_MAX))
            })
            .map_err(bad)?;
            Ok(PeerMsg::TransferPull {
                id,
                partition,
                after,
            })
        }
        (s @ (sub::AE_LEVEL | sub::AE_KEYS | sub::AE_REAP | sub::AE_DROP), Some(partition)) => {
            ae_request(id, s, partition, &c.payload)
        }
        (sub::HINT_CREDIT, Some(partition)) => {
            let wanted = read_payload(&c.payload, |r| r.u32("wanted")).map_err(bad)?;
            Ok(PeerMsg::HintCredit {
                id,
                partition,
                wanted,
            })
        }
        (sub::HEARTBEAT, None) => {
            read_payload(&c.payload, |_| Ok(())).map_err(bad)?;
            Ok(PeerMsg::Ping { id })
        }
        (sub, _) => Err(invalid(format!(
            "unknown CLUSTER sub-kind {sub} (or a partition missing)"
        ))),
    }
}

/// Largest bucket and key in anti-entropy payloads (their wire widths).
const AE_BUCKET_MAX: usize = u8::MAX as usize;
const AE_KEY_MAX: usize = u16::MAX as usize;

/// Reads a count of items of at least `item_bytes` each, checked against what is left so that
/// a hostile count allocates nothing.
fn count(r: &mut Reader<'_>, field: &'static str, item_bytes: usize) -> Result<usize, BodyError> {
    let n = r.u32(field)? as usize;
    if n.saturating_mul(item_bytes) > r.remaining() {
        return Err(BodyError::TooLarge {
            field,
            len: n as u64,
            max: r.remaining() / item_bytes,
        });
    }
    Ok(n)
}

fn write_count(w: &mut Writer<'_, Vec<u8>>, n: usize) {
    w.u32(u32::try_from(n).expect("anti-entropy lists are bounded far below 4 G items"));
}

fn write_names(w: &mut Writer<'_, Vec<u8>>, names: &[(Bytes, Bytes)]) {
    write_count(w, names.len());
    for (b, k) in names {
        w.prefixed(LenWidth::U8, b);
        w.prefixed(LenWidth::U16, k);
    }
}

fn read_names(r: &mut Reader<'_>) -> Result<Vec<(Bytes, Bytes)>, BodyError> {
    let n = count(r, "names", 1 + 2)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let b = r.bytes("bucket", LenWidth::U8, AE_BUCKET_MAX)?;
        let k = r.bytes("key", LenWidth::U16, AE_KEY_MAX)?;
        out.push((b, k));
    }
    Ok(out)
}

fn write_keys(w: &mut Writer<'_, Vec<u8>>, keys: &[AeKey]) {
    write_count(w, keys.len());
    for k in keys {
        w.prefixed(LenWidth::U8, &k.bucket);
        w.prefixed(LenWidth::U16, &k.key);
        w.u64(k.digest);
    }
}

fn read_keys(r: &mut Reader<'_>) -> Result<Vec<AeKey>, BodyError> {
    let n = count(r, "keys", 1 + 2 + 8)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let bucket = r.bytes("bucket", LenWidth::U8, AE_BUCKET_MAX)?;
        let key = r.bytes("key", LenWidth::U16, AE_KEY_MAX)?;
        let digest = r.u64("digest")?;
        out.push(AeKey {
            bucket,
            key,
            digest,
        });
    }
    Ok(out)
}

/// An anti-entropy CLUSTER request as the core's message: the payload must decode exactly; a
/// body error is `invalid_request`.
fn ae_request(id: u64, s: u8, partition: u32, payload: &[u8]) -> Result<PeerMsg, ErrorBody> {
    let mut r = Reader::new(payload);
    let body = |e: BodyError| invalid(format!("CLUSTER sub-kind {s}: {e}"));
    let msg = match s {
        sub::AE_LEVEL => {
            let n = r.u8("n").map_err(body)?;
            let depth = r.u8("depth").map_err(body)?;
            let len = count(&mut r, "hashes", 12).map_err(body)?;
            if len > ringkv_core::merkle::LEAVES {
                return Err(body(BodyError::TooLarge {
                    field: "hashes",
                    len: len as u64,
                    max: ringkv_core::merkle::LEAVES,
                }));
            }
            let mut hashes = Vec::with_capacity(len);
            for _ in 0..len {
                let i = r.u32("index").map_err(body)?;
                let h = r.u64("hash").map_err(body)?;
                hashes.push((i, h));
            }
            PeerMsg::AeLevel {
                id,
                partition,
                n,
                depth,
                hashes,
            }
        }
        sub::AE_KEYS => {
            let n = r.u8("n").map_err(body)?;
            let len = count(&mut r, "leaves", 4).map_err(body)?;
            let mut leaves = Vec::with_capacity(len);
            for _ in 0..len {
                leaves.push(r.u32("leaf").map_err(body)?);
            }
            let keys = read_keys(&mut r).map_err(body)?;
            PeerMsg::AeKeys {
                id,
                partition,
                n,
                leaves,
                keys,
            }
        }
        sub::AE_REAP | sub::AE_DROP => {
            let n = r.u8("n").map_err(body)?;
            let keys = read_keys(&mut r).map_err(body)?;
            if s == sub::AE_REAP {
                PeerMsg::AeReap {
                    id,
                    partition,
                    n,
                    keys,
                }
            } else {
                PeerMsg::AeDrop {
                    id,
                    partition,
                    n,
                    keys,
                }
            }
        }
        other => return Err(invalid(format!("unknown CLUSTER sub-kind {other}"))),
    };
    r.finish().map_err(body)?;
    Ok(msg)
}

/// An anti-entropy CLUSTER_OK answer as the core's message, the mirror of [`ae_request`]; an
/// answer that does not decode is a failed request.
fn ae_answer(id: u64, s: u8, payload: &[u8]) -> PeerMsg {
    let mut r = Reader::new(payload);
    let decoded = match s {
        sub::AE_LEVEL => (|| {
            let len = count(&mut r, "differing", 4)?;
            let mut differing = Vec::with_capacity(len);
            for _ in 0..len {
                differing.push(r.u32("index")?);
            }
            Ok(PeerMsg::AeLevelOk { id, differing })
        })(),
        sub::AE_KEYS => read_names(&mut r).map(|want| PeerMsg::AeKeysOk { id, want }),
        sub::AE_REAP => read_names(&mut r).map(|held| PeerMsg::AeReapOk { id, held }),
        _ => Ok(PeerMsg::AeDropOk { id }),
    };
    match decoded.and_then(|m| r.finish().map(|()| m)) {
        Ok(m) => m,
        Err(e) => PeerMsg::Failed {
            id,
            error: ErrorBody::new(ErrorCode::Internal, format!("CLUSTER_OK sub-kind {s}: {e}")),
        },
    }
}

/// A CLUSTER_OK answer as the core's message, the mirror of [`cluster_request`].
fn cluster_answer(id: u64, c: ClusterOk) -> PeerMsg {
    let failed = |message: String| PeerMsg::Failed {
        id,
        error: ErrorBody::new(ErrorCode::Internal, message),
    };
    match c.sub {
        sub::TRANSFER => match read_payload(&c.payload, read_page) {
            Ok(Ok(page)) => PeerMsg::TransferPage { id, page },
            Ok(Err(e)) => failed(e),
            Err(e) => failed(format!("TRANSFER_PAGE: {e}")),
        },
        s @ (sub::AE_LEVEL | sub::AE_KEYS | sub::AE_REAP | sub::AE_DROP) => {
            ae_answer(id, s, &c.payload)
        }
        sub::HINT_CREDIT => match read_payload(&c.payload, |r| r.u32("granted")) {
            Ok(granted) => PeerMsg::HintCreditOk { id, granted },
            Err(e) => failed(format!("HINT_CREDIT answer: {e}")),
        },
        sub::HEARTBEAT => match read_payload(&c.payload, |_| Ok(())) {
            Ok(()) => PeerMsg::Pong { id },
            Err(e) => failed(format!("HEARTBEAT answer: {e}")),
        },
        other => failed(format!("a peer answered unknown CLUSTER sub-kind {other}")),
    }
}

/// The node id of a peer HELLO's `node_name`.
pub fn parse_hello_name(name: &str) -> Option<NodeId> {
    let (id, _) = name.split_once('@')?;
    id.parse().ok().map(NodeId)
}

fn invalid(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::InvalidRequest, message)
}

/// A peer request parsed once on arrival, before it is routed to the shard that owns its
/// partition: a forwarded client request is parsed into its [`KeyRequest`] here (its key hashed
/// once, for the routing and the core alike), every other request keeps its frame until that
/// shard turns it into a [`PeerMsg`] ([`PeerRequest::into_peer_msg`]).
#[derive(Debug)]
pub enum PeerRequest {
    /// A client GET, PUT, DELETE or UPDATE a peer forwards for coordination, and the time after
    /// which it must not be applied ([`PeerMsg::Forward`]).
    Key {
        /// The client's request.
        request: KeyRequest,
        /// Set by a FORWARD_PUT.
        apply_by: Option<u64>,
    },
    /// Any other request: replica reads and writes, and CLUSTER messages.
    Wire {
        /// The partition it is for, checked against its key; `None` for a node-wide CLUSTER
        /// message, which the node's first shard handles.
        partition: Option<u32>,
        /// The request as received.
        message: Message,
    },
}

impl PeerRequest {
    /// Parses a request received from a peer, checking the partition it names against its key
    /// (so a confused or hostile peer cannot store a key under another partition).
    pub fn parse(message: Message) -> Result<PeerRequest, ErrorBody> {
        let (named, bucket, key) = match message {
            Message::Cluster(c) => {
                return match c.partition {
                    Some(p) if p >= PARTITIONS.get() => Err(invalid(format!(
                        "partition {p} outside the ring of {} partitions",
                        PARTITIONS.get()
                    ))),
                    partition => Ok(PeerRequest::Wire {
                        partition,
                        message: Message::Cluster(c),
                    }),
                };
            }
            Message::ReplicaPut(ref m) => (m.partition, &m.bucket, &m.key),
            Message::ReplicaGet(ref m) => (m.partition, &m.bucket, &m.key),
            other => {
                let (message, apply_by) = match other {
                    Message::ForwardPut(f) => (Message::Put(f.put), Some(f.apply_by_ms)),
                    other => (other, None),
                };
                return KeyRequest::parse(message, PARTITIONS)
                    .map(|request| PeerRequest::Key { request, apply_by })
                    .map_err(|m| invalid(format!("{} is not a peer request", m.kind())));
            }
        };
        let actual = partition_of(bucket, key).0;
        if named != actual {
            return Err(ErrorBody::new(
                ErrorCode::WrongShard,
                format!(
                    "partition {named} named for a key of partition {actual} (ring of {} \
                     partitions)",
                    PARTITIONS.get()
                ),
            ));
        }
        Ok(PeerRequest::Wire {
            partition: Some(actual),
            message,
        })
    }

    /// The ring partition the request is for; `None` for a node-wide CLUSTER message.
    pub fn partition(&self) -> Option<u32> {
        match self {
            PeerRequest::Key { request, .. } => Some(request.partition().0),
            PeerRequest::Wire { partition, .. } => *partition,
        }
    }

    /// The request as the core takes it, given the id the receiving core will echo.
    pub fn into_peer_msg(self, id: u64) -> Result<PeerMsg, ErrorBody> {
        let message = match self {
            PeerRequest::Key { request, apply_by } => {
                return Ok(PeerMsg::Forward {
                    id,
                    request,
                    apply_by,
                });
            }
            PeerRequest::Wire { message, .. } => message,
        };
        let space = |hint: Option<u32>| hint.map_or(Space::Primary, |h| Space::Hint(NodeId(h)));
        Ok(match message {
            Message::ReplicaPut(m) => PeerMsg::ReplicaPut {
                id,
                object: decode_object(&m.object).map_err(invalid)?,
                key: StoreKey {
                    partition: m.partition,
                    space: space(m.hint),
                    bucket: m.bucket,
                    key: m.key,
                },
                durable: m.durable,
            },
            Message::ReplicaGet(m) => PeerMsg::ReplicaGet {
                id,
                key: StoreKey {
                    partition: m.partition,
                    space: space(m.hint),
                    bucket: m.bucket,
                    key: m.key,
                },
            },
            Message::Cluster(c) => return cluster_request(id, c),
            other => return Err(invalid(format!("{} is not a peer request", other.kind()))),
        })
    }
}

fn decode_object(bytes: &Bytes) -> Result<Object, String> {
    Object::decode(bytes).map_err(|e| format!("undecodable object: {e}"))
}

/// An answer received as `message` for the request with id `id`.
pub fn answer_from_wire(id: u64, message: Message) -> PeerMsg {
    match message {
        Message::ReplicaPutOk(ReplicaPutOk { durable }) => PeerMsg::ReplicaPutOk { id, durable },
        Message::ReplicaGetOk(ReplicaGetOk { object: None }) => {
            PeerMsg::ReplicaGetOk { id, object: None }
        }
        Message::ReplicaGetOk(ReplicaGetOk {
            object: Some(bytes),
        }) => match decode_object(&bytes) {
            Ok(object) => PeerMsg::ReplicaGetOk {
                id,
                object: Some(object),
            },
            Err(e) => PeerMsg::Failed {
                id,
                error: ErrorBody::new(ErrorCode::Internal, e),
            },
        },
        reply @ (Message::GetOk(_)
        | Message::PutOk(_)
        | Message::DeleteOk
        | Message::UpdateOk
        | Message::ApplyOk(_)) => PeerMsg::ForwardReply { id, reply },
        Message::ForwardPutOk(ok) => PeerMsg::ForwardReply {
            id,
            reply: Message::PutOk(ok),
        },
        Message::Error(error) => PeerMsg::Failed { id, error },
        Message::ClusterOk(c) => cluster_answer(id, c),
        other => PeerMsg::Failed {
            id,
            error: ErrorBody::new(
                ErrorCode::Internal,
                format!("a peer answered {} to a peer request", other.kind()),
            ),
        },
    }
}

fn wire_key(key: StoreKey) -> (u32, Option<u32>, Bytes, Bytes) {
    let hint = match key.space {
        Space::Primary => None,
        Space::Hint(home) => Some(home.0),
    };
    (key.partition, hint, key.bucket, key.key)
}

fn replica_put(key: StoreKey, object: &Object, durable: bool) -> Message {
    let (partition, hint, bucket, key) = wire_key(key);
    Message::ReplicaPut(ReplicaPut {
        partition,
        durable,
        bucket,
        key,
        hint,
        object: Bytes::from(object.encode()),
    })
}

/// The frame id and message that carry `msg` (a request or an answer).
pub fn to_wire(msg: PeerMsg) -> (u64, Message) {
    match msg {
        PeerMsg::ReplicaPut {
            id,
            key,
            object,
            durable,
        } => (id, replica_put(key, &object, durable)),
        PeerMsg::ReplicaPutOk { id, durable } => {
            (id, Message::ReplicaPutOk(ReplicaPutOk { durable }))
        }
        PeerMsg::ReplicaGet { id, key } => {
            let (partition, hint, bucket, key) = wire_key(key);
            let get = ReplicaGet {
                partition,
                hint,
                bucket,
                key,
            };
            (id, Message::ReplicaGet(get))
        }
        PeerMsg::ReplicaGetOk { id, object } => {
            let object = object.map(|o| Bytes::from(o.encode()));
            (id, Message::ReplicaGetOk(ReplicaGetOk { object }))
        }
        PeerMsg::TransferPull {
            id,
            partition,
            after,
        } => cluster(id, sub::TRANSFER, partition, |w| {
            w.opt_prefixed(LenWidth::U8, after.as_deref())
        }),
        PeerMsg::TransferPage { id, page } => cluster_ok(id, sub::TRANSFER, |w| {
            w.u32(page.items.len() as u32);
            for item in &page.items {
                w.prefixed(LenWidth::U8, &item.bucket);
                w.prefixed(LenWidth::U16, &item.key);
                w.prefixed(LenWidth::U32, &item.object.encode());
            }
            w.opt_prefixed(LenWidth::U8, page.next.as_deref());
        }),
        PeerMsg::Forward {
            id,
            request,
            apply_by,
        } => match (request.into_message(), apply_by) {
            (Message::Put(put), Some(apply_by_ms)) => {
                (id, Message::ForwardPut(ForwardPut { apply_by_ms, put }))
            }
            (message, apply_by) => {
                debug_assert!(apply_by.is_none(), "only a PUT carries an apply-by time");
                (id, message)
            }
        },
        PeerMsg::ForwardReply { id, reply } => (id, reply),
        PeerMsg::AeLevel {
            id,
            partition,
            n,
            depth,
            hashes,
        } => cluster(id, sub::AE_LEVEL, partition, |w| {
            w.u8(n);
            w.u8(depth);
            write_count(w, hashes.len());
            for (i, h) in hashes {
                w.u32(i);
                w.u64(h);
            }
        }),
        PeerMsg::AeLevelOk { id, differing } => cluster_ok(id, sub::AE_LEVEL, |w| {
            write_count(w, differing.len());
            for i in differing {
                w.u32(i);
            }
        }),
        PeerMsg::AeKeys {
            id,
            partition,
            n,
            leaves,
            keys,
        } => cluster(id, sub::AE_KEYS, partition, |w| {
            w.u8(n);
            write_count(w, leaves.len());
            for l in leaves {
                w.u32(l);
            }
            write_keys(w, &keys);
        }),
        PeerMsg::AeKeysOk { id, want } => cluster_ok(id, sub::AE_KEYS, |w| write_names(w, &want)),
        PeerMsg::AeReap {
            id,
            partition,
            n,
            keys,
        } => cluster(id, sub::AE_REAP, partition, |w| {
            w.u8(n);
            write_keys(w, &keys);
        }),
        PeerMsg::AeReapOk { id, held } => cluster_ok(id, sub::AE_REAP, |w| write_names(w, &held)),
        PeerMsg::AeDrop {
            id,
            partition,
            n,
            keys,
        } => cluster(id, sub::AE_DROP, partition, |w| {
            w.u8(n);
            write_keys(w, &keys);
        }),
        PeerMsg::AeDropOk { id } => cluster_ok(id, sub::AE_DROP, |_| {}),
        PeerMsg::HintCredit {
            id,
            partition,
            wanted,
        } => cluster(id, sub::HINT_CREDIT, partition, |w| w.u32(wanted)),
        PeerMsg::HintCreditOk { id, granted } => {
            cluster_ok(id, sub::HINT_CREDIT, |w| w.u32(granted))
        }
        PeerMsg::Ping { id } => (
            id,
            Message::Cluster(Cluster {
                sub: sub::HEARTBEAT,
                partition: None,
                payload: Bytes::new(),
            }),
        ),
        PeerMsg::Pong { id } => cluster_ok(id, sub::HEARTBEAT, |_| {}),
        PeerMsg::Failed { id, error } => (id, Message::Error(error)),
    }
}

fn cluster(
    id: u64,
    sub: u8,
    partition: u32,
    write: impl FnOnce(&mut Writer<'_, Vec<u8>>),
) -> (u64, Message) {
    (
        id,
        Message::Cluster(Cluster {
            sub,
            partition: Some(partition),
            payload: write_payload(write),
        }),
    )
}

fn cluster_ok(id: u64, sub: u8, write: impl FnOnce(&mut Writer<'_, Vec<u8>>)) -> (u64, Message) {
    (
        id,
        Message::ClusterOk(ClusterOk {
            sub,
            payload: write_payload(write),
        }),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ringkv_core::object::{Lww, Val};

    fn key(space: Space) -> StoreKey {
        let bucket = Bytes::from_static(b"cart");
        let k = Bytes::from_static(b"alice");
        StoreKey {
            partition: partition_of(&bucket, &k).0,
            space,
            bucket,
            key: k,
        }
    }

    fn object() -> Object {
        Object::Lww(Lww {
            timestamp: 7,
            node: NodeId(2),
            val: Val::Value(Bytes::from_static(b"v")),
        })
    }

    fn request_partition(message: &Message) -> Result<Option<u32>, ErrorBody> {
        PeerRequest::parse(message.clone()).map(|r| r.partition())
    }

    fn request_from_wire(id: u64, message: Message) -> Result<PeerMsg, ErrorBody> {
        PeerRequest::parse(message)?.into_peer_msg(id)
    }

    /// Every client request a coordinator forwards (UPDATE too) arrives as a forward for its
    /// key's partition, and travels back and forth unchanged.
    #[test]
    fn forwarded_client_requests_are_peer_requests() {
        let (bucket, k) = (Bytes::from_static(b"sessions"), Bytes::from_static(b"s1"));
        let bodies = [
            Message::Get(ringkv_net::Get {
                bucket: bucket.clone(),
                key: k.clone(),
                r: None,
                timeout_ms: None,
            }),
            Message::Delete(ringkv_net::Delete {
                bucket: bucket.clone(),
                key: k.clone(),
                context: None,
                w: Some(2),
                dw: None,
                timeout_ms: None,
            }),
            Message::Update(ringkv_net::Update {
                bucket: bucket.clone(),
                key: k.clone(),
                ops: vec![ringkv_net::MapOp::Set {
                    field: Bytes::from_static(b"user"),
                    value: Bytes::from_static(b"ada"),
                }],
                w: None,
                dw: None,
                timeout_ms: Some(500),
            }),
        ];
        for body in bodies {
            let request = KeyRequest::parse(body, PARTITIONS).unwrap();
            let msg = PeerMsg::Forward {
                id: 9,
                request,
                apply_by: None,
            };
            let (id, wire) = to_wire(msg.clone());
            assert_eq!(
                request_partition(&wire).unwrap(),
                Some(partition_of(&bucket, &k).0)
            );
            assert_eq!(request_from_wire(id, wire).unwrap(), msg);
        }
    }

    /// A forward with an apply-by time travels as FORWARD_PUT and comes back with that time;
    /// its FORWARD_PUT_OK answer is the client's PUT_OK.
    #[test]
    fn a_forward_with_an_apply_by_time_is_a_forward_put() {
        let put = Message::Put(ringkv_net::Put {
            bucket: Bytes::from_static(b"sessions"),
            key: Bytes::from_static(b"s1"),
            value: Bytes::from_static(b"v"),
            context: None,
            w: Some(2),
            dw: None,
            timeout_ms: Some(900),
            expiry: Some(ringkv_net::Expiry::Ttl { ms: 60_000 }),
            condition: None,
        });
        let request = KeyRequest::parse(put.clone(), PARTITIONS).unwrap();
        let msg = PeerMsg::Forward {
            id: 4,
            request,
            apply_by: Some(1_700_000_000_123),
        };
        let (id, wire) = to_wire(msg.clone());
        let Message::ForwardPut(f) = &wire else {
            panic!("not a FORWARD_PUT: {wire:?}");
        };
        assert_eq!(f.apply_by_ms, 1_700_000_000_123);
        assert_eq!(Message::Put(f.put.clone()), put);
        assert_eq!(request_from_wire(id, wire).unwrap(), msg);
        let ok = ringkv_net::PutOk {
            context: Bytes::from_static(b"ctx"),
        };
        assert_eq!(
            answer_from_wire(4, Message::ForwardPutOk(ok.clone())),
            PeerMsg::ForwardReply {
                id: 4,
                reply: Message::PutOk(ok),
            }
        );
    }

    /// Every peer message survives the trip through its frame; an undecodable object is a
    /// failure, not a panic.
    #[test]
    fn peer_messages_round_trip() {
        let requests = [
            PeerMsg::ReplicaPut {
                id: 3,
                key: key(Space::Hint(NodeId(4))),
                object: object(),
                durable: true,
            },
            PeerMsg::ReplicaGet {
                id: 4,
                key: key(Space::Primary),
            },
        ];
        let pull = PeerMsg::TransferPull {
            id: 10,
            partition: 3,
            after: Some(Bytes::from_static(b"cursor")),
        };
        let (id, wire) = to_wire(pull.clone());
        assert_eq!(request_partition(&wire).unwrap(), Some(3));
        assert_eq!(request_from_wire(id, wire).unwrap(), pull);
        for msg in requests {
            let (id, wire) = to_wire(msg.clone());
            assert_eq!(
                request_partition(&wire).unwrap(),
                Some(key(Space::Primary).partition)
            );
            assert_eq!(request_from_wire(id, wire).unwrap(), msg);
        }
        let answers = [
            PeerMsg::ReplicaPutOk {
                id: 5,
                durable: true,
            },
            PeerMsg::ReplicaGetOk {
                id: 6,
                object: Some(object()),
            },
            PeerMsg::ReplicaGetOk {
                id: 7,
                object: None,
            },
            PeerMsg::ForwardReply {
                id: 8,
                reply: Message::DeleteOk,
            },
            PeerMsg::Failed {
                id: 9,
                error: ErrorBody::new(ErrorCode::Timeout, "slow"),
            },
            PeerMsg::TransferPage {
                id: 11,
                page: ScanPage {
                    items: vec![ScanItem {
                        bucket: Bytes::from_static(b"cart"),
                        key: Bytes::from_static(b"alice"),
                        object: object(),
                    }],
                    next: None,
                },
            },
        ];
        for msg in answers {
            let (id, wire) = to_wire(msg.clone());
            assert_eq!(answer_from_wire(id, wire), msg);
        }
        let bad = Message::ReplicaGetOk(ReplicaGetOk {
            object: Some(Bytes::from_static(b"\x07junk")),
        });
        assert!(matches!(answer_from_wire(1, bad), PeerMsg::Failed { .. }));
        let (_, mut put) = to_wire(PeerMsg::ReplicaPut {
            id: 1,
            key: key(Space::Primary),
            object: object(),
            durable: false,
        });
        if let Message::ReplicaPut(m) = &mut put {
            m.object = Bytes::from_static(b"\x01");
        }
        assert!(request_from_wire(1, put.clone()).is_err());
        if let Message::ReplicaPut(m) = &mut put {
            m.partition ^= 1;
        }
        assert_eq!(
            request_partition(&put).unwrap_err().code,
            ErrorCode::WrongShard
        );
    }

    /// Peers name themselves `<id>@<name>`.
    #[test]
    fn hello_names() {
        assert_eq!(
            parse_hello_name(&hello_name(NodeId(12), "b@x")),
            Some(NodeId(12))
        );
        assert_eq!(parse_hello_name("node-b"), None);
        assert_eq!(parse_hello_name("x@node-b"), None);
    }

    /// Every anti-entropy message survives its CLUSTER frame; a payload with a byte too many or
    /// too few, or a count above what is left, is refused, not a panic or a huge allocation.
    #[test]
    fn anti_entropy_messages_round_trip() {
        let k = AeKey {
            bucket: Bytes::from_static(b"cart"),
            key: Bytes::from_static(b"alice"),
            digest: 0xfeed,
        };
        let names = vec![(k.bucket.clone(), k.key.clone())];
        let requests = [
            PeerMsg::AeLevel {
                id: 1,
                partition: 5,
                n: 3,
                depth: 2,
                hashes: vec![(7, 9), (8, 10)],
            },
            PeerMsg::AeKeys {
                id: 2,
                partition: 5,
                n: 2,
                leaves: vec![1, 4095],
                keys: vec![k.clone(), k.clone()],
            },
            PeerMsg::AeReap {
                id: 3,
                partition: 5,
                n: 3,
                keys: vec![k.clone()],
            },
            PeerMsg::AeDrop {
                id: 4,
                partition: 5,
                n: 3,
                keys: vec![],
            },
        ];
        for msg in requests {
            let (id, wire) = to_wire(msg.clone());
            assert_eq!(request_partition(&wire).unwrap(), Some(5));
            assert_eq!(request_from_wire(id, wire.clone()).unwrap(), msg);
            let Message::Cluster(c) = wire else {
                panic!("anti-entropy travels in CLUSTER frames")
            };
            let mut longer = c.payload.to_vec();
            longer.push(0);
            let mut damaged = c.clone();
            damaged.payload = Bytes::from(longer);
            assert!(request_from_wire(1, Message::Cluster(damaged)).is_err());
            let mut short = c.clone();
            short.payload = c.payload.slice(..c.payload.len() - 1);
            assert!(request_from_wire(1, Message::Cluster(short)).is_err());
            let mut nowhere = c.clone();
            nowhere.partition = None;
            assert!(request_from_wire(1, Message::Cluster(nowhere)).is_err());
        }
        let answers = [
            PeerMsg::AeLevelOk {
                id: 5,
                differing: vec![3, 4],
            },
            PeerMsg::AeKeysOk {
                id: 6,
                want: names.clone(),
            },
            PeerMsg::AeReapOk { id: 7, held: names },
            PeerMsg::AeDropOk { id: 8 },
        ];
        for msg in answers {
            let (id, wire) = to_wire(msg.clone());
            assert_eq!(answer_from_wire(id, wire), msg);
        }
        let huge = Message::ClusterOk(ClusterOk {
            sub: sub::AE_KEYS,
            payload: Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]),
        });
        assert!(matches!(answer_from_wire(1, huge), PeerMsg::Failed { .. }));
    }
}
