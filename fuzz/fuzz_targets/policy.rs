#![no_main]
//! `cargo fuzz run policy`: see xgate::fuzzing::policy.
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgate::fuzzing::policy(data));
