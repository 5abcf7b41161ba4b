//! Merkle trees for anti-entropy: one per partition replica, updated on every write, compared
//! level by level with another replica's to find the keys whose versions differ (sans-IO).
//!
//! # Shape
//!
//! A tree covers the 64-bit key-hash space of one partition with [`LEAVES`] leaves (the top bits
//! of the hash pick the leaf) under a fixed fan-out of [`FANOUT`], so it has [`DEPTH`] levels
//! below the root. A leaf's hash is the XOR of `xxh3(key hash ‖ version digest)` over the keys it
//! holds. XOR makes the tree *incremental*: a write changes one leaf by
//! `old_item ^ new_item` in O(1), with no need to know the other keys, and the result does not
//! depend on the order of writes. Inner hashes are recomputed lazily (dirty flags), so a burst of
//! writes costs one recomputation per dirty path when the tree is next compared.
//!
//! XOR alone would let two differences cancel; inner nodes therefore hash their children's
//! hashes with xxh3 (not XOR), and a leaf collision needs two items whose 64-bit hashes are
//! equal, which the per-item xxh3 makes as unlikely as any 64-bit collision.
//!
//! # Comparison
//!
//! [`MerkleTree::level`] gives the hashes of one level; [`MerkleTree::differing`] compares a list of
//! (index, hash) pairs against this tree and returns the indexes whose subtrees differ. Two
//! replicas exchange the root, then the children of differing nodes level by level, then the keys
//! of differing leaves: traffic proportional to the differences, not to the data. The exchange
//! protocol (who asks whom, pacing) belongs to the anti-entropy driver; this module only owns the
//! tree.
//!
//! Every level lives in one array and the dirty flags in a bitset inside the tree: with a tree
//! per partition a shard holds megabytes of leaves, and a layout with a separate allocation per
//! level (and per level's flags) cost a cache miss per write on those headers alone.
//!
//! # Writes are applied in batches
//!
//! A write does not touch its leaf: it appends the leaf's change to the tree's pending list,
//! which is applied whole when it holds [`PENDING_CHANGES_MAX`] changes or when the tree is next
//! read. The leaves of a shard's trees are megabytes, so a leaf changed at once was a cache miss
//! on every write, paid in turn; a batch issues its misses back to back, where the processor
//! overlaps them, and a leaf changed twice in a batch is fetched once. The list's end, where
//! writes append, is one cache line per tree. Reads see every write: each applies the list
//! first.
//!
//! Limits: a tree costs `8 · (LEAVES + LEAVES/(FANOUT−1))` bytes (about 34 KiB) whatever the
//! number of keys, and `16 · PENDING_CHANGES_MAX` bytes (4 KiB) more for its pending list once it
//! has been written; with many keys per leaf, a differing leaf means exchanging all of its keys.

use xxhash_rust::xxh3::xxh3_64;

/// Children per inner node.
pub const FANOUT: usize = 16;
/// Levels below the root.
pub const DEPTH: u32 = 3;
/// Leaves per tree: `FANOUT^DEPTH`.
pub const LEAVES: usize = FANOUT.pow(DEPTH);

const _: () = assert!(FANOUT.is_power_of_two());
const _: () = assert!(LEAVES == 4096);
const _: () = assert!(
    LEAVES <= 1 << 16,
    "a pending change names its leaf in 16 bits"
);

/// Where level `depth` starts in [`MerkleTree::nodes`]: the levels above it hold
/// `1 + FANOUT + … + FANOUT^(depth−1)` nodes.
const fn level_start(depth: u32) -> usize {
    (FANOUT.pow(depth) - 1) / (FANOUT - 1)
}

/// Inner nodes (every level but the leaves), which alone can be dirty.
const INNER: usize = level_start(DEPTH);
/// Nodes of the whole tree.
const NODES: usize = level_start(DEPTH + 1);
/// Words of the dirty bitset.
const DIRTY_WORDS: usize = INNER.div_ceil(64);
/// Leaf changes a tree holds before it applies them (module docs, "Writes are applied in
/// batches").
pub const PENDING_CHANGES_MAX: usize = 256;

/// One partition replica's tree.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    /// Every level, root first: level `d` is `nodes[level_start(d)..level_start(d + 1)]`.
    nodes: Box<[u64]>,
    /// Bit `i` set: inner node `nodes[i]` must be recomputed from its children.
    dirty: [u64; DIRTY_WORDS],
    /// Keys accounted for (inserted minus removed), pending changes included.
    items: u64,
    /// Leaf changes not applied yet: (leaf, XOR delta), fewer than [`PENDING_CHANGES_MAX`]
    /// between calls. Sized to the most on the first write and kept, so a tree written to
    /// allocates for it once.
    pending: Vec<(u16, u64)>,
}

impl Default for MerkleTree {
    fn default() -> Self {
        Self::new()
    }
}

/// The hash one key contributes to its leaf.
pub fn item_hash(key_hash: u64, version_digest: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key_hash.to_le_bytes());
    bytes[8..].copy_from_slice(&version_digest.to_le_bytes());
    xxh3_64(&bytes)
}

