//! The device agent's QUIC client: `device-agent join`. It loads the base model, prunes it in
//! place to the device's kept maps and holds only that (`model_slot.rs`), builds
//! the device's local data, connects to the aggregator with mutual TLS and drives the sans-IO
//! [`AgentSession`]: messages in (with their frame sizes), commands out, heartbeats from
//! `poll_timeout`, local rounds ([`run_job`]) on a blocking thread with the wall-clock
//! compute time measured here. A lost connection is retried with exponential back-off (a round
//! in progress keeps running and the session sends its update after re-joining);
//! `Bye(Finished)` ends the process cleanly. Round decisions (the out-of-memory pre-check
//! against the reported RAM, byte accounting, the outbox) are the session's; a local failure
//! is a `RoundFailed` with the error text.
//!
//! With `--state DIR` the device's state survives the process ([`crate::state_dir`]): the
//! session resumes from the directory's file (kept maps, adapter, the update the aggregator
//! has not acknowledged), and the file is rewritten atomically when a round ends (before its
//! update is sent), after each upload and when the aggregator answers the update. A file that
//! cannot be used stops `join` (unless `--fresh-state`), and so does a write that fails: the
//! agent never goes on with state it could not persist. Each load and save prints a `state:`
//! line on stdout with the kept maps' digest.
//!
//! `local.rs` loads what the device trains with (model, local data, reported RAM).
//!
//! `--model tiny` is a **test configuration**: a random-weight 4-block model (vocab 256,
//! d_model 64) and `--dataset synthetic` token streams from a fixed noisy transition rule, for
//! fast end-to-end runs without assets. The default is the real SmolLM2-135M-Instruct.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{
    ByeReason, Capabilities, DeviceId, FailReason, Message, ModelDims, RejectReason, Timestamp,
    DEFAULT_MAX_FRAME_BYTES,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;
use tokio::time::sleep_until;
use transport::TransportError;

use crate::cost::PrunedModel;
use crate::job::{run_job, LocalData};
use crate::model::Llama;
use crate::prune::{Criterion, PruneConfig};
use crate::session::{
    AgentCommand, AgentConfig, AgentEvent, AgentSession, DeviceState, JobOutcome, RoundLimits,
    TrainJob,
};
use crate::state_dir::keeper::{Opened, StateKeeper};
use crate::state_dir::{self, StateError};
use crate::wire;

mod local;
mod model_slot;

use local::{load_data, load_model};
pub use local::{machine_ram_bytes, parse_range, training_ram};
pub use local::{synthetic_shard, tiny_model};
use model_slot::{ModelSlot, Reload};

