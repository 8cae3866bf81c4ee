//! `fedlora`: no pruning, every device at one LoRA rank. Aggregated with the run's configured
//! method unless its config names one (`aggregation = "mean"` is FedAvg on `A` and `B`).

use protocol::Capabilities;
use serde::{Deserialize, Serialize};

use super::common::{aggregation_with, fixed_space, Common, DeviceBandit, Strategy, StrategyError};
use crate::aggregate::{AggregationConfig, AggregationMethod};

/// Parameters of `fedlora`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FedLoraConfig {
    /// Default 16.
    pub rank: u32,
    /// Aggregation method of this strategy's rounds. Default: the run's `aggregation.method`.
    pub aggregation: Option<AggregationMethod>,
}

impl Default for FedLoraConfig {
    fn default() -> Self {
        FedLoraConfig {
            rank: 16,
            aggregation: None,
        }
    }
}

/// The plain federated LoRA baseline.
#[derive(Clone, Debug)]
pub struct FedLora {
    common: Common,
    config: FedLoraConfig,
}

impl FedLora {
    pub fn new(common: Common, config: FedLoraConfig) -> Result<FedLora, StrategyError> {
        common.check_space(&fixed_space(0.0, config.rank).0)?;
        Ok(FedLora { common, config })
    }
}

impl Strategy for FedLora {
    fn name(&self) -> &'static str {
        "fedlora"
    }

    fn bandit_for(&self, _capabilities: &Capabilities) -> Result<DeviceBandit, StrategyError> {
        let (space, policy) = fixed_space(0.0, self.config.rank);
        self.common.bandit(&policy, &space)
    }

    fn aggregation(&self, configured: &AggregationConfig) -> AggregationConfig {
        aggregation_with(configured, self.config.aggregation)
    }
}
