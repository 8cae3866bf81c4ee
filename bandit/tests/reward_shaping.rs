//! Reward shaping on hand-computed rounds: normalisation within the round, zero for failures, no division by zero.

use bandit::{shape_rewards, BanditError, RewardWeights, RoundStats};
use expect_test::{expect, Expect};

/// One device's stats: (loss_pre, loss_post, sparsity_prev, sparsity_now, sparsity_target,
/// update_norm, duration_ms).
fn ok(l0: f64, l1: f64, s0: f64, s1: f64, target: f64, norm: f64, ms: u64) -> RoundStats {
    RoundStats {
        loss_pre: l0,
        loss_post: l1,
        sparsity_prev: s0,
        sparsity_now: s1,
        sparsity_target: target,
        update_norm: norm,
        duration_ms: ms,
        failed: false,
        missed_deadline: false,
    }
}

fn check(stats: &[RoundStats], weights: RewardWeights, expect: Expect) {
    let text = match shape_rewards(stats, &weights) {
        Ok(r) => r
            .iter()
            .map(|v| format!("{v:.6}"))
            .collect::<Vec<_>>()
            .join(" "),
        Err(e) => e.to_string(),
    };
    expect.assert_eq(&text);
}

/// The hand-computed round of `two_devices_by_hand`.
fn two_devices() -> [RoundStats; 2] {
    [
        ok(2.0, 1.5, 0.1, 0.2, 0.4, 2.0, 100),
        ok(2.0, 1.8, 0.1, 0.1, 0.4, 1.0, 300),
    ]
}

/// Only the loss term weighs.
fn loss_only(loss_trim: f64) -> RewardWeights {
    RewardWeights {
        w1: 1.0,
        w2: 0.0,
        w3: 0.0,
        w4: 0.0,
        loss_trim,
        ..w()
    }
}

fn w() -> RewardWeights {
    RewardWeights::default() // w1 = 1, w2 = 0.5, w3 = 0.25, w4 = 0.25; w1 + w2 + w3 = 1.75
}

#[test]
fn two_devices_by_hand() {
    // d0: loss 2.0 -> 1.5 (0.25), sparsity 0.1 -> 0.2 toward 0.4 (a third of the gap 0.3),
    //     norm 2 (1.0), 100 ms
    // d1: loss 2.0 -> 1.8 (0.10), sparsity 0.1 -> 0.1 (0), norm 1 (0.5), 300 ms
    // loss normalised by the round's max 0.25: d0 1.0, d1 0.4; mean time 200: d0 0.5 early
    // (credit 0.5 * 0.5 = 0.25), d1 0.5 late (penalty 0.5).
    // d0: (1.0 + 0.5/3 + 0.25*1.0 + 0.25*0.25) / 1.75 = 1.479167 / 1.75 = 0.845238
    // d1: (0.4 + 0     + 0.25*0.5 - 0.25*0.5)  / 1.75 = 0.40 / 1.75     = 0.228571
    let round = two_devices();
    check(&round, w(), expect!["0.845238 0.228571"]);
}

#[test]
fn failures_and_late_devices_get_zero_and_do_not_shift_the_others() {
    let mut failed = ok(f64::NAN, f64::NAN, f64::NAN, 2.0, -1.0, f64::INFINITY, 0);
    failed.failed = true;
    let mut late = ok(2.0, 0.1, 0.0, 0.4, 0.4, 100.0, 10_000);
    late.missed_deadline = true;
    let round = [
        ok(2.0, 1.5, 0.1, 0.2, 0.4, 2.0, 100),
        failed,
        ok(2.0, 1.8, 0.1, 0.1, 0.4, 1.0, 300),
        late,
    ];
    // Same as the two-device round above for the two that count.
    check(&round, w(), expect!["0.845238 0.000000 0.228571 0.000000"]);
}

#[test]
fn a_single_device_is_its_own_yardstick() {
    // loss 3.0 -> 2.7 normalises to 1, norm to 1, time to 0; sparsity 0 -> 0.1 of 0.5 = 0.2.
    // (1 + 0.5*0.2 + 0.25) / 1.75 = 1.35 / 1.75 = 0.771429
    check(
        &[ok(3.0, 2.7, 0.0, 0.1, 0.5, 0.7, 50)],
        w(),
        expect!["0.771429"],
    );
}

#[test]
fn zero_denominators_contribute_nothing() {
    // L_pre = 0, every norm 0, every duration 0: those terms are 0. A device that started at
    // the target (here s* = 0) has nothing left to close: progress 1, 0.5 / 1.75.
    let zero = ok(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0);
    check(&[zero, zero], w(), expect!["0.285714 0.285714"]);
    let short = ok(0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0);
    check(&[short, short], w(), expect!["0.000000 0.000000"]);
    // Equal devices get equal rewards: loss 1, norm 1, time 0, sparsity 0.2 -> 0.25 toward 0.3
    // (half the gap). (1 + 0.5*0.5 + 0.25) / 1.75 = 0.857143
    let same = ok(1.0, 0.5, 0.2, 0.25, 0.3, 4.0, 1_000);
    check(
        &[same, same, same],
        w(),
        expect!["0.857143 0.857143 0.857143"],
    );
}

