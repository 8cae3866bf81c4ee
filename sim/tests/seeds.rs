//! Paired seeds: strategies on one seed see the same devices in the same rounds; a comparison
//! over seeds is byte-identical when repeated; the bandit preset gives every device at least 20
//! plays and its report names each class's settled arm.

use std::collections::BTreeSet;

use sim::comparison;
use sim::config::ExperimentConfig;
use sim::experiment::{self, Resources, SeedRuns};
use sim::host::HostClass;
use sim::report::Report;
use sim::Quiet;

/// The devices selected in each round (every play, whatever its outcome).
fn selections(r: &Report) -> Vec<BTreeSet<u64>> {
    r.rounds
        .iter()
        .map(|x| x.plays.iter().map(|p| p.device).collect())
        .collect()
}

#[test]
fn strategies_on_one_seed_see_the_same_devices_in_the_same_rounds() {
    let mut cfg = ExperimentConfig::preset("tiny").unwrap();
    cfg.coordinator.rounds = 6;
    let res = Resources::load(&cfg, None).unwrap();
    let runs: Vec<Report> = ["fedspine", "fedlora", "fixed-prune"]
        .iter()
        .map(|s| experiment::run_entry(&cfg, s, &res, &mut Quiet).unwrap())
        .collect();
    let first = selections(&runs[0]);
    assert_eq!(first.len(), 6);
    let seen: BTreeSet<u64> = first.iter().flatten().copied().collect();
    assert!(seen.len() > 4, "selection moves around the fleet: {seen:?}");
    for r in &runs[1..] {
        assert_eq!(selections(r), first, "{}", r.summary.strategy);
    }
    // The strategies really differ (arms), so the equality above is not trivial.
    let arms = |r: &Report| -> Vec<u32> {
        r.rounds
            .iter()
            .flat_map(|x| x.plays.iter().map(|p| p.rank))
            .collect()
    };
    assert_ne!(arms(&runs[0]), arms(&runs[1]));
}

fn compare_twice(cfg: &ExperimentConfig, entries: &[String]) -> (Vec<SeedRuns>, Vec<SeedRuns>) {
    let res = Resources::load(cfg, None).unwrap();
    let seeds = experiment::seeds(cfg, 2);
    let mut ok = |_: u64, _: &Report| Ok(());
    let a = experiment::compare_seeds(cfg, entries, &seeds, &res, &mut Quiet, &mut ok).unwrap();
    let b = experiment::compare_seeds(cfg, entries, &seeds, &res, &mut Quiet, &mut ok).unwrap();
    (a, b)
}

#[test]
fn a_comparison_over_seeds_repeats_byte_for_byte() {
    let cfg = ExperimentConfig::preset("tiny").unwrap();
    let entries: Vec<String> = ["fedspine", "fedlora"].map(String::from).to_vec();
    let (a, b) = compare_twice(&cfg, &entries);
    assert_eq!(a.len(), 2);
    assert_eq!(a[0].seed, cfg.seed);
    assert_eq!(a[1].seed, cfg.seed + 1);
    let ca = comparison::compare(&cfg.name, &entries, &a, 2);
    let cb = comparison::compare(&cfg.name, &entries, &b, 2);
    assert_eq!(ca.to_json(), cb.to_json());
    assert_eq!(ca.to_markdown(), cb.to_markdown());
    // The seeds differ (data and selection), and every run is reported.
    assert_ne!(selections(&a[0].reports[0]), selections(&a[1].reports[0]));
    let md = ca.to_markdown();
    assert!(md.contains("fedspine - fedlora"), "{md}");
    assert!(
        md.contains("final accuracy, every device of the fleet"),
        "{md}"
    );
    // Per seed and entry, the rows hold one value per seed.
    for row in &ca.metrics {
        assert_eq!(row.per_seed.len(), 2, "{}", row.metric);
    }
    let bytes = ca
        .metrics
        .iter()
        .find(|r| r.metric == "megabytes" && r.entry == "fedlora")
        .unwrap();
    let i = bytes.interval.unwrap();
    assert_eq!(i.n, 2);
    assert!(i.lo <= i.mean && i.mean <= i.hi);
    // The fleet evaluation covers every device, the trained one those that trained.
    for r in a.iter().flat_map(|s| &s.reports) {
        let e = &r.summary.evaluation;
        assert_eq!(e.fleet_evaluated, r.devices.len());
        assert_eq!(e.trained_evaluated, r.summary.devices_trained);
        assert!(r.devices.iter().all(|d| d.quality.is_some()));
    }
}

#[test]
fn the_bandit_preset_plays_every_device_twenty_times_and_names_settled_arms() {
    let cfg = ExperimentConfig::preset("bandit").unwrap();
    let res = Resources::load(&cfg, None).unwrap();
    let entries: Vec<String> = ["fedspine", "fedspine@uniform-random", "fedspine@fixed"]
        .map(String::from)
        .to_vec();
    let runs: Vec<SeedRuns> = {
        let mut ok = |_: u64, _: &Report| Ok(());
        experiment::compare_seeds(&cfg, &entries, &[cfg.seed], &res, &mut Quiet, &mut ok).unwrap()
    };
    for r in &runs[0].reports {
        assert_eq!(r.summary.ended_by, "finished", "{}", r.summary.strategy);
        let fewest = r.devices.iter().map(|d| d.history.len()).min().unwrap();
        assert!(
            fewest >= 20,
            "{}: a device played {fewest} rounds",
            r.summary.strategy
        );
    }
    let c = comparison::compare(&cfg.name, &entries, &runs, 2);
    let classes: BTreeSet<&str> = c.bandit.iter().map(|b| b.class.as_str()).collect();
    assert_eq!(classes.len(), 3, "{classes:?}");
    for b in &c.bandit {
        let arm = b.settled.as_ref().expect("every class has late plays");
        assert!(arm.share > 0.0 && arm.share <= 1.0);
        if b.entry == "fedspine@fixed" {
            // The fixed policy plays the middle of the space, always.
            assert_eq!((arm.prune_ratio, arm.rank, arm.share), (0.25, 8, 1.0));
        }
    }
    let md = c.to_markdown();
    assert!(md.contains("SURROGATE MODE"), "{md}");
    assert!(md.contains("fedspine - fedspine@uniform-random"), "{md}");
}

