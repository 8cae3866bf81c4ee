//! Local rounds on the virtual clock: a session's `Train` command runs the round at once (real
//! training or the surrogate) and its result is delivered after the virtual compute time (the
//! round's calibrated cost at the device's throughput, power mode and per-round speed draw),
//! unless the device drops out during it. The speed draw and the dropout of a device's round
//! come from the run's `device-round` stream at (device, round): the same in every strategy's
//! run.

use std::sync::Arc;

use device_agent::session::{DeviceState, TrainJob};
use protocol::{FailReason, Timestamp};
use rand::Rng;

use super::{Ev, Simulation};
use crate::error::SimError;
use crate::sampling::truncated_normal;
use crate::timing;

/// What a device's current local round is doing.
#[derive(Debug, Clone)]
pub(super) struct JobInfo {
    pub(super) round: u64,
    pub(super) started: Timestamp,
    pub(super) done_at: Timestamp,
    pub(super) steps: usize,
    pub(super) compute_ms: Option<u64>,
    /// `running`, `dropped`, `error`.
    pub(super) state: &'static str,
}

impl JobInfo {
    /// Steps a running job has done by `now` (its compute spread evenly over its steps), for
    /// heartbeats; `None` unless it runs.
    pub(super) fn steps_done(&self, now: Timestamp) -> Option<u32> {
        (self.state == "running" && self.done_at > self.started).then(|| {
            let frac =
                now.ms_since(self.started) as f64 / self.done_at.ms_since(self.started) as f64;
            (frac.min(1.0) * self.steps as f64) as u32
        })
    }
}

impl Simulation<'_> {
    /// A session asked to train `job` from `state`: maybe drop out, else run the round now and
    /// deliver its result after the virtual compute time.
    pub(super) fn start_job(
        &mut self,
        i: usize,
        job: TrainJob,
        state: Arc<DeviceState>,
    ) -> Result<(), SimError> {
        self.observer.job_started();
        let profile = self.profile(i);
        let (variability, train_gflops, dropout_prob) = (
            profile.variability,
            profile.train_gflops,
            profile.dropout_prob,
        );
        let mut noise = self.device_round.rng_at(i as u64 + 1, job.round.0);
        let d = &mut self.devices[i];
        d.job_token += 1;
        let token = d.job_token;
        let rank = job.arm.rank as usize;
        let pre = self.trainer.cost_config(&state.kept);
        let seq = self.trainer.seq_len(i);
        let draw = truncated_normal(1.0, variability, &mut noise);
        let gflops = train_gflops * d.power_mode * draw;
        let step_ms = timing::compute_ms(
            self.trainer
                .clock()
                .train_step_flops(&pre, rank, job.batch, seq, false)
                * timing::step_cost_factor(job.memory),
            gflops,
        );
        let mut info = JobInfo {
            round: job.round.0,
            started: self.now,
            done_at: self.now,
            steps: job.local_steps,
            compute_ms: None,
            state: "running",
        };
        if noise.random::<f64>() < dropout_prob {
            // The device goes away at a uniform point of the round's expected duration; its work
            // is lost, so it is not computed.
            let expected = step_ms.saturating_mul(job.local_steps as u64);
            let at = self
                .now
                .plus_ms((noise.random::<f64>() * expected as f64) as u64);
            info.state = "dropped";
            d.job = Some(info);
            self.queue.push(at, Ev::Crash { dev: i, token });
            return Ok(());
        }
        let agent = &self.devices[i].session.config;
        match self.trainer.train(i, &job, &state, agent) {
            Ok(trained) => {
                let mut outcome = trained.outcome;
                let ms = timing::compute_ms(trained.flops.in_mode(job.memory).total(), gflops);
                outcome.stats.compute_ms = ms;
                let d = &mut self.devices[i];
                d.peak_mem = d.peak_mem.max(outcome.stats.peak_mem_bytes);
                d.rounds_trained += 1;
                info.compute_ms = Some(ms);
                info.done_at = self.now.plus_ms(ms);
                d.job = Some(info);
                self.jobs_trained += 1;
                self.queue.push(
                    self.now.plus_ms(ms),
                    Ev::JobDone {
                        dev: i,
                        token,
                        result: Box::new(Ok(outcome)),
                    },
                );
            }
            Err(e) => {
                info.state = "error";
                info.done_at = self.now.plus_ms(step_ms);
                self.devices[i].job = Some(info);
                self.queue.push(
                    self.now.plus_ms(step_ms),
                    Ev::JobDone {
                        dev: i,
                        token,
                        result: Box::new(Err(FailReason::Error(e))),
                    },
                );
            }
        }
        Ok(())
    }
}
