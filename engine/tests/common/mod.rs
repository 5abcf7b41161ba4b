//! Shared helpers of the engine tests: a glommio executor per test and data directories on a
//! real filesystem (O_DIRECT does not work on tmpfs), under the target directory.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::future::Future;
use std::path::{Path, PathBuf};

use ringkv_engine::{Engine, EngineConfig, EngineError};

/// A fresh, empty directory for one test under `target/`.
pub fn test_dir(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("engine-tests");
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Small segments and no background compaction, so tests control when compaction runs.
pub fn config(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.segment_bytes = 1 << 20;
    c.value_bytes_max = 64 << 10;
    c.compaction_interval = None;
    c.cache_bytes = 1 << 20;
    c
}

/// Runs `f` on a glommio executor with a directory named after the calling test.
pub fn run<F, Fut>(f: F)
where
    F: FnOnce(PathBuf) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let name = std::thread::current()
        .name()
        .unwrap_or("test")
        .replace("::", "-");
    let dir = test_dir(&name);
    let d2 = dir.clone();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || f(d2))
        .unwrap()
        .join()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reopens a store whose previous engine was dropped without `close` (a simulated crash): its
/// background tasks finish the IO step they are in before the directory lock is released, so
/// `Locked` is retried for a bounded number of short sleeps.
pub async fn open_after_drop(cfg: &EngineConfig) -> Engine {
    for _ in 0..10_000 {
        match Engine::open(cfg.clone()).await {
            Err(EngineError::Locked(_)) => {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await
            }
            r => return r.unwrap(),
        }
    }
    panic!("the dropped engine never released its directory");
}
