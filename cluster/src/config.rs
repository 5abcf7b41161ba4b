//! Node settings: a TOML file, command-line flags that override it, and defaults (sans-IO).
//!
//! [`FileConfig::parse`] reads the file's text (the caller reads the file); [`Settings::resolve`]
//! merges, for every setting, the flag if given, else the file's value, else the default, so that
//! `ringkv serve` with neither file nor flags runs a working single node. Unknown keys in the file
//! are errors, so a misspelt setting is never silently ignored. `docs/OPERATIONS.md` lists every
//! setting with its default.
//!
//! Cluster settings: `node_id`, `peer_listen`, `seeds` (either the initial member list of a new
//! cluster, `ID@HOST:PORT` peer addresses, the same list on every node; or plain `HOST:PORT` peer
//! addresses of members a new node joins by itself), `replica_timeout_ms`,
//! `hint_retry_ms`, `gossip_ms`, `hint_bytes_max` (the node's hint store, split evenly across its
//! shards), `heartbeat_ms` and `phi_threshold` (failure detection), `admission_p99_threshold_us`
//! (admission control of background work), the anti-entropy settings `ae_interval_ms` (0 turns
//! it off), `ae_keys_max` and `tombstone_grace_ms`, and bucket properties as `[buckets.<name>]`
//! tables (`[buckets.default]` for
//! every bucket not named). When the default bucket is not configured it is the Dynamo
//! `(n, r, w) = (3, 2, 2)` with siblings, whatever the node was started with, and `dw = 1` on a
//! sync node, `dw = 0` on a buffered one (a buffered node acknowledges what it coordinates once
//! buffered, and names at startup the buckets whose tables still ask for synced
//! acknowledgements; `dw` decides no placement). The
//! replication of a key must not depend on how one node was started (a node restarted without
//! `--seeds` that derived `n` from them would drop copies it still replicates). On a cluster with
//! fewer members than `n` every member holds a copy and the bucket's quorums are capped at the
//! member count ([`BucketProps::quorum_among`]), so `ringkv serve` alone still works. The RESP
//! listener's bucket `redis`, when not configured, is the default bucket in `lww` mode.
//!
//! Limits: seeds only bootstrap a new cluster (a node that persisted its membership restores it
//! instead); they are resolved once, at startup, by the caller.

use std::collections::BTreeMap;
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

use crate::replica::{HINT_KEY_PREFIX_BYTES, engine_key_bytes_max};
use crate::resp::RESP_BUCKET;
use ringkv_core::NodeId;
use ringkv_core::bucket::{BucketProps, BucketType, Buckets, ConflictMode, DEFAULT_BUCKET};
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
/// Largest `key_bytes_max`: the engine's hard key limit less the bucket prefix of engine keys and
/// the node id that prefixes hint keys.
pub const KEY_BYTES_MAX_MAX: usize =
    ENGINE_KEY_BYTES_MAX_HARD - engine_key_bytes_max(0) - HINT_KEY_PREFIX_BYTES;
