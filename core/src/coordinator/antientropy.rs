//! Merkle anti-entropy and tombstone reaping: the background repair of replicas that missed
//! writes, and the removal of deletions every replica holds (sans-IO).
//!
//! [`AntiEntropy`] owns all of it (trees, the exchange in progress, suspect pairs, the reaping
//! floor) and is one of the types the [`Core`] owns: it reads the core through a `View` and
//! emits through an `Outbox` (`context.rs`), and hands back, as an [`AeEffect`], the two steps
//! that need the rest of the core (a reap, which raises the epoch floor, and the removal of a
//! tombstone under its key's lock). The `impl Core` block at the end is the glue: the core's
//! public methods for the shell, and the lending of its parts.
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
//! differing leaf costs no storage scan (and, for a plain lww value, its stamp: an lww write
//! over it need not read it, `Core::blind_lww`). The table is hashed, not ordered, because
//! every replica write looks its key up in it on the request path, while a listing is a
//! background step of an exchange: it walks the tree's table once and sorts what it takes.
//! That costs about 130 bytes plus the key's length per key, per replica; a tree costs about
//! 34 KiB whatever its key count, and 4 KiB more for its pending leaf changes once written
//! (`merkle.rs`).
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
//! While the core is idle (no request coordinated and no replica read or write from a peer for
//! [`IDLE_AFTER_MS`]), rounds start [`IDLE_GAP_MS`] apart instead (never further apart than
//! `ae_interval_ms`), whatever the share: nothing is there to protect, and a cluster that has
//! just healed from faults compares every tree within a second or so rather than one a second.
//! After [`IDLE_PASSES`] passes over the trees in which no tree changed, the core rests at the
//! paced interval until a tree's content changes again (a write or a repair; a read, such as a
//! health check, does not wake it), so an idle node does not keep exchanging equal trees. A
//! replica write from a peer counts as foreground work, whether a coordinator's or an
//! exchange's repair, so each repair holds back the idle pace at both ends for a second.
//!
//! Under load, the round-robin alone repairs a partition that missed a write only when its
//! turn comes: one tree per interval, so minutes on a node with a hundred trees per core. A
//! core therefore also keeps **suspect pairs**, a tree and a replica of it that may lack
//! something this core stored: the replica was believed down when a write of the tree was
//! stored here, or a replica write to it failed or timed out. Suspect pairs are exchanged first, one after another, [`SUSPECT_GAP_MS`]
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
//!    hint (or a message be in flight) after the home it is for got the tombstone. An object
//!    dead by expiry alone (every version an expiring value, no deletion among them:
//!    [`Object::dead_by_expiry`]) counts as a tombstone from its last expiry on, with the
//!    shorter `expiry_grace_ms`: every replica holds the same expiry, so no older version can
//!    outlive it; a deletion beside an expiring value keeps the tombstone grace;
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
//! A ring change keeps the trees of the partitions still homed here (or homed here by the
//! pending ring) and drops the others (partition transfer must raise floors, per the
//! coordinator's obligation). Changing a bucket's `n` moves its keys to another tree only as
//! they are written again. The per-key digests live in memory (above). Expired objects stay in
//! the trees until they are reaped like tombstones, so only reaping removes keys from trees.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_net::{ErrorBody, ErrorCode};
use rustc_hash::FxHashMap;

use super::context::{Outbox, View, lend};
use super::key_table::KeyTable;
use super::{Core, JobKind, Output, PeerMsg, Pending, Space, StoreKey, StoreOp};
use crate::NodeId;
use crate::merkle::{DEPTH, FANOUT, MerkleTree, leaf_of};
use crate::object::Object;
use crate::ring::{PartitionId, Ring, key_hash};

/// Gap between two exchanges of suspect pairs at a full background share, in ms (never more
/// than `ae_interval_ms`; admission control stretches it as it does the rounds).
pub(super) const SUSPECT_GAP_MS: u64 = 10;

/// Time without foreground work after which a core counts as idle, in ms.
pub(super) const IDLE_AFTER_MS: u64 = 1_000;

/// Gap between two round-robin exchanges while the core is idle, in ms (never more than
/// `ae_interval_ms`): nothing waits for the core, so it walks its trees at once.
pub(super) const IDLE_GAP_MS: u64 = 10;

/// Passes over its trees an idle core makes at [`IDLE_GAP_MS`] before it rests at the paced
/// interval, unless a tree changes meanwhile: two, so that with three replicas each tree meets
/// both of its other replicas (the peer rotates from one pass to the next).
pub(super) const IDLE_PASSES: u64 = 2;

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

/// When what [`AntiEntropy::tree_apply`] sets a tree entry for was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Set under the key's lock from what storage holds now (a write, a merge, a read that
    /// found it): a replica believed down may miss it.
    Now,
    /// Read back by a startup load: stored before this run, so no replica is suspected of
    /// missing it.
    Before,
}

/// The anti-entropy of a core: its trees, the exchange in progress, the suspect pairs and the
/// tombstone-reaping state, with the methods that run them. It reads the core through a [`View`]
/// and emits through an [`Outbox`] (`context.rs`); what needs the rest of the core (a per-key
/// job, a fresh epoch) it returns as an [`AeEffect`].
#[derive(Debug)]
pub(super) struct AntiEntropy {
    /// The trees by (partition, n). Every write looks its tree up, more than once: a hash map
    /// answers in one probe where an ordered map of a few hundred trees compared keys at each
    /// level. What must be ordered (`roots`) sorts; the round-robin keeps its own `order`.
    trees: FxHashMap<(u32, u8), Tree>,
    /// The trees, in round-robin order.
    order: Vec<(u32, u8)>,
    /// Rounds started.
    round: u64,
    next_round: u64,
    /// When the last round-robin round started.
    last_round: u64,
    /// When this core last took foreground work (a request to coordinate, a replica read or
    /// write from a peer); `None` before the first. Rounds come faster while it is idle.
    foreground_at: Option<u64>,
    /// Rounds started at the idle pace since a tree's content last changed.
    idle_rounds: u64,
    exchange: Option<Exchange>,
    /// The floor known to be persisted (rule 3 of the module docs).
    floor_durable: u32,
    /// A raised floor not yet reported persisted.
    floor_pending: Option<u32>,
    last_raise: Option<u64>,
    /// The rings (in force, pending) the trees were last computed for.
    view: Option<(Ring, Option<Ring>)>,
    /// The `n` of every bucket when they all share one (the default buckets do), so a write
    /// finds its tree without looking its bucket up: three lookups of a bucket name per write
    /// were 2.6% of a pipelined SET's CPU.
    one_n: Option<u8>,
    /// Suspect pairs (module docs, *Pacing*): a tree and a replica of it that may lack what
    /// this core stored, exchanged ahead of the round-robin.
    suspects: BTreeSet<((u32, u8), NodeId)>,
    /// When the next exchange of a suspect pair may start.
    next_suspect: u64,
    /// Partitions whose trees are loading from storage (module docs), each with the keys whose
    /// entries something other than the load set since it began, which the load must skip.
    loading: BTreeMap<u32, BTreeSet<(Bytes, Bytes)>>,
    /// Reads of objects to send to peers that are still running.
    pushes: usize,
}

