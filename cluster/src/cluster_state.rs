//! The node's membership state on disk: `<data-dir>/cluster-state`.
//!
//! The first shard owns the node's membership and hands it here, encoded, whenever it changes
//! (`MembershipOutput::Persist`); on the next start the node restores from it instead of
//! bootstrapping from `--seeds`, so a node that joined or left keeps that across restarts. The
//! bytes are opaque here: membership encodes and checks them.
//!
//! A write goes to `cluster-state.tmp`, is synced, renamed over the old file, and the directory
//! synced: a crash at any point leaves either the old state or the new one, never a torn mix.
//! Persisting again before an earlier write finished is the caller's concern; the shell runs one
//! write at a time, in order, so the file never goes back to an older state.
//!
//! These functions block (file IO and fsync): call them before the executors start or through
//! `spawn_blocking`, as the epoch files are.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the state file in the node's data directory.
pub const CLUSTER_STATE_FILE: &str = "cluster-state";
/// Largest state file read back; membership state is a few hundred bytes per member.
pub const CLUSTER_STATE_BYTES_MAX: u64 = 16 << 20;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file could not be read, written or synced.
    #[error("cluster state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is larger than any state this node writes.
    #[error(
        "cluster state file {path} is {len} bytes, above the limit of {CLUSTER_STATE_BYTES_MAX}"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
}

/// The state last persisted in `data_dir`, or `None` if the node never persisted one.
pub fn read(data_dir: &Path) -> Result<Option<Vec<u8>>, StateFileError> {
    let path = data_dir.join(CLUSTER_STATE_FILE);
    let io = |source| StateFileError::Io {
        path: path.clone(),
        source,
    };
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if len > CLUSTER_STATE_BYTES_MAX {
        return Err(StateFileError::TooLarge { path, len });
    }
    std::fs::read(&path).map(Some).map_err(io)
}

/// Replaces the state in `data_dir` by `bytes`, atomically and durably.
pub fn write(data_dir: &Path, bytes: &[u8]) -> Result<(), StateFileError> {
    replace_file(data_dir, CLUSTER_STATE_FILE, bytes)
        .map_err(|(path, source)| StateFileError::Io { path, source })
}

/// Replaces the file `name` in `data_dir` (created if missing) by `bytes`, atomically and
/// durably: a temporary file, synced, renamed over it, the directory synced (module docs). The
/// error names the path that failed. Shared with the node's other small state files.
pub(crate) fn replace_file(
    data_dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), (PathBuf, std::io::Error)> {
    let path = data_dir.join(name);
    let io = |source| (path.clone(), source);
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Nothing before the first write; each write replaces the whole state and leaves no
    /// temporary file behind; an oversized file is refused rather than read.
    #[test]
    fn write_then_read() {
        // Unit tests have no CARGO_TARGET_TMPDIR; the workspace's target directory serves.
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/unit-tmp")
            .join(format!("cluster-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read(&dir).unwrap(), None);
        write(&dir, b"first state, longer").unwrap();
        write(&dir, b"second").unwrap();
        assert_eq!(read(&dir).unwrap().as_deref(), Some(&b"second"[..]));
        assert!(!dir.join("cluster-state.tmp").exists());
        let big = std::fs::File::create(dir.join(CLUSTER_STATE_FILE)).unwrap();
        big.set_len(CLUSTER_STATE_BYTES_MAX + 1).unwrap();
        assert!(matches!(read(&dir), Err(StateFileError::TooLarge { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
