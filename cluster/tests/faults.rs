//! End to end: five `ringkv serve` processes on loopback under a nemesis that kills (SIGKILL)
//! and restarts nodes, freezes them (SIGSTOP, then SIGCONT) and partitions them, while clients
//! add elements to sets and write unique keys through random nodes.
//!
//! Once every fault has healed, the test requires what the design promises: every acknowledged
//! write and every acknowledged add is held by every home replica of its key (read over a peer
//! connection with REPLICA_GET, so no client read repair hides a missing copy), no hint is left
//! undelivered, the replicas of every partition report the same Merkle root, and no node panicked
//! or exited. Nodes run `--durability sync`: an acknowledged write is on disk on the W = 2 nodes
//! that acknowledged it, so a kill -9 of one of them must not lose it (with `buffered` and
//! `dw = 0` a kill may legitimately lose acknowledged writes, which this test would report).
//!
//! **Partitions** are iptables rules in the OUTPUT chain, which loopback traffic passes in both
//! directions. Every node connects to its peers from 127.0.0.1 and an ephemeral port, so neither
//! address nor port says which node sent a packet; instead each node runs under a group id of its
//! own, `-m owner --gid-owner` names the sending node, and each connection records the node that
//! opened it in its conntrack mark. A packet between two sides is dropped when its sender is on
//! one side and the other end (the peer port it connects to, for the node that opened the
//! connection; the mark, for the node that accepted it) is on the other. Clients (this process)
//! reach every node throughout. The rules live in chains named after this process, so parallel
//! runs do not interfere, and a drop guard removes them even when the test panics; a run
//! killed before its guard ran leaves them behind, and the next run removes them (a run is
//! gone when no process has its id: this assumes the runs that share the firewall, that is the
//! network namespace, also share the process id namespace, as on one machine). This needs
//! root and the `iptables` command (`.ci/run` installs it): without them the test fails, it
//! does not skip.
//!
//! **Bounds.** Faults come one at a time from a seeded schedule of `RINGKV_FAULT_STEPS` steps
//! (default [`STEPS_DEFAULT`]); the seed is printed and `RINGKV_FAULT_SEED` replays the schedule
//! (not the timing of real processes). Every client request has a timeout, every wait is a
//! bounded number of polls, and nothing asserts on wall-clock time.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use common::{ClusterNode, data_dir, metric, replica_values, seeds, wait_for};
use ringkv_cluster::route::{PARTITIONS, partition_of};
use ringkv_core::NodeId;
use ringkv_core::object::Val;
use ringkv_core::ring::{PartitionId, Ring};
use ringkv_net::{Client, ClientConfig, Sibling};

/// Nodes of the cluster.
const NODES: u32 = 5;
/// Replicas per key: the default bucket's `n`.
const N: usize = 3;
/// The bucket every write goes to (no buckets file: the default `(3, 2, 2)` bucket).
const BUCKET: &[u8] = b"default";
/// Nemesis steps of a default run; `RINGKV_FAULT_STEPS` asks for more.
const STEPS_DEFAULT: usize = 9;
/// How long a fault lasts: well past the replica timeout (1 s by default), so coordinators move
/// slots to fallbacks and hints pile up, and short enough to keep the default run brief.
const FAULT_MS: u64 = 3000;
/// Pause between two faults, so some writes land on a whole cluster between them.
const QUIET_MS: u64 = 1000;
/// Client threads of the workload.
const CLIENTS: usize = 3;
/// Bound on the requests of each client thread per nemesis step (over ten times what one makes
/// in a step here), so the workload ends even if the stop flag is never raised.
const OPS_PER_STEP_MAX: usize = 5_000;
/// Sets written at a time: few, so that clients often update one concurrently (siblings).
const SET_KEYS: usize = 4;
/// Requests of a client thread after which it moves on to the next generation of set keys, so
/// that a long run's sets stay far below the value size limit (each add grows its set).
const SET_GENERATION_OPS: usize = 2_000;
/// A client request's bound: past it a frozen or cut-off node's request is given up (and not
/// counted as acknowledged).
const CLIENT_TIMEOUT_MS: u64 = 3000;
/// Rounds of each convergence poll, each a pause of [`POLL_MS`] and one check.
const POLLS: usize = 300;
const POLL_MS: u64 = 200;

