//! Learned feasibility: which arms a device cannot run (memory or deadline), from what it reported.
//!
//! Nothing is assumed about a device up front. When a device reports a round whose peak memory
//! exceeded its RAM (or whose duration exceeded its deadline), the filter excludes that arm and
//! every arm that is at least as expensive: memory and compute time grow with the LoRA rank and
//! shrink as the pruning ratio grows, so an arm with `rank >= r` and `ratio <= p` costs at least
//! as much as a failing `(p, r)`. Each device's exclusions form a small staircase of corners,
//! kept minimal (a corner dominated by another is dropped).

use std::collections::BTreeMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::policy::Policy;

/// How strictly observations are judged.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeasibilityConfig {
    /// Fraction of the device's reported RAM a round may use before the arm counts as
    /// infeasible. Default `1.0` (any excess over the reported RAM).
    pub ram_fraction: f64,
    /// Multiple of the deadline a round may take before the arm counts as infeasible.
    /// Default `1.0` (any overrun). Raise it if round durations are noisy.
    pub deadline_factor: f64,
}

impl Default for FeasibilityConfig {
    fn default() -> Self {
        FeasibilityConfig {
            ram_fraction: 1.0,
            deadline_factor: 1.0,
        }
    }
}

impl FeasibilityConfig {
    pub fn validate(&self) -> Result<(), BanditError> {
        if !(self.ram_fraction.is_finite() && self.ram_fraction > 0.0) {
            return Err(BanditError::param(
                "ram_fraction",
                self.ram_fraction,
                "a finite number > 0",
            ));
        }
        if !(self.deadline_factor.is_finite() && self.deadline_factor > 0.0) {
            return Err(BanditError::param(
                "deadline_factor",
                self.deadline_factor,
                "a finite number > 0",
            ));
        }
        Ok(())
    }
}

/// Why an arm was excluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum InfeasibleReason {
    /// Observed peak memory exceeded the device's usable RAM.
    Memory { peak_mem_bytes: u64, ram_bytes: u64 },
    /// Observed duration exceeded the device's deadline.
    Deadline { duration_ms: u64, deadline_ms: u64 },
    /// The device reported running out of memory (no peak figure available).
    OutOfMemory,
}

/// One learned exclusion: every arm with `rank >= corner.rank` and
/// `prune_ratio <= corner.prune_ratio` is infeasible for the device.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exclusion {
    pub corner: Arm,
    pub reason: InfeasibleReason,
    /// Round in which it was observed.
    pub round: u64,
}

impl Exclusion {
    fn covers(&self, arm: &Arm) -> bool {
        arm.rank >= self.corner.rank && arm.prune_ratio <= self.corner.prune_ratio
    }
}

/// The set of arms still allowed, as seen by a policy's `choose_in`.
///
/// It is monotone: if `(p, r)` is excluded so is every `(p', r')` with `p' <= p`, `r' >= r`.
/// For a rank `r` the allowed ratios are exactly those above [`FeasibleRegion::ratio_floor`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeasibleRegion {
    corners: Vec<Arm>,
}

impl FeasibleRegion {
    /// No exclusions.
    pub fn all() -> Self {
        FeasibleRegion::default()
    }

    /// The region left after excluding each corner's dominated quadrant.
    pub fn excluding(corners: impl IntoIterator<Item = Arm>) -> Self {
        FeasibleRegion {
            corners: corners.into_iter().collect(),
        }
    }

    /// Arms allowed by both regions.
    pub fn intersect(&self, other: &FeasibleRegion) -> FeasibleRegion {
        let mut corners = self.corners.clone();
        corners.extend_from_slice(&other.corners);
        FeasibleRegion { corners }
    }

    pub fn is_unrestricted(&self) -> bool {
        self.corners.is_empty()
    }

