//! `xgate provider` against real databases: SQLite in a temp file, and PostgreSQL 15 and
//! MariaDB 10.11 servers started by the test on free ports (tests/common/db.rs).
//!
//! Every filter kind and type against each engine, with hostile values, compared with the
//! literal meaning over the rows the test inserted; keyset paging that visits each row once
//! while rows are inserted; the statement logs prove values were bound, never written into
//! SQL; schema mismatch at start and a column dropped while serving; the database killed and
//! restarted under load; only the gateway may call; and the whole path through the gateway.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    time::Duration,
};

use common::{
    assert_reject, certs,
    db::{MariaDb, Postgres},
};
use tonic::{Code, transport::Channel};
use xgate::{
    dev::client,
    pb::{
        self, Condition, Filter, QueryRequest, Value, ValueList, condition::Test,
        data_exchange_client::DataExchangeClient, value::Kind,
    },
    provider,
};

const ENTRY: &str = r#"
  - id: test.people
    title: Test people
    owner: public-security
    provider: public-security
    share_type: unconditional
    subject_key: pid
    region_field: region
    fields:
      - { name: pid,     type: string,    sensitivity: public }
      - { name: name,    type: string,    sensitivity: public }
      - { name: age,     type: int64,     sensitivity: public }
      - { name: score,   type: double,    sensitivity: public }
      - { name: active,  type: bool,      sensitivity: public }
      - { name: photo,   type: bytes,     sensitivity: public }
      - { name: updated, type: timestamp, sensitivity: public }
      - { name: region,  type: string,    sensitivity: public }
"#;

/// The dev policy with the test dataset in its catalogue.
fn catalogue(provider_port: u16) -> String {
    common::policy_with_ports(provider_port, 1).replacen(
        "\ndatasets:\n",
        &format!("\ndatasets:\n{ENTRY}\n"),
        1,
    )
}

#[derive(Debug, Clone, PartialEq)]
struct Person {
    pid: String,
    name: Option<String>,
    age: Option<i64>,
    score: Option<f64>,
    active: Option<bool>,
    photo: Option<Vec<u8>>,
    updated: Option<i64>,
    region: Option<String>,
}

/// Names a hostile caller would filter by, and names rows have.
fn names(nul: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "O'Brien",
        "x'; DROP TABLE people; --",
        "100%",
        "100% sure",
        "a_b",
        "axb",
        "a\\b",
        "a\\\\b",
        "ABC",
        "abc",
        "abc ",
        "张三",
        "张三丰",
        "'",
        "\"",
        ";",
        "--",
        "!bang",
        "!!",
        "50!%",
        "`tick`",
        "$1",
        "?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("z".repeat(5000));
    if nul {
        v.push("nul\0byte".into());
    }
    v
}

fn people(nul: bool) -> Vec<Person> {
    let names = names(nul);
    let regions = [
        Some("330106"),
        Some("330108"),
        Some("330102"),
        None,
        Some("3301"),
    ];
    (0..80)
        .map(|i: usize| Person {
            pid: format!("p{i:03}"),
            name: if i % 9 == 8 {
                None
            } else {
                Some(names[i % names.len()].clone())
            },
            age: if i % 11 == 10 {
                None
            } else {
                Some((i % 90) as i64)
            },
            score: Some(i as f64 / 4.0),
            active: Some(i.is_multiple_of(3)),
            photo: Some(vec![i as u8, 0, 255]),
            updated: Some(1_700_000_000 + (i as i64) * 3600),
            region: regions[i % regions.len()].map(str::to_owned),
        })
        .collect()
}

enum Db {
    Sqlite(tempfile::TempDir),
    Pg(Postgres),
    Maria(MariaDb),
}

impl Db {
    fn nul_ok(&self) -> bool {
        !matches!(self, Db::Pg(_))
    }

    /// The admin URL (writes), and the URL + password the provider reads with.
    fn urls(&self) -> (String, String, Option<String>) {
        match self {
            Db::Sqlite(d) => {
                let f = d.path().join("people.db");
                (
                    format!("sqlite://{}?mode=rwc", f.display()),
                    format!("sqlite://{}", f.display()),
                    None,
                )
            }
            Db::Pg(pg) => (
                pg.url(),
                pg.url_as("xgate_reader", "", "postgres").replace(":@", "@"),
                Some("reader-pw".into()),
            ),
            Db::Maria(m) => (
                m.url_as("root", MariaDb::PASSWORD, "xg"),
                format!("mysql://xgate_reader@127.0.0.1:{}/xg", m.port),
                Some("reader-pw".into()),
            ),
        }
    }

    fn start(kind: &str) -> Db {
        match kind {
            "sqlite" => Db::Sqlite(tempfile::tempdir().unwrap()),
            "postgres" => {
                let pg = Postgres::start();
                Db::Pg(pg)
            }
            "mariadb" => {
                let m = MariaDb::start();
                m.sql("CREATE DATABASE xg CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci");
                Db::Maria(m)
            }
            _ => unreachable!(),
        }
    }

