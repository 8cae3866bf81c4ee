//! EXP3 (exponential weights for adversarial bandits) over an `ArmGrid`.

use std::collections::BTreeMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{check_reward, ArmGrid, Policy};
use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::region::FeasibleRegion;

/// Parameters of [`Exp3`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Exp3Config {
    /// Ratios in the grid. Default `6`.
    pub n_ratios: usize,
    /// Exploration share `gamma` in (0, 1]: the probability mass spread uniformly over the
    /// feasible arms, and the learning rate (`gamma / K`). Default `0.2` (near the textbook
    /// `sqrt(K ln K / ((e - 1) T))` for 30 arms and 2,000 rounds).
    pub gamma: f64,
}

impl Default for Exp3Config {
    fn default() -> Self {
        Exp3Config {
            n_ratios: 6,
            gamma: 0.2,
        }
    }
}

/// The probability a draw was made with, kept until its reward arrives.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct PendingDraw {
    index: usize,
    probability: f64,
}

/// EXP3 (Auer et al.). Rewards must lie in [0, 1]. Plays arm `i` with probability
/// `(1 - gamma) * w_i / sum(w) + gamma / K` over the feasible arms, and after reward `x`
/// multiplies `w_i` by `exp(gamma * x / (p_i * K))`. Weights are kept as logarithms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exp3 {
    config: Exp3Config,
    grid: ArmGrid,
    log_weights: Vec<f64>,
    /// The last draw per device, so the importance weight uses the probability it was drawn
    /// with (which depends on that round's feasible set).
    pending: BTreeMap<u64, PendingDraw>,
}

impl Exp3 {
    pub fn new(space: ArmSpace, config: Exp3Config) -> Result<Self, BanditError> {
        if !(config.gamma > 0.0 && config.gamma <= 1.0) {
            return Err(BanditError::param(
                "gamma",
                config.gamma,
                "a number in (0, 1]",
            ));
        }
        let grid = ArmGrid::new(space, config.n_ratios)?;
        Ok(Exp3 {
            config,
            log_weights: vec![0.0; grid.len()],
            grid,
            pending: BTreeMap::new(),
        })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.grid.space
    }

    /// Play probabilities over `arms` (grid indices), in the same order.
    fn probabilities(&self, arms: &[usize]) -> Vec<f64> {
        let max = arms
            .iter()
            .map(|&i| self.log_weights[i])
            .fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = arms
            .iter()
            .map(|&i| (self.log_weights[i] - max).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let g = self.config.gamma;
        let k = arms.len() as f64;
        w.iter().map(|x| (1.0 - g) * x / total + g / k).collect()
    }
}

impl Policy for Exp3 {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        let arms = self.grid.feasible(region);
        if arms.is_empty() {
            return Err(BanditError::NoFeasibleArm {
                device_id: ctx.device_id,
            });
        }
        let probs = self.probabilities(&arms);
        let u: f64 = rng.random();
        let mut acc = 0.0;
        let mut pick = arms.len() - 1;
        for (j, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                pick = j;
                break;
            }
        }
        self.pending.insert(
            ctx.device_id,
            PendingDraw {
                index: arms[pick],
                probability: probs[pick],
            },
        );
        Ok(self.grid.arm(arms[pick]))
    }

    fn observe(&mut self, ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        let i = self.grid.index_of(&arm)?;
        check_reward(&arm, reward)?;
        if !(0.0..=1.0).contains(&reward) {
            return Err(BanditError::RewardOutOfRange {
                arm,
                reward,
                min: 0.0,
                max: 1.0,
            });
        }
        let p = match self.pending.get(&ctx.device_id) {
            Some(d) if d.index == i => d.probability,
            // Not the arm we last drew for this device: use the unrestricted probability.
            _ => {
                let all: Vec<usize> = (0..self.grid.len()).collect();
                self.probabilities(&all)[i]
            }
        };
        self.pending.remove(&ctx.device_id);
        let k = self.grid.len() as f64;
        self.log_weights[i] += self.config.gamma * reward / (p * k);
        // Shift so the largest log-weight is 0: probabilities are unchanged, numbers stay small.
        let max = self
            .log_weights
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        if max > 100.0 {
            for w in &mut self.log_weights {
                *w -= max;
            }
        }
        Ok(())
    }
}
