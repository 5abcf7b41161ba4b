//! Proptest strategies for every message of the framed protocol, shared by the test binaries.
//!
//! Sizes stay small (values of a few KiB) so hundreds of cases run in well under a second in debug
//! builds, but every length-limited field is generated up to its exact limit, so the boundary
//! where the encoder must still accept and the decoder must still decode is exercised.

#![allow(dead_code, unreachable_pub)]

use bytes::Bytes;
use proptest::prelude::*;
use ringkv_net::limits::{BUCKET_BYTES_MAX, KEY_BYTES_MAX_DEFAULT, NAME_BYTES_MAX, SIBLINGS_MAX};
use ringkv_net::{
    Admin, AdminOk, Apply, ApplyOk, Cluster, ClusterOk, Condition, CrdtOp, CrdtType, CrdtValue,
    Delete, ErrorBody, ErrorCode, Expiry, FieldOp, FieldValue, ForwardPut, Frame, Get, GetOk,
    Hello, HelloOk, MapOp, Message, Put, PutOk, ReplicaGet, ReplicaGetOk, ReplicaPut, ReplicaPutOk,
    Role, Sibling, Update,
};

/// Arbitrary bytes of at most `max` bytes, biased towards the empty string and the maximum.
pub fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        1 => Just(Bytes::new()),
        1 => any::<u8>().prop_map(move |b| Bytes::from(vec![b; max])),
        8 => proptest::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from),
    ]
}

/// A UTF-8 name of at most `max` bytes: ASCII up to the limit, or any printable characters.
pub fn name(max: usize) -> impl Strategy<Value = String> {
    assert!(max >= 64);
    prop_oneof![
        proptest::string::string_regex(&format!("[a-zA-Z0-9_.-]{{0,{max}}}")).expect("valid regex"),
        // At most 4 bytes per character, so 16 characters always fit.
        "\\PC{0,16}",
    ]
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Client), Just(Role::Peer)]
}

fn bucket() -> impl Strategy<Value = Bytes> {
    bytes(BUCKET_BYTES_MAX)
}

fn key() -> impl Strategy<Value = Bytes> {
    bytes(KEY_BYTES_MAX_DEFAULT)
}

fn value() -> impl Strategy<Value = Bytes> {
    bytes(4096)
}

fn context() -> impl Strategy<Value = Bytes> {
    bytes(512)
}

fn sibling() -> impl Strategy<Value = Sibling> {
    prop_oneof![
        1 => Just(Sibling::Tombstone),
        3 => bytes(64).prop_map(Sibling::Value),
    ]
}

fn expiry() -> impl Strategy<Value = Expiry> {
    prop_oneof![
        any::<u64>().prop_map(|ms| Expiry::Ttl { ms }),
        any::<u64>().prop_map(|unix_ms| Expiry::At { unix_ms }),
        Just(Expiry::Never),
    ]
}

fn crdt_type() -> impl Strategy<Value = CrdtType> {
    prop_oneof![
        Just(CrdtType::Counter),
        Just(CrdtType::Set),
        Just(CrdtType::Map)
    ]
}

fn field_op() -> impl Strategy<Value = FieldOp> {
    prop_oneof![
        bytes(256).prop_map(FieldOp::Assign),
        any::<i64>().prop_map(FieldOp::Increment),
        bytes(64).prop_map(FieldOp::Add),
        bytes(64).prop_map(FieldOp::Remove),
        Just(FieldOp::Enable),
        Just(FieldOp::Disable),
    ]
}

/// Any operation, whatever the APPLY's type: the codec leaves matching them to the node.
fn crdt_op() -> impl Strategy<Value = CrdtOp> {
    prop_oneof![
        any::<i64>().prop_map(CrdtOp::Increment),
        bytes(64).prop_map(CrdtOp::Add),
        bytes(64).prop_map(CrdtOp::Remove),
        (bytes(64), field_op()).prop_map(|(name, op)| CrdtOp::Field { name, op }),
        bytes(64).prop_map(CrdtOp::RemoveField),
        expiry().prop_map(CrdtOp::Expire),
    ]
}

/// A set's elements: distinct and in byte order, the one order values are encoded in.
fn elements() -> impl Strategy<Value = Vec<Bytes>> {
    proptest::collection::btree_set(bytes(32), 0..8).prop_map(|s| s.into_iter().collect())
}

