//! End to end: `ringkv serve` under a low locked-memory limit (RLIMIT_MEMLOCK) refuses to start,
//! or stops cleanly when a shard's executor cannot be built, and says what to change.
//!
//! The children run under util-linux `prlimit` (lowering a limit needs no privilege) and, when
//! this process has CAP_IPC_LOCK (root), under `setpriv` dropping it, since the kernel charges
//! io_uring memory to the limit only for processes without it. Where those tools are missing, or
//! the capability cannot be dropped, the tests that need them say so and pass without running.
//! The kernel counts that memory per user, so this binary holds these tests alone: other nodes
//! started by the same user at the same time would eat into the budget the tests measure.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use ringkv_net::{Client, ClientConfig};

const BIN: &str = env!("CARGO_BIN_EXE_ringkv");
const RETRIES: usize = 300;
const RETRY_DELAY_MS: u64 = 50;
/// glommio's floor, and the limit the tests run under.
const LIMIT_BYTES: u64 = 512 << 10;
/// CAP_IPC_LOCK's bit in the capability sets.
const CAP_IPC_LOCK_BIT: u32 = 14;

fn data_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("memlock-e2e-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", common::free_port())
}

fn has_ipc_lock() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap();
    u64::from_str_radix(hex.trim(), 16).unwrap() & (1 << CAP_IPC_LOCK_BIT) != 0
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `ringkv serve` under `limit_bytes` of locked memory, `--shards shards`, on `dir` and `addr`.
/// With `charged`, also without CAP_IPC_LOCK. Panics where that cannot be arranged: a test that
/// could not run must not pass (`.ci/run` installs util-linux).
fn serve_limited(
    limit_bytes: u64,
    charged: bool,
    shards: usize,
    dir: &PathBuf,
    addr: &str,
) -> Command {
    if !succeeds(Command::new("prlimit").arg("--version")) {
        panic!("prlimit (util-linux) is not installed; this test needs it");
    }
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--memlock={limit_bytes}:{limit_bytes}"));
    if charged && has_ipc_lock() {
        let drop_ipc_lock = ["--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"];
        if !succeeds(Command::new("setpriv").args(drop_ipc_lock).arg("true")) {
            panic!("setpriv (util-linux) cannot drop CAP_IPC_LOCK here; this test needs it");
        }
        cmd.arg("setpriv").args(drop_ipc_lock);
    }
    cmd.arg(BIN)
        .args(["serve", "--durability", "buffered", "--shards"])
        .arg(shards.to_string())
        .args(["--listen", addr, "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// Runs a command expected to exit on its own; returns its status and stderr. Bounded, so a node
/// that hangs instead of exiting fails the test.
fn run_to_exit(cmd: &mut Command) -> (ExitStatus, String) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    for _ in 0..RETRIES {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("did not exit; stderr: {}", reader.join().unwrap());
}

/// The one line `ringkv` prints for the error it exits with.
fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("ringkv: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"))
}

/// Kills the child on drop, so a failing test leaves no server behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Under a limit of 0, glommio would build no executor: the node refuses before touching its
/// data (the directory is never created), exits 2, and names the limit and how to raise it.
#[test]
fn no_locked_memory_is_refused_before_any_data_is_touched() {
    let dir = data_dir("zero");
    let mut cmd = serve_limited(0, false, 2, &dir, &free_addr());
    let (status, stderr) = run_to_exit(&mut cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let error = error_line(&stderr);
    assert!(
        error.starts_with("ringkv: not enough locked memory: RLIMIT_MEMLOCK is 0 bytes"),
        "{error}"
    );
    assert!(error.contains("ulimit -l 512"), "{error}");
    assert!(error.contains("LimitMEMLOCK="), "{error}");
    assert!(!dir.exists(), "the refused node created {}", dir.display());
}

/// Without CAP_IPC_LOCK, each executor's rings are charged 48 KiB: 512 KiB holds nine shards
/// and the signal executor, not ten shards. The check refuses the ten up front, with the figure
/// they need, before touching any data.
#[test]
fn shards_beyond_the_charged_limit_are_refused_up_front() {
    let dir = data_dir("ten");
    let mut cmd = serve_limited(LIMIT_BYTES, true, 10, &dir, &free_addr());
    let (status, stderr) = run_to_exit(&mut cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let error = error_line(&stderr);
    assert!(
        error.contains("charges 11 executors' io_uring rings"),
        "{error}"
    );
    assert!(error.contains("at least 548864 bytes"), "{error}");
    assert!(!dir.exists(), "the refused node created {}", dir.display());
}

/// The kernel charges all of a user's io_uring memory to each process's limit, which no startup
/// check can see: a first node of eight shards holds most of 512 KiB, so a second node passes
/// its check but cannot build every executor. That second node must still stop its other shards
/// and exit 2 with a locked-memory error (not hang waiting for the shard that never ran, and not
/// a bare "Cannot allocate memory"), and the first node must be unaffected.
#[test]
fn a_shard_whose_rings_do_not_fit_stops_the_node() {
    let first_addr = free_addr();
    let mut first = serve_limited(LIMIT_BYTES, true, 8, &data_dir("first"), &first_addr);
    let first = Running(first.stderr(Stdio::null()).spawn().unwrap());
    let config = ClientConfig {
        timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    };
    let mut client = None;
    for _ in 0..RETRIES {
        if let Ok(mut c) = Client::connect(first_addr.as_str(), config.clone())
            && c.ping().is_ok()
        {
            client = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS));
    }
    let mut client = client.expect("the first node starts");

    let mut second = serve_limited(LIMIT_BYTES, true, 2, &data_dir("second"), &free_addr());
    let (status, stderr) = run_to_exit(second.env("RUST_LOG", "info"));
    assert_eq!(status.code(), Some(2), "{stderr}");
    let error = error_line(&stderr);
    assert!(
        error.starts_with("ringkv: not enough locked memory"),
        "{error}"
    );
    assert!(error.contains("io_uring rings do not fit"), "{error}");
    // A shard that did get its executor opened its engine, and closed it.
    let opened = stderr.matches("engine recovered").count();
    let closed = stderr.matches("shard closed").count();
    assert_eq!(opened, closed, "{stderr}");

    client.ping().unwrap();
    drop(client);
    let mut first = first;
    let child = &mut first.0;
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    for _ in 0..RETRIES {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            return;
        }
        std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS));
    }
    panic!("the first node did not exit after SIGTERM");
}
