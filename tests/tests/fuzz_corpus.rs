//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and kept regression inputs
//! (`fuzz/regressions/<target>/`) through the same checks the fuzz targets run, so the stable
//! test suite re-asserts every invariant the fuzzers held on every input they kept. (The
//! `agent_session` target's corpus replays as a device-agent unit test,
//! `session::fuzzing::tests`, so that this crate does not link burn.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aggregator::fuzzing::{accepted_as_round, check_aggregate, seed_inputs, METHODS};

use protocol::fuzzing::{
    allocation_tracking_active, check_decode_validate, check_frame_stream, check_round_trip,
    seed_messages, FUZZ_DIMS,
};
use protocol::{
    decode_body, decode_frame, encode_frame, validate_adapter, validate_update, Decoded, Message,
    RoundConfig, ValidationLimits, DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_BYTES,
};

#[global_allocator]
static ALLOC: test_support::CountingAllocator = test_support::CountingAllocator;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 4] = [
    ("frame_decoder", check_frame_stream),
    ("decode_validate", check_decode_validate),
    ("round_trip", check_round_trip),
    ("aggregate", check_aggregate),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every regular file directly under `dir`, sorted (empty if `dir` does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, check: Check) -> usize {
    let corpus = inputs(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "no corpus for {target} under fuzz/corpus/{target}"
    );
    let regressions = inputs(&fuzz_dir().join("regressions").join(target));
    for path in corpus.iter().chain(&regressions) {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => panic!("cannot read {}: {e}", path.display()),
        };
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(outcome.is_ok(), "{target} fails on {}", path.display());
    }
    corpus.len() + regressions.len()
}

#[test]
fn the_allocation_counter_is_installed() {
    assert!(allocation_tracking_active());
}

#[test]
fn frame_decoder_corpus_replays() {
    let (name, check) = TARGETS[0];
    assert!(replay(name, check) > 0);
}

#[test]
fn decode_validate_corpus_replays() {
    let (name, check) = TARGETS[1];
    assert!(replay(name, check) > 0);
}

#[test]
fn round_trip_corpus_replays() {
    let (name, check) = TARGETS[2];
    assert!(replay(name, check) > 0);
}

/// The message kinds the kept corpus of `target` decodes to under the current wire format:
/// each input as a frame body (`decode_validate`, `round_trip`), or the first frame of a
/// stream (`frame_decoder`).
fn decoded_kinds(target: &str) -> BTreeSet<&'static str> {
    let decode = |bytes: &[u8]| match target {
        "frame_decoder" => match decode_frame(bytes, DEFAULT_MAX_FRAME_BYTES) {
            Ok(Decoded::Frame { message, .. }) => Some(message.kind()),
            _ => None,
        },
        _ => decode_body(bytes).ok().map(|m| m.kind()),
    };
    inputs(&fuzz_dir().join("corpus").join(target))
        .iter()
        .filter_map(|path| match std::fs::read(path) {
            Ok(bytes) => decode(&bytes),
            Err(e) => panic!("cannot read {}: {e}", path.display()),
        })
        .collect()
}

/// A corpus written against an older wire format replays cleanly while testing nothing but the
/// version check; each protocol corpus must still decode to every kind of message.
#[test]
fn the_protocol_corpora_decode_to_every_message_kind() {
    let every: BTreeSet<&str> = seed_messages().iter().map(Message::kind).collect();
    assert_eq!(every.len(), 9, "a message kind without a seed: {every:?}");
    for target in ["frame_decoder", "decode_validate", "round_trip"] {
        let kinds = decoded_kinds(target);
        let missing: Vec<_> = every.difference(&kinds).collect();
        assert!(
            missing.is_empty(),
            "{target}'s corpus decodes no {missing:?}"
        );
    }
}

#[test]
fn aggregate_corpus_replays() {
    let (name, check) = TARGETS[3];
    assert!(replay(name, check) > 0);
}

/// How many inputs of `inputs` choose each aggregation method and get at least one update
/// accepted by a round under it.
fn accepted_per_method<'a>(inputs: impl IntoIterator<Item = &'a [u8]>) -> [usize; METHODS] {
    let mut reached = [0; METHODS];
    for input in inputs {
        if let Some((method, accepted)) = accepted_as_round(input) {
            reached[method] += usize::from(accepted > 0);
        }
    }
    reached
}

#[test]
fn aggregate_seeds_are_accepted_and_pass() {
    let seeds = seed_inputs();
    assert!(seeds.len() >= 4 * METHODS);
    for (name, input) in &seeds {
        // Every seed update passes a round's checks, or the fuzzer starts outside the
        // aggregation code.
        let accepted = accepted_as_round(input).map_or(0, |(_, n)| n);
        assert!(accepted >= 1, "{name}: no update accepted");
        check_aggregate(input);
    }
    let reached = accepted_per_method(seeds.iter().map(|(_, input)| input.as_slice()));
    assert!(
        reached.iter().all(|&n| n >= 4),
        "seeds per method: {reached:?}"
    );
}

/// The kept corpus must still reach the aggregation code under every method. A corpus written
/// against an older wire format (its frames refused as another protocol version) replays
/// without a failure while exercising only the decoder's refusal: this once went unnoticed for
/// a whole fuzzing campaign.
#[test]
fn the_aggregate_corpus_reaches_every_method() {
    let corpus: Vec<Vec<u8>> = inputs(&fuzz_dir().join("corpus").join("aggregate"))
        .iter()
        .map(|path| match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => panic!("cannot read {}: {e}", path.display()),
        })
        .collect();
    let reached = accepted_per_method(corpus.iter().map(Vec::as_slice));
    assert!(
        reached.iter().all(|&n| n > 0),
        "corpus inputs with an accepted update, per method: {reached:?} (stale corpus? re-seed \
         with scripts/fuzz.sh after emptying fuzz/corpus/aggregate)"
    );
}

#[test]
fn seed_messages_pass_every_check() {
    for message in seed_messages() {
        let frame = match encode_frame(&message) {
            Ok(frame) => frame,
            Err(e) => panic!("seed {} does not encode: {e}", message.kind()),
        };
        // Seeds must pass validation, or the fuzzers start outside the interesting code.
        if let Message::Update(u) = &message {
            assert_eq!(
                validate_update(&FUZZ_DIMS, u, &ValidationLimits::default()),
                Ok(())
            );
        }
        if let Message::RoundConfig(RoundConfig {
            global: Some(g), ..
        }) = &message
        {
            let limits = ValidationLimits::default();
            assert_eq!(
                validate_adapter(&FUZZ_DIMS, &g.adapter, &g.kept, &limits),
                Ok(())
            );
        }
        check_frame_stream(&frame);
        for (_, check) in &TARGETS[1..3] {
            check(&frame[FRAME_HEADER_BYTES..]);
        }
    }
}
