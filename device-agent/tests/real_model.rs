//! Tests on the real SmolLM2-135M-Instruct checkpoint (fetched into the asset cache on first
//! use): reference logits from an independent fp32 implementation, greedy chat answer,
//! perplexity on a held-out Moby-Dick chapter, HF and GGUF export round trips, bad files.

use std::sync::OnceLock;

use burn::tensor::Device;
use device_agent::assets;
use device_agent::data;
use device_agent::eval;
use device_agent::export::{self, GgufPrecision};
use device_agent::generate::{self, GenerateConfig, Sampling};
use device_agent::gguf::{self, Value, WriteTensor};
use device_agent::model::{to_rows, Llama};
use device_agent::tokenizer::Tok;
use device_agent::weights::{self, LoadError};

fn model() -> &'static (Llama, Tok) {
    static M: OnceLock<(Llama, Tok)> = OnceLock::new();
    M.get_or_init(|| {
        let path = assets::default_model().expect("default model in cache or fetchable");
        weights::load(&path, &Device::flex()).expect("default model loads")
    })
}

/// A scratch directory, removed when dropped (also when the test fails).
fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fedspine-it-{tag}-"))
        .tempdir()
        .unwrap()
}

#[derive(serde::Deserialize)]
struct Top {
    id: u32,
    logit: f32,
}

#[derive(serde::Deserialize)]
struct Chat {
    rendered_prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Reference {
    prompt: String,
    token_ids: Vec<u32>,
    top5_per_position: Vec<Vec<Top>>,
    chat: Chat,
}

fn reference() -> Reference {
    let text = include_str!("data/smollm2-135m-instruct-fp32.json");
    serde_json::from_str(text).expect("reference json")
}

/// Max |ours - reference| over the reference's top-5 logits at every position.
fn max_logit_error(m: &Llama, r: &Reference) -> f32 {
    let rows = to_rows(m.forward(m.tokens_tensor(std::slice::from_ref(&r.token_ids)), None));
    let mut worst = 0f32;
    for (row, tops) in rows.iter().zip(&r.top5_per_position) {
        for t in tops {
            worst = worst.max((row[t.id as usize] - t.logit).abs());
        }
        // Our top-1 is the reference's top-1.
        let best = row
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0;
        assert_eq!(best as u32, tops[0].id);
    }
    worst
}

#[test]
fn tokenizer_and_logits_match_the_reference() {
    let (m, tok) = model();
    let r = reference();
    assert_eq!(tok.encode(&r.prompt).unwrap(), r.token_ids);
    assert_eq!(
        tok.chat_prompt("What is the capital of France?", None),
        r.chat.rendered_prompt
    );
    assert_eq!(
        tok.encode(&r.chat.rendered_prompt).unwrap(),
        r.chat.prompt_ids
    );
    let err = max_logit_error(m, &r);
    assert!(err < 0.02, "max top-5 logit error {err}");
}

/// With bf16 products on the frozen base (where the CPU has them), the reference's top-5 logits
/// move by at most 0.3 (measured 0.103 on Zen 4; fp32 stays within 0.02) and every
/// position keeps its top-1; elsewhere bf16 resolves to fp32 with its reason.
#[test]
fn bf16_products_keep_the_reference_logits_within_tolerance() {
    use device_agent::bf16::{gemm, Precision};
    let (m, _) = model();
    let mut m16 = m.clone();
    let (p, why) = m16.set_precision(Precision::Bf16);
    if !gemm::available() {
        assert_eq!(p, Precision::Fp32);
        assert!(why.unwrap().contains("AVX-512-BF16"));
        return;
    }
    let err = max_logit_error(&m16, &reference());
    eprintln!("bf16 max top-5 logit error {err}");
    assert!(err > 1e-3 && err < 0.3, "max top-5 logit error {err}");
}

#[test]
fn greedy_chat_answers_paris() {
    let (m, tok) = model();
    let r = reference();
    let cfg = GenerateConfig {
        max_new_tokens: 16,
        sampling: Sampling::Greedy,
        seed: 0,
    };
    let mut streamed = String::new();
    let g = generate::generate(m, tok, None, &r.chat.prompt_ids, &cfg, |p| {
        streamed.push_str(p)
    })
    .unwrap();
    assert!(g.text.contains("Paris"), "{}", g.text);
    assert_eq!(streamed, g.text);
    // The reference's greedy ids, up to the end-of-turn token we stop at.
    assert_eq!(g.tokens, r.chat.greedy_ids[..r.chat.greedy_ids.len() - 1]);
}

#[test]
fn perplexity_on_held_out_moby_dick_is_sane_and_survives_hf_export() {
    let (m, tok) = model();
    // Chapter 2 is never used for training anywhere in the project.
    let text = data::moby_dick_chapter(2).unwrap().text;
    let mut ids = tok.encode(&text).unwrap();
    ids.truncate(768);
    let wins = eval::windows(&ids, 256);
    let base = eval::evaluate_windows(m, None, &wins, 3);
    assert!(
        base.perplexity > 5.0 && base.perplexity < 100.0,
        "perplexity {}",
        base.perplexity
    );

    let tmp_dir = scratch("hf");
    let dir = tmp_dir.path().to_path_buf();
    let note = export::export_hf(m, tok, &dir).unwrap();
    assert!(
        note.is_none(),
        "a dense model exports for stock HF: {note:?}"
    );
    let (m2, tok2) = weights::load(&dir, &Device::flex()).unwrap();
    assert_eq!(tok2.encode(&text).unwrap()[..768], ids[..]);
    let again = eval::evaluate_windows(&m2, None, &wins, 3);
    let rel = (again.perplexity - base.perplexity).abs() / base.perplexity;
    assert!(
        rel < 1e-3,
        "GGUF {} vs HF export {}",
        base.perplexity,
        again.perplexity
    );
}

#[test]
fn gguf_f32_export_reloads_with_identical_logits() {
    let (m, tok) = model();
    let r = reference();
    let tmp_dir = scratch("gguf");
    let dir = tmp_dir.path().to_path_buf();
    let p = dir.join("m.gguf");
    let rep = export::export_gguf(m, tok, &p, GgufPrecision::F32).unwrap();
    assert_eq!(rep.arch, "llama");
    let (m2, tok2) = weights::load(&p, &Device::flex()).unwrap();
    assert_eq!(
        tok2.encode(&r.chat.rendered_prompt).unwrap(),
        r.chat.prompt_ids
    );
    let a = to_rows(m.forward(m.tokens_tensor(std::slice::from_ref(&r.token_ids)), None));
    let b = to_rows(m2.forward(m2.tokens_tensor(std::slice::from_ref(&r.token_ids)), None));
    let worst = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |w, (x, y)| w.max((x - y).abs()));
    assert!(worst < 1e-4, "max logit difference {worst}");
}