/// Default node id.
pub const NODE_ID_DEFAULT: u32 = 1;
/// Default time a replica has to answer before its slot moves on, in milliseconds.
pub const REPLICA_TIMEOUT_MS_DEFAULT: u64 = 1000;
/// Default interval between hinted-handoff rounds, in milliseconds.
pub const HINT_RETRY_MS_DEFAULT: u64 = 1000;
/// Default interval between anti-entropy rounds of a shard, in milliseconds.
pub const AE_INTERVAL_MS_DEFAULT: u64 = 1000;
/// Default bound on the keys one anti-entropy exchange lists and repairs per direction.
pub const AE_KEYS_MAX_DEFAULT: usize = 256;
/// Default tombstone grace period, in milliseconds: one day.
pub const TOMBSTONE_GRACE_MS_DEFAULT: u64 = 86_400_000;
/// Default `expiry_grace_ms`: an hour. Shorter than a tombstone's day because a store of
/// sessions expires its whole data set every few hours and keeps each expired key (index and
/// tree entries) until it is reaped; see docs/OPERATIONS.md for what it must outlast.
pub const EXPIRY_GRACE_MS_DEFAULT: u64 = 3_600_000;
/// Longest tombstone grace period, in milliseconds: 30 days.
pub const TOMBSTONE_GRACE_MS_MAX: u64 = 30 * 86_400_000;
/// Default interval between membership gossip rounds, in milliseconds.
pub const GOSSIP_MS_DEFAULT: u64 = 1000;
/// Default bound on the bytes of hints a node stores (all shards together): 1 GiB.
pub const HINT_BYTES_MAX_DEFAULT: u64 = 1 << 30;
/// Default interval between failure-detector heartbeats to each peer, in milliseconds.
pub const HEARTBEAT_MS_DEFAULT: u64 = 1000;
/// Default suspicion level above which a silent peer is believed down.
pub const PHI_THRESHOLD_DEFAULT: u32 = 8;
/// Largest accepted `phi_threshold` (a silence of about 150 mean intervals).
pub const PHI_THRESHOLD_MAX: u32 = 64;
/// Default foreground p99 above which background work backs off, in microseconds.
pub const ADMISSION_P99_THRESHOLD_US_DEFAULT: u64 = 10_000;
/// Largest replica timeout or hint interval, in milliseconds: ten minutes.
pub const PEER_INTERVAL_MS_MAX: u64 = 600_000;
/// Longest node name: a peer HELLO carries `<id>@<name>` in 255 bytes, and an id takes up to 10.
pub const NODE_NAME_BYTES_MAX: usize = 240;
/// Default deadline of requests that name none, in milliseconds.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Largest request deadline, in milliseconds: ten minutes (longer ones are shortened to it).
pub const REQUEST_TIMEOUT_MS_MAX: u64 = ringkv_core::coordinator::REQUEST_DEADLINE_MS_MAX;
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
    /// This node's id in the ring and in causality metadata.
    pub node_id: Option<u32>,
    /// Peer protocol address, shared by every shard's listener.
    pub peer_listen: Option<SocketAddr>,
    /// The cluster's members as `ID@HOST:PORT` peer addresses (this node may be included).
    pub seeds: Option<Vec<String>>,
    /// Time a replica has to answer before its slot moves on, in milliseconds.
    pub replica_timeout_ms: Option<u64>,
    /// Interval between hinted-handoff rounds, in milliseconds.
    pub hint_retry_ms: Option<u64>,
    /// Interval between anti-entropy rounds of a shard, in milliseconds (0: off).
    pub ae_interval_ms: Option<u64>,
    /// Most keys one anti-entropy exchange lists, and repairs in each direction.
    pub ae_keys_max: Option<usize>,
    /// How long every replica must have held a tombstone before it is reaped, in milliseconds.
    pub tombstone_grace_ms: Option<u64>,
    /// How long after its expiry an expired object is reaped, in milliseconds.
    pub expiry_grace_ms: Option<u64>,
    /// Interval between membership gossip rounds, in milliseconds.
    pub gossip_ms: Option<u64>,
    /// Bytes of hints the node stores at most, split evenly across shards.
    pub hint_bytes_max: Option<u64>,
    /// Bytes of the node's value cache, split evenly across shards; 0 turns it off.
    pub cache_bytes: Option<u64>,
    /// Interval between heartbeats to each peer, in milliseconds.
    pub heartbeat_ms: Option<u64>,
    /// Suspicion level (phi) above which a silent peer is believed down.
    pub phi_threshold: Option<u32>,
    /// Foreground p99 above which background work backs off, in microseconds.
    pub admission_p99_threshold_us: Option<u64>,
    /// Bucket properties by bucket name (`default` for every other bucket).
    pub buckets: Option<BTreeMap<String, BucketTable>>,
}

