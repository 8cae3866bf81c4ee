//! The compute stand-in: what does a device's local work in the simulator (runs a local round,
//! evaluates a device's model, sizes its rounds). [`RealTrainer`] runs the device agent's own
//! `run_job` on the one shared frozen base model (real loss, real pruning); the surrogate
//! ([`crate::surrogate::SurrogateTrainer`]) answers from a fitted loss-response model instead.
//! Either way the driver turns the work's FLOPs into virtual time.

use std::sync::Arc;

use device_agent::cost::{PrunedModel, RoundCosts};
use device_agent::job::{self, LocalData};
use device_agent::model::{Llama, ModelConfig};
use device_agent::prune::{self, Criterion, HeldModel, KeptIndicesExt, PruneConfig};
use device_agent::session::{AgentConfig, DeviceState, JobOutcome, TrainJob};
use device_agent::train::{TrainConfig, Tuner};
use protocol::KeptIndices;
use protocol::{Arm, GlobalSlice, Timestamp};
use serde::Serialize;

use crate::device_rounds::{self, DeviceRound};
use crate::side_by_side;
use crate::timing::{Clock, RoundFlops, StepShape};
use crate::wall_profile::WallLedger;

/// A finished local round and what it cost.
pub struct TrainedRound {
    pub outcome: JobOutcome,
    pub flops: RoundFlops,
}

/// Held-out quality of a device's model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Quality {
    /// Mean loss (nats): next-token NLL (LM) or label cross-entropy (classification).
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub loss: f64,
    /// Next-token accuracy (LM) or label accuracy (classification).
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub accuracy: f64,
    /// `exp(loss)` for LM workloads.
    pub perplexity: Option<f64>,
}

/// How a device's model is brought to the run's target sparsity before it is evaluated: the
/// device's own importance scores (its criterion on `importance_batches` micro-batches of its
/// own training data, with its model and the global adapter; no update is applied), one-shot
/// structured pruning to `target`, then `recovery_steps` local steps (0: none).
#[derive(Debug, Clone)]
pub struct ToTarget {
    pub target: f64,
    pub importance_batches: usize,
    pub recovery_steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub criterion: Criterion,
    pub prune: PruneConfig,
}

/// One evaluation of `device`'s model (its state's kept maps) with `slice` of the global
/// adapter, brought to a target sparsity first when `goal` is set (see [`ToTarget`]).
#[derive(Debug, Clone)]
pub struct EvalTask {
    pub device: usize,
    pub state: DeviceState,
    pub slice: GlobalSlice,
    pub goal: Option<ToTarget>,
}

/// An evaluation's quality and, when it was brought to a target, the kept maps it was scored
/// with.
pub type EvalResult = Result<(Quality, Option<KeptIndices>), String>;

/// The simulator's stand-in for device hardware and local training.
pub trait LocalTrainer {
    /// `real` or `surrogate` (reports label the mode).
    fn mode(&self) -> &'static str;
    /// Arithmetic of the frozen base's products in training (`fp32`, `bf16`); `none` where
    /// nothing trains (the surrogate).
    fn precision(&self) -> &'static str {
        "none"
    }
    /// The dense model every device holds (wire dimensions come from it).
    fn dense(&self) -> &ModelConfig;
    /// The model whose shape sets time and memory for a device with `kept` maps (the dense
    /// model pruned to them in real mode; the real model at the same sparsity for the surrogate).
    fn cost_config(&self, kept: &KeptIndices) -> Arc<ModelConfig>;
    /// Tokens per training sequence of `device`.
    fn seq_len(&self, device: usize) -> usize;
    /// What the virtual clock charges compute with (the trainer's rounds and the driver's
    /// step estimates and latencies alike).
    fn clock(&self) -> &Clock;
    /// How `device`'s session sizes its rounds and messages (the same shapes, sequence length
    /// and wire sizes as [`LocalTrainer::cost_config`], [`LocalTrainer::seq_len`] and
    /// [`LocalTrainer::wire_bytes`]).
    fn costs(&self, device: usize) -> Arc<dyn RoundCosts>;
    /// Tokens of one held-out evaluation of `device`, and their sequence length.
    fn eval_tokens(&self, device: usize) -> (usize, usize);
    /// Run `job` for `device` from `state`.
    fn train(
        &mut self,
        device: usize,
        job: &TrainJob,
        state: &DeviceState,
        agent: &AgentConfig,
    ) -> Result<TrainedRound, String>;
    /// Quality of `device`'s model (its kept maps) with `slice` of the global adapter.
    fn evaluate(
        &mut self,
        device: usize,
        state: &DeviceState,
        slice: &GlobalSlice,
    ) -> Result<Quality, String>;
    /// Quality of `device`'s model brought to `goal.target` first (see [`ToTarget`]), and the
    /// kept maps it was evaluated with.
    fn evaluate_at_target(
        &mut self,
        device: usize,
        state: &DeviceState,
        slice: &GlobalSlice,
        goal: &ToTarget,
    ) -> Result<(Quality, KeptIndices), String>;
    /// Every one of `tasks` (independent of each other: the same global state), results in
    /// the order of the tasks; the real trainer runs several side by side
    /// ([`crate::side_by_side`]), with the same results as one after another.
    fn evaluate_all(&mut self, tasks: &[EvalTask]) -> Vec<EvalResult> {
        tasks
            .iter()
            .map(|t| match &t.goal {
                None => self
                    .evaluate(t.device, &t.state, &t.slice)
                    .map(|q| (q, None)),
                Some(g) => self
                    .evaluate_at_target(t.device, &t.state, &t.slice, g)
                    .map(|(q, k)| (q, Some(k))),
            })
            .collect()
    }
    /// Bytes a frame of `encoded_len` would take on the wire for the modelled model (the
    /// surrogate's wire model is tiny; it reports the real model's sizes).
    fn wire_bytes(&self, _msg: &protocol::Message, encoded_len: usize) -> usize {
        encoded_len
    }
    /// A round closed (the surrogate updates its global state).
    fn round_closed(&mut self, _aggregated: bool, _participants: &[(usize, f64)]) {}
    /// The device-rounds recorded since the last call (real mode; class, seed, strategy and
    /// workload are filled in by the driver).
    fn take_device_rounds(&mut self) -> Vec<DeviceRound> {
        Vec::new()
    }
    /// Where the parameters came from and how well they validated (surrogate mode).
    fn params_note(&self) -> Option<String> {
        None
    }
}

