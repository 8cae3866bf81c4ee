//! Vectorised CPU kernels for the element-wise work where the flex backend is scalar: `exp`
//! inside softmax (attention and the cross-entropy) and the sigmoid of SiLU. Flex computes
//! these with the C library's scalar `expf`, about 3 ns per element against 0.15 ns for an add,
//! which made them a quarter of a LoRA step (`cargo bench -p device-agent --bench speed --
//! profile`). These kernels read the flex tensor's buffer in place, split rows across rayon's
//! threads and evaluate `exp` with a branch-free polynomial that the compiler vectorises (AVX-512
//! or AVX2 chosen at run time by [`crate::cpu::Isa`], which `FEDSPINE_ISA` can cap).
//!
//! The tensor-level functions work on tensors without autodiff; on other backends or dtypes they
//! return `None` and the caller uses burn's own operation. The slice-level `*_into` functions are
//! the bodies of [`crate::fused`]'s softmax and SwiGLU, which carry their own backward passes.
//! [`skinny`] holds the fp32 products of decoding (a few rows times a large weight);
//! [`sgemm`] the fp32 products with a frozen weight, read where it lies (AVX2 and AVX-512);
//! [`flex_matmul`] the other fp32 products, without flex's zeroing and copying of the output;
//! [`causal_attention`] attention by blocks of query rows, skipping the masked keys;
//! [`lora_importance`] LoRA-gradient importance in one pass over a frozen weight.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// Rows handed to one rayon task.
const ROWS_PER_TASK: usize = 32;
/// Elements handed to one rayon task by the element-wise kernels.
const ELEMS_PER_TASK: usize = 1 << 15;

/// `e^x` for one lane, accurate to about 2 ulp on `[-87.3, 88.3]`; exactly 0 below that range
/// (as `expf` underflows; a masked attention score of -1e30 must weigh 0, not a subnormal) and
/// +inf above it. Written without branches or calls so a loop over it vectorises.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.376_26;
    let c = x.clamp(LO, HI);
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO; // |r| <= ln(2) / 2
                                         // e^r by its Taylor series to degree 6 (error below 2e-7 relative on that interval).
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n as bits; n is in [-126, 127] after the clamp. `t` is ROUND + n exactly (its binade
    // steps by one), so its bits are ROUND's plus n: the exponent comes from integer arithmetic,
    // which vectorises. (`n as i32` saturates, which LLVM does lane by lane: 16 scalar
    // conversions, compares and inserts per 16-lane vector, most of SwiGLU's time.)
    let e = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let scale = f32::from_bits(e << 23);
    let y = p * scale;
    // Selects, not branches: they vectorise.
    let y = if x < LO { 0.0 } else { y };
    if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        multiversion! { $(#[$m])* fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[allow(unsafe_code)]
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: `v4` and `v3` are unsafe only for their target features; they are
                // called below only after the CPU reports those features.
                #[target_feature(enable = "avx512f")]
                unsafe fn v4($($arg: $ty),*) -> $ret $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret $body
                // `Isa::detect` is what the CPU reports, capped by `FEDSPINE_ISA`.
                match crate::cpu::Isa::detect() {
                    crate::cpu::Isa::Avx512 => {
                        // SAFETY: the CPU has the features the function was compiled for.
                        return unsafe { v4($($arg),*) };
                    }
                    crate::cpu::Isa::Avx2Fma => {
                        // SAFETY: as above.
                        return unsafe { v3($($arg),*) };
                    }
                    _ => {}
                }
            }
            $body
        }
    };
}

/// Sum with 16 independent accumulators, so the loop vectorises (a single running sum is a
/// dependency chain the compiler may not reorder).
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Maximum with 16 independent lanes, as [`lane_sum`].
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(rest, |m, &v| m.max(v))
}

multiversion! {
    /// Softmax of each `row_len`-long row of `x` into `out`.
    fn softmax_rows(x: &[f32], out: &mut [f32], row_len: usize) {
        for (xr, or) in x.chunks_exact(row_len).zip(out.chunks_exact_mut(row_len)) {
            let max = lane_max(xr);
            for (o, &v) in or.iter_mut().zip(xr) {
                *o = exp_lane(v - max);
            }
            let inv = 1.0 / lane_sum(or);
            for o in or.iter_mut() {
                *o *= inv;
            }
        }
    }
}

