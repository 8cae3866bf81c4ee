//! Byzantine devices in the simulator: the `[byzantine]` table (what share of the fleet
//! attacks and how), the seeded choice of the attacking devices, and the poisoning of the
//! update an attacker sends.
//!
//! A Byzantine device trains honestly (its session and local state are the honest ones) and
//! then poisons the `Update` on the wire, just before it is encoded: the
//! aggregator's validation, norm limits and robust methods see exactly what an attacker would
//! send. The poisoned update keeps every shape, rank, alpha and kept map of the honest one and
//! is finite (a non-finite result is an error naming the device and round, never sent), so it
//! passes the shape checks; whether the norm limits refuse it is the aggregator's business.
//!
//! The update a device sends is its whole LoRA adapter (the factors `A`, `B` of every layer,
//! delta `s B A` on the frozen base), and the attacks act on that delta:
//! - `scale` (with `factor`): every `B` multiplied by `factor`, so every layer's delta is
//!   `factor` times the honest one (`factor = -10` is the sign flip by ten);
//! - `sign-flip`: `scale` with `factor = -1` (the same norm as the honest update: no norm
//!   limit can see it);
//! - `random` (with `norm`): every `B` replaced by Gaussian noise, rescaled so that each layer's
//!   delta `s N A` has `norm` times the Frobenius norm of the honest layer's delta (`A` kept);
//! - `report-losses` (with `loss_post` and optionally `loss_pre`): the adapter is the honest
//!   one, the losses in the update's statistics are the given ones (`loss_pre` left out keeps
//!   the honest one). The aggregator can only range-check a loss, and the losses feed the
//!   round's reward shaping: `loss_post = 0` claims a perfect round, `loss_pre = 1e-6` with
//!   `loss_post = 1000` a blow-up, each setting the round's loss scale under the default
//!   `reward.loss_trim = 0`.
//!
//! Which devices attack is drawn from the run's `byzantine` stream alone (a fixed-size seeded
//! sample of the fleet, `round(fraction * devices)` devices), so every strategy, aggregation
//! method and clean/poisoned variant of one seed names the same devices; the random attack's
//! noise comes from the same stream's `(device, round)` generator.
//!
//! Surrogate mode: the surrogate's synthetic update is poisoned and aggregated for real (the
//! counts of refused, clipped and screened-out updates are real), but the surrogate's accuracy
//! does not read the global adapter (it only drops the screened-out devices from its round), so
//! only real mode tests whether an attack moves accuracy.

use aggregator::coordinator::streams::Stream;
use protocol::{AdapterPayload, Buffer, Update};
use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::sampling::standard_normal;

/// The name of the stream the attackers and their noise are drawn from.
pub const STREAM: &str = "byzantine";

/// Largest `|factor|` of the scale attack, and largest relative norm of the random one: far
/// beyond any norm limit, and small enough that an `f32` factor cannot overflow.
pub const MAX_ATTACK_MAGNITUDE: f64 = 1.0e4;

/// How an attacking device poisons its update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Attack {
    /// Every layer's delta times `factor` (negative: sign-flipped and scaled).
    Scale { factor: f64 },
    /// Every layer's delta negated (the honest norm).
    SignFlip,
    /// Every layer's `B` replaced by Gaussian noise with `norm` times the honest delta norm.
    Random { norm: f64 },
    /// The honest adapter with these losses reported (`loss_pre` absent: the honest one).
    ReportLosses {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss_pre: Option<f64>,
        loss_post: f64,
    },
}

impl Attack {
    /// A short name for reports: `scale(-10)`, `sign-flip`, `random(5)`.
    pub fn name(&self) -> String {
        match self {
            Attack::Scale { factor } => format!("scale({factor})"),
            Attack::SignFlip => "sign-flip".into(),
            Attack::Random { norm } => format!("random({norm})"),
            Attack::ReportLosses {
                loss_pre,
                loss_post,
            } => match loss_pre {
                Some(pre) => format!("report-losses({pre}, {loss_post})"),
                None => format!("report-losses(honest, {loss_post})"),
            },
        }
    }
}

