//! What `join` loads before it connects: the base model (or the tiny test model) and the
//! device's local data (a bundled data set, synthetic windows for the tiny model, or the
//! user's own files), and the RAM it reports.

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{setup, ClientError, JoinArgs};
use crate::backend::BackendKind;
use crate::job::LocalData;
use crate::model::{Llama, ModelConfig};
use crate::tokenizer::Tok;
use crate::user_data::UserDataConfig;
use crate::workload::{ClsShard, LmShard, SpamTask};
use crate::{assets, data, weights};

/// The tiny test model: 4 blocks, vocab 256, d_model 64, 4 query / 2 KV heads of 16, FFN 128,
/// random weights from a fixed seed (every device holds the same base).
pub fn tiny_model(device: &burn::tensor::Device) -> Llama {
    Llama::random(
        ModelConfig::dense(256, 64, 4, 4, 2, 16, 128, true),
        7,
        device,
    )
}

/// Synthetic token windows for the tiny model: a stream where each token follows its
/// predecessor by a fixed rule (`next = 37 * t + 11 mod 256`) with probability 0.8 and is
/// uniform otherwise, so there is something to learn; `seed` draws the noise.
pub fn synthetic_shard(seq_len: usize, train: usize, test: usize, seed: u64) -> LmShard {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let window = |rng: &mut ChaCha8Rng| {
        let mut t: u32 = rng.random_range(0..256);
        let mut w = Vec::with_capacity(seq_len + 1);
        for _ in 0..=seq_len {
            w.push(t);
            t = if rng.random::<f32>() < 0.8 {
                (37 * t + 11) % 256
            } else {
                rng.random_range(0..256)
            };
        }
        w
    };
    LmShard {
        seq_len,
        train: (0..train).map(|_| window(&mut rng)).collect(),
        test: (0..test).map(|_| window(&mut rng)).collect(),
    }
}

/// A `FROM-TO` range of years or chapters.
pub fn parse_range(s: &str) -> Result<(u32, u32), ClientError> {
    let bad = || ClientError::Setup {
        what: format!("range '{s}'"),
        detail: "expected FROM-TO, e.g. 1990-2021".into(),
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

/// Total memory of this machine, from `/proc/meminfo` (4 GiB when unknown).
pub fn machine_ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30)
}

/// RAM the device offers its rounds: `ram` (`--ram-mb` or the machine's) less what bf16 or
/// int8 products keep beside the fp32 weights ([`crate::cost::kept_bytes`]), which no round's
/// memory estimate counts; so the aggregator's plans and the session's out-of-memory pre-check
/// leave room for it.
pub fn training_ram(ram: u64, model: &Llama) -> u64 {
    ram.saturating_sub(crate::cost::kept_bytes(&model.config, model.precision()))
}

/// Loads the base model (and its tokenizer when it has one).
pub(super) fn load_model(args: &JoinArgs) -> Result<(Llama, Option<Tok>), ClientError> {
    let (mut model, tok) = load_base(args)?;
    let precision = model
        .apply_precision(&args.precision)
        .map_err(|e| setup("--precision")(e.to_string()))?;
    eprintln!("precision: {precision} products on the frozen base");
    Ok((model, tok))
}

/// The base model `--model` names, on `--backend`.
fn load_base(args: &JoinArgs) -> Result<(Llama, Option<Tok>), ClientError> {
    let backend: BackendKind = args
        .backend
        .parse()
        .map_err(|e: crate::backend::BackendError| setup("--backend")(e.to_string()))?;
    let device = backend
        .device()
        .map_err(|e| setup(format!("backend {}", args.backend))(e.to_string()))?;
    match args.model.as_deref() {
        Some("tiny") if args.dataset != "synthetic" => Err(setup("--model tiny")(
            "the tiny test model has a 256-token vocabulary: use --dataset synthetic".into(),
        )),
        Some("tiny") => Ok((tiny_model(&device), None)),
        other => {
            let path = match other {
                Some(p) => PathBuf::from(p),
                None => assets::default_model()
                    .map_err(|e| setup("the default model")(e.to_string()))?,
            };
            let (model, tok) = weights::load(&path, &device)
                .map_err(|e| setup(format!("loading {}", path.display()))(e.to_string()))?;
            Ok((model, Some(tok)))
        }
    }
}

