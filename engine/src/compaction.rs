//! Compaction: rewrite the live records of mostly-garbage segments into new segments, then delete
//! the old files.
//!
//! It runs in its own glommio task queue (explicit shares that `set_compaction_shares` adjusts,
//! `Latency::NotImportant`) and yields often, so foreground requests keep their latency. Correctness against concurrent writers:
//! - a record is copied only if the index points at it when it is looked at;
//! - the index is switched to the copy only after the copy is durable, and only if the entry still
//!   points at the original (compare-and-set): a write that superseded the key meanwhile wins and
//!   the copy is garbage;
//! - inputs are deleted after the outputs are durable, and through an intent file written first,
//!   so a crash in the middle of deleting finishes the deletion at the next open rather than leaving
//!   a tombstone's file gone while the older value it shadows survives.
//!
//! Tombstones and partition-drop markers are reaped (not copied) when no surviving segment can
//! still hold an older record of their key: every segment outside this pass was created after
//! the marker's seqno. Segments record the seqno counter at their creation for this purpose. A
//! tombstone in an old segment that never reaches the garbage threshold stays (costing its index
//! entry) until that segment is compacted.
//!
//! Sealed segments smaller than an eighth of `segment_bytes` are merged whenever there are two or
//! more of them, so a store that restarts often does not pile up small files.
//!
//! Each step of that protocol is a crash point tests can arm ([`crate::io::CompactionStep`]), so
//! recovery is tested from every state a pass can leave on disk.
//!
//! An input is listed from its hint file, and only the records the index still points at are
//! read, each checked against its entry; without a usable hint the whole segment is read and
//! scanned. A damaged record met while copying is counted, logged and dropped; if the index
//! pointed at it, the key is removed from the index (the cluster's anti-entropy repairs it from a
//! replica).

use std::rc::{Rc, Weak};
use std::time::Duration;

use std::path::Path;

use glommio::io::DmaFile;

use crate::engine::{Inner, State, Wake, append_raw, finish_sealed, flush_segment};
use crate::error::EngineError;
use crate::hint::{HINT_ENTRY_BYTES, HintEntry, HintStream};
use crate::index::{Entry, KeyHash, Location};
use crate::io::{self, CompactionStep, IoClass, ReadBytes};
use crate::record::{self, RecordKind};
use crate::recovery::{INTENT_FILE, parse_intent};
use crate::scan::{self, ScanOutcome};
use crate::segment::{Segment, hint_path, segment_path};

/// Sealed segments shorter than `segment_bytes / SMALL_SEGMENT_FRACTION` are merged.
const SMALL_SEGMENT_FRACTION: u64 = 8;
/// Memory tail of a compaction output is written out once it reaches this many bytes.
const OUTPUT_FLUSH_BYTES: u64 = 1 << 20;

/// What one compaction pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Segments rewritten and deleted.
    pub segments_compacted: usize,
    /// Bytes of the deleted segments.
    pub bytes_before: u64,
    /// Bytes of the segments written.
    pub bytes_after: u64,
    /// Records copied.
    pub records_copied: u64,
    /// Tombstones and drop markers reaped.
    pub tombstones_reaped: u64,
    /// Damaged records found in the inputs.
    pub damaged_records: u64,
}

struct Move {
    partition: u32,
    key: KeyHash,
    from: Location,
    to: Location,
    entry: Entry,
}

/// Bytes between two live records below which one read takes both, rather than two reads
/// each with a round trip to the disk.
const READ_GAP_BYTES: u64 = 64 << 10;

/// Hint bytes checked, and their entries looked up in the index, between two chances to yield
/// to foreground work (`yield_if_needed`): 1,024 entries.
const HINT_PIECE_BYTES: usize = 1024 * HINT_ENTRY_BYTES;

/// Where a pass finds one input's records, and their bytes.
enum Source {
    /// The records its hint file lists that the index still pointed at when the pass read the
    /// hint: the rest are garbage for good, since nothing points the index back into a sealed
    /// segment. Only the bytes around these are read, a window at a time, and each record is
    /// checked against its entry before it is copied.
    Hinted {
        entries: Vec<HintEntry>,
        /// The last bytes read and the offset they start at.
        window: Option<(u64, ReadBytes)>,
        /// Records that failed their check: `(partition, key, where)`.
        damaged: Vec<(u32, KeyHash, Location)>,
    },
    /// The whole segment read into memory and scanned (no usable hint file).
    Scanned { bytes: Vec<u8>, scan: ScanOutcome },
}