/// A `[buckets.<name>]` table; absent fields take the default bucket's value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketTable {
    /// Replicas per key.
    pub n: Option<u8>,
    /// Read quorum.
    pub r: Option<u8>,
    /// Write quorum.
    pub w: Option<u8>,
    /// Durable-write quorum.
    pub dw: Option<u8>,
    /// `siblings` or `lww`.
    pub mode: Option<ConflictMode>,
    /// Sibling limit.
    pub max_siblings: Option<u16>,
    /// Default time to live of writes that name no expiry, in milliseconds; 0 for none (to
    /// turn off a default the `default` table set).
    pub ttl_ms: Option<u64>,
    /// `counter`, `set` or `map`: the convergent data type every key of the bucket holds.
    #[serde(rename = "type")]
    pub data_type: Option<BucketType>,
}

impl BucketTable {
    fn over(&self, base: BucketProps) -> BucketProps {
        BucketProps {
            n: self.n.unwrap_or(base.n),
            r: self.r.unwrap_or(base.r),
            w: self.w.unwrap_or(base.w),
            dw: self.dw.unwrap_or(base.dw),
            mode: self.mode.unwrap_or(base.mode),
            max_siblings: self.max_siblings.unwrap_or(base.max_siblings),
            ttl_ms: match self.ttl_ms {
                Some(0) => None,
                Some(ms) => Some(ms),
                None => base.ttl_ms,
            },
            // A bucket's type is its own: a typed `default` table does not type the others.
            data_type: self.data_type,
        }
    }
}

/// Parses a seed `ID@HOST:PORT` into the id and the unresolved address.
pub fn parse_seed(seed: &str) -> Result<(NodeId, String), ConfigError> {
    let invalid = |reason| ConfigError::Invalid {
        name: "seeds",
        value: seed.to_owned(),
        reason,
    };
    let (id, addr) = seed
        .trim()
        .split_once('@')
        .ok_or_else(|| invalid("expected ID@HOST:PORT"))?;
    let id: u32 = id
        .parse()
        .map_err(|_| invalid("the node id is not a u32"))?;
    if !addr.contains(':') {
        return Err(invalid("expected ID@HOST:PORT"));
    }
    Ok((NodeId(id), addr.to_owned()))
}

/// Checks a plain seed `HOST:PORT`.
pub fn parse_contact_seed(seed: &str) -> Result<String, ConfigError> {
    let seed = seed.trim();
    match seed.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(seed.to_owned())
        }
        _ => Err(ConfigError::Invalid {
            name: "seeds",
            value: seed.to_owned(),
            reason: "expected HOST:PORT or ID@HOST:PORT",
        }),
    }
}

fn interval(name: &'static str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 || value > PEER_INTERVAL_MS_MAX {
        return Err(ConfigError::Invalid {
            name,
            value: value.to_string(),
            reason: "must be in [1, 600000]",
        });
    }
    Ok(value)
}

fn default_listen() -> SocketAddr {
    LISTEN_DEFAULT
        .parse()
        .expect("the default listen address is a valid socket address")
}

