//! End to end: `ringkv-bench --spawn-local 1` starts a one-node cluster, runs a short workload
//! against it, writes its JSON report and stops the node. Checks that the report has its fields,
//! that operations ran and that none failed; never asserts on timing (a debug build on a shared
//! machine measures nothing).
//!
//! The node binary: `cargo test` builds only this package's binaries, and
//! `CARGO_BIN_EXE_ringkv` exists only inside ringkv-cluster. Under cargo (the `CARGO` variable is
//! set for tests and passed on to the generator) the generator itself runs `cargo build -p
//! ringkv-cluster --bin ringkv` into the same target directory and profile, so the node is
//! always built from the same sources; `RINGKV_BIN` overrides it.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn run(name: &str, extra: &[&str]) -> Value {
    run_on(name, "1", "1s", extra)
}

/// A run on a local cluster of `nodes` nodes whose measured phase lasts `duration`.
fn run_on(name: &str, nodes: &str, duration: &str, extra: &[&str]) -> Value {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let json = base.join(format!("loadgen-{name}-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv-bench"))
        .args([
            "--spawn-local",
            nodes,
            "--keys",
            "50",
            "--duration",
            duration,
        ])
        .args(["--warmup", "200ms", "--connections", "2", "--pipeline", "2"])
        .arg("--data-root")
        .arg(base.join("loadgen-smoke"))
        .arg("--json")
        .arg(&json)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ringkv-bench failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("p99.99"), "no results table:\n{table}");
    report
}

fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for part in path.split('.') {
        cur = &cur[part];
        assert!(!cur.is_null(), "JSON report lacks {path}:\n{v:#}");
    }
    cur
}

fn check_common(r: &Value, kinds: &[&str]) {
    assert!(field(r, "ops").as_u64().unwrap() > 0, "no operations");
    assert_eq!(field(r, "errors_total").as_u64().unwrap(), 0, "{r:#}");
    assert!(field(r, "errors").as_object().unwrap().is_empty());
    assert_eq!(field(r, "preload.keys").as_u64().unwrap(), 50);
    for kind in kinds {
        for f in [
            "count",
            "ops_per_sec",
            "latency.p50_us",
            "latency.p90_us",
            "latency.p99_us",
            "latency.p999_us",
            "latency.p9999_us",
            "latency.max_us",
        ] {
            field(r, &format!("operations.{kind}.{f}"));
        }
        assert!(
            field(r, &format!("operations.{kind}.count"))
                .as_u64()
                .unwrap()
                > 0
        );
    }
    for f in [
        "params.target",
        "params.spawn_local.nodes",
        "all.p99_us",
        "measured_secs",
    ] {
        field(r, f);
    }
    let timeline = field(r, "timeline").as_array().unwrap();
    assert!(!timeline.is_empty());
    // Every second names its slowest operation per connection, and a second with operations
    // has one on some connection.
    let connections = field(r, "params.connections").as_u64().unwrap() as usize;
    for tick in timeline {
        let slowest = tick["slowest_us_by_connection"].as_array().unwrap();
        assert_eq!(slowest.len(), connections, "{tick}");
        if tick["ops"].as_u64().unwrap() > 0 {
            assert!(
                slowest.iter().any(|us| us.as_f64().unwrap() > 0.0),
                "{tick}"
            );
        }
    }
    // Every key was preloaded, so every read saw at least one version.
    let versions = field(r, "versions_seen").as_object().unwrap();
    assert!(versions.keys().all(|v| v != "0"), "{versions:?}");
}

