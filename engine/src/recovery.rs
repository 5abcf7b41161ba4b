//! Opening a store: lock the directory, finish an interrupted compaction, load every segment
//! (from its hint file when it has a valid one, else by scanning it), and rebuild the index.
//!
//! The newest record of a key is the one with the highest seqno, wherever it lives (compaction
//! copies old records into new files, so file order says nothing). A key's earlier entry is
//! compared by looking up its seqno in the hint table of its segment (binary search by offset),
//! so the rebuild needs no memory beyond the index and the (mmapped) hint tables.
//!
//! Damage: a scanned segment with a torn tail is truncated to its last valid record; damaged
//! regions followed by valid records are skipped, logged and listed in the [`RecoveryReport`];
//! records after them are recovered. Every scanned segment gets a hint file so the next start is
//! fast.
//!
//! Startup may block the thread briefly (directory listing, the lock file, mmap of hint files);
//! nothing here runs on the request path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::{Latency, Shares};

use crate::cache::ValueCache;
use crate::config::EngineConfig;
use crate::engine::{Inner, State, Wake};
use crate::error::EngineError;
use crate::hint::{self, HintHeader, HintTable};
use crate::index::{Entry, Index, Location, PREFETCH_AHEAD};
use crate::io::{self, FaultPlan, IoClass};
use crate::record::RecordKind;
use crate::scan;
use crate::segment::{Segment, hint_path, parse_segment_name, segment_path};
use crate::stats::Counters;

/// Name of the lock file in the data directory.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// Name of the compaction intent file (segments to delete), see compaction.
pub(crate) const INTENT_FILE: &str = "compaction.intent";

/// A damaged byte range found while scanning a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedRegion {
    /// Segment file.
    pub path: PathBuf,
    /// First damaged byte.
    pub start: u64,
    /// One past the last damaged byte.
    pub end: u64,
}

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments loaded from their hint files.
    pub segments_from_hints: u64,
    /// Segments scanned record by record.
    pub segments_scanned: u64,
    /// Records listed by hints or scans (all kinds).
    pub records: u64,
    /// Keys in the rebuilt index (tombstones included).
    pub index_entries: u64,
    /// Damaged regions followed by valid records (their records are lost locally).
    pub corrupt_regions: Vec<DamagedRegion>,
    /// Segments whose tail was torn and truncated.
    pub torn_tails: Vec<DamagedRegion>,
    /// Total bytes truncated from torn tails.
    pub torn_tail_bytes: u64,
    /// Segments removed because they held no records (created just before a crash).
    pub empty_segments_removed: u64,
    /// Segments removed because an interrupted compaction had already replaced them.
    pub compacted_segments_removed: u64,
}

enum Table {
    Mapped(HintTable<memmap2::Mmap>),
    Owned(HintTable<Vec<u8>>),
}

