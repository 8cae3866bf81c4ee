//! Scenario tests of the round coordinator on virtual time: a scenario is a list of steps
//! (connect, join, answer, fail, vanish, let time pass) and the expectation is the transcript of
//! every command the coordinator emitted, as an `expect-test` snapshot (re-bless with
//! `UPDATE_EXPECT=1`). Updates are tiny hand-made adapters on a two-block model: the device
//! "trains" by adding a fixed perturbation to the slice it received.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use aggregator::coordinator::{Command, Coordinator, CoordinatorConfig, Event, RoundSummary};
use aggregator::strategy::{FixedPruneConfig, StrategyConfig};
use expect_test::{expect, Expect};
use protocol::{
    Buffer, Capabilities, DeviceId, FailReason, Join, KeptIndices, Message, RoundConfig,
    RoundFailed, RoundId, Timestamp, Update, UpdateStats, PROTOCOL_VERSION,
};

use common::{dims, join_msg, shifted_answer};

/// Three devices per round, no over-selection, half quorum, 1 s deadline, fixed arms.
fn config() -> CoordinatorConfig {
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

enum Step {
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
fn answer(device: u64, rc: &RoundConfig) -> Update {
    shifted_answer(device, rc, 2.5 - 0.1 * device as f32, 100 * device)
}

struct Harness {
    coord: Coordinator,
    now: Timestamp,
    configs: BTreeMap<(u64, u64), RoundConfig>,
    latest: BTreeMap<u64, u64>,
    transcript: String,
    summaries: Vec<RoundSummary>,
}

impl Harness {
    fn new(config: CoordinatorConfig) -> Harness {
        Harness::from(Coordinator::new(config, dims()).unwrap())
    }

    fn from(coord: Coordinator) -> Harness {
        Harness {
            coord,
            now: Timestamp(0),
            configs: BTreeMap::new(),
            latest: BTreeMap::new(),
            transcript: String::new(),
            summaries: Vec::new(),
        }
    }

    fn event(&mut self, event: Event) {
        let cmds = self.coord.handle(self.now, event);
        self.record(cmds);
        self.drive(self.now);
    }

    /// Fires every timer due at or before `until`, in order.
    fn drive(&mut self, until: Timestamp) {
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

    fn deliver(&mut self, device: u64, msg: Message, bytes: u64) {
        self.event(Event::Message {
            device: DeviceId(device),
            msg,
            bytes,
        });
    }

    fn answer_round(
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

    fn step(&mut self, step: Step) {
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

    fn record(&mut self, cmds: Vec<Command>) {
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

fn run(config: CoordinatorConfig, steps: Vec<Step>) -> Harness {
    let mut h = Harness::new(config);
    for s in steps {
        h.step(s);
    }
    h
}

/// The data-driven check: run the steps, compare the transcript.
fn check(config: CoordinatorConfig, steps: Vec<Step>, expect: Expect) -> Harness {
    let h = run(config, steps);
    expect.assert_eq(&h.transcript);
    h
}

use Step::*;

#[test]
fn a_round_closes_when_every_selected_device_answered() {
    let h = check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            Wait(50),
            Answer(1),
            Answer(3),
            Answer(2),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @50    d1 <- ack round-1
            @50    d3 <- ack round-1
            @50    d2 <- ack round-1
            @50    checkpoint
            @50    closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
        "#]],
    );
    let s = &h.summaries[0];
    assert_eq!(s.mean_loss_pre, Some(3.0));
    assert!(s
        .participants
        .iter()
        .all(|p| p.reward > 0.0 && p.delta_norm > 0.0));
    assert_eq!(h.coord.counters().updates_accepted, 3);
}

#[test]
fn stragglers_past_the_deadline_are_missed_and_their_late_update_refused() {
    let mut c = config();
    c.round_interval_ms = 500;
    let h = check(
        c,
        vec![
            Join(1),
            Join(2),
            Join(3),
            Wait(100),
            Answer(1),
            Answer(2),
            Wait(1_000),
            AnswerRound(3, 1),
            Wait(500),
            AnswerRound(3, 1),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @100   d1 <- ack round-1
            @100   d2 <- ack round-1
            @1000  checkpoint
            @1000  closed round-1 by deadline: selected [1, 2, 3] ok [1, 2] missed [3] failed [] quorum 2 met, aggregated
            @1100  d3 <- reject update for round-1 arrived after the round closed
            @1500  d1 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @1500  d2 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @1500  d3 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @1600  d3 <- reject update for round-1 is stale: the current round is round-2
        "#]],
    );
    let s = &h.summaries[0];
    assert_eq!(s.missed, vec![DeviceId(3)]);
    assert!(s.quorum_met && s.aggregated);
    let rec = h.coord.device(DeviceId(3)).unwrap();
    assert_eq!((rec.rounds_selected, rec.rounds_missed), (2, 1));
    assert_eq!(h.coord.counters().rejects_of("late_update"), 1);
    assert_eq!(h.coord.counters().rejects_of("stale_round"), 1);
}

#[test]
fn without_quorum_at_the_deadline_the_round_is_abandoned() {
    let mut c = config();
    c.quorum_fraction = 1.0;
    let before = Coordinator::new(c.clone(), dims())
        .unwrap()
        .global()
        .clone();
    let h = check(
        c,
        vec![Join(1), Join(2), Join(3), Answer(2), Wait(1_000)],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- ack round-1
            @1000  checkpoint
            @1000  closed round-1 by deadline: selected [1, 2, 3] ok [2] missed [1, 3] failed [] quorum 3 not met
        "#]],
    );
    assert_eq!(
        h.coord.global(),
        &before,
        "an abandoned round leaves the global adapter alone"
    );
    assert_eq!(h.coord.counters().rounds_abandoned, 1);
    assert_eq!(h.summaries[0].participants[0].reward, 0.0);
}

#[test]
fn a_device_that_vanishes_mid_round_does_not_hold_the_round_up() {
    check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            Answer(1),
            Vanish(3),
            Wait(20),
            Answer(2),
            Join(3),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @20    d2 <- ack round-1
            @20    checkpoint
            @20    closed round-1 by all_answered: selected [1, 2, 3] ok [1, 2] missed [3] failed [] quorum 2 met, aggregated
            @20    d3 <- welcome
        "#]],
    );
}

#[test]
fn a_selected_device_that_comes_back_gets_its_round_again_and_counts() {
    check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            Vanish(3),
            Wait(300),
            Join(3),
            Answer(1),
            Answer(2),
            Answer(3),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @300   d3 <- welcome
            @300   d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 700ms
            @300   d1 <- ack round-1
            @300   d2 <- ack round-1
            @300   d3 <- ack round-1
            @300   checkpoint
            @300   closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
        "#]],
    );
}

#[test]
fn duplicate_stale_unselected_and_future_updates_are_refused() {
    let mut c = config();
    c.devices_per_round = 2;
    c.min_devices = Some(2);
    let h = check(
        c,
        vec![
            Join(1),
            Join(2),
            Answer(1),
            Answer(1),
            Join(3),
            Raw(3, Message::Update(answer_for_nobody()), 512),
            AnswerRound(1, 1),
            Answer(2),
            Wait(10),
            AnswerRound(1, 1),
            AnswerWith(2, |u| u.round = RoundId(9)),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @0     d1 <- reject duplicate update for round-1
            @0     d3 <- welcome
            @0     d3 <- reject device was not selected for round-1
            @0     d1 <- reject duplicate update for round-1
            @0     d2 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by target_reached: selected [1, 2] ok [1, 2] missed [] failed [] quorum 1 met, aggregated
            @10    d1 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @10    d2 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @10    d1 <- reject update for round-1 is stale: the current round is round-2
            @10    d2 <- reject malformed update: round-9 has not started (latest is round-2)
        "#]],
    );
    let c = h.coord.counters();
    assert_eq!(c.rejects_of("duplicate_update"), 2);
    assert_eq!(c.rejects_of("not_selected"), 1);
    assert_eq!(c.rejects_of("stale_round"), 1);
    assert_eq!(c.rejects_of("malformed"), 1);
}

#[test]
fn a_nan_update_is_refused_and_counts_as_a_failure() {
    let h = check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            AnswerWith(2, |u| {
                if let Buffer::F32(a) = &mut u.adapter.layers[3].a.data {
                    a[1] = f32::NAN;
                }
            }),
            AnswerWith(3, |u| u.stats.loss_post = f32::INFINITY),
            Answer(1),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- reject update contains non-finite values
            @0     d3 <- reject update contains non-finite values
            @0     d1 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by all_answered: selected [1, 2, 3] ok [1] missed [] failed [2, 3] quorum 2 not met
        "#]],
    );
    let s = &h.summaries[0];
    let kinds: Vec<&str> = s.failed.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["non_finite", "non_finite"]);
    assert_eq!(h.coord.counters().rejects_of("non_finite"), 2);
}

#[test]
fn oversized_and_wrong_rank_updates_are_refused() {
    let mut c = config();
    c.max_update_bytes = 10_000;
    check(
        c,
        vec![
            Join(1),
            Join(2),
            Join(3),
            AnswerSized(1, 10_001),
            AnswerWith(2, |u| u.adapter.rank = 2),
            Answer(3),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- reject message of 10001 bytes exceeds the limit of 10000 bytes
            @0     d2 <- reject malformed update: adapter rank 2 differs from the round's rank 4
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by all_answered: selected [1, 2, 3] ok [3] missed [] failed [1, 2] quorum 2 not met
        "#]],
    );
}

#[test]
fn wrong_version_other_identity_and_unexpected_messages_are_refused() {
    let wrong_version = Message::Join(Join {
        protocol_version: PROTOCOL_VERSION + 1,
        device_id: DeviceId(1),
        capabilities: Capabilities {
            ram_bytes: 1 << 30,
            backend: "flex".into(),
            bench_score: None,
            device_class: None,
        },
    });
    let h = check(
        config(),
        vec![
            Connect(1),
            Raw(1, wrong_version, 64),
            Connect(2),
            Raw(2, join_msg(5), 64),
            Connect(4),
            Raw(4, Message::Ack(protocol::Ack { round: RoundId(1) }), 16),
            Raw(4, Message::Update(answer_for_nobody()), 512),
        ],
        expect![[r#"
            @0     d1 <- reject protocol version mismatch: aggregator speaks 2, device sent 3
            @0     d1 disconnected: protocol version mismatch: aggregator speaks 2, device sent 3
            @0     d2 <- reject device id device-5 does not match the certificate's device-2
            @0     d2 disconnected: device id device-5 does not match the certificate's device-2
            @0     d4 <- reject unexpected ack message
            @0     d4 <- reject the device has not joined
        "#]],
    );
    assert!(!h.coord.is_joined(DeviceId(1)) && !h.coord.is_joined(DeviceId(2)));
}

fn answer_for_nobody() -> Update {
    let coord = Coordinator::new(config(), dims()).unwrap();
    let (adapter, _) = coord
        .global()
        .slice_for(&KeptIndices::full(&dims()), 4, 32.0)
        .unwrap();
    Update {
        round: RoundId(1),
        adapter,
        kept: KeptIndices::full(&dims()),
        stats: answer_stats(),
    }
}

fn answer_stats() -> UpdateStats {
    UpdateStats {
        loss_pre: 1.0,
        loss_post: 1.0,
        sparsity: 0.0,
        param_count: 1,
        compute_ms: 1,
        bytes_down: 1,
        bytes_up: 1,
        peak_mem_bytes: 1,
        samples: 1,
        steps: 1,
    }
}

#[test]
fn out_of_memory_teaches_the_filter_and_the_arm_is_not_played_again() {
    let h = check(
        config(),
        vec![
            Join(1),
            Join(2),
            Join(3),
            Fail(
                1,
                FailReason::OutOfMemory {
                    needed_bytes: 5 << 30,
                    ram_bytes: 4 << 30,
                },
            ),
            Answer(2),
            Answer(3),
            Wait(10),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- ack round-1
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by all_answered: selected [1, 2, 3] ok [2, 3] missed [] failed [1] quorum 2 met, aggregated
            @10    d2 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @10    d3 <- round_config round-2 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
        "#]],
    );
    let rec = h.coord.device(DeviceId(1)).unwrap();
    let excl = rec.bandit.filter.exclusions(1);
    assert_eq!(excl.len(), 1);
    assert_eq!((excl[0].corner.prune_ratio, excl[0].corner.rank), (0.25, 4));
    assert_eq!(h.coord.counters().out_of_memory, 1);
    assert_eq!(h.coord.counters().no_feasible_arm, 1);
    assert_eq!(h.coord.selected(), vec![DeviceId(2), DeviceId(3)]);
}

#[test]
fn the_last_round_says_goodbye_and_late_joiners_are_told_it_is_over() {
    let mut c = config();
    c.rounds = 1;
    let h = check(
        c,
        vec![
            Join(1),
            Join(2),
            Join(3),
            Answer(1),
            Answer(2),
            Answer(3),
            Wait(100),
            Join(4),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @0     d2 <- ack round-1
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
            @0     d1 <- bye Finished
            @0     d2 <- bye Finished
            @0     d3 <- bye Finished
            @0     finished
            @100   d4 <- welcome
            @100   d4 <- bye Finished
        "#]],
    );
    assert!(h.coord.is_finished());
    assert_eq!(h.coord.poll_timeout(), None);
}

#[test]
fn fedspine_bandits_choose_pruned_arms_and_devices_report_pruned_kept_maps() {
    let mut c = config();
    c.strategy = StrategyConfig::Fedspine;
    c.arms.ratio_max = 0.5;
    let prune = |u: &mut Update| {
        // Keep channels 0..8 of 12 in block 1: slice the answer down.
        let coord_dims = dims();
        let mut kept = KeptIndices::full(&coord_dims);
        kept.blocks[1].mlp_channels = (0..8).collect();
        for layer in &mut u.adapter.layers {
            if layer.block != 1 {
                continue;
            }
            let map = protocol::layer_index_map(&coord_dims, layer.proj, &kept.blocks[1]);
            let (r, inp) = (layer.a.rows as usize, layer.a.cols as usize);
            let (a, b) = (layer.a.data.to_f32_vec(), layer.b.data.to_f32_vec());
            if map.cols.len() < inp {
                let cut: Vec<f32> = (0..r)
                    .flat_map(|i| map.cols.iter().map(move |&c| (i, c)))
                    .map(|(i, c)| a[i * inp + c as usize])
                    .collect();
                layer.a = protocol::Tensor2::f32(r as u32, map.cols.len() as u32, cut);
            }
            if map.rows.len() < layer.b.rows as usize {
                let cut: Vec<f32> = map
                    .rows
                    .iter()
                    .flat_map(|&o| b[o as usize * r..(o as usize + 1) * r].to_vec())
                    .collect();
                layer.b = protocol::Tensor2::f32(map.rows.len() as u32, r as u32, cut);
            }
        }
        u.kept = kept;
        u.stats.sparsity = 0.1;
    };
    let h = check(
        c,
        vec![
            Join(1),
            Join(2),
            Join(3),
            AnswerWith(1, prune),
            Answer(2),
            Answer(3),
            Wait(10),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.348 rank 2 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.442 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.452 rank 2 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @0     d2 <- ack round-1
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
            @10    d1 <- round_config round-2 ratio 0.270 rank 4 ffn kept 20 deadline 1000ms
            @10    d2 <- round_config round-2 ratio 0.272 rank 2 ffn kept 24 deadline 1000ms
            @10    d3 <- round_config round-2 ratio 0.036 rank 8 ffn kept 24 deadline 1000ms
        "#]],
    );
    assert_eq!(h.coord.device(DeviceId(1)).unwrap().sparsity, 0.1f32 as f64);
}

#[test]
fn a_restored_coordinator_continues_exactly_like_the_original() {
    let mut c = config();
    c.strategy = StrategyConfig::Fedspine;
    let steps = || vec![Join(1), Join(2), Join(3), Answer(1), Answer(2), Answer(3)];
    let mut original = run(c.clone(), steps());
    let state = original.coord.state();
    assert_eq!(state.round, RoundId(1));
    original.step(Wait(10));
    // Through the checkpoint file format and back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.ckpt");
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA, &state)
        .unwrap();
    let back: aggregator::CoordinatorState =
        aggregator::checkpoint::read(&path, aggregator::coordinator::STATE_SCHEMA).unwrap();
    assert_eq!(back, state);
    assert_eq!(back.bandit_digest(), state.bandit_digest());

    // The original had already started round 2 when its state was taken; the restored one
    // starts round 2 when its devices join again. Both must choose the same arms and seeds.
    let mut restored = Harness::from(Coordinator::restore(c.clone(), back).unwrap());
    for d in 1..=3 {
        restored.step(Join(d));
    }
    for d in 1..=3 {
        let a = &original.configs[&(d, 2)];
        let b = &restored.configs[&(d, 2)];
        assert_eq!((a.arm, a.seed), (b.arm, b.seed), "device {d}");
        assert_eq!(a.global, b.global, "device {d}");
    }
    for d in 1..=3 {
        original.step(Answer(d));
        restored.step(Answer(d));
    }
    let (a, b) = (original.coord.state(), restored.coord.state());
    // Counters differ (the restored run saw three more connections); the learned state and
    // the generator must not.
    assert_eq!(
        (a.round, &a.global, &a.devices, &a.rng),
        (b.round, &b.global, &b.devices, &b.rng)
    );
    // A finished coordinator's state moved out is the state it would copy.
    assert_eq!(restored.coord.into_state(), b);

    // A state from another strategy or rank is refused with a clear error.
    let mut other = c.clone();
    other.strategy = StrategyConfig::Fedlora(aggregator::strategy::FedLoraConfig {
        rank: 4,
        ..Default::default()
    });
    let err = Coordinator::restore(other, state.clone()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "saved state does not fit this run: it was written by strategy fedspine, the config asks for fedlora"
    );
    let mut other = c;
    other.max_rank = 16;
    let err = Coordinator::restore(other, state).unwrap_err();
    assert_eq!(
        err.to_string(),
        "saved state does not fit this run: its global adapter has rank 8, the config's max_rank is 16"
    );
}

#[test]
fn toml_configs_parse_with_defaults_and_refuse_typos() {
    let c = CoordinatorConfig::from_toml_str(
        r#"
        rounds = 2
        devices_per_round = 3
        [strategy]
        kind = "fixed-prune"
        prune_ratio = 0.2
        rank = 8
        [aggregation]
        method = "hetlora"
        [arms]
        ratio_min = 0.0
        ratio_max = 0.3
        ranks = [4, 8]
        [policy]
        kind = "ucb1"
        "#,
    )
    .unwrap();
    assert_eq!(c.rounds, 2);
    assert_eq!(c.strategy.name(), "fixed-prune");
    assert_eq!(c.local_steps, CoordinatorConfig::default().local_steps);
    let err = CoordinatorConfig::from_toml_str("roundz = 2").unwrap_err();
    assert!(err.to_string().contains("unknown field `roundz`"), "{err}");
    let err = CoordinatorConfig::from_toml_str("max_rank = 4").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid coordinator config: rank 8 exceeds max_rank 4"
    );
}

fn join_with_ram(id: u64, ram_bytes: u64) -> Message {
    Message::Join(Join {
        protocol_version: PROTOCOL_VERSION,
        device_id: DeviceId(id),
        capabilities: Capabilities {
            ram_bytes,
            backend: "flex".into(),
            bench_score: None,
            device_class: None,
        },
    })
}

/// The arms each strategy plays for devices of 1, 3 and 6 GiB, and its aggregation method.
#[test]
fn each_strategy_plays_its_own_arms() {
    let gib = 1u64 << 30;
    let run_strategy = |strategy: StrategyConfig| {
        let mut c = config();
        c.strategy = strategy;
        c.arms.ratio_max = 0.4;
        let mut h = Harness::new(c);
        for (d, ram) in [(1, gib), (2, 3 * gib), (3, 6 * gib)] {
            h.step(Connect(d));
            h.deliver(d, join_with_ram(d, ram), 64);
        }
        for d in 1..=3 {
            h.step(Answer(d));
        }
        let arms: Vec<String> = (1..=3)
            .map(|d| {
                let a = h.configs[&(d, 1)].arm;
                let space = h
                    .coord
                    .device(DeviceId(d))
                    .unwrap()
                    .bandit
                    .policy
                    .arm_space();
                format!(
                    "d{d} ({:.2}, {}) of [{}, {}] x {:?}",
                    a.prune_ratio, a.rank, space.ratio_min, space.ratio_max, space.ranks
                )
            })
            .collect();
        format!(
            "{}: {} -> {}",
            h.coord.strategy_name(),
            arms.join(", "),
            h.summaries[0].aggregation
        )
    };
    let lines: Vec<String> = [
        StrategyConfig::Fedspine,
        StrategyConfig::Hetlora(Default::default()),
        StrategyConfig::Fedlora(aggregator::strategy::FedLoraConfig {
            rank: 8,
            ..Default::default()
        }),
        StrategyConfig::FixedPrune(FixedPruneConfig {
            prune_ratio: 0.3,
            rank: 2,
        }),
        StrategyConfig::RatioBandit(aggregator::strategy::RatioBanditConfig { rank: 4 }),
    ]
    .into_iter()
    .map(run_strategy)
    .collect();
    expect![[r#"
        fedspine: d1 (0.28, 2) of [0, 0.4] x [2, 4, 8], d2 (0.35, 4) of [0, 0.4] x [2, 4, 8], d3 (0.36, 2) of [0, 0.4] x [2, 4, 8] -> exact
        hetlora: d1 (0.00, 2) of [0, 0] x [2, 4], d2 (0.00, 4) of [0, 0] x [2, 4, 8], d3 (0.00, 2) of [0, 0] x [2, 4, 8] -> exact
        fedlora: d1 (0.00, 8) of [0, 0] x [8], d2 (0.00, 8) of [0, 0] x [8], d3 (0.00, 8) of [0, 0] x [8] -> exact
        fixed-prune: d1 (0.30, 2) of [0.3, 0.3] x [2], d2 (0.30, 2) of [0.3, 0.3] x [2], d3 (0.30, 2) of [0.3, 0.3] x [2] -> exact
        ratio-bandit: d1 (0.14, 4) of [0, 0.4] x [4], d2 (0.38, 4) of [0, 0.4] x [4], d3 (0.18, 4) of [0, 0.4] x [4] -> exact"#]]
    .assert_eq(&lines.join("\n"));
}

fn join_as(id: u64, class: Option<&str>) -> Message {
    let Message::Join(mut join) = join_msg(id) else {
        unreachable!("join_msg makes a Join")
    };
    join.capabilities.device_class = class.map(str::to_string);
    Message::Join(join)
}

#[test]
fn device_classes_are_kept_per_device_and_a_bad_one_is_refused() {
    let h = check(
        config(),
        vec![
            Connect(4),
            Raw(4, join_as(4, Some("Jetson NX")), 64),
            Connect(1),
            Raw(1, join_as(1, Some("jetson-nx")), 64),
            Connect(2),
            Raw(2, join_as(2, Some("rpi5")), 64),
            Join(3),
            Answer(1),
            Answer(2),
            Answer(3),
        ],
        expect![[r#"
            @0     d4 <- reject device class "Jetson NX" holds 'J': only a-z, 0-9, '.', '_' and '-' are allowed
            @0     d4 disconnected: device class "Jetson NX" holds 'J': only a-z, 0-9, '.', '_' and '-' are allowed
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @0     d2 <- ack round-1
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
        "#]],
    );
    let class = |d: u64| {
        h.coord
            .device(DeviceId(d))
            .map(|r| r.capabilities.class().to_string())
    };
    assert_eq!(class(1).as_deref(), Some("jetson-nx"));
    assert_eq!(class(2).as_deref(), Some("rpi5"));
    assert_eq!(class(3).as_deref(), Some("unknown"));
    assert_eq!(class(4), None, "a refused join registers nothing");
    assert_eq!(h.coord.counters().rejects_of("bad_device_class"), 1);
    let assigned: Vec<(u64, &str, u32)> = h.summaries[0]
        .assigned
        .iter()
        .map(|a| (a.device.0, a.device_class.as_str(), a.arm.rank))
        .collect();
    assert_eq!(
        assigned,
        [(1, "jetson-nx", 4), (2, "rpi5", 4), (3, "unknown", 4)]
    );

    // The class is part of the checkpointed state, and a schema-1 checkpoint (before classes)
    // still resumes, its devices of class unknown.
    let state = h.coord.state();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.ckpt");
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA, &state)
        .unwrap();
    let back = aggregator::server::read_state(&path).unwrap().unwrap();
    assert_eq!(back, state);
    let old = aggregator::coordinator::CoordinatorStateV1 {
        dims: state.dims,
        strategy: state.strategy.clone(),
        round: state.round,
        global: state.global.clone(),
        devices: state
            .devices
            .iter()
            .map(|d| aggregator::coordinator::DeviceRecordV1 {
                id: d.id,
                capabilities: aggregator::coordinator::CapabilitiesV1 {
                    ram_bytes: d.capabilities.ram_bytes,
                    backend: d.capabilities.backend.clone(),
                    bench_score: d.capabilities.bench_score,
                },
                bandit: d.bandit.clone(),
                kept: d.kept.clone(),
                sparsity: d.sparsity,
                rounds_selected: d.rounds_selected,
                rounds_completed: d.rounds_completed,
                rounds_failed: d.rounds_failed,
                rounds_missed: d.rounds_missed,
            })
            .collect(),
        rng: state.rng.clone(),
        counters: state.counters.clone().into(),
    };
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA_V1, &old)
        .unwrap();
    let migrated = aggregator::server::read_state(&path).unwrap().unwrap();
    assert!(migrated
        .devices
        .iter()
        .all(|d| d.capabilities.class() == "unknown"));
    let mut expected = state.clone();
    for d in &mut expected.devices {
        d.capabilities.device_class = None;
    }
    assert_eq!(migrated, expected);
    assert!(Coordinator::restore(config(), migrated).is_ok());
    // A schema-2 checkpoint (before the screening counter) resumes with nothing screened out.
    let mut counted = state.counters.clone();
    counted.updates_screened_out = 3;
    let v2 = aggregator::coordinator::CoordinatorStateV2 {
        dims: state.dims,
        strategy: state.strategy.clone(),
        round: state.round,
        global: state.global.clone(),
        devices: state.devices.clone(),
        rng: state.rng.clone(),
        counters: counted.into(),
    };
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA_V2, &v2)
        .unwrap();
    let migrated = aggregator::server::read_state(&path).unwrap().unwrap();
    assert_eq!(migrated, state);
    assert!(Coordinator::restore(config(), migrated).is_ok());
    // Another schema is still refused, naming the file.
    aggregator::checkpoint::write_atomic(&path, 99, &state).unwrap();
    let err = aggregator::server::read_state(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("state.ckpt") && err.contains("99"), "{err}");
}
