//! End to end through the client libraries: `ringkv serve` as a child process (see
//! `common/mod.rs`) driven by the tokio pool, the blocking pool, and a real Redis client crate on
//! the RESP listener.
//!
//! Nothing asserts on wall-clock time. The restart test allows a bounded number of typed
//! failures (at most one per pooled connection) while connections notice the old server is gone,
//! and asserts none of them hangs.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{KEYS, Server, config, data_dir, free_port, key, value};
use ringkv_net::{
    AsyncPool, ClientError, ErrorCode, Expiry, MapOp, Pool, PoolConfig, Reply, Request, Sibling,
};

const CONNECTIONS: usize = 4;

fn pool_config() -> PoolConfig {
    PoolConfig {
        connections_max: CONNECTIONS,
        ..PoolConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Whether `e` is a failure of the connection (as opposed to a refusal by the server), which is
/// what requests see while a server is down or just restarted.
fn connection_failure(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Io { .. } | ClientError::Closed | ClientError::Broken
    )
}

/// Many tasks over one tokio pool of four connections: each writes its keys blind, reads them
/// (one sibling and a context), overwrites them with that context, and deletes half of them with
/// the context of another read. A blocking client then sees exactly the result, per-request
/// timeouts and server refusals work through the pool, and the pool never opened more than its
/// four connections.
#[test]
fn tokio_pool_put_get_delete_from_many_tasks() {
    const TASKS: usize = 16;
    const KEYS_PER_TASK: usize = 25;
    let dir = data_dir("tokio-crud");
    let server = Server::start(&dir, free_port());
    let rt = runtime();
    let pool = rt.block_on(async {
        let pool = AsyncPool::connect(&server.addr, config(), pool_config())
            .await
            .unwrap();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    for i in 0..KEYS_PER_TASK {
                        let k = key(t * KEYS_PER_TASK + i);
                        pool.put(b"tokio", &k, &value(i, 0), None).await.unwrap();
                        let got = pool.get(b"tokio", &k).await.unwrap();
                        assert_eq!(got.siblings, vec![Sibling::Value(value(i, 0).into())]);
                        pool.put(b"tokio", &k, &value(i, 1), Some(got.context))
                            .await
                            .unwrap();
                        if i % 2 == 0 {
                            let got = pool.get(b"tokio", &k).await.unwrap();
                            pool.delete(b"tokio", &k, Some(got.context)).await.unwrap();
                            assert!(pool.get(b"tokio", &k).await.unwrap().siblings.is_empty());
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let reply = pool
            .call_timeout(Request::Ping, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(reply, Reply::Pong);
        // A value over the node's 1 MiB limit is refused; the pool goes on.
        let big = vec![0u8; (1 << 20) + 1];
        match pool.put(b"tokio", b"big", &big, None).await {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::TooLarge),
            other => panic!("{other:?}"),
        }
        pool.ping().await.unwrap();
        pool
    });
    let stats = pool.stats();
    assert!(
        (1..=CONNECTIONS as u64).contains(&stats.connects_total),
        "{stats:?}"
    );
    assert_eq!(stats.connect_failures_total, 0);

    let mut c = server.client();
    for t in 0..TASKS {
        for i in 0..KEYS_PER_TASK {
            let got = c.get(b"tokio", &key(t * KEYS_PER_TASK + i)).unwrap();
            if i % 2 == 0 {
                assert!(got.siblings.is_empty(), "task {t} key {i} was deleted");
            } else {
                assert_eq!(got.value().map(|v| v.to_vec()), Some(value(i, 1)));
            }
        }
    }
    drop(pool);
    drop(rt);
    assert_eq!(server.terminate().code(), Some(0));
}

/// The blocking pool shared by eight threads over four connections: each thread writes, reads,
/// overwrites with the context and deletes its own keys, then reads them back in one pipelined
/// batch. Threads beyond the four connections wait for one instead of failing.
#[test]
fn blocking_pool_from_many_threads() {
    const THREADS: usize = 8;
    const KEYS_PER_THREAD: usize = 25;
    let dir = data_dir("blocking-pool");
    let server = Server::start(&dir, free_port());
    let pool = Pool::connect(&server.addr, config(), pool_config()).unwrap();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let pool = &pool;
            s.spawn(move || {
                let keys: Vec<_> = (0..KEYS_PER_THREAD)
                    .map(|i| key(t * KEYS_PER_THREAD + i))
                    .collect();
                for (i, k) in keys.iter().enumerate() {
                    pool.put(b"pool", k, &value(i, 0), None).unwrap();
                    let got = pool.get(b"pool", k).unwrap();
                    assert_eq!(got.value().map(|v| v.to_vec()), Some(value(i, 0)));
                    let context = pool
                        .put(b"pool", k, &value(i, 1), Some(got.context))
                        .unwrap();
                    if i % 5 == 0 {
                        // With the context of the write, so the delete supersedes it.
                        pool.delete(b"pool", k, Some(context)).unwrap();
                    }
                }
                let reads = keys.iter().map(|k| Request::get(b"pool", k)).collect();
                let replies = pool.pipeline(reads).unwrap();
                for (i, reply) in replies.into_iter().enumerate() {
                    let Ok(Reply::Get(got)) = reply else {
                        panic!("thread {t} read {i}: {reply:?}");
                    };
                    if i % 5 == 0 {
                        assert!(got.siblings.is_empty());
                    } else {
                        assert_eq!(got.value().map(|v| v.to_vec()), Some(value(i, 1)));
                    }
                }
            });
        }
    });
    // Map fields and expiry through the typed client (`redis` is an lww bucket on defaults).
    pool.update(
        b"redis",
        b"map",
        vec![
            MapOp::Set {
                field: Bytes::from_static(b"f"),
                value: Bytes::from_static(b"v"),
            },
            MapOp::Expire(Expiry::Ttl { ms: 3_600_000 }),
        ],
    )
    .unwrap();
    let got = pool.get(b"redis", b"map").unwrap();
    assert_eq!(
        got.registers(),
        Some(vec![(Bytes::from_static(b"f"), Bytes::from_static(b"v"))])
    );
    assert!(got.expires_at_ms.is_some());
    pool.put_expiring(b"pool", b"ttl", b"v", None, Expiry::Ttl { ms: 3_600_000 })
        .unwrap();
    assert!(pool.get(b"pool", b"ttl").unwrap().expires_at_ms.is_some());
    let stats = pool.stats();
    assert!(
        (1..=CONNECTIONS as u64).contains(&stats.connects_total),
        "{stats:?}"
    );
    drop(pool);
    assert_eq!(server.terminate().code(), Some(0));
}