impl Table {
    fn header(&self) -> HintHeader {
        match self {
            Table::Mapped(t) => t.header(),
            Table::Owned(t) => t.header(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Table::Mapped(t) => t.len(),
            Table::Owned(t) => t.len(),
        }
    }
    fn get(&self, i: usize) -> hint::HintEntry {
        match self {
            Table::Mapped(t) => t.get(i),
            Table::Owned(t) => t.get(i),
        }
    }
    fn seqno_at(&self, offset: u64) -> u64 {
        let e = match self {
            Table::Mapped(t) => t.find_offset(offset),
            Table::Owned(t) => t.find_offset(offset),
        };
        e.expect("index entries built from this table point at its records")
            .seqno
    }
}

/// Maps a hint file. The hint file is immutable once written and we hold the directory lock, so
/// nothing modifies it while mapped; a file shorter than its header announces fails validation.
#[allow(unsafe_code)]
fn map_hint(path: &Path) -> Option<memmap2::Mmap> {
    let f = std::fs::File::open(path).ok()?;
    // SAFETY: see the function comment; the mapping is read-only and validated before use.
    unsafe { memmap2::Mmap::map(&f) }.ok()
}

fn lock_dir(dir: &Path) -> Result<std::fs::File, EngineError> {
    let path = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| EngineError::io("open", &path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(EngineError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(EngineError::io("lock", &path, e)),
    }
}

/// Reads the list of segment ids an interrupted compaction meant to delete.
pub(crate) fn parse_intent(bytes: &[u8]) -> Option<Vec<u64>> {
    let n = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let body = bytes.get(..4 + n * 8)?;
    let crc = u32::from_le_bytes(bytes.get(4 + n * 8..8 + n * 8)?.try_into().ok()?);
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some(
        body[4..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
            .collect(),
    )
}

thread_local! {
    static COMPACTION_QUEUE: std::cell::Cell<Option<(usize, glommio::TaskQueueHandle)>> =
        const { std::cell::Cell::new(None) };
    /// Shares of this thread's compaction queue (see [`set_compaction_shares`]).
    static COMPACTION_SHARES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Sets the CPU shares of the compaction queue of the calling executor's thread, clamped to
/// `[1, 1000]`, effective within glommio's adjustment period (250 ms). Admission control of
/// background work uses it to slow compaction when foreground latency rises; until it is
/// called, the `compaction_shares` of the first engine opened on the executor apply.
pub fn set_compaction_shares(shares: usize) {
    COMPACTION_SHARES.with(|c| c.set(shares.clamp(1, 1000)));
}

/// Reads the thread's compaction shares every adjustment period.
struct CompactionShares;

impl glommio::SharesManager for CompactionShares {
    fn shares(&self) -> usize {
        COMPACTION_SHARES.with(|c| c.get()).max(1)
    }
}

/// The background task queue for compaction, one per executor: glommio offers no way to remove a
/// task queue, so engines opened and closed repeatedly on one executor share it. Its shares are
/// dynamic: those of the first engine opened on an executor, until [`set_compaction_shares`]
/// changes them.
fn compaction_queue(shares: usize) -> glommio::TaskQueueHandle {
    let ex = glommio::executor().id();
    COMPACTION_QUEUE.with(|c| match c.get() {
        Some((id, h)) if id == ex => h,
        _ => {
            set_compaction_shares(shares);
            let h = glommio::executor().create_task_queue(
                Shares::Dynamic(Rc::new(CompactionShares)),
                Latency::NotImportant,
                "ringkv-compaction",
            );
            c.set(Some((ex, h)));
            h
        }
    })
}

pub(crate) async fn open(
    mut cfg: EngineConfig,
    faults: Rc<FaultPlan>,
) -> Result<Inner, EngineError> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.dir).map_err(|e| EngineError::io("create dir", &cfg.dir, e))?;
    // glommio opens files relative to no directory descriptor: a relative path fails (EBADF).
    cfg.dir =
        std::path::absolute(&cfg.dir).map_err(|e| EngineError::io("resolve dir", &cfg.dir, e))?;
    let lock = lock_dir(&cfg.dir)?;
    let dir = cfg.dir.clone();
    let mut report = RecoveryReport::default();

    // An interrupted compaction: its outputs are durable, so its inputs can go now.
    let intent_path = dir.join(INTENT_FILE);
    if let Ok(bytes) = std::fs::read(&intent_path) {
        if let Some(ids) = parse_intent(&bytes) {
            for id in ids {
                if segment_path(&dir, id).exists() {
                    report.compacted_segments_removed += 1;
                }
                io::remove(&segment_path(&dir, id)).await?;
                io::remove(&hint_path(&dir, id)).await?;
            }
            io::sync_dir(&dir, &faults, IoClass::Compaction).await?;
        }
        io::remove(&intent_path).await?;
    }

    let names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| EngineError::io("list", &dir, e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let mut ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    ids.sort_unstable();
    // A hint whose segment is gone (a crash between the two removals) must not be picked up by a
    // future segment that reuses the id.
    for n in &names {
        if let Some(id) = n
            .strip_suffix(".hint")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            && ids.binary_search(&id).is_err()
        {
            io::remove(&dir.join(n)).await?;
        }
    }

    let mut st = State {
        index: Index::default(),
        segments: Vec::new(),
        free_slots: Vec::new(),
        next_segment_id: ids.last().map_or(1, |m| m + 1),
        next_seqno: 1,
        active: None,
        writing: Default::default(),
        dropped: BTreeMap::new(),
        open_epoch: 1,
        durable_epoch: 0,
        waiters: Vec::new(),
        buffered_since: None,
        gather: Default::default(),
        failed: None,
        closed: false,
        compacting: false,
        spare: None,
        to_finish: Default::default(),
        finishing: 0,
    };
    let mut tables: BTreeMap<u16, Table> = BTreeMap::new();
    let mut max_seqno = 0u64;

    for id in ids {
        let path = segment_path(&dir, id);
        let hpath = hint_path(&dir, id);
        let file = io::open_ro(&path).await?;
        let size = file
            .file_size()
            .await
            .map_err(|e| EngineError::io("stat", &path, e.into()))?;
        // Segments never grow past the hard limit (a record is appended only if it fits), and
        // the index can address nothing beyond it.
        if size > crate::config::SEGMENT_BYTES_MAX_HARD {
            // No segment this engine writes is that large; refuse rather than read it whole.
            return Err(EngineError::Corrupt {
                path,
                offset: 0,
                reason: "segment file larger than any segment this engine writes",
            });
        }
        let hinted = map_hint(&hpath)
            .and_then(HintTable::parse)
            .filter(|t| t.header().segment_id == id && t.header().data_len as u64 <= size);
        let table = match hinted {
            Some(t) => {
                report.segments_from_hints += 1;
                Table::Mapped(t)
            }
            None => {
                report.segments_scanned += 1;
                let bytes = io::read_all(&file, &path).await?;
                let s = scan::scan(&bytes);
                for &(start, end) in &s.corrupt_regions {
                    tracing::warn!(path = %path.display(), start, end, "damaged records skipped during recovery");
                    report.corrupt_regions.push(DamagedRegion {
                        path: path.clone(),
                        start,
                        end,
                    });
                }
                if let Some((start, end)) = s.torn_tail {
                    tracing::warn!(path = %path.display(), start, end, "torn tail truncated during recovery");
                    report.torn_tails.push(DamagedRegion {
                        path: path.clone(),
                        start,
                        end,
                    });
                    report.torn_tail_bytes += end - start;
                }
                if s.valid_len < size {
                    io::truncate(&path, s.valid_len).await?;
                }
                let keyed = s
                    .entries
                    .iter()
                    .any(|e| e.kind != RecordKind::SegmentHeader);
                if !keyed {
                    drop(file);
                    io::remove(&path).await?;
                    io::remove(&hpath).await?;
                    report.empty_segments_removed += 1;
                    continue;
                }
                // A missing header (damaged) gets created seqno 0: the most conservative value,
                // it only delays tombstone reaping.
                let created = s.header.filter(|h| h.0 == id).map_or(0, |h| h.1);
                let h = HintHeader {
                    segment_id: id,
                    created_seqno: created,
                    data_len: s.valid_len as u32,
                    count: s.entries.len() as u32,
                };
                let bytes = hint::encode(h, &s.entries);
                if let Err(e) = io::write_file(&hpath, &faults, IoClass::Hint, &bytes).await {
                    tracing::warn!(error = %e, "could not write hint file; the next start scans again");
                    crate::engine::drop_failed_hint(&hpath).await;
                }
                Table::Owned(HintTable::parse(bytes).expect("freshly encoded hint table is valid"))
            }
        };
        let h = table.header();
        let slot = st.alloc_slot()?;
        let seg = Segment::new_sealed(&dir, id, slot, h.created_seqno, h.data_len as u64, file);
        st.segments[slot as usize] = Some(Rc::new(seg));
        max_seqno = max_seqno.max(h.created_seqno);
        tables.insert(slot, table);
    }

    // Pass 1: drop markers void older records of their partition.
    for t in tables.values() {
        for i in 0..t.len() {
            let e = t.get(i);
            max_seqno = max_seqno.max(e.seqno);
            if e.kind == RecordKind::DropPartition {
                let d = st.dropped.entry(e.partition).or_insert(0);
                *d = (*d).max(e.seqno);
            }
        }
    }
    // Pass 2: the highest seqno of each key wins.
    let mut n = 0u64;
    for (&slot, t) in &tables {
        for i in 0..t.len() {
            // Each lookup below is a cache miss once the index outgrows the CPU's caches: ask
            // for the line of the entry a few ahead now, so that the misses overlap.
            if i + PREFETCH_AHEAD < t.len() {
                st.index.prefetch_hinted(&t.get(i + PREFETCH_AHEAD));
            }
            let e = t.get(i);
            report.records += 1;
            if !matches!(e.kind, RecordKind::Put | RecordKind::Tombstone) {
                continue;
            }
            if st.dropped.get(&e.partition).is_some_and(|&d| d > e.seqno) {
                continue;
            }
            let entry = Entry {
                loc: Location {
                    slot,
                    offset: e.offset as u64,
                    len: e.len,
                },
                tombstone: e.kind == RecordKind::Tombstone,
                version: e.version,
            };
            let newer = match st.index.get(e.partition, e.key) {
                None => true,
                Some(old) => tables[&old.loc.slot].seqno_at(old.loc.offset) < e.seqno,
            };
            if newer {
                st.index.upsert(e.partition, e.key, entry);
            }
            n += 1;
            if n.is_multiple_of(65536) {
                glommio::yield_if_needed().await;
            }
        }
    }
    drop(tables);
    {
        let segments = &st.segments;
        st.index.for_each(|_, _, e| {
            let s = segments[e.loc.slot as usize]
                .as_ref()
                .expect("index points at loaded segments");
            s.live_bytes.set(s.live_bytes.get() + e.loc.len as u64);
        });
    }
    st.next_seqno = max_seqno + 1;
    report.index_entries = st.index.len() as u64;
    tracing::info!(
        dir = %dir.display(),
        segments = report.segments_from_hints + report.segments_scanned,
        scanned = report.segments_scanned,
        keys = report.index_entries,
        corrupt_regions = report.corrupt_regions.len(),
        torn_tail_bytes = report.torn_tail_bytes,
        "engine recovered"
    );

    let compaction_queue = compaction_queue(cfg.compaction_shares);
    Ok(Inner {
        cache: std::cell::RefCell::new(ValueCache::new(cfg.cache_bytes)),
        cfg,
        faults,
        st: std::cell::RefCell::new(st),
        counters: Counters::default(),
        recovery: report,
        flush_wake: Rc::new(Wake::default()),
        compaction_wake: Rc::new(Wake::default()),
        maintenance_wake: Rc::new(Wake::default()),
        zero_wake: Rc::new(Wake::default()),
        compaction_queue,
        tasks: std::cell::RefCell::new(Vec::new()),
        _lock: lock,
    })
}

#[cfg(test)]
mod tests {
    use glommio::SharesManager;

    use super::*;

    /// The compaction queue reads the shares set last on its thread, clamped to glommio's range.
    #[test]
    fn compaction_shares_follow_the_setter() {
        set_compaction_shares(7);
        assert_eq!(CompactionShares.shares(), 7);
        set_compaction_shares(0);
        assert_eq!(CompactionShares.shares(), 1);
        set_compaction_shares(5000);
        assert_eq!(CompactionShares.shares(), 1000);
    }
}
