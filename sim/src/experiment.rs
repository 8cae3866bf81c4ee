//! Setting up and running experiments: load the fleet's profiles, the model and the devices'
//! data once ([`Resources`]), then run one strategy ([`run`]) or several on the same fleet and
//! seed ([`compare`]).

use std::path::Path;

use aggregator::coordinator::CoordinatorState;
use burn::tensor::Device;
use device_agent::job::LocalData;
use device_agent::model::{Llama, ModelConfig};
use device_agent::{assets, weights};

use crate::compute::{LocalTrainer, RealTrainer};
use crate::config::{ExperimentConfig, Mode, ModelChoice};
use crate::driver::{Observer, Simulation};
use crate::error::SimError;
use crate::hardware::DeviceProfile;
use crate::local_data::{self, WorkloadKind};
use crate::report::Report;
use crate::surrogate::{SurrogateParams, SurrogateTrainer};

/// What every run of an experiment shares: device profiles, and in real mode the one frozen
/// base model and every device's data.
pub struct Resources {
    pub profiles: Vec<DeviceProfile>,
    pub labels: Vec<String>,
    pub base: Option<Llama>,
    pub data: Vec<LocalData>,
    /// A global held-out set evaluations use instead of devices' own held-out data.
    pub global_test: Option<LocalData>,
    pub surrogate: Option<SurrogateParams>,
    /// A wall clock for real-mode device-round records (set by the binary).
    pub wall_clock: Option<crate::compute::WallClock>,
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
        if cfg.mode == Mode::Surrogate {
            let params = SurrogateParams::load(&cfg.surrogate)?;
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
                wall_clock: None,
            });
        }
        let (base, shards) = match &cfg.model {
            ModelChoice::Tiny(t) => {
                if cfg.workload.kind != WorkloadKind::Synthetic {
                    return Err(SimError::Config(
                        "the tiny model needs workload.kind = \"synthetic\"".into(),
                    ));
                }
                let m = tiny_model(t);
                let shards = local_data::build_synthetic(&cfg.workload, n, t.vocab, cfg.seed);
                (
                    m,
                    local_data::Workload {
                        devices: shards,
                        global_test: None,
                    },
                )
            }
            choice => {
                let path = match choice {
                    ModelChoice::Path { path } => path.clone(),
                    _ => assets::default_model().map_err(|e| SimError::Model(e.to_string()))?,
                };
                let (m, tok) = weights::load(&path, &Device::flex())
                    .map_err(|e| SimError::Model(format!("{}: {e}", path.display())))?;
                let shards = local_data::build(&cfg.workload, n, &tok, cfg.seed)?;
                (m, shards)
            }
        };
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
            wall_clock: None,
        })
    }

    /// A trainer for one run (the base model's tensors are shared, not copied).
    pub fn trainer(&self, cfg: &ExperimentConfig) -> Result<Box<dyn LocalTrainer>, SimError> {
        match (&self.base, &self.surrogate) {
            (Some(base), _) => {
                let mut t =
                    RealTrainer::new(base.clone(), self.data.clone(), self.global_test.clone());
                t.wall_clock = self.wall_clock;
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

/// Run each of `strategies` on the same fleet, data and seed.
pub fn compare(
    cfg: &ExperimentConfig,
    strategies: &[String],
    resources: &Resources,
    observer: &mut dyn Observer,
) -> Result<Vec<Report>, SimError> {
    let mut out = Vec::with_capacity(strategies.len());
    for s in strategies {
        let c = cfg.with_strategy(s)?;
        observer.note(&format!("strategy {s}"));
        out.push(run(&c, resources, observer)?);
    }
    Ok(out)
}
