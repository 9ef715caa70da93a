#![no_main]
//! `cargo fuzz run audit_segment`: see xgate::dev::fuzzing::audit_segment.
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgate::dev::fuzzing::audit_segment(data));
