//! What a run records and reports: latency histograms per operation kind, errors by kind,
//! versions seen per read, the open loop's dispatch lag, a per-second timeline, and the final
//! table and JSON report.
//!
//! Each worker (closed loop) or lane (open loop) records into its own [`Recorder`] behind a
//! mutex that only the once-a-second reporter and the final merge also take, so recording costs
//! an uncontended lock and a histogram increment. Latencies are recorded in nanoseconds (1 ns to
//! 100 s, 3 significant digits) and reported in microseconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::churn::{ChurnEvents, PHASES};
use super::ops::{OpError, Seen};
use super::spec::OpKind;

/// Largest latency a histogram holds: 100 s, in nanoseconds. Larger values are clamped.
const LATENCY_NS_MAX: u64 = 100_000_000_000;

/// An empty latency histogram, in nanoseconds.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3)
        .expect("constant bounds: 1 <= low, high >= 2 * low, 3 significant digits")
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// What one worker or lane recorded.
pub(crate) struct Recorder {
    /// Latency per [`OpKind`] over the measured phase.
    pub(crate) latency: Vec<Histogram<u64>>,
    /// Errors by kind over the measured phase.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Reads by the number of versions they saw (0: missing key).
    pub(crate) versions: BTreeMap<usize, u64>,
    /// Open loop: intended start to send, for operations the generator itself delayed.
    pub(crate) dispatch_lag: Histogram<u64>,
    /// Open loop: send to reply (the service time, without any queueing in the generator).
    pub(crate) service: Histogram<u64>,
    /// Open loop: operations that waited for a free in-flight slot before they could be sent.
    pub(crate) held_back: u64,
    /// Since the last timeline tick (warm-up included): latency of every operation.
    pub(crate) interval: Histogram<u64>,
    /// Since the last timeline tick: errors.
    pub(crate) interval_errors: u64,
    /// `--churn`: latency of every measured operation, by the phase it started in
    /// (`churn::PHASES`).
    pub(crate) phases: Vec<Histogram<u64>>,
    /// `--churn`: errors by phase.
    pub(crate) phase_errors: Vec<u64>,
    /// The connection this recorder's operations went over (`--target` address `connection %
    /// addresses`).
    pub(crate) connection: usize,
}

impl Recorder {
    pub(crate) fn new(connection: usize) -> Self {
        Self {
            connection,
            latency: OpKind::ALL.iter().map(|_| new_histogram()).collect(),
            errors: BTreeMap::new(),
            versions: BTreeMap::new(),
            dispatch_lag: new_histogram(),
            service: new_histogram(),
            held_back: 0,
            interval: new_histogram(),
            interval_errors: 0,
            phases: PHASES.iter().map(|_| new_histogram()).collect(),
            phase_errors: vec![0; PHASES.len()],
        }
    }

    /// Records one finished operation; `measured` is false during warm-up; `phase` is the
    /// churn phase it started in (0 without `--churn`).
    pub(crate) fn record(
        &mut self,
        kind: OpKind,
        latency: Duration,
        outcome: &Result<Seen, OpError>,
        measured: bool,
        phase: usize,
    ) {
        let latency_ns = ns(latency).min(LATENCY_NS_MAX);
        let phase = phase.min(PHASES.len() - 1);
        match outcome {
            Ok(seen) => {
                self.interval.saturating_record(latency_ns);
                if measured {
                    self.latency[kind.index()].saturating_record(latency_ns);
                    self.phases[phase].saturating_record(latency_ns);
                    if let Some(v) = seen {
                        *self.versions.entry(*v).or_default() += 1;
                    }
                }
            }
            Err(e) => {
                self.interval_errors += 1;
                if measured {
                    *self.errors.entry(e.0.clone()).or_default() += 1;
                    self.phase_errors[phase] += 1;
                }
            }
        }
    }

