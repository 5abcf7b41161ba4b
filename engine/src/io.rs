//! The disk seam: every byte the engine reads or writes goes through here.
//!
//! Segment and hint files are glommio DMA files (O_DIRECT, io_uring), so the shard thread never
//! blocks on IO and the page cache never holds our data twice. The same functions consult a
//! [`FaultPlan`]: tests arm it to make the n-th write or sync fail, which is how the engine's
//! handling of IO errors (fatal, reported to every waiting writer, nothing acknowledged lost) is
//! exercised without a broken disk. An unarmed plan costs two `Cell` reads per IO.
//!
//! A sync can be made to fail in two ways ([`SyncFailure`]): instead of the syscall (the data
//! may not be durable) or after it ran (the data is durable, yet the caller is told it failed, as
//! Linux does when writeback of the file failed earlier). The engine cannot tell the two apart
//! and must not try: after a failed sync of a data file it stops (see [`crate::EngineError`]).
//!
//! The plan also holds the compaction crash points ([`CompactionStep`]): a test's child process
//! arms one and the process kills itself when compaction reaches that step, so recovery is tested
//! from each intermediate state of a pass on disk. It lives here, compiled into every build,
//! because the tests that use it are integration tests (which cannot see `cfg(test)`) and a cargo
//! feature would build the crate twice for one suite; unarmed, it costs one `Cell` read per step
//! of a pass, and nothing outside tests arms it.

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions};

use crate::error::EngineError;

/// Block size all writes are aligned to; a multiple of every O_DIRECT alignment we meet.
pub const IO_BLOCK_BYTES: u64 = 4096;
/// Largest single read issued while streaming a whole file, and the most one compaction read
/// takes of a segment's live records (a single larger record is read alone).
pub const READ_CHUNK_BYTES: usize = 1 << 20;

/// Which part of the engine an IO belongs to; faults are armed per class so a test injects
/// exactly where it means to even while background tasks do IO of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IoClass {
    /// Log segment writes and syncs by the flusher (the foreground write path).
    Log,
    /// Compaction output segments and the compaction intent file.
    Compaction,
    /// Hint files (derived data: their failures are counted, not fatal; see
    /// `docs/ARCHITECTURE.md` §3.5).
    Hint,
    /// Preparing the next segment file in advance (its directory sync).
    Spare,
    /// Zeros written ahead of the active log segment's tail (`engine/src/ahead.rs`; not fatal:
    /// a failure only stops them for that segment).
    Ahead,
}

const CLASSES: usize = 5;

/// Where an injected sync failure happens relative to the real `fdatasync` (or directory sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncFailure {
    /// Instead of the syscall: what was written may not be durable.
    BeforeSyscall,
    /// After the syscall returned success: what was written is durable, but the caller is told
    /// the sync failed (Linux reports a writeback error at the next sync of the file, whatever
    /// that sync itself achieved).
    AfterSyscall,
}

/// A step of a compaction pass at which a test can crash the process
/// ([`FaultPlan::crash_at`]). In the order a pass reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CompactionStep {
    /// The first output segment is written, not yet synced; the index still points at the
    /// inputs and no intent exists.
    OutputWritten,
    /// Every output is durable and the index switched to the copies; no intent yet.
    OutputsSynced,
    /// The intent (ids of the inputs) is written and synced, with its directory; nothing is
    /// deleted yet.
    IntentSynced,
    /// The files of the first input are removed, those of the others not yet.
    FirstInputRemoved,
    /// Every input is removed and the directory synced; the intent is still there.
    InputsRemoved,
}

impl CompactionStep {
    /// Every step, in the order a pass reaches them.
    pub const ALL: [CompactionStep; 5] = [
        CompactionStep::OutputWritten,
        CompactionStep::OutputsSynced,
        CompactionStep::IntentSynced,
        CompactionStep::FirstInputRemoved,
        CompactionStep::InputsRemoved,
    ];
}

/// Injected IO failures and crash points, for tests. Per class, a countdown on writes and one on syncs; when a
/// countdown reaches zero that operation fails (once per arming).
#[derive(Debug, Default)]
pub struct FaultPlan {
    writes_until_failure: [Cell<Option<u64>>; CLASSES],
    syncs_until_failure: [Cell<Option<(u64, SyncFailure)>>; CLASSES],
    writes: [Cell<u64>; CLASSES],
    syncs: [Cell<u64>; CLASSES],
    crash_at: Cell<Option<CompactionStep>>,
}

