//! The checkers: acknowledgements against the stores, hint credit, reads against what
//! their writes saw, convergence of trees and stores, and the final state.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_core::NodeId;
use ringkv_core::coordinator::{Core, EpochLease, Space, StoreKey};
use ringkv_core::crdt::Crdt;
use ringkv_core::object::Object;
use ringkv_core::ring::{PartitionId, Ring};
use ringkv_net::{CrdtValue, Sibling};

use super::workload::{
    Coordinated, CrdtKind, CrdtRecord, DeleteRecord, WriteRecord, decode_set, key_bytes,
};
use super::{
    CONVERGE_MS_MAX, COUNTERS_BUCKET, LEASE_EPOCHS, LWW_BUCKET, SETS_BUCKET, SIBLINGS_BUCKET, Sim,
    node_index,
};

impl Sim {
    /// Every core's trees describe its storage: a core built from the node's store has the same
    /// roots and key counts.
    pub(super) fn check_trees(&mut self) {
        for n in self.serving() {
            let id = self.nodes[n].id;
            let ring = self.nodes[n].core.as_ref().expect("up").ring().clone();
            let mut fresh = Core::new(
                self.config(id),
                ring,
                EpochLease::new(1, LEASE_EPOCHS),
                Vec::<(StoreKey, u64)>::new(),
            );
            let store = &self.nodes[n].store;
            for key in store.keys() {
                if key.space == Space::Primary
                    && let Some(object) = store.read(&key)
                {
                    fresh.load_replica(0, &key, &object);
                }
            }
            let live = self.nodes[n].core.as_mut().expect("up").merkle_roots();
            assert_eq!(
                fresh.merkle_roots(),
                live,
                "node {id}'s trees do not describe its storage"
            );
        }
    }

    /// Every tree of every node, by (partition, n): each home's root.
    pub(super) fn roots(&mut self) -> BTreeMap<(u32, u8), BTreeMap<NodeId, u64>> {
        let mut all: BTreeMap<(u32, u8), BTreeMap<NodeId, u64>> = BTreeMap::new();
        for node in self.nodes.iter_mut().filter(|n| !n.retired) {
            let id = node.id;
            let core = node
                .core
                .as_mut()
                .expect("every node is up after the faults");
            for t in core.merkle_roots() {
                all.entry((t.partition, t.n))
                    .or_default()
                    .insert(id, t.root);
            }
        }
        all
    }

    /// The trees whose replicas' roots differ.
    pub(super) fn diverged(&mut self) -> Vec<(u32, u8)> {
        let ring = self.final_ring();
        let roots = self.roots();
        let mut out = Vec::new();
        for (&(p, n), by_node) in &roots {
            let homes =
                ring.preference_list(PartitionId(p), usize::from(n).min(ring.members().len()));
            assert_eq!(
                homes.iter().copied().collect::<BTreeSet<_>>(),
                by_node.keys().copied().collect::<BTreeSet<_>>(),
                "tree ({p}, {n}) is kept by exactly its homes"
            );
            if by_node.values().collect::<BTreeSet<_>>().len() > 1 {
                out.push((p, n));
            }
        }
        out
    }

    /// Steps until every replica set's trees are equal; panics past [`CONVERGE_MS_MAX`], and
    /// if the homes' stores then differ (once no store operation is in flight).
    pub(super) fn converge(&mut self, when: &str) {
        let end = self.now + CONVERGE_MS_MAX;
        let mut next_check = self.now;
        loop {
            if self.now >= next_check {
                next_check = self.now + 250;
                // Equal roots are judged on the stores too, once no store operation is in
                // flight (a tree follows a write when it is issued): equal trees over
                // differing stores would be repaired later by the final reads, unseen. Trees
                // still loading are empty, and agree when every node restarted at once (a power
                // loss just before the heal): they are judged once loaded.
                let loading = self
                    .nodes
                    .iter()
                    .any(|n| n.core.as_ref().is_some_and(|c| c.trees_loading_count() > 0));
                if !loading && self.diverged().is_empty() && !self.store_ops_pending() {
                    let ring = self.final_ring();
                    let differ = self.homes_differ(&ring);
                    assert!(
                        differ.is_empty(),
                        "replica trees agree {when} but the stores differ: {differ:?}"
                    );
                    return;
                }
            }
            assert!(
                self.now < end,
                "replica trees still differ {CONVERGE_MS_MAX} ms {when}: {:?}",
                self.diverged()
            );
            if !self.step() {
                panic!("the simulation ran out of events {when}");
            }
        }
    }

