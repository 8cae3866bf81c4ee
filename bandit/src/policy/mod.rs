//! The `Policy` trait, the serializable `PolicyConfig`/`AnyPolicy` pair, and helpers shared by policies.

mod epsilon_greedy;
mod exp3;
mod fixed;
mod grid;
mod linear;
mod sucb;
mod thompson;
mod ucb;

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::region::FeasibleRegion;

pub use epsilon_greedy::{EpsilonGreedy, EpsilonGreedyConfig};
pub use exp3::{Exp3, Exp3Config};
pub use fixed::{Fixed, FixedConfig, UniformRandom, UniformRandomConfig};
pub use grid::ArmGrid;
pub use linear::{LinearUcb, LinearUcbConfig};
pub use sucb::{SUcb, SUcbConfig};
pub use thompson::{Thompson, ThompsonConfig};
pub use ucb::{
    DiscountedUcb, DiscountedUcbConfig, SlidingWindowUcb, SlidingWindowUcbConfig, Ucb1, Ucb1Config,
};

/// A bandit policy: picks an arm for a device, learns from the reward it earned.
///
/// Policies are pure: every random draw comes from the `rng` argument, and no method reads a
/// clock or does I/O. A call that returns `Err` leaves the policy unchanged.
pub trait Policy {
    /// Picks an arm for the device described by `ctx`.
    fn choose(&mut self, ctx: &DeviceContext, rng: &mut ChaCha8Rng) -> Result<Arm, BanditError> {
        self.choose_in(ctx, &FeasibleRegion::all(), rng)
    }

    /// Picks an arm inside `region` (arms outside it are never returned). Fails with
    /// [`BanditError::NoFeasibleArm`] when the region leaves nothing to play.
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError>;

    /// Learns that `arm`, played for `ctx`, earned `reward` (normally in [0, 1], see
    /// [`crate::reward::shape_rewards`]).
    fn observe(&mut self, ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError>;

    /// The arm inside `region` the policy currently believes best, without exploring: the
    /// highest mean reward among the arms played so far (S-UCB: a point of the cell reached by
    /// descending to the child with the higher mean). `None` when the policy has nothing to
    /// exploit yet (no feasible arm played) or does not keep reward estimates (fixed,
    /// uniform-random, EXP3): the caller then asks [`Policy::choose_in`]. Unlike `choose_in`
    /// it changes no state; `rng` only breaks ties.
    fn exploit_in(
        &self,
        _ctx: &DeviceContext,
        _region: &FeasibleRegion,
        _rng: &mut ChaCha8Rng,
    ) -> Option<Arm> {
        None
    }
}

impl<P: Policy + ?Sized> Policy for Box<P> {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        (**self).choose_in(ctx, region, rng)
    }

    fn observe(&mut self, ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        (**self).observe(ctx, arm, reward)
    }

    fn exploit_in(
        &self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Option<Arm> {
        (**self).exploit_in(ctx, region, rng)
    }
}

/// Which policy to run and with what parameters. TOML/JSON shape: a `kind` key naming the
/// policy plus that policy's fields, each optional (defaults on the config structs), e.g.
/// `{ kind = "s-ucb", nu = 1.0, rho = 0.5 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PolicyConfig {
    /// The paper's HOO-style tree over the continuous space.
    SUcb(SUcbConfig),
    Ucb1(Ucb1Config),
    DiscountedUcb(DiscountedUcbConfig),
    SlidingWindowUcb(SlidingWindowUcbConfig),
    Thompson(ThompsonConfig),
    /// One reward model, additive in pace and rank, shared by every arm (LinUCB).
    LinearUcb(LinearUcbConfig),
    Exp3(Exp3Config),
    EpsilonGreedy(EpsilonGreedyConfig),
    Fixed(FixedConfig),
    /// Uniformly random arms: the reference every adaptive policy must beat.
    UniformRandom(UniformRandomConfig),
}

impl PolicyConfig {
    /// Every policy with its default parameters, in a stable order.
    pub fn all_defaults() -> Vec<PolicyConfig> {
        vec![
            PolicyConfig::SUcb(SUcbConfig::default()),
            PolicyConfig::Ucb1(Ucb1Config::default()),
            PolicyConfig::DiscountedUcb(DiscountedUcbConfig::default()),
            PolicyConfig::SlidingWindowUcb(SlidingWindowUcbConfig::default()),
            PolicyConfig::Thompson(ThompsonConfig::default()),
            PolicyConfig::LinearUcb(LinearUcbConfig::default()),
            PolicyConfig::Exp3(Exp3Config::default()),
            PolicyConfig::EpsilonGreedy(EpsilonGreedyConfig::default()),
            PolicyConfig::Fixed(FixedConfig::default()),
            PolicyConfig::UniformRandom(UniformRandomConfig::default()),
        ]
    }

