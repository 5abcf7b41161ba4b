//! One engine per shard: several glommio executors on their own threads, each owning an engine in
//! its own directory, write, overwrite, compact in the background and reopen concurrently, and
//! each reads back exactly its own data. This is the shared-nothing shape the node runs in; it
//! proves engines keep no state across executors (background task queues included).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use ringkv_engine::{Durability, Engine, EngineConfig};

const SHARDS: usize = 2;
const KEYS: u32 = 400;

fn shard_config(shard: usize) -> EngineConfig {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("shards-{}", std::process::id()))
        .join(format!("shard-{shard}"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = EngineConfig::new(dir);
    cfg.segment_bytes = 1 << 20;
    cfg.value_bytes_max = 64 << 10;
    cfg.compaction_interval = Some(Duration::from_millis(20));
    cfg
}

fn value(shard: usize, key: u32, round: u32) -> Vec<u8> {
    format!("shard {shard} key {key} round {round} ")
        .repeat(40)
        .into_bytes()
}

async fn shard_main(shard: usize) {
    let cfg = shard_config(shard);
    let e = Engine::open(cfg.clone()).await.unwrap();
    for round in 0..4 {
        for k in 0..KEYS {
            let d = if k % 50 == 0 {
                Durability::Sync
            } else {
                Durability::Buffered
            };
            e.put(k % 8, &k.to_le_bytes(), &value(shard, k, round), d)
                .await
                .unwrap();
        }
    }
    e.flush().await.unwrap();
    // Three rounds of every key are garbage now; the background compactor must reclaim them.
    // Bounded wait in steps, not a timing assertion: the bound is far beyond any plausible delay.
    let mut waited = 0;
    while e.stats().compactions == 0 {
        assert!(waited < 3000, "background compaction never ran");
        glommio::timer::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    e.close().await.unwrap();
    let e = Engine::open(cfg).await.unwrap();
    for k in 0..KEYS {
        let got = e.get(k % 8, &k.to_le_bytes()).await.unwrap().unwrap();
        assert_eq!(&got[..], &value(shard, k, 3)[..], "shard {shard} key {k}");
    }
    e.close().await.unwrap();
}

#[test]
fn engines_on_separate_executors_are_independent() {
    let handles: Vec<_> = (0..SHARDS)
        .map(|shard| {
            glommio::LocalExecutorBuilder::default()
                .name(&format!("shard-{shard}"))
                .spawn(move || shard_main(shard))
                .unwrap()
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
