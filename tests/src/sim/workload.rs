//! The clients: their operations, the records the checkers judge them by, and the final
//! reads.
//!
//! Convergent types: a client increments counters (`COUNTERS_BUCKET`), adds unique elements to
//! sets (`SETS_BUCKET`) and removes elements it added once their add was acknowledged. Every
//! such operation carries an operation id of its own, derived from its record, so the
//! checkers can ask any stored state whether it holds the operation ([`Crdt::saw_op`]); a
//! failed increment is re-sent once with the same id (a client's retry).
//!
//! [`Crdt::saw_op`]: ringkv_core::crdt::Crdt::saw_op

use ringkv_core::coordinator::{Output, PeerMsg};
use ringkv_core::crdt::{Crdt, OP_LOG_MAX};
use ringkv_core::request::KeyRequest;
use std::collections::BTreeSet;

use bytes::Bytes;
use rand::Rng;
use ringkv_net::{Apply, CrdtOp, CrdtType, Delete, Get, Message, Put};

use super::{
    COUNTER_KEYS, COUNTERS_BUCKET, CRDT_SET_KEYS, Event, HARNESS, LWW_BUCKET, SET_KEYS,
    SETS_BUCKET, SIBLINGS_BUCKET, Sim, node_index,
};

/// Most attempts (first sends and retries) on one convergent key in a run. An attempt a
/// coordinator applies pushes its id into that coordinator's operation log, which keeps the last
/// `OP_LOG_MAX` ids per actor: below that, a state holds an operation exactly when its log names
/// it, which the checkers rely on. A client that would pass it writes a register instead.
const CRDT_ATTEMPTS_PER_KEY_MAX: usize = 48;
const _: () = assert!(CRDT_ATTEMPTS_PER_KEY_MAX < OP_LOG_MAX);

