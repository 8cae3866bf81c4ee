//! Experiment configuration (TOML) and the built-in presets.
//!
//! An experiment names a strategy, a fleet, a model, a workload, how and when to evaluate,
//! and the coordinator's own config (the same `CoordinatorConfig` the real aggregator reads,
//! under `[coordinator]`). Every field has a default, so a file names only what it changes:
//!
//! ```toml
//! name = "my-run"
//! strategy = "fedspine"      # fedspine | hetlora | fedlora | fixed-prune | ratio-bandit | prune-after-fl
//! seed = 7
//! mode = "real"              # real | surrogate
//!
//! [fleet]
//! preset = "paper"           # paper | mixed, or list groups:
//! # groups = [{ profile = "jetson-tx2", count = 10 }, { profile = "my-board.toml", count = 5 }]
//!
//! [workload]
//! kind = "sotu"
//!
//! [coordinator]
//! rounds = 20
//! devices_per_round = 4
//!
//! [strategies.fixed-prune]   # parameters of a strategy when it runs
//! prune_ratio = 0.3
//! rank = 8
//! ```
//!
//! Presets (`default`, `sotu`, `full`, `surrogate`, `tiny`, `bandit`) are such files in `sim/configs/`, compiled
//! in; `sim run` without arguments runs `default`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aggregator::coordinator::CoordinatorConfig;
use aggregator::strategy::StrategyConfig;
use serde::{Deserialize, Serialize};

use crate::byzantine::ByzantineConfig;
use crate::error::SimError;
use crate::hardware::{FleetGroup, FleetSpec};
use crate::local_data::WorkloadConfig;

mod entry;

/// Real training on the model, or the fitted surrogate (no model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Real,
    Surrogate,
}

/// Which devices make up the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// A built-in fleet (`paper`, `mixed`); ignored when `groups` is not empty.
    pub preset: String,
    pub groups: Vec<FleetGroup>,
    /// Scale the fleet to this many devices, keeping the groups' proportions (0 = as given).
    pub devices: usize,
    /// Devices come online at a uniform random time within this many seconds of the start.
    pub connect_spread_s: f64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            preset: "paper".into(),
            groups: Vec::new(),
            devices: 0,
            connect_spread_s: 10.0,
        }
    }
}

impl FleetConfig {
    pub fn spec(&self) -> Result<FleetSpec, SimError> {
        let spec = if self.groups.is_empty() {
            FleetSpec::named(&self.preset).ok_or_else(|| {
                SimError::Config(format!(
                    "unknown fleet preset '{}' (paper, mixed; or give groups)",
                    self.preset
                ))
            })?
        } else {
            FleetSpec {
                groups: self.groups.clone(),
            }
        };
        Ok(if self.devices > 0 {
            spec.scaled_to(self.devices)
        } else {
            spec
        })
    }
}

/// The model the devices train.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ModelChoice {
    /// SmolLM2-135M-Instruct from the asset cache.
    #[default]
    Default,
    /// A GGUF file or HF checkpoint directory.
    Path { path: PathBuf },
    /// A random tiny LLaMA (tests, smoke runs); pairs with the synthetic workload.
    Tiny(TinyModel),
}

/// Shape of a random tiny model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinyModel {
    pub vocab: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub seed: u64,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            vocab: 48,
            d_model: 32,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            ffn: 64,
            seed: 1,
        }
    }
}

/// Which metric the time-to-target column uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetMetric {
    /// Next-token accuracy (LM) or label accuracy (classification); higher is better.
    Accuracy,
    /// Held-out perplexity (LM); lower is better.
    Perplexity,
}

/// Evaluation of the global adapter on devices' held-out data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate the panel after every this many rounds (and after the last one).
    pub every_rounds: u64,
    /// Devices in the panel (chosen once, stratified by class; 0 = every device).
    pub panel_devices: usize,
    /// Devices whose final model is evaluated at the end, among those that trained, and
    /// again among those that never trained for the fleet figure (a seeded sample of each;
    /// 0 = every device).
    pub final_devices: usize,
    pub target_metric: TargetMetric,
    /// Time to target is the virtual time of the first panel evaluation at or past this.
    pub target_value: f64,
    /// Prompt length for the inference-latency column.
    pub latency_prompt_tokens: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every_rounds: 2,
            panel_devices: 6,
            final_devices: 24,
            target_metric: TargetMetric::Accuracy,
            target_value: 0.4,
            latency_prompt_tokens: 128,
        }
    }
}

