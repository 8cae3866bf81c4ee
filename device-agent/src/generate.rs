//! Text generation with a KV cache: greedy decoding or temperature + nucleus (top-p) sampling
//! from a seeded RNG, streaming each piece of text as it is produced.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::lora::Adapter;
use crate::model::{HostDecoder, KvCache, Llama};
use crate::tokenizer::{Tok, TokenizerError};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Temperature and nucleus mass; `top_p = 1.0` samples the full distribution.
    TopP {
        temperature: f32,
        top_p: f32,
    },
}

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
}

/// What came out.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    /// Seconds spent on the prompt (prefill) and on generating the new tokens.
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// Pick a token from logits.
pub fn sample(logits: &[f32], sampling: Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    match sampling {
        Sampling::Greedy => argmax(),
        Sampling::TopP { temperature, top_p } => {
            if temperature <= 0.0 {
                return argmax();
            }
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut probs: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
                .collect();
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let total: f32 = probs.iter().map(|p| p.1).sum();
            let mut kept = 0.0;
            let mut n = 0;
            for p in &probs {
                kept += p.1 / total;
                n += 1;
                if kept >= top_p {
                    break;
                }
            }
            let probs = &probs[..n.max(1)];
            let mass: f32 = probs.iter().map(|p| p.1).sum();
            let mut u = rng.random::<f32>() * mass;
            for p in probs {
                u -= p.1;
                if u <= 0.0 {
                    return p.0;
                }
            }
            probs[probs.len() - 1].0
        }
    }
}

/// Generate a continuation of `prompt_ids`, calling `on_text` with each new piece of text.
pub fn generate(
    model: &Llama,
    tok: &Tok,
    adapter: Option<&Adapter>,
    prompt_ids: &[u32],
    cfg: &GenerateConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, TokenizerError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let stop = tok.stop_ids();
    let mut cache = KvCache::new(model.config.n_layers());
    let budget = model.config.max_seq_len.saturating_sub(prompt_ids.len());
    let max_new = cfg.max_new_tokens.min(budget);
    let t0 = std::time::Instant::now();
    // The last position's hidden state (one row): its logits.
    let last = |h: burn::tensor::Tensor<2>| -> Vec<f32> {
        model
            .logits(h)
            .into_data()
            .try_to_vec()
            .expect("the model computes in f32, so its logits are f32")
    };
    // Decoded tokens skip burn's tensors where the base is Q8_0 on flex.
    let host = HostDecoder::new(model, adapter);
    let mut logits = crate::backend::on_pool(|| {
        last(model.hidden_last(
            model.tokens_tensor(&[prompt_ids.to_vec()]),
            adapter,
            Some(&mut cache),
        ))
    });
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut out: Vec<u32> = Vec::new();
    for _ in 0..max_new {
        let next = sample(&logits, cfg.sampling, &mut rng);
        if stop.contains(&next) {
            break;
        }
        out.push(next);
        let piece = tok.decode_delta(&out, out.len() - 1)?;
        on_text(&piece);
        if out.len() == max_new {
            break;
        }
        // The host decoder runs its parallel sections on its own team from this thread;
        // only the tensor path needs a rayon worker to run on.
        logits = match host.as_ref().and_then(|h| h.logits(&[next], &mut cache)) {
            Some(l) => l,
            None => crate::backend::on_pool(|| {
                last(model.hidden_last(
                    model.tokens_tensor(&[vec![next]]),
                    adapter,
                    Some(&mut cache),
                ))
            }),
        };
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(Generation {
        prompt_tokens: prompt_ids.len(),
        text: tok.decode(&out)?,
        tokens: out,
        prefill_s,
        decode_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_p_is_seeded() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(sample(&logits, Sampling::Greedy, &mut rng), 1);
        // A tiny nucleus keeps only the best token.
        let s = Sampling::TopP {
            temperature: 1.0,
            top_p: 0.01,
        };
        assert_eq!(sample(&logits, s, &mut rng), 1);
        let s = Sampling::TopP {
            temperature: 1.0,
            top_p: 1.0,
        };
        let a: Vec<u32> = {
            let mut r = ChaCha8Rng::seed_from_u64(9);
            (0..50).map(|_| sample(&logits, s, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = ChaCha8Rng::seed_from_u64(9);
            (0..50).map(|_| sample(&logits, s, &mut r)).collect()
        };
        assert_eq!(a, b);
        assert!(a.contains(&1) && a.contains(&2));
    }
}
