#![no_main]
//! `cargo fuzz run wire`: see xgate::dev::fuzzing::wire.
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgate::dev::fuzzing::wire(data));
