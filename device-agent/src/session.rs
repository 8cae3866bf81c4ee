//! The device side of the round protocol, sans-IO: [`AgentSession`] turns events (connected,
//! a message arrived, training finished, a timer fired) into commands (send a message, start
//! training, close). It reads no clock and opens no socket; the QUIC client and the simulator
//! drive it. The training itself is [`run_job`], a deterministic function of the job, the
//! device's state, the shared base model and the local data.
//!
//! State kept across rounds: the kept-index maps (pruning is cumulative and never undone) and
//! the adapter the device last trained; the frozen base is shared and re-sliced each round.

use protocol::{
    Arm, ByeReason, Capabilities, DeviceId, FailReason, GlobalSlice, Heartbeat, Join, KeptIndices,
    Message, Proj, RoundConfig, RoundFailed, RoundId, Timestamp, Update, UpdateStats,
    PROTOCOL_VERSION,
};

use crate::lora::{Adapter, HostFactors};
use crate::model::Llama;
use crate::prune::{self, Criterion, KeptIndicesExt, PruneConfig, PruneError};
use crate::train::{RoundReport, TrainConfig, Tuner};
use crate::wire;
use crate::workload::{ClsShard, LmShard, SpamTask};

/// Errors of a device round.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("round config is invalid: {0}")]
    BadConfig(String),
    #[error("global adapter slice does not fit this device: {0}")]
    BadSlice(String),
    #[error(transparent)]
    Prune(#[from] PruneError),
}

/// A device's local data: a causal-LM shard or a classification shard.
#[derive(Debug, Clone)]
pub enum LocalData {
    Lm(LmShard),
    Cls {
        task: SpamTask,
        shard: ClsShard,
        pad: u32,
    },
}

impl LocalData {
    /// Training micro-batch `i` of `batch` items.
    pub fn batch(&self, i: usize, batch: usize) -> crate::train::Batch {
        match self {
            LocalData::Lm(s) => s.batch(i, batch),
            LocalData::Cls { task, shard, pad } => {
                let n = shard.train.len().max(1);
                let refs: Vec<_> = (0..batch)
                    .map(|k| &shard.train[(i * batch + k) % n])
                    .collect();
                task.batch(&refs, *pad).0
            }
        }
    }

    /// Held-out loss (nats) and task metric (next-token accuracy for LM, label accuracy for
    /// classification).
    pub fn evaluate(&self, model: &Llama, adapter: Option<&Adapter>) -> (f64, f64) {
        match self {
            LocalData::Lm(s) => {
                let m = s.evaluate(model, adapter);
                (m.nll, m.accuracy)
            }
            LocalData::Cls { task, shard, pad } => {
                let m = task.evaluate(model, adapter, &shard.test, *pad, 8);
                (m.loss, m.accuracy)
            }
        }
    }

    /// Training items (windows or examples).
    pub fn train_len(&self) -> usize {
        match self {
            LocalData::Lm(s) => s.train.len(),
            LocalData::Cls { shard, .. } => shard.train.len(),
        }
    }

    /// Tokens per training sequence (LM windows) or the longest prompt (classification).
    pub fn seq_len(&self) -> usize {
        match self {
            LocalData::Lm(s) => s.seq_len,
            LocalData::Cls { shard, .. } => shard
                .train
                .iter()
                .map(|e| e.prompt.len())
                .max()
                .unwrap_or(1),
        }
    }
}

/// What a device remembers between rounds.
#[derive(Debug, Clone)]
pub struct DeviceState {
    pub kept: KeptIndices,
    /// The adapter the device last trained (rank, alpha, factors in wire orientation).
    pub adapter: Option<(usize, f64, Vec<HostFactors>)>,
}

impl DeviceState {
    pub fn fresh(base: &Llama) -> Self {
        DeviceState {
            kept: KeptIndices::dense(&base.config),
            adapter: None,
        }
    }
}

