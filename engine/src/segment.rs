//! A segment: one append-only file of records, and the in-memory tail not yet written to it.
//!
//! While a segment is being written, the bytes from the last partially written IO block onwards
//! live in `mem`; a flush writes them from that block boundary (rewriting the partial block with
//! the same leading bytes plus the new ones) and then drops every fully written block from memory.
//! Rewriting the partial block is safe for records already acknowledged in it: their bytes are
//! written again with identical content, so whichever sectors a crash leaves old or new, those
//! records read back the same. Reads of offsets still in `mem` are served from memory, which is
//! how a buffered write is visible before it reaches the disk.
//!
//! A sealed segment is immutable: no appends, no rewrites, only whole-file deletion by compaction.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;

use glommio::io::DmaFile;

use crate::ahead::Ahead;
use crate::hint::HintEntry;
use crate::io::IO_BLOCK_BYTES;

/// Bytes of a segment still held in memory: `bytes` holds the file range `[start, start + len)`.
#[derive(Default)]
pub(crate) struct MemTail {
    pub(crate) start: u64,
    pub(crate) bytes: Vec<u8>,
}

pub(crate) struct Segment {
    pub(crate) id: u64,
    pub(crate) slot: u16,
    /// The engine's next seqno when this segment was created. A normal segment holds only
    /// records with seqno >= this; a compaction output holds only records that were live then.
    /// Tombstone reaping relies on both (see compaction).
    pub(crate) created_seqno: u64,
    pub(crate) path: PathBuf,
    pub(crate) hint_path: PathBuf,
    pub(crate) file: RefCell<Option<Rc<DmaFile>>>,
    /// Logical length: bytes appended (in memory or on disk).
    pub(crate) len: Cell<u64>,
    /// Bytes written to the file.
    pub(crate) flushed: Cell<u64>,
    /// Bytes covered by a completed fdatasync.
    pub(crate) synced: Cell<u64>,
    /// Bytes of records the index points at.
    pub(crate) live_bytes: Cell<u64>,
    /// No more appends; once flushed and synced it is immutable.
    pub(crate) sealed: Cell<bool>,
    /// Sealed, durable and its hint file written (or attempted): compaction may take it.
    pub(crate) finished: Cell<bool>,
    pub(crate) mem: RefCell<MemTail>,
    /// Hint entries of the records appended so far, written out as the hint file when sealed.
    pub(crate) hints: RefCell<Vec<HintEntry>>,
    /// Zeros written ahead of the tail of a log segment being written (`ahead.rs`).
    pub(crate) ahead: Ahead,
}

impl Segment {
    pub(crate) fn new_writable(
        dir: &std::path::Path,
        id: u64,
        slot: u16,
        created_seqno: u64,
    ) -> Self {
        Self {
            id,
            slot,
            created_seqno,
            path: segment_path(dir, id),
            hint_path: hint_path(dir, id),
            file: RefCell::new(None),
            len: Cell::new(0),
            flushed: Cell::new(0),
            synced: Cell::new(0),
            live_bytes: Cell::new(0),
            sealed: Cell::new(false),
            finished: Cell::new(false),
            mem: RefCell::new(MemTail::default()),
            hints: RefCell::new(Vec::new()),
            ahead: Ahead::default(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_sealed(
        dir: &std::path::Path,
        id: u64,
        slot: u16,
        created_seqno: u64,
        len: u64,
        file: DmaFile,
    ) -> Self {
        let s = Self::new_writable(dir, id, slot, created_seqno);
        s.len.set(len);
        s.flushed.set(len);
        s.synced.set(len);
        s.sealed.set(true);
        s.finished.set(true);
        s.ahead.stop();
        s.mem.borrow_mut().start = len;
        *s.file.borrow_mut() = Some(Rc::new(file));
        s
    }

    /// Appended bytes not yet written to the file.
    pub(crate) fn unflushed(&self) -> u64 {
        self.len.get() - self.flushed.get()
    }

    /// Copies `[offset, offset + len)` out of memory if that range is still held there.
    pub(crate) fn read_mem(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let m = self.mem.borrow();
        if offset < m.start {
            return None;
        }
        let at = (offset - m.start) as usize;
        // Invariant: a location handed out by the index lies within the appended bytes.
        assert!(
            at + len <= m.bytes.len(),
            "index points past the segment's appended bytes"
        );
        Some(m.bytes[at..at + len].to_vec())
    }

    /// After `[.., written_to)` reached the file: drop whole blocks from memory, keep the partial
    /// last block (the next flush rewrites it).
    pub(crate) fn trim_mem(&self, written_to: u64) {
        let mut m = self.mem.borrow_mut();
        let keep_from = written_to - written_to % IO_BLOCK_BYTES;
        if keep_from > m.start {
            let n = (keep_from - m.start) as usize;
            m.bytes.drain(..n);
            m.start = keep_from;
        }
    }

    /// Drops the whole memory tail once the segment is sealed and on disk.
    pub(crate) fn release_mem(&self) {
        let mut m = self.mem.borrow_mut();
        m.bytes = Vec::new();
        m.start = self.len.get();
        *self.hints.borrow_mut() = Vec::new();
    }

    pub(crate) fn file(&self) -> Option<Rc<DmaFile>> {
        self.file.borrow().clone()
    }
}

pub(crate) fn segment_path(dir: &std::path::Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

pub(crate) fn hint_path(dir: &std::path::Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.hint"))
}

/// Parses a segment file name back into its id.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}
