//! The execution of one RESP command: a [`Script`] of one or two rounds of ringkv requests (the
//! reads a command decides on, then its writes), fed each round's replies until it ends with the
//! command's reply (sans-IO). `mod.rs` parses commands into scripts; this file owns what a command
//! does with what it reads: conditions, expiries kept or replaced, `WRONGTYPE`, reply shapes.
//!
//! Counter commands (`INCR` and its variants, `HINCRBY`) write first. When the node refuses the
//! write, a read of the key decides which Redis error the client gets (a string that is not an
//! integer, or a key of another type), rather than the text of the node's message: that read is
//! the script's last round, and only refused increments make it.

use std::collections::BTreeSet;

use bytes::Bytes;
use ringkv_core::request::{KeyBody, KeyRequest};
use ringkv_net::resp::RespValue;
use ringkv_net::{
    Apply, ApplyOk, Condition, CrdtOp, CrdtType, CrdtValue, Delete, ErrorCode, Expiry, FieldOp,
    FieldValue, Get, Message, Put, Sibling,
};
use smallvec::SmallVec;

use super::{NOT_AN_INTEGER, RESP_BUCKET, err, integer, ok};
use crate::route::PARTITIONS;

/// What a script asks of the shell next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Execute the requests the script pushed onto the caller's batch, this many (the last of
    /// the batch, in order), and pass their replies to [`Script::resume`]. Pushed, not returned:
    /// a pipelined wave gathers its commands' requests in one list, and a request (some 180
    /// bytes) is written there once rather than moved through a return value on its way.
    Run(usize),
    /// The command's reply: the script is over.
    Done(RespValue),
}

