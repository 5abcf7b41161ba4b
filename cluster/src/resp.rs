//! Redis commands onto ringkv requests (sans-IO): what the RESP2 listener does with a command.
//!
//! [`plan`] turns a parsed [`RespCommand`] into a [`RespPlan`]: a reply it can give at once
//! (PING, ECHO, INFO, COMMAND, HELLO, CLIENT, AUTH, SELECT 0, QUIT, errors), or a [`Script`]:
//! the ringkv requests the command needs, in one or two rounds (a read, then the writes the read
//! decides), which the shell executes, feeding each round's replies back until the script ends
//! with the command's reply. Keys live in the bucket [`RESP_BUCKET`] (`redis`), which is
//! last-write-wins unless configured otherwise: Redis clients have no causal contexts, so a SET
//! must replace what is there rather than become a sibling of it. `redis-cli SET k v` and
//! `ringkv get --bucket redis k` see the same value. Every command, its options and what it
//! guarantees across replicas is listed in `docs/PROTOCOL.md` §8.1.
//!
//! # Expiry
//!
//! `EX`/`PX`/`SETEX`/`EXPIRE` and the others become a PUT's [`Expiry`]: a relative time to live
//! goes to the coordinator as is (it stamps the absolute time, so every replica agrees); an
//! absolute time goes as given. `TTL`/`PTTL` answer from the expiry a read returns and this
//! node's clock. Commands that keep a key's expiry while changing its value (`SET ... KEEPTTL`,
//! `INCR`) read it first and write it back as an absolute time.
//!
//! # Hashes
//!
//! A hash is a map object (`ringkv_core::map`): hash commands read its fields and write only
//! the fields they change with an UPDATE, so concurrent writes of different fields of one key
//! all survive (each field is a last-write-wins register). `EXPIRE` and `PERSIST` on a hash
//! update its expiry register. A hash command on a string key, and a string command on a hash
//! key, answer `WRONGTYPE` by what the read found; `SET` replaces a key of either type.
//!
//! # Conditional SET
//!
//! `SET NX|XX` and `SETNX` are one conditional PUT (`ringkv_net::Condition`), which the key's
//! first reachable home decides under the key's lock: racing creators through any nodes get one
//! `OK` while that home is reachable (the coordinator's module docs say what it cannot see).
//!
//! # Read-then-write commands
//!
//! `SET ... GET|KEEPTTL`, `GETDEL`, `GETEX`, `EXPIRE` and its variants, `PERSIST`, `INCR` and its
//! variants, and the hash writes read the key (at the bucket's `r`) and then write. Nothing holds
//! the key between the two: two clients racing on one key may both increment from the same value
//! (the later write wins, one increment is lost). The same holds under sloppy quorum, where a
//! write may land on fallbacks that never saw the other. Within one connection commands on one
//! key run in order.
//!
//! Limits: `DEL`/`UNLINK` read each key before deleting it to count what existed, so the count
//! is not atomic with the deletes. `MSET` is a write per key, not atomic. `DBSIZE` is an
//! estimate (the shell's). If the `redis` bucket is configured with siblings, reads answer the
//! last value sibling and blind writes add siblings.

use bytes::Bytes;
use ringkv_core::request::{KeyBody, KeyRequest};
use ringkv_net::message::{FIELD_BYTES_MAX, MAP_OPS_MAX};
use ringkv_net::resp::{RespCommand, RespValue};
use ringkv_net::{Condition, Delete, ErrorCode, Expiry, Get, MapOp, Message, Put, Sibling, Update};

use crate::route::PARTITIONS;

/// The bucket Redis keys live in.
pub const RESP_BUCKET: &[u8] = b"redis";

/// What to do with one command.
#[derive(Debug, PartialEq, Eq)]
pub enum RespPlan {
    /// Send this reply.
    Reply(RespValue),
    /// Send this reply, then close the connection.
    ReplyAndClose(RespValue),
    /// Run this script ([`Script::start`]) and send the reply it ends with.
    Run(Script),
    /// Answer `DBSIZE`: the shell estimates the keys of [`RESP_BUCKET`].
    DbSize,
}

/// One connection's RESP state: what `CLIENT` commands set and read.
#[derive(Debug, Default)]
pub struct RespState {
    /// The connection's id (`CLIENT ID`), unique on the node.
    pub id: u64,
    name: Option<Bytes>,
}

impl RespState {
    /// The state of a new connection with id `id`.
    pub fn new(id: u64) -> RespState {
        RespState { id, name: None }
    }
}

/// What a script asks of the shell next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Execute these requests (in order) and pass their replies to [`Script::resume`].
    Run(Vec<KeyRequest>),
    /// The command's reply: the script is over.
    Done(RespValue),
}

/// A command that needs requests: its keys (so that a connection runs commands on one key in
/// order) and the rounds of requests it makes.
#[derive(Debug, PartialEq, Eq)]
pub struct Script {
    op: Op,
    /// What the read round found, once it ran.
    found: Vec<Found>,
    round: Round,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Round {
    NotStarted,
    Reads,
    Writes,
}

/// How a SET-like write expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SetExpiry {
    /// No option: the bucket's default (none for the `redis` bucket), which clears a key's
    /// expiry as Redis's SET does.
    Default,
    /// This expiry.
    Given(Expiry),
    /// `KEEPTTL`: whatever the key has.
    Keep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cond {
    /// Only if the key is missing.
    Nx,
    /// Only if the key exists.
    Xx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SetReply {
    /// `+OK`, or nil when the condition failed.
    Ok,
    /// The old value (`SET ... GET`).
    Old,
    /// `:1` if written, `:0` if not (`SETNX`).
    Int,
}

/// `EXPIRE` conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExpireCond {
    Nx,
    Xx,
    Gt,
    Lt,
}

/// The new expiry of `EXPIRE` and friends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    /// Milliseconds from now (may be zero or negative: the key expires at once).
    In(i64),
    /// Unix milliseconds.
    At(i64),
}

