//! Expiry under skewed clocks, as a property: three real cores (N=3, an `lww` bucket) whose
//! clocks are offset from true time by up to half the skew bound each, so any two differ by at
//! most `SKEW_MS`. Proptest drives writes with and without a time to live through any node,
//! delivers, reorders and drops their messages (replica writes, read repair, anti-entropy
//! exchanges, hints), advances time and reads each node's replica alone (R=1). Every read is
//! checked against true time, independently of the implementation:
//!
//! - **never hides a live value**: a node holding write `j` (time to live `d`, coordinated at
//!   true time `t`) answers its value at any true time before `t + d - SKEW_MS`;
//! - **never returns an expired one**: it answers nothing from `t + d + SKEW_MS` on;
//! - **never resurrects**: the version a node holds only moves forward (by timestamp), so an
//!   expired write never gives way to an older one, through any merge;
//! - after every message is delivered and anti-entropy has run, all nodes hold the same version.
//!
//! These are the bounds `docs/PROTOCOL.md` §5.3 documents. (Whole-cluster faults are the
//! simulator's and the multi-process tests'.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use proptest::prelude::*;
use ringkv_cluster::replica::MemoryStore;
use ringkv_core::NodeId;
use ringkv_core::bucket::{BucketProps, Buckets, ConflictMode};
use ringkv_core::coordinator::{Core, CoreConfig, EpochLease, Output, PeerMsg, Space};
use ringkv_core::object::{Object, Val};
use ringkv_core::ring::{PartitionCount, Ring};
use ringkv_net::{Expiry, Get, Message, Put, Sibling};

/// Largest difference between two nodes' clocks.
const SKEW_MS: i64 = 200;
const NODES: usize = 3;
/// Anti-entropy interval and tombstone grace of the cores: reaping stays out of the run (a
/// reap followed by an older version arriving is the documented grace trade-off, §11).
const AE_INTERVAL_MS: u64 = 50;
const GRACE_MS: u64 = 3_600_000;
/// True time at the start: far from 0 so that offsets never go negative.
const START_MS: u64 = 1_000_000;

#[derive(Clone, Debug)]
enum Action {
    /// A write through node `via`, with a time to live or none.
    Write { via: usize, ttl_ms: Option<u64> },
    /// Deliver a queued message (index modulo the queue).
    Deliver(usize),
    /// Lose a queued message.
    Drop(usize),
    /// Let true time pass and tick every core.
    Advance(u64),
    /// Read node `at`'s own replica (R=1) and check it.
    Read(usize),
}

fn actions() -> impl Strategy<Value = Action> {
    prop_oneof![
        2 => (0..NODES, prop::option::weighted(0.8, 1..600u64))
            .prop_map(|(via, ttl_ms)| Action::Write { via, ttl_ms }),
        6 => any::<usize>().prop_map(Action::Deliver),
        1 => any::<usize>().prop_map(Action::Drop),
        4 => (1..150u64).prop_map(Action::Advance),
        4 => (0..NODES).prop_map(Action::Read),
    ]
}

/// One write as the test knows it: when (true time) and for how long.
#[derive(Clone, Copy, Debug)]
struct Written {
    at_ms: u64,
    ttl_ms: Option<u64>,
}

struct Net {
    cores: Vec<Core>,
    stores: Vec<MemoryStore>,
    /// Each node's clock minus true time.
    offsets: Vec<i64>,
    queue: Vec<(usize, usize, PeerMsg)>,
    now: u64,
    replies: BTreeMap<(usize, u64), Message>,
    next_req: u64,
    writes: Vec<Written>,
    /// The highest (timestamp, node) each node's replica has held.
    held_max: Vec<Option<(u64, u32)>>,
}

fn node_id(i: usize) -> NodeId {
    NodeId(i as u32 + 1)
}

impl Net {
    fn new(offsets: Vec<i64>) -> Net {
        let members: BTreeSet<NodeId> = (0..NODES).map(node_id).collect();
        let ring = Ring::new(PartitionCount::new(8).unwrap(), &members, 3).unwrap();
        let cores = (0..NODES)
            .map(|i| {
                let mut cfg = CoreConfig::new(node_id(i));
                cfg.buckets = Buckets {
                    default: BucketProps {
                        n: 3,
                        r: 1,
                        w: 1,
                        dw: 0,
                        mode: ConflictMode::Lww,
                        max_siblings: 8,
                        ttl_ms: None,
                        data_type: None,
                    },
                    named: BTreeMap::new(),
                };
                cfg.ae_interval_ms = AE_INTERVAL_MS;
                cfg.tombstone_grace_ms = GRACE_MS;
                cfg.expiry_grace_ms = GRACE_MS;
                Core::new(cfg, ring.clone(), EpochLease::new(1, 64), [])
            })
            .collect();
        Net {
            cores,
            stores: vec![MemoryStore::new(); NODES],
            offsets,
            queue: Vec::new(),
            now: START_MS,
            replies: BTreeMap::new(),
            next_req: 1,
            writes: Vec::new(),
            held_max: vec![None; NODES],
        }
    }

    fn clock(&self, n: usize) -> u64 {
        (self.now as i64 + self.offsets[n]) as u64
    }

    fn run(&mut self, n: usize, outputs: Vec<Output>) {
        let mut outputs = outputs;
        while let Some(out) = outputs.pop() {
            match out {
                Output::Store { id, key, op } => {
                    let result = common::carry_out(&self.stores[n], key, op);
                    let now = self.clock(n);
                    outputs.extend(self.cores[n].handle_stored(now, id, result));
                }
                Output::Send { to, msg } | Output::Answer { to, msg } => {
                    self.queue.push((n, to.0 as usize - 1, msg))
                }
                Output::Reply { req, message } => {
                    self.replies.insert((n, req), message);
                }
                Output::PersistFloor { floor } => self.cores[n].handle_floor_persisted(floor),
                Output::RenewEpochs => {}
                other => panic!("a fixed three-node ring moved data: {other:?}"),
            }
        }
        self.note_held(n);
    }

