#!/usr/bin/env python3
"""Build xgate with profile-guided optimisation, trained on the bench's own workload.

Why: nine tenths of the gateway's peak RSS is its own binary's pages (docs/benchmarks.md,
"Where it ends"), and the kernel maps them around whatever code runs, wherever it lies: the
request path's functions are spread over 17.6 MB of `.text` among the console's, the SQL
drivers' and the CLI's. With a profile, LLVM knows which functions ran and which never did;
it puts the ones that never ran in `.text.unlikely.*` sections and the hot ones in
`.text.hot.*`, and the linker (`-z keep-text-section-prefix`) keeps each kind together. The
serving process then touches the hot and the start-up code and leaves the rest of the file
unmapped. The same profile also lets LLVM inline and lay out branches by what ran.

Steps (from the repository root; each build is the `dist` profile, ~10 min on 2 cores):
  1. an instrumented build (`-Cprofile-generate`) into target/pgo-gen/ (`--target` the host, so
     that build scripts and proc macros are left as they are);
  2. training: the sample providers (from target/dist/xgate, not instrumented) and the
     instrumented gateway in `sync` and then `async` mode, each driven by `xgate bench` as
     benches/compare.py drives it (open loop at --rate, closed loop at 32 in flight, a bulk
     QueryStream), plus list/describe and refused calls (an unknown dataset, no token), so
     that refusals are not laid out as never-run code;
  3. `llvm-profdata merge` (the toolchain's own, `rustup component add llvm-tools`), and from
     the profile a `--symbol-ordering-file` of every function that ran, busiest first, so that
     the linker lays the code the gateway runs (start-up included) out in one run of pages;
  4. the optimised build (`-Cprofile-use`, `-z keep-text-section-prefix`, the ordering, and
     `-z pack-relative-relocs`: the relocations as a DT_RELR bitmap, which needs glibc 2.36 or
     later where the binary runs; `--no-relr` leaves them as they are) into target/pgo/:
     target/pgo/xgate (a copy of target/pgo/<host>/dist/xgate).

Usage:
    python3 benches/pgo.py [--seconds 6] [--rate 2000] [--skip-gen-build] [--no-relr]
Then: python3 benches/compare.py --no-build --xgate target/pgo/xgate --base target/dist/xgate ...

The profile is of this checkout's code; a profile from other code is ignored function by
function (rustc warns), never wrong, only less useful. Nothing here is needed to build or test
xgate: it is a deployment recipe (deploy/README.md) and a bench.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402  (the targets' configs, the bench driver)

GEN_DIR = REPO / "target" / "pgo-gen"
USE_DIR = REPO / "target" / "pgo"
PROFILES = REPO / "target" / "pgo-profiles"


@functools.cache
def host() -> str:
    return next(line.split()[1] for line in subprocess.run(
        ["rustc", "-vV"], capture_output=True, text=True, check=True).stdout.splitlines()
        if line.startswith("host:"))


def cargo_dist(target_dir: Path, rustflags: str) -> Path:
    """A `dist` build with `rustflags` on xgate and every crate it links. `--target` named
    explicitly keeps the flags off build scripts and proc macros (which would otherwise be
    instrumented too, and write profiles of the build itself)."""
    env = dict(os.environ)
    env["RUSTFLAGS"] = (env.get("RUSTFLAGS", "") + " " + rustflags).strip()
    subprocess.run(["cargo", "build", "--profile", "dist", "--locked", "--bin", "xgate",
                    "--target", host(), "--target-dir", str(target_dir)], cwd=REPO, env=env, check=True)
    return target_dir / host() / "dist" / "xgate"


def llvm_profdata() -> Path:
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True,
                             check=True).stdout.strip()
    tool = Path(sysroot) / "lib" / "rustlib" / host() / "bin" / "llvm-profdata"
    if not tool.exists():
        subprocess.run(["rustup", "component", "add", "llvm-tools"], check=True)
    return tool


def train(gen: Path, seconds: float, rate: float) -> None:
    """Run the instrumented gateway through the bench's workload, as compare.py's `xgate` and
    `xgate-async` targets; each process writes a .profraw into PROFILES when it exits (SIGTERM:
    the gateway drains and returns from main). The providers and the client stay on the plain
    build (compare.py binds them at import), and ignore LLVM_PROFILE_FILE."""
    if not compare.XGATE.exists():
        # The sample providers and the bench client run from the plain `dist` build.
        compare.build()
    compare.XGATE = gen
    os.environ["LLVM_PROFILE_FILE"] = str(PROFILES / "xgate-%p-%m.profraw")
    work = Path(tempfile.mkdtemp(prefix="xgate-pgo-"))
    pol = compare.policy_for_bench(work)
    providers = compare.envoy.Providers(pol, work / "providers.log")
    try:
        ps = providers.start()["public-security"]
        for target in ("xgate", "xgate-async"):
            proc, url, pid, _ = compare.start_target(target, work, pol, ps)
            try:
                print(f"== pgo: {target}: open loop, closed loop, stream, other calls", file=sys.stderr, flush=True)
                compare.bench(url, pid, rate=rate, seconds=seconds)
                compare.bench(url, pid, concurrency=32, seconds=seconds)
                compare.bench(url, pid, concurrency=4, seconds=seconds, method="stream", page_size=200)
                other_calls(url)
            finally:
                compare.stop(proc)
            if proc.returncode not in (0, None):
                raise SystemExit(f"the instrumented gateway exited with {proc.returncode}: see {work}/xgate.log")
    finally:
        providers.stop()
    shutil.rmtree(work, ignore_errors=True)


def other_calls(url: str) -> None:
    """The calls beside Query: catalogue list/describe, an unknown dataset, a purpose the grant
    does not name, a filter on a column that is not there (answered or refused: only that the
    gateway served them matters here)."""
    base = [str(compare.CLIENT), "call", "--gateway", url,
            "--certs", str(compare.CERTS), "--as", "civil-affairs"]
    for args in (["list"], ["describe", "hukou.person_basic"],
                 ["query", "no.such_dataset", "--purpose", "subsidy-eligibility"],
                 ["query", "hukou.person_basic", "--purpose", "not-a-purpose"],
                 ["query", "hukou.person_basic", "--purpose", "subsidy-eligibility", "--where",
                  "no_such_column=1"]):
        for _ in range(20):
            subprocess.run(base + args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30)


def symbol_order(tool: Path, merged: Path, out: Path) -> int:
    """Every function that ran in training, busiest first, as the linker's
    `--symbol-ordering-file`: the code the gateway runs, start-up included, laid out in one run
    of pages instead of spread among what never runs. Returns how many were listed."""
    text = subprocess.run([str(tool), "show", "--all-functions", "--counts", str(merged)],
                          capture_output=True, text=True, check=True).stdout
    ran: dict[str, int] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.endswith(":"):
            # `file;symbol` for functions local to their object: the linker knows the symbol.
            name = line.strip()[:-1].rpartition(";")[2]
        elif line.startswith("    Block counts:") and name:
            most = max((int(c) for c in line.partition(":")[2].strip(" []").split(",") if c.strip()), default=0)
            if most > 0:
                ran[name] = max(ran.get(name, 0), most)
            name = None
    out.write_text("".join(f"{n}\n" for n in sorted(ran, key=lambda n: -ran[n])))
    return len(ran)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--skip-gen-build", action="store_true",
                    help="reuse target/pgo-gen/<host>/dist/xgate (the instrumented build) as it is")
    ap.add_argument("--no-relr", action="store_true",
                    help="leave the relocations as tables (for glibc older than 2.36 where it runs)")
    a = ap.parse_args()
    tool = llvm_profdata()
    shutil.rmtree(PROFILES, ignore_errors=True)
    PROFILES.mkdir(parents=True)
    gen = GEN_DIR / host() / "dist" / "xgate"
    if not a.skip_gen_build:
        gen = cargo_dist(GEN_DIR, f"-Cprofile-generate={PROFILES}")
    train(gen, a.seconds, a.rate)
    raws = sorted(PROFILES.glob("*.profraw"))
    if not raws:
        raise SystemExit(f"no profile written into {PROFILES}")
    merged = REPO / "target" / "xgate.profdata"
    subprocess.run([str(tool), "merge", "-o", str(merged)] + [str(r) for r in raws], check=True)
    order = REPO / "target" / "xgate.order"
    listed = symbol_order(tool, merged, order)
    # -z pack-relative-relocs: the position-independent binary's relocations as a bitmap
    # (DT_RELR, glibc >= 2.36) instead of 0.5 MiB of tables read at every start.
    built = cargo_dist(USE_DIR, f"-Cprofile-use={merged} -Clink-arg=-Wl,-z,keep-text-section-prefix "
                                f"-Clink-arg=-Wl,--symbol-ordering-file={order} "
                                "-Clink-arg=-Wl,--no-warn-symbol-ordering"
                                + ("" if a.no_relr else " -Clink-arg=-Wl,-z,pack-relative-relocs"))
    out = USE_DIR / "xgate"
    shutil.copy2(built, out)
    print(f"built {out.relative_to(REPO)} (profile: {merged.relative_to(REPO)}, from {len(raws)} runs; "
          f"{listed} functions that ran, laid out first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
