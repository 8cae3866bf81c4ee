//! The Byzantine part of a comparison: each poisoned entry beside its clean twin (the same
//! entry with `+clean`), seed by seed: final accuracy clean and poisoned with their intervals,
//! the paired difference poisoned minus clean with its interval, and what became of the
//! attackers' updates (refused, accepted, clipped).

use std::fmt::Write as _;

use aggregator::coordinator::streams::Stream;
use serde::{Deserialize, Serialize};

use crate::experiment::SeedRuns;
use crate::stats::{self, Interval};

/// One poisoned entry against its clean twin, over seeds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ByzantineRow {
    pub entry: String,
    pub clean_entry: String,
    pub attack: String,
    /// Final accuracy of the devices that trained, per seed.
    pub clean_per_seed: Vec<Option<f64>>,
    pub poisoned_per_seed: Vec<Option<f64>>,
    pub clean: Option<Interval>,
    pub poisoned: Option<Interval>,
    /// Poisoned minus clean, seed by seed.
    pub difference_per_seed: Vec<Option<f64>>,
    pub difference: Option<Interval>,
    /// Over all seeds of the poisoned entry.
    pub attackers_per_seed: Vec<usize>,
    pub poisoned_sent: u64,
    pub poisoned_accepted: u64,
    pub poisoned_rejected: u64,
    pub poisoned_clipped: u64,
    /// Every accepted update over the clip norm (honest ones too), and every reject sent.
    pub clipped_total: u64,
    pub rejects: u64,
    /// Every update norm screening left out in the poisoned runs (honest ones too); 0 when
    /// read from a file written before screening was counted.
    #[serde(default)]
    pub screened_total: u64,
    /// The same three counts in the clean runs.
    pub clean_clipped: u64,
    pub clean_rejects: u64,
    #[serde(default)]
    pub clean_screened: u64,
}

/// The first of the three bootstrap streams of the `row`-th row (clean, poisoned, difference):
/// [`rows`] and [`super::pool`] draw the same resamples for the same values.
pub(crate) fn row_stream(row: usize) -> u64 {
    3_000_000 + 10 * row as u64
}

/// `entry` without its `+clean` modifier, or `None` when it has none.
fn clean_twin_of(entry: &str) -> Option<String> {
    let parts: Vec<&str> = entry.split('+').map(str::trim).collect();
    parts.contains(&"clean").then(|| {
        parts
            .iter()
            .filter(|p| **p != "clean")
            .copied()
            .collect::<Vec<_>>()
            .join("+")
    })
}

/// A row per entry that has a clean twin among `entries` and whose runs had attackers.
pub fn rows(entries: &[String], runs: &[SeedRuns], boot: &Stream, level: f64) -> Vec<ByzantineRow> {
    let mut out = Vec::new();
    for (c, clean_entry) in entries.iter().enumerate() {
        let Some(poisoned) = clean_twin_of(clean_entry) else {
            continue;
        };
        let Some(p) = entries.iter().position(|e| e.trim() == poisoned) else {
            continue;
        };
        let pick = |e: usize| runs.iter().filter_map(move |r| r.reports.get(e));
        let acc =
            |e: usize| -> Vec<Option<f64>> { pick(e).map(|r| r.summary.final_accuracy).collect() };
        let (clean_per_seed, poisoned_per_seed) = (acc(c), acc(p));
        let difference_per_seed: Vec<Option<f64>> = poisoned_per_seed
            .iter()
            .zip(&clean_per_seed)
            .map(|(x, y)| stats::paired_differences(&[*x], &[*y]).first().copied())
            .collect();
        let k = row_stream(out.len());
        let ci = |xs: &[Option<f64>], n: u64| {
            let v: Vec<f64> = xs.iter().flatten().copied().collect();
            stats::bootstrap_mean(&v, level, stats::RESAMPLES, &mut boot.rng_for(k + n))
        };
        let mut row = ByzantineRow {
            entry: entries[p].clone(),
            clean_entry: clean_entry.clone(),
            attack: String::new(),
            clean: ci(&clean_per_seed, 0),
            poisoned: ci(&poisoned_per_seed, 1),
            difference: ci(&difference_per_seed, 2),
            clean_per_seed,
            poisoned_per_seed,
            difference_per_seed,
            ..ByzantineRow::default()
        };
        for r in pick(p) {
            row.rejects += r.summary.rejects;
            row.screened_total += screened_in(r);
            let Some(b) = &r.summary.byzantine else {
                row.attackers_per_seed.push(0);
                continue;
            };
            row.attack = b.attack.clone();
            row.attackers_per_seed.push(b.devices.len());
            row.poisoned_sent += b.poisoned_sent;
            row.poisoned_accepted += b.poisoned_accepted;
            row.poisoned_rejected += b.poisoned_rejected;
            row.poisoned_clipped += b.poisoned_clipped;
            row.clipped_total += b.clipped_total;
        }
        for r in pick(c) {
            row.clean_rejects += r.summary.rejects;
            row.clean_clipped += clipped_in(r);
            row.clean_screened += screened_in(r);
        }
        if row.attackers_per_seed.iter().any(|&n| n > 0) {
            out.push(row);
        }
    }
    out
}

