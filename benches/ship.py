#!/usr/bin/env python3
"""What shipping the trail to PostgreSQL costs, and how fast it goes (docs/benchmarks.md#shipping).

1. Throughput: a gateway (no shipping) is driven closed loop (--concurrency in flight) for
   --seconds: its highest sustained call rate, and a trail of that many records. The same
   trail is then shipped by a gateway started on it with `audit.ship` (a PostgreSQL of the
   script's own: initdb in a temp dir, fsync on, as shipped): records/s from start until its
   `/ready` says nothing is behind. Goal: shipping ≥ 5 × the call rate.
2. CPU per call with shipping on against off: open loop at --rate for --seconds, --repeat
   times each, interleaved; the gateway's CPU µs per call (utime+stime over the run, from
   `xgate bench --pid`). Goal: ≤ 1.05 ×.

Usage (from the repository root; needs PostgreSQL's server binaries: bash .ci/deps):
    python3 benches/ship.py [--seconds 10] [--rate 2000] [--concurrency 32] [--repeat 3] [--no-build]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "envoy"))
sys.path.insert(0, str(HERE))
import check as envoy  # noqa: E402
import compare  # noqa: E402

CERTS = REPO / "certs-dev"
XGATE = compare.XGATE
BATCH = 1000


def proc_cpu(pid: int) -> float:
    """A process's CPU seconds so far (user + system)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def pg_cpu() -> float:
    """Every postgres process's CPU seconds so far (its own and its reaped children's)."""
    total = 0.0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if open(f"/proc/{d}/comm").read().strip() != "postgres":
                continue
            f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


class Postgres:
    """A throwaway PostgreSQL on a free port (trust auth on 127.0.0.1)."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            raise SystemExit("PostgreSQL is not installed (bash .ci/deps)")
        self.bin = Path(bins[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="xgate-ship-pg-"))
        self.port = envoy.free_ports(1)[0]
        self.as_pg = os.geteuid() == 0
        if self.as_pg:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run([str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
                   "--auth=trust", "-E", "UTF8"])
        cmd = [str(self.bin / "postgres"), "-D", str(self.dir / "data"), "-p", str(self.port),
               "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1"]
        self.proc = subprocess.Popen(self._wrap(cmd), stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "server.log", "wb"))
        compare.wait_port(self.port, self.proc)
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _wrap(self, cmd):
        return ["runuser", "-u", "postgres", "--"] + cmd if self.as_pg else cmd

    def _run(self, cmd):
        subprocess.run(self._wrap(cmd), check=True, capture_output=True)

    def psql(self, sql: str) -> str:
        out = subprocess.run(self._wrap([str(self.bin / "psql"), "-X", "-At", "-h", str(self.dir),
                                         "-p", str(self.port), "-U", "postgres", "-c", sql]),
                             check=True, capture_output=True, text=True)
        return out.stdout

    def stop(self):
        envoy.stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def config(work: Path, name: str, port: int, admin: int, policy: Path, audit: Path,
           ship_url: str | None, subjects: bool = True) -> Path:
    ship = (f"\n  ship: {{ url: \"{ship_url}\", replica_id: bench, batch_records: {BATCH}, interval_ms: 200 }}"
            if ship_url else "")
    subject_key = f"\n  subject_key_file: {CERTS}/audit-subject.key" if subjects else ""
    cfg = work / f"xgate-{name}.yaml"
    cfg.write_text(f"""
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
watch_policy: false
trust_domain: zj.gov.example
tls: {{ cert: {CERTS}/gateway.pem, key: {CERTS}/gateway.key, client_ca: {CERTS}/ca.pem, watch: false }}
jwt: {{ jwks: {CERTS}/jwks.json, issuer: "https://idp.zj.gov.example", audience: xgate }}
policy: {policy}
pseudonym_key_file: {CERTS}/pseudonym.key
audit:
  dir: {audit}
  signing_key_file: {CERTS}/audit-signing.key{subject_key}{ship}