/// What a client's current operation is waiting for.
#[derive(Clone, Debug)]
pub(super) enum ClientState {
    Idle,
    /// Read of a read-modify-write; then write `kind`.
    Reading {
        key: usize,
        bucket: &'static [u8],
        kind: WriteKind,
    },
    Writing {
        write: u64,
    },
    Deleting {
        delete: usize,
    },
    /// An APPLY of convergent operation record `op`.
    Applying {
        op: usize,
    },
    Done,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum WriteKind {
    Register,
    SetAdd,
    Blind,
    Lww,
    Delete,
    Increment,
    CrdtAdd,
    CrdtRemove,
}

/// What a convergent operation does.
#[derive(Clone, Debug)]
pub(super) enum CrdtKind {
    /// Adds `k ≥ 1` to a counter.
    Increment(i64),
    /// Adds a unique element to a set.
    Add(String),
    /// Removes the element that add record `add` (of the same client, acknowledged before this
    /// was sent) added.
    Remove { element: String, add: usize },
}

/// A convergent operation a client issued.
#[derive(Clone, Debug)]
pub(super) struct CrdtRecord {
    pub(super) bucket: &'static [u8],
    pub(super) key: usize,
    pub(super) kind: CrdtKind,
    /// The operation id every attempt carries.
    pub(super) op_id: u64,
    /// The operation's name in the durability checker's records (`durability.rs`).
    pub(super) name: Bytes,
    /// Sends: 1, or 2 for an increment re-sent after its first attempt failed.
    pub(super) attempts: u8,
    pub(super) acked: bool,
    /// The bucket's `dw` it was sent with.
    pub(super) dw: u8,
    /// Removes: what the state the remove's coordinator made (the first replica write that
    /// names the remove) shows; `None` until that write is seen.
    pub(super) coordinated: Option<Coordinated>,
    /// Retried increments: the retry reached a coordinator whose own replica already held the
    /// first attempt, so it must be acknowledged without counting again.
    pub(super) retry_must_dedup: bool,
}

/// The state a remove's coordinator made, as its first replica write shows it.
#[derive(Clone, Debug)]
pub(super) struct Coordinated {
    /// It holds the remove's add: the coordinator had received the add when it applied the
    /// remove.
    pub(super) held_add: bool,
    /// It still holds the element.
    pub(super) left_in: bool,
    /// The state, for a failure message.
    pub(super) state: Crdt,
}

impl CrdtRecord {
    /// The operation as sent.
    fn op(&self) -> CrdtOp {
        match &self.kind {
            CrdtKind::Increment(k) => CrdtOp::Increment(*k),
            CrdtKind::Add(e) => CrdtOp::Add(Bytes::from(e.clone())),
            CrdtKind::Remove { element, .. } => CrdtOp::Remove(Bytes::from(element.clone())),
        }
    }
}

/// A delete a client issued (read-modify-delete on a register key).
#[derive(Clone, Debug)]
pub(super) struct DeleteRecord {
    pub(super) key: usize,
    /// Values returned by the read whose context the delete carried.
    pub(super) saw: Vec<Bytes>,
    pub(super) acked: bool,
    /// The bucket's `dw` it was sent with.
    pub(super) dw: u8,
}

/// A write a client issued.
#[derive(Clone, Debug)]
pub(super) struct WriteRecord {
    pub(super) bucket: &'static [u8],
    pub(super) key: usize,
    pub(super) value: Bytes,
    /// Values returned by the read whose context the write carried.
    pub(super) saw: Vec<Bytes>,
    /// The set element it added (set-add writes).
    pub(super) element: Option<String>,
    pub(super) acked: bool,
    /// When the client sent it, and when it was acknowledged.
    pub(super) started_at: u64,
    pub(super) acked_at: Option<u64>,
    /// The bucket's `dw` it was sent with.
    pub(super) dw: u8,
}

pub(super) struct Client {
    pub(super) state: ClientState,
    pub(super) ops_left: usize,
    pub(super) seq: u64,
    /// Add records of this client that were acknowledged and whose element it has not removed.
    pub(super) added: Vec<usize>,
    /// An increment to re-send (once) before the next operation.
    pub(super) retry: Option<usize>,
}

/// A final-phase read: the sibling values and context, or why it failed.
pub(super) type FinalRead = Result<(Vec<Bytes>, Bytes), String>;

impl Sim {
    pub(super) fn client_start(&mut self, c: usize) {
        if !matches!(self.clients[c].state, ClientState::Idle) {
            return;
        }
        if let Some(op) = self.clients[c].retry.take() {
            return self.crdt_send(c, op);
        }
        if self.clients[c].ops_left == 0 {
            self.clients[c].state = ClientState::Done;
            return;
        }
        self.clients[c].ops_left -= 1;
        // Convergent operations take 3 in 14, so the other kinds stay most of the traffic.
        let kind = match self.rng.gen_range(0..14) {
            0..=3 => WriteKind::Register,
            4..=6 => WriteKind::SetAdd,
            7 => WriteKind::Blind,
            8 | 9 => WriteKind::Lww,
            10 => WriteKind::Delete,
            11 => WriteKind::Increment,
            12 => WriteKind::CrdtAdd,
            _ => WriteKind::CrdtRemove,
        };
        let index = self.rng.gen_range(0..self.params.keys);
        let kind = match kind {
            WriteKind::Increment | WriteKind::CrdtAdd | WriteKind::CrdtRemove => {
                if self.crdt_start(c, kind, index) {
                    return;
                }
                // The key had its share of operations (`CRDT_ATTEMPTS_PER_KEY_MAX`).
                WriteKind::Register
            }
            other => other,
        };
        // Sets live on their own keys: a register write would legitimately replace a set.
        let key = index
            + if matches!(kind, WriteKind::SetAdd) {
                SET_KEYS
            } else {
                0
            };
        match kind {
            WriteKind::Blind | WriteKind::Lww => {
                let bucket = if matches!(kind, WriteKind::Lww) {
                    LWW_BUCKET
                } else {
                    SIBLINGS_BUCKET
                };
                self.client_write(c, bucket, key, kind, Vec::new(), None);
            }
            WriteKind::Increment | WriteKind::CrdtAdd | WriteKind::CrdtRemove => {
                unreachable!("convergent operations started above")
            }
            WriteKind::Register | WriteKind::SetAdd | WriteKind::Delete => {
                self.clients[c].state = ClientState::Reading {
                    key,
                    bucket: SIBLINGS_BUCKET,
                    kind,
                };
                let message = Message::Get(Get {
                    bucket: Bytes::from_static(SIBLINGS_BUCKET),
                    key: key_bytes(key),
                    r: None,
                    timeout_ms: None,
                });
                self.client_send(c, message);
            }
        }
    }

