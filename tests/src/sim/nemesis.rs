//! The nemesis: crashes and restarts, storage faults and the supervisor that restarts a node
//! whose store failed, and the operator script that changes membership.

use rand::Rng;
use ringkv_core::membership::{AdminCmd, AdminError, Reach};

use super::{Change, Event, Sim, TOMBSTONE_GRACE_MS};

/// One operator step of the membership script.
#[derive(Clone, Debug)]
pub(super) struct ScriptStep {
    pub(super) node: usize,
    pub(super) cmd: AdminCmd,
}

impl Sim {
    /// The operator's steps for the run's change, starting during the fault phase.
    pub(super) fn plan_script(&mut self) {
        let Some(change) = self.params.change else {
            return;
        };
        let originals = self.params.nodes;
        let pick = |sim: &mut Sim| sim.rng.gen_range(0..originals);
        let mut steps = Vec::new();
        if matches!(change, Change::Join | Change::JoinLeave) {
            let seed = pick(self);
            steps.push(ScriptStep {
                node: originals,
                cmd: AdminCmd::Join {
                    seed: format!("n{seed}"),
                },
            });
            let at = pick(self);
            steps.push(ScriptStep {
                node: at,
                cmd: AdminCmd::Commit,
            });
        }
        if matches!(change, Change::Leave | Change::JoinLeave) {
            let who = pick(self);
            steps.push(ScriptStep {
                node: who,
                cmd: AdminCmd::Leave,
            });
            let at = pick(self);
            steps.push(ScriptStep {
                node: at,
                cmd: AdminCmd::Commit,
            });
        }
        if change == Change::Remove {
            let who = pick(self);
            let by = (who + 1 + self.rng.gen_range(0..originals - 1)) % originals;
            steps.push(ScriptStep {
                node: by,
                cmd: AdminCmd::Remove {
                    node: self.nodes[who].id,
                },
            });
            let at = pick(self);
            steps.push(ScriptStep {
                node: at,
                cmd: AdminCmd::Commit,
            });
        }
        self.script = steps.into();
        let at = self.rng.gen_range(100..1500);
        self.schedule(at, Event::Admin);
    }

