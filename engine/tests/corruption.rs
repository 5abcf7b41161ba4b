//! Corruption sweep: damage a sealed segment every way a disk or a crash can, and check that
//! recovery never panics, keeps every intact record, never returns damaged bytes as a value, and
//! reports what it lost.
//!
//! One pristine store (one segment of records with distinct keys and sizes that straddle 4 KiB
//! blocks) is copied for each case, then: truncated at every record boundary, truncated at random
//! offsets, or given random bit flips. Cases run without the hint file (so the scanner does the
//! work) and, for bit flips, also with it (so damage is caught by the CRC check on read instead).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng, rngs::StdRng};
use ringkv_engine::record::{self, HEADER_BYTES};
use ringkv_engine::{Durability, Engine, EngineConfig, EngineError};

const RECORDS: usize = 60;

fn key(i: usize) -> Vec<u8> {
    format!("key-{i:04}").into_bytes()
}

fn value(i: usize) -> Vec<u8> {
    let len = [7, 300, 1500, 4000, 9000][i % 5] + i;
    (0..len).map(|j| (j * 13 + i * 101) as u8).collect()
}

/// A record of the pristine segment: its key index and byte span (covered by its CRC).
#[derive(Clone, Copy, Debug)]
struct Span {
    i: usize,
    start: u64,
    covered_end: u64,
    end: u64,
}

fn segment_file(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "the pristine store has one segment");
    segs.pop().unwrap()
}

fn copy_store(from: &Path, to: &Path, with_hint: bool) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        if name == "LOCK" || (!with_hint && p.extension().is_some_and(|x| x == "hint")) {
            continue;
        }
        std::fs::copy(&p, to.join(name)).unwrap();
    }
}

/// What a damaged store must still answer: every intact record exactly, nothing else ever.
async fn verify(
    cfg: EngineConfig,
    spans: &[Span],
    intact: impl Fn(&Span) -> bool,
    case: &str,
) -> (usize, usize) {
    let e = Engine::open(cfg)
        .await
        .unwrap_or_else(|err| panic!("{case}: open failed: {err}"));
    let report = e.recovery_report().clone();
    let mut lost = 0;
    for s in spans {
        match e.get(0, &key(s.i)).await {
            Ok(Some(v)) => assert_eq!(
                &v[..],
                &value(s.i)[..],
                "{case}: record {} returned wrong bytes",
                s.i
            ),
            Ok(None) => {
                assert!(
                    !intact(s),
                    "{case}: intact record {} lost; report {report:?}",
                    s.i
                );
                lost += 1;
            }
            Err(EngineError::Corrupt { .. }) => {
                assert!(!intact(s), "{case}: intact record {} reported corrupt", s.i);
                lost += 1;
            }
            Err(err) => panic!("{case}: unexpected error {err}"),
        }
    }
    let reported =
        report.corrupt_regions.len() + report.torn_tails.len() + e.stats().corrupt_reads as usize;
    e.close().await.unwrap();
    (lost, reported)
}

#[test]
fn corruption_sweep() {
    common::run(|dir| async move {
        let pristine = dir.join("pristine");
        let mut cfg = common::config(&pristine);
        cfg.cache_bytes = 0;
        let e = Engine::open(cfg.clone()).await.unwrap();
        for i in 0..RECORDS {
            e.put(0, &key(i), &value(i), Durability::Buffered)
                .await
                .unwrap();
        }
        e.close().await.unwrap();
        let seg_name = segment_file(&pristine).file_name().unwrap().to_owned();
        let bytes = std::fs::read(pristine.join(&seg_name)).unwrap();
        let mut spans = Vec::new();
        let mut off = 0usize;
        while let Ok(r) = record::decode(&bytes[off..]) {
            if r.kind == record::RecordKind::Put {
                let i: usize = std::str::from_utf8(&r.key[4..]).unwrap().parse().unwrap();
                let covered = HEADER_BYTES + r.key.len() + r.value.len();
                spans.push(Span {
                    i,
                    start: off as u64,
                    covered_end: (off + covered) as u64,
                    end: (off + r.len) as u64,
                });
            }
            off += r.len;
        }
        assert_eq!(spans.len(), RECORDS);
        let data_len = off as u64;
        let work = dir.join("work");
        let mut wcfg = cfg.clone();
        wcfg.dir = work.clone();
        let mut rng = StdRng::seed_from_u64(
            std::env::var("RINGKV_CORRUPTION_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(7),
        );
        let random_cases: usize = std::env::var("RINGKV_CORRUPTION_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(80);

        // 1. Truncation at every record boundary: exactly the records before it survive, and a
        //    clean cut is not reported as damage.
        for s in &spans {
            copy_store(&pristine, &work, false);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(work.join(&seg_name))
                .unwrap();
            f.set_len(s.start).unwrap();
            let cut = s.start;
            let (lost, reported) = verify(
                wcfg.clone(),
                &spans,
                |x| x.end <= cut,
                &format!("cut at {cut}"),
            )
            .await;
            assert_eq!(lost, spans.iter().filter(|x| x.end > cut).count());
            assert_eq!(reported, 0, "a cut on a record boundary is a clean end");
        }
        // 2. Truncation at random offsets: a cut inside a record is a torn tail, reported and
        //    truncated; a second open finds nothing more to repair.
        for _ in 0..random_cases {
            let cut = rng.gen_range(1..data_len);
            copy_store(&pristine, &work, false);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(work.join(&seg_name))
                .unwrap();
            f.set_len(cut).unwrap();
            let case = format!("random cut at {cut}");
            let (lost, reported) = verify(wcfg.clone(), &spans, |x| x.end <= cut, &case).await;
            let torn = spans.iter().any(|x| x.start < cut && cut < x.end);
            assert_eq!(lost, spans.iter().filter(|x| x.end > cut).count(), "{case}");
            if torn && cut % 8 != 0 {
                assert!(reported > 0, "{case}: torn record not reported");
            }
            let (_, again) = verify(wcfg.clone(), &spans, |x| x.end <= cut, &case).await;
            assert_eq!(again, 0, "{case}: the first recovery truncated the tail");
        }
        // 3. Bit flips, with and without the hint file.
        for case_no in 0..random_cases * 2 {
            let with_hint = case_no % 2 == 1;
            copy_store(&pristine, &work, with_hint);
            let path = work.join(&seg_name);
            let mut b = std::fs::read(&path).unwrap();
            let flips: Vec<u64> = (0..rng.gen_range(1..4))
                .map(|_| rng.gen_range(0..data_len))
                .collect();
            for &at in &flips {
                b[at as usize] ^= 1 << rng.gen_range(0..8);
            }
            std::fs::write(&path, &b).unwrap();
            let hit = |x: &Span| flips.iter().any(|&at| x.start <= at && at < x.covered_end);
            let case = format!("flips at {flips:?} (hint: {with_hint})");
            let (lost, reported) = verify(wcfg.clone(), &spans, |x| !hit(x), &case).await;
            let damaged = spans.iter().filter(|x| hit(x)).count();
            assert_eq!(
                lost, damaged,
                "{case}: exactly the damaged records are lost"
            );
            if damaged > 0 {
                assert!(
                    reported > 0,
                    "{case}: damage to {damaged} records not reported"
                );
            }
        }
    });
}
