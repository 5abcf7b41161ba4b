//! Moving partition data when the ring changes: pulls towards a pending ring, and handoff of
//! partitions a node no longer replicates (sans-IO).
//!
//! [`Transfers`] owns the pulls and handoffs and is one of the types the [`Core`] owns: it reads
//! the core through a `View`, emits through an `Outbox` (`context.rs`), and queues a
//! [`TransferEffect`] for what needs the rest of the core (merging a pulled key under its lock,
//! the anti-entropy trees a handoff pass rebuilds). The `impl Core` block at the end is the
//! glue.
//!
//! Membership ([`crate::membership`]) publishes the ring in force and, during a change, the
//! pending ring; [`Core::set_view`] hands both to the core. For every partition of this core:
//!
//! - **Pull.** If this node is in the partition's preference list (for `target_n` replicas) of
//!   the pending ring but not of the ring in force, it pulls the partition from a current replica:
//!   [`PeerMsg::TransferPull`] asks for a page of at most [`PAGE_ITEMS`] keys (and about
//!   [`PAGE_BYTES`]) after a cursor, the source scans its store ([`Output::Scan`]) and answers
//!   [`PeerMsg::TransferPage`]; each object is merged into the local replica through the usual
//!   per-key job (so it never overwrites a newer write), synced, and only then is the next page
//!   asked for. The cursor is kept, so a failed or timed-out page is asked again (of the next
//!   source) from where it stopped: transfers are bounded in memory and resumable. When the last
//!   page is merged, [`Output::TransferDone`] reports the partition to membership.
//! - **Writes during the change** go to the pending replicas too (best effort, not counted towards
//!   `w`; `replicate` in the parent module), so a write the pull already passed still reaches the
//!   new replica.
//! - **Handoff.** A partition this node holds but no longer replicates (it left the preference
//!   lists of both rings, or a stale coordinator wrote to it) is pushed, page by page, to every
//!   current replica as synced [`PeerMsg::ReplicaPut`]s, and dropped ([`Output::DropPartition`])
//!   only once every replica acknowledged every page of a complete pass during which no write
//!   was stored there and none is in progress (no per-key job holds one of its keys). Between the drop request and [`Core::partition_dropped`] replica writes to it are
//!   refused (the coordinator moves on to a fallback), so nothing acknowledged is dropped.
//!   Dropping a replica without tombstones would let this node reissue dots it handed out (module
//!   docs of the parent: epochs), so [`Core::partition_dropped`] raises the epoch floor to a fresh
//!   epoch. If the ring gives the partition back before the drop, the data is kept, but its
//!   anti-entropy tree went away with the first change and came back empty: one more pass, run
//!   from an emptied tree and overtaken by no write, rebuilds it from the pages it scans before
//!   the handoff ends.
//!
//! Limits: at most [`PULLS_MAX`] pulls and [`HANDOFFS_MAX`] handoffs at once per core; a failed
//! step waits `hint_retry_ms` before it is retried. A scan page is found by the store from the
//! cursor (the engine's key order), which costs a pass over the partition's index per page.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_net::{ErrorBody, ErrorCode};

use super::context::{Outbox, View, lend};
use super::{Core, JobKind, Output, PeerMsg, Pending, ReplyTo, Space, StoreKey};
use crate::NodeId;
use crate::object::Object;
use crate::ring::{PartitionId, Ring};

/// Keys per transfer page.
pub const PAGE_ITEMS: usize = 64;
/// Bytes of objects per transfer page the store aims for (a page holds at least one key).
pub const PAGE_BYTES: usize = 4 << 20;
/// Pulls running at once per core.
pub const PULLS_MAX: usize = 2;
/// Handoffs running at once per core.
pub const HANDOFFS_MAX: usize = 1;
/// Wait before a handoff that found a write still landing looks again.
const RECHECK_MS: u64 = 10;

/// One key of a scan page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanItem {
    /// Bucket.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
    /// The stored object.
    pub object: Object,
}

