//! Scenario tests of the round coordinator on virtual time (the harness is
//! `common/scenario.rs`): the arms each strategy plays (FedSpine's bandits, fixed arms, the
//! memory filter's ceiling), device classes, restoring from a checkpoint (old ones migrated),
//! and the TOML configuration. Rounds closing and refusals are `coordinator.rs`.

mod common;

use aggregator::coordinator::{Coordinator, CoordinatorConfig};
use aggregator::strategy::{FixedPruneConfig, StrategyConfig};
use expect_test::expect;
use protocol::{
    Capabilities, DeviceId, Join, KeptIndices, Message, RoundId, Update, PROTOCOL_VERSION,
};

use common::scenario::{check, config, run, Harness, Step::*};
use common::{dims, join_msg};

#[test]
fn fedspine_bandits_choose_pruned_arms_and_devices_report_pruned_kept_maps() {
    let mut c = config();
    c.strategy = StrategyConfig::Fedspine;
    c.arms.ratio_max = 0.5;
    let prune = |u: &mut Update| {
        // Keep channels 0..8 of 12 in block 1: slice the answer down.
        let coord_dims = dims();
        let mut kept = KeptIndices::full(&coord_dims);
        kept.blocks[1].mlp_channels = (0..8).collect();
        for layer in &mut u.adapter.layers {
            if layer.block != 1 {
                continue;
            }
            let map = protocol::layer_index_map(&coord_dims, layer.proj, &kept.blocks[1]);
            let (r, inp) = (layer.a.rows as usize, layer.a.cols as usize);
            let (a, b) = (layer.a.data.to_f32_vec(), layer.b.data.to_f32_vec());
            if map.cols.len() < inp {
                let cut: Vec<f32> = (0..r)
                    .flat_map(|i| map.cols.iter().map(move |&c| (i, c)))
                    .map(|(i, c)| a[i * inp + c as usize])
                    .collect();
                layer.a = protocol::Tensor2::f32(r as u32, map.cols.len() as u32, cut);
            }
            if map.rows.len() < layer.b.rows as usize {
                let cut: Vec<f32> = map
                    .rows
                    .iter()
                    .flat_map(|&o| b[o as usize * r..(o as usize + 1) * r].to_vec())
                    .collect();
                layer.b = protocol::Tensor2::f32(map.rows.len() as u32, r as u32, cut);
            }
        }
        u.kept = kept;
        u.stats.sparsity = 0.1;
    };
    let h = check(
        c,
        vec![
            Join(1),
            Join(2),
            Join(3),
            AnswerWith(1, prune),
            Answer(2),
            Answer(3),
            Wait(10),
        ],
        expect![[r#"
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.348 rank 2 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.442 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.452 rank 2 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @0     d2 <- ack round-1
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
            @10    d1 <- round_config round-2 ratio 0.270 rank 4 ffn kept 20 deadline 1000ms
            @10    d2 <- round_config round-2 ratio 0.272 rank 2 ffn kept 24 deadline 1000ms
            @10    d3 <- round_config round-2 ratio 0.036 rank 8 ffn kept 24 deadline 1000ms
        "#]],
    );
    // Recorded from its kept maps, not from the 0.1 it reported.
    let record = h.coord.device(DeviceId(1)).unwrap();
    let kept = record.kept.as_ref().expect("its kept maps are recorded");
    let want = kept.non_embedding_sparsity(&dims()) as f32 as f64;
    assert!(want > 0.0 && want != 0.1f32 as f64, "{want}");
    assert_eq!(record.sparsity, want);
}

#[test]
fn a_restored_coordinator_continues_exactly_like_the_original() {
    let mut c = config();
    c.strategy = StrategyConfig::Fedspine;
    let steps = || vec![Join(1), Join(2), Join(3), Answer(1), Answer(2), Answer(3)];
    let mut original = run(c.clone(), steps());
    let state = original.coord.state();
    assert_eq!(state.round, RoundId(1));
    original.step(Wait(10));
    // Through the checkpoint file format and back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.ckpt");
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA, &state)
        .unwrap();
    let back: aggregator::CoordinatorState =
        aggregator::checkpoint::read(&path, aggregator::coordinator::STATE_SCHEMA).unwrap();
    assert_eq!(back, state);
    assert_eq!(back.bandit_digest(), state.bandit_digest());

    // The original had already started round 2 when its state was taken; the restored one
    // starts round 2 when its devices join again. Both must choose the same arms and seeds.
    let mut restored = Harness::from(Coordinator::restore(c.clone(), back).unwrap());
    for d in 1..=3 {
        restored.step(Join(d));
    }
    for d in 1..=3 {
        let a = &original.configs[&(d, 2)];
        let b = &restored.configs[&(d, 2)];
        assert_eq!((a.arm, a.seed), (b.arm, b.seed), "device {d}");
        assert_eq!(a.global, b.global, "device {d}");
    }
    for d in 1..=3 {
        original.step(Answer(d));
        restored.step(Answer(d));
    }
    let (a, b) = (original.coord.state(), restored.coord.state());
    // Counters differ (the restored run saw three more connections); the learned state and
    // the generator must not.
    assert_eq!(
        (a.round, &a.global, &a.devices, &a.rng),
        (b.round, &b.global, &b.devices, &b.rng)
    );
    // A finished coordinator's state moved out is the state it would copy.
    assert_eq!(restored.coord.into_state(), b);

    // A state from another strategy or rank is refused with a clear error.
    let mut other = c.clone();
    other.strategy = StrategyConfig::Fedlora(aggregator::strategy::FedLoraConfig {
        rank: 4,
        ..Default::default()
    });
    let err = Coordinator::restore(other, state.clone()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "saved state does not fit this run: it was written by strategy fedspine, the config asks for fedlora"
    );
    let mut other = c;
    other.max_rank = 16;
    let err = Coordinator::restore(other, state).unwrap_err();
    assert_eq!(
        err.to_string(),
        "saved state does not fit this run: its global adapter has rank 8, the config's max_rank is 16"
    );
}

#[test]
fn toml_configs_parse_with_defaults_and_refuse_typos() {
    let c = CoordinatorConfig::from_toml_str(
        r#"
        rounds = 2
        devices_per_round = 3
        [strategy]
        kind = "fixed-prune"
        prune_ratio = 0.2
        rank = 8
        [aggregation]
        method = "hetlora"
        [arms]
        ratio_min = 0.0
        ratio_max = 0.3
        ranks = [4, 8]
        [policy]
        kind = "ucb1"
        "#,
    )
    .unwrap();
    assert_eq!(c.rounds, 2);
    assert_eq!(c.strategy.name(), "fixed-prune");
    assert_eq!(c.local_steps, CoordinatorConfig::default().local_steps);
    let err = CoordinatorConfig::from_toml_str("roundz = 2").unwrap_err();
    assert!(err.to_string().contains("unknown field `roundz`"), "{err}");
    let err = CoordinatorConfig::from_toml_str("max_rank = 4").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid coordinator config: rank 8 exceeds max_rank 4"
    );
    // Devices never beat more often than once a second, so a faster interval is refused
    // rather than silently not honoured; 0 (no heartbeats) and a second are fine.
    let err = CoordinatorConfig::from_toml_str("heartbeat_interval_ms = 999").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid coordinator config: heartbeat_interval_ms 999 is below 1000 (devices never beat \
         more often; 0 for no heartbeats)"
    );
    for ok in [0, 1_000] {
        let c = CoordinatorConfig::from_toml_str(&format!("heartbeat_interval_ms = {ok}"));
        assert_eq!(c.unwrap().heartbeat_interval_ms, ok);
    }
}

