//! The clients against scripted fake servers on loopback: multiplexing, timeouts, backpressure,
//! failures and reconnects, each provoked on purpose, with no real node.
//!
//! Each test starts a tokio listener on 127.0.0.1:0 and a server task that performs the handshake
//! and then answers exactly as the test scripts it (out of order, late, never, wrongly, or by
//! closing the connection). Waits are for events (a frame read, a channel message), never for
//! wall-clock time; the only timeouts that fire are the ones a test provokes, and none is
//! asserted on its duration.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ringkv_net::{
    AsyncConnection, AsyncPool, ClientConfig, ClientError, Frame, GetOk, HelloOk, Kind, Limits,
    Message, Pool, PoolConfig, Reply, Request, Sibling, decode_frame, encode_frame_to_vec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Long enough never to fire unless a test means it to.
const PATIENT: Duration = Duration::from_secs(30);

fn config() -> ClientConfig {
    ClientConfig {
        timeout: PATIENT,
        ..ClientConfig::default()
    }
}

/// The server side of one connection, after the handshake.
struct FakeConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl FakeConn {
    /// Accepts a connection and answers its HELLO.
    async fn accept(listener: &TcpListener) -> FakeConn {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = FakeConn {
            stream,
            buf: BytesMut::new(),
        };
        let hello = conn.next().await.unwrap();
        assert!(matches!(hello.message, Message::Hello(_)));
        let ok = Message::HelloOk(HelloOk {
            protocol_version: 1,
            node_name: "fake".into(),
            shard_count: 1,
            shard: 0,
        });
        conn.send(hello.request_id, ok).await;
        conn
    }

    /// The next request, or `None` once the client closed the connection.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf, &Limits::DEFAULT).unwrap() {
                self.buf.advance(used);
                return Some(frame);
            }
            if self.stream.read_buf(&mut self.buf).await.unwrap() == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, request_id: u64, message: Message) {
        let frame = Frame {
            request_id,
            message,
        };
        let bytes = encode_frame_to_vec(&frame, &Limits::DEFAULT).unwrap();
        self.stream.write_all(&bytes).await.unwrap();
    }
}

/// The reply a well-behaved node would give: GET returns the key as its value, PUT returns the
/// key as the context.
fn answer(message: &Message) -> Message {
    match message {
        Message::Get(get) => Message::GetOk(GetOk {
            siblings: vec![Sibling::Value(get.key.clone())],
            context: Bytes::from_static(b"ctx"),
            expires_at_ms: None,
            fields: None,
            crdt: None,
        }),
        Message::Put(put) => Message::PutOk(ringkv_net::PutOk {
            context: put.key.clone(),
        }),
        Message::Delete(_) => Message::DeleteOk,
        Message::Ping => Message::Pong,
        other => panic!("unexpected request {other:?}"),
    }
}

/// Serves one connection correctly until the client closes it.
async fn serve_well(mut conn: FakeConn) {
    while let Some(frame) = conn.next().await {
        conn.send(frame.request_id, answer(&frame.message)).await;
    }
}

async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

/// Many tasks share one connection: the server waits until it holds all their requests and
/// answers them in reverse order, so every reply overtakes others; each task still gets the
/// reply to its own request (its key echoed back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_replies_reach_their_callers() {
    const TASKS: usize = 32;
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let mut held = Vec::new();
        while held.len() < TASKS {
            held.push(conn.next().await.unwrap());
        }
        for frame in held.into_iter().rev() {
            conn.send(frame.request_id, answer(&frame.message)).await;
        }
        serve_well(conn).await;
    });
    let client = AsyncConnection::connect(&addr, config()).await.unwrap();
    assert_eq!(client.server().node_name, "fake");
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let key = format!("key-{i}");
                let got = client.get(b"b", key.as_bytes()).await.unwrap();
                assert_eq!(got.value().map(|v| v.to_vec()), Some(key.into_bytes()));
                assert_eq!(&got.context[..], b"ctx");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Puts and deletes with and without a context, on the same connection.
    let context = client.put(b"b", b"k", b"v", None).await.unwrap();
    assert_eq!(&context[..], b"k");
    client.put(b"b", b"k", b"v2", Some(context)).await.unwrap();
    client.delete(b"b", b"k", None).await.unwrap();
    client.ping().await.unwrap();
    assert_eq!(client.in_flight(), 0);
    drop(client);
    server.await.unwrap();
}

