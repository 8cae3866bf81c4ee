//! A frame whose inner vector claims 64 GiB is refused without allocating it (counted per thread
//! by `test_support::CountingAllocator`, installed as this test binary's global allocator).

use protocol::*;
use test_support::{thread_peak_during, CountingAllocator};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn forged_inner_lengths_are_refused_without_allocating() {
    // Message::Update(Update { round, adapter: { rank, alpha, layers: Vec<..> } ... }) with the
    // layer vector claiming 2^36 / size_of(LayerAdapter) elements, i.e. about 64 GiB.
    let mut body = vec![
        b'F',
        b'S',
        PROTOCOL_VERSION as u8,
        (PROTOCOL_VERSION >> 8) as u8,
    ];
    body.extend_from_slice(&3u32.to_le_bytes()); // variant Update
    body.extend_from_slice(&1u64.to_le_bytes()); // round
    body.extend_from_slice(&16u32.to_le_bytes()); // rank
    body.extend_from_slice(&16f32.to_le_bytes()); // alpha
    body.extend_from_slice(&(1u64 << 36).to_le_bytes()); // layers.len()
    body.extend_from_slice(&[0u8; 64]);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);

    let (result, peak) = thread_peak_during(|| decode_frame(&frame, DEFAULT_MAX_FRAME_BYTES));
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::Decode(bincode::error::DecodeError::LimitExceeded)
        ),
        "{err:?}"
    );
    assert!(peak < 64 << 10, "decoder allocated {peak} bytes");

    // A 64 GiB f32 buffer claim inside a heartbeat-sized frame: same outcome.
    let mut body = vec![
        b'F',
        b'S',
        PROTOCOL_VERSION as u8,
        (PROTOCOL_VERSION >> 8) as u8,
    ];
    body.extend_from_slice(&3u32.to_le_bytes());
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&16u32.to_le_bytes());
    body.extend_from_slice(&16f32.to_le_bytes());
    body.extend_from_slice(&1u64.to_le_bytes()); // one layer
    body.extend_from_slice(&0u32.to_le_bytes()); // block
    body.extend_from_slice(&0u32.to_le_bytes()); // proj Q
    body.extend_from_slice(&16u32.to_le_bytes()); // a.rows
    body.extend_from_slice(&8u32.to_le_bytes()); // a.cols
    body.extend_from_slice(&0u32.to_le_bytes()); // Buffer::F32
    body.extend_from_slice(&(1u64 << 34).to_le_bytes()); // 2^34 f32 = 64 GiB
    body.extend_from_slice(&[0u8; 32]);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let (result, peak) = thread_peak_during(|| decode_frame(&frame, DEFAULT_MAX_FRAME_BYTES));
    assert!(matches!(
        result,
        Err(CodecError::Decode(
            bincode::error::DecodeError::LimitExceeded
        ))
    ));
    assert!(peak < 64 << 10, "decoder allocated {peak} bytes");
}

#[test]
fn a_frame_prefix_claiming_gigabytes_is_refused_before_buffering() {
    let (result, peak) = thread_peak_during(|| {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        decoder.push(&u32::MAX.to_le_bytes())
    });
    assert!(matches!(result, Err(CodecError::FrameTooLarge { .. })));
    assert!(peak < 1024, "allocated {peak} bytes");
}
