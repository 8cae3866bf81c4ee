//! The aggregator's QUIC server: a thin tokio driver around the sans-IO [`Coordinator`].
//!
//! # Threads and tasks
//! - The coordinator lives on its own OS thread (`driver.rs`; it aggregates synchronously,
//!   which is pure compute). The thread owns the clock (`Timestamp` = milliseconds since the
//!   server started), waits for inputs until the coordinator's `poll_timeout`, and carries out
//!   commands: frames are encoded and go to per-connection queues, checkpoints are written
//!   atomically ([`crate::checkpoint::write_atomic`]), round summaries become JSONL lines and a
//!   progress line.
//! - The accept loop (this file) admits connection attempts (`accept.rs`): an address not yet
//!   validated gets a QUIC Retry first, then the server's cap on live connections (over it the
//!   attempt is refused and accepting backs off exponentially until a slot frees) and the
//!   per-address caps on connections and handshakes apply. Each admitted connection gets a task
//!   (`connection.rs`): TLS handshake with a client certificate from the private CA,
//!   certificate -> device id ([`transport::accept_device_checked`]) and the device's stream,
//!   all within the handshake budget; then a reader (frames -> events; each frame whole within
//!   its deadline from its first byte; the message rate limited) and a writer (queue ->
//!   frames, each write within the write timeout; a close request flushes the queue, finishes
//!   the stream, waits for the peer to read it, then closes the connection with the reason).
//! - Every queue is bounded (`registry.rs`, [`NetLimits`]): a device that does not read is
//!   closed when its queue is full or a write times out, and a device that sends faster than
//!   the coordinator handles waits for its turn without starving the others.
//! - Right after the handshake the device and its certificate are checked against the
//!   revocation list `revoked.txt` of the PKI directory ([`transport::Revocations`]), re-read
//!   whenever the file changes: a revoked device is refused with the reason in the QUIC close,
//!   logged and counted, and the server keeps running. Every two seconds the live connections
//!   are checked too: a device revoked while connected is closed with the reason.
//! - One connection per device: while a device's connection received a frame within
//!   [`NetLimits::duplicate_idle`] (three heartbeat intervals by default) a second connection
//!   with its certificate is refused, logged and counted, so a stolen certificate cannot push
//!   the real device out by reconnecting (revoking the certificate is the remedy for a stolen
//!   one). A connection silent for longer (a device whose network changed) is closed and
//!   replaced; only the current connection's end is reported to the coordinator.
//!
//! Frames the codec refuses (too large, another protocol version, undecodable) never reach the
//! coordinator: the driver answers with a `Reject` naming the problem (also in the QUIC close
//! reason, which a peer with another framing can still read), counts it, and closes the
//! connection. [`ServeOutcome::net`] counts every refusal by cause and the queues' peaks.
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

mod accept;
mod config;
mod connection;
mod driver;
mod registry;
mod scrape;

use std::fs::OpenOptions;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use protocol::ModelDims;
use quinn::VarInt;
use tokio::sync::watch;
use transport::{Revocations, TransportError};

use crate::checkpoint::{self, CheckpointError};
use crate::coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorError, CoordinatorState, CoordinatorStateV1,
    CoordinatorStateV2, Counters, STATE_SCHEMA, STATE_SCHEMA_V1, STATE_SCHEMA_V2,
};
use crate::prometheus::MetricsView;

use accept::Admission;
use connection::CLOSE_FLUSH;
use driver::{MetricsLine, Phase, Sinks};
use registry::{Input, Shared};

pub use config::{load_serve_config, ModelSpec, NetLimits, ServeOptions};
pub use registry::NetStats;
pub use scrape::MAX_SCRAPES_PER_ADDRESS;

/// File name of the checkpoint inside the state directory.
pub const CHECKPOINT_FILE: &str = "coordinator.ckpt";
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
    let saved = read_state(&path)?;
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

