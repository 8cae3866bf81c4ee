//! Fuzz target: a frame body through decode_body, then validation of the dims, update or global slice it carries
//! (invariants in `protocol::fuzzing::check_decode_validate`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::fuzzing::check_decode_validate;
use test_support::CountingAllocator;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

fuzz_target!(|data: &[u8]| check_decode_validate(data));
