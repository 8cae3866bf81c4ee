//! Invariant checks shared by the fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/tests/fuzz_corpus.rs`), and the seed messages the corpora start from. Both install
//! `test_support::CountingAllocator` so the checks can bound what a decode allocates. Compiled
//! with the `fuzzing` feature only.
//!
//! Each `check_*` function takes arbitrary bytes, never returns an error, and panics (an
//! `assert!`) only when an invariant of this crate is broken:
//! - [`check_frame_stream`]: a byte stream through [`decode_frame`] and [`FrameDecoder`];
//! - [`check_decode_validate`]: a frame body through [`decode_body`] and the validation of what
//!   it holds;
//! - [`check_round_trip`]: a frame body that decodes re-encodes to the very same bytes.
//!
//! Not part of the wire API: the module is public only so that the fuzz crate (outside the
//! workspace) and the replay test can share one copy of the checks.

use std::collections::HashSet;

use crate::adapter::{
    kept_shape, layer_index_map, AdapterPayload, BlockKept, Buffer, KeptIndices, LayerAdapter,
    ModelDims, Proj, Tensor2,
};
use crate::codec::{
    decode_body, decode_frame, encode_frame, encode_frame_into, frame_body_len, CodecError,
    Decoded, FrameDecoder, BODY_PREFIX_BYTES, DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
};
use crate::ids::{DeviceId, RoundId};
use crate::message::{
    check_device_class, Ack, Arm, Bye, ByeReason, Capabilities, FailReason, GlobalSlice, Heartbeat,
    Join, Message, RankPruning, Reject, RejectReason, RoundConfig, RoundFailed, RoundOptions,
    Update, UpdateStats, Welcome,
};
use crate::validate::{validate_adapter, validate_dims, validate_update, ValidationLimits};
use crate::PROTOCOL_VERSION;

/// The model the seed messages are cut for: two blocks, d_model 8, 4 query heads on 2 KV heads
/// of width 2, FFN 6.
pub const FUZZ_DIMS: ModelDims = ModelDims {
    n_blocks: 2,
    d_model: 8,
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 2,
    ffn: 6,
};

// ---------------------------------------------------------------------------------------------
// Allocation accounting (through `test_support::CountingAllocator`, installed by the caller)

/// Peak bytes this thread held while running `f`, above what it held before.
fn peak_alloc_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    test_support::thread_peak_during(f)
}

/// Whether `test_support::CountingAllocator` is this binary's global allocator (without it the
/// allocation bounds of the checks are not measured and pass trivially).
pub fn allocation_tracking_active() -> bool {
    let (_, peak) = peak_alloc_during(|| std::hint::black_box(vec![0u8; 4096]));
    peak >= 4096
}

/// The most a decode of a `body_len`-byte frame body may allocate at its peak: twice the
/// bincode limit [`decode_body`] runs it under (the smallest power of two, at least 128 KiB,
/// covering twice the payload plus 64 KiB). The factor two covers vectors whose elements are
/// larger in memory than their claimed wire bytes once decoded.
pub fn decode_alloc_bound(body_len: usize) -> usize {
    let payload = body_len.saturating_sub(BODY_PREFIX_BYTES);
    let budget = payload.saturating_mul(2).saturating_add(64 << 10);
    let limit = budget.checked_next_power_of_two().unwrap_or(usize::MAX);
    limit.max(1 << 17).saturating_mul(2)
}

