//! Prune-and-tune on the real SmolLM2-135M model and real data, sized for CI: LoRA identities,
//! pruning plans, the information in the LoRA-gradient criterion, tuning gains on a SOTU shard
//! and on a spam shard, and export/reload of a pruned, merged model.

use std::sync::OnceLock;

use burn::tensor::Device;
use device_agent::assets;
use device_agent::data;
use device_agent::export::{self, GgufPrecision};
use device_agent::lora::{Adapter, HostFactors};
use device_agent::model::{to_rows, Llama};
use device_agent::prune::{self, Criterion, KeptIndicesExt, PruneConfig};
use device_agent::tokenizer::Tok;
use device_agent::train::{TrainConfig, Tuner};
use device_agent::weights;
use device_agent::workload::{ClsShard, LmShard, SpamTask};
use protocol::KeptIndices;

fn model() -> &'static (Llama, Tok) {
    static M: OnceLock<(Llama, Tok)> = OnceLock::new();
    M.get_or_init(|| weights::load(&assets::default_model().unwrap(), &Device::flex()).unwrap())
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |w, (x, y)| w.max((x - y).abs()))
}

const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];

/// An adapter with small random B (so it changes the model), seeded.
fn random_adapter(m: &Llama, rank: usize, seed: u64) -> Adapter {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let fresh = Adapter::new(&m.config, rank, 2.0 * rank as f64, seed, &m.device);
    let host: Vec<HostFactors> = fresh
        .to_host()
        .into_iter()
        .map(|mut f| {
            f.b = (0..f.b.len())
                .map(|_| (rng.random::<f32>() - 0.5) * 0.02)
                .collect();
            f
        })
        .collect();
    Adapter::from_host(&m.config, rank, fresh.alpha, &host, &m.device).unwrap()
}

#[test]
fn fresh_lora_leaves_logits_unchanged_and_merging_equals_the_adapter() {
    let (m, _) = model();
    let toks = m.tokens_tensor(&[PROMPT.to_vec()]);
    let base = to_rows(m.forward(toks.clone(), None));
    let fresh = Adapter::new(&m.config, 8, 16.0, 3, &m.device);
    assert_eq!(
        to_rows(m.forward(toks.clone(), Some(&fresh))),
        base,
        "B = 0 must be an exact no-op"
    );

    let ad = random_adapter(m, 8, 4);
    let with = to_rows(m.forward(toks.clone(), Some(&ad)));
    assert!(
        max_diff(&with, &base) > 1e-2,
        "the random adapter changes the logits"
    );
    let merged = ad.merge_into(m);
    let d = max_diff(&to_rows(merged.forward(toks, None)), &with);
    assert!(d < 2e-3, "merged vs adapter: {d}");
}

#[test]
fn real_model_pruning_plans_and_zero_prune() {
    let (m, _) = model();
    let c = &m.config;
    let zero = prune::slice_model(m, &KeptIndices::dense(c)).unwrap();
    let toks = m.tokens_tensor(&[PROMPT.to_vec()]);
    assert_eq!(
        to_rows(zero.forward(toks.clone(), None)),
        to_rows(m.forward(toks.clone(), None))
    );

    let scores = prune::magnitude_scores(m);
    let pc = PruneConfig::for_layers(c.n_layers());
    let dense = c.dense_non_embedding_params() as f64;
    let group = (2 * c.d_model * c.head_dim * 2) as f64; // a head and the KV head it frees
    for p in [0.1, 0.3, 0.5] {
        let kept = prune::select_prune(c, &KeptIndices::dense(c), &scores, p, &pc);
        let got = prune::params_of(c, &kept) as f64;
        let plan = (1.0 - p) * dense;
        assert!(
            got <= plan && plan - got < group,
            "ratio {p}: {got} vs plan {plan}"
        );
        let pm = prune::slice_model(m, &kept).unwrap();
        assert!((pm.config.sparsity() - p).abs() < group / dense);
        assert_eq!(
            pm.blocks[0].w_gate.dims(),
            m.blocks[0].w_gate.dims(),
            "first block protected"
        );
        let rows = to_rows(pm.forward(toks.clone(), None));
        assert!(rows.iter().flatten().all(|v| v.is_finite()));
    }
}

fn moby_shard(tok: &Tok) -> LmShard {
    moby_shard_of(tok, 8, 128, 8)
}

/// Moby-Dick chapters 3 to `last` in windows of `window` tokens, 20% held out and cut to `test`
/// windows.
fn moby_shard_of(tok: &Tok, last: usize, window: usize, test: usize) -> LmShard {
    let texts: Vec<String> = (3..=last)
        .map(|c| data::moby_dick_chapter(c).unwrap().text)
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut s = LmShard::build(tok, &refs, window, 0.2, 7).unwrap();
    s.test.truncate(test);
    s
}

