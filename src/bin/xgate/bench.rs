//! `bench`: the gRPC load generator ([`xgate::tools::loadgen`]) against a gateway, closed
//! or open loop, with CPU and memory of the processes watched.

use super::*;

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) conn: ConnArgs,
    /// Send no `authorization` header (e.g. to measure the refusal path).
    #[arg(long)]
    pub(crate) no_token: bool,
    /// Send a different forged token on every call, from a pool of this many (signed by a
    /// key the identity provider never published): measures a flood of distinct bad tokens.
    #[arg(long, default_value_t = 0)]
    pub(crate) forged_tokens: usize,
    /// query | stream | list | describe | raw
    #[arg(long, default_value = "query")]
    pub(crate) method: String,
    #[arg(long, default_value = "hukou.person_basic")]
    pub(crate) dataset: String,
    #[arg(long, default_value = "subsidy-eligibility")]
    pub(crate) purpose: String,
    /// Comma-separated fields (default: all you may read).
    #[arg(long, value_delimiter = ',')]
    pub(crate) fields: Vec<String>,
    /// Condition: field=value, field^=prefix or field:in=a,b,c (repeatable, AND-ed).
    #[arg(long = "where")]
    pub(crate) conditions: Vec<String>,
    #[arg(long, default_value_t = 5)]
    pub(crate) page_size: u32,
    /// With `--method raw`: the method path, e.g. /pkg.Service/Method.
    #[arg(long)]
    pub(crate) raw_path: Option<String>,
    /// With `--method raw`: the request message, hex-encoded protobuf.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub(crate) raw_body_hex: String,
    /// Closed loop: this many calls in flight (the default, 32).
    #[arg(long, conflicts_with = "rate")]
    pub(crate) concurrency: Option<usize>,
    /// Open loop: this many calls per second, latency from each call's scheduled time.
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    /// Seconds of calls before measuring (not counted).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) warmup: f64,
    /// Each call's deadline in milliseconds (sent as `grpc-timeout`; a call unanswered past
    /// it counts as `DEADLINE_EXCEEDED`). Default: none.
    #[arg(long)]
    pub(crate) timeout_ms: Option<u64>,
    /// HTTP/2 connections to spread the calls over.
    #[arg(long, default_value_t = 8)]
    pub(crate) connections: usize,
    /// Report the CPU time and peak RSS of this process over the run (repeatable).
    #[arg(long = "pid")]
    pub(crate) pids: Vec<u32>,
    /// Runtime threads of the load generator (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn bench(b: BenchArgs) -> Result<(), String> {
    use xgate::tools::loadgen::{Call, Load, Plan};
    let id = b.conn.identity()?;
    let query = || {
        client::query_request(
            &b.dataset,
            &b.fields,
            &b.conditions,
            &b.purpose,
            b.page_size,
            "",
            &Default::default(),
        )
    };
    let call = match b.method.as_str() {
        "query" => Call::Query(query()?),
        "stream" => Call::QueryStream(query()?),
        "list" => Call::List,
        "describe" => Call::Describe(pb::DescribeDatasetRequest {
            dataset: b.dataset.clone(),
            purpose: b.purpose.clone(),
        }),
        "raw" => Call::Raw {
            path: b
                .raw_path
                .clone()
                .ok_or("--method raw needs --raw-path /pkg.Service/Method")?,
            body: hex::decode(&b.raw_body_hex).map_err(|e| format!("--raw-body-hex: {e}"))?,
        },
        other => {
            return Err(format!(
                "--method `{other}`: use query, stream, list, describe or raw"
            ));
        }
    };
    let tokens = if b.no_token {
        Vec::new()
    } else if b.forged_tokens > 0 {
        // A different forged token per call (a key the identity provider never published,
        // under its kid): what a flood of distinct bad tokens costs the gateway.
        let dept = b
            .conn
            .as_dept
            .clone()
            .unwrap_or_else(|| "civil-affairs".into());
        let (key, _) = devpki::jwt_keypair(devpki::KID).map_err(|e| e.to_string())?;
        (0..b.forged_tokens)
            .map(|i| {
                devpki::mint_token(
                    &key,
                    devpki::KID,
                    &devpki::dev_claims(&dept, &format!("forger-{i}"), None, 3600),
                )
                .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![id.token.clone().ok_or(
            "a token is required: --token, XGATE_TOKEN, --as DEPT for a dev token, or --no-token",
        )?]
    };
    if !(b.duration > 0.0 && b.duration.is_finite() && b.warmup >= 0.0 && b.warmup.is_finite()) {
        return Err("--duration must be positive and --warmup not negative".into());
    }
    let mut channels = Vec::new();
    for _ in 0..b.connections.max(1) {
        channels.push(b.conn.connect(&id).await?);
    }
    let plan = Plan {
        call,
        load: match b.rate {
            Some(r) => Load::Open(r),
            None => Load::Closed(b.concurrency.unwrap_or(32)),
        },
        duration: std::time::Duration::from_secs_f64(b.duration),
        warmup: std::time::Duration::from_secs_f64(b.warmup),
        tokens,
        watch: b.pids.clone(),
        timeout: b.timeout_ms.map(std::time::Duration::from_millis),
    };
    let report = xgate::tools::loadgen::run(channels, plan).await?;
    if b.json {
        xgate::outln!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        xgate::out!("{}", report.render());
    }
    Ok(())
}
