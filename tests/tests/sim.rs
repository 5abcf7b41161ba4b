//! The cluster simulator over many seeds (see `ringkv_tests::sim` for what a run does and checks).
//!
//! `RINGKV_SIM_SEEDS` sets how many seeds run (default 1000), `RINGKV_SIM_START` the first one;
//! `RINGKV_SIM_SEED` replays a single seed. A failing seed prints the command that replays it,
//! and a replay produces the same trace every time.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ringkv_tests::sim::{Outcome, Sim};

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn run_seed(seed: u64) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| Sim::new(seed).run())) {
        Ok(outcome) => {
            faults_were_injected(seed, &outcome);
            outcome
        }
        Err(e) => {
            let what = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!(
                "simulation seed {seed} failed: {what}\nreplay: RINGKV_SIM_SEED={seed} cargo test \
                 -p ringkv-tests --test sim -- --nocapture"
            );
        }
    }
}

/// The faults a seed's parameters turn on were injected in that very run, so that even one
/// replayed seed notices a simulator that stopped injecting them: every run with partitions
/// (or crashes) had at least one, and every run with any fault knob had some fault. (Drops and
/// duplicates are not asked of each run one by one: at 10 per mille of a few hundred messages,
/// a run may legitimately see none.)
fn faults_were_injected(seed: u64, o: &Outcome) {
    let p = &o.params;
    let (drops, dups, partitions) = o.injected;
    let why = format!(
        "seed {seed}: {p:?}, injected (drops, duplicates, partitions) {:?}, crashes {}",
        o.injected, o.crashes
    );
    assert!(
        !p.partitions || partitions > 0,
        "no partition was injected; {why}"
    );
    assert!(!p.crashes || o.crashes > 0, "no crash was injected; {why}");
    // Every node may be down for a whole short run (a power loss with long outages): then
    // every freeze event found nothing to freeze, and says so.
    assert!(
        !p.freezes || o.freezes > 0 || o.freezes_blocked > 0,
        "no freeze was injected; {why}"
    );
    assert!(
        !p.store_faults || o.store_faults.0 > 0,
        "no storage fault was armed; {why}"
    );
    // Message loss and duplication count only where the run is long enough for them to be
    // expected: at 1% of a few hundred messages, a run with none is chance, not a simulator
    // that stopped injecting (`events` overcounts the messages, so this errs towards skipping).
    let expected = |permille: u32| o.events * u64::from(permille) / 1000 >= 100;
    let any_knob =
        p.partitions || p.crashes || expected(p.drop_permille) || expected(p.dup_permille);
    assert!(
        !any_knob || drops + dups + partitions + o.crashes as u64 > 0,
        "no fault was injected; {why}"
    );
}

