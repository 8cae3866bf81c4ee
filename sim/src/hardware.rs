//! Device hardware profiles and fleets as data: what a class of device can do (training memory,
//! sustained FLOP/s, link rates, variability, availability, dropouts), loaded from TOML files a
//! user can edit. The built-in profiles live in `sim/profiles/*.toml`, each value with a
//! comment citing where it comes from; they are compiled in, and a fleet may name a file path
//! instead of a built-in name.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::apportion::largest_remainder;
use crate::error::SimError;

/// One class of device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// Short identifier (`jetson-tx2`).
    pub name: String,
    /// Human-readable class used to group reports (`Jetson TX2`).
    pub class: String,
    /// Memory a training process may use, GiB.
    pub ram_gib: f64,
    /// Sustained fp32 training throughput, GFLOP/s.
    pub train_gflops: f64,
    /// Inference throughput, GFLOP/s (latency column of the reports).
    pub infer_gflops: f64,
    /// Speed multipliers (power modes); each device draws one at start.
    #[serde(default = "one_mode")]
    pub power_modes: Vec<f64>,
    pub uplink_mbps: f64,
    pub downlink_mbps: f64,
    pub rtt_ms: f64,
    /// Relative standard deviation of the per-round speed draw (truncated normal around 1).
    #[serde(default)]
    pub variability: f64,
    /// Probability that a selected device drops out during a round.
    #[serde(default)]
    pub dropout_prob: f64,
    /// How long a dropped-out device stays away, seconds.
    #[serde(default = "default_reconnect")]
    pub reconnect_s: f64,
    /// Mean online time of the on/off churn, minutes (0 disables churn).
    #[serde(default)]
    pub mean_online_min: f64,
    /// Mean offline time of the churn, minutes.
    #[serde(default)]
    pub mean_offline_min: f64,
    /// Daily windows `[start, end)` in hours of the device's local day; empty = all day.
    #[serde(default)]
    pub windows_h: Vec<[f64; 2]>,
}

fn one_mode() -> Vec<f64> {
    vec![1.0]
}
fn default_reconnect() -> f64 {
    120.0
}

/// The built-in profiles: (name, TOML text).
pub const BUILTIN_PROFILES: [(&str, &str); 7] = [
    ("jetson-tx2", include_str!("../profiles/jetson-tx2.toml")),
    (
        "jetson-xavier-nx",
        include_str!("../profiles/jetson-xavier-nx.toml"),
    ),
    (
        "jetson-agx-xavier",
        include_str!("../profiles/jetson-agx-xavier.toml"),
    ),
    (
        "phone-flagship",
        include_str!("../profiles/phone-flagship.toml"),
    ),
    (
        "phone-midrange",
        include_str!("../profiles/phone-midrange.toml"),
    ),
    (
        "raspberry-pi-4",
        include_str!("../profiles/raspberry-pi-4.toml"),
    ),
    (
        "raspberry-pi-5",
        include_str!("../profiles/raspberry-pi-5.toml"),
    ),
];

impl DeviceProfile {
    /// Parse a profile from TOML text; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, SimError> {
        let p: DeviceProfile =
            toml::from_str(text).map_err(|e| SimError::Config(format!("profile {origin}: {e}")))?;
        p.validate()
            .map_err(|e| SimError::Config(format!("profile {origin}: {e}")))?;
        Ok(p)
    }

    /// A built-in profile by name, or a profile file when `name` is a path to a `.toml` file
    /// (relative paths resolve against `base_dir` when given).
    pub fn resolve(name: &str, base_dir: Option<&Path>) -> Result<Self, SimError> {
        if let Some((_, text)) = BUILTIN_PROFILES.iter().find(|(n, _)| *n == name) {
            return Self::from_toml(text, name);
        }
        if name.ends_with(".toml") {
            let path = match base_dir {
                Some(b) if Path::new(name).is_relative() => b.join(name),
                _ => Path::new(name).to_path_buf(),
            };
            let text = std::fs::read_to_string(&path).map_err(|e| SimError::Io {
                path: path.clone(),
                source: e,
            })?;
            return Self::from_toml(&text, &path.display().to_string());
        }
        let known: Vec<&str> = BUILTIN_PROFILES.iter().map(|(n, _)| *n).collect();
        Err(SimError::Config(format!(
            "unknown device profile '{name}' (built-in: {}; or give a path to a .toml file)",
            known.join(", ")
        )))
    }

    /// Check ranges: positive rates and memory, probabilities in [0, 1], sane windows.
    pub fn validate(&self) -> Result<(), String> {
        let pos = [
            ("ram_gib", self.ram_gib),
            ("train_gflops", self.train_gflops),
            ("infer_gflops", self.infer_gflops),
            ("uplink_mbps", self.uplink_mbps),
            ("downlink_mbps", self.downlink_mbps),
        ];
        for (k, v) in pos {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{k} must be a positive number, got {v}"));
            }
        }
        for (k, v) in [
            ("rtt_ms", self.rtt_ms),
            ("variability", self.variability),
            ("reconnect_s", self.reconnect_s),
            ("mean_online_min", self.mean_online_min),
            ("mean_offline_min", self.mean_offline_min),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{k} must be >= 0, got {v}"));
            }
        }
        if self.variability >= 0.5 {
            return Err(format!("variability {} is too large (the draw is truncated at 2 sd and must stay positive)", self.variability));
        }
        if !(0.0..=1.0).contains(&self.dropout_prob) {
            return Err(format!(
                "dropout_prob must be in [0, 1], got {}",
                self.dropout_prob
            ));
        }
        if self.power_modes.is_empty()
            || self
                .power_modes
                .iter()
                .any(|m| !(m.is_finite() && *m > 0.0))
        {
            return Err("power_modes must be a non-empty list of positive multipliers".into());
        }
        if (self.mean_online_min > 0.0) != (self.mean_offline_min > 0.0) {
            return Err(
                "mean_online_min and mean_offline_min must both be 0 (no churn) or both positive"
                    .into(),
            );
        }
        for w in &self.windows_h {
            if !(0.0 <= w[0] && w[0] < w[1] && w[1] <= 24.0) {
                return Err(format!("window {w:?} must satisfy 0 <= start < end <= 24"));
            }
        }
        Ok(())
    }

    pub fn ram_bytes(&self) -> u64 {
        (self.ram_gib * (1u64 << 30) as f64) as u64
    }
}

