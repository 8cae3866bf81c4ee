//! The round coordinator as a sans-IO state machine: events in (`handle(now, event)`,
//! `handle_timeout(now)`), commands out, next deadline from `poll_timeout()`. It reads no clock,
//! opens no socket and starts no thread; its only randomness is a `ChaCha8Rng` seeded from the
//! config, so the same events at the same times give the same commands. The QUIC server
//! (`crate::server`) and the simulator drive the same code.
//!
//! # Life of a run
//! 1. The driver authenticates a connection (mTLS, certificate -> [`DeviceId`]) and reports
//!    [`Event::Connected`]. The device's first message must be a `Join`: a wrong protocol
//!    version, an id other than the certified one, or a device outside `allowed_devices` gets a
//!    `Reject` and a [`Command::Disconnect`]; a valid join registers the device (a fresh bandit
//!    from the strategy on its first join) and gets a `Welcome`.
//! 2. A round starts when no round is open and at least `min_devices` joined devices are idle:
//!    `min(ceil(devices_per_round * (1 + over_selection)), idle)` of them are sampled with the
//!    seeded generator, each device's bandit picks its arm, and each gets a `RoundConfig` with
//!    its slice of the global adapter (cut to the kept maps of its last accepted update, at its
//!    arm's rank). The first round already sends a slice: the global adapter starts as the
//!    standard LoRA initialisation (`A` random, `B = 0`) drawn from the seeded generator, so
//!    every device starts from the same `A` and averaged factors stay meaningful.
//! 3. Updates are checked (round, selection, duplicates, size, rank, statistics, shapes,
//!    finiteness, norms) and folded into the round's streaming aggregation as they arrive;
//!    anything wrong is a `Reject` with a reason and a counter, never a panic or an `Err`.
//!    A `RoundFailed` marks the device failed (reward 0); `OutOfMemory` also teaches its
//!    feasibility filter that the arm and every costlier one do not fit.
//! 4. The round closes when every selected device answered (or is disconnected), when
//!    `devices_per_round` updates were accepted (`close_at_target`), or at the deadline. With
//!    at least `quorum` accepted updates the aggregate replaces the global adapter and every
//!    selected device's bandit learns its shaped reward (failed and missed devices 0); without
//!    quorum the round is abandoned: no aggregation, and only failed and missed devices learn
//!    (reward 0). Then [`Command::Checkpoint`] and [`Command::RoundClosed`] are emitted, in that
//!    order, and after the last round `Bye(Finished)` to every device and [`Command::Finished`].
//!    A round never starts in the call that closed the previous one, so the driver can
//!    checkpoint between rounds; the next one starts from `handle_timeout` after
//!    `round_interval_ms` (`poll_timeout` says when).
//!
//! A device that disconnects stays registered; if it was selected and comes back before the
//! round closes, its update still counts (and on re-joining it is sent its round configuration
//! again, with the time left).

mod config;
mod state;
mod summary;

use std::collections::BTreeMap;

use bandit::{shape_rewards, BanditError, DeviceContext, Policy, RoundStats};
use protocol::{
    Ack, Bye, ByeReason, DeviceId, FailReason, Join, KeptIndices, Message, ModelDims, Reject,
    RejectReason, RoundConfig, RoundFailed, RoundId, Timestamp, Update, UpdateStats, Welcome,
    PROTOCOL_VERSION,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::aggregate::{Aggregation, Contribution, GlobalAdapter};
use crate::strategy::Strategy;

pub use config::{AggregationConfig, AggregationMethod, CoordinatorConfig, SvdChoice};
pub use state::{CoordinatorState, DeviceRecord, STATE_SCHEMA};
pub use summary::{Counters, FailedSummary, ParticipantSummary, RoundSummary};

/// Why a coordinator could not be built or restored. Nothing a peer sends produces one.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("invalid coordinator config: {0}")]
    InvalidConfig(String),
    #[error("invalid model dimensions: {0:?}")]
    InvalidDims(ModelDims),
    #[error("saved state does not fit this run: {0}")]
    IncompatibleState(String),
}

/// Inputs from the driver.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A connection whose client certificate names `device` is up.
    Connected { device: DeviceId },
    /// A message arrived from `device`; `bytes` is its frame size on the wire.
    Message {
        device: DeviceId,
        msg: Message,
        bytes: u64,
    },
    /// The device's connection ended.
    Disconnected { device: DeviceId },
}

