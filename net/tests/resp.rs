//! Property tests of the RESP2 codec.
//!
//! Commands encoded as clients send them, and inline commands as people type them, parse back to
//! their arguments; prefixes need more bytes; pipelined commands received in arbitrary chunks come
//! out in order. Replies round-trip through the encoder and the reply parser. Arbitrary input,
//! random and grammar-shaped (so it gets past the first byte), never panics either parser.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use ringkv_net::resp::{
    RESP_REPLY_DEPTH_MAX, RespLimits, RespValue, decode_command, decode_reply, encode_command,
    encode_reply, parse_command,
};

const L: RespLimits = RespLimits::DEFAULT;

fn args_of(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    decode_command(buf, &L)
        .unwrap()
        .map(|(c, n)| (c.args().map(<[u8]>::to_vec).collect(), n))
}

fn arg() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..64)
}

fn command() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(arg(), 1..8)
}

/// Pieces that look like RESP, so random concatenations get deep into both parsers.
fn resp_like() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"*".to_vec()),
        Just(b"$".to_vec()),
        Just(b"+".to_vec()),
        Just(b"-".to_vec()),
        Just(b":".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"'".to_vec()),
        Just(b"\\x4".to_vec()),
        Just(b" ".to_vec()),
        "[0-9]{1,3}".prop_map(String::into_bytes),
        "[a-zA-Z]{0,4}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..4),
    ];
    proptest::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

fn reply_value() -> impl Strategy<Value = RespValue> {
    let line = "[ -~]{0,32}".prop_map(Bytes::from);
    let leaf = prop_oneof![
        line.clone().prop_map(RespValue::Simple),
        line.prop_map(RespValue::Error),
        any::<i64>().prop_map(RespValue::Integer),
        arg().prop_map(|a| RespValue::Bulk(Bytes::from(a))),
        Just(RespValue::Null),
        Just(RespValue::NullArray),
    ];
    leaf.prop_recursive(RESP_REPLY_DEPTH_MAX as u32, 64, 8, |inner| {
        proptest::collection::vec(inner, 0..8).prop_map(RespValue::Array)
    })
}

/// Decoding never panics; whatever is accepted used a non-empty prefix that parses to the same
/// command on its own, and to the same command when parsed in place and given that prefix as
/// shared bytes (what the server does).
fn check_command_decoder(buf: &[u8]) {
    if let Ok(Some((c, used))) = decode_command(buf, &L) {
        assert!(used > 0 && used <= buf.len());
        let (again, used_again) = decode_command(&buf[..used], &L).unwrap().unwrap();
        assert_eq!(again, c);
        assert_eq!(used_again, used);
        let shared = Bytes::copy_from_slice(buf);
        let (parsed, used_in_place) = parse_command(&shared, &L).unwrap().unwrap();
        assert_eq!(used_in_place, used);
        assert_eq!(parsed.with_bytes(shared.slice(..used)), c);
    }
}

/// Decoding never panics; an accepted reply re-encodes to exactly the bytes it used.
fn check_reply_decoder(buf: &[u8]) {
    if let Ok(Some((v, used))) = decode_reply(buf, &L) {
        assert!(used > 0 && used <= buf.len());
        let mut again = Vec::new();
        encode_reply(&v, &mut again);
        assert_eq!(again, &buf[..used], "accepted replies are canonical");
        assert_eq!(decode_reply(&buf[..used], &L).unwrap().unwrap(), (v, used));
    }
}

