//! Fault seam: IO errors injected through [`FaultPlan`] must reach the writers as errors, make the
//! store refuse further work (an fsync error is fatal), and lose no acknowledged write across the
//! reopen that follows.
//!
//! The sweep arms a failure at the n-th log write or log sync for a range of n, with four
//! concurrent `Sync` writers whose values are big enough to roll segments. A sync fails either
//! instead of the syscall or after it really ran ([`SyncFailure`]): the data being durable does
//! not make the error any less fatal, because the engine cannot know which case it is in.
//! Failures of the background IO classes (hint files, preparing the next segment file, zeros
//! written ahead of the log's tail) must not be fatal: no writer sees an error and the failure
//! is counted; a hint file whose write or sync failed is not trusted at the next open (its
//! segment is scanned). After each case the store is reopened without faults and every
//! acknowledged put must read back exactly, every put that failed must read back exactly or not
//! at all.
//!
//! A second sweep fails, one case each, every sync of a compaction pass (output file creation,
//! output, intent, intent directory, deletions), before and after the syscall, while `Sync`
//! writers run: the pass must fail, the writers with it, and the reopened store must hold every
//! acknowledged write and no deleted key.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use ringkv_engine::record::record_len;
use ringkv_engine::{
    Durability, Engine, EngineError, FaultPlan, IoClass, RecoveryReport, SyncFailure,
};

const BOTH: [SyncFailure; 2] = [SyncFailure::BeforeSyscall, SyncFailure::AfterSyscall];

fn value(w: usize, i: usize) -> Vec<u8> {
    let len = 2000 + (w * 7919 + i * 104_729) % 30_000;
    (0..len).map(|j| (j + w * 31 + i * 7) as u8).collect()
}

/// Small values for the writers that run during a compaction pass, so they never roll a segment
/// and the pass takes the same inputs in every case.
fn small_value(w: usize, i: usize) -> Vec<u8> {
    format!("{w}:{i}:")
        .bytes()
        .cycle()
        .take(100 + i % 50)
        .collect()
}

fn key(w: usize, i: usize) -> Vec<u8> {
    format!("w{w}-{i:05}").into_bytes()
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Write(IoClass, u64),
    Sync(IoClass, u64, SyncFailure),
}

/// What one case of the write sweep saw.
struct Outcome {
    /// Writers that saw an error.
    writers_failed: usize,
    /// The engine's stats before closing.
    stats: ringkv_engine::EngineStats,
    /// What the reopen without faults found.
    reopened: RecoveryReport,
}

/// Runs one case of the write sweep.
async fn case(dir: std::path::PathBuf, fault: Fault) -> Outcome {
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
        Fault::Sync(class, n, when) => plan.fail_sync_after(class, n, when),
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
            Fault::Write(IoClass::Hint, _) | Fault::Sync(IoClass::Hint, ..) => {
                stats.hint_write_failures > 0
            }
            Fault::Sync(IoClass::Spare, ..) => stats.segment_prepare_failures > 0,
            Fault::Write(IoClass::Ahead, _) => stats.zero_write_failures > 0,
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
    let reopened = e.recovery_report().clone();
    let outcome = outcome.borrow().clone();
    for (&(w, i), &acked) in outcome.iter() {
        let got = e.get(0, &key(w, i)).await.unwrap();
        match got {
            Some(v) => assert_eq!(&v[..], &value(w, i)[..], "{fault:?}: {w}/{i} half-visible"),
            None => assert!(!acked, "{fault:?}: acknowledged write {w}/{i} lost"),
        }
    }
    e.close().await.unwrap();
    Outcome {
        writers_failed,
        stats,
        reopened,
    }
}

