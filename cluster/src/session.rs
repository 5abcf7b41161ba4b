//! One connection's protocol state (sans-IO): handshake, then requests, for clients on the client
//! port and for other nodes on the peer port.
//!
//! The shell decodes frames and hands each to [`Session::on_frame`], which answers with a
//! [`Step`]: reply now, execute a data request against a shard, or reply and close. Only the
//! shell touches sockets, engines and channels; this module decides what the protocol allows, per
//! `docs/PROTOCOL.md` §3: HELLO first (role client, a protocol version we speak, our cluster
//! name), a second HELLO or a reply kind sent as a request is `invalid_request` and the
//! connection stays open, anything before HELLO is `handshake_required` and closes it.
//!
//! A session accepts one role ([`Session::new`] clients, [`Session::for_peers`] peers); the other
//! is refused (`invalid_request`, closed), so a client can never send replica requests. A peer
//! names itself `<id>@<name>` in HELLO ([`crate::peer::parse_hello_name`]) and may then send
//! REPLICA_PUT, REPLICA_GET, CLUSTER and forwarded GET/PUT/DELETE; the shell executes them for
//! [`Session::peer`]. ADMIN (operator commands) is a client request only.

use ringkv_net::{ErrorBody, ErrorCode, Frame, HelloOk, Message, PROTOCOL_VERSION, Role};

use crate::peer::parse_hello_name;
use ringkv_core::NodeId;

/// What the shell must do with one decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this reply; the connection stays open.
    Reply(Frame),
    /// Send this reply, then close the connection.
    ReplyAndClose(Frame),
    /// Execute this request (GET, PUT or DELETE; on a client session also ADMIN, which the
    /// node's first shard answers; on a peer session also REPLICA_PUT, REPLICA_GET and CLUSTER)
    /// on the shard owning it and reply with the result.
    Execute(Frame),
}

/// Facts about the node a session needs to answer HELLO.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The cluster name clients must name in HELLO.
    pub cluster_name: String,
    /// This node's name, sent in HELLO_OK.
    pub node_name: String,
    /// Number of shards of the node.
    pub shard_count: u16,
}

/// The protocol state of one connection.
#[derive(Debug)]
pub struct Session {
    info: NodeInfo,
    shard: u16,
    greeted: bool,
    role: Role,
    peer: Option<NodeId>,
}

fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Frame {
    Frame {
        request_id,
        message: Message::Error(ErrorBody::new(code, message)),
    }
}

impl Session {
    /// A client session on a connection accepted by `shard`.
    pub fn new(info: NodeInfo, shard: u16) -> Self {
        assert!(shard < info.shard_count);
        Self {
            info,
            shard,
            greeted: false,
            role: Role::Client,
            peer: None,
        }
    }

    /// A session on the peer port: only other nodes may connect.
    pub fn for_peers(info: NodeInfo, shard: u16) -> Self {
        Self {
            role: Role::Peer,
            ..Self::new(info, shard)
        }
    }

    /// The node on the other end of a greeted peer session.
    pub fn peer(&self) -> Option<NodeId> {
        self.peer
    }

    /// Whether HELLO has been answered with HELLO_OK.
    pub fn greeted(&self) -> bool {
        self.greeted
    }

