//! Readiness of a shard's accepted sockets, from one edge-triggered epoll set, so that a busy
//! shard reads its connections without the kernel interrupting it once per request.
//!
//! Why not glommio's own socket reads: glommio waits for a socket with a one-shot
//! `IORING_OP_POLL_ADD` per wait (and arms one after every read that did not fill the buffer),
//! and its rings are set up without `IORING_SETUP_COOP_TASKRUN`. The poll's completion then
//! reaches a shard thread that is running with a reschedule interrupt (task work plus an IPI),
//! once per request. Profiled with redis-benchmark at 50 connections on one pinned shard, that
//! interrupt alone was about a fifth of the shard's CPU (docs/BENCHMARKS.md, "Server CPU per
//! request against Redis").
//!
//! Here a socket joins the shard's epoll set once, edge-triggered, when its connection starts.
//! One poller task per shard collects the edges with `epoll_wait(.., 0)` (as an event loop
//! would), records for each socket that an edge came, and wakes the readers they name. A reader
//! tries a non-blocking `recv` and waits only when the socket is empty, with one saving: after a
//! `recv` that returned less than it asked for, the socket is known to be empty (below), and the
//! reader waits for the socket's next edge without a second `recv` that would only answer
//! `EAGAIN`. At one request per round trip, the common case of a client that waits for each
//! answer, that is one system call of three per request (docs/BENCHMARKS.md).
//!
//! Why a short read means an empty socket: a non-blocking TCP `recv` copies until it has what
//! was asked or the receive queue is empty. Segments that arrive during the `recv` wait in the
//! socket's backlog, which the `recv` hands to the receive queue as it releases the socket, and
//! every byte queued after the copy ended comes with a wakeup of the socket: an edge on the epoll
//! set. The poller collects that edge at its next round, so a reader waiting for it loses
//! nothing; an edge of bytes that arrived before the `recv` (collected after it) only costs one
//! `recv` that finds nothing. Two exceptions make every later read of a socket ask:
//! - the end of the stream: a short read returns the bytes before a FIN without reporting it,
//!   and the FIN's edge may have been taken with theirs; so does an error (RST);
//! - urgent data (`MSG_OOB`): a `recv` stops at the urgent mark once it copied anything, with
//!   bytes after the mark still queued and no new edge coming. Its edge carries `EPOLLPRI`.
//!
//! An edge that arrives while its reader is not waiting wakes nobody and is remembered. Between
//! collections the poller waits on the epoll descriptor itself through glommio (one poll for the
//! whole set): glommio submits that poll when it polls its rings between rounds of its task
//! queues, and it completes at once when edges are waiting, so a busy shard collects edges once
//! per executor loop, and an idle one sleeps in the kernel as before. The poller never yields to
//! stay runnable: a queue that never empties keeps glommio from polling its rings, which would
//! hold back the shard's disk I/O, timers and mesh channels until the next preemption.
//!
//! Writes stay with glommio: they are direct `send`s that wait only when the socket buffer is
//! full. Accepts, outbound peer links and the admin listener also keep glommio's reads: they
//! are not per-request paths.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use glommio::io::PollableFd;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{MsgFlags, recv};

use super::stop::{StopToken, unless};

/// Edges taken from the kernel per `epoll_wait`; more stay queued for the next round.
const EVENTS_PER_WAIT: usize = 256;

/// The epoll descriptor, in the form glommio can wait on.
struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// One shard's epoll set and the readers waiting on it.
pub(super) struct Readiness {
    epoll: PollableFd<EpollFd>,
    /// Per registered socket: the waker of its reader while it waits. Indexed by the token the
    /// socket was registered with.
    waiting: RefCell<Slots>,
}

#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    /// Per token: whether an edge was collected since its reader last called `recv`.
    edged: Vec<bool>,
    /// Per token: whether an edge said the peer closed its side, the socket failed or urgent
    /// data came: a short read may then leave something unread with no edge to follow (module
    /// docs), so from then on every read asks.
    ended: Vec<bool>,
    in_use: Vec<bool>,
    free: Vec<usize>,
}

