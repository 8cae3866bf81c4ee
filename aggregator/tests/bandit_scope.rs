//! `bandit_scope = "class"`: a device's bandit also learns from the rewards that the other
//! devices of its declared class earned in the round; devices alone in their class, and
//! devices that declare none, learn from their own plays only, as with the default scope.

mod common;

use aggregator::coordinator::{BanditScope, Command, Coordinator, CoordinatorConfig, Event};
use aggregator::strategy::StrategyConfig;
use protocol::{DeviceId, Message, Timestamp};

use common::{dims, join_msg, shifted_answer};

/// Devices 1-3 of class `jetson-nx`, 4 of `rpi5`, 5 with no class; all five every round.
const CLASSES: [(u64, Option<&str>); 5] = [
    (1, Some("jetson-nx")),
    (2, Some("jetson-nx")),
    (3, Some("jetson-nx")),
    (4, Some("rpi5")),
    (5, None),
];

fn config(scope: BanditScope, rounds: u64) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        rounds,
        devices_per_round: 5,
        over_selection: 0.0,
        round_deadline_ms: 1_000,
        local_steps: 4,
        prune_interval_steps: 2,
        max_rank: 8,
        seed: 5,
        target_sparsity: Some(0.5),
        strategy: StrategyConfig::Fedspine,
        bandit_scope: scope,
        ..CoordinatorConfig::default()
    };
    c.arms.ratio_min = 0.0;
    c.arms.ratio_max = 1.0;
    c.arms.ranks = vec![2, 4, 8];
    c
}

/// Runs the rounds with every device answering at once; returns the coordinator.
fn run(config: CoordinatorConfig) -> Coordinator {
    let mut coord = Coordinator::new(config, dims()).unwrap();
    let mut now = Timestamp(0);
    let mut pending: Vec<(u64, Message)> = Vec::new();
    let answer = |cmds: Vec<Command>, pending: &mut Vec<(u64, Message)>| {
        for c in cmds {
            if let Command::Send {
                device,
                msg: Message::RoundConfig(rc),
            } = c
            {
                // Devices answer with different losses, so their rewards differ.
                let loss = 2.0 - 0.1 * device.0 as f32;
                let update = shifted_answer(device.0, &rc, loss, 100 * device.0);
                pending.push((device.0, Message::Update(update)));
            }
        }
    };
    for (d, class) in CLASSES {
        let device = DeviceId(d);
        let Message::Join(mut join) = join_msg(d) else {
            unreachable!("join_msg makes a Join")
        };
        join.capabilities.device_class = class.map(str::to_string);
        let mut cmds = coord.handle(now, Event::Connected { device });
        cmds.extend(coord.handle(
            now,
            Event::Message {
                device,
                msg: Message::Join(join),
                bytes: 64,
            },
        ));
        answer(cmds, &mut pending);
    }
    for _ in 0..1_000 {
        if pending.is_empty() {
            match coord.poll_timeout() {
                Some(t) => {
                    now = now.max(t);
                    let cmds = coord.handle_timeout(now);
                    answer(cmds, &mut pending);
                    continue;
                }
                None => break,
            }
        }
        now = now.plus_ms(10);
        for (d, msg) in std::mem::take(&mut pending) {
            let cmds = coord.handle(
                now,
                Event::Message {
                    device: DeviceId(d),
                    msg,
                    bytes: 2_000,
                },
            );
            answer(cmds, &mut pending);
        }
    }
    coord
}

/// Plays a device's S-UCB has learned from: the root node's count in its checkpointed state.
fn observations(coord: &Coordinator, device: u64) -> u64 {
    fn root_count(v: &serde_json::Value) -> Option<u64> {
        match v {
            serde_json::Value::Object(m) => m
                .get("nodes")
                .and_then(|n| n.get(0)?.get(0)?.as_u64())
                .or_else(|| m.values().find_map(root_count)),
            _ => None,
        }
    }
    let bandit = &coord
        .device(DeviceId(device))
        .expect("a registered device")
        .bandit;
    root_count(&serde_json::to_value(bandit).unwrap()).expect("an S-UCB tree")
}

#[test]
fn class_scope_shares_rewards_within_a_class_only() {
    let rounds = 2;
    let own = run(config(BanditScope::Device, rounds));
    let shared = run(config(BanditScope::Class, rounds));
    for (coord, what) in [(&own, "device"), (&shared, "class")] {
        assert_eq!(coord.counters().bandit_errors, 0, "{what}");
        assert_eq!(coord.state().round.0, rounds, "{what}: every round closed");
    }
    for (d, _) in CLASSES {
        assert_eq!(
            observations(&own, d),
            rounds,
            "device scope: d{d} learns its own plays"
        );
    }
    for d in 1..=3 {
        assert_eq!(
            observations(&shared, d),
            3 * rounds,
            "class scope: d{d} learns its own and its two peers' plays"
        );
    }
    assert_eq!(observations(&shared, 4), rounds, "alone in its class");
    assert_eq!(
        observations(&shared, 5),
        rounds,
        "no class declared: shares nothing"
    );
    // What a device alone in its class learned is the same under both scopes.
    for d in [4, 5] {
        let json = |c: &Coordinator| serde_json::to_string(&c.device(DeviceId(d)).unwrap().bandit);
        assert_eq!(json(&own).unwrap(), json(&shared).unwrap(), "d{d}");
    }
}