/// `device-agent join`: take part in federated rounds.
#[derive(clap::Args, Debug, Clone)]
pub struct JoinArgs {
    /// A TOML file of `join` flags (`aggregator = "10.0.0.2:7443"`, `state = "/var/lib/x"`,
    /// `fresh-state = true`); flags on the command line override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The aggregator's UDP address.
    #[arg(long)]
    pub aggregator: SocketAddr,
    /// The name on the aggregator's certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// PKI directory with ca.pem and this device's device-<id>.pem and key.
    #[arg(long)]
    pub pki: PathBuf,
    /// This device's id (must match its certificate).
    #[arg(long)]
    pub id: u64,
    /// Local data: sotu, spam, moby-dick, or synthetic (with --model tiny).
    #[arg(long, default_value = "sotu")]
    pub dataset: String,
    /// Train on your own files instead of a bundled data set: a file or a directory of
    /// `.txt`/`.md` text and `.jsonl` records (text, chat, instruction or classification; see
    /// README).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Share of your own data (`--data`) held out for evaluation (seeded; at least one item).
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
    /// SOTU: inclusive year range.
    #[arg(long, default_value = "2001-2021")]
    pub years: String,
    /// Moby-Dick: inclusive chapter range.
    #[arg(long, default_value = "3-12")]
    pub chapters: String,
    /// Spam: e-mails sampled (balanced ham/spam).
    #[arg(long, default_value_t = 240)]
    pub examples: usize,
    /// Seed of the data sample and split (default: the device id).
    #[arg(long)]
    pub data_seed: Option<u64>,
    /// Tokens per training window (LM workloads).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// A .gguf file or HF directory, or `tiny` (test configuration, see the module docs).
    /// Default: SmolLM2-135M-Instruct from the cache.
    #[arg(long)]
    pub model: Option<String>,
    /// Compute backend: flex (default CPU), ndarray, wgpu, vulkan, metal.
    #[arg(long, default_value = "flex")]
    pub backend: String,
    /// Arithmetic of the frozen base's products: fp32, bf16 (operands rounded to bf16, fp32
    /// accumulation; flex on a CPU with AVX-512-BF16, elsewhere it says so and runs fp32), int8
    /// (int8 rows with fp32 outlier columns, flex only), or auto (bf16 where the CPU has it, else
    /// fp32).
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// RAM reported to the aggregator in MiB (default: the machine's total memory).
    #[arg(long)]
    pub ram_mb: Option<u64>,
    /// What kind of board this is, reported to the aggregator (its metrics count arms per
    /// class): 1 to 32 characters of a-z, 0-9, '.', '_', '-', e.g. `jetson-nx` or `rpi5`.
    /// Default: none (the aggregator counts the device as `unknown`).
    #[arg(long, value_parser = parse_device_class)]
    pub device_class: Option<String>,
    /// Importance criterion: lora-gradient, taylor, magnitude, random.
    #[arg(long, default_value = "lora-gradient")]
    pub criterion: String,
    /// Upload adapter factors in half precision.
    #[arg(long)]
    pub f16_updates: bool,
    /// Local UDP address to bind.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub bind: SocketAddr,
    /// Seconds without any packet from the aggregator before the connection counts as lost.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_s: u64,
    /// Longest wait between reconnection attempts, in seconds (back-off doubles from 0.5 s).
    #[arg(long, default_value_t = 30)]
    pub reconnect_max_s: u64,
    /// Give up after this many failed connection attempts in a row (0: never).
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
    /// Keep the device's state (kept maps, adapter, last round) in this directory: loaded at
    /// start, so a restarted agent rejoins with its pruned model, and written atomically at
    /// each round's end and after each upload. A file there that cannot be used is an error.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// With --state: start dense even though the directory holds a state (the old file is
    /// kept as device-state.bin.old, or .old.2, .old.3, ... when that exists).
    #[arg(long, requires = "state")]
    pub fresh_state: bool,
}

/// Why `join` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{what}: {detail}")]
    Setup { what: String, detail: String },
    #[error("the aggregator refused this device: {0}")]
    Refused(String),
    #[error("the aggregator serves model {served:?}; this device holds {held:?}")]
    ModelMismatch { served: ModelDims, held: ModelDims },
    #[error("gave up after {attempts} failed connection attempts; last error: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The state directory holds a state this agent cannot use.
    #[error("{source}; to start this device dense instead, pass --fresh-state (the file is kept as {}.old, or .old.2, .old.3, ... when that exists)", state_dir::STATE_FILE)]
    StateUnusable {
        #[source]
        source: StateError,
    },
    /// The state could not be written: the agent stops (before sending an update it could not
    /// persist).
    #[error("{0}; the agent stopped rather than go on with state it could not persist")]
    StateWrite(#[source] StateError),
}

/// `--device-class`: checked here with the aggregator's own rule, so a bad name stops the agent
/// at start rather than at its first Join.
fn parse_device_class(text: &str) -> Result<String, String> {
    protocol::check_device_class(text).map(|()| text.to_string())
}

fn setup(what: impl Into<String>) -> impl FnOnce(String) -> ClientError {
    let what = what.into();
    move |detail| ClientError::Setup { what, detail }
}

/// How a `join` run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinReport {
    /// Rounds whose update the aggregator acknowledged.
    pub rounds_acked: usize,
    /// The last reject reasons received (at most `session::KEPT_REJECTS`, each cut to
    /// `session::REJECT_REASON_CHARS` characters).
    pub rejects: Vec<String>,
    /// Every reject received.
    pub rejects_total: u64,
}

/// Everything a local round needs, shared with the blocking thread that runs it.
struct Work {
    /// The device's model, sliced to its kept maps (the dense base is not kept).
    model: ModelSlot,
    /// The served model's dims this device checks against (the dense base's).
    dims: ModelDims,
    data: LocalData,
    agent: AgentConfig,
}

/// A finished local round as the driver sees it.
struct JobResult {
    round: protocol::RoundId,
    result: Result<JobOutcome, FailReason>,
}

/// The current connection: its writer half and the reader's channel.
struct Link {
    connection: quinn::Connection,
    send: quinn::SendStream,
    /// Decoded frames from the reader task, at most [`INBOUND_FRAMES`] waiting: past that the
    /// reader stops reading, and QUIC's flow control stops the aggregator.
    frames: mpsc::Receiver<Result<(Message, usize), String>>,
}

