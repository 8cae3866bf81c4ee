//! LoRA-gradient importance on the default model (fp32, flex): the one-pass kernel
//! (`kernels::lora_importance`) against the tensor composition it replaced, over every
//! projection of the 30 blocks, alternated in one process; then a training step with importance
//! accumulating against a plain step (2 x 128 tokens, the simulator's calibration geometry).
//!
//! `cargo bench -p device-agent --bench importance` (`-- quick` for 3 repetitions instead of 7).

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use device_agent::kernels::{self, Along};
use device_agent::lora::Adapter;
use device_agent::prune::{self, KeptIndicesExt};
use device_agent::{assets, train, weights};
use protocol::{KeptIndices, Proj};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The axis a projection's scores are summed along in `prune::group_sums`.
fn along(p: Proj) -> Along {
    match p {
        Proj::O | Proj::Down => Along::Outputs,
        _ => Along::Inputs,
    }
}

fn main() {
    let reps = if std::env::args().any(|a| a == "quick") {
        3
    } else {
        7
    };
    let device = Device::flex();
    let (base, tok) =
        weights::load(&assets::default_model().expect("model"), &device).expect("load");
    println!("CPU: {}", device_agent::cpu::CpuInfo::detect());
    println!("\nLoRA-gradient importance of all 210 projections (ms per call, median of {reps}; alternated)\n");
    println!("| rank | tensor composition | one pass | ratio | largest relative difference |");
    println!("|---|---|---|---|---|");
    for rank in [8usize, 16, 32] {
        let rnd =
            |d: [usize; 2], x: f64| Tensor::<2>::random(d, Distribution::Uniform(-x, x), &device);
        let ops: Vec<_> = (0..base.blocks.len())
            .flat_map(|l| Proj::ALL.iter().map(move |&p| (l, p)))
            .map(|(l, p)| {
                let w0 = base.base_weight(l, p);
                let [n_in, n_out] = w0.dims();
                let t = (
                    w0,
                    rnd([n_in, rank], 0.05),
                    rnd([rank, n_out], 0.05),
                    rnd([n_in, rank], 0.01),
                    rnd([rank, n_out], 0.01),
                );
                (p, t)
            })
            .collect();
        let s = 2.0f32;
        let composed = || -> Vec<Tensor<1>> {
            ops.iter()
                .map(|(p, (w0, a, b, da, db))| {
                    let g = (da.clone().matmul(b.clone()) + a.clone().matmul(db.clone())
                        - da.clone().matmul(db.clone()))
                    .mul_scalar(s);
                    let w = w0.clone() + a.clone().matmul(b.clone()).mul_scalar(s);
                    prune::sum_along((g * w).abs(), along(*p))
                })
                .collect()
        };
        let fused = || -> Vec<Tensor<1>> {
            ops.iter()
                .map(|(p, (w0, a, b, da, db))| {
                    kernels::lora_importance(w0, a, b, da, db, s, along(*p)).expect("flex fp32")
                })
                .collect()
        };
        let host = |v: Vec<Tensor<1>>| -> Vec<f32> {
            v.into_iter()
                .flat_map(|t| t.into_data().try_to_vec::<f32>().expect("f32"))
                .collect()
        };
        let worst = host(composed())
            .iter()
            .zip(host(fused()))
            .map(|(&x, y)| ((x - y).abs() / x.abs().max(1e-12)) as f64)
            .fold(0.0f64, f64::max);
        let (mut tc, mut tf) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t0 = Instant::now();
            let c = composed();
            // Force the lazy work and keep it out of the next timing.
            drop(host(c));
            tc.push(t0.elapsed().as_secs_f64() * 1e3);
            let t0 = Instant::now();
            drop(host(fused()));
            tf.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let (c, f) = (median(tc), median(tf));
        println!("| {rank} | {c:.0} | {f:.0} | {:.2}x | {worst:.1e} |", c / f);
    }

    let ids = tok
        .encode(&device_agent::data::moby_dick_chapter(3).expect("data").text)
        .expect("encode");
    let wins: Vec<Vec<u32>> = ids.chunks_exact(129).take(2).map(<[u32]>::to_vec).collect();
    let batch = train::Batch::lm(&wins);
    println!("\nTraining step, dense, 2 x 128 tokens (s per step, median of {reps}; alternated)\n");
    println!("| rank | plain | importance accumulating | ratio |");
    println!("|---|---|---|---|");
    for rank in [8usize, 16] {
        let ad = Adapter::new(&base.config, rank, 2.0 * rank as f64, 0, &device);
        let mut t = train::Tuner::new(
            &base,
            KeptIndices::dense(&base.config),
            ad,
            train::TrainConfig::default(),
        )
        .expect("dense");
        let _ = t.train_micro(&batch, 1e-3, true);
        let (mut plain, mut scoring) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t0 = Instant::now();
            let _ = t.train_micro(&batch, 1e-3, false);
            plain.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            let _ = t.train_micro(&batch, 1e-3, true);
            scoring.push(t0.elapsed().as_secs_f64());
        }
        let (p, s) = (median(plain), median(scoring));
        println!("| {rank} | {p:.3} | {s:.3} | {:.3} |", s / p);
    }
}
