//! Quality of a pruned model against the dense one: held-out perplexity on SOTU after a
//! stated recovery budget, per importance criterion, pruning schedule and target sparsity, on
//! the default model (SmolLM2-135M), one table row per configuration.
//!
//! Every configuration starts from the dense base and a fresh LoRA adapter (rank 8, alpha
//! 32, the `tune` defaults otherwise: learning rate 1e-3, warm-up and cosine decay) and
//! trains `--steps` optimiser steps of `--batch` windows of 128 tokens on SOTU 2001-2021,
//! pruning toward its target within the round by its schedule; the dense row trains the same
//! steps without pruning. Perplexity is over the first `--test-windows` held-out windows
//! (seeded split, never trained on).
//!
//! Run without a release build of burn (the dev profile builds dependencies at opt-level 3):
//! `cargo test --workspace --bench prune_quality -- --steps 200`, or `cargo bench --bench
//! prune_quality -- ...` where a release build is affordable. Options: `--steps N` (200),
//! `--batch N` (2), `--test-windows N` (32), `--seed N` (1), `--ratios 0.3,0.5`, `--criteria
//! lora-gradient,taylor,magnitude,random`, `--schedules cubic,one-shot` (the grid is their
//! product), or `--configs criterion:schedule:ratio,...` for an explicit list, and `--no-dense`
//! to skip the dense row.

use std::time::Instant;

use burn::tensor::Device;
use device_agent::lora::Adapter;
use device_agent::prune::{Criterion, KeptIndicesExt, PruneConfig};
use device_agent::train::{PruneShape, TrainConfig, Tuner};
use device_agent::workload::LmShard;
use device_agent::{assets, data, weights};
use protocol::KeptIndices;

struct Opts {
    steps: usize,
    batch: usize,
    test_windows: usize,
    seed: u64,
    dense: bool,
    configs: Vec<(String, String, f64)>,
}

