//! The value cache must never serve an overwritten value. It validates an entry by its location
//! (segment slot, offset, length), and slots are reused after compaction frees them. A `get`
//! whose disk read overlaps a `put` of the same key must not cache the old value under the old
//! location: once compaction frees that slot and a later output places the key at the same
//! (slot, offset, length), such an entry would be served as a hit. Gets cache only values whose
//! location is still current when the read completes, in the segment they read: a read held on
//! the disk while the slot is freed and reused can find the key's current record at its very
//! location, in the segment that took the slot. (Writes cache a key while the cache has room,
//! so the tests evict the key by a read before the get that must go to the disk.)
#![allow(clippy::unwrap_used)]

mod common;

use ringkv_engine::{Durability, Engine};

/// When the get of k (at slot 0 @48, read from the disk) completes, relative to the rest.
#[derive(Clone, Copy, PartialEq)]
enum GetEnds {
    /// Right after k is overwritten (the new record in slot 1).
    AfterTheWrite,
    /// Only once slot 0 was freed and reused, with k's current record at slot 0 @48 again.
    AfterTheReuse,
}

/// k=v1 read from the disk while it is overwritten with v2 (same length, so same record length),
/// slot 0 is compacted away, and compacting slot 1 places k's current record at slot 0 @48, the
/// location the read read; then k must read v2.
async fn read_across_slot_reuse(dir: std::path::PathBuf, ends: GetEnds) {
    let mut cfg = common::config(&dir);
    cfg.compaction_segments_max = 1;
    cfg.compaction_garbage_ratio = 0.01;
    // Room for k and seven of the fillers below, which writes admit while there is room.
    cfg.cache_bytes = 8 * 30_100;
    let e = Engine::open(cfg.clone()).await.unwrap();
    let v1 = vec![b'1'; 1000];
    let v2 = vec![b'2'; 1000];
    // Segment slot 0: header, then k=v1 at offset 48 (its first record).
    e.put(0, b"k", &v1, Durability::Sync).await.unwrap();
    let filler = |i: usize| format!("f{i}").into_bytes();
    for i in 0..40 {
        e.put(1, &filler(i), &[7u8; 30_000], Durability::Sync)
            .await
            .unwrap();
    }
    assert_eq!(e.stats().segments, 2, "slot 0 sealed, slot 1 active");
    // A read of a filler the full cache does not hold admits it and evicts k, the oldest
    // entry, so the get of k below reads the disk.
    e.get(1, &filler(39)).await.unwrap();

    let reuse_slot_0 = || async {
        // Make slot 0 all garbage, seal slot 1 (the next active segment takes a new slot),
        // then compact slot 0 away: slot 0 goes back to the free list.
        for i in 0..40 {
            e.put(1, &filler(i), &[8u8; 30_000], Durability::Sync)
                .await
                .unwrap();
        }
        e.flush().await.unwrap();
        let r = e.compact().await.unwrap();
        assert_eq!((r.segments_compacted, r.records_copied), (1, 0), "{r:?}");
        // Compact slot 1: its first live record is k (the fillers before it were
        // overwritten), so the output (taking free slot 0) holds k at offset 48 with the same
        // length.
        let r = e.compact().await.unwrap();
        assert_eq!(r.segments_compacted, 1, "{r:?}");
    };
    {
        // A get of k reads the disk (k's block was flushed and trimmed from memory)...
        let get = e.get(0, b"k");
        futures_lite::pin!(get);
        assert!(
            futures_lite::future::poll_once(&mut get).await.is_none(),
            "the get waits for its disk read"
        );
        // ...while k is overwritten.
        e.put(0, b"k", &v2, Durability::Buffered).await.unwrap();
        if ends == GetEnds::AfterTheReuse {
            reuse_slot_0().await;
        }
        // The get answers v1 (fine: it started first), with what it read before the write.
        assert_eq!(get.await.unwrap().as_deref(), Some(&v1[..]));
    }
    if ends == GetEnds::AfterTheWrite {
        reuse_slot_0().await;
    }
    let got = e.get(0, b"k").await.unwrap();
    assert_eq!(
        got.map(|v| (v.len(), v[0])),
        Some((v2.len(), b'2')),
        "stale cached value served for an overwritten key"
    );
    e.close().await.unwrap();
}

#[test]
fn cache_serves_overwritten_value_after_slot_reuse() {
    common::run(|dir| read_across_slot_reuse(dir, GetEnds::AfterTheWrite));
}

/// The get is still on the disk when k's current record sits at slot 0 @48 again, in the output
/// that took the freed slot: the location is current, but it is another record, and the get must
/// not cache its v1 under it.
#[test]
fn a_read_held_across_slot_reuse_caches_nothing() {
    common::run(|dir| read_across_slot_reuse(dir, GetEnds::AfterTheReuse));
}
