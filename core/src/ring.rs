//! The ring: partitioning of the key space, ownership of partitions, and preference lists.
//!
//! This is Dynamo's partitioning strategy 3: the hash space is cut into `Q` equal partitions (a
//! power of two, [`PartitionCount`]), and each partition is owned by exactly one member node. A key
//! belongs to the partition holding its xxh3-64 hash ([`partition_of`]); its replicas live on the
//! first `N` distinct nodes met walking the ring from that partition ([`Ring::preference_list`]),
//! and the walk goes on to yield fallbacks for sloppy quorum ([`Ring::walk`]).
//!
//! What this module owns: the key → partition function, the ownership table, the claim function
//! that recomputes ownership when the member set changes ([`Ring::claim`]), and the walk. It is
//! pure: no IO, no clock, no randomness; every result is a function of its arguments, so every
//! node computing a claim from the same ring and member set gets the same ring.
//!
//! What it does not own: deciding *when* membership changes and ordering concurrent changes
//! (membership, later: a staged plan committed by one node, with [`Ring::version`] as the gossip
//! order), moving the data of transferred partitions (handoff, later; [`Ring::transfers`] lists
//! what has to move), and mapping partitions to shards (`partition % shard_count`, in the runtime).
//!
//! # The claim function's guarantees
//!
//! Given the current ownership and a new member set, [`Ring::claim`] returns a ring in which:
//!
//! 1. **Balance (guaranteed).** Every member owns `⌊Q/n⌋` or `⌈Q/n⌉` partitions. When `n > Q`
//!    that means some members own none; they still appear in walks, after every owner.
//! 2. **Minimal movement (guaranteed).** The number of partitions whose owner changes is the least
//!    any balanced outcome allows: every partition of a departed node moves, and a remaining node
//!    gives up only what it owns beyond its target. Targets are chosen to minimise that: the
//!    `Q mod n` members that currently own the most (ties: lower id) get the `⌈Q/n⌉` targets. The
//!    minimum is `orphans + Σ max(0, cᵢ − ⌊Q/n⌋) − min(Q mod n, #{i : cᵢ > ⌊Q/n⌋})`. From a
//!    balanced ring this means: adding one node to `n` moves exactly `⌊Q/(n+1)⌋` partitions, all
//!    to the new node; removing one moves exactly the removed node's partitions and nothing else.
//! 3. **Distinct successors (best effort).** Within the freedom left by 1 and 2 (which partitions
//!    an over-full node gives up, which under-full node takes each), choices avoid placing a node
//!    within `target_n − 1` partitions of another partition it owns, so that the `target_n`
//!    partitions from any starting point usually have `target_n` distinct owners and preference
//!    lists need no long walks. This can be impossible (fewer than `target_n` members, or `Q` not a
//!    multiple of `n` near the wrap-around) or excluded by minimal movement; then the claim takes
//!    the choice with the fewest repeats. A fresh ring with `n ≥ target_n` members and `n` dividing
//!    `Q` is striped round-robin and has no repeats at all. Observed, and pinned by fixed-seed
//!    tests rather than promised: growing a cluster one node at a time from `target_n ≤ 3` nodes
//!    keeps every window distinct, and a join to a cluster of at least `2·target_n` members adds
//!    no repeat. Leaves are weaker, because orphaned partitions stay where they are and must go
//!    to a node not already nearby: as `n` approaches `target_n` repeats accumulate (shrinking
//!    from 24 to 4 nodes with `Q = 256`, `target_n = 3` left about 40 of 256 windows with a
//!    repeat). A re-striping claim that trades movement for placement does not exist yet.
//!    [`Ring::diversity_violations`] counts what remains, and preference lists are correct either
//!    way: the walk skips repeats.
//! 4. **Determinism (guaranteed).** Same ring, members and `target_n` → same result, on every node.
//!    Everything iterates in a defined order (`BTreeMap`/`BTreeSet`, partition order, node ids).
//!
//! # Limits
//!
//! `Q` in [`PARTITION_COUNT_MIN`]`..=`[`PARTITION_COUNT_MAX`] (power of two), at most
//! [`MEMBERS_MAX`] members, `target_n` in `1..=`[`TARGET_N_MAX`]. A claim costs
//! `O(Q · (target_n² + log n))`; a walk `O(Q · log n)` at worst (it stops once every member has been
//! yielded), a preference list usually `O(N log N)`. The runtime should cache preference lists per
//! partition for each ring version rather than walk per request.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, btree_set};

