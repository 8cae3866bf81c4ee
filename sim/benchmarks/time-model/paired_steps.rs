//! Times a few training-step shapes side by side, paired per round with the reference step
//! (dense, rank 8, 2 x 128), to check the calibration grid's small geometries apart from it
//! (BENCHMARKS.md, "Time model", session 43). Not built by the workspace; to run it:
//!
//!     mkdir -p sim/examples && cp sim/benchmarks/time-model/paired_steps.rs sim/examples/
//!     cargo run --release -p sim --example paired_steps -- 8 4   # rounds, calls per point
//!
//! Every round builds each point's tuner again, makes one warm-up call and keeps the fastest
//! of the timed calls; rounds go forward and backward in turn. Per point it prints the
//! fastest call over all rounds and the median (and range) over rounds of its time over the
//! reference's time in the same round.
use device_agent::lora::Adapter;
use device_agent::prune::KeptIndicesExt;
use device_agent::train;
use sim::time_model::grid::{kept_for, Mix};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let rounds: usize = a.get(1).map_or(Ok(8), |s| s.parse())?;
    let reps: usize = a.get(2).map_or(Ok(4), |s| s.parse())?;
    let device = burn::tensor::Device::flex();
    let (base, tok) =
        device_agent::weights::load(&device_agent::assets::default_model()?, &device)?;
    let ids = tok.encode(&device_agent::data::moby_dick_chapter(3)?.text)?;
    // (label, mix, sparsity, rank, batch, sequence); the first is the reference.
    let points = [
        ("dense r8 2x128 (ref)", Mix::Channels, 0.0, 8, 2, 128),
        ("dense r16 1x64", Mix::Channels, 0.0, 16, 1, 64),
        ("channels-0.3 r16 1x64", Mix::Channels, 0.3, 16, 1, 64),
        ("h+c-0.6 r16 1x64", Mix::HeadsAndChannels, 0.6, 16, 1, 64),
        ("dense r16 2x64", Mix::Channels, 0.0, 16, 2, 64),
        ("channels-0.3 r16 2x64", Mix::Channels, 0.3, 16, 2, 64),
        ("dense r16 4x64", Mix::Channels, 0.0, 16, 4, 64),
    ];
    let mut times = vec![Vec::new(); points.len()];
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..points.len()).collect()
        } else {
            (0..points.len()).rev().collect()
        };
        for i in order {
            let (_, mix, sparsity, rank, batch, seq) = points[i];
            let kept = kept_for(&base, mix, sparsity);
            let mut cfg = base.config.clone();
            cfg.blocks = kept.shapes(&base.config);
            let windows: Vec<Vec<u32>> = ids
                .chunks_exact(seq + 1)
                .take(batch)
                .map(<[u32]>::to_vec)
                .collect();
            let batch = train::Batch::lm(&windows);
            let adapter = Adapter::new(&cfg, rank, 2.0 * rank as f64, 0, &device);
            let mut tuner =
                train::Tuner::new(&base, kept, adapter, train::TrainConfig::default())?;
            tuner.train_micro(&batch, 1e-4, false);
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t0 = Instant::now();
                tuner.train_micro(&batch, 1e-4, false);
                best = best.min(t0.elapsed().as_secs_f64() * 1e3);
            }
            times[i].push(best);
        }
        let row: Vec<f64> = times.iter().map(|v| v[round].round()).collect();
        eprintln!("round {round}: {row:?} ms");
    }
    for (i, p) in points.iter().enumerate() {
        let fastest = times[i].iter().copied().fold(f64::INFINITY, f64::min);
        let mut ratios: Vec<f64> = times[i].iter().zip(&times[0]).map(|(x, r)| x / r).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "{:24} fastest {:7.1} ms; over the reference, per round: median {:.3}, range {:.3}-{:.3}",
            p.0,
            fastest,
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    Ok(())
}