    /// Starts a convergent operation of `kind` on key `index` of its bucket (a remove: on the
    /// key of an add it picks); false, and nothing sent, if that key had its share of attempts.
    fn crdt_start(&mut self, c: usize, kind: WriteKind, index: usize) -> bool {
        // A remove removes an element this client added and saw acknowledged; with none, the
        // client adds one instead.
        let kind = match kind {
            WriteKind::CrdtRemove if self.clients[c].added.is_empty() => WriteKind::CrdtAdd,
            kind => kind,
        };
        let (bucket, key, pick) = match kind {
            WriteKind::Increment => (COUNTERS_BUCKET, COUNTER_KEYS + index, None),
            WriteKind::CrdtRemove => {
                let pick = self.rng.gen_range(0..self.clients[c].added.len());
                let add = &self.crdt_ops[self.clients[c].added[pick]];
                (SETS_BUCKET, add.key, Some(pick))
            }
            _ => (SETS_BUCKET, CRDT_SET_KEYS + index, None),
        };
        // The key's attempts, counting two for every increment (it may be re-sent).
        let attempts = |increment: bool| if increment { 2 } else { 1 };
        let taken: usize = self
            .crdt_ops
            .iter()
            .filter(|o| o.bucket == bucket && o.key == key)
            .map(|o| attempts(matches!(o.kind, CrdtKind::Increment(_))))
            .sum();
        if taken + attempts(matches!(kind, WriteKind::Increment)) > CRDT_ATTEMPTS_PER_KEY_MAX {
            return false;
        }
        self.clients[c].seq += 1;
        let tag = format!("c{c}s{}", self.clients[c].seq);
        let kind = match pick {
            Some(pick) => {
                let add = self.clients[c].added.swap_remove(pick);
                let CrdtKind::Add(element) = &self.crdt_ops[add].kind else {
                    unreachable!("a client's added list holds adds")
                };
                CrdtKind::Remove {
                    element: element.clone(),
                    add,
                }
            }
            None if matches!(kind, WriteKind::Increment) => {
                CrdtKind::Increment(self.rng.gen_range(1..=5))
            }
            None => CrdtKind::Add(tag),
        };
        let id = self.crdt_ops.len();
        let op_id = id as u64 + 1;
        debug_assert_eq!(crdt_record(op_id), id);
        let name = Bytes::from(format!(
            "{}/k{key}#{op_id}",
            String::from_utf8_lossy(bucket)
        ));
        self.note_op(bucket, key, &name, op_id);
        if matches!(kind, CrdtKind::Remove { .. }) {
            self.removes_pending.insert(id);
        }
        let dw = self.bucket_props(bucket).dw;
        self.crdt_ops.push(CrdtRecord {
            bucket,
            key,
            kind,
            op_id,
            name,
            attempts: 0,
            acked: false,
            dw,
            coordinated: None,
            retry_must_dedup: false,
        });
        self.crdt_send(c, id);
        true
    }

    /// Sends (or re-sends) convergent operation `op` as an APPLY.
    fn crdt_send(&mut self, c: usize, op: usize) {
        let record = &mut self.crdt_ops[op];
        record.attempts += 1;
        let crdt = if record.bucket == COUNTERS_BUCKET {
            CrdtType::Counter
        } else {
            CrdtType::Set
        };
        let message = Message::Apply(Apply {
            bucket: Bytes::from_static(record.bucket),
            key: key_bytes(record.key),
            crdt,
            ops: vec![record.op()],
            op_id: Some(record.op_id),
            return_value: false,
            w: None,
            dw: None,
            timeout_ms: None,
        });
        self.clients[c].state = ClientState::Applying { op };
        self.client_send(c, message);
    }

    pub(super) fn client_send(&mut self, c: usize, message: Message) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        // A random live node; if none is up the request fails at once.
        let up: Vec<usize> = (0..self.client_nodes)
            .filter(|&n| self.nodes[n].core.is_some())
            .collect();
        if up.is_empty() {
            self.client_failed(c, req);
            return req;
        }
        let n = up[self.rng.gen_range(0..up.len())];
        self.requests.insert((n, req), c);
        self.client_request(n, req, message);
        req
    }

