//! FedSpine's bandit: per-device (pruning ratio, LoRA rank) choice learned online, as pure logic.
//!
//! - [`arm`]: [`ArmSpace`] (ratio interval x allowed ranks, and its grids), [`DeviceContext`];
//!   [`Arm`] itself is `protocol::Arm`, the type the coordinator sends.
//! - [`policy`]: the [`Policy`] trait; S-UCB, UCB1, discounted and sliding-window UCB,
//!   Gaussian Thompson sampling, linear UCB (one reward model shared by every arm), EXP3,
//!   epsilon-greedy, fixed and uniform-random; the
//!   serializable [`PolicyConfig`] -> [`AnyPolicy`] pair used for configs and checkpoints.
//! - [`region`]: [`FeasibleRegion`], the arms a policy may still choose.
//! - [`feasibility`]: [`FeasibilityFilter`] learns per device which arms exceed its memory or
//!   deadline; [`Filtered`] makes any policy respect it.
//! - [`reward`]: [`shape_rewards`] turns one round's statistics into rewards in [0, 1].
//! - [`arena`]: synthetic and trace-replay environments and a runner that measures cumulative
//!   regret per policy (driven by the `bandit-arena` binary).
//!
//! Nothing here does I/O, reads a clock or creates a random generator: every random draw
//! comes from a `ChaCha8Rng` the caller passes in, so the same seed gives the same choices.
//!
//! A coordinator round, in short:
//!
//! ```
//! use bandit::{ArmSpace, DeviceContext, FeasibilityFilter, Filtered, Policy, PolicyConfig};
//! use rand::SeedableRng;
//! use rand_chacha::ChaCha8Rng;
//!
//! let space = ArmSpace::new(0.0, 0.6, vec![4, 8, 16, 32, 64])?;
//! let mut policy = Filtered::new(
//!     PolicyConfig::SUcb(Default::default()).build(&space)?,
//!     FeasibilityFilter::default(),
//! );
//! let mut rng = ChaCha8Rng::seed_from_u64(7);
//! let ctx = DeviceContext { device_id: 3, round: 0, ram_bytes: Some(4 << 30), deadline_ms: Some(60_000) };
//! let arm = policy.choose(&ctx, &mut rng)?;
//! // ... the device trains and reports its peak memory, duration and statistics ...
//! policy.record(arm, 3 << 30, 41_000, &ctx)?;
//! policy.observe(&ctx, arm, 0.7)?;
//! let checkpoint = serde_json::to_string(&policy).unwrap();
//! # Ok::<(), bandit::BanditError>(())
//! ```

pub mod arena;
pub mod arm;
pub mod error;
pub mod feasibility;
pub mod policy;
pub mod region;
pub mod reward;
pub mod sampling;

pub use arm::{Arm, ArmSpace, DeviceContext};
pub use error::BanditError;
pub use feasibility::{
    Exclusion, FeasibilityConfig, FeasibilityFilter, Filtered, InfeasibleReason,
};
pub use policy::{AnyPolicy, Policy, PolicyConfig};
pub use region::FeasibleRegion;
pub use reward::{shape_rewards, RewardWeights, RoundStats};
