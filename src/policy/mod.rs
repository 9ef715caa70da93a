//! The data-sharing model: load, validate and index the bureau's policy file, and decide calls.
//!
//! - [`model`]: the YAML file as written.
//! - [`Policy`]: a validated, indexed, immutable snapshot with its content hash as version.
//! - [`eval`]: the pure decision function `(policy, caller, ask) -> Permit | Reject`.
//! - [`mask`]: the masks the gateway applies to provider responses.
//! - [`scope`]: row scopes by region code: a filter narrowed to them, rows checked against them.
//! - [`diff`]: what a policy change loosens or tightens (`xgate policy diff`).
//! - [`locate`]: file:line:column of an entry, and the shape bounds checked before parsing.
//!
//! A policy that fails validation is never served: every error is reported at once, with the
//! path of the offending entry.
//!
//! Size: ~940 lines: loading and validating the file (every error at once, with its path)
//! and building the indexes the evaluation reads (and the per-grant names a permit shares) —
//! one pass whose checks depend on each other's indexes. The decision itself is in `eval`, the tests in `tests`.

pub mod diff;
pub mod eval;
pub mod impact;
pub mod locate;
pub mod mask;
pub mod model;
pub mod scope;
pub mod usage;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::Path,
    sync::Arc,
};

use sha2::{Digest, Sha256};

pub use eval::{Caller, Permit, PermittedField, Request, evaluate};
pub use model::{Mask, PolicyFile, RateLimit, ShareType};

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// Where: `grants[2].fields[0]`, or `yaml` for syntax errors.
    pub path: String,
    pub message: String,
    /// How to fix it, when there is something better to say than the message.
    pub hint: Option<String>,
    /// 1-based position in the file, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl PolicyError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            hint: None,
            line: None,
            column: None,
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, "line {l}, column {c}: ")?;
        }
        write!(f, "{}: {}", self.path, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Every problem found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} error(s) in policy:", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// A validated, indexed policy snapshot. Immutable: a reload builds a new one.
#[derive(Debug)]
pub struct Policy {
    /// `sha256:` + the first 16 hex digits of the file's SHA-256: names the exact file.
    pub version: Arc<str>,
    pub file: PolicyFile,
    departments: HashMap<String, usize>,
    datasets: HashMap<String, DatasetIndex>,
    providers: HashMap<String, usize>,
    /// dataset id -> consumer id -> grant indexes (system-specific grants first).
    grants: HashMap<String, HashMap<String, Vec<usize>>>,
    /// dataset id -> negative-list entry index for the whole dataset.
    negative_datasets: HashMap<String, usize>,
    /// Per grant (same index as `file.grants`): its validity window.
    windows: Vec<Window>,
    /// Per grant (same index as `file.grants`): the names a permit carries, built once.
    grant_names: Vec<GrantNames>,
    /// `share-type:unconditional`, the rule of a permit no grant gave.
    pub(crate) unconditional_rule: Arc<str>,
}

/// A grant's validity window, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub from: Option<i64>,
    pub until: Option<i64>,
}

impl Window {
    /// `Ok` when valid at `now`, else the reason it is not.
    pub fn check(&self, now: i64) -> Result<(), crate::error::Reason> {
        if self.from.is_some_and(|f| now < f) {
            return Err(crate::error::Reason::GrantNotYetValid);
        }
        if self.until.is_some_and(|u| now >= u) {
            return Err(crate::error::Reason::GrantExpired);
        }
        Ok(())
    }
}

/// Parse an RFC 3339 time, or a date meaning 00:00 China Standard Time (UTC+8) that day.
pub fn parse_instant(s: &str) -> Result<i64, String> {
    use time::{
        OffsetDateTime, PrimitiveDateTime, UtcOffset, format_description::well_known::Rfc3339,
    };
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t.unix_timestamp());
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let d = time::Date::parse(s, &fmt)
        .map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a YYYY-MM-DD date"))?;
    let cst = UtcOffset::from_hms(8, 0, 0).map_err(|e| e.to_string())?;
    Ok(PrimitiveDateTime::new(d, time::Time::MIDNIGHT)
        .assume_offset(cst)
        .unix_timestamp())
}

