//! Edge cases of the codec of convergent data types: APPLY, APPLY_OK and GET_OK's `crdt`
//! extension.
//!
//! The round trips, prefixes and mutations of these messages run with every other kind in
//! `frames.rs` (the strategies in `common` generate them); this file pins what is particular to
//! them: the byte layout docs/PROTOCOL.md §5.4.2 gives, the tags and counts the decoder refuses,
//! the canonical order of set elements and map fields it enforces, and the encoder refusing
//! whatever the decoder would refuse.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use ringkv_net::limits::HEADER_BYTES;
use ringkv_net::{
    Apply, ApplyOk, BodyError, CRDT_OPS_MAX, CrdtOp, CrdtType, CrdtValue, EncodeError, Expiry,
    FieldOp, FieldValue, Frame, FrameError, GetOk, Kind, Limits, MAGIC, Message, PROTOCOL_VERSION,
    Sibling, decode_frame, encode_frame_to_vec,
};

const L: Limits = Limits::DEFAULT;

fn b(s: &'static [u8]) -> Bytes {
    Bytes::from_static(s)
}

fn frame(message: Message) -> Frame {
    Frame {
        request_id: 1,
        message,
    }
}

/// The body of `message`, encoded.
fn body(message: Message) -> Vec<u8> {
    encode_frame_to_vec(&frame(message), &L).unwrap()[HEADER_BYTES..].to_vec()
}

/// `body` under a valid header of `kind`.
fn frame_bytes(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.push(PROTOCOL_VERSION);
    f.push(kind as u8);
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&1u64.to_le_bytes());
    f.extend_from_slice(body);
    f
}

/// Decodes `body` under a valid header of `kind`, expecting the body to be refused.
fn body_error(kind: Kind, body: &[u8]) -> BodyError {
    match decode_frame(&frame_bytes(kind, body), &L) {
        Err(FrameError::Body { error, .. }) => error,
        other => panic!("{kind} body {body:02x?} decoded as {other:?}"),
    }
}

fn bad(field: &'static str, value: u64) -> BodyError {
    BodyError::BadValue { field, value }
}

/// The encoder's refusal of `message`, which must be an invalid `field`.
fn refused_as_invalid(message: Message, field: &str) {
    match encode_frame_to_vec(&frame(message), &L) {
        Err(EncodeError::InvalidField { field: f, .. }) if f == field => {}
        other => panic!("expected `{field}` to be refused as invalid, got {other:?}"),
    }
}

fn apply(crdt: CrdtType, ops: Vec<CrdtOp>) -> Apply {
    Apply {
        bucket: b(b"b"),
        key: b(b"k"),
        crdt,
        ops,
        op_id: None,
        return_value: false,
        w: None,
        dw: None,
        timeout_ms: None,
    }
}

/// An APPLY's leading fields with nothing optional: no quorums or deadline, an empty bucket and
/// key. The type, op id, return flag, count and ops follow.
const APPLY_HEAD: [u8; 6] = [0, 0, 0, 0, 0, 0];

