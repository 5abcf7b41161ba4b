//! When the next group commit starts (sans-IO): at once, or after the writers of the last one
//! are back, so that one durable write carries them all.
//!
//! # Why wait at all
//!
//! Writers that wait for durability come back as soon as they are answered: a client sends its
//! next synced write once the last is acknowledged. A flush that started the moment any synced
//! write arrived splits such a load into two groups that take turns: the writers that arrived
//! while a flush ran go out at once in the next one, and those it answered come back a moment
//! later, too late to join, and wait a whole flush for the one after. Each durable write then
//! carries part of the writers, and the node pays more writes, kernel round trips and wakeups per
//! synced request. Measured on one shard under redis-benchmark's 50 connections
//! (docs/BENCHMARKS.md, "Group commits that wait for the writers of the last one"): about 27
//! writes per flush, where Redis's `fdatasync` carried 49 under the same load.
//!
//! # The rule
//!
//! When a flush completes, the writers it answered and the synced writes already waiting for
//! the next one are the writers in play: the next flush starts once that many synced writes wait
//! for it, or once as long as the last flush took has passed since it completed (never more than
//! [`GATHER_WAIT_MAX`]), whichever comes first. So:
//! - a lone writer never waits: it is the whole group when it comes back;
//! - two groups taking turns merge into one flush when the returning one is back in time (at
//!   c=50 the flushes carried 37 writes instead of 27; at c=8, 8.1 instead of 4.5);
//! - a writer that comes back later than that, or not at all, holds each flush it is counted for
//!   by the last flush's time at most; one that left is not counted after the flush that went
//!   without it;
//! - the wait scales with the last flush's time, which is short when the disk is fast.
//!
//! A flush someone needs at once never waits ([`Gather::urgent`]): a writer waiting for buffer
//! room, an explicit sync (which the cluster also asks for after a synced write that changed
//! nothing, or a synced delete of an absent key), closing.

use std::time::{Duration, Instant};

/// The longest the next flush waits for writers to come back, whatever the last flush took.
pub(crate) const GATHER_WAIT_MAX: Duration = Duration::from_millis(1);

/// What decides when the next group commit starts (module docs).
#[derive(Debug, Default)]
pub(crate) struct Gather {
    /// Synced writes waiting for the next flush.
    pending: u32,
    /// How many synced writes the next flush waits for.
    target: u32,
    /// Until when it waits for them: as long after the last flush completed as that flush took.
    until: Option<Instant>,
    /// The next flush is needed at once.
    urgent: bool,
    /// Synced writes the flush in progress carries, while one is in progress.
    flushing: Option<u32>,
}

impl Gather {
    /// A synced write joined the open epoch. Whether the flusher must look again: for the first
    /// write a flush is wanted for, and once enough wait; in between it sleeps until its
    /// deadline rather than waking for every write.
    pub(crate) fn synced_write(&mut self) -> bool {
        self.pending = self.pending.saturating_add(1);
        self.pending == 1 || self.pending >= self.target
    }

    /// Whether a flush is wanted: a synced write waits for one, or one is needed at once.
    pub(crate) fn wanted(&self) -> bool {
        self.urgent || self.pending > 0
    }

    /// The next flush is needed at once.
    pub(crate) fn urgent(&mut self) {
        self.urgent = true;
    }

    /// When the next flush may start, given that one is wanted: `None` for now, else the time
    /// to start it unless enough writers come first (a synced write wakes the flusher).
    pub(crate) fn wait_until(&self, now: Instant) -> Option<Instant> {
        if self.urgent || self.pending >= self.target {
            return None;
        }
        self.until.filter(|&until| now < until)
    }

    /// A flush starts now, with what waits for it.
    pub(crate) fn started(&mut self) {
        assert!(self.flushing.is_none(), "one flush at a time");
        self.flushing = Some(std::mem::take(&mut self.pending));
        self.urgent = false;
    }