/// Real local training: `job::run_job` on the shared base.
pub struct RealTrainer {
    /// The one frozen base model; devices hold only kept maps and adapters.
    pub base: Llama,
    pub data: Vec<LocalData>,
    /// When set, evaluations of the global adapter use this held-out set for every device.
    pub global_test: Option<LocalData>,
    /// What the virtual clock charges a round's compute.
    clock: Arc<Clock>,
    /// Device-rounds trained since the last [`LocalTrainer::take_device_rounds`].
    recorded: Vec<DeviceRound>,
    /// A wall clock in milliseconds, injected by the binary (the library reads no clock), to
    /// record each round's measured compute; `None` leaves it out.
    pub wall_clock: Option<WallClock>,
    /// Where the wall time goes (with `wall_clock`), for the binary's overhead table.
    pub wall_ledger: Option<Arc<WallLedger>>,
    /// Evaluations [`LocalTrainer::evaluate_all`] runs side by side (one worker: one after
    /// another); fp32 and int8 (bf16 runs keep one at a time: their packed weights' cache holds
    /// about one model and a half; int8 rows take under half as much a model).
    pub eval_workers: side_by_side::Workers,
}

/// Wall-time ledger parts of the evaluations.
const EVALUATIONS: &str = "evaluations (panel, final)";
const AT_TARGET: &str = "bring to s* and evaluate (panel, final)";

pub use crate::wall_profile::WallClock;

impl RealTrainer {
    pub fn new(
        base: Llama,
        data: Vec<LocalData>,
        global_test: Option<LocalData>,
        clock: Arc<Clock>,
    ) -> Self {
        RealTrainer {
            base,
            data,
            global_test,
            clock,
            recorded: Vec::new(),
            wall_clock: None,
            wall_ledger: None,
            eval_workers: side_by_side::Workers::default(),
        }
    }

    /// Quality of `device`'s model (its kept maps) with `slice` of the global adapter.
    fn quality(
        &self,
        device: usize,
        state: &DeviceState,
        slice: &GlobalSlice,
    ) -> Result<Quality, String> {
        let data = self.global_test.as_ref().unwrap_or(&self.data[device]);
        let model = prune::slice_model(&self.base, &state.kept).map_err(|e| e.to_string())?;
        let job = eval_job(slice);
        let adapter = job::start_adapter(&job, state, &self.base).map_err(|e| e.to_string())?;
        let (loss, accuracy) = data.evaluate(&model, Some(&adapter));
        let perplexity = matches!(data, LocalData::Lm(_)).then(|| loss.exp());
        Ok(Quality {
            loss,
            accuracy,
            perplexity,
        })
    }

    /// One task, untimed.
    fn run_task(&self, t: &EvalTask) -> EvalResult {
        match &t.goal {
            None => self
                .quality(t.device, &t.state, &t.slice)
                .map(|q| (q, None)),
            Some(g) => {
                let out = self.real_at_target(t.device, &t.state, &t.slice, g);
                // As after a local round: the tuner's model is gone.
                device_agent::bf16::cache::sweep();
                out.map(|(q, k)| (q, Some(k)))
            }
        }
    }
}

