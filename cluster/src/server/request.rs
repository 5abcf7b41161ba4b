//! A shard's request routing: a client request runs on the shard owning its partition (here,
//! or across the request mesh), under its deadline, and is counted.

use super::driver::Input;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::channels::channel_mesh::{Receivers, Senders};
use glommio::sync::{Gate, Semaphore};
use ringkv_net::{Admin, AdminOk, ErrorCode, Message};

use crate::config;
use crate::metrics::Op;
use crate::route::{PARTITIONS, shard_of};
use ringkv_core::coordinator::StoreOp;
use ringkv_core::request::{KeyOp, KeyRequest};

use super::stop::unless;
use super::store::DurableWait;
use super::{
    HINTS_TRUNCATE, HINTS_TRUNCATE_SHARD, MeshWork, Shard, ShardReply, ShardRequest, Ticket,
    Waiters, error_message, shard_stopped,
};
use glommio::Task;

impl Shard {
    /// Executes a request a connection received, as far as it goes without waiting: a GET, PUT
    /// or DELETE here or on the shard owning its partition, counted; an operator command on
    /// shard 0. Returns the answer if it is there at once (a buffered write or a cached read on
    /// this shard usually is), so the connection sends it without a task of its own; otherwise
    /// what is left to wait for, which [`Shard::finish_request`] completes.
    ///
    /// The answer is `timeout` if the work takes longer than the request's `timeout_ms` (or the
    /// node's `request_timeout_ms`). The work itself is never cancelled halfway, since a write
    /// may already be in the engine's group commit: work that can outlive the deadline (an
    /// operator command, a request another shard runs) runs in its own task holding `hold` (the
    /// connection's in-flight slot) until it ends, so it still counts against the connection's
    /// bound; this shard's core answers a request by the same deadline, so `hold` is released
    /// with the answer or the timeout (storage and replica writes the core started may run on,
    /// holding no slot).
    pub(super) async fn execute_at_once<H: 'static>(
        self: &Rc<Self>,
        message: Message,
        hold: H,
    ) -> Result<Message, Unfinished<H>> {
        let request = match KeyRequest::parse(message, PARTITIONS) {
            Ok(request) => request,
            Err(Message::Admin(admin)) => return Err(Unfinished::Admin(admin, hold)),
            Err(other) => {
                return Ok(error_message(
                    ErrorCode::Internal,
                    format!("{} reached the executor", other.kind()),
                ));
            }
        };
        let start = Instant::now();
        let (started, hold) = self.begin(request, hold, start);
        let answered = match &started.wait {
            Wait::Refused(_) | Wait::Answered(_) => true,
            // The core answered at once (or the shard closed the table).
            Wait::Local(ticket) => !self.clients.waits(ticket.id()),
            Wait::Remote(_) => false,
        };
        if answered {
            // `finish` takes an answer that is there without setting a timer.
            return Ok(self.finish(started, start, &mut TakenAt::default()).await);
        }
        Err(Unfinished::Key {
            started,
            hold,
            start,
        })
    }

    /// Waits for what [`Shard::execute_at_once`] left: the answer, or `timeout` at the deadline.
    pub(super) async fn finish_request<H: 'static>(
        self: &Rc<Self>,
        unfinished: Unfinished<H>,
    ) -> Message {
        match unfinished {
            Unfinished::Admin(admin, hold) => {
                let shard = self.clone();
                let work = glommio::spawn_local(async move {
                    let reply = shard.route_admin(admin).await;
                    drop(hold);
                    reply
                });
                self.within_deadline(self.timeout_ms(None), work).await
            }
            Unfinished::Key {
                started,
                hold,
                start,
            } => {
                let reply = self.finish(started, start, &mut TakenAt::default()).await;
                drop(hold);
                reply
            }
        }
    }

    /// Wall-clock Unix milliseconds, as the core sees them (RESP's `TTL` answers by it).
    pub(super) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// A new RESP connection's id (`CLIENT ID`): unique on the node, since the shard's index
    /// is in its low bits.
    pub(super) fn next_resp_client_id(&self) -> u64 {
        let n = self.resp_clients.get() + 1;
        self.resp_clients.set(n);
        n * self.shard_count as u64 + self.id as u64
    }

    /// RESP's `DBSIZE`: an estimate of the keys in buckets with the RESP bucket's `n`
    /// ([`Core::key_estimate`]): this shard's trees as they are, the other shards' as they last
    /// published them (every second).
    ///
    /// [`Core::key_estimate`]: ringkv_core::coordinator::Core::key_estimate
    pub(super) fn resp_key_estimate(&self) -> i64 {
        let others = |n: u8| -> u64 {
            self.all_metrics
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != self.id)
                .map(|(_, m)| m.tree_keys(n))
                .sum()
        };
        let keys = self
            .core
            .borrow()
            .key_estimate(crate::resp::RESP_BUCKET, others);
        i64::try_from(keys).unwrap_or(i64::MAX)
    }

    /// Executes a batch of key requests (a RESP wave's round), taking them all from `requests`,
    /// and puts their answers in `answers` in order (what it held before is dropped), each
    /// answered as a connection's request is ([`Shard::execute_at_once`]). Both lists keep
    /// their room for the next round.
    ///
    /// No request gets a task or a timer of its own: requests for this shard's partitions go to
    /// the core at once, in order (a buffered write or a cached read is usually answered before
    /// the next is handed over); a request for another shard gets the task that carries it over
    /// the mesh. The requests run concurrently, so a batch must not hold two writes of one key
    /// (the tasks of another shard's requests may reach it in either order): a RESP wave's
    /// commands are on distinct keys, and a command writes each of its keys once. Answers are
    /// collected in order; a timer is set only for an answer not there when its turn comes, and
    /// covers what is left of that request's deadline. Each request is counted from the batch's
    /// start until its answer is taken: replies go out in order, so that is what the client
    /// waits. The core's work is never cancelled: the core answers by the same deadline (its
    /// storage and replica writes may run on), and an answer past it is dropped.
    pub(super) async fn execute_keys(
        self: &Rc<Self>,
        requests: &mut Vec<KeyRequest>,
        answers: &mut Vec<Message>,
    ) {
        let start = Instant::now();
        self.prefetch(requests);
        answers.clear();
        answers.reserve(requests.len());
        // An answer there when its request started goes straight to its place, and is counted
        // with the others there before the next request that waits: all were taken when that
        // one's turn came. Only requests that wait are kept as started: moving every started
        // request (some 190 bytes) into a list and out again was a visible share of a pipelined
        // request's CPU (docs/BENCHMARKS.md, "Results: a round's requests written once").
        let mut ready = Tally::default();
        let mut waiting = Vec::new();
        for request in requests.drain(..) {
            let Started {
                op,
                timeout_ms,
                wait,
            } = self.begin(request, (), start).0;
            match wait {
                // Refused before any work: not counted, as nothing was executed.
                Wait::Refused(refused) => answers.push(refused),
                Wait::Answered(answer) => {
                    ready.add(op, succeeded(&answer));
                    answers.push(answer);
                }
                wait => {
                    let started = Started {
                        op,
                        timeout_ms,
                        wait,
                    };
                    waiting.push((answers.len(), started, std::mem::take(&mut ready)));
                    // Its place, until the answer comes.
                    answers.push(Message::Pong);
                }
            }
        }
        let mut taken = TakenAt::default();
        for (at, started, before) in waiting {
            self.count_tally(&before, start, &mut taken);
            answers[at] = self.finish(started, start, &mut taken).await;
        }
        self.count_tally(&ready, start, &mut taken);
    }

    /// Counts the requests of `tally`, answered by `taken` (one reading of the clock for all).
    fn count_tally(&self, tally: &Tally, start: Instant, taken: &mut TakenAt) {
        if tally.is_empty() {
            return;
        }
        let elapsed = taken.now().saturating_duration_since(start);
        for (op, ok, n) in tally.counts() {
            self.count_n(op, elapsed, ok, u64::from(n));
        }
    }

    /// Asks the CPU to load what the gets and puts of a batch served here look up first, all
    /// before the first is served, so that their cache misses overlap: the engine's slots and
    /// cached values for both, the core's anti-entropy slots for the puts (a get does not look
    /// there). A batch of one request gains too: the misses in those three tables overlap,
    /// where the request alone would take them one after another (about 5% less CPU for a
    /// client that does not pipeline; docs/BENCHMARKS.md).
    fn prefetch(&self, requests: &[KeyRequest]) {
        let here = |ops: &'static [KeyOp]| {
            requests.iter().filter(move |r| {
                ops.contains(&r.op()) && shard_of(r.partition(), self.shard_count) == self.id
            })
        };
        self.core.borrow().prefetch(
            here(&[KeyOp::Put]).map(|r| (r.partition().0, &r.key().0[..], r.key_hash())),
            ringkv_engine::prefetch::range,
        );
        self.engine
            .prefetch(here(&[KeyOp::Get, KeyOp::Put]).map(|r| {
                let (bucket, key) = r.key();
                crate::replica::engine_location_primary(r.partition().0, bucket, key)
            }));
    }

    /// Starts a key request: refused at once, handed to this shard's core, or sent to the
    /// owning shard by a task that keeps `hold` (the connection's slot) until that shard
    /// answers, since its work runs on past a deadline. `hold` comes back when no task took it;
    /// the caller keeps it until the answer (the core ends its work by the same deadline).
    ///
    /// `at` is when the request (or its batch) arrived: the core's time for it, so a batch reads
    /// the clock once.
    fn begin<H: 'static>(
        self: &Rc<Self>,
        mut request: KeyRequest,
        hold: H,
        at: Instant,
    ) -> (Started, Option<H>) {
        let op = metric_op(&request);
        let timeout_ms = self.timeout_ms(request.timeout_ms());
        let (wait, hold) = if let Some(refused) = self.refuse(&request) {
            (Wait::Refused(refused), Some(hold))
        } else {
            let owner = shard_of(request.partition(), self.shard_count);
            if owner == self.id {
                let wait = match self.serve_here(&mut request, at) {
                    Some(Served::Now(answer)) => Wait::Answered(answer),
                    Some(Served::Later(ticket)) => Wait::Local(ticket),
                    None => Wait::Local(self.start_local(request, at)),
                };
                (wait, Some(hold))
            } else {
                let shard = self.clone();
                let task = glommio::spawn_local(async move {
                    let reply = shard.forward(owner, MeshWork::Key(request)).await;
                    drop(hold);
                    reply
                });
                (Wait::Remote(task), None)
            }
        };
        let started = Started {
            op,
            timeout_ms,
            wait,
        };
        (started, hold)
    }

    /// Waits for a started request's answer until its deadline (counted from `start`) and
    /// counts it until `taken`; a timer is set only if the answer is not there yet.
    async fn finish(&self, started: Started, start: Instant, taken: &mut TakenAt) -> Message {
        let Started {
            op,
            timeout_ms,
            wait,
        } = started;
        let mut waited = false;
        let left = || {
            waited = true;
            Duration::from_millis(timeout_ms).saturating_sub(start.elapsed())
        };
        let reply = match wait {
            // Refused before any work: not counted, as nothing was executed.
            Wait::Refused(refused) => return refused,
            Wait::Answered(answer) => answer,
            // A ticket dropped unanswered forgets its id: a late answer is dropped.
            Wait::Local(ticket) => match by_deadline(ticket.recv(), left).await {
                Some(answer) => answer.unwrap_or_else(shard_stopped),
                None => timed_out(timeout_ms),
            },
            Wait::Remote(mut task) => match by_deadline(&mut task, left).await {
                Some(reply) => reply,
                None => {
                    task.detach();
                    timed_out(timeout_ms)
                }
            },
        };
        if waited {
            taken.waited();
        }
        self.count(op, taken.now().saturating_duration_since(start), &reply);
        reply
    }

    /// The answer for a request refused before any work: a value above the node's limit.
    fn refuse(&self, request: &KeyRequest) -> Option<Message> {
        (request.value_len() > self.value_bytes_max).then(|| {
            error_message(
                ErrorCode::TooLarge,
                format!(
                    "value of {} bytes above the node's limit of {}",
                    request.value_len(),
                    self.value_bytes_max
                ),
            )
        })
    }

    /// A request's deadline in milliseconds: its own `timeout_ms`, or the node's
    /// `request_timeout_ms`, within the node's bounds.
    fn timeout_ms(&self, requested_ms: Option<u32>) -> u64 {
        requested_ms
            .map_or(self.request_timeout_ms, u64::from)
            .clamp(1, config::REQUEST_TIMEOUT_MS_MAX)
    }

    /// Counts an answered request of `op` started at `start`: its latency feeds admission
    /// control and the request metrics.
    fn count(&self, op: Op, elapsed: Duration, reply: &Message) {
        self.count_n(op, elapsed, succeeded(reply), 1);
    }

    /// Counts `n` requests of `op`, each answered after `elapsed`, all succeeded or all not.
    fn count_n(&self, op: Op, elapsed: Duration, ok: bool, n: u64) {
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.admission.borrow_mut().record_n(elapsed_us, n);
        self.metrics.record_n(op, elapsed_us, ok, n);
    }

    /// Waits for `work` (a task holding the connection's slot until it ends) and answers
    /// `timeout` once `timeout_ms` has passed without its answer; the work then runs on,
    /// detached.
    async fn within_deadline(&self, timeout_ms: u64, mut work: Task<Message>) -> Message {
        let finished = unless(
            &mut work,
            glommio::timer::sleep(Duration::from_millis(timeout_ms)),
        )
        .await;
        match finished {
            Some(reply) => reply,
            None => {
                work.detach();
                timed_out(timeout_ms)
            }
        }
    }

    /// `hints-truncate`: every shard of this node drops the hints it holds.
    pub(super) async fn truncate_hints_everywhere(self: &Rc<Self>) -> Message {
        let mut total = 0u64;
        for shard in 0..self.shard_count {
            let answer = if shard == self.id {
                self.truncate_hints_here()
            } else {
                let ask = Admin {
                    command: HINTS_TRUNCATE_SHARD.into(),
                    args: Bytes::new(),
                };
                self.forward(shard, MeshWork::Admin(ask)).await
            };
            match answer {
                Message::AdminOk(ok) => {
                    total += std::str::from_utf8(&ok.body)
                        .ok()
                        .and_then(|t| t.parse::<u64>().ok())
                        .unwrap_or(0);
                }
                other => return other,
            }
        }
        Message::AdminOk(AdminOk {
            body: Bytes::from(format!(
                "removing {total} hints; the writes they carried stay on the replicas that \
                 acknowledged them, and anti-entropy repairs their homes\n"
            )),
        })
    }

    /// This shard's part of `hints-truncate`: the count of hints queued for removal.
    pub(super) fn truncate_hints_here(self: &Rc<Self>) -> Message {
        let count = self.core.borrow().hint_count();
        self.drive(Input::TruncateHints);
        tracing::warn!(
            shard = self.id,
            hints = count,
            "hints truncated by an operator"
        );
        Message::AdminOk(AdminOk {
            body: Bytes::from(count.to_string()),
        })
    }

    /// Operator commands are answered by the first shard, which owns cluster-wide state.
    async fn route_admin(self: &Rc<Self>, admin: Admin) -> Message {
        if admin.command == HINTS_TRUNCATE {
            self.truncate_hints_everywhere().await
        } else if self.id == 0 {
            self.admin_command(admin).await
        } else {
            self.forward(0, MeshWork::Admin(admin)).await
        }
    }

    /// Has shard `owner` run `work` and waits for its answer.
    pub(super) async fn forward(&self, owner: usize, work: MeshWork) -> Message {
        let ticket = self.waiting.register();
        let request = ShardRequest {
            tag: ticket.id(),
            origin: self.id,
            work,
        };
        if self.requests.send_to(owner, request).await.is_err() {
            return error_message(
                ErrorCode::ShuttingDown,
                format!("shard {owner} is stopping"),
            );
        }
        match ticket.recv().await {
            Some(reply) => reply,
            None => error_message(
                ErrorCode::Internal,
                format!("shard {owner} dropped a reply"),
            ),
        }
    }

    /// Executes a client request for a partition this shard owns: its core coordinates it.
    pub(super) async fn execute_local(self: &Rc<Self>, mut request: KeyRequest) -> Message {
        let at = Instant::now();
        match self.serve_here(&mut request, at) {
            Some(Served::Now(answer)) => return answer,
            Some(Served::Later(ticket)) => {
                // The core answers a request it coordinates by its deadline; a synced write
                // served here is answered by its flush, so the deadline is kept here. The
                // sending shard holds a slot until this answer.
                let timeout_ms = self.timeout_ms(request.timeout_ms());
                let left = || Duration::from_millis(timeout_ms).saturating_sub(at.elapsed());
                return match by_deadline(ticket.recv(), left).await {
                    Some(answer) => answer.unwrap_or_else(shard_stopped),
                    None => timed_out(timeout_ms),
                };
            }
            None => {}
        }
        let ticket = self.start_local(request, at);
        ticket.recv().await.unwrap_or_else(shard_stopped)
    }

    /// The answer to a GET or PUT this shard's core lets it serve from its own store alone
    /// ([`Core::local_read`], [`Core::local_write`]), served at once; `None` if the request is
    /// not such a GET or PUT, or its storage operation would wait for the store to take it or
    /// failed (the core then coordinates it, and carries the operation out again). A synced
    /// write's answer waits for its group commit. A PUT served here leaves `request` without
    /// its key and value (they moved into the write); one not served has them back.
    ///
    /// [`Core::local_read`]: ringkv_core::coordinator::Core::local_read
    /// [`Core::local_write`]: ringkv_core::coordinator::Core::local_write
    fn serve_here(&self, request: &mut KeyRequest, at: Instant) -> Option<Served> {
        let op = request.op();
        if !matches!(op, KeyOp::Get | KeyOp::Put) {
            return None;
        }
        // The core's time never goes back, as in `feed`.
        let now = self.clock.ms_at(at).max(self.fed_at.get());
        self.fed_at.set(now);
        if op == KeyOp::Get {
            let key = self.core.borrow_mut().local_read(now, request)?;
            let stored = self.store_now(&key, &StoreOp::Read)?.ok()?;
            let answer = self.core.borrow_mut().local_read_reply(now, stored);
            return Some(Served::Now(answer));
        }
        let write = self.core.borrow_mut().local_write(now, request)?;
        if matches!(write.op, StoreOp::Write { durable: true, .. }) {
            // The flush's watcher answers it (`store.rs`); once the shard stops it may be gone.
            let epoch = if self.stop.is_cancelled() {
                None
            } else {
                self.durable_write_now(&write.key, &write.op)
            };
            let Some(Ok(epoch)) = epoch else {
                write.give_back(request);
                return None;
            };
            let answer = self.core.borrow_mut().local_write_done(now, write);
            let ticket = self.clients.register();
            let wait = DurableWait::Client {
                ticket: ticket.id(),
                answer,
            };
            self.await_durable(epoch, wait);
            return Some(Served::Later(ticket));
        }
        if !matches!(self.store_now(&write.key, &write.op), Some(Ok(_))) {
            write.give_back(request);
            return None;
        }
        Some(Served::Now(
            self.core.borrow_mut().local_write_done(now, write),
        ))
    }

    /// Hands a client request for a partition this shard owns to its core; the answer is
    /// taken with the returned ticket.
    fn start_local(self: &Rc<Self>, request: KeyRequest, at: Instant) -> Ticket {
        debug_assert_eq!(request.partition().0 as usize % self.shard_count, self.id);
        let ticket = self.clients.register();
        let input = Input::Client {
            req: ticket.id(),
            request,
        };
        self.drive_at(self.clock.ms_at(at), input);
        ticket
    }
}