/// A command that needs requests: its keys (so that a connection runs commands on one key in
/// order) and the rounds of requests it makes.
#[derive(Debug, PartialEq, Eq)]
pub struct Script {
    op: Op,
    /// What the read round found, once it ran: in place for the usual read of one key.
    found: SmallVec<[Found; 1]>,
    round: Round,
    /// The reply once the write round succeeds, decided with the writes (none for the counter
    /// commands, whose reply is the value the write answers); in the explaining round, the
    /// error to give if the read does not explain the refusal.
    then: Option<RespValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Round {
    NotStarted,
    Reads,
    Writes,
    /// A read after a refused increment, to word the error as Redis does (module docs).
    Explain,
}

/// How a SET-like write expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SetExpiry {
    /// No option: the bucket's default (none for the `redis` bucket), which clears a key's
    /// expiry as Redis's SET does.
    Default,
    /// This expiry.
    Given(Expiry),
    /// `KEEPTTL`: whatever the key has.
    Keep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cond {
    /// Only if the key is missing.
    Nx,
    /// Only if the key exists.
    Xx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SetReply {
    /// `+OK`, or nil when the condition failed.
    Ok,
    /// The old value (`SET ... GET`).
    Old,
    /// `:1` if written, `:0` if not (`SETNX`).
    Int,
}

/// `EXPIRE` conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ExpireCond {
    Nx,
    Xx,
    Gt,
    Lt,
}

/// The new expiry of `EXPIRE` and friends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum When {
    /// Milliseconds from now (may be zero or negative: the key expires at once).
    In(i64),
    /// Unix milliseconds.
    At(i64),
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Op {
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
    SAdd {
        key: Bytes,
        members: Vec<Bytes>,
    },
    SRem {
        key: Bytes,
        members: Vec<Bytes>,
    },
    SRead {
        key: Bytes,
        what: SRead,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HSetReply {
    /// HSET: how many fields were added.
    Added,
    /// HMSET: `+OK`.
    Ok,
    /// HSETNX: `:1` if the field was new and set, `:0` if it existed.
    IfNew,
}

/// The whole-hash reads.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HRead {
    All,
    Keys,
    Values,
    Len,
    Exists(Bytes),
}

/// The set reads.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SRead {
    /// SMEMBERS.
    Members,
    /// SCARD.
    Card,
    /// SISMEMBER.
    IsMember(Bytes),
    /// SMISMEMBER.
    MIsMember(Vec<Bytes>),
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

/// An APPLY of `ops` on the convergent `crdt` under `key`, answering the value after them if
/// `return_value`. No operation id: a Redis client's retry is a new command.
fn apply(key: Bytes, crdt: CrdtType, ops: Vec<CrdtOp>, return_value: bool) -> KeyRequest {
    let apply = Apply {
        bucket: Bytes::from_static(RESP_BUCKET),
        key,
        crdt,
        ops,
        op_id: None,
        return_value,
        w: None,
        dw: None,
        timeout_ms: None,
    };
    KeyRequest::new(KeyBody::Apply(apply), PARTITIONS)
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
    pub(super) fn new(op: Op) -> Script {
        Script {
            op,
            found: SmallVec::new(),
            round: Round::NotStarted,
            then: None,
        }
    }

    /// The keys (in [`RESP_BUCKET`]) the script reads or writes. Asked before
    /// [`Script::start`]: a SET that needs no read moves its key into its write there.
    pub fn keys(&self) -> impl Iterator<Item = &Bytes> {
        debug_assert_eq!(
            self.round,
            Round::NotStarted,
            "a script's keys before it starts"
        );
        // One shape for every command, so that asking costs no allocation: a list of keys, or
        // the keys of a list of pairs.
        let (keys, pairs): (&[Bytes], &[(Bytes, Bytes)]) = match &self.op {
            Op::MGet(keys) | Op::Exists(keys) | Op::Del(keys) => (keys, &[]),
            Op::MSet(pairs) => (&[], pairs),
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
            | Op::HIncrBy { key, .. }
            | Op::SAdd { key, .. }
            | Op::SRem { key, .. }
            | Op::SRead { key, .. } => (std::slice::from_ref(key), &[]),
        };
        keys.iter().chain(pairs.iter().map(|(k, _)| k))
    }

    /// The first round, pushed onto `batch`: the reads the command decides on, or its writes
    /// when it needs no read.
    pub fn start(&mut self, batch: &mut Vec<KeyRequest>) -> Step {
        assert_eq!(self.round, Round::NotStarted, "a script starts once");
        let before = batch.len();
        let then = match &self.op {
            // Without GET or KEEPTTL nothing needs a read: NX and XX are conditions the key's
            // first home checks (module docs).
            Op::Set {
                reply: SetReply::Ok | SetReply::Int,
                expiry,
                ..
            } if *expiry != SetExpiry::Keep => {
                let (expiry, then) = self.set_parts(&Found::Missing, None);
                let Op::Set {
                    key, value, cond, ..
                } = &mut self.op
                else {
                    unreachable!("a SET")
                };
                // The write is the script's only round and nothing reads its key or value after
                // it: they move into the request, which spares a count up and down on the
                // connection's buffer each (shared, so atomic).
                batch.push(put_if(
                    std::mem::take(key),
                    std::mem::take(value),
                    expiry,
                    *cond,
                ));
                Some(Some(then))
            }
            Op::MSet(pairs) => {
                batch.extend(pairs.iter().map(|(k, v)| put(k.clone(), v.clone(), None)));
                Some(Some(ok()))
            }
            // Counters are convergent: an increment is one operation the coordinator applies to
            // what it holds, with no read first, and answers the value after it.
            Op::Incr { key, by } => {
                batch.push(apply(
                    key.clone(),
                    CrdtType::Counter,
                    vec![CrdtOp::Increment(*by)],
                    true,
                ));
                Some(None)
            }
            Op::HIncrBy { key, field, by } => {
                batch.push(apply(
                    key.clone(),
                    CrdtType::Map,
                    vec![CrdtOp::Field {
                        name: field.clone(),
                        op: FieldOp::Increment(*by),
                    }],
                    true,
                ));
                Some(None)
            }
            // HMSET answers OK whatever was there: the node refuses a key of another type.
            Op::HSet {
                key,
                pairs,
                reply: HSetReply::Ok,
            } => {
                batch.push(assign(key, pairs));
                Some(Some(ok()))
            }
            _ => None,
        };
        match then {
            Some(then) => {
                self.round = Round::Writes;
                self.then = then;
            }
            None => {
                match &mut self.op {
                    // A GET reads nothing of its key after its read: the key moves into the
                    // request, as a SET's does above.
                    Op::Get(key) => batch.push(get(std::mem::take(key))),
                    _ => batch.extend(self.keys().cloned().map(get)),
                }
                self.round = Round::Reads;
            }
        }
        Step::Run(batch.len() - before)
    }

    /// Takes the replies of the round [`Script::start`] or the previous `resume` asked for, in
    /// request order, at `now_ms` (Unix milliseconds): the next round (pushed onto `batch`), or
    /// the reply. A read's value moves out of its reply (a GET's on into the reply it makes):
    /// each copy of a cached value's handle is an atomic count up and one down again.
    pub fn resume(
        &mut self,
        replies: &mut [Message],
        now_ms: u64,
        batch: &mut Vec<KeyRequest>,
    ) -> Step {
        match self.round {
            Round::NotStarted => unreachable!("resume follows start"),
            Round::Writes => self.after_writes(replies, batch),
            Round::Explain => Step::Done(self.explain(replies)),
            Round::Reads => {
                if let Some(e) = replies.iter().find_map(error_of) {
                    return Step::Done(e);
                }
                let mut found = SmallVec::with_capacity(replies.len());
                for reply in replies {
                    match found_of(reply) {
                        Ok(f) => found.push(f),
                        Err(e) => return Step::Done(e),
                    }
                }
                self.found = found;
                match self.after_reads(now_ms) {
                    Ok(reply) => Step::Done(reply),
                    Err((writes, then)) => {
                        self.round = Round::Writes;
                        self.then = Some(then);
                        let n = writes.len();
                        batch.extend(writes);
                        Step::Run(n)
                    }
                }
            }
        }
    }

    /// The reply once the write round answered: refusals as Redis words them, the counter
    /// commands' new value, or the reply decided with the writes.
    fn after_writes(&mut self, replies: &[Message], batch: &mut Vec<KeyRequest>) -> Step {
        if let Op::Set { reply, .. } = &self.op
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
        let refused = replies.iter().find_map(|r| match r {
            Message::Error(e) => Some((r, e)),
            _ => None,
        });
        if let Some((reply, e)) = refused {
            // The node's invalid_request for an increment is an overflow (or a bucket that takes
            // no counters), worded for a person: Redis's text is the same with `ERR`.
            let own = || err(format!("ERR {}", e.message));
            return match (&self.op, e.code) {
                // A plain value that is not an integer, or a key of another type: the read says.
                (Op::Incr { key, .. }, ErrorCode::WrongType) => {
                    let key = key.clone();
                    self.explain_with(key, err(WRONGTYPE), batch)
                }
                (Op::Incr { .. }, ErrorCode::InvalidRequest) => Step::Done(own()),
                // A field that is not an integer, or an overflow: the read says.
                (Op::HIncrBy { key, .. }, ErrorCode::InvalidRequest) => {
                    let key = key.clone();
                    let otherwise = own();
                    self.explain_with(key, otherwise, batch)
                }
                _ => Step::Done(error_of(reply).expect("an error reply is an error")),
            };
        }
        Step::Done(match &self.op {
            Op::Incr { .. } => match replies.first() {
                Some(Message::ApplyOk(ApplyOk {
                    value: Some(CrdtValue::Counter(n)),
                })) => RespValue::Integer(*n),
                other => unexpected(other),
            },
            Op::HIncrBy { field, .. } => match replies.first() {
                Some(Message::ApplyOk(ApplyOk {
                    value: Some(CrdtValue::Map(fields)),
                })) => match self::field(fields, field) {
                    Some(FieldValue::Counter(n)) => RespValue::Integer(*n),
                    _ => err("ERR the field is not a counter after HINCRBY"),
                },
                other => unexpected(other),
            },
            _ => self
                .then
                .take()
                .expect("a write round was started with its reply"),
        })
    }

    /// Starts the explaining round: a read of `key`, and `otherwise` as the error to give if it
    /// does not explain the refusal.
    fn explain_with(
        &mut self,
        key: Bytes,
        otherwise: RespValue,
        batch: &mut Vec<KeyRequest>,
    ) -> Step {
        self.round = Round::Explain;
        self.then = Some(otherwise);
        batch.push(get(key));
        Step::Run(1)
    }

    /// The error of a refused increment, by what the key holds now.
    fn explain(&mut self, replies: &mut [Message]) -> RespValue {
        let otherwise = self
            .then
            .take()
            .expect("the explaining round was started with its error");
        let Some(Ok(found)) = replies.first_mut().map(found_of) else {
            return otherwise;
        };
        match &self.op {
            Op::Incr { .. } if matches!(found, Found::Str(..)) => err(NOT_AN_INTEGER),
            Op::HIncrBy { field, .. } => match found.hash() {
                Ok(hash)
                    if self::field(hash, field).is_some_and(|v| integer(Some(v)).is_none()) =>
                {
                    err("ERR hash value is not an integer")
                }
                _ => otherwise,
            },
            _ => otherwise,
        }
    }

    fn first(&self) -> &Found {
        self.found.first().unwrap_or(&Found::Missing)
    }

    /// [`Script::first`], taken: what is left in its place is `Missing`.
    fn take_first(&mut self) -> Found {
        self.found
            .first_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The reply once the reads ran, or (`Err`) the writes still to make and the reply once
    /// they succeed.
    fn after_reads(&mut self, now_ms: u64) -> Result<RespValue, (Vec<KeyRequest>, RespValue)> {
        match &self.op {
            Op::Get(_)
            | Op::MGet(_)
            | Op::Exists(_)
            | Op::Type(_)
            | Op::Del(_)
            | Op::GetDel(_)
            | Op::GetEx { .. } => self.string_after_reads(),
            Op::Set { .. } => self.set_after_read(),
            Op::Ttl { .. } | Op::Expire { .. } | Op::Persist(_) => {
                self.expiry_after_read(i64::try_from(now_ms).unwrap_or(i64::MAX))
            }
            Op::HSet { .. } | Op::HGet { .. } | Op::HRead { .. } | Op::HDel { .. } => {
                self.hash_after_read()
            }
            Op::SAdd { .. } | Op::SRem { .. } | Op::SRead { .. } => self.members_after_read(),
            Op::MSet(_) | Op::Incr { .. } | Op::HIncrBy { .. } => {
                unreachable!("writes without reading")
            }
        }
    }

    /// [`Script::after_reads`] of the string commands other than SET.
    fn string_after_reads(&mut self) -> Result<RespValue, (Vec<KeyRequest>, RespValue)> {
        if let Op::Get(_) = self.op {
            // The value moves on into the reply (`resume`).
            return Ok(string_or_nil(or_reply!(self.take_first().into_string())));
        }
        let first = self.first();
        match &self.op {
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
            // Redis's INCR makes a string: a counter is one to Redis clients.
            Op::Type(_) => Ok(RespValue::Simple(Bytes::from_static(match first {
                Found::Missing => b"none",
                Found::Str(..) | Found::Counter(..) => b"string",
                Found::Set(..) => b"set",
                Found::Hash(..) => b"hash",
            }))),
            Op::Del(keys) => Err((
                keys.iter().cloned().map(delete).collect(),
                RespValue::Integer(count(&self.found)),
            )),
            Op::GetDel(key) => match or_reply!(first.string()) {
                None => Ok(RespValue::Null),
                Some(value) => Err((vec![delete(key.clone())], RespValue::Bulk(value))),
            },
            // A string is written back with the new expiry, a counter's expiry register set.
            Op::GetEx { key, expiry } => match (or_reply!(first.string()), expiry) {
                (Some(value), Some(e)) => {
                    Err((vec![first.rewrite(key, *e)], RespValue::Bulk(value)))
                }
                (value, _) => Ok(string_or_nil(value)),
            },
            _ => unreachable!("a string command"),
        }
    }

    /// [`Script::after_reads`] of SET and its variants.
    fn set_after_read(&self) -> Result<RespValue, (Vec<KeyRequest>, RespValue)> {
        let first = self.first();
        match &self.op {
            Op::Set { cond, reply, .. } => {
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
                        SetReply::Old => string_or_nil(old.clone()),
                        SetReply::Int => RespValue::Integer(0),
                    });
                }
                Err(self.set_write(first, old))
            }
            _ => unreachable!("a SET"),
        }
    }

