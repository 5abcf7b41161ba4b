//! `--churn`: availability while the cluster changes. During the measured phase of a run on a
//! `--spawn-local` cluster, a node joins and then leaves, the way docs/OPERATIONS.md tells an
//! operator to do it, while the load runs against the original nodes; the report gives the
//! latency and errors of each phase side by side with the steady state before the change.
//!
//! The phases, in order (each operation is counted in the phase in which it started):
//! - `steady`: the cluster as started, for an eighth of `--duration`. The extra node is
//!   started (empty data directory, no `--node-id`, no seeds: a one-node cluster of its own)
//!   during this phase, so its start-up is not part of the change.
//! - `join`: from `cluster join` (asked of the new node, naming node 1's peer address) and
//!   `cluster commit` until every member is `valid`, `status` says `pending transfers: none`
//!   (every partition the new node takes is in place and the new ring is in force), and every
//!   node's `status` says it holds no partition to hand off (the old owners have pushed and
//!   dropped what they no longer replicate).
//! - `settle`: an eighth of `--duration` on four nodes.
//! - `leave`: from `cluster leave` (asked of the new node) and `cluster commit` until the ring
//!   without it is in force, it has handed everything off and stopped by itself, and no other
//!   node holds a partition to hand off.
//! - `after`: an eighth of `--duration` on the three nodes again; then the run ends (or at
//!   `--duration`, whichever comes first: a change that has not finished by then is reported
//!   as unfinished). So the join and the leave have five eighths of `--duration` between them.
//!
//! The verdict compares each change phase's p99.9 with the steady phase's and counts errors;
//! issue-level targets (0 errors, p99.9 within 2x) are judged by the reader from the table,
//! which prints the ratios. Limits: one join and one leave per run; the change is driven over
//! the same ADMIN requests as `ringkv cluster ...`; every wait is bounded by the run's end.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::cluster::LocalCluster;

/// The phases of a churn run, in order; an operation's phase is its index here.
pub(crate) const PHASES: [&str; 5] = ["steady", "join", "settle", "leave", "after"];
const STEADY: usize = 0;
const JOIN: usize = 1;
const SETTLE: usize = 2;
const LEAVE: usize = 3;
const AFTER: usize = 4;
/// Pause between two status polls while a change is in progress.
const POLL: Duration = Duration::from_millis(100);
/// How long a commit is retried while the claimant has not yet heard of the staged change.
const COMMIT_RETRY: Duration = Duration::from_secs(10);

/// What the load and the churn controller share: when the measured phase began (set once by
/// the load) and the phase operations are counted in now (set by the controller).
#[derive(Default)]
pub(crate) struct ChurnClock {
    pub(crate) measure_start: OnceLock<Instant>,
    pub(crate) phase: AtomicUsize,
}

impl ChurnClock {
    /// The phase an operation starting now belongs to.
    pub(crate) fn phase(&self) -> usize {
        self.phase.load(Ordering::Relaxed)
    }
}

/// One change's timing, for the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnEvents {
    /// Seconds from the start of the measured phase at which each phase began (absent: it
    /// never began).
    pub phase_starts_secs: Vec<Option<f64>>,
    /// How long the join took (join to every transfer done), seconds.
    pub join_secs: Option<f64>,
    /// How long the leave took (leave to the node stopped), seconds.
    pub leave_secs: Option<f64>,
    /// Why the change did not finish, if it did not.
    pub failure: Option<String>,
}

/// Drives the join and the leave while the load runs (module docs). Runs on the thread that
/// started the cluster (the nodes' parent-death signal is tied to it). Returns when the change
/// is done and the `after` phase has run, or when `load_done` is set; then sets `stop` so the
/// load ends.
pub(crate) fn drive(
    cluster: &mut LocalCluster,
    clock: &ChurnClock,
    duration: Duration,
    load_done: &AtomicBool,
    stop: &AtomicBool,
) -> ChurnEvents {
    let mut events = ChurnEvents {
        phase_starts_secs: vec![None; PHASES.len()],
        ..ChurnEvents::default()
    };
    let pause = duration / 8;
    let outcome = (|| -> anyhow::Result<()> {
        let start = loop {
            if let Some(t) = clock.measure_start.get() {
                break *t;
            }
            if load_done.load(Ordering::Relaxed) {
                bail!("the load ended before its measured phase began");
            }
            std::thread::sleep(POLL);
        };
        let enter = |phase: usize, events: &mut ChurnEvents| {
            clock.phase.store(phase, Ordering::Relaxed);
            events.phase_starts_secs[phase] = Some(start.elapsed().as_secs_f64());
        };
        enter(STEADY, &mut events);
        eprintln!("churn: starting a fourth node (not yet a member) ...");
        let new = cluster.add_node()?;
        wait_until(start + pause, load_done)?;

        enter(JOIN, &mut events);
        let joined = Instant::now();
        eprintln!("churn: join and commit ...");
        let seed = cluster.peer_addrs[0].clone();
        cluster.admin(new, "cluster-join", &seed)?;
        commit(cluster, load_done)?;
        wait_for(cluster, load_done, |c| everything_moved(c, None))?;
        events.join_secs = Some(joined.elapsed().as_secs_f64());
        eprintln!(
            "churn: join done in {:.1} s",
            joined.elapsed().as_secs_f64()
        );

        enter(SETTLE, &mut events);
        wait_until(Instant::now() + pause, load_done)?;

        enter(LEAVE, &mut events);
        let left = Instant::now();
        eprintln!("churn: leave and commit ...");
        cluster.admin(new, "cluster-leave", "")?;
        commit(cluster, load_done)?;
        wait_for(cluster, load_done, |c| match c.exited(new)? {
            Some(status) if status.success() => Ok(true),
            Some(status) => bail!(
                "the leaving node exited with {status}; its log:\n{}",
                c.log_tail(new)
            ),
            None => Ok(false),
        })?;
        wait_for(cluster, load_done, |c| everything_moved(c, Some(new)))?;
        events.leave_secs = Some(left.elapsed().as_secs_f64());
        eprintln!("churn: leave done in {:.1} s", left.elapsed().as_secs_f64());

        enter(AFTER, &mut events);
        // The change is done: a run whose `--duration` ends first only has a shorter `after`.
        let _ = wait_until(Instant::now() + pause, load_done);
        Ok(())
    })();
    if let Err(e) = outcome {
        events.failure = Some(format!("{e:#}"));
    }
    stop.store(true, Ordering::SeqCst);
    events
}

