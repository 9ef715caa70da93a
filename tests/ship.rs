//! One trail for the province: gateway replicas ship their own trails into a real PostgreSQL
//! (started by the test on a free port in a temp directory). Under load, with one replica
//! killed (-9) and restarted, and with the database down for 30 s: afterwards every
//! acknowledged call is in the database exactly once and `xgate audit verify --db` passes;
//! rows edited, deleted or moved in the database are each named.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashMap,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{db::Postgres, *};
use xgate::pb::data_exchange_client::DataExchangeClient;

/// The grant's rate limit far above the load: these tests are about the trail.
fn unlimited(p: String) -> String {
    p.replace(
        "rate_limit: { per_second: 50, burst: 100 }",
        "rate_limit: { per_second: 1000000, burst: 1000000 }",
    )
}

fn ship_hook(url: String, replica: &'static str) -> ConfigHook {
    Arc::new(move |c: &mut xgate::config::Config| {
        c.audit.ship = Some(xgate::config::Ship {
            url: url.clone(),
            password_file: None,
            replica_id: Some(replica.into()),
            batch_records: 200,
            interval_ms: 50,
        });
    })
}

/// `xgate audit ARGS --db URL`: (exit code, stdout + stderr).
fn audit_db(url: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .arg("audit")
        .args(args)
        .args(["--db", url])
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

/// Calls from `n` workers on `port`'s gateway until `stop`; the trace ids acknowledged.
fn load(
    url: String,
    n: usize,
    stop: tokio::sync::watch::Receiver<bool>,
    acked: Arc<Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (url, stop, acked) = (url.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let ch = dept_channel(&url, "civil-affairs").await;
                let t = token("civil-affairs");
                while !*stop.borrow() {
                    let mut c = DataExchangeClient::new(ch.clone());
                    match c
                        .query(req(
                            query(
                                "hukou.person_basic",
                                "subsidy-eligibility",
                                &["region_code = 330106"],
                                5,
                            ),
                            &t,
                        ))
                        .await
                    {
                        Ok(r) => acked.lock().unwrap().push(trace_id(r.metadata())),
                        // The replica was killed: this worker is done.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect()
}

/// Every record of every replica is in the database exactly once (as many rows as local
/// records, per replica), and every acknowledged call's record is there once.
fn check_complete(pg: &Postgres, locals: &[(&str, &Path)], acked: &[String]) {
    for (replica, dir) in locals {
        let local = xgate::audit::read_all(dir).unwrap().len();
        let in_db: usize = pg
            .psql(&format!(
                "SELECT count(*) FROM xgate_audit_records WHERE replica = '{replica}'"
            ))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(in_db, local, "replica {replica}: rows vs local records");
    }
    let counts: HashMap<String, u64> = pg
        .psql("SELECT trace_id, count(*) FROM xgate_audit_records WHERE kind = 'call' GROUP BY trace_id")
        .lines()
        .filter_map(|l| {
            let (t, n) = l.split_once('|')?;
            Some((t.to_owned(), n.parse().ok()?))
        })
        .collect();
    for t in acked {
        assert_eq!(counts.get(t), Some(&1), "acknowledged call {t}");
    }
}

/// `xgate serve` on a config with shipping, as replica `replica`.
fn serve(
    work: &Path,
    providers: &Harness,
    pg_url: &str,
    replica: &str,
    port: u16,
    admin: u16,
) -> Child {
    let c = certs();
    std::fs::write(
        work.join("policy.yaml"),
        std::fs::read_to_string(&providers.policy_path).unwrap(),
    )
    .unwrap();
    let cfg = format!(
        "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nwatch_policy: false\ntrust_domain: zj.gov.example\n\
         tls: {{ cert: {c}/gateway.pem, key: {c}/gateway.key, client_ca: {c}/ca.pem, watch: false }}\n\
         jwt: {{ jwks: {c}/jwks.json, issuer: \"https://idp.zj.gov.example\", audience: xgate }}\n\
         policy: policy.yaml\npseudonym_key_file: {c}/pseudonym.key\n\
         audit:\n  dir: {a}\n  signing_key_file: {c}/audit-signing.key\n  subject_key_file: {c}/audit-subject.key\n  checkpoint_every_records: 100\n\
         \x20 ship: {{ url: \"{pg_url}\", replica_id: {replica}, batch_records: 200, interval_ms: 50 }}\n\
         upstream: {{ ca: {c}/ca.pem, cert: {c}/gateway-client.pem, key: {c}/gateway-client.key }}\n\
         log: {{ level: warn }}\n",
        c = c.display(),
        a = work.join("audit").display(),
    );
    let path = work.join("xgate.yaml");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "xgate serve did not start: {}",
            std::fs::read_to_string(work.join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// What `/ready` says about shipping.
async fn shipping(admin: std::net::SocketAddr) -> serde_json::Value {
    let (_, body) = http(admin, "GET", "/ready").await;
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["audit_shipping"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_ship_one_trail_through_a_kill_9() {
    if !Postgres::available() {
        eprintln!("skipped: PostgreSQL is not installed (bash .ci/deps)");
        return;
    }
    let pg = Postgres::start();
    let url = pg.url();
    let mut a = Harness::start(Opts {
        config: Some(ship_hook(url.clone(), "xgate-a")),
        edit_policy: Some(unlimited),
        admin: true,
        ..Opts::default()
    })
    .await;
    let mut b = Harness::start(Opts {
        config: Some(ship_hook(url.clone(), "xgate-b")),
        edit_policy: Some(unlimited),
        ..Opts::default()
    })
    .await;
    // The third is the real binary, killed -9 in the middle of its batches.
    let work = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut c = serve(work.path(), &a, &url, "xgate-c", port, admin);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut workers = load(a.url(), 2, stop.clone(), acked.clone());
    workers.extend(load(b.url(), 2, stop.clone(), acked.clone()));
    let c_workers = load(
        format!("https://127.0.0.1:{port}"),
        2,
        stop.clone(),
        acked.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = c.kill();
    let _ = c.wait();
    for w in c_workers {
        let _ = w.await;
    }
    // Restarted on its trail: it resumes from what the database holds.
    let mut c = serve(work.path(), &a, &url, "xgate-c", port, admin);
    let c_workers = load(
        format!("https://127.0.0.1:{port}"),
        2,
        stop.clone(),
        acked.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let _ = stop_tx.send(true);
    for w in workers.into_iter().chain(c_workers) {
        let _ = w.await;
    }
    // A subject read through two replicas (an eq filter on each).
    let id = "330106199001010011";
    for h in [&a, &b] {
        let mut cl = h.data("civil-affairs").await;
        let _ = cl
            .query(req(
                query(
                    "hukou.person_basic",
                    "subsidy-eligibility",
                    &[&format!("id_number = {id}")],
                    1,
                ),
                &token("civil-affairs"),
            ))
            .await
            .unwrap();
    }
    let s = shipping(a.admin.unwrap()).await;
    assert_eq!(s["replica"], "xgate-a", "{s}");
    a.stop().await;
    b.stop().await;
    // SIGTERM: a graceful stop ships what the last records made durable.
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let _ = c.wait();
    let acked = acked.lock().unwrap().clone();
    eprintln!("three replicas: {} acknowledged calls", acked.len());
    assert!(acked.len() > 100, "enough load: {}", acked.len());
    check_complete(
        &pg,
        &[
            ("xgate-a", &a.audit_path),
            ("xgate-b", &b.audit_path),
            ("xgate-c", &work.path().join("audit")),
        ],
        &acked,
    );
    let (code, out) = audit_db(&url, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches(": OK").count(), 3, "{out}");
    // search --db: across replicas, the same filters, which replica each came from.
    let (code, out) = audit_db(
        &url,
        &[
            "search",
            "--subject",
            id,
            "--subject-key",
            certs().join("audit-subject.key").to_str().unwrap(),
            "--format",
            "jsonl",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let replicas: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["replica"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        replicas.contains(&"xgate-a".to_owned()) && replicas.contains(&"xgate-b".to_owned()),
        "{out}"
    );
    // The search by subject was noted first: who, as which database user, the hash only.
    let noted =
        pg.psql("SELECT by_user || ' ' || db_user || ' ' || subject FROM xgate_audit_searches");
    assert_eq!(noted.lines().count(), 1, "{noted}");
    assert!(noted.contains(" postgres s:"), "{noted}");
    assert!(
        !noted.contains(id),
        "the id itself is never written: {noted}"
    );
    let (code, out) = audit_db(&url, &["search", "--consumer", "civil-affairs"]);
    assert_eq!(code, 0);
    assert!(out.contains("every replica"), "{out}");
    // The league table over every replica's calls.
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(["report", "--db", &url, "--format", "json", "--policy"])
        .arg(&a.policy_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["records"].as_u64().unwrap() >= acked.len() as u64,
        "every replica's records are counted: {} < {}",
        v["records"],
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_down_for_30_s_under_load_loses_nothing() {
    if !Postgres::available() {
        eprintln!("skipped: PostgreSQL is not installed (bash .ci/deps)");
        return;
    }
    let mut pg = Postgres::start();
    let url = pg.url();
    let mut h = Harness::start(Opts {
        config: Some(ship_hook(url.clone(), "xgate-a")),
        edit_policy: Some(unlimited),
        admin: true,
        ..Opts::default()
    })
    .await;
    let admin = h.admin.unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let workers = load(h.url(), 2, stop, acked.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.kill9();
    let down_at = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(30)).await;
    // The gateway kept serving on its local trail; shipping is behind and says so, and the
    // gateway is still ready (the local trail is the durability point).
    let served_while_down = acked.lock().unwrap().len() - down_at;
    assert!(
        served_while_down > 100,
        "served while the database was down: {served_while_down}"
    );
    let (code, body) = http(admin, "GET", "/ready").await;
    assert_eq!(code, 200, "{body}");
    let s = shipping(admin).await;
    assert_eq!(s["connected"], false, "{s}");
    assert!(s["lag_records"].as_u64().unwrap() > 100, "{s}");
    assert!(s["error"].as_str().is_some(), "{s}");
    let (_, m) = http(admin, "GET", "/metrics").await;
    assert!(
        m.contains("xgate_audit_ship_lag_records"),
        "lag is a metric"
    );
    pg.start_again();
    // Caught up within a few seconds of the database's return.
    let t0 = Instant::now();
    loop {
        let s = shipping(admin).await;
        if s["connected"] == true && s["lag_records"].as_u64() == Some(0) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never caught up: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "database down 30 s: {served_while_down} calls served meanwhile, {} records behind; caught up {:?} after it returned",
        s["lag_records"],
        t0.elapsed()
    );
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = w.await;
    }
    h.stop().await;
    let acked = acked.lock().unwrap().clone();
    check_complete(&pg, &[("xgate-a", &h.audit_path)], &acked);
    let (code, out) = audit_db(&url, &["verify"]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_db_names_an_edited_a_deleted_and_a_moved_row() {
    if !Postgres::available() {
        eprintln!("skipped: PostgreSQL is not installed (bash .ci/deps)");
        return;
    }
    let pg = Postgres::start();
    let url = pg.url();
    let mut h = Harness::start(Opts {
        config: Some(ship_hook(url.clone(), "xgate-a")),
        edit_policy: Some(unlimited),
        ..Opts::default()
    })
    .await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let workers = load(h.url(), 1, stop, acked.clone());
    while acked.lock().unwrap().len() < 40 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = w.await;
    }
    h.stop().await;
    let (code, out) = audit_db(&url, &["verify"]);
    assert_eq!(code, 0, "before any change: {out}");
    // The whole trail shipped again (as a second shipper under the same replica id would):
    // the rows already there fail `COPY` on the key, the batch goes in by `ON CONFLICT DO
    // NOTHING`, and nothing is doubled.
    let before = pg.psql("SELECT count(*) FROM xgate_audit_records");
    let mut segments: Vec<_> = std::fs::read_dir(&h.audit_path)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    segments.sort();
    let rows: Vec<_> = segments
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("{\"seq\""))
                .map(|l| xgate::audit::db::Row::from_line(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(rows.len() >= 40, "{} records read back", rows.len());
    let pool = xgate::audit::db::connect(&url, None, 1).await.unwrap();
    xgate::audit::db::insert(&pool, "xgate-a", &rows, &[], &mut Default::default())
        .await
        .unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM xgate_audit_records"), before);
    let (code, out) = audit_db(&url, &["verify"]);
    assert_eq!(code, 0, "after shipping it all twice: {out}");
    // An edit (a refusal made to look allowed), a deletion, and two rows' lines swapped.
    pg.psql(
        "UPDATE xgate_audit_records SET line = replace(line, '\"rows\":5', '\"rows\":0') WHERE seq = 10; \
         DELETE FROM xgate_audit_records WHERE seq = 20; \
         UPDATE xgate_audit_records r SET line = o.line FROM xgate_audit_records o \
           WHERE (r.seq, o.seq) IN ((30, 31), (31, 30));",
    );
    let (code, out) = audit_db(&url, &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("record 10: edited"), "{out}");
    assert!(
        out.contains("records 20..20 are missing (deleted)"),
        "{out}"
    );
    assert!(
        out.contains("record 30: the row holds the line of record 31"),
        "{out}"
    );
    assert!(
        out.contains("record 31: the row holds the line of record 30"),
        "{out}"
    );
}

/// A replica's chain of `n` records written at `times` (RFC 3339), as the gateway writes them.
fn chain(times: &[String]) -> Vec<xgate::audit::db::Row> {
    use sha2::Digest;
    let mut prev = String::new();
    times
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let body = format!(
                "{{\"seq\":{},\"prev\":\"{prev}\",\"time\":\"{t}\",\"consumer_dept\":\"civil-affairs\",\"dataset\":\"hukou.person_basic\",\"decision\":\"allow\"}}",
                i + 1
            );
            let hash = hex::encode(sha2::Sha256::digest(body.as_bytes()));
            let line = format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]);
            prev = hash;
            xgate::audit::db::Row::from_line(&line).unwrap()
        })
        .collect()
}

/// Retention in the database: `audit prune` drops whole months only once every replica has
/// shipped past them (a retired one named), keeps where each chain now starts, and `verify
/// --db` holds the first remaining row to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_drops_shipped_months_and_verify_holds_the_new_start() {
    if !Postgres::available() {
        eprintln!("skipped: PostgreSQL is not installed (bash .ci/deps)");
        return;
    }
    let pg = Postgres::start();
    let url = pg.url();
    let pool = xgate::audit::db::connect(&url, None, 1).await.unwrap();
    xgate::audit::db::ensure_schema(&pool).await.unwrap();
    let at =
        |month: u32, i: usize| format!("2026-{month:02}-{:02}T{:02}:00:00Z", 1 + i % 28, i % 24);
    let a: Vec<String> = (0..30)
        .map(|i| at(9, i))
        .chain((0..30).map(|i| at(10, i)))
        .chain((0..10).map(|i| at(11, i)))
        .collect();
    let b: Vec<String> = (0..10).map(|i| at(9, i)).collect();
    for (replica, times) in [("xgate-a", &a), ("xgate-b", &b)] {
        xgate::audit::db::insert(&pool, replica, &chain(times), &[], &mut Default::default())
            .await
            .unwrap();
    }
    let count = || {
        pg.psql("SELECT count(*) FROM xgate_audit_records")
            .trim()
            .to_owned()
    };
    assert_eq!(count(), "80");
    let (code, out) = audit_db(&url, &["verify"]);
    assert_eq!(code, 0, "{out}");

    // xgate-b shipped nothing after September: it could still ship into it.
    let (code, out) = audit_db(&url, &["prune", "--before", "2026-10"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("replica xgate-b has shipped only up to 2026-09"),
        "{out}"
    );
    assert_eq!(count(), "80");
    let (code, out) = audit_db(&url, &["prune", "--before", "2026-10-05"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("expected a month, YYYY-MM"), "{out}");

    let (code, out) = audit_db(
        &url,
        &[
            "prune",
            "--before",
            "2026-10",
            "--retired",
            "xgate-b",
            "--dry-run",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("would drop 1 partition(s), 40 record(s)"),
        "{out}"
    );
    assert_eq!(count(), "80");

    let (code, out) = audit_db(
        &url,
        &[
            "prune",
            "--before",
            "2026-10",
            "--retired",
            "xgate-b",
            "--by",
            "officer-li",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("dropped 1 partition(s), 40 record(s)"),
        "{out}"
    );
    assert!(
        out.contains("replica xgate-a: chain now starts at record 31"),
        "{out}"
    );
    assert_eq!(count(), "40");
    assert_eq!(
        pg.psql("SELECT through_seq || ' ' || pruned_by FROM xgate_audit_pruned WHERE replica = 'xgate-a'")
            .trim(),
        "30 officer-li"
    );
    let (code, out) = audit_db(&url, &["verify"]);
    assert_eq!(code, 0, "after the prune: {out}");
    assert!(
        out.contains("replica xgate-a: OK — 40 records (seq 31..70)"),
        "{out}"
    );
    // Nothing older is left to drop.
    let (code, out) = audit_db(&url, &["prune", "--before", "2026-10"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no partition dropped"), "{out}");

    // The first remaining row deleted: named, though no row before it is left.
    pg.psql("DELETE FROM xgate_audit_records WHERE replica = 'xgate-a' AND seq = 31");
    let (code, out) = audit_db(&url, &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("replica xgate-a: record 32: records 31..31 are missing"),
        "{out}"
    );
}

/// With shipping on, the console's change preview re-decides the province's calls (every
/// replica's, from the database), not only this replica's own files: calls another replica
/// shipped count too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_preview_replays_the_province_trail() {
    if !Postgres::available() {
        eprintln!("skipped: PostgreSQL is not installed (bash .ci/deps)");
        return;
    }
    let pg = Postgres::start();
    let url = pg.url();
    let mut h = Harness::start(Opts {
        admin: true,
        config: Some(ship_hook(url.clone(), "xgate-a")),
        ..Opts::default()
    })
    .await;
    let mut ca = h.data("civil-affairs").await;
    for _ in 0..3 {
        ca.query(req(
            query(
                "hukou.person_basic",
                "subsidy-eligibility",
                &["region_code = 330106"],
                1,
            ),
            &token("civil-affairs"),
        ))
        .await
        .unwrap();
    }
    let count = |q: &str| pg.psql(q).trim().parse::<u64>().unwrap_or(0);
    let calls = "SELECT count(*) FROM xgate_audit_records WHERE kind = 'call' AND consumer_dept = 'civil-affairs'";
    let deadline = Instant::now() + Duration::from_secs(30);
    // (The shipper creates the table when it first connects: until then there is none.)
    let table = || {
        pg.psql("SELECT to_regclass('xgate_audit_records') IS NOT NULL")
            .trim()
            == "t"
    };
    while !table() || count(calls) < 3 {
        assert!(Instant::now() < deadline, "the calls were not shipped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another replica's calls: in the database, not in this replica's files.
    pg.psql(
        "INSERT INTO xgate_audit_records (replica, seq, time, kind, trace_id, consumer_dept, consumer_system, \
           dataset, purpose, decision, grpc_status, prev, hash, line, subjects) \
         SELECT 'xgate-b', seq, time, kind, trace_id, consumer_dept, consumer_system, dataset, purpose, \
           decision, grpc_status, prev, hash, line, subjects \
         FROM xgate_audit_records WHERE replica = 'xgate-a'",
    );
    assert_eq!(count(calls), 6);
    let current = std::fs::read_to_string(&h.policy_path).unwrap();
    let candidate = current.replacen(
        "purposes: [subsidy-eligibility",
        "purposes: [subsidy-review",
        1,
    );
    assert_ne!(candidate, current);
    let mut li = h.officer(Some("officer-bureau"));
    let token = li.get("/preview").await.csrf();
    let r = li
        .post_form(
            "/preview",
            &[("csrf", &token), ("candidate", &candidate), ("days", "1")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body
            .contains("<span id=\"impact-source\">全省审计库</span>"),
        "{}",
        r.body
    );
    let row = r
        .body
        .split("<tr>")
        .find(|row| row.contains("<td>civil-affairs</td>"))
        .unwrap_or_else(|| panic!("no civil-affairs row: {}", r.body));
    assert!(
        row.contains("<td class=\"num refused\">6</td>"),
        "both replicas' calls: {row}"
    );
    h.stop().await;
}