    /// Open loop: records the generator's own lag and the service time of one operation.
    pub(crate) fn record_open_loop(&mut self, lag: Option<Duration>, service: Duration) {
        if let Some(lag) = lag {
            self.dispatch_lag
                .saturating_record(ns(lag).min(LATENCY_NS_MAX));
        }
        self.service
            .saturating_record(ns(service).min(LATENCY_NS_MAX));
    }

    /// Adds everything `other` recorded.
    pub(crate) fn absorb(&mut self, other: &Recorder) {
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            mine.add(theirs).expect("histograms of identical bounds");
        }
        for (k, n) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += n;
        }
        for (v, n) in &other.versions {
            *self.versions.entry(*v).or_default() += n;
        }
        self.dispatch_lag
            .add(&other.dispatch_lag)
            .expect("histograms of identical bounds");
        self.service
            .add(&other.service)
            .expect("histograms of identical bounds");
        self.held_back += other.held_back;
        for (mine, theirs) in self.phases.iter_mut().zip(&other.phases) {
            mine.add(theirs).expect("histograms of identical bounds");
        }
        for (mine, theirs) in self.phase_errors.iter_mut().zip(&other.phase_errors) {
            *mine += theirs;
        }
    }
}

/// A recorder shared by a worker (or lane) and the reporter.
pub(crate) type SharedRecorder = Arc<Mutex<Recorder>>;

/// Locks a recorder; a panicked worker's counts are still worth reporting.
pub(crate) fn lock(r: &SharedRecorder) -> MutexGuard<'_, Recorder> {
    r.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// 99.99th percentile.
    pub p9999_us: f64,
    /// Largest value recorded.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            p9999_us: us(h.value_at_quantile(0.9999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// One operation kind's results.
#[derive(Clone, Debug, Serialize)]
pub struct OpReport {
    /// Successful operations in the measured phase.
    pub count: u64,
    /// `count` over the measured duration.
    pub ops_per_sec: f64,
    /// Latency: from the intended start (open loop) or from the send (closed loop) to the reply.
    pub latency: Percentiles,
}

/// One second of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Tick {
    /// Seconds since the start of the warm-up, at the end of this second.
    pub t_secs: f64,
    /// `warmup`, `measure` or `drain`.
    pub phase: &'static str,
    /// Successful operations in this second.
    pub ops: u64,
    /// Median latency of this second's operations, µs.
    pub p50_us: f64,
    /// 99th percentile of this second's operations, µs.
    pub p99_us: f64,
    /// Errors in this second.
    pub errors: u64,
    /// The slowest successful operation of this second on each connection, µs (0: none).
    /// Connection `i` goes to target address `i % addresses`, so a stall of one node shows in
    /// its connections only.
    pub slowest_us_by_connection: Vec<f64>,
}

/// The open loop's own bookkeeping: did the generator keep its schedule?
#[derive(Clone, Debug, Serialize)]
pub struct OpenLoopReport {
    /// Requested rate, operations per second.
    pub rate: u64,
    /// Operations scheduled in the measured phase.
    pub scheduled: u64,
    /// Operations sent (scheduled ones not sent by the end of the drain count as errors).
    pub sent: u64,
    /// Intended start to send, for operations sent with a free in-flight slot: the generator's
    /// own lag (timer resolution, CPU).
    pub dispatch_lag: Percentiles,
    /// Send to reply: the latency a closed loop would report.
    pub service: Percentiles,
    /// Operations that found every in-flight slot of their connection busy (the target was not
    /// keeping up with the rate); their wait is part of their latency.
    pub held_back: u64,
    /// The largest p99 dispatch lag a valid run may have, µs.
    pub lag_p99_max_us: f64,
    /// Whether the generator kept its schedule well enough for the latencies to be trusted.
    pub valid: bool,
    /// Why (or why not), in words.
    pub verdict: String,
}

