#!/usr/bin/env python3
"""Provider replicas under real faults: xgate against Envoy, configured to match.

Each scenario starts two fresh `xgate provider` replicas of public-security (over the demo's
SQLite database), puts a proxy in front of both, drives it with `xgate bench` at --rate calls/s
(each call with a --deadline-ms deadline) for --seconds, and applies a fault a third of the way
in:

  kill       kill -9 one replica
  blackhole  one replica runs in a network namespace of its own (ip netns + veth); nftables
             drops every packet to and from it: a host that vanished, no reset
  slow       one replica behind a delay line adding 25 ms each way (50 ms per round trip;
             this machine's kernel has no `tc netem`); from the start, no other fault
  down       kill -9 both replicas; the load starts after the kill, so every call meets it

Reported per scenario and proxy: calls OK (%), errors by code, p50/p99/max latency (from each
call's scheduled send time), and for `slow` the share of calls the slow replica served (its own
count, `xgate_source_queries_total`, read from its admin endpoint).

Proxies
  xgate  target/dist/xgate, the dev config, the policy's provider with `endpoints: [a, b]`:
         p2c over peak-EWMA, grpc.health.v1 checks every 2 s (1 s timeout, 2 down / 1 up),
         5-failure ejection, one retry within a per-try limit of half the deadline, retry
         budget 20 % + 10/s (docs/policy.md#several-endpoints)
  envoy  Envoy 1.40, two workers, the same filters as benches/compare.py, the cluster with
         both replicas and the nearest equivalent settings (benches/envoy/check.py:
         REPLICA_RESILIENCE, REPLICA_RETRY)

Needs root (namespaces, nftables) for `blackhole`; the others run anywhere.

Usage (from the repository root):
    python3 benches/faults.py [--rate 500] [--seconds 12] [--deadline-ms 2000]
                              [--scenarios kill,blackhole,slow,down] [--targets xgate,envoy]
                              [--no-build] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "envoy"))
sys.path.insert(0, str(HERE))
import check as envoy  # noqa: E402
import compare  # noqa: E402  (build, bench, xgate_config, wait_port, XGATE)

CERTS = REPO / "certs-dev"
XGATE = compare.XGATE
TLS_NAME = compare.PROVIDER_TLS_NAME


# ------------------------------------------------------------------------------------------
# Replicas
# ------------------------------------------------------------------------------------------


def seeded_db() -> Path:
    """The demo's public-security SQLite file (written by the first `xgate demo`)."""
    db = REPO / "demo-data" / "public-security.db"
    if not db.exists():
        work = Path(tempfile.mkdtemp(prefix="xgate-seed-"))
        p = envoy.Providers(compare.policy_for_bench(work), work / "providers.log")
        p.start()
        p.stop()
    return db


