//! Model-based property test: random sequences of put / get / delete / drop-partition / compact /
//! clean restart / crash-restart-after-flush run against the engine and against a `BTreeMap`;
//! after every step, and fully after every restart, the engine must agree with the model.
//!
//! The live bytes the engine keeps per partition are checked against a recount of the index
//! entries after every step, so every path that changes an entry (writes, deletes, drops,
//! compaction, recovery) keeps them.
//!
//! Small segments (1 MiB) and values up to 48 KiB make segments roll and compaction find garbage
//! within a few dozen operations, so proptest's shrinking ends at short, readable sequences.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use ringkv_engine::{Durability, Engine};

#[derive(Clone, Debug)]
enum Op {
    Put {
        p: u32,
        k: u8,
        len: usize,
        sync: bool,
    },
    Get {
        p: u32,
        k: u8,
    },
    Delete {
        p: u32,
        k: u8,
    },
    DropPartition {
        p: u32,
    },
    Compact,
    Restart,
    CrashAfterFlush,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0u32..3;
    let k = 0u8..24;
    let len = prop_oneof![0usize..64, 64usize..5000, 20_000usize..48_000];
    prop_oneof![
        30 => (p.clone(), k.clone(), len, any::<bool>()).prop_map(|(p, k, len, sync)| Op::Put { p, k, len, sync }),
        20 => (p.clone(), k.clone()).prop_map(|(p, k)| Op::Get { p, k }),
        10 => (p.clone(), k).prop_map(|(p, k)| Op::Delete { p, k }),
        1 => p.prop_map(|p| Op::DropPartition { p }),
        4 => Just(Op::Compact),
        2 => Just(Op::Restart),
        2 => Just(Op::CrashAfterFlush),
    ]
}

fn key(k: u8) -> Vec<u8> {
    format!("key-{k:03}").into_bytes()
}

fn value(step: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 31 + step as u64 * 7) as u8)
        .collect()
}

async fn check_all(e: &Engine, model: &BTreeMap<(u32, Vec<u8>), Vec<u8>>) {
    for p in 0..3u32 {
        for k in 0..24u8 {
            let got = e.get(p, &key(k)).await.unwrap();
            let want = model.get(&(p, key(k)));
            assert_eq!(
                got.as_deref(),
                want.map(Vec::as_slice),
                "partition {p} key {k}"
            );
        }
        let mut it = e.iter_partition(p);
        let mut n = 0;
        while let Some(kv) = it.next().await {
            let (k, v) = kv.unwrap();
            assert_eq!(model.get(&(p, k)), Some(&v.to_vec()));
            n += 1;
        }
        assert_eq!(n, model.keys().filter(|(mp, _)| *mp == p).count());
    }
    check_live_bytes(e, model);
}

/// The engine's per-partition live bytes equal the sum of its live entries' record lengths, and
/// a partition has some exactly when the model holds a key in it.
fn check_live_bytes(e: &Engine, model: &BTreeMap<(u32, Vec<u8>), Vec<u8>>) {
    let reported: BTreeMap<u32, u64> = e.partition_live_bytes().into_iter().collect();
    for p in 0..3u32 {
        let recount: u64 = e
            .partition_digests(p)
            .iter()
            .filter(|(_, entry)| !entry.tombstone)
            .map(|(_, entry)| u64::from(entry.loc.len))
            .sum();
        assert_eq!(
            reported.get(&p).copied().unwrap_or(0),
            recount,
            "partition {p}"
        );
        let holds = model.keys().any(|(mp, _)| *mp == p);
        assert_eq!(recount > 0, holds, "partition {p}");
    }
}

