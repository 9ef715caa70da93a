//! Entry points for the fuzz targets in `fuzz/` (cargo fuzz, libFuzzer) and for replaying
//! their corpus as ordinary tests (`tests/fuzz_corpus.rs`): the parsers hostile bytes reach.
//!
//! Each takes arbitrary bytes and must neither panic nor hang; what it returns is ignored.
//! Not used by the gateway itself.

use std::sync::OnceLock;

use prost::Message;

/// The policy loader: size and depth bounds, YAML, validation, locations of errors.
pub fn policy(data: &[u8]) {
    let _ = crate::policy::Policy::from_yaml(data);
}

/// A provider's response as the gateway decodes it, each row split into cells and each cell
/// shaped (passed, partly shown, pseudonymised, redacted).
pub fn wire(data: &[u8]) {
    use crate::policy::Mask;
    let Ok(resp) = crate::wire::QueryResponse::decode(data) else {
        return;
    };
    let crate::wire::Rows::Received(rows) = resp.rows else {
        return;
    };
    let key = crate::policy::mask::MaskKey::new(b"fuzzing-key-fuzzing-key-fuzzing!");
    let masks = [
        Mask::None,
        Mask::Keep { first: 3, last: 2 },
        Mask::Hash,
        Mask::Redact,
    ];
    let mut cells = Vec::new();
    for row in &rows {
        if !crate::wire::cells(row, &mut cells) {
            continue;
        }
        let mut out = crate::wire::RowWriter::with_capacity(row.len() + 8);
        for (i, c) in cells.iter().enumerate() {
            let cell = &row[c.clone()];
            let _ = crate::wire::decode_cell(cell);
            let _ = out.cell(cell, masks[i % masks.len()], &key);
        }
        out.end_row();
        let _ = out.finish();
    }
}

/// Bearer tokens, verified against the dev JWKS (header parsing, algorithm checks,
/// signatures, claims).
pub fn token(data: &[u8]) {
    static VERIFIER: OnceLock<Option<(tokio::runtime::Runtime, crate::token::TokenVerifier)>> =
        OnceLock::new();
    let Some((rt, v)) = VERIFIER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let jwks = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev/jwks.json"),
        )
        .ok()?;
        let v = rt
            .block_on(crate::token::TokenVerifier::from_jwks(
                &jwks,
                crate::token::TokenSettings::new(
                    crate::dev::pki::ISSUER,
                    crate::dev::pki::AUDIENCE,
                ),
            ))
            .ok()?;
        Some((rt, v))
    }) else {
        return;
    };
    let header = String::from_utf8_lossy(data);
    let _ = rt.block_on(v.verify_header(Some(&header)));
}

/// An audit segment as `verify` and `search` read it (one file, the newest).
pub fn audit_segment(data: &[u8]) {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("xgate-fuzz-audit-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    });
    if std::fs::write(crate::audit::store::segment_path(dir, 1), data).is_err() {
        return;
    }
    let key = [0u8; 32];
    let _ = crate::audit::read::verify(dir, &key, &crate::audit::read::Expect::default());
    let _ = crate::audit::read::search(dir, &crate::audit::read::Query::default(), |_| {});
}
