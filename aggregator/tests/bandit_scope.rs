//! `bandit_scope = "class"`: a device's bandit also learns from the rewards that the other
//! devices of its declared class earned in the round; devices alone in their class, and
//! devices that declare none, learn from their own plays only, as with the default scope.

mod common;

use aggregator::coordinator::{BanditScope, Coordinator, CoordinatorConfig};
use aggregator::strategy::StrategyConfig;
use protocol::{DeviceId, Message};

use common::{dims, join_msg, run_answering, shifted_answer};

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
    let joins = CLASSES
        .iter()
        .map(|&(d, class)| {
            let Message::Join(mut join) = join_msg(d) else {
                unreachable!("join_msg makes a Join")
            };
            join.capabilities.device_class = class.map(str::to_string);
            (d, Message::Join(join))
        })
        .collect();
    // Devices answer with different losses, so their rewards differ.
    run_answering(&mut coord, joins, |d, rc| {
        shifted_answer(d, rc, 2.0 - 0.1 * d as f32, 100 * d)
    });
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
