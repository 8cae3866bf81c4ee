//! Intake: what the coordinator does with each event and message. Connections, joins
//! (version, identity, allow-list, a bandit for a new device, the round configuration re-sent
//! to a selected device that comes back: once per connection and at most
//! [`MAX_RESENDS_PER_ROUND`] times a round; a repeated Join on the same connection gets a
//! Welcome only, and other RAM updates the capabilities but keeps the bandit and the first
//! class), updates (round, selection, duplicates, size, rank,
//! the round's alpha, every assigned layer present, statistics with losses in range, the
//! sample count clipped to its bound, then the aggregation's validation of shapes, finiteness
//! and norms: nothing a device reports steers the weighting unchecked) and reported
//! failures. Anything wrong is a `Reject` with a reason and a counter, never a panic or an
//! `Err`.

use protocol::{
    Ack, AdapterPayload, Bye, ByeReason, Capabilities, DeviceId, FailReason, Join, Message,
    ModelDims, Proj, Reject, RejectReason, RoundFailed, RoundId, Timestamp, Update, UpdateStats,
    Welcome, PROTOCOL_VERSION,
};

use super::round::{Completed, Outcome, Participant};
use super::{Command, Coordinator, DeviceRecord};
use crate::aggregate::Contribution;

/// Characters of a device's failure report kept (in the round summary, metrics and log).
pub const MAX_FAILURE_REASON_CHARS: usize = 256;

/// Times a round re-sends its configuration to one selected device that reconnects before
/// answering. Each re-send cuts and encodes the device's slice of the global adapter on the
/// coordinator's thread (megabytes), so a device that reconnects in a loop must not get it
/// every time; past the cap it waits for its configuration's deadline like a device that
/// went away (it still holds the configuration it was sent).
pub const MAX_RESENDS_PER_ROUND: u32 = 3;

impl Coordinator {
    /// A connection is up: the device must join (again) before anything else counts.
    pub(super) fn on_connected(&mut self, device: DeviceId) {
        self.counters.connections += 1;
        let entry = self.entry(device);
        if entry.connected {
            tracing::debug!(%device, "connection replaced by a new one");
        }
        entry.connected = true;
        entry.joined = false;
    }

    /// A connection ended: the device stays registered, and the open round closes if no
    /// connected participant still owes an answer.
    pub(super) fn on_disconnected(
        &mut self,
        now: Timestamp,
        device: DeviceId,
        out: &mut Vec<Command>,
    ) {
        if let Some(entry) = self.devices.get_mut(&device) {
            if entry.connected {
                self.counters.disconnects += 1;
                tracing::debug!(%device, "device disconnected");
            }
            entry.connected = false;
            entry.joined = false;
        }
        self.maybe_close_early(now, out);
    }

    /// Refuses a message: counts the reject by kind (run and open round) and tells the device.
    fn reject(
        &mut self,
        out: &mut Vec<Command>,
        device: DeviceId,
        round: Option<RoundId>,
        reason: RejectReason,
    ) {
        let kind = reason.kind().to_string();
        tracing::debug!(%device, ?round, %reason, "message rejected");
        *self.counters.rejects.entry(kind.clone()).or_default() += 1;
        if let Some(open) = &mut self.open {
            *open.rejects.entry(kind).or_default() += 1;
        }
        out.push(Command::Send {
            device,
            msg: Message::Reject(Reject { round, reason }),
        });
    }

    /// Dispatches one message; updates and failures need a joined device.
    pub(super) fn on_message(
        &mut self,
        now: Timestamp,
        device: DeviceId,
        msg: Message,
        bytes: u64,
        out: &mut Vec<Command>,
    ) {
        self.counters.bytes_received += bytes;
        // A driver reports Connected first; be lenient if it did not.
        let entry = self.entry(device);
        entry.connected = true;
        let joined = entry.joined;
        match msg {
            Message::Join(join) => self.on_join(now, device, join, out),
            Message::Update(update) if joined => self.on_update(now, device, update, bytes, out),
            Message::RoundFailed(failed) if joined => {
                self.on_round_failed(now, device, failed, out)
            }
            Message::Update(Update { round, .. })
            | Message::RoundFailed(RoundFailed { round, .. }) => {
                self.reject(out, device, Some(round), RejectReason::NotJoined)
            }
            Message::Heartbeat(_) => self.counters.heartbeats += 1,
            Message::Bye(_) => {
                out.push(Command::Disconnect {
                    device,
                    reason: "the device said goodbye".into(),
                });
                self.on_disconnected(now, device, out);
            }
            other => self.reject(
                out,
                device,
                None,
                RejectReason::Unexpected(other.kind().to_string()),
            ),
        }
    }

