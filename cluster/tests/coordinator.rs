//! The coordinator's answers for requests it must refuse, driven directly: a one-node cluster
//! whose storage operations complete at once. Each error says what happened, with the numbers.
//! (Replication, faults and convergence are the simulator's: `tests/tests/sim.rs`.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ringkv_core::NodeId;
use ringkv_core::bucket::{BucketProps, BucketType, Buckets, ConflictMode};
use ringkv_core::coordinator::{Core, CoreConfig, EpochLease, Output, StoreKey, StoreOp};
use ringkv_core::object::{Object, Val};
use ringkv_core::ring::{PartitionCount, Ring};
use ringkv_net::{
    Apply, ApplyOk, Condition, CrdtOp, CrdtType, CrdtValue, Delete, ErrorBody, ErrorCode, Expiry,
    FieldOp, FieldValue, Get, GetOk, MapOp, Message, Put, Sibling, Update,
};

/// One node and its store; every output is carried out before a call returns.
struct One {
    core: Core,
    /// Its store; `store.failing_writes` makes storage writes fail (an engine that returned EIO
    /// and went failed).
    store: common::TestStore,
    replies: BTreeMap<u64, Message>,
    /// The time of the last call; storage completes at once, at that time.
    now: u64,
    /// Storage reads carried out.
    reads: usize,
}

impl One {
    fn new(props: BucketProps) -> One {
        One::with(props, |_| {})
    }

    /// [`One::new`] with its configuration changed by `change`.
    fn with(props: BucketProps, change: impl FnOnce(&mut CoreConfig)) -> One {
        let me = NodeId(1);
        let mut cfg = CoreConfig::new(me);
        cfg.tombstone_grace_ms = 1_000;
        cfg.expiry_grace_ms = 1_000;
        cfg.buckets = Buckets {
            default: props,
            named: BTreeMap::new(),
        };
        change(&mut cfg);
        let members: BTreeSet<NodeId> = [me].into();
        let ring = Ring::new(PartitionCount::new(8).unwrap(), &members, 1).unwrap();
        One {
            core: Core::new(cfg, ring, EpochLease::new(1, 8), []),
            store: common::TestStore::default(),
            replies: BTreeMap::new(),
            now: 0,
            reads: 0,
        }
    }

    fn run(&mut self, mut outputs: Vec<Output>) {
        while let Some(out) = outputs.pop() {
            match out {
                Output::Store { id, key, op } => {
                    outputs.extend(self.store(self.now, id, key, op));
                }
                Output::Reply { req, message } => {
                    self.replies.insert(req, message);
                }
                Output::Send { to, .. } | Output::Answer { to, .. } => {
                    panic!("a one-node cluster sent to {to}")
                }
                Output::RenewEpochs => {}
                Output::PersistFloor { floor } => self.core.handle_floor_persisted(floor),
                other => panic!("a one-node cluster with a fixed ring moved data: {other:?}"),
            }
        }
    }

    /// Carries out storage operation `id` at `now`, counting reads; the core's outputs.
    fn store(&mut self, now: u64, id: u64, key: StoreKey, op: StoreOp) -> Vec<Output> {
        if matches!(op, StoreOp::Read) {
            self.reads += 1;
        }
        let result = common::carry_out(&self.store, key, op);
        self.core.handle_stored(now, id, result)
    }

    fn request(&mut self, req: u64, message: Message) -> Message {
        self.request_at(0, req, message)
    }

    fn request_at(&mut self, now: u64, req: u64, message: Message) -> Message {
        let request = common::key_request(&self.core, message);
        self.now = now;
        let out = self.core.handle_client(now, req, request);
        self.run(out);
        self.replies.remove(&req).expect("answered at once")
    }
}

fn put(value: &str, context: Option<Bytes>, w: Option<u8>) -> Message {
    Message::Put(Put {
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(b"k"),
        value: Bytes::from(value.to_owned()),
        context,
        w,
        dw: None,
        timeout_ms: None,
        expiry: None,
        condition: None,
    })
}

fn delete(context: Option<Bytes>) -> Message {
    Message::Delete(Delete {
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(b"k"),
        context,
        w: None,
        dw: None,
        timeout_ms: None,
    })
}

fn get(r: Option<u8>) -> Message {
    Message::Get(Get {
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(b"k"),
        r,
        timeout_ms: None,
    })
}

fn code(m: &Message) -> Option<ErrorCode> {
    match m {
        Message::Error(e) => Some(e.code),
        _ => None,
    }
}

fn props(n: u8) -> BucketProps {
    BucketProps {
        n,
        r: 1,
        w: 1,
        dw: 0,
        mode: ConflictMode::Siblings,
        max_siblings: 3,
        ttl_ms: None,
        data_type: None,
    }
}

/// The answer `one` gives a GET (`r` as asked) both ways: coordinated, and read locally as a
/// shard does when the core allows it (`None` in place of the latter if it does not).
fn both_reads(one: &mut One, now: u64, req: u64, r: Option<u8>) -> (Message, Option<Message>) {
    let request = common::key_request(&one.core, get(r));
    let local = one.core.local_read(now, &request).map(|key| {
        let stored = common::carry_out(&one.store, key, StoreOp::Read).unwrap();
        one.core.local_read_reply(now, stored)
    });
    (one.request_at(now, req, get(r)), local)
}

/// A GET whose only replica is this node, asking for `r = 1`, may be read by the shell itself,
/// and the answer is the coordinated read's for every kind of stored key: absent, a value,
/// siblings, a deletion beside a value, an expired value, a convergent counter. Any other GET,
/// and any other request, is coordinated.
#[test]
fn a_get_whose_only_replica_is_here_is_read_locally_with_the_coordinated_answer() {
    let mut checked = 0;
    let mut same = |one: &mut One, now: u64, what: &str| {
        checked += 1;
        let (coordinated, local) = both_reads(one, now, 1_000 + checked, None);
        assert!(
            matches!(coordinated, Message::GetOk(_)),
            "{what}: {coordinated:?}"
        );
        assert_eq!(local.as_ref(), Some(&coordinated), "{what}");
    };
    let mut one = One::new(props(1));
    same(&mut one, 0, "absent");
    one.request_at(0, 1, put("a", None, None));
    same(&mut one, 0, "a value");
    one.request_at(0, 2, put("b", None, None));
    same(&mut one, 0, "two siblings");
    let ctx = context(&one.request_at(0, 3, get(None)));
    one.request_at(0, 4, delete(Some(ctx)));
    one.request_at(0, 5, put("c", None, None));
    same(&mut one, 0, "a deletion beside a value");
    let mut lww = One::new(lww_props());
    lww.request_at(10, 1, put_expiring("s", Some(Expiry::Ttl { ms: 5 })));
    same(&mut lww, 12, "a live expiring value");
    same(&mut lww, 14, "an expiring value in its last millisecond");
    same(&mut lww, 15, "an expired value");
    lww.request_at(16, 2, put_expiring("p", None));
    same(&mut lww, 16, "a plain value");
    lww.request_at(17, 3, delete(None));
    same(&mut lww, 17, "a deleted value");
    lww.request_at(20, 4, incr(3, None));
    same(&mut lww, 20, "a counter");
    assert_eq!(one.core.stats().local_reads, 4);
    assert_eq!(lww.core.stats().local_reads, 6);

    // A bucket with more replicas than members reads locally too: its `n` is capped at one.
    let mut capped = One::new(props(3));
    capped.request_at(0, 1, put("x", None, None));
    let (coordinated, local) = both_reads(&mut capped, 0, 2, None);
    assert_eq!(local, Some(coordinated));
    // An `r` above the one replica is the coordinated read's to refuse, with its counts.
    let (refused, local) = both_reads(&mut capped, 0, 3, Some(2));
    assert_eq!(
        code(&refused),
        Some(ErrorCode::NotEnoughReplicas),
        "{refused:?}"
    );
    assert_eq!(local, None);
    let request = common::key_request(&capped.core, put("y", None, None));
    assert!(capped.core.local_read(0, &request).is_none(), "a put");

    // With two members, a key of `n = 1` is read here only if this node is its home, and a
    // key of `n = 2` never.
    let me = NodeId(1);
    let members: BTreeSet<NodeId> = [me, NodeId(2)].into();
    let ring = Ring::new(PartitionCount::new(8).unwrap(), &members, 2).unwrap();
    let mut cfg = CoreConfig::new(me);
    let mut named = BTreeMap::new();
    named.insert(b"two".to_vec(), props(2));
    cfg.buckets = Buckets {
        default: props(1),
        named,
    };
    let mut core = Core::new(cfg, ring.clone(), EpochLease::new(1, 8), []);
    let mut homes = BTreeSet::new();
    for i in 0..64 {
        let key = Bytes::from(format!("k{i}"));
        let home = ring.preference_list(ring.partition_of(b"b", &key), 1)[0];
        for bucket in [&b"b"[..], b"two"] {
            let request = common::key_request(
                &core,
                Message::Get(Get {
                    bucket: Bytes::copy_from_slice(bucket),
                    key: key.clone(),
                    r: None,
                    timeout_ms: None,
                }),
            );
            let here = core.local_read(0, &request).is_some();
            assert_eq!(here, bucket == b"b" && home == me, "{bucket:?} {key:?}");
        }
        homes.insert(home);
    }
    assert_eq!(homes.len(), 2, "keys of both homes were tried");
}

/// A put `one` may write itself as a shard does ([`Core::local_write`]), written and answered,
/// with whether the write was a synced one; `None` if the core does not allow it.
fn local_put(one: &mut One, now: u64, message: Message) -> Option<(Message, bool)> {
    let mut request = common::key_request(&one.core, message);
    let write = one.core.local_write(now, &mut request)?;
    let StoreOp::Write { durable, .. } = write.op else {
        panic!("a local write is a write: {:?}", write.op)
    };
    common::carry_out(&one.store, write.key.clone(), write.op.clone()).unwrap();
    Some((one.core.local_write_done(now, write), durable))
}

