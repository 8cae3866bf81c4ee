//! The discrete-event driver: one [`Coordinator`] and one [`AgentSession`] per virtual device,
//! advanced on a virtual clock by a queue of timed events (message deliveries, finished local
//! rounds, the cores' timers, availability changes and dropouts). Events at the same instant
//! run in the order they were scheduled, so a seed fixes the run. Each kind of draw has its own
//! named stream of the seed (`aggregator::coordinator::streams`): availability per device,
//! per-round device noise by (device, round), the evaluation panel; the data partition is
//! `local_data`'s and selection, arms and local-round seeds are the coordinator's.
//!
//! The driver plays the parts the real deployment gives to hardware and transport:
//! - **Links.** A message is sized by the real codec; it arrives `bytes / rate + rtt` after its
//!   link (the device's uplink or downlink, one message at a time) is free. Real mode encodes
//!   it and decodes the frame on arrival; surrogate mode hands over the message itself (the
//!   codec gives back exactly what it encoded, which protocol's tests and `round_trip` fuzz
//!   target check), since the round trip was a sixth of a 10,000-device run. Messages of a
//!   connection that closed meanwhile are lost.
//! - **Compute.** A session's `Train` command runs the local round at once (real training or
//!   the surrogate) and its result is delivered after the virtual compute time. (A round that
//!   cannot fit in the profile's RAM never gets here: the session refuses it, sized by the
//!   trainer's costs, exactly as on a real device.)
//! - **Availability and dropouts.** Devices come online after a random delay, follow their
//!   profile's daily windows and on/off churn, and a selected device may drop out during its
//!   round (its job is lost; it restarts with its saved state after `reconnect_s`). Going
//!   offline ends the connection: the coordinator sees `Disconnected`, the device a fresh
//!   session on its next connection (the agent process restarted), with its kept maps and
//!   adapter kept, as an agent persists them (in surrogate mode, which never trains from a
//!   device's own adapter, only the kept maps: `AgentConfig::keep_adapter`).
//!
//! Everything else (rounds, selection, arms, aggregation, rewards, rejects, a device's
//! out-of-memory pre-check, byte accounting and outbox) is the coordinator's and the session's
//! own code.
//!
//! This file is the event loop (devices, availability, links, timers, command dispatch); the
//! seams around it: [`jobs`] (local rounds on the virtual clock), [`panel`] (evaluations),
//! [`final_eval`] (the final evaluation of trained devices and of the fleet), [`records`]
//! (round records, the report) and [`byzantine`] (what attacking devices did; they poison
//! their updates in `send_to_server`, see [`crate::byzantine`]).

mod byzantine;
mod final_eval;
mod jobs;
mod panel;
mod records;

use aggregator::coordinator::streams::{label, Stream};
use aggregator::coordinator::{Command, Coordinator, CoordinatorState, Event};
use device_agent::prune::{KeptIndicesExt, PruneConfig};
use device_agent::session::{
    AgentCommand, AgentConfig, AgentEvent, AgentSession, DeviceState, JobOutcome,
};
use device_agent::wire;
use protocol::KeptIndices;
use protocol::{Capabilities, DeviceId, FailReason, Message, Timestamp};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::compute::LocalTrainer;
use crate::config::ExperimentConfig;
use crate::error::SimError;
use crate::hardware::DeviceProfile;
use crate::queue::EventQueue;
use crate::report::{Report, RoundRecord};
use crate::sampling::exponential;
use crate::timing;
use jobs::JobInfo;
use panel::choose_devices;