/// What a store scan returns (see [`Output::Scan`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Keys after the cursor, in the store's order.
    pub items: Vec<ScanItem>,
    /// The cursor of the next page; `None` when the partition has no more keys.
    pub next: Option<Bytes>,
}

#[derive(Debug)]
enum Step {
    /// Waiting to (re)start at `at`.
    Idle { at: u64 },
    /// A page was asked for.
    Asking,
    /// A page is being merged or pushed; `left` answers outstanding.
    Applying {
        left: usize,
        failed: bool,
        next: Option<Bytes>,
    },
    /// The drop was asked for (handoffs only).
    Dropping,
}

/// The partitions and steps of a map of pulls or handoffs.
fn steps<'a, T>(
    map: &'a BTreeMap<u32, T>,
    step: impl Fn(&'a T) -> &'a Step + Clone + 'a,
) -> impl Iterator<Item = (u32, &'a Step)> + Clone + 'a {
    map.iter().map(move |(p, t)| (*p, step(t)))
}

/// Slots left for steps to start, with at most `max` running.
fn free_slots<'a>(steps: impl Iterator<Item = (u32, &'a Step)>, max: usize) -> usize {
    let running = steps
        .filter(|(_, s)| !matches!(s, Step::Idle { .. }))
        .count();
    max.saturating_sub(running)
}

/// Waiting steps whose time has come, as many as free slots allow.
fn due_now<'a>(
    steps: impl Iterator<Item = (u32, &'a Step)> + Clone,
    max: usize,
    now: u64,
) -> Vec<u32> {
    let slots = free_slots(steps.clone(), max);
    steps
        .filter(|(_, s)| matches!(s, Step::Idle { at } if *at <= now))
        .map(|(p, _)| p)
        .take(slots)
        .collect()
}

/// When the next waiting step is due, if a slot is free for it.
fn next_due<'a>(steps: impl Iterator<Item = (u32, &'a Step)> + Clone, max: usize) -> Option<u64> {
    if free_slots(steps.clone(), max) == 0 {
        return None;
    }
    steps
        .filter_map(|(_, s)| match s {
            Step::Idle { at } => Some(*at),
            _ => None,
        })
        .min()
}

impl Step {
    /// One answer of the page being applied came: `ok`, or a failure that repeats the page.
    fn answered(&mut self, ok: bool) {
        if let Step::Applying { left, failed, .. } = self {
            *left -= 1;
            *failed |= !ok;
        }
    }
}

#[derive(Debug)]
struct Pull {
    epoch: u64,
    sources: Vec<NodeId>,
    attempt: usize,
    cursor: Option<Bytes>,
    step: Step,
}

#[derive(Debug)]
struct Handoff {
    cursor: Option<Bytes>,
    step: Step,
    /// Replica writes applied since this pass began: the pass must be repeated.
    writes: u64,
    /// This pass rebuilds the partition's anti-entropy trees: it began (from an emptied tree)
    /// while this node replicated the partition, and the node has replicated it since.
    fill: bool,
}

/// The partition transfers of a core: pulls towards the pending ring and handoffs of partitions
/// it no longer replicates, with the methods that run them. It reads the core through a
/// [`View`] and emits through an [`Outbox`] (`context.rs`); what needs the rest of the core (a
/// per-key merge, the anti-entropy trees) it queues as [`TransferEffect`]s, which the core
/// carries out, in order, right after the call that queued them.
#[derive(Debug, Default)]
pub(super) struct Transfers {
    pending: Option<(u64, Ring)>,
    pulls: BTreeMap<u32, Pull>,
    /// `(epoch, partition)` pulls finished and reported.
    done: BTreeSet<(u64, u32)>,
    handoffs: BTreeMap<u32, Handoff>,
    effects: Vec<TransferEffect>,
}