/// A request that times out is abandoned: its reply, sent later, is dropped, and the connection
/// keeps serving the requests after it.
#[tokio::test]
async fn late_reply_is_dropped_and_the_connection_stays_usable() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let slow = conn.next().await.unwrap();
        // The next request comes only after the slow one timed out; answer the slow one first.
        let next = conn.next().await.unwrap();
        conn.send(slow.request_id, answer(&slow.message)).await;
        conn.send(next.request_id, answer(&next.message)).await;
        serve_well(conn).await;
    });
    let client = AsyncConnection::connect(&addr, config()).await.unwrap();
    let slow = client
        .call_timeout(Request::get(b"b", b"slow"), Duration::from_millis(50))
        .await;
    assert!(matches!(slow, Err(ClientError::Timeout(_))), "{slow:?}");
    assert_eq!(client.in_flight(), 0);
    assert_eq!(client.call(Request::Ping).await.unwrap(), Reply::Pong);
    let got = client.get(b"b", b"fast").await.unwrap();
    assert_eq!(got.value().map(|v| v.to_vec()), Some(b"fast".to_vec()));
    assert!(!client.is_broken());
    drop(client);
    server.await.unwrap();
}

/// With two requests allowed in flight and both held by the server, a third waits for a slot
/// and is never sent: the server, reading up to a later PING, sees only the two. The two then
/// complete normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_bound_holds_requests_back() {
    let (listener, addr) = listener().await;
    let (seen_tx, mut seen_rx) = mpsc::channel(4);
    let (release_tx, mut release_rx) = mpsc::channel::<()>(1);
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let a = conn.next().await.unwrap();
        let b = conn.next().await.unwrap();
        seen_tx.send(()).await.unwrap();
        release_rx.recv().await.unwrap();
        conn.send(a.request_id, answer(&a.message)).await;
        conn.send(b.request_id, answer(&b.message)).await;
        // Whatever the client sent before its PING arrives before it.
        let mut before_ping = Vec::new();
        loop {
            let frame = conn.next().await.unwrap();
            if matches!(frame.message, Message::Ping) {
                conn.send(frame.request_id, Message::Pong).await;
                break;
            }
            before_ping.push(frame.message.kind());
        }
        serve_well(conn).await;
        before_ping
    });
    let client = AsyncConnection::connect(
        &addr,
        ClientConfig {
            inflight_per_connection_max: 2,
            ..config()
        },
    )
    .await
    .unwrap();
    let held: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|k| {
            let client = client.clone();
            tokio::spawn(async move { client.get(b"b", k.as_bytes()).await })
        })
        .collect();
    seen_rx.recv().await.unwrap();
    assert_eq!(client.in_flight(), 2);
    let third = client
        .call_timeout(Request::get(b"b", b"c"), Duration::from_millis(50))
        .await;
    assert!(matches!(third, Err(ClientError::Timeout(_))), "{third:?}");
    release_tx.send(()).await.unwrap();
    for h in held {
        h.await.unwrap().unwrap();
    }
    client.ping().await.unwrap();
    drop(client);
    let before_ping = server.await.unwrap();
    assert_eq!(
        before_ping,
        Vec::<Kind>::new(),
        "the third request was sent"
    );
}

/// The server closes a connection with requests in flight: they fail at once with `Closed`
/// (nothing waits for the timeout), the connection refuses further requests with `Broken`, and a
/// pool replaces it with a new connection on the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connection_fails_requests_and_the_pool_reconnects() {
    let (listener, addr) = listener().await;
    let listener = Arc::new(listener);
    let server_listener = Arc::clone(&listener);
    let server = tokio::spawn(async move {
        // First a plain connection, closed after two requests arrive.
        let mut conn = FakeConn::accept(&server_listener).await;
        conn.next().await.unwrap();
        conn.next().await.unwrap();
        drop(conn);
        // Then the pool's first connection, closed the same way, and its replacement.
        let mut conn = FakeConn::accept(&server_listener).await;
        conn.next().await.unwrap();
        drop(conn);
        serve_well(FakeConn::accept(&server_listener).await).await;
    });

    let client = AsyncConnection::connect(&addr, config()).await.unwrap();
    let (a, b) = tokio::join!(client.get(b"b", b"a"), client.ping());
    assert!(matches!(a, Err(ClientError::Closed)), "{a:?}");
    assert!(matches!(b, Err(ClientError::Closed)), "{b:?}");
    assert!(client.is_broken());
    assert!(matches!(client.ping().await, Err(ClientError::Broken)));
    drop(client);

    let pool = AsyncPool::connect(
        &addr,
        config(),
        PoolConfig {
            connections_max: 1,
            ..PoolConfig::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(pool.stats().connects_total, 1);
    assert!(matches!(pool.ping().await, Err(ClientError::Closed)));
    let got = pool.get(b"b", b"after").await.unwrap();
    assert_eq!(got.value().map(|v| v.to_vec()), Some(b"after".to_vec()));
    assert_eq!(pool.stats().connects_total, 2);
    drop(pool);
    server.await.unwrap();
}

/// A reply of the wrong kind is a protocol violation: the request fails with `Unexpected`, and
/// the connection is broken for good.
#[tokio::test]
async fn wrong_reply_kind_breaks_the_connection() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let get = conn.next().await.unwrap();
        conn.send(get.request_id, Message::Pong).await;
        // The client stops using the connection; wait for it to close.
        assert!(conn.next().await.is_none());
    });
    let client = AsyncConnection::connect(&addr, config()).await.unwrap();
    let got = client.get(b"b", b"k").await;
    assert!(matches!(got, Err(ClientError::Unexpected(_))), "{got:?}");
    assert!(matches!(client.ping().await, Err(ClientError::Broken)));
    drop(client);
    server.await.unwrap();
}

