//! A client for the console (HTTPS, HTTP/1.1) with an officer's dev certificate (or none),
//! and a cookie jar of one cookie: what a browser does, without the browser.

use std::{net::SocketAddr, sync::Arc};

use super::certs;

pub struct Officer {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    pub cookie: Option<String>,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The page's CSRF token (its forms' hidden `csrf` field).
    pub fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field on the page: {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }
}

impl Officer {
    /// `stem`: a certs-dev file stem (`officer-bureau`), or `None` for no certificate.
    pub fn new(addr: SocketAddr, stem: Option<&str>) -> Officer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for c in xgate::tls::load_certs(&certs().join("ca.pem")).unwrap() {
            roots.add(c).unwrap();
        }
        let b = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut cfg = match stem {
            Some(s) => b
                .with_client_auth_cert(
                    xgate::tls::load_certs(&certs().join(format!("{s}.pem"))).unwrap(),
                    xgate::tls::load_key(&certs().join(format!("{s}.key"))).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Officer {
            addr,
            tls: Arc::new(cfg),
            cookie: None,
        }
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Resp {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("localhost:{}", self.addr.port()));
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c.as_str());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some((ty, b)) => {
                req = req.header("content-type", ty);
                axum::body::Body::from(b)
            }
            None => axum::body::Body::empty(),
        };
        let resp = sender.send_request(req.body(body).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        for (k, v) in &headers {
            if k == "set-cookie" {
                let pair = v.split(';').next().unwrap_or("").to_owned();
                self.cookie = (!pair.ends_with('=')).then_some(pair);
            }
        }
        let bytes = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), usize::MAX)
            .await
            .unwrap();
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        self.send("GET", path, &[], None).await
    }

    /// A form post (urlencoded).
    pub async fn post_form(&mut self, path: &str, fields: &[(&str, &str)]) -> Resp {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send(
            "POST",
            path,
            &[],
            Some(("application/x-www-form-urlencoded", body.into_bytes())),
        )
        .await
    }
}
