//! Fitting the surrogate from recorded device-rounds (`device_rounds.jsonl`, see
//! [`crate::device_rounds`]). Per device-round `i` (loss before `L_i`, sparsity before and after
//! `s_i`, `s'_i`, rank `r_i`, steps `S_i`):
//!
//! ```text
//! g_i       = L_i - loss_floor - sparsity_penalty * s_i                  the device's gap
//! phi_i     = 1 - exp(-local_rate * S_i * r_i / (r_i + rank_half))
//! dL_i      = -phi_i * g_i + sparsity_penalty * (s'_i - s_i)             predicted loss change
//! acc_i     = clamp(accuracy_intercept + accuracy_slope * (L_i + dL_i), 0, 1)
//! ```
//!
//! The floor, rate and rank half-point are found by a grid search refined by a pattern search
//! on the squared error of `dL`; for each candidate the sparsity penalty has a closed form
//! (least squares through the origin, clamped to [0, 10]). The accuracy line is least squares
//! over every (loss, accuracy) pair before and after. The noise is the residual spread of `dL`
//! over sqrt 2 (the surrogate draws noise for the loss before and after); the device spread is
//! the within-round spread of sparsity-corrected losses before; the carry-over is the
//! round-to-round decay of a run's mean gap against its mean `phi` (through the origin); the
//! starting loss is the first round's mean; the norm per gain is `sum |dW| / sum phi_i g_i`.
//!
//! Validation: a seeded split holds out a share of the device-rounds; the model fitted on the
//! rest predicts their loss change and accuracy after, beside the training mean as a baseline.
//! The shipped parameters are then refitted on every device-round.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Provenance, SurrogateParams, Validation};
use crate::device_rounds::{self, DeviceRound};
use crate::error::SimError;

/// How to fit and what to record about it.
#[derive(Debug, Clone, PartialEq)]
pub struct FitOptions {
    /// Seed of the train / held-out split.
    pub split_seed: u64,
    /// Share of device-rounds held out, in (0, 1).
    pub holdout: f64,
    /// The command line, for the provenance.
    pub command: String,
    /// UTC date of the fit, for the provenance.
    pub date: String,
}

/// Read the datasets, validate on a held-out split, refit on everything, and attach the
/// provenance and validation figures.
pub fn fit_device_rounds(
    paths: &[PathBuf],
    opts: &FitOptions,
) -> Result<SurrogateParams, SimError> {
    if !(opts.holdout > 0.0 && opts.holdout < 1.0) {
        return Err(SimError::Surrogate(format!(
            "holdout share {} must be in (0, 1)",
            opts.holdout
        )));
    }
    let (rounds, inputs) = device_rounds::read(paths)?;
    let workloads: Vec<&str> = {
        let mut w: Vec<&str> = rounds.iter().map(|r| r.workload.as_str()).collect();
        w.sort_unstable();
        w.dedup();
        w
    };
    if workloads.len() > 1 {
        return Err(SimError::Surrogate(format!(
            "the device-rounds mix workloads ({}); fit one workload at a time",
            workloads.join(", ")
        )));
    }
    let workload = workloads.first().copied().unwrap_or("").to_string();
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(opts.split_seed));
    let n_hold = ((rounds.len() as f64 * opts.holdout).round() as usize).clamp(1, rounds.len());
    let (hold_idx, train_idx) = order.split_at(n_hold);
    let pick = |idx: &[usize]| -> Vec<DeviceRound> {
        let mut v: Vec<DeviceRound> = idx.iter().map(|&i| rounds[i].clone()).collect();
        v.sort_by_key(|r| (r.seed, r.round, r.device));
        v
    };
    let (train, hold) = (pick(train_idx), pick(hold_idx));
    let on_train = fit_slice(&train, &workload)?;
    let validation = validate(&on_train, &train, &hold, opts);
    let mut params = fit_slice(&rounds, &workload)?;
    params.source = format!(
        "fitted by sim fit-surrogate to {} recorded {workload} device-rounds",
        rounds.len()
    );
    params.provenance = Some(Provenance {
        command: opts.command.clone(),
        date: opts.date.clone(),
        workload,
        device_rounds: rounds.len() as u64,
        inputs,
    });
    params.validation = Some(validation);
    Ok(params)
}

/// Predicted (loss change, accuracy after) of device-round `r` under `p`.
pub fn predict(p: &SurrogateParams, r: &DeviceRound) -> (f64, f64) {
    let phi = p.phi(r.rank as f64, r.steps as f64);
    let g = r.loss_before - p.loss_floor - p.sparsity_penalty * r.sparsity_before;
    let dl = -phi * g + p.sparsity_penalty * (r.sparsity_after - r.sparsity_before);
    (dl, p.accuracy(r.loss_before + dl))
}

