//! Redis commands onto ringkv requests (sans-IO): what the RESP2 listener does with a command.
//!
//! [`plan`] turns a parsed [`RespCommand`] into a [`RespPlan`]: a reply it can give at once
//! (PING, ECHO, INFO, COMMAND, HELLO, CLIENT, AUTH, SELECT 0, QUIT, errors), or a [`Script`]:
//! the ringkv requests the command needs, in one or two rounds (a read, then the writes the read
//! decides; or a write alone, and for a refused increment a read that words the error), which
//! the shell executes, feeding each round's replies back until the script ends with the
//! command's reply. Keys live in the bucket [`RESP_BUCKET`] (`redis`), which is
//! last-write-wins unless configured otherwise: Redis clients have no causal contexts, so a SET
//! must replace what is there rather than become a sibling of it. `redis-cli SET k v` and
//! `ringkv get --bucket redis k` see the same value. Every command, its options and what it
//! guarantees across replicas is listed in `docs/PROTOCOL.md` §8.1.
//!
//! # Types
//!
//! As in Redis, the command that creates a key gives it its type: a string (a plain value, last
//! write wins), a counter, a set or a hash (the convergent types of `ringkv_core::crdt`, written
//! with APPLY). A command on a key of another type answers `WRONGTYPE`, by what its read found
//! or by the node's `wrong_type`; `SET` replaces a key of any type. A counter is a string to
//! Redis clients, as an `INCR`'d key is in Redis: `GET`, `MGET`, `GETDEL`, `GETEX` and
//! `SET ... GET` read it as its decimal value, `TYPE` says `string`.
//!
//! # Counters
//!
//! `INCR`, `DECR`, `INCRBY` and `DECRBY` are one APPLY of an increment, with no read: the key's
//! first reachable home applies it to what it holds and answers the value after it, which is the
//! reply. Increments through any nodes all count, concurrent or across a partition (their
//! replicas merge). A missing key starts from 0; a string holding an integer becomes a counter
//! from it, keeping its expiry. When the node refuses an increment, a read decides the Redis
//! error (`script.rs`): a string that is not an integer, or `WRONGTYPE`; an overflow is Redis's
//! own text. `HINCRBY` is the same on a counter field of a hash.
//!
//! # Sets
//!
//! A set is the add-wins set. `SADD` and `SREM` read the set first, because their reply counts
//! the members that were new (or there), and an APPLY answers only the set after it; then one
//! APPLY adds every member named, or removes every member named once the read found one. Adds of
//! one key through any nodes all survive; a remove removes the adds its coordinator has seen (an
//! add it has not seen survives). An empty set reads as a missing key, as in Redis.
//!
//! # Hashes
//!
//! A hash is the convergent map: hash commands write only the fields they change with an APPLY,
//! so concurrent writes of different fields of one key all survive. `HSET`, `HMSET` and
//! `HSETNX` assign register fields (the last write wins per field), `HDEL` removes fields, and
//! `HINCRBY` increments a counter field (two through two nodes both count). A counter field reads
//! as its decimal value, as in a Redis hash; `HSET` over it makes it a register again, and
//! `HINCRBY` of a register holding an integer makes it a counter from it. Fields of kinds only
//! ringkv's own clients make (sets, flags) are not shown to Redis clients.
//!
//! # Expiry
//!
//! `EX`/`PX`/`SETEX` and the others become a PUT's [`Expiry`]: a relative time to live goes to
//! the coordinator as is (it stamps the absolute time, so every replica agrees); an absolute
//! time goes as given. `TTL`/`PTTL` answer from the expiry a read returns and this node's clock.
//! `SET ... KEEPTTL` reads the key's expiry first and writes it back as an absolute time.
//! `EXPIRE`, `PERSIST` and `GETEX` write a string back with its new expiry, and set the expiry
//! register of a counter, set or hash with an APPLY of its type (its last write wins); the
//! operations on a convergent key keep that register, so `INCR`, `SADD` or `HSET` keep the key's
//! time to live as in Redis. What differs: a time already past deletes the key (a DELETE), and a
//! DELETE of a convergent key removes what its coordinator has seen, so an increment concurrent
//! with it (or with `DEL`) survives with what its coordinator had counted, where Redis would
//! have ordered the two.
//!
//! # Conditional SET
//!
//! `SET NX|XX` and `SETNX` are one conditional PUT (`ringkv_net::Condition`), which the key's
//! first reachable home decides under the key's lock: racing creators through any nodes get one
//! `OK` while that home is reachable (the coordinator's module docs say what it cannot see).
//!
//! # Read-then-write commands
//!
//! `SET ... GET|KEEPTTL`, `GETDEL`, `GETEX` with an option, `EXPIRE` and its variants,
//! `PERSIST`, `DEL`, `UNLINK`, `HSET`, `HSETNX`, `HDEL`, `SADD` and `SREM` read the key (at the
//! bucket's `r`) and then write; the read decides the reply (a count, an old value), the
//! conditions (`HSETNX`, `EXPIRE NX|XX|GT|LT`) and the type check. Nothing holds the key between
//! the two, so a reply may miss what another client did meanwhile, and a condition may no longer
//! hold when the write lands. The writes to counters, sets and hashes are operations that merge
//! with what others wrote meanwhile (per member, and per field, the last assignment winning);
//! a string written back with a new expiry (`GETEX`, `EXPIRE`, `PERSIST`) replaces a `SET` that
//! landed in between. Under sloppy quorum, a write may also land on fallbacks the read never
//! saw. The counter commands (`INCR` and its variants, `HINCRBY`) and `HMSET` write without
//! reading. Within one connection commands on one key run in order.
//!
//! Files: this one parses commands ([`plan`]); `script.rs` runs them ([`Script`]); `tests.rs`
//! drives both by hand.
//!
//! Limits: `DEL`/`UNLINK` read each key before deleting it to count what existed, so the count
//! is not atomic with the deletes. `MSET` is a write per key, not atomic. `DBSIZE` is an
//! estimate (the shell's). A Redis client's retry of an increment is a new command: an
//! increment whose reply was lost (a timeout) may count twice. If the `redis` bucket is
//! configured with siblings, reads answer the last value sibling, blind writes add siblings, and
//! the node refuses counters, sets and hashes (convergent types need a last-write-wins bucket).

