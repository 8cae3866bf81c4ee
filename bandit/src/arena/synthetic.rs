//! Synthetic environments: smooth 2-D reward surfaces per device class, optional drift, noise models and memory limits.
//!
//! A class's expected reward for arm `(p, r)` in round `t` is
//!
//! ```text
//! mu(p, r, t) = clamp(baseline + sum_b h_b(t) * exp(-(p - cp_b(t))^2 / (2 wp_b^2)
//!                                              - (log2 r - cr_b(t))^2 / (2 wr_b^2)), 0, 1)
//! ```
//!
//! where a drifting bump's centre `(cp, cr)` and height `h` move by `phase(t)` times its
//! drift's shifts; `phase` glides `(1 - cos(2 pi t / period_rounds)) / 2` or jumps between 0
//! and 1 every half period. An arm whose
//! peak memory `dense_bytes * (1 - p) + bytes_per_rank * r` exceeds the class's RAM fails
//! (reward 0). Observed rewards are `mu` plus noise, clipped to [0, 1] by default.

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Environment, Pull};
use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::sampling::{standard_normal, student_t, symmetric_pareto};

/// One Gaussian bump of a reward surface.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bump {
    /// Centre ratio.
    pub ratio: f64,
    /// Centre rank (compared on a log2 scale, so it may lie between allowed ranks).
    pub rank: f64,
    pub height: f64,
    /// Standard deviation along the ratio axis.
    pub width_ratio: f64,
    /// Standard deviation along the log2-rank axis.
    pub width_log2_rank: f64,
    /// How the bump moves over time (`None`: it stays put).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<Drift>,
}

/// A periodic move of a bump: at full phase its centre is shifted by `shift_ratio` and
/// `shift_log2_rank` and its height by `shift_height`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Drift {
    pub shift_ratio: f64,
    pub shift_log2_rank: f64,
    pub shift_height: f64,
    /// Rounds for the bump to go out and back. Default `2000`.
    pub period_rounds: f64,
    /// How it moves. Default `smooth`.
    pub shape: DriftShape,
}

impl Default for Drift {
    fn default() -> Self {
        Drift {
            shift_ratio: 0.0,
            shift_log2_rank: 0.0,
            shift_height: 0.0,
            period_rounds: 2000.0,
            shape: DriftShape::Smooth,
        }
    }
}

/// The path of a drifting centre over one period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriftShape {
    /// `phase = (1 - cos(2 pi t / period)) / 2`: glides out and back.
    #[default]
    Smooth,
    /// `phase = 0` in the first half of each period and `1` in the second: the optimum jumps.
    Step,
}

impl Drift {
    /// Fraction of the shift applied in `round`, in [0, 1].
    pub fn phase(&self, round: u64) -> f64 {
        let t = round as f64 / self.period_rounds;
        match self.shape {
            DriftShape::Smooth => (1.0 - (std::f64::consts::TAU * t).cos()) / 2.0,
            DriftShape::Step => {
                if t.fract() < 0.5 {
                    0.0
                } else {
                    1.0
                }
            }
        }
    }
}

/// A memory budget and a linear memory model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryLimit {
    pub ram_bytes: u64,
    /// Peak memory of the unpruned model without the adapter.
    pub dense_bytes: u64,
    /// Extra peak memory per unit of LoRA rank.
    pub bytes_per_rank: u64,
}

impl MemoryLimit {
    pub fn peak_bytes(&self, arm: &Arm) -> u64 {
        let dense = self.dense_bytes as f64 * (1.0 - arm.prune_ratio);
        (dense + self.bytes_per_rank as f64 * arm.rank as f64).round() as u64
    }

    /// Lowest ratio at which `rank` fits (may be above 1: never fits).
    fn min_ratio(&self, rank: u32) -> f64 {
        let room = self.ram_bytes as f64 - self.bytes_per_rank as f64 * rank as f64;
        if self.dense_bytes == 0 {
            return if room >= 0.0 { 0.0 } else { f64::INFINITY };
        }
        1.0 - room / self.dense_bytes as f64
    }
}

/// A group of devices sharing one reward surface.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceClass {
    pub name: String,
    /// Relative share of the devices. Default `1.0`.
    pub share: f64,
    /// Reward floor of the surface. Default `0.1`.
    pub baseline: f64,
    pub bumps: Vec<Bump>,
    pub memory: Option<MemoryLimit>,
}

impl Default for DeviceClass {
    fn default() -> Self {
        DeviceClass {
            name: "default".into(),
            share: 1.0,
            baseline: 0.1,
            bumps: vec![Bump {
                ratio: 0.42,
                rank: 32.0,
                height: 0.7,
                width_ratio: 0.15,
                width_log2_rank: 1.2,
                drift: None,
            }],
            memory: None,
        }
    }
}

