//! The peer transport: outbound links to other nodes (connect, HELLO, batched writes, answers
//! back to whoever sent the request) and requests arriving from them.
//!
//! # Correlation on an outbound link
//!
//! A shard keeps one outbound link per peer node and sends on it the requests of its core and,
//! on shard 0, those of membership. Each has its own ids, which may collide, so neither goes on
//! the wire: the link hands out the wire id of every request it queues from its own table
//! ([`Pending`]) and keeps there who the request is for ([`Owner`]): the core or membership, with
//! the owner's id. The peer echoes the wire id, and the link's reader takes the owner from the
//! table and hands the answer over under the owner's id. The cost on the hot path is one insert
//! and one removal in the link's hash table per request.
//!
//! An entry lives until its answer arrives or its request can no longer be answered:
//!
//! - a request that is not queued (the queue is full) or that cannot be encoded is forgotten
//!   at once (one for a node without an address, or whose link cannot be started, never gets
//!   an entry);
//! - a peer answers on the connection that carried the request, so when a connection ends (or
//!   cannot be opened) every request taken from the queue for it is forgotten. Wire ids are
//!   handed out in queue order, so these are exactly the ids up to the last one taken; requests
//!   still queued keep theirs and go on the next connection;
//! - a link that is closed (its member was removed or moved, or the shard stops) drops its
//!   table with it.
//!
//! So what a link keeps is bounded by what its live connection carried and the peer has not
//! answered yet: a live peer answers every request within its own deadline (see
//! `serve_peer`), and a peer that stops reading fills the socket buffers and then the queue
//! ([`PEER_QUEUE_FRAMES_MAX`]), past which requests are not queued. Limit: a peer that keeps
//! reading but never answers keeps its entries until the connection ends; there is no count
//! bound, as one low enough to matter could refuse requests a busy live peer has in flight
//! (a core coordinates up to `ops_max` keys at once). The owners time out their
//! own requests as before; an answer that comes after its owner gave up still reaches it (the
//! core counts any arrival for its failure detector) and is ignored there.
//!
//! Requests arriving from peers carry the sender's ids and are answered with the same id; they
//! need no table here. A join's request to a seed goes on a connection of its own
//! ([`request_once`]), which carries nothing else.

use super::driver::Input;
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::Duration;

use futures_lite::io::AsyncWriteExt;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;
use ringkv_net::{
    ErrorCode, Frame, Hello, Limits, Message, PROTOCOL_VERSION, Role, decode_frame, encode_frame,
};

use ringkv_core::coordinator::PeerMsg;
use ringkv_core::ring::PartitionId;

use crate::peer::{self, PeerRequest};
use crate::route::shard_of;
use ringkv_core::NodeId;

use super::stop::StopToken;

use super::frames::ReadBuffer;
use super::stop::unless;
use super::{
    MeshWork, PEER_BACKOFF_MAX_MS, PEER_BACKOFF_MIN_MS, PEER_HELLO_ID, PEER_QUEUE_FRAMES_MAX,
    Pending, READ_CHUNK_BYTES, Shard, WRITE_BATCH_BYTES_MAX, error_message, shard_stopped,
};

/// Who sent a request on a peer link, and under which of its own ids: where its answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Owner {
    /// The shard's core, with the core's message id.
    Core(u64),
    /// The node's membership (shard 0), with membership's request id.
    Membership(u64),
}

/// The requests of one outbound link that may still be answered, by wire id (module docs).
/// Shared by the shard, which queues requests, and the link's task, which writes them and
/// reads the answers.
#[derive(Default)]
pub(super) struct Sent {
    owners: Pending<Owner>,
    /// The highest wire id taken from the queue so far: to be written on the current
    /// connection, or dropped with a failed one.
    taken: Cell<u64>,
}

impl Sent {
    /// The writer took the request with wire id `id` from the queue.
    fn took(&self, id: u64) {
        // The queue holds requests in the order their ids were handed out.
        assert!(id > self.taken.get(), "request {id} taken out of order");
        self.taken.set(id);
    }

    /// A connection ended, or could not be opened: no request taken for it will be answered.
    fn forget_taken(&self) {
        let taken = self.taken.get();
        self.owners.retain(|id| id > taken);
    }
}

/// A shard's outbound link to one peer node: its queue and the owners of its requests.
pub(super) struct Link {
    queue: LocalSender<Frame>,
    sent: Rc<Sent>,
}

impl Shard {
    /// Queues the core's request `msg` for node `to`, opening the link on first use.
    pub(super) fn send_to_peer(self: &Rc<Self>, to: NodeId, msg: PeerMsg) {
        let (id, message) = peer::to_wire(msg);
        self.send_request(to, Owner::Core(id), message);
    }

