//! Redis commands onto ringkv requests (sans-IO): what the RESP2 listener does with a command.
//!
//! [`plan`] turns a parsed [`RespCommand`] into a [`RespPlan`]: a reply it can give at once
//! (PING, ECHO, INFO, COMMAND, HELLO, SELECT 0, QUIT, errors), or ringkv requests for the shell to
//! execute in order, plus how [`combine`] turns their replies into one RESP reply. Keys live in
//! the bucket [`RESP_BUCKET`] (`redis`), which is last-write-wins unless configured otherwise:
//! Redis clients have no causal contexts, so a SET must replace what is there rather than become
//! a sibling of it. `redis-cli SET k v` and `ringkv get --bucket redis k` see the same value.
//!
//! Supported: `GET`, `SET key value` (no options), `DEL`, `EXISTS`, `MGET`, `PING`, `ECHO`,
//! `INFO`, `COMMAND` (an empty list, enough for redis-cli), `HELLO` (protocol 2 only; `HELLO 3`
//! is `NOPROTO`), `SELECT 0`, `QUIT`. Anything else is `-ERR unknown command`, as in Redis.
//!
//! Limits: DEL reads each key before deleting it to count what existed, so its count is not
//! atomic with the deletes (a concurrent writer can make it off by one). If the `redis` bucket is
//! configured with siblings, GET answers the last value sibling and SET adds siblings.

use bytes::Bytes;
use ringkv_core::request::{KeyBody, KeyRequest};
use ringkv_net::resp::{RespCommand, RespValue};
use ringkv_net::{Delete, Get, Message, Put, Sibling};

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
    /// Execute these requests one after the other, then [`combine`] their replies.
    Execute(Vec<KeyRequest>, Combine),
}

/// How the replies of a [`RespPlan::Execute`] become one RESP reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// GET: the value or nil.
    Get,
    /// SET: `+OK`.
    Set,
    /// MGET: an array of values or nils.
    MGet,
    /// EXISTS: how many of the reads found a value.
    Exists,
    /// DEL: the first `n` replies are reads; count those that found a value.
    Del(usize),
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

fn get(key: Bytes) -> KeyRequest {
    let get = Get {
        bucket: Bytes::from_static(RESP_BUCKET),
        key,
        r: None,
        timeout_ms: None,
    };
    KeyRequest::new(KeyBody::Get(get), PARTITIONS)
}

/// Decides what to do with `cmd`.
pub fn plan(cmd: &RespCommand) -> RespPlan {
    let Some(name) = cmd.name() else {
        // Empty commands are ignored by Redis; the listener never passes them, answer anyway.
        return RespPlan::Reply(err("ERR empty command"));
    };
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    let argc = cmd.len();
    // Arguments after the name, as shared slices of the command's buffer.
    let args = || (1..argc).filter_map(|i| cmd.arg_bytes(i));
    match name.as_str() {
        "ping" => match argc {
            1 => RespPlan::Reply(RespValue::Simple(Bytes::from_static(b"PONG"))),
            2 => RespPlan::Reply(RespValue::Bulk(cmd.arg_bytes(1).unwrap_or_default())),
            _ => wrong_args("ping"),
        },
        "echo" if argc == 2 => {
            RespPlan::Reply(RespValue::Bulk(cmd.arg_bytes(1).unwrap_or_default()))
        }
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
        "hello" => match cmd.arg(1) {
            None | Some(b"2") => RespPlan::Reply(RespValue::Array(vec![
                RespValue::Bulk(Bytes::from_static(b"server")),
                RespValue::Bulk(Bytes::from_static(b"redis")),
                RespValue::Bulk(Bytes::from_static(b"version")),
                RespValue::Bulk(Bytes::from_static(b"7.0.0")),
                RespValue::Bulk(Bytes::from_static(b"proto")),
                RespValue::Integer(2),
                RespValue::Bulk(Bytes::from_static(b"mode")),
                RespValue::Bulk(Bytes::from_static(b"standalone")),
            ])),
            Some(_) => RespPlan::Reply(err("NOPROTO unsupported protocol version")),
        },
        "get" if argc == 2 => RespPlan::Execute(args().map(get).collect(), Combine::Get),
        "get" => wrong_args("get"),
        "set" if argc == 3 => {
            let (Some(key), Some(value)) = (cmd.arg_bytes(1), cmd.arg_bytes(2)) else {
                return wrong_args("set");
            };
            let put = Put {
                bucket: Bytes::from_static(RESP_BUCKET),
                key,
                value,
                context: None,
                w: None,
                dw: None,
                timeout_ms: None,
                expiry: None,
            };
            let put = KeyRequest::new(KeyBody::Put(put), PARTITIONS);
            RespPlan::Execute(vec![put], Combine::Set)
        }
        "set" if argc > 3 => {
            RespPlan::Reply(err("ERR syntax error (SET options are not supported)"))
        }
        "set" => wrong_args("set"),
        "mget" if argc >= 2 => RespPlan::Execute(args().map(get).collect(), Combine::MGet),
        "mget" => wrong_args("mget"),
        "exists" if argc >= 2 => RespPlan::Execute(args().map(get).collect(), Combine::Exists),
        "exists" => wrong_args("exists"),
        "del" if argc >= 2 => {
            let mut requests: Vec<KeyRequest> = args().map(get).collect();
            let reads = requests.len();
            requests.extend(args().map(|key| {
                let delete = Delete {
                    bucket: Bytes::from_static(RESP_BUCKET),
                    key,
                    context: None,
                    w: None,
                    dw: None,
                    timeout_ms: None,
                };
                KeyRequest::new(KeyBody::Delete(delete), PARTITIONS)
            }));
            RespPlan::Execute(requests, Combine::Del(reads))
        }
        "del" => wrong_args("del"),
        _ => RespPlan::Reply(err(format!(
            "ERR unknown command '{}'",
            name.escape_default()
        ))),
    }
}

