//! The `sim` binary: run an experiment, compare strategies on the same fleet and seed, fit the
//! surrogate from real runs, list profiles and presets. Without arguments it runs the `default`
//! preset. Wall-clock throughput and peak memory are measured here (never in the reports, which
//! depend on the seed only) and printed at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use sim::config::{ExperimentConfig, Mode, PRESETS, STRATEGIES};
use sim::hardware::{DeviceProfile, BUILTIN_PROFILES};
use sim::host::HostInfo;
use sim::progress::{Progress, SeedProgress};
use sim::report::{self, Report};
use sim::{comparison, experiment, surrogate, Observer, Resources};

/// The simulator allocates and frees many message-sized buffers per device-round (decoded
/// adapters, global slices, per-round bookkeeping). With glibc's allocator a third of the
/// 10,000-device preset's time went to `malloc`/`free`; mimalloc serves them from per-size pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` and `mi_option_allow_thp` in mimalloc's `mi_option_t` (v3's
/// `mimalloc.h`, the version `libmimalloc-sys` builds by default); the Rust bindings name no
/// constants for them.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Keep freed memory with the process instead of handing it back to the OS a second later
/// (mimalloc v3's default), in both modes; in surrogate mode also map it in 4 KiB pages rather
/// than transparent huge pages. On this project's VM hosts first touch of memory is slow (the
/// kernel clears each page under a fault), so every purge cost a fault and zeroing on the next
/// allocation: 20-25% of the 10,000-device preset's wall time (`perf record`), and in real mode
/// 6% of the samples in `clear_page_erms`, a fifth to a third of the run in system time; kept,
/// the default preset's real mode ran 1.09-1.20x faster on Zen 5 for 1.6% more peak resident
/// memory (BENCHMARKS.md, "Simulator throughput and memory"). Huge pages stay on in real mode,
/// whose large tensors fill them; in surrogate mode every huge page cleared 2 MiB of which the
/// simulator's small allocations used a part (on the 10,000-device preset: peak RSS 110
/// against 95 MiB with 4 KiB pages, system time 0.09-0.45 s against 0.02-0.09 s per run).
fn keep_freed_memory(mode: Mode) {
    #[allow(unsafe_code)]
    // SAFETY: `mi_option_set` only stores an option value that mimalloc reads when it next
    // purges or maps memory; it takes no pointers and is valid at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
    if mode != Mode::Surrogate {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: as above.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
    }
    // mimalloc reserved its first arena (advised for huge pages) before `main`, so the option
    // above reaches only later mappings; the process flag stops huge pages at fault time for
    // every mapping, as mimalloc itself does when the option is set from the environment.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[derive(Parser)]
#[command(
    name = "sim",
    about = "FedSpine simulator: many virtual devices on a virtual clock, real training."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one strategy (default: the `default` preset with its strategy).
    Run(RunArgs),
    /// Run several strategies on the same fleet, data and seeds, and write a comparison.
    Compare {
        /// Comma-separated strategies: fedspine, hetlora, fedlora, fixed-prune, ratio-bandit;
        /// `NAME@POLICY` replaces the policy (e.g. `fedspine@uniform-random`,
        /// `fedspine@fixed`), with parameters after `:` (e.g.
        /// `fedspine@s-ucb:nu=0.1:exploration=0.3`, `fedspine@fixed:prune_ratio=0.6:rank=4`).
        /// Modifiers after `+`: `agg=METHOD` (aggregation method),
        /// `clip=NORM` (norm clipping), `screen=K` (norm screening), `scope=class` (bandits learn from their class's
        /// rewards too), `clean` (no `[byzantine]` devices), `k=N` (the longest interval between
        /// pruning events), `events=N` (the schedule's floor on events per round), `crit=NAME`
        /// (importance criterion), `per-block` (per-block ratios), e.g.
        /// `hetlora+agg=median,hetlora+agg=median+clean`, `fixed-prune+k=5+crit=taylor`. The first is the reference of the
        /// paired differences; a poisoned entry and its `+clean` twin get a Byzantine table.
        #[arg(long, default_value = "fedspine,hetlora,fixed-prune")]
        strategies: String,
        /// Run every strategy on this many seeds (the config's seed, +1, ...): per-seed folders
        /// `seed-S/STRATEGY/`, and `compare.json`/`compare.md` with bootstrap intervals and
        /// paired differences, even for `--seeds 1` (a part `sim pool` can take). Without the
        /// flag, one run per strategy in one folder each, as `sim run` writes them.
        #[arg(long)]
        seeds: Option<usize>,
        /// Also re-run every strategy on the same seeds with every profile's compute derated
        /// x0.5 and x2 and its bandwidth x0.5 and x2, and write the headline ratios under each
        /// (`sensitivity.md`, `sensitivity.json`); five times the work.
        #[arg(long)]
        sensitivity: bool,
        /// With `--seeds`: take every run already finished under `--out` (its `summary.json`
        /// reads back) as it is and run only the rest, so an interrupted comparison goes on
        /// where it stopped. A run folder from another configuration, or a folder whose
        /// `host.json` names another CPU class, is refused; a run that does not read back whole
        /// is run again. `--sensitivity`'s re-runs are not kept, so never resumed.
        #[arg(long, requires = "seeds")]
        resume: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Validate the surrogate on a whole run: a one-seed `compare` folder of a real-mode run and
    /// the same experiment through the surrogate (`--mode surrogate`); prints and writes
    /// `validation.md` beside the surrogate folder's runs (strategy order, curve errors).
    ValidateSurrogate {
        /// The real-mode comparison folder (one folder per strategy).
        #[arg(long)]
        real: PathBuf,
        /// The surrogate comparison folder of the same experiment.
        #[arg(long)]
        surrogate: PathBuf,
    },
    /// Fit the surrogate's loss and accuracy response from recorded device-rounds
    /// (device_rounds.jsonl files or run folders holding one); writes the parameters with their
    /// provenance and held-out validation error.
    FitSurrogate {
        /// device_rounds.jsonl files or run folders containing them.
        #[arg(required = true)]
        data: Vec<PathBuf>,
        /// Where to write the parameters (TOML).
        #[arg(long, default_value = "surrogate-params.toml")]
        out: PathBuf,
        /// Seed of the train / held-out split.
        #[arg(long, default_value_t = 1)]
        split_seed: u64,
        /// Share of the device-rounds held out for validation.
        #[arg(long, default_value_t = 0.25)]
        holdout: f64,
    },
    /// Train a designed grid of arms (prune ratio x rank) in real mode, one fixed arm per run,
    /// and append every device-round to a dataset for `sim fit-surrogate`.
    Record {
        /// Comma-separated prune ratios.
        #[arg(long, default_value = "0,0.25,0.5")]
        ratios: String,
        /// Comma-separated ranks.
        #[arg(long, default_value = "4,16")]
        ranks: String,
        /// The dataset to append to.
        #[arg(long, default_value = "runs/record/device_rounds.jsonl")]
        data: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Time the agent's training step and forward pass over a grid of pruned shapes, ranks and
    /// batch geometries on the real model, fit the per-operator time model and print measured
    /// against leave-one-out predictions (this model and the FLOPs-linear one).
    Calibrate {
        /// Where to write the measurements (JSON; default `calibration.json`). With `--from`,
        /// where to write the merged file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Refit and print existing measurement files instead of measuring; several (repeat
        /// the flag) are merged point by point (`--merge`).
        #[arg(long)]
        from: Vec<PathBuf>,
        /// How `--from` files merge: `fastest` (each point at its fastest over the files) or
        /// `median` (each file scaled to the fastest file's overall speed, then each point at
        /// the median of its scaled times: a host whose speed drifts between runs).
        #[arg(long, default_value = "fastest")]
        merge: String,
        /// Timed calls per point and visit (the fastest over all visits is kept; each visit
        /// makes one warm-up call first).
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Passes over the whole grid, forward and backward in turn, so that a point's calls
        /// are spread over the run rather than made in one burst.
        #[arg(long, default_value_t = 3)]
        visits: usize,
        /// A third of the grid, for a smoke run.
        #[arg(long)]
        quick: bool,
    },
    /// Pool `sim compare --seeds N` folders of disjoint seeds (one experiment, one CPU class)
    /// into one comparison of all their seeds: per-seed values as each run reported them,
    /// intervals drawn again over the pooled seeds (the bandit rows are not pooled).
    Pool {
        /// The comparison folders (each with `compare.json` and `host.json`).
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// Where to write the pooled `compare.json`, `compare.md` and `host.json`.
        #[arg(long)]
        out: PathBuf,
        /// Pool parts computed on different CPU classes. Each part is still one class, so every
        /// seed's entries ran on one class and stay paired; the seeds are then draws over seed
        /// and class together. The report names each part's class, and `hosts.json` (every
        /// part's `host.json`) replaces `host.json`.
        #[arg(long)]
        across_classes: bool,
    },
    /// List the built-in device profiles.
    Profiles,
    /// List the built-in presets.
    Presets,
}

#[derive(Args, Clone, Default)]
struct RunArgs {
    /// Experiment file (TOML); see `sim presets` for the built-in ones.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Built-in preset: default, sotu, full, surrogate, paper-surrogate, tiny, bandit.
    #[arg(long)]
    preset: Option<String>,
    /// Override the strategy.
    #[arg(long)]
    strategy: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Override the number of rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Scale the fleet to this many devices (same class proportions).
    #[arg(long)]
    devices: Option<usize>,
    /// Override the devices per round.
    #[arg(long)]
    devices_per_round: Option<usize>,
    /// Output folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override the mode: `real` (training) or `surrogate` (the fitted loss-response model),
    /// e.g. to run a real-mode experiment file through the surrogate for validation.
    #[arg(long, value_parser = parse_mode)]
    mode: Option<Mode>,
    /// Surrogate mode: accept a parameter file without provenance (not fitted).
    #[arg(long)]
    force_unfitted: bool,
    /// Real mode (fp32): evaluations run side by side, each on its share of the cores
    /// (default: one per core, at most 2, each holding a device's model: about 1.5 GB more
    /// peak memory than one, so one where the machine has under 7.5 GiB); 1 runs them one
    /// after another. The reports are the same either way.
    #[arg(long)]
    eval_workers: Option<usize>,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "real" => Ok(Mode::Real),
        "surrogate" => Ok(Mode::Surrogate),
        other => Err(format!("unknown mode '{other}' (real or surrogate)")),
    }
}

impl RunArgs {
    fn eval_workers(&self) -> sim::side_by_side::Workers {
        let host = sim::side_by_side::Workers::for_this_host();
        match self.eval_workers {
            Some(n) => sim::side_by_side::Workers {
                workers: n.max(1),
                ..host
            },
            None => host,
        }
    }

    fn load(&self) -> Result<(ExperimentConfig, Option<PathBuf>)> {
        let (mut cfg, base) = match (&self.config, &self.preset) {
            (Some(p), _) => (
                ExperimentConfig::load(p)?,
                p.parent().map(Path::to_path_buf),
            ),
            (None, Some(name)) => (ExperimentConfig::preset(name)?, None),
            (None, None) => (ExperimentConfig::preset("default")?, None),
        };
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        if let Some(r) = self.rounds {
            cfg.coordinator.rounds = r;
        }
        if let Some(n) = self.devices {
            cfg.fleet.devices = n;
        }
        if let Some(k) = self.devices_per_round {
            cfg.coordinator.devices_per_round = k;
            if cfg.coordinator.min_devices.is_some_and(|m| m < k) {
                cfg.coordinator.min_devices = Some(k);
            }
        }
        if let Some(o) = &self.out {
            cfg.output_dir = o.clone();
        }
        if let Some(m) = self.mode {
            cfg.mode = m;
        }
        cfg.surrogate.force_unfitted |= self.force_unfitted;
        keep_freed_memory(cfg.mode);
        let strategy = self
            .strategy
            .clone()
            .unwrap_or_else(|| cfg.strategy.clone());
        let cfg = cfg.with_strategy(&strategy)?;
        Ok((cfg, base))
    }
}

/// Real mode: where the run's wall time went (compute against everything else).
fn print_wall_profile(resources: &Resources, mode: &str, run_s: f64) {
    if let (Some(ledger), "real") = (&resources.wall_ledger, mode) {
        eprintln!(
            "where the {run_s:.1} s of simulating went (wall time):\n{}",
            ledger.table(run_s * 1000.0)
        );
    }
}

fn run(args: RunArgs) -> Result<()> {
    let (cfg, base) = args.load()?;
    let t0 = Instant::now();
    let mut resources =
        Resources::load(&cfg, base.as_deref()).context("loading the fleet, model and data")?;
    resources.wall_clock = Some(wall_ms);
    resources.eval_workers = args.eval_workers();
    resources.wall_ledger = Some(Default::default());
    let load_s = t0.elapsed().as_secs_f64();
    let mut progress = Progress::new(&cfg.strategy, cfg.coordinator.rounds);
    let t1 = Instant::now();
    let report = experiment::run(&cfg, &resources, &mut progress)?;
    progress.finish();
    let run_s = t1.elapsed().as_secs_f64();
    let dir = cfg.run_dir();
    report.write_to(&dir)?;
    println!("{}", report::markdown_table(std::slice::from_ref(&report)));
    println!("reports in {}", dir.display());
    print_wall_profile(&resources, &report.summary.mode, run_s);
    sim::progress::print_throughput(std::slice::from_ref(&report), load_s, run_s);
    Ok(())
}

fn compare(
    strategies: &str,
    seeds_flag: Option<usize>,
    sensitivity: bool,
    resume: bool,
    args: RunArgs,
) -> Result<()> {
    let n_seeds = seeds_flag.unwrap_or(1);
    let (cfg, base) = args.load()?;
    let names: Vec<String> = strategies
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        bail!(
            "--strategies is empty (choose from {})",
            STRATEGIES.join(", ")
        );
    }
    if n_seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    if sensitivity && n_seeds < 2 {
        bail!("--sensitivity compares paired seeds: give --seeds 2 or more (5 for intervals)");
    }
    for n in &names {
        cfg.with_entry(n)
            .with_context(|| format!("--strategies entry '{n}'"))?;
    }
    let host = HostInfo::detect();
    eprintln!("CPU: {}", host.line());
    let t0 = Instant::now();
    let mut resources =
        Resources::load(&cfg, base.as_deref()).context("loading the fleet, model and data")?;
    resources.wall_clock = Some(wall_ms);
    resources.eval_workers = args.eval_workers();
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut progress = Progress::new("", cfg.coordinator.rounds);
    if seeds_flag.is_none() {
        let mut reports = Vec::new();
        for name in &names {
            let c = cfg.with_entry(name)?;
            progress.restart(name, c.coordinator.rounds);
            let r = experiment::run_entry(&cfg, name, &resources, &mut progress)?;
            r.write_to(&cfg.output_dir.join(name))?;
            reports.push(r);
        }
        progress.finish();
        let run_s = t1.elapsed().as_secs_f64();
        report::write_comparison(&reports, &cfg.output_dir)?;
        host.write_into(&cfg.output_dir)?;
        println!("{}", report::markdown_table(&reports));
        println!(
            "reports in {} (compare.md, metric.svg, host.json, one folder per strategy)",
            cfg.output_dir.display()
        );
        sim::progress::print_throughput(&reports, load_s, run_s);
        return Ok(());
    }
    let seeds = experiment::seeds(&cfg, n_seeds);
    let out = cfg.output_dir.clone();
    let mut summaries = Vec::new();
    for s in &seeds {
        let run = |n: &String| out.join(format!("seed-{s}")).join(n);
        summaries.extend(names.iter().map(|n| run(n).join(report::SUMMARY_FILE)));
    }
    let foreign = resume && host.resume_foreign(&out, &summaries)?;
    if foreign {
        eprintln!(
            "{}: every run is on disk, from another CPU class; reading them back, running none",
            out.display()
        );
    }
    if !foreign {
        host.write_into(&out)?;
    }
    let rounds = cfg.coordinator.rounds;
    let mut write_run = |seed: u64, r: &Report| -> Result<(), sim::SimError> {
        r.write_to(&out.join(format!("seed-{seed}")).join(&r.summary.strategy))
    };
    let mut observer = SeedProgress {
        inner: &mut progress,
        rounds,
    };
    let mut read_back = std::collections::BTreeSet::new();
    let mut earlier = |seed: u64, entry: &str| -> Result<Option<Report>, sim::SimError> {
        let dir = out.join(format!("seed-{seed}")).join(entry);
        if !resume || !dir.join(sim::report::SUMMARY_FILE).exists() {
            return Ok(None);
        }
        match Report::read_from(&dir) {
            Ok(r) => {
                read_back.insert((seed, entry.to_string()));
                Ok(Some(r))
            }
            Err(e) if foreign => Err(sim::SimError::Data(format!(
                "{}: does not read back ({e}), and this host is another CPU class than the \
                 folder's: run it again on that class",
                dir.display()
            ))),
            Err(e) => {
                eprintln!(
                    "{}: does not read back ({e}); running it again",
                    dir.display()
                );
                Ok(None)
            }
        }
    };
    let runs = experiment::compare_seeds_resuming(
        &cfg,
        &names,
        &seeds,
        &resources,
        &mut observer,
        &mut write_run,
        &mut earlier,
    )?;
    progress.finish();
    let run_s = t1.elapsed().as_secs_f64();
    let items = runs.first().and_then(|r| r.reports.first()).map_or(0, |r| {
        let e = &r.summary.evaluation;
        if e.shared_items {
            e.items_per_evaluation
        } else {
            e.items_per_evaluation * e.trained_evaluated.max(1)
        }
    });
    let cmp = comparison::compare(&cfg.name, &names, &runs, items);
    write_file(&out.join("compare.json"), &cmp.to_json())?;
    write_file(&out.join("compare.md"), &cmp.to_markdown())?;
    for r in &runs {
        report::write_comparison(&r.reports, &out.join(format!("seed-{}", r.seed)))?;
    }
    println!("{}", cmp.to_markdown());
    if sensitivity {
        let mut variants = vec![(sim::sensitivity::VARIANTS[0], cmp.clone())];
        for v in &sim::sensitivity::VARIANTS[1..] {
            let res = resources.perturbed(*v);
            let mut observer = SeedProgress {
                inner: &mut progress,
                rounds,
            };
            observer.note(&format!("sensitivity: {}", v.label));
            let runs = experiment::compare_seeds(
                &cfg,
                &names,
                &seeds,
                &res,
                &mut observer,
                &mut |_, _| Ok(()),
            )?;
            progress.finish();
            variants.push((*v, comparison::compare(&cfg.name, &names, &runs, items)));
        }
        let table = sim::sensitivity::headline(&variants);
        write_file(&out.join("sensitivity.json"), &table.to_json())?;
        write_file(&out.join("sensitivity.md"), &table.to_markdown())?;
        println!("{}", table.to_markdown());
    }
    println!("CPU: {}", host.line());
    println!(
        "reports in {} (compare.json, compare.md, host.json, seed-S/STRATEGY/ per run)",
        out.display()
    );
    if !read_back.is_empty() {
        println!(
            "{} run(s) read back from an earlier sitting (not counted below)",
            read_back.len()
        );
    }
    let fresh: Vec<Report> = runs
        .into_iter()
        .flat_map(|sr| {
            let seed = sr.seed;
            sr.reports.into_iter().map(move |r| (seed, r))
        })
        .filter(|(seed, r)| !read_back.contains(&(*seed, r.summary.strategy.clone())))
        .map(|(_, r)| r)
        .collect();
    sim::progress::print_throughput(&fresh, load_s, run_s);
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn pool(dirs: &[PathBuf], out: &Path, across_classes: bool) -> Result<()> {
    use comparison::pool::{self, Classes};
    let classes = if across_classes {
        Classes::Mixed
    } else {
        Classes::One
    };
    let (cmp, host_name) = pool::pool_into(dirs, out, classes)?;
    println!("{}", cmp.to_markdown());
    println!(
        "reports in {} (compare.json, compare.md, {host_name})",
        out.display()
    );
    Ok(())
}

fn fit(data: Vec<PathBuf>, out: PathBuf, split_seed: u64, holdout: f64) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let opts = surrogate::FitOptions {
        split_seed,
        holdout,
        command,
        date: sim::time_model::grid::utc_now(),
    };
    let params = surrogate::fit_device_rounds(&data, &opts)?;
    let text = format!("# Surrogate loss-response parameters (see sim/src/surrogate.rs), fitted by `sim fit-surrogate`.\n{}", params.to_toml());
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", params.to_toml());
    println!("written to {}", out.display());
    Ok(())
}

