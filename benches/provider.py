#!/usr/bin/env python3
"""`xgate provider` over PostgreSQL: bulk rows/s against COPY, point-query cost against a bare
tokio-postgres client. One run, one machine; the figures that matter are the ratios.

What it sets up (all on 127.0.0.1, in a temp dir, stopped at the end):
  * a PostgreSQL 15 cluster of its own (initdb; fsync=off, as the test harness runs it), with
    `bench_people` of --rows rows (pid text primary key, name, id_number, region, score);
  * `xgate provider` (target/release/xgate) serving it as `bench.people`;
  * `xgate serve` in front, with a policy whose grant for civil-affairs masks `id_number`
    (keep first 6 / last 4) and whose rate limit is far above the load, audit in `sync` mode.

Bulk: `psql -c "COPY (SELECT pid, name, id_number, region, score FROM bench_people) TO STDOUT"`
into /dev/null (wall time) vs `xgate bench --method stream` through gateway + provider
(concurrency 1, batches of 1000, masks applied): rows/s each, their ratio (goal >= 0.5), and the
provider's and gateway's peak RSS over the run.

Point: `Query ... --where pid=<one key>` one call at a time through gateway + provider
(`xgate bench --concurrency 1`) vs examples/pg_point.rs (tokio-postgres, a prepared
statement, one call at a time): p50 each, the p50 the path adds, and CPU per call of gateway +
provider (the database's own CPU is the same for both and not counted).

Usage (from the repository root):
    python3 benches/provider.py [--rows 1000000] [--seconds 10] [--json out.json]
It builds target/release/xgate and the pg_point example first (cargo build --release).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CERTS = REPO / "certs-dev"
XGATE = REPO / "target/release/xgate"
PG_POINT = REPO / "target/release/examples/pg_point"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def pg_bindir() -> Path:
    for v in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (v / "initdb").exists():
            return v
    sys.exit("PostgreSQL not found: run `bash .ci/deps`")


class Postgres:
    def __init__(self, work: Path):
        self.bin = pg_bindir()
        self.dir = work / "pg"
        self.dir.mkdir()
        self.root = os.geteuid() == 0
        if self.root:
            shutil.chown(work, "postgres")
            shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self.run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust",
                 "--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C")
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(self.cmd("postgres", "-D", str(self.dir / "data"), "-p", str(self.port),
                                              "-c", "listen_addresses=127.0.0.1",
                                              "-c", f"unix_socket_directories={self.dir}",
                                              "-c", "fsync=off", "-c", "shared_buffers=256MB"),
                                     stdout=log, stderr=log, cwd=self.dir)
        wait_port(self.port)
        time.sleep(0.3)

    def cmd(self, prog: str, *args: str) -> list[str]:
        c = [str(self.bin / prog), *args]
        return ["runuser", "-u", "postgres", "--", *c] if self.root else c

    def run(self, prog: str, *args: str, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(self.cmd(prog, *args), capture_output=True, text=True, cwd=self.dir, **kw)
        if out.returncode != 0:
            raise RuntimeError(f"{prog}: {out.stderr}")
        return out

    def psql(self, sql: str) -> str:
        return self.run("psql", "-X", "-q", "-At", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-c", sql).stdout

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


ENTRY = """
  - id: bench.people
    title: Benchmark people
    owner: public-security
    provider: public-security
    share_type: conditional
    subject_key: pid
    region_field: region
    fields:
      - { name: pid,       type: string, sensitivity: internal }
      - { name: name,      type: string, sensitivity: personal }
      - { name: id_number, type: string, sensitivity: sensitive, mask: { keep: { first: 6, last: 4 } } }
      - { name: region,    type: string, sensitivity: internal }
      - { name: score,     type: double, sensitivity: internal }
"""

GRANT = """
  - id: bench-people
    consumer: civil-affairs
    dataset: bench.people
    fields: [pid, name, id_number, region, score]
    purposes: [benchmark]
    rate_limit: { per_second: 1000000, burst: 1000000 }
