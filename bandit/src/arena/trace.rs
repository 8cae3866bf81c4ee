//! Trace replay: an environment built from reward traces that real runs recorded as JSONL.
//!
//! Each line is `{"device_id": 3, "round": 12, "prune_ratio": 0.25, "rank": 16, "reward": 0.61}`.
//! Arena round `t` of `T` maps to trace round `min + floor(t * span / T)`. For that round a
//! device's candidate records are those within `round_window` rounds of it (all of the
//! device's records if none are). A played arm is answered by the nearest recorded arm
//! (distance in normalised ratio and rank-index units): its expected reward is the mean of
//! that arm's candidate rewards and the observed reward one of them drawn at random. The
//! optimum is the best such mean, so regret is measured against what the trace saw.

use std::collections::BTreeMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Environment, Pull};
use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;

/// One recorded play.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRecord {
    pub device_id: u64,
    pub round: u64,
    pub prune_ratio: f64,
    pub rank: u32,
    pub reward: f64,
}

/// Parses JSONL text (blank lines allowed). Errors name the 1-based line.
pub fn parse_trace_jsonl(text: &str) -> Result<Vec<TraceRecord>, BanditError> {
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let r: TraceRecord = serde_json::from_str(line).map_err(|e| BanditError::TraceParse {
            line: i + 1,
            message: e.to_string(),
        })?;
        if !(r.prune_ratio.is_finite() && (0.0..=1.0).contains(&r.prune_ratio)) || r.rank == 0 {
            return Err(BanditError::TraceParse {
                line: i + 1,
                message: format!(
                    "arm (ratio {}, rank {}) is not valid",
                    r.prune_ratio, r.rank
                ),
            });
        }
        if !(r.reward.is_finite() && (0.0..=1.0).contains(&r.reward)) {
            return Err(BanditError::TraceParse {
                line: i + 1,
                message: format!("reward {} is not in [0, 1]", r.reward),
            });
        }
        records.push(r);
    }
    if records.is_empty() {
        return Err(BanditError::TraceParse {
            line: 0,
            message: "the trace has no records".into(),
        });
    }
    Ok(records)
}

/// How to replay a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    pub name: String,
    /// JSONL file (read by the binary, not by this library).
    pub path: String,
    /// Records within this many rounds of the mapped round count. Default `5`.
    pub round_window: u64,
    /// Treat every record as one device's (for sparse traces). Default `false`.
    pub pool_devices: bool,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            name: "trace".into(),
            path: String::new(),
            round_window: 5,
            pool_devices: false,
        }
    }
}

/// A recorded arm with its rewards in the current window.
#[derive(Clone, Debug)]
struct WindowArm {
    arm: Arm,
    mean: f64,
    rewards: Vec<f64>,
}

/// A replayable trace.
#[derive(Clone, Debug)]
pub struct TraceEnvironment {
    config: TraceConfig,
    space: ArmSpace,
    device_ids: Vec<u64>,
    /// Per device, its records sorted by round.
    records: Vec<Vec<TraceRecord>>,
    round_min: u64,
    round_max: u64,
    /// Per device, the arms of the prepared round.
    window: Vec<Vec<WindowArm>>,
    optima: Vec<f64>,
}

impl TraceEnvironment {
    pub fn new(config: TraceConfig, records: Vec<TraceRecord>) -> Result<Self, BanditError> {
        if records.is_empty() {
            return Err(BanditError::TraceParse {
                line: 0,
                message: "the trace has no records".into(),
            });
        }
        let ratio_min = records
            .iter()
            .map(|r| r.prune_ratio)
            .fold(f64::INFINITY, f64::min);
        let ratio_max = records.iter().map(|r| r.prune_ratio).fold(0.0, f64::max);
        let space = ArmSpace::new(
            ratio_min,
            ratio_max,
            records.iter().map(|r| r.rank).collect(),
        )?;
        let mut by_device: BTreeMap<u64, Vec<TraceRecord>> = BTreeMap::new();
        for r in &records {
            let id = if config.pool_devices { 0 } else { r.device_id };
            by_device.entry(id).or_default().push(*r);
        }
        let device_ids: Vec<u64> = by_device.keys().copied().collect();
        let records: Vec<Vec<TraceRecord>> = by_device
            .into_values()
            .map(|mut v| {
                v.sort_by_key(|r| r.round);
                v
            })
            .collect();
        let round_min = records.iter().flatten().map(|r| r.round).min().unwrap_or(0);
        let round_max = records.iter().flatten().map(|r| r.round).max().unwrap_or(0);
        let n = records.len();
        Ok(TraceEnvironment {
            config,
            space,
            device_ids,
            records,
            round_min,
            round_max,
            window: vec![Vec::new(); n],
            optima: vec![0.0; n],
        })
    }

    /// Device ids as they appear in the trace, in arena device order.
    pub fn device_ids(&self) -> &[u64] {
        &self.device_ids
    }

    fn nearest(&self, device: usize, arm: &Arm) -> &WindowArm {
        let (x, y) = self.space.normalised(arm);
        self.window[device]
            .iter()
            .min_by(|a, b| {
                let da = dist2(self.space.normalised(&a.arm), (x, y));
                let db = dist2(self.space.normalised(&b.arm), (x, y));
                da.total_cmp(&db)
            })
            .expect("every device has at least one record")
    }
}

fn dist2(a: (f64, f64), b: (f64, f64)) -> f64 {
    (a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)
}

impl Environment for TraceEnvironment {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn arm_space(&self) -> &ArmSpace {
        &self.space
    }

    fn devices(&self) -> usize {
        self.records.len()
    }

    fn context(&self, device: usize, round: u64) -> DeviceContext {
        DeviceContext::new(self.device_ids[device], round)
    }

    fn prepare_round(&mut self, round: u64, rounds: u64) {
        let span = self.round_max - self.round_min + 1;
        let mapped = self.round_min + (round as u128 * span as u128 / rounds.max(1) as u128) as u64;
        let w = self.config.round_window;
        for (d, recs) in self.records.iter().enumerate() {
            let near: Vec<&TraceRecord> = recs
                .iter()
                .filter(|r| r.round.abs_diff(mapped) <= w)
                .collect();
            let chosen: Vec<&TraceRecord> = if near.is_empty() {
                recs.iter().collect()
            } else {
                near
            };
            let mut arms: Vec<WindowArm> = Vec::new();
            for r in chosen {
                let arm = Arm::new(r.prune_ratio, r.rank);
                match arms.iter_mut().find(|a| a.arm == arm) {
                    Some(a) => a.rewards.push(r.reward),
                    None => arms.push(WindowArm {
                        arm,
                        mean: 0.0,
                        rewards: vec![r.reward],
                    }),
                }
            }
            for a in &mut arms {
                a.mean = a.rewards.iter().sum::<f64>() / a.rewards.len() as f64;
            }
            self.optima[d] = arms
                .iter()
                .map(|a| a.mean)
                .fold(f64::NEG_INFINITY, f64::max);
            self.window[d] = arms;
        }
    }

    fn optimum(&self, device: usize) -> f64 {
        self.optima[device]
    }

    fn expected(&self, device: usize, arm: &Arm) -> f64 {
        self.nearest(device, arm).mean
    }

    fn pull(&self, device: usize, arm: &Arm, rng: &mut ChaCha8Rng) -> Pull {
        let near = self.nearest(device, arm);
        let u: f64 = rng.random();
        let k = ((u * near.rewards.len() as f64) as usize).min(near.rewards.len() - 1);
        Pull {
            reward: near.rewards[k],
            peak_mem_bytes: 0,
            duration_ms: 0,
            failed: false,
        }
    }
}
