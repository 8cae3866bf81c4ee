//! Export of a (possibly pruned, adapter-merged) model for on-device runtimes: HF safetensors +
//! `config.json` + `tokenizer.json`, and GGUF (F32, F16, Q8_0) as arch `llama` when every block
//! has the same counts, or arch `deci` (per-block arrays) when they differ.
//!
//! What a format cannot represent is refused with a message that names the nearest valid option.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::gguf::{self, GgmlType, GgufError, Value, WriteTensor};
use crate::model::{Llama, ModelConfig};
use crate::tokenizer::{Tok, TokenizerError};
use crate::weights::{permute_rows, transpose};

/// Errors while exporting.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("cannot export: {0}")]
    Unrepresentable(String),
    #[error("safetensors: {0}")]
    Safetensors(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn host(t: &burn::tensor::Tensor<2>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("converted to f32 on the line above")
}

fn host1(t: &burn::tensor::Tensor<1>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("converted to f32 on the line above")
}

/// Weights in checkpoint orientation (`[out, in]` rows, rotate-half q/k), by HF name.
fn hf_tensors(model: &Llama) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let c = &model.config;
    let d = c.d_model;
    let mut out = Vec::new();
    out.push((
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, d],
        host(&model.embed),
    ));
    for (l, b) in model.blocks.iter().enumerate() {
        let p = |t: &str| format!("model.layers.{l}.{t}.weight");
        let t = |w: &burn::tensor::Tensor<2>| {
            let [i, o] = w.dims();
            (vec![o, i], transpose(&host(w), i, o))
        };
        for (name, w) in [
            ("self_attn.q_proj", &b.wq),
            ("self_attn.k_proj", &b.wk),
            ("self_attn.v_proj", &b.wv),
            ("self_attn.o_proj", &b.wo),
            ("mlp.gate_proj", &b.w_gate),
            ("mlp.up_proj", &b.w_up),
            ("mlp.down_proj", &b.w_down),
        ] {
            let (dims, v) = t(w);
            out.push((p(name), dims, v));
        }
        out.push((p("input_layernorm"), vec![d], host1(&b.attn_norm)));
        out.push((p("post_attention_layernorm"), vec![d], host1(&b.ffn_norm)));
    }
    out.push(("model.norm.weight".to_string(), vec![d], host1(&model.norm)));
    if let Some(h) = &model.lm_head {
        let [i, o] = h.dims();
        out.push((
            "lm_head.weight".to_string(),
            vec![o, i],
            transpose(&host(h), i, o),
        ));
    }
    out
}

/// Write an HF checkpoint directory: `model.safetensors` (F32), `config.json`, `tokenizer.json`.
///
/// Per-block counts that differ are recorded in `config.json` as `fedspine_blocks`; stock HF
/// `transformers` cannot build such a model, and the returned note says so.
pub fn export_hf(model: &Llama, tok: &Tok, dir: &Path) -> Result<Option<String>, ExportError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let c = &model.config;
    let tensors = hf_tensors(model);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dims, v)| {
            let bytes: &[u8] = bytemuck_cast(v);
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, dims.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| ExportError::Safetensors(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let st_path = dir.join("model.safetensors");
    let tmp = dir.join("model.safetensors.partial");
    safetensors::tensor::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| ExportError::Safetensors(e.to_string()))?;
    std::fs::rename(&tmp, &st_path).map_err(io(&st_path))?;
    let uniform = uniform_counts(c);
    let first = &c.blocks[0];
    let mut cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.d_model,
        "intermediate_size": if uniform { first.ffn_dim } else { c.ffn_dim },
        "num_attention_heads": if uniform { first.n_heads } else { c.n_heads },
        "num_key_value_heads": if uniform { first.n_kv_heads } else { c.n_kv_heads },
        "head_dim": c.head_dim,
        "num_hidden_layers": c.n_layers(),
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "eos_token_id": tok.eos,
    });
    if let Some(b) = tok.bos {
        cfg["bos_token_id"] = b.into();
    }
    let note = if uniform && first.uniform_groups() {
        None
    } else {
        cfg["fedspine_blocks"] = serde_json::to_value(&c.blocks).expect("block shapes serialise");
        Some(
            "the blocks have unequal head/channel counts (or uneven query->KV groups): config.json records them in \
             `fedspine_blocks`, which FedSpine loads, but stock HF transformers builds every layer alike and cannot load \
             this checkpoint; prune with uniform per-block counts (`--uniform`) for a stock-compatible export"
                .to_string(),
        )
    };
    let cfg_path = dir.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&cfg)
            .expect("config.json is a JSON value built in memory; serialising it cannot fail"),
    )
    .map_err(io(&cfg_path))?;
    let tok_path = dir.join("tokenizer.json");
    std::fs::write(&tok_path, tok.to_json()?).map_err(io(&tok_path))?;
    if let Some(t) = &tok.chat_template {
        let p = dir.join("tokenizer_config.json");
        std::fs::write(&p, serde_json::json!({"chat_template": t}).to_string()).map_err(io(&p))?;
    }
    Ok(note)
}

