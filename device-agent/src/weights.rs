//! Weight import: GGUF files (architectures `llama` and `deci`, the latter for per-block head
//! and channel counts) and HF checkpoints (`config.json` + `*.safetensors` + `tokenizer.json`),
//! into a [`Llama`] and its [`Tok`].
//!
//! GGUF matrices are `[out, in]` and are transposed to burn's `[in, out]`. GGUF q/k rows are
//! permuted for interleaved-pair RoPE; our model uses rotate-half, so those rows are
//! un-permuted here (HF checkpoints already use rotate-half and are taken as they are).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;

use crate::gguf::{self, GgmlType, GgufError, GgufFile, Value};
use crate::model::config::{checked_count, limits};
use crate::model::{Block, BlockShape, Llama, ModelConfig};
use crate::quant::{BasePrecision, BlockFormat, QMatrix, QuantBase, QuantError, TABLE_FORMAT};
use crate::tokenizer::{Tok, TokenizerError};

/// Errors loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: architecture '{arch}' is not supported (supported: llama, deci; LLaMA-family models such as SmolLM2, TinyLlama, Llama 2/3)")]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: neither a .gguf file nor a directory with config.json")]
    UnknownFormat { path: PathBuf },
}

fn invalid(path: &Path, what: impl Into<String>) -> LoadError {
    LoadError::Invalid {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Load a model and its tokenizer from a `.gguf` file or an HF checkpoint directory.
pub fn load(path: &Path, device: &Device) -> Result<(Llama, Tok), LoadError> {
    load_held(path, device, BasePrecision::F32)
}

/// [`load`] with the frozen base held at `precision`: a GGUF file through [`load_gguf_held`]
/// (never the whole model in fp32), an HF checkpoint loaded in fp32 and then held.
pub fn load_held(
    path: &Path,
    device: &Device,
    precision: BasePrecision,
) -> Result<(Llama, Tok), LoadError> {
    if path.is_dir() {
        if path.join("config.json").is_file() {
            let (mut model, tok) = load_hf(path, device)?;
            model
                .set_base_precision(precision)
                .map_err(|e| invalid(path, e.to_string()))?;
            return Ok((model, tok));
        }
        return Err(LoadError::UnknownFormat {
            path: path.to_path_buf(),
        });
    }
    if !path.exists() {
        return Err(LoadError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    load_gguf_held(path, device, precision)
}

/// `[rows, cols]` row-major -> `[cols, rows]` row-major.
pub fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// Reorder the `[out, in]` rows of a q/k matrix from interleaved-pair RoPE order (GGUF) to
/// rotate-half order (HF, ours): row `h*hd + j*hd/2 + i` takes row `h*hd + 2i + j`. A row is
/// `cols` elements: values, or a quantized row's block bytes.
pub fn unpermute_rows<T: Copy + Default>(
    v: &[T],
    n_heads: usize,
    head_dim: usize,
    cols: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    let half = head_dim / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * head_dim + j * half + i;
                let src = h * head_dim + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Inverse of [`unpermute_rows`] (for GGUF export).
pub fn permute_rows(v: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    let half = head_dim / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + j * half + i;
                let dst = h * head_dim + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// A per-block count: an array of `n_layers` values or one value for every block, each at
/// most `max`.
fn per_layer(
    g: &GgufFile,
    key: &str,
    n_layers: usize,
    max: usize,
) -> Result<Vec<usize>, LoadError> {
    let one = |x: u64| checked_count(&format!("'{key}'"), x, 0, max).map_err(|e| g.malformed(e));
    match g.get(key) {
        Some(Value::Array(items)) => {
            if items.len() != n_layers {
                return Err(g
                    .malformed(format!("'{key}' must hold {n_layers} unsigned integers"))
                    .into());
            }
            items
                .iter()
                .map(|x| {
                    let x = x.as_u64().ok_or_else(|| {
                        g.malformed(format!("'{key}' must hold {n_layers} unsigned integers"))
                    })?;
                    Ok(one(x)?)
                })
                .collect()
        }
        Some(v) => {
            let x = v
                .as_u64()
                .ok_or_else(|| g.missing(key, "integer or integer array"))?;
            Ok(vec![one(x)?; n_layers])
        }
        None => Err(g.missing(key, "integer or integer array").into()),
    }
}

/// The tokenizer's ids all name rows of the embedding table.
fn check_vocab(path: &Path, tok: &Tok, vocab: usize) -> Result<(), LoadError> {
    let ids = [("end-of-sequence", Some(tok.eos)), ("beginning", tok.bos)];
    if tok.vocab_size() > vocab {
        return Err(invalid(
            path,
            format!(
                "the tokenizer has {} tokens, the embedding table {vocab} rows",
                tok.vocab_size()
            ),
        ));
    }
    for (what, id) in ids {
        if let Some(id) = id.filter(|&id| id as usize >= vocab) {
            return Err(invalid(
                path,
                format!("the {what} token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
    }
    Ok(())
}

/// Load a GGUF model file.
pub fn load_gguf(path: &Path, device: &Device) -> Result<(Llama, Tok), LoadError> {
    load_gguf_held(path, device, BasePrecision::F32)
}

/// A projection as loaded: fp32 `[in, out]`, or held in blocks `[out, in]`. The tensor is boxed:
/// with the GPU backends compiled in, a tensor handle is several times a held matrix's size.
enum Loaded {
    Fp32(Box<Tensor<2>>),
    Held(QMatrix),
}

/// Load a GGUF model file with its frozen base held at `precision` (the formats
/// [`Llama::set_base_precision`] holds after an fp32 load). A tensor the file holds in that very
/// format is taken as the file's blocks ([`QMatrix::from_gguf_blocks`]), with no fp32 copy and
/// no second rounding; these equal the fp32 route's blocks where our rule reproduces the file's
/// (it does for every tensor of the default model, tested), while a file quantized by another
/// rule (an importance matrix, say) keeps its own blocks here and would be re-rounded by the
/// fp32 route. Any other tensor is quantized a band of rows at a time, so loading never holds
/// the model, nor even one whole tensor, in fp32 (q/k, small, are taken whole to un-permute).
pub fn load_gguf_held(
    path: &Path,
    device: &Device,
    precision: BasePrecision,
) -> Result<(Llama, Tok), LoadError> {
    let g = GgufFile::open(path)?;
    let arch = g.get_str("general.architecture")?.to_string();
    if arch != "llama" && arch != "deci" {
        return Err(LoadError::UnsupportedArch {
            path: path.to_path_buf(),
            arch,
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    // Counts size what follows: each is checked before it is used.
    let count = |k: &str, min: usize, max: usize| -> Result<usize, LoadError> {
        checked_count(&format!("'{}'", key(k)), g.get_u64(&key(k))?, min, max)
            .map_err(|e| invalid(path, e))
    };
    let n_layers = count("block_count", 1, limits::MAX_LAYERS)?;
    let d_model = count("embedding_length", 1, limits::MAX_WIDTH)?;
    let heads = per_layer(
        &g,
        &key("attention.head_count"),
        n_layers,
        limits::MAX_HEADS,
    )?;
    let kv_heads = match g.get(&key("attention.head_count_kv")) {
        Some(_) => per_layer(
            &g,
            &key("attention.head_count_kv"),
            n_layers,
            limits::MAX_HEADS,
        )?,
        None => heads.clone(),
    };
    let ffn = per_layer(&g, &key("feed_forward_length"), n_layers, limits::MAX_WIDTH)?;
    let max_heads = heads.iter().copied().max().unwrap_or(0);
    let head_dim = match g.get(&key("attention.key_length")) {
        Some(_) => count("attention.key_length", 2, limits::MAX_HEAD_DIM)?,
        None if max_heads > 0 => d_model / max_heads,
        None => return Err(invalid(path, "cannot infer head_dim: no attention heads")),
    };
    let rms_eps = g
        .get_f64(&key("attention.layer_norm_rms_epsilon"))
        .unwrap_or(1e-5);
    let rope_theta = g.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0);
    let ctx = g.get_u64(&key("context_length")).unwrap_or(2048).min(8192) as usize;
    // The un-pruned dims: recorded by our exporter, else the largest per-block count.
    let orig = |k: &str, fallback: usize| {
        g.get(&format!("fedspine.original.{k}"))
            .and_then(Value::as_u64)
            .map_or(fallback, |v| usize::try_from(v).unwrap_or(usize::MAX))
    };
    let tok = Tok::from_gguf(&g)?;
    let emb_dims: Vec<usize> = g
        .tensor_info("token_embd.weight")?
        .dims
        .iter()
        .map(|&d| d as usize)
        .collect();
    if emb_dims.len() != 2 || emb_dims[0] != d_model {
        return Err(invalid(
            path,
            format!("token_embd.weight has dims {emb_dims:?}, expected [{d_model}, vocab]"),
        ));
    }
    let vocab = emb_dims[1];
    let tie = g.tensor_info("output.weight").is_err();
    let mut shapes = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let (nh, nkv, f) = (heads[l], kv_heads[l], ffn[l]);
        if nkv == 0 && nh > 0 || nkv > 0 && nh % nkv != 0 {
            return Err(invalid(
                path,
                format!("block {l}: {nh} query heads cannot be grouped onto {nkv} KV heads"),
            ));
        }
        shapes.push(BlockShape::dense(nh, nkv, f));
    }
    let config = ModelConfig {
        vocab_size: vocab,
        d_model,
        head_dim,
        n_heads: orig("head_count", max_heads),
        n_kv_heads: orig("head_count_kv", kv_heads.iter().copied().max().unwrap_or(0)),
        ffn_dim: orig(
            "feed_forward_length",
            ffn.iter().copied().max().unwrap_or(0),
        ),
        rms_eps,
        rope_theta,
        max_seq_len: ctx,
        tie_embeddings: tie,
        blocks: shapes,
    };
    // Before any tensor is read: every count the loops below use is within bounds.
    config.check().map_err(|e| invalid(path, e))?;
    check_vocab(path, &tok, vocab)?;
    let mut blocks = Vec::with_capacity(n_layers);
    // A held base's projections and each block's two norms.
    let (mut held, mut norm_pairs) = (Vec::new(), Vec::new());
    let load_mat = |name: &str, out: usize, inp: usize| -> Result<Vec<f32>, LoadError> {
        let (v, dims) = g.read_f32(name)?;
        if dims != [inp, out] {
            return Err(invalid(
                path,
                format!("tensor '{name}' has dims {dims:?}, expected [{inp}, {out}]"),
            ));
        }
        Ok(v)
    };
    let load_vec = |name: &str, n: usize| -> Result<Tensor<1>, LoadError> {
        let (v, dims) = g.read_f32(name)?;
        if dims != [n] {
            return Err(invalid(
                path,
                format!("tensor '{name}' has dims {dims:?}, expected [{n}]"),
            ));
        }
        Ok(Tensor::from_data(TensorData::new(v, [n]), device))
    };
    let mat = |v: Vec<f32>, out: usize, inp: usize| -> Tensor<2> {
        Tensor::from_data(TensorData::new(transpose(&v, out, inp), [inp, out]), device)
    };
    // Matrix `name`, `[out, in]` in the file, its rows un-permuted for `heads` query or KV
    // heads: fp32, or held in `format`'s blocks.
    let load_proj = |name: &str,
                     out: usize,
                     inp: usize,
                     format: Option<BlockFormat>,
                     heads: Option<usize>|
     -> Result<Loaded, LoadError> {
        let unpermuted = |v: Vec<f32>| match heads {
            Some(h) => unpermute_rows(&v, h, head_dim, inp),
            None => v,
        };
        let Some(format) = format else {
            return Ok(Loaded::Fp32(Box::new(mat(
                unpermuted(load_mat(name, out, inp)?),
                out,
                inp,
            ))));
        };
        let bad = |e: QuantError| invalid(path, format!("tensor '{name}': {e}"));
        let (ty, bytes, dims) = g.read_raw(name)?;
        if ty == GgmlType::from(format) && dims == [inp, out] && out > 0 {
            let row = bytes.len() / out;
            let bytes = match heads {
                Some(h) => std::borrow::Cow::Owned(unpermute_rows(bytes, h, head_dim, row)),
                None => std::borrow::Cow::Borrowed(bytes),
            };
            if let Some(m) = QMatrix::from_gguf_blocks(format, &bytes, out, inp).map_err(bad)? {
                return Ok(Loaded::Held(m));
            }
        }
        let (per_block, _) = ty.block();
        if heads.is_some() || dims != [inp, out] || !inp.is_multiple_of(per_block) || out == 0 {
            let v = unpermuted(load_mat(name, out, inp)?);
            return Ok(Loaded::Held(
                QMatrix::quantize(format, &v, out, inp).map_err(bad)?,
            ));
        }
        // Bands of rows (about 4 MB in fp32 each), so that even the embedding table is never
        // whole in fp32.
        let band = ((1 << 20) / inp.max(1)).max(1);
        let mut parts = Vec::with_capacity(out.div_ceil(band));
        for r0 in (0..out).step_by(band) {
            let r1 = (r0 + band).min(out);
            let part = &bytes[ty.byte_len(r0 * inp)..ty.byte_len(r1 * inp)];
            let v = gguf::dequantize(ty, part, (r1 - r0) * inp);
            parts.push(QMatrix::quantize(format, &v, r1 - r0, inp).map_err(bad)?);
        }
        QMatrix::stack_rows(parts)
            .map(Loaded::Held)
            .ok_or_else(|| invalid(path, format!("tensor '{name}' has no rows")))
    };
    let format = precision.format();
    for l in 0..n_layers {
        let (nh, nkv, f) = (heads[l], kv_heads[l], ffn[l]);
        let p = |t: &str| format!("blk.{l}.{t}.weight");
        let (q, kv) = (nh * head_dim, nkv * head_dim);
        // In `Proj::ALL`'s order: file name, `[out, in]`, heads to un-permute.
        let names = [
            ("attn_q", q, d_model, Some(nh)),
            ("attn_k", kv, d_model, Some(nkv)),
            ("attn_v", kv, d_model, None),
            ("attn_output", d_model, q, None),
            ("ffn_gate", f, d_model, None),
            ("ffn_up", f, d_model, None),
            ("ffn_down", d_model, f, None),
        ];
        let mut mats = Vec::with_capacity(names.len());
        for (t, out, inp, heads) in names {
            mats.push(load_proj(&p(t), out, inp, format, heads)?);
        }
        let norms = (
            load_vec(&p("attn_norm"), d_model)?,
            load_vec(&p("ffn_norm"), d_model)?,
        );
        if format.is_some() {
            let held_mats = mats.into_iter().map(|m| match m {
                Loaded::Held(m) => Arc::new(m),
                Loaded::Fp32(_) => unreachable!("a format was asked for"),
            });
            held.push(held_mats.collect());
            norm_pairs.push(norms);
        } else {
            let mut ws = mats.into_iter().map(|m| match m {
                Loaded::Fp32(w) => *w,
                Loaded::Held(_) => unreachable!("no format was asked for"),
            });
            let mut next = || ws.next().expect("seven projections");
            // Fields are evaluated in the order written: `Proj::ALL`'s.
            blocks.push(Block {
                attn_norm: norms.0,
                wq: next(),
                wk: next(),
                wv: next(),
                wo: next(),
                ffn_norm: norms.1,
                w_gate: next(),
                w_up: next(),
                w_down: next(),
            });
        }
    }
    let norm = load_vec("output_norm.weight", d_model)?;
    let model = if format.is_some() {
        // The embedding table and LM head in the base's table format.
        let table = |name: &str| match load_proj(name, vocab, d_model, Some(TABLE_FORMAT), None)? {
            Loaded::Held(m) => Ok::<_, LoadError>(m),
            Loaded::Fp32(_) => unreachable!("a format was asked for"),
        };
        let lm_head = if tie {
            None
        } else {
            Some(table("output.weight")?)
        };
        let base = QuantBase {
            embed: table("token_embd.weight")?,
            lm_head,
            blocks: held,
        };
        Llama::with_held_base(config, base, norm_pairs, norm, device)
    } else {
        let (embed, _) = g.read_f32("token_embd.weight")?;
        let embed = Tensor::from_data(TensorData::new(embed, [vocab, d_model]), device);
        let lm_head = if tie {
            None
        } else {
            Some(mat(
                load_mat("output.weight", vocab, d_model)?,
                vocab,
                d_model,
            ))
        };
        Llama::new(config, embed, blocks, norm, lm_head, device)
    };
    Ok((model.map_err(|e| invalid(path, e))?, tok))
}

/// The fields of an HF `config.json` we read.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub vocab_size: usize,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<serde_json::Value>,
    pub model_type: Option<String>,
    /// Written by our exporter for pruned models: per-block counts.
    pub fedspine_blocks: Option<Vec<BlockShape>>,
}

/// Largest `config.json` read: a model's is a few kilobytes (a pruned export's per-block
/// shapes add about a kilobyte per block).
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// A small text file, refused unread when larger than [`MAX_CONFIG_BYTES`].
fn read_small_text(path: &Path) -> Result<String, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(invalid(
            path,
            format!("{len} bytes: a model config is at most {MAX_CONFIG_BYTES}"),
        ));
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Load an HF checkpoint directory.
pub fn load_hf(dir: &Path, device: &Device) -> Result<(Llama, Tok), LoadError> {
    let cfg_path = dir.join("config.json");
    let text = read_small_text(&cfg_path)?;
    let hf: HfConfig =
        serde_json::from_str(&text).map_err(|e| invalid(&cfg_path, e.to_string()))?;
    if let Some(mt) = &hf.model_type {
        if !matches!(mt.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(LoadError::UnsupportedArch {
                path: cfg_path,
                arch: mt.clone(),
            });
        }
    }
    // Counts size what follows: each is checked before it is used.
    let count = |what: &str, v: usize, min: usize, max: usize| {
        checked_count(what, v as u64, min, max).map_err(|e| invalid(&cfg_path, e))
    };
    count(
        "num_hidden_layers",
        hf.num_hidden_layers,
        1,
        limits::MAX_LAYERS,
    )?;
    count(
        "num_attention_heads",
        hf.num_attention_heads,
        1,
        limits::MAX_HEADS,
    )?;
    count("hidden_size", hf.hidden_size, 1, limits::MAX_WIDTH)?;
    let n_kv = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
    let head_dim = hf
        .head_dim
        .unwrap_or(hf.hidden_size / hf.num_attention_heads);
    let shapes = match &hf.fedspine_blocks {
        Some(b) if b.len() == hf.num_hidden_layers => b.clone(),
        Some(_) => {
            return Err(invalid(
                &cfg_path,
                "fedspine_blocks length differs from num_hidden_layers",
            ))
        }
        None => vec![
            BlockShape::dense(hf.num_attention_heads, n_kv, hf.intermediate_size);
            hf.num_hidden_layers
        ],
    };
    let tie = hf.tie_word_embeddings.unwrap_or(false);
    let config = ModelConfig {
        vocab_size: hf.vocab_size,
        d_model: hf.hidden_size,
        head_dim,
        n_heads: hf.num_attention_heads,
        n_kv_heads: n_kv,
        ffn_dim: hf.intermediate_size,
        rms_eps: hf.rms_norm_eps.unwrap_or(1e-5),
        rope_theta: hf.rope_theta.unwrap_or(10_000.0),
        max_seq_len: hf.max_position_embeddings.unwrap_or(2048).min(8192),
        tie_embeddings: tie,
        blocks: shapes,
    };
    config.check().map_err(|e| invalid(&cfg_path, e))?;
    // Gather every *.safetensors file in the directory.
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| LoadError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(invalid(dir, "no *.safetensors files"));
    }
    let mut store = std::collections::HashMap::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|source| LoadError::Io {
            path: f.clone(),
            source,
        })?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| invalid(f, e.to_string()))?;
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let vals: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(invalid(
                        f,
                        format!("tensor '{name}' has dtype {other:?}; supported: F32, F16, BF16"),
                    ))
                }
            };
            store.insert(name, (vals, shape));
        }
    }
    let mut take = |name: &str, want: &[usize]| -> Result<Vec<f32>, LoadError> {
        let (v, shape) = store
            .remove(name)
            .ok_or_else(|| invalid(dir, format!("tensor '{name}' missing")))?;
        if shape != want {
            return Err(invalid(
                dir,
                format!("tensor '{name}' has shape {shape:?}, expected {want:?}"),
            ));
        }
        Ok(v)
    };
    let d = config.d_model;
    let v = config.vocab_size;
    let mat = |vals: Vec<f32>, out: usize, inp: usize| -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(transpose(&vals, out, inp), [inp, out]),
            device,
        )
    };
    let vec1 = |vals: Vec<f32>| -> Tensor<1> {
        let n = vals.len();
        Tensor::from_data(TensorData::new(vals, [n]), device)
    };
    let embed_v = take("model.embed_tokens.weight", &[v, d])?;
    let mut blocks = Vec::new();
    for (l, s) in config.blocks.iter().enumerate() {
        let p = |t: &str| format!("model.layers.{l}.{t}.weight");
        let (nq, nkv, f) = (s.n_heads * head_dim, s.n_kv_heads * head_dim, s.ffn_dim);
        blocks.push(Block {
            attn_norm: vec1(take(&p("input_layernorm"), &[d])?),
            wq: mat(take(&p("self_attn.q_proj"), &[nq, d])?, nq, d),
            wk: mat(take(&p("self_attn.k_proj"), &[nkv, d])?, nkv, d),
            wv: mat(take(&p("self_attn.v_proj"), &[nkv, d])?, nkv, d),
            wo: mat(take(&p("self_attn.o_proj"), &[d, nq])?, d, nq),
            ffn_norm: vec1(take(&p("post_attention_layernorm"), &[d])?),
            w_gate: mat(take(&p("mlp.gate_proj"), &[f, d])?, f, d),
            w_up: mat(take(&p("mlp.up_proj"), &[f, d])?, f, d),
            w_down: mat(take(&p("mlp.down_proj"), &[d, f])?, d, f),
        });
    }
    let norm = vec1(take("model.norm.weight", &[d])?);
    let lm_head = if tie {
        None
    } else {
        Some(mat(take("lm_head.weight", &[v, d])?, v, d))
    };
    let embed = Tensor::from_data(TensorData::new(embed_v, [v, d]), device);
    let model =
        Llama::new(config, embed, blocks, norm, lm_head, device).map_err(|e| invalid(dir, e))?;
    let eos = match &hf.eos_token_id {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()),
        _ => None,
    };
    let eos = eos
        .map(|id| {
            u32::try_from(id)
                .map_err(|_| invalid(&cfg_path, format!("eos_token_id {id} is not a token id")))
        })
        .transpose()?;
    let tok_path = dir.join("tokenizer.json");
    let template = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        });
    let tok = Tok::from_file(&tok_path, hf.bos_token_id, eos, template)?;
    check_vocab(&tok_path, &tok, v)?;
    Ok((model, tok))
}

#[cfg(test)]
mod tests;
