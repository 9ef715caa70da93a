//! The audit trail under attack and accident: tampering of every kind is detected, rotation
//! keeps the chain, a torn tail is cut on restart, a real write fault fails calls closed and
//! recovers by itself, and `kill -9` under load loses no acknowledged record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{trail::*, *};
use tonic::Code;

#[tokio::test]
async fn tampering_of_every_kind_is_detected() {
    let mut h = Harness::start(Opts::default()).await;
    let t = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    for i in 0..6 {
        let id = format!("33010619510807000{i}");
        let _ = c
            .query(req(
                query(
                    "hukou.person_basic",
                    "subsidy-eligibility",
                    &[&format!("id_number={id}")],
                    1,
                ),
                &t,
            ))
            .await;
    }
    let _ = c
        .query(req(query("hukou.person_basic", "marketing", &[], 1), &t))
        .await;
    h.stop().await;
    let dir = h.audit_dir.path().join("audit");
    let (code, out) = verify(&dir);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("OK — 7 records") && out.contains("0 record(s) after the last checkpoint"),
        "{out}"
    );

    // Who looked at this person? Answerable by the subject's id, without ids in the trail.
    let (code, out) = xgate(&[
        "audit",
        "search",
        dir.to_str().unwrap(),
        "--subject",
        "330106195108070003",
        "--subject-key",
        "certs-dev/audit-subject.key",
        "--format",
        "jsonl",
    ]);
    assert_eq!(code, 0, "{out}");
    // (stderr is in `out` too: the note that a search over the files is recorded nowhere.)
    assert!(out.contains("recorded nowhere"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with('{')).count(),
        1,
        "{out}"
    );
    assert!(
        out.contains("civil-affairs") && !out.contains("330106195108070003"),
        "{out}"
    );
    let raw = std::fs::read_to_string(&segments(&dir)[0]).unwrap();
    assert!(
        !raw.contains("330106195108070003"),
        "the trail holds no subject ids"
    );
    let (_, denied) = xgate(&[
        "audit",
        "search",
        dir.to_str().unwrap(),
        "--decision",
        "deny",
        "--format",
        "csv",
    ]);
    assert_eq!(denied.lines().count(), 2, "header + one denial: {denied}");

    // (what, edit, what verify must say)
    type Tamper = (&'static str, Box<dyn Fn(&Path)>, &'static str);
    let cases: Vec<Tamper> = vec![
        (
            "edited field",
            Box::new(|d| {
                edit_line(d, 2, |l| {
                    Some(l.replace(
                        "\"purpose\":\"subsidy-eligibility\"",
                        "\"purpose\":\"audit-exempt\"",
                    ))
                })
            }),
            "does not match its hash",
        ),
        (
            "edited and re-hashed record",
            Box::new(|d| {
                edit_line(d, 2, |l| {
                    Some(rehash(&l.replace(
                        "\"consumer_dept\":\"civil-affairs\"",
                        "\"consumer_dept\":\"health\"",
                    )))
                })
            }),
            "does not chain",
        ),
        (
            "deleted record",
            Box::new(|d| edit_line(d, 3, |_| None)),
            "missing or reordered",
        ),
        (
            "swapped records",
            Box::new(|d| {
                let seg = &segments(d)[0];
                let text = std::fs::read_to_string(seg).unwrap();
                let mut lines: Vec<&str> = text.lines().collect();
                lines.swap(1, 2);
                std::fs::write(seg, lines.join("\n") + "\n").unwrap();
            }),
            "missing or reordered",
        ),
        (
            "truncated tail",
            Box::new(|d| {
                let seg = &segments(d)[0];
                let text = std::fs::read_to_string(seg).unwrap();
                let lines: Vec<&str> = text.lines().collect();
                // Drop the last two records but keep the final checkpoint.
                let kept: Vec<&str> = lines[..lines.len() - 3]
                    .iter()
                    .chain(lines.last())
                    .copied()
                    .collect();
                std::fs::write(seg, kept.join("\n") + "\n").unwrap();
            }),
            "records were removed or inserted",
        ),
        (
            "forged checkpoint",
            Box::new(|d| {
                let last = std::fs::read_to_string(&segments(d)[0])
                    .unwrap()
                    .lines()
                    .count()
                    - 1;
                edit_line(d, last, |l| Some(l.replace("\"seq\":7", "\"seq\":6")));
            }),
            "signature does not verify",
        ),
        (
            "garbage line",
            Box::new(|d| edit_line(d, 4, |_| Some("not json at all".into()))),
            "not an audit record line",
        ),
    ];
    for (what, tamper, says) in cases {
        let copy = copy_dir(&dir);
        tamper(copy.path());
        let (code, out) = verify(copy.path());
        assert_eq!(code, 1, "{what}: {out}");
        assert!(out.contains(says), "{what}: expected `{says}` in: {out}");
        assert!(
            out.contains("audit-00000001.jsonl:"),
            "{what}: names the place: {out}"
        );
    }
}

