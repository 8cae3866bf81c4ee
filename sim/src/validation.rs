//! Whole-run validation of the surrogate: one experiment run in real mode and again through
//! the fitted surrogate (`--mode surrogate`, same file, fleet, seed and rounds), compared
//! strategy by strategy. Held-out device-rounds (`sim fit-surrogate`) test one local round at
//! a time; this tests what users read off a surrogate comparison: does it order the strategies
//! as real training does, and how far apart are the curves.
//!
//! Inputs are two `sim compare` output folders of one seed (a folder per strategy holding
//! `summary.json` and `rounds.jsonl`). A real single-seed difference is only called a
//! difference when it is larger than twice its standard error (from each run's effective
//! sample size); the ordering check counts the pairs real mode resolves.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::SimError;

/// What one run's files say, as far as the validation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct RunTrace {
    pub strategy: String,
    pub mode: String,
    /// Mean final accuracy over the evaluated devices that trained, and its standard error.
    pub final_accuracy: Option<f64>,
    pub final_accuracy_se: Option<f64>,
    /// Mean accuracy over the fleet's final models (at s* where brought there).
    pub fleet_accuracy: Option<f64>,
    pub time_to_target_s: Option<f64>,
    pub virtual_s: f64,
    /// Per closed round: mean local loss before and after training over accepted updates.
    pub loss_pre: BTreeMap<u64, f64>,
    pub loss_post: BTreeMap<u64, f64>,
    /// Per evaluated round: the panel's mean accuracy.
    pub panel_accuracy: BTreeMap<u64, f64>,
}

fn read(path: &Path) -> Result<String, SimError> {
    std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))
}

fn bad(path: &Path, what: impl std::fmt::Display) -> SimError {
    SimError::Data(format!("{}: {what}", path.display()))
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

impl RunTrace {
    /// Read a run folder (`summary.json`, `rounds.jsonl`).
    pub fn load(dir: &Path) -> Result<Self, SimError> {
        let path = dir.join("summary.json");
        let doc: Value = serde_json::from_str(&read(&path)?).map_err(|e| bad(&path, e))?;
        let s = doc
            .get("summary")
            .ok_or_else(|| bad(&path, "no `summary` object"))?;
        let text = |k: &str| -> Result<String, SimError> {
            s.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(&path, format!("no `{k}` string in the summary")))
        };
        let eval = s.get("evaluation").cloned().unwrap_or(Value::Null);
        let mut trace = RunTrace {
            strategy: text("strategy")?,
            mode: text("mode")?,
            final_accuracy: num(s, "final_accuracy"),
            final_accuracy_se: num(&eval, "trained_accuracy_se"),
            fleet_accuracy: num(&eval, "fleet_accuracy"),
            time_to_target_s: num(s, "time_to_target_s"),
            virtual_s: num(s, "virtual_s")
                .ok_or_else(|| bad(&path, "no `virtual_s` in the summary"))?,
            loss_pre: BTreeMap::new(),
            loss_post: BTreeMap::new(),
            panel_accuracy: BTreeMap::new(),
        };
        let path = dir.join("rounds.jsonl");
        for (k, line) in read(&path)?.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let r: Value = serde_json::from_str(line)
                .map_err(|e| bad(&path, format_args!("line {}: {e}", k + 1)))?;
            let round = r
                .get("round")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(&path, format_args!("line {}: no `round`", k + 1)))?;
            if let Some(x) = num(&r, "mean_loss_pre") {
                trace.loss_pre.insert(round, x);
            }
            if let Some(x) = num(&r, "mean_loss_post") {
                trace.loss_post.insert(round, x);
            }
            if let Some(x) = r.get("eval").and_then(|e| num(e, "accuracy")) {
                trace.panel_accuracy.insert(round, x);
            }
        }
        Ok(trace)
    }
}

/// The strategy folders (holding `summary.json`) under a comparison folder, sorted.
pub fn strategy_dirs(dir: &Path) -> Result<BTreeMap<String, PathBuf>, SimError> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| SimError::io(dir, e))? {
        let p = entry.map_err(|e| SimError::io(dir, e))?.path();
        if p.join("summary.json").is_file() {
            if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                out.insert(name.to_string(), p);
            }
        }
    }
    Ok(out)
}

/// Mean absolute difference of two curves over the rounds both have, and that count.
pub fn curve_mae(a: &BTreeMap<u64, f64>, b: &BTreeMap<u64, f64>) -> Option<(f64, usize)> {
    let d: Vec<f64> = a
        .iter()
        .filter_map(|(r, x)| b.get(r).map(|y| (x - y).abs()))
        .collect();
    (!d.is_empty()).then(|| (d.iter().sum::<f64>() / d.len() as f64, d.len()))
}