use xxhash_rust::xxh3::Xxh3Default;

use crate::NodeId;

/// Smallest supported number of partitions.
pub const PARTITION_COUNT_MIN: u32 = 8;
/// Largest supported number of partitions (so a partition id fits the engine's `u32` and a claim
/// stays cheap).
pub const PARTITION_COUNT_MAX: u32 = 65_536;
/// Number of partitions of a new cluster unless configured otherwise.
pub const PARTITION_COUNT_DEFAULT: u32 = 256;
/// Most members a ring can have.
pub const MEMBERS_MAX: usize = 4096;
/// Largest `target_n` (replication factor the claim optimises placement for).
pub const TARGET_N_MAX: usize = 16;

const _: () = assert!(PARTITION_COUNT_MIN.is_power_of_two());
const _: () = assert!(PARTITION_COUNT_MAX.is_power_of_two());
const _: () = assert!(PARTITION_COUNT_DEFAULT.is_power_of_two());
const _: () = assert!(PARTITION_COUNT_MIN <= PARTITION_COUNT_DEFAULT);
const _: () = assert!(PARTITION_COUNT_DEFAULT <= PARTITION_COUNT_MAX);
// The spread order (bit reversal of a u32) and `partition_of`'s shift need 1 ≤ log2(Q) ≤ 32.
const _: () = assert!(PARTITION_COUNT_MIN >= 2);

/// Errors of ring construction and claims: invalid parameters or inconsistent ownership tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The partition count is not a power of two within the supported range.
    #[error(
        "partition count {count} is not a power of two in {PARTITION_COUNT_MIN}..={PARTITION_COUNT_MAX}"
    )]
    InvalidPartitionCount {
        /// The rejected count.
        count: u64,
    },
    /// A ring needs at least one member.
    #[error("a ring needs at least one member")]
    NoMembers,
    /// More members than [`MEMBERS_MAX`].
    #[error("{count} members exceed the limit of {max}")]
    TooManyMembers {
        /// Number of members requested.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// `target_n` outside `1..=TARGET_N_MAX`.
    #[error("target_n {target_n} is not in 1..={max}")]
    InvalidTargetN {
        /// The rejected value.
        target_n: usize,
        /// The limit.
        max: usize,
    },
    /// An ownership table names an owner that is not a member.
    #[error("partition {partition} is owned by {owner}, which is not a member")]
    OwnerNotMember {
        /// The partition.
        partition: u32,
        /// Its owner.
        owner: NodeId,
    },
    /// The ring's version cannot be incremented any further.
    #[error("ring version {version} cannot be incremented")]
    VersionOverflow {
        /// The current version.
        version: u64,
    },
}

/// The number of partitions `Q`: a power of two in
/// [`PARTITION_COUNT_MIN`]`..=`[`PARTITION_COUNT_MAX`], fixed for the life of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionCount(u32);

impl PartitionCount {
    /// [`PARTITION_COUNT_DEFAULT`] partitions.
    pub const DEFAULT: PartitionCount = PartitionCount(PARTITION_COUNT_DEFAULT);

    /// Validates `count`.
    pub fn new(count: u32) -> Result<Self, RingError> {
        if count.is_power_of_two() && (PARTITION_COUNT_MIN..=PARTITION_COUNT_MAX).contains(&count) {
            Ok(PartitionCount(count))
        } else {
            Err(RingError::InvalidPartitionCount {
                count: u64::from(count),
            })
        }
    }

    /// The number of partitions.
    pub fn get(self) -> u32 {
        self.0
    }

