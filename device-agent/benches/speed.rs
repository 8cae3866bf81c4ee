//! Speed and memory of the device agent on the default model, one row per peer figure of the
//! speed issue, all measured in one run: LoRA training step (rank 16, batch 4 x seq 256,
//! AdamW, fp32) dense and pruned, prompt forward (256 tokens, batch 1), greedy generation (64
//! tokens), and the pruned model's forward speed-up, with peak RSS.
//!
//! FLOPs are counted analytically by `device_agent::cost` (multiply-add = 2 FLOPs; a LoRA step
//! is forward + activation gradients, no base-weight gradients). Run with
//! `cargo bench -p device-agent --bench speed` (add `-- quick` for one repetition).
//!
//! It prints first the CPU (model name, family/model) and the paths our kernels take on it
//! (`device_agent::cpu`; `FEDSPINE_ISA=avx2|portable` caps ours, not burn's matmul). The
//! quantized frozen base (`--base-precision q8_0 | q4_0 | q4_1`) is measured beside fp32 in the
//! same run: its raw
//! matmul at the decode and prompt shapes, prompt forward, greedy generation and the resident
//! memory of the loaded model (each precision in its own process). `-- quant` runs only those
//! rows. bf16 products on the frozen base (`tune --precision bf16`, [`device_agent::bf16`]) are
//! timed against fp32 alternating call by call (the LoRA step dense and pruned, the prompt
//! forward); `-- bf16` runs only those rows. `-- matmuls` prints only the matmul table of
//! `-- profile` (flex, the `gemm` crate directly, and our bf16 kernels at the step's shapes).
//! `-- prompt` times the 256-token prompt to the first token (what llama-bench's pp rows
//! measure: logits at the last position only) beside the full forward, alternating. `--
//! small-step B S` times the dense rank-8 step on `B` windows of `S` tokens (a simulated
//! device's micro-batch, default 2 x 52).

use std::time::Instant;

use burn::tensor::Device;
use device_agent::bf16::Precision;
use device_agent::prune::{self, KeptIndicesExt};
use device_agent::quant::BasePrecision;
use device_agent::{assets, cost, generate, lora::Adapter, train, weights};
use protocol::KeptIndices;

#[path = "speed/quant.rs"]
mod quant_rows;

use quant_rows::{quant_rows, rss_only};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The default model, its tokenizer, the tokens of Moby-Dick chapter 3 and the bench's training
/// batch (4 windows of 256 tokens plus their next-token targets).
struct Setup {
    base: device_agent::model::Llama,
    tok: device_agent::tokenizer::Tok,
    ids: Vec<u32>,
    batch: train::Batch,
}

fn setup(device: &Device) -> Setup {
    let (base, tok) =
        weights::load(&assets::default_model().expect("model"), device).expect("load");
    let ids = tok
        .encode(&device_agent::data::moby_dick_chapter(3).expect("data").text)
        .expect("encode");
    let batch = lm_batch(&ids, 4, 256);
    Setup {
        base,
        tok,
        ids,
        batch,
    }
}

/// A causal-LM micro-batch of the first `batch` windows of `seq` tokens of `ids`.
fn lm_batch(ids: &[u32], batch: usize, seq: usize) -> train::Batch {
    let wins: Vec<Vec<u32>> = ids
        .chunks_exact(seq + 1)
        .take(batch)
        .map(<[u32]>::to_vec)
        .collect();
    train::Batch::lm(&wins)
}

/// The generation rows' prompt (tokens of a short chat request) and settings: 64 new tokens,
/// greedy.
fn greedy_64(tok: &device_agent::tokenizer::Tok) -> (Vec<u32>, generate::GenerateConfig) {
    let chat = tok
        .encode(&tok.chat_prompt("Write a short story about a whale.", None))
        .expect("encode");
    let cfg = generate::GenerateConfig {
        max_new_tokens: 64,
        sampling: generate::Sampling::Greedy,
        seed: 0,
    };
    (chat, cfg)
}

