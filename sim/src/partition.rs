//! Non-IID data partitioning over any number of devices, as pure functions on metadata (so
//! they are tested without the data sets):
//!
//! - **SOTU by president**: with no more devices than presidents, consecutive presidents are
//!   grouped into eras of about equal text volume, one era per device. With more devices than
//!   presidents, every president gets devices in proportion to their text volume (at least
//!   one), and a president's speeches, concatenated in year order, are cut into that many
//!   contiguous pieces of equal size: devices that share a president hold different parts of
//!   their speeches.
//! - **SOTU by era**: the whole corpus in year order, cut into equal contiguous pieces.
//! - **Label skew**: per label, Dirichlet(alpha) proportions over devices; small alpha gives
//!   devices that see mostly one label. Every device gets at least `min_per_device` examples.

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::apportion::largest_remainder;
use crate::sampling::dirichlet;

/// A piece of one text: characters `[start, end)` of text `text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub text: usize,
    pub start: usize,
    pub end: usize,
}

/// What one device holds of a text corpus.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextShard {
    pub pieces: Vec<Piece>,
    /// A label for reports (the presidents or years covered).
    pub label: String,
}

/// Metadata of one document for partitioning: its group key (president), year and length.
#[derive(Debug, Clone, PartialEq)]
pub struct DocMeta {
    pub group: String,
    pub year: u32,
    pub chars: usize,
}

/// Cut `[0, len)` into `k` contiguous ranges of about equal size.
fn cut(len: usize, k: usize) -> Vec<(usize, usize)> {
    let k = k.max(1);
    (0..k).map(|i| (len * i / k, len * (i + 1) / k)).collect()
}

/// Split a sequence of documents (in order) into `k` contiguous pieces of equal total length,
/// cutting inside documents where needed.
fn split_stream(docs: &[(usize, usize)], k: usize) -> Vec<Vec<Piece>> {
    let total: usize = docs.iter().map(|d| d.1).sum();
    let bounds = cut(total, k);
    let mut out = Vec::with_capacity(k);
    for (lo, hi) in bounds {
        let mut pieces = Vec::new();
        let mut offset = 0;
        for &(text, len) in docs {
            let (a, b) = (offset, offset + len);
            offset = b;
            let s = lo.max(a);
            let e = hi.min(b);
            if s < e {
                pieces.push(Piece {
                    text,
                    start: s - a,
                    end: e - a,
                });
            }
        }
        out.push(pieces);
    }
    out
}

/// Groups in order of first appearance by year, each with its documents in year order.
fn groups_by_year(docs: &[DocMeta]) -> Vec<(String, Vec<usize>)> {
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by_key(|&i| (docs[i].year, i));
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for i in order {
        match groups.iter_mut().find(|(g, _)| *g == docs[i].group) {
            Some((_, v)) => v.push(i),
            None => groups.push((docs[i].group.clone(), vec![i])),
        }
    }
    groups
}

fn year_label(docs: &[DocMeta], pieces: &[Piece]) -> String {
    let years: Vec<u32> = pieces.iter().map(|p| docs[p.text].year).collect();
    match (years.iter().min(), years.iter().max()) {
        (Some(a), Some(b)) if a == b => format!("{a}"),
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => String::new(),
    }
}

/// SOTU split by president (see the module docs) over `n` devices.
pub fn by_group(docs: &[DocMeta], n: usize) -> Vec<TextShard> {
    let groups = groups_by_year(docs);
    let size = |idx: &[usize]| idx.iter().map(|&i| docs[i].chars).sum::<usize>();
    if n <= groups.len() {
        // Consecutive groups into eras of about equal volume.
        let total: usize = groups.iter().map(|g| size(&g.1)).sum();
        let mut shards = vec![TextShard::default(); n];
        let mut acc = 0usize;
        let mut names: Vec<Vec<String>> = vec![Vec::new(); n];
        for (gi, (name, idx)) in groups.iter().enumerate() {
            let sz = size(idx);
            // Assign by the group's midpoint, but never leave a later device empty.
            let mid = acc + sz / 2;
            let mut d = (mid * n / total.max(1)).min(n - 1);
            let remaining_groups = groups.len() - gi;
            let first_empty = shards.iter().position(|s| s.pieces.is_empty()).unwrap_or(n);
            if n - first_empty >= remaining_groups {
                d = first_empty;
            }
            acc += sz;
            for &i in idx {
                shards[d].pieces.push(Piece {
                    text: i,
                    start: 0,
                    end: docs[i].chars,
                });
            }
            names[d].push(name.clone());
        }
        for (s, nm) in shards.iter_mut().zip(names) {
            s.label = format!("{} ({})", nm.join(", "), year_label(docs, &s.pieces));
        }
        return shards;
    }
    // More devices than groups: devices per group by volume (at least one each).
    let sizes: Vec<f64> = groups.iter().map(|g| size(&g.1) as f64).collect();
    let total: f64 = sizes.iter().sum();
    let spare = n - groups.len();
    let exact: Vec<f64> = sizes.iter().map(|s| s / total * spare as f64).collect();
    // At least one each, the spare devices by largest remainder.
    let k: Vec<usize> = largest_remainder(&exact, spare)
        .into_iter()
        .map(|c| 1 + c)
        .collect();
    let mut shards = Vec::with_capacity(n);
    for ((name, idx), kg) in groups.iter().zip(k) {
        let stream: Vec<(usize, usize)> = idx.iter().map(|&i| (i, docs[i].chars)).collect();
        for (j, pieces) in split_stream(&stream, kg).into_iter().enumerate() {
            let label = format!("{name} part {}/{kg} ({})", j + 1, year_label(docs, &pieces));
            shards.push(TextShard { pieces, label });
        }
    }
    shards
}

