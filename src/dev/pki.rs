//! The development PKI and token mint: **for demos and tests only**.
//!
//! `xgate dev-certs --out DIR` writes a CA, the gateway's server and upstream-client
//! certificates, the sample providers' server certificates, consumer system certificates, a JWT
//! signing key and the matching JWKS. `xgate token` signs dev JWTs with that key. Production
//! certificates come from the government CA and tokens from the province's identity provider.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, date_time_ymd,
};

/// Trust domain of the dev PKI's SPIFFE identities.
pub const TRUST_DOMAIN: &str = "zj.gov.example";
/// `iss` of dev tokens.
pub const ISSUER: &str = "https://idp.zj.gov.example";
/// `aud` of dev tokens.
pub const AUDIENCE: &str = "xgate";
/// `kid` of the dev signing key.
pub const KID: &str = "dev-es256-1";

/// Consumer systems in the dev PKI: (department, system).
pub const CONSUMERS: &[(&str, &str)] = &[
    ("civil-affairs", "subsidy"),
    ("health", "his"),
    ("xihu-civil-affairs", "relief"),
    ("market-supervision", "registry-portal"),
];

/// Console officers in the dev PKI: (file stem, certificate CN). Their roles are in
/// `deploy/dev/xgate.yaml` (`console.officers`); `officer-visitor` is on no list.
pub const OFFICERS: &[(&str, &str)] = &[
    ("officer-bureau", "bureau-officer-li"),
    ("officer-bureau-2", "bureau-officer-chen"),
    ("officer-civil-affairs", "civil-affairs-admin-wang"),
    ("officer-auditor", "auditor-zhao"),
    ("officer-visitor", "visitor-sun"),
];

/// A console officer's client certificate (a person: a CN, no SPIFFE URI).
pub fn officer_leaf(cn: &str) -> Leaf {
    Leaf {
        common_name: cn.to_owned(),
        client: true,
        ..Leaf::default()
    }
}

/// Sample providers in the dev PKI.
pub const PROVIDERS: &[&str] = &["public-security", "market-supervision"];

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// What a leaf certificate is for.
#[derive(Debug, Clone, Default)]
pub struct Leaf {
    pub common_name: String,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub loopback_ip: bool,
    pub server: bool,
    pub client: bool,
    /// Validity as (not_before, not_after) years; default 2025..2045.
    pub years: Option<(i32, i32)>,
    /// Serial number (random when absent), for revocation lists.
    pub serial: Option<u64>,
    /// Valid from a minute ago for this long (instead of `years`): a certificate that expires
    /// while its connection is open.
    pub valid_for: Option<std::time::Duration>,
}

