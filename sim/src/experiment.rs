//! Setting up and running experiments: load the fleet's profiles, the model and the devices'
//! data once ([`Resources`]), then run one strategy ([`run`]) or several on the same fleet and
//! seed ([`compare`]), or on several seeds ([`compare_seeds`]: the model is loaded once and the
//! data re-partitioned per seed).
//!
//! A compared entry is a strategy name, optionally with a policy after `@`
//! (`fedspine@uniform-random`, `fedspine@fixed`): the strategy with `coordinator.policy`
//! replaced, so S-UCB can be set against random and fixed arms on the same seeds.

use std::path::Path;
use std::sync::Arc;

use aggregator::coordinator::CoordinatorState;
use burn::tensor::Device;
use device_agent::job::LocalData;
use device_agent::model::{Llama, ModelConfig};
use device_agent::tokenizer::Tok;
use device_agent::{assets, weights};

use crate::compute::{LocalTrainer, RealTrainer};
use crate::config::{ExperimentConfig, Mode, ModelChoice};
use crate::driver::{Observer, Simulation};
use crate::error::SimError;
use crate::hardware::DeviceProfile;
use crate::local_data::{self, WorkloadKind};
use crate::report::Report;
use crate::surrogate::{SurrogateParams, SurrogateTrainer};
use crate::timing::Clock;

/// What every run of an experiment shares: device profiles, and in real mode the one frozen
/// base model and every device's data. Cloning shares the base model's tensors.
#[derive(Clone)]
pub struct Resources {
    pub profiles: Vec<DeviceProfile>,
    pub labels: Vec<String>,
    pub base: Option<Llama>,
    pub data: Vec<LocalData>,
    /// A global held-out set evaluations use instead of devices' own held-out data.
    pub global_test: Option<LocalData>,
    pub surrogate: Option<SurrogateParams>,
    /// The virtual clock's compute model (`[clock]`; the shipped calibration by default).
    pub clock: Arc<Clock>,
    /// The tokenizer of a loaded checkpoint (to partition the data again for another seed).
    pub tok: Option<Tok>,
    /// The seed the data was partitioned with.
    pub seed: u64,
    /// A wall clock for real-mode device-round records (set by the binary).
    pub wall_clock: Option<crate::compute::WallClock>,
    /// Where real-mode wall time goes (filled when `wall_clock` is set).
    pub wall_ledger: Option<std::sync::Arc<crate::wall_profile::WallLedger>>,
    /// Real-mode evaluations run side by side (set by the binary; one at a time by default).
    pub eval_workers: crate::side_by_side::Workers,
}

/// The random tiny model of a config.
pub fn tiny_model(t: &crate::config::TinyModel) -> Llama {
    let mut c = ModelConfig::dense(
        t.vocab, t.d_model, t.layers, t.heads, t.kv_heads, t.head_dim, t.ffn, true,
    );
    c.max_seq_len = 512;
    Llama::random(c, t.seed, &Device::flex())
}

impl Resources {
    /// Load what `cfg` needs; `base_dir` resolves relative profile paths.
    pub fn load(cfg: &ExperimentConfig, base_dir: Option<&Path>) -> Result<Self, SimError> {
        let profiles = cfg.fleet.spec()?.expand(base_dir)?;
        let n = profiles.len();
        let clock = Clock::load(&cfg.clock)?;
        if cfg.mode == Mode::Surrogate {
            let params = SurrogateParams::load(&cfg.surrogate, cfg.workload.kind)?;
            let labels = (0..n)
                .map(|i| format!("surrogate device {}", i + 1))
                .collect();
            return Ok(Resources {
                profiles,
                labels,
                base: None,
                data: Vec::new(),
                global_test: None,
                surrogate: Some(params),
                clock,
                tok: None,
                seed: cfg.seed,
                wall_clock: None,
                wall_ledger: None,
                eval_workers: Default::default(),
            });
        }
        let (mut base, shards, tok) = match &cfg.model {
            ModelChoice::Tiny(t) => {
                if cfg.workload.kind != WorkloadKind::Synthetic {
                    return Err(SimError::Config(
                        "the tiny model needs workload.kind = \"synthetic\"".into(),
                    ));
                }
                let m = tiny_model(t);
                let shards = local_data::build_synthetic(&cfg.workload, n, t.vocab, cfg.seed);
                (m, shards, None)
            }
            choice => {
                let path = match choice {
                    ModelChoice::Path { path } => path.clone(),
                    _ => assets::default_model().map_err(|e| SimError::Model(e.to_string()))?,
                };
                let (m, tok) = weights::load(&path, &Device::flex())
                    .map_err(|e| SimError::Model(format!("{}: {e}", path.display())))?;
                let shards = local_data::build(&cfg.workload, n, &tok, cfg.seed)?;
                (m, shards, Some(tok))
            }
        };
        base.apply_precision(&cfg.precision)
            .map_err(|e| SimError::Config(format!("precision: {e}")))?;
        let global_test = shards.global_test;
        let (data, labels) = shards
            .devices
            .into_iter()
            .map(|d| (d.data, d.label))
            .unzip();
        Ok(Resources {
            profiles,
            labels,
            base: Some(base),
            data,
            global_test,
            surrogate: None,
            clock,
            tok,
            seed: cfg.seed,
            wall_clock: None,
            wall_ledger: None,
            eval_workers: Default::default(),
        })
    }

