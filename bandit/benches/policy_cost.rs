//! Benchmark: cost of one choose + observe per policy, for 80 and 10,000 devices, printed as a Markdown table.
//!
//! Run with `cargo bench -p bandit --bench policy_cost`. Each device has its own
//! `Filtered<AnyPolicy>` (the coordinator's setup); rewards come from the `stationary` arena
//! preset. Only the choose and observe loops are timed (the environment's draws are not).
//! The per-call cost is reported for the first 50 rounds and for rounds 200-250, because
//! S-UCB's cost grows with its tree (one node per play).

use std::time::{Duration, Instant};

use bandit::arena::{run_rngs, Environment, SyntheticConfig, SyntheticEnvironment};
use bandit::{AnyPolicy, Arm, FeasibilityFilter, Filtered, Policy, PolicyConfig};

struct Timing {
    choose: Duration,
    observe: Duration,
    calls: u64,
}

/// Plays `rounds` rounds for every device, timing the choose and observe loops.
fn play(
    policies: &mut [Filtered<AnyPolicy>],
    env: &mut SyntheticEnvironment,
    rounds: std::ops::Range<u64>,
    rngs: &mut (rand_chacha::ChaCha8Rng, rand_chacha::ChaCha8Rng),
) -> Timing {
    let shared = policies.len() == 1;
    let devices = env.devices();
    let mut arms: Vec<Arm> = Vec::with_capacity(devices);
    let mut rewards: Vec<f64> = Vec::with_capacity(devices);
    let mut t = Timing {
        choose: Duration::ZERO,
        observe: Duration::ZERO,
        calls: 0,
    };
    for round in rounds {
        env.prepare_round(round, 1_000);
        arms.clear();
        let start = Instant::now();
        for device in 0..devices {
            let ctx = env.context(device, round);
            let p = &mut policies[if shared { 0 } else { device }];
            arms.push(p.choose(&ctx, &mut rngs.0).expect("feasible"));
        }
        t.choose += start.elapsed();
        rewards.clear();
        for (device, arm) in arms.iter().enumerate() {
            rewards.push(env.pull(device, arm, &mut rngs.1).reward);
        }
        let start = Instant::now();
        for device in 0..devices {
            let ctx = env.context(device, round);
            let p = &mut policies[if shared { 0 } else { device }];
            p.observe(&ctx, arms[device], rewards[device])
                .expect("valid reward");
        }
        t.observe += start.elapsed();
        t.calls += devices as u64;
    }
    t
}

fn ns_per_call(d: Duration, calls: u64) -> f64 {
    d.as_nanos() as f64 / calls as f64
}

fn main() {
    // `cargo bench` passes `--bench`; a name filter may follow.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    println!(
        "| policy | devices | ns/call rounds 0-50 (choose + observe) | ns/call rounds 200-250 (choose + observe) | checkpoint bytes/device after 250 rounds |"
    );
    println!("|---|---:|---:|---:|---:|");
    for config in PolicyConfig::all_defaults() {
        if filter
            .as_deref()
            .is_some_and(|f| !config.kind().contains(f))
        {
            continue;
        }
        for devices in [80usize, 10_000] {
            let mut env = SyntheticEnvironment::new(
                SyntheticConfig::preset("stationary").expect("preset"),
                devices,
            )
            .expect("environment");
            let mut policies: Vec<Filtered<AnyPolicy>> = (0..devices)
                .map(|_| {
                    Filtered::new(
                        config.build(env.arm_space()).expect("valid"),
                        FeasibilityFilter::default(),
                    )
                })
                .collect();
            let mut rngs = run_rngs(1);
            let early = play(&mut policies, &mut env, 0..50, &mut rngs);
            play(&mut policies, &mut env, 50..200, &mut rngs);
            let late = play(&mut policies, &mut env, 200..250, &mut rngs);
            let sample = policies.len().min(50);
            let bytes: usize = policies[..sample]
                .iter()
                .map(|p| serde_json::to_string(p).expect("serializes").len())
                .sum();
            println!(
                "| {} | {} | {:.0} ({:.0} + {:.0}) | {:.0} ({:.0} + {:.0}) | {} |",
                config.kind(),
                devices,
                ns_per_call(early.choose + early.observe, early.calls),
                ns_per_call(early.choose, early.calls),
                ns_per_call(early.observe, early.calls),
                ns_per_call(late.choose + late.observe, late.calls),
                ns_per_call(late.choose, late.calls),
                ns_per_call(late.observe, late.calls),
                bytes / sample
            );
        }
    }

    println!();
    println!("Shared policy (one instance for all devices, as in the arena's `shared` scope), 10,000 devices x 5 rounds:");
    println!();
    println!("| policy | ns/call (choose + observe) | tree/arm state after 50,000 plays |");
    println!("|---|---:|---:|");
    for config in PolicyConfig::all_defaults() {
        if filter
            .as_deref()
            .is_some_and(|f| !config.kind().contains(f))
        {
            continue;
        }
        let mut env = SyntheticEnvironment::new(
            SyntheticConfig::preset("stationary").expect("preset"),
            10_000,
        )
        .expect("environment");
        let mut policies = vec![Filtered::new(
            config.build(env.arm_space()).expect("valid"),
            FeasibilityFilter::default(),
        )];
        let mut rngs = run_rngs(1);
        let t = play(&mut policies, &mut env, 0..5, &mut rngs);
        let bytes = serde_json::to_string(&policies[0])
            .expect("serializes")
            .len();
        println!(
            "| {} | {:.0} ({:.0} + {:.0}) | {} bytes of JSON |",
            config.kind(),
            ns_per_call(t.choose + t.observe, t.calls),
            ns_per_call(t.choose, t.calls),
            ns_per_call(t.observe, t.calls),
            bytes
        );
    }
}
