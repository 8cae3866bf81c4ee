//! `fixed-prune`: one pruning ratio and one LoRA rank for every device, every round.

use protocol::Capabilities;
use serde::{Deserialize, Serialize};

use super::common::{fixed_space, Common, DeviceBandit, Strategy, StrategyError};

/// Parameters of `fixed-prune`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FixedPruneConfig {
    /// Default 0.3.
    pub prune_ratio: f64,
    /// Default 16.
    pub rank: u32,
}

impl Default for FixedPruneConfig {
    fn default() -> Self {
        FixedPruneConfig {
            prune_ratio: 0.3,
            rank: 16,
        }
    }
}

/// The fixed-arm baseline.
#[derive(Clone, Debug)]
pub struct FixedPrune {
    common: Common,
    config: FixedPruneConfig,
}

impl FixedPrune {
    pub fn new(common: Common, config: FixedPruneConfig) -> Result<FixedPrune, StrategyError> {
        if !(0.0..1.0).contains(&config.prune_ratio) {
            return Err(StrategyError::InvalidConfig(format!(
                "fixed-prune ratio {} is outside [0, 1)",
                config.prune_ratio
            )));
        }
        common.check_space(&fixed_space(config.prune_ratio, config.rank).0)?;
        Ok(FixedPrune { common, config })
    }
}

impl Strategy for FixedPrune {
    fn name(&self) -> &'static str {
        "fixed-prune"
    }

    fn bandit_for(&self, _capabilities: &Capabilities) -> Result<DeviceBandit, StrategyError> {
        let (space, policy) = fixed_space(self.config.prune_ratio, self.config.rank);
        self.common.bandit(&policy, &space)
    }
}