/// One pair of strategies: the real difference in final accuracy (first minus second), its
/// standard error, and the surrogate's difference.
#[derive(Debug, Clone, PartialEq)]
pub struct PairCheck {
    pub first: String,
    pub second: String,
    pub real: f64,
    pub real_se: Option<f64>,
    pub surrogate: f64,
}

impl PairCheck {
    /// Whether real mode resolves the pair: |difference| > 2 SE (unknown SE: not resolved).
    pub fn resolved(&self) -> bool {
        self.real_se.is_some_and(|se| self.real.abs() > 2.0 * se)
    }

    /// How the surrogate orders the pair against real mode: a surrogate difference under
    /// [`TIE`] is no order at all.
    pub fn order(&self) -> Order {
        if self.surrogate.abs() < TIE {
            Order::Tie
        } else if (self.real > 0.0) == (self.surrogate > 0.0) {
            Order::Same
        } else {
            Order::Opposite
        }
    }

    /// Whether the surrogate orders the pair as real mode does (a tie does not).
    pub fn agrees(&self) -> bool {
        self.order() == Order::Same
    }
}

/// A surrogate accuracy difference smaller than this (0.05 points) is a tie.
pub const TIE: f64 = 5e-4;

/// The surrogate's order of a pair against real mode's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Same,
    Opposite,
    Tie,
}

