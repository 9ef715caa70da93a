#!/usr/bin/env python3
"""p99 of calls while the live policy (10,000 grants, 1,000 datasets) is reloaded, against the
same load without reloads (docs/benchmarks.md). Needs a release build (target/release/xgate).

The dev policy plus 200 departments, 1,000 datasets and 10,000 grants of their own (the
shape benches/policy.rs uses), so the demo's calls go on through the sample providers while
the reloads parse, validate and index the big file. Alternating runs: a new version of the
file every 0.5 s (the demo watches it), then none.
"""
import os, re, signal, subprocess, sys, tempfile, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
B = str(REPO / "target/release/xgate")


def big_policy() -> str:
    text = (REPO / "deploy/dev/policy.yaml").read_text()
    depts = "".join(f'  - {{ id: d{d}, name: D{d}, level: county, region: "33{d // 99 + 1:02}{d % 99 + 1:02}" }}\n'
                    for d in range(200))
    provs = "".join(f'  - {{ id: p{p}, endpoint: "https://127.0.0.{p + 20}:8444" }}\n' for p in range(10))
    ds = []
    for i in range(1000):
        ds.append(f"  - id: ds{i}\n    title: Dataset {i}\n    owner: d{i % 200}\n    provider: p{i % 10}\n"
                  f"    share_type: conditional\n    subject_key: f0\n    region_field: region\n    fields:\n")
        for f in range(9):
            sens = ["public", "internal", "personal", "sensitive"][f % 4]
            mask = ", mask: { keep: { first: 3, last: 2 } }" if f % 4 == 3 else ""
            ds.append(f"      - {{ name: f{f}, type: string, sensitivity: {sens}{mask} }}\n")
        ds.append("      - { name: region, type: string, sensitivity: internal }\n")
    grants = "".join(f"  - {{ id: g{g}, consumer: d{g % 200}, dataset: ds{g % 1000}, fields: [f0, f1, f2, f3, f5, region], "
                     f"purposes: [p{g % 7}, audit], row_scope: own-region, expires: 2040-01-01 }}\n" for g in range(10000))
    text = text.replace("departments:\n", "departments:\n" + depts, 1)
    text = text.replace("providers:\n", "providers:\n" + provs, 1)
    text = text.replace("datasets:\n", "datasets:\n" + "".join(ds), 1)
    text = text.replace("grants:\n", "grants:\n" + grants, 1)
    return text


def bench(gw_pid: int) -> dict:
    import json
    out = subprocess.run([B, "bench", "--as", "civil-affairs", "--rate", "40", "--duration", "10",
                          "--warmup", "0.5", "--json", "--pid", str(gw_pid)],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="xgate-reload-"))
    policy = tmp / "policy.yaml"
    text = big_policy()
    policy.write_text(text)
    print(f"policy: {policy.stat().st_size} bytes", flush=True)
    check = subprocess.run([B, "policy", "check", str(policy)], cwd=REPO, capture_output=True, text=True)
    print(check.stdout.strip() or check.stderr.strip(), flush=True)
    gw = subprocess.Popen([B, "demo", "--policy", str(policy), "--audit-dir", str(tmp / "audit")], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    try:
        for reloads in [True, False, True, False]:
            stop = threading.Event()

            def hup():
                # A new version each time (a comment changes the digest): replaced atomically,
                # picked up by the demo's file watch, parsed, validated, indexed and swapped in.
                n = 0
                while not stop.wait(0.5):
                    n += 1
                    nxt = tmp / "policy.next"
                    nxt.write_text(text + f"# reload {n}\n")
                    os.replace(nxt, policy)

            t = threading.Thread(target=hup)
            if reloads:
                t.start()
            r = bench(gw.pid)
            stop.set()
            if reloads:
                t.join()
            l = r["latency_us"]
            print(f"{'reloads every 0.5 s' if reloads else 'no reloads         '}: ok {r['ok']}/{r['requests']}, "
                  f"p50 {l['p50']} us, p99 {l['p99']} us, max {l['max']} us", flush=True)
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(timeout=30)


if __name__ == "__main__":
    main()
