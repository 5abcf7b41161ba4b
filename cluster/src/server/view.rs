//! The cluster view every shard works from, and how the first shard publishes it.
//!
//! The first shard owns the node's membership; every other shard holds an immutable snapshot of
//! what it needs from it, a [`ShardView`]: the ring in use, the ring being moved to (if a change
//! is committed and its transfers are running), and every member's peer address. Shard 0 sends
//! each new view to every shard over a channel mesh of its own ([`Control`]), so a view never
//! waits behind requests in the request mesh, and applies it to itself the same way.
//!
//! Applying a view replaces the shard's address book and hands the rings to its core. A link to
//! a node that is no longer a member, or whose address changed, is closed: its queue is dropped,
//! the link task ends once it has written what was queued, and the next message for the node
//! opens a link to its new address. Requests in flight on a closed link get no answer and time
//! out in the core, like those on a link that broke. The core gets both rings
//! (`Core::set_view`), from which it starts pulls and handoffs; at start it also learns which
//! partitions the engine holds. A partition the core reports received
//! (`Output::TransferDone`) crosses the same mesh to shard 0's membership.
//!
//! Limits: views are small and rare (a membership change, not a request), so the mesh queue is
//! short ([`CONTROL_QUEUE_MESSAGES_MAX`]); a sender waits when it is full. A shard applies views
//! in the order shard 0 sent them; a view older than the one applied is ignored.

use super::driver::Input;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use ringkv_core::membership::View;
use ringkv_core::ring::Ring;

use super::Shard;
use crate::replica::HINT_PARTITION_BASE;
use ringkv_core::NodeId;

/// Capacity of each shard's queue in the control mesh, in messages.
pub(super) const CONTROL_QUEUE_MESSAGES_MAX: usize = 64;

/// What a shard needs from the node's membership, as of one version.
#[derive(Debug)]
pub(super) struct ShardView {
    /// Version of the membership state this view was taken from; views only move forward.
    pub(super) version: u64,
    /// The ring requests are placed by.
    pub(super) ring: Ring,
    /// The ring a committed change moves to, while its transfers run, with the epoch transfer
    /// reports name.
    pub(super) pending: Option<(u64, Ring)>,
    /// Peer address of every other member.
    pub(super) peers: BTreeMap<NodeId, SocketAddr>,
}

impl ShardView {
    /// What a shard of node `me` needs from membership's `view`. A member whose peer address is
    /// not an `IP:PORT` is left out (and logged): every address membership holds came from a
    /// `--peer-listen`, which is one, so this only guards against a damaged state.
    pub(super) fn from_view(me: NodeId, view: &View) -> ShardView {
        let mut peers = BTreeMap::new();
        for id in view.members.keys().copied().filter(|id| *id != me) {
            let Some(addr) = view.peer_addr(id) else {
                continue;
            };
            match addr.parse::<SocketAddr>() {
                Ok(addr) => {
                    peers.insert(id, addr);
                }
                Err(_) => tracing::warn!(node = %id, addr, "member without a usable peer address"),
            }
        }
        ShardView {
            version: view.version,
            ring: view.ring.clone(),
            pending: view.pending.clone(),
            peers,
        }
    }
}

/// What shards tell each other outside requests.
#[derive(Debug)]
pub(super) enum Control {
    /// A new view, from shard 0 to every other shard.
    View(Arc<ShardView>),
    /// A partition of the pending ring of `epoch` was received, from any shard to shard 0.
    TransferDone {
        /// Epoch of the pending ring.
        epoch: u64,
        /// The partition.
        partition: u32,
    },
}

impl Shard {
    /// Makes `view` this shard's view: addresses for its links, rings for its core.
    pub(super) fn apply_view(self: &Rc<Self>, view: &ShardView) {
        if view.version < self.view_version.get() {
            return;
        }
        self.view_version.set(view.version);
        {
            let mut peers = self.peers.borrow_mut();
            let mut links = self.links.borrow_mut();
            links.retain(|node, _| {
                let keep = view
                    .peers
                    .get(node)
                    .is_some_and(|a| peers.get(node) == Some(a));
                if !keep {
                    tracing::info!(
                        shard = self.id,
                        node = %node,
                        view = view.version,
                        "closing the link to a changed or removed member"
                    );
                }
                keep
            });
            peers.clone_from(&view.peers);
        }
        self.drive(Input::View {
            ring: view.ring.clone(),
            pending: view.pending.clone(),
            stored: None,
        });
    }

    /// Gives the core its first view and the partitions its engine holds, so it resumes pulls
    /// towards a pending ring and hands off what this node no longer replicates.
    pub(super) fn start_view(self: &Rc<Self>, view: &ShardView) {
        let stored: Vec<u32> = self
            .engine
            .partitions()
            .into_iter()
            .filter(|p| p & HINT_PARTITION_BASE == 0)
            .collect();
        self.drive(Input::View {
            ring: view.ring.clone(),
            pending: view.pending.clone(),
            stored: Some(stored),
        });
    }

    /// Reports a received partition to membership, on shard 0.
    pub(super) fn transfer_done(self: &Rc<Self>, epoch: u64, partition: u32) {
        tracing::info!(shard = self.id, epoch, partition, "partition received");
        if self.id == 0 {
            self.membership_transfer_done(epoch, partition);
            return;
        }
        let shard = self.clone();
        let spawned = self.store_work.spawn(async move {
            // Fails only when the node is stopping; the pull is then redone by the next run.
            let _ = shard
                .control
                .send_to(0, Control::TransferDone { epoch, partition })
                .await;
        });
        if let Ok(task) = spawned {
            task.detach();
        }
    }
}
