//! [`QuantBase`]: a whole model's frozen base held in Q8_0, and the lookups and products the
//! forward pass takes from it (embedding rows, LM head logits).

use std::sync::Arc;

use burn::tensor::{Int, Tensor, TensorData};
use protocol::Proj;

use super::{expect_quant, matmul_tensors, QMatrix, QuantReport};

/// A model's frozen base in Q8_0: the embedding table (also the LM head when tied), the untied
/// LM head, and per block the seven projections in [`Proj::ALL`] order, each `[out, in]`.
#[derive(Debug, Clone)]
pub struct QuantBase {
    pub embed: QMatrix,
    pub lm_head: Option<QMatrix>,
    /// Shared, so a product under autodiff can keep its matrix for the backward pass.
    pub blocks: Vec<Vec<Arc<QMatrix>>>,
}

impl QuantBase {
    /// Bytes held by all the quantized matrices.
    pub fn bytes(&self) -> usize {
        self.embed.bytes()
            + self.lm_head.as_ref().map_or(0, QMatrix::bytes)
            + self
                .blocks
                .iter()
                .flatten()
                .map(|m| m.bytes())
                .sum::<usize>()
    }

    /// What holding this base saves: its bytes, and those of the fp32 matrices it stands for.
    pub fn report(&self) -> QuantReport {
        let all = std::iter::once(&self.embed)
            .chain(self.lm_head.as_ref())
            .chain(self.blocks.iter().flatten().map(|m| &**m));
        QuantReport {
            fp32_bytes: all.map(|m| 4 * m.rows() * m.cols()).sum(),
            quant_bytes: self.bytes(),
        }
    }

    /// The projection `p` of block `l`.
    pub fn proj(&self, l: usize, p: Proj) -> &Arc<QMatrix> {
        &self.blocks[l][p.index()]
    }

    /// Embedding rows of token ids, `[ids.len(), d_model]` row-major.
    pub fn embed_rows(&self, ids: &[i64]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * self.embed.cols);
        for &t in ids {
            let t = usize::try_from(t)
                .ok()
                .filter(|&t| t < self.embed.rows)
                .unwrap_or_else(|| {
                    panic!("token id {t} outside the vocabulary of {}", self.embed.rows)
                });
            out.extend(self.embed.dequantize_row(t));
        }
        out
    }

    /// Embeddings `[batch, seq]` -> `[batch * seq, d_model]`.
    pub fn embed_tokens(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let device = tokens.device();
        let [b, s] = tokens.dims();
        let ids: Vec<i64> = tokens
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .expect("token ids convert to i64");
        let rows = self.embed_rows(&ids);
        Tensor::from_data(TensorData::new(rows, [b * s, self.embed.cols]), &device)
    }

    /// LM head logits of hidden rows `[n, d_model]` -> `[n, vocab]`.
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        expect_quant(matmul_tensors(&[head], hidden)).remove(0)
    }
}
