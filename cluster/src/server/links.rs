//! The peer transport: outbound links to other nodes (connect, HELLO, batched writes, answers
//! back to the core) and requests arriving from them.

use super::driver::Input;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::Duration;

use futures_lite::io::AsyncWriteExt;
use glommio::channels::local_channel::{self, LocalReceiver};
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
    READ_CHUNK_BYTES, Shard, WRITE_BATCH_BYTES_MAX, error_message,
};

/// Set in the request id of every membership request on a peer link; the core's ids stay far
/// below it.
pub(super) const MEMBERSHIP_ID_BIT: u64 = 1 << 62;

/// Whether an answer on a peer link is for membership (not the link's HELLO).
pub(super) fn is_membership_id(request_id: u64) -> bool {
    request_id & MEMBERSHIP_ID_BIT != 0 && request_id != PEER_HELLO_ID
}

impl Shard {
    /// Queues `msg` for node `to`, opening the link on first use.
    pub(super) fn send_to_peer(self: &Rc<Self>, to: NodeId, msg: PeerMsg) {
        let (request_id, message) = peer::to_wire(msg);
        self.send_frame(
            to,
            Frame {
                request_id,
                message,
            },
        );
    }

    /// Queues `frame` for node `to`, opening the link on first use.
    pub(super) fn send_frame(self: &Rc<Self>, to: NodeId, frame: Frame) {
        let mut links = self.links.borrow_mut();
        let queue = match links.entry(to) {
            std::collections::hash_map::Entry::Occupied(queue) => queue.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let Some(addr) = self.peers.borrow().get(&to).copied() else {
                    // Not a member of the view in use: the core times it out.
                    tracing::warn!(shard = self.id, node = %to, "message for an unknown node dropped");
                    return;
                };
                let (tx, rx) = local_channel::new_bounded(PEER_QUEUE_FRAMES_MAX);
                let link = run_link(Rc::downgrade(self), to, addr, rx, self.stop.clone());
                match glommio::spawn_local_into(link, self.foreground) {
                    Ok(task) => {
                        task.detach();
                    }
                    Err(_) => return,
                }
                slot.insert(tx)
            }
        };
        if queue.try_send(frame).is_err() {
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
        let (id, rx) = self.inbound.register();
        let msg = match request.into_peer_msg(id) {
            Ok(m) => m,
            Err(e) => {
                self.inbound.forget(id);
                return Message::Error(e);
            }
        };
        self.drive(Input::Peer { from, msg });
        // The core answers every request by its deadline; this bound only guards the waiter.
        let bound = Duration::from_millis(self.request_timeout_ms.saturating_mul(2));
        match unless(rx.recv(), glommio::timer::sleep(bound)).await {
            Some(Some(answer)) => answer,
            Some(None) => error_message(ErrorCode::ShuttingDown, "the shard stopped"),
            None => {
                self.inbound.forget(id);
                error_message(ErrorCode::Timeout, "no answer from the coordinator")
            }
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
/// writes queued frames in batches, hands answers to the core, and reports failures.
pub(super) async fn run_link(
    shard: Weak<Shard>,
    node: NodeId,
    addr: SocketAddr,
    queue: LocalReceiver<Frame>,
    stop: StopToken,
) {
    let mut backoff_ms = PEER_BACKOFF_MIN_MS;
    loop {
        let Some(Some(first)) = unless(queue.recv(), stop.cancelled()).await else {
            return;
        };
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
                while let Some(Some(_)) = futures_lite::future::poll_once(queue.recv()).await {}
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
                            read_answers(&shard, node, reader, limits),
                            write_requests(writer, first, &queue, limits),
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

/// Reads answers on an outbound peer connection and gives them to the core, until the
/// connection fails or sends something undecodable.
pub(super) async fn read_answers(
    shard: &Weak<Shard>,
    node: NodeId,
    mut reader: futures_lite::io::ReadHalf<TcpStream>,
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
            // Membership's requests share the link; their ids are marked.
            if is_membership_id(frame.request_id) {
                shard.membership_answer(node, frame);
                continue;
            }
            let msg = peer::answer_from_wire(frame.request_id, frame.message);
            shard.drive(Input::Peer { from: node, msg });
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
    limits: Limits,
) {
    let mut out = Vec::new();
    let mut next = Some(first);
    loop {
        let frame = match next.take() {
            Some(frame) => frame,
            None => match queue.recv().await {
                Some(frame) => frame,
                None => return,
            },
        };
        out.clear();
        encode_request(&frame, &limits, &mut out);
        while out.len() < WRITE_BATCH_BYTES_MAX {
            match futures_lite::future::poll_once(queue.recv()).await {
                Some(Some(frame)) => encode_request(&frame, &limits, &mut out),
                Some(None) | None => break,
            }
        }
        if writer.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Appends a request frame to `out`; one that cannot be encoded (an object over the frame
/// limit) is dropped and the core times it out.
pub(super) fn encode_request(frame: &Frame, limits: &Limits, out: &mut Vec<u8>) {
    let start = out.len();
    if let Err(e) = encode_frame(frame, limits, out) {
        out.truncate(start);
        tracing::warn!(kind = %frame.message.kind(), error = %e, "peer request not sent");
    }
}