/// `value` of setting `name` if it lies in `range`, else why not.
fn in_range<T: PartialOrd + ToString>(
    name: &'static str,
    value: T,
    range: impl std::ops::RangeBounds<T>,
    reason: &'static str,
) -> Result<T, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Invalid {
            name,
            value: value.to_string(),
            reason,
        })
    }
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
    /// The id asked for (`--node-id`); the node's identity file decides ([`crate::identity`]).
    pub node_id: Option<NodeId>,
    /// Peer protocol address, if given.
    pub peer_listen: Option<SocketAddr>,
    /// The seeds: every member of a new cluster (this node included) with its peer address,
    /// unresolved (`HOST:PORT`).
    pub seeds: BTreeMap<NodeId, String>,
    /// Plain `HOST:PORT` seeds: members a new node asks to join, this node's own peer address
    /// left out.
    pub contact_seeds: Vec<String>,
    /// Time a replica has to answer before its slot moves on, in milliseconds.
    pub replica_timeout_ms: u64,
    /// Interval between hinted-handoff rounds, in milliseconds.
    pub hint_retry_ms: u64,
    /// Interval between anti-entropy rounds of a shard, in milliseconds (0: off).
    pub ae_interval_ms: u64,
    /// Most keys one anti-entropy exchange lists, and repairs in each direction.
    pub ae_keys_max: usize,
    /// How long every replica must have held a tombstone before it is reaped, in milliseconds.
    pub tombstone_grace_ms: u64,
    /// How long after its expiry an expired object is reaped, in milliseconds.
    pub expiry_grace_ms: u64,
    /// Interval between membership gossip rounds, in milliseconds.
    pub gossip_ms: u64,
    /// Bytes of hints the node stores at most, split evenly across shards.
    pub hint_bytes_max: u64,
    /// Bytes of the node's value cache, split evenly across shards; `None` is a quarter of the
    /// machine's memory ([`crate::preflight::default_cache_bytes`]), found when the node starts.
    pub cache_bytes: Option<u64>,
    /// Interval between heartbeats to each peer, in milliseconds.
    pub heartbeat_ms: u64,
    /// Suspicion level (phi) above which a silent peer is believed down.
    pub phi_threshold: u32,
    /// Foreground p99 above which background work backs off, in microseconds.
    pub admission_p99_threshold_us: u64,
    /// Bucket properties, validated.
    pub buckets: Buckets,
}

/// What node `id` takes from the seeds: its peer address and its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedView {
    /// The peer address: `peer_listen` if given, else this node's own seed if it is `IP:PORT`.
    pub peer_listen: Option<SocketAddr>,
    /// Every other seed's peer address, unresolved.
    pub peers: BTreeMap<NodeId, String>,
}

impl Settings {
    /// On a buffered node, the buckets whose writes still wait for synced acknowledgements
    /// (`dw` above 0 in their table), by name, `default` for every bucket not named: the node
    /// says so at startup, so a buffered node that syncs is never a surprise.
    pub fn syncing_buckets(&self) -> Vec<String> {
        if self.durability != Durability::Buffered {
            return Vec::new();
        }
        let default = (self.buckets.default.dw > 0).then(|| DEFAULT_BUCKET.to_owned());
        default
            .into_iter()
            .chain(
                self.buckets
                    .named
                    .iter()
                    .filter(|(_, props)| props.dw > 0)
                    .map(|(name, _)| String::from_utf8_lossy(name).into_owned()),
            )
            .collect()
    }