/// What a connection's request still waits for ([`Shard::execute_at_once`]).
pub(super) enum Unfinished<H> {
    /// An operator command, with the connection's slot.
    Admin(Admin, H),
    /// A key request under way, the connection's slot unless a task took it, and when it
    /// started.
    Key {
        started: Started,
        hold: Option<H>,
        start: Instant,
    },
}

/// A key request under way ([`Shard::begin`]): what it is counted as, its deadline, and where
/// its answer comes from.
pub(super) struct Started {
    op: Op,
    timeout_ms: u64,
    wait: Wait,
}

/// What a request served by this shard's own store answers ([`Shard::serve_here`]).
enum Served {
    /// This, now.
    Now(Message),
    /// What this ticket gets: a synced write's answer, once its flush is durable.
    Later(Ticket),
}

/// Where a started request's answer comes from.
enum Wait {
    /// Refused before any work.
    Refused(Message),
    /// Answered when it started: a GET or PUT served by this shard's own store
    /// ([`Shard::serve_here`]).
    Answered(Message),
    /// This shard's core, under a client request's ticket.
    Local(Ticket),
    /// The task that asked the owning shard.
    Remote(Task<Message>),
}

/// The metric a key request is counted under: a map's field update and an operation on a
/// convergent type are writes like a PUT, and counted as one.
fn metric_op(request: &KeyRequest) -> Op {
    match request.op() {
        KeyOp::Get => Op::Get,
        KeyOp::Put | KeyOp::Update | KeyOp::Apply => Op::Put,
        KeyOp::Delete => Op::Delete,
    }
}

