//! The `device-agent` command line: fetch assets, inspect a checkpoint, generate text, evaluate,
//! tune, export, join federated rounds, show a device state directory.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use device_agent::assets;
use device_agent::backend::BackendKind;
use device_agent::client::{machine_ram_bytes, parse_range, training_ram};
use device_agent::cost::{self, MemoryMode};
use device_agent::data;
use device_agent::eval;
use device_agent::export;
use device_agent::generate::{self, GenerateConfig, Sampling};
use device_agent::gguf::GgufFile;
use device_agent::job::LocalData;
use device_agent::lora::Adapter;
use device_agent::model::Llama;
use device_agent::prune::{Criterion, HeldModel, PruneConfig};
use device_agent::quant::{BasePrecision, QuantArithmetic};
use device_agent::state_dir;
use device_agent::tokenizer::Tok;
use device_agent::train::{
    check_weight_decay, optimiser_name, PruneShape, StepRecord, TrainConfig, Tuner,
};
use device_agent::user_data::UserDataConfig;
use device_agent::weights;
use device_agent::workload::{ClsShard, LmShard, SpamTask};

#[derive(Parser)]
#[command(
    name = "device-agent",
    version,
    about = "FedSpine device agent: run, prune-and-tune and export a LLaMA-family model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the default model and data sets into the cache (verified by SHA-256).
    Fetch {
        /// Assets to fetch (default: all): smollm2-135m-instruct, sotu, spam-assassin, moby-dick.
        names: Vec<String>,
    },
    /// Print a checkpoint's architecture, shapes and tokenizer facts.
    Inspect(ModelArgs),
    /// Generate text from a prompt (ChatML for instruct models), streaming tokens.
    Generate(GenerateArgs),
    /// Perplexity and next-token accuracy on a text file or a bundled data set.
    Eval(EvalArgs),
    /// Prune and tune locally (no server): LoRA fine-tuning with structured pruning.
    Tune(TuneArgs),
    /// Merge an adapter into its pruned base and write GGUF or HF safetensors.
    Export(ExportArgs),
    /// Take part in federated rounds: connect to an aggregator (QUIC, mutual TLS) and train.
    Join(device_agent::client::JoinArgs),
    /// Show what a device state directory (`join --state DIR`) holds, as JSON.
    State(StateArgs),
}

#[derive(Args)]
struct StateArgs {
    /// The state directory.
    #[arg(long)]
    state: PathBuf,
    /// Include the kept-index maps.
    #[arg(long)]
    kept: bool,
}