fn list(v: &str) -> Vec<String> {
    v.split(',').map(str::to_string).collect()
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        steps: 200,
        batch: 2,
        test_windows: 32,
        seed: 1,
        dense: true,
        configs: Vec::new(),
    };
    let mut ratios = vec![0.3, 0.5];
    let mut criteria = list("lora-gradient,taylor,magnitude,random");
    let mut schedules = list("cubic,one-shot");
    let mut explicit = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--no-dense" {
            o.dense = false;
            i += 1;
            continue;
        }
        if a == "--bench" {
            // Passed by `cargo bench` to harness-less benches.
            i += 1;
            continue;
        }
        let v = args
            .get(i + 1)
            .ok_or_else(|| format!("{a} needs a value"))?
            .as_str();
        let num = |what: &str| -> Result<usize, String> {
            v.parse()
                .map_err(|_| format!("{what} {v:?} is not a whole number"))
        };
        match a {
            "--steps" => o.steps = num(a)?,
            "--batch" => o.batch = num(a)?,
            "--test-windows" => o.test_windows = num(a)?,
            "--seed" => o.seed = num(a)? as u64,
            "--ratios" => {
                ratios = v
                    .split(',')
                    .map(|r| {
                        r.parse()
                            .map_err(|_| format!("--ratios: {r:?} is not a number"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--criteria" => criteria = list(v),
            "--schedules" => schedules = list(v),
            "--configs" => explicit = Some(v.to_string()),
            other => return Err(format!("unknown option {other}")),
        }
        i += 2;
    }
    o.configs = match explicit {
        Some(e) => e
            .split(',')
            .map(|c| {
                let p: Vec<&str> = c.split(':').collect();
                match p.as_slice() {
                    [cr, sc, r] => r
                        .parse()
                        .map(|r| (cr.to_string(), sc.to_string(), r))
                        .map_err(|_| format!("--configs: ratio {r:?} in {c:?} is not a number")),
                    _ => Err(format!("--configs: {c:?} is not criterion:schedule:ratio")),
                }
            })
            .collect::<Result<_, _>>()?,
        None => ratios
            .iter()
            .flat_map(|&r| {
                let schedules = &schedules;
                criteria
                    .iter()
                    .flat_map(move |c| schedules.iter().map(move |s| (c.clone(), s.clone(), r)))
            })
            .collect(),
    };
    for (c, s, r) in &o.configs {
        c.parse::<Criterion>()?;
        s.parse::<PruneShape>()?;
        if !(0.0..0.95).contains(r) {
            return Err(format!("ratio {r} is outside [0, 0.95)"));
        }
    }
    if o.steps == 0 || o.batch == 0 || o.test_windows == 0 {
        return Err("--steps, --batch and --test-windows must be positive".into());
    }
    Ok(o)
}

/// One row: held-out perplexity, sparsity reached, the largest and the last training loss.
struct Row {
    ppl: f64,
    sparsity: f64,
    events: usize,
    max_loss: f64,
    last_loss: f64,
    secs: f64,
}

fn run(
    base: &device_agent::model::Llama,
    shard: &LmShard,
    o: &Opts,
    criterion: Criterion,
    shape: PruneShape,
    ratio: f64,
) -> Row {
    let t0 = Instant::now();
    let cfg = TrainConfig {
        criterion,
        prune_shape: shape,
        prune: PruneConfig::for_layers(base.config.n_layers()),
        seed: o.seed,
        ..TrainConfig::default()
    };
    let ad = Adapter::new(&base.config, 8, 32.0, o.seed, &base.device);
    let mut t = Tuner::new(base, KeptIndices::dense(&base.config), ad, cfg).expect("dense maps");
    let rep = t
        .run_round(base, o.steps, ratio, |i| shard.batch(i, o.batch), |_| {})
        .expect("pruning the dense maps");
    let m = shard.evaluate(&t.model, Some(&t.adapter));
    let losses: Vec<f64> = rep.steps.iter().map(|s| s.loss).collect();
    Row {
        ppl: m.perplexity,
        sparsity: rep.sparsity_after,
        events: rep.prune_events.len(),
        max_loss: losses.iter().copied().fold(f64::MIN, f64::max),
        last_loss: losses.last().copied().unwrap_or(f64::NAN),
        secs: t0.elapsed().as_secs_f64(),
    }
}

fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("prune_quality: {e}");
            std::process::exit(2);
        }
    };
    let device = Device::flex();
    let (base, tok) =
        weights::load(&assets::default_model().expect("model asset"), &device).expect("load");
    let texts: Vec<String> = data::sotu()
        .expect("SOTU asset")
        .into_iter()
        .filter(|s| (2001..=2021).contains(&s.year))
        .map(|s| s.text)
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut shard = LmShard::build(&tok, &refs, 128, 0.1, o.seed).expect("tokenise SOTU");
    shard.test.truncate(o.test_windows);
    let held_out: usize = shard.test.iter().map(|w| w.len() - 1).sum();
    println!(
        "SOTU 2001-2021, {} training windows, {} held-out windows ({held_out} tokens); \
         rank 8, alpha 32, {} steps of batch {} x 128, seed {}",
        shard.train.len(),
        shard.test.len(),
        o.steps,
        o.batch,
        o.seed
    );
    let untrained = shard.evaluate(&base, None).perplexity;
    println!("untrained dense base: held-out perplexity {untrained:.3}\n");
    println!("| criterion | schedule | target | sparsity | events | held-out ppl | x dense | max train loss | last train loss | s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let dense = o.dense.then(|| {
        let r = run(
            &base,
            &shard,
            &o,
            Criterion::LoraGradient,
            PruneShape::Cubic,
            0.0,
        );
        println!(
            "| dense | - | 0 | {:.3} | 0 | {:.3} | 1.00 | {:.3} | {:.3} | {:.0} |",
            r.sparsity, r.ppl, r.max_loss, r.last_loss, r.secs
        );
        r.ppl
    });
    for (c, s, ratio) in &o.configs {
        let criterion: Criterion = c.parse().expect("checked in opts");
        let shape: PruneShape = s.parse().expect("checked in opts");
        let r = run(&base, &shard, &o, criterion, shape, *ratio);
        let x = dense.map_or("-".to_string(), |d| format!("{:.2}", r.ppl / d));
        println!(
            "| {c} | {s} | {ratio} | {:.3} | {} | {:.3} | {x} | {:.3} | {:.3} | {:.0} |",
            r.sparsity, r.events, r.ppl, r.max_loss, r.last_loss, r.secs
        );
    }
}
