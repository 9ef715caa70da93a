#!/usr/bin/env python3
"""The bureau's console in a real browser: Debian's headless Chromium, driven by selenium
through Debian's chromedriver, signed in with the dev officers' client certificates.

The test:
  * starts `xgate demo` (console on a free port, sample providers on free ports) and makes a
    little traffic with `xgate call`;
  * per role (bureau, department administrator, auditor) gives Chromium its own NSS database
    holding that officer's certificate and the dev CA, and a managed policy that selects the
    certificate for the console's URL without asking;
  * checks what each role sees and that other pages answer 403; the session cookie's flags;
    Explain against `xgate policy explain`; a change preview of a tightening (the candidate
    chosen with the page's file input) against the calls made; a form posted without its
    CSRF token is refused;
  * signs in without a certificate through the province's IdP (OpenID Connect): the real
    node-oidc-provider (tests/e2e/idp), its login and consent pages in the same browser; an
    officer lands on their role's page, an identity no officer has and a forged callback are
    refused and recorded;
  * writes a screenshot of every page under target/console-screenshots/.

Run from the repository root:  python tests/e2e/test_console.py
Needs: chromium, chromium-driver, libnss3-tools (bash .ci/deps), selenium (requirements.txt),
node with `npm ci --prefix tests/e2e/idp` for the IdP checks (skipped, saying so, without it).
Environment: XGATE_BIN (default target/debug/xgate). Exits 0 when every check passed; the
last line is "console e2e: N passed, M failed". Skips (exit 0, saying so) without Chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CERTS = REPO / "certs-dev"
SHOTS = REPO / "target" / "console-screenshots"
POLICY_DIR = Path("/etc/chromium/policies/managed")


def xgate_bin() -> Path:
    p = Path(os.environ.get("XGATE_BIN", "target/debug/xgate"))
    return p if p.is_absolute() else REPO / p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PASSED: list[str] = []
FAILED: list[str] = []


def check(name: str, fn):
    try:
        fn()
        PASSED.append(name)
        print(f"ok   {name}", flush=True)
    except Exception:  # noqa: BLE001 - a failed check is reported, the run goes on
        FAILED.append(name)
        print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)


IDP = REPO / "tests" / "e2e" / "idp"
IDP_SECRET = "console-e2e-secret"


class Idp:
    """The province's IdP for the sign-in checks: node-oidc-provider on a free port."""

    def __init__(self, tmp: Path, console_port: int):
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            ["node", str(IDP / "idp.mjs"), str(self.port), "xgate-console", IDP_SECRET,
             f"https://localhost:{console_port}/signin/oidc/callback"],
            cwd=IDP, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=open(tmp / "idp.stderr", "wb"), text=True)
        for line in self.proc.stdout:
            if line.startswith("listening"):
                break
        else:
            raise SystemExit("the IdP did not start: " + (tmp / "idp.stderr").read_text())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def idp_available() -> bool:
    return bool(shutil.which("node")) and (IDP / "node_modules" / "oidc-provider").is_dir()


