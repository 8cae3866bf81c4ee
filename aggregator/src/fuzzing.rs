//! Invariant checks of the `aggregate` fuzz target (`fuzz/`), shared with the corpus replay
//! (`tests/tests/fuzz_corpus.rs`), and that target's seed inputs. Compiled with the `fuzzing`
//! feature only; not part of the aggregator's API.
//!
//! An input is two knob bytes, then a stream of length-prefixed frames (the wire codec's
//! framing). Every `Update` among the first [`MAX_UPDATES`] frames becomes a contribution to a
//! round over [`FUZZ_DIMS`] (small, so the exact method's SVD stays cheap), aggregated with the
//! real [`Aggregation`] under the method the first knob byte's top three bits choose (one of
//! [`METHODS`]: HetLoRA, plain mean, exact with full and randomised SVD, median, trimmed mean,
//! and HetLoRA and exact with norm clipping). One method per input, not all of them: the fuzzer
//! reaches each through the knob (the seeds carry every one), and an execution costs three
//! aggregations instead of eighteen, which is what makes ten million executions affordable.
//!
//! Two paths:
//! - *as a round checks*: what the coordinator does before [`Aggregation::add`] (the adapter's
//!   alpha must equal the round's, the sample count is clipped to the round's bound); whatever
//!   it accepts must finish into a well-formed, **finite** global adapter.
//! - *raw*: the decoded update straight into [`Aggregation::add`] (hostile alpha and sample
//!   counts included); no panic, rejects are errors with a reason, and a global that finishes is
//!   well formed (the coordinator's finiteness check before a global replaces the previous one
//!   is what stands behind this path).

use protocol::fuzzing::FUZZ_DIMS;
use protocol::{
    decode_frame, encode_frame, Decoded, DeviceId, Message, Update, DEFAULT_MAX_FRAME_BYTES,
};
use rand::SeedableRng;

use crate::aggregate::{Aggregation, AggregationConfig, AggregationMethod, GlobalAdapter, SvdMode};

/// The round's LoRA alpha (the seed updates' alpha).
pub const ROUND_ALPHA: f32 = 16.0;

/// The round's sample bound (`local_steps x batch_size` of a 40-step, batch-4 round).
pub const SAMPLE_BOUND: u64 = 160;

/// Updates aggregated per input at most (the rest of the stream is ignored).
pub const MAX_UPDATES: usize = 8;

/// How many method configurations [`configs`] lists (the first knob byte's top three bits pick
/// one).
pub const METHODS: usize = 8;

/// The method configurations an input can be aggregated under.
fn configs(weight_by_samples: bool) -> [AggregationConfig; METHODS] {
    let base = AggregationConfig {
        weight_by_samples,
        ..AggregationConfig::default()
    };
    let with = |method, svd, clip_norm| AggregationConfig {
        method,
        svd,
        clip_norm,
        ..base.clone()
    };
    [
        with(AggregationMethod::HetLora, SvdMode::Full, None),
        with(AggregationMethod::Mean, SvdMode::Full, None),
        with(AggregationMethod::Exact, SvdMode::Full, None),
        with(AggregationMethod::Exact, SvdMode::Randomized, None),
        with(AggregationMethod::Median, SvdMode::Full, None),
        with(AggregationMethod::TrimmedMean, SvdMode::Full, None),
        with(AggregationMethod::HetLora, SvdMode::Full, Some(0.5)),
        with(AggregationMethod::Exact, SvdMode::Full, Some(0.5)),
    ]
}

/// What the knob bytes choose.
struct Knobs {
    max_rank: u32,
    weight_by_samples: bool,
    /// 0: no previous global; 1: zeros; 2: a LoRA start at the round's rank; 3: a LoRA start
    /// at another rank (re-ranked by `finish`).
    previous: u8,
    /// Index into [`configs`].
    method: usize,
    seed: u64,
}

impl Knobs {
    fn of(a: u8, b: u8) -> Knobs {
        Knobs {
            max_rank: 1 + u32::from(a & 3),
            weight_by_samples: a & 4 != 0,
            previous: (a >> 3) & 3,
            method: usize::from(a >> 5),
            seed: u64::from(b),
        }
    }

