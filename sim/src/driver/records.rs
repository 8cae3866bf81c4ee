//! Records and the report: one [`RoundRecord`] per closed round (every selected device's play
//! and outcome), each device's final state (sparsity, inference latency, peak memory, quality)
//! and the run's [`Summary`].

use std::collections::BTreeMap;

use aggregator::coordinator::{CoordinatorState, RoundSummary};
use protocol::{BlockKept, DeviceId};

use super::{ms_to_s, Simulation};
use crate::compute::Quality;
use crate::config::TargetMetric;
use crate::device_rounds::DeviceRound;
use crate::error::SimError;
use crate::report::{ClassSummary, DeviceFinal, Play, Report, RoundRecord, Summary};
use crate::stats;

impl Simulation<'_> {
    fn class_of(&self, i: usize) -> String {
        self.profile(i).class.clone()
    }

    /// Sparsity of device `i`'s model. It depends only on the kept counts per block (query
    /// heads, KV heads, MLP channels), so it is computed once per distinct count vector: the
    /// per-round fleet mean over 10,000 devices would otherwise rebuild a model config per
    /// device.
    fn sparsity_of(&mut self, i: usize) -> f64 {
        let d = &self.devices[i];
        if let (false, Some((_, s))) = (d.sparsity_stale, &d.sparsity_seen) {
            return *s;
        }
        let kept = &d.session.state().kept;
        let shape = |b: &BlockKept| [b.query_heads.len(), b.kv_heads.len(), b.mlp_channels.len()];
        if let Some((seen, s)) = &d.sparsity_seen {
            if seen.len() == kept.blocks.len()
                && seen.iter().zip(&kept.blocks).all(|(k, b)| *k == shape(b))
            {
                let s = *s;
                self.devices[i].sparsity_stale = false;
                return s;
            }
        }
        let key: Vec<[usize; 3]> = kept.blocks.iter().map(shape).collect();
        let s = match self.sparsity_memo.get(&key) {
            Some(&s) => s,
            None => {
                let s = self.trainer.cost_config(kept).sparsity();
                self.sparsity_memo.insert(key.clone(), s);
                s
            }
        };
        self.devices[i].sparsity_seen = Some((key, s));
        self.devices[i].sparsity_stale = false;
        s
    }

    /// A round closed: its plays, the devices' histories, a panel evaluation when due, and
    /// the round's record.
    pub(super) fn round_closed(&mut self, s: RoundSummary) -> Result<(), SimError> {
        self.last_progress = self.now;
        let round = s.round.0;
        let mut plays = Vec::new();
        let mut dropped = 0;
        let mut participants_for_trainer = Vec::new();
        for p in &s.participants {
            let Some(i) = self.index_of(p.device) else {
                continue;
            };
            // A screened-out update is left out of the aggregate, so of the surrogate's too.
            let screened = s.screened_out.contains(&p.device);
            if !screened {
                participants_for_trainer.push((i, p.reward));
            }
            plays.push(Play {
                device: p.device.0,
                class: self.class_of(i),
                prune_ratio: p.arm.prune_ratio,
                rank: p.arm.rank,
                outcome: if screened { "screened_out" } else { "accepted" }.into(),
                reward: Some(p.reward),
                sparsity: Some(p.sparsity as f64),
                compute_s: Some(ms_to_s(p.compute_ms)),
                duration_s: Some(ms_to_s(p.duration_ms)),
                peak_mem_mib: Some(p.peak_mem_bytes as f64 / (1 << 20) as f64),
                loss_pre: Some(p.loss_pre as f64),
                loss_post: Some(p.loss_post as f64),
                sparsity_prev: Some(p.sparsity_prev),
                delta_norm: Some(p.delta_norm),
                steps: Some(self.cfg.coordinator.local_steps as u64),
            });
        }
        for f in &s.failed {
            let Some(i) = self.index_of(f.device) else {
                continue;
            };
            plays.push(Play {
                device: f.device.0,
                class: self.class_of(i),
                prune_ratio: f.arm.prune_ratio,
                rank: f.arm.rank,
                outcome: f.kind.clone(),
                reward: Some(0.0),
                ..Play::empty()
            });
        }
        for &m in &s.missed {
            let Some(i) = self.index_of(m) else { continue };
            let (ratio, rank) = match self.devices[i].sent_arm {
                Some((r, a)) if r == round => (a.prune_ratio, a.rank),
                _ => (f64::NAN, 0),
            };
            let job = self.devices[i].job.clone().filter(|j| j.round == round);
            let outcome = match job.as_ref().map(|j| j.state) {
                Some("dropped") => {
                    dropped += 1;
                    "dropped"
                }
                _ => "missed",
            };
            let compute_s = job.and_then(|j| j.compute_ms).map(ms_to_s);
            plays.push(Play {
                device: m.0,
                class: self.class_of(i),
                prune_ratio: ratio,
                rank,
                outcome: outcome.into(),
                reward: Some(0.0),
                compute_s,
                ..Play::empty()
            });
        }
        // One play per device: the unstable sort gives the same order without a scratch buffer.
        plays.sort_unstable_by_key(|p| p.device);
        for p in &plays {
            if let Some(i) = self.index_of(DeviceId(p.device)) {
                self.devices[i]
                    .history
                    .push((round, p.prune_ratio, p.rank, p.outcome.clone()));
            }
        }
        self.trainer
            .round_closed(s.aggregated, &participants_for_trainer);
        let mut sparsity_sum = 0.0;
        for i in 0..self.devices.len() {
            sparsity_sum += self.sparsity_of(i);
        }
        let fleet_sparsity = sparsity_sum / self.devices.len().max(1) as f64;
        let eval = if due(round, self.cfg.eval.every_rounds) || round >= self.cfg.coordinator.rounds
        {
            Some(self.evaluate_panel(round)?)
        } else {
            None
        };
        let record = RoundRecord {
            round,
            started_s: ms_to_s(s.started_at.0),
            closed_s: ms_to_s(s.closed_at.0),
            closed_by: s.closed_by.clone(),
            aggregated: s.aggregated,
            selected: s.selected.len(),
            accepted: s.participants.len(),
            missed: s.missed.len() - dropped,
            dropped,
            failed: s.failed.len(),
            rejects: s.rejects.clone(),
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
            mean_loss_pre: s.mean_loss_pre,
            mean_loss_post: s.mean_loss_post,
            fleet_sparsity,
            plays,
            eval,
        };
        self.observer
            .round_closed(&record, self.cfg.coordinator.rounds);
        self.rounds.push(record);
        Ok(())
    }

    /// The report: the final evaluation, every device's final state and the summary.
    pub(super) fn finish(mut self, ended_by: &str) -> Result<(Report, CoordinatorState), SimError> {
        let final_eval = self.final_evaluation()?;
        let qualities = final_eval.trained;
        let prompt = self.cfg.eval.latency_prompt_tokens;
        let mut devices = Vec::with_capacity(self.devices.len());
        for i in 0..self.devices.len() {
            let held = &self.devices[i].session.state().kept;
            let cfg = self.trainer.cost_config(held);
            // The model the final evaluation scored: brought to s* where it was short of it.
            let scored = match final_eval.at_target.get(&i) {
                Some(k) => self.trainer.cost_config(k),
                None => cfg.clone(),
            };
            let history = std::mem::take(&mut self.devices[i].history);
            let p = self.profile(i);
            let d = &self.devices[i];
            devices.push(DeviceFinal {
                device: d.id.0,
                profile: p.name.clone(),
                class: p.class.clone(),
                data: d.data_label.clone(),
                power_mode: d.power_mode,
                sparsity: cfg.sparsity(),
                params: cfg.total_params() as u64,
                rounds_trained: d.rounds_trained,
                final_sparsity: scored.sparsity(),
                inference_ms: self.trainer.clock().inference_ms(
                    &scored,
                    prompt,
                    p.infer_gflops * d.power_mode,
                ),
                peak_mem_mib: d.peak_mem as f64 / (1 << 20) as f64,
                quality: final_eval.fleet.get(&i).copied(),
                quality_before_target: final_eval.before_target.get(&i).copied(),
                history,
            });
        }
        let mut summary = self.summarise(&devices, &qualities, ended_by);
        summary.evaluation = final_eval.summary;
        summary.final_brought_to_target = final_eval.brought_to_target;
        summary.final_min_sparsity = final_eval.min_sparsity;
        let config = serde_json::to_value(&self.cfg).unwrap_or(serde_json::Value::Null);
        let device_rounds = self.device_rounds();
        let mut report = Report {
            summary,
            rounds: std::mem::take(&mut self.rounds),
            devices,
            config,
            device_rounds,
        };
        report.summary.byzantine = self.byzantine_summary(&report);
        // Moved out, not copied: the run is over, and the copy was the run's peak of memory.
        Ok((report, self.coordinator.into_state()))
    }

    fn summarise(
        &self,
        devices: &[DeviceFinal],
        qualities: &BTreeMap<usize, Quality>,
        ended_by: &str,
    ) -> Summary {
        let counters = self.coordinator.counters();
        let e = &self.cfg.eval;
        let (target, reached) = match e.target_metric {
            TargetMetric::Accuracy => (
                format!("accuracy >= {}", e.target_value),
                self.rounds
                    .iter()
                    .filter_map(|r| r.eval.as_ref())
                    .find(|x| x.accuracy >= e.target_value),
            ),
            TargetMetric::Perplexity => (
                format!("perplexity <= {}", e.target_value),
                self.rounds
                    .iter()
                    .filter_map(|r| r.eval.as_ref())
                    .find(|x| x.perplexity.is_some_and(|p| p <= e.target_value)),
            ),
        };
        let n = devices.len().max(1) as f64;
        let trained: Vec<&DeviceFinal> = devices.iter().filter(|d| d.rounds_trained > 0).collect();
        let qn = qualities.len();
        let mean_q = |f: &dyn Fn(&Quality) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = qualities.values().filter_map(f).collect();
            (!v.is_empty() && v.len() == qn).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        // Sparsity and latency of the final models: those the final evaluation scored (every
        // device unless `eval.final_devices` caps it; all of them if none was scored).
        let scored = |d: &&DeviceFinal| d.quality.is_some() || qn == 0;
        let mut by_class: BTreeMap<String, ClassSummary> = BTreeMap::new();
        for d in devices {
            let c = by_class.entry(d.class.clone()).or_default();
            c.devices += 1;
            c.max_peak_mem_mib = c.max_peak_mem_mib.max(d.peak_mem_mib);
        }
        for d in devices.iter().filter(scored) {
            let c = by_class.entry(d.class.clone()).or_default();
            c.final_models += 1;
            c.mean_sparsity += d.final_sparsity;
            c.mean_inference_ms += d.inference_ms;
        }
        for r in &self.rounds {
            for p in &r.plays {
                let c = by_class.entry(p.class.clone()).or_default();
                c.mean_ratio_played += p.prune_ratio;
                c.mean_rank_played += p.rank as f64;
                c.plays += 1;
            }
        }
        for c in by_class.values_mut() {
            let k = c.final_models.max(1) as f64;
            c.mean_sparsity /= k;
            c.mean_inference_ms /= k;
            let p = c.plays.max(1) as f64;
            c.mean_ratio_played /= p;
            c.mean_rank_played /= p;
        }
        Summary {
            strategy: self.cfg.strategy.clone(),
            mode: self.trainer.mode().to_string(),
            precision: self.trainer.precision().to_string(),
            devices: devices.len(),
            rounds_closed: self.rounds.len() as u64,
            rounds_aggregated: self.rounds.iter().filter(|r| r.aggregated).count() as u64,
            virtual_s: ms_to_s(self.now.0),
            target,
            evaluation: Default::default(),
            time_to_target_s: reached.map(|x| x.time_s),
            final_accuracy: mean_q(&|q| Some(q.accuracy)),
            final_loss: mean_q(&|q| Some(q.loss)),
            final_perplexity: mean_q(&|q| q.perplexity),
            final_devices_evaluated: qn,
            final_brought_to_target: 0,
            final_min_sparsity: None,
            last_panel_accuracy: self
                .rounds
                .iter()
                .rev()
                .find_map(|r| r.eval.as_ref())
                .map(|x| x.accuracy),
            mean_sparsity: devices.iter().map(|d| d.sparsity).sum::<f64>() / n,
            mean_sparsity_trained: if trained.is_empty() {
                0.0
            } else {
                trained.iter().map(|d| d.sparsity).sum::<f64>() / trained.len() as f64
            },
            devices_trained: trained.len(),
            mean_inference_ms: stats::mean(
                &devices
                    .iter()
                    .filter(scored)
                    .map(|d| d.inference_ms)
                    .collect::<Vec<_>>(),
            )
            .unwrap_or(0.0),
            max_peak_mem_mib: devices.iter().map(|d| d.peak_mem_mib).fold(0.0, f64::max),
            bytes_up: self.bytes_up_total,
            bytes_down: self.bytes_down_total,
            rejects: counters.total_rejects(),
            missed: self.rounds.iter().map(|r| r.missed as u64).sum(),
            dropped: self.dropped_total,
            out_of_memory: counters.out_of_memory,
            jobs_trained: self.jobs_trained,
            by_class,
            ended_by: ended_by.to_string(),
            surrogate_params: self.trainer.params_note(),
            clock: (!self.cfg.clock.is_default()).then(|| self.trainer.clock().source.clone()),
            byzantine: None,
        }
    }

    /// The trainer's recorded device-rounds, with what only the driver knows filled in.
    fn device_rounds(&mut self) -> Vec<DeviceRound> {
        let mut out = self.trainer.take_device_rounds();
        let workload = serde_json::to_value(self.cfg.workload.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        for r in &mut out {
            r.workload = workload.clone();
            r.seed = self.cfg.seed;
            r.strategy = self.cfg.strategy.clone();
            if let Some(i) = usize::try_from(r.device)
                .ok()
                .filter(|&i| i < self.devices.len())
            {
                r.class = self.class_of(i);
            }
        }
        out
    }
}

/// Whether `round` is a multiple of `every` (`u64::is_multiple_of` needs Rust 1.87; the
/// workspace supports 1.85).
#[allow(clippy::manual_is_multiple_of)]
fn due(round: u64, every: u64) -> bool {
    every > 0 && round % every == 0
}
