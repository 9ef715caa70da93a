//! The policy file as the data bureau writes it (YAML), before validation.
//!
//! Unknown keys are errors (`deny_unknown_fields`): a typo in a security policy must never be
//! silently ignored. See `deploy/dev/policy.yaml` for a commented example.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole policy file.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Settings that apply where a grant says nothing.
    #[serde(default)]
    pub defaults: Defaults,
    pub departments: Vec<Department>,
    #[serde(default)]
    pub providers: Vec<Provider>,
    pub datasets: Vec<Dataset>,
    #[serde(default)]
    pub grants: Vec<Grant>,
    #[serde(default)]
    pub negative_list: Vec<NegativeEntry>,
    /// "Who looked at my data": who may ask (`Usage.FindUsage`) and what is not disclosed.
    #[serde(default)]
    pub usage: Usage,
}

/// `usage`: the citizen portal's view of the trail (docs/policy.md#usage).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// The systems that may call `Usage.FindUsage` (the province's citizen portal).
    #[serde(default)]
    pub portals: Vec<Portal>,
    /// Accesses withheld from the data subject until a date, or until the rule is released
    /// (an investigation that must not be tipped off). Still in the trail, for auditors.
    #[serde(default)]
    pub withhold: Vec<Disclosure>,
    /// Accesses never disclosed to the data subject, by law.
    #[serde(default)]
    pub never_disclose: Vec<Disclosure>,
}

/// A registered system allowed to ask on a data subject's behalf.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Portal {
    pub consumer: String,
    /// The consumer's system (absent: any of its systems).
    #[serde(default)]
    pub system: Option<String>,
}

/// Which accesses a disclosure rule covers: every one given must match (at least one given).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Disclosure {
    #[serde(default)]
    pub consumer: Option<String>,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub dataset: Option<String>,
    /// `withhold`: disclosed from this time (RFC 3339, or a date at 00:00 UTC+8); absent:
    /// until `released`.
    #[serde(default)]
    pub until: Option<String>,
    /// `withhold`: the bureau released it (disclosed from now on).
    #[serde(default)]
    pub released: bool,
    /// Why: the case, the law and article (shown to auditors, never to the subject).
    pub reference: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Rate limit for access without a grant (unconditional datasets).
    #[serde(default = "default_rate")]
    pub rate_limit: RateLimit,
    /// Each consumer department's overall rate, across all datasets (absent: no such cap).
    #[serde(default)]
    pub per_consumer: Option<RateLimit>,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            rate_limit: default_rate(),
            per_consumer: None,
        }
    }
}

