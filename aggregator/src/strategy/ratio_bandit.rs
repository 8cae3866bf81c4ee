//! `ratio-bandit`: the per-device bandit chooses only the pruning ratio (over the configured
//! ratio interval); every device trains at one fixed LoRA rank.

use bandit::ArmSpace;
use protocol::Capabilities;
use serde::{Deserialize, Serialize};

use super::common::{Common, DeviceBandit, Strategy, StrategyError};

/// Parameters of `ratio-bandit`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RatioBanditConfig {
    /// Default 16.
    pub rank: u32,
}

impl Default for RatioBanditConfig {
    fn default() -> Self {
        RatioBanditConfig { rank: 16 }
    }
}

/// Bandit on the ratio, fixed rank.
#[derive(Clone, Debug)]
pub struct RatioBandit {
    common: Common,
    space: ArmSpace,
}

impl RatioBandit {
    pub fn new(common: Common, config: RatioBanditConfig) -> Result<RatioBandit, StrategyError> {
        let space = ArmSpace {
            ratio_min: common.arms.ratio_min,
            ratio_max: common.arms.ratio_max,
            ranks: vec![config.rank],
        };
        common.check_space(&space)?;
        Ok(RatioBandit { common, space })
    }
}

impl Strategy for RatioBandit {
    fn name(&self) -> &'static str {
        "ratio-bandit"
    }

    fn bandit_for(&self, _capabilities: &Capabilities) -> Result<DeviceBandit, StrategyError> {
        self.common.bandit(&self.common.policy, &self.space)
    }
}
