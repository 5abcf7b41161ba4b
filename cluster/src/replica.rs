//! The replica store: how the core's storage operations and transfer scans land in a store of
//! bytes by partition and key, and the storage-key layout they use.
//!
//! The core speaks [`StoreKey`]s, [`StoreOp`]s and [`ScanPage`]s; beneath them is a store of
//! bytes by engine partition and key ([`PartitionStore`]). Two implement it: the shard's engine
//! (`server/store.rs`) and [`MemoryStore`] ([`memory`]), which the cluster simulator
//! (`ringkv-tests`, wrapped to lose unsynced writes in a crash) and the tests that drive a core
//! by hand store through, so they run this layout, the object encoding and the scan cursors, not
//! a copy of them.
//!
//! Storage layout: a [`Space::Primary`] key lives in engine partition `partition` under
//! [`engine_key`]`(bucket, key)` (`len(bucket) as u8 ‖ bucket ‖ key`: the prefix keeps
//! `("ab", "c")` and `("a", "bc")` apart, and a bucket is at most 255 bytes, so one byte holds
//! its length); a [`Space::Hint`]`(home)` key lives in engine partition
//! [`HINT_PARTITION_BASE`]` | partition` under `home as u32 (big-endian) ‖ engine_key(bucket, key)`,
//! so a node's hints never mix with its replicas, a fallback can list every hint of one ring
//! partition with one partition scan, and hints for different homes of the same key stay apart.
//! Values are whole objects ([`Object::encode`]: every sibling and the clock).
//!
//! Scans walk a partition's live keys in the order of their engine fingerprint ([`KeyHash`]);
//! a page's cursor is the fingerprint of its last key ([`cursor_bytes`]), which peers only echo.
//!
//! Limits: ring partitions are below [`PARTITION_COUNT_MAX`], so hint partitions never collide
//! with replica partitions; a hint key is [`HINT_KEY_PREFIX_BYTES`] longer than its replica key,
//! which the engine's key limit must leave room for. A key that does not decode (damaged, or
//! written by something else) is skipped by scans and logged; an object that does not decode
//! fails the operation that read it.

use bytes::Bytes;
use glommio::yield_if_needed;
use ringkv_engine::index::KeyHash;
use ringkv_engine::{Durability, Engine, PartitionIter};
use ringkv_net::limits::{BUCKET_BYTES_MAX, KEY_BYTES_MAX_DEFAULT};
use smallvec::SmallVec;

use ringkv_core::NodeId;
use ringkv_core::coordinator::{ScanItem, ScanPage, Space, StoreKey, StoreOp};
use ringkv_core::object::Object;
use ringkv_core::ring::PARTITION_COUNT_MAX;

pub mod memory;

pub use memory::MemoryStore;

/// One live entry of a partition: its key's fingerprint, the key and the value.
pub type Entry = (KeyHash, Vec<u8>, Bytes);

/// A store of bytes by engine partition and key: what a replica store needs from beneath it.
///
/// Errors are the store's own, as text: the core only learns that an operation failed, and
/// why, for its logs and its answers.
#[allow(async_fn_in_trait)] // Driven on one thread (a shard's executor, or the simulator).
pub trait PartitionStore {
    /// A walk over one partition's live entries.
    type Scan: PartitionScan;