    pub(super) fn client_request(&mut self, n: usize, req: u64, message: Message) {
        if let Some(until) = self.nodes[n].frozen_until.filter(|_| self.frozen(n)) {
            // A frozen node reads the request from its socket when it thaws.
            let incarnation = self.nodes[n].incarnation;
            self.schedule(
                until - self.now,
                Event::ClientRequest {
                    node: n,
                    incarnation,
                    req,
                    message,
                },
            );
            return;
        }
        let now = self.now;
        // A retried increment: the node that coordinates it is judged once known (it forwards
        // the request to the key's first reachable home, or coordinates it itself).
        let retry = match &message {
            Message::Apply(Apply {
                op_id: Some(id), ..
            }) => Some(crdt_record(*id)).filter(|&op| self.crdt_ops[op].attempts > 1),
            _ => None,
        };
        let partitions = self.core(n).ring().partition_count();
        let request = KeyRequest::parse(message, partitions).expect("clients send key requests");
        let outputs = self.core(n).handle_client(now, req, request);
        if let Some(op) = retry {
            let forward = outputs.iter().find_map(|o| match o {
                Output::Send {
                    msg: PeerMsg::Forward { id, .. },
                    ..
                } => Some(*id),
                _ => None,
            });
            match forward {
                Some(id) => {
                    self.retry_forwards.insert((n, id), op);
                }
                None => self.note_retry_coordinator(n, op),
            }
        }
        self.outputs(n, outputs);
    }

    pub(super) fn client_write(
        &mut self,
        c: usize,
        bucket: &'static [u8],
        key: usize,
        kind: WriteKind,
        saw: Vec<Bytes>,
        context: Option<Bytes>,
    ) {
        self.clients[c].seq += 1;
        let tag = format!("c{c}s{}", self.clients[c].seq);
        let (value, element) = match kind {
            WriteKind::SetAdd => {
                // The set is the union of every sibling read, plus the new element.
                let mut set: BTreeSet<String> = BTreeSet::new();
                for v in &saw {
                    set.extend(decode_set(v));
                }
                set.insert(tag.clone());
                (encode_set(&tag, &set), Some(tag.clone()))
            }
            _ => (Bytes::from(format!("{tag}|")), None),
        };
        let id = self.writes.len() as u64;
        let props = self.bucket_props(bucket);
        self.writes.insert(
            id,
            WriteRecord {
                bucket,
                key,
                value: value.clone(),
                saw,
                element,
                acked: false,
                started_at: self.now,
                acked_at: None,
                dw: props.dw,
            },
        );
        self.by_value.insert(value.clone(), id);
        self.clients[c].state = ClientState::Writing { write: id };
        let message = Message::Put(Put {
            bucket: Bytes::from_static(bucket),
            key: key_bytes(key),
            value,
            context,
            w: None,
            dw: None,
            timeout_ms: None,
            expiry: None,
            condition: None,
        });
        self.client_send(c, message);
    }

    pub(super) fn client_delete(
        &mut self,
        c: usize,
        key: usize,
        saw: Vec<Bytes>,
        context: Option<Bytes>,
    ) {
        let props = self.bucket_props(SIBLINGS_BUCKET);
        self.deletes.push(DeleteRecord {
            key,
            saw,
            acked: false,
            dw: props.dw,
        });
        self.clients[c].state = ClientState::Deleting {
            delete: self.deletes.len() - 1,
        };
        let message = Message::Delete(Delete {
            bucket: Bytes::from_static(SIBLINGS_BUCKET),
            key: key_bytes(key),
            context,
            w: None,
            dw: None,
            timeout_ms: None,
        });
        self.client_send(c, message);
    }

    pub(super) fn client_failed(&mut self, c: usize, _req: u64) {
        if c == usize::MAX {
            return;
        }
        if c == HARNESS {
            self.harness_reply = Some(Message::Error(ringkv_net::ErrorBody::new(
                ringkv_net::ErrorCode::Internal,
                "no node answered",
            )));
            return;
        }
        if let ClientState::Applying { op } = self.clients[c].state {
            // A client's retry: the same operation id once more, through whatever node the
            // client picks next. The store applies it once if the retry's coordinator has the
            // first attempt, and again if it has not (`crdt.rs`, retries).
            let record = &self.crdt_ops[op];
            if matches!(record.kind, CrdtKind::Increment(_)) && record.attempts == 1 {
                self.clients[c].retry = Some(op);
            }
        }
        self.clients[c].state = ClientState::Idle;
        let pause = self.rng.gen_range(1..50);
        self.schedule(pause, Event::ClientStart { client: c });
    }

