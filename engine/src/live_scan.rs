//! Every live record of chosen partitions, read in storage order: the bulk read for a caller that
//! rebuilds something derived from all of its data (the cluster's anti-entropy trees at startup).
//!
//! [`Engine::iter_partition`] reads one record per IO in the index's order, which is random on
//! disk, so every key costs the device's latency (about 130 µs on our test machine: over two
//! minutes per million keys). A [`LiveScan`] walks the index for the locations of the live records
//! of a group of segments, sorts them by offset and reads each run of nearby records with one
//! O_DIRECT read of at most [`WINDOW_BYTES_MAX`], skipping gaps of garbage longer than
//! [`GAP_BYTES_MAX`]; so it reads at the device's bandwidth, and a mostly-garbage segment costs
//! reads of its live records only.
//!
//! **What it returns, beside writers and compaction.** Each walk of the index covers a range of
//! segment ids: ascending groups of [`SEGMENTS_PER_WALK`] of the segments present when the scan
//! began, then, last, every newer segment, whenever it was created. A walk looks at each key
//! once. Compaction only moves a record into a segment newer than the one it leaves, so a key
//! that no walk found in its range was, at each walk, past that walk's range, and the last walk
//! finds it: a key live throughout the scan is returned at least once, with the record that was
//! its live one when a walk looked at it; a record compaction moved between two walks may be
//! returned twice (identical bytes). A key
//! written or deleted after the walk that covered it may be returned with its older record, or
//! not at all: a caller that races writers must prefer what it learns from its own writes (the
//! cluster's tree load does). Records are read from the segment object the walk found, which
//! keeps its file open, so a segment compaction deletes meanwhile still reads back.
//!
//! **Beside foreground work.** A walk visits one partition's index entries at a time and pauses
//! between partitions after every millisecond of work ([`crate::pace`]); its records are kept in chunks of one
//! window's span of one segment, and a chunk is sorted only when it is about to be read. So no
//! step holds the thread for more than one partition's entries or one chunk's records, and the
//! caller's task queue decides how much of the shard the scan takes.
//!
//! **Limits.** Memory: 16 bytes per live record of the segments of one walk (at most
//! [`SEGMENTS_PER_WALK`] segments, so about 8 MiB per 64 MiB segment of 128-byte records), plus one
//! window. Time: one walk of the wanted partitions' index entries per group of segments. A record
//! that fails its checksum is skipped, counted in the engine's corrupt reads and in
//! [`LiveScan::corrupt_records`], and logged; tombstones are not returned.

use std::collections::{BTreeMap, VecDeque};
use std::rc::{Rc, Weak};

use bytes::Bytes;

use crate::engine::{Inner, read_record};
use crate::error::EngineError;
use crate::index::Location;
use crate::io;
use crate::pace::Pace;
use crate::record::{self, RecordKind};
use crate::segment::Segment;

/// Largest read of a scan window.
pub const WINDOW_BYTES_MAX: u64 = 1 << 20;
/// A gap of garbage between live records longer than this starts a new window instead of
/// being read through.
pub const GAP_BYTES_MAX: u64 = 64 << 10;
/// Segments whose live records one walk of the index collects.
pub const SEGMENTS_PER_WALK: usize = 8;

/// One live record returned by a [`LiveScan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveRecord {
    /// Partition.
    pub partition: u32,
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Bytes,
}

#[derive(Clone, Copy, Debug)]
struct Spot {
    offset: u64,
    len: u32,
    partition: u32,
}

/// A scan of the live records of some partitions in storage order (module docs); see
/// [`crate::Engine::scan_live`].
pub struct LiveScan {
    inner: Weak<Inner>,
    wanted: Box<dyn Fn(u32) -> bool>,
    /// Ranges of ids of the segments present when the scan began, [`SEGMENTS_PER_WALK`]
    /// segments each, not yet walked, ascending.
    first: VecDeque<(u64, u64)>,
    /// Highest segment id present when the scan began.
    last_id: u64,
    /// The last walk (segments created since the scan began) is done.
    walked_new: bool,
    /// The live records of the last walk, in chunks, in (segment id, offset) order.
    pending: VecDeque<Chunk>,
    corrupt: u64,
}

/// What a walk found: segment id → (segment, chunk index (offset / window) → its records).
type Found = BTreeMap<u64, (Rc<Segment>, BTreeMap<u64, Vec<Spot>>)>;

/// The live records of one segment whose offsets fall in one window-sized span.
struct Chunk {
    seg: Rc<Segment>,
    spots: Vec<Spot>,
    /// `spots` is sorted by offset (done when the chunk comes up for reading).
    sorted: bool,
    /// Spots already read.
    done: usize,
}

impl LiveScan {
    pub(crate) fn new(inner: &Rc<Inner>, wanted: Box<dyn Fn(u32) -> bool>) -> LiveScan {
        let st = inner.st.borrow();
        let mut ids: Vec<u64> = st.segments.iter().flatten().map(|s| s.id).collect();
        ids.sort_unstable();
        let last_id = ids.last().copied().unwrap_or(0);
        let first = ids
            .chunks(SEGMENTS_PER_WALK)
            .map(|c| (c[0], c[c.len() - 1]))
            .collect();
        LiveScan {
            inner: Rc::downgrade(inner),
            wanted,
            first,
            last_id,
            walked_new: false,
            pending: VecDeque::new(),
            corrupt: 0,
        }
    }

    /// Records skipped because they failed their checksum.
    pub fn corrupt_records(&self) -> u64 {
        self.corrupt
    }