/// Work a transfer hands back to the core.
#[derive(Debug)]
pub(super) enum TransferEffect {
    /// Merge a pulled key into the local replica (a per-key job, synced), then report it to
    /// the pull of its partition.
    Merge {
        /// The key.
        key: StoreKey,
        /// The pulled object.
        object: Object,
    },
    /// Empty the anti-entropy trees of a partition a handoff pass rebuilds.
    ResetTrees(u32),
    /// Set a key's anti-entropy entry to the object a rebuilding handoff pass scanned.
    Fill {
        /// The key.
        key: StoreKey,
        /// The stored object.
        object: Object,
    },
}

impl View<'_> {
    fn mine(&self, partition: u32) -> bool {
        partition % self.cfg.shards == self.cfg.shard
    }

    fn in_pref(&self, ring: &Ring, partition: u32) -> bool {
        ring.preference_list(PartitionId(partition), self.cfg.target_n)
            .contains(&self.cfg.node)
    }

    /// [`View::in_pref`] of the ring in force, read off its walks: every replica write asks,
    /// so this allocates nothing.
    fn in_force_pref(&self, partition: u32) -> bool {
        self.walks[partition as usize]
            .iter()
            .take(self.cfg.target_n)
            .any(|&n| n == self.cfg.node)
    }

    /// Whether this node replicates `partition` in the ring in force or the `pending` one.
    fn replicates(&self, pending: Option<&Ring>, partition: u32) -> bool {
        self.in_force_pref(partition) || pending.is_some_and(|p| self.in_pref(p, partition))
    }
}

impl Transfers {
    /// The pending ring and its epoch.
    pub(super) fn pending(&self) -> Option<&(u64, Ring)> {
        self.pending.as_ref()
    }

    /// Partitions waiting to be handed off and dropped.
    pub(super) fn handoff_count(&self) -> usize {
        self.handoffs.len()
    }

    /// Partitions being pulled and handed off.
    pub(super) fn in_progress(&self) -> (usize, usize) {
        (self.pulls.len(), self.handoffs.len())
    }

    /// Whether this node replicates `partition` in the ring in force or the pending one.
    pub(super) fn replicates(&self, v: &View<'_>, partition: u32) -> bool {
        v.replicates(self.pending.as_ref().map(|(_, r)| r), partition)
    }

    /// This core's partitions this node replicates.
    fn replicated(&self, v: &View<'_>) -> Vec<u32> {
        (0..v.ring.partition_count().get())
            .filter(|p| v.mine(*p) && self.replicates(v, *p))
            .collect()
    }

    /// The view changed to `v` and the pending ring set before it: pulls for the partitions
    /// the pending ring gives this node, handoffs for those of `before` (replicated under the
    /// old view) it no longer replicates.
    fn view_changed(&mut self, v: &View<'_>, o: &mut Outbox<'_>, now: u64, before: Vec<u32>) {
        let epoch = self.pending.as_ref().map(|(e, _)| *e);
        self.pulls.retain(|_, p| Some(p.epoch) == epoch);
        if let Some((epoch, next)) = self.pending.clone() {
            for p in 0..next.partition_count().get() {
                if !v.mine(p)
                    || v.in_force_pref(p)
                    || !v.in_pref(&next, p)
                    || self.done.contains(&(epoch, p))
                    || self.pulls.contains_key(&p)
                {
                    continue;
                }
                let me = v.cfg.node;
                let sources: Vec<NodeId> = v
                    .ring
                    .preference_list(PartitionId(p), v.cfg.target_n)
                    .into_iter()
                    .filter(|n| *n != me)
                    .collect();
                self.pulls.insert(
                    p,
                    Pull {
                        epoch,
                        sources,
                        attempt: 0,
                        cursor: None,
                        step: Step::Idle { at: now },
                    },
                );
            }
        }
        for p in before {
            if !self.replicates(v, p) {
                self.handoff_needed(now, p);
            }
        }
        // A partition this node stopped replicating lost its trees (anti-entropy keeps trees
        // only for partitions it replicates): a pass rebuilding them no longer can.
        let pending = self.pending.as_ref().map(|(_, r)| r);
        for (&p, h) in self.handoffs.iter_mut() {
            if !v.replicates(pending, p) {
                h.fill = false;
            }
        }
        self.round(v, o, now);
    }

