//! Paired runs: strategies run on one seed select the same devices in the same rounds and give
//! them the same local-round seeds, whatever their bandits draw (selection reads its own
//! stream of the seed, never the policy's). Another seed selects differently.

mod common;

use std::collections::BTreeMap;

use aggregator::coordinator::{Command, Coordinator, CoordinatorConfig, Event};
use aggregator::strategy::{FedLoraConfig, FixedPruneConfig, RatioBanditConfig, StrategyConfig};
use protocol::{DeviceId, Message, Timestamp};

use common::{dims, join_msg, shifted_answer};

const DEVICES: u64 = 12;

/// Per round: the selected devices with their local-round seeds.
type Selections = Vec<BTreeMap<u64, u64>>;

fn config(strategy: StrategyConfig, seed: u64) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        rounds: 8,
        devices_per_round: 4,
        over_selection: 0.0,
        min_devices: Some(DEVICES as usize),
        quorum_fraction: 0.5,
        round_deadline_ms: 1_000,
        round_interval_ms: 10,
        local_steps: 4,
        prune_interval_steps: 2,
        max_rank: 8,
        seed,
        strategy,
        ..CoordinatorConfig::default()
    };
    c.arms.ranks = vec![2, 4, 8];
    c
}

/// Every device joins; every selected device answers at once; returns what was selected.
fn run(config: CoordinatorConfig) -> Selections {
    let mut coord = Coordinator::new(config, dims()).unwrap();
    let mut now = Timestamp(0);
    let mut pending = Vec::new();
    for d in 1..=DEVICES {
        let device = DeviceId(d);
        pending.extend(coord.handle(now, Event::Connected { device }));
        pending.extend(coord.handle(
            now,
            Event::Message {
                device,
                msg: join_msg(d),
                bytes: 64,
            },
        ));
    }
    let mut rounds: Selections = Vec::new();
    while !coord.is_finished() {
        let mut answers = Vec::new();
        for c in pending.drain(..) {
            if let Command::Send {
                device,
                msg: Message::RoundConfig(rc),
            } = c
            {
                let r = rc.round.0 as usize;
                if rounds.len() < r {
                    rounds.resize(r, BTreeMap::new());
                }
                rounds[r - 1].insert(device.0, rc.seed);
                answers.push((device, shifted_answer(device.0, &rc, 2.0, 100)));
            }
        }
        for (device, u) in answers {
            pending.extend(coord.handle(
                now,
                Event::Message {
                    device,
                    msg: Message::Update(u),
                    bytes: 4096,
                },
            ));
        }
        match coord.poll_timeout() {
            Some(t) => {
                now = now.max(t);
                pending.extend(coord.handle_timeout(now));
            }
            None => break,
        }
    }
    rounds
}

#[test]
fn strategies_on_one_seed_select_the_same_devices_with_the_same_seeds() {
    let strategies = [
        StrategyConfig::Fedspine,
        StrategyConfig::Fedlora(FedLoraConfig {
            rank: 8,
            ..Default::default()
        }),
        StrategyConfig::Hetlora(Default::default()),
        StrategyConfig::FixedPrune(FixedPruneConfig {
            prune_ratio: 0.3,
            rank: 2,
        }),
        StrategyConfig::RatioBandit(RatioBanditConfig { rank: 4 }),
    ];
    let runs: Vec<Selections> = strategies
        .iter()
        .map(|s| run(config(s.clone(), 11)))
        .collect();
    assert_eq!(runs[0].len(), 8, "every round ran");
    for r in &runs[0] {
        assert_eq!(r.len(), 4, "four devices per round");
    }
    // Over 8 rounds the sample moves around the fleet (not the same devices every round).
    let distinct: std::collections::BTreeSet<u64> =
        runs[0].iter().flat_map(|r| r.keys().copied()).collect();
    assert!(distinct.len() >= 8, "{distinct:?}");
    for (s, r) in strategies.iter().zip(&runs).skip(1) {
        assert_eq!(r, &runs[0], "{} selected differently", s.name());
    }
    let other = run(config(StrategyConfig::Fedspine, 12));
    assert_ne!(other, runs[0], "another seed selects differently");
}