/// Work anti-entropy hands back to the core, which owns what it needs. Each is the last step
/// of the call that returns it, so the core carries it out right after, in the same order.
#[derive(Debug)]
pub(super) enum AeEffect {
    /// Reap the tombstones of tree `(partition, n)` that are past their grace period
    /// ([`Core::ae_reap`]): it was just found equal to its peers', or has none.
    Reap((u32, u8)),
    /// Remove each of these tombstones of `partition` under its key's lock, if its stored object
    /// still has the confirmed digest.
    Drop {
        /// The partition.
        partition: u32,
        /// The tombstones.
        keys: Vec<AeKey>,
    },
}

/// The tombstones of a tree ready to be reaped, and whether the floor must be raised first.
#[derive(Debug)]
pub(super) struct ReapList {
    ready: Vec<AeKey>,
    /// Tombstones past their grace are held back only by rule 3: raise the floor (the core
    /// takes a fresh epoch) and report it with [`AntiEntropy::floor_raised`].
    pub(super) raise_floor: bool,
    /// When the tree's first tombstone is past its grace (now or earlier if some are).
    ripe_from: u64,
}

#[derive(Debug, Default)]
struct Tree {
    merkle: MerkleTree,
    /// (bucket, key) → entry, found by the key's tree hash. Hashed, because every replica write
    /// looks its key up here; the listings that need an order (a leaf's keys, tombstones to
    /// reap) are rare, background and sorted when made ([`Tree::entries`]).
    keys: KeyTable<Entry>,
    /// No tombstone of the tree is past its grace before this time (a lower bound: set exactly
    /// by a reaping walk, lowered by every tombstone stored since). A reap before it walks
    /// nothing, so a tree without tombstones costs nothing however often it is found equal.
    ripe_from: u64,
}

impl Tree {
    /// The entries that `keep` selects, in (leaf, bucket, key) order.
    fn entries(&self, keep: impl Fn(&Entry) -> bool) -> Vec<(&[u8], &[u8], &Entry)> {
        let mut found: Vec<_> = self.keys.iter().filter(|(_, _, e)| keep(e)).collect();
        found.sort_unstable_by(|x, y| (x.2.leaf, x.0, x.1).cmp(&(y.2.leaf, y.0, y.1)));
        found
    }