    /// Queues a request of `owner` for node `to`, opening the link on first use; its answer
    /// goes back to `owner` (module docs).
    pub(super) fn send_request(self: &Rc<Self>, to: NodeId, owner: Owner, message: Message) {
        let mut links = self.links.borrow_mut();
        let link = match links.entry(to) {
            std::collections::hash_map::Entry::Occupied(link) => link.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let Some(addr) = self.peers.borrow().get(&to).copied() else {
                    // Not a member of the view in use: its owner times it out.
                    tracing::warn!(shard = self.id, node = %to, "message for an unknown node dropped");
                    return;
                };
                let (tx, rx) = local_channel::new_bounded(PEER_QUEUE_FRAMES_MAX);
                let sent = Rc::new(Sent::default());
                let link = run_link(
                    Rc::downgrade(self),
                    to,
                    addr,
                    rx,
                    sent.clone(),
                    self.stop.clone(),
                );
                match glommio::spawn_local_into(link, self.foreground) {
                    Ok(task) => {
                        task.detach();
                    }
                    Err(_) => return,
                }
                slot.insert(Link { queue: tx, sent })
            }
        };
        let request_id = link.sent.owners.insert(owner);
        let frame = Frame {
            request_id,
            message,
        };
        if link.queue.try_send(frame).is_err() {
            // Never sent, so never answered: its owner times it out.
            link.sent.owners.take(request_id);
            tracing::debug!(shard = self.id, node = %to, "peer queue full; message dropped");
        }
    }

    /// HELLO for an outbound peer connection.
    pub(super) fn peer_hello(&self) -> Frame {
        Frame {
            request_id: PEER_HELLO_ID,
            message: Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::Peer,
                cluster_name: self.cluster_name.clone(),
                node_name: Some(peer::hello_name(self.node_id, &self.node_name)),
            }),
        }
    }

    /// A request from node `from` received by this shard: parsed once, then run here or on the
    /// shard that owns its partition.
    pub(super) async fn route_peer(self: &Rc<Self>, from: NodeId, message: Message) -> Message {
        // A FORWARD_PUT is answered FORWARD_PUT_OK where a PUT would be answered PUT_OK.
        let forward_put = matches!(message, Message::ForwardPut(_));
        let answer = self.route_peer_request(from, message).await;
        match answer {
            Message::PutOk(ok) if forward_put => Message::ForwardPutOk(ok),
            other => other,
        }
    }

    async fn route_peer_request(self: &Rc<Self>, from: NodeId, message: Message) -> Message {
        let request = match PeerRequest::parse(message) {
            Ok(r) => r,
            Err(e) => return Message::Error(e),
        };
        // Node-wide cluster messages (gossip) belong to the first shard, which owns membership.
        let owner = request
            .partition()
            .map_or(0, |p| shard_of(PartitionId(p), self.shard_count));
        if owner == self.id {
            self.serve_peer(from, request).await
        } else {
            self.forward(owner, MeshWork::Peer { from, request }).await
        }
    }

    /// Runs a request from node `from` through this shard's core and returns its answer.
    pub(super) async fn serve_peer(self: &Rc<Self>, from: NodeId, request: PeerRequest) -> Message {
        // Node-wide CLUSTER messages of membership go to it (on shard 0), the rest to the core.
        let request = match request {
            PeerRequest::Wire {
                partition: None,
                message: Message::Cluster(c),
            } => match self.serve_membership(from, c).await {
                Ok(answer) => return answer,
                Err(c) => PeerRequest::Wire {
                    partition: None,
                    message: Message::Cluster(c),
                },
            },
            other => other,
        };
        let ticket = self.inbound.register();
        let msg = match request.into_peer_msg(ticket.id()) {
            Ok(m) => m,
            Err(e) => return Message::Error(e),
        };
        self.drive(Input::Peer { from, msg });
        // The core answers every request by its deadline; this bound only guards the waiter.
        let bound = Duration::from_millis(self.request_timeout_ms.saturating_mul(2));
        match unless(ticket.recv(), glommio::timer::sleep(bound)).await {
            Some(Some(answer)) => answer,
            Some(None) => shard_stopped(),
            None => error_message(ErrorCode::Timeout, "no answer from the coordinator"),
        }
    }
}

/// Tells the core of the shard behind `shard` that `node` cannot be reached.
pub(super) fn peer_unreachable(shard: &Weak<Shard>, node: NodeId) {
    if let Some(shard) = shard.upgrade() {
        shard.drive(Input::Unreachable { node });
    }
}

