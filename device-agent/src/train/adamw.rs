//! The optimiser: Adam with bias correction on the adapter's factors, after clipping the
//! global gradient norm; with `weight_decay > 0` it is AdamW (Loshchilov and Hutter's
//! decoupled decay, `w -= lr * weight_decay * w` beside the Adam step, not an L2 term in the
//! gradient). The default weight decay is 0: plain Adam.

use burn::tensor::Tensor;

use super::TrainConfig;
use crate::lora::Adapter;

/// What the optimiser of `cfg` is, for logs and reports: `Adam`, or
/// `AdamW(weight_decay=...)`.
pub fn optimiser_name(cfg: &TrainConfig) -> String {
    if cfg.weight_decay > 0.0 {
        format!("AdamW(weight_decay={})", cfg.weight_decay)
    } else {
        "Adam".to_string()
    }
}

/// Why a weight decay cannot be used with learning rate `lr`, if it cannot: it must be
/// finite, at least 0, and `lr * weight_decay < 1` (else one step flips or zeroes weights).
pub fn check_weight_decay(weight_decay: f64, lr: f64) -> Result<(), String> {
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        return Err(format!(
            "weight decay {weight_decay} is not a finite number at least 0"
        ));
    }
    if lr * weight_decay >= 1.0 {
        return Err(format!(
            "weight decay {weight_decay} times learning rate {lr} is at least 1"
        ));
    }
    Ok(())
}

/// Clip `grads` (one per factor, in the order `blocks -> projections -> (a, b)`) to the global
/// norm `cfg.clip_norm` and apply one Adam(W) step to `adapter`, whose first and second moments
/// are `moments` (same order); `steps_taken` counts the optimiser steps before this one. Returns
/// the pre-clip global gradient norm.
pub(super) fn step(
    adapter: &mut Adapter,
    moments: &mut [(Tensor<2>, Tensor<2>)],
    grads: Vec<Tensor<2>>,
    cfg: &TrainConfig,
    steps_taken: usize,
    lr: f64,
) -> f64 {
    let sq: Vec<Tensor<1>> = grads
        .iter()
        .map(|g| g.clone().square().sum().reshape([1]))
        .collect();
    let total: f32 = Tensor::cat(sq, 0).sum().into_scalar();
    let norm = (total as f64).sqrt();
    let clip = if cfg.clip_norm > 0.0 && norm > cfg.clip_norm {
        cfg.clip_norm / norm
    } else {
        1.0
    };
    let c = cfg;
    let t = (steps_taken + 1) as i32;
    let bc1 = 1.0 - c.beta1.powi(t);
    let bc2 = 1.0 - c.beta2.powi(t);
    let mut k = 0;
    for blk in adapter.blocks.iter_mut() {
        for f in blk.iter_mut() {
            for param in [&mut f.a, &mut f.b] {
                let g = grads[k].clone().mul_scalar(clip);
                let (m, v) = &mut moments[k];
                let m_new = m.clone().mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
                let v_new = v.clone().mul_scalar(c.beta2) + g.square().mul_scalar(1.0 - c.beta2);
                let upd =
                    m_new.clone().div_scalar(bc1) / (v_new.clone().div_scalar(bc2).sqrt() + c.eps);
                let decayed = if c.weight_decay > 0.0 {
                    param.clone().mul_scalar(1.0 - lr * c.weight_decay)
                } else {
                    param.clone()
                };
                *param = decayed - upd.mul_scalar(lr);
                *m = m_new;
                *v = v_new;
                k += 1;
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use burn::tensor::Device;

    /// One step with zero gradients: Adam leaves the factors alone, AdamW shrinks every one
    /// by exactly `1 - lr * weight_decay` (decoupled: the decay does not pass through the
    /// moments).
    #[test]
    fn weight_decay_is_decoupled_and_zero_means_adam() {
        let c = ModelConfig::dense(20, 8, 1, 2, 1, 4, 8, true);
        let ad = Adapter::new(&c, 2, 4.0, 5, &Device::flex());
        let run = |wd: f64| {
            let mut a = ad.clone();
            let mut moments: Vec<_> = a
                .blocks
                .iter()
                .flat_map(|b| b.iter().flat_map(|f| [f.a.clone(), f.b.clone()]))
                .map(|t| (t.zeros_like(), t.zeros_like()))
                .collect();
            let grads = moments.iter().map(|(m, _)| m.clone()).collect();
            let cfg = TrainConfig {
                weight_decay: wd,
                ..TrainConfig::default()
            };
            step(&mut a, &mut moments, grads, &cfg, 0, 0.1);
            let v: Vec<f32> = a.blocks[0][0].a.clone().into_data().try_to_vec().unwrap();
            (v, optimiser_name(&cfg))
        };
        let v0: Vec<f32> = ad.blocks[0][0].a.clone().into_data().try_to_vec().unwrap();
        let (adam, n0) = run(0.0);
        let (adamw, n1) = run(0.5);
        assert_eq!(n0, "Adam");
        assert_eq!(n1, "AdamW(weight_decay=0.5)");
        assert_eq!(adam, v0);
        for (x, y) in v0.iter().zip(&adamw) {
            assert!(
                (x * 0.95 - y).abs() <= 1e-7 * x.abs().max(1.0),
                "{x} -> {y}"
            );
        }
        assert!(check_weight_decay(0.01, 1e-3).is_ok());
        assert!(check_weight_decay(-0.1, 1e-3).unwrap_err().contains("-0.1"));
        assert!(check_weight_decay(f64::NAN, 1e-3).is_err());
        assert!(check_weight_decay(2000.0, 1e-3)
            .unwrap_err()
            .contains("at least 1"));
    }
}
