//! The PROXY protocol (version 2, binary) from the load balancers in front of replicas: the
//! caller's own address, for `remote_addr` in audit records and logs.
//!
//! Only connections from the addresses in `tls.proxy_protocol_from` are read for it, and each
//! of those must begin with it (a connection from a load balancer without the header is
//! closed); from anyone else, a PROXY header is just bytes the TLS handshake refuses. `LOCAL`
//! (health checks of the balancer itself) keeps the balancer's address.
//!
//! Not here: version 1 (text), TLVs (read past, not used).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest address block accepted (TLVs included).
const MAX_LEN: usize = 512;

/// Read a PROXY v2 header from the start of `io`: the source address it carries (`None` for
/// `LOCAL`, or an address family without one).
pub async fn read_v2<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<Option<SocketAddr>> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let mut head = [0u8; 16];
    io.read_exact(&mut head).await?;
    if head[..12] != SIGNATURE {
        return Err(bad(
            "no PROXY v2 header from a load balancer that must send one",
        ));
    }
    let (version, command) = (head[12] >> 4, head[12] & 0x0f);
    if version != 2 || command > 1 {
        return Err(bad("not PROXY protocol version 2"));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > MAX_LEN {
        return Err(bad("PROXY v2 address block too long"));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    if command == 0 {
        return Ok(None); // LOCAL
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match head[13] >> 4 {
        // AF_INET: src 4, dst 4, src port 2, dst port 2.
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(&body[8..10]))))
        }
        // AF_INET6: src 16, dst 16, src port 2, dst port 2.
        2 if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a)),
                port(&body[32..34]),
            )))
        }
        1 | 2 => Err(bad("PROXY v2 address block too short")),
        // AF_UNSPEC, AF_UNIX: no address to take.
        _ => Ok(None),
    }
}

/// A PROXY v2 header for `src` -> `dst` (tests and tools).
pub fn header_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            h.extend(12u16.to_be_bytes());
            h.extend(s.ip().octets());
            h.extend(d.ip().octets());
            h.extend(s.port().to_be_bytes());
            h.extend(d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v) => v.to_ipv6_mapped(),
                IpAddr::V6(v) => v,
            };
            h.push(0x21);
            h.extend(36u16.to_be_bytes());
            h.extend(v6(s).octets());
            h.extend(v6(d).octets());
            h.extend(s.port().to_be_bytes());
            h.extend(d.port().to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn reads_v4_v6_local_and_refuses_the_rest() {
        let src: SocketAddr = "203.0.113.7:4242".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:8443".parse().unwrap();
        let mut h = header_v2(src, dst);
        h.extend(b"after");
        let mut r = h.as_slice();
        assert_eq!(read_v2(&mut r).await.unwrap(), Some(src));
        assert_eq!(r, b"after", "exactly the header is read");
        let src6: SocketAddr = "[2001:db8::7]:4242".parse().unwrap();
        let h = header_v2(src6, "[2001:db8::1]:8443".parse().unwrap());
        assert_eq!(read_v2(&mut h.as_slice()).await.unwrap(), Some(src6));
        let mut local = SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(read_v2(&mut local.as_slice()).await.unwrap(), None);
        for bad in [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh".to_vec(), // a TLS hello
            {
                let mut v = SIGNATURE.to_vec();
                v.extend([0x31, 0x11, 0, 12]);
                v.extend([0; 12]);
                v
            },
            {
                let mut v = SIGNATURE.to_vec();
                v.extend([0x21, 0x11, 0, 4, 1, 2, 3, 4]);
                v
            },
        ] {
            assert!(read_v2(&mut bad.as_slice()).await.is_err(), "{bad:?}");
        }
    }
}