    /// `log2(Q)`: how many top bits of the key hash select the partition.
    pub fn bits(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// The partition of `key` in `bucket`. See [`partition_of`].
    pub fn partition_of(self, bucket: &[u8], key: &[u8]) -> PartitionId {
        partition_of(self, bucket, key)
    }

    fn len(self) -> usize {
        self.0 as usize
    }
}

impl Default for PartitionCount {
    fn default() -> Self {
        PartitionCount::DEFAULT
    }
}

/// A partition number in `0..Q`, as stored by the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub u32);

impl PartitionId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

/// The 64-bit placement hash of a key: xxh3-64 (seed 0) over
/// `bucket_len (u64 little-endian) ‖ bucket ‖ key`.
///
/// The length prefix makes the encoding unambiguous: `("ab", "c")` and `("a", "bc")` hash different
/// byte strings. The key needs no prefix because it is last. This hash is part of the on-disk and
/// on-wire contract (it decides where data lives), so it must never change for an existing cluster.
pub fn key_hash(bucket: &[u8], key: &[u8]) -> u64 {
    // Every request hashes its key: the usual sizes are hashed in one call over a copy on the
    // stack, which costs a fraction of the streaming hasher's set-up. Both hash the same bytes.
    const ON_STACK: usize = 128;
    let len = 8 + bucket.len() + key.len();
    if len <= ON_STACK {
        let mut bytes = [0u8; ON_STACK];
        bytes[..8].copy_from_slice(&(bucket.len() as u64).to_le_bytes());
        bytes[8..8 + bucket.len()].copy_from_slice(bucket);
        bytes[8 + bucket.len()..len].copy_from_slice(key);
        return xxhash_rust::xxh3::xxh3_64(&bytes[..len]);
    }
    let mut hasher = Xxh3Default::new();
    hasher.update(&(bucket.len() as u64).to_le_bytes());
    hasher.update(bucket);
    hasher.update(key);
    hasher.digest()
}

/// The partition of `key` in `bucket`: the top `log2(Q)` bits of [`key_hash`].
///
/// Top bits rather than a modulo so that partition `p` of a ring with `Q` partitions is exactly the
/// union of partitions `2p` and `2p + 1` of a ring with `2Q`: partitions are contiguous ranges of
/// the hash space, which keeps a future split of the ring a local operation.
pub fn partition_of(count: PartitionCount, bucket: &[u8], key: &[u8]) -> PartitionId {
    partition_of_hash(count, key_hash(bucket, key))
}

/// The partition of a key whose [`key_hash`] is `hash` (see [`partition_of`]).
pub fn partition_of_hash(count: PartitionCount, hash: u64) -> PartitionId {
    let partition = hash >> (64 - count.bits());
    debug_assert!(partition < u64::from(count.get()));
    PartitionId(partition as u32)
}

/// One partition changing owner between two rings (see [`Ring::transfers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Transfer {
    /// The partition.
    pub partition: PartitionId,
    /// Its owner in the older ring.
    pub from: NodeId,
    /// Its owner in the newer ring.
    pub to: NodeId,
}

/// Ownership of all partitions, plus the member set and a version.
///
/// Invariants (checked on construction): `Q` owners, one per partition, each a member; at least
/// one and at most [`MEMBERS_MAX`] members. Members may own no partition (only when `n > Q` after a
/// claim). Balance is *not* an invariant of the type: a ring received from elsewhere is accepted
/// as is, and [`Ring::claim`] rebalances it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    version: u64,
    count: PartitionCount,
    owners: Vec<NodeId>,
    members: BTreeSet<NodeId>,
}

impl Ring {
    /// A fresh ring (version 1) for `members`, claimed from scratch: every partition is assigned
    /// as if its previous owner had left, so the result is balanced and, where possible, striped.
    pub fn new(
        count: PartitionCount,
        members: &BTreeSet<NodeId>,
        target_n: usize,
    ) -> Result<Ring, RingError> {
        validate_members(members)?;
        validate_target_n(target_n)?;
        let previous = vec![None; count.len()];
        let owners = claim_owners(count, previous, members, target_n);
        Ring::from_parts(1, owners, members.clone())
    }

