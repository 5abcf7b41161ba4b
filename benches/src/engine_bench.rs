//! `ringkv-bench engine`: the storage engine on one shard, and (with the `rocksdb` feature) the
//! same workload on RocksDB, phase by phase, in one run.
//!
//! Phases, each on a fresh store in its own directory (removed afterwards):
//! - put: random keys from a key space of `--keys`, in `sync` and `buffered` mode, at each writer
//!   count of `--writers` (ringkv: concurrent tasks on one glommio executor pinned to `--cpu`,
//!   i.e. one shard; RocksDB: as many OS threads, which share its group commit).
//! - get: `--keys` keys preloaded (buffered), then an unmeasured warm-up and a measured run of
//!   uniform random gets by `--readers` concurrent readers; the cache (ringkv's value cache,
//!   RocksDB's block cache) is `--cache-mib`, well below the dataset.
//! - get hot (ringkv only): the same, with 90% of the gets on the hottest 2% of the keys, once
//!   with the value cache and once without: what the cache buys on skewed reads.
//! - index and restart: `--mid-keys` then `--big-keys` keys with small values loaded (buffered);
//!   index memory per key at both sizes, then the store is closed and the open is timed.
//!
//! Throughput is operations over the elapsed time of the phase; every operation's latency goes
//! into an hdrhistogram. Phases alternate between the stores so that both see the same machine
//! conditions. This module owns the command line, the ringkv side and the run order; RocksDB's
//! side is in `rocks_side.rs`, the tables and JSON in `report.rs`.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use ringkv_engine::{Durability, Engine, EngineConfig};
use serde::Serialize;

use crate::report::{
    self, GetResult, IndexResult, Latency, LoadResult, PutResult, RestartResult, SideResults,
};
use crate::workload::{
    Mode, Phase, get_key, key_of, merge, new_histogram, partition_of, random_key, random_value,
    record_since, worker_rng,
};

/// A value buffer shared by the tasks of one executor.
type Value = Rc<[u8]>;

/// Flags of `ringkv-bench engine`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct EngineArgs {
    /// Data directory, on a real filesystem (O_DIRECT does not work on tmpfs). Each phase uses
    /// (and removes) a subdirectory.
    #[arg(long, default_value = "target/bench-data")]
    dir: PathBuf,
    /// Length of each timed phase, in seconds.
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Unmeasured warm-up of the get phase, in seconds [default: --duration-secs].
    #[arg(long)]
    warmup_secs: Option<f64>,
    /// Most operations per timed phase (the phase ends at its duration or after this many).
    #[arg(long)]
    ops_max: Option<u64>,
    /// Value size of the put and get phases, in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Keys of the get dataset, also the key space of the put phases.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Ring partitions the keys are spread over.
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Cache budget of both stores (ringkv value cache, RocksDB block cache), in MiB.
    #[arg(long, default_value_t = 16)]
    cache_mib: usize,
    /// Writer counts of the put phases.
    #[arg(long, value_delimiter = ',', default_value = "1,16,128")]
    writers: Vec<usize>,
    /// Concurrent readers of the get phase.
    #[arg(long, default_value_t = 16)]
    readers: usize,
    /// First size at which index memory is measured.
    #[arg(long, default_value_t = 1_000_000)]
    mid_keys: u64,
    /// Keys of the big dataset: index memory and restart time are measured at this size.
    #[arg(long, default_value_t = 10_000_000)]
    big_keys: u64,
    /// Value size of the big dataset, in bytes (small, to keep disk use moderate).
    #[arg(long, default_value_t = 24)]
    big_value_size: usize,
    /// Skip the big dataset: measure index memory and restart at --mid-keys only.
    #[arg(long)]
    skip_10m: bool,
    /// CPU the engine's executor is pinned to.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Do not pin the engine's executor.
    #[arg(long)]
    no_pin: bool,
    /// Do not run RocksDB even if the binary was built with it.
    #[arg(long)]
    no_rocksdb: bool,
    /// Write the JSON report to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Tiny sizes and sub-second phases, for a smoke run; overrides the size flags.
    #[arg(long)]
    quick: bool,
}

