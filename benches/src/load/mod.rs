//! The load generator: `ringkv-bench [run]` drives a ringkv cluster (binary protocol), a ringkv
//! node's RESP port or Redis with a YCSB-style or scenario workload and reports throughput,
//! latency percentiles per operation, errors by kind and the versions seen per read.
//!
//! A run is: optionally start a local cluster ([`cluster`]), connect, preload the key space,
//! warm up, measure for `--duration`, report (table on stdout, `--json FILE`), stop the cluster.
//!
//! Two ways to generate load:
//! - **closed loop** (no `--rate`): `--connections` × `--pipeline` workers, each sending its next
//!   operation as soon as the previous one is answered. It finds the throughput, but its latency
//!   is only the service time: while the target stalls, no new requests are started, so the
//!   stall is seen by at most `connections × pipeline` operations (coordinated omission).
//! - **open loop** (`--rate R`): a dispatcher thread starts operation `i` at its intended time
//!   `i / R` after the start ([`schedule`]), whether or not earlier ones were answered, with at
//!   most `--pipeline` in flight per connection; an operation whose connection is full waits
//!   for a slot. Latency runs from the intended start, so queueing behind a stall is charged to
//!   every operation that should have started during it. The dispatcher's own lateness (intended
//!   start to send, for operations that did not wait for a slot) is reported as the dispatch lag;
//!   a run whose p99 dispatch lag exceeds `--lag-p99-max` is flagged invalid, because its
//!   latencies measure the generator rather than the target.
//!
//! Limits: the open loop keeps at most [`BACKLOG_MAX`] operations waiting for a slot (more are
//! counted as `backlog_full` errors, not sent); after the measured phase the operations in flight
//! get [`DRAIN_TIMEOUTS`] request timeouts to finish, and those still unanswered are counted as
//! `unfinished_at_end` errors.

pub mod churn;
pub(crate) mod cluster;
pub mod compare;
pub mod keygen;
mod ops;
mod ports;
mod redis_benchmark;
mod resp_client;
pub mod schedule;
pub mod spec;
pub mod stats;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringkv_net::{AsyncPool, ClientConfig, PoolConfig};
use serde_json::json;
use tokio::sync::Semaphore;

use churn::ChurnClock;
use cluster::{ClusterOptions, LocalCluster};
use keygen::KeyChooser;
use ops::{CART_ITEMS, CartLedger, Conn, Plan, Planner, execute};
use resp_client::RespConnection;
use spec::{Distribution, Protocol, Target, ValueSize, Workload, parse_duration};
use stats::{
    CartCheck, OpenLoopReport, Percentiles, PreloadReport, Recorder, RunReport, SharedRecorder,
    Tick, lock, new_histogram,
};

/// Most operations the open loop keeps waiting for an in-flight slot.
pub const BACKLOG_MAX: u64 = 100_000;
/// After the measured phase, operations in flight get this many request timeouts to finish.
pub const DRAIN_TIMEOUTS: u32 = 2;
/// Most attempts to write one key of the preload.
const PRELOAD_ATTEMPTS_MAX: u32 = 20;
/// Pause after a failed preload write.
const PRELOAD_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Reads of a map cart when the run checks it, at most.
const CART_CHECK_ATTEMPTS: u32 = 5;
/// Pause of a closed-loop worker after an error, so that a dead target is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(1);
/// Most connections, and most operations in flight per connection.
const CONNECTIONS_MAX: usize = 4096;
const PIPELINE_MAX: usize = 1024;

