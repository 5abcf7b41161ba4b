//! The shell of the node's membership ([`ringkv_core::membership`]), on its first shard.
//!
//! Shard 0 owns the node's one [`Membership`] and carries out what it asks for; every decision
//! (who to gossip with, when a join or commit is accepted, when the ring flips) is made there.
//! This module only moves bytes and time:
//!
//! - **Time and randomness**: a ticker calls `handle_tick` every [`MEMBERSHIP_TICK_MS`] with
//!   the node's clock and a random number from the standard library's per-process random
//!   hasher keys (the gossip partner; it needs no cryptographic quality).
//! - **Operator commands**: an ADMIN frame reaches shard 0 (see `route`), is parsed with
//!   [`AdminCmd::parse`] (a parse error is answered `invalid_request` at once), and waits for
//!   the [`MembershipOutput::AdminReply`] with its request id: ADMIN_OK with the text, or ERROR
//!   with the reason: `invalid_request` when the cluster's state refuses the command,
//!   `timeout` when a node it needed (the claimant, the seed) did not answer, so the command may
//!   or may not have taken effect and may be retried. `cluster status` shows each member's
//!   reachability as this shard's core, the node's failure detector, sees it ([`Reach`]):
//!   membership keeps no liveness view of its own.
//! - **Messages between nodes** travel in CLUSTER frames without a partition. Requests to a
//!   member go on shard 0's peer link to it, beside the core's requests: the link gives each a
//!   wire id of its own and remembers it is membership's, under membership's id, so its answer
//!   (CLUSTER_OK, or ERROR: `handle_failed`) comes back here (`links`, *Correlation*). A request
//!   to an address whose node
//!   is not known yet (a join's seed, [`MembershipOutput::SendAddr`]) goes on a connection of its
//!   own: connect, HELLO, one request, one answer, close, all within `replica_timeout_ms`;
//!   a failure at any step is `handle_failed`. A request from another node arrives on the peer
//!   port (on any shard, forwarded to shard 0), gets a shard-local id like the core's inbound
//!   requests, and its answer (a membership output that `is_answer`) goes back on the same
//!   connection with the request's own id. A CLUSTER frame whose sub-kind membership does not
//!   know goes to the core, which refuses it.
//! - **Views**: every [`MembershipOutput::View`] is published to every shard (`view`).
//! - **Persistence**: every [`MembershipOutput::Persist`] replaces `<data-dir>/cluster-state`
//!   ([`cluster_state`]) off the shard thread. Writes run one at a time and only the latest
//!   state waiting is written, so the file never goes back to an older state; shutdown waits for
//!   the write in progress. A failed write is logged and the node runs on; a restart then finds
//!   the last state written.
//!
//! - **Retiring**: a node that membership says is out of the cluster (removed, and in neither
//!   the ring in force nor the pending one: it left, or an operator removed it, and the ring
//!   moved on) keeps running while its shards hand off the partitions it held and
//!   deliver the hints it holds for others; once every shard has published, under the latest
//!   view, that it holds nothing ([`ShardMetrics::holding`], copied by each shard's ticker), the
//!   node stops as on SIGTERM. A removed node restarted with nothing left stops at once. Until
//!   then `cluster status` on it shows what it still holds.
//!
//! - **Stored bytes**: every [`STORED_REPORT_MS`] the ticker sums what every shard last
//!   published of its partitions' live bytes ([`ShardMetrics::partition_bytes`]) and gives it to
//!   membership (`handle_stored`), which gossips it for `cluster plan` and `status`. Nothing is
//!   given until every shard has published once, so a node just started never claims to store
//!   nothing.
//!
//! Requests membership sent that get no answer (a lost link, a full queue) are timed out by
//! membership itself (`MembershipConfig::request_timeout_ms`, which the node sets to its
//! `replica_timeout_ms`: a live peer answers membership at once).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::hash::BuildHasher;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use futures_lite::io::AsyncWriteExt;
use ringkv_net::{Admin, AdminOk, Cluster, ClusterOk, ErrorCode, Frame, Message};