impl DeviceClass {
    /// Expected reward of `arm` in `round`, ignoring memory.
    pub fn surface(&self, arm: &Arm, round: u64) -> f64 {
        let lr = (arm.rank as f64).log2();
        let sum: f64 = self
            .bumps
            .iter()
            .map(|b| {
                let (dp, dr, dh) = b.drift.map_or((0.0, 0.0, 0.0), |d| {
                    let phase = d.phase(round);
                    (
                        phase * d.shift_ratio,
                        phase * d.shift_log2_rank,
                        phase * d.shift_height,
                    )
                });
                let x = (arm.prune_ratio - b.ratio - dp) / b.width_ratio;
                let y = (lr - b.rank.log2() - dr) / b.width_log2_rank;
                (b.height + dh) * (-0.5 * (x * x + y * y)).exp()
            })
            .sum();
        (self.baseline + sum).clamp(0.0, 1.0)
    }

    /// Whether no bump drifts.
    pub fn is_stationary(&self) -> bool {
        self.bumps.iter().all(|b| b.drift.is_none())
    }

    pub fn fits(&self, arm: &Arm) -> bool {
        self.memory.is_none_or(|m| m.peak_bytes(arm) <= m.ram_bytes)
    }

    /// Expected reward including failures.
    pub fn expected(&self, arm: &Arm, round: u64) -> f64 {
        if self.fits(arm) {
            self.surface(arm, round)
        } else {
            0.0
        }
    }

    /// The best expected reward over the feasible part of `space` in `round`: a grid search
    /// over each rank's feasible ratios refined by golden-section search.
    pub fn optimum(&self, space: &ArmSpace, round: u64) -> f64 {
        let mut best = 0.0f64;
        for &rank in &space.ranks {
            let lo = match self.memory {
                Some(m) => m.min_ratio(rank).max(space.ratio_min),
                None => space.ratio_min,
            };
            let hi = space.ratio_max;
            if lo > hi {
                continue;
            }
            let f = |p: f64| {
                let arm = Arm::new(p, rank);
                if self.fits(&arm) {
                    self.surface(&arm, round)
                } else {
                    0.0
                }
            };
            const STEPS: usize = 200;
            let step = (hi - lo) / STEPS as f64;
            let (mut best_p, mut best_v) = (lo, f(lo));
            for k in 1..=STEPS {
                let p = if k == STEPS { hi } else { lo + step * k as f64 };
                let v = f(p);
                if v > best_v {
                    (best_p, best_v) = (p, v);
                }
            }
            // Golden-section refinement around the best grid point.
            let (mut a, mut b) = ((best_p - step).max(lo), (best_p + step).min(hi));
            let g = (5f64.sqrt() - 1.0) / 2.0;
            for _ in 0..60 {
                let c = b - g * (b - a);
                let d = a + g * (b - a);
                if f(c) >= f(d) {
                    b = d;
                } else {
                    a = c;
                }
            }
            best = best.max(best_v).max(f((a + b) / 2.0));
        }
        best
    }
}

/// Observation noise added to the expected reward.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Noise {
    None,
    Gaussian {
        std: f64,
    },
    /// `scale` times a Student-t draw with `dof` degrees of freedom (heavy tails for small
    /// `dof`; infinite variance at `dof <= 2`).
    StudentT {
        scale: f64,
        dof: u32,
    },
    /// `scale` times a symmetric draw with Pareto tails of index `alpha`.
    Pareto {
        scale: f64,
        alpha: f64,
    },
}

impl Noise {
    fn draw(&self, rng: &mut ChaCha8Rng) -> f64 {
        match *self {
            Noise::None => 0.0,
            Noise::Gaussian { std } => std * standard_normal(rng),
            Noise::StudentT { scale, dof } => scale * student_t(dof, rng),
            Noise::Pareto { scale, alpha } => scale * symmetric_pareto(alpha, rng),
        }
    }
}

/// A synthetic environment description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    pub name: String,
    /// Default: [`ArmSpace::default`].
    pub space: ArmSpace,
    /// Default: Gaussian with std 0.1.
    pub noise: Noise,
    /// Clip observed rewards to [0, 1] like shaped rewards are. Default `true`.
    pub clip_rewards: bool,
    /// Default: one class with a single bump at ratio 0.42, rank 32.
    pub classes: Vec<DeviceClass>,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            name: "stationary".into(),
            space: ArmSpace::default(),
            noise: Noise::Gaussian { std: 0.1 },
            clip_rewards: true,
            classes: vec![DeviceClass::default()],
        }
    }
}

