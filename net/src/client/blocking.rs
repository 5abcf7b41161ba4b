//! The blocking client: [`Client`], one connection on `std::net::TcpStream`, and [`Pool`], a
//! thread-safe pool of them that reconnects.
//!
//! [`Client::connect`] opens a connection and performs the HELLO handshake as role client; then
//! [`Client::get`], [`Client::put`], [`Client::delete`] and [`Client::ping`] each send one request
//! with a fresh request id and wait for its reply. Every wait is bounded by the configured
//! per-request timeout, applied as the socket's read and write timeouts. [`Client::pipeline`] sends
//! a batch without waiting for each reply, at most [`ClientConfig::pipeline_window_max`] in flight,
//! and matches the replies (which may come in any order) to the requests by id.
//!
//! After a timeout, an IO error or a protocol violation the connection's state is unknown (a late
//! reply may still arrive and would be taken for the next request's), so the client refuses further
//! use with [`ClientError::Broken`]; an ERROR frame about one request leaves it usable.
//!
//! [`Pool`] lends its [`Client`]s to one request at a time. It opens connections on demand up to
//! [`PoolConfig::connections_max`]; a thread that finds them all busy waits, at most the request
//! timeout. A connection that broke is dropped when it comes back; one that the server closed while
//! it sat idle (a restart, a shutdown) is noticed before it is lent, by a non-blocking peek that
//! sees the end of stream, and dropped too. The replacement is opened with bounded retries and
//! backoff. A request that fails on its connection is reported, not retried (the parent module's
//! docs say why).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::Bytes;

use super::{ClientConfig, ClientError, GetReply, PoolConfig, PoolStats, Reply, Request, hello};
use crate::frame::{PROTOCOL_VERSION, decode_frame, encode_frame};
use crate::message::{Frame, HelloOk, Message};

/// Bytes read from the socket at once.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// A blocking connection to one node.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    config: ClientConfig,
    hello: HelloOk,
    next_id: u64,
    buf: Vec<u8>,
    broken: bool,
}