    /// Partitions found in storage at start: those this node does not replicate are handed off.
    fn stored_partitions(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        partitions: impl IntoIterator<Item = u32>,
    ) {
        for p in partitions {
            if v.mine(p) && !self.replicates(v, p) {
                self.handoff_needed(now, p);
            }
        }
        self.round(v, o, now);
    }

    /// [`Core::stored_write`].
    fn stored_write(&mut self, v: &View<'_>, now: u64, key: &StoreKey) {
        if key.space != Space::Primary {
            return;
        }
        if !self.replicates(v, key.partition) {
            self.handoff_needed(now, key.partition);
        } else if let Some(h) = self.handoffs.get_mut(&key.partition) {
            h.writes += 1;
        }
    }

    /// Schedules (or repeats) the handoff of `partition`.
    pub(super) fn handoff_needed(&mut self, now: u64, partition: u32) {
        match self.handoffs.get_mut(&partition) {
            Some(h) => h.writes += 1,
            None => {
                self.handoffs.insert(
                    partition,
                    Handoff {
                        cursor: None,
                        step: Step::Idle { at: now },
                        writes: 0,
                        fill: false,
                    },
                );
            }
        }
    }

    /// Whether replica writes to `partition` must be refused: it is being dropped.
    pub(super) fn dropping(&self, partition: u32) -> bool {
        self.handoffs
            .get(&partition)
            .is_some_and(|h| matches!(h.step, Step::Dropping))
    }

    /// Whether a handoff of `partition` runs (its pass may be refilling the partition's trees
    /// from pages scanned before the latest writes).
    pub(super) fn handing_off(&self, partition: u32) -> bool {
        self.handoffs.contains_key(&partition)
    }

    /// The shell dropped `partition`: whether it was a handoff's drop.
    fn dropped(&mut self, partition: u32) -> bool {
        self.handoffs.remove(&partition).is_some()
    }

    /// Starts whatever transfer step is due. Called on view changes, ticks and answers.
    fn round(&mut self, v: &View<'_>, o: &mut Outbox<'_>, now: u64) {
        let pulls = due_now(steps(&self.pulls, |p| &p.step), PULLS_MAX, now);
        for p in pulls {
            self.ask_page(v, o, now, p);
        }
        let handoffs = due_now(steps(&self.handoffs, |h| &h.step), HANDOFFS_MAX, now);
        for p in handoffs {
            self.scan_for_handoff(v, o, p);
        }
    }

    /// When a transfer step is due next, if one waits and may start (a step waiting only for a
    /// free slot starts when a running one ends, not on a timer).
    pub(super) fn deadline(&self) -> Option<u64> {
        let pulls = next_due(steps(&self.pulls, |p| &p.step), PULLS_MAX);
        let handoffs = next_due(steps(&self.handoffs, |h| &h.step), HANDOFFS_MAX);
        pulls.into_iter().chain(handoffs).min()
    }

    fn ask_page(&mut self, v: &View<'_>, o: &mut Outbox<'_>, now: u64, partition: u32) {
        let id = o.id();
        let Some(pull) = self.pulls.get_mut(&partition) else {
            return;
        };
        if pull.sources.is_empty() {
            // Nobody holds the partition (a new ring whose old replicas are all removed).
            pull.step = Step::Applying {
                left: 0,
                failed: false,
                next: None,
            };
            self.pull_progress(v, o, now, partition);
            return;
        }
        let source = pull.sources[pull.attempt % pull.sources.len()];
        pull.step = Step::Asking;
        let after = pull.cursor.clone();
        o.pending.insert(id, Pending::Pull { partition });
        o.timeouts.insert((now + v.cfg.request_timeout_ms, id));
        o.send(
            source,
            PeerMsg::TransferPull {
                id,
                partition,
                after,
            },
        );
    }