/// Whether the change is over: node 1's status shows no change in progress and every running
/// node (all but `gone`) holds no partition it still has to hand off (the old owners push what
/// they no longer replicate to its new replicas, and drop it, after the new ring is in force).
fn everything_moved(cluster: &mut LocalCluster, gone: Option<usize>) -> anyhow::Result<bool> {
    if !settled(&cluster.admin(0, "cluster-status", "")?) {
        return Ok(false);
    }
    for i in (0..cluster.client_addrs.len()).filter(|i| Some(*i) != gone) {
        if !handed_off(&cluster.admin(i, "cluster-status", "")?) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a node's `cluster status` says it holds no partition to hand off.
fn handed_off(status: &str) -> bool {
    status
        .lines()
        .any(|l| l.starts_with("this node holds: 0 partitions to hand off"))
}

/// Whether a `cluster status` answer shows no change in progress: no pending transfers, and
/// every member `valid` or `removed`.
fn settled(status: &str) -> bool {
    let members_settled = status
        .lines()
        .skip(2)
        .take_while(|l| !l.starts_with("pending transfers"))
        .all(|l| {
            let state = l.split_whitespace().nth(1);
            matches!(state, Some("valid" | "removed"))
        });
    members_settled && status.lines().any(|l| l == "pending transfers: none")
}

/// Commits the staged change through node 1, retrying while the claimant has not heard of it.
fn commit(cluster: &LocalCluster, load_done: &AtomicBool) -> anyhow::Result<()> {
    let until = Instant::now() + COMMIT_RETRY;
    loop {
        match cluster.admin(0, "cluster-commit", "") {
            Ok(_) => return Ok(()),
            // The claimant may not have heard of the staged change yet.
            Err(_) if Instant::now() < until && !load_done.load(Ordering::Relaxed) => {
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(e).context("cluster commit"),
        }
    }
}

/// Polls `done` until it holds; fails when the load has ended first.
fn wait_for(
    cluster: &mut LocalCluster,
    load_done: &AtomicBool,
    mut done: impl FnMut(&mut LocalCluster) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    loop {
        if done(cluster)? {
            return Ok(());
        }
        if load_done.load(Ordering::Relaxed) {
            bail!("the measured phase ended before the change finished (give a longer --duration)");
        }
        std::thread::sleep(POLL);
    }
}

/// Sleeps until `t`, or fails when the load ends first.
fn wait_until(t: Instant, load_done: &AtomicBool) -> anyhow::Result<()> {
    while Instant::now() < t {
        if load_done.load(Ordering::Relaxed) {
            bail!("the measured phase ended before the change finished (give a longer --duration)");
        }
        std::thread::sleep(POLL.min(t.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_needs_every_member_valid_and_no_pending_transfer() {
        let head = "ring epoch 3 (ring version 2), claimant 1\n\
                    node       status       owns  pending peer                   client                 reachability\n";
        let valid = format!(
            "{head}1          valid       33.3%        - a b self\n\
             2          valid       33.3%        - a b up\n\
             pending transfers: none\n"
        );
        assert!(settled(&valid));
        let joining = valid.replace("2          valid ", "2          joining");
        assert!(!settled(&joining));
        let pending = valid.replace("pending transfers: none", "pending transfers: 3 of 9 left");
        assert!(!settled(&pending));
        let removed = valid.replace("2          valid ", "2          removed");
        assert!(settled(&removed));
    }

    #[test]
    fn handed_off_reads_the_holding_line() {
        assert!(handed_off(
            "x\nthis node holds: 0 partitions to hand off, 3 hints\n"
        ));
        assert!(!handed_off(
            "x\nthis node holds: 10 partitions to hand off, 0 hints\n"
        ));
        assert!(!handed_off("no such line\n"));
    }
}
