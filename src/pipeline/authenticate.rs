//! Stage `authenticate`: who is calling. The certificate's identity (per connection; its
//! revocation and expiry checked on every call), the JWT (verified, cached), the token's
//! department against the certificate's, and the RFC 8705 binding. Failures are counted per
//! source (`limits::failures`) so a token flood costs the flooder, not the gateway.

use super::*;

impl Authenticated {
    /// The caller as the policy sees it.
    pub(super) fn caller(&self) -> Caller<'_> {
        Caller {
            dept: &self.id.dept,
            system: &self.id.system,
            token_purposes: self.claims.purposes.as_deref(),
            token_bound: self.bound,
        }
    }
}

/// A caller that passed authentication.
#[derive(Clone)]
pub(super) struct Authenticated {
    pub(super) id: SystemId,
    pub(super) claims: Arc<Claims>,
    /// The token is bound to the presenting certificate (RFC 8705).
    pub(super) bound: bool,
}

impl Gateway {
    /// Stage `authenticate`: certificate identity, then the token, then their agreement.
    pub(super) async fn authenticate<T>(
        &self,
        call: &mut Call,
        req: &Request<T>,
    ) -> Result<Authenticated, Reject> {
        call.at("authenticate");
        let peer = req.extensions().get::<Peer>().ok_or_else(|| {
            // Only reachable if the server is wired without the TLS acceptor: a bug.
            tracing::error!(trace_id = %call.trace_id, "request without peer info");
            Reject::new(
                Reason::Internal,
                "internal error; quote the trace id to the operators",
            )
        })?;
        // The connection may be older than a revocation or outlive its certificate.
        if !peer.serial.is_empty() && self.inner.revocations.load().contains(&peer.serial) {
            return Err(Reject::new(
                Reason::CertRevoked,
                "your client certificate has been revoked; ask your CA for a new one",
            )
            .with_rule("tls:revocation-list"));
        }
        if peer.not_after < now_unix() {
            return Err(Reject::new(
                Reason::CertExpired,
                "your client certificate has expired; renew it",
            )
            .with_rule("tls:certificate-validity"));
        }
        let system = peer.identity.clone().map_err(|why| {
            Reject::new(Reason::CertIdentityMissing, why).with_rule("identity:certificate")
        })?;
        // One token per call: with two `authorization` headers, which one counts would be
        // up to whoever reads them.
        let mut all = req.metadata().get_all("authorization").iter();
        let header = all.next().and_then(|v| v.to_str().ok());
        if all.next().is_some() {
            return Err(Reject::new(
                Reason::TokenMalformed,
                "the call carries more than one `authorization` header; send exactly one",
            )
            .with_rule("identity:token"));
        }
        // A certificate that keeps failing is refused before any signature work.
        self.inner.auth_failures.check(&peer.fingerprint)?;
        let claims = self.inner.tokens.verify_header(header).await.map_err(|r| {
            // Failures that cost a signature check count; refusals cheaper than the count
            // itself (no token, not a JWT, a refused algorithm, an unknown key) and the
            // identity provider being unreachable (not the caller's doing) do not.
            if !matches!(
                r.reason,
                Reason::TokenMissing
                    | Reason::TokenMalformed
                    | Reason::TokenTooLarge
                    | Reason::TokenAlgorithmNotAllowed
                    | Reason::TokenKeyUnknown
                    | Reason::TokenKeysUnavailable
            ) {
                self.inner.auth_failures.failed(&peer.fingerprint);
            }
            r.with_rule("identity:token")
        })?;
        call.pending.rec().token_subject = Some(claims.sub.clone());
        if *claims.dept != *system.dept {
            return Err(Reject::new(
                Reason::TokenDeptMismatch,
                format!(
                    "the token was issued to department `{}` but the certificate belongs to `{}`",
                    claims.dept, system.dept
                ),
            )
            .with_rule("identity:token-department-binding"));
        }
        // RFC 8705: a bound token is only good with the certificate it was bound to.
        let bound = match claims.bound_thumbprint() {
            None => false,
            Some(t) if t == peer.x5t_s256 => true,
            Some(_) => {
                return Err(Reject::new(
                    Reason::TokenBindingMismatch,
                    "the token is bound to another certificate than the one presented",
                )
                .with_rule("identity:certificate-bound-token"));
            }
        };
        Ok(Authenticated {
            id: system,
            claims,
            bound,
        })
    }
}
