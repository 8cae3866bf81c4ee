//! Learned feasibility: which arms a device cannot run (memory or deadline), from what it reported.
//!
//! Nothing is assumed about a device up front. When a device reports a round whose peak memory
//! exceeded its RAM (or whose duration exceeded its deadline), the filter excludes that arm and
//! every arm that is at least as expensive: memory and compute time grow with the LoRA rank and
//! shrink as the pruning ratio grows, so an arm with `rank >= r` and `ratio <= p` costs at least
//! as much as a failing `(p, r)`. Each device's exclusions form a small staircase of corners,
//! kept minimal (a corner dominated by another is dropped).

use std::collections::BTreeMap;

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::arm::{Arm, DeviceContext};
use crate::error::BanditError;
use crate::policy::Policy;
use crate::region::FeasibleRegion;

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

    /// `region` less the arms the filter has excluded for the device.
    fn within(&self, ctx: &DeviceContext, region: &FeasibleRegion) -> FeasibleRegion {
        let own = self.filter.region(ctx.device_id);
        if region.is_unrestricted() {
            own
        } else {
            own.intersect(region)
        }
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
        let region = self.within(ctx, region);
        self.policy.choose_in(ctx, &region, rng)
    }

    fn exploit_in(
        &self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Option<Arm> {
        let region = self.within(ctx, region);
        self.policy.exploit_in(ctx, &region, rng)
    }

    fn observe(&mut self, ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        self.policy.observe(ctx, arm, reward)
    }
}
