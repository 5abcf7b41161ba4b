//! Hinted handoff, failure detection and partition handoff of the coordinator, driven directly:
//! one core of a four-node ring whose storage (scans included) runs through the replica layout on
//! an in-memory store and completes at once, and whose messages the test reads and answers by
//! hand. (The whole protocol under faults is the
//! simulator's: `tests/tests/sim.rs`.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_core::NodeId;
use ringkv_core::bucket::{BucketProps, Buckets, ConflictMode};
use ringkv_core::coordinator::{
    Core, CoreConfig, EpochLease, Output, PeerMsg, Space, StoreKey, hint_bytes,
};
use ringkv_core::object::{Lww, Object, Val};
use ringkv_core::ring::{PartitionCount, PartitionId, Ring};
use ringkv_net::{ErrorCode, Message, Put};

const ME: NodeId = NodeId(1);

fn ring() -> Ring {
    let members: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    Ring::new(PartitionCount::new(8).unwrap(), &members, 3).unwrap()
}

fn config() -> CoreConfig {
    let mut cfg = CoreConfig::new(ME);
    cfg.buckets = Buckets {
        default: BucketProps {
            n: 3,
            r: 1,
            w: 1,
            dw: 0,
            mode: ConflictMode::Siblings,
            max_siblings: 8,
            ttl_ms: None,
            data_type: None,
        },
        named: BTreeMap::new(),
    };
    cfg.heartbeat_ms = 100;
    cfg.hint_retry_ms = 1_000;
    cfg.hint_inflight_max = 8;
    cfg.hint_credit_max = 16;
    // These tests read the exact messages a tick sends: anti-entropy rounds stay out of them.
    cfg.ae_interval_ms = 0;
    cfg
}

/// One core, its store (which counts the writes and syncs asked for), and what it sent.
struct Node {
    core: Core,
    store: common::TestStore,
    sent: Vec<(NodeId, PeerMsg)>,
    /// Time of the call being carried out.
    now: u64,
}

impl Node {
    fn new(cfg: CoreConfig, hints: Vec<(StoreKey, u64)>) -> Node {
        Node {
            core: Core::new(cfg, ring(), EpochLease::new(1, 64), hints),
            store: common::TestStore::default(),
            sent: Vec::new(),
            now: 0,
        }
    }

    fn run(&mut self, mut outputs: Vec<Output>) {
        while let Some(out) = outputs.pop() {
            match out {
                Output::Store { id, key, op } => {
                    let result = common::carry_out(&self.store, key, op);
                    outputs.extend(self.core.handle_stored(self.now, id, result));
                }
                Output::Send { to, msg } | Output::Answer { to, msg } => self.sent.push((to, msg)),
                Output::Scan {
                    id,
                    partition,
                    after,
                    max_items,
                    max_bytes,
                } => {
                    let page = common::scan(&self.store, partition, after, max_items, max_bytes);
                    outputs.extend(self.core.handle_scanned(self.now, id, page));
                }
                Output::Reply { .. } | Output::RenewEpochs => {}
                other => panic!("not expected in these tests: {other:?}"),
            }
        }
    }

    fn peer(&mut self, now: u64, from: NodeId, msg: PeerMsg) {
        self.now = now;
        let out = self.core.handle_peer(now, from, msg);
        self.run(out);
    }

    fn tick(&mut self, now: u64) {
        self.now = now;
        let out = self.core.handle_tick(now);
        self.run(out);
    }

    /// Messages sent since the last call, heartbeats left out.
    fn take(&mut self) -> Vec<(NodeId, PeerMsg)> {
        std::mem::take(&mut self.sent)
            .into_iter()
            .filter(|(_, m)| !m.is_heartbeat())
            .collect()
    }
}

fn hint_key(home: NodeId, key: &str) -> StoreKey {
    StoreKey {
        partition: 0,
        space: Space::Hint(home),
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from(key.to_owned()),
    }
}

fn object(timestamp: u64, value: &str) -> Object {
    Object::Lww(Lww {
        timestamp,
        node: NodeId(9),
        val: Val::Value(Bytes::from(value.to_owned())),
    })
}