impl Source {
    fn entries(&self) -> &[HintEntry] {
        match self {
            Source::Hinted { entries, .. } => entries,
            Source::Scanned { scan, .. } => &scan.entries,
        }
    }

    /// The bytes of entry `i`, or `None` if they are damaged (noted in `damaged`).
    async fn record(
        &mut self,
        inner: &Inner,
        file: &DmaFile,
        path: &Path,
        slot: u16,
        i: usize,
    ) -> Result<Option<&[u8]>, EngineError> {
        let (entries, window, damaged) = match self {
            Source::Scanned { bytes, scan } => {
                let e = &scan.entries[i];
                return Ok(Some(&bytes[e.offset as usize..(e.offset + e.len) as usize]));
            }
            Source::Hinted {
                entries,
                window,
                damaged,
            } => (entries, window, damaged),
        };
        let e = entries[i];
        let (start, end) = (e.offset as u64, e.offset as u64 + e.len as u64);
        let covered =
            matches!(window, Some((at, r)) if *at <= start && end <= *at + r.len() as u64);
        if !covered {
            // One read takes the following records too while they are close and it stays
            // within a chunk.
            let mut last = end;
            for next in &entries[i + 1..] {
                let (s, t) = (next.offset as u64, next.offset as u64 + next.len as u64);
                if s - last > READ_GAP_BYTES || t - start > io::READ_CHUNK_BYTES as u64 {
                    break;
                }
                last = t;
            }
            let r = io::read_exact_at(file, path, start, (last - start) as usize).await?;
            count_read(inner, r.len());
            *window = Some((start, r));
        }
        let Some((at, r)) = window.as_ref() else {
            unreachable!("the window was just read")
        };
        let from = (start - at) as usize;
        let bytes = r.get(from..from + e.len as usize);
        // A short read (a file cut behind our back) or bytes that are not the listed record
        // are damage, like a record that fails its CRC.
        let intact = bytes.and_then(|b| record::decode(b).ok().map(|r| (b, r)));
        match intact {
            Some((b, r)) if r.len == b.len() && scan::entry_of(&r, e.offset as usize) == e => {
                Ok(Some(b))
            }
            _ => {
                let loc = Location {
                    slot,
                    offset: start,
                    len: e.len,
                };
                damaged.push((e.partition, e.key, loc));
                Ok(None)
            }
        }
    }
}

/// The records of `input` its hint file lists that the index still points at (and current drop
/// markers), or `None` if the hint is missing, unreadable or not this segment's: the pass then
/// scans the segment instead, as recovery does.
async fn hinted_records(inner: &Inner, input: &Segment) -> Option<Vec<HintEntry>> {
    let file = io::open_ro(&input.hint_path).await.ok()?;
    match live_in_hint(inner, input, &file).await {
        Ok(kept) => kept,
        Err(e) => {
            tracing::warn!(error = %e, "could not read a hint file; compaction scans its segment");
            None
        }
    }
}

/// [`hinted_records`] from the opened hint `file`: `Ok(None)` if it is not a valid hint of
/// `input`.
async fn live_in_hint(
    inner: &Inner,
    input: &Segment,
    file: &DmaFile,
) -> Result<Option<Vec<HintEntry>>, EngineError> {
    // Read and checked a piece at a time, with a chance to yield between pieces: a 64 MiB segment
    // of small records has a hint of about 15 MB, which parsed in one step held the thread for
    // about 5 ms. An entry is kept as soon as it is read, and trusted only once the whole file
    // passed its check.
    let mut chunks = io::Chunks::new(file, &input.hint_path).await?;
    let mut stream = HintStream::new();
    let mut kept = Vec::new();
    let mut piece_entries = Vec::with_capacity(HINT_PIECE_BYTES / HINT_ENTRY_BYTES);
    while let Some(chunk) = chunks.next().await? {
        for piece in chunk.chunks(HINT_PIECE_BYTES) {
            piece_entries.clear();
            if !stream.feed(piece, |e| piece_entries.push(e)) {
                return Ok(None);
            }
            keep_live(&inner.st.borrow(), input, &piece_entries, &mut kept);
            glommio::yield_if_needed().await;
        }
    }
    Ok(stream
        .finish()
        .filter(|h| h.segment_id == input.id && h.data_len as u64 == input.len.get())
        .map(|_| kept))
}

