//! The encoding of convergent data types: APPLY's operations and the values that APPLY_OK and
//! GET_OK's `crdt` extension carry (`docs/PROTOCOL.md` §5.4.2).
//!
//! Owns, for [`Apply`], [`ApplyOk`], [`CrdtOp`] and [`CrdtValue`]: the check before encoding, the
//! encoded length, the writer and the reader. It does not own what the operations mean or how
//! replicas merge (the server side), nor whether an operation fits the key's type: an APPLY of a
//! counter carrying a set's `Add` is well-formed, and the node answers it `invalid_request`.
//!
//! Canonical form: a value's set elements and map fields come in strictly increasing byte order
//! (of the element, of the field's name), which the encoder checks and the decoder enforces, so a
//! value has exactly one encoding (the fuzz targets re-encode what they decode) and a reader can
//! binary-search it. Integers are two's complement in a `u64`. Counts in values are `u32`, bounded
//! only by the frame; each count is checked against the bytes left in the body before the vector
//! it sizes is allocated, so a hostile count costs nothing.

use bytes::{BufMut, Bytes};

use super::{
    Apply, ApplyOk, CRDT_OPS_MAX, CrdtOp, CrdtType, CrdtValue, F_CRDT, F_DW, F_FIELD, F_FIELDS,
    F_OP, F_OPS, F_TIMEOUT_MS, F_W, FIELD_BYTES_MAX, FieldOp, FieldValue, bucket_key_len,
    check_bucket_key, opt_len, read_bucket_key, read_expiry, write_expiry,
};
use crate::error::{BodyError, EncodeError};
use crate::limits::{Limits, VALUE_BYTES_MAX};
use crate::wire::{LenWidth, Reader, Writer, check_len, prefixed_len};

const F_OP_ID: &str = "op_id";
const F_RETURN_VALUE: &str = "return_value";
const F_FIELD_OP: &str = "field_op";
const F_INCREMENT: &str = "increment";
const F_ELEMENT: &str = "element";
const F_ELEMENTS: &str = "elements";
const F_CRDT_VALUE: &str = "crdt_value";
const F_FIELD_VALUE: &str = "field_value";
const F_COUNTER: &str = "counter";
const F_REGISTER: &str = "register";

/// [`CrdtOp`] tags.
const OP_INCREMENT: u8 = 1;
const OP_ADD: u8 = 2;
const OP_REMOVE: u8 = 3;
const OP_FIELD: u8 = 4;
const OP_REMOVE_FIELD: u8 = 5;
const OP_EXPIRE: u8 = 6;

/// [`FieldOp`] tags, after a [`OP_FIELD`] op's field name.
const FIELD_ASSIGN: u8 = 1;
const FIELD_INCREMENT: u8 = 2;
const FIELD_ADD: u8 = 3;
const FIELD_REMOVE: u8 = 4;
const FIELD_ENABLE: u8 = 5;
const FIELD_DISABLE: u8 = 6;

/// [`CrdtValue`] tags.
const VALUE_COUNTER: u8 = 1;
const VALUE_SET: u8 = 2;
const VALUE_MAP: u8 = 3;

/// [`FieldValue`] tags, after a map field's name.
const FIELD_VALUE_REGISTER: u8 = 1;
const FIELD_VALUE_COUNTER: u8 = 2;
const FIELD_VALUE_SET: u8 = 3;
const FIELD_VALUE_FLAG: u8 = 4;

/// Fewest bytes one encoded op takes (an expire-never: its tag and the expiry's), so an op
/// count the body cannot hold is refused before the op vector is allocated.
const OP_BYTES_MIN: usize = 2;
/// Fewest bytes one encoded set element takes: its length prefix.
const ELEMENT_BYTES_MIN: usize = 4;
/// Fewest bytes one encoded map field takes: an empty name's prefix and a flag's tag.
const FIELD_VALUE_BYTES_MIN: usize = 3;

// The op count is written as a u16.
const _: () = assert!(CRDT_OPS_MAX <= u16::MAX as usize);

impl CrdtType {
    /// Decodes a type byte; `None` for values other than 1..=3.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Counter),
            2 => Some(Self::Set),
            3 => Some(Self::Map),
            _ => None,
        }
    }
}

