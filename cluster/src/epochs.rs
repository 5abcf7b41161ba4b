//! Epoch leases of a shard, persisted so that epochs never repeat across restarts.
//!
//! The coordinator's actors are `(node, epoch)` and a dot must never be issued twice (module docs
//! of [`ringkv_core::coordinator`]), so every run of a shard needs epochs above every earlier run's. Each
//! shard keeps the next unleased epoch in `<data-dir>/shard-<i>/epochs` (decimal text). A lease
//! reads it, writes `start + size` to a temporary file, syncs it, renames it over the old one and
//! syncs the directory, and only then hands `[start, start + size)` to the core: a crash at any
//! point leaves a file whose value is at or above every epoch handed out.
//!
//! Shards of one node are kept disjoint by giving each its own block of the `u32` epoch space:
//! shard `i` uses `i · SHARD_EPOCHS + local` with `local` in `1..SHARD_EPOCHS − 1`. A per-shard
//! block needs no coordination between shard threads (each renews alone, from its own file) and
//! stays correct when the shard count changes between runs, because shard `i`'s block never
//! depends on how many shards there are. The price: [`SHARD_EPOCHS`] (about four million) epochs
//! per shard for the life of the node id; with [`EPOCH_LEASE_SIZE`] that is about four thousand
//! restarts or renewals. Exhaustion is an error at startup; the node must then come back under a
//! new id, as after losing its disk.
//!
//! These functions block (file IO and fsync): call them before the executors start or through
//! `spawn_blocking`.

use std::io::Write;
use std::path::Path;

use crate::route::SHARDS_MAX;
use ringkv_core::coordinator::EpochLease;

/// Epochs in each shard's block.
pub const SHARD_EPOCHS: u32 = (1u64 << 32).div_ceil(SHARDS_MAX as u64) as u32;
/// Epochs per lease: one primary epoch for the run plus fresh epochs for writes coordinated away
/// from every home replica (rare: all homes unreachable).
pub const EPOCH_LEASE_SIZE: u32 = 1024;
/// Name of the lease file in a shard's directory.
pub const EPOCHS_FILE: &str = "epochs";

const _: () = assert!(SHARD_EPOCHS as u64 * SHARDS_MAX as u64 <= 1u64 << 32);
const _: () = assert!(EPOCH_LEASE_SIZE >= 2);
const _: () = assert!(EPOCH_LEASE_SIZE < SHARD_EPOCHS / 2);

/// Why a lease could not be granted.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// The file could not be read, written or synced.
    #[error("epoch lease file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file does not hold a number.
    #[error("epoch lease file {path} is damaged: {text:?}")]
    Damaged {
        /// The file.
        path: String,
        /// What it holds.
        text: String,
    },
    /// The shard's block is used up.
    #[error(
        "shard {shard} has used all its epochs; restart the node under a new node id \
         (as after losing its disk)"
    )]
    Exhausted {
        /// The shard.
        shard: usize,
    },
}

/// Leases `size` epochs for `shard` from the file `path`, persisting the lease first.
pub fn lease(path: &Path, shard: usize, size: u32) -> Result<EpochLease, EpochError> {
    assert!(shard < SHARDS_MAX);
    assert!(size >= 2);
    let io = |source| EpochError::Io {
        path: path.display().to_string(),
        source,
    };
    let next = match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .map_err(|_| EpochError::Damaged {
                path: path.display().to_string(),
                text: text.chars().take(64).collect(),
            })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
        Err(e) => return Err(io(e)),
    };
    let end = next
        .checked_add(size)
        .filter(|end| *end < SHARD_EPOCHS)
        .ok_or(EpochError::Exhausted { shard })?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        writeln!(f, "{end}").map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    let base = shard as u32 * SHARD_EPOCHS;
    Ok(EpochLease::new(base + next, size))
}

/// File holding the shard's *epoch floor* while it is known to be safe: the lowest epoch whose
/// actors the coordinator may continue (`CoreConfig::epoch_floor`). A run in `sync` durability
/// writes it at start (its writes are synced before their objects leave the node, so a crash
/// loses no dot); a `buffered` run removes it at start and writes it back when it closes cleanly.
/// Absent after a crash in `buffered` mode: the next run then starts a new floor at its own
/// primary epoch, above every dot the crash may have lost.
pub const FLOOR_FILE: &str = "floor";

/// The epoch floor the previous runs left: `Some(0)` for a directory that never leased an epoch,
/// `None` when a run may have lost dots (the caller then uses its own primary epoch).
pub fn read_floor(dir: &Path) -> Result<Option<u32>, EpochError> {
    let path = dir.join(FLOOR_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .map(Some)
            .map_err(|_| EpochError::Damaged {
                path: path.display().to_string(),
                text: text.chars().take(64).collect(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok((!dir.join(EPOCHS_FILE).exists()).then_some(0))
        }
        Err(e) => Err(EpochError::Io {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// Persists `floor` as safe for later runs, or removes the file (`None`) while this run may still
/// lose dots (a `buffered` run until its clean close).
pub fn write_floor(dir: &Path, floor: Option<u32>) -> Result<(), EpochError> {
    let path = dir.join(FLOOR_FILE);
    let io = |source| EpochError::Io {
        path: path.display().to_string(),
        source,
    };
    match floor {
        Some(f) => write_synced(&path, &f.to_string()).map_err(io),
        None => match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(dir).map_err(io),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e)),
        },
    }
}

fn write_synced(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{text}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Leases of one shard never overlap, also across "restarts" (re-reading the file), and two
    /// shards' leases never meet.
    #[test]
    fn leases_never_repeat() {
        // Unit tests have no CARGO_TARGET_TMPDIR; the workspace's target directory serves.
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/unit-tmp")
            .join(format!("epochs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(dir.join("b")).unwrap();
        let a = dir.join("a").join(EPOCHS_FILE);
        let b = dir.join("b").join(EPOCHS_FILE);
        let first = lease(&a, 0, 16).unwrap();
        let second = lease(&a, 0, 16).unwrap();
        assert!(second.primary >= first.end);
        let other = lease(&b, 1, 16).unwrap();
        assert!(other.primary >= SHARD_EPOCHS);
        assert!(second.end <= SHARD_EPOCHS);
        std::fs::write(&a, "garbage").unwrap();
        assert!(matches!(lease(&a, 0, 16), Err(EpochError::Damaged { .. })));
        std::fs::write(&a, format!("{}", SHARD_EPOCHS - 10)).unwrap();
        assert!(matches!(
            lease(&a, 0, 16),
            Err(EpochError::Exhausted { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A buffered run that crashed leaves no floor, so the next run starts its own; a sync run,
    /// or a clean close, keeps the floor it ran with.
    #[test]
    fn floors() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/unit-tmp")
            .join(format!("floors-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Fresh directory: nothing issued yet.
        assert_eq!(read_floor(&dir).unwrap(), Some(0));
        lease(&dir.join(EPOCHS_FILE), 0, 4).unwrap();
        // A buffered run started (and removed the file), then "crashed".
        write_floor(&dir, None).unwrap();
        assert_eq!(read_floor(&dir).unwrap(), None);
        // The next run's floor is its primary epoch; it closed cleanly.
        write_floor(&dir, Some(5)).unwrap();
        assert_eq!(read_floor(&dir).unwrap(), Some(5));
    }
}