/// An unconditional put of an `lww` bucket whose only replica is here, over a key whose stored
/// stamp is known, may be written by the shell itself; it stores the object, sets the tree and
/// answers as the coordinated write does (two cores fed the same writes stay identical, one
/// coordinating every write, the other writing locally where allowed). A new key, a condition,
/// a context, `w` or `dw` above what one replica gives, a node that syncs its writes, a
/// siblings bucket, a key with a job in flight and a tree still loading are coordinated.
#[test]
fn an_lww_put_whose_only_replica_is_here_is_written_locally_as_coordinated() {
    let buffered = |cfg: &mut CoreConfig| cfg.durable_writes = false;
    let ttl = |ms| put_expiring("e", Some(Expiry::Ttl { ms }));
    let Message::Put(p) = put("v5", None, None) else {
        unreachable!()
    };
    let dw1 = Message::Put(Put { dw: Some(1), ..p });
    // A buffered node, then one that syncs its writes (the default): each write is synced
    // exactly when the coordinated one syncs its home's copy.
    for sync in [false, true] {
        let change = |cfg: &mut CoreConfig| cfg.durable_writes = sync;
        let mut coordinated = One::with(lww_props(), change);
        let mut local = One::with(lww_props(), change);
        let writes = [
            (10, put("v1", None, None), false),
            (20, put("v2", None, None), true),
            (20, put("v3", None, None), true),
            (30, ttl(5), true),
            (40, put("v4", None, None), true),
            (40, dw1.clone(), true),
        ];
        for (i, (now, message, allowed)) in writes.into_iter().enumerate() {
            let want = coordinated.request_at(now, i as u64, message.clone());
            let got = match local_put(&mut local, now, message.clone()) {
                Some((answer, durable)) => {
                    assert!(allowed, "write {i} was written locally (sync {sync})");
                    let synced = sync || i == 5;
                    assert_eq!(durable, synced, "write {i} (sync {sync})");
                    answer
                }
                None => {
                    assert!(!allowed, "write {i} was coordinated (sync {sync})");
                    local.request_at(now, i as u64, message)
                }
            };
            assert_eq!(got, want, "write {i}");
            assert_eq!(
                local.store.objects(),
                coordinated.store.objects(),
                "write {i}"
            );
            assert_eq!(local.core.merkle_roots(), coordinated.core.merkle_roots());
            assert_eq!(local.store.syncs.get(), coordinated.store.syncs.get());
        }
        assert_eq!(local.core.stats().local_writes, 5);
        assert_eq!(local.core.stats().blind_writes, 5);
        assert_eq!(
            read_at(&mut local, 50, 90),
            read_at(&mut coordinated, 50, 90)
        );
    }
    let mut local = One::with(lww_props(), buffered);
    local.request_at(10, 1, put("v1", None, None));
    // A value stamped far ahead (a replica whose clock ran ahead): the local write's stamp
    // passes it, and the write replaces it.
    let (key, _) = local.store.objects().into_iter().next().unwrap();
    let ahead = 1 << 60;
    load_lww(&mut local, &key, ahead);
    assert!(local_put(&mut local, 50, put("v5", None, None)).is_some());
    let read = read_at(&mut local, 50, 91);
    assert_eq!(read.siblings, vec![Sibling::Value(b("v5"))]);
    match &local.store.objects()[&key] {
        Object::Lww(lww) => assert!(lww.timestamp > ahead, "{lww:?}"),
        other => panic!("{other:?}"),
    }

    // A refused put keeps its key and value for the coordinated path, also when refused after
    // they moved into the write (a job in flight, a loading tree, a value too large).
    let refused = |one: &mut One, message: Message, why: &str| {
        let mut request = common::key_request(&one.core, message);
        let before = request.clone();
        assert!(one.core.local_write(60, &mut request).is_none(), "{why}");
        assert_eq!(request, before, "{why}");
    };
    refused(&mut local, put_if("c", Condition::IfPresent), "a condition");
    let ctx = Some(Bytes::from_static(b"\x01\x00\x00\x00\x00"));
    refused(&mut local, put("c", ctx, None), "a context");
    refused(&mut local, put("c", None, Some(2)), "w = 2");
    refused(&mut local, get(None), "a get");
    // A job of the key holds its lock until its write is stored.
    let request = common::key_request(&local.core, put("w", None, None));
    let outputs = local.core.handle_client(60, 91, request);
    refused(&mut local, put("c", None, None), "a job in flight");
    local.run(outputs);
    assert!(local_put(&mut local, 60, put("c", None, None)).is_some());
    // A ring change pending: its new replicas get a copy of every write, which only the
    // coordinated path sends.
    let ring = local.core.ring().clone();
    let members: BTreeSet<NodeId> = [NodeId(1), NodeId(2)].into();
    let next = Ring::new(PartitionCount::new(8).unwrap(), &members, 1).unwrap();
    let _ = local.core.set_view(60, ring.clone(), Some((1, next)));
    refused(&mut local, put("c", None, None), "a ring change pending");
    let _ = local.core.set_view(60, ring, None);
    assert!(local_put(&mut local, 60, put("c", None, None)).is_some());
    let partition = common::key_request(&local.core, get(None)).partition().0;
    local.core.trees_loading([partition]);
    refused(&mut local, put("c", None, None), "a loading tree");

    // A store that declines the write (it would wait, or failed): the shell hands the put to
    // the coordinated path, which stamps it again, above the stamp it dropped.
    let mut fallback = One::with(lww_props(), buffered);
    fallback.request_at(0, 1, put("a", None, None));
    let mut request = common::key_request(&fallback.core, put("b", None, None));
    let before = request.clone();
    let dropped = fallback.core.local_write(10, &mut request).unwrap();
    let StoreOp::Write {
        object: Object::Lww(first),
        ..
    } = &dropped.op
    else {
        panic!("{dropped:?}")
    };
    let first = first.clone();
    let dropped_key = dropped.key.clone();
    assert_ne!(request, before, "the write holds the key and value");
    dropped.give_back(&mut request);
    assert_eq!(request, before, "given back as it came");
    let answer = fallback.request_at(10, 2, put("b", None, None));
    assert!(matches!(answer, Message::PutOk(_)), "{answer:?}");
    match &fallback.store.objects()[&dropped_key] {
        Object::Lww(stored) => {
            assert!(stored.timestamp > first.timestamp, "{stored:?} {first:?}");
            assert_eq!(stored.val, first.val);
        }
        other => panic!("{other:?}"),
    }

    let mut siblings = One::with(props(1), buffered);
    siblings.request_at(0, 1, put("a", None, None));
    refused(&mut siblings, put("b", None, None), "a siblings bucket");

    let mut small = One::with(lww_props(), |cfg: &mut CoreConfig| {
        cfg.durable_writes = false;
        cfg.object_bytes_max = 64;
    });
    small.request_at(0, 1, put("a", None, None));
    let large = String::from_utf8(vec![b'x'; 100]).unwrap();
    refused(&mut small, put(&large, None, None), "a value too large");
    assert!(local_put(&mut small, 10, put("c", None, None)).is_some());
}

/// Blind writes pile up as siblings until the bucket's limit, then are refused with a message
/// naming both counts; a write with the read's context resolves them all.
#[test]
fn sibling_limit_refuses_and_context_resolves() {
    let mut one = One::new(props(1));
    for (i, v) in ["a", "b", "c"].into_iter().enumerate() {
        assert!(matches!(
            one.request(i as u64, put(v, None, None)),
            Message::PutOk(_)
        ));
    }
    let refused = one.request(10, put("d", None, None));
    assert_eq!(code(&refused), Some(ErrorCode::TooManySiblings));
    let Message::Error(e) = &refused else {
        unreachable!()
    };
    assert!(
        e.message.contains("4 siblings") && e.message.contains("limit of 3"),
        "{}",
        e.message
    );
    let Message::GetOk(read) = one.request(11, get(None)) else {
        panic!("read failed")
    };
    assert_eq!(read.siblings.len(), 3);
    assert!(matches!(
        one.request(12, put("merged", Some(read.context), None)),
        Message::PutOk(_)
    ));
    let Message::GetOk(read) = one.request(13, get(None)) else {
        panic!("read failed")
    };
    assert_eq!(
        read.siblings,
        vec![Sibling::Value(Bytes::from_static(b"merged"))]
    );
}

/// Contexts that do not decode, and quorums the cluster cannot reach, are refused with their
/// own codes before anything is written.
#[test]
fn bad_contexts_and_unreachable_quorums_are_refused() {
    let mut one = One::new(props(3));
    let bad = one.request(1, put("x", Some(Bytes::from_static(b"\x02junk")), None));
    assert_eq!(code(&bad), Some(ErrorCode::BadContext));
    // n = 3 but the cluster has one member: w = 2 cannot be met, and the message says so.
    let short = one.request(2, put("x", None, Some(2)));
    assert_eq!(code(&short), Some(ErrorCode::NotEnoughReplicas));
    let Message::Error(e) = &short else {
        unreachable!()
    };
    assert!(e.message.contains("0 of 2"), "{}", e.message);
    let invalid = one.request(3, get(Some(4)));
    assert_eq!(code(&invalid), Some(ErrorCode::InvalidRequest));
    assert!(one.store.objects().is_empty(), "nothing was written");
}

/// An lww bucket answers one value, the last written, whatever the contexts.
#[test]
fn lww_keeps_the_last_write() {
    let mut one = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    for (i, v) in ["a", "b", "c"].into_iter().enumerate() {
        // No context to write back with: a later write replaces this one whatever it says.
        let ok = one.request(i as u64, put(v, None, None));
        assert!(
            matches!(&ok, Message::PutOk(p) if p.context.is_empty()),
            "{ok:?}"
        );
    }
    let Message::GetOk(read) = one.request(9, get(None)) else {
        panic!("read failed")
    };
    assert_eq!(
        read.siblings,
        vec![Sibling::Value(Bytes::from_static(b"c"))]
    );
    assert!(read.context.is_empty());
    // A siblings bucket's write answers the context of what it wrote.
    let mut causal = One::new(props(1));
    let ok = causal.request(1, put("a", None, None));
    assert!(
        matches!(&ok, Message::PutOk(p) if !p.context.is_empty()),
        "{ok:?}"
    );
}

