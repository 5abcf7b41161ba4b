//! Key choosers: uniform, zipfian and latest, as YCSB defines them.
//!
//! The zipfian generator is YCSB's (Gray et al., "Quickly generating billion-record synthetic
//! databases", SIGMOD 1994): constant time per draw after an O(n) sum computed once per key
//! count, and extended incrementally when the key count grows (inserts of workload D). With
//! θ = 0.99 the most popular of 10,000 keys receives about 10% of the draws. Popularity ranks are
//! scattered over the key space with an FNV hash (YCSB's "scrambled zipfian"), so the hot keys
//! land on different partitions and nodes rather than being the first few key numbers. `latest`
//! draws a zipfian rank over recency instead: rank 0 is the newest key.
//!
//! Everything here is deterministic given the random generator's seed; nothing reads a clock.

use rand::Rng;

use super::spec::Distribution;

/// Length of a key made by [`key_of`].
pub const KEY_LEN: usize = 16;

/// The key with number `n`: `k` followed by `n` in 15 zero-padded decimal digits, so keys sort
/// in number order and all have one length. The engine benchmark uses the same keys.
pub fn key_of(n: u64) -> [u8; KEY_LEN] {
    let mut k = [b'0'; KEY_LEN];
    k[0] = b'k';
    let mut v = n;
    for b in k[1..].iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
    k
}

/// YCSB's zipfian constant.
pub const ZIPFIAN_THETA: f64 = 0.99;

/// Sum of `1 / i^theta` for `i` in `from+1..=to`.
fn zeta_range(from: u64, to: u64, theta: f64) -> f64 {
    (from + 1..=to).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

/// Zipfian popularity ranks in `0..items`: rank 0 is the most popular.
#[derive(Clone, Debug)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta2: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    /// A generator over `items` ranks (at least 1).
    pub fn new(items: u64, theta: f64) -> Self {
        assert!(theta > 0.0 && theta < 1.0, "theta must be in (0, 1)");
        let items = items.max(1);
        let mut z = Self {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta2: zeta_range(0, 2, theta),
            zetan: zeta_range(0, items, theta),
            eta: 0.0,
        };
        z.eta = z.eta_of();
        z
    }

    fn eta_of(&self) -> f64 {
        (1.0 - (2.0 / self.items as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2 / self.zetan)
    }

    /// Number of ranks.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// Extends the ranks to `items` (never shrinks), in time proportional to the growth.
    pub fn grow_to(&mut self, items: u64) {
        if items <= self.items {
            return;
        }
        self.zetan += zeta_range(self.items, items, self.theta);
        self.items = items;
        self.eta = self.eta_of();
    }

    /// Draws a rank in `0..items()`.
    pub fn next_rank(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.r#gen();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.items - 1)
    }
}

/// FNV-1a over the 8 bytes of `n`: scatters popularity ranks over the key space.
pub fn fnv64(n: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in n.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Picks key numbers by a [`Distribution`] over a key space that may grow.
#[derive(Clone, Debug)]
pub struct KeyChooser {
    distribution: Distribution,
    zipf: Option<Zipfian>,
}

impl KeyChooser {
    /// A chooser over `keys` keys. The zipfian sum is computed here, in O(`keys`): build one
    /// chooser and clone it for each worker.
    pub fn new(distribution: Distribution, keys: u64) -> Self {
        let zipf = match distribution {
            Distribution::Uniform => None,
            Distribution::Zipfian | Distribution::Latest => {
                Some(Zipfian::new(keys.max(1), ZIPFIAN_THETA))
            }
        };
        Self { distribution, zipf }
    }

    /// The distribution keys are drawn from.
    pub fn distribution(&self) -> Distribution {
        self.distribution
    }

    /// A key number in `0..keys`, where `keys` (at least 1) is the current size of the key space
    /// (it grows with inserts).
    pub fn next(&mut self, rng: &mut impl Rng, keys: u64) -> u64 {
        let keys = keys.max(1);
        match (self.distribution, &mut self.zipf) {
            (Distribution::Uniform, _) | (_, None) => rng.gen_range(0..keys),
            (Distribution::Zipfian, Some(z)) => {
                z.grow_to(keys);
                let rank = z.next_rank(rng);
                fnv64(rank) % keys
            }
            (Distribution::Latest, Some(z)) => {
                z.grow_to(keys);
                let rank = z.next_rank(rng).min(keys - 1);
                keys - 1 - rank
            }
        }
    }
}
