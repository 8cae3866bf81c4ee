//! fp32 products with the frozen weights of the default model: the `gemm` crate (packing both
//! operands per product, as flex's matmul and `kernels::flex_matmul` do) against
//! `kernels::sgemm` (the weight read in place), alternated in one process, for every projection
//! shape of a block and the tied head, forward (`x w`) and input gradient (`dy w^T`), at the row
//! counts of a simulated device's micro-batch (32), a prompt (256) and the agent's default step
//! (1024).
//!
//! `cargo bench -p device-agent --bench sgemm` (`-- quick` for 3 repetitions instead of 7; `--
//! rows 64,128` for other row counts; `-- cold` to time every product with its weight out of
//! the caches, as a simulated device's step meets it, where by default the bench's repetitions
//! find it in L2 or L3; `-- align` times the in-place kernel on the same operands placed on
//! 64-byte boundaries and 16 bytes past them). `-- lora` times instead the LoRA backward's products that
//! read a large matrix: the `gemm` crate's pair `dy (sB)^T`, `(xA)^T dy` and its `x^T dz` against
//! `kernels::lora_grad` (one pass), at every projection's shape and rank 16. `-- int8` times the
//! in-place fp32 kernel against `quant::rowwise`'s int8 products with row-wise scales and the
//! left operand's largest columns in fp32 (`product_with_outliers`: the left operand quantized
//! inside the timing, the weight beforehand, as a frozen base would keep it), and against the
//! same products without those columns, with the int8 result's error against fp32.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use device_agent::kernels::{self, sgemm, Layout};
use device_agent::{assets, weights};
use protocol::Proj;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes read before each timed product under `-- cold`: several times any L3 a host of this
/// kind has (32 MiB per Zen 5 CCD), so the weight (at most 113 MB, the head) is read from memory,
/// as in a simulated device's step, where the fp32 model (540 MB) cannot stay in cache. Read, not
/// written, so no dirty lines are left to write back during the product. The product's left
/// operand is evicted too (at most a few MiB, a small part of its time).
const EVICT_BYTES: usize = 256 << 20;

/// What runs before each timed call: nothing, or a read of [`EVICT_BYTES`] (`-- cold`).
struct Evict(Option<Vec<u64>>);

impl Evict {
    fn new(cold: bool) -> Self {
        // Distinct values, so the pages are really there (not the shared zero page).
        Evict(cold.then(|| (0..EVICT_BYTES as u64 / 8).collect()))
    }

    /// On every thread of the pool, so its workers are awake when the product starts, as they are
    /// in a step (an idle worker's wake-up on a VM costs far more than a product of this size).
    fn run(&self) {
        use rayon::prelude::*;
        if let Some(buf) = &self.0 {
            let sum = buf
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |s, &v| s.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
        }
    }
}

/// Median milliseconds of `a` and of `b` over `reps` runs, alternated, `evict` before each.
fn alternate<A, B>(reps: usize, evict: &Evict, a: impl Fn() -> A, b: impl Fn() -> B) -> (f64, f64) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        evict.run();
        let t0 = Instant::now();
        drop(a());
        ta.push(t0.elapsed().as_secs_f64() * 1e3);
        evict.run();
        let t0 = Instant::now();
        drop(b());
        tb.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    (median(ta), median(tb))
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32")
}

