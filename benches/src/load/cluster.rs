//! `--spawn-local N`: a throwaway N-node ringkv cluster on loopback for the length of one run.
//!
//! Each node is a `ringkv serve` child process with its own client, RESP and peer addresses
//! (free ports on this generator's own loopback address, see [`super::ports`]), its own data
//! directory under the data root, and the same seed list and bucket file. The buckets are Dynamo's usual (N, R, W): `n = min(3, N)`, `r = w` a
//! majority of `n` (so (3, 2, 2) on three nodes), `dw` durable acknowledgements (`--dw`, default
//! 1: even on `buffered` nodes one replica syncs each write before it is acknowledged); `ycsb`, `sessions`
//! and `redis` are last-write-wins, `cart` keeps siblings.
//!
//! Finding the `ringkv` binary, first match wins: `--ringkv-bin PATH`; the `RINGKV_BIN`
//! environment variable; when running under cargo (`cargo run`, `cargo test`: the `CARGO`
//! variable is set), `cargo build -p ringkv-cluster --bin ringkv` with the profile and target
//! directory of the running executable, so the node is never older than the sources; otherwise
//! `ringkv` next to the running executable (`target/release/ringkv` beside
//! `target/release/ringkv-bench`).
//!
//! Never leaving processes behind: the nodes run in their own process group (a Ctrl-C in the
//! terminal reaches only the generator, which then stops them in order), with a parent-death
//! signal (SIGTERM) so that even a generator killed with SIGKILL takes them down. [`LocalCluster`]
//! stops them on drop: SIGTERM, a bounded wait for the clean shutdown, then SIGKILL. The data
//! root is removed afterwards unless asked to keep it; the next run removes the data roots of
//! generators that died without cleaning up.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ringkv_net::{Client, ClientConfig};

use super::ports::free_addr;

/// Most nodes `--spawn-local` starts.
pub(crate) const NODES_MAX: usize = 16;
/// How long a node may take to answer PING after it was started.
const STARTUP_WAIT: Duration = Duration::from_secs(60);
/// Pause between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// File in a run directory while its generator runs.
const RUNNING_MARKER: &str = ".running";
/// How long a node may take to shut down cleanly after SIGTERM before it is killed.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(15);

/// How to start the cluster.
#[derive(Clone, Debug)]
pub(crate) struct ClusterOptions {
    pub(crate) nodes: usize,
    pub(crate) shards_per_node: usize,
    pub(crate) durability: String,
    pub(crate) dw: u8,
    pub(crate) ringkv_bin: Option<PathBuf>,
    pub(crate) data_root: Option<PathBuf>,
    pub(crate) keep_data: bool,
}

/// A running local cluster; stopped on drop.
pub(crate) struct LocalCluster {
    nodes: Vec<LocalNode>,
    opts: ClusterOptions,
    /// Client protocol addresses, node by node.
    pub(crate) client_addrs: Vec<String>,
    /// RESP addresses, node by node.
    pub(crate) resp_addrs: Vec<String>,
    /// Peer addresses, node by node.
    pub(crate) peer_addrs: Vec<String>,
    /// The data root (node directories, logs, the bucket file).
    pub(crate) root: PathBuf,
    /// The bucket file every node was given.
    pub(crate) buckets_toml: String,
    /// The node binary.
    pub(crate) bin: PathBuf,
}

struct LocalNode {
    id: usize,
    child: Option<Child>,
    log: PathBuf,
}

/// The bucket tables of an `nodes`-node cluster whose writes wait for `dw` durable
/// acknowledgements (at most `w`).
pub(crate) fn buckets_toml(nodes: usize, dw: u8) -> String {
    let n = nodes.clamp(1, 3);
    let q = n / 2 + 1;
    let dw = usize::from(dw).min(q);
    format!(
        "[buckets.default]\nn = {n}\nr = {q}\nw = {q}\ndw = {dw}\nmode = \"siblings\"\n\n\
         [buckets.ycsb]\nmode = \"lww\"\n\n[buckets.sessions]\nmode = \"lww\"\n\n\
         [buckets.redis]\nmode = \"lww\"\n\n[buckets.cart]\nmode = \"siblings\"\n"
    )
}

/// The directory of the running executable and, if it sits in a cargo target directory
/// (`<target>/<profile>/`), that target directory and the profile.
fn exe_layout() -> anyhow::Result<(PathBuf, Option<(PathBuf, String)>)> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("the executable has no directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let profile = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned);
    let target = dir.parent().map(Path::to_path_buf);
    let layout = match (profile, target) {
        (Some(p), Some(t)) if t.join("CACHEDIR.TAG").exists() || t.ends_with("target") => {
            Some((t, p))
        }
        _ => None,
    };
    Ok((dir, layout))
}