use crate::cluster_state;
use crate::metrics::{Holding, ShardMetrics};
use ringkv_core::membership::{
    AdminCmd, AdminError, Membership, MembershipMsg, MembershipOutput, Reach, View,
};

use super::driver::run_periodic;
use super::links::{Owner, connect_peer, request_once};
use super::stop::StopToken;
use super::stop::unless;
use super::view::{Control, ShardView};
use super::{Event, ServeError, Shard, Waiters, error_message, shard_stopped};
use ringkv_core::NodeId;

/// Period of the ticker that drives membership (gossip rounds, request timeouts, flips).
pub(super) const MEMBERSHIP_TICK_MS: u64 = 50;
/// Interval between reports of the node's stored bytes to membership: as often as shards
/// refresh the figures.
pub(super) const STORED_REPORT_MS: u64 = crate::metrics::ENGINE_REFRESH_MS;
/// Shard 0's membership and what its shell keeps.
pub(super) struct Driver {
    membership: RefCell<Membership>,
    /// ADMIN requests waiting for their answer, by the id given to `Membership::admin`.
    admin: Rc<Waiters<Result<String, AdminError>>>,
    /// The latest state to persist, if not yet written.
    persist_next: RefCell<Option<Vec<u8>>>,
    /// Whether a write of the state file is running.
    persisting: Cell<bool>,
    /// Membership outputs not carried out yet, and whether they are being carried out.
    queue: RefCell<VecDeque<MembershipOutput>>,
    draining: Cell<bool>,
    data_dir: PathBuf,
    /// This node's peer address: a node without one cannot join a cluster.
    peer_listen: Option<SocketAddr>,
    random: std::collections::hash_map::RandomState,
    rounds: Cell<u64>,
    /// Every shard's published figures: what each still holds for others.
    shards: Arc<[Arc<ShardMetrics>]>,
    /// Stops the node once it is removed and holds nothing; taken when used.
    retire: RefCell<Option<mpsc::Sender<Event>>>,
    /// What the node held when last logged while removed: `(partitions, hints)`.
    logged_holding: Cell<Option<(u64, u64)>>,
    /// When the stored bytes are next given to membership.
    next_stored_ms: Cell<u64>,
}

/// Whether a removed node may stop: every shard has published, under membership's latest view
/// (`version`) or a newer one, that it holds no partition to hand off and no hint.
fn may_retire(version: u64, holdings: &[Holding]) -> bool {
    holdings
        .iter()
        .all(|h| h.view_version >= version && h.handoffs == 0 && h.hints == 0)
}

/// `(partitions to hand off, hints held)` summed over shards.
fn held(holdings: &[Holding]) -> (u64, u64) {
    holdings
        .iter()
        .fold((0, 0), |(p, h), x| (p + x.handoffs, h + x.hints))
}

impl Driver {
    pub(super) fn new(
        membership: Membership,
        data_dir: PathBuf,
        peer_listen: Option<SocketAddr>,
        shards: Arc<[Arc<ShardMetrics>]>,
        retire: mpsc::Sender<Event>,
    ) -> Self {
        Self {
            membership: RefCell::new(membership),
            admin: Rc::new(Waiters::default()),
            persist_next: RefCell::new(None),
            persisting: Cell::new(false),
            queue: RefCell::new(VecDeque::new()),
            draining: Cell::new(false),
            data_dir,
            peer_listen,
            random: std::collections::hash_map::RandomState::new(),
            rounds: Cell::new(0),
            shards,
            retire: RefCell::new(Some(retire)),
            logged_holding: Cell::new(None),
            next_stored_ms: Cell::new(0),
        }
    }