/// Decoded frames the reader task may hold ahead of the session (each up to the frame limit).
const INBOUND_FRAMES: usize = 4;

/// How long one message may take to send: a fixed allowance plus its size at 64 KiB/s (an
/// update of SmolLM2-135M at rank 16, about 23 MB, gets about 6.5 minutes). An aggregator that
/// stops reading (withholding QUIC flow-control credit while its keep-alives go on) would
/// otherwise hold the agent in one send for ever; past this the connection counts as lost.
fn send_deadline(bytes: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(bytes as u64 / 64)
}

/// Runs `device-agent join` to completion: `Ok` after `Bye(Finished)`.
pub fn run_join(args: JoinArgs) -> Result<JoinReport, ClientError> {
    transport::install_crypto_provider();
    let (base, tok) = load_model(&args)?;
    let data = load_data(&args, &base, tok.as_ref())?;
    let criterion: Criterion = args
        .criterion
        .parse()
        .map_err(|e: String| setup("--criterion")(e))?;
    let ram_bytes = local::training_ram(
        args.ram_mb
            .map(|mb| mb << 20)
            .unwrap_or_else(machine_ram_bytes),
        &base,
    );
    let agent = AgentConfig {
        device_id: DeviceId(args.id),
        capabilities: Capabilities {
            ram_bytes,
            backend: args.backend.clone(),
            bench_score: None,
            device_class: args.device_class.clone(),
        },
        criterion,
        prune: PruneConfig::for_layers(base.config.n_layers()),
        min_prune_events: crate::train::TrainConfig::default().min_prune_events,
        f16_updates: args.f16_updates,
        costs: Arc::new(PrunedModel {
            dense: base.config.clone(),
            seq_len: data.seq_len(),
        }),
        limits: RoundLimits::default(),
        keep_adapter: true,
    };
    let (session, keeper) = open_state(&args, &base, agent.clone())?;
    tracing::info!(
        device = args.id,
        dataset = %args.dataset,
        data = ?args.data,
        train_items = data.train_len(),
        ram_mb = ram_bytes >> 20,
        device_class = args.device_class.as_deref().unwrap_or(protocol::UNKNOWN_DEVICE_CLASS),
        "device ready"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| setup("async runtime")(e.to_string()))?;
    let dims = wire::dims_of(&base.config);
    let reload_args = args.clone();
    let reload: Reload = Box::new(move || {
        load_model(&reload_args)
            .map(|(m, _)| m)
            .map_err(|e| e.to_string())
    });
    // From here the agent holds only its own (possibly pruned) model.
    let model = ModelSlot::new(base, &session.state().kept, reload)
        .map_err(|e| setup("holding the model")(e))?;
    let work = Arc::new(Work {
        model,
        dims,
        data,
        agent,
    });
    runtime.block_on(drive(args, session, keeper, work))
}

/// The session: resumed from `--state DIR` when given (its kept maps, adapter and unacknowledged
/// update), else fresh and dense.
fn open_state(
    args: &JoinArgs,
    base: &Llama,
    agent: AgentConfig,
) -> Result<(AgentSession, Option<StateKeeper>), ClientError> {
    let Some(dir) = &args.state else {
        return Ok((AgentSession::new(agent, DeviceState::fresh(base)), None));
    };
    let (keeper, resume) =
        StateKeeper::open(dir, base, args.id, args.fresh_state).map_err(|source| match source {
            StateError::Io { .. } | StateError::NotADirectory { .. } => {
                ClientError::StateWrite(source)
            }
            source => ClientError::StateUnusable { source },
        })?;
    let digest = state_dir::kept_digest(&resume.state.kept);
    let path = keeper.path().display();
    match &resume.opened {
        Opened::New => println!("state: new at {path} (dense), kept {digest}"),
        Opened::Replaced { old } => println!(
            "state: fresh start at {path} (dense), kept {digest}; the previous state is in {}",
            old.display()
        ),
        Opened::Loaded { last_round } => match last_round {
            Some((round, status)) => {
                println!("state: loaded {path}: last round {round} ({status}), kept {digest}")
            }
            None => println!("state: loaded {path}: no round yet, kept {digest}"),
        },
    }
    let session = AgentSession::resume(agent, resume.state, resume.unacked);
    Ok((session, Some(keeper)))
}

