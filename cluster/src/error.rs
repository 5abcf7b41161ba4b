//! Why a node could not start or stop cleanly: the one error type of `ringkv serve`, shared by
//! the startup checks ([`crate::preflight`]) and the shell ([`crate::server`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use ringkv_engine::EngineError;

use crate::epochs;

/// Why a node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Another process listens on the address (and still did after a short wait).
    #[error("address {addr} is already in use (another ringkv node or another server?)")]
    AddrInUse {
        /// The listen address.
        addr: SocketAddr,
    },
    /// The address could not be bound for another reason.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The node's membership could not be restored or started.
    #[error("membership: {0}")]
    Membership(String),
    /// The node's identity could not be established, or the cluster knows its id from another
    /// data directory.
    #[error("node identity: {0}")]
    Identity(String),
    /// A shard's epoch lease could not be read or persisted.
    #[error("shard {shard}: {source}")]
    Epochs {
        /// The shard.
        shard: usize,
        /// What went wrong.
        source: epochs::EpochError,
    },
    /// A shard's engine failed to open or to close.
    #[error("shard {shard}: engine in {dir}: {source}")]
    Engine {
        /// The shard.
        shard: usize,
        /// Its engine directory.
        dir: PathBuf,
        /// The engine's error.
        source: EngineError,
    },
    /// The kernel refuses this process an io_uring, which every executor is built on.
    #[error("io_uring is not available: {reason}; {hint}")]
    IoUringUnavailable {
        /// What failed and the errno it failed with.
        reason: String,
        /// What to check or change.
        hint: String,
    },
    /// The locked-memory limit (RLIMIT_MEMLOCK) is too low for the runtime.
    #[error(
        "not enough locked memory: RLIMIT_MEMLOCK is {limit_bytes} bytes and {cause}; this node \
         alone needs at least {required_bytes} bytes: raise the limit for the user or service \
         that runs ringkv (`ulimit -l {kib}` or more in its shell, LimitMEMLOCK= in its systemd \
         unit, memlock in /etc/security/limits.conf, --ulimit memlock= for Docker)",
        kib = .required_bytes.div_ceil(1024)
    )]
    LockedMemory {
        /// What failed under the limit.
        cause: String,
        /// The soft limit this process runs under, in bytes.
        limit_bytes: u64,
        /// The least this node needs, in bytes, if no other process of the user holds any.
        required_bytes: u64,
    },
    /// The runtime refused something (executor, listener, mesh, signals).
    #[error("{what}: {message}")]
    Runtime {
        /// What was being done.
        what: String,
        /// The runtime's error.
        message: String,
    },
}
