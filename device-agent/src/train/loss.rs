//! The training loss: micro-batches of token rows with per-position targets, and the
//! cross-entropy computed in row chunks straight from the final hidden states. For each chunk
//! the logits, the loss and its gradient with respect to the hidden rows are formed by hand
//! (softmax minus one-hot, times the LM head), so the `[tokens, vocab]` logits never exist at
//! once and never enter the autodiff graph.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::bf16::{PackedHead, Precision};
use crate::kernels::Layout;
use crate::model::Llama;

/// Rows of logits formed at once in the training loss (the peak holds `CE_CHUNK_ROWS * vocab`
/// logits, their gradient and the cross-entropy's buffers). With an fp32 head the `gemm` crate
/// copies the whole head (28 M values for the default model) into its panels for every chunk's
/// product, forward and backward: 256 rows, against scoring's 128 ([`crate::eval::LOGIT_CHUNK_ROWS`]),
/// halve those copies; the rank-16 fp32 step of b4 x s256 ran 1.04-1.07x faster in five
/// alternated runs on the AVX-512 host of session 37 (three rounds of `cargo bench -p
/// device-agent --bench speed -- step 0 16`, two of `-- bf16`) for 49 MiB more peak RSS, and
/// 512 rows ran 0.93-0.95x (BENCHMARKS.md).
pub const CE_CHUNK_ROWS: usize = 256;

/// One micro-batch: token rows of equal length and, per position (row-major), the token to
/// predict there (`None` = no loss at this position).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub tokens: Vec<Vec<u32>>,
    pub targets: Vec<Option<u32>>,
}

impl Batch {
    /// Causal-LM batch from windows of `L + 1` tokens: inputs `w[..L]`, targets `w[1..]`.
    pub fn lm(windows: &[Vec<u32>]) -> Batch {
        let tokens: Vec<Vec<u32>> = windows.iter().map(|w| w[..w.len() - 1].to_vec()).collect();
        let targets = windows
            .iter()
            .flat_map(|w| w[1..].iter().map(|&t| Some(t)))
            .collect();
        Batch { tokens, targets }
    }

    pub fn n_targets(&self) -> usize {
        self.targets.iter().filter(|t| t.is_some()).count()
    }
}

/// What one micro-batch measured.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over the targets (nats).
    pub loss: f64,
    pub targets: usize,
    pub correct: usize,
}

/// Chunked cross-entropy from hidden rows: returns (sum of NLL, correct argmax count, dL/dh)
/// where `L = sum NLL / norm`. With bf16 products, `packed` is the model's LM head packed for
/// training ([`Llama::bf16_head`] with gradients), which a caller taking many steps keeps
/// ([`crate::train::Tuner`] does); without it the head is packed here, for this call.
///
/// Only rows with a target reach the LM head: where some rows have none (a classification
/// batch has one target per sequence, a masked chat batch none over its prompts), those with
/// one are gathered first and their gradient put back in place; rows without a target get a
/// zero gradient, as they would through the head. A batch whose every row has a target (causal
/// LM) takes the head in place, chunk by chunk.
pub fn chunked_ce(
    model: &Llama,
    h: Tensor<2>,
    targets: &[Option<u32>],
    norm: f64,
    packed: Option<&PackedHead>,
) -> (f64, usize, Tensor<2>) {
    let [n, d] = h.dims();
    assert_eq!(n, targets.len(), "one target slot per hidden row");
    let rows: Vec<i64> = (0..n)
        .filter(|&r| targets[r].is_some())
        .map(|r| r as i64)
        .collect();
    if rows.len() == n || rows.is_empty() {
        return ce_rows(model, h, targets, norm, packed);
    }
    let m = rows.len();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(rows, [m]), &model.device);
    let kept: Vec<Option<u32>> = targets.iter().copied().filter(Option::is_some).collect();
    let (nll, correct, dh_kept) = ce_rows(model, h.select(0, idx.clone()), &kept, norm, packed);
    let dh = Tensor::<2>::zeros([n, d], &model.device).select_assign(
        0,
        idx,
        dh_kept,
        burn::tensor::IndexingUpdateOp::Add,
    );
    (nll, correct, dh)
}