/// Whether `answer` counts as a success: anything but an error.
fn succeeded(answer: &Message) -> bool {
    !matches!(answer, Message::Error(_))
}

/// The answer to a request whose deadline passed.
fn timed_out(timeout_ms: u64) -> Message {
    error_message(
        ErrorCode::Timeout,
        format!("no answer within {timeout_ms} ms; a write may still be applied"),
    )
}

/// `work`'s output if it is ready now or within the time `left` gives; no timer is set (and the
/// clock is not read) for work already done.
async fn by_deadline<F: std::future::Future>(
    work: F,
    left: impl FnOnce() -> Duration,
) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    if let Some(done) = futures_lite::future::poll_once(work.as_mut()).await {
        return Some(done);
    }
    let left = left();
    if left.is_zero() {
        return None;
    }
    unless(work, glommio::timer::sleep(left)).await
}

/// When answers are taken, for counting them: answers taken one after another without waiting
/// (a batch's cached reads and buffered writes) share one reading of the clock, which costs as
/// much as a small request's storage operation; an answer that was waited for takes a new one.
#[derive(Default)]
struct TakenAt(Option<Instant>);

/// Answered requests counted together: how many of each operation succeeded and failed.
#[derive(Default)]
struct Tally([[u32; 2]; 3]);

impl Tally {
    fn add(&mut self, op: Op, ok: bool) {
        self.0[op as usize][usize::from(ok)] += 1;
    }

