//! Hinted handoff: the bounded hint store and receiver-paced delivery (credit).
//!
//! **Bound.** A fallback stores what it receives for an unreachable home as a hint
//! ([`Space::Hint`]). Hints are the one thing a node accumulates because *other* nodes are down,
//! so they are bounded: the core counts the bytes of every hint it holds ([`hint_bytes`]: bucket,
//! key and encoded object), including the ones found in storage at start (the shell hands their
//! sizes to [`Core::new`]), and refuses a hint write that would take the total past
//! [`CoreConfig::hint_bytes_max`]. The refusal is a typed `overloaded` answer, so the coordinator
//! moves the slot to the next fallback (or fails the request if `w` cannot be met); the write is
//! never acknowledged and silently dropped. Each refusal counts in [`CoreStats::hint_overflow`].
//! The size is reserved when the write is decided (under the key's lock), so writes running at
//! once cannot overshoot together; an update that does not grow a hint is always accepted; a
//! delivered or vanished hint frees its bytes. A replica that missed a refused hint is repaired
//! later by read repair (and anti-entropy).
//!
//! **Credit.** A node coming back from a long outage would otherwise receive every hint its
//! neighbours hold at once, competing with its client traffic (ScyllaDB users saw hint replay
//! raise write latency by an order of magnitude). So the receiver paces delivery: each round
//! (every `hint_retry_ms`), the holder asks every reachable home it holds hints for, that has no
//! window open, for credit ([`PeerMsg::HintCredit`] with how many it has ready, bounded by its
//! own in-flight budget). The home answers ([`PeerMsg::HintCreditOk`]) from its own state: at
//! most `hint_credit_max`, scaled by its background share (admission control) and by how far its
//! requests and key jobs in flight are below `hint_busy_ops`; nothing once they reach it. The
//! holder then starts at most that many deliveries, and asks again only once every one of them
//! was answered (a window). So the holder never has more hints in flight to a home than the
//! home's last grant, and a busy home slows delivery to a trickle or stops it. A window that
//! ended with every hint acknowledged asks again at the next tick, so an idle home drains at one
//! grant per round trip; a refused or failed window waits for the next round.
//!
//! The holder's own budget, [`CoreConfig::hint_inflight_max`], is scaled by the background share
//! too (at least one), so a node whose own clients suffer also slows what it sends.
//!
//! **Homes that left.** Delivery goes to `HintStore::target`: the home while it is in the ring
//! in force or the pending ring, else (it left the cluster) a current replica of the hint's
//! partition, under the same credit. Hints therefore drain even when their home never returns.
//!
//! Limits: a hint round and a grant scan the hint map (`O(hints)`), which is fine for the
//! bounded store; credit is granted by whichever core of the home receives the request, from
//! that core's load.

use std::collections::BTreeMap;

use ringkv_net::{ErrorBody, ErrorCode, Message};

use super::context::{Outbox, View, lend};
use super::{Core, JobKind, Output, PeerMsg, Pending, Space, StoreKey, StoreOp};
use crate::NodeId;
use crate::object::Object;
use crate::ring::{PartitionId, Ring};

/// The bytes a hint counts for in the bound: its bucket, key and encoded object.
pub fn hint_bytes(key: &StoreKey, object_bytes: usize) -> u64 {
    (key.bucket.len() + key.key.len() + object_bytes) as u64
}

/// State of one stored hint.
#[derive(Debug, Default)]
struct HintState {
    /// Being read for delivery or sent to its home.
    in_flight: bool,
    /// Bytes counted for it (reserved when its write was decided).
    bytes: u64,
    /// A write of it is running (it may not be in storage yet: not delivered meanwhile).
    writing: bool,
}

/// A holder's delivery window to one home.
#[derive(Debug, Default)]
struct Window {
    /// Outstanding credit request.
    asking: Option<u64>,
    /// The grant in use: its request id and size.
    grant: Option<(u64, u32)>,
    /// Deliveries in flight to the home.
    in_flight: u32,
    /// A delivery of the window was not acknowledged durably.
    failed: bool,
}

/// The delivery window of a holder to one home, for checkers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintWindow {
    /// The home.
    pub home: NodeId,
    /// Id of the credit request whose grant is in use.
    pub grant_id: u64,
    /// Hints that grant allows in flight.
    pub granted: u32,
    /// Hints in flight to the home now.
    pub in_flight: u32,
}

