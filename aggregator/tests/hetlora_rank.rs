//! hetlora's rank self-pruning on the server: every `hetlora` round carries the self-pruning
//! settings, an update at a lower rank than its round's is accepted, and the device's later
//! rounds are sent that rank (never above the bandit's choice), through a checkpoint and a
//! restore too; an update above the round's rank is refused. Other strategies send no
//! settings and still refuse any rank but the round's.

mod common;

use std::collections::BTreeMap;

use aggregator::coordinator::{Command, Coordinator, CoordinatorConfig, Event};
use aggregator::strategy::{FixedPruneConfig, HetLoraConfig, StrategyConfig};
use protocol::{Buffer, DeviceId, Message, RankPruning, RoundConfig, Timestamp, Update};

use common::{dims, join_msg, shifted_answer};

fn config(strategy: StrategyConfig) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        rounds: 4,
        devices_per_round: 3,
        over_selection: 0.0,
        quorum_fraction: 0.5,
        round_deadline_ms: 1_000,
        round_interval_ms: 10,
        local_steps: 4,
        prune_interval_steps: 2,
        max_rank: 8,
        seed: 7,
        strategy,
        ..CoordinatorConfig::default()
    };
    // One rank, so every bandit chooses 8 and only self-pruning can lower it.
    c.arms.ranks = vec![8];
    c
}

fn hetlora() -> StrategyConfig {
    StrategyConfig::Hetlora(HetLoraConfig::default())
}

/// An update's adapter at `rank` components (wire orientation: `A` is `[rank, in]`, `B` is
/// `[out, rank]`): the first `rank` as a device that dropped its tail sends them, or zero
/// components appended (an update above its round's rank).
fn resize(update: &mut Update, rank: u32) {
    let old = update.adapter.rank as usize;
    let r = rank as usize;
    for layer in &mut update.adapter.layers {
        if let Buffer::F32(a) = &mut layer.a.data {
            a.resize(r * layer.a.cols as usize, 0.0);
        }
        layer.a.rows = rank;
        if let Buffer::F32(b) = &mut layer.b.data {
            *b = b
                .chunks_exact(old)
                .flat_map(|row| (0..r).map(|i| row.get(i).copied().unwrap_or(0.0)))
                .collect();
        }
        layer.b.cols = rank;
    }
    update.adapter.rank = rank;
}

/// A coordinator with devices 1..=3 joined, and the configurations each was sent so far.
struct Run {
    coord: Coordinator,
    now: Timestamp,
    sent: BTreeMap<(u64, u64), RoundConfig>,
    rejects: Vec<(u64, String)>,
}

impl Run {
    fn new(coord: Coordinator) -> Run {
        let mut run = Run {
            coord,
            now: Timestamp(0),
            sent: BTreeMap::new(),
            rejects: Vec::new(),
        };
        for d in 1..=3 {
            run.event(Event::Connected {
                device: DeviceId(d),
            });
            run.deliver(d, join_msg(d));
        }
        run
    }

    fn event(&mut self, event: Event) {
        let cmds = self.coord.handle(self.now, event);
        self.take(cmds);
        while let Some(t) = self.coord.poll_timeout() {
            if t > self.now.plus_ms(20) {
                break;
            }
            self.now = self.now.max(t);
            let cmds = self.coord.handle_timeout(self.now);
            self.take(cmds);
        }
    }

    fn take(&mut self, cmds: Vec<Command>) {
        for cmd in cmds {
            if let Command::Send { device, msg } = cmd {
                match msg {
                    Message::RoundConfig(rc) => {
                        self.sent.insert((device.0, rc.round.0), rc);
                    }
                    Message::Reject(r) => self.rejects.push((device.0, r.reason.to_string())),
                    _ => {}
                }
            }
        }
    }

    fn deliver(&mut self, device: u64, msg: Message) {
        self.event(Event::Message {
            device: DeviceId(device),
            msg,
            bytes: 4096,
        });
    }

    /// Device `d` answers its configuration of `round`, at `rank` components.
    fn answer(&mut self, d: u64, round: u64, rank: u32) {
        let rc = self.sent[&(d, round)].clone();
        let mut update = shifted_answer(d, &rc, 2.0, 100);
        resize(&mut update, rank);
        self.deliver(d, Message::Update(update));
    }

