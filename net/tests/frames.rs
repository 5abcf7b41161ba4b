//! Property and edge-case tests of the framed codec.
//!
//! Round trips show that every message encodes and decodes to itself; prefix and pipelining tests
//! show that the incremental decoder is exact about where frames begin and end; arbitrary-input
//! tests (random bytes, random bodies under a valid header, mutated valid frames) show that the
//! decoder never panics and that whatever it accepts is canonical: re-encoding a decoded frame
//! reproduces the input bytes exactly. Edge cases pin the error for each limit and the header
//! layout documented in docs/PROTOCOL.md.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use ringkv_net::limits::{
    CONTEXT_BYTES_MAX, FRAME_BYTES_MIN, HEADER_BYTES, KEY_BYTES_MAX_DEFAULT, SIBLINGS_MAX,
    VALUE_BYTES_MAX,
};
use ringkv_net::{
    BodyError, EncodeError, ErrorCode, Frame, FrameError, Get, GetOk, HelloOk, Kind, Limits, MAGIC,
    Message, PROTOCOL_VERSION, Put, Sibling, decode_frame, decode_header, encode_frame,
    encode_frame_to_vec,
};

const L: Limits = Limits::DEFAULT;

fn encode(frame: &Frame) -> Vec<u8> {
    encode_frame_to_vec(frame, &L).unwrap()
}

fn header(kind: u8, flags: u16, body_len: u32, request_id: u64) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.push(PROTOCOL_VERSION);
    h.push(kind);
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&body_len.to_le_bytes());
    h.extend_from_slice(&request_id.to_le_bytes());
    assert_eq!(h.len(), HEADER_BYTES);
    h
}

/// Whatever the decoder makes of `buf` must not panic, and anything it accepts must re-encode to
/// the bytes it consumed; any error must produce an ERROR frame that itself encodes and decodes.
fn check_decode_is_canonical(buf: &[u8]) {
    match decode_frame(buf, &L) {
        Ok(None) => {}
        Ok(Some((frame, used))) => {
            assert!(used >= HEADER_BYTES && used <= buf.len());
            assert_eq!(encode(&frame), &buf[..used], "decoded {frame:?}");
        }
        Err(e) => {
            let reply = e.error_frame();
            assert_eq!(reply.request_id, e.request_id());
            let bytes = encode(&reply);
            let (back, _) = decode_frame(&bytes, &L).unwrap().unwrap();
            assert_eq!(back, reply);
            if let Some(skip) = e.skip_len() {
                assert!(matches!(e, FrameError::UnknownKind { .. }));
                assert!(skip <= buf.len());
            }
        }
    }
}

fn known_kind_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => proptest::sample::select(Kind::ALL.to_vec()).prop_map(|k| k as u8),
        1 => any::<u8>(),
    ]
}