/// A certificate authority that can issue leaves.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A fresh CA with the given common name.
    pub fn generate(name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = dn(name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date_time_ymd(2025, 1, 1);
        params.not_after = date_time_ymd(2045, 1, 1);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            key_pem,
        })
    }

    /// Load a CA from its PEM certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// Load `ca.pem` + `ca.key` from a dev-certs directory.
    pub fn load_dir(dir: &Path) -> Result<Self, Error> {
        let cert = std::fs::read_to_string(dir.join("ca.pem"))?;
        let key = std::fs::read_to_string(dir.join("ca.key"))?;
        Self::load(&cert, &key)
    }

    /// Issue a leaf: returns (certificate PEM, private key PEM).
    pub fn issue(&self, leaf: &Leaf) -> Result<(String, String), Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(&leaf.common_name);
        if let Some(d) = leaf.valid_for {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::minutes(1);
            params.not_after = now + d;
        } else {
            let (from, to) = leaf.years.unwrap_or((2025, 2045));
            params.not_before = date_time_ymd(from, 1, 1);
            params.not_after = date_time_ymd(to, 1, 1);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if leaf.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if leaf.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        for u in &leaf.uris {
            params
                .subject_alt_names
                .push(SanType::URI(u.as_str().try_into()?));
        }
        for d in &leaf.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(d.as_str().try_into()?));
        }
        if leaf.loopback_ip {
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        if let Some(n) = leaf.serial {
            params.serial_number = Some(rcgen::SerialNumber::from(n));
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A CRL (PEM) revoking these serial numbers; `crl_number` must grow with each issue.
    pub fn crl(&self, revoked: &[u64], crl_number: u64) -> Result<String, Error> {
        let now = time::OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + time::Duration::days(30),
            crl_number: rcgen::SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&n| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(n),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        "xgate development PKI (NOT FOR PRODUCTION)",
    );
    dn.push(DnType::CommonName, cn);
    dn
}

/// SPIFFE URI of a consumer system.
pub fn system_uri(dept: &str, system: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/dept/{dept}/sys/{system}")
}

/// A consumer system's client certificate.
pub fn consumer_leaf(dept: &str, system: &str) -> Leaf {
    Leaf {
        common_name: format!("{dept}/{system}"),
        uris: vec![system_uri(dept, system)],
        client: true,
        ..Leaf::default()
    }
}

/// A server certificate valid for `name`, `localhost` and 127.0.0.1.
pub fn server_leaf(name: &str) -> Leaf {
    Leaf {
        common_name: name.to_owned(),
        dns: vec![name.to_owned(), "localhost".to_owned()],
        loopback_ip: true,
        server: true,
        ..Leaf::default()
    }
}

/// Write the whole dev PKI into `out`. Returns the files written.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(out)?;
    let mut written = Vec::new();
    let mut put = |name: &str, body: &str| -> Result<(), Error> {
        let p = out.join(name);
        std::fs::write(&p, body)?;
        written.push(p);
        Ok(())
    };
    let ca = DevCa::generate("xgate dev CA")?;
    put("ca.pem", &ca.cert_pem)?;
    put("ca.key", &ca.key_pem)?;

    let (c, k) = ca.issue(&server_leaf("gateway.xgate.internal"))?;
    put("gateway.pem", &c)?;
    put("gateway.key", &k)?;
    let (c, k) = ca.issue(&Leaf {
        common_name: "xgate gateway upstream client".into(),
        uris: vec![format!("spiffe://{TRUST_DOMAIN}/gateway")],
        client: true,
        ..Leaf::default()
    })?;
    put("gateway-client.pem", &c)?;
    put("gateway-client.key", &k)?;
    for p in PROVIDERS {
        let (c, k) = ca.issue(&server_leaf(&format!("{p}.provider.xgate.internal")))?;
        put(&format!("provider-{p}.pem"), &c)?;
        put(&format!("provider-{p}.key"), &k)?;
    }
    for (dept, sys) in CONSUMERS {
        let (c, k) = ca.issue(&consumer_leaf(dept, sys))?;
        put(&format!("{dept}.pem"), &c)?;
        put(&format!("{dept}.key"), &k)?;
    }

    for (stem, cn) in OFFICERS {
        let (c, k) = ca.issue(&officer_leaf(cn))?;
        put(&format!("{stem}.pem"), &c)?;
        put(&format!("{stem}.key"), &k)?;
    }

    let (audit_key, audit_pub) = audit_keypair()?;
    put("audit-signing.key", &audit_key)?;
    put("audit-signing.pub", &audit_pub)?;
    put(
        "audit-subject.key",
        &format!(
            "{:032x}{:032x}\n",
            rand::random::<u128>(),
            rand::random::<u128>()
        ),
    )?;
    put(
        "pseudonym.key",
        &format!(
            "{:032x}{:032x}\n",
            rand::random::<u128>(),
            rand::random::<u128>()
        ),
    )?;
    put(
        "page-token.key",
        &format!(
            "{:032x}{:032x}\n",
            rand::random::<u128>(),
            rand::random::<u128>()
        ),
    )?;
    let (signing_pem, jwks) = jwt_keypair(KID)?;
    put("jwt-signing.key", &signing_pem)?;
    put("jwks.json", &jwks)?;
    put(
        "README.md",
        "# DEVELOPMENT PKI — NOT FOR PRODUCTION\n\n\
         Every private key in this folder is public (it is in the repository). Use these files\n\
         only for `xgate demo`, the tests and local experiments. Regenerate with\n\
         `xgate dev-certs --out certs-dev` (tests and the demo read whatever is here).\n\n\
         | file | what |\n|---|---|\n\
         | `ca.pem`, `ca.key` | the dev CA (signs everything below) |\n\
         | `gateway.pem/.key` | gateway server certificate (localhost, 127.0.0.1) |\n\
         | `gateway-client.pem/.key` | gateway's client certificate towards providers |\n\
         | `provider-<id>.pem/.key` | sample providers' server certificates |\n\
         | `<dept>.pem/.key` | consumer system certificates, SAN URI `spiffe://zj.gov.example/dept/<dept>/sys/<system>` |\n\
         | `officer-<who>.pem/.key` | console officers' certificates (CN only; roles in `deploy/dev/xgate.yaml`; `officer-visitor` is no officer) |\n\
         | `jwt-signing.key` | ES256 key that signs dev tokens (`xgate token`) |\n\
         | `jwks.json` | the matching JWKS the gateway verifies against |\n\
         | `pseudonym.key` | the bureau's key for `hash` masks (keyed pseudonyms) |\n\
         | `page-token.key` | the gateway's key that seals page tokens (`page_token_key_file`; shared by replicas) |\n\
         | `audit-signing.key`, `audit-signing.pub` | Ed25519 key that signs audit checkpoints, and its public half for `xgate audit verify` |\n\
         | `audit-subject.key` | key of the data-subject hashes in audit records (`xgate audit search --subject`) |\n",
    )?;
    Ok(written)
}

