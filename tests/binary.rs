//! `xgate serve` as the real binary: config file, JSON logs, OTLP switched on, SIGHUP reload,
//! probes and the console's admin API, graceful SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

fn kill(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reloads_on_sighup_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    // Real providers, so the gateway is ready (at least one provider reachable).
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let (ports, _provs) = start_providers(&Default::default(), stop_rx).await;
    let policy_text = policy_with_ports(ports["public-security"], ports["market-supervision"]);
    std::fs::write(&policy, &policy_text).unwrap();
    let (port, admin_port, otlp_port, console_port) =
        (free_port(), free_port(), free_port(), free_port());
    let cfg = serve_yaml(
        port,
        "audit",
        &format!(
            r#"admin_listen: 127.0.0.1:{admin_port}
console:
  listen: 127.0.0.1:{console_port}
  officers: [{{ name: ops, subject: bureau-officer-li, role: bureau }}]
log: {{ format: json, level: info }}
otlp: {{ endpoint: "http://127.0.0.1:{otlp_port}", service_name: xgate-test, sample_ratio: 1.0 }}"#
        ),
    );
    let cfg_path = dir.path().join("xgate.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut logs = Vec::new();
    let wait_for = |logs: &mut Vec<String>, what: &str| {
        let t0 = Instant::now();
        loop {
            if logs.iter().any(|l| l.contains(what)) {
                return;
            }
            match rx.recv_timeout(Duration::from_secs(30).saturating_sub(t0.elapsed())) {
                Ok(l) => logs.push(l),
                Err(_) => panic!("no `{what}` in the logs:\n{}", logs.join("\n")),
            }
        }
    };
    wait_for(&mut logs, "xgate listening");
    for l in &logs {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON log line: {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let (code, ready) = http(admin, "GET", "/ready").await;
    assert_eq!(code, 200, "{ready}");
    // The bureau edits the file; with watching off, SIGHUP applies it.
    let edited = policy_text.replace(
        "{ per_second: 5, burst: 10 }",
        "{ per_second: 7, burst: 10 }",
    );
    std::fs::write(&policy, &edited).unwrap();
    kill("-HUP", pid);
    let t0 = Instant::now();
    loop {
        let body = console::Officer::new(
            format!("127.0.0.1:{console_port}").parse().unwrap(),
            Some("officer-bureau"),
        )
        .get("/admin/policy")
        .await
        .body;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["loaded_by"] == "sighup" {
            assert_eq!(v["reloads_ok"], 1);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "SIGHUP did not reload: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill("-TERM", pid);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    wait_for(&mut logs, "audit trail flushed and synced");
}

/// `xgate config check`: what serve would build, without binding or writing; every error
/// names its file.
#[test]
fn config_check_validates_everything_the_config_names() {
    let run = |cfg: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_xgate"))
            .args(["config", "check", "--config"])
            .arg(cfg)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = run(&root.join("deploy/dev/xgate.yaml"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK — listen 127.0.0.1:8443"));
    // --print: the effective config, defaults filled in.
    let printed = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args([
            "config",
            "check",
            "--print",
            "--config",
            "deploy/dev/xgate.yaml",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(
        text.contains("max_metadata_bytes: 32768") && text.contains("connection_idle_secs: 600"),
        "{text}"
    );
    // A missing certificate and a missing key, in a copy beside the original (relative paths).
    let text = std::fs::read_to_string(root.join("deploy/dev/xgate.yaml")).unwrap();
    let bad = text
        .replace(
            "cert: ../../certs-dev/gateway.pem",
            "cert: ../../certs-dev/no-such.pem",
        )
        .replace(
            "pseudonym_key_file: ../../certs-dev/pseudonym.key",
            "pseudonym_key_file: ../../certs-dev/no-such.key",
        )
        // A department administrator of no department, and an auditor with one.
        .replace(
            "role: dept_admin, department: civil-affairs }",
            "role: dept_admin }",
        )
        .replace(
            "subject: auditor-zhao, role: auditor }",
            "subject: auditor-zhao, role: auditor, department: health }",
        );
    let path = root.join(format!("deploy/dev/check-{}.yaml", std::process::id()));
    std::fs::write(&path, bad).unwrap();
    let out = run(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such.pem"), "{err}");
    assert!(
        err.contains("(civil-affairs-admin-wang): a dept_admin needs `department`"),
        "{err}"
    );
    assert!(
        err.contains("(auditor-zhao): only a dept_admin has a `department`"),
        "{err}"
    );
}

/// Two demos side by side: `--providers-port-base 0` moves the second one's sample providers
/// to free ports (and serves a policy copy that says so), so calls through it work.
#[test]
fn a_second_demo_moves_its_providers() {
    use std::io::BufRead;
    let audit = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--console",
            "127.0.0.1:0",
            "--providers-port-base",
            "0",
            "--audit-dir",
        ])
        .arg(audit.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep reading: a demo whose stdout is closed ends (quietly, as `| head` asks).
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let mut moved = false;
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(30)) {
        moved |= line.starts_with("policy copy ");
        if let Some(a) = line.strip_prefix("xgate demo listening on ") {
            addr = Some(a.trim().to_owned());
            break;
        }
    }
    let addr = addr.expect("the demo started");
    assert!(moved, "the demo says it serves a policy copy");
    let call = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args([
            "call",
            "--gateway",
            &format!("https://{addr}"),
            "--as",
            "civil-affairs",
        ])
        .args([
            "query",
            "hukou.person_basic",
            "--purpose",
            "subsidy-eligibility",
            "--page-size",
            "2",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        call.status.success(),
        "{}{}",
        String::from_utf8_lossy(&call.stdout),
        String::from_utf8_lossy(&call.stderr)
    );
    assert!(String::from_utf8_lossy(&call.stdout).contains("(2 rows"));
}

/// A newcomer's first hour: output piped into `head` ends quietly; logs written to a pipe
/// carry no colour codes; a missing file is named; `call --json` prints refusals as JSON
/// with the trace id.
#[test]
fn the_cli_behaves_in_pipes_and_names_what_is_missing() {
    use std::io::{BufRead, Read};
    let root = env!("CARGO_MANIFEST_DIR");
    // `| head -1`: read one line, close the pipe; the command must end quietly (exit 0), not
    // panic. A trail of 50,000 lines is more than any pipe buffers.
    let trail = tempfile::tempdir().unwrap();
    let lines: String = (1..=50_000)
        .map(|i| {
            format!(
                "{{\"seq\":{i},\"time\":\"2026-12-01T00:00:00.000Z\",\"consumer_dept\":\"x\"}}\n"
            )
        })
        .collect();
    std::fs::write(trail.path().join("audit-00000001.jsonl"), lines).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(["audit", "search", "--format", "jsonl"])
        .arg(trail.path())
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("\"seq\":1"), "{first}");
    drop(out);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(0), "{err}");
    // A demo with a certificate directory that does not exist: the file is named.
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--console",
            "127.0.0.1:0",
            "--providers-port-base",
            "0",
            "--certs",
            "/no/such/dir",
        ])
        .current_dir(root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/no/such/dir/provider-") && err.contains("certificate"),
        "{err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "no colour codes in a pipe: {err:?}"
    );
}
