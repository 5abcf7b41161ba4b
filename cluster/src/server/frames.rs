//! The read buffer every connection decodes from: client, peer and RESP connections, outbound
//! peer links and their handshakes all read bytes into one of these and take complete items
//! (frames, RESP commands) off its front with their codec.
//!
//! Decoded bytes are dropped only when the next read is due, so a batch of pipelined requests
//! that arrived in one read is decoded with no copying; the buffer then keeps at most one
//! partial item plus one read. Limits: an item is bounded by its codec's limits (the frame
//! limit, RESP's bulk and argument limits), which a codec enforces as soon as the item's header
//! is buffered, so the buffer never grows past one item and one read.

use futures_lite::io::{AsyncRead, AsyncReadExt};

use super::readiness::SocketReader;

/// Bytes read from a connection and not yet decoded.
pub(super) struct ReadBuffer {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already decoded (or skipped).
    used: usize,
    /// Where each read lands before it is appended.
    chunk: Vec<u8>,
}

impl ReadBuffer {
    /// A buffer that reads up to `chunk_bytes` at a time.
    pub(super) fn new(chunk_bytes: usize) -> Self {
        ReadBuffer {
            buf: Vec::with_capacity(chunk_bytes),
            used: 0,
            chunk: vec![0u8; chunk_bytes],
        }
    }

    /// Decodes the next item from the buffered bytes with `decode`, which answers the item and
    /// the bytes it took, or `None` when the item is not complete yet.
    pub(super) fn decode<T, E>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<Option<(T, usize)>, E>,
    ) -> Result<Option<T>, E> {
        match decode(&self.buf[self.used..])? {
            None => Ok(None),
            Some((item, len)) => {
                self.skip(len);
                Ok(Some(item))
            }
        }
    }

    /// Steps over `len` buffered bytes (an item the codec rejected but can skip).
    pub(super) fn skip(&mut self, len: usize) {
        debug_assert!(
            self.used + len <= self.buf.len(),
            "skipped past the buffered bytes"
        );
        self.used = (self.used + len).min(self.buf.len());
    }

    /// Drops the decoded bytes and reads once from `reader`: the bytes read, 0 at the end of
    /// the stream.
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

    /// Drops the decoded bytes; answers where the next read lands.
    fn next_read(&mut self) -> &mut [u8] {
        self.buf.drain(..self.used);
        self.used = 0;
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
            assert!(frames.buf.is_empty() || frames.used == frames.buf.len());
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