#[derive(Debug)]
struct DatasetIndex {
    idx: usize,
    /// field name -> position in the dataset's `fields`.
    fields: HashMap<String, usize>,
    /// per field position: the negative-list entry that forbids it, if any.
    negative_fields: Vec<Option<usize>>,
    /// per field position: its name, shared, so a decision names its fields without
    /// copying them.
    names: Vec<std::sync::Arc<str>>,
}

/// What a permit under one grant carries (its rule, id, approval, purposes and resolved row
/// scope), built when the policy loads and shared by every call the grant allows: a decision
/// copies no string.
#[derive(Debug, Clone)]
pub(crate) struct GrantNames {
    /// `grant:<id>`.
    pub rule: Arc<str>,
    pub id: Arc<str>,
    pub approval_ref: Option<Arc<str>>,
    pub purposes: Arc<[String]>,
    /// The grant's row scope against its consumer's region (`None`: every row).
    pub scope: Option<Arc<scope::Scope>>,
}

impl GrantNames {
    fn of(policy: &Policy, g: &model::Grant) -> Self {
        Self {
            rule: format!("grant:{}", g.id).into(),
            id: g.id.as_str().into(),
            approval_ref: g.approval_ref.as_deref().map(Arc::from),
            purposes: g.purposes.as_slice().into(),
            scope: (policy.dataset(&g.dataset))
                .and_then(|ds| eval::row_scope(policy, ds, g, &g.consumer))
                .map(Arc::new),
        }
    }
}

/// Largest policy file accepted (a 10,000-grant policy is about 3 MB).
pub const MAX_POLICY_BYTES: usize = 32 << 20;
/// Deepest nesting of mappings and sequences accepted (the model itself needs 6).
pub const MAX_POLICY_DEPTH: usize = 32;

