//! A device's local round on burn: its local data ([`LocalData`]), the starting adapter built
//! from the global slice or its own last adapter ([`start_adapter`]), and [`run_job`], the whole
//! round (held-out loss before, prune-and-tune, loss after). A deterministic function of the
//! job, the device's state, the model it holds and the data; drivers run it where the
//! session's `Train` command says, and time it themselves.

use protocol::UpdateStats;

use crate::lora::Adapter;
use crate::model::Llama;
use crate::prune::{self, HeldModel, KeptIndicesExt, PruneError};
use crate::session::{AgentConfig, DeviceState, JobOutcome, TrainJob};
use crate::tokenizer::Tok;
use crate::train::{TrainConfig, Tuner};
use crate::user_data::{self, MaskedShard, UserData, UserDataConfig, UserDataError};
use crate::wire;
use crate::workload::{ClsShard, LmShard, SpamTask};
use protocol::Proj;

/// Errors of a device round.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("round config is invalid: {0}")]
    BadConfig(String),
    #[error("global adapter slice does not fit this device: {0}")]
    BadSlice(String),
    #[error(transparent)]
    Prune(#[from] PruneError),
    #[error("stopped after {steps} of {planned} local steps: the round's deadline passed")]
    Cancelled { steps: usize, planned: usize },
}

/// A device's local data: a causal-LM shard, a causal-LM shard with a loss mask (the user's
/// own chat or instruction files), or a classification shard.
#[derive(Debug, Clone)]
pub enum LocalData {
    Lm(LmShard),
    Masked(MaskedShard),
    Cls {
        task: SpamTask,
        shard: ClsShard,
        pad: u32,
    },
}

impl LocalData {
    /// Training micro-batch `i` of `batch` items.
    pub fn batch(&self, i: usize, batch: usize) -> crate::train::Batch {
        match self {
            LocalData::Lm(s) => s.batch(i, batch),
            LocalData::Masked(s) => s.batch(i, batch),
            LocalData::Cls { task, shard, pad } => {
                let n = shard.train.len().max(1);
                let refs: Vec<_> = (0..batch)
                    .map(|k| &shard.train[(i * batch + k) % n])
                    .collect();
                task.batch(&refs, *pad).0
            }
        }
    }

    /// Held-out loss (nats) and task metric (next-token accuracy for LM, label accuracy for
    /// classification).
    pub fn evaluate(&self, model: &Llama, adapter: Option<&Adapter>) -> (f64, f64) {
        match self {
            LocalData::Lm(s) => {
                let m = s.evaluate(model, adapter);
                (m.nll, m.accuracy)
            }
            LocalData::Masked(s) => {
                let m = s.evaluate(model, adapter);
                (m.nll, m.accuracy)
            }
            LocalData::Cls { task, shard, pad } => {
                let m = task.evaluate(model, adapter, &shard.test, *pad, 8);
                (m.loss, m.accuracy)
            }
        }
    }

    /// The user's own files (`user_data`): masked causal-LM windows, or two-label
    /// classification through the LM.
    pub fn from_files(
        path: &std::path::Path,
        tok: &Tok,
        cfg: &UserDataConfig,
    ) -> Result<LocalData, UserDataError> {
        Ok(match user_data::load(path, tok, cfg)? {
            UserData::Lm(shard) => LocalData::Masked(shard),
            UserData::Cls { task, shard, .. } => LocalData::Cls {
                task,
                shard,
                pad: tok.eos,
            },
        })
    }

    /// Training items (windows or examples).
    pub fn train_len(&self) -> usize {
        match self {
            LocalData::Lm(s) => s.train.len(),
            LocalData::Masked(s) => s.train.len(),
            LocalData::Cls { shard, .. } => shard.train.len(),
        }
    }

    /// Tokens per training sequence (LM windows) or the longest prompt (classification).
    pub fn seq_len(&self) -> usize {
        match self {
            LocalData::Lm(s) => s.seq_len,
            LocalData::Masked(s) => s.seq_len,
            LocalData::Cls { shard, .. } => shard
                .train
                .iter()
                .map(|e| e.prompt.len())
                .max()
                .unwrap_or(1),
        }
    }
}