/// The parameters a run actually used (flags resolved), recorded in the JSON report.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Params {
    pub(crate) dir: PathBuf,
    pub(crate) duration_secs: f64,
    pub(crate) warmup_secs: f64,
    pub(crate) ops_max: Option<u64>,
    pub(crate) value_size: usize,
    pub(crate) keys: u64,
    pub(crate) partitions: u32,
    pub(crate) cache_bytes: usize,
    pub(crate) writers: Vec<usize>,
    pub(crate) readers: usize,
    pub(crate) mid_keys: u64,
    pub(crate) big_keys: u64,
    pub(crate) big_value_size: usize,
    /// CPU of the engine's executor; `None`: not pinned.
    pub(crate) cpu: Option<usize>,
    pub(crate) cpus_online: usize,
    pub(crate) quick: bool,
}

impl Params {
    fn resolve(a: &EngineArgs) -> anyhow::Result<Self> {
        let cpus_online = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu = if a.no_pin {
            None
        } else if a.cpu < cpus_online {
            Some(a.cpu)
        } else {
            eprintln!(
                "cpu {} not available ({cpus_online} online): executor not pinned",
                a.cpu
            );
            None
        };
        let mut p = Self {
            dir: a.dir.clone(),
            duration_secs: a.duration_secs,
            warmup_secs: a.warmup_secs.unwrap_or(a.duration_secs),
            ops_max: a.ops_max,
            value_size: a.value_size,
            keys: a.keys,
            partitions: a.partitions.max(1),
            cache_bytes: a.cache_mib << 20,
            writers: a.writers.clone(),
            readers: a.readers,
            mid_keys: a.mid_keys,
            big_keys: if a.skip_10m { a.mid_keys } else { a.big_keys },
            big_value_size: a.big_value_size,
            cpu,
            cpus_online,
            quick: a.quick,
        };
        if a.quick {
            p.duration_secs = 0.2;
            p.warmup_secs = 0.1;
            p.keys = 20_000;
            p.cache_bytes = 256 << 10;
            p.mid_keys = 5_000;
            p.big_keys = 10_000;
        }
        if !(p.duration_secs > 0.0 && p.warmup_secs >= 0.0) {
            bail!("--duration-secs must be positive and --warmup-secs not negative");
        }
        if p.keys == 0 || p.big_keys == 0 || p.readers == 0 || p.writers.contains(&0) {
            bail!("key, reader and writer counts must be positive");
        }
        Ok(p)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_secs)
    }

    pub(crate) fn ops_max(&self) -> u64 {
        self.ops_max.unwrap_or(u64::MAX)
    }

    /// A timed phase starting now over the put/get key space.
    pub(crate) fn phase(&self, seed: u64) -> Phase {
        Phase::starting_now(
            self.duration(),
            self.ops_max(),
            self.keys,
            self.partitions,
            seed,
        )
    }

    /// The unmeasured warm-up before the gets.
    pub(crate) fn warmup(&self, seed: u64) -> Phase {
        Phase::starting_now(
            Duration::from_secs_f64(self.warmup_secs),
            u64::MAX,
            self.keys,
            self.partitions,
            seed,
        )
    }

    /// Sizes at which index memory is measured, ascending, the last one `big_keys`.
    pub(crate) fn index_checkpoints(&self) -> Vec<u64> {
        let mut v = vec![self.mid_keys.min(self.big_keys), self.big_keys];
        v.dedup();
        v
    }
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    params: Params,
    ringkv: SideResults,
    rocksdb: Option<SideResults>,
    ratios: Vec<report::Comparison>,
    targets: Vec<report::Target>,
}

