//! Per-device local data for real runs: the workload (SOTU causal LM or spam classification),
//! its non-IID split over the fleet (see [`crate::partition`]) and each device's held-out split,
//! built into the device agent's [`LocalData`]. Every draw comes from the run seed's
//! `partition` stream, so no other part of a run shifts the data.

use aggregator::coordinator::streams::{label, Stream};
use device_agent::data;
use device_agent::job::LocalData;
use device_agent::tokenizer::Tok;
use device_agent::workload::{ClsShard, LmShard, SpamTask};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::partition::{self, DocMeta, TextShard};

/// Which task the fleet trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// State of the Union addresses, causal LM (perplexity, next-token accuracy).
    Sotu,
    /// SpamAssassin, classification through the LM (accuracy).
    Spam,
    /// Generated token streams for the tiny test model: each device follows one of a few
    /// "dialects" (a successor permutation of the vocabulary, followed with probability 0.8).
    Synthetic,
}

/// How SOTU is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SotuSplit {
    President,
    Era,
}

/// The workload section of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadConfig {
    pub kind: WorkloadKind,
    pub sotu_split: SotuSplit,
    /// Dirichlet concentration of the spam label skew (small = more skewed).
    pub dirichlet_alpha: f64,
    /// Tokens per training window (SOTU).
    pub seq_len: usize,
    /// Held-out share of each device's data.
    pub test_fraction: f64,
    /// Held-out windows (SOTU) or e-mails (spam) a device evaluates on, at most.
    pub eval_items: usize,
    /// Training windows or e-mails a device keeps, at most (0 = all).
    pub max_train_items: usize,
    /// E-mails used from the corpus in total (0 = all), sampled per label in proportion.
    pub spam_examples: usize,
    /// Body tokens kept per e-mail.
    pub spam_body_tokens: usize,
    /// Size of a global held-out set (balanced over labels for spam; held-out windows of every
    /// device in turn for SOTU and the synthetic workload) that evaluations of the global
    /// adapter use instead of each device's own held-out data, in real mode; 0 = devices' own.
    pub global_eval_items: usize,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            kind: WorkloadKind::Sotu,
            sotu_split: SotuSplit::President,
            dirichlet_alpha: 0.5,
            seq_len: 64,
            test_fraction: 0.1,
            eval_items: 4,
            max_train_items: 64,
            spam_examples: 2400,
            spam_body_tokens: 48,
            global_eval_items: 0,
        }
    }
}

/// A device's data with a label for reports.
pub struct DeviceData {
    pub data: LocalData,
    pub label: String,
}

/// Every device's data, and the global held-out set when configured.
pub struct Workload {
    pub devices: Vec<DeviceData>,
    pub global_test: Option<LocalData>,
}

fn cut_at_whitespace(text: &str, mut i: usize) -> usize {
    if i >= text.len() {
        return text.len();
    }
    while i < text.len() && !text.is_char_boundary(i) {
        i += 1;
    }
    // Move to the next whitespace so words stay whole (at most 64 bytes further).
    let limit = (i + 64).min(text.len());
    let bytes = text.as_bytes();
    let mut j = i;
    while j < limit && !bytes[j].is_ascii_whitespace() {
        j += 1;
    }
    if j < limit {
        j
    } else {
        i
    }
}

fn piece_text<'a>(texts: &'a [String], p: &partition::Piece) -> &'a str {
    let t = &texts[p.text];
    let s = cut_at_whitespace(t, p.start);
    let e = cut_at_whitespace(t, p.end);
    &t[s..e.max(s)]
}

fn cap<T>(mut v: Vec<T>, n: usize) -> Vec<T> {
    if n > 0 {
        v.truncate(n);
    }
    v
}

/// Build every device's data for `n` devices.
pub fn build(cfg: &WorkloadConfig, n: usize, tok: &Tok, seed: u64) -> Result<Workload, SimError> {
    match cfg.kind {
        WorkloadKind::Sotu => build_sotu(cfg, n, tok, seed),
        WorkloadKind::Spam => build_spam(cfg, n, tok, seed),
        WorkloadKind::Synthetic => Err(SimError::Config(
            "the synthetic workload needs the tiny model (no tokenizer)".into(),
        )),
    }
}