/// The whole run, as written by `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The parameters of the run.
    pub params: serde_json::Value,
    /// The preload phase.
    pub preload: PreloadReport,
    /// Length of the measured phase, seconds.
    pub measured_secs: f64,
    /// Successful logical operations in the measured phase, all kinds.
    pub ops: u64,
    /// `ops` over `measured_secs`.
    pub ops_per_sec: f64,
    /// All errors in the measured phase.
    pub errors_total: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Per operation kind (only kinds that ran).
    pub operations: BTreeMap<String, OpReport>,
    /// Latency of all kinds together.
    pub all: Percentiles,
    /// Reads by versions seen (`"0"`: missing, `"1"`: one version, more: siblings).
    pub versions_seen: BTreeMap<String, u64>,
    /// Open-loop bookkeeping (absent for a closed loop).
    pub open_loop: Option<OpenLoopReport>,
    /// One entry per second, warm-up included.
    pub timeline: Vec<Tick>,
    /// `--churn`: the phases of the join and the leave (absent without `--churn`).
    pub churn: Option<ChurnReport>,
    /// `cart-map`: the carts read back after the run against the adds sent and acknowledged.
    pub cart_check: Option<CartCheck>,
}

/// The map carts read back after a `cart-map` run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CartCheck {
    /// Carts the run wrote.
    pub carts: u64,
    /// Carts whose read failed every attempt (not judged).
    pub unread_carts: u64,
    /// Adds acknowledged, over the carts read.
    pub acked_adds: u64,
    /// Acknowledged adds missing from an item's quantity (must be 0).
    pub lost_adds: u64,
    /// Quantity above the adds sent to an item (a retry counted twice; must be 0 without
    /// retries through a coordinator that had not seen the first attempt).
    pub over_counted: u64,
}

/// `--churn`: what each phase of the change saw.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnReport {
    /// When the phases began and how long the changes took.
    pub events: ChurnEvents,
    /// Phase by phase, in order (only phases that began).
    pub phases: Vec<PhaseReport>,
}

/// One churn phase.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    /// `steady`, `join`, `settle`, `leave` or `after`.
    pub name: &'static str,
    /// Length of the phase, seconds.
    pub secs: f64,
    /// Successful operations that started in it.
    pub ops: u64,
    /// Failed operations that started in it.
    pub errors: u64,
    /// Their latency.
    pub latency: Percentiles,
    /// This phase's p99.9 over the steady phase's.
    pub p999_vs_steady: f64,
}

impl ChurnReport {
    /// Builds the phase table from the merged recorder and the change's timing; `measured_secs`
    /// ends the last phase.
    pub(crate) fn build(events: ChurnEvents, merged: &Recorder, measured_secs: f64) -> Self {
        let starts = &events.phase_starts_secs;
        let steady_p999 = Percentiles::of(&merged.phases[0]).p999_us;
        let mut phases = Vec::new();
        for (i, name) in PHASES.iter().enumerate() {
            let Some(Some(from)) = starts.get(i) else {
                continue;
            };
            let to = starts[i + 1..]
                .iter()
                .flatten()
                .next()
                .copied()
                .unwrap_or(measured_secs);
            let latency = Percentiles::of(&merged.phases[i]);
            phases.push(PhaseReport {
                name,
                secs: (to - from).max(0.0),
                ops: merged.phases[i].len(),
                errors: merged.phase_errors[i],
                p999_vs_steady: if steady_p999 > 0.0 {
                    latency.p999_us / steady_p999
                } else {
                    0.0
                },
                latency,
            });
        }
        Self { events, phases }
    }
}

/// The preload phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PreloadReport {
    /// Keys written.
    pub keys: u64,
    /// Time it took, seconds.
    pub secs: f64,
    /// Errors by kind (a key whose write failed is retried, up to a bound).
    pub errors: BTreeMap<String, u64>,
}

