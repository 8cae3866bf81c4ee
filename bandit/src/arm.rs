//! The arm space (pruning-ratio interval x LoRA ranks) arms live in, and the device context a policy sees.

use serde::{Deserialize, Serialize};

use crate::error::BanditError;

/// One choice for one device and round (pruning ratio, LoRA rank): the wire type itself, so the
/// coordinator sends what the policy chose without a conversion.
pub use protocol::Arm;

/// Two ratios closer than this are the same grid point (guards against decimal round-off in
/// configs and traces; grid ratios themselves are computed exactly the same way every time).
pub const RATIO_TOLERANCE: f64 = 1e-9;

/// The arms a policy may play: a continuous pruning-ratio interval times a set of LoRA ranks.
///
/// Build it with [`ArmSpace::new`] (which sorts and de-duplicates the ranks) or deserialize it
/// and call [`ArmSpace::validate`]; every policy constructor validates it again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmSpace {
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// Allowed LoRA ranks, ascending and distinct once validated.
    pub ranks: Vec<u32>,
}

impl Default for ArmSpace {
    /// The FedSpine default: ratio in [0, 0.6], ranks {4, 8, 16, 32, 64}.
    fn default() -> Self {
        ArmSpace {
            ratio_min: 0.0,
            ratio_max: 0.6,
            ranks: vec![4, 8, 16, 32, 64],
        }
    }
}

impl ArmSpace {
    /// A validated arm space; `ranks` is sorted and de-duplicated.
    pub fn new(ratio_min: f64, ratio_max: f64, mut ranks: Vec<u32>) -> Result<Self, BanditError> {
        ranks.sort_unstable();
        ranks.dedup();
        let space = ArmSpace {
            ratio_min,
            ratio_max,
            ranks,
        };
        space.validate()?;
        Ok(space)
    }

    /// Checks the invariants: finite `0 <= ratio_min <= ratio_max <= 1`, a non-empty rank set
    /// of non-zero, strictly ascending ranks.
    pub fn validate(&self) -> Result<(), BanditError> {
        let (min, max) = (self.ratio_min, self.ratio_max);
        if !(min.is_finite() && max.is_finite() && 0.0 <= min && min <= max && max <= 1.0) {
            return Err(BanditError::InvalidRatioRange { min, max });
        }
        if self.ranks.is_empty() {
            return Err(BanditError::EmptyRankSet);
        }
        if let Some(&rank) = self.ranks.iter().find(|&&r| r == 0) {
            return Err(BanditError::InvalidRank { rank });
        }
        if self.ranks.windows(2).any(|w| w[0] >= w[1]) {
            return Err(BanditError::param(
                "ranks",
                format!("{:?}", self.ranks),
                "strictly ascending ranks (ArmSpace::new sorts them)",
            ));
        }
        Ok(())
    }

    /// Position of `rank` in the allowed set.
    pub fn rank_index(&self, rank: u32) -> Option<usize> {
        self.ranks.binary_search(&rank).ok()
    }

    /// Whether `arm` lies in the space (ratio inside the interval, rank allowed).
    pub fn contains(&self, arm: &Arm) -> bool {
        self.check(arm).is_ok()
    }

    /// Like [`ArmSpace::contains`], but says why not.
    pub fn check(&self, arm: &Arm) -> Result<(), BanditError> {
        let p = arm.prune_ratio;
        if !p.is_finite() || p < self.ratio_min || p > self.ratio_max {
            return Err(BanditError::UnknownArm {
                arm: *arm,
                reason: format!(
                    "pruning ratio outside [{}, {}]",
                    self.ratio_min, self.ratio_max
                ),
            });
        }
        if self.rank_index(arm.rank).is_none() {
            return Err(BanditError::UnknownArm {
                arm: *arm,
                reason: format!("rank not in the allowed set {:?}", self.ranks),
            });
        }
        Ok(())
    }

    /// The `k`-th of `n` evenly spaced ratios from `ratio_min` to `ratio_max` inclusive
    /// (`n == 1` gives `ratio_min`).
    pub fn grid_ratio(&self, k: usize, n: usize) -> f64 {
        if n <= 1 {
            return self.ratio_min;
        }
        if k + 1 == n {
            return self.ratio_max;
        }
        self.ratio_min + (self.ratio_max - self.ratio_min) * (k as f64) / ((n - 1) as f64)
    }

    /// Discretises the space: `n_ratios` evenly spaced ratios (both ends included) times every
    /// allowed rank, ordered ratio-major (`index = ratio_index * ranks.len() + rank_index`).
    /// Duplicate ratios (a zero-width interval) collapse to one.
    pub fn grid(&self, n_ratios: usize) -> Result<Vec<Arm>, BanditError> {
        self.validate()?;
        if n_ratios == 0 {
            return Err(BanditError::EmptyGrid { what: "n_ratios" });
        }
        let n = if self.ratio_min == self.ratio_max {
            1
        } else {
            n_ratios
        };
        let mut arms = Vec::with_capacity(n * self.ranks.len());
        for k in 0..n {
            let prune_ratio = self.grid_ratio(k, n);
            arms.extend(self.ranks.iter().map(|&rank| Arm { prune_ratio, rank }));
        }
        Ok(arms)
    }

    /// A point's coordinates scaled to [0, 1] on both axes (rank by its index in the set), used
    /// to measure distances between arms independently of units.
    pub fn normalised(&self, arm: &Arm) -> (f64, f64) {
        let width = self.ratio_max - self.ratio_min;
        let x = if width > 0.0 {
            (arm.prune_ratio - self.ratio_min) / width
        } else {
            0.0
        };
        let k = self.ranks.len();
        let idx = match self.ranks.binary_search(&arm.rank) {
            Ok(i) => i as f64,
            Err(i) => i as f64 - 0.5,
        };
        let y = if k > 1 { idx / (k - 1) as f64 } else { 0.0 };
        (x, y)
    }
}

/// What a policy knows about the device it is choosing for. Capability hints are optional and
/// policies may ignore them; the feasibility filter uses them to judge observations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceContext {
    pub device_id: u64,
    pub round: u64,
    /// Memory the device can give to training, if it reported it.
    pub ram_bytes: Option<u64>,
    /// The round's deadline for this device's local work, if there is one.
    pub deadline_ms: Option<u64>,
}

impl DeviceContext {
    pub fn new(device_id: u64, round: u64) -> Self {
        DeviceContext {
            device_id,
            round,
            ram_bytes: None,
            deadline_ms: None,
        }
    }
}
