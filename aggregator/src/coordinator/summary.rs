//! What the coordinator reports: one `RoundSummary` per closed round (a JSONL line in the
//! metrics file), and `Counters` over the whole run.

use std::collections::BTreeMap;

use protocol::{Arm, DeviceId, RoundId, Timestamp};
use serde::{Deserialize, Serialize};

use crate::aggregate::GaugeBounds;

/// One device that answered a round with an accepted update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParticipantSummary {
    pub device: DeviceId,
    /// The arm as sent (its rank capped where the device self-pruned its rank).
    pub arm: Arm,
    /// Held-out loss before and after the device's local work.
    pub loss_pre: f32,
    pub loss_post: f32,
    /// The device's sparsity before the round and after it.
    pub sparsity_prev: f64,
    pub sparsity: f32,
    /// Bandit reward (0 when the round was abandoned: answered devices learn nothing then).
    pub reward: f64,
    /// Compute time the device measured.
    pub compute_ms: u64,
    /// Time from the round start to the update's arrival, as the coordinator saw it.
    pub duration_ms: u64,
    /// Update frame size as received.
    pub bytes_up: u64,
    /// Round configuration size as the device reported it.
    pub bytes_down: u64,
    pub peak_mem_bytes: u64,
    pub samples: u64,
    /// `|s B A|_F` of the update (before clipping).
    pub delta_norm: f64,
}

/// The arm a selected device was sent, with the device's class when the round started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub device: DeviceId,
    /// `Capabilities::class` of its last Join (`unknown` when it named none).
    pub device_class: String,
    pub arm: Arm,
}

/// A selected device that did not contribute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailedSummary {
    pub device: DeviceId,
    pub arm: Arm,
    /// `out_of_memory`, `error`, or a reject kind (`non_finite`, `malformed`, ...).
    pub kind: String,
    pub reason: String,
}

/// One closed (aggregated) or abandoned round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: RoundId,
    pub strategy: String,
    pub started_at: Timestamp,
    pub closed_at: Timestamp,
    /// Every selected device, ascending.
    pub selected: Vec<DeviceId>,
    /// The arm each selected device was sent, by device id, with its class (the metrics count
    /// arms per class from it).
    #[serde(default)]
    pub assigned: Vec<Assignment>,
    /// Accepted updates, by device id.
    pub participants: Vec<ParticipantSummary>,
    /// Selected devices that had not answered when the round closed.
    pub missed: Vec<DeviceId>,
    /// Selected devices that reported a failure or whose update was refused.
    pub failed: Vec<FailedSummary>,
    /// Every reject sent while the round was open, by reason kind.
    pub rejects: BTreeMap<String, u64>,
    /// Aggregation method name (`exact`, `hetlora`, `mean`, ...).
    pub aggregation: String,
    /// Accepted updates needed at the deadline.
    pub quorum: usize,
    pub quorum_met: bool,
    /// Whether the global adapter was replaced by this round's aggregate.
    pub aggregated: bool,
    /// The round's aggregate held non-finite values, so the previous global adapter was kept.
    #[serde(default)]
    pub non_finite_aggregate: bool,
    /// What HetLoRA's and plain mean's gauge defences did (`aggregate/mean.rs`): layers whose
    /// step was out of bounds and kept their previous value, and update layers folded with a
    /// repaired scalar gauge. Nonzero means some update split its products between `A` and `B`
    /// far from the slice it was sent: a gauge attack or a broken device.
    #[serde(default)]
    pub gauge: GaugeBounds,
    /// Accepted updates whose reported sample count was clipped (see
    /// `CoordinatorConfig::max_samples`).
    #[serde(default)]
    pub samples_clipped: u64,
    /// Accepted updates that norm screening left out of the aggregate (see
    /// `AggregationConfig::screen_factor`); they stay in `participants` with reward 0.
    #[serde(default)]
    pub screened_out: Vec<DeviceId>,
    /// Why the round closed: `all_answered`, `target_reached` or `deadline`.
    pub closed_by: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Sample-weighted means over participants (`None` without participants).
    pub mean_loss_pre: Option<f64>,
    pub mean_loss_post: Option<f64>,
}

