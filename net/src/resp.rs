//! RESP2 codec: an incremental request parser, a reply encoder and a reply parser.
//!
//! The node's RESP listener lets redis-cli, redis-benchmark and every Redis client talk to ringkv
//! (GET/SET/DEL/MGET/EXISTS/PING/INFO/COMMAND/HELLO mapped onto an `lww` bucket). This module owns
//! only the bytes: it parses requests into [`RespCommand`]s and encodes [`RespValue`] replies. It
//! executes nothing and knows no command names.
//!
//! Requests come in two shapes, as in Redis:
//! - arrays of bulk strings, `*<n>\r\n` then `n` times `$<len>\r\n<bytes>\r\n` (what clients
//!   send); `*0` and negative counts are empty commands, which the server ignores as Redis does;
//! - inline commands, one line of space-separated words with Redis's quoting rules (`"..."` with
//!   `\n \r \t \b \a \\ \" \xHH` escapes, `'...'` with `\'`), ended by `\n` or `\r\n` (what a
//!   person types into telnet or nc).
//!
//! Limits ([`RespLimits`]): every declared count and length is checked against its limit before
//! anything is allocated, a line that has not ended within its limit is an error rather than a
//! reason to buffer more, and the whole command must fit `message_bytes_max`. Parsing is
//! stateless: the caller passes everything received so far, and the parser answers "need more"
//! after scanning without allocating; a complete command is one buffer with argument offsets, so
//! memory is proportional to the bytes received. [`decode_command`] copies that buffer out of
//! what it was given; a server that reads into a [`bytes::BytesMut`] parses with
//! [`parse_command`] and hands the command the bytes it split off its read buffer
//! ([`RespParsed::with_bytes`]): no copy, and no allocation for the command's buffer.
//!
//! Errors are [`RespError`]s whose messages follow Redis's ("Protocol error: ..."); the server
//! sends [`RespError::reply`] and closes the connection, as Redis does, because the stream can no
//! longer be framed.
//!
//! RESP3 is out of scope: `HELLO 3` is the listener's to refuse with `NOPROTO`.

use bytes::{BufMut, Bytes};
use smallvec::SmallVec;
use thiserror::Error;

use crate::limits::{FRAME_BYTES_MAX_DEFAULT, VALUE_BYTES_MAX};

/// Default largest command or reply, framing included (the binary protocol's frame default).
pub const RESP_MESSAGE_BYTES_MAX_DEFAULT: usize = FRAME_BYTES_MAX_DEFAULT;
/// Largest `message_bytes_max` any configuration may choose; argument offsets are `u32`s.
pub const RESP_MESSAGE_BYTES_MAX_HARD: usize = 64 << 20;
/// Default largest bulk string: the hard value limit.
pub const RESP_BULK_BYTES_MAX_DEFAULT: usize = VALUE_BYTES_MAX;
/// Default most arguments of a command (or elements of a reply array).
pub const RESP_ARGS_MAX_DEFAULT: usize = 65_536;
/// Default longest inline command or simple-string line (Redis's `PROTO_INLINE_MAX_SIZE`).
pub const RESP_INLINE_BYTES_MAX_DEFAULT: usize = 64 << 10;
/// Most arrays a reply value may be nested in; the parser recurses once per level.
pub const RESP_REPLY_DEPTH_MAX: usize = 8;
/// Longest count or length line (`*<n>`, `$<len>`, `:<int>`): a sign and 19 digits.
const NUMBER_LINE_BYTES_MAX: usize = 20;

const _: () = assert!(RESP_MESSAGE_BYTES_MAX_HARD <= u32::MAX as usize);
const _: () = assert!(RESP_MESSAGE_BYTES_MAX_DEFAULT <= RESP_MESSAGE_BYTES_MAX_HARD);
const _: () = assert!(RESP_BULK_BYTES_MAX_DEFAULT < RESP_MESSAGE_BYTES_MAX_DEFAULT);

/// Size limits of the RESP codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RespLimits {
    /// Largest whole command or reply, framing included. Default 17 MiB.
    pub message_bytes_max: usize,
    /// Largest bulk string. Default 16 MiB.
    pub bulk_bytes_max: usize,
    /// Most arguments of a command, or elements of a reply array. Default 65,536.
    pub args_max: usize,
    /// Longest inline command or simple-string/error line. Default 64 KiB.
    pub inline_bytes_max: usize,
}

impl RespLimits {
    /// The defaults.
    pub const DEFAULT: Self = Self {
        message_bytes_max: RESP_MESSAGE_BYTES_MAX_DEFAULT,
        bulk_bytes_max: RESP_BULK_BYTES_MAX_DEFAULT,
        args_max: RESP_ARGS_MAX_DEFAULT,
        inline_bytes_max: RESP_INLINE_BYTES_MAX_DEFAULT,
    };

