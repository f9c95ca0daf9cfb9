//! The bridge's read-only CoAP view of a datagram: a consistent view or a clean error, never a
//! panic (the oracle asserts the invariants; see `nidd_bridge::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nidd_bridge::fuzzing::coap_datagram(data);
});
