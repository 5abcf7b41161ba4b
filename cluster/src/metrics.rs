//! Node metrics and the admin HTTP answers (sans-IO): counters, latency histograms, rendering in
//! the Prometheus text format, and the response to one admin request.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer; the admin listener (on shard 0)
//! reads every shard's. This is the one place shards share memory: single-writer atomic counters
//! with relaxed ordering, because a scrape only needs each counter to be a value it once had, and
//! routing every scrape through every shard's queue would make monitoring depend on the shards it
//! is meant to watch. Requests are counted by the shard that received them (a forwarded request is
//! counted once), from the decoded request to the reply being ready.
//!
//! Engine figures are a snapshot each shard copies from its engine every
//! [`ENGINE_REFRESH_MS`] milliseconds, so they lag by at most that. Coordinator figures (hinted
//! handoff, forwarding, read repair, failure detection) and the admission controller's state are
//! copied by each shard's ticker, at most one tick late; coordinator figures are rendered summed
//! over shards, the admission state per shard (each shard has its own controller). The
//! anti-entropy counters are coordinator figures too; each shard's Merkle roots are copied every
//! [`ENGINE_REFRESH_MS`] into a list behind a mutex (a snapshot that is not a number), read
//! by `GET /merkle`: one line per tree, `partition n keys root` (root in hex), sorted by partition
//! then `n`, shards merged. The live bytes of each ring partition in the shard's engine are copied
//! the same way into a second list, which shard 0 gives membership to gossip
//! (`server/members.rs`); at most one entry per ring partition, a few hundred.
//!
//! Limits: the admin protocol is a minimal HTTP/1.1 subset: one `GET` per connection, a request
//! head of at most [`ADMIN_REQUEST_BYTES_MAX`] bytes, `Connection: close`.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ringkv_engine::EngineStats;

use ringkv_core::admission::AdmissionState;
use ringkv_core::coordinator::{CoreStats, TreeRoot};

/// What a shard's coordinator reports, beyond its counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreFigures {
    /// The coordinator's counters.
    pub stats: CoreStats,
    /// Hints held.
    pub hints: u64,
    /// Bytes of hints held.
    pub hint_bytes: u64,
    /// Hints being delivered.
    pub hints_in_flight: u64,
    /// Requests the coordinator is working on: answered or not, until their last replica
    /// answered or their deadline passed.
    pub ops_in_flight: u64,
    /// Peers the shard believes unreachable now.
    pub peers_suspected: u64,
    /// Partitions held that this node no longer replicates, not yet handed off and dropped.
    pub handoffs: u64,
    /// Partitions whose anti-entropy trees are still being built from storage after a start.
    pub trees_loading: u64,
}

/// What a shard still holds for other nodes, as of the membership view it had applied: a
/// removed node stops once every shard holds nothing (`server/members.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holding {
    /// Version of the membership view the shard had applied when it published these figures.
    pub view_version: u64,
    /// Partitions waiting to be handed off and dropped.
    pub handoffs: u64,
    /// Hints held, delivered or not.
    pub hints: u64,
}

/// A per-shard admission series (name, kind, help, value).
type AdmissionField = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardMetrics) -> String,
);

/// The gauge of partitions waiting for handoff.
const HANDOFFS_PENDING: &str = "ringkv_handoffs_pending";
/// The gauge of hints held.
const HINTS: &str = "ringkv_hints";

