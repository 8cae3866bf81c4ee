//! The device side of the round protocol, sans-IO: [`AgentSession`] turns events (connected,
//! a message arrived, training finished, a send failed) and timers into commands (send a
//! message, start training, close). It reads no clock and opens no socket; the QUIC client and
//! the simulator drive it and differ only in transport and clock. The training itself is
//! [`crate::job::run_job`], which a driver runs when the session says `Train`.
//!
//! The session owns every decision of a device's round: which configuration becomes a job
//! (one job at a time, re-sent and superseded configurations), whether the round fits in the
//! device's RAM (the out-of-memory pre-check, sized by the config's [`RoundCosts`]), the
//! update's byte accounting (`bytes_down` from the configuration's frame size that the driver
//! reports with the message, `bytes_up` from the update's own encoded frame), and the outbox:
//! an `Update` or `RoundFailed` produced while the transport is down (or that the driver could
//! not deliver) is kept and sent after the next `Welcome`.
//!
//! Nothing from the network is trusted to be small: a round configuration over the device's
//! [`RoundLimits`] (rank, batch, local steps, learning rate, alpha) is refused with a
//! `RoundFailed` naming the value and the cap before anything is sized for it; a heartbeat
//! interval is raised to `MIN_HEARTBEAT_INTERVAL_MS`; every time computed from a network value
//! (`now + heartbeat interval` with u64::MAX meaning never, `now + deadline`) saturates; a job
//! running at its deadline is reported failed, told to stop ([`AgentCommand::Cancel`]), and its
//! late result dropped.
//!
//! State kept across rounds: the kept-index maps (pruning is cumulative), the adapter last
//! trained and its importance EMA; the frozen base is shared and re-sliced each round.

use std::collections::VecDeque;
use std::sync::Arc;

use protocol::{
    Arm, ByeReason, Capabilities, DeviceId, FailReason, GlobalSlice, Heartbeat, Join, Message,
    RoundConfig, RoundFailed, RoundId, Timestamp, Update, UpdateStats, PROTOCOL_VERSION,
};

use crate::cost::{MemoryMode, RoundCosts};
use crate::lora::HostFactors;
use crate::prune::{Criterion, Importance, PruneConfig};
use crate::train::RoundReport;
use crate::wire;
use protocol::KeptIndices;

mod limits;
mod state;
pub use limits::RoundLimits;
pub use state::DeviceState;

/// A round's work as the session hands it to its driver.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainJob {
    pub round: RoundId,
    pub arm: Arm,
    /// The run's target sparsity: with it the arm's ratio is the round's pace toward it
    /// ([`protocol::SparsityGoal`]).
    pub target_sparsity: Option<f64>,
    pub global: Option<GlobalSlice>,
    pub local_steps: usize,
    pub prune_every: usize,
    pub lr: f64,
    pub batch: usize,
    pub seed: u64,
    pub alpha: f64,
    /// When the round's deadline falls, in the driver's clock.
    pub deadline: Timestamp,
    /// HetLoRA's rank self-pruning, when the round asks for it.
    pub rank_pruning: Option<protocol::RankPruning>,
    /// The fastest memory mode whose estimated peak fits the device's RAM.
    pub memory: MemoryMode,
}

impl TrainJob {
    /// How far the job prunes: read against the device's sparsity when the job starts, the
    /// round's goal is `SparsityGoal::round_target`.
    pub fn sparsity_goal(&self) -> protocol::SparsityGoal {
        protocol::SparsityGoal::of(&self.arm, self.target_sparsity)
    }
}

/// Most messages the outbox keeps: past it the oldest is dropped (and logged), so neither a
/// long disconnection nor a stream of undeliverable answers grows the session without bound
/// (the aggregator treats a missing answer as a failed round).
pub const MAX_OUTBOX: usize = 16;