fn main() {
    let reps = if std::env::args().any(|a| a == "quick") {
        3
    } else {
        7
    };
    let device = Device::flex();
    // `-- rows 64,128`: other row counts than the default three.
    let args: Vec<String> = std::env::args().collect();
    let rows: Vec<usize> = args
        .iter()
        .position(|a| a == "rows")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|r| r.parse().ok()).collect())
        .unwrap_or_else(|| vec![32, 256, 1024]);
    if args.iter().any(|a| a == "align") {
        println!("CPU: {}", device_agent::cpu::CpuInfo::detect());
        return alignment(&rows, reps);
    }
    if args.iter().any(|a| a == "lora") {
        println!("CPU: {}", device_agent::cpu::CpuInfo::detect());
        return lora_backward(&rows, reps, &device);
    }
    let (base, _tok) =
        weights::load(&assets::default_model().expect("model"), &device).expect("load");
    println!("CPU: {}", device_agent::cpu::CpuInfo::detect());
    if args.iter().any(|a| a == "int8") {
        return int8(&base, &rows, reps, &device);
    }
    let Some(kernel) = sgemm::Kernel::detect() else {
        println!("no AVX2/AVX-512 kernels on this CPU: products stay on the gemm crate");
        return;
    };
    println!(
        "kernel: {kernel:?}, threads: {}",
        rayon::current_num_threads()
    );
    let cold = args.iter().any(|a| a == "cold");
    let evict = Evict::new(cold);
    println!(
        "\nms per product, median of {reps}, alternated; GFLOP/s of the in-place kernel; {}\n",
        if cold {
            "weights out of the caches (each product after a 256 MiB read)"
        } else {
            "weights as the repetitions leave them (in L2 or L3 where they fit)"
        }
    );
    println!("| weight [rows, cols] | product | rows of x | gemm crate | in place | ratio | GFLOP/s | largest difference / scale |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut weights: Vec<(String, Tensor<2>)> = Proj::ALL
        .iter()
        .map(|&p| (format!("{p:?}"), base.base_weight(0, p)))
        .collect();
    weights.push(("head".into(), base.head_rows()));
    let (mut total_gemm, mut total_ours) = (0.0, 0.0);
    for m in rows {
        for (name, w) in &weights {
            let [rows, cols] = w.dims();
            for layout in [Layout::Plain, Layout::Transposed] {
                let (k, n) = match layout {
                    Layout::Plain => (rows, cols),
                    Layout::Transposed => (cols, rows),
                };
                // The head's forward is its logits (`x h^T`); its `x h` is the input gradient.
                if name == "head" && m == 1024 {
                    continue;
                }
                let x = Tensor::<2>::random([m, k], Distribution::Uniform(-1.0, 1.0), &device);
                let gemm_crate = || match layout {
                    Layout::Plain => kernels::matmul(&x, w).expect("flex f32"),
                    Layout::Transposed => {
                        kernels::matmul(&x, &w.clone().transpose()).expect("flex f32")
                    }
                };
                let ours =
                    || sgemm::matmul_on(kernel, &x, w, layout).expect("flex f32, contiguous");
                let (a, b) = (host(gemm_crate()), host(ours()));
                let scale = a.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-30);
                let worst = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |s, (p, q)| s.max((p - q).abs()));
                let (g, o) = alternate(reps, &evict, gemm_crate, ours);
                total_gemm += g;
                total_ours += o;
                let gflops = 2.0 * (m * k * n) as f64 / (o * 1e6);
                let what = match layout {
                    Layout::Plain => "x w",
                    Layout::Transposed => "x w^T",
                };
                println!(
                    "| {name} [{rows}, {cols}] | {what} | {m} | {g:.3} | {o:.3} | {:.2}x | {gflops:.0} | {:.1e} |",
                    g / o,
                    worst / scale
                );
            }
        }
    }
    println!(
        "\nall rows: gemm crate {total_gemm:.1} ms, in place {total_ours:.1} ms, {:.2}x",
        total_gemm / total_ours
    );
}

