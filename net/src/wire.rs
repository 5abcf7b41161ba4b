//! Bounds-checked primitives shared by every body encoder and decoder.
//!
//! [`Reader`] walks a body that is already fully buffered. Each variable-length field is read as
//! "length prefix, then that many bytes": the length is compared first with the field's limit and
//! then with the bytes left in the body, and only then copied. A declared length can therefore
//! never cause an allocation larger than the input, whatever it says.
//!
//! [`Writer`] counts what it writes so the frame encoder can assert that the body it wrote has
//! exactly the length it announced in the header.
//!
//! All integers are little-endian. Option tags and booleans are exactly 0 or 1: any other value is
//! an error, which keeps the encoding canonical (one byte string per message) and lets the fuzz
//! targets check that decoding then encoding reproduces the input.

use bytes::{BufMut, Bytes};

use crate::error::{BodyError, EncodeError};

/// Width of a length prefix on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LenWidth {
    /// One byte: names and buckets.
    U8,
    /// Two bytes: keys and error messages.
    U16,
    /// Four bytes: values, contexts and opaque objects.
    U32,
}

impl LenWidth {
    /// Bytes the prefix itself occupies.
    pub const fn bytes(self) -> usize {
        match self {
            Self::U8 => 1,
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }

    /// Largest length the prefix can express.
    const fn max(self) -> usize {
        match self {
            Self::U8 => u8::MAX as usize,
            Self::U16 => u16::MAX as usize,
            Self::U32 => u32::MAX as usize,
        }
    }
}

/// Encoded size of a length-prefixed field holding `len` bytes.
pub const fn prefixed_len(width: LenWidth, len: usize) -> usize {
    width.bytes() + len
}

/// Encoded size of an optional length-prefixed field.
pub fn opt_prefixed_len(width: LenWidth, value: Option<&[u8]>) -> usize {
    1 + value.map_or(0, |v| prefixed_len(width, v.len()))
}

/// Checks a field's length against its limit before encoding, mirroring [`Reader::prefixed`].
pub fn check_len(
    field: &'static str,
    width: LenWidth,
    len: usize,
    max: usize,
) -> Result<(), EncodeError> {
    // A limit wider than its prefix would let the encoder write a length it cannot express.
    assert!(
        max <= width.max(),
        "limit of `{field}` exceeds its length prefix"
    );
    if len > max {
        return Err(EncodeError::FieldTooLarge { field, len, max });
    }
    Ok(())
}

/// Reads a fully buffered body.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader at the start of `body`.
    pub fn new(body: &'a [u8]) -> Self {
        Self { rest: body }
    }

    /// Takes `n` bytes, failing without allocating if the body holds fewer.
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], BodyError> {
        if n > self.rest.len() {
            return Err(BodyError::Truncated {
                field,
                need: n as u64,
                remaining: self.rest.len(),
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], BodyError> {
        let bytes = self.take(field, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, BodyError> {
        Ok(self.array::<1>(field)?[0])
    }

    /// The next byte, left unread (a tag that decides how to read what follows).
    pub fn peek_u8(&self, field: &'static str) -> Result<u8, BodyError> {
        self.rest.first().copied().ok_or(BodyError::Truncated {
            field,
            need: 1,
            remaining: 0,
        })
    }

    /// A little-endian u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, BodyError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    /// A little-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, BodyError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// A little-endian u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, BodyError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A boolean or option tag: exactly 0 or 1.
    pub fn flag(&mut self, field: &'static str) -> Result<bool, BodyError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(BodyError::BadValue {
                field,
                value: u64::from(value),
            }),
        }
    }

    /// A length-prefixed byte string of at most `max` bytes, borrowed from the body.
    ///
    /// The limit is checked before the remaining length so an absurd declared length is reported
    /// as "too large" (the peer is wrong about the limits), not as "truncated".
    pub fn prefixed(
        &mut self,
        field: &'static str,
        width: LenWidth,
        max: usize,
    ) -> Result<&'a [u8], BodyError> {
        let len = match width {
            LenWidth::U8 => usize::from(self.u8(field)?),
            LenWidth::U16 => usize::from(self.u16(field)?),
            // u32 always fits in usize on the 32- and 64-bit targets this crate supports.
            LenWidth::U32 => self.u32(field)? as usize,
        };
        if len > max {
            return Err(BodyError::TooLarge {
                field,
                len: len as u64,
                max,
            });
        }
        self.take(field, len)
    }

    /// A length-prefixed byte string, copied out only after both checks passed.
    pub fn bytes(
        &mut self,
        field: &'static str,
        width: LenWidth,
        max: usize,
    ) -> Result<Bytes, BodyError> {
        self.prefixed(field, width, max).map(Bytes::copy_from_slice)
    }

    /// A length-prefixed UTF-8 string.
    pub fn string(
        &mut self,
        field: &'static str,
        width: LenWidth,
        max: usize,
    ) -> Result<String, BodyError> {
        let raw = self.prefixed(field, width, max)?;
        let s = std::str::from_utf8(raw).map_err(|_| BodyError::BadUtf8 { field })?;
        Ok(s.to_owned())
    }

    /// An optional fixed-size value: a tag, then the value if the tag is 1.
    pub fn opt<T>(
        &mut self,
        field: &'static str,
        read: impl FnOnce(&mut Self, &'static str) -> Result<T, BodyError>,
    ) -> Result<Option<T>, BodyError> {
        if self.flag(field)? {
            read(self, field).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Ends the body: trailing bytes are an error so every message has one encoding.
    pub fn finish(self) -> Result<(), BodyError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(BodyError::TrailingBytes {
                extra: self.rest.len(),
            })
        }
    }
}

/// Writes a body whose fields were validated beforehand, counting the bytes written.
pub struct Writer<'a, B: BufMut> {
    out: &'a mut B,
    written: usize,
}

