//! Test harness: a real gateway (real TLS, real sockets on 127.0.0.1:0) in front of real
//! sample providers, with the checked-in dev PKI.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod console;
pub mod db;
pub mod delay;
pub mod netns;
pub mod raw_h2;
pub mod trail;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::Duration,
};

use tokio::sync::watch;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;
use xgate::{
    config::Config,
    dev::{
        client, pki as devpki,
        provider::{self, Behaviour, SampleProvider},
    },
    pb::{self, catalog_client::CatalogClient, data_exchange_client::DataExchangeClient},
    serve::{self, Running},
};

pub fn certs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev")
}

pub fn dev_policy() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/dev/policy.yaml"))
        .unwrap()
}

/// The demo's sample providers on `127.0.0.1:0`, until `stop` changes: their ports and
/// handles by provider id.
pub async fn start_providers(
    behaviour: &Behaviour,
    stop: watch::Receiver<bool>,
) -> (
    HashMap<&'static str, u16>,
    HashMap<&'static str, SampleProvider>,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut ports = HashMap::new();
    let mut provs = HashMap::new();
    for (id, tables) in provider::demo_providers() {
        let sp = SampleProvider::new(id, tables, behaviour.clone());
        let mut rx = stop.clone();
        let (addr, _h) = provider::spawn_dev(
            sp.clone(),
            id,
            "127.0.0.1:0".parse().unwrap(),
            &certs(),
            async move {
                let _ = rx.changed().await;
            },
        )
        .await
        .unwrap();
        ports.insert(id, addr.port());
        provs.insert(id, sp);
    }
    (ports, provs)
}

/// The dev policy with its providers on these ports.
pub fn policy_with_ports(public_security: u16, market_supervision: u16) -> String {
    dev_policy()
        .replace(
            "https://127.0.0.1:8444",
            &format!("https://127.0.0.1:{public_security}"),
        )
        .replace(
            "https://127.0.0.1:8445",
            &format!("https://127.0.0.1:{market_supervision}"),
        )
}

/// A change to the gateway config before start.
pub type ConfigHook = std::sync::Arc<dyn Fn(&mut Config) + Send + Sync>;

/// Options for one harness.
#[derive(Clone, Default)]
pub struct Opts {
    pub behaviour: Behaviour,
    /// Extra YAML appended to the policy's `grants:` list (indented as list items).
    pub extra_grants: String,
    /// Point the public-security provider at a port nobody listens on.
    pub provider_down: bool,
    /// public-security's address accepts no connection and refuses none: a listener whose
    /// backlog is full, so the kernel drops the gateway's SYNs (a host that does not answer).
    pub provider_silent: bool,
    pub drain_ms: Option<u64>,
    pub max_timeout_ms: Option<u64>,
    /// Turn on the probe port and the console (each on 127.0.0.1:0).
    pub admin: bool,
    /// Rewrite the final policy text before it is written.
    pub edit_policy: Option<fn(String) -> String>,
    /// Adjust the gateway config before start.
    pub config: Option<ConfigHook>,
}

pub struct Harness {
    pub addr: SocketAddr,
    /// Where the gateway keeps its audit trail.
    pub audit_path: PathBuf,
    pub admin: Option<SocketAddr>,
    /// The console (HTTPS), with `Opts::admin`.
    pub console: Option<SocketAddr>,
    pub policy_path: PathBuf,
    pub reloader: std::sync::Arc<xgate::serve::reload::Reloader>,
    pub audit_dir: tempfile::TempDir,
    pub ps: SampleProvider,
    pub ms: SampleProvider,
    pub gateway: Option<Running>,
    stop_providers: watch::Sender<bool>,
    _silent: Option<(tokio::net::TcpListener, std::net::TcpStream)>,
}