/// Every seed keeps every promise the checkers test; the totals show the runs exercised the
/// paths they are meant to (siblings, hints, repairs, crashes), so a simulator that silently
/// stopped injecting faults would fail here.
#[test]
fn seeds_keep_the_promises() {
    if let Some(seed) = env("RINGKV_SIM_SEED") {
        // Checks its own fault coverage (`faults_were_injected`), as every seed does.
        let outcome = run_seed(seed);
        println!("seed {seed}: {outcome:?}");
        return;
    }
    let count = env("RINGKV_SIM_SEEDS").unwrap_or(1000);
    let start = env("RINGKV_SIM_START").unwrap_or(0);
    let mut totals = (0usize, 0usize, 0u64, 0u64, 0u64, 0usize, 0u64, 0u64, 0u64);
    let mut freezes = 0usize;
    let mut blind_writes = 0u64;
    // Forwards moved to another home, and refused by a home as read or stamped after their
    // apply-by time.
    let mut forwards = (0u64, 0u64);
    let mut ae = (0usize, 0u64, 0u64, 0u64, 0u64, 0usize, 0u64);
    let mut membership = (0usize, 0u64, 0u64, 0usize);
    // Storage faults that struck, acknowledged writes by dw, dw = 0 writes lost unsynced.
    let mut durability = (0usize, [0usize; 3], 0usize);
    // Convergent operations acknowledged, increments retried, retries whose coordinator held
    // the first attempt, counts a retry added twice, acknowledged removes held to their add,
    // those whose coordinator had not seen it, and acknowledged operations lost unsynced.
    let mut convergent = (0usize, 0usize, 0usize, 0i64, 0usize, 0usize, 0usize);
    // One hash over every seed's trace, in seed order: a change that claims to leave behaviour
    // alone (a refactor) prints the same value for the same seed range.
    let mut traces = 0xcbf2_9ce4_8422_2325u64;
    for seed in start..start + count {
        let o = run_seed(seed);
        traces = (traces ^ o.trace).wrapping_mul(0x0100_0000_01b3);
        totals.0 += o.acked_writes;
        totals.1 += o.sibling_reads;
        totals.2 += o.hinted_writes;
        totals.3 += o.hints_delivered;
        totals.4 += o.read_repairs;
        totals.5 += o.crashes;
        totals.6 += o.batched_jobs;
        ae.0 += o.acked_deletes;
        ae.1 += o.ae_exchanges;
        ae.2 += o.ae_keys_repaired;
        ae.3 += o.tombstones_reaped;
        ae.4 += o.floor_raises;
        ae.5 += o.stale_writes;
        ae.6 = ae.6.max(o.converge_ms);
        totals.7 += o.hint_overflow;
        totals.8 += o.credits_granted;
        freezes += o.freezes;
        blind_writes += o.blind_writes;
        forwards.0 += o.forwards.0;
        forwards.1 += o.forwards.1;
        membership.0 += o.changes;
        membership.1 += o.partitions_received;
        membership.2 += o.partitions_dropped;
        membership.3 += o.retired;
        durability.0 += o.store_faults.1;
        for (total, n) in durability.1.iter_mut().zip(o.acked_by_dw) {
            *total += n;
        }
        durability.2 += o.lost_unsynced;
        convergent.0 += o.crdt_acked;
        convergent.1 += o.crdt_retries;
        convergent.2 += o.retries_held;
        convergent.3 += o.double_counted;
        convergent.4 += o.removes_checked;
        convergent.5 += o.removes_unseen;
        convergent.6 += o.crdt_lost_unsynced;
    }
    println!(
        "{count} seeds: {} acknowledged writes, {} reads with siblings, {} hinted writes, {} hints \
         delivered, {} read repairs, {} crashes, {} batched jobs, {} hints refused (store \
         full), {} hint credits granted, {} freezes, {} lww writes made without a read",
        totals.0,
        totals.1,
        totals.2,
        totals.3,
        totals.4,
        totals.5,
        totals.6,
        totals.7,
        totals.8,
        freezes,
        blind_writes
    );
    println!(
        "anti-entropy: {} acknowledged deletes, {} exchanges, {} keys repaired, {} tombstones \
         reaped, {} floor raises, {} writes with pre-delete contexts, convergence within {} ms",
        ae.0, ae.1, ae.2, ae.3, ae.4, ae.5, ae.6
    );
    println!(
        "forwards: {} moved to another home, {} refused as read or stamped after their apply-by \
         time",
        forwards.0, forwards.1
    );
    println!("traces of seeds {start}..{}: {traces:#018x}", start + count);
    println!(
        "membership: {} changes committed, {} partitions received, {} partitions dropped after \
         handoff, {} nodes retired",
        membership.0, membership.1, membership.2, membership.3
    );
    println!(
        "durability: {} storage faults, acknowledged writes by dw (0, 1, 2) {:?}, {} dw = 0 \
         writes or deletes lost unsynced by crashes",
        durability.0, durability.1, durability.2
    );
    println!(
        "convergent types: {} operations acknowledged, {} increments retried ({} through a \
         coordinator holding the first attempt), {} counted twice by a retry, {} acknowledged \
         removes whose coordinator held the add, {} whose did not, {} dw = 0 operations lost \
         unsynced by crashes",
        convergent.0,
        convergent.1,
        convergent.2,
        convergent.3,
        convergent.4,
        convergent.5,
        convergent.6
    );
    if count >= 100 {
        assert!(totals.1 > 0, "no run produced siblings");
        assert!(totals.2 > 0 && totals.3 > 0, "no run used hinted handoff");
        assert!(totals.4 > 0, "no run repaired a replica");
        assert!(totals.5 > 0, "no run crashed a node");
        assert!(totals.6 > 0, "no run batched jobs on a key");
        assert!(
            blind_writes > 0,
            "no run wrote an lww key without reading it"
        );
        assert!(ae.0 > 0, "no run deleted a key");
        assert!(ae.2 > 0, "anti-entropy never repaired a replica");
        assert!(ae.3 > 0 && ae.4 > 0, "no run reaped a tombstone");
        assert!(ae.5 > 0, "no run wrote with a pre-delete context");
        assert!(totals.7 > 0, "no run filled a hint store");
        assert!(
            forwards.0 > 0 && forwards.1 > 0,
            "no run moved a forward off a silent home, or refused a late one: {forwards:?}"
        );
        assert!(totals.8 > 0, "no run granted hint credit");
        assert!(
            membership.0 > 0 && membership.1 > 0 && membership.2 > 0,
            "no run changed membership and moved partitions"
        );
        assert!(membership.3 > 0, "no node that left handed off and retired");
        assert!(durability.0 > 0, "no storage fault struck");
        assert!(
            durability.2 > 0,
            "no run lost a dw = 0 write with every unsynced copy (the crashes never met the window)"
        );
        assert!(
            durability.1.iter().all(|n| *n > 0),
            "some dw was never acknowledged: {:?}",
            durability.1
        );
        assert!(
            convergent.0 > 0 && convergent.2 > 0 && convergent.4 > 0,
            "no run acknowledged convergent operations, retried an increment through a \
             coordinator holding the first attempt, or removed an element its coordinator held: \
             {convergent:?}"
        );
    }
}

/// The same seed gives the same trace: a failure replays exactly.
#[test]
fn a_seed_replays_exactly() {
    for seed in [1, 7, 42] {
        let a = run_seed(seed);
        let b = run_seed(seed);
        assert_eq!(a.trace, b.trace);
        assert_eq!(a.events, b.events);
    }
}