impl RunReport {
    /// Builds the report from the merged recorder.
    pub(crate) fn build(
        params: serde_json::Value,
        preload: PreloadReport,
        merged: &Recorder,
        measured: Duration,
        open_loop: Option<OpenLoopReport>,
        timeline: Vec<Tick>,
        churn: Option<ChurnEvents>,
    ) -> Self {
        let secs = measured.as_secs_f64().max(1e-9);
        let mut all = new_histogram();
        let mut operations = BTreeMap::new();
        for kind in OpKind::ALL {
            let h = &merged.latency[kind.index()];
            if h.is_empty() {
                continue;
            }
            all.add(h).expect("histograms of identical bounds");
            operations.insert(
                kind.name().to_owned(),
                OpReport {
                    count: h.len(),
                    ops_per_sec: h.len() as f64 / secs,
                    latency: Percentiles::of(h),
                },
            );
        }
        Self {
            params,
            preload,
            measured_secs: secs,
            ops: all.len(),
            ops_per_sec: all.len() as f64 / secs,
            errors_total: merged.errors.values().sum(),
            errors: merged.errors.clone(),
            operations,
            all: Percentiles::of(&all),
            versions_seen: merged
                .versions
                .iter()
                .map(|(v, n)| (v.to_string(), *n))
                .collect(),
            open_loop,
            timeline,
            churn: churn.map(|events| ChurnReport::build(events, merged, secs)),
            cart_check: None,
        }
    }

    /// The human-readable results table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} ops in {:.1} s: {:.0} ops/s, {} errors (latency in µs)",
            self.ops, self.measured_secs, self.ops_per_sec, self.errors_total
        );
        let _ = writeln!(
            s,
            "{:<8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "op", "count", "ops/s", "p50", "p90", "p99", "p99.9", "p99.99", "max"
        );
        let mut row = |name: &str, count: u64, rate: f64, p: &Percentiles| {
            let _ = writeln!(
                s,
                "{:<8} {:>10} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                name,
                count,
                rate,
                fmt_us(p.p50_us),
                fmt_us(p.p90_us),
                fmt_us(p.p99_us),
                fmt_us(p.p999_us),
                fmt_us(p.p9999_us),
                fmt_us(p.max_us)
            );
        };
        for (name, op) in &self.operations {
            row(name, op.count, op.ops_per_sec, &op.latency);
        }
        if self.operations.len() > 1 {
            row("all", self.ops, self.ops_per_sec, &self.all);
        }
        if !self.errors.is_empty() {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(s, "errors: {}", list.join(", "));
            let bucket = self.params.get("bucket").and_then(|b| b.as_str());
            if let Some(hint) = siblings_hint(&self.errors, bucket.unwrap_or("?")) {
                let _ = writeln!(s, "{hint}");
            }
        }
        let reads: u64 = self.versions_seen.values().sum();
        if reads > 0 {
            // In numeric order: the map's keys are strings ("10" sorts before "2").
            let mut seen: Vec<(&String, &u64)> = self.versions_seen.iter().collect();
            seen.sort_by_key(|(v, _)| v.parse::<u64>().unwrap_or(u64::MAX));
            let list: Vec<String> = seen
                .iter()
                .map(|(v, n)| format!("{v}: {:.4}%", 100.0 * **n as f64 / reads as f64))
                .collect();
            let _ = writeln!(s, "versions seen per read: {}", list.join(", "));
            // With a time to live, a read that finds nothing is an expired key: every key was
            // written (preloaded) and the workloads that expire keys never delete.
            if let Some(ttl_ms) = self.params.get("ttl_ms").and_then(|t| t.as_u64()) {
                let expired = self.versions_seen.get("0").copied().unwrap_or(0);
                let _ = writeln!(
                    s,
                    "expired reads (ttl {ttl_ms} ms): {expired} of {reads} ({:.2}%)",
                    100.0 * expired as f64 / reads as f64
                );
            }
        }
        if let Some(c) = &self.cart_check {
            let _ = writeln!(
                s,
                "map carts read back: {} carts ({} unread), {} acknowledged adds, lost adds {}, \
                 counted beyond what was sent {}",
                c.carts, c.unread_carts, c.acked_adds, c.lost_adds, c.over_counted
            );
        }
        if !self.preload.errors.is_empty() {
            let list: Vec<String> = self
                .preload
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(s, "preload errors (retried): {}", list.join(", "));
        }
        if let Some(o) = &self.open_loop {
            let _ = writeln!(
                s,
                "open loop at {} ops/s: {} scheduled, {} sent, {} held back by full pipelines; \
                 dispatch lag p50 {} p99 {} max {} µs; service time p50 {} p99 {} µs",
                o.rate,
                o.scheduled,
                o.sent,
                o.held_back,
                fmt_us(o.dispatch_lag.p50_us),
                fmt_us(o.dispatch_lag.p99_us),
                fmt_us(o.dispatch_lag.max_us),
                fmt_us(o.service.p50_us),
                fmt_us(o.service.p99_us),
            );
            let _ = writeln!(
                s,
                "{}: {}",
                if o.valid { "valid" } else { "INVALID" },
                o.verdict
            );
        }
        if let Some(c) = &self.churn {
            let _ = writeln!(
                s,
                "churn (a fourth node joins, then leaves; latency in µs, each operation in the \
                 phase it started in):"
            );
            let _ = writeln!(
                s,
                "{:<8} {:>7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>12}",
                "phase", "secs", "ops", "errors", "p50", "p99", "p99.9", "max", "p99.9/steady"
            );
            for p in &c.phases {
                let _ = writeln!(
                    s,
                    "{:<8} {:>7.1} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>12.2}",
                    p.name,
                    p.secs,
                    p.ops,
                    p.errors,
                    fmt_us(p.latency.p50_us),
                    fmt_us(p.latency.p99_us),
                    fmt_us(p.latency.p999_us),
                    fmt_us(p.latency.max_us),
                    p.p999_vs_steady
                );
            }
            if let Some(j) = c.events.join_secs {
                let _ = writeln!(s, "join took {j:.1} s (join to every transfer done)");
            }
            if let Some(l) = c.events.leave_secs {
                let _ = writeln!(s, "leave took {l:.1} s (leave to the node stopped)");
            }
            if let Some(f) = &c.events.failure {
                let _ = writeln!(s, "CHURN UNFINISHED: {f}");
            }
        }
        s
    }
}

