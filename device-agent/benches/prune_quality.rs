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
//! `--batch N` (2), `--test-windows N` (32), `--seed N` (1), `--lr X` (1e-3), `--rank N` (8,
//! alpha 4N), `--ratios 0.3,0.5`, `--criteria
//! lora-gradient,taylor,magnitude,random`, `--schedules cubic,one-shot` (the grid is their
//! product), or `--configs criterion:schedule:ratio[:K],...` for an explicit list, and
//! `--no-dense` to skip the dense row (`--dense-only` runs only it). The pruning policy of every row: `--per-block`
//! (LoRAPrune's uniform share per block), `--channels-only` (no attention heads), `--protect
//! F,L` (the first `F` and last `L` blocks are never pruned; default 1,1). A configuration's `K` is the paper's pruning interval:
//! an event every `K` optimiser steps of the pruning window, with no floor on the number of
//! events (without it, `tune`'s defaults: at most 20 steps apart and at least 8 events).

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
    configs: Vec<Config>,
    /// The pruning policy of every row (its protected blocks set from `protect` once the
    /// model's depth is known).
    policy: PruneConfig,
    /// Blocks never pruned: the first and the last this many.
    protect: (usize, usize),
    /// Peak learning rate of every row.
    lr: f64,
    /// LoRA rank of every row (alpha is four times the rank, as at rank 8).
    rank: usize,
}