    /// The value of `key` in `partition`, if there is one.
    async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Bytes>, String>;
    /// Stores `value` under `key`, durably before it returns if `durability` says so.
    async fn put(
        &self,
        partition: u32,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), String>;
    /// Removes `key`.
    async fn delete(
        &self,
        partition: u32,
        key: &[u8],
        durability: Durability,
    ) -> Result<(), String>;
    /// Makes every write so far durable.
    async fn flush(&self) -> Result<(), String>;
    /// [`get`](Self::get) when it needs no wait (the answer is in memory), else `None`. A store
    /// that has no such path keeps the default.
    fn get_now(&self, _partition: u32, _key: &[u8]) -> Option<Result<Option<Bytes>, String>> {
        None
    }
    /// A buffered [`put`](Self::put) when it needs no wait, else `None` (nothing written). It
    /// takes the value's buffer, which a store may keep (the engine's value cache does).
    fn put_now(&self, _partition: u32, _key: &[u8], _value: Vec<u8>) -> Option<Result<(), String>> {
        None
    }
    /// A buffered [`delete`](Self::delete) when it needs no wait, else `None` (nothing
    /// written).
    fn delete_now(&self, _partition: u32, _key: &[u8]) -> Option<Result<(), String>> {
        None
    }
    /// [`put`](Self::put) of a synced write without its wait: the flush epoch to wait for with
    /// [`wait_durable`](Self::wait_durable), or `None` when the store cannot (nothing done).
    fn put_sync_now(
        &self,
        _partition: u32,
        _key: &[u8],
        _value: Vec<u8>,
    ) -> Option<Result<u64, String>> {
        None
    }
    /// Waits until flush epoch `epoch` of [`put_sync_now`](Self::put_sync_now) is durable:
    /// the newest durable epoch.
    async fn wait_durable(&self, epoch: u64) -> Result<u64, String> {
        Ok(epoch)
    }
    /// The live entries of `partition` whose fingerprint is above `after`, in fingerprint order.
    fn scan_after(&self, partition: u32, after: Option<KeyHash>) -> Self::Scan;
}

/// A walk started by [`PartitionStore::scan_after`].
#[allow(async_fn_in_trait)]
pub trait PartitionScan {
    /// The next entry, or `None` at the end.
    async fn next_entry(&mut self) -> Option<Result<Entry, String>>;
}

impl PartitionStore for Engine {
    type Scan = EngineScan;

    async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Bytes>, String> {
        Engine::get(self, partition, key)
            .await
            .map_err(|e| e.to_string())
    }

    async fn put(
        &self,
        partition: u32,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), String> {
        Engine::put(self, partition, key, value, durability)
            .await
            .map_err(|e| e.to_string())
    }

