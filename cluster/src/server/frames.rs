//! The read buffer every connection decodes from: client, peer and RESP connections, outbound
//! peer links and their handshakes all read bytes into one of these and take complete items
//! (frames, RESP commands) off its front with their codec.
//!
//! The buffer is a [`BytesMut`]: a decoded item's bytes are stepped over, or split off and
//! handed to the item as a shared [`Bytes`] ([`ReadBuffer::decode_shared`], RESP commands), so a
//! command's key and value are slices of what was read, not copies. Once every item split off
//! has been dropped, the next read reuses the same memory (`BytesMut` reclaims it when no
//! `Bytes` shares it any more). A slice kept alive keeps its whole allocation, so what is kept
//! beyond a request copies the bytes it keeps: a tree's key, a cached value, a held hint's key
//! (`StoreKey::detached`), a connection's name.
//!
//! Limits: an item is bounded by its codec's limits (the frame limit, RESP's bulk and argument
//! limits), which a codec enforces as soon as the item's header is buffered. Decoded bytes are
//! moved out of the way only when that is cheap (`BytesMut` moves a partial item to the front
//! once what was consumed before it is at least as long), so the buffer holds at most about
//! twice one item and one read.

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::io::{AsyncRead, AsyncReadExt};

use super::readiness::SocketReader;

/// Bytes read from a connection and not yet decoded.
pub(super) struct ReadBuffer {
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    /// Where each read lands before it is appended.
    chunk: Vec<u8>,
}

impl ReadBuffer {
    /// A buffer that reads up to `chunk_bytes` at a time.
    pub(super) fn new(chunk_bytes: usize) -> Self {
        ReadBuffer {
            buf: BytesMut::with_capacity(chunk_bytes),
            chunk: vec![0u8; chunk_bytes],
        }
    }

    /// Decodes the next item from the buffered bytes with `decode`, which answers the item and
    /// the bytes it took, or `None` when the item is not complete yet.
    pub(super) fn decode<T, E>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<Option<(T, usize)>, E>,
    ) -> Result<Option<T>, E> {
        match decode(&self.buf)? {
            None => Ok(None),
            Some((item, len)) => {
                self.skip(len);
                Ok(Some(item))
            }
        }
    }

    /// Like [`decode`](Self::decode), but the item is finished by `build` from what `parse`
    /// answered and the bytes it took, split off the buffer without copying.
    pub(super) fn decode_shared<P, T, E>(
        &mut self,
        parse: impl FnOnce(&[u8]) -> Result<Option<(P, usize)>, E>,
        build: impl FnOnce(P, Bytes) -> T,
    ) -> Result<Option<T>, E> {
        match parse(&self.buf)? {
            None => Ok(None),
            Some((parsed, len)) => {
                assert!(
                    len <= self.buf.len(),
                    "a codec took more bytes than it was given"
                );
                let bytes = self.buf.split_to(len).freeze();
                Ok(Some(build(parsed, bytes)))
            }
        }
    }

    /// Steps over `len` buffered bytes (an item the codec rejected but can skip).
    pub(super) fn skip(&mut self, len: usize) {
        debug_assert!(len <= self.buf.len(), "skipped past the buffered bytes");
        self.buf.advance(len.min(self.buf.len()));
    }

    /// Reads once from `reader`: the bytes read, 0 at the end of the stream.
    pub(super) async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> std::io::Result<usize> {
        let n = reader.read(self.next_read()).await?;
        Ok(self.append(n))
    }

    /// [`fill`](Self::fill) from an accepted socket of the shard's readiness set.
    pub(super) async fn fill_from(&mut self, socket: &SocketReader) -> std::io::Result<usize> {
        let n = socket.read(self.next_read()).await?;
        Ok(self.append(n))
    }

    /// Where the next read lands.
    fn next_read(&mut self) -> &mut [u8] {
        &mut self.chunk
    }

    /// Appends the first `n` bytes of the read into [`next_read`](Self::next_read)'s buffer;
    /// answers `n`.
    fn append(&mut self, n: usize) -> usize {
        self.buf.extend_from_slice(&self.chunk[..n]);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-byte codec: an item is one length byte and that many payload bytes.
    fn decode(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ()> {
        match buf.first() {
            None => Ok(None),
            Some(&len) if buf.len() > usize::from(len) => Ok(Some((
                buf[1..=usize::from(len)].to_vec(),
                usize::from(len) + 1,
            ))),
            Some(_) => Ok(None),
        }
    }

    #[test]
    fn items_split_across_reads_come_out_whole_and_in_order() {
        futures_lite::future::block_on(async {
            let stream: &[u8] = &[2, b'a', b'b', 1, b'c', 3, b'd', b'e', b'f'];
            // Reads of 4 bytes split the second and third items.
            let mut reader = futures_lite::io::Cursor::new(stream.to_vec());
            let mut frames = ReadBuffer::new(4);
            let mut items = Vec::new();
            loop {
                while let Some(item) = frames.decode(decode).expect("the codec never fails") {
                    items.push(item);
                }
                if frames.fill(&mut reader).await.expect("a cursor reads") == 0 {
                    break;
                }
            }
            assert_eq!(items, vec![b"ab".to_vec(), b"c".to_vec(), b"def".to_vec()]);
            assert!(frames.buf.is_empty());
        });
    }

    /// Items split off the buffer share its memory: their bytes are what was read, and once
    /// they are dropped the next read lands in the same allocation.
    #[test]
    fn shared_items_are_slices_of_the_buffer_and_its_memory_is_reused() {
        futures_lite::future::block_on(async {
            let stream: Vec<u8> = [2, b'a', b'b', 1, b'c'].repeat(2);
            let mut reader = futures_lite::io::Cursor::new(stream);
            let mut frames = ReadBuffer::new(5);
            let parse = |buf: &[u8]| decode(buf).map(|o| o.map(|(_, len)| ((), len)));
            frames.fill(&mut reader).await.expect("a cursor reads");
            let start = frames.buf.as_ptr();
            let ab = frames.decode_shared(parse, |(), b| b).expect("decodes");
            let c = frames.decode_shared(parse, |(), b| b).expect("decodes");
            assert_eq!(ab.as_deref(), Some(&[2, b'a', b'b'][..]));
            assert_eq!(c.as_deref(), Some(&[1, b'c'][..]));
            assert_eq!(ab.as_ref().map(|b| b.as_ptr()), Some(start), "not a copy");
            assert_eq!(frames.decode_shared(parse, |(), b| b), Ok(None));
            drop((ab, c));
            frames.fill(&mut reader).await.expect("a cursor reads");
            assert_eq!(
                frames.buf.as_ptr(),
                start,
                "the read landed in the same memory"
            );
            let again = frames.decode_shared(parse, |(), b| b).expect("decodes");
            assert_eq!(again.as_deref(), Some(&[2, b'a', b'b'][..]));
        });
    }

    #[test]
    fn a_skipped_item_is_not_decoded_again() {
        futures_lite::future::block_on(async {
            let mut reader = futures_lite::io::Cursor::new(vec![1, b'x', 1, b'y']);
            let mut frames = ReadBuffer::new(16);
            frames.fill(&mut reader).await.expect("a cursor reads");
            frames.skip(2);
            assert_eq!(frames.decode(decode), Ok(Some(b"y".to_vec())));
            assert_eq!(frames.decode(decode), Ok(None));
        });
    }
}