/// A fresh, empty directory `name` under the data directory.
pub(crate) fn fresh_dir(base: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let d = base.join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
    }
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// Removes a phase directory.
pub(crate) fn remove_dir(d: &Path) -> anyhow::Result<()> {
    std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))
}

fn progress(store: &str, what: &str, detail: &str) {
    eprintln!("[{store:>7}] {what}: {detail}");
}

fn put_detail(r: &PutResult) -> String {
    format!(
        "{:.0} ops/s, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us ({} ops in {:.2} s)",
        r.ops_per_sec, r.latency.p50_us, r.latency.p99_us, r.latency.p999_us, r.ops, r.secs
    )
}

fn get_detail(r: &GetResult) -> String {
    format!(
        "{:.0} ops/s, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us ({} ops, {} misses, preload {:.1} s)",
        r.ops_per_sec,
        r.latency.p50_us,
        r.latency.p99_us,
        r.latency.p999_us,
        r.ops,
        r.misses,
        r.preload_secs
    )
}

fn big_detail(l: &LoadResult, idx: &[IndexResult], r: &RestartResult) -> String {
    let idx: Vec<String> = idx
        .iter()
        .map(|i| format!("{:.1} B/key at {}", i.bytes_per_key, i.keys))
        .collect();
    format!(
        "load {:.0} keys/s; index {}; reopen {:.2} s, {} of {} keys verified",
        l.keys_per_sec,
        idx.join(", "),
        r.open_secs,
        r.verified_keys,
        r.verified_keys + r.missing_keys
    )
}