/// Appends to `kept` the entries of `entries` that are still live in `input`: records the index
/// points at there, and drop markers still current.
fn keep_live(st: &State, input: &Segment, entries: &[HintEntry], kept: &mut Vec<HintEntry>) {
    for (i, e) in entries.iter().enumerate() {
        // The index line of the entry a few ahead is asked for now: the lookups then wait for
        // memory side by side, not one after another (each is a cache miss once the index
        // outgrows the CPU's caches).
        if let Some(ahead) = entries.get(i + crate::index::PREFETCH_AHEAD) {
            st.index.prefetch_hinted(ahead);
        }
        let live = match e.kind {
            RecordKind::SegmentHeader => false,
            RecordKind::Put | RecordKind::Tombstone => st
                .index
                .get(e.partition, e.key)
                .is_some_and(|cur| cur.loc.slot == input.slot && cur.loc.offset == e.offset as u64),
            RecordKind::DropPartition => st.dropped.get(&e.partition) == Some(&e.seqno),
        };
        if live {
            kept.push(*e);
        }
    }
}

/// Counts segment bytes a pass read.
fn count_read(inner: &Inner, bytes: usize) {
    let c = &inner.counters;
    c.compaction_bytes_read
        .set(c.compaction_bytes_read.get() + bytes as u64);
}

/// Clears the "compaction running" flag however the pass ends.
struct Running<'a>(&'a Inner);
impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.st.borrow_mut().compacting = false;
    }
}

/// The background compactor: every `every`, one pass if any segment is over the threshold.
pub(crate) async fn background(weak: Weak<Inner>, wake: Rc<Wake>, every: Duration) {
    loop {
        futures_lite::future::or(glommio::timer::sleep(every), wake.wait()).await;
        if wake.is_shutdown() {
            return;
        }
        let Some(inner) = weak.upgrade() else { return };
        if let Err(e) = run(&inner).await {
            tracing::warn!(error = %e, "compaction pass failed");
            if inner.st.borrow().failed.is_some() {
                return;
            }
        }
    }
}

/// Marks the engine failed: compaction IO errors are as fatal as flush errors.
fn fail(inner: &Inner, e: EngineError) -> EngineError {
    let mut st = inner.st.borrow_mut();
    if st.failed.is_none() {
        tracing::error!(error = %e, "compaction IO failed; the store is now read-only until reopened");
        st.failed = Some(std::sync::Arc::new(e.clone()));
        for w in std::mem::take(&mut st.waiters) {
            w.wake();
        }
    }
    e
}

/// Tombstones beyond this share of index entries (and `TOMBSTONES_MIN`) make compaction rotate
/// the oldest segments regardless of their garbage, so the reaping floor advances.
const TOMBSTONE_SHARE_MAX: f64 = 0.1;
const TOMBSTONES_MIN: usize = 1024;

/// An output segment under construction. If the pass ends early (an error, or the caller dropped
/// the future), the output must neither vanish from the segment table while its file exists (the
/// reaping floor has to see it) nor hold the floor down forever: it is handed to compaction as
/// a finished, all-garbage segment, or freed if it never reached the disk.
struct Output<'a> {
    inner: &'a Inner,
    seg: Option<Rc<Segment>>,
}

impl Drop for Output<'_> {
    fn drop(&mut self) {
        let Some(o) = self.seg.take() else { return };
        let mut st = self.inner.st.borrow_mut();
        if o.file().is_some() {
            o.sealed.set(true);
            o.finished.set(true);
        } else {
            st.free_slot(o.slot);
        }
    }
}

/// Finishes the deletions of an earlier pass that was interrupted after writing its intent: the
/// listed segments that are no longer in the segment table are removed; those still in it were
/// never released (the pass stopped before) and stay.
async fn finish_pending_intent(inner: &Inner) -> Result<(), EngineError> {
    let path = inner.cfg.dir.join(INTENT_FILE);
    let Ok(file) = io::open_ro(&path).await else {
        return Ok(());
    };
    let bytes = io::read_all(&file, &path).await?;
    drop(file);
    let ids = parse_intent(&bytes).unwrap_or_default();
    for id in ids {
        let registered = inner
            .st
            .borrow()
            .segments
            .iter()
            .flatten()
            .any(|s| s.id == id);
        if !registered {
            io::remove(&segment_path(&inner.cfg.dir, id)).await?;
            io::remove(&hint_path(&inner.cfg.dir, id)).await?;
        }
    }
    io::sync_dir(&inner.cfg.dir, &inner.faults, IoClass::Compaction).await?;
    io::remove(&path).await
}