/// `-- lora`: the LoRA backward's products through the `gemm` crate against one pass of
/// `kernels::lora_grad`, at rank 16 (`dy` of each projection's output width with `(xA)` and
/// `sB`; `x` of each input width with the group's joined `dz`), alternated.
fn lora_backward(rows: &[usize], reps: usize, device: &Device) {
    let r = 16;
    println!(
        "\nms per backward, median of {reps}, alternated (both products of a row where two)\n"
    );
    println!("| products | rows | width | rank | gemm crate | one pass | ratio | largest difference / scale |");
    println!("|---|---|---|---|---|---|---|---|");
    let rnd = |d: [usize; 2]| Tensor::<2>::random(d, Distribution::Uniform(-1.0, 1.0), device);
    let (mut total_gemm, mut total_ours) = (0.0, 0.0);
    // (what, width of the large matrix, rank, with w): dy of q/o (576), k/v (192), gate/up
    // (1536), down (576); x of o (576) and down (1536). The joined q/k/v and gate/up factors
    // (ranks 48 and 32) are past `lora_grad::MAX_RANK` and stay on the `gemm` crate.
    let cases = [
        ("dy (sB)^T, (xA)^T dy", 576, r, true),
        ("dy (sB)^T, (xA)^T dy", 192, r, true),
        ("dy (sB)^T, (xA)^T dy", 1536, r, true),
        ("x^T dz", 576, r, false),
        ("x^T dz", 1536, r, false),
    ];
    for &n in rows {
        for &(what, c, r, with_w) in &cases {
            let (m, s, w) = (rnd([n, c]), rnd([n, r]), rnd([r, c]));
            let gemm_crate = || {
                if with_w {
                    let p = kernels::matmul(&m, &w.clone().transpose()).expect("flex f32");
                    let g = kernels::matmul(&s.clone().transpose(), &m).expect("flex f32");
                    (host(p), host(g))
                } else {
                    (
                        Vec::new(),
                        host(kernels::matmul(&m.clone().transpose(), &s).expect("flex f32")),
                    )
                }
            };
            let (mh, sh, wh) = (host(m.clone()), host(s.clone()), host(w.clone()));
            let ours = || {
                if with_w {
                    kernels::lora_grad::b_grads(&mh, n, c, &sh, &wh, r).expect("a rank-16 tile")
                } else {
                    let g = kernels::lora_grad::a_grad(&mh, n, c, &sh, r).expect("a rank-16 tile");
                    (Vec::new(), g)
                }
            };
            let (a, b) = (gemm_crate(), ours());
            let scale =
                a.0.iter()
                    .chain(&a.1)
                    .fold(0f32, |s, v| s.max(v.abs()))
                    .max(1e-30);
            let worst =
                a.0.iter()
                    .zip(&b.0)
                    .chain(a.1.iter().zip(&b.1))
                    .fold(0f32, |s, (p, q)| s.max((p - q).abs()));
            let (g, o) = alternate(reps, &Evict::new(false), gemm_crate, ours);
            total_gemm += g;
            total_ours += o;
            println!(
                "| {what} | {n} | {c} | {r} | {g:.3} | {o:.3} | {:.2}x | {:.1e} |",
                g / o,
                worst / scale
            );
        }
    }
    println!(
        "\nall rows: gemm crate {total_gemm:.2} ms, one pass {total_ours:.2} ms, {:.2}x",
        total_gemm / total_ours
    );
}

/// A copy of `v` starting `offset` bytes past a 64-byte boundary (a multiple of 4).
fn placed(v: &[f32], offset: usize) -> (Vec<f32>, usize) {
    let mut buf = vec![0f32; v.len() + 32];
    let base = buf.as_ptr() as usize;
    let start = ((64 - base % 64) % 64 + offset) % 64 / 4;
    buf[start..start + v.len()].copy_from_slice(v);
    (buf, start)
}

/// `-- align`: the in-place kernel on the same operands placed on 64-byte boundaries and 16 bytes
/// past them (where large allocations usually start), alternated.
fn alignment(rows: &[usize], reps: usize) {
    let kernel = sgemm::Kernel::detect().expect("an x86 kernel");
    println!("kernel: {kernel:?}; ms per product, median of {reps}, alternated\n");
    println!("| weight [rows, cols] | product | rows of x | both 64-byte aligned | both 16 past | ratio |");
    println!("|---|---|---|---|---|---|");
    let shapes = [
        ("Q", 576, 576),
        ("K", 576, 192),
        ("Gate", 576, 1536),
        ("Down", 1536, 576),
    ];
    let (mut ta, mut tm) = (0.0, 0.0);
    for &m in rows {
        for &(name, r, c) in &shapes {
            for layout in [Layout::Plain, Layout::Transposed] {
                let (k, _) = layout.reduced_and_out(r, c);
                let w: Vec<f32> = (0..r * c)
                    .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                    .collect();
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5)
                    .collect();
                let (wa, wa0) = placed(&w, 0);
                let (aa, aa0) = placed(&a, 0);
                let (wm, wm0) = placed(&w, 16);
                let (am, am0) = placed(&a, 16);
                let (wa, aa) = (&wa[wa0..wa0 + w.len()], &aa[aa0..aa0 + a.len()]);
                let (wm, am) = (&wm[wm0..wm0 + w.len()], &am[am0..am0 + a.len()]);
                assert_eq!(wa.as_ptr() as usize % 64, 0);
                assert_eq!(wm.as_ptr() as usize % 64, 16);
                let (x, y) = alternate(
                    reps,
                    &Evict::new(false),
                    || sgemm::product_on(kernel, aa, m, wa, r, c, layout),
                    || sgemm::product_on(kernel, am, m, wm, r, c, layout),
                );
                ta += x;
                tm += y;
                println!(
                    "| {name} [{r}, {c}] | {layout:?} | {m} | {x:.3} | {y:.3} | {:.2}x |",
                    y / x
                );
            }
        }
    }
    println!(
        "\nall: aligned {ta:.1} ms, 16 past {tm:.1} ms, {:.2}x",
        tm / ta
    );
}

