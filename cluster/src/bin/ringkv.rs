//! `ringkv`: the node server and its command-line client.
//!
//! `ringkv serve` runs a node, alone or in a cluster (see `docs/OPERATIONS.md` for every
//! setting and flag); `ringkv get|put|del|ping` talk to a node through the blocking client in
//! `ringkv-net`. `get` prints a single value raw on stdout for shell scripts; concurrent siblings
//! come as a `siblings N` line followed by one `value LEN` line plus LEN raw bytes and a newline,
//! or a `tombstone` line, per sibling. `--show-context` prints the causal context as
//! `context HEX` on stderr, which `put`/`del --context HEX` accept; `del` without a context
//! reads the key first and deletes what it read. A missing key exits 1 with
//! "not found" on stderr. `ringkv counter|set|map` write and read the convergent data types (one
//! APPLY or one GET each; their output forms are in `ringkv/crdt.rs`). `ringkv cluster
//! join|leave|remove|plan|commit|status` sends one ADMIN command to the node at `--server` and
//! prints its text answer. Exit codes: 0 success, 1 key not found, 2 any error.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use ringkv_cluster::config::{DurabilityName, FileConfig, Settings};
use ringkv_cluster::identity;
use ringkv_cluster::route::parse_cpu_list;
use ringkv_cluster::server::{ServeConfig, ShardCpus, serve};
use ringkv_core::NodeId;
use ringkv_core::bucket::DEFAULT_BUCKET;
use ringkv_net::{Client, ClientConfig, Delete, Expiry, Get, MapOp, Message, Put, Sibling, Update};

// Beside this file rather than in it, and not directly in src/bin, where cargo would take it
// for a binary of its own.
#[path = "ringkv/crdt.rs"]
mod crdt;

#[derive(Parser, Debug)]
#[command(
    name = "ringkv",
    version,
    about = "A Dynamo-style replicated key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DurabilityArg {
    /// Acknowledge a write once it is on disk and synced.
    Sync,
    /// Acknowledge once buffered; written and synced within the engine's flush interval.
    Buffered,
}

#[derive(clap::Args, Debug)]
struct Target {
    /// Node to talk to.
    #[arg(long, default_value = "127.0.0.1:7878")]
    server: String,
    /// Bucket of the key [default: `default`; for `counter`, `set` and `map`, the node's
    /// built-in bucket of that type: `counters`, `sets`, `maps`].
    #[arg(long)]
    bucket: Option<String>,
    /// Cluster name sent in the handshake.
    #[arg(long, default_value = "ringkv")]
    cluster_name: String,
    /// Per-request timeout in milliseconds; also the node's deadline for the request, so the
    /// node stops working on it when this command gives up.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Print the causal context as `context HEX` on stderr.
    #[arg(long)]
    show_context: bool,
    /// Print a key's expiry as `expires_at_ms MS` on stderr (get).
    #[arg(long)]
    show_expiry: bool,
}

impl Target {
    /// The bucket given, or `fallback`.
    fn bucket_or(&self, fallback: &str) -> Bytes {
        Bytes::from(self.bucket.as_deref().unwrap_or(fallback).to_owned())
    }
}

#[derive(clap::Args, Debug)]
struct WriteOpts {
    /// Causal context from a get (hex), so the write supersedes what was read.
    #[arg(long)]
    context: Option<String>,
    /// Write quorum for this request [default: the bucket's].
    #[arg(long)]
    w: Option<u8>,
    /// Durable-write quorum for this request [default: the bucket's].
    #[arg(long)]
    dw: Option<u8>,
}

/// When a written value (or a whole map) expires.
#[derive(clap::Args, Debug)]
struct ExpiryOpts {
    /// Time to live, e.g. `30s`, `15m`, `2h 30m`, `500ms` [default: the bucket's].
    #[arg(long, value_parser = parse_ttl, conflicts_with = "no_expiry")]
    ttl: Option<Duration>,
    /// Never expire, even in a bucket with a default time to live (for a map: remove its
    /// expiry).
    #[arg(long)]
    no_expiry: bool,
}