#[test]
fn lora_gradient_importance_beats_random_channels() {
    let (m, tok) = model();
    let shard = moby_shard(tok);
    let c = &m.config;
    let pc = PruneConfig {
        prune_heads: false,
        ..PruneConfig::for_layers(c.n_layers())
    };
    // 20% of the MLP channels of every prunable block.
    let prunable = (c.n_layers() - pc.protected_blocks.len()) as f64;
    let target =
        0.2 * prunable * (3 * c.d_model * c.ffn_dim) as f64 / c.dense_non_embedding_params() as f64;
    let mut ppl = Vec::new();
    for criterion in [Criterion::LoraGradient, Criterion::Random] {
        let cfg = TrainConfig {
            criterion,
            prune: pc.clone(),
            lr: 1e-3,
            seed: 5,
            ..TrainConfig::default()
        };
        let ad = Adapter::new(c, 8, 16.0, 5, &m.device);
        let mut t = Tuner::new(m, KeptIndices::dense(c), ad, cfg).unwrap();
        for i in 0..6 {
            t.train_micro(&shard.batch(i, 2), 1e-3, true).unwrap();
        }
        t.prune_to(target).unwrap();
        let removed: usize = t
            .kept
            .blocks
            .iter()
            .map(|b| c.ffn_dim - b.mlp_channels.len())
            .sum();
        let expect = (0.2 * prunable * c.ffn_dim as f64).round() as usize;
        assert!(
            removed.abs_diff(expect) <= 1,
            "{criterion:?}: removed {removed} channels, planned {expect}"
        );
        // The pruned base alone, without the adapter: only the choice of channels differs.
        ppl.push(shard.evaluate(&t.model, None).perplexity);
    }
    let base = shard.evaluate(m, None).perplexity;
    assert!(
        ppl[0] < ppl[1],
        "LoRA-gradient {} vs random {} (dense {base})",
        ppl[0],
        ppl[1]
    );
}

#[test]
fn tuning_on_a_sotu_shard_lowers_held_out_perplexity() {
    let (m, tok) = model();
    let texts: Vec<String> = data::sotu()
        .unwrap()
        .into_iter()
        .filter(|s| (2009..=2016).contains(&s.year))
        .map(|s| s.text)
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut shard = LmShard::build(tok, &refs, 128, 0.1, 11).unwrap();
    shard.test.truncate(8);
    let before = shard.evaluate(m, None);
    let cfg = TrainConfig {
        lr: 2e-3,
        seed: 11,
        prune: PruneConfig::for_layers(m.config.n_layers()),
        ..TrainConfig::default()
    };
    let mut t = Tuner::new(
        m,
        KeptIndices::dense(&m.config),
        Adapter::new(&m.config, 8, 16.0, 11, &m.device),
        cfg,
    )
    .unwrap();
    let rep = t.run_round(12, 0.0, |i| shard.batch(i, 4), |_| {}).unwrap();
    assert_eq!(rep.steps.len(), 12);
    let after = shard.evaluate(&t.model, Some(&t.adapter));
    assert!(
        after.perplexity < before.perplexity * 0.97,
        "held-out perplexity {} -> {}",
        before.perplexity,
        after.perplexity
    );
}

#[test]
fn tuning_on_a_spam_shard_raises_accuracy() {
    let (m, tok) = model();
    let task = SpamTask::new(tok, 128).unwrap();
    let mails = data::spam_assassin().unwrap();
    // A balanced, deterministic pick: every 40th message of each class.
    let pick: Vec<_> = mails
        .iter()
        .filter(|e| e.spam)
        .step_by(40)
        .take(60)
        .chain(mails.iter().filter(|e| !e.spam).step_by(40).take(60))
        .collect();
    let ex = pick
        .iter()
        .map(|e| task.example(tok, &e.text, e.spam).unwrap())
        .collect();
    let mut shard = ClsShard::split(ex, 1.0 / 3.0, 3);
    shard.test.truncate(40);
    let before = task.evaluate(m, None, &shard.test, tok.eos, 8);
    let cfg = TrainConfig {
        lr: 1e-3,
        seed: 3,
        ..TrainConfig::default()
    };
    let mut t = Tuner::new(
        m,
        KeptIndices::dense(&m.config),
        Adapter::new(&m.config, 8, 16.0, 3, &m.device),
        cfg,
    )
    .unwrap();
    let n = shard.train.len();
    t.run_round(
        16,
        0.0,
        |i| {
            task.batch(
                &(0..4)
                    .map(|k| &shard.train[(i * 4 + k) % n])
                    .collect::<Vec<_>>(),
                tok.eos,
            )
            .0
        },
        |_| {},
    )
    .unwrap();
    let after = task.evaluate(&t.model, Some(&t.adapter), &shard.test, tok.eos, 8);
    assert!(
        after.accuracy > before.accuracy + 0.1,
        "accuracy {} -> {}",
        before.accuracy,
        after.accuracy
    );
    // Chance is 0.5 on this balanced test set.
    assert!(
        after.accuracy >= 0.6,
        "accuracy after tuning {}",
        after.accuracy
    );
}

