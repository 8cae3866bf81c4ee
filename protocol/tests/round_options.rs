//! A round's optional settings ([`RoundOptions`]) on the wire: a round that sets none is the
//! frame it was before options existed (not one byte more), one with HetLoRA's rank
//! self-pruning round-trips, and an unknown option tag or out-of-range settings are refused
//! with the value named.

use protocol::{
    decode_body, encode_frame, Arm, CodecError, Message, RankPruning, RoundConfig, RoundId,
    RoundOptions, FRAME_HEADER_BYTES,
};

fn config(options: RoundOptions) -> RoundConfig {
    RoundConfig {
        round: RoundId(3),
        arm: Arm::new(0.25, 4),
        target_sparsity: None,
        global: None,
        deadline_ms: 60_000,
        local_steps: 40,
        prune_interval_steps: 20,
        learning_rate: 1e-3,
        batch_size: 4,
        seed: 99,
        options,
    }
}

const PRUNING: RankPruning = RankPruning {
    reg: 0.01,
    gamma: 0.05,
    step: 0.25,
};

#[test]
fn a_round_without_options_costs_no_byte_and_rank_pruning_round_trips() {
    let plain = encode_frame(&Message::RoundConfig(config(RoundOptions::default()))).unwrap();
    // Frame header 4 + magic and version 4 + variant tag 4 + round 8 + arm (8 + 4) + two
    // empty options 1 + 1 + deadline 8 + steps 4 + interval 4 + rate 4 + batch 4 + seed 8.
    assert_eq!(plain.len(), 66);
    let with = config(RoundOptions {
        rank_pruning: Some(PRUNING),
    });
    let framed = encode_frame(&Message::RoundConfig(with.clone())).unwrap();
    // One tag byte and three f32 settings, appended after everything a plain round holds.
    assert_eq!(framed.len(), plain.len() + 1 + 12);
    assert_eq!(
        framed[FRAME_HEADER_BYTES + 4..plain.len()],
        plain[FRAME_HEADER_BYTES + 4..]
    );
    let back = decode_body(&framed[FRAME_HEADER_BYTES..]).unwrap();
    assert_eq!(back, Message::RoundConfig(with));
    let back = decode_body(&plain[FRAME_HEADER_BYTES..]).unwrap();
    assert_eq!(back, Message::RoundConfig(config(RoundOptions::default())));
}

#[test]
fn an_unknown_round_option_tag_is_refused() {
    let mut frame = encode_frame(&Message::RoundConfig(config(RoundOptions::default()))).unwrap();
    frame.push(7);
    let len = (frame.len() - FRAME_HEADER_BYTES) as u32;
    frame[..FRAME_HEADER_BYTES].copy_from_slice(&len.to_le_bytes());
    let err = decode_body(&frame[FRAME_HEADER_BYTES..]).unwrap_err();
    assert!(matches!(err, CodecError::Decode(_)), "{err}");
    assert!(
        err.to_string().contains("unknown round option tag 7"),
        "{err}"
    );
}

#[test]
fn rank_pruning_settings_are_checked_and_the_tail_never_takes_the_whole_rank() {
    assert_eq!(PRUNING.check(), Ok(()));
    let bad = |reg, gamma, step| RankPruning { reg, gamma, step }.check().unwrap_err();
    assert_eq!(
        bad(-1.0, 0.1, 0.25),
        "rank pruning reg -1 is not a finite value >= 0"
    );
    assert_eq!(bad(0.0, 1.0, 0.25), "rank pruning gamma 1 is not in [0, 1)");
    assert_eq!(bad(0.0, 0.1, 0.0), "rank pruning step 0 is not in (0, 1)");
    assert_eq!(
        bad(0.0, f32::NAN, 0.5),
        "rank pruning gamma NaN is not in [0, 1)"
    );
    let tails: Vec<u32> = [1, 2, 4, 8, 16, 32]
        .iter()
        .map(|&r| PRUNING.tail_len(r))
        .collect();
    assert_eq!(tails, vec![0, 1, 1, 2, 4, 8]);
    let big = RankPruning {
        step: 0.99,
        ..PRUNING
    };
    assert_eq!(big.tail_len(4), 3);
}
