//! What one logical operation does: the plan drawn from a workload's mix (pure, from a seeded
//! random generator) and its execution against a target connection.
//!
//! Planning and execution are separate so that the open loop can draw an operation when it is
//! due and run it on another task, and so that both loops draw exactly the same operations.
//!
//! Keys are `k` and 15 decimal digits of the key number (16 bytes), as in the engine benchmark.
//! Values are slices of one random buffer (incompressible, no allocation per operation). A cart
//! value is a comma-separated list of item numbers: a cart update reads the cart, merges its
//! siblings (the union of their items, as the Dynamo paper's shopping cart does), adds one item
//! and writes the result back with the context of the read, keeping the largest item numbers that fit
//! the value size. A map cart (`cart-map`) is a convergent map from item number to quantity (a
//! counter field): an add is one APPLY that adds one to an item, with no read, and a
//! [`CartLedger`] counts what was sent and acknowledged per item, so that the run can check
//! afterwards that no acknowledged add was lost.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rand::rngs::StdRng;
use ringkv_net::resp::RespValue;
use ringkv_net::{
    AsyncPool, ClientError, CrdtOp, CrdtType, CrdtValue, Expiry, FieldOp, FieldValue, Sibling,
};

use super::keygen::KeyChooser;
use super::resp_client::{RespConnection, RespFailure};
use super::spec::{OpKind, ValueSize, Workload};

use super::keygen::key_of;

/// One logical operation, drawn before it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// GET `key`.
    Read { key: u64 },
    /// Blind PUT of `len` bytes under an existing key.
    Update { key: u64, len: usize },
    /// PUT of `len` bytes under a new key.
    Insert { key: u64, len: usize },
    /// GET, then PUT `len` bytes with the read's context.
    ReadModifyWrite { key: u64, len: usize },
    /// GET the cart, merge siblings, add `item`, PUT with the context (at most `len` bytes).
    Cart { key: u64, item: u64, len: usize },
    /// Add one to `item` of the map cart `key`, as operation `op_id`.
    CartAdd { key: u64, item: u64, op_id: u64 },
}

impl Plan {
    /// The kind the operation is recorded as.
    pub(crate) fn kind(&self) -> OpKind {
        match self {
            Plan::Read { .. } => OpKind::Read,
            Plan::Update { .. } => OpKind::Update,
            Plan::Insert { .. } => OpKind::Insert,
            Plan::ReadModifyWrite { .. } => OpKind::ReadModifyWrite,
            Plan::Cart { .. } | Plan::CartAdd { .. } => OpKind::Cart,
        }
    }
}

/// Draws a workload's operations. One per worker (or open-loop lane), each with its own seed.
#[derive(Clone, Debug)]
pub(crate) struct Planner {
    pub(crate) workload: Workload,
    pub(crate) chooser: KeyChooser,
    pub(crate) value_size: ValueSize,
    /// Keys that exist: the preloaded ones plus the inserts so far (shared by all planners).
    pub(crate) key_count: Arc<AtomicU64>,
    /// Replaces the read share of a read/update workload.
    pub(crate) read_share: Option<f64>,
}

impl Planner {
    fn len(&self, rng: &mut StdRng) -> usize {
        rng.gen_range(self.value_size.min..=self.value_size.max)
    }