#[tokio::test]
async fn rotation_keeps_the_chain_and_a_torn_tail_is_cut_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let audit_dir = dir.path().to_owned();
    let hook: ConfigHook = Arc::new(move |c| {
        c.audit.dir = audit_dir.clone();
        c.audit.segment_max_bytes = 4096;
    });
    let mut h = Harness::start(Opts {
        config: Some(hook.clone()),
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    for _ in 0..30 {
        c.query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap();
    }
    h.stop().await;
    assert!(
        segments(dir.path()).len() >= 3,
        "rotated: {:?}",
        segments(dir.path())
    );
    assert_eq!(verify(dir.path()).0, 0, "{}", verify(dir.path()).1);
    // A crash tore the last line in half.
    let last = segments(dir.path()).last().unwrap().clone();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":31,\"prev\":\"abc").unwrap();
    drop(f);
    let (code, out) = verify(dir.path());
    assert_eq!(code, 0, "a torn last write is tolerated: {out}");
    assert!(out.contains("torn last write: 21 byte(s)"), "{out}");
    // Restart on the same trail: the torn line is cut, the chain continues.
    let mut h = Harness::start(Opts {
        config: Some(hook),
        ..Opts::default()
    })
    .await;
    let mut c = h.data("civil-affairs").await;
    for _ in 0..5 {
        c.query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap();
    }
    let recs = h.stop().await;
    assert_eq!(recs.len(), 35);
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=35).collect::<Vec<_>>());
    let (code, out) = verify(dir.path());
    assert_eq!(code, 0, "{out}");
}

/// A real gateway process on a dev config, optionally under a file-size limit.
struct Proc {
    child: Child,
    port: u16,
    /// The admin listener (`/ready`, `/metrics`).
    admin: u16,
}

/// Run the real binary on `audit`, with more keys for the `audit` section in `audit_extra`
/// (e.g. `preallocate_bytes: 65536, `) and, with `fsize`, a cap on every file it writes.
fn start_serve_with(
    work: &Path,
    audit: &Path,
    providers: &Harness,
    fsize: Option<u64>,
    audit_extra: &str,
) -> Proc {
    let (mut cmd, port, admin) = serve_command(work, audit, providers, fsize, audit_extra);
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc { child, port, admin }
}

