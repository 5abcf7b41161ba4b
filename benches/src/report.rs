//! Results of `ringkv-bench engine`: the record of every phase (serialized as the JSON report),
//! the side-by-side text table, ours/RocksDB ratios and the check of the targets.
//!
//! Latencies are recorded in nanoseconds and reported in microseconds. A throughput ratio is
//! ringkv / RocksDB (above 1: ringkv is faster); a latency ratio is ringkv / RocksDB too (below 1:
//! ringkv is faster).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles of one phase, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
    pub(crate) mean_us: f64,
}

impl Latency {
    /// Summarizes a histogram in nanoseconds.
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// A timed put phase.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PutResult {
    /// `sync` or `buffered`.
    pub(crate) mode: &'static str,
    pub(crate) writers: usize,
    pub(crate) ops: u64,
    pub(crate) secs: f64,
    pub(crate) ops_per_sec: f64,
    pub(crate) latency: Latency,
    /// Group commits of the engine during the phase (ringkv only).
    pub(crate) flushes: Option<u64>,
}

/// The timed random-get phase on a preloaded dataset larger than the cache.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct GetResult {
    pub(crate) readers: usize,
    pub(crate) keys: u64,
    pub(crate) preload_secs: f64,
    pub(crate) warmup_secs: f64,
    pub(crate) ops: u64,
    pub(crate) secs: f64,
    pub(crate) ops_per_sec: f64,
    pub(crate) latency: Latency,
    /// Gets of a preloaded key that found nothing, warm-up included (must be 0).
    pub(crate) misses: u64,
    /// Share of measured gets answered by the value cache (ringkv only).
    pub(crate) cache_hit_ratio: Option<f64>,
    /// Disk reads during the measured gets (ringkv only).
    pub(crate) disk_reads: Option<u64>,
    /// Keys of the hot set receiving 90% of the gets; 0 for uniform gets.
    pub(crate) hot_keys: u64,
    /// Value cache budget of the store during the phase.
    pub(crate) cache_bytes: usize,
}

/// The bulk load of the index/restart phase.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LoadResult {
    pub(crate) keys: u64,
    pub(crate) value_size: usize,
    pub(crate) secs: f64,
    pub(crate) keys_per_sec: f64,
}

/// Memory of the key index at a number of keys.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct IndexResult {
    pub(crate) keys: u64,
    /// Entries in the index (ringkv only).
    pub(crate) index_entries: Option<u64>,
    pub(crate) index_bytes: u64,
    pub(crate) bytes_per_key: f64,
    /// What `index_bytes` counts.
    pub(crate) what: &'static str,
}

/// Close and reopen of the store holding the big dataset.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RestartResult {
    pub(crate) keys: u64,
    pub(crate) close_secs: f64,
    pub(crate) open_secs: f64,
    /// ringkv's recovery report: segments loaded from hint files.
    pub(crate) segments_from_hints: Option<u64>,
    /// ringkv's recovery report: segments scanned record by record.
    pub(crate) segments_scanned: Option<u64>,
    /// ringkv's recovery report: records listed by hints or scans.
    pub(crate) records: Option<u64>,
    /// Index bytes per key after the reopen (ringkv only).
    pub(crate) index_bytes_per_key: Option<f64>,
    /// Random keys read back after the reopen with their value intact.
    pub(crate) verified_keys: u64,
    /// Random keys read back after the reopen that were missing or had another value (must be 0).
    pub(crate) missing_keys: u64,
}

/// Everything measured on one store.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct SideResults {
    pub(crate) put: Vec<PutResult>,
    pub(crate) get: Option<GetResult>,
    /// ringkv only: hot-set gets with and without the value cache.
    pub(crate) get_hot: Vec<GetResult>,
    pub(crate) load: Option<LoadResult>,
    pub(crate) index: Vec<IndexResult>,
    pub(crate) restart: Option<RestartResult>,
}

/// ringkv / RocksDB for one timed phase.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Comparison {
    pub(crate) phase: String,
    pub(crate) throughput_ratio: f64,
    pub(crate) p50_ratio: f64,
    pub(crate) p99_ratio: f64,
    pub(crate) p999_ratio: f64,
}

/// One target of the benchmark and whether this run met it (`None`: not measured in this run).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) want: String,
    pub(crate) got: String,
    pub(crate) met: Option<bool>,
}