/// Progress callbacks (the binary draws a progress bar; tests ignore them).
pub trait Observer {
    fn round_closed(&mut self, _record: &RoundRecord, _total_rounds: u64) {}
    fn job_started(&mut self) {}
    fn note(&mut self, _line: &str) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// One virtual device.
struct VDev {
    id: DeviceId,
    profile: usize,
    power_mode: f64,
    data_label: String,
    session: AgentSession,
    /// This device's sub-stream of the run's `availability` stream (start, churn, phase, power
    /// mode), which nothing else draws from: every strategy sees the same availability.
    availability: ChaCha8Rng,
    /// Availability components.
    window_on: bool,
    churn_on: bool,
    crashed: bool,
    started: bool,
    /// Daily-window phase: the device's local hour at virtual time 0.
    phase_h: f64,
    /// Whether a transport connection is up, and its epoch (messages of older epochs are lost).
    connected: bool,
    epoch: u64,
    /// The aggregator refused this device for good.
    refused: bool,
    up_free: Timestamp,
    down_free: Timestamp,
    timer_at: Option<Timestamp>,
    /// Incremented for every job; results of older jobs are stale.
    job_token: u64,
    job: Option<JobInfo>,
    /// The last round configuration the aggregator sent this device: (round, arm).
    sent_arm: Option<(u64, protocol::Arm)>,
    rounds_trained: u64,
    peak_mem: u64,
    history: crate::report::History,
    /// The kept maps' shape (heads, KV heads, channels per block) when its sparsity was last
    /// computed, and that sparsity: the fleet's mean is taken every round over every device,
    /// and most devices' maps have not changed since.
    sparsity_seen: Option<(Vec<[usize; 3]>, f64)>,
    /// Whether a job finished since `sparsity_seen` was taken (only a finished job changes a
    /// device's kept maps): the fleet's mean sparsity, taken every round, then reads no
    /// session state of the devices that did not train.
    sparsity_stale: bool,
}

impl VDev {
    fn online(&self) -> bool {
        self.started && self.window_on && self.churn_on && !self.crashed
    }
}

enum Ev {
    Start(usize),
    Churn(usize),
    Window(usize),
    Recover(usize),
    Crash {
        dev: usize,
        token: u64,
    },
    ToServer {
        dev: usize,
        epoch: u64,
        wire: Wire,
        bytes: u64,
    },
    ToDevice {
        dev: usize,
        epoch: u64,
        wire: Wire,
        bytes: u64,
    },
    JobDone {
        dev: usize,
        token: u64,
        result: Box<Result<JobOutcome, FailReason>>,
    },
    DeviceTimer(usize),
    CoordTimer,
}

/// A configured simulation, ready to run.
pub struct Simulation<'a> {
    cfg: ExperimentConfig,
    profiles: Vec<DeviceProfile>,
    devices: Vec<VDev>,
    coordinator: Coordinator,
    /// Per-round device noise (speed draw, dropout), read by (device, round).
    device_round: Stream,
    coord_timer: Option<Timestamp>,
    queue: EventQueue<Ev>,
    now: Timestamp,
    trainer: &'a mut dyn LocalTrainer,
    observer: &'a mut dyn Observer,
    rounds: Vec<RoundRecord>,
    panel: Vec<usize>,
    last_progress: Timestamp,
    jobs_trained: u64,
    dropped_total: u64,
    bytes_up_total: u64,
    bytes_down_total: u64,
    /// Sparsity by kept counts per block (see `records.rs`).
    sparsity_memo: std::collections::HashMap<Vec<[usize; 3]>, f64>,
    /// Per device: whether it poisons its updates (`[byzantine]`), and the poisoned updates sent.
    attackers: Vec<bool>,
    poisoned_sent: u64,
    /// Frame buffers whose message was delivered, reused by the next sends (a 10,000-device
    /// run would otherwise allocate and free one per message).
    frame_pool: Vec<Vec<u8>>,
    /// Whether messages travel encoded (real mode) or as themselves (surrogate mode).
    encode_frames: bool,
}

/// What a link carries: the encoded frame, or the message itself (see the module docs).
enum Wire {
    Frame(Vec<u8>),
    Message(Box<Message>),
}

/// The session's failure event for a job that could not run.
/// The message in a frame the simulator encoded itself (`what` says which way it went).
fn decode(frame: &[u8], what: &str) -> Result<Message, SimError> {
    match protocol::decode_frame(frame, protocol::MAX_FRAME_BYTES) {
        Ok(protocol::Decoded::Frame { message, .. }) => Ok(message),
        other => Err(SimError::Coordinator(format!(
            "a frame {what} did not decode: {other:?}"
        ))),
    }
}

