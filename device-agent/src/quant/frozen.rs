//! Training over a Q8_0 frozen base (`tune --base-precision q8_0`), as QLoRA does it: the base
//! stays quantized in memory and each product dequantizes its weight to fp32 for the length of
//! one matrix product, forward `y = x Wᵀ` and input gradient `dx = dy W`; the weight gets no
//! gradient, and the LoRA factors, the optimiser and the loss stay fp32. A product therefore
//! computes exactly what an fp32 model holding the dequantized weights computes (same values,
//! same flex matrix product), which is what the tests hold it to; the only difference from an
//! fp32 base is the weights' quantization error.
//!
//! Serving takes the same products for a prompt's many rows ([`super::QuantArithmetic::Serving`]);
//! the row dequantization here is compiled per instruction set. Unlike
//! [`super::matmul_tensors`] (a decoded token's: the activations are quantized to Q8_0 too and
//! the sums are int8), nothing here quantizes activations or gradients. The transient fp32 copy
//! of one projection is at most `[1536, 576]` on SmolLM2-135M (3.5 MB), against 540 MB for
//! an fp32 base held whole.
//!
//! Under autodiff the product keeps only the (shared) quantized matrix for its backward pass.
//! It is a flex backend extension; other backends take the same arithmetic through burn's
//! operations.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, Flex};
use burn::tensor::{DType, Device, Tensor, TensorData};

use rayon::prelude::*;

use super::{f16_table, QMatrix, QK};

/// Rows of a Q8_0 matrix that the chunked products ([`logits`], [`logits_backward`])
/// dequantize at a time: 4,096 rows of 576 (9.4 MB) of SmolLM2-135M's 49,152-row LM head.
const CHUNK_ROWS: usize = 4096;

multiversion! {
    /// Row `r` of `m` (`nb` blocks) in fp32 into `o`: each value is its block's `q d` (Q4_0:
    /// `(q - 8) d`) or `q d + m` (Q4_1), GGUF's definition, with `d` and `m` from their f16
    /// bits through `tab`. Compiled per instruction set; the same arithmetic on each.
    fn dequantize_row_into(m: &QMatrix, r: usize, tab: &[f32; 65536], nb: usize, o: &mut [f32]) {
        let mut q = [0i8; QK];
        for (b, ob) in o.chunks_mut(QK).enumerate() {
            let at = r * nb + b;
            m.int8_rows_range(at * QK, (at + 1) * QK, &mut q);
            let s = tab[m.d[at] as usize];
            let (lo, back) = m.m.get(at).map_or((0.0, 0), |&v| (tab[v as usize], 8));
            for (v, &qv) in ob.iter_mut().zip(&q) {
                *v = f32::from(qv + back) * s + lo;
            }
        }
    }
}

impl QMatrix {
    /// The whole matrix in fp32, row-major `[rows, cols]` (the padding of a last partial block
    /// dropped): each value is its block's `q * d`, `d` read from its f16 bits.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(0, self.rows)
    }

    /// Rows `r0..r1` in fp32 into `out`, row-major `[r1 - r0, cols]` (a last partial block's
    /// padding dropped): each value is its block's `q * d` (plus `m` for Q4_1), the parameters
    /// read from their f16 bits.
    pub(crate) fn dequantize_into(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let (tab, cols, nb) = (f16_table(), self.cols, self.nb);
        debug_assert_eq!(out.len(), (r1 - r0) * cols);
        if cols == 0 {
            return;
        }
        let row = |(k, o): (usize, &mut [f32])| dequantize_row_into(self, r0 + k, tab, nb, o);
        if out.len() >= 1 << 16 {
            out.par_chunks_mut(cols).enumerate().for_each(row);
        } else {
            out.chunks_mut(cols).enumerate().for_each(row);
        }
    }

    /// Row `r` dequantized (`cols` values).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.cols];
        self.dequantize_into(r, r + 1, &mut out);
        out
    }

    /// Rows `r0..r1` in fp32, row-major `[r1 - r0, cols]`.
    fn dequantize_rows(&self, r0: usize, r1: usize) -> Vec<f32> {
        let mut out = vec![0f32; (r1 - r0) * self.cols];
        self.dequantize_into(r0, r1, &mut out);
        out
    }

    /// The dequantized matrix as a `[rows, cols]` tensor on `device`.
    pub fn dequantized(&self, device: &Device) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(self.dequantize(), [self.rows, self.cols]),
            device,
        )
    }

    /// Each chunk of [`CHUNK_ROWS`] rows dequantized, with its first row.
    fn row_chunks<'a>(
        &'a self,
        device: &'a Device,
    ) -> impl Iterator<Item = (usize, Tensor<2>)> + 'a {
        (0..self.rows).step_by(CHUNK_ROWS).map(move |r0| {
            let r1 = (r0 + CHUNK_ROWS).min(self.rows);
            let v = self.dequantize_rows(r0, r1);
            (
                r0,
                Tensor::from_data(TensorData::new(v, [r1 - r0, self.cols]), device),
            )
        })
    }
}

