//! Building anti-entropy trees while a core serves (module docs of `coordinator/antientropy.rs`,
//! "Building the trees at startup"), and the pace of the exchanges that compare them
//! ("Pacing"), driven directly: cores whose storage operations complete at once, and loads
//! whose reads the test takes before the writes that race them.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_cluster::replica::MemoryStore;
use ringkv_core::NodeId;
use ringkv_core::bucket::{BucketProps, Buckets, ConflictMode};
use ringkv_core::coordinator::{
    AeKey, Core, CoreConfig, EpochLease, Output, PeerMsg, StoreKey, TreeRoot,
};
use ringkv_core::object::{Lww, Object, Val};
use ringkv_core::ring::{PartitionCount, Ring};
use ringkv_net::{Delete, Message, Put};

const PARTITIONS: u32 = 8;

fn props(n: u8) -> BucketProps {
    BucketProps {
        n,
        r: 1,
        w: 1,
        dw: 0,
        mode: ConflictMode::Siblings,
        max_siblings: 8,
        ttl_ms: None,
        data_type: None,
    }
}

fn config(me: NodeId, n: u8) -> CoreConfig {
    let mut cfg = CoreConfig::new(me);
    cfg.ae_interval_ms = 10;
    cfg.buckets = Buckets {
        default: props(n),
        named: BTreeMap::new(),
    };
    cfg
}

fn ring(members: &[u32]) -> Ring {
    let members: BTreeSet<NodeId> = members.iter().map(|&m| NodeId(m)).collect();
    Ring::new(PartitionCount::new(PARTITIONS).unwrap(), &members, 1).unwrap()
}

/// A one-node cluster (n = 1) and its store; every output is carried out before a call returns.
struct One {
    core: Core,
    store: MemoryStore,
    next_req: u64,
}

impl One {
    fn new() -> One {
        One {
            core: One::core(),
            store: MemoryStore::new(),
            next_req: 1,
        }
    }

    fn core() -> Core {
        Core::new(config(NodeId(1), 1), ring(&[1]), EpochLease::new(1, 8), [])
    }

    /// The node restarts on the same store: a fresh core whose trees are all loading.
    fn restart(&mut self) {
        self.core = One::core();
        self.core.trees_loading(0..PARTITIONS);
    }

    fn run(&mut self, mut outputs: Vec<Output>) {
        while let Some(out) = outputs.pop() {
            match out {
                Output::Store { id, key, op } => {
                    let result = common::carry_out(&self.store, key, op);
                    outputs.extend(self.core.handle_stored(0, id, result));
                }
                Output::Reply { message, .. } => {
                    assert!(!matches!(message, Message::Error(_)), "{message:?}");
                }
                Output::RenewEpochs | Output::PersistFloor { .. } => {}
                other => panic!("a one-node cluster with a fixed ring did {other:?}"),
            }
        }
    }

    fn client(&mut self, message: Message) {
        let req = self.next_req;
        self.next_req += 1;
        let request = common::key_request(&self.core, message);
        let out = self.core.handle_client(0, req, request);
        self.run(out);
    }

    fn put(&mut self, key: &str, value: &str) {
        self.put_in(b"b", key, value);
    }

    fn put_in(&mut self, bucket: &[u8], key: &str, value: &str) {
        self.client(Message::Put(Put {
            bucket: Bytes::copy_from_slice(bucket),
            key: Bytes::from(key.to_owned()),
            value: Bytes::from(value.to_owned()),
            context: None,
            w: None,
            dw: None,
            timeout_ms: None,
            expiry: None,
            condition: None,
        }));
    }

    fn delete(&mut self, key: &str) {
        self.client(Message::Delete(Delete {
            bucket: Bytes::from_static(b"b"),
            key: Bytes::from(key.to_owned()),
            context: None,
            w: None,
            dw: None,
            timeout_ms: None,
        }));
    }
}

/// The trees of a core that loaded `store` whole before serving (the former startup).
fn full_build(store: &BTreeMap<StoreKey, Object>) -> Vec<TreeRoot> {
    let mut core = One::core();
    for (key, object) in store {
        core.load_replica(0, key, object);
    }
    core.merkle_roots()
}

/// Loads `snapshot` (what the shell read from storage) partition by partition, ending each.
fn load(core: &mut Core, snapshot: &BTreeMap<StoreKey, Object>) {
    for p in 0..PARTITIONS {
        for (key, object) in snapshot.iter().filter(|(k, _)| k.partition == p) {
            core.load_replica(0, key, object);
        }
        core.trees_loaded(p);
    }
    assert_eq!(core.trees_loading_count(), 0);
}