/// A fresh ES256 key: (PKCS#8 PEM private key, JWKS JSON with the public key under `kid`).
pub fn jwt_keypair(kid: &str) -> Result<(String, String), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let raw = key.public_key_raw();
    // Uncompressed point: 0x04 || X (32) || Y (32).
    if raw.len() != 65 || raw[0] != 4 {
        return Err("unexpected EC public key encoding".into());
    }
    let jwks = serde_json::json!({
        "keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }]
    });
    Ok((key.serialize_pem(), serde_json::to_string_pretty(&jwks)?))
}

/// A fresh Ed25519 checkpoint-signing key: (PKCS#8 PEM, base64 public key).
pub fn audit_keypair() -> Result<(String, String), Error> {
    use base64::engine::general_purpose::STANDARD;
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| format!("{e}"))?;
    let pair =
        ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| format!("{e}"))?;
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(pkcs8.as_ref())
    );
    Ok((
        pem,
        format!("{}\n", STANDARD.encode(pair.public_key().as_ref())),
    ))
}

/// Sign a token with an ES256 PKCS#8 PEM key.
pub fn mint_token(key_pem: &str, kid: &str, claims: &serde_json::Value) -> Result<String, Error> {
    let key = jsonwebtoken::EncodingKey::from_ec_pem(key_pem.as_bytes())?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    Ok(jsonwebtoken::encode(&header, claims, &key)?)
}

/// Standard dev claims for a department caller valid for `ttl_secs`.
pub fn dev_claims(
    dept: &str,
    sub: &str,
    purposes: Option<&[String]>,
    ttl_secs: u64,
) -> serde_json::Value {
    let now = crate::token::now_secs();
    let mut c = serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "dept": dept,
        "iat": now, "nbf": now, "exp": now + ttl_secs,
    });
    if let (Some(p), Some(obj)) = (purposes, c.as_object_mut()) {
        obj.insert("purposes".into(), serde_json::json!(p));
    }
    c
}
