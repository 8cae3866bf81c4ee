//! The evaluation panel: a fixed, seeded set of devices stratified by profile whose models
//! (their kept maps with the current global adapter) are evaluated every few rounds, and the
//! larger final set evaluated at the end.
//!
//! With a run target sparsity s*, comparisons are at s*: a device of a pruning strategy that
//! is evaluated before it reached s* (more than `protocol::SPARSITY_TOLERANCE` short) is
//! brought there first, on a copy, with its own importance scores (LoRA-gradient on a few
//! micro-batches of its own data) and one-shot `Tuner::prune_to`; the evaluations count how many
//! were. In the panel's evaluations during the rounds it is scored right after that step; in
//! the final evaluation it first recovers for the run's recovery budget
//! ([`crate::config::ExperimentConfig::final_recovery_steps`]: `prune-after-fl`'s
//! `recovery_steps`), and its model as it was, before any of this, is scored too.
//! `prune-after-fl` devices are evaluated dense during the rounds and, in the final evaluation,
//! pruned to s* in one shot and recovered for the same budget (their before-scores are the dense
//! models'). Dense strategies (`hetlora`, `fedlora`) are evaluated dense.

use aggregator::strategy::TargetRoute;
use protocol::KeptIndices;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{ms_to_s, Simulation, VDev};
use crate::compute::{pruned_config, EvalResult, EvalTask, Quality, ToTarget};
use crate::error::SimError;
use crate::hardware::DeviceProfile;
use crate::report::EvalRecord;
use device_agent::model::ModelConfig;

/// Micro-batches of a device's own data that score importance before it is brought to s*.
pub(super) const IMPORTANCE_BATCHES: usize = 4;

/// What an evaluation of some devices found.
pub(super) struct Evaluated {
    /// Each device's quality, in the order asked.
    pub(super) qualities: Vec<(usize, Quality)>,
    /// Devices brought to the target sparsity before they were scored.
    pub(super) brought_to_target: usize,
    /// The lowest sparsity among the evaluated models (as scored, after any pruning).
    pub(super) min_sparsity: Option<f64>,
}

/// One device's evaluation.
pub(super) struct Scored {
    /// Its model's quality as scored (after any bringing to s* and recovery).
    pub(super) quality: Quality,
    /// Whether it was brought to the target sparsity before it was scored.
    pub(super) brought: bool,
    /// In the final evaluation, where the device was brought to s*: its model's quality as it
    /// was (its own sparsity), before that; `None` otherwise.
    pub(super) before_target: Option<Quality>,
    /// The sparsity of the model as scored.
    pub(super) sparsity: f64,
    /// Where it was brought to the target sparsity: the kept maps it was scored with.
    pub(super) kept_at_target: Option<KeptIndices>,
}

/// What evaluating one device takes, decided before anything runs: its model as it is
/// (`goal` unset) or brought to s* (`goal` set), and the sparsity it is at.
pub(super) struct Planned {
    pub(super) task: EvalTask,
    pub(super) sparsity: f64,
}

impl Planned {
    /// The same device's model as it is (its score before it is brought to s*).
    pub(super) fn as_it_is(&self) -> EvalTask {
        EvalTask {
            goal: None,
            ..self.task.clone()
        }
    }

    /// Whether the device is brought to s* before it is scored.
    pub(super) fn brought(&self) -> bool {
        self.task.goal.is_some()
    }

    /// The device's score from its task's result (`before`: its score as it was, in the final
    /// evaluation of a brought device).
    pub(super) fn scored(
        &self,
        dense: &ModelConfig,
        result: &EvalResult,
        before: Option<Quality>,
    ) -> Result<Scored, SimError> {
        let (quality, kept) = result.clone().map_err(SimError::Model)?;
        Ok(match kept {
            Some(kept) if self.brought() => Scored {
                quality,
                brought: true,
                before_target: before,
                sparsity: pruned_config(dense, &kept).sparsity(),
                kept_at_target: Some(kept),
            },
            _ => Scored {
                quality,
                brought: false,
                before_target: None,
                sparsity: self.sparsity,
                kept_at_target: None,
            },
        })
    }
}