    /// The seeds as node `id` (its identity, once known) sees them. A node given seeds must be
    /// one of them, so every node of a new cluster claims the same ring over the same members,
    /// and must have a peer address.
    pub fn seed_view(&self, id: NodeId) -> Result<SeedView, ConfigError> {
        let mut peers = self.seeds.clone();
        let own_seed = peers.remove(&id);
        if !peers.is_empty() && own_seed.is_none() {
            return Err(ConfigError::Invalid {
                name: "seeds",
                value: format!("(without {id})"),
                reason: "the seeds must list this node with its own id; give --node-id on the \
                         first start of a seeded node",
            });
        }
        let peer_listen = self
            .peer_listen
            .or_else(|| own_seed.as_deref().and_then(|a| a.parse().ok()));
        if !peers.is_empty() && peer_listen.is_none() {
            return Err(ConfigError::Invalid {
                name: "peer_listen",
                value: "(none)".into(),
                reason: "a node with peers needs a peer address (or an IP:PORT seed for its own id)",
            });
        }
        Ok(SeedView { peer_listen, peers })
    }
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
            reason: "must be in [1, 3836]",
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
        // The flag's value, else the file's, else `default`.
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                flags.$field.or(file.$field).unwrap_or($default)
            };
        }
        let listen = flags.listen.or(file.listen).unwrap_or_else(default_listen);
        let shards = flags.shards.or(file.shards);
        if let Some(count) = shards {
            in_range("shards", count, 1.., "a node needs at least one shard")?;
        }
        let shutdown_drain_ms = in_range(
            "shutdown_drain_ms",
            pick!(shutdown_drain_ms, SHUTDOWN_DRAIN_MS_DEFAULT),
            0..=SHUTDOWN_DRAIN_MS_MAX,
            "must be at most 600000 (ten minutes)",
        )?;
        let limits = Limits {
            frame_bytes_max: pick!(frame_bytes_max, FRAME_BYTES_MAX_DEFAULT),
            key_bytes_max: pick!(key_bytes_max, KEY_BYTES_MAX_DEFAULT),
        };
        let value_bytes_max = pick!(value_bytes_max, VALUE_BYTES_MAX_DEFAULT);
        check_limits(&limits, value_bytes_max)?;
        let request_timeout_ms = in_range(
            "request_timeout_ms",
            pick!(request_timeout_ms, REQUEST_TIMEOUT_MS_DEFAULT),
            1..=REQUEST_TIMEOUT_MS_MAX,
            "must be in [1, 600000]",
        )?;
        let node_id = flags.node_id.or(file.node_id);
        if let Some(id) = node_id {
            in_range("node_id", id, 1.., "node ids start at 1")?;
        }
        let node_id = node_id.map(NodeId);
        let peer_listen = flags.peer_listen.or(file.peer_listen);
        let (seeds, contact_seeds) =
            resolve_seeds(flags.seeds.or(file.seeds).unwrap_or_default(), peer_listen)?;
        let durability: Durability = pick!(durability, DurabilityName::Sync).into();
        let buckets = resolve_buckets(
            flags.buckets.or(file.buckets).unwrap_or_default(),
            durability,
        )?;
        let node_name = pick!(node_name, NAME_DEFAULT.to_owned());
        if node_name.len() > NODE_NAME_BYTES_MAX {
            return Err(ConfigError::Invalid {
                name: "node_name",
                value: node_name,
                reason: "must be at most 240 bytes",
            });
        }
        Ok(Self {
            node_id,
            peer_listen,
            seeds,
            contact_seeds,
            buckets,
            node_name,
            replica_timeout_ms: interval(
                "replica_timeout_ms",
                pick!(replica_timeout_ms, REPLICA_TIMEOUT_MS_DEFAULT),
            )?,
            hint_retry_ms: interval("hint_retry_ms", pick!(hint_retry_ms, HINT_RETRY_MS_DEFAULT))?,
            ae_interval_ms: in_range(
                "ae_interval_ms",
                pick!(ae_interval_ms, AE_INTERVAL_MS_DEFAULT),
                0..=PEER_INTERVAL_MS_MAX,
                "must be in [0, 600000]",
            )?,
            ae_keys_max: bound("ae_keys_max", pick!(ae_keys_max, AE_KEYS_MAX_DEFAULT))?,
            tombstone_grace_ms: in_range(
                "tombstone_grace_ms",
                pick!(tombstone_grace_ms, TOMBSTONE_GRACE_MS_DEFAULT),
                1..=TOMBSTONE_GRACE_MS_MAX,
                "must be in [1, 2592000000]",
            )?,
            expiry_grace_ms: in_range(
                "expiry_grace_ms",
                pick!(expiry_grace_ms, EXPIRY_GRACE_MS_DEFAULT),
                1..=TOMBSTONE_GRACE_MS_MAX,
                "must be in [1, 2592000000]",
            )?,
            gossip_ms: interval("gossip_ms", pick!(gossip_ms, GOSSIP_MS_DEFAULT))?,
            hint_bytes_max: pick!(hint_bytes_max, HINT_BYTES_MAX_DEFAULT),
            cache_bytes: flags.cache_bytes.or(file.cache_bytes),
            heartbeat_ms: interval("heartbeat_ms", pick!(heartbeat_ms, HEARTBEAT_MS_DEFAULT))?,
            phi_threshold: in_range(
                "phi_threshold",
                pick!(phi_threshold, PHI_THRESHOLD_DEFAULT),
                1..=PHI_THRESHOLD_MAX,
                "must be in [1, 64]",
            )?,
            admission_p99_threshold_us: in_range(
                "admission_p99_threshold_us",
                pick!(
                    admission_p99_threshold_us,
                    ADMISSION_P99_THRESHOLD_US_DEFAULT
                ),
                1..,
                "must be at least 1",
            )?,
            shutdown_drain_ms,
            request_timeout_ms,
            limits,
            value_bytes_max,
            resp_listen: flags.resp_listen.or(file.resp_listen),
            admin_listen: flags.admin_listen.or(file.admin_listen),
            data_dir: pick!(data_dir, PathBuf::from(DATA_DIR_DEFAULT)),
            listen,
            shards,
            durability,
            cluster_name: pick!(cluster_name, NAME_DEFAULT.to_owned()),
            inflight_per_connection_max: bound(
                "inflight_per_connection_max",
                pick!(
                    inflight_per_connection_max,
                    INFLIGHT_PER_CONNECTION_MAX_DEFAULT
                ),
            )?,
            mesh_queue_messages_max: bound(
                "mesh_queue_messages_max",
                pick!(mesh_queue_messages_max, MESH_QUEUE_MESSAGES_MAX_DEFAULT),
            )?,
            peer_inflight_max: bound(
                "peer_inflight_max",
                pick!(peer_inflight_max, PEER_INFLIGHT_MAX_DEFAULT),
            )?,
        })
    }
}