#[derive(Args)]
struct TuneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Workload: sotu (causal LM), spam (classification through the LM), moby-dick (causal LM).
    #[arg(long, default_value = "sotu")]
    dataset: String,
    /// Train on your own files instead of a bundled data set: a file or a directory of
    /// `.txt`/`.md` text and `.jsonl` records (text, chat, instruction or classification; see
    /// README).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Share of your own data (`--data`) held out for evaluation (seeded; at least one item).
    #[arg(long, default_value_t = 0.1)]
    test_fraction: f64,
    /// SOTU: inclusive year range, e.g. 1990-2021.
    #[arg(long, default_value = "2001-2021")]
    years: String,
    /// Spam: number of e-mails (balanced ham/spam, seeded sample).
    #[arg(long, default_value_t = 240)]
    examples: usize,
    /// Moby-Dick: inclusive chapter range.
    #[arg(long, default_value = "3-12")]
    chapters: String,
    /// Target sparsity (fraction of non-embedding parameters removed).
    #[arg(long, default_value_t = 0.0)]
    ratio: f64,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Optimiser steps.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Tokens per training window (LM workloads).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Importance criterion: lora-gradient, taylor, magnitude, random.
    #[arg(long, default_value = "lora-gradient")]
    criterion: String,
    /// The longest interval, in optimiser steps, between pruning events (the paper's K); a
    /// round too short for --min-prune-events events at this interval prunes more often.
    #[arg(long, default_value_t = 20)]
    prune_every: usize,
    /// The fewest events the pruning is spread over (within the first three quarters of the
    /// steps); 8 keeps every cubic event under a third of the gap.
    #[arg(long, default_value_t = 8)]
    min_prune_events: usize,
    /// How the pruning is spread over its events: cubic, linear, one-shot.
    #[arg(long, default_value = "cubic")]
    prune_schedule: String,
    /// Decoupled weight decay (0: the optimiser is Adam; above 0: AdamW).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Prune every prunable block by the same share (LoRAPrune's per-layer ratio) instead of
    /// one ranking over all blocks.
    #[arg(long)]
    per_block: bool,
    /// Equal head/channel counts in every block (exports as stock arch llama).
    #[arg(long)]
    uniform: bool,
    /// Prune MLP channels only.
    #[arg(long)]
    no_heads: bool,
    /// Activation memory: keep (fastest), recompute (one block at a time in the backward pass:
    /// about 0.6x the peak for about 1.45x the time), or auto (keep when its estimated
    /// peak fits in this machine's RAM).
    #[arg(long, default_value = "auto")]
    memory: String,
    /// The same as `--memory recompute`.
    #[arg(long)]
    low_memory: bool,
    /// Frozen-base products: fp32, bf16 (bf16 operands, fp32 sums, on AVX-512-BF16; LoRA and
    /// optimiser stay fp32; where the CPU cannot, it says so, runs fp32), int8 (int8 operands with
    /// one scale per row, each product's largest input columns in fp32; the LM head stays fp32)
    /// or auto (bf16 if it can; never int8).
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// The frozen base in memory while tuning: f32, q8_0, q4_0 or q4_1 (QLoRA style: each product
    /// dequantizes its weight; LoRA, optimiser and loss stay fp32; not with taylor or bf16).
    #[arg(long, default_value = "f32")]
    base_precision: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory for the adapter, kept-index maps and metrics.jsonl.
    #[arg(long, default_value = "runs/tune")]
    out: PathBuf,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Adapter directory written by `tune` (kept maps + adapter); without it the base is exported.
    #[arg(long, conflicts_with = "state")]
    adapter: Option<PathBuf>,
    /// A device state directory (`join --state`): export the device's pruned model with its
    /// last-trained adapter merged (`--model` must be the base it was written for).
    #[arg(long)]
    state: Option<PathBuf>,
    /// gguf or hf.
    #[arg(long, default_value = "gguf")]
    format: String,
    /// GGUF precision: f32, f16, q8_0, q4_0 or q4_1 (4-bit projections, embedding Q8_0).
    #[arg(long, default_value = "f16")]
    precision: String,
    /// Output file (gguf) or directory (hf).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A .gguf file or an HF checkpoint directory (default: SmolLM2-135M-Instruct from the cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute backend: flex (default CPU), ndarray, wgpu, vulkan, metal.
    #[arg(long, default_value = "flex")]
    backend: String,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message (or raw text with --raw).
    #[arg(long)]
    prompt: String,
    /// Feed the prompt as raw text instead of wrapping it in the chat template.
    #[arg(long)]
    raw: bool,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print prefill and decode speed to stderr at the end.
    #[arg(long)]
    stats: bool,
    /// The frozen base in memory: f32, q8_0, q4_0 or q4_1 (GGUF blocks; 0.27x, 0.17x, 0.20x the
    /// weights' memory, embedding and head Q8_0; any adapter fp32 on top). Decoded tokens take
    /// int8 products, a prompt of 64 tokens or more fp32 products of the dequantized weights.
    #[arg(long, default_value = "f32")]
    base_precision: String,
    /// A device state directory (`join --state`): chat with the device's pruned model and its
    /// last-trained adapter (`--model` must be the base it was written for).
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A UTF-8 text file to score.
    #[arg(long, conflicts_with = "dataset")]
    text: Option<PathBuf>,
    /// A bundled data set: moby-dick (use --chapter) or sotu (use --year).
    #[arg(long)]
    dataset: Option<String>,
    /// Moby-Dick chapter (1-135).
    #[arg(long, default_value_t = 1)]
    chapter: usize,
    /// SOTU year.
    #[arg(long)]
    year: Option<u32>,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Score at most this many tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    max_tokens: usize,
    /// Print the metrics as one JSON object.
    #[arg(long)]
    json: bool,
    /// The frozen base in memory: f32, q8_0, q4_0 or q4_1 (GGUF blocks; 0.27x, 0.17x, 0.20x the
    /// weights' memory, embedding and head Q8_0; any adapter fp32 on top). Decoded tokens take
    /// int8 products, a prompt of 64 tokens or more fp32 products of the dequantized weights.
    #[arg(long, default_value = "f32")]
    base_precision: String,
    /// Arithmetic of an fp32 base's products: fp32, bf16, int8 or auto (as `tune --precision`).
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Adapter directory written by `tune`: evaluates the pruned model with its adapter.
    #[arg(long, conflicts_with = "state")]
    adapter: Option<PathBuf>,
    /// A device state directory (`join --state`): evaluates the device's pruned model with its
    /// last-trained adapter (`--model` must be the base it was written for).
    #[arg(long)]
    state: Option<PathBuf>,
}