/// A round's work as the session hands it to its driver.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainJob {
    pub round: RoundId,
    pub arm: Arm,
    pub global: Option<GlobalSlice>,
    pub local_steps: usize,
    pub prune_every: usize,
    pub lr: f64,
    pub batch: usize,
    pub seed: u64,
    pub alpha: f64,
    /// When the round's deadline falls, in the driver's clock.
    pub deadline: Timestamp,
}

/// Static settings of a device.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: DeviceId,
    pub capabilities: Capabilities,
    pub criterion: Criterion,
    pub prune: PruneConfig,
    /// Send adapter factors in half precision.
    pub f16_updates: bool,
}

/// What a finished job produced.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub round: RoundId,
    pub kept: KeptIndices,
    pub adapter: (usize, f64, Vec<HostFactors>),
    pub stats: UpdateStats,
    pub report: RoundReport,
    /// Held-out metric (accuracy) after the round, for reports.
    pub metric_post: f64,
}

/// Inputs of the session.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// The transport is up (send Join).
    Connected,
    Message(Message),
    /// The driver finished a job (with compute time and peak memory filled in by the driver),
    /// or could not run it (out of memory, an error); a failure is reported to the aggregator.
    JobDone(Result<JobOutcome, FailReason>),
    /// The transport went away.
    Disconnected,
}

/// Outputs of the session.
#[derive(Debug, Clone)]
pub enum AgentCommand {
    Send(Message),
    Train(Box<TrainJob>),
    /// Stop: the aggregator said goodbye or refused us for good.
    Close(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Disconnected,
    Joining,
    Idle,
    Training(RoundId),
    AwaitingAck(RoundId),
}

/// The parts of a round configuration that define the job (all but the deadline, which is
/// relative to receipt, and the global slice's factor values, which a re-sent configuration
/// takes from the same aggregator state).
#[derive(Debug, Clone, PartialEq)]
struct JobKey {
    round: RoundId,
    arm: Arm,
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

/// The sans-IO device session.
#[derive(Debug)]
pub struct AgentSession {
    pub config: AgentConfig,
    pub state: DeviceState,
    phase: Phase,
    alpha: f64,
    heartbeat_ms: u64,
    next_heartbeat: Option<Timestamp>,
    steps_done: u32,
    /// What identifies the running job's configuration (a re-sent copy is a duplicate).
    running: Option<JobKey>,
    /// A different configuration that arrived while a job ran, with when it arrived: it starts
    /// when that job ends, and the superseded job's result is dropped.
    queued: Option<(Timestamp, RoundConfig)>,
    /// The last finished job's update until the aggregator acknowledges or refuses it: a
    /// configuration re-sent for that same job (the device rejoined before the update arrived)
    /// is answered with this update again instead of a second training.
    last_update: Option<(JobKey, Update)>,
    /// Rounds completed and acknowledged.
    pub acked_rounds: Vec<RoundId>,
    /// Reasons of rejects received.
    pub rejects: Vec<String>,
}

impl AgentSession {
    pub fn new(config: AgentConfig, state: DeviceState) -> Self {
        AgentSession {
            config,
            state,
            phase: Phase::Disconnected,
            alpha: 32.0,
            heartbeat_ms: 0,
            next_heartbeat: None,
            steps_done: 0,
            running: None,
            queued: None,
            last_update: None,
            acked_rounds: Vec::new(),
            rejects: Vec::new(),
        }
    }

    pub fn is_training(&self) -> bool {
        matches!(self.phase, Phase::Training(_))
    }