use bytes::Bytes;
use ringkv_net::message::FIELD_BYTES_MAX;
use ringkv_net::resp::{RespCommand, RespValue};
use ringkv_net::{CRDT_OPS_MAX, Expiry};

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

mod script;
#[cfg(test)]
mod tests;

use script::{Cond, ExpireCond, HRead, HSetReply, Op, SRead, SetExpiry, SetReply, When};
pub use script::{Script, Step};

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

/// Redis's error for arguments it cannot parse, as a plan ([`syntax_error`]) or as the error
/// of an argument helper.
const SYNTAX_ERROR: &str = "ERR syntax error";

fn syntax_error() -> RespPlan {
    RespPlan::Reply(err(SYNTAX_ERROR))
}

/// Redis's error for an argument, or a string value, that is not an integer.
const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";

fn not_an_integer() -> RespPlan {
    RespPlan::Reply(err(NOT_AN_INTEGER))
}

fn invalid_expire(name: &str) -> RespValue {
    err(format!("ERR invalid expire time in '{name}' command"))
}

/// A decimal integer argument, as Redis parses them (no sign `+`, no spaces).
fn integer(arg: Option<&[u8]>) -> Option<i64> {
    let s = std::str::from_utf8(arg?).ok()?;
    if s.starts_with('+') || s.is_empty() {
        return None;
    }
    s.parse().ok()
}