    /// An acknowledged replica write is stored: what node `n` holds for the key (durably, if it
    /// said so) already contains the object it was sent.
    pub(super) fn check_ack(&mut self, n: usize, requester: usize, id: u64, durable: bool) {
        let Some((key, object)) = self.puts.remove(&(n, requester, id)) else {
            return;
        };
        let store = &self.nodes[n].store;
        let held = if durable {
            store.read_durable(&key)
        } else {
            store.read(&key)
        };
        let contains = held
            .as_ref()
            .is_some_and(|h| h.clone().merge(object.clone()) == *h);
        assert!(
            contains,
            "node {} acknowledged a replica write of {key:?} (durable: {durable}) it does not hold",
            n + 1
        );
    }

    /// Hint credit (module docs): every window of node `n` uses a grant its home sent, and has
    /// no more hints in flight than that grant.
    pub(super) fn check_credit(&self, n: usize) {
        let node = &self.nodes[n];
        let Some(core) = node.core.as_ref() else {
            return;
        };
        let mut in_flight = 0;
        for w in core.hint_windows() {
            let sent = self.grants.get(&(n, node.incarnation, w.grant_id));
            assert_eq!(
                sent,
                Some(&w.granted),
                "node {} uses a grant of {} from {} that the home did not send ({sent:?})",
                n + 1,
                w.granted,
                w.home
            );
            assert!(
                w.in_flight <= w.granted,
                "node {} has {} hints in flight to {}, above the {} granted",
                n + 1,
                w.in_flight,
                w.home,
                w.granted
            );
            in_flight += w.in_flight as usize;
        }
        assert_eq!(
            in_flight,
            core.hints_in_flight(),
            "node {}: every hint in flight belongs to a window",
            n + 1
        );
    }

    /// Checks a read's siblings (none saw another; lww has one) and returns their values.
    pub(super) fn check_read(&mut self, bucket: &[u8], siblings: &[Sibling]) -> Vec<Bytes> {
        let values: Vec<Bytes> = siblings
            .iter()
            .filter_map(|s| match s {
                Sibling::Value(v) => Some(v.clone()),
                Sibling::Tombstone => None,
            })
            .collect();
        if bucket == LWW_BUCKET {
            assert!(
                siblings.len() <= 1,
                "an lww read returned {} siblings",
                siblings.len()
            );
        }
        if values.len() > 1 {
            self.sibling_reads += 1;
        }
        for a in &values {
            let seen = self.seen_by(a);
            for b in &values {
                assert!(
                    a == b || !seen.contains(b),
                    "siblings {a:?} and {b:?} are not concurrent: the write of the first saw \
                     the second"
                );
            }
        }
        values
    }

