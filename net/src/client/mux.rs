//! Matching replies to requests on one multiplexed connection, without IO.
//!
//! [`Mux`] is the bookkeeping of a connection that has many requests in flight: it hands out
//! request ids, remembers who waits for each and which reply kind it expects, and for every frame
//! received says whose reply it is. The async client wraps it in a mutex and drives it from its
//! reader task; the waiter type `W` is whatever carries a reply to its caller (a oneshot sender
//! there, plain values in the tests below).
//!
//! Rules, from `docs/PROTOCOL.md` §3.2–3.3:
//! - ids count up from the first one given and are never reused, so an id below the next one that
//!   has no waiter is a reply that came after its request was abandoned (timeout or cancel): it
//!   is dropped and the connection goes on. An id never handed out is a protocol violation.
//! - a reply of the wrong kind, an ERROR with request id 0 (about the whole connection), and any
//!   failure reported by the IO shell ([`Mux::fail`]) break the connection: every waiter gets the
//!   cause, and no new request is accepted.
//!
//! Limits: a duplicate reply to an answered request is indistinguishable from a late one and is
//! dropped too. The mux does not bound the number of waiters; its owner does.

use std::collections::HashMap;

use super::ClientError;
use crate::message::{Frame, Kind, Message};

/// The requests in flight on one connection.
#[derive(Debug)]
pub(crate) struct Mux<W> {
    waiting: HashMap<u64, Waiting<W>>,
    next_id: u64,
    broken: bool,
}

#[derive(Debug)]
struct Waiting<W> {
    expect: Kind,
    waiter: W,
}

/// What a received frame means.
#[derive(Debug)]
pub(crate) enum Received<W> {
    /// The reply (the expected message, or the server's ERROR) to a request in flight.
    Reply(W, Result<Message, ClientError>),
    /// A reply to a request abandoned earlier; dropped.
    Late,
    /// The frame broke the connection; every waiter with its error.
    Broken(Vec<(W, ClientError)>),
}

impl<W> Mux<W> {
    /// A mux whose first request gets id `first_id` (ids below it are taken, e.g. by HELLO).
    pub(crate) fn new(first_id: u64) -> Self {
        assert!(first_id != 0, "request id 0 is reserved");
        Self {
            waiting: HashMap::new(),
            next_id: first_id,
            broken: false,
        }
    }

    /// Whether the connection broke; it then accepts no request.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Requests waiting for a reply.
    pub(crate) fn in_flight(&self) -> usize {
        self.waiting.len()
    }

    /// Registers a request whose success reply has kind `expect` and returns its id, or hands the
    /// waiter back if the connection is broken (the request must then not be sent).
    pub(crate) fn begin(&mut self, expect: Kind, waiter: W) -> Result<u64, W> {
        if self.broken {
            return Err(waiter);
        }
        let id = self.next_id;
        self.next_id += 1;
        let previous = self.waiting.insert(id, Waiting { expect, waiter });
        assert!(previous.is_none(), "request id {id} handed out twice");
        Ok(id)
    }

    /// Forgets request `id` (its caller gave up); its reply, if it comes, will be dropped.
    pub(crate) fn abandon(&mut self, id: u64) -> Option<W> {
        self.waiting.remove(&id).map(|w| w.waiter)
    }

    /// Says what `frame`, received from the server, means.
    pub(crate) fn receive(&mut self, frame: Frame) -> Received<W> {
        let id = frame.request_id;
        if id == 0 {
            // The decoder admits id 0 only on ERROR frames: the server gave up on the connection.
            let error = match frame.message {
                Message::Error(e) => ClientError::Server {
                    code: e.code,
                    message: e.message,
                },
                other => ClientError::Unexpected(format!("{} with request id 0", other.kind())),
            };
            return Received::Broken(self.fail(&error));
        }
        if id >= self.next_id {
            let error = ClientError::Unexpected(format!("reply to request {id}, never sent"));
            return Received::Broken(self.fail(&error));
        }
        let Some(Waiting { expect, waiter }) = self.waiting.remove(&id) else {
            return Received::Late;
        };
        match frame.message {
            Message::Error(e) => Received::Reply(
                waiter,
                Err(ClientError::Server {
                    code: e.code,
                    message: e.message,
                }),
            ),
            m if m.kind() == expect => Received::Reply(waiter, Ok(m)),
            other => {
                let error = ClientError::Unexpected(format!(
                    "{} in reply to request {id}, expected {expect}",
                    other.kind()
                ));
                let mut failed = self.fail(&error);
                failed.push((waiter, error));
                Received::Broken(failed)
            }
        }
    }