impl SyntheticConfig {
    /// Names of the built-in environments (see [`SyntheticConfig::preset`]).
    pub const PRESETS: [&'static str; 5] = [
        "stationary",
        "drifting",
        "switching",
        "heavy-tailed",
        "device-classes",
    ];

    /// The built-in environments, in [`SyntheticConfig::PRESETS`] order.
    pub fn presets() -> Vec<SyntheticConfig> {
        Self::PRESETS
            .into_iter()
            .map(|n| SyntheticConfig::preset(n).expect("known preset"))
            .collect()
    }

    /// A built-in environment by name (all on [`ArmSpace::default`], Gaussian noise 0.1
    /// unless said otherwise):
    /// - `stationary`: one bump at (ratio 0.42, rank 32), height 0.7 over a 0.1 floor (the
    ///   ratio falls between the default 6-ratio grid's points 0.36 and 0.48).
    /// - `drifting`: the stationary bump, but its centre glides from (0.05, rank 4) to
    ///   (0.55, rank 64) and back every 2,000 rounds.
    /// - `switching`: bump A at (0.1, 8) of height 0.7 stays; bump B at (0.5, 32) jumps from
    ///   height 0.3 to 0.85 at round 1,000 (and back at 2,000), so the optimum switches.
    /// - `heavy-tailed`: the stationary surface with Student-t noise (2 degrees of freedom,
    ///   scale 0.1: infinite variance).
    /// - `device-classes`: three classes with different optima: `phone` (30%, optimum near
    ///   (0.5, 8), 3 GB of RAM against a 4 GB model so low ratios at high ranks fail),
    ///   `board` (40%, near (0.3, 16)) and `jetson` (30%, near (0.1, 64)).
    pub fn preset(name: &str) -> Option<SyntheticConfig> {
        let stationary = SyntheticConfig::default();
        let bump = |ratio, rank| Bump {
            ratio,
            rank,
            height: 0.7,
            width_ratio: 0.15,
            width_log2_rank: 1.2,
            drift: None,
        };
        let one_class = |name: &str, bumps: Vec<Bump>| SyntheticConfig {
            name: name.into(),
            classes: vec![DeviceClass {
                name: name.into(),
                bumps,
                ..DeviceClass::default()
            }],
            ..SyntheticConfig::default()
        };
        Some(match name {
            "stationary" => stationary,
            "drifting" => one_class(
                "drifting",
                vec![Bump {
                    drift: Some(Drift {
                        shift_ratio: 0.5,
                        shift_log2_rank: 4.0,
                        period_rounds: 2000.0,
                        ..Drift::default()
                    }),
                    ..bump(0.05, 4.0)
                }],
            ),
            "switching" => one_class(
                "switching",
                vec![
                    bump(0.1, 8.0),
                    Bump {
                        height: 0.3,
                        drift: Some(Drift {
                            shift_height: 0.55,
                            period_rounds: 2000.0,
                            shape: DriftShape::Step,
                            ..Drift::default()
                        }),
                        ..bump(0.5, 32.0)
                    },
                ],
            ),
            "heavy-tailed" => SyntheticConfig {
                name: "heavy-tailed".into(),
                noise: Noise::StudentT { scale: 0.1, dof: 2 },
                ..stationary
            },
            "device-classes" => SyntheticConfig {
                name: "device-classes".into(),
                classes: vec![
                    DeviceClass {
                        name: "phone".into(),
                        share: 0.3,
                        bumps: vec![bump(0.5, 8.0)],
                        memory: Some(MemoryLimit {
                            ram_bytes: 3_000_000_000,
                            dense_bytes: 4_000_000_000,
                            bytes_per_rank: 16_000_000,
                        }),
                        ..DeviceClass::default()
                    },
                    DeviceClass {
                        name: "board".into(),
                        share: 0.4,
                        bumps: vec![bump(0.3, 16.0)],
                        ..DeviceClass::default()
                    },
                    DeviceClass {
                        name: "jetson".into(),
                        share: 0.3,
                        bumps: vec![bump(0.1, 64.0)],
                        ..DeviceClass::default()
                    },
                ],
                ..stationary
            },
            _ => return None,
        })
    }