    /// The entries of `leaves`, in (leaf, bucket, key) order.
    fn in_leaves(&self, leaves: &[u32]) -> Vec<(&[u8], &[u8], &Entry)> {
        let mut sorted = leaves.to_vec();
        sorted.sort_unstable();
        self.entries(|e| sorted.binary_search(&e.leaf).is_ok())
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The Merkle leaf of the key.
    leaf: u32,
    /// The stored object's stamp if it is a plain last-write-wins value (`Object::Lww`), else 0
    /// (a stamp of 0 is read as unknown): a blind write of an `lww` bucket stamps above it
    /// without reading the object ([`AntiEntropy::stored_lww`]).
    lww_stamp: u64,
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

/// The placement hash of `key` ([`key_hash`]), for a caller that does not have it at hand; a
/// client request carries its own (`KeyRequest::key_hash`).
pub(super) fn placement(key: &StoreKey) -> u64 {
    key_hash(&key.bucket, &key.key)
}

impl View<'_> {
    fn tree_hash(&self, bucket: &[u8], key: &[u8]) -> u64 {
        tree_hash(bucket, key, self.ring.partition_count().bits())
    }

    /// The tree hash of the key whose placement hash is `placement` (module docs).
    fn tree_hash_of(&self, placement: u64) -> u64 {
        placement.rotate_left(self.ring.partition_count().bits())
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

    /// Whether `tomb` has been dead on this replica for its grace period: `tombstone_grace_ms`
    /// for a deletion, `expiry_grace_ms` (from the expiry) for an expired object.
    fn ripe(&self, now: u64, tomb: &Tomb) -> bool {
        now >= self.ripe_from(tomb)
    }

    /// When `tomb` is past its grace.
    fn ripe_from(&self, tomb: &Tomb) -> u64 {
        let grace = if tomb.expired {
            self.cfg.expiry_grace_ms
        } else {
            self.cfg.tombstone_grace_ms
        };
        tomb.since.saturating_add(grace)
    }
}

/// A refusal of an exchange or reap message.
fn refuse(o: &mut Outbox<'_>, to: NodeId, id: u64, message: String) {
    o.answer(
        to,
        PeerMsg::Failed {
            id,
            error: ErrorBody::new(ErrorCode::InvalidRequest, message),
        },
    );
}

/// Refuses an exchange or reap message for a tree still loading from storage: the peer's
/// exchange ends and its next round tries another tree or replica.
fn refuse_loading(o: &mut Outbox<'_>, to: NodeId, id: u64, partition: u32) {
    refuse(
        o,
        to,
        id,
        format!("the trees of partition {partition} are still loading"),
    );
}

fn no_tree(o: &mut Outbox<'_>, to: NodeId, id: u64, tree: (u32, u8)) {
    refuse(o, to, id, format!("no tree ({}, {}) here", tree.0, tree.1));
}

impl AntiEntropy {
    pub(super) fn new(floor: u32) -> AntiEntropy {
        AntiEntropy {
            trees: FxHashMap::default(),
            order: Vec::new(),
            round: 0,
            next_round: 0,
            last_round: 0,
            foreground_at: None,
            idle_rounds: 0,
            exchange: None,
            floor_durable: floor,
            floor_pending: None,
            last_raise: None,
            view: None,
            one_n: None,
            suspects: BTreeSet::new(),
            next_suspect: 0,
            loading: BTreeMap::new(),
            pushes: 0,
        }
    }

    /// The `n` of the tree a key of `bucket` belongs to ([`View::tree_n`]).
    fn tree_n(&self, v: &View<'_>, bucket: &[u8]) -> u8 {
        let n = self.one_n.unwrap_or_else(|| v.tree_n(bucket));
        debug_assert_eq!(n, v.tree_n(bucket), "every bucket has the one n");
        n
    }

    /// Recomputes which trees this core keeps (module docs), keeping those it already has: the
    /// trees of the ring in force, which it exchanges, and those of the `pending` ring during a
    /// membership change, so the keys a partition transfer writes are in the tree when the ring
    /// flips.
    pub(super) fn set_ring(&mut self, v: &View<'_>, pending: Option<&Ring>) {
        let (index, count) = (v.cfg.shard, v.cfg.shards);
        assert!(count > 0 && index < count, "a shard index below the count");
        let view = (v.ring.clone(), pending.cloned());
        if self.view.as_ref() == Some(&view) {
            return;
        }
        self.view = Some(view);
        let mut ns: Vec<u8> = std::iter::once(&v.cfg.buckets.default)
            .chain(v.cfg.buckets.named.values())
            .map(|p| p.n)
            .collect();
        ns.sort_unstable();
        ns.dedup();
        self.one_n = match ns[..] {
            [n] => Some(n),
            _ => None,
        };
        let me = v.cfg.node;
        let mut order = Vec::new();
        let mut kept = BTreeSet::new();
        for p in (0..v.ring.partition_count().get()).filter(|p| p % count == index) {
            for &n in &ns {
                if v.tree_homes((p, n)).contains(&me) {
                    order.push((p, n));
                    kept.insert((p, n));
                }
                if let Some(pending) = pending {
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
        let mut trees = std::mem::take(&mut self.trees);
        self.trees = kept
            .into_iter()
            .map(|t| (t, trees.remove(&t).unwrap_or_default()))
            .collect();
        self.order = order;
        if self
            .exchange
            .as_ref()
            .is_some_and(|x| !self.order.contains(&x.tree))
        {
            self.end();
        }
    }

    /// Empties the trees of `partition` (a handoff pass rebuilds them from storage, see
    /// `transfer.rs`), ending an exchange on one of them.
    pub(super) fn reset_partition(&mut self, partition: u32) {
        for (_, tree) in self.trees.iter_mut().filter(|((p, _), _)| *p == partition) {
            *tree = Tree::default();
        }
        if self
            .exchange
            .as_ref()
            .is_some_and(|x| x.tree.0 == partition)
        {
            self.end();
        }
    }

    /// [`Core::trees_loading`].
    pub(super) fn trees_loading(&mut self, partitions: impl IntoIterator<Item = u32>) {
        for p in partitions {
            self.loading.entry(p).or_default();
        }
        if self
            .exchange
            .as_ref()
            .is_some_and(|x| self.loading.contains_key(&x.tree.0))
        {
            self.end();
        }
    }

    /// [`Core::load_replica`].
    pub(super) fn load_replica(&mut self, v: &View<'_>, now: u64, key: &StoreKey, object: &Object) {
        if let Some(touched) = self.loading.get(&key.partition)
            && touched.contains(&(key.bucket.clone(), key.key.clone()))
        {
            return;
        }
        self.tree_apply(v, now, (key, placement(key)), Some(object), Written::Before);
    }

    /// [`Core::trees_loaded`].
    pub(super) fn trees_loaded(&mut self, partition: u32) {
        self.loading.remove(&partition);
    }

    /// Partitions whose trees are still loading.
    pub(super) fn loading_count(&self) -> usize {
        self.loading.len()
    }

    /// Whether the trees of `partition` are still loading.
    fn tree_loading(&self, partition: u32) -> bool {
        self.loading.contains_key(&partition)
    }

    /// [`Core::handle_floor_persisted`].
    pub(super) fn floor_persisted(&mut self, floor: u32) {
        self.floor_durable = self.floor_durable.max(floor);
        if self.floor_pending == Some(floor) {
            self.floor_pending = None;
        }
    }

    /// The core raised the floor to `floor` at `now` for a [`ReapList::raise_floor`]; it is
    /// not persisted yet.
    pub(super) fn floor_raised(&mut self, floor: u32, now: u64) {
        self.floor_pending = Some(floor);
        self.last_raise = Some(now);
    }

    /// Every tree, in (partition, n) order.
    pub(super) fn roots(&mut self) -> Vec<TreeRoot> {
        let mut roots: Vec<TreeRoot> = self
            .trees
            .iter_mut()
            .map(|(&(partition, n), t)| TreeRoot {
                partition,
                n,
                keys: t.merkle.len(),
                root: t.merkle.root(),
            })
            .collect();
        roots.sort_unstable_by_key(|r| (r.partition, r.n));
        roots
    }

    /// Keys in this core's trees of replica count `n`.
    pub(super) fn keys_of_n(&self, n: u8) -> u64 {
        self.trees
            .iter()
            .filter(|((_, t_n), _)| *t_n == n)
            .map(|(_, t)| t.merkle.len())
            .sum()
    }

    /// Whether an exchange, or a read of objects to send, is running.
    pub(super) fn busy(&self) -> bool {
        self.exchange.is_some() || self.pushes > 0
    }

    /// A storage operation on `key` (with its placement hash) is issued under its lock: its
    /// tree follows.
    pub(super) fn written(&mut self, v: &View<'_>, now: u64, key: (&StoreKey, u64), op: &StoreOp) {
        match op {
            StoreOp::Write { object, .. } => self.tree_set(v, now, key, Some(object)),
            StoreOp::Remove => self.tree_set(v, now, key, None),
            StoreOp::Read | StoreOp::Sync => {}
        }
    }

    /// Sets `key`'s tree entry (the key with its placement hash) to what storage holds for it
    /// now (a write issued under its lock, or a read that found it): a load still running for
    /// its partition must not overwrite it.
    pub(super) fn tree_set(
        &mut self,
        v: &View<'_>,
        now: u64,
        (key, placement): (&StoreKey, u64),
        object: Option<&Object>,
    ) {
        if key.space != Space::Primary {
            return;
        }
        if let Some(touched) = self.loading.get_mut(&key.partition) {
            // Copied, as the tree's keys are, so the set never pins a received frame's buffer.
            touched.insert((
                Bytes::copy_from_slice(&key.bucket),
                Bytes::copy_from_slice(&key.key),
            ));
        }
        self.tree_apply(v, now, (key, placement), object, Written::Now);
    }

    /// Sets `key`'s entry in its tree, if this core keeps that tree; for what is stored
    /// [`Written::Now`], also marks each replica of the tree believed down as a suspect.
    fn tree_apply(
        &mut self,
        v: &View<'_>,
        now: u64,
        (key, placement): (&StoreKey, u64),
        object: Option<&Object>,
        written: Written,
    ) {
        if key.space != Space::Primary {
            return;
        }
        debug_assert_eq!(
            placement,
            self::placement(key),
            "the key's own placement hash"
        );
        let id = (key.partition, self.tree_n(v, &key.bucket));
        let hash = v.tree_hash_of(placement);
        let me = v.cfg.node;
        let Some(tree) = self.trees.get_mut(&id) else {
            return;
        };
        if written == Written::Now {
            // A replica believed down misses what is stored here now (its hint may be lost).
            for &home in v.tree_homes(id) {
                if home != me && !v.live.believed_up(home, now) {
                    self.suspects.insert((id, home));
                }
            }
        }
        let leaf = leaf_of(hash) as u32;
        // A key new to the tree is stored as a copy (`KeyTable`), so the tree never pins a
        // received frame's buffer. Most writes update a key already present: they copy nothing.
        let slot = tree.keys.get_mut(hash, &key.bucket, &key.key);
        let old = slot.as_deref().copied();
        let new = object.map(|o| {
            let digest = o.digest();
            // An object whose versions all expire is a tombstone from its last expiry on: it
            // is reaped like one, a grace period after that time (module docs).
            let tomb = o.dead_from().map(|dead_from| Tomb {
                expired: o.dead_by_expiry(),
                since: match old {
                    Some(Entry {
                        digest: d,
                        tomb: Some(t),
                        ..
                    }) if d == digest => t.since,
                    _ => now.max(dead_from),
                },
                own_epoch: o.actors().filter(|a| a.node == me).map(|a| a.epoch).max(),
            });
            Entry {
                leaf,
                lww_stamp: match o {
                    Object::Lww(l) => l.timestamp,
                    _ => 0,
                },
                digest,
                tomb,
            }
        });
        tree.merkle
            .update(hash, old.map(|e| e.digest), new.map(|e| e.digest));
        // What changed may differ from the other replicas (a write, or a repair that may have
        // more behind it): an idle core walks its trees again. A merge that changed nothing
        // does not count, so a difference that is never repaired cannot keep it walking.
        if old.map(|e| e.digest) != new.map(|e| e.digest) {
            self.idle_rounds = 0;
        }
        if let Some(t) = new.and_then(|e| e.tomb) {
            tree.ripe_from = tree.ripe_from.min(v.ripe_from(&t));
        }
        match (slot, new) {
            (Some(entry), Some(e)) => *entry = e,
            (Some(_), None) => {
                tree.keys.remove(hash, &key.bucket, &key.key);
            }
            (None, Some(e)) => tree.keys.insert(hash, &key.bucket, &key.key, e),
            (None, None) => {}
        }
    }

    /// Hands `hint` the key-table slots coming writes of `keys` (partition, bucket, key) look
    /// up: every key's tree and hash first, then the probes, close together so that the cache
    /// misses of the loads `hint` asks for overlap.
    pub(super) fn prefetch<'k>(
        &self,
        v: &View<'_>,
        keys: impl IntoIterator<Item = (u32, &'k [u8], u64)>,
        hint: &mut impl FnMut(*const u8, usize),
    ) {
        // On the stack for a pipelined round's usual size: a batch with no put (a wave of
        // reads) allocates nothing here.
        let found: smallvec::SmallVec<[(&Tree, u64); 32]> = keys
            .into_iter()
            .filter_map(|(partition, bucket, placement)| {
                let tree = self.trees.get(&(partition, self.tree_n(v, bucket)))?;
                Some((tree, v.tree_hash_of(placement)))
            })
            .collect();
        for (tree, hash) in found {
            tree.keys.prefetch(hash, hint);
        }
    }

    /// The stamp of the plain last-write-wins object `key` (with its placement hash) is known to
    /// hold in storage: its tree is kept here and not loading, and its entry says so. The entry
    /// follows every write issued under the key's lock, so while the caller holds that lock the
    /// answer is what storage holds; a key without an entry is not known (its tree may be
    /// refilling).
    pub(super) fn stored_lww(
        &self,
        v: &View<'_>,
        (key, placement): (&StoreKey, u64),
    ) -> Option<u64> {
        if key.space != Space::Primary || self.tree_loading(key.partition) {
            return None;
        }
        debug_assert_eq!(
            placement,
            self::placement(key),
            "the key's own placement hash"
        );
        let id = (key.partition, self.tree_n(v, &key.bucket));
        let tree = self.trees.get(&id)?;
        let hash = v.tree_hash_of(placement);
        let stamp = tree.keys.get(hash, &key.bucket, &key.key)?.lww_stamp;
        (stamp > 0).then_some(stamp)
    }

    /// The core took foreground work at `now`: rounds go back to their paced interval.
    pub(super) fn foreground(&mut self, now: u64) {
        self.foreground_at = Some(now);
    }

    /// When the next round-robin round is due: a paced interval after the last, or sooner once
    /// the core is idle (module docs, *Pacing*).
    fn round_due(&self, v: &View<'_>) -> u64 {
        if self.idle_rounds >= IDLE_PASSES.saturating_mul(self.order.len() as u64) {
            return self.next_round;
        }
        let idle_from = self
            .foreground_at
            .map_or(0, |t| t.saturating_add(IDLE_AFTER_MS));
        let idle_due = idle_from.max(
            self.last_round
                .saturating_add(v.cfg.ae_interval_ms.min(IDLE_GAP_MS)),
        );
        self.next_round.min(idle_due)
    }

    /// When the next round is due, if anti-entropy runs and no exchange is in progress.
    pub(super) fn deadline(&self, v: &View<'_>) -> Option<u64> {
        let mut next = self.round_due(v);
        if !self.suspects.is_empty() {
            next = next.min(self.next_suspect);
        }
        (v.cfg.ae_interval_ms > 0 && self.exchange.is_none() && !self.order.is_empty())
            .then_some(next)
    }

    /// A replica write of a key of `bucket` in `partition` to `node` failed or timed out:
    /// `node` may lack it.
    pub(super) fn suspect(&mut self, v: &View<'_>, partition: u32, bucket: &[u8], node: NodeId) {
        let tree = (partition, self.tree_n(v, bucket));
        if node != v.cfg.node && self.trees.contains_key(&tree) {
            self.suspects.insert((tree, node));
        }
    }

    /// The first suspect pair that can be exchanged now: its tree is here and loaded, and its
    /// peer is a replica believed up. Pairs whose tree or peer went away with a ring change are dropped.
    fn next_suspect(&mut self, v: &View<'_>, now: u64) -> Option<((u32, u8), NodeId)> {
        let mut gone = Vec::new();
        let mut found = None;
        for &(tree, peer) in &self.suspects {
            if !self.trees.contains_key(&tree) || !v.tree_homes(tree).contains(&peer) {
                gone.push((tree, peer));
            } else if v.live.believed_up(peer, now) && !self.tree_loading(tree.0) {
                // A loading tree waits for its load (module docs); the pair stays.
                found = Some((tree, peer));
                break;
            }
        }
        for pair in gone {
            self.suspects.remove(&pair);
        }
        found
    }

    /// Starts a round if one is due; `share` is the background share from admission control.
    pub(super) fn tick(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        share: f64,
    ) -> Option<AeEffect> {
        if v.cfg.ae_interval_ms == 0 || self.exchange.is_some() || self.order.is_empty() {
            return None;
        }
        // Admission control scales background work: a share of 1/4 makes rounds 4 times rarer.
        if !self.suspects.is_empty() && now >= self.next_suspect {
            // Pushed forward whether or not a pair can go now (its replica may still be down),
            // so a deadline in the past never makes the shell tick in a loop.
            let gap = v.cfg.ae_interval_ms.min(SUSPECT_GAP_MS) as f64 / share;
            self.next_suspect = now + (gap as u64).max(1);
            if let Some((tree, peer)) = self.next_suspect(v, now) {
                self.suspects.remove(&(tree, peer));
                self.start(v, o, now, tree, peer, true);
                return None;
            }
        }
        if now < self.round_due(v) {
            return None;
        }
        if now < self.next_round {
            self.idle_rounds += 1;
        }
        let interval = v.cfg.ae_interval_ms as f64 / share;
        self.next_round = now + interval as u64;
        self.last_round = now;
        let len = self.order.len() as u64;
        // The next tree whose partition is not loading (module docs); none: no round this time.
        let mut skipped = 0;
        while skipped < len && self.tree_loading(self.order[(self.round % len) as usize].0) {
            self.round += 1;
            skipped += 1;
        }
        if skipped == len {
            return None;
        }
        let round = self.round;
        self.round += 1;
        let tree = self.order[(round % len) as usize];
        debug_assert!(!self.tree_loading(tree.0));
        let peers = v.tree_peers(tree);
        if peers.is_empty() {
            // n = 1: nothing to compare with; tombstones need no confirmation.
            return Some(AeEffect::Reap(tree));
        }
        let first = ((round / len) % peers.len() as u64) as usize;
        let peer = (0..peers.len())
            .map(|i| peers[(first + i) % peers.len()])
            .find(|&p| v.live.believed_up(p, now))?;
        self.start(v, o, now, tree, peer, false);
        None
    }

    /// Starts an exchange of `tree` with `peer` (for a suspect pair if `suspect`).
    fn start(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        tree: (u32, u8),
        peer: NodeId,
        suspect: bool,
    ) {
        o.stats.ae_exchanges += 1;
        let root = self
            .trees
            .get_mut(&tree)
            .expect("ordered trees exist")
            .merkle
            .root();
        self.exchange = Some(Exchange {
            tree,
            suspect_peer: suspect.then_some(peer),
            waiting: BTreeMap::new(),
            step: Step::Level { peer, depth: 0 },
        });
        self.send(v, o, now, peer, |id| PeerMsg::AeLevel {
            id,
            partition: tree.0,
            n: tree.1,
            depth: 0,
            hashes: vec![(0, root)],
        });
    }

    /// Sends a message of the exchange to `to`, which awaits its answer (with a timeout).
    fn send(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        to: NodeId,
        msg: impl FnOnce(u64) -> PeerMsg,
    ) {
        let timeout = v.cfg.replica_timeout_ms;
        let id = o.request(now, timeout, to, Pending::Exchange { node: to }, msg);
        if let Some(x) = self.exchange.as_mut() {
            x.waiting.insert(id, to);
        }
    }

    fn end(&mut self) {
        self.exchange = None;
    }

    /// Ends the exchange without knowing whether its pair agrees: a suspect pair stays one.
    fn end_unsettled(&mut self) {
        if let Some(x) = self.exchange.take()
            && let Some(peer) = x.suspect_peer
        {
            self.suspects.insert((x.tree, peer));
        }
    }

    /// Whether `id` is a message the running exchange awaits from `from`; forgets it if so.
    fn awaited(&mut self, from: NodeId, id: u64) -> bool {
        match self.exchange.as_mut() {
            Some(x) if x.waiting.get(&id) == Some(&from) => {
                x.waiting.remove(&id);
                true
            }
            _ => false,
        }
    }

    /// Message `id` of an exchange timed out, or its peer became unreachable: if the exchange
    /// awaited it, the exchange ends.
    pub(super) fn expired(&mut self, id: u64) {
        if self
            .exchange
            .as_ref()
            .is_some_and(|x| x.waiting.contains_key(&id))
        {
            self.end_unsettled();
        }
    }

    /// `from` answered message `id` of an exchange with an error.
    pub(super) fn failed(&mut self, from: NodeId, id: u64) {
        if self.awaited(from, id) {
            self.end_unsettled();
        }
    }

    /// An anti-entropy request from `from` (a peer's exchange or reap), or an answer to one of
    /// this core's exchange messages (its outstanding entry already taken by the core).
    pub(super) fn handle_peer(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        from: NodeId,
        msg: PeerMsg,
    ) -> Option<AeEffect> {
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
                    refuse_loading(o, from, id, partition);
                    return None;
                }
                let Some(tree) = self.trees.get_mut(&(partition, n)) else {
                    no_tree(o, from, id, (partition, n));
                    return None;
                };
                if depth > DEPTH {
                    refuse(o, from, id, format!("tree level {depth} below leaves"));
                    return None;
                }
                let theirs: Vec<(usize, u64)> =
                    hashes.iter().map(|&(i, h)| (i as usize, h)).collect();
                let differing = tree
                    .merkle
                    .differing(depth, &theirs)
                    .into_iter()
                    .map(|i| i as u32)
                    .collect();
                o.answer(from, PeerMsg::AeLevelOk { id, differing });
                None
            }
            PeerMsg::AeLevelOk { id, differing } => {
                if self.awaited(from, id) {
                    return self.level_answered(v, o, now, from, differing);
                }
                None
            }
            PeerMsg::AeKeys {
                id,
                partition,
                n,
                leaves,
                keys,
            } => {
                self.keys(v, o, from, id, (partition, n), leaves, keys);
                None
            }
            PeerMsg::AeKeysOk { id, want } => {
                if !self.awaited(from, id) {
                    return None;
                }
                let x = self.exchange.take()?;
                // Keys were listed because leaves differed: until an exchange finds the pair
                // equal, it stays suspect (a repair is capped at `ae_keys_max` keys).
                if let Some(peer) = x.suspect_peer {
                    self.suspects.insert((x.tree, peer));
                }
                for (bucket, key) in want.into_iter().take(v.cfg.ae_keys_max) {
                    let key = StoreKey {
                        partition: x.tree.0,
                        space: Space::Primary,
                        bucket,
                        key,
                    };
                    self.push(o, from, key);
                }
                None
            }
            PeerMsg::AeReap {
                id,
                partition,
                n,
                keys,
            } => {
                let floor = self.floor_durable;
                // A loading tree may lack a tombstone it holds; refusing is the plain answer.
                if self.tree_loading(partition) {
                    refuse_loading(o, from, id, partition);
                    return None;
                }
                let Some(tree) = self.trees.get(&(partition, n)) else {
                    no_tree(o, from, id, (partition, n));
                    return None;
                };
                let held = keys
                    .into_iter()
                    .filter(|k| {
                        tree.keys
                            .get(v.tree_hash(&k.bucket, &k.key), &k.bucket, &k.key)
                            .is_some_and(|e| {
                                e.digest == k.digest
                                    && e.tomb.is_some_and(|t| {
                                        v.ripe(now, &t) && t.own_epoch.is_none_or(|ep| ep < floor)
                                    })
                            })
                    })
                    .map(|k| (k.bucket, k.key))
                    .collect();
                o.answer(from, PeerMsg::AeReapOk { id, held });
                None
            }
            PeerMsg::AeReapOk { id, held } => {
                if self.awaited(from, id) {
                    return self.reap_answered(o, held);
                }
                None
            }
            PeerMsg::AeDrop {
                id,
                partition,
                n,
                keys,
            } => {
                if !self.trees.contains_key(&(partition, n)) {
                    no_tree(o, from, id, (partition, n));
                    return None;
                }
                o.answer(from, PeerMsg::AeDropOk { id });
                Some(AeEffect::Drop { partition, keys })
            }
            // Drops are not awaited: the removals are checked under each key's lock.
            PeerMsg::AeDropOk { .. } => None,
            _ => unreachable!("only anti-entropy messages come here"),
        }
    }

    fn level_answered(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        from: NodeId,
        differing: Vec<u32>,
    ) -> Option<AeEffect> {
        let Some(Exchange {
            tree,
            step: Step::Level { peer, depth },
            ..
        }) = self.exchange
        else {
            return None;
        };
        debug_assert_eq!(peer, from);
        if differing.is_empty() {
            self.end();
            if depth == 0 {
                o.stats.ae_in_sync += 1;
                return Some(AeEffect::Reap(tree));
            }
            return None;
        }
        // A ring change may have taken the tree away meanwhile.
        let Some(t) = self.trees.get_mut(&tree) else {
            self.end();
            return None;
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
            if let Some(x) = self.exchange.as_mut() {
                x.step = Step::Level {
                    peer,
                    depth: depth + 1,
                };
            }
            self.send(v, o, now, peer, |id| PeerMsg::AeLevel {
                id,
                partition: tree.0,
                n: tree.1,
                depth: (depth + 1) as u8,
                hashes,
            });
            return None;
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
                    bucket: Bytes::copy_from_slice(b),
                    key: Bytes::copy_from_slice(k),
                    digest: e.digest,
                });
            }
            if !chosen.is_empty() && keys.len() + in_leaf.len() > v.cfg.ae_keys_max {
                break;
            }
            chosen.push(leaf);
            keys.extend(in_leaf);
        }
        if let Some(x) = self.exchange.as_mut() {
            x.step = Step::Keys;
        }
        self.send(v, o, now, peer, |id| PeerMsg::AeKeys {
            id,
            partition: tree.0,
            n: tree.1,
            leaves: chosen,
            keys,
        });
        None
    }

    /// A peer's keys of some leaves: send what differs, ask for what is missing or differs.
    #[allow(clippy::too_many_arguments)] // One message's fields, taken apart by the caller.
    fn keys(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        from: NodeId,
        id: u64,
        tree_id: (u32, u8),
        leaves: Vec<u32>,
        keys: Vec<AeKey>,
    ) {
        if self.tree_loading(tree_id.0) {
            return refuse_loading(o, from, id, tree_id.0);
        }
        let Some(tree) = self.trees.get(&tree_id) else {
            return no_tree(o, from, id, tree_id);
        };
        // Compared as borrowed bytes: only the keys to send are copied out of the tree.
        let theirs: BTreeMap<(&[u8], &[u8]), &AeKey> = keys
            .iter()
            .map(|k| ((&k.bucket[..], &k.key[..]), k))
            .collect();
        let mine: BTreeMap<(&[u8], &[u8]), u64> = tree
            .in_leaves(&leaves)
            .into_iter()
            .map(|(b, k, e)| ((b, k), e.digest))
            .collect();
        let max = v.cfg.ae_keys_max;
        let want: Vec<(Bytes, Bytes)> = theirs
            .iter()
            .filter(|(id, k)| mine.get(*id) != Some(&k.digest))
            .map(|(_, k)| (k.bucket.clone(), k.key.clone()))
            .take(max)
            .collect();
        let send: Vec<(Bytes, Bytes)> = mine
            .iter()
            .filter(|(id, d)| theirs.get(*id).map(|k| k.digest) != Some(**d))
            .map(|((b, k), _)| (Bytes::copy_from_slice(b), Bytes::copy_from_slice(k)))
            .take(max)
            .collect();
        o.answer(from, PeerMsg::AeKeysOk { id, want });
        for (bucket, key) in send {
            let key = StoreKey {
                partition: tree_id.0,
                space: Space::Primary,
                bucket,
                key,
            };
            self.push(o, from, key);
        }
    }

    /// Reads `key` to send it to `to` as a replica write (plain read: no lock, as hint delivery).
    fn push(&mut self, o: &mut Outbox<'_>, to: NodeId, key: StoreKey) {
        self.pushes += 1;
        o.store(
            Pending::Push {
                to,
                key: Box::new(key.clone()),
            },
            key,
            StoreOp::Read,
        );
    }

    /// The read of `key` to send to `to` finished.
    pub(super) fn push_read(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        (to, key): (NodeId, StoreKey),
        result: Result<Option<Object>, String>,
    ) {
        self.pushes -= 1;
        let object = match result {
            Ok(Some(object)) => object,
            // Gone (reaped meanwhile, or a tree that outlived its data): the tree learns it.
            Ok(None) => return self.tree_set(v, now, (&key, placement(&key)), None),
            // Unreadable: nothing to send; the next exchange retries.
            Err(_) => return,
        };
        o.stats.ae_keys_repaired += 1;
        let timeout = v.cfg.replica_timeout_ms;
        o.request(now, timeout, to, Pending::Repair { node: to }, |id| {
            PeerMsg::ReplicaPut {
                id,
                key,
                object,
                durable: false,
            }
        });
    }

    /// The tombstones of `tree_id` past their grace period that may be reaped, and whether the
    /// floor must be raised for those rule 3 holds back (module docs); `None` without the tree.
    pub(super) fn reap_list(&self, v: &View<'_>, now: u64, tree_id: (u32, u8)) -> Option<ReapList> {
        let grace = v.cfg.tombstone_grace_ms;
        let floor = self.floor_durable;
        let tree = self.trees.get(&tree_id)?;
        let mut ready = Vec::new();
        let mut blocked = false;
        if now < tree.ripe_from {
            return Some(ReapList {
                ready,
                raise_floor: false,
                ripe_from: tree.ripe_from,
            });
        }
        // Only tombstones past their grace are listed: a tree of expiring sessions holds many
        // that are not dead yet. The walk also finds when the first of them will be.
        let next = std::cell::Cell::new(u64::MAX);
        let ripe = |e: &Entry| {
            e.tomb.is_some_and(|t| {
                let from = v.ripe_from(&t);
                next.set(next.get().min(from));
                now >= from
            })
        };
        for (b, k, e) in tree.entries(ripe) {
            let Some(t) = e.tomb else { continue };
            if t.own_epoch.is_some_and(|ep| ep >= floor) {
                blocked = true;
                continue;
            }
            if ready.len() < v.cfg.ae_keys_max {
                ready.push(AeKey {
                    bucket: Bytes::copy_from_slice(b),
                    key: Bytes::copy_from_slice(k),
                    digest: e.digest,
                });
            }
        }
        let raise_floor = blocked
            && self.floor_pending.is_none()
            && self
                .last_raise
                .is_none_or(|at| now >= at.saturating_add(grace));
        Some(ReapList {
            ready,
            raise_floor,
            ripe_from: next.get(),
        })
    }

    /// Starts reaping the tombstones `list` found in `tree_id`: asks every other replica to
    /// confirm them, or drops them at once when there is none.
    pub(super) fn reap(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        now: u64,
        tree_id: (u32, u8),
        list: ReapList,
    ) -> Option<AeEffect> {
        if let Some(tree) = self.trees.get_mut(&tree_id) {
            tree.ripe_from = list.ripe_from;
        }
        let ready = list.ready;
        if ready.is_empty() {
            return None;
        }
        let peers = v.tree_peers(tree_id);
        if peers.iter().any(|&p| !v.live.believed_up(p, now)) {
            return None;
        }
        if peers.is_empty() {
            return Some(AeEffect::Drop {
                partition: tree_id.0,
                keys: ready,
            });
        }
        self.exchange = Some(Exchange {
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
            self.send(v, o, now, peer, |id| PeerMsg::AeReap {
                id,
                partition: tree_id.0,
                n: tree_id.1,
                keys,
            });
        }
        None
    }

    fn reap_answered(&mut self, o: &mut Outbox<'_>, held: Vec<(Bytes, Bytes)>) -> Option<AeEffect> {
        let x = self.exchange.as_mut()?;
        let Step::Reap {
            held: counts, keys, ..
        } = &mut x.step
        else {
            return None;
        };
        for k in held {
            if keys.iter().any(|a| a.bucket == k.0 && a.key == k.1) {
                *counts.entry(k).or_default() += 1;
            }
        }
        if !x.waiting.is_empty() {
            return None;
        }
        let Some(Exchange {
            tree,
            step: Step::Reap { keys, peers, held },
            ..
        }) = self.exchange.take()
        else {
            unreachable!("matched above")
        };
        let confirmed: Vec<AeKey> = keys
            .into_iter()
            .filter(|k| held.get(&(k.bucket.clone(), k.key.clone())) == Some(&peers.len()))
            .collect();
        if confirmed.is_empty() {
            return None;
        }
        for peer in peers {
            // Not awaited: each replica checks its removals under the keys' locks.
            let id = o.id();
            o.send(
                peer,
                PeerMsg::AeDrop {
                    id,
                    partition: tree.0,
                    n: tree.1,
                    keys: confirmed.clone(),
                },
            );
        }
        Some(AeEffect::Drop {
            partition: tree.0,
            keys: confirmed,
        })
    }
}

