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
mod ratio_bandit;

use serde::{Deserialize, Serialize};

pub use common::{Common, DeviceBandit, Strategy, StrategyError};
pub use fedlora::{FedLora, FedLoraConfig};
pub use fedspine::FedSpine;
pub use fixed_prune::{FixedPrune, FixedPruneConfig};
pub use hetlora::{HetLora, HetLoraConfig, RankTier};
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
