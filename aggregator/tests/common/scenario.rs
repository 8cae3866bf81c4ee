//! The coordinator's scenario harness on virtual time: a scenario is a list of steps (connect,
//! join, answer, fail, vanish, let time pass) and its expectation the transcript of every
//! command the coordinator emitted, as an `expect-test` snapshot (re-bless with
//! `UPDATE_EXPECT=1`). Updates are tiny hand-made adapters on a two-block model: the device
//! "trains" by adding a fixed perturbation to the slice it received.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use aggregator::coordinator::{Command, Coordinator, CoordinatorConfig, Event, RoundSummary};
use aggregator::strategy::{FixedPruneConfig, StrategyConfig};
use expect_test::Expect;
use protocol::{
    DeviceId, FailReason, Message, RoundConfig, RoundFailed, RoundId, Timestamp, Update,
};

use super::{dims, join_msg, shifted_answer};

/// Three devices per round, no over-selection, half quorum, 1 s deadline, fixed arms.
pub fn config() -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        rounds: 3,
        devices_per_round: 3,
        over_selection: 0.0,
        quorum_fraction: 0.5,
        round_deadline_ms: 1_000,
        round_interval_ms: 10,
        local_steps: 4,
        prune_interval_steps: 2,
        max_rank: 8,
        seed: 7,
        strategy: StrategyConfig::FixedPrune(FixedPruneConfig {
            prune_ratio: 0.25,
            rank: 4,
        }),
        ..CoordinatorConfig::default()
    };
    c.arms.ranks = vec![2, 4, 8];
    c
}

pub enum Step {
    Connect(u64),
    /// Connect and join with the current protocol version and 4 GiB of RAM.
    Join(u64),
    /// Deliver a message as it is.
    Raw(u64, Message, u64),
    /// Answer the device's latest round configuration.
    Answer(u64),
    /// Answer the configuration of an earlier round.
    AnswerRound(u64, u64),
    /// Answer the latest configuration after changing the update.
    AnswerWith(u64, fn(&mut Update)),
    /// Answer with an update frame of this many bytes.
    AnswerSized(u64, u64),
    Fail(u64, FailReason),
    Vanish(u64),
    /// Let this many milliseconds pass, firing timers on the way.
    Wait(u64),
}

/// What the device sends back for `rc`: its slice with B shifted, a loss that falls with its
/// id, a compute time that grows with it.
pub fn answer(device: u64, rc: &RoundConfig) -> Update {
    shifted_answer(device, rc, 2.5 - 0.1 * device as f32, 100 * device)
}

pub struct Harness {
    pub coord: Coordinator,
    pub now: Timestamp,
    pub configs: BTreeMap<(u64, u64), RoundConfig>,
    pub latest: BTreeMap<u64, u64>,
    pub transcript: String,
    pub summaries: Vec<RoundSummary>,
}

impl Harness {
    pub fn new(config: CoordinatorConfig) -> Harness {
        Harness::from(Coordinator::new(config, dims()).unwrap())
    }

    pub fn from(coord: Coordinator) -> Harness {
        Harness {
            coord,
            now: Timestamp(0),
            configs: BTreeMap::new(),
            latest: BTreeMap::new(),
            transcript: String::new(),
            summaries: Vec::new(),
        }
    }

    pub fn event(&mut self, event: Event) {
        let cmds = self.coord.handle(self.now, event);
        self.record(cmds);
        self.drive(self.now);
    }

    /// Fires every timer due at or before `until`, in order.
    pub fn drive(&mut self, until: Timestamp) {
        while let Some(t) = self.coord.poll_timeout() {
            if t > until {
                break;
            }
            self.now = self.now.max(t);
            let cmds = self.coord.handle_timeout(self.now);
            self.record(cmds);
        }
        self.now = self.now.max(until);
    }

    pub fn deliver(&mut self, device: u64, msg: Message, bytes: u64) {
        self.event(Event::Message {
            device: DeviceId(device),
            msg,
            bytes,
        });
    }

