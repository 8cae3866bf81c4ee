//! `explore_per_round`: at most that many of a round's devices play their policy's exploring
//! choice; the rest replay the arm their bandit believes best. UCB1 makes exploring visible:
//! until a device has tried every grid arm, its exploring choice is always an arm it never
//! played, while its best estimate is always one it did.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use aggregator::coordinator::{Coordinator, CoordinatorConfig};
use aggregator::strategy::StrategyConfig;
use bandit::policy::Ucb1Config;
use bandit::PolicyConfig;

use common::{dims, join_msg, run_answering, shifted_answer};

const DEVICES: u64 = 5;
const ROUNDS: u64 = 6;

fn config(explore_per_round: Option<usize>) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        rounds: ROUNDS,
        devices_per_round: DEVICES as usize,
        over_selection: 0.0,
        round_deadline_ms: 1_000,
        local_steps: 4,
        prune_interval_steps: 2,
        max_rank: 8,
        seed: 11,
        target_sparsity: Some(0.5),
        strategy: StrategyConfig::Fedspine,
        policy: PolicyConfig::Ucb1(Ucb1Config {
            n_ratios: 6,
            exploration: 0.15,
        }),
        explore_per_round,
        ..CoordinatorConfig::default()
    };
    c.arms.ratio_min = 0.0;
    c.arms.ratio_max = 1.0;
    c.arms.ranks = vec![2, 4, 8];
    c
}

/// For each round, how many devices played an arm they had not played before.
fn new_arms_per_round(explore_per_round: Option<usize>) -> Vec<usize> {
    let mut coord = Coordinator::new(config(explore_per_round), dims()).unwrap();
    let joins = (1..=DEVICES).map(|d| (d, join_msg(d))).collect();
    let mut plays: Vec<(u64, u64, (u64, u32))> = Vec::new();
    run_answering(&mut coord, joins, |d, rc| {
        plays.push((rc.round.0, d, (rc.arm.prune_ratio.to_bits(), rc.arm.rank)));
        // Devices answer with different losses, so their rewards differ.
        shifted_answer(d, rc, 2.0 - 0.1 * d as f32, 100 * d)
    });
    assert_eq!(coord.counters().bandit_errors, 0);
    assert_eq!(coord.state().round.0, ROUNDS, "every round closed");
    plays.sort();
    let mut seen: BTreeMap<u64, BTreeSet<(u64, u32)>> = BTreeMap::new();
    let mut fresh = vec![0usize; ROUNDS as usize];
    for (round, d, arm) in plays {
        if seen.entry(d).or_default().insert(arm) {
            fresh[(round - 1) as usize] += 1;
        }
    }
    fresh
}

#[test]
fn a_budget_caps_the_devices_that_explore_in_a_round() {
    // UCB1 with 18 grid arms: without a budget every device explores a new arm each round.
    assert_eq!(
        new_arms_per_round(None),
        vec![DEVICES as usize; ROUNDS as usize]
    );
    for budget in [0, 1, 2] {
        let fresh = new_arms_per_round(Some(budget));
        // Nothing to exploit in the first round: every device explores beyond the budget.
        assert_eq!(fresh[0], DEVICES as usize, "budget {budget}: {fresh:?}");
        assert!(
            fresh[1..].iter().all(|&n| n == budget),
            "budget {budget}: after the first round exactly the budget explores: {fresh:?}"
        );
    }
    // A budget as large as the round is no budget at all.
    assert_eq!(
        new_arms_per_round(Some(DEVICES as usize)),
        new_arms_per_round(None)
    );
}

#[test]
fn the_budget_survives_a_config_round_trip() {
    let c = config(Some(2));
    let text = toml::to_string(&c).unwrap();
    assert!(text.contains("explore_per_round = 2"), "{text}");
    let back: CoordinatorConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, c);
}