/// Flags of the load generator (`ringkv-bench` or `ringkv-bench run`).
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Start an N-node ringkv cluster on loopback for the run and stop it afterwards.
    /// Without --target, this is the default with N=3.
    #[arg(long, value_name = "N")]
    pub spawn_local: Option<usize>,
    /// Where to send the load: `ringkv://host:port[,host:port...]` (binary protocol) or
    /// `redis://host:port[,...]` (RESP: Redis, or a ringkv node's --resp-listen port).
    #[arg(long, conflicts_with = "spawn_local")]
    pub target: Option<Target>,
    /// With --spawn-local: drive the nodes' RESP ports instead of the binary protocol.
    #[arg(long)]
    pub resp: bool,
    /// With --spawn-local: shards per node.
    #[arg(long, default_value_t = 1)]
    pub node_shards: usize,
    /// With --spawn-local: the nodes' durability (`sync`: acknowledged after fdatasync).
    #[arg(long, default_value = "sync", value_parser = ["sync", "buffered"])]
    pub durability: String,
    /// With --spawn-local: durable acknowledgements a write waits for (the buckets' `dw`). With
    /// the default 1 one replica syncs every write even on `buffered` nodes; 0 makes buffered
    /// writes fully buffered.
    #[arg(long, default_value_t = 1)]
    pub dw: u8,
    /// With --spawn-local: the ringkv binary [default: built by cargo, or next to this one].
    #[arg(long)]
    pub ringkv_bin: Option<PathBuf>,
    /// With --spawn-local: directory for the nodes' data (a real filesystem, not tmpfs)
    /// [default: target/ringkv-bench-cluster].
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// With --spawn-local: keep the nodes' data and logs after the run.
    #[arg(long)]
    pub keep_data: bool,
    /// The workload.
    #[arg(long, short = 'w', value_enum, default_value = "a")]
    pub workload: Workload,
    /// Key distribution [default: the workload's: zipfian, latest for d, uniform for session].
    #[arg(long, value_enum)]
    pub distribution: Option<Distribution>,
    /// Keys in the key space (preloaded).
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Value size in bytes: fixed (`100`) or a uniform range (`100..1000`, both included)
    /// [default: 100; session: 64..256].
    #[arg(long)]
    pub value_size: Option<ValueSize>,
    /// Share of reads, 0 to 1, replacing the mix of a read/update workload (a, b, c, session):
    /// `--read-share 0` writes only.
    #[arg(long)]
    pub read_share: Option<f64>,
    /// Time to live of every write, e.g. `30s` [default: none; session: 10s]; `0` for none.
    /// Reads of keys that expired count as missing (`versions seen per read: 0`).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Bucket on a ringkv target [default: ycsb; cart: cart; session: sessions]. --spawn-local
    /// makes ycsb and sessions lww; on another cluster a bucket keeps siblings unless its
    /// buckets file says otherwise, and blind writes then pile up as siblings.
    #[arg(long)]
    pub bucket: Option<String>,
    /// Skip the preload (the keys must already exist).
    #[arg(long)]
    pub no_preload: bool,
    /// Connections, spread round-robin over the target's servers.
    #[arg(long, short = 'c', default_value_t = 8)]
    pub connections: usize,
    /// Operations in flight per connection (closed loop: workers per connection; open loop: the
    /// most in flight before an operation waits for a slot).
    #[arg(long, short = 'p', default_value_t = 4)]
    pub pipeline: usize,
    /// Open loop at this many operations per second (absent: closed loop).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Length of the measured phase (`20s`, `500ms`, `2m`).
    #[arg(long, short = 'd', default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Per-request timeout.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Open loop: the largest p99 dispatch lag of a valid run.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    pub lag_p99_max: Duration,
    /// Threads of the generator's runtime.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seed of the operation and key choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the full report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Never print the per-second line (it is printed only when stdout is a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// With --spawn-local: during the measured phase a further node joins and then leaves, and
    /// the report compares each phase with the steady state before it (see `churn`).
    #[arg(long)]
    pub churn: bool,
}

/// Shared state of a run.
struct Ctx {
    conns: Vec<Conn>,
    bucket: Vec<u8>,
    values: Arc<[u8]>,
    /// Time to live of writes.
    ttl: Option<Duration>,
    /// The map carts' adds, sent and acknowledged (`cart-map`).
    ledger: CartLedger,
    planner: Planner,
    seed: u64,
    pipeline: usize,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    /// `--churn`: the measured phase's start (set here) and the current phase (set by the
    /// churn controller); without `--churn` the phase stays 0.
    churn: Arc<ChurnClock>,
}

/// What the load measured, before the report is built.
struct Measured {
    params: serde_json::Value,
    preload: PreloadReport,
    outcome: Outcome,
    cart_check: Option<CartCheck>,
}

/// Runs the load generator with `args`: prints the results table, writes the JSON report if
/// asked, warns about an invalid open-loop run.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let report = measure(&args)?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if let Some(o) = &report.open_loop
        && !o.valid
    {
        eprintln!("warning: this open-loop run is invalid: {}", o.verdict);
    }
    Ok(())
}