/// Whether every block has the same head, KV-head and channel counts.
pub fn uniform_counts(c: &ModelConfig) -> bool {
    c.blocks.windows(2).all(|w| {
        w[0].n_heads == w[1].n_heads
            && w[0].n_kv_heads == w[1].n_kv_heads
            && w[0].ffn_dim == w[1].ffn_dim
    })
}

#[allow(unsafe_code)]
fn bytemuck_cast(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the slice length is scaled
    // by size_of::<f32>() and alignment only decreases.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Output precision of a GGUF export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufPrecision {
    F32,
    F16,
    Q8_0,
    /// 4-bit projections; the embedding table and an untied LM head Q8_0 (as the quantized
    /// base holds them).
    Q4_0,
    Q4_1,
}

impl std::str::FromStr for GgufPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            "q4_1" => Ok(Self::Q4_1),
            o => Err(format!(
                "unknown GGUF precision '{o}' (f32, f16, q8_0, q4_0, q4_1)"
            )),
        }
    }
}

/// What a GGUF export did.
#[derive(Debug, Clone)]
pub struct GgufReport {
    pub arch: &'static str,
    /// KV heads whose weights were repeated so llama.cpp's uniform grouping holds.
    pub repeated_kv_heads: usize,
    pub notes: Vec<String>,
}

