//! The shard's replica store: the core's storage operations and transfer scans run through the
//! replica layout ([`crate::replica`]) onto the shard's engine; the synced writes waiting for
//! their flush; and the hints found in the engine at start, listed for the core.
//!
//! A synced write is appended at once and waits only for its flush epoch ([`Shard::
//! await_durable`]). One watcher per shard ([`run_durable_waits`]) waits for the oldest epoch
//! and, when a flush completes, reports every write it made durable, one after another,
//! stepping aside between them only when the shard's other tasks are due: to the core, or, for a
//! client's write the shard made itself (`Core::local_write`), to the client's ticket. A write
//! waited in a task of its own before: a future, a task and a wakeup each, for writes that a
//! group commit finishes together. A client's request does not wait for the engine's flush
//! itself either: the engine wakes every waiter at every flush, and glommio's timer (the
//! request's deadline) registers itself anew, and stays registered until it expires, each time
//! it is polled while pending, so every wakeup of a request before its own flush left a timer
//! behind (measured: a third of a synced SET's CPU went to scanning them).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Weak;
use std::task::Poll;

use bytes::Bytes;
use ringkv_engine::{Engine, EngineError};

use ringkv_core::coordinator::{ScanPage, StoreKey, StoreOp, hint_bytes};
use ringkv_core::object::Object;
use ringkv_core::ring::PartitionId;

use crate::replica::{self, HINT_PARTITION_BASE};
use crate::route::{PARTITIONS, shard_of};

use ringkv_net::{ErrorCode, Message};

use super::driver::Input;
use super::stop::StopToken;
use super::{Shard, error_message};

/// Every hint stored in the hint partitions of the ring partitions `shard` owns, with the bytes
/// it counts for in the hint store's bound.
pub(super) async fn scan_hints(
    engine: &Engine,
    shard: usize,
    shard_count: usize,
) -> Result<Vec<(StoreKey, u64)>, EngineError> {
    let mut hints = Vec::new();
    for partition in
        (0..PARTITIONS.get()).filter(|p| shard_of(PartitionId(*p), shard_count) == shard)
    {
        let mut keys = engine.iter_partition(HINT_PARTITION_BASE | partition);
        while let Some(item) = keys.next().await {
            let (key, object) = item?;
            match replica::hint_from_engine(partition, &key) {
                Some(hint) => {
                    let bytes = hint_bytes(&hint, object.len());
                    hints.push((hint, bytes));
                }
                None => tracing::warn!(shard, partition, "ignoring a malformed hint key"),
            }
        }
    }
    Ok(hints)
}

impl Shard {
    /// [`store`](Self::store) when the operation needs no wait, else `None` (nothing done).
    pub(super) fn store_now(
        &self,
        key: &StoreKey,
        op: &StoreOp,
    ) -> Option<Result<Option<Object>, String>> {
        replica::apply_now(&self.engine, key, op)
    }

    /// A synced write of the core without its wait: the flush epoch it waits for, else `None`
    /// (nothing done).
    pub(super) fn durable_write_now(
        &self,
        key: &StoreKey,
        op: &StoreOp,
    ) -> Option<Result<u64, String>> {
        replica::durable_write_now(&self.engine, key, op)
    }

    /// Reports `wait` once flush epoch `epoch` is durable.
    pub(super) fn await_durable(&self, epoch: u64, wait: DurableWait) {
        let mut waits = self.durable_waits.borrow_mut();
        assert!(
            waits.back().is_none_or(|&(last, _)| last <= epoch),
            "flush epochs only grow"
        );
        waits.push_back((epoch, wait));
        drop(waits);
        if let Some(watcher) = self.durable_watcher.take() {
            watcher.wake();
        }
    }

    /// The oldest flush epoch a write waits for.
    fn oldest_durable_wait(&self) -> Option<u64> {
        self.durable_waits.borrow().front().map(|&(epoch, _)| epoch)
    }

    /// One storage operation of the core on this shard's engine.
    pub(super) async fn store(
        &self,
        key: &StoreKey,
        op: StoreOp,
    ) -> Result<Option<Object>, String> {
        replica::apply(&self.engine, key, op).await
    }

