//! Fitting the surrogate's loss-response parameters from real runs' `rounds.jsonl` files (see
//! the parent module's docs for the model and the estimation steps).

use std::path::Path;

use serde::Deserialize;

use super::SurrogateParams;
use crate::error::SimError;

/// The part of a `rounds.jsonl` line the fit reads.
#[derive(Debug, Clone, Deserialize)]
struct FitRound {
    aggregated: bool,
    plays: Vec<FitPlay>,
    eval: Option<FitEval>,
}

#[derive(Debug, Clone, Deserialize)]
struct FitPlay {
    rank: u32,
    outcome: String,
    loss_pre: Option<f64>,
    loss_post: Option<f64>,
    sparsity_prev: Option<f64>,
    sparsity: Option<f64>,
    delta_norm: Option<f64>,
    steps: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
struct FitEval {
    loss: f64,
    accuracy: f64,
    perplexity: Option<f64>,
}

/// One accepted update for the fit.
#[derive(Debug, Clone, Copy)]
struct Obs {
    s_prev: f64,
    s_new: f64,
    rank: f64,
    steps: f64,
    pre: f64,
    post: f64,
    norm: f64,
}

/// Fit parameters from real runs' `rounds.jsonl` files (see the module docs).
pub fn fit(files: &[&Path]) -> Result<SurrogateParams, SimError> {
    let mut runs: Vec<Vec<(bool, Vec<Obs>)>> = Vec::new();
    let mut evals: Vec<(f64, f64)> = Vec::new();
    let mut perplexity = false;
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| SimError::io(*f, e))?;
        let mut run = Vec::new();
        for (k, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let r: FitRound = serde_json::from_str(line)
                .map_err(|e| SimError::Surrogate(format!("{}:{}: {e}", f.display(), k + 1)))?;
            if let Some(e) = &r.eval {
                evals.push((e.loss, e.accuracy));
                perplexity |= e.perplexity.is_some();
            }
            let obs: Vec<Obs> = r
                .plays
                .iter()
                .filter(|p| p.outcome == "accepted")
                .filter_map(|p| {
                    Some(Obs {
                        s_prev: p.sparsity_prev?,
                        s_new: p.sparsity?,
                        rank: p.rank as f64,
                        steps: p.steps? as f64,
                        pre: p.loss_pre?,
                        post: p.loss_post?,
                        norm: p.delta_norm.unwrap_or(0.0),
                    })
                })
                .collect();
            if !obs.is_empty() {
                run.push((r.aggregated, obs));
            }
        }
        if !run.is_empty() {
            runs.push(run);
        }
    }
    let n_obs: usize = runs.iter().flatten().map(|(_, o)| o.len()).sum();
    if n_obs < 4 {
        return Err(SimError::Surrogate(format!(
            "only {n_obs} accepted updates in the files; need at least 4"
        )));
    }
    // 1. Sparsity penalty: within-round regression of losses on sparsity.
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (_, obs) in runs.iter().flatten() {
        type Get = fn(&Obs) -> f64;
        let pairs: [(Get, Get); 2] = [(|o| o.s_prev, |o| o.pre), (|o| o.s_new, |o| o.post)];
        for (get_s, get_l) in pairs {
            let n = obs.len() as f64;
            let ms = obs.iter().map(get_s).sum::<f64>() / n;
            let ml = obs.iter().map(get_l).sum::<f64>() / n;
            for o in obs {
                sxy += (get_s(o) - ms) * (get_l(o) - ml);
                sxx += (get_s(o) - ms).powi(2);
            }
        }
    }
    let beta = if sxx > 1e-9 {
        (sxy / sxx).clamp(0.0, 10.0)
    } else {
        0.0
    };
    // Per-round means of sparsity-corrected pre-round losses.
    let round_pre =
        |obs: &[Obs]| obs.iter().map(|o| o.pre - beta * o.s_prev).sum::<f64>() / obs.len() as f64;
    let min_post = runs
        .iter()
        .flatten()
        .flat_map(|(_, o)| o.iter().map(|x| x.post - beta * x.s_new))
        .fold(f64::INFINITY, f64::min);
    let max_pre = runs
        .iter()
        .flatten()
        .map(|(_, o)| round_pre(o))
        .fold(f64::NEG_INFINITY, f64::max);
    // 2. Grid search: floor, local rate, rank half-point on post-round losses.
    let mut best: Option<(f64, f64, f64, f64)> = None;
    let floors: Vec<f64> = (0..40)
        .map(|k| min_post.max(0.0) * k as f64 / 40.0)
        .collect();
    let rates: Vec<f64> = (0..48)
        .map(|k| 10f64.powf(-4.0 + 4.0 * k as f64 / 47.0))
        .collect();
    let halves = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
    for &floor in &floors {
        for &rate in &rates {
            for &half in &halves {
                let mut sse = 0.0;
                for (_, obs) in runs.iter().flatten() {
                    let g = (round_pre(obs) - floor).max(1e-6);
                    for o in obs {
                        let phi = 1.0 - (-rate * o.steps * o.rank / (o.rank + half)).exp();
                        let pred = floor + (1.0 - phi) * g;
                        sse += (o.post - beta * o.s_new - pred).powi(2);
                    }
                }
                if best.is_none_or(|b| sse < b.0) {
                    best = Some((sse, floor, rate, half));
                }
            }
        }
    }
    let (sse, floor, rate, half) = best.expect("non-empty grid");
    let phi = |o: &Obs| 1.0 - (-rate * o.steps * o.rank / (o.rank + half)).exp();
    // 3. Carry-over: G_{t+1} / G_t = 1 - carry * mean phi_t over aggregated rounds.
    let (mut num, mut den) = (0.0, 0.0);
    for run in &runs {
        for w in run.windows(2) {
            let (agg, obs) = (&w[0].0, &w[0].1);
            if !agg {
                continue;
            }
            let g0 = round_pre(obs) - floor;
            let g1 = round_pre(&w[1].1) - floor;
            if g0 <= 1e-6 {
                continue;
            }
            let m = obs.iter().map(phi).sum::<f64>() / obs.len() as f64;
            num += m * (1.0 - g1 / g0);
            den += m * m;
        }
    }
    let carry = if den > 0.0 {
        (num / den).clamp(0.0, 1.0)
    } else {
        0.5
    };
    let first = runs
        .iter()
        .filter_map(|r| r.first())
        .map(|(_, o)| round_pre(o))
        .sum::<f64>()
        / runs.len() as f64;
    // 4. Spreads: device offsets from the within-round spread of pre-round losses; round noise
    // from what the post-round fit leaves beyond that.
    let (mut dev_ss, mut dev_n) = (0.0, 0usize);
    for (_, obs) in runs.iter().flatten() {
        let m = round_pre(obs);
        for o in obs {
            dev_ss += (o.pre - beta * o.s_prev - m).powi(2);
            dev_n += 1;
        }
    }
    let device_sd = (dev_ss / dev_n.max(1) as f64).sqrt();
    let resid_sd = (sse / n_obs as f64).sqrt();
    let noise_sd = (resid_sd.powi(2) - device_sd.powi(2))
        .max(0.0)
        .sqrt()
        .max(0.1 * device_sd);
    // 5. Accuracy line from the panel evaluations.
    let (a, b) = if evals.len() >= 2 {
        let n = evals.len() as f64;
        let mx = evals.iter().map(|e| e.0).sum::<f64>() / n;
        let my = evals.iter().map(|e| e.1).sum::<f64>() / n;
        let sxx: f64 = evals.iter().map(|e| (e.0 - mx).powi(2)).sum();
        let sxy: f64 = evals.iter().map(|e| (e.0 - mx) * (e.1 - my)).sum();
        let b = if sxx > 1e-12 { sxy / sxx } else { 0.0 };
        (my - b * mx, b)
    } else {
        (evals.first().map_or(0.5, |e| e.1), 0.0)
    };
    // 6. Update norm per unit of gain (ratio of sums: robust to tiny gains).
    let (mut norms, mut gains) = (0.0, 0.0);
    for (_, obs) in runs.iter().flatten() {
        let g = (round_pre(obs) - floor).max(1e-6);
        for o in obs.iter().filter(|o| o.norm > 0.0) {
            norms += o.norm;
            gains += phi(o) * g;
        }
    }
    let params = SurrogateParams {
        source: format!(
            "fitted from {} file(s), {} accepted updates, {} evaluations; post-round loss RMSE {:.3}",
            files.len(),
            n_obs,
            evals.len(),
            resid_sd
        ),
        loss_initial: first.max(floor + 1e-3).min(max_pre.max(first)),
        loss_floor: floor,
        local_rate: rate,
        rank_half: half,
        sparsity_penalty: beta,
        carry,
        device_sd,
        noise_sd,
        accuracy_intercept: a,
        accuracy_slope: b,
        norm_per_gain: if gains > 1e-9 { norms / gains } else { 1.0 },
        perplexity,
    };
    params.validate().map_err(SimError::Surrogate)?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn the_fit_recovers_parameters_of_generated_rounds() {
        // Rounds generated by the model itself, without noise.
        let truth = SurrogateParams {
            source: String::new(),
            loss_initial: 3.0,
            loss_floor: 1.5,
            local_rate: 0.02,
            rank_half: 8.0,
            sparsity_penalty: 0.8,
            carry: 0.6,
            device_sd: 0.0,
            noise_sd: 0.0,
            accuracy_intercept: 0.9,
            accuracy_slope: -0.2,
            norm_per_gain: 2.0,
            perplexity: true,
        };
        let mut gap = truth.loss_initial - truth.loss_floor;
        let mut lines = String::new();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for round in 1..=12u64 {
            let mut plays = Vec::new();
            let mut phis = Vec::new();
            for _ in 0..6 {
                let rank = [4u32, 8, 16, 32][rng.random_range(0..4)];
                let s_prev: f64 = rng.random::<f64>() * 0.3;
                let s_new = s_prev + rng.random::<f64>() * 0.2;
                let phi = truth.phi(rank as f64, 10.0);
                phis.push(phi);
                let pre = truth.loss_floor + gap + truth.sparsity_penalty * s_prev;
                let post = truth.loss_floor + (1.0 - phi) * gap + truth.sparsity_penalty * s_new;
                plays.push(serde_json::json!({"rank": rank, "outcome": "accepted", "loss_pre": pre, "loss_post": post, "sparsity_prev": s_prev, "sparsity": s_new, "delta_norm": 2.0 * phi * gap, "steps": 10}));
            }
            let eval_loss = truth.loss_floor + gap;
            lines.push_str(&serde_json::json!({"round": round, "aggregated": true, "plays": plays, "eval": {"loss": eval_loss, "accuracy": truth.accuracy(eval_loss), "perplexity": eval_loss.exp()}}).to_string());
            lines.push('\n');
            gap *= 1.0 - truth.carry * phis.iter().sum::<f64>() / phis.len() as f64;
        }
        let dir = std::env::temp_dir().join(format!("fedspine-sim-fit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rounds.jsonl");
        std::fs::write(&path, lines).unwrap();
        let got = fit(&[path.as_path()]).unwrap();
        assert!((got.sparsity_penalty - 0.8).abs() < 0.05, "{got:?}");
        assert!((got.loss_initial - 3.0).abs() < 0.1, "{got:?}");
        assert!((got.carry - 0.6).abs() < 0.15, "{got:?}");
        assert!((got.accuracy_slope + 0.2).abs() < 0.01, "{got:?}");
        assert!(got.perplexity);
        // The fitted model predicts the post-round loss of a rank-16 round within 5%.
        let g = 1.5;
        let want = 1.5 + (1.0 - truth.phi(16.0, 10.0)) * g;
        let pred = got.loss_floor
            + (1.0 - got.phi(16.0, 10.0))
                * (got.loss_floor + g - got.loss_floor - (got.loss_floor - 1.5));
        assert!((pred / want - 1.0).abs() < 0.05, "{pred} vs {want}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