proptest! {
    /// A command as clients send it parses back to its arguments, and every prefix needs more.
    #[test]
    fn command_round_trip(args in command()) {
        let mut buf = Vec::new();
        encode_command(&args, &mut buf);
        prop_assert_eq!(args_of(&buf), Some((args.clone(), buf.len())));
        let (cmd, _) = decode_command(&buf, &L).unwrap().unwrap();
        prop_assert_eq!(cmd.len(), args.len());
        for (i, a) in args.iter().enumerate() {
            prop_assert_eq!(cmd.arg_bytes(i).unwrap(), Bytes::from(a.clone()));
        }
        for n in 0..buf.len() {
            prop_assert_eq!(decode_command(&buf[..n], &L), Ok(None), "prefix {}", n);
        }
    }

    /// Inline commands: plain words split on whitespace, and any bytes survive double-quoted
    /// `\xHH` escapes.
    #[test]
    fn inline_round_trip(
        words in proptest::collection::vec("[a-zA-Z0-9_:.-]{1,12}", 1..8),
        raw in arg(),
        crlf in any::<bool>(),
    ) {
        let mut line = words.join("  ");
        line.push_str(" \"");
        for b in &raw {
            line.push_str(&format!("\\x{b:02x}"));
        }
        line.push('"');
        line.push_str(if crlf { "\r\n" } else { "\n" });
        let mut expected: Vec<Vec<u8>> = words.iter().map(|w| w.clone().into_bytes()).collect();
        expected.push(raw);
        prop_assert_eq!(args_of(line.as_bytes()), Some((expected, line.len())));
        // Without its final newline the command is incomplete.
        prop_assert_eq!(decode_command(&line.as_bytes()[..line.len() - 1], &L), Ok(None));
    }

    /// Pipelined commands received in arbitrary chunks come out one by one, in order.
    #[test]
    fn pipelined_commands(
        cmds in proptest::collection::vec(command(), 1..8),
        chunks in proptest::collection::vec(1usize..64, 1..16),
    ) {
        let mut stream = Vec::new();
        for c in &cmds {
            encode_command(c, &mut stream);
        }
        stream.extend_from_slice(b"PING\r\n");
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut sent = 0;
        let mut chunk = chunks.iter().cycle();
        while sent < stream.len() {
            let n = (*chunk.next().unwrap()).min(stream.len() - sent);
            buf.extend_from_slice(&stream[sent..sent + n]);
            sent += n;
            while let Some((args, used)) = args_of(&buf) {
                got.push(args);
                let _ = buf.split_to(used);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got.pop(), Some(vec![b"PING".to_vec()]));
        prop_assert_eq!(got, cmds);
    }

    /// Replies encode and parse back to themselves; every prefix needs more.
    #[test]
    fn reply_round_trip(v in reply_value()) {
        let mut buf = Vec::new();
        encode_reply(&v, &mut buf);
        prop_assert_eq!(decode_reply(&buf, &L), Ok(Some((v, buf.len()))));
        for n in 0..buf.len() {
            prop_assert_eq!(decode_reply(&buf[..n], &L), Ok(None), "prefix {}", n);
        }
    }

    /// Random bytes never panic either parser.
    #[test]
    fn arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_command_decoder(&buf);
        check_reply_decoder(&buf);
    }

    /// RESP-shaped garbage never panics either parser.
    #[test]
    fn arbitrary_resp_like(buf in resp_like()) {
        check_command_decoder(&buf);
        check_reply_decoder(&buf);
    }
}

/// Small limits are enforced on commands and replies alike, before the data arrives.
#[test]
fn small_limits() {
    use ringkv_net::resp::RespError;
    let l = RespLimits {
        message_bytes_max: 24,
        bulk_bytes_max: 8,
        args_max: 2,
        inline_bytes_max: 16,
    };
    assert_eq!(l.validate(), Ok(()));
    assert_eq!(
        decode_command(b"*3\r\n", &l),
        Err(RespError::TooManyArgs { count: 3, max: 2 })
    );
    assert_eq!(
        decode_command(b"*1\r\n$9\r\n", &l),
        Err(RespError::BulkTooLarge { len: 9, max: 8 })
    );
    assert_eq!(
        decode_command(b"a b c\r\n", &l),
        Err(RespError::TooManyArgs { count: 3, max: 2 })
    );
    assert_eq!(
        decode_reply(b"*3\r\n", &l),
        Err(RespError::TooManyArgs { count: 3, max: 2 })
    );
    assert_eq!(
        decode_reply(b"+0123456789abcdefgh", &l),
        Err(RespError::InlineTooLong { max: 16 })
    );
    assert_eq!(
        decode_reply(b"*2\r\n$8\r\n01234567\r\n$8\r\n01234567\r\n", &l),
        Err(RespError::MessageTooLarge { max: 24 })
    );
    let reply = RespError::TooManyArgs { count: 3, max: 2 }.reply();
    let mut out = Vec::new();
    encode_reply(&reply, &mut out);
    assert!(out.starts_with(b"-ERR Protocol error: "));
}