    pub fn answer_round(
        &mut self,
        device: u64,
        round: u64,
        edit: impl FnOnce(&mut Update),
        bytes: u64,
    ) {
        let rc = self.configs[&(device, round)].clone();
        let mut update = answer(device, &rc);
        edit(&mut update);
        self.deliver(device, Message::Update(update), bytes);
    }

    pub fn step(&mut self, step: Step) {
        match step {
            Step::Connect(d) => self.event(Event::Connected {
                device: DeviceId(d),
            }),
            Step::Join(d) => {
                self.step(Step::Connect(d));
                self.deliver(d, join_msg(d), 64);
            }
            Step::Raw(d, msg, bytes) => self.deliver(d, msg, bytes),
            Step::Answer(d) => self.answer_round(d, self.latest[&d], |_| {}, 4096),
            Step::AnswerRound(d, r) => self.answer_round(d, r, |_| {}, 4096),
            Step::AnswerWith(d, f) => self.answer_round(d, self.latest[&d], f, 4096),
            Step::AnswerSized(d, bytes) => self.answer_round(d, self.latest[&d], |_| {}, bytes),
            Step::Fail(d, reason) => {
                let round = RoundId(self.latest[&d]);
                self.deliver(d, Message::RoundFailed(RoundFailed { round, reason }), 64);
            }
            Step::Vanish(d) => self.event(Event::Disconnected {
                device: DeviceId(d),
            }),
            Step::Wait(ms) => {
                let until = self.now.plus_ms(ms);
                self.drive(until);
            }
        }
    }

    pub fn record(&mut self, cmds: Vec<Command>) {
        for cmd in cmds {
            let line = match cmd {
                Command::Send { device, msg } => {
                    let d = device.0;
                    let what = match msg {
                        Message::RoundConfig(rc) => {
                            let slice = rc.global.as_ref().expect("slice");
                            let ffn: usize =
                                slice.kept.blocks.iter().map(|b| b.mlp_channels.len()).sum();
                            let text = format!(
                                "round_config {} ratio {:.3} rank {} ffn kept {ffn} deadline {}ms",
                                rc.round, rc.arm.prune_ratio, rc.arm.rank, rc.deadline_ms
                            );
                            self.latest.insert(d, rc.round.0);
                            self.configs.insert((d, rc.round.0), rc);
                            text
                        }
                        Message::Reject(r) => format!("reject {}", r.reason),
                        Message::Ack(a) => format!("ack {}", a.round),
                        Message::Bye(b) => format!("bye {:?}", b.reason),
                        other => other.kind().to_string(),
                    };
                    format!("d{d} <- {what}")
                }
                Command::Disconnect { device, reason } => {
                    format!("d{} disconnected: {reason}", device.0)
                }
                Command::Checkpoint => "checkpoint".into(),
                Command::Finished => "finished".into(),
                Command::RoundClosed(s) => {
                    let ids = |v: Vec<u64>| format!("{v:?}");
                    let text = format!(
                        "closed {} by {}: selected {} ok {} missed {} failed {} quorum {} {}{}",
                        s.round,
                        s.closed_by,
                        ids(s.selected.iter().map(|d| d.0).collect()),
                        ids(s.participants.iter().map(|p| p.device.0).collect()),
                        ids(s.missed.iter().map(|d| d.0).collect()),
                        ids(s.failed.iter().map(|f| f.device.0).collect()),
                        s.quorum,
                        if s.quorum_met { "met" } else { "not met" },
                        if s.aggregated { ", aggregated" } else { "" },
                    );
                    self.summaries.push(*s);
                    text
                }
            };
            writeln!(self.transcript, "@{:<5} {line}", self.now.0).unwrap();
        }
    }
}

pub fn run(config: CoordinatorConfig, steps: Vec<Step>) -> Harness {
    let mut h = Harness::new(config);
    for s in steps {
        h.step(s);
    }
    h
}

/// The data-driven check: run the steps, compare the transcript.
pub fn check(config: CoordinatorConfig, steps: Vec<Step>, expect: Expect) -> Harness {
    let h = run(config, steps);
    expect.assert_eq(&h.transcript);
    h
}