multiversion! {
    /// Log-softmax of each `row_len`-long row of `x` into `out`: `x - max - ln(sum(e^(x - max)))`.
    fn log_softmax_rows(x: &[f32], out: &mut [f32], row_len: usize) {
        for (xr, or) in x.chunks_exact(row_len).zip(out.chunks_exact_mut(row_len)) {
            let max = lane_max(xr);
            let mut acc = [0.0f32; 16];
            let chunks = xr.chunks_exact(16);
            let rest: f32 = chunks.remainder().iter().map(|&v| exp_lane(v - max)).sum();
            for c in chunks {
                for (a, &v) in acc.iter_mut().zip(c) {
                    *a += exp_lane(v - max);
                }
            }
            let lse = (acc.iter().sum::<f32>() + rest).ln();
            for (o, &v) in or.iter_mut().zip(xr) {
                *o = (v - max) - lse;
            }
        }
    }
}

multiversion! {
    /// Cross-entropy of one row of logits `x` against `target`: writes the gradient
    /// `(softmax(x) - onehot(target)) * scale` into `out` and returns the row's loss
    /// `ln(sum(e^(x - max))) - (x[target] - max)` (exact, no underflow) and its arg-max (the
    /// first one on ties).
    fn cross_entropy_row(x: &[f32], out: &mut [f32], target: usize, scale: f32) -> (f32, usize) {
        let max = lane_max(x);
        let pred = x.iter().position(|&v| v == max).unwrap_or(0);
        for (o, &v) in out.iter_mut().zip(x) {
            *o = exp_lane(v - max);
        }
        let sum = lane_sum(out);
        let k = scale / sum;
        for o in out.iter_mut() {
            *o *= k;
        }
        out[target] -= scale;
        (sum.ln() - (x[target] - max), pred)
    }
}

multiversion! {
    /// Softmax's input gradient from its output `p` and the output gradient `dy`, row by row,
    /// times `scale` (the factor the scores were scaled by, or 1): `p * (dy - sum(dy * p)) *
    /// scale`.
    fn softmax_grad_rows(p: &[f32], dy: &[f32], out: &mut [f32], row_len: usize, scale: f32) {
        for ((pr, dr), or) in p
            .chunks_exact(row_len)
            .zip(dy.chunks_exact(row_len))
            .zip(out.chunks_exact_mut(row_len))
        {
            for ((o, &a), &b) in or.iter_mut().zip(pr).zip(dr) {
                *o = a * b;
            }
            let dot = lane_sum(or);
            for ((o, &a), &b) in or.iter_mut().zip(pr).zip(dr) {
                *o = a * (b - dot) * scale;
            }
        }
    }
}

multiversion! {
    /// Causal softmax of scaled attention scores, row by row: row `first_row + n` of the buffer
    /// is group row `r = (first_row + n) % mask.group_rows`, the query at position
    /// `mask.past + r % mask.seq`, which sees the keys up to and including its own position;
    /// later keys get probability 0. In place: the scores become the probabilities.
    fn causal_softmax_rows(x: &mut [f32], row_len: usize, first_row: usize, mask: CausalMask) {
        for (n, or) in x.chunks_exact_mut(row_len).enumerate() {
            let r = (first_row + n) % mask.group_rows;
            let valid = (mask.past + r % mask.seq + 1).min(row_len);
            let ov = &mut or[..valid];
            let max = lane_max(ov);
            for o in ov.iter_mut() {
                *o = exp_lane((*o - max) * mask.scale);
            }
            let inv = 1.0 / lane_sum(ov);
            for o in ov.iter_mut() {
                *o *= inv;
            }
            or[valid..].fill(0.0);
        }
    }
}

