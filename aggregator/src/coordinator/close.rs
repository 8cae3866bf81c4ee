//! Round close: at the deadline, when every selected device answered, or at the target count.
//! With quorum the round's aggregation replaces the global adapter; then each selected device's
//! bandit learns its reward, device records and counters are updated, and the round's summary
//! is emitted after a `Checkpoint` command (and `Finished` after the last round).

use std::collections::BTreeMap;

use bandit::{shape_rewards, BanditError, Policy, RoundStats};
use protocol::{Bye, ByeReason, DeviceId, Message, RoundId, Timestamp, UNKNOWN_DEVICE_CLASS};

use super::config::BanditScope;
use super::round::{OpenRound, Outcome, Participant};
use super::summary::{Assignment, FailedSummary, ParticipantSummary, RoundSummary};
use super::{Command, Coordinator};
use crate::aggregate::{Aggregation, GaugeBounds};

impl Coordinator {
    /// [`BanditScope::Class`]: every device record of a class observes the round's rewards
    /// that the other devices of its class earned (`shared`: device, class, arm, reward, in
    /// device order), after its own. An arm the receiving bandit cannot take (outside its
    /// space) is skipped and counted like any bandit error.
    fn share_rewards(&mut self, round: RoundId, shared: &[(DeviceId, String, protocol::Arm, f64)]) {
        if shared.is_empty() {
            return;
        }
        let ids: Vec<DeviceId> = self.devices.keys().copied().collect();
        for id in ids {
            let mut results = Vec::new();
            if let Some(record) = self.record_mut(id) {
                let class = record.capabilities.class().to_string();
                let ctx = bandit::DeviceContext {
                    device_id: id.0,
                    round: round.0,
                    ram_bytes: Some(record.capabilities.ram_bytes),
                    deadline_ms: None,
                };
                for (from, c, arm, reward) in shared {
                    if *from != id && *c == class {
                        results.push(record.bandit.observe(&ctx, *arm, *reward));
                    }
                }
            }
            for result in results {
                self.note_bandit_error(id, result);
            }
        }
    }

    /// Closes the open round early when `close_at_target` and enough updates were accepted,
    /// or when no selected device that is still connected has yet to answer.
    pub(super) fn maybe_close_early(&mut self, now: Timestamp, out: &mut Vec<Command>) {
        let Some(open) = &self.open else { return };
        if self.config.close_at_target && open.accepted() >= self.config.devices_per_round {
            return self.close_round(now, "target_reached", out);
        }
        let waiting = open.participants.iter().any(|(id, p)| {
            matches!(p.outcome, Outcome::Pending)
                && self.devices.get(id).is_some_and(|e| e.connected)
        });
        if !waiting {
            self.close_round(now, "all_answered", out);
        }
    }

