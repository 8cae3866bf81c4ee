//! When things happen in a local round: the learning rate at each optimiser step (linear
//! warm-up, then cosine decay), the steps after which pruning happens, and the sparsity target
//! of each pruning event.
//!
//! Pruning is gradual by default: the round's gap from its starting sparsity to its target
//! is closed in many small events on a cubic schedule (Zhu and Gupta, 2017),
//! `s_i = s_f + (s_0 - s_f) (1 - i/n)^3` after event `i` of `n`, during the first three
//! quarters of the round; the last quarter recovers. Rule: there are at least
//! `min_prune_events` events (default 8) whenever the pruning window holds that many steps,
//! `prune_every` being the longest interval between them, so no event takes more than
//! `1 - (1 - 1/n)^3` of the gap, 33.0% at n = 8 (the first, largest event; the later ones
//! shrink). Units are whole heads and channels, so an event may overshoot its target by less
//! than one head group, and the next then takes that much less.

use serde::{Deserialize, Serialize};

use super::TrainConfig;

/// How a round's pruning gap is spread over its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PruneShape {
    /// Cubic toward the target: larger events first, while the model has the most slack.
    #[default]
    Cubic,
    /// Equal events.
    Linear,
    /// The whole gap in one event after `prune_every` steps (or at the end of the pruning
    /// window if sooner); a baseline, not for federated rounds.
    OneShot,
}

impl std::str::FromStr for PruneShape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Self::Cubic),
            "linear" => Ok(Self::Linear),
            "one-shot" => Ok(Self::OneShot),
            o => Err(format!(
                "unknown prune schedule '{o}' (cubic, linear, one-shot)"
            )),
        }
    }
}

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

/// Optimiser steps (1-based) during which pruning may happen: the first three quarters of a
/// round (at least one step).
pub fn prune_window(steps: usize) -> usize {
    (steps - steps / 4).max(1)
}

/// The steps (1-based optimiser steps) after which pruning happens in a round of `steps`
/// steps: multiples of the interval `min(every, window / min_events)` (at least 1) within
/// the pruning window ([`prune_window`]); one event for [`PruneShape::OneShot`].
pub fn prune_schedule(
    steps: usize,
    every: usize,
    min_events: usize,
    shape: PruneShape,
) -> Vec<usize> {
    if steps == 0 {
        return vec![];
    }
    let window = prune_window(steps);
    let every = every.max(1);
    if shape == PruneShape::OneShot {
        return vec![every.min(window)];
    }
    let k = every.min((window / min_events.max(1)).max(1));
    (1..=window / k).map(|i| i * k).collect()
}

/// Sparsity target after each of `events` pruning events going from `start` to `target`.
pub fn event_targets(start: f64, target: f64, events: usize, shape: PruneShape) -> Vec<f64> {
    if target <= start || events == 0 {
        return vec![start; events];
    }
    let n = events as f64;
    (1..=events)
        .map(|i| {
            let t = i as f64 / n;
            let left = match shape {
                PruneShape::Cubic => (1.0 - t).powi(3),
                PruneShape::Linear => 1.0 - t,
                PruneShape::OneShot => 0.0,
            };
            target + (start - target) * left
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_gradual(steps: usize, every: usize, start: f64, target: f64) {
        let c = TrainConfig::default();
        let ev = prune_schedule(steps, every, c.min_prune_events, c.prune_shape);
        let t = event_targets(start, target, ev.len(), c.prune_shape);
        assert!(ev.len() >= 8, "{steps} steps, every {every}: {ev:?}");
        assert!(ev.windows(2).all(|w| w[0] < w[1]));
        assert!(*ev.last().unwrap() <= prune_window(steps));
        assert!((t.last().unwrap() - target).abs() < 1e-12);
        let gap = target - start;
        let mut prev = start;
        for &x in &t {
            assert!(x >= prev, "{t:?}");
            assert!(
                x - prev <= gap / 3.0,
                "event of {} of a gap {gap}: {t:?}",
                x - prev
            );
            prev = x;
        }
    }

    #[test]
    fn default_schedule_prunes_gradually() {
        // The case: 0.3 over 40 steps with the default interval.
        let c = TrainConfig::default();
        let ev = prune_schedule(40, c.prune_every, c.min_prune_events, c.prune_shape);
        assert_eq!(ev, vec![3, 6, 9, 12, 15, 18, 21, 24, 27, 30]);
        let t = event_targets(0.0, 0.3, ev.len(), c.prune_shape);
        let sizes: Vec<f64> = t
            .iter()
            .scan(0.0, |p, &x| {
                let d = x - *p;
                *p = x;
                Some(d)
            })
            .collect();
        // Cubic: 8.1% of the parameters first, then shrinking events, 0.03% last.
        assert!((sizes[0] - 0.3 * (1.0 - 0.9f64.powi(3))).abs() < 1e-12);
        assert!(sizes.windows(2).all(|w| w[0] > w[1]));
        for (steps, every) in [(40, 20), (40, 5), (100, 20), (400, 20), (33, 1), (11, 40)] {
            check_gradual(steps, every, 0.0, 0.3);
            check_gradual(steps, every, 0.2, 0.5);
        }
        // A long round keeps the configured interval.
        assert_eq!(prune_schedule(400, 20, 8, PruneShape::Cubic).len(), 15);
    }

    #[test]
    fn short_rounds_linear_and_one_shot() {
        assert_eq!(
            prune_schedule(0, 20, 8, PruneShape::Cubic),
            Vec::<usize>::new()
        );
        assert_eq!(prune_schedule(1, 20, 8, PruneShape::Cubic), vec![1]);
        assert_eq!(prune_schedule(4, 20, 8, PruneShape::Cubic), vec![1, 2, 3]);
        assert_eq!(prune_schedule(40, 20, 8, PruneShape::OneShot), vec![20]);
        assert_eq!(prune_schedule(10, 20, 8, PruneShape::OneShot), vec![8]);
        let t = event_targets(0.1, 0.5, 4, PruneShape::Linear);
        assert!((t[0] - 0.2).abs() < 1e-12 && (t[3] - 0.5).abs() < 1e-12);
        assert_eq!(event_targets(0.1, 0.5, 1, PruneShape::OneShot), vec![0.5]);
        assert_eq!(
            event_targets(0.5, 0.3, 2, PruneShape::Cubic),
            vec![0.5, 0.5]
        );
    }

    #[test]
    fn learning_rate_warms_up_and_decays() {
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
