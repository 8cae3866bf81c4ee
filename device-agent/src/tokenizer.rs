//! Tokenizer: a byte-level BPE built from a GGUF file's `tokenizer.ggml.*` metadata (or loaded
//! from an HF `tokenizer.json`), its special tokens, and the ChatML prompt template used by
//! instruct models such as SmolLM2.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::gguf::{GgufError, GgufFile, Value};

/// Errors building or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2')")]
    UnsupportedModel { path: String, model: String },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

/// Default system prompt of the SmolLM2 instruct template.
pub const SMOLLM_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// The ChatML marker that closes a message (followed by a newline in the rendered chat).
pub const CHATML_END: &str = "<|im_end|>";

/// The ChatML text that opens a message of `role`; the content follows, then [`CHATML_END`]
/// and a newline.
pub fn chatml_header(role: &str) -> String {
    format!("<|im_start|>{role}\n")
}

/// A tokenizer with the ids of the special tokens we use.
#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: u32,
    /// Whether the vocabulary has the ChatML markers.
    pub chatml: bool,
    /// The chat template string from the checkpoint, if it had one.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

impl Tok {
    /// Build from GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let path = g.path.display().to_string();
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel {
                path,
                model: model.to_string(),
            });
        }
        let strings = |key: &str| -> Result<Vec<String>, TokenizerError> {
            let arr = g
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| g.missing(key, "string array"))?;
            arr.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| TokenizerError::Invalid {
                    path: path.clone(),
                    what: format!("'{key}' holds non-string entries"),
                })
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges_raw = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merges = Vec::with_capacity(merges_raw.len());
        for m in &merges_raw {
            let (a, b) = m.split_once(' ').ok_or_else(|| TokenizerError::Invalid {
                path: path.clone(),
                what: format!("merge '{m}' is not two space-separated tokens"),
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tk_err)?;
        let mut tk = Tokenizer::new(bpe);
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        tk.with_pre_tokenizer(Some(pre));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, &ty)| ty == 3 || ty == 4)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        tk.add_special_tokens(&specials);
        let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
            let Some(v) = g.get(key).and_then(Value::as_u64) else {
                return Ok(None);
            };
            u32::try_from(v)
                .map(Some)
                .map_err(|_| TokenizerError::Invalid {
                    path: path.clone(),
                    what: format!("'{key}' is {v}, not a token id"),
                })
        };
        let eos = id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| g.missing("tokenizer.ggml.eos_token_id", "token id"))?;
        let chat_template = g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self::finish(
            tk,
            id("tokenizer.ggml.bos_token_id")?,
            eos,
            chat_template,
        ))
    }

    /// Load an HF `tokenizer.json`; special-token ids come from `config.json`-style hints or
    /// the ChatML markers.
    pub fn from_file(
        path: &Path,
        bos: Option<u32>,
        eos: Option<u32>,
        chat_template: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let tk = Tokenizer::from_file(path).map_err(|e| TokenizerError::Invalid {
            path: path.display().to_string(),
            what: e.to_string(),
        })?;
        let eos = eos
            .or_else(|| tk.token_to_id("<|im_end|>"))
            .or_else(|| tk.token_to_id("</s>"))
            .or_else(|| tk.token_to_id("<|endoftext|>"))
            .ok_or_else(|| TokenizerError::Invalid {
                path: path.display().to_string(),
                what: "no end-of-sequence token found".into(),
            })?;
        Ok(Self::finish(tk, bos, eos, chat_template))
    }

    fn finish(tk: Tokenizer, bos: Option<u32>, eos: u32, chat_template: Option<String>) -> Self {
        let chatml =
            tk.token_to_id("<|im_start|>").is_some() && tk.token_to_id("<|im_end|>").is_some();
        Tok {
            inner: tk,
            bos,
            eos,
            chatml,
            chat_template,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encode text (special-token strings in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(tk_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The system message a chat starts with when it brings none (SmolLM2's own when the
    /// checkpoint's template names it).
    pub fn default_system(&self) -> &'static str {
        match &self.chat_template {
            Some(t) if t.contains(SMOLLM_SYSTEM) => SMOLLM_SYSTEM,
            _ => "You are a helpful assistant.",
        }
    }

    /// A ChatML prompt for one user turn, ready for the assistant's answer.
    pub fn chat_prompt(&self, user: &str, system: Option<&str>) -> String {
        let system = system.unwrap_or_else(|| self.default_system());
        format!(
            "{}{system}{CHATML_END}\n{}{user}{CHATML_END}\n{}",
            chatml_header("system"),
            chatml_header("user"),
            chatml_header("assistant")
        )
    }

    /// Token ids that end generation.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut v = vec![self.eos];
        for t in ["<|im_end|>", "<|endoftext|>"] {
            if let Some(id) = self.token_to_id(t) {
                if !v.contains(&id) {
                    v.push(id);
                }
            }
        }
        v
    }

    /// The tokenizer as HF `tokenizer.json` text (for export).
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(false).map_err(tk_err)
    }

    /// Incremental decoding for streaming output: returns the text that `ids[..]` adds beyond
    /// what `ids[..n_prev]` decoded to, holding back incomplete UTF-8.
    pub fn decode_delta(&self, ids: &[u32], n_prev: usize) -> Result<String, TokenizerError> {
        let prev = self.decode(&ids[..n_prev])?;
        let now = self.decode(ids)?;
        if now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(now.get(prev.len()..).unwrap_or("").to_string())
    }
}
