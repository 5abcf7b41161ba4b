//! The engine: one instance per shard, owned by that shard's thread (it is `!Send` on purpose).
//!
//! Write path: a put validates sizes, appends the encoded record to the active segment's memory
//! tail, updates the index, and then either returns (`Buffered`) or waits for the flush epoch it
//! joined to be written durably (`Sync`). One flusher task per engine writes every segment's
//! pending bytes with one write per segment per flush, durable when it completes (log segments
//! are `O_DSYNC`, [`io::create_log`]), so all writers that joined an epoch share that IO (group
//! commit). Flushes run one at a time, in order, which makes acknowledged durability
//! prefix-ordered: when a write is acknowledged durable, every write accepted before it is
//! durable too (unacknowledged writes have no order on power loss).
//!
//! Read path: index lookup (no IO), then the value cache, the memory tail, or one O_DIRECT read
//! through io_uring; the record's CRC and full key are checked before a value is returned.
//!
//! Failure: a failed write or sync poisons the engine (see [`crate::EngineError::Failed`]).
//! Dropping an engine without [`Engine::close`] is like a crash: buffered writes may be lost.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::poll_fn;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use glommio::TaskQueueHandle;

use crate::cache::{ValueCache, Written};
use crate::config::{Durability, EngineConfig};
use crate::error::EngineError;
use crate::group_commit::Gather;
use crate::hint::HintEntry;
use crate::index::{Entry, Index, KeyHash, Location, SEGMENT_SLOTS_MAX, value_digest};
use crate::io::{self, FaultPlan, IoClass};
use crate::record::{self, RecordKind};
use crate::recovery::RecoveryReport;
use crate::segment::Segment;
use crate::stats::{Counters, EngineStats};

/// What the in-memory part of a read found ([`Engine::get`]).
enum Lookup {
    /// The answer: absent, or the cached value.
    Answer(Option<Bytes>),
    /// The key's record is in this segment, not cached.
    OnDisk(KeyHash, Rc<Segment>, Entry),
}

/// What the part of a write that needs no wait did ([`Engine::put`]).
enum Append {
    /// The record was appended in this epoch.
    Written(u64),
    /// A deletion of an absent key: nothing to write.
    Absent,
    /// The unflushed tail is full: a flush of this epoch was asked for, nothing was written.
    Full(u64),
}

/// A per-shard log-structured key-value store.
pub struct Engine {
    pub(crate) inner: Rc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: EngineConfig,
    pub(crate) faults: Rc<FaultPlan>,
    pub(crate) st: RefCell<State>,
    pub(crate) cache: RefCell<ValueCache>,
    pub(crate) counters: Counters,
    pub(crate) recovery: RecoveryReport,
    pub(crate) flush_wake: Rc<Wake>,
    pub(crate) compaction_wake: Rc<Wake>,
    pub(crate) maintenance_wake: Rc<Wake>,
    /// Wakes the task that writes zeros ahead of the log's tail (`ahead.rs`).
    pub(crate) zero_wake: Rc<Wake>,
    pub(crate) compaction_queue: TaskQueueHandle,
    pub(crate) tasks: RefCell<Vec<glommio::task::JoinHandle<()>>>,
    /// Held for the engine's lifetime: an exclusive lock on the data directory.
    pub(crate) _lock: std::fs::File,
}

pub(crate) struct State {
    pub(crate) index: Index,
    /// Segment table, by slot; the index refers to segments by slot.
    pub(crate) segments: Vec<Option<Rc<Segment>>>,
    pub(crate) free_slots: Vec<u16>,
    pub(crate) next_segment_id: u64,
    pub(crate) next_seqno: u64,
    /// Current append target of writers.
    pub(crate) active: Option<Rc<Segment>>,
    /// Log segments with bytes not yet durable, oldest first (the active one last).
    pub(crate) writing: VecDeque<Rc<Segment>>,
    /// Partitions dropped, with the seqno of their still-needed drop marker.
    pub(crate) dropped: BTreeMap<u32, u64>,
    /// Flush epoch new appends join.
    pub(crate) open_epoch: u64,
    /// Every epoch up to and including this one is durable.
    pub(crate) durable_epoch: u64,
    pub(crate) waiters: Vec<Waker>,
    /// When the oldest unflushed `Buffered` write of the open epoch was accepted.
    pub(crate) buffered_since: Option<Instant>,
    /// Whether a flush is wanted (a `Sync` writer waits on the open epoch, or a flush is needed
    /// at once), and when it starts: at once, or once the writers of the last one are back.
    pub(crate) gather: Gather,
    pub(crate) failed: Option<Arc<EngineError>>,
    pub(crate) closed: bool,
    pub(crate) compacting: bool,
    /// A created file, its directory entry synced, ready to become the next log segment.
    pub(crate) spare: Option<Spare>,
    /// Sealed, durable log segments waiting for their hint file (see maintenance).
    pub(crate) to_finish: VecDeque<Rc<Segment>>,
    /// Segments taken off `to_finish` and being finished right now.
    pub(crate) finishing: usize,
}

/// A prepared segment file and the id it was created under.
pub(crate) struct Spare {
    pub(crate) id: u64,
    pub(crate) file: Rc<glommio::io::DmaFile>,
}

/// A one-waiter wake-up signal for a background task, with a shutdown flag.
#[derive(Default)]
pub(crate) struct Wake {
    set: Cell<bool>,
    shutdown: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Wake {
    pub(crate) fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
    pub(crate) fn shutdown(&self) {
        self.shutdown.set(true);
        self.notify();
    }
    pub(crate) fn is_shutdown(&self) -> bool {
        self.shutdown.get()
    }
    /// Resolves once notified (consuming the notification).
    pub(crate) async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) || self.shutdown.get() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl Inner {
    /// Tells every background task to stop (each finishes the IO step it is in).
    fn shutdown_tasks(&self) {
        self.flush_wake.shutdown();
        self.compaction_wake.shutdown();
        self.maintenance_wake.shutdown();
        self.zero_wake.shutdown();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown_tasks();
    }
}

impl State {
    pub(crate) fn check_usable(&self) -> Result<(), EngineError> {
        if let Some(e) = &self.failed {
            return Err(EngineError::Failed(e.clone()));
        }
        if self.closed {
            return Err(EngineError::Closed);
        }
        Ok(())
    }

