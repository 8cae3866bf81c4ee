//! Random draws of the simulator beyond uniforms: truncated normal (per-round speed),
//! exponential (churn durations), gamma and Dirichlet (label skew), all from a caller's
//! `ChaCha8Rng` so a seed fixes the whole run.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub use bandit::sampling::standard_normal;

/// A normal draw with `mean` and standard deviation `sd`, truncated to `mean +- 2 sd`
/// (rejection sampling; `sd == 0` returns `mean` without consuming randomness).
pub fn truncated_normal(mean: f64, sd: f64, rng: &mut ChaCha8Rng) -> f64 {
    if sd <= 0.0 {
        return mean;
    }
    loop {
        let z = standard_normal(rng);
        if z.abs() <= 2.0 {
            return mean + sd * z;
        }
    }
}

/// An exponential draw with the given mean.
pub fn exponential(mean: f64, rng: &mut ChaCha8Rng) -> f64 {
    let u: f64 = rng.random();
    -mean * (1.0 - u).ln()
}

/// A Gamma(shape, 1) draw (Marsaglia-Tsang; shape < 1 through the `U^(1/shape)` boost).
pub fn gamma(shape: f64, rng: &mut ChaCha8Rng) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random();
        return gamma(shape + 1.0, rng) * (1.0 - u).powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if (1.0 - u).ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A Dirichlet(alpha, ..., alpha) draw over `n` categories.
pub fn dirichlet(alpha: f64, n: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let g: Vec<f64> = (0..n).map(|_| gamma(alpha, rng).max(1e-300)).collect();
    let s: f64 = g.iter().sum();
    g.into_iter().map(|x| x / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn draws_have_the_right_moments() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 20_000;
        let t: Vec<f64> = (0..n)
            .map(|_| truncated_normal(1.0, 0.1, &mut rng))
            .collect();
        assert!(t.iter().all(|x| (0.8..=1.2).contains(x)));
        let mean = t.iter().sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.005);
        for shape in [0.3, 1.0, 4.0] {
            let m = (0..n).map(|_| gamma(shape, &mut rng)).sum::<f64>() / n as f64;
            assert!((m / shape - 1.0).abs() < 0.05, "gamma({shape}) mean {m}");
        }
        let e = (0..n).map(|_| exponential(3.0, &mut rng)).sum::<f64>() / n as f64;
        assert!((e / 3.0 - 1.0).abs() < 0.05);
        let d = dirichlet(0.5, 5, &mut rng);
        assert!((d.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
