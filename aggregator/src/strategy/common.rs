//! What every strategy shares: the [`Strategy`] trait, its error, the device bandit type, and
//! the run settings the coordinator passes in ([`Common`]).

use std::fmt;

use bandit::{
    AnyPolicy, Arm, ArmSpace, BanditError, DeviceContext, FeasibilityFilter, FeasibleRegion,
    Filtered, Policy, PolicyConfig,
};
use protocol::Capabilities;
use rand_chacha::ChaCha8Rng;

use crate::aggregate::{AggregationConfig, AggregationMethod};

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

    /// HetLoRA's rank self-pruning, sent with every round of this strategy (default: none).
    /// A strategy that sends it accepts an update of a lower rank than its round's, and caps
    /// each device's later ranks at the rank it last reported ([`Strategy::sent_rank`]).
    fn rank_pruning(&self) -> Option<protocol::RankPruning> {
        None
    }

    /// The rank a device is sent when its bandit chose `chosen` and it last self-pruned to
    /// `limit`: `min(chosen, limit)` for a strategy with rank self-pruning,
    /// `chosen` otherwise.
    fn sent_rank(&self, chosen: u32, limit: Option<u32>) -> u32 {
        match (self.rank_pruning(), limit) {
            (Some(_), Some(limit)) => chosen.min(limit).max(1),
            _ => chosen,
        }
    }

    /// The arm a selected device plays this round, inside `region` (default: its bandit's
    /// choice; the region is unrestricted unless the round bounds its explorers).
    fn choose_arm(
        &self,
        bandit: &mut DeviceBandit,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        bandit.choose_in(ctx, region, rng)
    }

    /// The arm a selected device plays in a round where it is not one of the explorers
    /// (default: its bandit's best estimate, `None` when it has none yet; see
    /// `CoordinatorConfig::explore_per_round`).
    fn exploit_arm(
        &self,
        bandit: &DeviceBandit,
        ctx: &DeviceContext,
        rng: &mut ChaCha8Rng,
    ) -> Option<Arm> {
        bandit.exploit_in(ctx, &FeasibleRegion::all(), rng)
    }
}

/// How a strategy's devices reach the run's target sparsity s*, which says what an evaluation
/// does with a device that is not there yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetRoute {
    /// Never pruned (`hetlora`, `fedlora`): evaluated dense.
    Dense,
    /// Pruned in the rounds at the pace of the arms (`fedspine`, `ratio-bandit`,
    /// `fixed-prune`); a device evaluated before it reached s* is brought there first with its
    /// own importance scores.
    Paced,
    /// Dense through the rounds, then pruned to s* in one shot with LoRA-gradient importance on
    /// each device, followed by `recovery_steps` local steps (`prune-after-fl`).
    AfterTraining { recovery_steps: u32 },
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
    /// The run's target sparsity s*; with it an arm's ratio is the round's pace toward it.
    pub target_sparsity: Option<f64>,
}

impl Common {
    /// `policy` over `space`, behind a fresh feasibility filter.
    pub(super) fn bandit(
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
    pub(super) fn check_space(&self, space: &ArmSpace) -> Result<(), StrategyError> {
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

/// The configured aggregation, with `method` in place of the configured method when a
/// strategy's config names one (an explicit choice: by default every strategy aggregates with
/// the run's configured method, so strategies are compared on one aggregation).
pub(super) fn aggregation_with(
    configured: &AggregationConfig,
    method: Option<AggregationMethod>,
) -> AggregationConfig {
    AggregationConfig {
        method: method.unwrap_or(configured.method),
        ..configured.clone()
    }
}

/// Refuses a fixed ratio outside its range: with a run target it is the round's pace, in
/// `[0, 1]`; without one the round's sparsity target, in `[0, 1)`.
pub(super) fn check_fixed_ratio(
    who: &str,
    ratio: f64,
    target_sparsity: Option<f64>,
) -> Result<(), StrategyError> {
    let arm = protocol::Arm::new(ratio, 1);
    protocol::SparsityGoal::of(&arm, target_sparsity)
        .check()
        .map_err(|e| StrategyError::InvalidConfig(format!("{who}: {e}")))
}

/// A one-arm space and its fixed policy.
pub(super) fn fixed_space(prune_ratio: f64, rank: u32) -> (ArmSpace, PolicyConfig) {
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