/// Write a GGUF file. Blocks with equal counts -> arch `llama`; unequal -> arch `deci`. Where
/// query heads do not map onto KV heads in equal consecutive groups (what llama.cpp assumes),
/// KV heads are repeated so that every group is uniform, which is exact.
pub fn export_gguf(
    model: &Llama,
    tok: &Tok,
    path: &Path,
    precision: GgufPrecision,
) -> Result<GgufReport, ExportError> {
    let c = &model.config;
    let d = c.d_model;
    let hd = c.head_dim;
    // Regroup: for each block, the KV head (local index) that each query head needs, laid out
    // so query head h reads KV slot h / group.
    let mut plans = Vec::with_capacity(c.n_layers());
    let mut repeated = 0;
    for s in &c.blocks {
        if s.n_heads == 0 {
            return Err(ExportError::Unrepresentable(
                "a block with every query head removed has no attention at all; llama.cpp cannot skip attention in a block. \
                 Keep at least one head per block (the pruner's `min_heads_per_block`)".into(),
            ));
        }
        if s.ffn_dim == 0 {
            return Err(ExportError::Unrepresentable(
                "a block with every MLP channel removed cannot be expressed in GGUF; keep at least one channel per block".into(),
            ));
        }
        if s.uniform_groups() {
            plans.push((0..s.n_kv_heads).collect::<Vec<usize>>());
        } else {
            // One KV slot per query head: exact, at worst n_heads KV heads.
            repeated += s.n_heads - s.n_kv_heads;
            plans.push(s.q_to_kv.clone());
        }
    }
    let kv_counts: Vec<usize> = plans.iter().map(Vec::len).collect();
    let heads: Vec<usize> = c.blocks.iter().map(|s| s.n_heads).collect();
    let ffn: Vec<usize> = c.blocks.iter().map(|s| s.ffn_dim).collect();
    let same = |v: &[usize]| v.windows(2).all(|w| w[0] == w[1]);
    let uniform = same(&heads) && same(&kv_counts) && same(&ffn);
    let arch: &'static str = if uniform { "llama" } else { "deci" };
    let k = |s: &str| format!("{arch}.{s}");
    let arr = |v: &[usize]| Value::Array(v.iter().map(|&x| Value::I32(x as i32)).collect());
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str("FedSpine export".into())),
        (
            "general.file_type".into(),
            Value::U32(match precision {
                GgufPrecision::F32 => 0,
                GgufPrecision::F16 => 1,
                GgufPrecision::Q8_0 => 7,
                // llama.cpp's "mostly" file types: the matrices at this type, some others not.
                GgufPrecision::Q4_0 => 2,
                GgufPrecision::Q4_1 => 3,
            }),
        ),
        (k("block_count"), Value::U32(c.n_layers() as u32)),
        (k("context_length"), Value::U32(c.max_seq_len as u32)),
        (k("embedding_length"), Value::U32(d as u32)),
        (k("rope.dimension_count"), Value::U32(hd as u32)),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_eps as f32),
        ),
        (k("attention.key_length"), Value::U32(hd as u32)),
        (k("attention.value_length"), Value::U32(hd as u32)),
        (k("vocab_size"), Value::U32(c.vocab_size as u32)),
        (
            "fedspine.original.head_count".into(),
            Value::U32(c.n_heads as u32),
        ),
        (
            "fedspine.original.head_count_kv".into(),
            Value::U32(c.n_kv_heads as u32),
        ),
        (
            "fedspine.original.feed_forward_length".into(),
            Value::U32(c.ffn_dim as u32),
        ),
        ("fedspine.block_head_count".into(), arr(&heads)),
        ("fedspine.block_head_count_kv".into(), arr(&kv_counts)),
        ("fedspine.block_feed_forward_length".into(), arr(&ffn)),
    ];
    if uniform {
        meta.push((k("feed_forward_length"), Value::U32(ffn[0] as u32)));
        meta.push((k("attention.head_count"), Value::U32(heads[0] as u32)));
        meta.push((
            k("attention.head_count_kv"),
            Value::U32(kv_counts[0] as u32),
        ));
    } else {
        meta.push((k("feed_forward_length"), arr(&ffn)));
        meta.push((k("attention.head_count"), arr(&heads)));
        meta.push((k("attention.head_count_kv"), arr(&kv_counts)));
    }
    meta.extend(tokenizer_metadata(tok));
    let mat_ty = match precision {
        GgufPrecision::F32 => GgmlType::F32,
        GgufPrecision::F16 => GgmlType::F16,
        GgufPrecision::Q8_0 => GgmlType::Q8_0,
        GgufPrecision::Q4_0 => GgmlType::Q4_0,
        GgufPrecision::Q4_1 => GgmlType::Q4_1,
    };
    // The embedding table and LM head: as the quantized base holds them under a 4-bit export.
    let table_ty = match mat_ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => crate::quant::TABLE_FORMAT.into(),
        t => t,
    };
    let mut tensors = Vec::new();
    // Embedding rows are [vocab][d]: dims (d, vocab).
    tensors.push(WriteTensor {
        name: "token_embd.weight".into(),
        dims: vec![d as u64, c.vocab_size as u64],
        ggml_type: table_ty,
        values: host(&model.embed),
    });
    for (l, (b, s)) in model.blocks.iter().zip(&c.blocks).enumerate() {
        let p = |t: &str| format!("blk.{l}.{t}.weight");
        // [in, out] -> file rows [out][in].
        let rows = |w: &burn::tensor::Tensor<2>| {
            let [i, o] = w.dims();
            transpose(&host(w), i, o)
        };
        let take_heads = |rows_v: Vec<f32>, slots: &[usize]| -> Vec<f32> {
            let mut v = Vec::with_capacity(slots.len() * hd * d);
            for &kv in slots {
                v.extend_from_slice(&rows_v[kv * hd * d..(kv + 1) * hd * d]);
            }
            v
        };
        let slots = &plans[l];
        let nkv_out = slots.len();
        let q = permute_rows(&rows(&b.wq), s.n_heads, hd, d);
        let kr = permute_rows(&take_heads(rows(&b.wk), slots), nkv_out, hd, d);
        let vr = take_heads(rows(&b.wv), slots);
        let mut push = |name: String, dims: Vec<usize>, values: Vec<f32>, ty: GgmlType| {
            tensors.push(WriteTensor {
                name,
                dims: dims.iter().map(|&x| x as u64).collect(),
                ggml_type: ty,
                values,
            });
        };
        push(p("attn_norm"), vec![d], host1(&b.attn_norm), GgmlType::F32);
        push(p("attn_q"), vec![d, s.n_heads * hd], q, mat_ty);
        push(p("attn_k"), vec![d, nkv_out * hd], kr, mat_ty);
        push(p("attn_v"), vec![d, nkv_out * hd], vr, mat_ty);
        push(
            p("attn_output"),
            vec![s.n_heads * hd, d],
            rows(&b.wo),
            mat_ty,
        );
        push(p("ffn_norm"), vec![d], host1(&b.ffn_norm), GgmlType::F32);
        push(p("ffn_gate"), vec![d, s.ffn_dim], rows(&b.w_gate), mat_ty);
        push(p("ffn_up"), vec![d, s.ffn_dim], rows(&b.w_up), mat_ty);
        push(p("ffn_down"), vec![s.ffn_dim, d], rows(&b.w_down), mat_ty);
    }
    tensors.push(WriteTensor {
        name: "output_norm.weight".into(),
        dims: vec![d as u64],
        ggml_type: GgmlType::F32,
        values: host1(&model.norm),
    });
    if let Some(h) = &model.lm_head {
        let [i, o] = h.dims();
        tensors.push(WriteTensor {
            name: "output.weight".into(),
            dims: vec![d as u64, c.vocab_size as u64],
            ggml_type: table_ty,
            values: transpose(&host(h), i, o),
        });
    }
    // Block types need rows that are a multiple of 32 elements; fall back to F16 per tensor
    // otherwise.
    let mut notes = Vec::new();
    for t in &mut tensors {
        let blocked = matches!(
            t.ggml_type,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1
        );
        if blocked && t.dims[0] % 32 != 0 {
            notes.push(format!(
                "{}: row length {} is not a multiple of 32, written as F16",
                t.name, t.dims[0]
            ));
            t.ggml_type = GgmlType::F16;
        }
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    gguf::write(path, &meta, &tensors)?;
    if arch == "deci" {
        notes.push("blocks differ in head/channel counts: written as arch 'deci' (per-block arrays), which llama.cpp loads; runtimes that only know arch 'llama' cannot load it. Prune with uniform per-block counts for an arch 'llama' file".into());
    }
    if repeated > 0 {
        notes.push(format!("{repeated} KV head copies were added so every block groups query heads uniformly (exact; slightly larger KV cache)"));
    }
    Ok(GgufReport {
        arch,
        repeated_kv_heads: repeated,
        notes,
    })
}