    /// Gives membership the bytes the node stores per partition, summed over shards, at most
    /// every [`STORED_REPORT_MS`] and only once every shard has published its figures.
    fn report_stored(&self, now: u64) {
        if now < self.next_stored_ms.get() {
            return;
        }
        let mut stored: BTreeMap<u32, u64> = BTreeMap::new();
        for shard in self.shards.iter() {
            let Some(bytes) = shard.partition_bytes() else {
                return;
            };
            for (p, b) in bytes {
                let sum = stored.entry(p).or_default();
                *sum = sum.saturating_add(b);
            }
        }
        self.next_stored_ms.set(now + STORED_REPORT_MS);
        self.membership.borrow_mut().handle_stored(now, stored);
    }

    fn holdings(&self) -> Vec<Holding> {
        self.shards.iter().map(|s| s.holding()).collect()
    }

    /// The line `cluster status` adds about this node's own work for others.
    fn holding_line(&self) -> String {
        let (partitions, hints) = held(&self.holdings());
        let mut line =
            format!("this node holds: {partitions} partitions to hand off, {hints} hints");
        if self.membership.borrow().retired() {
            line.push_str("; it was removed and stops once both are 0");
        }
        line
    }

    /// Stops the node if it is removed and holds nothing (module docs); logs what it still
    /// holds when that changes.
    fn maybe_retire(&self) {
        let (retired, version) = {
            let m = self.membership.borrow();
            (m.retired(), m.view_version())
        };
        if !retired {
            return;
        }
        let holdings = self.holdings();
        if !may_retire(version, &holdings) {
            let now = held(&holdings);
            if self.logged_holding.replace(Some(now)) != Some(now) {
                tracing::info!(
                    partitions = now.0,
                    hints = now.1,
                    "removed from the cluster: handing off before stopping"
                );
            }
            return;
        }
        if let Some(retire) = self.retire.borrow_mut().take() {
            tracing::warn!(
                "removed from the cluster and everything handed off: stopping this node"
            );
            // Fails only when the node is already stopping.
            let _ = retire.send(Event::Stop);
        }
    }

    fn random(&self) -> u64 {
        let round = self.rounds.get();
        self.rounds.set(round.wrapping_add(1));
        self.random.hash_one(round)
    }
}

impl Shard {
    fn driver(&self) -> Option<&Driver> {
        self.members.as_ref()
    }

    /// Starts membership on shard 0: its first outputs (the view, the state) and its ticker.
    pub(super) fn start_membership(self: &Rc<Self>, stop: StopToken) {
        let Some(driver) = self.driver() else {
            return;
        };
        let outputs = driver.membership.borrow_mut().start();
        self.membership_outputs(outputs);
        let ticker = run_membership_ticks(Rc::downgrade(self), stop);
        match glommio::spawn_local_into(ticker, self.foreground) {
            Ok(task) => {
                task.detach();
            }
            Err(e) => tracing::error!(error = %e, "cannot start the membership ticker"),
        }
    }

    /// Answers one operator command; runs on shard 0 only.
    pub(super) async fn admin_command(self: &Rc<Self>, admin: Admin) -> Message {
        let Some(driver) = self.driver() else {
            return error_message(ErrorCode::Internal, "membership runs on the first shard");
        };
        let args = match std::str::from_utf8(&admin.args) {
            Ok(args) => args,
            Err(_) => {
                return error_message(ErrorCode::InvalidRequest, "arguments are not UTF-8");
            }
        };
        let cmd = match AdminCmd::parse(&admin.command, args) {
            Ok(cmd) => cmd,
            Err(e) => return error_message(ErrorCode::InvalidRequest, e.to_string()),
        };
        if matches!(cmd, AdminCmd::Join { .. }) && driver.peer_listen.is_none() {
            return error_message(
                ErrorCode::InvalidRequest,
                "this node has no peer listener: restart it with --peer-listen to join a cluster",
            );
        }
        let status = cmd == AdminCmd::Status;
        let ticket = driver.admin.register();
        let req = ticket.id();
        let now = self.clock.now_ms();
        let outputs = {
            // Status shows this shard's core's view of the members: the node's one failure
            // detector (`Reach`).
            let core = self.core.borrow();
            let reach = |node| Reach::of(&core, node, now);
            driver.membership.borrow_mut().admin(now, req, cmd, &reach)
        };
        self.membership_outputs(outputs);
        // Membership answers every command, at the latest when its request to a peer times out.
        match ticket.recv().await {
            Some(Ok(mut text)) => {
                if status {
                    text.push_str(&driver.holding_line());
                    text.push('\n');
                }
                Message::AdminOk(AdminOk {
                    body: bytes::Bytes::from(text.into_bytes()),
                })
            }
            Some(Err(AdminError::Refused(reason))) => {
                error_message(ErrorCode::InvalidRequest, reason)
            }
            Some(Err(AdminError::Unreachable(reason))) => error_message(ErrorCode::Timeout, reason),
            None => shard_stopped(),
        }
    }