/// The value a GET reply holds for Redis: the last value sibling, or nil.
fn value_of(reply: &Message) -> Result<Option<Bytes>, RespValue> {
    match reply {
        Message::GetOk(ok) => Ok(ok.siblings.iter().rev().find_map(|s| match s {
            Sibling::Value(v) => Some(v.clone()),
            Sibling::Tombstone => None,
        })),
        Message::Error(e) => Err(err(format!("ERR {}: {}", e.code, e.message))),
        other => Err(err(format!("ERR unexpected reply {}", other.kind()))),
    }
}

/// Turns the replies of a [`RespPlan::Execute`] (in request order) into one RESP reply; the first
/// error reply wins.
pub fn combine(how: Combine, replies: &[Message]) -> RespValue {
    let attempt = || -> Result<RespValue, RespValue> {
        match how {
            Combine::Get => {
                let value = replies.first().map(value_of).transpose()?.flatten();
                Ok(value.map_or(RespValue::Null, RespValue::Bulk))
            }
            Combine::Set => match replies.first() {
                Some(Message::PutOk(_)) => Ok(ok()),
                Some(Message::Error(e)) => Err(err(format!("ERR {}: {}", e.code, e.message))),
                _ => Err(err("ERR unexpected reply to SET")),
            },
            Combine::MGet => replies
                .iter()
                .map(|r| Ok(value_of(r)?.map_or(RespValue::Null, RespValue::Bulk)))
                .collect::<Result<Vec<_>, _>>()
                .map(RespValue::Array),
            Combine::Exists | Combine::Del(_) => {
                let reads = match how {
                    Combine::Del(n) => n,
                    _ => replies.len(),
                };
                let mut found = 0i64;
                for r in &replies[..reads.min(replies.len())] {
                    found += i64::from(value_of(r)?.is_some());
                }
                for r in replies.iter().skip(reads) {
                    if let Message::Error(e) = r {
                        return Err(err(format!("ERR {}: {}", e.code, e.message)));
                    }
                }
                Ok(RespValue::Integer(found))
            }
        }
    };
    attempt().unwrap_or_else(|e| e)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ringkv_net::GetOk;
    use ringkv_net::resp::{RespLimits, decode_command};

    use super::*;

    fn cmd(line: &str) -> RespCommand {
        decode_command(format!("{line}\r\n").as_bytes(), &RespLimits::DEFAULT)
            .unwrap()
            .unwrap()
            .0
    }

    fn found(v: &'static [u8]) -> Message {
        Message::GetOk(GetOk {
            siblings: vec![Sibling::Value(Bytes::from_static(v))],
            context: Bytes::new(),
            expires_at_ms: None,
        })
    }

    fn missing() -> Message {
        Message::GetOk(GetOk {
            siblings: vec![],
            context: Bytes::new(),
            expires_at_ms: None,
        })
    }

    /// Immediate replies and refusals match Redis's wording closely enough for its clients.
    #[test]
    fn immediate_replies() {
        assert_eq!(
            plan(&cmd("PING")),
            RespPlan::Reply(RespValue::Simple(Bytes::from_static(b"PONG")))
        );
        assert_eq!(plan(&cmd("quit")), RespPlan::ReplyAndClose(ok()));
        assert!(
            matches!(plan(&cmd("HELLO 3")), RespPlan::Reply(RespValue::Error(e)) if e.starts_with(b"NOPROTO"))
        );
        assert!(
            matches!(plan(&cmd("FLUSHALL")), RespPlan::Reply(RespValue::Error(e)) if e.starts_with(b"ERR unknown command"))
        );
        assert!(matches!(
            plan(&cmd("GET")),
            RespPlan::Reply(RespValue::Error(_))
        ));
        assert!(matches!(
            plan(&cmd("SET k v EX 10")),
            RespPlan::Reply(RespValue::Error(_))
        ));
    }

    /// Data commands become requests in the RESP bucket, and their replies combine as Redis's.
    #[test]
    fn data_commands() {
        let RespPlan::Execute(reqs, how) = plan(&cmd("DEL a b")) else {
            panic!()
        };
        assert_eq!(how, Combine::Del(2));
        assert_eq!(reqs.len(), 4);
        assert!(
            matches!(reqs[0].body(), KeyBody::Get(g) if &g.bucket[..] == RESP_BUCKET && &g.key[..] == b"a")
        );
        assert!(matches!(reqs[3].body(), KeyBody::Delete(d) if &d.key[..] == b"b"));
        let replies = [found(b"x"), missing(), Message::DeleteOk, Message::DeleteOk];
        assert_eq!(combine(how, &replies), RespValue::Integer(1));
        assert_eq!(
            combine(Combine::MGet, &[found(b"x"), missing()]),
            RespValue::Array(vec![
                RespValue::Bulk(Bytes::from_static(b"x")),
                RespValue::Null
            ])
        );
        assert_eq!(combine(Combine::Get, &[missing()]), RespValue::Null);
        assert_eq!(
            combine(Combine::Exists, &[found(b"x"), found(b"y")]),
            RespValue::Integer(2)
        );
    }
}
