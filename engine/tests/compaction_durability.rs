//! Compaction must not make an acknowledged `Sync` operation undone: it leaves a record behind
//! because a newer one superseded it, and that newer one may still be only in memory. If the
//! inputs were deleted before the log is durable, a crash (an engine dropped without `close`) or
//! a failed log write would lose the newer record while the older one is already gone, or
//! resurrect a deleted value. Also: a `Sync` delete of a key whose tombstone is not yet durable
//! must wait for it.
#![allow(clippy::unwrap_used)]

mod common;

use std::rc::Rc;
use std::time::Duration;

use ringkv_engine::{Durability, Engine};

/// A long flush interval keeps `Buffered` writes in memory, widening a window that exists with
/// the default 10 ms interval too.
fn cfg(dir: &std::path::Path) -> ringkv_engine::EngineConfig {
    let mut c = common::config(dir);
    c.flush_interval = Duration::from_secs(10);
    c
}

/// `delete(.., Sync)` of a key whose tombstone is still only in memory answers `Ok(false)` at
/// once, without waiting for that tombstone to be durable. After a crash the key is back,
/// although the caller was told (synchronously) that it is deleted.
#[test]
fn sync_delete_of_key_with_unflushed_tombstone_is_not_durable() {
    common::run(|dir| async move {
        let cfg = cfg(&dir);
        let e = Engine::open(cfg.clone()).await.unwrap();
        e.put(0, b"k", b"v1", Durability::Sync).await.unwrap();
        // Someone else deletes it without waiting (or a concurrent Sync delete still in flight).
        assert!(e.delete(0, b"k", Durability::Buffered).await.unwrap());
        // Our Sync delete is acknowledged...
        assert!(!e.delete(0, b"k", Durability::Sync).await.unwrap());
        // ...then the process dies.
        drop(e);
        let e = common::open_after_drop(&cfg).await;
        assert_eq!(
            e.get(0, b"k").await.unwrap(),
            None,
            "an acknowledged Sync delete was lost across a crash"
        );
        e.close().await.unwrap();
    });
}

/// Writes `n` filler values of 30 KB in partition `p` with key prefix `prefix`.
async fn fill(e: &Engine, p: u32, prefix: &str, n: usize, d: Durability) {
    for i in 0..n {
        e.put(p, format!("{prefix}{i}").as_bytes(), &[7u8; 30_000], d)
            .await
            .unwrap();
    }
}

/// Compaction treats a record as garbage as soon as the index points elsewhere, even when the
/// newer record is still only in memory. It deletes the input file; a crash before the newer
/// record is flushed then loses both versions: an acknowledged Sync put is gone.
#[test]
fn compaction_deletes_acked_value_whose_successor_is_not_durable() {
    common::run(|dir| async move {
        let mut cfg = cfg(&dir);
        cfg.compaction_segments_max = 1;
        let e = Rc::new(Engine::open(cfg.clone()).await.unwrap());
        // Segment A: k=v1 (acked, Sync) plus fillers, all of which are overwritten later.
        e.put(0, b"k", b"v1", Durability::Sync).await.unwrap();
        fill(&e, 1, "a", 40, Durability::Sync).await; // rolls A -> B
        fill(&e, 1, "a", 40, Durability::Sync).await; // A's fillers now garbage
        e.flush().await.unwrap();
        // A new value for k arrives while compaction runs (Buffered: not yet durable).
        let e2 = e.clone();
        let writer = glommio::spawn_local(async move {
            // glommio runs a spawned task at once up to its first await: let the caller enter
            // compact() (whose initial flush would otherwise make v2 durable) first.
            futures_lite::future::yield_now().await;
            e2.put(0, b"k", b"v2", Durability::Buffered).await.unwrap();
        });
        let r = e.compact().await.unwrap();
        writer.await;
        assert!(r.segments_compacted >= 1, "{r:?}");
        // Crash before the flusher writes v2.
        drop(Rc::try_unwrap(e).ok().unwrap());
        let e = common::open_after_drop(&cfg).await;
        let got = e.get(0, b"k").await.unwrap();
        assert!(
            got.as_deref() == Some(&b"v1"[..]) || got.as_deref() == Some(&b"v2"[..]),
            "acknowledged k=v1 lost: got {got:?}"
        );
        e.close().await.unwrap();
    });
}