    /// The next operation.
    pub(crate) fn next(&mut self, rng: &mut StdRng) -> Plan {
        let keys = self.key_count.load(Ordering::Relaxed).max(1);
        let p: f64 = rng.r#gen();
        let len = self.len(rng);
        match self.workload {
            Workload::A | Workload::B | Workload::C | Workload::Session => {
                let read_share = self.read_share.unwrap_or(match self.workload {
                    Workload::A => 0.5,
                    Workload::B => 0.95,
                    Workload::C => 1.0,
                    _ => 0.2,
                });
                let key = self.chooser.next(rng, keys);
                if p < read_share {
                    Plan::Read { key }
                } else {
                    Plan::Update { key, len }
                }
            }
            Workload::D => {
                if p < 0.95 {
                    Plan::Read {
                        key: self.chooser.next(rng, keys),
                    }
                } else {
                    let key = self.key_count.fetch_add(1, Ordering::Relaxed);
                    Plan::Insert { key, len }
                }
            }
            Workload::F => {
                let key = self.chooser.next(rng, keys);
                if p < 0.5 {
                    Plan::Read { key }
                } else {
                    Plan::ReadModifyWrite { key, len }
                }
            }
            Workload::Cart => Plan::Cart {
                key: self.chooser.next(rng, keys),
                item: rng.gen_range(0..1_000_000),
                len: self.value_size.max.max(16),
            },
            Workload::CartMap => Plan::CartAdd {
                key: self.chooser.next(rng, keys),
                item: rng.gen_range(0..CART_ITEMS),
                op_id: rng.r#gen(),
            },
        }
    }
}

/// Distinct items of a map cart: few, so that quantities grow and adds to one item race.
pub(crate) const CART_ITEMS: u64 = 20;

/// Per (cart, item) of the map carts: adds sent, and adds acknowledged.
#[derive(Debug, Default)]
pub(crate) struct CartLedger(std::sync::Mutex<std::collections::BTreeMap<(u64, u64), (u64, u64)>>);

impl CartLedger {
    fn record(&self, key: u64, item: u64, acked: bool) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map.entry((key, item)).or_default();
        if acked {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }

    /// Every cart with its items' (sent, acknowledged) counts.
    pub(crate) fn carts(&self) -> std::collections::BTreeMap<u64, Vec<(u64, u64, u64)>> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut carts: std::collections::BTreeMap<u64, Vec<(u64, u64, u64)>> = Default::default();
        for (&(key, item), &(sent, acked)) in map.iter() {
            carts.entry(key).or_default().push((item, sent, acked));
        }
        carts
    }
}

/// Why an operation failed, by kind (what the report counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OpError(pub(crate) String);

impl From<ClientError> for OpError {
    fn from(e: ClientError) -> Self {
        OpError(match e {
            ClientError::NoAddress(_) => "no_address".to_owned(),
            ClientError::Io { op, .. } => format!("io_{op}"),
            ClientError::Timeout(_) => "timeout".to_owned(),
            ClientError::Closed => "closed".to_owned(),
            ClientError::Encode(_) => "encode".to_owned(),
            ClientError::Frame(_) => "bad_frame".to_owned(),
            ClientError::Unexpected(_) => "unexpected_reply".to_owned(),
            ClientError::Server { code, .. } => format!("server_{code}"),
            ClientError::Broken => "broken".to_owned(),
        })
    }
}

impl From<RespFailure> for OpError {
    fn from(e: RespFailure) -> Self {
        OpError(e.kind())
    }
}

/// The outcome of a successful operation: how many versions its read saw (`None` for a write
/// without a read). Zero is a missing key; more than one are siblings.
pub(crate) type Seen = Option<usize>;

/// What a read returned, in either protocol.
struct ReadResult {
    /// Live values.
    values: Vec<Bytes>,
    /// Versions seen, tombstones included.
    versions: usize,
    /// Causal context (ringkv only; `None` for a missing key or on RESP).
    context: Option<Bytes>,
}

/// A connection to one server of the target.
#[derive(Clone)]
pub(crate) enum Conn {
    /// ringkv's binary protocol: a pool of one connection, which reconnects when it breaks.
    Ringkv(AsyncPool),
    /// RESP.
    Resp(RespConnection),
}