/// `h Wᵀ` for a Q8_0 LM head `W` `[vocab, d]` and hidden rows `h` `[n, d]` (no autodiff: the
/// loss forms its gradient by hand), in fp32, dequantizing [`CHUNK_ROWS`] rows of the head at
/// a time so the fp32 head never exists whole.
pub fn logits(h: Tensor<2>, w: &QMatrix) -> Tensor<2> {
    let device = h.device();
    let parts: Vec<Tensor<2>> = w
        .row_chunks(&device)
        .map(|(_, c)| h.clone().matmul(c.transpose()))
        .collect();
    Tensor::cat(parts, 1)
}

/// `dlogits W` (`[n, vocab]` -> `[n, d]`), the hidden rows' gradient through the head, summed
/// over the same chunks of rows.
pub fn logits_backward(dlogits: Tensor<2>, w: &QMatrix) -> Tensor<2> {
    let device = dlogits.device();
    let [n, _] = dlogits.dims();
    w.row_chunks(&device)
        .fold(Tensor::zeros([n, w.cols], &device), |acc, (r0, c)| {
            let rows = c.dims()[0];
            acc + dlogits.clone().narrow(1, r0, rows).matmul(c)
        })
}

/// The frozen Q8_0 product, for flex and autodiff over flex.
#[backend_extension(Flex, Autodiff)]
pub trait FrozenQ8Backend: Backend {
    /// `x Wᵀ` (`x` `[n, cols]`, the result `[n, rows]`), or with `transposed` `x W` (`x` `[n,
    /// rows]`, the result `[n, cols]`), `W` dequantized for this product.
    fn q8_frozen_matmul(
        x: FloatTensor<Self>,
        w: Arc<QMatrix>,
        transposed: bool,
    ) -> FloatTensor<Self>;
}

impl FrozenQ8Backend for Flex {
    fn q8_frozen_matmul(x: FlexTensor, w: Arc<QMatrix>, transposed: bool) -> FlexTensor {
        let deq = FlexTensor::from_data(TensorData::new(w.dequantize(), [w.rows, w.cols]));
        if transposed {
            Flex::float_matmul(x, deq)
        } else {
            Flex::float_matmul(x, Flex::float_swap_dims(deq, 0, 1))
        }
    }
}

/// `dx = dy W` for `y = x Wᵀ` (and `dy Wᵀ` for `y = x W`); no gradient for `W`.
#[derive(Debug)]
struct FrozenQ8Product {
    transposed: bool,
}

impl Backward<Flex, 1> for FrozenQ8Product {
    type State = Arc<QMatrix>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_x {
            let dx = Flex::q8_frozen_matmul(dy, ops.state, !self.transposed);
            grads.register::<Flex>(node.id, dx);
        }
    }
}

impl<C: CheckpointStrategy> FrozenQ8Backend for Autodiff<Flex, C> {
    fn q8_frozen_matmul(
        x: FloatTensor<Self>,
        w: Arc<QMatrix>,
        transposed: bool,
    ) -> FloatTensor<Self> {
        match (FrozenQ8Product { transposed })
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = Flex::q8_frozen_matmul(x.into_primitive(), w.clone(), transposed);
                prep.finish(w, y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::q8_frozen_matmul(x.into_primitive(), w, transposed))
            }
        }
    }
}