/// SOTU split by era: the corpus in year order, cut into `n` equal contiguous pieces.
pub fn by_era(docs: &[DocMeta], n: usize) -> Vec<TextShard> {
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by_key(|&i| (docs[i].year, i));
    let stream: Vec<(usize, usize)> = order.iter().map(|&i| (i, docs[i].chars)).collect();
    split_stream(&stream, n)
        .into_iter()
        .map(|pieces| {
            let label = year_label(docs, &pieces);
            TextShard { pieces, label }
        })
        .collect()
}

/// Label-skewed split of examples with `labels` (0..n_labels) over `n` devices: per label a
/// Dirichlet(alpha) draw decides each device's share. Returns example indices per device.
/// Devices left with fewer than `min_per_device` examples take them from the largest devices.
pub fn dirichlet_label_skew(
    labels: &[usize],
    n_labels: usize,
    n: usize,
    alpha: f64,
    min_per_device: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for c in 0..n_labels {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        idx.shuffle(rng);
        let p = dirichlet(alpha, n, rng);
        // Cumulative cut points.
        let mut acc = 0.0;
        let mut start = 0;
        for (d, pd) in p.iter().enumerate() {
            acc += pd;
            let end = if d + 1 == n {
                idx.len()
            } else {
                ((acc * idx.len() as f64).round() as usize).min(idx.len())
            };
            out[d].extend_from_slice(&idx[start..end.max(start)]);
            start = end.max(start);
        }
    }
    let min = min_per_device.min(labels.len() / n.max(1));
    while let Some(poor) = (0..n).find(|&d| out[d].len() < min) {
        let rich = (0..n)
            .max_by_key(|&d| (out[d].len(), std::cmp::Reverse(d)))
            .expect("a poor device was found, so 0..n is not empty");
        if out[rich].len() <= min {
            break;
        }
        let x = out[rich]
            .pop()
            .expect("rich holds more than min >= 0 items");
        out[poor].push(x);
    }
    for v in &mut out {
        v.sort_unstable();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn corpus() -> Vec<DocMeta> {
        // Three presidents, uneven volumes, listed out of year order.
        let mut v = Vec::new();
        for (g, years, chars) in [
            ("b", 1800..1804, 100),
            ("a", 1790..1798, 200),
            ("c", 1810..1811, 50),
        ] {
            for y in years {
                v.push(DocMeta {
                    group: g.into(),
                    year: y,
                    chars,
                });
            }
        }
        v
    }

    fn covered(shards: &[TextShard]) -> usize {
        shards
            .iter()
            .flat_map(|s| &s.pieces)
            .map(|p| p.end - p.start)
            .sum()
    }

    #[test]
    fn few_devices_get_whole_presidents_in_eras() {
        let docs = corpus();
        let total: usize = docs.iter().map(|d| d.chars).sum();
        for n in 1..=3 {
            let s = by_group(&docs, n);
            assert_eq!(s.len(), n);
            assert!(s.iter().all(|x| !x.pieces.is_empty()), "n={n}: {s:?}");
            assert_eq!(covered(&s), total);
            // A president never spans two devices.
            for g in ["a", "b", "c"] {
                let holders = s
                    .iter()
                    .filter(|x| x.pieces.iter().any(|p| docs[p.text].group == g))
                    .count();
                assert_eq!(holders, 1, "n={n} president {g}");
            }
        }
        assert!(by_group(&docs, 3)[0].label.starts_with("a (1790-1797)"));
    }

    #[test]
    fn many_devices_share_presidents_in_disjoint_parts() {
        let docs = corpus();
        let total: usize = docs.iter().map(|d| d.chars).sum();
        let s = by_group(&docs, 10);
        assert_eq!(s.len(), 10);
        assert_eq!(covered(&s), total);
        assert!(s
            .iter()
            .all(|x| x.pieces.iter().map(|p| p.end - p.start).sum::<usize>() > 0));
        // Each shard holds one president only; the biggest president has the most devices.
        for x in &s {
            let g: std::collections::BTreeSet<_> =
                x.pieces.iter().map(|p| &docs[p.text].group).collect();
            assert_eq!(g.len(), 1);
        }
        let count = |g: &str| {
            s.iter()
                .filter(|x| docs[x.pieces[0].text].group == g)
                .count()
        };
        assert!(count("a") > count("b") && count("b") >= count("c") && count("c") >= 1);
        // 81 devices over 3 presidents still works, and by era too.
        assert_eq!(by_group(&docs, 81).len(), 81);
        let e = by_era(&docs, 7);
        assert_eq!(covered(&e), total);
    }

    #[test]
    fn dirichlet_skew_covers_everything_and_skews_with_small_alpha() {
        let labels: Vec<usize> = (0..2000).map(|i| i % 2).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let skewed = dirichlet_label_skew(&labels, 2, 20, 0.1, 10, &mut rng);
        let flat = dirichlet_label_skew(&labels, 2, 20, 100.0, 10, &mut rng);
        for split in [&skewed, &flat] {
            let mut all: Vec<usize> = split.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..2000).collect::<Vec<_>>());
            assert!(split.iter().all(|v| v.len() >= 10));
        }
        let purity = |s: &Vec<Vec<usize>>| {
            s.iter()
                .map(|v| {
                    let spam =
                        v.iter().filter(|&&i| labels[i] == 1).count() as f64 / v.len() as f64;
                    spam.max(1.0 - spam)
                })
                .sum::<f64>()
                / s.len() as f64
        };
        assert!(purity(&skewed) > 0.8, "{}", purity(&skewed));
        assert!(purity(&flat) < 0.65, "{}", purity(&flat));
    }
}
