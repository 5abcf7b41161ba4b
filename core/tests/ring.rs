//! Property tests of the ring: the claim function's balance and minimal-movement guarantees, the
//! exact movement when one node joins or leaves, preference lists and walks, determinism, and the
//! key → partition function.
//!
//! Rings under test are built the way a cluster builds them: a fresh ring, then a random sequence
//! of joins and leaves, each a claim on the previous ring. Arbitrary (unbalanced, with departed
//! owners) tables are tested too, since a claim must repair any ring it is given.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use ringkv_core::NodeId;
use ringkv_core::ring::{PartitionCount, PartitionId, Ring, partition_of};

fn counts() -> impl Strategy<Value = PartitionCount> {
    prop_oneof![Just(8u32), Just(64), Just(256), Just(1024)]
        .prop_map(|q| PartitionCount::new(q).unwrap())
}

/// 1..=64 distinct node ids drawn from a wider range, so ids are not always 0..n.
fn member_sets() -> impl Strategy<Value = BTreeSet<NodeId>> {
    prop::collection::btree_set(0u32..200, 1..=64)
        .prop_map(|ids| ids.into_iter().map(NodeId).collect())
}

/// Membership changes applied one claim at a time: `true` adds the given id, `false` removes the
/// member at the given index (if more than one is left).
fn changes() -> impl Strategy<Value = Vec<(bool, u32)>> {
    prop::collection::vec((any::<bool>(), 0u32..200), 0..8)
}

fn evolve(ring: Ring, changes: &[(bool, u32)], target_n: usize) -> Ring {
    let mut ring = ring;
    for (add, id) in changes {
        let mut members = ring.members().clone();
        if *add {
            members.insert(NodeId(*id));
        } else if members.len() > 1 {
            let victim = *members.iter().nth(*id as usize % members.len()).unwrap();
            members.remove(&victim);
        }
        ring = ring.claim(&members, target_n).unwrap();
        assert_balanced(&ring);
    }
    ring
}

fn assert_balanced(ring: &Ring) {
    let q = ring.partition_count().get() as usize;
    let n = ring.members().len();
    let counts = ring.ownership_counts();
    assert_eq!(
        counts.len(),
        n,
        "every member is counted, owners are members"
    );
    for (node, count) in counts {
        assert!(count >= q / n, "{node} owns {count} < floor({q}/{n})");
        assert!(
            count <= q.div_ceil(n),
            "{node} owns {count} > ceil({q}/{n})"
        );
    }
}

/// The least number of owner changes any balanced outcome allows, computed independently of the
/// claim's algorithm: orphans must move; a member above ⌊Q/n⌋ gives up its excess, except that up
/// to `Q mod n` of them may keep one more.
fn minimum_moves(before: &[NodeId], members: &BTreeSet<NodeId>) -> usize {
    let q = before.len();
    let n = members.len();
    let floor = q / n;
    let orphans = before.iter().filter(|o| !members.contains(o)).count();
    let mut excess = 0;
    let mut above = 0;
    for member in members {
        let c = before.iter().filter(|o| *o == member).count();
        if c > floor {
            excess += c - floor;
            above += 1;
        }
    }
    orphans + excess - above.min(q % n)
}

