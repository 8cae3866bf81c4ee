//! Strategies: small, swappable pieces that decide, per device, which arms its bandit may play
//! (and with which policy) and how a round's updates are aggregated. The coordinator owns the
//! round logic and every piece of learned state (one bandit per device, in its device table);
//! a strategy is stateless and rebuilt from the config, so checkpoints never hold one.
//!
//! | strategy | arms | policy | aggregation | reaches s* |
//! |---|---|---|---|---|
//! | `fedspine` | `arms` (pace x rank) | `policy` (S-UCB by default) | `aggregation.method` | at the bandit's pace |
//! | `hetlora` | ratio 0 x ranks up to the device's RAM tier, capped at the rank it self-pruned to | `policy` | `aggregation.method`, or its own `aggregation` | never (dense) |
//! | `fedlora` | ratio 0 x one rank | fixed | `aggregation.method`, or its own `aggregation` | never (dense) |
//! | `fixed-prune` | one pace x one rank | fixed | `aggregation.method` | at its fixed pace |
//! | `ratio-bandit` | `arms` paces x one rank | `policy` | `aggregation.method` | at the bandit's pace |
//! | `prune-after-fl` | ratio 0 x one rank | fixed | `aggregation.method` | one shot after the rounds, then recovery |
//!
//! Every strategy aggregates with the run's configured method by default, so a comparison of
//! strategies is not also a comparison of aggregation methods; `hetlora` and `fedlora` take an
//! explicit `aggregation` override (HetLoRA's own averaging is `aggregation = "hetlora"`).
//! With a run target sparsity s* (`target_sparsity`), an arm's ratio is the round's pace: the
//! share of the remaining gap to s* a device closes ([`protocol::SparsityGoal`]).
//!
//! Strategies sit below the coordinator and never import it: they see the bandit crate, the
//! protocol and the aggregation settings only. The coordinator passes them the run settings
//! ([`Common`]) and the configured `[aggregation]` table, and wraps their [`StrategyError`].
//! `common.rs` holds the trait and what all strategies share; a new strategy is one more file
//! implementing [`Strategy`] and one more [`StrategyConfig`] variant.

mod common;
mod fedlora;
mod fedspine;
mod fixed_prune;
mod hetlora;
mod prune_after_fl;
mod ratio_bandit;

use serde::{Deserialize, Serialize};

pub use common::{Common, DeviceBandit, Strategy, StrategyError, TargetRoute};
pub use fedlora::{FedLora, FedLoraConfig};
pub use fedspine::FedSpine;
pub use fixed_prune::{FixedPrune, FixedPruneConfig};
pub use hetlora::{HetLora, HetLoraConfig, RankTier};
pub use prune_after_fl::{PruneAfterFl, PruneAfterFlConfig, MAX_RECOVERY_STEPS};
pub use ratio_bandit::{RatioBandit, RatioBanditConfig};

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
    /// Dense federated LoRA, then one-shot pruning to s* and a short recovery on each device.
    PruneAfterFl(PruneAfterFlConfig),
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
            StrategyConfig::PruneAfterFl(_) => "prune-after-fl",
        }
    }

    /// How this strategy's devices reach the run's target sparsity.
    pub fn target_route(&self) -> TargetRoute {
        match self {
            StrategyConfig::Fedspine
            | StrategyConfig::FixedPrune(_)
            | StrategyConfig::RatioBandit(_) => TargetRoute::Paced,
            StrategyConfig::Hetlora(_) | StrategyConfig::Fedlora(_) => TargetRoute::Dense,
            StrategyConfig::PruneAfterFl(c) => TargetRoute::AfterTraining {
                recovery_steps: c.recovery_steps,
            },
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
            StrategyConfig::PruneAfterFl(c) => Box::new(PruneAfterFl::new(common, *c)?),
        })
    }
}
