#![no_main]
//! `cargo fuzz run policy`: see xgate::dev::fuzzing::policy.
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgate::dev::fuzzing::policy(data));
