#!/usr/bin/env python3
"""The console's page times at province scale (docs/benchmarks.md#the-console-issue-22).

Builds a policy of --datasets datasets (over --departments departments) and --grants grants,
and an audit trail of --records call records (hash-chained segments written directly, in the
format the gateway writes, the last 7 days), starts the `dist` gateway with the console on
them, and times each page from a client on the same machine (median of --repeat requests on
one kept-alive connection, signed in as the dev bureau officer), then `xgate policy impact`
over the whole trail. Goals: every page < 200 ms; `policy impact` over 1 M records < 10 s.

Usage (from the repository root):
    python3 benches/console.py [--records 1000000] [--datasets 1000] [--grants 10000] [--no-build]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "envoy"))
sys.path.insert(0, str(HERE))
import check as envoy  # noqa: E402
import compare  # noqa: E402

CERTS = REPO / "certs-dev"
FIELDS = """      - { name: id_number,  type: string, sensitivity: sensitive, mask: { keep: { first: 6, last: 4 } } }
      - { name: name,       type: string, sensitivity: personal }
      - { name: region_code, type: string, sensitivity: internal }
      - { name: phone,      type: string, sensitivity: sensitive, mask: { keep: { first: 3, last: 4 } } }
      - { name: status,     type: string, sensitivity: public }
"""


def policy(n_depts: int, n_datasets: int, n_grants: int) -> str:
    depts = [f"dept-{i:03}" for i in range(n_depts)]
    out = ["defaults:\n  rate_limit: { per_second: 20, burst: 40 }\n", "departments:\n"]
    for d in depts:
        out.append(f"  - {{ id: {d}, name: Department {d}, level: province, region: \"330000\" }}\n")
    out.append("providers:\n")
    for d in depts:
        out.append(f"  - {{ id: {d}, endpoint: \"https://127.0.0.1:9\", tls_name: public-security.provider.xgate.internal }}\n")
    out.append("datasets:\n")
    for i in range(n_datasets):
        owner = depts[i % n_depts]
        out.append(f"  - id: ds.{i:04}\n    title: Dataset {i}\n    owner: {owner}\n    provider: {owner}\n"
                   f"    share_type: conditional\n    subject_key: id_number\n    region_field: region_code\n"
                   f"    fields:\n{FIELDS}")
    out.append("grants:\n")
    for g in range(n_grants):
        ds = g % n_datasets
        consumer = depts[(ds + 1 + g // n_datasets) % n_depts]
        out.append(f"  - {{ id: g-{g:05}, consumer: {consumer}, dataset: ds.{ds:04}, purposes: [p-{g % 7}], "
                   f"fields: [id_number, name, region_code], approval_ref: ZJ-{g:05} }}\n")
    return "".join(out)


def trail(dir: Path, n: int, n_depts: int, n_datasets: int, n_grants: int, version: str):
    """`n` chained call records over the last 7 days, in 64 MiB segments."""
    dir.mkdir(parents=True)
    rnd = random.Random(7)
    now = time.time()
    start = now - 7 * 86400
    prev = ""
    seg, size = 1, 0
    f = open(dir / f"audit-{seg:08}.jsonl", "wb")
    for seq in range(1, n + 1):
        g = rnd.randrange(n_grants)
        ds = g % n_datasets
        consumer = f"dept-{(ds + 1 + g // n_datasets) % n_depts:03}"
        t = start + (seq / n) * 7 * 86400
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03}Z"
        allow = rnd.random() < 0.9
        rec = {
            "time": ts, "trace_id": f"{seq:032x}", "method": "/xgate.v1.DataExchange/Query",
            "consumer_dept": consumer, "consumer_system": "sys", "dataset": f"ds.{ds:04}",
            "purpose": f"p-{g % 7}" if allow else "p-x", "decision": "allow" if allow else "deny",
            "rule": f"grant:g-{g:05}" if allow else None,
            "reason": None if allow else "PURPOSE_NOT_ALLOWED",
            "subjects": [f"s:{rnd.getrandbits(128):032x}"],
            "fields_requested": ["id_number", "name"], "filter": ["region_code eq 330106"],
            "fields_returned": ["id_number", "name"] if allow else [], "fields_masked": ["id_number"] if allow else [],
            "rows": 5 if allow else 0, "grpc_status": "OK" if allow else "PERMISSION_DENIED",
            "grpc_code": 0 if allow else 7, "latency_us": 1500, "policy_version": version,
        }
        body = f'{{"seq":{seq},"prev":{json.dumps(prev)},' + json.dumps(rec, separators=(",", ":"), ensure_ascii=False)[1:]
        h = hashlib.sha256(body.encode()).hexdigest()
        line = (body[:-1] + f',"hash":"{h}"}}\n').encode()
        prev = h
        if size + len(line) > 64 << 20:
            f.close()
            seg, size = seg + 1, 0
            f = open(dir / f"audit-{seg:08}.jsonl", "wb")
        f.write(line)
        size += len(line)
    f.close()


def config(work: Path, port: int, console: int, pol: Path, audit: Path) -> Path:
    cfg = work / "xgate.yaml"
    cfg.write_text(f"""
