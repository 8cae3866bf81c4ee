//! Tests of the time model: the solver, the fit on synthetic points from known coefficients,
//! agreement with `cost`'s FLOPs, the file checks, and the shipped calibration's stated error.

use super::*;
use device_agent::model::ModelConfig;

fn smollm() -> ModelConfig {
    ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true)
}

fn pruned(heads: usize, ffn: usize) -> ModelConfig {
    let mut c = smollm();
    for b in c.blocks.iter_mut().skip(1) {
        b.n_heads = heads;
        b.n_kv_heads = heads.div_ceil(3);
        b.ffn_dim = ffn;
    }
    c
}

fn synthetic(coefs: &[f64; N_FEATURES], kind: StepKind) -> Vec<Measurement> {
    synthetic_with(coefs, kind, None)
}

/// Points whose times are `coefs` applied to their features on a host with the in-place
/// threshold `in_place_below`.
fn synthetic_with(
    coefs: &[f64; N_FEATURES],
    kind: StepKind,
    in_place_below: Option<usize>,
) -> Vec<Measurement> {
    let mut v = Vec::new();
    for (i, (h, f)) in [(9, 1536), (6, 1536), (9, 768), (3, 512), (6, 1024)]
        .into_iter()
        .enumerate()
    {
        for (rank, batch, seq) in [(4, 1, 64), (8, 2, 128), (16, 4, 128), (32, 2, 256)] {
            let cfg = pruned(h, f);
            let w = Workload {
                shape: ShapeSums::of(&cfg),
                rank,
                batch,
                seq,
            };
            let ms: f64 = coefs
                .iter()
                .zip(features(&w, in_place_below))
                .map(|(c, x)| c * x)
                .sum();
            v.push(Measurement {
                kind,
                label: format!("shape {i}"),
                sparsity: cfg.sparsity(),
                workload: w,
                ms,
                reps: 1,
            });
        }
    }
    v
}

fn calibration(measurements: Vec<Measurement>) -> Calibration {
    Calibration {
        host: MeasuredOn {
            cpu: "test".into(),
            isa: vec![],
            threads: 1,
            build: "test".into(),
            command: "test".into(),
            date: "2026-11-30".into(),
            class: None,
            in_place_below_rows: None,
        },
        measurements,
    }
}

#[test]
fn nnls_recovers_non_negative_coefficients_and_clamps_negative_ones() {
    // b = 2 x0 + 3 x2 exactly.
    let rows: Vec<Vec<f64>> = (0..12)
        .map(|i| {
            let t = i as f64;
            vec![1.0 + t, (t * 0.7).sin() + 2.0, t * t * 0.1 + 1.0]
        })
        .collect();
    let b: Vec<f64> = rows.iter().map(|r| 2.0 * r[0] + 3.0 * r[2]).collect();
    let x = nnls(&rows, &b);
    assert!((x[0] - 2.0).abs() < 1e-9 && x[1].abs() < 1e-9 && (x[2] - 3.0).abs() < 1e-9);
    // With a negative true coefficient the solver never returns a negative one.
    let b: Vec<f64> = rows.iter().map(|r| 2.0 * r[0] - 1.0 * r[1]).collect();
    let x = nnls(&rows, &b);
    assert!(x.iter().all(|&v| v >= 0.0), "{x:?}");
}

#[test]
fn fitting_points_from_known_coefficients_recovers_them() {
    // Every term, the in-place one included: the synthetic grid's 1 x 64 passes fall under a
    // threshold of 128 rows.
    let truth = [40.0, 30.0, 25.0, 50.0, 120.0, 0.4, 2.0, 30.0, 45.0];
    let mut cal = calibration(synthetic_with(&truth, StepKind::Train, Some(128)));
    cal.host.in_place_below_rows = Some(128);
    let model = TimeModel::fit(&cal).unwrap();
    let (_, got) = &model.coefficients[0];
    for (g, t) in got.iter().zip(truth) {
        assert!((g / t - 1.0).abs() < 1e-6, "{got:?} vs {truth:?}");
    }
    let v = cal.validation(StepKind::Train);
    assert!(v.ours().0 < 1e-6, "{:?}", v.ours());
    // Time linear in FLOPs cannot follow a fixed overhead and memory terms.
    assert!(v.flops_linear().0 > 0.05, "{:?}", v.flops_linear());
    // Without the threshold the term is never taken, and the fit is the eight-term one.
    let truth = [40.0, 30.0, 25.0, 50.0, 120.0, 0.4, 2.0, 30.0, 0.0];
    let cal = calibration(synthetic(&truth, StepKind::Train));
    let (_, got) = &TimeModel::fit(&cal).unwrap().coefficients[0];
    for (g, t) in got.iter().zip(truth).take(8) {
        assert!((g / t - 1.0).abs() < 1e-6, "{got:?} vs {truth:?}");
    }
    assert_eq!(got[8], 0.0);
}

