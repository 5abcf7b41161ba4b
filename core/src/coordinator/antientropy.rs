//! Merkle anti-entropy and tombstone reaping: the background repair of replicas that missed
//! writes, and the removal of deletions every replica holds (sans-IO, part of [`Core`]).
//!
//! # Trees
//!
//! A core keeps one [`MerkleTree`] per *(partition, n)* it is a home of: for every ring partition
//! `p` of its shard and every replica count `n` a bucket uses (capped at the member count), a tree
//! exists if this node is among the first `n` nodes of `p`'s walk. Buckets with different `n`
//! have different replica sets for the same partition, so their keys never share a tree: two
//! replicas of `(p, n)` hold exactly the same keys when they agree, whatever other buckets do.
//! Every write of a primary replica (a coordinated write, a replica merge, a read repair, a hint
//! delivered home, a reaped tombstone) updates the tree when its storage operation is issued,
//! under the key's job lock, so the tree is a function of what the replica stores. A restarted
//! shard rebuilds its trees from its storage while it already serves (below).
//!
//! An item is `xxh3(tree hash ‖ digest)` where the digest is [`Object::digest`] (xxh3 of the
//! canonical encoding: equal objects, equal digests). The *tree hash* of a key is its placement
//! hash ([`crate::ring::key_hash`]) rotated left by the partition bits. The placement hash's top
//! bits are the partition, so using it directly would put every key of a partition into the
//! same few leaves; after the rotation the top bits (which pick the leaf) are the hash's next,
//! uniformly spread bits.
//!
//! Beside the tree, the core keeps each key's digest and leaf in a hash table, so listing a
//! differing leaf costs no storage scan. The table is hashed, not ordered, because every replica
//! write looks its key up in it on the request path, while a listing is a background step of an
//! exchange: it walks the tree's table once and sorts what it takes. That costs about 120 bytes
//! plus the key's length per key, per replica; a tree costs about 37 KiB whatever its key count.
//!
//! # Building the trees at startup
//!
//! Nothing on disk describes the trees: the engine's index keeps a 15-bit value digest per key,
//! far too weak to stand for a version, so a restarted shard must read every stored object once.
//! That costs time proportional to the data, and a node that waited for it before serving would
//! make a rolling restart of a large store take hours (one random read per key, as the shard once
//! did before serving, took over a minute and a half per million keys). So the shard serves at
//! once and loads the trees in the background (the shell reads the objects in storage order,
//! with large sequential reads, `cluster/src/server/trees.rs`):
//!
//! 1. before serving, the shell calls [`Core::trees_loading`] with every partition it will load;
//!    their trees are *loading*;
//! 2. it reads the partitions' objects from storage, in the background, and hands each to
//!    [`Core::load_replica`], then calls [`Core::trees_loaded`] once a partition is read whole;
//! 3. anti-entropy leaves a loading partition alone: the core starts no exchange on its trees
//!    and refuses the exchange and reap messages of peers for them ([`PeerMsg::AeLevel`],
//!    [`PeerMsg::AeKeys`], [`PeerMsg::AeReap`]), so no exchange compares an incomplete tree, no
//!    key is sent or asked for because a tree lacks it, and no tombstone is confirmed from one.
//!
//! Writes do not wait for the load, so a load races them: the shell may read an object, a write
//! may then store a newer one (updating the tree under the key's lock, as always), and only then
//! may the older read reach the core. To keep the newer digest, the core remembers, per loading
//! partition, every key whose tree entry anything other than the load set since the load began
//! (writes, removals, a merge re-checking the tree); the load skips those keys, whose entries
//! are already what storage holds. The converse order needs nothing: a load that arrives first
//! is replaced by the later write. So once a partition is loaded its trees equal trees built
//! from storage with no writes running, which the simulator checks after every run. The
//! remembered keys are bounded by the partition's keys and dropped when its load ends.
//!
//! Alternatives left out: persisting the trees at a clean stop (still a full read after a
//! crash, and a validity check against the engine that is as hard as the problem); a strong
//! per-record digest kept by the engine in its hint files (a format change, and the trees also
//! need each tombstone's clock for reaping, so tombstones would still be read). Reading in the
//! background keeps one source of truth and makes the first request independent of the data
//! size; the time until anti-entropy resumes still grows with it (a few seconds per million
//! keys, docs/BENCHMARKS.md).
//!
//! # Exchanges
//!
//! Every `ae_interval_ms` a core starts one exchange, if none is running: the next of its trees in
//! round-robin order against the next other replica of that tree (rotating over the replicas from
//! one pass over the trees to the next), skipping a peer believed unreachable:
//!
//! 1. [`PeerMsg::AeLevel`] with the root; the peer answers with the nodes that differ
//!    ([`PeerMsg::AeLevelOk`]). The initiator descends one level per round trip, sending the
//!    children of at most [`LEVEL_PARENTS_MAX`] differing nodes, down to the leaves.
//! 2. [`PeerMsg::AeKeys`]: the initiator's keys and digests in the differing leaves (whole leaves,
//!    as many as fit in `ae_keys_max` keys, at least one). The peer sends back, as ordinary
//!    [`PeerMsg::ReplicaPut`]s, its objects for keys whose digest differs or that the initiator
//!    lacks, and answers with the keys it wants ([`PeerMsg::AeKeysOk`]); the initiator sends
//!    those. Each side merges what it receives through the replica-merge path (the per-key job
//!    lock, [`Object::merge`]), so both end with the causal merge and the trees converge. At most
//!    `ae_keys_max` objects go each way per exchange.
//!
//! Every message of an exchange times out after `replica_timeout_ms`; a timeout, an error answer
//! or a lost connection ends the exchange, and the next round starts afresh.
//!
//! # Pacing
//!
//! Anti-entropy is background work with fixed bounds: one exchange at a time per core, one
//! round-robin exchange started per `ae_interval_ms`, at most `ae_keys_max` keys listed and
//! repaired per direction per exchange. The interval is the single knob: the effective interval
//! is `ae_interval_ms` divided by the core's background share from admission control
//! ([`Core::set_background_share`], in `[0.01, 1]`), and [`Core::set_ae_interval_ms`] changes it
//! (0 pauses anti-entropy). The reads of objects an exchange sends are background storage work
//! ([`Core::is_background`]).
//!
//! The round-robin alone repairs a partition that missed a write only when its turn comes: one
//! tree per interval, so minutes on a node with a hundred trees per core. A core therefore also
//! keeps **suspect pairs**, a tree and a replica of it that may lack something this core stored:
//! the replica was believed down when a write of the tree was stored here, or a replica write to
//! it failed or timed out. Suspect pairs are exchanged first, one after another, [`SUSPECT_GAP_MS`]
//! apart (at most `ae_interval_ms`, stretched by the background share like the rounds), as soon
//! as the replica is believed up again; a pair stops being suspect when an exchange finds it
//! equal, and stays suspect when its exchange fails or repaired keys (a repair is capped at
//! `ae_keys_max`; the next exchange checks). So the time to repair what a fault left behind
//! follows the trees it touched, not the number of trees. The set holds at most one entry per
//! (tree, replica); pairs whose tree or replica a ring change took away are dropped.
//!
//! # Reaping tombstones
//!
//! A deletion is a tombstone that replicates like a value. A tombstone is removed (*reaped*) only
//! when all of these hold, so that deleted data never comes back:
//!
//! 1. an exchange just found the initiator's tree equal to a peer's;
//! 2. every replica of the tree, the initiator included, confirms ([`PeerMsg::AeReap`] /
//!    [`PeerMsg::AeReapOk`]) that it has held the same tombstone (same digest) for at least
//!    `tombstone_grace_ms`, and allows its reaping (rule 3). The grace period, counted on each
//!    replica from when it stored the tombstone, lets hints, read repairs and other in-flight
//!    copies of older versions arrive before the deletion leaves: an older version that arrives
//!    after the reap would come back. It must therefore exceed how long a fallback can hold a
//!    hint (or a message be in flight) after the home it is for got the tombstone;
//! 3. a replica allows a tombstone's reaping only if every entry of its own node in the
//!    tombstone's clock has an epoch below its **persisted epoch floor**;
//! 4. each replica then removes its copy under the key's lock only if the digest is still the
//!    confirmed one ([`PeerMsg::AeDrop`]); a write that arrived meanwhile keeps the key.
//!
//! Rule 3 answers the obligation in the coordinator's module docs (removing objects without a
//! tombstone must raise the floor for them). After a reap, a client may still hold a context from
//! before the deletion; a write at a home must never reissue a dot that context covers, or the
//! client's next write would supersede a value it never saw. A home coordinator continues only
//! actors of its own with an epoch at or above its floor, found in its replica, and otherwise
//! uses its primary epoch, which is at or above the floor. By rule 3 the reaped clock held no
//! entry of the node at or above the floor, and a context is covered by the clock of the
//! deletion it preceded (contexts come from reads of versions the tombstone superseded, and a
//! home's own dots are in its replica, which became that tombstone), so no context from before
//! the reap names an actor the node may still continue: every later dot is new. Entries from the
//! stale context that a later write merges into the key's clock carry epochs below the floor, so
//! they are never continued either. Non-home coordinators always take fresh epochs.
//!
//! To make rule 3 satisfiable, a core holding tombstones past their grace period that rule 3 is
//! the only thing keeping raises its floor: it takes a fresh epoch from its lease, makes it its
//! primary epoch and its floor, asks the shell to persist it ([`Output::PersistFloor`]), and
//! counts it as persisted once [`Core::handle_floor_persisted`] says so. It does so at most once
//! per `tombstone_grace_ms`. **Cost**: every key this node coordinates after a raise starts a new
//! clock entry (as after a crash in `buffered` durability), so a key's clock grows by at most one
//! entry per raise; with the limit of 256 entries per clock and no actor pruning, a key written
//! across more than about 250 raises is refused, so the grace period is also the pace of clock
//! growth (one day by default).
//!
//! `lww` tombstones carry no dots; rule 3 does not apply to them.
//!
//! # Limits
//!
//! A partition's trees take no part in anti-entropy until the startup load has read all of its
//! objects: replicas that missed writes while this node was down are repaired meanwhile only by
//! read repair and hinted handoff.
//!
//! Membership is static: a ring change keeps the trees of the partitions still homed here and
//! drops the others (partition transfer must raise floors, per the coordinator's obligation).
//! Changing a bucket's `n` moves its keys to another tree only as they are written again. The
//! per-key digests live in memory (above). Keys are not expired (no TTL exists yet), so only
//! reaping removes keys from trees.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use bytes::Bytes;
use ringkv_net::{ErrorBody, ErrorCode};