listen: 127.0.0.1:{port}
watch_policy: false
trust_domain: zj.gov.example
tls: {{ cert: {CERTS}/gateway.pem, key: {CERTS}/gateway.key, client_ca: {CERTS}/ca.pem, watch: false }}
jwt: {{ jwks: {CERTS}/jwks.json, issuer: "https://idp.zj.gov.example", audience: xgate }}
policy: {pol}
pseudonym_key_file: {CERTS}/pseudonym.key
audit: {{ dir: {audit}, signing_key_file: {CERTS}/audit-signing.key, subject_key_file: {CERTS}/audit-subject.key }}
upstream: {{ ca: {CERTS}/ca.pem, cert: {CERTS}/gateway-client.pem, key: {CERTS}/gateway-client.key }}
console:
  listen: 127.0.0.1:{console}
  officers: [{{ name: bench, subject: bureau-officer-li, role: bureau }}]
log: {{ format: text, level: info }}
""")
    return cfg


class Client:
    def __init__(self, port: int):
        ctx = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
        ctx.load_cert_chain(str(CERTS / "officer-bureau.pem"), str(CERTS / "officer-bureau.key"))
        self.c = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=600)
        self.cookie = None
        self.csrf = None

    def req(self, method: str, path: str, body: str | None = None) -> tuple[int, float, str]:
        h = {"content-type": "application/x-www-form-urlencoded"} if body else {}
        if self.cookie:
            h["cookie"] = self.cookie
        t0 = time.perf_counter()
        self.c.request(method, path, body=body, headers=h)
        r = self.c.getresponse()
        text = r.read().decode("utf-8", "replace")
        took = time.perf_counter() - t0
        if r.getheader("set-cookie"):
            self.cookie = r.getheader("set-cookie").split(";")[0]
        if 'name="csrf" value="' in text:
            self.csrf = text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        return r.status, took, text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--datasets", type=int, default=1000)
    ap.add_argument("--departments", type=int, default=50)
    ap.add_argument("--grants", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--work", type=Path,
                    help="keep the policy and trail here, and reuse them when already there (A/B runs)")
    ap.add_argument("--impact-only", action="store_true", help="time only `xgate policy impact`")
    a = ap.parse_args()
    if not a.no_build:
        compare.build()
    work = a.work or Path(tempfile.mkdtemp(prefix="xgate-console-bench-"))
    try:
        pol = work / "policy.yaml"
        if not (work / "audit").is_dir():
            work.mkdir(parents=True, exist_ok=True)
            pol.write_text(policy(a.departments, a.datasets, a.grants))
            version = "sha256:" + hashlib.sha256(pol.read_bytes()).hexdigest()[:16]
            t0 = time.monotonic()
            trail(work / "audit", a.records, a.departments, a.datasets, a.grants, version)
            print(f"== trail of {a.records:,} records written in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        tighter = pol.read_text().replace("purposes: [p-3]", "purposes: [p-33]")
        rows = []
        if not a.impact_only:
            rows = pages(a, work, pol, tighter)
        cand = work / "candidate.yaml"
        cand.write_text(tighter)
        t0 = time.monotonic()
        out = subprocess.run([str(compare.XGATE), "policy", "impact", str(cand), "--policy", str(pol), "--audit",
                              str(work / "audit"), "--since", "8d", "--format", "json"], capture_output=True, text=True)
        impact_s = time.monotonic() - t0
        replayed = json.loads(out.stdout)["replayed"] if out.returncode == 0 else out.stderr
        print(f"\n### The console at province scale\n")
        print(f"{a.datasets:,} datasets, {a.grants:,} grants, {a.records:,} records; median of {a.repeat} per page.\n")
        print("| page | server time (ms), median | the first request (ms) | goal < 200 ms |\n|---|---|---|---|")
        for name, ms, first in rows:
            print(f"| {name} | {ms:,.0f} | {first:,.0f} | {'met' if max(ms, first) < 200 else 'not met'} |")
        print(f"\n`xgate policy impact` over the whole trail: {impact_s:.1f} s ({replayed:,} calls replayed; goal < 10 s)")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def pages(a, work: Path, pol: Path, tighter: str) -> list[tuple[str, float, float]]:
    """Each page's median server time, from the gateway serving the console on the trail."""
    port, console = envoy.free_ports(2)
    p = subprocess.Popen([str(compare.XGATE), "serve", "--config", str(config(work, port, console, pol, work / "audit"))],
                         stdout=subprocess.DEVNULL, stderr=open(work / "xgate.log", "wb"))
    t_start = time.monotonic()
    compare.wait_port(console, p)
    # The console reads the trail into its index in the background from its start; the
    # pages are timed once it has (the log says when, and how long it took).
    log = work / "xgate.log"
    while "trail indexed" not in log.read_text(errors="replace"):
        assert p.poll() is None, log.read_text(errors="replace")[-2000:]
        time.sleep(0.05)
    indexed = next(l for l in log.read_text(errors="replace").splitlines() if "trail indexed" in l)
    print(f"== index ready {time.monotonic() - t_start:.1f} s after start: {indexed.strip()}", file=sys.stderr)
    c = Client(console)
    c.req("GET", "/overview")
    from urllib.parse import urlencode
    pages = [
        ("overview", "GET", "/overview", None),
        ("catalogue", "GET", "/catalogue", None),
        ("catalogue search", "GET", "/catalogue?q=ds.09", None),
        ("department", "GET", "/departments/dept-001", None),
        ("explain", "GET", "/explain?" + urlencode({"consumer": "dept-002", "system": "sys", "dataset": "ds.0001",
                                                     "purpose": "p-1"}), None),
        ("audit search, one consumer", "GET", "/audit?consumer=dept-001", None),
        ("audit search, by subject", "GET", "/audit?subject=330106199001010011", None),
        ("league table (month)", "GET", "/league", None),
        ("change preview (7 days)", "POST", "/preview", "candidate"),
    ]
    rows = []
    for name, method, path, body in pages:
        times = []
        for _ in range(a.repeat if body is None else max(1, a.repeat // 2)):
            form = urlencode({"csrf": c.csrf, "candidate": tighter, "days": "7"}) if body else None
            status, took, _ = c.req(method, path, form)
            assert status == 200, (name, status)
            times.append(took * 1000)
        rows.append((name, statistics.median(times), times[0]))
    rss = next((l.split()[1] for l in open(f"/proc/{p.pid}/status") if l.startswith("VmHWM")), "?")
    print(f"== gateway peak RSS: {int(rss) / 1024:,.0f} MiB", file=sys.stderr)
    p.terminate()
    p.wait(timeout=60)
    return rows


if __name__ == "__main__":
    sys.exit(main())