/// Median seconds of `reps` calls of `f` after one warm-up call.
fn time_median<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let _ = f();
    median(
        (0..reps)
            .map(|_| {
                let t0 = Instant::now();
                let _ = f();
                t0.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// A memory figure of `/proc/self/status` (`VmHWM:`, `VmRSS:`) in MiB; NaN where unreadable.
fn status_mib(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Kept maps for a uniform prune of `ratio` of the non-embedding parameters (magnitude
/// criterion, every block alike, so the comparison is about size, not about which units).
fn uniform_prune(base: &device_agent::model::Llama, ratio: f64) -> KeptIndices {
    let pc = prune::PruneConfig {
        uniform: true,
        protected_blocks: vec![],
        ..prune::PruneConfig::default()
    };
    prune::select_prune(
        &base.config,
        &KeptIndices::dense(&base.config),
        &prune::magnitude_scores(base),
        ratio,
        &pc,
    )
}

/// The pruned rows' kept maps: the first half of every block's MLP channels and six of its
/// nine query heads (the speed issue's pruned configuration).
fn half_mlp_two_thirds_heads(base: &device_agent::model::Llama) -> KeptIndices {
    let mut kept = KeptIndices::dense(&base.config);
    for b in &mut kept.blocks {
        b.mlp_channels = (0..base.config.ffn_dim as u32 / 2).collect();
        b.query_heads = vec![0, 1, 3, 4, 6, 7];
    }
    kept
}

/// `-- small-step B S`: the dense rank-8 LoRA step on a micro-batch of `B` windows of `S` tokens
/// (a simulated device's shape: the default preset's is about 2 x 52), its rate against the
/// step's FLOPs, so a simulator profile's products can be put beside the `sgemm` bench's rates.
fn small_step(batch: usize, seq: usize) {
    let device = Device::flex();
    let Setup { base, ids, .. } = setup(&device);
    let micro = lm_batch(&ids, batch, seq);
    let config = base.config.clone();
    let ad = Adapter::new(&config, 8, 16.0, 0, &device);
    let mut t = train::Tuner::new(
        &base,
        KeptIndices::dense(&config),
        ad,
        train::TrainConfig::default(),
    )
    .expect("tuner");
    let s = time_median(9, || {
        t.train_micro(&micro, 1e-3, false)
            .expect("one optimiser step per micro-batch")
    });
    let flops = cost::train_step_flops(&config, 8, batch, seq);
    println!("CPU: {}", device_agent::cpu::CpuInfo::detect());
    println!(
        "| LoRA r8 step, b{batch} x s{seq}, fp32, dense | {:.0} | tok/s ({:.1} ms/step, median of 9) | {:.0} | FLOPs with the head at every position |",
        (batch * seq) as f64 / s,
        s * 1e3,
        flops / s / 1e9
    );
}

/// One training configuration in its own process so its peak RSS is its own:
/// `speed step <sparsity> <rank>`.
fn step_only(sparsity: f64, rank: usize, recompute: bool, default_malloc: bool) {
    let device = Device::flex();
    let Setup { base, batch, .. } = setup(&device);
    let kept = uniform_prune(&base, sparsity);
    // As the agent holds its model: the base pruned in place, no dense copy beside it.
    let mut held = prune::HeldModel::dense(base).expect("dense base");
    held.narrow_to(&kept).expect("prune in place");
    let config = held.model().config.clone();
    let ad = Adapter::new(&config, rank, 2.0 * rank as f64, 0, &device);
    let cfg = train::TrainConfig {
        recompute_blocks: recompute,
        ..train::TrainConfig::default()
    };
    let mut t = train::Tuner::holding(held, ad, cfg);
    // The step's own peak: loading the dense base peaks first (about 650 MiB), above a pruned
    // step in block-recompute mode. Linux resets the high-water mark on this write.
    let load_peak = peak_rss_mib();
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let s = time_median(2, || t.train_micro(&batch, 1e-3, false));
    let mode = if recompute {
        cost::MemoryMode::RecomputeBlocks
    } else {
        cost::MemoryMode::KeepActivations
    };
    let est = cost::train_memory_in(&config, rank, 4, 256, mode).total as f64 / (1 << 20) as f64;
    let (step_peak, process_peak) = if reset {
        (peak_rss_mib(), load_peak.max(peak_rss_mib()))
    } else {
        (f64::NAN, peak_rss_mib())
    };
    println!(
        "| {:.2} | {rank} | {}{} | {s:.2} | {:.0} | {step_peak:.0} | {est:.0} | {:.0} |",
        config.sparsity(),
        if recompute {
            "block recompute"
        } else {
            "keep activations"
        },
        if default_malloc {
            ", glibc malloc defaults"
        } else {
            ""
        },
        1024.0 / s,
        process_peak
    );
}

/// `-- profile`: the per-operator profile of the dense rank-16 step and the matmul ceiling on
/// the step's shapes (the backend's matmul against the `gemm` crate it wraps, called directly).
fn profile(reps: usize) {
    let device = Device::flex();
    let Setup { base, batch, .. } = setup(&device);
    let ad = Adapter::new(&base.config, 16, 32.0, 0, &device);
    let p = device_agent::op_timer::lora_step_profile(&base, &ad, &batch, reps);
    println!("Per-operator profile, dense LoRA r16 step, b4 x s256 ({reps} repetitions, medians)");
    println!(
        "| operator | calls/step | fwd ms/call | bwd ms/call | ms/step | share of step | GFLOP/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut sum = 0.0;
    for o in &p.ops {
        sum += o.step_ms();
        let gf = if o.flops > 0.0 {
            format!("{:.0}", o.flops / ((o.fwd_ms + o.bwd_ms) * 1e-3) / 1e9)
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.1}% | {gf} |",
            o.name,
            o.calls,
            o.fwd_ms,
            o.bwd_ms,
            o.step_ms(),
            100.0 * o.step_ms() / p.step_ms
        );
    }
    println!(
        "| sum of the operators | | | | {sum:.0} | {:.1}% | |",
        100.0 * sum / p.step_ms
    );
    println!(
        "| rest: autodiff graph, AdamW, clipping, allocation | | | | {:.0} | {:.1}% | |",
        p.step_ms - sum,
        100.0 * (p.step_ms - sum) / p.step_ms
    );
    println!(
        "| whole step (measured) | 1 | | | {:.0} | 100% | |",
        p.step_ms
    );

    println!();
    matmul_ceiling(&base.config, reps, &device);
}

/// The matmul ceiling table: flex's products, the `gemm` crate called directly, and ours with
/// bf16 operands on every kernel this host may use, at the step's shapes (`-- matmuls` alone).
fn matmul_ceiling(config: &device_agent::model::ModelConfig, reps: usize, device: &Device) {
    println!(
        "Matmul ceiling on the step's shapes, GFLOP/s (contiguous operands, medians of {reps})"
    );
    let kernels = device_agent::bf16::gemm::Kernel::all_usable();
    let heads: String = kernels
        .iter()
        .map(|k| format!(" ours bf16 on {k}: packed per call / kernel alone |"))
        .collect();
    println!("| m x k x n | flex f32 | gemm crate f32, direct | flex f16 | flex bf16 |{heads}");
    println!("|---|---|---|---|---|{}", "---|".repeat(kernels.len()));
    let (n, d, f, v) = (1024, config.d_model, config.ffn_dim, 8192);
    for (m, k, nn) in [
        (n, d, d),
        (n, d, 192),
        (n, d, f),
        (n, f, d),
        (n, d, v),
        (2048, 2048, 2048),
    ] {
        use burn::tensor::DType;
        let fl = device_agent::op_timer::backend_matmul_gflops(m, k, nn, DType::F32, reps, device);
        let direct = gemm_direct_gflops(m, k, nn, reps);
        let h = device_agent::op_timer::backend_matmul_gflops(m, k, nn, DType::F16, reps, device);
        let b = device_agent::op_timer::backend_matmul_gflops(m, k, nn, DType::BF16, reps, device);
        let ours: String = kernels
            .iter()
            .map(|&kern| {
                let (per_call, alone) = ours_bf16_gflops(kern, m, k, nn, reps);
                format!(" {per_call:.0} / {alone:.0} |")
            })
            .collect();
        println!("| {m} x {k} x {nn} | {fl:.0} | {direct:.0} | {h:.0} | {b:.0} |{ours}");
    }
}

/// Our bf16 product on `kernel` (`x w`, `w` of `k x n`), GFLOP/s: as a step runs it (the weight
/// rounded and packed in each call) and the kernel alone on a weight packed once.
fn ours_bf16_gflops(
    kernel: device_agent::bf16::gemm::Kernel,
    m: usize,
    k: usize,
    n: usize,
    reps: usize,
) -> (f64, f64) {
    use device_agent::bf16::gemm::{matmul_on, Layout, PackedB};
    let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
    let w: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0f32; m * n];
    let packed = PackedB::pack(&w, k, n, Layout::Plain);
    let flops = 2.0 * (m * k * n) as f64;
    let mut time = |pack: bool| {
        let t0 = Instant::now();
        if pack {
            let p = PackedB::pack(&w, k, n, Layout::Plain);
            matmul_on(kernel, &a, m, &p, &mut c);
        } else {
            matmul_on(kernel, &a, m, &packed, &mut c);
        }
        t0.elapsed().as_secs_f64()
    };
    time(true);
    let per_call = median((0..reps.max(3)).map(|_| time(true)).collect());
    let alone = median((0..reps.max(3)).map(|_| time(false)).collect());
    (flops / per_call / 1e9, flops / alone / 1e9)
}

/// The `gemm` crate (the one the flex backend calls) on row-major f32 buffers, all threads.
#[allow(unsafe_code)]
fn gemm_direct_gflops(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0f32; m * n];
    let mut run = || {
        let t0 = Instant::now();
        // SAFETY: the three buffers hold m*k, k*n and m*n elements with the strides given.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        t0.elapsed().as_secs_f64()
    };
    run();
    let t = median((0..reps).map(|_| run()).collect());
    2.0 * (m * k * n) as f64 / t / 1e9
}

/// `-- bf16`: the LoRA step and the prompt forward with bf16 products on the frozen base
/// against fp32, the two alternating call by call in this process (medians of `reps` each).
fn bf16_rows(base: &device_agent::model::Llama, batch: &train::Batch, ids: &[u32], reps: usize) {
    let mut b16 = base.clone();
    let (p, why) = b16.set_precision(Precision::Bf16);
    if p != Precision::Bf16 {
        println!("| bf16 rows | not run | | | {} |", why.unwrap_or("fp32"));
        return;
    }
    let kernel = device_agent::bf16::gemm::Kernel::detect().expect("bf16 resolved");
    println!(
        "| bf16 products on | {kernel} | | | `FEDSPINE_ISA=avx512` keeps them off AMX tiles |"
    );
    for (name, kept) in [
        ("dense", KeptIndices::dense(&base.config)),
        ("pruned 50% MLP, 1/3 heads", half_mlp_two_thirds_heads(base)),
    ] {
        let config = prune::slice_model(base, &kept).expect("slice").config;
        let tuner = |m: &device_agent::model::Llama| {
            let ad = Adapter::new(&config, 16, 32.0, 0, &m.device);
            train::Tuner::new(m, kept.clone(), ad, train::TrainConfig::default()).expect("tuner")
        };
        let (mut t32, mut t16) = (tuner(base), tuner(&b16));
        let step = |t: &mut train::Tuner| {
            let t0 = Instant::now();
            t.train_micro(batch, 1e-3, false).expect("one step");
            t0.elapsed().as_secs_f64()
        };
        step(&mut t32);
        step(&mut t16);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            a.push(step(&mut t32));
            b.push(step(&mut t16));
        }
        let (a, b) = (median(a), median(b));
        let flops = cost::train_step_flops(&config, 16, 4, 256);
        println!("| LoRA r16 step, b4 x s256, bf16 base, {name} | {:.0} | tok/s ({b:.2} s/step) | {:.0} | fp32 alternating: {:.0} tok/s ({a:.2} s/step); **{:.2}x** |", 1024.0 / b, flops / b / 1e9, 1024.0 / a, a / b);
    }
    let prompt: Vec<u32> = ids[..256].to_vec();
    let toks = || base.tokens_tensor(std::slice::from_ref(&prompt));
    let fwd = |m: &device_agent::model::Llama| {
        let t0 = Instant::now();
        let _ = m.forward(toks(), None).into_data();
        t0.elapsed().as_secs_f64()
    };
    fwd(base);
    fwd(&b16);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(3) {
        a.push(fwd(base));
        b.push(fwd(&b16));
    }
    let (a, b) = (median(a), median(b));
    let flops = cost::forward_flops(&base.config, 256, 256, true);
    println!("| prompt forward 256 tokens, b1, bf16 base, dense | {:.0} | tok/s | {:.0} | fp32 alternating: {:.0} tok/s; **{:.2}x** |", 256.0 / b, flops / b / 1e9, 256.0 / a, a / b);
}

/// `-- prompt`: the dense 256-token prompt four ways, alternating call by call: to the first
/// token (logits at the last position only, what llama-bench's pp rows and `generate` compute)
/// with every block run on every position, the same with the last block after attention run on
/// the last position alone ([`device_agent::model::Llama::hidden_last`], as llama.cpp does), that
/// filling a KV cache (what `generate` does), and the whole forward with logits at every
/// position (the main table's row, what PyTorch's `model(ids)` computes). GFLOP/s count every
/// block on every position and not the head, for all four.
fn prompt_rows(base: &device_agent::model::Llama, ids: &[u32], reps: usize) {
    let prompt: Vec<u32> = ids[..256].to_vec();
    let toks = || base.tokens_tensor(std::slice::from_ref(&prompt));
    let d = base.config.d_model;
    let full = || base.forward(toks(), None).into_data();
    let every = || {
        let h = base.hidden(toks(), None, None);
        base.logits(h.narrow(0, 255, 1).reshape([1, d])).into_data()
    };
    let last = |cache: Option<&mut device_agent::model::KvCache>| {
        base.logits(base.hidden_last(toks(), None, cache))
            .into_data()
    };
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let mut s: [Vec<f64>; 4] = Default::default();
    for rep in 0..=reps {
        let e = time(&mut || drop(every()));
        let l = time(&mut || drop(last(None)));
        let mut cache = device_agent::model::KvCache::new(base.config.n_layers());
        let c = time(&mut || drop(last(Some(&mut cache))));
        let f = time(&mut || drop(full()));
        // The first round warms up.
        if rep > 0 {
            for (v, x) in s.iter_mut().zip([e, l, c, f]) {
                v.push(x);
            }
        }
    }
    let [e, l, c, f] = s.map(median);
    let flops = cost::forward_flops(&base.config, 256, 256, false);
    for (name, secs) in [
        ("to the first token, every block on every position", e),
        (
            "to the first token, the last block's MLP on the last position",
            l,
        ),
        (
            "to the first token as `generate` runs it (the same, filling a KV cache)",
            c,
        ),
        ("logits at every position", f),
    ] {
        println!(
            "| prompt forward 256 tokens, b1, fp32, {name} | {:.0} | tok/s ({:.1} ms) | {:.0} | |",
            256.0 / secs,
            secs * 1e3,
            flops / secs / 1e9
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // What the binaries do (see `backend::tune_allocator`); `default-malloc` measures without.
    let default_malloc = args.iter().any(|a| a == "default-malloc");
    if !default_malloc {
        device_agent::backend::tune_allocator();
    }
    if let Some(i) = args.iter().position(|a| a == "step") {
        let sp: f64 = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let r: usize = args.get(i + 2).and_then(|v| v.parse().ok()).unwrap_or(16);
        step_only(sp, r, args.iter().any(|a| a == "recompute"), default_malloc);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "small-step") {
        let arg = |j: usize, d: usize| args.get(i + j).and_then(|v| v.parse().ok()).unwrap_or(d);
        small_step(arg(1, 2), arg(2, 52));
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "rss") {
        let p: BasePrecision = args
            .get(i + 1)
            .map_or("f32", String::as_str)
            .parse()
            .expect("precision f32, q8_0, q4_0 or q4_1");
        rss_only(p);
        return;
    }
    if args.iter().any(|a| a == "matmuls") {
        let device = Device::flex();
        let Setup { base, .. } = setup(&device);
        println!("CPU: {}", device_agent::cpu::CpuInfo::detect());
        matmul_ceiling(&base.config, 5, &device);
        return;
    }
    if args.iter().any(|a| a == "profile") {
        profile(if args.iter().any(|a| a == "quick") {
            3
        } else {
            7
        });
        return;
    }
    let grid = args.iter().any(|a| a == "grid");
    if grid || args.iter().any(|a| a == "memory") {
        // Each configuration in its own process, so each peak RSS is its own. `memory`: the
        // rank-16 step, dense and half pruned (the base pruned in place, as the agent holds
        // it), in both modes; `grid`: sparsity x rank x mode.
        println!("| sparsity | rank | mode | s/step | tok/s | step peak RSS MiB | estimate MiB | process peak incl. loading MiB |");
        println!("|---|---|---|---|---|---|---|---|");
        let exe = std::env::current_exe().expect("own path");
        let (sps, ranks): (&[f64], &[usize]) = if grid {
            (&[0.0, 0.3, 0.5], &[8, 16, 64])
        } else {
            (&[0.0, 0.5], &[16])
        };
        for &sp in sps {
            for &r in ranks {
                for mode in ["keep", "recompute"] {
                    // `memory` also shows the allocator tuning's effect, side by side.
                    let allocs: &[&str] = if grid {
                        &["tuned"]
                    } else {
                        &["tuned", "default-malloc"]
                    };
                    for alloc in allocs {
                        let out = std::process::Command::new(&exe)
                            .args(["step", &sp.to_string(), &r.to_string(), mode, alloc])
                            .output()
                            .expect("child");
                        print!("{}", String::from_utf8_lossy(&out.stdout));
                    }
                }
            }
        }
        return;
    }
    let quick = args.iter().any(|a| a == "quick");
    let reps = if quick { 1 } else { 3 };
    let device = Device::flex();
    let Setup {
        base,
        tok,
        ids,
        batch,
    } = setup(&device);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("CPU: {}", device_agent::cpu::CpuInfo::detect());
    println!("threads: {threads}, repetitions: {reps} (medians)");
    println!("| workload | ours | unit | GFLOP/s | note |");
    println!("|---|---|---|---|---|");
    if args.iter().any(|a| a == "quant") {
        quant_rows(&base, &tok, &ids, reps);
        return;
    }
    if args.iter().any(|a| a == "bf16") {
        bf16_rows(&base, &batch, &ids, reps.max(3));
        return;
    }
    if args.iter().any(|a| a == "prompt") {
        prompt_rows(&base, &ids, if quick { 3 } else { 9 });
        return;
    }

    // Large square fp32 matmul through the backend.
    let sq = device_agent::op_timer::backend_matmul_gflops(
        2048,
        2048,
        2048,
        burn::tensor::DType::F32,
        reps.max(3),
        &device,
    );
    println!("| fp32 matmul 2048 x 2048 x 2048 | {sq:.0} | GFLOP/s | {sq:.0} | |");

    // LoRA training step, dense and pruned (50% MLP channels, 1/3 of the heads).
    let pruned_kept = half_mlp_two_thirds_heads(&base);
    for (name, kept) in [
        ("dense", KeptIndices::dense(&base.config)),
        ("pruned 50% MLP, 1/3 heads", pruned_kept.clone()),
    ] {
        let model = prune::slice_model(&base, &kept).expect("slice");
        let ad = Adapter::new(&model.config, 16, 32.0, 0, &device);
        let mut t =
            train::Tuner::new(&base, kept, ad, train::TrainConfig::default()).expect("tuner");
        let s = time_median(reps, || {
            t.train_micro(&batch, 1e-3, false)
                .expect("one optimiser step per micro-batch")
        });
        let flops = cost::train_step_flops(&model.config, 16, 4, 256);
        println!("| LoRA r16 step, b4 x s256, fp32, {name} | {:.0} | tok/s ({s:.2} s/step) | {:.0} | peak RSS so far {:.0} MiB |", 1024.0 / s, flops / s / 1e9, peak_rss_mib());
    }

    // Prompt forward, 256 tokens, batch 1, dense and pruned.
    let prompt: Vec<u32> = ids[..256].to_vec();
    let mut fwd = Vec::new();
    for (name, kept) in [
        ("dense", KeptIndices::dense(&base.config)),
        ("pruned", pruned_kept),
    ] {
        let model = prune::slice_model(&base, &kept).expect("slice");
        let toks = || model.tokens_tensor(std::slice::from_ref(&prompt));
        let s = time_median(reps.max(3), || model.forward(toks(), None).into_data());
        fwd.push(s);
        let flops = cost::forward_flops(&model.config, 256, 256, true);
        println!(
            "| prompt forward 256 tokens, b1, fp32, {name} | {:.0} | tok/s | {:.0} | |",
            256.0 / s,
            flops / s / 1e9
        );
    }
    println!(
        "| forward speed-up of the pruned model | {:.2} | x | | |",
        fwd[0] / fwd[1]
    );

    // Inference latency by sparsity (uniform pruning), 256-token prompt.
    let mut dense_s = 0.0;
    let mut dense_first = 0.0;
    for sp in [0.0, 0.3, 0.5] {
        let model = prune::slice_model(&base, &uniform_prune(&base, sp)).expect("slice");
        let toks = || model.tokens_tensor(std::slice::from_ref(&prompt));
        let s = time_median(reps.max(3), || model.forward(toks(), None).into_data());
        // Time to the first generated token: logits of the last position only, the last
        // block's MLP on that position alone, as `generate` does (the LM head costs 1/256 of
        // the full-logits forward's).
        let first = || {
            model
                .logits(model.hidden_last(toks(), None, None))
                .into_data()
        };
        let f = time_median(reps.max(3), first);
        if sp == 0.0 {
            dense_s = s;
            dense_first = f;
        }
        println!(
            "| prompt forward at sparsity {:.2} | {:.1} | ms ({:.2}x dense); first token {:.1} ms ({:.2}x dense) | | {} params |",
            model.config.sparsity(),
            s * 1e3,
            s / dense_s,
            f * 1e3,
            f / dense_first,
            model.config.total_params()
        );
    }

    // Greedy generation of 64 tokens after a short prompt.
    let (chat, cfg) = greedy_64(&tok);
    let mut rates = Vec::new();
    for _ in 0..reps {
        let g = generate::generate(&base, &tok, None, &chat, &cfg, |_| {}).expect("generate");
        rates.push(g.tokens.len() as f64 / g.decode_s);
    }
    println!(
        "| greedy generation, fp32 weights | {:.1} | tok/s | | weights {:.0} MB per token |",
        median(rates),
        base.config.total_params() as f64 * 4.0 / 1e6
    );
    quant_rows(&base, &tok, &ids, reps);
    bf16_rows(&base, &batch, &ids, reps);
    println!("peak RSS: {:.0} MiB", peak_rss_mib());
}