    /// A pull failed or timed out: retry later, from the next source, at the same cursor.
    fn pull_failed(&mut self, v: &View<'_>, now: u64, partition: u32) {
        if let Some(pull) = self.pulls.get_mut(&partition) {
            pull.attempt += 1;
            pull.step = Step::Idle {
                at: now + v.cfg.hint_retry_ms,
            };
        }
    }

    /// A page arrived for the pull of `partition`: each key is merged by the core.
    fn pull_page(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        partition: u32,
        page: ScanPage,
    ) {
        let Some(pull) = self.pulls.get_mut(&partition) else {
            return;
        };
        pull.step = Step::Applying {
            left: page.items.len(),
            failed: false,
            next: page.next,
        };
        for item in page.items {
            let key = StoreKey {
                partition,
                space: Space::Primary,
                bucket: item.bucket,
                key: item.key,
            };
            o.stats.transferred_keys += 1;
            self.effects.push(TransferEffect::Merge {
                key,
                object: item.object,
            });
        }
        self.pull_progress(v, o, now, partition);
    }

    /// One merge of a pulled page finished (`ok`) or failed.
    fn applied(&mut self, v: &View<'_>, o: &mut Outbox<'_>, now: u64, partition: u32, ok: bool) {
        if let Some(pull) = self.pulls.get_mut(&partition) {
            pull.step.answered(ok);
        }
        self.pull_progress(v, o, now, partition);
    }

    fn pull_progress(&mut self, v: &View<'_>, o: &mut Outbox<'_>, now: u64, partition: u32) {
        let Some(pull) = self.pulls.get_mut(&partition) else {
            return;
        };
        let Step::Applying { left, failed, next } = &pull.step else {
            return;
        };
        if *left > 0 {
            return;
        }
        if *failed {
            pull.step = Step::Idle {
                at: now + v.cfg.hint_retry_ms,
            };
            return;
        }
        match next.clone() {
            Some(cursor) => {
                pull.cursor = Some(cursor);
                pull.step = Step::Idle { at: now };
                self.round(v, o, now);
            }
            None => {
                let epoch = pull.epoch;
                self.pulls.remove(&partition);
                self.done.insert((epoch, partition));
                o.stats.partitions_received += 1;
                o.out.push(Output::TransferDone { epoch, partition });
                self.round(v, o, now);
            }
        }
    }

    /// A peer asks for a page of `partition` after `after`.
    fn serve_pull(o: &mut Outbox<'_>, from: NodeId, id: u64, partition: u32, after: Option<Bytes>) {
        let sid = o.id();
        o.pending.insert(sid, Pending::ServeScan { to: from, id });
        o.out.push(Output::Scan {
            id: sid,
            partition,
            after,
            max_items: PAGE_ITEMS,
            max_bytes: PAGE_BYTES,
        });
    }

    fn scan_for_handoff(&mut self, v: &View<'_>, o: &mut Outbox<'_>, partition: u32) {
        let sid = o.id();
        let replicated = self.replicates(v, partition);
        let Some(h) = self.handoffs.get_mut(&partition) else {
            return;
        };
        if h.cursor.is_none() {
            h.writes = 0;
            // The ring came back to this node while it still held the partition: its trees
            // were created empty, so this pass rebuilds them from what it scans.
            h.fill = replicated;
            if replicated {
                self.effects.push(TransferEffect::ResetTrees(partition));
            }
        }
        let Some(h) = self.handoffs.get_mut(&partition) else {
            return;
        };
        h.step = Step::Asking;
        let after = h.cursor.clone();
        o.pending.insert(sid, Pending::HandoffScan { partition });
        o.out.push(Output::Scan {
            id: sid,
            partition,
            after,
            max_items: PAGE_ITEMS,
            max_bytes: PAGE_BYTES,
        });
    }

