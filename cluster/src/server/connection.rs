//! Client and RESP connections: a reader that decodes requests with the shared frame buffer,
//! runs them through the shard, and a writer that sends replies in batches; the accept loop that
//! starts them.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::io::AsyncWriteExt;
use glommio::channels::local_channel::{self};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{Gate, Semaphore};
use ringkv_core::request::KeyRequest;
use ringkv_net::resp::{
    RespLimits, RespParsed, RespValue, encode_reply as encode_resp, parse_command,
};
use ringkv_net::{ErrorCode, Frame, Limits, Message, Role, decode_frame, encode_frame};
use xxhash_rust::xxh3::xxh3_64;

use crate::metrics::ShardMetrics;
use crate::resp::{self, RespPlan};
use crate::session::{Session, Step};

use super::admin::serve_admin;
use super::frames::ReadBuffer;
use super::readiness::{Readiness, SocketReader};
use super::stop::StopToken;
use super::stop::unless;
use super::{ACCEPT_RETRY_DELAY_MS, READ_CHUNK_BYTES, Shard, WRITE_BATCH_BYTES_MAX, error_message};

/// Serves one connection of `role` (a client, or another node on the peer port) until it closes,
/// fails a frame, or the node shuts down.
pub(super) async fn serve_connection(
    shard: Rc<Shard>,
    stream: TcpStream,
    readiness: Rc<Readiness>,
    shutdown: StopToken,
    abort: StopToken,
    role: Role,
) {
    // Small replies must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let Some(reader) = register(&readiness, &stream, shard.id) else {
        return;
    };
    shard.metrics.connection_opened();
    let _counted = scopeguard(&shard.metrics);
    // The read half is kept so that the socket stays open while `reader` reads it, even if the
    // writer ends first: a closed descriptor's number can be reused by the next accept.
    let (_read_half, writer) = futures_lite::io::split(stream);
    let (replies, outbox) = local_channel::new_bounded::<Frame>(shard.inflight_per_connection_max);
    // Shared by the reader and every request task; the channel closes when the last one is gone.
    let replies = Rc::new(replies);
    let limits = shard.limits;
    let writer = glommio::spawn_local(write_replies(writer, outbox, limits, abort));
    let slots = Rc::new(Semaphore::new(shard.inflight_per_connection_max as u64));
    let shard_index = u16::try_from(shard.id).expect("serve bounds the shard count");
    let mut session = match role {
        Role::Client => Session::new(shard.info.clone(), shard_index),
        Role::Peer => Session::for_peers(shard.info.clone(), shard_index),
    };
    let mut frames = ReadBuffer::new(READ_CHUNK_BYTES);
    'read: loop {
        // Decode every complete frame buffered so far.
        loop {
            let frame = match frames.decode(|bytes| decode_frame(bytes, &limits)) {
                Ok(None) => break,
                Ok(Some(frame)) => frame,
                Err(e) => {
                    let _ = replies.send(e.error_frame()).await;
                    match e.skip_len() {
                        Some(len) => {
                            frames.skip(len);
                            continue;
                        }
                        None => break 'read,
                    }
                }
            };
            match session.on_frame(frame) {
                Step::Reply(reply) => {
                    if replies.send(reply).await.is_err() {
                        break 'read;
                    }
                }
                Step::ReplyAndClose(reply) => {
                    let _ = replies.send(reply).await;
                    break 'read;
                }
                Step::Execute(request) => {
                    let Ok(permit) = slots.acquire_static_permit(1).await else {
                        break 'read;
                    };
                    let request_id = request.request_id;
                    // A peer's request always gets a task; a client's only if it is not
                    // answered at once (most buffered writes and cached reads are).
                    let work = match session.peer() {
                        Some(from) => Ok((from, request.message, permit)),
                        None => match shard.execute_at_once(request.message, permit).await {
                            Ok(message) => {
                                let reply = Frame {
                                    request_id,
                                    message,
                                };
                                if replies.send(reply).await.is_err() {
                                    break 'read;
                                }
                                continue;
                            }
                            Err(unfinished) => Err(unfinished),
                        },
                    };
                    let (shard, replies) = (shard.clone(), replies.clone());
                    glommio::spawn_local(async move {
                        let message = match work {
                            Ok((from, message, permit)) => {
                                let reply = shard.route_peer(from, message).await;
                                drop(permit);
                                reply
                            }
                            Err(unfinished) => shard.finish_request(unfinished).await,
                        };
                        let reply = Frame {
                            request_id,
                            message,
                        };
                        let _ = replies.send(reply).await;
                    })
                    .detach();
                }
            }
        }
        let read = unless(frames.fill_from(&reader), shutdown.cancelled()).await;
        match read {
            None | Some(Ok(0)) | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    // In-flight requests keep clones of the sender; the writer ends after their replies.
    drop(replies);
    writer.await;
}

