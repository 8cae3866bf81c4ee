//! Compute backends side by side on the real SmolLM2-135M-Instruct model, in one run: a prompt
//! forward (prefill, as generation does it), one LoRA training step, and the prefill of a
//! structurally pruned model, with medians over a few repetitions after a warm-up. Optionally
//! checks the reference logits on each backend. `scripts/gpu-check.sh` runs it on a GPU.
//!
//! ```text
//! cargo bench -p device-agent --features ndarray --bench backends -- --backends flex,ndarray
//! ```
//!
//! Options (after `--`): `--backends LIST` (comma-separated; default flex plus every other
//! compiled CPU backend), `--reps N` (timed repetitions after one warm-up, default 5), `--seq N`
//! (prompt and training sequence length, 256), `--batch N` (training rows, 4), `--rank N` (LoRA
//! rank, 16), `--prune RATIO` (sparsity of the pruned model, 0.3), `--reference` (check the
//! reference top-5 logits within 0.05). Exits non-zero when a backend cannot start or fails the
//! reference check, so a script can rely on the status.

use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::Device;
use device_agent::assets;
use device_agent::backend::BackendKind;
use device_agent::gguf::GgufFile;
use device_agent::lora::Adapter;
use device_agent::model::{to_rows, KvCache, Llama};
use device_agent::prune::{self, KeptIndicesExt, PruneConfig};
use device_agent::tokenizer::Tok;
use device_agent::train::{Batch, TrainConfig, Tuner};
use device_agent::weights;
use protocol::KeptIndices;

/// Reference top-5 logits must agree within this (the issue's tolerance).
const REFERENCE_TOLERANCE: f32 = 0.05;

/// Text the prompt and training windows are cut from (repeated as needed). Its content does not
/// change the timings; real words keep the token statistics realistic.
const TEXT: &str = "The device agent keeps a frozen copy of the base model and a small adapter. \
Each round the server asks it to prune a share of the attention heads and feed-forward channels, \
guided by the gradients of the adapter, and to keep training so that the adapter recovers what \
pruning removed. Phones, single-board computers and embedded boards differ tenfold in speed and \
memory, so the server learns for every device which pruning ratio and which adapter rank pay off, \
and it merges the adapters it receives into one global adapter at the end of every round. ";