proptest! {
    /// Encoding then decoding any message gives it back, using exactly the encoded bytes, and the
    /// announced body length matches.
    #[test]
    fn round_trip(frame in common::frame()) {
        let bytes = encode(&frame);
        prop_assert_eq!(bytes.len(), HEADER_BYTES + frame.message.body_len());
        let (back, used) = decode_frame(&bytes, &L).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, frame);
        // BytesMut works as a sink just like Vec.
        let mut bm = BytesMut::new();
        encode_frame(&frame_clone(&bytes), &L, &mut bm).unwrap();
        prop_assert_eq!(&bm[..], &bytes[..]);
    }

    /// Every strict prefix of a frame means "need more bytes"; the header is reported as soon as
    /// it is complete.
    #[test]
    fn prefixes_need_more(frame in common::frame()) {
        let bytes = encode(&frame);
        for n in 0..bytes.len() {
            prop_assert_eq!(decode_frame(&bytes[..n], &L), Ok(None), "prefix {}", n);
            let h = decode_header(&bytes[..n], &L).unwrap();
            prop_assert_eq!(h.is_some(), n >= HEADER_BYTES);
        }
    }

    /// Frames sent back to back and received in arbitrary chunks decode one by one, in order,
    /// with nothing left over.
    #[test]
    fn pipelined_in_chunks(
        frames in proptest::collection::vec(common::frame(), 1..8),
        chunks in proptest::collection::vec(1usize..512, 1..64),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            encode_frame(f, &L, &mut stream).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut sent = 0;
        let mut chunk = chunks.iter().cycle();
        while sent < stream.len() {
            let n = (*chunk.next().unwrap()).min(stream.len() - sent);
            buf.extend_from_slice(&stream[sent..sent + n]);
            sent += n;
            while let Some((f, used)) = decode_frame(&buf, &L).unwrap() {
                got.push(f);
                let _ = buf.split_to(used);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    /// Random bytes never panic the decoder (they almost always fail the magic check at once).
    #[test]
    fn arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_decode_is_canonical(&buf);
    }

    /// Random bodies under a valid header reach every body decoder: no panic, and whatever is
    /// accepted is canonical.
    #[test]
    fn arbitrary_bodies(
        kind in known_kind_byte(),
        request_id in 1..=u64::MAX,
        body in proptest::collection::vec(
            prop_oneof![3 => 0u8..=2, 1 => any::<u8>()], 0..128),
    ) {
        let mut buf = header(kind, 0, body.len() as u32, request_id);
        buf.extend_from_slice(&body);
        check_decode_is_canonical(&buf);
        match decode_frame(&buf, &L) {
            Err(FrameError::UnknownKind { kind: k, frame_bytes, .. }) => {
                prop_assert_eq!(k, kind);
                prop_assert!(Kind::from_u8(kind).is_none());
                prop_assert_eq!(frame_bytes, buf.len());
            }
            Err(FrameError::Body { request_id: id, kind: k, .. }) => {
                prop_assert_eq!(id, request_id);
                prop_assert_eq!(k as u8, kind);
            }
            Ok(Some(_)) => {}
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    /// Valid frames with bytes flipped, removed or inserted never panic the decoder.
    #[test]
    fn mutated_frames(
        frame in common::frame(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut bytes = encode(&frame);
        for (at, byte, op) in edits {
            let i = at.index(bytes.len() + 1);
            match op {
                0 if i < bytes.len() => bytes[i] = byte,
                1 if i < bytes.len() => { bytes.remove(i); }
                _ => bytes.insert(i, byte),
            }
        }
        check_decode_is_canonical(&bytes);
    }
}

/// Re-decodes a frame from bytes (used to exercise a second encoder sink with an owned frame).
fn frame_clone(bytes: &[u8]) -> Frame {
    decode_frame(bytes, &L).unwrap().unwrap().0
}

/// The header is laid out byte for byte as docs/PROTOCOL.md says.
#[test]
fn header_layout_is_as_documented() {
    let f = Frame {
        request_id: 0x0102_0304_0506_0708,
        message: Message::Ping,
    };
    assert_eq!(
        encode(&f),
        [
            0xC1, 0x52, 0x4B, 0x56, // magic "\xC1RKV"
            0x01, // version
            0x02, // kind PING
            0x00, 0x00, // flags
            0x00, 0x00, 0x00, 0x00, // body_len
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // request_id
        ]
    );
    let g = Frame {
        request_id: 7,
        message: Message::Get(Get {
            bucket: Bytes::from_static(b"b"),
            key: Bytes::from_static(b"key"),
            r: Some(2),
            timeout_ms: None,
        }),
    };
    let bytes = encode(&g);
    assert_eq!(bytes[5], 0x10);
    assert_eq!(
        &bytes[HEADER_BYTES..],
        [1, 2, 0, 1, b'b', 3, 0, b'k', b'e', b'y'],
        "r=Some(2), timeout_ms=None, bucket, key"
    );
}

/// Another protocol is rejected from its first byte, and another version from byte 5, without
/// waiting for a full header.
#[test]
fn wrong_protocol_fails_fast() {
    assert_eq!(decode_header(b"*", &L), Err(FrameError::BadMagic));
    assert_eq!(
        decode_header(b"GET / HTTP/1.1", &L),
        Err(FrameError::BadMagic)
    );
    assert_eq!(
        decode_header(&[0x16, 0x03, 0x01], &L),
        Err(FrameError::BadMagic)
    );
    assert_eq!(decode_header(&[0xC1, b'R'], &L), Ok(None));
    assert_eq!(
        decode_header(&[0xC1, b'R', b'K', b'V', 2], &L),
        Err(FrameError::UnsupportedVersion { version: 2 })
    );
    let e = decode_frame(b"*1\r\n$4\r\nPING\r\n", &L).unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadFrame);
    assert_eq!(e.request_id(), 0);
    assert_eq!(e.skip_len(), None);
}

/// A header announcing 4 GiB is refused from the header alone: nothing is buffered or allocated.
#[test]
fn oversized_frame_is_refused_from_its_header() {
    let h = header(Kind::Put as u8, 0, u32::MAX, 9);
    let e = decode_frame(&h, &L).unwrap_err();
    assert_eq!(
        e,
        FrameError::TooLarge {
            request_id: 9,
            frame_bytes: HEADER_BYTES as u64 + u64::from(u32::MAX),
            max: L.frame_bytes_max
        }
    );
    assert_eq!(e.code(), ErrorCode::TooLarge);
    assert_eq!(e.error_frame().request_id, 9);
    // Exactly at the limit is fine (the decoder waits for the body).
    let at_limit = header(
        Kind::Put as u8,
        0,
        (L.frame_bytes_max - HEADER_BYTES) as u32,
        9,
    );
    assert_eq!(decode_frame(&at_limit, &L), Ok(None));
    let over = header(
        Kind::Put as u8,
        0,
        (L.frame_bytes_max - HEADER_BYTES + 1) as u32,
        9,
    );
    assert!(matches!(
        decode_frame(&over, &L),
        Err(FrameError::TooLarge { .. })
    ));
}

/// Declared lengths inside a body are checked against their limits and against the body before
/// anything is copied; each error names its field.
#[test]
fn body_lengths_are_checked() {
    // GET_OK claiming 65535 siblings in a 6-byte body.
    let mut f = header(Kind::GetOk as u8, 0, 6, 1);
    f.extend_from_slice(&[0xFF, 0xFF, 0, 0, 0, 0]);
    let e = decode_frame(&f, &L).unwrap_err();
    assert!(matches!(
        e,
        FrameError::Body {
            error: BodyError::TooLarge {
                field: "siblings",
                len: 65535,
                ..
            },
            ..
        }
    ));
    assert_eq!(e.code(), ErrorCode::TooLarge);
    // Within the sibling limit but more than the body holds.
    let mut f = header(Kind::GetOk as u8, 0, 6, 1);
    f.extend_from_slice(&[SIBLINGS_MAX as u8, 0, 0, 0, 0, 0]);
    assert!(matches!(
        decode_frame(&f, &L),
        Err(FrameError::Body {
            error: BodyError::Truncated {
                field: "siblings",
                ..
            },
            ..
        })
    ));
    // A PUT whose value claims 4 GiB.
    let mut body = vec![0, 0, 0, 0, 0]; // w, dw, timeout_ms absent; empty bucket
    body.extend_from_slice(&[0, 0, 0]); // empty key, no context
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut f = header(Kind::Put as u8, 0, body.len() as u32, 3);
    f.extend_from_slice(&body);
    let e = decode_frame(&f, &L).unwrap_err();
    assert!(matches!(
        e,
        FrameError::Body {
            request_id: 3,
            kind: Kind::Put,
            error: BodyError::TooLarge { field: "value", .. }
        }
    ));
    assert!(e.to_string().contains("value"), "{e}");
    // A key over the configured key limit.
    let mut body = vec![0, 0, 0]; // r and timeout_ms absent, empty bucket
    body.extend_from_slice(&((KEY_BYTES_MAX_DEFAULT + 1) as u16).to_le_bytes());
    body.extend_from_slice(&vec![b'k'; KEY_BYTES_MAX_DEFAULT + 1]);
    let mut f = header(Kind::Get as u8, 0, body.len() as u32, 3);
    f.extend_from_slice(&body);
    assert!(matches!(
        decode_frame(&f, &L),
        Err(FrameError::Body {
            error: BodyError::TooLarge { field: "key", .. },
            ..
        })
    ));
    // Trailing bytes after a PING.
    let mut f = header(Kind::Ping as u8, 0, 1, 3);
    f.push(0);
    assert!(matches!(
        decode_frame(&f, &L),
        Err(FrameError::Body {
            error: BodyError::TrailingBytes { extra: 1 },
            ..
        })
    ));
    // HELLO_OK with a shard index outside the node.
    let mut f = header(Kind::HelloOk as u8, 0, 6, 3);
    f.extend_from_slice(&[1, 2, 0, 2, 0, 0]);
    assert!(matches!(
        decode_frame(&f, &L),
        Err(FrameError::Body {
            error: BodyError::BadValue {
                field: "shard",
                value: 2
            },
            ..
        })
    ));
}

/// An unknown kind in a valid frame is survivable: the error says how many bytes to skip, and
/// the next frame decodes after them.
#[test]
fn unknown_kind_is_skippable() {
    let mut buf = header(0x3F, 0, 3, 11);
    buf.extend_from_slice(b"abc");
    let ping = encode(&Frame {
        request_id: 12,
        message: Message::Ping,
    });
    buf.extend_from_slice(&ping);
    // Not reported until the whole unknown frame is buffered, so it can be skipped in one go.
    assert_eq!(decode_frame(&buf[..HEADER_BYTES + 2], &L), Ok(None));
    let e = decode_frame(&buf, &L).unwrap_err();
    assert_eq!(e.code(), ErrorCode::UnknownKind);
    assert_eq!(e.request_id(), 11);
    let skip = e.skip_len().unwrap();
    assert_eq!(skip, HEADER_BYTES + 3);
    let (f, used) = decode_frame(&buf[skip..], &L).unwrap().unwrap();
    assert_eq!(f.request_id, 12);
    assert_eq!(used, ping.len());
}

/// Request id 0 belongs to connection-level ERROR frames; header flags are all reserved.
#[test]
fn reserved_header_values() {
    assert_eq!(
        decode_frame(&header(Kind::Ping as u8, 0, 0, 0), &L),
        Err(FrameError::ReservedRequestId {
            kind: Kind::Ping as u8
        })
    );
    assert_eq!(
        decode_frame(&header(Kind::Ping as u8, 1, 0, 5), &L),
        Err(FrameError::UnknownFlags {
            request_id: 5,
            flags: 1
        })
    );
    let e = Frame {
        request_id: 0,
        message: Message::Ping,
    };
    assert_eq!(
        encode_frame_to_vec(&e, &L),
        Err(EncodeError::ReservedRequestId)
    );
}

/// The encoder refuses what the decoder would reject, and writes nothing when it does.
#[test]
fn encoder_enforces_limits() {
    let put = |key: usize, value: usize, context: usize| Frame {
        request_id: 1,
        message: Message::Put(Put {
            bucket: Bytes::from_static(b"b"),
            key: Bytes::from(vec![0; key]),
            value: Bytes::from(vec![0; value]),
            context: Some(Bytes::from(vec![0; context])),
            w: None,
            dw: None,
            timeout_ms: None,
            expiry: None,
            condition: None,
        }),
    };
    let mut out = Vec::new();
    assert_eq!(
        encode_frame(&put(KEY_BYTES_MAX_DEFAULT + 1, 0, 0), &L, &mut out),
        Err(EncodeError::FieldTooLarge {
            field: "key",
            len: KEY_BYTES_MAX_DEFAULT + 1,
            max: KEY_BYTES_MAX_DEFAULT
        })
    );
    assert!(matches!(
        encode_frame(&put(1, 0, CONTEXT_BYTES_MAX + 1), &L, &mut out),
        Err(EncodeError::FieldTooLarge {
            field: "context",
            ..
        })
    ));
    let small = Limits {
        frame_bytes_max: FRAME_BYTES_MIN,
        ..L
    };
    assert!(matches!(
        encode_frame(&put(1, FRAME_BYTES_MIN, 0), &small, &mut out),
        Err(EncodeError::FrameTooLarge { .. })
    ));
    let hello_ok = Frame {
        request_id: 1,
        message: Message::HelloOk(HelloOk {
            protocol_version: 1,
            node_name: "n".into(),
            shard_count: 4,
            shard: 4,
        }),
    };
    assert!(matches!(
        encode_frame(&hello_ok, &L, &mut out),
        Err(EncodeError::InvalidField { field: "shard", .. })
    ));
    let too_many = Frame {
        request_id: 1,
        message: Message::GetOk(GetOk {
            siblings: vec![Sibling::Tombstone; SIBLINGS_MAX + 1],
            context: Bytes::new(),
            expires_at_ms: None,
            fields: None,
            crdt: None,
        }),
    };
    assert!(matches!(
        encode_frame(&too_many, &L, &mut out),
        Err(EncodeError::FieldTooLarge {
            field: "siblings",
            ..
        })
    ));
    assert!(out.is_empty());
}

/// The largest value a PUT may carry, with every other field at its maximum, fits the default
/// frame and survives the round trip.
#[test]
fn largest_put_fits_default_frame() {
    let f = Frame {
        request_id: u64::MAX,
        message: Message::Put(Put {
            bucket: Bytes::from(vec![b'b'; 255]),
            key: Bytes::from(vec![b'k'; KEY_BYTES_MAX_DEFAULT]),
            value: Bytes::from(vec![7u8; VALUE_BYTES_MAX]),
            context: Some(Bytes::from(vec![1u8; CONTEXT_BYTES_MAX])),
            w: Some(3),
            dw: Some(3),
            timeout_ms: Some(u32::MAX),
            expiry: None,
            condition: None,
        }),
    };
    let bytes = encode(&f);
    assert!(bytes.len() <= L.frame_bytes_max);
    let (back, used) = decode_frame(&bytes, &L).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(back, f);
}