class Replica:
    """One `xgate provider` for public-security on `host:port` (optionally inside a netns)."""

    def __init__(self, work: Path, policy: Path, host: str, port: int, netns: str | None = None):
        self.addr = (host, port)
        self.admin = envoy.free_ports(1)[0] if netns is None else None
        cfg = work / f"provider-{host}-{port}.yaml"
        admin = f"admin_listen: 127.0.0.1:{self.admin}\n" if self.admin else ""
        cfg.write_text(f"""id: public-security
listen: {host}:{port}
{admin}tls: {{ cert: {CERTS}/provider-public-security.pem, key: {CERTS}/provider-public-security.key, client_ca: {CERTS}/ca.pem }}
gateway: {{ identities: ["spiffe://zj.gov.example/gateway"] }}
catalogue: {policy}
sources: {{ db: {{ sql: {{ url: "sqlite://{seeded_db()}", max_connections: 8 }} }} }}
datasets:
  - id: hukou.person_basic
    source: db
    table: person_basic
    key: id_number
    columns: {{ id_number: sfzh, name: xm, gender: xb, birth_date: csrq, region_code: qhdm, address: dz, household_head: hz, phone: lxdh }}
log: {{ level: warn }}
""")
        cmd = [str(XGATE), "provider", "--config", str(cfg)]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=open(work / f"provider-{host}-{port}.log", "ab"))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(self.addr, timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"replica {host}:{port} did not start")
                time.sleep(0.05)

    def calls_seen(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("xgate_source_queries_total{"))

    def kill9(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class NetHost:
    """A network namespace joined by a veth pair (10.202.0.0/30), blackholed by nftables."""

    def __init__(self):
        tag = f"{os.getpid() % 100000:x}"
        self.name, self.h, self.n = f"xgf-{tag}", f"xgfh{tag}", f"xgfn{tag}"
        self.host_ip, self.ip = "10.202.0.1", "10.202.0.2"
        run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", self.h, "type", "veth", "peer", "name", self.n)
        run("ip", "link", "set", self.n, "netns", self.name)
        run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.h)
        run("ip", "link", "set", self.h, "up")
        ns = ["ip", "netns", "exec", self.name, "ip"]
        run(*ns, "addr", "add", f"{self.ip}/30", "dev", self.n)
        run(*ns, "link", "set", self.n, "up")
        run(*ns, "link", "set", "lo", "up")

    def blackhole(self):
        rules = ("table inet xgate_blackhole {\n"
                 " chain in { type filter hook input priority 0; policy drop; }\n"
                 " chain out { type filter hook output priority 0; policy drop; }\n}\n")
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=rules.encode(),
                       check=True, capture_output=True)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.h], capture_output=True)


class DelayLine:
    """A TCP proxy on 127.0.0.1 holding each chunk `each_way` seconds in each direction."""

    def __init__(self, target: tuple[str, int], each_way: float):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.target, self.delay = target, each_way
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target)
            except OSError:
                down.close()
                continue
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for a, b in ((down, up), (up, down)):
                self._carry(a, b)

    def _carry(self, src: socket.socket, dst: socket.socket):
        import queue
        q: queue.Queue = queue.Queue()

        def reader():
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                q.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def writer():
            while True:
                at, data = q.get()
                wait = at - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=reader, daemon=True).start()
        threading.Thread(target=writer, daemon=True).start()

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------------------------------
# Proxies
# ------------------------------------------------------------------------------------------


