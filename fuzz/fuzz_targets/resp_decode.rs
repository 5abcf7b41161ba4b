//! Fuzz target: the RESP2 command parser and reply parser.
//!
//! Parses the input as a stream of pipelined commands and, separately, of replies. Checks that
//! neither parser panics or loops, that each accepted message re-parses identically from exactly
//! the bytes it used, that error replies encode, and that replies re-encode to something that
//! parses back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_net::resp::{RespLimits, decode_command, decode_reply, encode_reply};

fuzz_target!(|data: &[u8]| {
    // Small limits as well as the defaults, so every limit is reachable by the fuzzer.
    for limits in [
        RespLimits::DEFAULT,
        RespLimits {
            message_bytes_max: 256,
            bulk_bytes_max: 64,
            args_max: 8,
            inline_bytes_max: 64,
        },
    ] {
        let mut buf = data;
        loop {
            match decode_command(buf, &limits) {
                Ok(None) => break,
                Ok(Some((cmd, used))) => {
                    assert!(used > 0 && used <= buf.len());
                    let (again, used_again) = decode_command(&buf[..used], &limits)
                        .expect("a parsed command re-parses")
                        .expect("a parsed command is complete");
                    assert_eq!((again, used_again), (cmd, used));
                    buf = &buf[used..];
                }
                Err(e) => {
                    let mut out = Vec::new();
                    encode_reply(&e.reply(), &mut out);
                    break;
                }
            }
        }

        let mut buf = data;
        while let Ok(Some((value, used))) = decode_reply(buf, &limits) {
            assert!(used > 0 && used <= buf.len());
            let mut out = Vec::new();
            encode_reply(&value, &mut out);
            // Parsing is strict (no lone CR in a line, integers as Redis writes them), so every
            // accepted reply has exactly one encoding.
            assert_eq!(out, &buf[..used]);
            buf = &buf[used..];
        }
    }
});