/// The synthetic workload over a vocabulary of `vocab` tokens (see [`WorkloadKind::Synthetic`]).
/// With `global_eval_items`, each device also draws enough further held-out windows of its
/// dialect for the global set (after its own, so its training and test windows are the same
/// with or without one), and the set takes them device by device in turn, as SOTU's does.
pub fn build_synthetic(cfg: &WorkloadConfig, n: usize, vocab: usize, seed: u64) -> Workload {
    use rand::Rng;
    let dialects = n.clamp(1, 4);
    let partition = Stream::new(seed, label::PARTITION);
    let mut rng = partition.rng();
    let perms: Vec<Vec<u32>> = (0..dialects)
        .map(|_| {
            let mut p: Vec<u32> = (0..vocab as u32).collect();
            p.shuffle(&mut rng);
            p
        })
        .collect();
    let train_n = if cfg.max_train_items > 0 {
        cfg.max_train_items
    } else {
        32
    };
    let test_n = cfg.eval_items.max(1);
    let global_n = cfg.global_eval_items.div_ceil(n.max(1));
    let mut held_out: Vec<Vec<Vec<u32>>> = Vec::with_capacity(n);
    let devices = (0..n)
        .map(|d| {
            let k = d % dialects;
            let mut drng = partition.rng_for(d as u64 + 1);
            let window = |rng: &mut ChaCha8Rng| -> Vec<u32> {
                let mut w = Vec::with_capacity(cfg.seq_len + 1);
                let mut t = rng.random_range(0..vocab as u32);
                w.push(t);
                for _ in 0..cfg.seq_len {
                    t = if rng.random::<f64>() < 0.8 {
                        perms[k][t as usize]
                    } else {
                        rng.random_range(0..vocab as u32)
                    };
                    w.push(t);
                }
                w
            };
            let train = (0..train_n).map(|_| window(&mut drng)).collect();
            let test = (0..test_n).map(|_| window(&mut drng)).collect();
            held_out.push((0..global_n).map(|_| window(&mut drng)).collect());
            DeviceData {
                data: LocalData::Lm(LmShard {
                    seq_len: cfg.seq_len,
                    train,
                    test,
                }),
                label: format!("dialect {k}"),
            }
        })
        .collect();
    Workload {
        devices,
        global_test: global_lm_set(&held_out, cfg.global_eval_items, cfg.seq_len),
    }
}

/// A global held-out set of at most `items` windows, taken from every device's held-out
/// windows in turn (the first of each, then the second, ...); `None` for 0 items.
fn global_lm_set(held_out: &[Vec<Vec<u32>>], items: usize, seq_len: usize) -> Option<LocalData> {
    (items > 0).then(|| {
        let mut test = Vec::with_capacity(items);
        let mut k = 0;
        while test.len() < items && held_out.iter().any(|h| k < h.len()) {
            for h in held_out {
                if test.len() < items && k < h.len() {
                    test.push(h[k].clone());
                }
            }
            k += 1;
        }
        LocalData::Lm(LmShard {
            seq_len,
            train: Vec::new(),
            test,
        })
    })
}

