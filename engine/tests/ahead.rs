//! Zeros written ahead of the log's tail (`engine/src/ahead.rs`): group commits overwrite them
//! instead of growing the segment file, and whatever the zeros leave past the records, a reopen
//! after a close or a crash reads as the segment's unwritten end.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use ringkv_engine::{Durability, Engine, EngineConfig};

/// The largest segment file in `dir`: the active one, once zeros are written ahead of it (the
/// prepared spare is empty).
fn active_segment(dir: &Path) -> (PathBuf, u64) {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .map(|p| {
            let len = std::fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .max_by_key(|(_, len)| *len)
        .unwrap()
}

fn value(i: u32) -> Vec<u8> {
    format!("value {i} ").bytes().cycle().take(100).collect()
}

/// Opens a store with room for zeros ahead, writes one synced value and waits (bounded) for the
/// maintenance task to write the first chunk of zeros.
async fn zeroed_store(dir: &Path) -> (Engine, EngineConfig) {
    let mut cfg = common::config(dir);
    cfg.segment_bytes = 8 << 20;
    let e = Engine::open(cfg.clone()).await.unwrap();
    e.put(0, b"k0", &value(0), Durability::Sync).await.unwrap();
    for _ in 0..10_000 {
        if e.stats().zeroed_bytes > 0 {
            break;
        }
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    let stats = e.stats();
    assert!(
        stats.zeroed_bytes >= 1 << 20,
        "no zeros written ahead of the log's tail ({} bytes)",
        stats.zeroed_bytes
    );
    assert_eq!(stats.zero_write_failures, 0);
    (e, cfg)
}

/// Synced writes that fit in the zeros ahead leave the file's size as it was: each group
/// commit overwrote blocks the file had.
async fn write_within_the_zeros(e: &Engine, dir: &Path) {
    let (path, zeroed_len) = active_segment(dir);
    assert!(
        zeroed_len >= 1 << 20,
        "{}: {zeroed_len} bytes",
        path.display()
    );
    for i in 1..100 {
        e.put(0, format!("k{i}").as_bytes(), &value(i), Durability::Sync)
            .await
            .unwrap();
    }
    assert!(e.stats().flushes >= 50, "the writes were group commits");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        zeroed_len,
        "group commits grew the file instead of overwriting the zeros ahead"
    );
}

/// Reads back `key(i)` → `value(i)` for `i` in `0..n`, and checks the reopen found no damage.
async fn read_back(e: &Engine, n: u32, key: fn(u32) -> String, value: fn(u32) -> Vec<u8>) {
    for i in 0..n {
        let got = e.get(0, key(i).as_bytes()).await.unwrap();
        assert_eq!(got.as_deref(), Some(&value(i)[..]), "{}", key(i));
    }
    let report = e.recovery_report();
    assert!(report.torn_tails.is_empty(), "{:?}", report.torn_tails);
    assert!(
        report.corrupt_regions.is_empty(),
        "{:?}",
        report.corrupt_regions
    );
}

fn small_key(i: u32) -> String {
    format!("k{i}")
}

fn big_key(i: u32) -> String {
    format!("b{i}")
}

fn big(i: u32) -> Vec<u8> {
    format!("big {i} ").bytes().cycle().take(60_000).collect()
}

#[test]
fn group_commits_overwrite_zeros_and_a_reopen_reads_them_as_the_end() {
    common::run(|dir| async move {
        let (e, cfg) = zeroed_store(&dir).await;
        write_within_the_zeros(&e, &dir).await;
        e.close().await.unwrap();
        let e = Engine::open(cfg).await.unwrap();
        read_back(&e, 100, small_key, value).await;
        e.close().await.unwrap();
    });
}

#[test]
fn a_crash_over_zeros_ahead_loses_no_synced_write() {
    common::run(|dir| async move {
        let (e, cfg) = zeroed_store(&dir).await;
        write_within_the_zeros(&e, &dir).await;
        // Dropped without `close`: no hint file, so the reopen scans the segment, records,
        // then zeros.
        drop(e);
        let e = common::open_after_drop(&cfg).await;
        assert!(e.recovery_report().segments_scanned >= 1);
        read_back(&e, 100, small_key, value).await;
        e.close().await.unwrap();
    });
}

#[test]
fn a_crash_right_after_the_first_zeros_keeps_the_first_write() {
    common::run(|dir| async move {
        // The first zeros start right past the first group commit's padded block: a zero write
        // reaching back into it would erase the write, and no later commit rewrites it here.
        let (e, cfg) = zeroed_store(&dir).await;
        drop(e);
        let e = common::open_after_drop(&cfg).await;
        assert_eq!(
            e.get(0, b"k0").await.unwrap().as_deref(),
            Some(&value(0)[..])
        );
        e.close().await.unwrap();
    });
}

#[test]
fn synced_writes_past_many_zero_chunks_and_segments_survive_a_crash() {
    common::run(|dir| async move {
        let mut cfg = common::config(&dir);
        cfg.segment_bytes = 8 << 20;
        let e = Engine::open(cfg.clone()).await.unwrap();
        // 300 values of 60 KB: about 18 MB, so group commits cross many zero chunks (and may
        // catch up with one in flight) and the log rolls to new segments twice.
        for i in 0..300u32 {
            e.put(0, big_key(i).as_bytes(), &big(i), Durability::Sync)
                .await
                .unwrap();
        }
        let stats = e.stats();
        assert!(stats.segments >= 3, "{} segments", stats.segments);
        assert!(
            stats.zeroed_bytes >= 4 << 20,
            "{} bytes of zeros",
            stats.zeroed_bytes
        );
        drop(e);
        let e = common::open_after_drop(&cfg).await;
        read_back(&e, 300, big_key, big).await;
        e.close().await.unwrap();
    });
}