impl FaultPlan {
    /// A plan that injects nothing until armed.
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// Makes the write of `class` after `n` more successful ones fail (0: the next one).
    pub fn fail_write_after(&self, class: IoClass, n: u64) {
        self.writes_until_failure[class as usize].set(Some(n));
    }

    /// Makes the sync of `class` after `n` more successful ones fail (0: the next one), before
    /// or after the real syscall.
    pub fn fail_sync_after(&self, class: IoClass, n: u64, when: SyncFailure) {
        self.syncs_until_failure[class as usize].set(Some((n, when)));
    }

    /// Kills the process with SIGKILL (no destructor, no flush, no core dump) when a compaction
    /// pass reaches `step`. Only for a test's child process: whoever arms this loses the process.
    pub fn crash_at(&self, step: CompactionStep) {
        self.crash_at.set(Some(step));
    }

    /// Called by compaction at each of its steps.
    #[allow(unsafe_code)]
    pub(crate) fn reached(&self, step: CompactionStep) {
        if self.crash_at.get() == Some(step) {
            // SAFETY: kill(2) on our own pid takes no pointers; SIGKILL cannot be caught, so
            // the call does not return.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            unreachable!("SIGKILL to ourselves returned");
        }
    }

    /// Writes of `class` issued so far (successful or not).
    pub fn writes(&self, class: IoClass) -> u64 {
        self.writes[class as usize].get()
    }

    /// Syncs of `class` issued so far (successful or not).
    pub fn syncs(&self, class: IoClass) -> u64 {
        self.syncs[class as usize].get()
    }

    /// Counts one operation; whether the countdown picks this one.
    fn tick(count: &Cell<u64>, countdown: &Cell<Option<u64>>) -> bool {
        count.set(count.get() + 1);
        match countdown.get() {
            Some(0) => {
                countdown.set(None);
                true
            }
            Some(n) => {
                countdown.set(Some(n - 1));
                false
            }
            None => false,
        }
    }

    fn write_fails(&self, class: IoClass) -> bool {
        let i = class as usize;
        Self::tick(&self.writes[i], &self.writes_until_failure[i])
    }

    fn sync_fails(&self, class: IoClass) -> Option<SyncFailure> {
        let i = class as usize;
        self.syncs[i].set(self.syncs[i].get() + 1);
        let countdown = &self.syncs_until_failure[i];
        match countdown.get() {
            Some((0, when)) => {
                countdown.set(None);
                Some(when)
            }
            Some((n, when)) => {
                countdown.set(Some((n - 1, when)));
                None
            }
            None => None,
        }
    }
}

fn injected(what: &str) -> std::io::Error {
    std::io::Error::other(format!("injected {what} failure"))
}

/// A sync operation as errors name it: the operation, and the words of an injected failure.
type SyncOp = (&'static str, &'static str);
const FDATASYNC: SyncOp = ("fdatasync", "fdatasync");
const DIR_SYNC: SyncOp = ("sync dir", "directory sync");

/// The error of sync operation `op` on `path` if the injected `fault` is the one for this
/// moment, before or after the syscall (`at`).
fn injected_sync(
    fault: Option<SyncFailure>,
    at: SyncFailure,
    (op, what): SyncOp,
    path: &Path,
) -> Result<(), EngineError> {
    if fault != Some(at) {
        return Ok(());
    }
    let what = match at {
        SyncFailure::BeforeSyscall => what.to_owned(),
        SyncFailure::AfterSyscall => format!("{what} (after the syscall)"),
    };
    Err(EngineError::io(op, path, injected(&what)))
}

/// Opens (creating if needed) a file for reading and writing with O_DIRECT.
pub async fn open_rw(path: &Path, create_new: bool) -> Result<DmaFile, EngineError> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if create_new {
        o.create_new(true);
    }
    o.dma_open(path)
        .await
        .map_err(|e| EngineError::io("open", path, e.into()))
}

