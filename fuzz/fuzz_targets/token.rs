#![no_main]
//! `cargo fuzz run token`: see xgate::dev::fuzzing::token.
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgate::dev::fuzzing::token(data));