    pub(super) fn reply(&mut self, n: usize, req: u64, message: Message) {
        let Some(c) = self.requests.remove(&(n, req)) else {
            return;
        };
        self.mix(0x3000 + req);
        if c == HARNESS {
            self.harness_reply = Some(message);
            return;
        }
        if c == usize::MAX {
            let (bucket, k) = self.final_keys[&req];
            let result = match message {
                Message::GetOk(ok) => {
                    let values = self.check_read(bucket, &ok.siblings);
                    if [COUNTERS_BUCKET, SETS_BUCKET].contains(&bucket) {
                        self.final_crdt.insert((bucket.to_vec(), k), ok.crdt);
                    }
                    Ok((values, ok.context))
                }
                other => Err(format!("{other:?}")),
            };
            self.final_reads.insert((bucket.to_vec(), k), result);
            return;
        }
        match (self.clients[c].state.clone(), message) {
            (ClientState::Reading { key, bucket, kind }, Message::GetOk(ok)) => {
                let values = self.check_read(bucket, &ok.siblings);
                let context = (!ok.context.is_empty()).then_some(ok.context);
                if let (WriteKind::Register, Some(ctx)) = (kind, &context) {
                    self.stale
                        .entry(key)
                        .or_insert_with(|| (ctx.clone(), values.clone()));
                }
                match kind {
                    WriteKind::Delete => self.client_delete(c, key, values, context),
                    _ => self.client_write(c, bucket, key, kind, values, context),
                }
            }
            (ClientState::Deleting { delete }, Message::DeleteOk) => {
                let d = &self.deletes[delete];
                let (saw, dw) = (d.saw.clone(), d.dw);
                self.check_acked_delete(&saw, dw);
                self.deletes[delete].acked = true;
                self.clients[c].state = ClientState::Idle;
                let pause = self.rng.gen_range(1..30);
                self.schedule(pause, Event::ClientStart { client: c });
            }
            (ClientState::Writing { write }, Message::PutOk(_)) => {
                let w = &self.writes[&write];
                let (value, dw) = (w.value.clone(), w.dw);
                let quorum = self.bucket_props(w.bucket).w;
                self.check_acked_write(&value, quorum, dw);
                self.maybe_power_loss();
                let now = self.now;
                let record = self
                    .writes
                    .get_mut(&write)
                    .expect("a write being acknowledged was recorded");
                record.acked = true;
                record.acked_at = Some(now);
                self.clients[c].state = ClientState::Idle;
                let pause = self.rng.gen_range(1..30);
                self.schedule(pause, Event::ClientStart { client: c });
            }
            (ClientState::Applying { op }, Message::ApplyOk(_)) => {
                let record = &self.crdt_ops[op];
                let (name, bucket, dw) = (record.name.clone(), record.bucket, record.dw);
                let quorum = self.bucket_props(bucket).w;
                // Held to `w` and `dw` as a PUT is: the operation's name stands for every
                // state whose operation log holds it (`durability.rs`).
                self.check_acked_write(&name, quorum, dw);
                self.maybe_power_loss();
                self.crdt_ops[op].acked = true;
                if matches!(self.crdt_ops[op].kind, CrdtKind::Add(_)) {
                    self.clients[c].added.push(op);
                }
                self.clients[c].state = ClientState::Idle;
                let pause = self.rng.gen_range(1..30);
                self.schedule(pause, Event::ClientStart { client: c });
            }
            (_, _) => self.client_failed(c, req),
        }
    }