    pub(crate) fn segment(&self, slot: u16) -> &Rc<Segment> {
        self.segments[slot as usize]
            .as_ref()
            .expect("index only points at live segment slots")
    }

    pub(crate) fn alloc_slot(&mut self) -> Result<u16, EngineError> {
        if let Some(s) = self.free_slots.pop() {
            return Ok(s);
        }
        if self.segments.len() >= SEGMENT_SLOTS_MAX {
            return Err(EngineError::TooManySegments(self.segments.len()));
        }
        self.segments.push(None);
        Ok((self.segments.len() - 1) as u16)
    }

    pub(crate) fn free_slot(&mut self, slot: u16) {
        assert!(
            self.segments[slot as usize].take().is_some(),
            "slot freed twice"
        );
        self.free_slots.push(slot);
    }

    /// Creates a writable segment whose first record is its header. With `use_spare`, a prepared
    /// file is used when one is ready; otherwise the segment lives in memory until the flusher
    /// creates its file.
    /// `created_seqno` must not exceed the seqno of any record the segment will hold that was
    /// live when written (tombstone reaping relies on it, see compaction).
    pub(crate) fn new_segment(
        &mut self,
        cfg: &EngineConfig,
        use_spare: bool,
        created_seqno: u64,
    ) -> Result<Rc<Segment>, EngineError> {
        assert!(created_seqno <= self.next_seqno);
        let slot = self.alloc_slot()?;
        let spare = if use_spare { self.spare.take() } else { None };
        let id = match &spare {
            Some(s) => s.id,
            None => {
                self.next_segment_id += 1;
                self.next_segment_id - 1
            }
        };
        let seg = Segment::new_writable(&cfg.dir, id, slot, created_seqno);
        if let Some(s) = spare {
            *seg.file.borrow_mut() = Some(s.file);
        }
        let seg = Rc::new(seg);
        let hv = record::segment_header_value(id, created_seqno);
        append_record(
            &seg,
            RecordKind::SegmentHeader,
            self.next_seqno,
            0,
            &[],
            &hv,
            Digests::NONE,
        );
        self.segments[slot as usize] = Some(seg.clone());
        Ok(seg)
    }

    /// Updates segment liveness after the index replaced `old` with a record in `new_slot`.
    pub(crate) fn account_replace(&self, old: Option<Entry>, new_slot: u16, new_len: u32) {
        if let Some(old) = old {
            let s = self.segment(old.loc.slot);
            s.live_bytes.set(s.live_bytes.get() - old.loc.len as u64);
        }
        let s = self.segment(new_slot);
        s.live_bytes.set(s.live_bytes.get() + new_len as u64);
    }
}

/// Appends an encoded record to a writable segment's memory tail; returns its location.
/// The fingerprint and value digest of a record being appended, computed once by the caller
/// for both the index and the hint entry.
#[derive(Clone, Copy)]
pub(crate) struct Digests {
    pub(crate) key: KeyHash,
    pub(crate) version: u16,
}

impl Digests {
    /// For records without a key (segment headers, partition drops).
    pub(crate) const NONE: Digests = Digests {
        key: KeyHash {
            digest: 0,
            check: 0,
        },
        version: 0,
    };
}

/// Appends an encoded record to a writable segment's memory tail; returns its location.
#[allow(clippy::too_many_arguments)]
pub(crate) fn append_record(
    seg: &Segment,
    kind: RecordKind,
    seqno: u64,
    partition: u32,
    key: &[u8],
    value: &[u8],
    digests: Digests,
) -> Location {
    assert!(!seg.sealed.get(), "appends go to unsealed segments only");
    let offset = seg.len.get();
    let len = {
        let mut m = seg.mem.borrow_mut();
        debug_assert_eq!(m.start + m.bytes.len() as u64, offset);
        record::encode(&mut m.bytes, kind, seqno, partition, key, value)
    };
    seg.len.set(offset + len as u64);
    seg.hints.borrow_mut().push(HintEntry {
        key: digests.key,
        seqno,
        partition,
        offset: u32::try_from(offset).expect("segments are at most 1 GiB"),
        len: len as u32,
        kind,
        version: digests.version,
    });
    Location {
        slot: seg.slot,
        offset,
        len: len as u32,
    }
}

/// Appends pre-encoded record bytes verbatim (compaction copies records without re-encoding).
pub(crate) fn append_raw(seg: &Segment, bytes: &[u8], mut hint: HintEntry) -> Location {
    assert!(!seg.sealed.get(), "appends go to unsealed segments only");
    let offset = seg.len.get();
    seg.mem.borrow_mut().bytes.extend_from_slice(bytes);
    seg.len.set(offset + bytes.len() as u64);
    hint.offset = u32::try_from(offset).expect("segments are at most 1 GiB");
    seg.hints.borrow_mut().push(hint);
    Location {
        slot: seg.slot,
        offset,
        len: bytes.len() as u32,
    }
}

impl Engine {
    /// Opens (or creates) the store in `cfg.dir`, recovering whatever a previous run left.
    /// Must be called inside a glommio executor; the engine stays on that thread.
    pub async fn open(cfg: EngineConfig) -> Result<Engine, EngineError> {
        Self::open_with_faults(cfg, FaultPlan::new()).await
    }