    /// The records of the next window (at least one), or `None` at the end (or once the engine
    /// is gone). An error is the engine's failure or an IO error; the scan can be continued.
    pub async fn next_batch(&mut self) -> Option<Result<Vec<LiveRecord>, EngineError>> {
        loop {
            let inner = self.inner.upgrade()?;
            if let Err(e) = inner.st.borrow().check_usable() {
                return Some(Err(e));
            }
            let Some(chunk) = self.pending.front_mut() else {
                if !self.walk(&inner).await {
                    return None;
                }
                continue;
            };
            if chunk.done == chunk.spots.len() {
                self.pending.pop_front();
                continue;
            }
            if !chunk.sorted {
                chunk.spots.sort_unstable_by_key(|s| s.offset);
                chunk.sorted = true;
            }
            let spots = &chunk.spots;
            let from = chunk.done;
            let start = spots[from].offset;
            let mut end = start + u64::from(spots[from].len);
            let mut to = from + 1;
            while let Some(s) = spots.get(to) {
                let s_end = s.offset + u64::from(s.len);
                if s.offset > end + GAP_BYTES_MAX || s_end - start > WINDOW_BYTES_MAX {
                    break;
                }
                end = s_end;
                to += 1;
            }
            chunk.done = to;
            let seg = chunk.seg.clone();
            let window: Vec<Spot> = spots[from..to].to_vec();
            let records = self.read_window(&inner, &seg, &window, start, end).await;
            return Some(records);
        }
    }

    /// Collects the live records of the next group of segments into `pending`, one partition
    /// at a time with a yield between partitions; false when every walk is done.
    async fn walk(&mut self, inner: &Inner) -> bool {
        // The ids this walk covers: the next group of the segments present when the scan began
        // (ids are never reused, so no later segment falls in such a range), else every segment
        // newer than those, whenever it was created, so a record compaction moves into a
        // segment created during this very walk is still found in it.
        let (lo, hi) = match self.first.pop_front() {
            Some(range) => range,
            None if !self.walked_new => {
                self.walked_new = true;
                (self.last_id + 1, u64::MAX)
            }
            None => return false,
        };
        let partitions: Vec<u32> = {
            let st = inner.st.borrow();
            let mut partitions: Vec<u32> = st
                .index
                .partitions()
                .into_iter()
                .filter(|&p| (self.wanted)(p))
                .collect();
            partitions.sort_unstable();
            partitions
        };
        let mut found = Found::new();
        let mut pace = Pace::new();
        for partition in partitions {
            {
                let st = inner.st.borrow();
                st.index.for_each_in(partition, |_, e| {
                    if e.tombstone {
                        return;
                    }
                    let seg = st.segment(e.loc.slot);
                    if seg.id < lo || seg.id > hi {
                        return;
                    }
                    found
                        .entry(seg.id)
                        .or_insert_with(|| (seg.clone(), BTreeMap::new()))
                        .1
                        .entry(e.loc.offset / WINDOW_BYTES_MAX)
                        .or_default()
                        .push(Spot {
                            offset: e.loc.offset,
                            len: e.loc.len,
                            partition,
                        });
                });
            }
            pace.step().await;
        }
        for (seg, chunks) in found.into_values() {
            for spots in chunks.into_values() {
                self.pending.push_back(Chunk {
                    seg: seg.clone(),
                    spots,
                    sorted: false,
                    done: 0,
                });
            }
        }
        true
    }

    /// Reads the records of one window: one read of `[start, end)` from the file, or, for bytes
    /// still in the segment's memory tail, each record on its own.
    async fn read_window(
        &mut self,
        inner: &Inner,
        seg: &Segment,
        window: &[Spot],
        start: u64,
        end: u64,
    ) -> Result<Vec<LiveRecord>, EngineError> {
        let mut out = Vec::with_capacity(window.len());
        let on_disk = seg.file().filter(|_| end <= seg.flushed.get());
        let Some(file) = on_disk else {
            for s in window {
                let loc = Location {
                    slot: seg.slot,
                    offset: s.offset,
                    len: s.len,
                };
                let raw = read_record(inner, seg, loc).await?;
                self.take(inner, seg, s, &raw, &mut out);
            }
            return Ok(out);
        };
        let c = &inner.counters;
        c.disk_reads.set(c.disk_reads.get() + 1);
        let len = (end - start) as usize;
        let bytes = io::read_exact_at(&file, &seg.path, start, len).await?;
        if bytes.len() < len {
            return Err(EngineError::Corrupt {
                path: seg.path.clone(),
                offset: start + bytes.len() as u64,
                reason: "record extends past end of file",
            });
        }
        for s in window {
            let at = (s.offset - start) as usize;
            self.take(inner, seg, s, &bytes[at..at + s.len as usize], &mut out);
        }
        Ok(out)
    }

    /// Decodes the record at `spot` and keeps it, or counts it as corrupt.
    fn take(
        &mut self,
        inner: &Inner,
        seg: &Segment,
        spot: &Spot,
        raw: &[u8],
        out: &mut Vec<LiveRecord>,
    ) {
        match record::decode(raw) {
            Ok(r) => {
                // The index pointed here when the walk ran, and a segment's bytes never change.
                assert_eq!(
                    r.kind,
                    RecordKind::Put,
                    "a live index entry points at a put"
                );
                assert_eq!(r.partition, spot.partition, "the index entry's partition");
                out.push(LiveRecord {
                    partition: r.partition,
                    key: r.key.to_vec(),
                    value: Bytes::copy_from_slice(r.value),
                });
            }
            Err(_) => {
                self.corrupt += 1;
                let c = &inner.counters;
                c.corrupt_reads.set(c.corrupt_reads.get() + 1);
                tracing::error!(
                    path = %seg.path.display(),
                    offset = spot.offset,
                    "record failed its checksum in a live scan; skipped"
                );
            }
        }
    }
}
