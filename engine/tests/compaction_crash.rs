//! Crash at each step of a compaction pass, with a real process death, and recovery from what
//! the pass left on disk.
//!
//! What it proves: whichever step a pass dies at (first output written but not synced, outputs
//! durable, intent durable, first input removed, every input removed but the intent still there),
//! the next open finds every acknowledged write with its exact value, no deleted key, no key
//! twice, live bytes that add up to exactly the live records, and no file of the pass left over
//! once the intent is durable; the files on disk before recovery show that the process died at
//! the step it was meant to. A random kill (`crash.rs`) lands in a pass only by chance; these land
//! on every step, every run.
//!
//! How: each `crash_at_*` test (the parent) re-executes this test binary selecting
//! `compaction_crash_child` (an ignored test, so the suite does not count it as passed), with
//! the step in `RINGKV_COMPACTION_CRASH_STEP`. The child opens the store with a [`FaultPlan`]
//! armed to kill the process (SIGKILL) at that step ([`FaultPlan::crash_at`]), writes the data set below,
//! makes it durable, prints `WRITTEN` and the segment files present, and runs one pass, which
//! kills it. The parent checks the child died of SIGKILL, inspects the files, opens the store in
//! process and checks it against the data set, then compacts, restarts and checks again.
//!
//! The data set is laid out so the pass takes two segments and deletes the one holding the
//! tombstones first: segment A holds the values of the keys `d*` (deleted later), `l*` (live)
//! and `m*` (overwritten later); segment B holds the tombstones of the `d*` keys and fillers;
//! the fillers and the `m*` keys are then written again into later segments. B is nearly all
//! garbage and A mostly, so the pass takes B then A, copies the `l*` keys and reaps the
//! tombstones (every other segment is newer than them). Dying between the two removals leaves A,
//! with the old values of the `d*` keys, and no tombstone anywhere: only finishing the intent
//! keeps them deleted.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;

use ringkv_engine::record::record_len;
use ringkv_engine::{CompactionStep, Durability, Engine, EngineConfig, FaultPlan};

/// Set (to the step's name) in the child's environment: `compaction_crash_child` runs only then.
const STEP_ENV: &str = "RINGKV_COMPACTION_CRASH_STEP";
/// Data directory of the child.
const DIR_ENV: &str = "RINGKV_COMPACTION_CRASH_DIR";
/// SIGKILL's number on Linux: what the crash point kills the child with.
const SIGKILL: i32 = 9;
/// Name of the compaction intent file (docs/ARCHITECTURE.md §3.1).
const INTENT_FILE: &str = "compaction.intent";
const PARTITION: u32 = 3;
/// Every key is this long (`x000`), so every tombstone has the same record length.
const KEY_BYTES: usize = 4;
const VALUE_BYTES: usize = 10_000;
const DELETED: usize = 60;
const LIVE: usize = 30;
const OVERWRITTEN: usize = 10;

fn key(prefix: char, i: usize) -> Vec<u8> {
    let k = format!("{prefix}{i:03}").into_bytes();
    assert_eq!(k.len(), KEY_BYTES);
    k
}

/// The value of `key` in round `round`: recognisable and distinct per round.
fn value(key: &[u8], round: u8) -> Vec<u8> {
    let mut v = format!("{}@{round}:", String::from_utf8_lossy(key)).into_bytes();
    let seed = key
        .iter()
        .fold(u32::from(round), |h, &b| h * 31 + u32::from(b));
    v.extend((0..VALUE_BYTES - v.len()).map(|j| (seed as usize + j * 7) as u8));
    v
}

fn cfg(dir: &Path) -> EngineConfig {
    common::config(dir)
}

fn segment_ids(dir: &Path) -> BTreeSet<u64> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
        })
        .collect()
}

/// Segment files holding data: not the empty file prepared ahead for the next log segment.
fn data_segment_ids(dir: &Path) -> BTreeSet<u64> {
    segment_ids(dir)
        .into_iter()
        .filter(|&id| {
            std::fs::metadata(dir.join(format!("{id:016x}.seg"))).is_ok_and(|m| m.len() > 0)
        })
        .collect()
}

