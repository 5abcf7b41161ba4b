//! Clients of the binary protocol: a blocking one on `std::net` and, with the `tokio` feature (on by
//! default), an asynchronous one for tokio applications, each with a pool that reconnects.
//!
//! | type | IO | concurrency on one connection | use from |
//! |---|---|---|---|
//! | [`Client`] | blocking `std::net` | one request, or one [`Client::pipeline`] batch, at a time | one thread |
//! | [`Pool`] | blocking, [`PoolConfig::connections_max`] [`Client`]s | one request per connection | many threads (`Send + Sync`) |
//! | [`AsyncConnection`] | tokio | up to [`ClientConfig::inflight_per_connection_max`] requests from any number of tasks, matched by request id | many tasks (cheap `Clone`) |
//! | [`AsyncPool`] | tokio, [`PoolConfig::connections_max`] [`AsyncConnection`]s | as above, requests spread round-robin | many tasks (cheap `Clone`) |
//!
//! All of them speak the same requests ([`Request`]), return the same replies ([`Reply`],
//! [`GetReply`]) and fail with the same typed [`ClientError`]: IO, timeout, an ERROR frame from the
//! server with its [`ErrorCode`], a protocol violation by the server, or a connection that closed
//! or broke. GET returns every sibling and the causal context; PUT and DELETE take the context of an
//! earlier GET, or `None` for a blind write. Contexts are opaque bytes passed through unchanged.
//!
//! The blocking [`Pool`] is a pool of blocking [`Client`]s rather than a facade over the tokio
//! client, so that blocking users (the `ringkv` CLI, scripts, benchmarks) build and run without an
//! async runtime and its threads. The price is that a blocking connection carries one request at a
//! time: a pool serves at most `connections_max` requests at once, and further threads wait for a
//! free connection (bounded by the request timeout). A thread that needs more in flight sends a
//! [`Pool::pipeline`] batch.
//!
//! Reconnects: a pool replaces a connection that broke (the server closed it or restarted, an IO
//! error, a timeout on a blocking connection, a protocol violation) when a request next picks it,
//! trying at most [`PoolConfig::connect_attempts_max`] times with exponential backoff. Requests in
//! flight on a connection when it breaks fail with the cause as a typed error, never hang; they
//! are not retried, because a request that reached the server may have been applied and a blind
//! PUT is not idempotent. The only retry is of a request that was provably never sent (the
//! connection was already known to be broken when the request was about to go out).
//!
//! Deadlines travel with requests: every GET, PUT and DELETE carries the client's timeout for it
//! as its `timeout_ms`, so the node stops working on a request (and answers `timeout`) when the
//! client stops waiting for it, instead of at its own, longer, default.
//!
//! Limits: one server per client or pool (no ring awareness, no failover to another node); no TLS
//! or authentication (the protocol has none); the quorum fields of requests (`r`, `w`, `dw`) are
//! left to the bucket's, except through the blocking client's `request_message`, which sends any
//! request message as given.