/// Static settings of a device.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: DeviceId,
    /// What the device reports on joining; `ram_bytes` is also the limit of the out-of-memory
    /// pre-check.
    pub capabilities: Capabilities,
    pub criterion: Criterion,
    pub prune: PruneConfig,
    /// `TrainConfig::min_prune_events` for every round (1: the round's interval alone).
    pub min_prune_events: usize,
    /// Send adapter factors in half precision.
    pub f16_updates: bool,
    /// How the device sizes a round (peak memory) and a message on the wire.
    pub costs: Arc<dyn RoundCosts>,
    /// The most a round configuration may ask of this device.
    pub limits: RoundLimits,
    /// Keep the adapter a job trained in [`DeviceState`] once its update is built. A device
    /// needs it (it persists it, and trains from it when a round brings no global slice); the
    /// surrogate simulator reads none, and 10,000 retained adapters were most of its memory.
    pub keep_adapter: bool,
}

/// What a finished job produced.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub round: RoundId,
    pub kept: KeptIndices,
    pub adapter: (usize, f64, Vec<HostFactors>),
    /// The importance EMA after the round, over `kept`.
    pub importance: Importance,
    pub stats: UpdateStats,
    pub report: RoundReport,
    /// Held-out metric (accuracy) of the adapter the round started from and after it.
    pub metric_pre: f64,
    pub metric_post: f64,
}

/// Inputs of the session.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// The transport is up (send Join).
    Connected,
    /// A message arrived; `bytes` is its frame size on the wire (a round configuration's is
    /// the round's download, reported in the update's `bytes_down`).
    Message { msg: Message, bytes: u64 },
    /// The driver finished a job (with compute time filled in by the driver), or could not run
    /// it (an error); a failure is reported to the aggregator.
    JobDone(Result<JobOutcome, FailReason>),
    /// The transport could not deliver a message the session asked to send (the connection
    /// broke under it); an update or failure report waits for the next connection.
    Undelivered(Message),
    /// The transport went away.
    Disconnected,
}

/// Outputs of the session.
#[derive(Debug, Clone)]
pub enum AgentCommand {
    Send(Message),
    /// Run `job` from `state` (the device's kept maps and adapter when the job starts) and
    /// report the result with [`AgentEvent::JobDone`]. The state is shared with the session,
    /// not copied: the session replaces it only when the job is done.
    Train {
        job: Box<TrainJob>,
        state: Arc<DeviceState>,
    },
    /// Stop the running job of this round at its next step: its deadline passed and it was
    /// reported failed. The driver still reports the job done (its result is dropped).
    Cancel(RoundId),
    /// Stop: the aggregator said goodbye or refused us for good.
    Close(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Disconnected,
    Joining,
    Idle,
    Training(RoundId),
    /// The running job's deadline passed: the round was reported failed and the job told to
    /// stop; the device stays busy until the driver reports the job done (its result is then
    /// dropped), so two jobs never run at once.
    Cancelled(RoundId),
    AwaitingAck(RoundId),
}

/// The parts of a round configuration that define the job (all but the deadline, which is
/// relative to receipt, and the global slice's factor values, which a re-sent configuration
/// takes from the same aggregator state).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct JobKey {
    round: RoundId,
    arm: Arm,
    target_sparsity: Option<u64>,
    local_steps: u32,
    prune_interval_steps: u32,
    learning_rate: u32,
    batch_size: u32,
    seed: u64,
    global: Option<(u32, u32, protocol::KeptIndices)>,
}

impl JobKey {
    fn of(rc: &RoundConfig) -> Self {
        JobKey {
            round: rc.round,
            arm: rc.arm,
            target_sparsity: rc.target_sparsity.map(f64::to_bits),
            local_steps: rc.local_steps,
            prune_interval_steps: rc.prune_interval_steps,
            learning_rate: rc.learning_rate.to_bits(),
            batch_size: rc.batch_size,
            seed: rc.seed,
            global: rc
                .global
                .as_ref()
                .map(|g| (g.adapter.rank, g.filled_rank, g.kept.clone())),
        }
    }
}

