//! `Engine::scan_live`: every live record of the chosen partitions, in storage order, compared
//! with a model of what was written; and what it promises while compaction and writers run
//! (module docs of `live_scan.rs`).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use ringkv_engine::{Durability, Engine, LiveScan};

type Model = BTreeMap<(u32, Vec<u8>), Vec<u8>>;

fn key(i: usize) -> Vec<u8> {
    format!("key-{i:06}").into_bytes()
}

fn value(i: usize, round: usize) -> Vec<u8> {
    // Lengths vary, so records of many sizes share windows.
    let len = 50 + (i * 37 + round * 11) % 900;
    vec![(i + round) as u8; len]
}

/// Writes `n` keys over 8 partitions, overwrites a third, deletes a fifth: several segments,
/// garbage between live records, tombstones. Returns what is live.
async fn fill(e: &Engine, n: usize) -> Model {
    let mut model = Model::new();
    for round in 0..2 {
        for i in (0..n).filter(|i| round == 0 || i % 3 == 0) {
            let p = (i % 8) as u32;
            e.put(p, &key(i), &value(i, round), Durability::Buffered)
                .await
                .unwrap();
            model.insert((p, key(i)), value(i, round));
        }
    }
    for i in (0..n).step_by(5) {
        let p = (i % 8) as u32;
        e.delete(p, &key(i), Durability::Buffered).await.unwrap();
        model.remove(&(p, key(i)));
    }
    model
}

/// Every record the scan returns, in order.
async fn drain(scan: &mut LiveScan) -> Vec<(u32, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(batch) = scan.next_batch().await {
        for r in batch.unwrap() {
            out.push((r.partition, r.key, r.value.to_vec()));
        }
    }
    out
}

/// With nothing running beside it, a scan returns exactly the live records of the partitions
/// it was asked for, each once, whether they come from hint-loaded segments, the segment being
/// written (partly still in memory) or both.
#[test]
fn returns_exactly_the_live_records_of_the_chosen_partitions() {
    common::run(|dir| async move {
        let cfg = common::config(&dir);
        let e = Engine::open(cfg.clone()).await.unwrap();
        let mut model = fill(&e, 6_000).await;
        e.close().await.unwrap();
        let e = Engine::open(cfg).await.unwrap();
        assert!(e.stats().segments > 3, "several segments: {:?}", e.stats());
        // Writes after the open: in the new active segment, some only in memory.
        for i in 6_000..6_200 {
            let p = (i % 8) as u32;
            e.put(p, &key(i), &value(i, 0), Durability::Buffered)
                .await
                .unwrap();
            model.insert((p, key(i)), value(i, 0));
        }
        let wanted = |p: u32| p % 2 == 1;
        let got = drain(&mut e.scan_live(wanted)).await;
        let mut seen = Model::new();
        for (p, k, v) in got {
            assert!(seen.insert((p, k), v).is_none(), "a record returned twice");
        }
        let expected: Model = model.into_iter().filter(|((p, _), _)| wanted(*p)).collect();
        assert_eq!(seen.len(), expected.len());
        assert!(seen == expected, "the scan differs from the model");
        e.close().await.unwrap();
    });
}

/// Compaction running between a scan's windows moves records into newer segments and deletes
/// their old ones: the scan still returns every live key, with its value (perhaps twice).
#[test]
fn compaction_during_a_scan_loses_no_key() {
    common::run(|dir| async move {
        let mut cfg = common::config(&dir);
        cfg.compaction_garbage_ratio = 0.1;
        cfg.compaction_segments_max = 64;
        let e = Engine::open(cfg).await.unwrap();
        // More segments than one walk takes, so compaction moves records the scan has not
        // walked yet into segments it did not know of.
        let model = fill(&e, 20_000).await;
        e.flush().await.unwrap();
        assert!(e.stats().segments > 8, "{:?}", e.stats());
        let mut scan = e.scan_live(|_| true);
        let mut seen = Model::new();
        let first = scan.next_batch().await.unwrap().unwrap();
        assert!(!first.is_empty());
        for r in first {
            seen.insert((r.partition, r.key), r.value.to_vec());
        }
        let report = e.compact().await.unwrap();
        assert!(report.segments_compacted > 1, "{report:?}");
        for (p, k, v) in drain(&mut scan).await {
            if let Some(old) = seen.insert((p, k), v.clone()) {
                assert_eq!(old, v, "a key returned twice with different values");
            }
        }
        assert!(seen == model, "a key was lost or changed");
        e.close().await.unwrap();
    });
}

/// Writes between a scan's windows: a key not written is returned with its value; a key
/// written after its segment's walk may come back old, new or not at all (the caller must
/// prefer its own writes), never as something that was never written.
#[test]
fn writes_during_a_scan_leave_other_keys_exact() {
    common::run(|dir| async move {
        let cfg = common::config(&dir);
        let e = Engine::open(cfg).await.unwrap();
        let model = fill(&e, 6_000).await;
        e.flush().await.unwrap();
        let mut scan = e.scan_live(|_| true);
        let mut got: Vec<(u32, Vec<u8>, Vec<u8>)> = Vec::new();
        let first = scan.next_batch().await.unwrap().unwrap();
        got.extend(
            first
                .into_iter()
                .map(|r| (r.partition, r.key, r.value.to_vec())),
        );
        let mut written = BTreeMap::new();
        for i in (1..6_000).step_by(13) {
            let p = (i % 8) as u32;
            e.put(p, &key(i), &value(i, 9), Durability::Buffered)
                .await
                .unwrap();
            written.insert((p, key(i)), value(i, 9));
        }
        got.extend(drain(&mut scan).await);
        let mut seen = Model::new();
        for (p, k, v) in got {
            let id = (p, k);
            match written.get(&id) {
                Some(new) => assert!(
                    Some(&v) == model.get(&id) || &v == new,
                    "a written key came back as neither of its versions"
                ),
                None => assert_eq!(Some(&v), model.get(&id), "an unwritten key changed"),
            }
            seen.insert(id, v);
        }
        for id in model.keys().filter(|id| !written.contains_key(*id)) {
            assert!(seen.contains_key(id), "an unwritten key was not returned");
        }
        e.close().await.unwrap();
    });
}