#[test]
fn bad_model_files_are_clear_errors() {
    let tmp_dir = scratch("bad");
    let dir = tmp_dir.path().to_path_buf();
    let real = assets::default_model().unwrap();
    let bytes = std::fs::read(&real).unwrap();

    // Truncated: the first 4 MB of the real file.
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..4 << 20]).unwrap();
    let e = weights::load(&cut, &Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("truncated.gguf") && e.contains("truncated"),
        "{e}"
    );

    // Wrong magic.
    let mut wrong = bytes[..1024].to_vec();
    wrong[..4].copy_from_slice(b"GGJT");
    let p = dir.join("magic.gguf");
    std::fs::write(&p, &wrong).unwrap();
    let e = weights::load(&p, &Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("magic.gguf") && e.contains("not a GGUF file"),
        "{e}"
    );

    // A file with llama metadata but no tokenizer.
    let p = dir.join("notok.gguf");
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::Str("llama".into()),
        ),
        ("llama.block_count".to_string(), Value::U32(1)),
        ("llama.embedding_length".to_string(), Value::U32(32)),
        ("llama.attention.head_count".to_string(), Value::U32(2)),
        ("llama.feed_forward_length".to_string(), Value::U32(32)),
    ];
    gguf::write(
        &p,
        &meta,
        &[WriteTensor {
            name: "token_embd.weight".into(),
            dims: vec![32, 4],
            ggml_type: gguf::GgmlType::F32,
            values: vec![0.0; 128],
        }],
    )
    .unwrap();
    let e = weights::load(&p, &Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("notok.gguf") && e.contains("tokenizer.ggml.model"),
        "{e}"
    );

    // An architecture we do not run.
    let p = dir.join("mamba.gguf");
    gguf::write(
        &p,
        &[(
            "general.architecture".to_string(),
            Value::Str("mamba".into()),
        )],
        &[],
    )
    .unwrap();
    let e = weights::load(&p, &Device::flex()).err().unwrap();
    assert!(matches!(e, LoadError::UnsupportedArch { .. }), "{e}");
    assert!(e.to_string().contains("mamba"));
}
