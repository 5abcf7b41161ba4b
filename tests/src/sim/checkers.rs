//! The checkers: acknowledgements against the stores, hint credit, reads against what
//! their writes saw, convergence of trees and stores, and the final state.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_core::NodeId;
use ringkv_core::coordinator::{Core, EpochLease, Space, StoreKey};
use ringkv_core::object::Object;
use ringkv_core::ring::{PartitionId, Ring};
use ringkv_net::Sibling;

use super::workload::{WriteRecord, decode_set, key_bytes};
use super::{CONVERGE_MS_MAX, LEASE_EPOCHS, LWW_BUCKET, SIBLINGS_BUCKET, Sim, node_index};

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
        // Values a delete superseded: what its read returned, and what those writes saw. Only
        // a delete that was acknowledged, or provably applied (a store took an object that
        // supersedes the value), excuses a value's absence: a failed or unanswered delete that
        // reached no store must not hide a lost write.
        let mut deleted: BTreeMap<usize, BTreeSet<Bytes>> = BTreeMap::new();
        for d in &self.deletes {
            let set = deleted.entry(d.key).or_default();
            for v in &d.saw {
                if d.acked || self.ever_superseded(v) {
                    set.insert(v.clone());
                    set.extend(self.seen_by(v));
                }
            }
        }
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
