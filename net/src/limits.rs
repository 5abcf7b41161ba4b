//! Size limits of the framed protocol: named constants and the configurable [`Limits`].
//!
//! Every length that arrives from the network is compared with one of these numbers before a
//! single byte is allocated for it. Limits that shape the wire format itself (a bucket name has a
//! one-byte length, so it cannot exceed 255 bytes) are constants every implementation agrees on;
//! the two limits an operator may reasonably tune, the frame size and the key size, live in
//! [`Limits`] so a node can match them to its engine configuration.
//!
//! This module owns numbers only; the codec in `frame.rs` and `message.rs` enforces them.

use thiserror::Error;

/// Size of the fixed frame header in bytes.
pub const HEADER_BYTES: usize = 20;

/// Default largest frame (header and body): a 16 MiB value plus generous room for the rest of a PUT.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 17 << 20;
/// Largest `frame_bytes_max` any configuration may choose.
///
/// The body length is a `u32`, so the format could carry 4 GiB; a connection buffers a whole frame
/// before decoding it, and 64 MiB per connection is already more memory than a node should risk.
pub const FRAME_BYTES_MAX_HARD: usize = 64 << 20;
/// Smallest `frame_bytes_max` any configuration may choose: every non-value field at its maximum
/// must still fit, or a legal request could become unsendable.
pub const FRAME_BYTES_MIN: usize = 64 << 10;

/// Default largest key, as in the engine's default configuration.
pub const KEY_BYTES_MAX_DEFAULT: usize = 1024;
/// Largest `key_bytes_max` any configuration may choose (the engine's hard key limit).
pub const KEY_BYTES_MAX_HARD: usize = 4096;

/// Largest value in a PUT: the engine's hard value limit. A node enforces its own, usually
/// smaller, configured value limit with a request-level `too_large` error.
pub const VALUE_BYTES_MAX: usize = 16 << 20;
/// Largest bucket name (one-byte length on the wire).
pub const BUCKET_BYTES_MAX: usize = 255;
/// Largest cluster or node name (one-byte length on the wire).
pub const NAME_BYTES_MAX: usize = 255;
/// Largest causal context. Contexts are dotted version vectors whose actors are server nodes, so
/// they grow with the number of nodes that ever coordinated a write of the key (tens of bytes
/// each), not with the number of clients; 16 KiB leaves room for hundreds of such nodes.
pub const CONTEXT_BYTES_MAX: usize = 16 << 10;
/// Most siblings in one GET reply. Siblings only accumulate through truly concurrent writes, so a
/// key with more than this is a client that writes without reading; the node answers
/// `too_many_siblings` instead of growing the object forever.
pub const SIBLINGS_MAX: usize = 64;
/// Largest message of an ERROR frame (two-byte length on the wire); longer messages are cut at a
/// character boundary by [`crate::ErrorBody::new`].
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;

/// Worst-case bytes of a PUT frame apart from its value: header, option tags and values, the
/// bucket, the longest key any configuration allows and the largest context, with their lengths.
pub const PUT_OVERHEAD_BYTES_MAX: usize = HEADER_BYTES
    + 2 * 2 // w, dw
    + 1 + 4 // timeout_ms
    + 1 + BUCKET_BYTES_MAX
    + 2 + KEY_BYTES_MAX_HARD
    + 1 + 4 + CONTEXT_BYTES_MAX
    + 4; // value length

// A full-size value must fit in a default frame with every other field at its maximum.
const _: () = assert!(FRAME_BYTES_MAX_DEFAULT >= VALUE_BYTES_MAX + PUT_OVERHEAD_BYTES_MAX);
const _: () = assert!(FRAME_BYTES_MAX_DEFAULT <= FRAME_BYTES_MAX_HARD);
const _: () = assert!(FRAME_BYTES_MIN <= FRAME_BYTES_MAX_DEFAULT);
// Every non-value part of any message fits in the smallest frame (PUT is the largest of them; a
// GET reply with SIBLINGS_MAX empty siblings is far smaller).
const _: () = assert!(FRAME_BYTES_MIN >= PUT_OVERHEAD_BYTES_MAX);
const _: () = assert!(FRAME_BYTES_MIN >= HEADER_BYTES + 4 + ERROR_MESSAGE_BYTES_MAX);
// The body length field is a u32.
const _: () = assert!(FRAME_BYTES_MAX_HARD - HEADER_BYTES <= u32::MAX as usize);
// Length prefixes: names and buckets use one byte, keys and error messages two, blobs four.
const _: () = assert!(BUCKET_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(NAME_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(KEY_BYTES_MAX_HARD <= u16::MAX as usize);
const _: () = assert!(ERROR_MESSAGE_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(SIBLINGS_MAX <= u16::MAX as usize);
const _: () = assert!(KEY_BYTES_MAX_DEFAULT <= KEY_BYTES_MAX_HARD);

/// The configurable limits of one endpoint of a connection.
///
/// A node decodes with its configured limits; a client should use the same numbers as the nodes it
/// talks to, or [`Limits::default`], which matches a node with default settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Largest frame, header included, that is encoded or accepted. Default 17 MiB.
    pub frame_bytes_max: usize,
    /// Largest key accepted in a request. Default 1 KiB, at most [`KEY_BYTES_MAX_HARD`].
    pub key_bytes_max: usize,
}

impl Limits {
    /// The defaults: 17 MiB frames and 1 KiB keys.
    pub const DEFAULT: Self = Self {
        frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
        key_bytes_max: KEY_BYTES_MAX_DEFAULT,
    };

    /// Checks every limit against its hard bounds.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if !(FRAME_BYTES_MIN..=FRAME_BYTES_MAX_HARD).contains(&self.frame_bytes_max) {
            return Err(LimitsError::FrameBytesMax {
                value: self.frame_bytes_max,
            });
        }
        if self.key_bytes_max > KEY_BYTES_MAX_HARD {
            return Err(LimitsError::KeyBytesMax {
                value: self.key_bytes_max,
            });
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A [`Limits`] value outside its hard bounds.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum LimitsError {
    /// `frame_bytes_max` outside [`FRAME_BYTES_MIN`]..=[`FRAME_BYTES_MAX_HARD`].
    #[error(
        "frame_bytes_max of {value} bytes is outside {FRAME_BYTES_MIN}..={FRAME_BYTES_MAX_HARD}"
    )]
    FrameBytesMax {
        /// The rejected value.
        value: usize,
    },
    /// `key_bytes_max` above [`KEY_BYTES_MAX_HARD`].
    #[error("key_bytes_max of {value} bytes exceeds the hard limit of {KEY_BYTES_MAX_HARD}")]
    KeyBytesMax {
        /// The rejected value.
        value: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults are valid and the bounds are enforced on both sides.
    #[test]
    fn validate_bounds() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let with = |frame_bytes_max, key_bytes_max| Limits {
            frame_bytes_max,
            key_bytes_max,
        };
        assert!(with(FRAME_BYTES_MIN - 1, 1024).validate().is_err());
        assert!(with(FRAME_BYTES_MAX_HARD + 1, 1024).validate().is_err());
        assert!(
            with(FRAME_BYTES_MAX_HARD, KEY_BYTES_MAX_HARD + 1)
                .validate()
                .is_err()
        );
        assert_eq!(with(FRAME_BYTES_MIN, 0).validate(), Ok(()));
        assert_eq!(
            with(FRAME_BYTES_MAX_HARD, KEY_BYTES_MAX_HARD).validate(),
            Ok(())
        );
    }
}
