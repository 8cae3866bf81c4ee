//! Linear UCB over an `ArmGrid`: one reward model shared by every arm.
//!
//! The grid policies (UCB1, Thompson, ...) learn each arm's mean from that arm's plays alone, so
//! with 18-30 arms a device's first ten plays say almost nothing about the arms it did not play,
//! and an arm that scored well once or twice is exploited on that evidence (BENCHMARKS.md,
//! "Where the fixed arm's lead comes from"). This policy assumes the reward is additive in the
//! pace and the rank,
//!
//! ```text
//! r(arm) ~ theta . phi(arm),  phi = [1, x, (3 x^2 - 1) / 2, e_rank(2), ..., e_rank(k)]
//! ```
//!
//! with `x` the arm's ratio scaled to [-1, 1] over the space (the second Legendre polynomial
//! for the curvature, so every feature spans about one unit and the ridge penalty weighs them
//! alike; with `x` in [-0.5, 0.5] the penalty flattened the curvature and the model's best arm
//! went to an end of the interval) and `e_rank(j)` one for the arm's rank (the first rank is
//! the baseline). Every play then informs every arm that shares
//! its pace or its rank. `theta` is the ridge estimate `A^-1 b` with `A = ridge I + sum phi
//! phi^T` and `b = sum (r - prior_mean) phi`; an arm's score is `prior_mean + theta . phi +
//! exploration * sqrt(phi^T A^-1 phi)` (LinUCB, Li et al. 2010), and the best feasible grid arm
//! plays. Its exploited arm is the model's best feasible grid arm, played or not.
//!
//! The additive model is wrong wherever pace and rank interact; it trades that bias for
//! pooling. Two options widen it (both off by default, so the defaults' figures stand):
//!
//! - `interaction = true` adds `x e_rank(j)` for every rank but the first: each rank gets its
//!   own slope in the pace (the curvature stays shared), `d = 1 + 2 ranks`.
//! - `discount = g < 1` forgets: before each play's update `A <- g A + (1 - g) ridge I` and
//!   `b <- g b`, so a play's weight halves after `ln 2 / -ln g` later plays and `A` never
//!   falls below `ridge I`. This is the discounted LinUCB of Russac, Vernade and Cappe (2019)
//!   with one simplification: the width is `sqrt(phi^T A^-1 phi)`, not their
//!   `sqrt(phi^T A^-1 V~ A^-1 phi)`, which needs a second matrix of squared discounts. Here
//!   `A = ridge I + sum g^k phi phi^T`; with the same ridge `V~ = ridge I + sum g^2k phi
//!   phi^T` is no larger than `A` (each `g^2k <= g^k`), so `A^-1 V~ A^-1 <= A^-1`: the width
//!   used here is never narrower than theirs, and explores at least as much.
//!
//! The state is a `d x d` matrix and a `d`-vector, `d = 2 + ranks` (additive) or `1 + 2 ranks`
//! (with the interaction).

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::grid::argmax_random_tie;
use super::{check_range, check_reward, ArmGrid, Policy};
use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::region::FeasibleRegion;

/// The largest reward magnitude [`LinearUcb`] accepts: far outside any shaped reward ([0, 1],
/// [`crate::reward::shape_rewards`]), small enough that the model's sums stay finite.
pub const MAX_ABS_REWARD: f64 = 1e9;

/// What a usable state is, for the error that names a damaged one.
const STATE_EXPECTED: &str = concat!(
    "a state this policy wrote: A is d x d and positive definite, ",
    "b has d finite entries, d = 2 + ranks (1 + 2 ranks with interaction)"
);

/// Parameters of [`LinearUcb`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinearUcbConfig {
    /// Ratios in the grid (times every allowed rank). Default `6`.
    pub n_ratios: usize,
    /// Multiplier of the confidence width `sqrt(phi^T A^-1 phi)`. Default `0.15`, UCB1's
    /// (the width of an unplayed direction starts at `1 / sqrt(ridge)`), the better setting for
    /// the simulator's 20-odd plays per device; over hundreds of plays, or where plays fail
    /// inside the arm space, 0.3 keeps a misfitted model from locking onto one arm
    /// (`bandit/BENCHMARKS-bandit.md`).
    pub exploration: f64,
    /// Ridge penalty: how many observations' worth of weight the prior (every coefficient
    /// zero, i.e. every arm at `prior_mean`) carries. Default `1.0`.
    pub ridge: f64,
    /// The reward the model assumes before any play. Default `0.5` (middle of [0, 1]).
    pub prior_mean: f64,
    /// One slope in the pace per rank (`x e_rank(j)` features). Default `false`.
    pub interaction: bool,
    /// Weight each earlier play keeps per later play, in (0, 1]. Default `1.0` (never forget).
    pub discount: f64,
}