    /// A SET's write, with the expiry it keeps from `found` (KEEPTTL), and the reply once it
    /// succeeds (`old`: the value GET asked for).
    fn set_write(&self, found: &Found, old: Option<Bytes>) -> (Vec<KeyRequest>, RespValue) {
        let (expiry, then) = self.set_parts(found, old);
        let Op::Set {
            key, value, cond, ..
        } = &self.op
        else {
            unreachable!("a SET")
        };
        (
            vec![put_if(key.clone(), value.clone(), expiry, *cond)],
            then,
        )
    }

    /// A SET's expiry, keeping `found`'s for KEEPTTL, and its reply once the write succeeds.
    fn set_parts(&self, found: &Found, old: Option<Bytes>) -> (Option<Expiry>, RespValue) {
        let Op::Set { expiry, reply, .. } = &self.op else {
            unreachable!("a SET")
        };
        let expiry = match expiry {
            SetExpiry::Default => None,
            SetExpiry::Given(e) => Some(*e),
            SetExpiry::Keep => keep(found),
        };
        let then = match reply {
            SetReply::Ok => ok(),
            SetReply::Old => string_or_nil(old),
            SetReply::Int => RespValue::Integer(1),
        };
        (expiry, then)
    }

    /// [`Script::after_reads`] of the expiry commands, at `now` (Unix ms).
    fn expiry_after_read(&self, now: i64) -> Result<RespValue, (Vec<KeyRequest>, RespValue)> {
        let first = self.first();
        match &self.op {
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
                    return Err((vec![delete(key.clone())], RespValue::Integer(1)));
                }
                let expiry = match *when {
                    When::In(ms) => Expiry::Ttl { ms: ms as u64 },
                    When::At(ms) => Expiry::At { unix_ms: ms as u64 },
                };
                Err((vec![first.rewrite(key, expiry)], RespValue::Integer(1)))
            }
            Op::Persist(key) => match first.expires() {
                Some(Some(_)) => Err((
                    vec![first.rewrite(key, Expiry::Never)],
                    RespValue::Integer(1),
                )),
                _ => Ok(RespValue::Integer(0)),
            },
            _ => unreachable!("an expiry command"),
        }
    }

    /// [`Script::after_reads`] of the hash commands.
    fn hash_after_read(&self) -> Result<RespValue, (Vec<KeyRequest>, RespValue)> {
        let first = self.first();
        match &self.op {
            Op::HSet { key, pairs, reply } => {
                let fields = or_reply!(first.hash());
                if *reply == HSetReply::IfNew
                    && pairs.iter().any(|(f, _)| field(fields, f).is_some())
                {
                    return Ok(RespValue::Integer(0));
                }
                let then = match reply {
                    HSetReply::Added => {
                        let names: BTreeSet<&Bytes> = pairs.iter().map(|(f, _)| f).collect();
                        let added = names
                            .into_iter()
                            .filter(|f| field(fields, f).is_none())
                            .count();
                        RespValue::Integer(added as i64)
                    }
                    HSetReply::IfNew => RespValue::Integer(1),
                    HSetReply::Ok => unreachable!("HMSET writes without reading"),
                };
                Err((vec![assign(key, pairs)], then))
            }
            Op::HGet { fields, array, .. } => {
                let hash = or_reply!(first.hash());
                let values: Vec<RespValue> = fields
                    .iter()
                    .map(|f| field(hash, f).map_or(RespValue::Null, |v| RespValue::Bulk(v.clone())))
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
                    HRead::Exists(name) => {
                        RespValue::Integer(i64::from(field(hash, name).is_some()))
                    }
                })
            }
            // The read counts the fields that existed; once it found one, the write removes
            // every field named (what the coordinator has seen of each: a field the read missed
            // goes too, as the client asked).
            Op::HDel { key, fields } => {
                let hash = or_reply!(first.hash());
                let names: BTreeSet<&Bytes> = fields.iter().collect();
                let existing = names.iter().filter(|f| field(hash, f).is_some()).count();
                if existing == 0 {
                    return Ok(RespValue::Integer(0));
                }
                let ops = names
                    .into_iter()
                    .map(|f| CrdtOp::RemoveField(f.clone()))
                    .collect();
                Err((
                    vec![apply(key.clone(), CrdtType::Map, ops, false)],
                    RespValue::Integer(existing as i64),
                ))
            }
            _ => unreachable!("a hash command"),
        }
    }

    /// [`Script::after_reads`] of the set commands.
    fn members_after_read(&self) -> Result<RespValue, (Vec<KeyRequest>, RespValue)> {
        let first = self.first();
        let set = or_reply!(first.set());
        // In byte order (GET_OK's elements are), so members are found by binary search.
        let has = |m: &Bytes| set.binary_search(m).is_ok();
        let flag = |b: bool| RespValue::Integer(i64::from(b));
        match &self.op {
            // The reply counts the members the read did not find: the APPLY's answer is the set
            // after the adds, which holds every member named whether it was new or not. The adds
            // are written whatever the read found, so a member a stale read saw is added again
            // (an add the coordinator has not seen removed survives a concurrent remove).
            Op::SAdd { key, members } => {
                let named: BTreeSet<&Bytes> = members.iter().collect();
                let added = named.iter().filter(|m| !has(m)).count();
                let ops = named.into_iter().map(|m| CrdtOp::Add(m.clone())).collect();
                Err((
                    vec![apply(key.clone(), CrdtType::Set, ops, false)],
                    RespValue::Integer(added as i64),
                ))
            }
            // As HDEL: the read counts; once it found a member, every member named is removed.
            Op::SRem { key, members } => {
                let named: BTreeSet<&Bytes> = members.iter().collect();
                let removed = named.iter().filter(|m| has(m)).count();
                if removed == 0 {
                    return Ok(RespValue::Integer(0));
                }
                let ops = named
                    .into_iter()
                    .map(|m| CrdtOp::Remove(m.clone()))
                    .collect();
                Err((
                    vec![apply(key.clone(), CrdtType::Set, ops, false)],
                    RespValue::Integer(removed as i64),
                ))
            }
            Op::SRead { what, .. } => Ok(match what {
                SRead::Members => {
                    RespValue::Array(set.iter().cloned().map(RespValue::Bulk).collect())
                }
                SRead::Card => RespValue::Integer(set.len() as i64),
                SRead::IsMember(m) => flag(has(m)),
                SRead::MIsMember(ms) => RespValue::Array(ms.iter().map(|m| flag(has(m))).collect()),
            }),
            _ => unreachable!("a set command"),
        }
    }
}