    /// Closes the open round (`closed_by` says why, for the summary): aggregates it with
    /// quorum, lets every selected device's bandit learn, updates the device records and
    /// emits `Checkpoint` then `RoundClosed` (and `Finished` after the last round).
    pub(super) fn close_round(&mut self, now: Timestamp, closed_by: &str, out: &mut Vec<Command>) {
        let Some(open) = self.open.take() else { return };
        self.closed_now = true;
        self.last_closed = open.id;
        let accepted = open.accepted();
        let method = open.aggregation.config().method.name().to_string();
        let OpenRound {
            id,
            started_at,
            participants,
            mut aggregation,
            quorum,
            rejects,
            samples_clipped,
            ..
        } = open;
        // Norm screening decides before the quorum: a screened-out update counts no more than a
        // refused one.
        let screened_out: Vec<DeviceId> =
            aggregation.screen().into_iter().map(|s| s.device).collect();
        let quorum_met = accepted.saturating_sub(screened_out.len()) >= quorum;
        self.counters.updates_screened_out += screened_out.len() as u64;
        if !screened_out.is_empty() {
            tracing::warn!(round = %id, devices = ?screened_out, "updates screened out by their delta norm");
        }
        let merged = if quorum_met {
            self.merge_round(id, aggregation)
        } else {
            Merge::Failed
        };
        let aggregated = matches!(merged, Merge::Replaced { .. });
        if aggregated {
            self.counters.rounds_aggregated += 1;
        } else {
            self.counters.rounds_abandoned += 1;
        }
        let rewards = self.round_rewards(id, quorum_met, &participants, &screened_out);
        let assigned = participants
            .iter()
            .map(|(device, p)| Assignment {
                device: *device,
                device_class: self
                    .device(*device)
                    .map_or(UNKNOWN_DEVICE_CLASS, |r| r.capabilities.class())
                    .to_string(),
                arm: p.arm,
            })
            .collect();

        let mut summary = RoundSummary {
            round: id,
            strategy: self.strategy.name().to_string(),
            started_at,
            closed_at: now,
            selected: participants.keys().copied().collect(),
            assigned,
            participants: Vec::new(),
            missed: Vec::new(),
            failed: Vec::new(),
            rejects,
            aggregation: method,
            quorum,
            quorum_met,
            aggregated,
            non_finite_aggregate: merged == Merge::NonFinite,
            gauge: match merged {
                Merge::Replaced { gauge } => gauge,
                _ => GaugeBounds::default(),
            },
            samples_clipped,
            screened_out: screened_out.clone(),
            closed_by: closed_by.to_string(),
            bytes_up: 0,
            bytes_down: 0,
            mean_loss_pre: None,
            mean_loss_post: None,
        };
        let (mut loss_pre, mut loss_post, mut weight) = (0.0, 0.0, 0.0);
        let self_prunes = self.strategy.rank_pruning().is_some();
        let shared: Vec<(DeviceId, String, protocol::Arm, f64)> =
            if self.config.bandit_scope == BanditScope::Class {
                participants
                    .iter()
                    .zip(&rewards)
                    .filter_map(|((device, p), r)| {
                        let class = self.device(*device)?.capabilities.class().to_string();
                        Some((*device, class, p.arm, (*r)?))
                    })
                    .filter(|(_, class, _, _)| class != UNKNOWN_DEVICE_CLASS)
                    .collect()
            } else {
                Vec::new()
            };
        for ((device, p), reward) in participants.into_iter().zip(rewards) {
            let mut results: Vec<Result<(), BanditError>> = Vec::new();
            // The arm as sent: the bandit's, at the (possibly self-pruning-capped) rank sent.
            let sent = protocol::Arm {
                rank: p.rank,
                ..p.arm
            };
            let Some(record) = self.record_mut(device) else {
                continue;
            };
            if let Some(r) = reward {
                results.push(record.bandit.observe(&p.ctx, p.arm, r));
            }
            match p.outcome {
                Outcome::Completed(c) => {
                    results.push(
                        record
                            .bandit
                            .record(p.arm, c.stats.peak_mem_bytes, c.duration_ms, &p.ctx)
                            .map(|_| ()),
                    );
                    record.kept = Some(c.kept);
                    // Only a drop below the rank sent is self-pruning; a device that kept its
                    // rank keeps its limit (ranks only ever shrink by self-pruning).
                    if self_prunes && c.rank < p.rank {
                        record.rank_limit = Some(c.rank);
                    }
                    record.sparsity = c.stats.sparsity as f64;
                    record.rounds_completed += 1;
                    // The round's mean losses are those of the updates it aggregated.
                    if !screened_out.contains(&device) {
                        let w = c.stats.samples.max(1) as f64;
                        loss_pre += w * c.stats.loss_pre as f64;
                        loss_post += w * c.stats.loss_post as f64;
                        weight += w;
                    }
                    // Counted by the connection (`bytes_up`) and reported by the device
                    // (`bytes_down`, clipped to twice the largest update accepted: a download
                    // is a slice of that size): saturating, so no report can wrap or panic.
                    let reported_down = c
                        .stats
                        .bytes_down
                        .min(self.config.max_update_bytes.saturating_mul(2));
                    summary.bytes_up = summary.bytes_up.saturating_add(c.bytes_up);
                    summary.bytes_down = summary.bytes_down.saturating_add(reported_down);
                    summary.participants.push(ParticipantSummary {
                        device,
                        arm: sent,
                        loss_pre: c.stats.loss_pre,
                        loss_post: c.stats.loss_post,
                        sparsity_prev: p.sparsity_prev,
                        sparsity: c.stats.sparsity,
                        reward: reward.unwrap_or(0.0),
                        compute_ms: c.stats.compute_ms,
                        duration_ms: c.duration_ms,
                        bytes_up: c.bytes_up,
                        bytes_down: reported_down,
                        peak_mem_bytes: c.stats.peak_mem_bytes,
                        samples: c.stats.samples,
                        delta_norm: c.delta_norm,
                    });
                }
                Outcome::Failed { kind, reason } => {
                    record.rounds_failed += 1;
                    summary.failed.push(FailedSummary {
                        device,
                        arm: sent,
                        kind,
                        reason,
                    });
                }
                Outcome::Pending => {
                    record.rounds_missed += 1;
                    self.counters.missed += 1;
                    summary.missed.push(device);
                }
            }
            for result in results {
                self.note_bandit_error(device, result);
            }
        }
        self.share_rewards(id, &shared);
        if weight > 0.0 {
            summary.mean_loss_pre = Some(loss_pre / weight);
            summary.mean_loss_post = Some(loss_post / weight);
        }
        tracing::info!(
            round = %id,
            accepted,
            quorum,
            aggregated,
            closed_by,
            "round closed"
        );
        out.push(Command::Checkpoint);
        out.push(Command::RoundClosed(Box::new(summary)));
        if self.last_closed.0 >= self.config.rounds {
            self.finish(out);
        } else {
            self.gate = Some(now.plus_ms(self.config.round_interval_ms));
        }
    }