#[test]
fn total_flops_are_the_cost_module_s() {
    for cfg in [smollm(), pruned(3, 512), pruned(6, 1024)] {
        let w = Workload {
            shape: ShapeSums::of(&cfg),
            rank: 16,
            batch: 4,
            seq: 256,
        };
        let ours = total_flops(StepKind::Train, &w);
        let theirs = cost::train_step_flops(&cfg, 16, 4, 256);
        assert!((ours / theirs - 1.0).abs() < 1e-12, "{ours} vs {theirs}");
        let fwd = total_flops(StepKind::Forward, &w);
        let theirs =
            cost::forward_flops(&cfg, 1024, 256, true) + cost::lora_forward_flops(&cfg, 16, 1024);
        assert!((fwd / theirs - 1.0).abs() < 1e-12);
    }
}

#[test]
fn a_device_runs_the_reference_step_at_its_profile_throughput() {
    let truth = [40.0, 30.0, 25.0, 50.0, 120.0, 0.4, 2.0, 30.0, 0.0];
    let model = TimeModel::fit(&calibration(synthetic(&truth, StepKind::Train))).unwrap();
    let (rank, batch, seq) = REFERENCE;
    let ms = model.device_ms_for(StepKind::Train, &smollm(), rank, batch, seq, 133.0);
    let want = model.reference_flops / 133e9 * 1e3;
    assert!((ms / want - 1.0).abs() < 1e-9, "{ms} vs {want}");
    // A half-pruned model is faster, but by less than half: the head does not shrink.
    let half = model.device_ms_for(StepKind::Train, &pruned(5, 700), rank, batch, seq, 133.0);
    assert!(half < ms && half > 0.5 * ms * 0.9, "{half} vs {ms}");
}

#[test]
fn bad_measurement_files_are_refused_with_the_reason() {
    let truth = [40.0, 30.0, 25.0, 50.0, 120.0, 0.4, 2.0, 30.0, 0.0];
    let mut pts = synthetic(&truth, StepKind::Train);
    pts[3].ms = -1.0;
    let text = serde_json::to_string(&calibration(pts)).unwrap();
    let e = Calibration::from_json(&text, "x.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.json") && e.contains("measurement 3"), "{e}");
    let pts = synthetic(&truth, StepKind::Train)[..5].to_vec();
    let text = serde_json::to_string(&calibration(pts)).unwrap();
    let e = Calibration::from_json(&text, "y.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least"), "{e}");
    let e = Calibration::from_json("{\"host\": 3}", "z.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("z.json"), "{e}");
}

/// The stated leave-one-out errors of the shipped calibration (BENCHMARKS.md, "Time model"):
/// (kind, largest, mean).
const STATED: [(StepKind, f64, f64); 3] = [
    (StepKind::Train, 0.093, 0.029),
    (StepKind::TrainScoring, 0.067, 0.027),
    (StepKind::Forward, 0.081, 0.033),
];

#[test]
fn the_shipped_calibration_reproduces_its_measurements_within_the_stated_error() {
    let (origin, text) = BUILTIN_CALIBRATION;
    let cal = Calibration::from_json(text, origin).unwrap();
    for (kind, max, mean) in STATED {
        let (got_max, got_mean) = cal.validation(kind).ours();
        assert!(
            got_max <= max && got_mean <= mean,
            "{}: leave-one-out error {got_max:.3} / {got_mean:.3}, stated {max} / {mean}",
            kind.name()
        );
    }
    // On training steps the per-operator model beats time linear in FLOPs.
    let v = cal.validation(StepKind::Train);
    assert!(v.ours().0 < v.flops_linear().0 && v.ours().1 < v.flops_linear().1);
}