impl Default for LinearUcbConfig {
    fn default() -> Self {
        LinearUcbConfig {
            n_ratios: 6,
            exploration: 0.15,
            ridge: 1.0,
            prior_mean: 0.5,
            interaction: false,
            discount: 1.0,
        }
    }
}

/// Linear UCB with the features of the module docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearUcb {
    config: LinearUcbConfig,
    grid: ArmGrid,
    /// `A = ridge I + sum phi phi^T`, row-major, `d x d`.
    gram: Vec<f64>,
    /// `b = sum (r - prior_mean) phi`.
    target: Vec<f64>,
    /// Observations so far.
    plays: u64,
}

/// The Cholesky factor `L` (row-major, lower) of a symmetric positive definite `d x d` matrix;
/// `None` when it is not positive definite (only a corrupted state can make `A` so).
fn cholesky(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = a[i * d + j] - (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum::<f64>();
            if i == j {
                if !(s > 0.0 && s.is_finite()) {
                    return None;
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// `y` with `L y = v` (forward substitution), into `y`.
fn forward_into(l: &[f64], d: usize, v: &[f64], y: &mut [f64]) {
    for i in 0..d {
        let s: f64 = (0..i).map(|k| l[i * d + k] * y[k]).sum();
        y[i] = (v[i] - s) / l[i * d + i];
    }
}

/// `y` with `L y = v`.
fn forward(l: &[f64], d: usize, v: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; d];
    forward_into(l, d, v, &mut y);
    y
}

/// `x` with `L^T x = y` (back substitution).
fn backward(l: &[f64], d: usize, y: &[f64]) -> Vec<f64> {
    let mut x = vec![0.0; d];
    for i in (0..d).rev() {
        let s: f64 = (i + 1..d).map(|k| l[k * d + i] * x[k]).sum();
        x[i] = (y[i] - s) / l[i * d + i];
    }
    x
}

/// The fitted model at one moment: `L` and `theta`, and room for one arm's features and
/// solve (so scoring the grid allocates nothing per arm).
struct Fit {
    chol: Vec<f64>,
    theta: Vec<f64>,
    phi: Vec<f64>,
    y: Vec<f64>,
}

impl LinearUcb {
    pub fn new(space: ArmSpace, config: LinearUcbConfig) -> Result<Self, BanditError> {
        check_range(
            "exploration",
            config.exploration,
            0.0,
            f64::MAX,
            "a finite number >= 0",
        )?;
        check_range(
            "ridge",
            config.ridge,
            f64::MIN_POSITIVE,
            f64::MAX,
            "a finite number > 0",
        )?;
        check_range(
            "prior_mean",
            config.prior_mean,
            f64::MIN,
            f64::MAX,
            "a finite number",
        )?;
        check_range(
            "discount",
            config.discount,
            f64::MIN_POSITIVE,
            1.0,
            "a number in (0, 1]",
        )?;
        let grid = ArmGrid::new(space, config.n_ratios)?;
        let d = Self::dim_of(&grid.space, &config);
        let mut gram = vec![0.0; d * d];
        for i in 0..d {
            gram[i * d + i] = config.ridge;
        }
        Ok(LinearUcb {
            config,
            grid,
            gram,
            target: vec![0.0; d],
            plays: 0,
        })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.grid.space
    }

    pub fn config(&self) -> &LinearUcbConfig {
        &self.config
    }

    /// Observations so far.
    pub fn plays(&self) -> u64 {
        self.plays
    }

    /// `d`: the intercept, two pace terms, one indicator per rank but the first, and with
    /// `interaction` one slope per rank but the first.
    fn dim_of(space: &ArmSpace, config: &LinearUcbConfig) -> usize {
        let extra_ranks = space.ranks.len().saturating_sub(1);
        3 + extra_ranks + if config.interaction { extra_ranks } else { 0 }
    }

    fn dim(&self) -> usize {
        Self::dim_of(&self.grid.space, &self.config)
    }

    /// `phi(arm)` of the module docs (the arm is in the space: callers checked it).
    fn features(&self, arm: &Arm) -> Vec<f64> {
        let mut phi = vec![0.0; self.dim()];
        self.features_into(arm, &mut phi);
        phi
    }

    /// [`LinearUcb::features`] into `phi` (`d` entries).
    fn features_into(&self, arm: &Arm, phi: &mut [f64]) {
        let space = &self.grid.space;
        let width = space.ratio_max - space.ratio_min;
        let x = if width > 0.0 {
            2.0 * (arm.prune_ratio - space.ratio_min) / width - 1.0
        } else {
            0.0
        };
        phi.fill(0.0);
        phi[0] = 1.0;
        phi[1] = x;
        phi[2] = 1.5 * x * x - 0.5;
        if let Some(j) = space.rank_index(arm.rank).filter(|&j| j > 0) {
            phi[2 + j] = 1.0;
            if self.config.interaction {
                phi[2 + space.ranks.len() - 1 + j] = x;
            }
        }
    }

    /// The current fit; an error when the state's shapes do not match the space or `A` is not
    /// positive definite (a state deserialized from a damaged checkpoint).
    fn fit(&self) -> Result<Fit, BanditError> {
        let d = self.dim();
        let bad = |what: String| BanditError::param("linear-ucb state", what, STATE_EXPECTED);
        if self.gram.len() != d * d || self.target.len() != d {
            return Err(bad(format!(
                "A of {} and b of {} entries for d = {d}",
                self.gram.len(),
                self.target.len()
            )));
        }
        if self.target.iter().any(|v| !v.is_finite()) {
            return Err(bad("a non-finite entry of b".into()));
        }
        let chol = cholesky(&self.gram, d)
            .ok_or_else(|| bad("A not symmetric positive definite".into()))?;
        let theta = backward(&chol, d, &forward(&chol, d, &self.target));
        if theta.iter().any(|v| !v.is_finite()) {
            return Err(bad("A too close to singular for b".into()));
        }
        Ok(Fit {
            chol,
            theta,
            phi: vec![0.0; d],
            y: vec![0.0; d],
        })
    }

    /// The model's mean reward for `arm` and its confidence width.
    fn predict(&self, fit: &mut Fit, arm: &Arm) -> (f64, f64) {
        let d = self.dim();
        self.features_into(arm, &mut fit.phi);
        let mean = self.config.prior_mean
            + fit
                .phi
                .iter()
                .zip(&fit.theta)
                .map(|(p, t)| p * t)
                .sum::<f64>();
        forward_into(&fit.chol, d, &fit.phi, &mut fit.y);
        (mean, fit.y.iter().map(|v| v * v).sum::<f64>().sqrt())
    }
}

impl Policy for LinearUcb {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        let mut fit = self.fit()?;
        let scored = self.grid.feasible_iter(region).map(|i| {
            let (mean, width) = self.predict(&mut fit, &self.grid.arm(i));
            (i, mean + self.config.exploration * width)
        });
        let i = argmax_random_tie(scored, rng).ok_or(BanditError::NoFeasibleArm {
            device_id: ctx.device_id,
        })?;
        Ok(self.grid.arm(i))
    }

    fn observe(&mut self, _ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        self.grid.index_of(&arm)?;
        check_reward(&arm, reward)?;
        if reward.abs() > MAX_ABS_REWARD {
            // A finite but enormous reward would overflow the model's sums.
            return Err(BanditError::RewardOutOfRange {
                arm,
                reward,
                min: -MAX_ABS_REWARD,
                max: MAX_ABS_REWARD,
            });
        }
        self.fit()?;
        let d = self.dim();
        let phi = self.features(&arm);
        let centred = reward - self.config.prior_mean;
        let g = self.config.discount;
        if g < 1.0 {
            for v in self.gram.iter_mut().chain(self.target.iter_mut()) {
                *v *= g;
            }
            for i in 0..d {
                self.gram[i * d + i] += (1.0 - g) * self.config.ridge;
            }
        }
        for i in 0..d {
            for j in 0..d {
                self.gram[i * d + j] += phi[i] * phi[j];
            }
            self.target[i] += centred * phi[i];
        }
        self.plays += 1;
        Ok(())
    }

    /// The model's best feasible grid arm (played or not) once anything was observed.
    fn exploit_in(
        &self,
        _ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Option<Arm> {
        if self.plays == 0 {
            return None;
        }
        let mut fit = self.fit().ok()?;
        let scored = self
            .grid
            .feasible_iter(region)
            .map(|i| (i, self.predict(&mut fit, &self.grid.arm(i)).0));
        argmax_random_tie(scored, rng).map(|i| self.grid.arm(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ctx() -> DeviceContext {
        DeviceContext {
            device_id: 1,
            ..Default::default()
        }
    }

    fn space() -> ArmSpace {
        ArmSpace::new(0.0, 1.0, vec![4, 8, 16]).unwrap()
    }

    #[test]
    fn the_solves_invert_the_gram_matrix() {
        // A known SPD matrix: L L^T with L lower triangular.
        let d = 3;
        let a = [4.0, 2.0, 0.4, 2.0, 5.0, 1.0, 0.4, 1.0, 3.0];
        let l = cholesky(&a, d).unwrap();
        let x = backward(&l, d, &forward(&l, d, &[1.0, -2.0, 0.5]));
        for i in 0..d {
            let ax: f64 = (0..d).map(|j| a[i * d + j] * x[j]).sum();
            assert!((ax - [1.0, -2.0, 0.5][i]).abs() < 1e-12, "{i}: {ax}");
        }
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
    }

    #[test]
    fn plays_of_one_rank_teach_the_pace_to_every_rank() {
        // Rewards fall with the ratio at rank 4 only; the model carries the pace effect to
        // ranks 8 and 16, which were each played once at the middle.
        let mut p = LinearUcb::new(space(), LinearUcbConfig::default()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..5 {
            for k in 0..6 {
                let ratio = space().grid_ratio(k, 6);
                p.observe(
                    &ctx(),
                    Arm {
                        prune_ratio: ratio,
                        rank: 4,
                    },
                    0.8 - 0.5 * ratio,
                )
                .unwrap();
            }
        }
        p.observe(
            &ctx(),
            Arm {
                prune_ratio: 0.4,
                rank: 8,
            },
            0.4,
        )
        .unwrap();
        p.observe(
            &ctx(),
            Arm {
                prune_ratio: 0.6,
                rank: 16,
            },
            0.3,
        )
        .unwrap();
        let mut fit = p.fit().unwrap();
        let low = p
            .predict(
                &mut fit,
                &Arm {
                    prune_ratio: 0.0,
                    rank: 16,
                },
            )
            .0;
        let high = p
            .predict(
                &mut fit,
                &Arm {
                    prune_ratio: 1.0,
                    rank: 16,
                },
            )
            .0;
        assert!(low > high + 0.3, "{low} vs {high}");
        // The best arm is rank 4 at the lowest ratio, unplayed arms included.
        let best = p
            .exploit_in(&ctx(), &FeasibleRegion::all(), &mut rng)
            .unwrap();
        assert_eq!((best.prune_ratio, best.rank), (0.0, 4));
        // The width shrinks where the plays were.
        let (_, w_played) = p.predict(
            &mut fit,
            &Arm {
                prune_ratio: 0.0,
                rank: 4,
            },
        );
        let (_, w_rare) = p.predict(
            &mut fit,
            &Arm {
                prune_ratio: 0.0,
                rank: 16,
            },
        );
        assert!(w_played < w_rare, "{w_played} vs {w_rare}");
    }

    #[test]
    fn it_explores_the_unplayed_ranks_before_exploiting() {
        let mut p = LinearUcb::new(space(), LinearUcbConfig::default()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        assert!(p
            .exploit_in(&ctx(), &FeasibleRegion::all(), &mut rng)
            .is_none());
        // Rewards that teach nothing: the widths alone steer it to every rank and both ends
        // of the ratio interval within nine plays.
        let mut seen = Vec::new();
        for _ in 0..9 {
            let arm = p.choose(&ctx(), &mut rng).unwrap();
            seen.push(arm);
            p.observe(&ctx(), arm, 0.5).unwrap();
        }
        for rank in [4, 8, 16] {
            assert!(seen.iter().any(|a| a.rank == rank), "{rank}: {seen:?}");
        }
        for end in [0.0, 1.0] {
            assert!(seen.iter().any(|a| a.prune_ratio == end), "{end}: {seen:?}");
        }
    }

    fn arm(prune_ratio: f64, rank: u32) -> Arm {
        Arm { prune_ratio, rank }
    }

    /// Every grid arm `times` times, rewarded by `reward`.
    fn play_grid(p: &mut LinearUcb, times: usize, reward: impl Fn(f64, u32) -> f64) {
        for _ in 0..times {
            for rank in [4, 8, 16] {
                for k in 0..6 {
                    let ratio = space().grid_ratio(k, 6);
                    p.observe(&ctx(), arm(ratio, rank), reward(ratio, rank))
                        .unwrap();
                }
            }
        }
    }

    #[test]
    fn the_interaction_gives_each_rank_its_own_slope() {
        // The pace helps at rank 4 and hurts at rank 8: one shared slope averages them away.
        let reward = |ratio: f64, rank: u32| match rank {
            4 => 0.3 + 0.4 * ratio,
            8 => 0.8 - 0.4 * ratio,
            _ => 0.2,
        };
        let config = |interaction| LinearUcbConfig {
            interaction,
            ..Default::default()
        };
        let mut additive = LinearUcb::new(space(), config(false)).unwrap();
        let mut joint = LinearUcb::new(space(), config(true)).unwrap();
        assert_eq!((additive.dim(), joint.dim()), (5, 7));
        play_grid(&mut additive, 10, reward);
        play_grid(&mut joint, 10, reward);
        let worst_miss = |p: &LinearUcb| {
            let mut fit = p.fit().unwrap();
            [arm(0.0, 8), arm(1.0, 4), arm(1.0, 8), arm(0.0, 4)]
                .iter()
                .map(|a| (p.predict(&mut fit, a).0 - reward(a.prune_ratio, a.rank)).abs())
                .fold(0.0, f64::max)
        };
        assert!(worst_miss(&joint) < 0.03, "{}", worst_miss(&joint));
        assert!(worst_miss(&additive) > 0.15, "{}", worst_miss(&additive));
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let best = joint
            .exploit_in(&ctx(), &FeasibleRegion::all(), &mut rng)
            .unwrap();
        assert_eq!((best.prune_ratio, best.rank), (0.0, 8));
    }

    #[test]
    fn a_discounted_model_follows_a_moved_optimum() {
        let config = |discount| LinearUcbConfig {
            discount,
            ..Default::default()
        };
        let mut remembers = LinearUcb::new(space(), config(1.0)).unwrap();
        let mut forgets = LinearUcb::new(space(), config(0.95)).unwrap();
        // A long first regime that favours the dense pace, then a short one that favours the
        // fastest; only the forgetting model's best arm moves.
        let first = |ratio: f64, _| 0.9 - 0.6 * ratio;
        let second = |ratio: f64, _| 0.2 + 0.6 * ratio;
        for p in [&mut remembers, &mut forgets] {
            play_grid(p, 20, first);
            play_grid(p, 2, second);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let all = FeasibleRegion::all();
        let best = |p: &LinearUcb, rng: &mut ChaCha8Rng| p.exploit_in(&ctx(), &all, rng).unwrap();
        assert_eq!(best(&remembers, &mut rng).prune_ratio, 0.0);
        assert_eq!(best(&forgets, &mut rng).prune_ratio, 1.0);
        // Forgetting keeps A at or above ridge I: after thousands of plays at one arm the
        // model still solves, and an unplayed rank's width stays bounded away from zero.
        for _ in 0..5000 {
            forgets.observe(&ctx(), arm(0.0, 4), 0.5).unwrap();
        }
        let mut fit = forgets.fit().unwrap();
        let (_, width) = forgets.predict(&mut fit, &arm(1.0, 16));
        assert!(width > 0.1 && width.is_finite(), "{width}");
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(LinearUcb::new(space(), config(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_damaged_state_is_an_error_not_a_panic() {
        let mut p = LinearUcb::new(space(), LinearUcbConfig::default()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut short = p.clone();
        short.gram.pop();
        assert!(short.choose(&ctx(), &mut rng).is_err());
        let mut negative = p.clone();
        negative.gram[0] = -1.0;
        let arm = Arm {
            prune_ratio: 0.0,
            rank: 4,
        };
        let before = negative.clone();
        assert!(negative.observe(&ctx(), arm, 0.5).is_err());
        assert_eq!(negative, before, "a failed observe changes nothing");
        // A reward that would overflow the model is refused and changes nothing.
        let mut huge = p.clone();
        let before = huge.clone();
        assert!(huge.observe(&ctx(), arm, f64::MAX).is_err());
        assert!(huge.observe(&ctx(), arm, -2.0 * MAX_ABS_REWARD).is_err());
        assert_eq!(huge, before);
        huge.observe(&ctx(), arm, MAX_ABS_REWARD).unwrap();
        assert!(huge.choose(&ctx(), &mut rng).is_ok());
        p.plays = 1;
        p.target[1] = f64::NAN;
        assert!(p
            .exploit_in(&ctx(), &FeasibleRegion::all(), &mut rng)
            .is_none());
        assert!(LinearUcb::new(
            space(),
            LinearUcbConfig {
                ridge: 0.0,
                ..Default::default()
            }
        )
        .is_err());
    }
}
