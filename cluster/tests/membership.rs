//! End to end: the operator's `ringkv cluster` commands against running `ringkv serve`
//! processes on loopback.
//!
//! Every node gets its own ports and data directory under CARGO_TARGET_TMPDIR and is killed in
//! a drop guard, so a failing test never leaves one behind. Every wait is a bounded number of
//! retries; nothing asserts on wall-clock time.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use common::{
    BIN, ClusterNode, Server, data_dir, free_port, merkle, replica_values, seeds, wait_for,
};
use ringkv_cluster::route::partition_of;
use ringkv_core::object::Val;
use ringkv_net::{ClientError, ErrorCode, Get, Message, Sibling};

/// The Dynamo (3, 2, 2) default bucket.
const BUCKETS: &str = "\
[buckets.default]
n = 3
r = 2
w = 2
dw = 1
";
/// Gossip interval of test clusters, in ms: short, so changes spread in a few polls.
const GOSSIP_MS: &str = "100";
/// Rounds of a membership poll, each a pause of [`POLL_MS`] and one check.
const POLLS: usize = 150;
const POLL_MS: u64 = 100;
/// Rounds of the poll for a committed change to finish (its transfers and the flip).
const SETTLE_POLLS: usize = 600;
/// Interval between anti-entropy exchanges of each shard in these tests.
const AE_INTERVAL_MS: &str = "10";
/// The bucket the scenario writes to.
const BUCKET: &[u8] = b"default";
/// Bound on the writes of the scenario, so a stuck change cannot write forever.
const WRITES_MAX: usize = 200_000;
/// Fewest writes for the scenario to mean something: some land during each change.
const WRITES_MIN: usize = 50;

/// Three nodes bootstrapped from the same seeds and a fourth started alone, all running.
fn three_and_a_fresh_one(name: &str) -> Vec<ClusterNode> {
    let dir = data_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    let buckets = dir.join("buckets.toml");
    std::fs::write(&buckets, BUCKETS).unwrap();
    let mut nodes: Vec<ClusterNode> = (1..=4)
        .map(|id| ClusterNode::new(&dir, id, &buckets))
        .collect();
    let peers: Vec<(u32, &str)> = nodes[..3]
        .iter()
        .map(|n| (n.id, n.peer_addr.as_str()))
        .collect();
    let seed_list = seeds(&peers);
    for (i, node) in nodes.iter_mut().enumerate() {
        node.extra = vec![
            "--gossip-ms".into(),
            GOSSIP_MS.into(),
            // Anti-entropy walks every tree of a shard once per interval each: short here so
            // a scenario's replicas converge within its bounded wait.
            "--ae-interval-ms".into(),
            AE_INTERVAL_MS.into(),
        ];
        if i < 3 {
            node.extra.extend(["--seeds".into(), seed_list.clone()]);
        }
        node.start();
    }
    nodes
}

/// Three nodes bootstrapped from the same seeds (no fourth), all running.
fn three_seeded(name: &str) -> Vec<ClusterNode> {
    let mut nodes = three_and_a_fresh_one(name);
    nodes.truncate(3);
    nodes
}