"""


def proc_peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def bench(gw_port: int, pids: list[int], *, method: str, seconds: float, page_size: int, where=None) -> dict:
    cmd = [str(XGATE), "bench", "--gateway", f"https://127.0.0.1:{gw_port}", "--as", "civil-affairs",
           "--certs", str(CERTS), "--method", method, "--dataset", "bench.people", "--purpose", "benchmark",
           "--page-size", str(page_size), "--concurrency", "1", "--connections", "1",
           "--duration", str(seconds), "--warmup", "1", "--json"]
    for w in where or []:
        cmd += ["--where", w]
    for p in pids:
        cmd += ["--pid", str(p)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds * 4 + 300)
    if out.returncode != 0:
        raise RuntimeError(f"xgate bench: {out.stderr}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--perf", type=Path, help="record the provider with perf during the stream run into this file")
    ap.add_argument("--perf-point", type=Path, help="the same during the point-query run")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--bin", "xgate", "--example", "pg_point"], cwd=REPO, check=True)
    work = Path(tempfile.mkdtemp(prefix="xgate-provider-bench-"))
    os.chmod(work, 0o755)
    procs = []
    pg = None
    try:
        pg = Postgres(work)
        t0 = time.time()
        pg.psql(f"""CREATE TABLE bench_people AS
            SELECT 'p' || lpad(i::text, 8, '0') AS pid, 'name ' || i AS name,
                   '3301' || lpad((i % 100)::text, 2, '0') || '1990' || lpad(i::text, 8, '0') AS id_number,
                   '3301' || lpad((i % 100)::text, 2, '0') AS region, i / 7.0::float8 AS score
            FROM generate_series(1, {a.rows}) AS i;
            ALTER TABLE bench_people ADD PRIMARY KEY (pid);""")
        pg.psql("VACUUM ANALYZE bench_people")
        print(f"table: {a.rows:,} rows in {time.time() - t0:.1f} s", flush=True)
        prov_port, gw_port = free_port(), free_port()
        policy = (REPO / "deploy/dev/policy.yaml").read_text()
        policy = policy.replace("https://127.0.0.1:8444", f"https://127.0.0.1:{prov_port}")
        policy = policy.replace("\ndatasets:\n", "\ndatasets:\n" + ENTRY + "\n", 1)
        policy = policy.replace("\ngrants:\n", "\ngrants:\n" + GRANT + "\n", 1)
        (work / "policy.yaml").write_text(policy)
        (work / "provider.yaml").write_text(f"""
id: public-security
listen: 127.0.0.1:{prov_port}
tls: {{ cert: {CERTS}/provider-public-security.pem, key: {CERTS}/provider-public-security.key, client_ca: {CERTS}/ca.pem }}
gateway: {{ identities: ["spiffe://zj.gov.example/gateway"] }}
catalogue: {work}/policy.yaml
limits: {{ max_page_size: 1000 }}
sources:
  db: {{ sql: {{ url: "postgres://postgres@127.0.0.1:{pg.port}/postgres", max_connections: 4 }} }}
datasets:
  - {{ id: bench.people, source: db, table: bench_people }}
log: {{ level: warn }}
""")
        (work / "xgate.yaml").write_text(f"""