impl Client {
    /// Connects to `addr` and performs the handshake.
    pub fn connect(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Self, ClientError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| ClientError::Io {
                op: "resolve",
                source,
            })?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, config.timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = match (stream, last) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(ClientError::io("connect", e, config.timeout)),
            (None, None) => return Err(ClientError::NoAddress(format!("{addrs:?}"))),
        };
        let io = |op| move |e| ClientError::io(op, e, config.timeout);
        stream.set_nodelay(true).map_err(io("set_nodelay"))?;
        stream
            .set_read_timeout(Some(config.timeout))
            .map_err(io("set_read_timeout"))?;
        stream
            .set_write_timeout(Some(config.timeout))
            .map_err(io("set_write_timeout"))?;
        let mut client = Self {
            stream,
            hello: HelloOk {
                protocol_version: PROTOCOL_VERSION,
                node_name: String::new(),
                shard_count: 1,
                shard: 0,
            },
            config,
            next_id: 1,
            buf: Vec::new(),
            broken: false,
        };
        match client.call(hello(&client.config))? {
            Message::HelloOk(ok) => client.hello = ok,
            other => return Err(ClientError::Unexpected(other.kind().to_string())),
        }
        Ok(client)
    }

    /// What the node said in HELLO_OK.
    pub fn server(&self) -> &HelloOk {
        &self.hello
    }

    /// Whether an earlier error left the connection unusable (every call now fails with
    /// [`ClientError::Broken`]).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    typed_requests!(blocking, &mut);

    /// Sends one request and waits for its reply.
    pub fn request(&mut self, request: Request) -> Result<Reply, ClientError> {
        let expect = request.reply_kind();
        let message = self.call(request.into_message(self.config.timeout))?;
        if message.kind() != expect {
            self.broken = true;
            return Err(ClientError::Unexpected(message.kind().to_string()));
        }
        Reply::from_message(message)
    }

    /// Sends any request message (a GET with its own `r`, a PUT with `w`, `dw` or a deadline)
    /// and returns the reply message; an ERROR reply becomes [`ClientError::Server`].
    pub fn request_message(&mut self, message: Message) -> Result<Message, ClientError> {
        self.call(message)
    }

    /// Sends one request and waits for its reply; an ERROR reply becomes [`ClientError::Server`].
    fn call(&mut self, message: Message) -> Result<Message, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let result = self.round_trip(message);
        if let Err(e) = &result {
            // Only a server ERROR about one request leaves the stream in a known state.
            let per_request = matches!(e, ClientError::Server { .. } | ClientError::Encode(_));
            self.broken = !per_request;
        }
        result
    }

    /// Sends `requests` pipelined and returns one result per request, in request order.
    ///
    /// A request the node refused (an ERROR frame about it) is an `Err` in its slot and the rest
    /// go on. Failures of the connection itself (IO, timeout, invalid frames, an ERROR about the
    /// whole connection, a reply of the wrong kind) fail the whole call and break the client, since
    /// the fate of requests in flight is then unknown. Each wait for a reply is bounded by the
    /// configured timeout.
    pub fn pipeline(
        &mut self,
        requests: Vec<Request>,
    ) -> Result<Vec<Result<Reply, ClientError>>, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let result = self.pipeline_inner(requests);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn pipeline_inner(
        &mut self,
        requests: Vec<Request>,
    ) -> Result<Vec<Result<Reply, ClientError>>, ClientError> {
        let count = requests.len();
        let window = self.config.pipeline_window_max.max(1);
        let first_id = self.next_id;
        self.next_id += count as u64;
        let expected: Vec<_> = requests.iter().map(Request::reply_kind).collect();
        let mut results: Vec<Option<Result<Reply, ClientError>>> = Vec::with_capacity(count);
        results.resize_with(count, || None);
        let mut pending = requests.into_iter().enumerate();
        let (mut sent, mut answered) = (0usize, 0usize);
        let mut out = Vec::new();
        while answered < count {
            // Top the window up with as many requests as fit, in one write.
            out.clear();
            while sent - answered < window {
                let Some((i, request)) = pending.next() else {
                    break;
                };
                let frame = Frame {
                    request_id: first_id + i as u64,
                    message: request.into_message(self.config.timeout),
                };
                let start = out.len();
                match encode_frame(&frame, &self.config.limits, &mut out) {
                    Ok(_) => sent += 1,
                    Err(e) => {
                        // Never sent, so already answered, locally.
                        out.truncate(start);
                        results[i] = Some(Err(e.into()));
                        sent += 1;
                        answered += 1;
                    }
                }
            }
            if !out.is_empty() {
                let timeout = self.config.timeout;
                self.stream
                    .write_all(&out)
                    .map_err(|e| ClientError::io("write", e, timeout))?;
            }
            if answered == count {
                break;
            }
            let frame = self.read_frame()?;
            let index = frame
                .request_id
                .checked_sub(first_id)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| i < count && results[i].is_none());
            let Some(index) = index else {
                return Err(match frame.message {
                    Message::Error(e) if frame.request_id == 0 => ClientError::Server {
                        code: e.code,
                        message: e.message,
                    },
                    _ => ClientError::Unexpected(format!(
                        "reply to unknown request {}",
                        frame.request_id
                    )),
                });
            };
            let reply = match frame.message {
                Message::Error(e) => Err(ClientError::Server {
                    code: e.code,
                    message: e.message,
                }),
                m if m.kind() == expected[index] => Reply::from_message(m),
                other => return Err(ClientError::Unexpected(other.kind().to_string())),
            };
            results[index] = Some(reply);
            answered += 1;
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("the loop ends only once every request is answered"))
            .collect())
    }

    /// Reads the next frame, waiting at most the configured timeout for each chunk of it.
    fn read_frame(&mut self) -> Result<Frame, ClientError> {
        let timeout = self.config.timeout;
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf, &self.config.limits)? {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                // A signal handler ran while the thread waited: with a receive timeout set the
                // kernel never restarts the read (socket(7)), and the reply is still to come.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::io("read", e, timeout)),
            };
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn round_trip(&mut self, message: Message) -> Result<Message, ClientError> {
        let request_id = self.next_id;
        self.next_id += 1;
        let mut out = Vec::new();
        encode_frame(
            &Frame {
                request_id,
                message,
            },
            &self.config.limits,
            &mut out,
        )?;
        let timeout = self.config.timeout;
        self.stream
            .write_all(&out)
            .map_err(|e| ClientError::io("write", e, timeout))?;
        let frame = self.read_frame()?;
        if frame.request_id != 0 && frame.request_id != request_id {
            return Err(ClientError::Unexpected(format!(
                "reply to request {} while waiting for {request_id}",
                frame.request_id
            )));
        }
        match frame.message {
            Message::Error(e) => Err(ClientError::Server {
                code: e.code,
                message: e.message,
            }),
            m => Ok(m),
        }
    }

    /// Whether the server closed the connection (or sent something unasked) while it sat idle.
    ///
    /// Between requests nothing may arrive, so any readable byte, or the end of the stream, means
    /// the connection is no longer usable. The peek does not block; it costs three system calls,
    /// far less than a request that fails on a dead connection.
    fn closed_while_idle(&self) -> bool {
        if !self.buf.is_empty() || self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let mut byte = [0u8; 1];
        let idle =
            matches!(self.stream.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        let restored = self.stream.set_nonblocking(false).is_ok();
        !(idle && restored)
    }
}

