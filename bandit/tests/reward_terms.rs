//! Each reward term on its own: two devices of one round that differ in one statistic only,
//! and the reward moves the way the term says (more loss reduction, more of the gap to s*
//! closed, a larger update, an earlier finish: more reward); a tiny non-zero ratio earns a
//! tiny share of the sparsity credit, and a straggler loses more than an early finisher gains.

use bandit::{shape_rewards, RewardWeights, RoundStats};

/// A device that lowered its loss from 2.0 to 1.5, pruned from 0.1 to 0.2 toward s* = 0.5,
/// with update norm 1.0, in 100 ms.
fn base() -> RoundStats {
    RoundStats {
        loss_pre: 2.0,
        loss_post: 1.5,
        sparsity_prev: 0.1,
        sparsity_now: 0.2,
        sparsity_target: 0.5,
        update_norm: 1.0,
        duration_ms: 100,
        failed: false,
        missed_deadline: false,
    }
}

/// Rewards of a round where a third device with `base()` stats anchors the normalisations,
/// so neither compared device is the round's yardstick on every term at once.
fn pair(better: RoundStats, worse: RoundStats, w: &RewardWeights) -> (f64, f64) {
    let anchor = RoundStats {
        loss_post: 1.0,
        update_norm: 2.0,
        ..base()
    };
    let r = shape_rewards(&[better, worse, anchor], w).unwrap();
    (r[0], r[1])
}

fn assert_higher(better: RoundStats, worse: RoundStats, term: &str) {
    let (b, w) = pair(better, worse, &RewardWeights::default());
    assert!(b > w, "{term}: {b} should beat {w}");
}

#[test]
fn more_loss_reduction_earns_more() {
    let better = RoundStats {
        loss_post: 1.2,
        ..base()
    };
    assert_higher(better, base(), "loss");
}

#[test]
fn closing_more_of_the_gap_to_the_target_earns_more() {
    let better = RoundStats {
        sparsity_now: 0.4,
        ..base()
    };
    assert_higher(better, base(), "progress");
    // A round that pruned nothing earns none of the progress credit.
    let none = RoundStats {
        sparsity_now: 0.1,
        ..base()
    };
    assert_higher(base(), none, "progress vs none");
}

#[test]
fn a_larger_update_earns_more() {
    let better = RoundStats {
        update_norm: 1.8,
        ..base()
    };
    assert_higher(better, base(), "update norm");
}

#[test]
fn finishing_earlier_earns_more_and_stragglers_lose_more_than_early_finishers_gain() {
    let early = RoundStats {
        duration_ms: 50,
        ..base()
    };
    let late = RoundStats {
        duration_ms: 150,
        ..base()
    };
    assert_higher(early, late, "time");
    // Only the time term differs between the three devices (mean 100 ms): the early one is
    // 0.5 ahead, the late one 0.5 behind. The early finisher's gain over the on-time device is
    // smaller than the straggler's loss.
    let w = RewardWeights::default();
    let r = shape_rewards(&[early, base(), late], &w).unwrap();
    let (gain, loss) = (r[0] - r[1], r[1] - r[2]);
    assert!(gain > 0.0 && loss > gain, "gain {gain}, loss {loss}");
    let positive = w.w1 + w.w2 + w.w3;
    assert!((gain - w.w4 * w.early_credit * 0.5 / positive).abs() < 1e-12);
    assert!((loss - w.w4 * 0.5 / positive).abs() < 1e-12);
}

#[test]
fn a_tiny_nonzero_ratio_no_longer_earns_full_sparsity_credit() {
    // Only the sparsity term counts. A device that pruned 0 -> 0.01 toward s* = 0.5 closed 2%
    // of the gap: it earns 2% of the credit (dividing by its own ratio 0.01 used to give it
    // all of it). Closing the whole gap earns all of it.
    let w = RewardWeights {
        w1: 0.0,
        w2: 1.0,
        w3: 0.0,
        w4: 0.0,
        ..RewardWeights::default()
    };
    let tiny = RoundStats {
        sparsity_prev: 0.0,
        sparsity_now: 0.01,
        ..base()
    };
    let whole = RoundStats {
        sparsity_prev: 0.0,
        sparsity_now: 0.5,
        ..base()
    };
    let r = shape_rewards(&[tiny, whole], &w).unwrap();
    assert!((r[0] - 0.02).abs() < 1e-12, "{}", r[0]);
    assert_eq!(r[1], 1.0);
}