/// The APPLY that assigns a hash's fields (register fields of the convergent map, each last
/// write wins; an assignment replaces a counter field, as HSET replaces a value HINCRBY made).
fn assign(key: &Bytes, pairs: &[(Bytes, Bytes)]) -> KeyRequest {
    let ops = pairs
        .iter()
        .map(|(name, value)| CrdtOp::Field {
            name: name.clone(),
            op: FieldOp::Assign(value.clone()),
        })
        .collect();
    apply(key.clone(), CrdtType::Map, ops, false)
}

/// What a read found under a key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Found {
    /// Nothing (or only expired or deleted versions).
    #[default]
    Missing,
    /// A string, and its expiry.
    Str(Bytes, Option<u64>),
    /// A counter's value, and its expiry.
    Counter(i64, Option<u64>),
    /// A set's members in byte order, and its expiry.
    Set(Vec<Bytes>, Option<u64>),
    /// A hash's fields in name order as Redis shows them, and its expiry.
    Hash(Vec<(Bytes, Bytes)>, Option<u64>),
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

impl Found {
    fn is_missing(&self) -> bool {
        *self == Found::Missing
    }

    /// [`Found::string`], moving the value out.
    fn into_string(self) -> Result<Option<Bytes>, RespValue> {
        match self {
            Found::Str(v, _) => Ok(Some(v)),
            other => other.string(),
        }
    }

