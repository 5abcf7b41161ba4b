//! Property tests of the DVVSet laws stated in `core/src/dvv.rs`, and of the context decoder.
//!
//! Clocks are not generated field by field: a random history of reads, writes (blind or based on
//! an earlier read) and one-way syncs runs on up to four replicas, and every clock it produces
//! goes into a pool. That keeps the precondition of the laws (a dot names one value) true, as it
//! is in a real cluster. A model records every write's dot and context, and the values of each
//! replica are checked against it after every step.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use ringkv_core::NodeId;
use ringkv_core::dvv::Actor;
use ringkv_core::dvv::{CONTEXT_ENTRIES_MAX, COUNTER_MAX, Dot, DvvSet, Put, VersionVector};

type Clock = DvvSet<u32>;

#[derive(Clone, Debug)]
enum Op {
    /// A client reads replica `at`.
    Read { at: usize },
    /// A client writes at replica `at`, based on read number `read` (modulo the reads so far),
    /// or blind.
    Write { at: usize, read: Option<usize> },
    /// Replica `to` merges replica `from`'s clock (anti-entropy, read repair, handoff).
    Sync { from: usize, to: usize },
}

fn ops() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (1usize..=4).prop_flat_map(|replicas| {
        let op = prop_oneof![
            (0..replicas).prop_map(|at| Op::Read { at }),
            (0..replicas, prop::option::of(any::<usize>()))
                .prop_map(|(at, read)| Op::Write { at, read }),
            (0..replicas, 0..replicas).prop_map(|(from, to)| Op::Sync { from, to }),
        ];
        (Just(replicas), prop::collection::vec(op, 1..40))
    })
}

struct Read {
    at: usize,
    context: VersionVector,
    returned: BTreeSet<u32>,
}

struct Write {
    dot: Dot,
    context: VersionVector,
}

/// The result of running a history: every clock seen, and the writes for the model.
struct History {
    pool: Vec<Clock>,
}

fn values(clock: &Clock) -> BTreeSet<u32> {
    clock.values().copied().collect()
}

/// The model's answer for a clock: the writes whose dots its history covers, minus those whose
/// dots the context of another covered write covers.
fn expected_values(clock: &Clock, writes: &[Write]) -> BTreeSet<u32> {
    let history = clock.join();
    let known: Vec<(u32, &Write)> = writes
        .iter()
        .enumerate()
        .filter(|(_, w)| history.contains(w.dot))
        .map(|(i, w)| (i as u32, w))
        .collect();
    known
        .iter()
        .filter(|(_, w)| !known.iter().any(|(_, other)| other.context.contains(w.dot)))
        .map(|(value, _)| *value)
        .collect()
}

/// Runs `ops` on `replicas` replicas (actor of replica i is node i, epoch 0), checking laws 3 and 6
/// along the way. The value of the i-th write is i, so values are unique.
fn run(replicas: usize, ops: &[Op]) -> History {
    let mut clocks: Vec<Clock> = vec![DvvSet::empty(); replicas];
    let mut reads: Vec<Read> = Vec::new();
    let mut writes: Vec<Write> = Vec::new();
    let mut pool: Vec<Clock> = vec![DvvSet::empty()];
    for op in ops {
        match op {
            Op::Read { at } => reads.push(Read {
                at: *at,
                context: clocks[*at].join(),
                returned: values(&clocks[*at]),
            }),
            Op::Write { at, read } => {
                let value = writes.len() as u32;
                let read = read
                    .filter(|_| !reads.is_empty())
                    .map(|r| &reads[r % reads.len()]);
                let context = read.map(|r| r.context.clone()).unwrap_or_default();
                let before = clocks[*at].clone();
                let after = DvvSet::update(
                    Put::new_with_context(context.clone(), value),
                    before.clone(),
                    Actor::from(NodeId(*at as u32)),
                );
                let dot = after.dots().find(|(_, v)| **v == value).unwrap().0;
                assert_eq!(dot.actor, Actor::from(NodeId(*at as u32)));
                assert_eq!(
                    dot.counter,
                    before.join().get(dot.actor).max(context.get(dot.actor)) + 1
                );
                // Law 3, general form: the put removes exactly the values its context covers.
                let survivors: BTreeSet<u32> = before
                    .dots()
                    .filter(|(d, _)| !context.contains(*d))
                    .map(|(_, v)| *v)
                    .collect();
                let mut expected = survivors;
                expected.insert(value);
                assert_eq!(values(&after), expected);
                // Law 3, same replica: exactly what the read returned is superseded.
                if let Some(read) = read.filter(|r| r.at == *at) {
                    let mut expected: BTreeSet<u32> = values(&before)
                        .difference(&read.returned)
                        .copied()
                        .collect();
                    expected.insert(value);
                    assert_eq!(values(&after), expected);
                }
                writes.push(Write { dot, context });
                clocks[*at] = after;
            }
            Op::Sync { from, to } => {
                clocks[*to] = clocks[*to].clone().sync(clocks[*from].clone());
            }
        }
        // Law 6: every replica holds exactly what the model says.
        for clock in &clocks {
            assert_eq!(values(clock), expected_values(clock, &writes));
        }
        pool.extend(clocks.iter().cloned());
    }
    History { pool }
}

fn sync(a: &Clock, b: &Clock) -> Clock {
    a.clone().sync(b.clone())
}

