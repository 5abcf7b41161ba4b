//! What the value cache allocates on the request path:
//! - a read answered from it allocates once: the copy of a small value holds its count, so the
//!   reader's first slice of it (the object decoder's) allocates nothing more. A copy made as a
//!   `Bytes` from a `Vec` allocates its count on the first slice (two allocations per hit); a
//!   hit that shares the cached buffer allocates none, and reads the cached buffer's count, a
//!   cache miss for a key not read lately. Either fails.
//! - for a write that hands its buffer over (`put_buffered_now`, `put_sync_now`) of a key
//!   already cached, the cache allocates nothing: it keeps the buffer instead of a copy (the
//!   segment's memory tail and its hint list still grow now and then).
//!
//! A counting global allocator records the allocations made on the executor's thread.
//!
//! The test binary holds a single test so no other test's allocations can interleave.
#![allow(clippy::unwrap_used)]
// A global allocator can only be written with `unsafe impl GlobalAlloc`; it forwards to `System`.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use ringkv_engine::Engine;

struct Counting;

static COUNT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialised and without a destructor, so reading it inside the allocator never
    // allocates or recurses.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

fn record() {
    if ACTIVE.try_with(Cell::get).unwrap_or(false) {
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made on this thread while `f` runs.
fn allocations<R>(f: impl FnOnce() -> R) -> (R, usize) {
    COUNT.store(0, Ordering::Relaxed);
    ACTIVE.with(|a| a.set(true));
    let r = f();
    ACTIVE.with(|a| a.set(false));
    (r, COUNT.load(Ordering::Relaxed))
}

#[test]
fn cache_hits_allocate_once_and_handed_over_writes_are_not_copied() {
    common::run(|dir| async move {
        let e = Engine::open(common::config(&dir)).await.unwrap();
        // A stored object's size: a 100-byte value and its header. The write admits it into
        // the cache's free room.
        let value: Vec<u8> = (0..130u8).collect();
        let put = |v: &[u8]| {
            let owned = v.to_vec();
            allocations(|| e.put_buffered_now(0, b"key", owned).unwrap())
        };
        let put_sync = |v: &[u8]| {
            let owned = v.to_vec();
            allocations(|| e.put_sync_now(0, b"key", owned).unwrap())
        };
        assert_eq!(put(&value).0, Some(()));
        // Overwrites of the cached key, buffered and synced in turn, kept in place in the
        // cache. The segment's memory tail and its hint list grow now and then (by doubling:
        // at most 14 times over these writes); a copy per write would allocate on every one.
        const OVERWRITES: usize = 64;
        let mut count = 0;
        for round in 0..OVERWRITES {
            let other: Vec<u8> = value.iter().map(|b| b ^ (round as u8 + 1)).collect();
            count += if round % 2 == 0 {
                let (done, n) = put(&other);
                assert_eq!(done, Some(()));
                n
            } else {
                let (epoch, n) = put_sync(&other);
                assert!(epoch.is_some(), "room for a synced write");
                n
            };
        }
        assert!(
            count <= OVERWRITES / 4,
            "{count} allocations for {OVERWRITES} overwrites of a cached key"
        );
        assert_eq!(put(&value).0, Some(()));
        for hit in 0..3 {
            let ((copy, slice), count) = allocations(|| {
                let copy = e.get_now(0, b"key").unwrap().unwrap().unwrap();
                let slice = copy.slice(9..);
                (copy, slice)
            });
            assert_eq!(copy.as_ref(), &value[..], "hit {hit}");
            assert_eq!(slice.as_ref(), &value[9..], "hit {hit}");
            assert_eq!(count, 1, "allocations for hit {hit} and its first slice");
        }
    });
}