fn calibrate(
    out: Option<PathBuf>,
    from: Vec<PathBuf>,
    merge: &str,
    reps: usize,
    visits: usize,
    quick: bool,
) -> Result<()> {
    use sim::time_model::{self, grid, Calibration, TimeModel};
    let cal = if !from.is_empty() {
        let mut runs = Vec::new();
        for p in &from {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let origin = p.display().to_string();
            let cal = Calibration::from_json(&text, &origin)?;
            runs.push((origin, cal));
        }
        let cal = match merge {
            "fastest" => Calibration::fastest_of(&runs)?,
            "median" => Calibration::scaled_median_of(&runs)?,
            other => bail!("--merge {other}: expected fastest or median"),
        };
        if let Some(out) = &out {
            std::fs::write(out, serde_json::to_string_pretty(&cal)? + "\n")
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("merged measurements written to {}", out.display());
        }
        cal
    } else {
        let out = out.unwrap_or_else(|| PathBuf::from("calibration.json"));
        let device = burn::tensor::Device::flex();
        let (base, tok) =
            device_agent::weights::load(&device_agent::assets::default_model()?, &device)?;
        let ids = tok.encode(&device_agent::data::moby_dick_chapter(3)?.text)?;
        let design = grid::design(quick);
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let build = if cfg!(debug_assertions) {
            "dev (dependencies at opt-level 3)"
        } else {
            "release"
        };
        let host = grid::measured_on(command, build);
        eprintln!("timing {} configurations on {} ...", design.len(), host.cpu);
        let visit = |v: usize| eprintln!("visit {v} of {visits} ...");
        let measurements = grid::measure(&base, &ids, &design, reps, visits, visit, |m| {
            eprintln!(
                "  {} {} s={:.2} r={} {}x{}: {:.0} ms",
                m.kind.name(),
                m.label,
                m.sparsity,
                m.workload.rank,
                m.workload.batch,
                m.workload.seq,
                m.ms
            );
        })?;
        let cal = Calibration { host, measurements };
        let text = serde_json::to_string_pretty(&cal)?;
        std::fs::write(&out, text + "\n").with_context(|| format!("writing {}", out.display()))?;
        eprintln!("measurements written to {}", out.display());
        Calibration::from_json(&serde_json::to_string(&cal)?, &out.display().to_string())?
    };
    let model = TimeModel::fit(&cal)?;
    println!("{}", time_model::markdown(&cal, &model));
    Ok(())
}

