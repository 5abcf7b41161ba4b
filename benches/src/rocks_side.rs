//! The RocksDB side of `ringkv-bench engine` (cargo feature `rocksdb`): the same phases as the
//! ringkv side, with OS threads where ringkv has tasks (RocksDB's own group commit batches the
//! concurrent writers' WAL writes and syncs).
//!
//! Configuration, chosen to match ringkv's: `sync` puts use `WriteOptions::set_sync(true)`,
//! `buffered` puts `set_sync(false)` (WAL written, not synced); no compression (values are random
//! bytes); an LRU block cache of the same size as ringkv's value cache; direct reads, so that reads
//! outside the block cache go to the disk as ringkv's O_DIRECT reads do (the page cache would
//! otherwise hold the whole dataset); a 10-bit full bloom filter; everything else at its default
//! (64 MiB memtable, two background jobs). Its threads are not pinned: RocksDB may use every core.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, anyhow};
use hdrhistogram::Histogram;
use rocksdb::{
    BlockBasedOptions, Cache, DB, DBCompressionType, Options, WriteBatch, WriteOptions, properties,
};

use crate::engine_bench::{Params, VERIFY_KEYS, fresh_dir, remove_dir};
use crate::report::{GetResult, IndexResult, Latency, LoadResult, PutResult, RestartResult};
use crate::workload::{
    Mode, Phase, flat_key_of, merge, new_histogram, random_key, random_value, record_since,
    worker_rng,
};

/// Keys per write batch of the (unmeasured) bulk loads.
const LOAD_BATCH: u64 = 1000;

fn options(p: &Params) -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_compression_type(DBCompressionType::None);
    o.set_use_direct_reads(true);
    let mut t = BlockBasedOptions::default();
    t.set_block_cache(&Cache::new_lru_cache(p.cache_bytes));
    t.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&t);
    o
}

fn open(p: &Params, dir: &Path) -> anyhow::Result<DB> {
    DB::open(&options(p), dir).with_context(|| format!("opening RocksDB in {}", dir.display()))
}

/// Runs `workers` threads of `work` and collects their results.
fn threads<T: Send>(
    workers: usize,
    work: impl Fn(usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let work = &work;
                s.spawn(move || work(w))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("worker thread panicked"))?)
            .collect()
    })
}