fn build_sotu(cfg: &WorkloadConfig, n: usize, tok: &Tok, seed: u64) -> Result<Workload, SimError> {
    let speeches = data::sotu().map_err(|e| SimError::Data(e.to_string()))?;
    let meta: Vec<DocMeta> = speeches
        .iter()
        .map(|s| DocMeta {
            group: s.president.clone(),
            year: s.year,
            chars: s.text.len(),
        })
        .collect();
    let texts: Vec<String> = speeches.into_iter().map(|s| s.text).collect();
    let shards: Vec<TextShard> = match cfg.sotu_split {
        SotuSplit::President => partition::by_group(&meta, n),
        SotuSplit::Era => partition::by_era(&meta, n),
    };
    let mut out = Vec::with_capacity(n);
    let mut held_out: Vec<Vec<Vec<u32>>> = Vec::with_capacity(n);

    for (d, shard) in shards.into_iter().enumerate() {
        let parts: Vec<&str> = shard.pieces.iter().map(|p| piece_text(&texts, p)).collect();
        let mut lm = LmShard::build(
            tok,
            &parts,
            cfg.seq_len,
            cfg.test_fraction,
            Stream::new(seed, label::PARTITION).at(d as u64 + 1, 0),
        )
        .map_err(|e| SimError::Data(e.to_string()))?;
        if lm.train.is_empty() || lm.test.is_empty() {
            return Err(SimError::Data(format!(
                "device {d} ({}) has too little text for windows of {} tokens; use fewer devices or shorter windows",
                shard.label, cfg.seq_len
            )));
        }
        lm.train = cap(lm.train, cfg.max_train_items);
        held_out.push(lm.test.clone());
        lm.test = cap(lm.test, cfg.eval_items);
        out.push(DeviceData {
            data: LocalData::Lm(lm),
            label: shard.label,
        });
    }
    // The global set: held-out windows of every device in turn.
    let global_test = global_lm_set(&held_out, cfg.global_eval_items, cfg.seq_len);
    Ok(Workload {
        devices: out,
        global_test,
    })
}

fn build_spam(cfg: &WorkloadConfig, n: usize, tok: &Tok, seed: u64) -> Result<Workload, SimError> {
    let mut mails = data::spam_assassin().map_err(|e| SimError::Data(e.to_string()))?;
    let partition = Stream::new(seed, label::PARTITION);
    let mut rng: ChaCha8Rng = partition.rng();
    // A seeded sample of the corpus, label proportions kept.
    if cfg.spam_examples > 0 && cfg.spam_examples < mails.len() {
        mails.shuffle(&mut rng);
        let total = mails.len();
        let spam_total = mails.iter().filter(|m| m.spam).count();
        let want_spam = cfg.spam_examples * spam_total / total;
        let want_ham = cfg.spam_examples - want_spam;
        let (mut s, mut h) = (0, 0);
        mails.retain(|m| {
            if m.spam && s < want_spam {
                s += 1;
                true
            } else if !m.spam && h < want_ham {
                h += 1;
                true
            } else {
                false
            }
        });
    }
    let task =
        SpamTask::new(tok, cfg.spam_body_tokens).map_err(|e| SimError::Data(e.to_string()))?;
    let encode = |m: &data::Email| {
        // Tokenise a prefix only: the body is truncated to `spam_body_tokens` anyway.
        let end = cut_at_whitespace(&m.text, cfg.spam_body_tokens * 12);
        task.example(tok, &m.text[..end], m.spam)
            .map_err(|e| SimError::Data(e.to_string()))
    };
    // A balanced global held-out set, taken out before partitioning.
    let mut global = Vec::new();
    if cfg.global_eval_items > 0 {
        let half = cfg.global_eval_items / 2;
        let (mut s, mut h) = (0, 0);
        let mut rest = Vec::with_capacity(mails.len());
        for m in mails.drain(..) {
            if m.spam && s < half {
                s += 1;
                global.push(m);
            } else if !m.spam && h < cfg.global_eval_items - half {
                h += 1;
                global.push(m);
            } else {
                rest.push(m);
            }
        }
        mails = rest;
    }
    let global_test = if global.is_empty() {
        None
    } else {
        let test = global.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        Some(LocalData::Cls {
            task: task.clone(),
            shard: ClsShard {
                train: Vec::new(),
                test,
            },
            pad: tok.eos,
        })
    };
    let labels: Vec<usize> = mails.iter().map(|m| usize::from(m.spam)).collect();
    let per_device =
        partition::dirichlet_label_skew(&labels, 2, n, cfg.dirichlet_alpha, 6, &mut rng);
    let mut out = Vec::with_capacity(n);
    for (d, idx) in per_device.into_iter().enumerate() {
        let mut examples = Vec::with_capacity(idx.len());
        for &i in &idx {
            examples.push(encode(&mails[i])?);
        }
        let spam = examples.iter().filter(|e| e.label).count();
        let mut shard = ClsShard::split(
            examples,
            cfg.test_fraction.max(1.0 / idx.len().max(2) as f64),
            partition.at(d as u64 + 1, 0),
        );
        shard.train = cap(shard.train, cfg.max_train_items);
        shard.test = cap(shard.test, cfg.eval_items);
        if shard.train.is_empty() || shard.test.is_empty() {
            return Err(SimError::Data(format!(
                "device {d} got too few e-mails ({}); use fewer devices or more examples",
                idx.len()
            )));
        }
        let label = format!(
            "{} e-mails, {:.0}% spam",
            idx.len(),
            100.0 * spam as f64 / idx.len().max(1) as f64
        );
        out.push(DeviceData {
            data: LocalData::Cls {
                task: task.clone(),
                shard,
                pad: tok.eos,
            },
            label,
        });
    }
    Ok(Workload {
        devices: out,
        global_test,
    })
}