/// Coordinator figures published summed over shards (name, help, accessor).
type CoreField = (&'static str, &'static str, fn(&CoreFigures) -> u64);
const CORE_FIELDS: [CoreField; 27] = [
    (
        "ringkv_forwarded_total",
        "Writes forwarded to a home node.",
        |c| c.stats.forwarded,
    ),
    (
        "ringkv_forwards_moved_total",
        "Forwarded writes moved on to another home: the connection to the first was lost, or it \
         stayed silent for a last-write-wins put, or refused it.",
        |c| c.stats.forwards_moved,
    ),
    (
        "ringkv_forwards_refused_total",
        "Forwarded writes this node refused as a home, read or stamped after their apply-by time.",
        |c| c.stats.forwards_refused,
    ),
    (
        "ringkv_hinted_writes_total",
        "Replica writes sent to a fallback as hints.",
        |c| c.stats.hinted_writes,
    ),
    (
        "ringkv_hints_delivered_total",
        "Hints delivered to their home and removed.",
        |c| c.stats.hints_delivered,
    ),
    (
        "ringkv_hint_overflow_total",
        "Hints refused because the hint store was full.",
        |c| c.stats.hint_overflow,
    ),
    (
        "ringkv_hint_credit_requests_total",
        "Hint credit asked of homes.",
        |c| c.stats.credit_requests,
    ),
    (
        "ringkv_hint_credits_granted_total",
        "Hints this node allowed holders to send, summed over grants.",
        |c| c.stats.credits_granted,
    ),
    (
        "ringkv_read_repairs_total",
        "Read-repair writes sent.",
        |c| c.stats.read_repairs,
    ),
    (
        "ringkv_slot_moves_total",
        "Replica slots moved to a fallback during a request.",
        |c| c.stats.slot_moves,
    ),
    (
        "ringkv_batched_jobs_total",
        "Key jobs that shared a read and a write with the job ahead.",
        |c| c.stats.batched_jobs,
    ),
    (
        "ringkv_blind_writes_total",
        "Last-write-wins writes made without reading the local replica.",
        |c| c.stats.blind_writes,
    ),
    (
        "ringkv_local_reads_total",
        "Client GETs answered from this node's own store without a coordinated read.",
        |c| c.stats.local_reads,
    ),
    (
        "ringkv_local_writes_total",
        "Client PUTs written to this node's own store without a coordinated write.",
        |c| c.stats.local_writes,
    ),
    (
        "ringkv_heartbeats_total",
        "Failure-detector heartbeats sent.",
        |c| c.stats.heartbeats,
    ),
    (HINTS, "Hints held.", |c| c.hints),
    ("ringkv_hint_bytes", "Bytes of hints held.", |c| {
        c.hint_bytes
    }),
    ("ringkv_hints_in_flight", "Hints being delivered.", |c| {
        c.hints_in_flight
    }),
    (
        "ringkv_ops_in_flight",
        "Requests the coordinator is working on, answered or not (stragglers run to their deadline).",
        |c| c.ops_in_flight,
    ),
    (
        HANDOFFS_PENDING,
        "Partitions held that this node no longer replicates, waiting to be handed off and dropped.",
        |c| c.handoffs,
    ),
    (
        "ringkv_ae_partitions_loading",
        "Partitions whose anti-entropy trees are still being built from storage after a start; anti-entropy leaves them alone until then.",
        |c| c.trees_loading,
    ),
    (
        "ringkv_ae_exchanges_total",
        "Anti-entropy exchanges started (one partition tree with one other replica).",
        |c| c.stats.ae_exchanges,
    ),
    (
        "ringkv_ae_in_sync_total",
        "Anti-entropy exchanges that found the two trees equal.",
        |c| c.stats.ae_in_sync,
    ),
    (
        "ringkv_ae_keys_repaired_total",
        "Objects anti-entropy sent to a replica whose version differed or was missing.",
        |c| c.stats.ae_keys_repaired,
    ),
    (
        "ringkv_tombstones_reaped_total",
        "Tombstones and expired objects removed once every replica held them past the grace period.",
        |c| c.stats.tombstones_reaped,
    ),
    (
        "ringkv_epoch_floor_raises_total",
        "Epoch floor raises made so that tombstones could be reaped.",
        |c| c.stats.floor_raises,
    ),
    (
        "ringkv_peers_suspected",
        "Peers believed unreachable, summed over shards (each shard judges alone).",
        |c| c.peers_suspected,
    ),
];

/// Upper bounds of the latency histogram buckets, in microseconds (`+Inf` is implied): the
/// engine's, so request and group-commit latencies read against the same bounds.
pub use ringkv_engine::LATENCY_BUCKETS_US;
/// How often a shard copies its engine's statistics into its metrics.
pub const ENGINE_REFRESH_MS: u64 = 1000;
/// Largest admin request head (request line and headers).
pub const ADMIN_REQUEST_BYTES_MAX: usize = 8 << 10;

/// A client operation, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// GET.
    Get = 0,
    /// PUT.
    Put = 1,
    /// DELETE.
    Delete = 2,
}

