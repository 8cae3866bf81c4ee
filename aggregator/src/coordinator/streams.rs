//! Named random streams derived from a run's seed, so that what one part of a run draws never
//! shifts what another part draws: strategies compared on the same seed see the same data
//! partition, availability, device selection and local-round seeds, whatever their policies
//! consume.
//!
//! A stream's key is `SHA-256("fedspine/stream/v1" || len(label) || label || seed)`, the 32-byte
//! seed of a `ChaCha8Rng`. A [`Stream`] is used two ways:
//! - sequentially ([`Stream::rng`], [`Stream::rng_for`]: the generator, or one of its 2^64
//!   ChaCha sub-streams, e.g. one per device; [`Stream::rng_at`]: a generator per pair, e.g. a
//!   device's draws in one round);
//! - by random access ([`Stream::at`]): one `u64` per `(a, b)` pair, e.g. per (round, device),
//!   read at a fixed position of sub-stream `a`. Nothing is consumed, so the value of a pair
//!   does not depend on which other pairs were read or in what order: this is what makes the
//!   device selection of a round the same for every strategy that sees the same idle devices.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Labels of the streams the coordinator and the simulator use.
pub mod label {
    /// The initial global adapter (`A` factors).
    pub const GLOBAL_INIT: &str = "global-init";
    /// Which idle devices a round selects (random access by round and device).
    pub const SELECTION: &str = "selection";
    /// The bandits' own randomness (sequential; checkpointed).
    pub const POLICY: &str = "policy";
    /// The seed of each device's local round (random access by round and device).
    pub const TRAINING: &str = "training";
    /// The data partition over devices and each device's held-out split (simulator).
    pub const PARTITION: &str = "partition";
    /// Availability: start times, churn, daily-window phases, power modes (simulator).
    pub const AVAILABILITY: &str = "availability";
    /// Per-round device noise: speed draw and dropout (simulator; by device and round).
    pub const DEVICE_ROUND: &str = "device-round";
    /// The evaluation panel and the final evaluation set (simulator).
    pub const EVALUATION: &str = "evaluation";
}

/// One named stream of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    key: [u8; 32],
}

impl Stream {
    /// The stream `label` of the run seeded with `seed`.
    pub fn new(seed: u64, label: &str) -> Stream {
        let mut h = Sha256::new();
        h.update(b"fedspine/stream/v1");
        h.update((label.len() as u64).to_le_bytes());
        h.update(label.as_bytes());
        h.update(seed.to_le_bytes());
        Stream {
            key: h.finalize().into(),
        }
    }

    /// The stream's generator from its start.
    pub fn rng(&self) -> ChaCha8Rng {
        ChaCha8Rng::from_seed(self.key)
    }

    /// Sub-stream `n` of the stream (independent of every other sub-stream), from its start.
    pub fn rng_for(&self, n: u64) -> ChaCha8Rng {
        let mut r = self.rng();
        r.set_stream(n);
        r
    }

    /// A generator for pair `(a, b)` (e.g. a device's draws in one round): sub-stream `a` from
    /// word `b * 2^32`, so pairs never overlap while each draws fewer than 2^31 values. `b` is
    /// taken modulo 2^36.
    pub fn rng_at(&self, a: u64, b: u64) -> ChaCha8Rng {
        let mut r = self.rng_for(a);
        r.set_word_pos(u128::from(b & ((1 << 36) - 1)) << 32);
        r
    }

    /// The value of pair `(a, b)`: word pair `b` of sub-stream `a`. Reading it consumes
    /// nothing, so the result does not depend on what else was read. `b` is taken modulo
    /// 2^63 (ChaCha's position counter holds 2^68 words).
    pub fn at(&self, a: u64, b: u64) -> u64 {
        let mut r = self.rng_for(a);
        r.set_word_pos(u128::from(b & (u64::MAX >> 1)) * 2);
        r.next_u64()
    }

    /// Random access to sub-stream `a` for many `b`, cheaper than [`Stream::at`] per pair when
    /// the `b` come in increasing order (a round's idle devices in id order): one generator,
    /// moved forward within its buffered block instead of re-keyed per pair. Each value equals
    /// `self.at(a, b)` whatever the order of reads.
    pub fn pairs(&self, a: u64) -> PairReader {
        PairReader {
            rng: self.rng_for(a),
        }
    }
}

/// Sub-stream `a` of a [`Stream`] read by pair (see [`Stream::pairs`]).
#[derive(Clone, Debug)]
pub struct PairReader {
    rng: ChaCha8Rng,
}

impl PairReader {
    /// Words read and discarded rather than repositioning (a reposition regenerates ChaCha's
    /// 64-word buffer; skipping a few words inside it is a copy each).
    const SKIP_LIMIT: u128 = 16;

    /// The value of pair `b` (the same as [`Stream::at`]`(a, b)`).
    pub fn at(&mut self, b: u64) -> u64 {
        let target = u128::from(b & (u64::MAX >> 1)) * 2;
        let pos = self.rng.get_word_pos();
        if target < pos || target - pos > Self::SKIP_LIMIT {
            self.rng.set_word_pos(target);
        } else {
            for _ in 0..(target - pos) {
                let _ = self.rng.next_u32();
            }
        }
        self.rng.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_differ_by_label_and_seed_and_repeat_exactly() {
        let a = Stream::new(7, label::SELECTION);
        assert_eq!(a, Stream::new(7, label::SELECTION));
        assert_ne!(a, Stream::new(8, label::SELECTION));
        assert_ne!(a, Stream::new(7, label::POLICY));
        let x: Vec<u64> = (0..4).map(|_| a.rng().random()).collect();
        let mut r = a.rng();
        let y: Vec<u64> = (0..4).map(|_| r.random()).collect();
        assert_eq!(x[0], y[0]);
        assert_ne!(y[0], y[1]);
        assert_ne!(a.rng_for(1).random::<u64>(), a.rng_for(2).random::<u64>());
    }

    #[test]
    fn random_access_does_not_depend_on_the_order_of_reads() {
        let s = Stream::new(3, label::TRAINING);
        let forward: Vec<u64> = (0..50).map(|d| s.at(4, d)).collect();
        let backward: Vec<u64> = (0..50).rev().map(|d| s.at(4, d)).collect();
        assert!(forward.iter().eq(backward.iter().rev()));
        let mut sorted = forward.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 50, "pairs give distinct values");
        assert_ne!(s.at(4, 0), s.at(5, 0));
        // Reading pair (a, b) is the same as reading that position of the sequential stream.
        let mut r = s.rng_for(4);
        let _ = r.next_u64();
        let _ = r.next_u64();
        assert_eq!(r.next_u64(), s.at(4, 2));
    }

    #[test]
    fn a_pair_reader_gives_the_random_access_values_in_any_order() {
        let s = Stream::new(11, label::SELECTION);
        // Increasing with small and large gaps, then backwards, repeats and the top of the range.
        let bs: Vec<u64> = [
            0,
            1,
            2,
            5,
            6,
            30,
            31,
            40,
            1_000,
            1_001,
            7,
            7,
            3,
            u64::MAX,
            0,
        ]
        .into_iter()
        .collect();
        let mut reader = s.pairs(9);
        for b in bs {
            assert_eq!(reader.at(b), s.at(9, b), "pair {b}");
        }
    }
}
