//! Local failure detection: a phi-accrual detector per peer (Hayashibara et al., "The φ Accrual
//! Failure Detector", SRDS 2004), sans-IO.
//!
//! Instead of a yes/no timeout, the detector outputs a suspicion level `φ` that grows the longer a
//! peer stays silent compared with how often it is usually heard from: `φ = 1` means the silence
//! has about a 10% chance of being normal, `φ = 8` about one in 10^8. Callers compare `φ` with a
//! threshold ([`PHI_THRESHOLD_DEFAULT`]); raising it trades slower detection for fewer false
//! suspicions. Arrivals are gossip messages and answered requests, so a busy peer is judged by its
//! request traffic and an idle one by gossip.
//!
//! Like Cassandra's detector, the inter-arrival times are modelled as exponential with the mean of
//! a bounded window ([`WINDOW_MAX`] samples), so `φ(t) = (t / mean) · log10(e)`. The mean is
//! floored at the expected interval (the heartbeat period, and never below [`MEAN_MIN_MS`]): a
//! burst of request traffic fills the window with tiny intervals, and without the floor the
//! ordinary wait for the next heartbeat after the burst would look fatal. It is capped by
//! `mean_max_ms` so a peer silent from the start is still suspected.
//!
//! The detector is local: every node (every shard) keeps its own, and nothing is gossiped about
//! suspicion. Limits: memory is `WINDOW_MAX` samples per peer.

use std::collections::VecDeque;

/// Samples kept per peer.
pub const WINDOW_MAX: usize = 100;
/// Floor of the mean inter-arrival time, in milliseconds.
pub const MEAN_MIN_MS: f64 = 50.0;
/// Suspicion level above which a peer is treated as down.
pub const PHI_THRESHOLD_DEFAULT: f64 = 8.0;

/// One peer's arrival history.
#[derive(Clone, Debug)]
pub struct PhiDetector {
    intervals: VecDeque<u64>,
    sum: u64,
    last: Option<u64>,
    mean_min_ms: f64,
    mean_max_ms: f64,
}

impl PhiDetector {
    /// A detector that assumes, before any sample, one arrival every `expected_interval_ms`
    /// (the heartbeat interval), and never a mean below that (nor below [`MEAN_MIN_MS`]) or
    /// above `4 ×` that.
    pub fn new(expected_interval_ms: u64) -> Self {
        let expected = expected_interval_ms.max(1);
        let mut intervals = VecDeque::with_capacity(WINDOW_MAX);
        intervals.push_back(expected);
        PhiDetector {
            intervals,
            sum: expected,
            last: None,
            mean_min_ms: (expected as f64).max(MEAN_MIN_MS),
            mean_max_ms: 4.0 * expected as f64,
        }
    }

    /// The peer was heard from at `now`.
    pub fn arrived(&mut self, now: u64) {
        if let Some(last) = self.last
            && now > last
        {
            if self.intervals.len() == WINDOW_MAX {
                let old = self.intervals.pop_front().expect("the window is full");
                self.sum -= old;
            }
            let interval = now - last;
            self.intervals.push_back(interval);
            self.sum += interval;
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
    }

    /// The suspicion level at `now`; 0 before the first arrival (silence from a peer never heard
    /// is judged from when the caller started watching it: call [`PhiDetector::arrived`] then).
    pub fn phi(&self, now: u64) -> f64 {
        let Some(last) = self.last else {
            return 0.0;
        };
        let mean = (self.sum as f64 / self.intervals.len() as f64)
            .clamp(self.mean_min_ms, self.mean_max_ms.max(self.mean_min_ms));
        let silence = now.saturating_sub(last) as f64;
        silence / mean * std::f64::consts::LOG10_E
    }

    /// Whether the peer is suspected at `now` with threshold `threshold`.
    pub fn suspected(&self, now: u64, threshold: f64) -> bool {
        self.phi(now) > threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer heard every second is fine after a second of silence and suspected after half a
    /// minute; suspicion grows monotonically with silence and resets on arrival.
    #[test]
    fn suspicion_grows_with_silence() {
        let mut d = PhiDetector::new(1000);
        for t in 0..20 {
            d.arrived(t * 1000);
        }
        let last = 19_000;
        assert!(!d.suspected(last + 1000, PHI_THRESHOLD_DEFAULT));
        assert!(d.suspected(last + 30_000, PHI_THRESHOLD_DEFAULT));
        let mut previous = 0.0;
        for s in (0..30_000).step_by(500) {
            let phi = d.phi(last + s);
            assert!(phi >= previous);
            previous = phi;
        }
        d.arrived(last + 30_000);
        assert!(!d.suspected(last + 30_001, PHI_THRESHOLD_DEFAULT));
    }

    /// Bursts of arrivals do not make a short pause fatal (mean floor), and the window forgets.
    #[test]
    fn bursts_and_window() {
        let mut d = PhiDetector::new(1000);
        for t in 0..500 {
            d.arrived(t);
        }
        assert!(!d.suspected(499 + 200, PHI_THRESHOLD_DEFAULT));
        assert_eq!(d.intervals.len(), WINDOW_MAX);
        assert_eq!(d.sum, d.intervals.iter().sum::<u64>());
    }

    /// After a burst of traffic has filled the window with 1 ms intervals, silence until the next
    /// heartbeat (and a few more) is not suspicious; a long silence still is.
    #[test]
    fn a_burst_does_not_make_the_next_heartbeat_late() {
        let mut d = PhiDetector::new(1000);
        for t in 0..(2 * WINDOW_MAX as u64) {
            d.arrived(t);
        }
        let last = 2 * WINDOW_MAX as u64 - 1;
        assert!(!d.suspected(last + 1000, PHI_THRESHOLD_DEFAULT));
        assert!(!d.suspected(last + 5000, PHI_THRESHOLD_DEFAULT));
        assert!(d.suspected(last + 30_000, PHI_THRESHOLD_DEFAULT));
    }
}
