//! Causal attention by blocks of query rows, forward and backward, in fp32.
//!
//! A query at position `p` sees the keys `0..=p`, so the upper triangle of every `[rows, keys]`
//! score matrix is masked: a product over whole matrices spends about half of attention's
//! multiply-adds on scores that the softmax then sets to zero, and half of the gradient's on
//! zeros again. Here each head's queries go in blocks of [`ROW_BLOCK`] positions, and a block
//! whose last position is `p` takes only the keys `0..=p` into its products: at 256 positions,
//! blocks of 64 do 62.5% of the whole-matrix work. A block's scores live in a scratch buffer of
//! `ROW_BLOCK x keys` values, so the `[rows, keys]` probabilities of a whole head never exist.
//!
//! The backward pass recomputes each block's probabilities from `q` and `k` (nothing of the
//! forward pass is kept), then `dv += P^T dy`, `dP = dy v^T`, `dS = P * (dP - sum(dP * P)) *
//! scale`, `dq = dS k`, `dk += dS^T q`. It runs one task per (sequence, KV head), so the sums
//! into `dk` and `dv` over that head's query groups and blocks stay on one thread, in a fixed
//! order: the result does not depend on the number of threads.
//!
//! Layout (the one [`crate::fused::causal_attention`] uses): `q` is `[batch, kv_heads, group *
//! seq, hd]`, a KV head's `group` query heads one after another, each `seq` positions; `k` and
//! `v` are `[batch, kv_heads, keys, hd]` with `keys = past + seq`, the queries at the last `seq`
//! positions. The products are the `gemm` crate's, one thread each; the softmax is
//! [`super::causal_softmax_rows`], so the arithmetic per row is that of the whole-matrix path.

use rayon::prelude::*;

use super::{causal_softmax_rows, softmax_grad_rows, CausalMask};

/// Query positions per block.
pub const ROW_BLOCK: usize = 64;

/// The shape of one causal attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub kv_heads: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// New positions (queries per head).
    pub seq: usize,
    /// Key positions, `past + seq`.
    pub keys: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn past(&self) -> usize {
        self.keys - self.seq
    }

    /// Values of `q` (and of the output).
    pub fn query_len(&self) -> usize {
        self.batch * self.kv_heads * self.group * self.seq * self.head_dim
    }

    /// Values of `k` (and of `v`).
    pub fn key_len(&self) -> usize {
        self.batch * self.kv_heads * self.keys * self.head_dim
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        assert!(
            self.seq > 0 && self.keys >= self.seq && self.head_dim > 0,
            "causal attention of {self:?}"
        );
        assert_eq!(q.len(), self.query_len(), "queries of {self:?}");
        assert_eq!(k.len(), self.key_len(), "keys of {self:?}");
        assert_eq!(v.len(), self.key_len(), "values of {self:?}");
    }

    /// The softmax mask of one query head's rows (block rows are numbered from the head's
    /// first position).
    fn mask(&self, scale: f32) -> CausalMask {
        CausalMask {
            group_rows: self.seq,
            seq: self.seq,
            past: self.past(),
            scale,
        }
    }

    /// The blocks of one query head: first position, positions, keys seen by the block.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.seq).step_by(ROW_BLOCK).map(move |r0| {
            let rows = ROW_BLOCK.min(self.seq - r0);
            (r0, rows, self.past() + r0 + rows)
        })
    }
}

/// A read-only matrix inside a slice: `rows x cols`, element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// `rows x cols` row-major at the start of `data`.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `rows x cols` matrix at the start of `data`.
    fn transposed(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View {
            data,
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols,
        }
    }

    /// Every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = lhs rhs` (or `dst += lhs rhs` with `accumulate`), `dst` row-major `m x n` at the start
/// of the slice, on the calling thread.
fn product(dst: &mut [f32], accumulate: bool, lhs: View, rhs: View) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        rhs.rows == k && lhs.in_bounds() && rhs.in_bounds() && dst.len() >= m * n,
        "attention product of {m} x {k} and {} x {n} into {} values",
        rhs.rows,
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: both operands' elements lie inside their slices (checked above, strides and
    // extents as given), `dst` holds the `m x n` row-major result (checked above) and is
    // borrowed mutably here, so nothing else reads or writes it; with `accumulate` false `gemm`
    // writes every cell of `dst` without reading it.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The probabilities of one block: queries `qb` (`rows x hd`, row-major) against the first
