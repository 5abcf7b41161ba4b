//! Cluster membership: who is in the cluster, which ring is in force, which ring is being moved
//! to, and how nodes agree on it (sans-IO).
//!
//! One [`Membership`] runs per node (on its first shard); the other shards receive [`View`]
//! snapshots. It never reads a clock, a socket or randomness: the shell passes `now` and a random
//! number for the gossip partner, and carries out the [`MembershipOutput`]s.
//!
//! # State and how it merges
//!
//! The gossiped [`ClusterState`] has three parts, each merging as a maximum, so the merge is
//! commutative, associative and idempotent: two nodes that saw the same changes hold the same
//! state whatever the order, and gossip converges.
//!
//! - **Members**: per node id, the entry with the highest `(version, status rank)` wins. Whoever
//!   changes an entry (the node itself on `join`/`leave`, any node on `remove`, the claimant on
//!   commit and flip) raises its version by one. Concurrent changes with equal versions resolve by
//!   status rank ([`Status::Removed`] > [`Status::Leaving`] > [`Status::Valid`] >
//!   [`Status::Joining`]), so a removal is never undone by a stale entry.
//! - **Rings**: the ring in force and the pending ring being moved to, as one record with an
//!   `epoch` and the id of its author; the highest `(epoch, author)` wins, except that a record
//!   whose author the merged members list as [`Status::Joining`] ranks below every other. Only
//!   the claimant writes it, so in a settled cluster there is one author; two claimants that raced
//!   (different views of who is valid) still resolve to the same record everywhere. The joining
//!   rule is for a node that asked to join and never got the answer (it crashed, or the answer was
//!   lost): it still holds the one-node ring it started with, and as soon as it hears the
//!   cluster's gossip, which lists it as joining, that ring loses to the cluster's, and the
//!   cluster never takes it, whatever its `(epoch, author)`. Without the rule, a joiner with a
//!   higher id than the claimant replaced the ring of the whole cluster with its own one-node
//!   ring.
//! - **Transfer reports**: per receiving node, the partitions it has received for the pending ring
//!   of a given epoch. Only that node writes its report; the highest `(epoch, count)` wins.
//!
//! # Changes: stage, plan, commit, transfer, flip
//!
//! `join` (run on the joining node, naming a seed's peer address), `leave` and `remove` only
//! *stage* a change: they set a member's status. A new node given plain seed addresses
//! ([`MembershipConfig::contact_seeds`]) joins by itself: while it is a cluster of itself alone it
//! asks one seed per `gossip_ms`, in turn, until one takes it in. Two such nodes that ask each
//! other at once must not each take the other in (each would then drop its own cluster for the
//! other's): a node that is itself still asking refuses a join from a node with a lower
//! incarnation, and takes in one with a higher one (dropping its own pending ask), so exactly one
//! of the two succeeds. `plan` shows what committing would do: the ring
//! the claim function ([`Ring::claim`]) computes over the Joining and Valid members, which
//! partitions change owner, and how many replica copies must move. `commit` sends the request to
//! the **claimant** (the lowest id among Valid and Leaving members: deterministic, no election);
//! the claimant makes that ring the pending ring and Joining members Valid.
//!
//! While a ring is pending, every node whose preference lists grow pulls the partitions it gains
//! from a current replica (the coordinator does that, see `coordinator/transfer.rs`) and reports
//! each one here ([`Membership::transfer_done`]). Coordinators also send writes to the pending
//! replicas, so nothing written during the transfer is missed by the new owners. Once every
//! required copy is reported, the claimant **flips**: the pending ring becomes the ring, and
//! Leaving members that own nothing become Removed. Replicas that dropped out of a preference
//! list then hand their copies to the current replicas and drop them (the coordinator again).
//!
//! # How many bytes a change moves
//!
//! `plan`, `status` and a commit's answer give, beside the copies, their bytes: per copy, the
//! size of its partition as the largest figure any replica of the partition in the ring in force
//! reported. Every node reports the bytes it stores per partition ([`Membership::handle_stored`],
//! fed by the shell from its engines) in a table gossiped beside the state (the SIZES sub-kind,
//! to the same partner every round). The table is soft state, kept apart from [`ClusterState`]:
//! figures change all the time and are only advice, so they are neither persisted nor published
//! in views, and the state's encoding stays what nodes of earlier versions read. Copies whose
//! replicas reported nothing (a node of an earlier version, one just started) print as "size
//! unknown" (`sizes.rs`).
//!
//! # Limits
//!
//! One change at a time: `commit` is refused while a ring is pending. A down claimant stalls
//! commits and flips (not reads or writes) until it returns or is removed. A joining node must be
//! a fresh one-node cluster. Transfers are computed for `target_n` replicas (the largest bucket
//! `n`). At most [`MEMBERS_MAX`] members.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use bytes::Bytes;
use ringkv_net::wire::{LenWidth, Reader, Writer};
use ringkv_net::{BodyError, limits::NAME_BYTES_MAX};

use crate::NodeId;
use crate::coordinator::Core;
use crate::ring::{MEMBERS_MAX, PARTITION_COUNT_MAX, PartitionCount, PartitionId, Ring, RingError};

mod sizes;

pub use sizes::{ByteSum, NodeSizes, StoredSizes, human_bytes};

/// A member's place in the cluster's life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    /// Joined, waiting for a commit to own partitions.
    Joining = 1,
    /// A full member.
    Valid = 2,
    /// Staged to leave: keeps its partitions until a committed ring without it is in force.
    Leaving = 3,
    /// Gone: owns nothing and is no longer a gossip partner.
    Removed = 4,
}

impl Status {
    fn from_u8(b: u8) -> Option<Status> {
        Some(match b {
            1 => Status::Joining,
            2 => Status::Valid,
            3 => Status::Leaving,
            4 => Status::Removed,
            _ => return None,
        })
    }

    /// The name `cluster status` prints.
    pub fn name(self) -> &'static str {
        match self {
            Status::Joining => "joining",
            Status::Valid => "valid",
            Status::Leaving => "leaving",
            Status::Removed => "removed",
        }
    }
}

/// One member as gossiped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Where peers reach it (`HOST:PORT`).
    pub peer_addr: String,
    /// Where clients reach it (`HOST:PORT`).
    pub client_addr: String,
    /// Its status.
    pub status: Status,
    /// Raised by one on every change of the entry.
    pub version: u64,
    /// Names the data directory the node runs on (`cluster/src/identity.rs`); 0 when not known yet
    /// (a seed's entry before the seed gossiped its own). A node that lost its data comes back
    /// with another incarnation, and is refused under its old id.
    pub incarnation: u64,
}

impl Member {
    fn rank(&self) -> (u64, Status) {
        (self.version, self.status)
    }
}

/// A node's report of the partitions it received for the pending ring of `epoch`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Epoch of the rings record whose pending ring the partitions are for.
    pub epoch: u64,
    /// Partitions received.
    pub done: BTreeSet<u32>,
}

/// The gossiped state (module docs: how each part merges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterState {
    /// Every node ever known, Removed ones included (so a removal is not forgotten).
    pub members: BTreeMap<NodeId, Member>,
    /// Version of the rings record.
    pub epoch: u64,
    /// Who wrote the rings record.
    pub author: NodeId,
    /// The ring in force.
    pub ring: Ring,
    /// The ring being moved to.
    pub pending: Option<Ring>,
    /// Transfer reports per receiving node.
    pub reports: BTreeMap<NodeId, Report>,
}

