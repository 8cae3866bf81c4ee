//! Small statistics for comparisons over seeds: means, quantiles, seeded percentile-bootstrap
//! intervals of a mean (and so of paired differences), and the standard error of an accuracy
//! from its effective sample size.
//!
//! The bootstrap is seeded by the caller's generator, so the same samples and seed give the
//! same interval bit for bit.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Resamples of the comparison report's bootstrap.
pub const RESAMPLES: usize = 10_000;

/// A mean with its two-sided percentile-bootstrap interval over `n` values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
}

/// Arithmetic mean (`None` for no values).
pub fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Quantile `q` in `[0, 1]` of ascending `sorted` values, linear between order statistics
/// (Hyndman and Fan's type 7, the default of R and numpy). `None` for no values.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let h = q.clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

/// The mean of `xs` with a `level` (e.g. 0.95) percentile-bootstrap interval from `resamples`
/// resamples drawn with `rng`. One value gives a zero-width interval; no values (or a
/// non-finite one) give `None`.
pub fn bootstrap_mean(
    xs: &[f64],
    level: f64,
    resamples: usize,
    rng: &mut ChaCha8Rng,
) -> Option<Interval> {
    if xs.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let m = mean(xs)?;
    let n = xs.len();
    let mut means = Vec::with_capacity(resamples.max(1));
    for _ in 0..resamples.max(1) {
        let mut sum = 0.0;
        for _ in 0..n {
            sum += xs[rng.random_range(0..n)];
        }
        means.push(sum / n as f64);
    }
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - level.clamp(0.0, 1.0)) / 2.0;
    Some(Interval {
        mean: m,
        lo: quantile(&means, tail)?,
        hi: quantile(&means, 1.0 - tail)?,
        n,
    })
}

/// `a[i] - b[i]` for every index where both are present (pairs of one seed).
pub fn paired_differences(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter_map(|(x, y)| Some((*x)? - (*y)?))
        .collect()
}

/// Standard error of a mean accuracy `p` over `n_eff` independent items (`sqrt(p (1 - p) /
/// n_eff)`). Items every model is scored on count once: averaging many models over the same
/// items does not shrink the error below this.
pub fn accuracy_se(p: f64, n_eff: usize) -> Option<f64> {
    (n_eff > 0 && (0.0..=1.0).contains(&p)).then(|| (p * (1.0 - p) / n_eff as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(5)
    }

    #[test]
    fn quantiles_follow_type_seven() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), Some(2.5));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 1.0), Some(4.0));
        assert!((quantile(&v, 0.25).unwrap() - 1.75).abs() < 1e-12);
        assert_eq!(quantile(&[7.0], 0.3), Some(7.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn a_constant_sample_has_a_zero_width_interval() {
        let i = bootstrap_mean(&[0.7; 5], 0.95, 1000, &mut rng()).unwrap();
        assert_eq!((i.mean, i.lo, i.hi, i.n), (0.7, 0.7, 0.7, 5));
        let one = bootstrap_mean(&[3.0], 0.95, 100, &mut rng()).unwrap();
        assert_eq!((one.lo, one.hi), (3.0, 3.0));
        assert!(bootstrap_mean(&[], 0.95, 100, &mut rng()).is_none());
        assert!(bootstrap_mean(&[1.0, f64::NAN], 0.95, 100, &mut rng()).is_none());
    }

    #[test]
    fn two_values_give_the_exact_resampling_distribution() {
        // Resampled means of {0, 1} are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5%
        // and 97.5% quantiles are 0 and 1.
        let i = bootstrap_mean(&[0.0, 1.0], 0.95, RESAMPLES, &mut rng()).unwrap();
        assert_eq!((i.mean, i.lo, i.hi), (0.5, 0.0, 1.0));
        // At 40% the interval is [0.5, 0.5]: 30% and 70% quantiles fall in the middle mass.
        let j = bootstrap_mean(&[0.0, 1.0], 0.4, RESAMPLES, &mut rng()).unwrap();
        assert_eq!((j.lo, j.hi), (0.5, 0.5));
    }

    #[test]
    fn a_large_sample_matches_the_normal_interval() {
        // 100 values, half 0 and half 1: standard error 0.05, so about 0.5 +- 1.96 x 0.05.
        let xs: Vec<f64> = (0..100).map(|i| (i % 2) as f64).collect();
        let i = bootstrap_mean(&xs, 0.95, RESAMPLES, &mut rng()).unwrap();
        assert!((i.lo - 0.402).abs() < 0.015, "{i:?}");
        assert!((i.hi - 0.598).abs() < 0.015, "{i:?}");
        // The same seed gives the same interval.
        assert_eq!(bootstrap_mean(&xs, 0.95, RESAMPLES, &mut rng()).unwrap(), i);
        // Evenly spread values on [0, 1]: sd 0.2916, standard error 0.0292, so 0.5 +- 0.057;
        // another seed moves the ends a little.
        let ys: Vec<f64> = (0..100).map(|i| i as f64 / 99.0).collect();
        let j = bootstrap_mean(&ys, 0.95, RESAMPLES, &mut rng()).unwrap();
        assert!((j.lo - 0.443).abs() < 0.01, "{j:?}");
        assert!((j.hi - 0.557).abs() < 0.01, "{j:?}");
        let k = bootstrap_mean(&ys, 0.95, RESAMPLES, &mut ChaCha8Rng::seed_from_u64(6)).unwrap();
        assert_ne!((k.lo, k.hi), (j.lo, j.hi));
    }

    #[test]
    fn paired_differences_skip_missing_pairs() {
        let d = paired_differences(&[Some(3.0), None, Some(5.0)], &[Some(1.0), Some(2.0), None]);
        assert_eq!(d, vec![2.0]);
    }

    #[test]
    fn accuracy_standard_error_from_items() {
        // 400 items at 0.5: 0.025; at 0.9: 0.015.
        assert!((accuracy_se(0.5, 400).unwrap() - 0.025).abs() < 1e-12);
        assert!((accuracy_se(0.9, 400).unwrap() - 0.015).abs() < 1e-12);
        assert_eq!(accuracy_se(0.5, 0), None);
        // The case: 24 items at 0.83 give about 7.7 points.
        assert!((accuracy_se(0.83, 24).unwrap() - 0.0767).abs() < 1e-3);
    }
}