impl Harness {
    pub async fn start(opts: Opts) -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ports, mut provs) = start_providers(&opts.behaviour, stop_rx).await;
        let mut ps_port = ports["public-security"];
        if opts.provider_down {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            ps_port = l.local_addr().unwrap().port();
            drop(l);
        }
        let mut silent = None;
        if opts.provider_silent {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let l = s.listen(0).unwrap();
            ps_port = l.local_addr().unwrap().port();
            // The one connection a backlog of 0 admits; every SYN after it is dropped.
            let filler = std::net::TcpStream::connect(("127.0.0.1", ps_port)).unwrap();
            silent = Some((l, filler));
        }
        let mut policy = policy_with_ports(ps_port, ports["market-supervision"]);
        if !opts.extra_grants.is_empty() {
            policy = policy.replace(
                "\ngrants:\n",
                &format!("\ngrants:\n{}\n", opts.extra_grants),
            );
        }
        if let Some(edit) = opts.edit_policy {
            policy = edit(policy);
        }
        let audit_dir = tempfile::tempdir().unwrap();
        let policy_path = audit_dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).unwrap();
        let mut cfg = Config::demo(
            &certs(),
            policy_path.clone(),
            "127.0.0.1:0".parse().unwrap(),
            audit_dir.path().join("audit"),
        );
        if opts.admin {
            cfg.admin_listen = Some("127.0.0.1:0".parse().unwrap());
            cfg.console = Some(xgate::config::Console::demo("127.0.0.1:0".parse().unwrap()));
        }
        if let Some(f) = &opts.config {
            f(&mut cfg);
        }
        if let Some(d) = opts.drain_ms {
            cfg.shutdown.drain_timeout_ms = d;
        }
        if let Some(t) = opts.max_timeout_ms {
            cfg.upstream.max_timeout_ms = t;
        }
        let running = serve::start(&cfg).await.unwrap();
        Harness {
            audit_path: cfg.audit.dir.clone(),
            addr: running.addr,
            admin: running.admin_addr,
            console: running.console_addr,
            policy_path,
            reloader: running.reloader.clone(),
            audit_dir,
            ps: provs.remove("public-security").unwrap(),
            ms: provs.remove("market-supervision").unwrap(),
            gateway: Some(running),
            stop_providers: stop_tx,
            _silent: silent,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A console client signed in (on its first request) with a dev officer's certificate
    /// (`officer-bureau`, …), or none. Needs `Opts::admin`.
    pub fn officer(&self, stem: Option<&str>) -> console::Officer {
        console::Officer::new(
            self.console.expect("Opts::admin turns the console on"),
            stem,
        )
    }

    /// Channel authenticated with `dept`'s dev certificate.
    pub async fn channel(&self, dept: &str) -> Channel {
        dept_channel(&self.url(), dept).await
    }

    pub async fn data(&self, dept: &str) -> DataExchangeClient<Channel> {
        DataExchangeClient::new(self.channel(dept).await)
    }

    pub async fn catalog(&self, dept: &str) -> CatalogClient<Channel> {
        CatalogClient::new(self.channel(dept).await)
    }

    pub fn provider_calls(&self) -> u64 {
        self.ps.stats.calls.load(Ordering::SeqCst) + self.ms.stats.calls.load(Ordering::SeqCst)
    }

    /// Stop the gateway (graceful), returning the records of calls (not the admin records
    /// of reloads, nor a long stream's chunks of returned subjects: [`Harness::stop_all`]).
    pub async fn stop(&mut self) -> Vec<serde_json::Value> {
        self.stop_all()
            .await
            .into_iter()
            .filter(|r| r.get("kind").is_none())
            .collect()
    }

    /// Stop the gateway (graceful), returning every audit record.
    pub async fn stop_all(&mut self) -> Vec<serde_json::Value> {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await.unwrap();
        }
        let _ = self.stop_providers.send(true);
        xgate::audit::read_all(&self.audit_path).unwrap()
    }

    pub fn take_gateway(&mut self) -> Running {
        self.gateway.take().unwrap()
    }
}

/// A dev token for `dept`.
pub fn token(dept: &str) -> String {
    token_with(devpki::dev_claims(
        dept,
        &format!("tester@{dept}"),
        None,
        600,
    ))
}

pub fn token_with(claims: serde_json::Value) -> String {
    let key = std::fs::read_to_string(certs().join("jwt-signing.key")).unwrap();
    devpki::mint_token(&key, devpki::KID, &claims).unwrap()
}

/// The `x-xgate-trace-id` an answered call carries.
pub fn trace_id(md: &tonic::metadata::MetadataMap) -> String {
    md.get(xgate::TRACE_ID_HEADER)
        .expect("every answer carries its trace id")
        .to_str()
        .unwrap()
        .to_owned()
}

pub fn req<T>(body: T, token: &str) -> tonic::Request<T> {
    client::with_token(body, token)
}

pub fn query(dataset: &str, purpose: &str, conds: &[&str], page_size: u32) -> pb::QueryRequest {
    let conds: Vec<String> = conds.iter().map(|s| s.to_string()).collect();
    client::query_request(
        dataset,
        &[],
        &conds,
        purpose,
        page_size,
        "",
        &HashMap::new(),
    )
    .unwrap()
}

/// Assert a status's code and `ErrorInfo.reason`.
pub fn assert_reject(st: &Status, code: Code, reason: &str) {
    assert_eq!(st.code(), code, "unexpected code: {st:?}");
    let d = st.get_error_details();
    let info = d
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {st:?}"));
    assert_eq!(info.reason, reason, "unexpected reason: {st:?}");
    assert_eq!(info.domain, "xgate.gov");
    assert!(!st.message().is_empty());
}

pub fn text(v: &pb::Value) -> String {
    v.as_text().map(|c| c.into_owned()).unwrap_or_default()
}

pub const SLOW: Duration = Duration::from_millis(400);

/// A minimal HTTP/1.1 request to the admin endpoint: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Write a policy file the way an editor does: to a temporary name, then rename over it.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A channel with an arbitrary client certificate.
pub async fn channel_with(h: &Harness, cert_pem: &str, key_pem: &str) -> Result<Channel, String> {
    channel_at(&h.url(), cert_pem, key_pem).await
}

