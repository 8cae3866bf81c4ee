//! `CoordinatorConfig`: plain data (serde, TOML-loadable) for everything a run of the round
//! coordinator decides with, and its validation.
//!
//! Every field has a default, so a TOML file names only what it changes:
//!
//! ```toml
//! rounds = 3
//! devices_per_round = 3
//! min_devices = 3
//! round_deadline_ms = 120000
//! local_steps = 20
//! target_sparsity = 0.3      # s*: every pruning strategy's devices head for it
//!
//! [strategy]
//! kind = "fedspine"          # fedspine | hetlora | fedlora | fixed-prune | ratio-bandit
//!                            # | prune-after-fl
//!
//! [aggregation]
//! method = "exact"           # exact | hetlora | mean | median | trimmed-mean
//!
//! [arms]                     # with target_sparsity the ratio is the round's pace
//! ratio_min = 0.0
//! ratio_max = 1.0
//! ranks = [4, 8]
//!
//! [policy]
//! kind = "s-ucb"
//! ```

use bandit::{ArmSpace, FeasibilityConfig, PolicyConfig, RewardWeights};
use serde::{Deserialize, Serialize};

use super::error::CoordinatorError;
use crate::aggregate::AggregationConfig;
use crate::strategy::{Common, Strategy, StrategyConfig};

/// Whose rewards a device's bandit learns from (TOML: `bandit_scope = "device"` or
/// `"class"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BanditScope {
    /// Its own plays only: each device learns alone (the paper's setting).
    #[default]
    Device,
    /// Its own plays, then every reward a device of the same declared class earned in the
    /// round (each observed as that arm, in device order). A fleet learns in the first rounds
    /// what one device would need dozens of plays for; devices that declare no class share
    /// nothing. Feasibility (memory, deadline) stays each device's own.
    Class,
}

