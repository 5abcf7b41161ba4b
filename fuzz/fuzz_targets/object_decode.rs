//! Fuzz target: the stored-object decoder (`ringkv_core::object::Object::decode`).
//!
//! A replica's stored bytes, or an object a peer sends. Checks that the decoder never panics,
//! that whatever it accepts is canonical (re-encoding gives back exactly the input, so two
//! replicas holding equal objects hold equal bytes and equal digests), and that the accepted
//! object keeps the laws the replicas rely on: merging it with itself changes nothing, and its
//! digest and liveness can be computed.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ringkv_core::object::Object;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(object) = Object::decode(&bytes) {
        assert_eq!(object.encode(), data, "decoding is not canonical: {object:?}");
        assert_eq!(object.encoded_len(), data.len());
        let _ = (object.digest(), object.dead_from());
        assert_eq!(
            object.clone().merge(object.clone()),
            object,
            "merge is not idempotent"
        );
    }
});