impl Readiness {
    /// An empty set, on the executor that calls this.
    pub(super) fn new() -> io::Result<Rc<Readiness>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let epoll = PollableFd::new(EpollFd(epoll))
            .map_err(|e| io::Error::other(format!("epoll descriptor: {e}")))?;
        Ok(Rc::new(Readiness {
            epoll,
            waiting: RefCell::new(Slots::default()),
        }))
    }

    /// Adds `socket` to the set, for as long as the returned reader lives.
    pub(super) fn register(self: &Rc<Self>, socket: &impl AsRawFd) -> io::Result<SocketReader> {
        let fd = socket.as_raw_fd();
        let token = {
            let mut slots = self.waiting.borrow_mut();
            let token = match slots.free.pop() {
                Some(token) => token,
                None => {
                    slots.wakers.push(None);
                    slots.edged.push(false);
                    slots.ended.push(false);
                    slots.in_use.push(false);
                    slots.wakers.len() - 1
                }
            };
            assert!(!slots.in_use[token], "a free token is not in use");
            slots.in_use[token] = true;
            // A new reader's first step is a `recv`, whatever a closed socket's edges said.
            slots.edged[token] = false;
            slots.ended[token] = false;
            token
        };
        let events = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLPRI
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        let event = EpollEvent::new(events, token as u64);
        if let Err(e) = self.epoll.get_ref().0.add(borrow(socket), event) {
            self.release(token);
            return Err(e.into());
        }
        Ok(SocketReader {
            readiness: self.clone(),
            token,
            fd,
            empty: Cell::new(false),
            recvs: Cell::new(0),
        })
    }

    fn release(&self, token: usize) {
        let mut slots = self.waiting.borrow_mut();
        assert!(slots.in_use[token], "a token is released once");
        slots.in_use[token] = false;
        slots.wakers[token] = None;
        slots.free.push(token);
    }

    /// Collects edges and wakes their readers until `stop` is cancelled (module docs).
    pub(super) async fn run(self: Rc<Self>, stop: StopToken) {
        let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT];
        let mut woken: Vec<Waker> = Vec::new();
        while !stop.is_cancelled() {
            let found = match self.epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                Ok(found) => found,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    // Only a broken descriptor or buffer fails a zero-timeout wait; neither can
                    // come back, and every reader of the shard depends on this loop.
                    tracing::error!(error = %e, "epoll_wait failed; connection reads stop");
                    return;
                }
            };
            {
                let mut slots = self.waiting.borrow_mut();
                // A stale edge of a closed socket whose token was reused wakes a reader that
                // finds its socket empty and waits again.
                let ends = EpollFlags::EPOLLRDHUP
                    | EpollFlags::EPOLLHUP
                    | EpollFlags::EPOLLERR
                    | EpollFlags::EPOLLPRI;
                woken.extend(events[..found].iter().filter_map(|event| {
                    let token = usize::try_from(event.data()).ok()?;
                    *slots.edged.get_mut(token)? = true;
                    if event.events().intersects(ends) {
                        slots.ended[token] = true;
                    }
                    slots.wakers.get_mut(token).and_then(Option::take)
                }));
            }
            // Woken with the table released.
            woken.drain(..).for_each(Waker::wake);
            // Parked until the set is readable, through one glommio poll. The poll is submitted,
            // and its completion seen, only when the executor polls its rings between rounds of
            // its task queues, so this loop runs at most once per executor loop, and never keeps
            // a queue busy (that would hold back every other I/O of the shard).
            match unless(self.epoll.readable(), stop.cancelled()).await {
                None => return,
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::error!(error = %e, "waiting on the epoll set failed; connection reads stop");
                    return;
                }
            }
        }
    }
}

/// Borrows the descriptor of `socket` for as long as `socket` is borrowed.
#[allow(unsafe_code)]
fn borrow(socket: &impl AsRawFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is `socket`'s own, open while `socket` lives, and the borrow cannot
    // outlive the borrow of `socket`.
    unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) }
}

