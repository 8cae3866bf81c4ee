//! `ArmGrid`, the discretised arm set behind UCB1, discounted/sliding-window UCB, Thompson, EXP3 and epsilon-greedy.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::arm::{Arm, ArmSpace, RATIO_TOLERANCE};
use crate::error::BanditError;
use crate::region::FeasibleRegion;

/// `n_ratios` evenly spaced ratios times every allowed rank, indexed ratio-major (see
/// [`ArmSpace::grid`]). Arms are computed, not stored, so a checkpoint stays small.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmGrid {
    pub space: ArmSpace,
    /// Number of distinct ratios (1 when the ratio interval has zero width).
    pub n_ratios: usize,
}

impl ArmGrid {
    pub fn new(space: ArmSpace, n_ratios: usize) -> Result<Self, BanditError> {
        space.validate()?;
        if n_ratios == 0 {
            return Err(BanditError::EmptyGrid { what: "n_ratios" });
        }
        let n_ratios = if space.ratio_min == space.ratio_max {
            1
        } else {
            n_ratios
        };
        Ok(ArmGrid { space, n_ratios })
    }

    pub fn len(&self) -> usize {
        self.n_ratios * self.space.ranks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn arm(&self, index: usize) -> Arm {
        let k = self.space.ranks.len();
        Arm {
            prune_ratio: self.space.grid_ratio(index / k, self.n_ratios),
            rank: self.space.ranks[index % k],
        }
    }

    /// Index of a grid arm; arms outside the space or between grid points are unknown.
    pub fn index_of(&self, arm: &Arm) -> Result<usize, BanditError> {
        self.space.check(arm)?;
        let rank_idx = self.space.rank_index(arm.rank).expect("checked above");
        let width = self.space.ratio_max - self.space.ratio_min;
        let ratio_idx = if self.n_ratios == 1 || width == 0.0 {
            0
        } else {
            let x = (arm.prune_ratio - self.space.ratio_min) / width * (self.n_ratios - 1) as f64;
            (x.round() as usize).min(self.n_ratios - 1)
        };
        let grid_ratio = self.space.grid_ratio(ratio_idx, self.n_ratios);
        if (grid_ratio - arm.prune_ratio).abs() > RATIO_TOLERANCE {
            return Err(BanditError::UnknownArm {
                arm: *arm,
                reason: format!(
                    "pruning ratio is not on this policy's grid of {} ratios (nearest {grid_ratio})",
                    self.n_ratios
                ),
            });
        }
        Ok(ratio_idx * self.space.ranks.len() + rank_idx)
    }

    /// Indices of the grid arms inside `region`, ascending.
    pub fn feasible(&self, region: &FeasibleRegion) -> Vec<usize> {
        self.feasible_iter(region).collect()
    }

    /// Like [`ArmGrid::feasible`], without allocating.
    pub fn feasible_iter<'a>(
        &'a self,
        region: &'a FeasibleRegion,
    ) -> impl Iterator<Item = usize> + 'a {
        let all = region.is_unrestricted();
        (0..self.len()).filter(move |&i| all || region.contains(&self.arm(i)))
    }
}

impl ArmGrid {
    /// The feasible grid arm with the highest mean among those with a positive count
    /// (`stats(i)` gives arm `i`'s count and reward sum), ties at random; `None` when no
    /// feasible arm was played. What every grid policy exploits.
    pub(crate) fn best_mean(
        &self,
        region: &FeasibleRegion,
        stats: impl Fn(usize) -> (f64, f64),
        rng: &mut ChaCha8Rng,
    ) -> Option<Arm> {
        let scored = self.feasible_iter(region).filter_map(|i| {
            let (count, sum) = stats(i);
            (count > 0.0).then(|| (i, sum / count))
        });
        argmax_random_tie(scored, rng).map(|i| self.arm(i))
    }
}

/// `Policy::exploit_in` for a grid policy whose `stats: Vec<ArmStats>` hold every arm's plays.
macro_rules! exploit_best_mean {
    () => {
        fn exploit_in(
            &self,
            _ctx: &DeviceContext,
            region: &FeasibleRegion,
            rng: &mut ChaCha8Rng,
        ) -> Option<Arm> {
            self.grid.best_mean(
                region,
                |i| (self.stats[i].count as f64, self.stats[i].sum),
                rng,
            )
        }
    };
}
pub(crate) use exploit_best_mean;

/// The index with the largest score (`+inf` allowed); ties broken uniformly at random.
/// `None` when `scored` is empty.
pub(crate) fn argmax_random_tie(
    scored: impl IntoIterator<Item = (usize, f64)>,
    rng: &mut ChaCha8Rng,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    let mut ties = 0u32;
    for (i, v) in scored {
        match best {
            None => {
                best = Some((i, v));
                ties = 1;
            }
            Some((_, b)) if v > b => {
                best = Some((i, v));
                ties = 1;
            }
            Some((_, b)) if v == b => {
                ties += 1;
                if rng.random_range(0..ties) == 0 {
                    best = Some((i, v));
                }
            }
            _ => {}
        }
    }
    best.map(|(i, _)| i)
}

/// Running count and reward sum of one arm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ArmStats {
    pub count: u64,
    pub sum: f64,
}

impl ArmStats {
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}