/// [`chunked_ce`] over every row of `h` (a chunk without any target skips the head).
fn ce_rows(
    model: &Llama,
    h: Tensor<2>,
    targets: &[Option<u32>],
    norm: f64,
    packed: Option<&PackedHead>,
) -> (f64, usize, Tensor<2>) {
    let [n, d] = h.dims();
    let device = model.device.clone();
    // [vocab, d]: a Q8_0 head dequantized a chunk of rows at a time, or fp32 rows.
    let q8_head = model.quant_fp32_head();
    let head = q8_head.is_none().then(|| model.head_rows());
    // With bf16 products the head is rounded and packed once for all chunks (or was, by the
    // caller); a head handed in for another precision is not used.
    let bf16 = head.is_some() && model.precision() == Precision::Bf16;
    let own = (bf16 && packed.is_none())
        .then(|| model.bf16_head(true))
        .flatten();
    let packed = if bf16 { packed.or(own.as_ref()) } else { None };
    let head_product = |hc: Tensor<2>| match (q8_head, &head) {
        (Some(w), _) => crate::quant::frozen::logits(hc, w),
        (None, Some(h)) => match packed.as_ref().and_then(|p| p.logits(&hc)) {
            Some(logits) => logits,
            None => {
                let ht = h.clone().transpose();
                crate::kernels::sgemm::matmul(&hc, h, Layout::Transposed)
                    .or_else(|| crate::kernels::matmul(&hc, &ht))
                    .unwrap_or_else(|| hc.matmul(ht))
            }
        },
        (None, None) => unreachable!("fp32 head rows are taken when there is no Q8_0 head"),
    };
    let head_backward = |dlogits: Tensor<2>| match (q8_head, &head) {
        (Some(w), _) => crate::quant::frozen::logits_backward(dlogits, w),
        (None, Some(h)) => match packed.as_ref().and_then(|p| p.input_grad(&dlogits)) {
            Some(dh) => dh,
            None => crate::kernels::sgemm::matmul(&dlogits, h, Layout::Plain)
                .or_else(|| crate::kernels::matmul(&dlogits, h))
                .unwrap_or_else(|| dlogits.matmul(h.clone())),
        },
        (None, None) => unreachable!("fp32 head rows are taken when there is no Q8_0 head"),
    };
    let mut nll = 0.0;
    let mut correct = 0;
    let mut grads = Vec::new();
    let mut start = 0;
    while start < n {
        let len = CE_CHUNK_ROWS.min(n - start);
        let tg = &targets[start..start + len];
        if tg.iter().all(Option::is_none) {
            grads.push(Tensor::zeros([len, d], &device));
            start += len;
            continue;
        }
        let hc = h.clone().narrow(0, start, len);
        let logits = head_product(hc); // [len, vocab]
                                       // One fused pass on the CPU backend (loss, predictions and gradient together).
        if let Some((dlogits, row_nll, pred)) =
            crate::kernels::cross_entropy_rows(&logits, tg, (1.0 / norm) as f32)
        {
            for ((t, l), p) in tg.iter().zip(&row_nll).zip(&pred) {
                if let Some(t) = t {
                    nll += f64::from(*l);
                    correct += usize::from(*p == *t as usize);
                }
            }
            grads.push(head_backward(dlogits));
            start += len;
            continue;
        }
        // Predictions in one pass; probabilities from the backend's fused row softmax (one
        // vectorised, row-parallel pass, where exp element by element is scalar).
        let pred = logits.clone().argmax(1); // [len, 1]
        let logits_for_loss = logits.clone();
        let probs = crate::kernels::softmax_last(&logits).unwrap_or_else(|| softmax(logits, 1));
        let idx: Vec<i64> = tg.iter().map(|t| t.unwrap_or(0) as i64).collect();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [len, 1]), &device);
        let w: Vec<f32> = tg
            .iter()
            .map(|t| if t.is_some() { 1.0 } else { 0.0 })
            .collect();
        // The exact loss, -log_softmax at the target (no underflow of a tiny probability).
        let lp_tgt: Vec<f32> = log_softmax(logits_for_loss, 1)
            .gather(1, idx.clone())
            .into_data()
            .try_to_vec()
            .expect("log-probabilities of f32 logits are f32");
        nll += lp_tgt
            .iter()
            .zip(&w)
            .map(|(&lp, &wi)| -f64::from(lp) * f64::from(wi))
            .sum::<f64>();
        let w = Tensor::<2>::from_data(TensorData::new(w.clone(), [len, 1]), &device);
        let pred: Vec<i64> = pred
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .expect("argmax indices converted to i64 on the line above");
        for (k, t) in tg.iter().enumerate() {
            if let Some(t) = t {
                if pred[k] == *t as i64 {
                    correct += 1;
                }
            }
        }
        // dNLL/dlogits = (softmax - onehot) * w / norm.
        let w = w.div_scalar(norm);
        let dlogits =
            (probs * w.clone()).scatter(1, idx, w.neg(), burn::tensor::IndexingUpdateOp::Add);
        grads.push(head_backward(dlogits));
        start += len;
    }
    (nll, correct, Tensor::cat(grads, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use burn::tensor::Device;

    fn tiny() -> Llama {
        let mut c = ModelConfig::dense(40, 16, 3, 4, 2, 4, 32, true);
        c.max_seq_len = 32;
        Llama::random(c, 11, &Device::flex())
    }

    #[test]
    fn manual_ce_gradient_matches_autodiff() {
        let m = tiny();
        let h = Tensor::<2>::random(
            [6, 16],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &m.device,
        );
        let targets = vec![Some(3), None, Some(7), Some(39), None, Some(0)];
        let (nll, _, dh) = chunked_ce(&m, h.clone(), &targets, 4.0, None);
        // Autodiff reference.
        let leaf = h.clone().autodiff().require_grad();
        let lp = log_softmax(m.logits(leaf.clone()), 1);
        let mut loss: Option<Tensor<1>> = None;
        for (r, t) in targets.iter().enumerate() {
            if let Some(t) = t {
                let x = lp
                    .clone()
                    .narrow(0, r, 1)
                    .narrow(1, *t as usize, 1)
                    .reshape([1])
                    .neg();
                loss = Some(match loss {
                    Some(l) => l + x,
                    None => x,
                });
            }
        }
        let loss = loss.unwrap();
        let want_nll: f32 = loss.clone().inner().into_scalar();
        assert!((nll - want_nll as f64).abs() < 1e-4);
        let grads = loss.div_scalar(4.0).backward();
        let g: Vec<f32> = leaf.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
        let ours: Vec<f32> = dh.into_data().try_to_vec().unwrap();
        for (a, b) in g.iter().zip(&ours) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn only_rows_with_targets_reach_the_head() {
        // A classification-like batch: 300 rows over three logit chunks, one target in 50.
        let m = tiny();
        let h = Tensor::<2>::random(
            [300, 16],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &m.device,
        );
        let targets: Vec<Option<u32>> = (0..300)
            .map(|r| (r % 50 == 49).then_some((r % 40) as u32))
            .collect();
        let (nll, correct, dh) = chunked_ce(&m, h.clone(), &targets, 6.0, None);
        let (want_nll, want_correct, want_dh) = ce_rows(&m, h, &targets, 6.0, None);
        assert!(
            (nll - want_nll).abs() < 1e-5 * want_nll.abs().max(1.0),
            "{nll} vs {want_nll}"
        );
        assert_eq!(correct, want_correct);
        let ours: Vec<f32> = dh.into_data().try_to_vec().unwrap();
        let want: Vec<f32> = want_dh.into_data().try_to_vec().unwrap();
        assert_eq!(ours.len(), 300 * 16);
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            if targets[i / 16].is_none() {
                assert_eq!(*a, 0.0, "row {} has no target", i / 16);
            }
            assert!((a - b).abs() < 1e-6, "element {i}: {a} vs {b}");
        }
    }
}
