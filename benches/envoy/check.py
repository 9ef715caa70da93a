#!/usr/bin/env python3
"""Check that Envoy, configured by benches/envoy/envoy.yaml.tmpl, really does xgate's job.

It starts the sample department backends (`xgate demo --providers-only`), renders the Envoy
template into a temporary directory, starts Envoy (`--concurrency 2`) in front of the
public-security provider, and checks with an independent gRPC client (grpcio, stubs generated
from proto/ as tests/e2e/test_e2e.py does):

  (a) civil-affairs (its client certificate + an `xgate token` JWT) calling
      xgate.v1.DataExchange/Query for hukou.person_basic gets rows from the provider;
  (b) no token                                   -> UNAUTHENTICATED (jwt_authn);
  (c) a forged token (signed by another key) and
      an expired token (signed by the dev key)   -> UNAUTHENTICATED (jwt_authn);
  (d) the health department's certificate+token  -> PERMISSION_DENIED (RBAC);
      civil-affairs' certificate + health's token -> PERMISSION_DENIED (RBAC cert/token binding);
  (e) the access log file got one JSON line per call, with the caller's SAN URI.
Then it stops Envoy and the providers.

Run from anywhere (it re-executes itself with the repository's .venv, creating that venv the
way .ci/test does if it is missing):

    python3 benches/envoy/check.py [--envoy PATH] [--dev-ports] [--keep]

--envoy       the Envoy binary (default: what benches/envoy/install.sh installs/prints)
--dev-ports   run the providers where deploy/dev/policy.yaml says (8444/8445) instead of on
              free loopback ports (a copy of the policy with free ports is the default, so the
              check does not collide with a demo someone else is running)
--keep        keep the temporary directory (rendered envoy.yaml, logs) and print its path
Environment: XGATE_BIN (default target/release/xgate).

Other scripts (the benchmark) can `import` this file for render(), envoy_bin(), start_envoy().
Exit status 0 when every check passed; the last line is "envoy check: N passed, M failed".
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CERTS = REPO / "certs-dev"
POLICY = REPO / "deploy" / "dev" / "policy.yaml"
TEMPLATE = HERE / "envoy.yaml.tmpl"
VENV_PY = REPO / ".venv" / "bin" / "python"

DATASET = "hukou.person_basic"
PURPOSE = "subsidy-eligibility"
RPC_TIMEOUT = 15.0
START_TIMEOUT = 30.0
ACCESS_LOG_WAIT = 25.0  # Envoy flushes file access logs every 10 s by default
PROVIDER_RE = re.compile(r"(?:sample )?provider (\S+)\s+https://127\.0\.0\.1:(\d+)")


# --------------------------------------------------------------------------------------------
# Reusable pieces (also for the benchmark script)
# --------------------------------------------------------------------------------------------


# Envoy configured to match xgate's replica handling (docs/policy.md#several-endpoints) as
# closely as its configuration allows: least-request balancing (power of two choices over
# active requests), grpc.health.v1 checks every 2 s (1 s timeout, 2 down / 1 up), outlier
# detection (5 consecutive failures, 10 s base ejection doubling to 5 min, at most 50 %),
# one retry on another host for connect failure / refused stream / reset / UNAVAILABLE within
# a per-try timeout of half the deadline, and a retry budget of 20 % (Envoy's budget counts
# retries in flight against requests in flight, with a floor of 10 concurrent retries: the
# nearest it has to "20 % of recent requests plus 10 a second").
REPLICA_RESILIENCE = """
      health_checks:
        - timeout: 1s
          interval: 2s
          unhealthy_threshold: 2
          healthy_threshold: 1
          grpc_health_check: { service_name: xgate.v1.DataExchange }
      outlier_detection:
        consecutive_5xx: 5
        consecutive_gateway_failure: 5
        consecutive_local_origin_failure: 5
        split_external_local_origin_errors: true
        interval: 1s
        base_ejection_time: 10s
        max_ejection_time: 300s
        max_ejection_percent: 50
      circuit_breakers:
        thresholds:
          - retry_budget: { budget_percent: { value: 20.0 }, min_retry_concurrency: 10 }"""

REPLICA_RETRY = """
                            retry_policy:
                              retry_on: connect-failure,refused-stream,reset,unavailable
                              num_retries: 1
                              per_try_timeout: ${PER_TRY}
                              retry_host_predicate: [{ name: envoy.retry_host_predicates.previous_hosts, typed_config: { "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate } }]
                              host_selection_retry_max_attempts: 3"""


def render(dest: Path, *, listen_port: int, admin_port: int, upstream_port: int,
           access_log: Path, certs: Path = CERTS, template: Path = TEMPLATE,
           upstream_ports: list[tuple[str, int]] | None = None, deadline_ms: int = 30000) -> Path:
    """Render the template (string.Template, `${NAME}` placeholders) to dest; returns dest.

    With `upstream_ports` ([(address, port), …]) the cluster has those replicas and the
    resilience settings that match xgate's (REPLICA_RESILIENCE, REPLICA_RETRY), the route's
    timeout `deadline_ms` and each try half of it; without, one endpoint, round robin, no
    retries (the configuration the single-provider benchmark has always used)."""
    replicas = upstream_ports or [("127.0.0.1", upstream_port)]
    endpoints = "\n".join(
        "              - endpoint:\n"
        "                  address:\n"
        f"                    socket_address: {{ address: {a}, port_value: {p} }}"
        for a, p in replicas)
    several = upstream_ports is not None
    text = string.Template(template.read_text(encoding="utf-8")).substitute(
        LISTEN_PORT=listen_port, ADMIN_PORT=admin_port, UPSTREAM_PORT=upstream_port,
        CERTS=str(Path(certs).resolve()), ACCESS_LOG=str(Path(access_log).resolve()),
        LB_ENDPOINTS=endpoints,
        LB_POLICY="LEAST_REQUEST" if several else "ROUND_ROBIN",
        CLUSTER_RESILIENCE=REPLICA_RESILIENCE if several else "",
        ROUTE_TIMEOUT=f"{deadline_ms / 1000:g}s",
        RETRY_POLICY=(string.Template(REPLICA_RETRY).substitute(PER_TRY=f"{deadline_ms / 2000:g}s")
                      if several else ""))
    dest.write_text(text, encoding="utf-8")
    return dest


def envoy_bin() -> Path:
    """The Envoy binary from .venv-bench, installing it with install.sh if needed."""
    out = subprocess.run(["bash", str(HERE / "install.sh")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"install.sh failed ({out.returncode}):\n{out.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_ready(admin_port: int, proc: subprocess.Popen, timeout: float = START_TIMEOUT):
    """Wait for Envoy's admin /ready to answer 200 (LIVE)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"envoy not ready within {timeout:.0f}s ({last})")


def start_envoy(envoy: Path, config: Path, admin_port: int, log_path: Path,
                concurrency: int = 2) -> subprocess.Popen:
    """Start Envoy on config (no hot restart, so that several can run at once) and wait."""
    cmd = [str(envoy), "-c", str(config), "--concurrency", str(concurrency),
           "--disable-hot-restart", "--log-level", "warn"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_ready(admin_port, proc)
    return proc


def stop(proc: subprocess.Popen | None, timeout: float = 15.0):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def xgate_bin() -> Path:
    p = Path(os.environ.get("XGATE_BIN", "target/release/xgate"))
    return p if p.is_absolute() else REPO / p


def mint_token(dept: str, sub: str = "bench", key: Path = CERTS / "jwt-signing.key") -> str:
    cmd = [str(xgate_bin()), "token", "--dept", dept, "--sub", sub, "--key", str(key)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout.strip()


class Providers:
    """`xgate demo --providers-only`: started, ports read from its stdout, stopped."""

    def __init__(self, policy: Path, stdout_log: Path):
        self.policy = policy
        self.stdout_log = stdout_log
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    def start(self, expect: int = 2):
        cmd = [str(xgate_bin()), "demo", "--providers-only", "--policy", str(self.policy),
               "--certs", str(CERTS)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, NO_COLOR="1"))
        seen: list[str] = []
        done = threading.Event()

        def pump():
            with open(self.stdout_log, "w", encoding="utf-8") as f:
                for raw in self.proc.stdout:
                    line = raw.decode("utf-8", "replace")
                    f.write(line)
                    f.flush()
                    seen.append(line)
                    m = PROVIDER_RE.search(line)
                    if m:
                        self.ports[m.group(1)] = int(m.group(2))
                    if len(self.ports) >= expect or "Ctrl-C" in line:
                        done.set()
            done.set()

        threading.Thread(target=pump, daemon=True).start()
        if not done.wait(START_TIMEOUT) or len(self.ports) < expect:
            raise RuntimeError("sample providers did not start:\n" + "".join(seen[-20:]))
        return self.ports

    def stop(self):
        stop(self.proc)


# --------------------------------------------------------------------------------------------
# Tokens that must be refused
# --------------------------------------------------------------------------------------------


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def der_ecdsa_to_raw(der: bytes, size: int = 32) -> bytes:
    """ECDSA-Sig-Value (DER SEQUENCE of two INTEGERs) -> JWS r||s."""
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        v = der[i + 2:i + 2 + n].lstrip(b"\x00")
        out += v.rjust(size, b"\x00")
        i += 2 + n
    return out


def sign_es256(claims: dict, key: Path, kid: str = "dev-es256-1") -> str:
    """An ES256 JWT over arbitrary claims, signed with openssl (no Python crypto needed)."""
    header = {"typ": "JWT", "alg": "ES256", "kid": kid}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)],
                         input=signing_input.encode(), capture_output=True, check=True).stdout
    return f"{signing_input}.{b64url(der_ecdsa_to_raw(der))}"


def expired_token() -> str:
    """Signed with the real dev key, right issuer and audience, expired an hour ago
    (well past jwt_authn's default 60 s clock skew)."""
    now = int(time.time())
    return sign_es256({"iss": "https://idp.zj.gov.example", "aud": "xgate", "sub": "alice",
                       "dept": "civil-affairs", "iat": now - 7200, "nbf": now - 7200,
                       "exp": now - 3600}, CERTS / "jwt-signing.key")


def forged_token(tmp: Path) -> str:
    """Valid claims, same kid, signed by a key that is not in the JWKS."""
    key = tmp / "forger.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(key)], check=True, capture_output=True)
    return mint_token("civil-affairs", "mallory", key=key)


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def ensure_venv_and_reexec():
    try:
        import grpc  # noqa: F401
        import grpc_tools  # noqa: F401
        return
    except ImportError:
        pass
    if VENV_PY.exists() and Path(sys.executable).absolute() == VENV_PY.absolute():
        raise SystemExit(f"{VENV_PY} lacks grpcio/grpcio-tools: "
                         f"{VENV_PY.parent}/pip install -r tests/e2e/requirements.txt")
    if not VENV_PY.exists():
        print("creating .venv (python3 -m venv .venv && pip install -r tests/e2e/requirements.txt)",
              flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(REPO / ".venv")], check=True)
        subprocess.run([str(REPO / ".venv" / "bin" / "pip"), "install", "-q", "-r",
                        str(REPO / "tests" / "e2e" / "requirements.txt")], check=True)
    os.execv(str(VENV_PY), [str(VENV_PY), str(Path(__file__).resolve()), *sys.argv[1:]])