/// Same window, worse outcome: a Sync-acknowledged delete is undone. k=v1 lives in segment B (not
/// compacted), its tombstone in segment A. A Buffered put of k=v2 arrives during compaction of
/// A, so the tombstone is not copied and A is deleted; a crash loses v2 and k=v1 comes back.
#[test]
fn compaction_resurrects_value_deleted_by_acked_sync_delete() {
    common::run(|dir| async move {
        let mut cfg = cfg(&dir);
        cfg.compaction_segments_max = 1;
        let e = Rc::new(Engine::open(cfg.clone()).await.unwrap());
        e.put(0, b"k", b"v1", Durability::Sync).await.unwrap();
        fill(&e, 1, "b", 40, Durability::Sync).await; // segment 1 full (live) -> segment 2
        assert!(e.delete(0, b"k", Durability::Sync).await.unwrap()); // tombstone in segment 2
        fill(&e, 2, "c", 40, Durability::Sync).await; // segment 2 ... -> segment 3
        fill(&e, 2, "c", 40, Durability::Sync).await; // segment 2's fillers garbage
        e.flush().await.unwrap();
        let e2 = e.clone();
        let writer = glommio::spawn_local(async move {
            futures_lite::future::yield_now().await;
            e2.put(0, b"k", b"v2", Durability::Buffered).await.unwrap();
        });
        let r = e.compact().await.unwrap();
        writer.await;
        assert!(r.segments_compacted >= 1, "{r:?}");
        drop(Rc::try_unwrap(e).ok().unwrap());
        let e = common::open_after_drop(&cfg).await;
        let got = e.get(0, b"k").await.unwrap();
        assert!(
            got.is_none() || got.as_deref() == Some(&b"v2"[..]),
            "a Sync-acknowledged delete was undone: got {got:?}"
        );
        e.close().await.unwrap();
    });
}

/// The same window without simulating a crash by dropping the engine: the flush that would
/// have made k=v2 durable fails (a write error, fatal by design), the store is reopened, and
/// the acknowledged-deleted value k=v1 is back.
#[test]
fn compaction_then_failed_log_write_resurrects_deleted_value() {
    common::run(|dir| async move {
        let mut cfg = cfg(&dir);
        cfg.compaction_segments_max = 1;
        let plan = ringkv_engine::FaultPlan::new();
        let e = Rc::new(
            Engine::open_with_faults(cfg.clone(), plan.clone())
                .await
                .unwrap(),
        );
        e.put(0, b"k", b"v1", Durability::Sync).await.unwrap();
        fill(&e, 1, "b", 40, Durability::Sync).await;
        assert!(e.delete(0, b"k", Durability::Sync).await.unwrap());
        fill(&e, 2, "c", 40, Durability::Sync).await;
        fill(&e, 2, "c", 40, Durability::Sync).await;
        e.flush().await.unwrap();
        let e2 = e.clone();
        let writer = glommio::spawn_local(async move {
            futures_lite::future::yield_now().await;
            e2.put(0, b"k", b"v2", Durability::Buffered).await.unwrap();
        });
        let r = e.compact().await.unwrap();
        writer.await;
        assert!(r.segments_compacted >= 1, "{r:?}");
        // If compaction left k=v2 only in memory, this flush fails and the store reopens
        // from disk; if compaction made it durable first (as it must), there is nothing to fail.
        plan.fail_write_after(ringkv_engine::IoClass::Log, 0);
        let _ = e.flush().await;
        let e = Rc::try_unwrap(e).ok().unwrap();
        let _ = e.close().await;
        let e = Engine::open(cfg).await.unwrap();
        let got = e.get(0, b"k").await.unwrap();
        assert!(
            got.is_none() || got.as_deref() == Some(&b"v2"[..]),
            "a Sync-acknowledged delete was undone: got {got:?}"
        );
        e.close().await.unwrap();
    });
}