/// A positive time in `unit_ms` milliseconds as the expiry argument of command `name`: the
/// error Redis gives when it is not an integer, or not positive, or its milliseconds overflow.
///
/// Errors here and in the other argument helpers are replies, not plans: a plan holds a
/// script in place, too large a value to hand back through every `Result`.
fn positive_ms(arg: Option<&[u8]>, unit_ms: i64, name: &str) -> Result<u64, RespValue> {
    let n = integer(arg).ok_or_else(|| err(NOT_AN_INTEGER))?;
    match n.checked_mul(unit_ms) {
        Some(ms) if n > 0 => Ok(ms as u64),
        _ => Err(invalid_expire(name)),
    }
}

/// Parses one expiry option of SET or GETEX at `args[i]` (`EX`, `PX`, `EXAT`, `PXAT`); returns
/// the expiry and how many arguments it took, `None` if `args[i]` is not one.
fn expiry_option(cmd: &RespCommand, i: usize, name: &str) -> Option<Result<Expiry, RespValue>> {
    let opt = cmd.arg(i)?.to_ascii_lowercase();
    let (unit, absolute) = match opt.as_slice() {
        b"ex" => (1000, false),
        b"px" => (1, false),
        b"exat" => (1000, true),
        b"pxat" => (1, true),
        _ => return None,
    };
    let Some(arg) = cmd.arg(i + 1) else {
        return Some(Err(err(SYNTAX_ERROR)));
    };
    Some(positive_ms(Some(arg), unit, name).map(|ms| {
        if absolute {
            Expiry::At { unix_ms: ms }
        } else {
            Expiry::Ttl { ms }
        }
    }))
}

/// Decides what to do with `cmd` on a connection whose state is `state`. Taken whole: a GET's
/// key and a SET's value take its buffer over ([`RespCommand::into_arg`]).
pub fn plan(cmd: RespCommand, state: &mut RespState) -> RespPlan {
    /// Bytes of a command name lower-cased without an allocation; longer names (no command has
    /// one) take a `String`.
    const COMMAND_NAME_INLINE: usize = 32;
    let Some(name) = cmd.name() else {
        // Empty commands are ignored by Redis; the listener never passes them, answer anyway.
        return RespPlan::Reply(err("ERR empty command"));
    };
    // Lower-cased on the stack: every command is planned, and command names are short.
    let mut lower = [0u8; COMMAND_NAME_INLINE];
    let name: std::borrow::Cow<'_, str> = match lower.get_mut(..name.len()) {
        Some(inline) => {
            inline.copy_from_slice(name);
            inline.make_ascii_lowercase();
            String::from_utf8_lossy(inline)
        }
        None => String::from_utf8_lossy(name).to_ascii_lowercase().into(),
    };
    let argc = cmd.len();
    let arg = |i: usize| cmd.arg_bytes(i).unwrap_or_default();
    if let Some(refused) = op_limits(&cmd, &name) {
        return refused;
    }
    match &*name {
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
        "hello" => hello(&cmd, state),
        "auth" => match argc {
            2 => RespPlan::Reply(err(
                "ERR AUTH <password> called without any password configured for the default \
                 user. Are you sure your configuration is correct?",
            )),
            3 => auth(cmd.arg(1).unwrap_or_default()),
            _ => wrong_args("auth"),
        },
        "client" => client(&cmd, state),
        "dbsize" if argc == 1 => RespPlan::DbSize,
        "dbsize" => wrong_args("dbsize"),
        _ => string_plan(cmd, &name),
    }
}

