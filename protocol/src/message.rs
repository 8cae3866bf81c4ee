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
    /// and the device id of the client certificate (a device cannot claim another's id); and a
    /// device class, when given, that [`check_device_class`] accepts.
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
        if let Some(class) = &self.capabilities.device_class {
            check_device_class(class).map_err(RejectReason::BadDeviceClass)?;
        }
        let backend = self.capabilities.backend.chars().count();
        if backend > MAX_BACKEND_CHARS {
            return Err(RejectReason::Malformed(format!(
                "backend name of {backend} characters (at most {MAX_BACKEND_CHARS})"
            )));
        }
        Ok(())
    }
}

/// Longest backend name a join may carry, in characters (the aggregator keeps and checkpoints
/// it).
pub const MAX_BACKEND_CHARS: usize = 64;

/// Longest device class name, in characters.
pub const MAX_DEVICE_CLASS_CHARS: usize = 32;
/// The class of a device that named none.
pub const UNKNOWN_DEVICE_CLASS: &str = "unknown";

/// Checks a device class name: 1 to [`MAX_DEVICE_CLASS_CHARS`] characters of `a-z`, `0-9`,
/// `.`, `_` and `-` (a Prometheus label value and a file-name-safe word). The error says what is
/// wrong and quotes at most the first 32 characters of the name, escaped.
pub fn check_device_class(class: &str) -> Result<(), String> {
    let shown = || {
        let head: String = class.chars().take(MAX_DEVICE_CLASS_CHARS).collect();
        let more = if class.chars().count() > MAX_DEVICE_CLASS_CHARS {
            "..."
        } else {
            ""
        };
        format!("\"{}\"{more}", head.escape_default())
    };
    if class.is_empty() {
        return Err("device class is empty".into());
    }
    let chars = class.chars().count();
    if chars > MAX_DEVICE_CLASS_CHARS {
        return Err(format!(
            "device class {} has {chars} characters (at most {MAX_DEVICE_CLASS_CHARS})",
            shown()
        ));
    }
    if let Some(bad) = class
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "device class {} holds {:?}: only a-z, 0-9, '.', '_' and '-' are allowed",
            shown(),
            bad
        ));
    }
    Ok(())
}

/// What a device tells the aggregator about itself; no speed is assumed beyond this.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Capabilities {
    pub ram_bytes: u64,
    /// Compute backend name, e.g. `flex` or `wgpu`.
    pub backend: String,
    /// Optional result of a local micro-benchmark (higher is faster).
    pub bench_score: Option<f32>,
    /// What kind of board this is (`jetson-nx`, `rpi5`, ...), as its operator named it: 1 to
    /// [`MAX_DEVICE_CLASS_CHARS`] characters of `[a-z0-9._-]` ([`check_device_class`]); a Join
    /// with any other name is refused. `None`: [`UNKNOWN_DEVICE_CLASS`].
    pub device_class: Option<String>,
}

impl Capabilities {
    /// The device class, [`UNKNOWN_DEVICE_CLASS`] when none was given.
    pub fn class(&self) -> &str {
        self.device_class.as_deref().unwrap_or(UNKNOWN_DEVICE_CLASS)
    }
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
    /// How often the device should send a [`Heartbeat`] while it works (0: never). A device
    /// beats at most once per [`MIN_HEARTBEAT_INTERVAL_MS`] whatever this says.
    pub heartbeat_interval_ms: u64,
}

impl Welcome {
    /// The heartbeat interval a device keeps: 0 (no heartbeats) as it is, anything shorter
    /// than [`MIN_HEARTBEAT_INTERVAL_MS`] raised to it.
    pub fn kept_heartbeat_ms(&self) -> u64 {
        match self.heartbeat_interval_ms {
            0 => 0,
            ms => ms.max(MIN_HEARTBEAT_INTERVAL_MS),
        }
    }
}

