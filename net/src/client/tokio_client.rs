//! The tokio client: [`AsyncConnection`], one connection that many tasks share, and
//! [`AsyncPool`], a few of them that reconnect.
//!
//! A connection is two tasks on the caller's runtime and a [`Mux`] between them. A caller takes a
//! permit (at most [`ClientConfig::inflight_per_connection_max`] requests in flight), registers its
//! request in the mux under a fresh id with a oneshot channel for the reply, encodes the frame and
//! puts it on a bounded queue. The writer task drains the queue, batching what is queued into one
//! write. The reader task decodes replies as they arrive, in any order, and hands each to the
//! waiter the mux names. So requests from any number of tasks are pipelined on one socket and a
//! slow request never holds up a fast one.
//!
//! Each request has a timeout (the configured one, or its own with `call_timeout`). When it
//! passes, the caller gives up and the mux forgets the id; the reply, if it comes later, is
//! dropped and the connection goes on. When the connection breaks (end of stream, an IO error, a
//! write that does not finish within the timeout, an invalid frame, a reply of the wrong kind or
//! to an id never sent, an ERROR about the whole connection), every request in flight fails at
//! once with the cause, and later requests fail with [`ClientError::Broken`] without being sent.
//! Both tasks then stop, which closes the socket; dropping the last handle of a connection does
//! the same.
//!
//! [`AsyncPool`] holds [`PoolConfig::connections_max`] connections, opened on demand, and sends
//! each request on the next one round-robin. A connection found broken is replaced on the spot,
//! with bounded retries and backoff, while other requests use the other connections. The request
//! timeout bounds the whole call, waiting for a reconnect included.
//!
//! Limits: the tasks run on the runtime that was current at `connect` (any flavour), which must
//! outlive the connection. Memory per connection is bounded by the queued requests (at most
//! `inflight_per_connection_max` encoded frames) and the receive buffer (at most one frame of
//! `frame_bytes_max` plus one read). A request abandoned at its timeout still occupies the server
//! until the server answers it, but no longer a permit here.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::mux::{Mux, Received};
use super::{ClientConfig, ClientError, GetReply, PoolConfig, PoolStats, Reply, Request, hello};
use crate::frame::{decode_frame, encode_frame, encode_frame_to_vec};
use crate::limits::Limits;
use crate::message::{Frame, HelloOk, Message};

/// Request id of HELLO; the mux hands out the ids after it.
const HELLO_REQUEST_ID: u64 = 1;
/// Most bytes the writer gathers from the queue into one write. Frames are never split, so one
/// write can be larger by a single frame.
const WRITE_BATCH_BYTES_MAX: usize = 64 << 10;
/// Free space the reader makes in its buffer before each read.
const READ_CHUNK_BYTES: usize = 16 << 10;

type Waiter = oneshot::Sender<Result<Message, ClientError>>;

/// State shared by a connection's handles and its two tasks.
struct Shared {
    mux: Mutex<Mux<Waiter>>,
    /// Becomes true when the connection breaks, so that both tasks stop and the socket closes at
    /// once rather than when the last handle goes (a server that restarts then sees its old
    /// connections closed, not lingering half-open).
    broken: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Mux<Waiter>> {
        // Nothing panics while the lock is held (the mux only asserts its own invariants), so a
        // poisoned lock still guards a consistent mux.
        self.mux.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Breaks the connection and hands every waiter the cause.
    fn fail(&self, error: ClientError) {
        let failed = self.lock().fail(&error);
        self.broke(failed);
    }

    /// Hands the waiters of a connection that just broke their errors and stops both tasks.
    fn broke(&self, failed: Vec<(Waiter, ClientError)>) {
        for (waiter, error) in failed {
            // The caller may have given up meanwhile; then nobody needs the error.
            let _ = waiter.send(Err(error));
        }
        self.broken.send_replace(true);
    }
}

/// Resolves once the connection is broken.
async fn broken(mut rx: watch::Receiver<bool>) {
    // An error means the sender is gone, which happens only once both tasks are.
    let _ = rx.wait_for(|broken| *broken).await;
}

/// One multiplexed connection to a node, shared by any number of tasks.
///
/// Requests from any number of tasks are pipelined on the one socket, at most
/// [`ClientConfig::inflight_per_connection_max`] at once, and their replies, in whatever order they
/// come, are matched to them by request id. A request that times out is forgotten and its late
/// reply dropped; the connection goes on. When the connection breaks, every request in flight
/// fails with the cause and later ones with [`ClientError::Broken`]. The connection's tasks run on
/// the tokio runtime current at [`AsyncConnection::connect`].
///
/// Cloning is cheap and every clone uses the same connection; it closes when the last clone is
/// dropped. See [`crate::client`] for the other clients.
#[derive(Clone)]
pub struct AsyncConnection {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Bytes>,
    inflight: Semaphore,
    config: ClientConfig,
    server: HelloOk,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Nobody can send or wait any more: stop both tasks, which closes the socket.
        self.reader.abort();
        self.writer.abort();
    }
}

