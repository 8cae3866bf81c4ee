//! Local data pipelines for training and evaluation: causal-LM shards (tokenise, pack into
//! fixed-length windows, seeded train/held-out split) and the spam workload as classification
//! through the LM (a prompt ending in "Answer:" followed by a one-token label; loss and
//! accuracy on that token).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::eval::{self, LmMetrics};
use crate::lora::Adapter;
use crate::model::Llama;
use crate::tokenizer::{Tok, TokenizerError};
use crate::train::Batch;

/// A causal-LM shard: windows of `seq_len + 1` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct LmShard {
    pub seq_len: usize,
    pub train: Vec<Vec<u32>>,
    pub test: Vec<Vec<u32>>,
}

impl LmShard {
    /// Tokenise `texts`, pack them end to end (separated by the end-of-text token) into windows
    /// of `seq_len + 1` tokens, shuffle with `seed`, and hold out `test_fraction` of them (at
    /// least one window when there are two or more).
    pub fn build(
        tok: &Tok,
        texts: &[&str],
        seq_len: usize,
        test_fraction: f64,
        seed: u64,
    ) -> Result<Self, TokenizerError> {
        let mut ids = Vec::new();
        for t in texts {
            ids.extend(tok.encode(t)?);
            ids.push(tok.eos);
        }
        let mut windows: Vec<Vec<u32>> =
            ids.chunks_exact(seq_len + 1).map(<[u32]>::to_vec).collect();
        windows.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let n_test = if windows.len() >= 2 {
            ((windows.len() as f64 * test_fraction).round() as usize).max(1)
        } else {
            0
        };
        let test = windows.split_off(windows.len() - n_test);
        Ok(LmShard {
            seq_len,
            train: windows,
            test,
        })
    }

    /// The `i`-th training batch of `batch` windows (cycling through the shard).
    pub fn batch(&self, i: usize, batch: usize) -> Batch {
        let n = self.train.len().max(1);
        let w: Vec<Vec<u32>> = (0..batch)
            .map(|k| self.train[(i * batch + k) % n].clone())
            .collect();
        Batch::lm(&w)
    }

    /// Held-out perplexity and accuracy.
    pub fn evaluate(&self, model: &Llama, adapter: Option<&Adapter>) -> LmMetrics {
        eval::evaluate_windows(model, adapter, &self.test, 4)
    }
}

/// One labelled classification example: prompt ids ending right before the label.
#[derive(Debug, Clone, PartialEq)]
pub struct ClsExample {
    pub prompt: Vec<u32>,
    pub label: bool,
}

/// The spam task: prompt template and the two label tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SpamTask {
    pub yes: u32,
    pub no: u32,
    /// Body tokens kept per e-mail (the prompt is truncated to fit).
    pub max_body_tokens: usize,
}

/// Accuracy and loss on a classification set.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ClsMetrics {
    pub accuracy: f64,
    /// Mean cross-entropy of the label token over the full vocabulary.
    pub loss: f64,
    pub examples: usize,
}

const SPAM_QUESTION: &str = "\n\nQuestion: Is this e-mail spam? Answer:";

impl SpamTask {
    pub fn new(tok: &Tok, max_body_tokens: usize) -> Result<Self, TokenizerError> {
        let one = |s: &str| -> Result<u32, TokenizerError> {
            let ids = tok.encode(s)?;
            match ids.as_slice() {
                [id] => Ok(*id),
                _ => Err(TokenizerError::Tokenizers(format!(
                    "label '{s}' is not a single token"
                ))),
            }
        };
        Ok(SpamTask {
            yes: one(" yes")?,
            no: one(" no")?,
            max_body_tokens,
        })
    }

    pub fn label_token(&self, spam: bool) -> u32 {
        if spam {
            self.yes
        } else {
            self.no
        }
    }

    /// Encode one e-mail.
    pub fn example(&self, tok: &Tok, text: &str, spam: bool) -> Result<ClsExample, TokenizerError> {
        let mut body = tok.encode(text)?;
        body.truncate(self.max_body_tokens);
        body.extend(tok.encode(SPAM_QUESTION)?);
        Ok(ClsExample {
            prompt: body,
            label: spam,
        })
    }

    /// A right-padded batch with a single target per row (the label after the prompt).
    pub fn batch(&self, examples: &[&ClsExample], pad: u32) -> (Batch, Vec<usize>) {
        let len = examples.iter().map(|e| e.prompt.len()).max().unwrap_or(1);
        let mut tokens = Vec::new();
        let mut targets = Vec::new();
        let mut last = Vec::new();
        for e in examples {
            let mut row = e.prompt.clone();
            row.resize(len, pad);
            tokens.push(row);
            for t in 0..len {
                targets.push((t + 1 == e.prompt.len()).then(|| self.label_token(e.label)));
            }
            last.push(e.prompt.len() - 1);
        }
        (Batch { tokens, targets }, last)
    }

    /// Classification accuracy (label with the larger logit of the two) and label loss.
    pub fn evaluate(
        &self,
        model: &Llama,
        adapter: Option<&Adapter>,
        examples: &[ClsExample],
        pad: u32,
        batch: usize,
    ) -> ClsMetrics {
        let mut correct = 0;
        let mut loss = 0.0;
        for chunk in examples.chunks(batch.max(1)) {
            let refs: Vec<&ClsExample> = chunk.iter().collect();
            let (b, last) = self.batch(&refs, pad);
            let len = b.tokens[0].len();
            let rows: Vec<usize> = last.iter().enumerate().map(|(i, &p)| i * len + p).collect();
            let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let lp = crate::backend::on_pool(|| {
                let h = model.hidden(model.tokens_tensor(&b.tokens), adapter, None);
                let sel = h.select(
                    0,
                    burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(
                        burn::tensor::TensorData::new(idx, [rows.len()]),
                        &model.device,
                    ),
                );
                let logits = burn::tensor::activation::log_softmax(model.logits(sel), 1);
                crate::model::to_rows(logits)
            });
            for (e, row) in chunk.iter().zip(&lp) {
                let (y, n) = (row[self.yes as usize], row[self.no as usize]);
                if (y > n) == e.label {
                    correct += 1;
                }
                loss -= row[self.label_token(e.label) as usize] as f64;
            }
        }
        let n = examples.len().max(1) as f64;
        ClsMetrics {
            accuracy: correct as f64 / n,
            loss: loss / n,
            examples: examples.len(),
        }
    }
}

/// A classification shard with a seeded train/test split.
#[derive(Debug, Clone, PartialEq)]
pub struct ClsShard {
    pub train: Vec<ClsExample>,
    pub test: Vec<ClsExample>,
}

impl ClsShard {
    pub fn split(mut examples: Vec<ClsExample>, test_fraction: f64, seed: u64) -> Self {
        examples.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let n_test = ((examples.len() as f64 * test_fraction).round() as usize).min(examples.len());
        let test = examples.split_off(examples.len() - n_test);
        ClsShard {
            train: examples,
            test,
        }
    }
}
