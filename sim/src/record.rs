//! `sim record`: a designed grid of arms (prune ratio x rank, corners included) trained in real
//! mode with one fixed arm per run (the `fixed-prune` strategy), every device-round appended to
//! the dataset of [`crate::device_rounds`]. The bandit rarely plays some corners; this covers
//! them for the surrogate's fit.

use std::path::Path;

use crate::config::{ExperimentConfig, Mode};
use crate::device_rounds;
use crate::driver::Observer;
use crate::error::SimError;
use crate::experiment::{self, Resources};

/// The grid: every ratio with every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub ratios: Vec<f64>,
    pub ranks: Vec<u32>,
}

impl Grid {
    /// Parse comma-separated lists (`"0,0.25,0.5"`, `"4,16"`).
    pub fn parse(ratios: &str, ranks: &str) -> Result<Self, SimError> {
        let ratios = ratios
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..0.95).contains(r))
                    .ok_or_else(|| {
                        SimError::Config(format!("--ratios: '{s}' is not a ratio in [0, 0.95)"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ranks = ranks
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<u32>()
                    .ok()
                    .filter(|r| (1..=256).contains(r))
                    .ok_or_else(|| {
                        SimError::Config(format!("--ranks: '{s}' is not a rank in 1..=256"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if ratios.is_empty() || ranks.is_empty() {
            return Err(SimError::Config(
                "the grid needs at least one ratio and one rank".into(),
            ));
        }
        Ok(Grid { ratios, ranks })
    }

    /// The cells in a fixed order (ratio-major).
    pub fn cells(&self) -> Vec<(f64, u32)> {
        self.ratios
            .iter()
            .flat_map(|&r| self.ranks.iter().map(move |&k| (r, k)))
            .collect()
    }
}

/// The config of grid cell `k` (arm `ratio`, `rank`): `fixed-prune` with that arm, seed
/// `cfg.seed + k` (other devices, other data order), and evaluations cut to the minimum (the
/// dataset records each device's own held-out quality; panels are not needed, and the one
/// final evaluation uses the devices' own held-out items instead of a global set, which on the
/// presets costs minutes per model).
pub fn cell_config(
    cfg: &ExperimentConfig,
    k: usize,
    ratio: f64,
    rank: u32,
) -> Result<ExperimentConfig, SimError> {
    if cfg.mode != Mode::Real {
        return Err(SimError::Config(
            "sim record trains the real model: the config must have mode = \"real\"".into(),
        ));
    }
    let mut c = cfg.clone();
    c.seed = cfg.seed.wrapping_add(k as u64);
    c.coordinator.max_rank = c.coordinator.max_rank.max(rank);
    let mut table = toml::Table::new();
    table.insert("prune_ratio".into(), toml::Value::Float(ratio));
    table.insert("rank".into(), toml::Value::Integer(rank as i64));
    c.strategies.insert("fixed-prune".into(), table);
    c.eval.every_rounds = c.coordinator.rounds.max(1);
    c.eval.panel_devices = c.eval.panel_devices.min(1);
    c.eval.final_devices = c.eval.final_devices.min(1);
    c.workload.global_eval_items = 0;
    c.coordinator.close_at_target = false;
    c.output_dir = cfg.output_dir.join(format!("cell-{k:02}-r{ratio}-k{rank}"));
    c.with_strategy("fixed-prune")
}

/// Run every cell of `grid` on `resources` and append its device-rounds to `out`; returns how
/// many were appended.
pub fn record(
    cfg: &ExperimentConfig,
    resources: &Resources,
    grid: &Grid,
    out: &Path,
    observer: &mut dyn Observer,
) -> Result<usize, SimError> {
    let mut total = 0;
    for (k, (ratio, rank)) in grid.cells().into_iter().enumerate() {
        let c = cell_config(cfg, k, ratio, rank)?;
        observer.note(&format!("cell {k}: prune ratio {ratio}, rank {rank}"));
        let report = experiment::run(&c, resources, observer)?;
        device_rounds::append(out, &report.device_rounds)?;
        total += report.device_rounds.len();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_parses_checks_and_fixes_one_arm_per_cell() {
        let g = Grid::parse("0, 0.5", "4,32").unwrap();
        assert_eq!(g.cells(), vec![(0.0, 4), (0.0, 32), (0.5, 4), (0.5, 32)]);
        let err = Grid::parse("0,1.5", "4").unwrap_err().to_string();
        assert!(err.contains("'1.5'"), "{err}");
        let err = Grid::parse("0", "four").unwrap_err().to_string();
        assert!(err.contains("'four'"), "{err}");
        let cfg = ExperimentConfig::preset("tiny").unwrap();
        let c = cell_config(&cfg, 3, 0.5, 32).unwrap();
        assert_eq!(c.strategy, "fixed-prune");
        assert_eq!(c.seed, cfg.seed + 3);
        assert!(c.coordinator.max_rank >= 32);
        assert!(!c.coordinator.close_at_target);
        assert_eq!(c.workload.global_eval_items, 0);
        let surrogate = ExperimentConfig::preset("surrogate").unwrap();
        let err = cell_config(&surrogate, 0, 0.0, 4).unwrap_err().to_string();
        assert!(err.contains("mode = \"real\""), "{err}");
    }
}
