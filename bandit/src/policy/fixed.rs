//! Baselines that do not learn: one fixed arm, and uniformly random arms.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{check_reward, Policy};
use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::region::FeasibleRegion;

/// Parameters of [`Fixed`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FixedConfig {
    /// The ratio to play. Default: the middle of the space's ratio interval.
    pub prune_ratio: Option<f64>,
    /// The rank to play. Default: the median allowed rank (the lower one of an even set).
    pub rank: Option<u32>,
}

/// Always the same arm (for baselines such as `fixed-prune`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fixed {
    space: ArmSpace,
    arm: Arm,
    plays: u64,
}

impl Fixed {
    pub fn new(space: ArmSpace, config: FixedConfig) -> Result<Self, BanditError> {
        space.validate()?;
        let arm = Arm {
            prune_ratio: config
                .prune_ratio
                .unwrap_or((space.ratio_min + space.ratio_max) / 2.0),
            rank: config
                .rank
                .unwrap_or(space.ranks[(space.ranks.len() - 1) / 2]),
        };
        space.check(&arm)?;
        Ok(Fixed {
            space,
            arm,
            plays: 0,
        })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.space
    }

    pub fn arm(&self) -> Arm {
        self.arm
    }
}

impl Policy for Fixed {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        if region.contains(&self.arm) {
            Ok(self.arm)
        } else {
            Err(BanditError::NoFeasibleArm {
                device_id: ctx.device_id,
            })
        }
    }

    fn observe(&mut self, _ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        if arm != self.arm {
            return Err(BanditError::UnknownArm {
                arm,
                reason: format!("this fixed policy only plays {}", self.arm),
            });
        }
        check_reward(&arm, reward)?;
        self.plays += 1;
        Ok(())
    }
}

/// Parameters of [`UniformRandom`] (none yet; kept as a struct so the TOML shape is stable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UniformRandomConfig {}

/// Draws a rank uniformly from the ranks that still have feasible ratios, then a ratio
/// uniformly from that rank's feasible interval. The yardstick for regret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UniformRandom {
    space: ArmSpace,
    plays: u64,
}

impl UniformRandom {
    pub fn new(space: ArmSpace, _config: UniformRandomConfig) -> Result<Self, BanditError> {
        space.validate()?;
        Ok(UniformRandom { space, plays: 0 })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.space
    }
}

impl Policy for UniformRandom {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        let s = &self.space;
        let ranks: Vec<u32> = s
            .ranks
            .iter()
            .copied()
            .filter(|&r| region.allows_some(r, s.ratio_max))
            .collect();
        if ranks.is_empty() {
            return Err(BanditError::NoFeasibleArm {
                device_id: ctx.device_id,
            });
        }
        let rank = ranks[rng.random_range(0..ranks.len())];
        let prune_ratio = region.sample_ratio(rank, s.ratio_min, s.ratio_max, rng);
        Ok(Arm { prune_ratio, rank })
    }

    fn observe(&mut self, _ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        self.space.check(&arm)?;
        check_reward(&arm, reward)?;
        self.plays += 1;
        Ok(())
    }
}
