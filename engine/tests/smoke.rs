//! Basic behaviour of one engine: put/get/delete, limits, restart, compaction, partitions.
#![allow(clippy::unwrap_used)]

mod common;

use ringkv_engine::{Durability, Engine, EngineError};

#[test]
fn put_get_delete_restart_compact() {
    common::run(|dir| async move {
        let cfg = common::config(&dir);
        let e = Engine::open(cfg.clone()).await.unwrap();
        for i in 0..1000u32 {
            let d = if i % 2 == 0 {
                Durability::Sync
            } else {
                Durability::Buffered
            };
            e.put(
                i % 4,
                format!("k{i}").as_bytes(),
                format!("v{i}").as_bytes(),
                d,
            )
            .await
            .unwrap();
        }
        assert_eq!(e.get(1, b"k1").await.unwrap().unwrap(), &b"v1"[..]);
        assert_eq!(
            e.get(2, b"k1").await.unwrap(),
            None,
            "partitions are separate namespaces"
        );
        assert!(e.delete(1, b"k1", Durability::Sync).await.unwrap());
        assert!(!e.delete(1, b"k1", Durability::Sync).await.unwrap());
        assert_eq!(e.get(1, b"k1").await.unwrap(), None);
        let too_long = vec![0u8; 1025];
        assert!(matches!(
            e.put(0, &too_long, b"x", Durability::Sync).await,
            Err(EngineError::KeyTooLarge {
                len: 1025,
                max: 1024
            })
        ));
        let big = vec![0u8; (64 << 10) + 1];
        assert!(matches!(
            e.put(0, b"k", &big, Durability::Sync).await,
            Err(EngineError::ValueTooLarge { .. })
        ));
        // Overwrite everything twice so older segments become garbage.
        for round in 0..2 {
            for i in 0..1000u32 {
                e.put(
                    i % 4,
                    format!("k{i}").as_bytes(),
                    format!("v{i}-{round}").as_bytes(),
                    Durability::Buffered,
                )
                .await
                .unwrap();
            }
        }
        e.close().await.unwrap();

        let e = Engine::open(cfg.clone()).await.unwrap();
        assert_eq!(
            e.get(1, b"k1").await.unwrap(),
            Some(bytes::Bytes::from_static(b"v1-1"))
        );
        assert_eq!(e.get(3, b"k999").await.unwrap().unwrap(), &b"v999-1"[..]);
        assert!(matches!(
            Engine::open(cfg.clone()).await,
            Err(EngineError::Locked(_))
        ));
        let r = e.compact().await.unwrap();
        assert!(r.segments_compacted > 0, "{r:?}");
        for i in (0..1000u32).step_by(37) {
            let want = format!("v{i}-1");
            assert_eq!(
                e.get(i % 4, format!("k{i}").as_bytes())
                    .await
                    .unwrap()
                    .unwrap(),
                want.as_bytes()
            );
        }
        let mut it = e.iter_partition(2);
        let mut n = 0;
        while let Some(kv) = it.next().await {
            let (k, v) = kv.unwrap();
            assert_eq!(
                format!("{}-1", String::from_utf8(k).unwrap().replace('k', "v")).as_bytes(),
                &v[..]
            );
            n += 1;
        }
        assert_eq!(n, 250);
        // Paged in pages of 16 from the last fingerprint: every key once, in order.
        let mut seen = std::collections::BTreeSet::new();
        let mut after = None;
        loop {
            let mut it = e.iter_partition_after(2, after);
            let mut page = 0;
            while page < 16
                && let Some(kv) = it.next_entry().await
            {
                let (kh, k, _) = kv.unwrap();
                assert!(after.is_none_or(|a| kh > a), "pages move forward");
                assert!(seen.insert(k), "a key appears once");
                after = Some(kh);
                page += 1;
            }
            if page < 16 {
                break;
            }
        }
        assert_eq!(seen.len(), 250);
        e.drop_partition(2, Durability::Sync).await.unwrap();
        assert_eq!(e.get(2, b"k2").await.unwrap(), None);
        e.close().await.unwrap();
        let e = Engine::open(cfg).await.unwrap();
        assert_eq!(
            e.get(2, b"k2").await.unwrap(),
            None,
            "a dropped partition stays dropped"
        );
        assert_eq!(e.get(3, b"k3").await.unwrap().unwrap(), &b"v3-1"[..]);
        e.close().await.unwrap();
    });
}