/// Every pair of the strategies present in both, on final accuracy.
pub fn pairs(real: &[RunTrace], surrogate: &[RunTrace]) -> Vec<PairCheck> {
    let mut out = Vec::new();
    for (i, (ra, sa)) in real.iter().zip(surrogate).enumerate() {
        for (rb, sb) in real.iter().zip(surrogate).skip(i + 1) {
            let (Some(a), Some(b), Some(x), Some(y)) = (
                ra.final_accuracy,
                rb.final_accuracy,
                sa.final_accuracy,
                sb.final_accuracy,
            ) else {
                continue;
            };
            let real_se = match (ra.final_accuracy_se, rb.final_accuracy_se) {
                (Some(p), Some(q)) => Some((p * p + q * q).sqrt()),
                _ => None,
            };
            out.push(PairCheck {
                first: ra.strategy.clone(),
                second: rb.strategy.clone(),
                real: a - b,
                real_se,
                surrogate: x - y,
            });
        }
    }
    out
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// The validation table (markdown) for a real-mode comparison folder and its surrogate twin.
pub fn validate(real_dir: &Path, surrogate_dir: &Path) -> Result<String, SimError> {
    let (r, s) = (strategy_dirs(real_dir)?, strategy_dirs(surrogate_dir)?);
    let names: Vec<&String> = r.keys().filter(|k| s.contains_key(*k)).collect();
    if names.is_empty() {
        return Err(SimError::Config(format!(
            "no strategy folder (with summary.json) is in both {} and {}",
            real_dir.display(),
            surrogate_dir.display()
        )));
    }
    let mut real = Vec::new();
    let mut surr = Vec::new();
    for n in &names {
        let (a, b) = (RunTrace::load(&r[*n])?, RunTrace::load(&s[*n])?);
        if a.mode != "real" || b.mode != "surrogate" {
            return Err(SimError::Config(format!(
                "{n}: expected a real run and a surrogate run, found {} and {}",
                a.mode, b.mode
            )));
        }
        real.push(a);
        surr.push(b);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Real mode: `{}`; surrogate: `{}`.\n",
        real_dir.display(),
        surrogate_dir.display()
    );
    out.push_str("| strategy | final accuracy real (+- SE) | surrogate | fleet accuracy at s* real / surrogate | time to target real / surrogate (virtual s) | loss after local training, MAE over rounds (rounds) | loss before, MAE | panel accuracy, MAE (evaluations) |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for (a, b) in real.iter().zip(&surr) {
        let mae = |x: Option<(f64, usize)>, d: usize| {
            x.map_or_else(|| "-".into(), |(m, k)| format!("{m:.d$} ({k})"))
        };
        let ttt = |t: Option<f64>| t.map_or_else(|| "not reached".into(), |x| format!("{x:.0}"));
        let _ = writeln!(
            out,
            "| {} | {} +- {} | {} | {} / {} | {} / {} | {} | {} | {} |",
            a.strategy,
            opt(a.final_accuracy, 3),
            opt(a.final_accuracy_se, 3),
            opt(b.final_accuracy, 3),
            opt(a.fleet_accuracy, 3),
            opt(b.fleet_accuracy, 3),
            ttt(a.time_to_target_s),
            ttt(b.time_to_target_s),
            mae(curve_mae(&a.loss_post, &b.loss_post), 3),
            mae(curve_mae(&a.loss_pre, &b.loss_pre), 3),
            mae(curve_mae(&a.panel_accuracy, &b.panel_accuracy), 3),
        );
    }
    let checks = pairs(&real, &surr);
    out.push_str("\nPairs on final accuracy (first minus second):\n\n| pair | real (+- SE) | resolved by real mode (> 2 SE) | surrogate | same order |\n|---|---|---|---|---|\n");
    for c in &checks {
        let _ = writeln!(
            out,
            "| {} - {} | {:+.3} +- {} | {} | {:+.3} | {} |",
            c.first,
            c.second,
            c.real,
            opt(c.real_se, 3),
            if c.resolved() { "yes" } else { "no" },
            c.surrogate,
            match c.order() {
                Order::Same => "yes",
                Order::Opposite => "no (opposite)",
                Order::Tie => "no (surrogate: tie)",
            }
        );
    }
    let resolved: Vec<&PairCheck> = checks.iter().filter(|c| c.resolved()).collect();
    let _ = writeln!(
        out,
        "\nOrdering: the surrogate agrees on {} of {} pairs; on {} of the {} pairs real mode resolves.",
        checks.iter().filter(|c| c.agrees()).count(),
        checks.len(),
        resolved.iter().filter(|c| c.agrees()).count(),
        resolved.len()
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(name: &str, mode: &str, acc: f64, se: f64) -> RunTrace {
        RunTrace {
            strategy: name.into(),
            mode: mode.into(),
            final_accuracy: Some(acc),
            final_accuracy_se: Some(se),
            fleet_accuracy: None,
            time_to_target_s: None,
            virtual_s: 1.0,
            loss_pre: BTreeMap::new(),
            loss_post: BTreeMap::new(),
            panel_accuracy: BTreeMap::new(),
        }
    }

    #[test]
    fn pairs_are_resolved_only_beyond_two_standard_errors_and_orders_compared() {
        let real = [
            trace("a", "real", 0.80, 0.01),
            trace("b", "real", 0.70, 0.01),
            trace("c", "real", 0.71, 0.01),
        ];
        let surr = [
            trace("a", "surrogate", 0.6, 0.0),
            trace("b", "surrogate", 0.7, 0.0),
            trace("c", "surrogate", 0.5, 0.0),
        ];
        let p = pairs(&real, &surr);
        assert_eq!(p.len(), 3);
        // a - b: +0.10 real, SE 0.014: resolved; the surrogate says -0.1.
        assert!(p[0].resolved() && !p[0].agrees());
        // a - c: resolved, both positive.
        assert!(p[1].resolved() && p[1].agrees());
        // b - c: -0.01 with SE 0.014: not resolved; surrogate +0.2 disagrees.
        assert!(!p[2].resolved() && p[2].order() == Order::Opposite);
        // A surrogate that cannot tell two strategies apart does not agree with anything.
        let tied = [
            trace("a", "surrogate", 0.7, 0.0),
            trace("b", "surrogate", 0.7, 0.0),
        ];
        let p = pairs(&real[..2], &tied);
        assert_eq!(p[0].order(), Order::Tie);
        assert!(!p[0].agrees());
    }

    #[test]
    fn curve_error_uses_only_the_rounds_both_runs_have() {
        let a: BTreeMap<u64, f64> = [(1, 1.0), (2, 2.0), (3, 3.0)].into();
        let b: BTreeMap<u64, f64> = [(2, 2.5), (3, 2.0), (4, 9.0)].into();
        let (m, k) = curve_mae(&a, &b).unwrap();
        assert_eq!(k, 2);
        assert!((m - 0.75).abs() < 1e-12);
        assert!(curve_mae(&a, &BTreeMap::new()).is_none());
    }

    #[test]
    fn a_folder_without_runs_or_with_a_broken_summary_is_refused_with_its_path() {
        let tmp = tempfile::Builder::new()
            .prefix("fedspine-validate-")
            .tempdir()
            .unwrap();
        let dir = tmp.path();
        let (real, surr) = (dir.join("real"), dir.join("surr"));
        std::fs::create_dir_all(real.join("fedspine")).unwrap();
        std::fs::create_dir_all(&surr).unwrap();
        let e = validate(&real, &surr).unwrap_err().to_string();
        assert!(e.contains("no strategy folder"), "{e}");
        std::fs::write(real.join("fedspine/summary.json"), "{\"summary\": {}}").unwrap();
        std::fs::create_dir_all(surr.join("fedspine")).unwrap();
        std::fs::write(surr.join("fedspine/summary.json"), "not json").unwrap();
        let e = validate(&real, &surr).unwrap_err().to_string();
        assert!(e.contains("summary.json"), "{e}");
    }
}