/// The shortest heartbeat interval: an aggregator configured below it is refused, and a device
/// told a shorter one (a hostile or broken aggregator) beats at this interval instead. A beat a
/// second is more often than a deployment needs (the shipped configs beat every 5 to 600 s) and
/// well under the server's per-connection message rate (20 a second by default).
pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 1_000;

/// The bandit's choice for one device in one round: a pruning ratio and a LoRA `rank`. The one
/// arm type of the workspace: the bandit plays it, the coordinator sends it.
///
/// What the ratio means depends on the round's [`RoundConfig::target_sparsity`] (see
/// [`SparsityGoal`]): with a run target s*, it is the round's *pace*, the share of the
/// remaining gap to s* the device closes this round; without one, the device's sparsity
/// target after this round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct Arm {
    /// The round's pace in `[0, 1]` (with a run target) or its sparsity target in `[0, 1)`
    /// (without one); pruning is monotone on the device either way.
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

/// Largest target sparsity a run may set: a device keeps at least a tenth of its prunable
/// parameters.
pub const MAX_TARGET_SPARSITY: f64 = 0.9;

/// Sparsities this close count as equal: a device this close below s* is at s*, and a round
/// whose goal would leave less than this of the gap closes it. (One query head of SmolLM2-135M
/// is about 0.14% of its non-embedding parameters, one MLP channel about 0.002%.)
pub const SPARSITY_TOLERANCE: f64 = 0.005;

/// How far a device prunes in one round: the arm's ratio read against the run's target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SparsityGoal {
    /// No run target: reach this sparsity by the end of the round (a target at or below the
    /// device's current sparsity means no further pruning).
    Absolute(f64),
    /// Close the share `pace` of the remaining gap to the run's target sparsity `target`
    /// this round: the round's goal is `s_now + pace * (target - s_now)`. A pace of 1 closes
    /// the whole gap, a pace of 0 prunes nothing; a device at or past `target` prunes nothing.
    Paced { target: f64, pace: f64 },
}

impl SparsityGoal {
    /// The goal of a round with `arm` and the run's `target_sparsity`.
    pub fn of(arm: &Arm, target_sparsity: Option<f64>) -> SparsityGoal {
        match target_sparsity {
            Some(target) => SparsityGoal::Paced {
                target,
                pace: arm.prune_ratio,
            },
            None => SparsityGoal::Absolute(arm.prune_ratio),
        }
    }

    /// Why the goal is out of range (naming the value and the range), or `Ok`: an absolute
    /// target in `[0, 1)`, a run target in `[0, MAX_TARGET_SPARSITY]`, a pace in `[0, 1]`.
    pub fn check(&self) -> Result<(), String> {
        let within = |what: &str, v: f64, lo: f64, hi: f64, closed: bool| {
            let ok = v.is_finite() && v >= lo && (v < hi || (closed && v == hi));
            if ok {
                Ok(())
            } else {
                let close = if closed { ']' } else { ')' };
                Err(format!("{what} {v} is not in [{lo}, {hi}{close}"))
            }
        };
        match *self {
            SparsityGoal::Absolute(r) => within("prune ratio", r, 0.0, 1.0, false),
            SparsityGoal::Paced { target, pace } => {
                within("target sparsity", target, 0.0, MAX_TARGET_SPARSITY, true)?;
                within("pruning pace", pace, 0.0, 1.0, true)
            }
        }
    }

    /// The sparsity a device at `current` should reach by the end of the round. At or below
    /// `current` means no further pruning. A paced goal that would leave less than
    /// [`SPARSITY_TOLERANCE`] of the gap closes it; a device within the tolerance of the target
    /// is at it.
    pub fn round_target(&self, current: f64) -> f64 {
        match *self {
            SparsityGoal::Absolute(r) => r,
            SparsityGoal::Paced { target, pace } => {
                if current >= target - SPARSITY_TOLERANCE || pace <= 0.0 {
                    return current;
                }
                let goal = current + pace.min(1.0) * (target - current);
                if target - goal < SPARSITY_TOLERANCE {
                    target
                } else {
                    goal
                }
            }
        }
    }