impl Core {
    /// Anti-entropy's state, with what it reads and writes of the core (`context.rs`).
    fn ae_parts(&mut self) -> (&mut AntiEntropy, View<'_>, Outbox<'_>) {
        let (v, o) = lend!(self);
        (&mut self.ae, v, o)
    }

    /// Carries out what anti-entropy handed back.
    fn ae_effect(&mut self, now: u64, effect: Option<AeEffect>) {
        match effect {
            None => {}
            Some(AeEffect::Reap(tree)) => self.ae_reap(now, tree),
            Some(AeEffect::Drop { partition, keys }) => {
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
    }

    /// Tree `tree` was just found equal to its peers' (or has none): starts reaping its
    /// tombstones past their grace period (module docs), raising the floor first if that is
    /// what keeps them.
    fn ae_reap(&mut self, now: u64, tree: (u32, u8)) {
        let (ae, v, _) = self.ae_parts();
        let Some(list) = ae.reap_list(&v, now, tree) else {
            return;
        };
        if list.raise_floor {
            self.ae_raise_floor(now);
        }
        let (ae, v, mut o) = self.ae_parts();
        let effect = ae.reap(&v, &mut o, now, tree, list);
        self.ae_effect(now, effect);
    }

    /// A fresh epoch becomes the primary epoch and the floor (module docs, rule 3).
    fn ae_raise_floor(&mut self, now: u64) {
        let Some(epoch) = self.fresh_epoch() else {
            return;
        };
        assert!(epoch > self.floor, "fresh epochs are above the floor");
        self.floor = epoch;
        self.epochs.primary = epoch;
        self.ae.floor_raised(epoch, now);
        self.stats.floor_raises += 1;
        self.out.push(Output::PersistFloor { floor: epoch });
    }

    /// Recomputes the trees kept for the ring in force and the pending one.
    pub(super) fn ae_set_ring(&mut self) {
        let (v, _) = lend!(self);
        let pending = self.transfers.pending().map(|(_, r)| r);
        self.ae.set_ring(&v, pending);
    }

    /// Starts an anti-entropy round if one is due.
    pub(super) fn ae_tick(&mut self, now: u64) {
        let share = self.background_share();
        let (ae, v, mut o) = self.ae_parts();
        let effect = ae.tick(&v, &mut o, now, share);
        self.ae_effect(now, effect);
    }

    /// An anti-entropy message from `from`.
    pub(super) fn ae_handle_peer(&mut self, now: u64, from: NodeId, msg: PeerMsg) {
        let (ae, v, mut o) = self.ae_parts();
        let effect = ae.handle_peer(&v, &mut o, now, from, msg);
        self.ae_effect(now, effect);
    }

    /// A read of objects to send to a peer finished.
    pub(super) fn ae_push_read(
        &mut self,
        now: u64,
        push: (NodeId, StoreKey),
        result: Result<Option<Object>, String>,
    ) {
        let (ae, v, mut o) = self.ae_parts();
        ae.push_read(&v, &mut o, now, push, result);
    }

    /// A storage operation on `key` (with its placement hash) is issued under its lock: its
    /// tree follows.
    pub(super) fn ae_written(&mut self, now: u64, key: (&StoreKey, u64), op: &StoreOp) {
        let (ae, v, _) = self.ae_parts();
        ae.written(&v, now, key, op);
    }

    /// A merge under `key`'s lock found `stored` and had nothing to write: the tree is set to
    /// what is stored (a no-op unless the tree had drifted).
    pub(super) fn ae_stored(&mut self, now: u64, key: &StoreKey, stored: Option<&Object>) {
        let (ae, v, _) = self.ae_parts();
        ae.tree_set(&v, now, (key, placement(key)), stored);
    }

    /// A replica write of a key of `bucket` to `node` failed or timed out.
    pub(super) fn ae_suspect(&mut self, partition: u32, bucket: &[u8], node: NodeId) {
        let (ae, v, _) = self.ae_parts();
        ae.suspect(&v, partition, bucket, node);
    }

    /// When the next anti-entropy round is due, if one can start.
    pub(super) fn ae_deadline(&self) -> Option<u64> {
        self.ae.deadline(&self.view())
    }

    /// The shell is about to load the trees of `partitions` from storage while it serves
    /// (module docs): until [`Core::trees_loaded`] says a partition is read whole, anti-entropy
    /// leaves its trees alone and the load does not overwrite entries writes set meanwhile.
    pub fn trees_loading(&mut self, partitions: impl IntoIterator<Item = u32>) {
        self.ae.trees_loading(partitions);
    }

    /// A stored replica object, read from storage to build the trees: the shell calls this for
    /// every key of [`Space::Primary`] of a partition, either before serving (nothing else runs)
    /// or while it is loading (module docs), where a key written since the load began keeps the
    /// entry its write set.
    pub fn load_replica(&mut self, now: u64, key: &StoreKey, object: &Object) {
        let (ae, v, _) = self.ae_parts();
        ae.load_replica(&v, now, key, object);
    }

    /// Every object of `partition` was given to [`Core::load_replica`]: its trees describe the
    /// storage, and anti-entropy may use them.
    pub fn trees_loaded(&mut self, partition: u32) {
        self.ae.trees_loaded(partition);
    }

    /// Partitions whose trees are still loading.
    pub fn trees_loading_count(&self) -> usize {
        self.ae.loading_count()
    }

    /// The raised floor of an [`Output::PersistFloor`] is persisted.
    pub fn handle_floor_persisted(&mut self, floor: u32) {
        self.ae.floor_persisted(floor);
    }

    /// Changes the interval between anti-entropy rounds (0 pauses them): the pacing knob.
    pub fn set_ae_interval_ms(&mut self, interval_ms: u64) {
        self.cfg.ae_interval_ms = interval_ms;
    }

    /// Every tree this core keeps, in (partition, n) order.
    pub fn merkle_roots(&mut self) -> Vec<TreeRoot> {
        self.ae.roots()
    }

    /// An estimate of the keys the cluster holds in buckets with `bucket`'s replica count: the
    /// keys of this node's primary replicas (this core's trees, plus what `other_shards` says
    /// the node's other shards hold in trees of a replica count), times the members, divided by
    /// the replicas per key. Exact on one node; approximate in a cluster, by design (Redis's
    /// `DBSIZE`): it counts other buckets of the same `n`, and deletions and expired keys until
    /// they are reaped.
    pub fn key_estimate(&self, bucket: &[u8], other_shards: impl Fn(u8) -> u64) -> u64 {
        let members = self.ring.members().len().max(1) as u64;
        let tree_n = self.cfg.buckets.props(bucket).n;
        // Copies per key: the bucket's `n`, or every member when there are fewer.
        let n = u64::from(tree_n).min(members);
        let node = self
            .ae
            .keys_of_n(tree_n)
            .saturating_add(other_shards(tree_n));
        node.saturating_mul(members) / n.max(1)
    }

    /// Whether an anti-entropy exchange is running.
    pub fn ae_busy(&self) -> bool {
        self.ae.busy()
    }

    /// Empties the trees of `partition` (a handoff pass rebuilds them).
    pub(super) fn ae_reset_partition(&mut self, partition: u32) {
        self.ae.reset_partition(partition);
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
