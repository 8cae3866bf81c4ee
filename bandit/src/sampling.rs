//! Random draws the crate needs beyond uniforms (standard normal, Student-t, symmetric Pareto), all from a caller's `ChaCha8Rng`.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A standard normal draw (Box-Muller; always consumes exactly two uniforms).
pub fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random();
    let u2: f64 = rng.random();
    // 1 - u1 lies in (0, 1], so the logarithm is finite.
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Student-t draw with `dof` degrees of freedom (`Z / sqrt(chi2_dof / dof)`; consumes
/// `2 * (dof + 1)` uniforms).
pub fn student_t(dof: u32, rng: &mut ChaCha8Rng) -> f64 {
    let z = standard_normal(rng);
    let dof = dof.max(1);
    let chi2: f64 = (0..dof).map(|_| standard_normal(rng).powi(2)).sum();
    z / (chi2 / dof as f64).sqrt().max(f64::MIN_POSITIVE)
}

/// A symmetric heavy-tailed draw with Pareto tails of index `alpha`: a random sign times
/// `U^(-1/alpha) - 1`, so it has median 0 and `P(|X| > x) = (1 + x)^-alpha` (consumes two
/// uniforms).
pub fn symmetric_pareto(alpha: f64, rng: &mut ChaCha8Rng) -> f64 {
    let u: f64 = rng.random();
    let sign: f64 = if rng.random::<f64>() < 0.5 { -1.0 } else { 1.0 };
    sign * ((1.0 - u).powf(-1.0 / alpha) - 1.0)
}
