//! Determinism and checkpoints: same seed, same choices; policy state survives a JSON round trip and continues identically; configs load from TOML.

use bandit::arena::{run_rngs, Environment, SyntheticConfig, SyntheticEnvironment};
use bandit::policy::{
    DiscountedUcbConfig, EpsilonGreedyConfig, Exp3Config, FixedConfig, SUcbConfig,
    SlidingWindowUcbConfig, ThompsonConfig, Ucb1Config, UniformRandomConfig,
};
use bandit::{AnyPolicy, Arm, FeasibilityFilter, Filtered, Policy, PolicyConfig};
use rand_chacha::ChaCha8Rng;

/// Three devices, one per class of the `device-classes` preset (the phone runs out of memory
/// at low ratios, so the feasibility filter learns something too), sharing one policy.
fn environment() -> SyntheticEnvironment {
    let config = SyntheticConfig::preset("device-classes").expect("preset exists");
    SyntheticEnvironment::new(config, 3).expect("valid environment")
}

fn fresh(config: &PolicyConfig, env: &SyntheticEnvironment) -> Filtered<AnyPolicy> {
    Filtered::new(
        config.build(env.arm_space()).expect("valid config"),
        FeasibilityFilter::default(),
    )
}

/// Plays `rounds` for every device; returns the arms chosen (as bit patterns, so equality is
/// exact) and `None` where no arm was feasible.
fn drive(
    policy: &mut Filtered<AnyPolicy>,
    env: &mut SyntheticEnvironment,
    rounds: std::ops::Range<u64>,
    policy_rng: &mut ChaCha8Rng,
    env_rng: &mut ChaCha8Rng,
) -> Vec<Option<(u64, u32)>> {
    let mut out = Vec::new();
    for round in rounds {
        env.prepare_round(round, 300);
        for device in 0..env.devices() {
            let ctx = env.context(device, round);
            match policy.choose(&ctx, policy_rng) {
                Ok(arm) => {
                    let pull = env.pull(device, &arm, env_rng);
                    policy
                        .record(arm, pull.peak_mem_bytes, pull.duration_ms, &ctx)
                        .expect("valid record");
                    policy
                        .observe(&ctx, arm, pull.reward)
                        .expect("valid reward");
                    out.push(Some((arm.prune_ratio.to_bits(), arm.rank)));
                }
                Err(bandit::BanditError::NoFeasibleArm { .. }) => out.push(None),
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }
    out
}

#[test]
fn same_seed_gives_the_same_choices() {
    for config in PolicyConfig::all_defaults() {
        let runs: Vec<_> = [11u64, 11, 12]
            .into_iter()
            .map(|seed| {
                let mut env = environment();
                let mut policy = fresh(&config, &env);
                let (mut prng, mut erng) = run_rngs(seed);
                drive(&mut policy, &mut env, 0..200, &mut prng, &mut erng)
            })
            .collect();
        assert_eq!(
            runs[0],
            runs[1],
            "{}: same seed, different choices",
            config.kind()
        );
        if config.kind() != "fixed" {
            assert_ne!(runs[0], runs[2], "{}: seed has no effect", config.kind());
        }
    }
}

#[test]
fn state_round_trips_through_json_and_continues_identically() {
    for config in PolicyConfig::all_defaults() {
        let kind = config.kind();
        let mut env = environment();
        let mut policy = fresh(&config, &env);
        let (mut prng, mut erng) = run_rngs(5);
        drive(&mut policy, &mut env, 0..150, &mut prng, &mut erng);

        // Checkpoint the policy and both generators, as the aggregator would.
        let json = serde_json::to_string(&(&policy, &prng, &erng)).expect("serializes");
        let (mut restored, mut prng2, mut erng2): (Filtered<AnyPolicy>, ChaCha8Rng, ChaCha8Rng) =
            serde_json::from_str(&json).expect("deserializes");
        assert_eq!(restored, policy, "{kind}: restored state differs");
        assert_eq!(
            serde_json::to_string(&(&restored, &prng2, &erng2)).expect("serializes"),
            json,
            "{kind}: re-serialized state differs"
        );
        let mut env2 = env.clone();

        let original = drive(&mut policy, &mut env, 150..300, &mut prng, &mut erng);
        let resumed = drive(&mut restored, &mut env2, 150..300, &mut prng2, &mut erng2);
        assert_eq!(original, resumed, "{kind}: resumed run chose differently");
        assert_eq!(restored, policy, "{kind}: states diverged after resuming");
    }
}

#[test]
fn the_memory_limited_device_learns_its_limit_in_the_shared_run() {
    let mut env = environment();
    let mut policy = fresh(&PolicyConfig::UniformRandom(UniformRandomConfig {}), &env);
    let (mut prng, mut erng) = run_rngs(5);
    drive(&mut policy, &mut env, 0..150, &mut prng, &mut erng);
    // Device 0 is the phone; the others never fail.
    assert!(!policy.filter.exclusions(0).is_empty());
    assert!(policy.filter.exclusions(1).is_empty());
    assert!(policy.filter.exclusions(2).is_empty());
}

/// Each `(TOML, expected)` pair: a `kind` plus any subset of fields, the rest defaulted.
#[test]
fn policy_configs_load_from_toml() {
    let cases: Vec<(&str, PolicyConfig)> = vec![
        (
            r#"kind = "s-ucb""#,
            PolicyConfig::SUcb(SUcbConfig::default()),
        ),
        (
            "kind = \"s-ucb\"\nnu = 0.3\nrho = 0.7\nmax_depth = 10",
            PolicyConfig::SUcb(SUcbConfig {
                nu: 0.3,
                rho: 0.7,
                max_depth: 10,
                ..SUcbConfig::default()
            }),
        ),
        (
            "kind = \"ucb1\"\nn_ratios = 11",
            PolicyConfig::Ucb1(Ucb1Config {
                n_ratios: 11,
                ..Ucb1Config::default()
            }),
        ),
        (
            "kind = \"discounted-ucb\"\ngamma = 0.95",
            PolicyConfig::DiscountedUcb(DiscountedUcbConfig {
                gamma: 0.95,
                ..DiscountedUcbConfig::default()
            }),
        ),
        (
            "kind = \"sliding-window-ucb\"\nwindow = 64",
            PolicyConfig::SlidingWindowUcb(SlidingWindowUcbConfig {
                window: 64,
                ..SlidingWindowUcbConfig::default()
            }),
        ),
        (
            "kind = \"thompson\"\nnoise_std = 0.05",
            PolicyConfig::Thompson(ThompsonConfig {
                noise_std: 0.05,
                ..ThompsonConfig::default()
            }),
        ),
        (
            "kind = \"exp3\"\ngamma = 0.3",
            PolicyConfig::Exp3(Exp3Config {
                gamma: 0.3,
                ..Exp3Config::default()
            }),
        ),
        (
            "kind = \"epsilon-greedy\"\nepsilon = 0.2\ndecay = 0.999\nepsilon_min = 0.01",
            PolicyConfig::EpsilonGreedy(EpsilonGreedyConfig {
                epsilon: 0.2,
                decay: 0.999,
                epsilon_min: 0.01,
                ..EpsilonGreedyConfig::default()
            }),
        ),
        (
            "kind = \"fixed\"\nprune_ratio = 0.25\nrank = 8",
            PolicyConfig::Fixed(FixedConfig {
                prune_ratio: Some(0.25),
                rank: Some(8),
            }),
        ),
        (
            r#"kind = "uniform-random""#,
            PolicyConfig::UniformRandom(UniformRandomConfig {}),
        ),
    ];
    for (text, expected) in cases {
        let parsed: PolicyConfig = toml::from_str(text).expect(text);
        assert_eq!(parsed, expected, "{text}");
        let back: PolicyConfig =
            toml::from_str(&toml::to_string(&parsed).expect("renders")).expect("re-parses");
        assert_eq!(back, expected, "{text}");
    }

    let typo = toml::from_str::<PolicyConfig>("kind = \"s-ucb\"\nrhoo = 0.5").unwrap_err();
    assert!(typo.to_string().contains("unknown field `rhoo`"), "{typo}");
    let unknown = toml::from_str::<PolicyConfig>("kind = \"ucb2\"").unwrap_err();
    assert!(
        unknown.to_string().contains("unknown variant `ucb2`"),
        "{unknown}"
    );
}

#[test]
fn fixed_policy_defaults_to_the_middle_of_the_space() {
    let space = bandit::ArmSpace::new(0.0, 0.6, vec![4, 8, 16, 32, 64]).unwrap();
    let policy = PolicyConfig::Fixed(FixedConfig::default())
        .build(&space)
        .unwrap();
    let AnyPolicy::Fixed(fixed) = policy else {
        panic!("built the wrong policy")
    };
    assert_eq!(fixed.arm(), Arm::new(0.3, 16));
}
