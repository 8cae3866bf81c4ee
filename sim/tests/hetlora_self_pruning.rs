//! hetlora's rank self-pruning in real training on the tiny model: some device drops tail rank
//! components (the coordinator remembers a rank below one it was sent); a strategy without
//! self-pruning never lowers a device's rank. That a remembered rank caps the later rounds is
//! `aggregator/tests/hetlora_rank.rs`'s.

use sim::config::ExperimentConfig;
use sim::experiment::{self, Resources};
use sim::Quiet;

#[test]
fn hetloras_rank_self_pruning_lowers_ranks_in_real_training_and_fedspine_never_does() {
    let cfg = ExperimentConfig::preset("tiny")
        .unwrap()
        .with_strategy("hetlora")
        .unwrap();
    let res = Resources::load(&cfg, None).unwrap();
    let (report, state) = experiment::run_with_state(&cfg, &res, &mut Quiet).unwrap();
    assert_eq!(report.summary.rounds_closed, cfg.coordinator.rounds);
    let limits: Vec<(u64, u32)> = state
        .devices
        .iter()
        .filter_map(|d| d.rank_limit.map(|r| (d.id.0, r)))
        .collect();
    assert!(!limits.is_empty(), "no device self-pruned its rank");
    for &(device, limit) in &limits {
        // The ranks the device was sent, in round order.
        let sent: Vec<u32> = report
            .rounds
            .iter()
            .flat_map(|r| r.plays.iter())
            .filter(|p| p.device == device)
            .map(|p| p.rank)
            .collect();
        assert!(
            sent.iter().any(|&r| r > limit),
            "device {device} holds limit {limit} but never trained above it: {sent:?}"
        );
    }

    let fedspine = cfg.with_strategy("fedspine").unwrap();
    let (_, state) = experiment::run_with_state(&fedspine, &res, &mut Quiet).unwrap();
    assert!(state.devices.iter().all(|d| d.rank_limit.is_none()));
}
