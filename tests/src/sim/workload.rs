//! The clients: their operations, the records the checkers judge them by, and the final
//! reads.

use ringkv_core::request::KeyRequest;
use std::collections::BTreeSet;

use bytes::Bytes;
use rand::Rng;
use ringkv_net::{Delete, Get, Message, Put};

use super::{Event, HARNESS, LWW_BUCKET, SET_KEYS, SIBLINGS_BUCKET, Sim, node_index};

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
    Done,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum WriteKind {
    Register,
    SetAdd,
    Blind,
    Lww,
    Delete,
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
}

/// A final-phase read: the sibling values and context, or why it failed.
pub(super) type FinalRead = Result<(Vec<Bytes>, Bytes), String>;

impl Sim {
    pub(super) fn client_start(&mut self, c: usize) {
        if !matches!(self.clients[c].state, ClientState::Idle) {
            return;
        }
        if self.clients[c].ops_left == 0 {
            self.clients[c].state = ClientState::Done;
            return;
        }
        self.clients[c].ops_left -= 1;
        let kind = match self.rng.gen_range(0..11) {
            0..=3 => WriteKind::Register,
            4..=6 => WriteKind::SetAdd,
            7 => WriteKind::Blind,
            8 | 9 => WriteKind::Lww,
            _ => WriteKind::Delete,
        };
        // Sets live on their own keys: a register write would legitimately replace a set.
        let key = self.rng.gen_range(0..self.params.keys)
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
        let now = self.now;
        let partitions = self.core(n).ring().partition_count();
        let request = KeyRequest::parse(message, partitions).expect("clients send key requests");
        let outputs = self.core(n).handle_client(now, req, request);
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