    /// Create `people` with the engine's native types, fill it, and create the read-only
    /// user exactly as docs/providers.md tells a DBA to.
    async fn fill(&self, rows: &[Person]) {
        let (admin, _, _) = self.urls();
        match self {
            Db::Sqlite(_) => {
                let pool = sqlx::SqlitePool::connect(&admin).await.unwrap();
                sqlx::query("CREATE TABLE people (pid TEXT PRIMARY KEY NOT NULL, full_name TEXT, age INTEGER, score REAL, active BOOLEAN, photo BLOB, updated DATETIME, region TEXT)").execute(&pool).await.unwrap();
                sqlx::query("CREATE TABLE sentinel (x INTEGER)")
                    .execute(&pool)
                    .await
                    .unwrap();
                for p in rows {
                    sqlx::query("INSERT INTO people VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
                        .bind(&p.pid)
                        .bind(&p.name)
                        .bind(p.age)
                        .bind(p.score)
                        .bind(p.active)
                        .bind(&p.photo)
                        .bind(p.updated.map(naive))
                        .bind(&p.region)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                pool.close().await;
            }
            Db::Pg(pg) => {
                let pool = sqlx::PgPool::connect(&admin).await.unwrap();
                sqlx::query("CREATE TABLE people (pid text PRIMARY KEY, full_name text, age int4, score float8, active bool, photo bytea, updated timestamptz, region text)").execute(&pool).await.unwrap();
                sqlx::query("CREATE TABLE sentinel (x int)")
                    .execute(&pool)
                    .await
                    .unwrap();
                for p in rows {
                    sqlx::query("INSERT INTO people VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                        .bind(&p.pid)
                        .bind(&p.name)
                        .bind(p.age.map(|a| a as i32))
                        .bind(p.score)
                        .bind(p.active)
                        .bind(&p.photo)
                        .bind(p.updated.map(utc))
                        .bind(&p.region)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                pool.close().await;
                pg.psql("CREATE ROLE xgate_reader LOGIN PASSWORD 'reader-pw';\nGRANT USAGE ON SCHEMA public TO xgate_reader;\nGRANT SELECT ON people TO xgate_reader;");
            }
            Db::Maria(m) => {
                let pool = sqlx::MySqlPool::connect(&admin).await.unwrap();
                sqlx::query("CREATE TABLE people (pid VARCHAR(64) PRIMARY KEY, full_name TEXT, age INT, score DOUBLE, active BOOLEAN, photo BLOB, updated DATETIME(6), region VARCHAR(16), INDEX (region))").execute(&pool).await.unwrap();
                sqlx::query("CREATE TABLE sentinel (x INT)")
                    .execute(&pool)
                    .await
                    .unwrap();
                for p in rows {
                    sqlx::query("INSERT INTO people VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
                        .bind(&p.pid)
                        .bind(&p.name)
                        .bind(p.age.map(|a| a as i32))
                        .bind(p.score)
                        .bind(p.active)
                        .bind(&p.photo)
                        .bind(p.updated.map(naive))
                        .bind(&p.region)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                pool.close().await;
                m.sql("CREATE USER 'xgate_reader'@'%' IDENTIFIED BY 'reader-pw';\nGRANT SELECT ON xg.people TO 'xgate_reader'@'%';");
            }
        }
    }

    /// Run one admin statement.
    async fn exec(&self, sql: &str) {
        let (admin, _, _) = self.urls();
        match self {
            Db::Sqlite(_) => {
                let pool = sqlx::SqlitePool::connect(&admin).await.unwrap();
                sqlx::query(sql).execute(&pool).await.unwrap();
                pool.close().await;
            }
            Db::Pg(_) => {
                let pool = sqlx::PgPool::connect(&admin).await.unwrap();
                sqlx::query(sql).execute(&pool).await.unwrap();
                pool.close().await;
            }
            Db::Maria(_) => {
                let pool = sqlx::MySqlPool::connect(&admin).await.unwrap();
                sqlx::query(sql).execute(&pool).await.unwrap();
                pool.close().await;
            }
        }
    }

    async fn count(&self, table: &str) -> i64 {
        let (admin, _, _) = self.urls();
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match self {
            Db::Sqlite(_) => sqlx::query_scalar(&sql)
                .fetch_one(&sqlx::SqlitePool::connect(&admin).await.unwrap())
                .await
                .unwrap(),
            Db::Pg(_) => sqlx::query_scalar(&sql)
                .fetch_one(&sqlx::PgPool::connect(&admin).await.unwrap())
                .await
                .unwrap(),
            Db::Maria(_) => sqlx::query_scalar(&sql)
                .fetch_one(&sqlx::MySqlPool::connect(&admin).await.unwrap())
                .await
                .unwrap(),
        }
    }
}

fn utc(s: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(s).unwrap()
}

fn naive(s: i64) -> time::PrimitiveDateTime {
    let t = utc(s);
    time::PrimitiveDateTime::new(t.date(), t.time())
}

/// A provider over `db` with the test dataset (`name` read from column `full_name`).
struct Rig {
    _dir: tempfile::TempDir,
    running: Option<provider::Running>,
}

fn provider_yaml(
    dir: &Path,
    url: &str,
    password: Option<&str>,
    statement_timeout_ms: u64,
) -> String {
    let c = certs();
    let pw = match password {
        Some(p) => {
            let f = dir.join("db-password");
            std::fs::write(&f, format!("{p}\n")).unwrap();
            format!("\n      password_file: {}", f.display())
        }
        None => String::new(),
    };
    format!(
        r#"id: public-security
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
tls:
  cert: {c}/provider-public-security.pem
  key: {c}/provider-public-security.key
  client_ca: {c}/ca.pem
gateway:
  identities: ["spiffe://zj.gov.example/gateway"]
catalogue: {cat}
check_interval_secs: 1
sources:
  db:
    sql:
      url: "{url}"{pw}
      max_connections: 4
      statement_timeout_ms: {statement_timeout_ms}
      connect_timeout_ms: 1000
datasets:
  - id: test.people
    source: db
    table: people
    columns: {{ name: full_name }}
"#,
        c = c.display(),
        cat = dir.join("policy.yaml").display(),
    )
}

impl Rig {
    async fn start(db: &Db) -> Rig {
        Self::start_with(db, 5000).await
    }

    async fn start_with(db: &Db, statement_timeout_ms: u64) -> Rig {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), catalogue(1)).unwrap();
        let (_, url, pw) = db.urls();
        let config = dir.path().join("provider.yaml");
        std::fs::write(
            &config,
            provider_yaml(dir.path(), &url, pw.as_deref(), statement_timeout_ms),
        )
        .unwrap();
        let cfg = provider::ProviderConfig::load(&config).unwrap();
        let running = provider::start(&cfg, Some(config.clone())).await.unwrap();
        Rig {
            _dir: dir,
            running: Some(running),
        }
    }

    fn running(&self) -> &provider::Running {
        self.running.as_ref().unwrap()
    }

    /// A client with the gateway's certificate (or another's).
    async fn client_as(&self, cert: &str) -> DataExchangeClient<Channel> {
        DataExchangeClient::new(channel_as(self.running().addr, cert).await)
    }

    async fn client(&self) -> DataExchangeClient<Channel> {
        self.client_as("gateway-client").await
    }

    async fn channel(&self) -> Channel {
        channel_as(self.running().addr, "gateway-client").await
    }

    async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.unwrap();
        }
    }
}

fn s(v: &str) -> Value {
    Value::string(v)
}
fn int(n: i64) -> Value {
    Value {
        kind: Some(Kind::Int64Value(n)),
    }
}
fn null() -> Value {
    Value {
        kind: Some(Kind::NullValue(0)),
    }
}

fn cond(field: &str, test: Test) -> Condition {
    Condition {
        field: field.into(),
        test: Some(test),
    }
}

fn request(conds: Vec<Condition>, fields: &[&str], page_size: u32) -> QueryRequest {
    QueryRequest {
        dataset: "test.people".into(),
        fields: fields.iter().map(|f| f.to_string()).collect(),
        filter: Some(Filter { conditions: conds }),
        purpose: "testing".into(),
        page_size,
        page_token: String::new(),
    }
}

/// Every row of every page: (pids in order received, the rows).
async fn all_pages(
    c: &mut DataExchangeClient<Channel>,
    mut q: QueryRequest,
) -> Result<Vec<pb::Row>, tonic::Status> {
    let mut rows = Vec::new();
    loop {
        let r = c.query(q.clone()).await?.into_inner();
        rows.extend(r.rows);
        if r.next_page_token.is_empty() {
            return Ok(rows);
        }
        q.page_token = r.next_page_token;
    }
}

fn pids(rows: &[pb::Row]) -> Vec<String> {
    rows.iter().map(|r| common::text(&r.values[0])).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// What a test means literally, over the rows inserted.
enum Lit {
    Eq(&'static str, Option<String>),
    In(Vec<Option<String>>),
    Prefix(String),
    AgeIn(Vec<i64>),
    Active(bool),
    Score(f64),
    Updated(i64),
    RegionPrefixAndActive(String, bool),
}

fn truth(rows: &[Person], lit: &Lit) -> Vec<String> {
    let keep = |p: &Person| match lit {
        Lit::Eq("name", v) => &p.name == v,
        Lit::Eq("region", v) => &p.region == v,
        Lit::Eq(..) => unreachable!(),
        Lit::In(vs) => vs.contains(&p.name),
        Lit::Prefix(pre) => p.name.as_ref().is_some_and(|n| n.starts_with(pre.as_str())),
        Lit::AgeIn(ages) => p.age.is_some_and(|a| ages.contains(&a)),
        Lit::Active(b) => p.active == Some(*b),
        Lit::Score(x) => p.score == Some(*x),
        Lit::Updated(t) => p.updated == Some(*t),
        Lit::RegionPrefixAndActive(pre, b) => {
            p.region
                .as_ref()
                .is_some_and(|r| r.starts_with(pre.as_str()))
                && p.active == Some(*b)
        }
    };
    sorted(
        rows.iter()
            .filter(|p| keep(p))
            .map(|p| p.pid.clone())
            .collect(),
    )
}

fn ts(secs: i64) -> Value {
    Value {
        kind: Some(Kind::TimestampValue(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        })),
    }
}

/// Every filter kind and type, hostile values included, against the literal meaning.
async fn filters_mean_what_they_say(db: Db) {
    let rows = people(db.nul_ok());
    db.fill(&rows).await;
    let rig = Rig::start(&db).await;
    let (ready, body) = rig.running().readiness();
    assert!(ready, "{body}");
    let mut c = rig.client().await;
    let mut cases: Vec<(String, Vec<Condition>, Lit)> = Vec::new();
    for n in names(true) {
        let label = format!("eq name {:?}", n.chars().take(30).collect::<String>());
        cases.push((
            label,
            vec![cond("name", Test::Eq(s(&n)))],
            Lit::Eq("name", Some(n.clone())),
        ));
    }
    cases.push((
        "eq name null".into(),
        vec![cond("name", Test::Eq(null()))],
        Lit::Eq("name", None),
    ));
    cases.push((
        "eq region null".into(),
        vec![cond("region", Test::Eq(null()))],
        Lit::Eq("region", None),
    ));
    cases.push((
        "eq region 330106".into(),
        vec![cond("region", Test::Eq(s("330106")))],
        Lit::Eq("region", Some("330106".into())),
    ));
    // 1,000 values, nearly all matching nothing, with hostile ones and a null among them.
    let mut many: Vec<Option<String>> = (0..990).map(|i| Some(format!("nobody-{i}'--"))).collect();
    many.extend(names(db.nul_ok()).into_iter().take(9).map(Some));
    many.push(None);
    cases.push((
        "in 1000 names".into(),
        vec![cond(
            "name",
            Test::In(ValueList {
                values: many
                    .iter()
                    .map(|v| v.as_deref().map_or_else(null, s))
                    .collect(),
            }),
        )],
        Lit::In(many.clone()),
    ));
    for p in [
        "100%", "a_", "a\\", "ab", "ABC", "abc", "张三", "!", "!!", "'", "x'; DROP", "", "50!%",
        "z",
    ] {
        cases.push((
            format!("prefix {p:?}"),
            vec![cond("name", Test::Prefix(p.into()))],
            Lit::Prefix(p.into()),
        ));
    }
    cases.push((
        "in ages".into(),
        vec![cond(
            "age",
            Test::In(ValueList {
                values: vec![int(3), int(4), int(77), int(i64::MAX)],
            }),
        )],
        Lit::AgeIn(vec![3, 4, 77, i64::MAX]),
    ));
    cases.push((
        "eq active".into(),
        vec![cond(
            "active",
            Test::Eq(Value {
                kind: Some(Kind::BoolValue(true)),
            }),
        )],
        Lit::Active(true),
    ));
    cases.push((
        "eq score".into(),
        vec![cond(
            "score",
            Test::Eq(Value {
                kind: Some(Kind::DoubleValue(2.5)),
            }),
        )],
        Lit::Score(2.5),
    ));
    cases.push((
        "eq updated".into(),
        vec![cond("updated", Test::Eq(ts(1_700_000_000 + 7 * 3600)))],
        Lit::Updated(1_700_000_000 + 7 * 3600),
    ));
    cases.push((
        "region prefix and active".into(),
        vec![
            cond("region", Test::Prefix("3301".into())),
            cond(
                "active",
                Test::Eq(Value {
                    kind: Some(Kind::BoolValue(false)),
                }),
            ),
        ],
        Lit::RegionPrefixAndActive("3301".into(), false),
    ));
    for (label, conds, lit) in &cases {
        if !db.nul_ok() && label.contains('\0') {
            // PostgreSQL text holds no NUL: the value matches nothing, and nothing is sent.
            let got = all_pages(&mut c, request(conds.clone(), &["pid"], 7))
                .await
                .unwrap();
            assert!(got.is_empty(), "{label}");
            continue;
        }
        let got = all_pages(&mut c, request(conds.clone(), &["pid", "name"], 7))
            .await
            .unwrap_or_else(|e| panic!("{label}: {e:?}"));
        let got = pids(&got);
        let unique: BTreeSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "{label}: a row came twice");
        assert_eq!(sorted(got), truth(&rows, lit), "{label}");
    }
    // Nothing else ran: both tables are intact.
    assert_eq!(db.count("people").await, rows.len() as i64);
    assert_eq!(db.count("sentinel").await, 0);
    // Values travelled as bound parameters: the statement text never carries them.
    match &db {
        Db::Pg(pg) => {
            let log = pg.statement_log();
            let hits: Vec<&str> = log.lines().filter(|l| l.contains("DROP TABLE")).collect();
            assert!(!hits.is_empty(), "the statement log has the calls");
            for l in hits {
                assert!(
                    l.contains("parameters:"),
                    "a caller value in statement text: {l}"
                );
            }
            assert!(
                log.contains("\"full_name\" = $1"),
                "the statements use placeholders"
            );
        }
        Db::Maria(m) => {
            let log = m.statement_log();
            // MariaDB logs prepared statements twice: `Prepare` (placeholders) and `Execute`
            // (values shown); a value in a `Query` line would mean it was sent as SQL text.
            for l in log.lines().filter(|l| l.contains("DROP TABLE")) {
                assert!(
                    l.contains("Execute"),
                    "a caller value outside a prepared statement: {l}"
                );
            }
            assert!(
                log.contains("Prepare") && log.contains("`full_name` = ?"),
                "placeholders"
            );
        }
        Db::Sqlite(_) => {}
    }
    // Typed like the catalogue: a string for an int64 field is refused, naming the field.
    let e = c
        .query(request(vec![cond("age", Test::Eq(s("3")))], &["pid"], 5))
        .await
        .unwrap_err();
    assert_reject(&e, Code::InvalidArgument, "REQUEST_MALFORMED");
    assert!(e.message().contains("`age`"), "{e:?}");
    // Column pruning: only the fields asked for come back, typed as the catalogue says.
    let r = c
        .query(request(vec![], &["updated", "score", "photo"], 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["updated", "score", "photo"]
    );
    assert!(r.rows.iter().all(|row| row.values.len() == 3));
    assert!(matches!(
        r.rows[0].values[0].kind,
        Some(Kind::TimestampValue(_))
    ));
    assert!(matches!(
        r.rows[0].values[2].kind,
        Some(Kind::BytesValue(_))
    ));
    rig.stop().await;
}

#[tokio::test]
async fn sqlite_filters_mean_what_they_say() {
    filters_mean_what_they_say(Db::start("sqlite")).await;
}

#[tokio::test]
async fn postgres_filters_mean_what_they_say() {
    filters_mean_what_they_say(Db::start("postgres")).await;
}

#[tokio::test]
async fn mariadb_filters_mean_what_they_say() {
    filters_mean_what_they_say(Db::start("mariadb")).await;
}

/// Keyset paging visits every row present at the start exactly once, while rows are
/// inserted before and after the position; a token is bound to its query.
async fn paging_visits_each_row_once(db: Db) {
    let rows = people(false);
    db.fill(&rows).await;
    let rig = Rig::start(&db).await;
    let mut c = rig.client().await;
    let mut q = request(vec![], &["name", "pid"], 6);
    let mut seen: Vec<String> = Vec::new();
    let mut n = 0;
    loop {
        let r = c.query(q.clone()).await.unwrap().into_inner();
        seen.extend(r.rows.iter().map(|row| common::text(&row.values[1])));
        if r.next_page_token.is_empty() {
            break;
        }
        // New rows on both sides of where the paging is.
        n += 1;
        db.exec(&format!(
            "INSERT INTO people (pid, full_name) VALUES ('p{:03}a', 'late'), ('a{n:03}', 'early')",
            n * 6
        ))
        .await;
        q.page_token = r.next_page_token;
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no row twice");
    for p in &rows {
        assert!(unique.contains(&p.pid), "{} was skipped", p.pid);
    }
    assert!(
        !seen.iter().any(|p| p.starts_with('a')),
        "rows inserted behind the position are not revisited"
    );
    // The token is opaque and bound to its query.
    let first = c
        .query(request(vec![], &["pid"], 5))
        .await
        .unwrap()
        .into_inner();
    let mut other = request(
        vec![cond(
            "active",
            Test::Eq(Value {
                kind: Some(Kind::BoolValue(true)),
            }),
        )],
        &["pid"],
        5,
    );
    other.page_token = first.next_page_token.clone();
    assert_reject(
        &c.query(other).await.unwrap_err(),
        Code::InvalidArgument,
        "PAGE_TOKEN_INVALID",
    );
    let mut forged = request(vec![], &["pid"], 5);
    forged.page_token = "k1.c3A.AAAAAAAAAAAAAAAAAAAAAA".into();
    assert_reject(
        &c.query(forged).await.unwrap_err(),
        Code::InvalidArgument,
        "PAGE_TOKEN_INVALID",
    );
    // A stream returns what the pages return.
    let mut stream = c
        .query_stream(request(
            vec![cond("region", Test::Prefix("3301".into()))],
            &["pid"],
            4,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut streamed = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        assert!(m.rows.len() <= 4);
        streamed.extend(pids(&m.rows));
    }
    let paged = pids(
        &all_pages(
            &mut c,
            request(
                vec![cond("region", Test::Prefix("3301".into()))],
                &["pid"],
                9,
            ),
        )
        .await
        .unwrap(),
    );
    assert_eq!(sorted(streamed), sorted(paged));
    rig.stop().await;
}

#[tokio::test]
async fn sqlite_paging_visits_each_row_once() {
    paging_visits_each_row_once(Db::start("sqlite")).await;
}

#[tokio::test]
async fn postgres_paging_visits_each_row_once() {
    paging_visits_each_row_once(Db::start("postgres")).await;
}

#[tokio::test]
async fn mariadb_paging_visits_each_row_once() {
    paging_visits_each_row_once(Db::start("mariadb")).await;
}

/// Only the gateway's certificate may call; anyone else is refused with a reason.
#[tokio::test]
async fn only_the_gateway_may_call() {
    let db = Db::start("sqlite");
    db.fill(&people(true)).await;
    let rig = Rig::start(&db).await;
    let mut consumer = rig.client_as("civil-affairs").await;
    let e = consumer
        .query(request(vec![], &["pid"], 5))
        .await
        .unwrap_err();
    assert_reject(&e, Code::PermissionDenied, "CALLER_NOT_GATEWAY");
    let e = consumer
        .query_stream(request(vec![], &["pid"], 5))
        .await
        .unwrap_err();
    assert_reject(&e, Code::PermissionDenied, "CALLER_NOT_GATEWAY");
    // Unknown dataset and unknown field: named.
    let mut gw = rig.client().await;
    let mut q = request(vec![], &["pid"], 5);
    q.dataset = "hukou.person_basic".into();
    assert_reject(
        &gw.query(q).await.unwrap_err(),
        Code::NotFound,
        "DATASET_UNKNOWN",
    );
    let e = gw
        .query(request(vec![], &["pid", "salary"], 5))
        .await
        .unwrap_err();
    assert_reject(&e, Code::InvalidArgument, "FIELD_UNKNOWN");
    assert!(e.message().contains("salary"));
    rig.stop().await;
}

/// A column whose type does not fit, or that is missing, refuses the dataset at start and
/// says which field and column in /ready; calls are refused, not failed one by one.
#[tokio::test]
async fn a_schema_mismatch_refuses_the_dataset_and_names_field_and_column() {
    let pg = Db::start("postgres");
    let Db::Pg(p) = &pg else { unreachable!() };
    p.psql("CREATE TABLE people (pid text PRIMARY KEY, full_name text, age text, score float8, active bool, photo bytea, updated timestamptz);\nCREATE ROLE xgate_reader LOGIN PASSWORD 'reader-pw';\nGRANT SELECT ON people TO xgate_reader;");
    let rig = Rig::start(&pg).await;
    let (ready, body) = rig.running().readiness();
    assert!(!ready);
    let errs = body["datasets"]["test.people"]["errors"].to_string();
    assert!(
        errs.contains("field `region`: column `region` not found"),
        "{errs}"
    );
    let (code, text) = common::http(rig.running().admin_addr.unwrap(), "GET", "/ready").await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("column `region` not found"), "{text}");
    // Add the column with the wrong type for `age` still there: that is named next.
    p.psql("ALTER TABLE people ADD COLUMN region text;");
    rig.running().reload().await.unwrap();
    let (_, body) = rig.running().readiness();
    let errs = body["datasets"]["test.people"]["errors"].to_string();
    assert!(errs.contains("field `age`: column `age` is TEXT"), "{errs}");
    let mut c = rig.client().await;
    let e = c.query(request(vec![], &["pid"], 5)).await.unwrap_err();
    assert_reject(&e, Code::FailedPrecondition, "DATASET_NOT_SERVED");
    let (_, metrics) = common::http(rig.running().admin_addr.unwrap(), "GET", "/metrics").await;
    assert!(
        metrics.contains("xgate_source_dataset_serving{dataset=\"test.people\"} 0"),
        "{metrics}"
    );
    // Fixed by the DBA: served at the next check, without a restart.
    p.psql("ALTER TABLE people ALTER COLUMN age TYPE int8 USING age::int8;");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(rig.running().readiness().0);
    c.query(request(vec![], &["pid", "age"], 5)).await.unwrap();
    rig.stop().await;
}

/// A column dropped while serving: a clear FAILED_PRECONDITION, the dataset refused until it
/// is back, and never a crash.
#[tokio::test]
async fn a_column_dropped_while_serving_is_a_clear_status() {
    let pg = Db::start("postgres");
    pg.fill(&people(false)).await;
    let rig = Rig::start(&pg).await;
    let mut c = rig.client().await;
    c.query(request(vec![], &["pid", "score"], 5))
        .await
        .unwrap();
    let Db::Pg(p) = &pg else { unreachable!() };
    p.psql("ALTER TABLE people DROP COLUMN score;");
    let e = c
        .query(request(vec![], &["pid", "score"], 5))
        .await
        .unwrap_err();
    assert_reject(&e, Code::FailedPrecondition, "SOURCE_SCHEMA_CHANGED");
    assert!(
        !e.message().contains("score\" does not exist"),
        "no database internals: {e:?}"
    );
    let e = c.query(request(vec![], &["pid"], 5)).await.unwrap_err();
    assert_reject(&e, Code::FailedPrecondition, "DATASET_NOT_SERVED");
    assert!(!rig.running().readiness().0);
    p.psql("ALTER TABLE people ADD COLUMN score float8;");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.query(request(vec![], &["pid", "score"], 5))
        .await
        .unwrap();
    rig.stop().await;
}

/// The database killed (-9) and restarted under load: calls fail fast with UNAVAILABLE
/// while it is down, none hangs, and the provider reconnects by itself.
#[tokio::test]
async fn the_database_killed_and_restarted_under_load() {
    let mut pg = Db::start("postgres");
    pg.fill(&people(false)).await;
    let rig = Rig::start_with(&pg, 1000).await;
    let c = rig.client().await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for w in 0..4 {
        let mut c = c.clone();
        let stop = stop_rx.clone();
        workers.push(tokio::spawn(async move {
            let mut codes: HashMap<String, u64> = HashMap::new();
            let mut slowest = Duration::ZERO;
            while !*stop.borrow() {
                let t = std::time::Instant::now();
                let r = c
                    .query(request(
                        vec![cond("pid", Test::Eq(s(&format!("p{:03}", w * 7))))],
                        &["pid", "name"],
                        5,
                    ))
                    .await;
                slowest = slowest.max(t.elapsed());
                let key = match r {
                    Ok(_) => "OK".to_owned(),
                    Err(e) => format!(
                        "{:?} {}",
                        e.code(),
                        tonic_types::StatusExt::get_error_details(&e)
                            .error_info()
                            .map(|i| i.reason.clone())
                            .unwrap_or_default()
                    ),
                };
                *codes.entry(key).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (codes, slowest)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Db::Pg(p) = &mut pg else { unreachable!() };
    p.kill9();
    // Health follows the source: the dataset stops SERVING at its next check.
    let ch = c.clone();
    let mut health = tonic_health::pb::health_client::HealthClient::new(rig.channel().await);
    let status = |h: tonic_health::pb::HealthCheckResponse| h.status;
    let down = std::time::Instant::now();
    loop {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "xgate.v1.DataExchange/test.people".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if status(r) == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            down.elapsed() < Duration::from_secs(5),
            "health still SERVING with the database down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(ch);
    p.start_again();
    // Back within a few seconds, with no provider restart.
    let mut probe = c.clone();
    let back = std::time::Instant::now();
    loop {
        if probe.query(request(vec![], &["pid"], 5)).await.is_ok() {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "the provider did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And SERVING again once a check reaches it.
    let up = std::time::Instant::now();
    loop {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: "".into() })
            .await
            .unwrap()
            .into_inner();
        if status(r) == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
        assert!(
            up.elapsed() < Duration::from_secs(5),
            "health did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send(true).unwrap();
    let mut all: HashMap<String, u64> = HashMap::new();
    for w in workers {
        let (codes, slowest) = w.await.unwrap();
        assert!(
            slowest < Duration::from_secs(3),
            "a call hung for {slowest:?}"
        );
        for (k, v) in codes {
            *all.entry(k).or_default() += v;
        }
    }
    assert!(all.get("OK").copied().unwrap_or(0) > 20, "{all:?}");
    let failed: u64 = all.iter().filter(|(k, _)| *k != "OK").map(|(_, v)| v).sum();
    assert!(failed > 0, "the outage was seen: {all:?}");
    for k in all.keys().filter(|k| *k != "OK") {
        assert!(
            k == "Unavailable SOURCE_UNAVAILABLE" || k == "DeadlineExceeded SOURCE_TIMEOUT",
            "unexpected {k}: {all:?}"
        );
    }
    // Health followed the source, and metrics counted the errors by kind.
    let (_, metrics) = common::http(rig.running().admin_addr.unwrap(), "GET", "/metrics").await;
    assert!(
        metrics.contains("xgate_source_errors_total{source=\"db\",kind=\"unavailable\"}"),
        "{metrics}"
    );
    rig.stop().await;
}

/// A slow statement: the database's statement timeout ends it, and the caller gets
/// DEADLINE_EXCEEDED with a reason, well before its own deadline.
#[tokio::test]
async fn a_slow_statement_is_cut_by_the_statement_timeout() {
    let pg = Db::start("postgres");
    pg.fill(&people(false)).await;
    let Db::Pg(p) = &pg else { unreachable!() };
    // A view that takes 3 s for any row (its check, LIMIT 0, reads none).
    p.psql("CREATE VIEW slow_people AS SELECT p.* FROM people p, (SELECT pg_sleep(3)) s;\nGRANT SELECT ON slow_people TO xgate_reader;");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), catalogue(1)).unwrap();
    let (_, url, pw) = pg.urls();
    let yaml = provider_yaml(dir.path(), &url, pw.as_deref(), 500)
        .replace("table: people", "table: slow_people");
    let config = dir.path().join("provider.yaml");
    std::fs::write(&config, yaml).unwrap();
    let cfg = provider::ProviderConfig::load(&config).unwrap();
    let running = provider::start(&cfg, None).await.unwrap();
    assert!(running.readiness().0, "{}", running.readiness().1);
    let t = std::time::Instant::now();
    let e = gateway_client(running.addr)
        .await
        .query(request(vec![], &["pid"], 5))
        .await
        .unwrap_err();
    assert_reject(&e, Code::DeadlineExceeded, "SOURCE_TIMEOUT");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert!(
        p.statement_log()
            .contains("canceling statement due to statement timeout")
    );
    running.shutdown().await.unwrap();
}

/// The whole path: consumer → gateway (mTLS + JWT, policy, masks, row scope) → provider over
/// PostgreSQL; the row scope is pushed down as a prefix the database evaluates.
#[tokio::test]
async fn through_the_gateway_over_postgres() {
    let pg = Db::start("postgres");
    let rows = people(false);
    pg.fill(&rows).await;
    let rig = Rig::start(&pg).await;
    let port = rig.running().addr.port();
    let grant = r#"
  - id: xihu-people
    consumer: xihu-civil-affairs
    dataset: test.people
    fields: [pid, name, region]
    purposes: [temporary-relief]
    row_scope: own-region
"#;
    let policy = catalogue(port).replacen("\ngrants:\n", &format!("\ngrants:\n{grant}\n"), 1);
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(&policy_path, policy).unwrap();
    let cfg = xgate::config::Config::demo(
        &certs(),
        policy_path,
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("audit"),
    );
    let gw = xgate::serve::start(&cfg).await.unwrap();
    let url = format!("https://{}", gw.addr);
    let mut c = DataExchangeClient::new(common::dept_channel(&url, "xihu-civil-affairs").await);
    let mut q = request(vec![], &["pid", "name", "region"], 7);
    q.purpose = "temporary-relief".into();
    let mut got = Vec::new();
    loop {
        let r = c
            .query(common::req(q.clone(), &common::token("xihu-civil-affairs")))
            .await
            .unwrap()
            .into_inner();
        got.extend(r.rows);
        if r.next_page_token.is_empty() {
            break;
        }
        q.page_token = r.next_page_token;
    }
    let want: Vec<String> = sorted(
        rows.iter()
            .filter(|p| p.region.as_deref().is_some_and(|r| r.starts_with("330106")))
            .map(|p| p.pid.clone())
            .collect(),
    );
    assert_eq!(sorted(pids(&got)), want);
    let Db::Pg(p) = &pg else { unreachable!() };
    assert!(
        p.statement_log().contains("\"region\" LIKE $1 ESCAPE '!'"),
        "the scope ran in the database"
    );
    gw.shutdown().await.unwrap();
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/JSON sources: a real HTTP server in the test, standing for a department's REST service.

#[derive(Clone)]
struct Api {
    rows: std::sync::Arc<Vec<Person>>,
    /// Ignore `region_prefix` (a service that drops a parameter it does not know).
    sloppy: bool,
    delay: Duration,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn person_json(p: &Person) -> serde_json::Value {
    use base64::Engine as _;
    serde_json::json!({
        "pid": p.pid,
        "fullName": p.name,
        "age": p.age,
        "score": p.score,
        "active": p.active,
        "photo": p.photo.as_ref().map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
        "updated": p.updated.map(|t| utc(t).format(&time::format_description::well_known::Rfc3339).unwrap()),
        "region": p.region,
    })
}

async fn api_list(
    axum::extract::State(api): axum::extract::State<Api>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let q = q.unwrap_or_default();
    api.seen.lock().unwrap().push(q.clone());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer secret-token") {
        return (axum::http::StatusCode::UNAUTHORIZED, "no").into_response();
    }
    let url = reqwest::Url::parse(&format!("http://x/?{q}")).unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let get = |k: &str| {
        pairs
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let page: usize = get("page")
        .first()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1);
    let size: usize = get("size")
        .first()
        .and_then(|p| p.parse().ok())
        .unwrap_or(10);
    // Slow for real calls; the provider's one-row start-up probe is answered at once.
    if size > 1 {
        tokio::time::sleep(api.delay).await;
    }
    let pids = get("pid");
    let names = get("name");
    let prefix = get("region_prefix");
    let matching: Vec<&Person> = api
        .rows
        .iter()
        .filter(|p| pids.is_empty() || pids.contains(&p.pid))
        .filter(|p| names.is_empty() || p.name.as_ref().is_some_and(|n| names.contains(n)))
        .filter(|p| {
            api.sloppy
                || prefix.is_empty()
                || p.region
                    .as_ref()
                    .is_some_and(|r| r.starts_with(prefix[0].as_str()))
        })
        .collect();
    let items: Vec<serde_json::Value> = matching
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .map(|p| person_json(p))
        .collect();
    axum::Json(serde_json::json!({ "data": { "items": items, "total": matching.len() } }))
        .into_response()
}

async fn serve_api(api: Api) -> std::net::SocketAddr {
    let app = axum::Router::new()
        .route("/api/people", axum::routing::get(api_list))
        .with_state(api);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    a
}

fn http_yaml(dir: &Path, api: std::net::SocketAddr, filters: &str) -> String {
    let token = dir.join("api-token");
    std::fs::write(&token, "secret-token\n").unwrap();
    provider_yaml(dir, "sqlite://unused", None, 1000)
        .split("sources:")
        .next()
        .unwrap()
        .to_owned()
        + &format!(
            r#"sources:
  api:
    http:
      base_url: http://{api}
      bearer_token_file: {token}
      timeout_ms: 800
datasets:
  - id: test.people
    source: api
    columns: {{ name: fullName }}
    http:
      path: /api/people
      rows: data.items
      filters:
{filters}
      paging: {{ style: page, page_param: page, size_param: size }}
"#,
            token = token.display()
        )
}

const FILTERS: &str = "        pid: { eq: pid, in: pid }\n        name: { eq: name }\n        region: { prefix: region_prefix }";

async fn http_rig(
    api: Api,
    filters: &str,
) -> Result<(tempfile::TempDir, provider::Running), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let addr = serve_api(api).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), catalogue(1)).unwrap();
    let config = dir.path().join("provider.yaml");
    std::fs::write(&config, http_yaml(dir.path(), addr, filters)).unwrap();
    let cfg = provider::ProviderConfig::load(&config).map_err(|e| e.join("; "))?;
    let running = provider::start(&cfg, None).await?;
    Ok((dir, running))
}

async fn gateway_client(addr: std::net::SocketAddr) -> DataExchangeClient<Channel> {
    DataExchangeClient::new(channel_as(addr, "gateway-client").await)
}

/// A channel to the provider at `addr` with the dev certificate `cert` (`gateway-client`
/// is the gateway's).
async fn channel_as(addr: std::net::SocketAddr, cert: &str) -> Channel {
    let c = certs();
    client::connect(
        &format!("https://{addr}"),
        &std::fs::read(c.join("ca.pem")).unwrap(),
        &std::fs::read(c.join(format!("{cert}.pem"))).unwrap(),
        &std::fs::read(c.join(format!("{cert}.key"))).unwrap(),
        "localhost",
    )
    .await
    .unwrap()
}

fn api(rows: Vec<Person>) -> Api {
    Api {
        rows: std::sync::Arc::new(rows),
        sloppy: false,
        delay: Duration::ZERO,
        seen: Default::default(),
    }
}

/// Conditions become the service's parameters, pages follow its paging, cells are typed as
/// the catalogue says, and a condition with no parameter is refused, never dropped.
#[tokio::test]
async fn an_http_service_is_queried_through_its_parameters() {
    let rows = people(true);
    let a = api(rows.clone());
    let seen = a.seen.clone();
    let (_dir, running) = http_rig(a, FILTERS).await.unwrap();
    assert!(running.readiness().0, "{}", running.readiness().1);
    let mut c = gateway_client(running.addr).await;
    // Row scope as the gateway sends it: a prefix on the region field, pushed to the service.
    let got = all_pages(
        &mut c,
        request(
            vec![cond("region", Test::Prefix("330106".into()))],
            &["pid", "name", "updated", "photo"],
            4,
        ),
    )
    .await
    .unwrap();
    let want = sorted(
        rows.iter()
            .filter(|p| p.region.as_deref().is_some_and(|r| r.starts_with("330106")))
            .map(|p| p.pid.clone())
            .collect(),
    );
    assert_eq!(sorted(pids(&got)), want);
    assert!(matches!(
        got[0].values[2].kind,
        Some(Kind::TimestampValue(_))
    ));
    assert!(matches!(got[0].values[3].kind, Some(Kind::BytesValue(_))));
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|q| q.contains("region_prefix=330106")
                && q.contains("page=2")
                && q.contains("size=4"))
    );
    // Hostile values travel as parameters, percent-encoded, and mean what they say.
    for n in names(true) {
        let got = all_pages(
            &mut c,
            request(vec![cond("name", Test::Eq(s(&n)))], &["pid"], 50),
        )
        .await
        .unwrap();
        assert_eq!(
            sorted(pids(&got)),
            truth(&rows, &Lit::Eq("name", Some(n.clone()))),
            "{n:?}"
        );
    }
    let got = all_pages(
        &mut c,
        request(
            vec![cond(
                "pid",
                Test::In(ValueList {
                    values: vec![s("p001"), s("p002&pid=p003")],
                }),
            )],
            &["pid"],
            50,
        ),
    )
    .await
    .unwrap();
    assert_eq!(pids(&got), ["p001"]);
    // No parameter for `age`: refused with the field named.
    let e = c
        .query(request(vec![cond("age", Test::Eq(int(3)))], &["pid"], 5))
        .await
        .unwrap_err();
    assert_reject(&e, Code::InvalidArgument, "FILTER_UNSUPPORTED");
    assert!(e.message().contains("`age`"), "{e:?}");
    // A stream walks every page.
    let mut st = c
        .query_stream(request(vec![], &["pid"], 7))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = st.message().await.unwrap() {
        n += m.rows.len();
    }
    assert_eq!(n, rows.len());
    running.shutdown().await.unwrap();
}

/// A dataset with row scope whose service cannot take a region prefix is refused at load,
/// naming what to add.
#[tokio::test]
async fn an_http_mapping_that_cannot_express_the_row_scope_is_refused_at_load() {
    let e = http_rig(api(people(false)), "        pid: { eq: pid }")
        .await
        .unwrap_err();
    assert!(
        e.contains("datasets.test.people.http.filters.region") && e.contains("prefix"),
        "{e}"
    );
}

/// A service that silently ignores a parameter: its rows are checked before they leave,
/// and the call fails instead of returning rows outside the condition.
#[tokio::test]
async fn rows_an_http_service_returns_outside_the_conditions_never_leave() {
    let mut a = api(people(false));
    a.sloppy = true;
    let (_dir, running) = http_rig(a, FILTERS).await.unwrap();
    let mut c = gateway_client(running.addr).await;
    let e = c
        .query(request(
            vec![cond("region", Test::Prefix("330106".into()))],
            &["pid"],
            20,
        ))
        .await
        .unwrap_err();
    assert_reject(&e, Code::Internal, "SOURCE_ERROR");
    running.shutdown().await.unwrap();
}

/// A slow service → DEADLINE_EXCEEDED SOURCE_TIMEOUT; a stopped one → UNAVAILABLE.
#[tokio::test]
async fn a_slow_or_missing_http_service_is_a_clear_status() {
    let mut a = api(people(false));
    a.delay = Duration::from_millis(1500);
    let (_dir, running) = http_rig(a, FILTERS).await.unwrap();
    assert!(running.readiness().0);
    let mut c = gateway_client(running.addr).await;
    let t = std::time::Instant::now();
    assert_reject(
        &c.query(request(vec![], &["pid"], 5)).await.unwrap_err(),
        Code::DeadlineExceeded,
        "SOURCE_TIMEOUT",
    );
    assert!(
        t.elapsed() < Duration::from_millis(1400),
        "cut at the 800 ms timeout: {:?}",
        t.elapsed()
    );
    running.shutdown().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), catalogue(1)).unwrap();
    let config = dir.path().join("provider.yaml");
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(&config, http_yaml(dir.path(), gone, FILTERS)).unwrap();
    let running = provider::start(&provider::ProviderConfig::load(&config).unwrap(), None)
        .await
        .unwrap();
    let (_, body) = running.readiness();
    assert_eq!(
        body["datasets"]["test.people"]["state"], "unavailable",
        "{body}"
    );
    running.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The real binary: traces continue the caller's, SIGHUP reloads, SIGTERM stops.

#[derive(Clone, Default)]
struct Collector(
    std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

// Two threads: the test blocks on the child's pipes while the collector keeps taking spans
// (the provider flushes its last spans to it as it stops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_continues_the_callers_trace_reloads_on_sighup_and_stops_on_sigterm() {
    use std::io::BufRead;
    let collector = Collector::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = l.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let db = Db::start("sqlite");
    db.fill(&people(false)).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), catalogue(1)).unwrap();
    let (_, url, _) = db.urls();
    let (port, admin) = (common::free_port(), common::free_port());
    let yaml = provider_yaml(dir.path(), &url, None, 2000).replace(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0",
        &format!("listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}"),
    ) + &format!(
        "otlp: {{ endpoint: \"http://127.0.0.1:{otlp}\", service_name: provider-test, sample_ratio: 1.0 }}\n"
    );
    let config = dir.path().join("provider.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(["provider", "--config"])
        .arg(&config)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.contains(&format!("listening on 127.0.0.1:{port}")),
        "{line}"
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = gateway_client(addr).await;
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut r = tonic::Request::new(request(vec![], &["pid"], 3));
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{parent}-01").parse().unwrap(),
    );
    let resp = c.query(r).await.unwrap();
    assert_eq!(resp.metadata().get(xgate::TRACE_ID_HEADER).unwrap(), trace);
    let t0 = std::time::Instant::now();
    let span = loop {
        let found = collector
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == "xgate.provider")
            .cloned();
        if let Some(s) = found {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no provider span exported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(hex::encode(&span.trace_id), trace);
    assert_eq!(hex::encode(&span.parent_span_id), parent);
    assert_eq!(span.kind, 2, "server kind");
    // SIGHUP: the edited file is checked and swapped in (here: a table that does not exist).
    std::fs::write(
        &config,
        yaml.replace("table: people", "table: no_such_table"),
    )
    .unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let t0 = std::time::Instant::now();
    loop {
        let (code, body) = common::http(
            format!("127.0.0.1:{admin}").parse().unwrap(),
            "GET",
            "/ready",
        )
        .await;
        if code == 503 {
            assert!(body.contains("no_such_table"), "{body}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the reload was not seen: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The signal's reload is logged as such (the file watcher reloads the edited file too).
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(dir.path().join("stderr"))
        .unwrap()
        .lines()
        .any(|l| l.contains("reloaded") && l.contains("signal"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no reload by signal in the log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SIGTERM: a clean stop.
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