/// `kmax` keys of `k` (one KV head, row-major `keys x hd`), scaled, masked and normalised into
/// `p` (`rows x kmax`), the block's first row being position `r0` of its head.
fn block_probs(
    p: &mut [f32],
    qb: &[f32],
    k: &[f32],
    (r0, rows, kmax): (usize, usize, usize),
    shape: &AttentionShape,
    scale: f32,
) {
    let hd = shape.head_dim;
    let p = &mut p[..rows * kmax];
    product(
        p,
        false,
        View::rows(qb, rows, hd),
        View::transposed(&k[..kmax * hd], kmax, hd),
    );
    causal_softmax_rows(p, kmax, r0, shape.mask(scale));
}

/// Causal attention's output `softmax(q k^T * scale, causal) v`, the layout of
/// [`AttentionShape`]; a new buffer shaped like `q`.
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
) -> Vec<f32> {
    shape.check(q, k, v);
    let hd = shape.head_dim;
    let head_len = shape.seq * hd;
    let kv_len = shape.keys * hd;
    let mut out = vec![0f32; q.len()];
    // One task per query head: its KV head is `index / group`.
    out.par_chunks_mut(head_len)
        .zip(q.par_chunks(head_len))
        .enumerate()
        .for_each(|(head, (out, q))| {
            let kv = head / shape.group;
            let (k, v) = (
                &k[kv * kv_len..(kv + 1) * kv_len],
                &v[kv * kv_len..(kv + 1) * kv_len],
            );
            let mut p = vec![0f32; ROW_BLOCK.min(shape.seq) * shape.keys];
            for (r0, rows, kmax) in shape.blocks() {
                let qb = &q[r0 * hd..(r0 + rows) * hd];
                block_probs(&mut p, qb, k, (r0, rows, kmax), &shape, scale);
                product(
                    &mut out[r0 * hd..(r0 + rows) * hd],
                    false,
                    View::rows(&p[..rows * kmax], rows, kmax),
                    View::rows(&v[..kmax * hd], kmax, hd),
                );
            }
        });
    out
}