/// The model of a device: the dense config with `kept`'s block shapes.
pub fn pruned_config(dense: &ModelConfig, kept: &KeptIndices) -> ModelConfig {
    let mut c = dense.clone();
    c.blocks = kept.shapes(dense);
    c
}

impl LocalTrainer for RealTrainer {
    fn mode(&self) -> &'static str {
        "real"
    }

    fn precision(&self) -> &'static str {
        self.base.precision().name()
    }

    fn dense(&self) -> &ModelConfig {
        &self.base.config
    }

    fn cost_config(&self, kept: &KeptIndices) -> Arc<ModelConfig> {
        Arc::new(pruned_config(&self.base.config, kept))
    }

    fn clock(&self) -> &Clock {
        &self.clock
    }

    fn seq_len(&self, device: usize) -> usize {
        self.data[device].seq_len()
    }

    fn costs(&self, device: usize) -> Arc<dyn RoundCosts> {
        Arc::new(PrunedModel {
            dense: self.base.config.clone(),
            seq_len: self.seq_len(device),
        })
    }

    fn eval_tokens(&self, device: usize) -> (usize, usize) {
        crate::local_data::eval_tokens(&self.data[device])
    }

    fn train(
        &mut self,
        device: usize,
        job: &TrainJob,
        state: &DeviceState,
        agent: &AgentConfig,
    ) -> Result<TrainedRound, String> {
        let data = &self.data[device];
        // The device's own copy of the shared base, sliced to its kept maps, and its round.
        let started_ms = self.wall_clock.map(|clock| clock());
        let held = HeldModel::sliced(&self.base, &state.kept).map_err(|e| e.to_string())?;
        let outcome = job::run_job(job, state, held, data, agent, |_| true).outcome;
        // The round's model is gone: its kept bf16 packings go now, before the next model is
        // built, not at that model's first product.
        device_agent::bf16::cache::sweep();
        let outcome = outcome.map_err(|e| e.to_string())?;
        // Compute of the round itself: slicing and run_job (its evaluations included).
        let measured_compute_ms = self
            .wall_clock
            .zip(started_ms)
            .map(|(clock, t0)| clock() - t0);
        if let (Some(l), Some(ms)) = (self.wall_ledger.as_deref(), measured_compute_ms) {
            l.add("local rounds (run_job: slicing, steps, pruning)", ms);
        }
        let stats = device_rounds::data_stats(data);
        let (rank, alpha, factors) = &outcome.adapter;
        self.recorded.push(DeviceRound {
            workload: String::new(),
            seed: 0,
            strategy: String::new(),
            round: job.round.0,
            device: device as u64,
            class: String::new(),
            prune_ratio: job.arm.prune_ratio,
            rank: job.arm.rank,
            sparsity_before: outcome.report.sparsity_before,
            sparsity_after: outcome.report.sparsity_after,
            steps: job.local_steps as u64,
            batch: job.batch as u64,
            data_items: stats.items,
            data_tokens: stats.tokens,
            label_share: stats.label_share,
            loss_before: outcome.stats.loss_pre as f64,
            loss_after: outcome.stats.loss_post as f64,
            // The device's own held-out evaluation of the adapter it started from.
            accuracy_before: outcome.metric_pre,
            accuracy_after: outcome.metric_post,
            update_norm: device_rounds::update_norm(factors, *rank, *alpha),
            measured_compute_ms,
        });
        let pre = pruned_config(&self.base.config, &state.kept);
        let post = pruned_config(&self.base.config, &outcome.kept);
        let (eval_tokens, eval_seq) = crate::local_data::eval_tokens(data);
        let shape = StepShape {
            rank: job.arm.rank as usize,
            batch: job.batch,
            seq: data.seq_len(),
            eval_tokens,
            eval_seq,
        };
        let flops = self.clock.round_flops(&pre, &post, shape, &outcome.report);
        Ok(TrainedRound { outcome, flops })
    }

    fn take_device_rounds(&mut self) -> Vec<DeviceRound> {
        std::mem::take(&mut self.recorded)
    }

    fn evaluate(
        &mut self,
        device: usize,
        state: &DeviceState,
        slice: &GlobalSlice,
    ) -> Result<Quality, String> {
        let (ledger, clock) = (self.wall_ledger.clone(), self.wall_clock);
        WallLedger::time(ledger.as_deref(), clock, EVALUATIONS, || {
            self.quality(device, state, slice)
        })
    }

    fn evaluate_at_target(
        &mut self,
        device: usize,
        state: &DeviceState,
        slice: &GlobalSlice,
        goal: &ToTarget,
    ) -> Result<(Quality, KeptIndices), String> {
        let task = EvalTask {
            device,
            state: state.clone(),
            slice: slice.clone(),
            goal: Some(goal.clone()),
        };
        let mut out = self.evaluate_all(std::slice::from_ref(&task));
        out.pop()
            .expect("one result per task")
            .map(|(q, k)| (q, k.unwrap_or_else(|| state.kept.clone())))
    }

    fn evaluate_all(&mut self, tasks: &[EvalTask]) -> Vec<EvalResult> {
        let w = self.eval_workers;
        let workers = if self.base.precision() != device_agent::bf16::Precision::Bf16 {
            w.workers
        } else {
            1
        };
        let this = &*self;
        // A task's size in training steps' worth of work (an evaluation about one).
        let size = |t: &EvalTask| {
            t.goal
                .as_ref()
                .map_or(1, |g| 1 + (g.importance_batches + g.recovery_steps) as u64)
        };
        let ran = side_by_side::run(tasks, workers, w.cores, this.wall_clock, size, |t| {
            this.run_task(t)
        });
        // Pieces that ran side by side overlap: each part is charged its pieces' share of the
        // batch's wall time, so the ledger's parts still add up to the run's wall time.
        if let (Some(l), Some(_)) = (self.wall_ledger.as_deref(), self.wall_clock) {
            let sum: f64 = ran.results.iter().map(|(_, ms)| ms).sum();
            let scale = if sum > 0.0 { ran.elapsed_ms / sum } else { 0.0 };
            for (t, (_, ms)) in tasks.iter().zip(&ran.results) {
                let part = if t.goal.is_some() {
                    AT_TARGET
                } else {
                    EVALUATIONS
                };
                l.add(part, ms * scale);
            }
        }
        ran.results.into_iter().map(|(r, _)| r).collect()
    }
}