impl Policy {
    /// Read and validate a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyErrors> {
        let bytes = std::fs::read(path).map_err(|e| {
            PolicyErrors(vec![PolicyError::new(
                path.display().to_string(),
                format!("cannot read policy file: {e}"),
            )])
        })?;
        Policy::from_yaml(&bytes)
    }

    /// Parse and validate policy YAML.
    pub fn from_yaml(bytes: &[u8]) -> Result<Policy, PolicyErrors> {
        // Bounded before any full parse: the YAML loader's cost grows with the square of the
        // nesting depth (a 200 KB file of nested brackets took 27 s).
        locate::check_shape(bytes, MAX_POLICY_BYTES, MAX_POLICY_DEPTH)
            .map_err(|e| PolicyErrors(vec![e]))?;
        let file: PolicyFile = serde_yaml_ng::from_slice(bytes).map_err(|e| {
            let mut pe = PolicyError::new("yaml", e.to_string());
            if let Some(l) = e.location() {
                pe.line = Some(l.line());
                pe.column = Some(l.column());
            }
            pe.hint = yaml_hint(&pe.message);
            PolicyErrors(vec![pe])
        })?;
        let digest = Sha256::digest(bytes);
        let version = format!("sha256:{}", &hex::encode(digest)[..16]);
        Policy::build(file, version).map_err(|mut e| {
            locate::attach(&String::from_utf8_lossy(bytes), &mut e.0);
            e
        })
    }

    /// Validate an already-parsed file.
    pub fn build(file: PolicyFile, version: String) -> Result<Policy, PolicyErrors> {
        let mut errs = Errors {
            file: &file,
            list: Vec::new(),
        };
        check_defaults(&file, &mut errs);
        let departments = index_departments(&file, &mut errs);
        let providers = index_providers(&file, &mut errs);
        let mut datasets = index_datasets(&file, &departments, &providers, &mut errs);
        let negative_datasets = index_negative_list(&file, &mut datasets, &mut errs);
        let (grants, windows) = index_grants(
            &file,
            &departments,
            &datasets,
            &negative_datasets,
            &mut errs,
        );
        check_usage(&file, &departments, &datasets, &mut errs);
        if !errs.list.is_empty() {
            return Err(PolicyErrors(errs.list));
        }
        let mut policy = Policy {
            version: version.into(),
            file,
            departments,
            datasets,
            providers,
            grants,
            negative_datasets,
            grant_names: Vec::new(),
            unconditional_rule: Arc::from("share-type:unconditional"),
            windows,
        };
        let names = (policy.file.grants.iter())
            .map(|g| GrantNames::of(&policy, g))
            .collect();
        policy.grant_names = names;
        Ok(policy)
    }

    /// Whether any field or grant uses the keyed-hash mask (which needs the bureau's key).
    pub fn uses_hash_mask(&self) -> bool {
        self.file
            .datasets
            .iter()
            .flat_map(|d| d.fields.iter().map(|f| f.mask))
            .chain(
                self.file
                    .grants
                    .iter()
                    .flat_map(|g| g.masks.values().copied()),
            )
            .any(|m| m == Mask::Hash)
    }

    pub fn department(&self, id: &str) -> Option<&model::Department> {
        self.departments.get(id).map(|&i| &self.file.departments[i])
    }

    pub fn dataset(&self, id: &str) -> Option<&model::Dataset> {
        self.datasets.get(id).map(|d| &self.file.datasets[d.idx])
    }

    pub fn provider(&self, id: &str) -> Option<&model::Provider> {
        self.providers.get(id).map(|&i| &self.file.providers[i])
    }

    pub(crate) fn field_index(&self, dataset: &str, field: &str) -> Option<usize> {
        self.datasets.get(dataset)?.fields.get(field).copied()
    }

    /// The dataset's field names by position, shared (empty for an unknown dataset).
    pub(crate) fn field_names(&self, dataset: &str) -> &[std::sync::Arc<str>] {
        self.datasets
            .get(dataset)
            .map_or(&[][..], |d| d.names.as_slice())
    }

    pub(crate) fn negative_field(
        &self,
        dataset: &str,
        field_idx: usize,
    ) -> Option<&model::NegativeEntry> {
        let n = (*self.datasets.get(dataset)?.negative_fields.get(field_idx)?)?;
        self.file.negative_list.get(n)
    }

    pub(crate) fn negative_dataset(&self, dataset: &str) -> Option<&model::NegativeEntry> {
        self.negative_datasets
            .get(dataset)
            .and_then(|&n| self.file.negative_list.get(n))
    }

    /// Grants of `consumer` on `dataset`, system-specific first, with their windows.
    pub(crate) fn grants_for<'a>(
        &'a self,
        dataset: &str,
        consumer: &str,
    ) -> impl Iterator<Item = (&'a model::Grant, Window, &'a GrantNames)> + 'a {
        self.grants
            .get(dataset)
            .and_then(|m| m.get(consumer))
            .into_iter()
            .flatten()
            .map(|&i| (&self.file.grants[i], self.windows[i], &self.grant_names[i]))
    }
}

/// Every error found while building a policy, with a fix hint where one is known.
struct Errors<'f> {
    file: &'f PolicyFile,
    list: Vec<PolicyError>,
}

impl Errors<'_> {
    fn add(&mut self, path: String, message: String) {
        let hint = hint_for(&message, self.file);
        self.list.push(PolicyError {
            hint,
            ..PolicyError::new(path, message)
        });
    }
}

/// `defaults`: the open-access and per-consumer rates are positive.
fn check_defaults(file: &PolicyFile, errs: &mut Errors<'_>) {
    for (path, r) in [
        ("defaults.rate_limit", Some(file.defaults.rate_limit)),
        ("defaults.per_consumer", file.defaults.per_consumer),
    ] {
        if let Some(r) = r
            && !(r.per_second > 0.0 && r.per_second.is_finite() && r.burst > 0)
        {
            errs.add(path.into(), "per_second and burst must be positive".into());
        }
    }
}

/// `departments`: unique ids, region codes; id -> index.
fn index_departments(file: &PolicyFile, errs: &mut Errors<'_>) -> HashMap<String, usize> {
    let mut departments = HashMap::new();
    for (i, d) in file.departments.iter().enumerate() {
        if departments.insert(d.id.clone(), i).is_some() {
            errs.add(
                format!("departments[{i}].id"),
                format!("duplicate department id `{}`", d.id),
            );
        }
        if d.id.is_empty() || d.id.contains('/') {
            errs.add(
                format!("departments[{i}].id"),
                "must be non-empty and contain no `/`".into(),
            );
        }
        if !is_region_code(&d.region) {
            errs.add(
                format!("departments[{i}].region"),
                format!(
                    "`{}` is not a 6-digit administrative division code",
                    d.region
                ),
            );
        }
    }
    departments
}

