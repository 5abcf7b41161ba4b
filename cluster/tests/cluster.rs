//! End to end: several `ringkv serve` processes on loopback forming one static cluster, driven
//! through the blocking client.
//!
//! Every node gets its own client port, peer port, RESP port and data directory under
//! CARGO_TARGET_TMPDIR, the same seed list and the same bucket file; each test waits with bounded
//! retries until every node answers PING, and the nodes are killed in a drop guard so a failing
//! test never leaves one behind. Nothing asserts on wall-clock time; every wait is a bounded
//! number of retries.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use ringkv_cluster::route::{PARTITIONS, partition_of};
use ringkv_core::NodeId;
use ringkv_core::ring::PartitionId;
use ringkv_core::ring::Ring;
use ringkv_net::{
    Client, ClientConfig, ClientError, Delete, ErrorCode, Get, MapOp, Message, Put, Sibling,
};

const BIN: &str = env!("CARGO_BIN_EXE_ringkv");

/// Held by every test of this file while its cluster runs: shared by most, alone by a test
/// whose assertion needs every node to believe the others up for its whole run. A dozen
/// three-node clusters at once on a two-core machine delay heartbeats and replica answers past
/// the failure detector's bounds, and a node then rightly routes around a peer it suspects
/// (`racing_conditional_writes_have_one_winner` says why that test cannot tell such a detour
/// from a bug).
static CLUSTERS: RwLock<()> = RwLock::new(());

fn clusters_shared() -> RwLockReadGuard<'static, ()> {
    // A test that panicked while holding it poisoned nothing it guards.
    CLUSTERS.read().unwrap_or_else(PoisonError::into_inner)
}

fn clusters_alone() -> RwLockWriteGuard<'static, ()> {
    CLUSTERS.write().unwrap_or_else(PoisonError::into_inner)
}
const STARTUP_RETRIES: usize = 300;
const RETRY_DELAY_MS: u64 = 50;
/// Rounds of the handoff poll, each a pause of [`HANDOFF_POLL_MS`] and one check.
const HANDOFF_POLLS: usize = 150;
const HANDOFF_POLL_MS: u64 = 200;

const BUCKETS: &str = "\
[buckets.default]
n = 3
r = 2
w = 2
dw = 1

[buckets.sessions]
mode = \"lww\"

[buckets.single]
mode = \"lww\"
n = 1
r = 1
w = 1

[buckets.redis]
mode = \"lww\"
r = 1
w = 1
";

fn config() -> ClientConfig {
    ClientConfig {
        timeout: Duration::from_secs(15),
        ..ClientConfig::default()
    }
}

/// One node of a test cluster; killed on drop.
struct Node {
    id: u32,
    child: Option<Child>,
    addr: String,
    /// Admin HTTP address (`/metrics`).
    admin: String,
    /// RESP (Redis) address.
    resp: String,
    args: Vec<String>,
}

impl Node {
    fn start(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(BIN)
            .arg("serve")
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        common::wait_answering(self.child.as_mut().unwrap(), self.id, &self.addr);
    }

    fn client(&self) -> Client {
        Client::connect(&self.addr, config()).unwrap()
    }