/// Tokens one held-out evaluation scores and their sequence length (for the time model).
pub fn eval_tokens(d: &LocalData) -> (usize, usize) {
    match d {
        LocalData::Lm(s) => (s.test.len() * s.seq_len, s.seq_len),
        LocalData::Masked(s) => (s.test.len() * s.seq_len, s.seq_len),
        LocalData::Cls { shard, .. } => {
            let seq = shard.test.iter().map(|e| e.prompt.len()).max().unwrap_or(1);
            (shard.test.len() * seq, seq)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_land_on_word_boundaries() {
        let t = "alpha beta gamma délta epsilon";
        let i = cut_at_whitespace(t, 2);
        assert_eq!(&t[..i], "alpha");
        let j = cut_at_whitespace(t, 19); // inside the two-byte 'é'
        assert!(t.is_char_boundary(j));
        assert_eq!(cut_at_whitespace(t, 100), t.len());
    }

    #[test]
    fn a_synthetic_global_set_takes_new_windows_of_every_device_and_leaves_theirs_alone() {
        let lm = |d: &LocalData| match d {
            LocalData::Lm(s) => s.clone(),
            _ => panic!("synthetic data is language modelling"),
        };
        let cfg = WorkloadConfig {
            kind: WorkloadKind::Synthetic,
            seq_len: 8,
            eval_items: 2,
            max_train_items: 4,
            ..WorkloadConfig::default()
        };
        let without = build_synthetic(&cfg, 3, 32, 7);
        assert!(without.global_test.is_none());
        let with = build_synthetic(
            &WorkloadConfig {
                global_eval_items: 7,
                ..cfg.clone()
            },
            3,
            32,
            7,
        );
        // Each device's own windows are the same with or without the set.
        for (a, b) in without.devices.iter().zip(&with.devices) {
            assert_eq!(lm(&a.data), lm(&b.data));
        }
        let global = lm(with.global_test.as_ref().unwrap());
        assert_eq!(global.test.len(), 7);
        assert!(global.train.is_empty());
        // None of them is a window some device trains or tests on, and the first three come
        // from devices 0, 1, 2 in turn (device d follows dialect d: 80% of its steps).
        for w in &global.test {
            assert_eq!(w.len(), 9);
            for d in &with.devices {
                let s = lm(&d.data);
                assert!(!s.train.contains(w) && !s.test.contains(w));
            }
        }
        let follows = |w: &[u32], d: &LmShard| {
            // How often a window's step matches the device's own training windows' steps.
            let pairs: std::collections::HashSet<(u32, u32)> = d
                .train
                .iter()
                .flat_map(|t| t.windows(2).map(|p| (p[0], p[1])))
                .collect();
            w.windows(2)
                .filter(|p| pairs.contains(&(p[0], p[1])))
                .count()
        };
        for (k, w) in global.test.iter().take(3).enumerate() {
            let best = (0..3)
                .max_by_key(|&d| follows(w, &lm(&with.devices[d].data)))
                .unwrap();
            assert_eq!(best, k, "window {k}");
        }
    }
}