/// Outputs for the driver, to be carried out in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Send {
        device: DeviceId,
        msg: Message,
    },
    /// Close the device's connection (after sending what was queued for it).
    Disconnect {
        device: DeviceId,
        reason: String,
    },
    /// A round closed; write its summary (one JSONL line).
    RoundClosed(Box<RoundSummary>),
    /// Persist [`Coordinator::state`] now (a round just ended).
    Checkpoint,
    /// The last round closed; devices were told `Bye(Finished)`.
    Finished,
}

/// How a selected device's round ended (so far).
#[derive(Clone, Debug)]
enum Outcome {
    Pending,
    Completed(Box<Completed>),
    Failed { kind: String, reason: String },
}

#[derive(Clone, Debug)]
struct Completed {
    stats: UpdateStats,
    kept: KeptIndices,
    duration_ms: u64,
    bytes_up: u64,
    delta_norm: f64,
}

#[derive(Clone, Debug)]
struct Participant {
    arm: protocol::Arm,
    ctx: DeviceContext,
    seed: u64,
    sparsity_prev: f64,
    outcome: Outcome,
}

struct OpenRound {
    id: RoundId,
    started_at: Timestamp,
    deadline: Timestamp,
    participants: BTreeMap<DeviceId, Participant>,
    aggregation: Aggregation,
    quorum: usize,
    rejects: BTreeMap<String, u64>,
}

impl OpenRound {
    fn accepted(&self) -> usize {
        self.participants
            .values()
            .filter(|p| matches!(p.outcome, Outcome::Completed(_)))
            .count()
    }
}

/// A device as the coordinator sees it: its persistent record (once it joined) and its
/// connection state.
#[derive(Clone, Debug, Default)]
struct DeviceEntry {
    record: Option<DeviceRecord>,
    connected: bool,
    joined: bool,
}