fn default_rate() -> RateLimit {
    RateLimit {
        per_second: 10.0,
        burst: 20,
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Province,
    City,
    County,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Department {
    pub id: String,
    pub name: String,
    pub level: Level,
    /// 6-digit administrative division code, e.g. `330106`.
    pub region: String,
    /// Every call from this department needs a certificate-bound token.
    #[serde(default)]
    pub require_bound_tokens: bool,
}

/// A department backend serving one or more datasets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub id: String,
    /// `https://host:port` of the provider's `xgate.v1.DataExchange` service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Several replicas of it instead (`https://host:port` each): calls are balanced over
    /// them, a failing one is ejected for a while, and a refused call is retried once on
    /// another (docs/policy.md#providers). Exactly one of `endpoint` and `endpoints`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Its replicas found by DNS instead: every address `dns.name` resolves to, on
    /// `dns.port`, re-resolved every `dns.every_secs` (a Kubernetes headless Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsEndpoints>,
    /// Name to verify in the provider's certificate; defaults to the endpoint's host (with
    /// `dns`, the DNS name).
    #[serde(default)]
    pub tls_name: Option<String>,
    /// Provider protection: the most calls per second the gateway sends it, whoever calls.
    #[serde(default)]
    pub max_rate: Option<RateLimit>,
    /// Provider protection: the most calls in flight to it at once.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

/// `providers[].dns`: a provider's replicas are the addresses of one DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsEndpoints {
    /// e.g. `provider.public-security.svc.cluster.local` (a headless Service: one address
    /// per ready pod).
    pub name: String,
    pub port: u16,
    /// Seconds between resolutions; a changed answer adds and drains replicas.
    #[serde(default = "default_dns_every")]
    pub every_secs: u64,
}

fn default_dns_every() -> u64 {
    5
}

impl DnsEndpoints {
    /// The endpoint URL of one resolved address.
    pub fn endpoint(&self, ip: std::net::IpAddr) -> String {
        format!("https://{}", std::net::SocketAddr::new(ip, self.port))
    }
}

impl Provider {
    /// Every endpoint, in the order given, with the path each is written at.
    pub fn endpoint_list(&self) -> Vec<(String, &str)> {
        match &self.endpoint {
            Some(e) => vec![("endpoint".to_owned(), e.as_str())],
            None => self
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| (format!("endpoints[{i}]"), e.as_str()))
                .collect(),
        }
    }

    /// The first endpoint (one-endpoint tools: the demo, the CLI's hints); empty with `dns`.
    pub fn first_endpoint(&self) -> &str {
        self.endpoint
            .as_deref()
            .or(self.endpoints.first().map(String::as_str))
            .unwrap_or("")
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShareType {
    Unconditional,
    Conditional,
    None,
}

impl ShareType {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ShareType::Unconditional => "unconditional",
            ShareType::Conditional => "conditional",
            ShareType::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Int64,
    Double,
    Bool,
    Bytes,
    Timestamp,
}

impl FieldType {
    /// The interface's name for it.
    pub fn to_pb(self) -> crate::pb::FieldType {
        use crate::pb::FieldType as P;
        match self {
            FieldType::String => P::String,
            FieldType::Int64 => P::Int64,
            FieldType::Double => P::Double,
            FieldType::Bool => P::Bool,
            FieldType::Bytes => P::Bytes,
            FieldType::Timestamp => P::Timestamp,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Sensitivity {
    Public,
    Internal,
    Personal,
    Sensitive,
}

/// How a field's value is hidden from a consumer that may know it exists.
///
/// In YAML: `none`, `redact`, or `{ keep: { first: 6, last: 4 } }`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "MaskRepr", into = "MaskRepr")]
pub enum Mask {
    /// Returned in clear.
    None,
    /// Keep the first and last characters, replace the rest with `*`.
    Keep { first: u16, last: u16 },
    /// A keyed-hash pseudonym (HMAC-SHA256 with the bureau's key): stable across calls and
    /// consumers, not reversible without the key.
    Hash,
    /// Replaced by null.
    Redact,
}

/// The YAML spelling of a mask.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
enum MaskRepr {
    Word(String),
    Keep { keep: KeepRepr },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct KeepRepr {
    #[serde(default)]
    first: u16,
    #[serde(default)]
    last: u16,
}

impl TryFrom<MaskRepr> for Mask {
    type Error = String;

    fn try_from(r: MaskRepr) -> Result<Self, String> {
        match r {
            MaskRepr::Word(w) if w == "none" => Ok(Mask::None),
            MaskRepr::Word(w) if w == "redact" => Ok(Mask::Redact),
            MaskRepr::Word(w) if w == "hash" => Ok(Mask::Hash),
            MaskRepr::Word(w) => Err(format!(
                "unknown mask `{w}`: use `none`, `hash`, `redact` or `{{ keep: {{ first: N, last: M }} }}`"
            )),
            MaskRepr::Keep { keep } => Ok(Mask::Keep {
                first: keep.first,
                last: keep.last,
            }),
        }
    }
}

impl From<Mask> for MaskRepr {
    fn from(m: Mask) -> Self {
        match m {
            Mask::None => MaskRepr::Word("none".into()),
            Mask::Redact => MaskRepr::Word("redact".into()),
            Mask::Hash => MaskRepr::Word("hash".into()),
            Mask::Keep { first, last } => MaskRepr::Keep {
                keep: KeepRepr { first, last },
            },
        }
    }
}

impl Mask {
    pub fn is_none(&self) -> bool {
        matches!(self, Mask::None)
    }

    /// Words for the catalogue (`DescribeDataset`).
    pub fn describe(&self) -> String {
        match self {
            Mask::None => "none".into(),
            Mask::Keep { first, last } => {
                format!("keep first {first} and last {last} characters")
            }
            Mask::Hash => "keyed-hash pseudonym".into(),
            Mask::Redact => "redacted".into(),
        }
    }

    /// How much a mask hides: clear < keep < hash < redact. A lower value reveals more.
    pub fn strength(&self) -> u8 {
        match self {
            Mask::None => 0,
            Mask::Keep { .. } => 1,
            Mask::Hash => 2,
            Mask::Redact => 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    pub sensitivity: Sensitivity,
    /// Mask applied to every consumer unless its grant says otherwise.
    #[serde(default = "no_mask")]
    pub mask: Mask,
    #[serde(default)]
    pub description: String,
}

fn no_mask() -> Mask {
    Mask::None
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// Owner department id.
    pub owner: String,
    /// Provider id serving the dataset.
    pub provider: String,
    pub share_type: ShareType,
    /// The field identifying the person or company a row is about.
    pub subject_key: String,
    /// The field holding each row's 6-digit region code; needed by grants with a row scope.
    #[serde(default)]
    pub region_field: Option<String>,
    /// Every call on this dataset needs a certificate-bound token.
    #[serde(default)]
    pub require_bound_tokens: bool,
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained calls per second.
    pub per_second: f64,
    /// Calls allowed at once above the sustained rate.
    pub burst: u32,
}

/// A sharing agreement.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Stable id, named in decisions and audit records.
    pub id: String,
    /// Consumer department id.
    pub consumer: String,
    /// Restrict the grant to one system of that department.
    #[serde(default)]
    pub system: Option<String>,
    pub dataset: String,
    /// Fields the consumer may receive (`["*"]`: every field of the dataset).
    pub fields: Vec<String>,
    /// Purposes the consumer may declare.
    pub purposes: Vec<String>,
    /// Per-field mask overrides (`none` to deliver a field in clear).
    #[serde(default)]
    pub masks: BTreeMap<String, Mask>,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Calls and/or rows per day, reset at local midnight (gateway's `limits.quota_timezone`).
    #[serde(default)]
    pub daily_quota: Option<DailyQuota>,
    /// Which rows the consumer may receive (default `all`).
    #[serde(default)]
    pub row_scope: RowScope,
    /// Not valid before: RFC 3339 time, or a date (`2026-01-01`, 00:00 China Standard Time).
    #[serde(default)]
    pub valid_from: Option<String>,
    /// Not valid from this instant on (same formats).
    #[serde(default)]
    pub expires: Option<String>,
    /// Reference of the approval document.
    #[serde(default)]
    pub approval_ref: Option<String>,
}

/// A grant's daily allowance.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DailyQuota {
    #[serde(default)]
    pub calls: Option<u64>,
    #[serde(default)]
    pub rows: Option<u64>,
}

/// Which rows a grant covers, by the dataset's region field.
///
/// In YAML: `all`, `own-region`, or `{ regions: ["330106", "330108"] }`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "ScopeRepr", into = "ScopeRepr")]
pub enum RowScope {
    /// Every row.
    #[default]
    All,
    /// Rows whose region lies inside the consumer department's region.
    OwnRegion,
    /// Rows whose region lies inside one of these regions.
    Regions(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
enum ScopeRepr {
    Word(String),
    Regions { regions: Vec<String> },
}

impl TryFrom<ScopeRepr> for RowScope {
    type Error = String;

    fn try_from(r: ScopeRepr) -> Result<Self, String> {
        match r {
            ScopeRepr::Word(w) if w == "all" => Ok(RowScope::All),
            ScopeRepr::Word(w) if w == "own-region" => Ok(RowScope::OwnRegion),
            ScopeRepr::Word(w) => Err(format!(
                "unknown row scope `{w}`: use `all`, `own-region` or `{{ regions: [\"330106\"] }}`"
            )),
            ScopeRepr::Regions { regions } => Ok(RowScope::Regions(regions)),
        }
    }
}

impl From<RowScope> for ScopeRepr {
    fn from(s: RowScope) -> Self {
        match s {
            RowScope::All => ScopeRepr::Word("all".into()),
            RowScope::OwnRegion => ScopeRepr::Word("own-region".into()),
            RowScope::Regions(regions) => ScopeRepr::Regions { regions },
        }
    }
}

/// Something that must never leave its owner.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NegativeEntry {
    pub dataset: String,
    /// A single field; absent: the whole dataset.
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub reason: String,
}
