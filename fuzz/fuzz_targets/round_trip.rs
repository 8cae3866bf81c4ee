//! Fuzz target: a frame body that decodes must re-encode to the same bytes and decode again to the same message
//! (invariants in `protocol::fuzzing::check_round_trip`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::fuzzing::check_round_trip;
use test_support::CountingAllocator;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

fuzz_target!(|data: &[u8]| check_round_trip(data));
