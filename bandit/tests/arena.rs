//! The arena's pieces: trace parsing and replay, device classes, config files, and the table, CSV and SVG outputs.

use bandit::arena::report::{regret_table, summary_csv};
use bandit::arena::svg::regret_svg;
use bandit::arena::{
    parse_trace_jsonl, run_environment, ArenaConfig, Environment, EnvironmentConfig, NamedPolicy,
    PolicyScope, RunSettings, SyntheticConfig, SyntheticEnvironment, TraceConfig, TraceEnvironment,
};
use bandit::{Arm, BanditError, PolicyConfig};
use expect_test::expect;

/// `tests/data/synthetic-trace.jsonl`: a small trace in the recorded-run format, generated
/// for these tests (two devices, 40 rounds, five arms; device 11 does best at (0.2, 8),
/// device 12 at (0.45, 32)).
const TRACE: &str = include_str!("data/synthetic-trace.jsonl");

#[test]
fn traces_parse_and_bad_lines_are_named() {
    let records = parse_trace_jsonl(TRACE).unwrap();
    assert_eq!(records.len(), 164);
    let bad = [
        ("{\"device_id\": 1}\n", "reward trace line 1: missing field `round` at line 1 column 16"),
        (
            "\n{\"device_id\": 1, \"round\": 0, \"prune_ratio\": 0.2, \"rank\": 8, \"reward\": 1.5}",
            "reward trace line 2: reward 1.5 is not in [0, 1]",
        ),
        (
            "{\"device_id\": 1, \"round\": 0, \"prune_ratio\": 0.2, \"rank\": 0, \"reward\": 0.5}",
            "reward trace line 1: arm (ratio 0.2, rank 0) is not valid",
        ),
        ("\n\n", "reward trace line 0: the trace has no records"),
    ];
    for (text, message) in bad {
        assert_eq!(parse_trace_jsonl(text).unwrap_err().to_string(), message);
    }
}

#[test]
fn trace_replay_measures_regret_against_the_recorded_arms() {
    let records = parse_trace_jsonl(TRACE).unwrap();
    let mut env = TraceEnvironment::new(TraceConfig::default(), records).unwrap();
    assert_eq!(env.device_ids(), &[11, 12]);
    assert_eq!(env.arm_space().ranks, vec![8, 32]);
    assert_eq!(
        (env.arm_space().ratio_min, env.arm_space().ratio_max),
        (0.0, 0.45)
    );
    // The best recorded arm answers for itself; an unrecorded arm answers as its nearest.
    env.prepare_round(20, 40);
    let best = env.expected(0, &Arm::new(0.2, 8));
    assert!(
        (env.optimum(0) - best).abs() < 1e-12,
        "{} vs {best}",
        env.optimum(0)
    );
    assert_eq!(env.expected(0, &Arm::new(0.21, 8)), best);

    let settings = RunSettings {
        seed: 3,
        rounds: 400,
        ..RunSettings::default()
    };
    let report = run_environment(&mut env, &NamedPolicy::all_defaults(), &settings).unwrap();
    let random = report.run("uniform-random").unwrap().final_regret;
    let ucb1 = report.run("ucb1").unwrap().final_regret;
    let thompson = report.run("thompson").unwrap().final_regret;
    eprintln!("trace: random {random:.1}, ucb1 {ucb1:.1}, thompson {thompson:.1}");
    assert!(ucb1 < 0.5 * random && thompson < 0.5 * random);
    assert!(report.runs.iter().all(|r| r.final_regret >= -1e-9));
}

#[test]
fn devices_split_across_classes_by_share() {
    let config = SyntheticConfig::preset("device-classes").unwrap();
    let env = SyntheticEnvironment::new(config, 10).unwrap();
    let names: Vec<&str> = (0..10).map(|d| env.class_of(d).name.as_str()).collect();
    assert_eq!(
        names,
        [
            "phone", "phone", "phone", "board", "board", "board", "board", "jetson", "jetson",
            "jetson"
        ]
    );
    assert_eq!(env.context(0, 4).ram_bytes, Some(3_000_000_000));
    assert_eq!(env.context(5, 4).ram_bytes, None);
}

#[test]
fn synthetic_optima_are_where_the_bumps_are() {
    // Stationary: the surface peaks at (0.42, 32) at 0.1 + 0.7.
    let config = SyntheticConfig::preset("stationary").unwrap();
    let mut env = SyntheticEnvironment::new(config, 1).unwrap();
    env.prepare_round(0, 1);
    assert!((env.optimum(0) - 0.8).abs() < 1e-9, "{}", env.optimum(0));
    assert!((env.expected(0, &Arm::new(0.42, 32)) - 0.8).abs() < 1e-12);
    // The phone class cannot run (0.3, 64): its expected reward is 0, and its optimum is the
    // best arm that fits.
    let config = SyntheticConfig::preset("device-classes").unwrap();
    let mut env = SyntheticEnvironment::new(config, 3).unwrap();
    env.prepare_round(0, 1);
    assert_eq!(env.expected(0, &Arm::new(0.3, 64)), 0.0);
    assert!((env.optimum(0) - 0.8).abs() < 1e-9, "phone's (0.5, 8) fits");
    // Drifting: the optimum stays 0.8 as it moves, and the old peak fades.
    let config = SyntheticConfig::preset("drifting").unwrap();
    let mut env = SyntheticEnvironment::new(config, 1).unwrap();
    env.prepare_round(1000, 2000);
    assert!((env.optimum(0) - 0.8).abs() < 1e-6, "{}", env.optimum(0));
    assert!(env.expected(0, &Arm::new(0.55, 64)) > 0.79);
    assert!(env.expected(0, &Arm::new(0.05, 4)) < 0.11);
}

