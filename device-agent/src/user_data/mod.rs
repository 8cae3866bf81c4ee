//! The user's own training data: local files (plain text, JSONL text, chat, instruction and
//! classification records) read into a causal-LM shard with a per-token loss mask or a
//! classification shard, with a seeded held-out split taken from the same files.
//!
//! Chat and instruction records are rendered with ChatML (`<|im_start|>role\ncontent<|im_end|>\n`,
//! the template of SmolLM2-Instruct and other ChatML models) and only the assistant's tokens
//! count in the loss. A model whose vocabulary lacks the ChatML markers is refused for them.

mod parse;
mod render;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::eval::{self, LmMetrics};
use crate::lora::Adapter;
use crate::model::Llama;
use crate::tokenizer::{Tok, TokenizerError};
use crate::train::Batch;
use crate::workload::{ClsShard, SpamTask};

pub use parse::{Format, Message, Record, RecordBody, Role};
pub use render::MaskedTokens;

/// Errors reading the user's data. Every error about a record names the file and the line.
#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {what}")]
    Record {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("{path}:{line}: tokenizing: {source}")]
    Tokenize {
        path: PathBuf,
        line: usize,
        #[source]
        source: TokenizerError,
    },
    #[error("{0}")]
    Invalid(String),
}

/// How the files become training data.
#[derive(Debug, Clone, PartialEq)]
pub struct UserDataConfig {
    /// Tokens a training window predicts (windows hold `seq_len + 1` tokens).
    pub seq_len: usize,
    /// Fraction of items held out for evaluation (at least one item is).
    pub test_fraction: f64,
    /// Seed of the held-out split.
    pub seed: u64,
    /// Text tokens kept per classification example (the prompt is truncated to fit).
    pub max_text_tokens: usize,
}

impl Default for UserDataConfig {
    fn default() -> Self {
        UserDataConfig {
            seq_len: 256,
            test_fraction: 0.1,
            seed: 0,
            max_text_tokens: 192,
        }
    }
}

/// A window of `seq_len + 1` tokens and, per token, whether it is learned (a target).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedWindow {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

/// A causal-LM shard whose windows carry a loss mask.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedShard {
    pub seq_len: usize,
    pub train: Vec<MaskedWindow>,
    pub test: Vec<MaskedWindow>,
}

impl MaskedShard {
    /// The `i`-th training batch of `batch` windows (cycling through the shard): inputs
    /// `w[..L]`, and at position `t` the target `w[t + 1]` where that token is learned.
    pub fn batch(&self, i: usize, batch: usize) -> Batch {
        let n = self.train.len().max(1);
        let windows: Vec<&MaskedWindow> = (0..batch)
            .map(|k| &self.train[(i * batch + k) % n])
            .collect();
        masked_batch(&windows)
    }

    /// Held-out loss and next-token accuracy over the learned tokens only.
    pub fn evaluate(&self, model: &Llama, adapter: Option<&Adapter>) -> LmMetrics {
        let (mut nll, mut correct, mut count) = (0.0, 0, 0);
        for group in self.test.chunks(4) {
            let refs: Vec<&MaskedWindow> = group.iter().collect();
            let b = masked_batch(&refs);
            let (s, c, n) = crate::backend::on_pool(|| {
                let hidden = model.hidden(model.tokens_tensor(&b.tokens), adapter, None);
                eval::score_rows(model, hidden, &b.targets)
            });
            nll += s;
            correct += c;
            count += n;
        }
        LmMetrics::from_sums(nll, correct, count)
    }
}

fn masked_batch(windows: &[&MaskedWindow]) -> Batch {
    let tokens = windows
        .iter()
        .map(|w| w.tokens[..w.tokens.len() - 1].to_vec())
        .collect();
    let targets = windows
        .iter()
        .flat_map(|w| (1..w.tokens.len()).map(|t| w.mask[t].then_some(w.tokens[t])))
        .collect();
    Batch { tokens, targets }
}

/// The user's data, ready for the training paths.
#[derive(Debug, Clone, PartialEq)]
pub enum UserData {
    /// Text, chat and instruction records: masked causal-LM windows.
    Lm(MaskedShard),
    /// `{"text", "label"}` records with two distinct labels: the spam task's item type with
    /// the labels' first tokens as its answers (`labels[1]` is `label = true`).
    Cls {
        task: SpamTask,
        shard: ClsShard,
        labels: [String; 2],
    },
}

