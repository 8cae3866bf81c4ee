//! Bad input is a clear error, never a panic, and never changes the policy's state.

use bandit::policy::{
    DiscountedUcbConfig, EpsilonGreedyConfig, Exp3Config, FixedConfig, SUcbConfig,
    SlidingWindowUcbConfig, ThompsonConfig, Ucb1Config,
};
use bandit::{
    AnyPolicy, Arm, ArmSpace, BanditError, DeviceContext, FeasibilityConfig, FeasibilityFilter,
    Filtered, Policy, PolicyConfig,
};
use expect_test::{expect, Expect};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn space() -> ArmSpace {
    ArmSpace::new(0.0, 0.6, vec![4, 8, 16, 32, 64]).expect("valid space")
}

/// Renders an error (or "ok") for a snapshot.
fn check<T: std::fmt::Debug>(result: Result<T, BanditError>, expect: Expect) {
    let text = match result {
        Ok(v) => format!("ok: {v:?}"),
        Err(e) => e.to_string(),
    };
    expect.assert_eq(&text);
}

/// A policy that has seen a few rounds, so "unchanged" means something.
fn trained(config: &PolicyConfig) -> Filtered<AnyPolicy> {
    let mut p = Filtered::new(
        config.build(&space()).unwrap(),
        FeasibilityFilter::default(),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for round in 0..40 {
        let ctx = DeviceContext::new(1, round);
        let arm = p.choose(&ctx, &mut rng).unwrap();
        p.observe(&ctx, arm, 0.5 + 0.01 * (round % 7) as f64)
            .unwrap();
    }
    p
}

#[test]
fn bad_rewards_and_unknown_arms_are_errors_that_leave_the_state_alone() {
    let ctx = DeviceContext::new(1, 40);
    for config in PolicyConfig::all_defaults() {
        let kind = config.kind();
        let mut policy = trained(&config);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let good = policy.clone().choose(&ctx, &mut rng).unwrap();
        let before = serde_json::to_string(&policy).unwrap();

        let bad_inputs = [
            (good, f64::NAN),
            (good, f64::INFINITY),
            (good, f64::NEG_INFINITY),
            (Arm::new(0.9, good.rank), 0.5),
            (Arm::new(-0.1, good.rank), 0.5),
            (Arm::new(f64::NAN, good.rank), 0.5),
            (Arm::new(good.prune_ratio, 12), 0.5),
            (Arm::new(good.prune_ratio, 0), 0.5),
        ];
        for (arm, reward) in bad_inputs {
            let err = policy.observe(&ctx, arm, reward).unwrap_err();
            assert!(
                matches!(
                    err,
                    BanditError::NonFiniteReward { .. } | BanditError::UnknownArm { .. }
                ),
                "{kind}: {arm} / {reward}: {err}"
            );
            assert_eq!(
                serde_json::to_string(&policy).unwrap(),
                before,
                "{kind}: state changed by a rejected observation ({err})"
            );
        }
        // The policy still works afterwards.
        policy.observe(&ctx, good, 0.4).unwrap();
    }
}

#[test]
fn error_messages_say_what_is_wrong() {
    let ctx = DeviceContext::new(1, 0);
    let mut ucb = PolicyConfig::Ucb1(Ucb1Config::default())
        .build(&space())
        .unwrap();
    check(
        ucb.observe(&ctx, Arm::new(0.36, 16), f64::NAN),
        expect!["non-finite reward NaN for arm (ratio 0.36, rank 16)"],
    );
    check(
        ucb.observe(&ctx, Arm::new(0.3, 12), 0.5),
        expect!["unknown arm (ratio 0.3, rank 12): rank not in the allowed set [4, 8, 16, 32, 64]"],
    );
    check(
        ucb.observe(&ctx, Arm::new(0.7, 16), 0.5),
        expect!["unknown arm (ratio 0.7, rank 16): pruning ratio outside [0, 0.6]"],
    );
    check(
        ucb.observe(&ctx, Arm::new(0.31, 16), 0.5),
        expect!["unknown arm (ratio 0.31, rank 16): pruning ratio is not on this policy's grid of 6 ratios (nearest 0.36)"],
    );
    let mut exp3 = PolicyConfig::Exp3(Exp3Config::default())
        .build(&space())
        .unwrap();
    check(
        exp3.observe(&ctx, Arm::new(0.36, 16), 1.5),
        expect!["reward 1.5 for arm (ratio 0.36, rank 16) is outside [0, 1], which this policy requires"],
    );
    let mut fixed = PolicyConfig::Fixed(FixedConfig::default())
        .build(&space())
        .unwrap();
    check(
        fixed.observe(&ctx, Arm::new(0.36, 16), 0.5),
        expect![
            "unknown arm (ratio 0.36, rank 16): this fixed policy only plays (ratio 0.3, rank 16)"
        ],
    );
    // Off-grid ratios are fine for the continuous policies.
    let mut sucb = PolicyConfig::SUcb(SUcbConfig::default())
        .build(&space())
        .unwrap();
    check(
        sucb.observe(&ctx, Arm::new(0.31, 16), 0.5),
        expect!["ok: ()"],
    );
}

#[test]
fn bad_arm_spaces_are_rejected() {
    check(
        ArmSpace::new(0.0, 0.5, vec![]),
        expect!["empty arm space: the allowed rank set is empty"],
    );
    check(
        ArmSpace::new(0.6, 0.2, vec![8]),
        expect!["invalid pruning-ratio range [0.6, 0.2]: need finite 0 <= min <= max <= 1"],
    );
    check(
        ArmSpace::new(f64::NAN, 0.2, vec![8]),
        expect!["invalid pruning-ratio range [NaN, 0.2]: need finite 0 <= min <= max <= 1"],
    );
    check(
        ArmSpace::new(0.0, 1.5, vec![8]),
        expect!["invalid pruning-ratio range [0, 1.5]: need finite 0 <= min <= max <= 1"],
    );
    check(
        ArmSpace::new(0.0, 0.5, vec![8, 0]),
        expect!["invalid LoRA rank 0: ranks must be at least 1"],
    );
    let unsorted = ArmSpace {
        ratio_min: 0.0,
        ratio_max: 0.5,
        ranks: vec![16, 8],
    };
    check(
        unsorted.validate(),
        expect!["invalid parameter ranks = [16, 8]: expected strictly ascending ranks (ArmSpace::new sorts them)"],
    );
    check(
        space().grid(0),
        expect!["empty arm grid: n_ratios must be at least 1, got 0"],
    );
    // A deserialized empty space is caught when a policy is built from it.
    let empty = ArmSpace {
        ratio_min: 0.0,
        ratio_max: 0.5,
        ranks: vec![],
    };
    for config in PolicyConfig::all_defaults() {
        assert_eq!(
            config.build(&empty).unwrap_err(),
            BanditError::EmptyRankSet,
            "{}",
            config.kind()
        );
    }
}

#[test]
fn bad_policy_parameters_are_rejected() {
    let cases: Vec<(PolicyConfig, Expect)> = vec![
        (
            PolicyConfig::SUcb(SUcbConfig {
                rho: 1.0,
                ..Default::default()
            }),
            expect!["invalid parameter rho = 1: expected a number in (0, 1)"],
        ),
        (
            PolicyConfig::SUcb(SUcbConfig {
                nu: f64::NAN,
                ..Default::default()
            }),
            expect!["invalid parameter nu = NaN: expected a finite number >= 0"],
        ),
        (
            PolicyConfig::Ucb1(Ucb1Config {
                n_ratios: 0,
                ..Default::default()
            }),
            expect!["empty arm grid: n_ratios must be at least 1, got 0"],
        ),
        (
            PolicyConfig::DiscountedUcb(DiscountedUcbConfig {
                gamma: 0.0,
                ..Default::default()
            }),
            expect!["invalid parameter gamma = 0: expected a number in (0, 1]"],
        ),
        (
            PolicyConfig::SlidingWindowUcb(SlidingWindowUcbConfig {
                window: 0,
                ..Default::default()
            }),
            expect!["invalid parameter window = 0: expected at least 1 observation"],
        ),
        (
            PolicyConfig::Thompson(ThompsonConfig {
                noise_std: 0.0,
                ..Default::default()
            }),
            expect!["invalid parameter noise_std = 0: expected a finite number > 0"],
        ),
        (
            PolicyConfig::Exp3(Exp3Config {
                gamma: 1.5,
                ..Default::default()
            }),
            expect!["invalid parameter gamma = 1.5: expected a number in (0, 1]"],
        ),
        (
            PolicyConfig::EpsilonGreedy(EpsilonGreedyConfig {
                epsilon: 2.0,
                ..Default::default()
            }),
            expect!["invalid parameter epsilon = 2: expected a number in [0, 1]"],
        ),
        (
            PolicyConfig::Fixed(FixedConfig {
                prune_ratio: Some(0.9),
                rank: None,
            }),
            expect!["unknown arm (ratio 0.9, rank 16): pruning ratio outside [0, 0.6]"],
        ),
        (
            PolicyConfig::Fixed(FixedConfig {
                prune_ratio: None,
                rank: Some(12),
            }),
            expect![
                "unknown arm (ratio 0.3, rank 12): rank not in the allowed set [4, 8, 16, 32, 64]"
            ],
        ),
    ];
    for (config, expect) in cases {
        check(config.build(&space()).map(|p| p.kind()), expect);
    }
    check(
        FeasibilityFilter::new(FeasibilityConfig {
            ram_fraction: 0.0,
            ..Default::default()
        }),
        expect!["invalid parameter ram_fraction = 0: expected a finite number > 0"],
    );
}