fn validate(
    p: &SurrogateParams,
    train: &[DeviceRound],
    hold: &[DeviceRound],
    opts: &FitOptions,
) -> Validation {
    let n = train.len().max(1) as f64;
    let mean_dl = train
        .iter()
        .map(|r| r.loss_after - r.loss_before)
        .sum::<f64>()
        / n;
    let mean_acc = train.iter().map(|r| r.accuracy_after).sum::<f64>() / n;
    let m = hold.len().max(1) as f64;
    let (mut e_dl, mut b_dl, mut e_acc, mut b_acc) = (0.0, 0.0, 0.0, 0.0);
    for r in hold {
        let (dl, acc) = predict(p, r);
        let real = r.loss_after - r.loss_before;
        e_dl += (dl - real).abs();
        b_dl += (mean_dl - real).abs();
        e_acc += (acc - r.accuracy_after).abs();
        b_acc += (mean_acc - r.accuracy_after).abs();
    }
    Validation {
        split_seed: opts.split_seed,
        holdout_fraction: opts.holdout,
        train_device_rounds: train.len() as u64,
        holdout_device_rounds: hold.len() as u64,
        loss_change_mae: e_dl / m,
        loss_change_mae_baseline: b_dl / m,
        accuracy_mae: e_acc / m,
        accuracy_mae_baseline: b_acc / m,
    }
}

/// Squared error of the loss change under (floor, rate, half), with the sparsity penalty in
/// closed form; returns (sse, penalty).
fn sse_at(rounds: &[DeviceRound], floor: f64, rate: f64, half: f64) -> (f64, f64) {
    let phi = |r: &DeviceRound| {
        let k = r.rank as f64;
        1.0 - (-rate * r.steps as f64 * k / (k + half)).exp()
    };
    // dL + phi (L - floor) = beta (phi s + (s' - s)).
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for r in rounds {
        let f = phi(r);
        let y = r.loss_after - r.loss_before + f * (r.loss_before - floor);
        let x = f * r.sparsity_before + (r.sparsity_after - r.sparsity_before);
        sxy += x * y;
        sxx += x * x;
    }
    let beta = if sxx > 1e-12 {
        (sxy / sxx).clamp(0.0, 10.0)
    } else {
        0.0
    };
    let sse = rounds
        .iter()
        .map(|r| {
            let f = phi(r);
            let g = r.loss_before - floor - beta * r.sparsity_before;
            let pred = -f * g + beta * (r.sparsity_after - r.sparsity_before);
            (r.loss_after - r.loss_before - pred).powi(2)
        })
        .sum();
    (sse, beta)
}

