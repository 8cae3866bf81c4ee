//! FedSpine simulator: one round coordinator and many device sessions in one process, on a
//! virtual clock, with real training of the real model on real, non-IID data (or, for policy
//! tuning at scale, a fitted surrogate). Only time is simulated: compute time comes from each
//! local step's FLOPs at the device's current pruned shape and its profile's throughput,
//! transfer time from the encoded message size, link rate and round trip.
//!
//! - [`driver`]: the discrete-event loop over the coordinator and sessions (with its jobs,
//!   evaluation panel and records).
//! - [`hardware`]: device hardware profiles and fleets (data files in `sim/profiles/`).
//! - [`timing`]: the time model (compute, transfer, memory, inference latency);
//!   [`time_model`]: the per-operator step-time model calibrated on a real host (`sim calibrate`).
//! - [`partition`], [`local_data`]: non-IID splits (SOTU by president or era, spam by
//!   Dirichlet label skew) and building each device's local data; [`apportion`]: whole counts
//!   from quotas.
//! - [`compute`], [`surrogate`]: the compute stand-in, real local rounds (`run_job` on one
//!   shared base model) or the fitted loss-response model.
//! - [`config`], [`experiment`]: experiment files, presets, running and comparing strategies.
//! - [`byzantine`]: attacking devices that poison the update they send (`[byzantine]`).
//! - [`report`]: per-round JSONL, summaries, tables and charts (drawn by `charts`), read back
//!   by `compare --resume` ([`nan_json`]: NaN written as `null` reads back).
//! - [`validation`]: a real-mode comparison against the same experiment through the surrogate.
//! - [`comparison`], [`stats`], [`host`]: comparisons over seeds (bootstrap intervals, paired
//!   differences, the bandits' settled arms per class) and the CPU class a run was computed on.
//!
//! Architecture invariant: the simulator only drives the coordinator and the sessions; rounds,
//! arms, aggregation and rewards are theirs. No wall clock, no unseeded randomness: the same
//! seed gives byte-identical reports.

pub mod apportion;
pub mod byzantine;
pub mod comparison;
pub mod compute;
pub mod config;
pub mod device_rounds;
pub mod driver;
pub mod error;
pub mod experiment;
pub mod hardware;
pub mod host;
pub mod local_data;
pub mod nan_json;
pub mod partition;
pub mod progress;
pub mod queue;
pub mod record;
pub mod report;
pub mod sampling;
pub mod sensitivity;
pub mod side_by_side;
pub mod stats;
pub mod surrogate;
pub mod time_model;
pub mod timing;
pub mod validation;
pub mod wall_profile;

pub use config::{ExperimentConfig, Mode};
pub use driver::{Observer, Quiet, Simulation};
pub use error::SimError;
pub use experiment::{compare, run, Resources};
pub use report::{Report, Summary};
