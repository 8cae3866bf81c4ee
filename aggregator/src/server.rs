//! The aggregator's QUIC server: a thin tokio driver around the sans-IO [`Coordinator`].
//!
//! # Threads and tasks
//! - The coordinator lives on its own OS thread (it aggregates synchronously, which is pure
//!   compute). The thread owns the clock (`Timestamp` = milliseconds since the server started),
//!   waits for inputs until the coordinator's `poll_timeout`, and carries out commands: frames
//!   go to per-connection queues, checkpoints are written atomically
//!   ([`crate::checkpoint::write_atomic`]), round summaries become JSONL lines and a progress
//!   line.
//! - The accept loop (tokio) caps live connections (an incoming connection over the cap is
//!   refused and accepting backs off exponentially until a slot frees) and spawns one task per
//!   connection: TLS handshake with a client certificate from the private CA, certificate ->
//!   device id ([`transport::accept_device`]), then a reader (frames -> events, every read
//!   capped) and a writer (queue -> frames; a close request flushes the queue, finishes the
//!   stream, waits for the peer to read it, then closes the connection with the reason).
//! - Right after the handshake the device and its certificate are checked against the
//!   revocation list `revoked.txt` of the PKI directory ([`transport::Revocations`]), re-read
//!   whenever the file changes: a revoked device is refused with the reason in the QUIC close,
//!   logged and counted, and the server keeps running. Every two seconds the live connections
//!   are checked too: a device revoked while connected is closed with the reason.
//! - A newer connection of the same device replaces the older one; only the current
//!   connection's end is reported to the coordinator as a disconnect.
//!
//! Frames the codec refuses (too large, another protocol version, undecodable) never reach the
//! coordinator: the driver answers with a `Reject` naming the problem (also in the QUIC close
//! reason, which a peer with another framing can still read), counts it, and closes the
//! connection.
//!
//! # A checkpoint that cannot be written
//! At a round end the coordinator asks for `Checkpoint` then `RoundClosed`. If the checkpoint
//! cannot be written (disk full, I/O error), the round is not reported closed: no progress or
//! metrics line, no `Finished`, nothing after it in that batch. The server says
//! `Bye(ServerShutdown)` to every device, stops, and [`serve`] returns
//! [`ServerError::CheckpointFailed`] (the binary exits non-zero). It does not go on with state
//! it could not persist: a `--resume` continues from the last checkpoint that was written and
//! redoes the round after it, so the metrics never report a round the checkpoint lacks.
//!
//! # Shutdown
//! The `shutdown` future passed to [`serve`] (Ctrl-C in the binary) makes the coordinator say
//! `Bye(ServerShutdown)` to every device; the server waits briefly for the queues to drain and
//! closes the endpoint. The checkpoint stays the one written at the last round end. After the
//! last round (`Bye(Finished)`) the server waits for devices to leave (at most
//! [`ServeOptions::finish_grace`]) and returns.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{CodecError, DeviceId, Message, ModelDims, Reject, RejectReason, Timestamp};
use quinn::VarInt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc as tmpsc, watch};
use transport::{Revocations, TransportError};

use crate::checkpoint::{self, CheckpointError};
use crate::coordinator::{
    Command, Coordinator, CoordinatorConfig, CoordinatorError, CoordinatorState, Counters, Event,
    RoundSummary, STATE_SCHEMA,
};

/// File name of the checkpoint inside the state directory.
pub const CHECKPOINT_FILE: &str = "coordinator.ckpt";
/// A connection must finish its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a close request the writer waits this long for the peer to read what was sent.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// How often live connections are checked against the revocation list.
const REVOCATION_SWEEP: Duration = Duration::from_secs(2);
/// Accept back-off bounds while the connection cap is reached.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("config {path}: {detail}")]
    Config { path: PathBuf, detail: String },
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("checkpoint {path} cannot be resumed: {source}")]
    Incompatible {
        path: PathBuf,
        #[source]
        source: CoordinatorError,
    },
    #[error("{path} already holds a checkpoint; pass --resume to continue that run, or move it away to start a new one")]
    CheckpointExists { path: PathBuf },
    #[error("--resume given but there is no checkpoint at {path}")]
    NoCheckpoint { path: PathBuf },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("round {round} closed but its checkpoint could not be written, so the server stopped without reporting it (--resume continues from the last written checkpoint): {source}")]
    CheckpointFailed {
        round: u64,
        #[source]
        source: CheckpointError,
    },
    #[error("the coordinator thread stopped unexpectedly")]
    CoordinatorThread,
    #[error(transparent)]
    Revocation(#[from] transport::RevocationError),
}