impl RealTrainer {
    /// [`LocalTrainer::evaluate_at_target`] on the real model: the device's model with the
    /// global adapter, importance from its own data, `Tuner::prune_to`, the recovery steps,
    /// then the held-out evaluation.
    fn real_at_target(
        &self,
        device: usize,
        state: &DeviceState,
        slice: &GlobalSlice,
        goal: &ToTarget,
    ) -> Result<(Quality, KeptIndices), String> {
        let data = &self.data[device];
        let adapter =
            job::start_adapter(&eval_job(slice), state, &self.base).map_err(|e| e.to_string())?;
        let cfg = TrainConfig {
            lr: goal.lr,
            criterion: goal.criterion,
            prune: goal.prune.clone(),
            seed: goal.seed,
            warmup_steps: (goal.recovery_steps / 10).max(1),
            ..TrainConfig::default()
        };
        let mut tuner =
            Tuner::new(&self.base, state.kept.clone(), adapter, cfg).map_err(|e| e.to_string())?;
        let n = data.train_len().max(1);
        let offset = (goal.seed % n as u64) as usize;
        // Importance only: at learning rate 0 the optimiser leaves the adapter as it is.
        for i in 0..goal.importance_batches.max(1) {
            tuner.train_micro(&data.batch(offset + i, goal.batch), 0.0, true);
        }
        tuner.prune_to(goal.target).map_err(|e| e.to_string())?;
        if goal.recovery_steps > 0 {
            let start = offset + goal.importance_batches.max(1);
            // A target at the current sparsity: no pruning events, training only.
            let now = tuner.sparsity();
            tuner
                .run_round(
                    goal.recovery_steps,
                    now,
                    |i| data.batch(start + i, goal.batch),
                    |_| {},
                )
                .map_err(|e| e.to_string())?;
        }
        let test = self.global_test.as_ref().unwrap_or(data);
        let (loss, accuracy) = test.evaluate(&tuner.model, Some(&tuner.adapter));
        let perplexity = matches!(test, LocalData::Lm(_)).then(|| loss.exp());
        Ok((
            Quality {
                loss,
                accuracy,
                perplexity,
            },
            tuner.kept.clone(),
        ))
    }
}

/// A job that only carries a global slice (for building the evaluated adapter the way a device
/// builds its starting adapter).
pub fn eval_job(slice: &GlobalSlice) -> TrainJob {
    TrainJob {
        round: protocol::RoundId(0),
        arm: Arm {
            prune_ratio: 0.0,
            rank: slice.adapter.rank,
        },
        target_sparsity: None,
        global: Some(slice.clone()),
        local_steps: 1,
        prune_every: 1,
        lr: 0.0,
        batch: 1,
        seed: 0,
        alpha: slice.adapter.alpha as f64,
        deadline: Timestamp(0),
        rank_pruning: None,
        memory: device_agent::cost::MemoryMode::KeepActivations,
    }
}
