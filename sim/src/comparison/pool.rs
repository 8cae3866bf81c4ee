//! Pooling comparisons of disjoint seeds (`sim pool`): a real-mode comparison costs minutes to
//! hours per seed here, so the seeds a claim needs accumulate over several `sim compare` runs
//! (`--seed S --seeds N` each). Pooling reads their `compare.json` files and forms the comparison
//! of all their seeds: every per-seed value as its run reported it, in seed order, and every
//! interval drawn again over the pooled seeds with the bootstrap streams [`super::compare`] uses,
//! so pooling runs of seeds `7, 8` and `9` gives the metrics, paired differences and Byzantine
//! rows that one comparison of seeds `7, 8, 9` gives.
//!
//! Refused, with the folder named: parts of another experiment (name, mode, target, entries,
//! evaluation size or bootstrap settings differ), a seed in two parts, and, unless asked for
//! with [`Classes::Mixed`] (`sim pool --across-classes`), parts computed on different CPU
//! classes (their `host.json`; the kernels' arithmetic differs between classes, so the same seed
//! gives other numbers on another class). Pooling across classes stays a paired design: a part is
//! one `sim compare` folder, and `compare --resume` keeps a folder to one class, so every entry of
//! a seed ran on one class and each seed's paired differences compare like with like; what
//! changes is the population the seeds are drawn from (seed and class together), and the pooled
//! report names each part's class. Not pooled: the bandit rows, which need each run's plays
//! (each part's own `compare.md` has them).

use std::path::Path;

use aggregator::coordinator::streams::Stream;

use super::byzantine::{self, ByzantineRow};
use super::{interval_stream, Comparison, MetricRow, METRICS};
use crate::error::SimError;
use crate::host::{HostClass, HOST_FILE};
use crate::stats::{self, Interval};

/// What a pool across CPU classes writes in place of `host.json`: each part's `host.json`,
/// with the part's folder and seeds.
pub const HOSTS_FILE: &str = "hosts.json";

/// One comparison folder's results.
#[derive(Debug, Clone)]
pub struct Part {
    /// Where it came from (the folder), for messages and the pooled report.
    pub label: String,
    pub comparison: Comparison,
    /// `host.json`'s CPU class.
    pub host: HostClass,
}

fn data(what: String) -> SimError {
    SimError::Data(what)
}

impl Part {
    /// Read `compare.json` and `host.json` from a `sim compare --seeds N` folder.
    pub fn load(dir: &Path) -> Result<Part, SimError> {
        let read = |name: &str| -> Result<serde_json::Value, SimError> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|e| SimError::io(&path, e))?;
            serde_json::from_str(&text).map_err(|e| data(format!("{}: {e}", path.display())))
        };
        let path = dir.join("compare.json");
        let comparison: Comparison = serde_json::from_value(read("compare.json")?)
            .map_err(|e| data(format!("{}: not a comparison: {e}", path.display())))?;
        if !dir.join(HOST_FILE).exists() && dir.join(HOSTS_FILE).exists() {
            return Err(data(format!(
                "{}: a pool across CPU classes (it has {HOSTS_FILE}, no {HOST_FILE}); pool its parts instead",
                dir.display()
            )));
        }
        let host = HostClass::from_json(&read(HOST_FILE)?)
            .map_err(|e| data(format!("{}: {e}", dir.join("host.json").display())))?;
        Ok(Part {
            label: dir.display().to_string(),
            comparison,
            host,
        })
    }
}

/// `sim pool`: the comparison of the folders `dirs` together, written into `out` as
/// `compare.json`, `compare.md` and the host file [`host_file`] names (a host file of the other
/// kind left there by an earlier pool is removed). Returns the comparison and that file's name.
pub fn pool_into(
    dirs: &[std::path::PathBuf],
    out: &Path,
    classes: Classes,
) -> Result<(Comparison, &'static str), SimError> {
    let parts = dirs
        .iter()
        .map(|d| Part::load(d))
        .collect::<Result<Vec<_>, _>>()?;
    let cmp = pool(&parts, classes)?;
    let (host_name, host_text) = host_file(dirs, &parts)?;
    let stale = out.join(if host_name == HOST_FILE {
        HOSTS_FILE
    } else {
        HOST_FILE
    });
    if stale.exists() {
        std::fs::remove_file(&stale).map_err(|e| SimError::io(&stale, e))?;
    }
    std::fs::create_dir_all(out).map_err(|e| SimError::io(out, e))?;
    for (name, text) in [
        ("compare.json", cmp.to_json()),
        ("compare.md", cmp.to_markdown()),
        (host_name, host_text),
    ] {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| SimError::io(&path, e))?;
    }
    Ok((cmp, host_name))
}

