//! The one place the coordinator converts between the wire's arm (`protocol::Arm`, what a
//! device is told and what summaries show) and the bandit's arm (`bandit::Arm`, what policies
//! learn on). Both are a (pruning ratio, LoRA rank) pair.

/// The bandit's arm for the arm a device was sent.
pub(super) fn bandit_arm(arm: protocol::Arm) -> bandit::Arm {
    bandit::Arm::new(arm.prune_ratio, arm.rank)
}

/// The arm to send a device for the one its bandit chose.
pub(super) fn wire_arm(arm: bandit::Arm) -> protocol::Arm {
    protocol::Arm {
        prune_ratio: arm.prune_ratio,
        rank: arm.rank,
    }
}