    /// The run's target sparsity, if the goal is paced.
    pub fn target(&self) -> Option<f64> {
        match *self {
            SparsityGoal::Absolute(_) => None,
            SparsityGoal::Paced { target, .. } => Some(target),
        }
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
    /// The run's target sparsity s* in `[0, MAX_TARGET_SPARSITY]`: the arm's ratio is then
    /// the round's pace toward it ([`SparsityGoal::Paced`]). `None`: the arm's ratio is the
    /// round's sparsity target ([`SparsityGoal::Absolute`]).
    pub target_sparsity: Option<f64>,
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
    /// Settings only some strategies send (HetLoRA's rank self-pruning). Must stay the last
    /// field: it is encoded as the frame's last bytes, and not at all when nothing is set.
    #[serde(default)]
    pub options: RoundOptions,
}

impl RoundConfig {
    /// How far the device prunes this round.
    pub fn sparsity_goal(&self) -> SparsityGoal {
        SparsityGoal::of(&self.arm, self.target_sparsity)
    }
}

/// Optional settings of a round that only some strategies send. On the wire they cost nothing
/// when none is set: [`RoundOptions`] is the last field of [`RoundConfig`], which is the whole
/// of a `Message::RoundConfig` frame, so it is written as a tag byte and its settings only
/// when one is set, and read only when bytes remain in the frame. A round of any strategy
/// that sets none is therefore byte-for-byte the frame it was before the options existed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundOptions {
    /// HetLoRA's rank self-pruning (`hetlora` only).
    pub rank_pruning: Option<RankPruning>,
}

/// Tag byte of [`RoundOptions`] with `rank_pruning` set.
const OPTIONS_RANK_PRUNING: u8 = 1;

impl Encode for RoundOptions {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        match &self.rank_pruning {
            None => Ok(()),
            Some(rp) => {
                OPTIONS_RANK_PRUNING.encode(encoder)?;
                rp.encode(encoder)
            }
        }
    }
}

impl<Context> Decode<Context> for RoundOptions {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        use bincode::de::read::Reader;
        // The frame codec decodes from a slice, whose reader can tell whether bytes remain.
        if decoder.reader().peek_read(1).is_none() {
            return Ok(RoundOptions::default());
        }
        match u8::decode(decoder)? {
            OPTIONS_RANK_PRUNING => Ok(RoundOptions {
                rank_pruning: Some(RankPruning::decode(decoder)?),
            }),
            tag => Err(bincode::error::DecodeError::OtherString(format!(
                "unknown round option tag {tag}"
            ))),
        }
    }
}

bincode::impl_borrow_decode!(RoundOptions);

/// HetLoRA's rank self-pruning for one round (Cho et al., 2024, "Heterogeneous LoRA for
/// Federated Fine-tuning of On-Device Foundation Models"): local training adds the regulariser
/// `reg * sum over layers of (|A_tail|_F + |B_tail|_F)`, where the tail is the last
/// `tail_len(rank)` rank components, pushing them toward zero; after training the device drops
/// the tail when its share of the adapter's delta norm, `|s B_tail A_tail|_F / |s B A|_F` over
/// all layers, is below `gamma`, and reports the reduced rank. The server keeps the reduced
/// rank for the device's later rounds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct RankPruning {
    /// Weight of the tail regulariser (lambda), at least 0.
    pub reg: f32,
    /// The tail is dropped when its share of the delta norm is below this, in `[0, 1)`.
    pub gamma: f32,
    /// Share of the rank that forms the tail, in `(0, 1)`: the tail is
    /// `max(1, floor(step * rank))` components (never the whole rank).
    pub step: f32,
}