    /// Decides what to do with `frame`.
    pub fn on_frame(&mut self, frame: Frame) -> Step {
        let id = frame.request_id;
        if !self.greeted {
            let Message::Hello(hello) = frame.message else {
                return Step::ReplyAndClose(error(
                    id,
                    ErrorCode::HandshakeRequired,
                    "send HELLO before any request",
                ));
            };
            if hello.protocol_version == 0 {
                return Step::ReplyAndClose(error(
                    id,
                    ErrorCode::UnsupportedVersion,
                    "protocol version 0 is not spoken",
                ));
            }
            if hello.cluster_name != self.info.cluster_name {
                return Step::ReplyAndClose(error(
                    id,
                    ErrorCode::WrongCluster,
                    format!(
                        "this node belongs to cluster {:?}, not {:?}",
                        self.info.cluster_name, hello.cluster_name
                    ),
                ));
            }
            if hello.role != self.role {
                let (want, port) = match self.role {
                    Role::Client => ("clients", "client"),
                    Role::Peer => ("other nodes", "peer"),
                };
                return Step::ReplyAndClose(error(
                    id,
                    ErrorCode::InvalidRequest,
                    format!("the {port} port serves {want} only"),
                ));
            }
            if self.role == Role::Peer {
                match hello.node_name.as_deref().and_then(parse_hello_name) {
                    Some(node) => self.peer = Some(node),
                    None => {
                        return Step::ReplyAndClose(error(
                            id,
                            ErrorCode::InvalidRequest,
                            "a peer must name itself <id>@<name> in HELLO",
                        ));
                    }
                }
            }
            self.greeted = true;
            return Step::Reply(Frame {
                request_id: id,
                message: Message::HelloOk(HelloOk {
                    // The highest version both sides speak; HELLO's is the sender's highest.
                    protocol_version: hello.protocol_version.min(PROTOCOL_VERSION),
                    node_name: self.info.node_name.clone(),
                    shard_count: self.info.shard_count,
                    shard: self.shard,
                }),
            });
        }
        match frame.message {
            Message::Ping => Step::Reply(Frame {
                request_id: id,
                message: Message::Pong,
            }),
            Message::Get(_)
            | Message::Put(_)
            | Message::Delete(_)
            | Message::Update(_)
            | Message::Apply(_) => Step::Execute(frame),
            Message::ReplicaPut(_)
            | Message::ReplicaGet(_)
            | Message::Cluster(_)
            | Message::ForwardPut(_)
                if self.role == Role::Peer =>
            {
                Step::Execute(frame)
            }
            // Operator commands come from the `ringkv cluster` CLI, a client.
            Message::Admin(_) if self.role == Role::Client => Step::Execute(frame),
            Message::Hello(_) => Step::Reply(error(
                id,
                ErrorCode::InvalidRequest,
                "HELLO was already received on this connection",
            )),
            other => Step::Reply(error(
                id,
                ErrorCode::InvalidRequest,
                format!("{} is not a request a client may send", other.kind()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use bytes::Bytes;
    use ringkv_net::{Get, Hello};

    use super::*;

    fn info() -> NodeInfo {
        NodeInfo {
            cluster_name: "c".into(),
            node_name: "n".into(),
            shard_count: 2,
        }
    }

    fn hello(cluster: &str, role: Role) -> Frame {
        hello_named(cluster, role, None)
    }

    fn hello_named(cluster: &str, role: Role, name: Option<&str>) -> Frame {
        Frame {
            request_id: 1,
            message: Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role,
                cluster_name: cluster.into(),
                node_name: name.map(str::to_owned),
            }),
        }
    }

    fn get() -> Frame {
        Frame {
            request_id: 2,
            message: Message::Get(Get {
                bucket: Bytes::from_static(b"b"),
                key: Bytes::from_static(b"k"),
                r: None,
                timeout_ms: None,
            }),
        }
    }

    fn code(step: &Step) -> Option<ErrorCode> {
        let (Step::Reply(f) | Step::ReplyAndClose(f) | Step::Execute(f)) = step;
        match &f.message {
            Message::Error(e) => Some(e.code),
            _ => None,
        }
    }

    /// A request before HELLO closes the connection; after HELLO it is executed.
    #[test]
    fn handshake_comes_first() {
        let mut s = Session::new(info(), 1);
        let step = s.on_frame(get());
        assert!(matches!(step, Step::ReplyAndClose(_)));
        assert_eq!(code(&step), Some(ErrorCode::HandshakeRequired));

        let mut s = Session::new(info(), 1);
        match s.on_frame(hello("c", Role::Client)) {
            Step::Reply(Frame {
                message: Message::HelloOk(ok),
                ..
            }) => {
                assert_eq!(ok.shard, 1);
                assert_eq!(ok.shard_count, 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(s.greeted());
        assert!(matches!(s.on_frame(get()), Step::Execute(_)));
        let again = s.on_frame(hello("c", Role::Client));
        assert!(matches!(again, Step::Reply(_)));
        assert_eq!(code(&again), Some(ErrorCode::InvalidRequest));
    }

    /// The wrong cluster and the peer role are refused and the connection closed.
    #[test]
    fn bad_hellos_close() {
        let step = Session::new(info(), 0).on_frame(hello("other", Role::Client));
        assert!(matches!(step, Step::ReplyAndClose(_)));
        assert_eq!(code(&step), Some(ErrorCode::WrongCluster));
        let step = Session::new(info(), 0).on_frame(hello("c", Role::Peer));
        assert!(matches!(step, Step::ReplyAndClose(_)));
        assert_eq!(code(&step), Some(ErrorCode::InvalidRequest));
    }

    /// The peer port takes only peers that give their id, and then replica requests.
    #[test]
    fn peer_sessions() {
        let step = Session::for_peers(info(), 0).on_frame(hello("c", Role::Client));
        assert_eq!(code(&step), Some(ErrorCode::InvalidRequest));
        let step = Session::for_peers(info(), 0).on_frame(hello_named("c", Role::Peer, Some("b")));
        assert!(matches!(step, Step::ReplyAndClose(_)));
        let mut s = Session::for_peers(info(), 0);
        let step = s.on_frame(hello_named("c", Role::Peer, Some("7@b")));
        assert!(matches!(step, Step::Reply(_)));
        assert_eq!(s.peer(), Some(NodeId(7)));
        let get = Frame {
            request_id: 3,
            message: Message::ReplicaGet(ringkv_net::ReplicaGet {
                partition: 0,
                hint: None,
                bucket: Bytes::from_static(b"b"),
                key: Bytes::from_static(b"k"),
            }),
        };
        assert!(matches!(s.on_frame(get.clone()), Step::Execute(_)));
        let cluster = Frame {
            request_id: 4,
            message: Message::Cluster(ringkv_net::Cluster {
                sub: 32,
                partition: Some(0),
                payload: Bytes::new(),
            }),
        };
        assert!(matches!(s.on_frame(cluster.clone()), Step::Execute(_)));
        let mut client = Session::new(info(), 0);
        let _ = client.on_frame(hello("c", Role::Client));
        assert_eq!(code(&client.on_frame(get)), Some(ErrorCode::InvalidRequest));
        assert_eq!(
            code(&client.on_frame(cluster)),
            Some(ErrorCode::InvalidRequest)
        );
    }

    /// ADMIN is executed for clients only and CLUSTER for peers only: a client can never send
    /// cluster control, and a peer can never run an operator command.
    #[test]
    fn admin_for_clients_cluster_for_peers() {
        let admin = Frame {
            request_id: 4,
            message: Message::Admin(ringkv_net::Admin {
                command: "cluster-status".into(),
                args: Bytes::new(),
            }),
        };
        let cluster = Frame {
            request_id: 5,
            message: Message::Cluster(ringkv_net::Cluster {
                sub: 1,
                partition: None,
                payload: Bytes::new(),
            }),
        };
        let mut client = Session::new(info(), 0);
        let _ = client.on_frame(hello("c", Role::Client));
        assert!(matches!(client.on_frame(admin.clone()), Step::Execute(_)));
        assert_eq!(
            code(&client.on_frame(cluster.clone())),
            Some(ErrorCode::InvalidRequest)
        );
        let mut peer = Session::for_peers(info(), 0);
        let _ = peer.on_frame(hello_named("c", Role::Peer, Some("7@b")));
        assert!(matches!(peer.on_frame(cluster), Step::Execute(_)));
        assert_eq!(code(&peer.on_frame(admin)), Some(ErrorCode::InvalidRequest));
    }
}