impl Conn {
    async fn get(&self, bucket: &[u8], key: &[u8]) -> Result<ReadResult, OpError> {
        match self {
            Conn::Ringkv(pool) => {
                let reply = pool.get(bucket, key).await?;
                let values: Vec<Bytes> = reply
                    .siblings
                    .iter()
                    .filter_map(|s| match s {
                        Sibling::Value(v) => Some(v.clone()),
                        Sibling::Tombstone => None,
                    })
                    .collect();
                let versions = reply.siblings.len();
                Ok(ReadResult {
                    values,
                    versions,
                    context: (versions > 0).then_some(reply.context),
                })
            }
            Conn::Resp(c) => match c.call(&[b"GET", key]).await? {
                RespValue::Bulk(v) => Ok(ReadResult {
                    values: vec![v],
                    versions: 1,
                    context: None,
                }),
                RespValue::Null => Ok(ReadResult {
                    values: Vec::new(),
                    versions: 0,
                    context: None,
                }),
                other => Err(resp_unexpected(&other)),
            },
        }
    }

    async fn put(
        &self,
        bucket: &[u8],
        key: &[u8],
        value: &[u8],
        context: Option<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<(), OpError> {
        let ttl_ms = ttl_ms(ttl);
        match self {
            Conn::Ringkv(pool) => {
                match ttl_ms {
                    Some(ms) => {
                        pool.put_expiring(bucket, key, value, context, Expiry::Ttl { ms })
                            .await?
                    }
                    None => pool.put(bucket, key, value, context).await?,
                };
                Ok(())
            }
            Conn::Resp(c) => {
                let reply = match ttl_ms {
                    Some(ms) => {
                        let ms = ms.to_string();
                        c.call(&[b"SET", key, value, b"PX", ms.as_bytes()]).await?
                    }
                    None => c.call(&[b"SET", key, value]).await?,
                };
                match reply {
                    RespValue::Simple(_) => Ok(()),
                    other => Err(resp_unexpected(&other)),
                }
            }
        }
    }

    /// Adds one to `item` of the map cart `key`, and gives the cart `ttl` as its time to live
    /// (HINCRBY, then PEXPIRE, on RESP).
    async fn cart_add(
        &self,
        bucket: &[u8],
        key: &[u8],
        item: u64,
        op_id: u64,
        ttl: Option<Duration>,
    ) -> Result<(), OpError> {
        let item = Bytes::from(item.to_string());
        let ttl_ms = ttl_ms(ttl);
        match self {
            Conn::Ringkv(pool) => {
                let mut ops = vec![CrdtOp::Field {
                    name: item,
                    op: FieldOp::Increment(1),
                }];
                ops.extend(ttl_ms.map(|ms| CrdtOp::Expire(Expiry::Ttl { ms })));
                pool.apply(bucket, key, CrdtType::Map, ops, Some(op_id), false)
                    .await?;
                Ok(())
            }
            Conn::Resp(c) => {
                match c.call(&[b"HINCRBY", key, &item, b"1"]).await? {
                    RespValue::Integer(_) => {}
                    other => return Err(resp_unexpected(&other)),
                }
                if let Some(ms) = ttl_ms {
                    let ms = ms.to_string();
                    match c.call(&[b"PEXPIRE", key, ms.as_bytes()]).await? {
                        RespValue::Integer(_) => {}
                        other => return Err(resp_unexpected(&other)),
                    }
                }
                Ok(())
            }
        }
    }

    /// The quantity of every item of the map cart `key` (HGETALL on RESP).
    pub(crate) async fn cart_items(
        &self,
        bucket: &[u8],
        key: u64,
    ) -> Result<std::collections::BTreeMap<u64, i64>, OpError> {
        let key = key_of(key);
        let mut items = std::collections::BTreeMap::new();
        let mut add = |name: &[u8], n: i64| {
            if let Some(item) = std::str::from_utf8(name).ok().and_then(|s| s.parse().ok()) {
                items.insert(item, n);
            }
        };
        match self {
            Conn::Ringkv(pool) => match pool.get(bucket, &key).await?.crdt {
                Some(CrdtValue::Map(fields)) => {
                    for (name, value) in fields {
                        if let FieldValue::Counter(n) = value {
                            add(&name, n);
                        }
                    }
                }
                None => {}
                Some(other) => return Err(OpError(format!("not a map cart: {other:?}"))),
            },
            Conn::Resp(c) => match c.call(&[b"HGETALL", &key]).await? {
                RespValue::Array(pairs) => {
                    for pair in pairs.chunks(2) {
                        if let [RespValue::Bulk(name), RespValue::Bulk(n)] = pair
                            && let Some(n) =
                                std::str::from_utf8(n).ok().and_then(|s| s.parse().ok())
                        {
                            add(name, n);
                        }
                    }
                }
                other => return Err(resp_unexpected(&other)),
            },
        }
        Ok(items)
    }
}

/// A time to live in whole milliseconds, at least 1 (what both protocols carry).
fn ttl_ms(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1))
}

