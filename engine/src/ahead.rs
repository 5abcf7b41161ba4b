//! Zeros written ahead of the active log segment's tail, so that a group commit overwrites
//! blocks the file already has instead of growing it.
//!
//! Why: a log segment is `O_DSYNC` (`io::create_log`), so a group commit is one write, durable
//! when it completes. A write that grows the file also changes its size and its extents, and on
//! ext4 that makes the write a journal commit too. Such a write cannot be done without blocking,
//! so io_uring hands it to a kernel worker thread, which wakes on the shard's CPU and is switched
//! to and from at every group commit. A write over blocks the file already has, written, changes
//! no metadata: it runs inline, and its durability is the data plus the disk's cache flush.
//! Measured on this project's machines (docs/BENCHMARKS.md, "Results: zeros ahead of the log"),
//! group commits took half the time and synced writes cost less CPU. Blocks that were
//! `fallocate`d do not help: they are unwritten extents, and converting them is metadata again.
//!
//! How: a task of its own ([`run`]) keeps at least [`AHEAD_BYTES`] of zeros written past the end
//! of the flusher's last data write, [`CHUNK_BYTES`] at a time, up to the segment's size, from
//! the segment's first data write on (a first zero chunk before it would only make that write
//! wait). The task runs on the flusher's queue, not the background one: the flusher may wait
//! for a zero write in flight (below), and must not wait for a background share as well.
//! Zeroing the whole file at creation was tried and rejected earlier (`maintenance.rs`): 64 MiB
//! in one go competed with the foreground's syncs on the same disk. Ahead of the tail, the zeros
//! cost one more write of each byte of the log, in chunks, and an unused tail of at most a chunk
//! and a half when the segment is sealed early.
//!
//! The one rule that makes it safe: a zero write never covers bytes a data write was issued for,
//! nor one that will be issued while it is in flight. The task starts a zero write at or past
//! the end of every data write issued so far ([`Ahead::next_zeros`]), and the flusher,
//! before issuing a data write that reaches into a zero write in flight, waits for it to finish
//! ([`Ahead::before_write`]). Zeros past the records are what recovery already reads as the
//! unwritten end of a segment (`scan.rs`).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};

use crate::engine::{Inner, Wake};
use crate::io::{self, IO_BLOCK_BYTES, IoClass};

/// Zeros kept written past the end of the data, at least, while the segment has room: when
/// fewer are left, the next chunk is written. Half a chunk, so a chunk is written per chunk of
/// data, not per group commit.
pub(crate) const AHEAD_BYTES: u64 = CHUNK_BYTES / 2;

/// Bytes of one zero write.
pub(crate) const CHUNK_BYTES: u64 = 1 << 20;

const _: () = assert!(
    CHUNK_BYTES.is_multiple_of(IO_BLOCK_BYTES) && AHEAD_BYTES > 0 && AHEAD_BYTES <= CHUNK_BYTES
);

/// A log segment's zeros ahead of its tail.
#[derive(Default)]
pub(crate) struct Ahead {
    /// The end of the data writes issued so far, padded to a whole block: a zero write starts at
    /// or past it.
    issued: Cell<u64>,
    /// The end of the zero writes completed so far (0 before the first).
    zeroed: Cell<u64>,
    /// The zero write in flight, as `[start, end)`.
    in_flight: Cell<Option<(u64, u64)>>,
    /// No more zero writes for this segment: one failed, or the segment is only read.
    stopped: Cell<bool>,
    /// The flusher, waiting for the zero write in flight to finish.
    waiter: RefCell<Option<Waker>>,
}

