//! The `device-agent` command line: fetch assets, inspect a checkpoint, generate text, evaluate.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use device_agent::assets;
use device_agent::backend::BackendKind;
use device_agent::data;
use device_agent::eval;
use device_agent::generate::{self, GenerateConfig, Sampling};
use device_agent::gguf::GgufFile;
use device_agent::model::Llama;
use device_agent::tokenizer::Tok;
use device_agent::weights;

#[derive(Parser)]
#[command(name = "device-agent", version, about = "FedSpine device agent: run, prune-and-tune and export a LLaMA-family model")]
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
}

fn load(args: &ModelArgs) -> Result<(Llama, Tok)> {
    let backend: BackendKind = args.backend.parse()?;
    let device = backend.device()?;
    let path = match &args.model {
        Some(p) => p.clone(),
        None => assets::default_model().context("getting the default model")?,
    };
    let (model, tok) = weights::load(&path, &device).with_context(|| format!("loading model {}", path.display()))?;
    Ok((model, tok))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Fetch { names } => {
            let list: Vec<assets::Asset> = if names.is_empty() {
                assets::ASSETS.to_vec()
            } else {
                names.iter().map(|n| assets::Asset::by_name(n)).collect::<Result<_, _>>()?
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
                        device_agent::gguf::Value::Str(s) if s.len() > 80 => format!("{:?}...", &s[..s.char_indices().nth(80).map_or(s.len(), |c| c.0)]),
                        other => format!("{other:?}"),
                    };
                    println!("  {k} = {shown}");
                }
            }
            let (m, tok) = load(&args)?;
            let c = &m.config;
            println!(
                "blocks {} d_model {} heads {}/{} kv head_dim {} ffn {} vocab {} tied {}",
                c.n_layers(), c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size, c.tie_embeddings
            );
            println!(
                "parameters: {} total, {} non-embedding, sparsity {:.3}",
                c.total_params(), c.non_embedding_params(), c.sparsity()
            );
            println!("tokenizer: {} tokens, eos {}, bos {:?}, chatml {}", tok.vocab_size(), tok.eos, tok.bos, tok.chatml);
        }
        Command::Generate(args) => {
            let (model, tok) = load(&args.model)?;
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
            let g = generate::generate(&model, &tok, None, &ids, &cfg, |piece| {
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
                (Some(p), _) => (p.display().to_string(), std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
                (None, Some("moby-dick") | None) => {
                    let d = data::moby_dick_chapter(args.chapter)?;
                    (format!("moby-dick {}", d.id), d.text)
                }
                (None, Some("sotu")) => {
                    let speeches = data::sotu()?;
                    let year = args.year.unwrap_or(2021);
                    let s = speeches.into_iter().find(|s| s.year == year).with_context(|| format!("no State of the Union address for {year}"))?;
                    (format!("sotu {} {}", s.year, s.president), s.text)
                }
                (None, Some(other)) => bail!("unknown data set '{other}' for eval (moby-dick, sotu, or use --text FILE)"),
            };
            let (model, tok) = load(&args.model)?;
            let mut ids = tok.encode(&text)?;
            if args.max_tokens > 0 {
                ids.truncate(args.max_tokens);
            }
            let seq_len = args.seq_len.min(model.config.max_seq_len);
            let m = eval::evaluate_windows(&model, None, &eval::windows(&ids, seq_len), 4);
            if args.json {
                println!("{}", serde_json::json!({"source": source, "seq_len": seq_len, "metrics": m}));
            } else {
                println!(
                    "{source}: {} tokens scored in windows of {seq_len}: perplexity {:.3}, next-token accuracy {:.4}, NLL {:.4}",
                    m.tokens, m.perplexity, m.accuracy, m.nll
                );
            }
        }
    }
    Ok(())
}
