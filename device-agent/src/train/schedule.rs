//! When things happen in a local round: the learning rate at each optimiser step (linear
//! warm-up, then cosine decay), the steps after which pruning happens, and the sparsity target
//! of each pruning event.

use super::TrainConfig;

/// Learning rate at optimiser step `step` (0-based) of `total`.
pub fn lr_at(cfg: &TrainConfig, step: usize, total: usize) -> f64 {
    let warm = cfg.warmup_steps.min(total / 5);
    if step < warm {
        return cfg.lr * (step + 1) as f64 / (warm + 1) as f64;
    }
    let span = total.saturating_sub(warm).max(1) as f64;
    let t = ((step - warm) as f64 / span).min(1.0);
    let min = cfg.lr * cfg.min_lr_ratio;
    min + (cfg.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// The steps (1-based optimiser steps) after which pruning happens in a round of `steps`
/// steps with pruning every `every` steps: at `every, 2*every, ...` leaving the last
/// `every` steps for recovery; a round shorter than `every` prunes once, half-way.
pub fn prune_schedule(steps: usize, every: usize) -> Vec<usize> {
    let every = every.max(1);
    if steps == 0 {
        return vec![];
    }
    if steps <= every {
        return vec![(steps / 2).max(1)];
    }
    let n = steps.div_ceil(every) - 1;
    (1..=n).map(|i| i * every).collect()
}

/// Sparsity target of each pruning event: equal steps from `start` to `target`.
pub fn event_targets(start: f64, target: f64, events: usize) -> Vec<f64> {
    if target <= start || events == 0 {
        return vec![start; events];
    }
    (1..=events)
        .map(|i| start + (target - start) * i as f64 / events as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_prunes_in_equal_steps_and_leaves_recovery() {
        assert_eq!(prune_schedule(100, 20), vec![20, 40, 60, 80]);
        assert_eq!(prune_schedule(10, 20), vec![5]);
        assert_eq!(prune_schedule(41, 20), vec![20, 40]);
        let t = event_targets(0.1, 0.5, 4);
        assert!((t[0] - 0.2).abs() < 1e-12 && (t[3] - 0.5).abs() < 1e-12);
        assert_eq!(event_targets(0.5, 0.3, 2), vec![0.5, 0.5]);
        let c = TrainConfig {
            lr: 1.0,
            warmup_steps: 2,
            min_lr_ratio: 0.0,
            ..TrainConfig::default()
        };
        assert!(lr_at(&c, 0, 20) < lr_at(&c, 1, 20));
        assert!((lr_at(&c, 2, 20) - 1.0).abs() < 1e-12);
        assert!(lr_at(&c, 19, 20) < 0.05);
    }
}