/// A thread-safe pool of blocking connections to one node, replaced when they break.
///
/// `Send + Sync`: share it by reference or in an `Arc`. Each call borrows one connection for its
/// duration. Connections are opened on demand, at most [`PoolConfig::connections_max`]; a thread
/// that finds them all busy waits, at most the request timeout. A connection that broke is dropped
/// when it comes back, and one that the server closed while it sat idle is noticed before it is
/// lent; replacements are opened with bounded retries and backoff. See [`crate::client`] for what
/// is (not) retried.
#[derive(Debug)]
pub struct Pool {
    addr: String,
    config: ClientConfig,
    pool: PoolConfig,
    state: Mutex<PoolState>,
    /// Signalled when a connection comes back or a slot frees up.
    returned: Condvar,
    connects_total: AtomicU64,
    connect_failures_total: AtomicU64,
}

#[derive(Debug)]
struct PoolState {
    /// Connections not lent out, most recently returned last.
    idle: Vec<Client>,
    /// Connections idle, lent out or being opened; at most `connections_max`.
    open: usize,
}

impl Pool {
    /// Creates a pool for `addr` and opens its first connection, so that a wrong address or
    /// cluster name fails here rather than at the first request.
    pub fn connect(
        addr: &str,
        config: ClientConfig,
        pool: PoolConfig,
    ) -> Result<Self, ClientError> {
        let this = Self {
            addr: addr.to_owned(),
            config,
            pool,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 1,
            }),
            returned: Condvar::new(),
            connects_total: AtomicU64::new(0),
            connect_failures_total: AtomicU64::new(0),
        };
        let first = this.open(Instant::now() + this.config.timeout)?;
        this.lock().idle.push(first);
        Ok(this)
    }

    /// Counters of connections opened and failed attempts.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            connects_total: self.connects_total.load(Ordering::Relaxed),
            connect_failures_total: self.connect_failures_total.load(Ordering::Relaxed),
        }
    }

    typed_requests!(blocking, &);

    /// Sends one request and waits for its reply.
    pub fn request(&self, request: Request) -> Result<Reply, ClientError> {
        self.with_client(|c| c.request(request))
    }

    /// [`Client::pipeline`] on one of the pool's connections.
    pub fn pipeline(
        &self,
        requests: Vec<Request>,
    ) -> Result<Vec<Result<Reply, ClientError>>, ClientError> {
        self.with_client(|c| c.pipeline(requests))
    }

    /// Runs `op` on a borrowed connection and returns the connection, or drops it if it broke.
    fn with_client<T>(
        &self,
        op: impl FnOnce(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut lease = self.checkout()?;
        let client = lease
            .client
            .as_mut()
            .expect("a lease holds its client until it is dropped");
        op(client)
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state stays consistent even if a thread panicked while holding the lock: every
        // critical section is a few field updates that cannot panic halfway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lends a connection: an idle one that is still open, a new one if the pool has room, or the
    /// first one returned before the request's timeout.
    fn checkout(&self) -> Result<Lease<'_>, ClientError> {
        let deadline = Instant::now() + self.config.timeout;
        let mut state = self.lock();
        loop {
            if let Some(client) = state.idle.pop() {
                drop(state);
                if !client.closed_while_idle() {
                    return Ok(self.lease(client));
                }
                drop(client);
                state = self.lock();
                state.open -= 1;
                continue;
            }
            if state.open < self.pool.connections() {
                state.open += 1;
                drop(state);
                return match self.open(deadline) {
                    Ok(client) => Ok(self.lease(client)),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.returned.notify_one();
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(self.config.timeout));
            }
            state = self
                .returned
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn lease(&self, client: Client) -> Lease<'_> {
        Lease {
            pool: self,
            client: Some(client),
        }
    }

    /// Opens a connection, retrying with backoff up to `connect_attempts_max` times or until
    /// `deadline`, whichever comes first.
    fn open(&self, deadline: Instant) -> Result<Client, ClientError> {
        let mut failed = 0;
        loop {
            match Client::connect(self.addr.as_str(), self.config.clone()) {
                Ok(client) => {
                    self.connects_total.fetch_add(1, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(e) => {
                    self.connect_failures_total.fetch_add(1, Ordering::Relaxed);
                    failed += 1;
                    let wait = self.pool.backoff(failed);
                    let out_of_time = Instant::now() + wait >= deadline;
                    if failed >= self.pool.attempts() || out_of_time || !e.connect_retryable() {
                        return Err(e);
                    }
                    std::thread::sleep(wait);
                }
            }
        }
    }
}

/// A connection lent by a [`Pool`]; returned (or, if it broke, dropped) when the lease ends, even
/// if the borrower panicked.
struct Lease<'a> {
    pool: &'a Pool,
    client: Option<Client>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let mut state = self.pool.lock();
        if client.is_broken() || std::thread::panicking() {
            state.open -= 1;
        } else {
            state.idle.push(client);
        }
        drop(state);
        self.pool.returned.notify_one();
    }
}