/// Runs the whole benchmark.
pub(crate) fn run(args: EngineArgs) -> anyhow::Result<()> {
    let p = Params::resolve(&args)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let with_rocksdb = cfg!(feature = "rocksdb") && !args.no_rocksdb;
    std::fs::create_dir_all(&p.dir).with_context(|| format!("creating {}", p.dir.display()))?;
    if !cfg!(feature = "rocksdb") {
        eprintln!("built without the rocksdb feature: measuring ringkv only");
    }
    let mut ours = SideResults::default();
    #[cfg_attr(not(feature = "rocksdb"), allow(unused_mut))]
    let mut rocks = SideResults::default();

    for mode in [Mode::Sync, Mode::Buffered] {
        for &w in &p.writers {
            let r = ours_put(&p, mode, w)?;
            progress("ringkv", &report::put_phase_name(&r), &put_detail(&r));
            ours.put.push(r);
            #[cfg(feature = "rocksdb")]
            if with_rocksdb {
                let r = crate::rocks_side::put_phase(&p, mode, w)?;
                progress("rocksdb", &report::put_phase_name(&r), &put_detail(&r));
                rocks.put.push(r);
            }
        }
    }

    let g = ours_get(&p)?;
    progress("ringkv", &report::get_phase_name(&g), &get_detail(&g));
    ours.get = Some(g);
    for cache in [true, false] {
        let g = ours_get_hot(&p, cache)?;
        progress("ringkv", &report::get_phase_name(&g), &get_detail(&g));
        ours.get_hot.push(g);
    }
    #[cfg(feature = "rocksdb")]
    if with_rocksdb {
        let g = crate::rocks_side::get_phase(&p)?;
        progress("rocksdb", &report::get_phase_name(&g), &get_detail(&g));
        rocks.get = Some(g);
    }

    let (l, i, r) = ours_big(&p)?;
    progress("ringkv", "index and restart", &big_detail(&l, &i, &r));
    (ours.load, ours.index, ours.restart) = (Some(l), i, Some(r));
    #[cfg(feature = "rocksdb")]
    if with_rocksdb {
        let (l, i, r) = crate::rocks_side::big_phase(&p)?;
        progress("rocksdb", "index and restart", &big_detail(&l, &i, &r));
        (rocks.load, rocks.index, rocks.restart) = (Some(l), i, Some(r));
    }

    let rocks = with_rocksdb.then_some(rocks);
    let ratios = rocks
        .as_ref()
        .map_or_else(Vec::new, |r| report::compare(&ours, r));
    let targets = report::targets(&ours, rocks.as_ref(), p.big_keys);
    println!(
        "ringkv-bench engine: one shard ({}), {} B values, {} keys, {} partitions, {} KiB cache, {} s per phase",
        p.cpu.map_or("executor not pinned".to_string(), |c| format!(
            "executor on cpu {c}"
        )),
        p.value_size,
        p.keys,
        p.partitions,
        p.cache_bytes >> 10,
        p.duration_secs
    );
    println!();
    print!("{}", report::table(&ours, rocks.as_ref(), &ratios));
    println!();
    print!("{}", report::targets_text(&targets));
    let rep = Report {
        command,
        params: p,
        ringkv: ours,
        rocksdb: rocks,
        ratios,
        targets,
    };
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&rep)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("JSON report written to {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The ringkv side: every phase runs on one glommio executor (one shard).

fn engine_config(p: &Params, dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.cache_bytes = p.cache_bytes;
    c
}

/// Runs `f` on a new glommio executor (pinned to `cpu` if given) and returns its result.
fn on_shard<T, F, Fut>(cpu: Option<usize>, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + 'static,
{
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    LocalExecutorBuilder::new(placement)
        .name("ringkv-bench-shard")
        .spawn(f)
        .map_err(|e| anyhow!("cannot start the shard executor: {e}"))?
        .join()
        .map_err(|e| anyhow!("shard executor failed: {e}"))?
}

async fn close(engine: Rc<Engine>) -> anyhow::Result<()> {
    let engine = Rc::try_unwrap(engine).map_err(|_| anyhow!("engine still shared when closing"))?;
    engine.close().await.context("closing the engine")
}

fn ours_put(p: &Params, mode: Mode, writers: usize) -> anyhow::Result<PutResult> {
    let dir = fresh_dir(&p.dir, &format!("ringkv-put-{}-{writers}", mode.name()))?;
    let (cfg, p2) = (engine_config(p, &dir), p.clone());
    let r = on_shard(p.cpu, move || put_on_shard(cfg, p2, mode, writers))?;
    remove_dir(&dir)?;
    Ok(r)
}

async fn put_on_shard(
    cfg: EngineConfig,
    p: Params,
    mode: Mode,
    writers: usize,
) -> anyhow::Result<PutResult> {
    let engine = Rc::new(Engine::open(cfg).await.context("opening the engine")?);
    let value: Value = random_value(p.value_size, 1).into();
    let durability = match mode {
        Mode::Sync => Durability::Sync,
        Mode::Buffered => Durability::Buffered,
    };
    let flushes0 = engine.stats().flushes;
    let started = Rc::new(Cell::new(0u64));
    let t0 = Instant::now();
    let phase = p.phase(0x5075 + writers as u64);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            glommio::spawn_local(put_worker(
                engine.clone(),
                value.clone(),
                started.clone(),
                phase,
                w,
                durability,
            ))
        })
        .collect();
    let mut hs = Vec::with_capacity(writers);
    for t in tasks {
        hs.push(t.await?);
    }
    let secs = t0.elapsed().as_secs_f64();
    let h = merge(hs)?;
    let flushes = engine.stats().flushes - flushes0;
    close(engine).await?;
    Ok(PutResult {
        mode: mode.name(),
        writers,
        ops: h.len(),
        secs,
        ops_per_sec: h.len() as f64 / secs,
        latency: Latency::of(&h),
        flushes: Some(flushes),
    })
}

async fn put_worker(
    engine: Rc<Engine>,
    value: Value,
    started: Rc<Cell<u64>>,
    phase: Phase,
    worker: usize,
    durability: Durability,
) -> anyhow::Result<Histogram<u64>> {
    let mut rng = worker_rng(phase.seed, worker);
    let mut h = new_histogram()?;
    loop {
        let now = Instant::now();
        if now >= phase.until || started.get() >= phase.ops_max {
            break;
        }
        started.set(started.get() + 1);
        let n = random_key(&mut rng, phase.keys);
        engine
            .put(
                partition_of(n, phase.partitions),
                &key_of(n),
                &value,
                durability,
            )
            .await?;
        record_since(&mut h, now);
        glommio::yield_if_needed().await;
    }
    Ok(h)
}