#[test]
fn rewards_are_clipped_to_the_unit_interval() {
    // The first two losses went up, the third fell by half (the round's largest change, 0.5).
    // Sparsity progress beyond the target is capped at 1.
    let round = [
        ok(2.0, 2.2, 0.0, 0.0, 0.5, 1.0, 100),
        ok(2.0, 2.1, 0.0, 0.0, 0.5, 1.0, 100),
        ok(2.0, 1.0, 0.0, 0.9, 0.1, 1.0, 100),
    ];
    // Third: loss 0.5/0.5 = 1, progress past the target min(9, 1) = 1, norm 1, time 0: 1.75 / 1.75 = 1.
    // First two: loss -0.1/0.5 = -0.2 and -0.05/0.5 = -0.1; raw -0.2 + 0.25 = 0.05 -> 0.028571
    // and -0.1 + 0.25 = 0.15 -> 0.085714.
    // Alone, a worsening loss gives -1 + 0.25 < 0, clipped to 0.
    check(&round, w(), expect!["0.028571 0.085714 1.000000"]);
    check(
        &[ok(2.0, 2.2, 0.0, 0.0, 0.5, 1.0, 100)],
        w(),
        expect!["0.000000"],
    );
    check(&[], w(), expect![""]);
}

#[test]
fn weights_change_the_mix() {
    let round = two_devices();
    // Loss only: d0 1.0, d1 0.4.
    check(&round, loss_only(0.0), expect!["1.000000 0.400000"]);
    // Norm with a heavy time weight: d0 finished 0.5 early, (0.25*1 + 1*0.5*0.5)/0.25 = 2 -> 1;
    // d1 0.5 late, (0.25*0.5 - 1*0.5)/0.25 < 0 -> 0.
    let time_heavy = RewardWeights {
        w1: 0.0,
        w2: 0.0,
        w3: 0.25,
        w4: 1.0,
        ..w()
    };
    check(&round, time_heavy, expect!["1.000000 0.000000"]);
}

#[test]
fn bad_statistics_and_weights_are_errors() {
    let mut nan_loss = ok(2.0, 1.5, 0.1, 0.2, 0.4, 2.0, 100);
    nan_loss.loss_post = f64::NAN;
    check(
        &[ok(2.0, 1.5, 0.1, 0.2, 0.4, 2.0, 100), nan_loss],
        w(),
        expect!["round statistics for entry 1: loss_post = NaN is not valid (finite and >= 0)"],
    );
    check(
        &[ok(2.0, 1.5, 0.1, 1.2, 0.4, 2.0, 100)],
        w(),
        expect!["round statistics for entry 0: sparsity_now = 1.2 is not valid (in [0, 1])"],
    );
    check(
        &[ok(2.0, 1.5, 0.1, 0.2, 0.4, f64::INFINITY, 100)],
        w(),
        expect!["round statistics for entry 0: update_norm = inf is not valid (finite and >= 0)"],
    );
    let negative = RewardWeights { w2: -0.5, ..w() };
    check(
        &[],
        negative,
        expect!["invalid parameter w2 = -0.5: expected a finite weight >= 0"],
    );
    let nothing = RewardWeights {
        w1: 0.0,
        w2: 0.0,
        w3: 0.0,
        w4: 1.0,
        ..w()
    };
    check(
        &[],
        nothing,
        expect!["invalid parameter w1 + w2 + w3 = 0: expected a positive sum (some reward term must count)"],
    );
    let generous = RewardWeights {
        early_credit: 1.0,
        ..w()
    };
    check(
        &[],
        generous,
        expect!["invalid parameter early_credit = 1: expected in [0, 1) (an early finisher earns less than a straggler loses)"],
    );
    assert!(matches!(
        shape_rewards(&[nan_loss], &w()),
        Err(BanditError::InvalidStat { index: 0, .. })
    ));
}

#[test]
fn weights_load_from_toml_with_defaults() {
    let parsed: RewardWeights = toml::from_str("w4 = 0.5").unwrap();
    assert_eq!(parsed, RewardWeights { w4: 0.5, ..w() });
}

/// Nine honest devices with loss changes 0.01 ... 0.09 and a tenth that lies; only the loss
/// term counts. Returns the ten rewards.
fn with_a_liar(pre: f64, post: f64, loss_trim: f64) -> Vec<f64> {
    let mut round: Vec<RoundStats> = (1..=9)
        .map(|k| ok(1.0, 1.0 - 0.01 * k as f64, 0.0, 0.0, 0.3, 1.0, 100))
        .collect();
    round.push(ok(pre, post, 0.0, 0.0, 0.3, 1.0, 100));
    shape_rewards(&round, &loss_only(loss_trim)).unwrap()
}

