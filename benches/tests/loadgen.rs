//! The load generator's pure parts: the command line's grammar (durations, value ranges,
//! targets, defaults), the key generators (in range and skewed as YCSB's, from fixed seeds) and
//! the open-loop schedule (exact intended start times, computed without a clock).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use rand::SeedableRng;
use rand::rngs::StdRng;
use ringkv_bench::load::RunArgs;
use ringkv_bench::load::keygen::{KeyChooser, Zipfian};
use ringkv_bench::load::schedule::{Lane, intended_offset_ns, ops_due_before};
use ringkv_bench::load::spec::{
    Distribution, Protocol, Target, ValueSize, Workload, parse_duration,
};

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn parse(args: &[&str]) -> RunArgs {
    Cli::try_parse_from(std::iter::once("ringkv-bench").chain(args.iter().copied()))
        .unwrap()
        .run
}

/// Durations take ms, s, m and h, fractions, and bare seconds; nonsense is refused.
#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("20s").unwrap(), Duration::from_secs(20));
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
    assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    for bad in ["", "s", "10x", "-1s", "1..2s", "100d", "25h"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
    }
}

/// A value size is one number or an inclusive range, never empty, never above 1 MiB.
#[test]
fn value_sizes_are_fixed_or_ranged() {
    assert_eq!(
        "100".parse::<ValueSize>().unwrap(),
        ValueSize { min: 100, max: 100 }
    );
    assert_eq!(
        "100..1000".parse::<ValueSize>().unwrap(),
        ValueSize {
            min: 100,
            max: 1000
        }
    );
    assert_eq!(
        "1..=8".parse::<ValueSize>().unwrap(),
        ValueSize { min: 1, max: 8 }
    );
    assert_eq!(
        "64..256".parse::<ValueSize>().unwrap().to_string(),
        "64..256"
    );
    for bad in ["", "abc", "10..5", "1..", "2000000", "-5"] {
        assert!(bad.parse::<ValueSize>().is_err(), "{bad:?} was accepted");
    }
}

/// Targets name a protocol and one or more host:port addresses.
#[test]
fn targets_parse() {
    let t: Target = "ringkv://127.0.0.1:7878".parse().unwrap();
    assert_eq!(t.protocol, Protocol::Ringkv);
    assert_eq!(t.addrs, vec!["127.0.0.1:7878"]);
    let t: Target = "redis://a:6379,b:6380".parse().unwrap();
    assert_eq!(t.protocol, Protocol::Resp);
    assert_eq!(t.addrs, vec!["a:6379", "b:6380"]);
    assert_eq!(t.to_string(), "redis://a:6379,b:6380");
    for bad in [
        "127.0.0.1:7878",
        "http://a:1",
        "ringkv://a",
        "ringkv://a:port",
        "ringkv://:1",
    ] {
        assert!(bad.parse::<Target>().is_err(), "{bad:?} was accepted");
    }
}

/// The defaults make a meaningful run on their own, and the flags reach the arguments.
#[test]
fn flags_and_defaults() {
    let a = parse(&[]);
    assert_eq!(a.workload, Workload::A);
    assert_eq!(a.duration, Duration::from_secs(20));
    assert!(a.rate.is_none(), "closed loop by default");
    assert!(a.target.is_none() && a.spawn_local.is_none());
    assert!(a.keys > 0 && a.connections > 0 && a.pipeline > 0);

    let a = parse(&[
        "--spawn-local",
        "3",
        "-w",
        "cart",
        "--distribution",
        "uniform",
        "--value-size",
        "10..20",
        "--rate",
        "5000",
        "--duration",
        "1s",
        "--warmup",
        "250ms",
        "--keys",
        "42",
        "--json",
        "out.json",
    ]);
    assert_eq!(a.spawn_local, Some(3));
    assert_eq!(a.workload, Workload::Cart);
    assert_eq!(a.distribution, Some(Distribution::Uniform));
    assert_eq!(a.value_size, Some(ValueSize { min: 10, max: 20 }));
    assert_eq!(a.rate, Some(5000));
    assert_eq!(a.duration, Duration::from_secs(1));
    assert_eq!(a.warmup, Duration::from_millis(250));
    assert_eq!(a.keys, 42);

    // One target or a local cluster, not both.
    assert!(Cli::try_parse_from(["x", "--spawn-local", "1", "--target", "redis://a:1"]).is_err());
    assert!(Cli::try_parse_from(["x", "--duration", "forever"]).is_err());
    assert!(Cli::try_parse_from(["x", "-w", "z"]).is_err());

    assert_eq!(Workload::D.default_distribution(), Distribution::Latest);
    assert_eq!(Workload::A.default_bucket(), "ycsb");
    assert_eq!(Workload::Cart.default_bucket(), "cart");
    assert_eq!(Workload::CartMap.default_bucket(), "maps");
}

fn counts(chooser: &mut KeyChooser, keys: u64, draws: usize, seed: u64) -> BTreeMap<u64, u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = BTreeMap::new();
    for _ in 0..draws {
        let k = chooser.next(&mut rng, keys);
        assert!(k < keys, "key {k} out of 0..{keys}");
        *c.entry(k).or_default() += 1;
    }
    c
}

fn top_share(c: &BTreeMap<u64, u64>, top: usize, draws: usize) -> f64 {
    let mut v: Vec<u64> = c.values().copied().collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.iter().take(top).sum::<u64>() as f64 / draws as f64
}