    /// The `kind` tag, e.g. `"sliding-window-ucb"`.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyConfig::SUcb(_) => "s-ucb",
            PolicyConfig::Ucb1(_) => "ucb1",
            PolicyConfig::DiscountedUcb(_) => "discounted-ucb",
            PolicyConfig::SlidingWindowUcb(_) => "sliding-window-ucb",
            PolicyConfig::Thompson(_) => "thompson",
            PolicyConfig::LinearUcb(_) => "linear-ucb",
            PolicyConfig::Exp3(_) => "exp3",
            PolicyConfig::EpsilonGreedy(_) => "epsilon-greedy",
            PolicyConfig::Fixed(_) => "fixed",
            PolicyConfig::UniformRandom(_) => "uniform-random",
        }
    }

    /// Whether the policy learns from rewards (everything but `fixed` and `uniform-random`).
    pub fn is_adaptive(&self) -> bool {
        !matches!(
            self,
            PolicyConfig::Fixed(_) | PolicyConfig::UniformRandom(_)
        )
    }

    /// Validates the parameters and the space and builds a fresh policy.
    pub fn build(&self, space: &ArmSpace) -> Result<AnyPolicy, BanditError> {
        space.validate()?;
        Ok(match self {
            PolicyConfig::SUcb(c) => AnyPolicy::SUcb(SUcb::new(space.clone(), *c)?),
            PolicyConfig::Ucb1(c) => AnyPolicy::Ucb1(Ucb1::new(space.clone(), *c)?),
            PolicyConfig::DiscountedUcb(c) => {
                AnyPolicy::DiscountedUcb(DiscountedUcb::new(space.clone(), *c)?)
            }
            PolicyConfig::SlidingWindowUcb(c) => {
                AnyPolicy::SlidingWindowUcb(SlidingWindowUcb::new(space.clone(), *c)?)
            }
            PolicyConfig::Thompson(c) => AnyPolicy::Thompson(Thompson::new(space.clone(), *c)?),
            PolicyConfig::LinearUcb(c) => AnyPolicy::LinearUcb(LinearUcb::new(space.clone(), *c)?),
            PolicyConfig::Exp3(c) => AnyPolicy::Exp3(Exp3::new(space.clone(), *c)?),
            PolicyConfig::EpsilonGreedy(c) => {
                AnyPolicy::EpsilonGreedy(EpsilonGreedy::new(space.clone(), *c)?)
            }
            PolicyConfig::Fixed(c) => AnyPolicy::Fixed(Fixed::new(space.clone(), *c)?),
            PolicyConfig::UniformRandom(c) => {
                AnyPolicy::UniformRandom(UniformRandom::new(space.clone(), *c)?)
            }
        })
    }
}

/// Any policy with its complete learned state. Serialize it to checkpoint; a deserialized
/// value continues exactly where the original stopped (same choices for the same rng).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AnyPolicy {
    SUcb(SUcb),
    Ucb1(Ucb1),
    DiscountedUcb(DiscountedUcb),
    SlidingWindowUcb(SlidingWindowUcb),
    Thompson(Thompson),
    LinearUcb(LinearUcb),
    Exp3(Exp3),
    EpsilonGreedy(EpsilonGreedy),
    Fixed(Fixed),
    UniformRandom(UniformRandom),
}

macro_rules! each_policy {
    ($value:expr, $p:ident => $body:expr) => {
        match $value {
            AnyPolicy::SUcb($p) => $body,
            AnyPolicy::Ucb1($p) => $body,
            AnyPolicy::DiscountedUcb($p) => $body,
            AnyPolicy::SlidingWindowUcb($p) => $body,
            AnyPolicy::Thompson($p) => $body,
            AnyPolicy::LinearUcb($p) => $body,
            AnyPolicy::Exp3($p) => $body,
            AnyPolicy::EpsilonGreedy($p) => $body,
            AnyPolicy::Fixed($p) => $body,
            AnyPolicy::UniformRandom($p) => $body,
        }
    };
}

impl AnyPolicy {
    /// The `kind` tag of the policy's config.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyPolicy::SUcb(_) => "s-ucb",
            AnyPolicy::Ucb1(_) => "ucb1",
            AnyPolicy::DiscountedUcb(_) => "discounted-ucb",
            AnyPolicy::SlidingWindowUcb(_) => "sliding-window-ucb",
            AnyPolicy::Thompson(_) => "thompson",
            AnyPolicy::LinearUcb(_) => "linear-ucb",
            AnyPolicy::Exp3(_) => "exp3",
            AnyPolicy::EpsilonGreedy(_) => "epsilon-greedy",
            AnyPolicy::Fixed(_) => "fixed",
            AnyPolicy::UniformRandom(_) => "uniform-random",
        }
    }

    pub fn arm_space(&self) -> &ArmSpace {
        each_policy!(self, p => p.arm_space())
    }
}

impl Policy for AnyPolicy {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        each_policy!(self, p => p.choose_in(ctx, region, rng))
    }

    fn observe(&mut self, ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        each_policy!(self, p => p.observe(ctx, arm, reward))
    }

    fn exploit_in(
        &self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Option<Arm> {
        each_policy!(self, p => p.exploit_in(ctx, region, rng))
    }
}

/// Rejects NaN and infinite rewards.
pub(crate) fn check_reward(arm: &Arm, reward: f64) -> Result<(), BanditError> {
    if reward.is_finite() {
        Ok(())
    } else {
        Err(BanditError::NonFiniteReward { arm: *arm, reward })
    }
}

/// Checks a finite parameter lies in `[lo, hi]`.
pub(crate) fn check_range(
    name: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
    expected: &'static str,
) -> Result<(), BanditError> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(())
    } else {
        Err(BanditError::param(name, value, expected))
    }
}