    /// Every value the write of `value` saw, transitively.
    pub(super) fn seen_by(&self, value: &Bytes) -> BTreeSet<Bytes> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![value.clone()];
        while let Some(v) = todo.pop() {
            let Some(id) = self.by_value.get(&v) else {
                continue;
            };
            for s in &self.writes[id].saw {
                if seen.insert(s.clone()) {
                    todo.push(s.clone());
                }
            }
        }
        seen
    }

    pub(super) fn check_final(&self) {
        for n in &self.nodes {
            let stored: Vec<StoreKey> = n
                .store
                .keys()
                .into_iter()
                .filter(|k| matches!(k.space, Space::Hint(_)))
                .collect();
            assert!(
                stored.is_empty(),
                "node {} still stores hints: {stored:?}",
                n.id
            );
            if n.retired {
                // It handed everything off before it stopped.
                let kept = n.store.keys();
                assert!(
                    kept.is_empty(),
                    "node {} retired still holding {kept:?}",
                    n.id
                );
                continue;
            }
            let core = n.core.as_ref().expect("every node is up at the end");
            let hints: Vec<_> = core.hints().collect();
            assert!(
                hints.is_empty(),
                "node {} still holds hints ({} in flight): {hints:?}",
                n.id,
                core.hints_in_flight()
            );
        }
        let deleted = excused_by_deletes(
            &self.deletes,
            |v| self.ever_superseded(v),
            |v| self.seen_by(v),
        );
        // A deleted value never comes back: no final sibling is a value an acknowledged delete
        // superseded (tombstone reaping must not let an older copy return).
        for d in self.deletes.iter().filter(|d| d.acked) {
            let Some(Ok((values, _))) = self.final_reads.get(&(SIBLINGS_BUCKET.to_vec(), d.key))
            else {
                panic!("final read of k{} failed", d.key);
            };
            for v in values {
                let superseded =
                    d.saw.contains(v) || d.saw.iter().any(|s| self.seen_by(s).contains(v));
                // A `dw = 0` delete whose every tombstone a crash erased unsynced is lost.
                if superseded && self.unsuperseded_unsynced(v, d.dw) {
                    self.lost_unsynced.set(self.lost_unsynced.get() + 1);
                    continue;
                }
                assert!(
                    !superseded,
                    "deleted value {v:?} of k{} came back: final siblings {values:?}",
                    d.key
                );
            }
        }
        // Every acknowledged write survives, or was seen by a surviving write, or was
        // superseded by a delete; or it asked for `dw = 0` and crashes lost every copy before
        // one was synced (the durability checker).
        for w in self.writes.values().filter(|w| w.acked) {
            let Some(Ok((values, _))) = self.final_reads.get(&(w.bucket.to_vec(), w.key)) else {
                panic!(
                    "final read of {}/k{} failed: {:?}",
                    String::from_utf8_lossy(w.bucket),
                    w.key,
                    self.final_reads.get(&(w.bucket.to_vec(), w.key))
                );
            };
            if w.bucket == LWW_BUCKET {
                if let Some(violation) = self.lww_violation(w, values) {
                    assert!(self.lost_unsynced(&w.value, w.dw), "{violation}");
                    self.lost_unsynced.set(self.lost_unsynced.get() + 1);
                }
                continue;
            }
            let present = values.contains(&w.value)
                || values.iter().any(|f| self.seen_by(f).contains(&w.value))
                || deleted.get(&w.key).is_some_and(|d| d.contains(&w.value));
            if !present && self.lost_unsynced(&w.value, w.dw) {
                self.lost_unsynced.set(self.lost_unsynced.get() + 1);
                continue;
            }
            assert!(
                present,
                "acknowledged write {:?} to k{} is lost: final siblings {:?}",
                w.value, w.key, values
            );
            if let Some(element) = &w.element {
                let union: BTreeSet<String> = values.iter().flat_map(decode_set).collect();
                assert!(
                    union.contains(element),
                    "acknowledged set element {element} is lost"
                );
            }
        }
        // Every node has the final ring, and no node keeps replica data it does not replicate.
        let ring = self.final_ring();
        for n in self.nodes.iter().filter(|n| !n.retired) {
            let core = n.core.as_ref().expect("every node is up at the end");
            assert_eq!(core.ring(), &ring, "{} runs an older ring", n.id);
            for key in n.store.keys() {
                if key.space == Space::Primary {
                    let homes = ring.preference_list(PartitionId(key.partition), 3);
                    assert!(
                        homes.contains(&n.id),
                        "{} still holds {key:?} of a partition it does not replicate",
                        n.id
                    );
                }
            }
        }
        // Home replicas converged, and each home holds something for a key with an
        // acknowledged write that the final read found.
        for (bucket, k) in self.all_keys() {
            let written = self
                .writes
                .values()
                .any(|w| w.bucket == bucket && w.key == k && w.acked);
            let read_values = self
                .final_reads
                .get(&(bucket.to_vec(), k))
                .is_some_and(|r| r.as_ref().is_ok_and(|(v, _)| !v.is_empty()));
            if written && read_values {
                let (home, object) = self.home_objects(&ring, bucket, k).swap_remove(0);
                assert!(object.is_some(), "home {home} has nothing for k{k}");
            }
        }
        let differ = self.homes_differ(&ring);
        assert!(differ.is_empty(), "home replicas differ: {differ:?}");
    }

    /// Why the final value of an lww key breaks last-write-wins for the acknowledged write `w`,
    /// if it does. Last-write-wins loses concurrent writes by design, but never to a write with a
    /// lower stamp (whether or not that one was acknowledged), and never to one that was
    /// acknowledged before it started (all nodes share the virtual clock).
    fn lww_violation(&self, w: &WriteRecord, values: &[Bytes]) -> Option<String> {
        if values.len() != 1 {
            return Some(format!(
                "an lww key lost every write: {:?} is not in {values:?}",
                w.value
            ));
        }
        let stamps = |v: &Bytes| {
            self.lww_stamps
                .get(v)
                .expect("a stored lww value has the stamps it was stored with")
        };
        let (lost, won) = (stamps(&w.value), stamps(&values[0]));
        if won.last() < lost.first() {
            return Some(format!(
                "lww write {:?} (stamps {lost:?}) lost to {:?} (stamps {won:?})",
                w.value, values[0],
            ));
        }
        let winner = self
            .by_value
            .get(&values[0])
            .map(|id| &self.writes[id])
            .expect("the final lww value was written by a client");
        match winner.acked_at {
            Some(acked_at) if w.started_at > acked_at => Some(format!(
                "lww write {:?} started after {:?} was acknowledged, yet lost to it",
                w.value, winner.value
            )),
            _ => None,
        }
    }

    /// What each home of `bucket`/`k` in `ring` stores for it, first home first.
    pub(super) fn home_objects(
        &self,
        ring: &Ring,
        bucket: &'static [u8],
        k: usize,
    ) -> Vec<(NodeId, Option<Object>)> {
        let key = key_bytes(k);
        let partition = ring.partition_of(bucket, &key);
        let store_key = StoreKey {
            partition: partition.0,
            space: Space::Primary,
            bucket: Bytes::from_static(bucket),
            key,
        };
        ring.preference_list(partition, 3)
            .into_iter()
            .map(|h| (h, self.nodes[node_index(h)].store.read(&store_key)))
            .collect()
    }

    /// The keys whose homes in `ring` store different objects, with what each home holds.
    pub(super) fn homes_differ(&self, ring: &Ring) -> Vec<String> {
        let mut out = Vec::new();
        for (bucket, k) in self.all_keys() {
            let objects = self.home_objects(ring, bucket, k);
            if objects.iter().any(|(_, o)| o != &objects[0].1) {
                out.push(format!(
                    "{}/k{k}: {objects:?}",
                    String::from_utf8_lossy(bucket)
                ));
            }
        }
        out
    }

    /// No script step left, no pending ring, every node up with the same membership state.
    pub(super) fn membership_settled(&self) -> bool {
        if !self.script.is_empty() {
            return false;
        }
        let mut states = self
            .nodes
            .iter()
            .filter(|n| !n.retired)
            .map(|n| n.membership.as_ref().map(|m| m.state()));
        let Some(Some(first)) = states.next() else {
            return false;
        };
        first.pending.is_none() && states.all(|s| s == Some(first))
    }

    pub(super) fn final_ring(&self) -> Ring {
        self.nodes[self.serving()[0]]
            .membership
            .as_ref()
            .expect("every node is up at the end")
            .state()
            .ring
            .clone()
    }
}

