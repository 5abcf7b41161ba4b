//! A blocking client for the binary protocol, on `std::net::TcpStream`.
//!
//! [`Client::connect`] opens a connection and performs the HELLO handshake as role client; then
//! [`Client::get`], [`Client::put`], [`Client::delete`] and [`Client::ping`] each send one request
//! with a fresh request id and wait for its reply. Every wait is bounded by the configured
//! per-request timeout, applied as the socket's read and write timeouts, and every failure is a
//! typed [`ClientError`]: IO, timeout, a protocol violation by the server, or an ERROR frame the
//! server sent (with its [`ErrorCode`]).
//!
//! [`Client::pipeline`] sends a batch of requests without waiting for each reply, at most
//! [`ClientConfig::pipeline_window_max`] in flight, and matches the replies (which may come in any
//! order) to the requests by id.
//!
//! Limits and what is left out: no connection pool, no reconnect, no async facade. After a timeout or a protocol error the
//! connection's state is unknown and the client refuses further use ([`ClientError::Broken`]);
//! open a new one. Contexts are passed through unchanged; a single node ignores them.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{EncodeError, FrameError};
use crate::frame::{PROTOCOL_VERSION, decode_frame, encode_frame};
use crate::limits::Limits;
use crate::message::{
    Delete, ErrorCode, Frame, Get, GetOk, Hello, HelloOk, Message, Put, Role, Sibling,
};

/// Settings of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Cluster name sent in HELLO; the node refuses another.
    pub cluster_name: String,
    /// Bound on connecting and on each request's round trip.
    pub timeout: Duration,
    /// Frame and key limits; must not exceed the server's.
    pub limits: Limits,
    /// Most requests [`Client::pipeline`] keeps in flight. Bounded so that neither side's socket
    /// buffers fill with unread replies while the other side still writes.
    pub pipeline_window_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            cluster_name: "ringkv".to_owned(),
            timeout: Duration::from_secs(5),
            limits: Limits::DEFAULT,
            pipeline_window_max: 64,
        }
    }
}

/// One request of a [`Client::pipeline`] batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read a key.
    Get {
        /// Bucket.
        bucket: Bytes,
        /// Key.
        key: Bytes,
    },
    /// Write a key.
    Put {
        /// Bucket.
        bucket: Bytes,
        /// Key.
        key: Bytes,
        /// Value.
        value: Bytes,
        /// Context from an earlier read, if any.
        context: Option<Bytes>,
    },
    /// Delete a key.
    Delete {
        /// Bucket.
        bucket: Bytes,
        /// Key.
        key: Bytes,
        /// Context from an earlier read, if any.
        context: Option<Bytes>,
    },
    /// Check the node answers.
    Ping,
}

impl Request {
    fn into_message(self) -> Message {
        match self {
            Request::Get { bucket, key } => Message::Get(Get {
                bucket,
                key,
                r: None,
                timeout_ms: None,
            }),
            Request::Put {
                bucket,
                key,
                value,
                context,
            } => Message::Put(Put {
                bucket,
                key,
                value,
                context,
                w: None,
                dw: None,
                timeout_ms: None,
            }),
            Request::Delete {
                bucket,
                key,
                context,
            } => Message::Delete(Delete {
                bucket,
                key,
                context,
                w: None,
                dw: None,
                timeout_ms: None,
            }),
            Request::Ping => Message::Ping,
        }
    }
}

/// The reply to one [`Request`] of a pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A GET's siblings and context.
    Get(GetReply),
    /// A PUT's new context.
    Put(Bytes),
    /// A DELETE succeeded.
    Delete,
    /// PING answered.
    Pong,
}

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address did not resolve to anything.
    #[error("{0} resolves to no address")]
    NoAddress(String),
    /// Connecting, reading or writing failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// No reply within the configured timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The server closed the connection.
    #[error("the server closed the connection")]
    Closed,
    /// The request could not be encoded (a field over a limit).
    #[error("cannot encode the request: {0}")]
    Encode(#[from] EncodeError),
    /// The server's bytes are not a valid frame.
    #[error("invalid frame from the server: {0}")]
    Frame(#[from] FrameError),
    /// The server answered with a reply that does not fit the request.
    #[error("unexpected reply {0}")]
    Unexpected(String),
    /// The server answered with an ERROR frame.
    #[error("server error {code}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// An earlier timeout or protocol error left the connection unusable.
    #[error("the connection is broken by an earlier error; reconnect")]
    Broken,
}

impl ClientError {
    fn io(op: &'static str, source: io::Error, timeout: Duration) -> Self {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::Timeout(timeout),
            io::ErrorKind::UnexpectedEof => Self::Closed,
            _ => Self::Io { op, source },
        }
    }
}