/// Finds (or, under cargo, builds) the `ringkv` binary; see the module documentation.
pub(crate) fn find_ringkv(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        ensure!(p.is_file(), "--ringkv-bin {} is not a file", p.display());
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("RINGKV_BIN") {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "RINGKV_BIN={} is not a file", p.display());
        return Ok(p);
    }
    let (dir, layout) = exe_layout()?;
    let beside = dir.join("ringkv");
    if let (Some(cargo), Some((target, profile))) = (std::env::var_os("CARGO"), layout) {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        if manifest.is_file() {
            eprintln!("building the ringkv node ({profile}) ...");
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "--quiet",
                "-p",
                "ringkv-cluster",
                "--bin",
                "ringkv",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target);
            match profile.as_str() {
                "debug" => {}
                "release" => {
                    cmd.arg("--release");
                }
                other => {
                    cmd.args(["--profile", other]);
                }
            }
            let status = cmd.status().context("running cargo build for ringkv")?;
            ensure!(status.success(), "cargo build of the ringkv node failed");
            let built = target.join(&profile).join("ringkv");
            ensure!(built.is_file(), "cargo built no {}", built.display());
            return Ok(built);
        }
    }
    ensure!(
        beside.is_file(),
        "no ringkv binary at {}: build it with `cargo build --release -p ringkv-cluster --bin \
         ringkv`, or name one with --ringkv-bin or RINGKV_BIN",
        beside.display()
    );
    Ok(beside)
}

/// Where the nodes keep their data when no `--data-root` is given: beside the executable's
/// target directory (`target/ringkv-bench-cluster/<pid>`), else under the working directory.
/// Never /tmp: the engine's O_DIRECT does not work on tmpfs.
fn default_root() -> anyhow::Result<PathBuf> {
    let (_, layout) = exe_layout()?;
    let base = match layout {
        Some((target, _)) => target.join("ringkv-bench-cluster"),
        None => PathBuf::from("ringkv-bench-cluster"),
    };
    Ok(base.join(std::process::id().to_string()))
}

