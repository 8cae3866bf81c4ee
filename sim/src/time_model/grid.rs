//! The calibration grid: times the device agent's own training step and forward pass on the
//! real model over pruned shapes, LoRA ranks and batch geometries (`sim calibrate`).
//!
//! The design is not a full factorial (that would take hours on a 2-core host): a sparsity
//! sweep for two pruning mixes at one rank and batch, a rank sweep at two shapes, and a batch
//! and sequence sweep at three shapes. Every point is one training-step time and one forward
//! time (the fastest of its timed calls: the work is deterministic, so anything slower is
//! interference from the host, which a median of 7 did not always remove: one such point once
//! timed a rank-4 forward pass 22% slower than rank 8); importance-scoring steps are timed on
//! the sparsity sweep only. The calls are spread over several visits to each point (see
//! [`measure`]).

use std::time::Instant;

use burn::tensor::Device;
use device_agent::lora::Adapter;
use device_agent::model::Llama;
use device_agent::prune::{self, KeptIndicesExt, PruneConfig};
use device_agent::{eval, train};
use protocol::KeptIndices;

use super::{MeasuredOn, Measurement, ShapeSums, StepKind, TimeModelError, Workload};

/// How units are removed to reach a sparsity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// MLP channels only.
    Channels,
    /// Heads and channels, by the magnitude criterion.
    HeadsAndChannels,
}

impl Mix {
    fn label(self, sparsity: f64) -> String {
        if sparsity == 0.0 {
            "dense".into()
        } else {
            match self {
                Mix::Channels => "channels".into(),
                Mix::HeadsAndChannels => "heads+channels".into(),
            }
        }
    }
}

/// One configuration to time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub mix: Mix,
    pub sparsity: f64,
    pub rank: usize,
    pub batch: usize,
    pub seq: usize,
    /// Also time a step that accumulates importance scores.
    pub scoring: bool,
}

/// The calibration design (`quick`: a third of it, for a smoke run).
pub fn design(quick: bool) -> Vec<Point> {
    let p = |mix, sparsity, rank, batch, seq, scoring| Point {
        mix,
        sparsity,
        rank,
        batch,
        seq,
        scoring,
    };
    let mut v = vec![p(Mix::Channels, 0.0, 8, 2, 128, true)];
    for s in [0.15, 0.3, 0.45, 0.6] {
        v.push(p(Mix::Channels, s, 8, 2, 128, true));
        v.push(p(Mix::HeadsAndChannels, s, 8, 2, 128, true));
    }
    for r in [4, 16, 32] {
        v.push(p(Mix::Channels, 0.0, r, 2, 128, false));
        v.push(p(Mix::HeadsAndChannels, 0.45, r, 2, 128, false));
    }
    // (1, 128) is the geometry a final model's inference latency is charged at; (2, 64) the
    // surrogate presets' training step, and a second small dense point: with (1, 64) the only
    // one, the fixed overhead and the weight term were told apart by that point alone, so
    // leaving it out moved 90 ms between them (BENCHMARKS.md, "Time model").
    for (b, n) in [
        (1, 64),
        (2, 64),
        (4, 64),
        (1, 128),
        (1, 256),
        (4, 128),
        (2, 256),
    ] {
        v.push(p(Mix::Channels, 0.0, 16, b, n, false));
        v.push(p(Mix::Channels, 0.3, 16, b, n, false));
        v.push(p(Mix::HeadsAndChannels, 0.6, 16, b, n, false));
    }
    if quick {
        v = v.into_iter().step_by(3).collect();
    }
    v
}

/// Kept maps that reach `sparsity` by `mix` (magnitude scores, every block alike so the
/// shape, not the choice of units, is what varies).
pub fn kept_for(base: &Llama, mix: Mix, sparsity: f64) -> KeptIndices {
    let dense = KeptIndices::dense(&base.config);
    if sparsity == 0.0 {
        return dense;
    }
    let pc = PruneConfig {
        uniform: true,
        protected_blocks: vec![],
        prune_heads: mix == Mix::HeadsAndChannels,
        ..PruneConfig::default()
    };
    prune::select_prune(
        &base.config,
        &dense,
        &prune::magnitude_scores(base),
        sparsity,
        &pc,
    )
}