/// A one-node lww store holding one key, written once at time 10 (a read: the key was new).
fn lww_one_with_a_key() -> (One, StoreKey) {
    let mut one = One::new(lww_props());
    assert!(matches!(
        one.request_at(10, 1, put("a", None, None)),
        Message::PutOk(_)
    ));
    assert_eq!(one.reads, 1, "a new key is read");
    let (key, _) = one.store.objects().into_iter().next().unwrap();
    (one, key)
}

/// An lww value stamped `timestamp` by node 9, written to `one`'s store under `key` and loaded
/// into its tree, as a restart's load of the store would.
fn load_lww(one: &mut One, key: &StoreKey, timestamp: u64) -> Object {
    let object = Object::Lww(ringkv_core::object::Lww {
        timestamp,
        node: NodeId(9),
        val: Val::new(Bytes::from(timestamp.to_string()), None),
    });
    let write = StoreOp::Write {
        object: object.clone(),
        durable: false,
    };
    common::carry_out(&one.store, key.clone(), write).unwrap();
    one.core.load_replica(one.now, key, &object);
    object
}

/// An lww PUT over a key whose stored object is known to be a plain lww value skips the read of
/// the local replica. Its stamp is still above the stored one, even one stamped by a clock far
/// ahead (loaded from storage as a restart does), so it is the write a read would have made.
/// A new key and a conditional PUT still read.
#[test]
fn an_lww_put_over_a_known_lww_value_skips_the_read() {
    let (mut one, key) = lww_one_with_a_key();
    assert!(matches!(
        one.request_at(11, 2, put("b", None, None)),
        Message::PutOk(_)
    ));
    assert_eq!(one.reads, 1, "a known lww value is not");
    assert_eq!(one.core.stats().blind_writes, 1);

    let ahead = u64::MAX / 4;
    load_lww(&mut one, &key, ahead);
    assert!(matches!(
        one.request_at(13, 3, put("c", None, None)),
        Message::PutOk(_)
    ));
    assert_eq!(one.reads, 1);
    match one.store.objects().get(&key) {
        Some(Object::Lww(l)) => assert!(l.timestamp > ahead, "stamped {} <= {ahead}", l.timestamp),
        other => panic!("not an lww object: {other:?}"),
    }
    assert_eq!(
        read_at(&mut one, 14, 4).siblings,
        vec![Sibling::Value(Bytes::from_static(b"c"))]
    );

    let reads = one.reads;
    let kept = one.request_at(15, 5, put_if("d", Condition::IfAbsent));
    assert_eq!(code(&kept), Some(ErrorCode::ConditionFailed));
    assert_eq!(one.reads, reads + 1, "a condition reads the replica");

    // While the partition's trees load from storage, the entry is not trusted.
    one.core.trees_loading([key.partition]);
    assert!(matches!(
        one.request_at(16, 6, put("e", None, None)),
        Message::PutOk(_)
    ));
    assert_eq!(one.reads, reads + 2, "a loading tree reads the replica");
    one.core.trees_loaded(key.partition);
    assert!(matches!(
        one.request_at(17, 7, put("f", None, None)),
        Message::PutOk(_)
    ));
    assert_eq!(one.reads, reads + 2);

    // A stamp at the clock's end cannot be passed: the write merges, and loses to it.
    let last = load_lww(&mut one, &key, u64::MAX);
    assert!(matches!(
        one.request_at(19, 8, put("g", None, None)),
        Message::PutOk(_)
    ));
    assert_eq!(one.reads, reads + 3, "a stamp at the clock's end is read");
    assert_eq!(one.store.objects().get(&key), Some(&last));
}

/// A replica merge of an lww value newer than the known stored one writes it without a read; an
/// older one still reads, and the stored value stays.
#[test]
fn a_newer_lww_replica_value_is_merged_without_a_read() {
    use ringkv_core::coordinator::PeerMsg;
    use ringkv_core::object::Lww;
    let (mut one, key) = lww_one_with_a_key();
    let Some(Object::Lww(stored)) = one.store.objects().get(&key).cloned() else {
        panic!("not an lww object")
    };
    // Carries out a peer's replica write, counting storage reads; returns whether it was
    // answered.
    let replica_put = |one: &mut One, id: u64, timestamp: u64, value: &'static [u8]| {
        let msg = PeerMsg::ReplicaPut {
            id,
            key: key.clone(),
            object: Object::Lww(Lww {
                timestamp,
                node: NodeId(2),
                val: Val::new(Bytes::from_static(value), None),
            }),
            durable: false,
        };
        let mut outputs = one.core.handle_peer(20, NodeId(2), msg);
        let mut answered = false;
        while let Some(out) = outputs.pop() {
            match out {
                Output::Store { id, key, op } => outputs.extend(one.store(20, id, key, op)),
                Output::Answer { to, .. } => answered |= to == NodeId(2),
                _ => {}
            }
        }
        answered
    };
    let reads = one.reads;
    assert!(replica_put(&mut one, 1, stored.timestamp + 1, b"newer"));
    assert_eq!(one.reads, reads, "a newer value is merged blind");
    let newer = one.store.objects().get(&key).cloned();
    assert!(
        matches!(&newer, Some(Object::Lww(l)) if l.val == Val::new(Bytes::from_static(b"newer"), None))
    );
    assert!(replica_put(&mut one, 2, stored.timestamp, b"older"));
    assert_eq!(one.reads, reads + 1, "an older value is read and merged");
    assert_eq!(one.store.objects().get(&key).cloned(), newer);
}

/// A context naming this node's own actor at an absurd counter: `bad_context`, not a crash of
/// the core (the next dot would overflow).
#[test]
fn forged_counters_are_refused() {
    let mut one = One::new(props(1));
    // Version 2, one entry: node 1, epoch 1 (this core's primary epoch), counter u64::MAX.
    let mut forged = vec![2u8];
    forged.extend_from_slice(&1u32.to_le_bytes());
    forged.extend_from_slice(&1u32.to_le_bytes());
    forged.extend_from_slice(&1u32.to_le_bytes());
    forged.extend_from_slice(&u64::MAX.to_le_bytes());
    let refused = one.request(1, put("x", Some(Bytes::from(forged)), None));
    assert_eq!(code(&refused), Some(ErrorCode::BadContext));
}

/// A bucket switched from siblings to lww: a write onto a key that still holds siblings is
/// readable afterwards (it supersedes them), not acknowledged and then lost to the older,
/// causal object.
#[test]
fn lww_write_onto_siblings_supersedes_them() {
    let mut before = One::new(props(1));
    assert!(matches!(
        before.request(1, put("old-a", None, None)),
        Message::PutOk(_)
    ));
    assert!(matches!(
        before.request(2, put("old-b", None, None)),
        Message::PutOk(_)
    ));
    let mut after = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    after.store = std::mem::take(&mut before.store);
    // The siblings known to the tree (as a load from storage leaves them) are still read, not
    // overwritten blind.
    let (key, siblings) = after.store.objects().into_iter().next().unwrap();
    after.core.load_replica(0, &key, &siblings);
    assert!(matches!(
        after.request(3, put("new", None, None)),
        Message::PutOk(_)
    ));
    assert_eq!(after.reads, 1, "siblings in storage are read");
    let Message::GetOk(read) = after.request(4, get(None)) else {
        panic!("read failed")
    };
    assert_eq!(
        read.siblings,
        vec![Sibling::Value(Bytes::from_static(b"new"))]
    );
}

/// Writes coordinated away from every home each add an actor (a fresh epoch) to the key's
/// clock. Every context handed out still decodes; once the clock would outgrow what a context
/// carries, the write is refused with `too_large` and a message saying why.
#[test]
fn clocks_never_outgrow_their_contexts() {
    let (n1, n2) = (NodeId(1), NodeId(2));
    let members: BTreeSet<NodeId> = [n1, n2].into();
    let ring = Ring::new(PartitionCount::new(8).unwrap(), &members, 1).unwrap();
    // A key whose only home (n = 1) is node 1; node 2 coordinates it while node 1 is down.
    let key = (0..100)
        .map(|i| Bytes::from(format!("k{i}")))
        .find(|k| ring.preference_list(ring.partition_of(b"b", k), 1) == vec![n1])
        .unwrap();
    let mut cfg = CoreConfig::new(n2);
    cfg.buckets = Buckets {
        default: props(1),
        named: BTreeMap::new(),
    };
    let mut one = One {
        core: Core::new(cfg, ring, EpochLease::new(1, 4096), []),
        store: common::TestStore::default(),
        replies: BTreeMap::new(),
        now: 0,
        reads: 0,
    };
    let out = one.core.handle_unreachable(0, n1);
    one.run(out);
    let mut context: Option<Bytes> = None;
    for i in 0..(ringkv_core::dvv::CONTEXT_ENTRIES_MAX as u64 + 10) {
        let write = Message::Put(Put {
            bucket: Bytes::from_static(b"b"),
            key: key.clone(),
            value: Bytes::from(format!("v{i}")),
            context: context.clone(),
            w: None,
            dw: None,
            timeout_ms: None,
            expiry: None,
            condition: None,
        });
        let ack = one.request(10_000 + i, write);
        if let Message::Error(e) = &ack {
            assert_eq!(e.code, ErrorCode::TooLarge, "write {i}: {}", e.message);
            assert!(e.message.contains("actors"), "{}", e.message);
            assert!(i >= 200, "refused early, at write {i}");
            return;
        }
        let read = Message::Get(Get {
            bucket: Bytes::from_static(b"b"),
            key: key.clone(),
            r: None,
            timeout_ms: None,
        });
        let Message::GetOk(read) = one.request(20_000 + i, read) else {
            panic!("read failed")
        };
        assert_eq!(
            read.siblings.len(),
            1,
            "the context resolved the previous value"
        );
        context = Some(read.context);
    }
    panic!("the clock grew past the context limit without a refusal");
}

fn siblings(m: &Message) -> Vec<Sibling> {
    match m {
        Message::GetOk(ok) => ok.siblings.clone(),
        other => panic!("expected GET_OK, got {other:?}"),
    }
}