/// The typed requests every client offers (`ping`, `get`, `put`, `delete`, `update`, `apply` and
/// its shorthands `increment`, `set_add`, `set_remove`, `admin`), written
/// once over the method that sends a [`Request`] and returns its [`Reply`]: blocking clients call
/// it `request` and take the receiver given (`&self` or `&mut self`); async clients call it
/// `call`. Expanded inside each client's `impl` block, so they stay inherent methods.
macro_rules! typed_requests {
    (blocking, $($recv:tt)+) => {
        /// Checks that the node answers.
        pub fn ping($($recv)+ self) -> Result<(), ClientError> {
            self.request(Request::Ping)?.into_pong()
        }

        /// Reads `key` in `bucket`: every sibling and the context.
        pub fn get($($recv)+ self, bucket: &[u8], key: &[u8]) -> Result<GetReply, ClientError> {
            self.request(Request::get(bucket, key))?.into_get()
        }

        /// Writes `value` under `key` in `bucket`; `context` is what a GET returned, if any.
        /// Returns the new context.
        pub fn put(
            $($recv)+ self,
            bucket: &[u8],
            key: &[u8],
            value: &[u8],
            context: Option<Bytes>,
        ) -> Result<Bytes, ClientError> {
            self.request(Request::put(bucket, key, value, context))?.into_put()
        }

        /// Writes `value` as [`Self::put`] does, expiring as `expiry` says (a time to live, an
        /// absolute time, or never despite the bucket's default).
        pub fn put_expiring(
            $($recv)+ self,
            bucket: &[u8],
            key: &[u8],
            value: &[u8],
            context: Option<Bytes>,
            expiry: $crate::message::Expiry,
        ) -> Result<Bytes, ClientError> {
            self.request(Request::put(bucket, key, value, context).expiring(expiry))?
                .into_put()
        }

        /// Deletes `key` in `bucket`; deleting a missing key succeeds.
        pub fn delete(
            $($recv)+ self,
            bucket: &[u8],
            key: &[u8],
            context: Option<Bytes>,
        ) -> Result<(), ClientError> {
            self.request(Request::delete(bucket, key, context))?.into_delete()
        }

        /// Changes fields of the map (a Redis hash) under `key` in `bucket`, an `lww` bucket:
        /// each field is a last-write-wins register, so concurrent updates of different fields
        /// all stay.
        pub fn update(
            $($recv)+ self,
            bucket: &[u8],
            key: &[u8],
            ops: Vec<$crate::message::MapOp>,
        ) -> Result<(), ClientError> {
            self.request(Request::update(bucket, key, ops))?.into_update()
        }

        /// Applies `ops` to the convergent data type of type `crdt` under `key` in `bucket`
        /// (`docs/PROTOCOL.md` §5.4.2). `op_id` makes a retry count once (within the node's
        /// deduplication window); with `return_value` the value after the operations comes back.
        /// A key holding another type fails with a `ClientError::Server` of code `WrongType`.
        pub fn apply(
            $($recv)+ self,
            bucket: &[u8],
            key: &[u8],
            crdt: $crate::message::CrdtType,
            ops: Vec<$crate::message::CrdtOp>,
            op_id: Option<u64>,
            return_value: bool,
        ) -> Result<Option<$crate::message::CrdtValue>, ClientError> {
            self.request(Request::apply(bucket, key, crdt, ops, op_id, return_value))?
                .into_apply()
        }

        /// Adds `by` (negative: subtracts) to the counter under `key` in `bucket` and returns
        /// its new value. Give an `op_id` to retry safely: the same id counts once.
        pub fn increment(
            $($recv)+ self,
            bucket: &[u8],
            key: &[u8],
            by: i64,
            op_id: Option<u64>,
        ) -> Result<i64, ClientError> {
            self.request(Request::increment(bucket, key, by, op_id))?
                .into_counter()
        }

        /// Adds `elements` (at least one) to the set under `key` in `bucket`.
        pub fn set_add(
            $($recv)+ self,
            bucket: &[u8],
            key: &[u8],
            elements: Vec<Bytes>,
        ) -> Result<(), ClientError> {
            self.request(Request::set_add(bucket, key, elements))?
                .into_apply()
                .map(drop)
        }

        /// Removes `elements` (at least one) from the set under `key` in `bucket`: the adds
        /// the coordinating node has seen; a concurrent add survives.
        pub fn set_remove(
            $($recv)+ self,
            bucket: &[u8],
            key: &[u8],
            elements: Vec<Bytes>,
        ) -> Result<(), ClientError> {
            self.request(Request::set_remove(bucket, key, elements))?
                .into_apply()
                .map(drop)
        }

        /// Runs an operator command (`docs/PROTOCOL.md` §5.8.1), e.g. `cluster-status` with no
        /// arguments, and returns its text.
        pub fn admin($($recv)+ self, command: &str, args: &str) -> Result<String, ClientError> {
            self.request(Request::admin(command, args))?.into_admin()
        }
    };
    (async) => {
        /// Checks that the node answers.
        pub async fn ping(&self) -> Result<(), ClientError> {
            self.call(Request::Ping).await?.into_pong()
        }

        /// Reads `key` in `bucket`: every sibling and the context.
        pub async fn get(&self, bucket: &[u8], key: &[u8]) -> Result<GetReply, ClientError> {
            self.call(Request::get(bucket, key)).await?.into_get()
        }

        /// Writes `value` under `key` in `bucket`; `context` is what a GET returned, if any.
        /// Returns the new context.
        pub async fn put(
            &self,
            bucket: &[u8],
            key: &[u8],
            value: &[u8],
            context: Option<Bytes>,
        ) -> Result<Bytes, ClientError> {
            self.call(Request::put(bucket, key, value, context)).await?.into_put()
        }

        /// Writes `value` as [`Self::put`] does, expiring as `expiry` says (a time to live, an
        /// absolute time, or never despite the bucket's default).
        pub async fn put_expiring(
            &self,
            bucket: &[u8],
            key: &[u8],
            value: &[u8],
            context: Option<Bytes>,
            expiry: $crate::message::Expiry,
        ) -> Result<Bytes, ClientError> {
            self.call(Request::put(bucket, key, value, context).expiring(expiry))
                .await?
                .into_put()
        }

        /// Deletes `key` in `bucket`; deleting a missing key succeeds.
        pub async fn delete(
            &self,
            bucket: &[u8],
            key: &[u8],
            context: Option<Bytes>,
        ) -> Result<(), ClientError> {
            self.call(Request::delete(bucket, key, context)).await?.into_delete()
        }

        /// Changes fields of the map (a Redis hash) under `key` in `bucket`, an `lww` bucket:
        /// each field is a last-write-wins register, so concurrent updates of different fields
        /// all stay.
        pub async fn update(
            &self,
            bucket: &[u8],
            key: &[u8],
            ops: Vec<$crate::message::MapOp>,
        ) -> Result<(), ClientError> {
            self.call(Request::update(bucket, key, ops)).await?.into_update()
        }

        /// Applies `ops` to the convergent data type of type `crdt` under `key` in `bucket`
        /// (`docs/PROTOCOL.md` §5.4.2). `op_id` makes a retry count once (within the node's
        /// deduplication window); with `return_value` the value after the operations comes back.
        /// A key holding another type fails with a `ClientError::Server` of code `WrongType`.
        pub async fn apply(
            &self,
            bucket: &[u8],
            key: &[u8],
            crdt: $crate::message::CrdtType,
            ops: Vec<$crate::message::CrdtOp>,
            op_id: Option<u64>,
            return_value: bool,
        ) -> Result<Option<$crate::message::CrdtValue>, ClientError> {
            self.call(Request::apply(bucket, key, crdt, ops, op_id, return_value))
                .await?
                .into_apply()
        }

        /// Adds `by` (negative: subtracts) to the counter under `key` in `bucket` and returns
        /// its new value. Give an `op_id` to retry safely: the same id counts once.
        pub async fn increment(
            &self,
            bucket: &[u8],
            key: &[u8],
            by: i64,
            op_id: Option<u64>,
        ) -> Result<i64, ClientError> {
            self.call(Request::increment(bucket, key, by, op_id))
                .await?
                .into_counter()
        }

        /// Adds `elements` (at least one) to the set under `key` in `bucket`.
        pub async fn set_add(
            &self,
            bucket: &[u8],
            key: &[u8],
            elements: Vec<Bytes>,
        ) -> Result<(), ClientError> {
            self.call(Request::set_add(bucket, key, elements))
                .await?
                .into_apply()
                .map(drop)
        }

        /// Removes `elements` (at least one) from the set under `key` in `bucket`: the adds
        /// the coordinating node has seen; a concurrent add survives.
        pub async fn set_remove(
            &self,
            bucket: &[u8],
            key: &[u8],
            elements: Vec<Bytes>,
        ) -> Result<(), ClientError> {
            self.call(Request::set_remove(bucket, key, elements))
                .await?
                .into_apply()
                .map(drop)
        }

        /// Runs an operator command (`docs/PROTOCOL.md` §5.8.1), e.g. `cluster-status` with no
        /// arguments, and returns its text.
        pub async fn admin(&self, command: &str, args: &str) -> Result<String, ClientError> {
            self.call(Request::admin(command, args)).await?.into_admin()
        }
    };
}