    /// The string, `None` if missing; a counter reads as its decimal value (Redis's INCR makes
    /// a string); a set or a hash is a `WRONGTYPE` error.
    fn string(&self) -> Result<Option<Bytes>, RespValue> {
        match self {
            Found::Missing => Ok(None),
            Found::Str(v, _) => Ok(Some(v.clone())),
            Found::Counter(n, _) => Ok(Some(Bytes::from(n.to_string()))),
            Found::Set(..) | Found::Hash(..) => Err(err(WRONGTYPE)),
        }
    }

    /// The hash's fields, empty if missing; another type is a `WRONGTYPE` error.
    fn hash(&self) -> Result<&[(Bytes, Bytes)], RespValue> {
        match self {
            Found::Missing => Ok(&[]),
            Found::Hash(fields, _) => Ok(fields),
            Found::Str(..) | Found::Counter(..) | Found::Set(..) => Err(err(WRONGTYPE)),
        }
    }

    /// The set's members, empty if missing; another type is a `WRONGTYPE` error.
    fn set(&self) -> Result<&[Bytes], RespValue> {
        match self {
            Found::Missing => Ok(&[]),
            Found::Set(members, _) => Ok(members),
            Found::Str(..) | Found::Counter(..) | Found::Hash(..) => Err(err(WRONGTYPE)),
        }
    }

