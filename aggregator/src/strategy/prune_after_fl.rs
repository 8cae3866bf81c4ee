//! `prune-after-fl`: dense federated LoRA through every round (one rank, no pruning), then each
//! device is pruned to the run's target sparsity s* in one shot, with LoRA-gradient importance
//! from its own data, and recovers for a few local steps: the LLM-Pruner / LoRAPrune route.
//!
//! The rounds are the coordinator's (a fixed arm of ratio 0: the pace is 0, nothing is pruned
//! while the federation trains). The final pruning happens where a device's model is finalised
//! for use, after the last round; [`super::TargetRoute::AfterTraining`] tells the driver (the
//! simulator does it before its final evaluation).

use protocol::Capabilities;
use serde::{Deserialize, Serialize};

use super::common::{fixed_space, Common, DeviceBandit, Strategy, StrategyError};

/// Most recovery steps the final phase may ask for.
pub const MAX_RECOVERY_STEPS: u32 = 100_000;

/// Parameters of `prune-after-fl`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PruneAfterFlConfig {
    /// LoRA rank of every device. Default 16.
    pub rank: u32,
    /// Local training steps after the one-shot pruning (at the run's learning rate and batch
    /// size; 0: none). Default 20.
    pub recovery_steps: u32,
}

impl Default for PruneAfterFlConfig {
    fn default() -> Self {
        PruneAfterFlConfig {
            rank: 16,
            recovery_steps: 20,
        }
    }
}

/// Dense federated LoRA, pruned once at the end.
#[derive(Clone, Debug)]
pub struct PruneAfterFl {
    common: Common,
    config: PruneAfterFlConfig,
}

impl PruneAfterFl {
    pub fn new(common: Common, config: PruneAfterFlConfig) -> Result<PruneAfterFl, StrategyError> {
        if common.target_sparsity.is_none() {
            return Err(StrategyError::InvalidConfig(
                "prune-after-fl needs a target_sparsity to prune to after the rounds".into(),
            ));
        }
        if config.recovery_steps > MAX_RECOVERY_STEPS {
            return Err(StrategyError::InvalidConfig(format!(
                "prune-after-fl recovery_steps {} exceeds {MAX_RECOVERY_STEPS}",
                config.recovery_steps
            )));
        }
        common.check_space(&fixed_space(0.0, config.rank).0)?;
        Ok(PruneAfterFl { common, config })
    }
}

impl Strategy for PruneAfterFl {
    fn name(&self) -> &'static str {
        "prune-after-fl"
    }

    fn bandit_for(&self, _capabilities: &Capabilities) -> Result<DeviceBandit, StrategyError> {
        let (space, policy) = fixed_space(0.0, self.config.rank);
        self.common.bandit(&policy, &space)
    }
}