/// The result of a GET: the key's siblings and the context to write back with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetReply {
    /// Concurrent versions; empty if the key does not exist.
    pub siblings: Vec<Sibling>,
    /// Opaque causal context (empty on a single node).
    pub context: Bytes,
}

impl GetReply {
    /// The value, when there is exactly one live sibling.
    pub fn value(&self) -> Option<&Bytes> {
        match self.siblings.as_slice() {
            [Sibling::Value(v)] => Some(v),
            _ => None,
        }
    }
}

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
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Client,
            cluster_name: client.config.cluster_name.clone(),
            node_name: None,
        });
        match client.call(hello)? {
            Message::HelloOk(ok) => client.hello = ok,
            other => return Err(ClientError::Unexpected(other.kind().to_string())),
        }
        Ok(client)
    }

    /// What the node said in HELLO_OK.
    pub fn server(&self) -> &HelloOk {
        &self.hello
    }

    /// Checks that the node answers.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        match self.call(Message::Ping)? {
            Message::Pong => Ok(()),
            other => Err(ClientError::Unexpected(other.kind().to_string())),
        }
    }

    /// Reads `key` in `bucket`.
    pub fn get(&mut self, bucket: &[u8], key: &[u8]) -> Result<GetReply, ClientError> {
        let request = Message::Get(Get {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::copy_from_slice(key),
            r: None,
            timeout_ms: None,
        });
        match self.call(request)? {
            Message::GetOk(GetOk { siblings, context }) => Ok(GetReply { siblings, context }),
            other => Err(ClientError::Unexpected(other.kind().to_string())),
        }
    }

    /// Writes `value` under `key` in `bucket`; `context` is what a GET returned, if any. Returns
    /// the new context.
    pub fn put(
        &mut self,
        bucket: &[u8],
        key: &[u8],
        value: &[u8],
        context: Option<Bytes>,
    ) -> Result<Bytes, ClientError> {
        let request = Message::Put(Put {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            context,
            w: None,
            dw: None,
            timeout_ms: None,
        });
        match self.call(request)? {
            Message::PutOk(ok) => Ok(ok.context),
            other => Err(ClientError::Unexpected(other.kind().to_string())),
        }
    }

    /// Deletes `key` in `bucket`; deleting a missing key succeeds.
    pub fn delete(
        &mut self,
        bucket: &[u8],
        key: &[u8],
        context: Option<Bytes>,
    ) -> Result<(), ClientError> {
        let request = Message::Delete(Delete {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::copy_from_slice(key),
            context,
            w: None,
            dw: None,
            timeout_ms: None,
        });
        match self.call(request)? {
            Message::DeleteOk => Ok(()),
            other => Err(ClientError::Unexpected(other.kind().to_string())),
        }
    }

    /// Sends any request message (for example a GET with its own `r`) and returns the reply; an
    /// ERROR reply becomes [`ClientError::Server`].
    pub fn request(&mut self, message: Message) -> Result<Message, ClientError> {
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
    /// whole connection) fail the whole call and break the client, since the fate of requests in
    /// flight is then unknown. Each wait for a reply is bounded by the configured timeout.
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
                    message: request.into_message(),
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
                Message::GetOk(GetOk { siblings, context }) => {
                    Ok(Reply::Get(GetReply { siblings, context }))
                }
                Message::PutOk(ok) => Ok(Reply::Put(ok.context)),
                Message::DeleteOk => Ok(Reply::Delete),
                Message::Pong => Ok(Reply::Pong),
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
        let mut chunk = [0u8; 16 << 10];
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf, &self.config.limits)? {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| ClientError::io("read", e, timeout))?;
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
}