fn context(m: &Message) -> Bytes {
    match m {
        Message::GetOk(ok) => ok.context.clone(),
        Message::PutOk(ok) => ok.context.clone(),
        other => panic!("expected a context, got {other:?}"),
    }
}

/// A reaped tombstone never lets a later write reuse a dot: a client holding a context read
/// before the deletion writes after the reap, following a blind write that re-created the key;
/// the blind write must survive as a sibling, not be superseded by a context that never saw it.
/// The reap raises the epoch floor first (the tombstone holds this node's current epoch), and
/// the key is gone from storage and from its tree afterwards.
#[test]
fn a_reap_never_lets_a_dot_repeat() {
    let mut one = One::new(props(1));
    let grace = 1_000;
    one.core.set_ae_interval_ms(10);
    let v1 = one.request_at(0, 1, put("v1", None, None));
    let stale = context(&v1);
    let read = one.request_at(1, 2, get(None));
    let deleted = one.request_at(2, 3, delete(Some(context(&read))));
    assert_eq!(deleted, Message::DeleteOk);
    assert_eq!(one.store.objects().len(), 1, "the tombstone is stored");
    // Ticks past the grace period: the first reap attempt raises the floor, a later one reaps.
    let mut now = 3;
    while now < 4 * grace && !one.store.objects().is_empty() {
        now += 10;
        one.now = now;
        let out = one.core.handle_tick(now);
        one.run(out);
    }
    assert!(one.store.objects().is_empty(), "the tombstone was reaped");
    assert_eq!(one.core.merkle_roots()[0].keys, 0, "the key left the tree");
    let blind = one.request_at(now, 4, put("blind", None, None));
    assert!(matches!(blind, Message::PutOk(_)), "{blind:?}");
    let late = one.request_at(now, 5, put("late", Some(stale), None));
    assert!(matches!(late, Message::PutOk(_)), "{late:?}");
    let values = siblings(&one.request_at(now, 6, get(None)));
    assert_eq!(
        values,
        vec![
            Sibling::Value(Bytes::from_static(b"blind")),
            Sibling::Value(Bytes::from_static(b"late"))
        ],
        "the blind write survives the stale context"
    );
    let stats = one.core.stats();
    assert_eq!(stats.tombstones_reaped, 1);
    assert_eq!(stats.floor_raises, 1);
}

/// A write sent to a node that is not one of the key's homes is forwarded to a home with what
/// is left of the request's deadline: the whole of it at first, and, when that home is lost and
/// the write moves to the next one, only the time that remains, so no home works on a request
/// after its client stopped waiting.
#[test]
fn a_forwarded_write_carries_what_is_left_of_its_deadline() {
    use ringkv_core::coordinator::PeerMsg;
    let me = NodeId(1);
    let mut cfg = CoreConfig::new(me);
    cfg.buckets = Buckets {
        default: BucketProps { n: 2, ..props(2) },
        named: BTreeMap::new(),
    };
    let members: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    let ring = Ring::new(PartitionCount::new(8).unwrap(), &members, 2).unwrap();
    // A key whose two homes are other nodes.
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| {
            let p = ring.partition_of(b"b", k.as_bytes());
            !ring.preference_list(p, 2).contains(&me)
        })
        .unwrap();
    let mut core = Core::new(cfg, ring, EpochLease::new(1, 8), []);
    let forwarded = |outputs: Vec<Output>| -> Vec<(NodeId, Option<u32>)> {
        outputs
            .into_iter()
            .filter_map(|o| match o {
                Output::Send {
                    to,
                    msg: PeerMsg::Forward { request, .. },
                } => match request.into_message() {
                    Message::Put(m) => Some((to, m.timeout_ms)),
                    other => panic!("forwarded {other:?}"),
                },
                _ => None,
            })
            .collect()
    };
    let request = Message::Put(Put {
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from(key),
        value: Bytes::from_static(b"v"),
        context: None,
        w: None,
        dw: None,
        timeout_ms: Some(2_000),
        expiry: None,
        condition: None,
    });
    let request = common::key_request(&core, request);
    let first = forwarded(core.handle_client(100, 7, request));
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].1, Some(2_000));
    let second = forwarded(core.handle_unreachable(600, first[0].0));
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second[0].0, first[0].0);
    assert_eq!(
        second[0].1,
        Some(1_500),
        "500 ms of the 2000 ms were spent on the first home"
    );
}

/// The nodes `outputs` forward a client request to.
fn forwarded_to(outputs: &[Output]) -> Vec<NodeId> {
    use ringkv_core::coordinator::PeerMsg;
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send {
                to,
                msg: PeerMsg::Forward { .. },
            } => Some(*to),
            _ => None,
        })
        .collect()
}

/// A write for a key this node is not a home of goes to a home that answers: the first home of
/// the key's walk while it does, and the next one once the first has been silent for two
/// heartbeat intervals, long before the failure detector would suspect it. (Most forwards are
/// never moved once sent, so this choice is what keeps writes off a home that stopped.)
#[test]
fn a_forward_goes_to_a_home_that_answers() {
    use ringkv_core::coordinator::PeerMsg;
    let me = NodeId(1);
    let mut cfg = CoreConfig::new(me);
    cfg.heartbeat_ms = 1_000;
    // The detector alone would not suspect anyone within this test.
    cfg.phi_threshold = 1_000.0;
    cfg.buckets = Buckets {
        default: props(2),
        named: BTreeMap::new(),
    };
    let members: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    let ring = Ring::new(PartitionCount::new(8).unwrap(), &members, 2).unwrap();
    let (key, homes) = (0..)
        .map(|i| format!("k{i}"))
        .find_map(|k| {
            let p = ring.partition_of(b"b", k.as_bytes());
            let homes = ring.preference_list(p, 2);
            (!homes.contains(&me)).then_some((k, homes))
        })
        .unwrap();
    let mut core = Core::new(cfg, ring, EpochLease::new(1, 8), []);
    let put = |req: u64| {
        Message::Put(Put {
            bucket: Bytes::from_static(b"b"),
            key: Bytes::from(key.clone()),
            value: Bytes::from(format!("v{req}")),
            context: None,
            w: None,
            dw: None,
            timeout_ms: Some(10_000),
            expiry: None,
            condition: None,
        })
    };
    for home in &homes {
        core.handle_peer(0, *home, PeerMsg::Pong { id: 0 });
    }
    let request = common::key_request(&core, put(1));
    assert_eq!(
        forwarded_to(&core.handle_client(500, 1, request)),
        [homes[0]]
    );
    // The second home keeps answering; the first has been silent since 0.
    core.handle_peer(4_900, homes[1], PeerMsg::Pong { id: 0 });
    let request = common::key_request(&core, put(2));
    assert_eq!(
        forwarded_to(&core.handle_client(5_000, 2, request)),
        [homes[1]]
    );
    // Both silent: the walk's order again.
    let request = common::key_request(&core, put(3));
    assert_eq!(
        forwarded_to(&core.handle_client(9_000, 3, request)),
        [homes[0]]
    );
}

fn put_expiring(value: &str, expiry: Option<Expiry>) -> Message {
    let Message::Put(p) = put(value, None, None) else {
        unreachable!()
    };
    Message::Put(Put { expiry, ..p })
}

fn read_at(one: &mut One, now: u64, req: u64) -> GetOk {
    match one.request_at(now, req, get(None)) {
        Message::GetOk(ok) => ok,
        other => panic!("read failed: {other:?}"),
    }
}

/// A time to live becomes an absolute expiry at the coordinator: the value reads until then,
/// with its expiry time, and from then on reads as missing, while the replica still holds the
/// expiring version (expiry is a version, not an absence). A bucket's default time to live
/// applies to writes that name none, `Never` overrides it, and a zero time to live is refused.
#[test]
fn expiry_is_stamped_by_the_coordinator_and_hides_the_value() {
    let mut one = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    let ok = one.request_at(1_000, 1, put_expiring("s", Some(Expiry::Ttl { ms: 500 })));
    assert!(matches!(ok, Message::PutOk(_)), "{ok:?}");
    let live = read_at(&mut one, 1_499, 2);
    assert_eq!(
        live.siblings,
        vec![Sibling::Value(Bytes::from_static(b"s"))]
    );
    assert_eq!(live.expires_at_ms, Some(1_500));
    let gone = read_at(&mut one, 1_500, 3);
    assert!(gone.siblings.is_empty(), "{gone:?}");
    assert_eq!(gone.expires_at_ms, None);
    assert_eq!(
        one.store.objects().len(),
        1,
        "the expired version is still stored"
    );
    // An absolute time already past writes a value that is expired on arrival.
    one.request_at(
        2_000,
        4,
        put_expiring("t", Some(Expiry::At { unix_ms: 1_999 })),
    );
    assert!(read_at(&mut one, 2_000, 5).siblings.is_empty());
    let zero = one.request_at(2_000, 6, put_expiring("u", Some(Expiry::Ttl { ms: 0 })));
    assert_eq!(code(&zero), Some(ErrorCode::InvalidRequest));

    let mut ttl = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ttl_ms: Some(100),
        ..props(1)
    });
    ttl.request_at(10, 1, put_expiring("d", None));
    assert_eq!(read_at(&mut ttl, 10, 2).expires_at_ms, Some(110));
    assert!(read_at(&mut ttl, 110, 3).siblings.is_empty());
    ttl.request_at(200, 4, put_expiring("p", Some(Expiry::Never)));
    let kept = read_at(&mut ttl, u64::MAX / 2, 5);
    assert_eq!(
        kept.siblings,
        vec![Sibling::Value(Bytes::from_static(b"p"))]
    );
    assert_eq!(kept.expires_at_ms, None);
}

/// In a siblings bucket each sibling expires on its own: an expired sibling reads as a
/// deletion beside the live one, and the key reads as missing once both have expired.
#[test]
fn siblings_expire_one_by_one() {
    let mut one = One::new(props(1));
    one.request_at(0, 1, put_expiring("a", Some(Expiry::Ttl { ms: 10 })));
    one.request_at(0, 2, put_expiring("b", Some(Expiry::Ttl { ms: 20 })));
    let both = read_at(&mut one, 5, 3);
    assert_eq!(both.siblings.len(), 2);
    assert_eq!(both.expires_at_ms, Some(20));
    let one_left = read_at(&mut one, 15, 4);
    assert_eq!(
        one_left.siblings,
        vec![Sibling::Tombstone, Sibling::Value(Bytes::from_static(b"b"))]
    );
    assert!(read_at(&mut one, 20, 5).siblings.is_empty());
}