/// What the convergent checks counted (see [`Sim::check_convergent`]).
pub(super) struct ConvergentTally {
    /// How much the final counters exceed the increments their logs name, summed over keys.
    pub(super) double_counted: i64,
    /// Acknowledged removes whose coordinator held the add: held to staying removed.
    pub(super) removes_checked: usize,
    /// Acknowledged removes whose coordinator had not received the add: the add may win, so
    /// nothing is required of them.
    pub(super) removes_unseen: usize,
    /// Acknowledged operations missing from the final state as `dw = 0` allows.
    pub(super) lost_unsynced: usize,
}

impl Sim {
    /// A node sent a replica write of convergent state `state` under `key`. The first replica
    /// write naming a remove's operation id is the state the remove's coordinator made: its
    /// coordinator sends it to the other replicas as soon as its own write is done (or at once,
    /// with no home to write locally), before any other node can have read a state naming the
    /// remove. Records whether that state holds the remove's add, i.e. whether the coordinator
    /// had received the add when it applied the remove, and whether it still holds the element.
    ///
    /// Judged only for acknowledged removes (`check_convergent`): an acknowledgement needs a
    /// second replica, which only the remove's own replica write reaches. A remove that failed
    /// may have sent none, and then the first write naming it can be that of a later operation
    /// coordinated in the same batch, over an add merged in after the remove.
    pub(super) fn note_coordinated(&mut self, key: &StoreKey, state: &Crdt) {
        if key.bucket != SETS_BUCKET {
            return;
        }
        let made: Vec<usize> = self
            .removes_pending
            .iter()
            .copied()
            .filter(|&r| {
                let remove = &self.crdt_ops[r];
                key_bytes(remove.key) == key.key && state.saw_op(remove.op_id)
            })
            .collect();
        for r in made {
            self.removes_pending.remove(&r);
            let CrdtKind::Remove { element, add } = &self.crdt_ops[r].kind else {
                unreachable!("only removes are pending")
            };
            let held = state.saw_op(self.crdt_ops[*add].op_id);
            let left_in = matches!(
                state.value(self.now),
                Some(CrdtValue::Set(elements)) if elements.iter().any(|e| e == element.as_bytes())
            );
            self.crdt_ops[r].coordinated = Some(Coordinated {
                held_add: held,
                left_in,
                state: state.clone(),
            });
        }
    }