fn hint_put(id: u64, key: &StoreKey, value: &str) -> PeerMsg {
    PeerMsg::ReplicaPut {
        id,
        key: key.clone(),
        // Later ids win the last-write-wins merge.
        object: object(id, value),
        durable: false,
    }
}

/// The hint store holds hints up to its byte bound and refuses beyond it with `overloaded`,
/// counting each refusal; growing an existing hint past the bound is refused too, rewriting it
/// at its size is not; a restart counts the sizes it is handed, and a delivered hint frees its
/// bytes.
#[test]
fn the_hint_store_is_bounded_in_bytes() {
    let home = NodeId(2);
    let k = |i: u32| hint_key(home, &format!("k{i}"));
    let size = hint_bytes(&k(0), object(0, "v-10").encoded_len());
    let mut cfg = config();
    cfg.hint_bytes_max = 3 * size;
    let mut node = Node::new(cfg.clone(), Vec::new());
    for i in 0..4 {
        node.peer(0, NodeId(3), hint_put(u64::from(i), &k(i), "v-10"));
    }
    let answers = node.take();
    let ok = |m: &PeerMsg| matches!(m, PeerMsg::ReplicaPutOk { .. });
    assert!(answers[..3].iter().all(|(_, m)| ok(m)), "{answers:?}");
    match &answers[3].1 {
        PeerMsg::Failed { id: 3, error } => {
            assert_eq!(error.code, ErrorCode::Overloaded);
            assert!(
                error.message.contains("hint store full"),
                "{}",
                error.message
            );
        }
        other => panic!("the fourth hint was not refused: {other:?}"),
    }
    assert_eq!(node.core.hint_count(), 3);
    assert_eq!(node.core.hint_bytes(), 3 * size);
    assert_eq!(node.core.stats().hint_overflow, 1);
    assert!(
        !node.store.objects().contains_key(&k(3)),
        "a refused hint is not stored"
    );

    // Same size: accepted. Larger: refused, the stored hint unchanged.
    node.peer(0, NodeId(3), hint_put(10, &k(0), "v-11"));
    node.peer(0, NodeId(3), hint_put(11, &k(1), "a-much-longer-value"));
    let answers = node.take();
    assert!(ok(&answers[0].1), "{answers:?}");
    assert!(matches!(&answers[1].1, PeerMsg::Failed { id: 11, .. }));
    assert_eq!(node.core.stats().hint_overflow, 2);
    assert_eq!(node.core.hint_bytes(), 3 * size);

    // A restart with the stored hints counts them.
    let stored: Vec<(StoreKey, u64)> = node
        .store
        .objects()
        .iter()
        .map(|(k, o)| (k.clone(), hint_bytes(k, o.encoded_len())))
        .collect();
    let total: u64 = stored.iter().map(|(_, b)| b).sum();
    let mut restarted = Node::new(cfg, stored);
    restarted.store.memory = node.store.memory.clone();
    assert_eq!(restarted.core.hint_bytes(), total);
    assert!(total > 2 * size);

    // Delivery: credit asked, granted, hints sent, acknowledged: bytes freed.
    restarted.tick(1);
    let asked = restarted.take();
    let [(to, PeerMsg::HintCredit { id, wanted, .. })] = asked.as_slice() else {
        panic!("no credit request: {asked:?}")
    };
    assert_eq!((*to, *wanted), (home, 3));
    restarted.peer(
        2,
        home,
        PeerMsg::HintCreditOk {
            id: *id,
            granted: 3,
        },
    );
    let deliveries = restarted.take();
    assert_eq!(deliveries.len(), 3);
    for (_, m) in deliveries {
        let PeerMsg::ReplicaPut { id, .. } = m else {
            panic!("not a delivery: {m:?}")
        };
        restarted.peer(3, home, PeerMsg::ReplicaPutOk { id, durable: true });
    }
    assert_eq!(restarted.core.hint_count(), 0);
    assert_eq!(restarted.core.hint_bytes(), 0);
    assert_eq!(restarted.core.stats().hints_delivered, 3);
}

