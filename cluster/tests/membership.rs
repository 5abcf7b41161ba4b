//! End to end: the operator's `ringkv cluster` commands against running `ringkv serve`
//! processes on loopback.
//!
//! Every node gets its own ports and data directory under CARGO_TARGET_TMPDIR and is killed in
//! a drop guard, so a failing test never leaves one behind. Every wait is a bounded number of
//! retries; nothing asserts on wall-clock time.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{BIN, Server, data_dir, free_port};
use ringkv_net::{ClientError, ErrorCode};

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