#[test]
fn injected_write_and_sync_errors_lose_no_acknowledged_write() {
    common::run(|dir| async move {
        // The foreground path: every failure reaches a writer and is fatal, whether or not the
        // failed sync made the data durable.
        for n in 0..24 {
            let faults = [
                Fault::Write(IoClass::Log, n),
                Fault::Sync(IoClass::Log, n, SyncFailure::BeforeSyscall),
                Fault::Sync(IoClass::Log, n, SyncFailure::AfterSyscall),
            ];
            for fault in faults {
                let o = case(dir.join("store"), fault).await;
                assert!(
                    o.writers_failed > 0,
                    "{fault:?}: the failure must reach a writer"
                );
            }
        }
        // Background IO: failures are counted, never surfaced to writers. Four writers of 60
        // values of 2-32 KiB fill several 1 MiB segments, so hints and spares are written.
        for n in 0..3 {
            let hint_faults = [
                Fault::Write(IoClass::Hint, n),
                Fault::Sync(IoClass::Hint, n, SyncFailure::BeforeSyscall),
                Fault::Sync(IoClass::Hint, n, SyncFailure::AfterSyscall),
            ];
            for fault in hint_faults {
                let o = case(dir.join("store"), fault).await;
                assert_eq!(o.writers_failed, 0, "{fault:?}");
                assert_eq!(o.stats.hint_write_failures, 1, "{fault:?}");
                // The failed hint file's state on disk is unknown: it is not used, its segment
                // (and only it: close wrote the last segment's hint) is scanned.
                assert_eq!(o.reopened.segments_scanned, 1, "{fault:?}");
            }
            for when in BOTH {
                let fault = Fault::Sync(IoClass::Spare, n, when);
                let o = case(dir.join("store"), fault).await;
                assert_eq!(o.writers_failed, 0, "{fault:?}");
                assert_eq!(o.stats.segment_prepare_failures, 1, "{fault:?}");
                assert_eq!(o.reopened.segments_scanned, 0, "{fault:?}");
            }
            // A zero write ahead of the log's tail: that segment's group commits grow the file
            // instead, and the zeros already written read as its unwritten end.
            let fault = Fault::Write(IoClass::Ahead, n);
            let o = case(dir.join("store"), fault).await;
            assert_eq!(o.writers_failed, 0, "{fault:?}");
            assert_eq!(o.stats.zero_write_failures, 1, "{fault:?}");
            assert!(
                o.stats.zeroed_bytes > 0,
                "{fault:?}: other segments are zeroed ahead"
            );
            assert_eq!(o.reopened.segments_scanned, 0, "{fault:?}");
            assert!(o.reopened.torn_tails.is_empty(), "{fault:?}");
        }
    });
}

/// Partition of the data compaction rewrites in the compaction sweep.
const COMPACTED: u32 = 1;
/// Partition of the writers running during the pass.
const WRITTEN: u32 = 2;
const COMPACTION_WRITERS: usize = 2;
/// Bound on the puts of one writer during one pass (it stops at its first error before that).
const WRITER_PUTS_MAX: usize = 100_000;

/// Fills partition [`COMPACTED`] with puts, overwrites and deletes spread over several segments
/// (all made durable), so a pass takes two or more of them, copies live records into outputs and
/// reaps tombstones. Returns what every key must read back as.
async fn compaction_workload(e: &Engine) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
    // About 1 MiB of values fills the first segment; the deletes and two rounds of overwrites
    // leave it and the second one mostly garbage and roll a third, which stays out of the pass,
    // so the tombstones (whose older values are in the first) are reaped.
    const KEYS: usize = 60;
    let mut model = BTreeMap::new();
    for i in 0..KEYS {
        e.put(COMPACTED, &key(0, i), &value(0, i), Durability::Buffered)
            .await
            .unwrap();
        model.insert(key(0, i), Some(value(0, i)));
    }
    for i in (0..KEYS).step_by(3) {
        assert!(
            e.delete(COMPACTED, &key(0, i), Durability::Buffered)
                .await
                .unwrap()
        );
        model.insert(key(0, i), None);
    }
    for round in 1..3 {
        for i in (0..KEYS).filter(|i| i % 3 != 0) {
            e.put(
                COMPACTED,
                &key(0, i),
                &value(round, i),
                Durability::Buffered,
            )
            .await
            .unwrap();
            model.insert(key(0, i), Some(value(round, i)));
        }
    }
    e.flush().await.unwrap();
    model
}

