//! `fixed-prune`: one pruning ratio and one LoRA rank for every device, every round. With a run
//! target sparsity s* the ratio is a fixed pace: every round a device closes that share of its
//! remaining gap to s*.

use protocol::Capabilities;
use serde::{Deserialize, Serialize};

use super::common::{
    check_fixed_ratio, fixed_space, Common, DeviceBandit, Strategy, StrategyError,
};

/// Parameters of `fixed-prune`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FixedPruneConfig {
    /// The arm's ratio (TOML `prune_ratio` or `pace`): with a run target sparsity, the share of
    /// the remaining gap to it a device closes every round, in `[0, 1]`; without one, every
    /// round's sparsity target, in `[0, 1)`. Default 0.3.
    #[serde(alias = "pace")]
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
        check_fixed_ratio("fixed-prune", config.prune_ratio, common.target_sparsity)?;
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