    /// Refuses a join and closes the connection.
    fn refuse_join(&mut self, out: &mut Vec<Command>, device: DeviceId, reason: RejectReason) {
        let text = reason.to_string();
        self.reject(out, device, None, reason);
        out.push(Command::Disconnect {
            device,
            reason: text,
        });
        if let Some(entry) = self.devices.get_mut(&device) {
            entry.joined = false;
        }
    }

    /// Checks a join (version, identity, allow-list), registers the device (a fresh bandit on
    /// its first join), welcomes it, and re-sends its round configuration when it was selected
    /// and has not answered yet.
    ///
    /// Amplification: the round configuration (with its global slice, megabytes) goes to a
    /// connection once. A selected device already joined on this connection has it (sent at
    /// selection, or at its first Join here), so a repeated Join on the same connection is
    /// answered with a Welcome only (a few dozen bytes) and not counted as a join; the driver's
    /// rate limit and bounded queues bound even that.
    ///
    /// A Join with another RAM figure keeps the device's bandit (what it learned stays) and
    /// updates the capabilities its feasibility filter checks every round (`ram_bytes` in the
    /// device context). A strategy that sizes the arm space by RAM at the first join
    /// (HetLoRA's rank ladder) keeps that space.
    fn on_join(&mut self, now: Timestamp, device: DeviceId, join: Join, out: &mut Vec<Command>) {
        if let Err(reason) = join.check(device) {
            return self.refuse_join(out, device, reason);
        }
        if !self.config.allowed_devices.is_empty()
            && !self.config.allowed_devices.contains(&device.0)
        {
            return self.refuse_join(out, device, RejectReason::UnknownDevice(device));
        }
        let caps = join.capabilities;
        let bandit = match self.devices.get(&device).and_then(|e| e.record.as_ref()) {
            Some(_) => None,
            None => match self.strategy.bandit_for(&caps) {
                Ok(b) => Some(b),
                Err(e) => {
                    return self.refuse_join(out, device, RejectReason::Unsupported(e.to_string()))
                }
            },
        };
        let entry = self.entry(device);
        let repeated = entry.joined;
        match (entry.record.as_mut(), bandit) {
            (Some(record), _) => {
                if record.capabilities.ram_bytes != caps.ram_bytes {
                    tracing::info!(%device, old = record.capabilities.ram_bytes, new = caps.ram_bytes, "device reports other RAM; its bandit keeps what it learned");
                }
                // A device's class is what it first joined as: classes pool bandit
                // observations and name metric series, so a device renaming itself on every
                // join could write into other classes' bandits and use up the series.
                let class = record.capabilities.device_class.take();
                if caps.device_class != class {
                    tracing::warn!(%device, old = ?class, new = ?caps.device_class, "device names another class; it keeps its first");
                }
                record.capabilities = Capabilities {
                    device_class: class,
                    ..caps
                };
            }
            (None, Some(bandit)) => {
                entry.record = Some(DeviceRecord {
                    id: device,
                    capabilities: caps,
                    bandit,
                    kept: None,
                    sparsity: 0.0,
                    rank_limit: None,
                    rounds_selected: 0,
                    rounds_completed: 0,
                    rounds_failed: 0,
                    rounds_missed: 0,
                })
            }
            // A device without a record always gets a fresh bandit above.
            (None, None) => return,
        }
        let welcome = Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            device_id: device,
            model: self.dims,
            lora_alpha: self.config.lora_alpha,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
        });
        if repeated {
            tracing::debug!(%device, "repeated join on the same connection: welcome only");
            out.push(Command::Send {
                device,
                msg: welcome,
            });
            return;
        }
        let entry = self.entry(device);
        entry.joined = true;
        self.counters.joins += 1;
        tracing::debug!(%device, "device joined");
        out.push(Command::Send {
            device,
            msg: welcome,
        });
        if self.finished {
            out.push(Command::Send {
                device,
                msg: Message::Bye(Bye {
                    reason: ByeReason::Finished,
                }),
            });
            return;
        }
        // A selected device that comes back before answering gets its configuration again,
        // up to the cap.
        let resend = self.open.as_mut().and_then(|open| {
            let p = open.participants.get_mut(&device)?;
            if !matches!(p.outcome, Outcome::Pending) {
                return None;
            }
            if p.resends >= MAX_RESENDS_PER_ROUND {
                tracing::warn!(%device, round = %open.id, resends = p.resends, "device reconnects in a loop: its configuration is not sent again this round");
                return None;
            }
            p.resends += 1;
            Some((open.id, p.clone(), open.deadline.ms_since(now)))
        });
        if let Some((round, participant, left_ms)) = resend {
            match self.round_config(device, round, &participant, left_ms) {
                Ok(rc) => out.push(Command::Send {
                    device,
                    msg: Message::RoundConfig(rc),
                }),
                Err(e) => {
                    tracing::warn!(%device, error = %e, "cannot re-send the round configuration")
                }
            }
        }
    }

    /// Where a device's answer about `round` stands: `Ok` when it is for the open round, or the
    /// reason to refuse it.
    fn check_answer_round(&self, round: RoundId) -> Result<(), RejectReason> {
        match &self.open {
            Some(open) if open.id == round => Ok(()),
            _ if round > self.round => Err(RejectReason::Malformed(format!(
                "{round} has not started (latest is {})",
                self.round
            ))),
            _ if round < self.round => Err(RejectReason::StaleRound {
                got: round,
                current: self.round,
            }),
            _ => Err(RejectReason::LateUpdate(round)),
        }
    }

    /// The pending participant `device` of the open round, or the reason to refuse its answer.
    fn pending_participant(
        &mut self,
        device: DeviceId,
        round: RoundId,
    ) -> Result<&mut Participant, RejectReason> {
        self.check_answer_round(round)?;
        let open = self.open.as_mut().ok_or(RejectReason::LateUpdate(round))?;
        let p = open
            .participants
            .get_mut(&device)
            .ok_or(RejectReason::NotSelected(round))?;
        match p.outcome {
            Outcome::Pending => Ok(p),
            _ => Err(RejectReason::DuplicateUpdate(round)),
        }
    }

    /// Marks a pending participant failed and refuses its message.
    fn fail_and_reject(
        &mut self,
        out: &mut Vec<Command>,
        device: DeviceId,
        round: RoundId,
        reason: RejectReason,
    ) {
        if let Ok(p) = self.pending_participant(device, round) {
            p.outcome = Outcome::Failed {
                kind: reason.kind().to_string(),
                reason: reason.to_string(),
            };
        }
        self.reject(out, device, Some(round), reason);
    }

    /// Checks an update (round, selection, duplicate, frame size, rank, statistics) and folds it
    /// into the round's aggregation, which validates shapes, finiteness and norms; any refusal
    /// marks the participant failed and is a `Reject` with its reason.
    fn on_update(
        &mut self,
        now: Timestamp,
        device: DeviceId,
        update: Update,
        bytes: u64,
        out: &mut Vec<Command>,
    ) {
        let round = update.round;
        let arm_rank = match self.pending_participant(device, round) {
            Ok(p) => p.rank,
            Err(reason) => return self.reject(out, device, Some(round), reason),
        };
        if bytes > self.config.max_update_bytes {
            let reason = RejectReason::TooLarge {
                bytes,
                limit: self.config.max_update_bytes,
            };
            return self.fail_and_reject(out, device, round, reason);
        }
        let rank = update.adapter.rank;
        if self.strategy.rank_pruning().is_some() {
            // Rank self-pruning: the device may report fewer components than it was sent.
            if rank == 0 || rank > arm_rank {
                let reason = RejectReason::Malformed(format!(
                    "adapter rank {rank} is not in [1, {arm_rank}] (the round's rank)"
                ));
                return self.fail_and_reject(out, device, round, reason);
            }
        } else if rank != arm_rank {
            let reason = RejectReason::Malformed(format!(
                "adapter rank {rank} differs from the round's rank {arm_rank}"
            ));
            return self.fail_and_reject(out, device, round, reason);
        }
        if update.adapter.alpha != self.config.lora_alpha {
            let reason = RejectReason::Malformed(format!(
                "adapter alpha {} differs from the round's alpha {}",
                update.adapter.alpha, self.config.lora_alpha
            ));
            return self.fail_and_reject(out, device, round, reason);
        }
        if let Err(reason) = check_layers_present(&self.dims, &update.adapter) {
            return self.fail_and_reject(out, device, round, reason);
        }
        if let Err(reason) = check_stats(&update.stats, self.config.max_loss) {
            return self.fail_and_reject(out, device, round, reason);
        }
        let mut stats = update.stats;
        // The sparsity the reward's progress term and the device's record use is the one its
        // kept maps give (validated against its adapter below), not the figure it reports: the
        // same bits for an honest device, the truth for one that claims more.
        let sparsity = update.kept.non_embedding_sparsity(&self.dims) as f32;
        if sparsity.to_bits() != stats.sparsity.to_bits() {
            tracing::debug!(%device, reported = stats.sparsity, sparsity, "reported sparsity replaced by its kept maps'");
            stats.sparsity = sparsity;
        }
        let samples = self.config.pinned_samples(stats.samples);
        let clipped = samples != stats.samples;
        if clipped {
            tracing::debug!(%device, reported = stats.samples, samples, "sample count clipped");
            stats.samples = samples;
        }
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let kept = update.kept.clone();
        let contribution = Contribution {
            device,
            adapter: update.adapter,
            kept: update.kept,
            samples: stats.samples,
        };
        // Against the global the round started from (unchanged while it is open): the slice
        // this update started from, for the averaging methods' step bound.
        match open
            .aggregation
            .add_against(contribution, Some(&self.global))
        {
            Ok(accepted) => {
                if clipped {
                    open.samples_clipped += 1;
                    self.counters.samples_clipped += 1;
                }
                let duration_ms = now.ms_since(open.started_at);
                if let Some(p) = open.participants.get_mut(&device) {
                    p.outcome = Outcome::Completed(Box::new(Completed {
                        stats,
                        kept,
                        rank,
                        duration_ms,
                        bytes_up: bytes,
                        delta_norm: accepted.delta_norm,
                    }));
                }
                self.counters.updates_accepted += 1;
                tracing::debug!(%device, %round, delta_norm = accepted.delta_norm, "update accepted");
                out.push(Command::Send {
                    device,
                    msg: Message::Ack(Ack { round }),
                });
                self.maybe_close_early(now, out);
            }
            Err(e) => self.fail_and_reject(out, device, round, e.reject_reason()),
        }
    }

    /// A device could not run its round: it is marked failed (reward 0 at the close), and an
    /// out-of-memory report teaches its feasibility filter.
    fn on_round_failed(
        &mut self,
        now: Timestamp,
        device: DeviceId,
        failed: RoundFailed,
        out: &mut Vec<Command>,
    ) {
        let round = failed.round;
        let participant = match self.pending_participant(device, round) {
            Ok(p) => p,
            Err(reason) => return self.reject(out, device, Some(round), reason),
        };
        let kind = match failed.reason {
            FailReason::OutOfMemory { .. } => "out_of_memory",
            FailReason::Error(_) => "error",
        };
        // The device's own text, kept in the round summary, the metrics and the log: cut.
        let reason: String = failed
            .reason
            .to_string()
            .chars()
            .take(MAX_FAILURE_REASON_CHARS)
            .collect();
        participant.outcome = Outcome::Failed {
            kind: kind.to_string(),
            reason: reason.clone(),
        };
        let (arm, ctx) = (participant.arm, participant.ctx);
        self.counters.round_failures += 1;
        tracing::info!(%device, %round, %reason, "device could not run its round");
        if let FailReason::OutOfMemory { .. } = failed.reason {
            self.counters.out_of_memory += 1;
            let result = match self.record_mut(device) {
                Some(r) => r.bandit.record_out_of_memory(arm, &ctx),
                None => Ok(()),
            };
            self.note_bandit_error(device, result);
        }
        self.maybe_close_early(now, out);
    }
}

