//! The device agent's QUIC client: `device-agent join`. It loads the base model once, builds
//! the device's local data, connects to the aggregator with mutual TLS and drives the sans-IO
//! [`AgentSession`]: messages in (with their frame sizes), commands out, heartbeats from
//! `poll_timeout`, local rounds ([`run_job`]) on a blocking thread with the wall-clock
//! compute time measured here. A lost connection is retried with exponential back-off (a round
//! in progress keeps running and the session sends its update after re-joining);
//! `Bye(Finished)` ends the process cleanly. Round decisions (the out-of-memory pre-check
//! against the reported RAM, byte accounting, the outbox) are the session's; a local failure
//! is a `RoundFailed` with the error text.
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

use crate::backend::BackendKind;
use crate::cost::PrunedModel;
use crate::job::{run_job, LocalData};
use crate::model::{Llama, ModelConfig};
use crate::prune::{Criterion, PruneConfig};
use crate::session::{
    AgentCommand, AgentConfig, AgentEvent, AgentSession, DeviceState, JobOutcome, RoundLimits,
    TrainJob,
};
use crate::tokenizer::Tok;
use crate::user_data::UserDataConfig;
use crate::workload::{ClsShard, LmShard, SpamTask};
use crate::{assets, data, weights, wire};

/// `device-agent join`: take part in federated rounds.
#[derive(clap::Args, Debug, Clone)]
pub struct JoinArgs {
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
    /// RAM reported to the aggregator in MiB (default: the machine's total memory).
    #[arg(long)]
    pub ram_mb: Option<u64>,
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
    /// Reject reasons received.
    pub rejects: Vec<String>,
}

/// The tiny test model: 4 blocks, vocab 256, d_model 64, 4 query / 2 KV heads of 16, FFN 128,
/// random weights from a fixed seed (every device holds the same base).
pub fn tiny_model(device: &burn::tensor::Device) -> Llama {
    Llama::random(
        ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true),
        7,
        device,
    )
}

/// Synthetic token windows for the tiny model: a stream where each token follows its
/// predecessor by a fixed rule (`next = 37 * t + 11 mod 256`) with probability 0.8 and is
/// uniform otherwise, so there is something to learn; `seed` draws the noise.
pub fn synthetic_shard(seq_len: usize, train: usize, test: usize, seed: u64) -> LmShard {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let window = |rng: &mut ChaCha8Rng| {
        let mut t: u32 = rng.random_range(0..256);
        let mut w = Vec::with_capacity(seq_len + 1);
        for _ in 0..=seq_len {
            w.push(t);
            t = if rng.random::<f32>() < 0.8 {
                (37 * t + 11) % 256
            } else {
                rng.random_range(0..256)
            };
        }
        w
    };
    LmShard {
        seq_len,
        train: (0..train).map(|_| window(&mut rng)).collect(),
        test: (0..test).map(|_| window(&mut rng)).collect(),
    }
}

fn parse_range(s: &str) -> Result<(u32, u32), ClientError> {
    let bad = || ClientError::Setup {
        what: format!("range '{s}'"),
        detail: "expected FROM-TO, e.g. 1990-2021".into(),
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

/// Total memory of this machine, from `/proc/meminfo` (4 GiB when unknown).
fn machine_ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30)
}

/// Loads the base model (and its tokenizer when it has one).
fn load_model(args: &JoinArgs) -> Result<(Llama, Option<Tok>), ClientError> {
    let backend: BackendKind = args
        .backend
        .parse()
        .map_err(|e: crate::backend::BackendError| setup("--backend")(e.to_string()))?;
    let device = backend
        .device()
        .map_err(|e| setup(format!("backend {}", args.backend))(e.to_string()))?;
    match args.model.as_deref() {
        Some("tiny") if args.dataset != "synthetic" => Err(setup("--model tiny")(
            "the tiny test model has a 256-token vocabulary: use --dataset synthetic".into(),
        )),
        Some("tiny") => Ok((tiny_model(&device), None)),
        other => {
            let path = match other {
                Some(p) => PathBuf::from(p),
                None => assets::default_model()
                    .map_err(|e| setup("the default model")(e.to_string()))?,
            };
            let (model, tok) = weights::load(&path, &device)
                .map_err(|e| setup(format!("loading {}", path.display()))(e.to_string()))?;
            Ok((model, Some(tok)))
        }
    }
}

