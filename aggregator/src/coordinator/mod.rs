//! The round coordinator as a sans-IO state machine: events in (`handle(now, event)`,
//! `handle_timeout(now)`), commands out, next deadline from `poll_timeout()`. It reads no clock,
//! opens no socket and starts no thread; its only randomness comes from named streams of the
//! config's seed ([`streams`]: selection, policy, training, the initial adapter), so the same
//! events at the same times give the same commands, and strategies run on one seed select the
//! same devices whatever their bandits draw. The QUIC server
//! (`crate::server`) and the simulator drive the same code.
//!
//! # Life of a run
//! 1. The driver authenticates a connection (mTLS, certificate -> [`DeviceId`]) and reports
//!    [`Event::Connected`]. The device's first message must be a `Join`: a wrong protocol
//!    version, an id other than the certified one, or a device outside `allowed_devices` gets a
//!    `Reject` and a [`Command::Disconnect`]; a valid join registers the device (a fresh bandit
//!    from the strategy on its first join) and gets a `Welcome`.
//! 2. A round starts when no round is open and at least `min_devices` joined devices are idle:
//!    `min(ceil(devices_per_round * (1 + over_selection)), idle)` of them are sampled (the
//!    idle devices with the smallest keys of the round on the `selection` stream: a uniform
//!    sample that no other draw shifts), each device's bandit picks its arm (from the `policy`
//!    stream), and each gets a `RoundConfig` with
//!    its slice of the global adapter (cut to the kept maps of its last accepted update, at its
//!    arm's rank). The first round already sends a slice: the global adapter starts as the
//!    standard LoRA initialisation (`A` random, `B = 0`) drawn from the `global-init` stream, so
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
//!
//! # Where things are
//! - this file: the [`Coordinator`] struct, its public API (`new`, `restore`, `state`,
//!   `handle`, `handle_timeout`, `poll_timeout`, `shutdown`) and its accessors;
//! - `selection.rs`: step 2 (round start: sampling, arms, round configurations);
//! - `intake.rs`: steps 1 and 3 (connections, joins, updates, failures, rejects);
//! - `close.rs`: step 4 (close conditions, aggregation, rewards, summary, checkpoint);
//! - `round.rs`: the open round's data (arms are `protocol::Arm`, the bandit's own type);
//! - `config.rs`, `error.rs`, `state.rs`, `summary.rs`: config, errors, checkpointed state,
//!   reports.
//!
//! Strategies ([`crate::strategy`]) and the aggregation math ([`crate::aggregate`]) sit below
//! the coordinator and never import it: it passes them what they need and wraps their errors.

mod close;
mod config;
mod error;
mod intake;
mod round;
mod selection;
mod state;
pub mod streams;
mod summary;

use std::collections::BTreeMap;

use bandit::BanditError;
use protocol::{Bye, ByeReason, DeviceId, Message, ModelDims, RoundId, Timestamp};
use rand_chacha::ChaCha8Rng;

use crate::aggregate::GlobalAdapter;
use crate::strategy::Strategy;

use round::OpenRound;
use streams::Stream;

pub use config::{BanditScope, CoordinatorConfig};
pub use error::CoordinatorError;
pub use intake::{MAX_FAILURE_REASON_CHARS, MAX_RESENDS_PER_ROUND};
pub use state::{
    CapabilitiesV1, CoordinatorState, CoordinatorStateV1, CoordinatorStateV2, CountersV2,
    DeviceRecord, DeviceRecordV1, STATE_SCHEMA, STATE_SCHEMA_V1, STATE_SCHEMA_V2,
};
pub use summary::{Assignment, Counters, FailedSummary, ParticipantSummary, RoundSummary};

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
    /// Which idle devices a round selects (random access by round and device).
    selection: Stream,
    /// Each participant's local-round seed (random access by round and device).
    training: Stream,
    /// The bandits' randomness, the one sequential stream (checkpointed as `state.rng`).
    policy_rng: ChaCha8Rng,
    counters: Counters,
    finished: bool,
    /// A round closed during the current call (the next one waits for `handle_timeout`).
    closed_now: bool,
    /// Scratch for a round start's selection keys (kept so a big fleet does not allocate it
    /// per round).
    selection_keys: Vec<(u64, DeviceId)>,
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
        let strategy = config.build_strategy()?;
        let mut init = Stream::new(config.seed, streams::label::GLOBAL_INIT).rng();
        let global = GlobalAdapter::init_lora(dims, config.max_rank, config.lora_alpha, &mut init);
        Ok(Coordinator {
            selection: Stream::new(config.seed, streams::label::SELECTION),
            training: Stream::new(config.seed, streams::label::TRAINING),
            policy_rng: Stream::new(config.seed, streams::label::POLICY).rng(),
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
            counters: Counters::default(),
            closed_now: false,
            selection_keys: Vec::new(),
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
        if !state.global.is_finite() {
            return Err(invalid_state(
                "its global adapter holds non-finite values (NaN or infinity)",
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
            if let Some(r) = record.rank_limit {
                if r == 0 || r > config.max_rank {
                    return Err(invalid_state(format!(
                        "self-pruned rank {r} of {} is not in [1, {}]",
                        record.id, config.max_rank
                    )));
                }
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
        let strategy = config.build_strategy()?;
        let finished = state.round.0 >= config.rounds;
        let selection = Stream::new(config.seed, streams::label::SELECTION);
        let training = Stream::new(config.seed, streams::label::TRAINING);
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
            selection,
            training,
            policy_rng: state.rng,
            counters: state.counters,
            closed_now: false,
            selection_keys: Vec::new(),
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
            rng: self.policy_rng.clone(),
            counters: self.counters.clone(),
        }
    }

    /// [`Self::state`] of a coordinator that is done, without copying the global adapter or
    /// the device records.
    pub fn into_state(self) -> CoordinatorState {
        CoordinatorState {
            dims: self.dims,
            strategy: self.strategy.name().to_string(),
            round: self.last_closed,
            global: self.global,
            devices: self
                .devices
                .into_values()
                .filter_map(|e| e.record)
                .collect(),
            rng: self.policy_rng,
            counters: self.counters,
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

    /// The device's entry, created on first contact.
    fn entry(&mut self, device: DeviceId) -> &mut DeviceEntry {
        self.devices.entry(device).or_default()
    }

    /// A registered device's record, for updating.
    fn record_mut(&mut self, device: DeviceId) -> Option<&mut DeviceRecord> {
        self.devices
            .get_mut(&device)
            .and_then(|e| e.record.as_mut())
    }

    /// Counts and logs a bandit's refusal (it leaves the bandit unchanged; the run goes on).
    fn note_bandit_error(&mut self, device: DeviceId, result: Result<(), BanditError>) {
        if let Err(e) = result {
            self.counters.bandit_errors += 1;
            tracing::warn!(%device, error = %e, "bandit refused an observation");
        }
    }
}
