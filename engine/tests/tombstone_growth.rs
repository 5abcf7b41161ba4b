//! Tombstones must not grow with time. The reaping floor is the minimum `created_seqno` over
//! every segment outside a pass, so one cold segment (all live, never over the garbage threshold)
//! would keep every later tombstone in the index and on disk for good; compaction therefore
//! rotates the oldest segments once tombstones exceed 1,024 and 10% of the index. With a
//! constant live set and key churn (insert, delete, new keys) the index stays bounded.
#![allow(clippy::unwrap_used)]

mod common;

use ringkv_engine::{Durability, Engine, EngineStats};

/// `cold` never-touched 30 KB values, then 8 rounds of: 200 keys put and deleted, a hot working
/// set overwritten (rolling segments), compaction until nothing is left to do.
async fn churn(dir: std::path::PathBuf, cold: usize) -> (EngineStats, Vec<u64>) {
    let mut cfg = common::config(&dir);
    cfg.compaction_segments_max = 8;
    let e = Engine::open(cfg).await.unwrap();
    for i in 0..cold {
        e.put(
            9,
            format!("cold{i:03}").as_bytes(),
            &[1u8; 30_000],
            Durability::Buffered,
        )
        .await
        .unwrap();
    }
    let mut entries = Vec::new();
    for round in 0..16u32 {
        for i in 0..200 {
            let key = format!("r{round}-{i}");
            e.put(0, key.as_bytes(), &[2u8; 100], Durability::Buffered)
                .await
                .unwrap();
            assert!(
                e.delete(0, key.as_bytes(), Durability::Buffered)
                    .await
                    .unwrap()
            );
        }
        for i in 0..34 {
            e.put(
                1,
                format!("hot{i:03}").as_bytes(),
                &[3u8; 30_000],
                Durability::Buffered,
            )
            .await
            .unwrap();
        }
        while e.compact().await.unwrap().segments_compacted > 0 {}
        entries.push(e.stats().index_entries);
    }
    let s = e.stats();
    e.close().await.unwrap();
    (s, entries)
}

/// Control: without the cold segment, the churn's tombstones are reaped (this passes).
#[test]
fn control_tombstones_are_reaped_without_a_cold_segment() {
    common::run(|dir| async move {
        let (s, entries) = churn(dir, 0).await;
        assert!(s.index_entries <= 34 + 200, "{entries:?}");
    });
}

/// One full segment of cold data: tombstones still get reaped, and the index stays within the
/// live keys plus the rotation threshold plus one round of churn.
#[test]
fn tombstones_stay_bounded_behind_a_cold_segment() {
    common::run(|dir| async move {
        let (s, entries) = churn(dir, 34).await;
        // Live keys: 34 cold + 34 hot; everything else in the index is a tombstone.
        let bound = 68 + 1024 + 200;
        assert!(
            entries.iter().all(|&n| n <= bound as u64),
            "index grew past {bound}: entries per round {entries:?}"
        );
        assert!(s.tombstones_reaped > 0, "{entries:?}");
    });
}