/// `usage`: portals and disclosure rules name departments and datasets that exist, each rule
/// says which accesses it covers, and its date reads.
fn check_usage(
    file: &PolicyFile,
    departments: &HashMap<String, usize>,
    datasets: &HashMap<String, DatasetIndex>,
    errs: &mut Errors<'_>,
) {
    let u = &file.usage;
    for (i, p) in u.portals.iter().enumerate() {
        if !departments.contains_key(&p.consumer) {
            errs.add(
                format!("usage.portals[{i}].consumer"),
                format!("unknown department `{}`", p.consumer),
            );
        }
    }
    for (list, rules) in [
        ("withhold", &u.withhold),
        ("never_disclose", &u.never_disclose),
    ] {
        for (i, r) in rules.iter().enumerate() {
            let at = |k: &str| format!("usage.{list}[{i}]{k}");
            if r.consumer.is_none() && r.purpose.is_none() && r.dataset.is_none() {
                errs.add(
                    at(""),
                    "say which accesses it covers: `consumer`, `purpose` and/or `dataset`".into(),
                );
            }
            if let Some(c) = &r.consumer
                && !departments.contains_key(c)
            {
                errs.add(at(".consumer"), format!("unknown department `{c}`"));
            }
            if let Some(d) = &r.dataset
                && !datasets.contains_key(d)
            {
                errs.add(at(".dataset"), format!("unknown dataset `{d}`"));
            }
            if let Some(t) = &r.until {
                if list == "never_disclose" {
                    errs.add(
                        at(".until"),
                        "`never_disclose` has no end: move it to `withhold`".into(),
                    );
                } else if let Err(e) = parse_instant(t) {
                    errs.add(at(".until"), e);
                }
            }
            if r.reference.trim().is_empty() {
                errs.add(
                    at(".reference"),
                    "name the case or the law that withholds it".into(),
                );
            }
        }
    }
}

/// `providers`: unique ids, endpoints, TLS names, protection limits; id -> index.
fn index_providers(file: &PolicyFile, errs: &mut Errors<'_>) -> HashMap<String, usize> {
    let mut providers = HashMap::new();
    for (i, p) in file.providers.iter().enumerate() {
        if providers.insert(p.id.clone(), i).is_some() {
            errs.add(
                format!("providers[{i}].id"),
                format!("duplicate provider id `{}`", p.id),
            );
        }
        let list = p.endpoint_list();
        let given = usize::from(p.endpoint.is_some())
            + usize::from(!p.endpoints.is_empty())
            + usize::from(p.dns.is_some());
        match given {
            0 => errs.add(
                format!("providers[{i}]"),
                format!(
                    "provider `{}` has no `endpoint` (or `endpoints`, for several replicas, or `dns`, to find them by name)",
                    p.id
                ),
            ),
            1 => {}
            _ => errs.add(
                format!("providers[{i}]"),
                "give one of `endpoint` (one), `endpoints` (several) and `dns` (found by name)"
                    .to_owned(),
            ),
        }
        let mut host = None;
        if let Some(d) = &p.dns {
            if rustls::pki_types::DnsName::try_from(d.name.as_str()).is_err() {
                errs.add(
                    format!("providers[{i}].dns.name"),
                    format!("`{}` is not a DNS name", d.name),
                );
            } else {
                host = Some(d.name.clone());
            }
            if d.port == 0 {
                errs.add(format!("providers[{i}].dns.port"), "must not be 0".into());
            }
            if d.every_secs == 0 {
                errs.add(
                    format!("providers[{i}].dns.every_secs"),
                    "must be at least 1".into(),
                );
            }
        }
        let mut seen = HashSet::new();
        for (at, e) in &list {
            match e.parse::<http::Uri>() {
                Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => {
                    if host.is_none() {
                        host = uri.host().map(|h| h.trim_matches(['[', ']']).to_owned());
                    }
                }
                _ => errs.add(
                    format!("providers[{i}].{at}"),
                    format!("`{e}` is not an https://host:port URL"),
                ),
            }
            if !seen.insert(*e) {
                errs.add(
                    format!("providers[{i}].{at}"),
                    format!("`{e}` is listed twice"),
                );
            }
        }
        let first_at = list.first().map_or_else(
            || {
                if p.dns.is_some() {
                    "dns.name".to_owned()
                } else {
                    "endpoint".to_owned()
                }
            },
            |(a, _)| a.clone(),
        );
        // The name the provider's certificate is checked against: what `serve` would
        // refuse at start, `policy check` refuses here.
        let (name_path, name) = match &p.tls_name {
            Some(n) => (format!("providers[{i}].tls_name"), Some(n.clone())),
            None => (format!("providers[{i}].{first_at}"), host),
        };
        if let Some(n) = name
            && rustls::pki_types::ServerName::try_from(n.as_str()).is_err()
        {
            errs.add(
                name_path,
                format!(
                    "`{n}` is not a DNS name or IP address a certificate can be checked against"
                ),
            );
        }
        if let Some(r) = p.max_rate
            && !(r.per_second > 0.0 && r.per_second.is_finite() && r.burst > 0)
        {
            errs.add(
                format!("providers[{i}].max_rate"),
                "per_second and burst must be positive".into(),
            );
        }
        if p.max_in_flight == Some(0) {
            errs.add(
                format!("providers[{i}].max_in_flight"),
                "must be at least 1".into(),
            );
        }
    }
    providers
}