/// [`plan`] of the string, key and expiry commands (`name` in lower case).
fn string_plan(cmd: RespCommand, name: &str) -> RespPlan {
    let argc = cmd.len();
    let arg = |i: usize| cmd.arg_bytes(i).unwrap_or_default();
    // Arguments after the name, as shared slices of the command's buffer.
    let keys = |from: usize| (from..argc).filter_map(|i| cmd.arg_bytes(i)).collect();
    let run = |op: Op| RespPlan::Run(Script::new(op));
    match name {
        "get" if argc == 2 => run(Op::Get(cmd.into_arg(1).unwrap_or_default())),
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
        "ttl" | "pttl" => wrong_args(name),
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
            match positive_ms(cmd.arg(2), unit, name) {
                Ok(ms) => run(Op::Set {
                    key: arg(1),
                    value: arg(3),
                    cond: None,
                    expiry: SetExpiry::Given(Expiry::Ttl { ms }),
                    reply: SetReply::Ok,
                }),
                Err(e) => RespPlan::Reply(e),
            }
        }
        "setex" | "psetex" => wrong_args(name),
        "mset" if argc >= 3 && argc % 2 == 1 => {
            // A key named twice is written once, with its last value (what Redis leaves): a
            // round of requests never holds two writes of one key, whose order a batch spread
            // over shards would not keep (`Shard::execute_keys`).
            let mut pairs: Vec<(Bytes, Bytes)> = Vec::with_capacity(argc / 2);
            let mut place: std::collections::HashMap<Bytes, usize> =
                std::collections::HashMap::new();
            for i in (1..argc).step_by(2) {
                let (key, value) = (arg(i), arg(i + 1));
                match place.get(&key) {
                    Some(&at) => pairs[at].1 = value,
                    None => {
                        place.insert(key.clone(), pairs.len());
                        pairs.push((key, value));
                    }
                }
            }
            run(Op::MSet(pairs))
        }
        "mset" => wrong_args("mset"),
        "del" | "unlink" if argc >= 2 => {
            // A key named twice is deleted, and counted, once (as Redis does).
            let named: std::collections::BTreeSet<Bytes> =
                (1..argc).filter_map(|i| cmd.arg_bytes(i)).collect();
            run(Op::Del(named.into_iter().collect()))
        }
        "del" | "unlink" => wrong_args(name),
        "getdel" if argc == 2 => run(Op::GetDel(arg(1))),
        "getdel" => wrong_args("getdel"),
        "getex" if argc >= 2 => getex(&cmd),
        "getex" => wrong_args("getex"),
        "expire" | "pexpire" | "expireat" | "pexpireat" if argc >= 3 => expire(&cmd, name),
        "expire" | "pexpire" | "expireat" | "pexpireat" => wrong_args(name),
        "persist" if argc == 2 => run(Op::Persist(arg(1))),
        "persist" => wrong_args("persist"),
        "incr" | "decr" if argc == 2 => run(Op::Incr {
            key: arg(1),
            by: if name == "incr" { 1 } else { -1 },
        }),
        "incr" | "decr" => wrong_args(name),
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
        "incrby" | "decrby" => wrong_args(name),
        _ => hash_plan(&cmd, name),
    }
}

/// [`plan`] of the hash commands (`name` in lower case).
fn hash_plan(cmd: &RespCommand, name: &str) -> RespPlan {
    let argc = cmd.len();
    let arg = |i: usize| cmd.arg_bytes(i).unwrap_or_default();
    // Arguments after the name, as shared slices of the command's buffer.
    let keys = |from: usize| (from..argc).filter_map(|i| cmd.arg_bytes(i)).collect();
    let run = |op: Op| RespPlan::Run(Script::new(op));
    match name {
        "hset" | "hmset" if argc >= 4 && argc.is_multiple_of(2) => run(Op::HSet {
            key: arg(1),
            pairs: (2..argc).step_by(2).map(|i| (arg(i), arg(i + 1))).collect(),
            reply: if name == "hset" {
                HSetReply::Added
            } else {
                HSetReply::Ok
            },
        }),
        "hset" | "hmset" => wrong_args(name),
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
            what: match name {
                "hgetall" => HRead::All,
                "hkeys" => HRead::Keys,
                "hvals" => HRead::Values,
                _ => HRead::Len,
            },
        }),
        "hgetall" | "hkeys" | "hvals" | "hlen" => wrong_args(name),
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
        _ => set_plan(cmd, name),
    }
}

