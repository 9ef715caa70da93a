//! `call` and `token`: a department's client (mTLS + a dev token, or its own), for
//! `list`, `describe` and `query`, in a table or JSON.

use super::*;

#[derive(Args)]
pub(crate) struct TokenArgs {
    /// The `dept` claim: the department the token speaks for (must match the certificate).
    #[arg(long)]
    pub(crate) dept: String,
    /// The `sub` claim: the person or service account acting.
    #[arg(long)]
    pub(crate) sub: String,
    /// Comma-separated purposes the token allows (omit: any purpose the grant allows).
    #[arg(long, value_delimiter = ',')]
    pub(crate) purposes: Option<Vec<String>>,
    /// Lifetime: 90s, 15m, 1h, 2d.
    #[arg(long, default_value = "1h")]
    pub(crate) ttl: String,
    #[arg(long, default_value = "certs-dev/jwt-signing.key")]
    pub(crate) key: PathBuf,
    #[arg(long, default_value = devpki::KID)]
    pub(crate) kid: String,
    #[arg(long, default_value = devpki::ISSUER)]
    pub(crate) issuer: String,
    #[arg(long, default_value = devpki::AUDIENCE)]
    pub(crate) audience: String,
}

#[derive(Args)]
pub(crate) struct CallArgs {
    #[command(flatten)]
    pub(crate) conn: ConnArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) what: CallCmd,
}

/// Where the gateway is and who calls it (shared by `call` and `bench`).
#[derive(Args)]
pub(crate) struct ConnArgs {
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    pub(crate) gateway: String,
    /// Act as this dev department: its certificate from the dev PKI and a fresh dev token.
    #[arg(long = "as")]
    pub(crate) as_dept: Option<String>,
    /// The dev PKI that --as takes certificates from.
    #[arg(long, default_value = "certs-dev")]
    pub(crate) certs: PathBuf,
    /// Client certificate (PEM) of the calling system (instead of --as).
    #[arg(long)]
    pub(crate) cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    pub(crate) key: Option<PathBuf>,
    /// CA bundle (PEM) the gateway's certificate chains to (default: the dev CA).
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Bearer token (default with --as: a fresh dev token).
    #[arg(long, env = "XGATE_TOKEN")]
    pub(crate) token: Option<String>,
    /// Name to verify in the gateway's certificate.
    #[arg(long, default_value = "localhost")]
    pub(crate) server_name: String,
}

impl ConnArgs {
    pub(crate) fn identity(&self) -> Result<Identity, String> {
        let (cert, key, dev_token) = match &self.as_dept {
            Some(d) => {
                let (cert, key, tok) = client::dev_identity(&self.certs, d, None)?;
                (cert, key, Some(tok))
            }
            None => {
                let read = |p: &Option<PathBuf>, what: &str| -> Result<Vec<u8>, String> {
                    let p = p
                        .as_ref()
                        .ok_or_else(|| format!("--{what} is required without --as"))?;
                    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
                };
                (read(&self.cert, "cert")?, read(&self.key, "key")?, None)
            }
        };
        let ca_path = self.ca.clone().unwrap_or_else(|| self.certs.join("ca.pem"));
        let ca = std::fs::read(&ca_path).map_err(|e| format!("{}: {e}", ca_path.display()))?;
        Ok(Identity {
            cert,
            key,
            ca,
            token: self.token.clone().or(dev_token),
        })
    }

    pub(crate) async fn connect(&self, id: &Identity) -> Result<tonic::transport::Channel, String> {
        client::connect(&self.gateway, &id.ca, &id.cert, &id.key, &self.server_name)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.gateway))
    }
}

#[derive(Subcommand)]
pub(crate) enum CallCmd {
    /// List the catalogue.
    List,
    /// Describe a dataset and your access to it.
    Describe {
        dataset: String,
        /// The purpose to describe access for (omit: the first the grants allow).
        #[arg(long, default_value = "", hide_default_value = true)]
        purpose: String,
    },
    /// Query one page.
    Query(QueryArgs),
    /// Stream every matching row in batches.
    Stream(QueryArgs),
}

#[derive(Args)]
pub(crate) struct QueryArgs {
    pub(crate) dataset: String,
    /// The declared purpose of the call (required by the gateway).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub(crate) purpose: String,
    /// Comma-separated fields (default: all you may read).
    #[arg(long, value_delimiter = ',')]
    pub(crate) fields: Vec<String>,
    /// Condition: field=value, field^=prefix or field:in=a,b,c (repeatable, AND-ed).
    #[arg(long = "where")]
    pub(crate) conditions: Vec<String>,
    /// Rows per page (0: the gateway's default).
    #[arg(long, default_value_t = 0)]
    pub(crate) page_size: u32,
    /// The page to continue from (the token a previous page returned).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub(crate) page_token: String,
}