    /// A ring from its parts (for example received from a peer), validated: `owners.len()` must be
    /// a valid partition count and every owner a member. Balance is not required.
    pub fn from_parts(
        version: u64,
        owners: Vec<NodeId>,
        members: BTreeSet<NodeId>,
    ) -> Result<Ring, RingError> {
        let count = u32::try_from(owners.len())
            .map_err(|_| RingError::InvalidPartitionCount {
                count: owners.len() as u64,
            })
            .and_then(PartitionCount::new)?;
        validate_members(&members)?;
        for (partition, owner) in owners.iter().enumerate() {
            if !members.contains(owner) {
                return Err(RingError::OwnerNotMember {
                    partition: partition as u32,
                    owner: *owner,
                });
            }
        }
        Ok(Ring {
            version,
            count,
            owners,
            members,
        })
    }

    /// The ring for a new member set, computed by the claim function (see the module docs for its
    /// guarantees). The version goes up by one if ownership or membership changed; a claim with
    /// the current members returns an identical ring when it is already balanced.
    pub fn claim(&self, members: &BTreeSet<NodeId>, target_n: usize) -> Result<Ring, RingError> {
        validate_members(members)?;
        validate_target_n(target_n)?;
        let previous = self
            .owners
            .iter()
            .map(|owner| members.contains(owner).then_some(*owner))
            .collect();
        let owners = claim_owners(self.count, previous, members, target_n);
        if owners == self.owners && *members == self.members {
            return Ok(self.clone());
        }
        let version = self
            .version
            .checked_add(1)
            .ok_or(RingError::VersionOverflow {
                version: self.version,
            })?;
        Ring::from_parts(version, owners, members.clone())
    }

    /// The version: 1 for a fresh ring, incremented by every claim that changes something.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The number of partitions `Q`.
    pub fn partition_count(&self) -> PartitionCount {
        self.count
    }

    /// The members, in id order.
    pub fn members(&self) -> &BTreeSet<NodeId> {
        &self.members
    }

    /// The owner of every partition, indexed by partition number.
    pub fn owners(&self) -> &[NodeId] {
        &self.owners
    }

    /// The owner of `partition`.
    ///
    /// # Panics
    ///
    /// If `partition` is not below `Q` (a partition id from a ring of another size).
    pub fn owner(&self, partition: PartitionId) -> NodeId {
        self.assert_partition(partition);
        self.owners[partition.index()]
    }