    fn is_empty(&self) -> bool {
        self.0.iter().flatten().all(|&n| n == 0)
    }

    /// Each operation and outcome with its count, those counted only.
    fn counts(&self) -> impl Iterator<Item = (Op, bool, u32)> + '_ {
        [Op::Get, Op::Put, Op::Delete]
            .into_iter()
            .flat_map(move |op| {
                [false, true].map(|ok| (op, ok, self.0[op as usize][usize::from(ok)]))
            })
            .filter(|&(_, _, n)| n > 0)
    }
}

impl TakenAt {
    fn now(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }

    /// Time passed: the next answer reads the clock again.
    fn waited(&mut self) {
        self.0 = None;
    }
}

/// Hands each reply from another shard to the task waiting for it.
pub(super) fn spawn_reply_loops(waiting: &Rc<Waiters>, mut replies: Receivers<ShardReply>) {
    for (_, rx) in replies.streams() {
        let waiting = waiting.clone();
        glommio::spawn_local(async move {
            while let Some(reply) = rx.recv().await {
                // The waiter may have gone (its connection died); nothing to do then.
                waiting.answer(reply.tag, reply.message);
            }
        })
        .detach();
    }
}

/// Requests from other shards, executed here and answered on the reply mesh, at most
/// `peer_inflight_max` at once.
pub(super) struct MeshService {
    loops: Vec<Option<Task<()>>>,
    work: Gate,
    replies: Rc<Senders<ShardReply>>,
}

