//! `serve` in process, for the start failure the binary cannot be made to hit: a shard whose
//! executor cannot be created at all (a CPU that does not exist). Its own test binary, with one
//! test, because `serve` blocks SIGTERM and SIGINT on the calling thread and watches them.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use ringkv_cluster::config::{FileConfig, Settings};
use ringkv_cluster::server::{ServeConfig, ServeError, ShardCpus, serve};

/// A bound on the wait for `serve` to return, so a node that hangs fails the test instead of
/// hanging it; far beyond what stopping takes.
const RETURN_WAIT_MS: u64 = 60_000;
/// Looks at the thread list before concluding a shard thread outlived `serve`.
const THREAD_LOOKS: usize = 250;

/// The second shard's executor cannot be built; `serve` must stop the first shard (which may be
/// waiting in the mesh for the second) and return the second shard's error rather than hang or
/// leave the first running: once it returned, no shard thread is left in the process.
#[test]
fn a_shard_without_an_executor_stops_the_node() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("serve-start-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let flags = FileConfig {
        data_dir: Some(dir),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..FileConfig::default()
    };
    let settings = Settings::resolve(flags, FileConfig::default()).unwrap();
    let cfg = ServeConfig::new(settings, ShardCpus::Pinned(vec![0, 1 << 20]));
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(serve(cfg));
    });
    let result = done
        .recv_timeout(Duration::from_millis(RETURN_WAIT_MS))
        .expect("serve returns once the started shard has stopped");
    match result {
        Err(ServeError::Runtime { what, message }) => {
            assert!(what.contains("shard 1"), "{what}: {message}");
            assert!(what.contains(&(1 << 20).to_string()), "{what}: {message}");
        }
        other => panic!("{other:?}"),
    }
    // The executors are joined before `serve` returns, but glommio's blocking-IO threads, which
    // an executor spawns unnamed and so inherit its name, end on their own shortly after it: a
    // bounded number of looks.
    let mut threads = thread_names();
    for _ in 0..THREAD_LOOKS {
        if !threads.iter().any(|t| t.starts_with("shard-")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        threads = thread_names();
    }
    assert!(
        !threads.iter().any(|t| t.starts_with("shard-")),
        "a shard is still running: {threads:?}"
    );
}

/// Names of this process's threads (truncated by the kernel to 15 bytes). A thread that ends
/// between the listing and the read of its name is gone, and left out.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_owned())
        .collect()
}
