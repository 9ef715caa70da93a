#!/usr/bin/env python3
"""Many idle mTLS connections (docs/benchmarks.md#idle-connections): xgate's memory with
--connections idle clients open, and a good caller's latency with them open against without.

The idle clients are Python's own TLS (with the civil-affairs certificate) and HTTP/2 preface
and SETTINGS, then silence: connections a department's pool keeps open and does not use. The
gateway is the `dist` build in its default `sync` mode, in front of the sample providers.
The good caller is `xgate bench` open loop at --rate for --seconds, before the idle
connections are opened and while they are held.

Usage (from the repository root):
    python3 benches/idle_conns.py [--connections 10000] [--rate 500] [--seconds 10] [--no-build]
                                  [--bin target/dist/xgate] [--heaptrack OUT]

--heaptrack DIR runs the gateway under heaptrack (Debian's `heaptrack`), its data in DIR, and prints
the allocation sites holding the most memory at the peak: what an idle connection holds. Its
latency figures are heaptrack's, not the gateway's.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
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
# The HTTP/2 connection preface and an empty SETTINGS frame.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def status(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


async def open_idle(port: int, n: int, held: list, parallel: int = 64) -> int:
    ctx = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
    ctx.load_cert_chain(str(CERTS / "civil-affairs.pem"), str(CERTS / "civil-affairs.key"))
    ctx.set_alpn_protocols(["h2"])
    sem = asyncio.Semaphore(parallel)
    failed = 0

    async def one():
        nonlocal failed
        async with sem:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 30)
                w.write(PREFACE)
                await w.drain()
                held.append((r, w))
            except Exception:
                failed += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return failed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin", type=Path, default=compare.XGATE, help="the gateway binary")
    ap.add_argument("--heaptrack", type=Path, help="run the gateway under heaptrack, its data in this directory")
    a = ap.parse_args()
    if not a.no_build:
        compare.build()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = a.connections + 1000
    if hard < need:
        print(f"the open-file limit ({hard}) is below {need}: raise it (prlimit) and run again", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    work = Path(tempfile.mkdtemp(prefix="xgate-idle-"))
    pol = compare.policy_for_bench(work)
    providers = envoy.Providers(pol, work / "providers.log")
    providers.start()
    port = envoy.free_ports(1)[0]
    cfg = compare.xgate_config(work, port, pol)
    wrap = ["heaptrack"] if a.heaptrack else []
    if a.heaptrack:
        a.heaptrack.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(wrap + [str(a.bin), "serve", "--config", str(cfg)], cwd=a.heaptrack,
                         stdout=subprocess.DEVNULL, stderr=open(work / "xgate.log", "wb"))
    held: list = []
    try:
        compare.wait_port(port, p, timeout=60)
        if a.heaptrack:
            # heaptrack starts the gateway as its child: the figures are the gateway's.
            child = subprocess.run(["pgrep", "-P", str(p.pid), "-f", "serve"], capture_output=True, text=True)
            gw = int(child.stdout.split()[0]) if child.stdout.split() else p.pid
        else:
            gw = p.pid
        url = f"https://127.0.0.1:{port}"
        before = compare.bench(url, gw, rate=a.rate, seconds=a.seconds)
        rss_before = status(gw, "VmRSS")
        t0 = time.monotonic()
        loop = asyncio.new_event_loop()
        failed = loop.run_until_complete(open_idle(port, a.connections, held))
        took = time.monotonic() - t0
        time.sleep(2)
        rss_idle = status(gw, "VmRSS")
        during = compare.bench(url, gw, rate=a.rate, seconds=a.seconds)
        # Still open after the run (the gateway closes none of them while they are quiet).
        rss_after = status(gw, "VmRSS")
        hwm = status(gw, "VmHWM")
        open_fds = len(list(Path(f"/proc/{gw}/fd").iterdir()))
        for _, w in held:
            w.close()
        loop.close()
    finally:
        envoy.stop(p)
        providers.stop()
    if a.heaptrack:
        trace = next(iter(sorted(a.heaptrack.glob("heaptrack.*"))), None)
        if trace:
            out = subprocess.run(["heaptrack_print", "-p", "1", "-n", "15", "-a", "1", "-T", "0",
                                  "-l", "0", "-f", str(trace)],
                                 capture_output=True, text=True)
            print(out.stdout[-12000:])
    p99 = lambda r: r["latency_us"]["p99"] / 1000  # noqa: E731
    print(f"\n### {a.connections:,} idle mTLS connections\n")
    print(f"- opened {len(held):,} ({failed} failed) in {took:.1f} s; the gateway held {open_fds:,} descriptors")
    print(f"- gateway RSS: {rss_before / 1024:.1f} MiB before, {rss_idle / 1024:.1f} MiB with them open, "
          f"{rss_after / 1024:.1f} MiB after the second run; peak {hwm / 1024:.1f} MiB "
          f"({(rss_idle - rss_before) / max(1, len(held)):.1f} KiB per idle connection)")
    print(f"- good caller at {a.rate:.0f}/s: p99 {p99(before):.2f} ms without, {p99(during):.2f} ms with them "
          f"({p99(during) / p99(before):.2f} ×); errors {sum(before['errors'].values())} / {sum(during['errors'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