#[test]
fn a_device_lying_about_its_losses_cannot_set_the_others_loss_scale_when_trimmed() {
    let honest_alone: Vec<f64> = (1..=9).map(|k| k as f64 / 9.0).collect();
    let close =
        |got: &[f64], want: &[f64]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12);
    // Two lies that pass the aggregator's range checks (losses finite, in [0, max_loss]): a
    // perfect round (change 1) and a blow-up from a near-zero loss (change about -1e9).
    let perfect = (1000.0, 0.0);
    let blow_up = (1e-6, 1000.0);
    // The round's largest as the scale (the default): the liar decides it, and the best
    // honest device's loss term falls from 1 to 0.09, or to about 1e-10.
    let max_perfect = with_a_liar(perfect.0, perfect.1, 0.0);
    assert!((max_perfect[8] - 0.09).abs() < 1e-12, "{max_perfect:?}");
    assert_eq!(max_perfect[9], 1.0);
    let max_blow_up = with_a_liar(blow_up.0, blow_up.1, 0.0);
    assert!(max_blow_up[8] < 1e-9, "{max_blow_up:?}");
    // Trimmed (f = ceil(0.1 * 10) = 1): the scale is the best honest change whatever the liar
    // says, so the honest terms are what they would be without the liar, and the liar's own
    // term is clamped to [-1, 1] (rewards clamp at 0).
    for (pre, post) in [perfect, blow_up] {
        let r = with_a_liar(pre, post, 0.1);
        assert!(close(&r[..9], &honest_alone), "{r:?}");
        assert!((0.0..=1.0).contains(&r[9]));
    }
    // The price of trimming, in an honest round: the largest change is trimmed too, so with
    // the tenth device at an honest 0.05 the scale is the second largest, 0.08, and the best
    // device's term clamps at 1 beside one of exactly 1.
    let honest = with_a_liar(1.0, 0.95, 0.1);
    let by_second: Vec<f64> = (1..=9).map(|k| (k as f64 / 8.0).min(1.0)).collect();
    assert!(close(&honest[..9], &by_second), "{honest:?}");
    // Two liars in ten need a trim over 0.1: at 0.2 (f = 2) both are trimmed.
    let mut round: Vec<RoundStats> = (1..=8)
        .map(|k| ok(1.0, 1.0 - 0.01 * k as f64, 0.0, 0.0, 0.3, 1.0, 100))
        .collect();
    round.push(ok(1000.0, 0.0, 0.0, 0.0, 0.3, 1.0, 100));
    round.push(ok(1e-6, 1000.0, 0.0, 0.0, 0.3, 1.0, 100));
    let trim = |loss_trim| shape_rewards(&round, &loss_only(loss_trim)).unwrap();
    assert!(
        trim(0.1)[7] < 0.1,
        "one trimmed liar of two still sets the scale"
    );
    let two = trim(0.2);
    let eight: Vec<f64> = (1..=8).map(|k| k as f64 / 8.0).collect();
    assert!(close(&two[..8], &eight), "{two:?}");
}

#[test]
fn the_loss_trim_is_checked_and_zero_is_the_old_scale() {
    let round = two_devices();
    // The hand-computed round of `two_devices_by_hand`: trimming one of two devices leaves the
    // smaller change (0.10) as the scale, so d0's loss term clamps at 1 and d1's becomes 1.
    check(&round, w(), expect!["0.845238 0.228571"]);
    check(
        &round,
        RewardWeights {
            loss_trim: 0.3,
            ..w()
        },
        expect!["0.845238 0.571429"],
    );
    for bad in [0.5, -0.1, f64::NAN] {
        let e = shape_rewards(
            &round,
            &RewardWeights {
                loss_trim: bad,
                ..w()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("loss_trim"), "{e}");
    }
    // Left out of a serialised config at 0, read back when given.
    let text = toml::to_string(&w()).unwrap();
    assert!(!text.contains("loss_trim"), "{text}");
    let parsed: RewardWeights = toml::from_str("loss_trim = 0.2").unwrap();
    assert_eq!(parsed.loss_trim, 0.2);
}

/// Finite losses can divide to an infinite change (1e300 after 1e-300): it counts as the
/// largest finite change, so every reward stays a number, at either trim.
#[test]
fn an_infinite_loss_change_gives_no_nan() {
    for trim in [0.0, 0.3] {
        let round = [
            ok(1e-300, 1e300, 0.0, 0.0, 0.3, 1.0, 100),
            ok(2.0, 1.5, 0.0, 0.0, 0.3, 1.0, 100),
            ok(2.0, 1.8, 0.0, 0.0, 0.3, 1.0, 100),
        ];
        let r = shape_rewards(&round, &loss_only(trim)).unwrap();
        assert!(r.iter().all(|x| (0.0..=1.0).contains(x)), "{trim}: {r:?}");
    }
}
