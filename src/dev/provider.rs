//! A sample department backend (provider) implementing the standard `DataExchange` service over
//! an in-memory table, with synthetic data for the demo: public-security household registration
//! and market-supervision company registry.
//!
//! It is what a department would write: it honours the filter, the requested fields and
//! paging, and reads the consumer identity from the gateway's `x-xgate-*` metadata. Tests can
//! make it misbehave on purpose (return every column whatever was asked, answer slowly) to
//! prove the gateway does not trust providers.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::{
    StreamExt,
    wrappers::{ReceiverStream, TcpListenerStream},
};
use tonic::{
    Request, Response, Status,
    metadata::MetadataMap,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};

use crate::pb::{
    self, Column, FieldType, QueryRequest, QueryResponse, Row, Value, condition::Test, value::Kind,
};

/// One dataset's rows.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
}

/// What a provider saw, for tests and the demo's log.
#[derive(Debug, Default)]
pub struct ProviderStats {
    pub calls: AtomicU64,
    /// Calls being answered now, and the most ever at once.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    pub last_metadata: Mutex<Option<MetadataMap>>,
    /// The last request as the provider received it (filter, fields, paging): what tests
    /// read to prove what the gateway forwarded, not what it returned.
    pub last_request: Mutex<Option<QueryRequest>>,
    /// The DER of the client certificate the last call came with (the gateway's upstream
    /// certificate).
    pub last_peer_cert: Mutex<Option<Vec<u8>>>,
}

/// Knobs to make a provider misbehave in tests.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Return every column, whatever fields were requested.
    pub leaky: bool,
    /// Return every row, whatever the filter says.
    pub ignore_filter: bool,
    /// Wait this long before answering (and between stream batches).
    pub delay: Duration,
    /// Leave this column out of every answer (e.g. the region column a row scope needs).
    pub omit_column: Option<&'static str>,
}

#[derive(Debug, Clone)]
pub struct SampleProvider {
    name: Arc<str>,
    tables: Arc<HashMap<String, Table>>,
    behaviour: Behaviour,
    pub stats: Arc<ProviderStats>,
}

impl SampleProvider {
    pub fn new(name: &str, tables: HashMap<String, Table>, behaviour: Behaviour) -> Self {
        Self {
            name: name.into(),
            tables: Arc::new(tables),
            behaviour,
            stats: Arc::default(),
        }
    }

    fn note(&self, req: &Request<QueryRequest>) {
        self.stats.calls.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut m) = self.stats.last_metadata.lock() {
            *m = Some(req.metadata().clone());
        }
        if let Ok(mut r) = self.stats.last_request.lock() {
            *r = Some(req.get_ref().clone());
        }
        if let Ok(mut c) = self.stats.last_peer_cert.lock() {
            *c = req
                .peer_certs()
                .and_then(|certs| certs.first().map(|c| c.to_vec()));
        }
        let md = req.metadata();
        let get = |k: &str| {
            md.get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        tracing::debug!(
            provider = %self.name,
            consumer = %get("x-xgate-consumer-dept"),
            system = %get("x-xgate-consumer-system"),
            purpose = %get("x-xgate-purpose"),
            "provider call"
        );
    }

    /// Rows matching the filter from `offset` on (at most `limit`), projected onto the
    /// requested fields, and whether more rows follow. Only the rows returned are copied.
    fn select(
        &self,
        req: &QueryRequest,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<Column>, Vec<Row>, bool), Status> {
        let table = self.tables.get(&req.dataset).ok_or_else(|| {
            Status::not_found(format!("dataset `{}` is not served here", req.dataset))
        })?;
        let col = |name: &str| table.columns.iter().position(|c| c.name == name);
        let conds = req
            .filter
            .as_ref()
            .map(|f| f.conditions.as_slice())
            .unwrap_or_default();
        let mut tests = Vec::with_capacity(conds.len());
        for c in conds {
            let i = col(&c.field)
                .ok_or_else(|| Status::invalid_argument(format!("unknown field `{}`", c.field)))?;
            tests.push((i, c.test.clone()));
        }
        let proj: Vec<usize> = if req.fields.is_empty() || self.behaviour.leaky {
            (0..table.columns.len()).collect()
        } else {
            req.fields
                .iter()
                .map(|f| {
                    col(f).ok_or_else(|| Status::invalid_argument(format!("unknown field `{f}`")))
                })
                .collect::<Result<_, _>>()?
        };
        let proj: Vec<usize> = proj
            .into_iter()
            .filter(|&i| Some(table.columns[i].name.as_str()) != self.behaviour.omit_column)
            .collect();
        let columns = proj.iter().map(|&i| table.columns[i].clone()).collect();
        let mut matching = table
            .rows
            .iter()
            .filter(|r| {
                self.behaviour.ignore_filter
                    || tests
                        .iter()
                        .all(|(i, t)| matches(&r.values[*i], t.as_ref()))
            })
            .skip(offset);
        let rows = matching
            .by_ref()
            .take(limit)
            .map(|r| Row {
                values: proj.iter().map(|&i| r.values[i].clone()).collect(),
            })
            .collect();
        let more = matching.next().is_some();
        Ok((columns, rows, more))
    }

