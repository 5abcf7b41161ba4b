//! Pacing a long CPU-bound loop so that the shard keeps serving while it runs.
//!
//! glommio polls its rings (and so learns that a request arrived or a read finished) only when
//! no task queue can run, or when the running queue has used up its preempt period (100 ms by
//! default; lowered to a queue's latency only while that queue already has runnable tasks). A
//! loop that stays runnable therefore holds requests back for up to that period, even in a
//! background queue, and `yield_if_needed` does not help, since it yields only on that same
//! preemption. A [`Pace`] sleeps for [`PAUSE`] after every [`WORK_SLICE`] of work instead: while
//! the loop's task sleeps the executor polls, and the requests it finds run first.
//!
//! Cost: one timer per millisecond of work (about 1% of the loop's time in this machine's
//! measurements). Used by the live scan's index walk and the cluster's tree build after a start.

use std::time::{Duration, Instant};

/// Work a paced loop does before it pauses.
pub const WORK_SLICE: Duration = Duration::from_millis(1);
/// The pause: long enough to be a timer, so the task is not runnable while the executor polls.
pub const PAUSE: Duration = Duration::from_micros(10);

/// Pauses a loop after every [`WORK_SLICE`] (module docs).
#[derive(Debug)]
pub struct Pace {
    since: Instant,
}

impl Default for Pace {
    fn default() -> Self {
        Self::new()
    }
}

impl Pace {
    /// A pace whose first slice starts now.
    pub fn new() -> Self {
        Self {
            since: Instant::now(),
        }
    }

    /// Called between two steps of the loop: pauses if the current slice is used up.
    pub async fn step(&mut self) {
        if self.since.elapsed() >= WORK_SLICE {
            glommio::timer::sleep(PAUSE).await;
            self.since = Instant::now();
        }
    }
}