impl fmt::Debug for AsyncConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncConnection")
            .field("server", &self.inner.server.node_name)
            .field("shard", &self.inner.server.shard)
            .field("broken", &self.is_broken())
            .finish_non_exhaustive()
    }
}

impl AsyncConnection {
    /// Connects to `addr`, performs the handshake and starts the connection's reader and writer
    /// tasks on the current tokio runtime. Bounded by `config.timeout`.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let timeout = config.timeout;
        tokio::time::timeout(timeout, Self::connect_unbounded(addr, config))
            .await
            .unwrap_or(Err(ClientError::Timeout(timeout)))
    }

    async fn connect_unbounded(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let timeout = config.timeout;
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::io("connect", e, timeout))?;
        stream
            .set_nodelay(true)
            .map_err(|e| ClientError::io("set_nodelay", e, timeout))?;
        let hello = Frame {
            request_id: HELLO_REQUEST_ID,
            message: hello(&config),
        };
        let out = encode_frame_to_vec(&hello, &config.limits)?;
        stream
            .write_all(&out)
            .await
            .map_err(|e| ClientError::io("write", e, timeout))?;
        let mut buf = BytesMut::new();
        let reply = loop {
            if let Some((frame, used)) = decode_frame(&buf, &config.limits)? {
                buf.advance(used);
                break frame;
            }
            buf.reserve(READ_CHUNK_BYTES);
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| ClientError::io("read", e, timeout))?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
        };
        let server = match reply.message {
            Message::HelloOk(ok) if reply.request_id == HELLO_REQUEST_ID => ok,
            Message::Error(e) => {
                return Err(ClientError::Server {
                    code: e.code,
                    message: e.message,
                });
            }
            other => {
                return Err(ClientError::Unexpected(format!(
                    "{} to request {} in the handshake",
                    other.kind(),
                    reply.request_id
                )));
            }
        };

        let inflight_max = config.inflight_per_connection_max.max(1);
        let (broken_tx, broken_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            mux: Mutex::new(Mux::new(HELLO_REQUEST_ID + 1)),
            broken: broken_tx,
        });
        // A permit is taken before a frame is queued, so the queue never holds more than there
        // are permits: sending on it does not wait.
        let (queue, rx) = mpsc::channel(inflight_max);
        let (read_half, write_half) = stream.into_split();
        let reader = tokio::spawn(read_loop(
            read_half,
            buf,
            Arc::clone(&shared),
            broken_rx.clone(),
            config.limits,
            timeout,
        ));
        let writer = tokio::spawn(write_loop(
            rx,
            write_half,
            Arc::clone(&shared),
            broken_rx,
            timeout,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                queue,
                inflight: Semaphore::new(inflight_max),
                config,
                server,
                reader,
                writer,
            }),
        })
    }

    /// What the node said in HELLO_OK.
    pub fn server(&self) -> &HelloOk {
        &self.inner.server
    }

    /// Whether the connection broke; every request now fails with [`ClientError::Broken`].
    pub fn is_broken(&self) -> bool {
        self.inner.shared.lock().is_broken()
    }

    /// Requests sent or about to be sent and not yet answered or abandoned.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.lock().in_flight()
    }

    typed_requests!(async);

    /// Sends `request` and waits for its reply, at most the configured timeout.
    pub async fn call(&self, request: Request) -> Result<Reply, ClientError> {
        self.call_timeout(request, self.inner.config.timeout).await
    }

    /// Sends `request` and waits for its reply, at most `timeout` (waiting for a free slot
    /// included). On timeout the request is abandoned and a late reply dropped.
    pub async fn call_timeout(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        bounded(timeout, self.call_unbounded(request, timeout)).await
    }

    /// Sends `request` with `deadline` as the node's deadline and waits for its reply, however
    /// long that takes; the caller bounds the wait.
    ///
    /// Fails with [`ClientError::Broken`] only if the request was not sent, so the caller may
    /// safely send it elsewhere.
    async fn call_unbounded(
        &self,
        request: Request,
        deadline: Duration,
    ) -> Result<Reply, ClientError> {
        let inner = &*self.inner;
        if inner.shared.lock().is_broken() {
            return Err(ClientError::Broken);
        }
        // Held until the reply arrives or the caller gives up.
        let _permit = inner
            .inflight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let expect = request.reply_kind();
        let (tx, rx) = oneshot::channel();
        let request_id = inner
            .shared
            .lock()
            .begin(expect, tx)
            .map_err(|_| ClientError::Broken)?;
        // From here on, leaving early (an error, a timeout, a cancelled caller) forgets the id.
        let _abandon = Abandon {
            shared: &inner.shared,
            request_id,
        };
        let frame = Frame {
            request_id,
            message: request.into_message(deadline),
        };
        let mut out = BytesMut::new();
        encode_frame(&frame, &inner.config.limits, &mut out)?;
        if inner.queue.send(out.freeze()).await.is_err() {
            // The writer stopped after breaking the mux, which failed this request too: its
            // error is waiting in the channel.
            return match rx.await {
                Ok(reply) => reply.and_then(Reply::from_message),
                Err(_) => Err(ClientError::Broken),
            };
        }
        match rx.await {
            Ok(reply) => reply.and_then(Reply::from_message),
            // The mux drops a waiter only by answering it or failing it; the sender vanishing
            // without either means the connection is being torn down.
            Err(_) => Err(ClientError::Closed),
        }
    }
}

