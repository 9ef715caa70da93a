//! The trail's signed head: the last checkpoint the gateway wrote and the segment it writes
//! now, in `<audit.dir>/head.json`.
//!
//! A hash chain cannot see a clean cut at its own end: records and checkpoints removed from
//! the end (or a whole newest segment deleted, or the only segment emptied) leave a shorter
//! chain that still verifies. The head is what `audit verify` holds the trail to: the writer
//! rewrites it (atomically: temporary file, fsync, rename) at every checkpoint and rotation,
//! so a trail that ends before its head's checkpoint has lost signed records.
//!
//! What it does not do: it sits in the same directory, so whoever can cut the trail can also
//! put back an older head of their own trail. An auditor who saved a head earlier
//! (`xgate audit head DIR > saved.json`) checks against it with `--expect-head`; records
//! after the last checkpoint are not covered by either (at most `checkpoint_every_records`
//! records or `checkpoint_interval_secs` seconds of them).

use std::{
    io::{self, Write},
    path::Path,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};

/// The head's file name inside the audit directory.
pub const HEAD_FILE: &str = "head.json";
/// Domain separation for head signatures (never valid as a checkpoint signature).
pub const HEAD_CONTEXT: &[u8] = b"xgate-audit-head:v1\n";

/// What the head signs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// The last checkpoint written (0: none yet).
    pub checkpoint_seq: u64,
    /// The hash that checkpoint signs.
    pub checkpoint_hash: String,
    /// The segment being written.
    pub segment: u64,
    pub time: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadFile {
    pub head: Head,
    /// base64 Ed25519 signature over `HEAD_CONTEXT` + the head's JSON.
    pub sig: String,
}

fn message(h: &Head) -> io::Result<Vec<u8>> {
    let mut m = HEAD_CONTEXT.to_vec();
    m.extend(serde_json::to_vec(h).map_err(io::Error::other)?);
    Ok(m)
}

/// Sign and replace the head atomically (a crash leaves the old head or the new, never half).
pub fn write(dir: &Path, head: Head, signer: &ring::signature::Ed25519KeyPair) -> io::Result<()> {
    let sig = B64.encode(signer.sign(&message(&head)?).as_ref());
    let mut text = serde_json::to_vec(&HeadFile { head, sig }).map_err(io::Error::other)?;
    text.push(b'\n');
    let tmp = dir.join(".head.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(HEAD_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Read a head file (the trail's own or one an auditor saved): `None` if there is none.
pub fn read(path: &Path) -> io::Result<Option<HeadFile>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not a head: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The head, if its signature verifies with `public_key`.
pub fn check(f: &HeadFile, public_key: &[u8]) -> Result<Head, String> {
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key);
    let sig = B64.decode(&f.sig).unwrap_or_default();
    let msg = message(&f.head).map_err(|e| e.to_string())?;
    key.verify(&msg, &sig)
        .map_err(|_| "the head's signature does not verify (forged or edited)".to_owned())?;
    Ok(f.head.clone())
}