/// A timed put phase on a fresh database.
pub(crate) fn put_phase(p: &Params, mode: Mode, writers: usize) -> anyhow::Result<PutResult> {
    let dir = fresh_dir(&p.dir, &format!("rocksdb-put-{}-{writers}", mode.name()))?;
    let db = open(p, &dir)?;
    let value = random_value(p.value_size, 1);
    let started = AtomicU64::new(0);
    let t0 = Instant::now();
    let phase = p.phase(0x5075 + writers as u64);
    let hs = threads(writers, |w| {
        put_worker(&db, &value, &started, phase, w, mode == Mode::Sync)
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let h = merge(hs)?;
    drop(db);
    remove_dir(&dir)?;
    Ok(PutResult {
        mode: mode.name(),
        writers,
        ops: h.len(),
        secs,
        ops_per_sec: h.len() as f64 / secs,
        latency: Latency::of(&h),
        flushes: None,
    })
}

fn put_worker(
    db: &DB,
    value: &[u8],
    started: &AtomicU64,
    phase: Phase,
    worker: usize,
    sync: bool,
) -> anyhow::Result<Histogram<u64>> {
    let mut wo = WriteOptions::default();
    wo.set_sync(sync);
    let mut rng = worker_rng(phase.seed, worker);
    let mut h = new_histogram()?;
    loop {
        let now = Instant::now();
        if now >= phase.until || started.fetch_add(1, Ordering::Relaxed) >= phase.ops_max {
            break;
        }
        let n = random_key(&mut rng, phase.keys);
        db.put_opt(flat_key_of(n, phase.partitions), value, &wo)?;
        record_since(&mut h, now);
    }
    Ok(h)
}

/// Loads key numbers `from..to` in write batches (WAL on, not synced).
fn load(db: &DB, p: &Params, from: u64, to: u64, value: &[u8]) -> anyhow::Result<()> {
    let mut wo = WriteOptions::default();
    wo.set_sync(false);
    let mut n = from;
    while n < to {
        let mut b = WriteBatch::default();
        for k in n..(n + LOAD_BATCH).min(to) {
            b.put(flat_key_of(k, p.partitions), value);
        }
        db.write_opt(b, &wo)?;
        n = (n + LOAD_BATCH).min(to);
    }
    Ok(())
}

/// Preloads the dataset, flushes and compacts it, warms up, then times random gets.
pub(crate) fn get_phase(p: &Params) -> anyhow::Result<GetResult> {
    let dir = fresh_dir(&p.dir, "rocksdb-get")?;
    let db = open(p, &dir)?;
    let t = Instant::now();
    load(&db, p, 0, p.keys, &random_value(p.value_size, 2))?;
    db.flush()?;
    db.compact_range::<&[u8], &[u8]>(None, None);
    let preload_secs = t.elapsed().as_secs_f64();
    let (_, warm_misses) = read_phase(&db, p.readers, p.warmup(0x3a3a))?;
    let t0 = Instant::now();
    let (h, misses) = read_phase(&db, p.readers, p.phase(0x6e7))?;
    let secs = t0.elapsed().as_secs_f64();
    drop(db);
    remove_dir(&dir)?;
    Ok(GetResult {
        readers: p.readers,
        keys: p.keys,
        preload_secs,
        warmup_secs: p.warmup_secs,
        ops: h.len(),
        secs,
        ops_per_sec: h.len() as f64 / secs,
        latency: Latency::of(&h),
        misses: misses + warm_misses,
        cache_hit_ratio: None,
        disk_reads: None,
        hot_keys: 0,
        cache_bytes: p.cache_bytes,
    })
}

fn read_phase(db: &DB, readers: usize, phase: Phase) -> anyhow::Result<(Histogram<u64>, u64)> {
    let started = AtomicU64::new(0);
    let rs = threads(readers, |r| {
        let mut rng = worker_rng(phase.seed, r);
        let mut h = new_histogram()?;
        let mut misses = 0;
        loop {
            let now = Instant::now();
            if now >= phase.until || started.fetch_add(1, Ordering::Relaxed) >= phase.ops_max {
                break;
            }
            let n = random_key(&mut rng, phase.keys);
            let v = db.get_pinned(flat_key_of(n, phase.partitions))?;
            record_since(&mut h, now);
            if v.is_none() {
                misses += 1;
            }
        }
        Ok((h, misses))
    })?;
    let misses = rs.iter().map(|(_, m)| m).sum();
    Ok((merge(rs.into_iter().map(|(h, _)| h))?, misses))
}

/// Loads the big dataset (index memory at each checkpoint, after a flush), closes the database
/// and times its reopening.
pub(crate) fn big_phase(
    p: &Params,
) -> anyhow::Result<(LoadResult, Vec<IndexResult>, RestartResult)> {
    let dir = fresh_dir(&p.dir, "rocksdb-big")?;
    let db = open(p, &dir)?;
    let value = random_value(p.big_value_size, 3);
    let t0 = Instant::now();
    let (mut loaded, mut index) = (0, Vec::new());
    for cp in p.index_checkpoints() {
        load(&db, p, loaded, cp, &value)?;
        loaded = cp;
        db.flush()?;
        let bytes = db
            .property_int_value(properties::ESTIMATE_TABLE_READERS_MEM)?
            .unwrap_or(0);
        index.push(IndexResult {
            keys: cp,
            index_entries: None,
            index_bytes: bytes,
            bytes_per_key: bytes as f64 / cp.max(1) as f64,
            what: "index and filter blocks held by table readers (estimate-table-readers-mem) after a flush",
        });
    }
    let load_secs = t0.elapsed().as_secs_f64();
    let t = Instant::now();
    drop(db);
    let close_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let db = open(p, &dir)?;
    let open_secs = t.elapsed().as_secs_f64();
    let mut rng = worker_rng(0xb16, 0);
    let (mut verified, mut missing) = (0, 0);
    for _ in 0..VERIFY_KEYS.min(loaded) {
        let n = random_key(&mut rng, loaded);
        match db.get_pinned(flat_key_of(n, p.partitions))? {
            Some(v) if v[..] == value[..] => verified += 1,
            _ => missing += 1,
        }
    }
    drop(db);
    remove_dir(&dir)?;
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
            segments_from_hints: None,
            segments_scanned: None,
            records: None,
            index_bytes_per_key: None,
            verified_keys: verified,
            missing_keys: missing,
        },
    ))
}