/// `datasets`: fields, masks, owners and providers that exist; id -> index.
fn index_datasets(
    file: &PolicyFile,
    departments: &HashMap<String, usize>,
    providers: &HashMap<String, usize>,
    errs: &mut Errors<'_>,
) -> HashMap<String, DatasetIndex> {
    let mut datasets = HashMap::new();
    for (i, ds) in file.datasets.iter().enumerate() {
        let mut fields = HashMap::new();
        for (j, f) in ds.fields.iter().enumerate() {
            if fields.insert(f.name.clone(), j).is_some() {
                errs.add(
                    format!("datasets[{i}].fields[{j}].name"),
                    format!("duplicate field `{}`", f.name),
                );
            }
            if let Mask::Keep { .. } = f.mask
                && f.ty != model::FieldType::String
                && f.ty != model::FieldType::Int64
            {
                errs.add(
                    format!("datasets[{i}].fields[{j}].mask"),
                    "`keep` masks apply to string and int64 fields only; use `redact`".into(),
                );
            }
        }
        if ds.fields.is_empty() {
            errs.add(
                format!("datasets[{i}].fields"),
                "a dataset needs at least one field".into(),
            );
        }
        if !fields.contains_key(&ds.subject_key) {
            errs.add(
                format!("datasets[{i}].subject_key"),
                format!("`{}` is not a field of dataset `{}`", ds.subject_key, ds.id),
            );
        }
        if let Some(rf) = &ds.region_field {
            match fields.get(rf).map(|&j| ds.fields[j].ty) {
                Some(model::FieldType::String) => {}
                Some(_) => errs.add(
                    format!("datasets[{i}].region_field"),
                    format!("`{rf}` must be a string field holding 6-digit region codes"),
                ),
                None => errs.add(
                    format!("datasets[{i}].region_field"),
                    format!("`{rf}` is not a field of dataset `{}`", ds.id),
                ),
            }
        }
        if !departments.contains_key(&ds.owner) {
            errs.add(
                format!("datasets[{i}].owner"),
                format!("unknown department `{}`", ds.owner),
            );
        }
        if !providers.contains_key(&ds.provider) {
            errs.add(
                format!("datasets[{i}].provider"),
                format!("unknown provider `{}`", ds.provider),
            );
        }
        let n = ds.fields.len();
        let dup = datasets
            .insert(
                ds.id.clone(),
                DatasetIndex {
                    idx: i,
                    fields,
                    negative_fields: vec![None; n],
                    names: ds.fields.iter().map(|f| f.name.as_str().into()).collect(),
                },
            )
            .is_some();
        if dup {
            errs.add(
                format!("datasets[{i}].id"),
                format!("duplicate dataset id `{}`", ds.id),
            );
        }
    }
    datasets
}

