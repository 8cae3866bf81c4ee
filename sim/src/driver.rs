//! The discrete-event driver: one [`Coordinator`] and one [`AgentSession`] per virtual device,
//! advanced on a virtual clock by a queue of timed events (message deliveries, finished local
//! rounds, the cores' timers, availability changes and dropouts). Events at the same instant
//! run in the order they were scheduled, so a seed fixes the run.
//!
//! The driver plays the parts the real deployment gives to hardware and transport:
//! - **Links.** A message is encoded with the real codec; it arrives `bytes / rate + rtt` after
//!   its link (the device's uplink or downlink, one message at a time) is free, and is decoded
//!   on arrival. Messages of a connection that closed meanwhile are lost.
//! - **Compute.** A session's `Train` command runs the local round at once (real training or
//!   the surrogate) and its result is delivered after the virtual compute time. Before
//!   training, the round's peak memory (the device's current pruned shape at the arm's rank)
//!   is compared with the profile's RAM: over it, the round fails with `OutOfMemory` after the
//!   time of one step, as it would on the device.
//! - **Availability and dropouts.** Devices come online after a random delay, follow their
//!   profile's daily windows and on/off churn, and a selected device may drop out during its
//!   round (its job is lost; it restarts with its saved state after `reconnect_s`). Going
//!   offline ends the connection: the coordinator sees `Disconnected`, the device a fresh
//!   session on its next connection (the agent process restarted), with its kept maps and
//!   adapter kept, as an agent persists them.
//!
//! Everything else (rounds, selection, arms, aggregation, rewards, rejects) is the coordinator's
//! and the session's own code.

use std::collections::BTreeMap;

use aggregator::coordinator::{Command, Coordinator, CoordinatorState, Event, RoundSummary};
use device_agent::prune::{KeptIndicesExt, PruneConfig};
use device_agent::session::{
    AgentCommand, AgentConfig, AgentEvent, AgentSession, DeviceState, JobOutcome, TrainJob,
};
use device_agent::{cost, wire};
use protocol::{Capabilities, DeviceId, FailReason, KeptIndices, Message, Timestamp};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{ExperimentConfig, TargetMetric};
use crate::error::SimError;
use crate::profile::DeviceProfile;
use crate::queue::EventQueue;
use crate::report::{ClassSummary, DeviceFinal, EvalRecord, Play, Report, RoundRecord, Summary};
use crate::sampling::{exponential, truncated_normal};
use crate::timing;
use crate::trainer::{LocalTrainer, Quality};

