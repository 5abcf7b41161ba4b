//! Crash test: a child process writes in `Sync` mode and is killed with SIGKILL at random moments.
//!
//! What it proves: after every restart, every acknowledged write is readable with its exact value,
//! a key never goes back to a state older than its last acknowledged write, and a write that was
//! not acknowledged is either wholly visible (exact value, or absent for a delete) or not visible
//! at all: never a truncated, mixed or foreign value. It also checks that the index holds no key
//! that was never written, that recovery reports sane numbers, and that a state read back after a
//! restart stays (through compaction and later restarts) until a newer write replaces it.
//! SIGKILL leaves the kernel's and the disk's state intact, so this is about the process dying at
//! any point of the write path (an acknowledgement before the write reached the file, a group
//! commit cut short, a segment ending mid-flush), not about power loss.
//!
//! How: `crash_sigkill` (the parent) re-executes this test binary with libtest arguments selecting
//! `crash_child` (an ignored test, so the suite does not count it as passed), which does nothing
//! unless `RINGKV_CRASH_CHILD` is set. The child opens the store,
//! runs four writer tasks on disjoint keys, and prints `I <key> <version>` before issuing each
//! put or delete and `A <key> <version>` once its `Sync` future resolved. Versions grow strictly
//! across the whole run (the parent passes `iteration * 1_000_000` as the base) and the value (10
//! to 6000 bytes) and the choice of put or delete are functions of (key, version), so the parent
//! can recompute every op. The parent kills the child after a random number of acknowledgements
//! (0 to 40; 0 means as soon as the child is ready or has announced its first op), sometimes
//! after a further random pause of up to 2 ms, then reads the rest of the pipe (lines written
//! before the kill count, a partial last line does not). It opens the store in-process and checks
//! every key against its model: with an acknowledgement since the last check, the state must be
//! the op of a version issued no earlier than it; without one, the state confirmed by the last
//! check or the op of any version issued since. What it reads back becomes the confirmed state for
//! the next round, on the same directory. The child compacts in the background every 2 ms, so
//! kills also interrupt compaction passes. Every tenth round the parent also reads all keys through
//! partition iteration and runs compaction (which keeps the number of segment files, one per
//! child, from growing without bound) and checks that compaction changed nothing.
//!
//! Knobs: `RINGKV_CRASH_ITERATIONS` (kill points, default 200) and `RINGKV_CRASH_SEED` (the
//! parent's RNG, which picks the kill points; printed so a failure can be replayed, although the
//! exact moment of a kill depends on timing).
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringkv_engine::index::{Entry, KeyHash, value_digest};
use ringkv_engine::{Durability, Engine, RecoveryReport};

/// Set (to anything) in the child's environment: `crash_child` runs only then.
const CHILD_ENV: &str = "RINGKV_CRASH_CHILD";
/// Data directory of the child.
const DIR_ENV: &str = "RINGKV_CRASH_DIR";
/// First version number of the child (its versions are `base + 1`, `base + 2`, ...).
const BASE_ENV: &str = "RINGKV_CRASH_BASE";
/// Number of kill points.
const ITERATIONS_ENV: &str = "RINGKV_CRASH_ITERATIONS";
/// Seed of the parent's RNG.
const SEED_ENV: &str = "RINGKV_CRASH_SEED";

const DEFAULT_ITERATIONS: u64 = 200;
const DEFAULT_SEED: u64 = 0x5eed_c0de_4b11_0001;
/// Versions one child may use; the parent spaces the bases of successive children by this.
const VERSIONS_PER_CHILD: u64 = 1_000_000;
const WRITERS: u32 = 4;
const KEYS_PER_WRITER: u32 = 16;
/// The parent kills a child after 0..=this many acknowledgements.
const ACKS_BEFORE_KILL_MAX: u32 = 40;
/// Values are this long at least...
const VALUE_BYTES_MIN: u64 = 10;
/// ...and at most this long, so records cross 4 KiB IO blocks.
const VALUE_BYTES_MAX: u64 = 6000;
/// A child silent this long is hung (a guard against blocking forever, not a performance check).
const CHILD_SILENCE_MAX: Duration = Duration::from_secs(60);
/// Most compaction passes the parent runs in one go.
const COMPACTION_PASSES_MAX: usize = 64;
/// The child's first line once its engine is open.
const READY: &str = "READY";
/// SIGKILL's number on Linux.
const SIGKILL: i32 = 9;