    fn previous(&self) -> Option<GlobalAdapter> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        match self.previous {
            0 => None,
            1 => Some(GlobalAdapter::zeros(FUZZ_DIMS, self.max_rank)),
            2 => Some(GlobalAdapter::init_lora(
                FUZZ_DIMS,
                self.max_rank,
                ROUND_ALPHA,
                &mut rng,
            )),
            _ => Some(GlobalAdapter::init_lora(
                FUZZ_DIMS,
                self.max_rank % 4 + 1,
                ROUND_ALPHA,
                &mut rng,
            )),
        }
    }
}

/// The updates among the first [`MAX_UPDATES`] whole frames of `stream`.
fn decode_updates(mut stream: &[u8]) -> Vec<Update> {
    let mut updates = Vec::new();
    for _ in 0..MAX_UPDATES {
        match decode_frame(stream, DEFAULT_MAX_FRAME_BYTES) {
            Ok(Decoded::Frame { message, consumed }) => {
                if let Message::Update(u) = message {
                    updates.push(u);
                }
                stream = &stream[consumed..];
            }
            Ok(Decoded::NeedMore { .. }) | Err(_) => break,
        }
    }
    updates
}

/// Feeds `updates` to one aggregation; `as_round` applies the coordinator's checks first.
/// Returns the global it finished into (`None` when nothing could be aggregated or finishing
/// failed with an error) and how many updates were accepted.
fn aggregate(
    config: &AggregationConfig,
    knobs: &Knobs,
    previous: Option<&GlobalAdapter>,
    updates: &[Update],
    as_round: bool,
) -> (Option<GlobalAdapter>, usize) {
    let mut agg = match Aggregation::new(FUZZ_DIMS, knobs.max_rank, config.clone()) {
        Ok(agg) => agg,
        Err(e) => panic!("the fuzz configuration {config:?} is refused: {e}"),
    };
    let limit = (FUZZ_DIMS.n_layers() as f64).sqrt() * config.max_layer_delta_norm;
    for (i, u) in updates.iter().enumerate() {
        let mut samples = u.stats.samples;
        if as_round {
            if u.adapter.alpha != ROUND_ALPHA {
                continue;
            }
            samples = samples.min(SAMPLE_BOUND);
        }
        let contribution = crate::aggregate::Contribution {
            device: DeviceId(i as u64),
            adapter: u.adapter.clone(),
            kept: u.kept.clone(),
            samples,
        };
        match agg.add(contribution) {
            Ok(accepted) => {
                let (norm, clip) = (accepted.delta_norm, accepted.clip_factor);
                assert!(norm.is_finite() && norm >= 0.0 && norm <= limit * (1.0 + 1e-9));
                assert!(clip > 0.0 && clip <= 1.0, "clip factor {clip}");
                if let Some(c) = config.clip_norm {
                    assert!(norm * clip <= c * (1.0 + 1e-9) || clip == 1.0);
                }
            }
            Err(e) => {
                let reason = e.reject_reason();
                assert!(!reason.to_string().is_empty() && !e.to_string().is_empty());
            }
        }
    }
    let accepted = agg.len();
    let global = match agg.finish(previous) {
        Ok(global) => global,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return (None, accepted);
        }
    };
    assert!(
        global.is_well_formed(),
        "{} finished malformed",
        config.method.name()
    );
    assert_eq!((global.dims, global.rank), (FUZZ_DIMS, knobs.max_rank));
    if accepted == 0 {
        let expected = match previous {
            Some(p) => p.with_rank(knobs.max_rank),
            None => GlobalAdapter::zeros(FUZZ_DIMS, knobs.max_rank),
        };
        assert_eq!(
            bits(&global),
            bits(&expected),
            "{}: an aggregation of nothing changed the global",
            config.method.name()
        );
    }
    (Some(global), accepted)
}

/// Every value of a global adapter as bits (compares NaN and signed zeros exactly).
fn bits(g: &GlobalAdapter) -> Vec<u32> {
    g.layers
        .iter()
        .flat_map(|l| l.a.iter().chain(&l.b).map(|x| x.to_bits()))
        .collect()
}

