//! RMSNorm of rows and its input gradient, one pass each.
//!
//! Written with burn's operations (`x * (mean(x^2) + eps)^(-1/2) * w`), a norm is five passes
//! with their own outputs, and its backward pass under autodiff takes twice as many again (1.6
//! ms a call against 0.5 forward at 1024 x 576 on the AMX host, `-- profile`). Here each row is
//! read once forward, and once more backward, where its scale is recomputed from the row.

use rayon::prelude::*;

use super::{lane_sum, ELEMS_PER_TASK, ROWS_PER_TASK};

multiversion! {
    /// RMSNorm of each `w.len()`-long row of `x` into `out`: `x / sqrt(mean(x^2) + eps) * w`.
    fn rms_norm_rows(x: &[f32], w: &[f32], out: &mut [f32], eps: f32) {
        let d = w.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            for (o, &v) in or.iter_mut().zip(xr) {
                *o = v * v;
            }
            let r = 1.0 / (lane_sum(or) / d as f32 + eps).sqrt();
            for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
                *o = v * r * g;
            }
        }
    }
}

multiversion! {
    /// The input gradient of [`rms_norm_rows`] for the output gradient `dy`, per row: with
    /// `r = 1 / sqrt(mean(x^2) + eps)`, `dx = r w dy - x (r^3 / d) sum(x w dy)`.
    fn rms_norm_grad_rows(x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], eps: f32) {
        let d = w.len();
        for ((xr, dyr), dxr) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            for (o, &v) in dxr.iter_mut().zip(xr) {
                *o = v * v;
            }
            let r = 1.0 / (lane_sum(dxr) / d as f32 + eps).sqrt();
            for (((o, &v), &g), &e) in dxr.iter_mut().zip(xr).zip(w).zip(dyr) {
                *o = v * g * e;
            }
            let k = r * r * r / d as f32 * lane_sum(dxr);
            for (((o, &v), &g), &e) in dxr.iter_mut().zip(xr).zip(w).zip(dyr) {
                *o = r * g * e - v * k;
            }
        }
    }
}

/// [`rms_norm_rows`] over a whole buffer, row-parallel when large.
pub(crate) fn rms_norm_into(x: &[f32], w: &[f32], out: &mut [f32], eps: f32) {
    let d = w.len();
    if d == 0 {
        return;
    }
    if x.len() <= ELEMS_PER_TASK {
        return rms_norm_rows(x, w, out, eps);
    }
    let chunk = d * ROWS_PER_TASK;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, x)| rms_norm_rows(x, w, o, eps));
}

/// [`rms_norm_grad_rows`] over whole buffers, row-parallel when large.
pub(crate) fn rms_norm_grad_into(x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], eps: f32) {
    let d = w.len();
    assert!(
        x.len() == dy.len() && x.len() == dx.len() && (d == 0 || x.len().is_multiple_of(d)),
        "RMSNorm gradient of {} values against rows of {d}",
        x.len()
    );
    if d == 0 {
        return;
    }
    if x.len() <= ELEMS_PER_TASK {
        return rms_norm_grad_rows(x, w, dy, dx, eps);
    }
    let chunk = d * ROWS_PER_TASK;
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(dy.par_chunks(chunk))
        .for_each(|((o, x), e)| rms_norm_grad_rows(x, w, e, o, eps));
}
