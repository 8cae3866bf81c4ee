//! The evaluation panel: a fixed, seeded set of devices stratified by profile whose models
//! (their kept maps with the current global adapter) are evaluated every few rounds, and the
//! larger final set evaluated at the end.
//!
//! With a run target sparsity s*, comparisons are at s*: a device of a pruning strategy that
//! is evaluated before it reached s* (more than `protocol::SPARSITY_TOLERANCE` short) is
//! brought there first, on a copy, with its own importance scores (LoRA-gradient on a few
//! micro-batches of its own data) and one-shot `Tuner::prune_to`; the evaluations count how many
//! were. `prune-after-fl` devices are evaluated dense during the rounds and, in the final
//! evaluation, pruned to s* in one shot and recovered for the strategy's `recovery_steps`
//! before they are scored. Dense strategies (`hetlora`, `fedlora`) are evaluated dense.

use aggregator::strategy::TargetRoute;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{ms_to_s, Simulation, VDev};
use crate::compute::{pruned_config, Quality, ToTarget};
use crate::error::SimError;
use crate::hardware::DeviceProfile;
use crate::report::EvalRecord;

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

impl Simulation<'_> {
    /// Quality of each of `devices`' models (its kept maps) with the global adapter, brought
    /// to the run's target sparsity first where the strategy says so (`final_eval`: the
    /// evaluation at the end of the run, where `prune-after-fl` prunes).
    pub(super) fn evaluate_devices(
        &mut self,
        devices: &[usize],
        final_eval: bool,
    ) -> Result<Evaluated, SimError> {
        let global = self.coordinator.global().clone();
        let c = &self.cfg.coordinator;
        let alpha = c.lora_alpha;
        let route = c.strategy.target_route();
        let target = c.target_sparsity;
        let (batch, lr, seed) = (c.batch_size as usize, c.learning_rate as f64, c.seed);
        let dense = self.trainer.dense().clone();
        let mut out = Evaluated {
            qualities: Vec::with_capacity(devices.len()),
            brought_to_target: 0,
            min_sparsity: None,
        };
        for &i in devices {
            let session = &self.devices[i].session;
            let state = session.state().clone();
            let (criterion, prune) = (session.config().criterion, session.config().prune.clone());
            let slice = global
                .global_slice(&state.kept, global.rank, alpha)
                .map_err(|e| {
                    SimError::Coordinator(format!("cannot slice the global adapter: {e}"))
                })?;
            let sparsity = pruned_config(&dense, &state.kept).sparsity();
            let recovery = match (target, route) {
                (Some(t), TargetRoute::Paced) if sparsity < t - protocol::SPARSITY_TOLERANCE => {
                    Some(0)
                }
                (Some(t), TargetRoute::AfterTraining { recovery_steps })
                    if final_eval && sparsity < t - protocol::SPARSITY_TOLERANCE =>
                {
                    Some(recovery_steps as usize)
                }
                _ => None,
            };
            let (q, evaluated) = match (recovery, target) {
                (Some(recovery_steps), Some(t)) => {
                    let goal = ToTarget {
                        target: t,
                        importance_batches: IMPORTANCE_BATCHES,
                        recovery_steps,
                        batch,
                        lr,
                        seed: seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        criterion,
                        prune,
                    };
                    let (q, kept) = self
                        .trainer
                        .evaluate_at_target(i, &state, &slice, &goal)
                        .map_err(SimError::Model)?;
                    out.brought_to_target += 1;
                    (q, pruned_config(&dense, &kept).sparsity())
                }
                _ => {
                    let q = self
                        .trainer
                        .evaluate(i, &state, &slice)
                        .map_err(SimError::Model)?;
                    (q, sparsity)
                }
            };
            out.min_sparsity = Some(out.min_sparsity.map_or(evaluated, |m| m.min(evaluated)));
            out.qualities.push((i, q));
        }
        Ok(out)
    }

    /// The panel's mean quality after `round`.
    pub(super) fn evaluate_panel(&mut self, round: u64) -> Result<EvalRecord, SimError> {
        let panel = self.panel.clone();
        let e = self.evaluate_devices(&panel, false)?;
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
