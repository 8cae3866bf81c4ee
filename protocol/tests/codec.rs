//! Codec tests: round trips of every message, truncation, garbage, version and size limits.

use expect_test::{expect, Expect};
use protocol::*;

fn tiny_dims() -> ModelDims {
    ModelDims {
        n_blocks: 2,
        d_model: 8,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 2,
        ffn: 6,
    }
}

fn sample_adapter(dims: &ModelDims, kept: &KeptIndices, rank: u32) -> AdapterPayload {
    let mut layers = Vec::new();
    let mut x = 0.0f32;
    for (block, bk) in kept.blocks.iter().enumerate() {
        for proj in Proj::ALL {
            let (out, inp) = kept_shape(dims, proj, bk);
            let mut next = |n: usize| {
                (0..n)
                    .map(|_| {
                        x += 0.01;
                        x.sin()
                    })
                    .collect::<Vec<f32>>()
            };
            let a = Tensor2::f32(rank, inp as u32, next(rank as usize * inp));
            let b = Tensor2::f32(out as u32, rank, next(out * rank as usize));
            layers.push(LayerAdapter {
                block: block as u32,
                proj,
                a,
                b,
            });
        }
    }
    AdapterPayload {
        rank,
        alpha: 16.0,
        layers,
    }
}

fn sample_update() -> Update {
    let dims = tiny_dims();
    let mut kept = KeptIndices::full(&dims);
    kept.blocks[1] = BlockKept {
        query_heads: vec![0, 3],
        kv_heads: vec![0, 1],
        mlp_channels: vec![1, 2, 5],
    };
    Update {
        round: RoundId(3),
        adapter: sample_adapter(&dims, &kept, 2),
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

fn all_messages() -> Vec<Message> {
    let dims = tiny_dims();
    let update = sample_update();
    vec![
        Message::Join(Join {
            protocol_version: PROTOCOL_VERSION,
            device_id: DeviceId(7),
            capabilities: Capabilities {
                ram_bytes: 8 << 30,
                backend: "flex".into(),
                bench_score: Some(1.5),
                device_class: Some("rpi5".into()),
            },
        }),
        Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            device_id: DeviceId(7),
            model: dims,
            lora_alpha: 16.0,
            heartbeat_interval_ms: 5000,
        }),
        Message::RoundConfig(RoundConfig {
            round: RoundId(3),
            arm: Arm {
                prune_ratio: 0.25,
                rank: 2,
            },
            target_sparsity: Some(0.5),
            global: Some(GlobalSlice {
                adapter: update.adapter.to_f16(),
                kept: update.kept.clone(),
                filled_rank: 2,
            }),
            deadline_ms: 60_000,
            local_steps: 40,
            prune_interval_steps: 20,
            learning_rate: 1e-3,
            batch_size: 4,
            seed: 99,
            options: Default::default(),
        }),
        Message::Update(update),
        Message::Ack(Ack { round: RoundId(3) }),
        Message::Reject(Reject {
            round: Some(RoundId(2)),
            reason: RejectReason::StaleRound {
                got: RoundId(2),
                current: RoundId(3),
            },
        }),
        Message::Heartbeat(Heartbeat {
            round: None,
            steps_done: 0,
        }),
        Message::Bye(Bye {
            reason: ByeReason::Leaving,
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
    ]
}

#[test]
fn every_message_round_trips() {
    for message in all_messages() {
        let frame = encode_frame(&message).unwrap();
        // The counted length is the encoded one, for every kind of message.
        assert_eq!(
            frame_len(&message).unwrap(),
            frame.len(),
            "{}",
            message.kind()
        );
        match decode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap() {
            Decoded::Frame {
                message: back,
                consumed,
            } => {
                assert_eq!(consumed, frame.len());
                assert_eq!(back, message, "{}", message.kind());
            }
            other => panic!("{} did not decode: {other:?}", message.kind()),
        }
    }
}

#[test]
fn concatenated_frames_decode_one_by_one_in_byte_dribbles() {
    let messages = all_messages();
    let mut stream = Vec::new();
    for m in &messages {
        encode_frame_into(m, &mut stream).unwrap();
    }
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut got = Vec::new();
    for chunk in stream.chunks(7) {
        decoder.push(chunk).unwrap();
        while let Some(m) = decoder.next_message().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, messages);
    assert_eq!(decoder.buffered(), 0);
}

#[test]
fn truncated_frames_need_more_bytes_never_error() {
    let frame = encode_frame(&Message::Update(sample_update())).unwrap();
    for cut in 0..frame.len() {
        match decode_frame(&frame[..cut], DEFAULT_MAX_FRAME_BYTES).unwrap() {
            Decoded::NeedMore { at_least } => {
                let expected = if cut < 4 { 4 - cut } else { frame.len() - cut };
                assert_eq!(at_least, expected, "cut at {cut}");
            }
            Decoded::Frame { .. } => panic!("a frame cut at {cut} decoded"),
        }
    }
}

fn check_err(bytes: &[u8], max: usize, expect: Expect) {
    let err = decode_frame(bytes, max).unwrap_err();
    expect.assert_eq(&err.to_string());
}

fn frame_with_body(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[test]
fn invalid_frames_are_refused_with_clear_errors() {
    // A prefix claiming 4 GiB is refused from the four header bytes alone.
    check_err(
        &u32::MAX.to_le_bytes(),
        DEFAULT_MAX_FRAME_BYTES,
        expect!["frame body of 4294967295 bytes exceeds the limit of 134217728 bytes"],
    );
    // A caller limit above the hard ceiling is clamped to it.
    check_err(
        &((MAX_FRAME_BYTES as u32) + 1).to_le_bytes(),
        usize::MAX,
        expect!["frame body of 268435457 bytes exceeds the limit of 268435456 bytes"],
    );
    check_err(
        &frame_with_body(b"FS"),
        1024,
        expect!["frame body of 2 bytes is shorter than its 4-byte prefix"],
    );
    check_err(
        &frame_with_body(b"GET / HTTP/1.1\r\n"),
        1024,
        expect!["bad magic [47, 45]: not a FedSpine frame"],
    );
    check_err(
        &frame_with_body(&[b'F', b'S', 9, 0, 0, 0, 0, 0]),
        1024,
        expect!["protocol version mismatch: this side speaks 2, the peer sent 9"],
    );
    // Unknown enum discriminant after a valid prefix.
    check_err(
        &frame_with_body(&[
            b'F',
            b'S',
            PROTOCOL_VERSION as u8,
            (PROTOCOL_VERSION >> 8) as u8,
            200,
            0,
            0,
            0,
        ]),
        1024,
        expect![[
            r#"invalid message body: UnexpectedVariant { type_name: "Message", allowed: Range { min: 0, max: 8 }, found: 200 }"#
        ]],
    );
    // A valid message followed by junk inside the same frame.
    let mut body = encode_frame(&Message::Ack(Ack { round: RoundId(1) })).unwrap()[4..].to_vec();
    body.extend_from_slice(&[1, 2, 3]);
    check_err(
        &frame_with_body(&body),
        1024,
        expect!["3 unexpected bytes after the message"],
    );
}

#[test]
fn frame_over_the_callers_limit_is_refused_by_the_stream_decoder() {
    let frame = encode_frame(&Message::Update(sample_update())).unwrap();
    let mut decoder = FrameDecoder::new(64);
    let err = decoder
        .push(&frame[..2])
        .and_then(|_| decoder.push(&frame[2..]));
    assert!(
        matches!(err, Err(CodecError::FrameTooLarge { max: 64, .. })),
        "{err:?}"
    );
}

#[test]
fn garbage_never_panics() {
    // Deterministic pseudo-random bytes behind valid and invalid prefixes.
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut rand_byte = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 24) as u8
    };
    let valid = encode_frame(&Message::Update(sample_update())).unwrap();
    let mut decoded_ok = 0;
    for round in 0..2000 {
        let mut bytes: Vec<u8> = if round % 2 == 0 {
            let len = (rand_byte() as usize) * 3;
            let mut body = vec![
                b'F',
                b'S',
                PROTOCOL_VERSION as u8,
                (PROTOCOL_VERSION >> 8) as u8,
            ];
            body.extend((0..len).map(|_| rand_byte()));
            frame_with_body(&body)
        } else {
            valid.clone()
        };
        if round % 2 == 1 {
            // Flip a few bytes after the length prefix.
            for _ in 0..3 {
                let i = 4 + (rand_byte() as usize * 997) % (bytes.len() - 4);
                bytes[i] ^= rand_byte() | 1;
            }
        }
        if let Ok(Decoded::Frame { .. }) = decode_frame(&bytes, DEFAULT_MAX_FRAME_BYTES) {
            decoded_ok += 1;
        }
    }
    // Flipped floats still decode; the point is that nothing panicked or aborted.
    assert!(decoded_ok < 2000);
}

#[test]
fn f16_encoding_halves_the_adapter_bytes() {
    let update = sample_update();
    let f32_frame = encode_frame(&Message::Update(update.clone())).unwrap();
    let mut half = update.clone();
    half.adapter = half.adapter.to_f16();
    let f16_frame = encode_frame(&Message::Update(half.clone())).unwrap();
    let saved = f32_frame.len() - f16_frame.len();
    assert_eq!(saved, update.adapter.byte_len() / 2);
    let back = match decode_frame(&f16_frame, DEFAULT_MAX_FRAME_BYTES).unwrap() {
        Decoded::Frame {
            message: Message::Update(u),
            ..
        } => u,
        other => panic!("{other:?}"),
    };
    let restored = back.adapter.to_f32();
    for (l0, l1) in update.adapter.layers.iter().zip(&restored.layers) {
        for (x, y) in
            l0.a.data
                .to_f32_vec()
                .iter()
                .zip(l1.a.data.to_f32_vec().iter())
        {
            assert!((x - y).abs() <= 1e-3 * x.abs().max(1e-2), "{x} vs {y}");
        }
    }
}