#[test]
fn arena_configs_load_from_toml() {
    let text = r#"
        seed = 3
        rounds = 50
        devices = 2
        scope = "shared"

        [[policies]]
        name = "greedy-5"
        kind = "epsilon-greedy"
        epsilon = 0.05

        [[environments]]
        kind = "synthetic"
        name = "narrow"
        noise = { kind = "pareto", scale = 0.02, alpha = 1.5 }
        [[environments.classes]]
        name = "only"
        bumps = [{ ratio = 0.2, rank = 8, height = 0.8, width_ratio = 0.05, width_log2_rank = 0.5 }]

        [[environments]]
        kind = "trace"
        name = "recorded"
        path = "runs/trace.jsonl"
    "#;
    let config: ArenaConfig = toml::from_str(text).unwrap();
    assert_eq!(config.settings().seed, 3);
    assert_eq!(config.scope, PolicyScope::Shared);
    assert_eq!(config.policies[0].name, "greedy-5");
    assert!(
        matches!(config.policies[0].config, PolicyConfig::EpsilonGreedy(c) if c.epsilon == 0.05)
    );
    assert_eq!(config.environments.len(), 2);
    assert!(matches!(&config.environments[1], EnvironmentConfig::Trace(t) if t.round_window == 5));

    // The defaults render and parse back unchanged.
    let default = ArenaConfig::default();
    let back: ArenaConfig = toml::from_str(&toml::to_string(&default).unwrap()).unwrap();
    assert_eq!(back, default);

    // The example config shipped with the crate stays loadable.
    let example: ArenaConfig =
        toml::from_str(include_str!("../configs/arena-tuning.toml")).unwrap();
    assert_eq!(example.policies.len(), 7);
    assert_eq!(example.environments, ArenaConfig::default().environments);

    let typo = toml::from_str::<ArenaConfig>("rounds = 5\nround = 6").unwrap_err();
    assert!(typo.to_string().contains("unknown field `round`"), "{typo}");
}

#[test]
fn shared_scope_and_heavy_tails_run() {
    let config = SyntheticConfig {
        noise: bandit::arena::synthetic::Noise::Pareto {
            scale: 0.05,
            alpha: 1.5,
        },
        ..SyntheticConfig::default()
    };
    let mut env = SyntheticEnvironment::new(config, 4).unwrap();
    let settings = RunSettings {
        rounds: 300,
        scope: PolicyScope::Shared,
        ..RunSettings::default()
    };
    let report = run_environment(&mut env, &NamedPolicy::all_defaults(), &settings).unwrap();
    assert_eq!(report.runs.len(), PolicyConfig::all_defaults().len());
    assert!(report.runs.iter().all(|r| r.regret_curve.len() == 300));
}

#[test]
fn bad_environments_are_rejected() {
    let no_classes = SyntheticConfig {
        classes: vec![],
        ..SyntheticConfig::default()
    };
    assert_eq!(
        SyntheticEnvironment::new(no_classes, 2)
            .unwrap_err()
            .to_string(),
        "invalid parameter classes = 0: expected at least one device class"
    );
    assert!(matches!(
        SyntheticEnvironment::new(SyntheticConfig::default(), 0),
        Err(BanditError::InvalidParameter {
            name: "devices",
            ..
        })
    ));
}

#[test]
fn table_csv_and_svg_render() {
    let config = SyntheticConfig::preset("stationary").unwrap();
    let mut env = SyntheticEnvironment::new(config, 2).unwrap();
    let policies: Vec<NamedPolicy> = NamedPolicy::all_defaults()
        .into_iter()
        .filter(|p| ["ucb1", "fixed", "uniform-random"].contains(&p.name.as_str()))
        .collect();
    let settings = RunSettings {
        rounds: 100,
        ..RunSettings::default()
    };
    let reports = vec![run_environment(&mut env, &policies, &settings).unwrap()];
    expect![[r#"
        policy                stationary
        ucb1                 21.5 (0.43)
        fixed                34.1 (0.68)
        uniform-random       50.2 (1.00)
    "#]]
    .assert_eq(&regret_table(&reports));
    let csv = summary_csv(&reports);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "environment,policy,kind,rounds,devices,seed,final_regret_per_device,regret_vs_uniform_random,mean_reward,failures,no_feasible"
    );
    assert_eq!(lines.count(), 3);
    let svg = regret_svg(&reports[0]);
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 3);
    assert!(
        svg.contains(">uniform-random (50)<"),
        "legend shows final regret"
    );
}
