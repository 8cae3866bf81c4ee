//! The policy arena: runs policies against environments with known optima and measures regret.
//!
//! An [`Environment`] knows each device's expected reward for every arm in every round, so
//! the runner can charge each play its regret `optimum - expected(arm)` (0 for a perfect
//! choice, the whole optimum when the arm fails or no arm is feasible). Rewards the policies
//! see are noisy draws; regret is measured on the expectations. Environments:
//! [`synthetic::SyntheticEnvironment`] (smooth 2-D surfaces, drift, heavy-tailed noise,
//! device classes, memory limits) and [`trace::TraceEnvironment`] (replays JSONL reward
//! traces of real runs). Everything here is pure; the `bandit-arena` binary does the file I/O.

pub mod report;
pub mod svg;
pub mod synthetic;
pub mod trace;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::feasibility::{FeasibilityConfig, FeasibilityFilter, Filtered};
use crate::policy::{AnyPolicy, Policy, PolicyConfig};

pub use report::{EnvironmentReport, PolicyRun};
pub use synthetic::{SyntheticConfig, SyntheticEnvironment};
pub use trace::{parse_trace_jsonl, TraceConfig, TraceEnvironment, TraceRecord};

/// What one play produced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pull {
    /// The reward the policy observes (0 when `failed`).
    pub reward: f64,
    /// Peak memory the play used, for the feasibility filter.
    pub peak_mem_bytes: u64,
    /// How long it took, for the feasibility filter.
    pub duration_ms: u64,
    /// The arm could not run on this device (e.g. out of memory).
    pub failed: bool,
}

/// A world the arena can run policies in.
pub trait Environment {
    fn name(&self) -> &str;
    /// The arms policies choose from.
    fn arm_space(&self) -> &ArmSpace;
    fn devices(&self) -> usize;
    /// What a policy is told about device `device` in `round`.
    fn context(&self, device: usize, round: u64) -> DeviceContext;
    /// Called once before each round (`rounds` is the run's length); environments may cache
    /// per-round optima here.
    fn prepare_round(&mut self, round: u64, rounds: u64);
    /// The best expected reward any feasible arm earns for `device` in the prepared round.
    fn optimum(&self, device: usize) -> f64;
    /// Expected reward of `arm` for `device` in the prepared round (0 if it fails).
    fn expected(&self, device: usize, arm: &Arm) -> f64;
    /// Plays `arm`: a noisy reward plus resource figures. Draws a fixed number of values from
    /// `rng` per call, so every policy faces the same noise sequence.
    fn pull(&self, device: usize, arm: &Arm, rng: &mut ChaCha8Rng) -> Pull;
}

/// One instance per device (the design's default) or one shared by all devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyScope {
    #[default]
    PerDevice,
    Shared,
}

/// A policy under a display name (so one kind can run with several parameter sets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedPolicy {
    pub name: String,
    #[serde(flatten)]
    pub config: PolicyConfig,
}

impl NamedPolicy {
    pub fn new(name: impl Into<String>, config: PolicyConfig) -> Self {
        NamedPolicy {
            name: name.into(),
            config,
        }
    }

    /// Every policy with default parameters, named by its kind.
    pub fn all_defaults() -> Vec<NamedPolicy> {
        PolicyConfig::all_defaults()
            .into_iter()
            .map(|c| NamedPolicy::new(c.kind(), c))
            .collect()
    }
}

/// Settings shared by every run in an arena session.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSettings {
    /// Seeds both the policies' and the environment's generators. Default `7`.
    pub seed: u64,
    /// Rounds per run; every device plays once per round. Default `2000`.
    pub rounds: u64,
    pub scope: PolicyScope,
    /// How the feasibility filter judges failures.
    pub feasibility: FeasibilityConfig,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            seed: 7,
            rounds: 2000,
            scope: PolicyScope::PerDevice,
            feasibility: FeasibilityConfig::default(),
        }
    }
}

/// One play, as reported to a run's observer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Play {
    pub device: usize,
    pub round: u64,
    /// `None` when the policy had no feasible arm left.
    pub arm: Option<Arm>,
    pub expected: f64,
    pub optimum: f64,
    pub reward: f64,
}

/// The generator for the policies' draws and the one for the environment's noise: two
/// streams of the same seed, so a policy's randomness never shifts the noise sequence.
pub fn run_rngs(seed: u64) -> (ChaCha8Rng, ChaCha8Rng) {
    let mut policy_rng = ChaCha8Rng::seed_from_u64(seed);
    policy_rng.set_stream(1);
    let mut env_rng = ChaCha8Rng::seed_from_u64(seed);
    env_rng.set_stream(2);
    (policy_rng, env_rng)
}