    pub(super) fn stale_phase(&mut self) {
        let stale: Vec<(usize, (Bytes, Vec<Bytes>))> =
            std::mem::take(&mut self.stale).into_iter().collect();
        for (k, (context, saw)) in stale {
            for (tag, context, saw) in [("blind", None, Vec::new()), ("stale", Some(context), saw)]
            {
                let value = Bytes::from(format!("post-k{k}-{tag}|"));
                let id = self.writes.len() as u64;
                let props = self.bucket_props(SIBLINGS_BUCKET);
                self.by_value.insert(value.clone(), id);
                self.writes.insert(
                    id,
                    WriteRecord {
                        bucket: SIBLINGS_BUCKET,
                        key: k,
                        value: value.clone(),
                        saw,
                        element: None,
                        acked: false,
                        started_at: self.now,
                        acked_at: None,
                        dw: props.dw,
                    },
                );
                let reply = self.call(Message::Put(Put {
                    bucket: Bytes::from_static(SIBLINGS_BUCKET),
                    key: key_bytes(k),
                    value,
                    context,
                    w: None,
                    dw: None,
                    timeout_ms: None,
                    expiry: None,
                    condition: None,
                }));
                if let Some(Message::PutOk(_)) = reply {
                    let now = self.now;
                    let w = self.writes.get_mut(&id).expect("recorded above");
                    w.acked = true;
                    w.acked_at = Some(now);
                    self.stale_writes += 1;
                }
            }
        }
    }

    /// Sends `message` from the harness to a random node and steps until the answer (bounded).
    pub(super) fn call(&mut self, message: Message) -> Option<Message> {
        self.harness_reply = None;
        let req = self.next_req;
        self.next_req += 1;
        let serving = self.serving();
        let n = serving[self.rng.gen_range(0..serving.len())];
        self.requests.insert((n, req), HARNESS);
        self.client_request(n, req, message);
        let end = self.now + 10_000;
        while self.harness_reply.is_none() && self.now < end && self.step() {}
        self.harness_reply.take()
    }

    /// Every (bucket, key) a client may write.
    pub(super) fn all_keys(&self) -> Vec<(&'static [u8], usize)> {
        let keys = self.params.keys;
        (0..keys)
            .map(|k| (SIBLINGS_BUCKET, k))
            .chain((0..keys).map(|k| (SIBLINGS_BUCKET, SET_KEYS + k)))
            .chain((0..keys).map(|k| (LWW_BUCKET, k)))
            .chain((0..keys).map(|k| (COUNTERS_BUCKET, COUNTER_KEYS + k)))
            .chain((0..keys).map(|k| (SETS_BUCKET, CRDT_SET_KEYS + k)))
            .collect()
    }

    /// The node final reads go through: the first member of the final ring.
    pub(super) fn reader(&self) -> usize {
        let ring = self.final_ring();
        node_index(*ring.members().first().expect("a ring has members"))
    }

    pub(super) fn final_read(&mut self, bucket: &'static [u8], k: usize) {
        let req = self.next_req;
        self.next_req += 1;
        let reader = self.reader();
        // usize::MAX marks a final read rather than a client's.
        self.requests.insert((reader, req), usize::MAX);
        self.final_reads
            .insert((bucket.to_vec(), k), Err("no answer".to_owned()));
        let message = Message::Get(Get {
            bucket: Bytes::from_static(bucket),
            key: key_bytes(k),
            // Every replica: three, or fewer when the cluster shrank below three.
            r: Some(self.final_ring().members().len().min(3) as u8),
            timeout_ms: Some(5_000),
        });
        // Remember which key the request was for (the answer may come at once).
        self.final_keys.insert(req, (bucket, k));
        self.client_request(reader, req, message);
    }
}

/// The record of convergent operation id `op_id` (ids start at 1, records at 0).
pub(super) fn crdt_record(op_id: u64) -> usize {
    usize::try_from(op_id - 1).expect("operation ids count records")
}

pub(super) fn key_bytes(k: usize) -> Bytes {
    Bytes::from(format!("k{k}"))
}

pub(super) fn encode_set(tag: &str, set: &BTreeSet<String>) -> Bytes {
    let elements: Vec<&str> = set.iter().map(String::as_str).collect();
    Bytes::from(format!("{tag}|{}", elements.join(",")))
}

pub(super) fn decode_set(v: &Bytes) -> BTreeSet<String> {
    let text = String::from_utf8_lossy(v);
    match text.split_once('|') {
        Some((_, rest)) if !rest.is_empty() => rest.split(',').map(str::to_owned).collect(),
        _ => BTreeSet::new(),
    }
}
