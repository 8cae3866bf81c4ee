//! Selection: the start of a round. Once enough joined devices are idle, a seeded sample of
//! them (with over-selection) is chosen, each one's bandit picks its arm, and each is sent its
//! `RoundConfig` with its slice of the global adapter.
//!
//! The sample is the `k` idle devices with the smallest keys of the round, each key read from
//! the `selection` stream at (round, device): a uniform sample without replacement that reads
//! no sequential generator. Runs of different strategies on one seed therefore select the same
//! devices whenever the same devices are idle, and a device idle in one run but not in the
//! other changes only its own place in the sample. Local-round seeds are read the same way
//! from the `training` stream; only the bandits draw from the sequential `policy` stream.

use std::collections::BTreeMap;

use bandit::{BanditError, DeviceContext, FeasibleRegion};
use protocol::{
    Arm, DeviceId, KeptIndices, Message, RoundConfig, RoundId, RoundOptions, Timestamp,
};

use super::round::{OpenRound, Outcome, Participant};
use super::{Command, Coordinator, DeviceEntry};
use crate::aggregate::{AggregateError, Aggregation};

impl Coordinator {
    /// The round configuration of a participant with `deadline_ms` left.
    pub(super) fn round_config(
        &self,
        device: DeviceId,
        round: RoundId,
        participant: &Participant,
        deadline_ms: u64,
    ) -> Result<RoundConfig, AggregateError> {
        let full;
        let kept = match self.device(device).and_then(|r| r.kept.as_ref()) {
            Some(k) => k,
            None => {
                full = KeptIndices::full(&self.dims);
                &full
            }
        };
        let mut slice = self
            .global
            .global_slice(kept, participant.rank, self.config.lora_alpha)?;
        if self.config.f16_downloads {
            slice.adapter = slice.adapter.to_f16();
        }
        Ok(RoundConfig {
            round,
            arm: Arm {
                rank: participant.rank,
                ..participant.arm
            },
            target_sparsity: self.config.target_sparsity,
            global: Some(slice),
            deadline_ms,
            local_steps: self.config.local_steps,
            prune_interval_steps: self.config.prune_interval_steps,
            learning_rate: self.config.learning_rate,
            batch_size: self.config.batch_size,
            seed: participant.seed,
            options: RoundOptions {
                rank_pruning: self.strategy.rank_pruning(),
            },
        })
    }

    /// The idle devices keyed by their selection value for round `round`, in the kept buffer
    /// (taken out of `self`; the caller puts it back).
    fn pairs_scratch(&mut self, round: u64) -> Vec<(u64, DeviceId)> {
        let mut keys = std::mem::take(&mut self.selection_keys);
        keys.clear();
        let mut reader = self.selection.pairs(round);
        keys.extend(
            self.devices
                .iter()
                .filter(|(_, e)| is_idle(e))
                .map(|(id, _)| (reader.at(id.0), *id)),
        );
        keys
    }

    /// With an exploration budget, the positions (in the round's sorted picks) of the devices
    /// that play their policy's exploring choice, drawn with the policy generator; `None`
    /// without a budget (every device explores as its policy does).
    fn explorers(&mut self, picks: usize) -> Option<Vec<usize>> {
        let budget = self.config.explore_per_round?;
        if budget >= picks {
            return Some((0..picks).collect());
        }
        Some(rand::seq::index::sample(&mut self.policy_rng, picks, budget).into_vec())
    }