impl Simulation<'_> {
    /// Quality of each of `devices`' models (its kept maps) with the global adapter, brought
    /// to the run's target sparsity first where the strategy says so (the panel during the
    /// rounds; the final evaluation is `final_eval.rs`'s). The evaluations run side by side
    /// where the trainer can ([`crate::compute::LocalTrainer::evaluate_all`]).
    pub(super) fn evaluate_devices(&mut self, devices: &[usize]) -> Result<Evaluated, SimError> {
        let plans = devices
            .iter()
            .map(|&i| self.plan_device(i, false))
            .collect::<Result<Vec<_>, _>>()?;
        let tasks: Vec<EvalTask> = plans.iter().map(|p| p.task.clone()).collect();
        let results = self.trainer.evaluate_all(&tasks);
        let mut out = Evaluated {
            qualities: Vec::with_capacity(devices.len()),
            brought_to_target: 0,
            min_sparsity: None,
        };
        for (p, result) in plans.iter().zip(&results) {
            let e = p.scored(self.trainer.dense(), result, None)?;
            out.brought_to_target += usize::from(e.brought);
            out.min_sparsity = Some(out.min_sparsity.map_or(e.sparsity, |m| m.min(e.sparsity)));
            out.qualities.push((p.task.device, e.quality));
        }
        Ok(out)
    }

    /// What evaluating device `i` takes: its model with the global adapter, brought to the
    /// run's target sparsity first where the strategy says so (see the module docs).
    pub(super) fn plan_device(&self, i: usize, final_eval: bool) -> Result<Planned, SimError> {
        let global = self.coordinator.global();
        let c = &self.cfg.coordinator;
        let (batch, lr, seed) = (c.batch_size as usize, c.learning_rate as f64, c.seed);
        let route = c.strategy.target_route();
        let dense = self.trainer.dense();
        let session = &self.devices[i].session;
        let state = session.state().clone();
        let (criterion, prune) = (session.config().criterion, session.config().prune.clone());
        let slice = global
            .global_slice(&state.kept, global.rank, c.lora_alpha)
            .map_err(|e| SimError::Coordinator(format!("cannot slice the global adapter: {e}")))?;
        let sparsity = pruned_config(dense, &state.kept).sparsity();
        // Short of s* by more than `protocol::SPARSITY_TOLERANCE`.
        let short = c
            .target_sparsity
            .is_some_and(|t| sparsity < t - protocol::SPARSITY_TOLERANCE);
        let brought = match route {
            TargetRoute::Paced => short,
            TargetRoute::AfterTraining { .. } => short && final_eval,
            TargetRoute::Dense => false,
        };
        let goal = match (brought, c.target_sparsity) {
            (true, Some(target)) => Some(ToTarget {
                target,
                importance_batches: IMPORTANCE_BATCHES,
                // `prune-after-fl`'s own recovery is the run's budget (read from the same
                // table).
                recovery_steps: if final_eval {
                    self.cfg.final_recovery_steps()? as usize
                } else {
                    0
                },
                batch,
                lr,
                seed: seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                criterion,
                prune,
            }),
            _ => None,
        };
        Ok(Planned {
            task: EvalTask {
                device: i,
                state,
                slice,
                goal,
            },
            sparsity,
        })
    }

    /// The panel's mean quality after `round`.
    pub(super) fn evaluate_panel(&mut self, round: u64) -> Result<EvalRecord, SimError> {
        let panel = self.panel.clone();
        let e = self.evaluate_devices(&panel)?;
        let q = &e.qualities;
        let n = q.len().max(1) as f64;
        let loss = q.iter().map(|(_, x)| x.loss).sum::<f64>() / n;
        let accuracy = q.iter().map(|(_, x)| x.accuracy).sum::<f64>() / n;
        let perplexity = q
            .iter()
            .all(|(_, x)| x.perplexity.is_some())
            .then(|| q.iter().filter_map(|(_, x)| x.perplexity).sum::<f64>() / n);
        Ok(EvalRecord {
            round,
            time_s: ms_to_s(self.now.0),
            loss,
            accuracy,
            perplexity,
            devices: q.len(),
            brought_to_target: e.brought_to_target,
            min_sparsity: e.min_sparsity,
        })
    }
}

/// `n` devices (all when `n == 0` or `n >= len`), stratified by profile and seeded.
pub(super) fn choose_devices(
    devices: &[VDev],
    profiles: &[DeviceProfile],
    n: usize,
    seed: u64,
) -> Vec<usize> {
    if n == 0 || n >= devices.len() {
        return (0..devices.len()).collect();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); profiles.len()];
    for (i, d) in devices.iter().enumerate() {
        groups[d.profile].push(i);
    }
    for g in &mut groups {
        rand::seq::SliceRandom::shuffle(g.as_mut_slice(), &mut rng);
    }
    // Round-robin over groups, so every class is represented.
    let mut out = Vec::with_capacity(n);
    let mut k = 0;
    while out.len() < n {
        for g in &groups {
            if out.len() < n && k < g.len() {
                out.push(g[k]);
            }
        }
        k += 1;
    }
    out.sort_unstable();
    out
}