mod blocking;
// The sans-IO core of the async client; the blocking client has one request at a time (or one
// batch) and keeps its simpler bookkeeping.
#[cfg(any(feature = "tokio", test))]
mod mux;
#[cfg(feature = "tokio")]
mod tokio_client;

use std::io;
use std::time::Duration;

use bytes::Bytes;

pub use blocking::{Client, Pool};
#[cfg(feature = "tokio")]
pub use tokio_client::{AsyncConnection, AsyncPool};

use crate::error::{EncodeError, FrameError};
use crate::frame::PROTOCOL_VERSION;
use crate::limits::Limits;
use crate::message::{
    Admin, Apply, ApplyOk, CrdtOp, CrdtType, CrdtValue, Delete, ErrorCode, Expiry, Get, GetOk,
    Hello, Kind, MapOp, Message, Put, PutOk, Role, Sibling, Update,
};

/// A client timeout as a request's `timeout_ms`: whole milliseconds, at least 1, at most what
/// the field holds (the node caps it further).
pub fn deadline_ms(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_millis())
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Settings of one connection, blocking or async.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Cluster name sent in HELLO; the node refuses another.
    pub cluster_name: String,
    /// Bound on connecting and on each request's round trip (the default per-request timeout of
    /// the async client, which can also take one per request).
    pub timeout: Duration,
    /// Frame and key limits; must not exceed the server's.
    pub limits: Limits,
    /// Most requests [`Client::pipeline`] keeps in flight. Bounded so that neither side's socket
    /// buffers fill with unread replies while the other side still writes.
    pub pipeline_window_max: usize,
    /// Most requests an [`AsyncConnection`] has in flight; further requests wait for a reply
    /// (or their timeout) before they are sent. This bounds the memory of queued requests and of
    /// waiting callers. The default matches a node's default `inflight_per_connection_max`.
    pub inflight_per_connection_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            cluster_name: "ringkv".to_owned(),
            timeout: Duration::from_secs(5),
            limits: Limits::DEFAULT,
            pipeline_window_max: 64,
            inflight_per_connection_max: 128,
        }
    }
}

