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

/// `strace` attached to a running process (every thread), logging to a file.
pub struct Strace(std::process::Child);

impl Strace {
    pub fn attach(pid: u32, log: &Path, args: &[&str]) -> Strace {
        let child = std::process::Command::new("strace")
            .args(["-f", "-qq", "-s", "4096", "-o"])
            .arg(log)
            .args(args)
            .args(["-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("strace (Debian package strace) is needed by this test");
        Strace(child)
    }

    /// Detach (SIGINT) and wait until strace has let go of every thread.
    pub fn detach(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.detach();
        }
    }
}

/// One system call in a `strace -f` log: where it started (`at`) and returned (`done`, a line
/// index: an `<unfinished ...>` call returns on its `resumed` line), its first argument as a
/// file descriptor, its return value and its first line.
#[derive(Debug)]
pub struct Syscall {
    pub at: usize,
    pub done: usize,
    pub name: String,
    pub fd: i64,
    pub ret: Option<String>,
    pub line: String,
}

impl Syscall {
    /// The start of its line, for messages.
    pub fn short(&self) -> String {
        self.line.chars().take(160).collect()
    }
}

pub fn syscalls(log: &str) -> Vec<Syscall> {
    let mut out: Vec<Syscall> = Vec::new();
    let mut open: std::collections::HashMap<String, usize> = Default::default();
    let ret_of = |l: &str| l.rsplit_once(" = ").map(|(_, r)| r.trim().to_owned());
    for (i, line) in log.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("<... ") {
            if let Some(k) = open.remove(pid) {
                out[k].done = i;
                out[k].ret = ret_of(r);
            }
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        let fd = args
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(-1);
        let unfinished = rest.ends_with("<unfinished ...>");
        if unfinished {
            open.insert(pid.to_owned(), out.len());
        }
        out.push(Syscall {
            at: i,
            done: i,
            name: name.to_owned(),
            fd,
            ret: if unfinished { None } else { ret_of(rest) },
            line: line.to_owned(),
        });
    }
    out
}

/// The file descriptors of `pid`'s established TCP connections whose local port is `port`
/// (the callers connected to a gateway listening on it).
pub fn established_fds(pid: u32, port: u16) -> Vec<i64> {
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            (u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == "01")
                .then(|| f.get(9).map(|s| s.to_string()))?
        })
        .collect();
    let mut fds = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if inodes.iter().any(|i| t == format!("socket:[{i}]")) {
            fds.extend(e.file_name().to_str().and_then(|s| s.parse::<i64>().ok()));
        }
    }
    fds
}
