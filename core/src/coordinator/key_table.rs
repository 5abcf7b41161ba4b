//! The key table of an anti-entropy tree: (bucket, key) → entry, for every key the tree holds.
//!
//! Every replica write looks its key up here, so a lookup should touch the table and nothing
//! else. Two choices make that so:
//! - Slots are found by the key's tree hash, which the caller has already computed for the
//!   Merkle leaf; the table hashes nothing itself, and a probe compares the stored hash before
//!   any key byte.
//! - Bucket and key are packed into one buffer, inline in the slot when short (redis-benchmark's
//!   and YCSB's keys in their buckets are), on the heap otherwise. A table keyed by two
//!   separately allocated byte strings compared each of them through a pointer: two cache
//!   misses per write, and two allocations per key.
//!
//! Not keyed by a secret, like the engine's index (`engine/src/index.rs`): keys crafted to
//! collide slow down the shard that stores them, and a fixed hash keeps simulated runs
//! reproducible.

use hashbrown::HashTable;

/// Bytes of a packed (bucket, key) held in the slot itself.
const INLINE: usize = 30;
const _: () = assert!(INLINE <= u8::MAX as usize, "an inline length is a byte");

/// A bucket and key in one buffer: the bucket's length as a LEB128 varint, the bucket, the key.
#[derive(Debug)]
enum Packed {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

/// The varint that starts a packed key: `len` in 7-bit groups, low group first.
fn length_prefix(mut len: usize, out: &mut [u8; 10]) -> &[u8] {
    let mut i = 0;
    loop {
        let low = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out[i] = low;
            return &out[..=i];
        }
        out[i] = low | 0x80;
        i += 1;
    }
}

impl Packed {
    fn new(bucket: &[u8], key: &[u8]) -> Self {
        let mut prefix = [0; 10];
        let prefix = length_prefix(bucket.len(), &mut prefix);
        let len = prefix.len() + bucket.len() + key.len();
        if len <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..prefix.len()].copy_from_slice(prefix);
            bytes[prefix.len()..prefix.len() + bucket.len()].copy_from_slice(bucket);
            bytes[prefix.len() + bucket.len()..len].copy_from_slice(key);
            // Checked just above: `len` fits `INLINE`, which fits a byte.
            Packed::Inline {
                len: len as u8,
                bytes,
            }
        } else {
            let mut bytes = Vec::with_capacity(len);
            bytes.extend_from_slice(prefix);
            bytes.extend_from_slice(bucket);
            bytes.extend_from_slice(key);
            Packed::Heap(bytes.into_boxed_slice())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Packed::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Packed::Heap(bytes) => bytes,
        }
    }

    /// The bucket and the key.
    fn parts(&self) -> (&[u8], &[u8]) {
        let bytes = self.bytes();
        let mut bucket_len = 0usize;
        let mut at = 0;
        // Written by `new`: a varint of at most ten bytes, then at least that many bytes.
        for (i, &b) in bytes.iter().enumerate() {
            bucket_len |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                at = i + 1;
                break;
            }
        }
        debug_assert!(
            at > 0 && bytes.len() >= at + bucket_len,
            "a packed key starts with its bucket's length"
        );
        let (bucket, key) = bytes[at..].split_at(bucket_len);
        (bucket, key)
    }

    fn is(&self, bucket: &[u8], key: &[u8]) -> bool {
        self.parts() == (bucket, key)
    }
}

#[derive(Debug)]
struct Slot<V> {
    hash: u64,
    key: Packed,
    value: V,
}

/// (bucket, key) → `V`, each key found by its tree hash (module docs). Every method takes the
/// hash the caller computed for the key; the same key must always come with the same hash.
#[derive(Debug)]
pub(super) struct KeyTable<V> {
    table: HashTable<Slot<V>>,
}

impl<V> Default for KeyTable<V> {
    fn default() -> Self {
        Self {
            table: HashTable::new(),
        }
    }
}

/// Where a slot goes in the table. A tree hash ends in the partition's bits (the same for every
/// key of one tree), and the table picks a bucket by the low bits and a tag by the top ones: the
/// rotation puts varying bits in both places.
fn place(hash: u64) -> u64 {
    hash.rotate_left(32)
}

/// Whether a slot holds the key with `hash`, `bucket` and `key`: the stored hash first, so a
/// probe reads key bytes only for a likely match.
fn is<'a, V>(hash: u64, bucket: &'a [u8], key: &'a [u8]) -> impl Fn(&Slot<V>) -> bool + 'a {
    move |s| s.hash == hash && s.key.is(bucket, key)
}

impl<V> KeyTable<V> {
    /// Hands `hint` the address and size of each slot a coming lookup of the key with `hash`
    /// compares, for it to ask the CPU to load them.
    pub(super) fn prefetch(&self, hash: u64, hint: &mut impl FnMut(*const u8, usize)) {
        for slot in self.table.iter_hash(place(hash)) {
            hint(
                (slot as *const Slot<V>).cast(),
                std::mem::size_of::<Slot<V>>(),
            );
        }
    }

    pub(super) fn get(&self, hash: u64, bucket: &[u8], key: &[u8]) -> Option<&V> {
        self.table
            .find(place(hash), is(hash, bucket, key))
            .map(|s| &s.value)
    }

    pub(super) fn get_mut(&mut self, hash: u64, bucket: &[u8], key: &[u8]) -> Option<&mut V> {
        self.table
            .find_mut(place(hash), is(hash, bucket, key))
            .map(|s| &mut s.value)
    }