/// Every open starts a new segment; compaction must merge the small ones a restart-happy store
/// leaves behind even though none of them holds garbage.
#[test]
fn small_segments_from_restarts_are_merged() {
    common::run(|dir| async move {
        let cfg = common::config(&dir);
        for round in 0..6u32 {
            let e = Engine::open(cfg.clone()).await.unwrap();
            for i in 0..20u32 {
                e.put(
                    0,
                    format!("r{round}k{i}").as_bytes(),
                    b"value",
                    Durability::Buffered,
                )
                .await
                .unwrap();
            }
            e.close().await.unwrap();
        }
        let e = Engine::open(cfg.clone()).await.unwrap();
        assert_eq!(e.stats().segments, 6);
        while e.compact().await.unwrap().segments_compacted > 0 {}
        assert_eq!(e.stats().segments, 1, "all small segments merged into one");
        for round in 0..6u32 {
            for i in 0..20u32 {
                let v = e.get(0, format!("r{round}k{i}").as_bytes()).await.unwrap();
                assert_eq!(v.as_deref(), Some(&b"value"[..]));
            }
        }
        e.close().await.unwrap();
    });
}

/// A data directory given as a relative path works like an absolute one.
#[test]
fn relative_data_dir() {
    common::run(|dir| async move {
        let cwd = std::env::current_dir().unwrap();
        let rel = pathdiff(&dir, &cwd);
        assert!(rel.is_relative());
        let mut cfg = common::config(&rel);
        cfg.dir = rel.join("store");
        let e = Engine::open(cfg.clone()).await.unwrap();
        e.put(0, b"k", b"v", Durability::Sync).await.unwrap();
        e.close().await.unwrap();
        let e = Engine::open(cfg).await.unwrap();
        assert_eq!(e.get(0, b"k").await.unwrap().as_deref(), Some(&b"v"[..]));
        e.close().await.unwrap();
    });
}

/// `path` relative to `base` (both absolute), with `..` steps as needed.
fn pathdiff(path: &std::path::Path, base: &std::path::Path) -> std::path::PathBuf {
    let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = std::path::PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out
}

/// A hint file larger than one write chunk (1 MiB) is written piece by piece; it must still be
/// one valid hint that the next open loads instead of scanning.
#[test]
fn large_hint_file_is_written_in_chunks_and_loaded() {
    common::run(|dir| async move {
        let mut cfg = common::config(&dir);
        cfg.segment_bytes = 16 << 20;
        let e = Engine::open(cfg.clone()).await.unwrap();
        for i in 0..100_000u32 {
            e.put(i % 8, &i.to_le_bytes(), b"v", Durability::Buffered)
                .await
                .unwrap();
        }
        e.close().await.unwrap();
        let hint_bytes: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|d| d.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "hint"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert!(
            hint_bytes > 3 << 20,
            "the hint spans several chunks ({hint_bytes} bytes)"
        );
        let e = Engine::open(cfg).await.unwrap();
        let r = e.recovery_report();
        assert_eq!((r.segments_from_hints, r.segments_scanned), (1, 0));
        assert_eq!(r.index_entries, 100_000);
        for i in (0..100_000u32).step_by(997) {
            assert_eq!(
                e.get(i % 8, &i.to_le_bytes()).await.unwrap().as_deref(),
                Some(&b"v"[..])
            );
        }
        e.close().await.unwrap();
    });
}

/// Every group commit is counted in the flush latency histogram, with its time in the sum: each
/// of 20 synced puts made one after the other waits for a group commit of its own.
#[test]
fn group_commits_are_timed() {
    common::run(|dir| async move {
        let e = Engine::open(common::config(&dir)).await.unwrap();
        let before = e.stats();
        for i in 0..20u32 {
            e.put(0, format!("k{i}").as_bytes(), b"v", Durability::Sync)
                .await
                .unwrap();
        }
        let after = e.stats();
        assert!(
            after.flushes >= before.flushes + 20,
            "20 synced puts, {} group commits counted",
            after.flushes - before.flushes
        );
        assert!(after.flush_latency_sum_us > before.flush_latency_sum_us);
        e.close().await.unwrap();
    });
}

