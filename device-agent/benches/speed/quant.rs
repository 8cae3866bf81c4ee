//! The speed bench's quantized-base rows (`-- quant`, and `rss` in a fresh process): raw
//! matmuls from Q8_0, Q4_0 and Q4_1 blocks against fp32, prompt forward, greedy generation and
//! the loaded model's resident memory.

use std::time::Instant;

use burn::tensor::Device;
use device_agent::cpu::DotPath;
use device_agent::quant::{self, BasePrecision, QMatrix};
use device_agent::{assets, generate, weights};

use super::{greedy_64, median, status_mib, time_median};

/// `speed rss <precision>`, in a fresh process: resident memory before loading, after loading
/// fp32, and after holding the base at `precision`.
pub fn rss_only(precision: BasePrecision) {
    let before = status_mib("VmRSS:");
    let device = Device::flex();
    let (mut base, _tok) =
        weights::load(&assets::default_model().expect("model"), &device).expect("load");
    let loaded = status_mib("VmRSS:");
    base.set_base_precision(precision).expect("quantize");
    let held = status_mib("VmRSS:");
    println!("{before:.0} {loaded:.0} {held:.0}");
}

/// Seconds per call of `f`: the median of batches, each at least 50 ms long.
fn time_small<T>(mut f: impl FnMut() -> T) -> f64 {
    let t0 = Instant::now();
    let _ = f();
    let once = t0.elapsed().as_secs_f64().max(1e-7);
    let per_batch = ((0.05 / once) as usize).clamp(1, 10_000);
    median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..per_batch {
                    let _ = f();
                }
                t.elapsed().as_secs_f64() / per_batch as f64
            })
            .collect(),
    )
}