    /// A CLUSTER request without a partition from node `from`: membership's answer, or the
    /// request back if it is not membership's (or this is not shard 0).
    pub(super) async fn serve_membership(
        self: &Rc<Self>,
        from: NodeId,
        cluster: Cluster,
    ) -> Result<Message, Cluster> {
        let Some(driver) = self.driver() else {
            return Err(cluster);
        };
        let ticket = self.inbound.register();
        let msg = match MembershipMsg::decode(ticket.id(), cluster.sub, false, &cluster.payload) {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err(cluster),
            Err(e) => {
                return Ok(error_message(
                    ErrorCode::InvalidRequest,
                    format!("CLUSTER sub-kind {}: {e}", cluster.sub),
                ));
            }
        };
        let outputs =
            driver
                .membership
                .borrow_mut()
                .handle_msg(self.clock.now_ms(), Some(from), msg);
        self.membership_outputs(outputs);
        // Membership answers every request at once; the bound only guards the waiter.
        let bound = Duration::from_millis(self.request_timeout_ms);
        Ok(
            match unless(ticket.recv(), glommio::timer::sleep(bound)).await {
                Some(Some(answer)) => answer,
                Some(None) => shard_stopped(),
                None => error_message(ErrorCode::Internal, "membership did not answer"),
            },
        )
    }

    /// `message` answered membership's request `id` on the link to `node`.
    pub(super) fn membership_answer(self: &Rc<Self>, node: NodeId, id: u64, message: Message) {
        let Some(driver) = self.driver() else {
            return;
        };
        let now = self.clock.now_ms();
        let outputs = match message {
            Message::ClusterOk(ok) => match MembershipMsg::decode(id, ok.sub, true, &ok.payload) {
                Ok(Some(msg)) => driver
                    .membership
                    .borrow_mut()
                    .handle_msg(now, Some(node), msg),
                Ok(None) => driver.membership.borrow_mut().handle_failed(
                    now,
                    id,
                    &format!("answer of unknown sub-kind {}", ok.sub),
                ),
                Err(e) => driver
                    .membership
                    .borrow_mut()
                    .handle_failed(now, id, &e.to_string()),
            },
            Message::Error(e) => driver.membership.borrow_mut().handle_failed(
                now,
                id,
                &format!("{}: {}", e.code, e.message),
            ),
            other => driver.membership.borrow_mut().handle_failed(
                now,
                id,
                &format!("answered with {}", other.kind()),
            ),
        };
        self.membership_outputs(outputs);
    }

    /// A partition of the pending ring of `epoch` was received by one of this node's shards.
    pub(super) fn membership_transfer_done(self: &Rc<Self>, epoch: u64, partition: u32) {
        let Some(driver) = self.driver() else {
            return;
        };
        let outputs =
            driver
                .membership
                .borrow_mut()
                .transfer_done(self.clock.now_ms(), epoch, partition);
        self.membership_outputs(outputs);
    }