impl MeshService {
    pub(super) fn start(
        shard: &Rc<Shard>,
        mut requests: Receivers<ShardRequest>,
        replies: Senders<ShardReply>,
        inflight_max: usize,
    ) -> MeshService {
        let replies = Rc::new(replies);
        let slots = Rc::new(Semaphore::new(inflight_max as u64));
        let work = Gate::new();
        let mut loops = Vec::new();
        for (_, rx) in requests.streams() {
            let (shard, replies, slots, work) =
                (shard.clone(), replies.clone(), slots.clone(), work.clone());
            let queue = shard.foreground;
            loops.push(
                glommio::spawn_local_into(
                    async move {
                        while let Some(req) = rx.recv().await {
                            let Ok(permit) = slots.acquire_static_permit(1).await else {
                                break;
                            };
                            let (shard, replies) = (shard.clone(), replies.clone());
                            let spawned = work.spawn(async move {
                                let (tag, origin) = (req.tag, req.origin);
                                let message = shard.serve_mesh_request(req).await;
                                // Fails only if the origin shard is gone; then nobody waits.
                                let _ = replies.send_to(origin, ShardReply { tag, message }).await;
                                drop(permit);
                            });
                            if let Ok(task) = spawned {
                                task.detach();
                            }
                        }
                    },
                    queue,
                )
                .ok(),
            );
        }
        MeshService {
            loops,
            work,
            replies,
        }
    }

    /// Waits until every other shard closed its side of the request mesh and every request it
    /// sent was answered, then closes this shard's replies.
    pub(super) async fn finish(self) {
        for task in self.loops.into_iter().flatten() {
            task.await;
        }
        let _ = self.work.close().await;
        self.replies.close();
    }
}

impl Shard {
    /// Runs a request another shard of this node sent over the mesh.
    async fn serve_mesh_request(self: &Rc<Self>, req: ShardRequest) -> Message {
        match req.work {
            MeshWork::Key(request) => self.execute_local(request).await,
            MeshWork::Peer { from, request } => self.serve_peer(from, request).await,
            MeshWork::Admin(admin) if admin.command == HINTS_TRUNCATE_SHARD => {
                self.truncate_hints_here()
            }
            MeshWork::Admin(admin) => self.admin_command(admin).await,
        }
    }
}
