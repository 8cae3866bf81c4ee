//! A frame whose inner vector claims 64 GiB is refused without allocating it (counted by a
//! per-thread allocation tracker installed as this test binary's global allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use protocol::*;

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + size;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Peak bytes allocated on this thread while running `f`, above what was live before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(|p| p.get()) - base)
}

#[test]
fn forged_inner_lengths_are_refused_without_allocating() {
    // Message::Update(Update { round, adapter: { rank, alpha, layers: Vec<..> } ... }) with the
    // layer vector claiming 2^36 / size_of(LayerAdapter) elements, i.e. about 64 GiB.
    let mut body = vec![b'F', b'S', 1, 0];
    body.extend_from_slice(&3u32.to_le_bytes()); // variant Update
    body.extend_from_slice(&1u64.to_le_bytes()); // round
    body.extend_from_slice(&16u32.to_le_bytes()); // rank
    body.extend_from_slice(&16f32.to_le_bytes()); // alpha
    body.extend_from_slice(&(1u64 << 36).to_le_bytes()); // layers.len()
    body.extend_from_slice(&[0u8; 64]);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);

    let (result, peak) = peak_during(|| decode_frame(&frame, DEFAULT_MAX_FRAME_BYTES));
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
    let mut body = vec![b'F', b'S', 1, 0];
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
    let (result, peak) = peak_during(|| decode_frame(&frame, DEFAULT_MAX_FRAME_BYTES));
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
    let (result, peak) = peak_during(|| {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        decoder.push(&u32::MAX.to_le_bytes())
    });
    assert!(matches!(result, Err(CodecError::FrameTooLarge { .. })));
    assert!(peak < 1024, "allocated {peak} bytes");
}