/// Serves one RESP2 connection: pipelined commands run in waves of distinct keys ([`RespWave`]),
/// so each key sees its commands in order, and replies go out in command order, as Redis clients
/// expect; replies to pipelined commands are written together.
pub(super) async fn serve_resp(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    readiness: Rc<Readiness>,
    shutdown: StopToken,
    abort: StopToken,
) {
    let _ = stream.set_nodelay(true);
    let Some(reader) = register(&readiness, &stream, shard.id) else {
        return;
    };
    shard.metrics.connection_opened();
    let _counted = scopeguard(&shard.metrics);
    let limits = RespLimits::DEFAULT;
    let mut state = resp::RespState::new(shard.next_resp_client_id());
    let mut commands = ReadBuffer::new(READ_CHUNK_BYTES);
    let mut out = Vec::new();
    // One wave for the connection's life: each pass runs it empty, and it keeps the room its
    // lists and key set grew to, so a pipelining client's waves allocate none of it again.
    let mut wave = RespWave::default();
    'read: loop {
        let mut close = false;
        loop {
            let parse = |bytes: &[u8]| parse_command(bytes, &limits);
            let cmd = match commands.decode_shared(parse, RespParsed::with_bytes) {
                Ok(None) => break,
                Ok(Some(cmd)) => cmd,
                Err(e) => {
                    // The stream can no longer be framed: answer as Redis does and close.
                    wave.push_ready(e.reply());
                    close = true;
                    break;
                }
            };
            // Redis ignores empty commands.
            if cmd.is_empty() {
                continue;
            }
            let plan = resp::plan(cmd, &mut state);
            if !wave.admits(&plan) {
                wave.run(&shard, &mut out).await;
            }
            match plan {
                RespPlan::Reply(v) => wave.push_ready(v),
                RespPlan::ReplyAndClose(v) => {
                    wave.push_ready(v);
                    close = true;
                    break;
                }
                RespPlan::Run(script) => wave.push_script(script),
                RespPlan::DbSize => wave.push_ready(RespValue::Integer(shard.resp_key_estimate())),
            }
            // Bounds the reply buffer when a client pipelines reads of large values.
            if out.len() >= WRITE_BATCH_BYTES_MAX {
                if !write_or_abort(&mut stream, &out, &abort).await {
                    break 'read;
                }
                out.clear();
            }
        }
        wave.run(&shard, &mut out).await;
        if !out.is_empty() {
            yield_before_write().await;
            if !write_or_abort(&mut stream, &out, &abort).await {
                break;
            }
            out.clear();
        }
        if close {
            break;
        }
        let read = unless(commands.fill_from(&reader), shutdown.cancelled()).await;
        match read {
            None | Some(Ok(0)) | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    // The socket leaves the epoll set when it closes; only then may its token go to another
    // connection, or an edge of this one (its peer's FIN, say) could mark the next reader's.
    let _ = stream.close().await;
    drop(reader);
}

/// Adds an accepted socket to the shard's readiness set; a socket the kernel will not add (out
/// of memory, or past `max_user_watches`) is logged and closed, as a failed accept would be.
fn register(readiness: &Rc<Readiness>, stream: &TcpStream, shard: usize) -> Option<SocketReader> {
    match readiness.register(stream) {
        Ok(reader) => Some(reader),
        Err(e) => {
            tracing::warn!(shard, error = %e, "connection not served: epoll registration failed");
            None
        }
    }
}

/// Most pipelined RESP commands executed at once on one connection.
const RESP_WAVE_COMMANDS_MAX: usize = 128;

/// Most key hashes whose room a connection's wave keeps from one wave to the next.
const WAVE_KEYS_KEPT: usize = 1024;

/// Most requests (and answers) whose room a connection's wave keeps from one round to the next.
const WAVE_BATCH_KEPT: usize = 1024;

/// Pipelined RESP commands that run together: Redis clients expect each connection's commands
/// to take effect in order, so a wave holds commands on distinct keys only (a command touching
/// a key already in the wave starts the next wave), runs them concurrently (so synced writes on
/// one connection share group commits) and encodes the replies in command order.
#[derive(Default)]
struct RespWave {
    commands: Vec<WaveCommand>,
    /// Hashes of the keys of the wave's commands (all in the RESP bucket), once a second
    /// command asks to join: a wave of one command (a client that does not pipeline) never
    /// builds them. Hashes, not keys: no key is copied per command, and two keys that share a
    /// hash only end a wave early, which keeps the order all the same. A set, not a list: an
    /// MGET or MSET may carry tens of thousands of keys.
    keys: rustc_hash::FxHashSet<u64>,
    keyed: bool,
    /// The places in `commands` of the scripts waiting for a round, and how many requests
    /// each made for it; then the same for the round after. Kept from wave to wave (a wave
    /// holds at most [`RESP_WAVE_COMMANDS_MAX`] commands).
    running: Vec<(usize, usize)>,
    next: Vec<(usize, usize)>,
    /// A round's requests, which the scripts push, and their answers, in the same order. Their
    /// room is kept from round to round and wave to wave (up to [`WAVE_BATCH_KEPT`] each), so
    /// a round allocates for neither; the answers themselves go when the wave's rounds end.
    batch: Vec<KeyRequest>,
    answers: Vec<Message>,
}

/// A command of a wave: a script runs where it lies in the wave's `commands` and is replaced
/// there by its reply.
enum WaveCommand {
    Ready(RespValue),
    Run(resp::Script),
}

impl RespWave {
    /// Whether `plan` may join the wave without overtaking a command on the same key.
    fn admits(&mut self, plan: &RespPlan) -> bool {
        if self.commands.len() >= RESP_WAVE_COMMANDS_MAX {
            return false;
        }
        match plan {
            // Alone in the wave: nothing to overtake, and no key set to build.
            RespPlan::Run(_) if self.commands.is_empty() => true,
            RespPlan::Run(script) => {
                if !self.keyed {
                    for command in &self.commands {
                        if let WaveCommand::Run(script) = command {
                            self.keys.extend(script.keys().map(|k| xxh3_64(k)));
                        }
                    }
                    self.keyed = true;
                }
                script.keys().all(|k| !self.keys.contains(&xxh3_64(k)))
            }
            RespPlan::Reply(_) | RespPlan::ReplyAndClose(_) | RespPlan::DbSize => true,
        }
    }

    fn push_ready(&mut self, v: RespValue) {
        self.commands.push(WaveCommand::Ready(v));
    }

    fn push_script(&mut self, script: resp::Script) {
        if self.keyed {
            self.keys.extend(script.keys().map(|k| xxh3_64(k)));
        }
        self.commands.push(WaveCommand::Run(script));
    }

    /// Runs the wave's commands and appends their replies to `out` in command order.
    ///
    /// A command alone runs in the connection's task. Several advance together a round at a
    /// time: every script's next requests go to [`Shard::execute_keys`] as one batch, so a
    /// round of a pipeline costs no task or timer per command, and synced writes share group
    /// commits. The wave's keys are distinct and a command writes each of its keys once, as a
    /// batch requires.
    ///
    /// Not to be cancelled: the wave is dropped with the future, as the commands of an
    /// interrupted run are left half run.
    async fn run(&mut self, shard: &Rc<Shard>, out: &mut Vec<u8>) {
        if self.keys.capacity() > WAVE_KEYS_KEPT {
            // Not the room an MGET of thousands of keys made, kept for the connection's life.
            self.keys = rustc_hash::FxHashSet::default();
        } else {
            self.keys.clear();
        }
        self.keyed = false;
        if self.commands.len() == 1 {
            if let Some(command) = self.commands.pop() {
                let reply = match command {
                    WaveCommand::Ready(v) => v,
                    WaveCommand::Run(script) => {
                        run_script(shard, script, &mut self.batch, &mut self.answers).await
                    }
                };
                encode_resp(&reply, out);
            }
            self.end_rounds();
            return;
        }
        // Sized once for the usual wave of one request per command (an MGET or MSET grows it).
        self.batch.reserve(self.commands.len());
        self.running.clear();
        for (place, command) in self.commands.iter_mut().enumerate() {
            if let WaveCommand::Run(script) = command {
                match script.start(&mut self.batch) {
                    resp::Step::Done(reply) => *command = WaveCommand::Ready(reply),
                    resp::Step::Run(count) => self.running.push((place, count)),
                }
            }
        }
        while !self.running.is_empty() {
            shard.execute_keys(&mut self.batch, &mut self.answers).await;
            let now = shard.now_ms();
            self.next.clear();
            let mut at = 0;
            for &(place, count) in &self.running {
                let command = &mut self.commands[place];
                let WaveCommand::Run(script) = command else {
                    unreachable!("a command waiting for a round is a script")
                };
                match script.resume(&mut self.answers[at..at + count], now, &mut self.batch) {
                    resp::Step::Done(reply) => *command = WaveCommand::Ready(reply),
                    resp::Step::Run(count) => self.next.push((place, count)),
                }
                at += count;
            }
            std::mem::swap(&mut self.running, &mut self.next);
        }
        self.end_rounds();
        for command in self.commands.drain(..) {
            let WaveCommand::Ready(reply) = command else {
                unreachable!("every command of a wave ends with a reply before the wave does")
            };
            encode_resp(&reply, out);
        }
    }

    /// Drops the last round's answers, whose values an idle connection would otherwise keep,
    /// and the room of a batch larger than [`WAVE_BATCH_KEPT`] (an MSET's requests and
    /// answers).
    fn end_rounds(&mut self) {
        debug_assert!(
            self.batch.is_empty(),
            "a finished round took all its requests"
        );
        self.answers.clear();
        if self.batch.capacity() > WAVE_BATCH_KEPT || self.answers.capacity() > WAVE_BATCH_KEPT {
            self.batch = Vec::new();
            self.answers = Vec::new();
        }
    }
}

/// Runs a script to its reply, a round of requests at a time ([`Shard::execute_keys`]), with
/// `batch` and `answers` for each round's requests and their answers.
async fn run_script(
    shard: &Rc<Shard>,
    mut script: resp::Script,
    batch: &mut Vec<KeyRequest>,
    answers: &mut Vec<Message>,
) -> RespValue {
    let mut step = script.start(batch);
    loop {
        match step {
            resp::Step::Done(reply) => return reply,
            resp::Step::Run(_) => {
                shard.execute_keys(batch, answers).await;
                step = script.resume(answers, shard.now_ms(), batch);
            }
        }
    }
}

/// Counts a connection as closed when dropped, however its task ends.
struct ConnectionCount<'a>(&'a ShardMetrics);