/// Runs the load generator with `args` and returns its report (printing only progress on
/// stderr and, on a terminal, the per-second lines).
pub fn measure(args: &RunArgs) -> anyhow::Result<RunReport> {
    ensure!(
        (1..=CONNECTIONS_MAX).contains(&args.connections),
        "--connections must be 1..={CONNECTIONS_MAX}"
    );
    ensure!(
        (1..=PIPELINE_MAX).contains(&args.pipeline),
        "--pipeline must be 1..={PIPELINE_MAX}"
    );
    ensure!(args.keys >= 1, "--keys must be at least 1");
    if let Some(r) = args.read_share {
        ensure!(
            (0.0..=1.0).contains(&r),
            "--read-share must be between 0 and 1"
        );
        ensure!(
            matches!(
                args.workload,
                Workload::A | Workload::B | Workload::C | Workload::Session
            ),
            "--read-share applies to the read/update workloads a, b, c and session"
        );
    }
    ensure!(args.threads >= 1, "--threads must be at least 1");
    ensure!(!args.duration.is_zero(), "--duration must be positive");
    if let Some(r) = args.rate {
        ensure!(r >= 1, "--rate must be at least 1");
    }
    ensure!(
        !args.churn || args.target.is_none(),
        "--churn changes a cluster it started itself: use it with --spawn-local, not --target"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let stop = Arc::new(AtomicBool::new(false));
    runtime.spawn(watch_signals(Arc::clone(&stop)));

    // The cluster is started from this (the main) thread, which lives as long as the process:
    // the nodes' parent-death signal is tied to the thread that spawned them.
    let spawn = match (&args.target, args.spawn_local) {
        (Some(_), _) => None,
        (None, n) => Some(n.unwrap_or(3)),
    };
    let mut cluster = match spawn {
        Some(nodes) => {
            let opts = ClusterOptions {
                nodes,
                shards_per_node: args.node_shards.max(1),
                durability: args.durability.clone(),
                dw: args.dw,
                ringkv_bin: args.ringkv_bin.clone(),
                data_root: args.data_root.clone(),
                keep_data: args.keep_data,
            };
            eprintln!(
                "starting a {nodes}-node ringkv cluster on loopback ({} shard(s) per node, {} durability, dw = {}) ...",
                opts.shards_per_node, opts.durability, opts.dw
            );
            Some(LocalCluster::start(&opts)?)
        }
        None => None,
    };
    let target = match (&args.target, &cluster) {
        (Some(t), _) => t.clone(),
        (None, Some(c)) if args.resp => Target {
            protocol: Protocol::Resp,
            addrs: c.resp_addrs.clone(),
        },
        (None, Some(c)) => Target {
            protocol: Protocol::Ringkv,
            addrs: c.client_addrs.clone(),
        },
        (None, None) => bail!("no target: give --target or --spawn-local"),
    };
    let spawn_info = cluster.as_ref().map(|c| {
        json!({
            "nodes": c.client_addrs.len(),
            "shards_per_node": args.node_shards.max(1),
            "durability": args.durability,
            "dw": args.dw,
            "buckets_toml": c.buckets_toml,
            "ringkv_bin": c.bin.display().to_string(),
            "churn": args.churn,
        })
    });
    let clock = Arc::new(ChurnClock::default());
    let load = || {
        runtime.block_on(run_load(
            args,
            &target,
            spawn_info,
            Arc::clone(&stop),
            Arc::clone(&clock),
        ))
    };
    let (measured, events) = match cluster.as_mut() {
        Some(c) if args.churn => {
            // The load runs on a thread of its own; this thread, which started the nodes,
            // starts the joining node too and drives the change.
            let load_done = AtomicBool::new(false);
            std::thread::scope(|s| {
                let loader = s.spawn(|| {
                    let measured = load();
                    load_done.store(true, Ordering::SeqCst);
                    measured
                });
                let events = churn::drive(c, &clock, args.duration, &load_done, &stop);
                let measured = loader
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the load thread panicked")));
                (measured, Some(events))
            })
        }
        _ => (load(), None),
    };
    // Connections and tasks go before the nodes, so the nodes see their clients leave.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Some(c) = cluster.as_mut() {
        for problem in c.stop() {
            eprintln!("warning: {problem}");
        }
    }
    let Measured {
        params,
        preload,
        outcome: (merged, measured, open_loop, timeline),
        cart_check,
    } = measured?;
    let mut report = RunReport::build(
        params, preload, &merged, measured, open_loop, timeline, events,
    );
    report.cart_check = cart_check;
    Ok(report)
}