    /// For `rank`, the largest excluded ratio: ratios `<=` it are infeasible, ratios above are
    /// allowed. `None` when nothing is excluded at this rank.
    pub fn ratio_floor(&self, rank: u32) -> Option<f64> {
        self.corners
            .iter()
            .filter(|c| c.rank <= rank)
            .map(|c| c.prune_ratio)
            .fold(None, |acc: Option<f64>, p| {
                Some(acc.map_or(p, |a| a.max(p)))
            })
    }

    pub fn contains(&self, arm: &Arm) -> bool {
        match self.ratio_floor(arm.rank) {
            Some(floor) => arm.prune_ratio > floor,
            None => true,
        }
    }

    /// Whether some ratio in `[lo, hi]` (or `[lo, hi)`, the answer is the same) is allowed at
    /// `rank`.
    pub fn allows_some(&self, rank: u32, hi: f64) -> bool {
        match self.ratio_floor(rank) {
            Some(floor) => floor < hi,
            None => true,
        }
    }

    /// A ratio drawn uniformly from the allowed part of `[lo, hi)` at `rank` (`lo` itself when
    /// `lo == hi`). The caller must have checked [`FeasibleRegion::allows_some`].
    pub fn sample_ratio(&self, rank: u32, lo: f64, hi: f64, rng: &mut ChaCha8Rng) -> f64 {
        let floor = self.ratio_floor(rank);
        let start = floor.map_or(lo, |f| f.max(lo));
        let u: f64 = rng.random();
        let mut p = start + (hi - start) * u;
        if let Some(f) = floor {
            if p <= f {
                p = next_up(f).min(hi);
            }
        }
        p.clamp(lo, hi)
    }

    /// Does the arm space have any allowed arm at all?
    pub fn allows_any(&self, space: &ArmSpace) -> bool {
        space
            .ranks
            .iter()
            .any(|&r| self.allows_some(r, space.ratio_max))
    }
}

/// The smallest `f64` above a finite, non-negative `x` (stable-Rust stand-in for `next_up`).
fn next_up(x: f64) -> f64 {
    if x < 0.0 {
        return 0.0;
    }
    f64::from_bits(x.to_bits() + 1)
}

/// Per-device exclusions learned from reported peak memory and durations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FeasibilityFilter {
    pub config: FeasibilityConfig,
    devices: BTreeMap<u64, Vec<Exclusion>>,
}

impl FeasibilityFilter {
    pub fn new(config: FeasibilityConfig) -> Result<Self, BanditError> {
        config.validate()?;
        Ok(FeasibilityFilter {
            config,
            devices: BTreeMap::new(),
        })
    }

    /// Judges one completed round of `ctx.device_id` that ran `arm`: if `peak_mem_bytes`
    /// exceeded the device's usable RAM (`ctx.ram_bytes`) or `duration_ms` its deadline
    /// (`ctx.deadline_ms`), the arm and every costlier arm are excluded for that device.
    /// Returns the reason when the observation showed the arm infeasible. Limits the context
    /// does not carry are not judged.
    pub fn record(
        &mut self,
        arm: Arm,
        peak_mem_bytes: u64,
        duration_ms: u64,
        ctx: &DeviceContext,
    ) -> Result<Option<InfeasibleReason>, BanditError> {
        check_arm_finite(&arm)?;
        let mut reason = None;
        if let Some(ram) = ctx.ram_bytes {
            let usable = ram as f64 * self.config.ram_fraction;
            if peak_mem_bytes as f64 > usable {
                reason = Some(InfeasibleReason::Memory {
                    peak_mem_bytes,
                    ram_bytes: ram,
                });
            }
        }
        if reason.is_none() {
            if let Some(deadline) = ctx.deadline_ms {
                if duration_ms as f64 > deadline as f64 * self.config.deadline_factor {
                    reason = Some(InfeasibleReason::Deadline {
                        duration_ms,
                        deadline_ms: deadline,
                    });
                }
            }
        }
        if let Some(reason) = reason {
            self.exclude(arm, reason, ctx);
        }
        Ok(reason)
    }

