//! Fuzz target: Update frames decoded, checked as a round would, and aggregated under every
//! method (invariants in `aggregator::fuzzing::check_aggregate`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use test_support::CountingAllocator;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

fuzz_target!(|data: &[u8]| aggregator::fuzzing::check_aggregate(data));