/// An expired object is reaped like a tombstone once its expiry and the grace period have
/// passed, and not before: storage and the tree lose the key without any delete being sent.
#[test]
fn expired_objects_are_reaped_after_the_grace() {
    let mut one = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    let grace = 1_000;
    one.core.set_ae_interval_ms(10);
    one.request_at(0, 1, put_expiring("s", Some(Expiry::Ttl { ms: 5_000 })));
    let mut now = 0;
    while now < 5_000 + grace - 20 {
        now += 10;
        one.now = now;
        let out = one.core.handle_tick(now);
        one.run(out);
    }
    assert_eq!(
        one.store.objects().len(),
        1,
        "not reaped before expiry + grace"
    );
    while now < 5_000 + 4 * grace && !one.store.objects().is_empty() {
        now += 10;
        one.now = now;
        let out = one.core.handle_tick(now);
        one.run(out);
    }
    assert!(
        one.store.objects().is_empty(),
        "the expired object was reaped"
    );
    assert_eq!(one.core.merkle_roots()[0].keys, 0, "the key left the tree");
    assert_eq!(one.core.stats().tombstones_reaped, 1);
    // Written again after its tree's walks found nothing left to reap, the key is reaped again
    // once it expires: what a walk learnt about the tree does not outlive a later store.
    let again = now + 2_000;
    while now < again {
        now += 10;
        one.now = now;
        let out = one.core.handle_tick(now);
        one.run(out);
    }
    one.request_at(now, 2, put_expiring("t", Some(Expiry::Ttl { ms: 5_000 })));
    while now < again + 5_000 + 4 * grace && !one.store.objects().is_empty() {
        now += 10;
        one.now = now;
        let out = one.core.handle_tick(now);
        one.run(out);
    }
    assert!(one.store.objects().is_empty(), "reaped the second time");
    assert_eq!(one.core.stats().tombstones_reaped, 2);
}

fn update(ops: Vec<MapOp>) -> Message {
    Message::Update(Update {
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(b"k"),
        ops,
        w: None,
        dw: None,
        timeout_ms: None,
    })
}

fn set(field: &'static [u8], value: &'static [u8]) -> MapOp {
    MapOp::Set {
        field: Bytes::from_static(field),
        value: Bytes::from_static(value),
    }
}

/// The register fields of a map a read found.
fn registers(read: &GetOk) -> Option<Vec<(Bytes, Bytes)>> {
    assert_eq!(read.fields, None, "maps read as convergent values");
    match &read.crdt {
        None => None,
        Some(CrdtValue::Map(fields)) => Some(
            fields
                .iter()
                .map(|(name, v)| match v {
                    FieldValue::Register(v) => (name.clone(), v.clone()),
                    other => panic!("field {name:?} is {other:?}"),
                })
                .collect(),
        ),
        Some(other) => panic!("not a map: {other:?}"),
    }
}

/// UPDATE writes a map's fields one by one in an lww bucket: a read answers the live fields
/// and the hash's expiry; a whole-key PUT replaces the map, an UPDATE of the plain value is
/// `wrong_type`, and after a delete an UPDATE starts a new map from nothing; a siblings bucket
/// refuses UPDATE.
#[test]
fn updates_write_map_fields() {
    let mut one = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    let ok = one.request_at(
        10,
        1,
        update(vec![set(b"user", b"alice"), set(b"cart", b"3")]),
    );
    assert_eq!(ok, Message::UpdateOk);
    one.request_at(
        20,
        2,
        update(vec![
            MapOp::Delete {
                field: Bytes::from_static(b"cart"),
            },
            MapOp::Expire(Expiry::Ttl { ms: 100 }),
        ]),
    );
    let read = read_at(&mut one, 30, 3);
    assert!(read.siblings.is_empty());
    assert_eq!(registers(&read), Some(vec![(b("user"), b("alice"))]));
    assert_eq!(read.expires_at_ms, Some(120));
    assert_eq!(
        registers(&read_at(&mut one, 120, 4)),
        None,
        "the hash expired"
    );
    // A whole-key write replaces the map; fields written after it start afresh.
    one.request_at(200, 5, put("s", None, None));
    let read = read_at(&mut one, 200, 6);
    assert_eq!(
        read.siblings,
        vec![Sibling::Value(Bytes::from_static(b"s"))]
    );
    assert_eq!(registers(&read), None);
    // Fields of a key holding a plain value are `wrong_type`, as in Redis; once it is deleted,
    // an UPDATE starts a new map.
    let on_value = one.request_at(250, 10, update(vec![set(b"n", b"0")]));
    assert_eq!(code(&on_value), Some(ErrorCode::WrongType));
    let deleted = one.request_at(260, 11, delete(None));
    assert_eq!(deleted, Message::DeleteOk);
    assert_eq!(
        one.request_at(300, 7, update(vec![set(b"n", b"1")])),
        Message::UpdateOk
    );
    let read = read_at(&mut one, 300, 8);
    assert_eq!(registers(&read), Some(vec![(b("n"), b("1"))]));
    assert_eq!(
        read.expires_at_ms, None,
        "the old expiry went with the replaced map"
    );

    let mut siblings = One::new(props(1));
    let refused = siblings.request(1, update(vec![set(b"a", b"1")]));
    assert_eq!(code(&refused), Some(ErrorCode::InvalidRequest));
    // A field name longer than a map encodes is refused, not a panic when it is stored.
    let long = Message::Update(Update {
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(b"k"),
        ops: vec![MapOp::Delete {
            field: Bytes::from(vec![b'f'; usize::from(u16::MAX) + 1]),
        }],
        w: None,
        dw: None,
        timeout_ms: None,
    });
    assert_eq!(
        code(&one.request_at(400, 9, long)),
        Some(ErrorCode::InvalidRequest)
    );
}

fn put_if(value: &str, condition: Condition) -> Message {
    let Message::Put(p) = put(value, None, None) else {
        unreachable!()
    };
    Message::Put(Put {
        condition: Some(condition),
        ..p
    })
}

/// A conditional PUT is checked against the coordinating home's replica: "if absent" writes a
/// missing or expired key and refuses a live one with `condition_failed`; "if present" the
/// reverse. A refused write stores nothing.
#[test]
fn conditional_puts_check_the_replica() {
    let mut one = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    let first = one.request_at(10, 1, put_if("a", Condition::IfAbsent));
    assert!(matches!(first, Message::PutOk(_)), "{first:?}");
    let second = one.request_at(11, 2, put_if("b", Condition::IfAbsent));
    assert_eq!(code(&second), Some(ErrorCode::ConditionFailed));
    assert_eq!(
        read_at(&mut one, 12, 3).siblings,
        vec![Sibling::Value(Bytes::from_static(b"a"))]
    );
    let replace = one.request_at(13, 4, put_if("c", Condition::IfPresent));
    assert!(matches!(replace, Message::PutOk(_)), "{replace:?}");
    // An expired value counts as absent.
    one.request_at(20, 5, put_expiring("d", Some(Expiry::Ttl { ms: 10 })));
    let refused = one.request_at(29, 6, put_if("e", Condition::IfAbsent));
    assert_eq!(code(&refused), Some(ErrorCode::ConditionFailed));
    let after = one.request_at(30, 7, put_if("f", Condition::IfAbsent));
    assert!(matches!(after, Message::PutOk(_)), "{after:?}");
    let mut empty = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    let nothing = empty.request_at(1, 1, put_if("x", Condition::IfPresent));
    assert_eq!(code(&nothing), Some(ErrorCode::ConditionFailed));
    assert!(
        empty.store.objects().is_empty(),
        "a refused write stores nothing"
    );
}

/// A storage write that fails (the engine returned EIO, or went failed after one) is never
/// acknowledged: the coordinator answers an error for a PUT, a DELETE and an UPDATE, the store
/// is unchanged, and a later read does not see the write. When storage recovers, writes are
/// acknowledged again. (Deliberate bug it catches: a coordinator that counts its own failed
/// local write as an acknowledgement.)
#[test]
fn failed_storage_writes_are_refused_not_acknowledged() {
    let mut one = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    let ok = one.request_at(1, 1, put("before", None, None));
    assert!(matches!(ok, Message::PutOk(_)), "{ok:?}");
    let stored = one.store.objects();
    one.store.failing_writes.set(true);
    let refused = one.request_at(2, 2, put("lost", None, None));
    assert!(
        matches!(refused, Message::Error(_)),
        "acknowledged: {refused:?}"
    );
    assert!(matches!(
        one.request_at(3, 3, delete(None)),
        Message::Error(_)
    ));
    let fields = one.request_at(4, 4, update(vec![set(b"f", b"v")]));
    assert!(
        matches!(fields, Message::Error(_)),
        "acknowledged: {fields:?}"
    );
    assert_eq!(one.store.objects(), stored, "nothing was stored");
    assert_eq!(
        read_at(&mut one, 5, 5).siblings,
        vec![Sibling::Value(Bytes::from_static(b"before"))]
    );
    one.store.failing_writes.set(false);
    let again = one.request_at(6, 6, put("after", None, None));
    assert!(matches!(again, Message::PutOk(_)), "{again:?}");
}

fn apply(key: &'static [u8], crdt: CrdtType, ops: Vec<CrdtOp>, op_id: Option<u64>) -> Message {
    Message::Apply(Apply {
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(key),
        crdt,
        ops,
        op_id,
        return_value: true,
        w: None,
        dw: None,
        timeout_ms: None,
    })
}

fn incr(by: i64, op_id: Option<u64>) -> Message {
    apply(b"k", CrdtType::Counter, vec![CrdtOp::Increment(by)], op_id)
}

fn applied(m: Message) -> CrdtValue {
    match m {
        Message::ApplyOk(ApplyOk { value: Some(v) }) => v,
        other => panic!("not applied: {other:?}"),
    }
}