/// Why a run's writes were refused with `too_many_siblings`, and what to change: the bucket keeps
/// siblings on the target (the default on a cluster without a buckets file), and writes that send
/// no context pile up as siblings until the node refuses them.
fn siblings_hint(errors: &BTreeMap<String, u64>, bucket: &str) -> Option<String> {
    errors.contains_key("server_too_many_siblings").then(|| {
        format!(
            "hint: bucket `{bucket}` keeps siblings on this target, and the workload's updates and \
             inserts are blind writes (no context), so concurrent ones pile up as siblings until \
             the node refuses them. Give every node's buckets file `[buckets.{bucket}]` with \
             `mode = \"lww\"` (what --spawn-local writes), choose an lww bucket with --bucket, or \
             run -w f, whose writes carry the context of their read."
        )
    })
}

/// A latency in µs with about three significant digits.
pub(crate) fn fmt_us(us: f64) -> String {
    if us >= 100.0 {
        format!("{:.0}", us)
    } else if us >= 10.0 {
        format!("{:.1}", us)
    } else {
        format!("{:.2}", us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run refused for siblings names the bucket and the fixes; other errors give no hint.
    #[test]
    fn a_run_refused_for_siblings_says_how_to_avoid_them() {
        let mut errors = BTreeMap::new();
        errors.insert("server_timeout".to_owned(), 3);
        assert_eq!(siblings_hint(&errors, "ycsb"), None);
        errors.insert("server_too_many_siblings".to_owned(), 95_964);
        let hint = siblings_hint(&errors, "ycsb").expect("a hint");
        assert!(hint.contains("bucket `ycsb` keeps siblings"), "{hint}");
        assert!(hint.contains("[buckets.ycsb]"), "{hint}");
        assert!(hint.contains("mode = \"lww\""), "{hint}");
        assert!(hint.contains("-w f"), "{hint}");
    }
}