impl ClusterState {
    /// Merges `other` into `self`; returns whether `self` changed.
    pub fn merge(&mut self, other: &ClusterState) -> bool {
        let mut changed = false;
        for (id, theirs) in &other.members {
            match self.members.get(id) {
                Some(ours) if ours.rank() >= theirs.rank() => {}
                _ => {
                    self.members.insert(*id, theirs.clone());
                    changed = true;
                }
            }
        }
        // Compared after the members merged, so both sides judge the authors by the same
        // entries (module docs, *Rings*).
        if self.ring_key(other) > self.ring_key(self) {
            self.epoch = other.epoch;
            self.author = other.author;
            self.ring = other.ring.clone();
            self.pending = other.pending.clone();
            changed = true;
        }
        for (id, theirs) in &other.reports {
            match self.reports.get(id) {
                Some(ours)
                    if (ours.epoch, ours.done.len()) >= (theirs.epoch, theirs.done.len()) => {}
                _ => {
                    self.reports.insert(*id, theirs.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    /// The claimant: the lowest id among Valid and Leaving members.
    pub fn claimant(&self) -> Option<NodeId> {
        self.members
            .values()
            .find(|m| matches!(m.status, Status::Valid | Status::Leaving))
            .map(|m| m.id)
    }

    /// The members the next claim places partitions on: Joining and Valid ones.
    fn next_members(&self) -> BTreeSet<NodeId> {
        self.members
            .values()
            .filter(|m| matches!(m.status, Status::Joining | Status::Valid))
            .map(|m| m.id)
            .collect()
    }

    /// How `state`'s ring record ranks in this state's view of the members: a record written by
    /// a node this state knows as joining ranks below every other, then `(epoch, author)`.
    fn ring_key(&self, state: &ClusterState) -> (bool, u64, NodeId) {
        let joining = self
            .members
            .get(&state.author)
            .is_some_and(|m| m.status == Status::Joining);
        (!joining, state.epoch, state.author)
    }

    /// Whether anything is staged: the next member set differs from the ring's.
    fn staged(&self) -> bool {
        self.next_members() != *self.ring.members()
    }

    /// Encodes the state (gossip payloads and the persisted file).
    pub fn encode(&self, w: &mut Writer<'_, Vec<u8>>) {
        w.u8(STATE_FORMAT);
        w.u32(self.members.len() as u32);
        for m in self.members.values() {
            w.u32(m.id.0);
            w.prefixed(LenWidth::U8, m.peer_addr.as_bytes());
            w.prefixed(LenWidth::U8, m.client_addr.as_bytes());
            w.u8(m.status as u8);
            w.u64(m.version);
            w.u64(m.incarnation);
        }
        w.u64(self.epoch);
        w.u32(self.author.0);
        encode_ring(w, &self.ring);
        w.flag(self.pending.is_some());
        if let Some(p) = &self.pending {
            encode_ring(w, p);
        }
        w.u32(self.reports.len() as u32);
        for (id, r) in &self.reports {
            w.u32(id.0);
            w.u64(r.epoch);
            w.u32(r.done.len() as u32);
            for p in &r.done {
                w.u32(*p);
            }
        }
    }

    /// Decodes what [`ClusterState::encode`] wrote, checking every count before allocating.
    pub fn decode(r: &mut Reader<'_>) -> Result<ClusterState, BodyError> {
        let format = r.u8("state_format")?;
        if format != STATE_FORMAT && format != STATE_FORMAT_NO_INCARNATION {
            return Err(BodyError::BadValue {
                field: "state_format",
                value: u64::from(format),
            });
        }
        let count = bounded(r.u32("members")?, MEMBERS_MAX, "members")?;
        let mut members = BTreeMap::new();
        for _ in 0..count {
            let id = NodeId(r.u32("member_id")?);
            let peer_addr = r.string("peer_addr", LenWidth::U8, NAME_BYTES_MAX)?;
            let client_addr = r.string("client_addr", LenWidth::U8, NAME_BYTES_MAX)?;
            let s = r.u8("status")?;
            let status = Status::from_u8(s).ok_or(BodyError::BadValue {
                field: "status",
                value: u64::from(s),
            })?;
            let version = counter(r, "member_version")?;
            let incarnation = if format == STATE_FORMAT_NO_INCARNATION {
                0
            } else {
                r.u64("member_incarnation")?
            };
            members.insert(
                id,
                Member {
                    id,
                    peer_addr,
                    client_addr,
                    status,
                    version,
                    incarnation,
                },
            );
        }
        let epoch = counter(r, "epoch")?;
        let author = NodeId(r.u32("author")?);
        let ring = decode_ring(r)?;
        let pending = if r.flag("pending")? {
            Some(decode_ring(r)?)
        } else {
            None
        };
        let count = bounded(r.u32("reports")?, MEMBERS_MAX, "reports")?;
        let mut reports = BTreeMap::new();
        for _ in 0..count {
            let id = NodeId(r.u32("report_node")?);
            let epoch = counter(r, "report_epoch")?;
            let n = bounded(
                r.u32("report_done")?,
                PARTITION_COUNT_MAX as usize,
                "report_done",
            )?;
            let mut done = BTreeSet::new();
            for _ in 0..n {
                done.insert(r.u32("partition")?);
            }
            reports.insert(id, Report { epoch, done });
        }
        Ok(ClusterState {
            members,
            epoch,
            author,
            ring,
            pending,
            reports,
        })
    }
}

/// The state's encoding: members carry their incarnation.
const STATE_FORMAT: u8 = 2;
/// The encoding before incarnations, still read (a state file written by an earlier version).
const STATE_FORMAT_NO_INCARNATION: u8 = 1;

fn bounded(n: u32, max: usize, field: &'static str) -> Result<usize, BodyError> {
    let n = n as usize;
    if n > max {
        return Err(BodyError::TooLarge {
            field,
            len: n as u64,
            max,
        });
    }
    Ok(n)
}

fn encode_ring(w: &mut Writer<'_, Vec<u8>>, ring: &Ring) {
    w.u64(ring.version());
    w.u32(ring.members().len() as u32);
    for m in ring.members() {
        w.u32(m.0);
    }
    w.u32(ring.owners().len() as u32);
    for o in ring.owners() {
        w.u32(o.0);
    }
}

/// Largest version or epoch a decoded state or message may carry: far above any real count
/// (each change raises one by one), far below where raising it overflows. Damaged or hostile
/// bytes with a larger one are refused, not taken in to overflow at the next change.
/// The same bound as a clock's counters.
const COUNT_MAX: u64 = crate::dvv::COUNTER_MAX;

/// Reads a version or an epoch, refusing one above [`COUNT_MAX`].
fn counter(r: &mut Reader<'_>, field: &'static str) -> Result<u64, BodyError> {
    let value = r.u64(field)?;
    if value > COUNT_MAX {
        return Err(BodyError::BadValue { field, value });
    }
    Ok(value)
}

fn decode_ring(r: &mut Reader<'_>) -> Result<Ring, BodyError> {
    let version = counter(r, "ring_version")?;
    let count = bounded(r.u32("ring_members")?, MEMBERS_MAX, "ring_members")?;
    let mut members = BTreeSet::new();
    for _ in 0..count {
        members.insert(NodeId(r.u32("ring_member")?));
    }
    let count = bounded(
        r.u32("ring_owners")?,
        PARTITION_COUNT_MAX as usize,
        "ring_owners",
    )?;
    let mut owners = Vec::with_capacity(count.min(r.remaining() / 4));
    for _ in 0..count {
        owners.push(NodeId(r.u32("ring_owner")?));
    }
    Ring::from_parts(version, owners, members).map_err(|_| BodyError::BadValue {
        field: "ring",
        value: version,
    })
}

/// What every shard needs, published whenever it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// Raised on every change this node sees.
    pub version: u64,
    /// The ring in force.
    pub ring: Ring,
    /// The ring being moved to, and the epoch of the record that holds it (what transfer reports
    /// name).
    pub pending: Option<(u64, Ring)>,
    /// Every member with its addresses.
    pub members: BTreeMap<NodeId, Member>,
}

impl View {
    /// The peer address of `node`, if it is a member that has not been removed.
    pub fn peer_addr(&self, node: NodeId) -> Option<&str> {
        self.members
            .get(&node)
            .filter(|m| m.status != Status::Removed)
            .map(|m| m.peer_addr.as_str())
    }
}

/// Settings of a [`Membership`].
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// This node.
    pub node: NodeId,
    /// Where peers reach this node.
    pub peer_addr: String,
    /// Where clients reach this node.
    pub client_addr: String,
    /// Interval between gossip rounds.
    pub gossip_ms: u64,
    /// How long a request to a peer may take.
    pub request_timeout_ms: u64,
    /// Replicas transfers are computed for (the largest bucket `n`).
    pub target_n: usize,
    /// Partitions of a ring this node creates.
    pub partitions: PartitionCount,
    /// This node's incarnation (`cluster/src/identity.rs`), never 0.
    pub incarnation: u64,
    /// The node's identity was created by this start, on an empty data directory: if the
    /// cluster knows its id from another incarnation, this node is the impostor.
    pub fresh: bool,
    /// Peer addresses of members to join (plain `HOST:PORT` seeds), this node's own excluded:
    /// a node bootstrapped alone with these keeps asking them, in turn, to let it join until one
    /// does ([`Membership::bootstrap`]). Empty for none.
    pub contact_seeds: Vec<String>,
}

/// An operator command (ADMIN frames; `docs/PROTOCOL.md` §5.8.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminCmd {
    /// Join the cluster of the node at this peer address.
    Join {
        /// A member's peer address.
        seed: String,
    },
    /// Stage this node's departure.
    Leave,
    /// Stage another node's removal.
    Remove {
        /// The node.
        node: NodeId,
    },
    /// Show what a commit would do.
    Plan,
    /// Apply the staged changes.
    Commit,
    /// Members, ownership, reachability, transfers.
    Status,
}

impl AdminCmd {
    /// The command of an ADMIN frame: `cluster-join` (args: the seed's peer address),
    /// `cluster-leave`, `cluster-remove` (args: the node id), `cluster-plan`, `cluster-commit`,
    /// `cluster-status`.
    pub fn parse(command: &str, args: &str) -> Result<AdminCmd, MembershipError> {
        let args = args.trim();
        let none = |cmd: AdminCmd| {
            if args.is_empty() {
                Ok(cmd)
            } else {
                Err(MembershipError::BadCommand(format!(
                    "{command} takes no arguments, got {args:?}"
                )))
            }
        };
        match command {
            "cluster-join" if !args.is_empty() => Ok(AdminCmd::Join {
                seed: args.to_string(),
            }),
            "cluster-join" => Err(MembershipError::BadCommand(
                "cluster-join needs a seed's peer address (HOST:PORT)".into(),
            )),
            "cluster-leave" => none(AdminCmd::Leave),
            "cluster-remove" => args
                .parse::<u32>()
                .map(|n| AdminCmd::Remove { node: NodeId(n) })
                .map_err(|_| {
                    MembershipError::BadCommand(format!(
                        "cluster-remove needs a node id (an integer), got {args:?}"
                    ))
                }),
            "cluster-plan" => none(AdminCmd::Plan),
            "cluster-commit" => none(AdminCmd::Commit),
            "cluster-status" => none(AdminCmd::Status),
            other => Err(MembershipError::BadCommand(format!(
                "unknown command {other:?}"
            ))),
        }
    }
}

/// Why an operator command failed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    /// The cluster's state does not allow it (nothing staged, a change already pending, an
    /// unknown or removed node, a node already in a cluster): retrying as is will not help.
    #[error("{0}")]
    Refused(String),
    /// A node the command needed (the claimant, the seed) did not answer in time: the command
    /// may or may not have taken effect, and retrying may succeed.
    #[error("{0}")]
    Unreachable(String),
}

/// Whether a member is reachable, as the node's failure detector sees it: the coordinator's
/// liveness ([`Core::suspects`]) on the shard that runs membership, the view that decides
/// where requests go. Membership keeps no view of its own, so `cluster status` cannot say a
/// node is up while requests route around it. Each shard's coordinator judges alone; status
/// shows the first shard's judgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Believed reachable: heard from recently enough, and no request to it failed lately.
    Up,
    /// Suspected: silent for too long (φ above the threshold), or a request to it failed or
    /// its connection was lost within the coordinator's `down_ms`.
    Suspected,
    /// Not in the ring in force, so not watched (no heartbeats): a joining member, or one
    /// waiting for the ring that takes it in.
    Unwatched,
}

impl Reach {
    /// What `core` believes of `node` at `now`.
    pub fn of(core: &Core, node: NodeId, now: u64) -> Reach {
        if core.suspects(node, now) {
            Reach::Suspected
        } else if core.ring().members().contains(&node) {
            Reach::Up
        } else {
            Reach::Unwatched
        }
    }

    /// The word `cluster status` shows.
    pub fn name(self) -> &'static str {
        match self {
            Reach::Up => "up",
            Reach::Suspected => "suspected",
            Reach::Unwatched => "unwatched",
        }
    }
}

/// Membership failures.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembershipError {
    /// An ADMIN command that does not parse.
    #[error("{0}")]
    BadCommand(String),
    /// A ring could not be built.
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    /// A persisted state that does not decode.
    #[error("cluster state file: {0}")]
    Damaged(String),
    /// A persisted state of another node.
    #[error("cluster state file belongs to {found}, not {expected}")]
    WrongNode {
        /// This node.
        expected: NodeId,
        /// The file's node.
        found: NodeId,
    },
}

/// Messages between the memberships of two nodes (CLUSTER frames without a partition).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipMsg {
    /// Push-pull gossip: the sender's state.
    Gossip {
        /// Request id.
        id: u64,
        /// The state.
        state: Box<ClusterState>,
    },
    /// The receiver's state after merging.
    GossipOk {
        /// Request id.
        id: u64,
        /// The state.
        state: Box<ClusterState>,
    },
    /// A fresh node asks to join.
    Join {
        /// Request id.
        id: u64,
        /// The joining node.
        member: Member,
    },
    /// Accepted: the cluster's state, which the joiner adopts.
    JoinOk {
        /// Request id.
        id: u64,
        /// The state.
        state: Box<ClusterState>,
    },
    /// Apply the staged changes (sent to the claimant).
    Commit {
        /// Request id.
        id: u64,
    },
    /// The outcome of a commit, or a refused join, as text for the operator.
    Outcome {
        /// Request id.
        id: u64,
        /// Success or the reason.
        result: Result<String, String>,
    },
    /// Push-pull of the stored sizes: the sender's table.
    Sizes {
        /// Request id.
        id: u64,
        /// The table.
        sizes: Box<StoredSizes>,
    },
    /// The receiver's table after merging.
    SizesOk {
        /// Request id.
        id: u64,
        /// The table.
        sizes: Box<StoredSizes>,
    },
}

/// CLUSTER sub-kinds of membership messages (`docs/PROTOCOL.md` §5.9.1).
pub mod sub {
    /// GOSSIP / GOSSIP_OK.
    pub const GOSSIP: u8 = 1;
    /// JOIN / JOIN_OK.
    pub const JOIN: u8 = 2;
    /// COMMIT (request only: answered by OUTCOME).
    pub const COMMIT: u8 = 3;
    /// OUTCOME (answer only: to COMMIT, or a refused JOIN).
    pub const OUTCOME: u8 = 4;
    /// SIZES / SIZES_OK. Nodes of earlier versions answer it `invalid_request`, which the
    /// sender takes as a failed request.
    pub const SIZES: u8 = 5;
}

impl MembershipMsg {
    /// The request id.
    pub fn id(&self) -> u64 {
        match self {
            Self::Gossip { id, .. }
            | Self::GossipOk { id, .. }
            | Self::Join { id, .. }
            | Self::JoinOk { id, .. }
            | Self::Commit { id }
            | Self::Outcome { id, .. }
            | Self::Sizes { id, .. }
            | Self::SizesOk { id, .. } => *id,
        }
    }

    /// Whether it answers a request.
    pub fn is_answer(&self) -> bool {
        matches!(
            self,
            Self::GossipOk { .. }
                | Self::JoinOk { .. }
                | Self::Outcome { .. }
                | Self::SizesOk { .. }
        )
    }