fn read_crdt(one: &mut One, now: u64, req: u64) -> Option<CrdtValue> {
    read_at(one, now, req).crdt
}

fn lww_props() -> BucketProps {
    BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    }
}

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_owned())
}

/// Counters, sets and maps take operations, answer with their value, and read back through
/// GET; a delete clears the key, and the next operation starts from nothing.
#[test]
fn convergent_types_apply_read_and_clear() {
    let mut one = One::new(lww_props());
    assert_eq!(
        applied(one.request(1, incr(5, None))),
        CrdtValue::Counter(5)
    );
    assert_eq!(
        applied(one.request(2, incr(-7, None))),
        CrdtValue::Counter(-2)
    );
    assert_eq!(read_crdt(&mut one, 0, 3), Some(CrdtValue::Counter(-2)));
    let add = |e: &str| CrdtOp::Add(b(e));
    let set = one.request(
        4,
        apply(b"s", CrdtType::Set, vec![add("x"), add("y")], None),
    );
    assert_eq!(applied(set), CrdtValue::Set(vec![b("x"), b("y")]));
    let removed = one.request(
        5,
        apply(b"s", CrdtType::Set, vec![CrdtOp::Remove(b("x"))], None),
    );
    assert_eq!(applied(removed), CrdtValue::Set(vec![b("y")]));
    let field = |name: &str, op| CrdtOp::Field { name: b(name), op };
    let cart = one.request(
        6,
        apply(
            b"m",
            CrdtType::Map,
            vec![
                field("sku-1", FieldOp::Increment(2)),
                field("owner", FieldOp::Assign(b("ann"))),
            ],
            None,
        ),
    );
    assert_eq!(
        applied(cart),
        CrdtValue::Map(vec![
            (b("owner"), FieldValue::Register(b("ann"))),
            (b("sku-1"), FieldValue::Counter(2)),
        ])
    );
    let deleted = one.request(7, delete(None));
    assert_eq!(deleted, Message::DeleteOk);
    assert_eq!(read_crdt(&mut one, 0, 8), None);
    assert!(read_at(&mut one, 0, 9).siblings.is_empty());
    assert_eq!(
        applied(one.request(10, incr(1, None))),
        CrdtValue::Counter(1)
    );
}

/// A retried operation id is applied once; a new id counts again.
#[test]
fn a_retried_operation_counts_once() {
    let mut one = One::new(lww_props());
    assert_eq!(
        applied(one.request(1, incr(3, Some(42)))),
        CrdtValue::Counter(3)
    );
    assert_eq!(
        applied(one.request(2, incr(3, Some(42)))),
        CrdtValue::Counter(3)
    );
    assert_eq!(
        applied(one.request(3, incr(3, Some(43)))),
        CrdtValue::Counter(6)
    );
}

/// An operation on a key of another type is `wrong_type`; a plain integer becomes a counter (as
/// Redis's INCR of a string does); a typed bucket refuses plain writes and other types, and an
/// untyped bucket that keeps siblings refuses convergent types.
#[test]
fn types_are_checked() {
    let mut one = One::new(lww_props());
    assert!(matches!(
        one.request(1, put("12", None, None)),
        Message::PutOk(_)
    ));
    assert_eq!(
        applied(one.request(2, incr(1, None))),
        CrdtValue::Counter(13)
    );
    // A live counter is a value for a conditional write (Redis's SETNX on an INCR'd key).
    let if_absent = one.request(20, put_if("x", Condition::IfAbsent));
    assert_eq!(code(&if_absent), Some(ErrorCode::ConditionFailed));
    let on_counter = one.request(
        3,
        apply(b"k", CrdtType::Set, vec![CrdtOp::Add(b("x"))], None),
    );
    assert_eq!(code(&on_counter), Some(ErrorCode::WrongType));
    // A PUT replaces a counter, as SET does in Redis.
    assert!(matches!(
        one.request(4, put("word", None, None)),
        Message::PutOk(_)
    ));
    assert_eq!(
        code(&one.request(5, incr(1, None))),
        Some(ErrorCode::WrongType)
    );
    let mixed = one.request(
        6,
        apply(b"z", CrdtType::Counter, vec![CrdtOp::Add(b("x"))], None),
    );
    assert_eq!(code(&mixed), Some(ErrorCode::InvalidRequest));

    let mut typed = One::new(BucketProps {
        data_type: Some(BucketType::Counter),
        ..props(1)
    });
    assert_eq!(
        code(&typed.request(1, put("x", None, None))),
        Some(ErrorCode::InvalidRequest)
    );
    let set = typed.request(
        2,
        apply(b"k", CrdtType::Set, vec![CrdtOp::Add(b("x"))], None),
    );
    assert_eq!(code(&set), Some(ErrorCode::InvalidRequest));
    assert_eq!(
        applied(typed.request(3, incr(2, None))),
        CrdtValue::Counter(2)
    );

    let mut siblings = One::new(props(1));
    assert_eq!(
        code(&siblings.request(1, incr(1, None))),
        Some(ErrorCode::InvalidRequest)
    );
    assert!(siblings.store.objects().is_empty(), "nothing was written");
}

/// A counter with a time to live reads as missing once it passes, and the next increment
/// starts from nothing, as in Redis.
#[test]
fn an_expired_counter_starts_afresh() {
    let mut one = One::new(lww_props());
    let ops = vec![
        CrdtOp::Increment(4),
        CrdtOp::Expire(Expiry::Ttl { ms: 100 }),
    ];
    assert_eq!(
        applied(one.request_at(1_000, 1, apply(b"k", CrdtType::Counter, ops, None))),
        CrdtValue::Counter(4)
    );
    assert_eq!(read_at(&mut one, 1_050, 2).expires_at_ms, Some(1_100));
    assert_eq!(read_crdt(&mut one, 1_100, 3), None);
    let again = one.request_at(1_200, 4, incr(1, None));
    assert_eq!(applied(again), CrdtValue::Counter(1));
    assert_eq!(read_at(&mut one, 9_000, 5).expires_at_ms, None);
}

/// A plain integer with a time to live that an increment turns into a counter keeps its expiry,
/// as Redis's INCR keeps a string's; an expiry in the same request replaces it.
#[test]
fn a_counter_made_from_an_expiring_integer_keeps_its_expiry() {
    let mut one = One::new(lww_props());
    let put = one.request_at(1_000, 1, put_expiring("41", Some(Expiry::Ttl { ms: 500 })));
    assert!(matches!(put, Message::PutOk(_)), "{put:?}");
    assert_eq!(
        applied(one.request_at(1_100, 2, incr(1, None))),
        CrdtValue::Counter(42)
    );
    let read = read_at(&mut one, 1_200, 3);
    assert_eq!(read.crdt, Some(CrdtValue::Counter(42)));
    assert_eq!(read.expires_at_ms, Some(1_500), "the value's expiry");
    assert_eq!(read_crdt(&mut one, 1_500, 4), None, "expired with it");

    let put = one.request_at(2_000, 5, put_expiring("7", Some(Expiry::Ttl { ms: 500 })));
    assert!(matches!(put, Message::PutOk(_)), "{put:?}");
    let ops = vec![CrdtOp::Increment(1), CrdtOp::Expire(Expiry::Never)];
    assert_eq!(
        applied(one.request_at(2_100, 6, apply(b"k", CrdtType::Counter, ops, None))),
        CrdtValue::Counter(8)
    );
    assert_eq!(read_at(&mut one, 2_200, 7).expires_at_ms, None);
}

/// A home that is not the key's first home forwards an APPLY, an UPDATE and a DELETE in a
/// bucket that may hold convergent types to the first home (so that the home that applied a
/// counter's increments also decides its deletion, and clears it instead of writing a
/// tombstone that would replace it whole); a DELETE in a siblings bucket, which carries its
/// context, it coordinates itself.
#[test]
fn convergent_writes_and_their_deletes_go_to_the_first_home() {
    use ringkv_core::coordinator::PeerMsg;
    let me = NodeId(1);
    let mut cfg = CoreConfig::new(me);
    cfg.phi_threshold = 1_000.0;
    cfg.buckets = Buckets {
        default: props(3),
        named: BTreeMap::from([(
            b"l".to_vec(),
            BucketProps {
                mode: ConflictMode::Lww,
                ..props(3)
            },
        )]),
    };
    let members: BTreeSet<NodeId> = (1..=3).map(NodeId).collect();
    let ring = Ring::new(PartitionCount::new(8).unwrap(), &members, 3).unwrap();
    let first_of = |bucket: &[u8], k: &str| {
        ring.preference_list(ring.partition_of(bucket, k.as_bytes()), 3)[0]
    };
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| first_of(b"l", k) != me && first_of(b"b", k) != me)
        .unwrap();
    let first = first_of(b"l", &key);
    let mut core = Core::new(cfg, ring, EpochLease::new(1, 8), []);
    for home in [NodeId(2), NodeId(3)] {
        core.handle_peer(0, home, PeerMsg::Pong { id: 0 });
    }
    let delete_in = |bucket: &'static [u8]| {
        Message::Delete(Delete {
            bucket: Bytes::from_static(bucket),
            key: Bytes::from(key.clone()),
            context: None,
            w: None,
            dw: None,
            timeout_ms: None,
        })
    };
    let apply = Message::Apply(Apply {
        bucket: Bytes::from_static(b"l"),
        key: Bytes::from(key.clone()),
        crdt: CrdtType::Counter,
        ops: vec![CrdtOp::Increment(1)],
        op_id: None,
        return_value: false,
        w: None,
        dw: None,
        timeout_ms: None,
    });
    let update = Message::Update(Update {
        bucket: Bytes::from_static(b"l"),
        key: Bytes::from(key.clone()),
        ops: vec![set(b"f", b"v")],
        w: None,
        dw: None,
        timeout_ms: None,
    });
    for (req, message) in [(1, apply), (2, update), (3, delete_in(b"l"))] {
        let request = common::key_request(&core, message);
        let out = core.handle_client(10, req, request);
        assert_eq!(forwarded_to(&out), [first], "request {req}");
    }
    let request = common::key_request(&core, delete_in(b"b"));
    let out = core.handle_client(10, 4, request);
    assert!(forwarded_to(&out).is_empty(), "{out:?}");
}