/// Settings of a [`Pool`] or an [`AsyncPool`].
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Connections the pool opens at most (lazily, on demand). Default 4; 0 counts as 1.
    pub connections_max: usize,
    /// Attempts to open a connection before the request that needed it fails with the last
    /// attempt's error. Default 5; 0 counts as 1. Attempts also stop at the request's timeout.
    pub connect_attempts_max: u32,
    /// Wait after the first failed attempt; each further failure doubles it. Default 50 ms.
    pub reconnect_backoff_ms: u64,
    /// Cap on the wait between two attempts. Default 1000 ms.
    pub reconnect_backoff_ms_max: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connections_max: 4,
            connect_attempts_max: 5,
            reconnect_backoff_ms: 50,
            reconnect_backoff_ms_max: 1000,
        }
    }
}

impl PoolConfig {
    /// Number of connections, at least one.
    fn connections(&self) -> usize {
        self.connections_max.max(1)
    }

    /// Number of attempts to open a connection, at least one.
    fn attempts(&self) -> u32 {
        self.connect_attempts_max.max(1)
    }

    /// The wait after `failed` consecutive failed attempts (`failed >= 1`).
    fn backoff(&self, failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(32);
        let ms = self
            .reconnect_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.reconnect_backoff_ms_max);
        Duration::from_millis(ms)
    }
}

/// Counters of a pool, for tests and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections opened successfully (handshake included) since the pool was created.
    pub connects_total: u64,
    /// Attempts to open a connection that failed.
    pub connect_failures_total: u64,
}

/// One request, for [`Client::pipeline`] and the `call` methods of the async client.
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
        /// When the value expires; the bucket's default when absent.
        expiry: Option<Expiry>,
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
    /// Change fields of a map.
    Update {
        /// Bucket.
        bucket: Bytes,
        /// Key.
        key: Bytes,
        /// The changes, in order.
        ops: Vec<MapOp>,
    },
    /// Operations on a convergent data type.
    Apply {
        /// Bucket.
        bucket: Bytes,
        /// Key.
        key: Bytes,
        /// The key's type.
        crdt: CrdtType,
        /// The operations, in order.
        ops: Vec<CrdtOp>,
        /// The id that makes a retry count once, if any.
        op_id: Option<u64>,
        /// Whether the reply carries the value after the operations.
        return_value: bool,
    },
    /// Check the node answers.
    Ping,
    /// An operator command (`docs/PROTOCOL.md` §5.8), e.g. `cluster-status`.
    Admin {
        /// The command's name.
        command: String,
        /// Its arguments as the command defines them (UTF-8 text so far).
        args: Bytes,
    },
}