/// The model, its frozen base held at `hold` (a GGUF file's blocks read straight in); a base
/// that a state or adapter slices or merges is loaded in fp32 and held after.
fn load(args: &ModelArgs, hold: BasePrecision) -> Result<(Llama, Tok)> {
    let backend: BackendKind = args.backend.parse()?;
    let device = backend.device()?;
    let path = match &args.model {
        Some(p) => p.clone(),
        None => assets::default_model().context("getting the default model")?,
    };
    let (model, tok) = weights::load_held(&path, &device, hold)
        .with_context(|| format!("loading model {}", path.display()))?;
    Ok((model, tok))
}

fn main() -> Result<()> {
    device_agent::backend::tune_allocator();
    // A bad instruction-set cap is an error here rather than a warning in the kernels.
    device_agent::cpu::cap_from_env()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // `join --config FILE`: the file's flags go first, the command line's own override them.
    let command = Cli::command().mut_subcommand("join", |c| c.args_override_self(true));
    let known: Vec<String> = command
        .find_subcommand("join")
        .map(|c| {
            c.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let args = device_agent::agent_config::expand(std::env::args_os().collect(), &known)?;
    let cli = Cli::from_arg_matches(&command.get_matches_from(args))?;
    match cli.command {
        Command::Fetch { names } => {
            let list: Vec<assets::Asset> = if names.is_empty() {
                assets::ASSETS.to_vec()
            } else {
                names
                    .iter()
                    .map(|n| assets::Asset::by_name(n))
                    .collect::<Result<_, _>>()?
            };
            for a in list {
                let p = assets::ensure(&a)?;
                println!("{:<22} {}", a.name, p.display());
            }
        }
        Command::Inspect(args) => {
            let path = match &args.model {
                Some(p) => p.clone(),
                None => assets::default_model()?,
            };
            if path.extension().is_some_and(|e| e == "gguf") {
                let g = GgufFile::open(&path)?;
                println!("GGUF v{} with {} tensors", g.version, g.tensors.len());
                for (k, v) in &g.metadata {
                    let shown = match v {
                        device_agent::gguf::Value::Array(a) => format!("[{} items]", a.len()),
                        device_agent::gguf::Value::Str(s) if s.len() > 80 => format!(
                            "{:?}...",
                            &s[..s.char_indices().nth(80).map_or(s.len(), |c| c.0)]
                        ),
                        other => format!("{other:?}"),
                    };
                    println!("  {k} = {shown}");
                }
            }
            let (m, tok) = load(&args, BasePrecision::F32)?;
            let c = &m.config;
            println!(
                "blocks {} d_model {} heads {}/{} kv head_dim {} ffn {} vocab {} tied {}",
                c.n_layers(),
                c.d_model,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.ffn_dim,
                c.vocab_size,
                c.tie_embeddings
            );
            println!(
                "parameters: {} total, {} non-embedding, sparsity {:.3}",
                c.total_params(),
                c.non_embedding_params(),
                c.sparsity()
            );
            println!(
                "tokenizer: {} tokens, eos {}, bos {:?}, chatml {}",
                tok.vocab_size(),
                tok.eos,
                tok.bos,
                tok.chatml
            );
        }
        Command::Generate(args) => {
            let precision: BasePrecision = args.base_precision.parse()?;
            let hold = [precision, BasePrecision::F32][usize::from(args.state.is_some())];
            let (base, tok) = load(&args.model, hold)?;
            let (mut model, adapter) = match &args.state {
                Some(dir) => from_state(base, dir)?,
                None => (base, None),
            };
            hold_base(&mut model, precision, args.stats)?;
            let text = if args.raw || !tok.chatml {
                args.prompt.clone()
            } else {
                tok.chat_prompt(&args.prompt, args.system.as_deref())
            };
            let ids = tok.encode(&text)?;
            let sampling = if args.temperature <= 0.0 {
                Sampling::Greedy
            } else {
                Sampling::TopP {
                    temperature: args.temperature,
                    top_p: args.top_p,
                }
            };
            let cfg = GenerateConfig {
                max_new_tokens: args.max_new_tokens,
                sampling,
                seed: args.seed,
            };
            let mut out = std::io::stdout().lock();
            let g = generate::generate(&model, &tok, adapter.as_ref(), &ids, &cfg, |piece| {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            })?;
            writeln!(out)?;
            if args.stats {
                eprintln!(
                    "prompt {} tokens in {:.3} s ({:.1} tok/s); generated {} tokens in {:.3} s ({:.1} tok/s)",
                    g.prompt_tokens,
                    g.prefill_s,
                    g.prompt_tokens as f64 / g.prefill_s,
                    g.tokens.len(),
                    g.decode_s,
                    g.tokens.len() as f64 / g.decode_s.max(1e-9)
                );
            }
        }
        Command::Eval(args) => {
            let (source, text) = match (&args.text, args.dataset.as_deref()) {
                (Some(p), _) => (
                    p.display().to_string(),
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                (None, Some("moby-dick") | None) => {
                    let d = data::moby_dick_chapter(args.chapter)?;
                    (format!("moby-dick {}", d.id), d.text)
                }
                (None, Some("sotu")) => {
                    let speeches = data::sotu()?;
                    let year = args.year.unwrap_or(2021);
                    let s = speeches
                        .into_iter()
                        .find(|s| s.year == year)
                        .with_context(|| format!("no State of the Union address for {year}"))?;
                    (format!("sotu {} {}", s.year, s.president), s.text)
                }
                (None, Some(other)) => bail!(
                    "unknown data set '{other}' for eval (moby-dick, sotu, or use --text FILE)"
                ),
            };
            let precision: BasePrecision = args.base_precision.parse()?;
            let tuned = args.adapter.is_some() || args.state.is_some();
            let (base, tok) = load(
                &args.model,
                [precision, BasePrecision::F32][usize::from(tuned)],
            )?;
            let (mut model, adapter) = match (&args.adapter, &args.state) {
                (Some(dir), _) => {
                    let (m, a) = Adapter::load_tuned(&base, dir)?;
                    drop(base);
                    (m, Some(a))
                }
                (None, Some(dir)) => from_state(base, dir)?,
                (None, None) => (base, None),
            };
            hold_base(&mut model, precision, false)?;
            model.apply_precision(&args.precision)?;
            let mut ids = tok.encode(&text)?;
            if args.max_tokens > 0 {
                ids.truncate(args.max_tokens);
            }
            let seq_len = args.seq_len.min(model.config.max_seq_len);
            let m =
                eval::evaluate_windows(&model, adapter.as_ref(), &eval::windows(&ids, seq_len), 4);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"source": source, "seq_len": seq_len, "metrics": m})
                );
            } else {
                println!(
                    "{source}: {} tokens scored in windows of {seq_len}: perplexity {:.3}, next-token accuracy {:.4}, NLL {:.4}",
                    m.tokens, m.perplexity, m.accuracy, m.nll
                );
            }
        }
        Command::Tune(args) => tune(args)?,
        Command::Join(args) => {
            device_agent::client::run_join(args)?;
        }
        Command::State(args) => show_state(&args)?,
        Command::Export(args) => {
            let (base, tok) = load(&args.model, BasePrecision::F32)?;
            let model = match (&args.adapter, &args.state) {
                (Some(dir), _) => {
                    let (m, a) = Adapter::load_tuned(&base, dir)?;
                    a.merge_into(&m)
                }
                (None, Some(dir)) => match from_state(base, dir)? {
                    (m, Some(a)) => a.merge_into(&m),
                    (m, None) => m,
                },
                (None, None) => base,
            };
            match args.format.as_str() {
                "gguf" => {
                    let precision: export::GgufPrecision =
                        args.precision.parse().map_err(anyhow::Error::msg)?;
                    let rep = export::export_gguf(&model, &tok, &args.out, precision)?;
                    println!(
                        "wrote {} (arch {}, {:?})",
                        args.out.display(),
                        rep.arch,
                        precision
                    );
                    for n in rep.notes {
                        println!("note: {n}");
                    }
                }
                "hf" | "safetensors" => {
                    let note = export::export_hf(&model, &tok, &args.out)?;
                    println!("wrote {}", args.out.display());
                    if let Some(n) = note {
                        println!("note: {n}");
                    }
                }
                other => bail!("unknown export format '{other}' (gguf, hf)"),
            }
            let c = &model.config;
            println!(
                "parameters: {} total, {} non-embedding, sparsity {:.3}",
                c.total_params(),
                c.non_embedding_params(),
                c.sparsity()
            );
        }
    }
    Ok(())
}