const OPS: [(Op, &str); 3] = [(Op::Get, "get"), (Op::Put, "put"), (Op::Delete, "delete")];
const BUCKETS: usize = ringkv_engine::LATENCY_BUCKETS;

/// Engine figures published as gauges (name, help, accessor).
type EngineField = (&'static str, &'static str, fn(&EngineStats) -> u64);
const ENGINE_FIELDS: [EngineField; 15] = [
    (
        "ringkv_engine_keys",
        "Index entries (live keys and tombstones).",
        |s| s.index_entries,
    ),
    ("ringkv_engine_segments", "Segment files.", |s| s.segments),
    (
        "ringkv_engine_segment_bytes",
        "Bytes of records in segment files (a file may hold more: zeros written ahead of the log).",
        |s| s.segment_bytes,
    ),
    (
        "ringkv_engine_live_bytes",
        "Bytes of records the index points at.",
        |s| s.live_bytes,
    ),
    (
        "ringkv_engine_bytes_written_total",
        "Bytes handed to the disk.",
        |s| s.bytes_written,
    ),
    (
        "ringkv_engine_zeroed_bytes_total",
        "Bytes of zeros written ahead of log segments' tails, so that group commits overwrite.",
        |s| s.zeroed_bytes,
    ),
    (
        "ringkv_engine_hint_write_failures_total",
        "Hint files that could not be written (not fatal: their segments are scanned at open).",
        |s| s.hint_write_failures,
    ),
    (
        "ringkv_engine_segment_prepare_failures_total",
        "Next segment files that could not be prepared (not fatal: the flusher creates them).",
        |s| s.segment_prepare_failures,
    ),
    (
        "ringkv_engine_zero_write_failures_total",
        "Zero writes ahead of a log tail that failed (not fatal: that segment's commits grow it).",
        |s| s.zero_write_failures,
    ),
    ("ringkv_engine_flushes_total", "Group commits.", |s| {
        s.flushes
    }),
    (
        "ringkv_engine_compactions_total",
        "Compaction passes that rewrote segments.",
        |s| s.compactions,
    ),
    (
        "ringkv_engine_compaction_read_bytes_total",
        "Segment bytes compaction read to copy live records out.",
        |s| s.compaction_bytes_read,
    ),
    (
        "ringkv_engine_corrupt_reads_total",
        "Reads that failed their checksum.",
        |s| s.corrupt_reads,
    ),
    (
        "ringkv_engine_cache_hits_total",
        "Gets answered from the value cache.",
        |s| s.cache_hits,
    ),
    (
        "ringkv_engine_recovery_corrupt_regions",
        "Damaged regions found at open.",
        |s| s.recovery_corrupt_regions,
    ),
];

/// One shard's counters. Written only by its shard.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    requests: [AtomicU64; 3],
    errors: [AtomicU64; 3],
    latency_buckets: [[AtomicU64; BUCKETS]; 3],
    latency_sum_us: [AtomicU64; 3],
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    engine: [AtomicU64; ENGINE_FIELDS.len()],
    /// The engine's group commits per latency bucket (not cumulative), and their summed µs.
    flush_buckets: [AtomicU64; BUCKETS],
    flush_sum_us: AtomicU64,
    core: [AtomicU64; CORE_FIELDS.len()],
    /// The membership view version `core` was published under; stored after `core`.
    view_version: AtomicU64,
    /// Background share in millionths.
    admission_share_ppm: AtomicU64,
    admission_p99_us: AtomicU64,
    admission_threshold_us: AtomicU64,
    admission_adjustments: AtomicU64,
    trees: Mutex<Vec<TreeRoot>>,
    /// `(partition, live bytes)` of the ring partitions in the shard's engine; `None` until
    /// first published.
    partition_bytes: Mutex<Option<Vec<(u32, u64)>>>,
}