// ---------------------------------------------------------------------------------------------
// Ops as functions of (key, version), shared by child and parent.

fn key_name(writer: u32, i: u32) -> String {
    format!("k{writer}-{i}")
}

/// Each writer's keys live in their own partition.
fn partition_of(writer: u32) -> u32 {
    writer
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable hash of (key, version): FNV-1a of the key, mixed with the version.
fn mix(key: &str, version: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in key.as_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(h ^ splitmix64(version))
}

fn is_delete(key: &str, version: u64) -> bool {
    mix(key, version).is_multiple_of(8)
}

/// The value a put of (key, version) writes: `key@version:` then pseudo-random bytes, cut to a
/// length between [`VALUE_BYTES_MIN`] and [`VALUE_BYTES_MAX`] that depends on both.
fn value_of(key: &str, version: u64) -> Vec<u8> {
    let h = mix(key, version);
    let len = (VALUE_BYTES_MIN + (h >> 8) % (VALUE_BYTES_MAX - VALUE_BYTES_MIN + 1)) as usize;
    let mut v = format!("{key}@{version}:").into_bytes();
    let mut s = h;
    while v.len() < len {
        s = splitmix64(s);
        v.extend_from_slice(&s.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// What (key, version) leaves behind: the value of a put, `None` for a delete.
fn state_of(key: &str, version: u64) -> Option<Vec<u8>> {
    (!is_delete(key, version)).then(|| value_of(key, version))
}

fn op_name(key: &str, version: u64) -> String {
    if is_delete(key, version) {
        format!("delete@{version}")
    } else {
        format!("put@{version} ({} bytes)", value_of(key, version).len())
    }
}

/// Describes a state read back, recognising the values of this test.
fn describe(key: &str, state: Option<&[u8]>) -> String {
    let Some(b) = state else {
        return "absent".to_string();
    };
    let claimed = std::str::from_utf8(&b[..b.len().min(40)])
        .ok()
        .or_else(|| {
            // The prefix may be followed by bytes that are not UTF-8.
            let end = b.iter().position(|&c| c == b':')?;
            std::str::from_utf8(&b[..end]).ok()
        })
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.split_once('@'))
        .and_then(|(k, v)| Some((k.to_string(), v.parse::<u64>().ok()?)));
    match claimed {
        Some((k, v)) if k == key && value_of(key, v) == b => {
            format!("put@{v} ({} bytes, exact)", b.len())
        }
        Some((k, v)) => {
            let want = value_of(&k, v);
            let common = want.iter().zip(b).take_while(|(x, y)| x == y).count();
            format!(
                "{} bytes claiming to be {k}@{v} ({} bytes), equal to it for {common} bytes",
                b.len(),
                want.len()
            )
        }
        None => format!(
            "{} unrecognised bytes starting {:?}",
            b.len(),
            String::from_utf8_lossy(&b[..b.len().min(32)])
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The child.

/// Writes one protocol line to stdout in one `write` (atomic on a pipe) and flushes it, so a line
/// the parent reads was complete before the op it announces started, or after the op it
/// acknowledges ended.
fn emit(line: &str) {
    let line = format!("{line}\n");
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).unwrap();
    out.flush().unwrap();
}

/// The child half: only runs when the parent re-executes this binary with `RINGKV_CRASH_CHILD`
/// set (and `--ignored`). Ignored, so that a run of the suite counts it as what it is, not as a
/// passed test; run alone without the variable it returns at once.
#[test]
#[ignore = "the child process of crash_sigkill, started by it"]
fn crash_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let dir = PathBuf::from(std::env::var_os(DIR_ENV).expect("parent sets the data dir"));
    let base: u64 = std::env::var(BASE_ENV)
        .expect("parent sets the base version")
        .parse()
        .expect("base version is a number");
    glommio::LocalExecutorBuilder::default()
        .spawn(move || child_main(dir, base))
        .unwrap()
        .join()
        .unwrap();
}

async fn child_main(dir: PathBuf, base: u64) {
    // libtest may have printed "test crash_child ... " without a newline: start a fresh line.
    emit("");
    // Background compaction runs in the child too (every open leaves a small segment, so it
    // always has merging to do): kills also land in the middle of compaction passes.
    let mut cfg = common::config(&dir);
    cfg.compaction_interval = Some(std::time::Duration::from_millis(2));
    let engine = match Engine::open(cfg).await {
        Ok(e) => Rc::new(e),
        Err(e) => {
            emit(&format!("ERR open: {e}"));
            std::process::exit(2);
        }
    };
    emit(READY);
    let counter = Rc::new(Cell::new(0u64));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| glommio::spawn_local(writer(engine.clone(), w, base, counter.clone())))
        .collect();
    for t in tasks {
        t.await;
    }
}

/// Loops until killed: pick one of this writer's keys, take the next version, announce, write
/// with `Sync`, acknowledge.
async fn writer(engine: Rc<Engine>, w: u32, base: u64, counter: Rc<Cell<u64>>) {
    let mut rng = StdRng::seed_from_u64(splitmix64(base ^ u64::from(w)));
    let partition = partition_of(w);
    loop {
        let key = key_name(w, rng.gen_range(0..KEYS_PER_WRITER));
        let n = counter.get() + 1;
        counter.set(n);
        assert!(n < VERSIONS_PER_CHILD, "child ran out of versions");
        let version = base + n;
        emit(&format!("I {key} {version}"));
        let r = if is_delete(&key, version) {
            // Deleting an absent key answers Ok(false): acknowledged all the same.
            engine
                .delete(partition, key.as_bytes(), Durability::Sync)
                .await
                .map(|_| ())
        } else {
            engine
                .put(
                    partition,
                    key.as_bytes(),
                    &value_of(&key, version),
                    Durability::Sync,
                )
                .await
        };
        match r {
            Ok(()) => emit(&format!("A {key} {version}")),
            Err(e) => {
                emit(&format!("ERR {key} {version}: {e}"));
                std::process::exit(2);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// What the parent knows about one key.
struct KeyModel {
    partition: u32,
    /// State read back by the last check (`None`: absent), and a description of it.
    confirmed: Option<Vec<u8>>,
    confirmed_desc: String,
    /// Versions issued since the last check, ascending.
    issued: Vec<u64>,
    /// Highest version acknowledged since the last check.
    acked: Option<u64>,
}

struct Model {
    keys: BTreeMap<String, KeyModel>,
}

impl Model {
    fn new() -> Self {
        let mut keys = BTreeMap::new();
        for w in 0..WRITERS {
            for i in 0..KEYS_PER_WRITER {
                keys.insert(
                    key_name(w, i),
                    KeyModel {
                        partition: partition_of(w),
                        confirmed: None,
                        confirmed_desc: "absent (never written)".to_string(),
                        issued: Vec::new(),
                        acked: None,
                    },
                );
            }
        }
        Self { keys }
    }

    /// Applies one protocol line of the child; an error is a broken protocol.
    fn apply(&mut self, line: &str, totals: &mut Totals) -> Result<(), String> {
        let mut parts = line.split(' ');
        let (Some(tag), Some(key), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("malformed line {line:?}"));
        };
        let version: u64 = version
            .parse()
            .map_err(|_| format!("bad version in {line:?}"))?;
        let k = self
            .keys
            .get_mut(key)
            .ok_or_else(|| format!("unknown key in {line:?}"))?;
        match tag {
            "I" => {
                if k.issued.last().is_some_and(|&l| l >= version) {
                    return Err(format!("versions of {key} not increasing at {line:?}"));
                }
                k.issued.push(version);
                totals.issued += 1;
            }
            "A" => {
                if k.issued.last() != Some(&version) {
                    return Err(format!("{line:?} acknowledges a version not last issued"));
                }
                k.acked = Some(version);
                totals.acked += 1;
            }
            _ => return Err(format!("unknown tag in {line:?}")),
        }
        Ok(())
    }
}

#[derive(Default)]
struct Totals {
    issued: u64,
    acked: u64,
    /// Ops in flight at a kill found applied after the restart (or indistinguishable from not
    /// applied: a delete of an absent key, say).
    in_flight_applied: u64,
    /// Ops in flight at a kill found not applied.
    in_flight_lost: u64,
    torn_tails: u64,
    torn_tail_bytes: u64,
    corrupt_regions: u64,
    segments_scanned: u64,
    segments_compacted: u64,
    /// Segments recovery deleted for a compaction the kill interrupted after its intent.
    intent_segments_removed: u64,
}

/// Reads the child's stdout on a thread and forwards complete lines (a partial last line, cut
/// by the kill, is dropped).
fn spawn_reader(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) if buf.last() != Some(&b'\n') => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned();
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Applies one line of the child's output to the model. Returns the line if it is part of the
/// protocol, `None` for libtest's own output, an error if the child reported one or broke the
/// protocol.
fn take_line<'a>(
    model: &mut Model,
    totals: &mut Totals,
    line: &'a str,
) -> Result<Option<&'a str>, String> {
    let line = line.trim_end_matches('\r');
    if line.starts_with("ERR") {
        return Err(format!("child failed: {line}"));
    }
    if line == READY {
        return Ok(Some(line));
    }
    if !(line.starts_with("I ") || line.starts_with("A ")) {
        return Ok(None);
    }
    model.apply(line, totals)?;
    Ok(Some(line))
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={s:?} is not a number"))
        }
        Err(_) => default,
    }
}

/// Kills the child with SIGKILL at random moments, `RINGKV_CRASH_ITERATIONS` times (default
/// 200), and checks the store after every kill.
#[test]
fn crash_sigkill() {
    let seed = env_u64(SEED_ENV, DEFAULT_SEED);
    let iterations = env_u64(ITERATIONS_ENV, DEFAULT_ITERATIONS);
    println!(
        "crash test: seed {seed:#x} ({SEED_ENV}), {iterations} kill points ({ITERATIONS_ENV})"
    );
    // The whole parent runs on one executor; it blocks it while a child runs, which is fine as
    // no engine is open then.
    common::run(move |dir| async move {
        let started = Instant::now();
        let data = dir.join("data");
        let child_log = dir.join("child-stderr.log");
        let exe = std::env::current_exe().unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = Model::new();
        let mut totals = Totals::default();
        let ctx = |iteration: u64| {
            format!(
                "seed {seed:#x} ({SEED_ENV}), iteration {iteration} of {iterations}, data dir {}",
                data.display()
            )
        };
        for iteration in 1..=iterations {
            let kill_after_acks = rng.gen_range(0..=ACKS_BEFORE_KILL_MAX);
            let kill_at_ready = rng.gen_bool(0.5);
            let delay = rng
                .gen_bool(0.5)
                .then(|| Duration::from_micros(rng.gen_range(0..2000)));

            let mut child = Command::new(&exe)
                .args(["--exact", "crash_child", "--ignored", "--nocapture"])
                .arg("--test-threads=1")
                .env(CHILD_ENV, "1")
                .env(DIR_ENV, &data)
                .env(BASE_ENV, (iteration * VERSIONS_PER_CHILD).to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&child_log).unwrap())
                .spawn()
                .unwrap();
            let lines = spawn_reader(&mut child);
            let child_failed = |child: &mut Child, why: String| -> ! {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&child_log).unwrap_or_default();
                panic!("{}: {why}\nchild stderr:\n{log}", ctx(iteration));
            };

            // Run until the kill point.
            let mut acks = 0;
            loop {
                let line = match lines.recv_timeout(CHILD_SILENCE_MAX) {
                    Ok(l) => l,
                    Err(mpsc::RecvTimeoutError::Timeout) => child_failed(
                        &mut child,
                        format!("child silent for {CHILD_SILENCE_MAX:?}"),
                    ),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let status = child.wait().unwrap();
                        child_failed(&mut child, format!("child exited early: {status}"))
                    }
                };
                let line = match take_line(&mut model, &mut totals, &line) {
                    Ok(Some(l)) => l,
                    Ok(None) => continue,
                    Err(e) => child_failed(&mut child, e),
                };
                if line.starts_with("A ") {
                    acks += 1;
                }
                let stop = if kill_after_acks == 0 {
                    if kill_at_ready {
                        line == READY
                    } else {
                        line.starts_with("I ")
                    }
                } else {
                    acks >= kill_after_acks
                };
                if stop {
                    break;
                }
            }
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            child.kill().unwrap();
            let status = child.wait().unwrap();
            // Lines written before the kill are still in the pipe: they count too.
            for line in lines.iter() {
                if let Err(e) = take_line(&mut model, &mut totals, &line) {
                    child_failed(&mut child, e);
                }
            }
            if status.signal() != Some(SIGKILL) {
                child_failed(&mut child, format!("child ended by {status}, not SIGKILL"));
            }

            // Every tenth kill and after the last, also iterate partitions and compact.
            let full = iteration.is_multiple_of(10) || iteration == iterations;
            verify(&data, &mut model, &mut totals, full)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", ctx(iteration)));
        }
        println!(
            "crash test: {iterations} kill points in {:.1?}: {} ops issued, {} acknowledged; \
             ops in flight at a kill: {} applied, {} not; recovery scanned {} segments, \
             truncated {} torn tails ({} bytes), skipped {} damaged regions, finished {} \
             interrupted compaction deletions; compaction rewrote {} segments",
            started.elapsed(),
            totals.issued,
            totals.acked,
            totals.in_flight_applied,
            totals.in_flight_lost,
            totals.segments_scanned,
            totals.torn_tails,
            totals.torn_tail_bytes,
            totals.corrupt_regions,
            totals.intent_segments_removed,
            totals.segments_compacted,
        );
    });
}