#[test]
fn runs_merge_to_the_fastest_time_per_point_and_other_hosts_are_refused() {
    let truth = [40.0, 30.0, 25.0, 50.0, 120.0, 0.4, 2.0, 30.0, 0.0];
    let a = calibration(synthetic(&truth, StepKind::Train));
    let mut b = a.clone();
    // The second run: point 0 slower (interference), point 1 faster, and one point only it has.
    b.measurements[0].ms *= 1.2;
    b.measurements[1].ms *= 0.9;
    let mut extra = b.measurements[2].clone();
    extra.workload.seq = 96;
    b.measurements.push(extra.clone());
    let merged =
        Calibration::fastest_of(&[("a.json".into(), a.clone()), ("b.json".into(), b)]).unwrap();
    assert_eq!(merged.measurements.len(), a.measurements.len() + 1);
    assert_eq!(merged.measurements[0].ms, a.measurements[0].ms);
    assert_eq!(merged.measurements[1].ms, a.measurements[1].ms * 0.9);
    assert_eq!(merged.measurements[2].ms, a.measurements[2].ms);
    assert_eq!(merged.measurements[0].reps, 2);
    assert!(merged.measurements.last().unwrap().same_point(&extra));
    assert!(merged.host.command.contains("a.json") && merged.host.command.contains("b.json"));
    let mut other = a.clone();
    other.host.cpu = "another CPU".into();
    let e = Calibration::fastest_of(&[("a.json".into(), a.clone()), ("c.json".into(), other)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.json") && e.contains("another CPU"), "{e}");
    // A run whose products read the weights in place below some rows is another build.
    let mut in_place = a.clone();
    in_place.host.in_place_below_rows = Some(128);
    let e = Calibration::fastest_of(&[("a.json".into(), a.clone()), ("i.json".into(), in_place)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("i.json"), "{e}");
    // One vendor line, two generations: the classes (family, model) tell them apart where both
    // files record them; a file from before the class was recorded is compared on the rest.
    let with_class = |model: Option<u32>| {
        let mut c = a.clone();
        let mut class = crate::host::HostInfo::detect();
        class.model = model;
        c.host.class = Some(class);
        c
    };
    let (zen5, zen4) = (with_class(Some(2)), with_class(Some(17)));
    let e = Calibration::fastest_of(&[("5.json".into(), zen5.clone()), ("4.json".into(), zen4)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("4.json"), "{e}");
    Calibration::fastest_of(&[
        ("5.json".into(), zen5.clone()),
        ("old.json".into(), a.clone()),
    ])
    .unwrap();
    // The class survives a round trip through the file, and an old file reads without one.
    let text = serde_json::to_string(&zen5).unwrap();
    assert_eq!(serde_json::from_str::<Calibration>(&text).unwrap(), zen5);
    let old = serde_json::to_string(&a).unwrap();
    assert!(!old.contains("class"));
    assert_eq!(
        serde_json::from_str::<Calibration>(&old)
            .unwrap()
            .host
            .class,
        None
    );
    let e = Calibration::fastest_of(&[]).unwrap_err().to_string();
    assert!(e.contains("no calibration"), "{e}");
}

#[test]
fn a_scaled_median_merge_outvotes_a_lucky_point_and_uses_a_slower_run() {
    let truth = [40.0, 30.0, 25.0, 50.0, 120.0, 0.4, 2.0, 30.0, 0.0];
    let a = calibration(synthetic(&truth, StepKind::Train));
    // Run b: the host 1.3x slower throughout, and point 0 caught at half its time.
    let mut b = a.clone();
    for m in &mut b.measurements {
        m.ms *= 1.3;
    }
    b.measurements[0].ms = a.measurements[0].ms * 0.5;
    // Run c: 1.1x slower throughout, point 1 20% slower still, and a point only it has.
    let mut c = a.clone();
    for m in &mut c.measurements {
        m.ms *= 1.1;
    }
    c.measurements[1].ms *= 1.2;
    let mut extra = c.measurements[2].clone();
    extra.workload.seq = 96;
    c.measurements.push(extra.clone());
    let runs = [
        ("a.json".to_string(), a.clone()),
        ("b.json".to_string(), b),
        ("c.json".to_string(), c),
    ];
    let merged = Calibration::scaled_median_of(&runs).unwrap();
    assert_eq!(merged.measurements.len(), a.measurements.len() + 1);
    for (m, x) in merged.measurements.iter().zip(&a.measurements) {
        assert!(m.same_point(x));
        // Every run scaled to a's speed agrees with a but on the two odd points, which the
        // other two outvote.
        assert!((m.ms / x.ms - 1.0).abs() < 1e-12, "{} vs {}", m.ms, x.ms);
        assert_eq!(m.reps, 3 * x.reps);
    }
    // The point only c measured keeps c's time at a's speed.
    let only = merged.measurements.last().unwrap();
    assert!(only.same_point(&extra) && (only.ms / (extra.ms / 1.1) - 1.0).abs() < 1e-12);
    assert!(merged.host.command.contains("scales 1.000, 1.300, 1.100"));
    assert!(merged.host.command.contains("c.json"));
    // The fastest-of merge keeps b's lucky point and nothing else from b.
    let fastest = Calibration::fastest_of(&runs).unwrap();
    assert_eq!(fastest.measurements[0].ms, a.measurements[0].ms * 0.5);
    // Another host is refused here too, and a run with no point in common with the first.
    let mut other = a.clone();
    other.host.cpu = "another CPU".into();
    let e = Calibration::scaled_median_of(&[runs[0].clone(), ("o.json".into(), other)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("o.json") && e.contains("another CPU"), "{e}");
    let disjoint = calibration(vec![extra]);
    let e = Calibration::scaled_median_of(&[runs[0].clone(), ("d.json".into(), disjoint)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("d.json") && e.contains("no point in common"),
        "{e}"
    );
}

#[test]
fn every_point_is_timed_on_every_visit_and_keeps_its_fastest_call() {
    let base = crate::experiment::tiny_model(&crate::config::TinyModel::default());
    let design = [
        grid::Point {
            mix: grid::Mix::Channels,
            sparsity: 0.0,
            rank: 2,
            batch: 1,
            seq: 8,
            scoring: true,
        },
        grid::Point {
            mix: grid::Mix::HeadsAndChannels,
            sparsity: 0.3,
            rank: 4,
            batch: 2,
            seq: 8,
            scoring: false,
        },
    ];
    let ids: Vec<u32> = (0..64).map(|i| i % 48).collect();
    let mut visits = Vec::new();
    let mut seen = 0;
    let out = grid::measure(
        &base,
        &ids,
        &design,
        2,
        3,
        |v| visits.push(v),
        |_| seen += 1,
    )
    .unwrap();
    assert_eq!(visits, [1, 2, 3]);
    // Design order: the first point's train, scoring and forward, then the second's two.
    let kinds: Vec<StepKind> = out.iter().map(|m| m.kind).collect();
    use StepKind::*;
    assert_eq!(kinds, [Train, TrainScoring, Forward, Train, Forward]);
    assert_eq!(seen, out.len());
    for m in &out {
        assert_eq!(m.reps, 6, "two timed calls on each of three visits");
        assert!(m.ms > 0.0 && m.ms.is_finite());
    }
    assert_eq!(out[3].label, "heads+channels");
    assert!(out[3].sparsity > 0.0);
    // Too little text for the batch is a grid error, not a panic.
    let err = grid::measure(&base, &ids[..10], &design, 1, 1, |_| {}, |_| {}).unwrap_err();
    assert!(err.to_string().contains("too few tokens"), "{err}");
}

/// `cal`'s leave-one-out maximum and mean error of the per-operator model, training steps then
/// forward passes, are the stated ones (to the rounding BENCHMARKS.md quotes).
fn errors_as_stated(cal: &Calibration, stated: [(f64, f64); 2]) {
    for (kind, (max, mean)) in [StepKind::Train, StepKind::Forward].into_iter().zip(stated) {
        let (got_max, got_mean) = cal.validation(kind).ours();
        assert!(
            (got_max - max).abs() < 5e-4 && (got_mean - mean).abs() < 5e-4,
            "{}: {got_max:.4} / {got_mean:.4}, stated {max} / {mean}",
            kind.name()
        );
    }
}

#[test]
fn the_recorded_intel_runs_merge_to_the_file_and_errors_benchmarks_states() {
    // BENCHMARKS.md, "On the Intel family 6 model 207 host with today's code": four runs whose
    // merge is shipped beside them; its leave-one-out errors are the table's last row.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benchmarks");
    let read = |name: &str| {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        (
            name.to_string(),
            Calibration::from_json(&text, name).unwrap(),
        )
    };
    let runs: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|r| read(&format!("calibration-intel207-s39-{r}.json")))
        .collect();
    let merged = Calibration::fastest_of(&runs).unwrap();
    let (_, shipped) = read("calibration-intel207-s39-merged.json");
    assert_eq!(merged.measurements, shipped.measurements);
    // Visits are counted: runs c and d made 3 x 2 calls per point, a and b 7.
    assert!(shipped.measurements.iter().all(|m| m.reps == 7 + 7 + 6 + 6));
    errors_as_stated(&shipped, [(0.230, 0.062), (0.243, 0.059)]);
    let model = TimeModel::fit(&shipped).unwrap();
    assert!(
        (model.scoring_factor - 1.122).abs() < 5e-4,
        "{}",
        model.scoring_factor
    );
    // Session 40: two more runs of the class (1.26-1.30x slower throughout than runs a-c),
    // and the six merged by their scaled median (BENCHMARKS.md's session-40 rows).
    let mut six = runs;
    six.extend(["e", "f"].map(|r| read(&format!("calibration-intel207-s40-{r}.json"))));
    let merged = Calibration::scaled_median_of(&six).unwrap();
    let (_, shipped) = read("calibration-intel207-s40-median6.json");
    assert_eq!(merged.measurements, shipped.measurements);
    errors_as_stated(&shipped, [(0.307, 0.047), (0.085, 0.032)]);
    // Every training point but two within 10% (dense rank 16 at 1 x 64: +30.7%, 2 x 256:
    // +10.4%).
    let v = shipped.validation(StepKind::Train);
    let over: Vec<f64> = v
        .predictions
        .iter()
        .map(|(measured, ours, _)| ours / measured - 1.0)
        .filter(|e| e.abs() > 0.10)
        .collect();
    assert_eq!(over.len(), 2, "{over:?}");
}

#[test]
fn the_zen5_runs_fit_with_the_in_place_term_and_miss_without_it() {
    // BENCHMARKS.md, "On Zen 5 with the in-place products": runs a, c and d (b ran beside a
    // build) merged at their fastest. The agent's products under 128 rows read the weights in
    // place; read as if every product packed them, the 64-token steps miss by up to 28%.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benchmarks");
    let runs: Vec<_> = ["a", "c", "d"]
        .iter()
        .map(|r| {
            let name = format!("calibration-zen5-s48-{r}.json");
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            let cal = Calibration::from_json(&text, &name).unwrap();
            (name, cal)
        })
        .collect();
    let merged = Calibration::fastest_of(&runs).unwrap();
    assert_eq!(merged.host.in_place_below_rows, Some(128));
    errors_as_stated(&merged, [ZEN5_TRAIN, ZEN5_FORWARD]);
    let mut packed = merged.clone();
    packed.host.in_place_below_rows = None;
    let (max, _) = packed.validation(StepKind::Train).ours();
    assert!(max > 0.25, "{max}");
}

/// The merged Zen 5 runs' leave-one-out (max, mean) errors, training steps and forward passes.
const ZEN5_TRAIN: (f64, f64) = (0.107, 0.0287);
const ZEN5_FORWARD: (f64, f64) = (0.044, 0.020);
