//! Fuzz target: the causal context decoder (`ringkv_core::dvv::VersionVector::decode`), which
//! reads the opaque context every client sends back with a write.
//!
//! Checks that the decoder never panics and that whatever it accepts is canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_core::dvv::VersionVector;

fuzz_target!(|data: &[u8]| {
    if let Ok(context) = VersionVector::decode(data) {
        assert_eq!(context.encode(), data, "decoding is not canonical: {context:?}");
    }
});