async fn connect(endpoint: &quinn::Endpoint, args: &JoinArgs) -> Result<Link, TransportError> {
    let conn = transport::connect(
        endpoint,
        args.aggregator,
        &args.server_name,
        DEFAULT_MAX_FRAME_BYTES,
    )
    .await?;
    let (send, mut recv) = conn.stream.into_parts();
    let (tx, frames) = mpsc::channel(INBOUND_FRAMES);
    tokio::spawn(async move {
        loop {
            let item = transport::recv_frame(&mut recv, DEFAULT_MAX_FRAME_BYTES).await;
            let done = !matches!(item, Ok(Some(_)));
            let sent = match item {
                Ok(Some(frame)) => tx.send(Ok(frame)).await,
                Ok(None) => Ok(()),
                Err(e) => tx.send(Err(e.to_string())).await,
            };
            if done || sent.is_err() {
                break;
            }
        }
    });
    Ok(Link {
        connection: conn.connection,
        send,
        frames,
    })
}

/// The driver's own state around the session.
struct Driver {
    args: JoinArgs,
    session: AgentSession,
    work: Arc<Work>,
    start: Instant,
    progress: Arc<AtomicU32>,
    /// The running job's stop flag (set when the session cancels it at its deadline).
    cancel: Arc<AtomicBool>,
    jobs: mpsc::UnboundedSender<JobResult>,
    /// The held model's dims, checked against the aggregator's.
    dims: ModelDims,
    bye: Option<ByeReason>,
    refused: Option<String>,
    finished: bool,
    /// The state directory (`--state`), written at round ends, uploads and answers.
    keeper: Option<StateKeeper>,
    /// A state write that failed while sending: the loop stops with it.
    state_error: Option<StateError>,
}

impl Driver {
    fn now(&self) -> Timestamp {
        Timestamp(self.start.elapsed().as_millis() as u64)
    }

    /// Carries out session commands; returns false when the connection broke.
    async fn execute(&mut self, link: &mut Option<Link>, cmds: Vec<AgentCommand>) -> bool {
        let mut ok = true;
        for cmd in cmds {
            match cmd {
                AgentCommand::Send(msg) => {
                    let upload = match &msg {
                        Message::Update(u) => Some(u.round),
                        _ => None,
                    };
                    let sent = self.send(link, msg).await;
                    if let (true, Some(round)) = (sent, upload) {
                        if let Err(ClientError::StateWrite(e)) =
                            self.persist(|k, s| k.uploaded(s, round))
                        {
                            self.state_error.get_or_insert(e);
                        }
                    }
                    ok &= sent;
                }
                AgentCommand::Train { job, state } => self.start_job(*job, state),
                AgentCommand::Cancel(round) => {
                    tracing::warn!(%round, "the round's deadline passed: stopping its job");
                    self.cancel.store(true, Ordering::SeqCst);
                }
                AgentCommand::Close(reason) => match self.bye {
                    Some(ByeReason::Finished) => self.finished = true,
                    Some(_) => tracing::info!(%reason, "the aggregator went away; will reconnect"),
                    None => self.refused = Some(reason),
                },
            }
        }
        ok
    }

    /// Sends one message; one that cannot be sent goes back to the session (which keeps an
    /// update or failure report for the next connection). False when the connection broke.
    async fn send(&mut self, link: &mut Option<Link>, msg: Message) -> bool {
        let sent = match link.as_mut() {
            Some(l) => {
                let bytes = match &msg {
                    Message::Update(u) => u.adapter.byte_len(),
                    _ => 0,
                };
                match transport::send_frame_within(&mut l.send, &msg, send_deadline(bytes)).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, kind = msg.kind(), "send failed");
                        false
                    }
                }
            }
            None => false,
        };
        if !sent {
            let now = self.now();
            self.session.handle(now, AgentEvent::Undelivered(msg));
        }
        sent
    }

    /// Runs `save` on the state keeper (when `--state` is given) and reports what it saved.
    fn persist(
        &mut self,
        save: impl FnOnce(&mut StateKeeper, &AgentSession) -> Result<bool, StateError>,
    ) -> Result<(), ClientError> {
        let Some(keeper) = self.keeper.as_mut() else {
            return Ok(());
        };
        if save(keeper, &self.session).map_err(ClientError::StateWrite)? {
            if let Some(last) = keeper.last_round() {
                println!(
                    "state: saved round {} ({}), kept {}",
                    last.round,
                    last.status,
                    state_dir::kept_digest(&self.session.state().kept)
                );
            }
        }
        Ok(())
    }

    /// Runs a local round from `state` on a blocking thread.
    fn start_job(&mut self, job: TrainJob, state: Arc<DeviceState>) {
        let work = self.work.clone();
        let progress = self.progress.clone();
        let tx = self.jobs.clone();
        progress.store(0, Ordering::SeqCst);
        // A fresh flag per job: cancelling one job never stops the next.
        let cancel = Arc::new(AtomicBool::new(false));
        self.cancel = cancel.clone();
        tokio::task::spawn_blocking(move || {
            let round = job.round;
            let result = run_local_round(&job, &state, &work, &progress, &cancel);
            // Released before the result is reported, so the session updates its state in
            // place instead of copying it.
            drop(state);
            let _ = tx.send(JobResult { round, result });
        });
    }
}