/// The holder never has more hints in flight to a home than the home granted: a grant of 2 for
/// 5 hints sends 2, and the next request for credit waits until both are answered; a grant of 0
/// sends nothing until the next round.
#[test]
fn delivery_is_paced_by_the_home() {
    let home = NodeId(2);
    let mut cfg = config();
    // Deliveries stay in flight across the rounds below rather than timing out.
    cfg.replica_timeout_ms = 10_000;
    let mut node = Node::new(cfg, Vec::new());
    for i in 0..5 {
        node.peer(
            0,
            NodeId(3),
            hint_put(i, &hint_key(home, &format!("k{i}")), "v"),
        );
    }
    node.take();
    node.tick(10);
    let asked = node.take();
    let [(_, PeerMsg::HintCredit { id, wanted, .. })] = asked.as_slice() else {
        panic!("{asked:?}")
    };
    assert_eq!(*wanted, 5);
    node.peer(
        11,
        home,
        PeerMsg::HintCreditOk {
            id: *id,
            granted: 2,
        },
    );
    let sent = node.take();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(node.core.hints_in_flight(), 2);
    let w: Vec<_> = node.core.hint_windows().collect();
    assert_eq!((w[0].granted, w[0].in_flight), (2, 2));
    // Rounds while the window is open ask nothing.
    node.tick(2_000);
    assert!(node.take().is_empty());
    let ids: Vec<u64> = sent
        .iter()
        .map(|(_, m)| match m {
            PeerMsg::ReplicaPut { id, .. } => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    node.peer(
        2_001,
        home,
        PeerMsg::ReplicaPutOk {
            id: ids[0],
            durable: true,
        },
    );
    node.tick(2_002);
    assert!(node.take().is_empty(), "one delivery still in flight");
    node.peer(
        2_003,
        home,
        PeerMsg::ReplicaPutOk {
            id: ids[1],
            durable: true,
        },
    );
    assert_eq!(node.core.hint_count(), 3);
    // The window closed with every hint delivered: the next tick asks again.
    node.tick(2_004);
    let asked = node.take();
    let [(_, PeerMsg::HintCredit { id, wanted, .. })] = asked.as_slice() else {
        panic!("{asked:?}")
    };
    assert_eq!(*wanted, 3);
    node.peer(
        2_005,
        home,
        PeerMsg::HintCreditOk {
            id: *id,
            granted: 0,
        },
    );
    assert!(node.take().is_empty());
    assert_eq!(node.core.hints_in_flight(), 0);
    node.tick(2_500);
    assert!(node.take().is_empty(), "a refused round waits for the next");
    node.tick(4_100);
    let asked = node.take();
    let [(_, PeerMsg::HintCredit { id, .. })] = asked.as_slice() else {
        panic!("{asked:?}")
    };
    // A window in which one delivery failed waits for the next round, not the next tick.
    node.peer(
        4_101,
        home,
        PeerMsg::HintCreditOk {
            id: *id,
            granted: 2,
        },
    );
    let ids: Vec<u64> = node
        .take()
        .iter()
        .map(|(_, m)| match m {
            PeerMsg::ReplicaPut { id, .. } => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 2);
    node.peer(
        4_102,
        home,
        PeerMsg::ReplicaPutOk {
            id: ids[0],
            durable: false,
        },
    );
    node.peer(
        4_103,
        home,
        PeerMsg::ReplicaPutOk {
            id: ids[1],
            durable: true,
        },
    );
    assert_eq!(node.core.hint_count(), 2);
    node.tick(4_104);
    assert!(
        node.take().is_empty(),
        "a failed window does not ask at once"
    );
    node.tick(5_100);
    assert!(matches!(
        node.take().as_slice(),
        [(_, PeerMsg::HintCredit { wanted: 2, .. })]
    ));
}

/// A home grants what is asked (up to `hint_credit_max`) when idle, scaled by its background
/// share, and nothing once its requests in flight reach `hint_busy_ops`.
#[test]
fn credit_follows_the_home_load() {
    let mut cfg = config();
    cfg.hint_busy_ops = 2;
    let mut node = Node::new(cfg, Vec::new());
    let grant = |node: &mut Node, wanted| {
        node.peer(
            0,
            NodeId(3),
            PeerMsg::HintCredit {
                id: 7,
                partition: 0,
                wanted,
            },
        );
        match node.take().as_slice() {
            [(_, PeerMsg::HintCreditOk { id: 7, granted })] => *granted,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(grant(&mut node, 10), 10);
    assert_eq!(grant(&mut node, 100), 16);
    node.core.set_background_share(0.25);
    assert_eq!(grant(&mut node, 16), 4);
    node.core.set_background_share(0.01);
    assert_eq!(grant(&mut node, 16), 1, "throttled, not busy: a trickle");
    node.core.set_background_share(1.0);
    // Two writes waiting on replicas that never answer: the home is busy.
    for req in 0..2 {
        let out = common::handle_client(
            &mut node.core,
            0,
            req,
            Message::Put(Put {
                bucket: Bytes::from_static(b"b"),
                key: Bytes::from(format!("busy{req}")),
                value: Bytes::from_static(b"v"),
                context: None,
                w: Some(3),
                dw: None,
                timeout_ms: None,
                expiry: None,
                condition: None,
            }),
        );
        node.run(out);
    }
    node.take();
    assert_eq!(node.core.ops_in_flight(), 2);
    assert_eq!(grant(&mut node, 16), 0);
}

/// A peer that stops answering heartbeats becomes suspected without any request failing, and
/// the coordinator then sends that home's replica to a fallback as a hint; its next answer
/// clears the suspicion.
#[test]
fn a_silent_peer_is_suspected_and_skipped() {
    let ring = ring();
    // A key this node is a home of, and the other homes and the first fallback.
    let (key, walk) = (0..1000)
        .map(|i| format!("key{i}"))
        .find_map(|k| {
            let p = ring.partition_of(b"b", k.as_bytes());
            let walk: Vec<NodeId> = ring.walk(PartitionId(p.0)).collect();
            (walk[0] == ME).then_some((k, walk))
        })
        .unwrap();
    let (silent, other, fallback) = (walk[1], walk[2], walk[3]);
    let mut node = Node::new(config(), Vec::new());
    let mut pings = 0;
    for t in (0..=3_000).step_by(100) {
        node.tick(t);
        for (to, m) in std::mem::take(&mut node.sent) {
            if let PeerMsg::Ping { id } = m {
                pings += 1;
                if to != silent {
                    node.peer(t + 1, to, PeerMsg::Pong { id });
                }
            }
        }
    }
    assert_eq!(pings, 31 * 3, "a ping to every other member every 100 ms");
    assert!(node.core.suspects(silent, 3_001));
    assert!(!node.core.suspects(other, 3_001));
    assert!(!node.core.suspects(fallback, 3_001));
    let out = common::handle_client(
        &mut node.core,
        3_001,
        1,
        Message::Put(Put {
            bucket: Bytes::from_static(b"b"),
            key: Bytes::from(key.clone()),
            value: Bytes::from_static(b"v"),
            context: None,
            w: None,
            dw: None,
            timeout_ms: None,
            expiry: None,
            condition: None,
        }),
    );
    node.now = 3_001;
    node.run(out);
    let sent: BTreeMap<NodeId, Space> = node
        .take()
        .into_iter()
        .filter_map(|(to, m)| match m {
            PeerMsg::ReplicaPut { key, .. } => Some((to, key.space)),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent,
        [(other, Space::Primary), (fallback, Space::Hint(silent))].into()
    );
    node.peer(3_002, silent, PeerMsg::Pong { id: 1 });
    assert!(!node.core.suspects(silent, 3_003));
}

/// A node holding one replica key, written by a peer, in a partition it replicates.
fn node_with_a_stored_key() -> (Node, StoreKey) {
    let mut node = Node::new(config(), Vec::new());
    let partition = (0..8)
        .find(|p| ring().preference_list(PartitionId(*p), 3).contains(&ME))
        .unwrap();
    let key = StoreKey {
        partition,
        space: Space::Primary,
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(b"kept"),
    };
    node.peer(0, NodeId(2), hint_put(1, &key, "v"));
    (node, key)
}

/// The ring of the three other nodes.
fn ring_without_me() -> Ring {
    let others: BTreeSet<NodeId> = (2..=4).map(NodeId).collect();
    Ring::new(PartitionCount::new(8).unwrap(), &others, 3).unwrap()
}

/// Keys in the node's anti-entropy trees of `partition`.
fn keys_in(node: &mut Node, partition: u32) -> u64 {
    node.core
        .merkle_roots()
        .iter()
        .filter(|t| t.partition == partition)
        .map(|t| t.keys)
        .sum()
}

/// A node that stops replicating a partition hands it off; if the ring gives the partition back
/// before the drop, the node keeps the data, and its anti-entropy tree (dropped with the first
/// ring change, created empty with the second) is rebuilt from storage by one more handoff pass
/// before the handoff ends, so the tree describes what is stored.
#[test]
fn a_partition_that_comes_back_during_its_handoff_gets_its_tree_rebuilt() {
    let (mut node, key) = node_with_a_stored_key();
    let partition = key.partition;
    node.take();
    assert_eq!(keys_in(&mut node, partition), 1);

    // The ring without this node: the partition is handed off (one page pushed).
    let without = ring_without_me();
    node.now = 10;
    let out = node.core.set_view(10, without, None);
    node.run(out);
    let pushed = node.take();
    assert!(!pushed.is_empty(), "nothing handed off");
    // The ring comes back before the pushes are acknowledged.
    let out = node.core.set_view(20, ring(), None);
    node.run(out);
    assert_eq!(keys_in(&mut node, partition), 0, "the tree came back empty");
    let ack = |node: &mut Node, msgs: Vec<(NodeId, PeerMsg)>, now: u64| {
        for (to, m) in msgs {
            if let PeerMsg::ReplicaPut { id, .. } = m {
                node.peer(now, to, PeerMsg::ReplicaPutOk { id, durable: true });
            }
        }
    };
    ack(&mut node, pushed, 30);
    // One more pass rebuilds the tree; once it is acknowledged the handoff ends, data kept.
    for round in 0..10 {
        node.tick(40 + round * 1_000);
        let more = node.take();
        ack(&mut node, more, 40 + round * 1_000);
    }
    assert_eq!(node.core.handoff_count(), 0, "the handoff did not end");
    assert!(
        node.store.objects().contains_key(&key),
        "the data was dropped"
    );
    assert_eq!(
        keys_in(&mut node, partition),
        1,
        "the tree does not describe storage"
    );
}

/// A view whose ring in force drops this node from a partition while its pending ring keeps it
/// there, taken in one step (gossip can bring both at once), leaves the partition's tree as it
/// was: the data stays, so must its tree.
#[test]
fn a_view_that_keeps_a_partition_only_through_its_pending_ring_keeps_its_tree() {
    let (mut node, key) = node_with_a_stored_key();
    let partition = key.partition;
    let without = ring_without_me();
    node.now = 10;
    let out = node.core.set_view(10, without, Some((2, ring())));
    node.run(out);
    assert_eq!(
        keys_in(&mut node, partition),
        1,
        "the tree lost the stored key"
    );
    assert_eq!(node.core.handoff_count(), 0);
}

/// A durable replica write of an object the store already holds unchanged (most keys a
/// handoff pushes after a join, which the new replica has just pulled) makes the store durable
/// instead of writing the object again; a changed one is written; both answer durable.
#[test]
fn a_durable_put_of_an_unchanged_object_syncs_instead_of_rewriting() {
    let (mut node, key) = node_with_a_stored_key();
    node.take();
    let counts = |node: &Node| (node.store.writes.get(), node.store.syncs.get());
    let (writes, syncs) = counts(&node);
    let durable_put = |id: u64, object: Object| PeerMsg::ReplicaPut {
        id,
        key: key.clone(),
        object,
        durable: true,
    };
    // `node_with_a_stored_key` stored `object(1, "v")`.
    node.peer(10, NodeId(2), durable_put(7, object(1, "v")));
    assert_eq!(counts(&node), (writes, syncs + 1));
    assert_eq!(
        node.take(),
        vec![(
            NodeId(2),
            PeerMsg::ReplicaPutOk {
                id: 7,
                durable: true
            }
        )]
    );
    node.peer(20, NodeId(2), durable_put(8, object(2, "w")));
    assert_eq!(counts(&node), (writes + 1, syncs + 1));
    assert_eq!(node.store.objects()[&key], object(2, "w"));
    assert_eq!(
        node.take(),
        vec![(
            NodeId(2),
            PeerMsg::ReplicaPutOk {
                id: 8,
                durable: true
            }
        )]
    );
}