impl RoundSummary {
    /// Wall (or virtual) duration of the round.
    pub fn duration_ms(&self) -> u64 {
        self.closed_at.ms_since(self.started_at)
    }

    /// A one-line, human-readable progress report.
    pub fn progress_line(&self, total_rounds: u64) -> String {
        let loss = match (self.mean_loss_pre, self.mean_loss_post) {
            (Some(a), Some(b)) => format!("loss {a:.4} -> {b:.4}"),
            _ => "no updates".to_string(),
        };
        let rejects: u64 = self.rejects.values().sum();
        let screened = match self.screened_out.len() {
            0 => String::new(),
            n => format!(", {n} screened out"),
        };
        let bounded = match (self.gauge.layers_bounded, self.gauge.layers_regauged) {
            (0, 0) => String::new(),
            (0, g) => format!(", {g} layer updates regauged"),
            (b, 0) => format!(", {b} layers bounded"),
            (b, g) => format!(", {b} layers bounded, {g} layer updates regauged"),
        };
        format!(
            "round {}/{} [{}] {} of {} selected answered, {} missed, {} failed, {} rejects{}{}; {}; {}; {:.1}s, {:.2} MB up",
            self.round.0,
            total_rounds,
            self.strategy,
            self.participants.len(),
            self.selected.len(),
            self.missed.len(),
            self.failed.len(),
            rejects,
            screened,
            bounded,
            loss,
            if self.aggregated {
                format!("aggregated ({})", self.aggregation)
            } else if self.non_finite_aggregate {
                "aggregate not finite, global kept".to_string()
            } else if self.quorum_met {
                "aggregation failed".to_string()
            } else {
                format!("abandoned (quorum {} not met)", self.quorum)
            },
            self.duration_ms() as f64 / 1000.0,
            self.bytes_up as f64 / 1e6,
        )
    }
}

/// Run-wide counters (part of the checkpointed state).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub connections: u64,
    pub disconnects: u64,
    pub joins: u64,
    pub rounds_started: u64,
    /// Rounds that met their quorum and were aggregated.
    pub rounds_aggregated: u64,
    /// Rounds closed without quorum (no aggregation).
    pub rounds_abandoned: u64,
    pub updates_accepted: u64,
    pub round_failures: u64,
    pub out_of_memory: u64,
    /// Selected devices that had not answered when their round closed.
    pub missed: u64,
    /// Devices skipped at selection because no arm was feasible for them.
    pub no_feasible_arm: u64,
    pub heartbeats: u64,
    /// Frame bytes received from devices.
    pub bytes_received: u64,
    /// Bandit calls that failed (logged; the round goes on).
    pub bandit_errors: u64,
    /// Aggregations that failed (logged; the previous global adapter is kept).
    pub aggregation_errors: u64,
    /// Rejects sent, by reason kind.
    pub rejects: BTreeMap<String, u64>,
    /// Round aggregates that held non-finite values (the previous global adapter was kept).
    #[serde(default)]
    pub non_finite_aggregates: u64,
    /// Accepted updates whose reported sample count was clipped to the bound.
    #[serde(default)]
    pub samples_clipped: u64,
    /// Accepted updates that norm screening left out of their round's aggregate.
    #[serde(default)]
    pub updates_screened_out: u64,
}

impl Counters {
    /// Total rejects sent.
    pub fn total_rejects(&self) -> u64 {
        self.rejects.values().sum()
    }

    /// Rejects of one kind (see [`protocol::RejectReason::kind`]).
    pub fn rejects_of(&self, kind: &str) -> u64 {
        self.rejects.get(kind).copied().unwrap_or(0)
    }
}
