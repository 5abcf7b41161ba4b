//! Buckets: named namespaces with their replication and conflict properties (sans-IO).
//!
//! A bucket's [`BucketProps`] say how many replicas a key has (`n`), how many must answer a read
//! (`r`) or acknowledge a write (`w`), how many of those write acknowledgements must be durable
//! (`dw`), whether concurrent writes are kept as siblings or resolved by last-write-wins, and how
//! many siblings a key may accumulate before writes to it are refused. A request may override `r`,
//! `w` and `dw` ([`Overrides`]); [`BucketProps::quorum`] checks the result.
//!
//! Quorums count distinct nodes. On a cluster with fewer members than a bucket's `n`, every member
//! holds a copy and the bucket's own `r`, `w` and `dw` are capped at the member count
//! ([`BucketProps::quorum_among`]): a lone node serves the default `(3, 2, 2)` bucket as
//! `(1, 1, 1)`, and the same bucket gets its full quorums once the cluster has three members,
//! without any setting changing. A request that itself asks for more than the members can give is
//! refused (the caller asked for copies that do not exist), not capped.
//!
//! What this module does not own: where the properties come from. Today the node reads them from
//! its configuration (`[buckets.<name>]` tables) and every node of a cluster must be given the
//! same ones; distributing bucket properties through the cluster belongs to membership.
//!
//! Limits: `n` ≤ [`N_MAX`]; `r`, `w` in `1..=n`; `dw ≤ w`; `max_siblings` in
//! `1..=`[`SIBLINGS_MAX`] (the wire limit of a GET reply).

use std::collections::BTreeMap;

use ringkv_net::limits::SIBLINGS_MAX;

/// Most replicas a key may have; the ring's `TARGET_N_MAX`.
pub const N_MAX: u8 = crate::ring::TARGET_N_MAX as u8;
/// Name of the bucket that RESP commands and requests without a bucket use.
pub const DEFAULT_BUCKET: &str = "default";
/// Default sibling limit: enough for real write concurrency, low enough that a key whose
/// siblings are never merged is noticed early.
pub const MAX_SIBLINGS_DEFAULT: u16 = 32;

const _: () = assert!(MAX_SIBLINGS_DEFAULT as usize <= SIBLINGS_MAX);
const _: () = assert!(N_MAX >= 3);

/// How concurrent writes to a key are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConflictMode {
    /// Concurrent writes are kept as siblings and returned to the application with a causal
    /// context; a write with that context resolves them. Nothing is lost.
    Siblings,
    /// The write with the highest hybrid-logical-clock timestamp wins (ties: higher node id).
    /// Concurrent writes are silently lost: for session-like data where that is acceptable.
    Lww,
}

/// The convergent data type every key of a bucket holds (`type = "counter"` in its table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BucketType {
    /// Counters.
    Counter,
    /// Add-wins sets.
    Set,
    /// Maps of registers, counters, sets and flags.
    Map,
}

impl BucketType {
    /// Every type, each with the bucket of that type a node has without configuration.
    pub const BUILT_IN: [(BucketType, &'static str); 3] = [
        (BucketType::Counter, "counters"),
        (BucketType::Set, "sets"),
        (BucketType::Map, "maps"),
    ];

    /// The wire type of the bucket's keys.
    pub fn crdt(self) -> ringkv_net::CrdtType {
        match self {
            BucketType::Counter => ringkv_net::CrdtType::Counter,
            BucketType::Set => ringkv_net::CrdtType::Set,
            BucketType::Map => ringkv_net::CrdtType::Map,
        }
    }
}

/// A bucket's properties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BucketProps {
    /// Replicas per key.
    pub n: u8,
    /// Replies a read waits for.
    pub r: u8,
    /// Acknowledgements a write waits for.
    pub w: u8,
    /// Of the `w` acknowledgements, how many must be durable (synced) writes.
    pub dw: u8,
    /// Siblings or last-write-wins.
    pub mode: ConflictMode,
    /// A write that would leave more siblings than this is refused (`too_many_siblings`).
    pub max_siblings: u16,
    /// The time to live of a write that names no expiry (milliseconds); `None`: such writes
    /// never expire.
    pub ttl_ms: Option<u64>,
    /// The convergent data type every key holds; `None`: any (plain values, and in an `lww`
    /// bucket convergent types too, each key the type its first operation gives it).
    pub data_type: Option<BucketType>,
}

impl Default for BucketProps {
    /// Dynamo's common configuration: `(N, R, W) = (3, 2, 2)`, one durable acknowledgement
    /// (the coordinator's own write), siblings.
    fn default() -> Self {
        BucketProps {
            n: 3,
            r: 2,
            w: 2,
            dw: 1,
            mode: ConflictMode::Siblings,
            max_siblings: MAX_SIBLINGS_DEFAULT,
            ttl_ms: None,
            data_type: None,
        }
    }
}

/// Properties that cannot work together.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bucket properties: {0}")]
pub struct PropsError(pub String);

/// A request's own quorum, overriding the bucket's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Overrides {
    /// Read quorum.
    pub r: Option<u8>,
    /// Write quorum.
    pub w: Option<u8>,
    /// Durable-write quorum.
    pub dw: Option<u8>,
}

/// The quorum one request runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quorum {
    /// Replicas.
    pub n: u8,
    /// Replies a read waits for.
    pub r: u8,
    /// Acknowledgements a write waits for.
    pub w: u8,
    /// Durable acknowledgements among them.
    pub dw: u8,
}