    /// A page scanned for the handoff of `partition`: pushes it to every current replica.
    /// `busy`: a per-key job holds a replica key of the partition.
    fn push_page(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        (partition, busy): (u32, bool),
        page: ScanPage,
    ) {
        let me = v.cfg.node;
        let targets: Vec<NodeId> = v
            .ring
            .preference_list(PartitionId(partition), v.cfg.target_n)
            .into_iter()
            .filter(|n| *n != me)
            .collect();
        let fill = self.handoffs.get(&partition).is_some_and(|h| h.fill);
        let mut left = 0;
        for item in &page.items {
            if fill {
                let key = StoreKey {
                    partition,
                    space: Space::Primary,
                    bucket: item.bucket.clone(),
                    key: item.key.clone(),
                };
                self.effects.push(TransferEffect::Fill {
                    key,
                    object: item.object.clone(),
                });
            }
            for to in &targets {
                let key = StoreKey {
                    partition,
                    space: Space::Primary,
                    bucket: item.bucket.clone(),
                    key: item.key.clone(),
                };
                let object = item.object.clone();
                let timeout = v.cfg.replica_timeout_ms;
                o.request(now, timeout, *to, Pending::HandoffPut { partition }, |id| {
                    PeerMsg::ReplicaPut {
                        id,
                        key,
                        object,
                        durable: true,
                    }
                });
                left += 1;
            }
        }
        o.stats.handed_off_keys += page.items.len() as u64;
        if let Some(h) = self.handoffs.get_mut(&partition) {
            h.step = Step::Applying {
                left,
                failed: false,
                next: page.next,
            };
        }
        self.handoff_progress(v, o, now, partition, busy);
    }

    /// One pushed key was acknowledged (`ok`) or failed.
    fn handoff_acked(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        (partition, busy): (u32, bool),
        ok: bool,
    ) {
        if let Some(h) = self.handoffs.get_mut(&partition) {
            h.step.answered(ok);
        }
        self.handoff_progress(v, o, now, partition, busy);
    }

    fn handoff_failed(&mut self, v: &View<'_>, now: u64, partition: u32) {
        if let Some(h) = self.handoffs.get_mut(&partition) {
            h.step = Step::Idle {
                at: now + v.cfg.hint_retry_ms,
            };
        }
    }

    fn handoff_progress(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        partition: u32,
        busy: bool,
    ) {
        let replicated = self.replicates(v, partition);
        let Some(h) = self.handoffs.get_mut(&partition) else {
            return;
        };
        let Step::Applying { left, failed, next } = &h.step else {
            return;
        };
        if *left > 0 {
            return;
        }
        if *failed {
            self.handoff_failed(v, now, partition);
            return;
        }
        match next.clone() {
            Some(cursor) => {
                h.cursor = Some(cursor);
                h.step = Step::Idle { at: now };
            }
            None if h.writes > 0 => {
                // Writes landed during the pass: they may be behind the cursor. Again.
                h.cursor = None;
                h.step = Step::Idle { at: now };
            }
            None if busy => {
                // A write is still landing: look again shortly, from the start.
                h.cursor = None;
                h.step = Step::Idle {
                    at: now + RECHECK_MS,
                };
            }
            None if replicated && h.fill => {
                // The ring came back to this node, and this pass, which no write overtook,
                // rebuilt the partition's trees: keep the data.
                self.handoffs.remove(&partition);
            }
            None if replicated => {
                // The ring came back to this node meanwhile: one more pass, from the start,
                // rebuilds the trees before the data is kept.
                h.cursor = None;
                h.step = Step::Idle { at: now };
            }
            None => {
                h.step = Step::Dropping;
                o.out.push(Output::DropPartition { partition });
            }
        }
        self.round(v, o, now);
    }

    /// Best-effort copies of a coordinated write to the replicas the pending ring adds.
    #[allow(clippy::too_many_arguments)] // A write's parts, as the coordinator holds them.
    fn send_to_pending(
        &self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        key: StoreKey,
        homes: &[NodeId],
        object: &Object,
        durable: bool,
    ) {
        let Some((_, next)) = &self.pending else {
            return;
        };
        let extra: Vec<NodeId> = next
            .preference_list(PartitionId(key.partition), homes.len())
            .into_iter()
            .filter(|n| !homes.contains(n) && *n != v.cfg.node)
            .collect();
        for to in extra {
            o.stats.pending_copies += 1;
            let timeout = v.cfg.replica_timeout_ms;
            o.request(now, timeout, to, Pending::Repair { node: to }, |id| {
                PeerMsg::ReplicaPut {
                    id,
                    key: key.clone(),
                    object: object.clone(),
                    durable,
                }
            });
        }
    }
}