fn ours_get(p: &Params) -> anyhow::Result<GetResult> {
    let dir = fresh_dir(&p.dir, "ringkv-get")?;
    let (cfg, p2) = (engine_config(p, &dir), p.clone());
    let r = on_shard(p.cpu, move || get_on_shard(cfg, p2, 0))?;
    remove_dir(&dir)?;
    Ok(r)
}

/// Hot-set gets (90% of them on the hottest 2% of the keys), with the configured value cache or
/// none: what the cache buys when reads are skewed, as they are for carts and sessions.
fn ours_get_hot(p: &Params, cache: bool) -> anyhow::Result<GetResult> {
    let dir = fresh_dir(&p.dir, "ringkv-get-hot")?;
    let mut cfg = engine_config(p, &dir);
    if !cache {
        cfg.cache_bytes = 0;
    }
    let hot_keys = (p.keys / 50).max(1);
    let p2 = p.clone();
    let r = on_shard(p.cpu, move || get_on_shard(cfg, p2, hot_keys))?;
    remove_dir(&dir)?;
    Ok(r)
}

/// Loads key numbers `from..to` with buffered puts of `value`.
async fn load(engine: &Engine, p: &Params, from: u64, to: u64, value: &[u8]) -> anyhow::Result<()> {
    for n in from..to {
        engine
            .put(
                partition_of(n, p.partitions),
                &key_of(n),
                value,
                Durability::Buffered,
            )
            .await?;
        glommio::yield_if_needed().await;
    }
    Ok(())
}

async fn get_on_shard(cfg: EngineConfig, p: Params, hot_keys: u64) -> anyhow::Result<GetResult> {
    let cache_bytes = cfg.cache_bytes;
    let engine = Rc::new(Engine::open(cfg).await.context("opening the engine")?);
    let t = Instant::now();
    load(&engine, &p, 0, p.keys, &random_value(p.value_size, 2)).await?;
    engine.flush().await?;
    let preload_secs = t.elapsed().as_secs_f64();
    let hot = |mut ph: Phase| {
        ph.hot_keys = hot_keys;
        ph
    };
    let warm = read_phase(&engine, p.readers, hot(p.warmup(0x3a3a))).await?;
    let s0 = engine.stats();
    let t0 = Instant::now();
    let (h, misses) = read_phase(&engine, p.readers, hot(p.phase(0x6e7))).await?;
    let secs = t0.elapsed().as_secs_f64();
    let s1 = engine.stats();
    close(engine).await?;
    let gets = s1.gets - s0.gets;
    Ok(GetResult {
        readers: p.readers,
        keys: p.keys,
        preload_secs,
        warmup_secs: p.warmup_secs,
        ops: h.len(),
        secs,
        ops_per_sec: h.len() as f64 / secs,
        latency: Latency::of(&h),
        misses: misses + warm.1,
        cache_hit_ratio: (gets > 0).then(|| (s1.cache_hits - s0.cache_hits) as f64 / gets as f64),
        disk_reads: Some(s1.disk_reads - s0.disk_reads),
        hot_keys,
        cache_bytes,
    })
}

/// Runs `readers` concurrent random readers until the phase ends; returns their latencies and
/// how many preloaded keys were not found.
async fn read_phase(
    engine: &Rc<Engine>,
    readers: usize,
    phase: Phase,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let started = Rc::new(Cell::new(0u64));
    let tasks: Vec<_> = (0..readers)
        .map(|r| glommio::spawn_local(get_worker(engine.clone(), started.clone(), phase, r)))
        .collect();
    let (mut hs, mut misses) = (Vec::with_capacity(readers), 0);
    for t in tasks {
        let (h, m) = t.await?;
        hs.push(h);
        misses += m;
    }
    Ok((merge(hs)?, misses))
}

