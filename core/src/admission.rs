//! Admission control of background work (Dynamo §6.5), sans-IO.
//!
//! Background work (hint delivery, and later anti-entropy and partition transfers) competes with
//! client requests for the same core and disk. Dynamo's answer: watch the foreground's tail
//! latency and hand the background only what the foreground can spare. This controller takes the
//! latency of every completed client request ([`AdmissionController::record`]), and every
//! `interval_ms` ([`AdmissionController::tick`]) compares the 99th percentile over a sliding
//! window (the current and the previous interval) with a threshold. It keeps a *background
//! share* in `[share_min, 1]`: above the threshold the share is multiplied by `decrease_factor`
//! (back off fast), at or below it `increase_step` is added (recover slowly), the AIMD rule of
//! congestion control. An interval without samples counts as below the threshold: an idle node
//! has nothing to protect.
//!
//! The node applies the share to the shares of its background task queues and to the core's own
//! pacing ([`crate::coordinator::Core::set_background_share`]: hint credit granted and hints in
//! flight). The controller reads no clock: `now` comes from the caller, so it is deterministic.
//!
//! Limits: two histograms of [`LATENCY_US_MAX`] range at 2 significant digits (a few KiB each);
//! latencies above the range count as the maximum.

use hdrhistogram::Histogram;

/// Largest latency recorded exactly, in microseconds (one minute).
pub const LATENCY_US_MAX: u64 = 60_000_000;

/// Settings of an [`AdmissionController`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionConfig {
    /// Foreground p99 above which background work backs off, in microseconds.
    pub p99_threshold_us: u64,
    /// Lowest share (background work never stops entirely: hints must drain eventually).
    pub share_min: f64,
    /// Factor applied to the share when the p99 is above the threshold, in `(0, 1)`.
    pub decrease_factor: f64,
    /// Added to the share when the p99 is at or below the threshold.
    pub increase_step: f64,
    /// Length of one interval; the window is two of them.
    pub interval_ms: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            p99_threshold_us: 10_000,
            share_min: 0.05,
            decrease_factor: 0.5,
            increase_step: 0.05,
            interval_ms: 1_000,
        }
    }
}

/// What the controller looks like now, for metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionState {
    /// The background share, in `[share_min, 1]`.
    pub share: f64,
    /// The window's p99 at the last adjustment, in microseconds (0 with no samples).
    pub p99_us: u64,
    /// The threshold, in microseconds.
    pub threshold_us: u64,
    /// Adjustments that changed the share.
    pub adjustments: u64,
}

/// The controller (module docs).
#[derive(Debug)]
pub struct AdmissionController {
    cfg: AdmissionConfig,
    current: Histogram<u64>,
    previous: Histogram<u64>,
    share: f64,
    p99_us: u64,
    adjustments: u64,
    next_adjust: Option<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 2).expect("constant bounds are valid")
}

impl AdmissionController {
    /// A controller with the full share.
    pub fn new(cfg: AdmissionConfig) -> Self {
        assert!(cfg.share_min > 0.0 && cfg.share_min <= 1.0);
        assert!(cfg.decrease_factor > 0.0 && cfg.decrease_factor < 1.0);
        assert!(cfg.increase_step > 0.0);
        assert!(cfg.interval_ms > 0);
        AdmissionController {
            cfg,
            current: histogram(),
            previous: histogram(),
            share: 1.0,
            p99_us: 0,
            adjustments: 0,
            next_adjust: None,
        }
    }

    /// A foreground request completed after `latency_us`.
    pub fn record(&mut self, latency_us: u64) {
        self.record_n(latency_us, 1);
    }

    /// `n` foreground requests completed after `latency_us` each.
    pub fn record_n(&mut self, latency_us: u64, n: u64) {
        self.current
            .saturating_record_n(latency_us.clamp(1, LATENCY_US_MAX), n);
    }

