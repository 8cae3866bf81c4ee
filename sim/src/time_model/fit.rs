//! Fitting and validating the time model: non-negative least squares on relative error, and
//! leave-one-out prediction errors for the per-operator model and the FLOPs-linear one.

use serde::Serialize;

use super::{features, total_flops, Measurement, StepKind, N_FEATURES};

/// Non-negative least squares `min |A x - b|^2, x >= 0` for a few columns, exactly: the
/// solution is the unconstrained least-squares solution on some subset of the columns with
/// every entry positive, so every subset is tried and the best feasible one kept (2^k small
/// solves; k is [`super::N_FEATURES`] here). Columns are scaled to unit norm for the solves.
pub fn nnls(a: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let k = a.first().map_or(0, Vec::len);
    let norms: Vec<f64> = (0..k)
        .map(|j| a.iter().map(|r| r[j] * r[j]).sum::<f64>().sqrt())
        .collect();
    let mut best: Option<(f64, Vec<f64>)> = None;
    for mask in 1u32..(1 << k) {
        let cols: Vec<usize> = (0..k)
            .filter(|&j| mask & (1 << j) != 0 && norms[j] > 0.0)
            .collect();
        if cols.len() != mask.count_ones() as usize || cols.len() > a.len() {
            continue;
        }
        let Some(sol) = least_squares(a, b, &cols, &norms) else {
            continue;
        };
        if sol.iter().any(|&v| v < 0.0) {
            continue;
        }
        let mut x = vec![0.0; k];
        for (&j, v) in cols.iter().zip(&sol) {
            x[j] = v / norms[j];
        }
        let res = residual(a, b, &x);
        if best.as_ref().is_none_or(|(r, _)| res < *r) {
            best = Some((res, x));
        }
    }
    best.map_or_else(|| vec![0.0; k], |(_, x)| x)
}

fn residual(a: &[Vec<f64>], b: &[f64], x: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(r, &y)| {
            let p: f64 = r.iter().zip(x).map(|(u, v)| u * v).sum();
            (p - y) * (p - y)
        })
        .sum()
}

/// Least squares on the scaled columns `cols` by the normal equations (Gaussian elimination
/// with partial pivoting); `None` when they are singular.
#[allow(clippy::needless_range_loop)] // elimination reads rows `c` and `r` of `g` at once
fn least_squares(a: &[Vec<f64>], b: &[f64], cols: &[usize], norms: &[f64]) -> Option<Vec<f64>> {
    let m = cols.len();
    let mut g = vec![vec![0.0; m + 1]; m];
    for (r, &y) in a.iter().zip(b) {
        for (i, &ci) in cols.iter().enumerate() {
            let u = r[ci] / norms[ci];
            for (j, &cj) in cols.iter().enumerate() {
                g[i][j] += u * r[cj] / norms[cj];
            }
            g[i][m] += u * y;
        }
    }
    for c in 0..m {
        let p = (c..m).max_by(|&i, &j| g[i][c].abs().total_cmp(&g[j][c].abs()))?;
        if g[p][c].abs() < 1e-12 {
            return None;
        }
        g.swap(c, p);
        for r in 0..m {
            if r != c {
                let f = g[r][c] / g[c][c];
                for j in c..=m {
                    g[r][j] -= f * g[c][j];
                }
            }
        }
    }
    Some((0..m).map(|i| g[i][m] / g[i][i]).collect())
}

/// Coefficients for points of one kind: relative-error weighting (each row divided by its
/// measured time), so a 50 ms point counts as much as a 5 s one. `in_place_below`: the
/// calibration's in-place threshold ([`super::MeasuredOn::in_place_below_rows`]).
pub(super) fn fit_points(
    points: &[&Measurement],
    in_place_below: Option<usize>,
) -> [f64; N_FEATURES] {
    let a: Vec<Vec<f64>> = points
        .iter()
        .map(|m| {
            features(&m.workload, in_place_below)
                .iter()
                .map(|x| x / m.ms)
                .collect()
        })
        .collect();
    let b = vec![1.0; points.len()];
    let x = nnls(&a, &b);
    let mut out = [0.0; N_FEATURES];
    out.copy_from_slice(&x);
    out
}