/// `x Wᵀ` for a projection held in Q8_0 (`W` `[out, in]`, `x` `[n, in]`), computed in fp32 from
/// the dequantized weight; gradients flow to `x` only.
pub fn matmul(x: Tensor<2>, w: &Arc<QMatrix>) -> Tensor<2> {
    if x.dtype() != DType::F32 || !crate::backend::is_flex(&x.device()) {
        let deq = w.dequantized(&x.device());
        return x.matmul(deq.transpose());
    }
    Tensor::from_dispatch(<Dispatch as FrozenQ8Backend>::q8_frozen_matmul(
        x.into_dispatch(),
        w.clone(),
        false,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::BlockFormat;

    const FORMATS: [BlockFormat; 3] = [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1];

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::test_values::uniform(n, seed, -0.5, 0.5)
    }

    /// Dequantizing gives every row's `dequantize_row`, including a partial last block, and
    /// each row is what the GGUF reader makes of the writer's blocks for it (rows past the
    /// parallel split too).
    #[test]
    fn dequantize_is_every_row_dequantized() {
        for format in FORMATS {
            for (rows, cols) in [(7, 80), (70, 1024)] {
                let v = values(rows * cols, 1);
                let m = QMatrix::quantize(format, &v, rows, cols).unwrap();
                let ty = crate::gguf::GgmlType::from(format);
                let all = m.dequantize();
                for r in 0..rows {
                    let row = &all[r * cols..(r + 1) * cols];
                    assert_eq!(row, &m.dequantize_row(r)[..], "{format} row {r}");
                    let bytes = crate::gguf::writer::quantize(ty, &v[r * cols..(r + 1) * cols]);
                    let file = crate::gguf::dequantize(ty, &bytes, cols);
                    assert_eq!(row, &file[..], "{format} row {r} against the file's");
                }
            }
        }
    }

    /// The product and the input gradient of `sum(y * g)` equal, bit for bit, burn's own product
    /// with an fp32 copy of the dequantized weight, on flex under autodiff.
    #[test]
    fn product_and_input_gradient_are_those_of_the_dequantized_weight() {
        let device = Device::flex().autodiff();
        let (n, rows, cols) = (37, 70, 96);
        for format in FORMATS {
            product_and_gradient(&device, format, n, rows, cols);
        }
    }

    fn product_and_gradient(
        device: &Device,
        format: BlockFormat,
        n: usize,
        rows: usize,
        cols: usize,
    ) {
        let device = device.clone();
        let w = Arc::new(QMatrix::quantize(format, &values(rows * cols, 2), rows, cols).unwrap());
        let g = Tensor::<2>::from_data(TensorData::new(values(n * rows, 3), [n, rows]), &device);
        let x0 = TensorData::new(values(n * cols, 4), [n, cols]);

        let x = Tensor::<2>::from_data(x0.clone(), &device).require_grad();
        let y = matmul(x.clone(), &w);
        let dx = x.grad(&(y.clone() * g.clone()).sum().backward()).unwrap();

        let xr = Tensor::<2>::from_data(x0, &device).require_grad();
        let wr = w.dequantized(&device);
        let yr = xr.clone().matmul(wr.transpose());
        let dxr = xr.grad(&(yr.clone() * g).sum().backward()).unwrap();

        let v = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(v(y), v(yr));
        assert_eq!(dx.into_data().try_to_vec::<f32>().unwrap(), {
            dxr.into_data().try_to_vec::<f32>().unwrap()
        });
    }

    /// The LM head's chunked products, over a head of more than one chunk of rows, equal the
    /// unchunked products within float reordering (the matrix product blocks its sums by shape).
    #[test]
    fn chunked_head_products_are_the_whole_heads() {
        let device = Device::flex();
        let (n, rows, cols) = (3, CHUNK_ROWS + 70, 64);
        let w = QMatrix::quantize(BlockFormat::Q8_0, &values(rows * cols, 6), rows, cols).unwrap();
        let deq = w.dequantized(&device);
        let h = Tensor::<2>::from_data(TensorData::new(values(n * cols, 7), [n, cols]), &device);
        let g = Tensor::<2>::from_data(TensorData::new(values(n * rows, 8), [n, rows]), &device);
        let v = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
        let close = |a: Vec<f32>, b: Vec<f32>| {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
            }
        };
        close(
            v(logits(h.clone(), &w)),
            v(h.matmul(deq.clone().transpose())),
        );
        close(v(logits_backward(g.clone(), &w)), v(g.matmul(deq)));
    }

    /// Tuning over a quantized base (Q8_0 and Q4_0 here) is tuning an fp32 model that holds the
    /// dequantized weights:
    /// the same losses step for step (within float reordering of the two layouts' products),
    /// and after a pruning event, which slices and quantizes the base again, still within the
    /// second rounding of the cut down projections; the quantized matrices take the pruned
    /// shapes.
    #[test]
    fn tuning_over_a_quantized_base_is_tuning_its_dequantized_weights() {
        for precision in [
            crate::quant::BasePrecision::Q8_0,
            crate::quant::BasePrecision::Q4_0,
        ] {
            tune_over(precision);
        }
    }

    fn tune_over(precision: crate::quant::BasePrecision) {
        use crate::lora::Adapter;
        use crate::model::{Llama, ModelConfig};
        use crate::prune::{KeptIndicesExt, PruneConfig};
        use crate::quant::QuantArithmetic;
        use crate::train::{Batch, TrainConfig, Tuner};
        use protocol::{KeptIndices, Proj};

        let mut c = ModelConfig::dense(40, 64, 2, 4, 2, 16, 96, true);
        c.max_seq_len = 32;
        let device = Device::flex();
        let mut q8 = Llama::random(c.clone(), 5, &device);
        q8.set_base_precision(precision).unwrap();
        q8.set_quant_arithmetic(QuantArithmetic::Fp32);
        let mut fp = Llama::random(c.clone(), 5, &device);
        for l in 0..c.n_layers() {
            for p in Proj::ALL {
                *fp.blocks[l].weight_mut(p) = q8.base_weight(l, p);
            }
        }
        fp.embed = q8.head_rows();

        let windows: Vec<Vec<u32>> = (0..2)
            .map(|r| (0..17).map(|i| ((i * 7 + r * 3) % 40) as u32).collect())
            .collect();
        let batch = Batch::lm(&windows);
        let cfg = TrainConfig {
            prune: PruneConfig {
                min_channels_per_block: 8,
                ..PruneConfig::for_layers(c.n_layers())
            },
            ..TrainConfig::default()
        };
        let run = |base: &Llama| {
            let ad = Adapter::new(&c, 4, 8.0, 3, &device);
            let mut t = Tuner::new(base, KeptIndices::dense(&c), ad, cfg.clone()).unwrap();
            let mut losses = Vec::new();
            for k in 0..6 {
                if k == 3 {
                    t.prune_to(0.3).unwrap();
                }
                losses.push(t.train_micro(&batch, 1e-2, true).unwrap().loss);
            }
            (losses, t)
        };
        let (lq, tq) = run(&q8);
        let (lf, tf) = run(&fp);
        for (k, (a, b)) in lq.iter().zip(&lf).enumerate() {
            let tol = if k < 3 { 1e-5 } else { 1e-2 };
            assert!(
                (a - b).abs() <= tol * b.abs(),
                "{precision:?} step {k}: {a} vs {b}"
            );
        }
        assert_eq!(tq.kept, tf.kept, "the same units pruned");
        assert_eq!(tq.model.config.blocks, tf.model.config.blocks);
        assert!(tq.model.config.sparsity() > 0.2);
        let qb = tq.model.quant_base().expect("still held quantized");
        assert_eq!(qb.proj(0, Proj::Down).format(), precision.format().unwrap());
        for (l, shape) in tq.model.config.blocks.iter().enumerate() {
            let (q, ffn) = (shape.n_heads * c.head_dim, shape.ffn_dim);
            assert_eq!(
                [qb.proj(l, Proj::Q).rows(), qb.proj(l, Proj::O).cols()],
                [q, q]
            );
            assert_eq!(
                [qb.proj(l, Proj::Up).rows(), qb.proj(l, Proj::Down).cols()],
                [ffn, ffn]
            );
        }
    }
}