    /// Sets `key`'s value.
    pub(super) fn insert(&mut self, hash: u64, bucket: &[u8], key: &[u8], value: V) {
        match self
            .table
            .entry(place(hash), is(hash, bucket, key), |s| place(s.hash))
        {
            hashbrown::hash_table::Entry::Occupied(mut o) => o.get_mut().value = value,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(Slot {
                    hash,
                    key: Packed::new(bucket, key),
                    value,
                });
            }
        }
    }

    pub(super) fn remove(&mut self, hash: u64, bucket: &[u8], key: &[u8]) -> Option<V> {
        self.table
            .find_entry(place(hash), is(hash, bucket, key))
            .ok()
            .map(|o| o.remove().0.value)
    }

    /// Every (bucket, key, value), in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], &V)> {
        self.table.iter().map(|s| {
            let (bucket, key) = s.key.parts();
            (bucket, key, &s.value)
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    /// Short keys live in the slot, long ones (a bucket whose length takes two varint bytes
    /// among them) on the heap, and both give back the bucket and key they were made of.
    #[test]
    fn packs_short_keys_inline_and_long_ones_on_the_heap() {
        let short = Packed::new(b"default", b"key:000000012345");
        assert!(matches!(short, Packed::Inline { .. }));
        assert_eq!(short.parts(), (&b"default"[..], &b"key:000000012345"[..]));
        let bucket = vec![7u8; 300];
        let long = Packed::new(&bucket, b"k");
        assert!(matches!(long, Packed::Heap(_)));
        assert_eq!(long.parts(), (&bucket[..], &b"k"[..]));
        // Bucket and key split where they were given, though the bytes run on alike.
        assert!(!Packed::new(b"ab", b"c").is(b"a", b"bc"));
        assert_eq!(Packed::new(b"", b"k").parts(), (&b""[..], &b"k"[..]));
        let mut table = KeyTable::default();
        table.insert(9, &bucket, b"k", 1);
        table.insert(9, &bucket[..299], b"k", 2);
        assert_eq!(table.get(9, &bucket, b"k"), Some(&1));
        assert_eq!(table.get(9, &bucket[..299], b"k"), Some(&2));
        assert_eq!(table.remove(9, &bucket, b"k"), Some(1));
        assert_eq!(table.get(9, &bucket, b"k"), None);
    }

    /// A prefetch hands over the slot that holds the key: a range of a slot's size around the
    /// key's value, among at most a few candidates that share the hash's tag.
    #[test]
    fn prefetch_hints_the_slot_of_the_key() {
        let mut table = KeyTable::default();
        for i in 0..1000u64 {
            table.insert(
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                b"b",
                &i.to_le_bytes(),
                i,
            );
        }
        for i in (0..1000u64).step_by(7) {
            let hash = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let value = table.get(hash, b"b", &i.to_le_bytes()).unwrap() as *const u64 as usize;
            let mut hinted = Vec::new();
            table.prefetch(hash, &mut |at, len| hinted.push((at as usize, len)));
            assert!(!hinted.is_empty() && hinted.len() <= 4, "{i}: {hinted:?}");
            assert!(
                hinted
                    .iter()
                    .all(|&(_, len)| len == std::mem::size_of::<Slot<u64>>()),
                "{hinted:?}"
            );
            assert!(
                hinted
                    .iter()
                    .any(|&(at, len)| (at..at + len).contains(&value)),
                "{i}: no hinted slot holds the key's value at {value:#x}: {hinted:?}"
            );
        }
    }

    proptest! {
        /// The table answers as a map of (bucket, key) does, for keys inline and on the heap
        /// and hashes that collide (the hash is a few bits of the key, so many keys share one).
        #[test]
        fn behaves_as_a_map(ops in prop::collection::vec(
            (0u8..3, prop::collection::vec(any::<u8>(), 0..40),
             prop::collection::vec(any::<u8>(), 0..3), any::<u32>()),
            1..200,
        )) {
            let mut table = KeyTable::default();
            let mut model = BTreeMap::new();
            let hash = |b: &[u8], k: &[u8]| (b.len() + k.len()) as u64 % 5;
            for (op, bucket, key, value) in ops {
                let h = hash(&bucket, &key);
                match op {
                    0 => {
                        table.insert(h, &bucket, &key, value);
                        model.insert((bucket.clone(), key.clone()), value);
                    }
                    1 => {
                        prop_assert_eq!(
                            table.remove(h, &bucket, &key),
                            model.remove(&(bucket.clone(), key.clone()))
                        );
                    }
                    _ => {
                        if let Some(v) = table.get_mut(h, &bucket, &key) {
                            *v = v.wrapping_add(1);
                        }
                        if let Some(v) = model.get_mut(&(bucket.clone(), key.clone())) {
                            *v = v.wrapping_add(1);
                        }
                    }
                }
                prop_assert_eq!(
                    table.get(h, &bucket, &key),
                    model.get(&(bucket.clone(), key.clone()))
                );
                prop_assert_eq!(table.len(), model.len());
            }
            let mut listed: Vec<_> = table
                .iter()
                .map(|(b, k, v)| ((b.to_vec(), k.to_vec()), *v))
                .collect();
            listed.sort();
            prop_assert_eq!(listed, model.into_iter().collect::<Vec<_>>());
        }
    }
}
