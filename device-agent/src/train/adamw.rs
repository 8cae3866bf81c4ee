//! The optimiser: AdamW with bias correction and decoupled weight decay on the adapter's
//! factors, after clipping the global gradient norm.

use burn::tensor::Tensor;

use super::TrainConfig;
use crate::lora::Adapter;

/// Clip `grads` (one per factor, in the order `blocks -> projections -> (a, b)`) to the global
/// norm `cfg.clip_norm` and apply one AdamW step to `adapter`, whose first and second moments
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