    pub fn validate(&self) -> Result<(), BanditError> {
        self.space.validate()?;
        if self.classes.is_empty() {
            return Err(BanditError::param(
                "classes",
                0,
                "at least one device class",
            ));
        }
        for c in &self.classes {
            if !(c.share.is_finite() && c.share > 0.0) {
                return Err(BanditError::param("share", c.share, "a finite share > 0"));
            }
            for b in &c.bumps {
                if !(b.width_ratio > 0.0 && b.width_log2_rank > 0.0 && b.rank > 0.0) {
                    return Err(BanditError::param(
                        "bump",
                        format!("{b:?}"),
                        "positive widths and rank",
                    ));
                }
            }
            for d in c.bumps.iter().filter_map(|b| b.drift) {
                if !(d.period_rounds.is_finite() && d.period_rounds > 0.0) {
                    return Err(BanditError::param(
                        "period_rounds",
                        d.period_rounds,
                        "a finite number > 0",
                    ));
                }
            }
        }
        match self.noise {
            Noise::Gaussian { std: s } | Noise::StudentT { scale: s, .. }
                if s.is_nan() || s < 0.0 =>
            {
                Err(BanditError::param("noise scale", s, "a number >= 0"))
            }
            Noise::Pareto { scale, alpha } if !(scale >= 0.0 && alpha > 0.0) => {
                Err(BanditError::param(
                    "pareto",
                    format!("scale {scale}, alpha {alpha}"),
                    "scale >= 0, alpha > 0",
                ))
            }
            Noise::StudentT { dof: 0, .. } => Err(BanditError::param("dof", 0, "at least 1")),
            _ => Ok(()),
        }
    }
}

/// A [`SyntheticConfig`] instantiated for a number of devices.
#[derive(Clone, Debug)]
pub struct SyntheticEnvironment {
    config: SyntheticConfig,
    /// Class index of each device.
    device_class: Vec<usize>,
    round: u64,
    /// Optimum per class for `round`.
    optima: Vec<f64>,
    optima_round: Option<u64>,
}

impl SyntheticEnvironment {
    /// Assigns devices to classes in proportion to their shares (largest remainders, in
    /// class order: deterministic, no randomness).
    pub fn new(config: SyntheticConfig, devices: usize) -> Result<Self, BanditError> {
        config.validate()?;
        if devices == 0 {
            return Err(BanditError::param("devices", 0, "at least 1"));
        }
        let total: f64 = config.classes.iter().map(|c| c.share).sum();
        let mut counts: Vec<usize> = Vec::new();
        let mut remainders: Vec<(f64, usize)> = Vec::new();
        for (i, c) in config.classes.iter().enumerate() {
            let exact = c.share / total * devices as f64;
            counts.push(exact.floor() as usize);
            remainders.push((exact - exact.floor(), i));
        }
        remainders.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let missing = devices - counts.iter().sum::<usize>();
        for &(_, i) in remainders.iter().take(missing) {
            counts[i] += 1;
        }
        let device_class = counts
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i, n))
            .collect();
        let classes = config.classes.len();
        Ok(SyntheticEnvironment {
            config,
            device_class,
            round: 0,
            optima: vec![0.0; classes],
            optima_round: None,
        })
    }

    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    pub fn class_of(&self, device: usize) -> &DeviceClass {
        &self.config.classes[self.device_class[device]]
    }
}

impl Environment for SyntheticEnvironment {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn arm_space(&self) -> &ArmSpace {
        &self.config.space
    }

    fn devices(&self) -> usize {
        self.device_class.len()
    }

    fn context(&self, device: usize, round: u64) -> DeviceContext {
        DeviceContext {
            device_id: device as u64,
            round,
            ram_bytes: self.class_of(device).memory.map(|m| m.ram_bytes),
            deadline_ms: None,
        }
    }

    fn prepare_round(&mut self, round: u64, _rounds: u64) {
        self.round = round;
        let stationary = self.config.classes.iter().all(DeviceClass::is_stationary);
        if self.optima_round.is_some() && (stationary || self.optima_round == Some(round)) {
            return;
        }
        for (i, c) in self.config.classes.iter().enumerate() {
            self.optima[i] = c.optimum(&self.config.space, round);
        }
        self.optima_round = Some(round);
    }

    fn optimum(&self, device: usize) -> f64 {
        self.optima[self.device_class[device]]
    }

    fn expected(&self, device: usize, arm: &Arm) -> f64 {
        self.class_of(device).expected(arm, self.round)
    }

    fn pull(&self, device: usize, arm: &Arm, rng: &mut ChaCha8Rng) -> Pull {
        let class = self.class_of(device);
        let noise = self.config.noise.draw(rng);
        let peak_mem_bytes = class.memory.map_or(0, |m| m.peak_bytes(arm));
        if !class.fits(arm) {
            return Pull {
                reward: 0.0,
                peak_mem_bytes,
                duration_ms: 0,
                failed: true,
            };
        }
        let mut reward = class.surface(arm, self.round) + noise;
        if self.config.clip_rewards {
            reward = reward.clamp(0.0, 1.0);
        }
        Pull {
            reward,
            peak_mem_bytes,
            duration_ms: 0,
            failed: false,
        }
    }
}
