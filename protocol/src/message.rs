//! The messages devices and the aggregator exchange, and the reasons a message is rejected.

use std::fmt;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterPayload, KeptIndices, ModelDims};
use crate::ids::{DeviceId, RoundId};

/// Every message on the wire; one [`Message`] per frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub enum Message {
    Join(Join),
    Welcome(Welcome),
    RoundConfig(RoundConfig),
    Update(Update),
    Ack(Ack),
    Reject(Reject),
    Heartbeat(Heartbeat),
    Bye(Bye),
    RoundFailed(RoundFailed),
}

impl Message {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Join(_) => "join",
            Message::Welcome(_) => "welcome",
            Message::RoundConfig(_) => "round_config",
            Message::Update(_) => "update",
            Message::Ack(_) => "ack",
            Message::Reject(_) => "reject",
            Message::Heartbeat(_) => "heartbeat",
            Message::Bye(_) => "bye",
            Message::RoundFailed(_) => "round_failed",
        }
    }
}

/// Device -> aggregator: first message on a connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Join {
    /// The sender's [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// Must match the identity in the client certificate.
    pub device_id: DeviceId,
    pub capabilities: Capabilities,
}

impl Join {
    /// Checks a join against the identity the transport certified: the same protocol version
    /// and the device id of the client certificate (a device cannot claim another's id).
    pub fn check(&self, certified: DeviceId) -> Result<(), RejectReason> {
        if self.protocol_version != crate::PROTOCOL_VERSION {
            return Err(RejectReason::VersionMismatch {
                ours: crate::PROTOCOL_VERSION,
                theirs: self.protocol_version,
            });
        }
        if self.device_id != certified {
            return Err(RejectReason::IdentityMismatch {
                claimed: self.device_id,
                certified,
            });
        }
        Ok(())
    }
}

/// What a device tells the aggregator about itself; no speed is assumed beyond this.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Capabilities {
    pub ram_bytes: u64,
    /// Compute backend name, e.g. `flex` or `wgpu`.
    pub backend: String,
    /// Optional result of a local micro-benchmark (higher is faster).
    pub bench_score: Option<f32>,
}

/// Aggregator -> device: the join was accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Welcome {
    pub protocol_version: u16,
    pub device_id: DeviceId,
    /// The model every participant must hold (full, unpruned dimensions).
    pub model: ModelDims,
    /// LoRA alpha used by every adapter (scale = alpha / rank).
    pub lora_alpha: f32,
    /// How often the device should send a [`Heartbeat`] while it works.
    pub heartbeat_interval_ms: u64,
}

/// The bandit's choice for one device in one round: prune to `prune_ratio` and train LoRA with
/// `rank`. The one arm type of the workspace: the bandit plays it, the coordinator sends it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Arm {
    /// Sparsity target after this round, a fraction in `[0, 1]`; monotone on the device.
    pub prune_ratio: f64,
    /// LoRA rank for this round.
    pub rank: u32,
}

impl Arm {
    pub fn new(prune_ratio: f64, rank: u32) -> Self {
        Arm { prune_ratio, rank }
    }
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(ratio {}, rank {})", self.prune_ratio, self.rank)
    }
}

/// The slice of the global adapter a device starts its round from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct GlobalSlice {
    /// Factors cut to `kept` and to the round's rank.
    pub adapter: AdapterPayload,
    /// The kept indices the slice was cut for (the device's last reported ones).
    pub kept: KeptIndices,
    /// Components `[filled_rank, rank)` are zero padding (the global adapter had a lower rank):
    /// the device re-initialises those rows of `A` before training.
    pub filled_rank: u32,
}

/// Aggregator -> device: train this round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct RoundConfig {
    pub round: RoundId,
    pub arm: Arm,
    /// `None` when the device should keep (or freshly initialise) its own adapter.
    pub global: Option<GlobalSlice>,
    /// Time budget for the round in milliseconds, counted from when the device receives this.
    pub deadline_ms: u64,
    pub local_steps: u32,
    /// Prune toward the target every this many local steps.
    pub prune_interval_steps: u32,
    pub learning_rate: f32,
    pub batch_size: u32,
    /// Seed for the device's round-local randomness (batch order, re-initialised rows).
    pub seed: u64,
}

/// Run statistics of one device round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct UpdateStats {
    /// Held-out loss before local training.
    pub loss_pre: f32,
    /// Held-out loss after local training.
    pub loss_post: f32,
    /// Fraction of non-embedding parameters removed, in `[0, 1]`.
    pub sparsity: f32,
    /// Total parameters of the pruned model.
    pub param_count: u64,
    pub compute_ms: u64,
    /// Bytes the device received for this round (its round configuration).
    pub bytes_down: u64,
    /// Bytes of the device's encoded update.
    pub bytes_up: u64,
    pub peak_mem_bytes: u64,
    /// Training samples seen (the data-size weight of the update).
    pub samples: u64,
    pub steps: u32,
}

