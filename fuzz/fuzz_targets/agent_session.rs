//! Fuzz target: arbitrary event sequences into the device's sans-IO `AgentSession::handle`
//! (invariants in `device_agent::session::fuzzing::check_session_events`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| device_agent::session::fuzzing::check_session_events(data));
