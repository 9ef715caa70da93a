//! Every way xgate refuses or fails a call, and the one table that turns it into a gRPC status.
//!
//! Subsystems (identity, policy, rate limits, upstream, audit) report a [`Reject`]: a stable
//! [`Reason`] plus a sentence a caller can act on. [`Reason::code`] is the single place that
//! decides gRPC codes; [`Reject::to_status`] builds the rich `google.rpc.Status` with an
//! `ErrorInfo` (domain [`ERROR_DOMAIN`]) and, for rate limits, a `RetryInfo`.
//!
//! Messages never carry internals (file paths, upstream addresses, library errors): those go to
//! the log, under the same trace id the caller receives.

use std::{collections::HashMap, fmt, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every xgate error.
pub const ERROR_DOMAIN: &str = "xgate.gov";

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident => $code:ident, $text:literal; )*) => {
        /// Stable, machine-readable reason for a refusal (`ErrorInfo.reason`).
        ///
        /// These strings are part of the public contract: never rename one.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum Reason {
            $( $(#[$doc])* $variant, )*
        }

        impl Reason {
            /// The gRPC code a caller receives for this reason: the one table.
            pub fn code(self) -> Code {
                match self { $( Reason::$variant => Code::$code, )* }
            }

            /// The stable `ErrorInfo.reason` string.
            pub fn as_str(self) -> &'static str {
                match self { $( Reason::$variant => $text, )* }
            }

            /// Every reason, for documentation and tests.
            pub const ALL: &'static [Reason] = &[ $( Reason::$variant, )* ];
        }
    };
}