/// Adds `n` to a counter of this shard's. Only the shard writes its counters, so a load and a
/// store do: other threads only read them, and see each value whole. A `fetch_add` is a locked
/// instruction, which waits for every store before it to drain, three of them on every request.
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl ShardMetrics {
    /// Counts one request of `op` that took `elapsed_us` and succeeded or not.
    pub fn record(&self, op: Op, elapsed_us: u64, ok: bool) {
        self.record_n(op, elapsed_us, ok, 1);
    }

    /// `n` requests of `op` answered after `elapsed_us` each.
    pub fn record_n(&self, op: Op, elapsed_us: u64, ok: bool, n: u64) {
        let i = op as usize;
        add(&self.requests[i], n);
        if !ok {
            add(&self.errors[i], n);
        }
        add(
            &self.latency_buckets[i][ringkv_engine::latency_bucket(elapsed_us)],
            n,
        );
        add(&self.latency_sum_us[i], elapsed_us.saturating_mul(n));
    }

    /// A connection was accepted.
    pub fn connection_opened(&self) {
        add(&self.connections_open, 1);
        add(&self.connections_total, 1);
    }

    /// A connection ended.
    pub fn connection_closed(&self) {
        let open = &self.connections_open;
        open.store(
            open.load(Ordering::Relaxed).wrapping_sub(1),
            Ordering::Relaxed,
        );
    }

    /// Publishes a snapshot of the shard's coordinator figures, taken with the membership
    /// view of `view_version` applied.
    pub fn set_core(&self, figures: &CoreFigures, view_version: u64) {
        for (slot, (_, _, get)) in self.core.iter().zip(CORE_FIELDS) {
            slot.store(get(figures), Ordering::Relaxed);
        }
        // Released after the figures: a reader that sees this version sees figures at least
        // as new (see `holding`).
        self.view_version.store(view_version, Ordering::Release);
    }

    /// What the shard last published it holds for others.
    pub fn holding(&self) -> Holding {
        let view_version = self.view_version.load(Ordering::Acquire);
        let field = |name: &str| {
            CORE_FIELDS
                .iter()
                .position(|(n, _, _)| *n == name)
                .map_or(0, |i| self.core[i].load(Ordering::Relaxed))
        };
        Holding {
            view_version,
            handoffs: field(HANDOFFS_PENDING),
            hints: field(HINTS),
        }
    }

    /// Publishes the shard's admission-control state.
    pub fn set_admission(&self, state: &AdmissionState) {
        let ppm = (state.share * 1e6).round() as u64;
        self.admission_share_ppm.store(ppm, Ordering::Relaxed);
        self.admission_p99_us.store(state.p99_us, Ordering::Relaxed);
        self.admission_threshold_us
            .store(state.threshold_us, Ordering::Relaxed);
        self.admission_adjustments
            .store(state.adjustments, Ordering::Relaxed);
    }

    /// Keys in the shard's published Merkle trees of replica count `n`.
    pub fn tree_keys(&self, n: u8) -> u64 {
        self.trees
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|t| t.n == n)
            .map(|t| t.keys)
            .sum()
    }

    /// Publishes the shard's Merkle roots.
    pub fn set_trees(&self, trees: Vec<TreeRoot>) {
        // A writer that panicked left a whole list behind (it is replaced in one assignment).
        *self.trees.lock().unwrap_or_else(|e| e.into_inner()) = trees;
    }

    /// Publishes the live bytes of the ring partitions in the shard's engine (hints left out).
    pub fn set_partition_bytes(&self, bytes: Vec<(u32, u64)>) {
        // As with the trees, a panicked writer left a whole list behind.
        *self
            .partition_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(bytes);
    }

    /// What the shard last published of its partitions' live bytes; `None` before it first
    /// did (which is not "nothing stored").
    pub fn partition_bytes(&self) -> Option<Vec<(u32, u64)>> {
        self.partition_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes a snapshot of the shard's engine statistics.
    pub fn set_engine(&self, stats: &EngineStats) {
        for (slot, (_, _, get)) in self.engine.iter().zip(ENGINE_FIELDS) {
            slot.store(get(stats), Ordering::Relaxed);
        }
        for (slot, n) in self.flush_buckets.iter().zip(stats.flush_latency_buckets) {
            slot.store(n, Ordering::Relaxed);
        }
        self.flush_sum_us
            .store(stats.flush_latency_sum_us, Ordering::Relaxed);
    }
}

