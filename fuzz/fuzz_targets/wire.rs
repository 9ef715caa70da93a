#![no_main]
//! `cargo fuzz run wire`: see xgate::fuzzing::wire.
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgate::fuzzing::wire(data));
