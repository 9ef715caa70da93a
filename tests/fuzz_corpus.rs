//! The fuzz targets' corpus (`fuzz/corpus/<target>/`: the seeds kept in the repository, and
//! anything a fuzzing run added locally) replayed through the same entry points the targets
//! use, as ordinary tests: no input may panic. Long runs: `cargo fuzz run <target>` (docs in
//! fuzz/README.md).

#![allow(clippy::unwrap_used)]

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        f(&data);
        // Prefixes and single-byte flips of each seed: the cheapest mutations, always run.
        for cut in [0, 1, data.len() / 2, data.len().saturating_sub(1)] {
            f(&data[..cut.min(data.len())]);
        }
        for i in (0..data.len()).step_by((data.len() / 64).max(1)) {
            let mut d = data.clone();
            d[i] ^= 0xff;
            f(&d);
        }
        n += 1;
    }
    assert!(n > 0, "no corpus for {target} in {}", dir.display());
}

#[test]
fn policy_corpus() {
    replay("policy", xgate::dev::fuzzing::policy);
}

#[test]
fn wire_corpus() {
    replay("wire", xgate::dev::fuzzing::wire);
}

#[test]
fn token_corpus() {
    replay("token", xgate::dev::fuzzing::token);
}

#[test]
fn audit_segment_corpus() {
    replay("audit_segment", xgate::dev::fuzzing::audit_segment);
}