/// [`plan`] of the set commands (`name` in lower case).
fn set_plan(cmd: &RespCommand, name: &str) -> RespPlan {
    let argc = cmd.len();
    let arg = |i: usize| cmd.arg_bytes(i).unwrap_or_default();
    let members = |from: usize| (from..argc).filter_map(|i| cmd.arg_bytes(i)).collect();
    let run = |op: Op| RespPlan::Run(Script::new(op));
    let read = |what: SRead| run(Op::SRead { key: arg(1), what });
    match name {
        "sadd" if argc >= 3 => run(Op::SAdd {
            key: arg(1),
            members: members(2),
        }),
        "srem" if argc >= 3 => run(Op::SRem {
            key: arg(1),
            members: members(2),
        }),
        "sadd" | "srem" => wrong_args(name),
        "smembers" if argc == 2 => read(SRead::Members),
        "scard" if argc == 2 => read(SRead::Card),
        "smembers" | "scard" => wrong_args(name),
        "sismember" if argc == 3 => read(SRead::IsMember(arg(2))),
        "sismember" => wrong_args("sismember"),
        "smismember" if argc >= 3 => read(SRead::MIsMember(members(2))),
        "smismember" => wrong_args("smismember"),
        _ => RespPlan::Reply(err(format!(
            "ERR unknown command '{}'",
            name.escape_default()
        ))),
    }
}

/// A hash or set write becomes one APPLY: its limits (fields or members per command, field name
/// length) are checked here, where the client can be told. Values and members are bounded by the
/// node's value limit, and a set's or map's size by the node, which answer their own errors.
fn op_limits(cmd: &RespCommand, name: &str) -> Option<RespPlan> {
    // The arguments that name fields: every other one from the third (field, value pairs),
    // the third alone, or every one from the third.
    let (end, step) = match name {
        "hset" | "hmset" => (cmd.len(), 2),
        "hsetnx" | "hget" | "hexists" | "hincrby" => (cmd.len().min(3), 1),
        "hmget" | "hdel" => (cmd.len(), 1),
        "sadd" | "srem" if cmd.len().saturating_sub(2) > CRDT_OPS_MAX => {
            return Some(RespPlan::Reply(err(format!(
                "ERR at most {CRDT_OPS_MAX} members in one set command"
            ))));
        }
        _ => return None,
    };
    let mut fields = (2..end).step_by(step);
    if fields.len() > CRDT_OPS_MAX {
        return Some(RespPlan::Reply(err(format!(
            "ERR at most {CRDT_OPS_MAX} fields in one hash command"
        ))));
    }
    fields
        .any(|i| cmd.arg(i).is_some_and(|f| f.len() > FIELD_BYTES_MAX))
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
                    return RespPlan::Reply(e);
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

fn set_name(state: &mut RespState, name: Bytes) -> Result<(), RespValue> {
    if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        return Err(err(
            "ERR Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    // Kept for the connection's life: a copy, not a slice of the buffer the command was read
    // into (which it would keep whole).
    state.name = (!name.is_empty()).then(|| Bytes::copy_from_slice(&name));
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
            Err(e) => RespPlan::Reply(e),
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
fn set(cmd: RespCommand) -> RespPlan {
    let mut cond = None;
    let mut get = false;
    let mut expiry = SetExpiry::Default;
    let mut i = 3;
    while i < cmd.len() {
        if let Some(parsed) = expiry_option(&cmd, i, "set") {
            if expiry != SetExpiry::Default {
                return syntax_error();
            }
            match parsed {
                Ok(e) => expiry = SetExpiry::Given(e),
                Err(e) => return RespPlan::Reply(e),
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
        value: cmd.into_arg(2).unwrap_or_default(),
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
            Some(Err(e)) => return RespPlan::Reply(e),
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
        return RespPlan::Reply(invalid_expire(name));
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