/// `negative_list`: each entry names a dataset (or one of its fields) that exists; marks the
/// fields, and returns the datasets listed whole.
fn index_negative_list(
    file: &PolicyFile,
    datasets: &mut HashMap<String, DatasetIndex>,
    errs: &mut Errors<'_>,
) -> HashMap<String, usize> {
    let mut negative_datasets = HashMap::new();
    for (i, n) in file.negative_list.iter().enumerate() {
        let Some(ds) = datasets.get_mut(&n.dataset) else {
            errs.add(
                format!("negative_list[{i}].dataset"),
                format!("unknown dataset `{}`", n.dataset),
            );
            continue;
        };
        match &n.field {
            None => {
                negative_datasets.insert(n.dataset.clone(), i);
            }
            Some(f) => match ds.fields.get(f) {
                Some(&j) => ds.negative_fields[j] = Some(i),
                None => errs.add(
                    format!("negative_list[{i}].field"),
                    format!("`{f}` is not a field of dataset `{}`", n.dataset),
                ),
            },
        }
    }
    negative_datasets
}

/// `grants`: each checked against the departments, datasets and negative list; indexed by
/// dataset and consumer (system-specific first), with their validity windows.
#[allow(clippy::type_complexity)]
fn index_grants(
    file: &PolicyFile,
    departments: &HashMap<String, usize>,
    datasets: &HashMap<String, DatasetIndex>,
    negative_datasets: &HashMap<String, usize>,
    errs: &mut Errors<'_>,
) -> (HashMap<String, HashMap<String, Vec<usize>>>, Vec<Window>) {
    let mut grants: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
    let mut grant_ids = HashMap::new();
    let mut windows = Vec::with_capacity(file.grants.len());
    for (i, g) in file.grants.iter().enumerate() {
        let at = |k: &str| format!("grants[{i}].{k}");
        let mut instant = |k: &str, v: &Option<String>| match v.as_deref().map(parse_instant) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                errs.add(at(k), e);
                None
            }
        };
        let window = Window {
            from: instant("valid_from", &g.valid_from),
            until: instant("expires", &g.expires),
        };
        if let (Some(f), Some(u)) = (window.from, window.until)
            && u <= f
        {
            errs.add(
                at("expires"),
                "a grant must expire after it becomes valid".into(),
            );
        }
        windows.push(window);
        if let model::RowScope::Regions(rs) = &g.row_scope {
            if rs.is_empty() {
                errs.add(at("row_scope"), "list at least one region".into());
            }
            for (j, r) in rs.iter().enumerate() {
                if !is_region_code(r) {
                    errs.add(
                        format!("grants[{i}].row_scope.regions[{j}]"),
                        format!("`{r}` is not a 6-digit administrative division code"),
                    );
                }
            }
        }
        if grant_ids.insert(g.id.clone(), i).is_some() {
            errs.add(at("id"), format!("duplicate grant id `{}`", g.id));
        }
        if !departments.contains_key(&g.consumer) {
            errs.add(
                at("consumer"),
                format!("unknown department `{}`", g.consumer),
            );
        }
        if g.purposes.is_empty() || g.purposes.iter().any(|p| p.trim().is_empty()) {
            errs.add(
                at("purposes"),
                "a grant needs at least one non-empty purpose".into(),
            );
        }
        if let Some(r) = g.rate_limit
            && !(r.per_second > 0.0 && r.per_second.is_finite() && r.burst > 0)
        {
            errs.add(
                at("rate_limit"),
                "per_second and burst must be positive".into(),
            );
        }
        if let Some(q) = g.daily_quota
            && (q.calls.is_none() && q.rows.is_none() || q.calls == Some(0) || q.rows == Some(0))
        {
            errs.add(
                at("daily_quota"),
                "set `calls` and/or `rows`, each at least 1".into(),
            );
        }
        let Some(ds) = datasets.get(&g.dataset) else {
            errs.add(at("dataset"), format!("unknown dataset `{}`", g.dataset));
            continue;
        };
        if g.fields.is_empty() {
            errs.add(
                at("fields"),
                "list the fields granted (or `\"*\"` for all)".into(),
            );
        }
        if g.row_scope != model::RowScope::All && file.datasets[ds.idx].region_field.is_none() {
            errs.add(
                at("row_scope"),
                format!(
                    "a row scope needs dataset `{}` to name its `region_field`",
                    g.dataset
                ),
            );
        }
        if let Some(&n) = negative_datasets.get(&g.dataset) {
            errs.add(
                at("dataset"),
                format!(
                    "dataset `{}` is on the negative list (negative_list[{n}]): it cannot be granted",
                    g.dataset
                ),
            );
        }
        for (j, f) in g.fields.iter().enumerate() {
            if f == "*" {
                continue;
            }
            match ds.fields.get(f) {
                None => errs.add(
                    format!("grants[{i}].fields[{j}]"),
                    format!("`{f}` is not a field of dataset `{}`", g.dataset),
                ),
                Some(&k) => {
                    if let Some(n) = ds.negative_fields[k] {
                        errs.add(
                            format!("grants[{i}].fields[{j}]"),
                            format!(
                                "field `{f}` is on the negative list (negative_list[{n}]): it cannot be granted"
                            ),
                        );
                    }
                }
            }
        }
        for (f, m) in &g.masks {
            if let (Some(&k), Mask::Keep { .. }) = (ds.fields.get(f), m)
                && !matches!(
                    file.datasets[ds.idx].fields[k].ty,
                    model::FieldType::String | model::FieldType::Int64
                )
            {
                errs.add(
                    at("masks"),
                    format!(
                        "`keep` masks apply to string and int64 fields only; `{f}` needs `redact` or `hash`"
                    ),
                );
            }
            if !ds.fields.contains_key(f) {
                errs.add(
                    at("masks"),
                    format!("`{f}` is not a field of dataset `{}`", g.dataset),
                );
            }
        }
        let list = grants
            .entry(g.dataset.clone())
            .or_default()
            .entry(g.consumer.clone())
            .or_default();
        list.push(i);
    }
    // System-specific grants are more specific: try them first.
    for by_consumer in grants.values_mut() {
        for list in by_consumer.values_mut() {
            list.sort_by_key(|&i| file.grants[i].system.is_none());
        }
    }
    (grants, windows)
}