/// Checks an APPLY against the limits the receiver applies.
pub(super) fn check_apply(m: &Apply, limits: &Limits) -> Result<(), EncodeError> {
    check_bucket_key(&m.bucket, &m.key, limits)?;
    if m.ops.is_empty() || m.ops.len() > CRDT_OPS_MAX {
        return Err(EncodeError::InvalidField {
            field: F_OPS,
            reason: "an apply carries 1 to CRDT_OPS_MAX operations",
        });
    }
    m.ops.iter().try_for_each(check_op)
}

/// Encoded length of an APPLY body.
pub(super) fn apply_len(m: &Apply) -> usize {
    opt_len(m.w, 1)
        + opt_len(m.dw, 1)
        + opt_len(m.timeout_ms, 4)
        + bucket_key_len(&m.bucket, &m.key)
        + 1 // crdt
        + opt_len(m.op_id, 8)
        + 1 // return_value
        + 2 // op_count
        + m.ops.iter().map(op_len).sum::<usize>()
}

/// Writes an APPLY body checked by [`check_apply`]. The quorum fields lead, bucket and key
/// follow, as in every other request on a key.
pub(super) fn write_apply<B: BufMut>(w: &mut Writer<'_, B>, m: &Apply) {
    w.opt_u8(m.w);
    w.opt_u8(m.dw);
    w.opt_u32(m.timeout_ms);
    w.prefixed(LenWidth::U8, &m.bucket);
    w.prefixed(LenWidth::U16, &m.key);
    w.u8(m.crdt as u8);
    w.flag(m.op_id.is_some());
    if let Some(id) = m.op_id {
        w.u64(id);
    }
    w.flag(m.return_value);
    // Checked against CRDT_OPS_MAX, which fits a u16 (compile-time assert above).
    w.u16(m.ops.len() as u16);
    for op in &m.ops {
        write_op(w, op);
    }
}