/// The command [`start_serve_with`] runs (config written to `work`), its port and its admin
/// port.
fn serve_command(
    work: &Path,
    audit: &Path,
    providers: &Harness,
    fsize: Option<u64>,
    audit_extra: &str,
) -> (Command, u16, u16) {
    let c = certs();
    let policy = std::fs::read_to_string(&providers.policy_path).unwrap();
    std::fs::write(work.join("policy.yaml"), policy).unwrap();
    let (port, admin) = (free_port(), free_port());
    let cfg = format!(
        "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nwatch_policy: false\ntrust_domain: zj.gov.example\n\
         tls: {{ cert: {c}/gateway.pem, key: {c}/gateway.key, client_ca: {c}/ca.pem, watch: false }}\n\
         jwt: {{ jwks: {c}/jwks.json, issuer: \"https://idp.zj.gov.example\", audience: xgate }}\n\
         policy: policy.yaml\npseudonym_key_file: {c}/pseudonym.key\n\
         audit: {{ {audit_extra}dir: {a}, signing_key_file: {c}/audit-signing.key, subject_key_file: {c}/audit-subject.key }}\n\
         upstream: {{ ca: {c}/ca.pem, cert: {c}/gateway-client.pem, key: {c}/gateway-client.key }}\n\
         log: {{ level: warn }}\n",
        c = c.display(),
        a = audit.display()
    );
    let cfg_path = work.join("xgate.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let bin = env!("CARGO_BIN_EXE_xgate");
    let mut cmd = match fsize {
        Some(n) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--fsize={n}")).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(["serve", "--config"]).arg(&cfg_path);
    (cmd, port, admin)
}

/// One permitted call that must succeed: its trace id.
async fn ok_call(
    c: &mut xgate::pb::data_exchange_client::DataExchangeClient<tonic::transport::Channel>,
    t: &str,
) -> String {
    let r = c
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            t,
        ))
        .await
        .unwrap();
    trace_id(r.metadata())
}

/// One writer per trail: a second gateway on the same audit directory refuses to start,
/// naming the first one's pid, and writes nothing; once the first dies (`kill -9`), its lock
/// goes with it and the next gateway continues the trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_trail_refuses_to_start() {
    let mut providers = Harness::start(Opts::default()).await;
    let work = tempfile::tempdir().unwrap();
    let audit = work.path().join("audit");
    let first = start_serve_with(work.path(), &audit, &providers, None, "");
    wait_listening(first.port).await;
    let mut c = client(first.port, "civil-affairs").await;
    let t = token("civil-affairs");
    let mut acked = Vec::new();
    for _ in 0..3 {
        acked.push(ok_call(&mut c, &t).await);
    }
    // The second gateway: its own port and policy copy, the same trail.
    let work2 = tempfile::tempdir().unwrap();
    let (mut cmd, port2, _) = serve_command(work2.path(), &audit, &providers, None, "");
    let out = cmd.stdout(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second gateway started: {stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", first.child.id())),
        "names the holder: {stderr}"
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port2))
            .await
            .is_err(),
        "the second gateway is not listening"
    );
    // The first goes on serving; its acknowledged records are all there.
    for _ in 0..3 {
        acked.push(ok_call(&mut c, &t).await);
    }
    // A lock left by a killed process is recovered by the next start.
    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let third = start_serve_with(work2.path(), &audit, &providers, None, "");
    wait_listening(third.port).await;
    let mut c = client(third.port, "civil-affairs").await;
    acked.push(ok_call(&mut c, &t).await);
    stop_then_each_recorded_once(third, &mut providers, &audit, &acked).await;
}