/// A home that every fallback stands in for is still tried once when it is suspected: in a
/// three-node cluster a write needing every replica goes to node 3 although node 1's core
/// marked it unreachable (a node that just restarted is suspected by peers that missed its
/// first heartbeats), and is acknowledged once node 3 stores it. Refusing at once would turn
/// an out-of-date suspicion into a refused write (`assign_slot`'s last resort).
#[test]
fn a_suspected_home_with_no_fallback_is_still_tried_once() {
    use ringkv_core::coordinator::PeerMsg;
    let me = NodeId(1);
    let mut cfg = CoreConfig::new(me);
    cfg.buckets = Buckets {
        default: props(3),
        named: BTreeMap::new(),
    };
    let members: BTreeSet<NodeId> = (1..=3).map(NodeId).collect();
    let ring = Ring::new(PartitionCount::new(8).unwrap(), &members, 3).unwrap();
    let mut core = Core::new(cfg, ring, EpochLease::new(1, 8), []);
    let store = common::TestStore::default();
    for peer in [NodeId(2), NodeId(3)] {
        core.handle_peer(0, peer, PeerMsg::Pong { id: 0 });
    }
    core.handle_unreachable(100, NodeId(3));
    let request = common::key_request(&core, put("v", None, Some(3)));
    let mut outputs = core.handle_client(200, 1, request);
    let mut sent_to = BTreeSet::new();
    let mut reply = None;
    while let Some(out) = outputs.pop() {
        match out {
            Output::Store { id, key, op } => {
                let result = common::carry_out(&store, key, op);
                outputs.extend(core.handle_stored(200, id, result));
            }
            Output::Send {
                to,
                msg: PeerMsg::ReplicaPut { id, durable, .. },
            } => {
                sent_to.insert(to);
                outputs.extend(core.handle_peer(200, to, PeerMsg::ReplicaPutOk { id, durable }));
            }
            Output::Reply { message, .. } => reply = Some(message),
            _ => {}
        }
    }
    assert!(
        sent_to.contains(&NodeId(3)),
        "the suspected home was not tried: sent to {sent_to:?}, answered {reply:?}"
    );
    assert!(matches!(reply, Some(Message::PutOk(_))), "{reply:?}");
}

/// The forwards in `outputs`: (home, message id, apply-by time).
fn forwards(outputs: &[Output]) -> Vec<(NodeId, u64, Option<u64>)> {
    use ringkv_core::coordinator::PeerMsg;
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send {
                to,
                msg: PeerMsg::Forward { id, apply_by, .. },
            } => Some((*to, *id, *apply_by)),
            _ => None,
        })
        .collect()
}

/// A core of node 1 in a ring of four with `n = 2`, a siblings bucket `b` (the default) and a
/// last-write-wins bucket `lww`, and a key of which node 1 is no home in either bucket.
fn forwarding_core() -> (Core, String) {
    let me = NodeId(1);
    let mut cfg = CoreConfig::new(me);
    cfg.replica_timeout_ms = 500;
    cfg.phi_threshold = 1_000.0;
    let mut named = BTreeMap::new();
    named.insert(
        b"lww".to_vec(),
        BucketProps {
            mode: ConflictMode::Lww,
            ..props(2)
        },
    );
    cfg.buckets = Buckets {
        default: props(2),
        named,
    };
    let members: BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    let ring = Ring::new(PartitionCount::new(8).unwrap(), &members, 2).unwrap();
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| {
            [&b"lww"[..], b"b"].iter().all(|bucket| {
                let p = ring.partition_of(bucket, k.as_bytes());
                !ring.preference_list(p, 2).contains(&me)
            })
        })
        .unwrap();
    (Core::new(cfg, ring, EpochLease::new(1, 8), []), key)
}

fn forwarded_put(bucket: &'static [u8], key: &str, condition: Option<Condition>) -> Message {
    Message::Put(Put {
        bucket: Bytes::from_static(bucket),
        key: Bytes::from(key.to_owned()),
        value: Bytes::from_static(b"v"),
        context: None,
        w: None,
        dw: None,
        timeout_ms: Some(5_000),
        expiry: None,
        condition,
    })
}

/// Client request 1 at `now`, a last-write-wins put of `key`, which `core` forwards: the home it
/// went to and the forward's id. It carries an apply-by time.
fn lww_forward(core: &mut Core, key: &str, now: u64) -> (NodeId, u64) {
    let request = common::key_request(core, forwarded_put(b"lww", key, None));
    let first = forwards(&core.handle_client(now, 1, request));
    let [(home, id, Some(_))] = first[..] else {
        panic!("one forward with an apply-by time: {first:?}");
    };
    (home, id)
}

/// A forward to a silent home (stopped, or cut off with its connection open) moves to the next
/// home only when a second home applying it too cannot show: an unconditional put in a
/// last-write-wins bucket. It carries an apply-by time half a replica timeout ahead, and moves
/// once the home has been silent for a whole one. In a siblings bucket (a second dot could come
/// back after a client resolved it) and for a conditional put (decided at one home) the
/// forward carries no apply-by time and waits for its home: the client gets `timeout` at its
/// deadline. (A lost connection moves any forward:
/// `a_forwarded_write_carries_what_is_left_of_its_deadline`.)
#[test]
fn a_forward_to_a_silent_home_moves_only_when_a_second_application_cannot_show() {
    let (mut core, key) = forwarding_core();
    let mut now = 10_000;
    let request = common::key_request(&core, forwarded_put(b"lww", &key, None));
    let first = forwards(&core.handle_client(now, 1, request));
    let [(home, _, apply_by)] = first[..] else {
        panic!("one forward: {first:?}");
    };
    assert_eq!(apply_by, Some(now + 250), "half a replica timeout ahead");
    assert!(forwards(&core.handle_tick(now + 499)).is_empty());
    let moved = forwards(&core.handle_tick(now + 500));
    let [(next, _, next_by)] = moved[..] else {
        panic!("the lww put was not moved at the replica timeout: {moved:?}");
    };
    assert_ne!(next, home);
    assert_eq!(next_by, Some(now + 750));
    assert_eq!(core.stats().forwards_moved, 1);

    for (req, bucket, condition) in [
        (2, &b"b"[..], None),
        (3, &b"lww"[..], Some(Condition::IfAbsent)),
    ] {
        now += 10_000;
        let message = Message::Put(match forwarded_put(b"b", &key, condition) {
            Message::Put(p) => Put {
                bucket: Bytes::from_static(bucket),
                ..p
            },
            _ => unreachable!(),
        });
        let request = common::key_request(&core, message);
        let first = forwards(&core.handle_client(now, req, request));
        let bucket = String::from_utf8_lossy(bucket);
        assert_eq!(first.len(), 1, "{bucket}: {first:?}");
        assert_eq!(
            first[0].2, None,
            "{bucket}: an apply-by time on a forward that never moves"
        );
        for at in [500, 1_000, 4_999] {
            let later = forwards(&core.handle_tick(now + at));
            assert!(later.is_empty(), "{bucket}: moved at {at} ms: {later:?}");
        }
        let end = core.handle_tick(now + 5_000);
        assert!(
            timed_out(&end, req),
            "{bucket}: no timeout at the deadline: {end:?}"
        );
    }
    assert_eq!(core.stats().forwards_moved, 1);
}

/// Whether `outputs` answer client request `req` with `timeout`.
fn timed_out(outputs: &[Output], req: u64) -> bool {
    outputs.iter().any(|o| {
        matches!(o, Output::Reply { req: r, message }
            if *r == req && code(message) == Some(ErrorCode::Timeout))
    })
}

/// The id of the first storage read (`read`) or write in `outputs`.
fn store_id(outputs: &[Output], read: bool) -> u64 {
    outputs
        .iter()
        .find_map(|o| match o {
            Output::Store { id, op, .. } if matches!(op, StoreOp::Read) == read => Some(*id),
            _ => None,
        })
        .unwrap_or_else(|| {
            panic!(
                "no storage {}: {outputs:?}",
                ["write", "read"][usize::from(read)]
            )
        })
}

/// The objects `outputs` writes to storage.
fn stored_objects(outputs: &[Output]) -> Vec<Object> {
    use ringkv_core::coordinator::StoreOp;
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Store {
                op: StoreOp::Write { object, .. },
                ..
            } => Some(object.clone()),
            _ => None,
        })
        .collect()
}

/// Whether `outputs` refuse forward `id` of node 2 as `expired`.
fn refused_expired(outputs: &[Output], id: u64) -> bool {
    use ringkv_core::coordinator::PeerMsg;
    outputs.iter().any(|o| {
        matches!(o, Output::Answer { to: NodeId(2), msg: PeerMsg::ForwardReply { id: i, reply } }
            if *i == id && code(reply) == Some(ErrorCode::Expired))
    })
}

/// A home refuses a forward with `expired`, writing nothing, when it reads it after its apply-by
/// time (it was stopped, or cut off, with the request in its socket, and its sender may have
/// moved it since), and also when it started it in time but would stamp it after that time (it
/// stalled between the two: stopped, or behind a slow storage read). One stamped in time is
/// written.
#[test]
fn a_home_refuses_a_forward_it_would_apply_after_its_apply_by_time() {
    use ringkv_core::coordinator::PeerMsg;
    let mut one = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    let core = &mut one.core;
    let now = 50_000;
    let forward = |core: &Core, id, apply_by| PeerMsg::Forward {
        id,
        request: common::key_request(core, put("late", None, None)),
        apply_by: Some(apply_by),
    };
    // Read late: refused on arrival, storage untouched.
    let outputs = core.handle_peer(now, NodeId(2), forward(core, 7, now - 1));
    assert!(
        refused_expired(&outputs, 7),
        "not refused on arrival: {outputs:?}"
    );
    assert!(
        !outputs.iter().any(|o| matches!(o, Output::Store { .. })),
        "a late forward reached storage: {outputs:?}"
    );
    assert_eq!(core.stats().forwards_refused, 1);

    // Started in time, its local read completes after the apply-by time: refused, unwritten.
    let outputs = core.handle_peer(now, NodeId(2), forward(core, 8, now + 10));
    let read = store_id(&outputs, true);
    let outputs = core.handle_stored(now + 11, read, Ok(None));
    assert!(
        refused_expired(&outputs, 8),
        "not refused at its stamp: {outputs:?}"
    );
    assert_eq!(
        stored_objects(&outputs).len(),
        0,
        "written after its apply-by time: {outputs:?}"
    );
    assert_eq!(core.stats().forwards_refused, 2);

    // Stamped in time: written.
    let outputs = core.handle_peer(now + 20, NodeId(2), forward(core, 9, now + 30));
    let read = store_id(&outputs, true);
    let outputs = core.handle_stored(now + 30, read, Ok(None));
    assert_eq!(
        stored_objects(&outputs).len(),
        1,
        "a forward in time was not written: {outputs:?}"
    );
    assert_eq!(core.stats().forwards_refused, 2);
}