fn check_report(r: &RecoveryReport) -> Result<(), String> {
    let torn: u64 = r.torn_tails.iter().map(|t| t.end - t.start).sum();
    let sane = r.index_entries <= r.records
        && torn == r.torn_tail_bytes
        && r.torn_tails.iter().all(|t| t.start < t.end)
        && r.corrupt_regions.iter().all(|t| t.start < t.end)
        && r.index_entries <= u64::from(WRITERS * KEYS_PER_WRITER);
    if sane {
        Ok(())
    } else {
        Err(format!("recovery report is not sane: {r:?}"))
    }
}

/// Opens the store, checks every key against the model, then makes what it read the confirmed
/// state; with `full`, also reads every partition through iteration, then compacts and checks
/// that nothing changed. Returns every failed check at once.
async fn verify(
    data: &Path,
    model: &mut Model,
    totals: &mut Totals,
    full: bool,
) -> Result<(), String> {
    let engine = Engine::open(common::config(data))
        .await
        .map_err(|e| format!("open after kill failed: {e}"))?;
    let report = engine.recovery_report().clone();
    check_report(&report)?;
    totals.segments_scanned += report.segments_scanned;
    totals.intent_segments_removed += report.compacted_segments_removed;
    totals.torn_tails += report.torn_tails.len() as u64;
    totals.torn_tail_bytes += report.torn_tail_bytes;
    totals.corrupt_regions += report.corrupt_regions.len() as u64;

    let mut failures = Vec::new();
    let mut present: BTreeMap<u32, BTreeMap<Vec<u8>, Vec<u8>>> = BTreeMap::new();
    for (key, k) in &mut model.keys {
        let got = match engine.get(k.partition, key.as_bytes()).await {
            Ok(v) => v.map(|b| b.to_vec()),
            Err(e) => {
                failures.push(format!("{key}: get failed: {e}"));
                continue;
            }
        };
        // The versions whose op the state may be, newest first; without an acknowledgement
        // since the last check, the confirmed state is allowed too.
        let floor = k.acked.unwrap_or(0);
        let matched = k
            .issued
            .iter()
            .rev()
            .copied()
            .filter(|&v| v >= floor)
            .find(|&v| state_of(key, v) == got);
        // At most one op per key is in flight at a kill (each writer waits for its op).
        let in_flight = k.issued.last().copied().filter(|&l| k.acked != Some(l));
        let desc = match matched {
            Some(v) => {
                match in_flight {
                    Some(l) if l == v => totals.in_flight_applied += 1,
                    Some(_) => totals.in_flight_lost += 1,
                    None => {}
                }
                Some(op_name(key, v))
            }
            None if k.acked.is_none() && got == k.confirmed => {
                if in_flight.is_some() {
                    totals.in_flight_lost += 1;
                }
                Some(k.confirmed_desc.clone())
            }
            None => None,
        };
        match desc {
            Some(d) => {
                k.confirmed_desc = d;
                k.confirmed = got.clone();
                k.issued.clear();
                k.acked = None;
            }
            None => {
                let allowed: Vec<String> = k
                    .issued
                    .iter()
                    .filter(|&&v| v >= floor)
                    .map(|&v| op_name(key, v))
                    .collect();
                failures.push(format!(
                    "{key} (partition {}): read back {}; last acknowledged: {}; allowed: {}{}",
                    k.partition,
                    describe(key, got.as_deref()),
                    k.acked
                        .map_or("none since the last check".to_string(), |a| op_name(key, a)),
                    allowed.join(", "),
                    if k.acked.is_none() {
                        format!(" or the confirmed state, {}", k.confirmed_desc)
                    } else {
                        String::new()
                    }
                ));
            }
        }
        if let Some(v) = got {
            present
                .entry(k.partition)
                .or_default()
                .insert(key.clone().into_bytes(), v);
        }
    }

    // The index holds exactly the keys read back above (no IO: fingerprints and value digests).
    for w in 0..WRITERS {
        let p = partition_of(w);
        let mut index: BTreeMap<KeyHash, Entry> = engine.partition_digests(p).into_iter().collect();
        for (key, k) in model.keys.iter().filter(|(_, k)| k.partition == p) {
            let entry = index.remove(&KeyHash::of(key.as_bytes()));
            let value = present.get(&p).and_then(|m| m.get(key.as_bytes()));
            let consistent = match (value, entry) {
                (None, None) => true,
                (None, Some(e)) => e.tombstone,
                (Some(_), None) => false,
                (Some(v), Some(e)) => !e.tombstone && e.version == value_digest(v),
            };
            if !consistent {
                failures.push(format!(
                    "{key}: index entry {entry:?} disagrees with get ({})",
                    k.confirmed_desc
                ));
            }
        }
        if !index.is_empty() {
            failures.push(format!(
                "partition {p}: index holds keys never written: {index:?}"
            ));
        }
    }

    // Now and then, also read every key through partition iteration.
    if full {
        for w in 0..WRITERS {
            let p = partition_of(w);
            let mut it = engine.iter_partition(p);
            let mut seen = BTreeSet::new();
            while let Some(item) = it.next().await {
                match item {
                    Ok((key, value)) => {
                        let name = String::from_utf8_lossy(&key).into_owned();
                        match present.get(&p).and_then(|m| m.get(&key)) {
                            Some(v) if *v == value => {}
                            Some(_) => failures.push(format!(
                                "{name}: iteration yields {} but get another value",
                                describe(&name, Some(&value))
                            )),
                            None => failures.push(format!(
                                "{name}: iteration yields {} but get says absent",
                                describe(&name, Some(&value))
                            )),
                        }
                        seen.insert(key);
                    }
                    Err(e) => failures.push(format!("partition {p} iteration failed: {e}")),
                }
            }
            let missing: Vec<String> = present
                .get(&p)
                .into_iter()
                .flat_map(|m| m.keys())
                .filter(|k| !seen.contains(*k))
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            if !missing.is_empty() {
                failures.push(format!(
                    "partition {p} iteration misses keys get found: {missing:?}"
                ));
            }
        }
    }

    // Compaction too, so the files stay few and the next recovery also meets compaction outputs
    // and reaped tombstones; it must not change any key.
    if full && failures.is_empty() {
        for _ in 0..COMPACTION_PASSES_MAX {
            let r = engine
                .compact()
                .await
                .map_err(|e| format!("compaction failed: {e}"))?;
            if r.segments_compacted == 0 {
                break;
            }
            totals.segments_compacted += r.segments_compacted as u64;
        }
        for (key, k) in &model.keys {
            let got = engine.get(k.partition, key.as_bytes()).await;
            let want = present
                .get(&k.partition)
                .and_then(|m| m.get(key.as_bytes()));
            match got {
                Ok(v) if v.as_deref() == want.map(|w| &w[..]) => {}
                Ok(v) => failures.push(format!(
                    "{key}: compaction changed it from {} to {}",
                    k.confirmed_desc,
                    describe(key, v.as_deref())
                )),
                Err(e) => failures.push(format!("{key}: get after compaction failed: {e}")),
            }
        }
    }

    engine
        .close()
        .await
        .map_err(|e| format!("close failed: {e}"))?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} failed checks (recovery report: {report:?}):\n  {}",
            failures.len(),
            failures.join("\n  ")
        ))
    }
}
