//! What a load-generator run is asked to do, parsed from the command line: workloads, key
//! distributions, value sizes, durations and targets.
//!
//! Every parser here is a pure function of its input string, so the command line's grammar is
//! tested without starting anything. Limits: a duration is at most [`DURATION_MAX`]; a value size
//! at most [`VALUE_BYTES_MAX`] (the node's default value limit); a target names at most
//! [`TARGET_ADDRS_MAX`] addresses.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};

/// Longest `--duration` or `--warmup` accepted: one day.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);
/// Largest value size accepted: the node's default `value_bytes_max` (1 MiB).
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Most comma-separated addresses in one `--target`.
pub const TARGET_ADDRS_MAX: usize = 64;

/// Parses a duration: a number with a unit (`ms`, `s`, `m`, `h`), or a bare number of seconds.
/// Fractions are allowed (`1.5s`, `0.25`).
///
/// ```
/// # use std::time::Duration;
/// # use ringkv_bench::load::spec::parse_duration;
/// assert_eq!(parse_duration("20s").unwrap(), Duration::from_secs(20));
/// assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
/// ```
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    ensure!(!number.is_empty(), "duration {s:?} has no number");
    let n: f64 = number
        .parse()
        .with_context(|| format!("duration {s:?}: {number:?} is not a number"))?;
    let unit_secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => bail!("duration {s:?}: unknown unit {other:?} (use ms, s, m or h)"),
    };
    let secs = n * unit_secs;
    ensure!(
        secs.is_finite() && secs <= DURATION_MAX.as_secs_f64(),
        "duration {s:?} is longer than {DURATION_MAX:?}"
    );
    Ok(Duration::from_secs_f64(secs))
}

/// Size of the values written: fixed, or drawn uniformly from an inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueSize {
    /// Smallest size, in bytes.
    pub min: usize,
    /// Largest size, in bytes (equal to `min` for a fixed size).
    pub max: usize,
}

impl FromStr for ValueSize {
    type Err = anyhow::Error;

    /// `100` (fixed) or `100..1000` (uniform, both ends included).
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let parse = |p: &str| -> anyhow::Result<usize> {
            p.trim()
                .parse()
                .with_context(|| format!("value size {s:?}: {p:?} is not a byte count"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (parse(a)?, parse(b.trim_start_matches('='))?),
            None => {
                let n = parse(s)?;
                (n, n)
            }
        };
        ensure!(min <= max, "value size {s:?}: the range is empty");
        ensure!(
            max <= VALUE_BYTES_MAX,
            "value size {s:?}: at most {VALUE_BYTES_MAX} bytes"
        );
        Ok(Self { min, max })
    }
}

impl fmt::Display for ValueSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

/// The protocol of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// ringkv's binary protocol, through the Rust tokio client.
    Ringkv,
    /// RESP2: Redis, or a ringkv node's `--resp-listen` port.
    Resp,
}

impl Protocol {
    /// The URL scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Ringkv => "ringkv",
            Protocol::Resp => "redis",
        }
    }
}

/// Where the load goes: a protocol and one or more `host:port` addresses, over which the
/// connections are spread round-robin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The protocol.
    pub protocol: Protocol,
    /// `host:port` of each server.
    pub addrs: Vec<String>,
}

impl FromStr for Target {
    type Err = anyhow::Error;

    /// `ringkv://host:port[,host:port...]` or `redis://host:port[,...]`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            anyhow!("target {s:?}: expected ringkv://host:port or redis://host:port")
        })?;
        let protocol = match scheme {
            "ringkv" => Protocol::Ringkv,
            "redis" | "resp" => Protocol::Resp,
            other => bail!("target {s:?}: unknown scheme {other:?} (ringkv or redis)"),
        };
        let addrs: Vec<String> = rest
            .trim_end_matches('/')
            .split(',')
            .map(|a| a.trim().to_owned())
            .collect();
        ensure!(
            addrs.len() <= TARGET_ADDRS_MAX,
            "target {s:?}: at most {TARGET_ADDRS_MAX} addresses"
        );
        for a in &addrs {
            let (host, port) = a
                .rsplit_once(':')
                .ok_or_else(|| anyhow!("target {s:?}: {a:?} is not host:port"))?;
            ensure!(!host.is_empty(), "target {s:?}: {a:?} has no host");
            port.parse::<u16>()
                .with_context(|| format!("target {s:?}: {port:?} is not a port"))?;
        }
        Ok(Self { protocol, addrs })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.protocol.scheme(), self.addrs.join(","))
    }
}

