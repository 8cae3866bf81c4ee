//! Strategies: small, swappable pieces that decide, per device, which arms its bandit may play
//! (and with which policy) and how a round's updates are aggregated. The coordinator owns the
//! round logic and every piece of learned state (one bandit per device, in its device table);
//! a strategy is stateless and rebuilt from the config, so checkpoints never hold one.
//!
//! | strategy | arms | policy | aggregation |
//! |---|---|---|---|
//! | `fedspine` | `arms` (ratio x rank) | `policy` (S-UCB by default) | `aggregation.method` |
//! | `hetlora` | ratio 0 x ranks up to the device's RAM tier | `policy` | HetLoRA |
//! | `fedlora` | ratio 0 x one rank | fixed | plain mean |
//! | `fixed-prune` | one ratio x one rank | fixed | `aggregation.method` |
//! | `ratio-bandit` | `arms` ratios x one rank | `policy` | `aggregation.method` |

mod fedlora;
mod fedspine;
mod fixed_prune;
mod hetlora;
mod ratio_bandit;

use std::fmt;

use bandit::{
    AnyPolicy, Arm, ArmSpace, BanditError, DeviceContext, FeasibilityFilter, Filtered, Policy,
    PolicyConfig,
};
use protocol::Capabilities;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::aggregate::AggregationConfig;

pub use fedlora::{FedLora, FedLoraConfig};
pub use fedspine::FedSpine;
pub use fixed_prune::{FixedPrune, FixedPruneConfig};
pub use hetlora::{HetLora, HetLoraConfig, RankTier};
pub use ratio_bandit::{RatioBandit, RatioBanditConfig};

/// A device's learned arm choice: its policy behind its feasibility filter.
pub type DeviceBandit = Filtered<AnyPolicy>;

/// Why a strategy cannot be built from its config, or cannot serve a device. The coordinator
/// wraps it (`CoordinatorError::Strategy`) or turns it into a reject.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    /// The strategy's settings do not fit together (shown after "invalid coordinator config: ").
    #[error("{0}")]
    InvalidConfig(String),
    #[error("no arm fits the device: {0}")]
    NoArm(String),
    #[error(transparent)]
    Bandit(#[from] BanditError),
}

/// One federated strategy. Implementations are small: everything but these decisions is the
/// coordinator's.
pub trait Strategy: fmt::Debug + Send {
    /// The strategy's config name (`fedspine`, `hetlora`, ...).
    fn name(&self) -> &'static str;

    /// A fresh bandit for a newly registered device with these capabilities.
    fn bandit_for(&self, capabilities: &Capabilities) -> Result<DeviceBandit, StrategyError>;

    /// How this strategy aggregates a round, given the configured `[aggregation]` settings
    /// (default: as configured).
    fn aggregation(&self, configured: &AggregationConfig) -> AggregationConfig {
        configured.clone()
    }

    /// The arm a selected device plays this round (default: its bandit's choice).
    fn choose_arm(
        &self,
        bandit: &mut DeviceBandit,
        ctx: &DeviceContext,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        bandit.choose(ctx, rng)
    }
}

/// Which strategy to run; TOML `[strategy]` with a `kind` key plus the strategy's own fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StrategyConfig {
    /// Per-device bandit over (ratio, rank), iterative prune-and-tune.
    #[default]
    Fedspine,
    /// No pruning; heterogeneous ranks bounded by the device's RAM.
    Hetlora(HetLoraConfig),
    /// No pruning, one rank, plain averaging.
    Fedlora(FedLoraConfig),
    /// One ratio and one rank for every device.
    FixedPrune(FixedPruneConfig),
    /// Bandit over the pruning ratio only, one rank.
    RatioBandit(RatioBanditConfig),
}

impl StrategyConfig {
    /// The `kind` name.
    pub fn name(&self) -> &'static str {
        match self {
            StrategyConfig::Fedspine => "fedspine",
            StrategyConfig::Hetlora(_) => "hetlora",
            StrategyConfig::Fedlora(_) => "fedlora",
            StrategyConfig::FixedPrune(_) => "fixed-prune",
            StrategyConfig::RatioBandit(_) => "ratio-bandit",
        }
    }

    /// The strategy, with the settings every strategy shares; refuses settings that do not fit
    /// together (a rank above `max_rank`, an invalid arm space).
    pub fn build(&self, common: Common) -> Result<Box<dyn Strategy>, StrategyError> {
        Ok(match self {
            StrategyConfig::Fedspine => Box::new(FedSpine::new(common)?),
            StrategyConfig::Hetlora(c) => Box::new(HetLora::new(common, c.clone())?),
            StrategyConfig::Fedlora(c) => Box::new(FedLora::new(common, *c)?),
            StrategyConfig::FixedPrune(c) => Box::new(FixedPrune::new(common, *c)?),
            StrategyConfig::RatioBandit(c) => Box::new(RatioBandit::new(common, *c)?),
        })
    }
}

/// The run's settings every strategy takes (the coordinator fills them from its config).
#[derive(Clone, Debug)]
pub struct Common {
    /// Pruning ratios and LoRA ranks arms are drawn from.
    pub arms: ArmSpace,
    /// The bandit of adaptive strategies.
    pub policy: PolicyConfig,
    pub feasibility: bandit::FeasibilityConfig,
    /// Rank of the global adapter; no arm may use a higher one.
    pub max_rank: u32,
}

impl Common {
    /// `policy` over `space`, behind a fresh feasibility filter.
    fn bandit(
        &self,
        policy: &PolicyConfig,
        space: &ArmSpace,
    ) -> Result<DeviceBandit, StrategyError> {
        Ok(Filtered::new(
            policy.build(space)?,
            FeasibilityFilter::new(self.feasibility)?,
        ))
    }

    /// Refuses a space with a rank above the global adapter's.
    fn check_space(&self, space: &ArmSpace) -> Result<(), StrategyError> {
        space
            .validate()
            .map_err(|e| StrategyError::InvalidConfig(format!("arm space: {e}")))?;
        match space.ranks.iter().find(|&&r| r > self.max_rank) {
            Some(r) => Err(StrategyError::InvalidConfig(format!(
                "rank {r} exceeds max_rank {}",
                self.max_rank
            ))),
            None => Ok(()),
        }
    }
}

/// A one-arm space and its fixed policy.
fn fixed_space(prune_ratio: f64, rank: u32) -> (ArmSpace, PolicyConfig) {
    (
        ArmSpace {
            ratio_min: prune_ratio,
            ratio_max: prune_ratio,
            ranks: vec![rank],
        },
        PolicyConfig::Fixed(bandit::policy::FixedConfig {
            prune_ratio: Some(prune_ratio),
            rank: Some(rank),
        }),
    )
}