impl<'a, B: BufMut> Writer<'a, B> {
    /// A writer appending to `out`.
    pub fn new(out: &'a mut B) -> Self {
        Self { out, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.written
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.out.put_u8(v);
        self.written += 1;
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) {
        self.out.put_u16_le(v);
        self.written += 2;
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.out.put_u32_le(v);
        self.written += 4;
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) {
        self.out.put_u64_le(v);
        self.written += 8;
    }

    /// Bytes without a prefix.
    pub fn raw(&mut self, v: &[u8]) {
        self.out.put_slice(v);
        self.written += v.len();
    }

    /// A boolean: 0 or 1.
    pub fn flag(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// A length-prefixed byte string. The caller validated the length against the field's limit,
    /// so a length the prefix cannot express is a programming error.
    pub fn prefixed(&mut self, width: LenWidth, v: &[u8]) {
        assert!(
            v.len() <= width.max(),
            "field length checked before encoding"
        );
        // The assert above makes these conversions lossless.
        match width {
            LenWidth::U8 => self.u8(v.len() as u8),
            LenWidth::U16 => self.u16(v.len() as u16),
            LenWidth::U32 => self.u32(v.len() as u32),
        }
        self.raw(v);
    }

    /// An option tag, then the byte string if present.
    pub fn opt_prefixed(&mut self, width: LenWidth, v: Option<&[u8]>) {
        self.flag(v.is_some());
        if let Some(v) = v {
            self.prefixed(width, v);
        }
    }

    /// An option tag, then the byte if present.
    pub fn opt_u8(&mut self, v: Option<u8>) {
        self.flag(v.is_some());
        if let Some(v) = v {
            self.u8(v);
        }
    }

    /// An option tag, then the u32 if present.
    pub fn opt_u32(&mut self, v: Option<u32>) {
        self.flag(v.is_some());
        if let Some(v) = v {
            self.u32(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A declared length far beyond the body is rejected by the limit check before anything is
    /// copied, and one within the limit but beyond the body is reported as truncated.
    #[test]
    fn declared_lengths_are_checked_before_copying() {
        let body = [0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3];
        let mut r = Reader::new(&body);
        assert!(matches!(
            r.bytes("value", LenWidth::U32, 1 << 20),
            Err(BodyError::TooLarge {
                field: "value",
                len: 0xFFFF_FFFF,
                ..
            })
        ));
        let body = [10, 0, 0, 0, 1, 2, 3];
        let mut r = Reader::new(&body);
        assert!(matches!(
            r.bytes("value", LenWidth::U32, 1 << 20),
            Err(BodyError::Truncated {
                field: "value",
                need: 10,
                remaining: 3
            })
        ));
    }

    /// Tags other than 0 and 1 are errors, so each message has a single encoding.
    #[test]
    fn flags_are_strict() {
        let mut r = Reader::new(&[0, 1, 2]);
        assert_eq!(r.flag("a"), Ok(false));
        assert_eq!(r.flag("b"), Ok(true));
        assert_eq!(
            r.flag("c"),
            Err(BodyError::BadValue {
                field: "c",
                value: 2
            })
        );
        assert!(r.finish().is_ok());
    }
}