impl Request {
    /// A GET, copying the bucket and key.
    pub fn get(bucket: &[u8], key: &[u8]) -> Self {
        Request::Get {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::copy_from_slice(key),
        }
    }

    /// A PUT, copying the bucket, key and value.
    pub fn put(bucket: &[u8], key: &[u8], value: &[u8], context: Option<Bytes>) -> Self {
        Request::Put {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            context,
            expiry: None,
        }
    }

    /// This request with `expiry`, if it is a PUT; other requests are returned unchanged.
    pub fn expiring(mut self, expiry: Expiry) -> Self {
        if let Request::Put { expiry: e, .. } = &mut self {
            *e = Some(expiry);
        }
        self
    }

    /// A DELETE, copying the bucket and key.
    pub fn delete(bucket: &[u8], key: &[u8], context: Option<Bytes>) -> Self {
        Request::Delete {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::copy_from_slice(key),
            context,
        }
    }

    /// An UPDATE of a map's fields, copying the bucket and key.
    pub fn update(bucket: &[u8], key: &[u8], ops: Vec<MapOp>) -> Self {
        Request::Update {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::copy_from_slice(key),
            ops,
        }
    }

    /// An APPLY, copying the bucket and key.
    pub fn apply(
        bucket: &[u8],
        key: &[u8],
        crdt: CrdtType,
        ops: Vec<CrdtOp>,
        op_id: Option<u64>,
        return_value: bool,
    ) -> Self {
        Request::Apply {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::copy_from_slice(key),
            crdt,
            ops,
            op_id,
            return_value,
        }
    }

    /// An APPLY adding `by` to a counter and asking for its new value.
    pub fn increment(bucket: &[u8], key: &[u8], by: i64, op_id: Option<u64>) -> Self {
        Self::apply(
            bucket,
            key,
            CrdtType::Counter,
            vec![CrdtOp::Increment(by)],
            op_id,
            true,
        )
    }

    /// An APPLY adding `elements` to a set. Adding is idempotent, so a retry needs no `op_id`.
    pub fn set_add(bucket: &[u8], key: &[u8], elements: Vec<Bytes>) -> Self {
        let ops = elements.into_iter().map(CrdtOp::Add).collect();
        Self::apply(bucket, key, CrdtType::Set, ops, None, false)
    }

    /// An APPLY removing `elements` from a set. Removing is idempotent, so a retry needs no
    /// `op_id`.
    pub fn set_remove(bucket: &[u8], key: &[u8], elements: Vec<Bytes>) -> Self {
        let ops = elements.into_iter().map(CrdtOp::Remove).collect();
        Self::apply(bucket, key, CrdtType::Set, ops, None, false)
    }

    /// An ADMIN with text arguments.
    pub fn admin(command: &str, args: &str) -> Self {
        Request::Admin {
            command: command.to_owned(),
            args: Bytes::copy_from_slice(args.as_bytes()),
        }
    }

    /// The kind of the success reply.
    fn reply_kind(&self) -> Kind {
        match self {
            Request::Get { .. } => Kind::GetOk,
            Request::Put { .. } => Kind::PutOk,
            Request::Delete { .. } => Kind::DeleteOk,
            Request::Update { .. } => Kind::UpdateOk,
            Request::Apply { .. } => Kind::ApplyOk,
            Request::Ping => Kind::Pong,
            Request::Admin { .. } => Kind::AdminOk,
        }
    }

    /// The message for this request, with `deadline` (the client's timeout for it) as the
    /// node's deadline.
    fn into_message(self, deadline: Duration) -> Message {
        let timeout_ms = Some(deadline_ms(deadline));
        match self {
            Request::Get { bucket, key } => Message::Get(Get {
                bucket,
                key,
                r: None,
                timeout_ms,
            }),
            Request::Put {
                bucket,
                key,
                value,
                context,
                expiry,
            } => Message::Put(Put {
                bucket,
                key,
                value,
                context,
                w: None,
                dw: None,
                timeout_ms,
                expiry,
                condition: None,
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
                timeout_ms,
            }),
            Request::Update { bucket, key, ops } => Message::Update(Update {
                bucket,
                key,
                ops,
                w: None,
                dw: None,
                timeout_ms,
            }),
            Request::Apply {
                bucket,
                key,
                crdt,
                ops,
                op_id,
                return_value,
            } => Message::Apply(Apply {
                bucket,
                key,
                crdt,
                ops,
                op_id,
                return_value,
                w: None,
                dw: None,
                timeout_ms,
            }),
            Request::Ping => Message::Ping,
            Request::Admin { command, args } => Message::Admin(Admin { command, args }),
        }
    }
}

