//! Local failure detection: which peers this core believes reachable.
//!
//! Each core keeps, per other ring member, a [`PhiDetector`] fed by every message it receives
//! from that peer (requests and answers alike) and, so that idle peers still produce arrivals,
//! by a heartbeat: every [`CoreConfig::heartbeat_ms`](super::CoreConfig::heartbeat_ms) the core
//! sends each member a [`PeerMsg::Ping`] and the [`PeerMsg::Pong`] is one more arrival. A peer
//! whose silence puts its φ above [`CoreConfig::phi_threshold`](super::CoreConfig::phi_threshold)
//! is suspected.
//!
//! Request outcomes count too, and faster: a request to the peer that timed out, or a lost
//! connection, suspects it at once, for `down_ms` or until it is heard from again (the detector
//! alone would take many heartbeat intervals to notice a crash that a failed request proves).
//!
//! The coordinator asks [`Core::believed_up`] when it picks a slot's holder, a forward target
//! or a home to deliver hints to, so a suspected home is skipped in favour of a fallback (with
//! no fallback believed up, a slot still tries its suspected home once, see `assign_slot`). There
//! is no global view: every core (every shard of every node) decides alone from what it saw,
//! and nothing about suspicion is sent to others.
//!
//! Limits: one detector ([`crate::phi::WINDOW_MAX`] samples) per ring member; heartbeats cost
//! one message pair per member per interval per core. A heartbeat is fire-and-forget: nothing
//! waits for its answer, so it leaves no state behind when lost.

use std::collections::BTreeMap;

use super::{Core, Output, PeerMsg};
use crate::NodeId;
use crate::phi::PhiDetector;

/// Heartbeat intervals of silence after which a peer is not chosen to coordinate a forwarded
/// write while another home answers ([`Core::forward_target`]). The failure detector needs many
/// more intervals to suspect it.
pub(super) const RESPONSIVE_HEARTBEATS: u64 = 2;

/// Failure-detection state of a core.
#[derive(Debug, Default)]
pub(super) struct Liveness {
    detectors: BTreeMap<NodeId, PhiDetector>,
    /// Peers suspected after a failed request, since when.
    down: BTreeMap<NodeId, u64>,
    /// When each peer was last heard from.
    last_heard: BTreeMap<NodeId, u64>,
    /// When the next heartbeat is due.
    pub(super) next_heartbeat: u64,
}

impl Core {
    /// Whether `node` is believed reachable at `now` (module docs).
    pub(super) fn believed_up(&self, node: NodeId, now: u64) -> bool {
        if node == self.cfg.node {
            return true;
        }
        if self
            .live
            .down
            .get(&node)
            .is_some_and(|since| now < since.saturating_add(self.cfg.down_ms))
        {
            return false;
        }
        self.live
            .detectors
            .get(&node)
            .is_none_or(|d| !d.suspected(now, self.cfg.phi_threshold))
    }

    /// Whether `node` is suspected at `now` (the opposite of [`Core::believed_up`]).
    pub fn suspects(&self, node: NodeId, now: u64) -> bool {
        !self.believed_up(node, now)
    }

    /// Other members suspected at `now`.
    pub fn suspected_count(&self, now: u64) -> usize {
        self.ring
            .members()
            .iter()
            .filter(|m| !self.believed_up(**m, now))
            .count()
    }

    /// A request to `node` timed out or its connection failed: suspected now.
    pub(super) fn mark_down(&mut self, node: NodeId, now: u64) {
        if node != self.cfg.node {
            self.live.down.insert(node, now);
        }
    }

    /// A message from `node` arrived at `now`.
    pub(super) fn heard_from(&mut self, node: NodeId, now: u64) {
        self.live.down.remove(&node);
        self.live.last_heard.insert(node, now);
        if node == self.cfg.node || !self.ring.members().contains(&node) {
            return;
        }
        let interval = self.cfg.heartbeat_ms;
        self.live
            .detectors
            .entry(node)
            .or_insert_with(|| PhiDetector::new(interval))
            .arrived(now);
    }

    /// Whether `node` was heard from within the last [`RESPONSIVE_HEARTBEATS`] heartbeat
    /// intervals (a peer never heard from yet counts as responsive: nothing says otherwise).
    pub(super) fn responsive(&self, node: NodeId, now: u64) -> bool {
        let window = self.cfg.heartbeat_ms.saturating_mul(RESPONSIVE_HEARTBEATS);
        node == self.cfg.node
            || self
                .live
                .last_heard
                .get(&node)
                .is_none_or(|t| now.saturating_sub(*t) <= window)
    }

    /// The home to forward a write to: the first of `homes` not in `tried` that is believed up
    /// and responsive, else the first believed up. A write forwarded to a home that stopped
    /// answering waits out its deadline (a forward is never moved while the home may still
    /// apply it: the write would get two dots, and the later one could come back after a
    /// client resolved it), so the choice avoids a home gone silent well before the failure
    /// detector suspects it.
    pub(super) fn forward_target(
        &self,
        homes: impl Iterator<Item = NodeId> + Clone,
        tried: &std::collections::BTreeSet<NodeId>,
        now: u64,
    ) -> Option<NodeId> {
        let candidates = homes.filter(|h| !tried.contains(h) && self.believed_up(*h, now));
        candidates
            .clone()
            .find(|h| self.responsive(*h, now))
            .or_else(|| candidates.clone().next())
    }

    /// Sends a heartbeat to every other member when one is due. A member seen for the first
    /// time starts being watched now.
    pub(super) fn heartbeat(&mut self, now: u64) {
        if now < self.live.next_heartbeat {
            return;
        }
        self.live.next_heartbeat = now + self.cfg.heartbeat_ms;
        let me = self.cfg.node;
        let members: Vec<NodeId> = self
            .ring
            .members()
            .iter()
            .copied()
            .filter(|m| *m != me)
            .collect();
        let interval = self.cfg.heartbeat_ms;
        self.live.detectors.retain(|n, _| members.contains(n));
        self.live.last_heard.retain(|n, _| members.contains(n));
        for node in members {
            self.live.detectors.entry(node).or_insert_with(|| {
                let mut d = PhiDetector::new(interval);
                d.arrived(now);
                d
            });
            let id = self.id();
            self.stats.heartbeats += 1;
            self.out.push(Output::Send {
                to: node,
                msg: PeerMsg::Ping { id },
            });
        }
    }
}
