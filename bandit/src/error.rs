//! The crate's single error type, `BanditError`: every way a caller can hand the bandit bad input.

use protocol::Arm;

/// Everything that can go wrong when building or driving a policy.
///
/// A method that returns one of these has left the policy (or filter) exactly as it was before
/// the call: inputs are validated before any state changes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BanditError {
    /// The arm space has no allowed LoRA rank.
    #[error("empty arm space: the allowed rank set is empty")]
    EmptyRankSet,
    /// A discretisation was asked for zero points.
    #[error("empty arm grid: {what} must be at least 1, got 0")]
    EmptyGrid { what: &'static str },
    /// The pruning-ratio range is not a finite, ordered sub-interval of [0, 1].
    #[error("invalid pruning-ratio range [{min}, {max}]: need finite 0 <= min <= max <= 1")]
    InvalidRatioRange { min: f64, max: f64 },
    /// A LoRA rank of zero was listed.
    #[error("invalid LoRA rank {rank}: ranks must be at least 1")]
    InvalidRank { rank: u32 },
    /// A reward was NaN or infinite.
    #[error("non-finite reward {reward} for arm {arm}")]
    NonFiniteReward { arm: Arm, reward: f64 },
    /// A reward was outside the range the policy needs (EXP3 needs [0, 1]).
    #[error("reward {reward} for arm {arm} is outside [{min}, {max}], which this policy requires")]
    RewardOutOfRange {
        arm: Arm,
        reward: f64,
        min: f64,
        max: f64,
    },
    /// The arm is not part of the policy's arm space (or of its grid, for grid policies).
    #[error("unknown arm {arm}: {reason}")]
    UnknownArm { arm: Arm, reason: String },
    /// Every arm has been learned to be infeasible for this device.
    #[error(
        "no feasible arm left for device {device_id}: every arm exceeded its memory or deadline"
    )]
    NoFeasibleArm { device_id: u64 },
    /// A configuration parameter is out of its allowed range.
    #[error("invalid parameter {name} = {value}: expected {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A round statistic was NaN or infinite (or negative where it cannot be).
    #[error("round statistics for entry {index}: {field} = {value} is not valid ({expected})")]
    InvalidStat {
        index: usize,
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    /// A reward trace could not be parsed.
    #[error("reward trace line {line}: {message}")]
    TraceParse { line: usize, message: String },
}

impl BanditError {
    pub(crate) fn param(name: &'static str, value: impl ToString, expected: &'static str) -> Self {
        BanditError::InvalidParameter {
            name,
            value: value.to_string(),
            expected,
        }
    }
}
