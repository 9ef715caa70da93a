#!/usr/bin/env python3
"""xgate side by side with Envoy doing the same job, a bare pass-through floor, and direct calls.

One run, one machine, one client: every target is driven by `xgate bench` with the same
provider (the sample public-security backend, `xgate demo --providers-only`), payload
(Query hukou.person_basic, 5 rows of 8 columns), certificates (civil-affairs) and token.

Targets
  direct  the client calls the provider itself (mTLS, no proxy)
  floor   examples/floor.rs: mTLS + HTTP/2 pass-through on xgate's stack, no features
  floor-hyper  the floor with one hyper HTTP/2 connection in place of tonic's channel (no
          buffer task between the call and hyper's client): what that hop costs
  envoy   Envoy 1.40 with two workers (its default here: one per core): mTLS, jwt_authn (local JWKS, JWT cache on), RBAC on department
          identities, local_ratelimit, JSON access log, HTTP/2 mTLS upstream
          (benches/envoy/envoy.yaml.tmpl)
  envoy-2 the same Envoy (two workers) with public-security served by the same two replicas as
          `xgate-2`, with least-request balancing, health checks, outlier detection and a retry
          budget matching xgate's; reported against `envoy` (one endpoint) in the same run
  envoy-1 the same Envoy with one worker (`--concurrency 1`), the runtime shape xgate and the
          floor use on two cores; each ratio is taken against the better Envoy for that figure
  xgate   the full pipeline: mTLS, JWT, policy with field filtering and masking, rate limits,
          audit in `sync` mode (fsync before each response, group commit)
  xgate-inline  the same with the audit writer inline on the serving runtime
          (`audit.writer: inline`: less CPU, longer tails at moderate rates; docs/audit.md)
  xgate-async  the same with the audit trail in `async` mode (not in the default set: it shows
          what the fsync before each response costs)
  xgate-prealloc  `sync` mode with `audit.preallocate_bytes: 1 MiB` (the live segment
          zero-filled ahead, so each fsync flushes data only; docs/audit.md)
  xgate-tuned  `sync` mode with preallocation and `audit.group_commit_us: 1000` (calls within
          1 ms share an fsync: a latency-for-CPU trade; docs/audit.md)
  xgate-tpc  thread per core: one single-threaded `xgate` process per core (two here), sharing
          the port by `SO_REUSEPORT` (`listen_reuse_port`), each with its own runtime, audit
          writer, audit directory and provider connections; its CPU and RSS are the sum of
          both, reported against `xgate` (one runtime thread and the writer) in the same run
  xgate-2  `xgate` with public-security served by two replicas (a second set of sample
          providers): balancing, health checks and the retry budget on; its CPU per call is
          reported against `xgate`'s (one endpoint) in the same run

Each target runs open loop at --rate calls/s and closed loop at --concurrency in flight, for
--seconds each. Per target and load it prints the achieved rate, p50/p99 latency (open loop:
from each call's scheduled send time), the proxy's CPU µs per call (utime+stime from /proc over
the run) and its peak RSS. Then a bulk QueryStream case: rows/s through xgate vs direct.

Usage (from the repository root):
    python3 benches/compare.py [--seconds 10] [--rate 2000] [--concurrency 32] [--repeat 1]
                               [--targets direct,floor,envoy,envoy-1,xgate,xgate-2] [--json out.json]
With --repeat N every target runs N times, interleaved (each run rotates the order by one), and
the ratios are printed per run with their median: runs on a shared VM differ by more than some of
the margins.
With --base BIN (an earlier build of xgate, e.g. a copy of target/dist/xgate made before a
change), a target named X@base runs BIN in X's configuration, and each pair X, X@base gets a
table of this build over the base in the same runs: an A/B of a change on a noisy machine.
It builds target/dist/xgate and the floor example (cargo build --profile dist: fat LTO, as
deployed; ~10 min from scratch on 2 cores), installs Envoy
into .venv-bench (benches/envoy/install.sh) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "envoy"))
import check as envoy  # noqa: E402  (benches/envoy/check.py: render, start_envoy, stop, Providers)

CERTS = REPO / "certs-dev"
# The `dist` profile (fat LTO, one codegen unit): what a deployment runs (Cargo.toml).
XGATE = REPO / "target" / "dist" / "xgate"
# `--base BIN`: a second xgate binary (an earlier build), run as targets named `xgate@base`,
# `xgate-async@base`, ...: what a change bought, measured in the same run as the change.
BASE: Path | None = None
FLOOR = REPO / "target" / "dist" / "examples" / "floor"
# The sample providers and tokens (benches/envoy/check.py) come from the same binary.
os.environ.setdefault("XGATE_BIN", str(XGATE))
# The load generator: target/dist/xgate whatever binary the xgate targets run (`--xgate`), so
# that a change of gateway build never also changes the client.
CLIENT = XGATE
PROVIDER_TLS_NAME = "public-security.provider.xgate.internal"


def build():
    subprocess.run(["cargo", "build", "--profile", "dist", "--locked", "--bin", "xgate", "--example", "floor"],
                   cwd=REPO, check=True)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def bench(url: str, pid: int | None, *, rate=None, concurrency=None, seconds: float,
          method="query", page_size=5, server_name="localhost", as_="civil-affairs") -> dict:
    cmd = [str(CLIENT), "bench", "--gateway", url, "--as", as_, "--certs", str(CERTS),
           "--server-name", server_name, "--method", method, "--page-size", str(page_size),
           "--duration", str(seconds), "--warmup", "1", "--json"]
    if rate:
        cmd += ["--rate", str(rate)]
    else:
        cmd += ["--concurrency", str(concurrency)]
    for p in (pid if isinstance(pid, list) else [pid] if pid else []):
        cmd += ["--pid", str(p)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds * 4 + 120)
    if out.returncode != 0:
        raise RuntimeError(f"xgate bench failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def xgate_config(work: Path, port: int, policy: Path, audit_mode: str = "sync", prealloc: int = 0,
                 group_commit_us: int = 0, writer: str = "thread", instance: str = "",
                 workers: str | None = None, tag: str = "") -> Path:
    """A gateway config; `instance` (non-empty) names one of several processes sharing the port,
    `tag` the target, so that no two targets share an audit trail (one would append to, and
    recover, the other's)."""
    name = f"{tag}{audit_mode}-{prealloc}-{group_commit_us}-{writer}{instance}"
    cfg = work / f"xgate-{name}.yaml"
    workers = workers or os.environ.get("XGATE_WORKERS", "0")
    cfg.write_text(f"""
listen: 127.0.0.1:{port}{chr(10) + "listen_reuse_port: true" if instance else ""}
watch_policy: false
trust_domain: zj.gov.example
tls: {{ cert: {CERTS}/gateway.pem, key: {CERTS}/gateway.key, client_ca: {CERTS}/ca.pem, watch: false }}
jwt: {{ jwks: {CERTS}/jwks.json, issuer: "https://idp.zj.gov.example", audience: xgate }}
policy: {policy}
pseudonym_key_file: {CERTS}/pseudonym.key
audit: {{ dir: {work}/audit-{name}, mode: {audit_mode}, preallocate_bytes: {prealloc}, group_commit_us: {group_commit_us}, writer: {writer}, signing_key_file: {CERTS}/audit-signing.key, subject_key_file: {CERTS}/audit-subject.key }}
upstream: {{ ca: {CERTS}/ca.pem, cert: {CERTS}/gateway-client.pem, key: {CERTS}/gateway-client.key }}
log: {{ format: text, level: warn }}
runtime: {{ worker_threads: {workers} }}
""")
    return cfg


def policy_for_bench(work: Path, name: str = "policy.yaml") -> Path:
    """The dev policy with the providers on free ports and the benchmarked grant's rate limit
    far above the load (limits are still evaluated on every call, they just never refuse)."""
    pol = work / name
    ports = envoy.free_ports(2)
    text = (REPO / "deploy/dev/policy.yaml").read_text()
    text = text.replace("127.0.0.1:8444", f"127.0.0.1:{ports[0]}").replace("127.0.0.1:8445", f"127.0.0.1:{ports[1]}")
    text = text.replace("{ per_second: 50, burst: 100 }", "{ per_second: 1000000, burst: 1000000 }")
    pol.write_text(text)
    return pol


def two_replica_policy(work: Path, pol: Path, ps: int, ps2: int) -> Path:
    """`pol` with public-security served by two replicas (`endpoints: [ps, ps2]`)."""
    out = work / "policy-two-replicas.yaml"
    text = pol.read_text()
    one = f'endpoint: "https://127.0.0.1:{ps}"'
    assert one in text, "the policy names public-security's endpoint"
    out.write_text(text.replace(
        one, f'endpoints: ["https://127.0.0.1:{ps}", "https://127.0.0.1:{ps2}"]'))
    return out


def start_target(t: str, work: Path, pol: Path, ps: int, ps2: int | None = None):
    """Start one target; returns (process or None, url, pid, TLS server name)."""
    proc, url, name = None, None, "localhost"
    t, _, which = t.partition("@")
    binary = XGATE
    if which:
        if which != "base" or BASE is None or t not in XGATES:
            raise SystemExit(f"unknown target {t}@{which} (`@base` needs --base BIN and an xgate target)")
        binary = BASE
    port = envoy.free_ports(1)[0]
    if t == "direct":
        url, name = f"https://127.0.0.1:{ps}", PROVIDER_TLS_NAME
    elif t in ("floor", "floor-hyper"):
        # The same runtime shape as xgate's default (one worker per core less one), so
        # the ratio between them is the price of the features alone.
        # (one worker: tokio's current-thread scheduler, as xgate then uses).
        workers = int(os.environ.get("XGATE_WORKERS", "0")) or max(1, (os.cpu_count() or 2) - 1)
        shape = ["--flavor", "current-thread"] if workers == 1 else ["--workers", str(workers)]
        proc = subprocess.Popen([str(FLOOR), "--listen", f"127.0.0.1:{port}", "--upstream",
                                 f"https://127.0.0.1:{ps}", "--certs", str(CERTS)] + shape
                                + (["--client", "hyper"] if t == "floor-hyper" else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, proc)
        url = f"https://127.0.0.1:{port}"
    elif t in ENVOYS:
        # `envoy`: two workers (one per core, Envoy's default); `envoy-1`: one worker, the
        # runtime shape xgate and the floor use here. Ratios take the better of the two for
        # each figure (best against best).
        admin = envoy.free_ports(1)[0]
        cfg = envoy.render(work / f"{t}.yaml", listen_port=port, admin_port=admin,
                           upstream_port=ps, access_log=work / f"{t}-access.log")
        proc = envoy.start_envoy(envoy.envoy_bin(), cfg, admin, work / f"{t}.log",
                                 concurrency=1 if t == "envoy-1" else 2)
        url = f"https://127.0.0.1:{port}"
    elif t == "envoy-2":
        # Envoy (two workers) with the same two replicas as `xgate-2` and the resilience
        # settings that match xgate's (least-request, health checks, outlier detection, retry
        # budget): what a second upstream costs Envoy, beside what it costs xgate.
        admin = envoy.free_ports(1)[0]
        cfg = envoy.render(work / f"{t}.yaml", listen_port=port, admin_port=admin,
                           upstream_port=ps, access_log=work / f"{t}-access.log",
                           upstream_ports=[("127.0.0.1", ps), ("127.0.0.1", ps2)])
        proc = envoy.start_envoy(envoy.envoy_bin(), cfg, admin, work / f"{t}.log", concurrency=2)
        url = f"https://127.0.0.1:{port}"
    elif t == "xgate-tpc":
        cores = os.cpu_count() or 2
        proc = []
        for i in range(cores):
            cfg = xgate_config(work, port, pol, instance=f"-tpc{i}", workers="1")
            proc.append(subprocess.Popen([str(binary), "serve", "--config", str(cfg)],
                                         stdout=subprocess.DEVNULL, stderr=open(work / "xgate.log", "ab")))
            wait_port(port, proc[-1])
        url = f"https://127.0.0.1:{port}"
        return proc, url, [p.pid for p in proc], name
    elif t in XGATES:
        if t == "xgate-2":
            pol = two_replica_policy(work, pol, ps, ps2)
        cfg = xgate_config(work, port, pol, "async" if t == "xgate-async" else "sync",
                           1 << 20 if t in ("xgate-prealloc", "xgate-tuned") else 0,
                           1000 if t == "xgate-tuned" else 0,
                           "inline" if t == "xgate-inline" else "thread",
                           tag=f"{t}-{which or 'this'}-")
        proc = subprocess.Popen([str(binary), "serve", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=open(work / "xgate.log", "ab"))
        wait_port(port, proc)
        url = f"https://127.0.0.1:{port}"
    else:
        raise SystemExit(f"unknown target {t}")
    return proc, url, (proc.pid if proc else None), name


ENVOYS = ("envoy", "envoy-1")
XGATES = ("xgate", "xgate-inline", "xgate-async", "xgate-prealloc", "xgate-tuned", "xgate-2", "xgate-tpc")
# Issue 23's targets, each a ratio in one run (median over --repeat), against the better Envoy
# per figure: (load, figure, which Envoy is better, limit in `sync` mode, limit in `async` mode,
# the way the limit holds).
TARGETS = {
    "CPU per call at the fixed rate": ("open", "cpu", min, 0.8, 0.6, "le"),
    "CPU per call, closed loop": ("closed", "cpu", min, 0.7, 0.5, "le"),
    "closed-loop throughput": ("closed", "rate", max, 1.2, 1.5, "ge"),
    "p99 at the fixed rate": ("open", "p99", min, 1.0, 0.8, "le"),
    "peak RSS": ("closed", "rss", min, 0.2, 0.2, "le"),
}
FLOOR_TARGET = "features over the floor, CPU closed loop"
STREAM_TARGET = "bulk QueryStream rows/s over direct"
# Targets in `async` mode (Envoy's durability: the access log is not fsync'd).
ASYNC = {"xgate-async"}


def stop(proc) -> None:
    """Stop a target: one process, or the processes of `xgate-tpc`."""
    for p in (proc if isinstance(proc, list) else [proc]):
        envoy.stop(p)


def figure(x: dict, key: str) -> float:
    """One figure of one bench result; CPU and RSS summed over the target's processes."""
    if key == "cpu":
        return sum(p["cpu_us_per_request"] for p in x["processes"])
    if key == "rss":
        return sum(p["peak_rss_kib"] for p in x["processes"])
    if key == "p99":
        return x["latency_us"]["p99"]
    return x["rate"]


def ratios(results: dict, x: str) -> dict[str, float]:
    """xgate variant `x` against the best Envoy of the run for each figure, and the floor."""
    out = {}
    for label, (load, key, best, _, _, _) in TARGETS.items():
        ev = [figure(results[e][load], key) for e in ENVOYS if e in results]
        if ev and x in results:
            out[label] = figure(results[x][load], key) / best(ev)
    if x in results and "floor" in results:
        out[FLOOR_TARGET] = (
            figure(results[x]["closed"], "cpu") / figure(results["floor"]["closed"], "cpu"))
    if x in results and "stream" in results[x] and results.get("direct", {}).get("stream", {}).get("rows_per_second"):
        out[STREAM_TARGET] = (
            results[x]["stream"]["rows_per_second"] / results["direct"]["stream"]["rows_per_second"])
    return out


def limit(label: str, x: str) -> tuple[float, str]:
    """The limit of figure `label` for target `x` (its audit mode's), and its way."""
    a = x in ASYNC
    if label == FLOOR_TARGET:
        return (1.6 if a else 2.0), "le"
    if label == STREAM_TARGET:
        return 0.9, "ge"
    _, _, _, sync_limit, async_limit, way = TARGETS[label]
    return (async_limit if a else sync_limit), way


def met(label: str, x: str, v: float) -> bool:
    lim, way = limit(label, x)
    return v <= lim if way == "le" else v >= lim


def median(xs: list[float]) -> float:
    vs = sorted(xs)
    return vs[len(vs) // 2] if len(vs) % 2 else sum(vs[len(vs) // 2 - 1:len(vs) // 2 + 1]) / 2


def pair_table(runs: list[dict], x: str, over: str, title: str, figures) -> None:
    """Target `x` over target `over`, figure by figure, per run and the median."""
    print(f"\n### {title}\n")
    print("| figure | " + " | ".join(f"run {i}" for i in range(1, len(runs) + 1)) + " | median |")
    print("|---|" + "---|" * (len(runs) + 1))
    for load, key, label in figures:
        per = [figure(r[x][load], key) / figure(r[over][load], key) for r in runs]
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in per) + f" | {median(per):.3f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--targets", default="direct,floor,envoy,envoy-1,xgate")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every target this many times, interleaved; ratios per run and their median")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--xgate", type=Path,
                    help="the xgate binary the xgate targets run (default target/dist/xgate; e.g. "
                         "target/pgo/xgate from benches/pgo.py); the providers and the client "
                         "stay on target/dist/xgate")
    ap.add_argument("--base", type=Path,
                    help="an earlier xgate binary: targets named X@base run it (e.g. xgate,xgate@base)")
    a = ap.parse_args()
    global BASE, XGATE
    BASE = a.base
    if a.xgate:
        XGATE = a.xgate.resolve()
    if not a.no_build:
        build()
    targets = a.targets.split(",")
    work = Path(tempfile.mkdtemp(prefix="xgate-compare-"))
    pol = policy_for_bench(work)
    providers = envoy.Providers(pol, work / "providers.log")
    runs: list[dict[str, dict]] = []
    procs = []
    try:
        pports = providers.start()
        ps = pports["public-security"]
        ps2 = None
        if "xgate-2" in targets or "envoy-2" in targets:
            pol2 = policy_for_bench(work, "policy-second-replica.yaml")
            providers2 = envoy.Providers(pol2, work / "providers-2.log")
            ps2 = providers2.start()["public-security"]
            procs.append(providers2.proc)
        for rep in range(a.repeat):
            results: dict[str, dict] = {}
            # Each run starts one target further along, so no target always runs first (or
            # last) against a provider that has been busy for a while.
            k = rep % len(targets)
            for t in targets[k:] + targets[:k]:
                proc, url, pid, name = start_target(t, work, pol, ps, ps2)
                procs.append(proc)
                # The providers take calls from the gateway's certificate only (the provider
                # adapter's rule): calling one directly, the client presents that one.
                who = "gateway-client" if t == "direct" else "civil-affairs"
                r = {}
                print(f"== run {rep + 1}: {t}: open loop {a.rate:.0f}/s", file=sys.stderr, flush=True)
                r["open"] = bench(url, pid, rate=a.rate, seconds=a.seconds, server_name=name, as_=who)
                print(f"== run {rep + 1}: {t}: closed loop {a.concurrency} in flight", file=sys.stderr, flush=True)
                r["closed"] = bench(url, pid, concurrency=a.concurrency, seconds=a.seconds, server_name=name,
                                    as_=who)
                if t == "direct" or t.partition("@")[0] in XGATES:
                    print(f"== run {rep + 1}: {t}: bulk QueryStream", file=sys.stderr, flush=True)
                    r["stream"] = bench(url, pid, concurrency=4, seconds=a.seconds, method="stream",
                                        page_size=200, server_name=name, as_=who)
                results[t] = r
                stop(proc)
            runs.append({t: results[t] for t in targets})
    finally:
        for p in procs:
            stop(p)
        providers.stop()

    if a.json:
        a.json.write_text(json.dumps(runs, indent=2))

    def row(results, t, load):
        x = results[t][load]
        p = x["processes"]
        cpu = f"{figure(x, 'cpu'):.0f}" if p else "–"
        rss = f"{figure(x, 'rss') / 1024:.1f}" if p else "–"
        errs = sum(x["errors"].values())
        return (f"| {t} | {x['rate']:,.0f} | {x['latency_us']['p50'] / 1000:.2f} | "
                f"{x['latency_us']['p99'] / 1000:.2f} | {cpu} | {rss} | {errs} |")

    head = "| target | calls/s | p50 ms | p99 ms | proxy CPU µs/call | peak RSS MiB | errors |\n|---|---|---|---|---|---|---|"
    for i, results in enumerate(runs, 1):
        print(f"\n### Run {i}: open loop, {a.rate:.0f} calls/s, {a.seconds:.0f} s\n\n{head}")
        for t in results:
            print(row(results, t, "open"))
        print(f"\n### Run {i}: closed loop, {a.concurrency} in flight, {a.seconds:.0f} s\n\n{head}")
        for t in results:
            print(row(results, t, "closed"))
        if "direct" in results:
            print()
            for t in results:
                if "stream" in results[t]:
                    print(f"- bulk QueryStream, {t}: {results[t]['stream']['rows_per_second']:,.0f} rows/s")

    for x in XGATES:
        if x not in runs[0]:
            continue
        per_run = [ratios(r, x) for r in runs]
        print(f"\n### {x}: ratios (each run against the best Envoy of that run for each figure)\n")
        print("| figure | goal | " + " | ".join(f"run {i}" for i in range(1, len(runs) + 1))
              + " | median | met (median)? |")
        print("|---|---|" + "---|" * (len(runs) + 2))
        for label in per_run[0]:
            vs = [r.get(label, float("nan")) for r in per_run]
            med = median(vs)
            lim, way = limit(label, x)
            goal = f"{'≤' if way == 'le' else '≥'} {lim:g} ×"
            print(f"| {label} | {goal} | " + " | ".join(f"{v:.2f}" for v in vs)
                  + f" | {med:.2f} | {'yes' if met(label, x, med) else 'no'} |")
    figures = [("open", "cpu", f"CPU per call at {a.rate:.0f}/s"),
               ("closed", "cpu", f"CPU per call, {a.concurrency} in flight"),
               ("closed", "rate", "closed-loop throughput"),
               ("open", "p99", f"p99 at {a.rate:.0f}/s"),
               ("closed", "p99", f"p99, {a.concurrency} in flight"),
               ("closed", "rss", "peak RSS")]
    for x in XGATES:
        if x in runs[0] and f"{x}@base" in runs[0]:
            pair_table(runs, x, f"{x}@base", f"{x}: this build over the base ({BASE}), same runs", figures)
    if "xgate-tpc" in runs[0] and "xgate" in runs[0]:
        pair_table(runs, "xgate-tpc", "xgate", "xgate-tpc: a single-threaded process per core over xgate, same runs",
                   figures)
    for two, one in (("xgate-2", "xgate"), ("envoy-2", "envoy")):
        if two not in runs[0] or one not in runs[0]:
            continue
        print(f"\n### {two}: two replicas (balancing, health checks on) over {one}'s one endpoint\n")
        print("| figure | " + " | ".join(f"run {i}" for i in range(1, len(runs) + 1))
              + " | median | met (≤ 1.03 ×)? |")
        print("|---|" + "---|" * (len(runs) + 2))
        for load, label in (("open", f"CPU per call at {a.rate:.0f}/s"),
                            ("closed", f"CPU per call, {a.concurrency} in flight")):
            per = [figure(r[two][load], "cpu") / figure(r[one][load], "cpu") for r in runs]
            med = median(per)
            print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in per)
                  + f" | {med:.3f} | {'yes' if med <= 1.03 else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