impl BucketProps {
    /// Checks the properties.
    pub fn validate(&self) -> Result<(), PropsError> {
        if self.n == 0 || self.n > N_MAX {
            return Err(PropsError(format!("n = {} outside [1, {N_MAX}]", self.n)));
        }
        self.quorum(Overrides::default()).map(|_| ())?;
        if self.max_siblings == 0 || usize::from(self.max_siblings) > SIBLINGS_MAX {
            return Err(PropsError(format!(
                "max_siblings = {} outside [1, {SIBLINGS_MAX}]",
                self.max_siblings
            )));
        }
        if self.ttl_ms == Some(0) {
            return Err(PropsError(
                "ttl_ms = 0: a default time to live is at least 1 ms (leave it out for none)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The quorum for a request with `overrides`, checked: `r` and `w` in `1..=n`, `dw ≤ w`.
    pub fn quorum(&self, overrides: Overrides) -> Result<Quorum, PropsError> {
        let q = Quorum {
            n: self.n,
            r: overrides.r.unwrap_or(self.r),
            w: overrides.w.unwrap_or(self.w),
            dw: overrides.dw.unwrap_or(self.dw),
        };
        if q.r == 0 || q.r > q.n {
            return Err(PropsError(format!("r = {} outside [1, n = {}]", q.r, q.n)));
        }
        if q.w == 0 || q.w > q.n {
            return Err(PropsError(format!("w = {} outside [1, n = {}]", q.w, q.n)));
        }
        if q.dw > q.w {
            return Err(PropsError(format!("dw = {} above w = {}", q.dw, q.w)));
        }
        Ok(q)
    }

    /// The quorum for a request with `overrides` on a cluster of `members` nodes (module docs):
    /// the bucket's own `r`, `w` and `dw` capped at the member count, then checked as by
    /// [`BucketProps::quorum`]. An override is not capped.
    pub fn quorum_among(&self, overrides: Overrides, members: usize) -> Result<Quorum, PropsError> {
        // At least one member: a ring always holds this node.
        let cap = u8::try_from(members.max(1)).unwrap_or(u8::MAX);
        let capped = BucketProps {
            r: self.r.min(cap),
            w: self.w.min(cap),
            dw: self.dw.min(cap),
            ..*self
        };
        capped.quorum(overrides)
    }
}

/// Every bucket's properties: named buckets, and the properties of any other bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Buckets {
    /// Properties of buckets not named in `named`.
    pub default: BucketProps,
    /// Buckets with their own properties.
    pub named: BTreeMap<Vec<u8>, BucketProps>,
}

impl Buckets {
    /// The properties of `bucket`.
    pub fn props(&self, bucket: &[u8]) -> &BucketProps {
        self.named.get(bucket).unwrap_or(&self.default)
    }

    /// The largest `n` of any bucket: the replicas ring placement and partition transfers are
    /// computed for.
    pub fn max_n(&self) -> usize {
        std::iter::once(&self.default)
            .chain(self.named.values())
            .map(|p| usize::from(p.n))
            .max()
            .unwrap_or(1)
    }

    /// Checks every bucket's properties.
    pub fn validate(&self) -> Result<(), PropsError> {
        self.default.validate()?;
        for (name, props) in &self.named {
            props
                .validate()
                .map_err(|e| PropsError(format!("{}: {}", String::from_utf8_lossy(name), e.0)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster smaller than `n` caps the bucket's quorums at its member count, so a lone node
    /// serves the default bucket, but a request's own quorum is never lowered behind its back.
    #[test]
    fn small_clusters_cap_the_bucket_quorums() {
        let p = BucketProps::default();
        let q = p.quorum_among(Overrides::default(), 1).unwrap();
        assert_eq!((q.n, q.r, q.w, q.dw), (3, 1, 1, 1));
        let q = p.quorum_among(Overrides::default(), 2).unwrap();
        assert_eq!((q.n, q.r, q.w, q.dw), (3, 2, 2, 1));
        let q = p.quorum_among(Overrides::default(), 5).unwrap();
        assert_eq!((q.n, q.r, q.w, q.dw), (3, 2, 2, 1));
        let asked = Overrides {
            w: Some(3),
            ..Overrides::default()
        };
        let q = p.quorum_among(asked, 1).unwrap();
        assert_eq!(
            q.w, 3,
            "an override is kept; the coordinator refuses it with the counts"
        );
    }

    /// Quorums outside what `n` allows are refused, with the numbers in the message.
    #[test]
    fn quorums_are_checked() {
        let p = BucketProps::default();
        assert!(p.validate().is_ok());
        assert!(
            p.quorum(Overrides {
                r: Some(4),
                ..Overrides::default()
            })
            .is_err()
        );
        assert!(
            p.quorum(Overrides {
                w: Some(1),
                dw: Some(2),
                ..Overrides::default()
            })
            .is_err()
        );
        let q = p
            .quorum(Overrides {
                r: Some(3),
                w: Some(3),
                dw: Some(3),
            })
            .expect("within n");
        assert_eq!((q.r, q.w, q.dw), (3, 3, 3));
        let zero = BucketProps { n: 0, ..p };
        assert!(zero.validate().is_err());
        let siblings = BucketProps {
            max_siblings: 0,
            ..p
        };
        assert!(siblings.validate().is_err());
    }
}