/// Forgets a request id when its caller stops waiting, so that a late reply is dropped.
struct Abandon<'a> {
    shared: &'a Shared,
    request_id: u64,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        // After a reply this finds nothing, which is cheaper than tracking whether one came.
        self.shared.lock().abandon(self.request_id);
    }
}

async fn bounded<T>(
    timeout: Duration,
    work: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(ClientError::Timeout(timeout)))
}

/// Writes queued frames, batching what is queued, until every handle is gone or the connection
/// breaks.
async fn write_loop(
    mut queue: mpsc::Receiver<Bytes>,
    mut socket: OwnedWriteHalf,
    shared: Arc<Shared>,
    broken_rx: watch::Receiver<bool>,
    timeout: Duration,
) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            first = queue.recv() => match first {
                Some(first) => first,
                None => break,
            },
            // Dropping the socket half here (and the reader's) closes the connection.
            () = broken(broken_rx.clone()) => return,
        };
        let mut single = Some(first);
        while batch.len() + single.as_ref().map_or(0, Bytes::len) < WRITE_BATCH_BYTES_MAX {
            let Ok(next) = queue.try_recv() else {
                break;
            };
            if let Some(first) = single.take() {
                batch.extend_from_slice(&first);
            }
            batch.extend_from_slice(&next);
        }
        // A lone frame (the common case under light load, and every large value) is written
        // without copying.
        let bytes: &[u8] = match &single {
            Some(frame) => frame,
            None => &batch,
        };
        let written = tokio::time::timeout(timeout, socket.write_all(bytes)).await;
        batch.clear();
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return shared.fail(ClientError::io("write", e, timeout)),
            // The server stopped reading: the connection is stuck, not merely slow.
            Err(_) => return shared.fail(ClientError::Timeout(timeout)),
        }
    }
    // Every handle is gone. Tell the server no more requests come; the task is aborted anyway.
    let _ = socket.shutdown().await;
}

/// Reads replies and hands each to its waiter until the connection ends or breaks.
async fn read_loop(
    mut socket: OwnedReadHalf,
    mut buf: BytesMut,
    shared: Arc<Shared>,
    broken_rx: watch::Receiver<bool>,
    limits: Limits,
    timeout: Duration,
) {
    loop {
        loop {
            let frame = match decode_frame(&buf, &limits) {
                Ok(Some((frame, used))) => {
                    buf.advance(used);
                    frame
                }
                Ok(None) => break,
                // Even an unknown kind is a violation here: the client only sends requests whose
                // replies it knows.
                Err(e) => return shared.fail(ClientError::Frame(e)),
            };
            let received = shared.lock().receive(frame);
            match received {
                Received::Reply(waiter, reply) => {
                    // The caller may have stopped waiting; then the reply is not needed.
                    let _ = waiter.send(reply);
                }
                Received::Late => {}
                Received::Broken(failed) => return shared.broke(failed),
            }
        }
        buf.reserve(READ_CHUNK_BYTES);
        let read = tokio::select! {
            read = socket.read_buf(&mut buf) => read,
            // The writer broke the connection.
            () = broken(broken_rx.clone()) => return,
        };
        match read {
            Ok(0) => return shared.fail(ClientError::Closed),
            Ok(_) => {}
            Err(e) => return shared.fail(ClientError::io("read", e, timeout)),
        }
    }
}

