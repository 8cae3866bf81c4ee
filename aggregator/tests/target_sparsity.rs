//! The run's target sparsity s* and the baselines around it, at the coordinator: every round
//! configuration carries s* and the arm's ratio as the round's pace; `fixed-prune` sends its
//! fixed pace every round; `prune-after-fl` never asks for pruning while the federation
//! trains; every strategy aggregates with the run's configured method unless its config
//! names another; s* and the arm range are validated.

mod common;

use aggregator::aggregate::AggregationMethod;
use aggregator::coordinator::{Coordinator, CoordinatorConfig};
use aggregator::strategy::{
    FedLoraConfig, FixedPruneConfig, HetLoraConfig, PruneAfterFlConfig, StrategyConfig, TargetRoute,
};
use protocol::{RoundConfig, SparsityGoal};

use common::{dims, join_msg, run_answering, shifted_answer};

/// Three devices per round for `rounds` rounds, s* = 0.5, paces in [0.25, 1].
fn config(strategy: StrategyConfig, rounds: u64) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        rounds,
        devices_per_round: 3,
        over_selection: 0.0,
        round_deadline_ms: 1_000,
        local_steps: 4,
        prune_interval_steps: 2,
        max_rank: 8,
        seed: 11,
        target_sparsity: Some(0.5),
        strategy,
        ..CoordinatorConfig::default()
    };
    c.arms.ratio_min = 0.25;
    c.arms.ratio_max = 1.0;
    c.arms.ranks = vec![2, 4, 8];
    c
}

/// Runs the coordinator with three devices that answer every configuration at once; returns
/// every round configuration sent, in order.
fn run(config: CoordinatorConfig) -> Vec<RoundConfig> {
    let mut coord = Coordinator::new(config, dims()).unwrap();
    let joins = (1..=3).map(|d| (d, join_msg(d))).collect();
    run_answering(&mut coord, joins, |d, rc| shifted_answer(d, rc, 2.0, 100))
}

#[test]
fn fedspine_sends_the_target_and_the_bandits_pace() {
    let sent = run(config(StrategyConfig::Fedspine, 3));
    assert_eq!(sent.len(), 9, "three rounds of three devices");
    for rc in &sent {
        assert_eq!(rc.target_sparsity, Some(0.5));
        let pace = rc.arm.prune_ratio;
        assert!((0.25..=1.0).contains(&pace), "{pace}");
        // The device closes that share of its gap: from 0.1, 0.1 + pace * 0.4.
        let goal = rc.sparsity_goal();
        assert_eq!(goal, SparsityGoal::Paced { target: 0.5, pace });
        let want = 0.1 + pace * 0.4;
        let got = goal.round_target(0.1);
        assert!(
            (got - want).abs() < 1e-12 || (got == 0.5 && 0.5 - want < 0.005),
            "{got} vs {want}"
        );
    }
    // The bandits explore: not every device plays one pace.
    let first = sent[0].arm.prune_ratio;
    assert!(sent.iter().any(|rc| rc.arm.prune_ratio != first));
}

#[test]
fn fixed_prune_sends_its_fixed_pace_every_round() {
    let strategy = StrategyConfig::FixedPrune(FixedPruneConfig {
        prune_ratio: 0.4,
        rank: 4,
    });
    let sent = run(config(strategy, 3));
    assert_eq!(sent.len(), 9);
    for rc in &sent {
        assert_eq!((rc.arm.prune_ratio, rc.arm.rank), (0.4, 4));
        assert_eq!(rc.target_sparsity, Some(0.5));
    }
    // At one pace a device's goals approach s* geometrically: 0.2, 0.32, 0.392, ...
    let goal = sent[0].sparsity_goal();
    let mut s = 0.0;
    let mut path = Vec::new();
    for _ in 0..3 {
        s = goal.round_target(s);
        path.push((s * 1000.0).round() / 1000.0);
    }
    assert_eq!(path, vec![0.2, 0.32, 0.392]);
    // The pace is a TOML key of its own.
    let parsed: StrategyConfig = toml::from_str("kind = \"fixed-prune\"\npace = 0.6").unwrap();
    assert_eq!(
        parsed,
        StrategyConfig::FixedPrune(FixedPruneConfig {
            prune_ratio: 0.6,
            rank: 16
        })
    );
}

