//! `Engine::compact()` must be safe to cancel. A pass decides which tombstones to reap as it goes,
//! long before its input files are deleted. If the caller drops the future (a timeout, a
//! `select!`) in between, the index must still hold the tombstones: otherwise a later pass that
//! deletes the tombstone's segment but not the older value's would bring the deleted value back
//! at the next restart. Reaps are applied only once the inputs' deletion is durably decided, and
//! a half-built output is handed back to compaction as garbage. (The non-fatal `TooManySegments`
//! error from `new_segment` mid-pass takes the same path.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringkv_engine::{Durability, Engine};

fn segs(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect()
}

async fn fill_until_roll(e: &Engine, p: u32, prefix: &str) -> Vec<Vec<u8>> {
    let n = e.stats().segments;
    let mut keys = Vec::new();
    for i in 0.. {
        let k = format!("{prefix}{i:03}").into_bytes();
        e.put(p, &k, &[1u8; 30_000], Durability::Sync)
            .await
            .unwrap();
        keys.push(k);
        if e.stats().segments > n {
            return keys;
        }
    }
    unreachable!()
}

#[test]
fn cancelled_compaction_then_next_pass_resurrects_deleted_key() {
    common::run(|dir| async move {
        let mut cfg = common::config(&dir);
        cfg.compaction_garbage_ratio = 0.01;
        cfg.compaction_segments_max = 2;
        let e = Engine::open(cfg.clone()).await.unwrap();
        // B: k=v1 and fillers f.
        e.put(0, b"k", b"v1", Durability::Sync).await.unwrap();
        let f = fill_until_roll(&e, 1, "f").await;
        // A: the tombstone of k, fillers g.
        assert!(e.delete(0, b"k", Durability::Sync).await.unwrap());
        let g = fill_until_roll(&e, 2, "g").await;
        // C: the g's again (A becomes garbage); then a bit of garbage in B.
        for k in &g {
            e.put(2, k, &[2u8; 30_000], Durability::Sync).await.unwrap();
        }
        for k in &f[..3] {
            e.put(1, k, &[2u8; 30_000], Durability::Sync).await.unwrap();
        }
        e.flush().await.unwrap();

        // Pass 1 takes A (reaping k's tombstone in memory) and B; cancel it once its output
        // has data on disk, before the index switch and the deletion of A and B.
        let before = segs(&dir);
        {
            let fut = e.compact();
            futures_lite::pin!(fut);
            let mut cancelled = false;
            for _ in 0..200_000 {
                if let Some(r) = futures_lite::future::poll_once(&mut fut).await {
                    panic!("pass completed before it could be cancelled: {r:?}");
                }
                let new_with_data = segs(&dir)
                    .difference(&before)
                    .any(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false));
                if new_with_data {
                    cancelled = true;
                    break;
                }
                glommio::timer::sleep(Duration::from_micros(50)).await;
            }
            assert!(cancelled);
        } // the compaction future is dropped here
        assert_eq!(e.get(0, b"k").await.unwrap(), None);

        // The g's once more: C turns to garbage. Pass 2 takes C and A (not B).
        for k in &g {
            e.put(2, k, &[3u8; 30_000], Durability::Sync).await.unwrap();
        }
        let r = e.compact().await.unwrap();
        assert_eq!(r.segments_compacted, 2, "{r:?}");
        assert_eq!(e.get(0, b"k").await.unwrap(), None);
        e.close().await.unwrap();

        let e = Engine::open(cfg).await.unwrap();
        let got = e.get(0, b"k").await.unwrap();
        assert_eq!(
            got, None,
            "a Sync-deleted key came back after a cancelled compaction"
        );
        e.close().await.unwrap();
    });
}