/// Surrogate-mode settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SurrogateConfig {
    /// Parameters file written by `sim fit-surrogate`; empty = the built-in fit.
    pub params: String,
    /// Accept a parameter file without provenance (hand-set, not fitted).
    pub force_unfitted: bool,
}

/// The virtual clock's compute model.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    /// Measurement file written by `sim calibrate` (read relative to the working directory)
    /// that the per-operator step-time model is fitted to; empty = the shipped calibration
    /// (`sim/calibration/amd-epyc-zen4-avx512.json`). Only the shape of the costs comes from
    /// it (what pruning, rank and geometry save): device profiles set the speed.
    pub calibration: String,
}

impl ClockConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// How real-mode devices choose what they prune: device-side settings that the round
/// configuration does not carry (an operator sets them per agent), the same for every device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PruningConfig {
    /// Importance criterion: `lora-gradient` (the default), `taylor`, `magnitude`, `random`.
    pub criterion: device_agent::prune::Criterion,
    /// Every prunable block pruned by the same ratio, each choosing its own units (LoRAPrune's
    /// option), instead of one ranking over the whole model.
    pub per_block: bool,
    /// The gradual schedule's floor on pruning events per round (the agent's default, 8);
    /// 1 lets `coordinator.prune_interval_steps` alone space them, as the paper's K does.
    pub min_events: usize,
}

impl Default for PruningConfig {
    fn default() -> Self {
        PruningConfig {
            criterion: Default::default(),
            per_block: false,
            min_events: device_agent::train::TrainConfig::default().min_prune_events,
        }
    }
}

impl PruningConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A whole experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentConfig {
    pub name: String,
    /// Strategy to run (overrides `coordinator.strategy`), with parameters from `strategies`.
    pub strategy: String,
    pub seed: u64,
    pub mode: Mode,
    /// Where reports go (a folder per strategy inside it).
    pub output_dir: PathBuf,
    /// Stop after this much virtual time even if rounds remain.
    pub max_virtual_hours: f64,
    pub fleet: FleetConfig,
    pub model: ModelChoice,
    /// Real mode: arithmetic of the frozen base's products, `fp32`, `bf16` (operands rounded
    /// to bf16 with fp32 accumulation, on a CPU with AVX-512-BF16; elsewhere the run says so and
    /// trains in fp32), `int8` (int8 operands with one scale per row and each product's largest
    /// input columns in fp32, on every CPU; never chosen by `auto`) or `auto` (bf16 where the CPU
    /// has it, else fp32; the shipped real-mode presets ask for it). The report's summary names
    /// the one that ran.
    pub precision: String,
    pub workload: WorkloadConfig,
    pub eval: EvalConfig,
    pub surrogate: SurrogateConfig,
    pub coordinator: CoordinatorConfig,
    /// Per-strategy parameters, e.g. `[strategies.fixed-prune] prune_ratio = 0.3`.
    pub strategies: BTreeMap<String, toml::Table>,
    /// Real mode: the devices' importance criterion and block ratios (defaults: LoRA-gradient,
    /// one ranking over the model). The surrogate models neither and refuses a change.
    #[serde(skip_serializing_if = "PruningConfig::is_default")]
    pub pruning: PruningConfig,
    /// Devices that poison their updates (none by default; see [`crate::byzantine`]).
    #[serde(skip_serializing_if = "ByzantineConfig::is_off")]
    pub byzantine: ByzantineConfig,
    /// The measurement file the virtual clock is fitted to (the shipped one by default).
    #[serde(skip_serializing_if = "ClockConfig::is_default")]
    pub clock: ClockConfig,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        ExperimentConfig {
            name: "experiment".into(),
            strategy: "fedspine".into(),
            seed: 7,
            mode: Mode::Real,
            output_dir: PathBuf::from("runs/experiment"),
            max_virtual_hours: 1000.0,
            fleet: FleetConfig::default(),
            model: ModelChoice::default(),
            precision: "fp32".into(),
            workload: WorkloadConfig::default(),
            eval: EvalConfig::default(),
            surrogate: SurrogateConfig::default(),
            coordinator: CoordinatorConfig::default(),
            strategies: BTreeMap::new(),
            pruning: PruningConfig::default(),
            byzantine: ByzantineConfig::default(),
            clock: ClockConfig::default(),
        }
    }
}