    /// The key's expiry (`Some(None)`: none), or `None` if the key is missing.
    fn expires(&self) -> Option<Option<u64>> {
        match self {
            Found::Missing => None,
            Found::Str(_, e) | Found::Counter(_, e) | Found::Set(_, e) | Found::Hash(_, e) => {
                Some(*e)
            }
        }
    }

    /// The write that gives the key found a new expiry: the string written back, or the
    /// expiry register of the convergent type set (an APPLY of the key's type, so that it
    /// changes nothing else).
    fn rewrite(&self, key: &Bytes, expiry: Expiry) -> KeyRequest {
        let crdt = match self {
            Found::Str(value, _) => return put(key.clone(), value.clone(), Some(expiry)),
            Found::Counter(..) => CrdtType::Counter,
            Found::Set(..) => CrdtType::Set,
            Found::Hash(..) => CrdtType::Map,
            Found::Missing => unreachable!("a missing key gets no new expiry"),
        };
        apply(key.clone(), crdt, vec![CrdtOp::Expire(expiry)], false)
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

/// The value of field `name` of a hash's or a map's fields (in name order).
fn field<'a, V>(hash: &'a [(Bytes, V)], name: &Bytes) -> Option<&'a V> {
    hash.binary_search_by(|(f, _)| f.cmp(name))
        .ok()
        .map(|i| &hash[i].1)
}