/// Milliseconds since the first call (the device-round records' compute clock).
fn wall_ms() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0
}

fn record(ratios: &str, ranks: &str, data: &Path, args: RunArgs) -> Result<()> {
    let grid = sim::record::Grid::parse(ratios, ranks)?;
    let (cfg, base) = args.load()?;
    let mut resources =
        Resources::load(&cfg, base.as_deref()).context("loading the fleet, model and data")?;
    resources.wall_clock = Some(wall_ms);
    resources.eval_workers = args.eval_workers();
    let cells = grid.cells().len() as u64;
    let mut progress = Progress::new("record", cfg.coordinator.rounds * cells);
    let t = Instant::now();
    let n = sim::record::record(&cfg, &resources, &grid, data, &mut progress)?;
    progress.finish();
    let s = t.elapsed().as_secs_f64();
    println!(
        "{n} device-rounds appended to {} ({cells} cells, {s:.0} s)",
        data.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => run(RunArgs::default()),
        Some(Cmd::Run(a)) => run(a),
        Some(Cmd::Compare {
            strategies,
            seeds,
            sensitivity,
            resume,
            run: a,
        }) => compare(&strategies, seeds, sensitivity, resume, a),
        Some(Cmd::FitSurrogate {
            data,
            out,
            split_seed,
            holdout,
        }) => fit(data, out, split_seed, holdout),
        Some(Cmd::ValidateSurrogate { real, surrogate }) => {
            let table = sim::validation::validate(&real, &surrogate)?;
            write_file(&surrogate.join("validation.md"), &table)?;
            println!("{table}");
            Ok(())
        }
        Some(Cmd::Record {
            ratios,
            ranks,
            data,
            run: a,
        }) => record(&ratios, &ranks, &data, a),
        Some(Cmd::Calibrate {
            out,
            from,
            merge,
            reps,
            visits,
            quick,
        }) => calibrate(out, from, &merge, reps, visits, quick),
        Some(Cmd::Pool {
            parts,
            out,
            across_classes,
        }) => pool(&parts, &out, across_classes),
        Some(Cmd::Profiles) => {
            println!("| profile | class | RAM GiB | train GFLOP/s | power modes | up/down Mbit/s | RTT ms | variability | dropout |");
            println!("|---|---|---|---|---|---|---|---|---|");
            for (name, text) in BUILTIN_PROFILES {
                let p = DeviceProfile::from_toml(text, name)?;
                println!(
                    "| {} | {} | {} | {} | {:?} | {}/{} | {} | {} | {} |",
                    p.name,
                    p.class,
                    p.ram_gib,
                    p.train_gflops,
                    p.power_modes,
                    p.uplink_mbps,
                    p.downlink_mbps,
                    p.rtt_ms,
                    p.variability,
                    p.dropout_prob
                );
            }
            println!("\nFleets: paper (30 TX2, 40 Xavier NX, 10 AGX Xavier), mixed (paper + 12+12 phones + 8+8 Raspberry Pis).");
            Ok(())
        }
        Some(Cmd::Presets) => {
            for (name, text) in PRESETS {
                let c = ExperimentConfig::from_toml(text, name)?;
                let first = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches('#')
                    .trim();
                let mode = if c.mode == Mode::Surrogate {
                    "surrogate"
                } else {
                    "real"
                };
                println!(
                    "{name:10} {mode:9} {} devices, {} rounds, {} per round: {first}",
                    c.fleet.spec()?.total(),
                    c.coordinator.rounds,
                    c.coordinator.devices_per_round
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two option indices are written by hand: a `libmimalloc-sys` that renumbers
    /// `mi_option_t` would silently set other options. Their v3 defaults identify them.
    #[test]
    fn the_mimalloc_option_indices_name_the_options_we_mean() {
        #[allow(unsafe_code)]
        // SAFETY: `mi_option_get` reads an option's value; it takes no pointers.
        let (purge_delay, allow_thp) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
                libmimalloc_sys::mi_option_get(MI_OPTION_ALLOW_THP),
            )
        };
        assert_eq!(purge_delay, 1000, "mi_option_purge_delay (ms)");
        assert_eq!(allow_thp, 1, "mi_option_allow_thp");
    }
}