    /// Serve over mTLS on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        client_ca_pem: Vec<u8>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert_pem, key_pem))
            .client_ca_root(Certificate::from_pem(client_ca_pem));
        Server::builder()
            .tls_config(tls)?
            .add_service(pb::data_exchange_server::DataExchangeServer::new(self))
            .serve_with_incoming_shutdown(
                // No Nagle: small responses must not wait for the peer's delayed ACK.
                TcpListenerStream::new(listener).map(|s| {
                    s.inspect(|t| {
                        let _ = t.set_nodelay(true);
                    })
                }),
                shutdown,
            )
            .await
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (&a.kind, &b.kind) {
        (Some(Kind::StringValue(x)), Some(Kind::StringValue(y))) => x == y,
        _ => a == b || (a.as_text().is_some() && a.as_text() == b.as_text()),
    }
}

fn matches(v: &Value, test: Option<&Test>) -> bool {
    match test {
        None => true,
        Some(Test::Eq(x)) => same(v, x),
        Some(Test::In(list)) => list.values.iter().any(|x| same(v, x)),
        Some(Test::Prefix(p)) => v.as_text().is_some_and(|t| t.starts_with(p.as_str())),
    }
}

#[tonic::async_trait]
impl pb::data_exchange_server::DataExchange for SampleProvider {
    async fn query(&self, req: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        self.note(&req);
        let now = self.stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _done = InFlight(self.stats.clone());
        if !self.behaviour.delay.is_zero() {
            tokio::time::sleep(self.behaviour.delay).await;
        }
        let body = req.into_inner();
        let offset: usize = if body.page_token.is_empty() {
            0
        } else {
            body.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("bad page_token"))?
        };
        let size = if body.page_size == 0 {
            100
        } else {
            body.page_size as usize
        };
        let (columns, page, more) = self.select(&body, offset, size)?;
        let next = if more {
            (offset + page.len()).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(QueryResponse {
            columns,
            rows: page,
            masked_columns: vec![],
            next_page_token: next,
        }))
    }

    type QueryStreamStream = ReceiverStream<Result<QueryResponse, Status>>;

    async fn query_stream(
        &self,
        req: Request<QueryRequest>,
    ) -> Result<Response<Self::QueryStreamStream>, Status> {
        self.note(&req);
        let body = req.into_inner();
        let (columns, rows, _) = self.select(&body, 0, usize::MAX)?;
        let size = if body.page_size == 0 {
            100
        } else {
            body.page_size as usize
        };
        let delay = self.behaviour.delay;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut rows = rows.into_iter().peekable();
            while rows.peek().is_some() {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let batch: Vec<Row> = rows.by_ref().take(size).collect();
                let msg = QueryResponse {
                    columns: columns.clone(),
                    rows: batch,
                    masked_columns: vec![],
                    next_page_token: String::new(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Decrements the in-flight count when a call ends, however it ends.
struct InFlight(Arc<ProviderStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Synthetic data for the demo.

/// Deterministic pseudo-random numbers (no external seed: the demo shows the same data daily).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() as usize) % xs.len()]
    }
}

fn col(name: &str, t: FieldType) -> Column {
    Column {
        name: name.into(),
        r#type: t as i32,
    }
}

/// Regions used by the synthetic data: Hangzhou districts and Ningbo.
pub const DEMO_REGIONS: &[&str] = &["330102", "330105", "330106", "330108", "330203", "330212"];

/// ISO 7064 MOD 11-2 check character of a resident id number.
fn id_check(first17: &str) -> char {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const C: [char; 11] = ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'];
    let s: u32 = first17
        .chars()
        .zip(W)
        .map(|(c, w)| c.to_digit(10).unwrap_or(0) * w)
        .sum();
    C[(s % 11) as usize]
}

/// The public-security household registration table (`hukou.person_basic`).
pub fn person_table(n: usize) -> Table {
    let surnames = [
        "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡",
        "郭",
    ];
    let given = [
        "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛",
        "明", "超", "秀英", "霞", "平",
    ];
    let streets = [
        "文三路",
        "天目山路",
        "解放路",
        "延安路",
        "中山北路",
        "学院路",
        "钱江路",
        "中河路",
    ];
    let mut rng = Lcg(20260101);
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let region = rng.pick(DEMO_REGIONS);
        let (y, m, d) = (
            1950 + rng.next() % 55,
            1 + rng.next() % 12,
            1 + rng.next() % 28,
        );
        let seq = i % 1000;
        let first17 = format!("{region}{y:04}{m:02}{d:02}{seq:03}");
        let id = format!("{first17}{}", id_check(&first17));
        let gender = if seq % 2 == 1 { "male" } else { "female" };
        let name = format!("{}{}", rng.pick(&surnames), rng.pick(&given));
        let addr = format!("{}号 {}", 1 + rng.next() % 300, rng.pick(&streets));
        rows.push(Row {
            values: vec![
                Value::string(id),
                Value::string(name),
                Value::string(gender),
                Value::string(format!("{y:04}-{m:02}-{d:02}")),
                Value::string(region),
                Value::string(addr),
                Value {
                    kind: Some(Kind::BoolValue(rng.next().is_multiple_of(3))),
                },
                Value::string(format!(
                    "1{}{:08}",
                    3 + rng.next() % 6,
                    rng.next() % 100_000_000
                )),
            ],
        });
    }
    Table {
        columns: vec![
            col("id_number", FieldType::String),
            col("name", FieldType::String),
            col("gender", FieldType::String),
            col("birth_date", FieldType::String),
            col("region_code", FieldType::String),
            col("address", FieldType::String),
            col("household_head", FieldType::Bool),
            col("phone", FieldType::String),
        ],
        rows,
    }
}

/// `hukou.criminal_record`: never shared (share type `none`), served only to show the refusal.
pub fn criminal_table() -> Table {
    Table {
        columns: vec![
            col("id_number", FieldType::String),
            col("record", FieldType::String),
        ],
        rows: vec![Row {
            values: vec![
                Value::string("330106198001010011"),
                Value::string("(synthetic)"),
            ],
        }],
    }
}

/// The market-supervision company registry (`market.company_registry`).
pub fn company_table(n: usize) -> Table {
    let words = [
        "西湖", "钱塘", "之江", "运河", "湖滨", "东方", "华光", "新元", "瑞丰", "恒达",
    ];
    let kinds = [
        "科技", "贸易", "餐饮", "建筑", "物流", "文化", "医药", "电子",
    ];
    let statuses = ["active", "active", "active", "revoked", "cancelled"];
    let mut rng = Lcg(7);
    let person = person_table(200);
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let region = rng.pick(DEMO_REGIONS);
        let code = format!("91{region}MA{:08}{}", rng.next() % 100_000_000, i % 10);
        let rep = &person.rows[i % person.rows.len()];
        let secs = 946_684_800 + (rng.next() % 800_000_000) as i64;
        rows.push(Row {
            values: vec![
                Value::string(code),
                Value::string(format!(
                    "杭州{}{}有限公司",
                    rng.pick(&words),
                    rng.pick(&kinds)
                )),
                rep.values[1].clone(),
                rep.values[0].clone(),
                Value {
                    kind: Some(Kind::DoubleValue(
                        (10 + rng.next() % 5000) as f64 * 10_000.0,
                    )),
                },
                Value::string(rng.pick(&statuses)),
                Value {
                    kind: Some(Kind::TimestampValue(prost_types::Timestamp {
                        seconds: secs,
                        nanos: 0,
                    })),
                },
                Value::string(region),
            ],
        });
    }
    Table {
        columns: vec![
            col("credit_code", FieldType::String),
            col("company_name", FieldType::String),
            col("legal_rep", FieldType::String),
            col("legal_rep_id_number", FieldType::String),
            col("registered_capital", FieldType::Double),
            col("status", FieldType::String),
            col("established", FieldType::Timestamp),
            col("region_code", FieldType::String),
        ],
        rows,
    }
}

/// The demo's providers: (provider id, its tables).
pub fn demo_providers() -> Vec<(&'static str, HashMap<String, Table>)> {
    vec![
        (
            "public-security",
            HashMap::from([
                ("hukou.person_basic".to_owned(), person_table(2_000)),
                ("hukou.criminal_record".to_owned(), criminal_table()),
            ]),
        ),
        (
            "market-supervision",
            HashMap::from([("market.company_registry".to_owned(), company_table(500))]),
        ),
    ]
}

/// Bind a provider on `addr` (port 0 for any) and serve it with the dev PKI in `certs`.
pub async fn spawn_dev(
    provider: SampleProvider,
    id: &str,
    addr: SocketAddr,
    certs: &std::path::Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    // Every file error names the file and what it is for.
    let read = |name: String, what: &str| {
        let p = certs.join(&name);
        std::fs::read(&p)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{} ({what}): {e}", p.display())))
    };
    let cert = read(
        format!("provider-{id}.pem"),
        "the sample provider's certificate",
    )?;
    let key = read(format!("provider-{id}.key"), "the sample provider's key")?;
    let ca = read(
        "ca.pem".into(),
        "the CA the gateway's client certificate chains to",
    )?;
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            ": another demo may be running (stop it), or move this one's sample providers with `xgate demo --providers-port-base 0` (any free ports)"
        } else {
            ""
        };
        std::io::Error::new(e.kind(), format!("listen {addr}: {e}{hint}"))
    })?;
    let local = listener.local_addr()?;
    let id = id.to_owned();
    let h = tokio::spawn(async move {
        if let Err(e) = provider.serve(listener, cert, key, ca, shutdown).await {
            tracing::error!(provider = %id, error = %e, "sample provider stopped");
        }
    });
    Ok((local, h))
}