impl Ahead {
    /// The flusher is about to write `[.., end)`: waits while a zero write in flight reaches
    /// below `end`, then records the write as issued, so no zero write starts below `end`.
    pub(crate) async fn before_write(&self, end: u64) {
        debug_assert!(
            end.is_multiple_of(IO_BLOCK_BYTES),
            "data writes cover whole blocks"
        );
        poll_fn(|cx| match self.in_flight.get() {
            Some((start, _)) if start < end => {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
            _ => Poll::Ready(()),
        })
        .await;
        self.issued.set(self.issued.get().max(end));
    }

    /// Whether the zeros past the data are short of [`AHEAD_BYTES`] in a segment of `size`
    /// bytes, and no zero write is in flight or has failed.
    pub(crate) fn wants_zeros(&self, size: u64) -> bool {
        self.next_zeros(size).is_some()
    }

    /// The range the next zero write should cover in a segment of `size` bytes, if one is
    /// wanted: from the end of the data written or zeroed so far, [`CHUNK_BYTES`] long or up to
    /// the segment's end. `None` before the segment's first data write, and when zeros are far
    /// enough ahead, the segment is covered, a zero write is in flight, or zeros are stopped.
    pub(crate) fn next_zeros(&self, size: u64) -> Option<(u64, u64)> {
        let issued = self.issued.get();
        if self.stopped.get() || self.in_flight.get().is_some() || issued == 0 {
            return None;
        }
        let size = size.next_multiple_of(IO_BLOCK_BYTES);
        let start = self.zeroed.get().max(issued);
        if start - issued >= AHEAD_BYTES || start >= size {
            return None;
        }
        Some((start, (start + CHUNK_BYTES).min(size)))
    }

    /// No zeros for this segment: it is read, never written (a segment recovered at open).
    pub(crate) fn stop(&self) {
        self.stopped.set(true);
    }

    /// A zero write of `range` (from [`Ahead::next_zeros`]) is being issued.
    pub(crate) fn started(&self, range: (u64, u64)) {
        assert!(
            self.in_flight.get().is_none(),
            "one zero write at a time per segment"
        );
        assert!(
            range.0 >= self.issued.get(),
            "zeros never cover a data write"
        );
        self.in_flight.set(Some(range));
    }

    /// The zero write in flight finished: on success its range is written; on failure no
    /// more are made for this segment. Wakes the flusher if it waits.
    pub(crate) fn finished(&self, ok: bool) {
        let range = self.in_flight.take();
        debug_assert!(range.is_some(), "finished without a zero write in flight");
        match range {
            Some((_, end)) if ok => self.zeroed.set(self.zeroed.get().max(end)),
            _ => self.stopped.set(true),
        }
        if let Some(w) = self.waiter.borrow_mut().take() {
            w.wake();
        }
    }
}

/// The task that writes zeros ahead of the active log segment's tail, woken by the flusher when
/// they run short. Like the engine's other tasks it holds the engine only while it works: a
/// dropped engine ends it, after the zero write in flight (which keeps the directory locked
/// until then).
pub(crate) async fn run(weak: Weak<Inner>, wake: Rc<Wake>) {
    loop {
        {
            let Some(inner) = weak.upgrade() else { return };
            zero_ahead(&inner, &wake).await;
        }
        if wake.is_shutdown() {
            return;
        }
        wake.wait().await;
    }
}

/// Keeps zeros written ahead of the active log segment's tail, a chunk at a time, until they
/// are far enough ahead (module docs). A failed zero write is logged and stops them for that
/// segment; the flusher's writes go on, growing the file as they would without zeros.
async fn zero_ahead(inner: &Inner, wake: &Wake) {
    while !wake.is_shutdown() {
        let (seg, file, range) = {
            let st = inner.st.borrow();
            if st.closed || st.failed.is_some() {
                return;
            }
            let Some(seg) = st.active.clone() else { return };
            let Some(file) = seg.file() else { return };
            if seg.sealed.get() {
                return;
            }
            let Some(range) = seg.ahead.next_zeros(inner.cfg.segment_bytes) else {
                return;
            };
            (seg, file, range)
        };
        seg.ahead.started(range);
        let (start, end) = range;
        let mut zeros = file.alloc_dma_buffer((end - start) as usize);
        zeros.as_bytes_mut().fill(0);
        let written = io::write_buf(
            &file,
            &seg.path,
            &inner.faults,
            IoClass::Ahead,
            start,
            zeros,
        )
        .await;
        match &written {
            Ok(()) => {
                let c = &inner.counters;
                c.zeroed_bytes.set(c.zeroed_bytes.get() + (end - start));
            }
            Err(e) => {
                let c = &inner.counters;
                c.zero_write_failures.set(c.zero_write_failures.get() + 1);
                tracing::warn!(
                    error = %e,
                    segment = %seg.path.display(),
                    "could not write zeros ahead of the log; its group commits will grow the file"
                );
            }
        }
        seg.ahead.finished(written.is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 8 * CHUNK_BYTES;

    fn write(a: &Ahead, end: u64) {
        futures_lite::future::block_on(a.before_write(end));
    }

    /// A zero write of `range` issued and completed.
    fn zero(a: &Ahead, range: (u64, u64)) {
        a.started(range);
        a.finished(true);
    }

    #[test]
    fn zeros_start_past_every_data_write_and_stop_when_far_enough_ahead() {
        let a = Ahead::default();
        // None before the first data write: a chunk at 0 would only make that write wait.
        assert_eq!(a.next_zeros(SIZE), None);
        write(&a, 2 * IO_BLOCK_BYTES);
        let r = a.next_zeros(SIZE).unwrap();
        assert_eq!(r, (2 * IO_BLOCK_BYTES, 2 * IO_BLOCK_BYTES + CHUNK_BYTES));
        a.started(r);
        assert!(!a.wants_zeros(SIZE), "one zero write at a time");
        a.finished(true);
        // A chunk past the data is enough ahead.
        assert_eq!(a.next_zeros(SIZE), None);
        // Data coming within `AHEAD_BYTES` of the zeros' end asks for more, from that end.
        write(&a, r.1 - AHEAD_BYTES);
        assert_eq!(a.next_zeros(SIZE), None, "exactly far enough");
        write(&a, r.1 - AHEAD_BYTES + IO_BLOCK_BYTES);
        assert_eq!(a.next_zeros(SIZE), Some((r.1, r.1 + CHUNK_BYTES)));
        // Data past the zeros (they fell behind): the next chunk starts past the data.
        write(&a, r.1 + 3 * IO_BLOCK_BYTES);
        assert_eq!(
            a.next_zeros(SIZE).map(|r| r.0),
            Some(r.1 + 3 * IO_BLOCK_BYTES)
        );
    }

    #[test]
    fn zeros_end_at_the_segment_size_rounded_to_a_block() {
        let a = Ahead::default();
        let size = CHUNK_BYTES / 2 + 1;
        let end = (CHUNK_BYTES / 2).next_multiple_of(IO_BLOCK_BYTES) + IO_BLOCK_BYTES;
        write(&a, IO_BLOCK_BYTES);
        assert_eq!(a.next_zeros(size), Some((IO_BLOCK_BYTES, end)));
        zero(&a, (IO_BLOCK_BYTES, end));
        assert_eq!(a.next_zeros(size), None, "the segment is covered");
    }

    #[test]
    fn a_failed_zero_write_or_a_stop_ends_them() {
        let a = Ahead::default();
        write(&a, IO_BLOCK_BYTES);
        let r = a.next_zeros(SIZE).unwrap();
        a.started(r);
        a.finished(false);
        assert_eq!(a.next_zeros(SIZE), None);
        // Data writes go on as before.
        write(&a, SIZE);
        let b = Ahead::default();
        b.stop();
        write(&b, IO_BLOCK_BYTES);
        assert_eq!(b.next_zeros(SIZE), None);
    }

    #[test]
    fn a_data_write_into_zeros_in_flight_waits_for_them() {
        use std::pin::pin;
        use std::task::Context;
        let a = Ahead::default();
        write(&a, IO_BLOCK_BYTES);
        let r = a.next_zeros(SIZE).unwrap();
        a.started(r);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        // Ending where the zeros start (the partial block rewritten): no wait.
        let below = pin!(a.before_write(r.0));
        assert!(below.poll(&mut cx).is_ready());
        // Into them: waits until they finish.
        let mut into = pin!(a.before_write(r.0 + IO_BLOCK_BYTES));
        assert!(into.as_mut().poll(&mut cx).is_pending());
        assert!(a.waiter.borrow().is_some());
        a.finished(true);
        assert!(into.as_mut().poll(&mut cx).is_ready());
        // Still far enough ahead; once the data comes closer, the next chunk follows.
        assert_eq!(a.next_zeros(SIZE), None);
        write(&a, r.1 - AHEAD_BYTES + IO_BLOCK_BYTES);
        assert_eq!(a.next_zeros(SIZE).map(|r| r.0), Some(r.1));
    }
}
