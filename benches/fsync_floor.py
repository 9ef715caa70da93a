#!/usr/bin/env python3
"""The durable record against its physical limit (docs/benchmarks.md#the-durable-record-and-its-floor).

1. The floor: `examples/fsync_floor.rs` appends audit-record-sized lines (--bytes, 700 by
   default: a Query record's size) durably, in batches of 1..32 (the group commit's sizes),
   four ways: write + fdatasync (what xgate does), the same into a preallocated zero-filled
   file, O_DSYNC writes, and pwritev2(RWF_DSYNC). CPU per record and records/s for each.
2. xgate: the real gateway (`dist` build) in `sync` and then `async` mode, the same load
   (closed loop, --concurrency in flight, and open loop at --rate), CPU per call from
   `xgate bench`; its group commit's mean batch from `xgate_audit_batch_records`. What
   `sync` costs over `async` per call is set beside the floor's CPU per record at that
   batch size (goal: ≤ 1.3 ×).

3. --variants: the same `sync` − `async` pair for other writer shapes, each against its own
   floor: `thread` (the default: the writer on a thread of its own), `inline` (the writer a
   task of the serving runtime: no hop to another thread and back), `prealloc` (the live
   segment zero-filled ahead, against the preallocated floor), `linger` (`group_commit_us:
   1000`: larger batches under load, for up to 1 ms more latency).

Usage (from the repository root):
    python3 benches/fsync_floor.py [--seconds 10] [--concurrency 32] [--rate 2000] [--no-build]
                                   [--dir DIR]   (the disk to measure: the audit dir's)
                                   [--variants thread,inline,prealloc,linger] [--skip-floor] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
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

FLOOR = REPO / "target" / "dist" / "examples" / "fsync_floor"
WAYS = ["fdatasync", "prealloc", "dsync", "rwf-dsync"]
BATCHES = [1, 2, 4, 8, 16, 32]


def floor(way: str, batch: int, records: int, bytes_: int, dir: Path) -> dict:
    out = subprocess.run([str(FLOOR), "--way", way, "--batch", str(batch), "--records", str(records),
                          "--bytes", str(bytes_), "--dir", str(dir)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# variant -> (xgate_config's preallocate_bytes, group_commit_us, writer; the floor's way)
VARIANTS = {
    "thread": (0, 0, "thread", "fdatasync"),
    "inline": (0, 0, "inline", "fdatasync"),
    "prealloc": (1 << 20, 0, "thread", "prealloc"),
    "linger": (0, 1000, "thread", "fdatasync"),
}


def gateway(work: Path, pol: Path, mode: str, seconds: float, concurrency: int, rate: float,
            variant: str = "thread") -> dict:
    port, admin = envoy.free_ports(2)
    prealloc, linger, writer, _ = VARIANTS[variant]
    cfg = compare.xgate_config(work, port, pol, audit_mode=mode, prealloc=prealloc,
                               group_commit_us=linger, writer=writer)
    cfg.write_text(cfg.read_text() + f"admin_listen: 127.0.0.1:{admin}\n")
    p = subprocess.Popen([str(compare.XGATE), "serve", "--config", str(cfg)],
                         stdout=subprocess.DEVNULL, stderr=open(work / f"xgate-{mode}-{variant}.log", "wb"))
    try:
        compare.wait_port(port, p)
        compare.wait_port(admin, p)  # (bound after the gRPC port)
        url = f"https://127.0.0.1:{port}"
        out = {}
        for load, kw in (("closed", {"concurrency": concurrency}), ("open", {"rate": rate})):
            s0, c0 = metric(admin, "xgate_audit_batch_records_sum"), metric(admin, "xgate_audit_batch_records_count")
            r = compare.bench(url, p.pid, seconds=seconds, **kw)
            s1, c1 = metric(admin, "xgate_audit_batch_records_sum"), metric(admin, "xgate_audit_batch_records_count")
            out[load] = {"cpu": r["processes"][0]["cpu_us_per_request"], "rate": r["rate"],
                         "batch": (s1 - s0) / max(1.0, c1 - c0)}
        return out
    finally:
        envoy.stop(p)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--records", type=int, default=20_000, help="records per floor run")
    ap.add_argument("--bytes", type=int, default=700)
    ap.add_argument("--dir", type=Path, help="where the floor writes (default: a temporary directory)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--floor-only", action="store_true")
    ap.add_argument("--skip-floor", action="store_true", help="no floor table (the ratios still measure their floor)")
    ap.add_argument("--variants", default="thread", help=f"writer shapes to measure: {','.join(VARIANTS)}")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each sync/async pair this many times, interleaved; the medians are reported")
    a = ap.parse_args()
    variants = a.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v}: one of {', '.join(VARIANTS)}")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--profile", "dist", "--locked", "--bin", "xgate",
                        "--example", "fsync_floor"], cwd=REPO, check=True)
    work = Path(tempfile.mkdtemp(prefix="xgate-fsync-"))
    fdir = a.dir or work
    print(f"### The fsync floor: {a.records:,} records of {a.bytes} bytes per run\n")
    print("| way | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    table = {}
    for way in [] if a.skip_floor else WAYS:
        cells = []
        for b in BATCHES:
            r = floor(way, b, a.records, a.bytes, fdir)
            table[(way, b)] = r
            cells.append(f"{r['cpu_us_per_record']:.1f} µs, {r['records_per_s']:,.0f}/s")
        print(f"| {way} | " + " | ".join(cells) + " |", flush=True)
    print("\n(CPU per record, and records/s)")
    if a.floor_only:
        return 0
    pol = compare.policy_for_bench(work)
    providers = envoy.Providers(pol, work / "providers.log")
    try:
        providers.start()
        runs = {(v, m, r): gateway(work, pol, m, a.seconds, a.concurrency, a.rate, v)
                for r in range(a.repeat) for v in variants for m in ("sync", "async")}
    finally:
        providers.stop()
    print("\n### xgate `sync` over `async`, against the floor at the same batch size\n")
    if a.repeat > 1:
        print(f"(medians of {a.repeat} interleaved runs; `sync` − `async` is the median of each run's difference)\n")
    print("| writer | load | CPU/call sync | CPU/call async | sync − async | mean batch | floor CPU/record at that batch | ratio (goal ≤ 1.3) |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        way = VARIANTS[v][3]
        for load in ("closed", "open"):
            pairs = [(runs[(v, "sync", r)][load], runs[(v, "async", r)][load]) for r in range(a.repeat)]
            sync = compare.median([s["cpu"] for s, _ in pairs])
            async_ = compare.median([x["cpu"] for _, x in pairs])
            extra = compare.median([s["cpu"] - x["cpu"] for s, x in pairs])
            batch = compare.median([s["batch"] for s, _ in pairs])
            f = floor(way, max(1, round(batch)), a.records, a.bytes, fdir)["cpu_us_per_record"]
            print(f"| {v} | {load} | {sync:.1f} | {async_:.1f} | {extra:.1f} | {batch:.1f} | {f:.1f} ({way}) "
                  f"| {extra / f:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