impl Drop for ConnectionCount<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

fn scopeguard(metrics: &ShardMetrics) -> ConnectionCount<'_> {
    ConnectionCount(metrics)
}

/// Lets the other connections that are ready run before this one writes its replies, so that
/// the replies of one pass go out back to back: a client asleep in `epoll_wait` is woken by the
/// first and finds the rest when it runs, where replies spread over the pass would wake it
/// (an inter-processor interrupt each) once per connection.
async fn yield_before_write() {
    futures_lite::future::yield_now().await;
}

/// Writes `bytes`, unless the connection fails or shutdown's drain runs out first.
pub(super) async fn write_or_abort(
    stream: &mut TcpStream,
    bytes: &[u8],
    abort: &StopToken,
) -> bool {
    futures_lite::future::or(async { stream.write_all(bytes).await.is_ok() }, async {
        abort.cancelled().await;
        false
    })
    .await
}

/// Writes replies in the order they complete, then closes the write side.
///
/// Replies already queued when the writer wakes are encoded into one buffer (up to
/// [`WRITE_BATCH_BYTES_MAX`]) and sent with one write, so a pipelining client costs one syscall per
/// batch rather than per reply.
pub(super) async fn write_replies(
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    outbox: local_channel::LocalReceiver<Frame>,
    limits: Limits,
    abort: StopToken,
) {
    let mut out = Vec::new();
    while let Some(frame) = outbox.recv().await {
        out.clear();
        encode_reply(&frame, &limits, &mut out);
        while out.len() < WRITE_BATCH_BYTES_MAX {
            // Take what is already queued without waiting for more.
            match futures_lite::future::poll_once(outbox.recv()).await {
                Some(Some(frame)) => encode_reply(&frame, &limits, &mut out),
                Some(None) | None => break,
            }
        }
        let written =
            futures_lite::future::or(async { writer.write_all(&out).await.is_ok() }, async {
                abort.cancelled().await;
                false
            })
            .await;
        if !written {
            // The peer is gone or the drain ran out; dropping the queue fails the request tasks'
            // sends, so nothing waits on this connection any more.
            return;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.close().await;
}

/// Appends `frame` to `out`, or an error frame saying why it could not be sent.
pub(super) fn encode_reply(frame: &Frame, limits: &Limits, out: &mut Vec<u8>) {
    let start = out.len();
    if let Err(e) = encode_frame(frame, limits, out) {
        // A reply over the frame limit (a value stored under larger limits): say so instead.
        out.truncate(start);
        let fallback = Frame {
            request_id: frame.request_id,
            message: error_message(ErrorCode::TooLarge, format!("reply not sent: {e}")),
        };
        // An error body is bounded far below any frame limit the codec accepts.
        if encode_frame(&fallback, limits, out).is_err() {
            out.truncate(start);
        }
    }
}

/// Runs a connection as a task of `gate` (so shutdown can wait for its last replies) in `queue`;
/// the accept loop goes on at once.
pub(super) fn spawn_connection(
    gate: &Gate,
    conn: impl Future<Output = ()> + 'static,
    queue: glommio::TaskQueueHandle,
) -> std::future::Ready<()> {
    if let Ok(task) = gate.spawn_into(conn, queue) {
        task.detach();
    }
    std::future::ready(())
}

/// Accepts connections on `listener` and hands each to `accepted` until `stop` is cancelled. A
/// failed accept (e.g. out of file descriptors) is logged and retried after a pause, so the loop
/// never spins.
pub(super) async fn accept_until<F: Future<Output = ()>>(
    listener: &TcpListener,
    what: &str,
    shard: usize,
    stop: &StopToken,
    mut accepted: impl FnMut(TcpStream) -> F,
) {
    loop {
        match unless(listener.accept(), stop.cancelled()).await {
            None => break,
            Some(Ok(stream)) => accepted(stream).await,
            Some(Err(e)) => {
                tracing::warn!(shard, listener = what, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(ACCEPT_RETRY_DELAY_MS)).await;
            }
        }
    }
}

/// The listeners a shard accepts on; the admin listener only on shard 0.
pub(super) struct Listeners {
    pub(super) client: TcpListener,
    pub(super) resp: Option<TcpListener>,
    pub(super) peer: Option<TcpListener>,
    pub(super) admin: Option<TcpListener>,
    /// Where accepted client, RESP and peer sockets wait for data.
    pub(super) readiness: Rc<Readiness>,
}

/// Accepts connections on every listener until `shutdown`, then waits (at most `drain_ms`) for
/// the connections' last replies to be written; writers still stuck after that are aborted.
pub(super) async fn serve_listeners(
    shard: &Rc<Shard>,
    listeners: Listeners,
    shutdown: &StopToken,
    all_metrics: &Arc<[Arc<ShardMetrics>]>,
    drain_ms: u64,
) {
    let (id, foreground) = (shard.id, shard.foreground);
    let readiness = listeners.readiness;
    // Runs until the last connection is gone, below.
    let poll_stop = StopToken::new();
    let poller = glommio::spawn_local_into(readiness.clone().run(poll_stop.clone()), foreground);
    let connections = Gate::new();
    // Cancelled when the drain after shutdown takes too long: stuck writers give up.
    let abort = StopToken::new();
    if let Some(resp_listener) = listeners.resp {
        let (shard, shutdown, abort, gate, readiness) = (
            shard.clone(),
            shutdown.clone(),
            abort.clone(),
            connections.clone(),
            readiness.clone(),
        );
        let resp_loop = async move {
            accept_until(&resp_listener, "RESP", shard.id, &shutdown, |stream| {
                let conn = serve_resp(
                    shard.clone(),
                    stream,
                    readiness.clone(),
                    shutdown.clone(),
                    abort.clone(),
                );
                spawn_connection(&gate, conn, foreground)
            })
            .await;
        };
        if let Ok(task) = connections.spawn_into(resp_loop, foreground) {
            task.detach();
        }
    }
    if let Some(peer_listener) = listeners.peer {
        let (shard, shutdown, abort, gate, readiness) = (
            shard.clone(),
            shutdown.clone(),
            abort.clone(),
            connections.clone(),
            readiness.clone(),
        );
        let peer_loop = async move {
            accept_until(&peer_listener, "peer", shard.id, &shutdown, |stream| {
                let conn = serve_connection(
                    shard.clone(),
                    stream,
                    readiness.clone(),
                    shutdown.clone(),
                    abort.clone(),
                    Role::Peer,
                );
                spawn_connection(&gate, conn, foreground)
            })
            .await;
        };
        if let Ok(task) = connections.spawn_into(peer_loop, foreground) {
            task.detach();
        }
    }
    if let Some(admin_listener) = listeners.admin {
        let (shutdown, all) = (shutdown.clone(), all_metrics.clone());
        let admin_loop = async move {
            // One request at a time: scrapes are rare and answering one is cheap, so an admin
            // client can never pile up tasks on the shard.
            accept_until(&admin_listener, "admin", id, &shutdown, |stream| {
                serve_admin(stream, &all, &shutdown)
            })
            .await;
        };
        if let Ok(task) = connections.spawn(admin_loop) {
            task.detach();
        }
    }
    accept_until(&listeners.client, "client", id, shutdown, |stream| {
        let conn = serve_connection(
            shard.clone(),
            stream,
            readiness.clone(),
            shutdown.clone(),
            abort.clone(),
            Role::Client,
        );
        spawn_connection(&connections, conn, foreground)
    })
    .await;
    drop(listeners.client);
    // Every connection has stopped reading; wait (bounded) for their last replies to be written.
    let drained = unless(
        connections.close(),
        glommio::timer::sleep(Duration::from_millis(drain_ms)),
    )
    .await
    .is_some();
    if !drained {
        tracing::warn!(
            shard = id,
            drain_ms,
            "connections still writing at the end of the drain; dropping them"
        );
        abort.cancel();
        // Closing again waits for the close already begun; aborted writers end promptly.
        let _ = connections.close().await;
    }
    poll_stop.cancel();
    if let Ok(poller) = poller {
        poller.await;
    }
}