/// The outbound link of one shard to one peer node: connects when there is something to send,
/// writes queued frames in batches, hands answers to their owners, and reports failures.
pub(super) async fn run_link(
    shard: Weak<Shard>,
    node: NodeId,
    addr: SocketAddr,
    queue: LocalReceiver<Frame>,
    sent: Rc<Sent>,
    stop: StopToken,
) {
    let mut backoff_ms = PEER_BACKOFF_MIN_MS;
    loop {
        let Some(Some(first)) = unless(queue.recv(), stop.cancelled()).await else {
            return;
        };
        sent.took(first.request_id);
        // A connect is bounded like a replica request: a slower peer is as good as down.
        let Some((hello, limits, connect_ms)) = shard
            .upgrade()
            .map(|s| (s.peer_hello(), s.limits, s.replica_timeout_ms))
        else {
            return;
        };
        let connected = unless(
            connect_peer(addr, hello, limits),
            glommio::timer::sleep(Duration::from_millis(connect_ms)),
        )
        .await;
        let stream = match connected {
            Some(Ok(stream)) => Some(stream),
            Some(Err(e)) => {
                tracing::debug!(node = %node, %addr, error = %e, "cannot connect to peer");
                None
            }
            None => {
                tracing::debug!(node = %node, %addr, "peer connect timed out");
                None
            }
        };
        match stream {
            None => {
                drop(first);
                peer_unreachable(&shard, node);
                // What was queued meanwhile failed with the connection; drop it.
                while let Some(Some(frame)) = futures_lite::future::poll_once(queue.recv()).await {
                    sent.took(frame.request_id);
                }
                sent.forget_taken();
                let waited = unless(
                    glommio::timer::sleep(Duration::from_millis(backoff_ms)),
                    stop.cancelled(),
                )
                .await;
                if waited.is_none() {
                    return;
                }
                backoff_ms = (backoff_ms * 2).min(PEER_BACKOFF_MAX_MS);
            }
            Some(stream) => {
                tracing::info!(node = %node, %addr, "peer link up");
                backoff_ms = PEER_BACKOFF_MIN_MS;
                let (reader, writer) = futures_lite::io::split(stream);
                let stopped = futures_lite::future::or(
                    async {
                        futures_lite::future::or(
                            read_answers(&shard, node, reader, &sent, limits),
                            write_requests(writer, first, &queue, &sent, limits),
                        )
                        .await;
                        false
                    },
                    async {
                        stop.cancelled().await;
                        true
                    },
                )
                .await;
                if stopped {
                    return;
                }
                tracing::info!(node = %node, %addr, "peer link lost");
                sent.forget_taken();
                peer_unreachable(&shard, node);
            }
        }
    }
}

/// Opens a peer connection and completes the handshake.
pub(super) async fn connect_peer(
    addr: SocketAddr,
    hello: Frame,
    limits: Limits,
) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let answer = request_once(&mut stream, &hello, &limits, "closed during the handshake").await?;
    match answer.message {
        Message::HelloOk(_) => Ok(stream),
        Message::Error(e) => Err(format!("refused: {}: {}", e.code, e.message)),
        other => Err(format!("answered HELLO with {}", other.kind())),
    }
}

/// Bytes read at a time while waiting for a single answer (a handshake, a membership request).
const ONE_ANSWER_READ_BYTES: usize = 4096;

/// Writes `frame` on `stream` and reads the one frame that answers it; `closed` says what it
/// means when the stream ends first. Nothing else was sent, so nothing else can be buffered
/// behind the answer.
pub(super) async fn request_once(
    stream: &mut TcpStream,
    frame: &Frame,
    limits: &Limits,
    closed: &str,
) -> Result<Frame, String> {
    let mut out = Vec::new();
    encode_frame(frame, limits, &mut out).map_err(|e| e.to_string())?;
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut frames = ReadBuffer::new(ONE_ANSWER_READ_BYTES);
    loop {
        let decoded = frames.decode(|bytes| decode_frame(bytes, limits));
        if let Some(answer) = decoded.map_err(|e| e.to_string())? {
            return Ok(answer);
        }
        if frames.fill(stream).await.map_err(|e| e.to_string())? == 0 {
            return Err(closed.into());
        }
    }
}

