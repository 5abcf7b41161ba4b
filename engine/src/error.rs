//! Typed errors of the engine.
//!
//! Input errors (oversized key or value) leave the store untouched. IO errors carry the operation
//! and the path. A failed write or `fdatasync` is fatal: after an fsync error the kernel may already
//! have dropped the dirty data, so retrying could acknowledge a write that is not on disk. The store
//! then refuses every further operation with [`EngineError::Failed`] until it is reopened, and
//! recovery decides what survived.

use std::path::PathBuf;
use std::sync::Arc;

/// Everything an engine operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The key is longer than the configured maximum.
    #[error("key of {len} bytes exceeds the limit of {max} bytes")]
    KeyTooLarge {
        /// Length of the rejected key.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The value is longer than the configured maximum.
    #[error("value of {len} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge {
        /// Length of the rejected value.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// An IO operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error (shared so the error can be handed to many waiting writers).
        source: Arc<std::io::Error>,
    },
    /// A write or sync failed earlier; the store accepts nothing more until it is reopened.
    #[error("store failed and must be reopened: {0}")]
    Failed(Arc<EngineError>),
    /// Stored bytes did not pass their checksum when read.
    #[error("corrupt record in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// Byte offset of the record.
        offset: u64,
        /// What did not match.
        reason: &'static str,
    },
    /// Another process holds the data directory.
    #[error("data directory {0} is locked by another process")]
    Locked(PathBuf),
    /// The engine holds as many segments as its index can address.
    #[error("too many segment files ({0}); compaction must catch up or segments must be larger")]
    TooManySegments(usize),
    /// A configuration value is out of range.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The engine was closed.
    #[error("engine is closed")]
    Closed,
}

impl EngineError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source: Arc::new(source),
        }
    }
}
