#!/usr/bin/env python3
"""End-to-end black-box test of the real `xgate` binary with an independent gRPC client.

The client is Python `grpcio` with stubs generated at test time from `proto/` by
`grpc_tools.protoc`, so nothing here shares code with the gateway. The test:

  * starts `xgate demo --listen 127.0.0.1:0` on a copy of deploy/dev/policy.yaml whose sample
    provider endpoints point at two free loopback ports;
  * mints dev tokens with `xgate token`;
  * exercises the catalogue, Query (with paging) and QueryStream as civil-affairs, and the
    denial paths (no grant, share type none, missing token, token/cert department mismatch),
    checking status codes and google.rpc.ErrorInfo details;
  * stops the gateway with SIGTERM and checks the audit trail: one line per call, each
    response's x-xgate-trace-id present, decisions/reasons/statuses as expected.

Run from the repository root:  python tests/e2e/test_e2e.py
Environment: XGATE_BIN (default target/debug/xgate, relative to the repository root),
             XGATE_E2E_START_TIMEOUT (seconds to wait for the gateway, default 60).
Exits 0 when every check passed, 1 otherwise; the last line is "e2e: N passed, M failed".
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CERTS = REPO / "certs-dev"
POLICY = REPO / "deploy" / "dev" / "policy.yaml"
PROTO_DIR = REPO / "proto"

START_TIMEOUT = float(os.environ.get("XGATE_E2E_START_TIMEOUT", "60"))
RPC_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
TRACE_HEADER = "x-xgate-trace-id"
ERROR_DOMAIN = "xgate.gov"
MASKED_ID_RE = re.compile(r"^\d{6}\*{8}[\dX]{4}$")
LISTENING_RE = re.compile(r"xgate demo listening on (\S+):(\d+)")


def xgate_bin() -> Path:
    p = Path(os.environ.get("XGATE_BIN", "target/debug/xgate"))
    return p if p.is_absolute() else REPO / p


# --------------------------------------------------------------------------------------------
# Result bookkeeping
# --------------------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    pass


def require(cond, msg: str):
    if not cond:
        raise CheckFailed(msg)


class Results:
    def __init__(self):
        self.passed: list[str] = []
        self.failed: list[tuple[str, str]] = []

    def run(self, name: str, fn, *args, **kwargs):
        """Run one named check; record pass/fail; never raises (returns None on failure)."""
        try:
            out = fn(*args, **kwargs)
        except CheckFailed as e:
            self.failed.append((name, str(e)))
            print(f"FAIL  {name}: {e}", flush=True)
            return None
        except Exception as e:  # an unexpected error is a failure of that check
            self.failed.append((name, f"{type(e).__name__}: {e}"))
            print(f"FAIL  {name}: unexpected {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            return None
        self.passed.append(name)
        print(f"ok    {name}", flush=True)
        return out


class CallLog:
    """Every RPC the test made, with what the audit trail should say about it."""

    def __init__(self):
        self.calls: list[dict] = []
        # Calls cut short by their deadline or by the client: trace id -> what the client saw
        # (its status code name, and whether that status came from the gateway).
        self.cut_short: dict[str, dict] = {}

    def add(self, *, label, method, decision, reason, grpc_status, trace_id, rows=None,
            dataset=None, fields_masked=None, consumer_dept="civil-affairs"):
        entry = dict(label=label, method=method, decision=decision, reason=reason,
                     grpc_status=grpc_status, trace_id=trace_id, rows=rows,
                     dataset=dataset, fields_masked=fields_masked, consumer_dept=consumer_dept)
        self.calls.append(entry)
        return entry


# --------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------


def generate_stubs(out_dir: Path):
    """Generate Python stubs for proto/xgate/v1/*.proto into out_dir and import them."""
    import grpc_tools
    from grpc_tools import protoc

    wkt = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "xgate" / "v1").glob("*.proto"))
    require(protos, f"no .proto files under {PROTO_DIR}/xgate/v1")
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{wkt}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", *protos]
    rc = protoc.main(args)
    require(rc == 0, f"protoc failed (exit {rc}) for {protos}")
    sys.path.insert(0, str(out_dir))
    import importlib

    mods = {}
    for name in ("types_pb2", "catalog_pb2", "catalog_pb2_grpc", "exchange_pb2", "exchange_pb2_grpc"):
        mods[name] = importlib.import_module(f"xgate.v1.{name}")
    return mods


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


def write_policy_copy(dst: Path, ports: list[int]) -> dict[str, int]:
    """Copy the dev policy with each provider endpoint's port replaced; returns id -> port."""
    text = POLICY.read_text(encoding="utf-8")
    endpoint_re = re.compile(r'(-\s*\{\s*id:\s*([\w.-]+)\s*,\s*endpoint:\s*"https://127\.0\.0\.1:)(\d+)(")')
    assigned: dict[str, int] = {}
    it = iter(ports)

    def repl(m):
        port = next(it)
        assigned[m.group(2)] = port
        return f"{m.group(1)}{port}{m.group(4)}"

    new_text, count = endpoint_re.subn(repl, text)
    require(count == len(ports), f"expected {len(ports)} provider endpoints in {POLICY}, rewrote {count}")
    dst.write_text(new_text, encoding="utf-8")
    return assigned


def mint_token(dept: str, sub: str, purposes: str | None = None) -> str:
    cmd = [str(xgate_bin()), "token", "--dept", dept, "--sub", sub,
           "--key", str(CERTS / "jwt-signing.key")]
    if purposes:
        cmd += ["--purposes", purposes]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
    require(out.returncode == 0, f"`{' '.join(cmd)}` exited {out.returncode}: {out.stderr.strip()}")
    tok = out.stdout.strip()
    require(tok.count(".") == 2, f"`xgate token` printed something that is not a JWT: {tok!r}")
    return tok


class Gateway:
    """The demo process: started, waited on, stopped."""

    def __init__(self, tmp: Path, policy: Path):
        self.tmp = tmp
        self.policy = policy
        self.audit_dir = tmp / "audit"
        self.audit_dir.mkdir()
        self.stderr_path = tmp / "xgate-demo.stderr"
        self.stdout_lines: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        self.proc: subprocess.Popen | None = None
        self.addr: str | None = None

    def start(self):
        cmd = [str(xgate_bin()), "demo", "--listen", "127.0.0.1:0", "--console", "127.0.0.1:0", "--policy", str(self.policy),
               "--audit-dir", str(self.audit_dir), "--certs", "certs-dev"]
        env = dict(os.environ, NO_COLOR="1")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=env)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CheckFailed(f"no 'listening on' line within {START_TIMEOUT:.0f}s")
            try:
                line = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise CheckFailed(f"xgate demo exited with {self.proc.returncode} before listening")
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise CheckFailed(f"xgate demo closed stdout (exit {self.proc.returncode}) before listening")
            m = LISTENING_RE.search(line)
            if m:
                self.addr = f"{m.group(1)}:{m.group(2)}"
                return self.addr

    def _pump(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stdout_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"xgate demo still running {STOP_TIMEOUT:.0f}s after SIGTERM")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if getattr(self, "_stderr", None):
            self._stderr.close()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def diagnostics(self, tail: int = 60) -> str:
        err = self.stderr_text().splitlines()[-tail:]
        out = self.stdout_lines[-tail:]
        return ("--- xgate demo stdout ---\n" + "\n".join(out) +
                "\n--- xgate demo stderr (tail) ---\n" + "\n".join(err))


# --------------------------------------------------------------------------------------------
# gRPC helpers
# --------------------------------------------------------------------------------------------


def channel(grpc, addr: str, dept: str):
    creds = grpc.ssl_channel_credentials(
        root_certificates=(CERTS / "ca.pem").read_bytes(),
        private_key=(CERTS / f"{dept}.key").read_bytes(),
        certificate_chain=(CERTS / f"{dept}.pem").read_bytes(),
    )
    return grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])


def auth(token: str | None):
    return [("authorization", f"Bearer {token}")] if token else []


def trace_ids(*metadatas) -> list[str]:
    ids = []
    for md in metadatas:
        for k, v in (md or ()):
            if k.lower() == TRACE_HEADER:
                ids.append(v if isinstance(v, str) else v.decode())
    return ids


def one_trace_id(*metadatas) -> str:
    ids = trace_ids(*metadatas)
    require(ids, f"response carries no {TRACE_HEADER} metadata")
    require(len(set(ids)) == 1, f"response carries differing {TRACE_HEADER} values: {ids}")
    require(re.fullmatch(r"[0-9a-f]{32}", ids[0]) is not None, f"{TRACE_HEADER} {ids[0]!r} is not a 32-hex trace id")
    return ids[0]


def value_py(v):
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "timestamp_value":
        return v.timestamp_value.ToJsonString()
    return getattr(v, kind)


def rows_as_dicts(resp) -> list[dict]:
    names = [c.name for c in resp.columns]
    out = []
    for i, r in enumerate(resp.rows):
        require(len(r.values) == len(names), f"row {i} has {len(r.values)} values for {len(names)} columns")
        out.append({n: value_py(v) for n, v in zip(names, r.values)})
    return out


# --------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------


DATASET = "hukou.person_basic"
PURPOSE = "subsidy-eligibility"
GRANTED_FIELDS = ["id_number", "name", "gender", "birth_date", "region_code", "household_head"]
M_LIST = "/xgate.v1.Catalog/ListDatasets"
M_DESCRIBE = "/xgate.v1.Catalog/DescribeDataset"
M_QUERY = "/xgate.v1.DataExchange/Query"
M_STREAM = "/xgate.v1.DataExchange/QueryStream"


class Scenario:
    def __init__(self, grpc, pb, addr, tokens, log: CallLog):
        self.grpc = grpc
        self.pb = pb
        self.addr = addr
        self.tokens = tokens
        self.log = log
        self.ca_chan = channel(grpc, addr, "civil-affairs")
        self.health_chan = channel(grpc, addr, "health")
        self.ca_catalog = pb["catalog_pb2_grpc"].CatalogStub(self.ca_chan)
        self.ca_exchange = pb["exchange_pb2_grpc"].DataExchangeStub(self.ca_chan)
        self.health_exchange = pb["exchange_pb2_grpc"].DataExchangeStub(self.health_chan)
        self.paged_rows: list[dict] | None = None

    def close(self):
        self.ca_chan.close()
        self.health_chan.close()

    def health_service(self):
        """grpc.health.v1 on the gateway port says SERVING for the interface services."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.ca_chan)
        deadline = time.time() + 15
        while True:  # NOT_SERVING until the first provider probe has run
            st = stub.Check(health_pb2.HealthCheckRequest(service="xgate.v1.DataExchange"), timeout=RPC_TIMEOUT)
            if st.status == health_pb2.HealthCheckResponse.SERVING:
                break
            require(time.time() < deadline, f"health status stays {st.status}")
            time.sleep(0.2)
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT)
        require(overall.status == health_pb2.HealthCheckResponse.SERVING, f"overall {overall.status}")
        try:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=RPC_TIMEOUT)
            raise CheckFailed("unknown service answered")
        except self.grpc.RpcError as e:
            require(e.code() == self.grpc.StatusCode.NOT_FOUND, f"unknown service: {e.code()}")

    def reflection(self):
        """Server reflection describes the interface with no proto files on the client side."""
        from google.protobuf import descriptor_pool
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        db = ProtoReflectionDescriptorDatabase(self.ca_chan)
        services = set(db.get_services())
        for svc in ("xgate.v1.DataExchange", "xgate.v1.Catalog", "grpc.health.v1.Health"):
            require(svc in services, f"{svc} not listed: {sorted(services)}")
        pool = descriptor_pool.DescriptorPool(db)
        ex = pool.FindServiceByName("xgate.v1.DataExchange")
        methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in ex.methods}
        require(methods.get("Query") == ("xgate.v1.QueryRequest", "xgate.v1.QueryResponse"), f"{methods}")
        require("QueryStream" in methods, f"{methods}")
        fields = {f.name for f in pool.FindMessageTypeByName("xgate.v1.QueryRequest").fields}
        require({"dataset", "fields", "filter", "purpose"} <= fields, f"{fields}")

    def _query_request(self, page_size=5, page_token="", dataset=DATASET, purpose=PURPOSE, region="330106"):
        t = self.pb["types_pb2"]
        flt = t.Filter(conditions=[t.Condition(field="region_code", eq=t.Value(string_value=region))]) \
            if region is not None else None
        return self.pb["exchange_pb2"].QueryRequest(dataset=dataset, purpose=purpose, filter=flt,
                                                    page_size=page_size, page_token=page_token)

    # ---- allowed calls --------------------------------------------------------------------

    def list_datasets(self):
        resp, call = self.ca_catalog.ListDatasets.with_call(
            self.pb["catalog_pb2"].ListDatasetsRequest(), metadata=auth(self.tokens["civil-affairs"]),
            timeout=RPC_TIMEOUT)
        tid = one_trace_id(call.initial_metadata(), call.trailing_metadata())
        self.log.add(label="ListDatasets", method=M_LIST, decision="allow", reason=None, grpc_status="OK",
                     trace_id=tid)
        ids = sorted(d.id for d in resp.datasets)
        require(len(resp.datasets) == 3, f"ListDatasets returned {len(resp.datasets)} datasets: {ids}")
        require(ids == ["hukou.criminal_record", "hukou.person_basic", "market.company_registry"],
                f"unexpected dataset ids {ids}")
        require(resp.policy_version, "ListDatasets has an empty policy_version")

    def describe(self):
        resp, call = self.ca_catalog.DescribeDataset.with_call(
            self.pb["catalog_pb2"].DescribeDatasetRequest(dataset=DATASET),
            metadata=auth(self.tokens["civil-affairs"]), timeout=RPC_TIMEOUT)
        tid = one_trace_id(call.initial_metadata(), call.trailing_metadata())
        self.log.add(label="DescribeDataset", method=M_DESCRIBE, decision="allow", reason=None, grpc_status="OK",
                     trace_id=tid, dataset=DATASET)
        require(resp.dataset.id == DATASET, f"described {resp.dataset.id!r}")
        a = resp.access
        require(a.allowed, f"access not allowed: {a.denial_reason} {a.denial_message}")
        masked = {m.field: m.mask for m in a.masked_fields}
        require(list(masked) == ["id_number"], f"masked_fields = {masked}")
        require("id_number" not in a.readable_fields, f"id_number listed readable: {list(a.readable_fields)}")
        require(sorted(a.readable_fields) == sorted(f for f in GRANTED_FIELDS if f != "id_number"),
                f"readable_fields = {list(a.readable_fields)}")
        require("6" in masked["id_number"] and "4" in masked["id_number"],
                f"id_number mask description {masked['id_number']!r} does not say first 6 / last 4")
        require(set(a.allowed_purposes) == {"subsidy-eligibility", "minimum-living-allowance"},
                f"allowed_purposes = {list(a.allowed_purposes)}")
        require("ca-hukou-subsidy" in a.deciding_rule, f"deciding_rule = {a.deciding_rule!r}")

    def _check_person_page(self, resp, what):
        cols = [c.name for c in resp.columns]
        require(list(resp.masked_columns) == ["id_number"], f"{what}: masked_columns = {list(resp.masked_columns)}")
        require("address" not in cols and "phone" not in cols, f"{what}: ungranted columns returned: {cols}")
        require(cols == GRANTED_FIELDS, f"{what}: columns = {cols}")
        rows = rows_as_dicts(resp)
        for r in rows:
            require(isinstance(r["id_number"], str) and MASKED_ID_RE.match(r["id_number"]),
                    f"{what}: id_number {r['id_number']!r} is not masked as 6 digits, 8 stars, 4 digits/X")
            require(r["region_code"] == "330106", f"{what}: filter EQ 330106 returned region {r['region_code']!r}")
        return rows

    def query_first_page(self):
        resp, call = self.ca_exchange.Query.with_call(
            self._query_request(page_size=5), metadata=auth(self.tokens["civil-affairs"]), timeout=RPC_TIMEOUT)
        tid = one_trace_id(call.initial_metadata(), call.trailing_metadata())
        self.log.add(label="Query page 1", method=M_QUERY, decision="allow", reason=None, grpc_status="OK",
                     trace_id=tid, rows=len(resp.rows), dataset=DATASET, fields_masked=["id_number"])
        require(len(resp.rows) == 5, f"page_size 5 returned {len(resp.rows)} rows")
        self._check_person_page(resp, "Query page 1")

    def query_all_pages(self):
        rows: list[dict] = []
        token = ""
        pages = 0
        while True:
            pages += 1
            require(pages <= 2000, "more than 2000 pages: paging does not terminate")
            resp, call = self.ca_exchange.Query.with_call(
                self._query_request(page_size=5, page_token=token), metadata=auth(self.tokens["civil-affairs"]),
                timeout=RPC_TIMEOUT)
            tid = one_trace_id(call.initial_metadata(), call.trailing_metadata())
            self.log.add(label=f"Query paging #{pages}", method=M_QUERY, decision="allow", reason=None,
                         grpc_status="OK", trace_id=tid, rows=len(resp.rows), dataset=DATASET,
                         fields_masked=["id_number"])
            require(len(resp.rows) <= 5, f"page {pages} has {len(resp.rows)} rows > page_size 5")
            rows += self._check_person_page(resp, f"Query page {pages}")
            if not resp.next_page_token:
                break
            require(len(resp.rows) > 0, f"page {pages} is empty yet has next_page_token {resp.next_page_token!r}")
            require(resp.next_page_token != token, f"page {pages} returned the same page token {token!r}")
            token = resp.next_page_token
        require(len(rows) > 5, f"only {len(rows)} rows in region 330106 in all; expected more than one page")
        self.paged_rows = rows
        print(f"      paged Query: {len(rows)} rows in {pages} pages", flush=True)

    def query_stream(self):
        it = self.ca_exchange.QueryStream(self._query_request(page_size=5),
                                          metadata=auth(self.tokens["civil-affairs"]), timeout=RPC_TIMEOUT * 3)
        batches = []
        entry = self.log.add(label="QueryStream", method=M_STREAM, decision="allow", reason=None,
                             grpc_status="OK", trace_id=None, dataset=DATASET, fields_masked=["id_number"])
        try:
            for resp in it:
                batches.append(resp)
        finally:
            try:
                entry["trace_id"] = one_trace_id(it.initial_metadata(), it.trailing_metadata())
            except CheckFailed:
                entry["trace_id"] = None
        require(entry["trace_id"], f"QueryStream carries no {TRACE_HEADER}")
        require(it.code() == self.grpc.StatusCode.OK, f"QueryStream ended with {it.code()}")
        require(batches, "QueryStream returned no batches")
        rows = []
        for i, b in enumerate(batches):
            require(len(b.rows) <= 5, f"stream batch {i} has {len(b.rows)} rows > page_size 5")
            require(not b.next_page_token, f"stream batch {i} has next_page_token {b.next_page_token!r}")
            rows += self._check_person_page(b, f"QueryStream batch {i}")
        entry["rows"] = len(rows)
        print(f"      QueryStream: {len(rows)} rows in {len(batches)} batches", flush=True)
        require(self.paged_rows is not None, "paged Query rows unavailable (paging check failed)")
        require(len(rows) == len(self.paged_rows),
                f"QueryStream returned {len(rows)} rows, paging through Query returned {len(self.paged_rows)}")
        require(rows == self.paged_rows, "QueryStream rows differ from paged Query rows (content or order)")

    # ---- denied calls ---------------------------------------------------------------------

    def _expect_denied(self, label, stub_call, request, metadata, code, reason, method, *,
                       consumer_dept, dataset=None, policy_rule=True):
        """Make a call that must fail with `code` and ErrorInfo `reason`.

        policy_rule: the refusal comes from the sharing policy, so ErrorInfo.metadata must name
        the deciding `rule`. Identity refusals (token problems) happen before any rule applies.
        """
        from grpc_status import rpc_status
        from google.rpc import error_details_pb2

        entry = self.log.add(label=label, method=method, decision="deny", reason=reason,
                             grpc_status=code.name, trace_id=None, dataset=dataset,
                             consumer_dept=consumer_dept)
        try:
            stub_call.with_call(request, metadata=metadata, timeout=RPC_TIMEOUT)
        except self.grpc.RpcError as e:
            err = e
        else:
            raise CheckFailed(f"{label}: call succeeded, expected {code.name} {reason}")
        tid = one_trace_id(err.initial_metadata(), err.trailing_metadata())
        entry["trace_id"] = tid
        require(err.code() == code, f"{label}: status {err.code().name} ({err.details()}), expected {code.name}")
        status = rpc_status.from_call(err)  # also checks code/message agree with grpc-status(-message)
        require(status is not None, f"{label}: no grpc-status-details-bin on the error")
        infos = []
        for d in status.details:
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
                infos.append(info)
        require(len(infos) == 1, f"{label}: {len(infos)} ErrorInfo details in {[d.type_url for d in status.details]}")
        info = infos[0]
        require(info.reason == reason, f"{label}: ErrorInfo.reason {info.reason!r}, expected {reason!r}")
        require(info.domain == ERROR_DOMAIN, f"{label}: ErrorInfo.domain {info.domain!r}")
        require(info.metadata.get("trace_id") == tid,
                f"{label}: ErrorInfo trace_id {info.metadata.get('trace_id')!r} != {TRACE_HEADER} {tid!r}")
        if policy_rule:
            require(info.metadata.get("rule"), f"{label}: ErrorInfo has no metadata 'rule': {dict(info.metadata)}")
        return info

    def metadata_too_large(self, size: int):
        """Metadata over the gateway's limit: RESOURCE_EXHAUSTED METADATA_TOO_LARGE, audited,
        and the same connection still serves the next call."""
        md = auth(self.tokens["civil-affairs"]) + [("x-e2e-padding", "a" * size)]
        info = self._expect_denied(f"{size // 1024} KiB of metadata", self.ca_exchange.Query,
                                   self._query_request(), md, self.grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   "METADATA_TOO_LARGE", M_QUERY, consumer_dept="civil-affairs")
        require(info.metadata.get("rule") == "limits:max_metadata_bytes", f"rule {dict(info.metadata)}")
        self.list_datasets()
        return info

    def metadata_over_the_hard_cap(self):
        """Far beyond the HTTP/2 layer's cap, on a connection of its own: refused (no gRPC status
        from the gateway is possible there); the refusal is recorded once for the connection."""
        ch = channel(self.grpc, self.addr, "civil-affairs")
        try:
            stub = self.pb["exchange_pb2_grpc"].DataExchangeStub(ch)
            md = auth(self.tokens["civil-affairs"]) + [("x-e2e-padding", "a" * (6 << 20))]
            try:
                stub.Query(self._query_request(), metadata=md, timeout=RPC_TIMEOUT)
                raise CheckFailed("6 MiB of metadata went through")
            except self.grpc.RpcError as e:
                require(e.code() != self.grpc.StatusCode.OK, f"{e.code()}")
                return e.code()
        finally:
            ch.close()

    def tiny_deadlines(self):
        """grpc-timeout of 1n and 50u: whatever the client sees, the record says the same, and
        never OK for a call the client did not get. Each call carries a traceparent, so its
        record is found even when the client's own timer answered it."""
        import secrets
        time.sleep(2.5)  # the grant's burst (100 calls) refills after the paging above
        seen = {}
        for timeout in [1e-9] * 20 + [50e-6] * 20 + [2e-3] * 20:
            tid = secrets.token_hex(16)
            md = auth(self.tokens["civil-affairs"]) + [("traceparent", f"00-{tid}-{secrets.token_hex(8)}-01")]
            try:
                _, call = self.ca_exchange.Query.with_call(self._query_request(page_size=1), metadata=md,
                                                           timeout=timeout)
                got = {"code": "OK", "from_gateway": True}
                require(one_trace_id(call.initial_metadata(), call.trailing_metadata()) == tid, "trace id")
            except self.grpc.RpcError as e:
                ids = trace_ids(e.initial_metadata(), e.trailing_metadata())
                require(not ids or ids == [tid], f"{e.code()}: trace ids {ids}, sent {tid}")
                require(e.code() in (self.grpc.StatusCode.DEADLINE_EXCEEDED,), f"{e.code()} {e.details()}")
                got = {"code": e.code().name, "from_gateway": bool(ids)}
            got["timeout_us"] = timeout * 1e6
            self.log.cut_short[tid] = got
            seen[got["code"]] = seen.get(got["code"], 0) + 1
        print(f"      tiny deadlines: {seen}", flush=True)

    def cancelled_stream(self):
        """A stream the client cancels after its first batch: recorded CANCELLED, with the rows
        that reached it and the stage it was in."""
        import secrets
        tid = secrets.token_hex(16)
        md = auth(self.tokens["civil-affairs"]) + [("traceparent", f"00-{tid}-{secrets.token_hex(8)}-01")]
        it = self.ca_exchange.QueryStream(self._query_request(page_size=5), metadata=md, timeout=RPC_TIMEOUT)
        first = next(it)
        require(len(first.rows) == 5, f"first batch {len(first.rows)} rows")
        it.cancel()
        self.log.cut_short[tid] = {"code": "CANCELLED", "from_gateway": False, "stream": True}

    def deny_no_grant(self):
        info = self._expect_denied("health on hukou.person_basic", self.health_exchange.Query,
                                   self._query_request(purpose="medical-insurance", region=None),
                                   auth(self.tokens["health"]), self.grpc.StatusCode.PERMISSION_DENIED,
                                   "GRANT_MISSING", M_QUERY, consumer_dept="health", dataset=DATASET)
        require(info.metadata.get("rule") == "share-type:conditional",
                f"GRANT_MISSING rule {info.metadata.get('rule')!r}, expected 'share-type:conditional'")
        return info

    def deny_share_type_none(self):
        info = self._expect_denied("civil-affairs on hukou.criminal_record", self.ca_exchange.Query,
                                   self._query_request(dataset="hukou.criminal_record", region=None),
                                   auth(self.tokens["civil-affairs"]), self.grpc.StatusCode.PERMISSION_DENIED,
                                   "SHARE_TYPE_NONE", M_QUERY, consumer_dept="civil-affairs",
                                   dataset="hukou.criminal_record")
        require(info.metadata.get("rule") == "share-type:none",
                f"SHARE_TYPE_NONE rule {info.metadata.get('rule')!r}, expected 'share-type:none'")
        return info

    def deny_missing_token(self):
        return self._expect_denied("civil-affairs without token", self.ca_exchange.Query,
                                   self._query_request(), [], self.grpc.StatusCode.UNAUTHENTICATED,
                                   "TOKEN_MISSING", M_QUERY, consumer_dept="civil-affairs", policy_rule=False)

    def deny_dept_mismatch(self):
        return self._expect_denied("civil-affairs cert with health token", self.ca_exchange.Query,
                                   self._query_request(), auth(self.tokens["health"]),
                                   self.grpc.StatusCode.PERMISSION_DENIED, "TOKEN_DEPT_MISMATCH", M_QUERY,
                                   consumer_dept="civil-affairs", policy_rule=False)


def check_audit(audit_dir: Path, log: CallLog):
    # Segments audit-<n>.jsonl, in order; checkpoint lines are not call records.
    segments = sorted(audit_dir.glob("audit-*.jsonl"))
    require(segments, f"no audit segments in {audit_dir}")
    records = []
    for seg in segments:
        for i, l in enumerate(seg.read_text(encoding="utf-8").splitlines()):
            if not l.strip():
                continue
            try:
                v = json.loads(l)
            except json.JSONDecodeError as e:
                raise CheckFailed(f"{seg.name}:{i + 1} is not JSON ({e}): {l[:200]}")
            if "checkpoint" not in v:
                records.append(v)
    # Refusals by the HTTP/2 layer (over the hard metadata cap): one record per connection.
    http2 = [r for r in records if r.get("method") == "(http2)"]
    records = [r for r in records if r.get("method") != "(http2)"]
    require(len(http2) == 1, f"{len(http2)} records of HTTP/2-level refusals, expected 1: {http2}")
    require(http2[0].get("reason") == "METADATA_TOO_LARGE" and http2[0].get("consumer_dept") == "civil-affairs",
            f"HTTP/2-level refusal recorded as {http2[0]}")
    problems = []
    # Calls cut short by a deadline or the client: the record says what the client got.
    for tid, got in log.cut_short.items():
        found = [r for r in records if r.get("trace_id") == tid]
        if not found and not got["from_gateway"]:
            continue  # the client's own timer fired before it sent the call: nothing reached us
        if len(found) != 1:
            problems.append(f"cut-short call {tid}: {len(found)} records")
            continue
        r = found[0]
        if got["code"] != "OK" and r.get("grpc_status") == "OK":
            # The one race left: the gateway committed and sent the answer in time, and the
            # client's own timer fired before it arrived. The record shows it: answered within
            # a millisecond of the caller's timeout (which grpc-timeout carries rounded up).
            close = r.get("timeout_us") is not None and r["latency_us"] + 1000 >= got["timeout_us"]
            if got["from_gateway"] or not close:
                problems.append(f"cut-short call {tid}: the client got {got['code']} but the record says OK: {r}")
        if got["from_gateway"] and r.get("grpc_status") != got["code"]:
            problems.append(f"cut-short call {tid}: the client got {got['code']} from the gateway, record {r.get('grpc_status')}")
        if r.get("grpc_status") in ("DEADLINE_EXCEEDED", "CANCELLED") and r.get("reason") != "PROVIDER_TIMEOUT":
            if not r.get("reached"):
                problems.append(f"cut-short call {tid}: no `reached` stage in {r}")
        if got.get("stream"):
            if r.get("grpc_status") != "CANCELLED" or r.get("reached") != "relay" or not r.get("rows"):
                problems.append(f"cancelled stream {tid}: recorded {r}")
    records = [r for r in records if r.get("trace_id") not in log.cut_short]
    if len(records) != len(log.calls):
        problems.append(f"audit has {len(records)} lines for {len(log.calls)} calls made")
    by_trace: dict[str, list[dict]] = {}
    for r in records:
        by_trace.setdefault(r.get("trace_id"), []).append(r)
    for c in log.calls:
        if not c["trace_id"]:
            problems.append(f"{c['label']}: no trace id observed, cannot find its audit line")
            continue
        found = by_trace.get(c["trace_id"], [])
        if len(found) != 1:
            problems.append(f"{c['label']}: trace id {c['trace_id']} appears {len(found)} times in the audit")
            continue
        r = found[0]
        for key in ("method", "decision", "reason", "grpc_status", "consumer_dept"):
            if r.get(key) != c[key]:
                problems.append(f"{c['label']}: audit {key}={r.get(key)!r}, expected {c[key]!r}")
        if c["rows"] is not None and r.get("rows") != c["rows"]:
            problems.append(f"{c['label']}: audit rows={r.get('rows')!r}, expected {c['rows']}")
        if c["dataset"] is not None and r.get("dataset") != c["dataset"]:
            problems.append(f"{c['label']}: audit dataset={r.get('dataset')!r}, expected {c['dataset']!r}")
        if c["fields_masked"] is not None:
            if r.get("fields_masked") != c["fields_masked"]:
                problems.append(f"{c['label']}: audit fields_masked={r.get('fields_masked')!r}, "
                                f"expected {c['fields_masked']}")
            returned = r.get("fields_returned") or []
            if "address" in returned or "phone" in returned:
                problems.append(f"{c['label']}: audit fields_returned lists ungranted fields {returned}")
    require(not problems, "audit trail mismatches:\n  " + "\n  ".join(problems))
    print(f"      audit: {len(records)} lines, {len(log.calls)} calls", flush=True)


def run(results: Results, tmp: Path, state: dict):
    """The whole scenario; returns early when a step that later ones need has failed."""
    import grpc

    pb = results.run("generate python stubs from proto/", generate_stubs, tmp / "stubs")
    if pb is None:
        return
    policy = tmp / "policy.yaml"
    assigned = results.run("write policy copy with free provider ports", write_policy_copy, policy, free_ports(2))
    if assigned is None:
        return
    print(f"      providers: {assigned}", flush=True)
    gw = state["gateway"] = Gateway(tmp, policy)
    addr = results.run("start xgate demo", gw.start)
    if addr is None:
        return
    print(f"      gateway at {addr}", flush=True)

    tokens = {}
    for dept in ("civil-affairs", "health"):
        tokens[dept] = results.run(f"mint {dept} token", mint_token, dept, f"e2e@{dept}")
        if tokens[dept] is None:
            return

    log = CallLog()
    scenario = state["scenario"] = Scenario(grpc, pb, addr, tokens, log)
    results.run("ListDatasets: 3 datasets", scenario.list_datasets)
    results.run("DescribeDataset: id_number masked", scenario.describe)
    results.run("Query page_size 5: 5 rows, id_number masked", scenario.query_first_page)
    results.run("Query: paging to the end", scenario.query_all_pages)
    results.run("QueryStream: every batch, same rows as paging", scenario.query_stream)
    results.run("deny: health, no grant -> GRANT_MISSING", scenario.deny_no_grant)
    results.run("deny: share type none -> SHARE_TYPE_NONE", scenario.deny_share_type_none)
    results.run("deny: missing token -> TOKEN_MISSING", scenario.deny_missing_token)
    results.run("deny: health token on civil-affairs cert -> TOKEN_DEPT_MISMATCH", scenario.deny_dept_mismatch)
    for size in (40 << 10, 200 << 10, 1 << 20):
        results.run(f"metadata of {size >> 10} KiB -> RESOURCE_EXHAUSTED METADATA_TOO_LARGE, connection usable",
                    scenario.metadata_too_large, size)
    over_cap = results.run("metadata of 6 MiB (over the HTTP/2 cap) -> refused", scenario.metadata_over_the_hard_cap)
    if over_cap is not None:
        print(f"      6 MiB of metadata: the client saw {over_cap}", flush=True)
    results.run("grpc-timeout 1n / 50u / 2m: client and record agree", scenario.tiny_deadlines)
    results.run("QueryStream cancelled by the client after one batch", scenario.cancelled_stream)
    results.run("grpc.health.v1: SERVING", scenario.health_service)
    results.run("server reflection: the interface without proto files", scenario.reflection)
    scenario.close()
    state["scenario"] = None

    def stop():
        rc = gw.stop()
        require(rc == 0, f"xgate demo exited {rc} after SIGTERM")

    results.run("SIGTERM: graceful exit 0", stop)
    if gw.proc.poll() is not None:  # it exited (cleanly or not): its audit file is final
        results.run(f"audit trail: one line per call ({len(log.calls)} calls)", check_audit,
                    gw.audit_dir, log)


def main() -> int:
    results = Results()
    binary = xgate_bin()
    print(f"xgate e2e: binary {binary}", flush=True)
    if not binary.exists():
        results.failed.append(("setup", f"{binary} does not exist (build it, or set XGATE_BIN)"))
        return summary(results)

    state: dict = {"gateway": None, "scenario": None}
    with tempfile.TemporaryDirectory(prefix="xgate-e2e-") as tmpname:
        try:
            run(results, Path(tmpname), state)
        except BaseException as e:  # harness bug or Ctrl-C: still stop the gateway below
            results.failed.append(("harness", f"{type(e).__name__}: {e}"))
            traceback.print_exc()
        finally:
            if state["scenario"] is not None:
                state["scenario"].close()
            gw = state["gateway"]
            if gw is not None:
                gw.kill()
                if results.failed:  # show what the gateway said
                    print(gw.diagnostics(), flush=True)
    return summary(results)


def summary(results: Results) -> int:
    print()
    if results.failed:
        print("Failures:")
        for name, msg in results.failed:
            print(f"  - {name}: {msg}")
    print(f"e2e: {len(results.passed)} passed, {len(results.failed)} failed", flush=True)
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