    /// Retried increment `op` reached node `n`, which coordinates it. If `n` is one of the key's
    /// homes (in its own ring) and its replica already names the operation, the coordinator will
    /// find the first attempt in the state it reads (which only grows until then) and must
    /// acknowledge the retry without applying it again (`crdt.rs`, retries): the final counter
    /// may not count this one twice. A coordinator outside the homes has no replica to look in.
    pub(super) fn note_retry_coordinator(&mut self, n: usize, op: usize) {
        let Some(core) = self.nodes[n].core.as_ref() else {
            return;
        };
        let record = &self.crdt_ops[op];
        let ring = core.ring();
        let key = key_bytes(record.key);
        let partition = ring.partition_of(record.bucket, &key);
        if !ring
            .preference_list(partition, 3)
            .contains(&self.nodes[n].id)
        {
            return;
        }
        let replica = StoreKey {
            partition: partition.0,
            space: Space::Primary,
            bucket: Bytes::from_static(record.bucket),
            key,
        };
        let held = matches!(
            self.nodes[n].store.read(&replica),
            Some(Object::Crdt(state)) if state.saw_op(record.op_id)
        );
        if held {
            self.crdt_ops[op].retry_must_dedup = true;
        }
    }

    /// The final checks of the convergent types (module docs), once `check_final` found the
    /// homes of every key holding identical objects:
    ///
    /// - every home holds a convergent state (or nothing) for a counter or set key, and the
    ///   final `r = n` read returned that state's value;
    /// - every acknowledged operation is in the final state (its operation log names it),
    ///   unless it was lost as `dw = 0` allows (the durability checker's records);
    /// - counters: no acknowledged increment is lost and nothing is counted that was never sent:
    ///   `acknowledged ≤ value ≤ sent + retried`; and, sharper, the value counts exactly the
    ///   increments the state's log names, each once or (retried) twice;
    /// - sets: every element present was added to the key; every acknowledged add is present
    ///   unless a remove of its element was sent (or `dw = 0` lost it); an acknowledged remove
    ///   whose coordinator held the add (`note_coordinated`) keeps the element out.
    pub(super) fn check_convergent(&self) -> ConvergentTally {
        let ring = self.final_ring();
        let mut tally = ConvergentTally {
            double_counted: 0,
            removes_checked: 0,
            removes_unseen: 0,
            lost_unsynced: 0,
        };
        let keys = self
            .all_keys()
            .into_iter()
            .filter(|(b, _)| [COUNTERS_BUCKET, SETS_BUCKET].contains(b));
        for (bucket, k) in keys {
            let what = format!("{}/k{k}", String::from_utf8_lossy(bucket));
            let ops: Vec<&CrdtRecord> = self
                .crdt_ops
                .iter()
                .filter(|o| o.bucket == bucket && o.key == k)
                .collect();
            let homes = self.home_objects(&ring, bucket, k);
            for (home, object) in &homes {
                assert!(
                    matches!(object, None | Some(Object::Crdt(_))),
                    "{what}: home {home} holds {object:?}, not a convergent state"
                );
            }
            let state = match &homes[0].1 {
                Some(Object::Crdt(state)) => Some(state),
                _ => None,
            };
            let value = state.and_then(|s| s.value(self.now));
            let read = self.final_crdt.get(&(bucket.to_vec(), k));
            assert_eq!(
                read,
                Some(&value),
                "{what}: the final read returned {read:?}, the homes hold {value:?}"
            );
            let names = |o: &CrdtRecord| state.is_some_and(|s| s.saw_op(o.op_id));
            let lost = |o: &CrdtRecord| self.lost_unsynced(&o.name, o.dw);
            // A set key that became empty is reaped by anti-entropy like a tombstone, and its
            // operation log goes with it: there only the value checks below apply.
            let reaped = self
                .crdt_reaped
                .contains(&(Bytes::from_static(bucket), key_bytes(k)));
            for o in ops.iter().filter(|o| o.acked && !names(o) && !reaped) {
                assert!(
                    lost(o),
                    "{what}: acknowledged {:?} (op id {}, dw = {}, {} attempts) is lost: the \
                     final state's operation log does not name it; the state reads {value:?}",
                    o.kind,
                    o.op_id,
                    o.dw,
                    o.attempts
                );
                self.lost_unsynced.set(self.lost_unsynced.get() + 1);
                tally.lost_unsynced += 1;
            }
            if bucket == COUNTERS_BUCKET {
                let value = match value {
                    None => 0,
                    Some(CrdtValue::Counter(v)) => v,
                    Some(other) => panic!("{what} holds {other:?}, not a counter"),
                };
                let amount = |o: &&CrdtRecord| match o.kind {
                    CrdtKind::Increment(by) => by,
                    _ => unreachable!("counter keys get increments only"),
                };
                let sum = |keep: &dyn Fn(&CrdtRecord) -> bool| -> i64 {
                    ops.iter().filter(|o| keep(o)).map(amount).sum()
                };
                let acked = sum(&|o| o.acked && !lost(o));
                let sent = sum(&|_| true);
                // A retry counts again when its coordinator had not received the first attempt
                // (`crdt.rs`, retries: a sloppy coordinator, or the first attempt's home down), so
                // a retried increment may legitimately count twice; not one whose coordinator's
                // replica held the first attempt (`note_retry_coordinator`).
                let twice = |o: &CrdtRecord| o.attempts > 1 && !o.retry_must_dedup;
                let retried = sum(&twice);
                let why = || {
                    let list: Vec<String> = ops
                        .iter()
                        .map(|o| {
                            format!(
                                "#{} {:?} acked={} attempts={} must_dedup={} named={} lost={}",
                                o.op_id,
                                o.kind,
                                o.acked,
                                o.attempts,
                                o.retry_must_dedup,
                                names(o),
                                lost(o)
                            )
                        })
                        .collect();
                    format!("increments: {}; state: {state:?}", list.join(", "))
                };
                assert!(
                    acked <= value,
                    "{what}: value {value} is below the {acked} its acknowledged increments add \
                     up to (an acknowledged increment was lost); {}",
                    why()
                );
                assert!(
                    value <= sent + retried,
                    "{what}: value {value} is above the {sent} sent (+{retried} for retries that \
                     may count twice): it counts what was never sent; {}",
                    why()
                );
                // Sharper, from the state's own log: it counts every increment the log names,
                // once, or twice for a retried one that may count twice, and nothing else.
                let named = sum(&|o| names(o));
                let named_retried = sum(&|o| names(o) && twice(o));
                assert!(
                    named <= value && value <= named + named_retried,
                    "{what}: value {value}, but its log names increments adding up to {named} \
                     (+{named_retried} retried); {}",
                    why()
                );
                tally.double_counted += value - named;
                continue;
            }
            let elements: BTreeSet<Bytes> = match value {
                None => BTreeSet::new(),
                Some(CrdtValue::Set(elements)) => elements.into_iter().collect(),
                Some(other) => panic!("{what} holds {other:?}, not a set"),
            };
            let added = |e: &Bytes| {
                ops.iter()
                    .any(|o| matches!(&o.kind, CrdtKind::Add(a) if a.as_bytes() == e))
            };
            for e in &elements {
                assert!(
                    added(e),
                    "{what}: element {e:?} was never added to the key; final set {elements:?}"
                );
            }
            for o in ops.iter().filter(|o| o.acked) {
                match &o.kind {
                    CrdtKind::Add(e) => {
                        let removed = ops.iter().any(
                            |r| matches!(&r.kind, CrdtKind::Remove { element, .. } if element == e),
                        );
                        assert!(
                            removed || elements.contains(e.as_bytes()) || lost(o),
                            "{what}: acknowledged add of {e} (op id {}, dw = {}) is lost, and no \
                             remove of it was sent; final set {elements:?}",
                            o.op_id,
                            o.dw
                        );
                    }
                    // A remove removes what its coordinator had received (`crdt.rs`): under a
                    // sloppy quorum that coordinator may not have the add although the add was
                    // acknowledged before the remove was sent, and then the add wins. Only a
                    // remove whose coordinator provably held the add must keep the element out.
                    CrdtKind::Remove { element, add } => match &o.coordinated {
                        Some(made) if made.held_add => {
                            tally.removes_checked += 1;
                            assert!(
                                !made.left_in,
                                "{what}: the remove of {element} (op id {}) was applied over its \
                                 add (op id {}) and left the element in: {:?}",
                                o.op_id, self.crdt_ops[*add].op_id, made.state
                            );
                            assert!(
                                !elements.contains(element.as_bytes()) || lost(o),
                                "{what}: {element} came back: its remove (op id {}, dw = {}) was \
                                 acknowledged and its coordinator held the add (op id {}); \
                                 final set {elements:?}",
                                o.op_id,
                                o.dw,
                                self.crdt_ops[*add].op_id
                            );
                        }
                        Some(_) => tally.removes_unseen += 1,
                        // An acknowledgement needs a second replica, which only a replica write
                        // of the coordinator's state reaches.
                        None => panic!(
                            "{what}: the remove of {element} (op id {}) was acknowledged, yet no \
                             replica write of its coordinator's state was seen",
                            o.op_id
                        ),
                    },
                    CrdtKind::Increment(_) => unreachable!("set keys get adds and removes"),
                }
            }
        }
        tally
    }
}