/// Sets `stop` on SIGINT or SIGTERM, so that the run ends early, reports what it measured and
/// stops its cluster. A second signal exits at once (the nodes follow by their parent-death
/// signal).
async fn watch_signals(stop: Arc<AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        if round == 0 {
            eprintln!("stopping (again to exit at once) ...");
            stop.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    }
}

async fn connect(target: &Target, i: usize, args: &RunArgs) -> anyhow::Result<Conn> {
    let addr = &target.addrs[i % target.addrs.len()];
    Ok(match target.protocol {
        Protocol::Ringkv => {
            let config = ClientConfig {
                timeout: args.timeout,
                inflight_per_connection_max: args.pipeline.max(1),
                ..ClientConfig::default()
            };
            let pool = PoolConfig {
                connections_max: 1,
                ..PoolConfig::default()
            };
            Conn::Ringkv(
                AsyncPool::connect(addr, config, pool)
                    .await
                    .with_context(|| format!("connecting to ringkv://{addr}"))?,
            )
        }
        Protocol::Resp => Conn::Resp(
            RespConnection::connect(addr, args.pipeline, args.timeout)
                .await
                .with_context(|| format!("connecting to redis://{addr}"))?,
        ),
    })
}

/// The parameters of the run, as recorded in the JSON report.
fn params(
    args: &RunArgs,
    target: &Target,
    spawn_info: Option<serde_json::Value>,
    ctx: &Ctx,
) -> serde_json::Value {
    json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "target": target.to_string(),
        "spawn_local": spawn_info,
        "workload": args.workload,
        "distribution": ctx.planner.chooser_distribution(),
        "keys": args.keys,
        "value_size": ctx.planner.value_size.to_string(),
        "read_share": args.read_share,
        "ttl_ms": ctx.ttl.map(|t| t.as_millis() as u64),
        "bucket": String::from_utf8_lossy(&ctx.bucket),
        "preload": !args.no_preload,
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "rate": args.rate,
        "connections": args.connections,
        "pipeline": args.pipeline,
        "threads": args.threads,
        "warmup_secs": args.warmup.as_secs_f64(),
        "duration_secs": args.duration.as_secs_f64(),
        "timeout_secs": args.timeout.as_secs_f64(),
        "seed": args.seed,
    })
}

async fn run_load(
    args: &RunArgs,
    target: &Target,
    spawn_info: Option<serde_json::Value>,
    stop: Arc<AtomicBool>,
    churn: Arc<ChurnClock>,
) -> anyhow::Result<Measured> {
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        conns.push(connect(target, i, args).await?);
    }
    let distribution = args
        .distribution
        .unwrap_or(args.workload.default_distribution());
    let value_size = args
        .value_size
        .unwrap_or(args.workload.default_value_size());
    let mut values = vec![0u8; value_size.max.max(16)];
    StdRng::seed_from_u64(args.seed ^ 0x5eed).fill(&mut values[..]);
    let ctx = Arc::new(Ctx {
        conns,
        bucket: args
            .bucket
            .clone()
            .unwrap_or_else(|| args.workload.default_bucket().to_owned())
            .into_bytes(),
        values: values.into(),
        ttl: args
            .ttl
            .or(args.workload.default_ttl())
            .filter(|t| !t.is_zero()),
        ledger: CartLedger::default(),
        planner: Planner {
            workload: args.workload,
            chooser: KeyChooser::new(distribution, args.keys),
            value_size,
            key_count: Arc::new(AtomicU64::new(args.keys)),
            read_share: args.read_share,
        },
        seed: args.seed,
        pipeline: args.pipeline,
        timeout: args.timeout,
        stop,
        churn,
    });
    eprintln!(
        "workload {} ({:?} keys), {} keys, values {} B, target {target}, {}",
        args.workload.name(),
        distribution,
        args.keys,
        value_size,
        match args.rate {
            Some(r) => format!(
                "open loop at {r} ops/s, {} connections x {} in flight max",
                args.connections, args.pipeline
            ),
            None => format!(
                "closed loop, {} connections x {} in flight",
                args.connections, args.pipeline
            ),
        }
    );
    let preload = if args.no_preload {
        PreloadReport::default()
    } else {
        preload(&ctx, args.keys).await?
    };
    let live = !args.quiet && std::io::stdout().is_terminal();
    let outcome = match args.rate {
        None => closed_loop(&ctx, args.warmup, args.duration, live).await,
        Some(rate) => open_loop(&ctx, rate, args, live).await,
    };
    let params = params(args, target, spawn_info, &ctx);
    let cart_check = match args.workload {
        Workload::CartMap => Some(check_carts(&ctx).await),
        _ => None,
    };
    Ok(Measured {
        params,
        preload,
        outcome,
        cart_check,
    })
}

