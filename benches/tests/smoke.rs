//! Keeps the benchmark from rotting: runs `ringkv-bench engine --quick` as a child process and
//! checks that it completes and writes a JSON report with the expected fields. Never asserts on
//! timing (the numbers of a debug build on a shared machine mean nothing).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[part],
        };
        assert!(!cur.is_null(), "JSON report lacks {path}");
    }
    cur
}

#[test]
fn quick_engine_bench_writes_a_complete_report() {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = base.join(format!("bench-smoke-{}", std::process::id()));
    let json = base.join(format!("bench-smoke-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv-bench"))
        .args(["engine", "--quick", "--dir"])
        .arg(&dir)
        .arg("--json")
        .arg(&json)
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
    let _ = std::fs::remove_dir_all(&dir);

    let mut sides = vec!["ringkv"];
    if cfg!(feature = "rocksdb") {
        sides.push("rocksdb");
    } else {
        assert!(report["rocksdb"].is_null());
    }
    for side in sides {
        let puts = field(&report, &format!("{side}.put")).as_array().unwrap();
        assert_eq!(puts.len(), 6, "sync and buffered at 1, 16 and 128 writers");
        for p in puts {
            for f in [
                "mode",
                "writers",
                "ops",
                "ops_per_sec",
                "latency.p50_us",
                "latency.p99_us",
                "latency.p999_us",
            ] {
                field(p, f);
            }
        }
        for f in ["ops_per_sec", "latency.p999_us", "misses"] {
            field(&report, &format!("{side}.get.{f}"));
        }
        let index = field(&report, &format!("{side}.index")).as_array().unwrap();
        assert_eq!(index.len(), 2, "index memory at two sizes");
        field(&index[1], "bytes_per_key");
        for f in ["open_secs", "verified_keys"] {
            field(&report, &format!("{side}.restart.{f}"));
        }
    }
    field(&report, "params.quick");
    field(&report, "ringkv.restart.segments_from_hints");
    assert!(field(&report, "targets").as_array().is_some());
}