    /// Carries out what membership asked for. Never called with membership borrowed.
    ///
    /// Carrying out a view can call membership again (a core reports a partition received while
    /// it takes the view); those outputs are queued behind the ones being carried out, never
    /// run in the middle of them, so views and states reach the shards and the file in the order
    /// membership produced them.
    fn membership_outputs(self: &Rc<Self>, outputs: Vec<MembershipOutput>) {
        let Some(driver) = self.driver() else {
            return;
        };
        driver.queue.borrow_mut().extend(outputs);
        if driver.draining.replace(true) {
            return;
        }
        loop {
            let next = driver.queue.borrow_mut().pop_front();
            let Some(output) = next else {
                break;
            };
            self.membership_output(output);
        }
        driver.draining.set(false);
    }

    fn membership_output(self: &Rc<Self>, output: MembershipOutput) {
        {
            match output {
                MembershipOutput::Send { msg, .. } if msg.is_answer() => {
                    let (sub, payload) = msg.encode();
                    let answer = Message::ClusterOk(ClusterOk { sub, payload });
                    self.inbound.answer(msg.id(), answer);
                }
                MembershipOutput::Send { to, msg } => {
                    let (sub, payload) = msg.encode();
                    let message = Message::Cluster(Cluster {
                        sub,
                        partition: None,
                        payload,
                    });
                    self.send_request(to, Owner::Membership(msg.id()), message);
                }
                MembershipOutput::SendAddr { addr, msg } => self.send_once(addr, msg),
                MembershipOutput::AdminReply { req, result } => {
                    if let Some(driver) = self.driver() {
                        driver.admin.answer(req, result);
                    }
                }
                MembershipOutput::View(view) => self.publish_view(&view),
                MembershipOutput::Persist(bytes) => self.persist(bytes),
                MembershipOutput::IdentityTaken(text) => {
                    tracing::error!("{text}");
                    let stop = self.driver().and_then(|d| d.retire.borrow_mut().take());
                    if let Some(stop) = stop {
                        // Fails only when the node is already stopping.
                        let _ = stop.send(Event::Failed(ServeError::Identity(text)));
                    }
                }
            }
        }
    }

    /// Makes `view` every shard's: this one at once, the others over the control mesh.
    fn publish_view(self: &Rc<Self>, view: &View) {
        let view = Arc::new(ShardView::from_view(self.node_id, view));
        self.apply_view(&view);
        let shard = self.clone();
        let spawned = self.store_work.spawn(async move {
            for to in (0..shard.shard_count).filter(|s| *s != shard.id) {
                // Fails only when the node is stopping.
                let _ = shard.control.send_to(to, Control::View(view.clone())).await;
            }
        });
        if let Ok(task) = spawned {
            task.detach();
        }
    }

    /// Queues `bytes` for the state file and starts the writer if it is idle.
    fn persist(self: &Rc<Self>, bytes: Vec<u8>) {
        let Some(driver) = self.driver() else {
            return;
        };
        *driver.persist_next.borrow_mut() = Some(bytes);
        if driver.persisting.get() {
            return;
        }
        driver.persisting.set(true);
        let shard = self.clone();
        let spawned = self.store_work.spawn(async move {
            loop {
                let Some(driver) = shard.driver() else {
                    return;
                };
                let Some(bytes) = driver.persist_next.borrow_mut().take() else {
                    driver.persisting.set(false);
                    return;
                };
                let dir = driver.data_dir.clone();
                let written = glommio::executor()
                    .spawn_blocking(move || cluster_state::write(&dir, &bytes))
                    .await;
                if let Err(e) = written {
                    tracing::error!(error = %e, "cannot persist the cluster state");
                }
            }
        });
        match spawned {
            Ok(task) => {
                task.detach();
            }
            Err(_) => {
                driver.persisting.set(false);
                tracing::warn!("stopping: the latest cluster state was not persisted");
            }
        }
    }