    fn request(&mut self, n: usize, message: Message) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        let now = self.clock(n);
        let out = common::handle_client(&mut self.cores[n], now, req, message);
        self.run(n, out);
        req
    }

    /// The version node `n`'s replica holds: its timestamp and node, and the write it is.
    fn held(&self, n: usize) -> Option<(u64, u32, usize, Option<u64>)> {
        let (_, object) = common::stored(&self.stores[n])
            .into_iter()
            .find(|(k, _)| k.space == Space::Primary)?;
        let Object::Lww(l) = &object else {
            panic!("an lww bucket stores lww versions: {object:?}")
        };
        let (value, expires) = match &l.val {
            Val::Value(v) => (v, None),
            Val::Expiring {
                value,
                expires_at_ms,
            } => (value, Some(*expires_at_ms)),
            Val::Tombstone => panic!("nothing deletes"),
        };
        let j: usize = std::str::from_utf8(value).unwrap().parse().unwrap();
        Some((l.timestamp, l.node.0, j, expires))
    }

    /// Never resurrects: what a replica holds only moves forward.
    fn note_held(&mut self, n: usize) {
        if let Some((ts, node, _, _)) = self.held(n) {
            let now = Some((ts, node));
            assert!(
                now >= self.held_max[n],
                "node {} went back from {:?} to {now:?}",
                n + 1,
                self.held_max[n]
            );
            self.held_max[n] = now;
        }
    }

    fn step(&mut self, action: &Action) {
        match *action {
            Action::Write { via, ttl_ms } => {
                let j = self.writes.len();
                self.writes.push(Written {
                    at_ms: self.now,
                    ttl_ms,
                });
                let put = Put {
                    bucket: Bytes::from_static(b"s"),
                    key: Bytes::from_static(b"k"),
                    value: Bytes::from(j.to_string()),
                    context: None,
                    w: Some(1),
                    dw: None,
                    timeout_ms: None,
                    expiry: Some(ttl_ms.map_or(Expiry::Never, |ms| Expiry::Ttl { ms })),
                    condition: None,
                };
                self.request(via, Message::Put(put));
            }
            Action::Deliver(i) if !self.queue.is_empty() => {
                let (from, to, msg) = self.queue.remove(i % self.queue.len());
                let now = self.clock(to);
                let out = self.cores[to].handle_peer(now, node_id(from), msg);
                self.run(to, out);
            }
            Action::Drop(i) if !self.queue.is_empty() => {
                self.queue.remove(i % self.queue.len());
            }
            Action::Deliver(_) | Action::Drop(_) => {}
            Action::Advance(ms) => {
                self.now += ms;
                for n in 0..NODES {
                    let now = self.clock(n);
                    let out = self.cores[n].handle_tick(now);
                    self.run(n, out);
                }
            }
            Action::Read(n) => self.check_read(n),
        }
    }

    fn check_read(&mut self, n: usize) {
        let held = self.held(n);
        let get = Get {
            bucket: Bytes::from_static(b"s"),
            key: Bytes::from_static(b"k"),
            r: Some(1),
            timeout_ms: None,
        };
        let req = self.request(n, Message::Get(get));
        let Some(Message::GetOk(ok)) = self.replies.remove(&(n, req)) else {
            panic!("an R=1 read answers from the local replica at once")
        };
        let Some((_, _, j, _)) = held else {
            assert!(ok.siblings.is_empty(), "nothing held, nothing read: {ok:?}");
            return;
        };
        let w = self.writes[j];
        let value = Sibling::Value(Bytes::from(j.to_string()));
        match w.ttl_ms {
            None => assert_eq!(ok.siblings, vec![value], "write {j} never expires"),
            Some(d) => {
                let skew = SKEW_MS as u64;
                if self.now + skew < w.at_ms + d {
                    assert_eq!(
                        ok.siblings,
                        vec![value],
                        "write {j} (at {}, ttl {d}) hidden at {} on node {}",
                        w.at_ms,
                        self.now,
                        n + 1
                    );
                }
                if self.now >= w.at_ms + d + skew {
                    assert!(
                        ok.siblings.is_empty(),
                        "write {j} (at {}, ttl {d}) returned at {} on node {}",
                        w.at_ms,
                        self.now,
                        n + 1
                    );
                }
            }
        }
    }

    /// Delivers everything, lets anti-entropy run, and checks the replicas agree.
    fn settle(&mut self) {
        for _ in 0..200 {
            while !self.queue.is_empty() {
                self.step(&Action::Deliver(0));
            }
            self.step(&Action::Advance(AE_INTERVAL_MS));
            if self.queue.is_empty() {
                let held: BTreeSet<_> = (0..NODES).map(|n| self.held(n)).collect();
                if held.len() == 1 {
                    break;
                }
            }
        }
        let held: BTreeSet<_> = (0..NODES).map(|n| self.held(n)).collect();
        assert_eq!(held.len(), 1, "replicas still differ: {held:?}");
        for n in 0..NODES {
            self.check_read(n);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("RINGKV_EXPIRY_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn expiry_never_resurrects_nor_hides_under_skew(
        offsets in prop::collection::vec(-SKEW_MS / 2..=SKEW_MS / 2, NODES),
        actions in prop::collection::vec(actions(), 1..80),
    ) {
        let mut net = Net::new(offsets);
        for a in &actions {
            net.step(a);
        }
        net.settle();
    }
}
