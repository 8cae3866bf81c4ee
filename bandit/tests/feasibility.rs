//! The feasibility filter learns which arms a device cannot run, and filtered policies never play them again.

use bandit::arena::synthetic::MemoryLimit;
use bandit::{
    Arm, ArmSpace, BanditError, DeviceContext, FeasibilityConfig, FeasibilityFilter,
    FeasibleRegion, Filtered, InfeasibleReason, Policy, PolicyConfig,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const GB: u64 = 1_000_000_000;

fn ctx(device_id: u64, round: u64) -> DeviceContext {
    DeviceContext {
        device_id,
        round,
        ram_bytes: Some(3 * GB),
        deadline_ms: Some(60_000),
    }
}

#[test]
fn nothing_is_excluded_until_observed() {
    let filter = FeasibilityFilter::default();
    let tiny = DeviceContext {
        ram_bytes: Some(1),
        ..ctx(1, 0)
    };
    assert!(filter.is_feasible(tiny.device_id, &Arm::new(0.0, 64)));
    assert!(filter.region(1).is_unrestricted());
}

#[test]
fn an_overrun_excludes_the_arm_and_every_costlier_arm() {
    let mut filter = FeasibilityFilter::default();
    // Within limits: no verdict.
    assert_eq!(
        filter.record(Arm::new(0.3, 16), 2 * GB, 50_000, &ctx(1, 0)),
        Ok(None)
    );
    assert!(filter.exclusions(1).is_empty());
    // Over RAM at (0.3, 16).
    assert_eq!(
        filter.record(Arm::new(0.3, 16), 4 * GB, 50_000, &ctx(1, 1)),
        Ok(Some(InfeasibleReason::Memory {
            peak_mem_bytes: 4 * GB,
            ram_bytes: 3 * GB
        }))
    );
    let table = [
        // (arm, still allowed?)
        (Arm::new(0.3, 16), false),
        (Arm::new(0.1, 16), false),
        (Arm::new(0.3, 64), false),
        (Arm::new(0.0, 32), false),
        (Arm::new(0.31, 16), true),
        (Arm::new(0.3, 8), true),
        (Arm::new(0.6, 64), true),
    ];
    for (arm, allowed) in table {
        assert_eq!(filter.is_feasible(1, &arm), allowed, "{arm}");
        assert_eq!(filter.region(1).contains(&arm), allowed, "{arm}");
    }
    // Other devices are unaffected.
    assert!(filter.is_feasible(2, &Arm::new(0.0, 64)));
    filter.forget(1);
    assert!(filter.is_feasible(1, &Arm::new(0.3, 16)));
}

#[test]
fn deadline_overruns_count_and_the_factor_gives_slack() {
    let mut strict = FeasibilityFilter::default();
    let late = strict
        .record(Arm::new(0.2, 32), GB, 61_000, &ctx(1, 0))
        .unwrap();
    assert_eq!(
        late,
        Some(InfeasibleReason::Deadline {
            duration_ms: 61_000,
            deadline_ms: 60_000
        })
    );
    let mut lenient = FeasibilityFilter::new(FeasibilityConfig {
        deadline_factor: 1.1,
        ..FeasibilityConfig::default()
    })
    .unwrap();
    assert_eq!(
        lenient.record(Arm::new(0.2, 32), GB, 61_000, &ctx(1, 0)),
        Ok(None)
    );
    // Limits the context does not carry are not judged.
    let unknown = DeviceContext::new(1, 0);
    assert_eq!(
        strict.record(Arm::new(0.0, 64), 100 * GB, 10_000_000, &unknown),
        Ok(None)
    );
    // A reported out-of-memory failure excludes without a figure.
    strict
        .record_out_of_memory(Arm::new(0.5, 4), &ctx(3, 0))
        .unwrap();
    assert!(!strict.is_feasible(3, &Arm::new(0.4, 8)));
}

#[test]
fn exclusions_stay_a_minimal_staircase() {
    let mut filter = FeasibilityFilter::default();
    let over =
        |f: &mut FeasibilityFilter, p, r| f.record(Arm::new(p, r), 9 * GB, 0, &ctx(1, 0)).unwrap();
    over(&mut filter, 0.1, 32);
    over(&mut filter, 0.2, 64);
    over(&mut filter, 0.0, 64); // already covered by (0.1, 32): no new corner
    over(&mut filter, 0.3, 16);
    over(&mut filter, 0.4, 16); // covers (0.3, 16), (0.1, 32) and (0.2, 64)
    let corners: Vec<(f64, u32)> = filter
        .exclusions(1)
        .iter()
        .map(|e| (e.corner.prune_ratio, e.corner.rank))
        .collect();
    assert_eq!(corners, vec![(0.4, 16)]);
    over(&mut filter, 0.5, 32);
    let corners: Vec<(f64, u32)> = filter
        .exclusions(1)
        .iter()
        .map(|e| (e.corner.prune_ratio, e.corner.rank))
        .collect();
    assert_eq!(corners, vec![(0.4, 16), (0.5, 32)]);
    let region = filter.region(1);
    assert_eq!(region.ratio_floor(8), None);
    assert_eq!(region.ratio_floor(16), Some(0.4));
    assert_eq!(region.ratio_floor(64), Some(0.5));
}

#[test]
fn region_sampling_stays_inside_the_region() {
    let region = FeasibleRegion::excluding([Arm::new(0.25, 8)]);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..10_000 {
        let p = region.sample_ratio(16, 0.2, 0.3, &mut rng);
        assert!(p > 0.25 && p <= 0.3, "{p}");
        let q = region.sample_ratio(4, 0.2, 0.3, &mut rng);
        assert!((0.2..0.3).contains(&q), "{q}");
    }
    // A floor just below the top still leaves a point.
    let tight = FeasibleRegion::excluding([Arm::new(0.3 - 1e-15, 8)]);
    assert!(tight.sample_ratio(8, 0.2, 0.3, &mut rng) > 0.3 - 1e-15);
}

/// A 3 GB device with a 4 GB dense model: low ratios at high ranks do not fit. Every policy,
/// filtered, plays 300 rounds; once an arm failed, no later arm falls in its excluded
/// quadrant, so no infeasible arm is ever chosen twice.
#[test]
fn filtered_policies_never_replay_an_infeasible_region() {
    let memory = MemoryLimit {
        ram_bytes: 3 * GB,
        dense_bytes: 4 * GB,
        bytes_per_rank: 16_000_000,
    };
    let space = ArmSpace::default();
    for config in PolicyConfig::all_defaults() {
        let kind = config.kind();
        let mut policy = Filtered::new(config.build(&space).unwrap(), FeasibilityFilter::default());
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut failed: Vec<Arm> = Vec::new();
        for round in 0..300 {
            let c = ctx(7, round);
            let arm = match policy.choose(&c, &mut rng) {
                Ok(arm) => arm,
                // The fixed arm (0.3, 16) does not fit: after one failure nothing is left.
                Err(BanditError::NoFeasibleArm { device_id: 7 }) if kind == "fixed" => continue,
                Err(e) => panic!("{kind}: {e}"),
            };
            for f in &failed {
                assert!(
                    !(arm.rank >= f.rank && arm.prune_ratio <= f.prune_ratio),
                    "{kind}: round {round} chose {arm}, inside the region excluded by {f}"
                );
            }
            let peak = memory.peak_bytes(&arm);
            let fits = peak <= memory.ram_bytes;
            let verdict = policy.record(arm, peak, 1_000, &c).unwrap();
            assert_eq!(verdict.is_none(), fits, "{kind}: {arm}");
            if !fits {
                failed.push(arm);
            }
            let reward = if fits { arm.prune_ratio } else { 0.0 };
            policy.observe(&c, arm, reward).unwrap();
        }
        assert!(!failed.is_empty(), "{kind} never hit the memory limit");
        eprintln!("{kind}: {} failures in 300 rounds", failed.len());
    }
}

#[test]
fn no_feasible_arm_left_is_an_error_and_changes_nothing() {
    let space = ArmSpace::default();
    for config in PolicyConfig::all_defaults() {
        let mut policy = Filtered::new(config.build(&space).unwrap(), FeasibilityFilter::default());
        // The cheapest arm (highest ratio, lowest rank) failed: everything is excluded.
        policy
            .record(Arm::new(space.ratio_max, 4), 9 * GB, 0, &ctx(5, 0))
            .unwrap();
        let before = serde_json::to_string(&policy).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(
            policy.choose(&ctx(5, 1), &mut rng),
            Err(BanditError::NoFeasibleArm { device_id: 5 }),
            "{}",
            config.kind()
        );
        assert_eq!(serde_json::to_string(&policy).unwrap(), before);
        // Another device is unaffected.
        assert!(
            policy.choose(&ctx(6, 1), &mut rng).is_ok(),
            "{}",
            config.kind()
        );
    }
}