/// The model a run is for: a preset name or explicit dimensions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    /// `smollm2-135m`.
    Preset(String),
    Dims(ModelDims),
}

impl ModelSpec {
    /// The dimensions this spec names.
    pub fn dims(&self) -> Result<ModelDims, String> {
        match self {
            ModelSpec::Preset(name) if name == "smollm2-135m" => Ok(ModelDims::SMOLLM2_135M),
            ModelSpec::Preset(other) => Err(format!(
                "unknown model preset '{other}' (known: smollm2-135m; or give n_blocks, d_model, n_heads, n_kv_heads, head_dim, ffn)"
            )),
            ModelSpec::Dims(d) => Ok(*d),
        }
    }
}

/// Reads a serve config: the coordinator settings ([`CoordinatorConfig`]) plus an optional
/// `model` entry (a preset name such as `model = "smollm2-135m"`, the default, or a `[model]`
/// table with the six dimensions).
pub fn load_serve_config(path: &Path) -> Result<(CoordinatorConfig, ModelDims), ServerError> {
    let config_err = |detail: String| ServerError::Config {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ServerError::Io {
        path: path.to_path_buf(),
        op: "read",
        source,
    })?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| config_err(e.to_string()))?;
    let dims = match table.remove("model") {
        None => ModelDims::SMOLLM2_135M,
        Some(value) => value
            .try_into::<ModelSpec>()
            .map_err(|e| config_err(format!("model: {e}")))?
            .dims()
            .map_err(config_err)?,
    };
    let config: CoordinatorConfig = table.try_into().map_err(|e| config_err(e.to_string()))?;
    config.validate().map_err(|e| config_err(e.to_string()))?;
    Ok((config, dims))
}

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// PKI directory (`ca.pem`, `server.pem`, `server.key.pem`).
    pub pki_dir: PathBuf,
    /// Where the checkpoint lives.
    pub state_dir: PathBuf,
    /// Per-round JSONL metrics (appended).
    pub metrics: Option<PathBuf>,
    /// Largest number of live connections (handshaking or established).
    pub max_connections: usize,
    /// Largest frame body read from a device.
    pub max_frame_bytes: usize,
    /// Print a progress line per round to stderr (default: when stderr is a terminal).
    pub progress: bool,
    /// After the last round, how long to wait for devices to leave.
    pub finish_grace: Duration,
}

impl ServeOptions {
    /// Defaults for everything but the addresses and directories.
    pub fn new(listen: SocketAddr, pki_dir: PathBuf, state_dir: PathBuf) -> ServeOptions {
        ServeOptions {
            listen,
            pki_dir,
            state_dir,
            metrics: None,
            max_connections: 1024,
            max_frame_bytes: protocol::DEFAULT_MAX_FRAME_BYTES,
            progress: std::io::stderr().is_terminal(),
            finish_grace: Duration::from_secs(5),
        }
    }

    /// The checkpoint file.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.state_dir.join(CHECKPOINT_FILE)
    }
}