struct Options {
    backends: Vec<BackendKind>,
    reps: usize,
    seq: usize,
    batch: usize,
    rank: usize,
    prune: f64,
    reference: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        backends: BackendKind::ALL
            .into_iter()
            .filter(|k| k.is_compiled() && !k.is_gpu())
            .collect(),
        reps: 5,
        seq: 256,
        batch: 4,
        rank: 16,
        prune: 0.3,
        reference: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let number =
            |v: String, name: &str| v.parse::<usize>().map_err(|e| format!("{name} {v}: {e}"));
        match arg.as_str() {
            "--backends" => {
                o.backends = value("--backends")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse::<BackendKind>().map_err(|e| e.to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--reps" => o.reps = number(value("--reps")?, "--reps")?.max(1),
            "--seq" => o.seq = number(value("--seq")?, "--seq")?.max(2),
            "--batch" => o.batch = number(value("--batch")?, "--batch")?.max(1),
            "--rank" => o.rank = number(value("--rank")?, "--rank")?.max(1),
            "--prune" => {
                let v = value("--prune")?;
                o.prune = v.parse().map_err(|e| format!("--prune {v}: {e}"))?;
            }
            "--reference" => o.reference = true,
            // `cargo bench` passes `--bench` to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(o)
}

/// Seconds of one warm-up call, the median of `reps` timed calls, and the last call's value.
fn measure<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, f64, T) {
    let t0 = Instant::now();
    let mut last = f();
    let warm = t0.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        last = f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    (warm, times[times.len() / 2], last)
}

/// Logits of the last prompt position after a prefill that fills a KV cache, as `generate` does.
/// Reading them back waits for the device.
fn prefill(m: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(m.config.n_layers());
    let h = m.hidden(m.tokens_tensor(&[ids.to_vec()]), None, Some(&mut cache));
    let [n, d] = h.dims();
    let row = h.narrow(0, n - 1, 1).reshape([1, d]);
    to_rows(m.logits(row)).remove(0)
}

#[derive(serde::Deserialize)]
struct Top {
    id: u32,
    logit: f32,
}

#[derive(serde::Deserialize)]
struct Reference {
    token_ids: Vec<u32>,
    top5_per_position: Vec<Vec<Top>>,
}

/// Max |ours - reference| over the reference's top-5 logits, and whether every top-1 agrees.
fn reference_error(m: &Llama) -> (f32, bool) {
    let r: Reference = serde_json::from_str(include_str!(
        "../tests/data/smollm2-135m-instruct-fp32.json"
    ))
    .expect("reference json");
    let rows = to_rows(m.forward(m.tokens_tensor(std::slice::from_ref(&r.token_ids)), None));
    let mut worst = 0f32;
    let mut top1 = true;
    for (row, tops) in rows.iter().zip(&r.top5_per_position) {
        for t in tops {
            worst = worst.max((row[t.id as usize] - t.logit).abs());
        }
        let best = row
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0;
        top1 &= best as u32 == tops[0].id;
    }
    (worst, top1)
}

/// What one backend measured.
struct Row {
    backend: BackendKind,
    load_s: f64,
    reference: Option<(f32, bool)>,
    prefill_s: f64,
    prefill_warm_s: f64,
    step_s: f64,
    step_warm_s: f64,
    pruned_prefill_s: f64,
    pruned_logits: Vec<f32>,
}

fn run_backend(
    o: &Options,
    kind: BackendKind,
    tokens: &[u32],
    kept: &mut Option<KeptIndices>,
) -> Result<Row, String> {
    let device: Device = kind.device().map_err(|e| e.to_string())?;
    if let Some(adapter) = kind.adapter() {
        eprintln!("[{kind}] adapter {adapter}");
    }
    let path = assets::default_model().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let (m, _): (Llama, Tok) = weights::load(&path, &device).map_err(|e| e.to_string())?;
    device.sync().map_err(|e| format!("{e:?}"))?;
    let load_s = t.elapsed().as_secs_f64();
    eprintln!("[{kind}] model loaded in {load_s:.2} s");

    let reference = o.reference.then(|| reference_error(&m));
    if let Some((err, top1)) = reference {
        eprintln!("[{kind}] reference: max top-5 logit error {err:.1e}, top-1 agrees: {top1}");
    }

    let prompt = &tokens[..o.seq];
    let (prefill_warm_s, prefill_s, _) = measure(o.reps, || prefill(&m, prompt));
    eprintln!(
        "[{kind}] prefill {} tokens: {:.3} s median ({:.0} tok/s), warm-up {prefill_warm_s:.2} s",
        o.seq,
        prefill_s,
        o.seq as f64 / prefill_s
    );

    let windows: Vec<Vec<u32>> = (0..o.batch)
        .map(|b| tokens[b * o.seq..(b + 1) * o.seq + 1].to_vec())
        .collect();
    let batch = Batch::lm(&windows);
    let adapter = Adapter::new(&m.config, o.rank, 2.0 * o.rank as f64, 0, &device);
    let mut tuner = Tuner::new(
        &m,
        KeptIndices::dense(&m.config),
        adapter,
        TrainConfig::default(),
    )
    .map_err(|e| e.to_string())?;
    let (step_warm_s, step_s, loss) = measure(o.reps, || {
        let rec = tuner
            .train_micro(&batch, 1e-4, true)
            .expect("one micro-batch per step");
        device.sync().expect("device sync");
        rec.loss
    });
    drop(tuner);
    eprintln!(
        "[{kind}] LoRA step (batch {} x {}, rank {}): {:.3} s median ({:.0} tok/s), warm-up {step_warm_s:.2} s, loss {loss:.3}",
        o.batch,
        o.seq,
        o.rank,
        step_s,
        (o.batch * o.seq) as f64 / step_s
    );

    // The same kept units on every backend (chosen on the first), so pruned logits compare.
    let kept = kept.get_or_insert_with(|| {
        let pc = PruneConfig::for_layers(m.config.n_layers());
        prune::select_prune(
            &m.config,
            &KeptIndices::dense(&m.config),
            &prune::magnitude_scores(&m),
            o.prune,
            &pc,
        )
    });
    let pruned = prune::slice_model(&m, kept).map_err(|e| e.to_string())?;
    let (_, pruned_prefill_s, pruned_logits) = measure(o.reps, || prefill(&pruned, prompt));
    eprintln!(
        "[{kind}] {:.0}%-pruned prefill {} tokens: {:.3} s median ({:.0} tok/s), {} non-embedding parameters",
        100.0 * pruned.config.sparsity(),
        o.seq,
        pruned_prefill_s,
        o.seq as f64 / pruned_prefill_s,
        pruned.config.non_embedding_params()
    );
    Ok(Row {
        backend: kind,
        load_s,
        reference,
        prefill_s,
        prefill_warm_s,
        step_s,
        step_warm_s,
        pruned_prefill_s,
        pruned_logits,
    })
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("backends bench: {e}");
            return ExitCode::from(2);
        }
    };
    let tok = match assets::default_model()
        .map_err(|e| e.to_string())
        .and_then(|p| {
            let g = GgufFile::open(&p).map_err(|e| e.to_string())?;
            Tok::from_gguf(&g).map_err(|e| e.to_string())
        }) {
        Ok(tok) => tok,
        Err(e) => {
            eprintln!("backends bench: the default model is needed ({e}); run `cargo run -p device-agent -- fetch smollm2-135m-instruct`");
            return ExitCode::FAILURE;
        }
    };
    let need = o.batch * o.seq + 1;
    let mut tokens = Vec::new();
    while tokens.len() < need {
        tokens.extend(tok.encode(TEXT).expect("tokenizer encodes plain text"));
    }

    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "backends bench: prompt {} tokens, LoRA step batch {} x {} rank {}, {:.0}% pruning, {} timed reps after one warm-up, {} CPU threads available",
        o.seq,
        o.batch,
        o.seq,
        o.rank,
        100.0 * o.prune,
        o.reps,
        threads
    );
    let mut kept = None;
    let mut rows = Vec::new();
    let mut failed = false;
    for &kind in &o.backends {
        match run_backend(&o, kind, &tokens, &mut kept) {
            Ok(row) => {
                if row
                    .reference
                    .is_some_and(|(err, top1)| err >= REFERENCE_TOLERANCE || !top1)
                {
                    eprintln!(
                        "[{kind}] FAILED the reference check (tolerance {REFERENCE_TOLERANCE})"
                    );
                    failed = true;
                }
                rows.push(row);
            }
            Err(e) => {
                eprintln!("[{kind}] cannot run: {e}");
                println!("| {kind} | cannot run: {e} |");
                failed = true;
            }
        }
    }

    let flex_logits = rows
        .iter()
        .find(|r| r.backend == BackendKind::Flex)
        .map(|r| r.pruned_logits.clone());
    println!();
    println!(
        "| backend | load s | reference max err | prefill {} tok: s (tok/s) | LoRA step {}x{} r{}: s (tok/s) | {:.0}%-pruned prefill: s (tok/s) | pruned logits vs flex | warm-up prefill / step s |",
        o.seq,
        o.batch,
        o.seq,
        o.rank,
        100.0 * o.prune
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let reference = match r.reference {
            Some((err, top1)) => format!("{err:.1e}{}", if top1 { "" } else { " (top-1 differs)" }),
            None => "-".into(),
        };
        let vs_flex = match &flex_logits {
            Some(f) if r.backend != BackendKind::Flex => {
                let d = f
                    .iter()
                    .zip(&r.pruned_logits)
                    .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
                format!("{d:.4}")
            }
            _ => "-".into(),
        };
        println!(
            "| {} | {:.2} | {} | {:.3} ({:.0}) | {:.3} ({:.0}) | {:.3} ({:.0}) | {} | {:.2} / {:.2} |",
            r.backend,
            r.load_s,
            reference,
            r.prefill_s,
            o.seq as f64 / r.prefill_s,
            r.step_s,
            (o.batch * o.seq) as f64 / r.step_s,
            r.pruned_prefill_s,
            o.seq as f64 / r.pruned_prefill_s,
            vs_flex,
            r.prefill_warm_s,
            r.step_warm_s,
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
