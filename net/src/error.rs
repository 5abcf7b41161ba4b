//! Typed errors of the framed codec: what went wrong, in which frame, field and limit.
//!
//! [`FrameError`] is what a receiver gets from [`crate::decode_frame`]. Each error knows the
//! [`ErrorCode`] to send back, the request it concerns (when the header got far enough to say),
//! and whether the connection can go on ([`FrameError::skip_len`]). Only an unknown message kind
//! in an otherwise valid frame is survivable: the frame's extent is known and its content is
//! merely not understood. Every other error means the peer is broken or speaks another protocol,
//! and the byte stream can no longer be trusted, so the receiver answers with
//! [`FrameError::error_frame`] and closes the connection.
//!
//! [`EncodeError`] is what a sender gets when asked to encode a message that the receiving side
//! would reject; the encoder refuses instead of producing a frame that closes the connection.

use thiserror::Error;

use crate::message::{ErrorBody, ErrorCode, Frame, Kind, Message};

/// A frame that cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The first bytes are not the frame magic: the peer speaks another protocol.
    #[error("not a ringkv frame (bad magic)")]
    BadMagic,
    /// The frame's protocol version is not one this build speaks.
    #[error(
        "unsupported protocol version {version} (this build speaks {})",
        crate::PROTOCOL_VERSION
    )]
    UnsupportedVersion {
        /// The version byte received.
        version: u8,
    },
    /// The header sets flags this version does not define.
    #[error("request {request_id}: unknown header flags {flags:#06x}")]
    UnknownFlags {
        /// Request id from the header.
        request_id: u64,
        /// The flags received.
        flags: u16,
    },
    /// The header announces a frame longer than `frame_bytes_max`.
    #[error("request {request_id}: frame of {frame_bytes} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Request id from the header.
        request_id: u64,
        /// Header plus announced body length.
        frame_bytes: u64,
        /// The receiver's `frame_bytes_max`.
        max: usize,
    },
    /// Request id 0 is reserved for errors about the connection as a whole.
    #[error("request id 0 is reserved (frame kind {kind:#04x})")]
    ReservedRequestId {
        /// The kind byte of the offending frame.
        kind: u8,
    },
    /// A well-formed frame of a kind this build does not know. The connection may continue after
    /// answering `unknown_kind` and skipping [`FrameError::skip_len`] bytes.
    #[error("request {request_id}: unknown message kind {kind:#04x}")]
    UnknownKind {
        /// Request id from the header.
        request_id: u64,
        /// The kind byte received.
        kind: u8,
        /// Length of the whole frame, header included.
        frame_bytes: usize,
    },
    /// The header is valid but the body does not decode as its kind.
    #[error("request {request_id}: malformed {kind} body: {error}")]
    Body {
        /// Request id from the header.
        request_id: u64,
        /// Kind from the header.
        kind: Kind,
        /// What is wrong with the body.
        #[source]
        error: BodyError,
    },
}

impl FrameError {
    /// The error code to send back for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadMagic | Self::UnknownFlags { .. } | Self::ReservedRequestId { .. } => {
                ErrorCode::BadFrame
            }
            Self::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::UnknownKind { .. } => ErrorCode::UnknownKind,
            Self::Body { error, .. } => match error {
                BodyError::TooLarge { .. } => ErrorCode::TooLarge,
                _ => ErrorCode::BadFrame,
            },
        }
    }

    /// The request this error concerns, or 0 when the header was not trustworthy enough to say
    /// (0 is the reserved id of connection-level errors).
    pub fn request_id(&self) -> u64 {
        match self {
            Self::BadMagic | Self::UnsupportedVersion { .. } | Self::ReservedRequestId { .. } => 0,
            Self::UnknownFlags { request_id, .. }
            | Self::TooLarge { request_id, .. }
            | Self::UnknownKind { request_id, .. }
            | Self::Body { request_id, .. } => *request_id,
        }
    }

    /// If the connection can continue, the number of bytes to skip (the whole offending frame,
    /// which is fully buffered when this error is returned). `None` means: send
    /// [`FrameError::error_frame`] and close the connection.
    pub fn skip_len(&self) -> Option<usize> {
        match self {
            Self::UnknownKind { frame_bytes, .. } => Some(*frame_bytes),
            _ => None,
        }
    }

    /// The ERROR frame that answers this error.
    pub fn error_frame(&self) -> Frame {
        Frame {
            request_id: self.request_id(),
            message: Message::Error(ErrorBody::new(self.code(), self.to_string())),
        }
    }
}

/// What is wrong inside a body whose header was valid.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum BodyError {
    /// A length field exceeds the field's limit.
    #[error("field `{field}` of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// The declared length (or count, for sibling lists).
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The body ends inside a field.
    #[error("field `{field}` needs {need} bytes but only {remaining} remain in the body")]
    Truncated {
        /// The field.
        field: &'static str,
        /// Bytes the field needs.
        need: u64,
        /// Bytes left in the body.
        remaining: usize,
    },
    /// A tag, enum or number outside its allowed values.
    #[error("field `{field}` has invalid value {value}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// The value received.
        value: u64,
    },
    /// A string field that is not UTF-8.
    #[error("field `{field}` is not valid UTF-8")]
    BadUtf8 {
        /// The field.
        field: &'static str,
    },
    /// Bytes left over after the last field.
    #[error("{extra} bytes after the last field")]
    TrailingBytes {
        /// Number of extra bytes.
        extra: usize,
    },
}

/// A message that cannot be encoded because the receiver would reject it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// A field is longer than its limit.
    #[error("field `{field}` of {len} bytes exceeds the limit of {max}")]
    FieldTooLarge {
        /// The field.
        field: &'static str,
        /// Its length (or count, for sibling lists).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field holds a value the protocol does not allow.
    #[error("field `{field}` is invalid: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The whole frame would exceed `frame_bytes_max`.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Encoded length, header included.
        len: usize,
        /// The sender's `frame_bytes_max`.
        max: usize,
    },
    /// Request id 0 is reserved for ERROR frames about the connection.
    #[error("request id 0 is reserved for connection-level errors")]
    ReservedRequestId,
}
