//! A client's key request, parsed once: which operation, on which key, in which partition.
//!
//! A GET, PUT, DELETE, UPDATE or APPLY arrives as a wire [`Message`]; the node's shell turns it into a
//! [`KeyRequest`] where it first sees it, hashing its key onto the ring once, and from then on
//! the shell (its routing between shards, its counters) and the core (the coordinator, and a
//! forward to another node) use the typed request. Its body is the wire body itself, so a
//! request crosses to another shard as it is and becomes a message again only to leave the node.
//!
//! Limits: the partition is computed for one partition count; a core whose ring has another
//! count must not be given the request (it checks in debug builds).

use bytes::Bytes;
use ringkv_net::{Apply, CrdtOp, Delete, FieldOp, Get, MapOp, Message, Put, Update};

use crate::ring::{PartitionCount, PartitionId, key_hash, partition_of_hash};

/// The operation of a [`KeyRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOp {
    /// A GET.
    Get,
    /// A PUT.
    Put,
    /// A DELETE.
    Delete,
    /// An UPDATE of a map's fields.
    Update,
    /// An APPLY of operations on a convergent data type.
    Apply,
}

/// The typed body of a [`KeyRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyBody {
    /// A GET.
    Get(Get),
    /// A PUT.
    Put(Put),
    /// A DELETE.
    Delete(Delete),
    /// An UPDATE of a map's fields.
    Update(Update),
    /// An APPLY of operations on a convergent data type.
    Apply(Apply),
}

/// A GET, PUT, DELETE, UPDATE or APPLY with the partition of its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRequest {
    body: KeyBody,
    partition: PartitionId,
    /// The key's [`key_hash`], which the partition is taken from and anti-entropy places the
    /// key in its tree by: hashed once per request.
    hash: u64,
}

impl KeyRequest {
    /// The key request `message` carries, in a ring of `partitions` partitions; any other message
    /// comes back unchanged.
    // The other message comes back by move, as it came: boxing it would allocate for every
    // operator command, to save a move.
    #[allow(clippy::result_large_err)]
    pub fn parse(message: Message, partitions: PartitionCount) -> Result<KeyRequest, Message> {
        let body = match message {
            Message::Get(m) => KeyBody::Get(m),
            Message::Put(m) => KeyBody::Put(m),
            Message::Delete(m) => KeyBody::Delete(m),
            Message::Update(m) => KeyBody::Update(m),
            Message::Apply(m) => KeyBody::Apply(m),
            other => return Err(other),
        };
        Ok(KeyRequest::new(body, partitions))
    }

    /// The key request of `body`, in a ring of `partitions` partitions.
    pub fn new(body: KeyBody, partitions: PartitionCount) -> KeyRequest {
        let (bucket, key) = body_key(&body);
        let hash = key_hash(bucket, key);
        KeyRequest {
            body,
            partition: partition_of_hash(partitions, hash),
            hash,
        }
    }

    /// The operation.
    pub fn op(&self) -> KeyOp {
        match &self.body {
            KeyBody::Get(_) => KeyOp::Get,
            KeyBody::Put(_) => KeyOp::Put,
            KeyBody::Delete(_) => KeyOp::Delete,
            KeyBody::Update(_) => KeyOp::Update,
            KeyBody::Apply(_) => KeyOp::Apply,
        }
    }

    /// The partition of the key.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// The key's placement hash ([`key_hash`] of the bucket and the key).
    pub fn key_hash(&self) -> u64 {
        self.hash
    }

    /// The bucket and the key.
    pub fn key(&self) -> (&Bytes, &Bytes) {
        body_key(&self.body)
    }

    /// The deadline the client asked for, in milliseconds.
    pub fn timeout_ms(&self) -> Option<u32> {
        match &self.body {
            KeyBody::Get(m) => m.timeout_ms,
            KeyBody::Put(m) => m.timeout_ms,
            KeyBody::Delete(m) => m.timeout_ms,
            KeyBody::Update(m) => m.timeout_ms,
            KeyBody::Apply(m) => m.timeout_ms,
        }
    }