    /// Checks the limits against their hard bounds and each other.
    pub fn validate(&self) -> Result<(), RespLimitsError> {
        if self.message_bytes_max > RESP_MESSAGE_BYTES_MAX_HARD {
            return Err(RespLimitsError(
                "message_bytes_max exceeds RESP_MESSAGE_BYTES_MAX_HARD",
            ));
        }
        if self.bulk_bytes_max > self.message_bytes_max {
            return Err(RespLimitsError("bulk_bytes_max exceeds message_bytes_max"));
        }
        if self.inline_bytes_max > self.message_bytes_max {
            return Err(RespLimitsError(
                "inline_bytes_max exceeds message_bytes_max",
            ));
        }
        Ok(())
    }
}

impl Default for RespLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// [`RespLimits`] outside their bounds.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("invalid RESP limits: {0}")]
pub struct RespLimitsError(&'static str);

/// A RESP input that cannot be parsed. Display texts match Redis's where Redis has one.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RespError {
    /// `*` followed by something that is not a count.
    #[error("Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    /// An argument of a command that does not start with `$`.
    #[error("Protocol error: expected '$', got '{}'", char::from(*found).escape_default())]
    ExpectedBulk {
        /// The byte found instead.
        found: u8,
    },
    /// `$` followed by something that is not a length.
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// More arguments (or array elements) than `args_max`.
    #[error("Protocol error: {count} arguments exceed the limit of {max}")]
    TooManyArgs {
        /// The declared count.
        count: u64,
        /// The limit.
        max: usize,
    },
    /// A bulk string longer than `bulk_bytes_max`.
    #[error("Protocol error: bulk string of {len} bytes exceeds the limit of {max}")]
    BulkTooLarge {
        /// The declared length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A command or reply longer than `message_bytes_max`.
    #[error("Protocol error: request exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// The limit.
        max: usize,
    },
    /// An inline command or simple-string line longer than `inline_bytes_max`.
    #[error("Protocol error: too big inline request (limit {max} bytes)")]
    InlineTooLong {
        /// The limit.
        max: usize,
    },
    /// A count or length line that does not end within a number's length.
    #[error("Protocol error: too big count or length line")]
    NumberLineTooLong,
    /// An inline command with an unterminated quote, or a closing quote not followed by a space.
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    /// A line or bulk string not ended by `\r\n`.
    #[error("Protocol error: expected CRLF")]
    ExpectedCrlf,
    /// A reply starting with a byte that is not a RESP2 type.
    #[error("Protocol error: unknown reply type '{}'", char::from(*byte).escape_default())]
    UnknownType {
        /// The byte found.
        byte: u8,
    },
    /// Arrays nested deeper than [`RESP_REPLY_DEPTH_MAX`].
    #[error("Protocol error: reply nested deeper than {max} levels")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// An integer reply that is not a 64-bit integer.
    #[error("Protocol error: invalid integer")]
    InvalidInteger,
}

impl RespError {
    /// The error reply a server sends before closing the connection.
    pub fn reply(&self) -> RespValue {
        RespValue::Error(Bytes::from(format!("ERR {self}")))
    }
}

/// Arguments a command keeps inline, without allocating: a `SET` with an expiry and a
/// condition has six.
const ARGS_INLINE: usize = 6;

/// `(start, end)` of each argument of a command in its buffer; `u32` suffices since messages are
/// at most [`RESP_MESSAGE_BYTES_MAX_HARD`].
type ArgRanges = SmallVec<[(u32, u32); ARGS_INLINE]>;

/// One parsed command: its arguments, stored in one buffer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RespCommand {
    buf: Bytes,
    args: ArgRanges,
}

/// A command parsed where it lies ([`parse_command`]), waiting for its bytes.
#[derive(Debug)]
pub struct RespParsed {
    args: ArgRanges,
    /// An inline command's unescaped arguments: its own buffer, unlike an array's.
    unescaped: Option<Vec<u8>>,
}

impl RespParsed {
    /// The command, given `bytes`: exactly the bytes [`parse_command`] parsed it from (the
    /// `used` it answered), which it keeps and slices rather than copies. An inline command
    /// keeps its own unescaped bytes instead.
    ///
    /// # Panics
    ///
    /// If `bytes` are too short for the arguments, so not the ones parsed.
    pub fn with_bytes(self, bytes: Bytes) -> RespCommand {
        let buf = match self.unescaped {
            Some(own) => Bytes::from(own),
            None => bytes,
        };
        assert!(
            self.args.iter().all(|&(_, e)| e as usize <= buf.len()),
            "a command is given the bytes it was parsed from"
        );
        RespCommand {
            buf,
            args: self.args,
        }
    }
}