multiversion! {
    /// Attention of one query head at the newest position over a sequence's cached keys and
    /// values (decoding): `q` and `out` hold `hd` values; `kt` is the head's KV head's keys
    /// transposed, `hd` rows of `stride` positions; `v` its values, `[p.len(), hd]`; `p` is
    /// scratch for the probabilities, one per position (the new one last). The scores are
    /// scaled inside the exponential and normalised as [`causal_softmax_rows`] does. With the
    /// keys transposed, a score is summed over `hd` broadcasts along 16 positions at a time, with
    /// no horizontal sum per position; the values are summed into 64 output lanes held at once.
    fn attend_newest(q: &[f32], kt: &[f32], stride: usize, v: &[f32], scale: f32, p: &mut [f32], out: &mut [f32]) {
        let (hd, keys) = (q.len(), p.len());
        p.fill(0.0);
        for (&qd, row) in q.iter().zip(kt.chunks(stride)) {
            for (s, &x) in p.iter_mut().zip(&row[..keys]) {
                *s += qd * x;
            }
        }
        let max = lane_max(p);
        for s in p.iter_mut() {
            *s = exp_lane((*s - max) * scale);
        }
        let inv = 1.0 / lane_sum(p);
        for (d0, o) in (0..hd).step_by(64).zip(out.chunks_mut(64)) {
            let w = o.len();
            let mut acc = [0f32; 64];
            if w == 64 {
                // A fixed width keeps the 64 sums in registers across the positions.
                for (&pj, vj) in p.iter().zip(v.chunks_exact(hd)) {
                    let vj: &[f32; 64] = vj[d0..d0 + 64].try_into().expect("64 values");
                    for (a, &x) in acc.iter_mut().zip(vj) {
                        *a += pj * x;
                    }
                }
            } else {
                for (&pj, vj) in p.iter().zip(v.chunks_exact(hd)) {
                    for (a, &x) in acc.iter_mut().zip(&vj[d0..d0 + w]) {
                        *a += pj * x;
                    }
                }
            }
            for (o, a) in o.iter_mut().zip(acc) {
                *o = a * inv;
            }
        }
    }
}

/// One new position per sequence against a KV cache (decoding): `q` is `[batch, heads, hd]`;
/// `kt` holds the keys transposed, `[batch, kv_heads, hd, cap]`, and `v` the values, `[batch,
/// kv_heads, cap, hd]`, positions `0..keys` filled (the new one last); `kv_of[h]` is query head
/// `h`'s KV head; returns `[batch, heads, hd]`. Reads the cache in place, where attention
/// through tensors first copies it whole into contiguous `[batch, kv_heads, keys, hd]` tensors
/// every token. Heads run in parallel once the cache is long enough to pay for the hand-off
/// (from 228 keys of SmolLM2's nine heads on rayon, from 15 on an entered decoding team, whose
/// helpers spin); each output is computed the same way either way.
pub(crate) fn decode_attention(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    kv_of: &[usize],
    (cap, keys, hd): (usize, usize, usize),
) -> Vec<f32> {
    let heads = kv_of.len();
    let mut out = vec![0f32; q.len()];
    if heads == 0 || hd == 0 || keys == 0 {
        return out;
    }
    let batch = q.len() / (heads * hd);
    let nkv = kt.len() / (batch * cap * hd).max(1);
    assert!(
        keys <= cap
            && q.len() == batch * heads * hd
            && kt.len() == batch * nkv * cap * hd
            && v.len() == kt.len()
            && kv_of.iter().all(|&g| g < nkv),
        "decode attention: {} queries of {heads} heads x {hd} against a cache of {} values \
         ({keys} of {cap} positions)",
        q.len(),
        kt.len()
    );
    let scale = 1.0 / (hd as f32).sqrt();
    let one = |(bh, o): (usize, &mut [f32])| {
        let (b, h) = (bh / heads, bh % heads);
        let at = (b * nkv + kv_of[h]) * cap * hd;
        let mut p = vec![0f32; keys];
        let qh = &q[bh * hd..(bh + 1) * hd];
        let (kh, vh) = (&kt[at..at + cap * hd], &v[at..at + keys * hd]);
        attend_newest(qh, kh, cap, vh, scale, &mut p, o);
    };
    let split_from = if team::entered() {
        ELEMS_PER_TASK / 4
    } else {
        ELEMS_PER_TASK * 4
    };
    if batch * heads * keys * hd >= split_from {
        team::for_each(out.chunks_mut(hd).enumerate().collect(), one);
    } else {
        out.chunks_mut(hd).enumerate().for_each(one);
    }
    out
}

/// Which keys each row of attention scores may see, and the scores' scale (see
/// [`causal_softmax_rows`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalMask {
    /// Rows of one `[rows, keys]` score matrix: a KV head's group of queries, `g * seq`.
    pub group_rows: usize,
    /// New positions per sequence; a group's rows cycle through them.
    pub seq: usize,
    /// Cached positions before the new ones (`keys - seq`).
    pub past: usize,
    /// Factor on the scores inside the exponential (`1 / sqrt(head_dim)`).
    pub scale: f32,
}

multiversion! {
    /// SwiGLU's value `silu(g) * u` into `out`.
    fn swiglu_lanes(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &x), &v) in out.iter_mut().zip(g).zip(u) {
            *o = x / (1.0 + exp_lane(-x)) * v;
        }
    }
}