    /// The same fleet and model with the data partitioned for `seed` (a cheap copy when it is
    /// the seed already loaded; the base model's tensors are shared).
    pub fn for_seed(&self, cfg: &ExperimentConfig, seed: u64) -> Result<Resources, SimError> {
        let n = self.profiles.len();
        let (data, labels, global_test) = if seed == self.seed || self.base.is_none() {
            (
                self.data.clone(),
                self.labels.clone(),
                self.global_test.clone(),
            )
        } else {
            let shards = match (&cfg.model, &self.tok) {
                (ModelChoice::Tiny(t), _) => {
                    local_data::build_synthetic(&cfg.workload, n, t.vocab, seed)
                }
                (_, Some(tok)) => local_data::build(&cfg.workload, n, tok, seed)?,
                (_, None) => {
                    return Err(SimError::Config(
                        "no tokenizer loaded to partition the data for another seed".into(),
                    ))
                }
            };
            let (data, labels) = shards
                .devices
                .into_iter()
                .map(|d| (d.data, d.label))
                .unzip();
            (data, labels, shards.global_test)
        };
        Ok(Resources {
            profiles: self.profiles.clone(),
            labels,
            base: self.base.clone(),
            data,
            global_test,
            surrogate: self.surrogate.clone(),
            clock: self.clock.clone(),
            tok: self.tok.clone(),
            seed,
            wall_clock: self.wall_clock,
            wall_ledger: self.wall_ledger.clone(),
            eval_workers: self.eval_workers,
        })
    }

    /// A trainer for one run (the base model's tensors are shared, not copied).
    pub fn trainer(&self, cfg: &ExperimentConfig) -> Result<Box<dyn LocalTrainer>, SimError> {
        match (&self.base, &self.surrogate) {
            (Some(base), _) => {
                let mut t = RealTrainer::new(
                    base.clone(),
                    self.data.clone(),
                    self.global_test.clone(),
                    self.clock.clone(),
                );
                t.wall_clock = self.wall_clock;
                t.wall_ledger = self.wall_ledger.clone();
                t.eval_workers = self.eval_workers;
                Ok(Box::new(t))
            }
            (None, Some(p)) => {
                let seq = cfg.workload.seq_len;
                let eval_tokens = cfg.workload.eval_items.max(1) * seq;
                Ok(Box::new(SurrogateTrainer::new(
                    p.clone(),
                    self.profiles.len(),
                    seq,
                    eval_tokens,
                    cfg.coordinator.batch_size as usize,
                    cfg.seed,
                    self.clock.clone(),
                )))
            }
            (None, None) => Err(SimError::Config("no model and no surrogate loaded".into())),
        }
    }
}

/// Run `cfg`'s strategy on `resources`.
pub fn run(
    cfg: &ExperimentConfig,
    resources: &Resources,
    observer: &mut dyn Observer,
) -> Result<Report, SimError> {
    run_with_state(cfg, resources, observer).map(|(r, _)| r)
}

/// [`run`], also returning the coordinator's final state.
pub fn run_with_state(
    cfg: &ExperimentConfig,
    resources: &Resources,
    observer: &mut dyn Observer,
) -> Result<(Report, CoordinatorState), SimError> {
    let mut trainer = resources.trainer(cfg)?;
    let sim = Simulation::new(
        cfg.clone(),
        resources.profiles.clone(),
        resources.labels.clone(),
        trainer.as_mut(),
        observer,
    )?;
    sim.run_with_state()
}

/// Run `cfg` as compared entry `entry` (a strategy, optionally `@policy`); the report's
/// strategy column names the entry.
pub fn run_entry(
    cfg: &ExperimentConfig,
    entry: &str,
    resources: &Resources,
    observer: &mut dyn Observer,
) -> Result<Report, SimError> {
    let c = cfg.with_entry(entry)?;
    let mut r = run(&c, resources, observer)?;
    r.summary.strategy = entry.to_string();
    Ok(r)
}

/// Run each of `entries` on the same fleet, data and seed.
pub fn compare(
    cfg: &ExperimentConfig,
    entries: &[String],
    resources: &Resources,
    observer: &mut dyn Observer,
) -> Result<Vec<Report>, SimError> {
    let mut out = Vec::with_capacity(entries.len());
    for s in entries {
        observer.note(&format!("strategy {s}"));
        out.push(run_entry(cfg, s, resources, observer)?);
    }
    Ok(out)
}

/// The runs of one seed of a comparison, in the order of the entries.
pub struct SeedRuns {
    pub seed: u64,
    pub reports: Vec<Report>,
}

/// The seeds of a comparison over `n` seeds from `cfg.seed`: `seed, seed + 1, ...`.
pub fn seeds(cfg: &ExperimentConfig, n: usize) -> Vec<u64> {
    (0..n as u64).map(|k| cfg.seed.wrapping_add(k)).collect()
}