    /// How many partitions each member owns (members owning none included), in id order.
    pub fn ownership_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> = self.members.iter().map(|m| (*m, 0)).collect();
        for owner in &self.owners {
            *counts.entry(*owner).or_default() += 1;
        }
        counts
    }

    /// The partitions `node` owns, in partition order.
    pub fn partitions_of(&self, node: NodeId) -> impl Iterator<Item = PartitionId> + '_ {
        self.owners
            .iter()
            .enumerate()
            .filter(move |(_, owner)| **owner == node)
            .map(|(partition, _)| PartitionId(partition as u32))
    }

    /// The partition of `key` in `bucket` on this ring. See [`partition_of`].
    pub fn partition_of(&self, bucket: &[u8], key: &[u8]) -> PartitionId {
        partition_of(self.count, bucket, key)
    }

    /// The first `n` distinct nodes walking the ring from `partition`: the key's home replicas.
    /// Has `min(n, members)` entries.
    ///
    /// # Panics
    ///
    /// If `partition` is not below `Q`.
    pub fn preference_list(&self, partition: PartitionId, n: usize) -> Vec<NodeId> {
        self.walk(partition).take(n).collect()
    }

    /// Every member exactly once, in preference order from `partition`: the owners met walking the
    /// ring (skipping nodes already yielded), then members that own no partition, in id order. The
    /// first `n` items are [`Ring::preference_list`]; the rest are the fallbacks for sloppy quorum,
    /// best first.
    ///
    /// # Panics
    ///
    /// If `partition` is not below `Q`.
    pub fn walk(&self, partition: PartitionId) -> Walk<'_> {
        self.assert_partition(partition);
        Walk {
            ring: self,
            start: partition.index(),
            steps: 0,
            seen: BTreeSet::new(),
            idle: self.members.iter(),
        }
    }

    /// The partitions whose owner differs between `self` and `next`, in partition order: what
    /// handoff has to move to go from one ring to the other.
    ///
    /// # Panics
    ///
    /// If the rings have different partition counts (resizing a ring is not supported).
    pub fn transfers(&self, next: &Ring) -> Vec<Transfer> {
        assert_eq!(
            self.count, next.count,
            "transfers between rings of different sizes"
        );
        self.owners
            .iter()
            .zip(&next.owners)
            .enumerate()
            .filter(|(_, (from, to))| from != to)
            .map(|(partition, (from, to))| Transfer {
                partition: PartitionId(partition as u32),
                from: *from,
                to: *to,
            })
            .collect()
    }

    /// How many partitions `p` have a repeated owner among the `n` partitions `p, p+1, …, p+n−1`
    /// (wrapping): those whose preference list of `n` needs a walk longer than `n` partitions. 0
    /// is the ideal the claim aims for; see the module docs for when it cannot be reached.
    pub fn diversity_violations(&self, n: usize) -> usize {
        let q = self.count.len();
        let window = n.min(q);
        let mut in_window = BTreeSet::new();
        (0..q)
            .filter(|start| {
                in_window.clear();
                (0..window).any(|d| !in_window.insert(self.owners[(start + d) % q]))
            })
            .count()
    }

    fn assert_partition(&self, partition: PartitionId) {
        assert!(
            partition.0 < self.count.get(),
            "partition {} out of range for a ring of {} partitions",
            partition.0,
            self.count.get()
        );
    }
}

/// Iterator over a ring's members in preference order from one partition (see [`Ring::walk`]).
#[derive(Debug, Clone)]
pub struct Walk<'a> {
    ring: &'a Ring,
    start: usize,
    /// Partitions visited so far; the ring part of the walk ends after `Q`.
    steps: usize,
    seen: BTreeSet<NodeId>,
    /// Members in id order, scanned after the ring part for those owning nothing.
    idle: btree_set::Iter<'a, NodeId>,
}

impl Iterator for Walk<'_> {
    type Item = NodeId;

    fn next(&mut self) -> Option<NodeId> {
        let q = self.ring.owners.len();
        // Every member yielded: stop without walking the rest of the ring.
        if self.seen.len() == self.ring.members.len() {
            return None;
        }
        while self.steps < q {
            let owner = self.ring.owners[(self.start + self.steps) % q];
            self.steps += 1;
            if self.seen.insert(owner) {
                return Some(owner);
            }
        }
        for member in self.idle.by_ref() {
            if self.seen.insert(*member) {
                return Some(*member);
            }
        }
        None
    }
}

fn validate_members(members: &BTreeSet<NodeId>) -> Result<(), RingError> {
    if members.is_empty() {
        return Err(RingError::NoMembers);
    }
    if members.len() > MEMBERS_MAX {
        return Err(RingError::TooManyMembers {
            count: members.len(),
            max: MEMBERS_MAX,
        });
    }
    Ok(())
}

fn validate_target_n(target_n: usize) -> Result<(), RingError> {
    if (1..=TARGET_N_MAX).contains(&target_n) {
        Ok(())
    } else {
        Err(RingError::InvalidTargetN {
            target_n,
            max: TARGET_N_MAX,
        })
    }
}