/// The checkpoint at `path`, if any: this build's schema, schema 2 (before the screening
/// counter) brought forward with no update screened out, or schema 1 (before device classes)
/// with every device of class `unknown` too.
pub fn read_state(path: &Path) -> Result<Option<CoordinatorState>, CheckpointError> {
    match checkpoint::read_if_exists::<CoordinatorState>(path, STATE_SCHEMA) {
        Err(CheckpointError::Schema {
            found: STATE_SCHEMA_V2,
            ..
        }) => bring_forward::<CoordinatorStateV2>(path, STATE_SCHEMA_V2, ""),
        Err(CheckpointError::Schema {
            found: STATE_SCHEMA_V1,
            ..
        }) => bring_forward::<CoordinatorStateV1>(
            path,
            STATE_SCHEMA_V1,
            ": its devices are of class unknown until they join again",
        ),
        other => other,
    }
}

/// Reads the older-schema checkpoint at `path` and brings it to this build's state.
fn bring_forward<T>(
    path: &Path,
    schema: u32,
    note: &str,
) -> Result<Option<CoordinatorState>, CheckpointError>
where
    T: serde::de::DeserializeOwned + Into<CoordinatorState>,
{
    let old: T = checkpoint::read(path, schema)?;
    tracing::info!(path = %path.display(), "read a schema-{schema} checkpoint{note}");
    Ok(Some(old.into()))
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
    /// Every refusal by cause, and the queues' peaks.
    pub net: NetStats,
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
    // The metrics port is bound before the server reports itself listening.
    let scrape_listener = match opts.prometheus {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Io {
                    path: PathBuf::from(addr.to_string()),
                    op: "bind the Prometheus listener",
                    source,
                })?;
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %bound, "Prometheus metrics on GET /metrics");
            eprintln!("prometheus metrics on {bound}");
            Some(listener)
        }
        None => None,
    };
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
    let prometheus_view = opts
        .prometheus
        .map(|_| Arc::new(std::sync::Mutex::new(MetricsView::default())));
    let mut sinks = Sinks {
        checkpoint: opts.checkpoint_path(),
        metrics,
        metrics_path: opts.metrics.clone(),
        progress: opts.progress,
        prometheus: prometheus_view.clone(),
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
    let duplicate_idle = opts.limits.duplicate_idle.unwrap_or_else(|| {
        Duration::from_millis(coordinator.config().heartbeat_interval_ms.saturating_mul(3))
    });
    let shared = Arc::new(Shared::new(
        input_tx,
        revocations,
        opts.max_frame_bytes,
        opts.limits.clone(),
        duplicate_idle,
    ));
    let scrape_task = match (scrape_listener, prometheus_view) {
        (Some(listener), Some(view)) => {
            Some(tokio::spawn(scrape::serve(listener, view, shared.clone())))
        }
        _ => None,
    };

    let (phase_tx, mut phase_rx) = watch::channel(if coordinator.is_finished() {
        Phase::Finished
    } else {
        Phase::Running
    });
    let thread_shared = shared.clone();
    let coordinator_thread = std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || {
            driver::run_coordinator(coordinator, input_rx, &thread_shared, sinks, phase_tx)
        })
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
                match accept::admit(incoming, &shared) {
                    Admission::Accept(incoming, slot) => {
                        backoff = BACKOFF_MIN;
                        tasks.spawn(connection::handle(*incoming, shared.clone(), slot));
                    }
                    Admission::Answered => {}
                    Admission::Full => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
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
        while shared.live() > 0 && tokio::time::Instant::now() < deadline {
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
    if let Some(t) = scrape_task {
        t.abort();
    }
    endpoint.close(VarInt::from_u32(0), b"aggregator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    let net = shared.counters.snapshot();
    tracing::info!(?net, "network counters");
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(ServeOutcome {
        round: coordinator.state().round,
        finished: coordinator.is_finished() && !interrupted,
        counters: coordinator.counters().clone(),
        revoked_refusals: net.revoked_refusals,
        net,
    })
}

/// The CA key, if it sits in `pki_dir` (where the server would not need it).
pub fn exposed_ca_key(pki_dir: &Path) -> Option<PathBuf> {
    let key = transport::ca_paths(pki_dir).key;
    key.exists().then_some(key)
}
