//! A NIDD callback body, as the SCEF would POST it: bytes to a classified notification or a
//! 4xx refusal, never a panic (the oracle asserts the invariants; see `nidd_bridge::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nidd_bridge::fuzzing::nidd_callback_body(data);
});