/// A pool of multiplexed connections to one node, replaced when they break.
///
/// Holds up to [`PoolConfig::connections_max`] [`AsyncConnection`]s, opened on demand, and sends
/// each request on the next one, round-robin. A connection found broken is replaced when a request
/// picks it, with at most [`PoolConfig::connect_attempts_max`] attempts and backoff, all within the
/// request's timeout. A request that failed on its connection is not retried (see
/// [`crate::client`]).
///
/// Cloning is cheap and every clone uses the same connections.
#[derive(Clone, Debug)]
pub struct AsyncPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    addr: String,
    config: ClientConfig,
    pool: PoolConfig,
    /// One connection per slot; the lock is held only to look at it or to replace it, so
    /// requests needing the same broken slot wait for one reconnect instead of each starting one.
    slots: Vec<tokio::sync::Mutex<Option<AsyncConnection>>>,
    next_slot: AtomicUsize,
    connects_total: AtomicU64,
    connect_failures_total: AtomicU64,
}

impl AsyncPool {
    /// Creates a pool for `addr` and opens its first connection, so that a wrong address or
    /// cluster name fails here rather than at the first request.
    pub async fn connect(
        addr: &str,
        config: ClientConfig,
        pool: PoolConfig,
    ) -> Result<Self, ClientError> {
        let slots = (0..pool.connections())
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        let this = Self {
            inner: Arc::new(PoolInner {
                addr: addr.to_owned(),
                config,
                pool,
                slots,
                next_slot: AtomicUsize::new(0),
                connects_total: AtomicU64::new(0),
                connect_failures_total: AtomicU64::new(0),
            }),
        };
        let timeout = this.inner.config.timeout;
        bounded(timeout, this.connection(0)).await?;
        Ok(this)
    }

    /// Counters of connections opened and failed attempts.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            connects_total: self.inner.connects_total.load(Ordering::Relaxed),
            connect_failures_total: self.inner.connect_failures_total.load(Ordering::Relaxed),
        }
    }

    typed_requests!(async);

    /// Sends `request` on the next connection and waits for its reply, at most the configured
    /// timeout.
    pub async fn call(&self, request: Request) -> Result<Reply, ClientError> {
        self.call_timeout(request, self.inner.config.timeout).await
    }

    /// Sends `request` on the next connection and waits for its reply, at most `timeout`,
    /// reconnecting first if that connection broke.
    pub async fn call_timeout(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let start = Instant::now();
        // The node's deadline is what is left of the caller's once a connection is at hand.
        let left = || timeout.saturating_sub(start.elapsed());
        bounded(timeout, async {
            let slot =
                self.inner.next_slot.fetch_add(1, Ordering::Relaxed) % self.inner.slots.len();
            let connection = self.connection(slot).await?;
            match connection.call_unbounded(request.clone(), left()).await {
                // The connection broke between the check and the send, and the request was not
                // sent: one more try, on its replacement, cannot apply it twice.
                Err(ClientError::Broken) => {
                    self.connection(slot)
                        .await?
                        .call_unbounded(request, left())
                        .await
                }
                other => other,
            }
        })
        .await
    }

    /// The connection of `slot`, opened or replaced if it is missing or broken.
    async fn connection(&self, slot: usize) -> Result<AsyncConnection, ClientError> {
        let mut guard = self.inner.slots[slot].lock().await;
        if let Some(connection) = guard.as_ref()
            && !connection.is_broken()
        {
            return Ok(connection.clone());
        }
        // Requests still holding the broken connection keep it alive until they return.
        *guard = None;
        let connection = self.open().await?;
        *guard = Some(connection.clone());
        Ok(connection)
    }

    /// Opens a connection, retrying with backoff up to `connect_attempts_max` times.
    async fn open(&self) -> Result<AsyncConnection, ClientError> {
        let inner = &*self.inner;
        let mut failed = 0;
        loop {
            match AsyncConnection::connect(inner.addr.as_str(), inner.config.clone()).await {
                Ok(connection) => {
                    inner.connects_total.fetch_add(1, Ordering::Relaxed);
                    return Ok(connection);
                }
                Err(e) => {
                    inner.connect_failures_total.fetch_add(1, Ordering::Relaxed);
                    failed += 1;
                    if failed >= inner.pool.attempts() || !e.connect_retryable() {
                        return Err(e);
                    }
                    tokio::time::sleep(inner.pool.backoff(failed)).await;
                }
            }
        }
    }
}