/// Run every entry on every seed (the data partitioned per seed; every entry of a seed sees
/// the same partition, availability and selection streams). `done` is called after each run
/// (the binary writes its files there).
pub fn compare_seeds(
    cfg: &ExperimentConfig,
    entries: &[String],
    seeds: &[u64],
    resources: &Resources,
    observer: &mut dyn Observer,
    done: &mut dyn FnMut(u64, &Report) -> Result<(), SimError>,
) -> Result<Vec<SeedRuns>, SimError> {
    compare_seeds_resuming(
        cfg,
        entries,
        seeds,
        resources,
        observer,
        done,
        &mut |_, _| Ok(None),
    )
}

/// A run of `(seed, entry)` made before, if there is one: [`compare_seeds_resuming`]'s `earlier`.
pub type EarlierRun<'a> = dyn FnMut(u64, &str) -> Result<Option<Report>, SimError> + 'a;

/// [`compare_seeds`], taking the run that `earlier(seed, entry)` returns (a run folder read
/// back, `sim compare --resume`) in place of running that seed and entry; `done` is not
/// called for it. A seed whose every entry was run before is not even partitioned. A run from
/// another experiment is refused, naming the first setting that differs: its configuration
/// must equal the one this comparison would run it with (so resuming after a change to the
/// config, the entry or the seed cannot mix two experiments in one table). The configuration
/// names the model, data and parameter files, not their contents.
pub fn compare_seeds_resuming(
    cfg: &ExperimentConfig,
    entries: &[String],
    seeds: &[u64],
    resources: &Resources,
    observer: &mut dyn Observer,
    done: &mut dyn FnMut(u64, &Report) -> Result<(), SimError>,
    earlier: &mut EarlierRun<'_>,
) -> Result<Vec<SeedRuns>, SimError> {
    // Every run on disk is checked before anything runs: a refusal comes at once, not after
    // hours of the seeds before it.
    let mut found = Vec::with_capacity(seeds.len());
    for &seed in seeds {
        let mut c = cfg.clone();
        c.seed = seed;
        let mut of_seed = Vec::with_capacity(entries.len());
        for e in entries {
            let r = earlier(seed, e)?;
            if let Some(r) = &r {
                check_same_run(&c, e, r)?;
            }
            of_seed.push(r);
        }
        found.push(of_seed);
    }
    let mut out = Vec::with_capacity(seeds.len());
    for (&seed, of_seed) in seeds.iter().zip(found) {
        let mut c = cfg.clone();
        c.seed = seed;
        let mut res = None;
        let mut reports = Vec::with_capacity(entries.len());
        for (e, before) in entries.iter().zip(of_seed) {
            if let Some(r) = before {
                observer.note(&format!("seed {seed}, strategy {e}: run before, read back"));
                reports.push(r);
                continue;
            }
            if res.is_none() {
                res = Some(resources.for_seed(&c, seed)?);
            }
            if let Some(res) = &res {
                observer.note(&format!("seed {seed}, strategy {e}"));
                let r = run_entry(&c, e, res, observer)?;
                done(seed, &r)?;
                reports.push(r);
            }
        }
        out.push(SeedRuns { seed, reports });
    }
    Ok(out)
}

/// That `r` is entry `entry` of `c` (the seed set): its strategy column and its whole
/// configuration as run.
fn check_same_run(c: &ExperimentConfig, entry: &str, r: &Report) -> Result<(), SimError> {
    let refuse = |what: String| {
        SimError::Config(format!(
            "seed {}, entry '{entry}': the run on disk is not this comparison's: {what} (resume \
             with the configuration it was run with, or write to another folder)",
            c.seed
        ))
    };
    if r.summary.strategy != entry {
        return Err(refuse(format!("its entry is '{}'", r.summary.strategy)));
    }
    let mut want = serde_json::to_value(c.with_entry(entry)?)
        .map_err(|e| SimError::Config(format!("entry '{entry}': {e}")))?;
    // Where the files are written is not part of the experiment (a folder moved, or named
    // `runs/x/` where it was `runs/x`, still resumes).
    let mut got = r.config.clone();
    for v in [&mut want, &mut got] {
        if let Some(o) = v.as_object_mut() {
            o.remove("output_dir");
        }
    }
    match first_difference(&want, &got, "") {
        None => Ok(()),
        Some((key, want, got)) => Err(refuse(format!("{key} is {got} there and {want} here"))),
    }
}

/// The first place two JSON values differ: (dotted key, here, there).
fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
    at: &str,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    let key = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                match y.get(k) {
                    Some(vb) => {
                        if let Some(d) = first_difference(va, vb, &key(k)) {
                            return Some(d);
                        }
                    }
                    None => return Some((key(k), va.to_string(), "absent".into())),
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| (key(k), "absent".into(), y[k].to_string()))
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(va, vb, &format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some((
            if at.is_empty() {
                "the configuration".into()
            } else {
                at.to_string()
            },
            a.to_string(),
            b.to_string(),
        )),
    }
}