proptest! {
    /// Laws 3 and 6 hold at every step of random histories (checked inside `run`).
    #[test]
    fn replicas_hold_exactly_the_unsuperseded_writes((replicas, ops) in ops()) {
        let _ = run(replicas, &ops);
    }

    /// Law 1: sync is commutative, associative, idempotent, with the empty clock as identity.
    /// Law 2: the history of a sync is the pointwise max of the histories, so it dominates both.
    #[test]
    fn sync_is_a_lattice_join(
        (replicas, ops) in ops(),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 3),
    ) {
        let history = run(replicas, &ops);
        let a = picks[0].get(&history.pool);
        let b = picks[1].get(&history.pool);
        let c = picks[2].get(&history.pool);
        prop_assert_eq!(sync(a, b), sync(b, a));
        prop_assert_eq!(sync(&sync(a, b), c), sync(a, &sync(b, c)));
        prop_assert_eq!(&sync(a, a), a);
        prop_assert_eq!(&sync(a, &DvvSet::empty()), a);
        let joined = sync(a, b).join();
        prop_assert_eq!(&joined, &a.join().merge(&b.join()));
        prop_assert!(joined.descends(&a.join()));
        prop_assert!(joined.descends(&b.join()));
    }

    /// Laws 4 and 5: two puts with the same stale context, on the same coordinator or on two,
    /// become two siblings; a put with the merged context of both resolves to one value.
    #[test]
    fn same_context_puts_are_siblings_and_merged_context_resolves(
        (replicas, ops) in ops(),
        pick in any::<prop::sample::Index>(),
        same_coordinator in any::<bool>(),
    ) {
        let history = run(replicas, &ops);
        let start = pick.get(&history.pool).clone();
        let context = start.join();
        let (a, b, c) = (Actor::from(NodeId(10)), Actor::from(NodeId(if same_coordinator { 10 } else { 11 })), Actor::from(NodeId(12)));
        let first = DvvSet::update(Put::new_with_context(context.clone(), 1_000_000), start.clone(), a);
        let both = if same_coordinator {
            DvvSet::update(Put::new_with_context(context, 1_000_001), first, b)
        } else {
            let second = DvvSet::update(Put::new_with_context(context, 1_000_001), start, b);
            first.sync(second)
        };
        prop_assert_eq!(values(&both), BTreeSet::from([1_000_000, 1_000_001]));
        let resolved = DvvSet::update(Put::new_with_context(both.join(), 1_000_002), both.clone(), c);
        prop_assert_eq!(values(&resolved), BTreeSet::from([1_000_002]));
        prop_assert_eq!(resolved.size(), 1);
        prop_assert!(resolved.join().descends(&both.join()));
    }

    /// Discarding a context and adding its history is sync with an empty-valued clock: values
    /// whose dots the context covers go, the others stay, and the history absorbs the context.
    #[test]
    fn discard_removes_exactly_covered_values(
        (replicas, ops) in ops(),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 2),
    ) {
        let history = run(replicas, &ops);
        let clock = picks[0].get(&history.pool);
        let context = picks[1].get(&history.pool).join();
        let discarded = clock.clone().discard(&context);
        let expected: BTreeSet<u32> =
            clock.dots().filter(|(d, _)| !context.contains(*d)).map(|(_, v)| *v).collect();
        prop_assert_eq!(values(&discarded), expected);
        prop_assert_eq!(discarded.join(), clock.join().merge(&context));
    }

    /// Encoding round-trips for every vector the decoder accepts (counters up to
    /// `COUNTER_MAX`).
    #[test]
    fn contexts_round_trip(
        entries in prop::collection::btree_map(any::<u32>(), 1u64..=COUNTER_MAX, 0..=CONTEXT_ENTRIES_MAX),
    ) {
        let vv: VersionVector = entries.into_iter().map(|(a, c)| (Actor::from(NodeId(a)), c)).collect();
        let bytes = vv.encode();
        prop_assert_eq!(VersionVector::decode(&bytes), Ok(vv));
    }

    /// Arbitrary bytes never panic the decoder, and whatever it accepts is canonical: it encodes
    /// back to the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(vv) = VersionVector::decode(&bytes) {
            prop_assert_eq!(vv.encode(), bytes);
        }
    }

    /// Well-formed headers over entries that may be unsorted, repeated, zero, above
    /// `COUNTER_MAX` or cut short, so the entry checks are reached rather than only the length
    /// check.
    #[test]
    fn nearly_valid_bytes_never_panic(
        entries in prop::collection::vec((0u32..4, prop_oneof![Just(0u64), Just(1), any::<u64>()]), 0..5),
        extra in 0u32..2,
        cut in 0usize..2,
    ) {
        let count = entries.len() as u32 + extra;
        let mut bytes = vec![2];
        bytes.extend_from_slice(&count.to_le_bytes());
        for (actor, counter) in &entries {
            // Node `actor`, epoch 0.
            bytes.extend_from_slice(&actor.to_le_bytes());
            bytes.extend_from_slice(&0u32.to_le_bytes());
            bytes.extend_from_slice(&counter.to_le_bytes());
        }
        bytes.truncate(bytes.len() - cut.min(bytes.len() - 5));
        match VersionVector::decode(&bytes) {
            Ok(vv) => {
                prop_assert_eq!(vv.len(), count as usize);
                prop_assert_eq!(vv.encode(), bytes);
            }
            Err(_) => {
                let sorted = entries.windows(2).all(|w| w[0].0 < w[1].0);
                let counters = entries.iter().all(|(_, c)| (1..=COUNTER_MAX).contains(c));
                prop_assert!(!(sorted && counters && extra == 0 && cut == 0));
            }
        }
    }
}
