//! The frame header and the incremental frame decoder and encoder.
//!
//! Every frame is a fixed 20-byte header followed by a body whose length the header announces:
//!
//! ```text
//! offset size field
//!  0     4    magic       C1 52 4B 56 ("\xC1RKV"); 0xC1 never occurs in UTF-8 text
//!  4     1    version     PROTOCOL_VERSION
//!  5     1    kind        message kind (see `message.rs`)
//!  6     2    flags       u16; version 1 defines none, so it must be 0
//!  8     4    body_len    u32; header + body <= frame_bytes_max
//! 12     8    request_id  u64; 0 only on ERROR frames about the whole connection
//! 20     ..   body
//! ```
//!
//! All integers are little-endian. The decoder is incremental and stateless: give it everything
//! received so far and it answers "need more bytes", a frame and how many bytes it used, or an
//! error. It validates the header as soon as the bytes are there, the magic and version even
//! before the header is complete, so a client speaking another protocol is rejected after its
//! first bytes. The body is decoded only once it is entirely buffered and only after the header
//! passed, so no declared length is trusted before it has been checked against
//! [`Limits::frame_bytes_max`]; the caller's buffer never needs to grow beyond that limit.
//!
//! No IO, no async, no runtime: the glommio node, a tokio client and a blocking client share this
//! code and differ only in how they move bytes.

use bytes::BufMut;

use crate::error::{EncodeError, FrameError};
use crate::limits::{HEADER_BYTES, Limits};
use crate::message::{Frame, Kind, Message};
use crate::wire::Writer;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = [0xC1, b'R', b'K', b'V'];
/// The protocol version this build speaks (header byte 4 and HELLO's `protocol_version`).
pub const PROTOCOL_VERSION: u8 = 1;
/// Header flags this version defines (none): any set bit is rejected, so a future flag can never
/// be silently ignored by an old receiver.
pub const FLAGS_KNOWN: u16 = 0;

const OFFSET_VERSION: usize = 4;
const OFFSET_KIND: usize = 5;
const OFFSET_FLAGS: usize = 6;
const OFFSET_BODY_LEN: usize = 8;
const OFFSET_REQUEST_ID: usize = 12;

// The field table above, checked: fields are contiguous and fill the header exactly.
const _: () = assert!(OFFSET_VERSION == MAGIC.len());
const _: () = assert!(OFFSET_KIND == OFFSET_VERSION + 1);
const _: () = assert!(OFFSET_FLAGS == OFFSET_KIND + 1);
const _: () = assert!(OFFSET_BODY_LEN == OFFSET_FLAGS + 2);
const _: () = assert!(OFFSET_REQUEST_ID == OFFSET_BODY_LEN + 4);
const _: () = assert!(HEADER_BYTES == OFFSET_REQUEST_ID + 8);
// 0xC1 is never valid in UTF-8 and is not a TLS record type, so text protocols (RESP, HTTP) and
// TLS are told apart from the first byte.
const _: () = assert!(MAGIC[0] == 0xC1);

/// A validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// The raw kind byte (it may be a kind this build does not know).
    pub kind: u8,
    /// Header flags (always [`FLAGS_KNOWN`]-compatible once validated).
    pub flags: u16,
    /// Length of the body in bytes.
    pub body_len: u32,
    /// Request id.
    pub request_id: u64,
}

