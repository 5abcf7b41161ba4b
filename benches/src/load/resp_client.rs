//! A small pipelined RESP2 client on tokio, for driving Redis or a ringkv node's RESP port.
//!
//! It owns only what the load generator needs: send a command, get its reply, with any number of
//! tasks sharing one connection. Commands are encoded with [`ringkv_net::resp::encode_command`]
//! and replies parsed with [`ringkv_net::resp::decode_reply`]. RESP answers in order, so a
//! connection is a writer task and a reader task around a FIFO of waiters: the writer pushes a
//! command's waiter, then writes the command (batching whatever else is queued), and the reader
//! hands each parsed reply to the oldest waiter. A waiter that gave up (its caller timed out)
//! still takes its reply, so the order stays right.
//!
//! Limits: at most `inflight_max` commands queued or in flight per connection (callers wait for a
//! slot); replies are bounded by [`RespLimits::DEFAULT`]. No reconnect: once the connection
//! breaks every command fails with the cause, and the caller opens a new connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ringkv_net::resp::{RespLimits, RespValue, decode_reply, encode_command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Most bytes the writer gathers into one write.
const WRITE_BATCH_BYTES_MAX: usize = 64 << 10;
/// Free space the reader makes in its buffer before each read.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// What a RESP command can fail with. The generator counts failures by [`RespFailure::kind`].
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum RespFailure {
    /// Connecting, reading or writing failed.
    #[error("io: {0}")]
    Io(String),
    /// The server closed the connection.
    #[error("the server closed the connection")]
    Closed,
    /// The server's bytes are not valid RESP.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

impl RespFailure {
    /// Short name of the failure, for counting.
    pub(crate) fn kind(&self) -> String {
        match self {
            RespFailure::Io(_) => "io".to_owned(),
            RespFailure::Closed => "closed".to_owned(),
            RespFailure::Protocol(_) => "protocol".to_owned(),
            RespFailure::Timeout(_) => "timeout".to_owned(),
        }
    }
}

type Waiter = oneshot::Sender<Result<RespValue, RespFailure>>;

/// The waiters of commands sent, oldest first, or the failure that broke the connection.
#[derive(Default)]
struct Waiters {
    queue: VecDeque<Waiter>,
    broken: Option<RespFailure>,
}

/// One RESP connection shared by many tasks (cheap to clone).
#[derive(Clone)]
pub(crate) struct RespConnection {
    queue: mpsc::Sender<(Vec<u8>, Waiter)>,
    slots: Arc<Semaphore>,
    waiters: Arc<Mutex<Waiters>>,
    timeout: Duration,
}

impl RespConnection {
    /// Connects to `addr` and starts the connection's tasks on the current runtime. Every
    /// command (and the connect) is bounded by `timeout`.
    pub(crate) async fn connect(
        addr: &str,
        inflight_max: usize,
        timeout: Duration,
    ) -> Result<Self, RespFailure> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| RespFailure::Timeout(timeout))?
            .map_err(|e| RespFailure::Io(format!("connect {addr}: {e}")))?;
        stream
            .set_nodelay(true)
            .map_err(|e| RespFailure::Io(e.to_string()))?;
        let inflight_max = inflight_max.max(1);
        let (read_half, write_half) = stream.into_split();
        let (queue, rx) = mpsc::channel(inflight_max);
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        tokio::spawn(write_loop(rx, write_half, Arc::clone(&waiters)));
        tokio::spawn(read_loop(read_half, Arc::clone(&waiters)));
        Ok(Self {
            queue,
            slots: Arc::new(Semaphore::new(inflight_max)),
            waiters,
            timeout,
        })
    }

    /// Sends the command `args` and waits for its reply (an error reply is a reply).
    pub(crate) async fn call(&self, args: &[&[u8]]) -> Result<RespValue, RespFailure> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.call_unbounded(args))
            .await
            .unwrap_or(Err(RespFailure::Timeout(timeout)))
    }

    async fn call_unbounded(&self, args: &[&[u8]]) -> Result<RespValue, RespFailure> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| RespFailure::Closed)?;
        if let Some(e) = &lock(&self.waiters).broken {
            return Err(e.clone());
        }
        let mut out = Vec::with_capacity(32 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        encode_command(args, &mut out);
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((out, tx))
            .await
            .map_err(|_| RespFailure::Closed)?;
        rx.await.unwrap_or(Err(RespFailure::Closed))
    }
}

fn lock(w: &Mutex<Waiters>) -> std::sync::MutexGuard<'_, Waiters> {
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fails every waiter with `failure` and marks the connection broken.
fn break_all(waiters: &Mutex<Waiters>, failure: RespFailure) {
    let mut w = lock(waiters);
    if w.broken.is_none() {
        w.broken = Some(failure.clone());
    }
    for waiter in w.queue.drain(..) {
        let _ = waiter.send(Err(failure.clone()));
    }
}

async fn write_loop(
    mut rx: mpsc::Receiver<(Vec<u8>, Waiter)>,
    mut socket: OwnedWriteHalf,
    waiters: Arc<Mutex<Waiters>>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_BYTES_MAX);
    while let Some((bytes, waiter)) = rx.recv().await {
        batch.clear();
        let mut pending = vec![(bytes, waiter)];
        let mut size = pending[0].0.len();
        while size < WRITE_BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(next) => {
                    size += next.0.len();
                    pending.push(next);
                }
                Err(_) => break,
            }
        }
        {
            // Waiters go in before their bytes go out, so no reply can come before its waiter.
            let mut w = lock(&waiters);
            if let Some(e) = &w.broken {
                for (_, waiter) in pending {
                    let _ = waiter.send(Err(e.clone()));
                }
                continue;
            }
            for (bytes, waiter) in pending {
                batch.extend_from_slice(&bytes);
                w.queue.push_back(waiter);
            }
        }
        if let Err(e) = socket.write_all(&batch).await {
            break_all(&waiters, RespFailure::Io(format!("write: {e}")));
            return;
        }
    }
}

async fn read_loop(mut socket: OwnedReadHalf, waiters: Arc<Mutex<Waiters>>) {
    let limits = RespLimits::DEFAULT;
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    loop {
        loop {
            match decode_reply(&buf, &limits) {
                Ok(Some((value, used))) => {
                    buf.advance(used);
                    let waiter = lock(&waiters).queue.pop_front();
                    match waiter {
                        Some(w) => {
                            let _ = w.send(Ok(value));
                        }
                        None => {
                            break_all(
                                &waiters,
                                RespFailure::Protocol("a reply to no command".to_owned()),
                            );
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    break_all(&waiters, RespFailure::Protocol(e.to_string()));
                    return;
                }
            }
        }
        buf.reserve(READ_CHUNK_BYTES);
        match socket.read_buf(&mut buf).await {
            Ok(0) => {
                break_all(&waiters, RespFailure::Closed);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                break_all(&waiters, RespFailure::Io(format!("read: {e}")));
                return;
            }
        }
    }
}