use super::{Core, JobKind, Output, PeerMsg, Pending, Space, StoreKey, StoreOp};
use crate::NodeId;
use crate::merkle::{DEPTH, FANOUT, MerkleTree, leaf_of};
use crate::object::Object;
use crate::ring::{PartitionId, Ring, key_hash};

/// Gap between two exchanges of suspect pairs at a full background share, in ms (never more
/// than `ae_interval_ms`; admission control stretches it as it does the rounds).
pub(super) const SUSPECT_GAP_MS: u64 = 10;

/// Most differing nodes of one level whose children the next level sends.
pub(super) const LEVEL_PARENTS_MAX: usize = 16;

/// A key and the digest of its stored object, as anti-entropy messages carry them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AeKey {
    /// Bucket.
    pub bucket: Bytes,
    /// Key.
    pub key: Bytes,
    /// [`Object::digest`] of the stored object.
    pub digest: u64,
}

/// One tree's root and size, for operators and tests ([`Core::merkle_roots`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeRoot {
    /// Ring partition.
    pub partition: u32,
    /// Replica count of the buckets it covers.
    pub n: u8,
    /// Keys in the tree.
    pub keys: u64,
    /// Root hash.
    pub root: u64,
}

/// Anti-entropy state of a core.
#[derive(Debug)]
pub(super) struct AeState {
    trees: BTreeMap<(u32, u8), Tree>,
    /// The trees, in round-robin order.
    order: Vec<(u32, u8)>,
    /// Rounds started.
    round: u64,
    next_round: u64,
    exchange: Option<Exchange>,
    /// The floor known to be persisted (rule 3 of the module docs).
    floor_durable: u32,
    /// A raised floor not yet reported persisted.
    floor_pending: Option<u32>,
    last_raise: Option<u64>,
    /// Reads of objects to send to a peer: store op id → (peer, key).
    pushes: BTreeMap<u64, (NodeId, StoreKey)>,
    /// The rings (in force, pending) the trees were last computed for.
    view: Option<(Ring, Option<Ring>)>,
    /// Suspect pairs (module docs, *Pacing*): a tree and a replica of it that may lack what
    /// this core stored, exchanged ahead of the round-robin.
    suspects: BTreeSet<((u32, u8), NodeId)>,
    /// When the next exchange of a suspect pair may start.
    next_suspect: u64,
    /// Partitions whose trees are loading from storage (module docs), each with the keys whose
    /// entries something other than the load set since it began, which the load must skip.
    loading: BTreeMap<u32, BTreeSet<(Bytes, Bytes)>>,
}