/// Fit the loss and accuracy response to `rounds` (see the module docs).
pub fn fit_slice(rounds: &[DeviceRound], workload: &str) -> Result<SurrogateParams, SimError> {
    if rounds.len() < 8 {
        return Err(SimError::Surrogate(format!(
            "only {} device-rounds; need at least 8",
            rounds.len()
        )));
    }
    let min_before = rounds
        .iter()
        .map(|r| r.loss_before)
        .fold(f64::INFINITY, f64::min);
    let min_after = rounds
        .iter()
        .map(|r| r.loss_after)
        .fold(f64::INFINITY, f64::min);
    let floor_max = min_before.min(min_after).max(0.0);
    // Coarse grid: floor, log10 rate, log2 (1 + half).
    let mut best = (f64::INFINITY, 0.0, -2.0, 3.0);
    for fi in 0..=24 {
        let floor = floor_max * fi as f64 / 24.0;
        for ri in 0..=40 {
            let lr = -4.0 + 4.0 * ri as f64 / 40.0;
            for hi in 0..=8 {
                let lh = hi as f64;
                let (sse, _) = sse_at(rounds, floor, 10f64.powf(lr), lh.exp2() - 1.0);
                if sse < best.0 {
                    best = (sse, floor, lr, lh);
                }
            }
        }
    }
    // Pattern search around the best grid point.
    let (mut sse, mut floor, mut lr, mut lh) = best;
    let mut steps = [floor_max / 24.0, 0.1, 1.0];
    for _ in 0..200 {
        let mut improved = false;
        for d in 0..3 {
            for sign in [-1.0, 1.0] {
                let mut c = [floor, lr, lh];
                c[d] += sign * steps[d];
                c[0] = c[0].clamp(0.0, floor_max);
                c[1] = c[1].clamp(-6.0, 1.0);
                c[2] = c[2].clamp(0.0, 10.0);
                let (s, _) = sse_at(rounds, c[0], 10f64.powf(c[1]), c[2].exp2() - 1.0);
                if s < sse - 1e-15 {
                    (sse, floor, lr, lh) = (s, c[0], c[1], c[2]);
                    improved = true;
                }
            }
        }
        if !improved {
            steps.iter_mut().for_each(|s| *s *= 0.5);
            if steps[1] < 1e-5 {
                break;
            }
        }
    }
    let (rate, half) = (10f64.powf(lr), lh.exp2() - 1.0);
    let (_, beta) = sse_at(rounds, floor, rate, half);
    let n = rounds.len() as f64;
    let phi = |r: &DeviceRound| {
        let k = r.rank as f64;
        1.0 - (-rate * r.steps as f64 * k / (k + half)).exp()
    };
    let corrected = |r: &DeviceRound| r.loss_before - beta * r.sparsity_before;
    // Rounds of each run: (seed, strategy) -> round -> device-rounds.
    let mut runs: BTreeMap<(u64, &str), BTreeMap<u64, Vec<&DeviceRound>>> = BTreeMap::new();
    for r in rounds {
        runs.entry((r.seed, r.strategy.as_str()))
            .or_default()
            .entry(r.round)
            .or_default()
            .push(r);
    }
    let mean = |v: &[&DeviceRound], f: &dyn Fn(&DeviceRound) -> f64| {
        v.iter().map(|r| f(r)).sum::<f64>() / v.len().max(1) as f64
    };
    let (mut dev_ss, mut dev_n) = (0.0, 0usize);
    let (mut num, mut den) = (0.0, 0.0);
    let mut firsts = Vec::new();
    for by_round in runs.values() {
        if let Some(first) = by_round.values().next() {
            firsts.push(mean(first, &corrected));
        }
        for v in by_round.values().filter(|v| v.len() >= 2) {
            let m = mean(v, &corrected);
            dev_ss += v.iter().map(|r| (corrected(r) - m).powi(2)).sum::<f64>();
            dev_n += v.len() - 1;
        }
        let rs: Vec<(&u64, &Vec<&DeviceRound>)> = by_round.iter().collect();
        for w in rs.windows(2) {
            let ((t0, v0), (t1, v1)) = (w[0], w[1]);
            if *t1 != *t0 + 1 {
                continue;
            }
            let g0 = mean(v0, &corrected) - floor;
            let g1 = mean(v1, &corrected) - floor;
            if g0 <= 1e-6 {
                continue;
            }
            let m = mean(v0, &phi);
            num += m * (1.0 - g1 / g0);
            den += m * m;
        }
    }
    let carry = if den > 1e-12 {
        (num / den).clamp(0.0, 1.0)
    } else {
        0.5
    };
    let device_sd = if dev_n > 0 {
        (dev_ss / dev_n as f64).sqrt()
    } else {
        0.0
    };
    let noise_sd = (sse / n).sqrt() / std::f64::consts::SQRT_2;
    let first = firsts.iter().sum::<f64>() / firsts.len().max(1) as f64;
    let loss_initial = first.max(floor + 1e-3);
    // Accuracy line over every (loss, accuracy) pair, before and after (on the spam data this
    // validates better than the post-round pairs alone: 0.229 against 0.257 held-out MAE).
    let pairs: Vec<(f64, f64)> = rounds
        .iter()
        .flat_map(|r| {
            [
                (r.loss_before, r.accuracy_before),
                (r.loss_after, r.accuracy_after),
            ]
        })
        .collect();
    let m = pairs.len() as f64;
    let mx = pairs.iter().map(|p| p.0).sum::<f64>() / m;
    let my = pairs.iter().map(|p| p.1).sum::<f64>() / m;
    let sxx: f64 = pairs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pairs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 1e-12 { sxy / sxx } else { 0.0 };
    let (mut norms, mut gains) = (0.0, 0.0);
    for r in rounds {
        norms += r.update_norm;
        gains += phi(r) * (corrected(r) - floor).max(0.0);
    }
    let params = SurrogateParams {
        source: format!("fitted to {} device-rounds", rounds.len()),
        loss_initial,
        loss_floor: floor,
        local_rate: rate,
        rank_half: half,
        sparsity_penalty: beta,
        carry,
        device_sd,
        noise_sd,
        accuracy_intercept: my - slope * mx,
        accuracy_slope: slope,
        norm_per_gain: if gains > 1e-9 { norms / gains } else { 1.0 },
        perplexity: workload != "spam",
        provenance: None,
        validation: None,
    };
    params.validate().map_err(SimError::Surrogate)?;
    Ok(params)
}
