//! Node settings: a TOML file, command-line flags that override it, and defaults (sans-IO).
//!
//! [`FileConfig::parse`] reads the file's text (the caller reads the file); [`Settings::resolve`]
//! merges, for every setting, the flag if given, else the file's value, else the default, so that
//! `ringkv serve` with neither file nor flags runs a working single node. Unknown keys in the file
//! are errors, so a misspelt setting is never silently ignored. `docs/OPERATIONS.md` lists every
//! setting with its default.
//!
//! Limits: only the settings the node implements today exist here; the peer listener and seeds
//! come with their features.

use std::net::SocketAddr;
use std::path::PathBuf;

use ringkv_engine::Durability;
use ringkv_engine::config::{
    KEY_BYTES_MAX_HARD as ENGINE_KEY_BYTES_MAX_HARD, VALUE_BYTES_MAX_HARD,
};
use ringkv_net::Limits;
use ringkv_net::limits::{
    FRAME_BYTES_MAX_DEFAULT, FRAME_BYTES_MAX_HARD, FRAME_BYTES_MIN, KEY_BYTES_MAX_DEFAULT,
    PUT_OVERHEAD_BYTES_MAX,
};

use super::route::engine_key_bytes_max;
use serde::Deserialize;

/// Default data directory.
pub const DATA_DIR_DEFAULT: &str = "./ringkv-data";
/// Default client protocol address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7878";
/// Default cluster and node name.
pub const NAME_DEFAULT: &str = "ringkv";
/// Default bound on requests executing at once per connection.
pub const INFLIGHT_PER_CONNECTION_MAX_DEFAULT: usize = 128;
/// Default capacity of each shard-to-shard queue, in messages.
pub const MESH_QUEUE_MESSAGES_MAX_DEFAULT: usize = 1024;
/// Default bound on other shards' requests executing at once on a shard.
pub const PEER_INFLIGHT_MAX_DEFAULT: usize = 1024;
/// Default largest value: the engine's default, 1 MiB.
pub const VALUE_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Largest `key_bytes_max`: the engine's hard key limit less the bucket prefix of engine keys.
pub const KEY_BYTES_MAX_MAX: usize = ENGINE_KEY_BYTES_MAX_HARD - engine_key_bytes_max(0);
/// Default deadline of requests that name none, in milliseconds.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Largest request deadline, in milliseconds: ten minutes (longer ones are shortened to it).
pub const REQUEST_TIMEOUT_MS_MAX: u64 = 600_000;
/// Default bound on the wait for connections to drain at shutdown, in milliseconds.
pub const SHUTDOWN_DRAIN_MS_DEFAULT: u64 = 5000;
/// Largest accepted shutdown drain, in milliseconds: ten minutes.
pub const SHUTDOWN_DRAIN_MS_MAX: u64 = 600_000;
/// Largest value accepted for any of the three queue bounds above; beyond it they stop bounding memory.
pub const QUEUE_BOUND_MAX: usize = 1 << 16;

/// `sync` or `buffered`, as written in the file and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityName {
    /// [`Durability::Sync`].
    Sync,
    /// [`Durability::Buffered`].
    Buffered,
}

impl From<DurabilityName> for Durability {
    fn from(d: DurabilityName) -> Self {
        match d {
            DurabilityName::Sync => Durability::Sync,
            DurabilityName::Buffered => Durability::Buffered,
        }
    }
}

/// Every setting, each optional: the contents of a config file, or the flags given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Node data directory.
    pub data_dir: Option<PathBuf>,
    /// Client protocol address.
    pub listen: Option<SocketAddr>,
    /// RESP2 (Redis protocol) address; absent means no RESP listener.
    pub resp_listen: Option<SocketAddr>,
    /// Admin HTTP address; absent means no admin listener.
    pub admin_listen: Option<SocketAddr>,
    /// Number of shards.
    pub shards: Option<usize>,
    /// Write acknowledgement.
    pub durability: Option<DurabilityName>,
    /// Cluster name clients must give.
    pub cluster_name: Option<String>,
    /// This node's name.
    pub node_name: Option<String>,
    /// Requests executing at once per connection.
    pub inflight_per_connection_max: Option<usize>,
    /// Capacity of each shard-to-shard queue, in messages.
    pub mesh_queue_messages_max: Option<usize>,
    /// Other shards' requests executing at once on a shard.
    pub peer_inflight_max: Option<usize>,
    /// Bound on the connection drain at shutdown, in milliseconds.
    pub shutdown_drain_ms: Option<u64>,
    /// Deadline of requests that name none, in milliseconds.
    pub request_timeout_ms: Option<u64>,
    /// Largest frame accepted, header included.
    pub frame_bytes_max: Option<usize>,
    /// Largest key accepted.
    pub key_bytes_max: Option<usize>,
    /// Largest value stored.
    pub value_bytes_max: Option<usize>,
}

