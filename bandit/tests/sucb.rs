//! S-UCB's tree: bounded size, compact checkpoints that are validated on load, degenerate spaces.

use bandit::policy::{SUcb, SUcbConfig};
use bandit::{AnyPolicy, Arm, ArmSpace, DeviceContext, Policy, PolicyConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Plays `rounds` rounds on a smooth bump at (0.4, 16); returns the arms.
fn play(policy: &mut impl Policy, rounds: u64, rng: &mut ChaCha8Rng) -> Vec<Arm> {
    (0..rounds)
        .map(|round| {
            let ctx = DeviceContext::new(1, round);
            let arm = policy.choose(&ctx, rng).unwrap();
            let d =
                (arm.prune_ratio - 0.4).powi(2) + ((arm.rank as f64).log2() - 4.0).powi(2) / 10.0;
            policy.observe(&ctx, arm, (-d * 8.0).exp()).unwrap();
            arm
        })
        .collect()
}

#[test]
fn the_tree_grows_one_node_per_play_up_to_max_nodes() {
    let space = ArmSpace::default();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut free = SUcb::new(space.clone(), SUcbConfig::default()).unwrap();
    play(&mut free, 300, &mut rng);
    assert_eq!(free.tree_size(), 301, "the root plus one node per play");
    assert_eq!(free.observations(), 300);

    let capped_config = SUcbConfig {
        max_nodes: 64,
        ..SUcbConfig::default()
    };
    let mut capped = SUcb::new(space, capped_config).unwrap();
    let arms = play(&mut capped, 2000, &mut rng);
    assert_eq!(capped.tree_size(), 64);
    assert_eq!(capped.observations(), 2000);
    // It still learns: the last 200 arms are mostly near the bump.
    let near = arms[1800..]
        .iter()
        .filter(|a| a.rank == 16 && (a.prune_ratio - 0.4).abs() < 0.15)
        .count();
    assert!(near > 100, "{near}");
    // And round-trips.
    let json = serde_json::to_string(&capped).unwrap();
    let back: SUcb = serde_json::from_str(&json).unwrap();
    assert_eq!(back, capped);
}

#[test]
fn checkpoints_store_counts_sums_and_children_only() {
    let space = ArmSpace::new(0.0, 0.5, vec![8, 16]).unwrap();
    let mut policy = SUcb::new(space, SUcbConfig::default()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ctx = DeviceContext::new(1, 0);
    for reward in [0.5, 0.25] {
        let arm = policy.choose(&ctx, &mut rng).unwrap();
        policy.observe(&ctx, arm, reward).unwrap();
    }
    let json = serde_json::to_value(&policy).unwrap();
    // Root (2 plays, reward 0.75) with both rank halves as children, each played once.
    assert_eq!(
        json["nodes"],
        serde_json::json!([[2, 0.75, 2, 1], [1, 0.5, 0, 0], [1, 0.25, 0, 0]])
    );
}

#[test]
fn malformed_checkpoints_are_errors() {
    let space = ArmSpace::new(0.0, 0.5, vec![8, 16]).unwrap();
    let policy = SUcb::new(space, SUcbConfig::default()).unwrap();
    let mut json = serde_json::to_value(&policy).unwrap();
    for (nodes, message) in [
        (serde_json::json!([]), "no root"),
        (
            serde_json::json!([[1, 0.5, 1, 1], [1, 0.5, 0, 0]]),
            "impossible child 1",
        ),
        (
            serde_json::json!([[1, 0.5, 0, 0], [1, 0.5, 0, 0]]),
            "node 1 is not reachable",
        ),
        (serde_json::json!([[1, 0.5, 5, 0]]), "impossible child 5"),
        (
            serde_json::json!([[1, 0.5, 2, 1], [0, 0.0, 0, 0], [1, 0.5, 0, 0]]),
            "",
        ),
    ] {
        json["nodes"] = nodes.clone();
        let result = serde_json::from_value::<SUcb>(json.clone());
        match result {
            Ok(_) => assert!(message.is_empty(), "{nodes} loaded"),
            Err(e) => assert!(
                !message.is_empty() && e.to_string().contains(message),
                "{nodes}: {e}"
            ),
        }
    }
}

#[test]
fn a_single_arm_space_works_for_every_policy() {
    let space = ArmSpace::new(0.25, 0.25, vec![8]).unwrap();
    assert_eq!(space.grid(6).unwrap(), vec![Arm::new(0.25, 8)]);
    for config in PolicyConfig::all_defaults() {
        let config = match config {
            PolicyConfig::Fixed(_) => PolicyConfig::Fixed(Default::default()),
            c => c,
        };
        let mut policy: AnyPolicy = config.build(&space).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for round in 0..20 {
            let ctx = DeviceContext::new(0, round);
            let arm = policy.choose(&ctx, &mut rng).unwrap();
            assert_eq!(arm, Arm::new(0.25, 8), "{}", config.kind());
            policy.observe(&ctx, arm, 0.5).unwrap();
        }
    }
}