/// The error kind of an unexpected RESP reply: an error reply by its code (`resp_ERR`), anything
/// else as `resp_unexpected`.
fn resp_unexpected(v: &RespValue) -> OpError {
    match v {
        RespValue::Error(e) => {
            let code = e.split(|b| *b == b' ').next().unwrap_or_default();
            OpError(format!("resp_{}", String::from_utf8_lossy(code)))
        }
        _ => OpError("resp_unexpected".to_owned()),
    }
}

/// Items of a cart value.
fn cart_items(value: &[u8]) -> impl Iterator<Item = u64> + '_ {
    value
        .split(|b| *b == b',')
        .filter_map(|i| std::str::from_utf8(i).ok()?.parse().ok())
}

/// The merged cart: the union of the siblings' items plus `item`, largest numbers first, cut to
/// at most `len` bytes.
fn merged_cart(values: &[Bytes], item: u64, len: usize) -> Vec<u8> {
    let mut items: BTreeSet<u64> = values.iter().flat_map(|v| cart_items(v)).collect();
    items.insert(item);
    let mut out: Vec<u8> = Vec::with_capacity(len);
    for i in items.iter().rev() {
        let s = i.to_string();
        if out.len() + s.len() + 1 > len {
            break;
        }
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(s.as_bytes());
    }
    out
}

/// Runs `plan` on `conn`. `values` is the random buffer values are cut from (at least as long as
/// the largest value); writes carry `ttl` as their time to live; map cart adds are counted in
/// `ledger`.
pub(crate) async fn execute(
    conn: &Conn,
    bucket: &[u8],
    values: &[u8],
    ttl: Option<Duration>,
    ledger: &CartLedger,
    plan: Plan,
) -> Result<Seen, OpError> {
    match plan {
        Plan::CartAdd { key, item, op_id } => {
            ledger.record(key, item, false);
            conn.cart_add(bucket, &key_of(key), item, op_id, ttl)
                .await?;
            ledger.record(key, item, true);
            Ok(None)
        }
        Plan::Read { key } => {
            let read = conn.get(bucket, &key_of(key)).await?;
            Ok(Some(read.versions))
        }
        Plan::Update { key, len } | Plan::Insert { key, len } => {
            conn.put(bucket, &key_of(key), &values[..len], None, ttl)
                .await?;
            Ok(None)
        }
        Plan::ReadModifyWrite { key, len } => {
            let k = key_of(key);
            let read = conn.get(bucket, &k).await?;
            conn.put(bucket, &k, &values[..len], read.context, ttl)
                .await?;
            Ok(Some(read.versions))
        }
        Plan::Cart { key, item, len } => {
            let k = key_of(key);
            let read = conn.get(bucket, &k).await?;
            let cart = merged_cart(&read.values, item, len);
            conn.put(bucket, &k, &cart, read.context, ttl).await?;
            Ok(Some(read.versions))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merged_cart_is_the_union_of_its_siblings_within_its_size() {
        let siblings = [Bytes::from_static(b"1,5"), Bytes::from_static(b"2,5")];
        assert_eq!(merged_cart(&siblings, 9, 100), b"9,5,2,1");
        assert_eq!(merged_cart(&siblings, 9, 4), b"9,5");
        assert_eq!(merged_cart(&[], 7, 16), b"7");
    }

    #[test]
    fn keys_are_fixed_width() {
        assert_eq!(&key_of(1234567), b"k000000001234567");
    }
}