/// The leaf of a key hash: its top bits.
pub fn leaf_of(key_hash: u64) -> usize {
    (key_hash >> (64 - LEAVES.trailing_zeros())) as usize
}

impl MerkleTree {
    /// An empty tree: every leaf 0, so equal to any other empty tree. The inner hashes of the
    /// empty tree are computed once per process and copied.
    pub fn new() -> Self {
        static EMPTY: std::sync::OnceLock<MerkleTree> = std::sync::OnceLock::new();
        EMPTY
            .get_or_init(|| {
                let mut empty = MerkleTree {
                    nodes: vec![0; NODES].into_boxed_slice(),
                    dirty: [0; DIRTY_WORDS],
                    items: 0,
                    pending: Vec::new(),
                };
                // Inner nodes start dirty so the first read computes them from the leaves.
                for i in 0..INNER {
                    empty.mark(i);
                }
                empty.refresh();
                empty
            })
            .clone()
    }

    /// Number of keys in the tree.
    pub fn len(&self) -> u64 {
        self.items
    }

    /// Whether the tree holds no key.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// A key's version changed: `old` is its previous version digest (`None` if the key was
    /// absent), `new` its new one (`None` if the key left the tree).
    pub fn update(&mut self, key_hash: u64, old: Option<u64>, new: Option<u64>) {
        if old == new {
            return;
        }
        let leaf = leaf_of(key_hash);
        let mut delta = 0;
        if let Some(v) = old {
            delta ^= item_hash(key_hash, v);
            self.items = self
                .items
                .checked_sub(1)
                .expect("a key removed from a tree was in it");
        }
        if let Some(v) = new {
            delta ^= item_hash(key_hash, v);
            self.items += 1;
        }
        if self.pending.capacity() == 0 {
            self.pending.reserve_exact(PENDING_CHANGES_MAX);
        }
        // A leaf index is below `LEAVES`, which fits 16 bits.
        self.pending.push((leaf as u16, delta));
        if self.pending.len() >= PENDING_CHANGES_MAX {
            self.apply_pending();
        }
        debug_assert!(self.pending.len() < PENDING_CHANGES_MAX);
    }

    /// Applies the pending leaf changes (module docs).
    fn apply_pending(&mut self) {
        let leaves = level_start(DEPTH);
        // The leaves first, in a loop of their own: its loads are independent of each other, so
        // their cache misses overlap; the marking below reads the small dirty bitset only.
        // Taken out while applied (the marking borrows the tree), and put back to keep its
        // allocation.
        let mut pending = std::mem::take(&mut self.pending);
        for &(leaf, delta) in &pending {
            self.nodes[leaves + usize::from(leaf)] ^= delta;
        }
        for &(leaf, _) in &pending {
            // Marks the path up to the root, stopping at the first node already marked: its
            // own path was marked with it.
            let mut index = usize::from(leaf);
            for depth in (0..DEPTH).rev() {
                index /= FANOUT;
                let node = level_start(depth) + index;
                if self.is_dirty(node) {
                    break;
                }
                self.mark(node);
            }
        }
        pending.clear();
        self.pending = pending;
    }

    fn is_dirty(&self, node: usize) -> bool {
        self.dirty[node / 64] & (1 << (node % 64)) != 0
    }

    fn mark(&mut self, node: usize) {
        self.dirty[node / 64] |= 1 << (node % 64);
    }

    fn refresh(&mut self) {
        self.apply_pending();
        // Every applied change marks its path up to the root, so a clean root means a clean
        // tree.
        if !self.is_dirty(0) {
            return;
        }
        for depth in (0..DEPTH).rev() {
            let (start, below) = (level_start(depth), level_start(depth + 1));
            for i in 0..FANOUT.pow(depth) {
                let node = start + i;
                if !self.is_dirty(node) {
                    continue;
                }
                let children = below + i * FANOUT;
                let mut bytes = [0u8; 8 * FANOUT];
                for (c, child) in self.nodes[children..children + FANOUT].iter().enumerate() {
                    bytes[c * 8..(c + 1) * 8].copy_from_slice(&child.to_le_bytes());
                }
                self.nodes[node] = xxh3_64(&bytes);
                self.dirty[node / 64] &= !(1 << (node % 64));
            }
        }
        debug_assert!(
            self.dirty.iter().all(|w| *w == 0),
            "a refreshed tree has no dirty node"
        );
    }

    /// The root hash: equal for replicas holding the same versions of the same keys.
    pub fn root(&mut self) -> u64 {
        self.refresh();
        self.nodes[0]
    }

    /// The hashes of level `depth` (0 = root, [`DEPTH`] = leaves).
    ///
    /// # Panics
    ///
    /// If `depth > DEPTH`.
    pub fn level(&mut self, depth: u32) -> &[u64] {
        assert!(depth <= DEPTH, "level {depth} below the leaves");
        self.refresh();
        &self.nodes[level_start(depth)..level_start(depth + 1)]
    }

    /// Of the `(index, hash)` pairs another replica sent for level `depth`, the indexes whose hash
    /// differs here, in the order given. Out-of-range indexes count as differing.
    pub fn differing(&mut self, depth: u32, theirs: &[(usize, u64)]) -> Vec<usize> {
        let ours = self.level(depth);
        theirs
            .iter()
            .filter(|(i, h)| ours.get(*i) != Some(h))
            .map(|(i, _)| *i)
            .collect()
    }

