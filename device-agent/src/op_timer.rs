//! Where the time of one LoRA training step goes, operator by operator, and how fast the
//! backend's matmul runs on the step's shapes.
//!
//! The CPU backend executes eagerly, so each operator of a decoder block can be timed on its
//! own at the step's shapes: forward on plain tensors, forward plus backward on autodiff
//! leaves. The backward time is `(y * g).sum().backward()` minus the same on a bare leaf of
//! `y`'s shape, so the seed's own cost is not charged to the operator. Per-step totals multiply
//! by the number of calls in one step (blocks x calls per block); the remainder against a
//! measured whole step is autodiff bookkeeping, AdamW, clipping and allocation.
//! Used by the `speed` bench (`-- profile`); not on any training path.

use std::time::Instant;

use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use protocol::{KeptIndices, Proj};

use crate::lora::Adapter;
use crate::model::{lora_group, module_name, rms_norm, Llama, LoraTerm};
use crate::prune::KeptIndicesExt;
use crate::train::{chunked_ce, Batch, TrainConfig, Tuner};

/// One operator's measured cost.
#[derive(Debug, Clone)]
pub struct OpTime {
    pub name: String,
    /// Calls in one training step.
    pub calls: usize,
    /// Median forward time of one call, milliseconds.
    pub fwd_ms: f64,
    /// Median backward time of one call (forward excluded), milliseconds.
    pub bwd_ms: f64,
    /// Analytical FLOPs of one call, forward plus backward (0 where not counted).
    pub flops: f64,
}

impl OpTime {
    /// Milliseconds per training step.
    pub fn step_ms(&self) -> f64 {
        self.calls as f64 * (self.fwd_ms + self.bwd_ms)
    }
}

/// A per-operator profile with the whole step it is compared against.
#[derive(Debug, Clone)]
pub struct StepProfile {
    pub ops: Vec<OpTime>,
    /// Median time of one whole measured training step, milliseconds.
    pub step_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Median forward and backward milliseconds of `f` over `reps` runs on `inputs`; every output
/// is seeded with its own random gradient.
fn time_op<F>(inputs: &[Tensor<2>], reps: usize, f: F) -> (f64, f64)
where
    F: Fn(&[Tensor<2>]) -> Vec<Tensor<2>>,
{
    let reps = reps.max(1);
    let _ = f(inputs); // warm-up: first-touch allocations
    let fwd = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                let y = f(inputs);
                let d = ms(t);
                drop(y);
                d
            })
            .collect(),
    );
    let out_dims: Vec<[usize; 2]> = f(inputs).iter().map(Tensor::dims).collect();
    let device = inputs[0].device();
    let seeds: Vec<Tensor<2>> = out_dims
        .iter()
        .map(|&d| Tensor::<2>::random(d, Distribution::Normal(0.0, 1.0), &device))
        .collect();
    let seed_cost = |ys: Vec<Tensor<2>>| {
        let t = Instant::now();
        let total = ys
            .into_iter()
            .zip(&seeds)
            .map(|(y, g)| (y * g.clone().autodiff()).sum())
            .reduce(|a, b| a + b)
            .expect("at least one output");
        let _grads = total.backward();
        ms(t)
    };
    let mut bwd = Vec::with_capacity(reps);
    for _ in 0..reps {
        let leaves: Vec<Tensor<2>> = inputs
            .iter()
            .map(|t| t.clone().autodiff().require_grad())
            .collect();
        let full = seed_cost(f(&leaves));
        let bare = seed_cost(
            out_dims
                .iter()
                .map(|&d| Tensor::<2>::zeros(d, &device).autodiff().require_grad())
                .collect(),
        );
        bwd.push((full - bare).max(0.0));
    }
    (fwd, median(bwd))
}

/// [`time_op`] for an operation with one output.
fn time_one<F>(inputs: &[Tensor<2>], reps: usize, f: F) -> (f64, f64)
where
    F: Fn(&[Tensor<2>]) -> Tensor<2>,
{
    time_op(inputs, reps, |i| vec![f(i)])
}