/// A config file or flag that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("config file: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("setting {name} = {value}: {reason}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl FileConfig {
    /// Parses a config file's text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }
}

/// The resolved settings of a node (shard count still optional: the caller defaults it to the
/// CPUs of the affinity mask, which only it can read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Node data directory.
    pub data_dir: PathBuf,
    /// Client protocol address.
    pub listen: SocketAddr,
    /// RESP2 address, if enabled.
    pub resp_listen: Option<SocketAddr>,
    /// Admin HTTP address, if enabled.
    pub admin_listen: Option<SocketAddr>,
    /// Number of shards, if set.
    pub shards: Option<usize>,
    /// Write acknowledgement.
    pub durability: Durability,
    /// Cluster name clients must give.
    pub cluster_name: String,
    /// This node's name.
    pub node_name: String,
    /// Requests executing at once per connection.
    pub inflight_per_connection_max: usize,
    /// Capacity of each shard-to-shard queue, in messages.
    pub mesh_queue_messages_max: usize,
    /// Other shards' requests executing at once on a shard.
    pub peer_inflight_max: usize,
    /// Bound on the connection drain at shutdown, in milliseconds.
    pub shutdown_drain_ms: u64,
    /// Deadline of requests that name none, in milliseconds.
    pub request_timeout_ms: u64,
    /// Frame and key limits of the client protocol.
    pub limits: Limits,
    /// Largest value stored.
    pub value_bytes_max: usize,
}

fn bound(name: &'static str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 || value > QUEUE_BOUND_MAX {
        return Err(ConfigError::Invalid {
            name,
            value: value.to_string(),
            reason: "must be in [1, 65536]",
        });
    }
    Ok(value)
}

/// Checks the protocol limits and the value limit against their bounds and each other.
fn check_limits(limits: &Limits, value_bytes_max: usize) -> Result<(), ConfigError> {
    if !(FRAME_BYTES_MIN..=FRAME_BYTES_MAX_HARD).contains(&limits.frame_bytes_max) {
        return Err(ConfigError::Invalid {
            name: "frame_bytes_max",
            value: limits.frame_bytes_max.to_string(),
            reason: "must be in [65536, 67108864]",
        });
    }
    if limits.key_bytes_max == 0 || limits.key_bytes_max > KEY_BYTES_MAX_MAX {
        return Err(ConfigError::Invalid {
            name: "key_bytes_max",
            value: limits.key_bytes_max.to_string(),
            reason: "must be in [1, 3840]",
        });
    }
    if value_bytes_max > VALUE_BYTES_MAX_HARD {
        return Err(ConfigError::Invalid {
            name: "value_bytes_max",
            value: value_bytes_max.to_string(),
            reason: "must be at most 16777216 (16 MiB)",
        });
    }
    // A value the node stores must fit a PUT frame, or no client could ever write it.
    if value_bytes_max + PUT_OVERHEAD_BYTES_MAX > limits.frame_bytes_max {
        return Err(ConfigError::Invalid {
            name: "value_bytes_max",
            value: value_bytes_max.to_string(),
            reason: "a PUT of this size does not fit frame_bytes_max",
        });
    }
    Ok(())
}

