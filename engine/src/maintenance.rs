//! Background upkeep of the write path, kept off the flusher so a group commit never waits for it:
//! - finishing sealed segments: writing their hint files;
//! - preparing the next segment file before the active one fills up: created and its directory
//!   entry synced, so the flush that rolls to a new segment does no file creation and no
//!   directory sync (one journal commit fewer in that flush's latency).
//!
//! Zeros ahead of the active segment's tail are written by a task of their own (`ahead.rs`).
//!
//! Measured and rejected: zero-filling the whole prepared file to `segment_bytes` instead. Writing
//! 64 MiB of zeros in the background at every roll competed with foreground syncs on the same
//! disk: sync put throughput at one writer fell from ~6,200 to ~1,300 ops/s (at the time each
//! group commit was a write and an `fdatasync`). See docs/BENCHMARKS.md.
//!
//! `close` removes an unused prepared file; recovery removes one left by a crash (it holds no
//! records). Failures here are not fatal: a file that cannot be prepared is logged and counted,
//! and the flusher then creates the next segment file itself, reporting its own errors.

use std::rc::{Rc, Weak};

use crate::engine::{Inner, Spare, Wake, finish_sealed};
use crate::error::EngineError;
use crate::io::{self, IoClass};
use crate::segment::segment_path;

pub(crate) async fn run(weak: Weak<Inner>, wake: Rc<Wake>) {
    loop {
        {
            let Some(inner) = weak.upgrade() else { return };
            loop {
                let next = {
                    let mut st = inner.st.borrow_mut();
                    let next = st.to_finish.pop_front();
                    st.finishing += next.is_some() as usize;
                    next
                };
                let Some(seg) = next else { break };
                finish_sealed(&inner, &seg).await;
                let mut st = inner.st.borrow_mut();
                st.finishing -= 1;
                // Explicit compactions wait for segments to be finished (see wait_settled).
                for w in std::mem::take(&mut st.waiters) {
                    w.wake();
                }
            }
            let need_spare = {
                let st = inner.st.borrow();
                st.spare.is_none() && !st.closed && st.failed.is_none()
            };
            if need_spare
                && !wake.is_shutdown()
                && let Err(e) = prepare_spare(&inner).await
            {
                let c = &inner.counters;
                c.segment_prepare_failures
                    .set(c.segment_prepare_failures.get() + 1);
                tracing::warn!(error = %e, "could not prepare the next segment file");
            }
            if wake.is_shutdown() && inner.st.borrow().to_finish.is_empty() {
                return;
            }
        }
        wake.wait().await;
    }
}

async fn prepare_spare(inner: &Inner) -> Result<(), EngineError> {
    let id = {
        let mut st = inner.st.borrow_mut();
        let id = st.next_segment_id;
        st.next_segment_id += 1;
        id
    };
    let path = segment_path(&inner.cfg.dir, id);
    // The spare becomes the next log segment, so it is created like one.
    let file = io::create_log(&path).await?;
    if let Err(e) = io::sync_dir(&inner.cfg.dir, &inner.faults, IoClass::Spare).await {
        drop(file);
        let _ = io::remove(&path).await;
        return Err(e);
    }
    inner.st.borrow_mut().spare = Some(Spare {
        id,
        file: Rc::new(file),
    });
    Ok(())
}