/// The quantized-base rows: raw matmul against fp32 at the decode and prompt shapes (Q8_0 by
/// dot path, Q4_0 and Q4_1 on this CPU's), prompt forward, greedy generation (fp32, Q8_0, Q4_0
/// and Q4_1 alternating in the same run) and the loaded model's resident memory.
pub fn quant_rows(
    base: &device_agent::model::Llama,
    tok: &device_agent::tokenizer::Tok,
    ids: &[u32],
    reps: usize,
) {
    use burn::tensor::{Distribution, Tensor};
    let device = base.device.clone();
    let (d, f) = (base.config.d_model, base.config.ffn_dim);
    for (n, k, m) in [(1, d, f), (1, f, d), (256, d, f), (256, f, d)] {
        let x = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<2>::random([k, m], Distribution::Normal(0.0, 0.05), &device);
        let t32 = time_small(|| x.clone().matmul(w.clone()).into_data());
        let q = QMatrix::from_in_out(quant::BlockFormat::Q8_0, w.clone()).expect("quantize");
        let xv: Vec<f32> = x.clone().into_data().try_to_vec().expect("f32");
        let tq = time_small(|| q.matmul(&xv, n).expect("shapes"));
        let q4: Vec<String> = [quant::BlockFormat::Q4_0, quant::BlockFormat::Q4_1]
            .into_iter()
            .map(|f| {
                let m = QMatrix::from_in_out(f, w.clone()).expect("quantize");
                let t = time_small(|| m.matmul(&xv, n).expect("shapes"));
                format!(
                    "{f} {:.0} GFLOP/s ({:.2} MB)",
                    2.0 * (n * k * m.rows()) as f64 / t / 1e9,
                    m.bytes() as f64 / 1e6
                )
            })
            .collect();
        let tqt = time_small(|| {
            quant::matmul_tensors(&[&q], x.clone())
                .expect("shapes")
                .remove(0)
                .into_data()
        });
        let fl = 2.0 * (n * k * m) as f64;
        // Each int8 path the CPU has, called directly (FEDSPINE_ISA does not limit these).
        let paths: Vec<String> = [
            DotPath::Avx512Vnni,
            DotPath::Avx2,
            DotPath::NeonDot,
            DotPath::Portable,
        ]
        .into_iter()
        .filter(|&p| p.runs_here())
        .map(|p| {
            let t = time_small(|| q.matmul_with(p, &xv, n).expect("shapes"));
            format!("{p} {:.0}", fl / t / 1e9)
        })
        .collect();
        println!(
            "| matmul {n} x {k} x {m}: fp32 (flex) vs Q8_0 | {:.0} vs {:.0} | GFLOP/s | | Q8_0 through tensors {:.0} GFLOP/s; by path: {}; weights {:.2} MB fp32, {:.2} MB Q8_0; {}; int8 MAC = 2 ops |",
            fl / t32 / 1e9,
            fl / tq / 1e9,
            fl / tqt / 1e9,
            paths.join(", "),
            (k * m * 4) as f64 / 1e6,
            q.bytes() as f64 / 1e6,
            q4.join(", ")
        );
    }

    // The model at each base precision: fp32 and the three block formats.
    let precisions = [
        BasePrecision::F32,
        BasePrecision::Q8_0,
        BasePrecision::Q4_0,
        BasePrecision::Q4_1,
    ];
    let models: Vec<(device_agent::model::Llama, Option<quant::QuantReport>)> = precisions
        .iter()
        .map(|&p| {
            let mut m = base.clone();
            let rep = m.set_base_precision(p).expect("quantize");
            (m, rep)
        })
        .collect();
    let names = "fp32 vs Q8_0 vs Q4_0 vs Q4_1";
    let fmt = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(" vs ")
    };
    let ratios = |v: &[f64]| {
        v[1..]
            .iter()
            .zip(&precisions[1..])
            .map(|(x, p)| format!("{p:?}/fp32 {:.2}x", x / v[0]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Prompt forward, 256 tokens, batch 1: full logits, as the fp32 row above.
    let prompt: Vec<u32> = ids[..256].to_vec();
    let mut fwd = Vec::new();
    for (model, _) in &models {
        let toks = || model.tokens_tensor(std::slice::from_ref(&prompt));
        let s = time_median(reps.max(3), || model.forward(toks(), None).into_data());
        fwd.push(256.0 / s);
    }
    println!(
        "| prompt forward 256 tokens, b1: {names} base | {} | tok/s | | {} |",
        fmt(&fwd, 0),
        ratios(&fwd)
    );

    // Greedy generation of 64 tokens, the precisions alternating in the same run.
    let (chat, cfg) = greedy_64(tok);
    let mut rates = vec![Vec::new(); models.len()];
    for _ in 0..reps.max(3) {
        for (i, (model, _)) in models.iter().enumerate() {
            let g = generate::generate(model, tok, None, &chat, &cfg, |_| {}).expect("generate");
            rates[i].push(g.tokens.len() as f64 / g.decode_s);
        }
    }
    let rates: Vec<f64> = rates.into_iter().map(median).collect();
    // Bytes each decoded token reads: every projection and the LM head (the tied embedding
    // table is the LM head; an untied one is read one row per token, which is negligible).
    let lm = 4.0 * (base.config.vocab_size * d) as f64;
    let fp32_bytes = models[1].1.expect("Q8_0").fp32_bytes as f64;
    let read: Vec<f64> = models
        .iter()
        .map(|(_, rep)| {
            let untied = if base.config.tie_embeddings { 0.0 } else { lm };
            rep.map_or(fp32_bytes, |r| r.quant_bytes as f64) * (fp32_bytes - untied) / fp32_bytes
        })
        .collect();
    let gbs: Vec<f64> = read.iter().zip(&rates).map(|(b, r)| b * r / 1e9).collect();
    println!(
        "| greedy generation, 64 tokens: {names} base | {} | tok/s | | {}; weights read per token {} MB ({} GB/s) |",
        fmt(&rates, 1),
        ratios(&rates),
        fmt(&read.iter().map(|b| b / 1e6).collect::<Vec<_>>(), 0),
        fmt(&gbs, 1)
    );

    // Resident memory, each precision in a fresh process.
    let exe = std::env::current_exe().expect("own path");
    let mut rss = Vec::new();
    for p in ["f32", "q8_0", "q4_0", "q4_1"] {
        let out = std::process::Command::new(&exe)
            .args(["rss", p])
            .output()
            .expect("child");
        let v: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        rss.push(v);
    }
    if rss.iter().all(|v| v.len() == 3) {
        let total: Vec<f64> = rss.iter().map(|v| v[2]).collect();
        let added: Vec<f64> = rss.iter().map(|v| v[2] - v[0]).collect();
        let held: Vec<f64> = models
            .iter()
            .map(|(_, r)| r.map_or(fp32_bytes, |r| r.quant_bytes as f64) / 1e6)
            .collect();
        println!(
            "| resident memory of the loaded model: {names} base | {} | MiB | | {}; above the process's {:.0} MiB before loading: {} MiB ({}); base held {} MB |",
            fmt(&total, 0),
            ratios(&total),
            rss[0][0],
            fmt(&added, 0),
            ratios(&added),
            fmt(&held, 0)
        );
    }
}