class Checks:
    def __init__(self):
        self.passed: list[str] = []
        self.failed: list[tuple[str, str]] = []

    def run(self, name: str, fn):
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the rest
            self.failed.append((name, f"{type(e).__name__}: {e}"))
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            return
        self.passed.append(name)
        print(f"ok    {name}" + (f": {detail}" if detail else ""), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envoy", type=Path)
    ap.add_argument("--dev-ports", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    ensure_venv_and_reexec()

    import grpc

    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    from test_e2e import generate_stubs, write_policy_copy

    if not xgate_bin().exists():
        print(f"{xgate_bin()} is missing (build it with cargo build --release)", file=sys.stderr)
        return 2
    envoy = args.envoy or envoy_bin()
    version = subprocess.run([str(envoy), "--version"], capture_output=True, text=True).stdout.strip()
    print(f"envoy: {envoy}\n  {version}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="xgate-envoy-check-"))
    checks = Checks()
    providers = None
    envoy_proc = None
    try:
        pb = generate_stubs(tmp / "stubs")

        if args.dev_ports:
            policy = POLICY
        else:
            policy = tmp / "policy.yaml"
            write_policy_copy(policy, free_ports(2))
        providers = Providers(policy, tmp / "providers.log")
        ports = providers.start()
        upstream = ports["public-security"]
        print(f"sample providers: {ports} (policy {policy})", flush=True)

        listen, admin = free_ports(2)
        access_log = tmp / "access.log"
        config = render(tmp / "envoy.yaml", listen_port=listen, admin_port=admin,
                        upstream_port=upstream, access_log=access_log)
        val = subprocess.run([str(envoy), "--mode", "validate", "-c", str(config)],
                             capture_output=True, text=True, timeout=60)
        checks.run("config validates (envoy --mode validate)",
                   lambda: _require(val.returncode == 0 and "OK" in val.stdout + val.stderr,
                                    (val.stdout + val.stderr)[-2000:]))
        envoy_proc = start_envoy(envoy, config, admin, tmp / "envoy.log")
        addr = f"127.0.0.1:{listen}"
        print(f"envoy listening on {addr}, admin 127.0.0.1:{admin}, upstream 127.0.0.1:{upstream}",
              flush=True)

        def chan(dept: str):
            creds = grpc.ssl_channel_credentials(
                root_certificates=(CERTS / "ca.pem").read_bytes(),
                private_key=(CERTS / f"{dept}.key").read_bytes(),
                certificate_chain=(CERTS / f"{dept}.pem").read_bytes())
            return grpc.secure_channel(addr, creds,
                                       options=[("grpc.ssl_target_name_override", "localhost")])

        t = pb["types_pb2"]
        req = pb["exchange_pb2"].QueryRequest(
            dataset=DATASET, purpose=PURPOSE, page_size=5,
            filter=t.Filter(conditions=[t.Condition(field="region_code",
                                                    eq=t.Value(string_value="330106"))]))
        ca_chan, health_chan = chan("civil-affairs"), chan("health")
        ca = pb["exchange_pb2_grpc"].DataExchangeStub(ca_chan)
        health = pb["exchange_pb2_grpc"].DataExchangeStub(health_chan)
        tokens = {"civil-affairs": mint_token("civil-affairs", "alice"),
                  "health": mint_token("health", "hank")}
        calls = {"ok": 0, "denied": 0, "jwt_denied": 0, "rbac_denied": 0}

        def md(token):
            return [("authorization", f"Bearer {token}")] if token else []

        def expect_code(stub, token, code, by):
            calls["denied"] += 1
            calls[by] += 1
            try:
                stub.Query(req, metadata=md(token), timeout=RPC_TIMEOUT)
            except grpc.RpcError as e:
                _require(e.code() == code, f"got {e.code()} ({e.details()!r}), want {code}")
                return f"{e.code().name} ({e.details()})"
            raise AssertionError(f"call succeeded, want {code}")

        def allowed():
            resp = None
            for _ in range(3):  # the same token again: the second and third hit the JWT cache
                resp = ca.Query(req, metadata=md(tokens["civil-affairs"]), timeout=RPC_TIMEOUT)
                calls["ok"] += 1
            _require(len(resp.rows) > 0, "no rows")
            _require(len(resp.rows) <= 5, f"{len(resp.rows)} rows for page_size 5")
            cols = [c.name for c in resp.columns]
            _require("id_number" in cols, f"columns {cols}")
            return f"{len(resp.rows)} rows x {len(cols)} columns ({', '.join(cols)}), 3 calls"

        checks.run("(a) civil-affairs cert + token: Query returns provider rows", allowed)
        checks.run("(b) no token -> UNAUTHENTICATED",
                   lambda: expect_code(ca, None, grpc.StatusCode.UNAUTHENTICATED, "jwt_denied"))
        checks.run("(c) forged token (signed by another key) -> UNAUTHENTICATED",
                   lambda: expect_code(ca, forged_token(tmp), grpc.StatusCode.UNAUTHENTICATED, "jwt_denied"))
        checks.run("(c) expired token (dev key, exp 1 h ago) -> UNAUTHENTICATED",
                   lambda: expect_code(ca, expired_token(), grpc.StatusCode.UNAUTHENTICATED, "jwt_denied"))
        # jwt_authn answers 403 (PERMISSION_DENIED) for a wrong audience, where xgate says
        # UNAUTHENTICATED: refused either way, before any upstream call.
        checks.run("(c) token for another audience -> PERMISSION_DENIED (jwt_authn's 403)",
                   lambda: expect_code(ca, _other_audience_token(), grpc.StatusCode.PERMISSION_DENIED,
                                       "jwt_denied"))
        checks.run("(d) health cert + health token -> PERMISSION_DENIED (RBAC)",
                   lambda: expect_code(health, tokens["health"], grpc.StatusCode.PERMISSION_DENIED, "rbac_denied"))
        checks.run("(d) civil-affairs cert + health token -> PERMISSION_DENIED (cert/token dept binding)",
                   lambda: expect_code(ca, tokens["health"], grpc.StatusCode.PERMISSION_DENIED, "rbac_denied"))
        checks.run("(d) health cert + civil-affairs token -> PERMISSION_DENIED",
                   lambda: expect_code(health, tokens["civil-affairs"], grpc.StatusCode.PERMISSION_DENIED,
                                       "rbac_denied"))
        ca_chan.close()
        health_chan.close()

        def stats():
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5) as r:
                text = r.read().decode()
            st = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
            want = {  # the RBAC denials all carried valid tokens
                "http.gateway.jwt_authn.allowed": calls["ok"] + calls["rbac_denied"],
                "http.gateway.jwt_authn.denied": calls["jwt_denied"],
                "http.gateway.rbac.allowed": calls["ok"],
                "http.gateway.rbac.denied": calls["rbac_denied"],
            }
            got = {k: int(st.get(k, "-1")) for k in want}
            _require(got == want, f"stats {got}, want {want}")
            rl = {k: v for k, v in st.items() if "local_rate_limit" in k}
            _require(int(rl.get("gateway_local_rate_limit.http_local_rate_limit.enabled", "0"))
                     == calls["ok"], f"local rate limit stats {rl}")
            up = int(st.get("cluster.provider_public_security.upstream_cx_http2_total", "0"))
            _require(up >= 1, "no HTTP/2 upstream connection")
            ssl = int(st.get("listener.127.0.0.1_%d.ssl.versions.TLSv1.3" % listen, "0"))
            _require(ssl >= 1, "no TLS 1.3 handshake counted on the listener")
            cache = {k.rsplit(".", 1)[1]: int(v) for k, v in st.items()
                     if k.startswith("http.gateway.jwt_authn.jwt_cache")}
            _require(cache.get("jwt_cache_hit", 0) >= 2,
                     f"the JWT cache answered no repeated token: {cache}")
            return (f"jwt cache {cache}, "
                    f"jwt_authn allowed/denied {want['http.gateway.jwt_authn.allowed']}/"
                    f"{calls['jwt_denied']}, rbac allowed/denied {calls['ok']}/{calls['rbac_denied']}, "
                    f"local_ratelimit consulted {calls['ok']} times, "
                    f"upstream h2 connections {up}, downstream TLSv1.3 handshakes {ssl}")

        checks.run("admin stats: every filter saw the calls, upstream is HTTP/2", stats)

        def access_log_lines():
            total = calls["ok"] + calls["denied"]
            deadline = time.monotonic() + ACCESS_LOG_WAIT
            lines: list[str] = []
            while time.monotonic() < deadline:
                if access_log.exists():
                    lines = [l for l in access_log.read_text(encoding="utf-8").splitlines() if l.strip()]
                    if len(lines) >= total:
                        break
                time.sleep(0.5)
            _require(len(lines) == total, f"{len(lines)} access log lines for {total} calls")
            recs = [json.loads(l) for l in lines]
            for k in ("start_time", "method", "path", "response_code", "grpc_status", "duration_ms",
                      "downstream_peer_uri_san", "upstream_host", "bytes_received", "bytes_sent"):
                _require(all(k in r for r in recs), f"a record lacks {k}: {recs[0]}")
            _require(all(r["path"] == "/xgate.v1.DataExchange/Query" for r in recs), f"{recs[0]}")
            ok = [r for r in recs if str(r["grpc_status"]) == "0"]
            _require(len(ok) == calls["ok"], f"{len(ok)} OK records, want {calls['ok']}: {recs}")
            _require(all(r["downstream_peer_uri_san"].startswith(
                "spiffe://zj.gov.example/dept/civil-affairs/") for r in ok), f"{ok[0]}")
            _require(all(str(r["upstream_host"]).startswith("127.0.0.1:") for r in ok), f"{ok[0]}")
            codes = sorted({str(r["grpc_status"]) for r in recs})
            return f"{len(recs)} JSON lines, grpc_status values {codes}; e.g. {json.dumps(ok[0])}"

        checks.run("(e) access log: one JSON line per call", access_log_lines)
    except Exception as e:  # noqa: BLE001
        checks.failed.append(("setup", f"{type(e).__name__}: {e}"))
        print(f"FAIL  setup: {type(e).__name__}: {e}", flush=True)
    finally:
        stop(envoy_proc)
        if providers is not None:
            providers.stop()
        if checks.failed:
            for name in ("envoy.log", "providers.log"):
                p = tmp / name
                if p.exists():
                    print(f"--- {name} (tail) ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]))
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"envoy check: {len(checks.passed)} passed, {len(checks.failed)} failed")
    return 0 if not checks.failed else 1


def _other_audience_token() -> str:
    now = int(time.time())
    return sign_es256({"iss": "https://idp.zj.gov.example", "aud": "someone-else", "sub": "alice",
                       "dept": "civil-affairs", "iat": now, "nbf": now, "exp": now + 600},
                      CERTS / "jwt-signing.key")


def _require(cond, msg: str):
    if not cond:
        raise AssertionError(msg)


if __name__ == "__main__":
    sys.exit(main())