/// Everything the coordinator decides with. Plain data; see the module docs for a TOML
/// example. [`CoordinatorConfig::validate`] runs in [`crate::coordinator::Coordinator::new`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Which strategy picks arms and aggregates. Default `fedspine`.
    pub strategy: StrategyConfig,
    /// The run's target sparsity s* in `[0, 0.9]` (the paper's levels are 0.3 and 0.5). Every
    /// round configuration carries it, and an arm's pruning ratio is then the round's *pace*:
    /// a device at sparsity `s` prunes toward `s + ratio * (s* - s)` this round
    /// ([`protocol::SparsityGoal`]), so a ratio of 1 closes the whole gap and arms may go up to
    /// 1. `None` (the default): an arm's ratio is the device's sparsity target after the round.
    pub target_sparsity: Option<f64>,
    /// Rounds to run; the coordinator says goodbye (`Bye(Finished)`) after the last one.
    pub rounds: u64,
    /// Devices whose updates a round aims for.
    pub devices_per_round: usize,
    /// Extra fraction selected on top of `devices_per_round` (0.2 selects 12 for 10), so that
    /// stragglers and dropouts do not starve a round.
    pub over_selection: f64,
    /// Idle joined devices needed before a round starts. Default: `devices_per_round`.
    pub min_devices: Option<usize>,
    /// Fraction of the selected devices whose accepted updates a round needs at its deadline
    /// to be aggregated; below it the round is abandoned. At least one update is always needed.
    pub quorum_fraction: f64,
    /// Close the round as soon as `devices_per_round` updates were accepted (the over-selected
    /// rest then count as missed). Default `true`.
    pub close_at_target: bool,
    /// Time a device has for its round, counted from the round start; the round closes then.
    pub round_deadline_ms: u64,
    /// Pause between the close of a round and the start of the next.
    pub round_interval_ms: u64,
    pub local_steps: u32,
    /// Prune toward the arm's ratio every this many local steps.
    pub prune_interval_steps: u32,
    pub learning_rate: f32,
    pub batch_size: u32,
    /// LoRA alpha of every adapter (scale = alpha / rank).
    pub lora_alpha: f32,
    /// Rank of the global adapter; every rank an arm may use must be at most this.
    pub max_rank: u32,
    /// How often devices send heartbeats while they work: 0 (none) or at least
    /// [`protocol::MIN_HEARTBEAT_INTERVAL_MS`], the shortest interval a device keeps.
    pub heartbeat_interval_ms: u64,
    /// Seed of the coordinator's generator (selection, arms, round seeds, initial adapter).
    pub seed: u64,
    /// How updates are combined (see [`crate::aggregate`]); the strategy may override the
    /// method.
    pub aggregation: AggregationConfig,
    pub reward: RewardWeights,
    /// The bandit of adaptive strategies. Default S-UCB.
    pub policy: PolicyConfig,
    /// Whose rewards a device's bandit learns from. Default [`BanditScope::Device`].
    pub bandit_scope: BanditScope,
    /// Exploration budget of a round: at most this many of the selected devices (drawn with
    /// the seeded generator) play their policy's exploring choice; the others play the arm
    /// their bandit now believes best ([`bandit::Policy::exploit_in`]). A synchronous round
    /// lasts as long as its slowest device, so when every device explores, nearly every round
    /// holds a slow arm; a budget pays for exploration with a few devices per round instead.
    /// A device whose bandit has nothing to exploit yet (nothing played, or a policy without
    /// estimates: fixed, uniform-random, EXP3) explores beyond the budget. `None` (the
    /// default): every device plays its policy's choice.
    pub explore_per_round: Option<usize>,
    /// With an exploration budget, the explorers choose after the round's other devices and
    /// only among arms no costlier than theirs taken together
    /// ([`bandit::FeasibleRegion::no_costlier_than`]: nothing at once lower in ratio and higher
    /// in rank), so that exploring does not set the round's pace. An explorer with no arm left
    /// there chooses unbounded. Default `false`.
    pub bounded_exploration: bool,
    /// Pruning ratios and LoRA ranks arms are drawn from.
    pub arms: ArmSpace,
    pub feasibility: FeasibilityConfig,
    /// Send global adapter slices in half precision.
    pub f16_downloads: bool,
    /// Largest update frame accepted, in bytes.
    pub max_update_bytes: u64,
    /// Most training samples an update may weigh with: a reported count above it (or above the
    /// round's `local_steps * batch_size`, what an honest device can have seen) is clipped to
    /// it before it weights the aggregation or the loss means. Default `1_000_000`.
    pub max_samples: u64,
    /// Largest held-out loss (nats) an update may report; above it, or negative or non-finite,
    /// the update is refused before its losses reach the reward shaping. Default `1000`.
    pub max_loss: f32,
    /// Device ids allowed to join; empty admits every device with a valid certificate.
    pub allowed_devices: Vec<u64>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            strategy: StrategyConfig::Fedspine,
            target_sparsity: None,
            rounds: 20,
            devices_per_round: 10,
            over_selection: 0.2,
            min_devices: None,
            quorum_fraction: 0.5,
            close_at_target: true,
            round_deadline_ms: 600_000,
            round_interval_ms: 0,
            local_steps: 40,
            prune_interval_steps: 20,
            learning_rate: 1e-3,
            batch_size: 4,
            lora_alpha: 32.0,
            max_rank: 64,
            heartbeat_interval_ms: 5_000,
            seed: 0,
            aggregation: AggregationConfig::default(),
            reward: RewardWeights::default(),
            policy: PolicyConfig::SUcb(Default::default()),
            bandit_scope: BanditScope::Device,
            explore_per_round: None,
            bounded_exploration: false,
            arms: ArmSpace::default(),
            feasibility: FeasibilityConfig::default(),
            f16_downloads: false,
            max_update_bytes: protocol::DEFAULT_MAX_FRAME_BYTES as u64,
            max_samples: 1_000_000,
            max_loss: 1.0e3,
            allowed_devices: Vec::new(),
        }
    }
}

fn invalid(what: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidConfig(what.into())
}