/// Values whose absence a delete excuses, by key: what its read returned, and what those writes
/// saw. Only a delete that was acknowledged, or provably applied (`applied`: a store took an
/// object that supersedes the value), excuses a value: a failed or unanswered delete that
/// reached no store must not hide a lost write.
///
/// No bug of the node is known to make this rule matter on its own: a value leaves every
/// replica without a superseding object only through an erasure, which the acknowledgement
/// checker catches first when the delete was acknowledged. The rule is for the loss that
/// coincides with a failed delete, and its test below builds that history.
fn excused_by_deletes(
    deletes: &[DeleteRecord],
    applied: impl Fn(&Bytes) -> bool,
    seen_by: impl Fn(&Bytes) -> BTreeSet<Bytes>,
) -> BTreeMap<usize, BTreeSet<Bytes>> {
    let mut excused: BTreeMap<usize, BTreeSet<Bytes>> = BTreeMap::new();
    for d in deletes {
        let set = excused.entry(d.key).or_default();
        for v in d.saw.iter().filter(|v| d.acked || applied(v)) {
            set.insert(v.clone());
            set.extend(seen_by(v));
        }
    }
    excused
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delete(key: usize, saw: &[&'static str], acked: bool) -> DeleteRecord {
        DeleteRecord {
            key,
            saw: saw
                .iter()
                .map(|v| Bytes::from_static(v.as_bytes()))
                .collect(),
            acked,
            dw: 1,
        }
    }

    /// `b` was written having seen `a`.
    fn history(v: &Bytes) -> BTreeSet<Bytes> {
        if v.as_ref() == b"b" {
            BTreeSet::from([Bytes::from_static(b"a")])
        } else {
            BTreeSet::new()
        }
    }

    fn excused(deletes: &[DeleteRecord], applied: &[&str]) -> BTreeSet<(usize, Bytes)> {
        excused_by_deletes(
            deletes,
            |v| applied.iter().any(|a| a.as_bytes() == v),
            history,
        )
        .into_iter()
        .flat_map(|(k, vs)| vs.into_iter().map(move |v| (k, v)))
        .collect()
    }

    #[test]
    fn a_failed_delete_that_reached_no_store_excuses_nothing() {
        // A failed delete of k1 that read `b`, and no store ever took a tombstone over `b`:
        // were `b` (or `a`, which `b` saw) missing at the end, it is a lost write.
        assert!(excused(&[delete(1, &["b"], false)], &[]).is_empty());
    }

    /// A delete that was acknowledged, or that some store took, excuses the values it read
    /// and what they saw, and nothing else.
    #[test]
    fn an_acknowledged_or_applied_delete_excuses_what_it_read_and_what_that_saw() {
        let both = [(1, Bytes::from_static(b"a")), (1, Bytes::from_static(b"b"))];
        assert_eq!(
            excused(&[delete(1, &["b"], true)], &[]),
            BTreeSet::from(both.clone())
        );
        // Failed, yet a store took its tombstone: the delete may spread and is excused.
        assert_eq!(
            excused(&[delete(1, &["b"], false)], &["b"]),
            BTreeSet::from(both)
        );
        // Applied over one of two values read: only that one (and what it saw).
        assert_eq!(
            excused(&[delete(2, &["c", "d"], false)], &["d"]),
            BTreeSet::from([(2, Bytes::from_static(b"d"))])
        );
    }
}