impl Core {
    /// The transfers' state, with what they read and write of the core (`context.rs`).
    fn transfer_parts(&mut self) -> (&mut Transfers, View<'_>, Outbox<'_>) {
        let (v, o) = lend!(self);
        (&mut self.transfers, v, o)
    }

    /// Carries out, in order, what the transfers queued.
    fn transfer_effects(&mut self, now: u64) {
        for effect in std::mem::take(&mut self.transfers.effects) {
            match effect {
                TransferEffect::Merge { key, object } => {
                    let partition = key.partition;
                    self.lock(
                        now,
                        key,
                        JobKind::Apply {
                            object,
                            durable: true,
                            then: ReplyTo::Transfer { partition },
                        },
                    );
                }
                TransferEffect::ResetTrees(partition) => self.ae_reset_partition(partition),
                TransferEffect::Fill { key, object } => self.ae_stored(now, &key, Some(&object)),
            }
        }
    }

    /// Whether a per-key job holds a replica key of `partition`: a write may still land there.
    fn writing_in(&self, partition: u32) -> bool {
        self.locks
            .keys()
            .any(|k| k.partition == partition && k.space == Space::Primary)
    }

    /// Whether this node replicates `partition` in the ring in force or the pending one.
    pub(super) fn replicates(&self, partition: u32) -> bool {
        self.transfers.replicates(&self.view(), partition)
    }

    /// The ring in force and the pending ring (with the epoch membership gave it) changed.
    pub fn set_view(&mut self, now: u64, ring: Ring, pending: Option<(u64, Ring)>) -> Vec<Output> {
        let before = {
            let (t, v, _) = self.transfer_parts();
            t.replicated(&v)
        };
        // The pending ring first: `set_ring` recomputes the trees kept, and a partition this
        // node replicates only in the new pending ring must not lose its tree (and be given an
        // empty one) on the way.
        self.transfers.pending = pending;
        if ring != self.ring {
            self.set_ring(ring);
        }
        // Anti-entropy keeps trees for the pending ring's partitions too.
        self.ae_set_ring();
        let (t, v, mut o) = self.transfer_parts();
        t.view_changed(&v, &mut o, now, before);
        self.transfer_effects(now);
        self.take_output()
    }

    /// Partitions found in storage at start: those this node does not replicate are handed off.
    pub fn set_stored_partitions(
        &mut self,
        now: u64,
        partitions: impl IntoIterator<Item = u32>,
    ) -> Vec<Output> {
        let (t, v, mut o) = self.transfer_parts();
        t.stored_partitions(&v, &mut o, now, partitions);
        self.transfer_effects(now);
        self.take_output()
    }

    /// A write to `key` was stored: if this node does not replicate its partition (a coordinator
    /// or an op with an older ring wrote it), the partition is handed off (again). A handoff
    /// pass that runs while the partition is replicated again is repeated too: it is rebuilding
    /// the partition's tree from what it scans, which a write behind it may have changed.
    pub(super) fn stored_write(&mut self, now: u64, key: &StoreKey) {
        let (t, v, _) = self.transfer_parts();
        t.stored_write(&v, now, key);
    }

    /// Schedules (or repeats) the handoff of `partition`.
    pub(super) fn handoff_needed(&mut self, now: u64, partition: u32) {
        self.transfers.handoff_needed(now, partition);
    }

    /// Whether replica writes to `partition` must be refused: it is being dropped.
    pub(super) fn dropping(&self, partition: u32) -> bool {
        self.transfers.dropping(partition)
    }