/// Decodes the updates `data` carries and aggregates them under the method its knobs choose,
/// as a round checks them and raw (see the module docs).
///
/// Invariants: no panic; an accepted update's delta norm is finite and within the per-layer
/// limit, its clip factor in `(0, 1]`; a refused one has a reason; a finished global is well
/// formed, at the aggregation's rank, equal to the previous one when nothing was accepted, and
/// on the round path finite; the same input aggregates to the same bits twice.
pub fn check_aggregate(data: &[u8]) {
    let (Some(&a), Some(&b)) = (data.first(), data.get(1)) else {
        return;
    };
    let knobs = Knobs::of(a, b);
    let updates = decode_updates(&data[2..]);
    let previous = knobs.previous();
    let config = &configs(knobs.weight_by_samples)[knobs.method];
    let (global, _) = aggregate(config, &knobs, previous.as_ref(), &updates, true);
    if let Some(g) = &global {
        assert!(
            g.is_finite(),
            "{} (clip {:?}) accepted updates into a non-finite global",
            config.method.name(),
            config.clip_norm
        );
    }
    aggregate(config, &knobs, previous.as_ref(), &updates, false);
    let again = aggregate(config, &knobs, previous.as_ref(), &updates, true).0;
    assert_eq!(
        global.as_ref().map(bits),
        again.as_ref().map(bits),
        "{} is not deterministic",
        config.method.name()
    );
}

/// The seed inputs of the `aggregate` target, named: the seed updates of
/// [`protocol::fuzzing::seed_messages`] (full and pruned, f32 and f16) framed back to back
/// under several knob settings, each under every method, and one update alone.
pub fn seed_inputs() -> Vec<(String, Vec<u8>)> {
    let frames: Vec<Vec<u8>> = protocol::fuzzing::seed_messages()
        .into_iter()
        .filter(|m| matches!(m, Message::Update(_)))
        .map(|m| match encode_frame(&m) {
            Ok(frame) => frame,
            Err(e) => panic!("a seed update does not encode: {e}"),
        })
        .collect();
    let all: Vec<u8> = frames.concat();
    let mut seeds = Vec::new();
    for (name, [a, b]) in [
        ("rank2-samples", [0x05, 0]),
        ("rank4-prev-lora", [0x17, 3]),
        ("rank1-prev-zeros", [0x08, 5]),
        ("rank2-prev-rerank", [0x1d, 7]),
    ] {
        for (m, config) in configs(false).iter().enumerate() {
            let mut input = vec![a | (m as u8) << 5, b];
            input.extend_from_slice(&all);
            let clip = if config.clip_norm.is_some() {
                "-clip"
            } else {
                ""
            };
            let svd = match (config.method, config.svd) {
                (AggregationMethod::Exact, SvdMode::Randomized) => "-rsvd",
                _ => "",
            };
            let method = config.method.name();
            seeds.push((format!("seed-{name}-{method}{svd}{clip}"), input));
        }
    }
    if let Some(first) = frames.first() {
        let mut input = vec![0x01, 2];
        input.extend_from_slice(first);
        seeds.push(("seed-one-update".into(), input));
    }
    seeds
}

/// The method index `data` chooses (below [`METHODS`]) and how many of the updates it carries
/// a round accepts under that method; `None` for an input too short to carry the knobs. For the
/// replay test: a seed or corpus whose updates all bounce (say, frames of an older protocol
/// version) would leave the aggregation code unexercised while every replay passes.
pub fn accepted_as_round(data: &[u8]) -> Option<(usize, usize)> {
    let (Some(&a), Some(&b)) = (data.first(), data.get(1)) else {
        return None;
    };
    let knobs = Knobs::of(a, b);
    let updates = decode_updates(&data[2..]);
    let config = &configs(knobs.weight_by_samples)[knobs.method];
    let accepted = aggregate(config, &knobs, knobs.previous().as_ref(), &updates, true).1;
    Some((knobs.method, accepted))
}