/// Reads every map cart the run wrote (at the bucket's read quorum, retried a few times) and
/// compares each item's quantity with the adds sent and acknowledged: below the acknowledged
/// count is a lost add, above the sent count a counted retry or an invention.
async fn check_carts(ctx: &Ctx) -> CartCheck {
    let carts = ctx.ledger.carts();
    eprintln!("checking {} map carts ...", carts.len());
    let mut check = CartCheck::default();
    for (i, (key, items)) in carts.into_iter().enumerate() {
        check.carts += 1;
        let conn = &ctx.conns[i % ctx.conns.len()];
        let mut read = None;
        for _ in 0..CART_CHECK_ATTEMPTS {
            match conn.cart_items(&ctx.bucket, key).await {
                Ok(found) => {
                    read = Some(found);
                    break;
                }
                Err(_) => tokio::time::sleep(PRELOAD_RETRY_PAUSE).await,
            }
        }
        let Some(found) = read else {
            check.unread_carts += 1;
            continue;
        };
        for (item, sent, acked) in items {
            check.acked_adds += acked;
            let have = u64::try_from(found.get(&item).copied().unwrap_or(0)).unwrap_or(0);
            check.lost_adds += acked.saturating_sub(have);
            check.over_counted += have.saturating_sub(sent);
        }
    }
    check
}