upstream: {{ ca: {CERTS}/ca.pem, cert: {CERTS}/gateway-client.pem, key: {CERTS}/gateway-client.key }}
log: {{ format: text, level: warn }}
""")
    return cfg


def start(cfg: Path, port: int, log: Path) -> subprocess.Popen:
    p = subprocess.Popen([str(XGATE), "serve", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                         stderr=open(log, "ab"))
    compare.wait_port(port, p)
    return p


def shipping(admin: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
            return json.loads(r.read()).get("audit_shipping") or {}
    except Exception as e:  # noqa: BLE001  (503 while starting, or a refused connect)
        if hasattr(e, "read"):
            return json.loads(e.read()).get("audit_shipping") or {}
        return {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--throughput-only", action="store_true",
                    help="only part 1 (call rate, shipping rate, PostgreSQL's own floor)")
    ap.add_argument("--perf", metavar="FILE",
                    help="record the gateway's profile while it ships (perf record -g -o FILE)")
    ap.add_argument("--batch", type=int, default=1000, help="audit.ship.batch_records")
    a = ap.parse_args()
    global BATCH
    BATCH = a.batch
    if not a.no_build:
        compare.build()
    work = Path(tempfile.mkdtemp(prefix="xgate-ship-"))
    pol = compare.policy_for_bench(work)
    providers = envoy.Providers(pol, work / "providers.log")
    pg = Postgres()
    procs = []
    try:
        providers.start()
        # 1. The highest sustained call rate, and a trail of it.
        port, admin = envoy.free_ports(2)
        trail = work / "trail"
        p = start(config(work, "plain", port, admin, pol, trail, None), port, work / "xgate.log")
        procs.append(p)
        print("== closed loop, no shipping", file=sys.stderr, flush=True)
        closed = compare.bench(f"https://127.0.0.1:{port}", p.pid, concurrency=a.concurrency,
                               seconds=a.seconds)
        envoy.stop(p)
        records = sum(1 for f in trail.glob("audit-*.jsonl") for line in open(f)
                      if not line.startswith('{"checkpoint"'))
        # The same trail, shipped from scratch.
        print(f"== shipping {records} records", file=sys.stderr, flush=True)
        port, admin = envoy.free_ports(2)
        t0 = time.monotonic()
        p = start(config(work, "ship", port, admin, pol, trail, pg.url), port, work / "xgate.log")
        procs.append(p)
        # From the first answer in which the shipper is connected (the gateway's start and the
        # schema behind it) to nothing behind.
        t_conn = None
        pg_cpu0 = pg_cpu()
        perf = (subprocess.Popen(["perf", "record", "-g", "-F", "999", "-p", str(p.pid), "-o", a.perf],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if a.perf else None)
        while True:
            s = shipping(admin)
            if s.get("connected") and t_conn is None:
                t_conn = time.monotonic()
            if s.get("connected") and s.get("lag_records") == 0 and s.get("shipped_seq", 0) >= records:
                break
            if time.monotonic() - t0 > 600:
                raise SystemExit(f"shipping did not catch up: {s}")
            time.sleep(0.05)
        took = time.monotonic() - t0
        took_conn = time.monotonic() - (t_conn or t0)
        ship_cpu = {"gateway": proc_cpu(p.pid), "postgres": pg_cpu() - pg_cpu0}
        if perf:
            perf.send_signal(2)
            perf.wait()
        envoy.stop(p)
        in_db = int(pg.psql("SELECT count(*) FROM xgate_audit_records").strip())
        ship_rate = records / took
        ship_rate_conn = records / took_conn
        # PostgreSQL's own floor on this machine: the same rows, the same table and indexes,
        # put in again by one INSERT … SELECT inside the server (no client, no network).
        pg.psql("CREATE TABLE bench_copy AS SELECT * FROM xgate_audit_records; "
                "TRUNCATE xgate_audit_records; CHECKPOINT;")
        t1 = time.monotonic()
        pg.psql("INSERT INTO xgate_audit_records SELECT * FROM bench_copy;")
        floor_rate = records / (time.monotonic() - t1)
        pg.psql("DROP TABLE bench_copy;")
        # 2. CPU per call, shipping on and off, interleaved.
        cpu: dict[str, list[float]] = {"off": [], "on": []}
        per_row: dict[str, list[float]] = {"on": [], "off": []}
        for rep in range(0 if a.throughput_only else a.repeat):
            for mode in (["off", "on"] if rep % 2 == 0 else ["on", "off"]):
                port, admin = envoy.free_ports(2)
                audit = work / f"audit-{mode}-{rep}"
                cfg = config(work, f"{mode}-{rep}", port, admin, pol, audit,
                             pg.url if mode == "on" else None)
                p = start(cfg, port, work / "xgate.log")
                procs.append(p)
                print(f"== run {rep + 1}: shipping {mode}: open loop {a.rate:.0f}/s", file=sys.stderr, flush=True)
                r = compare.bench(f"https://127.0.0.1:{port}", p.pid, rate=a.rate, seconds=a.seconds)
                cpu[mode].append(r["processes"][0]["cpu_us_per_request"])
                envoy.stop(p)
        # 3. What recording returned subjects costs per row: bulk QueryStream (batches of 200
        # rows), the subject key on (every returned row's subject hashed) and off.
        for rep in range(0 if a.throughput_only else a.repeat):
            for mode in (["off", "on"] if rep % 2 == 0 else ["on", "off"]):
                port, admin = envoy.free_ports(2)
                cfg = config(work, f"subj-{mode}-{rep}", port, admin, pol,
                             work / f"audit-subj-{mode}-{rep}", None, subjects=(mode == "on"))
                p = start(cfg, port, work / "xgate.log")
                procs.append(p)
                print(f"== run {rep + 1}: returned subjects {mode}: bulk QueryStream", file=sys.stderr, flush=True)
                r = compare.bench(f"https://127.0.0.1:{port}", p.pid, concurrency=4,
                                  seconds=a.seconds, method="stream", page_size=200)
                per_row[mode].append(r["processes"][0]["cpu_us"] / max(1, r["rows"]))
                envoy.stop(p)
    finally:
        for p in procs:
            envoy.stop(p)
        providers.stop()
        pg.stop()

    def median(v):
        v = sorted(v)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    print(f"\n### Shipping to PostgreSQL\n")
    print("| figure | value |\n|---|---|")
    print(f"| gateway, closed loop {a.concurrency} in flight (no shipping) | {closed['rate']:,.0f} calls/s |")
    print(f"| shipping {records:,} records from scratch (rows in the database: {in_db:,}) | {took:.1f} s: **{ship_rate:,.0f} records/s** |")
    print(f"| the same, from the shipper's connection (the gateway's start left out) | {took_conn:.1f} s: {ship_rate_conn:,.0f} records/s |")
    print(f"| CPU while shipping: gateway / PostgreSQL | {ship_cpu['gateway']:.1f} s / {ship_cpu['postgres']:.1f} s |")
    print(f"| **shipping / call rate** | **{ship_rate / closed['rate']:.1f} ×** (goal ≥ 5) |")
    print(f"| PostgreSQL alone: the same rows again by one INSERT … SELECT in the server | {floor_rate:,.0f} rows/s = {floor_rate / closed['rate']:.1f} × the call rate |")
    if a.throughput_only:
        return 0
    ratios = [on / off for on, off in zip(cpu["on"], cpu["off"])]
    print(f"| CPU µs per call at {a.rate:.0f}/s, shipping off, per run | {', '.join(f'{x:.0f}' for x in cpu['off'])} |")
    print(f"| CPU µs per call at {a.rate:.0f}/s, shipping on, per run | {', '.join(f'{x:.0f}' for x in cpu['on'])} |")
    print(f"| **on / off**, per run and median | {', '.join(f'{x:.3f}' for x in ratios)}; **{median(ratios):.3f}** (goal ≤ 1.05) |")
    print(f"| bulk QueryStream, gateway CPU µs per row, returned subjects off / on (per run) | "
          f"{', '.join(f'{x:.3f}' for x in per_row['off'])} / {', '.join(f'{x:.3f}' for x in per_row['on'])} |")
    print(f"| **returned subjects, CPU per row** (median on − median off) | "
          f"**{(median(per_row['on']) - median(per_row['off'])) * 1000:.0f} ns** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