/// Runs one policy for `settings.rounds` rounds on every device of `env`, each policy
/// wrapped in a feasibility filter, and calls `on_play` after every play.
pub fn run_policy(
    env: &mut dyn Environment,
    policy: &NamedPolicy,
    settings: &RunSettings,
    on_play: &mut dyn FnMut(&Play),
) -> Result<PolicyRun, BanditError> {
    let space = env.arm_space().clone();
    let devices = env.devices();
    let fresh = || -> Result<Filtered<AnyPolicy>, BanditError> {
        Ok(Filtered::new(
            policy.config.build(&space)?,
            FeasibilityFilter::new(settings.feasibility)?,
        ))
    };
    let instances = match settings.scope {
        PolicyScope::PerDevice => devices,
        PolicyScope::Shared => 1,
    };
    let mut policies = (0..instances)
        .map(|_| fresh())
        .collect::<Result<Vec<_>, _>>()?;
    let (mut policy_rng, mut env_rng) = run_rngs(settings.seed);

    let mut regret = vec![0.0; devices];
    let mut curve = Vec::with_capacity(settings.rounds as usize);
    let (mut reward_sum, mut failures, mut no_feasible) = (0.0, 0u64, 0u64);
    for round in 0..settings.rounds {
        env.prepare_round(round, settings.rounds);
        for device in 0..devices {
            let ctx = env.context(device, round);
            let policy = &mut policies[device % instances];
            let optimum = env.optimum(device);
            let mut play = Play {
                device,
                round,
                arm: None,
                expected: 0.0,
                optimum,
                reward: 0.0,
            };
            match policy.choose(&ctx, &mut policy_rng) {
                Ok(arm) => {
                    let pull = env.pull(device, &arm, &mut env_rng);
                    policy.record(arm, pull.peak_mem_bytes, pull.duration_ms, &ctx)?;
                    policy.observe(&ctx, arm, pull.reward)?;
                    failures += u64::from(pull.failed);
                    play.arm = Some(arm);
                    play.expected = env.expected(device, &arm);
                    play.reward = pull.reward;
                }
                Err(BanditError::NoFeasibleArm { .. }) => no_feasible += 1,
                Err(e) => return Err(e),
            }
            regret[device] += optimum - play.expected;
            reward_sum += play.reward;
            on_play(&play);
        }
        curve.push(regret.iter().sum::<f64>() / devices as f64);
    }
    let plays = (settings.rounds * devices as u64).max(1) as f64;
    Ok(PolicyRun {
        name: policy.name.clone(),
        kind: policy.config.kind().to_string(),
        final_regret: curve.last().copied().unwrap_or(0.0),
        mean_reward: reward_sum / plays,
        failures,
        no_feasible,
        regret_curve: curve,
    })
}

/// Runs every policy on one environment.
pub fn run_environment(
    env: &mut dyn Environment,
    policies: &[NamedPolicy],
    settings: &RunSettings,
) -> Result<EnvironmentReport, BanditError> {
    let mut runs = Vec::with_capacity(policies.len());
    for p in policies {
        runs.push(run_policy(env, p, settings, &mut |_| {})?);
    }
    Ok(EnvironmentReport {
        environment: env.name().to_string(),
        rounds: settings.rounds,
        devices: env.devices(),
        seed: settings.seed,
        runs,
    })
}

/// A whole arena session as a TOML/JSON file: settings, policies, environments. Every field
/// is optional.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArenaConfig {
    /// Default `7`.
    pub seed: u64,
    /// Default `2000`.
    pub rounds: u64,
    /// Devices in each synthetic environment. Default `8`.
    pub devices: usize,
    /// Default `per-device`.
    pub scope: PolicyScope,
    pub feasibility: FeasibilityConfig,
    /// Default: every policy with default parameters.
    pub policies: Vec<NamedPolicy>,
    /// Default: the synthetic presets (see [`SyntheticConfig::presets`]).
    pub environments: Vec<EnvironmentConfig>,
}

impl Default for ArenaConfig {
    fn default() -> Self {
        let settings = RunSettings::default();
        ArenaConfig {
            seed: settings.seed,
            rounds: settings.rounds,
            devices: 8,
            scope: settings.scope,
            feasibility: settings.feasibility,
            policies: NamedPolicy::all_defaults(),
            environments: SyntheticConfig::presets()
                .into_iter()
                .map(EnvironmentConfig::Synthetic)
                .collect(),
        }
    }
}

impl ArenaConfig {
    pub fn settings(&self) -> RunSettings {
        RunSettings {
            seed: self.seed,
            rounds: self.rounds,
            scope: self.scope,
            feasibility: self.feasibility,
        }
    }
}

/// An environment description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EnvironmentConfig {
    Synthetic(SyntheticConfig),
    /// A JSONL reward trace; the binary reads `path`.
    Trace(TraceConfig),
}

impl EnvironmentConfig {
    pub fn name(&self) -> &str {
        match self {
            EnvironmentConfig::Synthetic(c) => &c.name,
            EnvironmentConfig::Trace(c) => &c.name,
        }
    }
}