/// Runs the sequence; returns (compaction passes that rewrote segments, tombstones reaped).
fn run_ops(ops: Vec<Op>) -> (u64, u64) {
    let out = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64)));
    let out2 = out.clone();
    common::run(move |dir| async move {
        let totals = std::cell::Cell::new((0u64, 0u64));
        let add = |e: &Engine| {
            let s = e.stats();
            let (c, r) = totals.get();
            totals.set((c + s.compactions, r + s.tombstones_reaped));
        };
        let mut cfg = common::config(&dir);
        cfg.compaction_garbage_ratio = 0.3;
        let mut e = Engine::open(cfg.clone()).await.unwrap();
        let mut model: BTreeMap<(u32, Vec<u8>), Vec<u8>> = BTreeMap::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Put { p, k, len, sync } => {
                    let v = value(step, len);
                    let d = if sync {
                        Durability::Sync
                    } else {
                        Durability::Buffered
                    };
                    e.put(p, &key(k), &v, d).await.unwrap();
                    model.insert((p, key(k)), v);
                }
                Op::Get { p, k } => {
                    let got = e.get(p, &key(k)).await.unwrap();
                    assert_eq!(
                        got.as_deref(),
                        model.get(&(p, key(k))).map(Vec::as_slice),
                        "step {step}"
                    );
                }
                Op::Delete { p, k } => {
                    let existed = e.delete(p, &key(k), Durability::Buffered).await.unwrap();
                    assert_eq!(existed, model.remove(&(p, key(k))).is_some(), "step {step}");
                }
                Op::DropPartition { p } => {
                    e.drop_partition(p, Durability::Buffered).await.unwrap();
                    model.retain(|(mp, _), _| *mp != p);
                }
                Op::Compact => {
                    e.compact().await.unwrap();
                }
                Op::Restart => {
                    add(&e);
                    e.close().await.unwrap();
                    e = Engine::open(cfg.clone()).await.unwrap();
                    check_all(&e, &model).await;
                }
                Op::CrashAfterFlush => {
                    // Everything is durable, then the engine vanishes without sealing its
                    // active segment: recovery must scan it (no hint file).
                    e.flush().await.unwrap();
                    add(&e);
                    drop(e);
                    e = common::open_after_drop(&cfg).await;
                    assert!(e.recovery_report().corrupt_regions.is_empty());
                    check_all(&e, &model).await;
                }
            }
            check_live_bytes(&e, &model);
        }
        check_all(&e, &model).await;
        e.compact().await.unwrap();
        add(&e);
        e.close().await.unwrap();
        let e = Engine::open(cfg).await.unwrap();
        check_all(&e, &model).await;
        e.close().await.unwrap();
        *out2.lock().unwrap() = totals.get();
    });

    *out.lock().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("RINGKV_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_matches_btreemap_model(ops in proptest::collection::vec(op(), 1..160)) {
        run_ops(ops);
    }
}

/// A fixed sequence that reaps tombstones: a key deleted in an old segment must stay deleted after
/// every segment holding its older values was compacted away and the store restarted.
#[test]
fn deleted_keys_stay_deleted_after_compaction_and_restart() {
    let mut ops = Vec::new();
    for round in 0..6u8 {
        for k in 0..24u8 {
            ops.push(Op::Put {
                p: 0,
                k,
                len: 30_000,
                sync: false,
            });
        }
        for k in (round..24u8).step_by(3) {
            ops.push(Op::Delete { p: 0, k });
        }
        ops.push(Op::Compact);
        ops.push(if round % 2 == 0 {
            Op::Restart
        } else {
            Op::CrashAfterFlush
        });
    }
    // Supersede everything except the last round's tombstones so every older segment turns to
    // garbage, then compact until the tombstones' own segment goes too.
    for k in (0..24u8).filter(|k| k < &5 || (k - 5) % 3 != 0) {
        ops.push(Op::Put {
            p: 0,
            k,
            len: 30_000,
            sync: false,
        });
    }
    for _ in 0..3 {
        for k in 0..24u8 {
            ops.push(Op::Put {
                p: 1,
                k,
                len: 30_000,
                sync: false,
            });
        }
        ops.push(Op::Compact);
        ops.push(Op::Compact);
    }
    ops.push(Op::Restart);
    let (compactions, reaped) = run_ops(ops);
    assert!(compactions > 0, "the sequence must exercise compaction");
    assert!(reaped > 0, "the sequence must exercise tombstone reaping");
}