    /// Time passed: adjusts the share when an interval ended. Returns the new share if it
    /// changed.
    pub fn tick(&mut self, now: u64) -> Option<f64> {
        let due = *self.next_adjust.get_or_insert(now + self.cfg.interval_ms);
        if now < due {
            return None;
        }
        self.next_adjust = Some(now + self.cfg.interval_ms);
        let mut window = self.previous.clone();
        // Same bounds on both: adding cannot fail.
        let _ = window.add(&self.current);
        self.p99_us = if window.is_empty() {
            0
        } else {
            window.value_at_quantile(0.99)
        };
        self.previous = std::mem::replace(&mut self.current, histogram());
        let share = if self.p99_us > self.cfg.p99_threshold_us {
            (self.share * self.cfg.decrease_factor).max(self.cfg.share_min)
        } else {
            (self.share + self.cfg.increase_step).min(1.0)
        };
        if share == self.share {
            return None;
        }
        self.share = share;
        self.adjustments += 1;
        Some(share)
    }

    /// The share now.
    pub fn share(&self) -> f64 {
        self.share
    }

    /// The state for metrics.
    pub fn state(&self) -> AdmissionState {
        AdmissionState {
            share: self.share,
            p99_us: self.p99_us,
            threshold_us: self.cfg.p99_threshold_us,
            adjustments: self.adjustments,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> AdmissionController {
        AdmissionController::new(AdmissionConfig {
            p99_threshold_us: 10_000,
            share_min: 0.05,
            decrease_factor: 0.5,
            increase_step: 0.1,
            interval_ms: 100,
        })
    }

    /// One interval of `n` requests, `slow` of them taking 50 ms and the rest 1 ms.
    fn interval(c: &mut AdmissionController, now: &mut u64, n: u64, slow: u64) -> Option<f64> {
        for i in 0..n {
            c.record(if i < slow { 50_000 } else { 1_000 });
        }
        *now += 100;
        c.tick(*now)
    }

    /// A slow foreground halves the share each interval down to the floor, never below; once
    /// the foreground is fast again for a whole window, the share climbs back by steps to 1 and
    /// stays there. Each change counts as one adjustment.
    #[test]
    fn backs_off_under_latency_and_recovers() {
        let mut c = controller();
        let mut now = 0;
        assert_eq!(c.tick(now), None, "the first tick only starts the clock");
        assert_eq!(interval(&mut c, &mut now, 100, 5), Some(0.5));
        assert!((49_000..=51_000).contains(&c.state().p99_us));
        assert_eq!(interval(&mut c, &mut now, 100, 5), Some(0.25));
        for _ in 0..10 {
            interval(&mut c, &mut now, 100, 5);
            assert!(c.share() >= 0.05);
        }
        assert_eq!(c.share(), 0.05);
        let adjustments = c.state().adjustments;
        // The window still holds the slow interval: one more decrease attempt (at the floor,
        // no change), then recovery.
        assert_eq!(interval(&mut c, &mut now, 100, 0), None);
        assert_eq!(c.state().adjustments, adjustments);
        let mut last = c.share();
        for _ in 0..9 {
            let s = interval(&mut c, &mut now, 100, 0).expect("rises");
            assert!(s > last);
            last = s;
        }
        assert!((c.share() - 0.95).abs() < 1e-9, "{}", c.share());
        assert_eq!(interval(&mut c, &mut now, 100, 0), Some(1.0));
        assert_eq!(interval(&mut c, &mut now, 100, 0), None);
        assert_eq!(c.share(), 1.0);
        assert!(c.state().p99_us <= 1_100);
    }

    /// One slow request in a hundred is not the 99th percentile; two are. Idle intervals count
    /// as fast. The same inputs give the same outputs.
    #[test]
    fn percentile_idle_and_determinism() {
        let run = || {
            let mut c = controller();
            let mut now = 0;
            c.tick(now);
            let mut shares = Vec::new();
            for (n, slow) in [(200, 1), (200, 2), (100, 2), (0, 0), (0, 0)] {
                let share = interval(&mut c, &mut now, n, slow);
                shares.push(share.map(|s| (s * 100.0).round() as u64));
            }
            (shares, c.state())
        };
        let (shares, state) = run();
        // Slow requests in the window: 1 of 200, then 3 of 400 (below 1%: no change at the
        // full share), 4 of 300 (above: halved), 2 of 100 with an idle interval (still above),
        // then an empty window (idle: rises).
        assert_eq!(shares, vec![None, None, Some(50), Some(25), Some(35)]);
        assert_eq!(state.adjustments, 3);
        assert_eq!(run(), (shares, state));
    }
}
