//! Fuzz target: what membership reads from the outside: gossip and the other CLUSTER messages
//! of membership (`MembershipMsg::decode`), and the node's `cluster-state` file
//! (`Membership::restore`).
//!
//! The first byte picks the message's sub-kind and whether it is an answer; the rest is the
//! payload. Checks that decoding never panics, that a decoded message encodes and decodes back
//! to itself, and that a node handles it and can still compute its view, status and plan. The
//! whole input is also tried as a state file, which a node that could read it starts from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_core::NodeId;
use ringkv_core::membership::{Membership, MembershipConfig, MembershipMsg, Reach};
use ringkv_core::ring::PartitionCount;

fn cfg() -> MembershipConfig {
    MembershipConfig {
        node: NodeId(1),
        peer_addr: "127.0.0.1:7001".into(),
        client_addr: "127.0.0.1:6001".into(),
        gossip_ms: 1000,
        request_timeout_ms: 500,
        target_n: 3,
        partitions: PartitionCount::new(64).expect("a power of two"),
        incarnation: 101,
        fresh: false,
        contact_seeds: Vec::new(),
    }
}

fn exercise(m: &Membership) {
    let _ = (m.view(), m.status_text(&|_| Reach::Up), m.plan_text());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Membership::restore(cfg(), data) {
        exercise(&m);
    }
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let (sub, answer) = (selector & 0x7f, selector & 0x80 != 0);
    let Ok(Some(msg)) = MembershipMsg::decode(7, sub, answer, payload) else {
        return;
    };
    let (again_sub, again) = msg.encode();
    assert_eq!(again_sub, sub, "{msg:?} changed its sub-kind");
    assert_eq!(
        MembershipMsg::decode(7, again_sub, answer, &again),
        Ok(Some(msg.clone())),
        "{msg:?} does not survive a round trip"
    );
    // A node of a three-node cluster receives it from one of the others.
    let seeds = [1, 2, 3].map(|i| (NodeId(i), format!("127.0.0.1:{}", 7000 + i)));
    let mut node = Membership::bootstrap(cfg(), &seeds).expect("a valid cluster");
    let _ = node.handle_msg(0, Some(NodeId(2)), msg);
    exercise(&node);
});
