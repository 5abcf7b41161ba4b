//! Operator commands (ADMIN frames) on the node's first shard.
//!
//! Any shard may receive an ADMIN frame on a client connection; it crosses the request mesh to
//! shard 0, which owns cluster-wide state, and the answer comes back the same way. The command
//! names and argument formats are those of `docs/PROTOCOL.md` §5.8.1.
//!
//! What is answered here is what a node of a static cluster knows: `cluster-status` lists the
//! members from the seed list and each one's share of the ring. The commands that change
//! membership (`cluster-join`, `cluster-leave`, `cluster-remove`, `cluster-plan`,
//! `cluster-commit`) are recognised and refused with `invalid_request`, saying that this node's
//! membership is static.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use ringkv_net::{Admin, AdminOk, ErrorCode, Message};

use crate::ring::Ring;

use super::super::NodeId;
use super::{Shard, error_message};

/// Commands that change membership; refused by a node whose membership is static.
const CHANGES: [&str; 5] = [
    "cluster-join",
    "cluster-leave",
    "cluster-remove",
    "cluster-plan",
    "cluster-commit",
];

impl Shard {
    /// Answers one operator command; runs on shard 0 only.
    pub(super) async fn admin_command(self: &Rc<Self>, admin: Admin) -> Message {
        debug_assert_eq!(self.id, 0);
        match admin.command.as_str() {
            "cluster-status" if admin.args.is_empty() => {
                let text = static_status(self.node_id, &self.peers.borrow(), self.core.borrow().ring());
                Message::AdminOk(AdminOk {
                    body: Bytes::from(text.into_bytes()),
                })
            }
            "cluster-status" => error_message(
                ErrorCode::InvalidRequest,
                "cluster-status takes no arguments",
            ),
            c if CHANGES.contains(&c) => error_message(
                ErrorCode::InvalidRequest,
                format!("{c}: this node's membership is static (set by --seeds)"),
            ),
            c => error_message(
                ErrorCode::InvalidRequest,
                format!("unknown admin command {c:?}"),
            ),
        }
    }
}

/// The status of a static cluster: one line per member, its peer address and its share of the
/// ring's partitions.
fn static_status(me: NodeId, peers: &BTreeMap<NodeId, SocketAddr>, ring: &Ring) -> String {
    let counts = ring.ownership_counts();
    let total = ring.partition_count().get();
    let mut out = String::new();
    let _ = writeln!(out, "ring version {} partitions {total}", ring.version());
    for node in ring.members() {
        let owned = counts.get(node).copied().unwrap_or(0);
        let addr = match peers.get(node) {
            Some(addr) => addr.to_string(),
            None if *node == me => "this node".to_owned(),
            None => "unknown".to_owned(),
        };
        let _ = writeln!(
            out,
            "{node} valid {owned} partitions {:.1}% {addr}",
            owned as f64 * 100.0 / f64::from(total)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    use super::*;
    use crate::ring::PartitionCount;

    /// Every member is listed once with its share; the shares add up to the whole ring.
    #[test]
    fn status_lists_members_and_shares() {
        let members: BTreeSet<NodeId> = [1, 2, 3].into_iter().map(NodeId).collect();
        let ring = Ring::new(PartitionCount::new(64).unwrap(), &members, 3).unwrap();
        let peers = [(NodeId(2), "127.0.0.1:2".parse().unwrap())]
            .into_iter()
            .collect();
        let text = static_status(NodeId(1), &peers, &ring);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("node-1 valid ") && lines[1].ends_with("this node"));
        assert!(lines[2].ends_with("127.0.0.1:2"));
        assert!(lines[3].ends_with("unknown"));
        let owned: usize = lines[1..]
            .iter()
            .map(|l| l.split(' ').nth(2).unwrap().parse::<usize>().unwrap())
            .sum();
        assert_eq!(owned, 64);
    }
}