/// A group of identical devices in a fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetGroup {
    /// Built-in profile name or path to a profile TOML file.
    pub profile: String,
    pub count: usize,
}

/// The devices of an experiment, in groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    pub groups: Vec<FleetGroup>,
}

impl FleetSpec {
    /// The paper's 80-board testbed: 30 Jetson TX2, 40 Jetson Xavier NX, 10 Jetson AGX Xavier.
    pub fn paper() -> Self {
        FleetSpec {
            groups: vec![
                FleetGroup {
                    profile: "jetson-tx2".into(),
                    count: 30,
                },
                FleetGroup {
                    profile: "jetson-xavier-nx".into(),
                    count: 40,
                },
                FleetGroup {
                    profile: "jetson-agx-xavier".into(),
                    count: 10,
                },
            ],
        }
    }

    /// The paper's fleet plus phones and Raspberry Pis (120 devices).
    pub fn mixed() -> Self {
        let mut f = Self::paper();
        for (p, n) in [
            ("phone-flagship", 12),
            ("phone-midrange", 12),
            ("raspberry-pi-4", 8),
            ("raspberry-pi-5", 8),
        ] {
            f.groups.push(FleetGroup {
                profile: p.into(),
                count: n,
            });
        }
        f
    }

    /// A built-in fleet by name.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "paper" => Some(Self::paper()),
            "mixed" => Some(Self::mixed()),
            _ => None,
        }
    }

    pub fn total(&self) -> usize {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Resolve every group's profile; returns one profile per device, in group order.
    pub fn expand(&self, base_dir: Option<&Path>) -> Result<Vec<DeviceProfile>, SimError> {
        if self.total() == 0 {
            return Err(SimError::Config("the fleet has no devices".into()));
        }
        let mut out = Vec::with_capacity(self.total());
        for g in &self.groups {
            let p = DeviceProfile::resolve(&g.profile, base_dir)?;
            out.extend(std::iter::repeat_n(p, g.count));
        }
        Ok(out)
    }

    /// Scale every group's count so the fleet has `n` devices (largest remainders first).
    pub fn scaled_to(&self, n: usize) -> FleetSpec {
        let total = self.total().max(1) as f64;
        let exact: Vec<f64> = self
            .groups
            .iter()
            .map(|g| g.count as f64 * n as f64 / total)
            .collect();
        let counts = largest_remainder(&exact, n);
        FleetSpec {
            groups: self
                .groups
                .iter()
                .zip(counts)
                .map(|(g, c)| FleetGroup {
                    profile: g.profile.clone(),
                    count: c,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse_and_validate() {
        for (name, text) in BUILTIN_PROFILES {
            let p = DeviceProfile::from_toml(text, name).unwrap();
            assert_eq!(p.name, name);
        }
        let fleet = FleetSpec::paper().expand(None).unwrap();
        assert_eq!(fleet.len(), 80);
        assert_eq!(fleet.iter().filter(|p| p.class == "Jetson TX2").count(), 30);
        assert_eq!(FleetSpec::mixed().total(), 120);
    }

    #[test]
    fn bad_profiles_name_the_field() {
        let text = BUILTIN_PROFILES[0]
            .1
            .replace("dropout_prob = 0.02", "dropout_prob = 1.5");
        let e = DeviceProfile::from_toml(&text, "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dropout_prob"), "{e}");
        let e = DeviceProfile::resolve("jetson-nano", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown device profile 'jetson-nano'"), "{e}");
    }

    #[test]
    fn scaling_keeps_proportions() {
        let f = FleetSpec::paper().scaled_to(10_000);
        assert_eq!(f.total(), 10_000);
        assert_eq!(
            f.groups.iter().map(|g| g.count).collect::<Vec<_>>(),
            vec![3750, 5000, 1250]
        );
        assert_eq!(FleetSpec::paper().scaled_to(7).total(), 7);
    }
}