multiversion! {
    /// SwiGLU's input gradients from `g`, `u` and the output gradient `dy`:
    /// `dg = dy * u * silu'(g)`, `du = dy * silu(g)`.
    fn swiglu_grad_lanes(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((a, b), &x), &v), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let sig = 1.0 / (1.0 + exp_lane(-x));
            *a = d * v * sig * (1.0 + x * (1.0 - sig));
            *b = d * x * sig;
        }
    }
}

/// A row kernel (`input rows, output rows, row length`) over whole buffers: on the calling
/// thread when small (decoding), else row-parallel in chunks of [`ROWS_PER_TASK`] rows.
fn rows_into(x: &[f32], out: &mut [f32], row_len: usize, kernel: fn(&[f32], &mut [f32], usize)) {
    if row_len == 0 {
        return;
    }
    if x.len() <= ELEMS_PER_TASK {
        return kernel(x, out, row_len);
    }
    let chunk = row_len * ROWS_PER_TASK;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, i)| kernel(i, o, row_len));
}

/// Softmax of each `row_len`-long row of `x` into `out`, row-parallel when large.
pub(crate) fn softmax_into(x: &[f32], out: &mut [f32], row_len: usize) {
    rows_into(x, out, row_len, softmax_rows);
}

/// [`softmax_grad_rows`] over whole buffers, row-parallel when large.
pub(crate) fn softmax_grad_into(
    p: &[f32],
    dy: &[f32],
    out: &mut [f32],
    row_len: usize,
    scale: f32,
) {
    if row_len == 0 {
        return;
    }
    if p.len() <= ELEMS_PER_TASK {
        return softmax_grad_rows(p, dy, out, row_len, scale);
    }
    let chunk = row_len * ROWS_PER_TASK;
    out.par_chunks_mut(chunk)
        .zip(p.par_chunks(chunk))
        .zip(dy.par_chunks(chunk))
        .for_each(|((o, p), d)| softmax_grad_rows(p, d, o, row_len, scale));
}

/// `silu(g) * u` element-wise into `out`, parallel when large.
pub(crate) fn swiglu_into(g: &[f32], u: &[f32], out: &mut [f32]) {
    if g.len() <= ELEMS_PER_TASK {
        return swiglu_lanes(g, u, out);
    }
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(g.par_chunks(ELEMS_PER_TASK))
        .zip(u.par_chunks(ELEMS_PER_TASK))
        .for_each(|((o, g), u)| swiglu_lanes(g, u, o));
}

/// SwiGLU's input gradients ([`swiglu_grad_lanes`]) over whole buffers, parallel when large.
pub(crate) fn swiglu_grad_into(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    if g.len() <= ELEMS_PER_TASK {
        return swiglu_grad_lanes(g, u, dy, dg, du);
    }
    let e = ELEMS_PER_TASK;
    dg.par_chunks_mut(e)
        .zip(du.par_chunks_mut(e))
        .zip(g.par_chunks(e).zip(u.par_chunks(e)).zip(dy.par_chunks(e)))
        .for_each(|((a, b), ((g, u), d))| swiglu_grad_lanes(g, u, d, a, b));
}

/// The tensor's f32 buffer when it lives on flex without autodiff, made contiguous.
pub(crate) fn flex_f32<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    if t.is_autodiff() || t.dtype() != DType::F32 {
        return None;
    }
    let ft = t.clone().try_into_primitive::<Flex>().ok()?;
    Some(if ft.is_contiguous() {
        ft
    } else {
        ft.to_contiguous()
    })
}

/// A flex f32 tensor made contiguous (a no-op when it is).
pub(crate) fn contiguous_f32(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "fused operations take f32 tensors");
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The values of a contiguous flex f32 tensor.
pub(crate) fn f32_values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

pub(crate) fn slice(ft: &FlexTensor) -> &[f32] {
    let (a, b) = ft
        .layout()
        .contiguous_offsets()
        .expect("made contiguous by flex_f32");
    &ft.storage::<f32>()[a..b]
}

pub(crate) fn wrap<const D: usize>(v: Vec<f32>, dims: [usize; D]) -> Tensor<D> {
    Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(v, dims)))
}