#[test]
fn prune_after_fl_never_prunes_during_the_rounds_and_prunes_once_at_the_end() {
    let strategy = StrategyConfig::PruneAfterFl(PruneAfterFlConfig {
        rank: 4,
        recovery_steps: 12,
    });
    assert_eq!(
        strategy.target_route(),
        TargetRoute::AfterTraining { recovery_steps: 12 }
    );
    let sent = run(config(strategy.clone(), 3));
    assert_eq!(sent.len(), 9);
    for rc in &sent {
        assert_eq!((rc.arm.prune_ratio, rc.arm.rank), (0.0, 4));
        // Pace 0: whatever the device's sparsity, the round prunes nothing.
        for s in [0.0, 0.2, 0.45] {
            assert_eq!(rc.sparsity_goal().round_target(s), s);
        }
    }
    // Without a target there is nothing to prune to at the end.
    let mut c = config(strategy, 3);
    c.target_sparsity = None;
    c.arms.ratio_max = 0.5;
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "invalid coordinator config: prune-after-fl needs a target_sparsity to prune to after the rounds"
    );
}

#[test]
fn every_strategy_aggregates_with_the_configured_method_unless_told_otherwise() {
    let mut c = config(StrategyConfig::Fedspine, 1);
    c.max_rank = 16;
    assert_eq!(c.aggregation.method, AggregationMethod::Exact);
    let method = |strategy: StrategyConfig| {
        let c = CoordinatorConfig {
            strategy,
            ..c.clone()
        };
        c.build_strategy()
            .unwrap()
            .aggregation(&c.aggregation)
            .method
    };
    for strategy in [
        StrategyConfig::Fedspine,
        StrategyConfig::Hetlora(HetLoraConfig::default()),
        StrategyConfig::Fedlora(FedLoraConfig::default()),
        StrategyConfig::FixedPrune(FixedPruneConfig::default()),
        StrategyConfig::RatioBandit(Default::default()),
        StrategyConfig::PruneAfterFl(PruneAfterFlConfig::default()),
    ] {
        assert_eq!(
            method(strategy.clone()),
            AggregationMethod::Exact,
            "{}",
            strategy.name()
        );
    }
    // HetLoRA's own averaging, and FedAvg on the factors, are explicit choices.
    let hetlora = StrategyConfig::Hetlora(HetLoraConfig {
        aggregation: Some(AggregationMethod::HetLora),
        ..HetLoraConfig::default()
    });
    assert_eq!(method(hetlora), AggregationMethod::HetLora);
    let parsed: StrategyConfig =
        toml::from_str("kind = \"fedlora\"\nrank = 4\naggregation = \"mean\"").unwrap();
    assert_eq!(method(parsed), AggregationMethod::Mean);
}

#[test]
fn the_target_and_the_pace_range_are_validated() {
    let err = |c: CoordinatorConfig| c.validate().unwrap_err().to_string();
    let mut c = config(StrategyConfig::Fedspine, 1);
    c.target_sparsity = Some(0.95);
    assert_eq!(
        err(c),
        "invalid coordinator config: target_sparsity 0.95 is outside [0, 0.9]"
    );
    let mut c = config(StrategyConfig::Fedspine, 1);
    c.target_sparsity = Some(f64::NAN);
    assert_eq!(
        err(c),
        "invalid coordinator config: target_sparsity NaN is outside [0, 0.9]"
    );
    // A pace of 1 (close the whole gap) is an arm with a target, not without one.
    let c = config(StrategyConfig::Fedspine, 1);
    assert!(c.validate().is_ok());
    let mut c = config(StrategyConfig::Fedspine, 1);
    c.target_sparsity = None;
    assert!(err(c).contains("arms.ratio_max 1 must be below 1 without a target_sparsity"));
    // fixed-prune: a pace in [0, 1] with a target, a ratio in [0, 1) without.
    let fixed = |ratio| {
        StrategyConfig::FixedPrune(FixedPruneConfig {
            prune_ratio: ratio,
            rank: 4,
        })
    };
    assert!(config(fixed(1.0), 1).validate().is_ok());
    assert_eq!(
        err(config(fixed(1.5), 1)),
        "invalid coordinator config: fixed-prune: pruning pace 1.5 is not in [0, 1]"
    );
    let mut c = config(fixed(1.0), 1);
    c.target_sparsity = None;
    c.arms.ratio_max = 0.5;
    assert_eq!(
        err(c),
        "invalid coordinator config: fixed-prune: prune ratio 1 is not in [0, 1)"
    );
    // TOML: the key parses and is checked.
    let parsed = CoordinatorConfig::from_toml_str("target_sparsity = 0.3").unwrap();
    assert_eq!(parsed.target_sparsity, Some(0.3));
    assert_eq!(CoordinatorConfig::default().target_sparsity, None);
}