/// A closed-loop YCSB A run through the binary protocol; a cart run, whose reads and
/// write-backs go through siblings and contexts; a map cart run, checked for lost adds.
#[test]
fn closed_loop_runs_against_a_local_node() {
    let r = run("a", &["--workload", "a"]);
    check_common(&r, &["read", "update"]);
    assert!(r["open_loop"].is_null());
    assert_eq!(field(&r, "params.mode"), "closed");

    let r = run("cart", &["--workload", "cart"]);
    check_common(&r, &["cart"]);

    // The map cart reads every cart back: every acknowledged add is counted, none twice.
    let r = run("cart-map", &["--workload", "cart-map"]);
    assert!(field(&r, "ops").as_u64().unwrap() > 0, "no operations");
    assert_eq!(field(&r, "errors_total").as_u64().unwrap(), 0, "{r:#}");
    assert_eq!(field(&r, "cart_check.carts").as_u64().unwrap(), 50);
    assert_eq!(field(&r, "cart_check.unread_carts").as_u64().unwrap(), 0);
    assert!(field(&r, "cart_check.acked_adds").as_u64().unwrap() >= 50);
    assert_eq!(
        field(&r, "cart_check.lost_adds").as_u64().unwrap(),
        0,
        "{r:#}"
    );
    assert_eq!(
        field(&r, "cart_check.over_counted").as_u64().unwrap(),
        0,
        "{r:#}"
    );
}

/// An open-loop run through the node's RESP port reports its schedule bookkeeping.
#[test]
fn open_loop_runs_against_a_local_resp_port() {
    let r = run("resp", &["--workload", "b", "--resp", "--rate", "300"]);
    check_common(&r, &["read"]);
    assert!(
        field(&r, "params.target")
            .as_str()
            .unwrap()
            .starts_with("redis://")
    );
    for f in [
        "rate",
        "scheduled",
        "sent",
        "held_back",
        "valid",
        "verdict",
        "dispatch_lag.p99_us",
        "service.p99_us",
    ] {
        field(&r, &format!("open_loop.{f}"));
    }
    assert!(field(&r, "open_loop.sent").as_u64().unwrap() > 0);
}

/// `--churn` on three nodes: a fourth node joins and leaves during the measured phase, through
/// the ADMIN requests an operator's `ringkv cluster` sends; every phase ran operations, both
/// changes finished, and no operation failed in any phase (the store stays available while its
/// membership changes). The latencies are not judged here (docs/BENCHMARKS.md records them).
#[test]
fn churn_joins_and_removes_a_node_without_failing_a_request() {
    let r = run_on("churn", "3", "40s", &["--churn", "--rate", "200"]);
    check_common(&r, &["read", "update"]);
    let churn = field(&r, "churn");
    assert!(
        churn["events"]["failure"].is_null(),
        "the change did not finish: {churn:#}"
    );
    assert!(field(churn, "events.join_secs").as_f64().unwrap() > 0.0);
    assert!(field(churn, "events.leave_secs").as_f64().unwrap() > 0.0);
    let phases = field(churn, "phases").as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["steady", "join", "settle", "leave", "after"]);
    for p in phases {
        assert!(
            p["ops"].as_u64().unwrap() > 0,
            "a phase without operations: {p:#}"
        );
        assert_eq!(p["errors"].as_u64().unwrap(), 0, "{p:#}");
    }
}

/// The session workload writes with a time to live, on both protocols: preloaded with a 100 ms
/// time to live and then only read after the 200 ms warm-up, every key has expired by the
/// node's clock, so every read finds nothing and the report counts them as expired reads.
#[test]
fn session_writes_expire_and_reads_of_them_are_counted() {
    for (name, extra) in [("session", &[][..]), ("session-resp", &["--resp"][..])] {
        let session = |read_share: &str| {
            let args = [
                "--workload",
                "session",
                "--ttl",
                "100ms",
                "--read-share",
                read_share,
            ];
            run(name, &[&args[..], extra].concat())
        };
        let r = session("0");
        assert_eq!(field(&r, "params.ttl_ms").as_u64(), Some(100));
        assert_eq!(field(&r, "errors_total").as_u64().unwrap(), 0, "{r:#}");
        let r = session("1");
        let versions = field(&r, "versions_seen").as_object().unwrap();
        let reads = field(&r, "operations.read.count").as_u64().unwrap();
        assert!(reads > 0);
        assert_eq!(
            versions.get("0").and_then(Value::as_u64),
            Some(reads),
            "every read finds an expired key: {versions:?}"
        );
    }
}
