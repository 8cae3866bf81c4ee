//! `sim compare --resume`: a comparison interrupted part-way and resumed from its run folders
//! gives the comparison an uninterrupted one gives, byte for byte, running only what was
//! missing or unreadable; every run folder reads back as it was written; a folder from another
//! experiment is refused by the setting that differs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sim::comparison;
use sim::config::ExperimentConfig;
use sim::experiment::{self, Resources, SeedRuns};
use sim::report::{Report, SUMMARY_FILE};
use sim::{Quiet, SimError};

fn folder(root: &Path, seed: u64, entry: &str) -> PathBuf {
    root.join(format!("seed-{seed}")).join(entry)
}

/// What `sim compare --resume` does for one seed and entry.
fn read_back(root: &Path, seed: u64, entry: &str) -> Result<Option<Report>, SimError> {
    let dir = folder(root, seed, entry);
    if !dir.join(SUMMARY_FILE).exists() {
        return Ok(None);
    }
    Ok(Report::read_from(&dir).ok())
}

/// Resume with every run on disk: running anything is a failure.
fn resume_complete(
    cfg: &ExperimentConfig,
    entries: &[String],
    res: &Resources,
    root: &Path,
) -> Result<Vec<SeedRuns>, SimError> {
    let seeds = experiment::seeds(cfg, 2);
    experiment::compare_seeds_resuming(
        cfg,
        entries,
        &seeds,
        res,
        &mut Quiet,
        &mut |seed, r| panic!("seed {seed} {} ran again", r.summary.strategy),
        &mut |seed, e| read_back(root, seed, e),
    )
}

fn text(r: &Report) -> String {
    serde_json::to_string(r).unwrap()
}