impl Settings {
    /// Merges `flags` over `file` over the defaults and checks the result.
    pub fn resolve(flags: FileConfig, file: FileConfig) -> Result<Self, ConfigError> {
        let listen = match flags.listen.or(file.listen) {
            Some(addr) => addr,
            None => LISTEN_DEFAULT
                .parse()
                .expect("the default listen address is a valid socket address"),
        };
        let shards = flags.shards.or(file.shards);
        if shards == Some(0) {
            return Err(ConfigError::Invalid {
                name: "shards",
                value: "0".into(),
                reason: "a node needs at least one shard",
            });
        }
        let shutdown_drain_ms = flags
            .shutdown_drain_ms
            .or(file.shutdown_drain_ms)
            .unwrap_or(SHUTDOWN_DRAIN_MS_DEFAULT);
        if shutdown_drain_ms > SHUTDOWN_DRAIN_MS_MAX {
            return Err(ConfigError::Invalid {
                name: "shutdown_drain_ms",
                value: shutdown_drain_ms.to_string(),
                reason: "must be at most 600000 (ten minutes)",
            });
        }
        let limits = Limits {
            frame_bytes_max: flags
                .frame_bytes_max
                .or(file.frame_bytes_max)
                .unwrap_or(FRAME_BYTES_MAX_DEFAULT),
            key_bytes_max: flags
                .key_bytes_max
                .or(file.key_bytes_max)
                .unwrap_or(KEY_BYTES_MAX_DEFAULT),
        };
        let value_bytes_max = flags
            .value_bytes_max
            .or(file.value_bytes_max)
            .unwrap_or(VALUE_BYTES_MAX_DEFAULT);
        check_limits(&limits, value_bytes_max)?;
        let request_timeout_ms = flags
            .request_timeout_ms
            .or(file.request_timeout_ms)
            .unwrap_or(REQUEST_TIMEOUT_MS_DEFAULT);
        if request_timeout_ms == 0 || request_timeout_ms > REQUEST_TIMEOUT_MS_MAX {
            return Err(ConfigError::Invalid {
                name: "request_timeout_ms",
                value: request_timeout_ms.to_string(),
                reason: "must be in [1, 600000]",
            });
        }
        Ok(Self {
            shutdown_drain_ms,
            request_timeout_ms,
            limits,
            value_bytes_max,
            resp_listen: flags.resp_listen.or(file.resp_listen),
            admin_listen: flags.admin_listen.or(file.admin_listen),
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT)),
            listen,
            shards,
            durability: flags
                .durability
                .or(file.durability)
                .unwrap_or(DurabilityName::Sync)
                .into(),
            cluster_name: flags
                .cluster_name
                .or(file.cluster_name)
                .unwrap_or_else(|| NAME_DEFAULT.to_owned()),
            node_name: flags
                .node_name
                .or(file.node_name)
                .unwrap_or_else(|| NAME_DEFAULT.to_owned()),
            inflight_per_connection_max: bound(
                "inflight_per_connection_max",
                flags
                    .inflight_per_connection_max
                    .or(file.inflight_per_connection_max)
                    .unwrap_or(INFLIGHT_PER_CONNECTION_MAX_DEFAULT),
            )?,
            mesh_queue_messages_max: bound(
                "mesh_queue_messages_max",
                flags
                    .mesh_queue_messages_max
                    .or(file.mesh_queue_messages_max)
                    .unwrap_or(MESH_QUEUE_MESSAGES_MAX_DEFAULT),
            )?,
            peer_inflight_max: bound(
                "peer_inflight_max",
                flags
                    .peer_inflight_max
                    .or(file.peer_inflight_max)
                    .unwrap_or(PEER_INFLIGHT_MAX_DEFAULT),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// No file and no flags give the documented defaults.
    #[test]
    fn defaults() {
        let s = Settings::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("./ringkv-data"));
        assert_eq!(s.listen.to_string(), "127.0.0.1:7878");
        assert_eq!(s.shards, None);
        assert_eq!(s.durability, Durability::Sync);
        assert_eq!(s.inflight_per_connection_max, 128);
    }

    /// A flag beats the file, the file beats the default.
    #[test]
    fn flags_override_the_file() {
        let file = FileConfig::parse(
            "data_dir = \"/d\"\nlisten = \"0.0.0.0:9000\"\ndurability = \"buffered\"\nshards = 3\n",
        )
        .unwrap();
        let flags = FileConfig {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            ..FileConfig::default()
        };
        let s = Settings::resolve(flags, file).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:1");
        assert_eq!(s.data_dir, PathBuf::from("/d"));
        assert_eq!(s.durability, Durability::Buffered);
        assert_eq!(s.shards, Some(3));
    }

    /// Misspelt keys, wrong types and out-of-range bounds are refused.
    #[test]
    fn bad_files_are_refused() {
        assert!(FileConfig::parse("data_dri = \"/d\"").is_err());
        assert!(FileConfig::parse("shards = \"two\"").is_err());
        assert!(FileConfig::parse("durability = \"maybe\"").is_err());
        let zero = FileConfig::parse("peer_inflight_max = 0").unwrap();
        assert!(Settings::resolve(FileConfig::default(), zero).is_err());
        let zero = FileConfig::parse("shards = 0").unwrap();
        assert!(Settings::resolve(FileConfig::default(), zero).is_err());
        let over_hard = FileConfig::parse("value_bytes_max = 16777217").unwrap();
        assert!(Settings::resolve(FileConfig::default(), over_hard).is_err());
        let no_fit =
            FileConfig::parse("value_bytes_max = 16777216\nframe_bytes_max = 16777216").unwrap();
        assert!(Settings::resolve(FileConfig::default(), no_fit).is_err());
        let fits = FileConfig::parse("value_bytes_max = 16777216").unwrap();
        assert!(Settings::resolve(FileConfig::default(), fits).is_ok());
        let never = FileConfig::parse("request_timeout_ms = 0").unwrap();
        assert!(Settings::resolve(FileConfig::default(), never).is_err());
        let key = FileConfig::parse("key_bytes_max = 3841").unwrap();
        assert!(Settings::resolve(FileConfig::default(), key).is_err());
    }
}