/// Builds the device's local data.
fn load_data(args: &JoinArgs, base: &Llama, tok: Option<&Tok>) -> Result<LocalData, ClientError> {
    let seed = args.data_seed.unwrap_or(args.id);
    let seq_len = args.seq_len.min(base.config.max_seq_len).max(2);
    let need_tok = || {
        tok.ok_or_else(|| {
            setup(format!("--dataset {}", args.dataset))("this model has no tokenizer".into())
        })
    };
    let texts_shard = |texts: Vec<String>| -> Result<LocalData, ClientError> {
        if texts.is_empty() {
            return Err(setup(format!("--dataset {}", args.dataset))(
                "the selection holds no documents".into(),
            ));
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let shard = LmShard::build(need_tok()?, &refs, seq_len, 0.1, seed)
            .map_err(|e| setup("tokenising the data")(e.to_string()))?;
        Ok(LocalData::Lm(shard))
    };
    if let Some(path) = &args.data {
        let what = format!("--data {}", path.display());
        let tok = tok.ok_or_else(|| setup(what.clone())("this model has no tokenizer".into()))?;
        let cfg = UserDataConfig {
            seq_len,
            test_fraction: args.test_fraction,
            seed,
            ..UserDataConfig::default()
        };
        return LocalData::from_files(path, tok, &cfg).map_err(|e| setup(what)(e.to_string()));
    }
    match args.dataset.as_str() {
        "synthetic" => {
            if base.config.vocab_size < 256 {
                return Err(setup("--dataset synthetic")(
                    "needs a vocabulary of at least 256 tokens".into(),
                ));
            }
            Ok(LocalData::Lm(synthetic_shard(seq_len, 64, 16, seed)))
        }
        "sotu" => {
            let (a, b) = parse_range(&args.years)?;
            let speeches =
                data::sotu().map_err(|e| setup("State of the Union data")(e.to_string()))?;
            texts_shard(
                speeches
                    .into_iter()
                    .filter(|s| (a..=b).contains(&s.year))
                    .map(|s| s.text)
                    .collect(),
            )
        }
        "moby-dick" => {
            let (a, b) = parse_range(&args.chapters)?;
            let texts = (a..=b)
                .map(|c| data::moby_dick_chapter(c as usize).map(|d| d.text))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| setup("Moby-Dick data")(e.to_string()))?;
            texts_shard(texts)
        }
        "spam" => {
            let tok = need_tok()?;
            let task = SpamTask::new(tok, 192).map_err(|e| setup("spam task")(e.to_string()))?;
            let mut mails =
                data::spam_assassin().map_err(|e| setup("SpamAssassin data")(e.to_string()))?;
            use rand::seq::SliceRandom;
            mails.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            let half = args.examples / 2;
            let pick = mails
                .iter()
                .filter(|m| m.spam)
                .take(half)
                .chain(mails.iter().filter(|m| !m.spam).take(args.examples - half));
            let examples = pick
                .map(|m| task.example(tok, &m.text, m.spam))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| setup("tokenising e-mails")(e.to_string()))?;
            let shard = ClsShard::split(examples, 0.25, seed);
            Ok(LocalData::Cls {
                task,
                shard,
                pad: tok.eos,
            })
        }
        other => Err(setup("--dataset")(format!(
            "unknown data set '{other}' (sotu, spam, moby-dick, synthetic)"
        ))),
    }
}