/// Creates a log segment file: O_DIRECT and O_DSYNC. A write to it is durable once it completes
/// (synchronized I/O data integrity, the file's size included), so a group commit is one write
/// per segment instead of a write and an `fdatasync`; the `fdatasync` could not run inline in
/// io_uring and went through a kernel worker thread and two context switches every time.
pub async fn create_log(path: &Path) -> Result<DmaFile, EngineError> {
    let mut o = OpenOptions::new();
    o.read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DSYNC);
    o.dma_open(path)
        .await
        .map_err(|e| EngineError::io("open", path, e.into()))
}

/// The sync point of a file created by [`create_log`]: its writes were durable when they
/// completed, so nothing is left to do but what a test injected for the sync (counted like the
/// `fdatasync` it replaces, so a sync fault armed for the log still fires at a group commit).
pub fn synced_by_writes(
    path: &Path,
    faults: &FaultPlan,
    class: IoClass,
) -> Result<(), EngineError> {
    let fault = faults.sync_fails(class);
    injected_sync(fault, SyncFailure::BeforeSyscall, FDATASYNC, path)?;
    injected_sync(fault, SyncFailure::AfterSyscall, FDATASYNC, path)
}

/// Opens a file read-only with O_DIRECT.
pub async fn open_ro(path: &Path) -> Result<DmaFile, EngineError> {
    DmaFile::open(path)
        .await
        .map_err(|e| EngineError::io("open", path, e.into()))
}

/// Copies `data` into a DMA buffer zero-padded to whole blocks. Synchronous, so callers can copy
/// out of a `RefCell` before awaiting the write.
pub fn dma_copy(file: &DmaFile, data: &[u8]) -> DmaBuffer {
    let padded = (data.len() as u64).next_multiple_of(IO_BLOCK_BYTES) as usize;
    let mut buf = file.alloc_dma_buffer(padded.max(IO_BLOCK_BYTES as usize));
    let bytes = buf.as_bytes_mut();
    bytes[..data.len()].copy_from_slice(data);
    bytes[data.len()..].fill(0);
    buf
}

/// Writes a block-padded buffer (from [`dma_copy`]) at the block-aligned `pos`.
pub async fn write_buf(
    file: &DmaFile,
    path: &Path,
    faults: &FaultPlan,
    class: IoClass,
    pos: u64,
    buf: DmaBuffer,
) -> Result<(), EngineError> {
    assert!(
        pos.is_multiple_of(IO_BLOCK_BYTES),
        "writes start on a block boundary"
    );
    assert!(
        (buf.len() as u64).is_multiple_of(IO_BLOCK_BYTES),
        "writes cover whole blocks"
    );
    if faults.write_fails(class) {
        return Err(EngineError::io("write", path, injected("write")));
    }
    let want = buf.len();
    let n = file
        .write_at(buf, pos)
        .await
        .map_err(|e| EngineError::io("write", path, e.into()))?;
    if n != want {
        return Err(EngineError::io(
            "write",
            path,
            std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write: {n} of {want}"),
            ),
        ));
    }
    Ok(())
}

/// `fdatasync`s a file.
pub async fn sync(
    file: &DmaFile,
    path: &Path,
    faults: &FaultPlan,
    class: IoClass,
) -> Result<(), EngineError> {
    let fault = faults.sync_fails(class);
    injected_sync(fault, SyncFailure::BeforeSyscall, FDATASYNC, path)?;
    file.fdatasync()
        .await
        .map_err(|e| EngineError::io("fdatasync", path, e.into()))?;
    injected_sync(fault, SyncFailure::AfterSyscall, FDATASYNC, path)
}

/// Bytes read from a file (or a segment's memory tail): the DMA buffer of the read itself, with
/// no second copy, or a copy when they came from memory or from more than one read.
pub enum ReadBytes {
    /// A copy.
    Mem(Vec<u8>),
    /// The read's own buffer.
    Disk(glommio::io::ReadResult),
}

impl std::ops::Deref for ReadBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadBytes::Mem(v) => v,
            ReadBytes::Disk(r) => r,
        }
    }
}