    /// Runs (or retries) the script's next step, or records the answer of the one in progress.
    pub(super) fn admin_step(&mut self) {
        if let Some((_, Some(result))) = &self.admin {
            let step = self.script.front().expect("an answered step is first");
            // An answer lost on the way makes a retry find the step already done.
            let done = match result {
                Ok(_) => true,
                Err(AdminError::Refused(e)) => {
                    e.contains("nothing is staged")
                        || e.contains("already leaving")
                        || e.contains("already removed")
                        || e.contains("only a fresh node joins")
                }
                Err(AdminError::Unreachable(_)) => false,
            };
            if done {
                if matches!(step.cmd, AdminCmd::Commit) {
                    self.changes += 1;
                }
                self.script.pop_front();
            }
            self.admin = None;
        }
        if self.admin.is_some() {
            // Still waiting: retry later (a lost request never answers).
            self.admin = None;
        }
        let Some(mut step) = self.script.front().cloned() else {
            return;
        };
        if self.nodes[step.node].retired && matches!(step.cmd, AdminCmd::Commit) {
            // The commit took effect and the node it was asked of left and stopped before the
            // answer arrived: the operator asks another node (which finds nothing staged).
            step.node = self.serving()[0];
            if let Some(front) = self.script.front_mut() {
                front.node = step.node;
            }
        }
        let pause = self.rng.gen_range(200..800);
        self.schedule(pause, Event::Admin);
        if self.nodes[step.node].membership.is_none() {
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        self.admin = Some((req, None));
        let now = self.now;
        let node = &mut self.nodes[step.node];
        let core = node.core.as_ref();
        let reach = |m| core.map_or(Reach::Unwatched, |c| Reach::of(c, m, now));
        let outputs = node
            .membership
            .as_mut()
            .expect("checked above")
            .admin(now, req, step.cmd, &reach);
        self.member_outputs(step.node, outputs);
    }

    pub(super) fn crash(&mut self, n: usize) {
        self.crashes += 1;
        // What was synced before the crash is judged before the crash erases the rest.
        self.note_synced();
        let lost = self.nodes[n].store.crash();
        self.note_crash(n, lost);
        let node = &mut self.nodes[n];
        node.core = None;
        node.membership = None;
        node.incarnation += 1;
        node.tick_at = None;
        node.frozen_until = None;
        self.owed.retain(|(at, _, _), _| *at != n);
        self.puts.retain(|(at, _, _), _| *at != n);
        // Client requests the node was coordinating are lost: their clients see a timeout.
        let lost: Vec<(usize, u64)> = self
            .requests
            .keys()
            .filter(|(at, _)| *at == n)
            .copied()
            .collect();
        for key in lost {
            if let Some(client) = self.requests.remove(&key) {
                self.client_failed(client, key.1);
            }
        }
    }

    /// Crashes `first` and up to `size - 1` more nodes that are up, in the same instant, each
    /// restarting after its own downtime.
    pub(super) fn crash_group(&mut self, first: usize, size: usize) {
        let mut group = vec![first];
        let mut others: Vec<usize> = (0..self.nodes.len())
            .filter(|&o| o != first && self.nodes[o].core.is_some())
            .collect();
        while group.len() < size && !others.is_empty() {
            let at = self.rng.gen_range(0..others.len());
            group.push(others.swap_remove(at));
        }
        for node in group {
            self.crash(node);
            let down = if self.params.long_outages && self.rng.gen_bool(0.5) {
                self.rng
                    .gen_range(TOMBSTONE_GRACE_MS..TOMBSTONE_GRACE_MS * 4)
            } else {
                self.rng.gen_range(50..2_000)
            };
            self.schedule(down, Event::Restart { node });
        }
    }

    /// A write was just acknowledged: in a group-crash run, once per run, every node loses
    /// power a few ms later, before most of them flush, so writes acknowledged with `dw = 0` are
    /// lost with every copy (crashes at random times rarely meet unsynced writes on every
    /// replica at once).
    pub(super) fn maybe_power_loss(&mut self) {
        if self.params.group_crashes && self.faults && !self.power_loss && self.rng.gen_bool(0.1) {
            self.power_loss = true;
            let after = self.rng.gen_range(0..=5);
            self.schedule(after, Event::PowerLoss);
        }
    }

    pub(super) fn restart(&mut self, n: usize) {
        self.boot(n);
    }

    /// Node `n`'s store just failed: it refuses everything until the node restarts, which its
    /// supervisor does soon (a process that exits on a fatal storage error and is started again).
    pub(super) fn store_failed(&mut self, n: usize) {
        self.store_failures += 1;
        if self.verbose {
            println!("{:>6} node-{} store failed", self.now, n + 1);
        }
        let incarnation = self.nodes[n].incarnation;
        let after = self.rng.gen_range(5..200);
        self.schedule(
            after,
            Event::Supervise {
                node: n,
                incarnation,
            },
        );
    }

    /// Stops node `n` for good once membership says it is out of the cluster and its core holds
    /// nothing for others (no partition to hand off, no hint), as a real node stops itself:
    /// a clean stop (its store synced), never restarted.
    pub(super) fn maybe_retire(&mut self, n: usize) {
        let node = &self.nodes[n];
        let (Some(core), Some(membership)) = (&node.core, &node.membership) else {
            return;
        };
        if !membership.retired() || core.handoff_count() > 0 || core.hint_count() > 0 {
            return;
        }
        if self.verbose {
            println!("{:>6} node-{} retires", self.now, n + 1);
        }
        self.nodes[n].store.sync();
        self.crash(n);
        self.crashes -= 1;
        self.nodes[n].retired = true;
    }
}