/// Read `path` (a file, or a directory whose files are read in name order) into training
/// data for the model of `tok`.
pub fn load(path: &Path, tok: &Tok, cfg: &UserDataConfig) -> Result<UserData, UserDataError> {
    let mut records = Vec::new();
    let mut formats = Vec::new();
    for file in parse::list_files(path)? {
        let (format, recs) = parse::read_file(&file)?;
        formats.push((file, format));
        records.extend(recs);
    }
    let is_cls = |f: &Format| *f == Format::JsonlClassification;
    let n_cls = formats.iter().filter(|(_, f)| is_cls(f)).count();
    if n_cls > 0 && n_cls < formats.len() {
        let (a, _) = formats
            .iter()
            .find(|(_, f)| is_cls(f))
            .expect("mixed: at least one classification file was counted");
        let (b, f) = formats
            .iter()
            .find(|(_, f)| !is_cls(f))
            .expect("mixed: at least one other file was counted");
        return Err(UserDataError::Invalid(format!(
            "{} holds classification records but {} holds {}: train one task at a time",
            a.display(),
            b.display(),
            f.describe()
        )));
    }
    if n_cls > 0 {
        classification(&records, tok, cfg)
    } else {
        language_model(&records, tok, cfg).map(UserData::Lm)
    }
}

/// Shuffle `items` with `seed` and hold out `fraction` of them, at least one.
fn split<T>(mut items: Vec<T>, fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>), String> {
    if items.len() < 2 {
        return Err(format!(
            "{} item(s) in all: the held-out split needs at least two",
            items.len()
        ));
    }
    items.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_test = ((items.len() as f64 * fraction).round() as usize).clamp(1, items.len() - 1);
    let test = items.split_off(items.len() - n_test);
    Ok((items, test))
}

fn tokenize_err(r: &Record) -> impl Fn(TokenizerError) -> UserDataError + '_ {
    move |source| UserDataError::Tokenize {
        path: r.path.clone(),
        line: r.line,
        source,
    }
}

fn language_model(
    records: &[Record],
    tok: &Tok,
    cfg: &UserDataConfig,
) -> Result<MaskedShard, UserDataError> {
    let seq_len = cfg.seq_len.max(1);
    let mut warned = false;
    // Units of the split: pieces of a document, whole conversations.
    let mut units = Vec::new();
    for r in records {
        match &r.body {
            RecordBody::Text(text) => {
                let doc = render::document(tok, text).map_err(tokenize_err(r))?;
                units.extend(render::pieces(doc, seq_len));
            }
            RecordBody::Chat(messages) => {
                if !tok.chatml {
                    return Err(UserDataError::File {
                        path: r.path.clone(),
                        what: "chat and instruction records are rendered with the ChatML \
                               template, and this model's vocabulary has no <|im_start|> and \
                               <|im_end|> tokens"
                            .into(),
                    });
                }
                if !warned
                    && tok
                        .chat_template
                        .as_deref()
                        .is_some_and(|t| !t.contains("<|im_start|>"))
                {
                    tracing::warn!(
                        "the checkpoint's chat template is not ChatML; chat records are rendered with ChatML anyway"
                    );
                    warned = true;
                }
                units.push(render::chat(tok, messages).map_err(tokenize_err(r))?);
            }
            RecordBody::Labelled { .. } => {
                return Err(UserDataError::Record {
                    path: r.path.clone(),
                    line: r.line,
                    what: "a classification record among language-model data".into(),
                })
            }
        }
    }
    let (train, test) = split(units, cfg.test_fraction, cfg.seed).map_err(|e| {
        UserDataError::Invalid(format!(
            "the data gives {e} (add data or lower the sequence length)"
        ))
    })?;
    let shard = MaskedShard {
        seq_len,
        train: render::pack(&train, seq_len, tok.eos),
        test: render::pack(&test, seq_len, tok.eos),
    };
    if shard.train.is_empty() || shard.test.is_empty() {
        return Err(UserDataError::Invalid(
            "the data has no tokens to learn on one side of the held-out split".into(),
        ));
    }
    Ok(shard)
}

fn classification(
    records: &[Record],
    tok: &Tok,
    cfg: &UserDataConfig,
) -> Result<UserData, UserDataError> {
    let mut labels: Vec<&str> = records
        .iter()
        .filter_map(|r| match &r.body {
            RecordBody::Labelled { label, .. } => Some(label.as_str()),
            _ => None,
        })
        .collect();
    labels.sort_unstable();
    labels.dedup();
    let [a, b] = labels.as_slice() else {
        return Err(UserDataError::Invalid(format!(
            "classification data needs exactly two distinct labels; found {}: {:?}",
            labels.len(),
            labels
        )));
    };
    let labels = [a.to_string(), b.to_string()];
    let task = render::label_task(tok, &labels, cfg.max_text_tokens)
        .map_err(|source| UserDataError::Tokenize {
            path: records[0].path.clone(),
            line: records[0].line,
            source,
        })?
        .map_err(UserDataError::Invalid)?;
    let question = render::label_question(&labels);
    let mut examples = Vec::with_capacity(records.len());
    for r in records {
        if let RecordBody::Labelled { text, label } = &r.body {
            let e = render::label_example(tok, &task, &question, text, *label == labels[1])
                .map_err(tokenize_err(r))?;
            examples.push(e);
        }
    }
    let (train, test) = split(examples, cfg.test_fraction, cfg.seed)
        .map_err(|e| UserDataError::Invalid(format!("the data gives {e}")))?;
    Ok(UserData::Cls {
        task,
        shard: ClsShard { train, test },
        labels,
    })
}