/// Reads an APPLY body.
pub(super) fn read_apply(r: &mut Reader<'_>, limits: &Limits) -> Result<Apply, BodyError> {
    let w = r.opt(F_W, Reader::u8)?;
    let dw = r.opt(F_DW, Reader::u8)?;
    let timeout_ms = r.opt(F_TIMEOUT_MS, Reader::u32)?;
    let (bucket, key) = read_bucket_key(r, limits)?;
    let tag = r.u8(F_CRDT)?;
    let crdt = CrdtType::from_u8(tag).ok_or(BodyError::BadValue {
        field: F_CRDT,
        value: u64::from(tag),
    })?;
    let op_id = r.opt(F_OP_ID, Reader::u64)?;
    let return_value = r.flag(F_RETURN_VALUE)?;
    let count = usize::from(r.u16(F_OPS)?);
    if count == 0 || count > CRDT_OPS_MAX {
        return Err(BodyError::BadValue {
            field: F_OPS,
            value: count as u64,
        });
    }
    let mut ops = Vec::with_capacity(bounded_count(r, F_OPS, count, OP_BYTES_MIN)?);
    for _ in 0..count {
        ops.push(read_op(r)?);
    }
    Ok(Apply {
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
}

/// Checks an APPLY_OK's value.
pub(super) fn check_apply_ok(m: &ApplyOk) -> Result<(), EncodeError> {
    m.value.as_ref().map_or(Ok(()), check_value)
}

/// Encoded length of an APPLY_OK body.
pub(super) fn apply_ok_len(m: &ApplyOk) -> usize {
    1 + m.value.as_ref().map_or(0, value_len)
}

/// Writes an APPLY_OK body: an option tag, then the value if present.
pub(super) fn write_apply_ok<B: BufMut>(w: &mut Writer<'_, B>, m: &ApplyOk) {
    w.flag(m.value.is_some());
    if let Some(v) = &m.value {
        write_value(w, v);
    }
}

/// Reads an APPLY_OK body.
pub(super) fn read_apply_ok(r: &mut Reader<'_>) -> Result<ApplyOk, BodyError> {
    Ok(ApplyOk {
        value: r.opt(F_CRDT_VALUE, |r, _| read_value(r))?,
    })
}

fn check_op(op: &CrdtOp) -> Result<(), EncodeError> {
    match op {
        CrdtOp::Increment(_) | CrdtOp::Expire(_) => Ok(()),
        CrdtOp::Add(e) | CrdtOp::Remove(e) => check_element(e),
        CrdtOp::Field { name, op } => {
            check_len(F_FIELD, LenWidth::U16, name.len(), FIELD_BYTES_MAX)?;
            match op {
                FieldOp::Assign(v) => {
                    check_len(F_REGISTER, LenWidth::U32, v.len(), VALUE_BYTES_MAX)
                }
                FieldOp::Add(e) | FieldOp::Remove(e) => check_element(e),
                FieldOp::Increment(_) | FieldOp::Enable | FieldOp::Disable => Ok(()),
            }
        }
        CrdtOp::RemoveField(name) => check_len(F_FIELD, LenWidth::U16, name.len(), FIELD_BYTES_MAX),
    }
}

fn check_element(e: &[u8]) -> Result<(), EncodeError> {
    check_len(F_ELEMENT, LenWidth::U32, e.len(), VALUE_BYTES_MAX)
}

fn op_len(op: &CrdtOp) -> usize {
    use LenWidth::{U16, U32};
    1 + match op {
        CrdtOp::Increment(_) => 8,
        CrdtOp::Add(e) | CrdtOp::Remove(e) => prefixed_len(U32, e.len()),
        CrdtOp::Field { name, op } => {
            prefixed_len(U16, name.len())
                + 1
                + match op {
                    FieldOp::Assign(b) | FieldOp::Add(b) | FieldOp::Remove(b) => {
                        prefixed_len(U32, b.len())
                    }
                    FieldOp::Increment(_) => 8,
                    FieldOp::Enable | FieldOp::Disable => 0,
                }
        }
        CrdtOp::RemoveField(name) => prefixed_len(U16, name.len()),
        CrdtOp::Expire(e) => super::Expiry::encoded_len(Some(*e)),
    }
}

fn write_op<B: BufMut>(w: &mut Writer<'_, B>, op: &CrdtOp) {
    use LenWidth::{U16, U32};
    match op {
        CrdtOp::Increment(by) => {
            w.u8(OP_INCREMENT);
            w.u64(*by as u64);
        }
        CrdtOp::Add(e) => {
            w.u8(OP_ADD);
            w.prefixed(U32, e);
        }
        CrdtOp::Remove(e) => {
            w.u8(OP_REMOVE);
            w.prefixed(U32, e);
        }
        CrdtOp::Field { name, op } => {
            w.u8(OP_FIELD);
            w.prefixed(U16, name);
            match op {
                FieldOp::Assign(v) => {
                    w.u8(FIELD_ASSIGN);
                    w.prefixed(U32, v);
                }
                FieldOp::Increment(by) => {
                    w.u8(FIELD_INCREMENT);
                    w.u64(*by as u64);
                }
                FieldOp::Add(e) => {
                    w.u8(FIELD_ADD);
                    w.prefixed(U32, e);
                }
                FieldOp::Remove(e) => {
                    w.u8(FIELD_REMOVE);
                    w.prefixed(U32, e);
                }
                FieldOp::Enable => w.u8(FIELD_ENABLE),
                FieldOp::Disable => w.u8(FIELD_DISABLE),
            }
        }
        CrdtOp::RemoveField(name) => {
            w.u8(OP_REMOVE_FIELD);
            w.prefixed(U16, name);
        }
        CrdtOp::Expire(e) => {
            w.u8(OP_EXPIRE);
            write_expiry(w, *e);
        }
    }
}

fn read_op(r: &mut Reader<'_>) -> Result<CrdtOp, BodyError> {
    use LenWidth::{U16, U32};
    Ok(match r.u8(F_OP)? {
        OP_INCREMENT => CrdtOp::Increment(r.u64(F_INCREMENT)? as i64),
        OP_ADD => CrdtOp::Add(r.bytes(F_ELEMENT, U32, VALUE_BYTES_MAX)?),
        OP_REMOVE => CrdtOp::Remove(r.bytes(F_ELEMENT, U32, VALUE_BYTES_MAX)?),
        OP_FIELD => {
            let name = r.bytes(F_FIELD, U16, FIELD_BYTES_MAX)?;
            let op = match r.u8(F_FIELD_OP)? {
                FIELD_ASSIGN => FieldOp::Assign(r.bytes(F_REGISTER, U32, VALUE_BYTES_MAX)?),
                FIELD_INCREMENT => FieldOp::Increment(r.u64(F_INCREMENT)? as i64),
                FIELD_ADD => FieldOp::Add(r.bytes(F_ELEMENT, U32, VALUE_BYTES_MAX)?),
                FIELD_REMOVE => FieldOp::Remove(r.bytes(F_ELEMENT, U32, VALUE_BYTES_MAX)?),
                FIELD_ENABLE => FieldOp::Enable,
                FIELD_DISABLE => FieldOp::Disable,
                value => {
                    return Err(BodyError::BadValue {
                        field: F_FIELD_OP,
                        value: u64::from(value),
                    });
                }
            };
            CrdtOp::Field { name, op }
        }
        OP_REMOVE_FIELD => CrdtOp::RemoveField(r.bytes(F_FIELD, U16, FIELD_BYTES_MAX)?),
        OP_EXPIRE => CrdtOp::Expire(read_expiry(r)?),
        value => {
            return Err(BodyError::BadValue {
                field: F_OP,
                value: u64::from(value),
            });
        }
    })
}

/// Checks a value: every element and field within its limit, sets and maps in strictly
/// increasing order (what the decoder requires).
pub(super) fn check_value(v: &CrdtValue) -> Result<(), EncodeError> {
    match v {
        CrdtValue::Counter(_) => Ok(()),
        CrdtValue::Set(elements) => check_elements(elements),
        CrdtValue::Map(fields) => {
            if !fields.windows(2).all(|pair| pair[0].0 < pair[1].0) {
                return Err(EncodeError::InvalidField {
                    field: F_FIELDS,
                    reason: "map fields must be in strictly increasing name order",
                });
            }
            for (name, value) in fields {
                check_len(F_FIELD, LenWidth::U16, name.len(), FIELD_BYTES_MAX)?;
                match value {
                    FieldValue::Register(v) => {
                        check_len(F_REGISTER, LenWidth::U32, v.len(), VALUE_BYTES_MAX)?
                    }
                    FieldValue::Set(elements) => check_elements(elements)?,
                    FieldValue::Counter(_) | FieldValue::Flag => {}
                }
            }
            Ok(())
        }
    }
}

fn check_elements(elements: &[Bytes]) -> Result<(), EncodeError> {
    if !elements.windows(2).all(|pair| pair[0] < pair[1]) {
        return Err(EncodeError::InvalidField {
            field: F_ELEMENTS,
            reason: "set elements must be in strictly increasing byte order",
        });
    }
    elements.iter().try_for_each(|e| check_element(e))
}

/// Encoded length of a value.
pub(super) fn value_len(v: &CrdtValue) -> usize {
    1 + match v {
        CrdtValue::Counter(_) => 8,
        CrdtValue::Set(elements) => elements_len(elements),
        CrdtValue::Map(fields) => {
            4 + fields
                .iter()
                .map(|(name, value)| {
                    prefixed_len(LenWidth::U16, name.len())
                        + 1
                        + match value {
                            FieldValue::Register(v) => prefixed_len(LenWidth::U32, v.len()),
                            FieldValue::Counter(_) => 8,
                            FieldValue::Set(elements) => elements_len(elements),
                            FieldValue::Flag => 0,
                        }
                })
                .sum::<usize>()
        }
    }
}

fn elements_len(elements: &[Bytes]) -> usize {
    4 + elements
        .iter()
        .map(|e| prefixed_len(LenWidth::U32, e.len()))
        .sum::<usize>()
}

/// Writes a value checked by [`check_value`].
pub(super) fn write_value<B: BufMut>(w: &mut Writer<'_, B>, v: &CrdtValue) {
    match v {
        CrdtValue::Counter(n) => {
            w.u8(VALUE_COUNTER);
            w.u64(*n as u64);
        }
        CrdtValue::Set(elements) => {
            w.u8(VALUE_SET);
            write_elements(w, elements);
        }
        CrdtValue::Map(fields) => {
            w.u8(VALUE_MAP);
            // The frame was checked against frame_bytes_max before writing, and every field takes
            // at least 3 bytes, so the count is far below 2^32.
            w.u32(fields.len() as u32);
            for (name, value) in fields {
                w.prefixed(LenWidth::U16, name);
                match value {
                    FieldValue::Register(v) => {
                        w.u8(FIELD_VALUE_REGISTER);
                        w.prefixed(LenWidth::U32, v);
                    }
                    FieldValue::Counter(n) => {
                        w.u8(FIELD_VALUE_COUNTER);
                        w.u64(*n as u64);
                    }
                    FieldValue::Set(elements) => {
                        w.u8(FIELD_VALUE_SET);
                        write_elements(w, elements);
                    }
                    FieldValue::Flag => w.u8(FIELD_VALUE_FLAG),
                }
            }
        }
    }
}

fn write_elements<B: BufMut>(w: &mut Writer<'_, B>, elements: &[Bytes]) {
    // Bounded by the frame, as a map's field count is.
    w.u32(elements.len() as u32);
    for e in elements {
        w.prefixed(LenWidth::U32, e);
    }
}

/// Reads a value, refusing sets and maps out of strictly increasing order.
pub(super) fn read_value(r: &mut Reader<'_>) -> Result<CrdtValue, BodyError> {
    Ok(match r.u8(F_CRDT_VALUE)? {
        VALUE_COUNTER => CrdtValue::Counter(r.u64(F_COUNTER)? as i64),
        VALUE_SET => CrdtValue::Set(read_elements(r)?),
        VALUE_MAP => {
            let count = r.u32(F_FIELDS)? as usize;
            let mut fields: Vec<(Bytes, FieldValue)> =
                Vec::with_capacity(bounded_count(r, F_FIELDS, count, FIELD_VALUE_BYTES_MIN)?);
            for index in 0..count {
                let name = r.prefixed(F_FIELD, LenWidth::U16, FIELD_BYTES_MAX)?;
                if fields.last().is_some_and(|(last, _)| &last[..] >= name) {
                    return Err(BodyError::BadValue {
                        field: F_FIELD,
                        value: index as u64,
                    });
                }
                let name = Bytes::copy_from_slice(name);
                let value = match r.u8(F_FIELD_VALUE)? {
                    FIELD_VALUE_REGISTER => {
                        FieldValue::Register(r.bytes(F_REGISTER, LenWidth::U32, VALUE_BYTES_MAX)?)
                    }
                    FIELD_VALUE_COUNTER => FieldValue::Counter(r.u64(F_COUNTER)? as i64),
                    FIELD_VALUE_SET => FieldValue::Set(read_elements(r)?),
                    FIELD_VALUE_FLAG => FieldValue::Flag,
                    value => {
                        return Err(BodyError::BadValue {
                            field: F_FIELD_VALUE,
                            value: u64::from(value),
                        });
                    }
                };
                fields.push((name, value));
            }
            CrdtValue::Map(fields)
        }
        value => {
            return Err(BodyError::BadValue {
                field: F_CRDT_VALUE,
                value: u64::from(value),
            });
        }
    })
}

/// Reads a set's elements; an element not strictly after the one before it is refused as a bad
/// `element` whose value is its index.
fn read_elements(r: &mut Reader<'_>) -> Result<Vec<Bytes>, BodyError> {
    let count = r.u32(F_ELEMENTS)? as usize;
    let mut elements: Vec<Bytes> =
        Vec::with_capacity(bounded_count(r, F_ELEMENTS, count, ELEMENT_BYTES_MIN)?);
    for index in 0..count {
        let e = r.prefixed(F_ELEMENT, LenWidth::U32, VALUE_BYTES_MAX)?;
        if elements.last().is_some_and(|last| &last[..] >= e) {
            return Err(BodyError::BadValue {
                field: F_ELEMENT,
                value: index as u64,
            });
        }
        elements.push(Bytes::copy_from_slice(e));
    }
    Ok(elements)
}

/// `count` if the rest of the body can hold that many entries of at least `entry_bytes_min`
/// bytes each; a truncation error otherwise, before anything is allocated for them.
fn bounded_count(
    r: &Reader<'_>,
    field: &'static str,
    count: usize,
    entry_bytes_min: usize,
) -> Result<usize, BodyError> {
    if count > r.remaining() / entry_bytes_min {
        return Err(BodyError::Truncated {
            field,
            need: count as u64 * entry_bytes_min as u64,
            remaining: r.remaining(),
        });
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every type's byte decodes back to it, and no other byte decodes.
    #[test]
    fn type_bytes_round_trip() {
        for crdt in [CrdtType::Counter, CrdtType::Set, CrdtType::Map] {
            assert_eq!(CrdtType::from_u8(crdt as u8), Some(crdt));
        }
        let known = (0..=u8::MAX).filter(|b| CrdtType::from_u8(*b).is_some());
        assert_eq!(known.count(), 3);
    }
}