/// Makes `cmd`'s child receive SIGTERM when the thread that spawned it ends, so that no node
/// outlives a generator that was killed.
#[allow(unsafe_code)]
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe, allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl LocalCluster {
    /// Starts the cluster and waits until every node answers PING. Call from the main thread:
    /// the nodes' parent-death signal fires when the spawning thread ends.
    pub(crate) fn start(opts: &ClusterOptions) -> anyhow::Result<Self> {
        ensure!(
            (1..=NODES_MAX).contains(&opts.nodes),
            "--spawn-local takes 1 to {NODES_MAX} nodes"
        );
        let bin = find_ringkv(opts.ringkv_bin.as_deref())?;
        let root = match &opts.data_root {
            Some(r) => r.join(std::process::id().to_string()),
            None => default_root()?,
        };
        if let Some(base) = root.parent() {
            sweep_stale(base);
        }
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        fs::write(root.join(RUNNING_MARKER), b"")?;
        let buckets_toml = buckets_toml(opts.nodes, opts.dw);
        let buckets = root.join("buckets.toml");
        fs::write(&buckets, &buckets_toml)?;

        let mut peer_addrs = Vec::with_capacity(opts.nodes);
        for _ in 0..opts.nodes {
            peer_addrs.push(free_addr()?);
        }
        let seeds: Vec<String> = peer_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}@{a}", i + 1))
            .collect();
        let seeds = seeds.join(",");

        let mut cluster = Self {
            nodes: Vec::with_capacity(opts.nodes),
            opts: opts.clone(),
            client_addrs: Vec::new(),
            peer_addrs: Vec::new(),
            resp_addrs: Vec::new(),
            root: root.clone(),
            buckets_toml,
            bin: bin.clone(),
        };
        for (i, peer_addr) in peer_addrs.iter().enumerate() {
            cluster.spawn_node(i + 1, &peer_addr.to_string(), Some(&seeds))?;
        }
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Starts node `id` (1-based, in order) with the cluster's buckets and its own fresh
    /// addresses: with `seeds` (`ID@ADDR,...`) and `--node-id id` for the nodes of the start,
    /// without either for a node added later, which picks its own identity and joins when told.
    fn spawn_node(
        &mut self,
        id: usize,
        peer_addr: &str,
        seeds: Option<&str>,
    ) -> anyhow::Result<()> {
        let addr = free_addr()?.to_string();
        let resp = free_addr()?.to_string();
        let log = self.root.join(format!("node-{id}.log"));
        let stderr = fs::File::create(&log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.root.join("buckets.toml"))
            .args(["--node-name", &format!("n{id}")])
            .args(["--listen", &addr])
            .args(["--resp-listen", &resp])
            .args(["--peer-listen", peer_addr])
            .args(["--shards", &self.opts.shards_per_node.to_string()])
            .args(["--durability", &self.opts.durability])
            .arg("--data-dir")
            .arg(self.root.join(format!("node-{id}")))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        if let Some(seeds) = seeds {
            cmd.args(["--node-id", &id.to_string()])
                .args(["--seeds", seeds]);
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.nodes.push(LocalNode {
            id,
            child: Some(child),
            log,
        });
        self.client_addrs.push(addr);
        self.resp_addrs.push(resp);
        self.peer_addrs.push(peer_addr.to_owned());
        Ok(())
    }

    /// Starts one more node, not yet a member (it is a one-node cluster of its own until it is
    /// asked to join), and waits until it answers; returns its index. Call from the main thread,
    /// like [`LocalCluster::start`].
    pub(crate) fn add_node(&mut self) -> anyhow::Result<usize> {
        ensure!(self.nodes.len() < NODES_MAX, "at most {NODES_MAX} nodes");
        let peer_addr = free_addr()?.to_string();
        self.spawn_node(self.nodes.len() + 1, &peer_addr, None)?;
        self.wait_ready()?;
        Ok(self.nodes.len() - 1)
    }

    /// Sends the ADMIN command `command` (`cluster-status`, `cluster-join`, ...; the CLI's
    /// `ringkv cluster ...` sends the same) to node `index` and returns its answer.
    pub(crate) fn admin(&self, index: usize, command: &str, args: &str) -> anyhow::Result<String> {
        let addr = self
            .client_addrs
            .get(index)
            .with_context(|| format!("no node {index}"))?;
        let config = ClientConfig {
            timeout: Duration::from_secs(10),
            ..ClientConfig::default()
        };
        let mut client = Client::connect(addr.as_str(), config.clone())
            .with_context(|| format!("connecting to {addr}"))?;
        client
            .admin(command, args)
            .with_context(|| format!("{command} on {addr}"))
    }

    /// Whether node `index` has exited (and with what status); a node that left the cluster
    /// stops by itself once it has handed everything off.
    pub(crate) fn exited(&mut self, index: usize) -> anyhow::Result<Option<ExitStatus>> {
        let node = self
            .nodes
            .get_mut(index)
            .with_context(|| format!("no node {index}"))?;
        let Some(child) = node.child.as_mut() else {
            bail!("node {} was already reaped", node.id);
        };
        let status = child.try_wait()?;
        if status.is_some() {
            node.child = None;
        }
        Ok(status)
    }

    /// The last lines of node `index`'s log.
    pub(crate) fn log_tail(&self, index: usize) -> String {
        self.nodes
            .get(index)
            .map_or_else(String::new, |n| log_tail(&n.log))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let config = ClientConfig {
            timeout: Duration::from_secs(2),
            ..ClientConfig::default()
        };
        let deadline = Instant::now() + STARTUP_WAIT;
        for (node, addr) in self.nodes.iter_mut().zip(&self.client_addrs) {
            loop {
                if let Some(child) = node.child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    node.child = None;
                    bail!(
                        "node {} exited during startup ({status}); its log:\n{}",
                        node.id,
                        log_tail(&node.log)
                    );
                }
                if let Ok(mut c) = Client::connect(addr.as_str(), config.clone())
                    && c.ping().is_ok()
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {} did not answer within {STARTUP_WAIT:?}; its log:\n{}",
                        node.id,
                        log_tail(&node.log)
                    );
                }
                std::thread::sleep(PROBE_INTERVAL);
            }
        }
        Ok(())
    }

    /// Stops every node (SIGTERM, then SIGKILL after [`SHUTDOWN_WAIT`]) and removes the data
    /// root unless it is to be kept. Returns the nodes that did not exit cleanly.
    pub(crate) fn stop(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for node in &mut self.nodes {
            if let Some(child) = &node.child {
                terminate(child.id());
            }
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        for node in &mut self.nodes {
            let Some(mut child) = node.child.take() else {
                continue;
            };
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            problems.push(format!("node {} exited with {status}", node.id));
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(PROBE_INTERVAL),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        problems.push(format!(
                            "node {} did not stop within {SHUTDOWN_WAIT:?} and was killed",
                            node.id
                        ));
                        break;
                    }
                }
            }
        }
        if self.opts.keep_data {
            let _ = fs::remove_file(self.root.join(RUNNING_MARKER));
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
        problems
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for p in self.stop() {
            eprintln!("warning: {p}");
        }
    }
}

/// Sends SIGTERM to `pid`.
#[allow(unsafe_code)]
pub(crate) fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child not yet reaped, so
    // the id cannot have been reused by another process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Removes the run directories (`<base>/<pid>`) of generators that are gone without cleaning up
/// (those still holding [`RUNNING_MARKER`]): a generator killed with SIGKILL takes its nodes down
/// (parent-death signal) but cannot remove their data. Kept runs (`--keep-data`) lose the marker
/// when they end and are left alone.
fn sweep_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id()
            && entry.path().join(RUNNING_MARKER).exists()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The last lines of a node's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