/// Picks the inputs of a pass: mostly-garbage segments, small ones, and, while tombstones pile up,
/// the oldest ones.
fn pick_inputs(inner: &Inner, st: &crate::engine::State) -> Vec<Rc<Segment>> {
    let finished: Vec<(f64, Rc<Segment>)> = st
        .segments
        .iter()
        .flatten()
        .filter(|s| s.finished.get())
        .map(|s| {
            (
                1.0 - s.live_bytes.get() as f64 / s.len.get().max(1) as f64,
                s.clone(),
            )
        })
        .collect();
    // Small sealed segments (every open starts a new segment, so frequent restarts leave
    // many) are merged once there are two of them, whatever their garbage ratio.
    let small = |s: &Segment| s.len.get() < inner.cfg.segment_bytes / SMALL_SEGMENT_FRACTION;
    let smalls = finished.iter().filter(|(_, s)| small(s)).count();
    let mut candidates: Vec<(f64, Rc<Segment>)> = finished
        .iter()
        .filter(|(g, s)| *g >= inner.cfg.compaction_garbage_ratio || (smalls >= 2 && small(s)))
        .cloned()
        .collect();
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
    candidates.truncate(inner.cfg.compaction_segments_max);
    // One old segment that never gathers garbage holds the reaping floor down for every newer
    // tombstone; rewriting the oldest segments moves it.
    let tombstones = st.index.tombstones();
    if tombstones > TOMBSTONES_MIN
        && tombstones as f64 > TOMBSTONE_SHARE_MAX * st.index.len() as f64
    {
        let mut oldest: Vec<&Rc<Segment>> = finished.iter().map(|(_, s)| s).collect();
        oldest.sort_by_key(|s| (s.created_seqno, s.id));
        for s in oldest {
            if candidates.len() >= inner.cfg.compaction_segments_max.max(2) {
                break;
            }
            if !candidates.iter().any(|(_, c)| Rc::ptr_eq(c, s)) {
                candidates.push((0.0, s.clone()));
            }
        }
    }
    candidates.into_iter().map(|(_, s)| s).collect()
}