    /// The flush in progress completed at `now`, after `took`.
    pub(crate) fn completed(&mut self, now: Instant, took: Duration) {
        let carried = self
            .flushing
            .take()
            .expect("a flush completes only once it started");
        self.target = self.pending.saturating_add(carried);
        self.until = Some(now + took.min(GATHER_WAIT_MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLUSH: Duration = Duration::from_micros(400);

    fn writes(g: &mut Gather, n: u32) {
        for _ in 0..n {
            g.synced_write();
        }
    }

    /// A flush of what waits, during which `during` more synced writes arrive, completed at
    /// `done` after `took`.
    fn flush(g: &mut Gather, during: u32, done: Instant, took: Duration) {
        g.started();
        writes(g, during);
        g.completed(done, took);
    }

    /// The flusher is woken by the first write a flush is wanted for and by the one that makes
    /// the group whole, not by those in between, which its deadline covers.
    #[test]
    fn the_flusher_wakes_for_the_first_write_and_the_whole_group() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        assert!(!g.wanted());
        assert!(g.synced_write(), "the first write wants a flush");
        assert!(g.wanted());
        writes(&mut g, 3);
        g.started();
        assert!(!g.wanted(), "the flush took them");
        g.completed(t0, FLUSH);
        assert!(g.synced_write(), "the first write after the flush");
        assert!(!g.synced_write());
        assert!(!g.synced_write());
        assert!(g.synced_write(), "all four are back");
        assert_eq!(g.wait_until(t0), None);
        flush(&mut g, 0, t0 + FLUSH, FLUSH);
        g.urgent();
        assert!(g.wanted(), "a flush needed at once, with no write waiting");
    }

    /// A writer alone is flushed the moment it writes, before any flush and after each one.
    #[test]
    fn a_lone_writer_never_waits() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        writes(&mut g, 1);
        assert_eq!(g.wait_until(t0), None, "nothing completed yet");
        for round in 1..=3u32 {
            let done = t0 + FLUSH * round;
            flush(&mut g, 0, done, FLUSH);
            writes(&mut g, 1);
            assert_eq!(g.wait_until(done), None, "round {round}");
        }
    }

    /// Two groups taking turns: the flush after one waits for the group it answered to come
    /// back, then carries both, and so on while they keep writing.
    #[test]
    fn groups_taking_turns_merge_into_one_flush() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        // The first group (24) is flushed; the second (26) arrives while it runs.
        writes(&mut g, 24);
        assert_eq!(g.wait_until(t0), None);
        let done = t0 + FLUSH;
        flush(&mut g, 26, done, FLUSH);
        // The second group waits for the first, back a moment later.
        assert_eq!(g.wait_until(done), Some(done + FLUSH));
        writes(&mut g, 23);
        assert_eq!(g.wait_until(done + FLUSH / 4), Some(done + FLUSH));
        writes(&mut g, 1);
        assert_eq!(g.wait_until(done + FLUSH / 4), None, "all 50 are in");
        let done = done + FLUSH / 4 + FLUSH;
        flush(&mut g, 0, done, FLUSH);
        // One group of 50 now: the next flush starts when all 50 are back, not before.
        writes(&mut g, 49);
        assert!(g.wait_until(done).is_some());
        writes(&mut g, 1);
        assert_eq!(g.wait_until(done), None);
    }

    /// Writers that do not come back hold the next flush for as long as the last one took, no
    /// longer, and only once: the flush after waits for those that did come back.
    #[test]
    fn writers_that_leave_cost_one_flush_time_once() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        writes(&mut g, 8);
        flush(&mut g, 0, t0 + FLUSH, FLUSH);
        writes(&mut g, 3);
        let until = g.wait_until(t0 + FLUSH).expect("waits for the other five");
        assert_eq!(until, t0 + FLUSH * 2);
        assert_eq!(g.wait_until(until), None, "not past the last flush's time");
        let done = until + FLUSH;
        flush(&mut g, 0, done, FLUSH);
        writes(&mut g, 3);
        assert_eq!(
            g.wait_until(done),
            None,
            "the three that stayed are the group now"
        );
    }

    /// However long the last flush took, the next waits at most `GATHER_WAIT_MAX` after it.
    #[test]
    fn a_slow_flush_bounds_the_wait_by_the_cap() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        writes(&mut g, 4);
        flush(&mut g, 0, t0, Duration::from_secs(2));
        writes(&mut g, 1);
        assert_eq!(g.wait_until(t0), Some(t0 + GATHER_WAIT_MAX));
    }

    /// A flush needed at once (buffer room, an explicit sync, closing) does not wait, and the
    /// need ends with the flush that serves it.
    #[test]
    fn an_urgent_flush_never_waits() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        writes(&mut g, 10);
        flush(&mut g, 0, t0, FLUSH);
        writes(&mut g, 1);
        assert!(g.wait_until(t0).is_some());
        g.urgent();
        assert_eq!(g.wait_until(t0), None);
        flush(&mut g, 3, t0 + FLUSH, FLUSH);
        assert!(g.wait_until(t0 + FLUSH).is_some(), "urgency is spent");
    }
}
