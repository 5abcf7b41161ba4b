//! Fault seam: IO errors injected through [`FaultPlan`] must reach the writers as errors, make the
//! store refuse further work (an fsync error is fatal), and lose no acknowledged write across the
//! reopen that follows.
//!
//! The sweep arms a failure at the n-th log write or log sync for a range of n, with four
//! concurrent `Sync` writers whose values are big enough to roll segments. Failures of the
//! background IO classes (hint files, preparing the next segment file) must not be fatal: no
//! writer sees an error and the failure is counted. After each case the store is reopened without
//! faults and every acknowledged put must read back exactly, every put that failed must read back
//! exactly or not at all.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use ringkv_engine::{Durability, Engine, EngineError, FaultPlan, IoClass};

fn value(w: usize, i: usize) -> Vec<u8> {
    let len = 2000 + (w * 7919 + i * 104_729) % 30_000;
    (0..len).map(|j| (j + w * 31 + i * 7) as u8).collect()
}

fn key(w: usize, i: usize) -> Vec<u8> {
    format!("w{w}-{i:05}").into_bytes()
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Write(IoClass, u64),
    Sync(IoClass, u64),
}

/// Runs one case; returns how many writers saw an error and the engine's stats before closing.
async fn case(dir: std::path::PathBuf, fault: Fault) -> (usize, ringkv_engine::EngineStats) {
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = common::config(&dir);
    let plan = FaultPlan::new();
    let e = Rc::new(
        Engine::open_with_faults(cfg.clone(), plan.clone())
            .await
            .unwrap(),
    );
    match fault {
        Fault::Write(class, n) => plan.fail_write_after(class, n),
        Fault::Sync(class, n) => plan.fail_sync_after(class, n),
    }
    // Per key: Some(true) acknowledged, Some(false) failed (state unknown).
    let outcome: Rc<RefCell<BTreeMap<(usize, usize), bool>>> = Rc::default();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (e, outcome) = (e.clone(), outcome.clone());
        tasks.push(glommio::spawn_local(async move {
            let mut errors = 0;
            for i in 0..60 {
                let r = e.put(0, &key(w, i), &value(w, i), Durability::Sync).await;
                outcome.borrow_mut().insert((w, i), r.is_ok());
                if let Err(err) = r {
                    errors += 1;
                    // The first error is the IO error itself or the fatal state it caused.
                    assert!(
                        matches!(err, EngineError::Io { .. } | EngineError::Failed(_)),
                        "{err}"
                    );
                    break;
                }
            }
            errors
        }));
    }
    let mut writers_failed = 0;
    for t in tasks {
        writers_failed += t.await;
    }
    // Background IO runs on its own schedule: wait (bounded) until the armed failure happened.
    let mut stats = e.stats();
    for _ in 0..10_000 {
        let injected = match fault {
            Fault::Write(IoClass::Hint, _) => stats.hint_write_failures > 0,
            Fault::Sync(IoClass::Spare, _) => stats.segment_prepare_failures > 0,
            _ => true,
        };
        if injected {
            break;
        }
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        stats = e.stats();
    }
    if writers_failed > 0 {
        // Fatal: nothing more is accepted, reads included, until the store is reopened.
        assert!(matches!(
            e.put(0, b"after", b"x", Durability::Buffered).await,
            Err(EngineError::Failed(_))
        ));
        assert!(matches!(
            e.get(0, &key(0, 0)).await,
            Err(EngineError::Failed(_))
        ));
    }
    let e = Rc::try_unwrap(e).ok().unwrap();
    let closed = e.close().await;
    assert_eq!(
        closed.is_err(),
        writers_failed > 0,
        "close reports the failure"
    );

    let e = Engine::open(cfg).await.unwrap();
    let outcome = outcome.borrow().clone();
    for (&(w, i), &acked) in outcome.iter() {
        let got = e.get(0, &key(w, i)).await.unwrap();
        match got {
            Some(v) => assert_eq!(&v[..], &value(w, i)[..], "{fault:?}: {w}/{i} half-visible"),
            None => assert!(!acked, "{fault:?}: acknowledged write {w}/{i} lost"),
        }
    }
    e.close().await.unwrap();
    (writers_failed, stats)
}

#[test]
fn injected_write_and_sync_errors_lose_no_acknowledged_write() {
    common::run(|dir| async move {
        // The foreground path: every failure reaches a writer and is fatal.
        for n in 0..24 {
            for fault in [Fault::Write(IoClass::Log, n), Fault::Sync(IoClass::Log, n)] {
                let (failed, _) = case(dir.join("store"), fault).await;
                assert!(failed > 0, "{fault:?}: the failure must reach a writer");
            }
        }
        // Background IO: failures are counted, never surfaced to writers. Four writers of 60
        // values of 2-32 KiB fill several 1 MiB segments, so hints and spares are written.
        for n in 0..3 {
            let (failed, stats) = case(dir.join("store"), Fault::Write(IoClass::Hint, n)).await;
            assert_eq!(failed, 0, "hint write {n}");
            assert_eq!(stats.hint_write_failures, 1, "hint write {n}");
            let (failed, stats) = case(dir.join("store"), Fault::Sync(IoClass::Spare, n)).await;
            assert_eq!(failed, 0, "spare sync {n}");
            assert_eq!(stats.segment_prepare_failures, 1, "spare sync {n}");
        }
    });
}

#[test]
fn failed_compaction_keeps_every_record() {
    common::run(|dir| async move {
        let cfg = common::config(&dir);
        let plan = FaultPlan::new();
        let e = Engine::open_with_faults(cfg.clone(), plan.clone())
            .await
            .unwrap();
        for round in 0..3 {
            for i in 0..100 {
                e.put(1, &key(round, i), &value(round, i), Durability::Buffered)
                    .await
                    .unwrap();
                e.put(1, &key(9, i), &value(round, i), Durability::Buffered)
                    .await
                    .unwrap();
            }
        }
        e.flush().await.unwrap();
        plan.fail_write_after(IoClass::Compaction, 1);
        let r = e.compact().await;
        assert!(r.is_err(), "the compaction write fails: {r:?}");
        assert!(matches!(
            e.get(1, &key(0, 0)).await,
            Err(EngineError::Failed(_))
        ));
        assert!(e.close().await.is_err(), "close reports the failure");
        let e = Engine::open(cfg).await.unwrap();
        for round in 0..3 {
            for i in 0..100 {
                assert_eq!(
                    &e.get(1, &key(round, i)).await.unwrap().unwrap()[..],
                    &value(round, i)[..]
                );
                assert_eq!(
                    &e.get(1, &key(9, i)).await.unwrap().unwrap()[..],
                    &value(2, i)[..]
                );
            }
        }
        e.close().await.unwrap();
    });
}