/// The hint store of a core: every hint it holds with its state, their bytes against the bound,
/// the delivery windows to each home, the share of the background that delivery may use, and
/// the credit rounds that pace delivery. Like anti-entropy it reads the core through a `View`
/// and emits through an `Outbox` (`context.rs`); the key locks (writing a hint, removing a
/// delivered one) stay with the core, which tells this type how they end.
#[derive(Debug)]
pub(super) struct HintStore {
    /// Every hint held, by its stored key.
    held: BTreeMap<StoreKey, HintState>,
    /// Bytes of every hint held.
    bytes: u64,
    /// Most bytes of hints held ([`CoreConfig::hint_bytes_max`](super::CoreConfig::hint_bytes_max)).
    bytes_max: u64,
    /// Deliveries in flight, over all homes.
    in_flight: usize,
    /// Most deliveries in flight at full share.
    in_flight_max: usize,
    windows: BTreeMap<NodeId, Window>,
    /// The background share from admission control, in `(0, 1]`.
    share: f64,
    /// When the next credit round is due.
    next_round: u64,
}

impl HintStore {
    pub(super) fn new(bytes_max: u64, in_flight_max: usize) -> Self {
        HintStore {
            held: BTreeMap::new(),
            bytes: 0,
            bytes_max,
            in_flight: 0,
            in_flight_max,
            windows: BTreeMap::new(),
            share: 1.0,
            next_round: 0,
        }
    }

    /// Takes in the hints found in storage at start.
    fn load(&mut self, hints: impl IntoIterator<Item = (StoreKey, u64)>) {
        for (key, bytes) in hints {
            if home_of(&key).is_none() {
                continue;
            }
            let state = HintState {
                in_flight: false,
                bytes,
                writing: false,
            };
            if let Some(old) = self.held.insert(key, state) {
                self.bytes -= old.bytes;
            }
            self.bytes += bytes;
        }
    }