/// A fix hint for common mistakes: the closest known id for an unknown reference.
fn hint_for(message: &str, file: &PolicyFile) -> Option<String> {
    let unknown = |what: &str| -> Option<String> {
        let rest = message.strip_prefix(&format!("unknown {what} `"))?;
        Some(rest.split('`').next()?.to_owned())
    };
    let suggest = |bad: &str, known: Vec<&str>, where_: &str| -> String {
        match known.iter().min_by_key(|k| edit_distance(bad, k)) {
            Some(k) if edit_distance(bad, k) <= bad.len().max(3) / 3 + 1 => {
                format!("did you mean `{k}`?")
            }
            _ => format!(
                "add it under `{where_}:` or use one of: {}",
                known.join(", ")
            ),
        }
    };
    if let Some(bad) = unknown("department") {
        return Some(suggest(
            &bad,
            file.departments.iter().map(|d| d.id.as_str()).collect(),
            "departments",
        ));
    }
    if let Some(bad) = unknown("dataset") {
        return Some(suggest(
            &bad,
            file.datasets.iter().map(|d| d.id.as_str()).collect(),
            "datasets",
        ));
    }
    if let Some(bad) = unknown("provider") {
        return Some(suggest(
            &bad,
            file.providers.iter().map(|d| d.id.as_str()).collect(),
            "providers",
        ));
    }
    if message.contains("on the negative list") {
        return Some(
            "remove it from the grant, or (with the owner's consent) from the negative list".into(),
        );
    }
    if message.contains("6-digit administrative division code") {
        return Some(
            "region codes are 6 digits, e.g. 330000 (province), 330100 (city), 330106 (county)"
                .into(),
        );
    }
    None
}

fn yaml_hint(message: &str) -> Option<String> {
    if message.contains("unknown field") {
        return Some(
            "check the key's spelling against docs/policy.md; unknown keys are refused".into(),
        );
    }
    if message.contains("missing field") {
        return Some("this entry needs that key; see docs/policy.md".into());
    }
    None
}

/// Levenshtein distance, for suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn is_region_code(s: &str) -> bool {
    s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
pub(crate) mod tests;
