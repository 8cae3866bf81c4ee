//! Byzantine devices on the tiny model in real mode: two of eight devices send their update
//! sign-flipped and scaled by ten. The plain mean's global adapter is dragged far from the
//! clean run's (past the origin), the coordinate-wise median's and trimmed mean's stay close
//! and pointing the clean way, norm clipping bounds the size of the damage (not its
//! direction), and norm screening leaves every poisoned update out (the global is the one
//! without the two attackers); the attackers are the same devices under every method of one
//! seed.

use aggregator::aggregate::GlobalAdapter;
use sim::config::ExperimentConfig;
use sim::experiment::{self, Resources};
use sim::Quiet;

/// The tiny preset with every device in every round and two attackers (scale by -10).
fn config() -> ExperimentConfig {
    let mut c = ExperimentConfig::preset("tiny").unwrap();
    c.strategy = "fedlora".into();
    c.coordinator.rounds = 3;
    c.coordinator.devices_per_round = 8;
    c.coordinator.min_devices = Some(8);
    c.eval.every_rounds = 3;
    // Two of eight values dropped at each end of every coordinate.
    c.coordinator.aggregation.trim_fraction = 0.25;
    c.eval.panel_devices = 1;
    c.fleet.connect_spread_s = 1.0;
    c.byzantine =
        toml::from_str("fraction = 0.25\nattack = { kind = \"scale\", factor = -10 }").unwrap();
    c.validate().unwrap();
    c
}

/// The layers' deltas `B A` (full coordinates), flattened.
fn deltas(g: &GlobalAdapter) -> Vec<Vec<f64>> {
    let r = g.rank as usize;
    g.layers
        .iter()
        .map(|l| {
            let (cols, rows) = (l.a.len() / r.max(1), l.b.len() / r.max(1));
            let mut d = vec![0.0f64; rows * cols];
            for o in 0..rows {
                for k in 0..r {
                    let b = l.b[o * r + k] as f64;
                    for i in 0..cols {
                        d[o * cols + i] += b * l.a[k * cols + i] as f64;
                    }
                }
            }
            d
        })
        .collect()
}

/// `|D - D_clean|_F / |D_clean|_F` over every layer's delta, and the cosine of `D` and
/// `D_clean`.
fn distance(g: &GlobalAdapter, clean: &GlobalAdapter) -> (f64, f64) {
    let (x, y) = (deltas(g), deltas(clean));
    assert_eq!(x.len(), y.len());
    let (mut diff, mut dot, mut nx, mut ny) = (0.0, 0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(&y) {
        assert_eq!(a.len(), b.len());
        for (p, q) in a.iter().zip(b) {
            assert!(p.is_finite(), "the global stays finite");
            diff += (p - q) * (p - q);
            dot += p * q;
            nx += p * p;
            ny += q * q;
        }
    }
    assert!(ny > 0.0 && nx > 0.0, "both runs learned something");
    ((diff / ny).sqrt(), dot / (nx * ny).sqrt())
}

struct Run {
    global: GlobalAdapter,
    attackers: Vec<u64>,
    accepted: u64,
    rejected: u64,
    sent: u64,
    clipped: u64,
}

fn run(cfg: &ExperimentConfig, res: &Resources, entry: &str) -> Run {
    let c = cfg.with_entry(entry).unwrap();
    let (report, state) = experiment::run_with_state(&c, res, &mut Quiet).unwrap();
    assert_eq!(
        report.summary.rounds_aggregated, 3,
        "{entry}: every round aggregated"
    );
    let b = report.summary.byzantine.clone();
    if entry.contains("clean") {
        assert!(b.is_none(), "{entry}: a clean run has no attackers");
    }
    let b = b.unwrap_or_else(empty);
    Run {
        global: state.global,
        attackers: b.devices.clone(),
        accepted: b.poisoned_accepted,
        rejected: b.poisoned_rejected,
        sent: b.poisoned_sent,
        clipped: b.poisoned_clipped,
    }
}

fn empty() -> sim::byzantine::ByzantineSummary {
    sim::byzantine::ByzantineSummary {
        attack: String::new(),
        devices: Vec::new(),
        poisoned_sent: 0,
        poisoned_accepted: 0,
        poisoned_rejected: 0,
        poisoned_clipped: 0,
        clipped_total: 0,
    }
}

#[test]
fn robust_methods_keep_the_global_near_the_clean_one_and_the_mean_does_not() {
    let cfg = config();
    let res = Resources::load(&cfg, None).unwrap();
    // Honest delta norms of the clean run set the clip norm just above them.
    let clean_mean = cfg.with_entry("fedlora+agg=mean+clean").unwrap();
    let report = experiment::run(&clean_mean, &res, &mut Quiet).unwrap();
    let honest_max = report
        .rounds
        .iter()
        .flat_map(|r| &r.plays)
        .filter_map(|p| p.delta_norm)
        .fold(0.0, f64::max);
    assert!(honest_max > 0.0);
    let clip = format!("clip={:.6}", honest_max * 1.05);

    let mut d = Vec::new();
    let mut attackers = Vec::new();
    let methods = [
        "agg=mean".to_string(),
        "agg=median".into(),
        "agg=trimmed-mean".into(),
        format!("agg=mean+{clip}"),
        "agg=mean+screen=3".into(),
    ];
    for method in &methods {
        let clean = run(&cfg, &res, &format!("fedlora+{method}+clean"));
        let poisoned = run(&cfg, &res, &format!("fedlora+{method}"));
        if method.contains("screen") {
            assert!(poisoned.sent > 0);
            assert_eq!(
                (poisoned.accepted, poisoned.rejected),
                (0, poisoned.sent),
                "{method}: every poisoned update was screened out"
            );
        } else {
            assert!(
                poisoned.accepted > 0,
                "{method}: poisoned updates reached the aggregate"
            );
        }
        if method.contains("clip") {
            assert_eq!(
                poisoned.clipped, poisoned.accepted,
                "every poisoned update was clipped"
            );
        }
        d.push(distance(&poisoned.global, &clean.global));
        attackers.push(poisoned.attackers);
    }
    eprintln!(
        "(distance, cosine) to the clean global: {:?}",
        methods.iter().zip(&d).collect::<Vec<_>>()
    );
    let (mean, median, trimmed, clipped, screened) = (d[0].0, d[1].0, d[2].0, d[3].0, d[4].0);
    assert_eq!(attackers[0].len(), 2, "{:?}", attackers[0]);
    assert!(
        attackers.iter().all(|a| a == &attackers[0]),
        "{attackers:?}"
    );
    // The mean is dragged past the origin (the poisoned global points away from the clean one).
    assert!(
        mean > 2.0 && d[0].1 < 0.0,
        "the plain mean is dragged far: {:?}",
        d[0]
    );
    // Median and trimmed mean land where dropping two devices' honest values would put them:
    // a fraction of the mean's distance, pointing the clean run's way.
    for (name, (dist, cos)) in [("median", d[1]), ("trimmed mean", d[2])] {
        assert!(
            dist < 0.2 * mean && cos > 0.5,
            "{name}: {dist} (cos {cos}) vs mean {mean}"
        );
    }
    // Clipping bounds the size of the damage (the flipped direction stays).
    assert!(
        clipped < 0.35 * mean,
        "clipping bounds the damage: {clipped} vs {mean}"
    );
    assert!(median < clipped && trimmed < clipped);
    // Screening leaves the attackers out: the mean of the six honest updates, pointing the
    // clean run's way.
    assert!(
        screened < 0.2 * mean && d[4].1 > 0.5,
        "screening: {:?} vs mean {mean}",
        d[4]
    );
}