    /// Every hint held.
    pub(super) fn keys(&self) -> impl Iterator<Item = &StoreKey> + '_ {
        self.held.keys()
    }

    /// Hints held, with whether each is being delivered.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&StoreKey, bool)> + '_ {
        self.held.iter().map(|(k, h)| (k, h.in_flight))
    }

    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Most deliveries in flight at once, over all homes, at the current share.
    fn budget(&self) -> usize {
        ((self.in_flight_max as f64 * self.share) as usize).max(1)
    }

    /// Reserves the size of `object` for hint `key` before it is written, or refuses it.
    fn reserve(&mut self, key: &StoreKey, object: &Object) -> Result<(), ErrorBody> {
        assert!(home_of(key).is_some(), "only hints are reserved");
        let new = hint_bytes(key, object.encoded_len());
        let old = self.held.get(key).map_or(0, |h| h.bytes);
        let total = self.bytes - old + new;
        if new > old && total > self.bytes_max {
            return Err(ErrorBody::new(
                ErrorCode::Overloaded,
                format!(
                    "hint store full: {} of {} bytes held, a hint of {new} bytes does not fit",
                    self.bytes, self.bytes_max
                ),
            ));
        }
        if !self.held.contains_key(key) {
            // Held for as long as the hint lives: a copy, never a slice of a request's buffer.
            self.held.insert(key.detached(), HintState::default());
        }
        let state = self.held.get_mut(key).expect("inserted above");
        state.bytes = new;
        state.writing = true;
        self.bytes = total;
        Ok(())
    }

    /// The write of `key` ended (done or failed); it may be delivered again.
    fn write_ended(&mut self, key: &StoreKey) {
        if let Some(h) = self.held.get_mut(key) {
            h.writing = false;
        }
    }

    /// `key` is no longer stored (delivered, or found missing): its bytes are freed.
    fn gone(&mut self, key: &StoreKey) {
        if self.held.get(key).is_some_and(|h| h.writing) {
            // A write of it started after the read that found nothing: it stays.
            return;
        }
        if let Some(h) = self.held.remove(key) {
            self.bytes -= h.bytes;
        }
    }

    /// A delivery of `hint` to `to` ended: acknowledged durably (`delivered`) or not. True when
    /// it closed `to`'s window with every delivery of it acknowledged.
    fn settled(&mut self, hint: &StoreKey, to: NodeId, delivered: bool) -> bool {
        self.in_flight -= 1;
        if let Some(h) = self.held.get_mut(hint) {
            h.in_flight = false;
        }
        let Some(w) = self.windows.get_mut(&to) else {
            return false;
        };
        w.in_flight -= 1;
        w.failed |= !delivered;
        if w.in_flight > 0 {
            return false;
        }
        w.grant = None;
        !std::mem::take(&mut w.failed)
    }

    /// Marks `hint` in flight to a home.
    fn start_delivery(&mut self, hint: &StoreKey) {
        self.in_flight += 1;
        if let Some(h) = self.held.get_mut(hint) {
            h.in_flight = true;
        }
    }

    /// When the next credit round is due, if any hint is held.
    pub(super) fn deadline(&self) -> Option<u64> {
        (!self.is_empty()).then_some(self.next_round)
    }

    /// Where `hint` is delivered: its home while the home is in the ring in force or the
    /// `pending` one; once the home has left the ring (it left, or was removed), the first other
    /// node of the partition's current preference list, so hints never wait for a node that
    /// will not come back. One current replica is enough: the write also reached the replicas
    /// that acknowledged it, and anti-entropy brings it to the others. `None` when no other
    /// node replicates the partition (the hint then stays).
    fn target(v: &View<'_>, pending: Option<&Ring>, hint: &StoreKey) -> Option<NodeId> {
        let home = home_of(hint)?;
        let in_ring = v.ring.members().contains(&home)
            || pending.is_some_and(|p| p.members().contains(&home));
        if in_ring {
            return Some(home);
        }
        v.ring
            .preference_list(PartitionId(hint.partition), v.cfg.target_n)
            .into_iter()
            .find(|n| *n != v.cfg.node)
    }

    /// Hints ready to be delivered (not in flight, not being written) per delivery target.
    fn per_target(&self, v: &View<'_>, pending: Option<&Ring>) -> BTreeMap<NodeId, usize> {
        let mut per = BTreeMap::new();
        for (k, h) in &self.held {
            if let Some(to) = Self::target(v, pending, k)
                && !h.in_flight
                && !h.writing
            {
                *per.entry(to).or_default() += 1;
            }
        }
        per
    }

    /// Runs a credit round if one is due.
    pub(super) fn tick(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        pending: Option<&Ring>,
        now: u64,
    ) {
        if !self.is_empty() && now >= self.next_round {
            self.next_round = now + v.cfg.hint_retry_ms;
            self.ask_credit(v, o, pending, now);
        }
    }

    /// A hint round: asks every reachable delivery target (a home, or the replica standing in
    /// for a home that left the ring) with hints ready and no open window for credit.
    fn ask_credit(&mut self, v: &View<'_>, o: &mut Outbox<'_>, pending: Option<&Ring>, now: u64) {
        for (home, held) in self.per_target(v, pending) {
            let budget = self.budget().saturating_sub(self.in_flight);
            if budget == 0 {
                break;
            }
            if !v.live.believed_up(home, now) {
                continue;
            }
            let w = self.windows.entry(home).or_default();
            if w.asking.is_some() || w.in_flight > 0 {
                continue;
            }
            let wanted = u32::try_from(held.min(budget)).unwrap_or(u32::MAX);
            let partition = self
                .keys()
                .find(|k| Self::target(v, pending, k) == Some(home))
                .map_or(0, |k| k.partition);
            o.stats.credit_requests += 1;
            let timeout = v.cfg.replica_timeout_ms;
            let id = o.request(now, timeout, home, Pending::Credit { home }, |id| {
                PeerMsg::HintCredit {
                    id,
                    partition,
                    wanted,
                }
            });
            self.windows.entry(home).or_default().asking = Some(id);
        }
    }

    /// The home's answer to credit request `grant` (id, granted), or `None` if it failed or
    /// timed out: starts at most `granted` deliveries.
    pub(super) fn credit_answered(
        &mut self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        pending: Option<&Ring>,
        home: NodeId,
        grant: Option<(u64, u32)>,
    ) {
        let budget = self.budget().saturating_sub(self.in_flight);
        let w = self.windows.entry(home).or_default();
        w.asking = None;
        let Some((id, granted)) = grant else {
            return;
        };
        assert_eq!(w.in_flight, 0, "credit is asked with no window open");
        let n = (granted as usize).min(budget);
        if n == 0 {
            return;
        }
        w.grant = Some((id, granted));
        let ready: Vec<StoreKey> = self
            .held
            .iter()
            .filter(|(k, h)| {
                !h.in_flight && !h.writing && Self::target(v, pending, k) == Some(home)
            })
            .map(|(k, _)| k.clone())
            .take(n)
            .collect();
        let w = self.windows.get_mut(&home).expect("entered above");
        if ready.is_empty() {
            w.grant = None;
            return;
        }
        w.in_flight = ready.len() as u32;
        for hint in ready {
            self.start_delivery(&hint);
            let to_read = Pending::HintRead {
                hint: Box::new(hint.clone()),
                to: home,
            };
            o.store(to_read, hint, StoreOp::Read);
        }
    }

    /// A holder asks for credit: granted from this core's load (`busy`: its requests and key
    /// jobs in flight) and background share.
    pub(super) fn grant_credit(
        &self,
        v: &View<'_>,
        o: &mut Outbox<'_>,
        (from, id): (NodeId, u64),
        wanted: u32,
        busy: usize,
    ) {
        let idle = 1.0 - (busy as f64 / v.cfg.hint_busy_ops.max(1) as f64).min(1.0);
        let cap = wanted.min(v.cfg.hint_credit_max);
        let mut granted = (f64::from(cap) * self.share * idle) as u32;
        if granted == 0 && cap > 0 && busy < v.cfg.hint_busy_ops {
            // Not busy, only throttled: a trickle still drains the hints.
            granted = 1;
        }
        o.stats.credits_granted += u64::from(granted);
        o.answer(from, PeerMsg::HintCreditOk { id, granted });
    }

    /// A delivery of `hint` to `to` ended at `now`: acknowledged durably (`delivered`) or not.
    pub(super) fn delivery_ended(
        &mut self,
        now: u64,
        hint: &StoreKey,
        to: NodeId,
        delivered: bool,
    ) {
        if self.settled(hint, to, delivered) {
            // The home kept up: ask again at the next tick rather than a round later.
            self.next_round = self.next_round.min(now);
        }
    }
}

