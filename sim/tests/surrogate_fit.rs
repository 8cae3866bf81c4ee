//! The fitted surrogate: device-rounds drawn from known parameters are fitted back within
//! stated tolerances (with provenance and a held-out validation that beats the mean), and a
//! parameter file without provenance is refused unless forced (in the library and by `sim run`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sim::config::SurrogateConfig;
use sim::device_rounds::{self, DeviceRound};
use sim::local_data::WorkloadKind;
use sim::sampling::standard_normal;
use sim::surrogate::{fit_device_rounds, FitOptions, SurrogateParams};

/// A scratch directory, removed when dropped (also when the test fails).
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fedspine-surrogate-{tag}-"))
        .tempdir()
        .unwrap()
}

fn truth() -> SurrogateParams {
    SurrogateParams {
        source: "truth".into(),
        loss_initial: 2.6,
        loss_floor: 1.2,
        local_rate: 0.03,
        rank_half: 8.0,
        sparsity_penalty: 0.8,
        carry: 0.6,
        device_sd: 0.03,
        noise_sd: 0.005,
        accuracy_intercept: 0.95,
        accuracy_slope: -0.2,
        norm_per_gain: 2.0,
        perplexity: false,
        provenance: None,
        validation: None,
    }
}

/// Runs of `rounds` rounds of `per_round` device-rounds drawn from the surrogate's model.
fn draw(p: &SurrogateParams, runs: u64, rounds: u64, per_round: u64) -> Vec<DeviceRound> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut out = Vec::new();
    for run in 0..runs {
        let mut gap = p.loss_initial - p.loss_floor;
        for round in 1..=rounds {
            let mut phis = Vec::new();
            for device in 0..per_round {
                let rank = [4u32, 8, 16, 32][rng.random_range(0..4)];
                let steps = [2u64, 4, 8, 16][rng.random_range(0..4)];
                let s0: f64 = rng.random::<f64>() * 0.3;
                let s1 = s0 + rng.random::<f64>() * 0.2;
                let o = p.device_sd * standard_normal(&mut rng);
                let phi = p.phi(rank as f64, steps as f64);
                phis.push(phi);
                let before = p.loss_floor
                    + gap
                    + p.sparsity_penalty * s0
                    + o
                    + p.noise_sd * standard_normal(&mut rng);
                let after = p.loss_floor
                    + (1.0 - phi) * gap
                    + p.sparsity_penalty * s1
                    + o
                    + p.noise_sd * standard_normal(&mut rng);
                let acc = |l: f64, rng: &mut ChaCha8Rng| {
                    (p.accuracy(l) + 0.01 * standard_normal(rng)).clamp(0.0, 1.0)
                };
                out.push(DeviceRound {
                    workload: "spam".into(),
                    seed: run,
                    strategy: "fixed-prune".into(),
                    round,
                    device,
                    class: "synthetic".into(),
                    prune_ratio: s1,
                    rank,
                    sparsity_before: s0,
                    sparsity_after: s1,
                    steps,
                    batch: 2,
                    data_items: 30,
                    data_tokens: 900,
                    label_share: Some(0.5),
                    loss_before: before,
                    loss_after: after,
                    accuracy_before: acc(before, &mut rng),
                    accuracy_after: acc(after, &mut rng),
                    update_norm: p.norm_per_gain * phi * gap,
                    measured_compute_ms: Some(1000.0),
                });
            }
            gap *= 1.0 - p.carry * phis.iter().sum::<f64>() / phis.len() as f64;
        }
    }
    out
}

