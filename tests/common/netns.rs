//! A test host of its own: a network namespace joined to this one by a veth pair, so a
//! process in it can be made to vanish without a reset ([`NetHost::blackhole`]: nftables
//! drops every packet, nothing answers). Needs root, iproute2 and nftables (`.ci/deps`);
//! [`NetHost::available`] says whether this machine can. Torn down on drop (deleting the
//! namespace deletes both ends of the pair).
//!
//! (Latency is added by [`super::delay::DelayLine`], not `tc netem`: this machine's kernel
//! has no netem qdisc — `tc qdisc add … netem` says "Specified qdisc kind is unknown".)

#![allow(dead_code)]

use std::{
    net::Ipv4Addr,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

pub struct NetHost {
    pub name: String,
    /// This side's veth, in the test's own namespace.
    host_if: String,
    /// The namespace side's veth.
    ns_if: String,
    /// Our address on the pair.
    pub host_ip: Ipv4Addr,
    /// The namespace's address: where its processes listen.
    pub ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl NetHost {
    /// Whether namespaces can be made here (root, `ip` installed).
    pub fn available() -> bool {
        let probe = format!("xgp{}", std::process::id());
        let ok = ip(&["netns", "add", &probe]).is_ok();
        let _ = ip(&["netns", "del", &probe]);
        ok
    }

    /// A fresh namespace and veth pair on a /30 of 10.201.0.0/16 chosen by pid and count (so
    /// tests running at once never share one).
    pub fn new() -> NetHost {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = (pid.wrapping_mul(8).wrapping_add(n)) % 16_384;
        let base = id * 4;
        let (b2, b3) = ((base >> 8) as u8, (base & 0xff) as u8);
        let tag = format!("{:x}", (pid % 0x10000) * 16 + n % 16);
        let h = NetHost {
            name: format!("xgt-{tag}"),
            host_if: format!("xgh{tag}"),
            ns_if: format!("xgn{tag}"),
            host_ip: Ipv4Addr::new(10, 201, b2, b3 + 1),
            ip: Ipv4Addr::new(10, 201, b2, b3 + 2),
        };
        let _ = ip(&["netns", "del", &h.name]);
        let _ = ip(&["link", "del", &h.host_if]);
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), h.name.clone()],
            vec![
                "link".into(),
                "add".into(),
                h.host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                h.ns_if.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                h.ns_if.clone(),
                "netns".into(),
                h.name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{}/30", h.host_ip),
                "dev".into(),
                h.host_if.clone(),
            ],
            vec!["link".into(), "set".into(), h.host_if.clone(), "up".into()],
        ];
        for s in steps {
            let args: Vec<&str> = s.iter().map(String::as_str).collect();
            ip(&args).unwrap_or_else(|e| panic!("{e}"));
        }
        let cidr = format!("{}/30", h.ip);
        for s in [
            ["addr", "add", cidr.as_str(), "dev", h.ns_if.as_str()],
            ["link", "set", h.ns_if.as_str(), "up", ""],
            ["link", "set", "lo", "up", ""],
        ] {
            let mut args = vec!["netns", "exec", h.name.as_str(), "ip"];
            args.extend(s.iter().copied().filter(|a| !a.is_empty()));
            ip(&args).unwrap_or_else(|e| panic!("{e}"));
        }
        h
    }

    /// `program` to run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Every packet to and from the namespace dropped (nftables, inside it): its processes
    /// still run and hold their connections, but nothing they send arrives, nothing sent to
    /// them is taken, and no reset is ever sent: a host that vanished.
    pub fn blackhole(&self) {
        use std::io::Write;
        let rules = "table inet xgate_blackhole {\n\
            chain in { type filter hook input priority 0; policy drop; }\n\
            chain out { type filter hook output priority 0; policy drop; }\n\
            }\n";
        let mut nft = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nft (bash .ci/deps installs nftables)");
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("nft stdin");
        let out = nft.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