/// APPLY and APPLY_OK are laid out byte for byte as docs/PROTOCOL.md §5.4.2 says.
#[test]
fn layout_is_as_documented() {
    let request = Apply {
        op_id: Some(7),
        return_value: true,
        w: Some(2),
        timeout_ms: Some(500),
        ..apply(
            CrdtType::Map,
            vec![
                CrdtOp::Increment(-2),
                CrdtOp::Field {
                    name: b(b"f"),
                    op: FieldOp::Assign(b(b"v")),
                },
                CrdtOp::Expire(Expiry::Ttl { ms: 1000 }),
            ],
        )
    };
    let expected: Vec<u8> = [
        &[1, 2][..],                                          // w = Some(2)
        &[0],                                                 // dw absent
        &[1, 0xF4, 1, 0, 0],                                  // timeout_ms = Some(500)
        &[1, b'b'],                                           // bucket
        &[1, 0, b'k'],                                        // key
        &[3],                                                 // crdt: map
        &[1, 7, 0, 0, 0, 0, 0, 0, 0],                         // op_id = Some(7)
        &[1],                                                 // return_value
        &[3, 0],                                              // op_count
        &[1, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], // increment -2
        &[4, 1, 0, b'f', 1, 1, 0, 0, 0, b'v'],                // field "f": assign "v"
        &[6, 1, 0xE8, 3, 0, 0, 0, 0, 0, 0],                   // expire: TTL 1000 ms
    ]
    .concat();
    assert_eq!(body(Message::Apply(request)), expected);

    let value = CrdtValue::Map(vec![
        (b(b"c"), FieldValue::Counter(5)),
        (b(b"f"), FieldValue::Flag),
        (b(b"r"), FieldValue::Register(b(b"v"))),
        (b(b"s"), FieldValue::Set(vec![b(b"x")])),
    ]);
    let expected: Vec<u8> = [
        &[1][..],                                       // a value follows
        &[3, 4, 0, 0, 0],                               // map of 4 fields
        &[1, 0, b'c', 2, 5, 0, 0, 0, 0, 0, 0, 0],       // "c": counter 5
        &[1, 0, b'f', 4],                               // "f": flag
        &[1, 0, b'r', 1, 1, 0, 0, 0, b'v'],             // "r": register "v"
        &[1, 0, b's', 3, 1, 0, 0, 0, 1, 0, 0, 0, b'x'], // "s": set {"x"}
    ]
    .concat();
    assert_eq!(
        body(Message::ApplyOk(ApplyOk { value: Some(value) })),
        expected
    );
    assert_eq!(body(Message::ApplyOk(ApplyOk { value: None })), [0]);
    assert_eq!(
        body(Message::ApplyOk(ApplyOk {
            value: Some(CrdtValue::Set(vec![b(b"a"), b(b"b")]))
        })),
        [1, 2, 2, 0, 0, 0, 1, 0, 0, 0, b'a', 1, 0, 0, 0, b'b']
    );

    // GET_OK's crdt extension (tag 3) after the expiry (tag 1).
    let read = GetOk {
        siblings: Vec::new(),
        context: Bytes::new(),
        expires_at_ms: Some(1),
        fields: None,
        crdt: Some(CrdtValue::Counter(-1)),
    };
    assert_eq!(
        body(Message::GetOk(read)),
        [
            &[0, 0][..],                                             // no siblings
            &[0, 0, 0, 0],                                           // empty context
            &[1, 1, 0, 0, 0, 0, 0, 0, 0],                            // expires_at_ms
            &[3, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], // crdt: counter -1
        ]
        .concat()
    );
}