/// The claim function. `previous[p]` is the current owner of `p` if it stays a member, `None` if
/// the partition is orphaned (its owner left, or a fresh ring). Returns the new owner of every
/// partition. Validation of the arguments is the caller's.
///
/// Steps: (1) targets: the `Q mod n` members owning the most get `⌈Q/n⌉`, the rest `⌊Q/n⌋`;
/// (2) orphans, in partition order, go to the under-target member with the fewest repeats near
/// them; (3) over-target members give up exactly their surplus, in three passes over the
/// partitions in spread order, each stricter pass first: moves that remove a repeat and add none,
/// then moves that add no repeat, then any move (fewest repeats). Only (2) and (3) move
/// partitions, and each moved partition fills one unit of some member's deficit, which is why the
/// count of moves is the minimum.
fn claim_owners(
    count: PartitionCount,
    mut owners: Vec<Option<NodeId>>,
    members: &BTreeSet<NodeId>,
    target_n: usize,
) -> Vec<NodeId> {
    let q = count.len();
    let n = members.len();
    assert_eq!(owners.len(), q);
    assert!(n > 0);

    let mut counts: BTreeMap<NodeId, usize> = members.iter().map(|m| (*m, 0)).collect();
    for owner in owners.iter().flatten() {
        *counts
            .get_mut(owner)
            .expect("previous owners are filtered to members") += 1;
    }

    // Giving the ⌈Q/n⌉ targets to the members that own the most minimises the surplus that has to
    // move; ties go to the lower id so that every node picks the same members.
    let mut by_count: Vec<(Reverse<usize>, NodeId)> =
        counts.iter().map(|(m, c)| (Reverse(*c), *m)).collect();
    by_count.sort_unstable();
    let mut surplus: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut receivers = Receivers::default();
    for (rank, (Reverse(current), member)) in by_count.into_iter().enumerate() {
        let target = q / n + usize::from(rank < q % n);
        if current > target {
            surplus.insert(member, current - target);
        } else if current < target {
            receivers.add(member, target - current);
        }
    }
    let orphans = owners.iter().filter(|o| o.is_none()).count();
    assert_eq!(
        orphans + surplus.values().sum::<usize>(),
        receivers.total_need(),
        "partitions to move must equal the total deficit"
    );

    for partition in 0..q {
        if owners[partition].is_none() {
            let (receiver, _) = receivers
                .best(&owners, partition, target_n)
                .expect("every orphan has a receiver: orphans are part of the deficit");
            owners[partition] = Some(receiver);
            receivers.take(receiver);
        }
    }

    for pass in [Pass::RelievesRepeat, Pass::NoNewRepeat, Pass::Any] {
        for i in 0..q {
            if receivers.is_empty() {
                break;
            }
            let partition = spread(i, count.bits());
            let owner = owners[partition].expect("orphans were assigned first");
            let Some(owner_surplus) = surplus.get_mut(&owner).filter(|s| **s > 0) else {
                continue;
            };
            if pass == Pass::RelievesRepeat && repeats(&owners, partition, owner, target_n) == 0 {
                continue;
            }
            let (receiver, added) = receivers
                .best(&owners, partition, target_n)
                .expect("receivers is not empty");
            if pass != Pass::Any && added > 0 {
                continue;
            }
            *owner_surplus -= 1;
            owners[partition] = Some(receiver);
            receivers.take(receiver);
        }
    }

    assert!(receivers.is_empty(), "every deficit is filled");
    assert!(
        surplus.values().all(|s| *s == 0),
        "every surplus is given up"
    );
    owners
        .into_iter()
        .map(|o| o.expect("every partition is assigned"))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Only moves that take a partition from an owner with a repeat near it to a receiver without.
    RelievesRepeat,
    /// Only moves that give the receiver no repeat.
    NoNewRepeat,
    /// Any move; the receiver with the fewest repeats.
    Any,
}

/// Members below their target, ordered by remaining deficit (largest first) then id: the largest
/// deficit goes first so a fresh ring is striped round-robin rather than filled node by node.
#[derive(Default)]
struct Receivers {
    need: BTreeMap<NodeId, usize>,
    order: BTreeSet<(Reverse<usize>, NodeId)>,
}