/// Both pools across a crash and restart of the server: with `--durability sync`, keys written
/// through both pools are acknowledged on disk; the server is killed with SIGKILL; a request
/// while it is down fails with a typed connection error after bounded reconnect attempts (it
/// does not hang); the server restarts on the same port and data directory; the pools reconnect
/// by themselves and read every key back intact.
#[test]
fn pools_survive_a_server_restart() {
    let dir = data_dir("restart");
    let port = free_port();
    let mut server = Server::start_durable(&dir, port, "sync", &[]);
    let addr = server.addr.clone();
    let rt = runtime();
    let tokio_pool = rt.block_on(async {
        let pool = AsyncPool::connect(&addr, config(), pool_config())
            .await
            .unwrap();
        // Round-robin over the slots opens every connection.
        for i in 0..KEYS / 2 {
            pool.put(b"restart", &key(i), &value(i, 0), None)
                .await
                .unwrap();
        }
        pool
    });
    assert_eq!(tokio_pool.stats().connects_total, CONNECTIONS as u64);
    let blocking_pool = Pool::connect(&addr, config(), pool_config()).unwrap();
    std::thread::scope(|s| {
        for t in 0..CONNECTIONS {
            let pool = &blocking_pool;
            s.spawn(move || {
                for i in (KEYS / 2 + t..KEYS).step_by(CONNECTIONS) {
                    pool.put(b"restart", &key(i), &value(i, 0), None).unwrap();
                }
            });
        }
    });
    let tokio_connects = tokio_pool.stats().connects_total;
    let blocking_connects = blocking_pool.stats().connects_total;

    server.kill();
    let down = rt.block_on(tokio_pool.ping());
    assert!(
        down.as_ref().is_err_and(connection_failure),
        "tokio pool with the server down: {down:?}"
    );
    let down = blocking_pool.ping();
    assert!(
        down.as_ref().is_err_and(connection_failure),
        "blocking pool with the server down: {down:?}"
    );

    let server = Server::start_durable(&dir, port, "sync", &[]);
    // Each pooled connection may fail one request, with a typed error, if the pool picks it
    // before it has seen the old server's end of stream; the reconnected pool then serves every
    // request.
    let mut failures = 0;
    rt.block_on(async {
        for i in 0..KEYS {
            match tokio_pool.get(b"restart", &key(i)).await {
                Ok(got) => assert_eq!(got.value().map(|v| v.to_vec()), Some(value(i, 0))),
                Err(e) if connection_failure(&e) && failures < CONNECTIONS => failures += 1,
                Err(e) => panic!("tokio pool after restart, key {i}: {e:?}"),
            }
        }
        for i in 0..KEYS {
            let got = tokio_pool.get(b"restart", &key(i)).await.unwrap();
            assert_eq!(got.value().map(|v| v.to_vec()), Some(value(i, 0)));
        }
    });
    let mut blocking_failures = 0;
    for i in 0..KEYS {
        match blocking_pool.get(b"restart", &key(i)) {
            Ok(got) => assert_eq!(got.value().map(|v| v.to_vec()), Some(value(i, 0))),
            Err(e) if connection_failure(&e) && blocking_failures < CONNECTIONS => {
                blocking_failures += 1;
            }
            Err(e) => panic!("blocking pool after restart, key {i}: {e:?}"),
        }
    }
    for i in 0..KEYS {
        let got = blocking_pool.get(b"restart", &key(i)).unwrap();
        assert_eq!(got.value().map(|v| v.to_vec()), Some(value(i, 0)));
    }
    eprintln!(
        "typed failures after the restart: tokio pool {failures}, blocking pool {blocking_failures}"
    );
    assert!(tokio_pool.stats().connects_total > tokio_connects);
    assert!(blocking_pool.stats().connects_total > blocking_connects);
    drop(tokio_pool);
    drop(rt);
    drop(blocking_pool);
    assert_eq!(server.terminate().code(), Some(0));
}