/// A splitmix64 generator: the schedule and the workload's choices from one printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Runs `iptables -w` (waiting for the table lock another run may hold) with `args`.
fn iptables(args: &[&str]) -> Result<(), String> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| format!("iptables {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The iptables chains of one test run; removed on drop.
struct Firewall {
    /// Marks each new connection with the group id of the node that opens it.
    mark_chain: String,
    /// The drop rules of the partition in force; empty while healed.
    drop_chain: String,
    /// Each node's group id (also its connection mark) and peer port, by node index.
    nodes: Vec<(u32, u16)>,
}

/// Removes both chains of a run, unhooking them from OUTPUT first; reports what fails.
fn remove_chains(chains: [&str; 2]) {
    for chain in chains {
        for step in [
            vec!["-D", "OUTPUT", "-j", chain],
            vec!["-F", chain],
            vec!["-X", chain],
        ] {
            if let Err(e) = iptables(&step) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// The process ids of runs whose chains are in the firewall but whose process is gone: a run
/// killed before its `Drop` ran (a timeout, kill -9). Their rules would stay hooked into
/// OUTPUT, be walked by every packet the machine sends, and drop the packets of a later run
/// that happened to get the same group ids and ports.
fn stale_runs() -> Vec<u32> {
    let mut runs: Vec<u32> = chain_names()
        .iter()
        .filter_map(|name| name.strip_prefix("ringkv-fault-"))
        // Either chain: a run killed while removing its chains may have left one.
        .filter_map(|rest| rest.strip_suffix("-m").or_else(|| rest.strip_suffix("-d")))
        .filter_map(|pid| pid.parse().ok())
        .filter(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    runs.sort_unstable();
    runs.dedup();
    runs
}

/// The names of the chains the firewall's filter table has (`iptables -S`); none when it
/// cannot be listed.
fn chain_names() -> Vec<String> {
    let Ok(out) = Command::new("iptables").args(["-w", "-S"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("-N "))
        .map(str::to_owned)
        .collect()
}

/// Serialises the removal of stale chains with the making of chains for it to find, across
/// the test processes of this machine (the lock is released when the file closes).
fn setup_lock() -> std::fs::File {
    let path = std::env::temp_dir().join("ringkv-fault-firewall.lock");
    let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
    file
}

/// Removes the chains of every [`stale_runs`] run.
fn remove_stale_runs() {
    let _setup = setup_lock();
    for pid in stale_runs() {
        eprintln!("removing the firewall chains of run {pid}, which is gone");
        remove_chains([
            &format!("ringkv-fault-{pid}-m"),
            &format!("ringkv-fault-{pid}-d"),
        ]);
    }
}

impl Firewall {
    /// Creates the chains and the marking rules for `nodes` (group id, peer port), and hooks
    /// both chains into OUTPUT, after removing those of runs that died without removing
    /// theirs ([`stale_runs`]). Panics with what to install when iptables is not usable.
    fn new(nodes: Vec<(u32, u16)>) -> Firewall {
        remove_stale_runs();
        let tag = std::process::id();
        let firewall = Firewall {
            mark_chain: format!("ringkv-fault-{tag}-m"),
            drop_chain: format!("ringkv-fault-{tag}-d"),
            nodes,
        };
        for chain in [&firewall.mark_chain, &firewall.drop_chain] {
            iptables(&["-N", chain]).unwrap_or_else(|e| {
                panic!(
                    "partitions need root and the iptables command \
                     (apt-get install iptables; .ci/run installs it): {e}"
                )
            });
        }
        for &(gid, _) in &firewall.nodes {
            let (gid, mark) = (gid.to_string(), gid.to_string());
            iptables(&[
                "-A",
                &firewall.mark_chain,
                "-p",
                "tcp",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-m",
                "owner",
                "--gid-owner",
                &gid,
                "-j",
                "CONNMARK",
                "--set-mark",
                &mark,
            ])
            .unwrap();
        }
        // Marking first: a connection opened while a partition is in force is marked by its
        // first packet even though that packet is then dropped.
        iptables(&["-I", "OUTPUT", "1", "-j", &firewall.drop_chain]).unwrap();
        iptables(&["-I", "OUTPUT", "1", "-j", &firewall.mark_chain]).unwrap();
        firewall
    }

    /// Cuts every node of `side` off from every other node, both ways.
    fn partition(&self, side: &BTreeSet<usize>) {
        for (a, &(gid_a, port_a)) in self.nodes.iter().enumerate() {
            for (b, &(gid_b, _)) in self.nodes.iter().enumerate() {
                if side.contains(&a) == side.contains(&b) {
                    continue;
                }
                let (gid_a, gid_b, port_a) =
                    (gid_a.to_string(), gid_b.to_string(), port_a.to_string());
                // b's packets on connections b opens to a...
                self.drop_from(&gid_b, &["-p", "tcp", "--dport", &port_a]);
                // ...and b's packets on connections a opened to b.
                self.drop_from(&gid_b, &["-m", "connmark", "--mark", &gid_a]);
            }
        }
    }

    /// Adds a rule dropping the packets of processes of group `gid` that match `matches`.
    fn drop_from(&self, gid: &str, matches: &[&str]) {
        let mut rule = vec!["-A", self.drop_chain.as_str()];
        rule.extend_from_slice(matches);
        rule.extend_from_slice(&["-m", "owner", "--gid-owner", gid, "-j", "DROP"]);
        iptables(&rule).unwrap();
    }

    /// Packets the partition's rules dropped so far (`iptables -L -v -x` counters).
    fn dropped(&self) -> u64 {
        let out = Command::new("iptables")
            .args(["-w", "-L", &self.drop_chain, "-v", "-x", "-n"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // Two header lines, then one rule a line with its packet count first.
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .skip(2)
            .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// Removes the partition's rules.
    fn heal(&self) {
        iptables(&["-F", &self.drop_chain]).unwrap();
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        // Best effort: runs while a panic unwinds, so it reports instead of panicking again.
        remove_chains([&self.mark_chain, &self.drop_chain]);
    }
}

/// One fault of the nemesis, by node index.
#[derive(Debug)]
enum Fault {
    /// SIGKILL, then a restart on the same data directory.
    Kill(usize),
    /// SIGSTOP, then SIGCONT.
    Freeze(usize),
    /// These nodes cut off from the others.
    Partition(BTreeSet<usize>),
}

/// `steps` faults from `rng`: the three kinds in turn (so a default run has each kind three times),
/// each on randomly chosen nodes; a partition isolates one or two nodes.
fn schedule(rng: &mut Rng, steps: usize) -> Vec<Fault> {
    let first = rng.below(3);
    (0..steps)
        .map(|i| match (first + i) % 3 {
            0 => Fault::Kill(rng.below(NODES as usize)),
            1 => Fault::Freeze(rng.below(NODES as usize)),
            _ => {
                let size = 1 + rng.below(2);
                let mut side = BTreeSet::new();
                while side.len() < size {
                    side.insert(rng.below(NODES as usize));
                }
                Fault::Partition(side)
            }
        })
        .collect()
}

/// What a client thread saw acknowledged.
#[derive(Default)]
struct Acked {
    /// (set key, element) of every add whose PUT succeeded.
    adds: Vec<(Vec<u8>, String)>,
    /// (key, value) of every unique-key PUT that succeeded.
    writes: Vec<(Vec<u8>, Vec<u8>)>,
    /// Requests that failed, by kind (timeouts, unreachable nodes, quorums not met): expected
    /// under faults, shown for the size of the run.
    failed: BTreeMap<String, usize>,
}

/// Set `i` of the generation of a client's request `op`.
fn set_key(op: usize, i: usize) -> Vec<u8> {
    format!("set-{}-{i}", op / SET_GENERATION_OPS).into_bytes()
}

/// The elements of a set value: newline-separated.
fn elements(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap()
        .split('\n')
        .filter(|e| !e.is_empty())
}

/// One client thread: until `stop` (or `ops_max` requests), through a random node
/// each time, either adds a unique element to a random set (GET, union of every sibling plus
/// the element, PUT with the GET's context) or writes a unique key once.
fn client_thread(
    id: usize,
    seed: u64,
    addrs: Vec<String>,
    ops_max: usize,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Acked> {
    std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let config = ClientConfig {
            timeout: Duration::from_millis(CLIENT_TIMEOUT_MS),
            ..ClientConfig::default()
        };
        let mut clients: Vec<Option<Client>> = addrs.iter().map(|_| None).collect();
        let mut acked = Acked::default();
        for op in 0..ops_max {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let node = rng.below(addrs.len());
            if clients[node].is_none() {
                clients[node] = Client::connect(&addrs[node], config.clone()).ok();
            }
            let Some(client) = clients[node].as_mut() else {
                *acked.failed.entry("connect".into()).or_default() += 1;
                // A killed node refuses at once: do not spin on it.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let ok = if rng.below(2) == 0 {
                let set = set_key(op, rng.below(SET_KEYS));
                let element = format!("c{id}-{op}");
                add(client, &set, &element).map(|()| acked.adds.push((set, element)))
            } else {
                let key = format!("unique-{id}-{op}").into_bytes();
                let value = format!("value of {id}-{op}").into_bytes();
                client
                    .put(BUCKET, &key, &value, None)
                    .map(|_| acked.writes.push((key, value)))
            };
            if let Err(e) = ok {
                let kind = match e {
                    ringkv_net::ClientError::Server { code, .. } => code.to_string(),
                    ringkv_net::ClientError::Timeout(_) => "client timeout".into(),
                    other => other.to_string(),
                };
                *acked.failed.entry(kind).or_default() += 1;
                // A timed-out connection may still receive the late reply: start afresh.
                clients[node] = None;
            }
        }
        acked
    })
}

/// Adds `element` to the set at `key` by read-merge-write with the read's context.
fn add(client: &mut Client, key: &[u8], element: &str) -> Result<(), ringkv_net::ClientError> {
    let read = client.get(BUCKET, key)?;
    let mut union: BTreeSet<&str> = BTreeSet::new();
    for sibling in &read.siblings {
        if let Sibling::Value(v) = sibling {
            union.extend(elements(v));
        }
    }
    union.insert(element);
    let value = union.into_iter().collect::<Vec<_>>().join("\n");
    let context = Some(read.context).filter(|c| !c.is_empty());
    client.put(BUCKET, key, value.as_bytes(), context)?;
    Ok(())
}

/// Runs `fault` on `nodes` for [`FAULT_MS`], then heals it.
fn inflict(fault: &Fault, nodes: &mut [ClusterNode], firewall: &Firewall) {
    let hold = Duration::from_millis(FAULT_MS);
    match fault {
        Fault::Kill(i) => {
            nodes[*i].kill();
            std::thread::sleep(hold);
            nodes[*i].start();
        }
        Fault::Freeze(i) => {
            nodes[*i].signal("STOP");
            std::thread::sleep(hold);
            nodes[*i].signal("CONT");
        }
        Fault::Partition(side) => {
            firewall.partition(side);
            std::thread::sleep(hold);
            // Heartbeats alone cross every pair of nodes each second: a partition that dropped
            // nothing did not cut anything, and the run would prove less than it claims.
            let dropped = firewall.dropped();
            firewall.heal();
            assert!(dropped > 0, "the partition {side:?} dropped no packet");
        }
    }
}

/// The home nodes (indices) of a partition.
fn homes(ring: &Ring, partition: PartitionId) -> Vec<usize> {
    ring.preference_list(partition, N)
        .into_iter()
        .map(|n| n.0 as usize - 1)
        .collect()
}

/// Every acknowledged unique-key write is the only value on every home replica of its key:
/// `Err` with the first few that are not.
fn check_writes(
    nodes: &[ClusterNode],
    ring: &Ring,
    writes: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), String> {
    let keys: Vec<Vec<u8>> = writes.iter().map(|(k, _)| k.clone()).collect();
    let held: Vec<_> = nodes
        .iter()
        .map(|n| replica_values(&n.peer_addr, BUCKET, &keys))
        .collect();
    let mut wrong = Vec::new();
    for (i, (key, value)) in writes.iter().enumerate() {
        let want = Val::Value(Bytes::copy_from_slice(value));
        for home in homes(ring, partition_of(BUCKET, key)) {
            let copy = &held[home][i];
            // Several siblings of the same value are not a loss: a forwarded write retried on
            // another home after a lost connection gets a second dot.
            if !copy
                .as_ref()
                .is_some_and(|c| !c.is_empty() && c.iter().all(|v| *v == want))
            {
                wrong.push(format!(
                    "node-{} holds {copy:?} for {}",
                    home + 1,
                    String::from_utf8_lossy(key)
                ));
            }
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} copies of acknowledged writes are missing or wrong, e.g. {:?}",
            wrong.len(),
            N * writes.len(),
            &wrong[..wrong.len().min(5)]
        ))
    }
}

/// Every acknowledged add is in the union of the siblings of every home replica of its set:
/// `Err` naming the missing elements otherwise.
fn check_sets(
    nodes: &[ClusterNode],
    ring: &Ring,
    adds: &BTreeMap<Vec<u8>, BTreeSet<String>>,
) -> Result<(), String> {
    let keys: Vec<Vec<u8>> = adds.keys().cloned().collect();
    let held: Vec<_> = nodes
        .iter()
        .map(|n| replica_values(&n.peer_addr, BUCKET, &keys))
        .collect();
    let mut missing = Vec::new();
    for (set, (key, acked)) in adds.iter().enumerate() {
        for home in homes(ring, partition_of(BUCKET, key)) {
            let mut union = BTreeSet::new();
            for v in held[home][set].iter().flatten() {
                if let Val::Value(v) = v {
                    union.extend(elements(v).map(str::to_owned));
                }
            }
            let lost: Vec<&String> = acked.difference(&union).collect();
            if !lost.is_empty() {
                missing.push(format!(
                    "node-{} lacks {} of {} acknowledged adds of {}, e.g. {:?}",
                    home + 1,
                    lost.len(),
                    acked.len(),
                    String::from_utf8_lossy(key),
                    &lost[..lost.len().min(5)]
                ));
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("\n"))
    }
}

/// The chains of a run killed before it removed them (a process id no process has: above any
/// `pid_max`), hooked into OUTPUT with a drop rule as a partition leaves them, are gone after
/// the next run's cleanup; the chains of a live process (this test's parent: chains named after
/// this process would be the fault test's own) are left alone.
#[test]
fn chains_of_a_killed_run_are_removed() {
    // Above any `pid_max` (at most 2^22), and this process's own, so parallel runs of this
    // test use distinct chains.
    let dead = 4_000_000_000 + std::process::id();
    let live = std::os::unix::process::parent_id();
    let chains = |pid: u32| {
        [
            format!("ringkv-fault-{pid}-m"),
            format!("ringkv-fault-{pid}-d"),
        ]
    };
    let listed = |name: &str| chain_names().iter().any(|n| n == name);
    {
        let _setup = setup_lock();
        for pid in [dead, live] {
            let [m, d] = chains(pid);
            if listed(&m) || listed(&d) {
                // Left by a run of this test killed in the middle.
                remove_chains([&m, &d]);
            }
            for chain in [&m, &d] {
                iptables(&["-N", chain]).unwrap_or_else(|e| {
                    panic!("needs root and iptables (.ci/run installs it): {e}")
                });
                iptables(&["-I", "OUTPUT", "1", "-j", chain]).unwrap();
            }
            // Matches no packet: a group id no process of this machine runs under.
            iptables(&[
                "-A",
                &d,
                "-p",
                "tcp",
                "--dport",
                "1",
                "-m",
                "owner",
                "--gid-owner",
                "3999999999",
                "-j",
                "DROP",
            ])
            .unwrap();
        }
    }
    remove_stale_runs();
    let [dead_m, dead_d] = chains(dead);
    let [live_m, live_d] = chains(live);
    let left = (
        listed(&dead_m),
        listed(&dead_d),
        listed(&live_m),
        listed(&live_d),
    );
    remove_chains([&live_m, &live_d]);
    assert_eq!(
        left,
        (false, false, true, true),
        "(dead m, dead d, live m, live d) listed"
    );
}

/// Five nodes on defaults (`--durability sync`, the default anti-entropy pace) take a set
/// workload and unique-key writes through random nodes while a seeded nemesis kills and
/// restarts, freezes and partitions them one at a time. After healing, hints drain, every
/// partition's replicas report one Merkle root, every acknowledged write and add is on every
/// home replica (read directly), and no node panicked or exited: the promises of no silent loss
/// and convergence, checked on real processes.
#[test]
fn acknowledged_writes_and_adds_survive_kills_freezes_and_partitions() {
    let seed = std::env::var("RINGKV_FAULT_SEED")
        .map(|s| s.parse::<u64>().expect("RINGKV_FAULT_SEED is a u64"))
        .unwrap_or_else(|_| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            now.as_nanos() as u64 ^ u64::from(std::process::id())
        });
    let steps = std::env::var("RINGKV_FAULT_STEPS")
        .map(|s| s.parse::<usize>().expect("RINGKV_FAULT_STEPS is a count"))
        .unwrap_or(STEPS_DEFAULT);
    let mut rng = Rng(seed);
    let faults = schedule(&mut rng, steps);
    let dir = data_dir("faults");
    std::fs::create_dir_all(&dir).unwrap();
    // Shown when the test fails: enough to replay the schedule and find the nodes' logs.
    eprintln!(
        "RINGKV_FAULT_SEED={seed} RINGKV_FAULT_STEPS={steps}; logs in {}",
        dir.display()
    );
    eprintln!("schedule: {faults:?}");

    // Group ids (and connection marks) of this run's nodes: distinct per test process, so a
    // parallel run's rules never match this run's sockets.
    let gid_base = 0x4000_0000 + (std::process::id() % 0x10_0000) * 16;
    let mut nodes: Vec<ClusterNode> = (1..=NODES)
        .map(|id| ClusterNode::on_defaults(&dir, id))
        .collect();
    let peers: Vec<(u32, &str)> = nodes.iter().map(|n| (n.id, n.peer_addr.as_str())).collect();
    let seed_list = seeds(&peers);
    let firewall = Firewall::new(
        nodes
            .iter()
            .map(|n| {
                let port = n.peer_addr.rsplit(':').next().unwrap().parse().unwrap();
                (gid_base + n.id, port)
            })
            .collect(),
    );
    for node in &mut nodes {
        node.gid = Some(gid_base + node.id);
        node.extra = vec![
            "--seeds".into(),
            seed_list.clone(),
            // An acknowledged write must survive the kill of a node that acknowledged it.
            "--durability".into(),
            "sync".into(),
        ];
        node.start();
    }
    let members: BTreeSet<NodeId> = (1..=NODES).map(NodeId).collect();
    let ring = Ring::new(PARTITIONS, &members, N).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let clients: Vec<JoinHandle<Acked>> = (0..CLIENTS)
        .map(|id| {
            let ops_max = OPS_PER_STEP_MAX * (steps + 1);
            client_thread(id, rng.next(), addrs.clone(), ops_max, stop.clone())
        })
        .collect();
    for fault in &faults {
        std::thread::sleep(Duration::from_millis(QUIET_MS));
        inflict(fault, &mut nodes, &firewall);
    }
    std::thread::sleep(Duration::from_millis(QUIET_MS));
    stop.store(true, Ordering::Relaxed);
    let mut writes = Vec::new();
    let mut adds: BTreeMap<Vec<u8>, BTreeSet<String>> = BTreeMap::new();
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    for client in clients {
        let acked = client.join().unwrap();
        writes.extend(acked.writes);
        for (set, element) in acked.adds {
            adds.entry(set).or_default().insert(element);
        }
        for (kind, count) in acked.failed {
            *failed.entry(kind).or_default() += count;
        }
    }
    let added: usize = adds.values().map(BTreeSet::len).sum();
    eprintln!(
        "{} acknowledged writes, {added} acknowledged adds, failed requests: {failed:?}",
        writes.len()
    );
    assert!(
        !writes.is_empty() && added > 0,
        "the workload made no progress"
    );

    // Shown with --nocapture, never asserted: how long convergence took after the workload.
    let healed = std::time::Instant::now();
    wait_for("every hint delivered", POLLS, POLL_MS, || {
        let held: Vec<(f64, f64)> = nodes
            .iter()
            .map(|n| {
                (
                    metric(&n.admin, "ringkv_hints"),
                    metric(&n.admin, "ringkv_hints_in_flight"),
                )
            })
            .collect();
        if held.iter().all(|&(h, f)| h == 0.0 && f == 0.0) {
            Ok(())
        } else {
            Err(format!("(hints, in flight) per node: {held:?}"))
        }
    });
    wait_for(
        "one Merkle root per partition's replicas",
        POLLS,
        POLL_MS,
        || {
            let roots: Vec<_> = nodes.iter().map(|n| common::merkle(&n.admin)).collect();
            let differ: Vec<u32> = (0..PARTITIONS.get())
                .filter(|&p| {
                    let of: BTreeSet<Option<&(u64, String)>> = homes(&ring, PartitionId(p))
                        .iter()
                        .map(|&h| roots[h].get(&(p, N as u8)))
                        .collect();
                    of.len() != 1 || of.contains(&None)
                })
                .collect();
            if differ.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} partitions differ, e.g. {:?}",
                    differ.len(),
                    &differ[..differ.len().min(5)]
                ))
            }
        },
    );
    eprintln!(
        "hints drained and roots agreed {} ms after the workload stopped",
        healed.elapsed().as_millis()
    );
    // Roots are published once a second, so a poll may have seen them agree just before the
    // last repair's effect was visible everywhere: the copies are polled too (bounded).
    wait_for(
        "every acknowledged write on every home replica",
        POLLS,
        POLL_MS,
        || check_writes(&nodes, &ring, &writes),
    );
    wait_for(
        "every acknowledged add on every home replica",
        POLLS,
        POLL_MS,
        || check_sets(&nodes, &ring, &adds),
    );

    // Shown with --nocapture: which repair paths the run exercised.
    let total = |name: &str| -> f64 { nodes.iter().map(|n| metric(&n.admin, name)).sum() };
    eprintln!(
        "hinted writes {}, hints delivered {}, anti-entropy repairs {}, read repairs {}",
        total("ringkv_hinted_writes_total"),
        total("ringkv_hints_delivered_total"),
        total("ringkv_ae_keys_repaired_total"),
        total("ringkv_read_repairs_total"),
    );
    for node in &mut nodes {
        assert_eq!(node.exited(), None, "node-{} exited", node.id);
        let log = std::fs::read_to_string(&node.log).unwrap_or_default();
        assert!(
            !log.contains("panicked"),
            "node-{} panicked; its log:\n{log}",
            node.id
        );
    }
}