/// The seeds as named members (`ID@HOST:PORT`, a new cluster of exactly these nodes) or as
/// contacts (`HOST:PORT`, members to join through), never both; this node's own address among
/// the contacts is dropped.
fn resolve_seeds(
    listed: Vec<String>,
    peer_listen: Option<SocketAddr>,
) -> Result<(BTreeMap<NodeId, String>, Vec<String>), ConfigError> {
    let mut seeds = BTreeMap::new();
    let mut contact_seeds = Vec::new();
    for seed in listed {
        if seed.trim().is_empty() {
            continue;
        }
        if !seed.contains('@') {
            contact_seeds.push(parse_contact_seed(&seed)?);
            continue;
        }
        let (id, addr) = parse_seed(&seed)?;
        if seeds.insert(id, addr).is_some() {
            return Err(ConfigError::Invalid {
                name: "seeds",
                value: seed,
                reason: "the same node id appears twice",
            });
        }
    }
    if !seeds.is_empty() && !contact_seeds.is_empty() {
        return Err(ConfigError::Invalid {
            name: "seeds",
            value: "(ID@HOST:PORT and HOST:PORT)".into(),
            reason: "either every seed names its node (a new cluster of exactly these nodes) \
                     or none does (members to join)",
        });
    }
    if !contact_seeds.is_empty() && peer_listen.is_none() {
        return Err(ConfigError::Invalid {
            name: "peer_listen",
            value: "(none)".into(),
            reason: "a node that joins through its seeds needs a peer address",
        });
    }
    // This node's own address among the seeds (the same list on every node) is no one to
    // join.
    contact_seeds.retain(|s| s.parse::<SocketAddr>().ok() != peer_listen);
    Ok((seeds, contact_seeds))
}