/// A real Redis client (the `redis` crate, sync API) on the RESP listener: PING, SET and GET of
/// text and binary values, MGET with a missing key, EXISTS counting repeats, DEL counting only
/// existing keys, a pipeline, and a value set over RESP read back through the binary protocol
/// in the bucket the RESP listener uses.
#[test]
fn redis_crate_speaks_to_the_resp_listener() {
    use redis::Commands;

    let dir = data_dir("redis");
    let resp_addr = format!("127.0.0.1:{}", free_port());
    let server = Server::start_with(&dir, free_port(), &["--resp-listen", &resp_addr]);
    let client = redis::Client::open(format!("redis://{resp_addr}/")).unwrap();
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(10))
        .unwrap();
    con.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    let pong: String = redis::cmd("PING").query(&mut con).unwrap();
    assert_eq!(pong, "PONG");
    let () = con.set("greeting", "hello").unwrap();
    let binary = b"a\r\nb\0c".to_vec();
    let () = con.set("binary", &binary).unwrap();
    let got: Option<String> = con.get("greeting").unwrap();
    assert_eq!(got.as_deref(), Some("hello"));
    let got: Vec<u8> = con.get("binary").unwrap();
    assert_eq!(got, binary);
    let missing: Option<String> = con.get("missing").unwrap();
    assert_eq!(missing, None);

    let many: Vec<Option<String>> = con.mget(&["greeting", "missing", "greeting"]).unwrap();
    assert_eq!(
        many,
        vec![Some("hello".to_owned()), None, Some("hello".to_owned())]
    );
    let exists: i64 = con
        .exists(&["greeting", "missing", "binary", "greeting"])
        .unwrap();
    assert_eq!(exists, 3);

    // Written over RESP, read over the binary protocol (the RESP bucket is `redis`).
    let mut binary_client = server.client();
    let got = binary_client.get(b"redis", b"greeting").unwrap();
    assert_eq!(got.value(), Some(&Bytes::from_static(b"hello")));

    let deleted: i64 = con.del(&["greeting", "missing"]).unwrap();
    assert_eq!(deleted, 1);
    let gone: Option<String> = con.get("greeting").unwrap();
    assert_eq!(gone, None);
    assert!(
        binary_client
            .get(b"redis", b"greeting")
            .unwrap()
            .siblings
            .is_empty()
    );

    let (set, got, exists): ((), String, i64) = redis::pipe()
        .set("p", "piped")
        .get("p")
        .exists("p")
        .query(&mut con)
        .unwrap();
    assert_eq!((set, got.as_str(), exists), ((), "piped", 1));
    drop(con);
    assert_eq!(server.terminate().code(), Some(0));
}