/// A forward refused at its stamp inside a batch (writes of one key that queued behind the same
/// write, then share one local read) fails alone: the client write batched with it is written,
/// with its own value.
#[test]
fn a_forward_refused_in_a_batch_leaves_the_batch_written() {
    use ringkv_core::coordinator::PeerMsg;
    let mut one = One::new(BucketProps {
        mode: ConflictMode::Lww,
        ..props(1)
    });
    let core = &mut one.core;
    let now = 50_000;
    // A first write holds the key; the forward and a client write queue behind it.
    let first = common::handle_client(core, now, 4, put("first", None, None));
    let first_read = store_id(&first, true);
    let forward = PeerMsg::Forward {
        id: 7,
        request: common::key_request(core, put("forwarded", None, None)),
        apply_by: Some(now + 10),
    };
    assert!(core.handle_peer(now, NodeId(2), forward).is_empty());
    assert!(common::handle_client(core, now + 1, 5, put("client", None, None)).is_empty());
    let first_write = store_id(&core.handle_stored(now + 2, first_read, Ok(None)), false);
    // The first is written: the two queued writes start together, with one read.
    let batch_read = store_id(&core.handle_stored(now + 3, first_write, Ok(None)), true);
    let outputs = core.handle_stored(now + 11, batch_read, Ok(None));
    assert!(
        refused_expired(&outputs, 7),
        "the forward was not refused: {outputs:?}"
    );
    let written = stored_objects(&outputs);
    let [Object::Lww(lww)] = &written[..] else {
        panic!("not one lww write: {written:?} in {outputs:?}");
    };
    assert_eq!(lww.val, Val::Value(Bytes::from_static(b"client")));
    assert_eq!(core.stats().batched_jobs, 1, "the two did not share a read");
}

/// A home's refusal of a forward as expired.
fn expired_refusal() -> ErrorBody {
    ErrorBody::new(ErrorCode::Expired, "read 600 ms after its apply-by time")
}

/// [`expired_refusal`] of forward `id`, as the wire delivers it.
fn expired_failure(id: u64) -> ringkv_core::coordinator::PeerMsg {
    ringkv_core::coordinator::PeerMsg::Failed {
        id,
        error: expired_refusal(),
    }
}

/// A forwarder whose home refuses its forward as expired (read late, or that home's clock is
/// ahead) moves it to the next home at once, not at its own timer, and not back to the client,
/// whether the refusal comes as the wire delivers it (`Failed`) or as a core answers it (a
/// reply). When every home has refused, the client is answered `timeout` and nothing is
/// written here: the homes are up, and this node's clock is the one behind.
#[test]
fn a_forward_refused_as_expired_moves_to_the_next_home_at_once() {
    use ringkv_core::coordinator::PeerMsg;
    // The same refusal as a core answers it: a reply carrying the error.
    let as_reply = |id| PeerMsg::ForwardReply {
        id,
        reply: Message::Error(expired_refusal()),
    };
    for refuse in [&expired_failure as &dyn Fn(u64) -> PeerMsg, &as_reply] {
        let (mut core, key) = forwarding_core();
        let now = 10_000;
        let (home, id) = lww_forward(&mut core, &key, now);
        let outputs = core.handle_peer(now + 5, home, refuse(id));
        assert!(
            !outputs.iter().any(|o| matches!(o, Output::Reply { .. })),
            "the refusal went to the client: {outputs:?}"
        );
        let moved = forwards(&outputs);
        let [(next, next_id, Some(_))] = moved[..] else {
            panic!("not moved to another home: {moved:?}");
        };
        assert_ne!(next, home);
        assert_eq!(core.stats().forwards_moved, 1);

        let outputs = core.handle_peer(now + 10, next, refuse(next_id));
        assert!(
            timed_out(&outputs, 1),
            "no timeout once every home refused: {outputs:?}"
        );
        assert!(
            !outputs
                .iter()
                .any(|o| matches!(o, Output::Store { .. } | Output::Send { .. })),
            "written or sent again after every home refused: {outputs:?}"
        );
    }
}

/// A refusal that arrives after the forwarder moved the forward on its timer finds nothing to
/// answer: no second move, and nothing for the client.
#[test]
fn a_refusal_after_the_move_is_ignored() {
    let (mut core, key) = forwarding_core();
    let now = 10_000;
    let (home, id) = lww_forward(&mut core, &key, now);
    let moved = forwards(&core.handle_tick(now + 500));
    assert_eq!(moved.len(), 1, "{moved:?}");
    let outputs = core.handle_peer(now + 600, home, expired_failure(id));
    assert!(outputs.is_empty(), "{outputs:?}");
    assert_eq!(core.stats().forwards_moved, 1);
}

/// A forward whose client deadline ends before a replica timeout would pass still carries an
/// apply-by time, never after that deadline, so a home that reads it after the client gave up
/// refuses it; it is not moved, since a move could only come after the client stopped waiting.
#[test]
fn a_forward_with_too_short_a_deadline_to_move_is_still_refused_late() {
    for (timeout_ms, apply_after) in [(500, 250), (100, 100)] {
        let (mut core, key) = forwarding_core();
        let message = match forwarded_put(b"lww", &key, None) {
            Message::Put(p) => Message::Put(Put {
                timeout_ms: Some(timeout_ms),
                ..p
            }),
            _ => unreachable!(),
        };
        let request = common::key_request(&core, message);
        let now = 10_000;
        let sent = forwards(&core.handle_client(now, 1, request));
        assert!(
            matches!(sent[..], [(_, _, Some(by))] if by == now + apply_after),
            "{timeout_ms} ms: {sent:?}"
        );
        let end = core.handle_tick(now + u64::from(timeout_ms));
        assert!(forwards(&end).is_empty(), "{timeout_ms} ms: moved: {end:?}");
        assert!(
            timed_out(&end, 1),
            "{timeout_ms} ms: no timeout at the deadline: {end:?}"
        );
    }
}

/// A home that answers `unknown_kind` to a forward with an apply-by time is an older build: the
/// forward is sent to it again without one (so it never moves), and so are later forwards to
/// it, until the connection to it is lost.
#[test]
fn an_older_home_gets_plain_forwards_until_its_connection_is_lost() {
    use ringkv_core::coordinator::PeerMsg;
    let (mut core, key) = forwarding_core();
    let now = 10_000;
    let (home, id) = lww_forward(&mut core, &key, now);
    let unknown = PeerMsg::Failed {
        id,
        error: ErrorBody::new(ErrorCode::UnknownKind, "unknown kind 0x43"),
    };
    let again = forwards(&core.handle_peer(now + 1, home, unknown));
    assert!(
        matches!(again[..], [(h, _, None)] if h == home),
        "not sent again plain to the same home: {again:?}"
    );
    assert!(
        forwards(&core.handle_tick(now + 4_000)).is_empty(),
        "a plain forward moved"
    );
    let request = common::key_request(&core, forwarded_put(b"lww", &key, None));
    let later = forwards(&core.handle_client(now + 10, 2, request));
    assert!(
        matches!(later[..], [(h, _, None)] if h == home),
        "{later:?}"
    );
    core.handle_unreachable(now + 20, home);
    core.handle_peer(now + 30, home, PeerMsg::Ping { id: 1 });
    let request = common::key_request(&core, forwarded_put(b"lww", &key, None));
    let after = forwards(&core.handle_client(now + 40, 3, request));
    assert!(
        matches!(after[..], [(h, _, Some(_))] if h == home),
        "still plain after the connection was lost: {after:?}"
    );
}

/// A list of outputs given back to the core (`Core::recycle`) is filled again from empty: what
/// it held is never carried out twice, even when the shell gives it back unconsumed.
#[test]
fn a_recycled_output_list_comes_back_empty() {
    let mut one = One::new(props(1));
    // The core fills the list it kept from the call before and hands a recycled one on to the
    // next: three calls see a given-back list come round again.
    for req in 1..=3 {
        let request = common::key_request(&one.core, get(None));
        let outputs = one.core.handle_client(0, req, request);
        let reads = outputs
            .iter()
            .filter(|o| matches!(o, Output::Store { .. }))
            .count();
        assert_eq!(reads, 1, "request {req}'s storage read alone: {outputs:?}");
        // Given back with its read still in it, as a careless shell might.
        one.core.recycle(outputs);
    }
}

/// The trees' roots come in (partition, n) order, whatever order the core keeps its trees in:
/// a node's `/merkle` and the checkers that compare two nodes' roots pair them by place.
#[test]
fn merkle_roots_come_in_partition_and_n_order() {
    let mut one = One::with(props(1), |cfg| {
        cfg.buckets.named.insert(b"three".to_vec(), props(3));
        cfg.buckets.named.insert(b"two".to_vec(), props(2));
    });
    let roots: Vec<(u32, u8)> = one
        .core
        .merkle_roots()
        .iter()
        .map(|r| (r.partition, r.n))
        .collect();
    let expected: Vec<(u32, u8)> = (0..8).flat_map(|p| [(p, 1), (p, 2), (p, 3)]).collect();
    assert_eq!(roots, expected);
}