    /// Like [`Engine::open`], with an IO fault plan tests can arm.
    pub async fn open_with_faults(
        cfg: EngineConfig,
        faults: Rc<FaultPlan>,
    ) -> Result<Engine, EngineError> {
        let inner = crate::recovery::open(cfg, faults).await?;
        let inner = Rc::new(inner);
        let flusher =
            glommio::spawn_local(flusher(Rc::downgrade(&inner), inner.flush_wake.clone())).detach();
        inner.tasks.borrow_mut().push(flusher);
        // On the flusher's queue, not maintenance's: a flusher waiting for zeros in flight
        // (`ahead.rs`) must not wait for a background share as well.
        let zeros = glommio::spawn_local(crate::ahead::run(
            Rc::downgrade(&inner),
            inner.zero_wake.clone(),
        ))
        .detach();
        inner.tasks.borrow_mut().push(zeros);
        let maintenance = glommio::spawn_local_into(
            crate::maintenance::run(Rc::downgrade(&inner), inner.maintenance_wake.clone()),
            inner.compaction_queue,
        )
        .map_err(|e| EngineError::Config(format!("cannot spawn maintenance task: {e}")))?
        .detach();
        inner.tasks.borrow_mut().push(maintenance);
        if let Some(every) = inner.cfg.compaction_interval {
            let task = glommio::spawn_local_into(
                crate::compaction::background(
                    Rc::downgrade(&inner),
                    inner.compaction_wake.clone(),
                    every,
                ),
                inner.compaction_queue,
            )
            .map_err(|e| EngineError::Config(format!("cannot spawn compactor: {e}")))?
            .detach();
            inner.tasks.borrow_mut().push(task);
        }
        Ok(Engine { inner })
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// What recovery found when the engine was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    fn check_key(&self, key: &[u8]) -> Result<(), EngineError> {
        let max = self.inner.cfg.key_bytes_max;
        if key.len() > max {
            return Err(EngineError::KeyTooLarge {
                len: key.len(),
                max,
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), EngineError> {
        let max = self.inner.cfg.value_bytes_max;
        if value.len() > max {
            return Err(EngineError::ValueTooLarge {
                len: value.len(),
                max,
            });
        }
        Ok(())
    }

    /// Reads the value of `key` in `partition`; `None` if absent or deleted.
    pub async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Bytes>, EngineError> {
        self.check_key(key)?;
        let c = &self.inner.counters;
        c.gets.set(c.gets.get() + 1);
        let (kh, seg, entry) = match self.lookup(partition, key)? {
            Lookup::Answer(value) => return Ok(value),
            Lookup::OnDisk(kh, seg, entry) => (kh, seg, entry),
        };
        let raw = read_record(&self.inner, &seg, entry.loc).await?;
        let rec = record::decode(&raw).map_err(|_| {
            c.corrupt_reads.set(c.corrupt_reads.get() + 1);
            tracing::error!(path = %seg.path.display(), offset = entry.loc.offset, "record failed its checksum on read");
            EngineError::Corrupt { path: seg.path.clone(), offset: entry.loc.offset, reason: "checksum mismatch" }
        })?;
        if rec.key != key || rec.partition != partition {
            // Another key with the same 80-bit fingerprint: this key is not stored.
            return Ok(None);
        }
        assert_eq!(
            rec.kind,
            RecordKind::Put,
            "index entry without tombstone flag points at a put"
        );
        let value = Bytes::copy_from_slice(rec.value);
        // Cache only what is still current: a write or a compaction may have moved the key while
        // this read was on disk, and caching the old value under its old location could serve it
        // again once that segment slot is reused. The same location is not enough: if the
        // segment read was compacted away meanwhile and its slot reused, the key's current
        // record can sit at the very same offset in the new segment, so the slot must still
        // hold the segment that was read.
        let current = {
            let st = self.inner.st.borrow();
            st.index
                .get(partition, kh)
                .is_some_and(|e| e.loc == entry.loc && Rc::ptr_eq(st.segment(e.loc.slot), &seg))
        };
        if current {
            self.inner
                .cache
                .borrow_mut()
                .insert(partition, kh, entry.loc, value.clone());
        }
        Ok(Some(value))
    }

    /// [`get`](Self::get) when the answer is in memory (the key is absent, or its value is
    /// cached), without a wait; `Ok(None)` when the value must be read from its segment.
    pub fn get_now(
        &self,
        partition: u32,
        key: &[u8],
    ) -> Result<Option<Option<Bytes>>, EngineError> {
        Ok(match self.lookup(partition, key)? {
            Lookup::Answer(value) => {
                // Counted only when answered: otherwise the caller reads with `get`, which counts.
                let c = &self.inner.counters;
                c.gets.set(c.gets.get() + 1);
                Some(value)
            }
            Lookup::OnDisk(..) => None,
        })
    }

    /// Asks the CPU to load what coming reads or writes of `keys` (partition, key) look up
    /// first: their cache slots, their index slots, then their cached values. A batch's keys
    /// are all hashed before any table is probed, so that the probes run close together and
    /// their cache misses overlap.
    pub fn prefetch<K: AsRef<[u8]>>(&self, keys: impl IntoIterator<Item = (u32, K)>) {
        // On the stack for a pipelined round's usual size.
        let hashed: smallvec::SmallVec<[(u32, KeyHash); 32]> = keys
            .into_iter()
            .map(|(partition, key)| (partition, KeyHash::of(key.as_ref())))
            .collect();
        let hint = &mut crate::prefetch::range;
        let Ok(cache) = self.inner.cache.try_borrow() else {
            return;
        };
        for &(_, kh) in &hashed {
            cache.prefetch(kh, hint);
        }
        if let Ok(st) = self.inner.st.try_borrow() {
            for &(partition, kh) in &hashed {
                st.index.prefetch(partition, kh, hint);
            }
        }
        // By now the cache slots have had the index probes' time to arrive.
        for &(partition, kh) in &hashed {
            cache.prefetch_value(partition, kh, hint);
        }
    }

    /// The part of a read that needs no wait: the index, then the value cache.
    fn lookup(&self, partition: u32, key: &[u8]) -> Result<Lookup, EngineError> {
        self.check_key(key)?;
        let kh = KeyHash::of(key);
        let c = &self.inner.counters;
        let (seg, entry) = {
            let st = self.inner.st.borrow();
            st.check_usable()?;
            match st.index.get(partition, kh) {
                Some(e) if !e.tombstone => (st.segment(e.loc.slot).clone(), e),
                _ => return Ok(Lookup::Answer(None)),
            }
        };
        if let Some(v) = self.inner.cache.borrow_mut().get(partition, kh, entry.loc) {
            c.cache_hits.set(c.cache_hits.get() + 1);
            return Ok(Lookup::Answer(Some(v)));
        }
        Ok(Lookup::OnDisk(kh, seg, entry))
    }

    /// Stores `value` under `key` in `partition`.
    pub async fn put(
        &self,
        partition: u32,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), EngineError> {
        self.check_key(key)?;
        self.check_value(value)?;
        let c = &self.inner.counters;
        c.puts.set(c.puts.get() + 1);
        self.write(RecordKind::Put, partition, key, value, durability)
            .await
            .map(|_| ())
    }

    /// [`put`](Self::put) of a buffered write when it needs no wait (the unflushed tail has room
    /// for it: most writes); `Ok(None)` when it must wait for a flush, having written nothing.
    ///
    /// Takes the value's buffer: the value cache keeps it, when it caches the value, instead of
    /// a copy (a writer that encoded the value has just allocated it). A `Vec` of its own, so
    /// what is cached can never pin a larger buffer it was cut from; spare capacity is given
    /// back first (none for an encoding sized in advance). A declined write drops it.
    pub fn put_buffered_now(
        &self,
        partition: u32,
        key: &[u8],
        value: Vec<u8>,
    ) -> Result<Option<()>, EngineError> {
        Ok(self
            .put_appended(
                partition,
                key,
                Written::handed_over(value),
                Durability::Buffered,
            )?
            .map(|_| ()))
    }

    /// [`put`](Self::put) of a synced write, without its wait: the record is appended and a flush
    /// asked for. Answers the flush epoch whose completion makes the write durable (wait for it
    /// with [`wait_durable`](Self::wait_durable)), or `Ok(None)` when the unflushed tail has no
    /// room for it (nothing written: use `put`). Many writes waiting on one flush then need one
    /// waiter between them, not a future each.
    ///
    /// Takes the value's buffer, as [`put_buffered_now`](Self::put_buffered_now) does.
    pub fn put_sync_now(
        &self,
        partition: u32,
        key: &[u8],
        value: Vec<u8>,
    ) -> Result<Option<u64>, EngineError> {
        self.put_appended(
            partition,
            key,
            Written::handed_over(value),
            Durability::Sync,
        )
    }

    /// The part of a [`put`](Self::put) that needs no wait: the epoch the record joined, or
    /// `None` when the unflushed tail is full (nothing written).
    fn put_appended(
        &self,
        partition: u32,
        key: &[u8],
        value: Written<'_>,
        durability: Durability,
    ) -> Result<Option<u64>, EngineError> {
        self.check_key(key)?;
        self.check_value(value.as_slice())?;
        Ok(
            match self.append(RecordKind::Put, partition, key, value, durability)? {
                Append::Written(epoch) => {
                    let c = &self.inner.counters;
                    c.puts.set(c.puts.get() + 1);
                    Some(epoch)
                }
                // `Absent` answers deletions of absent keys only.
                Append::Full(_) | Append::Absent => None,
            },
        )
    }

    /// Waits until flush epoch `epoch` (from [`put_sync_now`](Self::put_sync_now)) is durable;
    /// an error if the engine failed first. Answers the newest durable epoch, `epoch` or later.
    pub async fn wait_durable(&self, epoch: u64) -> Result<u64, EngineError> {
        wait_durable(&self.inner, epoch).await?;
        Ok(self.inner.st.borrow().durable_epoch)
    }

    /// [`delete`](Self::delete) of a buffered deletion when it needs no wait; `Ok(None)` when it
    /// must wait for a flush, having written nothing.
    pub fn delete_buffered_now(
        &self,
        partition: u32,
        key: &[u8],
    ) -> Result<Option<bool>, EngineError> {
        self.check_key(key)?;
        let done = match self.append(
            RecordKind::Tombstone,
            partition,
            key,
            Written::Slice(&[]),
            Durability::Buffered,
        )? {
            Append::Full(_) => None,
            Append::Written(_) => Some(true),
            Append::Absent => Some(false),
        };
        if done.is_some() {
            let c = &self.inner.counters;
            c.deletes.set(c.deletes.get() + 1);
        }
        Ok(done)
    }

    /// Deletes `key` by writing a tombstone. Returns whether the key existed; deleting an absent
    /// key writes nothing.
    pub async fn delete(
        &self,
        partition: u32,
        key: &[u8],
        durability: Durability,
    ) -> Result<bool, EngineError> {
        self.check_key(key)?;
        let c = &self.inner.counters;
        c.deletes.set(c.deletes.get() + 1);
        self.write(RecordKind::Tombstone, partition, key, &[], durability)
            .await
    }

    /// Drops every key of `partition` (after a handoff, say), durably marked so recovery does not
    /// bring them back. Cost: one small record plus freeing the partition's index table.
    pub async fn drop_partition(
        &self,
        partition: u32,
        durability: Durability,
    ) -> Result<(), EngineError> {
        self.write(RecordKind::DropPartition, partition, &[], &[], durability)
            .await
            .map(|_| ())
    }

    async fn write(
        &self,
        kind: RecordKind,
        partition: u32,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<bool, EngineError> {
        let inner = &self.inner;
        loop {
            match self.append(kind, partition, key, Written::Slice(value), durability)? {
                // Backpressure: wait for flushes while the unwritten tail is over its bound.
                Append::Full(epoch) => wait_durable(inner, epoch).await?,
                Append::Absent => {
                    // Nothing to delete; but the tombstone (or drop) that made the key absent
                    // may not be durable yet, and a `Sync` caller is promised durability.
                    if durability == Durability::Sync {
                        flush_all(inner).await?;
                    }
                    return Ok(false);
                }
                Append::Written(epoch) => {
                    if durability == Durability::Sync {
                        wait_durable(inner, epoch).await?;
                    }
                    return Ok(true);
                }
            }
        }
    }

    /// The part of a write that needs no wait: the record appended to the active segment and
    /// indexed, unless the unflushed tail has no room for it (a single record larger than the
    /// bound is let through alone), in which case a flush is asked for and nothing is written.
    fn append(
        &self,
        kind: RecordKind,
        partition: u32,
        key: &[u8],
        written: Written<'_>,
        durability: Durability,
    ) -> Result<Append, EngineError> {
        let inner = &self.inner;
        let value = written.as_slice();
        let rec_len = record::record_len(key.len(), value.len()) as u64;
        let full = {
            let mut st = inner.st.borrow_mut();
            st.check_usable()?;
            let pending: u64 = st.writing.iter().map(|s| s.unflushed()).sum();
            if pending == 0 || pending + rec_len <= inner.cfg.write_buffer_bytes_max as u64 {
                None
            } else {
                st.gather.urgent();
                Some(st.open_epoch)
            }
        };
        if let Some(epoch) = full {
            inner.flush_wake.notify();
            return Ok(Append::Full(epoch));
        }
        let appended = {
            let mut st = inner.st.borrow_mut();
            let st = &mut *st;
            st.check_usable()?;
            let kh = KeyHash::of(key);
            if kind == RecordKind::Tombstone
                && !matches!(st.index.get(partition, kh), Some(e) if !e.tombstone)
            {
                None
            } else {
                let seg = match &st.active {
                    Some(a) if a.len.get() + rec_len <= inner.cfg.segment_bytes => a.clone(),
                    _ => {
                        if let Some(old) = st.active.take() {
                            old.sealed.set(true);
                        }
                        let seg = st.new_segment(&inner.cfg, true, st.next_seqno)?;
                        // Whether or not the spare was ready, prepare the next one.
                        inner.maintenance_wake.notify();
                        st.writing.push_back(seg.clone());
                        st.active = Some(seg.clone());
                        seg
                    }
                };
                let seqno = st.next_seqno;
                st.next_seqno += 1;
                let digests = match kind {
                    RecordKind::Put => Digests {
                        key: kh,
                        version: value_digest(value),
                    },
                    RecordKind::Tombstone => Digests {
                        key: kh,
                        version: 0,
                    },
                    _ => Digests::NONE,
                };
                let loc = append_record(&seg, kind, seqno, partition, key, value, digests);
                match kind {
                    RecordKind::Put | RecordKind::Tombstone => {
                        let tombstone = kind == RecordKind::Tombstone;
                        let version = digests.version;
                        let old = st.index.upsert(
                            partition,
                            kh,
                            Entry {
                                loc,
                                tombstone,
                                version,
                            },
                        );
                        st.account_replace(old, loc.slot, loc.len);
                        // Keep a cached key fresh; a write admits a new key only into free room
                        // (write-heavy loads must not flush the cache of what is actually read).
                        inner.cache.borrow_mut().refresh(
                            partition,
                            kh,
                            loc,
                            (!tombstone).then_some(written),
                        );
                    }
                    RecordKind::DropPartition => {
                        st.dropped.insert(partition, seqno);
                        for e in st.index.drop_partition(partition) {
                            let s = st.segment(e.loc.slot);
                            s.live_bytes.set(s.live_bytes.get() - e.loc.len as u64);
                        }
                        inner.cache.borrow_mut().drop_partition(partition);
                    }
                    RecordKind::SegmentHeader => unreachable!(),
                }
                // The flusher needs waking only when its plan changes: a sync writer now waits,
                // or makes the group it waits for whole (`group_commit.rs`), or the first
                // buffered write of the epoch starts the flush-interval clock.
                let wake_flusher = match durability {
                    Durability::Sync => st.gather.synced_write(),
                    Durability::Buffered => {
                        let first = st.buffered_since.is_none();
                        st.buffered_since.get_or_insert_with(Instant::now);
                        first
                    }
                };
                Some((st.open_epoch, wake_flusher))
            }
        };
        let Some((epoch, wake_flusher)) = appended else {
            return Ok(Append::Absent);
        };
        if wake_flusher {
            inner.flush_wake.notify();
        }
        Ok(Append::Written(epoch))
    }

    /// Makes every write accepted so far durable.
    pub async fn flush(&self) -> Result<(), EngineError> {
        flush_all(&self.inner).await
    }

    /// Runs one compaction pass now (the background compactor does the same on its own). Segments
    /// sealed by earlier writes are finished first (hint files written), so they are eligible.
    pub async fn compact(&self) -> Result<crate::compaction::CompactionReport, EngineError> {
        self.flush().await?;
        wait_settled(&self.inner).await?;
        crate::compaction::run(&self.inner).await
    }

    /// Streams the live keys and values of one partition, in key-digest order. Keys written after
    /// the call may or may not appear; a key deleted or dropped after the call does not.
    pub fn iter_partition(&self, partition: u32) -> PartitionIter {
        self.iter_partition_after(partition, None)
    }

    /// Like [`Engine::iter_partition`], but only the keys whose fingerprint sorts after `after`:
    /// with the fingerprint of the last key a previous iteration returned
    /// ([`PartitionIter::next_entry`]), a paged scan resumes where it stopped.
    pub fn iter_partition_after(&self, partition: u32, after: Option<KeyHash>) -> PartitionIter {
        let mut keys: Vec<KeyHash> = self
            .inner
            .st
            .borrow()
            .index
            .partition_entries(partition)
            .into_iter()
            .filter(|(k, e)| !e.tombstone && after.is_none_or(|a| *k > a))
            .map(|(k, _)| k)
            .collect();
        keys.sort_unstable();
        keys.reverse();
        PartitionIter {
            inner: Rc::downgrade(&self.inner),
            partition,
            keys,
        }
    }

    /// Every live record of the partitions `wanted` accepts, read in storage order with large
    /// sequential reads: the bulk read of a caller rebuilding something from all of its data.
    /// See [`LiveScan`] for what it returns while writes and compaction run.
    pub fn scan_live(&self, wanted: impl Fn(u32) -> bool + 'static) -> crate::LiveScan {
        crate::LiveScan::new(&self.inner, Box::new(wanted))
    }

    /// Partitions that hold at least one entry (a live key or a tombstone), in id order.
    pub fn partitions(&self) -> Vec<u32> {
        self.inner.st.borrow().index.partitions()
    }

    /// `(partition, bytes)` for every partition holding live records, in partition order: the
    /// stored bytes of its live records (padded record lengths; tombstones not counted). Kept by
    /// the index as entries change, so this costs one step per partition, not per key.
    pub fn partition_live_bytes(&self) -> Vec<(u32, u64)> {
        self.inner.st.borrow().index.partition_live_bytes()
    }

    /// Key fingerprints and value digests of one partition without any IO (for anti-entropy),
    /// sorted by digest. Tombstones are included with `tombstone` set.
    pub fn partition_digests(&self, partition: u32) -> Vec<(KeyHash, Entry)> {
        let mut v = self.inner.st.borrow().index.partition_entries(partition);
        v.sort_unstable_by_key(|(k, _)| *k);
        v
    }

    /// Counters and gauges for metrics.
    pub fn stats(&self) -> EngineStats {
        crate::stats::snapshot(&self.inner)
    }

    /// Flushes and syncs everything, seals the active segment (writing its hint file so the next
    /// open is fast), stops background tasks and releases the directory lock.
    ///
    /// On an engine that failed, it stops the background tasks, waits for them and returns the
    /// failure: afterwards the directory can be reopened (recovery decides what survived).
    pub async fn close(self) -> Result<(), EngineError> {
        let usable = self.inner.st.borrow().check_usable();
        if let Err(e) = usable {
            self.stop_tasks().await;
            return Err(e);
        }
        let epoch = {
            let mut st = self.inner.st.borrow_mut();
            st.closed = true;
            if let Some(active) = st.active.take() {
                active.sealed.set(true);
            }
            // An empty flush still finishes sealed segments (hint files), so always run one.
            st.gather.urgent();
            st.open_epoch
        };
        self.inner.flush_wake.notify();
        let r = wait_durable(&self.inner, epoch).await;
        self.stop_tasks().await;
        let spare = self.inner.st.borrow_mut().spare.take();
        if let Some(s) = spare {
            drop(s.file);
            io::remove(&crate::segment::segment_path(&self.inner.cfg.dir, s.id)).await?;
        }
        r
    }
}

impl Engine {
    /// Tells the background tasks to stop and waits for them. Maintenance finishes the sealed
    /// segments it was handed (hint files) before it exits.
    async fn stop_tasks(&self) {
        self.inner.shutdown_tasks();
        let tasks = std::mem::take(&mut *self.inner.tasks.borrow_mut());
        for t in tasks {
            t.await;
        }
    }
}

/// Dropping an engine without [`Engine::close`] is like a crash for buffered writes. Background
/// tasks are told to stop; one in the middle of an IO step finishes that step first and keeps
/// the directory locked until then, so a reopen right after a drop may see
/// [`EngineError::Locked`] for a moment.
impl Drop for Engine {
    fn drop(&mut self) {
        self.inner.shutdown_tasks();
    }
}

/// Reads a record's bytes, from memory if the segment still holds them there.
pub(crate) async fn read_record(
    inner: &Inner,
    seg: &Segment,
    loc: Location,
) -> Result<io::ReadBytes, EngineError> {
    if let Some(b) = seg.read_mem(loc.offset, loc.len as usize) {
        return Ok(io::ReadBytes::Mem(b));
    }
    let file = seg.file().expect("bytes not in memory are in the file");
    let c = &inner.counters;
    c.disk_reads.set(c.disk_reads.get() + 1);
    let r = io::read_exact_at(&file, &seg.path, loc.offset, loc.len as usize).await?;
    if r.len() < loc.len as usize {
        return Err(EngineError::Corrupt {
            path: seg.path.clone(),
            offset: loc.offset,
            reason: "record extends past end of file",
        });
    }
    Ok(r)
}

/// Makes every log write accepted so far durable (no-op when nothing is pending).
pub(crate) async fn flush_all(inner: &Inner) -> Result<(), EngineError> {
    let epoch = {
        let mut st = inner.st.borrow_mut();
        st.check_usable()?;
        if st.writing.iter().all(|s| s.synced.get() == s.len.get()) {
            return Ok(());
        }
        st.gather.urgent();
        st.open_epoch
    };
    inner.flush_wake.notify();
    wait_durable(inner, epoch).await
}

/// Waits until flush epoch `epoch` is durable or the engine failed.
pub(crate) async fn wait_durable(inner: &Inner, epoch: u64) -> Result<(), EngineError> {
    poll_fn(|cx| {
        let mut st = inner.st.borrow_mut();
        if st.durable_epoch >= epoch {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = &st.failed {
            return Poll::Ready(Err(EngineError::Failed(e.clone())));
        }
        st.waiters.push(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// Waits until every sealed, durable log segment has been finished by the maintenance task.
pub(crate) async fn wait_settled(inner: &Inner) -> Result<(), EngineError> {
    poll_fn(|cx| {
        let mut st = inner.st.borrow_mut();
        if let Some(e) = &st.failed {
            return Poll::Ready(Err(EngineError::Failed(e.clone())));
        }
        if st.to_finish.is_empty() && st.finishing == 0 {
            return Poll::Ready(Ok(()));
        }
        st.waiters.push(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// The flusher: one per engine, the only writer of log segments.
async fn flusher(weak: Weak<Inner>, wake: Rc<Wake>) {
    loop {
        // Decide when to flush without holding the engine alive while idle.
        loop {
            let deadline = {
                let Some(inner) = weak.upgrade() else { return };
                let st = inner.st.borrow();
                if st.failed.is_some() {
                    return;
                }
                if st.gather.wanted() {
                    // A wanted flush may wait for the writers of the last one to come back
                    // (`group_commit.rs`), a millisecond at most, even past a buffered write's
                    // flush interval. Not once the engine is dropped: its wake then resolves at
                    // once, and waiting would spin.
                    let until = if wake.is_shutdown() {
                        None
                    } else {
                        st.gather.wait_until(Instant::now())
                    };
                    if until.is_none() {
                        break;
                    }
                    until
                } else {
                    match st.buffered_since {
                        Some(t) => {
                            let due = t + inner.cfg.flush_interval;
                            if Instant::now() >= due {
                                break;
                            }
                            Some(due)
                        }
                        None if wake.is_shutdown() => return,
                        None => None,
                    }
                }
            };
            match deadline {
                Some(due) => {
                    let sleep =
                        glommio::timer::sleep(due.saturating_duration_since(Instant::now()));
                    futures_lite::future::or(sleep, wake.wait()).await;
                }
                None => wake.wait().await,
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        if flush_once(&inner).await.is_err() {
            return;
        }
    }
}

/// One group commit: write every pending segment, sync them, publish the epoch.
pub(crate) async fn flush_once(inner: &Rc<Inner>) -> Result<(), ()> {
    let (epoch, segs) = {
        let mut st = inner.st.borrow_mut();
        let e = st.open_epoch;
        st.open_epoch += 1;
        st.buffered_since = None;
        st.gather.started();
        (e, st.writing.iter().cloned().collect::<Vec<_>>())
    };
    let started = Instant::now();
    let result = async {
        for seg in &segs {
            flush_segment(inner, seg, IoClass::Log).await?;
        }
        for seg in &segs {
            let to = seg.flushed.get();
            if seg.synced.get() < to {
                // Every log segment is created O_DSYNC (`io::create_log`): the writes above
                // were durable when they completed.
                io::synced_by_writes(&seg.path, &inner.faults, IoClass::Log)?;
                seg.synced.set(to);
            }
        }
        Ok::<(), EngineError>(())
    }
    .await;
    let took = started.elapsed();
    inner.counters.record_flush(took);
    {
        let mut st = inner.st.borrow_mut();
        st.gather.completed(started + took, took);
        let waiters = std::mem::take(&mut st.waiters);
        match &result {
            Ok(()) => {
                assert!(st.durable_epoch < epoch, "epochs complete in order");
                st.durable_epoch = epoch;
            }
            Err(e) => {
                tracing::error!(error = %e, "flush failed; the store is now read-only until reopened");
                st.failed = Some(Arc::new(e.clone()));
            }
        }
        for w in waiters {
            w.wake();
        }
        if result.is_err() {
            return Err(());
        }
        // Sealed segments that are now wholly durable leave the write path; their hint files
        // are written by the maintenance task, not here, so the next flush is not delayed.
        let st = &mut *st;
        let mut sealed = false;
        st.writing.retain(|s| {
            let done = s.sealed.get() && s.synced.get() == s.len.get();
            if done {
                st.to_finish.push_back(s.clone());
                sealed = true;
            }
            !done
        });
        if sealed {
            inner.maintenance_wake.notify();
        }
    }
    Ok(())
}

/// Writes a segment's pending bytes (creating its file on first use).
pub(crate) async fn flush_segment(
    inner: &Inner,
    seg: &Segment,
    class: IoClass,
) -> Result<(), EngineError> {
    if seg.unflushed() == 0 {
        return Ok(());
    }
    let file = match seg.file() {
        Some(f) => f,
        None => {
            // Log segments are written durably as they go (the group commit relies on it);
            // compaction's outputs are synced once, when they are complete.
            let f = if class == IoClass::Log {
                io::create_log(&seg.path).await?
            } else {
                io::open_rw(&seg.path, true).await?
            };
            let f = Rc::new(f);
            io::sync_dir(&inner.cfg.dir, &inner.faults, class).await?;
            *seg.file.borrow_mut() = Some(f.clone());
            f
        }
    };
    let (start, end, buf) = {
        let m = seg.mem.borrow();
        (m.start, seg.len.get(), io::dma_copy(&file, &m.bytes))
    };
    if class == IoClass::Log {
        // Not into zeros still being written (`ahead.rs`); and once this write is issued, the
        // next zeros start past it.
        seg.ahead.before_write(start + buf.len() as u64).await;
        if seg.ahead.wants_zeros(inner.cfg.segment_bytes) && !seg.sealed.get() {
            inner.zero_wake.notify();
        }
    }
    io::write_buf(&file, &seg.path, &inner.faults, class, start, buf).await?;
    assert!(
        seg.flushed.get() <= end,
        "flushes of one segment complete in order"
    );
    seg.flushed.set(end);
    seg.trim_mem(end);
    let c = &inner.counters;
    c.bytes_written.set(c.bytes_written.get() + (end - start));
    Ok(())
}

/// A sealed segment reached the disk: write its hint file and release its memory. A failed hint
/// write or sync is not fatal, only logged and counted; see [`drop_failed_hint`] for why.
pub(crate) async fn finish_sealed(inner: &Inner, seg: &Segment) {
    assert!(seg.sealed.get());
    assert_eq!(
        seg.synced.get(),
        seg.len.get(),
        "sealed segments are finished once durable"
    );
    let hints = std::mem::take(&mut *seg.hints.borrow_mut());
    seg.release_mem();
    if let Err(e) = write_hint_file(inner, seg, &hints).await {
        let c = &inner.counters;
        c.hint_write_failures.set(c.hint_write_failures.get() + 1);
        tracing::warn!(error = %e, segment = seg.id, "hint file not written; recovery will scan the segment");
        drop_failed_hint(&seg.hint_path).await;
    }
    seg.finished.set(true);
}

/// Removes a hint file whose write or sync failed.
///
/// Why a failed hint is not fatal, unlike a failed sync of a segment or of the compaction intent
/// (fsyncgate: after a failed sync nothing about the file's state on disk is known): a hint is
/// derived from a segment that is already durable, nothing is acknowledged on its durability and
/// nothing is deleted because of it, and it is written once and never synced again, so no later
/// sync can report a false success for it. Its state being unknown, it is removed rather than left
/// for recovery's checks (CRC, segment id, lengths) alone; if the removal does not reach the disk
/// either, those checks still refuse a damaged hint, and a valid one is correct by construction.
/// The cost of the failure is one scan of the segment at the next open. A failing device shows at
/// the next sync of the log, which is fatal.
pub(crate) async fn drop_failed_hint(path: &std::path::Path) {
    if let Err(e) = io::remove(path).await {
        tracing::warn!(error = %e, "could not remove a hint file whose write failed");
    }
}

/// Hint-file bytes written per IO; the file is built and written chunk by chunk with yields in
/// between, because a 64 MiB segment of small records has a hint file of ~15 MB, and encoding and
/// copying that in one step would stall every request of the shard for milliseconds.
const HINT_CHUNK_BYTES: usize = 1 << 20;

async fn write_hint_file(
    inner: &Inner,
    seg: &Segment,
    hints: &[HintEntry],
) -> Result<(), EngineError> {
    let path = &seg.hint_path;
    let file = glommio::io::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(path)
        .await
        .map_err(|e| EngineError::io("create", path, e.into()))?;
    let header = crate::hint::HintHeader {
        segment_id: seg.id,
        created_seqno: seg.created_seqno,
        data_len: u32::try_from(seg.len.get()).expect("segments are at most 1 GiB"),
        count: u32::try_from(hints.len()).expect("records per segment fit in u32"),
    };
    let mut buf = Vec::with_capacity(HINT_CHUNK_BYTES + crate::hint::HINT_ENTRY_BYTES);
    let mut enc = crate::hint::HintEncoder::new(header, &mut buf);
    let mut pos = 0u64;
    for e in hints {
        enc.entry(e, &mut buf);
        if buf.len() >= HINT_CHUNK_BYTES {
            // Write whole blocks; the tail of the last block stays for the next chunk.
            let whole = buf.len() - buf.len() % io::IO_BLOCK_BYTES as usize;
            let dma = io::dma_copy(&file, &buf[..whole]);
            io::write_buf(&file, path, &inner.faults, IoClass::Hint, pos, dma).await?;
            buf.drain(..whole);
            pos += whole as u64;
            glommio::yield_if_needed().await;
        }
    }
    enc.finish(&mut buf);
    let dma = io::dma_copy(&file, &buf);
    io::write_buf(&file, path, &inner.faults, IoClass::Hint, pos, dma).await?;
    io::sync(&file, path, &inner.faults, IoClass::Hint).await?;
    file.close()
        .await
        .map_err(|e| EngineError::io("close", path, e.into()))
}

/// Iterator over one partition's live keys and values (see [`Engine::iter_partition`]).
pub struct PartitionIter {
    inner: Weak<Inner>,
    partition: u32,
    /// Remaining key fingerprints, popped from the back.
    keys: Vec<KeyHash>,
}

impl PartitionIter {
    /// Keys left to visit (an upper bound on the items still to come).
    pub fn remaining(&self) -> usize {
        self.keys.len()
    }

    /// The next (key, value), or `None` at the end.
    pub async fn next(&mut self) -> Option<Result<(Vec<u8>, Bytes), EngineError>> {
        self.next_entry()
            .await
            .map(|r| r.map(|(_, key, value)| (key, value)))
    }

    /// The next (fingerprint, key, value), or `None` at the end.
    pub async fn next_entry(&mut self) -> Option<Result<(KeyHash, Vec<u8>, Bytes), EngineError>> {
        let inner = self.inner.upgrade()?;
        while let Some(kh) = self.keys.pop() {
            let (seg, e) = {
                let st = inner.st.borrow();
                if let Err(e) = st.check_usable() {
                    return Some(Err(e));
                }
                match st.index.get(self.partition, kh) {
                    Some(e) if !e.tombstone => (st.segment(e.loc.slot).clone(), e),
                    _ => continue,
                }
            };
            let raw = match read_record(&inner, &seg, e.loc).await {
                Ok(r) => r,
                Err(err) => return Some(Err(err)),
            };
            return Some(match record::decode(&raw) {
                Ok(r) => Ok((kh, r.key.to_vec(), Bytes::copy_from_slice(r.value))),
                Err(_) => Err(EngineError::Corrupt {
                    path: seg.path.clone(),
                    offset: e.loc.offset,
                    reason: "checksum mismatch",
                }),
            });
        }
        None
    }
}