/// The reply to one [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A GET's siblings and context.
    Get(GetReply),
    /// A PUT's new context.
    Put(Bytes),
    /// A DELETE succeeded.
    Delete,
    /// An UPDATE succeeded.
    Update,
    /// An APPLY succeeded, with the value after it if the request asked for it.
    Apply(Option<CrdtValue>),
    /// PING answered.
    Pong,
    /// An operator command's result.
    Admin(Bytes),
}

impl Reply {
    /// The reply a success message stands for; any other message is a protocol violation.
    fn from_message(message: Message) -> Result<Self, ClientError> {
        match message {
            Message::GetOk(GetOk {
                siblings,
                context,
                expires_at_ms,
                fields,
                crdt,
            }) => Ok(Reply::Get(GetReply {
                siblings,
                context,
                expires_at_ms,
                fields,
                crdt,
            })),
            Message::PutOk(PutOk { context }) => Ok(Reply::Put(context)),
            Message::DeleteOk => Ok(Reply::Delete),
            Message::UpdateOk => Ok(Reply::Update),
            Message::ApplyOk(ApplyOk { value }) => Ok(Reply::Apply(value)),
            Message::Pong => Ok(Reply::Pong),
            Message::AdminOk(ok) => Ok(Reply::Admin(ok.body)),
            other => Err(ClientError::Unexpected(other.kind().to_string())),
        }
    }

    fn into_get(self) -> Result<GetReply, ClientError> {
        match self {
            Reply::Get(reply) => Ok(reply),
            other => Err(other.unexpected()),
        }
    }

    fn into_put(self) -> Result<Bytes, ClientError> {
        match self {
            Reply::Put(context) => Ok(context),
            other => Err(other.unexpected()),
        }
    }

    fn into_delete(self) -> Result<(), ClientError> {
        match self {
            Reply::Delete => Ok(()),
            other => Err(other.unexpected()),
        }
    }

    fn into_update(self) -> Result<(), ClientError> {
        match self {
            Reply::Update => Ok(()),
            other => Err(other.unexpected()),
        }
    }

    fn into_apply(self) -> Result<Option<CrdtValue>, ClientError> {
        match self {
            Reply::Apply(value) => Ok(value),
            other => Err(other.unexpected()),
        }
    }

    /// A counter's value from an APPLY_OK that was asked for it; a missing value or one of
    /// another type is the server breaking the protocol.
    fn into_counter(self) -> Result<i64, ClientError> {
        match self.into_apply()? {
            Some(CrdtValue::Counter(n)) => Ok(n),
            Some(_) => Err(ClientError::Unexpected(
                "APPLY_OK with a value that is not a counter".into(),
            )),
            None => Err(ClientError::Unexpected(
                "APPLY_OK without the value it was asked for".into(),
            )),
        }
    }

    /// The text of an ADMIN_OK; every command's result is UTF-8 text so far.
    fn into_admin(self) -> Result<String, ClientError> {
        match self {
            Reply::Admin(body) => String::from_utf8(body.to_vec())
                .map_err(|_| ClientError::Unexpected("ADMIN_OK body that is not UTF-8".into())),
            other => Err(other.unexpected()),
        }
    }

    fn into_pong(self) -> Result<(), ClientError> {
        match self {
            Reply::Pong => Ok(()),
            other => Err(other.unexpected()),
        }
    }