/// The `[byzantine]` table: e.g. `fraction = 0.1` and `attack = { kind = "scale", factor = -10 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ByzantineConfig {
    /// Share of the fleet that attacks, in `[0, 1]` (default 0: nobody).
    pub fraction: f64,
    pub attack: Attack,
}

impl Default for ByzantineConfig {
    fn default() -> Self {
        ByzantineConfig {
            fraction: 0.0,
            attack: Attack::SignFlip,
        }
    }
}

impl ByzantineConfig {
    /// Whether no device attacks (the table is then left out of the serialised config, so
    /// clean runs' reports are unchanged).
    pub fn is_off(&self) -> bool {
        self.fraction == 0.0
    }

    /// Range checks, each naming the field.
    pub fn validate(&self) -> Result<(), SimError> {
        if !(0.0..=1.0).contains(&self.fraction) {
            return Err(SimError::Config(format!(
                "byzantine.fraction must be in [0, 1], not {}",
                self.fraction
            )));
        }
        let bad = |what: &str, v: f64| {
            Err(SimError::Config(format!(
                "byzantine.attack.{what} must be finite, non-zero and at most {MAX_ATTACK_MAGNITUDE:e} in size, not {v}"
            )))
        };
        match self.attack {
            Attack::Scale { factor }
                if !factor.is_finite() || factor == 0.0 || factor.abs() > MAX_ATTACK_MAGNITUDE =>
            {
                bad("factor", factor)
            }
            Attack::Random { norm }
                if !norm.is_finite() || norm <= 0.0 || norm > MAX_ATTACK_MAGNITUDE =>
            {
                bad("norm", norm)
            }
            Attack::ReportLosses {
                loss_pre,
                loss_post,
            } => {
                for (what, v) in [("loss_pre", loss_pre), ("loss_post", Some(loss_post))] {
                    match v {
                        Some(v) if !(v.is_finite() && (0.0..=f32::MAX as f64).contains(&v)) => {
                            return Err(SimError::Config(format!(
                                "byzantine.attack.{what} must be a finite loss >= 0, not {v}"
                            )))
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A `report-losses` attack whose losses the aggregator would refuse outright (over its
    /// `max_loss`) tests nothing about the reward: refused, naming the bound. So is a positive
    /// loss that is 0 once sent as `f32`.
    pub fn check_reported_losses(&self, max_loss: f64) -> Result<(), SimError> {
        let Attack::ReportLosses {
            loss_pre,
            loss_post,
        } = self.attack
        else {
            return Ok(());
        };
        for (what, v) in [("loss_pre", loss_pre), ("loss_post", Some(loss_post))] {
            match v {
                Some(v) if v > max_loss => {
                    return Err(SimError::Config(format!(
                        "byzantine.attack.{what} = {v} is over coordinator.max_loss = {max_loss}: \
                         every such update would be refused before the reward sees it"
                    )))
                }
                Some(v) if v > 0.0 && (v as f32) < f32::MIN_POSITIVE => {
                    return Err(SimError::Config(format!(
                        "byzantine.attack.{what} = {v} is below the smallest normal f32 loss \
                         ({:e}), which a device sends",
                        f32::MIN_POSITIVE
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// How many of `devices` attack: `round(fraction * devices)`.
    pub fn count(&self, devices: usize) -> usize {
        ((self.fraction * devices as f64).round() as usize).min(devices)
    }
}

/// Which of `devices` (indices `0..devices`) attack on `seed`: a sorted seeded sample of
/// [`ByzantineConfig::count`] devices from the `byzantine` stream alone.
pub fn choose(cfg: &ByzantineConfig, seed: u64, devices: usize) -> Vec<usize> {
    let k = cfg.count(devices);
    let mut rng = Stream::new(seed, STREAM).rng();
    let mut picked = rand::seq::index::sample(&mut rng, devices, k).into_vec();
    picked.sort_unstable();
    picked
}

/// `sqrt(tr((B^T B)(A A^T)))`: `|B A|_F` without forming the product. `A` is `rank x cols`,
/// `B` is `rows x rank`, row-major.
fn product_norm(a: &[f32], b: &[f32], rank: usize) -> f64 {
    if rank == 0 {
        return 0.0;
    }
    let cols = a.len() / rank;
    let rows = b.len() / rank;
    let mut tr = 0.0f64;
    for i in 0..rank {
        for j in 0..rank {
            let ga: f64 = a[i * cols..(i + 1) * cols]
                .iter()
                .zip(&a[j * cols..(j + 1) * cols])
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum();
            let gb: f64 = (0..rows)
                .map(|o| b[o * rank + i] as f64 * b[o * rank + j] as f64)
                .sum();
            tr += ga * gb;
        }
    }
    tr.max(0.0).sqrt()
}

/// The update's `B` factors replaced by what `attack` sends (see the module docs); `device` is
/// the attacker's index, for the random attack's noise and for errors. Buffers come out as
/// `f32` (a half-precision update is widened first, then narrowed again).
pub fn poison(
    update: &mut Update,
    attack: Attack,
    seed: u64,
    device: usize,
) -> Result<(), SimError> {
    if let Attack::ReportLosses {
        loss_pre,
        loss_post,
    } = attack
    {
        if let Some(pre) = loss_pre {
            update.stats.loss_pre = pre as f32;
        }
        update.stats.loss_post = loss_post as f32;
        return Ok(());
    }
    let round = update.round.0;
    let half = update
        .adapter
        .layers
        .iter()
        .any(|l| matches!(l.b.data, Buffer::F16(_)) || matches!(l.a.data, Buffer::F16(_)));
    let mut adapter: AdapterPayload = update.adapter.to_f32();
    let rank = adapter.rank as usize;
    let mut rng = Stream::new(seed, STREAM).rng_at(device as u64 + 1, round);
    for layer in &mut adapter.layers {
        let a = layer.a.data.to_f32_vec();
        let mut b = layer.b.data.to_f32_vec();
        match attack {
            Attack::Scale { factor } => b.iter_mut().for_each(|x| *x = (*x as f64 * factor) as f32),
            Attack::SignFlip => b.iter_mut().for_each(|x| *x = -*x),
            Attack::Random { norm } => {
                let honest = product_norm(&a, &b, rank);
                let mut noise: Vec<f32> = (0..b.len())
                    .map(|_| standard_normal(&mut rng) as f32)
                    .collect();
                let drawn = product_norm(&a, &noise, rank);
                let k = if drawn > 0.0 {
                    norm * honest / drawn
                } else {
                    0.0
                };
                noise.iter_mut().for_each(|x| *x = (*x as f64 * k) as f32);
                b = noise;
            }
            // Returned above: it leaves the adapter alone.
            Attack::ReportLosses { .. } => {}
        }
        if let Some(bad) = b.iter().position(|x| !x.is_finite()) {
            return Err(SimError::Coordinator(format!(
                "byzantine device {} round {round}: the {} attack made factor B of block {} {:?} non-finite at element {bad}",
                device + 1,
                attack.name(),
                layer.block,
                layer.proj
            )));
        }
        layer.b.data = Buffer::F32(b);
    }
    update.adapter = if half { adapter.to_f16() } else { adapter };
    Ok(())
}

/// What the attackers did in one run (absent from clean runs).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ByzantineSummary {
    pub attack: String,
    /// The attacking devices' ids, ascending.
    pub devices: Vec<u64>,
    /// Poisoned updates sent.
    pub poisoned_sent: u64,
    /// Of the attackers' plays: accepted by the aggregator, refused (any reject kind), and
    /// accepted with a delta norm over `aggregation.clip_norm` (so scaled down).
    pub poisoned_accepted: u64,
    pub poisoned_rejected: u64,
    pub poisoned_clipped: u64,
    /// Every accepted update over `clip_norm`, honest ones included.
    pub clipped_total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{LayerAdapter, Proj, RoundId, Tensor2, UpdateStats};

    fn update() -> Update {
        let layer = |block| LayerAdapter {
            block,
            proj: Proj::ALL[0],
            a: Tensor2::f32(2, 3, vec![0.5, -1.0, 0.25, 2.0, 0.0, 1.0]),
            b: Tensor2::f32(2, 2, vec![0.1, 0.2, -0.3, 0.4]),
        };
        Update {
            round: RoundId(3),
            adapter: AdapterPayload {
                rank: 2,
                alpha: 4.0,
                layers: vec![layer(0), layer(1)],
            },
            kept: protocol::KeptIndices { blocks: Vec::new() },
            stats: UpdateStats {
                loss_pre: 1.0,
                loss_post: 0.9,
                sparsity: 0.0,
                param_count: 100,
                compute_ms: 1,
                bytes_down: 1,
                bytes_up: 1,
                peak_mem_bytes: 1,
                samples: 4,
                steps: 2,
            },
        }
    }

    fn delta_norm(u: &Update, layer: usize) -> f64 {
        let l = &u.adapter.layers[layer];
        product_norm(&l.a.data.to_f32_vec(), &l.b.data.to_f32_vec(), 2)
    }

    #[test]
    fn attacks_keep_shapes_and_set_the_delta_norm() {
        let honest = update();
        let h = delta_norm(&honest, 1);
        for (attack, want) in [
            (Attack::Scale { factor: -10.0 }, 10.0 * h),
            (Attack::SignFlip, h),
            (Attack::Random { norm: 5.0 }, 5.0 * h),
        ] {
            let mut u = honest.clone();
            poison(&mut u, attack, 7, 2).unwrap();
            assert_eq!(u.adapter.layers.len(), 2);
            for (p, q) in u.adapter.layers.iter().zip(&honest.adapter.layers) {
                assert_eq!(
                    (p.a.rows, p.a.cols, p.b.rows, p.b.cols),
                    (q.a.rows, q.a.cols, q.b.rows, q.b.cols)
                );
                assert_eq!(p.a, q.a, "A is the honest factor");
                assert_ne!(p.b, q.b);
            }
            assert_eq!(
                (u.adapter.rank, u.adapter.alpha, &u.kept),
                (2, 4.0, &honest.kept)
            );
            let got = delta_norm(&u, 1);
            assert!(
                (got - want).abs() < 1e-4 * want,
                "{}: {got} vs {want}",
                attack.name()
            );
        }
        let mut flipped = honest.clone();
        poison(&mut flipped, Attack::SignFlip, 7, 2).unwrap();
        assert_eq!(
            flipped.adapter.layers[0].b.data.to_f32_vec(),
            vec![-0.1, -0.2, 0.3, -0.4]
        );
        // The noise is the seed's and the device's: the same again, another for another device.
        let noisy = |dev| {
            let mut u = honest.clone();
            poison(&mut u, Attack::Random { norm: 5.0 }, 7, dev).unwrap();
            u
        };
        assert_eq!(noisy(2), noisy(2));
        assert_ne!(noisy(2), noisy(3));
    }

    #[test]
    fn a_loss_report_attack_changes_the_losses_only() {
        let honest = update();
        let mut u = honest.clone();
        let lie = Attack::ReportLosses {
            loss_pre: None,
            loss_post: 0.0,
        };
        poison(&mut u, lie, 7, 2).unwrap();
        assert_eq!(u.adapter, honest.adapter);
        assert_eq!((u.stats.loss_pre, u.stats.loss_post), (1.0, 0.0));
        assert_eq!(lie.name(), "report-losses(honest, 0)");
        let blow_up = Attack::ReportLosses {
            loss_pre: Some(1e-6),
            loss_post: 1000.0,
        };
        let mut v = honest.clone();
        poison(&mut v, blow_up, 7, 2).unwrap();
        assert_eq!((v.stats.loss_pre, v.stats.loss_post), (1e-6, 1000.0));
        assert_eq!(
            UpdateStats {
                loss_pre: 1.0,
                loss_post: 0.9,
                ..v.stats
            },
            honest.stats
        );
        assert_eq!(blow_up.name(), "report-losses(0.000001, 1000)");
    }

    #[test]
    fn the_attackers_are_the_seeds_alone() {
        let cfg = ByzantineConfig {
            fraction: 0.25,
            attack: Attack::SignFlip,
        };
        let a = choose(&cfg, 7, 8);
        assert_eq!(a.len(), 2);
        assert_eq!(a, choose(&cfg, 7, 8));
        let other = ByzantineConfig {
            attack: Attack::Scale { factor: 10.0 },
            ..cfg.clone()
        };
        assert_eq!(
            a,
            choose(&other, 7, 8),
            "the attack kind does not move the choice"
        );
        let seeds: Vec<Vec<usize>> = (0..6).map(|s| choose(&cfg, s, 8)).collect();
        assert!(seeds.iter().any(|s| s != &a), "other seeds pick others");
        assert_eq!(
            choose(&ByzantineConfig::default(), 7, 8),
            Vec::<usize>::new()
        );
        assert_eq!(
            ByzantineConfig {
                fraction: 0.1,
                ..cfg
            }
            .count(80),
            8
        );
    }

    #[test]
    fn bad_tables_are_refused_by_name() {
        let bad = |text: &str| -> String {
            let c: ByzantineConfig = toml::from_str(text).unwrap();
            c.validate().unwrap_err().to_string()
        };
        assert!(bad("fraction = 1.5").contains("byzantine.fraction"));
        assert!(
            bad("fraction = 0.1\nattack = { kind = \"scale\", factor = 0.0 }")
                .contains("attack.factor")
        );
        assert!(
            bad("fraction = 0.1\nattack = { kind = \"random\", norm = -1.0 }")
                .contains("attack.norm")
        );
        assert!(toml::from_str::<ByzantineConfig>("attack = { kind = \"flip\" }").is_err());
        assert!(bad(
            "fraction = 0.1\nattack = { kind = \"report-losses\", loss_pre = -1.0, loss_post = 0.0 }"
        )
        .contains("attack.loss_pre"));
        let lie: ByzantineConfig = toml::from_str(
            "fraction = 0.1\nattack = { kind = \"report-losses\", loss_pre = 1e-6, loss_post = 1000 }",
        )
        .unwrap();
        lie.validate().unwrap();
        lie.check_reported_losses(1000.0).unwrap();
        let e = lie.check_reported_losses(500.0).unwrap_err().to_string();
        assert!(
            e.contains("loss_post = 1000") && e.contains("max_loss = 500"),
            "{e}"
        );
        let tiny: ByzantineConfig = toml::from_str(
            "fraction = 0.1\nattack = { kind = \"report-losses\", loss_pre = 1e-50, loss_post = 0 }",
        )
        .unwrap();
        let e = tiny.check_reported_losses(1000.0).unwrap_err().to_string();
        assert!(e.contains("loss_pre = 0.00000000"), "{e}");
        assert!(toml::from_str::<ByzantineConfig>(
            "attack = { kind = \"report-losses\", loss_post = 0.0, samples = 1 }"
        )
        .is_err());
        let ok: ByzantineConfig =
            toml::from_str("fraction = 0.1\nattack = { kind = \"scale\", factor = -10 }").unwrap();
        assert_eq!(ok.attack, Attack::Scale { factor: -10.0 });
        ok.validate().unwrap();
    }
}
