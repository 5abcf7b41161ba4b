//! A shard's stop signal: many tasks wait on it, one `cancel` wakes them all, and waiting costs
//! a bounded slot per waiting future however often it is polled.
//!
//! Why not glommio's `CancellationToken`: its `cancelled()` future keeps a clone of the waker
//! of every poll until the token is cancelled, and a dropped future leaves its wakers behind.
//! A connection loop races each read against the node's stop (`unless(read, stop.cancelled())`
//! in `server.rs`), so that token kept one more waker, and one more reference to the
//! connection's task, for every read that waited: memory grew with the requests a node served,
//! for its whole life. Here a waiting [`Cancelled`] holds one slot, updated in place when it is
//! polled again and freed when it is dropped; the slots in use are bounded by the futures
//! waiting at once (a few per connection).
//!
//! The node-wide stop crosses threads as glommio's `ForeignCancellation`;
//! [`StopToken::attached`] turns it into a shard's token with one watching task.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use glommio::sync::ForeignCancellation;

/// A shard-local stop signal; clones share it.
#[derive(Clone, Default)]
pub(crate) struct StopToken(Rc<Inner>);

#[derive(Default)]
struct Inner {
    cancelled: Cell<bool>,
    waiters: RefCell<Slots>,
}

/// The wakers of waiting futures, by slot; freed slots are reused.
#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl StopToken {
    /// A token that is not cancelled.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A token cancelled when `origin` (the node's stop, on another thread) is. Must be called
    /// on a glommio executor: it spawns the watching task.
    pub(crate) fn attached(origin: &ForeignCancellation) -> Self {
        let token = Self::new();
        let watched = origin.attach();
        if watched.is_cancelled() {
            token.cancel();
            return token;
        }
        let to_cancel = token.clone();
        glommio::spawn_local(async move {
            // One future, polled only when woken: glommio's token keeps one waker for it.
            watched.cancelled().await;
            to_cancel.cancel();
        })
        .detach();
        token
    }

    /// Cancels the token and wakes every waiting future; cancelling again does nothing.
    pub(crate) fn cancel(&self) {
        if self.0.cancelled.replace(true) {
            return;
        }
        // Taken out first: a woken task may poll (and drop) a future of this token at once.
        let wakers: Vec<Waker> = {
            let mut slots = self.0.waiters.borrow_mut();
            slots.free.clear();
            slots.wakers.drain(..).flatten().collect()
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Whether the token has been cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.0.cancelled.get()
    }

    /// Completes once the token is cancelled (at once if it already is).
    pub(crate) fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            inner: &self.0,
            slot: None,
        }
    }

    /// Slots in use by waiting futures.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let slots = self.0.waiters.borrow();
        slots.wakers.len() - slots.free.len()
    }
}

/// The future of [`StopToken::cancelled`].
pub(crate) struct Cancelled<'a> {
    inner: &'a Inner,
    /// This future's slot once it has waited.
    slot: Option<usize>,
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.cancelled.get() {
            // The cancel emptied the slots.
            self.slot = None;
            return Poll::Ready(());
        }
        let mut slots = self.inner.waiters.borrow_mut();
        match self.slot {
            Some(i) => {
                let held = &mut slots.wakers[i];
                if !held.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *held = Some(cx.waker().clone());
                }
            }
            None => {
                let waker = Some(cx.waker().clone());
                let i = match slots.free.pop() {
                    Some(i) => {
                        slots.wakers[i] = waker;
                        i
                    }
                    None => {
                        slots.wakers.push(waker);
                        slots.wakers.len() - 1
                    }
                };
                drop(slots);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        let Some(i) = self.slot else {
            return;
        };
        if self.inner.cancelled.get() {
            return;
        }
        let mut slots = self.inner.waiters.borrow_mut();
        debug_assert!(
            slots.wakers[i].is_some(),
            "a waiting future's slot holds its waker"
        );
        slots.wakers[i] = None;
        slots.free.push(i);
    }
}

/// Runs `work` unless `stop` completes first, in which case it answers `None`: how every accept
/// and read loop stops at shutdown, and how a request meets its deadline.
pub(super) async fn unless<T>(
    work: impl std::future::Future<Output = T>,
    stop: impl std::future::Future<Output = ()>,
) -> Option<T> {
    futures_lite::future::or(async { Some(work.await) }, async {
        stop.await;
        None
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(f: &mut Pin<&mut Cancelled<'_>>, waker: &Waker) -> Poll<()> {
        f.as_mut().poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn waiting_holds_one_slot_however_often_it_is_polled() {
        let token = StopToken::new();
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        // A read loop: a new future per read, polled a few times, then dropped.
        for _ in 0..1000 {
            let mut f = std::pin::pin!(token.cancelled());
            for _ in 0..3 {
                assert!(poll(&mut f, &waker).is_pending());
            }
            assert_eq!(token.waiting(), 1);
        }
        assert_eq!(token.waiting(), 0, "dropped futures free their slots");
        let slots = token.0.waiters.borrow().wakers.len();
        assert_eq!(slots, 1, "a freed slot is reused");
        assert_eq!(woken.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn cancel_wakes_every_waiter_once_and_later_futures_complete_at_once() {
        let token = StopToken::new();
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut a = std::pin::pin!(token.cancelled());
        let mut b = std::pin::pin!(token.cancelled());
        assert!(poll(&mut a, &waker).is_pending());
        assert!(poll(&mut b, &waker).is_pending());
        assert!(poll(&mut b, &waker).is_pending());
        assert_eq!(token.waiting(), 2);
        token.clone().cancel();
        token.cancel();
        assert_eq!(woken.0.load(Ordering::SeqCst), 2);
        assert!(token.is_cancelled());
        assert!(poll(&mut a, &waker).is_ready());
        assert!(poll(&mut b, &waker).is_ready());
        let mut late = std::pin::pin!(token.cancelled());
        assert!(poll(&mut late, &waker).is_ready());
    }

    #[test]
    fn a_token_attached_to_a_foreign_stop_is_cancelled_with_it() {
        let origin = glommio::sync::CancellationToken::new();
        let foreign = origin.foreign_child();
        let executor = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let token = StopToken::attached(&foreign);
                token.cancelled().await;
                token.is_cancelled()
            })
            .expect("an executor starts");
        origin.cancel();
        assert!(executor.join().expect("the executor ends"));
    }
}