/// A new coordinator, or (with `resume`) the one saved in the state directory. Refuses to
/// start a new run over an existing checkpoint, and refuses a checkpoint that is corrupt or was
/// written for another model, strategy or rank, with an error naming the file.
pub fn prepare(
    config: CoordinatorConfig,
    dims: ModelDims,
    opts: &ServeOptions,
    resume: bool,
) -> Result<Coordinator, ServerError> {
    std::fs::create_dir_all(&opts.state_dir).map_err(|source| ServerError::Io {
        path: opts.state_dir.clone(),
        op: "create directory",
        source,
    })?;
    let path = opts.checkpoint_path();
    // A crash during a write leaves a temporary file; the checkpoint itself is whole.
    for stale in checkpoint::remove_stale_temps(&path)? {
        tracing::warn!(path = %stale.display(), "removed a temporary file left by an interrupted checkpoint write");
    }
    let saved: Option<CoordinatorState> = checkpoint::read_if_exists(&path, STATE_SCHEMA)?;
    match (resume, saved) {
        (false, None) => Ok(Coordinator::new(config, dims)?),
        (false, Some(_)) => Err(ServerError::CheckpointExists { path }),
        (true, None) => Err(ServerError::NoCheckpoint { path }),
        (true, Some(state)) => {
            if state.dims != dims {
                return Err(ServerError::Incompatible {
                    path,
                    source: CoordinatorError::IncompatibleState(format!(
                        "it is for model {:?}, the config names {dims:?}",
                        state.dims
                    )),
                });
            }
            Coordinator::restore(config, state)
                .map_err(|source| ServerError::Incompatible { path, source })
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct ServeOutcome {
    /// The last round closed.
    pub round: protocol::RoundId,
    /// Whether every configured round ran.
    pub finished: bool,
    pub counters: Counters,
    /// Connections refused (at the handshake) or closed (while live) because the revocation
    /// list named their device or certificate.
    pub revoked_refusals: u64,
}

/// One JSONL line of the metrics file.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum MetricsLine<'a> {
    /// The server started (fresh or resumed).
    Start {
        resumed: bool,
        round: u64,
        strategy: &'a str,
        bandit_digest: String,
    },
    Round(&'a RoundSummary),
    /// Frames the driver refused before they reached the coordinator.
    Refused {
        device: DeviceId,
        kind: &'a str,
        reason: String,
    },
}

enum Input {
    Event(Event),
    /// A frame refused by the codec (for counting and metrics).
    Refused(DeviceId, RejectReason),
    Shutdown,
}

/// Where the coordinator thread is, as the accept loop sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Every round ran.
    Finished,
    /// A checkpoint could not be written; the thread stopped.
    Failed,
}

enum Outbound {
    Frame(Message),
    Close(String),
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    /// The current connection of each device: its id and queue.
    conns: HashMap<
        DeviceId,
        (
            u64,
            tmpsc::UnboundedSender<Outbound>,
            transport::Fingerprint,
        ),
    >,
}

struct Shared {
    registry: Mutex<Registry>,
    inputs: Mutex<mpsc::Sender<Input>>,
    live: AtomicUsize,
    handshake_failures: AtomicU64,
    revoked_refusals: AtomicU64,
    revocations: Revocations,
    max_frame_bytes: usize,
}

impl Shared {
    fn input(&self, input: Input) {
        if let Ok(tx) = self.inputs.lock() {
            // The coordinator thread only goes away at shutdown; later inputs do not matter.
            let _ = tx.send(input);
        }
    }

    fn sender(&self, device: DeviceId) -> Option<tmpsc::UnboundedSender<Outbound>> {
        let reg = self.registry.lock().ok()?;
        reg.conns.get(&device).map(|(_, tx, _)| tx.clone())
    }

    /// Closes the connections the revocation list now refuses (a device revoked while
    /// connected); each close ends its reader, which reports the disconnect.
    fn close_revoked(&self) {
        self.revocations.refresh();
        let list = self.revocations.list();
        let Ok(reg) = self.registry.lock() else {
            return;
        };
        for (device, (_, tx, fingerprint)) in &reg.conns {
            if let Err(revoked) = list.check(*device, *fingerprint) {
                tracing::warn!(%device, reason = %revoked, "closing a revoked device's connection");
                self.revoked_refusals.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(Outbound::Close(revoked.to_string()));
            }
        }
    }
}

/// Counts a live connection for as long as it exists.
struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where the coordinator thread writes.
struct Sinks {
    checkpoint: PathBuf,
    metrics: Option<File>,
    metrics_path: Option<PathBuf>,
    progress: bool,
}

impl Sinks {
    fn metrics_line(&mut self, line: &MetricsLine<'_>) {
        let Some(file) = &mut self.metrics else {
            return;
        };
        let text = match serde_json::to_string(line) {
            Ok(t) => t,
            Err(e) => return tracing::error!(error = %e, "cannot encode a metrics line"),
        };
        if let Err(e) = writeln!(file, "{text}").and_then(|_| file.flush()) {
            let path = self.metrics_path.as_deref().unwrap_or(Path::new("?"));
            tracing::error!(path = %path.display(), error = %e, "cannot write metrics");
        }
    }
}

/// Runs the server until the last round is over (and devices left) or `shutdown` resolves.
/// A round-end checkpoint that cannot be written ends it with [`ServerError::CheckpointFailed`].
/// Binds `opts.listen` and calls `on_listening` with the bound address (port 0 picks one).
pub async fn serve(
    coordinator: Coordinator,
    opts: &ServeOptions,
    resumed: bool,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<ServeOutcome, ServerError> {
    if let Some(ca_key) = exposed_ca_key(&opts.pki_dir) {
        tracing::warn!(path = %ca_key.display(), "the CA key sits in the server's PKI directory; keep it offline and serve from a bundle (aggregator ca export-server)");
    }
    let revocations = Revocations::open_in(&opts.pki_dir)?;
    let server_config = transport::load_server_config(&opts.pki_dir)?;
    let endpoint = transport::server_endpoint(opts.listen, server_config)?;
    let local = endpoint.local_addr().map_err(|source| ServerError::Io {
        path: PathBuf::from(opts.listen.to_string()),
        op: "read the bound address",
        source,
    })?;
    tracing::info!(addr = %local, strategy = coordinator.strategy_name(), round = coordinator.round().0, "listening");
    on_listening(local);

    let metrics = match &opts.metrics {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ServerError::Io {
                    path: path.clone(),
                    op: "open metrics file",
                    source,
                })?,
        ),
        None => None,
    };
    let mut sinks = Sinks {
        checkpoint: opts.checkpoint_path(),
        metrics,
        metrics_path: opts.metrics.clone(),
        progress: opts.progress,
    };
    let state = coordinator.state();
    sinks.metrics_line(&MetricsLine::Start {
        resumed,
        round: state.round.0,
        strategy: coordinator.strategy_name(),
        bandit_digest: state.bandit_digest(),
    });
    drop(state);

    let (input_tx, input_rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        registry: Mutex::new(Registry::default()),
        inputs: Mutex::new(input_tx),
        live: AtomicUsize::new(0),
        handshake_failures: AtomicU64::new(0),
        revoked_refusals: AtomicU64::new(0),
        revocations,
        max_frame_bytes: opts.max_frame_bytes,
    });
    let (phase_tx, mut phase_rx) = watch::channel(if coordinator.is_finished() {
        Phase::Finished
    } else {
        Phase::Running
    });
    let thread_shared = shared.clone();
    let coordinator_thread = std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || run_coordinator(coordinator, input_rx, &thread_shared, sinks, phase_tx))
        .map_err(|source| ServerError::Io {
            path: PathBuf::from("coordinator thread"),
            op: "spawn",
            source,
        })?;

    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = BACKOFF_MIN;
    tokio::pin!(shutdown);
    let mut finished = *phase_rx.borrow() != Phase::Running;
    let mut interrupted = false;
    let mut revocation_sweep = tokio::time::interval(REVOCATION_SWEEP);
    while !finished {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                interrupted = true;
                break;
            }
            changed = phase_rx.changed() => {
                finished = changed.is_err() || *phase_rx.borrow() != Phase::Running;
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if shared.live.load(Ordering::SeqCst) >= opts.max_connections {
                    tracing::warn!(remote = %incoming.remote_address(), cap = opts.max_connections, "connection cap reached; refusing");
                    incoming.refuse();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                backoff = BACKOFF_MIN;
                shared.live.fetch_add(1, Ordering::SeqCst);
                tasks.spawn(handle_connection(incoming, shared.clone()));
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = revocation_sweep.tick() => shared.close_revoked(),
        }
    }

    let failed = *phase_rx.borrow() == Phase::Failed;
    if interrupted || failed {
        shared.input(Input::Shutdown);
    } else {
        // Training is over: give devices a moment to read their goodbye and leave.
        let deadline = tokio::time::Instant::now() + opts.finish_grace;
        while shared.live.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shared.input(Input::Shutdown);
    }
    let (coordinator, failure) = tokio::task::spawn_blocking(move || coordinator_thread.join())
        .await
        .map_err(|_| ServerError::CoordinatorThread)?
        .map_err(|_| ServerError::CoordinatorThread)?;
    // Let writers flush the goodbyes, then close everything.
    let drain = tokio::time::Instant::now() + CLOSE_FLUSH;
    while !tasks.is_empty() && tokio::time::Instant::now() < drain {
        tokio::select! {
            _ = tasks.join_next() => {}
            _ = tokio::time::sleep_until(drain) => break,
        }
    }
    tasks.abort_all();
    endpoint.close(VarInt::from_u32(0), b"aggregator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    let failures = shared.handshake_failures.load(Ordering::SeqCst);
    if failures > 0 {
        tracing::info!(failures, "connections refused at the handshake");
    }
    let revoked = shared.revoked_refusals.load(Ordering::SeqCst);
    if revoked > 0 {
        tracing::info!(revoked, "connections refused by the revocation list");
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(ServeOutcome {
        round: coordinator.state().round,
        finished: coordinator.is_finished() && !interrupted,
        counters: coordinator.counters().clone(),
        revoked_refusals: shared.revoked_refusals.load(Ordering::SeqCst),
    })
}

/// The CA key, if it sits in `pki_dir` (where the server would not need it).
pub fn exposed_ca_key(pki_dir: &Path) -> Option<PathBuf> {
    let key = transport::ca_paths(pki_dir).key;
    key.exists().then_some(key)
}

fn run_coordinator(
    mut coord: Coordinator,
    inputs: mpsc::Receiver<Input>,
    shared: &Shared,
    mut sinks: Sinks,
    phase: watch::Sender<Phase>,
) -> (Coordinator, Option<ServerError>) {
    let start = Instant::now();
    let now = || Timestamp(start.elapsed().as_millis() as u64);
    let failure = loop {
        // Due timers first, so a stream of messages cannot starve a deadline.
        if coord.poll_timeout().is_some_and(|t| t <= now()) {
            let cmds = coord.handle_timeout(now());
            if let Err(e) = execute(&coord, cmds, shared, &mut sinks, &phase) {
                break Some(e);
            }
            continue;
        }
        let input = match coord.poll_timeout() {
            Some(t) => {
                let wait = Duration::from_millis(t.0.saturating_sub(now().0));
                match inputs.recv_timeout(wait) {
                    Ok(input) => input,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break None,
                }
            }
            None => match inputs.recv() {
                Ok(input) => input,
                Err(_) => break None,
            },
        };
        match input {
            Input::Event(event) => {
                let cmds = coord.handle(now(), event);
                if let Err(e) = execute(&coord, cmds, shared, &mut sinks, &phase) {
                    break Some(e);
                }
            }
            Input::Refused(device, reason) => {
                sinks.metrics_line(&MetricsLine::Refused {
                    device,
                    kind: reason.kind(),
                    reason: reason.to_string(),
                });
            }
            Input::Shutdown => {
                let cmds = coord.shutdown();
                // Shutdown asks for no checkpoint, so this cannot fail.
                let _ = execute(&coord, cmds, shared, &mut sinks, &phase);
                break None;
            }
        }
    };
    if let Some(e) = &failure {
        tracing::error!(error = %e, "stopping: the state of the last round could not be persisted");
        let cmds = coord.shutdown();
        let _ = execute(&coord, cmds, shared, &mut sinks, &phase);
        let _ = phase.send(Phase::Failed);
    }
    (coord, failure)
}

/// Carries out `cmds` in order. A checkpoint that cannot be written stops the batch there (the
/// `RoundClosed` after it is not reported) and is returned.
fn execute(
    coord: &Coordinator,
    cmds: Vec<Command>,
    shared: &Shared,
    sinks: &mut Sinks,
    phase: &watch::Sender<Phase>,
) -> Result<(), ServerError> {
    for cmd in cmds {
        match cmd {
            Command::Send { device, msg } => match shared.sender(device) {
                Some(tx) => {
                    let _ = tx.send(Outbound::Frame(msg));
                }
                None => {
                    tracing::debug!(%device, kind = msg.kind(), "device not connected; message dropped")
                }
            },
            Command::Disconnect { device, reason } => {
                if let Some(tx) = shared.sender(device) {
                    let _ = tx.send(Outbound::Close(reason));
                }
            }
            Command::Checkpoint => {
                let state = coord.state();
                match checkpoint::write_atomic(&sinks.checkpoint, STATE_SCHEMA, &state) {
                    Ok(bytes) => {
                        tracing::debug!(round = state.round.0, bytes, "checkpoint written")
                    }
                    Err(source) => {
                        return Err(ServerError::CheckpointFailed {
                            round: state.round.0,
                            source,
                        })
                    }
                }
            }
            Command::RoundClosed(summary) => {
                let line = summary.progress_line(coord.config().rounds);
                tracing::info!("{line}");
                if sinks.progress {
                    eprintln!("{line}");
                }
                sinks.metrics_line(&MetricsLine::Round(&summary));
            }
            Command::Finished => {
                let _ = phase.send(Phase::Finished);
            }
        }
    }
    Ok(())
}

async fn handle_connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let _live = LiveGuard(shared.clone());
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        transport::accept_device_checked(incoming, shared.max_frame_bytes, &shared.revocations),
    )
    .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(TransportError::Revoked(revoked))) => {
            shared.revoked_refusals.fetch_add(1, Ordering::SeqCst);
            return tracing::warn!(%remote, reason = %revoked, "connection refused: revoked");
        }
        Ok(Err(e)) => {
            shared.handshake_failures.fetch_add(1, Ordering::SeqCst);
            return tracing::warn!(%remote, error = %e, "connection refused");
        }
        Err(_) => {
            shared.handshake_failures.fetch_add(1, Ordering::SeqCst);
            return tracing::warn!(%remote, "handshake timed out");
        }
    };
    let device = conn.device;
    let connection = conn.connection;
    let (mut send, mut recv) = conn.stream.into_parts();
    let (tx, mut rx) = tmpsc::unbounded_channel::<Outbound>();
    let conn_id = match shared.registry.lock() {
        Ok(mut reg) => {
            reg.next_id += 1;
            let id = reg.next_id;
            if let Some((_, old, _)) = reg.conns.insert(device, (id, tx.clone(), conn.fingerprint))
            {
                let _ = old.send(Outbound::Close("replaced by a newer connection".into()));
            }
            id
        }
        Err(_) => return,
    };
    tracing::info!(%device, %remote, "device connected");
    shared.input(Input::Event(Event::Connected { device }));

    let writer_connection = connection.clone();
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Outbound::Frame(msg) => {
                    if let Err(e) = transport::send_frame(&mut send, &msg).await {
                        tracing::debug!(%device, error = %e, "send failed");
                        break;
                    }
                }
                Outbound::Close(reason) => {
                    let _ = send.finish();
                    let _ = tokio::time::timeout(CLOSE_FLUSH, send.stopped()).await;
                    writer_connection.close(VarInt::from_u32(0), reason.as_bytes());
                    break;
                }
            }
        }
    });

    loop {
        match transport::recv_frame(&mut recv, shared.max_frame_bytes).await {
            Ok(Some((msg, bytes))) => shared.input(Input::Event(Event::Message {
                device,
                msg,
                bytes: bytes as u64,
            })),
            Ok(None) => break,
            Err(TransportError::Codec(e)) => {
                let reason = codec_reject(&e);
                tracing::warn!(%device, error = %e, "frame refused");
                shared.input(Input::Refused(device, reason.clone()));
                let text = reason.to_string();
                let _ = tx.send(Outbound::Frame(Message::Reject(Reject {
                    round: None,
                    reason,
                })));
                let _ = tx.send(Outbound::Close(text));
                break;
            }
            Err(e) => {
                tracing::debug!(%device, error = %e, "connection ended");
                break;
            }
        }
    }
    let current = match shared.registry.lock() {
        Ok(mut reg) => match reg.conns.get(&device) {
            Some((id, _, _)) if *id == conn_id => {
                reg.conns.remove(&device);
                true
            }
            _ => false,
        },
        Err(_) => false,
    };
    if current {
        tracing::info!(%device, "device disconnected");
        shared.input(Input::Event(Event::Disconnected { device }));
    }
    drop(tx);
    let _ = tokio::time::timeout(CLOSE_FLUSH + Duration::from_millis(500), writer).await;
    connection.close(VarInt::from_u32(0), b"");
}

/// The reject a device gets for a frame the codec refused.
fn codec_reject(e: &CodecError) -> RejectReason {
    match e {
        CodecError::FrameTooLarge { len, max } => RejectReason::TooLarge {
            bytes: *len,
            limit: *max,
        },
        CodecError::VersionMismatch { ours, theirs } => RejectReason::VersionMismatch {
            ours: *ours,
            theirs: *theirs,
        },
        other => RejectReason::Malformed(other.to_string()),
    }
}
