//! Arena results: per-policy regret curves, and their rendering as a text table and CSV.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One policy's run on one environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRun {
    pub name: String,
    pub kind: String,
    /// Cumulative regret per device (mean over devices) after the last round.
    pub final_regret: f64,
    /// Mean observed reward per play.
    pub mean_reward: f64,
    /// Plays that failed (the arm did not fit the device).
    pub failures: u64,
    /// Times the policy had no feasible arm left.
    pub no_feasible: u64,
    /// Cumulative regret per device (mean over devices) after each round.
    pub regret_curve: Vec<f64>,
}

/// Every policy's run on one environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnvironmentReport {
    pub environment: String,
    pub rounds: u64,
    pub devices: usize,
    pub seed: u64,
    pub runs: Vec<PolicyRun>,
}

impl EnvironmentReport {
    /// The run named `name`.
    pub fn run(&self, name: &str) -> Option<&PolicyRun> {
        self.runs.iter().find(|r| r.name == name)
    }

    /// A copy whose curves keep at most `points` evenly spaced rounds (always the last).
    pub fn downsampled(&self, points: usize) -> EnvironmentReport {
        let mut r = self.clone();
        for run in &mut r.runs {
            run.regret_curve = downsample(&run.regret_curve, points)
                .into_iter()
                .map(|(_, v)| v)
                .collect();
        }
        r
    }
}

/// `(index, value)` pairs of at most `points` evenly spaced entries, the last one included.
pub fn downsample(values: &[f64], points: usize) -> Vec<(usize, f64)> {
    let n = values.len();
    if n == 0 || points == 0 {
        return Vec::new();
    }
    if n <= points {
        return values.iter().copied().enumerate().collect();
    }
    let mut out: Vec<(usize, f64)> = (0..points)
        .map(|k| {
            let i = k * (n - 1) / (points - 1).max(1);
            (i, values[i])
        })
        .collect();
    out.dedup_by_key(|p| p.0);
    out
}

/// Final cumulative regret per device: one row per policy, one column per environment, and
/// in brackets the ratio to `uniform-random`'s when that policy ran.
pub fn regret_table(reports: &[EnvironmentReport]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for rep in reports {
        for run in &rep.runs {
            if !names.contains(&run.name.as_str()) {
                names.push(&run.name);
            }
        }
    }
    let name_width = names.iter().map(|n| n.len()).max().unwrap_or(6).max(6);
    let col = |rep: &EnvironmentReport| rep.environment.len().max(16);
    let mut out = String::new();
    let _ = write!(out, "{:name_width$}", "policy");
    for rep in reports {
        let _ = write!(out, "  {:>w$}", rep.environment, w = col(rep));
    }
    out.push('\n');
    for name in names {
        let _ = write!(out, "{name:name_width$}");
        for rep in reports {
            let cell = match rep.run(name) {
                Some(run) => {
                    let random = rep.run("uniform-random").map(|r| r.final_regret);
                    match random {
                        Some(r) if r > 0.0 => {
                            format!("{:.1} ({:.2})", run.final_regret, run.final_regret / r)
                        }
                        _ => format!("{:.1}", run.final_regret),
                    }
                }
                None => "-".into(),
            };
            let _ = write!(out, "  {:>w$}", cell, w = col(rep));
        }
        out.push('\n');
    }
    out
}

/// One CSV row per (environment, policy).
pub fn summary_csv(reports: &[EnvironmentReport]) -> String {
    let mut out = String::from(
        "environment,policy,kind,rounds,devices,seed,final_regret_per_device,regret_vs_uniform_random,mean_reward,failures,no_feasible\n",
    );
    for rep in reports {
        let random = rep.run("uniform-random").map(|r| r.final_regret);
        for run in &rep.runs {
            let ratio = match random {
                Some(r) if r > 0.0 => format!("{:.4}", run.final_regret / r),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{:.4},{},{:.4},{},{}",
                rep.environment,
                run.name,
                run.kind,
                rep.rounds,
                rep.devices,
                rep.seed,
                run.final_regret,
                ratio,
                run.mean_reward,
                run.failures,
                run.no_feasible
            );
        }
    }
    out
}