pub(crate) fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("--ttl `{s}`: use e.g. 90s, 15m, 1h, 2d"))
}

pub(crate) fn token(t: TokenArgs) -> Result<(), String> {
    let ttl = parse_ttl(&t.ttl)?;
    let key = std::fs::read_to_string(&t.key).map_err(|e| format!("{}: {e}", t.key.display()))?;
    let mut claims = devpki::dev_claims(&t.dept, &t.sub, t.purposes.as_deref(), ttl);
    claims["iss"] = t.issuer.into();
    claims["aud"] = t.audience.into();
    let tok = devpki::mint_token(&key, &t.kid, &claims).map_err(|e| e.to_string())?;
    xgate::outln!("{tok}");
    Ok(())
}

pub(crate) async fn call(c: CallArgs) -> Result<(), String> {
    let id = c.conn.identity()?;
    let token = id
        .token
        .clone()
        .ok_or("a token is required: --token, XGATE_TOKEN, or --as DEPT for a dev token")?;
    let channel = c.conn.connect(&id).await?;
    let json = c.json;
    // With --json, a refusal is JSON on stdout too (code, reason, rule, trace id), so a
    // script reads failures the way it reads answers.
    let fail = |s: tonic::Status| {
        if json {
            xgate::outln!("{}", client::status_json(&s));
        }
        client::explain(&s)
    };
    match c.what {
        CallCmd::List => {
            let mut cat = pb::catalog_client::CatalogClient::new(channel);
            let r = cat
                .list_datasets(client::with_token(pb::ListDatasetsRequest {}, &token))
                .await
                .map_err(fail)?
                .into_inner();
            if c.json {
                xgate::outln!("{}", json_datasets(&r.datasets));
            } else {
                for d in &r.datasets {
                    let share = pb::ShareType::try_from(d.share_type)
                        .map(|s| shown(s.as_str_name(), "SHARE_TYPE_"))
                        .unwrap_or("?".into());
                    xgate::outln!(
                        "{:<28} {:<20} {:<26} {}",
                        d.id,
                        d.owner_department,
                        share,
                        d.title
                    );
                }
                xgate::outln!(
                    "({} datasets; policy {})",
                    r.datasets.len(),
                    r.policy_version
                );
            }
        }
        CallCmd::Describe { dataset, purpose } => {
            let mut cat = pb::catalog_client::CatalogClient::new(channel);
            let r = cat
                .describe_dataset(client::with_token(
                    pb::DescribeDatasetRequest { dataset, purpose },
                    &token,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            let a = r.access.unwrap_or_default();
            if c.json {
                xgate::outln!(
                    "{}",
                    serde_json::json!({
                        "dataset": r.dataset.as_ref().map(|d| d.id.clone()),
                        "allowed": a.allowed, "readable_fields": a.readable_fields,
                        "masked_fields": a.masked_fields.iter().map(|m| serde_json::json!({"field": m.field, "mask": m.mask})).collect::<Vec<_>>(),
                        "allowed_purposes": a.allowed_purposes, "deciding_rule": a.deciding_rule,
                        "evaluated_purpose": a.evaluated_purpose, "row_scope": a.row_scope,
                        "denial_reason": a.denial_reason, "denial_message": a.denial_message,
                        "rate_limit": a.rate_limit.map(|r| serde_json::json!({"per_second": r.per_second, "burst": r.burst})),
                    })
                );
            } else {
                if let Some(d) = &r.dataset {
                    xgate::outln!(
                        "{} — {} (owner {}, subject key {})",
                        d.id,
                        d.title,
                        d.owner_department,
                        d.subject_key
                    );
                    for f in &d.fields {
                        let t = pb::FieldType::try_from(f.r#type)
                            .map(|t| shown(t.as_str_name(), "FIELD_TYPE_"))
                            .unwrap_or("?".into());
                        let s = pb::Sensitivity::try_from(f.sensitivity)
                            .map(|t| shown(t.as_str_name(), "SENSITIVITY_"))
                            .unwrap_or("?".into());
                        xgate::outln!("  {:<22} {:<22} {}", f.name, t, s);
                    }
                }
                if a.allowed {
                    xgate::outln!(
                        "your access for purpose `{}`: ALLOWED under {}",
                        a.evaluated_purpose,
                        a.deciding_rule
                    );
                    xgate::outln!("  readable: {}", a.readable_fields.join(", "));
                    for m in &a.masked_fields {
                        xgate::outln!("  masked:   {} ({})", m.field, m.mask);
                    }
                    xgate::outln!(
                        "  purposes: {}",
                        if a.allowed_purposes.is_empty() {
                            "any (no grant needed)".into()
                        } else {
                            a.allowed_purposes.join(", ")
                        }
                    );
                    xgate::outln!("  rows:     {}", a.row_scope);
                    if let Some(rl) = a.rate_limit {
                        xgate::outln!("  rate:     {}/s, burst {}", rl.per_second, rl.burst);
                    }
                } else {
                    xgate::outln!(
                        "your access for purpose `{}`: DENIED {} — {} [rule {}]",
                        a.evaluated_purpose,
                        a.denial_reason,
                        a.denial_message,
                        a.deciding_rule
                    );
                }
            }
        }
        CallCmd::Query(q) => {
            let types = field_types(&channel, &token, &q).await?;
            let req = client::query_request(
                &q.dataset,
                &q.fields,
                &q.conditions,
                &q.purpose,
                q.page_size,
                &q.page_token,
                &types,
            )?;
            let mut dx = pb::data_exchange_client::DataExchangeClient::new(channel);
            let r = dx
                .query(client::with_token(req, &token))
                .await
                .map_err(fail)?;
            let trace = r
                .metadata()
                .get(xgate::TRACE_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let r = r.into_inner();
            if c.json {
                xgate::outln!("{}", json_response(&r));
            } else {
                client::print_table(&r);
                xgate::outln!(
                    "({} rows; masked: {}; next page: {}; trace {trace})",
                    r.rows.len(),
                    if r.masked_columns.is_empty() {
                        "none".into()
                    } else {
                        r.masked_columns.join(", ")
                    },
                    if r.next_page_token.is_empty() {
                        "none"
                    } else {
                        &r.next_page_token
                    }
                );
            }
        }
        CallCmd::Stream(q) => {
            let types = field_types(&channel, &token, &q).await?;
            let req = client::query_request(
                &q.dataset,
                &q.fields,
                &q.conditions,
                &q.purpose,
                q.page_size,
                "",
                &types,
            )?;
            let mut dx = pb::data_exchange_client::DataExchangeClient::new(channel);
            let resp = dx
                .query_stream(client::with_token(req, &token))
                .await
                .map_err(fail)?;
            let trace = resp
                .metadata()
                .get(xgate::TRACE_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let mut s = resp.into_inner();
            let (mut batches, mut rows) = (0u64, 0u64);
            while let Some(b) = s.message().await.map_err(fail)? {
                batches += 1;
                rows += b.rows.len() as u64;
                if c.json {
                    xgate::outln!("{}", json_response(&b));
                } else {
                    client::print_table(&b);
                }
            }
            if c.json {
                xgate::outln!("{}", serde_json::json!({"batches": batches, "rows": rows}));
            } else {
                xgate::outln!(
                    "({batches} batches, {rows} rows{})",
                    if trace.is_empty() {
                        String::new()
                    } else {
                        format!("; trace {trace}")
                    }
                );
            }
        }
    }
    Ok(())
}

/// The catalogue's field types, to type `--where` literals (only fetched when there are any).
pub(crate) async fn field_types(
    channel: &tonic::transport::Channel,
    token: &str,
    q: &QueryArgs,
) -> Result<std::collections::HashMap<String, pb::FieldType>, String> {
    if q.conditions.is_empty() {
        return Ok(Default::default());
    }
    let mut cat = pb::catalog_client::CatalogClient::new(channel.clone());
    let d = cat
        .describe_dataset(client::with_token(
            pb::DescribeDatasetRequest {
                dataset: q.dataset.clone(),
                purpose: q.purpose.clone(),
            },
            token,
        ))
        .await
        .map_err(|s| client::explain(&s))?
        .into_inner();
    Ok(d.dataset
        .map(|d| {
            d.fields
                .into_iter()
                .filter_map(|f| pb::FieldType::try_from(f.r#type).ok().map(|t| (f.name, t)))
                .collect()
        })
        .unwrap_or_default())
}

pub(crate) fn json_value(v: &pb::Value) -> serde_json::Value {
    use pb::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::Int64Value(i)) => (*i).into(),
        Some(Kind::DoubleValue(d)) => (*d).into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(_) => client::render(v).into(),
    }
}

pub(crate) fn json_response(r: &pb::QueryResponse) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = r
        .rows
        .iter()
        .map(|row| {
            let obj: serde_json::Map<String, serde_json::Value> = r
                .columns
                .iter()
                .zip(&row.values)
                .map(|(c, v)| (c.name.clone(), json_value(v)))
                .collect();
            serde_json::Value::Object(obj)
        })
        .collect();
    serde_json::json!({"rows": rows, "masked_columns": r.masked_columns, "next_page_token": r.next_page_token})
}

pub(crate) fn json_datasets(ds: &[pb::Dataset]) -> serde_json::Value {
    ds.iter()
        .map(|d| {
            serde_json::json!({
                "id": d.id, "title": d.title, "owner": d.owner_department,
                "share_type": pb::ShareType::try_from(d.share_type).map(|s| s.as_str_name()).unwrap_or("?"),
                "fields": d.fields.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect()
}