/// `listen_reuse_port`: two gateways (one single-threaded process per core, or an old and a new
/// binary during a restart) share one port, each writing its own trail. The kernel spreads
/// connections over both, and every call is recorded once, by the gateway that served it.
/// Without the option a second gateway on a port in use refuses to start, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_a_port_only_when_both_ask() {
    let mut providers = Harness::start(Opts::default()).await;
    let (w1, w2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a1, a2) = (w1.path().join("audit"), w2.path().join("audit"));
    let (mut cmd1, port, admin1) = serve_command(w1.path(), &a1, &providers, None, "");
    let (mut cmd2, port2, admin2) = serve_command(w2.path(), &a2, &providers, None, "");
    // Both on `port`; the first asks for sharing, the second not yet.
    let listen_on = |work: &Path, from: u16, reuse: bool| {
        let cfg = work.join("xgate.yaml");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("listen: 127.0.0.1:{from}\n"),
            &format!("listen: 127.0.0.1:{port}\nlisten_reuse_port: {reuse}\n"),
        );
        std::fs::write(&cfg, text).unwrap();
    };
    listen_on(w1.path(), port, true);
    listen_on(w2.path(), port2, false);
    let spawn = |cmd: &mut Command, admin: u16| Proc {
        child: (cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()).unwrap(),
        port,
        admin,
    };
    let first = spawn(&mut cmd1, admin1);
    wait_listening(port).await;
    let out = cmd2.stdout(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second gateway took the port: {stderr}"
    );
    assert!(
        stderr.contains(&format!("listen 127.0.0.1:{port}")) && stderr.contains("in use"),
        "says which port and why: {stderr}"
    );
    assert!(
        xgate::audit::read_all(&a2).map_or(true, |r| r.is_empty()),
        "the refused gateway wrote nothing"
    );
    // Asked by both: the second starts beside the first.
    let cfg2 = w2.path().join("xgate.yaml");
    let text = std::fs::read_to_string(&cfg2).unwrap();
    std::fs::write(
        &cfg2,
        text.replace("listen_reuse_port: false", "listen_reuse_port: true"),
    )
    .unwrap();
    let second = spawn(&mut cmd2, admin2);
    // Its admin port opens after the gRPC port and the trail: then calls may land on it.
    wait_listening(second.admin).await;
    let t = token("civil-affairs");
    let mut traces = Vec::new();
    // Each client is a connection of its own: 24 of them all on one process would be a
    // 1 in 2^23 chance.
    for _ in 0..24 {
        let mut c = client(port, "civil-affairs").await;
        traces.push(ok_call(&mut c, &t).await);
    }
    for p in [first, second] {
        let _ = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status();
        let mut child = p.child;
        assert!(child.wait().unwrap().success());
    }
    providers.stop().await;
    let (r1, r2) = (
        xgate::audit::read_all(&a1).unwrap(),
        xgate::audit::read_all(&a2).unwrap(),
    );
    let served =
        |recs: &[serde_json::Value], t: &str| recs.iter().filter(|r| r["trace_id"] == t).count();
    for t in &traces {
        assert_eq!(
            served(&r1, t) + served(&r2, t),
            1,
            "call {t}: one record, in one trail"
        );
    }
    for (a, recs) in [(&a1, &r1), (&a2, &r2)] {
        assert!(
            traces.iter().any(|t| served(recs, t) == 1),
            "{}: this gateway served none of the 24 connections",
            a.display()
        );
        let (code, out) = verify(a);
        assert_eq!(code, 0, "{out}");
    }
}

/// Stop the gateway cleanly (SIGTERM) and the providers; then every call in `traces` has
/// exactly one record and the trail verifies.
async fn stop_then_each_recorded_once(
    mut p: Proc,
    providers: &mut Harness,
    audit: &Path,
    traces: &[String],
) {
    let _ = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status();
    let _ = p.child.wait();
    providers.stop().await;
    let recs = xgate::audit::read_all(audit).unwrap();
    for t in traces {
        assert_eq!(
            recs.iter().filter(|r| r["trace_id"] == t.as_str()).count(),
            1,
            "call {t}: exactly one record"
        );
    }
    let (code, out) = verify(audit);
    assert_eq!(code, 0, "{out}");
}