/// `-- int8`: every projection's forward (`x w`, int8 against the weight's columns) and input
/// gradient (`dy w^T`, against its rows) through the in-place fp32 kernel and through
/// `quant::rowwise` (the left operand quantized inside the timing), alternated; the error is the
/// int8 result's relative Frobenius distance from the fp32 one, with normal left operands.
fn int8(base: &device_agent::model::Llama, rows: &[usize], reps: usize, device: &Device) {
    use device_agent::quant::rowwise::{self, RowQuant};
    let kernel = sgemm::Kernel::detect().expect("an x86 kernel");
    let path = device_agent::cpu::DotPath::detect();
    println!(
        "fp32 kernel: {kernel:?}; int8 path: {path}; threads {}",
        rayon::current_num_threads()
    );
    println!("ms per product, median of {reps}, alternated\n");
    println!("| weight [rows, cols] | product | rows of x | fp32 in place | int8 (quantizing x, fp32 outlier columns) | ratio | int8 without outlier columns | int8 product alone | int8 GOP/s | relative error |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let (mut tf, mut ti) = (0.0, 0.0);
    for &m in rows {
        for p in Proj::ALL {
            let w = base.base_weight(0, p);
            let [r, c] = w.dims();
            let wh = host(w.clone());
            for layout in [Layout::Plain, Layout::Transposed] {
                let (k, n) = layout.reduced_and_out(r, c);
                let qw = match layout {
                    Layout::Plain => RowQuant::quantize_columns(&wh, r, c),
                    Layout::Transposed => RowQuant::quantize(&wh, r, c),
                };
                // Where a column's weights lie, as `bf16::FrozenBackend` reads them: a row of
                // `w` for `x w`, a row of the weight's other int8 form for `dy w^T`.
                let other =
                    (layout == Layout::Transposed).then(|| RowQuant::quantize_columns(&wh, r, c));
                let weights = |cols: &[usize]| match &other {
                    None => cols
                        .iter()
                        .flat_map(|&c| &wh[c * n..(c + 1) * n])
                        .copied()
                        .collect(),
                    Some(o) => o.dequantize_rows(cols),
                };
                let x = host(Tensor::<2>::random(
                    [m, k],
                    Distribution::Normal(0.0, 1.0),
                    device,
                ));
                let fp32 = || sgemm::product_on(kernel, &x, m, &wh, r, c, layout);
                let q8 = || rowwise::product_with_outliers(path, &x, m, &qw, weights);
                let (want, got) = (fp32(), q8());
                let (mut e, mut s) = (0f64, 0f64);
                for (a, b) in want.iter().zip(&got) {
                    e += f64::from(a - b).powi(2);
                    s += f64::from(*a).powi(2);
                }
                let (f, i) = alternate(reps, &Evict::new(false), fp32, q8);
                let rows_only = || rowwise::product(path, &RowQuant::quantize(&x, m, k), &qw);
                let (_, plain) = alternate(reps, &Evict::new(false), q8, rows_only);
                let qx = RowQuant::quantize(&x, m, k);
                let alone = median(
                    (0..reps)
                        .map(|_| {
                            let t0 = Instant::now();
                            drop(rowwise::product(path, &qx, &qw));
                            t0.elapsed().as_secs_f64() * 1e3
                        })
                        .collect(),
                );
                tf += f;
                ti += i;
                let what = match layout {
                    Layout::Plain => "x w",
                    Layout::Transposed => "dy w^T",
                };
                println!(
                    "| {p:?} [{r}, {c}] | {what} | {m} | {f:.3} | {i:.3} | {:.2}x | {plain:.3} | {alone:.3} | {:.0} | {:.4} |",
                    f / i,
                    2.0 * (m * k * n) as f64 / (i * 1e6),
                    (e / s.max(1e-30)).sqrt()
                );
            }
        }
    }
    println!(
        "\nall: fp32 in place {tf:.1} ms, int8 {ti:.1} ms, {:.2}x",
        tf / ti
    );
}