/// Writes every key once (blind writes), retrying a failed write a bounded number of times.
async fn preload(ctx: &Arc<Ctx>, keys: u64) -> anyhow::Result<PreloadReport> {
    eprintln!("preloading {keys} keys ...");
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for (c, conn) in ctx.conns.iter().enumerate() {
        for p in 0..ctx.pipeline {
            let (ctx, conn, next, errors) = (
                Arc::clone(ctx),
                conn.clone(),
                Arc::clone(&next),
                Arc::clone(&errors),
            );
            let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x9e37 ^ ((c * 1024 + p) as u64));
            tasks.spawn(async move {
                loop {
                    let key = next.fetch_add(1, Ordering::Relaxed);
                    if key >= keys || ctx.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let plan = match ctx.planner.workload {
                        // A cart starts with one item, written as a cart update of a new key.
                        Workload::Cart => Plan::Cart {
                            key,
                            item: rng.gen_range(0..1_000_000),
                            len: ctx.planner.value_size.max.max(16),
                        },
                        // A map cart starts with one item too; a failed add is retried with
                        // its id, so it counts once.
                        Workload::CartMap => Plan::CartAdd {
                            key,
                            item: rng.gen_range(0..CART_ITEMS),
                            op_id: rng.r#gen(),
                        },
                        _ => Plan::Insert {
                            key,
                            len: rng
                                .gen_range(ctx.planner.value_size.min..=ctx.planner.value_size.max),
                        },
                    };
                    let mut attempt = 0;
                    loop {
                        match execute(&conn, &ctx.bucket, &ctx.values, ctx.ttl, &ctx.ledger, plan)
                            .await
                        {
                            Ok(_) => break,
                            Err(e) => {
                                attempt += 1;
                                *errors
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .entry(e.0.clone())
                                    .or_default() += 1;
                                if attempt >= PRELOAD_ATTEMPTS_MAX {
                                    bail!(
                                        "preload of key {key} failed {attempt} times, last: {}",
                                        e.0
                                    );
                                }
                                tokio::time::sleep(PRELOAD_RETRY_PAUSE).await;
                            }
                        }
                    }
                }
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a preload task panicked")??;
    }
    let errors = errors
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "preloaded in {secs:.1} s ({:.0} keys/s)",
        keys as f64 / secs.max(1e-9)
    );
    Ok(PreloadReport { keys, secs, errors })
}

/// The per-second timeline: every second, takes each recorder's interval histogram and prints
/// a line if `live`. Runs until `done` is set.
async fn timeline(
    recorders: Vec<SharedRecorder>,
    start: Instant,
    measure_start: Instant,
    end: Instant,
    done: Arc<AtomicBool>,
    live: bool,
) -> Vec<Tick> {
    let mut ticks = Vec::new();
    let mut interval = tokio::time::interval_at(
        tokio::time::Instant::from_std(start + Duration::from_secs(1)),
        Duration::from_secs(1),
    );
    while !done.load(Ordering::Relaxed) {
        interval.tick().await;
        let now = Instant::now();
        let mut h = new_histogram();
        let mut errors = 0;
        let mut slowest_us_by_connection: Vec<f64> = Vec::new();
        for r in &recorders {
            let mut r = lock(r);
            if slowest_us_by_connection.len() <= r.connection {
                slowest_us_by_connection.resize(r.connection + 1, 0.0);
            }
            let slowest = r.interval.max() as f64 / 1000.0;
            let mine = &mut slowest_us_by_connection[r.connection];
            *mine = f64::max(*mine, slowest);
            h.add(&r.interval).expect("histograms of identical bounds");
            r.interval.reset();
            errors += r.interval_errors;
            r.interval_errors = 0;
        }
        // A tick a little late still belongs to the second it closes.
        let slack = Duration::from_millis(500);
        let phase = if now <= measure_start + slack {
            "warmup"
        } else if now <= end + slack {
            "measure"
        } else {
            "drain"
        };
        let p = Percentiles::of(&h);
        let tick = Tick {
            t_secs: (now - start).as_secs_f64(),
            phase,
            ops: h.len(),
            p50_us: p.p50_us,
            p99_us: p.p99_us,
            errors,
            slowest_us_by_connection,
        };
        if live {
            println!(
                "{:>5.0}s {:<7} {:>9} ops/s  p50 {:>7} µs  p99 {:>7} µs  errors {}",
                tick.t_secs,
                tick.phase,
                tick.ops,
                stats::fmt_us(tick.p50_us),
                stats::fmt_us(tick.p99_us),
                tick.errors
            );
        }
        ticks.push(tick);
    }
    ticks
}

type Outcome = (Recorder, Duration, Option<OpenLoopReport>, Vec<Tick>);

fn merge(recorders: &[SharedRecorder]) -> Recorder {
    let mut merged = Recorder::new(0);
    for r in recorders {
        merged.absorb(&lock(r));
    }
    merged
}

async fn closed_loop(ctx: &Arc<Ctx>, warmup: Duration, duration: Duration, live: bool) -> Outcome {
    let start = Instant::now();
    let measure_start = start + warmup;
    let end = measure_start + duration;
    let _ = ctx.churn.measure_start.set(measure_start);
    let mut recorders = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, conn) in ctx.conns.iter().enumerate() {
        for p in 0..ctx.pipeline {
            let worker = (c * ctx.pipeline + p) as u64;
            let rec: SharedRecorder = Arc::new(Mutex::new(Recorder::new(c)));
            recorders.push(Arc::clone(&rec));
            let (ctx, conn) = (Arc::clone(ctx), conn.clone());
            let mut planner = ctx.planner.clone();
            let mut rng = StdRng::seed_from_u64(
                ctx.seed
                    .wrapping_add(worker.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            );
            tasks.spawn(async move {
                while !ctx.stop.load(Ordering::Relaxed) {
                    let plan = planner.next(&mut rng);
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let phase = ctx.churn.phase();
                    let outcome =
                        execute(&conn, &ctx.bucket, &ctx.values, ctx.ttl, &ctx.ledger, plan).await;
                    let failed = outcome.is_err();
                    let measured = sent >= measure_start;
                    lock(&rec).record(plan.kind(), sent.elapsed(), &outcome, measured, phase);
                    if failed {
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            });
        }
    }
    let done = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn(timeline(
        recorders.clone(),
        start,
        measure_start,
        end,
        Arc::clone(&done),
        live,
    ));
    while tasks.join_next().await.is_some() {}
    let finished = Instant::now().min(end);
    done.store(true, Ordering::Relaxed);
    let ticks = ticker.await.unwrap_or_default();
    let measured = finished.saturating_duration_since(measure_start);
    (merge(&recorders), measured, None, ticks)
}

/// Open-loop bookkeeping shared by the dispatcher and the operations.
struct OpenState {
    scheduled: AtomicU64,
    sent: AtomicU64,
    waiting: AtomicU64,
    outstanding: AtomicU64,
}

async fn open_loop(ctx: &Arc<Ctx>, rate: u64, args: &RunArgs, live: bool) -> Outcome {
    let lanes = ctx.conns.len();
    let recorders: Vec<SharedRecorder> = (0..lanes)
        .map(|c| Arc::new(Mutex::new(Recorder::new(c))))
        .collect();
    let slots: Vec<Arc<Semaphore>> = (0..lanes)
        .map(|_| Arc::new(Semaphore::new(ctx.pipeline)))
        .collect();
    let state = Arc::new(OpenState {
        scheduled: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        waiting: AtomicU64::new(0),
        outstanding: AtomicU64::new(0),
    });
    let start = Instant::now();
    let measure_start = start + args.warmup;
    let end = measure_start + args.duration;
    let _ = ctx.churn.measure_start.set(measure_start);
    let done = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn(timeline(
        recorders.clone(),
        start,
        measure_start,
        end,
        Arc::clone(&done),
        live,
    ));
    let handle = tokio::runtime::Handle::current();
    let dispatcher = {
        let (ctx, recorders, state) = (Arc::clone(ctx), recorders.clone(), Arc::clone(&state));
        std::thread::Builder::new()
            .name("dispatcher".to_owned())
            .spawn(move || {
                dispatch(
                    &ctx,
                    rate,
                    start,
                    measure_start,
                    end,
                    &recorders,
                    &slots,
                    &state,
                    &handle,
                )
            })
    };
    let finished = match dispatcher {
        Ok(thread) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(thread.join());
            });
            match rx.await {
                Ok(Ok(finished)) => finished,
                _ => Instant::now(),
            }
        }
        Err(_) => start,
    };
    // Drain: the operations in flight get a bounded time to finish.
    let drain_until = Instant::now() + ctx.timeout * DRAIN_TIMEOUTS;
    while state.outstanding.load(Ordering::SeqCst) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done.store(true, Ordering::Relaxed);
    let ticks = ticker.await.unwrap_or_default();
    let mut merged = merge(&recorders);
    let unfinished = state.outstanding.load(Ordering::SeqCst);
    if unfinished > 0 {
        *merged
            .errors
            .entry("unfinished_at_end".to_owned())
            .or_default() += unfinished;
    }
    let measured = finished.min(end).saturating_duration_since(measure_start);
    let lag = Percentiles::of(&merged.dispatch_lag);
    let scheduled = state.scheduled.load(Ordering::SeqCst);
    let sent = state.sent.load(Ordering::SeqCst);
    let lag_max_us = args.lag_p99_max.as_secs_f64() * 1e6;
    let mut problems = Vec::new();
    if lag.p99_us > lag_max_us {
        problems.push(format!(
            "the generator's p99 dispatch lag ({} µs) exceeds --lag-p99-max ({} µs): \
             its latencies include its own lateness; give it more CPU or lower the rate",
            stats::fmt_us(lag.p99_us),
            stats::fmt_us(lag_max_us)
        ));
    }
    if merged.dispatch_lag.is_empty() && scheduled > 0 {
        problems.push("no operation was sent with a free slot".to_owned());
    }
    let valid = problems.is_empty();
    let mut verdict = if valid {
        format!(
            "the generator kept its schedule (p99 dispatch lag {} µs); latencies run from each \
             operation's intended start",
            stats::fmt_us(lag.p99_us)
        )
    } else {
        problems.join("; ")
    };
    if merged.held_back > 0 {
        verdict.push_str(&format!(
            "; the target fell behind the rate ({} operations waited for a free slot): their \
             queueing is in the latencies",
            merged.held_back
        ));
    }
    let report = OpenLoopReport {
        rate,
        scheduled,
        sent,
        dispatch_lag: lag,
        service: Percentiles::of(&merged.service),
        held_back: merged.held_back,
        lag_p99_max_us: lag_max_us,
        valid,
        verdict,
    };
    (merged, measured, Some(report), ticks)
}

