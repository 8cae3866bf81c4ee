//! The Byzantine seam of the driver: what a run's attackers did, counted from its round
//! records (the poisoning itself is [`crate::byzantine::poison`], called where a device's
//! message goes on the wire).

use crate::byzantine::ByzantineSummary;
use crate::report::Report;

use super::Simulation;

impl Simulation<'_> {
    /// The attackers' summary of `report` (`None` for a clean run).
    pub(super) fn byzantine_summary(&self, report: &Report) -> Option<ByzantineSummary> {
        if self.cfg.byzantine.is_off() {
            return None;
        }
        let ids: Vec<u64> = (0..self.attackers.len())
            .filter(|&i| self.attackers[i])
            .map(|i| i as u64 + 1)
            .collect();
        Some(summarise(
            report,
            self.cfg.byzantine.attack.name(),
            &ids,
            self.poisoned_sent,
            self.cfg.coordinator.aggregation.clip_norm,
        ))
    }
}

/// The counts of a run's attackers `devices`, read from its round records; `clip_norm` is the
/// aggregation's (an accepted update whose delta norm, as the aggregator measured it before
/// clipping, exceeds it was scaled down).
fn summarise(
    report: &Report,
    attack: String,
    devices: &[u64],
    poisoned_sent: u64,
    clip_norm: Option<f64>,
) -> ByzantineSummary {
    let mut s = ByzantineSummary {
        attack,
        devices: devices.to_vec(),
        poisoned_sent,
        poisoned_accepted: 0,
        poisoned_rejected: 0,
        poisoned_clipped: 0,
        clipped_total: 0,
    };
    // Outcomes that are not the aggregator refusing the update (see `report::Play::outcome`).
    let not_rejects = ["accepted", "missed", "dropped", "out_of_memory", "error"];
    for p in report.rounds.iter().flat_map(|r| &r.plays) {
        let clipped = p.outcome == "accepted"
            && matches!((p.delta_norm, clip_norm), (Some(d), Some(c)) if d > c);
        s.clipped_total += u64::from(clipped);
        if !devices.contains(&p.device) {
            continue;
        }
        if p.outcome == "accepted" {
            s.poisoned_accepted += 1;
            s.poisoned_clipped += u64::from(clipped);
        } else if !not_rejects.contains(&p.outcome.as_str()) {
            s.poisoned_rejected += 1;
        }
    }
    s
}