/// A server that refuses the handshake for good (wrong cluster) is not retried by a pool: the
/// error comes back after one attempt.
#[tokio::test]
async fn refused_handshake_is_not_retried() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = FakeConn {
            stream,
            buf: BytesMut::new(),
        };
        let hello = conn.next().await.unwrap();
        let refusal = ringkv_net::ErrorBody::new(ringkv_net::ErrorCode::WrongCluster, "no");
        conn.send(hello.request_id, Message::Error(refusal)).await;
    });
    let pool = AsyncPool::connect(&addr, config(), PoolConfig::default()).await;
    match pool {
        Err(ClientError::Server { code, .. }) => {
            assert_eq!(code, ringkv_net::ErrorCode::WrongCluster);
        }
        other => panic!("{other:?}"),
    }
    server.await.unwrap();
}

/// The blocking pool, from several threads: a connection the server closes with a request in
/// flight fails that request with `Closed`, and the next request gets a new connection. Threads
/// beyond the pool's two connections wait their turn instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_pool_replaces_a_broken_connection() {
    let (listener, addr) = listener().await;
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        // The pool's first connection: closed when its first request arrives.
        let mut conn = FakeConn::accept(&listener).await;
        conn.next().await.unwrap();
        drop(conn);
        loop {
            tokio::select! {
                conn = FakeConn::accept(&listener) => drop(tokio::spawn(serve_well(conn))),
                _ = &mut done_rx => break,
            }
        }
    });
    let blocking = tokio::task::spawn_blocking(move || {
        let pool = Pool::connect(
            &addr,
            config(),
            PoolConfig {
                connections_max: 2,
                ..PoolConfig::default()
            },
        )
        .unwrap();
        assert!(matches!(pool.ping(), Err(ClientError::Closed)));
        pool.ping().unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let pool = &pool;
                s.spawn(move || {
                    for i in 0..20 {
                        let key = format!("t{t}-{i}");
                        let context = pool.put(b"b", key.as_bytes(), b"v", None).unwrap();
                        assert_eq!(context, key.as_bytes());
                        let got = pool.get(b"b", key.as_bytes()).unwrap();
                        assert_eq!(got.value().map(|v| v.to_vec()), Some(key.into_bytes()));
                    }
                });
            }
        });
        let stats = pool.stats();
        // The first connection, its replacement and at most one more for the second slot.
        assert!((2..=3).contains(&stats.connects_total), "{stats:?}");
    });
    blocking.await.unwrap();
    done_tx.send(()).unwrap();
    server.await.unwrap();
}

/// A signal caught while a blocking client waits for a reply does not fail the request. A read
/// on a socket with a receive timeout is never restarted after a signal handler ran, whatever
/// `SA_RESTART` says (socket(7)): it fails with EINTR, which the client must read through. The
/// server holds the reply back while the test sends SIGUSR1 (caught by a handler that does
/// nothing) to the client's thread a few times, then answers; the PING must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Installing a signal handler and signalling one thread have no safe std interface.
#[allow(unsafe_code)]
async fn a_signal_during_a_blocking_read_does_not_fail_the_request() {
    /// Signals sent while the reply is held back, [`SIGNAL_GAP`] apart: the first may land
    /// before the client is blocked in read, the later ones find it there.
    const SIGNALS: usize = 5;
    const SIGNAL_GAP: Duration = Duration::from_millis(20);
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing for a signal no other test uses; the struct
    // is zeroed (no flags, empty mask) before the handler is set.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
            0
        );
    }
    let (listener, addr) = listener().await;
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let frame = conn.next().await.unwrap();
        got_tx.send(()).unwrap();
        go_rx.await.unwrap();
        conn.send(frame.request_id, answer(&frame.message)).await;
        serve_well(conn).await;
    });
    let (thread_tx, thread_rx) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        thread_tx.send(unsafe { libc::pthread_self() }).unwrap();
        let mut client = ringkv_net::Client::connect(addr.as_str(), config()).unwrap();
        client.ping()
    });
    let thread = thread_rx.recv().unwrap();
    got_rx.await.unwrap();
    for _ in 0..SIGNALS {
        // SAFETY: the thread is alive: it is blocked on the reply the server holds back.
        assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR1) }, 0);
        tokio::time::sleep(SIGNAL_GAP).await;
    }
    go_tx.send(()).unwrap();
    let pinged = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    assert!(pinged.is_ok(), "{pinged:?}");
    server.await.unwrap();
}
