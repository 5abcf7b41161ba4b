//! Compaction reads a segment through its hint file: only the bytes around the records the
//! index still points at, each checked against its hint entry before it is copied. Without a
//! usable hint file (missing, or failing its CRC) it reads and scans the whole segment. Either
//! way every live value survives, and a damaged live record is dropped and counted, never
//! copied. A value the pass moves stays cached: the copy holds the same value, so its cache
//! entry follows the record to its new location rather than sending the next read to the disk.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use ringkv_engine::record::{self, RecordKind};
use ringkv_engine::{Durability, Engine, EngineConfig, EngineError};

/// Keys written; all but the last `KEPT` are written again, so the first segment is mostly
/// garbage.
const KEYS: usize = 1000;
const KEPT: usize = 100;

fn key(i: usize) -> Vec<u8> {
    format!("key-{i:04}").into_bytes()
}

fn value(i: usize, round: u8) -> Vec<u8> {
    let mut v = vec![round; 1000];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    v
}

fn cfg(dir: &Path) -> EngineConfig {
    let mut c = common::config(dir);
    // Reads go to the segments, so a damaged record cannot hide behind the cache.
    c.cache_bytes = 0;
    c
}

/// Writes every key, then every key but the last `KEPT` again, and makes it all durable and its
/// sealed segments finished (hint files written).
async fn fill(e: &Engine) {
    for i in 0..KEYS {
        e.put(0, &key(i), &value(i, 1), Durability::Buffered)
            .await
            .unwrap();
    }
    for i in 0..KEYS - KEPT {
        e.put(0, &key(i), &value(i, 2), Durability::Buffered)
            .await
            .unwrap();
    }
    e.flush().await.unwrap();
}

fn expected(i: usize) -> Vec<u8> {
    value(i, if i < KEYS - KEPT { 2 } else { 1 })
}