reasons! {
    // --- who is calling -------------------------------------------------------------------
    /// The TLS handshake failed: no client certificate, or one the CA did not issue.
    /// (Recorded in the audit trail; the client sees a TLS alert, not a gRPC status.)
    TlsHandshakeFailed => Unauthenticated, "TLS_HANDSHAKE_FAILED";
    /// The client opened TCP but did not finish the TLS handshake in time (audited).
    TlsHandshakeTimeout => Unauthenticated, "TLS_HANDSHAKE_TIMEOUT";
    /// The certificate was revoked (CRL) after its connection was opened.
    CertRevoked => Unauthenticated, "CERT_REVOKED";
    /// The certificate expired after its connection was opened.
    CertExpired => Unauthenticated, "CERT_EXPIRED";
    /// The client certificate carries no `spiffe://<trust-domain>/dept/<d>/sys/<s>` SAN URI.
    CertIdentityMissing => Unauthenticated, "CERT_IDENTITY_MISSING";
    /// No `authorization: Bearer` header.
    TokenMissing => Unauthenticated, "TOKEN_MISSING";
    /// The `authorization` header is larger than the gateway accepts.
    TokenTooLarge => Unauthenticated, "TOKEN_TOO_LARGE";
    /// The token's algorithm is not allowed (`none`, HMAC without a configured secret, ...).
    TokenAlgorithmNotAllowed => Unauthenticated, "TOKEN_ALGORITHM_NOT_ALLOWED";
    /// The token lives longer than the gateway accepts.
    TokenLifetimeTooLong => Unauthenticated, "TOKEN_LIFETIME_TOO_LONG";
    /// The token is bound to another certificate than the one presented.
    TokenBindingMismatch => Unauthenticated, "TOKEN_BINDING_MISMATCH";
    /// The policy requires a certificate-bound token here.
    TokenBindingRequired => Unauthenticated, "TOKEN_BINDING_REQUIRED";
    /// The gateway has no usable keys to check tokens (identity provider unreachable).
    TokenKeysUnavailable => Unavailable, "TOKEN_KEYS_UNAVAILABLE";
    /// The token is not a well-formed JWT.
    TokenMalformed => Unauthenticated, "TOKEN_MALFORMED";
    /// `exp` is in the past.
    TokenExpired => Unauthenticated, "TOKEN_EXPIRED";
    /// `nbf` is in the future.
    TokenNotYetValid => Unauthenticated, "TOKEN_NOT_YET_VALID";
    /// The signature does not verify, or the algorithm is not allowed.
    TokenSignatureInvalid => Unauthenticated, "TOKEN_SIGNATURE_INVALID";
    /// The token's `kid` is not in the JWKS.
    TokenKeyUnknown => Unauthenticated, "TOKEN_KEY_UNKNOWN";
    /// `iss` is not the configured issuer.
    TokenIssuerInvalid => Unauthenticated, "TOKEN_ISSUER_INVALID";
    /// `aud` does not contain the configured audience.
    TokenAudienceInvalid => Unauthenticated, "TOKEN_AUDIENCE_INVALID";
    /// A required claim (`sub`, `dept`, `exp`) is missing.
    TokenClaimMissing => Unauthenticated, "TOKEN_CLAIM_MISSING";
    /// Too many failed authentications from this client certificate: its calls are refused
    /// for a moment without any token check (`RetryInfo` says how long).
    AuthFailuresLimited => ResourceExhausted, "AUTH_FAILURES_LIMITED";
    /// The token's `dept` is not the department in the client certificate.
    TokenDeptMismatch => PermissionDenied, "TOKEN_DEPT_MISMATCH";
    // --- the data-sharing model -----------------------------------------------------------
    /// The calling department is not registered in the policy.
    ConsumerUnknown => PermissionDenied, "CONSUMER_UNKNOWN";
    /// The dataset is not in the catalogue.
    DatasetUnknown => NotFound, "DATASET_UNKNOWN";
    /// The dataset's share type is `none`.
    ShareTypeNone => PermissionDenied, "SHARE_TYPE_NONE";
    /// The dataset or field is on the negative list.
    NegativeList => PermissionDenied, "NEGATIVE_LIST";
    /// A conditional dataset (or a sensitive field) without a grant for this caller.
    GrantMissing => PermissionDenied, "GRANT_MISSING";
    /// The grant that would allow the call has expired.
    GrantExpired => PermissionDenied, "GRANT_EXPIRED";
    /// The grant that would allow the call is not valid yet.
    GrantNotYetValid => PermissionDenied, "GRANT_NOT_YET_VALID";
    /// The filter asks for rows outside the grant's row scope.
    RowScopeViolation => PermissionDenied, "ROW_SCOPE_VIOLATION";
    /// The call declared no purpose.
    PurposeMissing => InvalidArgument, "PURPOSE_MISSING";
    /// The declared purpose is not one the grant allows.
    PurposeNotAllowed => PermissionDenied, "PURPOSE_NOT_ALLOWED";
    /// The declared purpose is not among the token's `purposes` claim.
    TokenPurposeNotAllowed => PermissionDenied, "TOKEN_PURPOSE_NOT_ALLOWED";
    /// A requested or filtered field is not readable by the caller.
    FieldDenied => PermissionDenied, "FIELD_DENIED";
    /// A requested or filtered field is not in the dataset's schema.
    FieldUnknown => InvalidArgument, "FIELD_UNKNOWN";
    /// The method path is not part of the interface.
    MethodUnknown => Unimplemented, "METHOD_UNKNOWN";
    /// The request body is not a protobuf message of the interface.
    RequestMalformed => InvalidArgument, "REQUEST_MALFORMED";
    /// The request is compressed with an encoding the gateway does not take (it takes gzip).
    EncodingUnsupported => Unimplemented, "ENCODING_UNSUPPORTED";
    /// Not a gRPC request: a method other than POST, or a content-type other than
    /// `application/grpc` (answered with HTTP 405 / 415 as the gRPC spec asks).
    NotGrpc => InvalidArgument, "NOT_GRPC";
    /// The request message is over the size limit.
    MessageTooLarge => ResourceExhausted, "MESSAGE_TOO_LARGE";
    /// The request's metadata (headers) is over `limits.max_metadata_bytes`.
    MetadataTooLarge => ResourceExhausted, "METADATA_TOO_LARGE";
    /// A connection opened and reset streams faster than the gateway could accept them (an
    /// HTTP/2 rapid-reset flood): closed with GOAWAY `ENHANCE_YOUR_CALM`. No gRPC status can
    /// reach the caller; the connection's record says how many resets it sent.
    ResetFlood => ResourceExhausted, "RESET_FLOOD";
    /// The page token was not issued by the gateway for this caller, this query and this
    /// policy version (altered, replayed, or the policy changed): start from the first page.
    PageTokenInvalid => InvalidArgument, "PAGE_TOKEN_INVALID";
    /// The request is malformed (no dataset, bad filter, ...).
    RequestInvalid => InvalidArgument, "REQUEST_INVALID";
    // --- limits ---------------------------------------------------------------------------
    /// Over a rate limit (grant or consumer); `RetryInfo` says when, `QuotaFailure` which.
    RateLimited => ResourceExhausted, "RATE_LIMITED";
    /// A grant's daily quota (calls or rows) is used up until local midnight.
    QuotaExhausted => ResourceExhausted, "QUOTA_EXHAUSTED";
    /// The shared limit store (Redis) cannot be reached and the gateway is configured
    /// `fail-closed`: no call goes through unmetered.
    LimitsUnavailable => Unavailable, "LIMITS_UNAVAILABLE";
    // --- upstream -------------------------------------------------------------------------
    /// The provider cannot be reached or refused the connection.
    ProviderUnavailable => Unavailable, "PROVIDER_UNAVAILABLE";
    /// The provider is at its protection limit (rate or in-flight) after a short wait.
    ProviderSaturated => Unavailable, "PROVIDER_SATURATED";
    /// The provider did not answer within the deadline.
    ProviderTimeout => DeadlineExceeded, "PROVIDER_TIMEOUT";
    /// The provider refused the call itself; the provider's code is passed through.
    ProviderError => Unknown, "PROVIDER_ERROR";
    /// The provider's answer does not follow the standard interface.
    ProviderResponseInvalid => Internal, "PROVIDER_RESPONSE_INVALID";
    // --- the provider adapter (`xgate provider`): what it tells the gateway, which passes it
    // --- on as PROVIDER_UNAVAILABLE / PROVIDER_TIMEOUT / PROVIDER_ERROR with this message ----
    /// The client certificate is not the gateway's (`gateway.identities` in provider.yaml):
    /// only the gateway may call a provider.
    CallerNotGateway => PermissionDenied, "CALLER_NOT_GATEWAY";
    /// The dataset is configured but failed its check against the live schema (its
    /// `/ready` says which field and column), so the provider refuses it until it passes.
    DatasetNotServed => FailedPrecondition, "DATASET_NOT_SERVED";
    /// The provider's database or HTTP service cannot be reached (down, refusing, or every
    /// pooled connection busy); the provider reconnects by itself.
    SourceUnavailable => Unavailable, "SOURCE_UNAVAILABLE";
    /// The source did not answer within its statement or request timeout.
    SourceTimeout => DeadlineExceeded, "SOURCE_TIMEOUT";
    /// A column or table went away or changed type while serving: the dataset is checked
    /// again, and refused until it passes.
    SourceSchemaChanged => FailedPrecondition, "SOURCE_SCHEMA_CHANGED";
    /// The source failed in another way (details in the provider's log under the trace id).
    SourceError => Internal, "SOURCE_ERROR";
    /// A condition the source cannot express (an HTTP service without a parameter for it):
    /// refused, never dropped.
    FilterUnsupported => InvalidArgument, "FILTER_UNSUPPORTED";
    // --- "who looked at my data" (`Usage.FindUsage`) ----------------------------------------
    /// The caller is not a system the policy names in `usage.portals`.
    UsageNotPortal => PermissionDenied, "USAGE_NOT_PORTAL";
    /// The trail records no data subjects (the gateway has no `audit.subject_key_file`).
    UsageNotRecorded => FailedPrecondition, "USAGE_NOT_RECORDED";
    /// The trail (the province database, or the local files) could not be read now.
    UsageUnavailable => Unavailable, "USAGE_UNAVAILABLE";
    // --- the caller's side -----------------------------------------------------------------
    /// The caller's deadline (`grpc-timeout`) passed before the call finished: the record
    /// says how far it got; no rows were sent.
    DeadlineExceeded => DeadlineExceeded, "DEADLINE_EXCEEDED";
    /// The caller went away (cancelled, or its connection closed) before the call finished.
    /// Only ever in the audit trail: there is no one left to answer.
    Cancelled => Cancelled, "CANCELLED";
    // --- the gateway itself ---------------------------------------------------------------
    /// The audit trail cannot take the record, so the call is not made.
    AuditUnavailable => Unavailable, "AUDIT_UNAVAILABLE";
    /// The gateway is stopping and cut the call short.
    GatewayShuttingDown => Unavailable, "GATEWAY_SHUTTING_DOWN";
    /// A bug: details are in the gateway's log under the trace id.
    Internal => Internal, "INTERNAL";
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused or failed call: what the caller is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub reason: Reason,
    /// A sentence for the caller: what was wrong and what to do; no internals.
    pub message: String,
    /// The policy rule that decided, when there is one (grant id, `share-type:none`, ...).
    pub rule: Option<String>,
    /// For rate limits: when a retry may succeed.
    pub retry_after: Option<Duration>,
    /// A provider's own status, passed through (code and message) when the provider refused.
    pub upstream_code: Option<Code>,
    /// Which limit was hit: (subject, description) for `google.rpc.QuotaFailure`.
    pub quota: Option<(String, String)>,
}