    /// Feed one event.
    pub fn handle(&mut self, now: Timestamp, event: AgentEvent) -> Vec<AgentCommand> {
        match event {
            AgentEvent::Connected => {
                // A job in flight survives a reconnection: its result is still sent, and the
                // aggregator decides whether the round is open.
                if !matches!(self.phase, Phase::Training(_)) {
                    self.phase = Phase::Joining;
                }
                vec![AgentCommand::Send(Message::Join(Join {
                    protocol_version: PROTOCOL_VERSION,
                    device_id: self.config.device_id,
                    capabilities: self.config.capabilities.clone(),
                }))]
            }
            AgentEvent::Disconnected => {
                // A job in flight keeps running; its update is sent after reconnecting only if
                // the round is still open (the aggregator decides).
                if !matches!(self.phase, Phase::Training(_)) {
                    self.phase = Phase::Disconnected;
                }
                self.next_heartbeat = None;
                vec![]
            }
            AgentEvent::Message(m) => self.on_message(now, m),
            AgentEvent::JobDone(result) => self.on_job_done(now, result),
        }
    }

    fn on_message(&mut self, now: Timestamp, m: Message) -> Vec<AgentCommand> {
        match m {
            Message::Welcome(w) => {
                if w.protocol_version != PROTOCOL_VERSION {
                    return vec![AgentCommand::Close(format!(
                        "aggregator speaks protocol {}, this agent {}",
                        w.protocol_version, PROTOCOL_VERSION
                    ))];
                }
                self.alpha = w.lora_alpha as f64;
                self.heartbeat_ms = w.heartbeat_interval_ms;
                self.next_heartbeat = (w.heartbeat_interval_ms > 0)
                    .then(|| Timestamp(now.0 + w.heartbeat_interval_ms));
                if self.phase == Phase::Joining {
                    self.phase = Phase::Idle;
                }
                vec![]
            }
            Message::RoundConfig(rc) => self.on_round(now, rc),
            Message::Ack(a) => {
                if self.phase == Phase::AwaitingAck(a.round) {
                    self.phase = Phase::Idle;
                }
                if self
                    .last_update
                    .as_ref()
                    .is_some_and(|(k, _)| k.round == a.round)
                {
                    self.last_update = None;
                }
                self.acked_rounds.push(a.round);
                vec![]
            }
            Message::Reject(r) => {
                self.rejects.push(r.reason.to_string());
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

    fn on_round(&mut self, now: Timestamp, rc: RoundConfig) -> Vec<AgentCommand> {
        if let Phase::Training(r) = self.phase {
            // The aggregator re-sends the configuration to a selected device that rejoins
            // (after a network drop or its own restart). The same job keeps running; a
            // different one (another round, or the same round re-planned) waits for it, so a
            // device never trains two jobs at once.
            if self.running.as_ref() == Some(&JobKey::of(&rc)) {
                tracing::debug!(round = %r, "round configuration re-sent; the job continues");
            } else {
                tracing::info!(
                    busy = %r,
                    new = %rc.round,
                    "new round configuration while training: it starts when the running job ends"
                );
                self.queued = Some((now, rc));
            }
            return vec![];
        }
        if let Some((key, update)) = &self.last_update {
            if *key == JobKey::of(&rc) {
                tracing::debug!(round = %rc.round, "configuration re-sent for a finished job; update sent again");
                self.phase = Phase::AwaitingAck(rc.round);
                return vec![AgentCommand::Send(Message::Update(update.clone()))];
            }
        }
        let ok = rc.arm.prune_ratio.is_finite()
            && (0.0..1.0).contains(&rc.arm.prune_ratio)
            && rc.arm.rank > 0
            && rc.batch_size > 0;
        if !ok {
            tracing::warn!(round = %rc.round, "invalid round config refused");
            return vec![];
        }
        self.phase = Phase::Training(rc.round);
        self.running = Some(JobKey::of(&rc));
        self.steps_done = 0;
        vec![AgentCommand::Train(Box::new(TrainJob {
            round: rc.round,
            arm: rc.arm,
            global: rc.global,
            local_steps: rc.local_steps as usize,
            prune_every: rc.prune_interval_steps.max(1) as usize,
            lr: rc.learning_rate as f64,
            batch: rc.batch_size as usize,
            seed: rc.seed,
            alpha: self.alpha,
            deadline: Timestamp(now.0.saturating_add(rc.deadline_ms)),
        }))]
    }

    fn on_job_done(
        &mut self,
        now: Timestamp,
        result: Result<JobOutcome, FailReason>,
    ) -> Vec<AgentCommand> {
        let Phase::Training(round) = self.phase else {
            return vec![];
        };
        let key = self.running.take();
        if let Some((received, next)) = self.queued.take() {
            tracing::info!(
                superseded = %round,
                next = %next.round,
                "the finished job was superseded; its result is dropped"
            );
            self.phase = Phase::Idle;
            // The new job's deadline still counts from when its configuration arrived.
            let elapsed = now.0.saturating_sub(received.0);
            if elapsed >= next.deadline_ms {
                tracing::warn!(round = %next.round, "its deadline passed while the previous job ran");
                return vec![AgentCommand::Send(Message::RoundFailed(RoundFailed {
                    round: next.round,
                    reason: FailReason::Error(
                        "the round's deadline passed while the previous job was still running"
                            .into(),
                    ),
                }))];
            }
            let next = RoundConfig {
                deadline_ms: next.deadline_ms.saturating_sub(elapsed),
                ..next
            };
            return self.on_round(now, next);
        }
        match result {
            Ok(out) if out.round == round => {
                self.state.kept = out.kept.clone();
                let (rank, alpha, factors) = out.adapter.clone();
                let update = Update {
                    round,
                    adapter: wire::adapter_to_wire(rank, alpha, &factors, self.config.f16_updates),
                    kept: out.kept.clone(),
                    stats: out.stats,
                };
                self.state.adapter = Some(out.adapter);
                self.phase = Phase::AwaitingAck(round);
                self.last_update = key.map(|k| (k, update.clone()));
                vec![AgentCommand::Send(Message::Update(update))]
            }
            Ok(_) => {
                self.phase = Phase::Idle;
                vec![]
            }
            Err(reason) => {
                tracing::warn!(%round, error = %reason, "local round failed");
                self.phase = Phase::Idle;
                vec![AgentCommand::Send(Message::RoundFailed(RoundFailed {
                    round,
                    reason,
                }))]
            }
        }
    }

    /// Progress of the running job (for heartbeats).
    pub fn set_progress(&mut self, steps_done: u32) {
        self.steps_done = steps_done;
    }

    /// The next time the session wants [`AgentSession::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_heartbeat
    }

    /// Timers: heartbeats while connected.
    pub fn handle_timeout(&mut self, now: Timestamp) -> Vec<AgentCommand> {
        match self.next_heartbeat {
            Some(t) if now >= t && self.phase != Phase::Disconnected => {
                self.next_heartbeat = Some(Timestamp(now.0 + self.heartbeat_ms.max(1)));
                let round = match self.phase {
                    Phase::Training(r) | Phase::AwaitingAck(r) => Some(r),
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

/// Build the device's starting adapter for a job: the global slice cut to the device's own
/// kept maps (which may be a subset of the maps the server cut it for) with padded components
/// re-initialised, else the device's own adapter resized to the arm's rank, else fresh.
pub fn start_adapter(
    job: &TrainJob,
    state: &DeviceState,
    base: &Llama,
) -> Result<Adapter, SessionError> {
    let rank = job.arm.rank as usize;
    let dense = &base.config;
    let own_cfg = {
        let mut c = dense.clone();
        c.blocks = state.kept.shapes(dense);
        c
    };
    match &job.global {
        Some(g) => {
            let slice_kept = &g.kept;
            slice_kept
                .validate(dense)
                .map_err(|e| SessionError::BadSlice(e.to_string()))?;
            let mut cfg = dense.clone();
            cfg.blocks = slice_kept.shapes(dense);
            let host = wire::adapter_from_wire(&g.adapter);
            let r = g.adapter.rank as usize;
            let ad = Adapter::from_host(&cfg, r, g.adapter.alpha as f64, &host, &base.device)
                .map_err(|e| SessionError::BadSlice(e.to_string()))?;
            // Cut to the device's own kept maps.
            let hd = dense.head_dim;
            let mut blocks = Vec::with_capacity(ad.blocks.len());
            for (l, blk) in ad.blocks.into_iter().enumerate() {
                let (o, n) = (&slice_kept.blocks[l], &state.kept.blocks[l]);
                let subset = |a: &[u32], b: &[u32]| b.iter().all(|x| a.binary_search(x).is_ok());
                if !(subset(&o.query_heads, &n.query_heads)
                    && subset(&o.mlp_channels, &n.mlp_channels)
                    && subset(&o.kv_heads, &n.kv_heads))
                {
                    return Err(SessionError::BadSlice(format!(
                        "block {l}: the slice lacks units this device kept"
                    )));
                }
                blocks.push(
                    Proj::ALL
                        .iter()
                        .zip(blk)
                        .map(|(&p, f)| crate::lora::LoraFactors {
                            a: prune::slice_factor(f.a, p, true, o, n, hd),
                            b: prune::slice_factor(f.b, p, false, o, n, hd),
                        })
                        .collect(),
                );
            }
            let ad = Adapter {
                rank: r,
                alpha: g.adapter.alpha as f64,
                blocks,
            };
            // Components past `filled_rank` are zero padding: re-initialise them.
            let filled = (g.filled_rank as usize).min(r);
            let ad = if filled < r {
                ad.resize(filled.max(1), job.seed).resize(r, job.seed ^ 1)
            } else {
                ad
            };
            Ok(if ad.rank != rank {
                ad.resize(rank, job.seed)
            } else {
                ad
            })
        }
        None => match &state.adapter {
            Some((r, alpha, host)) => {
                let ad = Adapter::from_host(&own_cfg, *r, *alpha, host, &base.device)
                    .map_err(|e| SessionError::BadSlice(e.to_string()))?;
                Ok(ad.resize(rank, job.seed))
            }
            None => Ok(Adapter::new(
                &own_cfg,
                rank,
                job.alpha,
                job.seed,
                &base.device,
            )),
        },
    }
}

/// Run one local round: start adapter, held-out loss before, prune-and-tune, loss after.
/// Compute time and peak memory are left for the driver to fill in (they are measurements,
/// or virtual in the simulator).
pub fn run_job(
    job: &TrainJob,
    state: &DeviceState,
    base: &Llama,
    data: &LocalData,
    agent: &AgentConfig,
    mut on_step: impl FnMut(usize),
) -> Result<JobOutcome, SessionError> {
    if job.local_steps == 0 || job.batch == 0 {
        return Err(SessionError::BadConfig(
            "local_steps and batch_size must be positive".into(),
        ));
    }
    let adapter = start_adapter(job, state, base)?;
    let cfg = TrainConfig {
        lr: job.lr,
        prune_every: job.prune_every,
        criterion: agent.criterion,
        prune: agent.prune.clone(),
        seed: job.seed,
        warmup_steps: (job.local_steps / 10).max(1),
        ..TrainConfig::default()
    };
    let mut tuner = Tuner::new(base, state.kept.clone(), adapter, cfg)?;
    let (loss_pre, _) = data.evaluate(&tuner.model, Some(&tuner.adapter));
    let n = data.train_len().max(1);
    // Round-local batch order: a seeded offset into the shard.
    let offset = (job.seed % n as u64) as usize;
    let mut step = 0;
    let report = tuner.run_round(
        base,
        job.local_steps,
        job.arm.prune_ratio,
        |i| data.batch(offset + i, job.batch),
        |_| {
            step += 1;
            on_step(step);
        },
    )?;
    let (loss_post, metric_post) = data.evaluate(&tuner.model, Some(&tuner.adapter));
    let c = &tuner.model.config;
    let stats = UpdateStats {
        loss_pre: loss_pre as f32,
        loss_post: loss_post as f32,
        sparsity: c.sparsity() as f32,
        param_count: c.total_params() as u64,
        compute_ms: 0,
        bytes_down: 0,
        bytes_up: 0,
        peak_mem_bytes: crate::cost::train_memory(c, tuner.adapter.rank, job.batch, data.seq_len())
            .total,
        samples: (job.local_steps * job.batch) as u64,
        steps: job.local_steps as u32,
    };
    Ok(JobOutcome {
        round: job.round,
        kept: tuner.kept.clone(),
        adapter: (
            tuner.adapter.rank,
            tuner.adapter.alpha,
            tuner.adapter.to_host(),
        ),
        stats,
        report,
        metric_post,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use protocol::{ModelDims, Welcome};

    fn session() -> AgentSession {
        let cfg = ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true);
        let config = AgentConfig {
            device_id: DeviceId(3),
            capabilities: Capabilities {
                ram_bytes: 1 << 30,
                backend: "flex".into(),
                bench_score: None,
            },
            criterion: Criterion::LoraGradient,
            prune: PruneConfig::for_layers(4),
            f16_updates: false,
        };
        let state = DeviceState {
            kept: KeptIndices::dense(&cfg),
            adapter: None,
        };
        let mut s = AgentSession::new(config, state);
        s.handle(Timestamp(0), AgentEvent::Connected);
        s.handle(Timestamp(0), AgentEvent::Message(welcome()));
        s
    }

    fn welcome() -> Message {
        Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            device_id: DeviceId(3),
            model: ModelDims::SMOLLM2_135M,
            lora_alpha: 16.0,
            heartbeat_interval_ms: 0,
        })
    }

    fn config(round: u64, rank: u32, deadline_ms: u64) -> Message {
        Message::RoundConfig(RoundConfig {
            round: RoundId(round),
            arm: Arm {
                prune_ratio: 0.2,
                rank,
            },
            global: None,
            deadline_ms,
            local_steps: 4,
            prune_interval_steps: 2,
            learning_rate: 1e-3,
            batch_size: 2,
            seed: 9,
        })
    }

    fn failed() -> AgentEvent {
        AgentEvent::JobDone(Err(FailReason::Error("test".into())))
    }

    fn trains(cmds: &[AgentCommand]) -> Vec<(RoundId, u32, Timestamp)> {
        cmds.iter()
            .filter_map(|c| match c {
                AgentCommand::Train(j) => Some((j.round, j.arm.rank, j.deadline)),
                _ => None,
            })
            .collect()
    }

    fn failures(cmds: &[AgentCommand]) -> Vec<RoundId> {
        cmds.iter()
            .filter_map(|c| match c {
                AgentCommand::Send(Message::RoundFailed(f)) => Some(f.round),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_job_survives_a_reconnection_and_a_re_sent_configuration() {
        let mut s = session();
        let c = s.handle(Timestamp(10), AgentEvent::Message(config(1, 8, 60_000)));
        assert_eq!(trains(&c).len(), 1);
        assert!(s.handle(Timestamp(20), AgentEvent::Disconnected).is_empty());
        let c = s.handle(Timestamp(30), AgentEvent::Connected);
        assert!(matches!(
            c.as_slice(),
            [AgentCommand::Send(Message::Join(_))]
        ));
        assert!(
            s.is_training(),
            "reconnecting must not forget the running job"
        );
        s.handle(Timestamp(31), AgentEvent::Message(welcome()));
        // The aggregator re-sends the same job with the deadline left: no second job.
        let c = s.handle(Timestamp(32), AgentEvent::Message(config(1, 8, 40_000)));
        assert!(
            trains(&c).is_empty(),
            "a re-sent configuration must not start a second job"
        );
        // The running job's result is still reported for its round.
        let c = s.handle(Timestamp(50), failed());
        assert_eq!(failures(&c), vec![RoundId(1)]);
        assert!(!s.is_training());
    }

    #[test]
    fn a_different_configuration_waits_for_the_running_job_and_supersedes_it() {
        let mut s = session();
        s.handle(Timestamp(10), AgentEvent::Message(config(1, 8, 60_000)));
        // The same round re-planned (another rank), e.g. by an aggregator resumed from a
        // checkpoint: queued, not started alongside.
        let c = s.handle(Timestamp(100), AgentEvent::Message(config(1, 4, 30_000)));
        assert!(trains(&c).is_empty());
        // When the running job ends, its result is dropped and the queued job starts, its
        // deadline still counted from when its configuration arrived.
        let c = s.handle(Timestamp(1_100), failed());
        assert!(
            failures(&c).is_empty(),
            "the superseded job must not be reported"
        );
        assert_eq!(
            trains(&c),
            vec![(RoundId(1), 4, Timestamp(1_100 + 30_000 - 1_000))]
        );
        assert!(s.is_training());
        let c = s.handle(Timestamp(2_000), failed());
        assert_eq!(failures(&c), vec![RoundId(1)]);
    }

    fn finished(round: u64) -> AgentEvent {
        let cfg = ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true);
        AgentEvent::JobDone(Ok(JobOutcome {
            round: RoundId(round),
            kept: KeptIndices::dense(&cfg),
            adapter: (8, 16.0, Vec::new()),
            stats: UpdateStats {
                loss_pre: 2.0,
                loss_post: 1.5,
                sparsity: 0.2,
                param_count: 1000,
                compute_ms: 5,
                bytes_down: 0,
                bytes_up: 0,
                peak_mem_bytes: 1 << 20,
                samples: 8,
                steps: 4,
            },
            report: crate::train::RoundReport {
                steps: Vec::new(),
                sparsity_before: 0.0,
                sparsity_after: 0.2,
                prune_events: Vec::new(),
            },
            metric_post: 1.5,
        }))
    }

    fn updates(cmds: &[AgentCommand]) -> Vec<RoundId> {
        cmds.iter()
            .filter_map(|c| match c {
                AgentCommand::Send(Message::Update(u)) => Some(u.round),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_job_finished_while_disconnected_is_answered_not_trained_again() {
        let mut s = session();
        s.handle(Timestamp(10), AgentEvent::Message(config(1, 8, 60_000)));
        s.handle(Timestamp(20), AgentEvent::Disconnected);
        // The job ends while the link is down (the client keeps the update in its outbox).
        let c = s.handle(Timestamp(30), finished(1));
        assert_eq!(updates(&c), vec![RoundId(1)]);
        s.handle(Timestamp(40), AgentEvent::Connected);
        s.handle(Timestamp(41), AgentEvent::Message(welcome()));
        // The aggregator has not seen the update yet and re-sends the configuration: the
        // device answers with the same update instead of training the job a second time.
        let c = s.handle(Timestamp(42), AgentEvent::Message(config(1, 8, 50_000)));
        assert!(trains(&c).is_empty());
        assert_eq!(updates(&c), vec![RoundId(1)]);
        // Once acknowledged, the next round's configuration trains normally.
        s.handle(
            Timestamp(50),
            AgentEvent::Message(Message::Ack(protocol::Ack { round: RoundId(1) })),
        );
        let c = s.handle(Timestamp(60), AgentEvent::Message(config(2, 8, 60_000)));
        assert_eq!(trains(&c).len(), 1);
    }

    #[test]
    fn a_queued_configuration_whose_deadline_passed_is_reported_failed() {
        let mut s = session();
        s.handle(Timestamp(0), AgentEvent::Message(config(1, 8, 60_000)));
        s.handle(Timestamp(1_000), AgentEvent::Message(config(2, 8, 5_000)));
        // Round 1's job ends 10 s after round 2's configuration arrived (5 s deadline).
        let c = s.handle(Timestamp(11_000), finished(1));
        assert!(updates(&c).is_empty() && trains(&c).is_empty());
        assert_eq!(failures(&c), vec![RoundId(2)]);
        assert!(!s.is_training());
    }
}