    /// The device reported an out-of-memory failure while running `arm`.
    pub fn record_out_of_memory(
        &mut self,
        arm: Arm,
        ctx: &DeviceContext,
    ) -> Result<(), BanditError> {
        check_arm_finite(&arm)?;
        self.exclude(arm, InfeasibleReason::OutOfMemory, ctx);
        Ok(())
    }

    fn exclude(&mut self, arm: Arm, reason: InfeasibleReason, ctx: &DeviceContext) {
        let list = self.devices.entry(ctx.device_id).or_default();
        if list.iter().any(|e| e.covers(&arm)) {
            return;
        }
        let new = Exclusion {
            corner: arm,
            reason,
            round: ctx.round,
        };
        list.retain(|e| !new.covers(&e.corner));
        let at = list
            .iter()
            .position(|e| (e.corner.rank, e.corner.prune_ratio) > (arm.rank, arm.prune_ratio))
            .unwrap_or(list.len());
        list.insert(at, new);
        tracing::debug!(
            device_id = ctx.device_id,
            round = ctx.round,
            prune_ratio = arm.prune_ratio,
            rank = arm.rank,
            ?reason,
            "arm excluded as infeasible"
        );
    }

    pub fn is_feasible(&self, device_id: u64, arm: &Arm) -> bool {
        self.exclusions(device_id).iter().all(|e| !e.covers(arm))
    }

    /// The allowed region for one device.
    pub fn region(&self, device_id: u64) -> FeasibleRegion {
        FeasibleRegion::excluding(self.exclusions(device_id).iter().map(|e| e.corner))
    }

    /// The device's current exclusions, ordered by rank then ratio.
    pub fn exclusions(&self, device_id: u64) -> &[Exclusion] {
        self.devices.get(&device_id).map_or(&[], |v| v.as_slice())
    }

    /// Drops everything learned about a device (e.g. it re-joined with different hardware).
    pub fn forget(&mut self, device_id: u64) {
        self.devices.remove(&device_id);
    }
}

fn check_arm_finite(arm: &Arm) -> Result<(), BanditError> {
    if arm.prune_ratio.is_finite() {
        Ok(())
    } else {
        Err(BanditError::UnknownArm {
            arm: *arm,
            reason: "pruning ratio is not finite".into(),
        })
    }
}

/// A policy whose choices respect a [`FeasibilityFilter`]: the coordinator keeps one of these
/// per policy instance, feeds it `record` after each round, and never sees an arm twice that a
/// device has shown it cannot run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Filtered<P> {
    pub policy: P,
    pub filter: FeasibilityFilter,
}

impl<P: Policy> Filtered<P> {
    pub fn new(policy: P, filter: FeasibilityFilter) -> Self {
        Filtered { policy, filter }
    }

    /// See [`FeasibilityFilter::record`].
    pub fn record(
        &mut self,
        arm: Arm,
        peak_mem_bytes: u64,
        duration_ms: u64,
        ctx: &DeviceContext,
    ) -> Result<Option<InfeasibleReason>, BanditError> {
        self.filter.record(arm, peak_mem_bytes, duration_ms, ctx)
    }

    /// See [`FeasibilityFilter::record_out_of_memory`].
    pub fn record_out_of_memory(
        &mut self,
        arm: Arm,
        ctx: &DeviceContext,
    ) -> Result<(), BanditError> {
        self.filter.record_out_of_memory(arm, ctx)
    }
}

impl<P: Policy> Policy for Filtered<P> {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        let own = self.filter.region(ctx.device_id);
        let region = if region.is_unrestricted() {
            own
        } else {
            own.intersect(region)
        };
        self.policy.choose_in(ctx, &region, rng)
    }

    fn observe(&mut self, ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        self.policy.observe(ctx, arm, reward)
    }
}