/// Profile one LoRA training step of `model` with `adapter` on `batch` (all rows of equal
/// length), `reps` repetitions per operator. Shapes are those of block 0; every block is
/// charged the same (the profile is meant for unpruned or uniformly pruned models).
pub fn lora_step_profile(
    model: &Llama,
    adapter: &Adapter,
    batch: &Batch,
    reps: usize,
) -> StepProfile {
    let device = model.device.clone();
    let cfg = &model.config;
    let layers = cfg.n_layers();
    let (bsz, seq) = (batch.tokens.len(), batch.tokens[0].len());
    let n = bsz * seq;
    let d = cfg.d_model;
    let hd = cfg.head_dim;
    let shape = &cfg.blocks[0];
    let (nh, nkv, ffn) = (shape.n_heads, shape.n_kv_heads, shape.ffn_dim);
    let blk = &model.blocks[0];
    let rnd = |dims: [usize; 2]| Tensor::<2>::random(dims, Distribution::Normal(0.0, 1.0), &device);
    let mut ops = Vec::new();
    let mut push = |name: &str, calls: usize, (fwd_ms, bwd_ms): (f64, f64), flops: f64| {
        ops.push(OpTime {
            name: name.to_string(),
            calls,
            fwd_ms,
            bwd_ms,
            flops,
        })
    };

    let x = rnd([n, d]);
    let norm_w = blk.attn_norm.clone();
    let eps = cfg.rms_eps;
    push(
        "RMSNorm",
        2 * layers + 1,
        time_one(std::slice::from_ref(&x), reps, |i| {
            rms_norm(i[0].clone(), &norm_w, eps)
        }),
        0.0,
    );

    // Frozen base matmuls: forward x W, backward dY W^T (no weight gradient).
    let projs = [
        (Proj::Q, d),
        (Proj::K, d),
        (Proj::V, d),
        (Proj::O, nh * hd),
        (Proj::Gate, d),
        (Proj::Up, d),
        (Proj::Down, ffn),
    ];
    for (p, fan_in) in projs {
        let w = blk.weight(p).clone();
        let fan_out = w.dims()[1];
        let xin = rnd([n, fan_in]);
        let flops = 2.0 * 2.0 * (n * fan_in * fan_out) as f64;
        let t = time_one(&[xin], reps, |i| i[0].clone().matmul(w.clone()));
        push(
            &format!("frozen matmul {} ({fan_in}x{fan_out})", module_name(p)),
            layers,
            t,
            flops,
        );
    }
    // LoRA terms as the model computes them (`model::lora_group`: q/k/v and gate/up share one
    // `x A` matmul, the scale is on B) plus their add into the base outputs, per input group.
    // The base outputs here are shared with the inputs, so each add first copies its base (an
    // `[n, out]` pass the model, whose base outputs nothing else holds, does not make): the row
    // overstates the terms' forward (7.3 ms a block against about 3.5 ms for the products
    // alone on the Intel AMX host, BENCHMARKS.md session 38).
    let mut lora = (0.0, 0.0);
    let mut lora_flops = 0.0;
    let groups: [&[(Proj, usize)]; 4] = [&projs[0..3], &projs[3..4], &projs[4..6], &projs[6..7]];
    for group in groups {
        let fan_in = group[0].1;
        let facs: Vec<(Tensor<2>, Tensor<2>, f64)> = group
            .iter()
            .filter_map(|&(p, _)| adapter.factors(0, p))
            .map(|(a, b, s)| (a.clone(), b.clone(), s))
            .collect();
        if facs.len() != group.len() {
            continue;
        }
        let mut inputs = vec![rnd([n, fan_in])];
        for (a, b, _) in &facs {
            let fan_out = b.dims()[1];
            let r = a.dims()[1];
            // forward 2 matmuls; backward dX, dA, dB and the pass through B: 3 more pairs
            lora_flops += 2.0 * 3.0 * (n * r * (fan_in + fan_out)) as f64;
            inputs.extend([rnd([n, fan_out]), a.clone(), b.clone()]);
        }
        let scales: Vec<f64> = facs.iter().map(|f| f.2).collect();
        let t = time_op(&inputs, reps, |i| {
            let k = scales.len();
            let refs: Vec<Option<(&Tensor<2>, &Tensor<2>, f64)>> = (0..k)
                .map(|j| Some((&i[2 + 3 * j], &i[3 + 3 * j], scales[j])))
                .collect();
            let terms: Vec<Option<LoraTerm>> = match k {
                1 => lora_group(i[0].clone(), [refs[0]]).into(),
                2 => lora_group(i[0].clone(), [refs[0], refs[1]]).into(),
                _ => lora_group(i[0].clone(), [refs[0], refs[1], refs[2]]).into(),
            };
            terms
                .into_iter()
                .enumerate()
                .map(|(j, d)| {
                    d.expect("every projection has factors")
                        .add_to(i[1 + 3 * j].clone())
                })
                .collect()
        });
        lora.0 += t.0;
        lora.1 += t.1;
    }
    push(
        "LoRA terms, 7 projections (joined x A, then (x A)(s B), + base; each base copied first here, not in the model)",
        layers,
        lora,
        lora_flops,
    );

    // Attention between the projections: head split, RoPE, GQA repeat, SDPA, head merge.
    let (q, k, v) = (rnd([n, nh * hd]), rnd([n, nkv * hd]), rnd([n, nkv * hd]));
    let split = move |t: Tensor<2>, heads: usize| t.reshape([bsz, seq, heads, hd]).swap_dims(1, 2);
    let rope = model.rope.clone();
    let g = nh / nkv.max(1);
    let rep = move |t: Tensor<4>| {
        t.reshape([bsz, nkv, 1, seq * hd])
            .repeat_dim(2, g)
            .reshape([bsz, nh, seq, hd])
    };
    let opts = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    let merge = move |t: Tensor<4>| t.swap_dims(1, 2).reshape([n, nh * hd]);
    // QK^T and AV over the full square (the fallback masks, it does not skip): 4 b h s^2 e
    // forward, twice that backward.
    let attn_flops = 12.0 * (bsz * nh * seq * seq * hd) as f64;
    let flat = move |t: Tensor<4>| {
        let [b, h, s, e] = t.dims();
        t.reshape([b * h * s, e])
    };
    let unflat = move |t: Tensor<2>, heads: usize| t.reshape([bsz, heads, seq, hd]);
    // As the model rotates them: the rows of the q and k products, heads not yet split.
    let mut rope_t = (0.0, 0.0);
    for t in [q.clone(), k.clone()] {
        let (f, b) = time_one(&[t], reps, |i| rope.apply_rows(i[0].clone(), 0, seq));
        rope_t.0 += f;
        rope_t.1 += b;
    }
    push("RoPE on q and k", layers, rope_t, 0.0);
    {
        let (q4, k4, v4) = (
            split(q.clone(), nh),
            rep(split(k.clone(), nkv)),
            rep(split(v.clone(), nkv)),
        );
        push(
            "attention, burn's generic fallback (for comparison, not called)",
            0,
            time_one(&[flat(q4), flat(k4), flat(v4)], reps, |i| {
                let o = attention(
                    unflat(i[0].clone(), nh),
                    unflat(i[1].clone(), nh),
                    unflat(i[2].clone(), nh),
                    None,
                    None,
                    opts,
                );
                flat(o)
            }),
            attn_flops,
        );
    }
    {
        let (q4, k4, v4) = (
            split(q.clone(), nh),
            split(k.clone(), nkv),
            split(v.clone(), nkv),
        );
        let t = time_one(&[flat(q4), flat(k4), flat(v4)], reps, |i| {
            flat(crate::model::causal_attention(
                unflat(i[0].clone(), nh),
                unflat(i[1].clone(), nkv),
                unflat(i[2].clone(), nkv),
            ))
        });
        push(
            "attention softmax(QK^T)V, causal, KV groups in place (ours: model::causal_attention)",
            layers,
            t,
            attn_flops,
        );
    }
    // Layout: q's head split and merge (the merge copies).
    push(
        "head split/merge (copies)",
        layers,
        time_one(std::slice::from_ref(&q), reps, |i| {
            merge(split(i[0].clone(), nh))
        }),
        0.0,
    );
    let (gt, ut) = (rnd([n, ffn]), rnd([n, ffn]));
    push(
        "SwiGLU with burn's silu (for comparison, not called)",
        0,
        time_one(&[gt.clone(), ut.clone()], reps, |i| {
            silu(i[0].clone()) * i[1].clone()
        }),
        0.0,
    );
    push(
        "SwiGLU silu(gate) * up (ours: fused::swiglu)",
        layers,
        time_one(&[gt.clone(), ut.clone()], reps, |i| {
            crate::fused::swiglu(i[0].clone(), i[1].clone())
        }),
        0.0,
    );
    push(
        "residual add",
        2 * layers,
        time_one(&[x.clone(), rnd([n, d])], reps, |i| {
            i[0].clone() + i[1].clone()
        }),
        0.0,
    );
    // The head: logits chunk by chunk with the hand-formed gradient (no autodiff graph).
    let hf = rms_norm(x.clone(), &model.norm, eps);
    let ce = median(
        (0..reps.max(1))
            .map(|_| {
                let t = Instant::now();
                let _ = chunked_ce(model, hf.clone(), &batch.targets, n as f64, None);
                ms(t)
            })
            .collect(),
    );
    let vocab = model.embed.dims()[0];
    push(
        "LM head + cross-entropy, chunked (logits and dH)",
        1,
        (ce, 0.0),
        2.0 * 2.0 * (n * d * vocab) as f64,
    );

    // The whole step, for the remainder.
    let mut tuner = Tuner::new(
        model,
        KeptIndices::dense(&model.config),
        adapter.clone(),
        TrainConfig::default(),
    )
    .expect("dense kept maps fit the model");
    tuner.train_micro(batch, 1e-4, false);
    let step_ms = median(
        (0..reps.max(1))
            .map(|_| {
                let t = Instant::now();
                tuner.train_micro(batch, 1e-4, false);
                ms(t)
            })
            .collect(),
    );
    StepProfile { ops, step_ms }
}

/// GFLOP/s of a `[m, k] x [k, n]` matmul through the backend (contiguous operands), median of
/// `reps` after one warm-up.
pub fn backend_matmul_gflops(
    m: usize,
    k: usize,
    n: usize,
    dtype: burn::tensor::DType,
    reps: usize,
    device: &burn::tensor::Device,
) -> f64 {
    let a = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let b = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let _ = a.clone().matmul(b.clone());
    let t = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                let _ = a.clone().matmul(b.clone());
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    2.0 * (m * k * n) as f64 / t / 1e9
}
