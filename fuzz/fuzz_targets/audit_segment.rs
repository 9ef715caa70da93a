#![no_main]
//! `cargo fuzz run audit_segment`: see xgate::fuzzing::audit_segment.
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgate::fuzzing::audit_segment(data));