/// Refuses an update that leaves out a layer the device was sent: every device is assigned
/// every `(block, projection)` of the model (its round configuration's slice holds them all).
/// Duplicates and out-of-range blocks are the aggregation's validation to refuse.
fn check_layers_present(dims: &ModelDims, adapter: &AdapterPayload) -> Result<(), RejectReason> {
    let n = dims.n_layers();
    let mut present = vec![false; n];
    for l in &adapter.layers {
        if let Some(slot) = present.get_mut(l.block as usize * Proj::ALL.len() + l.proj.index()) {
            *slot = true;
        }
    }
    let held = present.iter().filter(|&&p| p).count();
    if held < n {
        return Err(RejectReason::Malformed(format!(
            "the update holds {held} of the {n} layers the device was assigned"
        )));
    }
    Ok(())
}

/// Refuses statistics the reward cannot use: non-finite losses, losses outside
/// `[0, max_loss]`, sparsity outside `[0, 1]`.
fn check_stats(stats: &UpdateStats, max_loss: f32) -> Result<(), RejectReason> {
    let (pre, post, sparsity) = (stats.loss_pre, stats.loss_post, stats.sparsity);
    if !(pre.is_finite() && post.is_finite() && sparsity.is_finite()) {
        return Err(RejectReason::NonFinite);
    }
    if pre < 0.0 || post < 0.0 {
        return Err(RejectReason::Malformed(format!(
            "negative loss ({pre}, {post})"
        )));
    }
    if pre > max_loss || post > max_loss {
        return Err(RejectReason::Malformed(format!(
            "loss ({pre}, {post}) exceeds the bound {max_loss}"
        )));
    }
    if !(0.0..=1.0).contains(&sparsity) {
        return Err(RejectReason::Malformed(format!(
            "sparsity {sparsity} is outside [0, 1]"
        )));
    }
    Ok(())
}
