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
//! The coordinator asks `Liveness::believed_up` when it picks a slot's holder, a forward target
//! or a home to deliver hints to, so a suspected home is skipped in favour of a fallback (with
//! no fallback believed up, a slot still tries its suspected home once, see `assign_slot`). There
//! is no global view: every core (every shard of every node) decides alone from what it saw,
//! and nothing about suspicion is sent to others.
//!
//! Limits: one detector ([`crate::phi::WINDOW_MAX`] samples) per ring member; heartbeats cost
//! one message pair per member per interval per core. A heartbeat is fire-and-forget: nothing
//! waits for its answer, so it leaves no state behind when lost.

use std::collections::{BTreeMap, BTreeSet};

use super::{Core, Output, PeerMsg};
use crate::NodeId;
use crate::phi::PhiDetector;

/// Heartbeat intervals of silence after which a peer is not chosen to coordinate a forwarded
/// write while another home answers ([`Core::forward_target`]). The failure detector needs many
/// more intervals to suspect it.
pub(super) const RESPONSIVE_HEARTBEATS: u64 = 2;

/// Failure-detection state of a core: what it heard from every peer, and when, and what it
/// concluded. Owns its own settings, so nothing else reaches into it.
#[derive(Debug)]
pub(super) struct Liveness {
    /// This node: always believed up.
    me: NodeId,
    /// Interval between heartbeats, in milliseconds.
    heartbeat_ms: u64,
    /// How long a failed request keeps a peer suspected, unless it is heard from first.
    down_ms: u64,
    /// Suspicion level above which a silent peer is believed down.
    phi_threshold: f64,
    detectors: BTreeMap<NodeId, PhiDetector>,
    /// Peers suspected after a failed request, since when.
    down: BTreeMap<NodeId, u64>,
    /// When each peer was last heard from.
    last_heard: BTreeMap<NodeId, u64>,
    /// When the next heartbeat is due.
    next_heartbeat: u64,
}

impl Liveness {
    pub(super) fn new(me: NodeId, heartbeat_ms: u64, down_ms: u64, phi_threshold: f64) -> Self {
        Liveness {
            me,
            heartbeat_ms,
            down_ms,
            phi_threshold,
            detectors: BTreeMap::new(),
            down: BTreeMap::new(),
            last_heard: BTreeMap::new(),
            next_heartbeat: 0,
        }
    }

    /// Whether `node` is believed reachable at `now` (module docs).
    pub(super) fn believed_up(&self, node: NodeId, now: u64) -> bool {
        if node == self.me {
            return true;
        }
        if self
            .down
            .get(&node)
            .is_some_and(|since| now < since.saturating_add(self.down_ms))
        {
            return false;
        }
        self.detectors
            .get(&node)
            .is_none_or(|d| !d.suspected(now, self.phi_threshold))
    }

    /// A request to `node` timed out or its connection failed: suspected now.
    pub(super) fn mark_down(&mut self, node: NodeId, now: u64) {
        if node != self.me {
            self.down.insert(node, now);
        }
    }

    /// A message from `node` arrived at `now`; `member` says whether it is a ring member (only
    /// members are watched).
    pub(super) fn heard_from(&mut self, node: NodeId, now: u64, member: bool) {
        self.down.remove(&node);
        self.last_heard.insert(node, now);
        if node == self.me || !member {
            return;
        }
        let interval = self.heartbeat_ms;
        self.detectors
            .entry(node)
            .or_insert_with(|| PhiDetector::new(interval))
            .arrived(now);
    }

    /// Whether `node` was heard from within the last [`RESPONSIVE_HEARTBEATS`] heartbeat
    /// intervals (a peer never heard from yet counts as responsive: nothing says otherwise).
    pub(super) fn responsive(&self, node: NodeId, now: u64) -> bool {
        let window = self.heartbeat_ms.saturating_mul(RESPONSIVE_HEARTBEATS);
        node == self.me
            || self
                .last_heard
                .get(&node)
                .is_none_or(|t| now.saturating_sub(*t) <= window)
    }

    /// The home to forward a write to: the first of `homes` not in `tried` that is believed up
    /// and responsive, else the first believed up. Most writes forwarded to a home that
    /// stopped answering wait out their deadline (they are not moved while the home may still
    /// apply them: a siblings write would get two dots, and the later one could come back after
    /// a client resolved it; only a last-write-wins put moves, see the module docs of
    /// `coordinator`), so the choice avoids a home gone silent well before the failure detector
    /// suspects it.
    pub(super) fn forward_target(
        &self,
        homes: impl Iterator<Item = NodeId> + Clone,
        tried: &BTreeSet<NodeId>,
        now: u64,
    ) -> Option<NodeId> {
        let candidates = homes.filter(|h| !tried.contains(h) && self.believed_up(*h, now));
        candidates
            .clone()
            .find(|h| self.responsive(*h, now))
            .or_else(|| candidates.clone().next())
    }

    /// When the next heartbeat is due.
    pub(super) fn next_heartbeat(&self) -> u64 {
        self.next_heartbeat
    }

    /// The members to send a heartbeat to, if one is due at `now`; forgets peers that are no
    /// longer `members`, and starts watching a member seen for the first time.
    fn heartbeat_due(&mut self, now: u64, members: &BTreeSet<NodeId>) -> Option<Vec<NodeId>> {
        if now < self.next_heartbeat {
            return None;
        }
        self.next_heartbeat = now + self.heartbeat_ms;
        let me = self.me;
        let members: Vec<NodeId> = members.iter().copied().filter(|m| *m != me).collect();
        let interval = self.heartbeat_ms;
        self.detectors.retain(|n, _| members.contains(n));
        self.last_heard.retain(|n, _| members.contains(n));
        for node in &members {
            self.detectors.entry(*node).or_insert_with(|| {
                let mut d = PhiDetector::new(interval);
                d.arrived(now);
                d
            });
        }
        Some(members)
    }
}

impl Core {
    /// Whether `node` is suspected at `now` (the opposite of `Liveness::believed_up`).
    pub fn suspects(&self, node: NodeId, now: u64) -> bool {
        !self.live.believed_up(node, now)
    }

    /// Other members suspected at `now`.
    pub fn suspected_count(&self, now: u64) -> usize {
        self.ring
            .members()
            .iter()
            .filter(|m| !self.live.believed_up(**m, now))
            .count()
    }

    /// A message from `node` arrived at `now`.
    pub(super) fn heard_from(&mut self, node: NodeId, now: u64) {
        let member = self.ring.members().contains(&node);
        self.live.heard_from(node, now, member);
    }

    /// Sends a heartbeat to every other member when one is due.
    pub(super) fn heartbeat(&mut self, now: u64) {
        let Some(members) = self.live.heartbeat_due(now, self.ring.members()) else {
            return;
        };
        for node in members {
            let id = self.id();
            self.stats.heartbeats += 1;
            self.out.push(Output::Send {
                to: node,
                msg: PeerMsg::Ping { id },
            });
        }
    }
}