    async fn delete(
        &self,
        partition: u32,
        key: &[u8],
        durability: Durability,
    ) -> Result<(), String> {
        Engine::delete(self, partition, key, durability)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn flush(&self) -> Result<(), String> {
        Engine::flush(self).await.map_err(|e| e.to_string())
    }

    fn get_now(&self, partition: u32, key: &[u8]) -> Option<Result<Option<Bytes>, String>> {
        Engine::get_now(self, partition, key)
            .map_err(|e| e.to_string())
            .transpose()
    }

    fn put_now(&self, partition: u32, key: &[u8], value: Vec<u8>) -> Option<Result<(), String>> {
        Engine::put_buffered_now(self, partition, key, value)
            .map_err(|e| e.to_string())
            .transpose()
    }

    fn delete_now(&self, partition: u32, key: &[u8]) -> Option<Result<(), String>> {
        Engine::delete_buffered_now(self, partition, key)
            .map(|done| done.map(|_| ()))
            .map_err(|e| e.to_string())
            .transpose()
    }

    fn put_sync_now(
        &self,
        partition: u32,
        key: &[u8],
        value: Vec<u8>,
    ) -> Option<Result<u64, String>> {
        Engine::put_sync_now(self, partition, key, value)
            .map_err(|e| e.to_string())
            .transpose()
    }

    async fn wait_durable(&self, epoch: u64) -> Result<u64, String> {
        Engine::wait_durable(self, epoch)
            .await
            .map_err(|e| e.to_string())
    }

    fn scan_after(&self, partition: u32, after: Option<KeyHash>) -> EngineScan {
        EngineScan(self.iter_partition_after(partition, after))
    }
}

/// A partition walk on the engine; it steps aside for other tasks between entries, since a
/// transfer scan runs beside client requests.
pub struct EngineScan(PartitionIter);

impl PartitionScan for EngineScan {
    async fn next_entry(&mut self) -> Option<Result<Entry, String>> {
        yield_if_needed().await;
        self.0
            .next_entry()
            .await
            .map(|entry| entry.map_err(|e| e.to_string()))
    }
}

/// [`apply`] when the operation needs no wait (a read answered from memory, a buffered write
/// or removal with room in the write buffer: most of a request's operations), else `None`,
/// having done nothing. It spares the caller the future of [`apply`], which is large to build
/// and to move into a task.
pub fn apply_now<S: PartitionStore>(
    store: &S,
    key: &StoreKey,
    op: &StoreOp,
) -> Option<Result<Option<Object>, String>> {
    let (partition, engine_key) = engine_location(key);
    match op {
        StoreOp::Read => Some(match store.get_now(partition, &engine_key)? {
            Ok(None) => Ok(None),
            Ok(Some(bytes)) => decode_stored(partition, &bytes).map(Some),
            Err(e) => Err(e),
        }),
        StoreOp::Write {
            object,
            durable: false,
        } => store
            .put_now(partition, &engine_key, object.encode())
            .map(|r| r.map(|()| None)),
        StoreOp::Remove => store
            .delete_now(partition, &engine_key)
            .map(|r| r.map(|()| None)),
        StoreOp::Write { durable: true, .. } | StoreOp::Sync => None,
    }
}

/// A synced write of the core without its wait ([`PartitionStore::put_sync_now`]): the flush
/// epoch that makes it durable, or `None` for any other operation, or when the store must wait
/// first (nothing done: use [`apply`]).
pub fn durable_write_now<S: PartitionStore>(
    store: &S,
    key: &StoreKey,
    op: &StoreOp,
) -> Option<Result<u64, String>> {
    let StoreOp::Write {
        object,
        durable: true,
    } = op
    else {
        return None;
    };
    let (partition, engine_key) = engine_location(key);
    store.put_sync_now(partition, &engine_key, object.encode())
}

/// A stored object, decoded.
fn decode_stored(partition: u32, bytes: &Bytes) -> Result<Object, String> {
    Object::decode(bytes)
        .map_err(|e| format!("stored object in partition {partition} does not decode: {e}"))
}

/// Carries out one storage operation of the core.
pub async fn apply<S: PartitionStore>(
    store: &S,
    key: &StoreKey,
    op: StoreOp,
) -> Result<Option<Object>, String> {
    let (partition, engine_key) = engine_location(key);
    match op {
        StoreOp::Read => match store.get(partition, &engine_key).await? {
            None => Ok(None),
            Some(bytes) => decode_stored(partition, &bytes).map(Some),
        },
        StoreOp::Write { object, durable } => {
            let durability = if durable {
                Durability::Sync
            } else {
                Durability::Buffered
            };
            store
                .put(partition, &engine_key, &object.encode(), durability)
                .await
                .map(|()| None)
        }
        StoreOp::Sync => store.flush().await.map(|()| None),
        // Losing a removal in a crash only delivers the hint again, and merging is idempotent.
        StoreOp::Remove => store
            .delete(partition, &engine_key, Durability::Buffered)
            .await
            .map(|()| None),
    }
}

/// Reads a page of `partition`'s replicas after the cursor `after` (a [`cursor_bytes`] of an
/// earlier page): at most `max_items`, and no more once `max_bytes` of values are in (a page
/// holds at least one item). A full page's `next` is the cursor of its last key; an empty
/// remainder gives an empty last page, which ends the scan.
pub async fn scan_page<S: PartitionStore>(
    store: &S,
    partition: u32,
    after: Option<Bytes>,
    max_items: usize,
    max_bytes: usize,
) -> Result<ScanPage, String> {
    let after = match after {
        Some(c) => {
            Some(cursor_from_bytes(&c).ok_or_else(|| "a malformed scan cursor".to_string())?)
        }
        None => None,
    };
    let mut entries = store.scan_after(partition, after);
    let mut page = ScanPage::default();
    let mut bytes = 0;
    let mut last = None;
    while page.items.len() < max_items && (page.items.is_empty() || bytes < max_bytes) {
        let Some(entry) = entries.next_entry().await else {
            return Ok(page);
        };
        let (kh, engine_key, value) = entry?;
        last = Some(kh);
        let Some((bucket, key)) = key_from_engine(&engine_key) else {
            tracing::warn!(partition, "skipping a malformed replica key");
            continue;
        };
        let object = Object::decode(&value)
            .map_err(|e| format!("stored object in partition {partition} does not decode: {e}"))?;
        bytes += value.len();
        page.items.push(ScanItem {
            bucket,
            key,
            object,
        });
    }
    page.next = last.map(cursor_bytes);
    Ok(page)
}

/// Largest engine key a request can produce with default limits: the length byte, the longest
/// bucket and the longest key the wire accepts.
pub const ENGINE_KEY_BYTES_MAX: usize = engine_key_bytes_max(KEY_BYTES_MAX_DEFAULT);

/// Largest engine key for requests whose keys are at most `key_bytes_max` bytes.
pub const fn engine_key_bytes_max(key_bytes_max: usize) -> usize {
    1 + BUCKET_BYTES_MAX + key_bytes_max
}

/// The key the engine stores for `(bucket, key)`: `len(bucket) as u8 ‖ bucket ‖ key`.
///
/// # Panics
///
/// If the bucket is longer than [`BUCKET_BYTES_MAX`]; the codec never produces one.
pub fn engine_key(bucket: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = EngineKey::new();
    push_engine_key(&mut out, bucket, key);
    out.into_vec()
}

/// Appends [`engine_key`]`(bucket, key)` to `out`.
fn push_engine_key(out: &mut EngineKey, bucket: &[u8], key: &[u8]) {
    let len = u8::try_from(bucket.len()).expect("the codec bounds buckets to 255 bytes");
    out.reserve(1 + bucket.len() + key.len());
    out.push(len);
    out.extend_from_slice(bucket);
    out.extend_from_slice(key);
}

/// First engine partition of hints: the high bit, far above any ring partition.
pub const HINT_PARTITION_BASE: u32 = 1 << 31;
/// Bytes a hint's engine key has before the replica's engine key: the home node id.
pub const HINT_KEY_PREFIX_BYTES: usize = 4;

const _: () = assert!(PARTITION_COUNT_MAX <= HINT_PARTITION_BASE);

/// Bytes of an engine key kept on the stack: every storage operation builds one, and most
/// buckets and keys are short.
const ENGINE_KEY_INLINE: usize = 64;

/// An engine key as [`engine_location`] builds it: inline up to [`ENGINE_KEY_INLINE`] bytes.
pub type EngineKey = SmallVec<[u8; ENGINE_KEY_INLINE]>;

/// The engine partition and key of a stored key: a hint's key is its home's id before the
/// replica's [`engine_key`].
pub fn engine_location(key: &StoreKey) -> (u32, EngineKey) {
    debug_assert!(key.partition < HINT_PARTITION_BASE);
    let Space::Hint(home) = key.space else {
        return engine_location_primary(key.partition, &key.bucket, &key.key);
    };
    let mut k = EngineKey::new();
    k.extend_from_slice(&home.0.to_be_bytes());
    push_engine_key(&mut k, &key.bucket, &key.key);
    (HINT_PARTITION_BASE | key.partition, k)
}

/// [`engine_location`] of a replica (not a hint) of `bucket`/`key` in `partition`.
pub fn engine_location_primary(partition: u32, bucket: &[u8], key: &[u8]) -> (u32, EngineKey) {
    let mut k = EngineKey::new();
    push_engine_key(&mut k, bucket, key);
    (partition, k)
}

/// The hint stored in ring partition `partition` under engine key `engine_key`, or `None` if the
/// key is not a hint key (damaged or written by something else).
pub fn hint_from_engine(partition: u32, engine_key: &[u8]) -> Option<StoreKey> {
    let (home, rest) = engine_key.split_first_chunk::<HINT_KEY_PREFIX_BYTES>()?;
    let (bucket, key) = key_from_engine(rest)?;
    Some(StoreKey {
        partition,
        space: Space::Hint(NodeId(u32::from_be_bytes(*home))),
        bucket,
        key,
    })
}

/// The bucket and key of a replica's engine key ([`engine_key`]), or `None` if it is damaged.
pub fn key_from_engine(engine_key: &[u8]) -> Option<(Bytes, Bytes)> {
    let (&len, rest) = engine_key.split_first()?;
    let len = usize::from(len);
    if rest.len() < len {
        return None;
    }
    let (bucket, key) = rest.split_at(len);
    Some((Bytes::copy_from_slice(bucket), Bytes::copy_from_slice(key)))
}

/// A scan cursor: the engine fingerprint of the last key of a page (digest, then check; little
/// endian). Peers only echo it back.
pub fn cursor_bytes(kh: KeyHash) -> Bytes {
    let mut out = Vec::with_capacity(10);
    out.extend_from_slice(&kh.digest.to_le_bytes());
    out.extend_from_slice(&kh.check.to_le_bytes());
    Bytes::from(out)
}

/// The fingerprint of a cursor made by [`cursor_bytes`], or `None` if it is not one.
pub fn cursor_from_bytes(bytes: &[u8]) -> Option<KeyHash> {
    let (digest, check) = bytes.split_first_chunk::<8>()?;
    let check: [u8; 2] = check.try_into().ok()?;
    Some(KeyHash {
        digest: u64::from_le_bytes(*digest),
        check: u16::from_le_bytes(check),
    })
}

/// The stored key behind engine partition `partition` and engine key `engine_key` (a replica or
/// a hint, by the partition), or `None` if the key does not decode.
pub fn store_key(partition: u32, engine_key: &[u8]) -> Option<StoreKey> {
    if partition & HINT_PARTITION_BASE != 0 {
        return hint_from_engine(partition & !HINT_PARTITION_BASE, engine_key);
    }
    let (bucket, key) = key_from_engine(engine_key)?;
    Some(StoreKey {
        partition,
        space: Space::Primary,
        bucket,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::partition_of;

    fn key(space: Space) -> StoreKey {
        let bucket = Bytes::from_static(b"cart");
        let k = Bytes::from_static(b"alice");
        StoreKey {
            partition: partition_of(&bucket, &k).0,
            space,
            bucket,
            key: k,
        }
    }

    /// Bucket and key boundaries cannot be confused, so two buckets never share a key.
    #[test]
    fn engine_keys_keep_bucket_and_key_apart() {
        assert_ne!(engine_key(b"ab", b"c"), engine_key(b"a", b"bc"));
        assert_eq!(engine_key(b"b", b"k"), b"\x01bk".to_vec());
        assert_eq!(engine_key(b"", b"k"), b"\x00k".to_vec());
        assert!(engine_key(&[7; 255], &[1; 1024]).len() <= ENGINE_KEY_BYTES_MAX);
    }

    /// Hints are stored apart from replicas and come back from their engine key.
    #[test]
    fn hint_keys_round_trip() {
        let primary = key(Space::Primary);
        let hint = key(Space::Hint(NodeId(9)));
        let (pp, pk) = engine_location(&primary);
        let (hp, hk) = engine_location(&hint);
        assert_eq!(pp, primary.partition);
        assert_eq!(hp, HINT_PARTITION_BASE | primary.partition);
        assert_eq!(pk.as_slice(), b"\x04cartalice");
        assert_eq!(hk.as_slice(), b"\x00\x00\x00\x09\x04cartalice");
        assert_eq!(hint_from_engine(hint.partition, &hk), Some(hint));
        assert_eq!(hint_from_engine(0, &[0, 0, 0]), None);
        assert_eq!(
            key_from_engine(&pk),
            Some((primary.bucket.clone(), primary.key.clone()))
        );
        let kh = KeyHash {
            digest: 0x0102_0304_0506_0708,
            check: 0x0a0b,
        };
        assert_eq!(cursor_from_bytes(&cursor_bytes(kh)), Some(kh));
        assert_eq!(cursor_from_bytes(b"short"), None);
        assert_eq!(hint_from_engine(0, &[0, 0, 0, 1, 5, b'a']), None);
    }

    /// Every stored key comes back from where the layout puts it.
    #[test]
    fn store_keys_come_back_from_their_location() {
        for space in [Space::Primary, Space::Hint(NodeId(9))] {
            let k = key(space);
            let (partition, engine_key) = engine_location(&k);
            assert_eq!(store_key(partition, &engine_key), Some(k));
        }
        assert_eq!(store_key(3, &[]), None);
    }
}