    /// The sub-kind and payload of its CLUSTER (or CLUSTER_OK) frame.
    pub fn encode(&self) -> (u8, Bytes) {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        let sub = match self {
            Self::Gossip { state, .. } | Self::GossipOk { state, .. } => {
                state.encode(&mut w);
                sub::GOSSIP
            }
            Self::Join { member, .. } => {
                w.u32(member.id.0);
                w.prefixed(LenWidth::U8, member.peer_addr.as_bytes());
                w.prefixed(LenWidth::U8, member.client_addr.as_bytes());
                w.u64(member.version);
                w.u64(member.incarnation);
                sub::JOIN
            }
            Self::JoinOk { state, .. } => {
                state.encode(&mut w);
                sub::JOIN
            }
            Self::Commit { .. } => sub::COMMIT,
            Self::Outcome { result, .. } => {
                w.flag(result.is_ok());
                let text = match result {
                    Ok(t) | Err(t) => t,
                };
                let mut end = text.len().min(u16::MAX as usize);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                w.prefixed(LenWidth::U16, &text.as_bytes()[..end]);
                sub::OUTCOME
            }
            Self::Sizes { sizes, .. } | Self::SizesOk { sizes, .. } => {
                sizes.encode(&mut w);
                sub::SIZES
            }
        };
        (sub, Bytes::from(out))
    }

    /// Decodes a frame's payload; `answer` tells CLUSTER_OK from CLUSTER. `Ok(None)` for a
    /// sub-kind that is not membership's.
    pub fn decode(
        id: u64,
        sub: u8,
        answer: bool,
        payload: &[u8],
    ) -> Result<Option<MembershipMsg>, BodyError> {
        let mut r = Reader::new(payload);
        let msg = match (sub, answer) {
            (sub::GOSSIP, false) => Self::Gossip {
                id,
                state: Box::new(ClusterState::decode(&mut r)?),
            },
            (sub::GOSSIP, true) => Self::GossipOk {
                id,
                state: Box::new(ClusterState::decode(&mut r)?),
            },
            (sub::JOIN, false) => Self::Join {
                id,
                member: Member {
                    id: NodeId(r.u32("member_id")?),
                    peer_addr: r.string("peer_addr", LenWidth::U8, NAME_BYTES_MAX)?,
                    client_addr: r.string("client_addr", LenWidth::U8, NAME_BYTES_MAX)?,
                    status: Status::Joining,
                    version: counter(&mut r, "member_version")?,
                    incarnation: r.u64("member_incarnation")?,
                },
            },
            (sub::JOIN, true) => Self::JoinOk {
                id,
                state: Box::new(ClusterState::decode(&mut r)?),
            },
            (sub::COMMIT, false) => Self::Commit { id },
            (sub::OUTCOME, true) => {
                let ok = r.flag("ok")?;
                let text = r.string("text", LenWidth::U16, u16::MAX as usize)?;
                Self::Outcome {
                    id,
                    result: if ok { Ok(text) } else { Err(text) },
                }
            }
            (sub::SIZES, false) => Self::Sizes {
                id,
                sizes: Box::new(StoredSizes::decode(&mut r)?),
            },
            (sub::SIZES, true) => Self::SizesOk {
                id,
                sizes: Box::new(StoredSizes::decode(&mut r)?),
            },
            _ => return Ok(None),
        };
        r.finish()?;
        Ok(Some(msg))
    }
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipOutput {
    /// Send to a member (its address is in the view).
    Send {
        /// The member.
        to: NodeId,
        /// The message.
        msg: MembershipMsg,
    },
    /// Send to an address whose node id is not known yet (a join's seed).
    SendAddr {
        /// `HOST:PORT` of the peer listener.
        addr: String,
        /// The message.
        msg: MembershipMsg,
    },
    /// Answer ADMIN request `req`.
    AdminReply {
        /// The shell's request id.
        req: u64,
        /// Text for the operator, or why it failed.
        result: Result<String, AdminError>,
    },
    /// Publish to every shard.
    View(View),
    /// Write atomically to the node's cluster-state file (read back with
    /// [`Membership::restore`]).
    Persist(Vec<u8>),
    /// This node's id belongs to another incarnation in the cluster: the node must stop without
    /// serving under it (sent once; the text says what to do).
    IdentityTaken(String),
}

/// A request this node sent and still waits for.
#[derive(Debug)]
struct Outstanding {
    deadline: u64,
    /// The ADMIN request waiting for it, if any.
    admin: Option<u64>,
    /// A gossip sent while this node was out of the cluster: its answer shows a live member
    /// merged that.
    out: bool,
}

/// Progress of a join through the contact seeds.
#[derive(Debug)]
struct AutoJoin {
    /// Index of the next seed to ask.
    next: usize,
    /// When the next attempt may go.
    at: u64,
    /// The join request waiting for an answer.
    pending: Option<u64>,
}

/// The membership state machine of one node (module docs).
pub struct Membership {
    cfg: MembershipConfig,
    state: ClusterState,
    view_version: u64,
    next_id: u64,
    next_gossip: u64,
    outstanding: BTreeMap<u64, Outstanding>,
    /// A live member answered a gossip that carried this node out of the cluster.
    out_known: bool,
    /// The cluster knows this node's id from another incarnation, and this node is fresh: it
    /// merges nothing more ([`MembershipOutput::IdentityTaken`]).
    identity_taken: bool,
    /// Joining through the contact seeds, until this node is in a cluster of more than itself.
    auto_join: Option<AutoJoin>,
    /// What each node stores per partition, as gossiped (soft state: module docs).
    sizes: StoredSizes,
    /// This node's own figures, as the shell last gave them: its entry in `sizes` is kept equal
    /// to them, above any stale copy gossip brings back.
    stored: Option<BTreeMap<u32, u64>>,
    out: Vec<MembershipOutput>,
}

impl Membership {
    fn with_state(cfg: MembershipConfig, state: ClusterState) -> Membership {
        // A cluster of this node alone, given members to join (new, or stopped before its join
        // went through), asks them until one takes it in.
        let auto_join =
            (state.members.len() == 1 && !cfg.contact_seeds.is_empty()).then_some(AutoJoin {
                next: 0,
                at: 0,
                pending: None,
            });
        Membership {
            cfg,
            state,
            view_version: 0,
            next_id: 1,
            next_gossip: 0,
            outstanding: BTreeMap::new(),
            out_known: false,
            identity_taken: false,
            auto_join,
            sizes: StoredSizes::default(),
            stored: None,
            out: Vec::new(),
        }
    }

    /// A cluster of `seeds` (all Valid; the ring claimed over them), or of this node alone when
    /// `seeds` is empty. `seeds` must include this node when not empty.
    pub fn bootstrap(
        cfg: MembershipConfig,
        seeds: &[(NodeId, String)],
    ) -> Result<Membership, MembershipError> {
        let mut members = BTreeMap::new();
        let me = Member {
            id: cfg.node,
            peer_addr: cfg.peer_addr.clone(),
            client_addr: cfg.client_addr.clone(),
            status: Status::Valid,
            version: 1,
            incarnation: cfg.incarnation,
        };
        members.insert(cfg.node, me);
        for (id, addr) in seeds {
            if *id != cfg.node {
                members.insert(
                    *id,
                    Member {
                        id: *id,
                        peer_addr: addr.clone(),
                        client_addr: String::new(),
                        status: Status::Valid,
                        // Below the node's own entry, which carries its client address.
                        version: 0,
                        incarnation: 0,
                    },
                );
            }
        }
        let ids: BTreeSet<NodeId> = members.keys().copied().collect();
        let ring = Ring::new(cfg.partitions, &ids, cfg.target_n)?;
        let author = *ids.first().unwrap_or(&cfg.node);
        let state = ClusterState {
            members,
            epoch: 1,
            author,
            ring,
            pending: None,
            reports: BTreeMap::new(),
        };
        Ok(Self::with_state(cfg, state))
    }

    /// The state persisted by an earlier run ([`MembershipOutput::Persist`]).
    pub fn restore(cfg: MembershipConfig, bytes: &[u8]) -> Result<Membership, MembershipError> {
        let mut r = Reader::new(bytes);
        let node = NodeId(
            r.u32("node")
                .map_err(|e| MembershipError::Damaged(e.to_string()))?,
        );
        if node != cfg.node {
            return Err(MembershipError::WrongNode {
                expected: cfg.node,
                found: node,
            });
        }
        let state =
            ClusterState::decode(&mut r).map_err(|e| MembershipError::Damaged(e.to_string()))?;
        r.finish()
            .map_err(|e| MembershipError::Damaged(e.to_string()))?;
        let mut m = Self::with_state(cfg, state);
        // Addresses may have changed between runs: this run's own entry wins from now on.
        let me = m.state.members.get(&m.cfg.node).cloned();
        if let Some(me) = me
            && (me.peer_addr != m.cfg.peer_addr
                || me.client_addr != m.cfg.client_addr
                || me.incarnation != m.cfg.incarnation)
        {
            let (peer, client) = (m.cfg.peer_addr.clone(), m.cfg.client_addr.clone());
            let incarnation = m.cfg.incarnation;
            m.update_self(|e| {
                e.peer_addr = peer;
                e.client_addr = client;
                e.incarnation = incarnation;
            });
        }
        Ok(m)
    }

    /// The bytes [`Membership::restore`] reads.
    pub fn persisted(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.u32(self.cfg.node.0);
        self.state.encode(&mut w);
        out
    }

    /// Whether this node is out of the cluster and others know it, so it may stop once it holds
    /// nothing for them: it is removed (it left, or an operator removed it), in neither the ring
    /// in force nor the pending ring (it replicates nothing), and a live member answered a
    /// gossip that carried that state. The last part matters when this node was the claimant:
    /// it wrote the flip that took it out, and stopping before anyone merged it would leave the
    /// others waiting for a claimant that is gone. A node removed while the ring still places
    /// data on it keeps serving until the ring moves on.
    pub fn retired(&self) -> bool {
        self.out_known && self.out_of_cluster()
    }

    fn out_of_cluster(&self) -> bool {
        let me = self.cfg.node;
        self.state
            .members
            .get(&me)
            .is_some_and(|m| m.status == Status::Removed)
            && !self.state.ring.members().contains(&me)
            && self
                .state
                .pending
                .as_ref()
                .is_none_or(|p| !p.members().contains(&me))
    }

    /// Version of the latest view published ([`MembershipOutput::View`]).
    pub fn view_version(&self) -> u64 {
        self.view_version
    }