impl FrameHeader {
    /// Length of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        // body_len <= frame_bytes_max - HEADER_BYTES was checked, so this cannot overflow.
        HEADER_BYTES + self.body_len as usize
    }
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Validates the header at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds less than a header and nothing seen so far is wrong. A
/// caller may use [`FrameHeader::frame_len`] to reserve exactly the bytes the frame needs. The
/// kind is not checked here: an unknown kind is only reported by [`decode_frame`], once the whole
/// frame is buffered and can be skipped.
pub fn decode_header(buf: &[u8], limits: &Limits) -> Result<Option<FrameHeader>, FrameError> {
    // Reject wrong magic or version from the first bytes that show it.
    let magic_seen = buf.len().min(MAGIC.len());
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        return Err(FrameError::BadMagic);
    }
    if let Some(&version) = buf.get(OFFSET_VERSION)
        && version != PROTOCOL_VERSION
    {
        return Err(FrameError::UnsupportedVersion { version });
    }
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let kind = buf[OFFSET_KIND];
    let flags = read_u16(buf, OFFSET_FLAGS);
    let body_len = read_u32(buf, OFFSET_BODY_LEN);
    let request_id = read_u64(buf, OFFSET_REQUEST_ID);
    let frame_bytes = HEADER_BYTES as u64 + u64::from(body_len);
    if frame_bytes > limits.frame_bytes_max as u64 {
        return Err(FrameError::TooLarge {
            request_id,
            frame_bytes,
            max: limits.frame_bytes_max,
        });
    }
    if flags & !FLAGS_KNOWN != 0 {
        return Err(FrameError::UnknownFlags { request_id, flags });
    }
    if request_id == 0 && kind != Kind::Error as u8 {
        return Err(FrameError::ReservedRequestId { kind });
    }
    Ok(Some(FrameHeader {
        kind,
        flags,
        body_len,
        request_id,
    }))
}

/// Decodes the frame at the start of `buf`.
///
/// Returns `Ok(None)` if more bytes are needed, or the frame and the number of bytes it used
/// (the caller drops them and calls again for the next pipelined frame). On `Err`, see
/// [`FrameError::skip_len`] for whether the connection can continue.
pub fn decode_frame(buf: &[u8], limits: &Limits) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(header) = decode_header(buf, limits)? else {
        return Ok(None);
    };
    let frame_len = header.frame_len();
    assert!(frame_len <= limits.frame_bytes_max);
    if buf.len() < frame_len {
        return Ok(None);
    }
    let Some(kind) = Kind::from_u8(header.kind) else {
        return Err(FrameError::UnknownKind {
            request_id: header.request_id,
            kind: header.kind,
            frame_bytes: frame_len,
        });
    };
    let body = &buf[HEADER_BYTES..frame_len];
    let message = Message::read(kind, body, limits).map_err(|error| FrameError::Body {
        request_id: header.request_id,
        kind,
        error,
    })?;
    debug_assert_eq!(message.kind(), kind);
    debug_assert_eq!(message.body_len(), body.len());
    Ok(Some((
        Frame {
            request_id: header.request_id,
            message,
        },
        frame_len,
    )))
}

/// Appends one encoded frame to `out` (a `Vec<u8>`, a `BytesMut`, ...) and returns its length.
///
/// Fails, writing nothing, if the message breaks a limit the receiver enforces, or if the request
/// id is 0 on anything but an ERROR frame.
pub fn encode_frame<B: BufMut>(
    frame: &Frame,
    limits: &Limits,
    out: &mut B,
) -> Result<usize, EncodeError> {
    let kind = frame.message.kind();
    if frame.request_id == 0 && kind != Kind::Error {
        return Err(EncodeError::ReservedRequestId);
    }
    frame.message.check(limits)?;
    let body_len = frame.message.body_len();
    let frame_len = HEADER_BYTES + body_len;
    if frame_len > limits.frame_bytes_max {
        return Err(EncodeError::FrameTooLarge {
            len: frame_len,
            max: limits.frame_bytes_max,
        });
    }
    // frame_bytes_max <= FRAME_BYTES_MAX_HARD, whose body fits a u32 (compile-time assert).
    let body_len_u32 = u32::try_from(body_len).map_err(|_| EncodeError::FrameTooLarge {
        len: frame_len,
        max: limits.frame_bytes_max,
    })?;
    let mut w = Writer::new(out);
    w.raw(&MAGIC);
    w.u8(PROTOCOL_VERSION);
    w.u8(kind as u8);
    w.u16(FLAGS_KNOWN);
    w.u32(body_len_u32);
    w.u64(frame.request_id);
    assert_eq!(w.written(), HEADER_BYTES);
    frame.message.write(&mut w);
    // The header announced body_len; a mismatch would desynchronise the stream for good.
    assert_eq!(
        w.written(),
        frame_len,
        "{kind} body length differs from body_len()"
    );
    Ok(frame_len)
}

/// Encodes one frame into a new vector, sized exactly.
pub fn encode_frame_to_vec(frame: &Frame, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(HEADER_BYTES + frame.message.body_len());
    encode_frame(frame, limits, &mut out)?;
    Ok(out)
}