/// Reads `len` bytes at `pos` (any alignment). Returns fewer bytes only at end of file: a read
/// that comes back short before the end is continued from where it stopped.
pub async fn read_exact_at(
    file: &DmaFile,
    path: &Path,
    pos: u64,
    len: usize,
) -> Result<ReadBytes, EngineError> {
    let read = |at: u64, want: usize| async move {
        file.read_at(at, want)
            .await
            .map_err(|e| EngineError::io("read", path, e.into()))
    };
    let r = read(pos, len).await?;
    if r.len() >= len || r.is_empty() {
        return Ok(ReadBytes::Disk(r));
    }
    let mut v = r.to_vec();
    while v.len() < len {
        let more = read(pos + v.len() as u64, len - v.len()).await?;
        if more.is_empty() {
            break;
        }
        v.extend_from_slice(&more);
    }
    Ok(ReadBytes::Mem(v))
}

/// A file read from its start in chunks of at most [`READ_CHUNK_BYTES`], up to the size it had
/// when the reading began.
pub struct Chunks<'a> {
    file: &'a DmaFile,
    path: &'a Path,
    pos: u64,
    size: u64,
}

impl<'a> Chunks<'a> {
    /// Starts reading `file`.
    pub async fn new(file: &'a DmaFile, path: &'a Path) -> Result<Chunks<'a>, EngineError> {
        let size = file
            .file_size()
            .await
            .map_err(|e| EngineError::io("stat", path, e.into()))?;
        Ok(Chunks {
            file,
            path,
            pos: 0,
            size,
        })
    }

    /// The file's size when the reading began.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk, or `None` at the end (also an end that came early, the file cut short).
    pub async fn next(&mut self) -> Result<Option<ReadBytes>, EngineError> {
        if self.pos >= self.size {
            return Ok(None);
        }
        let want = READ_CHUNK_BYTES.min((self.size - self.pos) as usize);
        let r = read_exact_at(self.file, self.path, self.pos, want).await?;
        if r.is_empty() {
            return Ok(None);
        }
        self.pos += r.len() as u64;
        Ok(Some(r))
    }
}

/// Reads a whole file into memory in bounded chunks.
pub async fn read_all(file: &DmaFile, path: &Path) -> Result<Vec<u8>, EngineError> {
    let mut chunks = Chunks::new(file, path).await?;
    let mut out = Vec::with_capacity(chunks.size() as usize);
    while let Some(r) = chunks.next().await? {
        out.extend_from_slice(&r);
        glommio::yield_if_needed().await;
    }
    Ok(out)
}

/// Writes a small whole file (hint files) durably: create, write, sync, close.
pub async fn write_file(
    path: &Path,
    faults: &FaultPlan,
    class: IoClass,
    data: &[u8],
) -> Result<(), EngineError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(path)
        .await
        .map_err(|e| EngineError::io("create", path, e.into()))?;
    write_buf(&file, path, faults, class, 0, dma_copy(&file, data)).await?;
    sync(&file, path, faults, class).await?;
    file.close()
        .await
        .map_err(|e| EngineError::io("close", path, e.into()))
}

/// Truncates a file to `len` bytes and syncs it.
pub async fn truncate(path: &Path, len: u64) -> Result<(), EngineError> {
    let file = open_rw(path, false).await?;
    file.truncate(len)
        .await
        .map_err(|e| EngineError::io("truncate", path, e.into()))?;
    file.fdatasync()
        .await
        .map_err(|e| EngineError::io("fdatasync", path, e.into()))?;
    file.close()
        .await
        .map_err(|e| EngineError::io("close", path, e.into()))
}

/// Removes a file; a file that is already gone is not an error.
pub async fn remove(path: &Path) -> Result<(), EngineError> {
    match glommio::io::remove(path).await {
        Ok(()) => Ok(()),
        Err(e) => {
            let e: std::io::Error = e.into();
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(EngineError::io("remove", path, e))
            }
        }
    }
}

/// Syncs a directory so file creations and removals in it are durable (a sync of `class`).
pub async fn sync_dir(path: &Path, faults: &FaultPlan, class: IoClass) -> Result<(), EngineError> {
    let fault = faults.sync_fails(class);
    injected_sync(fault, SyncFailure::BeforeSyscall, DIR_SYNC, path)?;
    let d = glommio::io::Directory::open(path)
        .await
        .map_err(|e| EngineError::io("open dir", path, e.into()))?;
    d.sync()
        .await
        .map_err(|e| EngineError::io("sync dir", path, e.into()))?;
    d.close()
        .await
        .map_err(|e| EngineError::io("close dir", path, e.into()))?;
    injected_sync(fault, SyncFailure::AfterSyscall, DIR_SYNC, path)
}