class Demo:
    def __init__(self, tmp: Path, console: int, oidc_issuer: str | None = None):
        self.tmp = tmp
        self.port = free_port()
        self.console = console
        self.audit = tmp / "audit"
        oidc = ["--console-oidc", oidc_issuer] if oidc_issuer else []
        self.proc = subprocess.Popen(
            [str(xgate_bin()), "demo", "--listen", f"127.0.0.1:{self.port}", "--console",
             f"127.0.0.1:{self.console}", "--providers-port-base", "0", "--audit-dir",
             str(self.audit), "--certs", "certs-dev", *oidc],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            env=dict(os.environ, XGATE_CONSOLE_OIDC_SECRET=IDP_SECRET),
            stderr=open(tmp / "demo.stderr", "wb"), text=True)
        deadline = time.monotonic() + 60
        for line in self.proc.stdout:
            if "console https://" in line:
                break
            if time.monotonic() > deadline:
                raise SystemExit("the demo did not start")
        else:
            raise SystemExit("the demo exited: " + (tmp / "demo.stderr").read_text())

    def call(self, dept: str, *args: str) -> str:
        out = subprocess.run(
            [str(xgate_bin()), "call", "--gateway", f"https://127.0.0.1:{self.port}", "--as", dept,
             *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Browser:
    """Chromium signed in as one officer: its own HOME (NSS database) and profile. With a
    `stem` that is not a certificate's (`idp-…`), the database holds only the dev CA: a
    browser with no officer certificate."""

    def __init__(self, tmp: Path, stem: str, url: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.home = tmp / f"home-{stem}"
        nss = self.home / ".pki" / "nssdb"
        nss.mkdir(parents=True)
        subprocess.run(["certutil", "-N", "-d", f"sql:{nss}", "--empty-password"], check=True,
                       capture_output=True)
        if (CERTS / f"{stem}.pem").exists():
            p12 = tmp / f"{stem}.p12"
            subprocess.run(["openssl", "pkcs12", "-export", "-in", str(CERTS / f"{stem}.pem"), "-inkey",
                            str(CERTS / f"{stem}.key"), "-certfile", str(CERTS / "ca.pem"), "-out",
                            str(p12), "-passout", "pass:"], check=True, capture_output=True)
            subprocess.run(["pk12util", "-i", str(p12), "-d", f"sql:{nss}", "-W", ""], check=True,
                           capture_output=True)
        subprocess.run(["certutil", "-A", "-d", f"sql:{nss}", "-n", "xgate-dev-ca", "-t", "CT,C,C", "-i",
                        str(CERTS / "ca.pem")], check=True, capture_output=True)
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1300,1000", "--lang=zh-CN",
                  f"--user-data-dir={tmp / f'profile-{stem}'}"]:
            opts.add_argument(a)
        env = dict(os.environ, HOME=str(self.home))
        service = Service("/usr/bin/chromedriver", env=env)
        self.driver = webdriver.Chrome(service=service, options=opts)
        self.driver.set_page_load_timeout(30)
        self.url = url
        self.stem = stem

    def open(self, path: str) -> str:
        self.driver.get(self.url + path)
        return self.driver.page_source

    def shot(self, name: str):
        SHOTS.mkdir(parents=True, exist_ok=True)
        h = self.driver.execute_script("return document.body.scrollHeight")
        self.driver.set_window_size(1300, max(800, min(int(h) + 40, 6000)))
        self.driver.save_screenshot(str(SHOTS / f"{self.stem}-{name}.png"))

    def close(self):
        self.driver.quit()


def wait_for(driver, element_id: str, seconds: float = 15):
    """The element, once the page that has it has loaded (a click does not wait for it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds).until(ec.presence_of_element_located((By.ID, element_id)))


def cli_explain(consumer, system, dataset, purpose) -> str:
    out = subprocess.run(
        [str(xgate_bin()), "policy", "explain", "--policy", "deploy/dev/policy.yaml", "--consumer",
         consumer, "--system", system, "--dataset", dataset, "--purpose", purpose],
        cwd=REPO, capture_output=True, text=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith(("ALLOW", "DENY")))
    return "allow" if line.startswith("ALLOW") else "deny " + line.split()[1]


def main() -> int:
    if not (shutil.which("chromium") and shutil.which("chromedriver") and shutil.which("certutil")):
        print("console e2e: skipped (chromium, chromedriver or certutil missing: bash .ci/deps)")
        return 0
    try:
        import selenium  # noqa: F401
    except ImportError:
        print("console e2e: skipped (selenium missing: tests/e2e/requirements.txt)")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="xgate-console-e2e-"))
    console = free_port()
    idp = Idp(tmp, console) if idp_available() else None
    if idp is None:
        print("console e2e: the IdP sign-in checks are skipped (node, or `npm ci --prefix tests/e2e/idp`, missing)")
    demo = Demo(tmp, console, idp.issuer if idp else None)
    url = f"https://localhost:{demo.console}"
    # Chromium picks the (only) certificate in the profile's NSS database for this URL.
    POLICY_DIR.mkdir(parents=True, exist_ok=True)
    policy_file = POLICY_DIR / f"xgate-console-test-{demo.console}.json"
    policy_file.write_text(json.dumps({"AutoSelectCertificateForUrls": [
        json.dumps({"pattern": url, "filter": {}})]}))
    browsers: list[Browser] = []
    try:
        for _ in range(3):
            demo.call("civil-affairs", "query", "hukou.person_basic", "--purpose", "subsidy-eligibility",
                      "--where", "region_code=330106", "--page-size", "2")
        demo.call("health", "query", "hukou.person_basic", "--purpose", "medical-insurance")

        bureau = Browser(tmp, "officer-bureau", url)
        browsers.append(bureau)

        def bureau_pages():
            for path, name, text in [("/overview", "overview", "策略版本"), ("/catalogue", "catalogue", "资源目录"),
                                     ("/departments/civil-affairs", "department", "其获得的授权"),
                                     ("/explain", "explain", "决策解释"), ("/preview", "preview", "变更预演"),
                                     ("/audit", "audit", "审计查询"), ("/league", "league", "共享排行")]:
                src = bureau.open(path)
                assert text in src, f"{path}: no {text}"
                bureau.shot(name)
            # The last hour on the overview counts the calls made above (3 allowed, 1 denied).
            src = bureau.open("/overview")
            assert re.search(r"<th>调用</th><td>[4-9]</td>", src), src

        check("bureau sees every page", bureau_pages)

        def cookie_flags():
            bureau.open("/overview")
            c = [c for c in bureau.driver.get_cookies() if c["name"] == "__Host-xgate_session"]
            assert c, bureau.driver.get_cookies()
            assert c[0]["secure"] and c[0]["httpOnly"] and c[0]["sameSite"] == "Strict", c

        check("session cookie is Secure, HttpOnly, SameSite=Strict", cookie_flags)

        def explain_matches_cli():
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import Select
            for consumer, system, dataset, purpose in [
                ("civil-affairs", "subsidy", "hukou.person_basic", "subsidy-eligibility"),
                ("civil-affairs", "subsidy", "hukou.person_basic", "marketing"),
                ("health", "his", "hukou.person_basic", "medical-insurance"),
                ("civil-affairs", "subsidy", "hukou.criminal_record", "subsidy-eligibility"),
            ]:
                bureau.open("/explain")
                d = bureau.driver
                Select(d.find_element(By.NAME, "consumer")).select_by_value(consumer)
                Select(d.find_element(By.NAME, "dataset")).select_by_value(dataset)
                for name, v in [("system", system), ("purpose", purpose)]:
                    e = d.find_element(By.NAME, name)
                    e.clear()
                    e.send_keys(v)
                d.find_element(By.CSS_SELECTOR, "form.grid button[type=submit]").click()
                decision = wait_for(d, "decision").text
                page = "allow" if decision == "允许" else "deny " + d.find_element(By.ID, "reason").text
                want = cli_explain(consumer, system, dataset, purpose)
                assert page == want, f"{consumer} {dataset} {purpose}: page {page}, cli {want}"
            bureau.shot("explain-result")

        check("Explain matches `xgate policy explain`", explain_matches_cli)

        def preview_tightening():
            from selenium.webdriver.common.by import By
            current = (REPO / "deploy/dev/policy.yaml").read_text()
            candidate = current.replace("purposes: [subsidy-eligibility", "purposes: [subsidy-review", 1)
            assert candidate != current
            cand = tmp / "candidate.yaml"
            cand.write_text(candidate)
            bureau.open("/preview")
            d = bureau.driver
            d.find_element(By.ID, "candidate-file").send_keys(str(cand))
            # console.js reads the file into the text area.
            deadline = time.monotonic() + 5
            while "subsidy-review" not in d.find_element(By.ID, "candidate").get_property("value"):
                assert time.monotonic() < deadline, "the file was not read into the form"
                time.sleep(0.1)
            d.find_element(By.CSS_SELECTOR, "form.stack button[type=submit]").click()
            table = wait_for(d, "impact").get_attribute("outerHTML")
            row = next(r for r in table.split("<tr>") if "<td>civil-affairs</td>" in r)
            assert '<td class="num refused">3</td>' in row, row
            assert "PURPOSE_NOT_ALLOWED" in row, row
            bureau.shot("preview-result")

        check("change preview counts a tightening on the calls made", preview_tightening)

        def csrf_refused():
            from selenium.webdriver.common.by import By
            bureau.open("/overview")
            # A form like the language switch, without its token (as a forged page would send).
            bureau.driver.execute_script(
                "const f=document.createElement('form');f.method='post';f.action='/lang';"
                "const i=document.createElement('input');i.name='lang';i.value='en';f.appendChild(i);"
                "document.body.appendChild(f);f.submit();")
            time.sleep(0.5)
            body = bureau.driver.find_element(By.TAG_NAME, "body").text
            assert "403" in body, body

        check("a form without its CSRF token is refused", csrf_refused)

        wang = Browser(tmp, "officer-civil-affairs", url)
        browsers.append(wang)

        def dept_admin():
            src = wang.open("/")
            assert "民政" in src or "civil-affairs" in src, src
            wang.shot("department")
            for path in ["/overview", "/departments/health", "/preview", "/league"]:
                src = wang.open(path)
                assert "403" in src, f"{path}: {src[:400]}"
            wang.shot("forbidden")

        check("department administrator: its department, 403 elsewhere", dept_admin)

        zhao = Browser(tmp, "officer-auditor", url)
        browsers.append(zhao)

        def auditor():
            src = zhao.open("/audit?consumer=civil-affairs")
            assert 'id="matched"' in src, src
            zhao.shot("audit")
            for path in ["/overview", "/catalogue", "/explain"]:
                assert "403" in zhao.open(path), path

        check("auditor: audit search, 403 elsewhere", auditor)

        if idp:
            def idp_signin(stem: str, login: str) -> Browser:
                """A browser with no certificate signs in at the IdP as `login`."""
                from selenium.webdriver.common.by import By
                b = Browser(tmp, stem, url)
                browsers.append(b)
                src = b.open("/overview")
                assert "401" in src, src[:400]
                b.shot("unauthenticated")
                b.driver.find_element(By.CSS_SELECTOR, 'a[href="/signin/oidc"]').click()
                deadline = time.monotonic() + 15
                while not b.driver.find_elements(By.NAME, "login"):
                    assert time.monotonic() < deadline, b.driver.page_source[:400]
                    time.sleep(0.1)
                assert b.driver.current_url.startswith(idp.issuer), b.driver.current_url
                b.driver.find_element(By.NAME, "login").send_keys(login)
                b.driver.find_element(By.NAME, "password").send_keys("any")
                b.driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
                # The IdP's consent page, then back to the console.
                deadline = time.monotonic() + 15
                while not b.driver.current_url.startswith(url):
                    assert time.monotonic() < deadline, b.driver.current_url
                    buttons = b.driver.find_elements(By.CSS_SELECTOR, "button[type=submit]")
                    try:
                        if buttons and "interaction" in b.driver.current_url and not b.driver.find_elements(
                                By.NAME, "login"):
                            buttons[0].click()
                    except Exception:  # noqa: BLE001 - the page moved on under the click
                        pass
                    time.sleep(0.2)
                return b

            def idp_bureau():
                b = idp_signin("idp-li", "li.ming")
                deadline = time.monotonic() + 10
                while "/overview" not in b.driver.current_url:
                    assert time.monotonic() < deadline, (b.driver.current_url, b.driver.page_source[:400])
                    time.sleep(0.1)
                src = b.driver.page_source
                assert "李明" in src and "策略版本" in src, src[:600]
                b.shot("idp-overview")
                c = [c for c in b.driver.get_cookies() if c["name"] == "__Host-xgate_session"]
                assert c and c[0]["secure"] and c[0]["httpOnly"] and c[0]["sameSite"] == "Strict", c
                assert not [c for c in b.driver.get_cookies() if c["name"] == "__Host-xgate_oidc"]

            check("IdP sign-in: a bureau officer lands on the overview", idp_bureau)

            def idp_dept_admin():
                b = idp_signin("idp-wang", "wang.fang")
                deadline = time.monotonic() + 10
                while "/departments/civil-affairs" not in b.driver.current_url:
                    assert time.monotonic() < deadline, b.driver.current_url
                    time.sleep(0.1)
                assert "403" in b.open("/overview")

            check("IdP sign-in: a department administrator gets its role's pages only", idp_dept_admin)

            def idp_stranger():
                b = idp_signin("idp-mallory", "mallory")
                deadline = time.monotonic() + 10
                while "403" not in b.driver.page_source:
                    assert time.monotonic() < deadline, b.driver.page_source[:400]
                    time.sleep(0.1)
                assert "此身份未登记为控制台官员" in b.driver.page_source, b.driver.page_source[:600]
                b.shot("idp-not-officer")
                assert "401" in b.open("/overview"), "no session was opened"

            check("IdP sign-in: an identity no officer has is refused", idp_stranger)

            def forged_callback():
                b = Browser(tmp, "idp-forged", url)
                browsers.append(b)
                src = b.open("/signin/oidc/callback?code=stolen&state=forged")
                assert "403" in src and "登录未完成" in src, src[:600]

            check("IdP sign-in: a callback this browser did not start is refused", forged_callback)
    finally:
        for b in browsers:
            try:
                b.close()
            except Exception:  # noqa: BLE001
                pass
        policy_file.unlink(missing_ok=True)
        demo.stop()
        if idp:
            idp.stop()

    def recorded():
        recs = []
        for f in sorted(demo.audit.glob("audit-*.jsonl")):
            recs += [json.loads(l) for l in f.read_text().splitlines() if l.startswith('{"seq"')]
        denied = [r for r in recs if r.get("action") == "console.denied"]
        assert any("GET /overview -> 403" in r.get("detail", "") and "王芳" in r.get("actor", "")
                   for r in denied), denied
        assert any("no valid CSRF token" in r.get("detail", "") for r in denied), denied
        if idp:
            signins = [r for r in recs if r.get("action") == "console.signin"]
            assert any("李明" in r.get("actor", "") and "IdP li.ming" in r.get("actor", "")
                       and "with the IdP" in r.get("detail", "") for r in signins), signins
            assert any("identity mallory" in r.get("actor", "") and "not a console officer" in r.get("detail", "")
                       for r in denied), denied
            assert any("callback -> refused: sign-in state" in r.get("detail", "") for r in denied), denied

    check("refusals are on the audit trail", recorded)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"screenshots in {SHOTS}")
    print(f"console e2e: {len(PASSED)} passed, {len(FAILED)} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