/// Accepted updates of a run over its configured clip norm.
fn clipped_in(r: &crate::report::Report) -> u64 {
    let clip = r
        .config
        .pointer("/coordinator/aggregation/clip_norm")
        .and_then(serde_json::Value::as_f64);
    r.rounds
        .iter()
        .flat_map(|x| &x.plays)
        .filter(|p| p.outcome == "accepted")
        .filter(|p| matches!((p.delta_norm, clip), (Some(d), Some(c)) if d > c))
        .count() as u64
}

/// Updates of a run that norm screening left out.
fn screened_in(r: &crate::report::Report) -> u64 {
    r.rounds
        .iter()
        .flat_map(|x| &x.plays)
        .filter(|p| p.outcome == "screened_out")
        .count() as u64
}

fn cell(i: &Option<Interval>, n: usize) -> String {
    match i {
        Some(i) => format!("{:.4} [{:.4}, {:.4}] (n {}/{n})", i.mean, i.lo, i.hi, i.n),
        None => format!("- (n 0/{n})"),
    }
}

/// The Markdown section (empty without rows).
pub fn markdown(rows: &[ByzantineRow], seeds: usize, surrogate: bool) -> String {
    let mut s = String::new();
    if rows.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "\n## Byzantine devices: each entry poisoned against its clean twin\n\nFinal accuracy of the devices that trained, mean over seeds with its bootstrap interval; the paired difference is poisoned minus clean, seed by seed (the same devices attack in every entry of a seed). Counts add up over seeds: the attackers' updates sent, accepted, refused (screened-out ones included) and clipped (accepted with a delta norm over `clip_norm`), every clipped update, every screened-out update and every reject in the poisoned runs, and the same three in the clean ones (an honest update screened out shows there).\n"
    );
    if surrogate {
        s.push_str("**SURROGATE MODE**: the poisoned updates are aggregated for real (the counts are real), but the surrogate's accuracy does not read the global adapter, so these accuracies cannot show an attack's effect; only real mode tests it.\n\n");
    }
    s.push_str("| poisoned entry | attack | attackers per seed | clean | poisoned | poisoned - clean | sent / accepted / refused / clipped | clipped, screened out, rejects (poisoned) | clipped, screened out, rejects (clean) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let per: Vec<String> = r.attackers_per_seed.iter().map(usize::to_string).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} / {} / {} / {} | {}, {}, {} | {}, {}, {} |",
            r.entry,
            r.attack,
            per.join(", "),
            cell(&r.clean, seeds),
            cell(&r.poisoned, seeds),
            cell(&r.difference, seeds),
            r.poisoned_sent,
            r.poisoned_accepted,
            r.poisoned_rejected,
            r.poisoned_clipped,
            r.clipped_total,
            r.screened_total,
            r.rejects,
            r.clean_clipped,
            r.clean_screened,
            r.clean_rejects
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clean_twin_drops_only_the_clean_modifier() {
        assert_eq!(
            clean_twin_of("hetlora+agg=median+clean").as_deref(),
            Some("hetlora+agg=median")
        );
        assert_eq!(
            clean_twin_of("hetlora+clean+clip=2").as_deref(),
            Some("hetlora+clip=2")
        );
        assert_eq!(clean_twin_of("hetlora+agg=median"), None);
        assert_eq!(
            clean_twin_of("fedspine@fixed+clean").as_deref(),
            Some("fedspine@fixed")
        );
    }
}
