//! The open round as the coordinator tracks it: who was selected with which arm, how each
//! selected device's round ended so far, and the round's streaming aggregation.

use std::collections::BTreeMap;

use bandit::DeviceContext;
use protocol::{DeviceId, KeptIndices, RoundId, Timestamp, UpdateStats};

use crate::aggregate::Aggregation;

/// How a selected device's round ended (so far).
#[derive(Clone, Debug)]
pub(super) enum Outcome {
    /// No answer yet.
    Pending,
    /// Its update was accepted.
    Completed(Box<Completed>),
    /// It reported a failure, or its update was refused.
    Failed { kind: String, reason: String },
}

/// What the coordinator keeps of an accepted update (its factors went to the aggregation, which
/// norm screening may still leave out at close).
#[derive(Clone, Debug)]
pub(super) struct Completed {
    pub(super) stats: UpdateStats,
    pub(super) kept: KeptIndices,
    /// Rank of the accepted adapter (below the round's after rank self-pruning).
    pub(super) rank: u32,
    /// From the round start to the update's arrival.
    pub(super) duration_ms: u64,
    pub(super) bytes_up: u64,
    /// `|s B A|_F` of the update, before clipping.
    pub(super) delta_norm: f64,
}

/// A selected device of the open round.
#[derive(Clone, Debug)]
pub(super) struct Participant {
    pub(super) arm: protocol::Arm,
    /// The rank it was sent: the arm's, or lower where the strategy caps it at the rank the
    /// device self-pruned to.
    pub(super) rank: u32,
    /// What its bandit chose the arm with (and learns the reward with).
    pub(super) ctx: DeviceContext,
    /// The round seed the device was sent.
    pub(super) seed: u64,
    /// The device's sparsity before the round.
    pub(super) sparsity_prev: f64,
    pub(super) outcome: Outcome,
    /// Times its configuration was sent again after it reconnected (see
    /// `intake::MAX_RESENDS_PER_ROUND`).
    pub(super) resends: u32,
}

/// The round in progress.
pub(super) struct OpenRound {
    pub(super) id: RoundId,
    pub(super) started_at: Timestamp,
    pub(super) deadline: Timestamp,
    pub(super) participants: BTreeMap<DeviceId, Participant>,
    /// Accepted updates, folded in as they arrive (held until close with norm screening).
    pub(super) aggregation: Aggregation,
    /// Accepted updates the round needs to be aggregated.
    pub(super) quorum: usize,
    /// Rejects during the round, by kind.
    pub(super) rejects: BTreeMap<String, u64>,
    /// Accepted updates whose sample count was clipped.
    pub(super) samples_clipped: u64,
}

impl OpenRound {
    /// Participants whose update was accepted.
    pub(super) fn accepted(&self) -> usize {
        self.participants
            .values()
            .filter(|p| matches!(p.outcome, Outcome::Completed(_)))
            .count()
    }
}
