//! `provider.yaml`: which catalogue datasets this provider serves, from which source, with
//! which column for each catalogue field. Read and checked whole (every problem at once, each
//! naming the dataset, field or source); relative paths are relative to the file.
//!
//! Not here: the live-schema check (that needs the database: [`super::check`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::config::{Log, Otlp};

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// This provider's id in the catalogue (`providers[].id`).
    pub id: String,
    /// Where the gateway calls it (`xgate.v1.DataExchange` and `grpc.health.v1`, mTLS).
    pub listen: SocketAddr,
    /// Plain HTTP `/live`, `/ready` (which datasets serve, and why not) and `/metrics`.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    pub tls: Tls,
    /// Who may call: the gateway.
    pub gateway: GatewayIdentity,
    /// The public catalogue (the data bureau's policy file): the type of every field, the
    /// subject key and the region field. Only its `datasets` and `providers` are read.
    pub catalogue: PathBuf,
    /// Key that seals this provider's page tokens (32+ bytes); without one a random key per
    /// process (tokens then do not survive a restart).
    #[serde(default)]
    pub page_token_key_file: Option<PathBuf>,
    /// How often each dataset is checked again against its source (schema, reachability).
    #[serde(default = "default_check_interval")]
    pub check_interval_secs: u64,
    #[serde(default)]
    pub limits: Limits,
    pub sources: BTreeMap<String, Source>,
    pub datasets: Vec<DatasetMap>,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub otlp: Option<Otlp>,
}

fn default_check_interval() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// This provider's server certificate (PEM) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA the gateway's client certificate chains to.
    pub client_ca: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayIdentity {
    /// SAN URIs of the gateway's client certificate (`upstream.cert` in the gateway's config),
    /// e.g. `spiffe://zj.gov.example/gateway`. Any other certificate is refused.
    pub identities: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Rows per page when the request says 0.
    #[serde(default = "default_page")]
    pub default_page_size: u32,
    /// The most rows per page or stream batch.
    #[serde(default = "max_page")]
    pub max_page_size: u32,
    /// The most values in one `in` list.
    #[serde(default = "max_in")]
    pub max_in_values: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_page_size: default_page(),
            max_page_size: max_page(),
            max_in_values: max_in(),
        }
    }
}

fn default_page() -> u32 {
    100
}
fn max_page() -> u32 {
    1000
}
fn max_in() -> usize {
    1000
}

/// Where data comes from: `{ sql: {...} }` or `{ http: {...} }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(try_from = "SourceFile", into = "SourceFile")]
pub enum Source {
    Sql(SqlSource),
    Http(HttpSource),
}

/// [`Source`] as the file spells it (one key naming the kind).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sql: Option<SqlSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http: Option<HttpSource>,
}

impl TryFrom<SourceFile> for Source {
    type Error = String;
    fn try_from(f: SourceFile) -> Result<Self, String> {
        match (f.sql, f.http) {
            (Some(s), None) => Ok(Source::Sql(s)),
            (None, Some(h)) => Ok(Source::Http(h)),
            _ => Err("a source is either `sql: {...}` or `http: {...}`".into()),
        }
    }
}

impl From<Source> for SourceFile {
    fn from(s: Source) -> Self {
        match s {
            Source::Sql(s) => SourceFile {
                sql: Some(s),
                http: None,
            },
            Source::Http(h) => SourceFile {
                sql: None,
                http: Some(h),
            },
        }
    }
}

/// A PostgreSQL, MySQL/MariaDB or SQLite database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSource {
    /// `postgres://USER@HOST:PORT/DB`, `mysql://USER@HOST:PORT/DB` or `sqlite://PATH`
    /// (relative to this file). TLS options go in the URL (`sslmode=verify-full&sslrootcert=…`
    /// for PostgreSQL, `ssl-mode=VERIFY_IDENTITY&ssl-ca=…` for MySQL).
    pub url: String,
    /// The password, read from this file (never put it in the URL of a file in git).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connections for `Query` calls.
    #[serde(default = "default_conns")]
    pub max_connections: u32,
    /// Connections for `QueryStream` calls (each stream holds one while it runs).
    #[serde(default = "default_stream_conns")]
    pub stream_connections: u32,
    /// Longest a `Query` statement may run (enforced by the database, and here).
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_ms: u64,
    /// Longest a `QueryStream` statement may run.
    #[serde(default = "default_stream_timeout")]
    pub stream_timeout_ms: u64,
    /// Longest wait to connect or for a free connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
}