/// Apply a row kernel (`input row, output row, row length`) over the last dimension of a flex
/// f32 tensor without autodiff ([`rows_into`]); `None` otherwise.
fn map_rows<const D: usize>(
    t: &Tensor<D>,
    kernel: fn(&[f32], &mut [f32], usize),
) -> Option<Tensor<D>> {
    let ft = flex_f32(t)?;
    let dims = t.dims();
    let row = dims[D - 1];
    let x = slice(&ft);
    let mut out = vec![0.0f32; x.len()];
    rows_into(x, &mut out, row, kernel);
    Some(wrap(out, dims))
}

/// Softmax over the last dimension of a flex f32 tensor without autodiff; `None` otherwise.
pub fn softmax_last<const D: usize>(t: &Tensor<D>) -> Option<Tensor<D>> {
    map_rows(t, softmax_rows)
}

/// Log-softmax over the last dimension of a flex f32 tensor without autodiff; `None` otherwise.
pub fn log_softmax_last<const D: usize>(t: &Tensor<D>) -> Option<Tensor<D>> {
    map_rows(t, log_softmax_rows)
}

/// One chunk's cross-entropy from its logits `[rows, vocab]` (flex f32, no autodiff; `None`
/// otherwise): the gradient w.r.t. the logits, `(softmax - onehot) * scale` on rows with a
/// target and 0 elsewhere, each row's loss (0 without a target) and each row's arg-max. One
/// read of the logits for max, exp and sum and one write of the gradient, row-parallel.
pub fn cross_entropy_rows(
    logits: &Tensor<2>,
    targets: &[Option<u32>],
    scale: f32,
) -> Option<(Tensor<2>, Vec<f32>, Vec<usize>)> {
    let ft = flex_f32(logits)?;
    let [rows, vocab] = logits.dims();
    if rows != targets.len() || vocab == 0 || targets.iter().flatten().any(|&t| t as usize >= vocab)
    {
        return None;
    }
    let x = slice(&ft);
    let mut grad = vec![0.0f32; x.len()];
    let per_row: Vec<(f32, usize)> = grad
        .par_chunks_mut(vocab)
        .zip(x.par_chunks(vocab))
        .zip(targets.par_iter())
        .map(|((o, xr), t)| match t {
            Some(t) => cross_entropy_row(xr, o, *t as usize, scale),
            None => (
                0.0,
                xr.iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                    )
                    .0,
            ),
        })
        .collect();
    let (nll, pred) = per_row.into_iter().unzip();
    Some((wrap(grad, [rows, vocab]), nll, pred))
}

mod attention;
mod importance;
pub mod lora_grad;
mod matmul;
mod norm;
mod rope;
pub mod sgemm;
mod skinny;
pub mod team;
pub use attention::{causal_attention, causal_attention_backward, AttentionShape};
pub use importance::{lora_importance, Along};
pub(crate) use matmul::OutPtr;
pub use matmul::{flex_matmul, flex_matmul_add};
pub(crate) use norm::{rms_norm_grad_into, rms_norm_into};
pub use rope::{rope_into, RopeRows};
pub use skinny::{skinny_matmul, skinny_matmul_group, SKINNY_ROWS};
pub(crate) use skinny::{skinny_products, SkinnyWeight};

/// How a weight matrix is laid out relative to the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `w` is `[n][k]`: the product is `a * w^T`. Here: a projection's input gradient (its
    /// weight is burn's `[in, out]`) and the tied LM head's forward (the `[vocab, d]` embedding).
    Transposed,
    /// `w` is `[k][n]`: the product is `a * w`. Here: a projection's forward and the tied LM
    /// head's input gradient.
    Plain,
}

impl Layout {
    /// `(k, n)`, the reduced and the output dimension, of a product with a `rows x cols` weight
    /// read in this layout.
    pub fn reduced_and_out(self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            Layout::Plain => (rows, cols),
            Layout::Transposed => (cols, rows),
        }
    }
}