/// Device -> aggregator: the result of a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Update {
    pub round: RoundId,
    pub adapter: AdapterPayload,
    pub kept: KeptIndices,
    pub stats: UpdateStats,
}

/// Aggregator -> device: the update for `round` was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Ack {
    pub round: RoundId,
}

/// Aggregator -> device: a message was refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Reject {
    /// The round the refused message was about, when it had one.
    pub round: Option<RoundId>,
    pub reason: RejectReason,
}

/// Why the aggregator refused a message. The display text is meant for logs and operators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode, thiserror::Error)]
pub enum RejectReason {
    #[error("protocol version mismatch: aggregator speaks {ours}, device sent {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("unknown device {0}")]
    UnknownDevice(DeviceId),
    #[error("device id {claimed} does not match the certificate's {certified}")]
    IdentityMismatch {
        claimed: DeviceId,
        certified: DeviceId,
    },
    #[error("device {0} is already connected")]
    AlreadyConnected(DeviceId),
    #[error("the device has not joined")]
    NotJoined,
    #[error("device was not selected for {0}")]
    NotSelected(RoundId),
    #[error("update for {got} is stale: the current round is {current}")]
    StaleRound { got: RoundId, current: RoundId },
    #[error("update for {0} arrived after the round closed")]
    LateUpdate(RoundId),
    #[error("duplicate update for {0}")]
    DuplicateUpdate(RoundId),
    #[error("malformed update: {0}")]
    Malformed(String),
    #[error("update contains non-finite values")]
    NonFinite,
    #[error("update norm {norm} exceeds the limit {limit}")]
    NormTooLarge { norm: f64, limit: f64 },
    #[error("message of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge { bytes: u64, limit: u64 },
    #[error("unexpected {0} message")]
    Unexpected(String),
    #[error("the aggregator is shutting down")]
    ShuttingDown,
    #[error("the aggregator cannot use this device: {0}")]
    Unsupported(String),
}

impl RejectReason {
    /// A short, stable name for counters and metrics (`stale_round`, `non_finite`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            RejectReason::VersionMismatch { .. } => "version_mismatch",
            RejectReason::UnknownDevice(_) => "unknown_device",
            RejectReason::IdentityMismatch { .. } => "identity_mismatch",
            RejectReason::AlreadyConnected(_) => "already_connected",
            RejectReason::NotJoined => "not_joined",
            RejectReason::NotSelected(_) => "not_selected",
            RejectReason::StaleRound { .. } => "stale_round",
            RejectReason::LateUpdate(_) => "late_update",
            RejectReason::DuplicateUpdate(_) => "duplicate_update",
            RejectReason::Malformed(_) => "malformed",
            RejectReason::NonFinite => "non_finite",
            RejectReason::NormTooLarge { .. } => "norm_too_large",
            RejectReason::TooLarge { .. } => "too_large",
            RejectReason::Unexpected(_) => "unexpected",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::Unsupported(_) => "unsupported",
        }
    }
}

/// Device -> aggregator: the device could not run its local round (instead of an [`Update`]).
/// The aggregator counts the round as failed for the device (reward 0); an
/// [`FailReason::OutOfMemory`] also teaches the device's feasibility filter that the arm (and
/// every costlier one) does not fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct RoundFailed {
    pub round: RoundId,
    pub reason: FailReason,
}

/// Why a device could not run its local round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode, thiserror::Error)]
pub enum FailReason {
    /// The round needed more memory than the device has.
    #[error("out of memory: the round needs {needed_bytes} bytes, the device has {ram_bytes}")]
    OutOfMemory { needed_bytes: u64, ram_bytes: u64 },
    /// Any other local failure (bad configuration, a training error), in words.
    #[error("local round failed: {0}")]
    Error(String),
}

/// Device -> aggregator: still alive (and how far along the current round it is).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Heartbeat {
    pub round: Option<RoundId>,
    pub steps_done: u32,
}

/// Either side: the connection is ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
pub struct Bye {
    pub reason: ByeReason,
}

/// Why a side says goodbye.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
pub enum ByeReason {
    /// The device leaves (shutdown, user request).
    Leaving,
    /// The aggregator shuts down.
    ServerShutdown,
    /// Training is complete; no more rounds.
    Finished,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_check_names_version_and_identity_faults() {
        let join = |v, id| Join {
            protocol_version: v,
            device_id: DeviceId(id),
            capabilities: Capabilities {
                ram_bytes: 1,
                backend: "flex".into(),
                bench_score: None,
            },
        };
        assert_eq!(join(crate::PROTOCOL_VERSION, 4).check(DeviceId(4)), Ok(()));
        assert_eq!(
            join(crate::PROTOCOL_VERSION + 1, 4)
                .check(DeviceId(4))
                .unwrap_err()
                .to_string(),
            "protocol version mismatch: aggregator speaks 1, device sent 2"
        );
        assert_eq!(
            join(crate::PROTOCOL_VERSION, 5)
                .check(DeviceId(4))
                .unwrap_err()
                .to_string(),
            "device id device-5 does not match the certificate's device-4"
        );
    }
}