/// The `GET /merkle` body: one line per tree of every shard (module docs).
pub fn render_merkle(shards: &[&ShardMetrics]) -> String {
    let mut all: Vec<TreeRoot> = Vec::new();
    for m in shards {
        all.extend(m.trees.lock().unwrap_or_else(|e| e.into_inner()).iter());
    }
    all.sort_by_key(|t| (t.partition, t.n));
    let mut out = String::new();
    for t in all {
        let _ = writeln!(out, "{} {} {} {:016x}", t.partition, t.n, t.keys, t.root);
    }
    out
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Renders every shard's metrics in the Prometheus text exposition format (version 0.0.4).
pub fn render(shards: &[&ShardMetrics]) -> String {
    let mut out = String::new();
    render_requests(&mut out, shards);
    render_connections(&mut out, shards);
    render_engine_and_core(&mut out, shards);
    render_admission(&mut out, shards);
    out
}

// Writing to a String cannot fail; the results of `writeln!` below are ignored for that reason.

/// The HELP and TYPE lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Request counts, errors and the latency histogram, per shard and operation.
fn render_requests(out: &mut String, shards: &[&ShardMetrics]) {
    family(
        out,
        "ringkv_requests_total",
        "counter",
        "Client requests by operation.",
    );
    for (shard, m) in shards.iter().enumerate() {
        for (op, name) in OPS {
            let n = load(&m.requests[op as usize]);
            let _ = writeln!(
                out,
                "ringkv_requests_total{{shard=\"{shard}\",op=\"{name}\"}} {n}"
            );
        }
    }
    family(
        out,
        "ringkv_request_errors_total",
        "counter",
        "Requests answered with an error.",
    );
    for (shard, m) in shards.iter().enumerate() {
        for (op, name) in OPS {
            let n = load(&m.errors[op as usize]);
            let _ = writeln!(
                out,
                "ringkv_request_errors_total{{shard=\"{shard}\",op=\"{name}\"}} {n}"
            );
        }
    }
    family(
        out,
        "ringkv_request_duration_seconds",
        "histogram",
        "Request latency on the node.",
    );
    for (shard, m) in shards.iter().enumerate() {
        for (op, name) in OPS {
            let i = op as usize;
            histogram(
                out,
                "ringkv_request_duration_seconds",
                &format!("shard=\"{shard}\",op=\"{name}\""),
                &m.latency_buckets[i],
                load(&m.latency_sum_us[i]),
            );
        }
    }
}

/// The bucket, sum and count lines of one labelled histogram series, from per-bucket counts of
/// [`LATENCY_BUCKETS_US`] (the last one `+Inf`) and the summed microseconds.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    buckets: &[AtomicU64; BUCKETS],
    sum_us: u64,
) {
    let mut cumulative = 0;
    for (b, upper) in LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += load(&buckets[b]);
        let le = *upper as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    cumulative += load(&buckets[BUCKETS - 1]);
    let sum = sum_us as f64 / 1e6;
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}\n\
         {name}_sum{{{labels}}} {sum}\n\
         {name}_count{{{labels}}} {cumulative}"
    );
}

/// Open and accepted connections, per shard.
fn render_connections(out: &mut String, shards: &[&ShardMetrics]) {
    family(
        out,
        "ringkv_connections_open",
        "gauge",
        "Open client connections.",
    );
    for (shard, m) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringkv_connections_open{{shard=\"{shard}\"}} {}",
            load(&m.connections_open)
        );
    }
    family(
        out,
        "ringkv_connections_total",
        "counter",
        "Accepted client connections.",
    );
    for (shard, m) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringkv_connections_total{{shard=\"{shard}\"}} {}",
            load(&m.connections_total)
        );
    }
}

/// The engine's figures per shard, and the coordinators' summed over shards.
fn render_engine_and_core(out: &mut String, shards: &[&ShardMetrics]) {
    for (f, (name, help, _)) in ENGINE_FIELDS.iter().enumerate() {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        family(out, name, kind, help);
        for (shard, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", load(&m.engine[f]));
        }
    }
    family(
        out,
        "ringkv_engine_flush_duration_seconds",
        "histogram",
        "Group commits by how long their durable writes took; every synced write waits for one.",
    );
    for (shard, m) in shards.iter().enumerate() {
        histogram(
            out,
            "ringkv_engine_flush_duration_seconds",
            &format!("shard=\"{shard}\""),
            &m.flush_buckets,
            load(&m.flush_sum_us),
        );
    }
    for (f, (name, help, _)) in CORE_FIELDS.iter().enumerate() {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        family(out, name, kind, help);
        let sum: u64 = shards.iter().map(|m| load(&m.core[f])).sum();
        let _ = writeln!(out, "{name} {sum}");
    }
}