def start_proxy(target: str, work: Path, policy_text: str, replicas: list[tuple[str, int]],
                deadline_ms: int):
    """xgate or Envoy in front of `replicas`; returns (process, url)."""
    port, admin = envoy.free_ports(2)
    if target == "xgate":
        pol = work / f"policy-{port}.yaml"
        endpoints = ", ".join(f'"https://{h}:{p}"' for h, p in replicas)
        text = policy_text.replace('endpoint: "https://127.0.0.1:PS"', f"endpoints: [{endpoints}]")
        pol.write_text(text)
        cfg = compare.xgate_config(work, port, pol)
        proc = subprocess.Popen([str(XGATE), "serve", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=open(work / "xgate.log", "ab"))
        compare.wait_port(port, proc)
    else:
        cfg = envoy.render(work / f"envoy-{port}.yaml", listen_port=port, admin_port=admin,
                           upstream_port=replicas[0][1], access_log=work / "envoy-access.log",
                           upstream_ports=replicas, deadline_ms=deadline_ms)
        proc = envoy.start_envoy(envoy.envoy_bin(), cfg, admin, work / "envoy.log", concurrency=2)
    return proc, f"https://127.0.0.1:{port}"


def bench(url: str, rate: float, seconds: float, deadline_ms: int) -> dict:
    cmd = [str(XGATE), "bench", "--gateway", url, "--as", "civil-affairs", "--certs", str(CERTS),
           "--server-name", "localhost", "--rate", str(rate), "--duration", str(seconds),
           "--warmup", "1", "--timeout-ms", str(deadline_ms), "--json"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds * 4 + 120)
    if out.returncode != 0:
        raise RuntimeError(f"xgate bench failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def scenario(name: str, target: str, a, work: Path, policy_text: str, db_policy: Path) -> dict:
    ports = envoy.free_ports(2)
    host = NetHost() if name == "blackhole" else None
    line = None
    reps: list[Replica] = []
    proc = None
    try:
        reps.append(Replica(work, db_policy, "127.0.0.1", ports[0]))
        if host:
            reps.append(Replica(work, db_policy, host.ip, ports[1], netns=host.name))
        else:
            reps.append(Replica(work, db_policy, "127.0.0.1", ports[1]))
        addrs = [r.addr for r in reps]
        if name == "slow":
            line = DelayLine(reps[1].addr, 0.025)
            addrs[1] = ("127.0.0.1", line.port)
        proc, url = start_proxy(target, work, policy_text, addrs, a.deadline_ms)
        time.sleep(3)  # both replicas checked healthy by the proxy's first health checks
        before = [r.calls_seen() if r.admin else 0.0 for r in reps]
        fault_at = 1 + a.seconds / 3  # after the bench's 1 s warm-up
        if name == "kill":
            threading.Timer(fault_at, reps[0].kill9).start()
        elif name == "blackhole":
            threading.Timer(fault_at, host.blackhole).start()
        elif name == "down":
            bench(url, 50, 1, a.deadline_ms)  # connections up and used, then gone
            for r in reps:
                r.kill9()
        r = bench(url, a.rate, a.seconds, a.deadline_ms)
        if name == "slow":
            seen = [rep.calls_seen() - b for rep, b in zip(reps, before)]
            r["slow_share"] = seen[1] / max(1.0, sum(seen))
        return r
    finally:
        if proc:
            envoy.stop(proc)
        for rep in reps:
            rep.kill9()
        if line:
            line.close()
        if host:
            host.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--deadline-ms", type=int, default=2000)
    ap.add_argument("--scenarios", default="kill,blackhole,slow,down")
    ap.add_argument("--targets", default="xgate,envoy")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        compare.build()
    work = Path(tempfile.mkdtemp(prefix="xgate-faults-"))
    # The dev policy, the benchmarked grant's rate far above the load, public-security's
    # endpoint a placeholder for the replicas.
    text = (REPO / "deploy/dev/policy.yaml").read_text()
    text = text.replace("127.0.0.1:8444", "127.0.0.1:PS").replace("127.0.0.1:8445", "127.0.0.1:9")
    text = text.replace("{ per_second: 50, burst: 100 }", "{ per_second: 1000000, burst: 1000000 }")
    catalogue = work / "catalogue.yaml"
    catalogue.write_text(text)
    results: dict[str, dict[str, dict]] = {}
    for s in a.scenarios.split(","):
        for t in a.targets.split(","):
            print(f"== {s}: {t} at {a.rate:.0f}/s for {a.seconds:.0f} s", file=sys.stderr, flush=True)
            results.setdefault(s, {})[t] = scenario(s, t, a, work, text, catalogue)

    print(f"\n### Replica faults: {a.rate:.0f} calls/s, {a.seconds:.0f} s, "
          f"{a.deadline_ms} ms deadline per call\n")
    print("| fault | proxy | calls | OK % | errors | p50 ms | p99 ms | max ms | slow replica's share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, by in results.items():
        for t, r in by.items():
            errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "–"
            share = f"{r['slow_share'] * 100:.1f} %" if "slow_share" in r else "–"
            ok = 100.0 * r["ok"] / max(1, r["requests"])
            lat = r["latency_us"]
            print(f"| {s} | {t} | {r['requests']} | {ok:.2f} | {errs} | {lat['p50'] / 1000:.2f} | "
                  f"{lat['p99'] / 1000:.2f} | {lat['max'] / 1000:.0f} | {share} |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
