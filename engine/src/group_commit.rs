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
//! carries half of the writers, and the node pays twice the writes, kernel round trips and
//! wakeups per synced request. Measured on one shard under redis-benchmark's 50 connections
//! (docs/BENCHMARKS.md, "Group commits that wait for the writers of the last one"): about 24
//! writes per flush, where the same load answered from one group carries about 50.
//!
//! # The rule
//!
//! When a flush completes, the writers it answered and the synced writes already waiting for
//! the next one are the writers in play: the next flush starts once that many synced writes wait
//! for it, or once as long as the last flush took has passed since it completed, whichever comes
//! first (and never later than [`GATHER_MAX`] after it). So:
//! - a lone writer never waits: it is the whole group when it comes back;
//! - two groups taking turns merge after one flush, and stay merged;
//! - writers that leave cost the next flush at most one flush's time, once, and the group shrinks
//!   to those that came back;
//! - a wait is bounded by what a flush costs on this disk, so a fast disk waits for little.
//!
//! A flush someone needs at once (a writer waiting for buffer room, an explicit sync, closing)
//! never waits, nor does a write that finds no flush completed yet.

use std::time::{Duration, Instant};

/// The longest the next flush waits for writers to come back, whatever the last flush took.
pub(crate) const GATHER_MAX: Duration = Duration::from_millis(1);

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
    /// Synced writes the flush in progress carries.
    flushing: u32,
}

impl Gather {
    /// A synced write joined the open epoch.
    pub(crate) fn synced_write(&mut self) {
        self.pending = self.pending.saturating_add(1);
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
        self.flushing = std::mem::take(&mut self.pending);
        self.urgent = false;
    }

    /// The flush that started last completed at `now`, after `took`.
    pub(crate) fn completed(&mut self, now: Instant, took: Duration) {
        self.target = self.pending.saturating_add(self.flushing);
        self.until = Some(now + took.min(GATHER_MAX));
        self.flushing = 0;
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

    /// A writer alone is flushed the moment it writes, before any flush and after each one.
    #[test]
    fn a_lone_writer_never_waits() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        writes(&mut g, 1);
        assert_eq!(g.wait_until(t0), None, "nothing completed yet");
        for round in 1..=3u32 {
            g.started();
            let done = t0 + FLUSH * round;
            g.completed(done, FLUSH);
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
        g.started();
        writes(&mut g, 26);
        let done = t0 + FLUSH;
        g.completed(done, FLUSH);
        // The second group waits for the first, back a moment later.
        assert_eq!(g.wait_until(done), Some(done + FLUSH));
        writes(&mut g, 23);
        assert_eq!(g.wait_until(done + FLUSH / 4), Some(done + FLUSH));
        writes(&mut g, 1);
        assert_eq!(g.wait_until(done + FLUSH / 4), None, "all 50 are in");
        g.started();
        let done = done + FLUSH / 4 + FLUSH;
        g.completed(done, FLUSH);
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
        g.started();
        g.completed(t0 + FLUSH, FLUSH);
        writes(&mut g, 3);
        let until = g.wait_until(t0 + FLUSH).expect("waits for the other five");
        assert_eq!(until, t0 + FLUSH * 2);
        assert_eq!(g.wait_until(until), None, "not past the last flush's time");
        g.started();
        let done = until + FLUSH;
        g.completed(done, FLUSH);
        writes(&mut g, 3);
        assert_eq!(
            g.wait_until(done),
            None,
            "the three that stayed are the group now"
        );
    }

    /// However long the last flush took, the next waits at most `GATHER_MAX` after it.
    #[test]
    fn a_slow_flush_bounds_the_wait_by_the_cap() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        writes(&mut g, 4);
        g.started();
        g.completed(t0, Duration::from_secs(2));
        writes(&mut g, 1);
        assert_eq!(g.wait_until(t0), Some(t0 + GATHER_MAX));
    }

    /// A flush needed at once (buffer room, an explicit sync, closing) does not wait, and the
    /// need ends with the flush that serves it.
    #[test]
    fn an_urgent_flush_never_waits() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        writes(&mut g, 10);
        g.started();
        g.completed(t0, FLUSH);
        writes(&mut g, 1);
        assert!(g.wait_until(t0).is_some());
        g.urgent();
        assert_eq!(g.wait_until(t0), None);
        g.started();
        writes(&mut g, 3);
        g.completed(t0 + FLUSH, FLUSH);
        assert!(g.wait_until(t0 + FLUSH).is_some(), "urgency is spent");
    }
}
