//! Fuzz target: a byte stream (length-prefixed frames) through decode_frame and FrameDecoder
//! (invariants in `protocol::fuzzing::check_frame_stream`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::fuzzing::check_frame_stream;
use test_support::CountingAllocator;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

fuzz_target!(|data: &[u8]| check_frame_stream(data));