impl CoordinatorConfig {
    /// Parses a TOML document (unknown keys are errors).
    pub fn from_toml_str(text: &str) -> Result<CoordinatorConfig, CoordinatorError> {
        let config: CoordinatorConfig =
            toml::from_str(text).map_err(|e| invalid(format!("TOML: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The sample count an update reporting `reported` weighs with: at most `max_samples` and
    /// at most what the round let a device see (`local_steps * batch_size`).
    pub fn pinned_samples(&self, reported: u64) -> u64 {
        let round = (self.local_steps as u64).saturating_mul(self.batch_size as u64);
        reported.min(self.max_samples).min(round)
    }

    /// Idle joined devices a round needs to start.
    pub fn min_devices_to_start(&self) -> usize {
        self.min_devices.unwrap_or(self.devices_per_round).max(1)
    }

    /// Devices selected per round when enough are idle: `ceil(devices_per_round * (1 +
    /// over_selection))`.
    pub fn selection_size(&self) -> usize {
        ((self.devices_per_round as f64) * (1.0 + self.over_selection)).ceil() as usize
    }

    /// Checks ranges and cross-field constraints.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        if self.rounds == 0 {
            return Err(invalid("rounds must be at least 1"));
        }
        if self.devices_per_round == 0 {
            return Err(invalid("devices_per_round must be at least 1"));
        }
        if !(self.over_selection.is_finite() && (0.0..=10.0).contains(&self.over_selection)) {
            return Err(invalid(format!(
                "over_selection {} is outside [0, 10]",
                self.over_selection
            )));
        }
        if !(self.quorum_fraction > 0.0 && self.quorum_fraction <= 1.0) {
            return Err(invalid(format!(
                "quorum_fraction {} is outside (0, 1]",
                self.quorum_fraction
            )));
        }
        for (name, value) in [
            ("round_deadline_ms", self.round_deadline_ms),
            ("local_steps", self.local_steps as u64),
            ("prune_interval_steps", self.prune_interval_steps as u64),
            ("batch_size", self.batch_size as u64),
            ("max_rank", self.max_rank as u64),
            ("max_update_bytes", self.max_update_bytes),
            ("max_samples", self.max_samples),
        ] {
            if value == 0 {
                return Err(invalid(format!("{name} must be positive")));
            }
        }
        if self.heartbeat_interval_ms != 0
            && self.heartbeat_interval_ms < protocol::MIN_HEARTBEAT_INTERVAL_MS
        {
            return Err(invalid(format!(
                "heartbeat_interval_ms {} is below {} (devices never beat more often; 0 for no \
                 heartbeats)",
                self.heartbeat_interval_ms,
                protocol::MIN_HEARTBEAT_INTERVAL_MS
            )));
        }
        for (name, value) in [
            ("learning_rate", self.learning_rate),
            ("lora_alpha", self.lora_alpha),
            ("max_loss", self.max_loss),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(invalid(format!(
                    "{name} {value} is not a positive finite number"
                )));
            }
        }
        self.arms
            .validate()
            .map_err(|e| invalid(format!("arms: {e}")))?;
        match self.target_sparsity {
            Some(t) => {
                if !(t.is_finite() && (0.0..=protocol::MAX_TARGET_SPARSITY).contains(&t)) {
                    return Err(invalid(format!(
                        "target_sparsity {t} is outside [0, {}]",
                        protocol::MAX_TARGET_SPARSITY
                    )));
                }
            }
            None => {
                if self.arms.ratio_max >= 1.0 {
                    return Err(invalid(format!(
                        "arms.ratio_max {} must be below 1 without a target_sparsity (a device \
                         cannot prune everything)",
                        self.arms.ratio_max
                    )));
                }
            }
        }
        self.reward
            .validate()
            .map_err(|e| invalid(format!("reward: {e}")))?;
        self.feasibility
            .validate()
            .map_err(|e| invalid(format!("feasibility: {e}")))?;
        self.policy
            .build(&self.arms)
            .map_err(|e| invalid(format!("policy: {e}")))?;
        let agg = &self.aggregation;
        if !(0.0..0.5).contains(&agg.trim_fraction) {
            return Err(invalid(format!(
                "aggregation.trim_fraction {} is outside [0, 0.5)",
                agg.trim_fraction
            )));
        }
        if let Some(c) = agg.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(invalid(format!(
                    "aggregation.clip_norm {c} is not a positive finite number"
                )));
            }
        }
        if let Some(k) = agg.screen_factor {
            if !(k.is_finite() && k > 1.0) {
                return Err(invalid(format!(
                    "aggregation.screen_factor {k} is not a finite number above 1"
                )));
            }
        }
        for (name, value) in [
            ("max_layer_delta_norm", agg.max_layer_delta_norm),
            ("max_factor_norm", agg.max_factor_norm),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(invalid(format!(
                    "aggregation.{name} {value} is not a positive finite number"
                )));
            }
        }
        self.build_strategy()?;
        Ok(())
    }

    /// The settings every strategy takes from this config.
    pub fn strategy_common(&self) -> Common {
        Common {
            arms: self.arms.clone(),
            policy: self.policy.clone(),
            feasibility: self.feasibility,
            max_rank: self.max_rank,
            target_sparsity: self.target_sparsity,
        }
    }

    /// The sparsity the reward's progress term measures against: the run's target, or without
    /// one the largest ratio an arm may play (so no ratio short of it earns full credit).
    pub fn reward_target(&self) -> f64 {
        self.target_sparsity
            .unwrap_or(self.arms.ratio_max)
            .clamp(0.0, 1.0)
    }

    /// The configured strategy (refused when its settings do not fit the rest of the config).
    pub fn build_strategy(&self) -> Result<Box<dyn Strategy>, CoordinatorError> {
        Ok(self.strategy.build(self.strategy_common())?)
    }
}