/// What one case of the compaction sweep saw.
struct PassOutcome {
    pass: Result<ringkv_engine::CompactionReport, EngineError>,
    /// Per writer: the outcome of its last put.
    writers_last: Vec<Result<(), EngineError>>,
    stats: ringkv_engine::EngineStats,
    reopened: RecoveryReport,
    /// Syncs of class `Compaction` the pass issued.
    compaction_syncs: u64,
}

/// Runs the compaction workload, arms `fault` (if any), runs one pass while `Sync` writers run,
/// and checks the reopened store against the model.
async fn compaction_case(dir: std::path::PathBuf, fault: Option<Fault>) -> PassOutcome {
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = common::config(&dir);
    let plan = FaultPlan::new();
    let e = Rc::new(
        Engine::open_with_faults(cfg.clone(), plan.clone())
            .await
            .unwrap(),
    );
    let model = compaction_workload(&e).await;
    // The sealed segments' hint files are written in the background; wait (bounded) until each
    // has had its sync, so an armed hint failure hits the pass's output.
    let mut caught_up = false;
    for _ in 0..10_000 {
        if plan.syncs(IoClass::Hint) + 1 >= e.stats().segments {
            caught_up = true;
            break;
        }
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Otherwise an armed hint failure would hit a log segment's hint, and the case would
    // test something else while its assertions still passed.
    assert!(
        caught_up,
        "the sealed segments' hint files were never synced"
    );
    let syncs_before = plan.syncs(IoClass::Compaction);
    match fault {
        Some(Fault::Write(class, n)) => plan.fail_write_after(class, n),
        Some(Fault::Sync(class, n, when)) => plan.fail_sync_after(class, n, when),
        None => {}
    }
    // Per key of the writers: whether its put was acknowledged.
    let acked: Rc<RefCell<BTreeMap<(usize, usize), bool>>> = Rc::default();
    let stop = Rc::new(Cell::new(false));
    let writers: Vec<_> = (0..COMPACTION_WRITERS)
        .map(|w| {
            let (e, acked, stop) = (e.clone(), acked.clone(), stop.clone());
            glommio::spawn_local(async move {
                let mut last = Ok(());
                for i in 0..WRITER_PUTS_MAX {
                    if stop.get() {
                        break;
                    }
                    let k = key(10 + w, i);
                    last = e
                        .put(WRITTEN, &k, &small_value(10 + w, i), Durability::Sync)
                        .await;
                    acked.borrow_mut().insert((10 + w, i), last.is_ok());
                    if last.is_err() {
                        break;
                    }
                }
                last
            })
        })
        .collect();
    let pass = e.compact().await;
    let compaction_syncs = plan.syncs(IoClass::Compaction) - syncs_before;
    // A pass that failed has failed the store: the writers end at their next put, with an
    // error. One that succeeded lets them stop.
    if pass.is_ok() {
        stop.set(true);
    }
    let mut writers_last = Vec::new();
    for w in writers {
        writers_last.push(w.await);
    }
    let stats = e.stats();
    if pass.is_err() {
        assert!(matches!(
            e.put(0, b"after", b"x", Durability::Buffered).await,
            Err(EngineError::Failed(_))
        ));
        assert!(matches!(
            e.get(COMPACTED, &key(0, 1)).await,
            Err(EngineError::Failed(_))
        ));
    }
    let e = Rc::try_unwrap(e).ok().unwrap();
    assert_eq!(e.close().await.is_err(), pass.is_err(), "{fault:?}: close");

    let e = Engine::open(cfg).await.unwrap();
    let reopened = e.recovery_report().clone();
    let acked = acked.borrow().clone();
    check_compacted(&e, &model, &acked, fault).await;
    // The leftovers of a failed pass (outputs beside their inputs, or an intent) compact away
    // without changing anything.
    for _ in 0..16 {
        if e.compact().await.unwrap().segments_compacted == 0 {
            break;
        }
    }
    check_compacted(&e, &model, &acked, fault).await;
    e.close().await.unwrap();
    PassOutcome {
        pass,
        writers_last,
        stats,
        reopened,
        compaction_syncs,
    }
}

/// Every key of the workload reads back as the model says, every acknowledged put of the writers
/// exactly, every failed one exactly or not at all; no other key is live in those partitions, and
/// the live bytes the index keeps add up to exactly those records (nothing counted twice).
async fn check_compacted(
    e: &Engine,
    model: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    acked: &BTreeMap<(usize, usize), bool>,
    fault: Option<Fault>,
) {
    let mut live_bytes = 0u64;
    let mut live_keys = 0usize;
    for (k, want) in model {
        let got = e.get(COMPACTED, k).await.unwrap();
        assert_eq!(
            got.as_deref(),
            want.as_deref(),
            "{fault:?}: key {} of the compacted partition",
            String::from_utf8_lossy(k)
        );
        if let Some(v) = want {
            live_bytes += record_len(k.len(), v.len()) as u64;
            live_keys += 1;
        }
    }
    let mut written_bytes = 0u64;
    let mut written_keys = 0usize;
    for (&(w, i), &ok) in acked {
        match e.get(WRITTEN, &key(w, i)).await.unwrap() {
            Some(v) => {
                assert_eq!(
                    &v[..],
                    &small_value(w, i)[..],
                    "{fault:?}: {w}/{i} half-visible"
                );
                written_bytes += record_len(key(w, i).len(), v.len()) as u64;
                written_keys += 1;
            }
            None => assert!(!ok, "{fault:?}: acknowledged write {w}/{i} lost"),
        }
    }
    for (p, keys) in [(COMPACTED, live_keys), (WRITTEN, written_keys)] {
        let mut it = e.iter_partition(p);
        let mut n = 0;
        while let Some(item) = it.next().await {
            item.unwrap();
            n += 1;
        }
        assert_eq!(n, keys, "{fault:?}: live keys of partition {p}");
    }
    let per_partition: BTreeMap<u32, u64> = e.partition_live_bytes().into_iter().collect();
    assert_eq!(
        per_partition.get(&COMPACTED).copied().unwrap_or(0),
        live_bytes,
        "{fault:?}: live bytes of the compacted partition"
    );
    assert_eq!(
        per_partition.get(&WRITTEN).copied().unwrap_or(0),
        written_bytes,
        "{fault:?}: live bytes of the written partition"
    );
}

/// Any failed sync of a compaction pass is fatal, before or after the syscall, at every sync the
/// pass issues; a failed sync of an output's hint file is not.
#[test]
fn compaction_sync_failures_are_fatal_and_lose_nothing() {
    common::run(|dir| async move {
        // An unfaulted pass, to learn how many syncs a pass issues.
        let dry = compaction_case(dir.join("store"), None).await;
        let report = dry.pass.unwrap();
        assert!(report.segments_compacted >= 2, "{report:?}");
        assert!(report.tombstones_reaped > 0, "{report:?}");
        // Per output: its file's directory entry and its data; then the intent, its directory
        // entry and the deletions.
        assert!(dry.compaction_syncs >= 5, "{}", dry.compaction_syncs);
        for n in 0..dry.compaction_syncs {
            for when in BOTH {
                let fault = Some(Fault::Sync(IoClass::Compaction, n, when));
                let o = compaction_case(dir.join("store"), fault).await;
                assert!(
                    matches!(o.pass, Err(EngineError::Io { .. } | EngineError::Failed(_))),
                    "{fault:?}: a failed sync of compaction must fail the pass: {:?}",
                    o.pass
                );
                for last in &o.writers_last {
                    assert!(
                        matches!(last, Err(EngineError::Io { .. } | EngineError::Failed(_))),
                        "{fault:?}: a writer ended with {last:?}, not the store's failure"
                    );
                }
            }
        }
        // The output's hint file: counted, survived, and not trusted at the next open (the
        // output is scanned; close wrote the hint of the last log segment).
        for when in BOTH {
            let fault = Some(Fault::Sync(IoClass::Hint, 0, when));
            let o = compaction_case(dir.join("store"), fault).await;
            assert!(o.pass.is_ok(), "{fault:?}: {:?}", o.pass);
            assert!(o.writers_last.iter().all(|r| r.is_ok()), "{fault:?}");
            assert_eq!(o.stats.hint_write_failures, 1, "{fault:?}");
            assert_eq!(o.reopened.segments_scanned, 1, "{fault:?}");
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