fn field_value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        bytes(256).prop_map(FieldValue::Register),
        any::<i64>().prop_map(FieldValue::Counter),
        elements().prop_map(FieldValue::Set),
        Just(FieldValue::Flag),
    ]
}

/// Any value of a convergent data type, its sets and maps in byte order.
pub fn crdt_value() -> impl Strategy<Value = CrdtValue> {
    prop_oneof![
        any::<i64>().prop_map(CrdtValue::Counter),
        elements().prop_map(CrdtValue::Set),
        proptest::collection::btree_map(bytes(64), field_value(), 0..8)
            .prop_map(|m| CrdtValue::Map(m.into_iter().collect())),
    ]
}

/// Any message with fields within the default limits.
pub fn message() -> impl Strategy<Value = Message> {
    let hello = (
        any::<u8>(),
        role(),
        name(NAME_BYTES_MAX),
        proptest::option::of(name(NAME_BYTES_MAX)),
    )
        .prop_map(|(protocol_version, role, cluster_name, node_name)| {
            Message::Hello(Hello {
                protocol_version,
                role,
                cluster_name,
                node_name,
            })
        });
    let hello_ok = (
        any::<u8>(),
        name(NAME_BYTES_MAX),
        1..=u16::MAX,
        any::<u16>(),
    )
        .prop_map(|(protocol_version, node_name, shard_count, shard)| {
            Message::HelloOk(HelloOk {
                protocol_version,
                node_name,
                shard_count,
                shard: shard % shard_count,
            })
        });
    let get = (bucket(), key(), any::<Option<u8>>(), any::<Option<u32>>()).prop_map(
        |(bucket, key, r, timeout_ms)| {
            Message::Get(Get {
                bucket,
                key,
                r,
                timeout_ms,
            })
        },
    );
    let get_ok = (
        proptest::collection::vec(sibling(), 0..=SIBLINGS_MAX),
        context(),
        any::<Option<u64>>(),
    )
        .prop_map(|(siblings, context, expires_at_ms)| {
            Message::GetOk(GetOk {
                siblings,
                context,
                expires_at_ms,
                fields: None,
                crdt: None,
            })
        });
    // A map's read: fields and no siblings.
    let get_ok_map = (
        proptest::collection::vec((bytes(64), bytes(256)), 0..8),
        any::<Option<u64>>(),
    )
        .prop_map(|(fields, expires_at_ms)| {
            Message::GetOk(GetOk {
                siblings: Vec::new(),
                context: Bytes::new(),
                expires_at_ms,
                fields: Some(fields),
                crdt: None,
            })
        });
    // A convergent data type's read: its value and no siblings.
    let get_ok_crdt = (crdt_value(), context(), any::<Option<u64>>()).prop_map(
        |(value, context, expires_at_ms)| {
            Message::GetOk(GetOk {
                siblings: Vec::new(),
                context,
                expires_at_ms,
                fields: None,
                crdt: Some(value),
            })
        },
    );
    let map_op = prop_oneof![
        (bytes(64), bytes(256)).prop_map(|(field, value)| MapOp::Set { field, value }),
        bytes(64).prop_map(|field| MapOp::Delete { field }),
        expiry().prop_map(MapOp::Expire),
    ];
    let update = (
        bucket(),
        key(),
        proptest::collection::vec(map_op, 1..8),
        any::<Option<u8>>(),
        any::<Option<u8>>(),
        any::<Option<u32>>(),
    )
        .prop_map(|(bucket, key, ops, w, dw, timeout_ms)| {
            Message::Update(Update {
                bucket,
                key,
                ops,
                w,
                dw,
                timeout_ms,
            })
        });
    let apply = (
        bucket(),
        key(),
        crdt_type(),
        proptest::collection::vec(crdt_op(), 1..8),
        any::<Option<u64>>(),
        any::<bool>(),
        (
            any::<Option<u8>>(),
            any::<Option<u8>>(),
            any::<Option<u32>>(),
        ),
    )
        .prop_map(
            |(bucket, key, crdt, ops, op_id, return_value, (w, dw, timeout_ms))| {
                Message::Apply(Apply {
                    bucket,
                    key,
                    crdt,
                    ops,
                    op_id,
                    return_value,
                    w,
                    dw,
                    timeout_ms,
                })
            },
        );
    let apply_ok =
        proptest::option::of(crdt_value()).prop_map(|value| Message::ApplyOk(ApplyOk { value }));
    let expiry = proptest::option::of(expiry());
    let put = (
        bucket(),
        key(),
        value(),
        proptest::option::of(context()),
        any::<Option<u8>>(),
        any::<Option<u8>>(),
        any::<Option<u32>>(),
        (
            expiry,
            proptest::option::of(prop_oneof![
                Just(Condition::IfAbsent),
                Just(Condition::IfPresent)
            ]),
        ),
    )
        .prop_map(
            |(bucket, key, value, context, w, dw, timeout_ms, (expiry, condition))| {
                Message::Put(Put {
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
            },
        )
        .boxed();
    let forward_put = (any::<u64>(), put.clone()).prop_map(|(apply_by_ms, put)| match put {
        Message::Put(put) => Message::ForwardPut(ForwardPut { apply_by_ms, put }),
        _ => unreachable!("the put strategy makes PUTs"),
    });
    let delete = (
        bucket(),
        key(),
        proptest::option::of(context()),
        any::<Option<u8>>(),
        any::<Option<u8>>(),
        any::<Option<u32>>(),
    )
        .prop_map(|(bucket, key, context, w, dw, timeout_ms)| {
            Message::Delete(Delete {
                bucket,
                key,
                context,
                w,
                dw,
                timeout_ms,
            })
        });
    let replica_put = (
        any::<u32>(),
        any::<bool>(),
        bucket(),
        key(),
        any::<Option<u32>>(),
        value(),
    )
        .prop_map(|(partition, durable, bucket, key, hint, object)| {
            Message::ReplicaPut(ReplicaPut {
                partition,
                durable,
                bucket,
                key,
                hint,
                object,
            })
        });
    let replica_get = (any::<u32>(), any::<Option<u32>>(), bucket(), key()).prop_map(
        |(partition, hint, bucket, key)| {
            Message::ReplicaGet(ReplicaGet {
                partition,
                hint,
                bucket,
                key,
            })
        },
    );
    let replica_get_ok = proptest::option::of(value())
        .prop_map(|object| Message::ReplicaGetOk(ReplicaGetOk { object }));
    let error =
        (any::<u16>(), prop_oneof!["[ -~]{0,1024}", "\\PC{0,64}"]).prop_map(|(code, message)| {
            Message::Error(ErrorBody::new(ErrorCode::from_u16(code), message))
        });
    let admin = (name(NAME_BYTES_MAX), bytes(256))
        .prop_map(|(command, args)| Message::Admin(Admin { command, args }));
    let admin_ok = bytes(256).prop_map(|body| Message::AdminOk(AdminOk { body }));
    let cluster = (any::<u8>(), proptest::option::of(any::<u32>()), bytes(256)).prop_map(
        |(sub, partition, payload)| {
            Message::Cluster(Cluster {
                sub,
                partition,
                payload,
            })
        },
    );
    let cluster_ok = (any::<u8>(), bytes(256))
        .prop_map(|(sub, payload)| Message::ClusterOk(ClusterOk { sub, payload }));
    prop_oneof![
        admin,
        admin_ok,
        cluster,
        cluster_ok,
        hello,
        hello_ok,
        Just(Message::Ping),
        Just(Message::Pong),
        get,
        get_ok,
        get_ok_map,
        put,
        context().prop_map(|context| Message::PutOk(PutOk { context })),
        forward_put,
        context().prop_map(|context| Message::ForwardPutOk(PutOk { context })),
        delete,
        Just(Message::DeleteOk),
        get_ok_crdt,
        update,
        Just(Message::UpdateOk),
        apply,
        apply_ok,
        replica_put,
        any::<bool>().prop_map(|durable| Message::ReplicaPutOk(ReplicaPutOk { durable })),
        replica_get,
        replica_get_ok,
        error,
    ]
}

/// Any frame: a message and a valid request id (0 only for ERROR frames, sometimes).
pub fn frame() -> impl Strategy<Value = Frame> {
    (message(), 1..=u64::MAX, any::<bool>()).prop_map(|(message, id, zero)| {
        let request_id = if zero && matches!(message, Message::Error(_)) {
            0
        } else {
            id
        };
        Frame {
            request_id,
            message,
        }
    })
}