/// A load that read keys before writes replaced or deleted them, and reaches the core after
/// those writes, must not put the old digests back: the trees equal a full build of the final
/// store. Fails if the load overwrites entries that writes set during it.
#[test]
fn writes_during_the_load_keep_their_digests() {
    let mut one = One::new();
    for i in 0..64 {
        one.put(&format!("k{i}"), "v1");
    }
    one.restart();
    // The shell's reads happen first; the writes come in while the load is on its way.
    let snapshot = common::stored(&one.store);
    for i in 0..16 {
        one.put(&format!("k{i}"), "v2");
    }
    for i in 16..24 {
        one.delete(&format!("k{i}"));
    }
    for i in 64..72 {
        one.put(&format!("k{i}"), "new");
    }
    load(&mut one.core, &snapshot);
    let expected = full_build(&common::stored(&one.store));
    assert_eq!(one.core.merkle_roots(), expected);
    // And the stale load did change something: without the writes the trees would differ.
    assert_ne!(full_build(&snapshot), expected);
}

/// A partition loaded while writes to other partitions go on, and writes that arrive after a
/// partition's load ended, both leave the trees equal to a full build.
#[test]
fn a_load_interleaved_with_writes_equals_a_full_build() {
    let mut one = One::new();
    for i in 0..200 {
        one.put(&format!("k{i}"), "v1");
    }
    one.restart();
    for p in 0..PARTITIONS {
        let snapshot: Vec<(StoreKey, Object)> = common::stored(&one.store)
            .into_iter()
            .filter(|(k, _)| k.partition == p)
            .collect();
        // Writes to every partition between this partition's read and its load.
        for i in (p as usize * 7..200).step_by(25) {
            one.put(&format!("k{i}"), &format!("p{p}"));
        }
        for (key, object) in &snapshot {
            one.core.load_replica(0, key, object);
        }
        one.core.trees_loaded(p);
    }
    for i in 0..10 {
        one.put(&format!("k{i}"), "after");
    }
    assert_eq!(
        one.core.merkle_roots(),
        full_build(&common::stored(&one.store))
    );
}

/// A write goes to the tree of its bucket's `n`, also when buckets differ in `n`: a core whose
/// buckets all share one `n` skips the lookup of the bucket (`AntiEntropy::one_n`), and this
/// one must not.
#[test]
fn writes_go_to_the_tree_of_their_buckets_n() {
    let mut cfg = config(NodeId(1), 1);
    cfg.buckets.named.insert(b"two".to_vec(), props(2));
    let mut one = One {
        core: Core::new(cfg, ring(&[1]), EpochLease::new(1, 8), []),
        store: MemoryStore::new(),
        next_req: 1,
    };
    for (bucket, keys) in [(&b"b"[..], 0..5), (&b"two"[..], 0..3)] {
        for k in keys {
            one.put_in(bucket, &format!("k{k}"), "v");
        }
    }
    let roots = one.core.merkle_roots();
    let keys_of = |n: u8| -> u64 { roots.iter().filter(|r| r.n == n).map(|r| r.keys).sum() };
    assert_eq!((keys_of(1), keys_of(2)), (5, 3));
}

fn sent(outputs: &[Output]) -> Vec<&PeerMsg> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send { msg, .. } | Output::Answer { msg, .. } => Some(msg),
            _ => None,
        })
        .collect()
}

/// Anti-entropy leaves a loading partition alone: no exchange starts on its trees, and a peer's
/// level, keys and reap messages for it are refused, so nothing is compared with, repaired from
/// or confirmed by an incomplete tree. Once loaded, the same messages are answered and
/// exchanges start. Fails if either side of an exchange runs on a loading tree.
#[test]
fn anti_entropy_waits_for_the_load() {
    let (me, peer) = (NodeId(1), NodeId(2));
    let mut core = Core::new(config(me, 2), ring(&[1, 2]), EpochLease::new(1, 8), []);
    core.trees_loading(0..PARTITIONS);
    let mut now = 1_000;
    for _ in 0..100 {
        now += 10;
        let out = core.handle_tick(now);
        assert!(
            !sent(&out)
                .iter()
                .any(|m| matches!(m, PeerMsg::AeLevel { .. } | PeerMsg::AeReap { .. })),
            "an exchange started on a loading tree: {out:?}"
        );
    }
    let key = AeKey {
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(b"k"),
        digest: 1,
    };
    let probes = |id: u64| {
        [
            PeerMsg::AeLevel {
                id,
                partition: 3,
                n: 2,
                depth: 0,
                hashes: vec![(0, 42)],
            },
            PeerMsg::AeKeys {
                id: id + 1,
                partition: 3,
                n: 2,
                leaves: vec![0],
                keys: vec![key.clone()],
            },
            PeerMsg::AeReap {
                id: id + 2,
                partition: 3,
                n: 2,
                keys: vec![key.clone()],
            },
        ]
    };
    for msg in probes(100) {
        let out = core.handle_peer(now, peer, msg);
        let answers = sent(&out);
        assert_eq!(answers.len(), 1, "{out:?}");
        assert!(
            matches!(answers[0], PeerMsg::Failed { .. }),
            "a loading tree answered: {out:?}"
        );
    }
    for p in 0..PARTITIONS {
        core.trees_loaded(p);
    }
    for msg in probes(200) {
        let out = core.handle_peer(now, peer, msg);
        assert!(
            !sent(&out)
                .iter()
                .any(|m| matches!(m, PeerMsg::Failed { .. })),
            "a loaded tree refused: {out:?}"
        );
    }
    let mut started = false;
    for _ in 0..10 {
        now += 10;
        let out = core.handle_tick(now);
        started |= sent(&out)
            .iter()
            .any(|m| matches!(m, PeerMsg::AeLevel { .. }));
    }
    assert!(started, "no exchange once the trees are loaded");
}