async fn wait_listening(port: u16) {
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        // (The binary may run under strace on a loaded 2-core machine: CI once took over 20 s.)
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "gateway did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn client(
    port: u16,
    dept: &str,
) -> xgate::pb::data_exchange_client::DataExchangeClient<tonic::transport::Channel> {
    let c = certs();
    let ch = xgate::dev::client::connect(
        &format!("https://127.0.0.1:{port}"),
        &std::fs::read(c.join("ca.pem")).unwrap(),
        &std::fs::read(c.join(format!("{dept}.pem"))).unwrap(),
        &std::fs::read(c.join(format!("{dept}.key"))).unwrap(),
        "localhost",
    )
    .await
    .unwrap();
    xgate::pb::data_exchange_client::DataExchangeClient::new(ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_write_fault_fails_calls_closed_then_recovers_by_itself() {
    let recs = write_fault_then_recovery("").await;
    assert!(
        recs.iter().all(|r| r["method"] != "(refusals)"),
        "room for all"
    );
}

/// With room for only 3 held records, the refusals past them are counted per consumer and
/// reason and written as summary records: still every refusal accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_past_the_held_records_are_written_as_counted_summaries() {
    let recs = write_fault_then_recovery("held_records_max: 3, ").await;
    let summaries: Vec<_> = recs
        .iter()
        .filter(|r| r["method"] == "(refusals)")
        .collect();
    assert!(!summaries.is_empty(), "some refusals were counted");
    for s in summaries {
        assert_eq!(s["consumer_dept"], "civil-affairs");
        assert_eq!(s["reason"], "AUDIT_UNAVAILABLE");
        assert!(s["calls"].as_u64().unwrap() >= 1);
        assert!(s["until"].as_str().unwrap() >= s["time"].as_str().unwrap());
    }
}

/// The same with the writer inline on the serving runtime (`audit.writer: inline`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_write_fault_with_the_writer_inline() {
    let recs = write_fault_then_recovery("writer: inline, ").await;
    assert!(
        recs.iter().all(|r| r["method"] != "(refusals)"),
        "room for all"
    );
}