    /// Sends one request to `addr` on a connection of its own (module docs).
    fn send_once(self: &Rc<Self>, addr: String, msg: MembershipMsg) {
        let shard = Rc::downgrade(self);
        let spawned = self.store_work.spawn_into(
            async move {
                let Some((id, bound)) = shard.upgrade().map(|s| (msg.id(), s.replica_timeout_ms))
                else {
                    return;
                };
                let outcome = unless(
                    one_request(&shard, &addr, msg),
                    glommio::timer::sleep(Duration::from_millis(bound)),
                )
                .await
                .unwrap_or_else(|| Err("no answer in time".into()));
                let Some(shard) = shard.upgrade() else {
                    return;
                };
                let Some(driver) = shard.driver() else {
                    return;
                };
                let now = shard.clock.now_ms();
                let outputs = match outcome {
                    Ok(answer) => driver.membership.borrow_mut().handle_msg(now, None, answer),
                    Err(reason) => {
                        tracing::info!(%addr, %reason, "membership request failed");
                        driver.membership.borrow_mut().handle_failed(
                            now,
                            id,
                            &format!("{addr}: {reason}"),
                        )
                    }
                };
                shard.membership_outputs(outputs);
            },
            self.foreground,
        );
        if let Ok(task) = spawned {
            task.detach();
        }
    }
}

/// Connects to `addr`, sends `msg` and returns its decoded answer.
async fn one_request(
    shard: &Weak<Shard>,
    addr: &str,
    msg: MembershipMsg,
) -> Result<MembershipMsg, String> {
    let target = resolve(addr).await?;
    let (hello, limits) = shard
        .upgrade()
        .map(|s| (s.peer_hello(), s.limits))
        .ok_or("the shard stopped")?;
    let mut stream = connect_peer(target, hello, limits).await?;
    let id = msg.id();
    let (sub, payload) = msg.encode();
    // The connection carries this request alone, so membership's own id serves on the wire.
    let frame = Frame {
        request_id: id,
        message: Message::Cluster(Cluster {
            sub,
            partition: None,
            payload,
        }),
    };
    let answer = request_once(&mut stream, &frame, &limits, "closed before answering").await?;
    let _ = stream.close().await;
    match answer.message {
        Message::ClusterOk(ok) => MembershipMsg::decode(id, ok.sub, true, &ok.payload)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("answer of unknown sub-kind {}", ok.sub)),
        Message::Error(e) => Err(format!("{}: {}", e.code, e.message)),
        other => Err(format!("answered with {}", other.kind())),
    }
}

/// `addr` as a socket address; a host name is resolved off the shard thread.
async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let name = addr.to_owned();
    glommio::executor()
        .spawn_blocking(move || {
            name.to_socket_addrs()
                .map_err(|e| format!("cannot resolve {name}: {e}"))?
                .next()
                .ok_or_else(|| format!("{name} resolves to no address"))
        })
        .await
}

/// Drives membership's timers on shard 0.
async fn run_membership_ticks(shard: Weak<Shard>, stop: StopToken) {
    let period = Duration::from_millis(MEMBERSHIP_TICK_MS);
    run_periodic(shard, stop, period, |shard| {
        let Some(driver) = shard.driver() else {
            return false;
        };
        let random = driver.random();
        driver.report_stored(shard.clock.now_ms());
        let outputs = driver
            .membership
            .borrow_mut()
            .handle_tick(shard.clock.now_ms(), random);
        shard.membership_outputs(outputs);
        driver.maybe_retire();
        true
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(view_version: u64, handoffs: u64, hints: u64) -> Holding {
        Holding {
            view_version,
            handoffs,
            hints,
        }
    }

    /// A removed node stops only when every shard, under the latest view, holds nothing.
    #[test]
    fn retires_only_when_every_shard_is_empty_under_the_latest_view() {
        assert!(may_retire(5, &[holding(5, 0, 0), holding(6, 0, 0)]));
        // A shard that has not yet taken the view in which the node was removed may not have
        // found the partitions it must hand off.
        assert!(!may_retire(5, &[holding(5, 0, 0), holding(4, 0, 0)]));
        assert!(!may_retire(5, &[holding(5, 1, 0), holding(5, 0, 0)]));
        assert!(!may_retire(5, &[holding(5, 0, 0), holding(5, 0, 2)]));
        assert_eq!(held(&[holding(5, 1, 2), holding(5, 3, 4)]), (4, 6));
    }
}