/// How keys are picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Every key equally likely.
    Uniform,
    /// Zipfian (θ = 0.99, as YCSB), the popular keys scattered over the key space.
    Zipfian,
    /// Zipfian over recency: the most recently inserted keys are the most popular (YCSB D).
    Latest,
}

/// A workload: the mix of operations each logical operation is drawn from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// YCSB A: 50% read, 50% update (blind write).
    A,
    /// YCSB B: 95% read, 5% update.
    B,
    /// YCSB C: read only.
    C,
    /// YCSB D: 95% read, 5% insert of a new key; reads favour the latest keys.
    D,
    /// YCSB F: 50% read, 50% read-modify-write.
    F,
    /// Shopping cart: read the cart, merge its siblings, add an item, write back with the
    /// context of the read.
    Cart,
    /// Shopping cart on the convergent map type: add one to an item's quantity (a counter
    /// field) with one APPLY, no read; the report checks that no acknowledged add was lost.
    #[value(name = "cart-map")]
    #[serde(rename = "cart-map")]
    CartMap,
    /// Sessions: 80% blind writes of small values, 20% reads, on a last-write-wins bucket.
    Session,
}

impl Workload {
    /// The workload's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::A => "a",
            Workload::B => "b",
            Workload::C => "c",
            Workload::D => "d",
            Workload::F => "f",
            Workload::Cart => "cart",
            Workload::CartMap => "cart-map",
            Workload::Session => "session",
        }
    }

    /// The key distribution YCSB (or the scenario) uses when none is given.
    pub fn default_distribution(self) -> Distribution {
        match self {
            Workload::D => Distribution::Latest,
            Workload::Session => Distribution::Uniform,
            _ => Distribution::Zipfian,
        }
    }

    /// The bucket the workload uses on a ringkv target when `--bucket` is not given. YCSB's
    /// updates are blind writes, so they go to a last-write-wins bucket (in a siblings bucket
    /// every blind write would add a sibling until `max_siblings` refuses the next one); the cart
    /// writes with contexts into a siblings bucket, the map cart into the nodes' built-in
    /// bucket of maps.
    pub fn default_bucket(self) -> &'static str {
        match self {
            Workload::Cart => "cart",
            Workload::CartMap => "maps",
            Workload::Session => "sessions",
            _ => "ycsb",
        }
    }

    /// The time to live of writes when `--ttl` is not given: sessions expire (short enough that
    /// a default run of 20 s reads some expired ones), other workloads' values do not.
    pub fn default_ttl(self) -> Option<Duration> {
        match self {
            Workload::Session => Some(Duration::from_secs(10)),
            _ => None,
        }
    }

    /// The default value size (session values are small).
    pub fn default_value_size(self) -> ValueSize {
        match self {
            Workload::Session => ValueSize { min: 64, max: 256 },
            _ => ValueSize { min: 100, max: 100 },
        }
    }
}

/// The kinds of operations recorded, each with its own latency histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    /// A GET.
    Read,
    /// A blind PUT of an existing key.
    Update,
    /// A PUT of a new key (YCSB D).
    Insert,
    /// A GET then a PUT with its context (YCSB F), timed as a whole.
    ReadModifyWrite,
    /// A cart update (GET, merge, PUT with context), timed as a whole.
    Cart,
}

impl OpKind {
    /// Every kind, in report order.
    pub const ALL: [OpKind; 5] = [
        OpKind::Read,
        OpKind::Update,
        OpKind::Insert,
        OpKind::ReadModifyWrite,
        OpKind::Cart,
    ];

    /// Index into per-kind arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Update => "update",
            OpKind::Insert => "insert",
            OpKind::ReadModifyWrite => "rmw",
            OpKind::Cart => "cart",
        }
    }
}