/// The home node a hint key is held for; `None` for a replica key.
fn home_of(key: &StoreKey) -> Option<NodeId> {
    match key.space {
        Space::Hint(home) => Some(home),
        Space::Primary => None,
    }
}

impl Core {
    /// Takes in the hints found in storage at start.
    pub(super) fn load_hints(&mut self, hints: impl IntoIterator<Item = (StoreKey, u64)>) {
        self.hints.load(hints);
    }

    /// Removes every hint this core holds, undelivered (an operator's `ringkv cluster truncate-hints`,
    /// like Cassandra's `nodetool truncatehints`): each is removed under its key's lock, so a hint
    /// written while the removal is queued goes too, and nothing else is touched. The writes the
    /// hints carried stay on the replicas that acknowledged them; anti-entropy brings them to
    /// the homes. Returns how many hints were queued for removal.
    pub fn truncate_hints(&mut self, now: u64) -> (usize, Vec<Output>) {
        let keys: Vec<StoreKey> = self.hints.keys().cloned().collect();
        let count = keys.len();
        for key in keys {
            self.lock(now, key, JobKind::DropHint { delivered: None });
        }
        (count, self.take_output())
    }

    /// Bytes of the hints held (module docs).
    pub fn hint_bytes(&self) -> u64 {
        self.hints.bytes
    }