/// One compaction pass.
pub(crate) async fn run(inner: &Rc<Inner>) -> Result<CompactionReport, EngineError> {
    {
        let mut st = inner.st.borrow_mut();
        st.check_usable()?;
        if st.compacting {
            return Ok(CompactionReport::default());
        }
        st.compacting = true;
    }
    let _running = Running(inner);
    finish_pending_intent(inner)
        .await
        .map_err(|e| fail(inner, e))?;
    let (inputs, floor, pass_seqno) = {
        let st = inner.st.borrow();
        let inputs = pick_inputs(inner, &st);
        if inputs.is_empty() {
            return Ok(CompactionReport::default());
        }
        let floor = st
            .segments
            .iter()
            .flatten()
            .filter(|s| !inputs.iter().any(|i| Rc::ptr_eq(i, s)))
            .map(|s| s.created_seqno)
            .fold(st.next_seqno, u64::min);
        (inputs, floor, st.next_seqno)
    };
    let mut report = CompactionReport::default();
    let mut out = Output { inner, seg: None };
    let mut moves: Vec<Move> = Vec::new();
    // Tombstones and drop markers found reapable; applied only once the inputs' deletion is
    // durably decided, so a pass that stops early leaves the index as it found it (but for the
    // keys of damaged records, which leave it once their input is read).
    let mut reaps: Vec<(u32, KeyHash, Location)> = Vec::new();
    let mut drop_reaps: Vec<(u32, u64)> = Vec::new();

    for input in &inputs {
        let file = input.file().expect("finished segments have files");
        report.bytes_before += input.len.get();
        let mut source = match hinted_records(inner, input).await {
            Some(entries) => Source::Hinted {
                entries,
                window: None,
                damaged: Vec::new(),
            },
            None => {
                let mut bytes = io::read_all(&file, &input.path)
                    .await
                    .map_err(|e| fail(inner, e))?;
                count_read(inner, bytes.len());
                bytes.truncate(input.len.get() as usize);
                let scan = scan::scan(&bytes);
                Source::Scanned { bytes, scan }
            }
        };
        for i in 0..source.entries().len() {
            let e = source.entries()[i];
            glommio::yield_if_needed().await;
            // A full output is finished before the next decision, so deciding whether a record
            // is live and appending it happen with no await in between.
            if let Some(o) = &out.seg
                && o.len.get() + e.len as u64 > inner.cfg.segment_bytes
            {
                let o = o.clone();
                finish_output(inner, &o, &mut moves, &mut report).await?;
                out.seg = None;
            }
            let from = Location {
                slot: input.slot,
                offset: e.offset as u64,
                len: e.len,
            };
            // The record's bytes are at hand before the decision, since reading them awaits.
            let Some(rec) = source
                .record(inner, &file, &input.path, input.slot, i)
                .await
                .map_err(|e| fail(inner, e))?
            else {
                continue;
            };
            // Decide and pick the output in one borrow; no await until the record is appended.
            let target = {
                let mut st = inner.st.borrow_mut();
                let copy = match e.kind {
                    RecordKind::SegmentHeader => false,
                    RecordKind::Put | RecordKind::Tombstone => {
                        match st.index.get(e.partition, e.key) {
                            Some(cur) if cur.loc == from => {
                                if cur.tombstone && e.seqno < floor {
                                    reaps.push((e.partition, e.key, from));
                                    false
                                } else {
                                    true
                                }
                            }
                            _ => false,
                        }
                    }
                    RecordKind::DropPartition => {
                        if st.dropped.get(&e.partition) != Some(&e.seqno) {
                            false
                        } else if e.seqno < floor {
                            drop_reaps.push((e.partition, e.seqno));
                            false
                        } else {
                            true
                        }
                    }
                };
                match (&out.seg, copy) {
                    (_, false) => None,
                    (Some(o), true) => Some(o.clone()),
                    (None, true) => {
                        // Dated at the pass's start: every record copied in was live at or
                        // after that point, which is what the reaping floor needs.
                        let o = st.new_segment(&inner.cfg, false, pass_seqno)?;
                        out.seg = Some(o.clone());
                        Some(o)
                    }
                }
            };
            let Some(o) = target else { continue };
            let to = append_raw(&o, rec, e);
            report.records_copied += 1;
            if matches!(e.kind, RecordKind::Put | RecordKind::Tombstone) {
                let entry = Entry {
                    loc: to,
                    tombstone: e.kind == RecordKind::Tombstone,
                    version: e.version,
                };
                moves.push(Move {
                    partition: e.partition,
                    key: e.key,
                    from,
                    to,
                    entry,
                });
            }
            if o.unflushed() >= OUTPUT_FLUSH_BYTES {
                flush_segment(inner, &o, IoClass::Compaction)
                    .await
                    .map_err(|e| fail(inner, e))?;
            }
        }
        if let Source::Hinted { damaged, .. } = &source
            && !damaged.is_empty()
        {
            // A record the hint listed failed its check when read: the key is lost here, unless
            // it was written again meanwhile.
            let mut lost = 0u64;
            let mut st = inner.st.borrow_mut();
            for (p, key, loc) in damaged {
                lost += st.index.remove_if(*p, *key, *loc).is_some() as u64;
            }
            report.damaged_records += damaged.len() as u64;
            tracing::error!(path = %input.path.display(), lost_keys = lost, "compaction found damaged records");
        }
        if let Source::Scanned { scan: s, .. } = &source
            && s.damaged()
        {
            // Entries pointing into damaged bytes were not copied; forget them.
            let mut lost = 0u64;
            let slot = input.slot;
            let mut st = inner.st.borrow_mut();
            let moving: std::collections::HashSet<(u32, u64)> = moves
                .iter()
                .filter(|m| m.from.slot == slot)
                .map(|m| (m.partition, m.from.offset))
                .chain(
                    reaps
                        .iter()
                        .filter(|r| r.2.slot == slot)
                        .map(|r| (r.0, r.2.offset)),
                )
                .collect();
            st.index.retain(|p, e| {
                let dangling = e.loc.slot == slot && !moving.contains(&(p, e.loc.offset));
                lost += dangling as u64;
                !dangling
            });
            report.damaged_records +=
                (s.corrupt_regions.len() + s.torn_tail.is_some() as usize) as u64;
            tracing::error!(path = %input.path.display(), lost_keys = lost, "compaction found damaged records");
        }
    }
    if let Some(o) = out.seg.clone() {
        finish_output(inner, &o, &mut moves, &mut report).await?;
        out.seg = None;
    }
    // A record was left behind because a newer one superseded it; that newer one may still be
    // only in memory. Make the log durable before the inputs can go.
    crate::engine::flush_all(inner).await?;
    inner.faults.reached(CompactionStep::OutputsSynced);
    // Every live record of the inputs now lives elsewhere (or is reaped); record the intent to
    // delete them durably, then delete.
    let ids: Vec<u64> = inputs.iter().map(|s| s.id).collect();
    let intent_path = inner.cfg.dir.join(INTENT_FILE);
    let mut intent = (ids.len() as u32).to_le_bytes().to_vec();
    for id in &ids {
        intent.extend_from_slice(&id.to_le_bytes());
    }
    let crc = crc32fast::hash(&intent);
    intent.extend_from_slice(&crc.to_le_bytes());
    io::write_file(&intent_path, &inner.faults, IoClass::Compaction, &intent)
        .await
        .map_err(|e| fail(inner, e))?;
    io::sync_dir(&inner.cfg.dir, &inner.faults, IoClass::Compaction)
        .await
        .map_err(|e| fail(inner, e))?;
    inner.faults.reached(CompactionStep::IntentSynced);
    {
        let mut st = inner.st.borrow_mut();
        for (p, key, loc) in reaps {
            if st.index.remove_if(p, key, loc).is_some() {
                report.tombstones_reaped += 1;
            }
        }
        for (p, seqno) in drop_reaps {
            if st.dropped.get(&p) == Some(&seqno) {
                st.dropped.remove(&p);
                report.tombstones_reaped += 1;
            }
        }
        for s in &inputs {
            st.free_slot(s.slot);
        }
    }
    for (i, s) in inputs.iter().enumerate() {
        io::remove(&s.path).await.map_err(|e| fail(inner, e))?;
        io::remove(&s.hint_path).await.map_err(|e| fail(inner, e))?;
        if i == 0 {
            inner.faults.reached(CompactionStep::FirstInputRemoved);
        }
    }
    io::sync_dir(&inner.cfg.dir, &inner.faults, IoClass::Compaction)
        .await
        .map_err(|e| fail(inner, e))?;
    inner.faults.reached(CompactionStep::InputsRemoved);
    io::remove(&intent_path).await.map_err(|e| fail(inner, e))?;
    report.segments_compacted = inputs.len();
    let c = &inner.counters;
    c.compactions.set(c.compactions.get() + 1);
    c.compaction_bytes_reclaimed.set(
        c.compaction_bytes_reclaimed.get() + report.bytes_before.saturating_sub(report.bytes_after),
    );
    c.tombstones_reaped
        .set(c.tombstones_reaped.get() + report.tombstones_reaped);
    c.compaction_damaged_records
        .set(c.compaction_damaged_records.get() + report.damaged_records);
    tracing::debug!(?report, "compaction pass done");
    Ok(report)
}

/// Makes an output segment durable, writes its hint, then points the index at the copies that
/// are still current.
async fn finish_output(
    inner: &Inner,
    o: &Segment,
    moves: &mut Vec<Move>,
    report: &mut CompactionReport,
) -> Result<(), EngineError> {
    o.sealed.set(true);
    flush_segment(inner, o, IoClass::Compaction)
        .await
        .map_err(|e| fail(inner, e))?;
    inner.faults.reached(CompactionStep::OutputWritten);
    let file = o.file().expect("a flushed output has a file");
    io::sync(&file, &o.path, &inner.faults, IoClass::Compaction)
        .await
        .map_err(|e| fail(inner, e))?;
    o.synced.set(o.len.get());
    report.bytes_after += o.len.get();
    finish_sealed(inner, o).await;
    let mut st = inner.st.borrow_mut();
    let mut cache = inner.cache.borrow_mut();
    for m in moves.drain(..) {
        if st.index.replace_if(m.partition, m.key, m.from, m.entry) {
            cache.relocate(m.partition, m.key, m.from, m.to);
            st.account_replace(
                Some(Entry {
                    loc: m.from,
                    ..m.entry
                }),
                m.to.slot,
                m.to.len,
            );
        }
    }
    Ok(())
}