/// Reads the intent file's ids (u32 count, u64 ids, CRC-32 of the rest; all little-endian), or
/// `None` without one.
fn intent_ids(dir: &Path) -> Option<Vec<u64>> {
    let b = std::fs::read(dir.join(INTENT_FILE)).ok()?;
    let n = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
    let body = &b[..4 + 8 * n];
    let crc = u32::from_le_bytes(b[4 + 8 * n..8 + 8 * n].try_into().unwrap());
    assert_eq!(crc32fast::hash(body), crc, "intent file fails its checksum");
    Some(
        body[4..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// The child.

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(format!("{line}\n").as_bytes()).unwrap();
    out.flush().unwrap();
}

/// The child half: only runs when a parent re-executes this binary with
/// `RINGKV_COMPACTION_CRASH_STEP` set (and `--ignored`); run alone it returns at once.
#[test]
#[ignore = "the child process of the crash_at_* tests, started by them"]
fn compaction_crash_child() {
    let Some(step) = std::env::var_os(STEP_ENV) else {
        return;
    };
    let step = CompactionStep::ALL
        .into_iter()
        .find(|s| std::ffi::OsStr::new(&format!("{s:?}")) == step)
        .expect("the parent names a step");
    let dir = PathBuf::from(std::env::var_os(DIR_ENV).expect("the parent sets the data dir"));
    glommio::LocalExecutorBuilder::default()
        .spawn(move || child_main(dir, step))
        .unwrap()
        .join()
        .unwrap();
}

/// Writes fillers until the active segment rolls; returns their keys.
async fn fill_until_roll(e: &Engine, prefix: char) -> Vec<Vec<u8>> {
    let segments = e.stats().segments;
    let mut keys = Vec::new();
    for i in 0.. {
        let k = key(prefix, i);
        e.put(PARTITION, &k, &value(&k, 0), Durability::Buffered)
            .await
            .unwrap();
        keys.push(k);
        if e.stats().segments > segments {
            return keys;
        }
    }
    unreachable!()
}

async fn child_main(dir: PathBuf, step: CompactionStep) {
    // libtest may have printed "test compaction_crash_child ... " without a newline.
    emit("");
    let plan = FaultPlan::new();
    let e = Rc::new(
        Engine::open_with_faults(cfg(&dir), plan.clone())
            .await
            .unwrap(),
    );
    // Segment A.
    for (prefix, n) in [('d', DELETED), ('l', LIVE), ('m', OVERWRITTEN)] {
        for i in 0..n {
            let k = key(prefix, i);
            e.put(PARTITION, &k, &value(&k, 0), Durability::Buffered)
                .await
                .unwrap();
        }
    }
    let f = fill_until_roll(&e, 'f').await;
    // Segment B.
    for i in 0..DELETED {
        assert!(
            e.delete(PARTITION, &key('d', i), Durability::Buffered)
                .await
                .unwrap()
        );
    }
    let g = fill_until_roll(&e, 'g').await;
    // Later segments: the fillers and the m keys again.
    for k in f.iter().chain(&g) {
        e.put(PARTITION, k, &value(k, 1), Durability::Buffered)
            .await
            .unwrap();
    }
    for i in 0..OVERWRITTEN {
        let k = key('m', i);
        e.put(PARTITION, &k, &value(&k, 1), Durability::Buffered)
            .await
            .unwrap();
    }
    e.flush().await.unwrap();
    emit(&format!("FILLERS {} {}", f.len(), g.len()));
    let ids: Vec<String> = segment_ids(&dir).iter().map(u64::to_string).collect();
    emit(&format!("WRITTEN {}", ids.join(",")));
    plan.crash_at(step);
    let r = e.compact().await;
    emit(&format!("COMPLETED {r:?}"));
    std::process::exit(3);
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// What every key must read back as, given the filler counts the child reported.
fn model(fillers: (usize, usize)) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
    let mut m = BTreeMap::new();
    for i in 0..DELETED {
        m.insert(key('d', i), None);
    }
    for i in 0..LIVE {
        let k = key('l', i);
        m.insert(k.clone(), Some(value(&k, 0)));
    }
    for (prefix, n, round) in [
        ('m', OVERWRITTEN, 1),
        ('f', fillers.0, 1),
        ('g', fillers.1, 1),
    ] {
        for i in 0..n {
            let k = key(prefix, i);
            m.insert(k.clone(), Some(value(&k, round)));
        }
    }
    m
}

/// Every key reads back exactly as the model says, no other key is live, and the live bytes the
/// engine keeps per partition and per segment add up to the live records and tombstones it holds.
async fn check(e: &Engine, model: &BTreeMap<Vec<u8>, Option<Vec<u8>>>, when: &str) {
    let mut live_bytes = 0u64;
    let mut live_keys = 0u64;
    for (k, want) in model {
        let got = e.get(PARTITION, k).await.unwrap();
        assert!(
            got.as_deref() == want.as_deref(),
            "{when}: key {} reads back {:?}, expected {:?}",
            String::from_utf8_lossy(k),
            got.as_ref()
                .map(|v| String::from_utf8_lossy(&v[..8]).into_owned()),
            want.as_ref()
                .map(|v| String::from_utf8_lossy(&v[..8]).into_owned()),
        );
        if let Some(v) = want {
            live_bytes += record_len(k.len(), v.len()) as u64;
            live_keys += 1;
        }
    }
    let mut it = e.iter_partition(PARTITION);
    let mut seen = BTreeSet::new();
    while let Some(item) = it.next().await {
        let (k, _) = item.unwrap();
        assert!(
            model.get(&k).is_some_and(|v| v.is_some()),
            "{when}: iteration yields key {}, which is not live",
            String::from_utf8_lossy(&k)
        );
        assert!(seen.insert(k), "{when}: iteration yields a key twice");
    }
    assert_eq!(seen.len() as u64, live_keys, "{when}: live keys");
    let per_partition: BTreeMap<u32, u64> = e.partition_live_bytes().into_iter().collect();
    assert_eq!(
        per_partition.get(&PARTITION).copied().unwrap_or(0),
        live_bytes,
        "{when}: live bytes of the index"
    );
    // Segments' live bytes: the live records plus the tombstones the index still holds.
    let stats = e.stats();
    let tombstones = stats.index_entries - live_keys;
    assert!(tombstones <= DELETED as u64, "{when}: {stats:?}");
    assert_eq!(
        stats.live_bytes,
        live_bytes + tombstones * record_len(KEY_BYTES, 0) as u64,
        "{when}: live bytes of the segments (a record counted twice, or not at all)"
    );
}

/// Held by each parent test for its whole run. The tests of this binary run on parallel
/// threads, and a child forked by one test holds a copy of every open descriptor until it execs,
/// another test's directory lock included (a lock belongs to the open file description, so the
/// copy keeps it). A reopen right after a close in that window failed `Locked`; one at a time,
/// no other test forks while one reopens.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the child to `step`, then checks the files it left and the store recovered from them.
fn crash_at(step: CompactionStep) {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    common::run(move |dir| async move {
        let data = dir.join("data");
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "compaction_crash_child",
                "--ignored",
                "--nocapture",
            ])
            .arg("--test-threads=1")
            .env(STEP_ENV, format!("{step:?}"))
            .env(DIR_ENV, &data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let lines: Vec<String> = stdout.lines().map_while(Result::ok).collect();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let field = |tag: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(tag))
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    panic!("{step:?}: no {tag:?} from the child: {lines:?}\n{stderr}")
                })
        };
        assert_eq!(
            output.status.signal(),
            Some(SIGKILL),
            "{step:?}: the child did not die at the step ({}): {lines:?}\n{stderr}",
            output.status
        );
        let fillers: Vec<usize> = field("FILLERS ")
            .split(' ')
            .map(|n| n.parse().unwrap())
            .collect();
        let before: BTreeSet<u64> = field("WRITTEN ")
            .split(',')
            .map(|n| n.parse().unwrap())
            .collect();

        // The files show the step the child died at.
        let after = segment_ids(&data);
        let intent = intent_ids(&data);
        // Files with data only: a new empty file prepared for the log is not an output.
        let new: BTreeSet<u64> = data_segment_ids(&data)
            .difference(&before)
            .copied()
            .collect();
        match step {
            CompactionStep::OutputWritten | CompactionStep::OutputsSynced => {
                assert_eq!(
                    intent, None,
                    "{step:?}: an intent before the outputs are durable"
                );
                assert!(before.is_subset(&after), "{step:?}: an input removed early");
                assert!(!new.is_empty(), "{step:?}: no output file");
            }
            _ => {
                let ids = intent.clone().expect("an intent once it is durable");
                assert!(
                    ids.len() >= 2,
                    "{step:?}: the pass takes two inputs: {ids:?}"
                );
                // The case is the one the module docs lay out only if the pass removes segment B
                // (the tombstones, the second segment written) before segment A.
                let b = before.iter().nth(1).copied();
                assert_eq!(
                    ids.first().copied(),
                    b,
                    "{step:?}: the tombstones' segment first: {ids:?}"
                );
                let present: Vec<bool> = ids.iter().map(|id| after.contains(id)).collect();
                let want: Vec<bool> = match step {
                    CompactionStep::IntentSynced => vec![true; ids.len()],
                    CompactionStep::FirstInputRemoved => (0..ids.len()).map(|i| i > 0).collect(),
                    _ => vec![false; ids.len()],
                };
                assert_eq!(present, want, "{step:?}: inputs {ids:?} on disk");
            }
        }

        let model = model((fillers[0], fillers[1]));
        let e = Engine::open(cfg(&data)).await.unwrap();
        let report = e.recovery_report().clone();
        check(&e, &model, &format!("{step:?}, after recovery")).await;
        // Recovery finished the intent: its inputs are gone, and so is the intent.
        let removed = intent.as_ref().map_or(0, |ids| {
            ids.iter().filter(|id| after.contains(id)).count() as u64
        });
        assert_eq!(
            report.compacted_segments_removed, removed,
            "{step:?}: segments of the intent recovery removed"
        );
        assert!(!data.join(INTENT_FILE).exists(), "{step:?}: intent left");
        let on_disk = data_segment_ids(&data);
        for id in intent.iter().flatten() {
            assert!(!on_disk.contains(id), "{step:?}: input {id} left");
        }
        // Every segment file holding data is one the engine loaded, and the other way round.
        assert_eq!(
            on_disk.len() as u64,
            e.stats().segments,
            "{step:?}: segment files {on_disk:?}"
        );

        // What the pass left compacts away without changing anything, and survives a restart.
        for _ in 0..16 {
            if e.compact().await.unwrap().segments_compacted == 0 {
                break;
            }
        }
        check(&e, &model, &format!("{step:?}, after compaction")).await;
        e.close().await.unwrap();
        let e = Engine::open(cfg(&data)).await.unwrap();
        check(&e, &model, &format!("{step:?}, after a restart")).await;
        assert_eq!(data_segment_ids(&data).len() as u64, e.stats().segments);
        e.close().await.unwrap();
    });
}

#[test]
fn crash_at_output_written() {
    crash_at(CompactionStep::OutputWritten);
}

#[test]
fn crash_at_outputs_synced() {
    crash_at(CompactionStep::OutputsSynced);
}

#[test]
fn crash_at_intent_synced() {
    crash_at(CompactionStep::IntentSynced);
}

#[test]
fn crash_at_first_input_removed() {
    crash_at(CompactionStep::FirstInputRemoved);
}

#[test]
fn crash_at_inputs_removed() {
    crash_at(CompactionStep::InputsRemoved);
}
