//! Fuzz target: the framed protocol decoder.
//!
//! Feeds the input as a stream of pipelined frames, as a connection would: decode, drop the used
//! bytes, repeat; skip a frame of unknown kind; stop at the first fatal error. Checks that the
//! decoder never panics, that everything it accepts is canonical (re-encoding gives back exactly
//! the bytes consumed), that every error has an ERROR frame that encodes, and that a frame's
//! prefixes only ever mean "need more bytes".
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_net::{Limits, decode_frame, encode_frame_to_vec};

fuzz_target!(|data: &[u8]| {
    // A small frame limit as well as the default, so the size checks are reachable by the fuzzer.
    for limits in [
        Limits::DEFAULT,
        Limits {
            frame_bytes_max: ringkv_net::limits::FRAME_BYTES_MIN,
            key_bytes_max: 16,
        },
    ] {
        let mut buf = data;
        loop {
            match decode_frame(buf, &limits) {
                Ok(None) => break,
                Ok(Some((frame, used))) => {
                    let again =
                        encode_frame_to_vec(&frame, &limits).expect("decoded frames encode");
                    assert_eq!(again, &buf[..used], "decoding is not canonical: {frame:?}");
                    for n in [0, 1, 4, 5, 19, 20, used / 2, used - 1] {
                        if n < used {
                            assert_eq!(decode_frame(&buf[..n], &limits), Ok(None));
                        }
                    }
                    buf = &buf[used..];
                }
                Err(e) => {
                    let reply = e.error_frame();
                    let bytes = encode_frame_to_vec(&reply, &limits).expect("error frames encode");
                    let (back, _) = decode_frame(&bytes, &limits)
                        .expect("error frames decode")
                        .expect("error frames are complete");
                    assert_eq!(back, reply);
                    match e.skip_len() {
                        Some(skip) => buf = &buf[skip..],
                        None => break,
                    }
                }
            }
        }
    }
});