#[test]
fn fitting_drawn_device_rounds_recovers_the_parameters() {
    let p = truth();
    let rounds = draw(&p, 8, 6, 10);
    let tmp_dir = temp_dir("fit");
    let dir = tmp_dir.path().to_path_buf();
    let path = dir.join(device_rounds::FILE_NAME);
    std::fs::remove_file(&path).ok();
    device_rounds::append(&path, &rounds).unwrap();
    let opts = FitOptions {
        split_seed: 3,
        holdout: 0.25,
        command: "sim fit-surrogate test".into(),
        date: "2026-01-01T00:00:00Z".into(),
    };
    let got = fit_device_rounds(std::slice::from_ref(&dir), &opts).unwrap();
    // Stated tolerances: floor +-0.1 nats, rate +-20%, rank half-point +-35%, sparsity
    // penalty +-0.1, accuracy slope +-0.02, carry +-0.15, norm per gain +-15%.
    let close = |name: &str, got: f64, want: f64, tol: f64| {
        assert!(
            (got - want).abs() <= tol,
            "{name}: got {got}, want {want} +- {tol}"
        );
    };
    close("loss_floor", got.loss_floor, 1.2, 0.1);
    close("local_rate", got.local_rate, 0.03, 0.2 * 0.03);
    close("rank_half", got.rank_half, 8.0, 0.35 * 8.0);
    close("sparsity_penalty", got.sparsity_penalty, 0.8, 0.1);
    close("accuracy_slope", got.accuracy_slope, -0.2, 0.02);
    close("carry", got.carry, 0.6, 0.15);
    close("norm_per_gain", got.norm_per_gain, 2.0, 0.3);
    close("loss_initial", got.loss_initial, 2.6, 0.1);
    assert!(!got.perplexity);
    // Provenance: the file's hash and count, the command and date.
    let prov = got.provenance.as_ref().unwrap();
    assert_eq!(prov.device_rounds, rounds.len() as u64);
    assert_eq!(prov.workload, "spam");
    assert_eq!(prov.command, "sim fit-surrogate test");
    assert_eq!(prov.inputs.len(), 1);
    assert_eq!(prov.inputs[0].device_rounds, rounds.len() as u64);
    assert_eq!(prov.inputs[0].sha256.len(), 64);
    // Validation on held-out device-rounds beats predicting the mean.
    let v = got.validation.as_ref().unwrap();
    assert_eq!(v.holdout_device_rounds, 120);
    assert!(
        v.loss_change_mae < 0.5 * v.loss_change_mae_baseline,
        "{v:?}"
    );
    assert!(v.accuracy_mae < v.accuracy_mae_baseline, "{v:?}");
    // The written file loads back without force, with the same values.
    let out = dir.join("params.toml");
    std::fs::write(&out, got.to_toml()).unwrap();
    let back = SurrogateParams::load(
        &SurrogateConfig {
            params: out.display().to_string(),
            force_unfitted: false,
        },
        WorkloadKind::Spam,
    )
    .unwrap();
    assert_eq!(back, got);
}

#[test]
fn a_parameter_file_without_provenance_is_refused_unless_forced() {
    let tmp_dir = temp_dir("refuse");
    let dir = tmp_dir.path().to_path_buf();
    let mut p = truth();
    p.source = "hand-set".into();
    let path = dir.join("hand-set.toml");
    std::fs::write(&path, p.to_toml()).unwrap();
    let cfg = SurrogateConfig {
        params: path.display().to_string(),
        force_unfitted: false,
    };
    let err = SurrogateParams::load(&cfg, WorkloadKind::Spam)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no provenance"), "{err}");
    assert!(err.contains("--force-unfitted"), "{err}");
    assert!(err.contains("hand-set.toml"), "{err}");
    let forced = SurrogateParams::load(
        &SurrogateConfig {
            force_unfitted: true,
            ..cfg
        },
        WorkloadKind::Spam,
    )
    .unwrap();
    assert!(forced.note().starts_with("UNFITTED (forced)"));
    // The binary refuses it too, and runs it when forced (the report names the source).
    let sim = env!("CARGO_BIN_EXE_sim");
    let exp = dir.join("exp.toml");
    let text = include_str!("../configs/surrogate.toml")
        .replace(
            "[fleet]",
            &format!(
                "[surrogate]\nparams = {:?}\n\n[fleet]",
                path.display().to_string()
            ),
        )
        .replace("devices = 10000", "devices = 300")
        .replace("min_devices = 5000", "min_devices = 150");
    std::fs::write(&exp, text).unwrap();
    let args = |force: bool| {
        let mut a: Vec<String> = [
            "run",
            "--config",
            exp.to_str().unwrap(),
            "--rounds",
            "2",
            "--devices-per-round",
            "20",
            "--out",
            dir.join("out").to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if force {
            a.push("--force-unfitted".into());
        }
        a
    };
    let refused = std::process::Command::new(sim)
        .args(args(false))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no provenance"), "{stderr}");
    let forced = std::process::Command::new(sim)
        .args(args(true))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&forced.stdout);
    assert!(
        forced.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert!(
        stdout.contains("Surrogate parameters: UNFITTED (forced)"),
        "{stdout}"
    );
}
