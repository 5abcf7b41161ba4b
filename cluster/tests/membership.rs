//! End to end: the operator's `ringkv cluster` commands against running `ringkv serve`
//! processes on loopback.
//!
//! Every node gets its own ports and data directory under CARGO_TARGET_TMPDIR and is killed in
//! a drop guard, so a failing test never leaves one behind. Every wait is a bounded number of
//! retries; nothing asserts on wall-clock time.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{BIN, ClusterNode, Server, data_dir, free_port, seeds, wait_for};
use ringkv_net::{ClientError, ErrorCode};

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
        node.extra = vec!["--gossip-ms".into(), GOSSIP_MS.into()];
        if i < 3 {
            node.extra.extend(["--seeds".into(), seed_list.clone()]);
        }
        node.start();
    }
    nodes
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
        answers[0].lines().any(|l| l.starts_with("node-1 ")),
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
    assert!(text.lines().any(|l| l.starts_with("node-1 ")), "{text}");
    let out = Command::new(BIN)
        .args(["cluster", "remove", "--server", &server.addr, "99"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("invalid_request"), "{err}");
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