/// The buckets file's tables over the defaults, with the RESP bucket added, checked. On a
/// buffered node the default `dw` is 0: a write it coordinates is acknowledged once buffered,
/// as `--durability buffered` says, unless a table asks for synced acknowledgements.
fn resolve_buckets(
    mut tables: BTreeMap<String, BucketTable>,
    durability: Durability,
) -> Result<Buckets, ConfigError> {
    let base = BucketProps {
        dw: match durability {
            Durability::Sync => BucketProps::default().dw,
            Durability::Buffered => 0,
        },
        ..BucketProps::default()
    };
    let default = match tables.remove(DEFAULT_BUCKET) {
        Some(t) => t.over(base),
        None => base,
    };
    let mut buckets = Buckets {
        default,
        named: tables
            .into_iter()
            .map(|(name, t)| (name.into_bytes(), t.over(default)))
            .collect(),
    };
    // Redis clients carry no context: their bucket resolves by last write unless configured.
    buckets
        .named
        .entry(RESP_BUCKET.to_vec())
        .or_insert(BucketProps {
            mode: ConflictMode::Lww,
            ..default
        });
    // One bucket of each convergent type, so counters, sets and maps work on defaults.
    for (data_type, name) in BucketType::BUILT_IN {
        buckets
            .named
            .entry(name.as_bytes().to_vec())
            .or_insert(BucketProps {
                data_type: Some(data_type),
                ..default
            });
    }
    buckets.validate().map_err(|e| ConfigError::Invalid {
        name: "buckets",
        value: e.0,
        reason: "invalid bucket properties",
    })?;
    Ok(buckets)
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
        assert_eq!(s.node_id, None);
        assert!(s.seeds.is_empty());
        // The same default bucket as a node started with seeds (cluster_settings): a node's
        // replication never depends on how it was started.
        let d = s.buckets.default;
        assert_eq!((d.n, d.r, d.w, d.dw), (3, 2, 2, 1));
    }

    /// A buffered node acknowledges its writes once buffered unless a bucket's table asks for
    /// synced acknowledgements, and names those buckets; a sync node keeps `dw = 1`.
    #[test]
    fn buffered_nodes_do_not_sync_by_default_and_name_the_buckets_that_do() {
        let buffered = FileConfig::parse("durability = \"buffered\"").unwrap();
        let s = Settings::resolve(FileConfig::default(), buffered).unwrap();
        assert_eq!(s.buckets.default.dw, 0);
        assert_eq!(s.buckets.props(RESP_BUCKET).dw, 0);
        assert!(s.syncing_buckets().is_empty());

        let tables = FileConfig::parse(
            "durability = \"buffered\"\n[buckets.carts]\ndw = 1\n[buckets.sessions]\nr = 1\n",
        )
        .unwrap();
        let s = Settings::resolve(FileConfig::default(), tables).unwrap();
        assert_eq!(s.buckets.props(b"carts").dw, 1);
        assert_eq!(s.buckets.props(b"sessions").dw, 0);
        assert_eq!(s.syncing_buckets(), vec!["carts".to_owned()]);

        let synced_default = FileConfig::parse(
            "durability = \"buffered\"\n[buckets.default]\ndw = 1\n[buckets.sessions]\ndw = 0\n",
        )
        .unwrap();
        let s = Settings::resolve(FileConfig::default(), synced_default).unwrap();
        // The `redis` bucket and the built-in convergent buckets copy the default's `dw`.
        assert_eq!(
            s.syncing_buckets(),
            ["default", "counters", "maps", "redis", "sets"].map(str::to_owned)
        );

        let sync = Settings::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        assert_eq!(sync.buckets.default.dw, 1);
        assert!(sync.syncing_buckets().is_empty());
    }

    /// The value cache is the machine's share unless given, by file or flag.
    #[test]
    fn the_value_cache_comes_from_the_flag_the_file_or_the_machine() {
        let sync = Settings::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        assert_eq!(sync.cache_bytes, None);
        let file = FileConfig::parse("cache_bytes = 1048576").unwrap();
        let flags = FileConfig {
            cache_bytes: Some(0),
            ..FileConfig::default()
        };
        assert_eq!(
            Settings::resolve(FileConfig::default(), file.clone())
                .unwrap()
                .cache_bytes,
            Some(1 << 20)
        );
        assert_eq!(Settings::resolve(flags, file).unwrap().cache_bytes, Some(0));
    }

    /// Seeds make the member set; the default bucket does not follow it; bucket tables inherit
    /// from the default bucket and are validated.
    #[test]
    fn cluster_settings() {
        let file = FileConfig::parse(
            "node_id = 2\nseeds = [\"1@127.0.0.1:7001\", \"2@127.0.0.1:7002\", \"3@h:7003\"]\n\
             [buckets.default]\nttl_ms = 60000\n[buckets.sessions]\nmode = \"lww\"\nr = 1\n\
             [buckets.forever]\nttl_ms = 0\n",
        )
        .unwrap();
        let s = Settings::resolve(FileConfig::default(), file).unwrap();
        assert_eq!(s.node_id, Some(NodeId(2)));
        let view = s.seed_view(NodeId(2)).unwrap();
        assert_eq!(view.peer_listen.unwrap().to_string(), "127.0.0.1:7002");
        assert_eq!(view.peers.len(), 2);
        assert_eq!(s.seeds.len(), 3);
        // A node whose identity is not among the seeds would claim another ring: refused.
        assert!(s.seed_view(NodeId(9)).is_err());
        let d = s.buckets.default;
        assert_eq!((d.n, d.r, d.w, d.dw), (3, 2, 2, 1));
        let lww = s.buckets.props(b"sessions");
        assert_eq!(
            (lww.n, lww.r, lww.w, lww.mode),
            (3, 1, 2, ConflictMode::Lww)
        );
        // `ttl_ms` is inherited from the default table, and 0 turns it off.
        assert_eq!(lww.ttl_ms, Some(60_000));
        assert_eq!(s.buckets.props(b"forever").ttl_ms, None);

        let bad = FileConfig::parse("[buckets.default]\nn = 1\nr = 2\n").unwrap();
        assert!(Settings::resolve(FileConfig::default(), bad).is_err());
        let typo = FileConfig::parse("[buckets.default]\nnn = 1\n");
        assert!(typo.is_err());
        let no_peer_addr =
            FileConfig::parse("node_id = 1\nseeds = [\"1@host:7\", \"2@host:1\"]").unwrap();
        let s = Settings::resolve(FileConfig::default(), no_peer_addr).unwrap();
        assert!(s.seed_view(NodeId(1)).is_err());
        assert!(parse_seed("x@h:1").is_err());
        assert!(parse_seed("1@h").is_err());
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
    /// Anti-entropy settings: defaults, the file, and their ranges (0 turns anti-entropy off; a
    /// grace period of 0 would reap tombstones before any copy could arrive, so it is refused).
    #[test]
    fn anti_entropy_settings() {
        let s = Settings::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        assert_eq!(s.ae_interval_ms, AE_INTERVAL_MS_DEFAULT);
        assert_eq!(s.ae_keys_max, AE_KEYS_MAX_DEFAULT);
        assert_eq!(s.tombstone_grace_ms, TOMBSTONE_GRACE_MS_DEFAULT);
        assert_eq!(s.expiry_grace_ms, EXPIRY_GRACE_MS_DEFAULT);
        let file = FileConfig::parse(
            "ae_interval_ms = 0\nae_keys_max = 16\ntombstone_grace_ms = 5000\n\
             expiry_grace_ms = 60000\n",
        )
        .unwrap();
        let s = Settings::resolve(FileConfig::default(), file).unwrap();
        assert_eq!(
            (
                s.ae_interval_ms,
                s.ae_keys_max,
                s.tombstone_grace_ms,
                s.expiry_grace_ms
            ),
            (0, 16, 5000, 60_000)
        );
        for bad in [
            "tombstone_grace_ms = 0",
            "expiry_grace_ms = 0",
            "ae_keys_max = 0",
            "ae_interval_ms = 600001",
        ] {
            let file = FileConfig::parse(bad).unwrap();
            assert!(
                Settings::resolve(FileConfig::default(), file).is_err(),
                "{bad}"
            );
        }
    }

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