/// Hold the (already sliced) model's frozen base at `precision`; with `report`, say what it
/// saved on stderr.
fn hold_base(model: &mut Llama, precision: BasePrecision, report: bool) -> Result<()> {
    model.set_base_precision(precision)?;
    if let (Some(q), true) = (model.quant_base(), report) {
        let cpu = device_agent::cpu::CpuInfo::detect();
        eprintln!("base held in {precision:?}: {} ({cpu})", q.report());
    }
    Ok(())
}

/// The device's pruned model and last-trained adapter from a state directory written by `join
/// --state` for `base`; says on stderr what it loaded.
fn from_state(base: Llama, dir: &std::path::Path) -> Result<(Llama, Option<Adapter>)> {
    let (model, adapter, saved) = state_dir::tuned_model(dir, base)?;
    let round = match &saved.last_round {
        Some(l) => format!("last round {} ({})", l.round, l.status),
        None => "no round yet".into(),
    };
    let adapter_note = match &adapter {
        Some(a) => format!(
            "its last-trained adapter (rank {}, alpha {})",
            a.rank, a.alpha
        ),
        None => "no adapter (it has not trained yet)".into(),
    };
    eprintln!(
        "device {} state {}: {round}; sparsity {:.3}, {adapter_note}",
        saved.device_id,
        dir.display(),
        model.config.sparsity()
    );
    Ok((model, adapter))
}