/// What a pool writes beside its comparison, as (file name, text): a pool of one class keeps
/// the first part's `host.json` as it is; one across classes writes every part's (with its
/// folder and seeds) into [`HOSTS_FILE`], so that nothing takes the folder for runs of one class.
pub fn host_file(
    dirs: &[std::path::PathBuf],
    parts: &[Part],
) -> Result<(&'static str, String), SimError> {
    let read = |dir: &Path| -> Result<String, SimError> {
        let path = dir.join(HOST_FILE);
        std::fs::read_to_string(&path).map_err(|e| SimError::io(&path, e))
    };
    let first = dirs.first().ok_or_else(|| data("nothing to pool".into()))?;
    if !classes_differ(parts) {
        return Ok((HOST_FILE, read(first)?));
    }
    let mut hosts = Vec::new();
    for (dir, p) in dirs.iter().zip(parts) {
        let text = read(dir)?;
        let host: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| data(format!("{}: {e}", dir.join(HOST_FILE).display())))?;
        hosts.push(serde_json::json!({
            "folder": p.label,
            "seeds": p.comparison.seeds,
            "host": host,
        }));
    }
    let text = serde_json::to_string_pretty(&hosts).unwrap_or_default() + "\n";
    Ok((HOSTS_FILE, text))
}

/// Where each pooled seed comes from: (seed, part, position in the part's seeds), by seed.
type Origins = Vec<(u64, usize, usize)>;

/// Whether the parts must share one CPU class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classes {
    /// Parts of another class are refused.
    One,
    /// Parts may come from different classes (each part is still one class); the pooled
    /// report names each part's class.
    Mixed,
}

/// Whether the parts' `host.json` classes differ anywhere.
pub fn classes_differ(parts: &[Part]) -> bool {
    parts
        .iter()
        .any(|p| parts[0].host.differs_from(&p.host).is_some())
}

/// The comparison of every part's seeds together.
pub fn pool(parts: &[Part], classes: Classes) -> Result<Comparison, SimError> {
    let first = parts
        .first()
        .ok_or_else(|| data("nothing to pool".into()))?;
    let c0 = &first.comparison;
    for p in &parts[1..] {
        let c = &p.comparison;
        let differs = [
            ("name", c.name != c0.name),
            ("mode", c.mode != c0.mode),
            ("target", c.target != c0.target),
            ("entries", c.entries != c0.entries),
            (
                "evaluation size",
                c.eval_items_effective != c0.eval_items_effective,
            ),
            (
                "bootstrap",
                c.resamples != c0.resamples || c.level != c0.level,
            ),
        ];
        if let Some((what, _)) = differs.iter().find(|(_, d)| *d) {
            return Err(data(format!(
                "{} and {} are not one experiment: they differ in {what}",
                first.label, p.label
            )));
        }
        if let (Classes::One, Some((field, a, b))) = (classes, first.host.differs_from(&p.host)) {
            return Err(data(format!(
                "{} ran on {field} {a} and {} on {field} {b}: results differ between CPU classes; \
                 pool runs of one class, or ask for --across-classes",
                first.label, p.label
            )));
        }
    }
    let mut origins: Origins = Vec::new();
    for (k, p) in parts.iter().enumerate() {
        for (i, &seed) in p.comparison.seeds.iter().enumerate() {
            if let Some(&(_, other, _)) = origins.iter().find(|(s, _, _)| *s == seed) {
                return Err(data(format!(
                    "seed {seed} is in both {} and {}: pool runs of disjoint seeds",
                    parts[other].label, p.label
                )));
            }
            origins.push((seed, k, i));
        }
    }
    origins.sort_unstable();
    let seeds: Vec<u64> = origins.iter().map(|o| o.0).collect();
    let boot = Stream::new(seeds[0], "bootstrap");
    let ci = |xs: &[Option<f64>], stream: u64| drawn(xs, c0, &boot, stream);
    let entry_index = |entry: &str, paired: bool| -> Option<usize> {
        c0.entries.iter().position(|e| {
            if paired {
                format!("{} - {e}", c0.entries[0]) == entry
            } else {
                e == entry
            }
        })
    };
    let rows = |paired: bool| -> Result<Vec<MetricRow>, SimError> {
        rows_of(c0, paired)
            .iter()
            .map(|row| {
                let m = METRICS.iter().position(|(k, _, _)| *k == row.metric);
                let e = entry_index(&row.entry, paired);
                let (Some(m), Some(e)) = (m, e) else {
                    return Err(data(format!(
                        "{}: unknown row {} / {}",
                        first.label, row.metric, row.entry
                    )));
                };
                let per_seed = gather(parts, &origins, |c| {
                    rows_of(c, paired)
                        .iter()
                        .find(|r| r.metric == row.metric && r.entry == row.entry)
                        .map(|r| r.per_seed.clone())
                })?;
                let interval = ci(&per_seed, interval_stream(m, e, paired));
                Ok(MetricRow {
                    metric: row.metric.clone(),
                    entry: row.entry.clone(),
                    per_seed,
                    interval,
                })
            })
            .collect()
    };
    let metrics = rows(false)?;
    let paired = rows(true)?;
    let accuracy: Vec<f64> = metrics
        .iter()
        .find(|r| r.metric == "final_accuracy_trained" && r.entry == c0.entries[0])
        .map(|r| r.per_seed.iter().flatten().copied().collect())
        .unwrap_or_default();
    let final_accuracy_se =
        stats::mean(&accuracy).and_then(|p| stats::accuracy_se(p, c0.eval_items_effective));
    let mut byzantine = Vec::new();
    for (r, row) in c0.byzantine.iter().enumerate() {
        byzantine.push(pool_byzantine(parts, &origins, r, row, &boot)?);
    }
    let mixed = classes_differ(parts);
    Ok(Comparison {
        name: c0.name.clone(),
        mode: c0.mode.clone(),
        target: c0.target.clone(),
        seeds,
        entries: c0.entries.clone(),
        resamples: c0.resamples,
        level: c0.level,
        metrics,
        paired,
        bandit: Vec::new(),
        eval_items_effective: c0.eval_items_effective,
        final_accuracy_se,
        byzantine,
        classes_mixed: mixed,
        pooled_from: {
            parts
                .iter()
                .map(|p| {
                    let seeds: Vec<String> =
                        p.comparison.seeds.iter().map(u64::to_string).collect();
                    let class = if mixed {
                        format!(" (CPU class: {})", p.host.describe())
                    } else {
                        String::new()
                    };
                    format!("{}: seeds {}{class}", p.label, seeds.join(", "))
                })
                .collect()
        },
    })
}