/// A finished job's update that the aggregator has not acknowledged or refused, with what
/// identifies its job: what an agent that keeps its state on disk persists so that, after a
/// restart, a configuration re-sent for that job is answered with this update again instead
/// of a second training ([`AgentSession::resume`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UnackedUpdate {
    key: JobKey,
    pub update: Update,
}

/// A round configuration that arrived while a job ran.
#[derive(Debug)]
struct Queued {
    received: Timestamp,
    config: RoundConfig,
    /// Its frame size (the round's download).
    bytes: u64,
}

/// The sans-IO device session.
#[derive(Debug)]
pub struct AgentSession {
    pub config: AgentConfig,
    /// Shared with the running job (a `Train` command's `state`); written only after the job
    /// is done, through `Arc::make_mut`, which copies only if a driver still holds the job's.
    state: Arc<DeviceState>,
    phase: Phase,
    /// Whether the transport is up (answers are sent) or down (answers wait in `outbox`).
    connected: bool,
    alpha: f64,
    heartbeat_ms: u64,
    next_heartbeat: Option<Timestamp>,
    steps_done: u32,
    /// What identifies the running job's configuration (a re-sent copy is a duplicate), and
    /// that configuration's frame size.
    running: Option<(JobKey, u64)>,
    /// When the running job's round fails (in the driver's clock) if the job has not finished.
    deadline: Option<Timestamp>,
    /// The running job's local steps, for the failure report at its deadline.
    job_steps: u32,
    /// A different configuration that arrived while a job ran: it starts when that job ends,
    /// and the superseded job's result is dropped.
    queued: Option<Queued>,
    /// The last finished job's update until the aggregator acknowledges or refuses it: a
    /// configuration re-sent for that same job (the device rejoined before the update arrived)
    /// is answered with this update again instead of a second training.
    last_update: Option<(JobKey, Update)>,
    /// Updates and failure reports produced while disconnected, or undelivered: sent after the
    /// next `Welcome`, oldest first.
    outbox: Vec<Message>,
    /// Rounds completed and acknowledged: only acknowledgements of an update this session
    /// sent count, so an aggregator repeating `Ack`s cannot grow it.
    pub acked_rounds: Vec<RoundId>,
    /// The last [`KEPT_REJECTS`] reject reasons received, each cut to
    /// [`REJECT_REASON_CHARS`] characters: an aggregator's reasons are its text, of any length
    /// and number.
    pub rejects: VecDeque<String>,
    /// Every reject received.
    pub rejects_total: u64,
}

/// Reject reasons a session keeps (the newest).
pub const KEPT_REJECTS: usize = 32;

/// Characters of a reject reason a session keeps.
pub const REJECT_REASON_CHARS: usize = 256;

impl AgentSession {
    pub fn new(config: AgentConfig, state: DeviceState) -> Self {
        Self::with_shared(config, Arc::new(state))
    }

    fn with_shared(config: AgentConfig, state: Arc<DeviceState>) -> Self {
        AgentSession {
            config,
            state,
            phase: Phase::Disconnected,
            connected: false,
            alpha: 32.0,
            heartbeat_ms: 0,
            next_heartbeat: None,
            steps_done: 0,
            running: None,
            deadline: None,
            job_steps: 0,
            queued: None,
            last_update: None,
            outbox: Vec::new(),
            acked_rounds: Vec::new(),
            rejects: VecDeque::new(),
            rejects_total: 0,
        }
    }

    /// A session for an agent process that restarted from what it persisted: its state and
    /// the update it had not seen acknowledged (a configuration re-sent for that job is
    /// answered with the update again, not trained a second time). A running job and the
    /// outbox are gone: a job killed mid-training runs again from `state`.
    pub fn resume(config: AgentConfig, state: DeviceState, unacked: Option<UnackedUpdate>) -> Self {
        let mut session = AgentSession::new(config, state);
        session.last_update = unacked.map(|u| (u.key, u.update));
        session
    }