impl Reject {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            rule: None,
            retry_after: None,
            upstream_code: None,
            quota: None,
        }
    }

    pub fn with_quota(
        mut self,
        subject: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        self.quota = Some((subject.into(), description.into()));
        self
    }

    pub fn with_rule(mut self, rule: impl Into<String>) -> Self {
        self.rule = Some(rule.into());
        self
    }

    pub fn with_retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    /// The gRPC code the caller gets.
    pub fn code(&self) -> Code {
        self.upstream_code.unwrap_or_else(|| self.reason.code())
    }

    /// The rich gRPC status: `ErrorInfo{reason, domain, metadata{rule, trace_id}}` and
    /// `RetryInfo` when there is a retry delay.
    pub fn to_status(&self, trace_id: &str) -> Status {
        let mut meta = HashMap::new();
        if let Some(rule) = &self.rule {
            meta.insert("rule".to_owned(), rule.clone());
        }
        meta.insert("trace_id".to_owned(), trace_id.to_owned());
        let mut details = ErrorDetails::new();
        details.set_error_info(self.reason.as_str(), ERROR_DOMAIN, meta);
        if let Some(d) = self.retry_after {
            details.set_retry_info(Some(d));
        }
        if let Some((subject, description)) = &self.quota {
            details.add_quota_failure_violation(subject.clone(), description.clone());
        }
        let mut status = Status::with_error_details(self.code(), self.message.clone(), details);
        if let Ok(v) = trace_id.parse() {
            status.metadata_mut().insert(crate::TRACE_ID_HEADER, v);
        }
        status
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Reject {}

#[cfg(test)]
mod tests {
    /// The README's error table is the callers' copy of this one: every reason is in it, with
    /// its code.
    #[test]
    fn the_readme_error_table_lists_every_reason_with_its_code() {
        let readme = include_str!("../README.md");
        let start = readme.find("| reason | code | when |").unwrap_or(0);
        let end = readme[start..]
            .find("\n\n")
            .map_or(readme.len(), |e| start + e);
        let table = &readme[start..end];
        for r in Reason::ALL {
            let row = table
                .lines()
                .find(|l| l.contains(&format!("`{}`", r.as_str())));
            let Some(row) = row else {
                panic!("README error table has no row for `{}`", r.as_str());
            };
            let code = crate::audit::code_name(r.code());
            // Reasons no caller receives as a status say so instead.
            let instead = [
                "(TLS alert)",
                "(connection closed)",
                "(audit only)",
                "the provider's code",
            ];
            assert!(
                row.contains(code) || instead.iter().any(|s| row.contains(s)),
                "README row for `{}` does not name {code}: {row}",
                r.as_str()
            );
        }
    }

    use super::*;

    #[test]
    fn reason_strings_are_unique_and_screaming_snake() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "duplicate {r}");
            assert!(
                r.as_str()
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_')
            );
            assert_eq!(serde_json::to_value(r).ok(), Some(r.as_str().into()));
        }
    }

    #[test]
    fn status_carries_error_info_and_retry_info() {
        let rej = Reject::new(Reason::RateLimited, "slow down")
            .with_rule("grant:g1")
            .with_retry_after(Duration::from_millis(250));
        let st = rej.to_status("abc123");
        assert_eq!(st.code(), Code::ResourceExhausted);
        let d = st.get_error_details();
        let info = d.error_info().cloned().expect("ErrorInfo");
        assert_eq!(info.reason, "RATE_LIMITED");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            info.metadata.get("rule").map(String::as_str),
            Some("grant:g1")
        );
        assert!(d.retry_info().is_some());
    }
}