fn default_conns() -> u32 {
    8
}
fn default_stream_conns() -> u32 {
    2
}
fn default_statement_timeout() -> u64 {
    5_000
}
fn default_stream_timeout() -> u64 {
    600_000
}
fn default_connect_timeout() -> u64 {
    3_000
}

/// An existing HTTP/JSON service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSource {
    /// `https://host:port` (or `http://` on a loopback or trusted network) the datasets' paths
    /// are relative to.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <file contents>`.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// CA (PEM) for an `https` service with a private CA.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Longest one request may take.
    #[serde(default = "default_http_timeout")]
    pub timeout_ms: u64,
}

fn default_http_timeout() -> u64 {
    5_000
}

/// One catalogue dataset and where its rows are.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetMap {
    /// The catalogue id, e.g. `hukou.person_basic`.
    pub id: String,
    /// A key of `sources`.
    pub source: String,
    /// SQL: the table or view (`name` or `schema.name`).
    #[serde(default)]
    pub table: Option<String>,
    /// The catalogue field whose column orders pages: unique and never null (default: the
    /// dataset's subject key).
    #[serde(default)]
    pub key: Option<String>,
    /// Catalogue field → column (SQL) or JSON member (HTTP); a field left out is read from
    /// the column of the same name.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// HTTP: how to ask for the rows.
    #[serde(default)]
    pub http: Option<HttpDataset>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpDataset {
    /// Path and query template under `base_url`, e.g. `/api/v2/companies` or
    /// `/api/persons/{id_number}`: a `{field}` is filled (percent-encoded) from the call's
    /// `eq` condition on that field, which the call must then have.
    pub path: String,
    /// Where the rows are in the JSON answer: a dot path such as `data.items` (empty: the
    /// answer is the array; an object answer is one row).
    #[serde(default)]
    pub rows: String,
    /// Catalogue field → the query parameters that express conditions on it. A condition the
    /// service cannot express is refused, never dropped.
    #[serde(default)]
    pub filters: BTreeMap<String, HttpFilter>,
    #[serde(default)]
    pub paging: HttpPaging,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFilter {
    /// Parameter for `field == value`.
    #[serde(default)]
    pub eq: Option<String>,
    /// Parameter for `field in (values)`.
    #[serde(default, rename = "in")]
    pub in_: Option<String>,
    /// `repeat` (`?p=a&p=b`, default) or `comma` (`?p=a,b`).
    #[serde(default)]
    pub in_style: InStyle,
    /// Parameter for `field starts with text`.
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InStyle {
    #[default]
    Repeat,
    Comma,
}

/// How the service pages: `{ style: page, page_param: …, size_param: … }` and so on.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(tag = "style", rename_all = "lowercase", deny_unknown_fields)]
pub enum HttpPaging {
    /// One answer holds every row (the page size is not sent; the provider pages over it
    /// only up to `limits.max_page_size` rows: more is an error).
    #[default]
    None,
    /// `?page=N&size=M`, pages numbered from `first`.
    Page {
        page_param: String,
        size_param: String,
        #[serde(default = "one")]
        first: u64,
    },
    /// `?offset=N&limit=M`.
    Offset {
        offset_param: String,
        limit_param: String,
    },
    /// `?cursor=C&size=M`, the next cursor at the dot path `next` in the answer (absent,
    /// null or empty: the last page).
    Cursor {
        cursor_param: String,
        size_param: String,
        next: String,
    },
}

fn one() -> u64 {
    1
}

impl ProviderConfig {
    /// Read and check the file, paths made relative to its directory.
    pub fn load(path: &Path) -> Result<ProviderConfig, Vec<String>> {
        let text =
            std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let mut cfg: ProviderConfig =
            serde_yaml_ng::from_str(&text).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        cfg.validate()?;
        Ok(cfg)
    }

    /// Make every relative path (and `sqlite://` URL) relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        fix(&mut self.catalogue);
        if let Some(p) = &mut self.page_token_key_file {
            fix(p);
        }
        for s in self.sources.values_mut() {
            match s {
                Source::Sql(s) => {
                    if let Some(p) = &mut s.password_file {
                        fix(p);
                    }
                    if let Some(rest) = s.url.strip_prefix("sqlite://") {
                        let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
                        let p = Path::new(file);
                        if p.is_relative() && !file.is_empty() && file != ":memory:" {
                            let q = if query.is_empty() {
                                String::new()
                            } else {
                                format!("?{query}")
                            };
                            s.url = format!("sqlite://{}{q}", base.join(p).display());
                        }
                    }
                }
                Source::Http(h) => {
                    for p in [&mut h.bearer_token_file, &mut h.ca].into_iter().flatten() {
                        fix(p);
                    }
                }
            }
        }
    }

    /// What can be checked without the catalogue or the sources.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if self.gateway.identities.is_empty() {
            errs.push("gateway.identities: name the gateway's certificate SAN URI (e.g. spiffe://<trust-domain>/gateway); without one nobody could call".to_owned());
        }
        if self.limits.default_page_size == 0
            || self.limits.default_page_size > self.limits.max_page_size
        {
            errs.push(format!(
                "limits.default_page_size {} must be between 1 and max_page_size {}",
                self.limits.default_page_size, self.limits.max_page_size
            ));
        }
        if self.check_interval_secs == 0 {
            errs.push("check_interval_secs must be at least 1".into());
        }
        for (name, s) in &self.sources {
            match s {
                Source::Sql(s) => {
                    let engine = s.url.split("://").next().unwrap_or("");
                    if !matches!(engine, "postgres" | "postgresql" | "mysql" | "sqlite") {
                        errs.push(format!(
                            "sources.{name}.url: `{engine}://`: use postgres://, mysql:// or sqlite://"
                        ));
                    }
                    if s.max_connections == 0 || s.stream_connections == 0 {
                        errs.push(format!(
                            "sources.{name}: max_connections and stream_connections must be at least 1"
                        ));
                    }
                    if s.statement_timeout_ms == 0 || s.stream_timeout_ms == 0 {
                        errs.push(format!(
                            "sources.{name}: statement_timeout_ms and stream_timeout_ms must be at least 1"
                        ));
                    }
                }
                Source::Http(h) => {
                    if !(h.base_url.starts_with("http://") || h.base_url.starts_with("https://")) {
                        errs.push(format!(
                            "sources.{name}.base_url: `{}` is not an http:// or https:// URL",
                            h.base_url
                        ));
                    }
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in &self.datasets {
            if !seen.insert(d.id.as_str()) {
                errs.push(format!("datasets: `{}` is listed twice", d.id));
            }
            match self.sources.get(&d.source) {
                None => errs.push(format!(
                    "datasets.{}: source `{}` is not in sources",
                    d.id, d.source
                )),
                Some(Source::Sql(_)) => {
                    if d.table.is_none() {
                        errs.push(format!(
                            "datasets.{}: a SQL source needs `table` (a table or view)",
                            d.id
                        ));
                    }
                    if d.http.is_some() {
                        errs.push(format!(
                            "datasets.{}: `http` is for HTTP sources; `{}` is SQL",
                            d.id, d.source
                        ));
                    }
                }
                Some(Source::Http(_)) => {
                    if d.http.is_none() {
                        errs.push(format!(
                            "datasets.{}: an HTTP source needs `http` (path, rows, filters, paging)",
                            d.id
                        ));
                    }
                    if d.table.is_some() {
                        errs.push(format!(
                            "datasets.{}: `table` is for SQL sources; `{}` is HTTP",
                            d.id, d.source
                        ));
                    }
                }
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}