/// Reads answers on an outbound peer connection and gives each to the owner of its request,
/// until the connection fails or sends something undecodable.
pub(super) async fn read_answers(
    shard: &Weak<Shard>,
    node: NodeId,
    mut reader: futures_lite::io::ReadHalf<TcpStream>,
    sent: &Sent,
    limits: Limits,
) {
    let mut frames = ReadBuffer::new(READ_CHUNK_BYTES);
    loop {
        loop {
            let frame = match frames.decode(|bytes| decode_frame(bytes, &limits)) {
                Ok(None) => break,
                Ok(Some(frame)) => frame,
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "undecodable frame from peer");
                    return;
                }
            };
            let Some(shard) = shard.upgrade() else {
                return;
            };
            match sent.owners.take(frame.request_id) {
                Some(Owner::Core(id)) => {
                    let msg = peer::answer_from_wire(id, frame.message);
                    shard.drive(Input::Peer { from: node, msg });
                }
                Some(Owner::Membership(id)) => shard.membership_answer(node, id, frame.message),
                // Nothing on this connection asked for it (a peer answering twice).
                None => tracing::debug!(
                    node = %node,
                    request_id = frame.request_id,
                    "answer to no request dropped"
                ),
            }
        }
        match frames.fill(&mut reader).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Writes queued requests on an outbound peer connection, batched like replies.
pub(super) async fn write_requests(
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    first: Frame,
    queue: &LocalReceiver<Frame>,
    sent: &Sent,
    limits: Limits,
) {
    let mut out = Vec::new();
    let mut next = Some(first);
    loop {
        let frame = match next.take() {
            // Counted as taken by the caller.
            Some(frame) => frame,
            None => match queue.recv().await {
                Some(frame) => {
                    sent.took(frame.request_id);
                    frame
                }
                None => return,
            },
        };
        out.clear();
        encode_request(&frame, &limits, sent, &mut out);
        while out.len() < WRITE_BATCH_BYTES_MAX {
            match futures_lite::future::poll_once(queue.recv()).await {
                Some(Some(frame)) => {
                    sent.took(frame.request_id);
                    encode_request(&frame, &limits, sent, &mut out);
                }
                Some(None) | None => break,
            }
        }
        if writer.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Appends a request frame to `out`; one that cannot be encoded (an object over the frame
/// limit) is dropped and forgotten, and its owner times it out.
fn encode_request(frame: &Frame, limits: &Limits, sent: &Sent, out: &mut Vec<u8>) {
    let start = out.len();
    if let Err(e) = encode_frame(frame, limits, out) {
        out.truncate(start);
        sent.owners.take(frame.request_id);
        tracing::warn!(kind = %frame.message.kind(), error = %e, "peer request not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The core and membership may use the same id at once: on the link each request gets a
    /// wire id of its own, and each answer goes back to its owner under the owner's id.
    #[test]
    fn equal_owner_ids_get_distinct_wire_ids() {
        let sent = Sent::default();
        let core = sent.owners.insert(Owner::Core(5));
        let membership = sent.owners.insert(Owner::Membership(5));
        assert_ne!(core, membership);
        assert_eq!(sent.owners.take(membership), Some(Owner::Membership(5)));
        assert_eq!(sent.owners.take(core), Some(Owner::Core(5)));
        // A second answer with the same wire id finds nothing.
        assert_eq!(sent.owners.take(core), None);
        assert_eq!(sent.owners.len(), 0);
    }

    /// When a connection ends, the requests taken from the queue for it are forgotten (their
    /// answers could only come on it), and the ones still queued keep their entries for the
    /// next connection.
    #[test]
    fn a_lost_connection_forgets_what_it_took_and_keeps_what_is_queued() {
        let sent = Sent::default();
        let written = sent.owners.insert(Owner::Core(1));
        let answered = sent.owners.insert(Owner::Membership(1));
        let taken = sent.owners.insert(Owner::Core(2));
        let queued = sent.owners.insert(Owner::Core(3));
        sent.took(written);
        sent.took(answered);
        assert_eq!(sent.owners.take(answered), Some(Owner::Membership(1)));
        sent.took(taken);
        sent.forget_taken();
        assert_eq!(sent.owners.len(), 1);
        assert_eq!(sent.owners.take(queued), Some(Owner::Core(3)));
        // Forgetting again (a connect that failed at once) forgets nothing newer.
        let next = sent.owners.insert(Owner::Core(4));
        sent.forget_taken();
        assert_eq!(sent.owners.take(next), Some(Owner::Core(4)));
    }

    /// The queue hands requests out in the order their ids were given; anything else is a
    /// bug that would make `forget_taken` drop queued requests.
    #[test]
    #[should_panic(expected = "taken out of order")]
    fn requests_are_taken_in_id_order() {
        let sent = Sent::default();
        let first = sent.owners.insert(Owner::Core(1));
        let second = sent.owners.insert(Owner::Core(2));
        sent.took(second);
        sent.took(first);
    }
}