    /// Starts a round when none is open, the interval since the last close passed and enough
    /// joined devices are idle: samples them with the seeded generator, asks each one's bandit
    /// (through the strategy) for its arm, and sends each its `RoundConfig`.
    pub(super) fn try_start_round(&mut self, now: Timestamp, out: &mut Vec<Command>) {
        if self.closed_now || self.open.is_some() || self.finished {
            return;
        }
        if let Some(gate) = self.gate {
            if now < gate {
                return;
            }
            self.gate = None;
        }
        // Called on every message while no round is open (every join of a 10,000-device fleet
        // coming up): fewer known devices than the minimum need no scan; else count, stopping
        // at the minimum, before collecting anything.
        let min = self.config.min_devices_to_start();
        if self.devices.len() < min
            || self
                .devices
                .values()
                .filter(|e| is_idle(e))
                .take(min)
                .count()
                < min
        {
            return;
        }
        // Every idle device keyed by its selection value this round; the `k` smallest keys are
        // picked. The key buffer is kept across rounds (a 10,000-device fleet would allocate
        // and fault in 160 KB per round start) and only the picks are ordered.
        let next = self.round.next().0;
        let mut keys = self.pairs_scratch(next);
        let k = self.config.selection_size().min(keys.len());
        if k > 0 && k < keys.len() {
            keys.select_nth_unstable(k - 1);
        }
        let mut picks: Vec<DeviceId> = keys[..k].iter().map(|&(_, d)| d).collect();
        self.selection_keys = keys;
        picks.sort_unstable();
        let aggregation_config = self.strategy.aggregation(&self.config.aggregation);
        let aggregation =
            match Aggregation::new(self.dims, self.config.max_rank, aggregation_config) {
                Ok(a) => a,
                Err(e) => {
                    self.counters.aggregation_errors += 1;
                    tracing::error!(error = %e, "cannot set up the round's aggregation");
                    return;
                }
            };
        let id = self.round.next();
        let explorers = self.explorers(picks.len());
        let mut order: Vec<(usize, DeviceId)> = picks.into_iter().enumerate().collect();
        let bounded = match &explorers {
            Some(chosen) if self.config.bounded_exploration => {
                // The others first (a stable sort), so that the explorers' bound is known.
                order.sort_by_key(|(pick, _)| chosen.contains(pick));
                true
            }
            _ => false,
        };
        let mut exploited_arms: Vec<Arm> = Vec::new();
        let mut participants = BTreeMap::new();
        for (pick, device) in order {
            let Some(entry) = self.devices.get_mut(&device) else {
                continue;
            };
            let Some(record) = entry.record.as_mut() else {
                continue;
            };
            let ctx = DeviceContext {
                device_id: device.0,
                round: id.0,
                ram_bytes: Some(record.capabilities.ram_bytes),
                deadline_ms: Some(self.config.round_deadline_ms),
            };
            let explorer = explorers.as_ref().is_none_or(|c| c.contains(&pick));
            let exploited = if explorer {
                None
            } else {
                self.strategy
                    .exploit_arm(&record.bandit, &ctx, &mut self.policy_rng)
            };
            let chosen = match exploited {
                Some(arm) => {
                    exploited_arms.push(arm);
                    Ok(arm)
                }
                None if bounded && explorer => {
                    let region = FeasibleRegion::no_costlier_than(&exploited_arms);
                    let rng = &mut self.policy_rng;
                    match self
                        .strategy
                        .choose_arm(&mut record.bandit, &ctx, &region, rng)
                    {
                        Err(BanditError::NoFeasibleArm { .. }) => {
                            let all = FeasibleRegion::all();
                            self.strategy
                                .choose_arm(&mut record.bandit, &ctx, &all, rng)
                        }
                        chosen => chosen,
                    }
                }
                None => self.strategy.choose_arm(
                    &mut record.bandit,
                    &ctx,
                    &FeasibleRegion::all(),
                    &mut self.policy_rng,
                ),
            };
            let arm = match chosen {
                Ok(arm) => arm,
                Err(BanditError::NoFeasibleArm { .. }) => {
                    self.counters.no_feasible_arm += 1;
                    tracing::info!(%device, round = %id, "no feasible arm left; device skipped");
                    continue;
                }
                Err(e) => {
                    self.counters.bandit_errors += 1;
                    tracing::warn!(%device, error = %e, "bandit could not choose; device skipped");
                    continue;
                }
            };
            let seed = self.training.at(id.0, device.0);
            let rank = self.strategy.sent_rank(arm.rank, record.rank_limit);
            participants.insert(
                device,
                Participant {
                    arm,
                    rank,
                    ctx,
                    seed,
                    sparsity_prev: record.sparsity,
                    outcome: Outcome::Pending,
                    resends: 0,
                },
            );
        }
        let mut configs = Vec::with_capacity(participants.len());
        for (device, p) in &participants {
            match self.round_config(*device, id, p, self.config.round_deadline_ms) {
                Ok(rc) => configs.push((*device, rc)),
                Err(e) => tracing::warn!(%device, error = %e, "cannot slice the global adapter"),
            }
        }
        participants.retain(|d, _| configs.iter().any(|(c, _)| c == d));
        if participants.is_empty() {
            return;
        }
        let quorum = ((self.config.quorum_fraction * participants.len() as f64).ceil() as usize)
            .clamp(1, participants.len());
        self.round = id;
        self.counters.rounds_started += 1;
        tracing::info!(round = %id, selected = participants.len(), quorum, "round started");
        for (device, rc) in configs {
            if let Some(r) = self.record_mut(device) {
                r.rounds_selected += 1;
            }
            out.push(Command::Send {
                device,
                msg: Message::RoundConfig(rc),
            });
        }
        self.open = Some(OpenRound {
            id,
            started_at: now,
            deadline: now.plus_ms(self.config.round_deadline_ms),
            participants,
            aggregation,
            quorum,
            rejects: BTreeMap::new(),
            samples_clipped: 0,
        });
    }
}

/// A device a round may select: connected, joined and with a record (not in a round).
fn is_idle(e: &DeviceEntry) -> bool {
    e.connected && e.joined && e.record.is_some()
}