    /// The sum of every sample of metric `name` in the node's `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        common::metric(&self.admin, name)
    }

    /// A Redis connection to the node's RESP port.
    fn redis(&self) -> redis::Connection {
        let client = redis::Client::open(format!("redis://{}/", self.resp)).unwrap();
        let con = client
            .get_connection_with_timeout(Duration::from_secs(15))
            .unwrap();
        con.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        con
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`); a `STOP` returns once the node is stopped.
    fn signal(&self, signal: &str) {
        common::send_signal(self.child.as_ref().unwrap().id(), signal);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `count` nodes (ids 1..=count) that know each other, each with `shards` shards.
fn cluster(name: &str, count: u32, shards: usize, extra: &[&str]) -> Vec<Node> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cluster-e2e-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let buckets = dir.join("buckets.toml");
    std::fs::write(&buckets, BUCKETS).unwrap();
    let peer_ports: Vec<u16> = (0..count).map(|_| common::free_port()).collect();
    let seeds: Vec<String> = (1..=count)
        .zip(&peer_ports)
        .map(|(id, port)| format!("{id}@127.0.0.1:{port}"))
        .collect();
    let seeds = seeds.join(",");
    let mut nodes: Vec<Node> = (1..=count)
        .map(|id| {
            let addr = format!("127.0.0.1:{}", common::free_port());
            let admin = format!("127.0.0.1:{}", common::free_port());
            let resp = format!("127.0.0.1:{}", common::free_port());
            let data: &Path = &dir.join(format!("node-{id}"));
            let mut args: Vec<String> = vec![
                "--config".into(),
                buckets.display().to_string(),
                "--shards".into(),
                shards.to_string(),
                "--node-id".into(),
                id.to_string(),
                "--node-name".into(),
                format!("n{id}"),
                "--listen".into(),
                addr.clone(),
                "--peer-listen".into(),
                format!("127.0.0.1:{}", peer_ports[id as usize - 1]),
                "--seeds".into(),
                seeds.clone(),
                "--data-dir".into(),
                data.display().to_string(),
                "--admin-listen".into(),
                admin.clone(),
                "--resp-listen".into(),
                resp.clone(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            Node {
                id,
                child: None,
                addr,
                admin,
                resp,
                args,
            }
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    for n in &mut nodes {
        n.wait_ready();
    }
    nodes
}

fn get_with(c: &mut Client, bucket: &[u8], key: &[u8], r: Option<u8>) -> ringkv_net::GetOk {
    let request = Message::Get(Get {
        bucket: Bytes::copy_from_slice(bucket),
        key: Bytes::copy_from_slice(key),
        r,
        timeout_ms: None,
    });
    match c.request_message(request).unwrap() {
        Message::GetOk(ok) => ok,
        other => panic!("{other:?}"),
    }
}

/// A read with quorum `r`, retried (bounded) while the node answers `not_enough_replicas`.
fn get_retrying(c: &mut Client, bucket: &[u8], key: &[u8], r: u8) -> ringkv_net::GetOk {
    for _ in 0..STARTUP_RETRIES {
        let request = Message::Get(Get {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::copy_from_slice(key),
            r: Some(r),
            timeout_ms: None,
        });
        match c.request_message(request) {
            Ok(Message::GetOk(ok)) => return ok,
            Err(ClientError::Server {
                code: ErrorCode::NotEnoughReplicas,
                ..
            }) => std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS)),
            other => panic!("{other:?}"),
        }
    }
    panic!("R={r} never met");
}

fn values(ok: &ringkv_net::GetOk) -> BTreeSet<Vec<u8>> {
    ok.siblings
        .iter()
        .map(|s| match s {
            Sibling::Value(v) => v.to_vec(),
            Sibling::Tombstone => b"<tombstone>".to_vec(),
        })
        .collect()
}

/// Siblings and their resolution across nodes: two writes based on the same (stale) context,
/// coordinated by different nodes, are concurrent, so a quorum read from a third node returns
/// both; a write with the context of that read supersedes both and every node then reads the one
/// merged value. In an `lww` bucket the same concurrent writes leave a single value. With one
/// node killed (SIGKILL), writes and reads keep succeeding.
#[test]
fn concurrent_writes_become_siblings_and_a_context_resolves_them() {
    let _clusters = clusters_shared();
    let nodes = cluster("siblings", 3, 2, &[]);
    let (mut a, mut b, mut c) = (nodes[0].client(), nodes[1].client(), nodes[2].client());

    let base = a.put(b"cart", b"alice", b"apples", None).unwrap();
    b.put(b"cart", b"alice", b"apples,bread", Some(base.clone()))
        .unwrap();
    c.put(b"cart", b"alice", b"apples,cheese", Some(base))
        .unwrap();
    let read = get_with(&mut a, b"cart", b"alice", None);
    assert_eq!(
        values(&read),
        BTreeSet::from([b"apples,bread".to_vec(), b"apples,cheese".to_vec()])
    );
    assert_eq!(read.siblings.len(), 2);

    b.put(
        b"cart",
        b"alice",
        b"apples,bread,cheese",
        Some(read.context.clone()),
    )
    .unwrap();
    for client in [&mut a, &mut b, &mut c] {
        let read = get_with(client, b"cart", b"alice", Some(3));
        assert_eq!(
            read.siblings,
            vec![Sibling::Value("apples,bread,cheese".into())]
        );
    }

    // Blind writes in a last-write-wins bucket: one value survives.
    a.put(b"sessions", b"s1", b"first", None).unwrap();
    b.put(b"sessions", b"s1", b"second", None).unwrap();
    c.put(b"sessions", b"s1", b"third", None).unwrap();
    for client in [&mut a, &mut b, &mut c] {
        let read = get_with(client, b"sessions", b"s1", Some(3));
        assert_eq!(read.siblings.len(), 1, "{read:?}");
    }

    // A delete with the read context removes the key everywhere.
    let read = get_with(&mut c, b"cart", b"alice", None);
    c.delete(b"cart", b"alice", Some(read.context)).unwrap();
    let read = get_with(&mut a, b"cart", b"alice", Some(3));
    assert!(read.siblings.is_empty(), "{read:?}");

    // With one of three nodes killed, W=2 and R=2 are still met by the other two.
    let mut nodes = nodes;
    nodes[2].kill();
    for i in 0..20 {
        let k = format!("after-{i}").into_bytes();
        a.put(b"cart", &k, &k, None).unwrap();
        let read = get_with(&mut b, b"cart", &k, None);
        assert_eq!(read.siblings, vec![Sibling::Value(k.into())]);
    }
}

/// A node that restarts takes writes that need every replica as soon as it answers PING,
/// through each other node and on each of their shards, without a retry. While it was down
/// every shard of the others suspected it, and their links to it backed off after failed
/// heartbeats; with no fallback in a three-node cluster, the coordinator must still try the
/// suspected home (`assign_slot`'s last resort) and the link must reconnect.
///
/// The replica timeout is long (10 s) so that nothing here races a clock: without the last
/// resort every write is refused `not_enough_replicas` at once, whatever the timeout, and on a
/// loaded machine a reconnect and a first replica write still finish well inside it. (How soon
/// a link retries is bounded by its backoff constants, not by this test.)
#[test]
fn a_restarted_node_takes_writes_needing_every_replica_at_once() {
    let _clusters = clusters_shared();
    let mut nodes = cluster("restart-at-once", 3, 2, &["--replica-timeout-ms", "10000"]);
    nodes[2].kill();
    // Every shard of the two others suspects node 3, and has failed to reach it for a while
    // (five heartbeat rounds to each of the two peers on each of two shards).
    for node in &nodes[..2] {
        let sent = node.metric("ringkv_heartbeats_total");
        for round in 0..200 {
            let suspected = node.metric("ringkv_peers_suspected");
            if suspected >= 2.0 && node.metric("ringkv_heartbeats_total") >= sent + 20.0 {
                break;
            }
            assert!(round < 199, "node {} never suspected node 3", node.id);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    nodes[2].start();
    nodes[2].wait_ready();
    for node in &nodes[..2] {
        let mut client = node.client();
        for k in 0..8 {
            let put = common::put_w(b"default", format!("at-once-{}-{k}", node.id), b"v", 3);
            match client.request_message(put) {
                Ok(Message::PutOk(_)) => {}
                other => panic!("node {} write {k}: {other:?}", node.id),
            }
        }
    }
}

/// Sloppy quorum and hinted handoff. Four nodes, N=3, R=2, W=2 (with three nodes and N=3 every
/// node is a home of every key, so there would be no fallback to hold hints). One node is killed
/// with SIGKILL: writes and reads through the others keep succeeding, and writes whose home set
/// includes the dead node are taken by the fourth node as hints. After a restart, the hints reach
/// the returning node: polled by freezing (SIGSTOP) the other three and reading with R=1 from it,
/// which only its own replica can answer. Finally a read with R=3 returns every acknowledged write.
#[test]
fn writes_survive_a_dead_node_and_hints_reach_it_when_it_returns() {
    let _clusters = clusters_shared();
    let mut nodes = cluster(
        "handoff",
        4,
        1,
        &["--replica-timeout-ms", "500", "--hint-retry-ms", "200"],
    );
    let keys: Vec<Vec<u8>> = (0..40).map(|i| format!("key-{i}").into_bytes()).collect();
    let mut a = nodes[0].client();
    for k in &keys[..20] {
        a.put(b"b", k, k, None).unwrap();
    }

    nodes[2].kill();
    for k in &keys[20..] {
        a.put(b"b", k, k, None).unwrap();
    }
    let mut b = nodes[1].client();
    for k in &keys {
        let read = get_with(&mut b, b"b", k, None);
        assert_eq!(read.siblings, vec![Sibling::Value(k.clone().into())]);
    }

    // The keys written while node 3 was down whose home set includes it.
    let members: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    let ring = Ring::new(PARTITIONS, &members, 3).unwrap();
    let handed: Vec<&Vec<u8>> = keys[20..]
        .iter()
        .filter(|k| {
            ring.preference_list(partition_of(b"b", k), 3)
                .contains(&NodeId(3))
        })
        .collect();
    assert!(!handed.is_empty());

    nodes[2].start();
    nodes[2].wait_ready();
    let mut delivered = false;
    for _ in 0..HANDOFF_POLLS {
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
        for i in [0, 1, 3] {
            nodes[i].signal("STOP");
        }
        let mut c = nodes[2].client();
        let present = handed
            .iter()
            .all(|k| !get_with(&mut c, b"b", k, Some(1)).siblings.is_empty());
        for i in [0, 1, 3] {
            nodes[i].signal("CONT");
        }
        if present {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "hints did not reach the restarted node");

    // The polls' reads timed out on the frozen nodes if a freeze outlasted the replica timeout,
    // and node 3 then believes them down for a while: R=3 is retried until it can be met.
    let mut c = nodes[2].client();
    for k in &keys {
        let read = get_retrying(&mut c, b"b", k, 3);
        assert_eq!(read.siblings, vec![Sibling::Value(k.clone().into())]);
    }
    // A quorum above N is refused with a typed error, and the connection stays usable.
    let request = common::put_w(b"b", Bytes::from_static(b"x"), b"x", 4);
    assert!(matches!(
        c.request_message(request),
        Err(ClientError::Server { .. })
    ));
    c.ping().unwrap();
}

/// Waits (bounded) until `of`'s nodes have no request in flight, while no new one starts.
///
/// A shard publishes its figures at its ticks, so a figure read right after a request was
/// answered may predate the request (a shard descheduled under load ticks late). Only a
/// publication seen to follow the call counts: one whose heartbeat counter (published with
/// the in-flight gauge, and advancing every heartbeat) moved past its value at the call. Each
/// node here runs one shard, so a node's sums are its shard's figures.
fn none_in_flight(nodes: &[Node], of: &[usize]) -> bool {
    let beats = |i: usize| nodes[i].metric("ringkv_heartbeats_total");
    let at_call: Vec<f64> = of.iter().map(|&i| beats(i)).collect();
    let in_flight = || -> f64 {
        of.iter()
            .map(|&i| nodes[i].metric("ringkv_ops_in_flight"))
            .sum()
    };
    for _ in 0..HANDOFF_POLLS {
        let published_since = of.iter().zip(&at_call).all(|(&i, &b)| beats(i) > b);
        // Read again after the fresh publication was seen, so the gauge is at least as new.
        if published_since && in_flight() == 0.0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS));
    }
    false
}

/// The Merkle tree roots a node's admin port reports, by (partition, n).
fn merkle(node: &Node) -> BTreeMap<(u32, u8), (u64, String)> {
    common::merkle(&node.admin)
}

/// Anti-entropy alone repairs a node that was killed under writes. Four nodes, N=3, R=W=2, one
/// shard each, anti-entropy every 10 ms. Node 3 is killed (SIGKILL) while a writer puts and
/// deletes keys through node 1; the fallbacks take hints for it. Before node 3 restarts, the
/// hints are deleted on purpose (`ringkv cluster truncate-hints` on every other node, checked
/// with `ringkv_hints` reaching 0), so nothing but anti-entropy can bring it the writes it
/// missed. Proof of repair: with the three other nodes frozen (SIGSTOP), node 3
/// alone answers R=1 reads (with a deadline shorter than the freeze, so no late reply from a
/// frozen node can read-repair it) with the last acknowledged value of every key, and nothing
/// for deleted keys; no node counted a read repair after node 3 restarted
/// (`ringkv_read_repairs_total`); and every partition's replicas report the same Merkle root on
/// `/merkle`.
#[test]
fn anti_entropy_alone_repairs_a_node_killed_under_writes() {
    let _clusters = clusters_shared();
    let mut nodes = cluster(
        "anti-entropy",
        4,
        1,
        &[
            "--replica-timeout-ms",
            "500",
            "--ae-interval-ms",
            "10",
            "--ae-keys-max",
            "64",
        ],
    );
    let members: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    let ring = Ring::new(PARTITIONS, &members, 3).unwrap();
    let key = |i: usize| format!("ae-{i}").into_bytes();
    let mut a = nodes[0].client();
    for i in 0..30 {
        a.put(b"b", &key(i), b"before", None).unwrap();
    }
    // The writer runs while node 3 is killed: every put it sees acknowledged is recorded.
    let addr = nodes[0].addr.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&addr, config()).unwrap();
        let mut acked: BTreeMap<usize, Option<Vec<u8>>> = BTreeMap::new();
        for round in 0..3 {
            for i in 0..60 {
                let value = format!("round {round} key {i}").into_bytes();
                let context = c.get(b"b", &key(i)).ok().map(|r| r.context);
                if round == 2 && i % 5 == 0 {
                    let delete = Message::Delete(Delete {
                        bucket: Bytes::from_static(b"b"),
                        key: Bytes::from(key(i)),
                        context: context.filter(|c| !c.is_empty()),
                        w: None,
                        dw: None,
                        timeout_ms: None,
                    });
                    if let Ok(Message::DeleteOk) = c.request_message(delete) {
                        acked.insert(i, None);
                    }
                } else if c
                    .put(b"b", &key(i), &value, context.filter(|c| !c.is_empty()))
                    .is_ok()
                {
                    acked.insert(i, Some(value));
                }
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(50));
    nodes[2].kill();
    let acked = writer.join().unwrap();
    assert_eq!(acked.len(), 60, "every key was written with node 3 down");
    // Keys of node 3 were written to a fallback as hints, and they are not delivered.
    let missed: Vec<usize> = (0..60)
        .filter(|&i| {
            ring.preference_list(partition_of(b"b", &key(i)), 3)
                .contains(&NodeId(3))
        })
        .collect();
    assert!(!missed.is_empty());
    // The fallbacks hold hints for node 3 (metrics are published every second: polled)...
    let hints = |nodes: &[Node]| -> f64 {
        [0, 1, 3]
            .iter()
            .map(|&i| nodes[i].metric("ringkv_hints"))
            .sum()
    };
    let mut held = 0.0;
    for _ in 0..HANDOFF_POLLS {
        held = hints(&nodes);
        if held > 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
    }
    assert!(held > 0.0, "no fallback took a hint for node 3");
    // ...and are deleted on purpose, once no write is still in flight: a write acknowledged by
    // two replicas keeps working on its third slot (node 3's timeout, then a fallback's hint)
    // until its deadline, and could store a hint after a truncation (the writer has joined, so
    // no new one starts).
    assert!(
        none_in_flight(&nodes, &[0, 1, 3]),
        "writes are still in flight"
    );
    let held = hints(&nodes);
    let mut truncated = 0u64;
    for i in [0, 1, 3] {
        let text = nodes[i].client().admin("hints-truncate", "").unwrap();
        truncated += text
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("unexpected answer {text:?}"));
    }
    assert!(truncated > 0, "nothing was truncated (held {held})");
    let mut left = held;
    for _ in 0..HANDOFF_POLLS {
        left = hints(&nodes);
        if left == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
    }
    assert_eq!(left, 0.0, "hints are left after truncation");
    // Hints the others delivered so far (to one another, of writes made while a peer was still
    // suspected from startup): with their stores now empty, any later delivery is of a hint
    // stored after the truncation. Node 3's own store (it may hold such hints for others) is
    // not theirs to count. Read once the emptied stores were published, so no delivery
    // counted here is published late.
    let delivered = |nodes: &[Node]| -> f64 {
        [0, 1, 3]
            .iter()
            .map(|&i| nodes[i].metric("ringkv_hints_delivered_total"))
            .sum()
    };
    let delivered_before = delivered(&nodes);
    // Read repairs so far (while node 3 was down, among the others). None may follow: node 3 is
    // to be repaired by anti-entropy alone, and a read repair would hide a failing one.
    let read_repairs = |nodes: &[Node], of: &[usize]| -> f64 {
        of.iter()
            .map(|&i| nodes[i].metric("ringkv_read_repairs_total"))
            .sum()
    };
    let read_repairs_before = read_repairs(&nodes, &[0, 1, 3]);

    nodes[2].start();
    nodes[2].wait_ready();
    let mut repaired = false;
    for _ in 0..HANDOFF_POLLS {
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
        for i in [0, 1, 3] {
            nodes[i].signal("STOP");
        }
        let mut c = nodes[2].client();
        let mut all = true;
        for &i in &missed {
            let request = Message::Get(Get {
                bucket: Bytes::from_static(b"b"),
                key: Bytes::from(key(i)),
                r: Some(1),
                timeout_ms: Some(200),
            });
            let found = match c.request_message(request) {
                Ok(Message::GetOk(ok)) => ok.siblings,
                other => panic!("{other:?}"),
            };
            let expected: Vec<Sibling> = acked[&i]
                .iter()
                .map(|v| Sibling::Value(Bytes::from(v.clone())))
                .collect();
            if found != expected {
                all = false;
                break;
            }
        }
        // Every read has ended (past its deadline) before the others wake: their late replies
        // find nothing to repair. Waited for, not assumed from a pause (no new read starts
        // meanwhile).
        assert!(
            none_in_flight(&nodes, &[2]),
            "node 3's reads are still in flight"
        );
        for i in [0, 1, 3] {
            nodes[i].signal("CONT");
        }
        if all {
            repaired = true;
            break;
        }
    }
    if !repaired {
        for n in &nodes {
            eprintln!(
                "node {}: exchanges {} in sync {} repaired {} roots {:?}",
                n.id,
                n.metric("ringkv_ae_exchanges_total"),
                n.metric("ringkv_ae_in_sync_total"),
                n.metric("ringkv_ae_keys_repaired_total"),
                merkle(n).into_iter().take(3).collect::<Vec<_>>()
            );
        }
    }
    assert!(repaired, "anti-entropy did not repair the restarted node");
    assert_eq!(
        delivered(&nodes),
        delivered_before,
        "a hint reached node 3 after all"
    );
    // Counters are published at every tick of a shard (10 ms): one more moment, then compare.
    std::thread::sleep(Duration::from_millis(100));
    let per_node: Vec<f64> = (0..4).map(|i| read_repairs(&nodes, &[i])).collect();
    assert_eq!(
        read_repairs(&nodes, &[0, 1, 2, 3]),
        read_repairs_before,
        "a read repair, not anti-entropy alone, repaired node 3 (read repairs per node now: \
         {per_node:?})"
    );
    let repairs: f64 = nodes
        .iter()
        .map(|n| n.metric("ringkv_ae_keys_repaired_total"))
        .sum();
    assert!(repairs > 0.0);

    // Every replica set reports the same roots (published each second: polled, bounded).
    let mut equal = false;
    for _ in 0..HANDOFF_POLLS {
        let roots: Vec<_> = nodes.iter().map(merkle).collect();
        equal = (0..PARTITIONS.get()).all(|p| {
            let homes = ring.preference_list(PartitionId(p), 3);
            let of: BTreeSet<&(u64, String)> = homes
                .iter()
                .map(|h| &roots[h.0 as usize - 1][&(p, 3)])
                .collect();
            of.len() == 1
        });
        if equal {
            break;
        }
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
    }
    assert!(equal, "replica sets report different Merkle roots");
}

/// A full hint store refuses hints and counts them, and writes still succeed on the replicas
/// that remain. Four nodes, a hint store of one byte: with node 3 killed, every replica write
/// meant for it goes to the one fallback of its key, which refuses it (`overloaded`); the slot
/// has no fallback left, and W=2 is met by the two live homes. `/metrics` shows the refusals and
/// no hint held anywhere.
#[test]
fn a_full_hint_store_refuses_hints_and_counts_them() {
    let _clusters = clusters_shared();
    let mut nodes = cluster(
        "hint-overflow",
        4,
        1,
        &["--replica-timeout-ms", "500", "--hint-bytes-max", "1"],
    );
    nodes[2].kill();
    let members: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    let ring = Ring::new(PARTITIONS, &members, 3).unwrap();
    let mut a = nodes[0].client();
    let mut homed = 0;
    for i in 0..40 {
        let k = format!("key-{i}").into_bytes();
        a.put(b"b", &k, &k, None).unwrap();
        if ring
            .preference_list(partition_of(b"b", &k), 3)
            .contains(&NodeId(3))
        {
            homed += 1;
        }
    }
    assert!(homed > 0);
    let live = [0, 1, 3];
    let mut overflow = 0.0;
    // Metrics are published by each shard's ticker: polled a bounded number of times.
    for _ in 0..STARTUP_RETRIES {
        overflow = live
            .iter()
            .map(|&i| nodes[i].metric("ringkv_hint_overflow_total"))
            .sum();
        if overflow > 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS));
    }
    assert!(overflow > 0.0, "no refused hint counted");
    for &i in &live {
        assert_eq!(nodes[i].metric("ringkv_hints"), 0.0);
        assert_eq!(nodes[i].metric("ringkv_hint_bytes"), 0.0);
        assert_eq!(nodes[i].metric("ringkv_admission_background_share"), 1.0);
    }
    assert!(nodes[0].metric("ringkv_heartbeats_total") > 0.0);
}

fn put_expiring(c: &mut Client, key: &[u8], value: &[u8], ttl_ms: u64) {
    c.put_expiring(
        b"sessions",
        key,
        value,
        None,
        ringkv_net::Expiry::Ttl { ms: ttl_ms },
    )
    .unwrap();
}

/// Expiry across a cluster with a node down during the expiry. Four nodes, N=3, the `lww`
/// `sessions` bucket. Every key first holds a value without expiry on all its replicas; node 3
/// is killed; the keys are overwritten with a 1.5 s time to live (fallbacks take hints for node
/// 3, which keeps the old, never-expiring value); the time to live passes. Then no node answers
/// the key, node 3 restarts holding the old value, and the old value never comes back: reads
/// through node 3 (R=2) find nothing from its first answer on, and once hints, read repair and
/// anti-entropy have run, node 3 alone (the others frozen, R=1) finds nothing either: what
/// reached it was the expiring version, which dominates the old one. Finally, with a 1 s grace,
/// anti-entropy reaps the expired keys on every replica: every Merkle tree ends empty.
#[test]
fn expired_keys_stay_gone_when_a_node_returns_with_older_values() {
    let _clusters = clusters_shared();
    let mut nodes = cluster(
        "expiry",
        4,
        1,
        &[
            "--replica-timeout-ms",
            "500",
            "--hint-retry-ms",
            "200",
            "--ae-interval-ms",
            "20",
            "--expiry-grace-ms",
            "1000",
        ],
    );
    let members: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    let ring = Ring::new(PARTITIONS, &members, 3).unwrap();
    let keys: Vec<Vec<u8>> = (0..24).map(|i| format!("sess-{i}").into_bytes()).collect();
    let on_node_3: Vec<&Vec<u8>> = keys
        .iter()
        .filter(|k| {
            ring.preference_list(partition_of(b"sessions", k), 3)
                .contains(&NodeId(3))
        })
        .collect();
    assert!(!on_node_3.is_empty());
    let mut a = nodes[0].client();
    for k in &keys {
        a.put(b"sessions", k, b"old", None).unwrap();
    }
    // Every replica holds the old value before node 3 goes down.
    for k in &keys {
        let read = get_retrying(&mut a, b"sessions", k, 3);
        assert_eq!(
            read.siblings,
            vec![Sibling::Value(Bytes::from_static(b"old"))]
        );
    }

    nodes[2].kill();
    for k in &keys {
        put_expiring(&mut a, k, b"new", 1_500);
    }
    let read = get_with(&mut a, b"sessions", &keys[0], None);
    assert_eq!(
        read.siblings,
        vec![Sibling::Value(Bytes::from_static(b"new"))]
    );
    assert!(read.expires_at_ms.is_some(), "the read carries the expiry");
    // Past the expiry, by the nodes' clocks: every live node reads nothing.
    std::thread::sleep(Duration::from_millis(1_500));
    let mut gone = false;
    for _ in 0..STARTUP_RETRIES {
        if keys
            .iter()
            .all(|k| get_with(&mut a, b"sessions", k, None).siblings.is_empty())
        {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS));
    }
    assert!(gone, "the keys expired");
    for i in [1, 3] {
        let mut c = nodes[i].client();
        for k in &keys {
            assert!(get_with(&mut c, b"sessions", k, None).siblings.is_empty());
        }
    }

    nodes[2].start();
    nodes[2].wait_ready();
    // From node 3's first answer on, a quorum read never returns the old value it holds.
    let mut c = nodes[2].client();
    for k in &keys {
        let read = get_retrying(&mut c, b"sessions", k, 2);
        assert!(read.siblings.is_empty(), "{read:?}");
    }
    // Node 3 alone: the expiring version reached it (hints, read repair, anti-entropy).
    let mut repaired = false;
    for _ in 0..HANDOFF_POLLS {
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
        for i in [0, 1, 3] {
            nodes[i].signal("STOP");
        }
        let mut alone = Client::connect(&nodes[2].addr, config()).unwrap();
        let found_old = on_node_3.iter().any(|k| {
            !get_with(&mut alone, b"sessions", k, Some(1))
                .siblings
                .is_empty()
        });
        for i in [0, 1, 3] {
            nodes[i].signal("CONT");
        }
        if !found_old {
            repaired = true;
            break;
        }
    }
    assert!(repaired, "node 3 still answers the old value alone");
    for node in &nodes {
        let mut c = node.client();
        for k in &keys {
            let read = get_retrying(&mut c, b"sessions", k, 3);
            assert!(read.siblings.is_empty(), "node {}: {read:?}", node.id);
        }
    }
    // The grace has passed: anti-entropy reaps the expired keys on every replica.
    let mut reaped = false;
    for _ in 0..HANDOFF_POLLS {
        if nodes
            .iter()
            .all(|n| merkle(n).values().all(|(keys, _)| *keys == 0))
        {
            reaped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
    }
    assert!(reaped, "expired keys were not reaped");
    assert!(
        nodes
            .iter()
            .map(|n| n.metric("ringkv_tombstones_reaped_total"))
            .sum::<f64>()
            > 0.0
    );
}

/// Conditional writes serialize at the key's first home. Three nodes, the `lww` `sessions`
/// bucket; for each of 40 keys, three threads (one per node) race an "if absent" PUT of their
/// own value at the same moment (a barrier per key). Every node forwards the write to the key's
/// first home, which decides under the key's lock: exactly one of the three succeeds per key,
/// the others fail `condition_failed`, and every node then reads the winner's value (R=3).
///
/// It runs with no other cluster of this file beside it: a node forwards to the first home it
/// believes up, so a home suspected under load (a heartbeat or replica answer delayed past the
/// detector's bounds) sends racing writes to two homes. The design admits that detour, and
/// this test cannot tell it from a bug; it failed so twice, in full runs on a loaded machine.
#[test]
fn racing_conditional_writes_have_one_winner() {
    let _clusters = clusters_alone();
    use std::sync::{Arc, Barrier};

    let nodes = cluster("conditional", 3, 1, &[]);
    let keys: Vec<Vec<u8>> = (0..40).map(|i| format!("lock-{i}").into_bytes()).collect();
    let barrier = Arc::new(Barrier::new(3));
    let threads: Vec<_> = nodes
        .iter()
        .map(|node| {
            let addr = node.addr.clone();
            let keys = keys.clone();
            let barrier = barrier.clone();
            let me = node.id;
            std::thread::spawn(move || {
                let mut c = Client::connect(&addr, config()).unwrap();
                let mut won = Vec::new();
                for k in &keys {
                    barrier.wait();
                    let put = Message::Put(ringkv_net::Put {
                        bucket: Bytes::from_static(b"sessions"),
                        key: Bytes::from(k.clone()),
                        value: Bytes::from(format!("node-{me}")),
                        context: None,
                        w: None,
                        dw: None,
                        timeout_ms: None,
                        expiry: None,
                        condition: Some(ringkv_net::Condition::IfAbsent),
                    });
                    match c.request_message(put) {
                        Ok(Message::PutOk(_)) => won.push(k.clone()),
                        Err(ClientError::Server {
                            code: ErrorCode::ConditionFailed,
                            ..
                        }) => {}
                        other => panic!("node {me}: {other:?}"),
                    }
                }
                (me, won)
            })
        })
        .collect();
    let mut winner: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    for t in threads {
        let (me, won) = t.join().unwrap();
        for k in won {
            if let Some(other) = winner.insert(k.clone(), me) {
                panic!(
                    "{}: both node {other} and node {me} won",
                    String::from_utf8_lossy(&k)
                );
            }
        }
    }
    assert_eq!(winner.len(), keys.len(), "every key has a winner");
    for node in &nodes {
        let mut c = node.client();
        for (k, me) in &winner {
            let read = get_retrying(&mut c, b"sessions", k, 3);
            assert_eq!(
                read.siblings,
                vec![Sibling::Value(Bytes::from(format!("node-{me}")))]
            );
        }
    }
}

/// A write a node does not home is forwarded to a node that does, whatever its kind. Three
/// nodes and the `lww` bucket `single` (n = 1): most of 30 keys have their one home elsewhere,
/// so node 1 forwards their map UPDATEs (and their PUTs); every node then reads each key's
/// fields and value, each acknowledged write visible within a bound.
#[test]
fn updates_are_forwarded_to_the_home_like_any_write() {
    let _clusters = clusters_shared();
    let nodes = cluster("forward-update", 3, 1, &[]);
    let mut c = nodes[0].client();
    let keys: Vec<Vec<u8>> = (0..30)
        .map(|i| format!("session-{i}").into_bytes())
        .collect();
    for k in &keys {
        let ops = vec![MapOp::Set {
            field: Bytes::from_static(b"user"),
            value: Bytes::from(k.clone()),
        }];
        c.update(b"single", k, ops)
            .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(k)));
        c.put(b"single", &[k.as_slice(), b"-v"].concat(), k, None)
            .unwrap();
    }
    // Metrics are published a moment after the fact: polled.
    common::wait_for(
        "node 1 forwarded some of the writes",
        HANDOFF_POLLS,
        HANDOFF_POLL_MS,
        || match nodes[0].metric("ringkv_forwarded_total") {
            n if n > 0.0 => Ok(()),
            n => Err(format!("ringkv_forwarded_total {n}")),
        },
    );
    // Polled: a forwarded PUT (it may move) whose one home stayed silent for a replica timeout,
    // as a busy machine can make it, is coordinated by node 1 itself, on a fallback with a
    // hint, and reads at `r = 1` from the home see it once the hint is delivered (an UPDATE
    // never moves: it waits for its home).
    for node in &nodes {
        let mut c = node.client();
        for k in &keys {
            let name = String::from_utf8_lossy(k);
            let fields = Some(vec![(Bytes::from_static(b"user"), Bytes::from(k.clone()))]);
            let value = Some(Bytes::from(k.clone()));
            common::wait_for(
                &format!("node {} reads {name}", node.id),
                HANDOFF_POLLS,
                HANDOFF_POLL_MS,
                || {
                    let read = c.get(b"single", k).unwrap();
                    let put = c.get(b"single", &[k.as_slice(), b"-v"].concat()).unwrap();
                    if read.registers() == fields && put.value() == value.as_ref() {
                        Ok(())
                    } else {
                        Err(format!("{:?} and {:?}", read.registers(), put.value()))
                    }
                },
            );
        }
    }
}

/// A key of `bucket` whose first home in the three-node ring is not node 3, so that the
/// operations on it are coordinated by a node that is never killed.
fn key_not_first_on_3(bucket: &[u8], prefix: &str) -> Vec<u8> {
    let members: BTreeSet<NodeId> = (1..=3).map(NodeId).collect();
    let ring = Ring::new(PARTITIONS, &members, 3).unwrap();
    (0..)
        .map(|i| format!("{prefix}-{i}").into_bytes())
        .find(|k| ring.preference_list(partition_of(bucket, k), 3)[0] != NodeId(3))
        .unwrap()
}

/// Retries `op` (reconnecting after a failure) until it succeeds, a bounded number of times.
fn until_ok<T>(node: &Node, what: &str, mut op: impl FnMut(&mut Client) -> Result<T, ClientError>) {
    let mut client = node.client();
    for attempt in 0..100 {
        match op(&mut client) {
            Ok(_) => return,
            Err(e) => {
                assert!(attempt < 99, "{what} through node {}: {e}", node.id);
                std::thread::sleep(Duration::from_millis(100));
                if let Ok(c) = Client::connect(&node.addr, config()) {
                    client = c;
                }
            }
        }
    }
}

/// The convergent types on real processes: two clients increment one counter and add to one
/// set through two nodes, each operation retried with its id until acknowledged, while the
/// third node is killed and restarted. Afterwards every node, read alone (the others frozen),
/// holds the exact sum and the union: nothing acknowledged was lost, and no retry counted
/// twice.
#[test]
fn counters_and_sets_keep_every_acknowledged_operation_across_a_restart() {
    let _clusters = clusters_shared();
    let mut nodes = cluster(
        "convergent",
        3,
        2,
        &["--replica-timeout-ms", "500", "--ae-interval-ms", "200"],
    );
    const OPS: usize = 60;
    let counter = key_not_first_on_3(b"counters", "likes");
    let set = key_not_first_on_3(b"sets", "cart");
    let done = std::sync::atomic::AtomicUsize::new(0);
    let (running, third) = nodes.split_at_mut(2);
    std::thread::scope(|s| {
        for (t, node) in running.iter().enumerate() {
            let (counter, set, done) = (&counter, &set, &done);
            s.spawn(move || {
                for i in 0..OPS {
                    let op_id = ((t as u64) << 32) | i as u64;
                    until_ok(node, "increment", |c| {
                        c.increment(b"counters", counter, 1, Some(op_id))
                    });
                    let element = Bytes::from(format!("item-{t}-{i}"));
                    until_ok(node, "add", |c| {
                        c.set_add(b"sets", set, vec![element.clone()])
                    });
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        let progress = |at: usize| {
            for _ in 0..600 {
                if done.load(std::sync::atomic::Ordering::Relaxed) >= at {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("the clients never reached {at} operations");
        };
        progress(OPS / 2);
        third[0].kill();
        progress(OPS);
        third[0].start();
        third[0].wait_ready();
    });
    let sum = i64::try_from(2 * OPS).unwrap();
    let union: Vec<Bytes> = {
        let mut all: Vec<Bytes> = (0..2)
            .flat_map(|t| (0..OPS).map(move |i| Bytes::from(format!("item-{t}-{i}"))))
            .collect();
        all.sort();
        all
    };
    for i in 0..nodes.len() {
        let mut last = String::new();
        let mut agreed = false;
        for _ in 0..HANDOFF_POLLS {
            for (j, other) in nodes.iter().enumerate() {
                if j != i {
                    other.signal("STOP");
                }
            }
            let mut c = nodes[i].client();
            let count = get_with(&mut c, b"counters", &counter, Some(1)).crdt;
            let members = get_with(&mut c, b"sets", &set, Some(1)).crdt;
            for (j, other) in nodes.iter().enumerate() {
                if j != i {
                    other.signal("CONT");
                }
            }
            let want_set = Some(ringkv_net::CrdtValue::Set(union.clone()));
            if count == Some(ringkv_net::CrdtValue::Counter(sum)) && members == want_set {
                agreed = true;
                break;
            }
            last = format!("counter {count:?}, set {members:?}");
            std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
        }
        assert!(
            agreed,
            "node {} alone never held the sum {sum} and the union: {last}",
            i + 1
        );
    }
}

/// Polls node `node`'s `/metrics` until it suspects exactly `peers` peers (bounded: the failure
/// detector needs many heartbeat intervals of silence).
fn wait_suspected(node: &Node, peers: f64) {
    for _ in 0..HANDOFF_POLLS {
        if node.metric("ringkv_peers_suspected") == peers {
            return;
        }
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
    }
    panic!("node {} never suspected {peers} peers", node.id);
}

/// Two `INCRBY` of one key through the RESP ports of two nodes, each coordinated while the
/// other node is away, both count: a counter increment is an operation its coordinator applies
/// to the replica it holds, and the replicas merge once the nodes see each other again, where a
/// read-then-write `INCR` would have written 7 over 5. Two nodes hold every key; the `redis`
/// bucket has `w = 1`, so each takes a write alone, and the key is one whose first home is
/// node 2, so node 2 coordinates its increment itself. Node 2 is stopped (SIGSTOP) and, once
/// node 1's failure detector suspects it (so that node 1 coordinates rather than forwards),
/// node 1 applies `+5`. Node 1 is then stopped, and node 2 killed, which drops the copy node 1
/// sent it with its socket, as a partition would, and restarted: it applies `+7` to a replica
/// that has not seen `+5`, and answers 7. After SIGCONT, a GET through either node answers 12
/// (bounded polling: read repair and anti-entropy bring each replica the other's increment).
#[test]
fn increments_through_two_nodes_apart_both_count() {
    let _clusters = clusters_shared();
    use redis::Commands;

    let members: BTreeSet<NodeId> = [NodeId(1), NodeId(2)].into();
    let ring = Ring::new(PARTITIONS, &members, 3).unwrap();
    let key = (0..)
        .map(|i| format!("likes-{i}"))
        .find(|k| ring.preference_list(partition_of(b"redis", k.as_bytes()), 3)[0] == NodeId(2))
        .unwrap();

    let mut nodes = cluster("resp-counter", 2, 1, &[]);
    // Suspicion from startup (a peer not yet listening) would not last: start from none.
    wait_suspected(&nodes[0], 0.0);
    nodes[1].signal("STOP");
    wait_suspected(&nodes[0], 1.0);
    let first: i64 = nodes[0].redis().incr(&key, 5).unwrap();
    assert_eq!(first, 5);

    nodes[0].signal("STOP");
    nodes[1].kill();
    nodes[1].start();
    nodes[1].wait_ready();
    let second: i64 = nodes[1].redis().incr(&key, 7).unwrap();
    assert_eq!(second, 7, "node 2 has not seen node 1's increment");
    nodes[0].signal("CONT");

    let mut cons = [nodes[0].redis(), nodes[1].redis()];
    let mut seen = [None, None];
    for _ in 0..HANDOFF_POLLS {
        for (con, seen) in cons.iter_mut().zip(&mut seen) {
            *seen = con.get::<_, Option<String>>(&key).unwrap();
        }
        if seen.iter().all(|s| s.as_deref() == Some("12")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
    }
    panic!("the nodes read {seen:?}, not both increments");
}

/// A request whose deadline passes before its quorum answers is answered `timeout`, not
/// `not_enough_replicas` after the 5 s replica timeout nor never, and the connection serves the
/// next request: two of three nodes frozen, a write needing all three with a 400 ms deadline,
/// through the binary protocol. (The core ends the request at its deadline and the
/// connection's wait has a timer for it; either answers, so this checks what the client sees,
/// not which one did.)
#[test]
fn a_request_past_its_deadline_is_answered_timeout() {
    let _clusters = clusters_shared();
    let nodes = cluster("deadline", 3, 1, &["--replica-timeout-ms", "5000"]);
    let mut c = nodes[0].client();
    c.put(b"b", b"before", b"v", None).unwrap();
    for node in &nodes[1..] {
        node.signal("STOP");
    }
    let put = Message::Put(Put {
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(b"late"),
        value: Bytes::from_static(b"v"),
        context: None,
        w: Some(3),
        dw: None,
        timeout_ms: Some(400),
        expiry: None,
        condition: None,
    });
    let answer = c.request_message(put);
    for node in &nodes[1..] {
        node.signal("CONT");
    }
    match answer {
        Err(ClientError::Server {
            code: ErrorCode::Timeout,
            ..
        }) => {}
        other => panic!("expected a timeout answer: {other:?}"),
    }
    c.put(b"b", b"after", b"v", None).unwrap();
}

/// A last-write-wins put sent to a node that is no home of its key, whose first home has just
/// been stopped (SIGSTOP) with its connection open, is moved to the next home after the replica
/// timeout and acknowledged, not held until the client's deadline; and once the stopped home
/// resumes and reads the forward from its socket, it refuses it, so the old value does not
/// overwrite one written after it. Four nodes, `n = 3`, `w = 2`. Heartbeats a minute apart keep
/// the stopped home trusted (it answered a read just before), so the forward goes to it and the
/// move is what is tested.
#[test]
fn a_session_write_moves_off_a_stopped_home_which_refuses_it_on_resuming() {
    let _clusters = clusters_shared();
    let members: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    let ring = Ring::new(PARTITIONS, &members, 3).unwrap();
    let (key, home) = (0..)
        .map(|i| format!("session-{i}"))
        .find_map(|k| {
            let homes = ring.preference_list(partition_of(b"sessions", k.as_bytes()), 3);
            (!homes.contains(&NodeId(1))).then(|| (k, homes[0]))
        })
        .unwrap();
    let nodes = cluster("forward-move", 4, 1, &["--heartbeat-ms", "60000"]);
    let home = &nodes[home.0 as usize - 1];
    let mut c = nodes[0].client();
    // A peer node 1 failed to reach while the cluster started stays suspected for a moment
    // (`down_ms`), and with heartbeats a minute apart nothing else clears it: a read then goes
    // to a fallback instead of that home, and so would the forward. Wait until node 1 suspects
    // nobody, then it hears from every home of the key, the first included.
    wait_suspected(&nodes[0], 0.0);
    let read = get_with(&mut c, b"sessions", key.as_bytes(), Some(3));
    assert!(read.siblings.is_empty(), "{read:?}");

    home.signal("STOP");
    let first = c.put(b"sessions", key.as_bytes(), b"v1", None);
    let second = c.put(b"sessions", key.as_bytes(), b"v2", None);
    home.signal("CONT");
    first.expect("the write through a stopped home's forward");
    second.expect("the write after it");
    // Metrics are published a moment after the fact: polled. The first move marks the stopped
    // home down for `down_ms` (2 s), so the second write normally goes to the next home at once;
    // on a machine slow enough that the mark lapses first, the second write is forwarded to the
    // stopped home and moved as well. Either way every forward the stopped home received was
    // moved, and it refuses each one when it resumes.
    let (mut moved, mut refused) = (0.0, 0.0);
    for _ in 0..HANDOFF_POLLS {
        moved = nodes[0].metric("ringkv_forwards_moved_total");
        refused = home.metric("ringkv_forwards_refused_total");
        if moved >= 1.0 && refused >= moved {
            break;
        }
        std::thread::sleep(Duration::from_millis(HANDOFF_POLL_MS));
    }
    assert!(
        (1.0..=2.0).contains(&moved),
        "the forward was not moved off the stopped home: {moved} moves"
    );
    assert_eq!(
        refused, moved,
        "the resumed home did not refuse every late forward"
    );
    let read = get_with(&mut c, b"sessions", key.as_bytes(), Some(3));
    assert_eq!(
        read.siblings,
        vec![Sibling::Value(Bytes::from_static(b"v2"))],
        "the later write was overwritten"
    );
}
