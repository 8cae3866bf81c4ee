//! The final evaluation: every device that trained (or a seeded sample of them when
//! `eval.final_devices` caps it), and separately the whole fleet (the same cap applies to the
//! devices that never trained, sampled with the run's evaluation stream), each device's model
//! being its kept maps with the global adapter; plus the effective sample size and standard
//! errors.
//!
//! In real mode with a global held-out set, a device's evaluated model and its test items are a
//! function of its kept maps and the global adapter only, so devices with equal kept maps
//! (every device that never pruned, e.g. all of a dense strategy's fleet) are evaluated once
//! and share the result: the fleet evaluation costs one evaluation per distinct model, not per
//! device. (Without a global set, or in surrogate mode, each device is evaluated itself.) A
//! device that is brought to the target sparsity first (`panel.rs`) is pruned with its own
//! importance scores and recovers on its own data, so its result is its own and is never
//! shared; whether a device is brought depends only on its kept maps' sparsity, so a shared
//! result is never one that would have been brought. Its score as it was before it was brought
//! (its kept maps with the global adapter) is shared like any other: devices that never trained
//! cost one such score in all.

use std::collections::BTreeMap;

use aggregator::coordinator::streams::{label, Stream};
use protocol::KeptIndices;
use rand::seq::SliceRandom;

use super::panel::{Planned, Scored};
use super::Simulation;
use crate::compute::{EvalTask, Quality};
use crate::error::SimError;
use crate::local_data::WorkloadKind;
use crate::report::EvalSummary;
use crate::stats;

/// Devices the final evaluation plans and runs together: enough to keep every evaluation
/// worker busy, few enough that the fleet's planned tasks are not all held at once (at 1,200
/// devices of the real model's shapes that was 160 MiB in the 10,000-device preset).
const EVAL_BATCH: usize = 64;

/// What the final evaluation found.
pub(super) struct FinalEvaluation {
    /// Qualities of the evaluated devices that trained.
    pub(super) trained: BTreeMap<usize, Quality>,
    /// Qualities of every device the fleet evaluation covers (the trained ones above and every
    /// device that never trained).
    pub(super) fleet: BTreeMap<usize, Quality>,
    pub(super) summary: EvalSummary,
    /// Devices of the fleet evaluation brought to the target sparsity before scoring.
    pub(super) brought_to_target: usize,
    /// Their qualities as they were before they were brought (their own sparsity).
    pub(super) before_target: BTreeMap<usize, Quality>,
    /// Their kept maps as scored (at the target sparsity).
    pub(super) at_target: BTreeMap<usize, KeptIndices>,
    /// The lowest sparsity among the fleet's evaluated models (as scored).
    pub(super) min_sparsity: Option<f64>,
}

/// What [`Simulation::evaluate_distinct`] shares between devices and counts.
#[derive(Default)]
struct Memo {
    /// Results of evaluations that depend on the kept maps only: the models as they are.
    shared: Vec<(KeptIndices, Quality, f64)>,
    /// Scores of brought devices' models as they were, by kept maps.
    before: Vec<(KeptIndices, Quality)>,
    /// Evaluations run.
    evaluations: usize,
    brought_to_target: usize,
    min_sparsity: Option<f64>,
}

/// Where a device's score in [`Simulation::evaluate_distinct`] comes from.
enum Source {
    /// An earlier evaluation of the same kept maps (`Memo::shared`): quality and sparsity.
    Known(Quality, f64),
    /// The task of an earlier device of the same call with the same kept maps, and sparsity.
    SameAs(usize, f64),
    /// Its own task and, for a device brought to s*, where its score before that comes from.
    Own(Box<Planned>, usize, Option<Before>),
}

/// Where a brought device's score before it was brought comes from.
enum Before {
    /// An earlier call's (`Memo::before`).
    Known(Quality),
    /// A task of this call, and whether this device is the one that asked for it.
    Task(usize, bool),
}

/// The score of a model scored as it is.
fn unbrought(quality: Quality, sparsity: f64) -> Scored {
    Scored {
        quality,
        brought: false,
        before_target: None,
        sparsity,
        kept_at_target: None,
    }
}

fn mean_of(q: &BTreeMap<usize, Quality>, f: impl Fn(&Quality) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = q.values().filter_map(f).collect();
    (v.len() == q.len()).then(|| stats::mean(&v)).flatten()
}

