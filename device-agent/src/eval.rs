//! Evaluation: perplexity and next-token accuracy of a model (optionally with an adapter) on
//! token sequences, computed in row chunks so the `[tokens, vocab]` logits never exist at once.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::lora::Adapter;
use crate::model::Llama;

/// Language-model metrics over a set of windows.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LmMetrics {
    /// Mean negative log-likelihood per predicted token (nats).
    pub nll: f64,
    pub perplexity: f64,
    /// Fraction of positions whose argmax equals the next token.
    pub accuracy: f64,
    pub tokens: usize,
}

impl LmMetrics {
    /// Metrics from summed NLL (nats), correct predictions and scored positions (NaN when
    /// nothing was scored).
    pub fn from_sums(nll: f64, correct: usize, count: usize) -> Self {
        let per = |x: f64| {
            if count > 0 {
                x / count as f64
            } else {
                f64::NAN
            }
        };
        let mean = per(nll);
        LmMetrics {
            nll: mean,
            perplexity: mean.exp(),
            accuracy: per(correct as f64),
            tokens: count,
        }
    }
}

/// Rows of logits computed at once when scoring (bounds memory at `CHUNK * vocab` floats).
pub const LOGIT_CHUNK_ROWS: usize = 128;

/// Sum of NLL and count of correct argmax predictions over `hidden` rows vs `targets`
/// (rows whose target is `None` are skipped).
pub fn score_rows(
    model: &Llama,
    hidden: Tensor<2>,
    targets: &[Option<u32>],
) -> (f64, usize, usize) {
    let [n, d] = hidden.dims();
    assert_eq!(n, targets.len());
    let mut nll = 0.0;
    let mut correct = 0;
    let mut count = 0;
    let mut start = 0;
    // With bf16 products the head is rounded and packed once for all chunks.
    let packed = model.bf16_head(false);
    while start < n {
        let len = LOGIT_CHUNK_ROWS.min(n - start);
        let rows: Vec<usize> = (start..start + len)
            .filter(|&r| targets[r].is_some())
            .collect();
        if !rows.is_empty() {
            let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let sel = hidden.clone().select(
                0,
                Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &model.device),
            );
            let sel = sel.reshape([rows.len(), d]);
            let logits = match packed.as_ref().and_then(|p| p.logits(&sel)) {
                Some(logits) => logits,
                None => model.logits(sel),
            };
            let tgt: Vec<i64> = rows
                .iter()
                .map(|&r| targets[r].unwrap_or(0) as i64)
                .collect();
            let tgt =
                Tensor::<2, Int>::from_data(TensorData::new(tgt, [rows.len(), 1]), &model.device);
            let pred: Vec<i64> = logits
                .clone()
                .argmax(1)
                .into_data()
                .convert::<i64>()
                .try_to_vec()
                .expect("argmax indices converted to i64 on the line above");
            let lp = crate::kernels::log_softmax_last(&logits)
                .unwrap_or_else(|| log_softmax(logits, 1))
                .gather(1, tgt);
            let lp: Vec<f32> = lp
                .into_data()
                .try_to_vec()
                .expect("log-probabilities of f32 logits are f32");
            for (k, &r) in rows.iter().enumerate() {
                nll -= lp[k] as f64;
                if pred[k] == targets[r].unwrap_or(u32::MAX) as i64 {
                    correct += 1;
                }
                count += 1;
            }
        }
        start += len;
    }
    (nll, correct, count)
}

/// Perplexity and accuracy over windows of token ids (each window predicts its own next tokens).
pub fn evaluate_windows(
    model: &Llama,
    adapter: Option<&Adapter>,
    windows: &[Vec<u32>],
    batch: usize,
) -> LmMetrics {
    let mut nll = 0.0;
    let mut correct = 0;
    let mut count = 0;
    // Group windows of equal length so a batch is rectangular.
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        let mut j = i;
        while j < windows.len() && j - i < batch.max(1) && windows[j].len() == len {
            j += 1;
        }
        let group = &windows[i..j];
        if len >= 2 {
            let targets: Vec<Option<u32>> = group
                .iter()
                .flat_map(|w| (0..len).map(move |t| w.get(t + 1).copied()))
                .collect();
            let (s, c, n) = crate::backend::on_pool(|| {
                let hidden = model.hidden(model.tokens_tensor(group), adapter, None);
                score_rows(model, hidden, &targets)
            });
            nll += s;
            correct += c;
            count += n;
        }
        i = j;
    }
    LmMetrics::from_sums(nll, correct, count)
}

/// Split a token stream into consecutive windows of `len` tokens (the tail shorter window is
/// kept if it has at least two tokens).
pub fn windows(ids: &[u32], len: usize) -> Vec<Vec<u32>> {
    ids.chunks(len.max(2))
        .filter(|c| c.len() >= 2)
        .map(<[u32]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use burn::tensor::Device;

    #[test]
    fn chunked_scoring_matches_a_direct_log_softmax() {
        let mut c = ModelConfig::dense(300, 16, 1, 2, 1, 8, 24, true);
        c.max_seq_len = 700;
        let m = Llama::random(c, 5, &Device::flex());
        let ids: Vec<u32> = (0..600).map(|i| (i * 7 % 300) as u32).collect();
        let got = evaluate_windows(&m, None, std::slice::from_ref(&ids), 1);
        // Direct: full logits at once.
        let logits = m.forward(m.tokens_tensor(std::slice::from_ref(&ids)), None);
        let lp = log_softmax(logits, 1);
        let rows = crate::model::to_rows(lp);
        let mut nll = 0.0;
        for t in 0..599 {
            nll -= rows[t][ids[t + 1] as usize] as f64;
        }
        let want = nll / 599.0;
        assert_eq!(got.tokens, 599);
        assert!((got.nll - want).abs() < 1e-5, "{} vs {want}", got.nll);
        assert!((0.0..=1.0).contains(&got.accuracy));
    }
}
