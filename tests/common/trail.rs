//! Reading audit trails in tests: the real `xgate audit` commands, and the edits an attacker
//! (or an accident) makes to the files.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Run the real binary from the crate root: (exit code, stdout + stderr).
pub fn xgate(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn verify(dir: &Path) -> (i32, String) {
    xgate(&[
        "audit",
        "verify",
        dir.to_str().unwrap(),
        "--public-key",
        "certs-dev/audit-signing.pub",
    ])
}

pub fn copy_dir(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.path().join(p.file_name().unwrap())).unwrap();
    }
    to
}

pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    v.sort();
    v
}

/// Edit the `n`th line of the first segment with `f`.
pub fn edit_line(dir: &Path, n: usize, f: impl Fn(&str) -> Option<String>) {
    let seg = &segments(dir)[0];
    let text = std::fs::read_to_string(seg).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    match f(&lines[n]) {
        Some(l) => lines[n] = l,
        None => {
            lines.remove(n);
        }
    }
    std::fs::write(seg, lines.join("\n") + "\n").unwrap();
}

/// Recompute a record line's own hash after editing it (an attacker who knows the format).
pub fn rehash(line: &str) -> String {
    use sha2::{Digest, Sha256};
    let (body, _) = xgate::audit::store::split_hash(line).unwrap();
    let h = hex::encode(Sha256::digest(body.as_bytes()));
    format!("{},\"hash\":\"{h}\"}}", &body[..body.len() - 1])
}