    /// A page of a partition's replicas for a transfer or handoff.
    pub(super) async fn scan(
        &self,
        partition: u32,
        after: Option<Bytes>,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, String> {
        replica::scan_page(&self.engine, partition, after, max_items, max_bytes).await
    }
}

/// Reports the synced writes of [`Shard::await_durable`] as their flushes complete (module
/// docs), until the shard stops with none left waiting. Runs in the shard's storage gate, so
/// the shard's stop waits for the writes still waiting.
pub(super) async fn run_durable_waits(shard: Weak<Shard>, stop: StopToken) {
    loop {
        let oldest = futures_lite::future::or(
            poll_fn(|cx| {
                let Some(shard) = shard.upgrade() else {
                    return Poll::Ready(None);
                };
                match shard.oldest_durable_wait() {
                    Some(epoch) => Poll::Ready(Some(epoch)),
                    None => {
                        shard.durable_watcher.set(Some(cx.waker().clone()));
                        Poll::Pending
                    }
                }
            }),
            async {
                stop.cancelled().await;
                shard.upgrade().and_then(|s| s.oldest_durable_wait())
            },
        )
        .await;
        let Some(epoch) = oldest else {
            return;
        };
        let Some(shard) = shard.upgrade() else {
            return;
        };
        let durable = replica::PartitionStore::wait_durable(&shard.engine, epoch).await;
        // The writes of one group commit; a large one steps aside between writes when the
        // shard's other tasks are due.
        loop {
            // A statement of its own: the queue's borrow ends here, before the core is fed.
            let next = settled(&mut shard.durable_waits.borrow_mut(), &durable);
            let Some(wait) = next else {
                break;
            };
            match wait {
                DurableWait::Core(id) => {
                    let result = durable.as_ref().map(|_| None).map_err(Clone::clone);
                    // The core may issue more synced writes meanwhile.
                    shard.drive(Input::Stored { id, result });
                }
                DurableWait::Client { ticket, answer } => {
                    shard
                        .clients
                        .answer(ticket, client_answer(&durable, answer));
                }
            }
            glommio::yield_if_needed().await;
        }
    }
}

/// Who waits for a synced write's flush ([`Shard::await_durable`]).
pub(super) enum DurableWait {
    /// Storage operation `id` of the core, reported as its result.
    Core(u64),
    /// A client's write the shard made itself: `answer` goes to the client's `ticket`.
    Client { ticket: u64, answer: Message },
}

/// What a client whose write a flush settled gets: its `answer`, or, if the engine failed, the
/// error the core answers a failed write it coordinates with.
fn client_answer(durable: &Result<u64, String>, answer: Message) -> Message {
    match durable {
        Ok(_) => answer,
        Err(e) => error_message(ErrorCode::Internal, format!("local write failed: {e}")),
    }
}

/// The oldest waiting write that `durable` (the newest durable epoch, or the engine's failure)
/// settles, taken off the queue.
fn settled<T>(waits: &mut VecDeque<(u64, T)>, durable: &Result<u64, String>) -> Option<T> {
    match (waits.front(), durable) {
        (Some(&(epoch, _)), Ok(reached)) if epoch > *reached => None,
        (Some(_), _) => waits.pop_front().map(|(_, id)| id),
        (None, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush settles the writes of its epoch and of earlier ones, in order, and none of a
    /// later epoch; the engine's failure settles (fails) every write still waiting.
    #[test]
    fn a_flush_settles_its_epoch_and_no_later_one() {
        let mut waits = VecDeque::from([(3, 10), (3, 11), (4, 12), (6, 13)]);
        let flushed = Ok(3);
        assert_eq!(settled(&mut waits, &flushed), Some(10));
        assert_eq!(settled(&mut waits, &flushed), Some(11));
        assert_eq!(settled(&mut waits, &flushed), None);
        assert_eq!(settled(&mut waits, &Ok(5)), Some(12));
        assert_eq!(settled(&mut waits, &Ok(5)), None);
        let failed = Err("the disk failed".to_string());
        assert_eq!(settled(&mut waits, &failed), Some(13));
        assert_eq!(settled(&mut waits, &failed), None);
    }

    /// A client's synced write settled by a flush gets its answer; settled by the engine's
    /// failure, an error naming it, never the answer.
    #[test]
    fn a_client_gets_its_answer_only_from_a_flush_that_made_it_durable() {
        let ok = || {
            Message::PutOk(ringkv_net::PutOk {
                context: Bytes::new(),
            })
        };
        assert_eq!(client_answer(&Ok(7), ok()), ok());
        let failed = client_answer(&Err("the disk failed".to_string()), ok());
        match failed {
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::Internal);
                assert!(e.message.contains("the disk failed"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }
}