/// The open log segment files of this process under `dir`, with their open flags from
/// `/proc/self/fdinfo`.
fn open_segment_flags(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut found = Vec::new();
    for fd in std::fs::read_dir("/proc/self/fd").unwrap() {
        let fd = fd.unwrap();
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue; // closed while we looked
        };
        if !target.starts_with(dir) || target.extension().is_none_or(|e| e != "seg") {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            fd.file_name().to_string_lossy()
        )) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        found.push((target, flags));
    }
    found
}

/// A group commit no longer calls `fdatasync` on the log: it relies on every writable log
/// segment (the active one and the prepared spare) being open with O_DSYNC, so that its writes
/// are durable when they complete. Fails if a log segment is created without it, which would
/// leave "synced" writes in the disk's volatile cache.
#[test]
fn log_segments_are_written_durably() {
    common::run(|dir| async move {
        let e = Engine::open(common::config(&dir)).await.unwrap();
        // Enough to roll a few of its 1 MiB segments, so that spares were prepared and taken.
        for i in 0..400u32 {
            e.put(
                0,
                format!("k{i}").as_bytes(),
                &[7u8; 8 << 10],
                Durability::Sync,
            )
            .await
            .unwrap();
        }
        let writable: Vec<_> = open_segment_flags(&dir)
            .into_iter()
            .filter(|(_, flags)| flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32)
            .collect();
        assert!(!writable.is_empty(), "no writable segment open");
        for (path, flags) in &writable {
            assert_ne!(
                flags & libc::O_DSYNC as u32,
                0,
                "{} is open for writing without O_DSYNC (flags {flags:o})",
                path.display()
            );
        }
        e.close().await.unwrap();
    });
}

/// The calls that never wait answer what the waiting ones would, and decline, having done
/// nothing, exactly when a wait is needed: a value only on disk, a write buffer with no room.
#[test]
fn calls_without_a_wait_answer_or_decline() {
    common::run(|dir| async move {
        let mut cfg = common::config(&dir);
        cfg.cache_bytes = 0;
        cfg.write_buffer_bytes_max = 64 << 10;
        let e = Engine::open(cfg).await.unwrap();
        assert_eq!(e.get_now(0, b"absent").unwrap(), Some(None));
        assert_eq!(
            e.put_buffered_now(0, b"k", b"v".to_vec()).unwrap(),
            Some(())
        );
        // With no cache the value is in its segment only: declined, then read by `get`.
        assert_eq!(e.get_now(0, b"k").unwrap(), None);
        assert_eq!(e.get(0, b"k").await.unwrap().as_deref(), Some(&b"v"[..]));
        // Nothing yields between these calls, so nothing flushes: the unflushed tail fills.
        let big = vec![7u8; 30 << 10];
        let mut declined = None;
        for i in 0..8u32 {
            if e.put_buffered_now(0, format!("big{i}").as_bytes(), big.clone())
                .unwrap()
                .is_none()
            {
                declined = Some(format!("big{i}"));
                break;
            }
        }
        let declined = declined.expect("a full write buffer declines a write");
        assert_eq!(e.get(0, declined.as_bytes()).await.unwrap(), None);
        e.put(0, declined.as_bytes(), &big, Durability::Buffered)
            .await
            .unwrap();
        assert_eq!(
            e.get(0, declined.as_bytes()).await.unwrap().as_deref(),
            Some(&big[..])
        );
        e.flush().await.unwrap();
        assert_eq!(e.delete_buffered_now(0, b"k").unwrap(), Some(true));
        assert_eq!(e.delete_buffered_now(0, b"k").unwrap(), Some(false));
        assert_eq!(e.get_now(0, b"k").unwrap(), Some(None));
        let too_long = vec![0u8; 1025];
        assert!(matches!(
            e.put_buffered_now(0, &too_long, b"x".to_vec()),
            Err(EngineError::KeyTooLarge { .. })
        ));
        assert!(matches!(
            e.put_buffered_now(0, b"k", vec![0u8; (64 << 10) + 1]),
            Err(EngineError::ValueTooLarge { .. })
        ));
    });
}