/// Calls under a real write fault until service resumes; every OK call has its record and
/// every refused call is accounted for, one by one or in a summary. Returns the records.
async fn write_fault_then_recovery(audit_extra: &str) -> Vec<serde_json::Value> {
    // The sample providers of a harness serve the real binary below.
    let mut providers = Harness::start(Opts::default()).await;
    let work = tempfile::tempdir().unwrap();
    let audit = work.path().join("audit");
    // Every file the gateway writes is capped at 24 kB by the kernel (RLIMIT_FSIZE).
    let mut p = start_serve_with(work.path(), &audit, &providers, Some(24_000), audit_extra);
    wait_listening(p.port).await;
    let mut c = client(p.port, "civil-affairs").await;
    let t = token("civil-affairs");
    let (mut ok, mut refused, mut ok_after_refusal) = (Vec::new(), Vec::new(), 0);
    let mut seen_failing = (false, false);
    // Call until service has resumed for ten calls (the writer retries every 250 ms).
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        match c
            .query(req(
                query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                &t,
            ))
            .await
        {
            Ok(r) => {
                ok.push(trace_id(r.metadata()));
                if !refused.is_empty() {
                    ok_after_refusal += 1;
                }
            }
            Err(st) => {
                assert_reject(&st, Code::Unavailable, "AUDIT_UNAVAILABLE");
                refused.push(trace_id(st.metadata()));
                // While the trail refuses records the gateway says so to its probes.
                // (Each is read at its own moment: the fault may clear in between.)
                let (status, ready, healthy) = health(p.admin).await;
                assert_eq!(status == 503, ready["audit_writable"] == false, "{ready}");
                seen_failing.0 |= status == 503;
                seen_failing.1 |= healthy == 0.0;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if ok_after_refusal >= 10 {
            break;
        }
    }
    assert!(
        refused.len() >= 5,
        "the file-size limit made too few calls fail: {}",
        refused.len()
    );
    assert!(
        ok_after_refusal >= 10,
        "service did not resume after the fault: {} refused",
        refused.len()
    );
    assert_eq!(
        seen_failing,
        (true, true),
        "probes saw the failing trail (/ready 503, xgate_audit_healthy 0)"
    );
    let (status, ready, healthy) = health(p.admin).await;
    assert_eq!((status, healthy), (200, 1.0), "healthy again: {ready}");
    let _ = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status();
    let _ = p.child.wait();
    providers.stop().await;
    // Every OK call has its record; the chain verifies across the segment the writer moved to.
    let recs = xgate::audit::read_all(&audit).unwrap();
    for t in &ok {
        assert_eq!(
            recs.iter()
                .filter(|r| r["trace_id"] == t.as_str() && r["grpc_status"] == "OK")
                .count(),
            1,
            "{t}"
        );
    }
    // Every refusal is accounted for once writing worked: its own record, or counted in a
    // summary of its consumer's refusals.
    let own = refused
        .iter()
        .filter(|t| {
            let mine: Vec<_> = recs
                .iter()
                .filter(|r| r["trace_id"] == t.as_str())
                .collect();
            assert!(mine.len() <= 1, "{t}: at most one record");
            mine.first().is_some_and(|r| {
                assert_eq!(r["reason"], "AUDIT_UNAVAILABLE", "{t}");
                assert_eq!(r["grpc_status"], "UNAVAILABLE", "{t}");
                true
            })
        })
        .count() as u64;
    let counted: u64 = recs
        .iter()
        .filter(|r| r["method"] == "(refusals)")
        .map(|r| r["calls"].as_u64().unwrap())
        .sum();
    assert_eq!(
        own + counted,
        refused.len() as u64,
        "{own} refusals recorded and {counted} counted, of {}",
        refused.len()
    );
    assert!(segments(&audit).len() >= 2);
    let (code, out) = verify(&audit);
    assert_eq!(code, 0, "{out}");
    recs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_record() {
    kill_9_under_load("").await;
}

/// The same with the writer inline on the serving runtime (`audit.writer: inline`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_the_writer_inline_loses_no_acknowledged_record() {
    kill_9_under_load("writer: inline, ").await;
}

/// The same with the live segment preallocated: the crash leaves zeros after the last
/// record, which `audit verify` reads past and the restart cuts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_preallocated_segment_loses_no_acknowledged_record() {
    kill_9_under_load("preallocate_bytes: 65536, ").await;
}