#[derive(Debug, PartialEq, Eq)]
enum Op {
    Get(Bytes),
    MGet(Vec<Bytes>),
    Exists(Vec<Bytes>),
    Type(Bytes),
    Ttl {
        key: Bytes,
        ms: bool,
    },
    Set {
        key: Bytes,
        value: Bytes,
        cond: Option<Cond>,
        expiry: SetExpiry,
        reply: SetReply,
    },
    MSet(Vec<(Bytes, Bytes)>),
    Del(Vec<Bytes>),
    GetDel(Bytes),
    GetEx {
        key: Bytes,
        expiry: Option<Expiry>,
    },
    Expire {
        key: Bytes,
        when: When,
        cond: Option<ExpireCond>,
    },
    Persist(Bytes),
    Incr {
        key: Bytes,
        by: i64,
    },
    /// HSET, HMSET, HSETNX.
    HSet {
        key: Bytes,
        pairs: Vec<(Bytes, Bytes)>,
        reply: HSetReply,
    },
    /// HGET (one field) or HMGET (an array).
    HGet {
        key: Bytes,
        fields: Vec<Bytes>,
        array: bool,
    },
    HRead {
        key: Bytes,
        what: HRead,
    },
    HDel {
        key: Bytes,
        fields: Vec<Bytes>,
    },
    HIncrBy {
        key: Bytes,
        field: Bytes,
        by: i64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HSetReply {
    /// HSET: how many fields were added.
    Added,
    /// HMSET: `+OK`.
    Ok,
    /// HSETNX: `:1` if the field was new and set, `:0` if it existed.
    IfNew,
}

/// The whole-hash reads.
#[derive(Debug, PartialEq, Eq)]
enum HRead {
    All,
    Keys,
    Values,
    Len,
    Exists(Bytes),
}

fn err(message: impl Into<String>) -> RespValue {
    RespValue::Error(Bytes::from(message.into()))
}

fn ok() -> RespValue {
    RespValue::Simple(Bytes::from_static(b"OK"))
}

fn wrong_args(name: &str) -> RespPlan {
    RespPlan::Reply(err(format!(
        "ERR wrong number of arguments for '{name}' command"
    )))
}

fn syntax_error() -> RespPlan {
    RespPlan::Reply(err("ERR syntax error"))
}

fn not_an_integer() -> RespPlan {
    RespPlan::Reply(err("ERR value is not an integer or out of range"))
}

fn invalid_expire(name: &str) -> RespPlan {
    RespPlan::Reply(err(format!("ERR invalid expire time in '{name}' command")))
}

fn get(key: Bytes) -> KeyRequest {
    let get = Get {
        bucket: Bytes::from_static(RESP_BUCKET),
        key,
        r: None,
        timeout_ms: None,
    };
    KeyRequest::new(KeyBody::Get(get), PARTITIONS)
}

fn put(key: Bytes, value: Bytes, expiry: Option<Expiry>) -> KeyRequest {
    put_if(key, value, expiry, None)
}

/// A PUT that only writes if `cond` holds at the key's first reachable home.
fn put_if(key: Bytes, value: Bytes, expiry: Option<Expiry>, cond: Option<Cond>) -> KeyRequest {
    let put = Put {
        bucket: Bytes::from_static(RESP_BUCKET),
        key,
        value,
        context: None,
        w: None,
        dw: None,
        timeout_ms: None,
        expiry,
        condition: cond.map(|c| match c {
            Cond::Nx => Condition::IfAbsent,
            Cond::Xx => Condition::IfPresent,
        }),
    };
    KeyRequest::new(KeyBody::Put(put), PARTITIONS)
}

fn update(key: Bytes, ops: Vec<MapOp>) -> KeyRequest {
    let update = Update {
        bucket: Bytes::from_static(RESP_BUCKET),
        key,
        ops,
        w: None,
        dw: None,
        timeout_ms: None,
    };
    KeyRequest::new(KeyBody::Update(update), PARTITIONS)
}

fn delete(key: Bytes) -> KeyRequest {
    let delete = Delete {
        bucket: Bytes::from_static(RESP_BUCKET),
        key,
        context: None,
        w: None,
        dw: None,
        timeout_ms: None,
    };
    KeyRequest::new(KeyBody::Delete(delete), PARTITIONS)
}

/// A decimal integer argument, as Redis parses them (no sign `+`, no spaces).
fn integer(arg: Option<&[u8]>) -> Option<i64> {
    let s = std::str::from_utf8(arg?).ok()?;
    if s.starts_with('+') || s.is_empty() {
        return None;
    }
    s.parse().ok()
}

/// A positive time in `unit_ms` milliseconds as an expiry argument: `None` when not a
/// positive integer whose milliseconds fit.
fn positive_ms(arg: Option<&[u8]>, unit_ms: i64) -> Result<u64, RespPlan> {
    let n = integer(arg).ok_or_else(not_an_integer)?;
    match n.checked_mul(unit_ms) {
        Some(ms) if n > 0 => Ok(ms as u64),
        _ => Err(RespPlan::Reply(err("ERR invalid expire time"))),
    }
}

/// Parses one expiry option of SET or GETEX at `args[i]` (`EX`, `PX`, `EXAT`, `PXAT`); returns
/// the expiry and how many arguments it took, `None` if `args[i]` is not one.
fn expiry_option(cmd: &RespCommand, i: usize, name: &str) -> Option<Result<Expiry, RespPlan>> {
    let opt = cmd.arg(i)?.to_ascii_lowercase();
    let (unit, absolute) = match opt.as_slice() {
        b"ex" => (1000, false),
        b"px" => (1, false),
        b"exat" => (1000, true),
        b"pxat" => (1, true),
        _ => return None,
    };
    let Some(arg) = cmd.arg(i + 1) else {
        return Some(Err(syntax_error()));
    };
    Some(match positive_ms(Some(arg), unit) {
        Ok(ms) if absolute => Ok(Expiry::At { unix_ms: ms }),
        Ok(ms) => Ok(Expiry::Ttl { ms }),
        Err(RespPlan::Reply(RespValue::Error(e))) if e.starts_with(b"ERR invalid expire") => {
            Err(invalid_expire(name))
        }
        Err(e) => Err(e),
    })
}

/// Decides what to do with `cmd` on a connection whose state is `state`.
pub fn plan(cmd: &RespCommand, state: &mut RespState) -> RespPlan {
    let Some(name) = cmd.name() else {
        // Empty commands are ignored by Redis; the listener never passes them, answer anyway.
        return RespPlan::Reply(err("ERR empty command"));
    };
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    let argc = cmd.len();
    let arg = |i: usize| cmd.arg_bytes(i).unwrap_or_default();
    // Arguments after the name, as shared slices of the command's buffer.
    let keys = |from: usize| (from..argc).filter_map(|i| cmd.arg_bytes(i)).collect();
    let run = |op: Op| RespPlan::Run(Script::new(op));
    if let Some(refused) = hash_limits(cmd, &name) {
        return refused;
    }
    match name.as_str() {
        "ping" => match argc {
            1 => RespPlan::Reply(RespValue::Simple(Bytes::from_static(b"PONG"))),
            2 => RespPlan::Reply(RespValue::Bulk(arg(1))),
            _ => wrong_args("ping"),
        },
        "echo" if argc == 2 => RespPlan::Reply(RespValue::Bulk(arg(1))),
        "echo" => wrong_args("echo"),
        "quit" => RespPlan::ReplyAndClose(ok()),
        "select" => match cmd.arg(1) {
            Some(b"0") if argc == 2 => RespPlan::Reply(ok()),
            Some(_) if argc == 2 => RespPlan::Reply(err("ERR DB index is out of range")),
            _ => wrong_args("select"),
        },
        "command" => RespPlan::Reply(RespValue::Array(Vec::new())),
        "info" => RespPlan::Reply(RespValue::Bulk(Bytes::from(format!(
            "# Server\r\nredis_version:7.0.0\r\nringkv_version:{}\r\nredis_mode:standalone\r\n",
            env!("CARGO_PKG_VERSION")
        )))),
        "hello" => hello(cmd, state),
        "auth" => match argc {
            2 => RespPlan::Reply(err(
                "ERR AUTH <password> called without any password configured for the default \
                 user. Are you sure your configuration is correct?",
            )),
            3 => auth(cmd.arg(1).unwrap_or_default()),
            _ => wrong_args("auth"),
        },
        "client" => client(cmd, state),
        "dbsize" if argc == 1 => RespPlan::DbSize,
        "dbsize" => wrong_args("dbsize"),
        "get" if argc == 2 => run(Op::Get(arg(1))),
        "get" => wrong_args("get"),
        "mget" if argc >= 2 => run(Op::MGet(keys(1))),
        "mget" => wrong_args("mget"),
        "exists" if argc >= 2 => run(Op::Exists(keys(1))),
        "exists" => wrong_args("exists"),
        "type" if argc == 2 => run(Op::Type(arg(1))),
        "type" => wrong_args("type"),
        "ttl" | "pttl" if argc == 2 => run(Op::Ttl {
            key: arg(1),
            ms: name == "pttl",
        }),
        "ttl" | "pttl" => wrong_args(&name),
        "set" if argc >= 3 => set(cmd),
        "set" => wrong_args("set"),
        "setnx" if argc == 3 => run(Op::Set {
            key: arg(1),
            value: arg(2),
            cond: Some(Cond::Nx),
            expiry: SetExpiry::Default,
            reply: SetReply::Int,
        }),
        "setnx" => wrong_args("setnx"),
        "setex" | "psetex" if argc == 4 => {
            let unit = if name == "setex" { 1000 } else { 1 };
            match positive_ms(cmd.arg(2), unit) {
                Ok(ms) => run(Op::Set {
                    key: arg(1),
                    value: arg(3),
                    cond: None,
                    expiry: SetExpiry::Given(Expiry::Ttl { ms }),
                    reply: SetReply::Ok,
                }),
                Err(RespPlan::Reply(RespValue::Error(e))) if e.starts_with(b"ERR invalid") => {
                    invalid_expire(&name)
                }
                Err(e) => e,
            }
        }
        "setex" | "psetex" => wrong_args(&name),
        "mset" if argc >= 3 && argc % 2 == 1 => run(Op::MSet(
            (1..argc).step_by(2).map(|i| (arg(i), arg(i + 1))).collect(),
        )),
        "mset" => wrong_args("mset"),
        "del" | "unlink" if argc >= 2 => run(Op::Del(keys(1))),
        "del" | "unlink" => wrong_args(&name),
        "getdel" if argc == 2 => run(Op::GetDel(arg(1))),
        "getdel" => wrong_args("getdel"),
        "getex" if argc >= 2 => getex(cmd),
        "getex" => wrong_args("getex"),
        "expire" | "pexpire" | "expireat" | "pexpireat" if argc >= 3 => expire(cmd, &name),
        "expire" | "pexpire" | "expireat" | "pexpireat" => wrong_args(&name),
        "persist" if argc == 2 => run(Op::Persist(arg(1))),
        "persist" => wrong_args("persist"),
        "incr" | "decr" if argc == 2 => run(Op::Incr {
            key: arg(1),
            by: if name == "incr" { 1 } else { -1 },
        }),
        "incr" | "decr" => wrong_args(&name),
        "incrby" | "decrby" if argc == 3 => {
            let Some(by) = integer(cmd.arg(2)) else {
                return not_an_integer();
            };
            let by = if name == "incrby" {
                Some(by)
            } else {
                by.checked_neg()
            };
            match by {
                Some(by) => run(Op::Incr { key: arg(1), by }),
                None => RespPlan::Reply(err("ERR decrement would overflow")),
            }
        }
        "incrby" | "decrby" => wrong_args(&name),
        "hset" | "hmset" if argc >= 4 && argc.is_multiple_of(2) => run(Op::HSet {
            key: arg(1),
            pairs: (2..argc).step_by(2).map(|i| (arg(i), arg(i + 1))).collect(),
            reply: if name == "hset" {
                HSetReply::Added
            } else {
                HSetReply::Ok
            },
        }),
        "hset" | "hmset" => wrong_args(&name),
        "hsetnx" if argc == 4 => run(Op::HSet {
            key: arg(1),
            pairs: vec![(arg(2), arg(3))],
            reply: HSetReply::IfNew,
        }),
        "hsetnx" => wrong_args("hsetnx"),
        "hget" if argc == 3 => run(Op::HGet {
            key: arg(1),
            fields: vec![arg(2)],
            array: false,
        }),
        "hget" => wrong_args("hget"),
        "hmget" if argc >= 3 => run(Op::HGet {
            key: arg(1),
            fields: keys(2),
            array: true,
        }),
        "hmget" => wrong_args("hmget"),
        "hgetall" | "hkeys" | "hvals" | "hlen" if argc == 2 => run(Op::HRead {
            key: arg(1),
            what: match name.as_str() {
                "hgetall" => HRead::All,
                "hkeys" => HRead::Keys,
                "hvals" => HRead::Values,
                _ => HRead::Len,
            },
        }),
        "hgetall" | "hkeys" | "hvals" | "hlen" => wrong_args(&name),
        "hexists" if argc == 3 => run(Op::HRead {
            key: arg(1),
            what: HRead::Exists(arg(2)),
        }),
        "hexists" => wrong_args("hexists"),
        "hdel" if argc >= 3 => run(Op::HDel {
            key: arg(1),
            fields: keys(2),
        }),
        "hdel" => wrong_args("hdel"),
        "hincrby" if argc == 4 => match integer(cmd.arg(3)) {
            Some(by) => run(Op::HIncrBy {
                key: arg(1),
                field: arg(2),
                by,
            }),
            None => not_an_integer(),
        },
        "hincrby" => wrong_args("hincrby"),
        _ => RespPlan::Reply(err(format!(
            "ERR unknown command '{}'",
            name.escape_default()
        ))),
    }
}

/// A hash command's fields become one UPDATE: its limits (fields per command, field name length)
/// are checked here, where the client can be told. Values are bounded by the node's value limit,
/// which answers its own error.
fn hash_limits(cmd: &RespCommand, name: &str) -> Option<RespPlan> {
    let fields: Vec<usize> = match name {
        "hset" | "hmset" => (2..cmd.len()).step_by(2).collect(),
        "hsetnx" | "hget" | "hexists" | "hincrby" => vec![2],
        "hmget" | "hdel" => (2..cmd.len()).collect(),
        _ => return None,
    };
    if fields.len() > MAP_OPS_MAX {
        return Some(RespPlan::Reply(err(format!(
            "ERR at most {MAP_OPS_MAX} fields in one hash command"
        ))));
    }
    fields
        .iter()
        .any(|&i| cmd.arg(i).is_some_and(|f| f.len() > FIELD_BYTES_MAX))
        .then(|| {
            RespPlan::Reply(err(format!(
                "ERR a hash field name is at most {FIELD_BYTES_MAX} bytes"
            )))
        })
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`: protocol 2 only, so that RESP3 clients
/// fall back to RESP2 (`NOPROTO`, as Redis 5 answers).
fn hello(cmd: &RespCommand, state: &mut RespState) -> RespPlan {
    match cmd.arg(1) {
        None | Some(b"2") => {}
        Some(v) if integer(Some(v)).is_none() => {
            return RespPlan::Reply(err(
                "ERR Protocol version is not an integer or out of range",
            ));
        }
        Some(_) => return RespPlan::Reply(err("NOPROTO unsupported protocol version")),
    }
    let mut i = 2;
    while i < cmd.len() {
        match cmd.arg(i).map(<[u8]>::to_ascii_lowercase).as_deref() {
            Some(b"auth") if i + 2 < cmd.len() => {
                if let RespPlan::Reply(RespValue::Error(e)) =
                    auth(cmd.arg(i + 1).unwrap_or_default())
                {
                    return RespPlan::Reply(RespValue::Error(e));
                }
                i += 3;
            }
            Some(b"setname") if i + 1 < cmd.len() => {
                let name = cmd.arg_bytes(i + 1).unwrap_or_default();
                if let Err(e) = set_name(state, name) {
                    return e;
                }
                i += 2;
            }
            _ => {
                return RespPlan::Reply(err(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(cmd.arg(i).unwrap_or_default())
                )));
            }
        }
    }
    let text = |s: &'static [u8]| RespValue::Bulk(Bytes::from_static(s));
    RespPlan::Reply(RespValue::Array(vec![
        text(b"server"),
        text(b"redis"),
        text(b"version"),
        text(b"7.0.0"),
        text(b"proto"),
        RespValue::Integer(2),
        text(b"id"),
        RespValue::Integer(i64::try_from(state.id).unwrap_or(i64::MAX)),
        text(b"mode"),
        text(b"standalone"),
        text(b"role"),
        text(b"master"),
        text(b"modules"),
        RespValue::Array(Vec::new()),
    ]))
}

/// `AUTH user pass` as Redis answers it with no password configured: the default user takes
/// any password, other users do not exist. (Authentication comes with TLS.)
fn auth(user: &[u8]) -> RespPlan {
    if user == b"default" {
        RespPlan::Reply(ok())
    } else {
        RespPlan::Reply(err(
            "WRONGPASS invalid username-password pair or user is disabled.",
        ))
    }
}

fn set_name(state: &mut RespState, name: Bytes) -> Result<(), RespPlan> {
    if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        return Err(RespPlan::Reply(err(
            "ERR Client names cannot contain spaces, newlines or special characters.",
        )));
    }
    state.name = (!name.is_empty()).then_some(name);
    Ok(())
}

/// `CLIENT SETNAME|GETNAME|ID|SETINFO`, the subcommands clients send on connect.
fn client(cmd: &RespCommand, state: &mut RespState) -> RespPlan {
    let Some(sub) = cmd.arg(1) else {
        return wrong_args("client");
    };
    let sub = sub.to_ascii_lowercase();
    match (sub.as_slice(), cmd.len()) {
        (b"setname", 3) => match set_name(state, cmd.arg_bytes(2).unwrap_or_default()) {
            Ok(()) => RespPlan::Reply(ok()),
            Err(e) => e,
        },
        (b"getname", 2) => {
            RespPlan::Reply(state.name.clone().map_or(RespValue::Null, RespValue::Bulk))
        }
        (b"id", 2) => RespPlan::Reply(RespValue::Integer(
            i64::try_from(state.id).unwrap_or(i64::MAX),
        )),
        (b"setinfo", 4) => match cmd.arg(2).map(<[u8]>::to_ascii_lowercase).as_deref() {
            Some(b"lib-name" | b"lib-ver") => RespPlan::Reply(ok()),
            _ => RespPlan::Reply(err(format!(
                "ERR Unrecognized option '{}'",
                String::from_utf8_lossy(cmd.arg(2).unwrap_or_default())
            ))),
        },
        (b"setname" | b"getname" | b"id" | b"setinfo", _) => RespPlan::Reply(err(format!(
            "ERR wrong number of arguments for 'client|{}' command",
            String::from_utf8_lossy(&sub)
        ))),
        _ => RespPlan::Reply(err(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            String::from_utf8_lossy(&sub)
        ))),
    }
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
fn set(cmd: &RespCommand) -> RespPlan {
    let mut cond = None;
    let mut get = false;
    let mut expiry = SetExpiry::Default;
    let mut i = 3;
    while i < cmd.len() {
        if let Some(parsed) = expiry_option(cmd, i, "set") {
            if expiry != SetExpiry::Default {
                return syntax_error();
            }
            match parsed {
                Ok(e) => expiry = SetExpiry::Given(e),
                Err(e) => return e,
            }
            i += 2;
            continue;
        }
        match cmd.arg(i).map(<[u8]>::to_ascii_lowercase).as_deref() {
            Some(b"nx") if cond.is_none() => cond = Some(Cond::Nx),
            Some(b"xx") if cond.is_none() => cond = Some(Cond::Xx),
            Some(b"get") => get = true,
            Some(b"keepttl") if expiry == SetExpiry::Default => expiry = SetExpiry::Keep,
            _ => return syntax_error(),
        }
        i += 1;
    }
    RespPlan::Run(Script::new(Op::Set {
        key: cmd.arg_bytes(1).unwrap_or_default(),
        value: cmd.arg_bytes(2).unwrap_or_default(),
        cond,
        expiry,
        reply: if get { SetReply::Old } else { SetReply::Ok },
    }))
}

/// `GETEX key [EX s|PX ms|EXAT s|PXAT ms|PERSIST]`.
fn getex(cmd: &RespCommand) -> RespPlan {
    let key = cmd.arg_bytes(1).unwrap_or_default();
    let expiry = match cmd.len() {
        2 => None,
        3 if cmd
            .arg(2)
            .is_some_and(|a| a.eq_ignore_ascii_case(b"persist")) =>
        {
            Some(Expiry::Never)
        }
        4 => match expiry_option(cmd, 2, "getex") {
            Some(Ok(e)) => Some(e),
            Some(Err(e)) => return e,
            None => return syntax_error(),
        },
        _ => return syntax_error(),
    };
    RespPlan::Run(Script::new(Op::GetEx { key, expiry }))
}

/// `EXPIRE key seconds [NX|XX|GT|LT]`, and `PEXPIRE`, `EXPIREAT`, `PEXPIREAT`.
fn expire(cmd: &RespCommand, name: &str) -> RespPlan {
    let Some(n) = integer(cmd.arg(2)) else {
        return not_an_integer();
    };
    let unit = if name.starts_with('p') { 1 } else { 1000 };
    let Some(ms) = n.checked_mul(unit) else {
        return invalid_expire(name);
    };
    let when = if name.ends_with("at") {
        When::At(ms)
    } else {
        When::In(ms)
    };
    let mut cond = None;
    for i in 3..cmd.len() {
        let c = match cmd.arg(i).map(<[u8]>::to_ascii_lowercase).as_deref() {
            Some(b"nx") => ExpireCond::Nx,
            Some(b"xx") => ExpireCond::Xx,
            Some(b"gt") => ExpireCond::Gt,
            Some(b"lt") => ExpireCond::Lt,
            _ => {
                return RespPlan::Reply(err(format!(
                    "ERR Unsupported option {}",
                    String::from_utf8_lossy(cmd.arg(i).unwrap_or_default())
                )));
            }
        };
        cond = match (cond, c) {
            (None, c) => Some(c),
            (Some(a), b) if a == b => Some(a),
            (Some(ExpireCond::Gt), ExpireCond::Lt) | (Some(ExpireCond::Lt), ExpireCond::Gt) => {
                return RespPlan::Reply(err(
                    "ERR GT and LT options at the same time are not compatible",
                ));
            }
            _ => {
                return RespPlan::Reply(err(
                    "ERR NX and XX, GT or LT options at the same time are not compatible",
                ));
            }
        };
    }
    RespPlan::Run(Script::new(Op::Expire {
        key: cmd.arg_bytes(1).unwrap_or_default(),
        when,
        cond,
    }))
}

/// The value of a `Result<T, RespValue>`, or (in [`Script::after_reads`]) the error reply it
/// holds as the command's answer.
macro_rules! or_reply {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reply) => return Ok(reply),
        }
    };
}

impl Script {
    fn new(op: Op) -> Script {
        Script {
            op,
            found: Vec::new(),
            round: Round::NotStarted,
        }
    }

    /// The keys (in [`RESP_BUCKET`]) the script reads or writes.
    pub fn keys(&self) -> Vec<&Bytes> {
        match &self.op {
            Op::MGet(keys) | Op::Exists(keys) | Op::Del(keys) => keys.iter().collect(),
            Op::MSet(pairs) => pairs.iter().map(|(k, _)| k).collect(),
            Op::Get(key)
            | Op::Type(key)
            | Op::GetDel(key)
            | Op::Persist(key)
            | Op::Ttl { key, .. }
            | Op::Set { key, .. }
            | Op::GetEx { key, .. }
            | Op::Expire { key, .. }
            | Op::Incr { key, .. }
            | Op::HSet { key, .. }
            | Op::HGet { key, .. }
            | Op::HRead { key, .. }
            | Op::HDel { key, .. }
            | Op::HIncrBy { key, .. } => vec![key],
        }
    }

    /// The first round: the reads the command decides on, or its writes when it needs no read.
    pub fn start(&mut self) -> Step {
        assert_eq!(self.round, Round::NotStarted, "a script starts once");
        let writes = match &self.op {
            // Without GET or KEEPTTL nothing needs a read: NX and XX are conditions the key's
            // first home checks (module docs).
            Op::Set {
                key,
                value,
                cond,
                expiry,
                reply: SetReply::Ok | SetReply::Int,
            } if *expiry != SetExpiry::Keep => {
                let expiry = match expiry {
                    SetExpiry::Given(e) => Some(*e),
                    SetExpiry::Default | SetExpiry::Keep => None,
                };
                Some(vec![put_if(key.clone(), value.clone(), expiry, *cond)])
            }
            Op::MSet(pairs) => Some(
                pairs
                    .iter()
                    .map(|(k, v)| put(k.clone(), v.clone(), None))
                    .collect(),
            ),
            _ => None,
        };
        match writes {
            Some(writes) => {
                self.round = Round::Writes;
                Step::Run(writes)
            }
            None => {
                self.round = Round::Reads;
                Step::Run(self.keys().into_iter().cloned().map(get).collect())
            }
        }
    }

    /// Takes the replies of the round [`Script::start`] or the previous `resume` asked for, in
    /// request order, at `now_ms` (Unix milliseconds): the next round, or the reply.
    pub fn resume(&mut self, replies: &[Message], now_ms: u64) -> Step {
        if let Op::Set { reply, .. } = &self.op
            && self.round == Round::Writes
            && replies
                .iter()
                .any(|r| matches!(r, Message::Error(e) if e.code == ErrorCode::ConditionFailed))
        {
            return Step::Done(match reply {
                SetReply::Ok => RespValue::Null,
                SetReply::Int => RespValue::Integer(0),
                SetReply::Old => string_or_nil(self.first().string().ok().flatten()),
            });
        }
        if let Some(e) = replies.iter().find_map(error_of) {
            return Step::Done(e);
        }
        match self.round {
            Round::NotStarted => unreachable!("resume follows start"),
            Round::Writes => Step::Done(self.written()),
            Round::Reads => {
                let mut found = Vec::with_capacity(replies.len());
                for reply in replies {
                    match found_of(reply) {
                        Ok(f) => found.push(f),
                        Err(e) => return Step::Done(e),
                    }
                }
                self.found = found;
                match self.after_reads(now_ms) {
                    Ok(reply) => Step::Done(reply),
                    Err(writes) => {
                        self.round = Round::Writes;
                        Step::Run(writes)
                    }
                }
            }
        }
    }

    fn first(&self) -> &Found {
        self.found.first().unwrap_or(&Found::Missing)
    }

    /// The reply once the reads ran, or (`Err`) the writes still to make.
    fn after_reads(&self, now_ms: u64) -> Result<RespValue, Vec<KeyRequest>> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let first = self.first();
        match &self.op {
            Op::Get(_) => Ok(string_or_nil(or_reply!(first.string()))),
            // MGET answers nil for a key of another type, as Redis does.
            Op::MGet(_) => Ok(RespValue::Array(
                self.found
                    .iter()
                    .map(|f| {
                        f.string()
                            .ok()
                            .flatten()
                            .map_or(RespValue::Null, RespValue::Bulk)
                    })
                    .collect(),
            )),
            Op::Exists(_) => Ok(RespValue::Integer(count(&self.found))),
            Op::Type(_) => Ok(RespValue::Simple(Bytes::from_static(match first {
                Found::Missing => b"none",
                Found::Str(..) => b"string",
                Found::Hash(..) => b"hash",
            }))),
            Op::Ttl { ms, .. } => Ok(RespValue::Integer(match first.expires() {
                None => -2,
                Some(None) => -1,
                Some(Some(at)) => {
                    let left = i64::try_from(at)
                        .unwrap_or(i64::MAX)
                        .saturating_sub(now)
                        .max(0);
                    if *ms { left } else { (left + 500) / 1000 }
                }
            })),
            Op::Set {
                key,
                value,
                cond,
                expiry,
                reply,
            } => {
                let old = match reply {
                    SetReply::Old => or_reply!(first.string()),
                    SetReply::Ok | SetReply::Int => None,
                };
                let allowed = match cond {
                    None => true,
                    Some(Cond::Nx) => first.is_missing(),
                    Some(Cond::Xx) => !first.is_missing(),
                };
                if !allowed {
                    return Ok(match reply {
                        SetReply::Ok => RespValue::Null,
                        SetReply::Old => string_or_nil(old),
                        SetReply::Int => RespValue::Integer(0),
                    });
                }
                let expiry = match expiry {
                    SetExpiry::Default => None,
                    SetExpiry::Given(e) => Some(*e),
                    SetExpiry::Keep => keep(first),
                };
                Err(vec![put_if(key.clone(), value.clone(), expiry, *cond)])
            }
            Op::Del(keys) => Err(keys.iter().cloned().map(delete).collect()),
            Op::GetDel(key) => match or_reply!(first.string()) {
                None => Ok(RespValue::Null),
                Some(_) => Err(vec![delete(key.clone())]),
            },
            Op::GetEx { key, expiry } => match (or_reply!(first.string()), expiry) {
                (Some(value), Some(e)) => Err(vec![put(key.clone(), value, Some(*e))]),
                (value, _) => Ok(string_or_nil(value)),
            },
            Op::Expire { key, when, cond } => {
                let Some(current) = first.expires() else {
                    return Ok(RespValue::Integer(0));
                };
                let at = match *when {
                    When::In(ms) => now.saturating_add(ms),
                    When::At(ms) => ms,
                };
                let current = current.map(|c| i64::try_from(c).unwrap_or(i64::MAX));
                // A key without an expiry counts as expiring never (later than any time).
                let allowed = match cond {
                    None => true,
                    Some(ExpireCond::Nx) => current.is_none(),
                    Some(ExpireCond::Xx) => current.is_some(),
                    Some(ExpireCond::Gt) => current.is_some_and(|c| at > c),
                    Some(ExpireCond::Lt) => current.is_none_or(|c| at < c),
                };
                if !allowed {
                    return Ok(RespValue::Integer(0));
                }
                if at <= now {
                    // As Redis: a time already past deletes the key.
                    return Err(vec![delete(key.clone())]);
                }
                let expiry = match *when {
                    When::In(ms) => Expiry::Ttl { ms: ms as u64 },
                    When::At(ms) => Expiry::At { unix_ms: ms as u64 },
                };
                Err(vec![first.rewrite(key, expiry)])
            }
            Op::Persist(key) => match first.expires() {
                Some(Some(_)) => Err(vec![first.rewrite(key, Expiry::Never)]),
                _ => Ok(RespValue::Integer(0)),
            },
            Op::Incr { key, by } => {
                let current = match or_reply!(first.string()) {
                    None => 0,
                    Some(v) => match integer(Some(&v)) {
                        Some(n) => n,
                        None => return Ok(err("ERR value is not an integer or out of range")),
                    },
                };
                let Some(next) = current.checked_add(*by) else {
                    return Ok(err("ERR increment or decrement would overflow"));
                };
                let value = Bytes::from(next.to_string());
                Err(vec![put(key.clone(), value, keep(first))])
            }
            Op::HSet { key, pairs, reply } => {
                let fields = or_reply!(first.hash());
                if *reply == HSetReply::IfNew
                    && pairs
                        .iter()
                        .any(|(f, _)| fields.iter().any(|(g, _)| g == f))
                {
                    return Ok(RespValue::Integer(0));
                }
                let ops = pairs
                    .iter()
                    .map(|(field, value)| MapOp::Set {
                        field: field.clone(),
                        value: value.clone(),
                    })
                    .collect();
                Err(vec![update(key.clone(), ops)])
            }
            Op::HGet { fields, array, .. } => {
                let hash = or_reply!(first.hash());
                let values: Vec<RespValue> = fields
                    .iter()
                    .map(|f| {
                        hash.iter()
                            .find(|(g, _)| g == f)
                            .map_or(RespValue::Null, |(_, v)| RespValue::Bulk(v.clone()))
                    })
                    .collect();
                Ok(if *array {
                    RespValue::Array(values)
                } else {
                    values.into_iter().next().unwrap_or(RespValue::Null)
                })
            }
            Op::HRead { what, .. } => {
                let hash = or_reply!(first.hash());
                Ok(match what {
                    HRead::All => RespValue::Array(
                        hash.iter()
                            .flat_map(|(f, v)| {
                                [RespValue::Bulk(f.clone()), RespValue::Bulk(v.clone())]
                            })
                            .collect(),
                    ),
                    HRead::Keys => RespValue::Array(
                        hash.iter()
                            .map(|(f, _)| RespValue::Bulk(f.clone()))
                            .collect(),
                    ),
                    HRead::Values => RespValue::Array(
                        hash.iter()
                            .map(|(_, v)| RespValue::Bulk(v.clone()))
                            .collect(),
                    ),
                    HRead::Len => RespValue::Integer(hash.len() as i64),
                    HRead::Exists(field) => {
                        RespValue::Integer(i64::from(hash.iter().any(|(f, _)| f == field)))
                    }
                })
            }
            Op::HDel { key, fields } => {
                let hash = or_reply!(first.hash());
                let names: std::collections::BTreeSet<&Bytes> = fields.iter().collect();
                let existing: Vec<MapOp> = names
                    .into_iter()
                    .filter(|f| hash.iter().any(|(g, _)| g == *f))
                    .map(|f| MapOp::Delete { field: f.clone() })
                    .collect();
                if existing.is_empty() {
                    return Ok(RespValue::Integer(0));
                }
                Err(vec![update(key.clone(), existing)])
            }
            Op::HIncrBy { key, field, by } => {
                let hash = or_reply!(first.hash());
                let current = match hash.iter().find(|(f, _)| f == field) {
                    None => 0,
                    Some((_, v)) => match integer(Some(v)) {
                        Some(n) => n,
                        None => return Ok(err("ERR hash value is not an integer")),
                    },
                };
                let Some(next) = current.checked_add(*by) else {
                    return Ok(err("ERR increment or decrement would overflow"));
                };
                Err(vec![update(
                    key.clone(),
                    vec![MapOp::Set {
                        field: field.clone(),
                        value: Bytes::from(next.to_string()),
                    }],
                )])
            }
            Op::MSet(_) => unreachable!("MSET writes without reading"),
        }
    }

    /// The reply once the writes succeeded.
    fn written(&self) -> RespValue {
        let first = self.first();
        match &self.op {
            Op::Set { reply, .. } => match reply {
                SetReply::Ok => ok(),
                SetReply::Old => string_or_nil(first.string().ok().flatten()),
                SetReply::Int => RespValue::Integer(1),
            },
            Op::MSet(_) => ok(),
            Op::Del(_) => RespValue::Integer(count(&self.found)),
            Op::GetDel(_) | Op::GetEx { .. } => string_or_nil(first.string().ok().flatten()),
            Op::Expire { .. } | Op::Persist(_) => RespValue::Integer(1),
            Op::Incr { by, .. } => {
                let current = first
                    .string()
                    .ok()
                    .flatten()
                    .and_then(|v| integer(Some(&v)))
                    .unwrap_or(0);
                RespValue::Integer(current.saturating_add(*by))
            }
            Op::HSet { pairs, reply, .. } => match reply {
                HSetReply::Added => {
                    let hash = first.hash().unwrap_or_default();
                    let names: std::collections::BTreeSet<&Bytes> =
                        pairs.iter().map(|(f, _)| f).collect();
                    let added = names
                        .into_iter()
                        .filter(|f| !hash.iter().any(|(g, _)| g == *f))
                        .count();
                    RespValue::Integer(added as i64)
                }
                HSetReply::IfNew => RespValue::Integer(1),
                HSetReply::Ok => ok(),
            },
            Op::HDel { fields, .. } => {
                let hash = first.hash().unwrap_or_default();
                let names: std::collections::BTreeSet<&Bytes> = fields.iter().collect();
                RespValue::Integer(
                    names
                        .into_iter()
                        .filter(|f| hash.iter().any(|(g, _)| g == *f))
                        .count() as i64,
                )
            }
            Op::HIncrBy { field, by, .. } => {
                let current = first
                    .hash()
                    .unwrap_or_default()
                    .iter()
                    .find(|(f, _)| f == field)
                    .and_then(|(_, v)| integer(Some(v)))
                    .unwrap_or(0);
                RespValue::Integer(current.saturating_add(*by))
            }
            Op::Get(_)
            | Op::MGet(_)
            | Op::Exists(_)
            | Op::Type(_)
            | Op::Ttl { .. }
            | Op::HGet { .. }
            | Op::HRead { .. } => unreachable!("reads answer after their reads"),
        }
    }
}

/// What a read found under a key.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Found {
    /// Nothing (or only expired or deleted versions).
    Missing,
    /// A string, and its expiry.
    Str(Bytes, Option<u64>),
    /// A hash's fields, and its expiry.
    Hash(Vec<(Bytes, Bytes)>, Option<u64>),
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

impl Found {
    fn is_missing(&self) -> bool {
        *self == Found::Missing
    }

    /// The string, `None` if missing; a hash is a `WRONGTYPE` error.
    fn string(&self) -> Result<Option<Bytes>, RespValue> {
        match self {
            Found::Missing => Ok(None),
            Found::Str(v, _) => Ok(Some(v.clone())),
            Found::Hash(..) => Err(err(WRONGTYPE)),
        }
    }

    /// The hash's fields, empty if missing; a string is a `WRONGTYPE` error.
    fn hash(&self) -> Result<Vec<(Bytes, Bytes)>, RespValue> {
        match self {
            Found::Missing => Ok(Vec::new()),
            Found::Hash(fields, _) => Ok(fields.clone()),
            Found::Str(..) => Err(err(WRONGTYPE)),
        }
    }

    /// The key's expiry (`Some(None)`: none), or `None` if the key is missing.
    fn expires(&self) -> Option<Option<u64>> {
        match self {
            Found::Missing => None,
            Found::Str(_, e) | Found::Hash(_, e) => Some(*e),
        }
    }

    /// The write that gives the key found a new expiry: the string written back, or the hash's
    /// expiry register set.
    fn rewrite(&self, key: &Bytes, expiry: Expiry) -> KeyRequest {
        match self {
            Found::Hash(..) => update(key.clone(), vec![MapOp::Expire(expiry)]),
            Found::Str(value, _) => put(key.clone(), value.clone(), Some(expiry)),
            Found::Missing => unreachable!("a missing key gets no new expiry"),
        }
    }
}

fn string_or_nil(v: Option<Bytes>) -> RespValue {
    v.map_or(RespValue::Null, RespValue::Bulk)
}

/// The expiry a write that keeps the key's must carry: its time, "never" for a key without
/// one, and none (the bucket's default, as for a new key) for a missing key.
fn keep(found: &Found) -> Option<Expiry> {
    match found.expires() {
        Some(Some(at)) => Some(Expiry::At { unix_ms: at }),
        Some(None) => Some(Expiry::Never),
        None => None,
    }
}

fn count(found: &[Found]) -> i64 {
    found.iter().filter(|f| !f.is_missing()).count() as i64
}

/// The RESP error for an error reply.
fn error_of(reply: &Message) -> Option<RespValue> {
    match reply {
        Message::Error(e) => Some(err(format!("ERR {}: {}", e.code, e.message))),
        _ => None,
    }
}

/// What a GET reply found for Redis: the last value sibling, or the map's fields, and the key's
/// expiry.
fn found_of(reply: &Message) -> Result<Found, RespValue> {
    match reply {
        Message::GetOk(ok) => {
            if let Some(fields) = &ok.fields {
                return Ok(Found::Hash(fields.clone(), ok.expires_at_ms));
            }
            Ok(ok
                .siblings
                .iter()
                .rev()
                .find_map(|s| match s {
                    Sibling::Value(v) => Some(v.clone()),
                    Sibling::Tombstone => None,
                })
                .map_or(Found::Missing, |v| Found::Str(v, ok.expires_at_ms)))
        }
        other => Err(err(format!("ERR unexpected reply {}", other.kind()))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ringkv_net::resp::{RespLimits, decode_command};
    use ringkv_net::{ErrorBody, GetOk, PutOk};

    use super::*;

    fn cmd(line: &str) -> RespCommand {
        decode_command(format!("{line}\r\n").as_bytes(), &RespLimits::DEFAULT)
            .unwrap()
            .unwrap()
            .0
    }

    fn plan_of(line: &str) -> RespPlan {
        plan(&cmd(line), &mut RespState::new(7))
    }

    fn found(v: &'static [u8], expires_at_ms: Option<u64>) -> Message {
        Message::GetOk(GetOk {
            siblings: vec![Sibling::Value(Bytes::from_static(v))],
            context: Bytes::new(),
            expires_at_ms,
            fields: None,
        })
    }

    fn missing() -> Message {
        Message::GetOk(GetOk {
            siblings: vec![],
            context: Bytes::new(),
            expires_at_ms: None,
            fields: None,
        })
    }

    fn put_ok() -> Message {
        Message::PutOk(PutOk {
            context: Bytes::new(),
        })
    }

    fn error_text(v: &RespValue) -> String {
        match v {
            RespValue::Error(e) => String::from_utf8_lossy(e).into_owned(),
            other => panic!("not an error: {other:?}"),
        }
    }

    fn reply_of(line: &str) -> RespValue {
        match plan_of(line) {
            RespPlan::Reply(v) => v,
            other => panic!("{line}: not an immediate reply: {other:?}"),
        }
    }

    /// Runs `line`'s script with `answer` giving each request's reply, at time `now`; returns
    /// the reply and the requests made, round by round.
    fn script(
        line: &str,
        now: u64,
        mut answer: impl FnMut(&KeyRequest) -> Message,
    ) -> (RespValue, Vec<Vec<KeyBody>>) {
        let RespPlan::Run(mut s) = plan_of(line) else {
            panic!("{line}: not a script")
        };
        let mut rounds = Vec::new();
        let mut step = s.start();
        loop {
            match step {
                Step::Done(v) => return (v, rounds),
                Step::Run(requests) => {
                    let replies: Vec<Message> = requests.iter().map(&mut answer).collect();
                    rounds.push(requests.iter().map(|r| r.body().clone()).collect());
                    step = s.resume(&replies, now);
                }
            }
        }
    }

    /// A store of one key holding `value` with `expires`, answering reads and acknowledging
    /// writes.
    fn holding(value: Option<(&'static [u8], Option<u64>)>) -> impl FnMut(&KeyRequest) -> Message {
        move |r| match r.body() {
            KeyBody::Get(_) => value.map_or_else(missing, |(v, e)| found(v, e)),
            // A conditional PUT is decided as the key's first home would, by what it holds.
            KeyBody::Put(p) => match (p.condition, value.is_some()) {
                (Some(Condition::IfAbsent), true) | (Some(Condition::IfPresent), false) => {
                    Message::Error(ErrorBody::new(ErrorCode::ConditionFailed, "no"))
                }
                _ => put_ok(),
            },
            KeyBody::Delete(_) => Message::DeleteOk,
            KeyBody::Update(_) => Message::UpdateOk,
        }
    }

    fn condition_of(body: &KeyBody) -> Option<Condition> {
        match body {
            KeyBody::Put(p) => p.condition,
            other => panic!("not a put: {other:?}"),
        }
    }

    fn expiry_of(body: &KeyBody) -> Option<Expiry> {
        match body {
            KeyBody::Put(p) => p.expiry,
            other => panic!("not a put: {other:?}"),
        }
    }

    /// Immediate replies and refusals match Redis's wording closely enough for its clients.
    #[test]
    fn immediate_replies() {
        assert_eq!(
            reply_of("PING"),
            RespValue::Simple(Bytes::from_static(b"PONG"))
        );
        assert_eq!(plan_of("quit"), RespPlan::ReplyAndClose(ok()));
        assert!(error_text(&reply_of("HELLO 3")).starts_with("NOPROTO"));
        assert!(error_text(&reply_of("FLUSHALL")).starts_with("ERR unknown command"));
        assert!(error_text(&reply_of("GET")).starts_with("ERR wrong number"));
        assert_eq!(
            error_text(&reply_of("SET k v EX 0")),
            "ERR invalid expire time in 'set' command"
        );
        assert_eq!(
            error_text(&reply_of("SET k v EX ten")),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(error_text(&reply_of("SET k v NX XX")), "ERR syntax error");
        assert_eq!(
            error_text(&reply_of("SET k v EX 1 PX 5")),
            "ERR syntax error"
        );
        assert_eq!(
            error_text(&reply_of("SET k v KEEPTTL EX 5")),
            "ERR syntax error"
        );
        assert_eq!(
            error_text(&reply_of("SETEX k -1 v")),
            "ERR invalid expire time in 'setex' command"
        );
        assert_eq!(
            error_text(&reply_of("EXPIRE k 10 GT LT")),
            "ERR GT and LT options at the same time are not compatible"
        );
        assert_eq!(
            error_text(&reply_of("EXPIRE k 10 NX GT")),
            "ERR NX and XX, GT or LT options at the same time are not compatible"
        );
        assert!(error_text(&reply_of("MSET a 1 b")).starts_with("ERR wrong number"));
        assert!(error_text(&reply_of("CLIENT KILL x")).starts_with("ERR unknown subcommand"));
        assert!(error_text(&reply_of("AUTH secret")).starts_with("ERR AUTH <password> called"));
        assert!(error_text(&reply_of("AUTH alice pw")).starts_with("WRONGPASS"));
        assert_eq!(reply_of("AUTH default pw"), ok());
        assert_eq!(plan_of("DBSIZE"), RespPlan::DbSize);
    }

    /// CLIENT SETNAME and GETNAME keep the name on the connection's state; CLIENT ID and HELLO
    /// give its id; HELLO can set the name too.
    #[test]
    fn connection_commands_keep_their_state() {
        let mut state = RespState::new(42);
        assert_eq!(
            plan(&cmd("CLIENT GETNAME"), &mut state),
            RespPlan::Reply(RespValue::Null)
        );
        assert_eq!(
            plan(&cmd("CLIENT SETNAME web-1"), &mut state),
            RespPlan::Reply(ok())
        );
        assert_eq!(
            plan(&cmd("CLIENT GETNAME"), &mut state),
            RespPlan::Reply(RespValue::Bulk(Bytes::from_static(b"web-1")))
        );
        assert_eq!(
            plan(&cmd("CLIENT ID"), &mut state),
            RespPlan::Reply(RespValue::Integer(42))
        );
        assert_eq!(
            plan(&cmd("CLIENT SETINFO LIB-NAME redis-py"), &mut state),
            RespPlan::Reply(ok())
        );
        let RespPlan::Reply(RespValue::Array(hello)) =
            plan(&cmd("HELLO 2 AUTH default x SETNAME other"), &mut state)
        else {
            panic!("HELLO 2 answers its map as an array")
        };
        assert!(hello.contains(&RespValue::Integer(42)));
        assert_eq!(
            plan(&cmd("CLIENT GETNAME"), &mut state),
            RespPlan::Reply(RespValue::Bulk(Bytes::from_static(b"other")))
        );
        assert!(matches!(
            plan(&cmd("CLIENT SETNAME has\tspace"), &mut state),
            RespPlan::Reply(RespValue::Error(_))
        ));
    }

    /// Plain SET writes at once, with its expiry as a time to live for the coordinator to
    /// stamp; SET NX reads first and writes only if the key is missing; KEEPTTL writes the
    /// key's expiry back as an absolute time.
    #[test]
    fn set_and_its_options() {
        let (reply, rounds) = script("SET k v EX 10", 0, holding(None));
        assert_eq!(reply, ok());
        assert_eq!(rounds.len(), 1, "no read");
        assert_eq!(expiry_of(&rounds[0][0]), Some(Expiry::Ttl { ms: 10_000 }));
        let (reply, rounds) = script("SET k v PXAT 5000", 0, holding(None));
        assert_eq!(reply, ok());
        assert_eq!(
            expiry_of(&rounds[0][0]),
            Some(Expiry::At { unix_ms: 5_000 })
        );
        // NX and XX are conditions of one write, decided by the key's first home: no read.
        let (reply, rounds) = script("SET k v NX", 0, holding(Some((b"old", None))));
        assert_eq!(reply, RespValue::Null);
        assert_eq!(rounds.len(), 1, "one conditional write");
        assert_eq!(condition_of(&rounds[0][0]), Some(Condition::IfAbsent));
        let (reply, rounds) = script("SET k v NX EX 5", 0, holding(None));
        assert_eq!(reply, ok());
        assert_eq!(expiry_of(&rounds[0][0]), Some(Expiry::Ttl { ms: 5_000 }));
        let (reply, rounds) = script("SET k v XX", 0, holding(None));
        assert_eq!(reply, RespValue::Null);
        assert_eq!(condition_of(&rounds[0][0]), Some(Condition::IfPresent));
        // GET needs the old value: a read, then the conditional write.
        let (reply, rounds) = script("SET k v XX GET", 0, holding(Some((b"old", None))));
        assert_eq!(reply, RespValue::Bulk(Bytes::from_static(b"old")));
        assert_eq!(condition_of(&rounds[1][0]), Some(Condition::IfPresent));
        let (reply, rounds) = script("SET k v KEEPTTL", 0, holding(Some((b"old", Some(9_000)))));
        assert_eq!(reply, ok());
        assert_eq!(
            expiry_of(&rounds[1][0]),
            Some(Expiry::At { unix_ms: 9_000 })
        );
        let (reply, _) = script("SETNX k v", 0, holding(Some((b"old", None))));
        assert_eq!(reply, RespValue::Integer(0));
        let (reply, _) = script("SETNX k v", 0, holding(None));
        assert_eq!(reply, RespValue::Integer(1));
        let (_, rounds) = script("PSETEX k 1500 v", 0, holding(None));
        assert_eq!(expiry_of(&rounds[0][0]), Some(Expiry::Ttl { ms: 1_500 }));
    }

    /// TTL and PTTL answer -2 for a missing key, -1 for one without expiry, and the time left
    /// by this node's clock (TTL rounded to the nearest second, as Redis does).
    #[test]
    fn ttl_answers_from_the_expiry_read() {
        assert_eq!(script("TTL k", 0, holding(None)).0, RespValue::Integer(-2));
        assert_eq!(
            script("TTL k", 0, holding(Some((b"v", None)))).0,
            RespValue::Integer(-1)
        );
        let expiring = || holding(Some((b"v", Some(10_000))));
        assert_eq!(
            script("PTTL k", 2_500, expiring()).0,
            RespValue::Integer(7_500)
        );
        assert_eq!(script("TTL k", 2_500, expiring()).0, RespValue::Integer(8));
    }

    /// EXPIRE's conditions compare with the key's expiry (none counts as never); a time in the
    /// past deletes the key; PERSIST writes the value back without expiry, only if it had one.
    #[test]
    fn expire_and_persist() {
        let (reply, rounds) = script("EXPIRE k 10", 1_000, holding(Some((b"v", None))));
        assert_eq!(reply, RespValue::Integer(1));
        assert_eq!(expiry_of(&rounds[1][0]), Some(Expiry::Ttl { ms: 10_000 }));
        assert_eq!(
            script("EXPIRE k 10", 0, holding(None)).0,
            RespValue::Integer(0)
        );
        assert_eq!(
            script("EXPIRE k 10 GT", 0, holding(Some((b"v", None)))).0,
            RespValue::Integer(0),
            "no expiry is later than any"
        );
        assert_eq!(
            script("EXPIRE k 10 LT", 0, holding(Some((b"v", None)))).0,
            RespValue::Integer(1)
        );
        assert_eq!(
            script("PEXPIRE k 10 GT", 0, holding(Some((b"v", Some(5))))).0,
            RespValue::Integer(1)
        );
        assert_eq!(
            script("EXPIRE k 10 XX", 0, holding(Some((b"v", None)))).0,
            RespValue::Integer(0)
        );
        let (reply, rounds) = script("PEXPIREAT k 5", 1_000, holding(Some((b"v", None))));
        assert_eq!(reply, RespValue::Integer(1));
        assert!(
            matches!(rounds[1][0], KeyBody::Delete(_)),
            "a past time deletes"
        );
        let (reply, rounds) = script("PERSIST k", 0, holding(Some((b"v", Some(9)))));
        assert_eq!(reply, RespValue::Integer(1));
        assert_eq!(expiry_of(&rounds[1][0]), Some(Expiry::Never));
        assert_eq!(
            script("PERSIST k", 0, holding(Some((b"v", None)))).0,
            RespValue::Integer(0)
        );
        let (reply, rounds) = script("GETEX k PERSIST", 0, holding(Some((b"v", Some(9)))));
        assert_eq!(reply, RespValue::Bulk(Bytes::from_static(b"v")));
        assert_eq!(expiry_of(&rounds[1][0]), Some(Expiry::Never));
        let (reply, rounds) = script("GETEX k", 0, holding(Some((b"v", Some(9)))));
        assert_eq!(reply, RespValue::Bulk(Bytes::from_static(b"v")));
        assert_eq!(rounds.len(), 1, "GETEX without options only reads");
    }

    /// Data commands become requests in the RESP bucket, and their replies combine as Redis's;
    /// an error reply ends the script with an error.
    #[test]
    fn data_commands() {
        let (reply, rounds) = script("DEL a b", 0, |r| match r.body() {
            KeyBody::Get(g) if &g.key[..] == b"a" => found(b"x", None),
            KeyBody::Get(_) => missing(),
            _ => Message::DeleteOk,
        });
        assert_eq!(reply, RespValue::Integer(1));
        assert_eq!(rounds.len(), 2);
        assert!(
            matches!(&rounds[0][0], KeyBody::Get(g) if &g.bucket[..] == RESP_BUCKET && &g.key[..] == b"a")
        );
        assert!(matches!(&rounds[1][1], KeyBody::Delete(d) if &d.key[..] == b"b"));
        let (reply, _) = script("MGET a b", 0, |r| match r.body() {
            KeyBody::Get(g) if &g.key[..] == b"a" => found(b"x", None),
            _ => missing(),
        });
        assert_eq!(
            reply,
            RespValue::Array(vec![
                RespValue::Bulk(Bytes::from_static(b"x")),
                RespValue::Null
            ])
        );
        assert_eq!(
            script("EXISTS a a", 0, holding(Some((b"v", None)))).0,
            RespValue::Integer(2)
        );
        assert_eq!(
            script("TYPE a", 0, holding(Some((b"v", None)))).0,
            RespValue::Simple(Bytes::from_static(b"string"))
        );
        let (reply, rounds) = script("GETDEL a", 0, holding(Some((b"v", None))));
        assert_eq!(reply, RespValue::Bulk(Bytes::from_static(b"v")));
        assert!(matches!(rounds[1][0], KeyBody::Delete(_)));
        let (reply, rounds) = script("MSET a 1 b 2", 0, holding(None));
        assert_eq!(reply, ok());
        assert_eq!(rounds[0].len(), 2);
        let (reply, _) = script("GET a", 0, |_| {
            Message::Error(ErrorBody::new(ErrorCode::Timeout, "slow"))
        });
        assert!(error_text(&reply).starts_with("ERR timeout"), "{reply:?}");
    }

    /// INCR family: a missing key counts from 0, the key's expiry is kept, a value that is not
    /// an integer and an overflow are refused as Redis refuses them.
    #[test]
    fn increments() {
        let (reply, rounds) = script("INCRBY k 5", 0, holding(Some((b"10", Some(99)))));
        assert_eq!(reply, RespValue::Integer(15));
        assert_eq!(expiry_of(&rounds[1][0]), Some(Expiry::At { unix_ms: 99 }));
        assert!(matches!(&rounds[1][0], KeyBody::Put(p) if &p.value[..] == b"15"));
        let (reply, rounds) = script("DECR k", 0, holding(None));
        assert_eq!(reply, RespValue::Integer(-1));
        assert_eq!(
            expiry_of(&rounds[1][0]),
            None,
            "a new counter takes the bucket's default"
        );
        let (_, rounds) = script("INCR k", 0, holding(Some((b"1", None))));
        assert_eq!(expiry_of(&rounds[1][0]), Some(Expiry::Never));
        assert_eq!(
            error_text(&script("INCR k", 0, holding(Some((b"abc", None)))).0),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(
            error_text(&script("INCR k", 0, holding(Some((b"9223372036854775807", None)))).0),
            "ERR increment or decrement would overflow"
        );
        assert!(error_text(&reply_of("INCRBY k x")).starts_with("ERR value is not an integer"));
    }

    fn hash(fields: &[(&'static [u8], &'static [u8])], expires_at_ms: Option<u64>) -> Message {
        Message::GetOk(GetOk {
            siblings: vec![],
            context: Bytes::new(),
            expires_at_ms,
            fields: Some(
                fields
                    .iter()
                    .map(|(f, v)| (Bytes::from_static(f), Bytes::from_static(v)))
                    .collect(),
            ),
        })
    }

    /// A store of one key holding a hash, answering reads and acknowledging writes.
    fn holding_hash(
        fields: &'static [(&'static [u8], &'static [u8])],
        expires_at_ms: Option<u64>,
    ) -> impl FnMut(&KeyRequest) -> Message {
        move |r| match r.body() {
            KeyBody::Get(_) => hash(fields, expires_at_ms),
            KeyBody::Update(_) => Message::UpdateOk,
            other => panic!("a hash command sent {other:?}"),
        }
    }

    fn ops_of(body: &KeyBody) -> Vec<MapOp> {
        match body {
            KeyBody::Update(u) => u.ops.clone(),
            other => panic!("not an update: {other:?}"),
        }
    }

    fn bulk(v: &'static [u8]) -> RespValue {
        RespValue::Bulk(Bytes::from_static(v))
    }

    /// Hash commands read the hash and write only the fields they change (an UPDATE, each
    /// field a last-write-wins register); replies count as Redis counts; a string key is
    /// `WRONGTYPE` for them, and a hash key for string commands.
    #[test]
    fn hash_commands() {
        const H: &[(&[u8], &[u8])] = &[(b"cart", b"3"), (b"user", b"alice")];
        let (reply, rounds) = script("HSET h user bob n 1", 0, holding_hash(H, None));
        assert_eq!(
            reply,
            RespValue::Integer(1),
            "one field added, one replaced"
        );
        assert_eq!(ops_of(&rounds[1][0]).len(), 2);
        assert_eq!(
            script("HSETNX h user x", 0, holding_hash(H, None)).0,
            RespValue::Integer(0)
        );
        assert_eq!(
            script("HSETNX h z x", 0, holding_hash(H, None)).0,
            RespValue::Integer(1)
        );
        assert_eq!(script("HMSET h a 1", 0, holding_hash(H, None)).0, ok());
        assert_eq!(
            script("HGET h user", 0, holding_hash(H, None)).0,
            bulk(b"alice")
        );
        assert_eq!(
            script("HGET h nope", 0, holding_hash(H, None)).0,
            RespValue::Null
        );
        assert_eq!(
            script("HMGET h user nope", 0, holding_hash(H, None)).0,
            RespValue::Array(vec![bulk(b"alice"), RespValue::Null])
        );
        assert_eq!(
            script("HGETALL h", 0, holding_hash(H, None)).0,
            RespValue::Array(vec![
                bulk(b"cart"),
                bulk(b"3"),
                bulk(b"user"),
                bulk(b"alice")
            ])
        );
        assert_eq!(
            script("HKEYS h", 0, holding_hash(H, None)).0,
            RespValue::Array(vec![bulk(b"cart"), bulk(b"user")])
        );
        assert_eq!(
            script("HLEN h", 0, holding_hash(H, None)).0,
            RespValue::Integer(2)
        );
        assert_eq!(
            script("HEXISTS h cart", 0, holding_hash(H, None)).0,
            RespValue::Integer(1)
        );
        let (reply, rounds) = script("HDEL h cart nope cart", 0, holding_hash(H, None));
        assert_eq!(reply, RespValue::Integer(1));
        assert_eq!(
            ops_of(&rounds[1][0]),
            vec![MapOp::Delete {
                field: Bytes::from_static(b"cart")
            }]
        );
        let (reply, rounds) = script("HDEL h nope", 0, holding_hash(H, None));
        assert_eq!(reply, RespValue::Integer(0));
        assert_eq!(rounds.len(), 1, "nothing to delete, nothing written");
        assert_eq!(
            script("HINCRBY h cart 4", 0, holding_hash(H, None)).0,
            RespValue::Integer(7)
        );
        assert_eq!(
            error_text(&script("HINCRBY h user 1", 0, holding_hash(H, None)).0),
            "ERR hash value is not an integer"
        );
        // Expiry on a hash is its expiry register.
        let (reply, rounds) = script("EXPIRE h 10", 0, holding_hash(H, None));
        assert_eq!(reply, RespValue::Integer(1));
        assert_eq!(
            ops_of(&rounds[1][0]),
            vec![MapOp::Expire(Expiry::Ttl { ms: 10_000 })]
        );
        assert_eq!(
            script("TTL h", 1_000, holding_hash(H, Some(5_000))).0,
            RespValue::Integer(4)
        );
        let (_, rounds) = script("PERSIST h", 0, holding_hash(H, Some(5_000)));
        assert_eq!(ops_of(&rounds[1][0]), vec![MapOp::Expire(Expiry::Never)]);
        assert_eq!(
            script("TYPE h", 0, holding_hash(H, None)).0,
            RespValue::Simple(Bytes::from_static(b"hash"))
        );
        assert!(error_text(&script("GET h", 0, holding_hash(H, None)).0).starts_with("WRONGTYPE"));
        assert_eq!(
            script("MGET h", 0, holding_hash(H, None)).0,
            RespValue::Array(vec![RespValue::Null])
        );
        assert!(
            error_text(&script("HGET s f", 0, holding(Some((b"v", None)))).0)
                .starts_with("WRONGTYPE")
        );
        assert!(
            error_text(&script("HSET s f v", 0, holding(Some((b"v", None)))).0)
                .starts_with("WRONGTYPE")
        );
        assert_eq!(
            script("HGETALL missing", 0, holding(None)).0,
            RespValue::Array(Vec::new())
        );
        // Limits, sent as arrays (an inline command line is shorter than a long field name).
        let array = |args: Vec<Vec<u8>>| {
            let mut wire = format!("*{}\r\n", args.len()).into_bytes();
            for a in &args {
                wire.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                wire.extend_from_slice(a);
                wire.extend_from_slice(b"\r\n");
            }
            let cmd = decode_command(&wire, &RespLimits::DEFAULT)
                .unwrap()
                .unwrap()
                .0;
            match plan(&cmd, &mut RespState::new(1)) {
                RespPlan::Reply(v) => error_text(&v),
                other => panic!("not refused: {other:?}"),
            }
        };
        let long = vec![b'f'; FIELD_BYTES_MAX + 1];
        let refused = array(vec![b"HSET".to_vec(), b"h".to_vec(), long, b"v".to_vec()]);
        assert!(refused.contains("field name"), "{refused}");
        let mut many = vec![b"HSET".to_vec(), b"h".to_vec()];
        for i in 0..=MAP_OPS_MAX {
            many.push(format!("f{i}").into_bytes());
            many.push(b"v".to_vec());
        }
        assert!(array(many).contains("at most"));
    }
}