/// The interval over the values present in `xs`, with `c`'s level and resamples, drawn from
/// stream `stream` of `boot`.
fn drawn(xs: &[Option<f64>], c: &Comparison, boot: &Stream, stream: u64) -> Option<Interval> {
    let v: Vec<f64> = xs.iter().flatten().copied().collect();
    stats::bootstrap_mean(&v, c.level, c.resamples, &mut boot.rng_for(stream))
}

/// A comparison's metric rows, or its paired-difference rows.
fn rows_of(c: &Comparison, paired: bool) -> &[MetricRow] {
    if paired {
        &c.paired
    } else {
        &c.metrics
    }
}

/// One row's per-seed values over the pooled seeds: `row` picks the row's values in a part
/// (`None`: the part lacks the row), one value per seed of that part.
fn gather<T: Copy>(
    parts: &[Part],
    origins: &Origins,
    row: impl Fn(&Comparison) -> Option<Vec<T>>,
) -> Result<Vec<T>, SimError> {
    // Each part's row once, kept only when it has a value per seed of the part.
    let per_part: Vec<Option<Vec<T>>> = parts
        .iter()
        .map(|p| row(&p.comparison).filter(|v| v.len() == p.comparison.seeds.len()))
        .collect();
    origins
        .iter()
        .map(|&(seed, k, i)| {
            per_part[k].as_ref().map(|v| v[i]).ok_or_else(|| {
                data(format!(
                    "{}: a row of the first part is missing or has no value for seed {seed}",
                    parts[k].label
                ))
            })
        })
        .collect()
}

/// The `r`-th Byzantine row over the pooled seeds: per-seed values in seed order, intervals
/// drawn again, counts summed over the parts.
fn pool_byzantine(
    parts: &[Part],
    origins: &Origins,
    r: usize,
    row: &ByzantineRow,
    boot: &Stream,
) -> Result<ByzantineRow, SimError> {
    let find = |c: &Comparison| c.byzantine.iter().find(|b| b.entry == row.entry).cloned();
    let clean_per_seed = gather(parts, origins, |c| find(c).map(|b| b.clean_per_seed))?;
    let poisoned_per_seed = gather(parts, origins, |c| find(c).map(|b| b.poisoned_per_seed))?;
    let difference_per_seed = gather(parts, origins, |c| find(c).map(|b| b.difference_per_seed))?;
    let attackers_per_seed = gather(parts, origins, |c| find(c).map(|b| b.attackers_per_seed))?;
    let ci = |xs: &[Option<f64>], stream: u64| drawn(xs, &parts[0].comparison, boot, stream);
    let k = byzantine::row_stream(r);
    let mut out = ByzantineRow {
        entry: row.entry.clone(),
        clean_entry: row.clean_entry.clone(),
        attack: row.attack.clone(),
        clean: ci(&clean_per_seed, k),
        poisoned: ci(&poisoned_per_seed, k + 1),
        difference: ci(&difference_per_seed, k + 2),
        clean_per_seed,
        poisoned_per_seed,
        difference_per_seed,
        attackers_per_seed,
        ..ByzantineRow::default()
    };
    for b in parts.iter().filter_map(|p| find(&p.comparison)) {
        out.poisoned_sent += b.poisoned_sent;
        out.poisoned_accepted += b.poisoned_accepted;
        out.poisoned_rejected += b.poisoned_rejected;
        out.poisoned_clipped += b.poisoned_clipped;
        out.clipped_total += b.clipped_total;
        out.rejects += b.rejects;
        out.screened_total += b.screened_total;
        out.clean_clipped += b.clean_clipped;
        out.clean_rejects += b.clean_rejects;
        out.clean_screened += b.clean_screened;
    }
    Ok(out)
}