    /// The gossiped state.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The snapshot shards use.
    pub fn view(&self) -> View {
        View {
            version: self.view_version,
            ring: self.state.ring.clone(),
            pending: self
                .state
                .pending
                .as_ref()
                .map(|p| (self.state.epoch, p.clone())),
            members: self.state.members.clone(),
        }
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn take(&mut self) -> Vec<MembershipOutput> {
        std::mem::take(&mut self.out)
    }

    /// Publishes and persists after a change.
    fn changed(&mut self) {
        self.view_version += 1;
        let view = self.view();
        self.out.push(MembershipOutput::View(view));
        self.out.push(MembershipOutput::Persist(self.persisted()));
    }

    fn update_self(&mut self, f: impl FnOnce(&mut Member)) {
        let node = self.cfg.node;
        if let Some(e) = self.state.members.get_mut(&node) {
            f(e);
            e.version += 1;
        }
        self.changed();
    }

    fn request(&mut self, now: u64, admin: Option<u64>) -> u64 {
        let id = self.id();
        self.outstanding.insert(
            id,
            Outstanding {
                deadline: now + self.cfg.request_timeout_ms,
                admin,
                out: false,
            },
        );
        id
    }

    /// The first outputs of a run: the view to publish.
    pub fn start(&mut self) -> Vec<MembershipOutput> {
        self.changed();
        self.take()
    }

    /// Time passes: gossip with a random member every `gossip_ms` (`random` picks it), time out
    /// requests, and, on the claimant, flip the ring once transfers are complete.
    pub fn handle_tick(&mut self, now: u64, random: u64) -> Vec<MembershipOutput> {
        let expired: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.fail(id, "no answer in time");
        }
        self.auto_join_tick(now);
        if now >= self.next_gossip {
            self.next_gossip = now + self.cfg.gossip_ms;
            let partners: Vec<NodeId> = self
                .state
                .members
                .values()
                .filter(|m| m.id != self.cfg.node && m.status != Status::Removed)
                .map(|m| m.id)
                .collect();
            if !partners.is_empty() {
                let to = partners[(random % partners.len() as u64) as usize];
                let id = self.request(now, None);
                let out = self.out_of_cluster();
                if let Some(o) = self.outstanding.get_mut(&id) {
                    o.out = out;
                }
                let state = Box::new(self.state.clone());
                self.out.push(MembershipOutput::Send {
                    to,
                    msg: MembershipMsg::Gossip { id, state },
                });
                // A node with no table yet has nothing to push and gets others' tables from
                // their rounds, so it sends none.
                if !self.sizes.is_empty() {
                    let id = self.request(now, None);
                    let sizes = Box::new(self.sizes.clone());
                    self.out.push(MembershipOutput::Send {
                        to,
                        msg: MembershipMsg::Sizes { id, sizes },
                    });
                }
            }
        }
        self.maybe_flip();
        self.take()
    }

    /// Asks the next contact seed to let this node join, while it is a cluster of itself alone
    /// and no earlier ask is waiting (one ask per `gossip_ms`, round-robin over the seeds).
    fn auto_join_tick(&mut self, now: u64) {
        let Some(a) = self.auto_join.as_mut() else {
            return;
        };
        if self.state.members.len() > 1 {
            self.auto_join = None;
            return;
        }
        if a.pending
            .is_some_and(|id| self.outstanding.contains_key(&id))
            || now < a.at
        {
            return;
        }
        let seeds = &self.cfg.contact_seeds;
        assert!(!seeds.is_empty(), "auto-join runs only with contact seeds");
        let addr = seeds[a.next % seeds.len()].clone();
        a.next = (a.next + 1) % seeds.len();
        a.at = now + self.cfg.gossip_ms;
        let id = self.request(now, None);
        if let Some(a) = self.auto_join.as_mut() {
            a.pending = Some(id);
        }
        if let Some(member) = self.state.members.get(&self.cfg.node).cloned() {
            self.out.push(MembershipOutput::SendAddr {
                addr,
                msg: MembershipMsg::Join { id, member },
            });
        }
    }

    /// A request this node sent failed (connection refused, error answer).
    pub fn handle_failed(&mut self, _now: u64, id: u64, reason: &str) -> Vec<MembershipOutput> {
        self.fail(id, reason);
        self.take()
    }

    fn fail(&mut self, id: u64, reason: &str) {
        if let Some(o) = self.outstanding.remove(&id)
            && let Some(req) = o.admin
        {
            self.out.push(MembershipOutput::AdminReply {
                req,
                result: Err(AdminError::Unreachable(format!(
                    "the peer did not answer: {reason}"
                ))),
            });
        }
    }

    fn merge(&mut self, other: &ClusterState) {
        if self.identity_taken {
            return;
        }
        let me = self.cfg.node;
        let theirs = other
            .members
            .get(&me)
            .filter(|e| e.incarnation != 0 && e.incarnation != self.cfg.incarnation);
        if let Some(theirs) = theirs {
            if self.cfg.fresh {
                // This node was started on an empty data directory under an id the cluster knows
                // from another data directory: it is the one that must go.
                self.identity_taken = true;
                self.out.push(MembershipOutput::IdentityTaken(format!(
                    "{me} is a member of the cluster with another data directory (incarnation \
                     {:016x}, this one {:016x}): a node that lost its data must come back under a \
                     new id. Start it with an empty data directory and without --node-id (it \
                     picks a new id), join it, and `ringkv cluster remove {}` the old id",
                    theirs.incarnation, self.cfg.incarnation, me.0
                )));
                return;
            }
            // Another process claims this node's id: this node holds the id's data, so its own
            // entry must win. Merge the rest, then outrank the claim.
            let version = theirs.version;
            let mut other = other.clone();
            other.members.remove(&me);
            self.state.merge(&other);
            let incarnation = self.cfg.incarnation;
            self.update_self(|e| {
                e.version = e.version.max(version);
                e.incarnation = incarnation;
            });
            return;
        }
        if self.state.merge(other) {
            self.changed();
        }
    }

    /// A message from another node (`from` is `None` when the sender is not known by id yet).
    /// It takes the time like every entry point, though no message needs it: when a peer was
    /// last heard from is the failure detector's business ([`Reach`]), not membership's.
    pub fn handle_msg(
        &mut self,
        _now: u64,
        from: Option<NodeId>,
        msg: MembershipMsg,
    ) -> Vec<MembershipOutput> {
        match msg {
            MembershipMsg::Gossip { id, state } => {
                self.merge(&state);
                let reply = MembershipMsg::GossipOk {
                    id,
                    state: Box::new(self.state.clone()),
                };
                self.reply_to(from, reply);
            }
            MembershipMsg::GossipOk { id, state } => {
                if let Some(o) = self.outstanding.remove(&id) {
                    self.merge(&state);
                    self.out_known |= o.out;
                }
            }
            MembershipMsg::Join { id, member } => {
                if let Some(a) = &self.auto_join
                    && self.state.members.len() == 1
                {
                    // Two fresh nodes asking each other: the one with the lower incarnation
                    // takes the other in, so exactly one of the two joins succeeds.
                    if member.incarnation < self.cfg.incarnation {
                        self.reply_to(
                            from,
                            MembershipMsg::Outcome {
                                id,
                                result: Err(format!(
                                    "{} is itself joining a cluster; it joins this node instead",
                                    self.cfg.node
                                )),
                            },
                        );
                        return self.take();
                    }
                    if let Some(pending) = a.pending {
                        self.outstanding.remove(&pending);
                    }
                    self.auto_join = None;
                }
                let known = self.state.members.get(&member.id).cloned();
                match known {
                    Some(m)
                        if m.status != Status::Removed
                            && m.incarnation != 0
                            && m.incarnation != member.incarnation =>
                    {
                        // The id's node lost its data (or another node took its id): letting it
                        // in would let it reissue dots the id already issued.
                        self.reply_to(
                            from,
                            MembershipMsg::Outcome {
                                id,
                                result: Err(format!(
                                    "{} is a member with another data directory; a node that \
                                     lost its data joins under a new id (start it without \
                                     --node-id) and the old id is removed",
                                    m.id
                                )),
                            },
                        );
                        return self.take();
                    }
                    Some(m) if m.status != Status::Removed && m.peer_addr != member.peer_addr => {
                        // Another live node already has this id: refuse rather than merge two
                        // nodes' identities.
                        self.reply_to(
                            from,
                            MembershipMsg::Outcome {
                                id,
                                result: Err(format!(
                                    "{} is already a member at {}",
                                    m.id, m.peer_addr
                                )),
                            },
                        );
                        return self.take();
                    }
                    Some(m) if m.status == Status::Removed => {
                        self.reply_to(
                            from,
                            MembershipMsg::Outcome {
                                id,
                                result: Err(format!(
                                    "{} was removed; a node rejoins under a new id",
                                    m.id
                                )),
                            },
                        );
                        return self.take();
                    }
                    _ => {}
                }
                let version = known.map_or(member.version, |m| m.version.max(member.version)) + 1;
                self.state.members.insert(
                    member.id,
                    Member {
                        status: Status::Joining,
                        version,
                        ..member
                    },
                );
                self.changed();
                let reply = MembershipMsg::JoinOk {
                    id,
                    state: Box::new(self.state.clone()),
                };
                self.reply_to(from, reply);
            }
            MembershipMsg::JoinOk { id, state } => {
                if let Some(o) = self.outstanding.remove(&id) {
                    // The joiner drops its one-node cluster and adopts the seed's.
                    let mut state = *state;
                    if let Some(me) = state.members.get_mut(&self.cfg.node) {
                        me.peer_addr = self.cfg.peer_addr.clone();
                        me.client_addr = self.cfg.client_addr.clone();
                    }
                    self.state = state;
                    self.changed();
                    if let Some(req) = o.admin {
                        let text = format!(
                            "joined: {} is joining a cluster of {} members; run `ringkv cluster plan` \
                             and `ringkv cluster commit` to give it partitions",
                            self.cfg.node,
                            self.state.members.len()
                        );
                        self.out.push(MembershipOutput::AdminReply {
                            req,
                            result: Ok(text),
                        });
                    }
                }
            }
            MembershipMsg::Commit { id } => {
                let result = self.commit_here();
                self.reply_to(from, MembershipMsg::Outcome { id, result });
            }
            MembershipMsg::Outcome { id, result } => {
                if let Some(o) = self.outstanding.remove(&id)
                    && let Some(req) = o.admin
                {
                    self.out.push(MembershipOutput::AdminReply {
                        req,
                        result: result.map_err(AdminError::Refused),
                    });
                }
            }
            MembershipMsg::Sizes { id, sizes } => {
                self.merge_sizes(&sizes);
                let reply = MembershipMsg::SizesOk {
                    id,
                    sizes: Box::new(self.sizes.clone()),
                };
                self.reply_to(from, reply);
            }
            MembershipMsg::SizesOk { id, sizes } => {
                if self.outstanding.remove(&id).is_some() {
                    self.merge_sizes(&sizes);
                }
            }
        }
        self.take()
    }

    /// This node's bytes stored per partition, as its engines count them now (the shell calls
    /// this every few seconds; engine partitions that are not ring partitions, such as hints,
    /// are left out here). Nothing to carry out: the figures leave with the next gossip round.
    pub fn handle_stored(&mut self, _now: u64, mut stored: BTreeMap<u32, u64>) {
        // Partitions past the ring's hold no replica data (the shell keeps hints there).
        let q = self.state.ring.partition_count().get();
        stored.retain(|p, bytes| *p < q && *bytes > 0);
        self.stored = Some(stored);
        self.keep_own_sizes();
    }

    /// Merges a gossiped table of stored sizes, then keeps it to the nodes that can be
    /// replicas and puts this node's own figures back on top.
    fn merge_sizes(&mut self, other: &StoredSizes) {
        if self.identity_taken {
            return;
        }
        self.sizes.merge(other);
        self.keep_own_sizes();
    }

    /// Drops the entries of nodes that neither hold a place in the ring in force nor are live
    /// members (the table stays as bounded as the member list), and makes this node's entry its
    /// current figures under a number above any copy held.
    fn keep_own_sizes(&mut self) {
        let state = &self.state;
        self.sizes.retain(|id| {
            state.ring.members().contains(&id)
                || state
                    .members
                    .get(&id)
                    .is_some_and(|m| m.status != Status::Removed)
        });
        if let Some(stored) = &self.stored {
            self.sizes.publish(self.cfg.node, stored);
        }
    }

    /// Answers go back on the connection the request came on: the shell matches them by id, so
    /// `to` only matters when the sender is known.
    fn reply_to(&mut self, from: Option<NodeId>, msg: MembershipMsg) {
        self.out.push(MembershipOutput::Send {
            to: from.unwrap_or(self.cfg.node),
            msg,
        });
    }

    /// A partition of the pending ring of `epoch` received by one of this node's shards.
    pub fn transfer_done(
        &mut self,
        _now: u64,
        epoch: u64,
        partition: u32,
    ) -> Vec<MembershipOutput> {
        let node = self.cfg.node;
        let report = self.state.reports.entry(node).or_default();
        if report.epoch < epoch {
            *report = Report {
                epoch,
                done: BTreeSet::new(),
            };
        }
        if report.epoch == epoch && report.done.insert(partition) {
            self.changed();
        }
        self.maybe_flip();
        self.take()
    }