fn ms_to_s(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl<'a> Simulation<'a> {
    /// Set up devices (profiles in fleet order, one data label per device), the coordinator
    /// for the trainer's model, and the start events.
    pub fn new(
        cfg: ExperimentConfig,
        profiles: Vec<DeviceProfile>,
        data_labels: Vec<String>,
        trainer: &'a mut dyn LocalTrainer,
        observer: &'a mut dyn Observer,
    ) -> Result<Self, SimError> {
        if profiles.len() != data_labels.len() {
            return Err(SimError::Config(format!(
                "{} profiles but {} data shards",
                profiles.len(),
                data_labels.len()
            )));
        }
        let dense = trainer.dense().clone();
        let dims = wire::dims_of(&dense);
        let coordinator = Coordinator::new(cfg.coordinator.clone(), dims)
            .map_err(|e| SimError::Coordinator(e.to_string()))?;
        let mut queue = EventQueue::new();
        let mut devices = Vec::with_capacity(profiles.len());
        // Distinct profiles by name (devices refer to them by index).
        let mut uniq: Vec<DeviceProfile> = Vec::new();
        for (i, (p, label)) in profiles.into_iter().zip(data_labels).enumerate() {
            let pi = match uniq.iter().position(|q| q == &p) {
                Some(k) => k,
                None => {
                    uniq.push(p);
                    uniq.len() - 1
                }
            };
            let prof = &uniq[pi];
            let mut rng = Stream::new(cfg.seed, label::AVAILABILITY).rng_for(i as u64 + 1);
            let power_mode = prof.power_modes[rng.random_range(0..prof.power_modes.len())];
            let phase_h = rng.random::<f64>() * 24.0;
            let churn_on = prof.mean_online_min <= 0.0
                || rng.random::<f64>()
                    < prof.mean_online_min / (prof.mean_online_min + prof.mean_offline_min);
            let window_on = in_window(&prof.windows_h, phase_h);
            let id = DeviceId(i as u64 + 1);
            let agent = AgentConfig {
                device_id: id,
                capabilities: Capabilities {
                    ram_bytes: prof.ram_bytes(),
                    backend: "sim".into(),
                    bench_score: None,
                    // The profile's name, as an operator would name the board (a bandit
                    // scope of `class` shares rewards by it); a name the protocol would refuse
                    // declares none.
                    device_class: protocol::check_device_class(&prof.name)
                        .ok()
                        .map(|()| prof.name.clone()),
                },
                criterion: cfg.pruning.criterion,
                prune: PruneConfig {
                    per_block: cfg.pruning.per_block,
                    ..PruneConfig::for_layers(dense.n_layers())
                },
                min_prune_events: cfg.pruning.min_events,
                f16_updates: false,
                costs: trainer.costs(i),
                limits: device_agent::session::RoundLimits::default(),
                // Real mode trains from the adapter when a round brings no global slice; the surrogate
                // reads none, so it keeps none (most of a 10,000-device fleet's memory otherwise).
                keep_adapter: trainer.mode() == "real",
            };
            let state = DeviceState {
                kept: KeptIndices::dense(&dense),
                adapter: None,
                importance: Default::default(),
            };
            let start =
                Timestamp((rng.random::<f64>() * cfg.fleet.connect_spread_s * 1000.0) as u64);
            queue.push(start, Ev::Start(i));
            devices.push(VDev {
                id,
                profile: pi,
                power_mode,
                data_label: label,
                session: AgentSession::new(agent, state),
                availability: rng,
                window_on,
                churn_on,
                crashed: false,
                started: false,
                phase_h,
                connected: false,
                epoch: 0,
                refused: false,
                up_free: Timestamp(0),
                down_free: Timestamp(0),
                timer_at: None,
                job_token: 0,
                job: None,
                sent_arm: None,
                rounds_trained: 0,
                peak_mem: 0,
                history: Vec::new(),
                sparsity_seen: None,
                sparsity_stale: true,
            });
        }
        let panel_seed = Stream::new(cfg.seed, label::EVALUATION).at(0, 0);
        let panel = choose_devices(&devices, &uniq, cfg.eval.panel_devices, panel_seed);
        let device_round = Stream::new(cfg.seed, label::DEVICE_ROUND);
        let mut attackers = vec![false; devices.len()];
        if !cfg.byzantine.is_off() {
            for i in crate::byzantine::choose(&cfg.byzantine, cfg.seed, devices.len()) {
                attackers[i] = true;
            }
        }
        let encode_frames = trainer.mode() == "real";
        Ok(Simulation {
            attackers,
            poisoned_sent: 0,
            device_round,
            cfg,
            profiles: uniq,
            devices,
            coordinator,
            coord_timer: None,
            queue,
            now: Timestamp(0),
            trainer,
            observer,
            rounds: Vec::new(),
            panel,
            last_progress: Timestamp(0),
            jobs_trained: 0,
            dropped_total: 0,
            bytes_up_total: 0,
            bytes_down_total: 0,
            sparsity_memo: std::collections::HashMap::new(),
            frame_pool: Vec::new(),
            encode_frames,
        })
    }

    fn profile(&self, dev: usize) -> &DeviceProfile {
        &self.profiles[self.devices[dev].profile]
    }

    /// Run to the end (last round, time limit or a stall) and build the report.
    pub fn run(self) -> Result<Report, SimError> {
        self.run_with_state().map(|(r, _)| r)
    }

    /// [`Simulation::run`], also returning the coordinator's final state (devices' bandits,
    /// counters, global adapter) for inspection.
    pub fn run_with_state(mut self) -> Result<(Report, CoordinatorState), SimError> {
        let limit = Timestamp((self.cfg.max_virtual_hours * 3_600_000.0) as u64);
        let stall_ms = (self.cfg.coordinator.round_deadline_ms.saturating_mul(20)).max(86_400_000);
        let mut ended_by = "stalled";
        while let Some((t, ev)) = self.queue.pop() {
            if t > limit {
                ended_by = "time_limit";
                break;
            }
            self.now = t;
            self.dispatch(ev)?;
            if self.coordinator.is_finished() {
                ended_by = "finished";
                break;
            }
            if self.now.ms_since(self.last_progress) > stall_ms {
                self.observer.note(
                    "no round closed for a long virtual time: stopping (too few devices online?)",
                );
                break;
            }
        }
        self.finish(ended_by)
    }

    fn dispatch(&mut self, ev: Ev) -> Result<(), SimError> {
        match ev {
            Ev::Start(i) => {
                self.devices[i].started = true;
                let p = self.profile(i).clone();
                if p.mean_online_min > 0.0 {
                    let mean = if self.devices[i].churn_on {
                        p.mean_online_min
                    } else {
                        p.mean_offline_min
                    };
                    let d = exponential(mean * 60_000.0, &mut self.devices[i].availability) as u64;
                    self.queue.push(self.now.plus_ms(d.max(1)), Ev::Churn(i));
                }
                self.schedule_window(i);
                self.availability_changed(i)?;
            }
            Ev::Churn(i) => {
                let p = self.profile(i).clone();
                let d = &mut self.devices[i];
                d.churn_on = !d.churn_on;
                let mean = if d.churn_on {
                    p.mean_online_min
                } else {
                    p.mean_offline_min
                };
                let dur = exponential(mean * 60_000.0, &mut d.availability) as u64;
                self.queue.push(self.now.plus_ms(dur.max(1)), Ev::Churn(i));
                self.availability_changed(i)?;
            }
            Ev::Window(i) => {
                let h = self.local_hour(i);
                let on = in_window(&self.profile(i).windows_h, h);
                self.devices[i].window_on = on;
                self.schedule_window(i);
                self.availability_changed(i)?;
            }
            Ev::Recover(i) => {
                self.devices[i].crashed = false;
                self.availability_changed(i)?;
            }
            Ev::Crash { dev, token } => {
                if self.devices[dev].job_token == token {
                    let reconnect = (self.profile(dev).reconnect_s * 1000.0) as u64;
                    self.devices[dev].crashed = true;
                    self.dropped_total += 1;
                    self.queue
                        .push(self.now.plus_ms(reconnect.max(1)), Ev::Recover(dev));
                    self.availability_changed(dev)?;
                }
            }
            Ev::ToServer {
                dev,
                epoch,
                wire,
                bytes,
            } => {
                if self.devices[dev].epoch != epoch || !self.devices[dev].connected {
                    return Ok(());
                }
                let msg = self.unpack(wire, "from a device")?;
                let id = self.devices[dev].id;
                let cmds = self.coordinator.handle(
                    self.now,
                    Event::Message {
                        device: id,
                        msg,
                        bytes,
                    },
                );
                self.apply_coordinator(cmds)?;
            }
            Ev::ToDevice {
                dev,
                epoch,
                wire,
                bytes,
            } => {
                if self.devices[dev].epoch != epoch || !self.devices[dev].connected {
                    return Ok(());
                }
                let msg = self.unpack(wire, "to a device")?;
                let cmds = self.devices[dev]
                    .session
                    .handle(self.now, AgentEvent::Message { msg, bytes });
                self.apply_session(dev, cmds)?;
            }
            Ev::JobDone { dev, token, result } => {
                if self.devices[dev].job_token != token {
                    return Ok(());
                }
                let cmds = self.devices[dev]
                    .session
                    .handle(self.now, AgentEvent::JobDone(*result));
                self.devices[dev].sparsity_stale = true;
                self.apply_session(dev, cmds)?;
            }
            Ev::DeviceTimer(i) => {
                let d = &mut self.devices[i];
                if d.timer_at == Some(self.now) {
                    d.timer_at = None;
                }
                if d.session.poll_timeout().is_some_and(|t| t <= self.now) {
                    if let Some(steps) = d.job.as_ref().and_then(|j| j.steps_done(self.now)) {
                        d.session.set_progress(steps);
                    }
                    let cmds = d.session.handle_timeout(self.now);
                    self.apply_session(i, cmds)?;
                } else {
                    self.schedule_device_timer(i);
                }
            }
            Ev::CoordTimer => {
                if self
                    .coordinator
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    self.coord_timer = None;
                    let cmds = self.coordinator.handle_timeout(self.now);
                    self.apply_coordinator(cmds)?;
                }
            }
        }
        Ok(())
    }

    fn local_hour(&self, i: usize) -> f64 {
        (self.now.0 as f64 / 3_600_000.0 + self.devices[i].phase_h).rem_euclid(24.0)
    }

    fn schedule_window(&mut self, i: usize) {
        let windows = self.profile(i).windows_h.clone();
        if windows.is_empty() {
            return;
        }
        let h = self.local_hour(i);
        // The next boundary strictly after the current local hour (wrapping at 24).
        let mut bounds: Vec<f64> = windows.iter().flat_map(|w| [w[0], w[1]]).collect();
        bounds.push(24.0);
        let next = bounds
            .iter()
            .copied()
            .filter(|&b| b > h + 1e-9)
            .fold(f64::INFINITY, f64::min);
        let wait_h = if next.is_finite() { next - h } else { 24.0 - h };
        let ms = (wait_h * 3_600_000.0).ceil().max(1.0) as u64;
        self.queue.push(self.now.plus_ms(ms), Ev::Window(i));
    }

    /// Re-evaluate whether device `i` is online and connect or disconnect it.
    fn availability_changed(&mut self, i: usize) -> Result<(), SimError> {
        let online = self.devices[i].online();
        let d = &self.devices[i];
        if online && !d.connected && !d.refused {
            self.connect(i)
        } else if !online && d.connected {
            self.disconnect(i, true)
        } else {
            Ok(())
        }
    }

    fn connect(&mut self, i: usize) -> Result<(), SimError> {
        let d = &mut self.devices[i];
        d.connected = true;
        d.epoch += 1;
        let id = d.id;
        let cmds = self
            .coordinator
            .handle(self.now, Event::Connected { device: id });
        self.apply_coordinator(cmds)?;
        let cmds = self.devices[i]
            .session
            .handle(self.now, AgentEvent::Connected);
        self.apply_session(i, cmds)
    }

    /// The connection of device `i` ends; with `restart`, the agent process is gone too (its
    /// job is lost; its next connection gets a fresh session with the saved state).
    fn disconnect(&mut self, i: usize, restart: bool) -> Result<(), SimError> {
        let d = &mut self.devices[i];
        d.connected = false;
        d.epoch += 1;
        if restart {
            d.job_token += 1;
            if let Some(j) = &mut d.job {
                if j.state == "running" {
                    j.state = "dropped";
                }
            }
            d.session.restart();
            d.timer_at = None;
        } else {
            let _ = d.session.handle(self.now, AgentEvent::Disconnected);
        }
        let id = d.id;
        let cmds = self
            .coordinator
            .handle(self.now, Event::Disconnected { device: id });
        self.apply_coordinator(cmds)
    }

    /// Frame buffers kept for reuse, and the largest capacity kept (a full-model frame is not
    /// held on to).
    const FRAME_POOL: usize = 256;
    const FRAME_KEEP_BYTES: usize = 4 << 20;

    /// `msg` ready for a link with its size in bytes (the trainer's `wire_bytes` of its frame
    /// length): encoded with the real codec into a reused buffer, or, in surrogate mode, sized
    /// by the codec and carried as it is.
    fn pack(&mut self, msg: Message) -> Result<(Wire, usize), protocol::CodecError> {
        if !self.encode_frames {
            let bytes = self.trainer.wire_bytes(&msg, protocol::frame_len(&msg)?);
            return Ok((Wire::Message(Box::new(msg)), bytes));
        }
        let mut frame = self.frame_pool.pop().unwrap_or_default();
        frame.clear();
        protocol::encode_frame_into(&msg, &mut frame)?;
        let bytes = self.trainer.wire_bytes(&msg, frame.len());
        Ok((Wire::Frame(frame), bytes))
    }

    /// The message a link delivered (`what` says which way it went).
    fn unpack(&mut self, wire: Wire, what: &str) -> Result<Message, SimError> {
        match wire {
            Wire::Message(msg) => Ok(*msg),
            Wire::Frame(frame) => {
                let msg = decode(&frame, what)?;
                self.recycle(frame);
                Ok(msg)
            }
        }
    }

    /// Returns a delivered frame's buffer to the pool.
    fn recycle(&mut self, frame: Vec<u8>) {
        if self.frame_pool.len() < Self::FRAME_POOL && frame.capacity() <= Self::FRAME_KEEP_BYTES {
            self.frame_pool.push(frame);
        }
    }

    /// Schedule a frame on a link; returns the arrival time.
    fn link(
        free: &mut Timestamp,
        now: Timestamp,
        bytes: usize,
        mbps: f64,
        rtt_ms: f64,
    ) -> Timestamp {
        let start = (*free).max(now);
        let serialise = timing::transfer_ms(bytes, mbps, 0.0);
        *free = start.plus_ms(serialise);
        start.plus_ms(serialise + rtt_ms.ceil() as u64)
    }

    fn send_to_server(&mut self, i: usize, mut msg: Message) -> Result<(), SimError> {
        if !self.devices[i].connected {
            return Ok(());
        }
        // A Byzantine device poisons what it sends, after training honestly.
        if let (Message::Update(u), true) = (&mut msg, self.attackers[i]) {
            crate::byzantine::poison(u, self.cfg.byzantine.attack, self.cfg.seed, i)?;
            self.poisoned_sent += 1;
        }
        let (wire, bytes) = self
            .pack(msg)
            .map_err(|e| SimError::Coordinator(format!("cannot encode a device message: {e}")))?;
        let (up, rtt) = (self.profile(i).uplink_mbps, self.profile(i).rtt_ms);
        let d = &mut self.devices[i];
        let at = Self::link(&mut d.up_free, self.now, bytes, up, rtt);
        self.bytes_up_total += bytes as u64;
        let epoch = d.epoch;
        self.queue.push(
            at,
            Ev::ToServer {
                dev: i,
                epoch,
                wire,
                bytes: bytes as u64,
            },
        );
        Ok(())
    }

    fn send_to_device(&mut self, i: usize, msg: Message) -> Result<(), SimError> {
        if let Message::RoundConfig(rc) = &msg {
            self.devices[i].sent_arm = Some((rc.round.0, rc.arm));
        }
        if !self.devices[i].connected {
            return Ok(());
        }
        let (wire, bytes) = self.pack(msg).map_err(|e| {
            SimError::Coordinator(format!("cannot encode an aggregator message: {e}"))
        })?;
        let (down, rtt) = (self.profile(i).downlink_mbps, self.profile(i).rtt_ms);
        let d = &mut self.devices[i];
        let at = Self::link(&mut d.down_free, self.now, bytes, down, rtt);
        self.bytes_down_total += bytes as u64;
        let epoch = d.epoch;
        self.queue.push(
            at,
            Ev::ToDevice {
                dev: i,
                epoch,
                wire,
                bytes: bytes as u64,
            },
        );
        Ok(())
    }

    fn index_of(&self, id: DeviceId) -> Option<usize> {
        let i = id.0.checked_sub(1)? as usize;
        (i < self.devices.len()).then_some(i)
    }

    fn apply_coordinator(&mut self, cmds: Vec<Command>) -> Result<(), SimError> {
        for c in cmds {
            match c {
                Command::Send { device, msg } => {
                    if let Some(i) = self.index_of(device) {
                        self.send_to_device(i, msg)?;
                    }
                }
                Command::Disconnect { device, reason } => {
                    if let Some(i) = self.index_of(device) {
                        tracing::debug!(%device, %reason, "aggregator closed the connection");
                        if self.devices[i].connected {
                            self.devices[i].refused = true;
                            self.disconnect(i, false)?;
                        }
                    }
                }
                Command::RoundClosed(summary) => self.round_closed(*summary)?,
                Command::Checkpoint | Command::Finished => {}
            }
        }
        self.schedule_coord_timer();
        Ok(())
    }

    fn schedule_coord_timer(&mut self) {
        match self.coordinator.poll_timeout() {
            Some(t) if self.coord_timer != Some(t) => {
                self.coord_timer = Some(t);
                self.queue.push(t.max(self.now), Ev::CoordTimer);
            }
            Some(_) => {}
            None => self.coord_timer = None,
        }
    }

    fn schedule_device_timer(&mut self, i: usize) {
        let d = &mut self.devices[i];
        match d.session.poll_timeout() {
            Some(t) if d.timer_at != Some(t) => {
                d.timer_at = Some(t);
                self.queue.push(t.max(self.now), Ev::DeviceTimer(i));
            }
            Some(_) => {}
            None => d.timer_at = None,
        }
    }

    fn apply_session(&mut self, i: usize, cmds: Vec<AgentCommand>) -> Result<(), SimError> {
        for c in cmds {
            match c {
                AgentCommand::Send(msg) => self.send_to_server(i, msg)?,
                AgentCommand::Train { job, state } => self.start_job(i, *job, state)?,
                // A virtual job cannot stop early: its result still arrives at its virtual end
                // and the session drops it (the round was reported failed at its deadline).
                AgentCommand::Cancel(_) => {}
                AgentCommand::Close(reason) => {
                    tracing::debug!(device = %self.devices[i].id, %reason, "device closed its session");
                    if self.devices[i].connected {
                        self.devices[i].refused = true;
                        self.disconnect(i, false)?;
                    }
                }
            }
        }
        self.schedule_device_timer(i);
        Ok(())
    }
}

/// Whether local hour `h` falls in one of `windows` (empty = always).
fn in_window(windows: &[[f64; 2]], h: f64) -> bool {
    windows.is_empty() || windows.iter().any(|w| w[0] <= h && h < w[1])
}
