//! The RESP commands' plans and scripts, driven by hand: immediate replies and refusals, and
//! each script's requests and reply against a scripted store.
#![allow(clippy::unwrap_used)]
use ringkv_net::resp::{RespLimits, decode_command};
use ringkv_net::{
    ApplyOk, CrdtOp, CrdtType, CrdtValue, ErrorBody, FieldOp, FieldValue, GetOk, PutOk,
};

use super::*;
use ringkv_core::request::{KeyBody, KeyRequest};
use ringkv_net::{Condition, ErrorCode, Message, Sibling};

fn cmd(line: &str) -> RespCommand {
    decode_command(format!("{line}\r\n").as_bytes(), &RespLimits::DEFAULT)
        .unwrap()
        .unwrap()
        .0
}

fn plan_of(line: &str) -> RespPlan {
    plan(cmd(line), &mut RespState::new(7))
}

fn found(v: &'static [u8], expires_at_ms: Option<u64>) -> Message {
    Message::GetOk(GetOk {
        siblings: vec![Sibling::Value(Bytes::from_static(v))],
        context: Bytes::new(),
        expires_at_ms,
        fields: None,
        crdt: None,
    })
}

fn missing() -> Message {
    Message::GetOk(GetOk {
        siblings: vec![],
        context: Bytes::new(),
        expires_at_ms: None,
        fields: None,
        crdt: None,
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
    // The batch holds another command's request first, as a wave's does: a script pushes its
    // own after it, says how many, and leaves the rest alone.
    let other = || {
        KeyRequest::new(
            KeyBody::Delete(ringkv_net::Delete {
                bucket: Bytes::from_static(RESP_BUCKET),
                key: Bytes::from_static(b"another command's key"),
                context: None,
                w: None,
                dw: None,
                timeout_ms: None,
            }),
            crate::route::PARTITIONS,
        )
    };
    let mut batch = vec![other()];
    let mut step = s.start(&mut batch);
    loop {
        match step {
            Step::Done(v) => {
                assert_eq!(
                    batch,
                    vec![other()],
                    "{line}: a finished script pushed nothing"
                );
                return (v, rounds);
            }
            Step::Run(n) => {
                assert_eq!(batch.len(), 1 + n, "{line}: pushed what it says");
                assert_eq!(batch[0], other(), "{line}: the batch's other request");
                let requests = batch.split_off(1);
                let mut replies: Vec<Message> = requests.iter().map(&mut answer).collect();
                rounds.push(requests.iter().map(|r| r.body().clone()).collect());
                step = s.resume(&mut replies, now, &mut batch);
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
        KeyBody::Update(u) => panic!("the RESP layer sends no UPDATE: {u:?}"),
        KeyBody::Apply(_) => Message::ApplyOk(ApplyOk { value: None }),
    }
}

/// A store of one key that answers reads with `read` and APPLY with `applied`, and
/// acknowledges other writes.
fn store(read: Message, applied: Message) -> impl FnMut(&KeyRequest) -> Message {
    move |r| match r.body() {
        KeyBody::Get(_) => read.clone(),
        KeyBody::Put(_) => put_ok(),
        KeyBody::Delete(_) => Message::DeleteOk,
        KeyBody::Update(u) => panic!("the RESP layer sends no UPDATE: {u:?}"),
        KeyBody::Apply(_) => applied.clone(),
    }
}

/// A read of a convergent value with its expiry.
fn crdt(value: CrdtValue, expires_at_ms: Option<u64>) -> Message {
    Message::GetOk(GetOk {
        siblings: vec![],
        context: Bytes::new(),
        expires_at_ms,
        fields: None,
        crdt: Some(value),
    })
}

fn apply_ok(value: Option<CrdtValue>) -> Message {
    Message::ApplyOk(ApplyOk { value })
}

fn refused(code: ErrorCode, message: &str) -> Message {
    Message::Error(ErrorBody::new(code, message))
}

/// The type, operations and `return_value` of an APPLY.
fn apply_of(body: &KeyBody) -> (CrdtType, Vec<CrdtOp>, bool) {
    match body {
        KeyBody::Apply(a) => {
            assert_eq!(&a.bucket[..], RESP_BUCKET);
            assert_eq!(a.op_id, None);
            (a.crdt, a.ops.clone(), a.return_value)
        }
        other => panic!("not an apply: {other:?}"),
    }
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

fn condition_of(body: &KeyBody) -> Option<Condition> {
    match body {
        KeyBody::Put(p) => p.condition,
        other => panic!("not a put: {other:?}"),
    }
}

/// A put's key and value.
fn written(body: &KeyBody) -> (&[u8], &[u8]) {
    match body {
        KeyBody::Put(p) => (&p.key, &p.value),
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
        plan(cmd("CLIENT GETNAME"), &mut state),
        RespPlan::Reply(RespValue::Null)
    );
    assert_eq!(
        plan(cmd("CLIENT SETNAME web-1"), &mut state),
        RespPlan::Reply(ok())
    );
    assert_eq!(
        plan(cmd("CLIENT GETNAME"), &mut state),
        RespPlan::Reply(RespValue::Bulk(Bytes::from_static(b"web-1")))
    );
    assert_eq!(
        plan(cmd("CLIENT ID"), &mut state),
        RespPlan::Reply(RespValue::Integer(42))
    );
    assert_eq!(
        plan(cmd("CLIENT SETINFO LIB-NAME redis-py"), &mut state),
        RespPlan::Reply(ok())
    );
    let RespPlan::Reply(RespValue::Array(hello)) =
        plan(cmd("HELLO 2 AUTH default x SETNAME other"), &mut state)
    else {
        panic!("HELLO 2 answers its map as an array")
    };
    assert!(hello.contains(&RespValue::Integer(42)));
    assert_eq!(
        plan(cmd("CLIENT GETNAME"), &mut state),
        RespPlan::Reply(RespValue::Bulk(Bytes::from_static(b"other")))
    );
    assert!(matches!(
        plan(cmd("CLIENT SETNAME has\tspace"), &mut state),
        RespPlan::Reply(RespValue::Error(_))
    ));
}

/// Plain SET writes at once, with its expiry as a time to live for the coordinator to
/// stamp; SET NX is one conditional write, decided by the key's first home; KEEPTTL reads
/// first and writes the key's expiry back as an absolute time.
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
    // Every form writes the command's key and value, whether they move into the write (no
    // read first) or are copied to it after a read.
    for line in [
        "SET k v",
        "SET k v NX EX 5",
        "SET k v XX GET",
        "SET k v KEEPTTL",
        "SETNX k v",
        "PSETEX k 1500 v",
        "SETEX k 2 v",
    ] {
        let (_, rounds) = script(line, 0, holding(Some((b"old", None))));
        let write = rounds.last().and_then(|r| r.first()).expect("a write");
        assert_eq!(written(write), (&b"k"[..], &b"v"[..]), "{line}");
    }
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
    // A key named twice is read, deleted and counted once.
    let (reply, rounds) = script("DEL a a", 0, |r| match r.body() {
        KeyBody::Get(_) => found(b"x", None),
        _ => Message::DeleteOk,
    });
    assert_eq!(reply, RespValue::Integer(1));
    assert_eq!((rounds[0].len(), rounds[1].len()), (1, 1));
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
    // A key named twice is written once, with its last value.
    let (reply, rounds) = script("MSET a 1 b 2 a 3", 0, holding(None));
    assert_eq!(reply, ok());
    let written: Vec<(Bytes, Bytes)> = rounds[0]
        .iter()
        .map(|body| match body {
            KeyBody::Put(p) => (p.key.clone(), p.value.clone()),
            other => panic!("MSET sent {other:?}"),
        })
        .collect();
    assert_eq!(
        written,
        [
            (Bytes::from_static(b"a"), Bytes::from_static(b"3")),
            (Bytes::from_static(b"b"), Bytes::from_static(b"2")),
        ]
    );
    let (reply, _) = script("GET a", 0, |_| {
        Message::Error(ErrorBody::new(ErrorCode::Timeout, "slow"))
    });
    assert!(error_text(&reply).starts_with("ERR timeout"), "{reply:?}");
}

/// INCR and its variants are one APPLY of an increment on a counter, with no read: the node
/// makes the counter (from nothing, or from a string holding an integer) and answers its value,
/// which is the reply. A refusal is worded as Redis words it: `wrong_type` is a string that is
/// not an integer or a key of another type, which a read decides; an overflow is Redis's text.
#[test]
fn increments_are_counter_operations() {
    let (reply, rounds) = script(
        "INCRBY k 5",
        0,
        store(missing(), apply_ok(Some(CrdtValue::Counter(15)))),
    );
    assert_eq!(reply, RespValue::Integer(15));
    assert_eq!(rounds.len(), 1, "no read");
    assert_eq!(
        apply_of(&rounds[0][0]),
        (CrdtType::Counter, vec![CrdtOp::Increment(5)], true),
        "no expiry: the counter keeps its own"
    );
    for (line, by) in [("INCR k", 1), ("DECR k", -1), ("DECRBY k 7", -7)] {
        let (_, rounds) = script(
            line,
            0,
            store(missing(), apply_ok(Some(CrdtValue::Counter(0)))),
        );
        assert_eq!(
            apply_of(&rounds[0][0]).1,
            vec![CrdtOp::Increment(by)],
            "{line}"
        );
    }

    // A string that is not an integer: the node answers wrong_type, the read finds the string.
    let (reply, rounds) = script(
        "INCR k",
        0,
        store(
            found(b"abc", None),
            refused(ErrorCode::WrongType, "plain value"),
        ),
    );
    assert_eq!(
        error_text(&reply),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(rounds.len(), 2);
    assert!(
        matches!(rounds[1][0], KeyBody::Get(_)),
        "the explaining read"
    );
    // A key of another type: the read finds it, and the error stays WRONGTYPE.
    let set = crdt(CrdtValue::Set(vec![b("x")]), None);
    let (reply, _) = script(
        "INCR k",
        0,
        store(set, refused(ErrorCode::WrongType, "a set")),
    );
    assert!(error_text(&reply).starts_with("WRONGTYPE"), "{reply:?}");
    // An overflow is the node's invalid_request, in Redis's words.
    let (reply, rounds) = script(
        "INCR k",
        0,
        store(
            found(b"9223372036854775807", None),
            refused(
                ErrorCode::InvalidRequest,
                "increment or decrement would overflow",
            ),
        ),
    );
    assert_eq!(
        error_text(&reply),
        "ERR increment or decrement would overflow"
    );
    assert_eq!(rounds.len(), 1, "no read to explain an overflow");
    // Other failures keep the node's code.
    let (reply, _) = script(
        "INCR k",
        0,
        store(missing(), refused(ErrorCode::Timeout, "slow")),
    );
    assert_eq!(error_text(&reply), "ERR timeout: slow");
    assert!(error_text(&reply_of("INCRBY k x")).starts_with("ERR value is not an integer"));
    assert_eq!(
        error_text(&reply_of("DECRBY k -9223372036854775808")),
        "ERR decrement would overflow"
    );
}

/// A counter is a string to Redis clients: GET and MGET answer its decimal value, TYPE says
/// `string`; EXISTS and DEL count it, DEL and GETDEL delete it (a DELETE clears it), SET and
/// SET ... GET replace it; its expiry is its expiry register, which TTL reads and EXPIRE,
/// PERSIST and GETEX set with an APPLY of the counter type.
#[test]
fn counters_read_as_strings() {
    let counter = || store(crdt(CrdtValue::Counter(15), Some(9_000)), apply_ok(None));
    assert_eq!(script("GET k", 0, counter()).0, bulk(b"15"));
    assert_eq!(
        script("MGET k", 0, counter()).0,
        RespValue::Array(vec![bulk(b"15")])
    );
    assert_eq!(
        script("TYPE k", 0, counter()).0,
        RespValue::Simple(Bytes::from_static(b"string"))
    );
    assert_eq!(script("EXISTS k", 0, counter()).0, RespValue::Integer(1));
    let (reply, rounds) = script("DEL k", 0, counter());
    assert_eq!(reply, RespValue::Integer(1));
    assert!(matches!(rounds[1][0], KeyBody::Delete(_)));
    assert_eq!(
        script("PTTL k", 1_000, counter()).0,
        RespValue::Integer(8_000)
    );
    let (reply, rounds) = script("EXPIRE k 100", 1_000, counter());
    assert_eq!(reply, RespValue::Integer(1));
    assert_eq!(
        apply_of(&rounds[1][0]),
        (
            CrdtType::Counter,
            vec![CrdtOp::Expire(Expiry::Ttl { ms: 100_000 })],
            false
        )
    );
    let (_, rounds) = script("PERSIST k", 0, counter());
    assert_eq!(
        apply_of(&rounds[1][0]).1,
        vec![CrdtOp::Expire(Expiry::Never)]
    );
    let (reply, rounds) = script("PEXPIREAT k 5", 1_000, counter());
    assert_eq!(reply, RespValue::Integer(1));
    assert!(
        matches!(rounds[1][0], KeyBody::Delete(_)),
        "a past time deletes"
    );
    let (reply, rounds) = script("GETEX k EX 60", 0, counter());
    assert_eq!(reply, bulk(b"15"));
    assert_eq!(
        apply_of(&rounds[1][0]),
        (
            CrdtType::Counter,
            vec![CrdtOp::Expire(Expiry::Ttl { ms: 60_000 })],
            false
        )
    );
    let (reply, rounds) = script("GETDEL k", 0, counter());
    assert_eq!(reply, bulk(b"15"));
    assert!(matches!(rounds[1][0], KeyBody::Delete(_)));
    let (reply, rounds) = script("SET k v GET", 0, counter());
    assert_eq!(reply, bulk(b"15"));
    assert!(matches!(&rounds[1][0], KeyBody::Put(p) if &p.value[..] == b"v"));
    let (_, rounds) = script("SET k v KEEPTTL", 0, counter());
    assert_eq!(
        expiry_of(&rounds[1][0]),
        Some(Expiry::At { unix_ms: 9_000 })
    );
    // Hash and set commands on a counter are WRONGTYPE, by the read.
    for line in ["HGET k f", "HSET k f v", "SADD k m", "SMEMBERS k"] {
        let (reply, rounds) = script(line, 0, counter());
        assert!(
            error_text(&reply).starts_with("WRONGTYPE"),
            "{line}: {reply:?}"
        );
        assert_eq!(rounds.len(), 1, "{line}: nothing written");
    }
}

/// Sets are the convergent add-wins set. SADD and SREM read first, because their reply counts
/// the members that were (not) there and the APPLY's answer is the set after the operations;
/// SADD then adds every member named, SREM removes every member named once the read found one.
/// The reads answer from the set's members; another type is WRONGTYPE both ways.
#[test]
fn set_commands() {
    let xy = || {
        store(
            crdt(CrdtValue::Set(vec![b("x"), b("y")]), Some(5_000)),
            apply_ok(None),
        )
    };
    let (reply, rounds) = script("SADD s x z z", 0, xy());
    assert_eq!(reply, RespValue::Integer(1), "z is new, x was there");
    assert_eq!(
        apply_of(&rounds[1][0]),
        (
            CrdtType::Set,
            vec![CrdtOp::Add(b("x")), CrdtOp::Add(b("z"))],
            false
        )
    );
    let (reply, _) = script("SADD s a b", 0, store(missing(), apply_ok(None)));
    assert_eq!(reply, RespValue::Integer(2));
    let (reply, rounds) = script("SREM s x nope", 0, xy());
    assert_eq!(reply, RespValue::Integer(1));
    assert_eq!(
        apply_of(&rounds[1][0]).1,
        vec![CrdtOp::Remove(b("nope")), CrdtOp::Remove(b("x"))]
    );
    let (reply, rounds) = script("SREM s nope", 0, xy());
    assert_eq!(reply, RespValue::Integer(0));
    assert_eq!(rounds.len(), 1, "nothing to remove, nothing written");
    assert_eq!(
        script("SMEMBERS s", 0, xy()).0,
        RespValue::Array(vec![bulk(b"x"), bulk(b"y")])
    );
    assert_eq!(script("SCARD s", 0, xy()).0, RespValue::Integer(2));
    assert_eq!(script("SISMEMBER s y", 0, xy()).0, RespValue::Integer(1));
    assert_eq!(script("SISMEMBER s z", 0, xy()).0, RespValue::Integer(0));
    assert_eq!(
        script("SMISMEMBER s z x", 0, xy()).0,
        RespValue::Array(vec![RespValue::Integer(0), RespValue::Integer(1)])
    );
    assert_eq!(
        script("SMEMBERS none", 0, holding(None)).0,
        RespValue::Array(Vec::new())
    );
    assert_eq!(
        script("SCARD none", 0, holding(None)).0,
        RespValue::Integer(0)
    );
    assert_eq!(
        script("TYPE s", 0, xy()).0,
        RespValue::Simple(Bytes::from_static(b"set"))
    );
    assert_eq!(script("TTL s", 1_000, xy()).0, RespValue::Integer(4));
    let (_, rounds) = script("EXPIRE s 10", 0, xy());
    assert_eq!(
        apply_of(&rounds[1][0]),
        (
            CrdtType::Set,
            vec![CrdtOp::Expire(Expiry::Ttl { ms: 10_000 })],
            false
        )
    );
    // WRONGTYPE both ways: set commands on a string, string and hash commands on a set.
    for line in [
        "SADD k m",
        "SREM k m",
        "SMEMBERS k",
        "SCARD k",
        "SISMEMBER k m",
    ] {
        let (reply, rounds) = script(line, 0, holding(Some((b"v", None))));
        assert!(
            error_text(&reply).starts_with("WRONGTYPE"),
            "{line}: {reply:?}"
        );
        assert_eq!(rounds.len(), 1, "{line}: nothing written");
    }
    for line in [
        "GET s",
        "GETDEL s",
        "GETEX s PERSIST",
        "SET s v GET",
        "HGET s f",
        "HLEN s",
    ] {
        let (reply, _) = script(line, 0, xy());
        assert!(
            error_text(&reply).starts_with("WRONGTYPE"),
            "{line}: {reply:?}"
        );
    }
    assert_eq!(
        script("MGET s", 0, xy()).0,
        RespValue::Array(vec![RespValue::Null])
    );
    assert!(error_text(&reply_of("SADD s")).starts_with("ERR wrong number"));
    assert!(error_text(&reply_of("SISMEMBER s")).starts_with("ERR wrong number"));
}

/// A read of a hash: a convergent map of register fields.
fn hash(fields: &[(&'static [u8], &'static [u8])], expires_at_ms: Option<u64>) -> Message {
    crdt(
        CrdtValue::Map(
            fields
                .iter()
                .map(|(f, v)| {
                    (
                        Bytes::from_static(f),
                        FieldValue::Register(Bytes::from_static(v)),
                    )
                })
                .collect(),
        ),
        expires_at_ms,
    )
}

/// A store of one key holding a hash, answering reads and acknowledging writes (an APPLY of
/// the map type).
fn holding_hash(
    fields: &'static [(&'static [u8], &'static [u8])],
    expires_at_ms: Option<u64>,
) -> impl FnMut(&KeyRequest) -> Message {
    move |r| match r.body() {
        KeyBody::Get(_) => hash(fields, expires_at_ms),
        KeyBody::Apply(a) if a.crdt == CrdtType::Map => apply_ok(None),
        other => panic!("a hash command sent {other:?}"),
    }
}

fn ops_of(body: &KeyBody) -> Vec<CrdtOp> {
    let (crdt, ops, _) = apply_of(body);
    assert_eq!(crdt, CrdtType::Map);
    ops
}

fn assign(name: &'static str, value: &'static str) -> CrdtOp {
    CrdtOp::Field {
        name: b(name),
        op: FieldOp::Assign(b(value)),
    }
}

fn bulk(v: &'static [u8]) -> RespValue {
    RespValue::Bulk(Bytes::from_static(v))
}

/// Hash commands read the hash (a convergent map) and write only the fields they change (an
/// APPLY: each field a last-write-wins register); replies count as Redis counts; HMSET writes
/// without a read, the node refusing a key of another type; a string key is `WRONGTYPE` for
/// them, and a hash key for string commands.
#[test]
fn hash_commands() {
    const H: &[(&[u8], &[u8])] = &[(b"cart", b"3"), (b"user", b"alice")];
    let (reply, rounds) = script("HSET h user bob n 1", 0, holding_hash(H, None));
    assert_eq!(
        reply,
        RespValue::Integer(1),
        "one field added, one replaced"
    );
    assert_eq!(
        ops_of(&rounds[1][0]),
        vec![assign("user", "bob"), assign("n", "1")]
    );
    assert_eq!(
        script("HSETNX h user x", 0, holding_hash(H, None)).0,
        RespValue::Integer(0)
    );
    let (reply, rounds) = script("HSETNX h z x", 0, holding_hash(H, None));
    assert_eq!(reply, RespValue::Integer(1));
    assert_eq!(ops_of(&rounds[1][0]), vec![assign("z", "x")]);
    let (reply, rounds) = script("HMSET h a 1", 0, holding_hash(H, None));
    assert_eq!(reply, ok());
    assert_eq!(rounds.len(), 1, "HMSET writes without a read");
    assert_eq!(ops_of(&rounds[0][0]), vec![assign("a", "1")]);
    let (reply, _) = script("HMSET s a 1", 0, |_: &KeyRequest| {
        refused(
            ErrorCode::WrongType,
            "the key holds a plain value, not a map",
        )
    });
    assert!(error_text(&reply).starts_with("WRONGTYPE"), "{reply:?}");
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
        script("HVALS h", 0, holding_hash(H, None)).0,
        RespValue::Array(vec![bulk(b"3"), bulk(b"alice")])
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
        vec![
            CrdtOp::RemoveField(b("cart")),
            CrdtOp::RemoveField(b("nope"))
        ],
        "once one existed, every field named goes"
    );
    let (reply, rounds) = script("HDEL h nope", 0, holding_hash(H, None));
    assert_eq!(reply, RespValue::Integer(0));
    assert_eq!(rounds.len(), 1, "nothing to delete, nothing written");
    // Expiry on a hash is the map's expiry register.
    let (reply, rounds) = script("EXPIRE h 10", 0, holding_hash(H, None));
    assert_eq!(reply, RespValue::Integer(1));
    assert_eq!(
        ops_of(&rounds[1][0]),
        vec![CrdtOp::Expire(Expiry::Ttl { ms: 10_000 })]
    );
    assert_eq!(
        script("TTL h", 1_000, holding_hash(H, Some(5_000))).0,
        RespValue::Integer(4)
    );
    let (_, rounds) = script("PERSIST h", 0, holding_hash(H, Some(5_000)));
    assert_eq!(ops_of(&rounds[1][0]), vec![CrdtOp::Expire(Expiry::Never)]);
    assert_eq!(
        script("TYPE h", 0, holding_hash(H, None)).0,
        RespValue::Simple(Bytes::from_static(b"hash"))
    );
    for line in ["GET h", "GETDEL h", "SET h v GET", "SADD h m", "SCARD h"] {
        let (reply, _) = script(line, 0, holding_hash(H, None));
        assert!(
            error_text(&reply).starts_with("WRONGTYPE"),
            "{line}: {reply:?}"
        );
    }
    assert_eq!(
        script("MGET h", 0, holding_hash(H, None)).0,
        RespValue::Array(vec![RespValue::Null])
    );
    assert!(
        error_text(&script("HGET s f", 0, holding(Some((b"v", None)))).0).starts_with("WRONGTYPE")
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
        match plan(cmd, &mut RespState::new(1)) {
            RespPlan::Reply(v) => error_text(&v),
            other => panic!("not refused: {other:?}"),
        }
    };
    let long = vec![b'f'; FIELD_BYTES_MAX + 1];
    let refused = array(vec![b"HSET".to_vec(), b"h".to_vec(), long, b"v".to_vec()]);
    assert!(refused.contains("field name"), "{refused}");
    let mut many = vec![b"HSET".to_vec(), b"h".to_vec()];
    for i in 0..=CRDT_OPS_MAX {
        many.push(format!("f{i}").into_bytes());
        many.push(b"v".to_vec());
    }
    assert!(array(many).contains("at most"));
    let mut members = vec![b"SADD".to_vec(), b"s".to_vec()];
    members.extend((0..=CRDT_OPS_MAX).map(|i| format!("m{i}").into_bytes()));
    assert!(array(members).contains("members"));
}

/// HINCRBY is one APPLY of a counter field's increment, with no read, and answers the field's
/// value after it; a counter field reads as its decimal value, as in a Redis hash; fields of
/// kinds a Redis hash cannot hold are not shown. A refusal is worded as Redis words it: a field
/// that is not an integer, or an overflow, which a read decides; WRONGTYPE for another type.
#[test]
fn hincrby_is_a_counter_field() {
    let cart = CrdtValue::Map(vec![
        (b("cart"), FieldValue::Counter(7)),
        (b("user"), FieldValue::Register(b("alice"))),
    ]);
    let (reply, rounds) = script(
        "HINCRBY h cart 4",
        0,
        store(missing(), apply_ok(Some(cart.clone()))),
    );
    assert_eq!(reply, RespValue::Integer(7));
    assert_eq!(rounds.len(), 1, "no read");
    assert_eq!(
        apply_of(&rounds[0][0]),
        (
            CrdtType::Map,
            vec![CrdtOp::Field {
                name: b("cart"),
                op: FieldOp::Increment(4)
            }],
            true
        )
    );
    let mut shown = cart.clone();
    if let CrdtValue::Map(fields) = &mut shown {
        fields.push((b("vip"), FieldValue::Flag));
        fields.push((b("zz-tags"), FieldValue::Set(vec![b("a")])));
    }
    let read = || store(crdt(shown.clone(), None), apply_ok(None));
    assert_eq!(
        script("HGETALL h", 0, read()).0,
        RespValue::Array(vec![
            bulk(b"cart"),
            bulk(b"7"),
            bulk(b"user"),
            bulk(b"alice")
        ])
    );
    assert_eq!(script("HGET h cart", 0, read()).0, bulk(b"7"));
    assert_eq!(script("HLEN h", 0, read()).0, RespValue::Integer(2));
    assert_eq!(script("HEXISTS h vip", 0, read()).0, RespValue::Integer(0));
    // HSET over a counter field replaces it: it existed, so it is not counted as new.
    let (reply, rounds) = script("HSET h cart 1", 0, read());
    assert_eq!(reply, RespValue::Integer(0));
    assert_eq!(ops_of(&rounds[1][0]), vec![assign("cart", "1")]);

    let not_integer = refused(
        ErrorCode::InvalidRequest,
        "field user holds a value that is not an integer",
    );
    let (reply, rounds) = script(
        "HINCRBY h user 1",
        0,
        store(crdt(cart.clone(), None), not_integer),
    );
    assert_eq!(error_text(&reply), "ERR hash value is not an integer");
    assert!(
        matches!(rounds[1][0], KeyBody::Get(_)),
        "the explaining read"
    );
    let overflow = refused(
        ErrorCode::InvalidRequest,
        "increment or decrement would overflow",
    );
    let (reply, _) = script(
        "HINCRBY h cart 9223372036854775807",
        0,
        store(crdt(cart, None), overflow),
    );
    assert_eq!(
        error_text(&reply),
        "ERR increment or decrement would overflow"
    );
    let (reply, rounds) = script(
        "HINCRBY k f 1",
        0,
        store(
            found(b"v", None),
            refused(ErrorCode::WrongType, "plain value"),
        ),
    );
    assert!(error_text(&reply).starts_with("WRONGTYPE"), "{reply:?}");
    assert_eq!(rounds.len(), 1, "WRONGTYPE needs no read");
    assert!(error_text(&reply_of("HINCRBY h f x")).starts_with("ERR value is not an integer"));
}

/// A node's `wrong_type` reaches a Redis client as Redis's own `WRONGTYPE` error, which client
/// libraries recognise; other node errors keep their code and message.
#[test]
fn node_errors_become_redis_errors() {
    let refuse = |code| move |_: &KeyRequest| Message::Error(ErrorBody::new(code, "refused"));
    let (reply, _) = script("GET k", 0, refuse(ErrorCode::WrongType));
    assert_eq!(
        error_text(&reply),
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    );
    let (reply, _) = script("GET k", 0, refuse(ErrorCode::Overloaded));
    assert_eq!(error_text(&reply), "ERR overloaded: refused");
}

/// A connection's name outlives the command that set it, so it is a copy: a command parsed in
/// place is a slice of the whole buffer its connection read.
#[test]
fn a_client_name_keeps_no_slice_of_the_read_buffer() {
    let mut wire = b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$4\r\ncart\r\n".to_vec();
    wire.resize(64 << 10, b'x');
    let read = Bytes::from(wire);
    let (parsed, used) = ringkv_net::resp::parse_command(&read, &RespLimits::DEFAULT)
        .unwrap()
        .unwrap();
    let command = parsed.with_bytes(read.slice(..used));
    let mut state = RespState::new(7);
    assert!(matches!(plan(command, &mut state), RespPlan::Reply(_)));
    let name = state.name.clone().expect("the name is set");
    assert_eq!(&name[..], b"cart");
    assert!(!read.as_ptr_range().contains(&name.as_ptr()));
}
