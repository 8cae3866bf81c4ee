//! `hetlora`: no pruning; each device trains at a rank bounded by its RAM tier (HetLoRA's
//! capability-based ranks), chosen among the allowed ranks by its bandit, with HetLoRA's rank
//! self-pruning (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
//! Foundation Models"): every round carries [`protocol::RankPruning`], the device regularises
//! its tail rank components toward zero and drops them when they carry little of the update,
//! and the device's later rounds are sent at most the rank it reported (never above its
//! bandit's choice). Updates are combined with the run's configured method unless its config
//! names one (`aggregation = "hetlora"`: HetLoRA's zero-pad, norm-weighted averaging).

use bandit::ArmSpace;
use protocol::{Capabilities, RankPruning};
use serde::{Deserialize, Serialize};

use super::common::{aggregation_with, Common, DeviceBandit, Strategy, StrategyError};
use crate::aggregate::{AggregationConfig, AggregationMethod};

/// Devices with at least `min_ram_bytes` may use ranks up to `max_rank`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankTier {
    pub min_ram_bytes: u64,
    pub max_rank: u32,
}

/// Parameters of `hetlora`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HetLoraConfig {
    /// RAM tiers; a device gets the tier with the largest `min_ram_bytes` it reaches, and a
    /// device below every tier gets the smallest allowed rank. Default: under 2 GiB rank 4,
    /// 2 GiB rank 8, 4 GiB rank 16, 8 GiB rank 32, 16 GiB rank 64.
    pub rank_tiers: Vec<RankTier>,
    /// Aggregation method of this strategy's rounds. Default: the run's `aggregation.method`.
    pub aggregation: Option<AggregationMethod>,
    /// Weight lambda of the regulariser `lambda * (|A_tail|_F + |B_tail|_F)` per layer on the
    /// tail rank components during local training. Default 0.01 (ours: the paper tunes it per
    /// task and publishes no single value).
    pub rank_reg: f32,
    /// The device drops the tail when its share of the update's norm is below this, in
    /// `[0, 1)`. Default 0.1 (ours).
    pub prune_gamma: f32,
    /// Share of the rank that forms the tail (dropped in one self-pruning step), in `(0, 1)`:
    /// `max(1, floor(prune_step * rank))` components. Default 0.125, so rank 8 goes to 7 and
    /// rank 32 to 28; the paper's decay factor gamma (rank `r -> floor(gamma r)`) is
    /// `1 - prune_step`. `rank_reg = 0` with `prune_gamma = 0` turns self-pruning off.
    pub prune_step: f32,
}

impl Default for HetLoraConfig {
    fn default() -> Self {
        let gib = 1u64 << 30;
        HetLoraConfig {
            rank_tiers: vec![
                RankTier {
                    min_ram_bytes: 0,
                    max_rank: 4,
                },
                RankTier {
                    min_ram_bytes: 2 * gib,
                    max_rank: 8,
                },
                RankTier {
                    min_ram_bytes: 4 * gib,
                    max_rank: 16,
                },
                RankTier {
                    min_ram_bytes: 8 * gib,
                    max_rank: 32,
                },
                RankTier {
                    min_ram_bytes: 16 * gib,
                    max_rank: 64,
                },
            ],
            aggregation: None,
            rank_reg: 0.01,
            prune_gamma: 0.1,
            prune_step: 0.125,
        }
    }
}

impl HetLoraConfig {
    /// The largest rank a device with `ram_bytes` may use.
    pub fn rank_cap(&self, ram_bytes: u64) -> Option<u32> {
        self.rank_tiers
            .iter()
            .filter(|t| t.min_ram_bytes <= ram_bytes)
            .max_by_key(|t| t.min_ram_bytes)
            .map(|t| t.max_rank)
    }

    /// The rank self-pruning each round carries, or `None` when it is off (`rank_reg` and
    /// `prune_gamma` both 0).
    pub fn rank_pruning(&self) -> Option<RankPruning> {
        if self.rank_reg == 0.0 && self.prune_gamma == 0.0 {
            return None;
        }
        Some(RankPruning {
            reg: self.rank_reg,
            gamma: self.prune_gamma,
            step: self.prune_step,
        })
    }
}

/// Heterogeneous ranks with rank self-pruning, no structured pruning.
#[derive(Clone, Debug)]
pub struct HetLora {
    common: Common,
    config: HetLoraConfig,
}

impl HetLora {
    pub fn new(common: Common, config: HetLoraConfig) -> Result<HetLora, StrategyError> {
        let space = ArmSpace {
            ratio_min: 0.0,
            ratio_max: 0.0,
            ranks: common.arms.ranks.clone(),
        };
        common.check_space(&space)?;
        if let Some(rp) = config.rank_pruning() {
            rp.check()
                .map_err(|e| StrategyError::InvalidConfig(format!("strategy hetlora: {e}")))?;
        }
        Ok(HetLora { common, config })
    }

    /// The ranks a device with `ram_bytes` may use (at least the smallest configured one).
    pub fn ranks_for(&self, ram_bytes: u64) -> Vec<u32> {
        let all = &self.common.arms.ranks;
        let cap = self.config.rank_cap(ram_bytes).unwrap_or(0);
        let allowed: Vec<u32> = all.iter().copied().filter(|&r| r <= cap).collect();
        if allowed.is_empty() {
            all.iter().copied().take(1).collect()
        } else {
            allowed
        }
    }
}

impl Strategy for HetLora {
    fn name(&self) -> &'static str {
        "hetlora"
    }

    fn bandit_for(&self, capabilities: &Capabilities) -> Result<DeviceBandit, StrategyError> {
        let space = ArmSpace::new(0.0, 0.0, self.ranks_for(capabilities.ram_bytes))?;
        // A fixed policy would insist on its configured rank; let it pick the space's median.
        let policy = match &self.common.policy {
            bandit::PolicyConfig::Fixed(_) => bandit::PolicyConfig::Fixed(Default::default()),
            other => other.clone(),
        };
        self.common.bandit(&policy, &space)
    }

    fn aggregation(&self, configured: &AggregationConfig) -> AggregationConfig {
        aggregation_with(configured, self.config.aggregation)
    }

    fn rank_pruning(&self) -> Option<RankPruning> {
        self.config.rank_pruning()
    }
}