impl AeState {
    pub(super) fn new(floor: u32) -> AeState {
        AeState {
            trees: BTreeMap::new(),
            order: Vec::new(),
            round: 0,
            next_round: 0,
            exchange: None,
            floor_durable: floor,
            floor_pending: None,
            last_raise: None,
            pushes: BTreeMap::new(),
            view: None,
            suspects: BTreeSet::new(),
            next_suspect: 0,
            loading: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Tree {
    merkle: MerkleTree,
    /// (bucket, key) → entry. Hashed, because every replica write looks its key up here; the
    /// listings that need an order (a leaf's keys, tombstones to reap) are rare, background and
    /// sorted when made ([`Tree::entries`]). The hasher is seeded with a constant, so a run
    /// is reproducible (the simulator replays seeds).
    keys: HashMap<(Bytes, Bytes), Entry, BuildHasherDefault<KeyHasher>>,
}

impl Tree {
    /// The entries that `keep` selects, in (leaf, bucket, key) order.
    fn entries(&self, keep: impl Fn(&Entry) -> bool) -> Vec<(&Bytes, &Bytes, &Entry)> {
        let mut found: Vec<_> = self
            .keys
            .iter()
            .filter(|(_, e)| keep(e))
            .map(|((b, k), e)| (b, k, e))
            .collect();
        found.sort_unstable_by(|x, y| (x.2.leaf, x.0, x.1).cmp(&(y.2.leaf, y.0, y.1)));
        found
    }

    /// The entries of `leaves`, in (leaf, bucket, key) order.
    fn in_leaves(&self, leaves: &[u32]) -> Vec<(&Bytes, &Bytes, &Entry)> {
        let mut sorted = leaves.to_vec();
        sorted.sort_unstable();
        self.entries(|e| sorted.binary_search(&e.leaf).is_ok())
    }
}

/// Hashes a tree's keys: each piece through one-shot xxh3, seeded with the hash so far. Not
/// keyed, like the engine's index (`engine/src/index.rs`): keys crafted to collide slow down
/// the shard that stores them, and a fixed hash keeps simulated runs reproducible.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }

    fn write_usize(&mut self, n: usize) {
        // Lengths: mixed in with one multiplication, not a hash call.
        self.0 = (self.0 ^ n as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The Merkle leaf of the key.
    leaf: u32,
    digest: u64,
    tomb: Option<Tomb>,
}

#[derive(Debug, Clone, Copy)]
struct Tomb {
    /// When this replica stored this tombstone, or when the object expired if that is later.
    since: u64,
    /// Dead by expiry (an expiring value or map), not by deletion: reaped after
    /// `expiry_grace_ms` instead of `tombstone_grace_ms`.
    expired: bool,
    /// The highest epoch of this node's entries in the clock, if any.
    own_epoch: Option<u32>,
}

#[derive(Debug)]
struct Exchange {
    tree: (u32, u8),
    /// The peer of an exchange started for a suspect pair: put back among the suspects if the
    /// exchange fails or repairs anything, so that a later one confirms the pair agrees.
    suspect_peer: Option<NodeId>,
    /// Messages awaited: id → node.
    waiting: BTreeMap<u64, NodeId>,
    step: Step,
}

#[derive(Debug)]
enum Step {
    Level {
        peer: NodeId,
        depth: u32,
    },
    Keys,
    Reap {
        keys: Vec<AeKey>,
        peers: Vec<NodeId>,
        /// (bucket, key) → replicas that confirmed.
        held: BTreeMap<(Bytes, Bytes), usize>,
    },
}

/// The tree hash of a key (module docs): the placement hash without its partition bits on top.
fn tree_hash(bucket: &[u8], key: &[u8], partition_bits: u32) -> u64 {
    key_hash(bucket, key).rotate_left(partition_bits)
}

impl Core {
    fn tree_hash(&self, bucket: &[u8], key: &[u8]) -> u64 {
        tree_hash(bucket, key, self.ring.partition_count().bits())
    }

    /// The tree a bucket's keys belong to: the bucket's `n`, not capped by the member count, so
    /// that a key stays in its tree when members come and go.
    fn tree_n(&self, bucket: &[u8]) -> u8 {
        self.cfg.buckets.props(bucket).n
    }

    /// The replicas of tree `(partition, n)` in the ring in force: the first `n` of the walk,
    /// or every member when there are fewer.
    fn tree_homes(&self, tree: (u32, u8)) -> &[NodeId] {
        let n = usize::from(tree.1).min(self.ring.members().len());
        &self.walks[tree.0 as usize][..n]
    }

    /// The other replicas of tree `(partition, n)`.
    fn tree_peers(&self, tree: (u32, u8)) -> Vec<NodeId> {
        self.tree_homes(tree)
            .iter()
            .copied()
            .filter(|&h| h != self.cfg.node)
            .collect()
    }

    /// Recomputes which trees this core keeps (module docs), keeping those it already has: the
    /// trees of the ring in force, which it exchanges, and those of the pending ring during a
    /// membership change, so the keys a partition transfer writes are in the tree when the ring
    /// flips.
    pub(super) fn ae_set_ring(&mut self) {
        let (index, count) = (self.cfg.shard, self.cfg.shards);
        assert!(count > 0 && index < count, "a shard index below the count");
        let view = (
            self.ring.clone(),
            self.transfers.pending().map(|(_, r)| r.clone()),
        );
        if self.ae.view.as_ref() == Some(&view) {
            return;
        }
        self.ae.view = Some(view);
        let mut ns: Vec<u8> = std::iter::once(&self.cfg.buckets.default)
            .chain(self.cfg.buckets.named.values())
            .map(|p| p.n)
            .collect();
        ns.sort_unstable();
        ns.dedup();
        let me = self.cfg.node;
        let mut order = Vec::new();
        let mut kept = std::collections::BTreeSet::new();
        for p in (0..self.ring.partition_count().get()).filter(|p| p % count == index) {
            for &n in &ns {
                if self.tree_homes((p, n)).contains(&me) {
                    order.push((p, n));
                    kept.insert((p, n));
                }
                if let Some((_, pending)) = self.transfers.pending() {
                    let n_pending = usize::from(n).min(pending.members().len());
                    if pending
                        .preference_list(PartitionId(p), n_pending)
                        .contains(&me)
                    {
                        kept.insert((p, n));
                    }
                }
            }
        }
        let mut trees = std::mem::take(&mut self.ae.trees);
        self.ae.trees = kept
            .into_iter()
            .map(|t| (t, trees.remove(&t).unwrap_or_default()))
            .collect();
        self.ae.order = order;
        if self
            .ae
            .exchange
            .as_ref()
            .is_some_and(|x| !self.ae.order.contains(&x.tree))
        {
            self.ae_end();
        }
    }

    /// Empties the trees of `partition` (a handoff pass rebuilds them from storage, see
    /// `transfer.rs`), ending an exchange on one of them.
    pub(super) fn ae_reset_partition(&mut self, partition: u32) {
        for (_, tree) in self
            .ae
            .trees
            .range_mut((partition, 0)..=(partition, u8::MAX))
        {
            *tree = Tree::default();
        }
        if self
            .ae
            .exchange
            .as_ref()
            .is_some_and(|x| x.tree.0 == partition)
        {
            self.ae_end();
        }
    }

    /// The shell is about to load the trees of `partitions` from storage while it serves
    /// (module docs): until [`Core::trees_loaded`] says a partition is read whole, anti-entropy
    /// leaves its trees alone and the load does not overwrite entries writes set meanwhile.
    pub fn trees_loading(&mut self, partitions: impl IntoIterator<Item = u32>) {
        for p in partitions {
            self.ae.loading.entry(p).or_default();
        }
        if self
            .ae
            .exchange
            .as_ref()
            .is_some_and(|x| self.ae.loading.contains_key(&x.tree.0))
        {
            self.ae_end();
        }
    }

    /// A stored replica object, read from storage to build the trees: the shell calls this for
    /// every key of [`Space::Primary`] of a partition, either before serving (nothing else runs)
    /// or while it is loading (module docs), where a key written since the load began keeps the
    /// entry its write set.
    pub fn load_replica(&mut self, now: u64, key: &StoreKey, object: &Object) {
        if let Some(touched) = self.ae.loading.get(&key.partition)
            && touched.contains(&(key.bucket.clone(), key.key.clone()))
        {
            return;
        }
        self.tree_apply(now, key, Some(object));
    }

    /// Every object of `partition` was given to [`Core::load_replica`]: its trees describe the
    /// storage, and anti-entropy may use them.
    pub fn trees_loaded(&mut self, partition: u32) {
        self.ae.loading.remove(&partition);
    }

    /// Partitions whose trees are still loading.
    pub fn trees_loading_count(&self) -> usize {
        self.ae.loading.len()
    }

    /// Whether the trees of `partition` are still loading.
    fn tree_loading(&self, partition: u32) -> bool {
        self.ae.loading.contains_key(&partition)
    }

    /// The raised floor of an [`Output::PersistFloor`] is persisted.
    pub fn handle_floor_persisted(&mut self, floor: u32) {
        self.ae.floor_durable = self.ae.floor_durable.max(floor);
        if self.ae.floor_pending == Some(floor) {
            self.ae.floor_pending = None;
        }
    }

    /// Changes the interval between anti-entropy rounds (0 pauses them): the pacing knob.
    pub fn set_ae_interval_ms(&mut self, interval_ms: u64) {
        self.cfg.ae_interval_ms = interval_ms;
    }

    /// Every tree this core keeps, in (partition, n) order.
    pub fn merkle_roots(&mut self) -> Vec<TreeRoot> {
        self.ae
            .trees
            .iter_mut()
            .map(|(&(partition, n), t)| TreeRoot {
                partition,
                n,
                keys: t.merkle.len(),
                root: t.merkle.root(),
            })
            .collect()
    }

    /// An estimate of the keys the cluster holds in buckets with `bucket`'s replica count: the
    /// keys of this node's primary replicas (this core's trees, plus what `other_shards` says
    /// the node's other shards hold in trees of a replica count), times the members, divided by
    /// the replicas per key. Exact on one node; approximate in a cluster, by design (Redis's
    /// `DBSIZE`): it counts other buckets of the same `n`, and deletions and expired keys until
    /// they are reaped.
    pub fn key_estimate(&self, bucket: &[u8], other_shards: impl Fn(u8) -> u64) -> u64 {
        let members = self.ring.members().len().max(1) as u64;
        let tree_n = self.tree_n(bucket);
        // Copies per key: the bucket's `n`, or every member when there are fewer.
        let n = u64::from(tree_n).min(members);
        let here: u64 = self
            .ae
            .trees
            .iter()
            .filter(|((_, t_n), _)| *t_n == tree_n)
            .map(|(_, t)| t.merkle.len())
            .sum();
        let node = here.saturating_add(other_shards(tree_n));
        node.saturating_mul(members) / n.max(1)
    }

    /// Whether storage operation `id` is an anti-entropy read (background work).
    pub(super) fn ae_is_background(&self, id: u64) -> bool {
        self.ae.pushes.contains_key(&id)
    }

    /// Whether an anti-entropy exchange is running.
    pub fn ae_busy(&self) -> bool {
        self.ae.exchange.is_some() || !self.ae.pushes.is_empty()
    }

    /// A merge under `key`'s lock found `stored` and had nothing to write: the tree is set to
    /// what is stored (a no-op unless the tree had drifted).
    pub(super) fn ae_stored(&mut self, now: u64, key: &StoreKey, stored: Option<&Object>) {
        self.tree_set(now, key, stored);
    }

    /// A storage operation on `key` is issued under its lock: its tree follows.
    pub(super) fn ae_written(&mut self, now: u64, key: &StoreKey, op: &StoreOp) {
        match op {
            StoreOp::Write { object, .. } => self.tree_set(now, key, Some(object)),
            StoreOp::Remove => self.tree_set(now, key, None),
            StoreOp::Read | StoreOp::Sync => {}
        }
    }

    /// Sets `key`'s tree entry to what storage holds for it now (a write issued under its lock,
    /// or a read that found it): a load still running for its partition must not overwrite it.
    fn tree_set(&mut self, now: u64, key: &StoreKey, object: Option<&Object>) {
        if key.space != Space::Primary {
            return;
        }
        if let Some(touched) = self.ae.loading.get_mut(&key.partition) {
            // Copied, as the tree's keys are, so the set never pins a received frame's buffer.
            touched.insert((
                Bytes::copy_from_slice(&key.bucket),
                Bytes::copy_from_slice(&key.key),
            ));
        }
        // A replica believed down misses what is stored here now (its hint may be lost). Not
        // for what a load reads back: that was stored before this run, not written now.
        let id = (key.partition, self.tree_n(&key.bucket));
        if self.ae.trees.contains_key(&id) {
            let me = self.cfg.node;
            for i in 0..self.tree_homes(id).len() {
                let home = self.tree_homes(id)[i];
                if home != me && !self.live.believed_up(home, now) {
                    self.ae.suspects.insert((id, home));
                }
            }
        }
        self.tree_apply(now, key, object);
    }

    /// Sets `key`'s entry in its tree, if this core keeps that tree.
    fn tree_apply(&mut self, now: u64, key: &StoreKey, object: Option<&Object>) {
        if key.space != Space::Primary {
            return;
        }
        let id = (key.partition, self.tree_n(&key.bucket));
        let hash = self.tree_hash(&key.bucket, &key.key);
        let me = self.cfg.node;
        let Some(tree) = self.ae.trees.get_mut(&id) else {
            return;
        };
        let leaf = leaf_of(hash) as u32;
        // Looked up with the request's own key (clones share its buffer); a key new to the tree
        // is stored as a copy, so the tree never pins a received frame's buffer. Most writes
        // update a key already present, so they copy nothing.
        let probe = (key.bucket.clone(), key.key.clone());
        let slot = tree.keys.get_mut(&probe);
        let old = slot.as_deref().copied();
        let new = object.map(|o| {
            let digest = o.digest();
            // An object whose versions all expire is a tombstone from its last expiry on: it
            // is reaped like one, a grace period after that time (module docs).
            let tomb = o.dead_from().map(|dead_from| Tomb {
                expired: dead_from > 0,
                since: match old {
                    Some(Entry {
                        digest: d,
                        tomb: Some(t),
                        ..
                    }) if d == digest => t.since,
                    _ => now.max(dead_from),
                },
                own_epoch: match o {
                    Object::Causal(c) => c
                        .entries()
                        .filter(|(a, _, _)| a.node == me)
                        .map(|(a, _, _)| a.epoch)
                        .max(),
                    Object::Lww(_) | Object::Map(_) => None,
                },
            });
            Entry { leaf, digest, tomb }
        });
        tree.merkle
            .update(hash, old.map(|e| e.digest), new.map(|e| e.digest));
        match (slot, new) {
            (Some(entry), Some(e)) => *entry = e,
            (Some(_), None) => {
                tree.keys.remove(&probe);
            }
            (None, Some(e)) => {
                tree.keys.insert(
                    (
                        Bytes::copy_from_slice(&key.bucket),
                        Bytes::copy_from_slice(&key.key),
                    ),
                    e,
                );
            }
            (None, None) => {}
        }
    }

    /// When the next round is due, if anti-entropy runs and no exchange is in progress.
    pub(super) fn ae_deadline(&self) -> Option<u64> {
        let next = if self.ae.suspects.is_empty() {
            self.ae.next_round
        } else {
            self.ae.next_round.min(self.ae.next_suspect)
        };
        (self.cfg.ae_interval_ms > 0 && self.ae.exchange.is_none() && !self.ae.order.is_empty())
            .then_some(next)
    }

    /// A replica write of `key` to `node` failed or timed out: `node` may lack it.
    pub(super) fn ae_suspect(&mut self, partition: u32, bucket: &[u8], node: NodeId) {
        let tree = (partition, self.tree_n(bucket));
        if node != self.cfg.node && self.ae.trees.contains_key(&tree) {
            self.ae.suspects.insert((tree, node));
        }
    }

    /// The first suspect pair that can be exchanged now: its tree is here and loaded, and its
    /// peer is a replica believed up. Pairs whose tree or peer went away with a ring change are dropped.
    fn next_suspect(&mut self, now: u64) -> Option<((u32, u8), NodeId)> {
        let mut gone = Vec::new();
        let mut found = None;
        for &(tree, peer) in &self.ae.suspects {
            if !self.ae.trees.contains_key(&tree) || !self.tree_homes(tree).contains(&peer) {
                gone.push((tree, peer));
            } else if self.live.believed_up(peer, now) && !self.tree_loading(tree.0) {
                // A loading tree waits for its load (module docs); the pair stays.
                found = Some((tree, peer));
                break;
            }
        }
        for pair in gone {
            self.ae.suspects.remove(&pair);
        }
        found
    }

    /// Starts a round if one is due.
    pub(super) fn ae_tick(&mut self, now: u64) {
        if self.cfg.ae_interval_ms == 0 || self.ae.exchange.is_some() || self.ae.order.is_empty() {
            return;
        }
        // Admission control scales background work: a share of 1/4 makes rounds 4 times rarer.
        let share = self.background_share();
        if !self.ae.suspects.is_empty() && now >= self.ae.next_suspect {
            // Pushed forward whether or not a pair can go now (its replica may still be down),
            // so a deadline in the past never makes the shell tick in a loop.
            let gap = self.cfg.ae_interval_ms.min(SUSPECT_GAP_MS) as f64 / share;
            self.ae.next_suspect = now + (gap as u64).max(1);
            if let Some((tree, peer)) = self.next_suspect(now) {
                self.ae.suspects.remove(&(tree, peer));
                return self.ae_start(now, tree, peer, true);
            }
        }
        if now < self.ae.next_round {
            return;
        }
        let interval = self.cfg.ae_interval_ms as f64 / share;
        self.ae.next_round = now + interval as u64;
        let len = self.ae.order.len() as u64;
        // The next tree whose partition is not loading (module docs); none: no round this time.
        let mut skipped = 0;
        while skipped < len && self.tree_loading(self.ae.order[(self.ae.round % len) as usize].0) {
            self.ae.round += 1;
            skipped += 1;
        }
        if skipped == len {
            return;
        }
        let round = self.ae.round;
        self.ae.round += 1;
        let tree = self.ae.order[(round % len) as usize];
        debug_assert!(!self.tree_loading(tree.0));
        let peers = self.tree_peers(tree);
        if peers.is_empty() {
            // n = 1: nothing to compare with; tombstones need no confirmation.
            self.ae_reap(now, tree);
            return;
        }
        let first = ((round / len) % peers.len() as u64) as usize;
        let Some(peer) = (0..peers.len())
            .map(|i| peers[(first + i) % peers.len()])
            .find(|&p| self.live.believed_up(p, now))
        else {
            return;
        };
        self.ae_start(now, tree, peer, false);
    }

    /// Starts an exchange of `tree` with `peer` (for a suspect pair if `suspect`).
    fn ae_start(&mut self, now: u64, tree: (u32, u8), peer: NodeId, suspect: bool) {
        self.stats.ae_exchanges += 1;
        let root = self
            .ae
            .trees
            .get_mut(&tree)
            .expect("ordered trees exist")
            .merkle
            .root();
        self.ae.exchange = Some(Exchange {
            tree,
            suspect_peer: suspect.then_some(peer),
            waiting: BTreeMap::new(),
            step: Step::Level { peer, depth: 0 },
        });
        self.ae_send(
            now,
            peer,
            |id| PeerMsg::AeLevel {
                id,
                partition: tree.0,
                n: tree.1,
                depth: 0,
                hashes: vec![(0, root)],
            },
            true,
        );
    }

    /// Sends an exchange message to `to`, awaited (with a timeout) if `awaited`.
    fn ae_send(&mut self, now: u64, to: NodeId, msg: impl FnOnce(u64) -> PeerMsg, awaited: bool) {
        let id = self.id();
        if awaited {
            if let Some(x) = self.ae.exchange.as_mut() {
                x.waiting.insert(id, to);
            }
            self.timeouts
                .insert((now + self.cfg.replica_timeout_ms, id));
        }
        self.out.push(Output::Send { to, msg: msg(id) });
    }

    fn ae_end(&mut self) {
        self.ae.exchange = None;
    }

    /// Ends the exchange without knowing whether its pair agrees: a suspect pair stays one.
    fn ae_end_unsettled(&mut self) {
        if let Some(x) = self.ae.exchange.take()
            && let Some(peer) = x.suspect_peer
        {
            self.ae.suspects.insert((x.tree, peer));
        }
    }

    /// Whether `id` is a message the running exchange awaits from `from`; forgets it if so.
    fn ae_awaited(&mut self, from: NodeId, id: u64) -> bool {
        match self.ae.exchange.as_mut() {
            Some(x) if x.waiting.get(&id) == Some(&from) => {
                x.waiting.remove(&id);
                true
            }
            _ => false,
        }
    }

    /// Message `id` timed out: if the exchange awaited it, the exchange ends.
    pub(super) fn ae_expire(&mut self, _now: u64, id: u64) {
        if self
            .ae
            .exchange
            .as_ref()
            .is_some_and(|x| x.waiting.contains_key(&id))
        {
            self.ae_end_unsettled();
        }
    }

    /// `from` answered `id` with an error.
    pub(super) fn ae_failed(&mut self, _now: u64, from: NodeId, id: u64) {
        if self.ae_awaited(from, id) {
            self.ae_end_unsettled();
        }
    }

    /// `node` is unreachable: an exchange waiting for it ends.
    pub(super) fn ae_unreachable(&mut self, _now: u64, node: NodeId) {
        if self
            .ae
            .exchange
            .as_ref()
            .is_some_and(|x| x.waiting.values().any(|&n| n == node))
        {
            self.ae_end_unsettled();
        }
    }

    fn ae_refuse(&mut self, to: NodeId, id: u64, message: String) {
        self.out.push(Output::Send {
            to,
            msg: PeerMsg::Failed {
                id,
                error: ErrorBody::new(ErrorCode::InvalidRequest, message),
            },
        });
    }

    /// Refuses an exchange or reap message for a tree still loading from storage: the peer's
    /// exchange ends and its next round tries another tree or replica.
    fn ae_refuse_loading(&mut self, to: NodeId, id: u64, partition: u32) {
        self.ae_refuse(
            to,
            id,
            format!("the trees of partition {partition} are still loading"),
        );
    }

    /// An anti-entropy message from `from`.
    pub(super) fn ae_handle_peer(&mut self, now: u64, from: NodeId, msg: PeerMsg) {
        match msg {
            PeerMsg::AeLevel {
                id,
                partition,
                n,
                depth,
                hashes,
            } => {
                let depth = u32::from(depth);
                if self.tree_loading(partition) {
                    return self.ae_refuse_loading(from, id, partition);
                }
                let Some(tree) = self.ae.trees.get_mut(&(partition, n)) else {
                    return self.ae_refuse(from, id, format!("no tree ({partition}, {n}) here"));
                };
                if depth > DEPTH {
                    return self.ae_refuse(from, id, format!("tree level {depth} below leaves"));
                }
                let theirs: Vec<(usize, u64)> =
                    hashes.iter().map(|&(i, h)| (i as usize, h)).collect();
                let differing = tree
                    .merkle
                    .differing(depth, &theirs)
                    .into_iter()
                    .map(|i| i as u32)
                    .collect();
                self.out.push(Output::Send {
                    to: from,
                    msg: PeerMsg::AeLevelOk { id, differing },
                });
            }
            PeerMsg::AeLevelOk { id, differing } => {
                if self.ae_awaited(from, id) {
                    self.ae_level_answered(now, from, differing);
                }
            }
            PeerMsg::AeKeys {
                id,
                partition,
                n,
                leaves,
                keys,
            } => self.ae_keys(now, from, id, (partition, n), leaves, keys),
            PeerMsg::AeKeysOk { id, want } => {
                if !self.ae_awaited(from, id) {
                    return;
                }
                let Some(x) = self.ae.exchange.take() else {
                    return;
                };
                // Keys were listed because leaves differed: until an exchange finds the pair
                // equal, it stays suspect (a repair is capped at `ae_keys_max` keys).
                if let Some(peer) = x.suspect_peer {
                    self.ae.suspects.insert((x.tree, peer));
                }
                for (bucket, key) in want.into_iter().take(self.cfg.ae_keys_max) {
                    let key = StoreKey {
                        partition: x.tree.0,
                        space: Space::Primary,
                        bucket,
                        key,
                    };
                    self.ae_push(from, key);
                }
            }
            PeerMsg::AeReap {
                id,
                partition,
                n,
                keys,
            } => {
                let floor = self.ae.floor_durable;
                // A loading tree may lack a tombstone it holds; refusing is the plain answer.
                if self.tree_loading(partition) {
                    return self.ae_refuse_loading(from, id, partition);
                }
                let Some(tree) = self.ae.trees.get(&(partition, n)) else {
                    return self.ae_refuse(from, id, format!("no tree ({partition}, {n}) here"));
                };
                let held = keys
                    .into_iter()
                    .filter(|k| {
                        tree.keys
                            .get(&(k.bucket.clone(), k.key.clone()))
                            .is_some_and(|e| {
                                e.digest == k.digest
                                    && e.tomb.is_some_and(|t| {
                                        self.ripe(now, &t)
                                            && t.own_epoch.is_none_or(|ep| ep < floor)
                                    })
                            })
                    })
                    .map(|k| (k.bucket, k.key))
                    .collect();
                self.out.push(Output::Send {
                    to: from,
                    msg: PeerMsg::AeReapOk { id, held },
                });
            }
            PeerMsg::AeReapOk { id, held } => {
                if self.ae_awaited(from, id) {
                    self.ae_reap_answered(now, held);
                }
            }
            PeerMsg::AeDrop {
                id,
                partition,
                n,
                keys,
            } => {
                if !self.ae.trees.contains_key(&(partition, n)) {
                    return self.ae_refuse(from, id, format!("no tree ({partition}, {n}) here"));
                }
                self.out.push(Output::Send {
                    to: from,
                    msg: PeerMsg::AeDropOk { id },
                });
                self.ae_drop(now, partition, keys);
            }
            // Drops are not awaited: the removals are checked under each key's lock.
            PeerMsg::AeDropOk { .. } => {}
            _ => unreachable!("only anti-entropy messages come here"),
        }
    }

    fn ae_level_answered(&mut self, now: u64, from: NodeId, differing: Vec<u32>) {
        let Some(Exchange {
            tree,
            step: Step::Level { peer, depth },
            ..
        }) = self.ae.exchange
        else {
            return;
        };
        debug_assert_eq!(peer, from);
        if differing.is_empty() {
            self.ae_end();
            if depth == 0 {
                self.stats.ae_in_sync += 1;
                self.ae_reap(now, tree);
            }
            return;
        }
        // A ring change may have taken the tree away meanwhile.
        let Some(t) = self.ae.trees.get_mut(&tree) else {
            return self.ae_end();
        };
        if depth < DEPTH {
            let width = FANOUT.pow(depth);
            let mut parents: Vec<usize> = differing
                .iter()
                .map(|&i| i as usize)
                .filter(|&i| i < width)
                .collect();
            parents.sort_unstable();
            parents.dedup();
            parents.truncate(LEVEL_PARENTS_MAX);
            let level = t.merkle.level(depth + 1);
            let hashes: Vec<(u32, u64)> = parents
                .iter()
                .flat_map(|&p| MerkleTree::children(depth, p))
                .map(|c| (c as u32, level[c]))
                .collect();
            if let Some(x) = self.ae.exchange.as_mut() {
                x.step = Step::Level {
                    peer,
                    depth: depth + 1,
                };
            }
            return self.ae_send(
                now,
                peer,
                |id| PeerMsg::AeLevel {
                    id,
                    partition: tree.0,
                    n: tree.1,
                    depth: (depth + 1) as u8,
                    hashes,
                },
                true,
            );
        }
        // Differing leaves: whole leaves, up to the key budget (at least one leaf).
        let mut leaves: Vec<u32> = differing;
        leaves.sort_unstable();
        leaves.dedup();
        let mut chosen = Vec::new();
        let mut keys = Vec::new();
        let mut listed = t.in_leaves(&leaves).into_iter().peekable();
        for leaf in leaves {
            let mut in_leaf = Vec::new();
            while let Some((b, k, e)) = listed.next_if(|(_, _, e)| e.leaf == leaf) {
                in_leaf.push(AeKey {
                    bucket: b.clone(),
                    key: k.clone(),
                    digest: e.digest,
                });
            }
            if !chosen.is_empty() && keys.len() + in_leaf.len() > self.cfg.ae_keys_max {
                break;
            }
            chosen.push(leaf);
            keys.extend(in_leaf);
        }
        if let Some(x) = self.ae.exchange.as_mut() {
            x.step = Step::Keys;
        }
        self.ae_send(
            now,
            peer,
            |id| PeerMsg::AeKeys {
                id,
                partition: tree.0,
                n: tree.1,
                leaves: chosen,
                keys,
            },
            true,
        );
    }

    /// A peer's keys of some leaves: send what differs, ask for what is missing or differs.
    fn ae_keys(
        &mut self,
        _now: u64,
        from: NodeId,
        id: u64,
        tree_id: (u32, u8),
        leaves: Vec<u32>,
        keys: Vec<AeKey>,
    ) {
        if self.tree_loading(tree_id.0) {
            return self.ae_refuse_loading(from, id, tree_id.0);
        }
        let Some(tree) = self.ae.trees.get(&tree_id) else {
            return self.ae_refuse(
                from,
                id,
                format!("no tree ({}, {}) here", tree_id.0, tree_id.1),
            );
        };
        let theirs: BTreeMap<(Bytes, Bytes), u64> = keys
            .into_iter()
            .map(|k| ((k.bucket, k.key), k.digest))
            .collect();
        let mut mine: BTreeMap<(Bytes, Bytes), u64> = BTreeMap::new();
        for (b, k, e) in tree.in_leaves(&leaves) {
            mine.insert((b.clone(), k.clone()), e.digest);
        }
        let max = self.cfg.ae_keys_max;
        let want: Vec<(Bytes, Bytes)> = theirs
            .iter()
            .filter(|(k, d)| mine.get(*k) != Some(*d))
            .map(|(k, _)| k.clone())
            .take(max)
            .collect();
        let send: Vec<(Bytes, Bytes)> = mine
            .iter()
            .filter(|(k, d)| theirs.get(*k) != Some(*d))
            .map(|(k, _)| k.clone())
            .take(max)
            .collect();
        self.out.push(Output::Send {
            to: from,
            msg: PeerMsg::AeKeysOk { id, want },
        });
        for (bucket, key) in send {
            let key = StoreKey {
                partition: tree_id.0,
                space: Space::Primary,
                bucket,
                key,
            };
            self.ae_push(from, key);
        }
    }

    /// Reads `key` to send it to `to` as a replica write (plain read: no lock, as hint delivery).
    fn ae_push(&mut self, to: NodeId, key: StoreKey) {
        let sid = self.id();
        self.ae.pushes.insert(sid, (to, key.clone()));
        self.out.push(Output::Store {
            id: sid,
            key,
            op: StoreOp::Read,
        });
    }

    /// A storage read issued by anti-entropy finished.
    pub(super) fn ae_read_done(
        &mut self,
        now: u64,
        id: u64,
        result: Result<Option<Object>, String>,
    ) {
        let Some((to, key)) = self.ae.pushes.remove(&id) else {
            return;
        };
        let object = match result {
            Ok(Some(object)) => object,
            // Gone (reaped meanwhile, or a tree that outlived its data): the tree learns it.
            Ok(None) => return self.tree_set(now, &key, None),
            // Unreadable: nothing to send; the next exchange retries.
            Err(_) => return,
        };
        self.stats.ae_keys_repaired += 1;
        self.send_request(now, to, Pending::Repair { node: to }, |id| {
            PeerMsg::ReplicaPut {
                id,
                key,
                object,
                durable: false,
            }
        });
    }

    /// Tree `tree` was just found equal to a peer's: starts reaping its tombstones past their
    /// grace period (module docs), raising the floor first if that is what keeps them.
    fn ae_reap(&mut self, now: u64, tree_id: (u32, u8)) {
        let grace = self.cfg.tombstone_grace_ms;
        let floor = self.ae.floor_durable;
        let Some(tree) = self.ae.trees.get(&tree_id) else {
            return;
        };
        let mut ready = Vec::new();
        let mut blocked = false;
        // Only tombstones past their grace are listed: a tree of expiring sessions holds many
        // that are not dead yet.
        let ripe = |e: &Entry| e.tomb.is_some_and(|t| self.ripe(now, &t));
        for (b, k, e) in tree.entries(ripe) {
            let Some(t) = e.tomb else { continue };
            if t.own_epoch.is_some_and(|ep| ep >= floor) {
                blocked = true;
                continue;
            }
            if ready.len() < self.cfg.ae_keys_max {
                ready.push(AeKey {
                    bucket: b.clone(),
                    key: k.clone(),
                    digest: e.digest,
                });
            }
        }
        if blocked
            && self.ae.floor_pending.is_none()
            && self
                .ae
                .last_raise
                .is_none_or(|at| now >= at.saturating_add(grace))
        {
            self.ae_raise_floor(now);
        }
        if ready.is_empty() {
            return;
        }
        let peers = self.tree_peers(tree_id);
        if peers.iter().any(|&p| !self.live.believed_up(p, now)) {
            return;
        }
        if peers.is_empty() {
            return self.ae_drop(now, tree_id.0, ready);
        }
        self.ae.exchange = Some(Exchange {
            tree: tree_id,
            // Reaping follows an exchange that found the trees equal: nothing is suspect.
            suspect_peer: None,
            waiting: BTreeMap::new(),
            step: Step::Reap {
                keys: ready.clone(),
                peers: peers.clone(),
                held: BTreeMap::new(),
            },
        });
        for peer in peers {
            let keys = ready.clone();
            self.ae_send(
                now,
                peer,
                |id| PeerMsg::AeReap {
                    id,
                    partition: tree_id.0,
                    n: tree_id.1,
                    keys,
                },
                true,
            );
        }
    }

    /// Whether `tomb` has been dead on this replica for its grace period: `tombstone_grace_ms`
    /// for a deletion, `expiry_grace_ms` (from the expiry) for an expired object.
    fn ripe(&self, now: u64, tomb: &Tomb) -> bool {
        let grace = if tomb.expired {
            self.cfg.expiry_grace_ms
        } else {
            self.cfg.tombstone_grace_ms
        };
        now >= tomb.since.saturating_add(grace)
    }

    /// A fresh epoch becomes the primary epoch and the floor (module docs, rule 3).
    fn ae_raise_floor(&mut self, now: u64) {
        let Some(epoch) = self.fresh_epoch() else {
            return;
        };
        assert!(epoch > self.floor, "fresh epochs are above the floor");
        self.floor = epoch;
        self.epochs.primary = epoch;
        self.ae.floor_pending = Some(epoch);
        self.ae.last_raise = Some(now);
        self.stats.floor_raises += 1;
        self.out.push(Output::PersistFloor { floor: epoch });
    }

    fn ae_reap_answered(&mut self, now: u64, held: Vec<(Bytes, Bytes)>) {
        let Some(x) = self.ae.exchange.as_mut() else {
            return;
        };
        let Step::Reap {
            held: counts, keys, ..
        } = &mut x.step
        else {
            return;
        };
        for k in held {
            if keys.iter().any(|a| a.bucket == k.0 && a.key == k.1) {
                *counts.entry(k).or_default() += 1;
            }
        }
        if !x.waiting.is_empty() {
            return;
        }
        let Some(Exchange {
            tree,
            step: Step::Reap { keys, peers, held },
            ..
        }) = self.ae.exchange.take()
        else {
            unreachable!("matched above")
        };
        let confirmed: Vec<AeKey> = keys
            .into_iter()
            .filter(|k| held.get(&(k.bucket.clone(), k.key.clone())) == Some(&peers.len()))
            .collect();
        if confirmed.is_empty() {
            return;
        }
        for peer in peers {
            let keys = confirmed.clone();
            self.ae_send(
                now,
                peer,
                |id| PeerMsg::AeDrop {
                    id,
                    partition: tree.0,
                    n: tree.1,
                    keys,
                },
                false,
            );
        }
        self.ae_drop(now, tree.0, confirmed);
    }

    /// Removes each tombstone whose stored object still has the confirmed digest.
    fn ae_drop(&mut self, now: u64, partition: u32, keys: Vec<AeKey>) {
        for k in keys.into_iter().take(self.cfg.ae_keys_max) {
            let key = StoreKey {
                partition,
                space: Space::Primary,
                bucket: k.bucket,
                key: k.key,
            };
            self.lock(now, key, JobKind::Reap { digest: k.digest });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree hash spreads one partition's keys over the leaves, where the placement hash
    /// would put them all in the leaves of the partition's top bits.
    #[test]
    fn tree_hash_spreads_a_partition_over_leaves() {
        let bits = 8;
        let mut by_placement = std::collections::BTreeSet::new();
        let mut by_tree = std::collections::BTreeSet::new();
        let mut seen = 0;
        for i in 0..100_000u32 {
            let key = i.to_le_bytes();
            if key_hash(b"b", &key) >> (64 - bits) != 7 {
                continue;
            }
            seen += 1;
            by_placement.insert(leaf_of(key_hash(b"b", &key)));
            by_tree.insert(leaf_of(tree_hash(b"b", &key, bits)));
        }
        assert!(seen > 300);
        assert!(by_placement.len() <= 16, "{}", by_placement.len());
        assert!(
            by_tree.len() > seen * 9 / 10 - 40,
            "{} of {seen}",
            by_tree.len()
        );
    }
}
