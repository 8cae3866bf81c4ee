//! `fedspine`: every device has its own bandit (S-UCB by default) over the whole (pruning
//! ratio, LoRA rank) space; devices prune iteratively toward the chosen ratio while they tune.

use bandit::ArmSpace;
use protocol::Capabilities;

use super::common::{Common, DeviceBandit, Strategy, StrategyError};

/// The paper's strategy.
#[derive(Clone, Debug)]
pub struct FedSpine {
    common: Common,
}

impl FedSpine {
    pub fn new(common: Common) -> Result<FedSpine, StrategyError> {
        common.check_space(&common.arms)?;
        Ok(FedSpine { common })
    }

    /// The arm space every device's bandit explores.
    pub fn space(&self) -> &ArmSpace {
        &self.common.arms
    }
}

impl Strategy for FedSpine {
    fn name(&self) -> &'static str {
        "fedspine"
    }

    fn bandit_for(&self, _capabilities: &Capabilities) -> Result<DeviceBandit, StrategyError> {
        self.common.bandit(&self.common.policy, &self.common.arms)
    }
}