fn join_with_ram(id: u64, ram_bytes: u64) -> Message {
    Message::Join(Join {
        protocol_version: PROTOCOL_VERSION,
        device_id: DeviceId(id),
        capabilities: Capabilities {
            ram_bytes,
            backend: "flex".into(),
            bench_score: None,
            device_class: None,
        },
    })
}

/// The arms each strategy plays for devices of 1, 3 and 6 GiB, and its aggregation method.
#[test]
fn each_strategy_plays_its_own_arms() {
    let gib = 1u64 << 30;
    let run_strategy = |strategy: StrategyConfig| {
        let mut c = config();
        c.strategy = strategy;
        c.arms.ratio_max = 0.4;
        let mut h = Harness::new(c);
        for (d, ram) in [(1, gib), (2, 3 * gib), (3, 6 * gib)] {
            h.step(Connect(d));
            h.deliver(d, join_with_ram(d, ram), 64);
        }
        for d in 1..=3 {
            h.step(Answer(d));
        }
        let arms: Vec<String> = (1..=3)
            .map(|d| {
                let a = h.configs[&(d, 1)].arm;
                let space = h
                    .coord
                    .device(DeviceId(d))
                    .unwrap()
                    .bandit
                    .policy
                    .arm_space();
                format!(
                    "d{d} ({:.2}, {}) of [{}, {}] x {:?}",
                    a.prune_ratio, a.rank, space.ratio_min, space.ratio_max, space.ranks
                )
            })
            .collect();
        format!(
            "{}: {} -> {}",
            h.coord.strategy_name(),
            arms.join(", "),
            h.summaries[0].aggregation
        )
    };
    let lines: Vec<String> = [
        StrategyConfig::Fedspine,
        StrategyConfig::Hetlora(Default::default()),
        StrategyConfig::Fedlora(aggregator::strategy::FedLoraConfig {
            rank: 8,
            ..Default::default()
        }),
        StrategyConfig::FixedPrune(FixedPruneConfig {
            prune_ratio: 0.3,
            rank: 2,
        }),
        StrategyConfig::RatioBandit(aggregator::strategy::RatioBanditConfig { rank: 4 }),
    ]
    .into_iter()
    .map(run_strategy)
    .collect();
    expect![[r#"
        fedspine: d1 (0.28, 2) of [0, 0.4] x [2, 4, 8], d2 (0.35, 4) of [0, 0.4] x [2, 4, 8], d3 (0.36, 2) of [0, 0.4] x [2, 4, 8] -> exact
        hetlora: d1 (0.00, 2) of [0, 0] x [2, 4], d2 (0.00, 4) of [0, 0] x [2, 4, 8], d3 (0.00, 2) of [0, 0] x [2, 4, 8] -> exact
        fedlora: d1 (0.00, 8) of [0, 0] x [8], d2 (0.00, 8) of [0, 0] x [8], d3 (0.00, 8) of [0, 0] x [8] -> exact
        fixed-prune: d1 (0.30, 2) of [0.3, 0.3] x [2], d2 (0.30, 2) of [0.3, 0.3] x [2], d3 (0.30, 2) of [0.3, 0.3] x [2] -> exact
        ratio-bandit: d1 (0.14, 4) of [0, 0.4] x [4], d2 (0.38, 4) of [0, 0.4] x [4], d3 (0.18, 4) of [0, 0.4] x [4] -> exact"#]]
    .assert_eq(&lines.join("\n"));
}

fn join_as(id: u64, class: Option<&str>) -> Message {
    let Message::Join(mut join) = join_msg(id) else {
        unreachable!("join_msg makes a Join")
    };
    join.capabilities.device_class = class.map(str::to_string);
    Message::Join(join)
}

#[test]
fn device_classes_are_kept_per_device_and_a_bad_one_is_refused() {
    let h = check(
        config(),
        vec![
            Connect(4),
            Raw(4, join_as(4, Some("Jetson NX")), 64),
            Connect(1),
            Raw(1, join_as(1, Some("jetson-nx")), 64),
            Connect(2),
            Raw(2, join_as(2, Some("rpi5")), 64),
            Join(3),
            Answer(1),
            Answer(2),
            Answer(3),
        ],
        expect![[r#"
            @0     d4 <- reject device class "Jetson NX" holds 'J': only a-z, 0-9, '.', '_' and '-' are allowed
            @0     d4 disconnected: device class "Jetson NX" holds 'J': only a-z, 0-9, '.', '_' and '-' are allowed
            @0     d1 <- welcome
            @0     d2 <- welcome
            @0     d3 <- welcome
            @0     d1 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d2 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d3 <- round_config round-1 ratio 0.250 rank 4 ffn kept 24 deadline 1000ms
            @0     d1 <- ack round-1
            @0     d2 <- ack round-1
            @0     d3 <- ack round-1
            @0     checkpoint
            @0     closed round-1 by target_reached: selected [1, 2, 3] ok [1, 2, 3] missed [] failed [] quorum 2 met, aggregated
        "#]],
    );
    let class = |d: u64| {
        h.coord
            .device(DeviceId(d))
            .map(|r| r.capabilities.class().to_string())
    };
    assert_eq!(class(1).as_deref(), Some("jetson-nx"));
    assert_eq!(class(2).as_deref(), Some("rpi5"));
    assert_eq!(class(3).as_deref(), Some("unknown"));
    assert_eq!(class(4), None, "a refused join registers nothing");
    assert_eq!(h.coord.counters().rejects_of("bad_device_class"), 1);
    let assigned: Vec<(u64, &str, u32)> = h.summaries[0]
        .assigned
        .iter()
        .map(|a| (a.device.0, a.device_class.as_str(), a.arm.rank))
        .collect();
    assert_eq!(
        assigned,
        [(1, "jetson-nx", 4), (2, "rpi5", 4), (3, "unknown", 4)]
    );

    // The class is part of the checkpointed state, and a schema-1 checkpoint (before classes)
    // still resumes, its devices of class unknown.
    let state = h.coord.state();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.ckpt");
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA, &state)
        .unwrap();
    let back = aggregator::server::read_state(&path).unwrap().unwrap();
    assert_eq!(back, state);
    let old = aggregator::coordinator::CoordinatorStateV1 {
        dims: state.dims,
        strategy: state.strategy.clone(),
        round: state.round,
        global: state.global.clone(),
        devices: state
            .devices
            .iter()
            .map(|d| aggregator::coordinator::DeviceRecordV1 {
                id: d.id,
                capabilities: aggregator::coordinator::CapabilitiesV1 {
                    ram_bytes: d.capabilities.ram_bytes,
                    backend: d.capabilities.backend.clone(),
                    bench_score: d.capabilities.bench_score,
                },
                bandit: d.bandit.clone(),
                kept: d.kept.clone(),
                sparsity: d.sparsity,
                rounds_selected: d.rounds_selected,
                rounds_completed: d.rounds_completed,
                rounds_failed: d.rounds_failed,
                rounds_missed: d.rounds_missed,
            })
            .collect(),
        rng: state.rng.clone(),
        counters: state.counters.clone().into(),
    };
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA_V1, &old)
        .unwrap();
    let migrated = aggregator::server::read_state(&path).unwrap().unwrap();
    assert!(migrated
        .devices
        .iter()
        .all(|d| d.capabilities.class() == "unknown"));
    let mut expected = state.clone();
    for d in &mut expected.devices {
        d.capabilities.device_class = None;
    }
    assert_eq!(migrated, expected);
    assert!(Coordinator::restore(config(), migrated).is_ok());
    // A schema-2 checkpoint (before the screening counter) resumes with nothing screened out.
    let mut counted = state.counters.clone();
    counted.updates_screened_out = 3;
    let v2 = aggregator::coordinator::CoordinatorStateV2 {
        dims: state.dims,
        strategy: state.strategy.clone(),
        round: state.round,
        global: state.global.clone(),
        devices: state.devices.clone(),
        rng: state.rng.clone(),
        counters: counted.into(),
    };
    aggregator::checkpoint::write_atomic(&path, aggregator::coordinator::STATE_SCHEMA_V2, &v2)
        .unwrap();
    let migrated = aggregator::server::read_state(&path).unwrap().unwrap();
    assert_eq!(migrated, state);
    assert!(Coordinator::restore(config(), migrated).is_ok());
    // Another schema is still refused, naming the file.
    aggregator::checkpoint::write_atomic(&path, 99, &state).unwrap();
    let err = aggregator::server::read_state(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("state.ckpt") && err.contains("99"), "{err}");
}
