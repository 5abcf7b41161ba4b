//! The coordinator's side of the convergent data types (`crate::crdt`): what an APPLY (or an
//! UPDATE, a map's register operations) asks for, checked against its bucket, and the state its
//! operations start from given what the local replica holds — the live state, a new generation
//! over an expired state or a deletion, a counter over a plain integer, a map over a hash stored
//! before maps were convergent — with the errors a client sees. The write path itself is the
//! coordinator's (`mod.rs`, `Core::updated`).

use ringkv_net::{CrdtOp, CrdtType, ErrorBody, ErrorCode, Expiry, FieldOp, MapOp};

use super::{Write, absolute};
use crate::bucket::{BucketProps, ConflictMode};
use crate::crdt::{self, Crdt, CrdtError};
use crate::object::Object;

fn wrong_type(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::WrongType, message)
}

/// The write an APPLY asks for, checked against its bucket.
pub(super) fn apply_write(
    m: ringkv_net::Apply,
    props: &BucketProps,
    now: u64,
) -> Result<Write, ErrorBody> {
    Ok(Write::Crdt {
        crdt: m.crdt,
        ops: checked(m.crdt, m.ops, props, now)?,
        op_id: m.op_id,
        return_value: m.return_value,
        update: false,
    })
}

/// The write an UPDATE asks for: a map's register operations, answered UPDATE_OK.
pub(super) fn update_write(
    m: ringkv_net::Update,
    props: &BucketProps,
    now: u64,
) -> Result<Write, ErrorBody> {
    let ops = m
        .ops
        .into_iter()
        .map(|op| match op {
            MapOp::Set { field, value } => CrdtOp::Field {
                name: field,
                op: FieldOp::Assign(value),
            },
            MapOp::Delete { field } => CrdtOp::RemoveField(field),
            MapOp::Expire(e) => CrdtOp::Expire(e),
        })
        .collect();
    Ok(Write::Crdt {
        crdt: CrdtType::Map,
        ops: checked(CrdtType::Map, ops, props, now)?,
        op_id: None,
        return_value: false,
        update: true,
    })
}

/// `ops` on a `crdt` checked against the bucket, with their expiries made absolute.
fn checked(
    crdt: CrdtType,
    ops: Vec<CrdtOp>,
    props: &BucketProps,
    now: u64,
) -> Result<Vec<CrdtOp>, ErrorBody> {
    match props.data_type {
        Some(t) if t.crdt() != crdt => {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the bucket holds {}s, not {}s",
                    crdt::type_name(t.crdt()),
                    crdt::type_name(crdt)
                ),
            ));
        }
        Some(_) => {}
        // Against a sibling, a convergent state would lose every merge (causal objects win, so
        // that no sibling is dropped silently): an untyped bucket must resolve by last write.
        None if props.mode != ConflictMode::Lww => {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "convergent types need a bucket with a `type`, or an lww bucket",
            ));
        }
        None => {}
    }
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        out.push(match op {
            CrdtOp::Expire(e) => CrdtOp::Expire(match absolute(e, now)? {
                Some(unix_ms) => Expiry::At { unix_ms },
                None => Expiry::Never,
            }),
            CrdtOp::Field { name, .. } | CrdtOp::RemoveField(name)
                if name.len() > usize::from(u16::MAX) =>
            {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!("a map field name is at most {} bytes", u16::MAX),
                ));
            }
            op => op,
        });
    }
    Ok(out)
}

/// The state an operation on a convergent type starts from, given the replica's `local`
/// object, and the operations to apply to it (`crdt.rs`, merge): the live state itself; a new
/// generation over an expired one, over a deletion or an expired value; a counter over a plain
/// value that is an integer, keeping the value's expiry (Redis's `INCR` of a string keeps its
/// time to live). Anything else holds another type.
pub(super) fn crdt_base(
    local: Option<Object>,
    crdt: CrdtType,
    ops: &[CrdtOp],
    now: u64,
) -> Result<(Crdt, Vec<CrdtOp>), ErrorBody> {
    let fresh = |generation| Ok((Crdt::new(generation), ops.to_vec()));
    match local {
        None => fresh(crdt::FIRST_GENERATION),
        Some(Object::Crdt(c)) if c.expires_at_ms().is_some_and(|at| at <= now) => fresh(c.latest()),
        Some(Object::Crdt(c)) => Ok((*c, ops.to_vec())),
        Some(Object::Lww(l)) => match l.val.live(now) {
            None => fresh((l.timestamp, l.node)),
            Some(v) => {
                let number = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok());
                match number {
                    Some(start) if crdt == CrdtType::Counter => {
                        // The value's expiry goes first, so that an expiry among `ops` wins.
                        let mut all = Vec::with_capacity(ops.len() + 2);
                        all.push(CrdtOp::Increment(start));
                        all.extend(
                            l.val
                                .expires_at_ms()
                                .map(|unix_ms| CrdtOp::Expire(Expiry::At { unix_ms })),
                        );
                        all.extend_from_slice(ops);
                        Ok((Crdt::new((l.timestamp, l.node)), all))
                    }
                    _ => Err(wrong_type(format!(
                        "the key holds a plain value, not a {}",
                        crdt::type_name(crdt)
                    ))),
                }
            }
        },
        Some(Object::Map(m)) if m.live(now).is_empty() => fresh(m.latest()),
        // A hash written before maps were a convergent type becomes one: its live fields are
        // the new state's first registers, in the generation of its latest write.
        Some(Object::Map(m)) if crdt == CrdtType::Map => {
            let mut all: Vec<CrdtOp> = m
                .live(now)
                .into_iter()
                .map(|(name, value)| CrdtOp::Field {
                    name,
                    op: FieldOp::Assign(value),
                })
                .collect();
            all.extend(
                m.expires_at_ms()
                    .map(|unix_ms| CrdtOp::Expire(Expiry::At { unix_ms })),
            );
            all.extend_from_slice(ops);
            Ok((Crdt::new(m.latest()), all))
        }
        Some(Object::Map(_)) => Err(wrong_type(format!(
            "the key holds a hash, not a {}",
            crdt::type_name(crdt)
        ))),
        Some(Object::Causal(_)) => Err(wrong_type(format!(
            "the key holds siblings from before its bucket resolved by last write, not a {}",
            crdt::type_name(crdt)
        ))),
    }
}

pub(super) fn crdt_error(e: CrdtError) -> ErrorBody {
    let code = match e {
        CrdtError::WrongType { .. } => ErrorCode::WrongType,
        CrdtError::Mismatch { .. } | CrdtError::Overflow | CrdtError::NotAnInteger(_) => {
            ErrorCode::InvalidRequest
        }
        CrdtError::TooMany { .. } | CrdtError::TooManyActors(_) => ErrorCode::TooLarge,
    };
    ErrorBody::new(code, e.to_string())
}