    /// The delivery windows with hints in flight or a grant in use.
    pub fn hint_windows(&self) -> impl Iterator<Item = HintWindow> + '_ {
        self.hints.windows.iter().filter_map(|(home, w)| {
            w.grant.map(|(grant_id, granted)| HintWindow {
                home: *home,
                grant_id,
                granted,
                in_flight: w.in_flight,
            })
        })
    }

    /// The background share from admission control ([`crate::admission`]): scales the hint
    /// credit this core grants and its own delivery budget. Clamped to `[0.01, 1]`.
    pub fn set_background_share(&mut self, share: f64) {
        self.hints.share = if share.is_nan() {
            1.0
        } else {
            share.clamp(0.01, 1.0)
        };
    }

    /// The background share in use.
    pub fn background_share(&self) -> f64 {
        self.hints.share
    }

    /// Whether storage operation `id` is background work (hint delivery), which the shell may
    /// run in a lower-priority queue.
    pub fn is_background(&self, id: u64) -> bool {
        match self.pending.get(&id) {
            Some(Pending::HintRead { .. } | Pending::Push { .. }) => true,
            Some(Pending::Job { job }) => self
                .jobs
                .get(job)
                .is_some_and(|j| matches!(j.kind, JobKind::DropHint { .. } | JobKind::Reap { .. })),
            _ => false,
        }
    }

    /// Reserves the size of `object` for hint `key` before it is written, or refuses it.
    pub(super) fn hint_reserve(
        &mut self,
        key: &StoreKey,
        object: &Object,
    ) -> Result<(), ErrorBody> {
        self.hints.reserve(key, object)
    }

    /// The write of `key` ended (done or failed); a hint may be delivered again.
    pub(super) fn hint_write_ended(&mut self, key: &StoreKey) {
        self.hints.write_ended(key);
    }

    /// Hint `key` is no longer stored (delivered, or found missing): its bytes are freed.
    pub(super) fn hint_gone(&mut self, key: &StoreKey) {
        self.hints.gone(key);
    }

    /// Refuses every job of the batch led by `job` (hint writes past the bound).
    pub(super) fn refuse_hint_batch(&mut self, now: u64, job: u64, e: ErrorBody) {
        let j = self.unlock(job);
        let riders = self.take_riders(&j);
        for job in std::iter::once(j).chain(riders) {
            self.stats.hint_overflow += 1;
            match job.kind {
                JobKind::Apply { then, .. } => self.replica_done(now, then, Err(e.clone())),
                JobKind::Coordinate { op } => self.fail_op(op, Message::Error(e.clone())),
                JobKind::DropHint { .. } | JobKind::Reap { .. } => {}
            }
        }
    }

    /// The hint store, with what it reads and writes of the core (`context.rs`) and the
    /// pending ring.
    fn hint_parts(&mut self) -> (&mut HintStore, View<'_>, Outbox<'_>, Option<&Ring>) {
        let (v, o) = lend!(self);
        let pending = self.transfers.pending().map(|(_, r)| r);
        (&mut self.hints, v, o, pending)
    }

    /// A delivery of `hint` to `to` ended: acknowledged durably (`delivered`) or not.
    pub(super) fn hint_settled(&mut self, now: u64, hint: &StoreKey, to: NodeId, delivered: bool) {
        self.hints.delivery_ended(now, hint, to, delivered);
    }

    /// Runs a credit round if one is due.
    pub(super) fn hint_tick(&mut self, now: u64) {
        let (hints, v, mut o, pending) = self.hint_parts();
        hints.tick(&v, &mut o, pending, now);
    }

    /// The answer to a credit request to `home` (`None`: it failed or timed out).
    pub(super) fn credit_answered(&mut self, home: NodeId, grant: Option<(u64, u32)>) {
        let (hints, v, mut o, pending) = self.hint_parts();
        hints.credit_answered(&v, &mut o, pending, home, grant);
    }

    /// A holder asks for credit.
    pub(super) fn grant_credit(&mut self, from: NodeId, id: u64, wanted: u32) {
        let busy = self.ops.len() + self.jobs.len();
        let (hints, v, mut o, _) = self.hint_parts();
        hints.grant_credit(&v, &mut o, (from, id), wanted, busy);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::object::{Lww, Val};

    /// A hint's key is held in buffers of its own: a request's key may be a slice of the whole
    /// buffer its connection read, which the hint, living for hours, would otherwise keep.
    #[test]
    fn a_held_hint_keeps_no_slice_of_the_request_buffer() {
        let read = Bytes::from(vec![b'x'; 64 << 10]);
        let key = StoreKey {
            partition: 1,
            space: Space::Hint(NodeId(3)),
            bucket: read.slice(10..14),
            key: read.slice(20..30),
        };
        let object = Object::Lww(Lww {
            timestamp: 1,
            node: NodeId(1),
            val: Val::Value(Bytes::from_static(b"v")),
        });
        let mut store = HintStore::new(1 << 20, 8);
        store.reserve(&key, &object).expect("room for one hint");
        let (held, _) = store.iter().next().expect("the hint is held");
        assert_eq!(held, &key);
        let within = |b: &Bytes| read.as_ptr_range().contains(&b.as_ptr());
        assert!(!within(&held.bucket) && !within(&held.key));
    }
}