impl RespCommand {
    /// Number of arguments, the command name included.
    pub fn len(&self) -> usize {
        self.args.len()
    }

    /// True for an empty command (`*0`, a negative count or a blank inline line), which a server
    /// ignores without replying, as Redis does.
    pub fn is_empty(&self) -> bool {
        self.args.is_empty()
    }

    /// The command name (first argument), as sent.
    pub fn name(&self) -> Option<&[u8]> {
        self.arg(0)
    }

    /// Argument `i`.
    pub fn arg(&self, i: usize) -> Option<&[u8]> {
        self.args
            .get(i)
            .map(|&(s, e)| &self.buf[s as usize..e as usize])
    }

    /// Argument `i` as a `Bytes` sharing the command's buffer (no copy), e.g. for a value.
    pub fn arg_bytes(&self, i: usize) -> Option<Bytes> {
        self.args
            .get(i)
            .map(|&(s, e)| self.buf.slice(s as usize..e as usize))
    }

    /// Argument `i`, taking the command's buffer over: the command's last use. Where
    /// [`RespCommand::arg_bytes`] adds a holder of the buffer (an atomic count, as the buffer
    /// may be shared with the rest of a connection's reads), this hands over the command's own.
    pub fn into_arg(self, i: usize) -> Option<Bytes> {
        let &(start, end) = self.args.get(i)?;
        let mut buf = self.buf;
        buf.truncate(end as usize);
        bytes::Buf::advance(&mut buf, start as usize);
        Some(buf)
    }

    /// All arguments in order.
    pub fn args(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.args
            .iter()
            .map(|&(s, e)| &self.buf[s as usize..e as usize])
    }
}

/// A RESP2 value, as sent in replies.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RespValue {
    /// `+OK`: a short status line. CR and LF are replaced by spaces when encoding.
    Simple(Bytes),
    /// `-ERR ...`: an error line, conventionally starting with an upper-case code. CR and LF are
    /// replaced by spaces when encoding.
    Error(Bytes),
    /// `:42`.
    Integer(i64),
    /// `$3\r\nfoo`: a binary-safe string.
    Bulk(Bytes),
    /// `$-1`: the null bulk string (a missing key).
    Null,
    /// `*2\r\n...`: an array.
    Array(Vec<RespValue>),
    /// `*-1`: the null array.
    NullArray,
}

/// Appends one encoded value.
pub fn encode_reply<B: BufMut>(value: &RespValue, out: &mut B) {
    match value {
        RespValue::Simple(s) => write_simple(out, s),
        RespValue::Error(s) => write_error(out, s),
        RespValue::Integer(i) => write_integer(out, *i),
        RespValue::Bulk(b) => write_bulk(out, b),
        RespValue::Null => write_null(out),
        RespValue::Array(items) => {
            write_array_header(out, items.len());
            for item in items {
                encode_reply(item, out);
            }
        }
        RespValue::NullArray => out.put_slice(b"*-1\r\n"),
    }
}

/// Writes a line, replacing CR and LF (which would end it early and desynchronise the client)
/// with spaces: error messages may quote user input.
fn write_line<B: BufMut>(out: &mut B, prefix: u8, line: &[u8]) {
    out.put_u8(prefix);
    for chunk in line.split_inclusive(|&b| b == b'\r' || b == b'\n') {
        match chunk.split_last() {
            Some((&last, head)) if last == b'\r' || last == b'\n' => {
                out.put_slice(head);
                out.put_u8(b' ');
            }
            _ => out.put_slice(chunk),
        }
    }
    out.put_slice(b"\r\n");
}

fn write_number<B: BufMut>(out: &mut B, prefix: u8, n: i64) {
    // Formats without allocating: replies are written on the hot path.
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_u8(prefix);
    if n < 0 {
        out.put_u8(b'-');
    }
    out.put_slice(&digits[i..]);
    out.put_slice(b"\r\n");
}

/// Writes a simple string (`+...`).
pub fn write_simple<B: BufMut>(out: &mut B, s: &[u8]) {
    write_line(out, b'+', s);
}

/// Writes an error (`-...`), e.g. `ERR unknown command`.
pub fn write_error<B: BufMut>(out: &mut B, s: &[u8]) {
    write_line(out, b'-', s);
}

/// Writes an integer (`:n`).
pub fn write_integer<B: BufMut>(out: &mut B, n: i64) {
    write_number(out, b':', n);
}

/// Writes a bulk string (`$len` and the bytes).
pub fn write_bulk<B: BufMut>(out: &mut B, b: &[u8]) {
    // A slice length always fits in i64 on supported targets.
    write_number(out, b'$', b.len() as i64);
    out.put_slice(b);
    out.put_slice(b"\r\n");
}