async fn kill_9_under_load(audit_extra: &str) {
    let prealloc = audit_extra.contains("preallocate_bytes");
    let mut providers = Harness::start(Opts::default()).await;
    let work = tempfile::tempdir().unwrap();
    let audit = work.path().join("audit");
    let mut p = start_serve_with(work.path(), &audit, &providers, None, audit_extra);
    wait_listening(p.port).await;
    let t = token("civil-affairs");
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut c = client(p.port, "civil-affairs").await;
        let (t, acked) = (t.clone(), acked.clone());
        workers.push(tokio::spawn(async move {
            loop {
                match c
                    .query(req(
                        query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                        &t,
                    ))
                    .await
                {
                    Ok(r) => acked.lock().unwrap().push(trace_id(r.metadata())),
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let _ = Command::new("kill")
        .args(["-KILL", &p.child.id().to_string()])
        .status();
    let _ = p.child.wait();
    for w in workers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "enough load: {}", acked.len());
    let ends_in_zeros = |path: &Path| std::fs::read(path).unwrap().last() == Some(&0);
    if prealloc {
        let live = segments(&audit).last().unwrap().clone();
        assert!(ends_in_zeros(&live), "the live segment was preallocated");
        let (code, out) = verify(&audit);
        assert_eq!(code, 0, "the crashed trail verifies as it is: {out}");
    }
    // Restart on the same trail, make a call, stop cleanly.
    let p = start_serve_with(work.path(), &audit, &providers, None, audit_extra);
    wait_listening(p.port).await;
    client(p.port, "civil-affairs")
        .await
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap();
    stop_then_each_recorded_once(p, &mut providers, &audit, &acked).await;
    for seg in segments(&audit) {
        assert!(!ends_in_zeros(&seg), "{} trimmed", seg.display());
    }
}

/// `async` mode: calls are answered without waiting for the disk, and the writer (which
/// gathers records for a moment rather than being woken by each) still writes every record
/// while the gateway runs — not only when it stops — and the trail verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_writes_every_record_while_running_and_the_chain_holds() {
    let mut providers = Harness::start(Opts::default()).await;
    let work = tempfile::tempdir().unwrap();
    let audit = work.path().join("audit");
    let p = start_serve_with(
        work.path(),
        &audit,
        &providers,
        None,
        "mode: async, async_flush_ms: 50, ",
    );
    wait_listening(p.port).await;
    let t = token("civil-affairs");
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut c = client(p.port, "civil-affairs").await;
        let t = t.clone();
        workers.push(tokio::spawn(async move {
            let mut traces = Vec::new();
            for _ in 0..25 {
                let r = c
                    .query(req(
                        query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                        &t,
                    ))
                    .await
                    .unwrap();
                traces.push(trace_id(r.metadata()));
            }
            traces
        }));
    }
    let mut traces = Vec::new();
    for w in workers {
        traces.extend(w.await.unwrap());
    }
    assert_eq!(traces.len(), 100);
    // Still running: every answered call's record reaches the file (a generous deadline,
    // not a timing assertion: the promise is "within async_flush_ms", the check "at all").
    let t0 = Instant::now();
    let written = |recs: &[serde_json::Value]| {
        traces
            .iter()
            .filter(|t| recs.iter().any(|r| r["trace_id"] == t.as_str()))
            .count()
    };
    loop {
        let recs = xgate::audit::read_all(&audit).unwrap();
        if written(&recs) == traces.len() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} of {} records written while running",
            written(&recs),
            traces.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_then_each_recorded_once(p, &mut providers, &audit, &traces).await;
}

/// `kill -9` keeps the page cache, so the tests above pass without the fsync. This one watches
/// the real binary's system calls (`strace` attached to it): for each call, the write of its
/// record, then `fdatasync` of the trail returning 0, then — only then — the first write of its
/// answer on the caller's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_is_flushed_before_the_answer_leaves() {
    let mut providers = Harness::start(Opts::default()).await;
    let work = tempfile::tempdir().unwrap();
    let audit = work.path().join("audit");
    let p = start_serve_with(work.path(), &audit, &providers, None, "");
    wait_listening(p.port).await;
    let mut c = client(p.port, "civil-affairs").await;
    let t = token("civil-affairs");
    let mut acked = vec![ok_call(&mut c, &t).await];
    let pid = p.child.id();
    let client_fds = established_fds(pid, p.port);
    assert_eq!(client_fds.len(), 1, "one caller connection: {client_fds:?}");
    let log = work.path().join("strace.log");
    let mut st = Strace::attach(
        pid,
        &log,
        &[
            "-e",
            "trace=fdatasync,fsync,write,writev,pwrite64,pwritev,sendto,sendmsg",
        ],
    );
    // Attached once a call's record shows in the log.
    let t0 = Instant::now();
    loop {
        let id = ok_call(&mut c, &t).await;
        acked.push(id.clone());
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&id)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "strace never attached"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut watched = Vec::new();
    for _ in 0..10 {
        watched.push(ok_call(&mut c, &t).await);
    }
    st.detach();
    let calls = syscalls(&std::fs::read_to_string(&log).unwrap());
    for id in &watched {
        // The record's write (one per record: the calls are one at a time).
        let writes: Vec<_> = calls
            .iter()
            .filter(|s| s.name.starts_with("pwrite") || s.name.starts_with("write"))
            .filter(|s| s.line.contains(id.as_str()))
            .collect();
        assert_eq!(writes.len(), 1, "{id}: one write of its record");
        let w = writes[0];
        let flush = calls
            .iter()
            .find(|s| s.at > w.at && s.name == "fdatasync" && s.fd == w.fd)
            .unwrap_or_else(|| panic!("{id}: no fdatasync of the trail after its record"));
        assert_eq!(flush.ret.as_deref(), Some("0"), "{id}: {}", flush.short());
        let answer = calls
            .iter()
            .find(|s| s.at > w.at && client_fds.contains(&s.fd))
            .unwrap_or_else(|| panic!("{id}: no answer written after its record"));
        assert!(
            answer.at > flush.done,
            "{id}: the answer ({}) left before the flush returned ({})",
            answer.short(),
            flush.short()
        );
    }
    acked.extend(watched);
    stop_then_each_recorded_once(p, &mut providers, &audit, &acked).await;
}

/// A flush that fails fails the calls of its batch: `strace` makes every `fdatasync` of the
/// real binary return `EIO` while it is attached. The calls then are refused
/// (`UNAVAILABLE AUDIT_UNAVAILABLE`), none has an `OK` record although its record's write
/// succeeded, and once the fault is gone service resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_fails_the_calls_of_its_batch() {
    let mut providers = Harness::start(Opts::default()).await;
    let work = tempfile::tempdir().unwrap();
    let audit = work.path().join("audit");
    let p = start_serve_with(work.path(), &audit, &providers, None, "");
    wait_listening(p.port).await;
    let mut c = client(p.port, "civil-affairs").await;
    let t = token("civil-affairs");
    let mut ok = vec![ok_call(&mut c, &t).await];
    let log = work.path().join("strace.log");
    let mut st = Strace::attach(
        p.child.id(),
        &log,
        &["-e", "trace=fdatasync", "-e", "inject=fdatasync:error=EIO"],
    );
    let mut refused = Vec::new();
    let t0 = Instant::now();
    while refused.len() < 3 {
        match c
            .query(req(
                query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                &t,
            ))
            .await
        {
            Ok(r) => ok.push(trace_id(r.metadata())),
            Err(s) => {
                assert_reject(&s, Code::Unavailable, "AUDIT_UNAVAILABLE");
                refused.push(trace_id(s.metadata()));
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the fault never bit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    st.detach();
    let injected = std::fs::read_to_string(&log).unwrap();
    assert!(
        injected.contains("EIO (Input/output error) (INJECTED)"),
        "{injected}"
    );
    // Service resumes once the flushes succeed again (the writer retries every 250 ms).
    let t0 = Instant::now();
    let resumed = loop {
        match c
            .query(req(
                query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                &t,
            ))
            .await
        {
            Ok(r) => break trace_id(r.metadata()),
            Err(s) => assert_reject(&s, Code::Unavailable, "AUDIT_UNAVAILABLE"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "service did not resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ok.push(resumed);
    stop_then_each_recorded_once(p, &mut providers, &audit, &ok).await;
    let recs = xgate::audit::read_all(&audit).unwrap();
    for id in &refused {
        let mine: Vec<_> = recs
            .iter()
            .filter(|r| r["trace_id"] == id.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "{id}: one record");
        assert_eq!(mine[0]["grpc_status"], "UNAVAILABLE", "{id}");
        assert_eq!(mine[0]["reason"], "AUDIT_UNAVAILABLE", "{id}");
    }
}

/// `/ready` (status, body) and `xgate_audit_healthy` of the gateway with this admin port.
async fn health(admin: u16) -> (u16, serde_json::Value, f64) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let (status, body) = http(addr, "GET", "/ready").await;
    let (_, metrics) = http(addr, "GET", "/metrics").await;
    let healthy = metrics
        .lines()
        .find_map(|l| l.strip_prefix("xgate_audit_healthy ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no xgate_audit_healthy in {metrics}"));
    (
        status,
        serde_json::from_str(&body).unwrap_or_default(),
        healthy,
    )
}
