//! The loaders' row permutation, and model files that claim hostile hyper-parameters.

use super::*;

#[test]
fn permutation_round_trips() {
    let (nh, hd, cols) = (3, 8, 5);
    let v: Vec<f32> = (0..nh * hd * cols).map(|i| i as f32).collect();
    let u = unpermute_rows(&v, nh, hd, cols);
    assert_ne!(u, v);
    assert_eq!(permute_rows(&u, nh, hd, cols), v);
    // Row 1 of head 0 in rotate-half order (first half, i=1) came from interleaved row 2.
    assert_eq!(u[cols], v[2 * cols]);
    // Row hd/2 (second half, i=0) came from interleaved row 1.
    assert_eq!(u[(hd / 2) * cols], v[cols]);
}

#[test]
fn transpose_is_an_involution() {
    let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let t = transpose(&v, 3, 4);
    assert_eq!(t[1], 4.0);
    assert_eq!(transpose(&t, 4, 3), v);
}

/// A one-block llama GGUF file with a 40-token vocabulary (tied embeddings, width 64, 4 query
/// heads of 16 onto 2 KV heads, 128 channels), its metadata changed by `edit` before writing.
fn tiny_gguf(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Value)>)) -> PathBuf {
    use crate::gguf::writer::{write, WriteTensor};
    let (d, hd, nh, nkv, f, vocab) = (64u64, 16u64, 4u64, 2u64, 128u64, 40u64);
    let s = |x: &str| Value::Str(x.into());
    let tokens = names(vocab as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("llama")),
        ("llama.block_count".into(), Value::U32(1)),
        ("llama.embedding_length".into(), Value::U32(d as u32)),
        ("llama.attention.head_count".into(), Value::U32(nh as u32)),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(nkv as u32),
        ),
        ("llama.feed_forward_length".into(), Value::U32(f as u32)),
        ("llama.attention.key_length".into(), Value::U32(hd as u32)),
        ("llama.context_length".into(), Value::U32(64)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), tokens),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![s("t1 t2")]),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
    ];
    edit(&mut meta);
    let t = |name: &str, dims: Vec<u64>| WriteTensor {
        name: name.into(),
        values: crate::test_values::uniform(dims.iter().product::<u64>() as usize, 3, -0.1, 0.1),
        dims,
        ggml_type: GgmlType::F32,
    };
    let tensors = vec![
        t("token_embd.weight", vec![d, vocab]),
        t("output_norm.weight", vec![d]),
        t("blk.0.attn_norm.weight", vec![d]),
        t("blk.0.ffn_norm.weight", vec![d]),
        t("blk.0.attn_q.weight", vec![d, nh * hd]),
        t("blk.0.attn_k.weight", vec![d, nkv * hd]),
        t("blk.0.attn_v.weight", vec![d, nkv * hd]),
        t("blk.0.attn_output.weight", vec![nh * hd, d]),
        t("blk.0.ffn_gate.weight", vec![d, f]),
        t("blk.0.ffn_up.weight", vec![d, f]),
        t("blk.0.ffn_down.weight", vec![f, d]),
    ];
    let path = dir.join(name);
    write(&path, &meta, &tensors).unwrap();
    path
}

/// A vocabulary of `n` tokens: `t0`, `t1`, ... and last the merge of `t1` and `t2`.
fn names(n: u32) -> Value {
    let mut v: Vec<Value> = (0..n - 1).map(|i| Value::Str(format!("t{i}"))).collect();
    v.push(Value::Str("t1t2".into()));
    Value::Array(v)
}

/// Sets `key` (added when absent).
fn set(meta: &mut Vec<(String, Value)>, key: &str, v: Value) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.into(), v));
}