    /// The shell dropped `partition` ([`Output::DropPartition`]).
    pub fn partition_dropped(&mut self, now: u64, partition: u32) -> Vec<Output> {
        if self.transfers.dropped(partition) {
            self.stats.partitions_dropped += 1;
            // Dots this node issued for the dropped keys are gone from its store: continuing
            // their actors could reissue them, so every key starts a fresh clock entry.
            if let Some(epoch) = self.fresh_epoch() {
                self.epochs.primary = epoch;
                self.floor = epoch;
            }
        }
        self.transfer_round(now);
        self.take_output()
    }

    /// Starts whatever transfer step is due.
    pub(super) fn transfer_round(&mut self, now: u64) {
        let (t, v, mut o) = self.transfer_parts();
        t.round(&v, &mut o, now);
        self.transfer_effects(now);
    }

    /// When a transfer step is due next.
    pub(super) fn transfer_deadline(&self) -> Option<u64> {
        self.transfers.deadline()
    }

    /// A pull failed or timed out.
    pub(super) fn pull_failed(&mut self, now: u64, partition: u32) {
        let (t, v, _) = self.transfer_parts();
        t.pull_failed(&v, now, partition);
    }

    /// A page arrived for the pull of `partition`.
    pub(super) fn pull_page(&mut self, now: u64, partition: u32, page: ScanPage) {
        let (t, v, mut o) = self.transfer_parts();
        t.pull_page(&v, &mut o, now, partition, page);
        self.transfer_effects(now);
    }

    /// One merge of a pulled page finished (`ok`) or failed.
    pub(super) fn transfer_applied(&mut self, now: u64, partition: u32, ok: bool) {
        let (t, v, mut o) = self.transfer_parts();
        t.applied(&v, &mut o, now, partition, ok);
        self.transfer_effects(now);
    }

    /// A peer asks for a page of `partition` after `after`.
    pub(super) fn serve_pull(
        &mut self,
        from: NodeId,
        id: u64,
        partition: u32,
        after: Option<Bytes>,
    ) {
        let (_, _, mut o) = self.transfer_parts();
        Transfers::serve_pull(&mut o, from, id, partition, after);
    }

    /// The result of [`Output::Scan`] `id`.
    pub fn handle_scanned(
        &mut self,
        now: u64,
        id: u64,
        result: Result<ScanPage, String>,
    ) -> Vec<Output> {
        match self.pending.remove(&id) {
            Some(Pending::ServeScan { to, id }) => {
                let msg = match result {
                    Ok(page) => PeerMsg::TransferPage { id, page },
                    Err(e) => PeerMsg::Failed {
                        id,
                        error: ErrorBody::new(ErrorCode::Internal, e),
                    },
                };
                self.out.push(Output::Answer { to, msg });
            }
            Some(Pending::HandoffScan { partition }) => {
                let busy = self.writing_in(partition);
                let (t, v, mut o) = self.transfer_parts();
                match result {
                    Ok(page) => t.push_page(&v, &mut o, now, (partition, busy), page),
                    Err(_) => t.handoff_failed(&v, now, partition),
                }
                self.transfer_effects(now);
            }
            Some(other) => {
                self.pending.insert(id, other);
            }
            None => {}
        }
        self.take_output()
    }

    /// One pushed key was acknowledged (`ok`) or failed.
    pub(super) fn handoff_acked(&mut self, now: u64, partition: u32, ok: bool) {
        let busy = self.writing_in(partition);
        let (t, v, mut o) = self.transfer_parts();
        t.handoff_acked(&v, &mut o, now, (partition, busy), ok);
        self.transfer_effects(now);
    }

    /// Best-effort copies of a coordinated write to the replicas the pending ring adds.
    pub(super) fn send_to_pending(
        &mut self,
        now: u64,
        key: StoreKey,
        homes: &[NodeId],
        object: &Object,
        durable: bool,
    ) {
        let (t, v, mut o) = self.transfer_parts();
        t.send_to_pending(&v, &mut o, now, key, homes, object, durable);
    }

    /// Partitions being pulled or handed off (for status and tests).
    pub fn transfers_in_progress(&self) -> (usize, usize) {
        self.transfers.in_progress()
    }
}