fn measured<T>(body_len: usize, what: &str, f: impl FnOnce() -> T) -> T {
    let (out, peak) = peak_alloc_during(f);
    let bound = decode_alloc_bound(body_len);
    assert!(
        peak <= bound,
        "{what} of a {body_len}-byte body allocated {peak} bytes (bound {bound})"
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Target 1: framing

/// The canonical bytes of a decoded message (compares messages holding NaN, unlike `==`).
fn canonical(message: &Message) -> Vec<u8> {
    match encode_frame(message) {
        Ok(frame) => frame,
        Err(e) => panic!("a decoded {} does not re-encode: {e}", message.kind()),
    }
}

fn check_header(header: [u8; FRAME_HEADER_BYTES], stream_len: usize) {
    let announced = u32::from_le_bytes(header) as usize;
    for limit in [
        0,
        BODY_PREFIX_BYTES,
        stream_len,
        DEFAULT_MAX_FRAME_BYTES,
        usize::MAX,
    ] {
        let max = limit.min(MAX_FRAME_BYTES);
        match frame_body_len(header, limit) {
            Ok(len) => {
                assert_eq!(len, announced);
                assert!((BODY_PREFIX_BYTES..=max).contains(&len), "{len} vs {max}");
            }
            Err(CodecError::FrameTooLarge { len, max: m }) => {
                assert_eq!((len, m), (announced as u64, max as u64));
                assert!(len > m);
            }
            Err(CodecError::FrameTooShort { len }) => {
                assert_eq!(len, announced);
                assert!(len < BODY_PREFIX_BYTES && len <= max);
            }
            Err(other) => panic!("frame_body_len failed with {other:?}"),
        }
    }
}

/// Decodes `data` as a stream of frames twice, in one piece with [`decode_frame`] and in chunks
/// through a [`FrameDecoder`], under a limit taken from the first byte.
///
/// Invariants: no panic; a whole frame consumes exactly its prefix and announced body;
/// `NeedMore` asks for exactly the missing bytes; no decode allocates more than
/// [`decode_alloc_bound`]; [`CodecError::Encode`] never comes out of a decoder; both ways
/// yield the same messages and fail on the same input.
pub fn check_frame_stream(data: &[u8]) {
    if data.len() >= FRAME_HEADER_BYTES {
        check_header([data[0], data[1], data[2], data[3]], data.len());
    }
    // A small limit half the time, so that "too large" is reachable with short inputs.
    let limit = match data.first() {
        Some(&b) if b & 1 == 1 => 64 + 16 * (b as usize >> 1),
        _ => DEFAULT_MAX_FRAME_BYTES,
    };

    let mut whole = Vec::new();
    let mut rest = data;
    let whole_failed = loop {
        let result = measured(rest.len(), "decode_frame", || decode_frame(rest, limit));
        match result {
            Ok(Decoded::Frame { message, consumed }) => {
                let announced = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                assert_eq!(consumed, FRAME_HEADER_BYTES + announced);
                assert!(announced <= limit.min(MAX_FRAME_BYTES));
                assert!(consumed <= rest.len());
                whole.push(canonical(&message));
                rest = &rest[consumed..];
            }
            Ok(Decoded::NeedMore { at_least }) => {
                let expected = if rest.len() < FRAME_HEADER_BYTES {
                    FRAME_HEADER_BYTES - rest.len()
                } else {
                    let announced = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                    FRAME_HEADER_BYTES + announced as usize - rest.len()
                };
                assert_eq!(at_least, expected);
                assert!(at_least > 0);
                break false;
            }
            Err(CodecError::Encode(e)) => panic!("a decoder reported an encode error: {e}"),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                break true;
            }
        }
    };

    let mut decoder = FrameDecoder::new(limit);
    let mut streamed = Vec::new();
    let mut stream_failed = false;
    let mut offset = 0;
    let mut step = data.len() | 1;
    'chunks: while offset < data.len() {
        // Chunk sizes 1..=32 from a small LCG seeded by the input length.
        step = step.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let chunk = ((step >> 8) % 32 + 1).min(data.len() - offset);
        if decoder.push(&data[offset..offset + chunk]).is_err() {
            stream_failed = true;
            break;
        }
        offset += chunk;
        loop {
            let buffered = decoder.buffered();
            match measured(buffered, "FrameDecoder", || decoder.next_message()) {
                Ok(Some(message)) => streamed.push(canonical(&message)),
                Ok(None) => break,
                Err(_) => {
                    stream_failed = true;
                    break 'chunks;
                }
            }
        }
    }
    assert_eq!(streamed, whole, "chunked and whole decoding disagree");
    assert_eq!(
        stream_failed, whole_failed,
        "only one way of decoding failed"
    );
    if !stream_failed {
        assert_eq!(decoder.buffered(), rest.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Target 2: decode, then validate

/// Model dimensions an adapter of this shape could belong to: [`FUZZ_DIMS`] with as many blocks
/// as `kept` has and head and channel counts just above the largest kept index (`None` when no
/// consistent dims fit in `u32`).
fn dims_from_kept(kept: &KeptIndices) -> Option<ModelDims> {
    let top = |f: fn(&BlockKept) -> &Vec<u32>| -> Option<u32> {
        let max = kept.blocks.iter().filter_map(|b| f(b).last()).max();
        max.map_or(Some(1), |&m| m.checked_add(1))
    };
    let n_kv_heads = top(|b| &b.kv_heads)?;
    let n_heads = top(|b| &b.query_heads)?.checked_next_multiple_of(n_kv_heads)?;
    Some(ModelDims {
        n_blocks: u32::try_from(kept.blocks.len()).ok()?.max(1),
        n_heads,
        n_kv_heads,
        ffn: top(|b| &b.mlp_channels)?,
        ..FUZZ_DIMS
    })
}

/// What validated dims promise: every shape derived from them is computable without overflow.
fn assert_dims_usable(dims: &ModelDims) {
    assert!(dims.is_consistent());
    assert!(dims.group_size() >= 1);
    assert!(dims.kv_head_of(dims.n_heads - 1) < dims.n_kv_heads);
    for proj in Proj::ALL {
        let (out, inp) = dims.full_shape(proj);
        assert!(out > 0 && inp > 0);
    }
    assert_eq!(dims.n_layers(), dims.n_blocks as usize * 7);
}

fn strictly_increasing_below(values: &[u32], bound: usize) -> bool {
    values.windows(2).all(|w| w[0] < w[1]) && values.last().is_none_or(|&v| (v as usize) < bound)
}

/// What a validated adapter promises the aggregator: every layer scatters into distinct,
/// in-range full coordinates, factor buffers match their shapes, values are finite and bounded.
fn assert_adapter_usable(
    dims: &ModelDims,
    adapter: &AdapterPayload,
    kept: &KeptIndices,
    limits: &ValidationLimits,
) {
    assert_dims_usable(dims);
    assert_eq!(kept.blocks.len(), dims.n_blocks as usize);
    assert!(adapter.rank >= 1 && adapter.rank <= limits.max_rank);
    assert!(adapter.alpha.is_finite() && adapter.alpha > 0.0);
    assert!(adapter.scale().is_finite());
    let rank = adapter.rank as usize;
    let mut seen = HashSet::new();
    for layer in &adapter.layers {
        assert!(
            seen.insert((layer.block, layer.proj)),
            "duplicate layer passed"
        );
        let block = &kept.blocks[layer.block as usize];
        let map = layer_index_map(dims, layer.proj, block);
        let (full_out, full_in) = dims.full_shape(layer.proj);
        assert!(strictly_increasing_below(&map.rows, full_out));
        assert!(strictly_increasing_below(&map.cols, full_in));
        assert_eq!(
            kept_shape(dims, layer.proj, block),
            (map.rows.len(), map.cols.len())
        );
        let (a, b) = (&layer.a, &layer.b);
        assert_eq!((a.rows as usize, a.cols as usize), (rank, map.cols.len()));
        assert_eq!((b.rows as usize, b.cols as usize), (map.rows.len(), rank));
        for t in [a, b] {
            assert_eq!(t.data.len(), t.numel());
            assert!(t.data.all_finite());
            assert!(t.frobenius() <= limits.max_factor_norm);
            assert_eq!(t.to_f32().data.len(), t.numel());
        }
    }
    assert!(adapter.param_count() * 2 <= adapter.byte_len());
}

fn check_dims(dims: &ModelDims) {
    if validate_dims(dims).is_ok() {
        assert_dims_usable(dims);
    }
}

/// Validates `adapter` against each candidate model; the aggregator's own model
/// ([`FUZZ_DIMS`], SmolLM2-135M) or one fitted to the kept maps.
fn check_adapter(
    adapter: &AdapterPayload,
    kept: &KeptIndices,
    update: Option<&Update>,
    limits: &ValidationLimits,
) {
    let dims = [
        Some(FUZZ_DIMS),
        Some(ModelDims::SMOLLM2_135M),
        dims_from_kept(kept),
    ];
    for dims in dims.into_iter().flatten() {
        let result = match update {
            Some(u) => validate_update(&dims, u, limits),
            None => validate_adapter(&dims, adapter, kept, limits),
        };
        match result {
            Ok(()) => assert_adapter_usable(&dims, adapter, kept, limits),
            Err(e) => {
                let reason = e.reject_reason();
                assert!(!reason.kind().is_empty() && !reason.to_string().is_empty());
            }
        }
    }
}

/// A round configuration's sparsity goal: a goal that passes its range check never asks a
/// device to un-prune or to go past the run's target, and never yields a non-finite value; a
/// refused one names what is out of range.
fn check_sparsity_goal(rc: &RoundConfig) {
    let goal = rc.sparsity_goal();
    match goal.check() {
        Ok(()) => {
            for current in [0.0, 0.3, 0.6, 0.89] {
                let t = goal.round_target(current);
                assert!(t.is_finite() && (0.0..1.0).contains(&t), "{goal:?}: {t}");
                if let Some(target) = goal.target() {
                    assert!(t >= current && t <= current.max(target), "{goal:?}: {t}");
                }
            }
        }
        Err(why) => assert!(why.contains("is not in"), "{why}"),
    }
}

/// Decodes `body` as a frame body and validates whatever it carries: a welcome's model
/// dimensions, an update, or a round configuration's global slice.
///
/// Invariants: no panic; decoding allocates at most [`decode_alloc_bound`]; whatever passes
/// validation is safe to use as the aggregator does (see the `assert_*_usable` helpers); every
/// rejection has a reason that formats.
pub fn check_decode_validate(body: &[u8]) {
    let decoded = measured(body.len(), "decode_body", || decode_body(body));
    let message = match decoded {
        Ok(message) => message,
        Err(e) => {
            assert!(!matches!(e, CodecError::Encode(_)));
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let limits = ValidationLimits::default();
    let tight = ValidationLimits {
        max_rank: 2,
        max_factor_norm: 1.0,
    };
    match &message {
        Message::Welcome(w) => check_dims(&w.model),
        Message::Update(u) => {
            for limits in [&limits, &tight] {
                check_adapter(&u.adapter, &u.kept, Some(u), limits);
            }
        }
        Message::RoundConfig(rc) => {
            check_sparsity_goal(rc);
            if let Some(g) = &rc.global {
                for limits in [&limits, &tight] {
                    check_adapter(&g.adapter, &g.kept, None, limits);
                }
            }
        }
        Message::Join(j) => {
            let other = DeviceId(j.device_id.0 ^ 1);
            assert!(j.check(other).is_err());
            let own = j.check(j.device_id);
            let class_ok = j
                .capabilities
                .device_class
                .as_deref()
                .is_none_or(|c| check_device_class(c).is_ok());
            assert_eq!(
                own.is_ok(),
                j.protocol_version == PROTOCOL_VERSION && class_ok
            );
        }
        Message::Reject(r) => {
            assert!(!r.reason.kind().is_empty() && !r.reason.to_string().is_empty())
        }
        Message::RoundFailed(f) => assert!(!f.reason.to_string().is_empty()),
        _ => {}
    }
    assert!(!message.kind().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Target 3: round trip

fn check_f16_round_trip(buffer: &Buffer) {
    let Buffer::F16(bits) = buffer else {
        // f32 -> f16 saturates to infinity and must not panic.
        let _ = buffer.to_f16();
        return;
    };
    let widened = buffer.to_f32_vec();
    let Buffer::F16(back) = Buffer::F32(widened).to_f16() else {
        panic!("to_f16 did not give an f16 buffer");
    };
    assert_eq!(back.len(), bits.len());
    for (&x, &y) in bits.iter().zip(&back) {
        let is_nan = |b: u16| b & 0x7c00 == 0x7c00 && b & 0x03ff != 0;
        assert!(
            x == y || (is_nan(x) && is_nan(y)),
            "f16 {x:#06x} came back as {y:#06x}"
        );
    }
}

fn adapter_of(message: &Message) -> Option<&AdapterPayload> {
    match message {
        Message::Update(u) => Some(&u.adapter),
        Message::RoundConfig(RoundConfig {
            global: Some(g), ..
        }) => Some(&g.adapter),
        _ => None,
    }
}

/// Decodes `body`; if that works, the message re-encodes to exactly `body` (the encoding is
/// canonical, so a relay or a checksum of a message is stable), decodes again to an equal
/// message, and decodes as a frame under a limit of exactly its body length (and is refused
/// one byte below). Half-precision buffers survive f16 -> f32 -> f16 bit for bit (NaN stays
/// NaN).
pub fn check_round_trip(body: &[u8]) {
    let Ok(message) = measured(body.len(), "decode_body", || decode_body(body)) else {
        return;
    };
    let mut frame = vec![0xAA; 3];
    let written = match encode_frame_into(&message, &mut frame) {
        Ok(n) => n,
        Err(e) => panic!("a decoded {} does not re-encode: {e}", message.kind()),
    };
    assert_eq!(
        frame[..3],
        [0xAA; 3],
        "encode_frame_into overwrote what it appends to"
    );
    let frame = &frame[3..];
    assert_eq!(written, frame.len());
    assert_eq!(
        &frame[FRAME_HEADER_BYTES..],
        body,
        "re-encoding is not canonical"
    );
    assert_eq!(
        u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize,
        body.len()
    );

    match decode_frame(frame, body.len()) {
        Ok(Decoded::Frame {
            message: again,
            consumed,
        }) => {
            assert_eq!(consumed, frame.len());
            assert_eq!(canonical(&again), frame);
            // `==` is false for NaN fields; when the message equals itself it must equal its copy.
            #[allow(clippy::eq_op)]
            if message == message {
                assert_eq!(again, message);
            }
        }
        other => panic!("a re-encoded frame did not decode: {other:?}"),
    }
    let below = decode_frame(frame, body.len() - 1);
    assert!(matches!(below, Err(CodecError::FrameTooLarge { .. })));

    if let Some(adapter) = adapter_of(&message) {
        for layer in &adapter.layers {
            check_f16_round_trip(&layer.a.data);
            check_f16_round_trip(&layer.b.data);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds

fn seed_adapter(dims: &ModelDims, kept: &KeptIndices, rank: u32) -> AdapterPayload {
    let mut x = 0.0f32;
    let mut next = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x += 0.37;
                x.sin() * 0.5
            })
            .collect()
    };
    let mut layers = Vec::new();
    for (block, bk) in kept.blocks.iter().enumerate() {
        for proj in Proj::ALL {
            let (out, inp) = kept_shape(dims, proj, bk);
            layers.push(LayerAdapter {
                block: block as u32,
                proj,
                a: Tensor2::f32(rank, inp as u32, next(rank as usize * inp)),
                b: Tensor2::f32(out as u32, rank, next(out * rank as usize)),
            });
        }
    }
    AdapterPayload {
        rank,
        alpha: 16.0,
        layers,
    }
}

fn seed_update(kept: KeptIndices, rank: u32) -> Update {
    Update {
        round: RoundId(3),
        adapter: seed_adapter(&FUZZ_DIMS, &kept, rank),
        kept,
        stats: UpdateStats {
            loss_pre: 3.5,
            loss_post: 3.1,
            sparsity: 0.2,
            param_count: 1234,
            compute_ms: 800,
            bytes_down: 10,
            bytes_up: 20,
            peak_mem_bytes: 1 << 20,
            samples: 64,
            steps: 20,
        },
    }
}

/// One valid message of every kind and variant (adapters for [`FUZZ_DIMS`], full and pruned,
/// f32 and f16), the starting corpus of every target.
pub fn seed_messages() -> Vec<Message> {
    let mut pruned = KeptIndices::full(&FUZZ_DIMS);
    pruned.blocks[1] = BlockKept {
        query_heads: vec![0, 3],
        kv_heads: vec![0, 1],
        mlp_channels: vec![1, 2, 5],
    };
    let full = seed_update(KeptIndices::full(&FUZZ_DIMS), 1);
    let update = seed_update(pruned, 2);
    let mut f16_update = update.clone();
    f16_update.adapter = update.adapter.to_f16();
    let config = |global| RoundConfig {
        round: RoundId(3),
        arm: Arm {
            prune_ratio: 0.25,
            rank: 2,
        },
        target_sparsity: None,
        global,
        deadline_ms: 60_000,
        local_steps: 40,
        prune_interval_steps: 20,
        learning_rate: 1e-3,
        batch_size: 4,
        seed: 99,
        options: Default::default(),
    };
    let reasons = [
        RejectReason::VersionMismatch { ours: 1, theirs: 2 },
        RejectReason::UnknownDevice(DeviceId(9)),
        RejectReason::IdentityMismatch {
            claimed: DeviceId(1),
            certified: DeviceId(2),
        },
        RejectReason::StaleRound {
            got: RoundId(2),
            current: RoundId(3),
        },
        RejectReason::Malformed("block 1: bad".into()),
        RejectReason::NormTooLarge {
            norm: 2.0e4,
            limit: 1.0e4,
        },
        RejectReason::Unsupported("no".into()),
        RejectReason::BadDeviceClass("device class \"X\" holds 'X'".into()),
    ];
    let mut messages = vec![
        Message::Join(Join {
            protocol_version: PROTOCOL_VERSION,
            device_id: DeviceId(7),
            capabilities: Capabilities {
                ram_bytes: 8 << 30,
                backend: "flex".into(),
                bench_score: Some(1.5),
                device_class: Some("jetson-nx".into()),
            },
        }),
        Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            device_id: DeviceId(7),
            model: FUZZ_DIMS,
            lora_alpha: 16.0,
            heartbeat_interval_ms: 5000,
        }),
        Message::RoundConfig(config(None)),
        Message::RoundConfig(RoundConfig {
            target_sparsity: Some(0.3),
            ..config(None)
        }),
        Message::RoundConfig(RoundConfig {
            options: RoundOptions {
                rank_pruning: Some(RankPruning {
                    reg: 0.01,
                    gamma: 0.05,
                    step: 0.25,
                }),
            },
            ..config(None)
        }),
        Message::RoundConfig(config(Some(GlobalSlice {
            adapter: update.adapter.to_f16(),
            kept: update.kept.clone(),
            filled_rank: 1,
        }))),
        Message::Update(full),
        Message::Update(update),
        Message::Update(f16_update),
        Message::Ack(Ack { round: RoundId(3) }),
        Message::Heartbeat(Heartbeat {
            round: Some(RoundId(3)),
            steps_done: 12,
        }),
        Message::Bye(Bye {
            reason: ByeReason::Finished,
        }),
        Message::RoundFailed(RoundFailed {
            round: RoundId(3),
            reason: FailReason::OutOfMemory {
                needed_bytes: 3 << 30,
                ram_bytes: 2 << 30,
            },
        }),
        Message::RoundFailed(RoundFailed {
            round: RoundId(4),
            reason: FailReason::Error("bad batch".into()),
        }),
    ];
    messages.extend(reasons.into_iter().map(|reason| {
        Message::Reject(Reject {
            round: Some(RoundId(2)),
            reason,
        })
    }));
    messages
}
