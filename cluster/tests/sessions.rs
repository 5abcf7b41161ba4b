//! Session stores that no one here wrote, unchanged, against a node on default settings through
//! its RESP port: express-session + connect-redis + node-redis (npm) and Flask-Session + redis-py
//! (PyPI) store, read, refresh, destroy and expire sessions; the `redis` crate's typed commands
//! for expiry, counters, sets and hashes get Redis's answers. The libraries are pinned in
//! `tests/sessions/` and installed by `tests/sessions/setup.sh` (which `.ci/run` runs too), so
//! these tests need node, npm and python3 with venv, and the package registries the first time.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::{Server, data_dir, free_port};

fn sessions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/sessions")
}

/// Installs the libraries once per test process; a failure names what is missing.
fn setup() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let status = Command::new("bash")
            .arg(sessions_dir().join("setup.sh"))
            .status()
            .expect("bash runs tests/sessions/setup.sh");
        assert!(
            status.success(),
            "tests/sessions/setup.sh failed ({status}): the session tests need node, npm and \
             python3 with venv, and the npm and PyPI registries"
        );
    });
}

/// A node with default settings (sync durability, no buckets file) and a RESP port.
fn node(name: &str) -> (Server, u16) {
    let dir = data_dir(name);
    let resp_port = free_port();
    let resp = format!("127.0.0.1:{resp_port}");
    let server = Server::start_durable(&dir, free_port(), "sync", &["--resp-listen", &resp]);
    (server, resp_port)
}