/// `a @ b` of untracked flex f32 matrices, any strides, through [`flex_matmul`] (no zeroing
/// and copying of the output); `None` for autodiff tensors or another backend or dtype.
pub fn matmul(a: &Tensor<2>, b: &Tensor<2>) -> Option<Tensor<2>> {
    let flex = |t: &Tensor<2>| {
        (!t.is_autodiff() && t.dtype() == DType::F32)
            .then(|| t.clone().try_into_primitive::<Flex>().ok())
            .flatten()
    };
    let (fa, fb) = (flex(a)?, flex(b)?);
    Some(Tensor::from_primitive::<Flex>(flex_matmul(fa, fb)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp_lane(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_lane(-1000.0), 0.0);
        assert_eq!(exp_lane(-1e30), 0.0);
        assert_eq!(exp_lane(1000.0), f32::INFINITY);
    }

    /// The exponential as it was written before its exponent came from `t`'s bits (`n as i32`,
    /// which does not vectorise): the two agree bit for bit.
    fn exp_by_cast(x: f32) -> f32 {
        let c = x.clamp(-87.336_55, 88.376_26);
        let n = (c * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        let r = c - n * 0.693_145_75 - n * 1.428_606_8e-6;
        let p = [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0]
            .iter()
            .fold(1.0 / 720.0, |p, &k| p * r + k);
        let y = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
        if x < -87.336_55 {
            0.0
        } else if x > 88.376_26 {
            f32::INFINITY
        } else {
            y
        }
    }

    #[test]
    fn exponent_from_bits_equals_the_cast_everywhere() {
        // Every 97th f32 bit pattern (both signs, every exponent, NaNs and infinities), and
        // the range ends' neighbours.
        let edges = [
            -87.336_55f32,
            88.376_26,
            -126.0,
            127.5,
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
        ];
        let sweep = (0..u32::MAX / 97).map(|i| f32::from_bits(i * 97));
        let near = edges.iter().flat_map(|&e| {
            (-3i32..=3).map(move |d| f32::from_bits(e.to_bits().wrapping_add_signed(d)))
        });
        for x in sweep.chain(near) {
            let (a, b) = (exp_lane(x), exp_by_cast(x));
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "exp({x:e}) = {a:e} from the bits, {b:e} through the cast"
            );
        }
    }

    #[test]
    fn kernels_match_burn_on_flex_and_decline_elsewhere() {
        let device = Device::flex();
        // Seeded inputs in [-12, 12): large enough that rows are far from uniform.
        let mut state = 0x2545_f491_u32;
        let vals: Vec<f32> = (0..37 * 301)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 * 24.0 - 12.0
            })
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(vals, [37, 301]), &device);
        let ours = softmax_last(&x).expect("flex f32");
        let theirs = burn::tensor::activation::softmax(x.clone(), 1);
        let diff: f32 = (ours - theirs).abs().max().into_scalar();
        assert!(diff < 5e-6, "softmax differs by {diff}");
        // A strided view (transpose) is made contiguous first.
        let xt = x.clone().transpose();
        let diff: f32 = (softmax_last(&xt).unwrap() - burn::tensor::activation::softmax(xt, 1))
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 5e-6, "softmax of a view differs by {diff}");
        let diff: f32 = (log_softmax_last(&x).unwrap()
            - burn::tensor::activation::log_softmax(x.clone(), 1))
        .abs()
        .max()
        .into_scalar();
        assert!(diff < 1e-5, "log-softmax differs by {diff}");
        // Cross-entropy rows against burn's log-softmax, one row without a target.
        let mut targets: Vec<Option<u32>> = (0..37).map(|i| Some((i * 7 % 301) as u32)).collect();
        targets[5] = None;
        let (grad, nll, pred) = cross_entropy_rows(&x, &targets, 0.5).expect("flex f32");
        let lp = burn::tensor::activation::log_softmax(x.clone(), 1);
        let p = burn::tensor::activation::softmax(x.clone(), 1);
        let (lp, p, g) = (
            lp.into_data().try_to_vec::<f32>().unwrap(),
            p.into_data().try_to_vec::<f32>().unwrap(),
            grad.into_data().try_to_vec::<f32>().unwrap(),
        );
        let xs = x.clone().into_data().try_to_vec::<f32>().unwrap();
        for (r, t) in targets.iter().enumerate() {
            let row = &xs[r * 301..(r + 1) * 301];
            let best = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(row[pred[r]], best, "arg-max of row {r}");
            for c in 0..301 {
                let want = match t {
                    Some(t) => 0.5 * (p[r * 301 + c] - if c as u32 == *t { 1.0 } else { 0.0 }),
                    None => 0.0,
                };
                assert!(
                    (g[r * 301 + c] - want).abs() < 5e-6,
                    "gradient at ({r}, {c})"
                );
            }
            let want = t.map_or(0.0, |t| -lp[r * 301 + t as usize]);
            assert!(
                (nll[r] - want).abs() < 1e-4 * want.max(1.0),
                "loss of row {r}: {} vs {want}",
                nll[r]
            );
        }
        // Autodiff tensors are declined (the caller keeps the graph).
        assert!(softmax_last(&x.clone().autodiff().require_grad()).is_none());
    }
}