/// Writes the null bulk string (`$-1`).
pub fn write_null<B: BufMut>(out: &mut B) {
    out.put_slice(b"$-1\r\n");
}

/// Writes an array header (`*n`); the caller then writes `n` values. Lets a server stream an
/// MGET reply without building a [`RespValue::Array`].
pub fn write_array_header<B: BufMut>(out: &mut B, n: usize) {
    write_number(out, b'*', n as i64);
}

/// Writes a command as an array of bulk strings (what a client sends).
pub fn encode_command<B: BufMut, A: AsRef<[u8]>>(args: &[A], out: &mut B) {
    write_array_header(out, args.len());
    for a in args {
        write_bulk(out, a.as_ref());
    }
}

/// Parses a decimal integer the way Redis's `string2ll` does: an optional `-`, then digits with
/// no leading zero (except `0` itself) and no `-0`, no `+`, no spaces. Strictness keeps every
/// accepted line canonical, so re-encoding a parsed reply gives back the same bytes.
fn parse_i64(s: &[u8]) -> Option<i64> {
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 || digits[0] == b'0' {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        // -2^63 is the one magnitude without a positive counterpart.
        (v <= 1 << 63).then(|| (v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// Finds the line starting at `start`, ended by `\r\n`, whose content is at most `max` bytes.
/// Returns the content and the position after the `\r\n`, `None` if the line may still end
/// within the limit, or `too_long` once it cannot.
fn line(
    buf: &[u8],
    start: usize,
    max: usize,
    too_long: RespError,
) -> Result<Option<(&[u8], usize)>, RespError> {
    let window_end = buf.len().min(start.saturating_add(max).saturating_add(2));
    let window = buf.get(start..window_end).unwrap_or(&[]);
    match window.iter().position(|&b| b == b'\n') {
        Some(i) => {
            if i == 0 || window[i - 1] != b'\r' {
                return Err(RespError::ExpectedCrlf);
            }
            let content = &window[..i - 1];
            // A lone CR inside a line is what a broken or hostile peer sends; refusing it keeps
            // lines canonical (the encoder never writes one).
            if content.contains(&b'\r') {
                return Err(RespError::ExpectedCrlf);
            }
            Ok(Some((content, start + i + 1)))
        }
        None if buf.len() >= start.saturating_add(max).saturating_add(2) => Err(too_long),
        None => Ok(None),
    }
}

/// Reads a count or length line after its type byte at `pos`: the number and the position after
/// the line.
fn number_line(
    buf: &[u8],
    pos: usize,
    invalid: RespError,
) -> Result<Option<(i64, usize)>, RespError> {
    let Some((text, next)) = line(
        buf,
        pos + 1,
        NUMBER_LINE_BYTES_MAX,
        RespError::NumberLineTooLong,
    )?
    else {
        return Ok(None);
    };
    match parse_i64(text) {
        Some(n) => Ok(Some((n, next))),
        None => Err(invalid),
    }
}

/// Validates the body of a bulk string of declared length `len` starting at `data`: the length
/// against the limits (before anything is read), then the closing CRLF. Returns the offset just
/// past the CRLF, or `None` when more bytes are needed.
fn bulk_end(
    buf: &[u8],
    data: usize,
    len: i64,
    limits: &RespLimits,
) -> Result<Option<usize>, RespError> {
    let Ok(len) = usize::try_from(len) else {
        return Err(RespError::InvalidBulkLength);
    };
    if len > limits.bulk_bytes_max {
        return Err(RespError::BulkTooLarge {
            len: len as u64,
            max: limits.bulk_bytes_max,
        });
    }
    // `data` is bounded by message_bytes_max (checked by the caller) and `len` by
    // bulk_bytes_max; saturating keeps even unvalidated limits from overflowing.
    let end = data.saturating_add(len).saturating_add(2);
    check_message_len(end, limits)?;
    if buf.len() < end {
        return Ok(None);
    }
    if &buf[end - 2..end] != b"\r\n" {
        return Err(RespError::ExpectedCrlf);
    }
    Ok(Some(end))
}

fn check_message_len(end: usize, limits: &RespLimits) -> Result<(), RespError> {
    if end > limits.message_bytes_max {
        return Err(RespError::MessageTooLarge {
            max: limits.message_bytes_max,
        });
    }
    Ok(())
}

/// Parses the command at the start of `buf`.
///
/// Returns `Ok(None)` if more bytes are needed, or the command and the number of bytes it used.
/// Several pipelined commands are parsed by calling again after dropping the used bytes. The
/// command holds a copy of its bytes; [`parse_command`] avoids the copy.
///
/// Panics if `limits` exceed [`RESP_MESSAGE_BYTES_MAX_HARD`] (see [`RespLimits::validate`]).
pub fn decode_command(
    buf: &[u8],
    limits: &RespLimits,
) -> Result<Option<(RespCommand, usize)>, RespError> {
    Ok(parse_command(buf, limits)?.map(|(parsed, used)| {
        let bytes = match parsed.unescaped {
            Some(_) => Bytes::new(),
            None => Bytes::copy_from_slice(&buf[..used]),
        };
        (parsed.with_bytes(bytes), used)
    }))
}

/// [`decode_command`] without the copy: the parsed command and the number of bytes it used,
/// which the caller gives it back as a shared [`Bytes`] ([`RespParsed::with_bytes`]).
///
/// Panics if `limits` exceed [`RESP_MESSAGE_BYTES_MAX_HARD`] (see [`RespLimits::validate`]).
pub fn parse_command(
    buf: &[u8],
    limits: &RespLimits,
) -> Result<Option<(RespParsed, usize)>, RespError> {
    assert!(
        limits.message_bytes_max <= RESP_MESSAGE_BYTES_MAX_HARD,
        "RespLimits must be validated"
    );
    match buf.first() {
        None => Ok(None),
        Some(b'*') => decode_multibulk(buf, limits),
        Some(_) => decode_inline(buf, limits),
    }
}

/// Walks a multibulk command, calling `on_arg` with each argument's range. Returns the end of the
/// command, or `None` if it is incomplete. Allocates nothing itself.
fn walk_multibulk(
    buf: &[u8],
    limits: &RespLimits,
    mut on_arg: impl FnMut(usize, usize),
) -> Result<Option<usize>, RespError> {
    let Some((count, mut pos)) = number_line(buf, 0, RespError::InvalidMultibulkLength)? else {
        return Ok(None);
    };
    if count <= 0 {
        return Ok(Some(pos));
    }
    // count > 0 was checked, so the conversion is lossless.
    if count as u64 > limits.args_max as u64 {
        return Err(RespError::TooManyArgs {
            count: count as u64,
            max: limits.args_max,
        });
    }
    for _ in 0..count {
        check_message_len(pos, limits)?;
        let Some(&prefix) = buf.get(pos) else {
            return Ok(None);
        };
        if prefix != b'$' {
            return Err(RespError::ExpectedBulk { found: prefix });
        }
        let Some((len, data)) = number_line(buf, pos, RespError::InvalidBulkLength)? else {
            return Ok(None);
        };
        let Some(end) = bulk_end(buf, data, len, limits)? else {
            return Ok(None);
        };
        on_arg(data, end - 2);
        pos = end;
    }
    check_message_len(pos, limits)?;
    Ok(Some(pos))
}

fn decode_multibulk(
    buf: &[u8],
    limits: &RespLimits,
) -> Result<Option<(RespParsed, usize)>, RespError> {
    // One pass validates, finds the end and keeps the offsets while they fit inline, so an
    // incomplete command allocates nothing however large its declared sizes. A command with more
    // arguments than that is walked a second time, once it is known to be complete.
    // (end <= message_bytes_max <= RESP_MESSAGE_BYTES_MAX_HARD, which fits a u32.)
    let mut ranges = ArgRanges::new();
    let mut spilled = false;
    let Some(end) = walk_multibulk(buf, limits, |s, e| {
        if ranges.len() < ARGS_INLINE {
            ranges.push((s as u32, e as u32));
        } else {
            spilled = true;
        }
    })?
    else {
        return Ok(None);
    };
    if spilled {
        ranges.clear();
        let again = walk_multibulk(buf, limits, |s, e| ranges.push((s as u32, e as u32)))?;
        assert_eq!(again, Some(end), "second pass over validated input differs");
    }
    Ok(Some((
        RespParsed {
            args: ranges,
            unescaped: None,
        },
        end,
    )))
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0B | 0x0C)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline line into arguments with Redis's `sdssplitargs` rules, writing unescaped
/// bytes to `out` (never longer than `line`) and their ranges to `args`.
fn split_inline(
    line: &[u8],
    limits: &RespLimits,
    out: &mut Vec<u8>,
    args: &mut ArgRanges,
) -> Result<(), RespError> {
    let n = line.len();
    let mut p = 0;
    loop {
        while p < n && is_space(line[p]) {
            p += 1;
        }
        if p == n {
            return Ok(());
        }
        if args.len() == limits.args_max {
            return Err(RespError::TooManyArgs {
                count: args.len() as u64 + 1,
                max: limits.args_max,
            });
        }
        let start = out.len();
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            if in_dq {
                let Some(&c) = line.get(p) else {
                    return Err(RespError::UnbalancedQuotes);
                };
                let hex = match (line.get(p + 1), line.get(p + 2), line.get(p + 3)) {
                    (Some(b'x'), Some(&hi), Some(&lo)) => hex_value(hi).zip(hex_value(lo)),
                    _ => None,
                };
                if c == b'\\'
                    && let Some((hi, lo)) = hex
                {
                    out.push(hi << 4 | lo);
                    p += 3;
                } else if c == b'\\' && p + 1 < n {
                    p += 1;
                    out.push(match line[p] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    // A closing quote must end the argument.
                    if p + 1 < n && !is_space(line[p + 1]) {
                        return Err(RespError::UnbalancedQuotes);
                    }
                    p += 1;
                    break;
                } else {
                    out.push(c);
                }
            } else if in_sq {
                let Some(&c) = line.get(p) else {
                    return Err(RespError::UnbalancedQuotes);
                };
                if c == b'\\' && line.get(p + 1) == Some(&b'\'') {
                    p += 1;
                    out.push(b'\'');
                } else if c == b'\'' {
                    if p + 1 < n && !is_space(line[p + 1]) {
                        return Err(RespError::UnbalancedQuotes);
                    }
                    p += 1;
                    break;
                } else {
                    out.push(c);
                }
            } else {
                match line.get(p) {
                    None => break,
                    Some(b' ' | b'\n' | b'\r' | b'\t' | 0) => {
                        p += 1;
                        break;
                    }
                    Some(b'"') => in_dq = true,
                    Some(b'\'') => in_sq = true,
                    Some(&c) => out.push(c),
                }
            }
            p += 1;
        }
        // out.len() <= line.len() <= inline_bytes_max <= message_bytes_max, which fits a u32.
        args.push((start as u32, out.len() as u32));
    }
}

fn decode_inline(
    buf: &[u8],
    limits: &RespLimits,
) -> Result<Option<(RespParsed, usize)>, RespError> {
    let window = &buf[..buf.len().min(limits.inline_bytes_max + 1)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.inline_bytes_max {
            return Err(RespError::InlineTooLong {
                max: limits.inline_bytes_max,
            });
        }
        return Ok(None);
    };
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut out = Vec::with_capacity(line.len());
    let mut args = ArgRanges::new();
    split_inline(line, limits, &mut out, &mut args)?;
    assert!(out.len() <= line.len(), "unescaping never grows the input");
    Ok(Some((
        RespParsed {
            args,
            unescaped: Some(out),
        },
        nl + 1,
    )))
}

/// Parses the reply at the start of `buf` (for clients and tests).
///
/// Returns `Ok(None)` if more bytes are needed, or the value and the number of bytes it used.
/// A value may be nested in at most [`RESP_REPLY_DEPTH_MAX`] arrays.
pub fn decode_reply(
    buf: &[u8],
    limits: &RespLimits,
) -> Result<Option<(RespValue, usize)>, RespError> {
    assert!(
        limits.message_bytes_max <= RESP_MESSAGE_BYTES_MAX_HARD,
        "RespLimits must be validated"
    );
    // First pass validates without allocating; the second builds the value, every size in it now
    // proven to be backed by bytes in `buf`.
    let Some((_, end)) = parse_value(buf, 0, 0, limits, false)? else {
        return Ok(None);
    };
    match parse_value(buf, 0, 0, limits, true)? {
        Some((Some(value), again)) if again == end => Ok(Some((value, end))),
        _ => unreachable!("second pass over validated input differs"),
    }
}

/// Parses one value at `pos`. With `build == false` it only validates and returns `(None, end)`.
fn parse_value(
    buf: &[u8],
    pos: usize,
    depth: usize,
    limits: &RespLimits,
    build: bool,
) -> Result<Option<(Option<RespValue>, usize)>, RespError> {
    check_message_len(pos, limits)?;
    let Some(&prefix) = buf.get(pos) else {
        return Ok(None);
    };
    let too_long = RespError::InlineTooLong {
        max: limits.inline_bytes_max,
    };
    let built = |v: RespValue| build.then_some(v);
    let (value, end) = match prefix {
        b'+' | b'-' => {
            let Some((text, next)) = line(buf, pos + 1, limits.inline_bytes_max, too_long)? else {
                return Ok(None);
            };
            let text = || Bytes::copy_from_slice(text);
            let v = if prefix == b'+' {
                build.then(|| RespValue::Simple(text()))
            } else {
                build.then(|| RespValue::Error(text()))
            };
            (v, next)
        }
        b':' => {
            let Some((n, next)) = number_line(buf, pos, RespError::InvalidInteger)? else {
                return Ok(None);
            };
            (built(RespValue::Integer(n)), next)
        }
        b'$' => {
            let Some((len, data)) = number_line(buf, pos, RespError::InvalidBulkLength)? else {
                return Ok(None);
            };
            if len == -1 {
                (built(RespValue::Null), data)
            } else {
                let Some(end) = bulk_end(buf, data, len, limits)? else {
                    return Ok(None);
                };
                let v = build.then(|| RespValue::Bulk(Bytes::copy_from_slice(&buf[data..end - 2])));
                (v, end)
            }
        }
        b'*' => {
            let Some((count, mut next)) = number_line(buf, pos, RespError::InvalidMultibulkLength)?
            else {
                return Ok(None);
            };
            if count == -1 {
                (built(RespValue::NullArray), next)
            } else {
                let Ok(count) = usize::try_from(count) else {
                    return Err(RespError::InvalidMultibulkLength);
                };
                if count > limits.args_max {
                    return Err(RespError::TooManyArgs {
                        count: count as u64,
                        max: limits.args_max,
                    });
                }
                if count > 0 && depth + 1 > RESP_REPLY_DEPTH_MAX {
                    return Err(RespError::TooDeep {
                        max: RESP_REPLY_DEPTH_MAX,
                    });
                }
                // In the build pass every element was proven present, so `count` is backed by at
                // least 3 bytes of input per element.
                let mut items = if build {
                    Vec::with_capacity(count)
                } else {
                    Vec::new()
                };
                for _ in 0..count {
                    let Some((item, after)) = parse_value(buf, next, depth + 1, limits, build)?
                    else {
                        return Ok(None);
                    };
                    if let Some(item) = item {
                        items.push(item);
                    }
                    next = after;
                }
                (built(RespValue::Array(items)), next)
            }
        }
        byte => return Err(RespError::UnknownType { byte }),
    };
    check_message_len(end, limits)?;
    Ok(Some((value, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Option<(Vec<Vec<u8>>, usize)>;

    fn cmd(input: &[u8]) -> Result<Parsed, RespError> {
        decode_command(input, &RespLimits::default())
            .map(|o| o.map(|(c, n)| (c.args().map(<[u8]>::to_vec).collect(), n)))
    }

    fn words(ws: &[&str]) -> Vec<Vec<u8>> {
        ws.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    /// Array-of-bulk commands parse, and stop at their end.
    #[test]
    fn multibulk() {
        let input = b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n*1\r\n$4\r\nPING\r\n";
        assert_eq!(cmd(input), Ok(Some((words(&["GET", "foo"]), 22))));
        assert_eq!(cmd(&input[22..]), Ok(Some((words(&["PING"]), 14))));
        assert_eq!(cmd(b"*0\r\n"), Ok(Some((vec![], 4))));
        assert_eq!(cmd(b"*-1\r\n"), Ok(Some((vec![], 5))));
        assert_eq!(cmd(b"*1\r\n$0\r\n\r\n"), Ok(Some((vec![vec![]], 10))));
    }

    /// A command's argument taken with its buffer is the argument, for every argument of
    /// multibulk and inline commands (whose arguments have a buffer of their own), in a buffer
    /// shared with other commands, and nothing past the last argument.
    #[test]
    fn an_argument_taken_with_the_buffer_is_the_argument() {
        let input = b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$5\r\nhello\r\nset  \"a b\" c\r\n";
        let shared = Bytes::copy_from_slice(input);
        let mut at = 0;
        let mut seen = 0;
        while let Some((parsed, used)) =
            parse_command(&shared[at..], &RespLimits::default()).unwrap()
        {
            let command = parsed.with_bytes(shared.slice(at..at + used));
            for i in 0..command.len() {
                let expected = command.arg(i).map(<[u8]>::to_vec);
                assert_eq!(
                    command.clone().into_arg(i).map(|b| b.to_vec()),
                    expected,
                    "{i}"
                );
                seen += 1;
            }
            assert_eq!(command.clone().into_arg(command.len()), None);
            at += used;
        }
        assert_eq!((at, seen), (input.len(), 6));
    }

    /// Inline commands follow Redis's splitting and quoting rules.
    #[test]
    fn inline() {
        assert_eq!(cmd(b"PING\r\n"), Ok(Some((words(&["PING"]), 6))));
        assert_eq!(
            cmd(b"  set  a b\n"),
            Ok(Some((words(&["set", "a", "b"]), 11)))
        );
        assert_eq!(cmd(b"\r\n"), Ok(Some((vec![], 2))));
        assert_eq!(
            cmd(b"SET \"a b\" 'c d' \"\\x41\\n\"\r\n").map(|o| o.map(|(a, _)| a)),
            Ok(Some(vec![
                b"SET".to_vec(),
                b"a b".to_vec(),
                b"c d".to_vec(),
                b"A\n".to_vec()
            ]))
        );
        assert_eq!(
            cmd(b"SET 'it\\'s'\n").map(|o| o.map(|(a, _)| a)),
            Ok(Some(words(&["SET", "it's"])))
        );
        assert_eq!(cmd(b"GET \"a\n"), Err(RespError::UnbalancedQuotes));
        assert_eq!(cmd(b"GET \"a\"b\n"), Err(RespError::UnbalancedQuotes));
        assert_eq!(cmd(b"GET 'a\n"), Err(RespError::UnbalancedQuotes));
        assert_eq!(cmd(b"GET foo"), Ok(None));
    }

    /// Declared sizes over the limits fail at once, before the data arrives.
    #[test]
    fn limits_before_data() {
        assert_eq!(
            cmd(b"*9999999999\r\n"),
            Err(RespError::TooManyArgs {
                count: 9_999_999_999,
                max: RESP_ARGS_MAX_DEFAULT
            })
        );
        assert!(matches!(
            cmd(b"*1\r\n$99999999999\r\n"),
            Err(RespError::BulkTooLarge { .. })
        ));
        assert_eq!(cmd(b"*1\r\n$-5\r\n"), Err(RespError::InvalidBulkLength));
        assert_eq!(cmd(b"*x\r\n"), Err(RespError::InvalidMultibulkLength));
        assert_eq!(
            cmd(b"*1\r\nx"),
            Err(RespError::ExpectedBulk { found: b'x' })
        );
        assert_eq!(
            cmd(b"*123456789012345678901234"),
            Err(RespError::NumberLineTooLong)
        );
        assert_eq!(cmd(b"*1\r\n$1\r\nab\r\n"), Err(RespError::ExpectedCrlf));
        assert_eq!(cmd(b"*1\n"), Err(RespError::ExpectedCrlf));
        let small = RespLimits {
            message_bytes_max: 100,
            ..RespLimits::default()
        };
        assert_eq!(
            decode_command(b"*1\r\n$200\r\n", &small),
            Err(RespError::MessageTooLarge { max: 100 })
        );
        let long = vec![b'a'; RESP_INLINE_BYTES_MAX_DEFAULT + 1];
        assert_eq!(
            cmd(&long),
            Err(RespError::InlineTooLong {
                max: RESP_INLINE_BYTES_MAX_DEFAULT
            })
        );
        assert_eq!(cmd(&long[1..]), Ok(None));
    }

    /// Replies encode as Redis writes them, and lines cannot be broken by embedded CR/LF.
    #[test]
    fn reply_encoding() {
        let mut out = Vec::new();
        encode_reply(
            &RespValue::Array(vec![
                RespValue::Simple(Bytes::from_static(b"OK")),
                RespValue::Error(Bytes::from_static(b"ERR bad\r\nthing")),
                RespValue::Integer(-42),
                RespValue::Integer(i64::MIN),
                RespValue::Bulk(Bytes::from_static(b"a\r\nb")),
                RespValue::Null,
                RespValue::NullArray,
            ]),
            &mut out,
        );
        assert_eq!(
            out,
            b"*7\r\n+OK\r\n-ERR bad  thing\r\n:-42\r\n:-9223372036854775808\r\n$4\r\na\r\nb\r\n$-1\r\n*-1\r\n"
        );
    }

    /// Integers are parsed as strictly as Redis does, over the whole i64 range.
    #[test]
    fn integers() {
        for ok in [0, 1, -1, 42, i64::MAX, i64::MIN] {
            assert_eq!(parse_i64(ok.to_string().as_bytes()), Some(ok));
        }
        for bad in [
            "",
            "-",
            "-0",
            "01",
            "+1",
            " 1",
            "1 ",
            "9223372036854775808",
            "1x",
        ] {
            assert_eq!(parse_i64(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(parse_i64(b"-9223372036854775809"), None);
    }

    /// Replies nested deeper than the limit are refused instead of recursing without bound.
    #[test]
    fn reply_depth() {
        let deep = "*1\r\n".repeat(RESP_REPLY_DEPTH_MAX + 1) + ":1\r\n";
        assert_eq!(
            decode_reply(deep.as_bytes(), &RespLimits::default()),
            Err(RespError::TooDeep {
                max: RESP_REPLY_DEPTH_MAX
            })
        );
        let ok = "*1\r\n".repeat(RESP_REPLY_DEPTH_MAX) + ":1\r\n";
        assert!(matches!(
            decode_reply(ok.as_bytes(), &RespLimits::default()),
            Ok(Some(_))
        ));
    }
}