/// Partitions load independently: an exchange may start on a loaded partition's tree while
/// others still load, and only on those.
#[test]
fn loaded_partitions_exchange_while_others_load() {
    let (me, peer) = (NodeId(1), NodeId(2));
    let mut core = Core::new(config(me, 2), ring(&[1, 2]), EpochLease::new(1, 8), []);
    core.trees_loading(0..PARTITIONS);
    core.trees_loaded(5);
    let mut now = 1_000;
    let mut exchanged = BTreeSet::new();
    for _ in 0..50 {
        now += 10;
        let out = core.handle_tick(now);
        for m in sent(&out) {
            if let PeerMsg::AeLevel { id, partition, .. } = m {
                exchanged.insert(*partition);
                // The peer finds the trees equal: the exchange ends and the next may start.
                let answer = PeerMsg::AeLevelOk {
                    id: *id,
                    differing: Vec::new(),
                };
                core.handle_peer(now, peer, answer);
            }
        }
    }
    assert_eq!(exchanged, BTreeSet::from([5]));
}

/// Exchanges are paced while a core has foreground work and walk every tree at once when it is
/// idle (module docs of `antientropy.rs`, *Pacing*): with a 1 s interval, a core whose peer
/// reads from it every 10 ms starts at most one round-robin exchange per second; once nothing
/// came for a second, it compares all its trees within a tenth of a second, twice, then rests
/// at the paced interval.
#[test]
fn exchanges_run_back_to_back_once_the_core_is_idle() {
    use ringkv_core::coordinator::Space;
    let (me, peer) = (NodeId(1), NodeId(2));
    let mut cfg = config(me, 2);
    cfg.ae_interval_ms = 1_000;
    let mut core = Core::new(cfg, ring(&[1, 2]), EpochLease::new(1, 8), []);
    // Ticks every 10 ms for `ms`, the peer finding every tree equal; returns the partitions
    // whose exchanges started, in order. `busy`: the peer reads a key at every tick.
    let mut now = 1_000;
    let mut read_id = 0;
    let mut run = |core: &mut Core, ms: u64, busy: bool| -> Vec<u32> {
        let mut started = Vec::new();
        for _ in 0..ms / 10 {
            now += 10;
            if busy {
                read_id += 1;
                let key = StoreKey {
                    partition: 0,
                    space: Space::Primary,
                    bucket: Bytes::from_static(b"b"),
                    key: Bytes::from_static(b"k"),
                };
                core.handle_peer(now, peer, PeerMsg::ReplicaGet { id: read_id, key });
            }
            for m in sent(&core.handle_tick(now)) {
                if let PeerMsg::AeLevel { id, partition, .. } = m {
                    started.push(*partition);
                    let answer = PeerMsg::AeLevelOk {
                        id: *id,
                        differing: Vec::new(),
                    };
                    core.handle_peer(now, peer, answer);
                }
            }
        }
        started
    };
    let busy = run(&mut core, 3_000, true);
    assert!(
        busy.len() <= 3,
        "{} exchanges in 3 s under foreground work",
        busy.len()
    );
    // The first idle second is still paced; the walk follows.
    let idle = run(&mut core, 1_100, false);
    assert!(idle.len() >= PARTITIONS as usize, "{idle:?}");
    assert_eq!(
        idle.iter().collect::<BTreeSet<_>>().len(),
        PARTITIONS as usize,
        "{idle:?}"
    );
    // Two passes over the trees that changed nothing: it rests at the paced interval again.
    let resting = run(&mut core, 3_000, false);
    assert!(
        idle.len() + resting.len() <= 2 * PARTITIONS as usize + 4,
        "{} exchanges while idle, {} more after",
        idle.len(),
        resting.len()
    );
    assert!(!resting.is_empty(), "the paced rounds go on");
    // A read changes no tree: after it the core rests on.
    let after_read = {
        run(&mut core, 10, true);
        run(&mut core, 1_500, false)
    };
    assert!(after_read.len() <= 2, "{after_read:?}");
    // A tree whose content changes (here a load) sends the idle core over its trees again.
    let key = StoreKey {
        partition: 3,
        space: Space::Primary,
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(b"new"),
    };
    let object = Object::Lww(Lww {
        timestamp: 1,
        node: NodeId(2),
        val: Val::Value(Bytes::from_static(b"v")),
    });
    core.load_replica(0, &key, &object);
    let walked = run(&mut core, 200, false);
    assert!(walked.len() >= PARTITIONS as usize, "{walked:?}");
}