/// Build the device's starting adapter for a job: the global slice cut to the device's own
/// kept maps (which may be a subset of the maps the server cut it for) with padded components
/// re-initialised, else the device's own adapter resized to the arm's rank, else fresh. `model`
/// is any model of the architecture, pruned or not: only its dense dims and device are read.
pub fn start_adapter(
    job: &TrainJob,
    state: &DeviceState,
    model: &Llama,
) -> Result<Adapter, JobError> {
    let rank = job.arm.rank as usize;
    let dense = &model.config;
    let own_cfg = {
        let mut c = dense.clone();
        c.blocks = state.kept.shapes(dense);
        c
    };
    match &job.global {
        Some(g) => {
            let slice_kept = &g.kept;
            slice_kept
                .validate(dense)
                .map_err(|e| JobError::BadSlice(e.to_string()))?;
            let mut cfg = dense.clone();
            cfg.blocks = slice_kept.shapes(dense);
            let host = wire::adapter_from_wire(&g.adapter);
            let r = g.adapter.rank as usize;
            let ad = Adapter::from_host(&cfg, r, g.adapter.alpha as f64, &host, &model.device)
                .map_err(|e| JobError::BadSlice(e.to_string()))?;
            // Cut to the device's own kept maps.
            let hd = dense.head_dim;
            let mut blocks = Vec::with_capacity(ad.blocks.len());
            for (l, blk) in ad.blocks.into_iter().enumerate() {
                let (o, n) = (&slice_kept.blocks[l], &state.kept.blocks[l]);
                if !prune::block_within(n, o) {
                    return Err(JobError::BadSlice(format!(
                        "block {l}: the slice lacks units this device kept"
                    )));
                }
                blocks.push(
                    Proj::ALL
                        .iter()
                        .zip(blk)
                        .map(|(&p, f)| crate::lora::LoraFactors {
                            a: prune::slice_factor(f.a, p, true, o, n, hd),
                            b: prune::slice_factor(f.b, p, false, o, n, hd),
                        })
                        .collect(),
                );
            }
            let ad = Adapter {
                rank: r,
                alpha: g.adapter.alpha as f64,
                blocks,
            };
            // Components past `filled_rank` are zero padding: re-initialise them.
            let filled = (g.filled_rank as usize).min(r);
            let ad = if filled < r {
                ad.resize(filled.max(1), job.seed).resize(r, job.seed ^ 1)
            } else {
                ad
            };
            Ok(if ad.rank != rank {
                ad.resize(rank, job.seed)
            } else {
                ad
            })
        }
        None => match &state.adapter {
            Some((r, alpha, host)) => {
                let ad = Adapter::from_host(&own_cfg, *r, *alpha, host, &model.device)
                    .map_err(|e| JobError::BadSlice(e.to_string()))?;
                Ok(ad.resize(rank, job.seed))
            }
            None => Ok(Adapter::new(
                &own_cfg,
                rank,
                job.alpha,
                job.seed,
                &model.device,
            )),
        },
    }
}

/// A finished (or failed) local round, with the model it trained handed back.
pub struct JobRun {
    /// The device's model as the round left it: sliced to the outcome's kept maps on
    /// success; after a failure, to maps that may lie beyond the state's (a cancelled round
    /// may have pruned), which [`HeldModel::covers`] tells the driver.
    pub held: HeldModel,
    pub outcome: Result<JobOutcome, JobError>,
}

