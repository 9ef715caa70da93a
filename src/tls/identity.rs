//! Who is calling: the system identity in the client certificate.
//!
//! The identity is the certificate's SAN URI `spiffe://<trust-domain>/dept/<dept>/sys/<system>`.
//! It is read once per connection, right after the TLS handshake, and travels with every
//! request on that connection as a [`PeerInfo`] request extension. A certificate without such
//! a URI (or from another trust domain) completes the handshake — it chains to the CA — but
//! every call on it is refused with `CERT_IDENTITY_MISSING`, so the refusal is audited and the
//! caller learns why.

use std::{net::SocketAddr, sync::Arc};

use sha2::{Digest, Sha256};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// A department system, as named in its certificate. Shared (not copied) by every call on
/// the connection and by their audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemId {
    pub dept: Arc<str>,
    pub system: Arc<str>,
}

/// Everything known about the peer of one connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The system identity, or why the certificate has none.
    pub identity: Result<SystemId, String>,
    /// `sha256:` + hex SHA-256 of the leaf certificate (DER).
    pub fingerprint: Arc<str>,
    /// base64url SHA-256 of the leaf (DER): what RFC 8705 `cnf.x5t#S256` binds a token to.
    pub x5t_s256: String,
    /// The certificate's serial number (raw), checked against the CRLs on every call.
    pub serial: Vec<u8>,
    /// notAfter, seconds since the epoch: a connection outliving its certificate is refused.
    pub not_after: i64,
    pub remote: SocketAddr,
    /// `remote` as the audit records write it.
    pub remote_text: Arc<str>,
}

/// Per-connection peer info, shared by every request on the connection.
pub type Peer = Arc<PeerInfo>;

/// Identities for certificates that carry no SAN URI (legacy systems), by fingerprint
/// (`sha256:<hex>` of the certificate). Anything not mapped is refused.
pub type IdentityMap = std::collections::HashMap<String, SystemId>;

/// Parse `spiffe://<td>/dept/<dept>/sys/<system>` for the expected trust domain.
pub fn parse_spiffe(uri: &str, trust_domain: &str) -> Option<SystemId> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    if !td.eq_ignore_ascii_case(trust_domain) {
        return None;
    }
    let mut it = path.split('/');
    match (it.next(), it.next(), it.next(), it.next(), it.next()) {
        (Some("dept"), Some(d), Some("sys"), Some(s), None)
            if valid_segment(d) && valid_segment(s) =>
        {
            Some(SystemId {
                dept: d.into(),
                system: s.into(),
            })
        }
        _ => None,
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Read the identity and fingerprint from a leaf certificate (DER): the SAN URI, else the
/// configured fingerprint mapping, else none.
pub fn peer_info(
    leaf_der: &[u8],
    trust_domain: &str,
    map: &IdentityMap,
    remote: SocketAddr,
) -> PeerInfo {
    let fingerprint = format!("sha256:{}", hex::encode(Sha256::digest(leaf_der)));
    let identity = identity_of(leaf_der, trust_domain)
        .or_else(|why| map.get(&fingerprint).cloned().ok_or(why));
    let fingerprint = fingerprint.into();
    let (serial, not_after) = x509_parser::certificate::X509Certificate::from_der(leaf_der)
        .map(|(_, c)| (c.raw_serial().to_vec(), c.validity().not_after.timestamp()))
        .unwrap_or((Vec::new(), 0));
    PeerInfo {
        identity,
        fingerprint,
        x5t_s256: crate::token::x5t_s256(leaf_der),
        serial,
        not_after,
        remote,
        remote_text: remote.to_string().into(),
    }
}

fn identity_of(der: &[u8], trust_domain: &str) -> Result<SystemId, String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|_| "the client certificate cannot be parsed".to_owned())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| "the client certificate has a malformed subjectAltName".to_owned())?;
    let mut uris = san
        .into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
    uris.find_map(|u| parse_spiffe(u, trust_domain)).ok_or_else(|| {
        format!(
            "the client certificate carries no SAN URI spiffe://{trust_domain}/dept/<dept>/sys/<system>; ask your CA for a system certificate"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_uris() {
        let td = "zj.gov.example";
        assert_eq!(
            parse_spiffe("spiffe://zj.gov.example/dept/health/sys/his", td),
            Some(SystemId {
                dept: "health".into(),
                system: "his".into()
            })
        );
        for bad in [
            "spiffe://other.example/dept/health/sys/his",
            "spiffe://zj.gov.example/dept/health",
            "spiffe://zj.gov.example/dept/health/sys/his/extra",
            "spiffe://zj.gov.example/dept//sys/his",
            "spiffe://zj.gov.example/dept/he alth/sys/his",
            "https://zj.gov.example/dept/health/sys/his",
            "spiffe://zj.gov.example/sys/his/dept/health",
        ] {
            assert_eq!(parse_spiffe(bad, td), None, "{bad}");
        }
    }
}