impl Receivers {
    fn add(&mut self, member: NodeId, need: usize) {
        assert!(need > 0);
        let previous = self.need.insert(member, need);
        assert!(previous.is_none(), "a member is added once");
        self.order.insert((Reverse(need), member));
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn total_need(&self) -> usize {
        self.need.values().sum()
    }

    /// The receiver for `partition` with the fewest repeats near it, and that count. Ties go to
    /// the larger deficit, then the lower id. Stops at the first receiver without a repeat: the
    /// window holds at most `2(target_n − 1)` nodes, so this looks at no more than `2·target_n − 1`
    /// receivers.
    fn best(
        &self,
        owners: &[Option<NodeId>],
        partition: usize,
        target_n: usize,
    ) -> Option<(NodeId, usize)> {
        let mut best: Option<(NodeId, usize)> = None;
        for (_, member) in &self.order {
            let r = repeats(owners, partition, *member, target_n);
            if best.is_none_or(|(_, fewest)| r < fewest) {
                best = Some((*member, r));
            }
            if r == 0 {
                break;
            }
        }
        best
    }

    fn take(&mut self, member: NodeId) {
        let need = self
            .need
            .get_mut(&member)
            .expect("only receivers are given partitions");
        let removed = self.order.remove(&(Reverse(*need), member));
        assert!(removed);
        *need -= 1;
        if *need == 0 {
            self.need.remove(&member);
        } else {
            self.order.insert((Reverse(*need), member));
        }
        assert_eq!(self.need.len(), self.order.len());
    }
}

/// How many partitions within distance `target_n − 1` of `partition` (either side, wrapping,
/// `partition` itself excluded) `node` owns. 0 means owning `partition` puts `node` at most once
/// in every window of `target_n` consecutive partitions containing it.
fn repeats(owners: &[Option<NodeId>], partition: usize, node: NodeId, target_n: usize) -> usize {
    let q = owners.len();
    let reach = target_n.min(q);
    (1..reach)
        .map(|d| {
            usize::from(owners[(partition + d) % q] == Some(node))
                + usize::from(owners[(partition + q - d) % q] == Some(node))
        })
        .sum()
}

/// The `i`-th partition in spread order: `i` with its `bits` low bits reversed. Visiting partitions
/// 0, Q/2, Q/4, 3Q/4, … spreads the partitions a new node takes evenly around the ring instead of
/// piling them at its start.
fn spread(i: usize, bits: u32) -> usize {
    debug_assert!(i < 1 << bits);
    ((i as u32).reverse_bits() >> (32 - bits)) as usize
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn members(ids: impl IntoIterator<Item = u32>) -> BTreeSet<NodeId> {
        ids.into_iter().map(NodeId).collect()
    }

    /// The hash equals the one-shot hash of the documented byte string, so the encoding in the
    /// docs is the real one: for keys hashed on the stack and for longer ones, streamed, on both
    /// sides of the limit between them.
    #[test]
    fn key_hash_is_xxh3_of_length_prefixed_bucket_and_key() {
        let mut bytes = 3u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abcxyz");
        assert_eq!(key_hash(b"abc", b"xyz"), xxhash_rust::xxh3::xxh3_64(&bytes));
        assert_ne!(key_hash(b"ab", b"c"), key_hash(b"a", b"bc"));
        for len in [0, 1, 100, 113, 114, 115, 120, 200, 300, 5000] {
            let key: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut bytes = 6u64.to_le_bytes().to_vec();
            bytes.extend_from_slice(b"bucket");
            bytes.extend_from_slice(&key);
            assert_eq!(
                key_hash(b"bucket", &key),
                xxhash_rust::xxh3::xxh3_64(&bytes),
                "key of {len} bytes"
            );
        }
    }

    #[test]
    fn partition_count_is_validated() {
        for ok in [8, 16, 256, 65_536] {
            assert_eq!(PartitionCount::new(ok).unwrap().get(), ok);
        }
        for bad in [0, 1, 4, 7, 12, 255, 131_072] {
            assert!(PartitionCount::new(bad).is_err(), "{bad}");
        }
        assert_eq!(PartitionCount::DEFAULT.get(), 256);
        assert_eq!(PartitionCount::DEFAULT.bits(), 8);
    }

    #[test]
    fn spread_is_a_permutation() {
        for bits in [3, 6, 10] {
            let seen: BTreeSet<usize> = (0..1 << bits).map(|i| spread(i, bits)).collect();
            assert_eq!(seen.len(), 1 << bits);
            assert_eq!(spread(1, bits), 1 << (bits - 1));
        }
    }

    /// A fresh ring whose size divides Q is a round-robin stripe in id order.
    #[test]
    fn fresh_ring_is_striped() {
        let ring = Ring::new(PartitionCount::new(16).unwrap(), &members([7, 3, 5, 9]), 3).unwrap();
        let expected: Vec<NodeId> = [3, 5, 7, 9].repeat(4).into_iter().map(NodeId).collect();
        assert_eq!(ring.owners(), expected.as_slice());
        assert_eq!(ring.diversity_violations(3), 0);
        assert_eq!(ring.diversity_violations(4), 0);
        assert_eq!(ring.version(), 1);
    }

    /// An over-full node gives up the partition whose move removes a repeat, not the first one
    /// met: node 3 owns 0, 5 and 6 (5 and 6 adjacent) and must give one to node 1; 0 comes first
    /// in spread order, but moving it would leave the repeat.
    #[test]
    fn surplus_is_taken_where_it_removes_a_repeat() {
        let owners = [3, 0, 1, 2, 0, 3, 3, 2].map(NodeId).to_vec();
        let ring = Ring::from_parts(1, owners, members([0, 1, 2, 3])).unwrap();
        assert_eq!(ring.diversity_violations(2), 1);
        let next = ring.claim(&members([0, 1, 2, 3]), 2).unwrap();
        assert_eq!(
            next.owners(),
            [3, 0, 1, 2, 0, 3, 1, 2].map(NodeId).as_slice()
        );
        assert_eq!(next.diversity_violations(2), 0);
        assert_eq!(next.version(), 2);
    }

    #[test]
    fn invalid_arguments_are_rejected() {
        let count = PartitionCount::new(8).unwrap();
        assert_eq!(
            Ring::new(count, &BTreeSet::new(), 3),
            Err(RingError::NoMembers)
        );
        assert!(matches!(
            Ring::new(count, &members([1]), 0),
            Err(RingError::InvalidTargetN { .. })
        ));
        assert!(matches!(
            Ring::new(count, &members(0..MEMBERS_MAX as u32 + 1), 3),
            Err(RingError::TooManyMembers { .. })
        ));
        assert!(matches!(
            Ring::from_parts(1, vec![NodeId(1); 8], members([2])),
            Err(RingError::OwnerNotMember { .. })
        ));
        assert!(matches!(
            Ring::from_parts(1, vec![NodeId(1); 12], members([1])),
            Err(RingError::InvalidPartitionCount { count: 12 })
        ));
        let last = Ring::from_parts(u64::MAX, vec![NodeId(1); 8], members([1])).unwrap();
        assert!(matches!(
            last.claim(&members([1, 2]), 3),
            Err(RingError::VersionOverflow { .. })
        ));
    }

    /// More members than partitions: the surplus members own nothing but still come last in walks.
    #[test]
    fn members_without_partitions_are_fallbacks() {
        let ring = Ring::new(PartitionCount::new(8).unwrap(), &members(0..10), 3).unwrap();
        let counts = ring.ownership_counts();
        assert_eq!(counts.len(), 10);
        assert_eq!(counts.values().filter(|c| **c == 1).count(), 8);
        let walk: Vec<NodeId> = ring.walk(PartitionId(0)).collect();
        assert_eq!(walk.len(), 10);
        assert_eq!(&walk[8..], &[NodeId(8), NodeId(9)]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn foreign_partition_ids_panic() {
        let ring = Ring::new(PartitionCount::new(8).unwrap(), &members([1]), 1).unwrap();
        let _ = ring.preference_list(PartitionId(8), 3);
    }
}