#[test]
fn pruned_merged_model_exports_and_reloads_with_the_same_logits() {
    let (m, tok) = model();
    let c = &m.config;
    let tmp = tempfile::Builder::new()
        .prefix("fedspine-export-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let toks = m.tokens_tensor(&[PROMPT.to_vec()]);
    for uniform in [false, true] {
        let pc = PruneConfig {
            uniform,
            ..PruneConfig::for_layers(c.n_layers())
        };
        let kept = prune::select_prune(
            c,
            &KeptIndices::dense(c),
            &prune::magnitude_scores(m),
            0.3,
            &pc,
        );
        let pm = prune::slice_model(m, &kept).unwrap();
        let ad = random_adapter(&pm, 4, 9);
        let merged = ad.merge_into(&pm);
        let want = to_rows(merged.forward(toks.clone(), None));

        let p = dir.join(format!("m-{uniform}.gguf"));
        let rep = export::export_gguf(&merged, tok, &p, GgufPrecision::F32).unwrap();
        assert_eq!(rep.arch, if uniform { "llama" } else { "deci" });
        let (g, _) = weights::load(&p, &Device::flex()).unwrap();
        let d = max_diff(&to_rows(g.forward(toks.clone(), None)), &want);
        assert!(d < 1e-4, "GGUF F32 reload differs by {d}");
        if rep.repeated_kv_heads == 0 {
            assert_eq!(
                g.config.non_embedding_params(),
                merged.config.non_embedding_params()
            );
        }

        let hf = dir.join(format!("hf-{uniform}"));
        let note = export::export_hf(&merged, tok, &hf).unwrap();
        assert_eq!(
            note.is_none(),
            uniform && merged.config.blocks.iter().all(|b| b.uniform_groups())
        );
        let (h, _) = weights::load(&hf, &Device::flex()).unwrap();
        let d = max_diff(&to_rows(h.forward(toks.clone(), None)), &want);
        assert!(d < 1e-4, "HF reload differs by {d}");
    }
    // Reduced precisions of the dense model with a merged adapter load and stay close. (A
    // heavily pruned model without recovery training amplifies rounding far more, so the
    // precision check uses the dense one.)
    let merged = random_adapter(m, 4, 9).merge_into(m);
    let want = to_rows(merged.forward(toks.clone(), None));
    let argmax = |v: &Vec<f32>| {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |w, (i, &x)| if x > w.1 { (i, x) } else { w })
            .0
    };
    for (prec, tol) in [(GgufPrecision::F16, 0.05), (GgufPrecision::Q8_0, 0.5)] {
        let p = dir.join(format!("dense-{prec:?}.gguf"));
        export::export_gguf(&merged, tok, &p, prec).unwrap();
        let (q, _) = weights::load(&p, &Device::flex()).unwrap();
        let got = to_rows(q.forward(toks.clone(), None));
        let mean = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .sum::<f32>()
            / (got.len() * got[0].len()) as f32;
        eprintln!("{prec:?}: mean abs logit difference {mean}");
        assert!(mean < tol, "{prec:?}: mean abs logit difference {mean}");
        assert_eq!(
            got.iter().map(argmax).collect::<Vec<_>>(),
            want.iter().map(argmax).collect::<Vec<_>>(),
            "{prec:?} changes a greedy choice"
        );
    }
}