/// Run one local round: start adapter, held-out loss before, prune-and-tune, loss after, on
/// `held`, the device's model (its kept maps must cover the state's; it is narrowed to them
/// first). The round prunes the model in place and hands it back in [`JobRun::held`], so a
/// device holds only its own pruned model; the simulator passes each virtual device a copy
/// sliced from its one shared base ([`HeldModel::sliced`]).
/// Compute time and peak memory are left for the driver to fill in (they are measurements,
/// or virtual in the simulator). `on_step` sees each finished step's count; when it returns
/// false (the driver was told to cancel the job) the round stops there with
/// [`JobError::Cancelled`].
pub fn run_job(
    job: &TrainJob,
    state: &DeviceState,
    mut held: HeldModel,
    data: &LocalData,
    agent: &AgentConfig,
    on_step: impl FnMut(usize) -> bool,
) -> JobRun {
    if job.local_steps == 0 || job.batch == 0 {
        return JobRun {
            held,
            outcome: Err(JobError::BadConfig(
                "local_steps and batch_size must be positive".into(),
            )),
        };
    }
    if let Some(rp) = &job.rank_pruning {
        if let Err(e) = rp.check() {
            return JobRun {
                held,
                outcome: Err(JobError::BadConfig(e)),
            };
        }
    }
    if let Err(e) = held.narrow_to(&state.kept) {
        return JobRun {
            held,
            outcome: Err(e.into()),
        };
    }
    let adapter = match start_adapter(job, state, held.model()) {
        Ok(a) => a,
        Err(e) => {
            return JobRun {
                held,
                outcome: Err(e),
            }
        }
    };
    let cfg = TrainConfig {
        lr: job.lr,
        prune_every: job.prune_every,
        criterion: agent.criterion,
        prune: agent.prune.clone(),
        min_prune_events: agent.min_prune_events,
        seed: job.seed,
        warmup_steps: (job.local_steps / 10).max(1),
        recompute_blocks: job.memory.recomputes(),
        ..TrainConfig::default()
    };
    let mut tuner = Tuner::holding(held, adapter, cfg).with_rank_pruning(job.rank_pruning);
    // The importance EMA continues from the device's earlier rounds; one that does not fit
    // the kept maps (a damaged state file) is dropped, and the EMA starts afresh.
    if let Err(e) = state.importance.check(&state.kept) {
        tracing::warn!(error = %e, "the carried importance EMA does not fit the kept maps; starting afresh");
    } else {
        tuner.importance = state.importance.clone();
    }
    let outcome = tune_round(job, data, &mut tuner, on_step);
    JobRun {
        held: tuner.into_held(),
        outcome,
    }
}

/// The round's training and measurements on a ready tuner.
fn tune_round(
    job: &TrainJob,
    data: &LocalData,
    tuner: &mut Tuner,
    mut on_step: impl FnMut(usize) -> bool,
) -> Result<JobOutcome, JobError> {
    let (loss_pre, metric_pre) = data.evaluate(&tuner.model, Some(&tuner.adapter));
    let n = data.train_len().max(1);
    // Round-local batch order: a seeded offset into the shard.
    let offset = (job.seed % n as u64) as usize;
    let mut step = 0;
    let mut stopped = false;
    // With a run target the arm's ratio is the round's pace: close that share of the gap.
    let round_target = job.sparsity_goal().round_target(tuner.sparsity());
    let report = tuner.run_round_while(
        job.local_steps,
        round_target,
        |i| data.batch(offset + i, job.batch),
        |_| {
            step += 1;
            stopped = !on_step(step);
            !stopped
        },
    )?;
    if stopped {
        return Err(JobError::Cancelled {
            steps: step,
            planned: job.local_steps,
        });
    }
    // HetLoRA's rank self-pruning: the tail goes before the held-out loss is taken, so the
    // loss is that of the adapter the update carries.
    let pruned = tuner.self_prune_rank();
    if pruned.rank < pruned.trained_rank {
        tracing::info!(
            round = %job.round,
            from = pruned.trained_rank,
            to = pruned.rank,
            tail_share = pruned.tail_share,
            "rank self-pruned"
        );
    }
    let (loss_post, metric_post) = data.evaluate(&tuner.model, Some(&tuner.adapter));
    let c = &tuner.model.config;
    let stats = UpdateStats {
        loss_pre: loss_pre as f32,
        loss_post: loss_post as f32,
        sparsity: c.sparsity() as f32,
        param_count: c.total_params() as u64,
        compute_ms: 0,
        bytes_down: 0,
        bytes_up: 0,
        peak_mem_bytes: crate::cost::train_memory_in(
            c,
            pruned.trained_rank,
            job.batch,
            data.seq_len(),
            job.memory,
        )
        .total,
        samples: (job.local_steps as u64).saturating_mul(job.batch as u64),
        steps: job.local_steps as u32,
    };
    Ok(JobOutcome {
        round: job.round,
        kept: tuner.kept.clone(),
        adapter: (
            tuner.adapter.rank,
            tuner.adapter.alpha,
            tuner.adapter.to_host(),
        ),
        importance: tuner.importance.clone(),
        stats,
        report,
        metric_pre,
        metric_post,
    })
}