/// A synced put taken without its wait ([`Engine::put_sync_now`]) names the flush that makes it
/// durable: writes made together share one, waiting for it answers an epoch at least as new,
/// and what it covered survives a crash (the engine dropped without closing). A full write
/// buffer declines the put, writing nothing.
#[test]
fn a_synced_put_without_its_wait_names_the_flush_that_makes_it_durable() {
    common::run(|dir| async move {
        let mut cfg = common::config(&dir);
        cfg.write_buffer_bytes_max = 64 << 10;
        let e = Engine::open(cfg.clone()).await.unwrap();
        let first = e
            .put_sync_now(0, b"a", b"1".to_vec())
            .unwrap()
            .expect("room");
        let second = e
            .put_sync_now(0, b"b", b"2".to_vec())
            .unwrap()
            .expect("room");
        assert_eq!(first, second, "writes made together share a flush");
        let reached = e.wait_durable(second).await.unwrap();
        assert!(reached >= second);
        // A full unwritten tail declines, writing nothing.
        let big = vec![7u8; 30 << 10];
        let declined = (0..8u32)
            .find(|i| {
                e.put_sync_now(0, format!("big{i}").as_bytes(), big.clone())
                    .unwrap()
                    .is_none()
            })
            .expect("a full write buffer declines a write");
        assert_eq!(
            e.get(0, format!("big{declined}").as_bytes()).await.unwrap(),
            None
        );
        drop(e);
        // The dropped engine's flusher may still hold the directory for its last IO step.
        let e = common::open_after_drop(&cfg).await;
        assert_eq!(e.get(0, b"a").await.unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(e.get(0, b"b").await.unwrap().as_deref(), Some(&b"2"[..]));
        e.close().await.unwrap();
    });
}

/// `prefetch` is a hint and nothing else: over cached keys, keys read from disk, deleted and
/// absent keys, a partition never written and an empty batch, the reads and writes after it
/// answer as they would without it, and the cache's counts do not move.
#[test]
fn prefetch_changes_no_answer() {
    common::run(|dir| async move {
        let mut cfg = common::config(&dir);
        // Room for a few values only: most keys are read from disk.
        cfg.cache_bytes = 1024;
        let e = Engine::open(cfg).await.unwrap();
        for i in 0..200u32 {
            let value = format!("v{i}").repeat(10);
            e.put(
                i % 2,
                format!("k{i}").as_bytes(),
                value.as_bytes(),
                Durability::Buffered,
            )
            .await
            .unwrap();
        }
        assert!(e.delete(1, b"k1", Durability::Buffered).await.unwrap());
        let keys: Vec<(u32, Vec<u8>)> = (0..220u32)
            .map(|i| (i % 3, format!("k{i}").into_bytes()))
            .chain([(7, b"k0".to_vec()), (0, Vec::new())])
            .collect();
        e.prefetch(std::iter::empty::<(u32, &[u8])>());
        let before = e.stats();
        e.prefetch(keys.iter().map(|(p, k)| (*p, k.as_slice())));
        let after = e.stats();
        assert_eq!(
            (after.cache_hits, after.gets, after.puts),
            (before.cache_hits, before.gets, before.puts)
        );
        for (p, k) in &keys {
            let i: Option<u32> = std::str::from_utf8(&k[1.min(k.len())..])
                .ok()
                .and_then(|n| n.parse().ok());
            let want = i
                .filter(|&i| i < 200 && i % 2 == *p && (*p, i) != (1, 1))
                .map(|i| format!("v{i}").repeat(10));
            let got = e.get(*p, k).await.unwrap();
            assert_eq!(
                got.as_deref(),
                want.as_deref().map(str::as_bytes),
                "{p} {k:?}"
            );
        }
        // A write of a prefetched key stores the new value.
        e.prefetch([(0, b"k0")]);
        e.put(0, b"k0", b"new", Durability::Buffered).await.unwrap();
        assert_eq!(e.get(0, b"k0").await.unwrap().unwrap(), &b"new"[..]);
    });
}