/// The read side of one registered socket; the socket must outlive it.
pub(super) struct SocketReader {
    readiness: Rc<Readiness>,
    token: usize,
    fd: RawFd,
    /// The last `recv` found the socket empty, or emptied it (it read less than it asked for).
    empty: Cell<bool>,
    /// `recv` calls made, for tests.
    recvs: Cell<u64>,
}

impl SocketReader {
    /// Reads what the socket holds into `buf`, waiting for data if it holds none: the bytes
    /// read, 0 at the end of the stream.
    pub(super) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read(cx, buf)).await
    }

    fn poll_read(&self, cx: &Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        {
            let mut slots = self.readiness.waiting.borrow_mut();
            if self.empty.get() && !slots.edged[self.token] && !slots.ended[self.token] {
                // Empty at the last `recv`, and nothing arrived since (module docs): wait for
                // the next edge. The poller runs on this thread, so none slips in meanwhile.
                slots.wakers[self.token] = Some(cx.waker().clone());
                return Poll::Pending;
            }
            // Edges from here on are of bytes this `recv` may not see.
            slots.edged[self.token] = false;
        }
        loop {
            self.recvs.set(self.recvs.get() + 1);
            match recv(self.fd, buf, MsgFlags::MSG_DONTWAIT) {
                Ok(read) => {
                    self.empty.set(read < buf.len());
                    return Poll::Ready(Ok(read));
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    // Empty now; the next edge of this socket wakes this waker.
                    self.empty.set(true);
                    let mut slots = self.readiness.waiting.borrow_mut();
                    slots.wakers[self.token] = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl Drop for SocketReader {
    fn drop(&mut self) {
        // The socket leaves the set by itself when it is closed; removing it here could remove
        // a newer socket that reused a descriptor number closed first. Until then a stale edge
        // wakes whichever reader the token goes to next, which reads, finds nothing and waits.
        self.readiness.release(self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::io::AsyncWriteExt;
    use glommio::LocalExecutorBuilder;
    use glommio::net::{TcpListener, TcpStream};

    /// A read, or a failure saying `what` did not happen: a reader waiting for an edge that
    /// never comes would otherwise hang the test. The bound is far above any read's time.
    async fn read_or_fail(reader: &SocketReader, buf: &mut [u8], what: &str) -> usize {
        futures_lite::future::or(
            async { Some(reader.read(buf).await.expect("read")) },
            async {
                glommio::timer::sleep(std::time::Duration::from_secs(30)).await;
                None
            },
        )
        .await
        .expect(what)
    }

    /// Runs `test` on an executor with a readiness set whose poller runs, and a listener on
    /// loopback; stops the poller after it.
    fn with_poller<F, Fut>(test: F)
    where
        F: FnOnce(Rc<Readiness>, TcpListener) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        LocalExecutorBuilder::default()
            .spawn(|| async move {
                let readiness = Readiness::new().expect("epoll");
                let stop = StopToken::new();
                let poller = glommio::spawn_local(readiness.clone().run(stop.clone()));
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
                test(readiness, listener).await;
                stop.cancel();
                poller.await;
            })
            .expect("executor")
            .join()
            .expect("test executor");
    }

    /// A reader wakes for data that arrives while it waits, for data already there when it
    /// starts, and sees the end of the stream; several sockets share the one poller.
    #[test]
    fn readers_wake_for_data_and_for_the_end_of_the_stream() {
        with_poller(|readiness, listener| async move {
            let addr = listener.local_addr().expect("address");
            let mut clients = Vec::new();
            let mut readers = Vec::new();
            for _ in 0..3 {
                clients.push(TcpStream::connect(addr).await.expect("connect"));
                let accepted = listener.accept().await.expect("accept");
                readers.push((readiness.register(&accepted).expect("register"), accepted));
            }
            // Already there before the first read.
            clients[1].write_all(b"early").await.expect("write");
            let mut buf = [0u8; 16];
            let read = readers[1].0.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..read], b"early");
            // Arrives while the reader waits.
            let mut late = clients.pop().expect("three clients");
            // The writer runs only once this task parks in the read below.
            let writer = glommio::spawn_local(async move {
                late.write_all(b"late").await.expect("write");
                late.close().await.expect("close");
            });
            let read = readers[2].0.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..read], b"late");
            writer.await;
            assert_eq!(readers[2].0.read(&mut buf).await.expect("read"), 0);
            // A closed registration frees its token for the next socket.
            drop(readers.pop());
            assert_eq!(readiness.waiting.borrow().free.len(), 1);
        });
    }

    /// After a read that emptied the socket, a reader waits for the next edge without asking the
    /// kernel again (one `recv` per read, none answering `EAGAIN`), and still gets every byte:
    /// of data that arrives later, of reads that fill the buffer, and of the end of the stream.
    #[test]
    fn a_reader_that_emptied_its_socket_waits_for_an_edge_without_a_recv() {
        with_poller(|readiness, listener| async move {
            let addr = listener.local_addr().expect("address");
            let mut client = TcpStream::connect(addr).await.expect("connect");
            let accepted = listener.accept().await.expect("accept");
            let reader = readiness.register(&accepted).expect("register");
            let mut buf = [0u8; 16];
            // Each message is written once the reader waits for it, so every edge is
            // collected before the `recv` it leads to.
            let mut writes = Vec::new();
            for message in [&b"first"[..], b"second"] {
                let waiting = readiness.clone();
                let token = reader.token;
                let writer = glommio::spawn_local(async move {
                    while waiting.waiting.borrow().wakers[token].is_none() {
                        futures_lite::future::yield_now().await;
                    }
                    client.write_all(message).await.expect("write");
                    client
                });
                let read = reader.read(&mut buf).await.expect("read");
                assert_eq!(&buf[..read], message);
                client = writer.await;
                writes.push(reader.recvs.get());
            }
            // The first read found the socket empty (one `recv` answered EAGAIN); the second
            // knew it was, and waited without asking.
            assert_eq!(writes, [2, 3]);
            // More than one buffer: full reads go on reading, the short last one stops.
            let long: Vec<u8> = (0..40u8).collect();
            client.write_all(&long).await.expect("write");
            client.close().await.expect("close");
            let mut got = Vec::new();
            loop {
                let read = read_or_fail(&reader, &mut buf, "the end of the stream is read").await;
                if read == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..read]);
            }
            assert_eq!(got, long);
        });
    }

    /// Urgent data stops a `recv` at its mark with bytes still queued after it, and no edge
    /// follows for those: the edge that announced the urgent byte (`EPOLLPRI`) makes the reader
    /// ask again, so the bytes after the mark are read. The edge is collected before the first
    /// read, as when a reader is woken by it.
    #[test]
    fn bytes_after_an_urgent_mark_are_read() {
        with_poller(|readiness, listener| async move {
            let addr = listener.local_addr().expect("address");
            // A blocking client: connect completes through the listen backlog.
            let mut client = std::net::TcpStream::connect(addr).expect("connect");
            let accepted = listener.accept().await.expect("accept");
            let reader = readiness.register(&accepted).expect("register");
            use std::io::Write;
            client.write_all(b"first\r\n").expect("write");
            nix::sys::socket::send(
                std::os::fd::AsRawFd::as_raw_fd(&client),
                b"!",
                MsgFlags::MSG_OOB,
            )
            .expect("urgent byte");
            client.write_all(b"second\r\n").expect("write");
            while !readiness.waiting.borrow().edged[reader.token] {
                futures_lite::future::yield_now().await;
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < b"first\r\nsecond\r\n".len() {
                let read =
                    read_or_fail(&reader, &mut buf, "the bytes after the mark are read").await;
                got.extend_from_slice(&buf[..read]);
            }
            assert_eq!(got, b"first\r\nsecond\r\n");
        });
    }
}