impl ExpiryOpts {
    /// The expiry the options ask for; `None` for the bucket's default.
    fn expiry(&self) -> Option<Expiry> {
        match (self.ttl, self.no_expiry) {
            (Some(ttl), _) => Some(Expiry::Ttl {
                ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            }),
            (None, true) => Some(Expiry::Never),
            (None, false) => None,
        }
    }
}

/// The settings of `ringkv serve`.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML file with settings (keys named like the flags, with underscores).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for the node's data (one subdirectory per shard) [default: ./ringkv-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client protocol address; every shard listens on it (SO_REUSEPORT)
    /// [default: 127.0.0.1:7878].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// RESP2 (Redis protocol) address, e.g. 127.0.0.1:6379 [default: disabled].
    #[arg(long)]
    resp_listen: Option<SocketAddr>,
    /// Admin HTTP address serving /metrics and /health [default: disabled].
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Number of shards [default: the CPUs in the process's affinity mask]. With one shard per
    /// CPU of the mask each is pinned to its CPU; any other count shares the mask's CPUs unpinned.
    #[arg(long)]
    shards: Option<usize>,
    /// When writes are acknowledged [default: sync].
    #[arg(long, value_enum)]
    durability: Option<DurabilityArg>,
    /// Name of the cluster clients must give in their handshake [default: ringkv].
    #[arg(long)]
    cluster_name: Option<String>,
    /// This node's name [default: ringkv].
    #[arg(long)]
    node_name: Option<String>,
    /// Requests executing at once per connection [default: 128].
    #[arg(long)]
    inflight_per_connection_max: Option<usize>,
    /// Capacity of each shard-to-shard queue, in messages [default: 1024].
    #[arg(long)]
    mesh_queue_messages_max: Option<usize>,
    /// Other shards' requests executing at once on a shard [default: 1024].
    #[arg(long)]
    peer_inflight_max: Option<usize>,
    /// Bound on the wait for connections to drain at shutdown, in ms [default: 5000].
    #[arg(long)]
    shutdown_drain_ms: Option<u64>,
    /// Deadline of requests that name none, in ms [default: 10000].
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// Largest frame accepted, header included [default: 17825792 (17 MiB)].
    #[arg(long)]
    frame_bytes_max: Option<usize>,
    /// Largest key accepted [default: 1024].
    #[arg(long)]
    key_bytes_max: Option<usize>,
    /// Largest value stored [default: 1048576 (1 MiB)].
    #[arg(long)]
    value_bytes_max: Option<usize>,
    /// This node's id in the ring and in causality metadata, used on the first start of an
    /// empty data directory [default: a random id, at least 65536]; a data directory keeps
    /// the id it was created with (<data-dir>/node-identity), and another one is refused.
    #[arg(long)]
    node_id: Option<u32>,
    /// Peer protocol address; every shard listens on it [default: this node's seed, if any].
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Peer addresses, comma-separated: ID@HOST:PORT for every member of a new cluster (the
    /// same list on every node), or HOST:PORT of members a new node asks to join by itself
    /// [default: none, a one-node cluster]. Used on a node's first start only.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<String>>,
    /// Time a replica has to answer before its slot moves on, in ms [default: 1000].
    #[arg(long)]
    replica_timeout_ms: Option<u64>,
    /// Interval between hinted-handoff rounds, in ms [default: 1000].
    #[arg(long)]
    hint_retry_ms: Option<u64>,
    /// Interval between anti-entropy rounds of each shard, in ms; 0 turns anti-entropy
    /// off [default: 1000].
    #[arg(long)]
    ae_interval_ms: Option<u64>,
    /// Most keys one anti-entropy exchange lists and repairs in each direction [default: 256].
    #[arg(long)]
    ae_keys_max: Option<usize>,
    /// How long every replica must have held a tombstone before it is reaped, in ms
    /// [default: 86400000, one day].
    #[arg(long)]
    tombstone_grace_ms: Option<u64>,
    /// How long after its expiry an expired key is reaped, once every replica holds it, in ms
    /// [default: 3600000, one hour].
    #[arg(long)]
    expiry_grace_ms: Option<u64>,
    /// Interval between membership gossip rounds, in ms [default: 1000].
    #[arg(long)]
    gossip_ms: Option<u64>,
    /// Bytes of hints this node stores at most, split evenly across shards; past it hints
    /// are refused `overloaded` [default: 1073741824 (1 GiB)].
    #[arg(long)]
    hint_bytes_max: Option<u64>,
    /// Bytes of the value cache, split evenly across shards; reads of cached values need no
    /// disk read. 0 turns it off [default: a quarter of the machine's memory (cgroup limit if
    /// lower)].
    #[arg(long)]
    cache_bytes: Option<u64>,
    /// Interval between failure-detector heartbeats to each peer, in ms [default: 1000].
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Suspicion level (phi) above which a silent peer is believed down [default: 8].
    #[arg(long)]
    phi_threshold: Option<u32>,
    /// Client p99 latency above which background work backs off, in µs [default: 10000].
    #[arg(long)]
    admission_p99_threshold_us: Option<u64>,
}

// Parsed once at startup, so the size of the serve variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node. Every setting can also come from --config; a flag overrides the file.
    Serve(Box<ServeArgs>),
    /// Print the value (or the siblings) of KEY (exit 1 if it does not exist).
    Get {
        #[command(flatten)]
        target: Target,
        /// Read quorum for this request [default: the bucket's].
        #[arg(long)]
        r: Option<u8>,
        /// The key.
        key: String,
    },
    /// Store VALUE under KEY.
    Put {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        write: WriteOpts,
        #[command(flatten)]
        expiry: ExpiryOpts,
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Change fields of the map (a Redis hash) under KEY, in an lww bucket: each field is a
    /// last-write-wins register.
    Update {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        write: WriteOpts,
        /// Set FIELD to VALUE (repeatable).
        #[arg(long = "set", value_name = "FIELD=VALUE", value_parser = parse_field)]
        sets: Vec<(String, String)>,
        /// Delete FIELD (repeatable).
        #[arg(long = "del", value_name = "FIELD")]
        dels: Vec<String>,
        #[command(flatten)]
        expiry: ExpiryOpts,
        /// The key.
        key: String,
    },
    /// A counter that converges: increments through any node all count.
    Counter {
        #[command(subcommand)]
        command: crdt::CounterCommand,
    },
    /// A set that converges: elements added through any node; a concurrent add beats a remove.
    Set {
        #[command(subcommand)]
        command: crdt::SetCommand,
    },
    /// A map that converges, of registers, counters, sets and flags.
    Map {
        #[command(subcommand)]
        command: crdt::MapCommand,
    },
    /// Delete KEY.
    Del {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        write: WriteOpts,
        /// The key.
        key: String,
    },
    /// Check that the node answers.
    Ping {
        #[command(flatten)]
        target: Target,
    },
    /// Cluster membership: inspect it, stage changes, commit them.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(clap::Args, Debug)]
struct AdminTarget {
    /// Client address of the node to talk to.
    #[arg(long, default_value = "127.0.0.1:7878")]
    server: String,
    /// Cluster name sent in the handshake.
    #[arg(long, default_value = "ringkv")]
    cluster_name: String,
    /// Timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// `ringkv cluster ...`: each is one ADMIN command (`docs/PROTOCOL.md` §5.8.1) whose text
/// answer is printed.
#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Make the node at --server join the cluster of SEED (a member's peer address HOST:PORT).
    Join {
        #[command(flatten)]
        target: AdminTarget,
        /// Peer address of a member of the cluster to join.
        seed: String,
    },
    /// Stage the departure of the node at --server (its partitions move to the others).
    Leave {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Stage the removal of NODE (a node that is gone for good), asked of the node at --server.
    Remove {
        #[command(flatten)]
        target: AdminTarget,
        /// Id of the node to remove.
        node: u32,
    },
    /// Show the staged changes and which partitions they would move where.
    Plan {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Apply the staged changes.
    Commit {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Members, their state and ownership, reachability as the node sees it, pending transfers.
    Status {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Drop every hint the node at --server holds, undelivered (anti-entropy repairs the homes).
    TruncateHints {
        #[command(flatten)]
        target: AdminTarget,
    },
}

impl ClusterCommand {
    /// The ADMIN command name, its text arguments, and the node to send it to.
    fn admin(&self) -> (&'static str, String, &AdminTarget) {
        match self {
            Self::Join { target, seed } => ("cluster-join", seed.clone(), target),
            Self::Leave { target } => ("cluster-leave", String::new(), target),
            Self::Remove { target, node } => ("cluster-remove", node.to_string(), target),
            Self::Plan { target } => ("cluster-plan", String::new(), target),
            Self::Commit { target } => ("cluster-commit", String::new(), target),
            Self::Status { target } => ("cluster-status", String::new(), target),
            Self::TruncateHints { target } => ("hints-truncate", String::new(), target),
        }
    }
}

/// CPUs this process may run on, from the kernel's view of its affinity mask.
fn affinity_cpus() -> anyhow::Result<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .context("no Cpus_allowed_list in /proc/self/status")?;
    Ok(parse_cpu_list(list)?)
}

/// The node's deadline for a request of this command: its `--timeout-ms`, as the clients send it.
fn deadline_ms(t: &Target) -> u32 {
    ringkv_net::client::deadline_ms(Duration::from_millis(t.timeout_ms))
}

fn connect(t: &Target) -> anyhow::Result<Client> {
    let config = ClientConfig {
        cluster_name: t.cluster_name.clone(),
        timeout: Duration::from_millis(t.timeout_ms),
        ..ClientConfig::default()
    };
    Client::connect(t.server.as_str(), config).with_context(|| format!("connect to {}", t.server))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> anyhow::Result<Bytes> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        bail!("context {text:?} is not hex");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map(Bytes::from)
        .with_context(|| format!("context {text:?} is not hex"))
}

/// A `--set FIELD=VALUE`: split at the first `=`.
fn parse_field(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((field, value)) => Ok((field.to_owned(), value.to_owned())),
        None => Err(format!("{text:?} is not FIELD=VALUE")),
    }
}

/// A `--ttl`: a duration as `humantime` reads it, of at least a millisecond.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_millis(1) {
        return Err("a time to live is at least 1ms".into());
    }
    Ok(ttl)
}

fn show_context(target: &Target, context: &[u8]) {
    if target.show_context {
        eprintln!("context {}", hex(context));
    }
}

/// Resolves `ID@HOST:PORT` peers once, at startup.
fn resolve_peers(peers: &BTreeMap<NodeId, String>) -> anyhow::Result<BTreeMap<NodeId, SocketAddr>> {
    peers
        .iter()
        .map(|(id, addr)| {
            let resolved = addr
                .to_socket_addrs()
                .with_context(|| format!("resolve seed {}@{addr}", id.0))?
                .next()
                .with_context(|| format!("seed {}@{addr} has no address", id.0))?;
            Ok((*id, resolved))
        })
        .collect()
}

/// `ringkv serve`: settings from flags over the file over the defaults, then the node.
fn serve_command(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let ServeArgs {
        config,
        data_dir,
        listen,
        resp_listen,
        admin_listen,
        shards,
        durability,
        cluster_name,
        node_name,
        inflight_per_connection_max,
        mesh_queue_messages_max,
        peer_inflight_max,
        shutdown_drain_ms,
        request_timeout_ms,
        frame_bytes_max,
        key_bytes_max,
        value_bytes_max,
        node_id,
        peer_listen,
        seeds,
        replica_timeout_ms,
        hint_retry_ms,
        ae_interval_ms,
        ae_keys_max,
        tombstone_grace_ms,
        expiry_grace_ms,
        gossip_ms,
        hint_bytes_max,
        cache_bytes,
        heartbeat_ms,
        phi_threshold,
        admission_p99_threshold_us,
    } = args;
    let file = match &config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read config file {}", path.display()))?;
            FileConfig::parse(&text).with_context(|| path.display().to_string())?
        }
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        data_dir,
        listen,
        resp_listen,
        admin_listen,
        shards,
        durability: durability.map(|d| match d {
            DurabilityArg::Sync => DurabilityName::Sync,
            DurabilityArg::Buffered => DurabilityName::Buffered,
        }),
        cluster_name,
        node_name,
        inflight_per_connection_max,
        mesh_queue_messages_max,
        peer_inflight_max,
        shutdown_drain_ms,
        request_timeout_ms,
        frame_bytes_max,
        key_bytes_max,
        value_bytes_max,
        node_id,
        peer_listen,
        seeds,
        replica_timeout_ms,
        hint_retry_ms,
        ae_interval_ms,
        ae_keys_max,
        tombstone_grace_ms,
        expiry_grace_ms,
        gossip_ms,
        hint_bytes_max,
        cache_bytes,
        heartbeat_ms,
        phi_threshold,
        admission_p99_threshold_us,
        buckets: None,
    };
    let settings = Settings::resolve(flags, file)?;
    let cpus = ShardCpus::choose(affinity_cpus()?, settings.shards);
    // The data directory decides who this node is (a new one picks an id when none is given;
    // `serve` writes it once its checks passed); the seeds are read as that node.
    let identity = identity::resolve(&settings.data_dir, settings.node_id.map(|n| n.0))?;
    let seeds = settings.seed_view(identity.id)?;
    let peers = resolve_peers(&seeds.peers)?;
    let mut cfg = ServeConfig::new(settings, cpus);
    cfg.peers = peers;
    cfg.node_id = identity.id;
    cfg.identity = Some(identity);
    cfg.settings.peer_listen = seeds.peer_listen;
    serve(cfg)?;
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve_command(*args),
        Command::Get { target, r, key } => {
            let request = Message::Get(Get {
                bucket: target.bucket_or(DEFAULT_BUCKET),
                key: Bytes::from(key.into_bytes()),
                r,
                timeout_ms: Some(deadline_ms(&target)),
            });
            let reply = match connect(&target)?.request_message(request)? {
                Message::GetOk(ok) => ok,
                other => bail!("unexpected reply {}", other.kind()),
            };
            show_context(&target, &reply.context);
            if target.show_expiry
                && let Some(at) = reply.expires_at_ms
            {
                eprintln!("expires_at_ms {at}");
            }
            if let Some(value) = &reply.crdt {
                // A convergent data type prints as the read command of its type prints it.
                let mut out = std::io::stdout().lock();
                crdt::write_value(&mut out, value).context("write to stdout")?;
                out.flush().context("write to stdout")?;
                return Ok(ExitCode::SUCCESS);
            }
            if reply.fields.is_none()
                && reply
                    .siblings
                    .iter()
                    .all(|s| matches!(s, Sibling::Tombstone))
            {
                eprintln!("not found");
                return Ok(ExitCode::from(1));
            }
            let mut out = std::io::stdout().lock();
            if let Some(fields) = &reply.fields {
                // A map: `fields N`, then per field its name and value, each a `LEN` line and
                // exactly LEN raw bytes and a newline, as siblings print.
                writeln!(out, "fields {}", fields.len()).context("write to stdout")?;
                for (name, value) in fields {
                    writeln!(out, "field {}", name.len()).context("write to stdout")?;
                    out.write_all(name).context("write to stdout")?;
                    writeln!(out).context("write to stdout")?;
                    writeln!(out, "value {}", value.len()).context("write to stdout")?;
                    out.write_all(value).context("write to stdout")?;
                    writeln!(out).context("write to stdout")?;
                }
                out.flush().context("write to stdout")?;
                return Ok(ExitCode::SUCCESS);
            }
            match reply.siblings.as_slice() {
                [Sibling::Value(v)] => out.write_all(v).context("write to stdout")?,
                siblings => {
                    writeln!(out, "siblings {}", siblings.len()).context("write to stdout")?;
                    for s in siblings {
                        match s {
                            Sibling::Value(v) => {
                                writeln!(out, "value {}", v.len()).context("write to stdout")?;
                                out.write_all(v).context("write to stdout")?;
                                writeln!(out).context("write to stdout")?;
                            }
                            Sibling::Tombstone => {
                                writeln!(out, "tombstone").context("write to stdout")?
                            }
                        }
                    }
                }
            }
            out.flush().context("write to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Put {
            target,
            write,
            expiry,
            key,
            value,
        } => {
            let expiry = expiry.expiry();
            let request = Message::Put(Put {
                bucket: target.bucket_or(DEFAULT_BUCKET),
                key: Bytes::from(key.into_bytes()),
                value: Bytes::from(value.into_bytes()),
                context: write.context.as_deref().map(unhex).transpose()?,
                w: write.w,
                dw: write.dw,
                timeout_ms: Some(deadline_ms(&target)),
                expiry,
                condition: None,
            });
            match connect(&target)?.request_message(request)? {
                Message::PutOk(ok) => show_context(&target, &ok.context),
                other => bail!("unexpected reply {}", other.kind()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Update {
            target,
            write,
            sets,
            dels,
            expiry,
            key,
        } => {
            let mut ops: Vec<MapOp> = sets
                .into_iter()
                .map(|(field, value)| MapOp::Set {
                    field: Bytes::from(field.into_bytes()),
                    value: Bytes::from(value.into_bytes()),
                })
                .collect();
            ops.extend(dels.into_iter().map(|field| MapOp::Delete {
                field: Bytes::from(field.into_bytes()),
            }));
            ops.extend(expiry.expiry().map(MapOp::Expire));
            if ops.is_empty() {
                bail!("nothing to update: give --set, --del, --ttl or --no-expiry");
            }
            if write.context.is_some() {
                bail!("an update takes no --context: map fields are last-write-wins");
            }
            let request = Message::Update(Update {
                bucket: target.bucket_or(DEFAULT_BUCKET),
                key: Bytes::from(key.into_bytes()),
                ops,
                w: write.w,
                dw: write.dw,
                timeout_ms: Some(deadline_ms(&target)),
            });
            match connect(&target)?.request_message(request)? {
                Message::UpdateOk => {}
                other => bail!("unexpected reply {}", other.kind()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Del { target, write, key } => {
            let mut client = connect(&target)?;
            let context = match write.context.as_deref() {
                Some(text) => Some(unhex(text)?),
                // Without a context a delete would only add a tombstone beside the values; delete
                // what is there now instead.
                None => Some(
                    client
                        .get(&target.bucket_or(DEFAULT_BUCKET), key.as_bytes())?
                        .context,
                ),
            };
            let request = Message::Delete(Delete {
                bucket: target.bucket_or(DEFAULT_BUCKET),
                key: Bytes::from(key.into_bytes()),
                context,
                w: write.w,
                dw: write.dw,
                timeout_ms: Some(deadline_ms(&target)),
            });
            match client.request_message(request)? {
                Message::DeleteOk => {}
                other => bail!("unexpected reply {}", other.kind()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Counter { command } => crdt::counter(command),
        Command::Set { command } => crdt::set(command),
        Command::Map { command } => crdt::map(command),
        Command::Ping { target } => {
            connect(&target)?.ping()?;
            println!("pong");
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster { command } => {
            let (name, args, target) = command.admin();
            let config = ClientConfig {
                cluster_name: target.cluster_name.clone(),
                timeout: Duration::from_millis(target.timeout_ms),
                ..ClientConfig::default()
            };
            let mut client = Client::connect(target.server.as_str(), config)
                .with_context(|| format!("connect to {}", target.server))?;
            let text = client.admin(name, &args).with_context(|| name.to_owned())?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).context("write to stdout")?;
            if !text.is_empty() && !text.ends_with('\n') {
                writeln!(out).context("write to stdout")?;
            }
            out.flush().context("write to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files and journals.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringkv: {}", causes(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes joined by ": ", each said once. Many errors (the engine's, the
/// node's) already end their message with their source's, which `{:#}` would print again.
fn causes(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::causes;

    /// A cause already at the end of its wrapper's message is not repeated; one that is not
    /// (an `anyhow` context) is appended.
    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(libc::EEXIST);
        let repeated = anyhow::Error::new(Wrapper(io.to_string(), io));
        assert_eq!(
            causes(&repeated),
            format!(
                "wrapper: {}",
                std::io::Error::from_raw_os_error(libc::EEXIST)
            )
        );
        let context = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOENT))
            .context("read config file x.toml");
        assert!(causes(&context).starts_with("read config file x.toml: No such file"));
    }

    #[derive(Debug)]
    struct Wrapper(String, std::io::Error);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "wrapper: {}", self.0)
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
    }
}