/// Admission control's state, per shard.
fn render_admission(out: &mut String, shards: &[&ShardMetrics]) {
    let admission: [AdmissionField; 4] = [
        (
            "ringkv_admission_background_share",
            "gauge",
            "Share of background work admission control allows, in (0, 1].",
            |m| format!("{}", load(&m.admission_share_ppm) as f64 / 1e6),
        ),
        (
            "ringkv_admission_p99_seconds",
            "gauge",
            "Client p99 latency over the controller's window at its last adjustment.",
            |m| format!("{}", load(&m.admission_p99_us) as f64 / 1e6),
        ),
        (
            "ringkv_admission_threshold_seconds",
            "gauge",
            "Client p99 above which background work backs off.",
            |m| format!("{}", load(&m.admission_threshold_us) as f64 / 1e6),
        ),
        (
            "ringkv_admission_adjustments_total",
            "counter",
            "Changes of the background share.",
            |m| load(&m.admission_adjustments).to_string(),
        ),
    ];
    for (name, kind, help, value) in admission {
        family(out, name, kind, help);
        for (shard, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", value(m));
        }
    }
}

/// Whether `buf` holds a complete HTTP request head.
pub fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n")
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The whole response to the admin request whose head is `head`.
pub fn admin_response(head: &[u8], shards: &[&ShardMetrics]) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return response("405 Method Not Allowed", "text/plain", "only GET\n");
    }
    match path.split('?').next().unwrap_or("") {
        "/health" => response("200 OK", "text/plain", "ok\n"),
        "/metrics" => response("200 OK", "text/plain; version=0.0.4", &render(shards)),
        "/merkle" => response("200 OK", "text/plain", &render_merkle(shards)),
        _ => response(
            "404 Not Found",
            "text/plain",
            "try /metrics, /health or /merkle\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts land in the right op and bucket, and the histogram is cumulative.
    #[test]
    fn render_counts() {
        let m = ShardMetrics::default();
        m.record(Op::Put, 70, true);
        m.record(Op::Put, 5_000_000, false);
        m.record(Op::Get, 10, true);
        let text = render(&[&m]);
        assert!(text.contains("ringkv_requests_total{shard=\"0\",op=\"put\"} 2\n"));
        assert!(text.contains("ringkv_request_errors_total{shard=\"0\",op=\"put\"} 1\n"));
        assert!(text.contains(
            "ringkv_request_duration_seconds_bucket{shard=\"0\",op=\"put\",le=\"0.0001\"} 1\n"
        ));
        assert!(text.contains(
            "ringkv_request_duration_seconds_bucket{shard=\"0\",op=\"put\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains("ringkv_requests_total{shard=\"0\",op=\"get\"} 1\n"));
    }

    /// The engine's group commits render as a cumulative histogram per shard, in seconds.
    #[test]
    fn render_flush_histogram() {
        let m = ShardMetrics::default();
        let mut stats = EngineStats::default();
        // Two group commits of at most 500 µs, one of at most 100 ms, one past every bound.
        stats.flush_latency_buckets[3] = 2;
        stats.flush_latency_buckets[9] = 1;
        stats.flush_latency_buckets[BUCKETS - 1] = 1;
        stats.flush_latency_sum_us = 2_500_000;
        m.set_engine(&stats);
        let text = render(&[&m]);
        assert!(text.contains("# TYPE ringkv_engine_flush_duration_seconds histogram\n"));
        for (le, n) in [
            ("0.00025", 0),
            ("0.0005", 2),
            ("0.025", 2),
            ("0.1", 3),
            ("1", 3),
        ] {
            let line = format!(
                "ringkv_engine_flush_duration_seconds_bucket{{shard=\"0\",le=\"{le}\"}} {n}\n"
            );
            assert!(text.contains(&line), "{line}");
        }
        assert!(text.contains(
            "ringkv_engine_flush_duration_seconds_bucket{shard=\"0\",le=\"+Inf\"} 4\n\
             ringkv_engine_flush_duration_seconds_sum{shard=\"0\"} 2.5\n\
             ringkv_engine_flush_duration_seconds_count{shard=\"0\"} 4\n"
        ));
    }

    /// The engine's background IO failures, never fatal and so never seen by a client, are
    /// counters an operator can alert on.
    #[test]
    fn render_background_io_failures() {
        let m = ShardMetrics::default();
        let stats = EngineStats {
            hint_write_failures: 2,
            segment_prepare_failures: 3,
            zero_write_failures: 5,
            zeroed_bytes: 7 << 20,
            ..EngineStats::default()
        };
        m.set_engine(&stats);
        let text = render(&[&m]);
        for (name, n) in [
            ("ringkv_engine_hint_write_failures_total", 2),
            ("ringkv_engine_segment_prepare_failures_total", 3),
            ("ringkv_engine_zero_write_failures_total", 5),
            ("ringkv_engine_zeroed_bytes_total", 7 << 20),
        ] {
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}");
            let line = format!("{name}{{shard=\"0\"}} {n}\n");
            assert!(text.contains(&line), "{line}");
        }
    }

    /// A shard's holding is read back as published, with the view it was taken under.
    #[test]
    fn holding_reads_back_what_was_published() {
        let shard = ShardMetrics::default();
        assert_eq!(shard.holding(), Holding::default());
        shard.set_core(
            &CoreFigures {
                hints: 7,
                handoffs: 3,
                hint_bytes: 99,
                ..CoreFigures::default()
            },
            12,
        );
        assert_eq!(
            shard.holding(),
            Holding {
                view_version: 12,
                handoffs: 3,
                hints: 7
            }
        );
        assert!(render(&[&shard]).contains("ringkv_handoffs_pending 3\n"));
    }

    /// Coordinator figures are summed over shards; the admission state is per shard.
    #[test]
    fn render_core_and_admission() {
        let (a, b) = (ShardMetrics::default(), ShardMetrics::default());
        let mut figures = CoreFigures {
            hint_bytes: 100,
            ..CoreFigures::default()
        };
        figures.stats.hint_overflow = 2;
        a.set_core(&figures, 1);
        figures.stats.hint_overflow = 3;
        b.set_core(&figures, 1);
        b.set_admission(&AdmissionState {
            share: 0.25,
            p99_us: 12_000,
            threshold_us: 10_000,
            adjustments: 4,
        });
        let text = render(&[&a, &b]);
        assert!(
            text.contains(
                "# TYPE ringkv_hint_overflow_total counter\nringkv_hint_overflow_total 5\n"
            )
        );
        assert!(text.contains("\nringkv_hint_bytes 200\n"));
        assert!(text.contains("ringkv_admission_background_share{shard=\"1\"} 0.25\n"));
        assert!(text.contains("ringkv_admission_p99_seconds{shard=\"1\"} 0.012\n"));
        assert!(text.contains("ringkv_admission_adjustments_total{shard=\"1\"} 4\n"));
    }

    /// The admin paths and refusals.
    #[test]
    fn admin_paths() {
        let m = ShardMetrics::default();
        let ok = admin_response(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", &[&m]);
        assert!(ok.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(ok.ends_with(b"\r\n\r\nok\n"));
        let metrics = admin_response(b"GET /metrics HTTP/1.1\r\n\r\n", &[&m]);
        assert!(String::from_utf8_lossy(&metrics).contains("# TYPE ringkv_requests_total counter"));
        assert!(admin_response(b"GET /x HTTP/1.1\r\n\r\n", &[&m]).starts_with(b"HTTP/1.1 404"));
        let other = ShardMetrics::default();
        other.set_trees(vec![TreeRoot {
            partition: 1,
            n: 3,
            keys: 2,
            root: 0xab,
        }]);
        m.set_trees(vec![TreeRoot {
            partition: 2,
            n: 3,
            keys: 0,
            root: 1,
        }]);
        let merkle = admin_response(b"GET /merkle HTTP/1.1\r\n\r\n", &[&m, &other]);
        assert!(merkle.ends_with(b"\r\n\r\n1 3 2 00000000000000ab\n2 3 0 0000000000000001\n"));
        assert!(
            admin_response(b"POST /metrics HTTP/1.1\r\n\r\n", &[&m]).starts_with(b"HTTP/1.1 405")
        );
        assert!(head_complete(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!head_complete(b"GET / HTTP/1.1\r\n"));
    }
}
