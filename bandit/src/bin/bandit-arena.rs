//! `bandit-arena`: runs every bandit policy against synthetic and trace-replay environments and reports cumulative regret.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bandit::arena::{
    self, parse_trace_jsonl, report, svg, ArenaConfig, EnvironmentConfig, EnvironmentReport,
    PolicyScope, SyntheticConfig, SyntheticEnvironment, TraceConfig, TraceEnvironment,
};
use clap::Parser;

/// Tune bandit policies without a model: run them all against environments with known
/// optima and compare cumulative regret (lower is better).
///
/// With no arguments it runs every policy with default parameters on the built-in synthetic
/// environments (stationary, drifting, switching, heavy-tailed, device-classes) for 2,000
/// rounds and 8 devices, prints the regret table and writes summary.json, summary.csv and one
/// regret-ENVIRONMENT.svg per environment into --out.
#[derive(Parser, Debug)]
#[command(name = "bandit-arena", version)]
struct Args {
    /// Arena config (TOML): seed, rounds, devices, scope, feasibility, and arrays of policy
    /// and environment tables. Print the default one with --print-config.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Seed for the policies' and the environments' random draws.
    #[arg(long)]
    seed: Option<u64>,
    /// Rounds per run.
    #[arg(long)]
    rounds: Option<u64>,
    /// Devices in each synthetic environment.
    #[arg(long)]
    devices: Option<usize>,
    /// One policy per device, or one shared by all devices.
    #[arg(long, value_parser = ["per-device", "shared"])]
    scope: Option<String>,
    /// Run only these environments (names from the config or the built-in presets);
    /// repeatable.
    #[arg(long = "env")]
    envs: Vec<String>,
    /// Run only these policies (by name); repeatable.
    #[arg(long = "policy")]
    policies: Vec<String>,
    /// Also replay this JSONL reward trace ({device_id, round, prune_ratio, rank, reward}
    /// per line); repeatable.
    #[arg(long = "trace")]
    traces: Vec<PathBuf>,
    /// Window (in trace rounds) used when replaying --trace files.
    #[arg(long, default_value_t = 5)]
    trace_window: u64,
    /// Directory for summary.json, summary.csv and the SVG plots.
    #[arg(long, default_value = "target/bandit-arena")]
    out: PathBuf,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading arena config {}", path.display()))?;
            toml::from_str::<ArenaConfig>(&text)
                .with_context(|| format!("parsing arena config {}", path.display()))?
        }
        None => ArenaConfig::default(),
    };
    apply_flags(&mut config, &args)?;
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&config).context("rendering the config as TOML")?
        );
        return Ok(());
    }
    if config.policies.is_empty() {
        bail!("no policies to run");
    }
    if config.environments.is_empty() {
        bail!("no environments to run");
    }
    let settings = config.settings();
    let config_dir = args
        .config
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();

    let started = Instant::now();
    let mut reports: Vec<EnvironmentReport> = Vec::new();
    for env_config in &config.environments {
        let t0 = Instant::now();
        let report = match env_config {
            EnvironmentConfig::Synthetic(c) => {
                let mut env = SyntheticEnvironment::new(c.clone(), config.devices)
                    .with_context(|| format!("building environment {}", c.name))?;
                arena::run_environment(&mut env, &config.policies, &settings)
            }
            EnvironmentConfig::Trace(c) => {
                let path = config_dir.join(&c.path);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading trace {}", path.display()))?;
                let records = parse_trace_jsonl(&text)
                    .with_context(|| format!("parsing trace {}", path.display()))?;
                let mut env = TraceEnvironment::new(c.clone(), records)
                    .with_context(|| format!("building environment {}", c.name))?;
                arena::run_environment(&mut env, &config.policies, &settings)
            }
        }
        .with_context(|| format!("running environment {}", env_config.name()))?;
        eprintln!(
            "{}: {} policies x {} devices x {} rounds in {:.2} s",
            report.environment,
            report.runs.len(),
            report.devices,
            report.rounds,
            t0.elapsed().as_secs_f64()
        );
        reports.push(report);
    }

    println!(
        "Cumulative regret per device after {} rounds (seed {}); in brackets: ratio to uniform-random.\n",
        settings.rounds, settings.seed
    );
    print!("{}", report::regret_table(&reports));

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output directory {}", args.out.display()))?;
    let summary = serde_json::json!({
        "config": config,
        "reports": reports.iter().map(|r| r.downsampled(200)).collect::<Vec<_>>(),
    });
    write(
        &args.out.join("summary.json"),
        &serde_json::to_string_pretty(&summary)?,
    )?;
    write(
        &args.out.join("summary.csv"),
        &report::summary_csv(&reports),
    )?;
    for r in &reports {
        write(
            &args
                .out
                .join(format!("regret-{}.svg", file_stem(&r.environment))),
            &svg::regret_svg(r),
        )?;
    }
    println!(
        "\nWrote summary.json, summary.csv and {} SVG plot(s) to {} ({:.2} s).",
        reports.len(),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn apply_flags(config: &mut ArenaConfig, args: &Args) -> Result<()> {
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    if let Some(rounds) = args.rounds {
        config.rounds = rounds;
    }
    if let Some(devices) = args.devices {
        config.devices = devices;
    }
    if let Some(scope) = &args.scope {
        config.scope = match scope.as_str() {
            "shared" => PolicyScope::Shared,
            _ => PolicyScope::PerDevice,
        };
    }
    if !args.envs.is_empty() {
        let mut chosen = Vec::new();
        for name in &args.envs {
            let found = config
                .environments
                .iter()
                .find(|e| e.name() == name)
                .cloned()
                .or_else(|| SyntheticConfig::preset(name).map(EnvironmentConfig::Synthetic));
            match found {
                Some(e) => chosen.push(e),
                None => bail!(
                    "unknown environment {name:?}: not in the config and not a preset ({})",
                    SyntheticConfig::PRESETS.join(", ")
                ),
            }
        }
        config.environments = chosen;
    }
    if !args.policies.is_empty() {
        for name in &args.policies {
            if !config.policies.iter().any(|p| &p.name == name) {
                let known: Vec<&str> = config.policies.iter().map(|p| p.name.as_str()).collect();
                bail!("unknown policy {name:?}; known: {}", known.join(", "));
            }
        }
        config.policies.retain(|p| args.policies.contains(&p.name));
    }
    for path in &args.traces {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "trace".into());
        let absolute = std::path::absolute(path)
            .with_context(|| format!("resolving trace path {}", path.display()))?;
        config
            .environments
            .push(EnvironmentConfig::Trace(TraceConfig {
                name: format!("trace-{stem}"),
                path: absolute.to_string_lossy().into_owned(),
                round_window: args.trace_window,
                pool_devices: false,
            }));
    }
    Ok(())
}

fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