/// `device-agent state`: the state file's contents as JSON (no model needed).
fn show_state(args: &StateArgs) -> Result<()> {
    let out = state_dir::summary::summary(&args.state, args.kept)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn progress(len: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("the progress template is a fixed, valid indicatif template"),
    );
    pb
}

fn tune(args: TuneArgs) -> Result<()> {
    let base_precision: BasePrecision = args.base_precision.parse()?;
    let (mut base, tok) = load(&args.model, base_precision)?;
    let precision = base.apply_precision(&args.precision)?.name();
    eprintln!("precision: {precision} products on the frozen base");
    let criterion: Criterion = args.criterion.parse().map_err(anyhow::Error::msg)?;
    if !(0.0..0.95).contains(&args.ratio) {
        bail!("--ratio {} is outside [0, 0.95)", args.ratio);
    }
    let prune_shape: PruneShape = args.prune_schedule.parse().map_err(anyhow::Error::msg)?;
    if base_precision != BasePrecision::F32 {
        if criterion == Criterion::Taylor || precision != "fp32" {
            bail!("a quantized base trains on fp32 products of its dequantized weights: not with --criterion taylor (weight gradients) or --precision {precision}");
        }
        hold_base(&mut base, base_precision, true)?;
        base.set_quant_arithmetic(QuantArithmetic::Fp32);
    }
    check_weight_decay(args.weight_decay, args.lr)
        .map_err(|e| anyhow::anyhow!("--weight-decay: {e}"))?;
    let mut prune_cfg = PruneConfig::for_layers(base.config.n_layers());
    prune_cfg.uniform = args.uniform;
    prune_cfg.per_block = args.per_block;
    prune_cfg.prune_heads = !args.no_heads;
    // bf16 products keep the frozen weights packed beside their fp32 values: the RAM left for
    // the step is what `join` reports for its rounds too.
    let ram = machine_ram_bytes();
    let step_ram = training_ram(ram, &base);
    let packed = ram - step_ram;
    let peak = |m| {
        cost::train_memory_in(&base.config, args.rank, args.batch, args.seq_len, m).total + packed
    };
    let setting = if args.low_memory {
        "recompute"
    } else {
        &args.memory
    };
    let memory = MemoryMode::from_setting(setting, peak, ram).map_err(anyhow::Error::msg)?;
    eprintln!(
        "memory: {} (estimated peak {} MiB)",
        memory.name(),
        peak(memory) >> 20
    );
    let cfg = TrainConfig {
        lr: args.lr,
        weight_decay: args.weight_decay,
        grad_accum: args.grad_accum,
        prune_every: args.prune_every,
        min_prune_events: args.min_prune_events,
        prune_shape,
        criterion,
        prune: prune_cfg,
        seed: args.seed,
        recompute_blocks: memory.recomputes(),
        ..TrainConfig::default()
    };
    let adapter = Adapter::new(&base.config, args.rank, args.alpha, args.seed, &base.device);
    // The tuner takes the base over and prunes it in place: no dense copy stays resident.
    let mut tuner = Tuner::holding(HeldModel::dense(base)?, adapter, cfg);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let metrics_path = args.out.join("metrics.jsonl");
    let mut metrics = std::io::BufWriter::new(
        std::fs::File::create(&metrics_path)
            .with_context(|| format!("creating {}", metrics_path.display()))?,
    );
    let pb = progress(args.steps as u64);
    let mut log_step = |r: &StepRecord| {
        let _ = writeln!(
            metrics,
            "{}",
            serde_json::to_string(r).expect("a step record is plain numbers")
        );
        pb.set_message(format!("loss {:.3} sparsity {:.2}", r.loss, r.sparsity));
        pb.inc(1);
    };
    let mut summary = if let Some(path) = &args.data {
        let cfg = UserDataConfig {
            seq_len: args.seq_len,
            test_fraction: args.test_fraction,
            seed: args.seed,
            ..UserDataConfig::default()
        };
        let local = LocalData::from_files(path, &tok, &cfg)
            .with_context(|| format!("reading --data {}", path.display()))?;
        let before = local.evaluate(&tuner.model, None);
        let report = tuner.run_round(
            args.steps,
            args.ratio,
            |i| local.batch(i, args.batch),
            &mut log_step,
        )?;
        let after = local.evaluate(&tuner.model, Some(&tuner.adapter));
        serde_json::json!({"workload": path.display().to_string(), "train_items": local.train_len(),
            "before": {"loss": before.0, "metric": before.1}, "after": {"loss": after.0, "metric": after.1},
            "sparsity": report.sparsity_after, "prune_events": report.prune_events})
    } else {
        match args.dataset.as_str() {
            "sotu" | "moby-dick" => {
                let texts: Vec<String> = if args.dataset == "sotu" {
                    let (a, b) = parse_range(&args.years)?;
                    data::sotu()?
                        .into_iter()
                        .filter(|s| (a..=b).contains(&s.year))
                        .map(|s| s.text)
                        .collect()
                } else {
                    let (a, b) = parse_range(&args.chapters)?;
                    (a..=b)
                        .map(|c| data::moby_dick_chapter(c as usize).map(|d| d.text))
                        .collect::<Result<_, _>>()?
                };
                if texts.is_empty() {
                    bail!("the selection holds no documents");
                }
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let shard = LmShard::build(&tok, &refs, args.seq_len, 0.1, args.seed)?;
                let before = shard.evaluate(&tuner.model, None);
                let report = tuner.run_round(
                    args.steps,
                    args.ratio,
                    |i| shard.batch(i, args.batch),
                    &mut log_step,
                )?;
                let after = shard.evaluate(&tuner.model, Some(&tuner.adapter));
                serde_json::json!({"workload": args.dataset, "train_windows": shard.train.len(), "test_windows": shard.test.len(),
                "before": before, "after": after, "sparsity": report.sparsity_after, "prune_events": report.prune_events})
            }
            "spam" => {
                let task = SpamTask::new(&tok, 192)?;
                let mut mails = data::spam_assassin()?;
                use rand::seq::SliceRandom;
                mails.shuffle(
                    &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(args.seed),
                );
                let half = args.examples / 2;
                let pick: Vec<_> = mails
                    .iter()
                    .filter(|m| m.spam)
                    .take(half)
                    .chain(mails.iter().filter(|m| !m.spam).take(args.examples - half))
                    .collect();
                let examples = pick
                    .iter()
                    .map(|m| task.example(&tok, &m.text, m.spam))
                    .collect::<Result<Vec<_>, _>>()?;
                let shard = ClsShard::split(examples, 0.25, args.seed);
                let before = task.evaluate(&tuner.model, None, &shard.test, tok.eos, 8);
                let n = shard.train.len().max(1);
                let report = tuner.run_round(
                    args.steps,
                    args.ratio,
                    |i| {
                        let refs: Vec<_> = (0..args.batch)
                            .map(|k| &shard.train[(i * args.batch + k) % n])
                            .collect();
                        task.batch(&refs, tok.eos).0
                    },
                    &mut log_step,
                )?;
                let after =
                    task.evaluate(&tuner.model, Some(&tuner.adapter), &shard.test, tok.eos, 8);
                serde_json::json!({"workload": "spam", "train": shard.train.len(), "test": shard.test.len(),
                "before": before, "after": after, "sparsity": report.sparsity_after, "prune_events": report.prune_events})
            }
            other => bail!("unknown data set '{other}' (sotu, spam, moby-dick)"),
        }
    };
    pb.finish_and_clear();
    metrics.flush()?;
    let c = &tuner.model.config;
    tuner.adapter.save(&args.out, serde_json::json!({
        "kept": tuner.kept, "sparsity": c.sparsity(), "non_embedding_params": c.non_embedding_params(),
        "total_params": c.total_params(), "criterion": args.criterion, "seed": args.seed,
        "optimiser": optimiser_name(&tuner.cfg), "prune_schedule": args.prune_schedule,
    }))?;
    summary["optimiser"] = optimiser_name(&tuner.cfg).into();
    summary["memory_mode"] = memory.name().into();
    summary["precision"] = precision.to_string().into();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    println!(
        "saved adapter and kept-index maps to {}",
        args.out.display()
    );
    Ok(())
}