/// Pooling comparisons of disjoint seeds (`sim pool`) gives what one comparison of all their
/// seeds gives: per-seed values, intervals, paired differences, the Byzantine rows (counts
/// summed) and the standard error, whatever the order of the parts. A repeated seed, another
/// experiment and (unless asked for) another CPU class are refused with the parts named; asked
/// for, parts of two classes pool with each part's class named; a comparison survives the JSON
/// it is read back from.
#[test]
fn pooled_comparisons_equal_one_comparison_of_all_their_seeds() {
    use sim::comparison::pool::{self, Classes, Part};
    let mut cfg = ExperimentConfig::preset("tiny").unwrap();
    cfg.coordinator.rounds = 3;
    cfg.coordinator.devices_per_round = 8;
    cfg.coordinator.min_devices = Some(8);
    cfg.eval.every_rounds = 3;
    cfg.eval.panel_devices = 1;
    cfg.byzantine =
        toml::from_str("fraction = 0.25\nattack = { kind = \"scale\", factor = -10 }").unwrap();
    cfg.validate().unwrap();
    let entries: Vec<String> = ["fedlora", "fedlora+clean"].map(String::from).to_vec();
    let res = Resources::load(&cfg, None).unwrap();
    let seeds = experiment::seeds(&cfg, 3);
    let mut ok = |_: u64, _: &Report| Ok(());
    let runs =
        experiment::compare_seeds(&cfg, &entries, &seeds, &res, &mut Quiet, &mut ok).unwrap();
    let whole = comparison::compare(&cfg.name, &entries, &runs, 2);
    assert_eq!(
        whole.byzantine.len(),
        1,
        "the poisoned entry has its clean twin"
    );
    let part = |runs: &[SeedRuns], label: &str| Part {
        label: label.into(),
        comparison: comparison::compare(&cfg.name, &entries, runs, 2),
        host: HostClass::from_json(
            &serde_json::json!({"cpu_model": "a CPU", "vector_path": "avx512", "family": 26}),
        )
        .unwrap(),
    };
    let (a, b) = (part(&runs[..2], "a"), part(&runs[2..], "b"));
    let pooled = pool::pool(&[b.clone(), a.clone()], Classes::One).unwrap();
    assert!(!pooled.classes_mixed);
    assert_eq!(pooled.seeds, whole.seeds);
    assert_eq!(pooled.metrics, whole.metrics);
    assert_eq!(pooled.paired, whole.paired);
    assert_eq!(pooled.byzantine, whole.byzantine);
    assert_eq!(pooled.final_accuracy_se, whole.final_accuracy_se);
    assert!(pooled.bandit.is_empty());
    assert_eq!(
        pooled.pooled_from,
        [
            format!("b: seeds {}", seeds[2]),
            format!("a: seeds {}, {}", seeds[0], seeds[1])
        ]
    );
    let md = pooled.to_markdown();
    assert!(
        md.contains("Pooled from") && md.contains("not pooled"),
        "{md}"
    );
    // The file `sim pool` reads gives back the comparison written.
    let back: comparison::Comparison = serde_json::from_str(&a.comparison.to_json()).unwrap();
    assert_eq!(back, a.comparison);
    // Refusals, each naming what was wrong.
    let err = pool::pool(&[a.clone(), a.clone()], Classes::Mixed)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("in both a and a") && err.contains("disjoint"),
        "{err}"
    );
    // Another vector path, another x86 family (Zen 4 against Zen 5 under one model name).
    for (field, value, ours) in [("vector_path", "avx2", "avx512"), ("family", "25", "26")] {
        let mut other_class = b.clone();
        other_class.host.0.insert(field.into(), value.into());
        let err = pool::pool(&[a.clone(), other_class.clone()], Classes::One)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CPU classes")
                && err.contains(&format!("{field} {ours}"))
                && err.contains(&format!("{field} {value}"))
                && err.contains("--across-classes"),
            "{err}"
        );
        // Asked for, parts of two classes pool as one comparison (each seed's entries still
        // ran on one class), and the report names each part's class.
        let mixed = pool::pool(&[a.clone(), other_class], Classes::Mixed).unwrap();
        assert!(mixed.classes_mixed);
        assert!(mixed.to_markdown().contains("on several CPU classes"));
        assert_eq!(mixed.metrics, whole.metrics);
        assert_eq!(mixed.paired, whole.paired);
        for (line, v) in mixed.pooled_from.iter().zip([ours, value]) {
            assert!(
                line.contains("CPU class: ") && line.contains(&format!("{field} {v}")),
                "{line}"
            );
        }
    }
    let mut other = b.clone();
    other.comparison.entries.push("hetlora".into());
    let err = pool::pool(&[a, other], Classes::Mixed)
        .unwrap_err()
        .to_string();
    assert!(err.contains("differ in entries"), "{err}");
}