    fn unexpected(&self) -> ClientError {
        let kind = match self {
            Reply::Get(_) => Kind::GetOk,
            Reply::Put(_) => Kind::PutOk,
            Reply::Delete => Kind::DeleteOk,
            Reply::Update => Kind::UpdateOk,
            Reply::Apply(_) => Kind::ApplyOk,
            Reply::Pong => Kind::Pong,
            Reply::Admin(_) => Kind::AdminOk,
        };
        ClientError::Unexpected(kind.to_string())
    }
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
    /// No reply within the request's timeout (for a pool: no connection and reply within it).
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
    /// The server answered with a reply that does not fit the request, or answered a request that
    /// was never sent.
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
    /// An earlier error left the connection unusable; the request was not sent. Reconnect (a pool
    /// does so by itself).
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

    /// A copy for each request that a broken connection fails. `io::Error` is not `Clone`; its
    /// kind and message carry what a caller can act on.
    #[cfg(any(feature = "tokio", test))]
    fn duplicate(&self) -> Self {
        match self {
            Self::NoAddress(addr) => Self::NoAddress(addr.clone()),
            Self::Io { op, source } => Self::Io {
                op,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Self::Timeout(d) => Self::Timeout(*d),
            Self::Closed => Self::Closed,
            Self::Encode(e) => Self::Encode(e.clone()),
            Self::Frame(e) => Self::Frame(e.clone()),
            Self::Unexpected(s) => Self::Unexpected(s.clone()),
            Self::Server { code, message } => Self::Server {
                code: *code,
                message: message.clone(),
            },
            Self::Broken => Self::Broken,
        }
    }

    /// Whether another attempt to connect may succeed: not when the server refused the
    /// handshake for good (wrong cluster, unsupported version).
    fn connect_retryable(&self) -> bool {
        match self {
            Self::Server { code, .. } => code.is_transient(),
            Self::Encode(_) => false,
            _ => true,
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
    /// When the key expires (Unix milliseconds), if every value sibling expires.
    pub expires_at_ms: Option<u64>,
    /// A map as a node of an older version answers it (its fields, in name order); this
    /// version's nodes answer maps in `crdt`. [`GetReply::registers`] reads either.
    pub fields: Option<Vec<(Bytes, Bytes)>>,
    /// For a key holding a convergent data type (a counter, a set, a map): its value. A
    /// missing key has none, whatever type its APPLYs would give it.
    pub crdt: Option<CrdtValue>,
}

impl GetReply {
    /// The register fields of a map (what UPDATE writes), in name order, whichever form the
    /// node answered in; `None` when the key holds no map.
    pub fn registers(&self) -> Option<Vec<(Bytes, Bytes)>> {
        if let Some(fields) = &self.fields {
            return Some(fields.clone());
        }
        let Some(CrdtValue::Map(fields)) = &self.crdt else {
            return None;
        };
        let registers = fields.iter().filter_map(|(name, v)| match v {
            crate::message::FieldValue::Register(v) => Some((name.clone(), v.clone())),
            _ => None,
        });
        Some(registers.collect())
    }

    /// The value, when there is exactly one live sibling.
    pub fn value(&self) -> Option<&Bytes> {
        match self.siblings.as_slice() {
            [Sibling::Value(v)] => Some(v),
            _ => None,
        }
    }
}

/// The HELLO every client connection starts with.
fn hello(config: &ClientConfig) -> Message {
    Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Client,
        cluster_name: config.cluster_name.clone(),
        node_name: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff doubles from the first wait up to the cap and never overflows.
    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = PoolConfig::default();
        let ms = |n| p.backoff(n).as_millis();
        assert_eq!(ms(1), 50);
        assert_eq!(ms(2), 100);
        assert_eq!(ms(3), 200);
        assert_eq!(ms(5), 800);
        assert_eq!(ms(6), 1000);
        assert_eq!(ms(u32::MAX), 1000);
    }

    /// Zero counts are clamped to one, so a pool always has a connection and an attempt.
    #[test]
    fn zero_counts_mean_one() {
        let p = PoolConfig {
            connections_max: 0,
            connect_attempts_max: 0,
            ..PoolConfig::default()
        };
        assert_eq!(p.connections(), 1);
        assert_eq!(p.attempts(), 1);
    }

    /// Each request expects the reply kind of its message kind.
    #[test]
    fn reply_kinds_match_request_kinds() {
        for request in [
            Request::get(b"b", b"k"),
            Request::put(b"b", b"k", b"v", None),
            Request::delete(b"b", b"k", None),
            Request::update(b"b", b"k", vec![MapOp::Expire(Expiry::Never)]),
            Request::increment(b"b", b"k", 1, None),
            Request::Ping,
            Request::admin("cluster-status", ""),
        ] {
            let expect = request.reply_kind();
            let message = request.into_message(Duration::from_millis(1500));
            assert_eq!(message.kind().reply(), Some(expect));
            let deadline = match &message {
                Message::Get(m) => m.timeout_ms,
                Message::Put(m) => m.timeout_ms,
                Message::Delete(m) => m.timeout_ms,
                Message::Update(m) => m.timeout_ms,
                Message::Apply(m) => m.timeout_ms,
                _ => Some(1500),
            };
            assert_eq!(
                deadline,
                Some(1500),
                "the client's timeout travels as the deadline"
            );
        }
    }

    /// The APPLY shorthands build the operations and flags their names promise, with the
    /// client's deadline and the bucket's quorums.
    #[test]
    fn apply_shorthands_build_their_messages() {
        let deadline = Duration::from_millis(1500);
        let apply = |crdt, ops, op_id, return_value| {
            Message::Apply(Apply {
                bucket: Bytes::from_static(b"b"),
                key: Bytes::from_static(b"k"),
                crdt,
                ops,
                op_id,
                return_value,
                w: None,
                dw: None,
                timeout_ms: Some(1500),
            })
        };
        assert_eq!(
            Request::increment(b"b", b"k", -3, Some(7)).into_message(deadline),
            apply(
                CrdtType::Counter,
                vec![CrdtOp::Increment(-3)],
                Some(7),
                true
            )
        );
        let elements = vec![Bytes::from_static(b"x"), Bytes::from_static(b"y")];
        assert_eq!(
            Request::set_add(b"b", b"k", elements.clone()).into_message(deadline),
            apply(
                CrdtType::Set,
                vec![
                    CrdtOp::Add(Bytes::from_static(b"x")),
                    CrdtOp::Add(Bytes::from_static(b"y"))
                ],
                None,
                false
            )
        );
        assert_eq!(
            Request::set_remove(b"b", b"k", elements).into_message(deadline),
            apply(
                CrdtType::Set,
                vec![
                    CrdtOp::Remove(Bytes::from_static(b"x")),
                    CrdtOp::Remove(Bytes::from_static(b"y"))
                ],
                None,
                false
            )
        );
    }

    /// APPLY_OK becomes the value it carries; `increment` accepts only a counter, and any other
    /// reply to an APPLY is the server breaking the protocol.
    #[test]
    fn apply_replies_map_to_values() {
        let ok = |value| Reply::from_message(Message::ApplyOk(ApplyOk { value })).unwrap();
        assert_eq!(
            ok(Some(CrdtValue::Counter(5))).into_apply().unwrap(),
            Some(CrdtValue::Counter(5))
        );
        assert_eq!(ok(Some(CrdtValue::Counter(-5))).into_counter().unwrap(), -5);
        assert_eq!(ok(None).into_apply().unwrap(), None);
        assert!(matches!(
            ok(None).into_counter(),
            Err(ClientError::Unexpected(_))
        ));
        assert!(matches!(
            ok(Some(CrdtValue::Set(Vec::new()))).into_counter(),
            Err(ClientError::Unexpected(_))
        ));
        match Reply::Update.into_apply() {
            Err(ClientError::Unexpected(kind)) => assert_eq!(kind, "UPDATE_OK"),
            other => panic!("{other:?}"),
        }
    }

    /// A GET of a convergent data type surfaces its value beside the (empty) siblings.
    #[test]
    fn get_reply_carries_a_crdt_value() {
        let value = CrdtValue::Set(vec![Bytes::from_static(b"a")]);
        let reply = Reply::from_message(Message::GetOk(GetOk {
            siblings: Vec::new(),
            context: Bytes::new(),
            expires_at_ms: Some(9),
            fields: None,
            crdt: Some(value.clone()),
        }))
        .unwrap()
        .into_get()
        .unwrap();
        assert_eq!(reply.crdt, Some(value));
        assert_eq!(reply.expires_at_ms, Some(9));
        assert_eq!(reply.value(), None);
    }
}
