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

With --allocs it counts calls into the allocator instead (malloc, calloc, realloc,
posix_memalign, aligned_alloc: uprobes on libc, `perf stat --per-thread` inside the measured
window) and prints allocations per call for each thread; counts, unlike sampled CPU, repeat from
run to run, so a cut of a few allocations shows. --allocs --sites also records the malloc calls
with their stacks and prints the code that made them (the innermost xgate frame, else the
innermost frame outside the allocator), per call. --bin runs another xgate binary (e.g.
target/dist/xgate, or a copy of an earlier build).

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


def under_load(a, pid: int, url: str, name: str, perf: list[str]):
    """Drive the target with `xgate bench` for --seconds and run `perf` (its arguments before
    `-p`, recording for the measured window) inside the measured part only: the client warms
    up for a second, one call at a time, first. Returns the bench result and perf's run."""
    result: dict = {}

    def drive():
        try:
            result.update(compare.bench(url, pid, rate=a.rate, concurrency=a.concurrency,
                                        seconds=a.seconds, server_name=name))
        except Exception as e:  # re-raised below, after perf has stopped
            result["error"] = e

    t = threading.Thread(target=drive)
    t.start()
    time.sleep(WARMUP + MARGIN)
    window = a.seconds - 2 * MARGIN
    rec = subprocess.run(perf + ["-p", str(pid), "--", "sleep", str(window)], capture_output=True, text=True)
    t.join()
    if "error" in result:
        raise result["error"]
    return result, rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="xgate", choices=("floor",) + compare.XGATES)
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop at this many calls/s (the default: 2000)")
    load.add_argument("--concurrency", type=int, help="closed loop with this many in flight")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--top", type=int, default=25, help="categories shown per thread")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--allocs", action="store_true", help="count allocations per call instead of sampling CPU")
    ap.add_argument("--sites", action="store_true", help="with --allocs: where the mallocs come from")
    ap.add_argument("--bin", type=Path, help="the xgate binary (default: the frame-pointer build)")
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
    compare.XGATE, compare.FLOOR = a.bin or FP / "xgate", FP / "examples" / "floor"
    if a.allocs:
        return allocs(a)
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
        result, rec = under_load(a, pid, url, name,
                                 ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(HZ), "-g",
                                  "-o", str(data)])
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


ALLOCATORS = ("malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc")


def libc() -> str:
    out = subprocess.run(["ldd", str(compare.XGATE)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "libc.so" in line and "=>" in line:
            return line.split("=>")[1].split()[0]
    raise SystemExit("libc not found among the binary's libraries")


def add_probes() -> list[str]:
    lib = libc()
    events = []
    for f in ALLOCATORS:
        subprocess.run(["perf", "probe", "-q", "-d", f"probe_libc:{f}"], capture_output=True)
        r = subprocess.run(["perf", "probe", "-q", "-x", lib, f], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"perf probe on {f} failed: {r.stderr.strip()} (uprobes need root)")
        events.append(f"probe_libc:{f}")
    return events


def site(frames: list[str]) -> str:
    """The code that asked for memory: the innermost xgate frame, else the innermost frame
    that is not the allocator's own."""
    skip = ("malloc", "alloc::", "__rust", "__rdl", "<alloc::", "core::", "<core::", "[unknown]")
    for f in frames:
        if f.startswith("xgate::") or f.startswith("<xgate::"):
            return f
    for f in frames:
        if not f.startswith(skip) and "alloc" not in f:
            return f
    return frames[0] if frames else "?"


def allocs(a) -> int:
    events = add_probes()
    window = a.seconds - 2 * MARGIN
    work = Path(tempfile.mkdtemp(prefix="xgate-allocs-"))
    pol = compare.policy_for_bench(work)
    providers = compare.envoy.Providers(pol, work / "providers.log")
    proc = None
    try:
        ps = providers.start()["public-security"]
        proc, url, pid, name = compare.start_target(a.target, work, pol, ps)
        stat = work / "stat.csv"
        data = work / "allocs.data"
        cmd = (["perf", "record", "-q", "-g", "-e", "probe_libc:malloc", "-o", str(data)] if a.sites
               else ["perf", "stat", "-x", ",", "--per-thread", "-o", str(stat), "-e", ",".join(events)])
        result, r = under_load(a, pid, url, name, cmd)
        if r.returncode != 0:
            raise SystemExit(f"perf failed: {r.stderr.strip()}")
    finally:
        if proc:
            compare.envoy.stop(proc)
        providers.stop()
    calls = result["rate"] * window
    load = f"{a.rate:.0f} calls/s" if a.rate else f"{a.concurrency} in flight"
    print(f"{a.target} ({compare.XGATE}), {load}: {result['rate']:,.0f} calls/s, "
          f"errors {sum(result['errors'].values())}; {calls:,.0f} calls in the {window:.1f} s counted")
    if a.sites:
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,tid,ip,sym"],
                                capture_output=True, text=True, check=True).stdout
        per: collections.Counter = collections.Counter()
        total = 0
        for block in script.split("\n\n"):
            lines = [ln.strip() for ln in block.strip().splitlines()]
            if len(lines) < 2:
                continue
            frames = [ln.split(None, 1)[1] if " " in ln else ln for ln in lines[1:]]
            frames = [re.sub(r"\+0x[0-9a-f]+$", "", f) for f in frames]
            per[(lines[0].split()[0], site(frames))] += 1
            total += 1
        print(f"\nmalloc calls by the code that made them, per call ({total / calls:.1f} in all):")
        for (comm, where), n in per.most_common(a.top):
            print(f"  {n / calls:6.2f}  {comm}  {where[:150]}")
        return 0
    rows: dict = collections.defaultdict(collections.Counter)
    for line in stat.read_text().splitlines():
        parts = line.split(",")
        if len(parts) < 4 or not parts[1].strip().isdigit():
            continue
        thread = parts[0].rsplit("-", 1)[0]
        rows[thread][parts[3].split(":")[-1]] += int(parts[1])
    print("\n| thread | " + " | ".join(ALLOCATORS) + " | all, per call |")
    print("|---|" + "---|" * (len(ALLOCATORS) + 1))
    grand = 0
    for thread, c in sorted(rows.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(c.values())
        grand += n
        if n / calls < 0.05:
            continue
        print(f"| {thread} | " + " | ".join(f"{c[f] / calls:.2f}" for f in ALLOCATORS) + f" | **{n / calls:.1f}** |")
    print(f"\nallocations per call, every thread: **{grand / calls:.1f}**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