    fn rank_sent(&self, d: u64, round: u64) -> u32 {
        let rc = &self.sent[&(d, round)];
        let slice = rc.global.as_ref().expect("a slice");
        assert_eq!(
            slice.adapter.rank, rc.arm.rank,
            "the slice is cut at the rank sent"
        );
        rc.arm.rank
    }
}

#[test]
fn hetloras_rank_self_pruning_lowers_the_next_assignment_to_the_reported_rank() {
    let mut run = Run::new(Coordinator::new(config(hetlora()), dims()).unwrap());
    let expected = HetLoraConfig::default().rank_pruning();
    assert_eq!(
        expected,
        Some(RankPruning {
            reg: 0.01,
            gamma: 0.1,
            step: 0.125
        })
    );
    for d in 1..=3 {
        assert_eq!(run.rank_sent(d, 1), 8);
        assert_eq!(run.sent[&(d, 1)].options.rank_pruning, expected);
    }
    // Device 1 dropped one component, device 2 three; device 3 kept its rank (8).
    run.answer(1, 1, 7);
    run.answer(2, 1, 5);
    run.answer(3, 1, 8);
    assert!(run.rejects.is_empty(), "{:?}", run.rejects);
    let ranks: Vec<u32> = (1..=3).map(|d| run.rank_sent(d, 2)).collect();
    assert_eq!(ranks, vec![7, 5, 8]);
    assert_eq!(
        run.coord.device(DeviceId(2)).unwrap().rank_limit,
        Some(5),
        "the reduced rank is remembered"
    );
    // An update above the rank it was sent is refused; the device keeps its last rank.
    run.answer(1, 2, 8);
    assert_eq!(
        run.rejects,
        vec![(
            1,
            "malformed update: adapter rank 8 is not in [1, 7] (the round's rank)".to_string()
        )]
    );
    run.answer(2, 2, 4);
    run.answer(3, 2, 8);
    let ranks: Vec<u32> = (1..=3).map(|d| run.rank_sent(d, 3)).collect();
    assert_eq!(ranks, vec![7, 4, 8]);

    // The remembered ranks survive a checkpoint and a restore.
    let state = run.coord.state();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.ckpt");
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA, &state)
        .unwrap();
    let back: aggregator::CoordinatorState =
        aggregator::checkpoint::read(&path, aggregator::coordinator::STATE_SCHEMA).unwrap();
    // Device 3 never dropped a component: it has no limit, and its bandit's choice stands.
    let limits: Vec<Option<u32>> = back.devices.iter().map(|d| d.rank_limit).collect();
    assert_eq!(limits, vec![Some(7), Some(4), None]);
    let restored = Run::new(Coordinator::restore(config(hetlora()), back.clone()).unwrap());
    let ranks: Vec<u32> = (1..=3).map(|d| restored.rank_sent(d, 3)).collect();
    assert_eq!(ranks, vec![7, 4, 8]);

    // A checkpoint whose remembered rank exceeds the run's max_rank is refused by name.
    let mut bad = back;
    bad.devices[0].rank_limit = Some(9);
    let err = Coordinator::restore(config(hetlora()), bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        "saved state does not fit this run: self-pruned rank 9 of device-1 is not in [1, 8]"
    );
}

#[test]
fn without_rank_self_pruning_rounds_carry_no_settings_and_any_other_rank_is_refused() {
    let fixed = StrategyConfig::FixedPrune(FixedPruneConfig {
        prune_ratio: 0.25,
        rank: 8,
    });
    let off = StrategyConfig::Hetlora(HetLoraConfig {
        rank_reg: 0.0,
        prune_gamma: 0.0,
        ..HetLoraConfig::default()
    });
    for strategy in [fixed, off] {
        let name = strategy.name();
        let mut run = Run::new(Coordinator::new(config(strategy), dims()).unwrap());
        assert_eq!(run.sent[&(1, 1)].options, Default::default(), "{name}");
        run.answer(1, 1, 7);
        assert_eq!(
            run.rejects,
            vec![(
                1,
                "malformed update: adapter rank 7 differs from the round's rank 8".to_string()
            )],
            "{name}"
        );
    }
    // Out-of-range settings are refused when the run is built.
    let bad = StrategyConfig::Hetlora(HetLoraConfig {
        prune_step: 1.0,
        ..HetLoraConfig::default()
    });
    let err = Coordinator::new(config(bad), dims()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid coordinator config: strategy hetlora: rank pruning step 1 is not in (0, 1)"
    );
}