async fn get_worker(
    engine: Rc<Engine>,
    started: Rc<Cell<u64>>,
    phase: Phase,
    worker: usize,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut rng = worker_rng(phase.seed, worker);
    let mut h = new_histogram()?;
    let mut misses = 0;
    loop {
        let now = Instant::now();
        if now >= phase.until || started.get() >= phase.ops_max {
            break;
        }
        started.set(started.get() + 1);
        let n = get_key(&mut rng, &phase);
        let v = engine
            .get(partition_of(n, phase.partitions), &key_of(n))
            .await?;
        record_since(&mut h, now);
        if v.is_none() {
            misses += 1;
        }
        glommio::yield_if_needed().await;
    }
    Ok((h, misses))
}

/// Keys read back after a restart.
pub(crate) const VERIFY_KEYS: u64 = 1000;

fn ours_big(p: &Params) -> anyhow::Result<(LoadResult, Vec<IndexResult>, RestartResult)> {
    let dir = fresh_dir(&p.dir, "ringkv-big")?;
    let (cfg, p2) = (engine_config(p, &dir), p.clone());
    let r = on_shard(p.cpu, move || big_on_shard(cfg, p2))?;
    remove_dir(&dir)?;
    Ok(r)
}

fn bytes_per_key(bytes: u64, keys: u64) -> f64 {
    bytes as f64 / keys.max(1) as f64
}

async fn big_on_shard(
    cfg: EngineConfig,
    p: Params,
) -> anyhow::Result<(LoadResult, Vec<IndexResult>, RestartResult)> {
    let engine = Engine::open(cfg.clone())
        .await
        .context("opening the engine")?;
    let value = random_value(p.big_value_size, 3);
    let t0 = Instant::now();
    let (mut loaded, mut index) = (0, Vec::new());
    for cp in p.index_checkpoints() {
        load(&engine, &p, loaded, cp, &value).await?;
        loaded = cp;
        engine.flush().await?;
        let s = engine.stats();
        index.push(IndexResult {
            keys: cp,
            index_entries: Some(s.index_entries),
            index_bytes: s.index_bytes,
            bytes_per_key: bytes_per_key(s.index_bytes, s.index_entries),
            what: "heap bytes of the index tables",
        });
    }
    let load_secs = t0.elapsed().as_secs_f64();
    let t = Instant::now();
    engine.close().await.context("closing the engine")?;
    let close_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let engine = Engine::open(cfg).await.context("reopening the engine")?;
    let open_secs = t.elapsed().as_secs_f64();
    let rep = engine.recovery_report().clone();
    let s = engine.stats();
    let mut rng = worker_rng(0xb16, 0);
    let (mut verified, mut missing) = (0, 0);
    for _ in 0..VERIFY_KEYS.min(loaded) {
        let n = random_key(&mut rng, loaded);
        match engine
            .get(partition_of(n, p.partitions), &key_of(n))
            .await?
        {
            Some(v) if v[..] == value[..] => verified += 1,
            _ => missing += 1,
        }
    }
    engine.close().await.context("closing the engine")?;
    Ok((
        LoadResult {
            keys: loaded,
            value_size: p.big_value_size,
            secs: load_secs,
            keys_per_sec: loaded as f64 / load_secs,
        },
        index,
        RestartResult {
            keys: loaded,
            close_secs,
            open_secs,
            segments_from_hints: Some(rep.segments_from_hints),
            segments_scanned: Some(rep.segments_scanned),
            records: Some(rep.records),
            index_bytes_per_key: Some(bytes_per_key(s.index_bytes, s.index_entries)),
            verified_keys: verified,
            missing_keys: missing,
        },
    ))
}