/// A channel to the gateway at `url` with this client certificate.
pub async fn channel_at(url: &str, cert_pem: &str, key_pem: &str) -> Result<Channel, String> {
    let ca = std::fs::read(certs().join("ca.pem")).unwrap();
    client::connect(
        url,
        &ca,
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
        "localhost",
    )
    .await
    .map_err(|e| e.to_string())
}

/// Read a dev certificate's DER.
pub fn cert_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

pub use xgate::dev::client::RawCodec;

/// Send raw bytes as one unary gRPC request to `path`.
pub async fn raw_unary(
    ch: Channel,
    path: &'static str,
    body: Vec<u8>,
    token: &str,
) -> Result<Vec<u8>, Status> {
    let mut g = tonic::client::Grpc::new(ch);
    g.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let r = req(body, token);
    g.unary(r, http::uri::PathAndQuery::from_static(path), RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a catalogue call with this client certificate (or none) gets through: `false` when
/// the connection or the call is refused.
pub async fn call_goes_through(h: &Harness, cert: Option<(&str, &str)>) -> bool {
    call_goes_through_at(&h.url(), cert).await
}

/// [`call_goes_through`] for the gateway at `url`.
pub async fn call_goes_through_at(url: &str, cert: Option<(&str, &str)>) -> bool {
    let ch = match cert {
        Some((c, k)) => channel_at(url, c, k).await.ok(),
        None => {
            let ca = std::fs::read(certs().join("ca.pem")).unwrap();
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost");
            match tonic::transport::Endpoint::from_shared(url.to_owned())
                .unwrap()
                .tls_config(tls)
            {
                Ok(e) => e.connect().await.ok(),
                Err(_) => None,
            }
        }
    };
    match ch {
        None => false,
        Some(ch) => CatalogClient::new(ch)
            .list_datasets(req(pb::ListDatasetsRequest {}, &token("civil-affairs")))
            .await
            .is_ok(),
    }
}

/// A channel to the gateway at `url` with `dept`'s dev certificate.
pub async fn dept_channel(url: &str, dept: &str) -> Channel {
    let c = certs();
    let cert = std::fs::read_to_string(c.join(format!("{dept}.pem"))).unwrap();
    let key = std::fs::read_to_string(c.join(format!("{dept}.key"))).unwrap();
    channel_at(url, &cert, &key).await.unwrap()
}

/// A `xgate serve` config on the dev PKI: listening on `port`, the policy in `policy.yaml` next
/// to the config file, the audit trail in `audit_dir`; `extra` (YAML) is appended.
pub fn serve_yaml(port: u16, audit_dir: &str, extra: &str) -> String {
    format!(
        r#"
listen: 127.0.0.1:{port}
watch_policy: false
trust_domain: zj.gov.example
tls: {{ cert: {c}/gateway.pem, key: {c}/gateway.key, client_ca: {c}/ca.pem }}
jwt: {{ jwks: {c}/jwks.json, issuer: "https://idp.zj.gov.example", audience: xgate }}
policy: policy.yaml
pseudonym_key_file: {c}/pseudonym.key
audit: {{ dir: {audit_dir}, signing_key_file: {c}/audit-signing.key, subject_key_file: {c}/audit-subject.key }}
upstream: {{ ca: {c}/ca.pem, cert: {c}/gateway-client.pem, key: {c}/gateway-client.key }}
{extra}
"#,
        c = certs().display()
    )
}

/// `xgate serve` (the real binary) as a child process, its stderr lines collected; killed on
/// drop unless it already exited.
pub struct Served {
    pub child: std::process::Child,
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Served {
    /// Start `xgate serve --config <config>` with extra environment variables.
    pub fn spawn(config: &Path, env: &[(&str, &str)]) -> Served {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_xgate"))
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                l.lock().unwrap().push(line);
            }
        });
        Served { child, logs }
    }

    /// Wait (at most 30 s) until a log line contains `what`; panics with the logs otherwise.
    pub fn wait_for(&self, what: &str) {
        let t0 = std::time::Instant::now();
        while !self.logs().iter().any(|l| l.contains(what)) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no `{what}` in the logs:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send the same Query through each of `clients` at once (one call each) and count the
/// outcomes: (OK, refused `UNAVAILABLE PROVIDER_SATURATED` with a `RetryInfo`). Any other
/// refusal fails the test.
pub async fn saturate(
    clients: Vec<DataExchangeClient<Channel>>,
    token: &str,
    dataset: &str,
    purpose: &str,
) -> (usize, usize) {
    let calls: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let r = req(query(dataset, purpose, &[], 1), token);
            tokio::spawn(async move { c.query(r).await })
        })
        .collect();
    let (mut ok, mut saturated) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(st) => {
                assert_reject(&st, Code::Unavailable, "PROVIDER_SATURATED");
                assert!(
                    st.get_error_details().retry_info().is_some(),
                    "says when to retry"
                );
                saturated += 1;
            }
        }
    }
    (ok, saturated)
}