/// Runs a library's script against `port`; its output is shown when it fails.
fn run(program: &str, script: PathBuf, port: u16) {
    let out = Command::new(program)
        .arg(&script)
        .env("RINGKV_RESP_PORT", port.to_string())
        .current_dir(script.parent().unwrap())
        .output()
        .unwrap_or_else(|e| panic!("{program} {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// express-session with connect-redis: a session is stored with its cookie's lifetime as TTL,
/// read, refreshed by connect-redis's touch (EXPIRE), destroyed (DEL), and a 2 s session is
/// gone once its TTL passed (tests/sessions/node/session-test.mjs).
#[test]
fn connect_redis_sessions_live_and_expire() {
    setup();
    let (server, port) = node("connect-redis");
    run("node", sessions_dir().join("node/session-test.mjs"), port);
    assert_eq!(server.terminate().code(), Some(0));
}

/// Flask-Session's Redis backend the same way (SET ... EX on every request), then redis-py's
/// typed commands for strings and expiry (tests/sessions/python/session_test.py).
#[test]
fn flask_sessions_live_and_expire() {
    setup();
    let (server, port) = node("flask-session");
    let python =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/sessions-venv/bin/python");
    run(
        python.to_str().unwrap(),
        sessions_dir().join("python/session_test.py"),
        port,
    );
    assert_eq!(server.terminate().code(), Some(0));
}

/// The `redis` crate's typed expiry commands, after DBSIZE of 20 keys written: SET with EX,
/// TTL/PTTL, EXPIRE with a condition, PERSIST, SET NX/XX, GETDEL, INCR keeping the TTL, and a
/// key that expires is gone for GET, EXISTS and TTL alike, and stays gone after PERSIST or a
/// `SET XX` tries to revive it.
#[test]
fn redis_crate_expiry_commands() {
    use redis::{Commands, SetExpiry, SetOptions};

    let (server, port) = node("redis-expiry");
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(10))
        .unwrap();
    con.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    // DBSIZE counts the node's keys across its shards (the other shards' as they last
    // published them, every second: polled).
    for i in 0..20 {
        let () = con.set(format!("dbsize-{i}"), "v").unwrap();
    }
    let mut size = 0i64;
    for _ in 0..100 {
        size = redis::cmd("DBSIZE").query(&mut con).unwrap();
        if size == 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(size, 20, "DBSIZE of a node holding 20 keys");

    let () = con.set_ex("s", "v", 100).unwrap();
    let ttl: i64 = con.ttl("s").unwrap();
    assert!((1..=100).contains(&ttl), "{ttl}");
    let pttl: i64 = con.pttl("s").unwrap();
    assert!((1..=100_000).contains(&pttl), "{pttl}");
    let set: bool = con.expire("s", 1000).unwrap();
    assert!(set);
    let kept: bool = redis::cmd("EXPIRE")
        .arg("s")
        .arg(10)
        .arg("GT")
        .query(&mut con)
        .unwrap();
    assert!(!kept, "GT refuses an earlier expiry");
    let persisted: bool = con.persist("s").unwrap();
    assert!(persisted);
    assert_eq!(con.ttl::<_, i64>("s").unwrap(), -1);
    assert_eq!(con.ttl::<_, i64>("missing").unwrap(), -2);

    let nx = SetOptions::default().conditional_set(redis::ExistenceCheck::NX);
    let first: Option<String> = con.set_options("once", "a", nx).unwrap();
    assert_eq!(first.as_deref(), Some("OK"));
    let nx = SetOptions::default().conditional_set(redis::ExistenceCheck::NX);
    let second: Option<String> = con.set_options("once", "b", nx).unwrap();
    assert_eq!(second, None);
    let got: Option<String> = con.get_del("once").unwrap();
    assert_eq!(got.as_deref(), Some("a"));

    let () = con.set_ex("n", "41", 1000).unwrap();
    let n: i64 = con.incr("n", 1).unwrap();
    assert_eq!(n, 42);
    assert!(con.ttl::<_, i64>("n").unwrap() > 0, "INCR keeps the TTL");

    // A short expiry: the key is live until the node's clock passes it, then gone everywhere.
    let px = SetOptions::default().with_expiration(SetExpiry::PX(300));
    let () = con.set_options("short", "x", px).unwrap();
    let left: i64 = con.pttl("short").unwrap();
    assert!((1..=300).contains(&left), "{left}");
    std::thread::sleep(Duration::from_millis(left as u64 + 50));
    let mut gone = false;
    for _ in 0..100 {
        if con.get::<_, Option<String>>("short").unwrap().is_none() {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone, "the key expired");
    assert_eq!(con.exists::<_, i64>("short").unwrap(), 0);
    assert_eq!(con.ttl::<_, i64>("short").unwrap(), -2);
    assert!(
        !con.persist::<_, bool>("short").unwrap(),
        "nothing to persist"
    );
    let revived: Option<String> = redis::cmd("SET")
        .arg("short")
        .arg("y")
        .arg("XX")
        .query(&mut con)
        .unwrap();
    assert_eq!(revived, None, "XX finds no key to replace");
    assert_eq!(con.get::<_, Option<String>>("short").unwrap(), None);
    drop(con);
    assert_eq!(server.terminate().code(), Some(0));
}

/// The `redis` crate's commands on the convergent types, on a node on defaults: INCR and its
/// variants make a counter on a new key and on a string holding an integer, GET reads it as a
/// string, and EXPIRE and TTL work on it; SADD, SREM and the set reads; HINCRBY makes a counter
/// field that HGETALL shows as a number beside a register field; a command on a key of another
/// type is WRONGTYPE, and INCR of a string that is not an integer is Redis's own error.
#[test]
fn redis_crate_counters_sets_and_hashes() {
    use std::collections::{HashMap, HashSet};

    use redis::Commands;

    let (server, port) = node("redis-types");
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(10))
        .unwrap();
    con.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    // Counters: a new key, then a string holding an integer.
    let n: i64 = redis::cmd("INCR").arg("hits").query(&mut con).unwrap();
    assert_eq!(n, 1);
    let n: i64 = con.incr("hits", 10).unwrap();
    assert_eq!(n, 11);
    let n: i64 = redis::cmd("DECR").arg("hits").query(&mut con).unwrap();
    assert_eq!(n, 10);
    let n: i64 = con.decr("hits", 4).unwrap();
    assert_eq!(n, 6);
    assert_eq!(
        con.get::<_, Option<String>>("hits").unwrap().as_deref(),
        Some("6")
    );
    assert_eq!(
        con.mget::<_, Vec<Option<String>>>(&["hits", "none"])
            .unwrap(),
        vec![Some("6".to_owned()), None]
    );
    assert_eq!(
        redis::cmd("TYPE")
            .arg("hits")
            .query::<String>(&mut con)
            .unwrap(),
        "string"
    );
    let () = con.set("views", "41").unwrap();
    let n: i64 = redis::cmd("INCR").arg("views").query(&mut con).unwrap();
    assert_eq!(n, 42);
    let n: i64 = con.incr("views", -2).unwrap();
    assert_eq!(n, 40);
    let n: i64 = redis::cmd("DECR").arg("views").query(&mut con).unwrap();
    assert_eq!(n, 39);
    assert_eq!(
        con.get::<_, Option<String>>("views").unwrap().as_deref(),
        Some("39")
    );

    // A counter's expiry: EXPIRE sets it, TTL reads it, an increment keeps it, PERSIST clears it.
    assert_eq!(con.ttl::<_, i64>("hits").unwrap(), -1);
    assert!(con.expire::<_, bool>("hits", 100).unwrap());
    let ttl: i64 = con.ttl("hits").unwrap();
    assert!((1..=100).contains(&ttl), "{ttl}");
    let n: i64 = con.incr("hits", 1).unwrap();
    assert_eq!(n, 7);
    let ttl: i64 = con.ttl("hits").unwrap();
    assert!(
        (1..=100).contains(&ttl),
        "an increment keeps the TTL: {ttl}"
    );
    assert!(con.persist::<_, bool>("hits").unwrap());
    assert_eq!(con.ttl::<_, i64>("hits").unwrap(), -1);

    // Sets.
    assert_eq!(con.sadd::<_, _, i64>("tags", &["a", "b", "a"]).unwrap(), 2);
    assert_eq!(con.sadd::<_, _, i64>("tags", &["b", "c"]).unwrap(), 1);
    assert_eq!(con.srem::<_, _, i64>("tags", &["a", "z"]).unwrap(), 1);
    assert_eq!(
        con.smembers::<_, HashSet<String>>("tags").unwrap(),
        HashSet::from(["b".to_owned(), "c".to_owned()])
    );
    assert!(con.sismember::<_, _, bool>("tags", "b").unwrap());
    assert!(!con.sismember::<_, _, bool>("tags", "a").unwrap());
    assert_eq!(con.scard::<_, i64>("tags").unwrap(), 2);
    assert_eq!(
        con.smismember::<_, _, Vec<bool>>("tags", &["c", "a"])
            .unwrap(),
        vec![true, false]
    );
    assert_eq!(
        redis::cmd("TYPE")
            .arg("tags")
            .query::<String>(&mut con)
            .unwrap(),
        "set"
    );

    // A hash with a counter field beside a register field.
    let n: i64 = con.hincr("cart", "items", 2).unwrap();
    assert_eq!(n, 2);
    assert_eq!(con.hset::<_, _, _, i64>("cart", "owner", "ann").unwrap(), 1);
    let n: i64 = con.hincr("cart", "items", 3).unwrap();
    assert_eq!(n, 5);
    assert_eq!(
        con.hgetall::<_, HashMap<String, String>>("cart").unwrap(),
        HashMap::from([
            ("items".to_owned(), "5".to_owned()),
            ("owner".to_owned(), "ann".to_owned())
        ])
    );
    assert_eq!(
        con.hget::<_, _, Option<String>>("cart", "items")
            .unwrap()
            .as_deref(),
        Some("5")
    );
    assert_eq!(
        redis::cmd("TYPE")
            .arg("cart")
            .query::<String>(&mut con)
            .unwrap(),
        "hash"
    );

    // WRONGTYPE both ways, and Redis's error for a string that is not an integer.
    let code = |e: redis::RedisError| e.code().map(str::to_owned);
    let sadd = con.sadd::<_, _, i64>("hits", "x").unwrap_err();
    assert_eq!(code(sadd).as_deref(), Some("WRONGTYPE"));
    let incr = redis::cmd("INCR")
        .arg("tags")
        .query::<i64>(&mut con)
        .unwrap_err();
    assert_eq!(code(incr).as_deref(), Some("WRONGTYPE"));
    let get = con.get::<_, Option<String>>("cart").unwrap_err();
    assert_eq!(code(get).as_deref(), Some("WRONGTYPE"));
    let () = con.set("word", "abc").unwrap();
    let incr = redis::cmd("INCR")
        .arg("word")
        .query::<i64>(&mut con)
        .unwrap_err();
    assert!(
        incr.to_string()
            .contains("value is not an integer or out of range"),
        "{incr}"
    );

    // DEL counts and clears convergent keys; the next increment starts from nothing.
    assert_eq!(
        con.del::<_, i64>(&["hits", "tags", "cart", "none"])
            .unwrap(),
        3
    );
    assert_eq!(con.exists::<_, i64>(&["hits", "tags", "cart"]).unwrap(), 0);
    let n: i64 = redis::cmd("INCR").arg("hits").query(&mut con).unwrap();
    assert_eq!(n, 1);
    drop(con);
    assert_eq!(server.terminate().code(), Some(0));
}