#[test]
fn a_resumed_comparison_equals_an_uninterrupted_one() {
    let mut cfg = ExperimentConfig::preset("tiny").unwrap();
    cfg.coordinator.rounds = 3;
    cfg.eval.every_rounds = 3;
    cfg.validate().unwrap();
    let entries: Vec<String> = ["fedspine", "fedlora"].map(String::from).to_vec();
    let res = Resources::load(&cfg, None).unwrap();
    let seeds = experiment::seeds(&cfg, 2);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut write = |seed: u64, r: &Report| r.write_to(&folder(root, seed, &r.summary.strategy));
    let whole =
        experiment::compare_seeds(&cfg, &entries, &seeds, &res, &mut Quiet, &mut write).unwrap();
    let want = comparison::compare(&cfg.name, &entries, &whole, 2).to_json();

    // Every run reads back as it was written, real mode's device-rounds included.
    for s in &whole {
        for r in &s.reports {
            let back = Report::read_from(&folder(root, s.seed, &r.summary.strategy)).unwrap();
            assert_eq!(
                text(&back),
                text(r),
                "seed {} {}",
                s.seed,
                r.summary.strategy
            );
        }
    }
    assert!(
        whole[0].reports[0].device_rounds.len() > 1,
        "the preset trains for real, so device_rounds.jsonl is part of what is read back"
    );

    // Interrupted: one run never finished (no folder), one was cut off while its summary was
    // written, one lost a line of its devices file after the summary (a damaged disk).
    std::fs::remove_dir_all(folder(root, seeds[1], "fedlora")).unwrap();
    let cut = folder(root, seeds[0], "fedlora").join(SUMMARY_FILE);
    let summary = std::fs::read_to_string(&cut).unwrap();
    std::fs::write(&cut, &summary[..summary.len() / 2]).unwrap();
    let devices = folder(root, seeds[1], "fedspine").join("devices.jsonl");
    let lines = std::fs::read_to_string(&devices).unwrap();
    let short: String = lines.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&devices, short).unwrap();
    let e = Report::read_from(&folder(root, seeds[1], "fedspine"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("devices.jsonl") && e.contains("devices where"),
        "{e}"
    );
    let e = Report::read_from(&folder(root, seeds[0], "fedlora"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(SUMMARY_FILE), "{e}");

    let mut ran = BTreeSet::new();
    let mut write = |seed: u64, r: &Report| {
        ran.insert((seed, r.summary.strategy.clone()));
        r.write_to(&folder(root, seed, &r.summary.strategy))
    };
    let resumed = experiment::compare_seeds_resuming(
        &cfg,
        &entries,
        &seeds,
        &res,
        &mut Quiet,
        &mut write,
        &mut |seed, e| read_back(root, seed, e),
    )
    .unwrap();
    assert_eq!(
        ran,
        BTreeSet::from([
            (seeds[0], "fedlora".to_string()),
            (seeds[1], "fedspine".to_string()),
            (seeds[1], "fedlora".to_string()),
        ]),
        "only the missing and unreadable runs ran again"
    );
    assert_eq!(
        comparison::compare(&cfg.name, &entries, &resumed, 2).to_json(),
        want
    );

    // Nothing is missing now: nothing runs, and the comparison is the same again.
    let again = resume_complete(&cfg, &entries, &res, root).unwrap();
    assert_eq!(
        comparison::compare(&cfg.name, &entries, &again, 2).to_json(),
        want
    );

    // Resuming another experiment into the same folders is refused by the setting.
    let mut other = cfg.clone();
    other.coordinator.rounds = 2;
    let e = resume_complete(&other, &entries, &res, root)
        .err()
        .expect("another experiment's runs are refused")
        .to_string();
    assert!(
        e.contains("coordinator.rounds") && e.contains("is 3 there and 2 here"),
        "{e}"
    );
    // The output folder is not part of the experiment.
    let mut moved = cfg.clone();
    moved.output_dir = root.join("elsewhere");
    resume_complete(&moved, &entries, &res, root).unwrap();
}

/// The binary: `--resume` reads back what is there (the output folder named another way
/// still resumes), says how many runs it read, writes the same comparison; a folder whose
/// `host.json` names another CPU class is read back only while no run is missing, and keeps its
/// class.
#[test]
fn the_binary_resumes_and_refuses_another_cpu_class() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let run = |out: String, resume: bool| {
        let mut args: Vec<String> = [
            "compare",
            "--config",
            "sim/configs/examples/bandit-s03.toml",
            "--rounds",
            "12",
            "--seed",
            "201",
            "--seeds",
            "2",
            "--strategies",
            "fedspine@ucb1,fedspine@fixed:prune_ratio=0.6:rank=4",
            "--out",
            &out,
        ]
        .map(String::from)
        .to_vec();
        if resume {
            args.push("--resume".into());
        }
        std::process::Command::new(env!("CARGO_BIN_EXE_sim"))
            .current_dir(root)
            .args(args)
            .output()
            .unwrap()
    };
    let plain = out.display().to_string();
    let first = run(plain.clone(), false);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let want = std::fs::read(out.join("compare.json")).unwrap();
    std::fs::remove_dir_all(out.join("seed-202/fedspine@ucb1")).unwrap();
    let resumed = run(format!("{plain}/"), true);
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(stdout.contains("3 run(s) read back"), "{stdout}");
    assert_eq!(std::fs::read(out.join("compare.json")).unwrap(), want);
    // Another CPU class wrote this folder's runs: with every run on disk they read back (nothing
    // is computed here) and the folder keeps its class; with one missing, nothing runs.
    let host = out.join("host.json");
    let text = std::fs::read_to_string(&host).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cpu_model"] = "another CPU".into();
    let foreign = v.to_string();
    std::fs::write(&host, &foreign).unwrap();
    let read_only = run(plain.clone(), true);
    assert!(
        read_only.status.success(),
        "{}",
        String::from_utf8_lossy(&read_only.stderr)
    );
    assert!(String::from_utf8_lossy(&read_only.stdout).contains("4 run(s) read back"));
    assert_eq!(std::fs::read(out.join("compare.json")).unwrap(), want);
    assert_eq!(std::fs::read_to_string(&host).unwrap(), foreign);
    std::fs::remove_dir_all(out.join("seed-202/fedspine@ucb1")).unwrap();
    let refused = run(plain, true);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("another CPU")
            && stderr.contains("differ between CPU classes")
            && stderr.contains("1 run(s) of this comparison are not on disk"),
        "{stderr}"
    );
    assert!(!out.join("seed-202/fedspine@ucb1").exists());
}