async fn check_all(e: &Engine, lost: Option<usize>) {
    for i in 0..KEYS {
        let got = e.get(0, &key(i)).await.unwrap();
        if Some(i) == lost {
            assert_eq!(got, None, "the damaged record's key is dropped, not copied");
        } else {
            assert_eq!(got.as_deref(), Some(&expected(i)[..]), "key {i}");
        }
    }
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

/// Compacts, then returns the pass's input bytes and the segment bytes it read.
async fn compact(e: &Engine) -> (u64, u64) {
    let read_before = e.stats().compaction_bytes_read;
    let r = e.compact().await.unwrap();
    assert!(r.segments_compacted >= 1, "{r:?}");
    (
        r.bytes_before,
        e.stats().compaction_bytes_read - read_before,
    )
}

#[test]
fn a_hinted_segment_is_read_only_around_its_live_records() {
    common::run(|dir| async move {
        let e = Engine::open(cfg(&dir)).await.unwrap();
        fill(&e).await;
        let (before, read) = compact(&e).await;
        // About a tenth of the inputs is live; whole segments would be `before`.
        assert!(
            read * 3 < before,
            "read {read} of {before} input bytes for about a tenth live"
        );
        check_all(&e, None).await;
        e.close().await.unwrap();
        let e = Engine::open(cfg(&dir)).await.unwrap();
        check_all(&e, None).await;
        e.close().await.unwrap();
    });
}

#[test]
fn without_a_usable_hint_the_segment_is_scanned_whole() {
    for damage in ["missing", "bad crc"] {
        common::run(move |dir| async move {
            let e = Engine::open(cfg(&dir)).await.unwrap();
            fill(&e).await;
            // A close writes every segment's hint file; the reopened engine has read them.
            e.close().await.unwrap();
            let e = Engine::open(cfg(&dir)).await.unwrap();
            let hints = files(&dir, "hint");
            assert!(!hints.is_empty());
            for h in &hints {
                if damage == "missing" {
                    std::fs::remove_file(h).unwrap();
                } else {
                    let mut b = std::fs::read(h).unwrap();
                    b[40] ^= 1;
                    std::fs::write(h, b).unwrap();
                }
            }
            let (before, read) = compact(&e).await;
            assert!(read >= before, "{damage}: read {read} of {before}");
            check_all(&e, None).await;
            e.close().await.unwrap();
        });
    }
}

#[test]
fn a_damaged_live_record_is_dropped_and_counted_not_copied() {
    common::run(|dir| async move {
        let e = Engine::open(cfg(&dir)).await.unwrap();
        fill(&e).await;
        // The first segment holds the kept keys' only records; flip a byte of one's value.
        let victim = KEYS - KEPT / 2;
        let seg = &files(&dir, "seg")[0];
        let mut bytes = std::fs::read(seg).unwrap();
        let mut off = 0usize;
        let at = loop {
            let r = record::decode(&bytes[off..]).expect("the segment is intact so far");
            if r.kind == RecordKind::Put && r.key == key(victim).as_slice() {
                break r.value.as_ptr() as usize - bytes.as_ptr() as usize;
            }
            off += r.len;
        };
        bytes[at + 100] ^= 0x40;
        std::fs::write(seg, &bytes).unwrap();
        assert!(matches!(
            e.get(0, &key(victim)).await,
            Err(EngineError::Corrupt { .. })
        ));
        let (before, read) = compact(&e).await;
        assert!(
            read * 3 < before,
            "the hint was used: read {read} of {before}"
        );
        assert_eq!(e.stats().compaction_damaged_records, 1);
        check_all(&e, Some(victim)).await;
        e.close().await.unwrap();
    });
}

/// Live records farther apart than one read spans, and a run of them longer than one read: the
/// pass reads several windows, and every record comes back exactly, also after a reopen.
#[test]
fn live_records_far_apart_and_in_a_long_run_take_several_reads() {
    common::run(|dir| async move {
        let mut c = cfg(&dir);
        c.segment_bytes = 8 << 20;
        const N: usize = 7000;
        // Every 100th key (about 100 KB apart, past the 64 KiB gap one read spans) and a run of
        // 1,500 (about 1.5 MB, past the 1 MiB one read takes) keep their first record.
        let kept = |i: usize| i.is_multiple_of(100) || (1500..3000).contains(&i);
        let want = |i: usize| value(i, if kept(i) { 1 } else { 2 });
        let e = Engine::open(c.clone()).await.unwrap();
        for i in 0..N {
            e.put(0, &key(i), &value(i, 1), Durability::Buffered)
                .await
                .unwrap();
        }
        for i in (0..N).filter(|&i| !kept(i)) {
            e.put(0, &key(i), &value(i, 2), Durability::Buffered)
                .await
                .unwrap();
        }
        e.flush().await.unwrap();
        let (before, read) = compact(&e).await;
        assert!(read * 2 < before, "read {read} of {before}");
        let check = |e: Engine, when: &'static str| async move {
            for i in 0..N {
                let got = e.get(0, &key(i)).await.unwrap();
                assert_eq!(got.as_deref(), Some(&want(i)[..]), "key {i} {when}");
            }
            e.close().await.unwrap();
        };
        check(e, "after the pass").await;
        check(Engine::open(c).await.unwrap(), "after a reopen").await;
    });
}

#[test]
fn values_moved_by_compaction_stay_cached() {
    common::run(|dir| async move {
        let mut c = cfg(&dir);
        // Room for every key: writes cache what they write.
        c.cache_bytes = 8 << 20;
        let e = Engine::open(c).await.unwrap();
        fill(&e).await;
        let kept = || KEYS - KEPT..KEYS;
        let read_kept = || async {
            for i in kept() {
                let got = e.get(0, &key(i)).await.unwrap();
                assert_eq!(got.as_deref(), Some(&expected(i)[..]), "key {i}");
            }
            e.stats()
        };
        let before = e.stats();
        let cached = read_kept().await;
        assert_eq!(
            (cached.cache_hits - before.cache_hits, cached.disk_reads),
            (KEPT as u64, before.disk_reads),
            "the kept keys are cached before the pass"
        );
        let r = e.compact().await.unwrap();
        assert!(r.records_copied >= KEPT as u64, "{r:?}");
        let after = read_kept().await;
        assert_eq!(
            (after.cache_hits - cached.cache_hits, after.disk_reads),
            (KEPT as u64, cached.disk_reads),
            "every moved value is read from the cache, none from the disk"
        );
        // A write after the move replaces the value the entry followed with.
        let last = KEYS - 1;
        e.put(0, &key(last), &value(last, 3), Durability::Buffered)
            .await
            .unwrap();
        let got = e.get(0, &key(last)).await.unwrap();
        assert_eq!(got.as_deref(), Some(&value(last, 3)[..]));
        e.close().await.unwrap();
    });
}