/// GGUF tokenizer keys rebuilt from a tokenizer (vocab, merges, types, special ids).
fn tokenizer_metadata(tok: &Tok) -> Vec<(String, Value)> {
    let json: serde_json::Value = tok
        .to_json()
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let vocab: BTreeMap<u32, String> = json["model"]["vocab"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_u64().map(|id| (id as u32, k.clone())))
                .collect()
        })
        .unwrap_or_default();
    let specials: std::collections::HashSet<u32> = json["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| t["special"].as_bool() == Some(true))
                .filter_map(|t| t["id"].as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default();
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| match m {
                    serde_json::Value::String(s) => Some(Value::Str(s.clone())),
                    serde_json::Value::Array(p) => Some(Value::Str(format!(
                        "{} {}",
                        p.first()?.as_str()?,
                        p.get(1)?.as_str()?
                    ))),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let n = vocab.keys().next_back().map_or(0, |m| m + 1);
    let tokens: Vec<Value> = (0..n)
        .map(|i| Value::Str(vocab.get(&i).cloned().unwrap_or_default()))
        .collect();
    let types: Vec<Value> = (0..n)
        .map(|i| Value::I32(if specials.contains(&i) { 3 } else { 1 }))
        .collect();
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::Str("smollm".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        (
            "tokenizer.ggml.eos_token_id".to_string(),
            Value::U32(tok.eos),
        ),
    ];
    if let Some(b) = tok.bos {
        meta.push(("tokenizer.ggml.bos_token_id".to_string(), Value::U32(b)));
    }
    if let Some(t) = &tok.chat_template {
        meta.push(("tokenizer.chat_template".to_string(), Value::Str(t.clone())));
    }
    meta
}