    /// The last finished job's update while the aggregator has neither acknowledged nor
    /// refused it, for a driver that persists it (see [`AgentSession::resume`]).
    pub fn unacked_update(&self) -> Option<UnackedUpdate> {
        self.last_update
            .as_ref()
            .map(|(key, update)| UnackedUpdate {
                key: key.clone(),
                update: update.clone(),
            })
    }

    /// The agent process restarted: everything but what an agent persists (its kept maps and
    /// adapter) is forgotten, including a running job and the outbox.
    pub fn restart(&mut self) {
        *self = AgentSession::with_shared(self.config.clone(), Arc::clone(&self.state));
    }

    /// The device's static settings (the simulator evaluates a device's model with its
    /// pruning criterion and limits).
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// What the device keeps across rounds, for observers (reports, evaluations). A driver
    /// never needs it to run a round: a `Train` command carries the state its job starts from.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    pub fn is_training(&self) -> bool {
        matches!(self.phase, Phase::Training(_))
    }

    /// Whether a job (running, or cancelled at its deadline and not yet reported done)
    /// occupies the device.
    fn busy(&self) -> Option<RoundId> {
        match self.phase {
            Phase::Training(r) | Phase::Cancelled(r) => Some(r),
            _ => None,
        }
    }

    /// Messages waiting for the next connection.
    pub fn outbox(&self) -> &[Message] {
        &self.outbox
    }

    /// Feed one event.
    pub fn handle(&mut self, now: Timestamp, event: AgentEvent) -> Vec<AgentCommand> {
        match event {
            AgentEvent::Connected => {
                self.connected = true;
                // A job in flight survives a reconnection: its result is still sent, and the
                // aggregator decides whether the round is open.
                if self.busy().is_none() {
                    self.phase = Phase::Joining;
                }
                vec![AgentCommand::Send(Message::Join(Join {
                    protocol_version: PROTOCOL_VERSION,
                    device_id: self.config.device_id,
                    capabilities: self.config.capabilities.clone(),
                }))]
            }
            AgentEvent::Disconnected => {
                self.connected = false;
                // A job in flight keeps running; its update is sent after reconnecting only if
                // the round is still open (the aggregator decides).
                if self.busy().is_none() {
                    self.phase = Phase::Disconnected;
                }
                self.next_heartbeat = None;
                vec![]
            }
            AgentEvent::Undelivered(msg) => {
                if matches!(msg, Message::Update(_) | Message::RoundFailed(_)) {
                    self.keep(msg);
                }
                vec![]
            }
            AgentEvent::Message { msg, bytes } => self.on_message(now, msg, bytes),
            AgentEvent::JobDone(result) => self.on_job_done(now, result),
        }
    }

    /// An update or failure report: sent now, or kept for the next `Welcome` while the
    /// transport is down.
    fn answer(&mut self, msg: Message) -> Vec<AgentCommand> {
        if self.connected {
            vec![AgentCommand::Send(msg)]
        } else {
            self.keep(msg);
            vec![]
        }
    }

    /// Puts `msg` in the outbox, dropping the oldest message past [`MAX_OUTBOX`].
    fn keep(&mut self, msg: Message) {
        if self.outbox.len() >= MAX_OUTBOX {
            let dropped = self.outbox.remove(0);
            tracing::warn!(
                kind = dropped.kind(),
                "outbox full; the oldest answer is dropped"
            );
        }
        self.outbox.push(msg);
    }

    fn on_message(&mut self, now: Timestamp, m: Message, bytes: u64) -> Vec<AgentCommand> {
        match m {
            Message::Welcome(w) => {
                if w.protocol_version != PROTOCOL_VERSION {
                    return vec![AgentCommand::Close(format!(
                        "aggregator speaks protocol {}, this agent {}",
                        w.protocol_version, PROTOCOL_VERSION
                    ))];
                }
                self.alpha = w.lora_alpha as f64;
                // From the network (see the module docs). A Welcome handled after the
                // transport went down (read before the drop was noticed) schedules nothing:
                // heartbeats start with the next connection's.
                self.heartbeat_ms = w.kept_heartbeat_ms();
                if self.heartbeat_ms != w.heartbeat_interval_ms {
                    tracing::warn!(
                        asked_ms = w.heartbeat_interval_ms,
                        kept_ms = self.heartbeat_ms,
                        "heartbeat interval raised to the shortest a device keeps"
                    );
                }
                self.next_heartbeat = (self.heartbeat_ms > 0 && self.connected)
                    .then(|| now.plus_ms(self.heartbeat_ms));
                if self.phase == Phase::Joining {
                    self.phase = Phase::Idle;
                }
                std::mem::take(&mut self.outbox)
                    .into_iter()
                    .map(AgentCommand::Send)
                    .collect()
            }
            Message::RoundConfig(rc) => self.on_round(now, rc, bytes),
            Message::Ack(a) => {
                let mut ours = false;
                if self.phase == Phase::AwaitingAck(a.round) {
                    self.phase = Phase::Idle;
                    ours = true;
                }
                if self
                    .last_update
                    .as_ref()
                    .is_some_and(|(k, _)| k.round == a.round)
                {
                    self.last_update = None;
                    ours = true;
                }
                if ours && self.acked_rounds.last() != Some(&a.round) {
                    self.acked_rounds.push(a.round);
                }
                vec![]
            }
            Message::Reject(r) => {
                self.rejects_total += 1;
                if self.rejects.len() == KEPT_REJECTS {
                    self.rejects.pop_front();
                }
                self.rejects.push_back(
                    r.reason
                        .to_string()
                        .chars()
                        .take(REJECT_REASON_CHARS)
                        .collect(),
                );
                if r.round.is_some() && self.last_update.as_ref().map(|(k, _)| k.round) == r.round {
                    self.last_update = None;
                }
                use protocol::RejectReason as R;
                match r.reason {
                    R::VersionMismatch { .. }
                    | R::UnknownDevice(_)
                    | R::IdentityMismatch { .. } => {
                        vec![AgentCommand::Close(format!(
                            "refused by the aggregator: {}",
                            r.reason
                        ))]
                    }
                    _ => {
                        if matches!(self.phase, Phase::AwaitingAck(_)) {
                            self.phase = Phase::Idle;
                        }
                        vec![]
                    }
                }
            }
            Message::Bye(b) => {
                let why = match b.reason {
                    ByeReason::Finished => "training finished",
                    ByeReason::ServerShutdown => "the aggregator shut down",
                    ByeReason::Leaving => "the aggregator asked us to leave",
                };
                vec![AgentCommand::Close(why.into())]
            }
            other => {
                tracing::warn!(kind = other.kind(), "unexpected message at the device");
                vec![]
            }
        }
    }

    fn on_round(&mut self, now: Timestamp, rc: RoundConfig, bytes: u64) -> Vec<AgentCommand> {
        if let Some(r) = self.busy() {
            // The aggregator re-sends the configuration to a selected device that rejoins
            // (after a network drop or its own restart). The same job keeps running; a
            // different one (another round, or the same round re-planned) waits for it, so a
            // device never trains two jobs at once.
            if self.running.as_ref().map(|(k, _)| k) == Some(&JobKey::of(&rc)) {
                tracing::debug!(round = %r, "round configuration re-sent; the job continues");
            } else {
                tracing::info!(
                    busy = %r,
                    new = %rc.round,
                    "new round configuration while training: it starts when the running job ends"
                );
                self.queued = Some(Queued {
                    received: now,
                    config: rc,
                    bytes,
                });
            }
            return vec![];
        }
        if let Some((key, update)) = &self.last_update {
            if *key == JobKey::of(&rc) {
                tracing::debug!(round = %rc.round, "configuration re-sent for a finished job; update sent again");
                let update = update.clone();
                self.phase = Phase::AwaitingAck(rc.round);
                return self.answer(Message::Update(update));
            }
        }
        // Caps first: nothing is sized or allocated for a configuration over them.
        if let Err(why) = self.config.limits.check(&rc, self.alpha) {
            tracing::warn!(round = %rc.round, %why, "round configuration refused");
            self.phase = Phase::Idle;
            return self.answer(Message::RoundFailed(RoundFailed {
                round: rc.round,
                reason: FailReason::Error(format!("round configuration refused: {why}")),
            }));
        }
        // The round trains keeping its activations when that fits in the device's RAM, else
        // recomputing blocks; one that fits neither way is refused before it starts (the
        // aggregator's feasibility filter learns from the report).
        let ram = self.config.capabilities.ram_bytes;
        let (rank, batch) = (rc.arm.rank as usize, rc.batch_size as usize);
        let estimate = |mode| {
            self.config
                .costs
                .round_memory(&self.state.kept, rank, batch, mode)
        };
        let memory = match MemoryMode::fitting(estimate, ram) {
            Ok(mode) => mode,
            Err(needed) => {
                tracing::warn!(round = %rc.round, needed, ram, "the round does not fit in RAM");
                self.phase = Phase::Idle;
                return self.answer(Message::RoundFailed(RoundFailed {
                    round: rc.round,
                    reason: FailReason::OutOfMemory {
                        needed_bytes: needed,
                        ram_bytes: ram,
                    },
                }));
            }
        };
        if memory.recomputes() {
            tracing::info!(round = %rc.round, ram, "activations do not fit in RAM: recomputing blocks");
        }
        self.phase = Phase::Training(rc.round);
        self.running = Some((JobKey::of(&rc), bytes));
        self.steps_done = 0;
        let deadline = now.plus_ms(rc.deadline_ms);
        self.deadline = Some(deadline);
        self.job_steps = rc.local_steps;
        vec![AgentCommand::Train {
            job: Box::new(TrainJob {
                round: rc.round,
                arm: rc.arm,
                target_sparsity: rc.target_sparsity,
                global: rc.global,
                local_steps: rc.local_steps as usize,
                prune_every: rc.prune_interval_steps.max(1) as usize,
                lr: rc.learning_rate as f64,
                batch: rc.batch_size as usize,
                seed: rc.seed,
                alpha: self.alpha,
                deadline,
                rank_pruning: rc.options.rank_pruning,
                memory,
            }),
            state: Arc::clone(&self.state),
        }]
    }

    fn on_job_done(
        &mut self,
        now: Timestamp,
        result: Result<JobOutcome, FailReason>,
    ) -> Vec<AgentCommand> {
        let (round, cancelled) = match self.phase {
            Phase::Training(r) => (r, false),
            Phase::Cancelled(r) => (r, true),
            _ => return vec![],
        };
        let running = self.running.take();
        self.deadline = None;
        if let Some(next) = self.queued.take() {
            tracing::info!(
                superseded = %round,
                next = %next.config.round,
                "the finished job was superseded; its result is dropped"
            );
            self.phase = Phase::Idle;
            // The new job's deadline still counts from when its configuration arrived.
            let elapsed = now.0.saturating_sub(next.received.0);
            if elapsed >= next.config.deadline_ms {
                tracing::warn!(round = %next.config.round, "its deadline passed while the previous job ran");
                return self.answer(Message::RoundFailed(RoundFailed {
                    round: next.config.round,
                    reason: FailReason::Error(
                        "the round's deadline passed while the previous job was still running"
                            .into(),
                    ),
                }));
            }
            let config = RoundConfig {
                deadline_ms: next.config.deadline_ms.saturating_sub(elapsed),
                ..next.config
            };
            return self.on_round(now, config, next.bytes);
        }
        if cancelled {
            tracing::info!(%round, "a job stopped at its deadline ended; its result is dropped");
            self.phase = Phase::Idle;
            return vec![];
        }
        match result {
            Ok(out) if out.round == round => {
                let (rank, alpha, factors) = out.adapter;
                // The factors move into the update; a device keeping its adapter copies them.
                let keep = self
                    .config
                    .keep_adapter
                    .then(|| (rank, alpha, factors.clone()));
                let (key, config_bytes) = running.unzip();
                let mut msg = Message::Update(Update {
                    round,
                    adapter: wire::adapter_to_wire(rank, alpha, factors, self.config.f16_updates),
                    kept: out.kept.clone(),
                    stats: UpdateStats {
                        bytes_down: config_bytes.unwrap_or(0),
                        ..out.stats
                    },
                });
                let bytes_up = self.upload_bytes(&msg); // fixed-width: its value keeps the length
                if let Message::Update(update) = &mut msg {
                    update.stats.bytes_up = bytes_up;
                    self.last_update = key.map(|k| (k, update.clone()));
                }
                let state = Arc::make_mut(&mut self.state);
                state.kept = out.kept;
                state.adapter = keep;
                state.importance = out.importance;
                self.phase = Phase::AwaitingAck(round);
                self.answer(msg)
            }
            Ok(_) => {
                self.phase = Phase::Idle;
                vec![]
            }
            Err(reason) => {
                tracing::warn!(%round, error = %reason, "local round failed");
                self.phase = Phase::Idle;
                self.answer(Message::RoundFailed(RoundFailed { round, reason }))
            }
        }
    }

    /// An update's wire size as the costs count it, its frame counted without encoding a copy.
    fn upload_bytes(&self, msg: &Message) -> u64 {
        let frame_len = protocol::frame_len(msg).unwrap_or(0);
        self.config.costs.wire_bytes(msg, frame_len) as u64
    }

    /// Progress of the running job (for heartbeats).
    pub fn set_progress(&mut self, steps_done: u32) {
        self.steps_done = steps_done;
    }

    /// The next time the session wants [`AgentSession::handle_timeout`]: the next heartbeat or
    /// the running job's deadline, whichever comes first.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let deadline = self.deadline.filter(|_| self.is_training());
        // Heartbeats are due only over a live transport ([`Self::heartbeat`] sends none
        // otherwise): a timer it would not clear must not be reported, or a driver that sleeps
        // until the next timer would spin.
        let heartbeat = self.next_heartbeat.filter(|_| self.connected);
        match (heartbeat, deadline) {
            (Some(h), Some(d)) => Some(h.min(d)),
            (h, d) => h.or(d),
        }
    }

    /// Timers: the running job's deadline (the round is reported failed and the job told to
    /// stop; its late result is dropped), and heartbeats while connected.
    pub fn handle_timeout(&mut self, now: Timestamp) -> Vec<AgentCommand> {
        let mut cmds = Vec::new();
        if let (Phase::Training(round), Some(deadline)) = (self.phase, self.deadline) {
            if now >= deadline {
                tracing::warn!(%round, steps_done = self.steps_done, "the round's deadline passed during training");
                self.phase = Phase::Cancelled(round);
                self.deadline = None;
                cmds.push(AgentCommand::Cancel(round));
                let reason = FailReason::Error(format!(
                    "the round's deadline passed after {} of {} local steps",
                    self.steps_done, self.job_steps
                ));
                cmds.extend(self.answer(Message::RoundFailed(RoundFailed { round, reason })));
            }
        }
        cmds.extend(self.heartbeat(now));
        cmds
    }

    /// A heartbeat when one is due and the transport is up.
    fn heartbeat(&mut self, now: Timestamp) -> Vec<AgentCommand> {
        match self.next_heartbeat {
            Some(t) if now >= t && self.connected => {
                self.next_heartbeat = Some(now.plus_ms(self.heartbeat_ms.max(1)));
                let round = match self.phase {
                    Phase::Training(r) | Phase::Cancelled(r) | Phase::AwaitingAck(r) => Some(r),
                    _ => None,
                };
                vec![AgentCommand::Send(Message::Heartbeat(Heartbeat {
                    round,
                    steps_done: self.steps_done,
                }))]
            }
            _ => vec![],
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(test)]
mod tests;
