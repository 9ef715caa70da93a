#![no_main]
//! `cargo fuzz run token`: see xgate::fuzzing::token.
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgate::fuzzing::token(data));