/// [`run_job`] with the compute time measured.
fn run_local_round(
    job: &TrainJob,
    state: &DeviceState,
    work: &Work,
    progress: &AtomicU32,
    cancel: &AtomicBool,
) -> Result<JobOutcome, FailReason> {
    let started = Instant::now();
    let mut lease = work
        .model
        .lease(&state.kept)
        .map_err(|e| FailReason::Error(format!("the device's model: {e}")))?;
    let run = run_job(job, state, lease.take(), &work.data, &work.agent, |step| {
        progress.store(step as u32, Ordering::SeqCst);
        !cancel.load(Ordering::SeqCst)
    });
    lease.put(run.held);
    drop(lease);
    let mut outcome = run.outcome.map_err(|e| FailReason::Error(e.to_string()))?;
    outcome.stats.compute_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        round = %job.round,
        ratio = job.arm.prune_ratio,
        rank = job.arm.rank,
        loss_pre = outcome.stats.loss_pre,
        loss_post = outcome.stats.loss_post,
        sparsity = outcome.stats.sparsity,
        compute_ms = outcome.stats.compute_ms,
        "local round done"
    );
    Ok(outcome)
}

async fn drive(
    args: JoinArgs,
    session: AgentSession,
    keeper: Option<StateKeeper>,
    work: Arc<Work>,
) -> Result<JoinReport, ClientError> {
    let idle = Duration::from_secs(args.idle_timeout_s.max(1));
    let client_config =
        transport::load_client_config_with_idle(&args.pki, DeviceId(args.id), idle)?;
    let endpoint = transport::client_endpoint(args.bind, client_config)?;
    let (jobs_tx, mut jobs_rx) = mpsc::unbounded_channel();
    let dims = work.dims;
    let mut d = Driver {
        args,
        session,
        work,
        start: Instant::now(),
        progress: Arc::new(AtomicU32::new(0)),
        cancel: Arc::new(AtomicBool::new(false)),
        jobs: jobs_tx,
        dims,
        bye: None,
        refused: None,
        finished: false,
        keeper,
        state_error: None,
    };
    let max_backoff = Duration::from_secs(d.args.reconnect_max_s.max(1));
    let mut backoff = Duration::from_millis(500);
    let mut failures = 0u32;
    let mut link: Option<Link> = None;
    let mut next_attempt = tokio::time::Instant::now();

    loop {
        if d.finished {
            break;
        }
        if let Some(reason) = d.refused.take() {
            close(&mut link, &endpoint).await;
            return Err(ClientError::Refused(reason));
        }
        if let Some(e) = d.state_error.take() {
            close(&mut link, &endpoint).await;
            return Err(ClientError::StateWrite(e));
        }
        if link.is_none() && tokio::time::Instant::now() >= next_attempt {
            match connect(&endpoint, &d.args).await {
                Ok(l) => {
                    tracing::info!(aggregator = %d.args.aggregator, "connected");
                    failures = 0;
                    backoff = Duration::from_millis(500);
                    d.bye = None;
                    link = Some(l);
                    let cmds = d.session.handle(d.now(), AgentEvent::Connected);
                    if !d.execute(&mut link, cmds).await {
                        link = None;
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "cannot reach the aggregator");
                    if d.args.max_attempts > 0 && failures >= d.args.max_attempts {
                        return Err(ClientError::GaveUp {
                            attempts: failures,
                            last: e.to_string(),
                        });
                    }
                    // Jitter (seeded by device and attempt) keeps many devices from retrying in
                    // lockstep.
                    let jitter = ChaCha8Rng::seed_from_u64(d.args.id ^ (failures as u64) << 32)
                        .random_range(0..=backoff.as_millis() as u64 / 4);
                    next_attempt =
                        tokio::time::Instant::now() + backoff + Duration::from_millis(jitter);
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
            continue;
        }
        // The session's timer (heartbeats, the running job's deadline) counts while
        // disconnected too; a far-off time (an aggregator's huge heartbeat interval) is
        // capped at an hour so the instant cannot overflow.
        let session_timer = d.session.poll_timeout().map(|t| {
            let wait = t.ms_since(d.now()).min(3_600_000);
            tokio::time::Instant::now() + Duration::from_millis(wait)
        });
        let timer = match (session_timer, link.is_none()) {
            (Some(t), true) => t.min(next_attempt),
            (Some(t), false) => t,
            (None, true) => next_attempt,
            (None, false) => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        let mut lost = false;
        tokio::select! {
            frame = async {
                match link.as_mut() {
                    Some(l) => l.frames.recv().await,
                    None => std::future::pending().await,
                }
            } => match frame {
                Some(Ok((msg, bytes))) => {
                    lost = !on_message(&mut d, &mut link, msg, bytes as u64).await?;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "connection lost");
                    lost = true;
                }
                None => {
                    tracing::info!("the aggregator closed the connection");
                    lost = true;
                }
            },
            Some(job) = jobs_rx.recv() => {
                let now = d.now();
                let cmds = match job.result {
                    Ok(outcome) => d.session.handle(now, AgentEvent::JobDone(Ok(outcome))),
                    Err(reason) => {
                        tracing::warn!(round = %job.round, %reason, "local round failed");
                        // The session answers with RoundFailed.
                        d.session.handle(now, AgentEvent::JobDone(Err(reason)))
                    }
                };
                // The round's result is on disk before its update goes out; a failed write
                // stops the agent with the update unsent.
                if let Err(e) = d.persist(|k, s| k.round_done(s, job.round)) {
                    close(&mut link, &endpoint).await;
                    return Err(e);
                }
                lost = !d.execute(&mut link, cmds).await && link.is_some();
            }
            _ = sleep_until(timer) => {
                d.session.set_progress(d.progress.load(Ordering::SeqCst));
                let cmds = d.session.handle_timeout(d.now());
                lost |= !d.execute(&mut link, cmds).await && link.is_some();
            }
        }
        if lost && link.is_some() {
            link = None;
            let cmds = d.session.handle(d.now(), AgentEvent::Disconnected);
            d.execute(&mut link, cmds).await;
            next_attempt = tokio::time::Instant::now() + backoff;
        }
    }
    close(&mut link, &endpoint).await;
    let report = JoinReport {
        rounds_acked: d.session.acked_rounds.len(),
        rejects: d.session.rejects.iter().cloned().collect(),
        rejects_total: d.session.rejects_total,
    };
    println!(
        "finished: {} rounds acknowledged, {} rejects",
        report.rounds_acked, report.rejects_total
    );
    Ok(report)
}

/// Handles one message; false when the connection broke while answering.
async fn on_message(
    d: &mut Driver,
    link: &mut Option<Link>,
    msg: Message,
    bytes: u64,
) -> Result<bool, ClientError> {
    match &msg {
        Message::Welcome(w) if w.model != d.dims => {
            return Err(ClientError::ModelMismatch {
                served: w.model,
                held: d.dims,
            });
        }
        Message::RoundConfig(rc) => {
            tracing::info!(round = %rc.round, ratio = rc.arm.prune_ratio, rank = rc.arm.rank, "round assigned");
        }
        Message::Bye(b) => d.bye = Some(b.reason),
        Message::Reject(r) => {
            tracing::warn!(round = ?r.round, reason = %r.reason, "the aggregator refused a message");
            if matches!(r.reason, RejectReason::ShuttingDown) {
                d.bye = Some(ByeReason::ServerShutdown);
            }
        }
        _ => {}
    }
    let answer = match &msg {
        Message::Ack(a) => Some((a.round, Ok(()))),
        Message::Reject(r) => r.round.map(|round| (round, Err(r.reason.to_string()))),
        _ => None,
    };
    let cmds = d
        .session
        .handle(d.now(), AgentEvent::Message { msg, bytes });
    if let Some((round, answer)) = answer {
        d.persist(|k, s| k.answered(s, round, answer))?;
    }
    Ok(d.execute(link, cmds).await)
}

async fn close(link: &mut Option<Link>, endpoint: &quinn::Endpoint) {
    if let Some(mut l) = link.take() {
        let _ = l.send.finish();
        l.connection
            .close(quinn::VarInt::from_u32(0), b"device leaving");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}