/// Causal attention's input gradients `(dq, dk, dv)` for the output gradient `dy` (shaped like
/// `q`), the probabilities recomputed block by block.
pub fn causal_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dy: &[f32],
    shape: AttentionShape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    shape.check(q, k, v);
    assert_eq!(dy.len(), q.len(), "output gradient of {shape:?}");
    let hd = shape.head_dim;
    let group_len = shape.group * shape.seq * hd;
    let kv_len = shape.keys * hd;
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    // One task per (sequence, KV head): its `group` query heads add into its `dk` and `dv`.
    dq.par_chunks_mut(group_len)
        .zip(dk.par_chunks_mut(kv_len))
        .zip(dv.par_chunks_mut(kv_len))
        .enumerate()
        .for_each(|(kv, ((dq, dk), dv))| {
            let q = &q[kv * group_len..(kv + 1) * group_len];
            let dy = &dy[kv * group_len..(kv + 1) * group_len];
            let (k, v) = (
                &k[kv * kv_len..(kv + 1) * kv_len],
                &v[kv * kv_len..(kv + 1) * kv_len],
            );
            let block = ROW_BLOCK.min(shape.seq) * shape.keys;
            let (mut p, mut dp, mut ds) = (vec![0f32; block], vec![0f32; block], vec![0f32; block]);
            for g in 0..shape.group {
                let head = g * shape.seq * hd;
                for (r0, rows, kmax) in shape.blocks() {
                    let at = head + r0 * hd..head + (r0 + rows) * hd;
                    let (qb, dyb) = (&q[at.clone()], &dy[at.clone()]);
                    block_probs(&mut p, qb, k, (r0, rows, kmax), &shape, scale);
                    let pb = &p[..rows * kmax];
                    // dv[..kmax] += P^T dy
                    product(
                        &mut dv[..kmax * hd],
                        true,
                        View::transposed(pb, rows, kmax),
                        View::rows(dyb, rows, hd),
                    );
                    // dP = dy v^T, then dS.
                    let dpb = &mut dp[..rows * kmax];
                    product(
                        dpb,
                        false,
                        View::rows(dyb, rows, hd),
                        View::transposed(&v[..kmax * hd], kmax, hd),
                    );
                    let dsb = &mut ds[..rows * kmax];
                    softmax_grad_rows(pb, dpb, dsb, kmax, scale);
                    // dq = dS k, dk[..kmax] += dS^T q
                    product(
                        &mut dq[at],
                        false,
                        View::rows(dsb, rows, kmax),
                        View::rows(&k[..kmax * hd], kmax, hd),
                    );
                    product(
                        &mut dk[..kmax * hd],
                        true,
                        View::transposed(dsb, rows, kmax),
                        View::rows(qb, rows, hd),
                    );
                }
            }
        });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::test_values::uniform(n, seed, -1.0, 1.0)
    }

    /// The whole-matrix definition in f64: per query head, `P = softmax(q k^T * scale)` over the
    /// keys up to its position, `o = P v`, and the gradients of `sum(o * dy)`.
    #[allow(clippy::type_complexity)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dy: &[f32],
        s: AttentionShape,
        scale: f32,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let hd = s.head_dim;
        let past = s.keys - s.seq;
        let (mut o, mut dq, mut dk, mut dv) = (
            vec![0f64; q.len()],
            vec![0f64; q.len()],
            vec![0f64; k.len()],
            vec![0f64; v.len()],
        );
        for bh in 0..s.batch * s.kv_heads {
            let kb = bh * s.keys * hd;
            for g in 0..s.group {
                for r in 0..s.seq {
                    let qi = ((bh * s.group + g) * s.seq + r) * hd;
                    let seen = past + r + 1;
                    let sc: Vec<f64> = (0..seen)
                        .map(|j| {
                            (0..hd)
                                .map(|d| q[qi + d] as f64 * k[kb + j * hd + d] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                    for d in 0..hd {
                        o[qi + d] = (0..seen).map(|j| p[j] * v[kb + j * hd + d] as f64).sum();
                    }
                    let dp: Vec<f64> = (0..seen)
                        .map(|j| {
                            (0..hd)
                                .map(|d| dy[qi + d] as f64 * v[kb + j * hd + d] as f64)
                                .sum()
                        })
                        .collect();
                    let dot: f64 = (0..seen).map(|j| dp[j] * p[j]).sum();
                    for j in 0..seen {
                        let ds = p[j] * (dp[j] - dot) * scale as f64;
                        for d in 0..hd {
                            dv[kb + j * hd + d] += p[j] * dy[qi + d] as f64;
                            dq[qi + d] += ds * k[kb + j * hd + d] as f64;
                            dk[kb + j * hd + d] += ds * q[qi + d] as f64;
                        }
                    }
                }
            }
        }
        (o, dq, dk, dv)
    }

    fn max_err(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
        a.iter()
            .zip(b)
            .fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
            / scale
    }

    /// The blocked kernels give the whole-matrix definition's output and gradients: ragged and
    /// whole blocks, one and several query heads per KV head, with and without cached keys.
    #[test]
    fn blocks_give_the_whole_matrix_attention_and_its_gradients() {
        let cases = [
            (2, 2, 3, 130, 0, 16), // three blocks, the last ragged; grouped queries
            (1, 1, 1, 64, 0, 8),   // one whole block
            (1, 3, 2, 70, 5, 32),  // cached keys before the new positions
            (1, 1, 1, 1, 9, 16),   // one new position (decoding shape)
        ];
        for (i, &(batch, kv_heads, group, seq, past, head_dim)) in cases.iter().enumerate() {
            let s = AttentionShape {
                batch,
                kv_heads,
                group,
                seq,
                keys: past + seq,
                head_dim,
            };
            let seed = 10 * i as u64;
            let (q, k, v, dy) = (
                values(s.query_len(), seed + 1),
                values(s.key_len(), seed + 2),
                values(s.key_len(), seed + 3),
                values(s.query_len(), seed + 4),
            );
            let scale = 1.0 / (head_dim as f32).sqrt();
            let (o, dq, dk, dv) = reference(&q, &k, &v, &dy, s, scale);
            let out = causal_attention(&q, &k, &v, s, scale);
            let (gq, gk, gv) = causal_attention_backward(&q, &k, &v, &dy, s, scale);
            for (name, got, want) in [
                ("output", &out, &o),
                ("dq", &gq, &dq),
                ("dk", &gk, &dk),
                ("dv", &gv, &dv),
            ] {
                let e = max_err(got, want);
                assert!(e < 1e-5, "case {i} {name}: relative error {e}");
            }
        }
    }
}