/// Builds the device's local data.
pub(super) fn load_data(
    args: &JoinArgs,
    base: &Llama,
    tok: Option<&Tok>,
) -> Result<LocalData, ClientError> {
    let seed = args.data_seed.unwrap_or(args.id);
    let seq_len = args.seq_len.min(base.config.max_seq_len).max(2);
    let need_tok = || {
        tok.ok_or_else(|| {
            setup(format!("--dataset {}", args.dataset))("this model has no tokenizer".into())
        })
    };
    let texts_shard = |texts: Vec<String>| -> Result<LocalData, ClientError> {
        if texts.is_empty() {
            return Err(setup(format!("--dataset {}", args.dataset))(
                "the selection holds no documents".into(),
            ));
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let shard = LmShard::build(need_tok()?, &refs, seq_len, 0.1, seed)
            .map_err(|e| setup("tokenising the data")(e.to_string()))?;
        Ok(LocalData::Lm(shard))
    };
    if let Some(path) = &args.data {
        let what = format!("--data {}", path.display());
        let tok = tok.ok_or_else(|| setup(what.clone())("this model has no tokenizer".into()))?;
        let cfg = UserDataConfig {
            seq_len,
            test_fraction: args.test_fraction,
            seed,
            ..UserDataConfig::default()
        };
        return LocalData::from_files(path, tok, &cfg).map_err(|e| setup(what)(e.to_string()));
    }
    match args.dataset.as_str() {
        "synthetic" => {
            if base.config.vocab_size < 256 {
                return Err(setup("--dataset synthetic")(
                    "needs a vocabulary of at least 256 tokens".into(),
                ));
            }
            Ok(LocalData::Lm(synthetic_shard(seq_len, 64, 16, seed)))
        }
        "sotu" => {
            let (a, b) = parse_range(&args.years)?;
            let speeches =
                data::sotu().map_err(|e| setup("State of the Union data")(e.to_string()))?;
            texts_shard(
                speeches
                    .into_iter()
                    .filter(|s| (a..=b).contains(&s.year))
                    .map(|s| s.text)
                    .collect(),
            )
        }
        "moby-dick" => {
            let (a, b) = parse_range(&args.chapters)?;
            let texts = (a..=b)
                .map(|c| data::moby_dick_chapter(c as usize).map(|d| d.text))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| setup("Moby-Dick data")(e.to_string()))?;
            texts_shard(texts)
        }
        "spam" => {
            let tok = need_tok()?;
            let task = SpamTask::new(tok, 192).map_err(|e| setup("spam task")(e.to_string()))?;
            let mut mails =
                data::spam_assassin().map_err(|e| setup("SpamAssassin data")(e.to_string()))?;
            use rand::seq::SliceRandom;
            mails.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            let half = args.examples / 2;
            let pick = mails
                .iter()
                .filter(|m| m.spam)
                .take(half)
                .chain(mails.iter().filter(|m| !m.spam).take(args.examples - half));
            let examples = pick
                .map(|m| task.example(tok, &m.text, m.spam))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| setup("tokenising e-mails")(e.to_string()))?;
            let shard = ClsShard::split(examples, 0.25, seed);
            Ok(LocalData::Cls {
                task,
                shard,
                pad: tok.eos,
            })
        }
        other => Err(setup("--dataset")(format!(
            "unknown data set '{other}' (sotu, spam, moby-dick, synthetic)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With bf16 products (where this CPU has them) the reported RAM leaves room for the kept
    /// packings; in fp32 it is the RAM as given.
    #[test]
    fn reported_ram_leaves_room_for_bf16_packings() {
        let mut model = tiny_model(&burn::tensor::Device::flex());
        assert_eq!(training_ram(1 << 30, &model), 1 << 30);
        let kept = crate::cost::kept_bytes(&model.config, crate::bf16::Precision::Bf16);
        assert!(kept > 0);
        let (p, _) = model.set_precision(crate::bf16::Precision::Bf16);
        let want = if p == crate::bf16::Precision::Bf16 {
            (1 << 30) - kept
        } else {
            1 << 30
        };
        assert_eq!(training_ram(1 << 30, &model), want);
        assert_eq!(
            training_ram(kept / 2, &model),
            if p == crate::bf16::Precision::Bf16 {
                0
            } else {
                kept / 2
            }
        );
    }
    use crate::wire;
    use protocol::ModelDims;

    #[test]
    fn synthetic_shards_are_deterministic_and_follow_the_rule_mostly() {
        let a = synthetic_shard(16, 8, 2, 5);
        assert_eq!(a, synthetic_shard(16, 8, 2, 5));
        assert_ne!(a, synthetic_shard(16, 8, 2, 6));
        let pairs: Vec<(u32, u32)> = a
            .train
            .iter()
            .flat_map(|w| w.windows(2).map(|p| (p[0], p[1])).collect::<Vec<_>>())
            .collect();
        let follow = pairs
            .iter()
            .filter(|(x, y)| (37 * x + 11) % 256 == *y)
            .count();
        let share = follow as f64 / pairs.len() as f64;
        assert!((0.7..0.95).contains(&share), "{share}");
        assert!(a.train.iter().all(|w| w.len() == 17));
    }

    #[test]
    fn ranges_parse_strictly() {
        assert_eq!(parse_range("1990-2021").unwrap(), (1990, 2021));
        assert!(parse_range("1990").is_err());
        assert!(parse_range("a-b").is_err());
    }

    #[test]
    fn the_tiny_model_has_the_dims_its_aggregator_config_names() {
        let m = tiny_model(&burn::tensor::Device::flex());
        assert_eq!(
            wire::dims_of(&m.config),
            ModelDims {
                n_blocks: 4,
                d_model: 64,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 16,
                ffn: 128
            }
        );
    }
}