/// Ratios of every phase both stores ran.
pub(crate) fn compare(ours: &SideResults, rocks: &SideResults) -> Vec<Comparison> {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let mk = |phase: String, a_ops: f64, a: &Latency, b_ops: f64, b: &Latency| Comparison {
        phase,
        throughput_ratio: ratio(a_ops, b_ops),
        p50_ratio: ratio(a.p50_us, b.p50_us),
        p99_ratio: ratio(a.p99_us, b.p99_us),
        p999_ratio: ratio(a.p999_us, b.p999_us),
    };
    let mut out = Vec::new();
    for a in &ours.put {
        if let Some(b) = rocks
            .put
            .iter()
            .find(|b| b.mode == a.mode && b.writers == a.writers)
        {
            out.push(mk(
                put_phase_name(a),
                a.ops_per_sec,
                &a.latency,
                b.ops_per_sec,
                &b.latency,
            ));
        }
    }
    if let (Some(a), Some(b)) = (&ours.get, &rocks.get) {
        out.push(mk(
            get_phase_name(a),
            a.ops_per_sec,
            &a.latency,
            b.ops_per_sec,
            &b.latency,
        ));
    }
    out
}

/// The targets of the issue, checked against this run.
pub(crate) fn targets(
    ours: &SideResults,
    rocks: Option<&SideResults>,
    index_target_keys: u64,
) -> Vec<Target> {
    let mut out = Vec::new();
    let most_writers = ours
        .put
        .iter()
        .filter(|p| p.mode == "sync")
        .map(|p| p.writers)
        .max();
    if let Some(w) = most_writers {
        let a = ours.put.iter().find(|p| p.mode == "sync" && p.writers == w);
        let b = rocks.and_then(|r| r.put.iter().find(|p| p.mode == "sync" && p.writers == w));
        let (got, met) = match (a, b) {
            (Some(a), Some(b)) => {
                let r = a.ops_per_sec / b.ops_per_sec;
                (
                    format!(
                        "{:.2}x ({:.0} vs {:.0} ops/s)",
                        r, a.ops_per_sec, b.ops_per_sec
                    ),
                    Some(r >= 2.0),
                )
            }
            _ => ("RocksDB not measured".to_string(), None),
        };
        out.push(Target {
            name: format!("sync put throughput at {w} writers"),
            want: ">= 2x RocksDB".into(),
            got,
            met,
        });
    }
    if let Some(a) = &ours.get {
        let (got, met) = match rocks.and_then(|r| r.get.as_ref()) {
            Some(b) => (
                format!("{:.0} us vs {:.0} us", a.latency.p999_us, b.latency.p999_us),
                Some(a.latency.p999_us <= b.latency.p999_us),
            ),
            None => ("RocksDB not measured".to_string(), None),
        };
        out.push(Target {
            name: "get p99.9".into(),
            want: "<= RocksDB".into(),
            got,
            met,
        });
    }
    if let Some(i) = ours.index.iter().find(|i| i.keys == index_target_keys) {
        out.push(Target {
            name: format!("index bytes per key at {} keys", i.keys),
            want: "<= 40 B".into(),
            got: format!("{:.1} B", i.bytes_per_key),
            met: Some(i.bytes_per_key <= 40.0),
        });
    }
    out
}

/// `put sync x16` and the like.
pub(crate) fn put_phase_name(p: &PutResult) -> String {
    format!("put {} x{}", p.mode, p.writers)
}

/// `get x16` and the like.
pub(crate) fn get_phase_name(g: &GetResult) -> String {
    if g.hot_keys == 0 {
        format!("get x{}", g.readers)
    } else if g.cache_bytes == 0 {
        format!("get hot x{} nocache", g.readers)
    } else {
        format!("get hot x{} cache", g.readers)
    }
}