    /// The bytes of the value a PUT writes, or the largest field value or element an UPDATE or
    /// an APPLY writes; 0 for the others.
    pub fn value_len(&self) -> usize {
        match &self.body {
            KeyBody::Put(m) => m.value.len(),
            KeyBody::Update(m) => m
                .ops
                .iter()
                .map(|op| match op {
                    MapOp::Set { value, .. } => value.len(),
                    MapOp::Delete { .. } | MapOp::Expire(_) => 0,
                })
                .max()
                .unwrap_or(0),
            KeyBody::Apply(m) => m
                .ops
                .iter()
                .map(|op| match op {
                    CrdtOp::Add(e) | CrdtOp::Remove(e) => e.len(),
                    CrdtOp::Field { op, .. } => match op {
                        FieldOp::Assign(v) | FieldOp::Add(v) | FieldOp::Remove(v) => v.len(),
                        FieldOp::Increment(_) | FieldOp::Enable | FieldOp::Disable => 0,
                    },
                    CrdtOp::Increment(_) | CrdtOp::RemoveField(_) | CrdtOp::Expire(_) => 0,
                })
                .max()
                .unwrap_or(0),
            KeyBody::Get(_) | KeyBody::Delete(_) => 0,
        }
    }

    /// The typed request.
    pub fn body(&self) -> &KeyBody {
        &self.body
    }

    /// The typed request, to move parts out of and back (`Core::local_write`); the key's
    /// partition is not recomputed, so a part moved out must come back before the request is
    /// used again.
    pub(crate) fn body_mut(&mut self) -> &mut KeyBody {
        &mut self.body
    }

    /// The typed request, taken apart.
    pub fn into_body(self) -> KeyBody {
        self.body
    }

    /// Sets the deadline the request carries (what is left of it, when it is forwarded).
    pub fn set_timeout_ms(&mut self, timeout_ms: u32) {
        let field = match &mut self.body {
            KeyBody::Get(m) => &mut m.timeout_ms,
            KeyBody::Put(m) => &mut m.timeout_ms,
            KeyBody::Delete(m) => &mut m.timeout_ms,
            KeyBody::Update(m) => &mut m.timeout_ms,
            KeyBody::Apply(m) => &mut m.timeout_ms,
        };
        *field = Some(timeout_ms);
    }

    /// The request as a wire message again (to forward it to another node).
    pub fn into_message(self) -> Message {
        match self.body {
            KeyBody::Get(m) => Message::Get(m),
            KeyBody::Put(m) => Message::Put(m),
            KeyBody::Delete(m) => Message::Delete(m),
            KeyBody::Update(m) => Message::Update(m),
            KeyBody::Apply(m) => Message::Apply(m),
        }
    }
}

fn body_key(body: &KeyBody) -> (&Bytes, &Bytes) {
    match body {
        KeyBody::Get(Get { bucket, key, .. })
        | KeyBody::Put(Put { bucket, key, .. })
        | KeyBody::Delete(Delete { bucket, key, .. })
        | KeyBody::Update(Update { bucket, key, .. })
        | KeyBody::Apply(Apply { bucket, key, .. }) => (bucket, key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(bucket: &'static [u8], key: &'static [u8]) -> Message {
        Message::Get(Get {
            bucket: Bytes::from_static(bucket),
            key: Bytes::from_static(key),
            r: None,
            timeout_ms: Some(7),
        })
    }

    /// A key request keeps its message and knows its key's partition; anything else is given
    /// back untouched.
    #[test]
    fn key_requests_parse_and_others_come_back() {
        let count = PartitionCount::DEFAULT;
        let request = KeyRequest::parse(get(b"b", b"k"), count).expect("a GET is a key request");
        assert_eq!(request.op(), KeyOp::Get);
        assert_eq!(request.partition(), count.partition_of(b"b", b"k"));
        assert_eq!(
            request.key(),
            (&Bytes::from_static(b"b"), &Bytes::from_static(b"k"))
        );
        assert_eq!(request.timeout_ms(), Some(7));
        assert_eq!(request.value_len(), 0);
        assert_eq!(request.into_message(), get(b"b", b"k"));
        assert_eq!(
            KeyRequest::parse(Message::Ping, count),
            Err(Message::Ping),
            "a PING is not a key request"
        );
    }
}