fn predict(c: &[f64; N_FEATURES], m: &Measurement, in_place_below: Option<usize>) -> f64 {
    c.iter()
        .zip(features(&m.workload, in_place_below))
        .map(|(c, x)| c * x)
        .sum()
}

/// Mean of measured over predicted plain-step time across scoring points (1 without any).
pub(super) fn scoring_factor(
    train: &[f64; N_FEATURES],
    scoring: &[&Measurement],
    in_place_below: Option<usize>,
) -> f64 {
    let r: Vec<f64> = scoring
        .iter()
        .map(|m| m.ms / predict(train, m, in_place_below))
        .filter(|r| r.is_finite() && *r > 0.0)
        .collect();
    if r.is_empty() {
        1.0
    } else {
        r.iter().sum::<f64>() / r.len() as f64
    }
}

/// The FLOPs-linear model: `t = k * FLOPs`, `k` by least squares on relative error.
fn fit_flops_linear(kind: StepKind, points: &[&Measurement]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for m in points {
        let f = total_flops(kind, &m.workload) / m.ms;
        num += f;
        den += f * f;
    }
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// Leave-one-out figures of one kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Validation {
    pub kind: StepKind,
    pub points: usize,
    /// `(measured ms, per-operator prediction, FLOPs-linear prediction)` per point, each
    /// predicted by a fit that left that point out.
    pub predictions: Vec<(f64, f64, f64)>,
}

impl Validation {
    /// Leave-one-out over the points of `kind`, measured with the in-place threshold
    /// `in_place_below`.
    pub fn leave_one_out(
        kind: StepKind,
        points: &[&Measurement],
        in_place_below: Option<usize>,
    ) -> Validation {
        let predictions = (0..points.len())
            .map(|i| {
                let rest: Vec<&Measurement> = points
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, m)| *m)
                    .collect();
                let c = fit_points(&rest, in_place_below);
                let w = &points[i].workload;
                let ours = predict(&c, points[i], in_place_below);
                let k = fit_flops_linear(kind, &rest);
                (points[i].ms, ours, k * total_flops(kind, w))
            })
            .collect();
        Validation {
            kind,
            points: points.len(),
            predictions,
        }
    }

    /// Leave-one-out over scoring steps: each predicted as the training-step fit (to every
    /// training point) times the factor of the other scoring points.
    pub fn leave_one_out_scoring(
        train: &[&Measurement],
        scoring: &[&Measurement],
        in_place_below: Option<usize>,
    ) -> Validation {
        let c = fit_points(train, in_place_below);
        let predictions = (0..scoring.len())
            .map(|i| {
                let rest: Vec<&Measurement> = scoring
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, m)| *m)
                    .collect();
                let m = scoring[i];
                let ours =
                    scoring_factor(&c, &rest, in_place_below) * predict(&c, m, in_place_below);
                let k = fit_flops_linear(StepKind::TrainScoring, &rest);
                (
                    m.ms,
                    ours,
                    k * total_flops(StepKind::TrainScoring, &m.workload),
                )
            })
            .collect();
        Validation {
            kind: StepKind::TrainScoring,
            points: scoring.len(),
            predictions,
        }
    }

    fn errors(&self, pick: impl Fn(&(f64, f64, f64)) -> f64) -> Vec<f64> {
        self.predictions
            .iter()
            .map(|p| (pick(p) / p.0 - 1.0).abs())
            .collect()
    }

    /// Largest and mean absolute relative error of the per-operator model.
    pub fn ours(&self) -> (f64, f64) {
        max_mean(&self.errors(|p| p.1))
    }

    /// The same for the FLOPs-linear model.
    pub fn flops_linear(&self) -> (f64, f64) {
        max_mean(&self.errors(|p| p.2))
    }
}

fn max_mean(e: &[f64]) -> (f64, f64) {
    let max = e.iter().copied().fold(0.0, f64::max);
    let mean = if e.is_empty() {
        0.0
    } else {
        e.iter().sum::<f64>() / e.len() as f64
    };
    (max, mean)
}