/// The RESP error for an error reply; a key of another type is Redis's own `WRONGTYPE`, which
/// clients recognise.
fn error_of(reply: &Message) -> Option<RespValue> {
    match reply {
        Message::Error(e) if e.code == ErrorCode::WrongType => Some(err(WRONGTYPE)),
        Message::Error(e) => Some(err(format!("ERR {}: {}", e.code, e.message))),
        _ => None,
    }
}

fn unexpected(reply: Option<&Message>) -> RespValue {
    err(format!(
        "ERR unexpected reply {}",
        reply.map_or("(none)", |r| r.kind().name())
    ))
}

/// A map field as a Redis hash shows it: a register's value, a counter's decimal value (as
/// HINCRBY leaves a field in Redis). Set and flag fields, which only ringkv's own clients make,
/// have no Redis form and are not shown.
fn hash_field((name, value): &(Bytes, FieldValue)) -> Option<(Bytes, Bytes)> {
    match value {
        FieldValue::Register(v) => Some((name.clone(), v.clone())),
        FieldValue::Counter(n) => Some((name.clone(), Bytes::from(n.to_string()))),
        FieldValue::Set(_) | FieldValue::Flag => None,
    }
}

/// What a GET reply found for Redis: the convergent value, or the last value sibling, and the
/// key's expiry.
fn found_of(reply: &mut Message) -> Result<Found, RespValue> {
    match reply {
        Message::GetOk(ok) => {
            let expires = ok.expires_at_ms;
            match &ok.crdt {
                Some(CrdtValue::Counter(n)) => return Ok(Found::Counter(*n, expires)),
                Some(CrdtValue::Set(members)) => {
                    // In byte order, so members are found by binary search.
                    debug_assert!(members.windows(2).all(|w| w[0] < w[1]));
                    return Ok(Found::Set(members.clone(), expires));
                }
                Some(CrdtValue::Map(fields)) => {
                    // In name order, so fields are found by binary search.
                    debug_assert!(fields.windows(2).all(|w| w[0].0 < w[1].0));
                    return Ok(Found::Hash(
                        fields.iter().filter_map(hash_field).collect(),
                        expires,
                    ));
                }
                None => {}
            }
            Ok(ok
                .siblings
                .iter_mut()
                .rev()
                .find_map(|s| match s {
                    Sibling::Value(v) => Some(std::mem::take(v)),
                    Sibling::Tombstone => None,
                })
                .map_or(Found::Missing, |v| Found::Str(v, ok.expires_at_ms)))
        }
        other => Err(unexpected(Some(other))),
    }
}