/// Asks the kernel to wake this thread's sleeps on time: the default timer slack (50 µs) made
/// every open-loop operation start about 50 µs late, lateness charged to the target's latency
/// (against Redis the dispatch lag's median fell from about 84 to about 40 µs,
/// docs/BENCHMARKS.md). Failing leaves the default, which the dispatch lag then shows.
#[allow(unsafe_code)]
fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only changes this thread's
    // timer slack.
    let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    if r != 0 {
        eprintln!(
            "warning: cannot tighten the dispatcher's timer slack ({}); its sleeps may end up to \
             50 µs late",
            std::io::Error::last_os_error()
        );
    }
}

/// The dispatcher thread: starts each operation at its intended time on the runtime. Returns
/// when the schedule passes `end` (or the run is stopped), with the time it stopped.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    ctx: &Arc<Ctx>,
    rate: u64,
    start: Instant,
    measure_start: Instant,
    end: Instant,
    recorders: &[SharedRecorder],
    slots: &[Arc<Semaphore>],
    state: &Arc<OpenState>,
    handle: &tokio::runtime::Handle,
) -> Instant {
    tight_timer_slack();
    let lanes = recorders.len() as u64;
    let mut planner = ctx.planner.clone();
    let mut rng = StdRng::seed_from_u64(ctx.seed);
    let mut i: u64 = 0;
    loop {
        let intended = start + Duration::from_nanos(schedule::intended_offset_ns(i, rate));
        if intended >= end {
            return end;
        }
        if ctx.stop.load(Ordering::Relaxed) {
            return Instant::now();
        }
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        let lane = (i % lanes) as usize;
        i += 1;
        let measured = intended >= measure_start;
        if measured {
            state.scheduled.fetch_add(1, Ordering::Relaxed);
        }
        let plan = planner.next(&mut rng);
        let phase = ctx.churn.phase();
        let rec = Arc::clone(&recorders[lane]);
        if state.waiting.load(Ordering::Relaxed) >= BACKLOG_MAX {
            let failure = Err(ops::OpError("backlog_full".to_owned()));
            lock(&rec).record(plan.kind(), Duration::ZERO, &failure, measured, phase);
            continue;
        }
        let (ctx2, conn, slot, state2) = (
            Arc::clone(ctx),
            ctx.conns[lane].clone(),
            Arc::clone(&slots[lane]),
            Arc::clone(state),
        );
        state.outstanding.fetch_add(1, Ordering::SeqCst);
        handle.spawn(async move {
            let (permit, held_back) = match Arc::clone(&slot).try_acquire_owned() {
                Ok(p) => (Some(p), false),
                Err(_) => {
                    state2.waiting.fetch_add(1, Ordering::Relaxed);
                    let p = slot.acquire_owned().await.ok();
                    state2.waiting.fetch_sub(1, Ordering::Relaxed);
                    (p, true)
                }
            };
            let sent = Instant::now();
            if measured {
                state2.sent.fetch_add(1, Ordering::Relaxed);
            }
            let outcome = execute(
                &conn,
                &ctx2.bucket,
                &ctx2.values,
                ctx2.ttl,
                &ctx2.ledger,
                plan,
            )
            .await;
            let replied = Instant::now();
            drop(permit);
            {
                let mut r = lock(&rec);
                r.record(plan.kind(), replied - intended, &outcome, measured, phase);
                if measured {
                    if held_back {
                        r.held_back += 1;
                    }
                    let lag = (!held_back).then(|| sent.saturating_duration_since(intended));
                    r.record_open_loop(lag, replied - sent);
                }
            }
            state2.outstanding.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

impl Planner {
    /// The key distribution, for the report.
    fn chooser_distribution(&self) -> Distribution {
        self.chooser.distribution()
    }
}
