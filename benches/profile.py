#!/usr/bin/env python3
"""Where a proxied call's CPU goes: a `perf` profile of xgate (or the floor) under a fixed load,
summed by library and by system call, in µs per call, and a flame graph.

    python3 benches/profile.py [--target xgate] [--rate 2000 | --concurrency 32] [--seconds 6]

It builds a frame-pointer release build into target/fp (`-C force-frame-pointers=yes`, so
`perf record -g` can walk the stacks; ~6 min from scratch on 2 cores), starts the sample
providers and the target exactly as benches/compare.py does (same policy, certificates,
configuration variants: xgate, xgate-inline, xgate-async, xgate-prealloc, xgate-tuned, floor),
drives it with `xgate bench`, and records the target's threads with
`perf record -e cpu-clock -F 2000 -g` inside the client's measured window. It prints, for each
thread name, the CPU per call by category (the first frame of the stack that belongs to a known library or system call),
and writes perf.data, the folded stacks and (when `inferno-flamegraph` is on PATH: `cargo install
inferno`) a flame graph SVG into the work directory it names.

Needs `perf` (Debian: `apt-get install linux-perf`) and permission to profile another process
(root, or kernel.perf_event_paranoid <= 1). Sampled µs/call are estimates: compare categories
within one profile, and whole-process figures with compare.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402  (the same providers, policy, targets and client)

FP = compare.REPO / "target" / "fp" / "release"
HZ = 2000
WARMUP = 1.0  # compare.bench's --warmup
MARGIN = 0.3

# First match along the stack, leaf first, wins: the more specific patterns come first.
CATEGORIES = [
    "xgate::audit", "xgate::token", "xgate::policy", "xgate::wire", "xgate::ratelimit",
    "xgate::gateway", "xgate::edge", "xgate::", "governor", "metrics_exporter", "metrics::",
    "tracing", "prost", "tonic::codec", "tonic", "h2::hpack", "h2::", "rustls", "ring::", "ring_core_",
    "hyper_util", "hyper::", "tower", "http::header", "http::", "tokio", "sha2", "serde",
    "core::fmt", "alloc::fmt", "malloc", "free", "memmove", "memcpy", "memcmp", "bytes::",
]


def build():
    env = dict(os.environ, RUSTFLAGS="-C force-frame-pointers=yes")
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "xgate", "--example", "floor",
                    "--target-dir", "target/fp"], cwd=compare.REPO, env=env, check=True)


# Kernel time by what it was doing, for stacks whose system call frame is inlined away.
KERNEL = [
    ("fdatasync", "kernel: fdatasync"), ("ext4_sync_file", "kernel: fdatasync"),
    ("futex", "kernel: futex (thread wake-ups)"), ("ep_poll", "kernel: epoll_wait"),
    ("tcp_recvmsg", "kernel: socket receive"), ("sock_recvmsg", "kernel: socket receive"),
    ("sock_write_iter", "kernel: socket send"), ("tcp_sendmsg", "kernel: socket send"),
    ("do_writev", "kernel: socket send"), ("pwrite", "kernel: pwrite"),
    ("net_rx_action", "kernel: loopback delivery (softirq)"),
    ("handle_softirqs", "kernel: loopback delivery (softirq)"),
    ("tcp_v4_rcv", "kernel: loopback delivery (softirq)"),
    ("finish_task_switch", "kernel: context switch"), ("schedule", "kernel: context switch"),
]


def category(frames: list[str]) -> str:
    joined = " | ".join(frames)
    if "entry_SYSCALL" in joined or frames[0].startswith("asm_") or "irq" in frames[0]:
        m = re.search(r"__x64_sys_(\w+)", joined)
        if m:
            return "syscall " + m.group(1)
        return next((name for key, name in KERNEL if key in joined), "kernel: other")
    for f in frames:
        for p in CATEGORIES:
            if p in f:
                return p
    return "other: " + frames[0][:50]


def samples(script: str):
    """(thread name, CPU ns, frames leaf first) per sample of `perf script -F comm,tid,period,ip,sym`."""
    for block in script.split("\n\n"):
        lines = [x for x in block.strip().split("\n") if x.strip()]
        if len(lines) < 2:
            continue
        head = lines[0].split()
        frames = []
        for x in lines[1:]:
            x = re.sub(r"^[0-9a-f]+ ", "", x.strip()).rsplit(" (", 1)[0]
            frames.append(re.sub(r"\+0x[0-9a-f]+$", "", x))
        yield head[0], int(head[-1]), frames


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="xgate", choices=("floor",) + compare.XGATES)
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop at this many calls/s (the default: 2000)")
    load.add_argument("--concurrency", type=int, help="closed loop with this many in flight")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--top", type=int, default=25, help="categories shown per thread")
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf not found: install it (Debian: apt-get install linux-perf)")
    if a.rate is None and a.concurrency is None:
        a.rate = 2000.0
    if (a.rate is not None and a.rate <= 0) or (a.concurrency is not None and a.concurrency <= 0) \
            or a.seconds < 2:
        raise SystemExit("--rate/--concurrency must be positive and --seconds at least 2")
    if not a.no_build:
        build()
    # The frame-pointer binaries stand in for the dist ones; everything else is compare.py's.
    compare.XGATE, compare.FLOOR = FP / "xgate", FP / "examples" / "floor"
    os.environ["XGATE_BIN"] = str(compare.XGATE)
    window = a.seconds - 2 * MARGIN
    work = Path(tempfile.mkdtemp(prefix="xgate-profile-"))
    pol = compare.policy_for_bench(work)
    providers = compare.envoy.Providers(pol, work / "providers.log")
    proc = None
    try:
        ps = providers.start()["public-security"]
        proc, url, pid, name = compare.start_target(a.target, work, pol, ps)
        data = work / "perf.data"
        result: dict = {}

        def drive():
            try:
                result.update(compare.bench(url, pid, rate=a.rate, concurrency=a.concurrency,
                                            seconds=a.seconds, server_name=name))
            except Exception as e:  # re-raised below, after perf has stopped
                result["error"] = e

        t = threading.Thread(target=drive)
        t.start()
        # The client warms up for a second (one call at a time) and then measures for
        # --seconds; perf records inside the measured part only.
        time.sleep(WARMUP + MARGIN)
        rec = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(HZ), "-g", "-p", str(pid),
                              "-o", str(data), "--", "sleep", str(window)], capture_output=True, text=True)
        t.join()
        if "error" in result:
            raise result["error"]
        if rec.returncode != 0 or not data.exists():
            raise SystemExit(f"perf record failed ({rec.returncode}): {rec.stderr.strip()}\n"
                             "(profiling another process needs root or kernel.perf_event_paranoid <= 1)")
    finally:
        if proc:
            compare.envoy.stop(proc)
        providers.stop()
    # Calls in the recorded window, at the rate the client measured over its whole run.
    calls = result["rate"] * window
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,tid,period,ip,sym"],
                            capture_output=True, text=True, check=True).stdout
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for comm, ns, frames in samples(script):
        per_thread[comm][category(frames)] += ns
    load = f"{a.rate:.0f} calls/s" if a.rate else f"{a.concurrency} in flight"
    print(f"{a.target}, {load}, {a.seconds:.0f} s: {result['rate']:,.0f} calls/s, "
          f"p50 {result['latency_us']['p50'] / 1000:.2f} ms, p99 {result['latency_us']['p99'] / 1000:.2f} ms")
    to_us = 1e-3 / calls
    print(f"(recorded {window:.1f} s of the measured {a.seconds:.0f} s; threads of one name summed)")
    for comm, c in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"\nthreads {comm}: {sum(c.values()) * to_us:.0f} µs/call sampled")
        for k, v in c.most_common(a.top):
            print(f"  {v * to_us:7.1f}  {k}")
    folded = work / "stacks.folded"
    collapse, flame = shutil.which("inferno-collapse-perf"), shutil.which("inferno-flamegraph")
    if collapse and flame:
        raw = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, check=True).stdout
        folded.write_bytes(subprocess.run([collapse], input=raw, capture_output=True, check=True).stdout)
        svg = work / "flamegraph.svg"
        svg.write_bytes(subprocess.run([flame, "--minwidth", "1.5", str(folded)],
                                       capture_output=True, check=True).stdout)
        print(f"\nflame graph: {svg}")
    print(f"perf.data: {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