/// A node restarted on another peer port announces it (its restored entry takes this run's
/// addresses), gossip spreads it, and the others' shards close their links to the old address
/// and reach the new one: a write that needs all three replicas succeeds through another node.
#[test]
fn a_node_that_moved_is_reached_at_its_new_address() {
    let mut nodes = three_seeded("moved-peer");
    nodes[1].stop();
    nodes[1].move_peer_port();
    nodes[1].start();
    let moved = nodes[1].peer_addr.clone();
    for node in [&nodes[0], &nodes[2]] {
        wait_for("the new address known", POLLS, POLL_MS, || {
            let status = node
                .admin("cluster-status", "")
                .map_err(|e| e.to_string())?;
            match member_line(&status, 2) {
                Some(line) if line.contains(&moved) => Ok(()),
                _ => Err(status),
            }
        });
    }
    // With N=3 on three nodes node-1 is a home of every key, so it coordinates and needs
    // node-2's answer for w = 3. Retried (bounded) while node-1 still suspects node-2 from its
    // restart.
    let mut client = nodes[0].client();
    wait_for("a write with w = 3", POLLS, POLL_MS, || {
        let put = common::put_w(BUCKET, Bytes::from_static(b"after-the-move"), b"v", 3);
        match client.request_message(put) {
            Ok(Message::PutOk(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

/// The status line of `node` in a `cluster status` answer, as its words.
fn member_line(status: &str, node: u32) -> Option<Vec<String>> {
    let name = format!("node-{node}");
    status
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
}

/// Connections land on any shard (SO_REUSEPORT); ADMIN is answered by the first shard whichever
/// shard received it, so a client on each shard gets the same status.
#[test]
fn admin_reaches_the_first_shard_from_any_shard() {
    let dir = data_dir("admin-any-shard");
    let server = Server::start(&dir, free_port());
    let mut seen = [false; 2];
    let mut answers = Vec::new();
    // Each connection picks a shard at random; 64 tries miss one of two shards with
    // probability 2^-63.
    for _ in 0..64 {
        let mut client = server.client();
        let shard = usize::from(client.server().shard);
        if seen[shard] {
            continue;
        }
        seen[shard] = true;
        answers.push(client.admin("cluster-status", "").unwrap());
    }
    assert_eq!(seen, [true, true]);
    assert_eq!(answers[0], answers[1]);
    assert!(
        answers[0].lines().any(|l| l.ends_with(" self")),
        "{}",
        answers[0]
    );
    assert!(
        answers[0]
            .lines()
            .any(|l| l == "this node holds: 0 partitions to hand off, 0 hints"),
        "{}",
        answers[0]
    );
    let mut client = server.client();
    match client.admin("no-such-command", "") {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::InvalidRequest),
        other => panic!("{other:?}"),
    }
    // The connection stays usable after a refused command.
    assert!(client.admin("cluster-status", "").is_ok());
}

/// The async client and both pools run operator commands too, with the same answers and errors.
#[test]
fn async_connections_run_admin_commands() {
    let dir = data_dir("admin-async");
    let server = Server::start(&dir, free_port());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = ringkv_net::AsyncConnection::connect(server.addr.as_str(), common::config())
            .await
            .unwrap();
        let status = conn.admin("cluster-status", "").await.unwrap();
        assert!(status.lines().any(|l| l.ends_with(" self")), "{status}");
        match conn.admin("cluster-remove", "not-a-number").await {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::InvalidRequest),
            other => panic!("{other:?}"),
        }
        // The pools offer the same commands.
        let pool = ringkv_net::AsyncPool::connect(
            server.addr.as_str(),
            common::config(),
            ringkv_net::PoolConfig::default(),
        )
        .await
        .unwrap();
        let status = pool.admin("cluster-status", "").await.unwrap();
        assert!(status.lines().any(|l| l.ends_with(" self")), "{status}");
    });
    let pool = ringkv_net::Pool::connect(
        server.addr.as_str(),
        common::config(),
        ringkv_net::PoolConfig::default(),
    )
    .unwrap();
    let status = pool.admin("cluster-status", "").unwrap();
    assert!(status.lines().any(|l| l.ends_with(" self")), "{status}");
}

/// `ringkv cluster status` prints the node's answer and exits 0; a command the node refuses
/// exits 2 with the node's reason on stderr.
#[test]
fn cli_prints_answers_and_fails_on_errors() {
    let dir = data_dir("admin-cli");
    let server = Server::start(&dir, free_port());
    let out = Command::new(BIN)
        .args(["cluster", "status", "--server", &server.addr])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().any(|l| l.ends_with(" self")), "{text}");
    let out = Command::new(BIN)
        .args(["cluster", "remove", "--server", &server.addr, "99"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("invalid_request"), "{err}");
    // A node without a peer listener could never be reached by its new cluster.
    let out = Command::new(BIN)
        .args(["cluster", "join", "--server", &server.addr, "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--peer-listen"), "{err}");
    // A seed that does not answer: `timeout`, the kind that may be retried, not a refusal.
    let peer = format!("127.0.0.1:{}", free_port());
    let joiner = Server::start_with(&dir.join("joiner"), free_port(), &["--peer-listen", &peer]);
    let silent_seed = format!("127.0.0.1:{}", free_port());
    let out = Command::new(BIN)
        .args(["cluster", "join", "--server", &joiner.addr, &silent_seed])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("timeout") && err.contains("did not answer"),
        "{err}"
    );
}

/// A fresh node joins through a seed; gossip spreads it to every member; a commit asked of a
/// node that is not the claimant is forwarded to the claimant, which makes the new ring pending
/// (every node then reports transfers left); and a restarted node, which has no seeds, restores
/// the four-member cluster from its state file.
#[test]
fn join_spreads_commit_reaches_the_claimant_and_membership_survives_restart() {
    let mut nodes = three_and_a_fresh_one("join-commit-restart");
    let status = nodes[0].admin("cluster-status", "").unwrap();
    for id in 1..=3 {
        let line = member_line(&status, id).unwrap_or_else(|| panic!("{status}"));
        assert_eq!(line[1], "valid", "{status}");
    }
    assert!(member_line(&status, 4).is_none(), "{status}");

    let joined = nodes[3].admin("cluster-join", &nodes[0].peer_addr).unwrap();
    assert!(joined.starts_with("joined"), "{joined}");
    // A node that joined cannot join again.
    assert!(nodes[3].admin("cluster-join", &nodes[1].peer_addr).is_err());
    for node in &nodes {
        wait_for("node-4 joining everywhere", POLLS, POLL_MS, || {
            let status = node
                .admin("cluster-status", "")
                .map_err(|e| e.to_string())?;
            match member_line(&status, 4) {
                Some(line) if line[1] == "joining" => Ok(()),
                _ => Err(status),
            }
        });
    }
    let plan = nodes[1].admin("cluster-plan", "").unwrap();
    assert!(
        plan.lines()
            .any(|l| l.split_whitespace().eq(["join", "node-4"])),
        "{plan}"
    );

    // node-1 is the claimant (lowest valid id); node-3 forwards the commit to it.
    let committed = nodes[2].admin("cluster-commit", "").unwrap();
    assert!(committed.starts_with("committed"), "{committed}");
    for node in &nodes {
        wait_for("the new ring pending everywhere", POLLS, POLL_MS, || {
            let status = node
                .admin("cluster-status", "")
                .map_err(|e| e.to_string())?;
            let valid = member_line(&status, 4).is_some_and(|l| l[1] == "valid");
            let pending = status
                .lines()
                .any(|l| l.starts_with("pending transfers:") && l != "pending transfers: none");
            let flipped = status.lines().any(|l| l == "pending transfers: none")
                && member_line(&status, 4).is_some_and(|l| l[2] != "0.0%");
            if valid && (pending || flipped) {
                Ok(())
            } else {
                Err(status)
            }
        });
    }

    nodes[3].stop();
    nodes[3].start();
    let status = nodes[3].admin("cluster-status", "").unwrap();
    for id in 1..=4 {
        assert_eq!(
            member_line(&status, id).map(|l| l[1].clone()).as_deref(),
            Some("valid"),
            "{status}"
        );
    }
}

/// The bytes a `cluster plan` answer says the staged change moves (its `replica copies to
/// transfer: N (about 12.4 MiB)` line), or `None` when it gives none (size unknown).
fn plan_bytes(plan: &str) -> Option<f64> {
    let line = plan
        .lines()
        .find(|l| l.starts_with("replica copies to transfer:"))?;
    let figure = line.split("(about ").nth(1)?;
    let mut words = figure.split_whitespace();
    let value: f64 = words.next()?.parse().ok()?;
    let unit = words.next()?.trim_end_matches([')', ';']);
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(value * scale)
}

/// Waits until every node in `nodes` reports no pending transfers and `check` holds for its
/// status text.
fn wait_settled(nodes: &[&ClusterNode], what: &str, check: impl Fn(&str) -> bool) {
    for node in nodes {
        wait_for(what, SETTLE_POLLS, POLL_MS, || {
            let status = node
                .admin("cluster-status", "")
                .map_err(|e| e.to_string())?;
            let settled = status.lines().any(|l| l == "pending transfers: none");
            if settled && check(&status) {
                Ok(())
            } else {
                Err(status)
            }
        });
    }
}

/// Waits (bounded) until `node` reports no partition left to hand off.
fn wait_nothing_to_hand_off(node: &ClusterNode) {
    wait_for("no partition left to hand off", POLLS, POLL_MS, || {
        let status = node
            .admin("cluster-status", "")
            .map_err(|e| e.to_string())?;
        if status.contains("this node holds: 0 partitions to hand off") {
            Ok(())
        } else {
            Err(status)
        }
    });
}

/// An acknowledged write: key and value.
type Written = (Vec<u8>, Vec<u8>);

/// The rebalancing scenario: three nodes (N=3, W=2) under continuous writes; a fourth joins (the
/// plan giving a non-zero number of bytes to move) and receives its partitions, after which
/// `status` shows no pending transfer; then one of the first three leaves. Returns the nodes that stay
/// and every acknowledged write, once both changes are complete everywhere (no transfer
/// pending, node-4 owning partitions, node-3 removed), after checking that no write failed.
fn join_then_leave_under_writes(name: &str) -> (Vec<ClusterNode>, Vec<Written>) {
    let mut nodes = three_and_a_fresh_one(name);
    // The measured phase starts once the three-node cluster takes a W=2 write on each shard of
    // each node the writer uses: a cold start is not what this scenario is about (cores that
    // heartbeat a peer not started yet suspect it, and back off before reconnecting).
    let warm_up: Vec<Vec<u8>> = (0..2)
        .map(|shard| {
            (0..)
                .map(|i| format!("warm-up-{i}").into_bytes())
                .find(|k| partition_of(BUCKET, k).0 % 2 == shard)
                .unwrap()
        })
        .collect();
    for node in &nodes[..2] {
        for key in &warm_up {
            wait_for("a first write accepted", POLLS, POLL_MS, || {
                node.client()
                    .put(BUCKET, key, b"w", None)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Writes go through the two nodes that stay, alternately, each key written once.
    let targets = [nodes[0].addr.clone(), nodes[1].addr.clone()];
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut clients: Vec<_> = targets
                .iter()
                .map(|a| ringkv_net::Client::connect(a.as_str(), common::config()).unwrap())
                .collect();
            let (mut acked, mut errors) = (Vec::new(), Vec::new());
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && i < WRITES_MAX {
                let key = format!("key-{i}").into_bytes();
                let value = format!("value-{i}").into_bytes();
                match clients[i % 2].put(BUCKET, &key, &value, None) {
                    Ok(_) => acked.push((key, value)),
                    Err(e) => {
                        errors.push(format!("put {i}: {e}"));
                        // A broken connection would fail every later write: reconnect.
                        if let Ok(client) =
                            ringkv_net::Client::connect(targets[i % 2].as_str(), common::config())
                        {
                            clients[i % 2] = client;
                        }
                    }
                }
                i += 1;
            }
            (acked, errors)
        })
    };

    let joined = nodes[3].admin("cluster-join", &nodes[0].peer_addr).unwrap();
    assert!(joined.starts_with("joined"), "{joined}");
    for node in &nodes {
        wait_for("node-4 known everywhere", POLLS, POLL_MS, || {
            let status = node
                .admin("cluster-status", "")
                .map_err(|e| e.to_string())?;
            member_line(&status, 4).map(|_| ()).ok_or(status)
        });
    }
    // The plan gives the bytes the join moves once every node's stored sizes reached the node
    // asked (engines publish them every second, gossip spreads them): the warm-up and the
    // writes so far are on the three replicas, so the figure is above 0.
    wait_for("the plan's bytes to move", POLLS, POLL_MS, || {
        let plan = nodes[2]
            .admin("cluster-plan", "")
            .map_err(|e| e.to_string())?;
        match plan_bytes(&plan) {
            Some(bytes) if bytes > 0.0 => Ok(()),
            _ => Err(plan),
        }
    });
    let committed = nodes[1].admin("cluster-commit", "").unwrap();
    assert!(committed.starts_with("committed"), "{committed}");
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    wait_settled(&all, "node-4 owning partitions", |status| {
        member_line(status, 4).is_some_and(|l| l[1] == "valid" && l[2] != "0.0%")
    });

    let left = nodes[2].admin("cluster-leave", "").unwrap();
    assert!(left.contains("leave"), "{left}");
    for node in &nodes {
        wait_for("node-3 leaving everywhere", POLLS, POLL_MS, || {
            let status = node
                .admin("cluster-status", "")
                .map_err(|e| e.to_string())?;
            match member_line(&status, 3) {
                Some(line) if line[1] == "leaving" => Ok(()),
                _ => Err(status),
            }
        });
    }
    let committed = nodes[0].admin("cluster-commit", "").unwrap();
    assert!(committed.starts_with("committed"), "{committed}");
    let staying = [&nodes[0], &nodes[1], &nodes[3]];
    wait_settled(&staying, "node-3 removed", |status| {
        member_line(status, 3).is_some_and(|l| l[1] == "removed")
    });

    // A node that left hands off everything it held, then stops by itself (as on SIGTERM).
    let status = nodes[2].wait_exit(SETTLE_POLLS, POLL_MS);
    assert!(status.success(), "node-3 exited with {status}");
    for node in [&nodes[0], &nodes[1], &nodes[3]] {
        wait_nothing_to_hand_off(node);
    }

    stop.store(true, Ordering::Relaxed);
    let (acked, errors) = writer.join().unwrap();
    assert!(errors.is_empty(), "client-visible errors: {errors:?}");
    assert!(acked.len() >= WRITES_MIN, "only {} writes", acked.len());
    (nodes, acked)
}

/// No acknowledged write of the scenario is lost: a read of every key with `r = 3` (every
/// replica of its preference list must answer) returns the written value, and nothing else
/// that differs from it.
#[test]
fn join_then_leave_under_writes_loses_no_acknowledged_write() {
    let (nodes, acked) = join_then_leave_under_writes("join-leave-reads");
    let mut client = nodes[0].client();
    let (mut wrong, mut duplicated) = (Vec::new(), 0usize);
    for (key, value) in &acked {
        match read_r3(&mut client, key, value) {
            Ok(siblings) => duplicated += usize::from(siblings > 1),
            Err(e) => wrong.push(e),
        }
    }
    // Shown with --nocapture: the size of the run, and writes that ended as several siblings
    // of the same value (not a loss, but not one version either).
    eprintln!(
        "{} acknowledged writes, {duplicated} read back as duplicate siblings",
        acked.len()
    );
    assert!(
        wrong.is_empty(),
        "{} of {} acknowledged writes read back wrong: {:?}",
        wrong.len(),
        acked.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// After the scenario, every replica holds every acknowledged value, without a client read
/// repairing it, and the replicas' Merkle trees are identical: with three nodes left and N=3
/// each of them is in every key's preference list, so each is read directly (REPLICA_GET over a
/// peer connection) for every key, polling (bounded) while hinted handoff, partition handoff
/// and anti-entropy converge. A pull copies one replica, which may itself lack a write the
/// others acknowledged; anti-entropy is what brings such a key to the new replica.
///
/// A value may be held as several siblings of that same value (a forwarded write retried on
/// another home after its first home did not answer gets a second dot); the test accepts that
/// and counts it, and requires nothing else.
#[test]
fn join_then_leave_under_writes_leaves_identical_replicas() {
    let (nodes, acked) = join_then_leave_under_writes("join-leave-replicas");
    let staying = [&nodes[0], &nodes[1], &nodes[3]];
    let keys: Vec<Vec<u8>> = acked.iter().map(|(k, _)| k.clone()).collect();
    // Replicas converge through replica writes, hinted handoff and partition handoff; poll
    // (bounded) until every node holds every acknowledged value.
    wait_for(
        "every replica holding every acknowledged value",
        POLLS,
        POLL_MS,
        || {
            let mut missing = Vec::new();
            for node in staying {
                let held = replica_values(&node.peer_addr, BUCKET, &keys);
                for ((key, value), held) in acked.iter().zip(held) {
                    let want = Val::Value(Bytes::copy_from_slice(value));
                    let ok = held
                        .as_ref()
                        .is_some_and(|h| !h.is_empty() && h.iter().all(|v| *v == want));
                    if !ok {
                        missing.push(format!(
                            "node-{} holds {held:?} for {} (partition {})",
                            node.id,
                            String::from_utf8_lossy(key),
                            partition_of(BUCKET, key).0
                        ));
                    }
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} copies differ, e.g. {:?}",
                    missing.len(),
                    3 * acked.len(),
                    &missing[..missing.len().min(5)]
                ))
            }
        },
    );
    // The end condition: identical Merkle roots on every replica (each of the three
    // holds every partition, so their whole `/merkle` listings must be equal).
    wait_for(
        "identical Merkle roots on every replica",
        POLLS,
        POLL_MS,
        || {
            let roots: Vec<_> = staying.iter().map(|n| merkle(&n.admin)).collect();
            let trees = roots[0].len();
            if trees > 0 && roots.iter().all(|r| *r == roots[0]) {
                Ok(())
            } else {
                let differ = roots[0]
                    .iter()
                    .filter(|(k, v)| roots[1..].iter().any(|r| r.get(k) != Some(*v)))
                    .count();
                Err(format!("{differ} of {trees} trees differ"))
            }
        },
    );
}

/// `count` nodes as users start them (no configuration file), not started.
fn nodes_on_defaults(name: &str, count: u32) -> Vec<ClusterNode> {
    let dir = data_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    (1..=count)
        .map(|id| ClusterNode::on_defaults(&dir, id))
        .collect()
}

/// Keys the defaults scenario writes at each of its steps.
const DEFAULT_KEYS: usize = 30;

/// Writes `DEFAULT_KEYS` keys named after `step` through `node` with the bucket's own quorum,
/// retried (bounded) while a just-changed cluster settles; returns them with their values.
fn write_step(node: &ClusterNode, step: &str) -> Vec<Written> {
    let mut client = node.client();
    (0..DEFAULT_KEYS)
        .map(|i| {
            let key = format!("{step}-{i}").into_bytes();
            let value = format!("{step} value {i}").into_bytes();
            wait_for("a write on defaults", POLLS, POLL_MS, || {
                client
                    .put(BUCKET, &key, &value, None)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            (key, value)
        })
        .collect()
}

/// Polls (bounded) until every node of `holders` holds every write of `written` as its own
/// replica, read over a peer connection: no client read repairs it on the way.
fn wait_every_copy(holders: &[&ClusterNode], written: &[Written], what: &str) {
    let keys: Vec<Vec<u8>> = written.iter().map(|(k, _)| k.clone()).collect();
    wait_for(what, SETTLE_POLLS, POLL_MS, || {
        for node in holders {
            let held = replica_values(&node.peer_addr, BUCKET, &keys);
            for ((key, value), held) in written.iter().zip(held) {
                let want = Val::Value(Bytes::copy_from_slice(value));
                if !held
                    .as_ref()
                    .is_some_and(|h| !h.is_empty() && h.iter().all(|v| *v == want))
                {
                    return Err(format!(
                        "node-{} holds {held:?} for {}",
                        node.id,
                        String::from_utf8_lossy(key)
                    ));
                }
            }
        }
        Ok(())
    });
}

/// An r = 3 read of `key` (every replica of the default bucket must answer): the number of
/// siblings if every one is `value`, else what came back.
fn read_r3(client: &mut ringkv_net::Client, key: &[u8], value: &[u8]) -> Result<usize, String> {
    let get = Message::Get(Get {
        bucket: Bytes::from_static(BUCKET),
        key: Bytes::copy_from_slice(key),
        r: Some(3),
        timeout_ms: None,
    });
    match client.request_message(get) {
        Ok(Message::GetOk(ok))
            if !ok.siblings.is_empty()
                && ok
                    .siblings
                    .iter()
                    .all(|s| *s == Sibling::Value(Bytes::copy_from_slice(value))) =>
        {
            Ok(ok.siblings.len())
        }
        other => Err(format!("{}: {other:?}", String::from_utf8_lossy(key))),
    }
}

/// A request with the whole `(3, 2, 2)` default bucket's replica count: r = 3 reads of every
/// key through `node` answer its value (refused if `node` believed the bucket had fewer
/// replicas).
fn read_all_with_r3(node: &ClusterNode, written: &[Written]) {
    let mut client = node.client();
    for (key, value) in written {
        if let Err(e) = read_r3(&mut client, key, value) {
            panic!("node-{}: r = 3 read of {e}", node.id);
        }
    }
}

/// Stages a change with `admin` on `staging`, commits it on `committing`, and waits until the
/// `settled` nodes report no pending transfer and `check` holds.
fn change(
    staging: &ClusterNode,
    admin: (&str, &str),
    committing: &ClusterNode,
    settled: &[&ClusterNode],
    check: impl Fn(&str) -> bool,
) {
    let staged = staging.admin(admin.0, admin.1).unwrap();
    assert!(!staged.is_empty(), "{staged}");
    wait_for("the change staged at the committer", POLLS, POLL_MS, || {
        let plan = committing
            .admin("cluster-plan", "")
            .map_err(|e| e.to_string())?;
        if plan.starts_with("nothing is staged") {
            Err(plan)
        } else {
            Ok(())
        }
    });
    let committed = committing.admin("cluster-commit", "").unwrap();
    assert!(committed.starts_with("committed"), "{committed}");
    wait_settled(settled, admin.0, check);
}

/// The path a user takes with no buckets file and no tuning: one node started alone takes
/// writes; two more are started alone and joined; a restarted member keeps every copy; a
/// fourth joins; one leaves and stops by itself; a killed one is removed. Nodes are started
/// only with their id, ports and data directory, so the default bucket applies everywhere.
///
/// It proves what a node deriving `n` from how it was started got wrong: after the first
/// joins every node holds every key (N = 3 on three nodes) and answers r = 3 reads; a node
/// restarted without seeds still answers r = 3 and keeps its copies (it used to come back with
/// n = 1 and hand them off); joins, the leave and the remove finish (bounded polls), and at
/// every step the nodes that must hold a key hold it as their own replica.
#[test]
fn a_cluster_on_defaults_grows_restarts_shrinks_and_keeps_every_copy() {
    let mut nodes = nodes_on_defaults("defaults", 4);
    nodes[0].start();
    // A node alone serves the (3, 2, 2) default bucket with the quorums capped at one member.
    let mut written = write_step(&nodes[0], "alone");

    nodes[1].start();
    nodes[2].start();
    for i in [1, 2] {
        let joined = nodes[i].admin("cluster-join", &nodes[0].peer_addr).unwrap();
        assert!(joined.starts_with("joined"), "{joined}");
    }
    wait_for("both joiners known to node-1", POLLS, POLL_MS, || {
        let status = nodes[0]
            .admin("cluster-status", "")
            .map_err(|e| e.to_string())?;
        let joining = [2, 3]
            .iter()
            .all(|&id| member_line(&status, id).is_some_and(|l| l[1] == "joining"));
        if joining { Ok(()) } else { Err(status) }
    });
    let committed = nodes[0].admin("cluster-commit", "").unwrap();
    assert!(committed.starts_with("committed"), "{committed}");
    let three: Vec<&ClusterNode> = nodes[..3].iter().collect();
    wait_settled(&three, "two joins on defaults", |status| {
        [2, 3]
            .iter()
            .all(|&id| member_line(status, id).is_some_and(|l| l[1] == "valid" && l[2] != "0.0%"))
    });
    written.extend(write_step(&nodes[1], "three"));
    wait_every_copy(&three, &written, "every copy on three nodes");
    read_all_with_r3(&nodes[2], &written);

    // A restart without seeds (node-2 never had any) changes nothing about replication.
    nodes[1].stop();
    nodes[1].start();
    read_all_with_r3(&nodes[1], &written);
    wait_nothing_to_hand_off(&nodes[1]);
    let three: Vec<&ClusterNode> = nodes[..3].iter().collect();
    wait_every_copy(&three, &written, "every copy after a restart");

    // A fourth node joins, started alone as the docs say.
    nodes[3].start();
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    change(
        &nodes[3],
        ("cluster-join", &nodes[0].peer_addr),
        &nodes[2],
        &all,
        |status| member_line(status, 4).is_some_and(|l| l[1] == "valid" && l[2] != "0.0%"),
    );
    written.extend(write_step(&nodes[3], "four"));
    read_all_with_r3(&nodes[3], &written);

    // node-3 leaves, hands off what it held and stops by itself.
    let staying: Vec<&ClusterNode> = [0, 1, 3].iter().map(|&i| &nodes[i]).collect();
    change(
        &nodes[2],
        ("cluster-leave", ""),
        &nodes[0],
        &staying,
        |status| member_line(status, 3).is_some_and(|l| l[1] == "removed"),
    );
    let status = nodes[2].wait_exit(SETTLE_POLLS, POLL_MS);
    assert!(status.success(), "node-3 exited with {status}");
    let staying: Vec<&ClusterNode> = [0, 1, 3].iter().map(|&i| &nodes[i]).collect();
    wait_every_copy(&staying, &written, "every copy on the three that stay");
    read_all_with_r3(&nodes[0], &written);

    // node-2 is lost (kill -9) and removed: the two left hold every key between them, both of
    // them, as a cluster smaller than n = 3 keeps a copy on every member.
    nodes[1].kill();
    let left: Vec<&ClusterNode> = [0, 3].iter().map(|&i| &nodes[i]).collect();
    change(
        &nodes[0],
        ("cluster-remove", "2"),
        &nodes[3],
        &left,
        |status| member_line(status, 2).is_some_and(|l| l[1] == "removed"),
    );
    written.extend(write_step(&nodes[3], "two"));
    wait_every_copy(&left, &written, "every copy on the two left");
}

/// A data directory keeps the identity it was created with: a node started with no `--node-id`
/// picks one (above the operators' range) and keeps it across restarts, and a start of the same
/// directory under another `--node-id` is refused with a message naming both.
#[test]
fn a_data_directory_keeps_its_identity() {
    let dir = data_dir("identity");
    std::fs::create_dir_all(&dir).unwrap();
    let mut node = ClusterNode::on_defaults(&dir, 1);
    // on_defaults passes --node-id; this node is started as a user does with no id at all.
    let at = node_id_arg(&node);
    node.without_arg(at);
    node.start();
    let own = own_id(&node);
    assert!(own >= 65536, "picked node-{own}");
    node.stop();
    node.start();
    assert_eq!(own_id(&node), own, "the id survives a restart");
    node.stop();

    let mut wrong = ClusterNode::on_defaults(&dir, 7);
    wrong.set_data_dir(&node.data_dir());
    let status = wrong.run_to_exit(POLLS, POLL_MS);
    assert_eq!(status.code(), Some(2));
    let log = std::fs::read_to_string(&wrong.log).unwrap();
    assert!(
        log.contains(&format!("belongs to node-{own}, not to node-7")),
        "{log}"
    );
}

/// The position of `--node-id` in a node's arguments.
fn node_id_arg(node: &ClusterNode) -> usize {
    node.args().iter().position(|a| a == "--node-id").unwrap()
}

/// The id a running node reports for itself in `cluster status` (its line ends in `self`).
fn own_id(node: &ClusterNode) -> u32 {
    let status = node.admin("cluster-status", "").unwrap();
    status
        .lines()
        .find(|l| l.ends_with("self"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|name| name.strip_prefix("node-"))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{status}"))
}

/// A node whose data is lost cannot come back under its old identity unnoticed: node-3 of a
/// running cluster is killed, its data directory wiped, and it is started again exactly as
/// before (same `--node-id`, same seeds). It must stop by itself with an error naming the
/// reason, rather than serve under an id whose dots it would issue again; so must it when
/// started alone, without seeds, on the same address.
#[test]
fn a_node_that_lost_its_data_cannot_return_under_its_id() {
    let mut nodes = three_seeded("wiped-node");
    // Node-1 holds node-3's own entry, with its incarnation, once it shows node-3's client
    // address: the seeds bootstrap the others' entries without one. Node-3 is up too.
    let client = nodes[2].addr.clone();
    wait_for("node-3 known everywhere", POLLS, POLL_MS, || {
        let status = nodes[0]
            .admin("cluster-status", "")
            .map_err(|e| e.to_string())?;
        match member_line(&status, 3) {
            Some(line) if line.contains(&client) && line.iter().any(|w| w == "up") => Ok(()),
            _ => Err(status),
        }
    });
    nodes[2].kill();
    std::fs::remove_dir_all(nodes[2].data_dir()).unwrap();
    let status = nodes[2].run_to_exit(SETTLE_POLLS, POLL_MS);
    assert_eq!(
        status.code(),
        Some(2),
        "the wiped node exited with {status}"
    );
    let log = std::fs::read_to_string(&nodes[2].log).unwrap();
    assert!(log.contains("another data directory"), "{log}");
    // The cluster still has node-3 as it was: its entry was not taken over.
    let status = nodes[0].admin("cluster-status", "").unwrap();
    assert_eq!(member_line(&status, 3).unwrap()[1], "valid", "{status}");

    // Wiped again and started alone (no seeds): the others still gossip to node-3's address,
    // and the first gossip stops it the same way. (A join of such a node is refused too:
    // membership's unit tests.)
    std::fs::remove_dir_all(nodes[2].data_dir()).unwrap();
    nodes[2].extra.clear();
    let status = nodes[2].run_to_exit(SETTLE_POLLS, POLL_MS);
    assert_eq!(
        status.code(),
        Some(2),
        "the wiped node exited with {status}"
    );
}

/// A new cluster needs no node ids: three nodes are started with no `--node-id` and the same
/// plain `HOST:PORT` seed list (their peer addresses), as a user's configuration management
/// would. They find each other and form one cluster by themselves; one `cluster commit` gives
/// them the ring, and writes then reach all three copies.
#[test]
fn nodes_with_plain_seeds_form_a_cluster_without_ids() {
    let mut nodes = nodes_on_defaults("plain-seeds", 3);
    let seed_list = nodes
        .iter()
        .map(|n| n.peer_addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    for node in &mut nodes {
        let at = node_id_arg(node);
        node.without_arg(at);
        node.extra = vec!["--seeds".into(), seed_list.clone()];
        node.start();
    }
    wait_for("one cluster of three", SETTLE_POLLS, POLL_MS, || {
        for node in &nodes {
            let status = node
                .admin("cluster-status", "")
                .map_err(|e| e.to_string())?;
            let members = status.lines().filter(|l| l.starts_with("node-")).count();
            if members != 3 {
                return Err(status);
            }
        }
        Ok(())
    });
    let committed = nodes[2].admin("cluster-commit", "").unwrap();
    assert!(committed.starts_with("committed"), "{committed}");
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    wait_settled(&all, "the first ring in force", |status| {
        status
            .lines()
            .filter(|l| l.starts_with("node-"))
            .all(|l| l.split_whitespace().nth(1) == Some("valid") && !l.contains(" 0.0%"))
    });
    let written = write_step(&nodes[0], "plain");
    read_all_with_r3(&nodes[1], &written);
    wait_every_copy(&all, &written, "every copy on the three");
}

/// Rounds of the poll for anti-entropy to repair a restarted node: 30 s, where walking its
/// trees round-robin at the default interval takes minutes.
const AE_REPAIR_POLLS: usize = 300;

/// After a fault heals, anti-entropy repairs what it left behind at the pace of that data, not
/// of one tree per interval: a node of three (N = 3, default settings, so about 128 trees per
/// shard and one round-robin exchange per second) is killed, keys are written without it (with
/// no fourth node there is no fallback to hold hints, so only anti-entropy can bring it the
/// writes), and it is restarted. The replicas that stored the writes while it was down, or whose writes to it
/// failed, exchange exactly those trees with it first, so its own replica holds every key within
/// the bounded wait; walking the trees round-robin would take minutes.
#[test]
fn anti_entropy_repairs_what_a_fault_left_behind_first() {
    let mut nodes = nodes_on_defaults("ae-suspects", 3);
    let seed_list = seeds(
        &nodes
            .iter()
            .map(|n| (n.id, n.peer_addr.as_str()))
            .collect::<Vec<_>>(),
    );
    for node in &mut nodes {
        node.extra = vec!["--seeds".into(), seed_list.clone()];
        node.start();
    }
    let mut client = nodes[0].client();
    wait_for("a write on all three", POLLS, POLL_MS, || {
        let put = common::put_w(BUCKET, Bytes::from_static(b"warm-up"), b"v", 3);
        match client.request_message(put) {
            Ok(Message::PutOk(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    nodes[2].kill();
    let written = write_step(&nodes[0], "missed");
    // Three nodes and N = 3: no node is left to take a hint for node-3, so nothing but
    // anti-entropy (no key is read) can bring it these writes.
    for node in &nodes[..2] {
        assert_eq!(common::metric(&node.admin, "ringkv_hints"), 0.0);
    }
    nodes[2].start();
    let keys: Vec<Vec<u8>> = written.iter().map(|(k, _)| k.clone()).collect();
    wait_for(
        "node-3 repaired by anti-entropy alone",
        AE_REPAIR_POLLS,
        POLL_MS,
        || {
            let held = replica_values(&nodes[2].peer_addr, BUCKET, &keys);
            let missing = written
                .iter()
                .zip(held)
                .filter(|((_, value), held)| {
                    let want = Val::Value(Bytes::copy_from_slice(value));
                    !held
                        .as_ref()
                        .is_some_and(|h| !h.is_empty() && h.iter().all(|v| *v == want))
                })
                .count();
            if missing == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{missing} of {} keys missing on node-3",
                    written.len()
                ))
            }
        },
    );
}