    /// Breaks the connection: returns every waiter with a copy of `error`.
    pub(crate) fn fail(&mut self, error: &ClientError) -> Vec<(W, ClientError)> {
        self.broken = true;
        let mut failed: Vec<_> = self
            .waiting
            .drain()
            .map(|(id, w)| (id, w.waiter, error.duplicate()))
            .collect();
        // In request order, so that callers (and tests) see a deterministic order.
        failed.sort_by_key(|(id, _, _)| *id);
        failed.into_iter().map(|(_, w, e)| (w, e)).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;

    use super::*;
    use crate::message::{ErrorBody, ErrorCode, GetOk, PutOk};

    fn frame(request_id: u64, message: Message) -> Frame {
        Frame {
            request_id,
            message,
        }
    }

    fn get_ok(value: &'static [u8]) -> Message {
        Message::GetOk(GetOk {
            siblings: vec![crate::message::Sibling::Value(Bytes::from_static(value))],
            context: Bytes::new(),
            expires_at_ms: None,
            fields: None,
            crdt: None,
        })
    }

    /// Replies in any order reach the waiter of their request id, and ERROR replies about one
    /// request reach only that request.
    #[test]
    fn out_of_order_replies_reach_their_waiters() {
        let mut mux = Mux::new(2);
        let a = mux.begin(Kind::GetOk, "a").unwrap();
        let b = mux.begin(Kind::PutOk, "b").unwrap();
        let c = mux.begin(Kind::Pong, "c").unwrap();
        assert_eq!((a, b, c), (2, 3, 4));
        match mux.receive(frame(c, Message::Pong)) {
            Received::Reply("c", Ok(Message::Pong)) => {}
            other => panic!("{other:?}"),
        }
        let error = Message::Error(ErrorBody::new(ErrorCode::Overloaded, "busy"));
        match mux.receive(frame(a, error)) {
            Received::Reply("a", Err(ClientError::Server { code, .. })) => {
                assert_eq!(code, ErrorCode::Overloaded);
            }
            other => panic!("{other:?}"),
        }
        let put_ok = Message::PutOk(PutOk {
            context: Bytes::from_static(b"ctx"),
        });
        match mux.receive(frame(b, put_ok)) {
            Received::Reply("b", Ok(Message::PutOk(ok))) => assert_eq!(&ok.context[..], b"ctx"),
            other => panic!("{other:?}"),
        }
        assert_eq!(mux.in_flight(), 0);
        assert!(!mux.is_broken());
    }

    /// A reply to an abandoned request is dropped and the connection stays usable; so is a second
    /// reply to an answered request.
    #[test]
    fn late_replies_are_dropped() {
        let mut mux = Mux::new(1);
        let slow = mux.begin(Kind::GetOk, "slow").unwrap();
        let fast = mux.begin(Kind::GetOk, "fast").unwrap();
        assert_eq!(mux.abandon(slow), Some("slow"));
        assert!(matches!(
            mux.receive(frame(slow, get_ok(b"v"))),
            Received::Late
        ));
        assert!(matches!(
            mux.receive(frame(fast, get_ok(b"v"))),
            Received::Reply("fast", Ok(_))
        ));
        assert!(matches!(
            mux.receive(frame(fast, get_ok(b"v"))),
            Received::Late
        ));
        assert!(!mux.is_broken());
        assert!(mux.begin(Kind::Pong, "next").is_ok());
    }

    /// A reply to an id never handed out breaks the connection and fails every waiter with the
    /// violation; later requests are refused.
    #[test]
    fn reply_to_an_unknown_id_breaks_the_connection() {
        let mut mux = Mux::new(1);
        mux.begin(Kind::GetOk, "a").unwrap();
        mux.begin(Kind::Pong, "b").unwrap();
        match mux.receive(frame(99, Message::Pong)) {
            Received::Broken(failed) => {
                let waiters: Vec<_> = failed.iter().map(|(w, _)| *w).collect();
                assert_eq!(waiters, ["a", "b"]);
                assert!(
                    failed
                        .iter()
                        .all(|(_, e)| matches!(e, ClientError::Unexpected(_)))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(mux.is_broken());
        assert_eq!(mux.begin(Kind::Pong, "c"), Err("c"));
    }

    /// A reply of the wrong kind breaks the connection, its own request included.
    #[test]
    fn reply_of_the_wrong_kind_breaks_the_connection() {
        let mut mux = Mux::new(1);
        let a = mux.begin(Kind::GetOk, "a").unwrap();
        mux.begin(Kind::GetOk, "b").unwrap();
        match mux.receive(frame(a, Message::Pong)) {
            Received::Broken(failed) => {
                let mut waiters: Vec<_> = failed.iter().map(|(w, _)| *w).collect();
                waiters.sort();
                assert_eq!(waiters, ["a", "b"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(mux.is_broken());
    }

    /// An ERROR about the whole connection (request id 0) reaches every waiter with its code.
    #[test]
    fn connection_error_fails_every_waiter() {
        let mut mux = Mux::new(1);
        mux.begin(Kind::GetOk, "a").unwrap();
        mux.begin(Kind::PutOk, "b").unwrap();
        let error = Message::Error(ErrorBody::new(ErrorCode::BadFrame, "bad magic"));
        match mux.receive(frame(0, error)) {
            Received::Broken(failed) => {
                assert_eq!(failed.len(), 2);
                for (_, e) in failed {
                    assert!(matches!(
                        e,
                        ClientError::Server {
                            code: ErrorCode::BadFrame,
                            ..
                        }
                    ));
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(mux.is_broken());
    }

    /// A failure from the IO shell (end of stream here) reaches every waiter, in request order.
    #[test]
    fn io_failure_fails_every_waiter() {
        let mut mux = Mux::new(1);
        for w in ["a", "b", "c"] {
            mux.begin(Kind::Pong, w).unwrap();
        }
        let failed = mux.fail(&ClientError::Closed);
        let waiters: Vec<_> = failed.iter().map(|(w, _)| *w).collect();
        assert_eq!(waiters, ["a", "b", "c"]);
        assert!(failed.iter().all(|(_, e)| matches!(e, ClientError::Closed)));
        assert_eq!(mux.in_flight(), 0);
        assert_eq!(mux.begin(Kind::Pong, "d"), Err("d"));
    }
}