listen: 127.0.0.1:{gw_port}
watch_policy: false
trust_domain: zj.gov.example
tls: {{ cert: {CERTS}/gateway.pem, key: {CERTS}/gateway.key, client_ca: {CERTS}/ca.pem, watch: false }}
jwt: {{ jwks: {CERTS}/jwks.json, issuer: "https://idp.zj.gov.example", audience: xgate }}
policy: {work}/policy.yaml
pseudonym_key_file: {CERTS}/pseudonym.key
audit: {{ dir: {work}/audit, mode: sync, signing_key_file: {CERTS}/audit-signing.key, subject_key_file: {CERTS}/audit-subject.key }}
upstream: {{ ca: {CERTS}/ca.pem, cert: {CERTS}/gateway-client.pem, key: {CERTS}/gateway-client.key, max_timeout_ms: 600000 }}
log: {{ format: text, level: warn }}
""")
        prov = subprocess.Popen([str(XGATE), "provider", "--config", str(work / "provider.yaml")], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=open(work / "provider.log", "wb"))
        procs.append(prov)
        wait_port(prov_port)
        gw = subprocess.Popen([str(XGATE), "serve", "--config", str(work / "xgate.yaml")], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=open(work / "gateway.log", "wb"))
        procs.append(gw)
        wait_port(gw_port)

        # Bulk: COPY into /dev/null, three times (the best), then the stream through both.
        copy_s = []
        for _ in range(3):
            t = time.time()
            pg.run("psql", "-X", "-q", "-h", str(pg.dir), "-p", str(pg.port), "-U", "postgres", "-o", "/dev/null", "-c",
                   "COPY (SELECT pid, name, id_number, region, score FROM bench_people) TO STDOUT")
            copy_s.append(time.time() - t)
        copy_rps = a.rows / min(copy_s)
        perf = None
        if a.perf:
            perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(prov.pid), "-o", str(a.perf),
                                     "--", "sleep", "6"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        one = bench(gw_port, [prov.pid, gw.pid], method="stream", seconds=max(a.seconds, 3 * a.rows / 200_000), page_size=1000)
        if perf:
            perf.wait()
        stream_rps = one["rows_per_second"]
        rss = {p["pid"]: p["peak_rss_kib"] for p in one["processes"]}
        # Point queries.
        key = f"p{a.rows // 2:08d}"
        perf = None
        if a.perf_point:
            perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(prov.pid), "-o", str(a.perf_point),
                                     "--", "sleep", "6"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        point = bench(gw_port, [prov.pid, gw.pid], method="query", seconds=a.seconds, page_size=5, where=[f"pid={key}"])
        if perf:
            perf.wait()
        cpu = {p["pid"]: p["cpu_us_per_request"] for p in point["processes"]}
        direct = json.loads(subprocess.run(
            [str(PG_POINT), f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres",
             'SELECT "pid", "name", "id_number", "region", "score" FROM "bench_people" WHERE 1=1 AND "pid" = $1 ORDER BY "pid" LIMIT 6',
             key, str(int(a.seconds))], capture_output=True, text=True, check=True).stdout)
        result = {
            "rows": a.rows,
            "copy_rows_per_second": copy_rps,
            "stream_rows_per_second": stream_rps,
            "stream_over_copy": stream_rps / copy_rps,
            "stream_ok": one["ok"], "stream_errors": one["errors"],
            "stream_cpu_s": {("provider" if p["pid"] == prov.pid else "gateway"): p["cpu_us"] / 1e6 for p in one["processes"]},
            "stream_seconds": one["seconds"],
            "provider_peak_rss_mib": rss.get(prov.pid, 0) / 1024,
            "gateway_peak_rss_mib": rss.get(gw.pid, 0) / 1024,
            "point_p50_ms": point["latency_us"]["p50"] / 1000, "point_p99_ms": point["latency_us"]["p99"] / 1000,
            "point_calls": point["ok"], "point_errors": point["errors"],
            "direct_p50_ms": direct["p50_ms"], "direct_p99_ms": direct["p99_ms"],
            "added_p50_ms": point["latency_us"]["p50"] / 1000 - direct["p50_ms"],
            "provider_cpu_us_per_call": cpu.get(prov.pid, 0), "gateway_cpu_us_per_call": cpu.get(gw.pid, 0),
            "direct_client_cpu_us_per_call": direct["cpu_us_per_call"],
        }
        print(json.dumps(result, indent=2))
        print(f"""
| figure | value |
|---|---|
| COPY ... TO STDOUT (psql, best of 3) | {copy_rps:,.0f} rows/s |
| QueryStream through gateway + provider (masked id_number, batches of 1000) | {stream_rps:,.0f} rows/s |
| stream / COPY | {stream_rps / copy_rps:.2f} (goal >= 0.5) |
| peak RSS over the stream run: provider / gateway | {rss.get(prov.pid, 0) / 1024:.1f} / {rss.get(gw.pid, 0) / 1024:.1f} MiB |
| point Query p50 / p99 through gateway + provider | {result['point_p50_ms']:.3f} / {result['point_p99_ms']:.3f} ms |
| point query p50 / p99, tokio-postgres direct | {direct['p50_ms']:.3f} / {direct['p99_ms']:.3f} ms |
| p50 added by gateway + provider | {result['added_p50_ms']:.3f} ms |
| CPU per call: provider / gateway (direct client) | {result['provider_cpu_us_per_call']:.0f} / {result['gateway_cpu_us_per_call']:.0f} µs ({direct['cpu_us_per_call']:.0f} µs) |
""")
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if pg:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