impl RankPruning {
    /// Why the settings are out of range (naming the value and its range), or `Ok`.
    pub fn check(&self) -> Result<(), String> {
        let RankPruning { reg, gamma, step } = *self;
        if !(reg.is_finite() && reg >= 0.0) {
            return Err(format!("rank pruning reg {reg} is not a finite value >= 0"));
        }
        if !(gamma.is_finite() && (0.0..1.0).contains(&gamma)) {
            return Err(format!("rank pruning gamma {gamma} is not in [0, 1)"));
        }
        if !(step.is_finite() && step > 0.0 && step < 1.0) {
            return Err(format!("rank pruning step {step} is not in (0, 1)"));
        }
        Ok(())
    }

    /// Rank components in the tail of an adapter of `rank`: `max(1, floor(step * rank))`,
    /// and none for rank 1 (a rank is never pruned to 0).
    pub fn tail_len(&self, rank: u32) -> u32 {
        if rank <= 1 {
            return 0;
        }
        ((self.step as f64 * rank as f64).floor() as u32).clamp(1, rank - 1)
    }
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
    /// The Join named a device class [`check_device_class`] refuses (the text says why; a
    /// decoded reason may carry any text, empty included, which displays as a fixed sentence).
    #[error("{}", class_refusal_text(.0))]
    BadDeviceClass(String),
}