/// One row to run: criterion, schedule, target sparsity, and the pruning interval `K` when
/// the row sets one.
struct Config {
    criterion: String,
    schedule: String,
    ratio: f64,
    interval: Option<usize>,
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
        policy: PruneConfig::default(),
        protect: (1, 1),
        lr: TrainConfig::default().lr,
        rank: 8,
    };
    let mut ratios = vec![0.3, 0.5];
    let mut criteria = list("lora-gradient,taylor,magnitude,random");
    let mut schedules = list("cubic,one-shot");
    let mut explicit = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if [
            "--no-dense",
            "--dense-only",
            "--per-block",
            "--channels-only",
        ]
        .contains(&a)
        {
            match a {
                "--no-dense" => o.dense = false,
                "--dense-only" => explicit = Some(String::new()),
                "--per-block" => o.policy.per_block = true,
                _ => o.policy.prune_heads = false,
            }
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
            "--rank" => o.rank = num(a)?,
            "--lr" => {
                o.lr = v
                    .parse()
                    .ok()
                    .filter(|l: &f64| l.is_finite() && *l > 0.0)
                    .ok_or_else(|| format!("--lr {v:?} is not a positive number"))?
            }
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
            "--protect" => {
                o.protect = match v.split_once(',').map(|(f, l)| (f.parse(), l.parse())) {
                    Some((Ok(f), Ok(l))) => (f, l),
                    _ => return Err(format!("--protect {v:?} is not F,L (two whole numbers)")),
                }
            }
            other => return Err(format!("unknown option {other}")),
        }
        i += 2;
    }
    o.configs = match explicit {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => e
            .split(',')
            .map(|c| {
                let p: Vec<&str> = c.split(':').collect();
                let (cr, sc, r, k) = match p.as_slice() {
                    [cr, sc, r] => (cr, sc, r, None),
                    [cr, sc, r, k] => (cr, sc, r, Some(k)),
                    _ => {
                        return Err(format!(
                            "--configs: {c:?} is not criterion:schedule:ratio[:K]"
                        ))
                    }
                };
                let ratio = r
                    .parse()
                    .map_err(|_| format!("--configs: ratio {r:?} in {c:?} is not a number"))?;
                let interval = match k {
                    Some(k) => {
                        Some(k.parse::<usize>().ok().filter(|&k| k > 0).ok_or_else(|| {
                            format!("--configs: K {k:?} in {c:?} is not a positive whole number")
                        })?)
                    }
                    None => None,
                };
                Ok(Config {
                    criterion: cr.to_string(),
                    schedule: sc.to_string(),
                    ratio,
                    interval,
                })
            })
            .collect::<Result<_, _>>()?,
        None => ratios
            .iter()
            .flat_map(|&r| {
                let schedules = &schedules;
                criteria.iter().flat_map(move |c| {
                    schedules.iter().map(move |s| Config {
                        criterion: c.clone(),
                        schedule: s.clone(),
                        ratio: r,
                        interval: None,
                    })
                })
            })
            .collect(),
    };
    for c in &o.configs {
        c.criterion.parse::<Criterion>()?;
        c.schedule.parse::<PruneShape>()?;
        if !(0.0..0.95).contains(&c.ratio) {
            return Err(format!("ratio {} is outside [0, 0.95)", c.ratio));
        }
    }
    if o.steps == 0 || o.batch == 0 || o.test_windows == 0 || o.rank == 0 {
        return Err("--steps, --batch, --test-windows and --rank must be positive".into());
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
    interval: Option<usize>,
) -> Row {
    let t0 = Instant::now();
    let defaults = TrainConfig::default();
    let cfg = TrainConfig {
        criterion,
        prune_shape: shape,
        prune: o.policy.clone(),
        seed: o.seed,
        lr: o.lr,
        prune_every: interval.unwrap_or(defaults.prune_every),
        min_prune_events: if interval.is_some() {
            1
        } else {
            defaults.min_prune_events
        },
        ..defaults
    };
    let ad = Adapter::new(
        &base.config,
        o.rank,
        4.0 * o.rank as f64,
        o.seed,
        &base.device,
    );
    let mut t = Tuner::new(base, KeptIndices::dense(&base.config), ad, cfg).expect("dense maps");
    let rep = t
        .run_round(o.steps, ratio, |i| shard.batch(i, o.batch), |_| {})
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
    let mut o = o;
    let device = Device::flex();
    let (base, tok) =
        weights::load(&assets::default_model().expect("model asset"), &device).expect("load");
    let n_layers = base.config.n_layers();
    let (first, last) = o.protect;
    if first + last >= n_layers {
        eprintln!(
            "prune_quality: --protect {first},{last} leaves none of {n_layers} blocks to prune"
        );
        std::process::exit(2);
    }
    o.policy.protected_blocks = (0..first).chain(n_layers - last..n_layers).collect();
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
         rank {}, alpha {}, peak learning rate {}, {} steps of batch {} x 128, seed {}; \
         protected blocks {:?}, per-block {}, heads pruned {}",
        shard.train.len(),
        shard.test.len(),
        o.rank,
        4 * o.rank,
        o.lr,
        o.steps,
        o.batch,
        o.seed,
        o.policy.protected_blocks,
        o.policy.per_block,
        o.policy.prune_heads
    );
    let untrained = shard.evaluate(&base, None).perplexity;
    println!("untrained dense base: held-out perplexity {untrained:.3}\n");
    println!("| criterion | schedule | K | target | sparsity | events | held-out ppl | x dense | max train loss | last train loss | s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let dense = o.dense.then(|| {
        let r = run(
            &base,
            &shard,
            &o,
            Criterion::LoraGradient,
            PruneShape::Cubic,
            0.0,
            None,
        );
        println!(
            "| dense | - | - | 0 | {:.3} | 0 | {:.3} | 1.00 | {:.3} | {:.3} | {:.0} |",
            r.sparsity, r.ppl, r.max_loss, r.last_loss, r.secs
        );
        r.ppl
    });
    for c in &o.configs {
        let criterion: Criterion = c.criterion.parse().expect("checked in opts");
        let shape: PruneShape = c.schedule.parse().expect("checked in opts");
        let r = run(&base, &shard, &o, criterion, shape, c.ratio, c.interval);
        let x = dense.map_or("-".to_string(), |d| format!("{:.2}", r.ppl / d));
        let k = c.interval.map_or("default".to_string(), |k| k.to_string());
        println!(
            "| {} | {} | {k} | {} | {:.3} | {} | {:.3} | {x} | {:.3} | {:.3} | {:.0} |",
            c.criterion,
            c.schedule,
            c.ratio,
            r.sparsity,
            r.events,
            r.ppl,
            r.max_loss,
            r.last_loss,
            r.secs
        );
    }
}