/// The round coordinator (see the module docs).
pub struct Coordinator {
    config: CoordinatorConfig,
    dims: ModelDims,
    strategy: Box<dyn Strategy>,
    global: GlobalAdapter,
    devices: BTreeMap<DeviceId, DeviceEntry>,
    /// The latest round started (open or closed).
    round: RoundId,
    /// The latest round closed.
    last_closed: RoundId,
    open: Option<OpenRound>,
    /// Earliest time the next round may start.
    gate: Option<Timestamp>,
    rng: ChaCha8Rng,
    counters: Counters,
    finished: bool,
    /// A round closed during the current call (the next one waits for `handle_timeout`).
    closed_now: bool,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("strategy", &self.strategy.name())
            .field("round", &self.round)
            .field("open", &self.open.as_ref().map(|o| o.id))
            .field("devices", &self.devices.len())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

fn invalid_state(what: impl Into<String>) -> CoordinatorError {
    CoordinatorError::IncompatibleState(what.into())
}

impl Coordinator {
    /// A fresh run for a model of `dims`: validates the config, builds the strategy and draws
    /// the initial global adapter from the seeded generator.
    pub fn new(
        config: CoordinatorConfig,
        dims: ModelDims,
    ) -> Result<Coordinator, CoordinatorError> {
        config.validate()?;
        if protocol::validate_dims(&dims).is_err() {
            return Err(CoordinatorError::InvalidDims(dims));
        }
        let strategy = config.strategy.build(&config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let global = GlobalAdapter::init_lora(dims, config.max_rank, config.lora_alpha, &mut rng);
        Ok(Coordinator {
            finished: false,
            config,
            dims,
            strategy,
            global,
            devices: BTreeMap::new(),
            round: RoundId(0),
            last_closed: RoundId(0),
            open: None,
            gate: None,
            rng,
            counters: Counters::default(),
            closed_now: false,
        })
    }

    /// Continues a run from a saved state. Refuses a state for another model, another
    /// strategy or another global rank, and a malformed one.
    pub fn restore(
        config: CoordinatorConfig,
        state: CoordinatorState,
    ) -> Result<Coordinator, CoordinatorError> {
        config.validate()?;
        let dims = state.dims;
        if protocol::validate_dims(&dims).is_err() {
            return Err(invalid_state(format!(
                "inconsistent model dimensions {dims:?}"
            )));
        }
        if state.strategy != config.strategy.name() {
            return Err(invalid_state(format!(
                "it was written by strategy {}, the config asks for {}",
                state.strategy,
                config.strategy.name()
            )));
        }
        if state.global.dims != dims || !state.global.is_well_formed() {
            return Err(invalid_state(
                "its global adapter does not match its model dimensions",
            ));
        }
        if state.global.rank != config.max_rank {
            return Err(invalid_state(format!(
                "its global adapter has rank {}, the config's max_rank is {}",
                state.global.rank, config.max_rank
            )));
        }
        let mut devices = BTreeMap::new();
        for record in state.devices {
            if let Some(kept) = &record.kept {
                protocol::validate_kept(&dims, kept).map_err(|e| {
                    invalid_state(format!("kept maps of {} are invalid: {e}", record.id))
                })?;
            }
            if !(0.0..=1.0).contains(&record.sparsity) {
                return Err(invalid_state(format!(
                    "sparsity {} of {} is outside [0, 1]",
                    record.sparsity, record.id
                )));
            }
            let id = record.id;
            let entry = DeviceEntry {
                record: Some(record),
                connected: false,
                joined: false,
            };
            if devices.insert(id, entry).is_some() {
                return Err(invalid_state(format!("{id} appears twice")));
            }
        }
        let strategy = config.strategy.build(&config)?;
        let finished = state.round.0 >= config.rounds;
        Ok(Coordinator {
            finished,
            config,
            dims,
            strategy,
            global: state.global,
            devices,
            round: state.round,
            last_closed: state.round,
            open: None,
            gate: None,
            rng: state.rng,
            counters: state.counters,
            closed_now: false,
        })
    }

    /// The persistent state (see [`CoordinatorState`]). Exact between rounds, which is when
    /// [`Command::Checkpoint`] asks for it; an open round is not part of it.
    pub fn state(&self) -> CoordinatorState {
        CoordinatorState {
            dims: self.dims,
            strategy: self.strategy.name().to_string(),
            round: self.last_closed,
            global: self.global.clone(),
            devices: self
                .devices
                .values()
                .filter_map(|e| e.record.clone())
                .collect(),
            rng: self.rng.clone(),
            counters: self.counters.clone(),
        }
    }

    /// The global adapter (effective factors in full coordinates).
    pub fn global(&self) -> &GlobalAdapter {
        &self.global
    }

    /// The latest round started (open or closed); `RoundId(0)` before the first.
    pub fn round(&self) -> RoundId {
        self.round
    }

    /// The open round, if any.
    pub fn open_round(&self) -> Option<RoundId> {
        self.open.as_ref().map(|o| o.id)
    }

    /// Devices selected for the open round, ascending.
    pub fn selected(&self) -> Vec<DeviceId> {
        self.open
            .as_ref()
            .map(|o| o.participants.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    pub fn dims(&self) -> ModelDims {
        self.dims
    }

    /// The strategy's name.
    pub fn strategy_name(&self) -> &'static str {
        self.strategy.name()
    }

    /// A registered device's record.
    pub fn device(&self, id: DeviceId) -> Option<&DeviceRecord> {
        self.devices.get(&id).and_then(|e| e.record.as_ref())
    }

    /// Whether the device is connected and has joined.
    pub fn is_joined(&self, id: DeviceId) -> bool {
        self.devices.get(&id).is_some_and(|e| e.joined)
    }

    /// Whether the last round closed.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Feeds one event; returns what the driver must do, in order.
    pub fn handle(&mut self, now: Timestamp, event: Event) -> Vec<Command> {
        self.closed_now = false;
        let mut out = Vec::new();
        match event {
            Event::Connected { device } => self.on_connected(device),
            Event::Disconnected { device } => self.on_disconnected(now, device, &mut out),
            Event::Message { device, msg, bytes } => {
                self.on_message(now, device, msg, bytes, &mut out)
            }
        }
        self.try_start_round(now, &mut out);
        out
    }

    /// Fires due timers: the open round's deadline, the start of the next round.
    pub fn handle_timeout(&mut self, now: Timestamp) -> Vec<Command> {
        self.closed_now = false;
        let mut out = Vec::new();
        if self.open.as_ref().is_some_and(|o| now >= o.deadline) {
            self.close_round(now, "deadline", &mut out);
        }
        self.try_start_round(now, &mut out);
        out
    }

    /// When [`Coordinator::handle_timeout`] should be called next (`None`: only events can
    /// make progress).
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match &self.open {
            Some(open) => Some(open.deadline),
            None if self.finished => None,
            None => self.gate,
        }
    }

    fn entry(&mut self, device: DeviceId) -> &mut DeviceEntry {
        self.devices.entry(device).or_default()
    }

    fn on_connected(&mut self, device: DeviceId) {
        self.counters.connections += 1;
        let entry = self.entry(device);
        if entry.connected {
            tracing::debug!(%device, "connection replaced by a new one");
        }
        entry.connected = true;
        entry.joined = false;
    }

    fn on_disconnected(&mut self, now: Timestamp, device: DeviceId, out: &mut Vec<Command>) {
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

    fn on_message(
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
        let fresh = match self.devices.get(&device).and_then(|e| e.record.as_ref()) {
            None => true,
            // Other hardware under the same identity: what its bandit learned no longer holds.
            Some(r) => r.capabilities.ram_bytes != caps.ram_bytes,
        };
        let bandit = if fresh {
            match self.strategy.bandit_for(&caps) {
                Ok(b) => Some(b),
                Err(e) => {
                    return self.refuse_join(out, device, RejectReason::Unsupported(e.to_string()))
                }
            }
        } else {
            None
        };
        let entry = self.entry(device);
        match (entry.record.as_mut(), bandit) {
            (Some(record), bandit) => {
                if let Some(b) = bandit {
                    tracing::info!(%device, "device re-joined with other RAM; its bandit starts over");
                    record.bandit = b;
                }
                record.capabilities = caps;
            }
            (None, Some(bandit)) => {
                entry.record = Some(DeviceRecord {
                    id: device,
                    capabilities: caps,
                    bandit,
                    kept: None,
                    sparsity: 0.0,
                    rounds_selected: 0,
                    rounds_completed: 0,
                    rounds_failed: 0,
                    rounds_missed: 0,
                })
            }
            // A device without a record always gets a fresh bandit above.
            (None, None) => return,
        }
        entry.joined = true;
        self.counters.joins += 1;
        tracing::debug!(%device, "device joined");
        out.push(Command::Send {
            device,
            msg: Message::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                device_id: device,
                model: self.dims,
                lora_alpha: self.config.lora_alpha,
                heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            }),
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
        // A selected device that comes back before answering gets its configuration again.
        let resend = self.open.as_ref().and_then(|open| {
            let p = open.participants.get(&device)?;
            matches!(p.outcome, Outcome::Pending)
                .then(|| (open.id, p.clone(), open.deadline.ms_since(now)))
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
            Ok(p) => p.arm.rank,
            Err(reason) => return self.reject(out, device, Some(round), reason),
        };
        if bytes > self.config.max_update_bytes {
            let reason = RejectReason::TooLarge {
                bytes,
                limit: self.config.max_update_bytes,
            };
            return self.fail_and_reject(out, device, round, reason);
        }
        if update.adapter.rank != arm_rank {
            let reason = RejectReason::Malformed(format!(
                "adapter rank {} differs from the round's rank {arm_rank}",
                update.adapter.rank
            ));
            return self.fail_and_reject(out, device, round, reason);
        }
        if let Err(reason) = check_stats(&update.stats) {
            return self.fail_and_reject(out, device, round, reason);
        }
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let stats = update.stats;
        let kept = update.kept.clone();
        let contribution = Contribution {
            device,
            adapter: update.adapter,
            kept: update.kept,
            samples: stats.samples,
        };
        match open.aggregation.add(contribution) {
            Ok(accepted) => {
                let duration_ms = now.ms_since(open.started_at);
                if let Some(p) = open.participants.get_mut(&device) {
                    p.outcome = Outcome::Completed(Box::new(Completed {
                        stats,
                        kept,
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
        participant.outcome = Outcome::Failed {
            kind: kind.to_string(),
            reason: failed.reason.to_string(),
        };
        let (arm, ctx) = (participant.arm, participant.ctx);
        self.counters.round_failures += 1;
        tracing::info!(%device, %round, reason = %failed.reason, "device could not run its round");
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

    fn record_mut(&mut self, device: DeviceId) -> Option<&mut DeviceRecord> {
        self.devices
            .get_mut(&device)
            .and_then(|e| e.record.as_mut())
    }

    fn note_bandit_error(&mut self, device: DeviceId, result: Result<(), BanditError>) {
        if let Err(e) = result {
            self.counters.bandit_errors += 1;
            tracing::warn!(%device, error = %e, "bandit refused an observation");
        }
    }

    fn maybe_close_early(&mut self, now: Timestamp, out: &mut Vec<Command>) {
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

    /// The round configuration of a participant with `deadline_ms` left.
    fn round_config(
        &self,
        device: DeviceId,
        round: RoundId,
        participant: &Participant,
        deadline_ms: u64,
    ) -> Result<RoundConfig, crate::aggregate::AggregateError> {
        let full;
        let kept = match self.device(device).and_then(|r| r.kept.as_ref()) {
            Some(k) => k,
            None => {
                full = KeptIndices::full(&self.dims);
                &full
            }
        };
        let mut slice =
            self.global
                .global_slice(kept, participant.arm.rank, self.config.lora_alpha)?;
        if self.config.f16_downloads {
            slice.adapter = slice.adapter.to_f16();
        }
        Ok(RoundConfig {
            round,
            arm: participant.arm,
            global: Some(slice),
            deadline_ms,
            local_steps: self.config.local_steps,
            prune_interval_steps: self.config.prune_interval_steps,
            learning_rate: self.config.learning_rate,
            batch_size: self.config.batch_size,
            seed: participant.seed,
        })
    }

    fn try_start_round(&mut self, now: Timestamp, out: &mut Vec<Command>) {
        if self.closed_now || self.open.is_some() || self.finished {
            return;
        }
        if let Some(gate) = self.gate {
            if now < gate {
                return;
            }
            self.gate = None;
        }
        let idle: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, e)| e.connected && e.joined && e.record.is_some())
            .map(|(id, _)| *id)
            .collect();
        if idle.len() < self.config.min_devices_to_start() {
            return;
        }
        let k = self.config.selection_size().min(idle.len());
        let mut picks: Vec<DeviceId> = rand::seq::index::sample(&mut self.rng, idle.len(), k)
            .into_iter()
            .map(|i| idle[i])
            .collect();
        picks.sort_unstable();
        let aggregation = match Aggregation::new(self.dims, self.strategy.aggregate_config()) {
            Ok(a) => a,
            Err(e) => {
                self.counters.aggregation_errors += 1;
                tracing::error!(error = %e, "cannot set up the round's aggregation");
                return;
            }
        };
        let id = self.round.next();
        let mut participants = BTreeMap::new();
        for device in picks {
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
            let arm = match self
                .strategy
                .choose_arm(&mut record.bandit, &ctx, &mut self.rng)
            {
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
            let seed = self.rng.random::<u64>();
            participants.insert(
                device,
                Participant {
                    arm,
                    ctx,
                    seed,
                    sparsity_prev: record.sparsity,
                    outcome: Outcome::Pending,
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
        });
    }

    fn close_round(&mut self, now: Timestamp, closed_by: &str, out: &mut Vec<Command>) {
        let Some(open) = self.open.take() else { return };
        self.closed_now = true;
        self.last_closed = open.id;
        let accepted = open.accepted();
        let quorum_met = accepted >= open.quorum;
        let method = open.aggregation.config().method.name().to_string();
        let OpenRound {
            id,
            started_at,
            participants,
            aggregation,
            quorum,
            rejects,
            ..
        } = open;
        let mut aggregated = false;
        if quorum_met {
            match aggregation.finish(Some(&self.global)) {
                Ok(global) => {
                    self.global = global;
                    aggregated = true;
                }
                Err(e) => {
                    self.counters.aggregation_errors += 1;
                    tracing::error!(round = %id, error = %e, "aggregation failed; the global adapter is unchanged");
                }
            }
        }
        if aggregated {
            self.counters.rounds_aggregated += 1;
        } else {
            self.counters.rounds_abandoned += 1;
        }

        let stats: Vec<RoundStats> = participants.values().map(round_stats).collect();
        // With quorum every selected device learns its shaped reward; without it only the
        // devices that failed or missed learn (reward 0).
        let rewards: Vec<Option<f64>> = if quorum_met {
            match shape_rewards(&stats, &self.config.reward) {
                Ok(r) => r.into_iter().map(Some).collect(),
                Err(e) => {
                    self.counters.bandit_errors += 1;
                    tracing::warn!(round = %id, error = %e, "cannot shape rewards");
                    zero_unless_completed(&participants)
                }
            }
        } else {
            zero_unless_completed(&participants)
        };

        let mut summary = RoundSummary {
            round: id,
            strategy: self.strategy.name().to_string(),
            started_at,
            closed_at: now,
            selected: participants.keys().copied().collect(),
            participants: Vec::new(),
            missed: Vec::new(),
            failed: Vec::new(),
            rejects,
            aggregation: method,
            quorum,
            quorum_met,
            aggregated,
            closed_by: closed_by.to_string(),
            bytes_up: 0,
            bytes_down: 0,
            mean_loss_pre: None,
            mean_loss_post: None,
        };
        let (mut loss_pre, mut loss_post, mut weight) = (0.0, 0.0, 0.0);
        for ((device, p), reward) in participants.into_iter().zip(rewards) {
            let bandit_arm = p.arm;
            let mut results: Vec<Result<(), BanditError>> = Vec::new();
            let Some(record) = self.record_mut(device) else {
                continue;
            };
            if let Some(r) = reward {
                results.push(record.bandit.observe(&p.ctx, bandit_arm, r));
            }
            match p.outcome {
                Outcome::Completed(c) => {
                    results.push(
                        record
                            .bandit
                            .record(bandit_arm, c.stats.peak_mem_bytes, c.duration_ms, &p.ctx)
                            .map(|_| ()),
                    );
                    record.kept = Some(c.kept);
                    record.sparsity = c.stats.sparsity as f64;
                    record.rounds_completed += 1;
                    let w = c.stats.samples.max(1) as f64;
                    loss_pre += w * c.stats.loss_pre as f64;
                    loss_post += w * c.stats.loss_post as f64;
                    weight += w;
                    summary.bytes_up += c.bytes_up;
                    summary.bytes_down += c.stats.bytes_down;
                    summary.participants.push(ParticipantSummary {
                        device,
                        arm: p.arm,
                        loss_pre: c.stats.loss_pre,
                        loss_post: c.stats.loss_post,
                        sparsity_prev: p.sparsity_prev,
                        sparsity: c.stats.sparsity,
                        reward: reward.unwrap_or(0.0),
                        compute_ms: c.stats.compute_ms,
                        duration_ms: c.duration_ms,
                        bytes_up: c.bytes_up,
                        bytes_down: c.stats.bytes_down,
                        peak_mem_bytes: c.stats.peak_mem_bytes,
                        samples: c.stats.samples,
                        delta_norm: c.delta_norm,
                    });
                }
                Outcome::Failed { kind, reason } => {
                    record.rounds_failed += 1;
                    summary.failed.push(FailedSummary {
                        device,
                        arm: p.arm,
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

    /// Says goodbye to every connected device (the driver is shutting down) and closes the
    /// open round without aggregating it. The state stays as of the last closed round.
    pub fn shutdown(&mut self) -> Vec<Command> {
        self.open = None;
        self.gate = None;
        self.finished = true;
        self.devices
            .iter()
            .filter(|(_, e)| e.connected)
            .flat_map(|(device, _)| {
                [
                    Command::Send {
                        device: *device,
                        msg: Message::Bye(Bye {
                            reason: ByeReason::ServerShutdown,
                        }),
                    },
                    Command::Disconnect {
                        device: *device,
                        reason: "the aggregator is shutting down".into(),
                    },
                ]
            })
            .collect()
    }
}

/// Refuses statistics the reward cannot use: non-finite or negative losses, sparsity outside
/// `[0, 1]`.
fn check_stats(stats: &UpdateStats) -> Result<(), RejectReason> {
    let (pre, post, sparsity) = (stats.loss_pre, stats.loss_post, stats.sparsity);
    if !(pre.is_finite() && post.is_finite() && sparsity.is_finite()) {
        return Err(RejectReason::NonFinite);
    }
    if pre < 0.0 || post < 0.0 {
        return Err(RejectReason::Malformed(format!(
            "negative loss ({pre}, {post})"
        )));
    }
    if !(0.0..=1.0).contains(&sparsity) {
        return Err(RejectReason::Malformed(format!(
            "sparsity {sparsity} is outside [0, 1]"
        )));
    }
    Ok(())
}

fn round_stats(p: &Participant) -> RoundStats {
    let mut s = RoundStats {
        loss_pre: 0.0,
        loss_post: 0.0,
        sparsity_prev: p.sparsity_prev,
        sparsity_now: p.sparsity_prev,
        sparsity_target: p.arm.prune_ratio.clamp(0.0, 1.0),
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

fn zero_unless_completed(participants: &BTreeMap<DeviceId, Participant>) -> Vec<Option<f64>> {
    participants
        .values()
        .map(|p| match p.outcome {
            Outcome::Completed(_) => None,
            _ => Some(0.0),
        })
        .collect()
}