fn us(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn ratio(r: f64) -> String {
    if r < 0.01 {
        format!("{r:.1e}")
    } else if r < 0.1 {
        format!("{r:.3}")
    } else {
        format!("{r:.2}")
    }
}

fn timed_row(out: &mut String, ops: f64, l: &Latency) {
    let _ = write!(
        out,
        " {:>11.0} {:>9} {:>9} {:>9} |",
        ops,
        us(l.p50_us),
        us(l.p99_us),
        us(l.p999_us)
    );
}

/// The side-by-side text table.
pub(crate) fn table(ours: &SideResults, rocks: Option<&SideResults>, cmp: &[Comparison]) -> String {
    let mut out = String::new();
    let blank = format!(" {:>11} {:>9} {:>9} {:>9} |", "-", "-", "-", "-");
    let _ = writeln!(
        out,
        "{:<18}| {:>11} {:>9} {:>9} {:>9} | {:>11} {:>9} {:>9} {:>9} | {:>7} {:>7}",
        "latency in us",
        "ringkv op/s",
        "p50",
        "p99",
        "p99.9",
        "rocksdb op/s",
        "p50",
        "p99",
        "p99.9",
        "op/s x",
        "p99.9 x"
    );
    /// One timed phase: its name, ringkv's throughput and latency, RocksDB's if measured.
    type Row = (String, f64, Latency, Option<(f64, Latency)>);
    let mut rows: Vec<Row> = Vec::new();
    for a in &ours.put {
        let b = rocks.and_then(|r| {
            r.put
                .iter()
                .find(|b| b.mode == a.mode && b.writers == a.writers)
        });
        rows.push((
            put_phase_name(a),
            a.ops_per_sec,
            a.latency.clone(),
            b.map(|b| (b.ops_per_sec, b.latency.clone())),
        ));
    }
    if let Some(a) = &ours.get {
        let b = rocks.and_then(|r| r.get.as_ref());
        rows.push((
            get_phase_name(a),
            a.ops_per_sec,
            a.latency.clone(),
            b.map(|b| (b.ops_per_sec, b.latency.clone())),
        ));
    }
    for a in &ours.get_hot {
        rows.push((get_phase_name(a), a.ops_per_sec, a.latency.clone(), None));
    }
    for (name, ops, lat, other) in rows {
        let _ = write!(out, "{name:<18}|");
        timed_row(&mut out, ops, &lat);
        match other {
            Some((bops, blat)) => timed_row(&mut out, bops, &blat),
            None => out.push_str(&blank),
        }
        match cmp.iter().find(|c| c.phase == name) {
            Some(c) => {
                let _ = writeln!(
                    out,
                    " {:>7} {:>7}",
                    ratio(c.throughput_ratio),
                    ratio(c.p999_ratio)
                );
            }
            None => {
                let _ = writeln!(out, " {:>7} {:>7}", "-", "-");
            }
        }
    }
    for g in ours.get.iter().chain(&ours.get_hot) {
        let _ = writeln!(
            out,
            "ringkv {}: cache hit ratio {}, disk reads {}, misses {}",
            get_phase_name(g),
            g.cache_hit_ratio
                .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0)),
            g.disk_reads.map_or("-".to_string(), |d| d.to_string()),
            g.misses
        );
    }
    if let Some(g) = rocks.and_then(|r| r.get.as_ref()) {
        let _ = writeln!(out, "rocksdb get: misses {}", g.misses);
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "{:<18}| {:>14} {:>14} | {:>14} {:>14}",
        "index memory", "ringkv bytes", "B/key", "rocksdb bytes", "B/key"
    );
    for a in &ours.index {
        let b = rocks.and_then(|r| r.index.iter().find(|b| b.keys == a.keys));
        let _ = write!(
            out,
            "{:<18}| {:>14} {:>14.1} |",
            format!("{} keys", a.keys),
            a.index_bytes,
            a.bytes_per_key
        );
        match b {
            Some(b) => {
                let _ = writeln!(out, " {:>14} {:>14.1}", b.index_bytes, b.bytes_per_key);
            }
            None => {
                let _ = writeln!(out, " {:>14} {:>14}", "-", "-");
            }
        }
    }
    if let Some(b) = rocks.and_then(|r| r.index.first()) {
        let _ = writeln!(out, "(rocksdb counts {})", b.what);
    }
    out.push('\n');
    let load_line = |store: &str, l: &LoadResult| {
        format!(
            "{store} bulk load: {} keys of {} B in {:.1} s ({:.0} keys/s)\n",
            l.keys, l.value_size, l.secs, l.keys_per_sec
        )
    };
    if let Some(l) = &ours.load {
        out.push_str(&load_line("ringkv", l));
    }
    if let Some(l) = rocks.and_then(|r| r.load.as_ref()) {
        out.push_str(&load_line("rocksdb", l));
    }
    if let Some(r) = &ours.restart {
        let _ = writeln!(
            out,
            "ringkv restart at {} keys: close {:.2} s, open {:.2} s (segments from hints {}, scanned {}, records {}), {} keys verified, {} missing",
            r.keys,
            r.close_secs,
            r.open_secs,
            r.segments_from_hints.unwrap_or(0),
            r.segments_scanned.unwrap_or(0),
            r.records.unwrap_or(0),
            r.verified_keys,
            r.missing_keys
        );
    }
    if let Some(r) = rocks.and_then(|r| r.restart.as_ref()) {
        let _ = writeln!(
            out,
            "rocksdb restart at {} keys: close {:.2} s, open {:.2} s, {} keys verified, {} missing",
            r.keys, r.close_secs, r.open_secs, r.verified_keys, r.missing_keys
        );
    }
    out
}

/// The targets as text lines.
pub(crate) fn targets_text(ts: &[Target]) -> String {
    let mut out = String::new();
    for t in ts {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "target {}: want {}, got {}: {verdict}",
            t.name, t.want, t.got
        );
    }
    out
}