    /// Copies the pending ring needs: `(partition, receiver)` for every node that joins the
    /// partition's preference list and is not Removed.
    pub fn required_transfers(&self) -> Vec<(u32, NodeId)> {
        let Some(pending) = &self.state.pending else {
            return Vec::new();
        };
        required(&self.state, &self.state.ring, pending, self.cfg.target_n)
    }

    fn maybe_flip(&mut self) {
        if self.state.claimant() != Some(self.cfg.node) {
            return;
        }
        let Some(pending) = self.state.pending.clone() else {
            return;
        };
        let epoch = self.state.epoch;
        let complete = self.required_transfers().iter().all(|(p, node)| {
            self.state
                .reports
                .get(node)
                .is_some_and(|r| r.epoch == epoch && r.done.contains(p))
        });
        if !complete {
            return;
        }
        self.state.ring = pending;
        self.state.pending = None;
        self.state.epoch += 1;
        self.state.author = self.cfg.node;
        let gone: Vec<NodeId> = self
            .state
            .members
            .values()
            .filter(|m| m.status == Status::Leaving && !self.state.ring.members().contains(&m.id))
            .map(|m| m.id)
            .collect();
        for id in gone {
            if let Some(m) = self.state.members.get_mut(&id) {
                m.status = Status::Removed;
                m.version += 1;
            }
        }
        self.changed();
    }

    /// An operator command; the answer comes as [`MembershipOutput::AdminReply`] with `req`.
    /// `reach` is the node's failure detector's view of a member, which `status` shows
    /// ([`Reach`]); the other commands do not look at it.
    pub fn admin(
        &mut self,
        now: u64,
        req: u64,
        cmd: AdminCmd,
        reach: &dyn Fn(NodeId) -> Reach,
    ) -> Vec<MembershipOutput> {
        let result = match cmd {
            AdminCmd::Join { seed } => {
                if self.state.members.len() > 1 {
                    Err(format!(
                        "{} is already in a cluster of {} members; only a fresh node joins",
                        self.cfg.node,
                        self.state.members.len()
                    ))
                } else {
                    let id = self.request(now, Some(req));
                    let member = self.state.members.get(&self.cfg.node).cloned();
                    if let Some(member) = member {
                        self.out.push(MembershipOutput::SendAddr {
                            addr: seed,
                            msg: MembershipMsg::Join { id, member },
                        });
                    }
                    return self.take();
                }
            }
            AdminCmd::Leave => self.leave(),
            AdminCmd::Remove { node } => self.remove(node),
            AdminCmd::Plan => Ok(self.plan_text()),
            AdminCmd::Commit => match self.state.claimant() {
                Some(c) if c == self.cfg.node => self.commit_here(),
                Some(c) => {
                    let id = self.request(now, Some(req));
                    self.out.push(MembershipOutput::Send {
                        to: c,
                        msg: MembershipMsg::Commit { id },
                    });
                    return self.take();
                }
                None => Err("no valid member to act as claimant".into()),
            },
            AdminCmd::Status => Ok(self.status_text(reach)),
        };
        self.out.push(MembershipOutput::AdminReply {
            req,
            result: result.map_err(AdminError::Refused),
        });
        self.take()
    }

    fn leave(&mut self) -> Result<String, String> {
        let me = self.cfg.node;
        let valid_others = self
            .state
            .members
            .values()
            .filter(|m| m.id != me && matches!(m.status, Status::Valid | Status::Joining))
            .count();
        if valid_others == 0 {
            return Err("the last member cannot leave".into());
        }
        match self.state.members.get(&me).map(|m| m.status) {
            Some(Status::Valid | Status::Joining) => {
                self.update_self(|m| m.status = Status::Leaving);
                Ok(format!(
                    "{me} is staged to leave; run `ringkv cluster plan` and `ringkv cluster commit`"
                ))
            }
            Some(s) => Err(format!("{me} is already {}", s.name())),
            None => Err(format!("{me} is not a member")),
        }
    }

    fn remove(&mut self, node: NodeId) -> Result<String, String> {
        if node == self.cfg.node {
            return Err("a node does not remove itself: use `ringkv cluster leave`".into());
        }
        let others = self
            .state
            .members
            .values()
            .filter(|m| m.id != node && matches!(m.status, Status::Valid | Status::Joining))
            .count();
        match self.state.members.get_mut(&node) {
            None => Err(format!("{node} is not a member")),
            Some(m) if m.status == Status::Removed => Err(format!("{node} is already removed")),
            Some(_) if others == 0 => Err("removing it would leave no member".into()),
            Some(m) => {
                m.status = Status::Removed;
                m.version += 1;
                self.changed();
                Ok(format!(
                    "{node} is staged for removal (its replicas are rebuilt from the others); \
                     run `ringkv cluster plan` and `ringkv cluster commit`"
                ))
            }
        }
    }