/// Each hyper-parameter a model file gives sizes allocations, loops or tables before (or
/// instead of) a tensor's shape is compared: a hostile value of each is refused at load with
/// an error naming the file and the value, where it used to panic, abort on an allocation or
/// load a model that panics at its first forward pass.
#[test]
fn model_files_with_hostile_hyper_parameters_are_refused() {
    let tmp = tempfile::Builder::new()
        .prefix("fedspine-weights-hostile-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let device = Device::flex();
    // The control: the honest file loads and runs.
    let (m, tok) = load(&tiny_gguf(dir, "good.gguf", |_| {}), &device).unwrap();
    assert_eq!(m.config.vocab_size, 40);
    assert_eq!(tok.vocab_size(), 40);
    let logits = m.forward(m.tokens_tensor(&[vec![1, 2, 3]]), None);
    assert_eq!(logits.dims(), [3, 40]);

    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "layers",
            "llama.block_count",
            Value::U64(1 << 61),
            "block_count",
        ),
        (
            "heads",
            "llama.attention.head_count",
            Value::U64(1 << 40),
            "head_count",
        ),
        (
            "heads-array",
            "llama.attention.head_count",
            Value::Array(vec![Value::U64(1 << 40)]),
            "head_count",
        ),
        (
            "width",
            "llama.embedding_length",
            Value::U64(1 << 40),
            "embedding_length",
        ),
        (
            "odd-head",
            "llama.attention.key_length",
            Value::U32(15),
            "even",
        ),
        (
            "zero-head",
            "llama.attention.key_length",
            Value::U32(0),
            "key_length",
        ),
        (
            "context",
            "llama.context_length",
            Value::U32(0),
            "context length",
        ),
        (
            "theta",
            "llama.rope.freq_base",
            Value::F32(f32::NAN),
            "rotary base",
        ),
        (
            "eps",
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(0.0),
            "epsilon",
        ),
        (
            "eos",
            "tokenizer.ggml.eos_token_id",
            Value::U32(1_000_000),
            "outside the vocabulary",
        ),
        (
            "eos-wide",
            "tokenizer.ggml.eos_token_id",
            Value::U64(1 << 33),
            "not a token id",
        ),
        ("vocab", "tokenizer.ggml.tokens", names(50), "50 tokens"),
    ];
    for (name, key, v, says) in cases {
        let file = format!("{name}.gguf");
        let p = tiny_gguf(dir, &file, |m| set(m, key, v));
        let e = load(&p, &device)
            .err()
            .unwrap_or_else(|| panic!("{name}: loaded"));
        let text = e.to_string();
        assert!(
            text.contains(&file) && text.contains(says),
            "{name}: {text}"
        );
    }
}

/// The same for an HF checkpoint's `config.json`, read before any weights.
#[test]
fn hf_configs_with_hostile_hyper_parameters_are_refused() {
    let tmp = tempfile::Builder::new()
        .prefix("fedspine-weights-hf-hostile-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let base = serde_json::json!({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 40,
    });
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "heads",
            serde_json::json!({"num_attention_heads": 0}),
            "num_attention_heads",
        ),
        (
            "layers",
            serde_json::json!({"num_hidden_layers": 1_000_000_000_000_000u64}),
            "num_hidden_layers",
        ),
        ("odd-head", serde_json::json!({"head_dim": 15}), "even"),
        (
            "vocab",
            serde_json::json!({"vocab_size": 0}),
            "vocabulary size",
        ),
        (
            "theta",
            serde_json::json!({"rope_theta": -1.0}),
            "rotary base",
        ),
    ];
    for (name, change, says) in cases {
        let d = dir.join(name);
        std::fs::create_dir(&d).unwrap();
        let mut cfg = base.clone();
        for (k, v) in change.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        let e = load(&d, &Device::flex())
            .err()
            .unwrap_or_else(|| panic!("{name}: loaded"));
        let text = e.to_string();
        assert!(
            text.contains("config.json") && text.contains(says),
            "{name}: {text}"
        );
    }
    // A config too large to be one is not read.
    let d = dir.join("huge");
    std::fs::create_dir(&d).unwrap();
    let f = std::fs::File::create(d.join("config.json")).unwrap();
    f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
    let e = load(&d, &Device::flex()).err().unwrap().to_string();
    assert!(e.contains("a model config is at most"), "{e}");
}