    /// Finishes the round's aggregation into the next global adapter. The global adapter is
    /// unchanged when the aggregation fails or its result holds a non-finite value (so a
    /// non-finite global is never checkpointed).
    fn merge_round(&mut self, id: RoundId, aggregation: Aggregation) -> Merge {
        match aggregation.finish_counting_bounds(Some(&self.global)) {
            Ok((global, gauge)) if global.is_finite() => {
                self.global = global;
                // A repaired scalar gauge changes nothing the update meant (and the simulator's
                // surrogate, whose factors do not start from their slices, trips it): info; a
                // layer kept at its previous value is lost progress: warn.
                if gauge.layers_bounded > 0 {
                    tracing::warn!(round = %id, layers_bounded = gauge.layers_bounded, layers_regauged = gauge.layers_regauged, "layers whose averaged step was out of bounds kept their previous value");
                } else if gauge.layers_regauged > 0 {
                    tracing::info!(round = %id, layers_regauged = gauge.layers_regauged, "update layers folded with their scalar gauge repaired");
                }
                Merge::Replaced { gauge }
            }
            Ok(_) => {
                self.counters.non_finite_aggregates += 1;
                tracing::error!(round = %id, "the aggregate holds non-finite values; the global adapter is unchanged");
                Merge::NonFinite
            }
            Err(e) => {
                self.counters.aggregation_errors += 1;
                tracing::error!(round = %id, error = %e, "aggregation failed; the global adapter is unchanged");
                Merge::Failed
            }
        }
    }

    /// Each participant's bandit reward, in participant order: with quorum every selected
    /// device gets its shaped reward (`bandit::shape_rewards` of its round statistics);
    /// without it only the devices that failed or missed learn (reward 0), and `None` means
    /// "learns nothing this round".
    fn round_rewards(
        &mut self,
        id: RoundId,
        quorum_met: bool,
        participants: &BTreeMap<DeviceId, Participant>,
        screened_out: &[DeviceId],
    ) -> Vec<Option<f64>> {
        if !quorum_met {
            return zero_unless_completed(participants);
        }
        let target = self.config.reward_target();
        // A screened-out update is a failed round to the bandit: reward 0, and its norm and
        // losses stay out of the round's reward normalisation.
        let stats: Vec<RoundStats> = participants
            .iter()
            .map(|(device, p)| {
                let mut s = round_stats(p, target);
                s.failed |= screened_out.contains(device);
                s
            })
            .collect();
        match shape_rewards(&stats, &self.config.reward) {
            Ok(r) => r.into_iter().map(Some).collect(),
            Err(e) => {
                self.counters.bandit_errors += 1;
                tracing::warn!(round = %id, error = %e, "cannot shape rewards");
                zero_unless_completed(participants)
            }
        }
    }

    /// Marks the run finished and says goodbye to every connected device.
    fn finish(&mut self, out: &mut Vec<Command>) {
        self.finished = true;
        self.gate = None;
        for (device, entry) in &self.devices {
            if entry.connected {
                out.push(Command::Send {
                    device: *device,
                    msg: Message::Bye(Bye {
                        reason: ByeReason::Finished,
                    }),
                });
            }
        }
        tracing::info!(rounds = self.last_closed.0, "training finished");
        out.push(Command::Finished);
    }
}

/// How a round's aggregate ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Merge {
    /// It replaced the global adapter (what the averaging methods' gauge defences did).
    Replaced { gauge: GaugeBounds },
    /// It held non-finite values and was dropped.
    NonFinite,
    /// No quorum, or the aggregation failed.
    Failed,
}

/// What the reward shaping sees of a participant's round (failed and missed ones included);
/// progress is measured toward the run's `target` sparsity, not the arm's own ratio.
fn round_stats(p: &Participant, target: f64) -> RoundStats {
    let mut s = RoundStats {
        loss_pre: 0.0,
        loss_post: 0.0,
        sparsity_prev: p.sparsity_prev,
        sparsity_now: p.sparsity_prev,
        sparsity_target: target,
        update_norm: 0.0,
        duration_ms: 0,
        failed: false,
        missed_deadline: false,
    };
    match &p.outcome {
        Outcome::Completed(c) => {
            s.loss_pre = c.stats.loss_pre as f64;
            s.loss_post = c.stats.loss_post as f64;
            s.sparsity_now = c.stats.sparsity as f64;
            s.update_norm = c.delta_norm;
            s.duration_ms = c.duration_ms;
        }
        Outcome::Failed { .. } => s.failed = true,
        Outcome::Pending => s.missed_deadline = true,
    }
    s
}

/// Reward 0 for failed and missed participants, nothing for those that completed.
fn zero_unless_completed(participants: &BTreeMap<DeviceId, Participant>) -> Vec<Option<f64>> {
    participants
        .values()
        .map(|p| match p.outcome {
            Outcome::Completed(_) => None,
            _ => Some(0.0),
        })
        .collect()
}
