//! The simulated network: messages between node incarnations, with delays, loss,
//! duplication and partitions.

use rand::Rng;
use ringkv_core::coordinator::PeerMsg;
use ringkv_core::membership::MembershipMsg;

use super::{Event, HINT_CREDIT_MAX, Sim};

/// What travels between simulated nodes.
#[derive(Clone, Debug)]
pub(super) enum SimMsg {
    Core(PeerMsg),
    Member(MembershipMsg),
}

impl SimMsg {
    pub(super) fn is_answer(&self) -> bool {
        match self {
            SimMsg::Core(m) => m.is_answer(),
            SimMsg::Member(m) => m.is_answer(),
        }
    }

    /// A failure-detector heartbeat or its answer.
    pub(super) fn is_heartbeat(&self) -> bool {
        matches!(self, SimMsg::Core(m) if m.is_heartbeat())
    }

    /// The id a request and its answer share, tagged with its kind: the core and membership
    /// count their ids apart, so the same number can name one request of each.
    pub(super) fn id(&self) -> MsgId {
        match self {
            SimMsg::Core(m) => MsgId::Core(m.id()),
            SimMsg::Member(m) => MsgId::Member(m.id()),
        }
    }
}

/// A request's id as the simulator books it (answers owed): the sender's own id, with whose it
/// is. Messages are delivered as typed values, so this only keys the simulator's bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum MsgId {
    Core(u64),
    Member(u64),
}

#[derive(Clone, Debug)]
pub(super) struct Envelope {
    pub(super) from: usize,
    pub(super) to: usize,
    pub(super) to_incarnation: u32,
    pub(super) from_incarnation: u32,
    pub(super) msg: SimMsg,
}

impl Sim {
    pub(super) fn reachable(&self, a: usize, b: usize) -> bool {
        self.island.contains(&a) == self.island.contains(&b)
    }

    pub(super) fn send(&mut self, from: usize, to: usize, msg: SimMsg) {
        if let SimMsg::Core(PeerMsg::ReplicaPutOk { id, durable }) = &msg {
            self.check_ack(from, to, *id, *durable);
        }
        let from_incarnation = self.nodes[from].incarnation;
        let to_incarnation = if msg.is_answer() {
            let id = msg.id();
            // Kept after the first answer: a duplicated request's second answer belongs to the
            // same incarnation of the requester.
            match self.owed.get(&(from, to, id)).copied() {
                Some(inc) => inc,
                // Not owed (a duplicate's second answer): the requester still gets it.
                None => self.nodes[to].incarnation,
            }
        } else {
            self.nodes[to].incarnation
        };
        let env = Envelope {
            from,
            to,
            to_incarnation,
            from_incarnation,
            msg,
        };
        if self.faults && self.rng.gen_range(0..1000) < self.params.drop_permille {
            self.injected.0 += 1;
            return;
        }
        // Peer links are TCP: a message is never delivered twice by the network. Duplicates
        // stand for retries; a forwarded client request is not retried (a retry would be a new
        // write), so it is never duplicated.
        let duplicable = !matches!(env.msg, SimMsg::Core(PeerMsg::Forward { .. }));
        let copies = if duplicable
            && self.faults
            && self.rng.gen_range(0..1000) < self.params.dup_permille
        {
            2
        } else {
            1
        };
        self.injected.1 += copies - 1;
        for _ in 0..copies {
            let delay = self.rng.gen_range(1..=self.params.delay_max_ms);
            self.schedule(delay, Event::Deliver(env.clone()));
        }
    }

    pub(super) fn deliver(&mut self, env: Envelope) {
        let Envelope {
            from,
            to,
            to_incarnation,
            from_incarnation,
            msg,
        } = env;
        if self.nodes[to].incarnation != to_incarnation || self.nodes[to].core.is_none() {
            return;
        }
        if !self.reachable(from, to) {
            return;
        }
        if !msg.is_answer() {
            if self.nodes[from].incarnation != from_incarnation {
                // The requester restarted: its connection, and so this request, is gone.
                return;
            }
            // Nothing waits for a heartbeat's answer: not recorded (it would pile up).
            if !msg.is_heartbeat() {
                self.owed.insert((to, from, msg.id()), from_incarnation);
            }
        }
        if let SimMsg::Core(PeerMsg::ReplicaPut {
            id, key, object, ..
        }) = &msg
        {
            self.puts
                .insert((to, from, *id), (key.clone(), object.clone()));
        }
        if let SimMsg::Core(PeerMsg::Forward { id, .. }) = &msg
            && let Some(op) = self.retry_forwards.remove(&(from, *id))
        {
            // A retried increment reaches the home that coordinates it.
            self.note_retry_coordinator(to, op);
        }
        if let SimMsg::Core(PeerMsg::HintCreditOk { id, granted }) = &msg {
            assert!(
                *granted <= HINT_CREDIT_MAX,
                "node {} granted {granted} hints, above the limit",
                from + 1
            );
            // A duplicated request is answered twice; the holder uses the first answer.
            self.grants
                .entry((to, to_incarnation, *id))
                .or_insert(*granted);
        }
        self.mix(0x1000 + to as u64);
        if self.verbose {
            println!(
                "{:>6} node-{} <- node-{}: {msg:?}",
                self.now,
                to + 1,
                from + 1
            );
        }
        let now = self.now;
        let from_id = self.nodes[from].id;
        match msg {
            SimMsg::Core(msg) => {
                let outputs = self.core(to).handle_peer(now, from_id, msg);
                self.outputs(to, outputs);
            }
            SimMsg::Member(msg) => {
                if let Some(m) = self.nodes[to].membership.as_mut() {
                    let outputs = m.handle_msg(now, Some(from_id), msg);
                    self.member_outputs(to, outputs);
                }
            }
        }
    }
}
