//! A `ringkv serve` child process for end-to-end tests, shared by the test binaries.
//!
//! [`Server::start`] runs the binary on a free loopback port with two shards (so requests cross
//! the channel mesh) and a data directory under CARGO_TARGET_TMPDIR, waits with bounded retries
//! until it answers PING, and kills it in a drop guard so a failing test never leaves a server
//! behind. Nothing here waits on wall-clock time beyond a bounded number of retries.
//!
//! The tests that drive a core by hand share the rest: requests as a shard hands them to the
//! core ([`handle_client`]), and storage carried out through the real replica layout, object
//! encoding and scan cursors ([`carry_out`], [`scan`]) on the in-memory store, alone or as a
//! [`TestStore`] that counts and fails writes.

// Each test binary uses its own subset of the helpers.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::future::block_on;
use ringkv_cluster::replica::memory::MemoryScan;
use ringkv_cluster::replica::{self, MemoryStore, PartitionStore};
use ringkv_cluster::route::partition_of;
use ringkv_core::coordinator::{Core, Output, ScanPage, StoreKey, StoreOp};
use ringkv_core::object::{Object, Val};
use ringkv_core::request::KeyRequest;
use ringkv_engine::Durability;
use ringkv_engine::index::KeyHash;
use ringkv_net::{
    Client, ClientConfig, Frame, Hello, Limits, Message, PROTOCOL_VERSION, Put, ReplicaGet, Role,
    decode_frame, encode_frame_to_vec,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringkv");

/// `message` as the key request a shard would hand `core` after parsing it.
pub fn key_request(core: &Core, message: Message) -> KeyRequest {
    KeyRequest::parse(message, core.ring().partition_count()).expect("a key request")
}

/// Hands a client's GET, PUT or DELETE to `core`, as a shard does.
pub fn handle_client(core: &mut Core, now: u64, req: u64, message: Message) -> Vec<Output> {
    let request = key_request(core, message);
    core.handle_client(now, req, request)
}

/// Carries out a core's storage operation through the replica layout, for tests that drive a
/// core by hand; an in-memory store never waits, so the operation completes here.
pub fn carry_out<S: PartitionStore>(
    store: &S,
    key: StoreKey,
    op: StoreOp,
) -> Result<Option<Object>, String> {
    block_on(replica::apply(store, &key, op))
}

/// Reads the page an [`Output::Scan`] asks for through the replica layout and its cursors, for
/// tests that drive a core by hand.
pub fn scan<S: PartitionStore>(
    store: &S,
    partition: u32,
    after: Option<Bytes>,
    max_items: usize,
    max_bytes: usize,
) -> Result<ScanPage, String> {
    block_on(replica::scan_page(
        store, partition, after, max_items, max_bytes,
    ))
}

/// Every object in `store`, replicas and hints, by stored key.
pub fn stored(store: &MemoryStore) -> BTreeMap<StoreKey, Object> {
    store
        .objects()
        .expect("the core stores only what the layout reads back")
}

/// The in-memory store of a hand-driven core, with what its tests observe and inject: it counts
/// the writes and syncs asked of it, and can fail every write, as an engine that returned EIO
/// and went failed. Removals (delivered hints, reaped tombstones) are neither counted nor
/// failed: no test here needs them to be.
#[derive(Clone, Debug, Default)]
pub struct TestStore {
    pub memory: MemoryStore,
    /// Every write fails while set.
    pub failing_writes: Cell<bool>,
    /// Writes asked for, failed ones included.
    pub writes: Cell<u64>,
    /// Syncs asked for.
    pub syncs: Cell<u64>,
}

impl TestStore {
    /// Every object stored, replicas and hints, by stored key.
    pub fn objects(&self) -> BTreeMap<StoreKey, Object> {
        stored(&self.memory)
    }
}

impl PartitionStore for TestStore {
    type Scan = MemoryScan;

    async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Bytes>, String> {
        self.memory.get(partition, key).await
    }

    async fn put(
        &self,
        partition: u32,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), String> {
        self.writes.set(self.writes.get() + 1);
        if self.failing_writes.get() {
            return Err("write failed: EIO (injected)".to_owned());
        }
        self.memory.put(partition, key, value, durability).await
    }

    async fn delete(
        &self,
        partition: u32,
        key: &[u8],
        durability: Durability,
    ) -> Result<(), String> {
        self.memory.delete(partition, key, durability).await
    }

    async fn flush(&self) -> Result<(), String> {
        self.syncs.set(self.syncs.get() + 1);
        self.memory.flush().await
    }

    fn scan_after(&self, partition: u32, after: Option<KeyHash>) -> MemoryScan {
        self.memory.scan_after(partition, after)
    }
}

/// Enough keys that both shards own some with overwhelming probability (256 partitions).
pub const KEYS: usize = 200;
pub const STARTUP_RETRIES: usize = 300;
pub const RETRY_DELAY_MS: u64 = 50;

/// An empty directory for one test's data, under CARGO_TARGET_TMPDIR (not tmpfs: the engine uses
/// O_DIRECT), distinct per test process.
pub fn data_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("node-e2e-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A free loopback port no earlier call in this test process returned.
///
/// Binding port 0 and closing the listener does not reserve the port: the kernel may hand the
/// same one to the next caller (a test running in parallel, or the next node of the same
/// cluster) before the server binds it, or while a node is down between a stop and a restart.
/// The process-wide set makes every port this process hands out distinct; ports already handed
/// out stay bound while the next one is drawn, so the loop ends.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut held = Vec::new();
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
        held.push(listener);
    }
}

