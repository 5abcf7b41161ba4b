//! Tombstone reaping relies on "a compaction output only holds records live at its creation" (its
//! `created_seqno`). A delete can land while compaction finishes a full output and before it
//! creates the next one; the record it decided to copy then goes into an output created after
//! the delete. If that output were dated at its own creation, a later pass would reap the
//! tombstone while the old value survives in it, and after a restart the deleted key would be
//! back. Outputs are dated at their pass's start, and the decision and the append happen with no
//! await in between.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use ringkv_engine::record::RecordKind;
use ringkv_engine::{Durability, Engine};

const PER_SEGMENT: usize = 34; // 34 records of 30,040 bytes fit a 1 MiB segment, 35 do not
const VALUE: usize = 30_000;

fn k(prefix: char, i: usize) -> Vec<u8> {
    format!("{prefix}{i:02}").into_bytes()
}

fn hints(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "hint"))
        .collect()
}

/// (created seqno, put seqnos of partition 0) of every segment file, via the public scanner.
fn victim_puts_by_segment(dir: &Path) -> Vec<(u64, Vec<u64>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "seg") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let s = ringkv_engine::scan::scan(&bytes);
        let Some((_, created)) = s.header else {
            continue;
        };
        let puts = s
            .entries
            .iter()
            .filter(|e| e.kind == RecordKind::Put && e.partition == 0)
            .map(|e| e.seqno)
            .collect();
        out.push((created, puts));
    }
    out
}

#[test]
fn reaped_tombstone_resurrects_value_copied_during_output_roll() {
    common::run(|dir| async move {
        let mut cfg = common::config(&dir);
        cfg.compaction_garbage_ratio = 0.001;
        cfg.compaction_segments_max = 3;
        let e = Rc::new(Engine::open(cfg.clone()).await.unwrap());
        let val = |c: u8| vec![c; VALUE];
        // seg1: keepers a (partition 1); seg2: victims v (partition 0); seg3: keepers c (p 2).
        for (p, prefix) in [(1u32, 'a'), (0, 'v'), (2, 'c')] {
            for i in 0..PER_SEGMENT {
                e.put(p, &k(prefix, i), &val(b'0'), Durability::Sync)
                    .await
                    .unwrap();
            }
        }
        // A little garbage in each, most in seg1, least in seg3 (this orders the pass: seg1,
        // seg2, seg3). The overwrites go to seg4 (active).
        for (p, prefix, n) in [(1u32, 'a', 3), (0, 'v', 2), (2, 'c', 1)] {
            for i in 0..n {
                e.put(p, &k(prefix, i), &val(b'1'), Durability::Sync)
                    .await
                    .unwrap();
            }
        }
        e.flush().await.unwrap();
        assert_eq!(e.stats().segments, 4);

        // Pass 1 copies a03..a33 into output 1, then victims; output 1 fills at a victim. While
        // it is being finished (its hint file appears), every victim is deleted.
        let before = hints(&dir);
        let fired = Rc::new(Cell::new(false));
        let deleter = {
            let (e, dir, fired) = (e.clone(), dir.clone(), fired.clone());
            glommio::spawn_local(async move {
                for _ in 0..200_000 {
                    if hints(&dir).difference(&before).next().is_some() {
                        for i in 0..PER_SEGMENT {
                            assert!(e.delete(0, &k('v', i), Durability::Buffered).await.unwrap());
                        }
                        fired.set(true);
                        return;
                    }
                    glommio::timer::sleep(Duration::from_micros(50)).await;
                }
            })
        };
        let r = e.compact().await.unwrap();
        deleter.await;
        assert!(fired.get(), "deleter never saw the first output finish");
        assert_eq!(r.segments_compacted, 3, "{r:?}");
        for i in 0..PER_SEGMENT {
            assert_eq!(e.get(0, &k('v', i)).await.unwrap(), None);
        }
        let e = Rc::try_unwrap(e).ok().unwrap();
        e.close().await.unwrap();

        // Precondition of the bug, read from the files: some segment created after the deletes
        // holds an older put of a deleted victim.
        let late_outputs_with_victims = {
            // The deletes came after every victim put, so a victim put in a segment whose
            // created seqno exceeds every victim put's seqno sits in a segment created after
            // the put was (about to be) superseded.
            let all = victim_puts_by_segment(&dir);
            let max_put = all
                .iter()
                .flat_map(|(_, v)| v.iter().copied())
                .max()
                .unwrap();
            all.iter()
                .filter(|(created, v)| !v.is_empty() && *created > max_put)
                .count()
        };
        assert!(
            late_outputs_with_victims > 0,
            "window not hit: no output created after the deletes holds a victim"
        );

        // Pass 2 (two segments at most): the tombstones' segment and output 1, not output 2.
        cfg.compaction_segments_max = 2;
        let e = Engine::open(cfg.clone()).await.unwrap();
        // Before the fix this pass reaped the tombstones while output 2 still held the old
        // values; now outputs are dated at their pass's start and hold the floor below them.
        e.compact().await.unwrap();
        for i in 0..PER_SEGMENT {
            assert_eq!(e.get(0, &k('v', i)).await.unwrap(), None, "before restart");
        }
        e.close().await.unwrap();

        let e = Engine::open(cfg).await.unwrap();
        for i in 0..PER_SEGMENT {
            let got = e.get(0, &k('v', i)).await.unwrap();
            assert!(got.is_none(), "deleted key v{i:02} came back after restart");
        }
        e.close().await.unwrap();
    });
}