proptest! {
    /// A fresh ring and every ring reached by joins and leaves is balanced: each member owns
    /// ⌊Q/n⌋ or ⌈Q/n⌉ partitions.
    #[test]
    fn claims_are_balanced(
        count in counts(),
        members in member_sets(),
        changes in changes(),
        target_n in 1usize..=5,
    ) {
        let ring = Ring::new(count, &members, target_n).unwrap();
        assert_balanced(&ring);
        let _ = evolve(ring, &changes, target_n);
    }

    /// From any ownership table (unbalanced, with owners that left) to any member set, the claim
    /// is balanced and moves exactly the minimum number of partitions.
    #[test]
    fn claims_from_arbitrary_tables_move_the_minimum(
        count in counts(),
        owner_ids in prop::collection::vec(0u32..12, 1024),
        members in prop::collection::btree_set(0u32..16, 1..=12),
        target_n in 1usize..=5,
    ) {
        let q = count.get() as usize;
        let owners: Vec<NodeId> = owner_ids[..q].iter().copied().map(NodeId).collect();
        let old_members: BTreeSet<NodeId> = owners.iter().copied().collect();
        let before = Ring::from_parts(7, owners, old_members).unwrap();
        let members: BTreeSet<NodeId> = members.into_iter().map(NodeId).collect();
        let after = before.claim(&members, target_n).unwrap();
        assert_balanced(&after);
        let moved = before.transfers(&after).len();
        prop_assert_eq!(moved, minimum_moves(before.owners(), &members));
        // A partition whose owner stays and is not over target keeps its owner: checked in
        // aggregate by the equality above, since any extra move would exceed the minimum.
    }

    /// Adding one node to a balanced ring of n moves exactly ⌊Q/(n+1)⌋ partitions (so at most
    /// ⌈Q/(n+1)⌉, with no slack), every one of them to the new node.
    #[test]
    fn adding_a_node_moves_only_to_it(
        count in counts(),
        members in member_sets(),
        changes in changes(),
        new_id in 200u32..300,
        target_n in 1usize..=5,
    ) {
        let ring = evolve(Ring::new(count, &members, target_n).unwrap(), &changes, target_n);
        let q = count.get() as usize;
        let n = ring.members().len();
        let mut grown = ring.members().clone();
        grown.insert(NodeId(new_id));
        let next = ring.claim(&grown, target_n).unwrap();
        let transfers = ring.transfers(&next);
        prop_assert_eq!(transfers.len(), q / (n + 1));
        prop_assert!(transfers.len() <= q.div_ceil(n + 1));
        for t in &transfers {
            prop_assert_eq!(t.to, NodeId(new_id));
        }
        prop_assert_eq!(next.version(), ring.version() + 1);
    }

    /// Removing one node from a balanced ring moves exactly the removed node's partitions.
    #[test]
    fn removing_a_node_moves_only_its_partitions(
        count in counts(),
        members in prop::collection::btree_set(0u32..200, 2..=64),
        changes in changes(),
        victim in any::<prop::sample::Index>(),
        target_n in 1usize..=5,
    ) {
        let members: BTreeSet<NodeId> = members.into_iter().map(NodeId).collect();
        let mut ring = evolve(Ring::new(count, &members, target_n).unwrap(), &changes, target_n);
        if ring.members().len() < 2 {
            let mut two = ring.members().clone();
            two.insert(NodeId(1000));
            ring = ring.claim(&two, target_n).unwrap();
        }
        let victim = **victim.get(&ring.members().iter().collect::<Vec<_>>());
        let mut shrunk = ring.members().clone();
        shrunk.remove(&victim);
        let next = ring.claim(&shrunk, target_n).unwrap();
        let moved: Vec<PartitionId> = ring.transfers(&next).iter().map(|t| t.partition).collect();
        let owned: Vec<PartitionId> = ring.partitions_of(victim).collect();
        prop_assert_eq!(moved, owned);
    }

    /// Preference lists have min(n, members) distinct nodes; a walk yields every member exactly
    /// once, starts with the partition's owner and extends the preference list.
    #[test]
    fn preference_lists_are_distinct_and_walks_cover_members(
        count in counts(),
        members in member_sets(),
        changes in changes(),
        partition in any::<prop::sample::Index>(),
        n in 1usize..=8,
    ) {
        let ring = evolve(Ring::new(count, &members, 3).unwrap(), &changes, 3);
        let partition = PartitionId(partition.index(count.get() as usize) as u32);
        let list = ring.preference_list(partition, n);
        prop_assert_eq!(list.len(), n.min(ring.members().len()));
        prop_assert_eq!(list.iter().collect::<BTreeSet<_>>().len(), list.len());
        prop_assert_eq!(list[0], ring.owner(partition));
        let walk: Vec<NodeId> = ring.walk(partition).collect();
        prop_assert_eq!(&walk[..list.len()], list.as_slice());
        prop_assert_eq!(walk.len(), ring.members().len());
        prop_assert_eq!(walk.iter().collect::<BTreeSet<_>>(), ring.members().iter().collect());
    }

    /// The claim is a function of its inputs: repeating it, or building the member set in another
    /// order, gives the same ring; claiming again with the same members changes nothing.
    #[test]
    fn claims_are_deterministic_and_idempotent(
        count in counts(),
        ids in prop::collection::vec(0u32..200, 1..=64),
        changes in changes(),
        target_n in 1usize..=5,
    ) {
        let forward: BTreeSet<NodeId> = ids.iter().copied().map(NodeId).collect();
        let backward: BTreeSet<NodeId> = ids.iter().rev().copied().map(NodeId).collect();
        let a = evolve(Ring::new(count, &forward, target_n).unwrap(), &changes, target_n);
        let b = evolve(Ring::new(count, &backward, target_n).unwrap(), &changes, target_n);
        prop_assert_eq!(&a, &b);
        let again = a.claim(&a.members().clone(), target_n).unwrap();
        prop_assert_eq!(&again, &a);
    }

    /// A fresh ring with at least target_n members and a member count dividing Q has no repeated
    /// owner in any window of target_n partitions.
    #[test]
    fn fresh_striped_rings_have_no_repeats(
        count in counts(),
        log_n in 0u32..=6,
        offset in 0u32..1000,
        target_n in 1usize..=5,
    ) {
        let n = 1u32 << log_n;
        prop_assume!(n as usize >= target_n && n <= count.get());
        let members: BTreeSet<NodeId> = (0..n).map(|i| NodeId(offset + 7 * i)).collect();
        let ring = Ring::new(count, &members, target_n).unwrap();
        prop_assert_eq!(ring.diversity_violations(target_n), 0);
    }

    /// Partitions are in range and are top-bit prefixes: partition p of Q is partition 2p or
    /// 2p+1 of 2Q.
    #[test]
    fn partitions_nest_when_q_doubles(
        bucket in prop::collection::vec(any::<u8>(), 0..16),
        key in prop::collection::vec(any::<u8>(), 0..64),
        bits in 3u32..16,
    ) {
        let small = PartitionCount::new(1 << bits).unwrap();
        let large = PartitionCount::new(1 << (bits + 1)).unwrap();
        let p = partition_of(small, &bucket, &key);
        let p2 = partition_of(large, &bucket, &key);
        prop_assert!(p.0 < small.get());
        prop_assert_eq!(p2.0 / 2, p.0);
    }
}