/// Zipfian ranks stay in range and follow YCSB's skew: with θ = 0.99 over 10,000 ranks, rank 0
/// gets about 1/ζ(10000) ≈ 10% of the draws and the top 1% of the ranks well over a third.
/// Uniform keys show no such skew. Fixed seeds: the counts are deterministic.
#[test]
fn zipfian_keys_are_in_range_and_skewed() {
    let keys = 10_000;
    let draws = 200_000;
    let z = Zipfian::new(keys, 0.99);
    let mut rng = StdRng::seed_from_u64(7);
    let mut rank0 = 0;
    for _ in 0..draws {
        let r = z.next_rank(&mut rng);
        assert!(r < keys);
        if r == 0 {
            rank0 += 1;
        }
    }
    let share0 = rank0 as f64 / draws as f64;
    assert!((0.07..0.14).contains(&share0), "rank 0 got {share0}");

    let zipf = counts(
        &mut KeyChooser::new(Distribution::Zipfian, keys),
        keys,
        draws,
        1,
    );
    let uniform = counts(
        &mut KeyChooser::new(Distribution::Uniform, keys),
        keys,
        draws,
        1,
    );
    let zipf_top = top_share(&zipf, 100, draws);
    let uniform_top = top_share(&uniform, 100, draws);
    assert!(zipf_top > 0.35, "top 1% of zipfian keys got {zipf_top}");
    assert!(
        uniform_top < 0.03,
        "top 1% of uniform keys got {uniform_top}"
    );
    // Scrambled: the hot keys are not simply the lowest key numbers.
    let low_share: u64 = zipf.range(..100).map(|(_, n)| n).sum();
    assert!((low_share as f64 / draws as f64) < 0.2);
}

/// `latest` favours the newest keys, and follows the key space as it grows (YCSB D inserts).
#[test]
fn latest_keys_favour_the_newest() {
    let draws = 100_000;
    let mut chooser = KeyChooser::new(Distribution::Latest, 1000);
    let c = counts(&mut chooser, 1000, draws, 3);
    let newest: u64 = c.range(990..).map(|(_, n)| n).sum();
    assert!(newest as f64 / draws as f64 > 0.3, "newest 1% got {newest}");
    assert!(c.get(&999).copied().unwrap_or(0) > c.get(&0).copied().unwrap_or(0));

    // After 500 inserts the newest keys are the new ones, and the range grew.
    let c = counts(&mut chooser, 1500, draws, 4);
    let newest: u64 = c.range(1490..).map(|(_, n)| n).sum();
    assert!(newest as f64 / draws as f64 > 0.3);
    assert!(c.keys().all(|k| *k < 1500));
    assert!(c.range(1000..).next().is_some());
}

/// Growing a zipfian generator incrementally gives the same generator as building it at the
/// final size (the same draws from the same seed).
#[test]
fn zipfian_grows_incrementally() {
    let mut grown = Zipfian::new(100, 0.99);
    grown.grow_to(5000);
    let fresh = Zipfian::new(5000, 0.99);
    assert_eq!(grown.items(), 5000);
    let (mut a, mut b) = (StdRng::seed_from_u64(9), StdRng::seed_from_u64(9));
    for _ in 0..10_000 {
        let (x, y) = (grown.next_rank(&mut a), fresh.next_rank(&mut b));
        // Floating-point sums in a different order may differ in the last bit.
        assert!(x.abs_diff(y) <= 1, "{x} vs {y}");
    }
}

/// Operation i is intended at exactly i / rate seconds: evenly spaced, no drift however far
/// into the run, and the lanes of the connections interleave to cover every operation once.
#[test]
fn open_loop_schedule_is_exact() {
    assert_eq!(intended_offset_ns(0, 1000), 0);
    assert_eq!(intended_offset_ns(1, 1000), 1_000_000);
    assert_eq!(intended_offset_ns(3, 3), 1_000_000_000);
    // 1/3 s, rounded down to the nanosecond, never accumulated.
    assert_eq!(intended_offset_ns(1, 3), 333_333_333);
    assert_eq!(intended_offset_ns(2, 3), 666_666_666);
    // One hour at 1M ops/s: still exact.
    assert_eq!(
        intended_offset_ns(3_600_000_000, 1_000_000),
        3_600_000_000_000
    );
    for rate in [1, 7, 1000, 123_457] {
        for i in 0..1000 {
            assert!(intended_offset_ns(i + 1, rate) > intended_offset_ns(i, rate));
        }
    }

    // Operations due before t: exactly rate * t, rounded up (operation 0 is due at 0).
    assert_eq!(ops_due_before(0, 1000), 0);
    assert_eq!(ops_due_before(1, 1000), 1);
    assert_eq!(ops_due_before(1_000_000_000, 1000), 1000);
    assert_eq!(ops_due_before(1_000_000_001, 1000), 1001);
    for rate in [3, 1000, 99_991] {
        for i in 0..500u64 {
            let t = intended_offset_ns(i, rate);
            assert!(ops_due_before(t, rate) <= i);
            assert!(ops_due_before(t + 1, rate) > i);
        }
    }

    let lanes: Vec<Lane> = (0..4).map(|l| Lane::new(l, 4, 10_000)).collect();
    let mut seen: Vec<u64> = Vec::new();
    for lane in &lanes {
        for k in 0..250 {
            let op = lane.op_number(k);
            assert_eq!(lane.intended_offset_ns(k), intended_offset_ns(op, 10_000));
            seen.push(op);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    // Within a lane the spacing is lanes / rate.
    assert_eq!(
        lanes[1].intended_offset_ns(1) - lanes[1].intended_offset_ns(0),
        400_000
    );
}
