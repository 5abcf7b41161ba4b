//! Fault seam: IO errors injected through [`FaultPlan`] must reach the writers as errors, make the
//! store refuse further work (an fsync error is fatal), and lose no acknowledged write across the
//! reopen that follows.
//!
//! The sweep arms a failure at the n-th write or sync for a range of n, with four concurrent
//! `Sync` writers whose values are big enough to roll segments (so hint-file writes are in the
//! count too: a failed hint write is not fatal, only counted). After each case the store is
//! reopened without faults and every acknowledged put must read back exactly, every put that
//! failed must read back exactly or not at all.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use ringkv_engine::{Durability, Engine, EngineError, FaultPlan};

fn value(w: usize, i: usize) -> Vec<u8> {
    let len = 2000 + (w * 7919 + i * 104_729) % 30_000;
    (0..len).map(|j| (j + w * 31 + i * 7) as u8).collect()
}

fn key(w: usize, i: usize) -> Vec<u8> {
    format!("w{w}-{i:05}").into_bytes()
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Write(u64),
    Sync(u64),
}

/// Runs one case; returns how many writers saw an error and whether a hint write failed.
async fn case(dir: std::path::PathBuf, fault: Fault) -> (usize, u64) {
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = common::config(&dir);
    let plan = FaultPlan::new();
    let e = Rc::new(
        Engine::open_with_faults(cfg.clone(), plan.clone())
            .await
            .unwrap(),
    );
    match fault {
        Fault::Write(n) => plan.fail_write_after(n),
        Fault::Sync(n) => plan.fail_sync_after(n),
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
    let hint_failures = e.stats().hint_write_failures;
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
    (writers_failed, hint_failures)
}

#[test]
fn injected_write_and_sync_errors_lose_no_acknowledged_write() {
    common::run(|dir| async move {
        let mut failed_cases = 0;
        let mut hint_failures = 0;
        for n in 0..36 {
            for fault in [Fault::Write(n), Fault::Sync(n)] {
                let (f, h) = case(dir.join("store"), fault).await;
                failed_cases += (f > 0) as usize;
                hint_failures += h;
            }
        }
        assert!(
            failed_cases >= 50,
            "most cases must hit a writer ({failed_cases})"
        );
        assert!(hint_failures > 0, "some case must hit a hint-file write");
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
        plan.fail_write_after(1);
        let r = e.compact().await;
        assert!(r.is_err(), "the compaction write fails: {r:?}");
        assert!(matches!(
            e.get(1, &key(0, 0)).await,
            Err(EngineError::Failed(_))
        ));
        drop(e);
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