proptest! {
    // These two pin observed behaviour of the best-effort placement, not guarantees, so they run
    // from a fixed seed: a failure means a change made placement worse, never bad luck. Both held
    // for thousands of random-seed cases when written.
    #![proptest_config(ProptestConfig {
        rng_seed: RngSeed::Fixed(0x5249_4e47),
        ..ProptestConfig::default()
    })]

    /// Best-effort placement, pinned as a regression rather than promised: growing a cluster one
    /// node at a time from a fresh ring of target_n ≤ 3 nodes, every ring with more than target_n
    /// members has target_n distinct owners in every window of target_n partitions. (Shrinking
    /// and larger target_n can leave repeats; see the docs of `ring.rs`.)
    #[test]
    fn growing_clusters_keep_distinct_successors(
        count in prop_oneof![Just(64u32), Just(256), Just(1024)]
            .prop_map(|q| PartitionCount::new(q).unwrap()),
        ids in prop::collection::btree_set(0u32..1000, 4..=20)
            .prop_map(|ids| ids.into_iter().map(NodeId).collect::<Vec<_>>())
            .prop_shuffle(),
        target_n in 1usize..=3,
    ) {
        let mut members: BTreeSet<NodeId> = ids[..target_n].iter().copied().collect();
        let mut ring = Ring::new(count, &members, target_n).unwrap();
        for id in &ids[target_n..] {
            members.insert(*id);
            ring = ring.claim(&members, target_n).unwrap();
            prop_assert_eq!(ring.diversity_violations(target_n), 0, "{} members", members.len());
        }
    }

    /// Best-effort placement, pinned as a regression rather than promised: after any history of
    /// joins and leaves, a join to a cluster of at least 2·target_n members does not add repeated
    /// owners to windows of target_n partitions, and fixes some where the donors allow it.
    #[test]
    fn joins_do_not_add_repeats(
        count in counts(),
        members in prop::collection::btree_set(0u32..200, 1..=48),
        changes in prop::collection::vec((any::<bool>(), 0u32..200), 0..16),
        new_id in 200u32..300,
        target_n in 1usize..=4,
    ) {
        let members: BTreeSet<NodeId> = members.into_iter().map(NodeId).collect();
        let ring = evolve(Ring::new(count, &members, target_n).unwrap(), &changes, target_n);
        prop_assume!(ring.members().len() >= 2 * target_n);
        let mut grown = ring.members().clone();
        grown.insert(NodeId(new_id));
        let next = ring.claim(&grown, target_n).unwrap();
        prop_assert!(
            next.diversity_violations(target_n) <= ring.diversity_violations(target_n),
            "{} -> {}",
            ring.diversity_violations(target_n),
            next.diversity_violations(target_n)
        );
    }
}