/// A running server; killed on drop unless it was stopped.
pub struct Server {
    child: Option<Child>,
    pub addr: String,
}

impl Server {
    /// A server with buffered durability.
    pub fn start(dir: &Path, port: u16) -> Server {
        Self::start_with(dir, port, &[])
    }

    /// A server with buffered durability and extra flags.
    pub fn start_with(dir: &Path, port: u16, extra: &[&str]) -> Server {
        Self::start_durable(dir, port, "buffered", extra)
    }

    /// A server with the given `--durability` and extra flags.
    pub fn start_durable(dir: &Path, port: u16, durability: &str, extra: &[&str]) -> Server {
        Self::start_shards(dir, port, 2, durability, extra)
    }

    /// A server with `shards` shards, the given `--durability` and extra flags.
    pub fn start_shards(
        dir: &Path,
        port: u16,
        shards: usize,
        durability: &str,
        extra: &[&str],
    ) -> Server {
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(BIN)
            .args([
                "serve",
                "--shards",
                &shards.to_string(),
                "--durability",
                durability,
            ])
            .args(extra)
            .arg("--listen")
            .arg(&addr)
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server {
            child: Some(child),
            addr,
        };
        for _ in 0..STARTUP_RETRIES {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited during startup: {status}");
            }
            if let Ok(mut c) = Client::connect(&server.addr, config())
                && c.ping().is_ok()
            {
                return server;
            }
            std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS));
        }
        server.kill();
        panic!("server did not answer within {STARTUP_RETRIES} attempts");
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.addr, config()).unwrap()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit status (bounded).
    pub fn terminate(mut self) -> ExitStatus {
        terminate(self.child.take().unwrap(), "server")
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn config() -> ClientConfig {
    ClientConfig {
        timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    }
}

/// A blind PUT of `value` under `key` that needs `w` replies.
pub fn put_w(bucket: &'static [u8], key: impl Into<Bytes>, value: &'static [u8], w: u8) -> Message {
    Message::Put(Put {
        bucket: Bytes::from_static(bucket),
        key: key.into(),
        value: Bytes::from_static(value),
        context: None,
        w: Some(w),
        dw: None,
        timeout_ms: None,
        expiry: None,
        condition: None,
    })
}

pub fn key(i: usize) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

pub fn value(i: usize, round: usize) -> Vec<u8> {
    format!("value {i} round {round}").into_bytes()
}

/// One node of a multi-node test cluster, with its own client and peer ports and data
/// directory; killed on drop.
pub struct ClusterNode {
    pub id: u32,
    pub addr: String,
    pub peer_addr: String,
    /// The admin HTTP address (`/metrics`, `/merkle`).
    pub admin: String,
    args: Vec<String>,
    /// Flags added at every start (`--seeds`, `--gossip-ms`).
    pub extra: Vec<String>,
    /// Where the node's log goes (appended across restarts), beside its data directory.
    pub log: PathBuf,
    /// The group id the process runs as, if not the test's own: a fault test gives each node its
    /// own so that firewall rules can tell the nodes' sockets apart (`iptables -m owner`).
    pub gid: Option<u32>,
    child: Option<Child>,
}

impl ClusterNode {
    /// A node with `--shards 2`, buffered durability and the bucket file `buckets`, on free
    /// ports; not started.
    pub fn new(dir: &Path, id: u32, buckets: &Path) -> ClusterNode {
        let mut node = ClusterNode::on_defaults(dir, id);
        node.args.extend([
            "--shards".into(),
            "2".into(),
            "--durability".into(),
            "buffered".into(),
            "--config".into(),
            buckets.display().to_string(),
        ]);
        node
    }

    /// A node as a user starts one from the docs: its own id and ports, no configuration file
    /// and no other setting; not started.
    pub fn on_defaults(dir: &Path, id: u32) -> ClusterNode {
        let addr = format!("127.0.0.1:{}", free_port());
        let peer_addr = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = [
            "--node-id",
            &id.to_string(),
            "--listen",
            &addr,
            "--peer-listen",
            &peer_addr,
            "--admin-listen",
            &admin,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--data-dir".into());
        args.push(dir.join(format!("node-{id}")).display().to_string());
        ClusterNode {
            id,
            addr,
            peer_addr,
            admin,
            args,
            extra: Vec::new(),
            log: dir.join(format!("node-{id}.log")),
            gid: None,
            child: None,
        }
    }

    /// Gives the node a new peer port for its next start (a node that moved).
    pub fn move_peer_port(&mut self) {
        let moved = format!("127.0.0.1:{}", free_port());
        for arg in &mut self.args {
            if *arg == self.peer_addr {
                arg.clone_from(&moved);
            }
        }
        self.peer_addr = moved;
    }

    /// Starts the process and waits (bounded) until it answers PING.
    pub fn start(&mut self) {
        // RINGKV_TEST_LOG raises the nodes' log level when a failure needs explaining.
        let level = std::env::var("RINGKV_TEST_LOG").unwrap_or_else(|_| "warn".into());
        self.spawn(&level);
        wait_answering(self.child.as_mut().unwrap(), self.id, &self.addr);
    }

    /// Starts the process, its stderr appended to its log.
    fn spawn(&mut self, level: &str) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .args(&self.args)
            .args(&self.extra)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(gid) = self.gid {
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        self.child = Some(command.spawn().unwrap());
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.addr, config()).unwrap()
    }

    /// Starts the process and waits (`polls` rounds of `poll_ms`) for it to exit by itself, as a
    /// node that must refuse to run does; panics if it is still running then.
    pub fn run_to_exit(&mut self, polls: usize, poll_ms: u64) -> ExitStatus {
        self.spawn("warn");
        self.wait_exit(polls, poll_ms)
    }

    /// The node's arguments (before `extra`).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Drops the flag at `at` and its value from the node's arguments.
    pub fn without_arg(&mut self, at: usize) {
        self.args.drain(at..at + 2);
    }

    /// Runs the node on `dir` instead of its own data directory.
    pub fn set_data_dir(&mut self, dir: &Path) {
        let at = self.args.iter().position(|a| a == "--data-dir").unwrap();
        self.args[at + 1] = dir.display().to_string();
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        let at = self.args.iter().position(|a| a == "--data-dir").unwrap();
        PathBuf::from(&self.args[at + 1])
    }

    /// Runs an ADMIN command on this node.
    pub fn admin(&self, command: &str, args: &str) -> Result<String, ringkv_net::ClientError> {
        self.client().admin(command, args)
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn stop(&mut self) {
        let status = terminate(self.child.take().unwrap(), &format!("node {}", self.id));
        assert!(status.success(), "node {} exited with {status}", self.id);
    }

    /// Waits (`polls` rounds of `poll_ms`) for the node to exit by itself; panics if it is
    /// still running then. Returns its exit status.
    pub fn wait_exit(&mut self, polls: usize, poll_ms: u64) -> ExitStatus {
        let status = exited_within(self.child.as_mut().unwrap(), polls, poll_ms);
        let Some(status) = status else {
            panic!("node {} is still running", self.id);
        };
        self.child = None;
        status
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the running process ([`send_signal`]).
    pub fn signal(&self, signal: &str) {
        send_signal(self.child.as_ref().unwrap().id(), signal);
    }

    /// How the process ended, if it was started and has exited by itself.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls (`polls` rounds of `poll_ms`) until `child` exits: its status, or `None` if it still
/// runs.
fn exited_within(child: &mut Child, polls: usize, poll_ms: u64) -> Option<ExitStatus> {
    for _ in 0..polls {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(poll_ms));
    }
    None
}

/// Sends SIGTERM to `child` (`what`, for the panic) and returns its exit status; kills it and
/// panics if it does not exit within the bounded wait.
fn terminate(mut child: Child, what: &str) -> ExitStatus {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    if let Some(status) = exited_within(&mut child, STARTUP_RETRIES, RETRY_DELAY_MS) {
        return status;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what} did not exit after SIGTERM");
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid` with kill(1); a `STOP` returns only once
/// every thread of the process has stopped. kill(1) returns once the signal is queued, and the
/// threads stop one after another as each is next scheduled: on a busy machine a node's shard
/// thread could still serve a request the test sends next, and a test that means "the node is
/// frozen" would then test something else.
pub fn send_signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{signal} {pid}");
    if signal != "STOP" {
        return;
    }
    wait_for(&format!("process {pid} stopped"), 1000, 10, || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
        let mut running = String::new();
        for task in tasks.flatten() {
            // A thread that ended meanwhile has no stat to read, and needs no stopping.
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            // The state follows the command name, which is in parentheses and may hold spaces.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            if !matches!(state, Some('T' | 't')) {
                running.push_str(&format!("{stat}\n"));
            }
        }
        if running.is_empty() {
            Ok(())
        } else {
            Err(running)
        }
    });
}

/// `--seeds` for `nodes`, each `ID@PEER_ADDR`.
pub fn seeds(nodes: &[(u32, &str)]) -> String {
    nodes
        .iter()
        .map(|(id, addr)| format!("{id}@{addr}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Polls `check` up to `polls` times, `delay_ms` apart, until it answers `Some`; panics with
/// `what` and the last observation otherwise.
pub fn wait_for<T>(
    what: &str,
    polls: usize,
    delay_ms: u64,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let mut last = String::new();
    for _ in 0..polls {
        match check() {
            Ok(v) => return v,
            Err(seen) => last = seen,
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
    }
    panic!("{what}: not reached after {polls} polls; last seen:\n{last}");
}

/// The body of `GET path` on an admin HTTP address, which must answer 200.
pub fn admin_get(admin: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(admin).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The sum of every sample of metric `name` in `/metrics` on an admin HTTP address.
pub fn metric(admin: &str, name: &str) -> f64 {
    admin_get(admin, "/metrics")
        .lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// A node's Merkle roots from `/merkle`: (partition, n) → (keys, root).
pub fn merkle(admin: &str) -> std::collections::BTreeMap<(u32, u8), (u64, String)> {
    admin_get(admin, "/merkle")
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 4, "{line}");
            (
                (f[0].parse().unwrap(), f[1].parse().unwrap()),
                (f[2].parse().unwrap(), f[3].to_owned()),
            )
        })
        .collect()
}

/// Waits (bounded) until node `id`, the process `child`, answers PING at `addr`; panics if it
/// exits or never answers.
pub fn wait_answering(child: &mut std::process::Child, id: u32, addr: &str) {
    for _ in 0..STARTUP_RETRIES {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("node {id} exited during startup: {status}");
        }
        if let Ok(mut c) = Client::connect(addr, config())
            && c.ping().is_ok()
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS));
    }
    panic!("node {id} did not answer");
}

/// What a node's own replica of each key of `bucket` holds, read over a peer connection with
/// REPLICA_GET (hint `None`: the node's replica, not a hint it keeps for another node), so no
/// client read repairs it on the way.
pub fn replica_values(
    peer_addr: &str,
    bucket: &'static [u8],
    keys: &[Vec<u8>],
) -> Vec<Option<Vec<Val>>> {
    use std::io::{Read, Write};
    let limits = Limits::DEFAULT;
    let mut stream = std::net::TcpStream::connect(peer_addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let mut read_frame = |stream: &mut std::net::TcpStream| -> Frame {
        let mut chunk = [0u8; 65536];
        loop {
            if let Some((frame, used)) = decode_frame(&buf, &limits).unwrap() {
                buf.drain(..used);
                return frame;
            }
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "{peer_addr} closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let hello = Frame {
        request_id: 1,
        message: Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Peer,
            cluster_name: "ringkv".into(),
            node_name: Some("4000000@checker".into()),
        }),
    };
    stream
        .write_all(&encode_frame_to_vec(&hello, &limits).unwrap())
        .unwrap();
    assert!(matches!(
        read_frame(&mut stream).message,
        Message::HelloOk(_)
    ));
    let mut out = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let get = Frame {
            request_id: 2 + i as u64,
            message: Message::ReplicaGet(ReplicaGet {
                partition: partition_of(bucket, key).0,
                hint: None,
                bucket: Bytes::from_static(bucket),
                key: Bytes::copy_from_slice(key),
            }),
        };
        stream
            .write_all(&encode_frame_to_vec(&get, &limits).unwrap())
            .unwrap();
        let answer = read_frame(&mut stream);
        assert_eq!(answer.request_id, 2 + i as u64);
        out.push(match answer.message {
            Message::ReplicaGetOk(ok) => ok
                .object
                .map(|bytes| Object::decode(&bytes).unwrap().siblings()),
            other => panic!("{peer_addr}: REPLICA_GET answered {other:?}"),
        });
    }
    out
}