/// Tags outside their tables, and an op count of zero or over the limit, are refused and name
/// their field.
#[test]
fn bad_tags_and_counts_are_refused() {
    let ops = |crdt: u8, tail: &[u8]| [&APPLY_HEAD[..], &[crdt, 0, 0], tail].concat();
    let increment = [1, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    for crdt in [0, 4, 0xFF] {
        assert_eq!(
            body_error(Kind::Apply, &ops(crdt, &increment)),
            bad("crdt", u64::from(crdt))
        );
    }
    // An op takes at least two bytes, so a one-byte body for one op is truncated before its
    // tag is looked at.
    assert!(matches!(
        body_error(Kind::Apply, &ops(1, &[1, 0, 7])),
        BodyError::Truncated { field: "ops", .. }
    ));
    assert_eq!(
        body_error(Kind::Apply, &ops(1, &[1, 0, 7, 0])),
        bad("op", 7)
    );
    assert_eq!(
        body_error(Kind::Apply, &ops(3, &[1, 0, 4, 1, 0, b'f', 9])),
        bad("field_op", 9)
    );
    assert_eq!(body_error(Kind::Apply, &ops(1, &[0, 0])), bad("ops", 0));
    let over = (CRDT_OPS_MAX as u16 + 1).to_le_bytes();
    assert_eq!(
        body_error(Kind::Apply, &ops(1, &over)),
        bad("ops", CRDT_OPS_MAX as u64 + 1)
    );
    // The expiry of an expire op is checked like PUT's.
    assert_eq!(
        body_error(Kind::Apply, &ops(1, &[1, 0, 6, 4])),
        bad("expiry", 4)
    );
    // Flags are exactly 0 or 1.
    let mut two = ops(1, &increment);
    two[APPLY_HEAD.len() + 2] = 2;
    assert_eq!(body_error(Kind::Apply, &two), bad("return_value", 2));

    assert_eq!(body_error(Kind::ApplyOk, &[2]), bad("crdt_value", 2));
    assert_eq!(body_error(Kind::ApplyOk, &[1, 9]), bad("crdt_value", 9));
    assert_eq!(
        body_error(Kind::ApplyOk, &[1, 3, 1, 0, 0, 0, 1, 0, b'a', 9]),
        bad("field_value", 9)
    );
    assert!(matches!(
        body_error(Kind::ApplyOk, &[1, 1, 0, 0]),
        BodyError::Truncated {
            field: "counter",
            ..
        }
    ));
}

/// A set's elements and a map's fields must be in strictly increasing byte order: out of
/// order, or repeated, the decoder refuses them, naming the index of the first offender.
#[test]
fn non_canonical_values_are_refused() {
    let set = |elements: &[&[u8]]| {
        let mut v = vec![1, 2];
        v.extend_from_slice(&(elements.len() as u32).to_le_bytes());
        for e in elements {
            v.extend_from_slice(&(e.len() as u32).to_le_bytes());
            v.extend_from_slice(e);
        }
        v
    };
    assert!(
        decode_frame(
            &frame_bytes(Kind::ApplyOk, &set(&[b"", b"a", b"ab", b"b"])),
            &L
        )
        .is_ok()
    );
    assert_eq!(
        body_error(Kind::ApplyOk, &set(&[b"a", b"c", b"b"])),
        bad("element", 2)
    );
    assert_eq!(
        body_error(Kind::ApplyOk, &set(&[b"a", b"a"])),
        bad("element", 1)
    );
    assert_eq!(
        body_error(Kind::ApplyOk, &set(&[b"ab", b"a"])),
        bad("element", 1)
    );
    // Map fields by name, and a set inside a map like any set.
    let flags = [&[1, 3, 2, 0, 0, 0][..], &[1, 0, b'b', 4], &[1, 0, b'a', 4]].concat();
    assert_eq!(body_error(Kind::ApplyOk, &flags), bad("field", 1));
    let same = [&[1, 3, 2, 0, 0, 0][..], &[1, 0, b'a', 4], &[1, 0, b'a', 4]].concat();
    assert_eq!(body_error(Kind::ApplyOk, &same), bad("field", 1));
    let nested = [
        &[1, 3, 1, 0, 0, 0][..],
        &[1, 0, b's', 3, 2, 0, 0, 0],
        &[1, 0, 0, 0, b'y', 1, 0, 0, 0, b'x'],
    ]
    .concat();
    assert_eq!(body_error(Kind::ApplyOk, &nested), bad("element", 1));
}

/// Counts larger than the rest of the body can hold are refused before anything is allocated
/// for them, as the truncation of their own field.
#[test]
fn counts_larger_than_the_input_are_refused() {
    let max = u32::MAX.to_le_bytes();
    let set = [&[1, 2][..], &max].concat();
    assert!(matches!(
        body_error(Kind::ApplyOk, &set),
        BodyError::Truncated {
            field: "elements",
            ..
        }
    ));
    let map = [&[1, 3][..], &max].concat();
    assert!(matches!(
        body_error(Kind::ApplyOk, &map),
        BodyError::Truncated {
            field: "fields",
            ..
        }
    ));
    let nested = [&[1, 3, 1, 0, 0, 0, 1, 0, b's', 3][..], &max].concat();
    assert!(matches!(
        body_error(Kind::ApplyOk, &nested),
        BodyError::Truncated {
            field: "elements",
            ..
        }
    ));
    // Two elements declared, room for one.
    let short = [&[1, 2, 2, 0, 0, 0][..], &[0, 0, 0, 0]].concat();
    assert!(matches!(
        body_error(Kind::ApplyOk, &short),
        BodyError::Truncated {
            field: "elements",
            ..
        }
    ));
    let ops = [
        &APPLY_HEAD[..],
        &[1, 0, 0],
        &(CRDT_OPS_MAX as u16).to_le_bytes(),
    ]
    .concat();
    assert!(matches!(
        body_error(Kind::Apply, &ops),
        BodyError::Truncated { field: "ops", .. }
    ));
    // An element over the value limit is too large, not truncated: the peer is wrong about
    // the limits.
    let huge = [&[1, 2, 1, 0, 0, 0][..], &max].concat();
    assert!(matches!(
        body_error(Kind::ApplyOk, &huge),
        BodyError::TooLarge {
            field: "element",
            ..
        }
    ));
}

/// A convergent value in GET_OK stands alone: no siblings and no map fields beside it, and its
/// extension comes after the others, like every extension in tag order.
#[test]
fn get_ok_crdt_extension_is_checked() {
    let counter = [3, 1, 5, 0, 0, 0, 0, 0, 0, 0];
    let with_sibling = [&[1, 0, 0][..], &[0, 0, 0, 0], &counter].concat();
    assert_eq!(body_error(Kind::GetOk, &with_sibling), bad("crdt", 1));
    let with_fields = [&[0, 0][..], &[0, 0, 0, 0], &[2, 0, 0, 0, 0], &counter].concat();
    assert_eq!(body_error(Kind::GetOk, &with_fields), bad("crdt", 2));
    let reordered = [&[0, 0][..], &[0, 0, 0, 0], &counter, &[2, 0, 0, 0, 0]].concat();
    assert_eq!(body_error(Kind::GetOk, &reordered), bad("extension", 2));
    let twice = [&[0, 0][..], &[0, 0, 0, 0], &counter, &counter].concat();
    assert_eq!(body_error(Kind::GetOk, &twice), bad("extension", 3));
    let alone = [&[0, 0][..], &[0, 0, 0, 0], &counter].concat();
    match decode_frame(&frame_bytes(Kind::GetOk, &alone), &L) {
        Ok(Some((f, _))) => match f.message {
            Message::GetOk(ok) => assert_eq!(ok.crdt, Some(CrdtValue::Counter(5))),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

/// The encoder refuses what the decoder would refuse, so a sender never writes a frame that
/// closes its connection.
#[test]
fn encoder_refuses_what_the_decoder_refuses() {
    refused_as_invalid(Message::Apply(apply(CrdtType::Counter, Vec::new())), "ops");
    let too_many = vec![CrdtOp::Increment(1); CRDT_OPS_MAX + 1];
    refused_as_invalid(Message::Apply(apply(CrdtType::Counter, too_many)), "ops");
    let most = Message::Apply(apply(
        CrdtType::Counter,
        vec![CrdtOp::Increment(1); CRDT_OPS_MAX],
    ));
    let bytes = encode_frame_to_vec(&frame(most.clone()), &L).unwrap();
    assert_eq!(decode_frame(&bytes, &L).unwrap().unwrap().0.message, most);

    let value = |value| Message::ApplyOk(ApplyOk { value: Some(value) });
    for set in [vec![b(b"b"), b(b"a")], vec![b(b"a"), b(b"a")]] {
        refused_as_invalid(value(CrdtValue::Set(set.clone())), "elements");
        let nested = vec![(b(b"s"), FieldValue::Set(set))];
        refused_as_invalid(value(CrdtValue::Map(nested)), "elements");
    }
    let fields = vec![(b(b"b"), FieldValue::Flag), (b(b"a"), FieldValue::Flag)];
    refused_as_invalid(value(CrdtValue::Map(fields)), "fields");

    let read = |siblings, fields| {
        Message::GetOk(GetOk {
            siblings,
            context: Bytes::new(),
            expires_at_ms: None,
            fields,
            crdt: Some(CrdtValue::Counter(1)),
        })
    };
    refused_as_invalid(read(vec![Sibling::Tombstone], None), "crdt");
    refused_as_invalid(read(Vec::new(), Some(Vec::new())), "crdt");

    let long = Bytes::from(vec![b'f'; usize::from(u16::MAX) + 1]);
    let remove = Message::Apply(apply(CrdtType::Map, vec![CrdtOp::RemoveField(long)]));
    assert!(matches!(
        encode_frame_to_vec(&frame(remove), &L),
        Err(EncodeError::FieldTooLarge { field: "field", .. })
    ));
}
