//! The coordinator thread: owns the [`Coordinator`] and the clock, waits for inputs until the
//! coordinator's next deadline, and carries out its commands (frames to the connections'
//! bounded queues, atomic checkpoints, metrics and progress lines).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use protocol::{DeviceId, Message, Timestamp};
use serde::Serialize;
use tokio::sync::watch;

use super::registry::{Input, NetStats, Shared};
use super::ServerError;
use crate::checkpoint;
use crate::coordinator::{Command, Coordinator, RoundSummary, STATE_SCHEMA};
use crate::prometheus::MetricsView;

/// One JSONL line of the metrics file.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(super) enum MetricsLine<'a> {
    /// The server started (fresh or resumed).
    Start {
        resumed: bool,
        round: u64,
        strategy: &'a str,
        bandit_digest: String,
    },
    Round(&'a RoundSummary),
    /// The network counters after a round closed (cumulative since the server started):
    /// refusals by cause and the queues' peaks.
    Net {
        round: u64,
        #[serde(flatten)]
        stats: NetStats,
    },
    /// Frames the driver refused before they reached the coordinator.
    Refused {
        device: DeviceId,
        kind: &'a str,
        reason: String,
    },
}

/// Where the coordinator thread is, as the accept loop sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    /// Every round ran.
    Finished,
    /// A checkpoint could not be written; the thread stopped.
    Failed,
}

/// Where the coordinator thread writes.
pub(super) struct Sinks {
    pub checkpoint: PathBuf,
    pub metrics: Option<File>,
    pub metrics_path: Option<PathBuf>,
    pub progress: bool,
    /// What the Prometheus endpoint renders, when it is on.
    pub prometheus: Option<Arc<std::sync::Mutex<MetricsView>>>,
}

impl Sinks {
    /// Copy the coordinator's counters (and a closed round) into the Prometheus view.
    fn observe(&self, coord: &Coordinator, round: Option<&RoundSummary>) {
        let Some(view) = &self.prometheus else { return };
        if let Ok(mut v) = view.lock() {
            v.counters = coord.counters().clone();
            if let Some(r) = round {
                v.observe_round(r);
            }
        }
    }

    pub fn metrics_line(&mut self, line: &MetricsLine<'_>) {
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

pub(super) fn run_coordinator(
    mut coord: Coordinator,
    inputs: mpsc::Receiver<Input>,
    shared: &Arc<Shared>,
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
            Input::Event(event, permit) => {
                let cmds = coord.handle(now(), event);
                drop(permit);
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
    shared: &Arc<Shared>,
    sinks: &mut Sinks,
    phase: &watch::Sender<Phase>,
) -> Result<(), ServerError> {
    for cmd in cmds {
        match cmd {
            Command::Send { device, msg } => {
                shared.send(device, &msg);
                if let Message::Ack(_) = msg {
                    // Tests only: an update is folded into the open round (see
                    // `checkpoint::failpoint`).
                    checkpoint::failpoint("mid-aggregation");
                }
            }
            Command::Disconnect { device, reason } => shared.disconnect(device, reason),
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
                sinks.metrics_line(&MetricsLine::Net {
                    round: summary.round.0,
                    stats: shared.counters.snapshot(),
                });
                sinks.observe(coord, Some(&summary));
            }
            Command::Finished => {
                let _ = phase.send(Phase::Finished);
            }
        }
    }
    sinks.observe(coord, None);
    Ok(())
}
