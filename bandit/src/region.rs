//! `FeasibleRegion`: the arms a policy may still choose, as the learned feasibility filter
//! hands them to `Policy::choose_in` (kept apart from the filter so that policies and the filter
//! do not import each other).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::arm::{Arm, ArmSpace};

/// The set of arms still allowed, as seen by a policy's `choose_in`.
///
/// It is monotone: if `(p, r)` is excluded so is every `(p', r')` with `p' <= p`, `r' >= r`.
/// For a rank `r` the allowed ratios are exactly those above [`FeasibleRegion::ratio_floor`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeasibleRegion {
    corners: Vec<Arm>,
}

impl FeasibleRegion {
    /// No exclusions.
    pub fn all() -> Self {
        FeasibleRegion::default()
    }

    /// The region left after excluding each corner's dominated quadrant.
    pub fn excluding(corners: impl IntoIterator<Item = Arm>) -> Self {
        FeasibleRegion {
            corners: corners.into_iter().collect(),
        }
    }

    /// The arms not costlier than the given ones taken together: excluded is every arm at once
    /// at or below their lowest ratio and at or above their highest rank (a lower ratio keeps
    /// more of the model, a higher rank trains more parameters: the cost order this region's
    /// monotone shape already assumes), except that corner itself. No arms: no exclusions.
    pub fn no_costlier_than(arms: &[Arm]) -> Self {
        let Some(lowest) = arms.iter().map(|a| a.prune_ratio).reduce(f64::min) else {
            return FeasibleRegion::all();
        };
        let highest = arms.iter().map(|a| a.rank).max().expect("not empty");
        let mut corners = vec![Arm {
            prune_ratio: lowest,
            rank: highest.saturating_add(1),
        }];
        if lowest > 0.0 {
            corners.push(Arm {
                prune_ratio: next_down(lowest),
                rank: highest,
            });
        }
        FeasibleRegion { corners }
    }

    /// Arms allowed by both regions.
    pub fn intersect(&self, other: &FeasibleRegion) -> FeasibleRegion {
        let mut corners = self.corners.clone();
        corners.extend_from_slice(&other.corners);
        FeasibleRegion { corners }
    }

    pub fn is_unrestricted(&self) -> bool {
        self.corners.is_empty()
    }

    /// For `rank`, the largest excluded ratio: ratios `<=` it are infeasible, ratios above are
    /// allowed. `None` when nothing is excluded at this rank.
    pub fn ratio_floor(&self, rank: u32) -> Option<f64> {
        self.corners
            .iter()
            .filter(|c| c.rank <= rank)
            .map(|c| c.prune_ratio)
            .fold(None, |acc: Option<f64>, p| {
                Some(acc.map_or(p, |a| a.max(p)))
            })
    }

    pub fn contains(&self, arm: &Arm) -> bool {
        match self.ratio_floor(arm.rank) {
            Some(floor) => arm.prune_ratio > floor,
            None => true,
        }
    }

    /// Whether some ratio in `[lo, hi]` (or `[lo, hi)`, the answer is the same) is allowed at
    /// `rank`.
    pub fn allows_some(&self, rank: u32, hi: f64) -> bool {
        match self.ratio_floor(rank) {
            Some(floor) => floor < hi,
            None => true,
        }
    }

    /// A ratio drawn uniformly from the allowed part of `[lo, hi)` at `rank` (`lo` itself when
    /// `lo == hi`). The caller must have checked [`FeasibleRegion::allows_some`].
    pub fn sample_ratio(&self, rank: u32, lo: f64, hi: f64, rng: &mut ChaCha8Rng) -> f64 {
        let floor = self.ratio_floor(rank);
        let start = floor.map_or(lo, |f| f.max(lo));
        let u: f64 = rng.random();
        let mut p = start + (hi - start) * u;
        if let Some(f) = floor {
            if p <= f {
                p = next_up(f).min(hi);
            }
        }
        p.clamp(lo, hi)
    }

    /// Does the arm space have any allowed arm at all?
    pub fn allows_any(&self, space: &ArmSpace) -> bool {
        space
            .ranks
            .iter()
            .any(|&r| self.allows_some(r, space.ratio_max))
    }
}

/// The smallest `f64` above a finite, non-negative `x` (stable-Rust stand-in for `next_up`).
fn next_up(x: f64) -> f64 {
    if x < 0.0 {
        return 0.0;
    }
    f64::from_bits(x.to_bits() + 1)
}

/// The largest `f64` below a finite, positive `x`.
fn next_down(x: f64) -> f64 {
    f64::from_bits(x.to_bits() - 1)
}