/// The built-in presets: (name, TOML text).
pub const PRESETS: [(&str, &str); 7] = [
    ("default", include_str!("../configs/default.toml")),
    ("sotu", include_str!("../configs/sotu.toml")),
    ("full", include_str!("../configs/full.toml")),
    ("surrogate", include_str!("../configs/surrogate.toml")),
    (
        "paper-surrogate",
        include_str!("../configs/paper-surrogate.toml"),
    ),
    ("tiny", include_str!("../configs/tiny.toml")),
    ("bandit", include_str!("../configs/bandit.toml")),
];

/// The strategy names `sim compare` accepts.
pub const STRATEGIES: [&str; 6] = [
    "fedspine",
    "hetlora",
    "fedlora",
    "fixed-prune",
    "ratio-bandit",
    "prune-after-fl",
];

impl ExperimentConfig {
    /// Parse and check a config; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, SimError> {
        let mut c: ExperimentConfig =
            toml::from_str(text).map_err(|e| SimError::Config(format!("{origin}: {e}")))?;
        c.apply_strategy()?;
        c.validate()
            .map_err(|e| SimError::Config(format!("{origin}: {e}")))?;
        Ok(c)
    }

    /// A built-in preset.
    pub fn preset(name: &str) -> Result<Self, SimError> {
        let (_, text) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            SimError::Config(format!(
                "unknown preset '{name}' (built-in: {})",
                names.join(", ")
            ))
        })?;
        Self::from_toml(text, &format!("preset {name}"))
    }

    /// A config file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Switch to strategy `name` (with its `[strategies.NAME]` parameters).
    pub fn with_strategy(&self, name: &str) -> Result<Self, SimError> {
        let mut c = self.clone();
        c.strategy = name.to_string();
        c.apply_strategy()?;
        c.validate()?;
        Ok(c)
    }

    /// Build `coordinator.strategy` from `strategy` and its parameter table; copy the seed.
    fn apply_strategy(&mut self) -> Result<(), SimError> {
        if !STRATEGIES.contains(&self.strategy.as_str()) {
            return Err(SimError::Config(format!(
                "unknown strategy '{}' (one of {})",
                self.strategy,
                STRATEGIES.join(", ")
            )));
        }
        self.coordinator.strategy = self.strategy_config(&self.strategy)?;
        self.coordinator.seed = self.seed;
        Ok(())
    }

    /// Strategy `name` with its `[strategies.NAME]` parameters (defaults where absent).
    fn strategy_config(&self, name: &str) -> Result<StrategyConfig, SimError> {
        let mut table = self.strategies.get(name).cloned().unwrap_or_default();
        table.insert("kind".into(), toml::Value::String(name.to_string()));
        toml::Value::Table(table)
            .try_into()
            .map_err(|e| SimError::Config(format!("strategies.{name}: {e}")))
    }

    /// Local steps a device gets after it is brought to s* for the final evaluation, whatever
    /// its strategy: `prune-after-fl`'s `recovery_steps` (its table, or its default), so a
    /// paced strategy's device that fell short of s* recovers exactly as long as a
    /// `prune-after-fl` device does and every strategy's final models at s* have the same
    /// recovery budget.
    pub fn final_recovery_steps(&self) -> Result<u32, SimError> {
        match self.strategy_config("prune-after-fl")? {
            StrategyConfig::PruneAfterFl(c) => Ok(c.recovery_steps),
            other => Err(SimError::Config(format!(
                "strategies.prune-after-fl parsed as {}",
                other.name()
            ))),
        }
    }

    /// Cross-field checks the parts cannot do alone.
    pub fn validate(&self) -> Result<(), SimError> {
        self.coordinator
            .validate()
            .map_err(|e| SimError::Config(e.to_string()))?;
        device_agent::bf16::Precision::requested(&self.precision, true)
            .map_err(|e| SimError::Config(format!("precision: {e}")))?;
        let fleet = self.fleet.spec()?;
        if fleet.total() == 0 {
            return Err(SimError::Config("the fleet has no devices".into()));
        }
        if self.coordinator.min_devices_to_start() > fleet.total() {
            return Err(SimError::Config(format!(
                "coordinator.min_devices {} exceeds the fleet's {} devices",
                self.coordinator.min_devices_to_start(),
                fleet.total()
            )));
        }
        if matches!(self.model, ModelChoice::Tiny(_))
            != (self.workload.kind == crate::local_data::WorkloadKind::Synthetic)
            && self.mode == Mode::Real
        {
            return Err(SimError::Config(
                "the tiny model pairs with the synthetic workload (and only it)".into(),
            ));
        }
        if self.max_virtual_hours.is_nan() || self.max_virtual_hours <= 0.0 {
            return Err(SimError::Config(
                "max_virtual_hours must be positive".into(),
            ));
        }
        if self.pruning.min_events == 0 {
            return Err(SimError::Config(
                "pruning.min_events must be at least 1".into(),
            ));
        }
        if self.mode == Mode::Surrogate && !self.pruning.is_default() {
            return Err(SimError::Config(format!(
                "pruning: the surrogate was fitted on devices ranking LoRA-gradient importance over \
                 the whole model with the default schedule and models no other criterion, block \
                 ratio or event floor ({:?}); run this in real mode",
                self.pruning
            )));
        }
        self.byzantine.validate()?;
        self.byzantine
            .check_reported_losses(self.coordinator.max_loss as f64)?;
        self.final_recovery_steps()?;
        if self.eval.every_rounds == 0 {
            return Err(SimError::Config(
                "eval.every_rounds must be at least 1".into(),
            ));
        }
        if !(self.fleet.connect_spread_s >= 0.0 && self.fleet.connect_spread_s.is_finite()) {
            return Err(SimError::Config(
                "fleet.connect_spread_s must be >= 0".into(),
            ));
        }
        Ok(())
    }

    /// The output folder of this strategy's run.
    pub fn run_dir(&self) -> PathBuf {
        self.output_dir.join(&self.strategy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_config_loads_and_the_linear_bandit_one_changes_only_its_learner() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/examples");
        let mut loaded = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                ExperimentConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                loaded += 1;
            }
        }
        assert!(loaded >= 9, "{loaded} example configs");
        let base = ExperimentConfig::load(&dir.join("bandit-s03.toml")).unwrap();
        let mut linear = ExperimentConfig::load(&dir.join("bandit-s03-linear.toml")).unwrap();
        let c = &linear.coordinator;
        assert_eq!(c.policy.kind(), "linear-ucb");
        assert_eq!(c.bandit_scope, aggregator::coordinator::BanditScope::Class);
        assert_eq!(c.explore_per_round, Some(1));
        assert_eq!((c.reward.w1, c.reward.w2, c.reward.w3), (1.0, 3.0, 0.25));
        assert_eq!(c.reward.w4, 3.0);
        // Everything else is bandit-s03's.
        linear.name = base.name.clone();
        linear.output_dir = base.output_dir.clone();
        linear.coordinator.policy = base.coordinator.policy.clone();
        linear.coordinator.bandit_scope = base.coordinator.bandit_scope;
        linear.coordinator.explore_per_round = base.coordinator.explore_per_round;
        linear.coordinator.reward = base.coordinator.reward;
        assert_eq!(linear, base);
    }

    #[test]
    fn presets_parse() {
        for (name, _) in PRESETS {
            let c = ExperimentConfig::preset(name).unwrap();
            assert_eq!(c.coordinator.seed, c.seed);
        }
        let example = include_str!("../configs/examples/mixed-surrogate.toml");
        let m = ExperimentConfig::from_toml(example, "mixed-surrogate").unwrap();
        assert_eq!(m.fleet.spec().unwrap().total(), 120);
        let d = ExperimentConfig::preset("default").unwrap();
        assert_eq!(d.fleet.spec().unwrap().total(), 80);
        use crate::local_data::WorkloadKind;
        for (name, text, workload) in [
            (
                "validate-spam",
                include_str!("../configs/examples/validate-spam.toml"),
                WorkloadKind::Spam,
            ),
            (
                "validate-sotu",
                include_str!("../configs/examples/validate-sotu.toml"),
                WorkloadKind::Sotu,
            ),
        ] {
            let v = ExperimentConfig::from_toml(text, name).unwrap();
            assert_eq!((v.mode, v.workload.kind), (Mode::Real, workload), "{name}");
        }
        for (name, text) in [
            (
                "byzantine",
                include_str!("../configs/examples/byzantine.toml"),
            ),
            (
                "byzantine-surrogate",
                include_str!("../configs/examples/byzantine-surrogate.toml"),
            ),
        ] {
            let b = ExperimentConfig::from_toml(text, name).unwrap();
            assert_eq!(b.byzantine.fraction, 0.1, "{name}");
            for entry in [
                "hetlora+agg=median+clean",
                "hetlora+clip=3",
                "hetlora+agg=trimmed-mean",
            ] {
                b.with_entry(entry).unwrap();
            }
            let clean = b.with_entry("hetlora+agg=median+clean").unwrap();
            assert!(clean.byzantine.is_off());
            assert_eq!(clean.coordinator.aggregation.method.name(), "median");
            match &clean.coordinator.strategy {
                StrategyConfig::Hetlora(h) => assert_eq!(
                    h.aggregation,
                    Some(aggregator::aggregate::AggregationMethod::Median),
                    "the strategy's own override follows the entry"
                ),
                other => panic!("{other:?}"),
            }
            let clip = b.with_entry("hetlora+clip=3").unwrap();
            assert_eq!(clip.coordinator.aggregation.clip_norm, Some(3.0));
            assert_eq!(clip.byzantine, b.byzantine);
            let e = b.with_entry("hetlora+agg=avg").unwrap_err().to_string();
            assert!(e.contains("unknown aggregation method 'avg'"), "{e}");
            let screen = b.with_entry("hetlora+screen=3+clean").unwrap();
            assert_eq!(screen.coordinator.aggregation.screen_factor, Some(3.0));
            assert!(screen.byzantine.is_off());
            let e = b.with_entry("hetlora+screen=1").unwrap_err().to_string();
            assert!(e.contains("screen=1"), "{e}");
            let e = b.with_entry("hetlora+clip=-1").unwrap_err().to_string();
            assert!(e.contains("clip=-1"), "{e}");
            let e = b.with_entry("hetlora+poison").unwrap_err().to_string();
            assert!(e.contains("unknown modifier 'poison'"), "{e}");
        }
    }

    #[test]
    fn strategy_parameters_come_from_their_table() {
        let c = ExperimentConfig::from_toml(
            "strategy = \"fixed-prune\"\n[fleet]\npreset = \"paper\"\n[coordinator]\nmin_devices = 4\ndevices_per_round = 4\n[coordinator.arms]\nratio_min = 0.0\nratio_max = 0.5\nranks = [4, 8]\n[strategies.fixed-prune]\nprune_ratio = 0.25\nrank = 8\n",
            "test",
        )
        .unwrap();
        match &c.coordinator.strategy {
            StrategyConfig::FixedPrune(f) => assert_eq!((f.prune_ratio, f.rank), (0.25, 8)),
            other => panic!("{other:?}"),
        }
        let h = c.with_strategy("hetlora").unwrap();
        assert_eq!(h.coordinator.strategy.name(), "hetlora");
        let e = c.with_strategy("fedprox").unwrap_err().to_string();
        assert!(e.contains("unknown strategy 'fedprox'"), "{e}");
        let e = ExperimentConfig::from_toml("rounds = 3", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }
}