/// `tune --precision bf16` and `--precision int8` against fp32 on the real model: 40 steps of
/// batch 2 x 64 on Moby-Dick, same seed, same batches, no pruning during the steps (a prune
/// event is a discrete choice that a last-bit difference can flip, after which the two runs
/// train different models: with pruning to 20% in the round, one run of this test kept a 0.002
/// gap and a later one 0.044). Each precision has its tolerance ([`Tolerance`]): bf16 (where
/// the CPU runs bf16 products; elsewhere it resolves to fp32 and says why) within 0.05 nats of
/// fp32's loss at every step (measured 0.0043 on Zen 4), the last ten steps' mean within 0.01
/// (measured 0.0005), the held-out perplexity within 1% (measured 0.03%); int8 (every CPU)
/// within wider bounds (its perplexity ran 4.1% above fp32's). Then a prune of each run keeps
/// its precision.
#[test]
fn low_precision_products_train_like_fp32_for_40_steps() {
    use device_agent::bf16::Precision;
    let (m, tok) = model();
    // Short windows keep the runs of this test near a minute each in the test build.
    let shard = moby_shard_of(tok, 6, 64, 16);
    let run = |base: &Llama| {
        let cfg = TrainConfig {
            lr: 2e-3,
            seed: 3,
            prune_every: 5,
            prune: PruneConfig::for_layers(base.config.n_layers()),
            ..TrainConfig::default()
        };
        let ad = Adapter::new(&base.config, 8, 16.0, 3, &base.device);
        let mut t = Tuner::new(base, KeptIndices::dense(&base.config), ad, cfg).unwrap();
        let t0 = std::time::Instant::now();
        let rep = t.run_round(40, 0.0, |i| shard.batch(i, 2), |_| {}).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let losses: Vec<f64> = rep.steps.iter().map(|s| s.loss).collect();
        let ppl = shard.evaluate(&t.model, Some(&t.adapter)).perplexity;
        t.prune_to(0.2).unwrap();
        (
            losses,
            ppl,
            t.model.config.sparsity(),
            t.model.precision(),
            secs,
        )
    };
    let (l32, p32, s32, _, secs32) = run(m);
    assert_eq!(l32.len(), 40);
    let tail = |l: &[f64]| l[30..].iter().sum::<f64>() / 10.0;
    for (want, tol) in [
        (Precision::Bf16, Tolerance::BF16),
        (Precision::Int8, Tolerance::INT8),
    ] {
        let mut low = m.clone();
        let (p, why) = low.set_precision(want);
        if want == Precision::Bf16 && !device_agent::bf16::gemm::available() {
            assert_eq!(p, Precision::Fp32);
            assert!(why.unwrap().contains("AVX-512-BF16"));
            continue;
        }
        assert_eq!(
            (p, why),
            (want, None),
            "{want} runs on every CPU that reaches here"
        );
        let (l, ppl, s, prec, secs) = run(&low);
        assert_eq!(prec, want, "the pruned copies keep the precision");
        let worst = l32
            .iter()
            .zip(&l)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        eprintln!(
            "fp32 vs {want}: worst step {worst:.4}, last-10 mean {:.4} vs {:.4}, ppl {p32:.3} vs {ppl:.3}, sparsity {s32:.3} vs {s:.3}; steps {secs32:.1} s vs {secs:.1} s",
            tail(&l32),
            tail(&l)
        );
        assert!(worst < tol.step, "{want}: worst step loss gap {worst}");
        assert!(
            (tail(&l32) - tail(&l)).abs() < tol.tail,
            "{want}: last-10 mean"
        );
        assert!(
            (ppl / p32 - 1.0).abs() < tol.ppl,
            "{want}: perplexity {p32} vs {ppl}"
        );
        assert!(
            s32 > 0.15 && (s32 - s).abs() < 0.01,
            "{want}: sparsity {s32} vs {s}"
        );
    }
}

/// How far a precision's 40 steps may stray from fp32's: the largest loss gap at one step, the
/// gap between the last ten steps' means (nats), and the held-out perplexity's relative gap.
struct Tolerance {
    step: f64,
    tail: f64,
    ppl: f64,
}

impl Tolerance {
    const BF16: Tolerance = Tolerance {
        step: 0.05,
        tail: 0.01,
        ppl: 0.01,
    };
    /// Int8 operands with row-wise scales, each product's 32 largest input columns in fp32: here
    /// a worst step of 0.034 nats, a last-10 gap of 0.002 and perplexity 0.9% above fp32's on
    /// Zen 5 (the same bits under the AVX2 cap); `tune --dataset sotu` over 40 steps strayed
    /// further (three seeds: worst steps 0.046-0.061, perplexity -1.7% to +1.8%), and rounding-order
    /// changes alone moved this test's perplexity gap between 0.0% and 0.9% (BENCHMARKS.md,
    /// "Int8 products with outlier columns"). About ten times bf16's perturbation, no bias seen:
    /// the bounds state that cost, not a match with fp32.
    const INT8: Tolerance = Tolerance {
        step: 0.075,
        tail: 0.015,
        ppl: 0.02,
    };
}
