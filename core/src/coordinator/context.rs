//! What the core lends its sub-machines: the [`View`] they read (settings, ring, failure
//! detector) and the [`Outbox`] they write to (request ids, the table of outstanding requests,
//! their timeouts, outputs and counters).
//!
//! A sub-machine (the hint store in `hints.rs`, anti-entropy in `antientropy.rs`, partition
//! transfers in `transfer.rs`) owns its state and takes these two as
//! parameters, so it reaches no field of the core it does not own: what it may read and what it
//! may emit is in its signatures. The core lends both with disjoint borrows of its own fields
//! ([`Core::ae_parts`](super::Core)), beside the sub-machine's state. Work that needs the rest
//! of the core (a per-key job, a new epoch) goes back to it as an effect the sub-machine
//! returns.

use std::collections::BTreeSet;

use super::liveness::Liveness;
use super::{Core, CoreConfig, CoreStats, Output, PeerMsg, Pending, StoreKey, StoreOp};
use crate::NodeId;
use crate::ring::Ring;

/// What a sub-machine reads of the core.
pub(super) struct View<'a> {
    /// The core's settings.
    pub(super) cfg: &'a CoreConfig,
    /// The ring in force.
    pub(super) ring: &'a Ring,
    /// Walk order of every partition of `ring`.
    pub(super) walks: &'a [Vec<NodeId>],
    /// The failure detector.
    pub(super) live: &'a Liveness,
}

/// Where a sub-machine's messages and storage operations go. Ids come from the core's one
/// counter and answers are found in its one table of outstanding requests, so every answer
/// reaches its owner through the same lookup.
pub(super) struct Outbox<'a> {
    pub(super) next_id: &'a mut u64,
    pub(super) pending: &'a mut super::Table<u64, Pending>,
    pub(super) timeouts: &'a mut BTreeSet<(u64, u64)>,
    pub(super) out: &'a mut Vec<Output>,
    /// The core's counters.
    pub(super) stats: &'a mut CoreStats,
}

impl Outbox<'_> {
    /// A fresh id for a message or storage operation.
    pub(super) fn id(&mut self) -> u64 {
        let id = *self.next_id;
        *self.next_id += 1;
        id
    }

    /// Sends request `msg` to `to`; nothing waits for its answer.
    pub(super) fn send(&mut self, to: NodeId, msg: PeerMsg) {
        debug_assert!(!msg.is_answer(), "a request, not an answer: {msg:?}");
        self.out.push(Output::Send { to, msg });
    }

    /// Answers request `msg.id()` of `to` with `msg`.
    pub(super) fn answer(&mut self, to: NodeId, msg: PeerMsg) {
        debug_assert!(msg.is_answer(), "an answer, not a request: {msg:?}");
        self.out.push(Output::Answer { to, msg });
    }

    /// Sends a request to `to` under a fresh id, remembering what its answer is for
    /// (`pending`) and giving it up after `timeout_ms`. Returns the id.
    pub(super) fn request(
        &mut self,
        now: u64,
        timeout_ms: u64,
        to: NodeId,
        pending: Pending,
        msg: impl FnOnce(u64) -> PeerMsg,
    ) -> u64 {
        let id = self.id();
        self.pending.insert(id, pending);
        self.timeouts.insert((now + timeout_ms, id));
        self.send(to, msg(id));
        id
    }

    /// Runs a storage operation whose result goes to `pending`'s owner.
    pub(super) fn store(&mut self, pending: Pending, key: StoreKey, op: StoreOp) {
        let id = self.id();
        self.pending.insert(id, pending);
        self.out.push(Output::Store { id, key, op });
    }
}

/// The core's [`View`] and [`Outbox`] at once, borrowed field by field from `$core` (a
/// `&mut Core`), so that the caller may borrow a sub-machine's state beside them.
macro_rules! lend {
    ($core:ident) => {
        (
            $crate::coordinator::context::View {
                cfg: &$core.cfg,
                ring: &$core.ring,
                walks: &$core.walks,
                live: &$core.live,
            },
            $crate::coordinator::context::Outbox {
                next_id: &mut $core.next_id,
                pending: &mut $core.pending,
                timeouts: &mut $core.timeouts,
                out: &mut $core.out,
                stats: &mut $core.stats,
            },
        )
    };
}
pub(super) use lend;

impl Core {
    /// What a sub-machine reads of the core, alone.
    pub(super) fn view(&self) -> View<'_> {
        View {
            cfg: &self.cfg,
            ring: &self.ring,
            walks: &self.walks,
            live: &self.live,
        }
    }

    /// Where the core's own steps emit, alone.
    pub(super) fn outbox(&mut self) -> Outbox<'_> {
        lend!(self).1
    }
}