    /// The ring a commit would make pending, if anything is staged.
    fn next_ring(&self) -> Result<Option<Ring>, String> {
        if !self.state.staged() {
            return Ok(None);
        }
        let members = self.state.next_members();
        if members.is_empty() {
            return Err("no member would be left".into());
        }
        self.state
            .ring
            .claim(&members, self.cfg.target_n)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn commit_here(&mut self) -> Result<String, String> {
        if self.state.claimant() != Some(self.cfg.node) {
            return Err(format!(
                "{} is not the claimant ({})",
                self.cfg.node,
                self.state
                    .claimant()
                    .map_or("none".to_string(), |c| c.to_string())
            ));
        }
        if self.state.pending.is_some() {
            let left = self.progress().left;
            return Err(format!(
                "a change is still in progress ({left} transfers left); commit again once it is done"
            ));
        }
        let Some(next) = self.next_ring()? else {
            return Err("nothing is staged".into());
        };
        let moves = self.state.ring.transfers(&next).len();
        self.state.pending = Some(next);
        self.state.epoch += 1;
        self.state.author = self.cfg.node;
        for m in self.state.members.values_mut() {
            if m.status == Status::Joining {
                m.status = Status::Valid;
                m.version += 1;
            }
        }
        let required = self.required_transfers();
        let bytes = self.copy_bytes(&required);
        self.changed();
        self.maybe_flip();
        Ok(format!(
            "committed: {moves} partitions change owner, {} replica copies to transfer ({})",
            required.len(),
            bytes.about()
        ))
    }

    /// The bytes of the copies `(partition, receiver)`: per copy, the size of its partition
    /// that its replicas in the ring in force (the copy's sources) reported.
    fn copy_bytes(&self, copies: &[(u32, NodeId)]) -> ByteSum {
        let mut sum = ByteSum::default();
        for (p, _) in copies {
            let sources = self
                .state
                .ring
                .preference_list(PartitionId(*p), self.cfg.target_n);
            sum.add(self.sizes.partition_bytes(*p, &sources));
        }
        sum
    }

    /// How far the pending ring's transfers are (all zero when no ring is pending).
    fn progress(&self) -> Progress {
        let epoch = self.state.epoch;
        let required = self.required_transfers();
        let left: Vec<(u32, NodeId)> = required
            .iter()
            .filter(|(p, n)| {
                !self
                    .state
                    .reports
                    .get(n)
                    .is_some_and(|r| r.epoch == epoch && r.done.contains(p))
            })
            .copied()
            .collect();
        let progress = Progress {
            left: left.len(),
            total: required.len(),
            left_bytes: self.copy_bytes(&left),
            total_bytes: self.copy_bytes(&required),
        };
        assert!(progress.left <= progress.total);
        progress
    }

    /// What `cluster plan` prints.
    pub fn plan_text(&self) -> String {
        let mut s = String::new();
        if self.state.pending.is_some() {
            let p = self.progress();
            let _ = writeln!(
                s,
                "a change is in progress: {} of {} transfers left ({})",
                p.left,
                p.total,
                p.left_bytes.about_of(&p.total_bytes)
            );
            return s;
        }
        let next = match self.next_ring() {
            Ok(Some(next)) => next,
            Ok(None) => return "nothing is staged\n".into(),
            Err(e) => return format!("the staged changes cannot be applied: {e}\n"),
        };
        for m in self.state.members.values() {
            let change = match m.status {
                Status::Joining => "join",
                Status::Leaving => "leave",
                Status::Removed if self.state.ring.members().contains(&m.id) => "remove",
                _ => continue,
            };
            let _ = writeln!(s, "{change:<7} {}", m.id);
        }
        let q = f64::from(next.partition_count().get());
        let before = self.state.ring.ownership_counts();
        let after = next.ownership_counts();
        let ids: BTreeSet<NodeId> = before.keys().chain(after.keys()).copied().collect();
        let _ = writeln!(s, "ownership:");
        for id in ids {
            let b = before.get(&id).copied().unwrap_or(0) as f64;
            let a = after.get(&id).copied().unwrap_or(0) as f64;
            let _ = writeln!(s, "  {id}: {:.1}% -> {:.1}%", 100.0 * b / q, 100.0 * a / q);
        }
        let moves = self.state.ring.transfers(&next);
        let _ = writeln!(s, "partitions changing owner: {}", moves.len());
        for t in &moves {
            let _ = writeln!(s, "  partition {}: {} -> {}", t.partition.0, t.from, t.to);
        }
        let copies = required(&self.state, &self.state.ring, &next, self.cfg.target_n);
        let _ = writeln!(
            s,
            "replica copies to transfer: {} ({})",
            copies.len(),
            self.copy_bytes(&copies).about()
        );
        s
    }

    /// What `cluster status` prints; `reach` gives the reachability column (module docs of
    /// [`Reach`]).
    pub fn status_text(&self, reach: &dyn Fn(NodeId) -> Reach) -> String {
        let mut s = String::new();
        let q = f64::from(self.state.ring.partition_count().get());
        let own = self.state.ring.ownership_counts();
        let pending_own = self.state.pending.as_ref().map(Ring::ownership_counts);
        let _ = writeln!(
            s,
            "ring epoch {} (ring version {}), claimant {}",
            self.state.epoch,
            self.state.ring.version(),
            self.state
                .claimant()
                .map_or("none".to_string(), |c| c.to_string())
        );
        let _ = writeln!(
            s,
            "{:<10} {:<8} {:>8} {:>8} {:<22} {:<22} reachability",
            "node", "status", "owns", "pending", "peer", "client"
        );
        for m in self.state.members.values() {
            let owns = 100.0 * own.get(&m.id).copied().unwrap_or(0) as f64 / q;
            let pending = pending_own.as_ref().map_or("-".to_string(), |p| {
                format!(
                    "{:.1}%",
                    100.0 * p.get(&m.id).copied().unwrap_or(0) as f64 / q
                )
            });
            let reach = if m.id == self.cfg.node {
                "self"
            } else if m.status == Status::Removed {
                "-"
            } else {
                reach(m.id).name()
            };
            let _ = writeln!(
                s,
                "{:<10} {:<8} {:>7.1}% {:>8} {:<22} {:<22} {reach}",
                m.id.to_string(),
                m.status.name(),
                owns,
                pending,
                m.peer_addr,
                m.client_addr
            );
        }
        if self.state.pending.is_some() {
            let p = self.progress();
            let _ = writeln!(
                s,
                "pending transfers: {} of {} left ({})",
                p.left,
                p.total,
                p.left_bytes.about_of(&p.total_bytes)
            );
        } else {
            let _ = writeln!(s, "pending transfers: none");
        }
        s
    }
}

/// The transfers of a pending ring: copies left and in all, in number and in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Progress {
    left: usize,
    total: usize,
    left_bytes: ByteSum,
    total_bytes: ByteSum,
}

/// `(partition, receiver)` pairs going from `ring` to `next` for `n` replicas (module docs).
fn required(state: &ClusterState, ring: &Ring, next: &Ring, n: usize) -> Vec<(u32, NodeId)> {
    let mut out = Vec::new();
    for p in 0..ring.partition_count().get() {
        let before = ring.preference_list(PartitionId(p), n);
        for node in next.preference_list(PartitionId(p), n) {
            let removed = state
                .members
                .get(&node)
                .is_none_or(|m| m.status == Status::Removed);
            if !before.contains(&node) && !removed {
                out.push((p, node));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{apply, damage};

    /// The failure detector of these tests: every member up (membership does not look at it
    /// but for `status`).
    fn up(_: NodeId) -> Reach {
        Reach::Up
    }

    /// Where the node keeps hints in its engine: no ring partition.
    const HINT_PARTITION: u32 = 1 << 31;

    fn cfg(node: u32) -> MembershipConfig {
        MembershipConfig {
            node: NodeId(node),
            peer_addr: format!("127.0.0.1:{}", 7000 + node),
            client_addr: format!("127.0.0.1:{}", 6000 + node),
            gossip_ms: 1000,
            request_timeout_ms: 500,
            target_n: 3,
            partitions: PartitionCount::new(64).unwrap(),
            incarnation: u64::from(node) + 100,
            fresh: false,
            contact_seeds: Vec::new(),
        }
    }

    fn seeds(ids: &[u32]) -> Vec<(NodeId, String)> {
        ids.iter()
            .map(|i| (NodeId(*i), format!("127.0.0.1:{}", 7000 + i)))
            .collect()
    }

    /// Delivers every Send between the nodes until nothing is left (no loss).
    fn pump(
        nodes: &mut BTreeMap<NodeId, Membership>,
        now: u64,
        mut queue: Vec<(NodeId, MembershipOutput)>,
    ) {
        let mut admin = Vec::new();
        while let Some((from, out)) = queue.pop() {
            match out {
                MembershipOutput::Send { to, msg } => {
                    if let Some(n) = nodes.get_mut(&to) {
                        for o in n.handle_msg(now, Some(from), msg) {
                            queue.push((to, o));
                        }
                    }
                }
                MembershipOutput::SendAddr { addr, msg } => {
                    let to = nodes
                        .values()
                        .find(|n| n.cfg.peer_addr == addr)
                        .map(|n| n.cfg.node)
                        .unwrap();
                    for o in nodes.get_mut(&to).unwrap().handle_msg(now, None, msg) {
                        // The answer goes back to the joiner on its connection.
                        let o = match o {
                            MembershipOutput::Send { msg, .. } if msg.is_answer() => {
                                MembershipOutput::Send { to: from, msg }
                            }
                            o => o,
                        };
                        queue.push((to, o));
                    }
                }
                MembershipOutput::AdminReply { result, .. } => admin.push(result),
                _ => {}
            }
        }
        for r in admin {
            assert!(r.is_ok(), "{r:?}");
        }
    }

    fn gossip_rounds(nodes: &mut BTreeMap<NodeId, Membership>, now: u64, rounds: u64) {
        for r in 0..rounds {
            let ids: Vec<NodeId> = nodes.keys().copied().collect();
            for (i, id) in ids.iter().enumerate() {
                let out = nodes
                    .get_mut(id)
                    .unwrap()
                    .handle_tick(now + r * 1000, r * 7 + i as u64);
                pump(nodes, now, out.into_iter().map(|o| (*id, o)).collect());
            }
        }
    }

    /// The merge is order-independent: two nodes that saw the same changes agree.
    #[test]
    fn merge_commutes_and_is_idempotent() {
        let mut a = Membership::bootstrap(cfg(1), &seeds(&[1, 2, 3])).unwrap();
        let mut b = Membership::bootstrap(cfg(2), &seeds(&[1, 2, 3])).unwrap();
        a.admin(0, 1, AdminCmd::Remove { node: NodeId(3) }, &up);
        b.admin(0, 1, AdminCmd::Leave, &up);
        let (sa, sb) = (a.state.clone(), b.state.clone());
        let mut ab = sa.clone();
        ab.merge(&sb);
        let mut ba = sb.clone();
        ba.merge(&sa);
        assert_eq!(ab, ba);
        let again = ab.clone();
        assert!(!ab.merge(&again));
        assert_eq!(ab.members[&NodeId(3)].status, Status::Removed);
        assert_eq!(ab.members[&NodeId(2)].status, Status::Leaving);
    }

    /// State survives its encoding (stored sizes are not part of it), and garbage is an error,
    /// not a panic.
    #[test]
    fn state_round_trips() {
        let mut a = Membership::bootstrap(cfg(1), &seeds(&[1, 2, 3])).unwrap();
        a.admin(0, 1, AdminCmd::Remove { node: NodeId(3) }, &up);
        a.admin(0, 2, AdminCmd::Commit, &up);
        a.transfer_done(0, a.state.epoch, 5);
        a.handle_stored(0, [(3, 4096), (9, 1)].into_iter().collect());
        let bytes = a.persisted();
        let b = Membership::restore(cfg(1), &bytes).unwrap();
        assert_eq!(b.state, a.state);
        assert!(b.sizes.is_empty(), "stored sizes are not persisted");
        assert!(matches!(
            Membership::restore(cfg(2), &bytes),
            Err(MembershipError::WrongNode { .. })
        ));
        for cut in 0..bytes.len() {
            assert!(Membership::restore(cfg(1), &bytes[..cut]).is_err());
        }
        for (sub, payload) in [
            MembershipMsg::Gossip {
                id: 1,
                state: Box::new(a.state.clone()),
            }
            .encode(),
            MembershipMsg::Outcome {
                id: 1,
                result: Err("x".into()),
            }
            .encode(),
            MembershipMsg::SizesOk {
                id: 1,
                sizes: Box::new(a.sizes.clone()),
            }
            .encode(),
        ] {
            let answer = matches!(sub, sub::OUTCOME | sub::SIZES);
            assert!(
                MembershipMsg::decode(1, sub, answer, &payload)
                    .unwrap()
                    .is_some()
            );
        }
    }

    /// Fresh nodes given each other's addresses as plain seeds form one cluster by themselves:
    /// each asks a seed to let it join; when two ask each other, the one with the lower
    /// incarnation takes the other in, so no node ends up in two clusters. Then a commit gives
    /// them the ring.
    #[test]
    fn fresh_nodes_with_plain_seeds_join_one_cluster() {
        let mut nodes = BTreeMap::new();
        for i in 1..=3u32 {
            let mut c = cfg(i);
            c.contact_seeds = (1..=3u32)
                .filter(|j| *j != i)
                .rev()
                .map(|j| format!("127.0.0.1:{}", 7000 + j))
                .collect();
            nodes.insert(NodeId(i), Membership::bootstrap(c, &[]).unwrap());
        }
        for round in 0..6u64 {
            let now = round * 1000;
            let ids: Vec<NodeId> = nodes.keys().copied().collect();
            for id in ids {
                let out = nodes.get_mut(&id).unwrap().handle_tick(now, round);
                pump(&mut nodes, now, out.into_iter().map(|o| (id, o)).collect());
            }
        }
        let states: Vec<&ClusterState> = nodes.values().map(|n| &n.state).collect();
        for s in &states {
            assert_eq!(s.members.len(), 3, "{s:?}");
            assert_eq!(*s, states[0]);
        }
        assert!(nodes.values().all(|n| n.auto_join.is_none()));
        let out = nodes
            .get_mut(&NodeId(1))
            .unwrap()
            .admin(7_000, 1, AdminCmd::Commit, &up);
        pump(
            &mut nodes,
            7_000,
            out.into_iter().map(|o| (NodeId(1), o)).collect(),
        );
        // The commit went to the claimant (whichever node took the others in); gossip spreads it.
        gossip_rounds(&mut nodes, 8_000, 6);
        for n in nodes.values() {
            let state = &n.state;
            let next = state.pending.as_ref().unwrap_or(&state.ring);
            assert_eq!(next.members().len(), 3, "{state:?}");
            assert!(state.members.values().all(|m| m.status == Status::Valid));
        }
    }

    /// A node that lost its data comes back under its old id with a new incarnation: a join
    /// under that id is refused while the old entry stands, and a fresh node that learns from
    /// gossip that its id belongs to another incarnation reports it once and merges nothing; a
    /// node holding its id's data outranks such a claim instead of adopting it.
    #[test]
    fn an_id_from_another_incarnation_is_refused() {
        let mut nodes = BTreeMap::new();
        for i in 1..=3 {
            nodes.insert(
                NodeId(i),
                Membership::bootstrap(cfg(i), &seeds(&[1, 2, 3])).unwrap(),
            );
        }
        gossip_rounds(&mut nodes, 0, 3);
        let known = nodes[&NodeId(1)].state.members[&NodeId(3)].incarnation;
        assert_eq!(known, 103, "gossip spread node-3's incarnation");

        // Node 3's data is wiped and it is started again as node-3, alone, then joined.
        let wiped_cfg = MembershipConfig {
            incarnation: 999,
            fresh: true,
            ..cfg(3)
        };
        let mut wiped = Membership::bootstrap(wiped_cfg.clone(), &[]).unwrap();
        let out = wiped.admin(
            10_000,
            1,
            AdminCmd::Join {
                seed: "127.0.0.1:7001".into(),
            },
            &up,
        );
        let join = out
            .into_iter()
            .find_map(|o| match o {
                MembershipOutput::SendAddr { msg, .. } => Some(msg),
                _ => None,
            })
            .unwrap();
        let answer = nodes
            .get_mut(&NodeId(1))
            .unwrap()
            .handle_msg(10_000, None, join);
        assert!(
            answer.iter().any(|o| matches!(
                o,
                MembershipOutput::Send {
                    msg: MembershipMsg::Outcome { result: Err(e), .. },
                    ..
                } if e.contains("another data directory")
            )),
            "{answer:?}"
        );

        // Started with the old seeds instead: the first gossip tells it its id is taken.
        let mut seeded = Membership::bootstrap(wiped_cfg, &seeds(&[1, 2, 3])).unwrap();
        let state = Box::new(nodes[&NodeId(1)].state.clone());
        let out = seeded.handle_msg(
            11_000,
            Some(NodeId(1)),
            MembershipMsg::Gossip { id: 1, state },
        );
        let taken = out
            .iter()
            .filter(|o| matches!(o, MembershipOutput::IdentityTaken(_)))
            .count();
        assert_eq!(taken, 1, "{out:?}");
        assert_eq!(seeded.state.members[&NodeId(3)].incarnation, 999);
        let state = Box::new(nodes[&NodeId(2)].state.clone());
        let again = seeded.handle_msg(
            12_000,
            Some(NodeId(2)),
            MembershipMsg::Gossip { id: 2, state },
        );
        assert!(
            !again
                .iter()
                .any(|o| matches!(o, MembershipOutput::IdentityTaken(_)))
        );

        // The real node-3 hears the impostor's state and keeps its own entry, outranking it.
        let claim = Box::new(seeded.state.clone());
        let real = nodes.get_mut(&NodeId(3)).unwrap();
        let out = real.handle_msg(
            13_000,
            None,
            MembershipMsg::Gossip {
                id: 3,
                state: claim.clone(),
            },
        );
        assert!(
            !out.iter()
                .any(|o| matches!(o, MembershipOutput::IdentityTaken(_)))
        );
        let mine = &real.state.members[&NodeId(3)];
        assert_eq!(mine.incarnation, 103);
        assert!(mine.rank() > claim.members[&NodeId(3)].rank());
    }

    /// Join, commit, transfers reported, flip; then a leave the same way.
    #[test]
    fn join_then_leave() {
        let mut nodes = BTreeMap::new();
        for i in 1..=3 {
            nodes.insert(
                NodeId(i),
                Membership::bootstrap(cfg(i), &seeds(&[1, 2, 3])).unwrap(),
            );
        }
        nodes.insert(NodeId(4), Membership::bootstrap(cfg(4), &[]).unwrap());
        gossip_rounds(&mut nodes, 0, 3);
        let out = nodes.get_mut(&NodeId(4)).unwrap().admin(
            10_000,
            1,
            AdminCmd::Join {
                seed: "127.0.0.1:7002".into(),
            },
            &up,
        );
        pump(
            &mut nodes,
            10_000,
            out.into_iter().map(|o| (NodeId(4), o)).collect(),
        );
        assert_eq!(nodes[&NodeId(4)].state.members.len(), 4);
        gossip_rounds(&mut nodes, 11_000, 6);
        // Commit from a node that is not the claimant: it goes to node 1.
        let out = nodes
            .get_mut(&NodeId(3))
            .unwrap()
            .admin(20_000, 2, AdminCmd::Commit, &up);
        pump(
            &mut nodes,
            20_000,
            out.into_iter().map(|o| (NodeId(3), o)).collect(),
        );
        gossip_rounds(&mut nodes, 21_000, 6);
        let required = nodes[&NodeId(1)].required_transfers();
        assert!(!required.is_empty());
        assert!(required.iter().all(|(_, n)| *n == NodeId(4)));
        // A second commit is refused while the change is in progress.
        let out = nodes
            .get_mut(&NodeId(1))
            .unwrap()
            .admin(22_000, 3, AdminCmd::Commit, &up);
        assert!(matches!(
            &out[..],
            [MembershipOutput::AdminReply { result: Err(_), .. }]
        ));
        let epoch = nodes[&NodeId(4)].state.epoch;
        for (p, _) in &required {
            nodes
                .get_mut(&NodeId(4))
                .unwrap()
                .transfer_done(23_000, epoch, *p);
        }
        gossip_rounds(&mut nodes, 24_000, 8);
        for n in nodes.values() {
            assert!(n.state.pending.is_none());
            assert!(n.state.ring.members().contains(&NodeId(4)));
            assert_eq!(n.state, nodes[&NodeId(1)].state);
        }
        // Node 2 leaves.
        let out = nodes
            .get_mut(&NodeId(2))
            .unwrap()
            .admin(40_000, 4, AdminCmd::Leave, &up);
        pump(
            &mut nodes,
            40_000,
            out.into_iter().map(|o| (NodeId(2), o)).collect(),
        );
        gossip_rounds(&mut nodes, 41_000, 6);
        let out = nodes
            .get_mut(&NodeId(1))
            .unwrap()
            .admin(50_000, 5, AdminCmd::Commit, &up);
        pump(
            &mut nodes,
            50_000,
            out.into_iter().map(|o| (NodeId(1), o)).collect(),
        );
        gossip_rounds(&mut nodes, 51_000, 6);
        let required = nodes[&NodeId(1)].required_transfers();
        assert!(!required.is_empty());
        let epoch = nodes[&NodeId(1)].state.epoch;
        for (p, n) in &required {
            assert_ne!(*n, NodeId(2));
            nodes.get_mut(n).unwrap().transfer_done(52_000, epoch, *p);
        }
        assert!(!nodes[&NodeId(2)].retired());
        gossip_rounds(&mut nodes, 53_000, 8);
        for n in nodes.values() {
            assert!(n.state.pending.is_none());
            assert!(!n.state.ring.members().contains(&NodeId(2)));
            assert_eq!(n.state.members[&NodeId(2)].status, Status::Removed);
        }
        // The leaver learns it is out and, once a member answered its gossip, may stop (when it
        // holds nothing); no one else may.
        gossip_rounds(&mut nodes, 61_000, 2);
        assert!(nodes[&NodeId(2)].retired());
        assert!(nodes.values().filter(|n| n.retired()).count() == 1);
    }

    /// A claimant that leaves writes the flip that takes it out; it may stop only once a live
    /// member answered a gossip carrying that flip, so the others never wait for it.
    #[test]
    fn a_leaving_claimant_retires_only_once_its_flip_has_spread() {
        let ids = [1, 2, 3, 4];
        let mut nodes: BTreeMap<NodeId, Membership> = ids
            .iter()
            .map(|&i| {
                (
                    NodeId(i),
                    Membership::bootstrap(cfg(i), &seeds(&ids)).unwrap(),
                )
            })
            .collect();
        let out = nodes
            .get_mut(&NodeId(1))
            .unwrap()
            .admin(1_000, 1, AdminCmd::Leave, &up);
        pump(
            &mut nodes,
            1_000,
            out.into_iter().map(|o| (NodeId(1), o)).collect(),
        );
        let out = nodes
            .get_mut(&NodeId(1))
            .unwrap()
            .admin(2_000, 2, AdminCmd::Commit, &up);
        pump(
            &mut nodes,
            2_000,
            out.into_iter().map(|o| (NodeId(1), o)).collect(),
        );
        gossip_rounds(&mut nodes, 3_000, 4);
        assert_eq!(nodes[&NodeId(1)].state.claimant(), Some(NodeId(1)));
        let required = nodes[&NodeId(1)].required_transfers();
        assert!(!required.is_empty());
        let epoch = nodes[&NodeId(1)].state.epoch;
        for (p, n) in &required {
            nodes.get_mut(n).unwrap().transfer_done(10_000, epoch, *p);
        }
        // Reports reach the claimant, which flips: only it knows.
        for id in [2, 3, 4] {
            let state = nodes[&NodeId(id)].state.clone();
            nodes.get_mut(&NodeId(1)).unwrap().merge(&state);
        }
        let _ = nodes.get_mut(&NodeId(1)).unwrap().handle_tick(11_000, 0);
        let leaver = &nodes[&NodeId(1)];
        assert!(leaver.out_of_cluster());
        assert!(!leaver.retired(), "nobody else knows of the flip yet");
        assert!(nodes[&NodeId(2)].state.pending.is_some());
        gossip_rounds(&mut nodes, 20_000, 1);
        assert!(nodes[&NodeId(1)].retired());
        assert!(
            nodes
                .values()
                .filter(|n| n.cfg.node != NodeId(1))
                .any(|n| n.state.pending.is_none()),
            "a member merged the flip before the leaver may stop"
        );
    }

    /// `status` shows the reachability the failure detector gives for every other member
    /// that is not removed, and nothing of its own: the node itself is `self` whatever the
    /// detector says.
    #[test]
    fn status_shows_the_failure_detectors_view() {
        let mut nodes = members_and_a_joiner(3);
        let detector = |n: NodeId| match n.0 {
            1 => Reach::Suspected,
            2 => Reach::Up,
            3 => Reach::Suspected,
            _ => Reach::Unwatched,
        };
        let out = nodes
            .get_mut(&NodeId(3))
            .unwrap()
            .admin(30_000, 9, AdminCmd::Status, &detector);
        let [MembershipOutput::AdminReply { result, .. }] = out.as_slice() else {
            panic!("{out:?}");
        };
        let status = result.clone().unwrap();
        assert!(line(&status, "node ").ends_with("reachability"), "{status}");
        assert!(line(&status, "node-1 ").ends_with(" suspected"), "{status}");
        assert!(line(&status, "node-2 ").ends_with(" up"), "{status}");
        assert!(line(&status, "node-3 ").ends_with(" self"), "{status}");
        assert!(line(&status, "node-4 ").ends_with(" unwatched"), "{status}");
    }

    /// Nodes 1 to `count` in a cluster, and node `count + 1` joined to it (not committed).
    fn members_and_a_joiner(count: u32) -> BTreeMap<NodeId, Membership> {
        let ids: Vec<u32> = (1..=count).collect();
        let mut nodes = BTreeMap::new();
        for &i in &ids {
            nodes.insert(
                NodeId(i),
                Membership::bootstrap(cfg(i), &seeds(&ids)).unwrap(),
            );
        }
        let joiner = count + 1;
        nodes.insert(
            NodeId(joiner),
            Membership::bootstrap(cfg(joiner), &[]).unwrap(),
        );
        gossip_rounds(&mut nodes, 0, 3);
        let out = nodes.get_mut(&NodeId(joiner)).unwrap().admin(
            10_000,
            1,
            AdminCmd::Join {
                seed: "127.0.0.1:7001".into(),
            },
            &up,
        );
        pump(
            &mut nodes,
            10_000,
            out.into_iter().map(|o| (NodeId(joiner), o)).collect(),
        );
        gossip_rounds(&mut nodes, 11_000, 8);
        nodes
    }

    /// The text of a successful admin command on `node`.
    fn admin_text(nodes: &mut BTreeMap<NodeId, Membership>, node: u32, cmd: AdminCmd) -> String {
        let out = nodes
            .get_mut(&NodeId(node))
            .unwrap()
            .admin(30_000, 9, cmd, &up);
        let mut text = None;
        let mut queue = Vec::new();
        for o in out {
            match o {
                MembershipOutput::AdminReply { result, .. } => text = Some(result.unwrap()),
                o => queue.push((NodeId(node), o)),
            }
        }
        pump(nodes, 30_000, queue);
        text.unwrap()
    }

    /// The line of `text` that starts with `prefix`.
    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {text}"))
    }

    /// Bytes each of the three first nodes reports for partition `p`: nodes 1 and 2 the full
    /// size, node 3 less (a replica that missed writes), so the largest report is the full one.
    fn reported(node: u32, p: u32) -> u64 {
        let full = 1024 * u64::from(p + 1);
        if node == 3 { full / 2 } else { full }
    }

    /// The plan, a commit and the status give the bytes of the copies to move: per copy the
    /// largest size the partition's current replicas reported. The joiner's own figures (it is
    /// no source), partitions past the ring (hints) and nodes that reported nothing do not
    /// count; before any report the size is unknown, never 0 bytes. Transfers reported lower
    /// the bytes left until the flip.
    #[test]
    fn plan_and_status_show_the_bytes_to_move() {
        let mut nodes = members_and_a_joiner(3);
        let plan = admin_text(&mut nodes, 2, AdminCmd::Plan);
        assert!(
            line(&plan, "replica copies to transfer:").ends_with("(size unknown)"),
            "{plan}"
        );

        let q = 64u32;
        for id in 1..=3u32 {
            let mut stored: BTreeMap<u32, u64> = (0..q).map(|p| (p, reported(id, p))).collect();
            stored.insert(HINT_PARTITION | 5, 1 << 40);
            nodes
                .get_mut(&NodeId(id))
                .unwrap()
                .handle_stored(20_000, stored);
        }
        let joiner: BTreeMap<u32, u64> = (0..q).map(|p| (p, 1 << 40)).collect();
        nodes
            .get_mut(&NodeId(4))
            .unwrap()
            .handle_stored(20_000, joiner);
        gossip_rounds(&mut nodes, 21_000, 6);
        for n in nodes.values() {
            assert_eq!(n.sizes, nodes[&NodeId(1)].sizes, "the table spread");
            let one = n.sizes.get(NodeId(1)).unwrap();
            assert_eq!(one.bytes.len(), q as usize, "hint partitions left out");
        }

        // With three nodes and n = 3 every node is a current replica of every partition, so
        // each copy's size is the full one nodes 1 and 2 reported.
        let copies = {
            let n1 = &nodes[&NodeId(1)];
            let next = n1.next_ring().unwrap().unwrap();
            required(&n1.state, &n1.state.ring, &next, 3)
        };
        assert!(!copies.is_empty());
        assert!(copies.iter().all(|(_, to)| *to == NodeId(4)));
        let bytes_of =
            |copies: &[(u32, NodeId)]| -> u64 { copies.iter().map(|(p, _)| reported(1, *p)).sum() };
        let total = bytes_of(&copies);
        let plan = admin_text(&mut nodes, 2, AdminCmd::Plan);
        assert_eq!(
            line(&plan, "replica copies to transfer:"),
            format!(
                "replica copies to transfer: {} (about {})",
                copies.len(),
                human_bytes(total)
            ),
            "{plan}"
        );

        let committed = admin_text(&mut nodes, 1, AdminCmd::Commit);
        assert!(
            committed.ends_with(&format!(
                "{} replica copies to transfer (about {})",
                copies.len(),
                human_bytes(total)
            )),
            "{committed}"
        );
        gossip_rounds(&mut nodes, 31_000, 6);
        let status = admin_text(&mut nodes, 3, AdminCmd::Status);
        assert_eq!(
            line(&status, "pending transfers:"),
            format!(
                "pending transfers: {0} of {0} left (about {1} of {1})",
                copies.len(),
                human_bytes(total)
            ),
            "{status}"
        );

        // Half the copies arrive.
        let epoch = nodes[&NodeId(4)].state.epoch;
        let (done, left) = copies.split_at(copies.len() / 2);
        for (p, _) in done {
            nodes
                .get_mut(&NodeId(4))
                .unwrap()
                .transfer_done(32_000, epoch, *p);
        }
        gossip_rounds(&mut nodes, 33_000, 6);
        let status = admin_text(&mut nodes, 2, AdminCmd::Status);
        assert_eq!(
            line(&status, "pending transfers:"),
            format!(
                "pending transfers: {} of {} left (about {} of {})",
                left.len(),
                copies.len(),
                human_bytes(bytes_of(left)),
                human_bytes(total)
            ),
            "{status}"
        );
        let plan = admin_text(&mut nodes, 2, AdminCmd::Plan);
        assert!(
            plan.starts_with(&format!(
                "a change is in progress: {} of {} transfers left (about {} of {})",
                left.len(),
                copies.len(),
                human_bytes(bytes_of(left)),
                human_bytes(total)
            )),
            "{plan}"
        );

        for (p, _) in left {
            nodes
                .get_mut(&NodeId(4))
                .unwrap()
                .transfer_done(34_000, epoch, *p);
        }
        gossip_rounds(&mut nodes, 35_000, 8);
        let status = admin_text(&mut nodes, 2, AdminCmd::Status);
        assert_eq!(
            line(&status, "pending transfers:"),
            "pending transfers: none"
        );
    }

    /// Copies whose current replicas have not reported (nodes of an earlier version never do)
    /// are counted apart, as unknown, never as 0 bytes: with five nodes and n = 3 only the
    /// copies of partitions node 1 replicates have a known size when only node 1 reports.
    #[test]
    fn copies_without_a_report_are_of_unknown_size() {
        let mut nodes = members_and_a_joiner(5);
        let plan = admin_text(&mut nodes, 2, AdminCmd::Plan);
        assert!(
            line(&plan, "replica copies to transfer:").ends_with("(size unknown)"),
            "{plan}"
        );
        nodes
            .get_mut(&NodeId(1))
            .unwrap()
            .handle_stored(20_000, (0..64).map(|p| (p, 4096)).collect());
        gossip_rounds(&mut nodes, 21_000, 8);

        let n1 = &nodes[&NodeId(1)];
        let next = n1.next_ring().unwrap().unwrap();
        let copies = required(&n1.state, &n1.state.ring, &next, 3);
        let known = copies
            .iter()
            .filter(|(p, _)| {
                n1.state
                    .ring
                    .preference_list(PartitionId(*p), 3)
                    .contains(&NodeId(1))
            })
            .count();
        let unknown = copies.len() - known;
        assert!(known > 0 && unknown > 1, "{known} {unknown}");
        let plan = admin_text(&mut nodes, 2, AdminCmd::Plan);
        assert_eq!(
            line(&plan, "replica copies to transfer:"),
            format!(
                "replica copies to transfer: {} (about {}; sizes of {unknown} copies unknown)",
                copies.len(),
                human_bytes(4096 * known as u64)
            ),
            "{plan}"
        );
    }

    /// A restarted node's gossip counters start again, and copies of its previous entry with
    /// higher numbers are still around: its current figures must still win everywhere.
    #[test]
    fn a_restarted_node_s_figures_win_over_its_old_ones() {
        let mut nodes = BTreeMap::new();
        for i in 1..=3 {
            nodes.insert(
                NodeId(i),
                Membership::bootstrap(cfg(i), &seeds(&[1, 2, 3])).unwrap(),
            );
        }
        for (i, bytes) in [100u64, 200, 300].into_iter().enumerate() {
            nodes
                .get_mut(&NodeId(1))
                .unwrap()
                .handle_stored(i as u64, [(0, bytes)].into_iter().collect());
        }
        gossip_rounds(&mut nodes, 1_000, 4);
        assert_eq!(nodes[&NodeId(2)].sizes.get(NodeId(1)).unwrap().seq, 3);

        let persisted = nodes[&NodeId(1)].persisted();
        let mut restarted = Membership::restore(cfg(1), &persisted).unwrap();
        restarted.handle_stored(10_000, [(0, 7)].into_iter().collect());
        assert_eq!(restarted.sizes.get(NodeId(1)).unwrap().seq, 1);
        nodes.insert(NodeId(1), restarted);
        gossip_rounds(&mut nodes, 11_000, 6);
        for n in nodes.values() {
            let entry = n.sizes.get(NodeId(1)).unwrap();
            assert_eq!(entry.bytes, [(0, 7)].into_iter().collect(), "{entry:?}");
            assert!(entry.seq > 3);
        }
    }

    /// Commands parse strictly.
    #[test]
    fn commands_parse() {
        assert_eq!(
            AdminCmd::parse("cluster-remove", " 7 ").unwrap(),
            AdminCmd::Remove { node: NodeId(7) }
        );
        assert!(AdminCmd::parse("cluster-remove", "x").is_err());
        assert!(AdminCmd::parse("cluster-join", "").is_err());
        assert!(AdminCmd::parse("cluster-plan", "extra").is_err());
        assert!(AdminCmd::parse("cluster-dance", "").is_err());
    }

    /// A membership with three members, a committed removal, a transfer report and stored
    /// sizes: its persisted state and its messages reach every part of the decoders.
    fn busy() -> Membership {
        let mut a = Membership::bootstrap(cfg(1), &seeds(&[1, 2, 3])).unwrap();
        a.admin(0, 1, AdminCmd::Remove { node: NodeId(3) }, &up);
        a.admin(0, 2, AdminCmd::Commit, &up);
        a.transfer_done(0, a.state.epoch, 5);
        a.handle_stored(0, [(3, 4096), (9, 1)].into_iter().collect());
        a
    }

    /// A node that asked to join and never got the answer (it was lost, or the node crashed)
    /// still holds the one-node ring it started with, authored by itself. When the cluster's
    /// gossip reaches it (listing it as joining), it takes the cluster's ring; and its own ring,
    /// which outranked the claimant's by `(epoch, author)` with a higher node id, never replaces
    /// the cluster's. Before the rule, every member of the cluster took the joiner's one-node
    /// ring as the ring in force (seed 1968 of the simulator).
    #[test]
    fn a_joiner_without_its_answer_never_imposes_its_own_ring() {
        let seeds: Vec<(NodeId, String)> = (1..=4)
            .map(|i| (NodeId(i), format!("127.0.0.1:{}", 7000 + i)))
            .collect();
        let mut claimant = Membership::bootstrap(cfg(1), &seeds).unwrap();
        let mut seed = Membership::bootstrap(cfg(2), &seeds).unwrap();
        let cluster_ring = seed.state.ring.clone();
        let mut joiner = Membership::bootstrap(cfg(5), &[]).unwrap();
        let own_ring = joiner.state.ring.clone();
        assert_ne!(own_ring, cluster_ring);
        // The JOIN reaches the seed, whose answer is lost.
        let member = joiner.state.members[&NodeId(5)].clone();
        let _ = seed.handle_msg(10, Some(NodeId(5)), MembershipMsg::Join { id: 1, member });
        // The seed's gossip reaches the joiner: it learns it is joining, and takes the ring.
        let gossip = MembershipMsg::Gossip {
            id: 2,
            state: Box::new(seed.state.clone()),
        };
        let _ = joiner.handle_msg(20, Some(NodeId(2)), gossip);
        assert_eq!(joiner.state.members[&NodeId(5)].status, Status::Joining);
        assert_eq!(
            joiner.state.ring, cluster_ring,
            "the joiner kept its own ring"
        );
        // Its own ring, gossiped by a copy that never heard from the cluster, is never taken.
        let mut stale = Membership::bootstrap(cfg(5), &[]).unwrap();
        stale.state.merge(&seed.state);
        stale.state.ring = own_ring.clone();
        stale.state.author = NodeId(5);
        for node in [&mut claimant, &mut seed] {
            let _ = node.handle_msg(
                30,
                Some(NodeId(5)),
                MembershipMsg::Gossip {
                    id: 3,
                    state: Box::new(stale.state.clone()),
                },
            );
            assert_eq!(
                node.state.ring, cluster_ring,
                "{:?} took the joiner's ring",
                node.cfg.node
            );
        }
    }

    /// Found by the `membership_decode` fuzz target (`fuzz/`): a JOIN whose member version is
    /// `u64::MAX` decoded, and handling it overflowed raising the version. Versions and epochs
    /// above `COUNT_MAX` are refused.
    #[test]
    fn a_version_near_overflow_is_refused() {
        let payload = [
            0x00, 0x00, 0x56, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0x07, 0x00, 0x04, 0xcc, 0xcc, 0xcc, 0xcc,
        ];
        assert!(MembershipMsg::decode(7, sub::JOIN, false, &payload).is_err());
        let mut state = Membership::bootstrap(cfg(1), &[]).unwrap().state.clone();
        state.epoch = u64::MAX;
        let mut bytes = Vec::new();
        state.encode(&mut Writer::new(&mut bytes));
        assert!(ClusterState::decode(&mut Reader::new(&bytes)).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Membership messages come from peers: any payload of any sub-kind decodes to a
        /// message, to `None` (not membership's) or to an error, never a panic.
        #[test]
        fn any_payload_decodes_or_fails_cleanly(
            sub in 0u8..12,
            answer in any::<bool>(),
            bytes in prop::collection::vec(any::<u8>(), 0..128),
        ) {
            let _ = MembershipMsg::decode(1, sub, answer, &bytes);
        }

        /// Damaged gossip, outcome and size messages, and a damaged `cluster-state` file,
        /// decode or fail cleanly, never panic.
        #[test]
        fn damaged_messages_and_state_decode_or_fail_cleanly(
            which in 0usize..4,
            damage in prop::collection::vec(damage(), 1..4),
        ) {
            let a = busy();
            let (sub, answer, bytes) = match which {
                0 => {
                    let (sub, payload) = MembershipMsg::Gossip {
                        id: 1,
                        state: Box::new(a.state.clone()),
                    }
                    .encode();
                    (sub, false, payload.to_vec())
                }
                1 => {
                    let (sub, payload) = MembershipMsg::SizesOk {
                        id: 1,
                        sizes: Box::new(a.sizes.clone()),
                    }
                    .encode();
                    (sub, true, payload.to_vec())
                }
                2 => {
                    let (sub, payload) = MembershipMsg::Outcome {
                        id: 1,
                        result: Err("refused".into()),
                    }
                    .encode();
                    (sub, true, payload.to_vec())
                }
                _ => {
                    // What a node does with a state file it could read: start from it.
                    let bytes = apply(a.persisted(), &damage);
                    if let Ok(m) = Membership::restore(cfg(1), &bytes) {
                        let _ = (m.view(), m.status_text(&up), m.plan_text());
                    }
                    return Ok(());
                }
            };
            // What a node does with a message it could read: handle it.
            if let Ok(Some(msg)) = MembershipMsg::decode(1, sub, answer, &apply(bytes, &damage)) {
                let mut b = busy();
                let _ = b.handle_msg(0, Some(NodeId(2)), msg);
                let _ = (b.view(), b.status_text(&up), b.plan_text());
            }
        }
    }
}