fn class_refusal_text(why: &str) -> &str {
    if why.trim().is_empty() {
        "the device class was refused (no reason given)"
    } else {
        why
    }
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
            RejectReason::BadDeviceClass(_) => "bad_device_class",
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
    fn a_paced_goal_closes_its_share_of_the_gap() {
        let goal = |pace| SparsityGoal::of(&Arm::new(pace, 4), Some(0.5));
        // Half the gap from 0.1: 0.1 + 0.5 * 0.4.
        assert!((goal(0.5).round_target(0.1) - 0.3).abs() < 1e-12);
        // A pace of 1 closes the whole gap; 0 prunes nothing.
        assert_eq!(goal(1.0).round_target(0.1), 0.5);
        assert_eq!(goal(0.0).round_target(0.1), 0.1);
        // At (or within the tolerance of) the target: nothing more.
        assert_eq!(goal(0.7).round_target(0.5), 0.5);
        assert_eq!(goal(0.7).round_target(0.498), 0.498);
        // A goal leaving less than the tolerance closes the gap.
        assert_eq!(goal(0.5).round_target(0.492), 0.5);
        // Repeated rounds at one pace approach s* geometrically and then stop within the
        // tolerance of it.
        let mut s = 0.0;
        for _ in 0..10 {
            s = goal(0.5).round_target(s);
        }
        assert!(s <= 0.5 && 0.5 - s <= SPARSITY_TOLERANCE, "{s}");
        // Without a run target the ratio is the round's own target.
        let absolute = SparsityGoal::of(&Arm::new(0.3, 4), None);
        assert_eq!(absolute.round_target(0.1), 0.3);
        assert_eq!(absolute.target(), None);
    }

    #[test]
    fn goal_ranges_are_checked_and_named() {
        let check = |ratio, target| SparsityGoal::of(&Arm::new(ratio, 4), target).check();
        assert_eq!(check(0.3, None), Ok(()));
        assert_eq!(check(1.0, Some(0.5)), Ok(()));
        assert_eq!(check(0.0, Some(MAX_TARGET_SPARSITY)), Ok(()));
        assert_eq!(
            check(1.0, None).unwrap_err(),
            "prune ratio 1 is not in [0, 1)"
        );
        assert_eq!(
            check(0.5, Some(0.95)).unwrap_err(),
            "target sparsity 0.95 is not in [0, 0.9]"
        );
        assert_eq!(
            check(1.5, Some(0.5)).unwrap_err(),
            "pruning pace 1.5 is not in [0, 1]"
        );
        assert_eq!(
            check(f64::NAN, Some(0.5)).unwrap_err(),
            "pruning pace NaN is not in [0, 1]"
        );
        assert_eq!(
            check(0.5, Some(-0.1)).unwrap_err(),
            "target sparsity -0.1 is not in [0, 0.9]"
        );
    }

    #[test]
    fn join_check_names_version_and_identity_faults() {
        let join = |v, id| Join {
            protocol_version: v,
            device_id: DeviceId(id),
            capabilities: Capabilities {
                ram_bytes: 1,
                backend: "flex".into(),
                bench_score: None,
                device_class: None,
            },
        };
        assert_eq!(join(crate::PROTOCOL_VERSION, 4).check(DeviceId(4)), Ok(()));
        assert_eq!(
            join(crate::PROTOCOL_VERSION + 1, 4)
                .check(DeviceId(4))
                .unwrap_err()
                .to_string(),
            "protocol version mismatch: aggregator speaks 2, device sent 3"
        );
        assert_eq!(
            join(crate::PROTOCOL_VERSION, 5)
                .check(DeviceId(4))
                .unwrap_err()
                .to_string(),
            "device id device-5 does not match the certificate's device-4"
        );
    }

    #[test]
    fn device_classes_are_short_lowercase_words() {
        for good in [
            "jetson-nx",
            "rpi5",
            "a",
            "pixel_8.pro",
            "x".repeat(32).as_str(),
        ] {
            assert_eq!(check_device_class(good), Ok(()), "{good}");
        }
        let cases = [
            ("", "device class is empty"),
            (
                "Jetson-NX",
                "device class \"Jetson-NX\" holds 'J': only a-z, 0-9, '.', '_' and '-' are allowed",
            ),
            (
                "rpi 5",
                "device class \"rpi 5\" holds ' ': only a-z, 0-9, '.', '_' and '-' are allowed",
            ),
            (
                "a\"}\nb",
                "device class \"a\\\"}\\nb\" holds '\"': only a-z, 0-9, '.', '_' and '-' are allowed",
            ),
            (
                "jétson",
                "device class \"j\\u{e9}tson\" holds 'é': only a-z, 0-9, '.', '_' and '-' are allowed",
            ),
        ];
        for (bad, message) in cases {
            assert_eq!(check_device_class(bad).unwrap_err(), message, "{bad:?}");
        }
        let long = "y".repeat(40);
        assert_eq!(
            check_device_class(&long).unwrap_err(),
            format!(
                "device class \"{}\"... has 40 characters (at most 32)",
                "y".repeat(32)
            )
        );
        let join = |class: Option<&str>| Join {
            protocol_version: crate::PROTOCOL_VERSION,
            device_id: DeviceId(3),
            capabilities: Capabilities {
                ram_bytes: 1,
                backend: "flex".into(),
                bench_score: None,
                device_class: class.map(str::to_string),
            },
        };
        assert_eq!(join(None).check(DeviceId(3)), Ok(()));
        assert_eq!(join(None).capabilities.class(), UNKNOWN_DEVICE_CLASS);
        assert_eq!(join(Some("rpi5")).check(DeviceId(3)), Ok(()));
        assert_eq!(join(Some("rpi5")).capabilities.class(), "rpi5");
        let refused = join(Some("RPi 5")).check(DeviceId(3)).unwrap_err();
        assert_eq!(refused.kind(), "bad_device_class");
        assert_eq!(
            refused.to_string(),
            "device class \"RPi 5\" holds 'R': only a-z, 0-9, '.', '_' and '-' are allowed"
        );
    }

    #[test]
    fn every_reject_reason_says_something_even_with_empty_peer_text() {
        // A decoded Reject carries whatever text its sender chose, empty included (the
        // decode_validate fuzzer's finding: a bare "{0}" displayed as nothing).
        let empty = String::new;
        let reasons = [
            RejectReason::Malformed(empty()),
            RejectReason::Unexpected(empty()),
            RejectReason::Unsupported(empty()),
            RejectReason::BadDeviceClass(empty()),
        ];
        for reason in reasons {
            assert!(!reason.to_string().trim().is_empty(), "{}", reason.kind());
        }
    }
}