impl Simulation<'_> {
    /// Items (classification) or tokens (LM) one evaluation scores, and whether every model
    /// is scored on the same ones (a global held-out set). Shared items count once in the
    /// effective sample size; tokens of one window are correlated, so for LM workloads this
    /// is an upper bound.
    fn eval_sample(&self) -> (usize, bool) {
        let w = &self.cfg.workload;
        let per_item = match w.kind {
            WorkloadKind::Spam => 1,
            _ => w.seq_len.max(1),
        };
        if w.global_eval_items > 0 && self.trainer.mode() == "real" {
            (w.global_eval_items * per_item, true)
        } else {
            (w.eval_items * per_item, false)
        }
    }

    /// Evaluate each of `devices`, once per distinct kept maps when `shared` (every model is
    /// scored on the same global set, so equal kept maps mean equal results). What to run is
    /// decided first, in device order, then it all runs at once (side by side where the
    /// trainer can), and the scores are put together in device order.
    fn evaluate_distinct(
        &mut self,
        devices: &[usize],
        shared: bool,
        memo: &mut Memo,
    ) -> Result<BTreeMap<usize, Scored>, SimError> {
        let mut tasks: Vec<EvalTask> = Vec::new();
        // Tasks of this call whose results later devices with the same kept maps share: a
        // model as it is (with its sparsity), and a brought model's score before it was
        // brought. Without `shared` nothing is looked up, so no kept maps are kept either (a
        // model's kept maps are the largest part of its task: about 100 KiB for the real one).
        let mut pending_shared: Vec<(KeptIndices, usize, f64)> = Vec::new();
        let mut pending_before: Vec<(KeptIndices, usize)> = Vec::new();
        let mut plan: Vec<(usize, Option<KeptIndices>, Source)> = Vec::with_capacity(devices.len());
        for &i in devices {
            let kept = shared.then(|| self.devices[i].session.state().kept.clone());
            let known = kept
                .as_ref()
                .and_then(|kept| memo.shared.iter().find(|(k, _, _)| k == kept));
            let pending = kept
                .as_ref()
                .and_then(|kept| pending_shared.iter().find(|(k, _, _)| k == kept));
            let source = match (known, pending) {
                (Some((_, q, s)), _) => Source::Known(*q, *s),
                (None, Some((_, t, s))) => Source::SameAs(*t, *s),
                (None, None) => {
                    let p = self.plan_device(i, true)?;
                    memo.evaluations += 1;
                    let before = if p.brought() {
                        memo.brought_to_target += 1;
                        let known = kept
                            .as_ref()
                            .and_then(|kept| memo.before.iter().find(|(k, _)| k == kept));
                        let pending = kept
                            .as_ref()
                            .and_then(|kept| pending_before.iter().find(|(k, _)| k == kept));
                        Some(match (known, pending) {
                            (Some((_, q)), _) => Before::Known(*q),
                            (None, Some((_, t))) => Before::Task(*t, false),
                            (None, None) => {
                                tasks.push(p.as_it_is());
                                if let Some(kept) = &kept {
                                    pending_before.push((kept.clone(), tasks.len() - 1));
                                }
                                Before::Task(tasks.len() - 1, true)
                            }
                        })
                    } else {
                        if let Some(kept) = &kept {
                            pending_shared.push((kept.clone(), tasks.len(), p.sparsity));
                        }
                        None
                    };
                    tasks.push(p.task.clone());
                    Source::Own(Box::new(p), tasks.len() - 1, before)
                }
            };
            plan.push((i, kept, source));
        }
        let results = self.trainer.evaluate_all(&tasks);
        let quality = |t: usize| results[t].clone().map(|(q, _)| q).map_err(SimError::Model);
        let mut out = BTreeMap::new();
        for (i, kept, source) in plan {
            let e = match source {
                Source::Known(q, s) => unbrought(q, s),
                Source::SameAs(t, s) => unbrought(quality(t)?, s),
                Source::Own(p, t, before) => {
                    let before_q = match before {
                        None => None,
                        Some(Before::Known(q)) => Some(q),
                        Some(Before::Task(b, first)) => {
                            let q = quality(b)?;
                            if let (true, Some(kept)) = (first, &kept) {
                                memo.before.push((kept.clone(), q));
                            }
                            Some(q)
                        }
                    };
                    let e = p.scored(self.trainer.dense(), &results[t], before_q)?;
                    if let (false, Some(kept)) = (e.brought, kept) {
                        memo.shared.push((kept, e.quality, e.sparsity));
                    }
                    e
                }
            };
            memo.min_sparsity = Some(memo.min_sparsity.map_or(e.sparsity, |m| m.min(e.sparsity)));
            out.insert(i, e);
        }
        Ok(out)
    }

    /// The final evaluation (see the module docs).
    pub(super) fn final_evaluation(&mut self) -> Result<FinalEvaluation, SimError> {
        let n = self.devices.len();
        let mut trained: Vec<usize> = (0..n)
            .filter(|&i| self.devices[i].rounds_trained > 0)
            .collect();
        let cap = self.cfg.eval.final_devices;
        if cap > 0 && trained.len() > cap {
            let mut rng = Stream::new(self.cfg.seed, label::EVALUATION).rng_for(1);
            trained.shuffle(&mut rng);
            trained.truncate(cap);
            trained.sort_unstable();
        }
        let mut untrained: Vec<usize> = (0..n)
            .filter(|&i| self.devices[i].rounds_trained == 0)
            .collect();
        // The same cap for the devices that never trained: a device short of s* is pruned with
        // its own importance before it is scored, so each costs a whole evaluation; with a cap
        // the fleet figure is the mean over a seeded sample of them plus the trained set.
        if cap > 0 && untrained.len() > cap {
            let mut rng = Stream::new(self.cfg.seed, label::EVALUATION).rng_for(2);
            untrained.shuffle(&mut rng);
            untrained.truncate(cap);
            untrained.sort_unstable();
        }
        let (items, shared) = self.eval_sample();
        let mut memo = Memo::default();
        // The trained devices first, then the rest, so the rest share what the trained ones
        // computed; in batches of `EVAL_BATCH` devices, each batch's evaluations side by side,
        // so that at most that many tasks (each with its device's state and global slice) are
        // held at once. What a batch computes reaches the next through `memo`, so the result
        // is the same as one batch's.
        let all: Vec<usize> = trained.iter().chain(&untrained).copied().collect();
        let mut scored = BTreeMap::new();
        for batch in all.chunks(EVAL_BATCH) {
            scored.append(&mut self.evaluate_distinct(batch, shared, &mut memo)?);
        }
        let trained_q: BTreeMap<usize, Quality> =
            trained.iter().map(|i| (*i, scored[i].quality)).collect();
        let fleet: BTreeMap<usize, Quality> = scored.iter().map(|(&i, e)| (i, e.quality)).collect();
        let at_target: BTreeMap<usize, KeptIndices> = scored
            .iter_mut()
            .filter_map(|(&i, e)| e.kept_at_target.take().map(|k| (i, k)))
            .collect();
        let before_target: BTreeMap<usize, Quality> = scored
            .iter()
            .filter_map(|(&i, e)| e.before_target.map(|q| (i, q)))
            .collect();
        // The trained devices' models as they were: before any was brought to s*.
        let as_trained: BTreeMap<usize, Quality> = trained_q
            .iter()
            .map(|(i, q)| (*i, before_target.get(i).copied().unwrap_or(*q)))
            .collect();
        // Shared items count once; per-device held-out sets add up.
        let n_eff = |k: usize| if shared { items } else { items * k };
        let trained_accuracy = mean_of(&trained_q, |q| Some(q.accuracy));
        let fleet_accuracy = mean_of(&fleet, |q| Some(q.accuracy));
        let summary = EvalSummary {
            trained_evaluated: trained_q.len(),
            fleet_evaluated: fleet.len(),
            distinct_models: memo.evaluations,
            items_per_evaluation: items,
            shared_items: shared,
            trained_accuracy_se: trained_accuracy
                .and_then(|p| stats::accuracy_se(p, n_eff(trained_q.len()))),
            fleet_accuracy,
            fleet_accuracy_se: fleet_accuracy
                .and_then(|p| stats::accuracy_se(p, n_eff(fleet.len()))),
            fleet_loss: mean_of(&fleet, |q| Some(q.loss)),
            fleet_perplexity: mean_of(&fleet, |q| q.perplexity),
            recovery_steps: self.cfg.final_recovery_steps()?,
            trained_accuracy_before_target: mean_of(&as_trained, |q| Some(q.accuracy)),
            trained_brought_to_target: trained_q
                .keys()
                .filter(|i| before_target.contains_key(i))
                .count(),
        };
        Ok(FinalEvaluation {
            trained: trained_q,
            fleet,
            summary,
            brought_to_target: memo.brought_to_target,
            before_target,
            at_target,
            min_sparsity: memo.min_sparsity,
        })
    }
}