fn fastest_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// Time every point of `design` on `base`, with training windows cut from `ids`: `visits`
/// passes over the design, each building the point's tuner again, making one warm-up call and
/// `reps` timed calls per kind; a point keeps its fastest call over all visits. Visits go
/// forward and backward in turn, so a point's calls are spread over the whole run rather
/// than made in one burst that a slow spell of the host can cover. (On the drifting Intel
/// family 6 model 207 VM of session 39 that did not make single points repeat: two runs of
/// seven calls in a row disagreed per point by a median 8% and up to 34%, two runs of three
/// visits by 6.5% and 34%; merging runs at their fastest is what helps, BENCHMARKS.md.)
/// `on_visit` sees each visit's number as it starts, `on_point` every point's final
/// measurement at the end.
pub fn measure(
    base: &Llama,
    ids: &[u32],
    design: &[Point],
    reps: usize,
    visits: usize,
    mut on_visit: impl FnMut(usize),
    mut on_point: impl FnMut(&Measurement),
) -> Result<Vec<Measurement>, TimeModelError> {
    let visits = visits.max(1);
    // Per point: its measurements (train, scoring when asked, forward) in design order.
    let mut per_point: Vec<Vec<Measurement>> = vec![Vec::new(); design.len()];
    for visit in 0..visits {
        on_visit(visit + 1);
        let order: Vec<usize> = if visit % 2 == 0 {
            (0..design.len()).collect()
        } else {
            (0..design.len()).rev().collect()
        };
        for i in order {
            let timed = time_point(base, ids, &design[i], reps)?;
            let kept = &mut per_point[i];
            if kept.is_empty() {
                *kept = timed;
            } else {
                for (k, t) in kept.iter_mut().zip(timed) {
                    k.ms = k.ms.min(t.ms);
                    k.reps += t.reps;
                }
            }
        }
    }
    let out: Vec<Measurement> = per_point.into_iter().flatten().collect();
    out.iter().for_each(&mut on_point);
    Ok(out)
}

/// One visit to a point: its tuner built, then per kind a warm-up call and the fastest of
/// `reps` timed calls.
fn time_point(
    base: &Llama,
    ids: &[u32],
    p: &Point,
    reps: usize,
) -> Result<Vec<Measurement>, TimeModelError> {
    let device: &Device = &base.device;
    let kept = kept_for(base, p.mix, p.sparsity);
    let mut cfg = base.config.clone();
    cfg.blocks = kept.shapes(&base.config);
    let windows: Vec<Vec<u32>> = ids
        .chunks_exact(p.seq + 1)
        .take(p.batch)
        .map(<[u32]>::to_vec)
        .collect();
    if windows.len() < p.batch {
        return Err(TimeModelError::Grid(format!(
            "the calibration text has too few tokens for {} windows of {}",
            p.batch, p.seq
        )));
    }
    let batch = train::Batch::lm(&windows);
    let adapter = Adapter::new(&cfg, p.rank, 2.0 * p.rank as f64, 0, device);
    let tcfg = train::TrainConfig::default();
    let mut tuner = train::Tuner::new(base, kept, adapter, tcfg)
        .map_err(|e| TimeModelError::Grid(format!("{p:?}: {e}")))?;
    let workload = Workload {
        shape: ShapeSums::of(&tuner.model.config),
        rank: p.rank,
        batch: p.batch,
        seq: p.seq,
    };
    let sparsity = tuner.sparsity();
    let mut out = Vec::new();
    let mut record = |kind: StepKind, ms: f64| {
        out.push(Measurement {
            kind,
            label: p.mix.label(p.sparsity),
            sparsity,
            workload,
            ms,
            reps,
        })
    };
    let ms = fastest_ms(reps, || {
        tuner.train_micro(&batch, 1e-4, false);
    });
    record(StepKind::Train, ms);
    if p.scoring {
        let ms = fastest_ms(reps, || {
            tuner.train_micro(&batch, 1e-4, true);
        });
        record(StepKind::TrainScoring, ms);
    }
    let ms = fastest_ms(reps, || {
        eval::evaluate_windows(&tuner.model, Some(&tuner.adapter), &windows, p.batch);
    });
    record(StepKind::Forward, ms);
    Ok(out)
}

/// The host's CPU (its class as [`crate::host::HostInfo`] detects it, whose model name and
/// instruction sets the older fields repeat) and how the file was made.
pub fn measured_on(command: String, build: &str) -> MeasuredOn {
    let class = crate::host::HostInfo::detect();
    let isa = [
        ("avx512f", class.avx512f),
        ("avx2", class.avx2),
        ("fma", class.fma),
        ("neon", class.vector_path == "neon"),
    ]
    .into_iter()
    .filter(|&(_, has)| has)
    .map(|(name, _)| name.to_string())
    .collect();
    MeasuredOn {
        cpu: class.cpu_model.clone(),
        isa,
        threads: class.threads,
        build: build.to_string(),
        command,
        date: utc_date(),
        class: Some(class),
        in_place_below_rows: device_agent::kernels::sgemm::in_place_below_rows(),
    }
}

/// The current UTC time as RFC 3339 (`2026-11-30T15:04:05Z`), from the system clock
/// (civil-from-days), for provenance lines.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rem = secs % 86_400;
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Today's UTC date, `YYYY-MM-DD`.
fn utc_date() -> String {
    utc_now()[..10].to_string()
}