/// Progress callbacks (the binary draws a progress bar; tests ignore them).
pub trait Observer {
    fn round_closed(&mut self, _record: &RoundRecord, _total_rounds: u64) {}
    fn job_started(&mut self) {}
    fn note(&mut self, _line: &str) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// What a device's current local round is doing.
#[derive(Debug, Clone)]
struct JobInfo {
    round: u64,
    started: Timestamp,
    done_at: Timestamp,
    steps: usize,
    compute_ms: Option<u64>,
    /// `running`, `out_of_memory`, `dropped`, `error`.
    state: &'static str,
}

/// One virtual device.
struct VDev {
    id: DeviceId,
    profile: usize,
    power_mode: f64,
    data_label: String,
    session: AgentSession,
    rng: ChaCha8Rng,
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
    last_config_bytes: u64,
    /// The last round configuration the aggregator sent this device: (round, arm).
    sent_arm: Option<(u64, protocol::Arm)>,
    rounds_trained: u64,
    peak_mem: u64,
    history: Vec<(u64, f64, u32, String)>,
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
        frame: Vec<u8>,
        bytes: u64,
    },
    ToDevice {
        dev: usize,
        epoch: u64,
        frame: Vec<u8>,
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
}

/// The session's failure event for a job that could not run.
fn job_failed(reason: FailReason) -> AgentEvent {
    AgentEvent::JobDone(Err(reason))
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
            let mut rng =
                ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xd3_u64.wrapping_mul(0x0100_0000_01b3));
            rng.set_stream(i as u64 + 1);
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
                },
                criterion: device_agent::prune::Criterion::LoraGradient,
                prune: PruneConfig::for_layers(dense.n_layers()),
                f16_updates: false,
            };
            let state = DeviceState {
                kept: KeptIndices::dense(&dense),
                adapter: None,
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
                rng,
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
                last_config_bytes: 0,
                sent_arm: None,
                rounds_trained: 0,
                peak_mem: 0,
                history: Vec::new(),
            });
        }
        let panel = choose_devices(&devices, &uniq, cfg.eval.panel_devices, cfg.seed ^ 0x9a_e1);
        Ok(Simulation {
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
                    let d = exponential(mean * 60_000.0, &mut self.devices[i].rng) as u64;
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
                let dur = exponential(mean * 60_000.0, &mut d.rng) as u64;
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
                frame,
                bytes,
            } => {
                if self.devices[dev].epoch != epoch || !self.devices[dev].connected {
                    return Ok(());
                }
                let msg = match protocol::decode_frame(&frame, protocol::MAX_FRAME_BYTES) {
                    Ok(protocol::Decoded::Frame { message, .. }) => message,
                    other => {
                        return Err(SimError::Coordinator(format!(
                            "a frame from a device did not decode: {other:?}"
                        )))
                    }
                };
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
                frame,
                bytes,
            } => {
                if self.devices[dev].epoch != epoch || !self.devices[dev].connected {
                    return Ok(());
                }
                let msg = match protocol::decode_frame(&frame, protocol::MAX_FRAME_BYTES) {
                    Ok(protocol::Decoded::Frame { message, .. }) => message,
                    other => {
                        return Err(SimError::Coordinator(format!(
                            "a frame to a device did not decode: {other:?}"
                        )))
                    }
                };
                if let Message::RoundConfig(_) = &msg {
                    self.devices[dev].last_config_bytes = bytes;
                }
                let cmds = self.devices[dev]
                    .session
                    .handle(self.now, AgentEvent::Message(msg));
                self.apply_session(dev, cmds)?;
            }
            Ev::JobDone { dev, token, result } => {
                if self.devices[dev].job_token != token {
                    return Ok(());
                }
                let event = match *result {
                    Ok(outcome) => AgentEvent::JobDone(Ok(outcome)),
                    Err(reason) => job_failed(reason),
                };
                let cmds = self.devices[dev].session.handle(self.now, event);
                self.apply_session(dev, cmds)?;
            }
            Ev::DeviceTimer(i) => {
                let d = &mut self.devices[i];
                if d.timer_at == Some(self.now) {
                    d.timer_at = None;
                }
                if d.session.poll_timeout().is_some_and(|t| t <= self.now) {
                    if let Some(j) = &d.job {
                        if j.state == "running" && j.done_at > j.started {
                            let frac = self.now.ms_since(j.started) as f64
                                / j.done_at.ms_since(j.started) as f64;
                            d.session
                                .set_progress((frac.min(1.0) * j.steps as f64) as u32);
                        }
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
            let fresh = AgentSession::new(d.session.config.clone(), d.session.state.clone());
            d.session = fresh;
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
        if let Message::Update(u) = &mut msg {
            // The transport fills in the update's own size (fixed-width encoding: the value
            // does not change the length).
            let len = protocol::encode_frame(&Message::Update(u.clone()))
                .map(|f| f.len())
                .unwrap_or(0);
            u.stats.bytes_up = self.trainer.wire_bytes(&Message::Update(u.clone()), len) as u64;
        }
        let frame = protocol::encode_frame(&msg)
            .map_err(|e| SimError::Coordinator(format!("cannot encode a device message: {e}")))?;
        let bytes = self.trainer.wire_bytes(&msg, frame.len());
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
                frame,
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
        let frame = protocol::encode_frame(&msg).map_err(|e| {
            SimError::Coordinator(format!("cannot encode an aggregator message: {e}"))
        })?;
        let bytes = self.trainer.wire_bytes(&msg, frame.len());
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
                frame,
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
                AgentCommand::Train(job) => self.start_job(i, *job)?,
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

    /// A session asked to train: check memory, maybe drop out, else run the round now and
    /// deliver its result after the virtual compute time.
    fn start_job(&mut self, i: usize, job: TrainJob) -> Result<(), SimError> {
        self.observer.job_started();
        let profile = self.profile(i).clone();
        let d = &mut self.devices[i];
        d.job_token += 1;
        let token = d.job_token;
        let rank = job.arm.rank as usize;
        let pre = self.trainer.cost_config(&d.session.state.kept);
        let seq = self.trainer.seq_len(i);
        let draw = truncated_normal(1.0, profile.variability, &mut d.rng);
        let gflops = profile.train_gflops * d.power_mode * draw;
        let step_ms =
            timing::compute_ms(cost::train_step_flops(&pre, rank, job.batch, seq), gflops);
        let mut info = JobInfo {
            round: job.round.0,
            started: self.now,
            done_at: self.now,
            steps: job.local_steps,
            compute_ms: None,
            state: "running",
        };
        let need = timing::peak_memory(&pre, rank, job.batch, seq);
        let ram = profile.ram_bytes();
        if need > ram {
            info.state = "out_of_memory";
            info.done_at = self.now.plus_ms(step_ms);
            d.job = Some(info);
            let result = Box::new(Err(FailReason::OutOfMemory {
                needed_bytes: need,
                ram_bytes: ram,
            }));
            self.queue.push(
                self.now.plus_ms(step_ms),
                Ev::JobDone {
                    dev: i,
                    token,
                    result,
                },
            );
            return Ok(());
        }
        if d.rng.random::<f64>() < profile.dropout_prob {
            // The device goes away at a uniform point of the round's expected duration; its work
            // is lost, so it is not computed.
            let expected = step_ms.saturating_mul(job.local_steps as u64);
            let at = self
                .now
                .plus_ms((d.rng.random::<f64>() * expected as f64) as u64);
            info.state = "dropped";
            d.job = Some(info);
            self.queue.push(at, Ev::Crash { dev: i, token });
            return Ok(());
        }
        let state = d.session.state.clone();
        let agent = d.session.config.clone();
        match self.trainer.train(i, &job, &state, &agent) {
            Ok(trained) => {
                let mut outcome = trained.outcome;
                let ms = timing::compute_ms(trained.flops.total(), gflops);
                outcome.stats.compute_ms = ms;
                outcome.stats.bytes_down = self.devices[i].last_config_bytes;
                let d = &mut self.devices[i];
                d.peak_mem = d.peak_mem.max(outcome.stats.peak_mem_bytes);
                d.rounds_trained += 1;
                info.compute_ms = Some(ms);
                info.done_at = self.now.plus_ms(ms);
                d.job = Some(info);
                self.jobs_trained += 1;
                self.queue.push(
                    self.now.plus_ms(ms),
                    Ev::JobDone {
                        dev: i,
                        token,
                        result: Box::new(Ok(outcome)),
                    },
                );
            }
            Err(e) => {
                info.state = "error";
                info.done_at = self.now.plus_ms(step_ms);
                self.devices[i].job = Some(info);
                self.queue.push(
                    self.now.plus_ms(step_ms),
                    Ev::JobDone {
                        dev: i,
                        token,
                        result: Box::new(Err(FailReason::Error(e))),
                    },
                );
            }
        }
        Ok(())
    }

    fn class_of(&self, i: usize) -> String {
        self.profile(i).class.clone()
    }

    fn sparsity_of(&self, i: usize) -> f64 {
        self.trainer
            .cost_config(&self.devices[i].session.state.kept)
            .sparsity()
    }

    fn round_closed(&mut self, s: RoundSummary) -> Result<(), SimError> {
        self.last_progress = self.now;
        let round = s.round.0;
        let mut plays = Vec::new();
        let mut dropped = 0;
        let mut participants_for_trainer = Vec::new();
        for p in &s.participants {
            let Some(i) = self.index_of(p.device) else {
                continue;
            };
            participants_for_trainer.push((i, p.reward));
            plays.push(Play {
                device: p.device.0,
                class: self.class_of(i),
                prune_ratio: p.arm.prune_ratio,
                rank: p.arm.rank,
                outcome: "accepted".into(),
                reward: Some(p.reward),
                sparsity: Some(p.sparsity as f64),
                compute_s: Some(ms_to_s(p.compute_ms)),
                duration_s: Some(ms_to_s(p.duration_ms)),
                peak_mem_mib: Some(p.peak_mem_bytes as f64 / (1 << 20) as f64),
                loss_pre: Some(p.loss_pre as f64),
                loss_post: Some(p.loss_post as f64),
                sparsity_prev: Some(p.sparsity_prev),
                delta_norm: Some(p.delta_norm),
                steps: Some(self.cfg.coordinator.local_steps as u64),
            });
        }
        for f in &s.failed {
            let Some(i) = self.index_of(f.device) else {
                continue;
            };
            plays.push(Play {
                device: f.device.0,
                class: self.class_of(i),
                prune_ratio: f.arm.prune_ratio,
                rank: f.arm.rank,
                outcome: f.kind.clone(),
                reward: Some(0.0),
                ..Play::empty()
            });
        }
        for &m in &s.missed {
            let Some(i) = self.index_of(m) else { continue };
            let (ratio, rank) = match self.devices[i].sent_arm {
                Some((r, a)) if r == round => (a.prune_ratio, a.rank),
                _ => (f64::NAN, 0),
            };
            let job = self.devices[i].job.clone().filter(|j| j.round == round);
            let outcome = match job.as_ref().map(|j| j.state) {
                Some("dropped") => {
                    dropped += 1;
                    "dropped"
                }
                _ => "missed",
            };
            let compute_s = job.and_then(|j| j.compute_ms).map(ms_to_s);
            plays.push(Play {
                device: m.0,
                class: self.class_of(i),
                prune_ratio: ratio,
                rank,
                outcome: outcome.into(),
                reward: Some(0.0),
                compute_s,
                ..Play::empty()
            });
        }
        plays.sort_by_key(|p| p.device);
        for p in &plays {
            if let Some(i) = self.index_of(DeviceId(p.device)) {
                self.devices[i]
                    .history
                    .push((round, p.prune_ratio, p.rank, p.outcome.clone()));
            }
        }
        self.trainer
            .round_closed(s.aggregated, &participants_for_trainer);
        let fleet_sparsity = (0..self.devices.len())
            .map(|i| self.sparsity_of(i))
            .sum::<f64>()
            / self.devices.len().max(1) as f64;
        let eval = if due(round, self.cfg.eval.every_rounds) || round >= self.cfg.coordinator.rounds
        {
            Some(self.evaluate_panel(round)?)
        } else {
            None
        };
        let record = RoundRecord {
            round,
            started_s: ms_to_s(s.started_at.0),
            closed_s: ms_to_s(s.closed_at.0),
            closed_by: s.closed_by.clone(),
            aggregated: s.aggregated,
            selected: s.selected.len(),
            accepted: s.participants.len(),
            missed: s.missed.len() - dropped,
            dropped,
            failed: s.failed.len(),
            rejects: s.rejects.clone(),
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
            mean_loss_pre: s.mean_loss_pre,
            mean_loss_post: s.mean_loss_post,
            fleet_sparsity,
            plays,
            eval,
        };
        self.observer
            .round_closed(&record, self.cfg.coordinator.rounds);
        self.rounds.push(record);
        Ok(())
    }

    fn evaluate_devices(&mut self, devices: &[usize]) -> Result<Vec<(usize, Quality)>, SimError> {
        let global = self.coordinator.global().clone();
        let alpha = self.cfg.coordinator.lora_alpha;
        let mut out = Vec::with_capacity(devices.len());
        for &i in devices {
            let state = self.devices[i].session.state.clone();
            let kept = state.kept.clone();
            let slice = global
                .global_slice(&kept, global.rank, alpha)
                .map_err(|e| {
                    SimError::Coordinator(format!("cannot slice the global adapter: {e}"))
                })?;
            let q = self
                .trainer
                .evaluate(i, &state, &slice)
                .map_err(SimError::Model)?;
            out.push((i, q));
        }
        Ok(out)
    }

    fn evaluate_panel(&mut self, round: u64) -> Result<EvalRecord, SimError> {
        let panel = self.panel.clone();
        let q = self.evaluate_devices(&panel)?;
        let n = q.len().max(1) as f64;
        let loss = q.iter().map(|(_, x)| x.loss).sum::<f64>() / n;
        let accuracy = q.iter().map(|(_, x)| x.accuracy).sum::<f64>() / n;
        let perplexity = q
            .iter()
            .all(|(_, x)| x.perplexity.is_some())
            .then(|| q.iter().filter_map(|(_, x)| x.perplexity).sum::<f64>() / n);
        Ok(EvalRecord {
            round,
            time_s: ms_to_s(self.now.0),
            loss,
            accuracy,
            perplexity,
            devices: q.len(),
        })
    }

    fn finish(mut self, ended_by: &str) -> Result<(Report, CoordinatorState), SimError> {
        let final_set = choose_devices(
            &self.devices,
            &self.profiles,
            self.cfg.eval.final_devices,
            self.cfg.seed ^ 0xf1_4a1,
        );
        let qualities: BTreeMap<usize, Quality> =
            self.evaluate_devices(&final_set)?.into_iter().collect();
        let prompt = self.cfg.eval.latency_prompt_tokens;
        let mut devices = Vec::with_capacity(self.devices.len());
        for i in 0..self.devices.len() {
            let cfg = self
                .trainer
                .cost_config(&self.devices[i].session.state.kept);
            let p = self.profile(i).clone();
            let d = &self.devices[i];
            devices.push(DeviceFinal {
                device: d.id.0,
                profile: p.name.clone(),
                class: p.class.clone(),
                data: d.data_label.clone(),
                power_mode: d.power_mode,
                sparsity: cfg.sparsity(),
                params: cfg.total_params() as u64,
                rounds_trained: d.rounds_trained,
                inference_ms: timing::inference_ms(&cfg, prompt, p.infer_gflops * d.power_mode),
                peak_mem_mib: d.peak_mem as f64 / (1 << 20) as f64,
                quality: qualities.get(&i).copied(),
                history: d.history.clone(),
            });
        }
        let summary = self.summarise(&devices, &qualities, ended_by);
        let config = serde_json::to_value(&self.cfg).unwrap_or(serde_json::Value::Null);
        let state = self.coordinator.state();
        Ok((
            Report {
                summary,
                rounds: self.rounds,
                devices,
                config,
            },
            state,
        ))
    }

    fn summarise(
        &self,
        devices: &[DeviceFinal],
        qualities: &BTreeMap<usize, Quality>,
        ended_by: &str,
    ) -> Summary {
        let counters = self.coordinator.counters();
        let e = &self.cfg.eval;
        let (target, reached) = match e.target_metric {
            TargetMetric::Accuracy => (
                format!("accuracy >= {}", e.target_value),
                self.rounds
                    .iter()
                    .filter_map(|r| r.eval.as_ref())
                    .find(|x| x.accuracy >= e.target_value),
            ),
            TargetMetric::Perplexity => (
                format!("perplexity <= {}", e.target_value),
                self.rounds
                    .iter()
                    .filter_map(|r| r.eval.as_ref())
                    .find(|x| x.perplexity.is_some_and(|p| p <= e.target_value)),
            ),
        };
        let n = devices.len().max(1) as f64;
        let trained: Vec<&DeviceFinal> = devices.iter().filter(|d| d.rounds_trained > 0).collect();
        let qn = qualities.len();
        let mean_q = |f: &dyn Fn(&Quality) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = qualities.values().filter_map(f).collect();
            (!v.is_empty() && v.len() == qn).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let mut by_class: BTreeMap<String, ClassSummary> = BTreeMap::new();
        for d in devices {
            let c = by_class.entry(d.class.clone()).or_default();
            c.devices += 1;
            c.mean_sparsity += d.sparsity;
            c.mean_inference_ms += d.inference_ms;
            c.max_peak_mem_mib = c.max_peak_mem_mib.max(d.peak_mem_mib);
        }
        for r in &self.rounds {
            for p in &r.plays {
                let c = by_class.entry(p.class.clone()).or_default();
                c.mean_ratio_played += p.prune_ratio;
                c.mean_rank_played += p.rank as f64;
                c.plays += 1;
            }
        }
        for c in by_class.values_mut() {
            let k = c.devices.max(1) as f64;
            c.mean_sparsity /= k;
            c.mean_inference_ms /= k;
            let p = c.plays.max(1) as f64;
            c.mean_ratio_played /= p;
            c.mean_rank_played /= p;
        }
        Summary {
            strategy: self.cfg.strategy.clone(),
            mode: self.trainer.mode().to_string(),
            devices: devices.len(),
            rounds_closed: self.rounds.len() as u64,
            rounds_aggregated: self.rounds.iter().filter(|r| r.aggregated).count() as u64,
            virtual_s: ms_to_s(self.now.0),
            target,
            time_to_target_s: reached.map(|x| x.time_s),
            final_accuracy: mean_q(&|q| Some(q.accuracy)),
            final_loss: mean_q(&|q| Some(q.loss)),
            final_perplexity: mean_q(&|q| q.perplexity),
            final_devices_evaluated: qn,
            last_panel_accuracy: self
                .rounds
                .iter()
                .rev()
                .find_map(|r| r.eval.as_ref())
                .map(|x| x.accuracy),
            mean_sparsity: devices.iter().map(|d| d.sparsity).sum::<f64>() / n,
            mean_sparsity_trained: if trained.is_empty() {
                0.0
            } else {
                trained.iter().map(|d| d.sparsity).sum::<f64>() / trained.len() as f64
            },
            devices_trained: trained.len(),
            mean_inference_ms: devices.iter().map(|d| d.inference_ms).sum::<f64>() / n,
            max_peak_mem_mib: devices.iter().map(|d| d.peak_mem_mib).fold(0.0, f64::max),
            bytes_up: self.bytes_up_total,
            bytes_down: self.bytes_down_total,
            rejects: counters.total_rejects(),
            missed: self.rounds.iter().map(|r| r.missed as u64).sum(),
            dropped: self.dropped_total,
            out_of_memory: counters.out_of_memory,
            jobs_trained: self.jobs_trained,
            by_class,
            ended_by: ended_by.to_string(),
        }
    }
}

/// Whether `round` is a multiple of `every` (`u64::is_multiple_of` needs Rust 1.87; the
/// workspace supports 1.85).
#[allow(clippy::manual_is_multiple_of)]
fn due(round: u64, every: u64) -> bool {
    every > 0 && round % every == 0
}

/// Whether local hour `h` falls in one of `windows` (empty = always).
fn in_window(windows: &[[f64; 2]], h: f64) -> bool {
    windows.is_empty() || windows.iter().any(|w| w[0] <= h && h < w[1])
}

/// `n` devices (all when `n == 0` or `n >= len`), stratified by profile and seeded.
fn choose_devices(devices: &[VDev], profiles: &[DeviceProfile], n: usize, seed: u64) -> Vec<usize> {
    if n == 0 || n >= devices.len() {
        return (0..devices.len()).collect();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); profiles.len()];
    for (i, d) in devices.iter().enumerate() {
        groups[d.profile].push(i);
    }
    for g in &mut groups {
        rand::seq::SliceRandom::shuffle(g.as_mut_slice(), &mut rng);
    }
    // Round-robin over groups, so every class is represented.
    let mut out = Vec::with_capacity(n);
    let mut k = 0;
    while out.len() < n {
        for g in &groups {
            if out.len() < n && k < g.len() {
                out.push(g[k]);
            }
        }
        k += 1;
    }
    out.sort_unstable();
    out
}