/// Everything a local round needs, shared with the blocking thread that runs it.
struct Work {
    base: Llama,
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
    frames: mpsc::UnboundedReceiver<Result<(Message, usize), String>>,
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
    let ram_bytes = args
        .ram_mb
        .map(|mb| mb << 20)
        .unwrap_or_else(machine_ram_bytes);
    let agent = AgentConfig {
        device_id: DeviceId(args.id),
        capabilities: Capabilities {
            ram_bytes,
            backend: args.backend.clone(),
            bench_score: None,
        },
        criterion,
        prune: PruneConfig::for_layers(base.config.n_layers()),
        f16_updates: args.f16_updates,
        costs: Arc::new(PrunedModel {
            dense: base.config.clone(),
            seq_len: data.seq_len(),
        }),
        limits: RoundLimits::default(),
    };
    let session = AgentSession::new(agent.clone(), DeviceState::fresh(&base));
    tracing::info!(
        device = args.id,
        dataset = %args.dataset,
        data = ?args.data,
        train_items = data.train_len(),
        ram_mb = ram_bytes >> 20,
        "device ready"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| setup("async runtime")(e.to_string()))?;
    let work = Arc::new(Work { base, data, agent });
    runtime.block_on(drive(args, session, work))
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
    let (tx, frames) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let item = transport::recv_frame(&mut recv, DEFAULT_MAX_FRAME_BYTES).await;
            let done = !matches!(item, Ok(Some(_)));
            let sent = match item {
                Ok(Some(frame)) => tx.send(Ok(frame)),
                Ok(None) => Ok(()),
                Err(e) => tx.send(Err(e.to_string())),
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
                AgentCommand::Send(msg) => ok &= self.send(link, msg).await,
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
            Some(l) => match transport::send_frame(&mut l.send, &msg).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, kind = msg.kind(), "send failed");
                    false
                }
            },
            None => false,
        };
        if !sent {
            let now = self.now();
            self.session.handle(now, AgentEvent::Undelivered(msg));
        }
        sent
    }

    /// Runs a local round from `state` on a blocking thread.
    fn start_job(&mut self, job: TrainJob, state: DeviceState) {
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
    let mut outcome = run_job(job, state, &work.base, &work.data, &work.agent, |step| {
        progress.store(step as u32, Ordering::SeqCst);
        !cancel.load(Ordering::SeqCst)
    })
    .map_err(|e| FailReason::Error(e.to_string()))?;
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
    work: Arc<Work>,
) -> Result<JoinReport, ClientError> {
    let idle = Duration::from_secs(args.idle_timeout_s.max(1));
    let client_config =
        transport::load_client_config_with_idle(&args.pki, DeviceId(args.id), idle)?;
    let endpoint = transport::client_endpoint(args.bind, client_config)?;
    let (jobs_tx, mut jobs_rx) = mpsc::unbounded_channel();
    let dims = wire::dims_of(&work.base.config);
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
        rejects: d.session.rejects.clone(),
    };
    println!(
        "finished: {} rounds acknowledged, {} rejects",
        report.rounds_acked,
        report.rejects.len()
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
    let cmds = d
        .session
        .handle(d.now(), AgentEvent::Message { msg, bytes });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_shards_are_deterministic_and_follow_the_rule_mostly() {
        let a = synthetic_shard(16, 8, 2, 5);
        assert_eq!(a, synthetic_shard(16, 8, 2, 5));
        assert_ne!(a, synthetic_shard(16, 8, 2, 6));
        let pairs: Vec<(u32, u32)> = a
            .train
            .iter()
            .flat_map(|w| w.windows(2).map(|p| (p[0], p[1])).collect::<Vec<_>>())
            .collect();
        let follow = pairs
            .iter()
            .filter(|(x, y)| (37 * x + 11) % 256 == *y)
            .count();
        let share = follow as f64 / pairs.len() as f64;
        assert!((0.7..0.95).contains(&share), "{share}");
        assert!(a.train.iter().all(|w| w.len() == 17));
    }

    #[test]
    fn ranges_parse_strictly() {
        assert_eq!(parse_range("1990-2021").unwrap(), (1990, 2021));
        assert!(parse_range("1990").is_err());
        assert!(parse_range("a-b").is_err());
    }

    #[test]
    fn the_tiny_model_has_the_dims_its_aggregator_config_names() {
        let m = tiny_model(&burn::tensor::Device::flex());
        assert_eq!(
            wire::dims_of(&m.config),
            ModelDims {
                n_blocks: 4,
                d_model: 64,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 16,
                ffn: 128
            }
        );
    }
}