    /// The children (indexes at level `depth + 1`) of node `index` at level `depth`.
    pub fn children(depth: u32, index: usize) -> std::ops::Range<usize> {
        assert!(depth < DEPTH, "leaves have no children");
        index * FANOUT..(index + 1) * FANOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> u64 {
        xxh3_64(&i.to_le_bytes())
    }

    /// The tree is a function of the set of (key, version) pairs, not of the order of writes,
    /// and removing what was added returns it to empty.
    #[test]
    fn order_independent_and_reversible() {
        let mut a = MerkleTree::new();
        let mut b = MerkleTree::new();
        for i in 0..500 {
            a.update(h(i), None, Some(i));
        }
        for i in (0..500).rev() {
            b.update(h(i), None, Some(i));
        }
        assert_eq!(a.root(), b.root());
        assert_eq!(a.len(), 500);
        for i in 0..500 {
            a.update(h(i), Some(i), None);
        }
        assert_eq!(a.root(), MerkleTree::new().root());
        assert!(a.is_empty());
    }

    /// The root read between writes (each read clears the dirty flags, and the next writes mark
    /// only part of their paths) is the root of the same keys computed from the leaves alone.
    #[test]
    fn reads_between_writes_leave_no_stale_inner_hash() {
        fn from_leaves(leaves: &[u64]) -> u64 {
            let mut level = leaves.to_vec();
            while level.len() > 1 {
                level = level
                    .chunks(FANOUT)
                    .map(|children| {
                        let bytes: Vec<u8> =
                            children.iter().flat_map(|c| c.to_le_bytes()).collect();
                        xxh3_64(&bytes)
                    })
                    .collect();
            }
            level[0]
        }
        let mut tree = MerkleTree::new();
        for i in 0..3000u64 {
            // Two writes under one parent, then one elsewhere, then a read.
            tree.update(h(i), None, Some(i));
            tree.update(h(i + 1_000_000), None, Some(i));
            if i % 7 == 0 {
                tree.update(h(i), Some(i), Some(i + 1));
                tree.update(h(i), Some(i + 1), Some(i));
            }
            if i % 3 == 0 {
                let root = tree.root();
                assert_eq!(root, from_leaves(tree.level(DEPTH)), "after write {i}");
            }
        }
        assert_eq!(tree.root(), from_leaves(tree.level(DEPTH)));
        assert_ne!(tree.root(), MerkleTree::new().root());
    }

    /// Writes applied in batches (many without a read between them, so whole batches apply
    /// when full and a partial one when read) give the tree that writes applied one by one
    /// give, leaves and root: a tree read after every write applies each at once.
    #[test]
    fn batched_writes_give_the_tree_of_writes_applied_one_by_one() {
        let mut batched = MerkleTree::new();
        let mut eager = MerkleTree::new();
        let mut write = |i: u64, old: Option<u64>, new: Option<u64>| {
            batched.update(h(i), old, new);
            eager.update(h(i), old, new);
            eager.root();
        };
        let keys = 3 * PENDING_CHANGES_MAX as u64 + 17;
        for i in 0..keys {
            write(i, None, Some(i));
        }
        for i in (0..keys).step_by(3) {
            write(i, Some(i), Some(i + 1));
        }
        for i in (0..keys).step_by(5) {
            let old = if i % 3 == 0 { i + 1 } else { i };
            write(i, Some(old), None);
        }
        assert_eq!(batched.len(), eager.len());
        assert!(
            batched.pending.len() < PENDING_CHANGES_MAX,
            "full batches are applied"
        );
        assert_eq!(batched.level(DEPTH), eager.level(DEPTH));
        assert_eq!(batched.root(), eager.root());
        assert_ne!(batched.root(), MerkleTree::new().root());
        // A few more, fewer than a batch: the read applies them.
        for i in keys..keys + 5 {
            batched.update(h(i), None, Some(i));
            eager.update(h(i), None, Some(i));
        }
        assert_eq!(batched.root(), eager.root());
    }

    /// One changed version is found by descending only through differing nodes, down to its
    /// leaf.
    #[test]
    fn descent_finds_the_differing_leaf() {
        let mut a = MerkleTree::new();
        let mut b = MerkleTree::new();
        for i in 0..2000 {
            a.update(h(i), None, Some(1));
            b.update(h(i), None, Some(1));
        }
        b.update(h(777), Some(1), Some(2));
        assert_ne!(a.root(), b.root());
        let mut frontier = vec![0usize];
        for depth in 0..DEPTH {
            let theirs: Vec<(usize, u64)> = frontier
                .iter()
                .flat_map(|&i| MerkleTree::children(depth, i))
                .map(|c| (c, b.level(depth + 1)[c]))
                .collect();
            frontier = a.differing(depth + 1, &theirs);
            assert_eq!(frontier.len(), 1, "exactly one path differs");
        }
        assert_eq!(frontier, vec![leaf_of(h(777))]);
    }
}
