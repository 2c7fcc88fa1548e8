"""
The web dashboard (L{cw.master.web}): the metrics text and failure records as pure
functions, token protection on an in-process site, and C{/api/status},
C{/metrics} and the live page against a real master with two workers, the
page in real headless Chromium.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from twisted.internet import address, reactor, threads
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from cw.client import ClusterExecutor
from cw.master import web as web
from cw.test.devtools import CHROMIUM, Browser
from cw.test.procs import DEADLINE, ROOT, Processes, executor, wait_until
from cw.wire import commands as P

SECRET = b"0123456789abcdef0123456789abcdef"


def fail_loudly(n):
    print(f"working on {n}")
    print(f"giving up on {n}", file=sys.stderr)
    raise ValueError(f"dashboard test failure {n}")


def nap(seconds):
    time.sleep(seconds)
    return seconds


# -- a small Prometheus text-format parser ---------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def _unescape(match: re.Match) -> str:
    return "\n" if match.group(1) == "n" else match.group(1)


def parse_prometheus(text: str) -> dict:
    """
    Parse the Prometheus text exposition format strictly enough to catch
    mistakes: every sample must belong to a family declared with C{# TYPE}
    (a counter's samples may not be negative) and have a float value.
    Returns C{{name: {"type", "help", "samples": [(labels, value)]}}}.
    """
    families: dict[str, dict] = {}
    assert text.endswith("\n"), "the exposition must end with a newline"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                family = families.setdefault(parts[2], {"samples": []})
                if parts[1] == "TYPE":
                    assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                    assert not family["samples"], f"line {number}: TYPE after samples"
                    family["type"] = parts[3]
                else:
                    family["help"] = parts[3] if len(parts) > 3 else ""
            continue
        match = _SAMPLE.match(line)
        assert match, f"line {number} is not a sample: {line!r}"
        name, labels_text, value = match.groups()
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                label = _LABEL.match(labels_text, pos)
                assert label, f"line {number}: bad labels {labels_text!r}"
                labels[label.group(1)] = re.sub(r"\\(.)", _unescape, label.group(2))
                pos = label.end()
        family = families.get(name)
        assert family and "type" in family, f"line {number}: {name} has no # TYPE"
        number_value = float(value)
        if family["type"] == "counter":
            assert number_value >= 0, line
        family["samples"].append((labels, number_value))
    return families


def total(families: dict, name: str) -> float:
    return sum(value for _, value in families[name]["samples"])


# -- pure parts ---------------------------------------------------------------


class FakeMaster:
    """What L{cw.master.web} needs of a master: C{status()}, C{failures}, C{secret}."""

    def __init__(self, secret: bytes | None = SECRET) -> None:
        self.secret = secret
        self.failures = web.FailureLog()

    def status(self) -> dict:
        return {
            "uptime": 12.5,
            "queued": 7,
            "completed": 30,
            "rate": 1.5,
            "workers": [
                {
                    "id": 1,
                    "peer": 'a"b\\c:1',
                    "slots": 2,
                    "held": 3,
                    "busy": 2,
                    "draining": False,
                    "completed": 20,
                    "failed": 1,
                },
                {
                    "id": 2,
                    "peer": "node2:7",
                    "slots": 4,
                    "held": 1,
                    "busy": 1,
                    "draining": True,
                    "completed": 10,
                    "failed": 0,
                },
            ],
            "clients": [
                {"id": 3, "peer": "me:9", "queued": 7, "running": 4, "submitted": 41, "completed": 30}
            ],
        }


#: An adaptive pool as the master's status shows it.
POOL = {
    "now": 1000.0,
    "min_workers": 0,
    "max_workers": 4,
    "idle_timeout": 60.0,
    "target": 3,
    "running": 2,
    "pending": 1,
    "draining": 1,
    "decisions": [{"time": 990.0, "action": "submit 2", "reason": "40 jobs queued"}],
    "calls": {"sbatch": 2, "squeue": 7},
}


class PureTests(unittest.TestCase):
    def test_metrics_text(self):
        """
        L{web.render_metrics} writes every family with HELP and TYPE, totals
        and per-worker/per-client series, and escapes label values.
        """
        status = web.dashboard_status(FakeMaster())
        status["failed"] = 1
        families = parse_prometheus(web.render_metrics(status))
        for name, family in families.items():
            self.assertTrue(family.get("help"), name)
            self.assertTrue(family["samples"], name)
        self.assertEqual(families["cw_jobs_completed_total"]["type"], "counter")
        self.assertEqual(total(families, "cw_jobs_completed_total"), 30)
        self.assertEqual(total(families, "cw_jobs_failed_total"), 1)
        self.assertEqual(total(families, "cw_jobs_queued"), 7)
        self.assertEqual(total(families, "cw_workers"), 2)
        self.assertEqual(total(families, "cw_slots"), 6)
        self.assertEqual(total(families, "cw_slots_busy"), 3)
        self.assertEqual(total(families, "cw_clients"), 1)
        self.assertEqual(total(families, "cw_uptime_seconds"), 12.5)
        self.assertEqual(
            families["cw_worker_slots"]["samples"],
            [({"id": "1", "peer": 'a"b\\c:1'}, 2.0), ({"id": "2", "peer": "node2:7"}, 4.0)],
        )
        self.assertEqual(families["cw_worker_draining"]["samples"][1][1], 1.0)

    def test_pool_metrics(self):
        """An adaptive pool's size and bounds are gauges; its SLURM calls a counter per command."""
        status = web.dashboard_status(FakeMaster())
        status["pool"] = dict(POOL)
        families = parse_prometheus(web.render_metrics(status))
        self.assertEqual(total(families, "cw_pool_target_workers"), 3)
        self.assertEqual(total(families, "cw_pool_running_workers"), 2)
        self.assertEqual(total(families, "cw_pool_pending_workers"), 1)
        self.assertEqual(total(families, "cw_pool_draining_workers"), 1)
        self.assertEqual(total(families, "cw_pool_max_workers"), 4)
        self.assertEqual(
            families["cw_pool_slurm_calls_total"]["samples"],
            [({"command": "sbatch"}, 2.0), ({"command": "squeue"}, 7.0)],
        )
        without = parse_prometheus(web.render_metrics(FakeMaster().status()))
        self.assertNotIn("cw_pool_target_workers", without)

    def test_failure_log(self):
        """
        Only failed results are recorded, from their JSON reports (garbage
        is wrapped, nothing is unpickled), newest last and bounded.
        """
        clock = iter(range(100, 200)).__next__
        failures = web.FailureLog(size=2, clock=clock)
        failures.record(
            [
                P.Result(1, 1, P.Outcome.OK, b"\x80\x04K\x01."),
                P.Result(
                    1,
                    2,
                    P.Outcome.RAISED,
                    P.error_report("ValueError", "bad", "Traceback...", host="h", pid=5),
                ),
                P.Result(1, 3, P.Outcome.CRASHED, b"\x80\x04not json"),
                P.Result(2, 4, P.Outcome.FAILED, P.error_report("PayloadTooLarge", "big")),
            ]
        )
        self.assertEqual(failures.failed, 3)
        self.assertEqual([f["key"] for f in failures.recent], [[1, 3], [2, 4]])
        self.assertEqual(failures.recent[0]["type"], "Error")
        self.assertEqual(failures.recent[1]["type"], "PayloadTooLarge")
        failures.record([P.Result(1, 5, P.Outcome.RAISED, P.error_report("E", "m", "tb", host="h", pid=5))])
        self.assertEqual(
            failures.recent[-1],
            {
                "key": [1, 5],
                "type": "E",
                "message": "m",
                "traceback": "tb",
                "host": "h",
                "pid": 5,
                "time": 103,
                "stdout": "",
                "stderr": "",
            },
        )
        json.dumps(list(failures.recent))

    def test_failure_output(self):
        """
        A failure keeps the last lines its job wrote, bounded in lines and
        characters, decoded without trust (bad UTF-8 is replaced).
        """
        failures = web.FailureLog()
        many = b"".join(b"line %d\n" % n for n in range(1000))
        failures.record(
            [
                P.Result(1, 1, P.Outcome.RAISED, P.error_report("E", "m"), many, b"bad \xff byte\n"),
                P.Result(1, 2, P.Outcome.RAISED, P.error_report("E", "m"), b"x" * 100_000),
            ]
        )
        first, second = failures.recent
        self.assertEqual(first["stdout"].splitlines(), [f"line {n}" for n in range(980, 1000)])
        self.assertEqual(first["stderr"], "bad \ufffd byte\n")
        self.assertEqual(second["stdout"], "x" * web.OUTPUT_CHARS)
        self.assertEqual(second["stderr"], "")

    def test_web_description(self):
        """The dashboard listens on loopback unless an interface is named."""
        self.assertEqual(web.web_description("8494"), "tcp:8494:interface=127.0.0.1")
        self.assertEqual(web.web_description(8494), "tcp:8494:interface=127.0.0.1")
        self.assertEqual(web.web_description("tcp:8494"), "tcp:8494:interface=127.0.0.1")
        self.assertEqual(web.web_description("tcp:port=0"), "tcp:port=0:interface=127.0.0.1")
        self.assertEqual(web.web_description("tcp:8494:interface=0.0.0.0"), "tcp:8494:interface=0.0.0.0")
        self.assertEqual(web.web_description("unix:/tmp/cw.sock"), "unix:/tmp/cw.sock")

    def test_is_loopback(self):
        self.assertTrue(web.is_loopback(address.IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertTrue(web.is_loopback(address.IPv6Address("TCP", "::1", 1)))
        self.assertFalse(web.is_loopback(address.IPv4Address("TCP", "0.0.0.0", 1)))
        self.assertFalse(web.is_loopback(address.IPv4Address("TCP", "10.1.2.3", 1)))
        self.assertFalse(web.is_loopback(address.UNIXAddress("/tmp/cw.sock")))

    def test_token(self):
        """The token is an HMAC of the secret: stable, secret-specific, not the secret."""
        token = web.dashboard_token(SECRET)
        self.assertEqual(token, web.dashboard_token(SECRET))
        self.assertNotEqual(token, web.dashboard_token(SECRET[::-1]))
        self.assertEqual(len(token), 64)
        self.assertNotIn(SECRET.decode(), token)

    def test_page_is_self_contained(self):
        """The page loads nothing from elsewhere: no external scripts, styles or images."""
        html = web.page().decode()
        self.assertNotRegex(html, r"""(src|href)\s*=\s*["']?(https?:)?//""")
        self.assertNotIn("@import", html)
        self.assertIn("api/status", html)


# -- protection, on a real in-process site -----------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def fetch(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """GET without following redirects: (status, headers, body)."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class ProtectionTests(unittest.TestCase):
    def serve(self, master: FakeMaster, required: bool = True) -> str:
        """Serve the dashboard on 127.0.0.1 with protection forced on (or not)."""
        dashboard = web.WebDashboard(master, "tcp:0")
        dashboard.guard.required = required and master.secret is not None
        port = reactor.listenTCP(0, dashboard.site, interface="127.0.0.1")
        dashboard.guard.hosts = web.HostCheck(port.getHost())
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/"

    def test_token_required(self):
        """
        With protection on, every path answers 401 without the token or with
        a wrong one, and 200 with it as Basic password, Bearer token, or the
        cookie that C{?token=} sets (whose redirect drops the token).
        """
        url = self.serve(FakeMaster())
        token = web.dashboard_token(SECRET)

        def body():
            for path in ("", "api/status", "metrics", "nothing"):
                status, headers, _ = fetch(url + path)
                self.assertEqual(status, 401, path)
                self.assertIn("Basic", headers["WWW-Authenticate"])
            wrong = base64.b64encode(b"u:" + b"0" * 64).decode()
            self.assertEqual(fetch(url, {"Authorization": f"Basic {wrong}"})[0], 401)
            self.assertEqual(fetch(url + "api/status?token=" + "0" * 64)[0], 401)
            self.assertEqual(fetch(url, {"Cookie": "cw_dashboard=" + "0" * 64})[0], 401)

            basic = base64.b64encode(f"anyone:{token}".encode()).decode()
            status, _, data = fetch(url + "api/status", {"Authorization": f"Basic {basic}"})
            self.assertEqual(status, 200)
            self.assertEqual(json.loads(data)["queued"], 7)
            status, _, data = fetch(url + "metrics", {"Authorization": f"Bearer {token}"})
            self.assertEqual(status, 200)
            self.assertIn(b"cw_jobs_queued 7", data)

            status, headers, _ = fetch(url + f"?token={token}")
            self.assertEqual(status, 302)
            self.assertEqual(headers["Location"], "/")
            cookie = headers["Set-Cookie"]
            self.assertIn("HttpOnly", cookie)
            self.assertIn("SameSite=strict", cookie)
            value = cookie.split(";")[0]
            status, _, data = fetch(url, {"Cookie": value})
            self.assertEqual(status, 200)
            self.assertIn(b"<title>cw dashboard</title>", data)

        return threads.deferToThread(body)

    def test_loopback_needs_token(self):
        """
        On loopback too, L{web.WebDashboard} needs the token (401 without,
        200 with; 404 for unknown paths), which it wrote to its token file.
        """
        master = FakeMaster()
        token_file = Path(self.mktemp())
        dashboard = web.WebDashboard(master, "tcp:0", token_file=str(token_file))
        d = dashboard.start(reactor)

        def check(port):
            self.addCleanup(dashboard.stop)
            self.assertTrue(dashboard.guard.required)
            url = dashboard.url
            self.assertEqual(url, f"http://127.0.0.1:{port.getHost().port}/")
            bearer = {"Authorization": "Bearer " + token_file.read_text().strip()}

            def body():
                self.assertEqual(fetch(url + "api/status")[0], 401)
                self.assertEqual(fetch(url + "api/status", bearer)[0], 200)
                self.assertEqual(fetch(url + "nothing", bearer)[0], 404)

            return threads.deferToThread(body)

        return d.addCallback(check)

    def test_not_loopback(self):
        """
        Bound to another address (here pretended: this machine may only use
        loopback), protection is on, the URL and the token file's path are
        logged (never the token), and the address file holds the URL.
        """

        class FakePort:
            def getHost(self):
                return address.IPv4Address("TCP", "10.1.2.3", 8494)

            def stopListening(self):
                return None

        url_file = Path(self.mktemp())
        token_file = Path(self.mktemp())
        dashboard = web.WebDashboard(
            FakeMaster(), "tcp:8494:interface=10.1.2.3", str(url_file), token_file=str(token_file)
        )
        with capturedLogs() as events:
            dashboard._listening(FakePort())
        self.assertTrue(dashboard.guard.required)
        token = web.dashboard_token(SECRET)
        (line,) = [formatEvent(e) for e in events]
        self.assertIn("http://10.1.2.3:8494/", line)
        self.assertIn(str(token_file), line)
        self.assertNotIn(token, line)
        self.assertEqual(token_file.read_text(), token + "\n")
        self.assertEqual(url_file.read_text(), "http://10.1.2.3:8494/\n")
        dashboard.stop()
        self.assertFalse(url_file.exists())
        self.assertFalse(token_file.exists())

    def test_options(self):
        """C{cw-master --web} reaches the service; a URL file needs C{--web}."""
        from twisted.python import usage

        from cw.master import service as master

        options = master.Options()
        options.parseOptions(
            ["--web", "tcp:0", "--web-address-file", "web.url", "--web-token-file", "web.token"]
            + ["--web-host", "node12.example.org,Node12", "--web-open"]
        )
        service = master.makeService(options)
        self.assertEqual(service.web.description, "tcp:0:interface=127.0.0.1")
        self.assertEqual(service.web.address_file, "web.url")
        self.assertEqual(service.web.token_file, Path("web.token"))
        self.assertEqual(service.web.hosts, ["node12.example.org", "Node12"])
        self.assertFalse(service.web.guard.required)
        options = master.Options()
        options.parseOptions(["--web", "tcp:0"])
        self.assertTrue(master.makeService(options).web.guard.required)
        options = master.Options()
        options.parseOptions(["--insecure"])
        self.assertIsNone(master.makeService(options).web)
        for option in (["--web-address-file", "x"], ["--web-token-file", "x"], ["--web-host", "x"]):
            self.assertRaises(usage.UsageError, master.Options().parseOptions, ["--insecure", *option])
        self.assertRaises(usage.UsageError, master.Options().parseOptions, ["--web-open"])

    def test_insecure_master(self):
        """An --insecure master has no token to ask for."""
        dashboard = web.WebDashboard(FakeMaster(secret=None), "tcp:0")
        self.assertIsNone(dashboard.guard.token)
        self.assertFalse(dashboard.guard.required)


class PoolsPageTests(unittest.TestCase):
    """The page's pools, in headless Chromium, from an in-process site."""

    timeout = 120

    serve = ProtectionTests.serve

    def test_every_pool_in_chromium(self):
        """
        With several adaptive pools in the status, the page shows each one
        (not only the first): its name, target, running, pending and
        draining workers, bounds, and its recent decisions with their
        reasons, newest first; with no pool the section is hidden.
        """
        if CHROMIUM is None:
            raise unittest.SkipTest(
                "chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)"
            )
        plain = {**POOL, "name": "plain"}
        gpu = {
            **POOL,
            "name": "gpu",
            "target": 5,
            "running": 4,
            "pending": 7,
            "draining": 6,
            "min_workers": 1,
            "max_workers": 8,
            "decisions": [
                {"time": 980.0, "action": "submit 3", "reason": "12 jobs queued (gpu share)"},
                {"time": 995.0, "action": "drain 77_1", "reason": "idle for 61 s (--idle-timeout 60)"},
            ],
        }
        master = FakeMaster()
        status = {**master.status(), "pool": plain, "pools": [plain, gpu]}
        master.status = lambda: status
        url = self.serve(master)
        token = web.dashboard_token(SECRET)

        def body():
            browser = Browser(self, Path(self.mktemp()).absolute())
            browser.navigate(f"{url}?token={token}")
            read = (
                "[...document.querySelectorAll('#pools .pool')].map((p) => ({name: p.dataset.name,"
                " text: p.innerText, numbers: Object.fromEntries([...p.querySelectorAll('[data-key]')]"
                ".map((d) => [d.dataset.key, d.querySelector('b').textContent])),"
                " decisions: [...p.querySelectorAll('tbody tr')].map((r) => r.innerText)}))"
            )
            pools = wait_until(lambda: browser.evaluate(read), timeout=30, what="the pools on the page")
            hidden = browser.evaluate("document.getElementById('pool-section').hidden")
            status["pools"], status["pool"] = [], None
            wait_until(
                lambda: browser.evaluate("document.getElementById('pool-section').hidden"),
                timeout=30,
                what="the pool section to hide",
            )
            errors = browser.console_errors()
            self.assertEqual(errors, [])
            self.assertFalse(hidden)
            self.assertEqual([p["name"] for p in pools], ["plain", "gpu"])
            first, second = pools
            self.assertIn("pool plain", first["text"])
            self.assertEqual(
                first["numbers"],
                {"target": "3", "running": "2", "pending": "1", "draining": "1", "bounds": "0 – 4"},
            )
            self.assertIn("40 jobs queued", first["text"])
            self.assertIn("pool gpu", second["text"])
            self.assertEqual(
                second["numbers"],
                {"target": "5", "running": "4", "pending": "7", "draining": "6", "bounds": "1 – 8"},
            )
            self.assertEqual(len(second["decisions"]), 2)
            self.assertIn("drain 77_1", second["decisions"][0])
            self.assertIn("idle for 61 s", second["decisions"][0])
            self.assertIn("5 s ago", second["decisions"][0])
            self.assertIn("12 jobs queued (gpu share)", second["decisions"][1])
            self.assertNotIn("gpu share", first["text"])

        return threads.deferToThread(body)


# -- a real master -------------------------------------------------------------


class RealMasterTests(unittest.TestCase):
    timeout = 180

    def cluster(self) -> tuple[Processes, str]:
        """
        A real master with the dashboard on loopback and two one-slot
        workers; its token goes to C{self.token}.  Blocks: call it from a
        thread, like L{Processes}.
        """
        procs = Processes(self, self.mktemp())
        url_file = procs.directory / "web.url"
        token_file = procs.directory / "web.token"
        procs.start_master(
            "--web",
            "tcp:0:interface=127.0.0.1",
            "--web-address-file",
            str(url_file),
            "--web-token-file",
            str(token_file),
        )
        url = wait_until(lambda: url_file.exists() and url_file.read_text().strip(), what="the dashboard")
        self.token = token_file.read_text().strip()
        procs.start_worker(procs=1)
        procs.start_worker(procs=1)
        return procs, url

    def get(self, url: str):
        """GET C{url} with the token (as C{Authorization: Bearer}, as scripts do)."""
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        return urllib.request.urlopen(request, timeout=10)

    def get_json(self, url: str) -> dict:
        with self.get(url) as r:
            self.assertEqual(r.headers["Content-Type"], "application/json")
            return json.load(r)

    def test_status_and_metrics(self):
        """
        C{/api/status} shows both workers and the right counts, C{/metrics}
        parses and its counters match the jobs run, and a failing job shows
        up in C{recent_failures} with its traceback.
        """

        def body():
            procs, url = self.cluster()
            with executor(procs.address) as ex:
                self.assertEqual(list(ex.map(abs, range(-20, 0), timeout=DEADLINE)), list(range(20, 0, -1)))
                error = ex.submit(fail_loudly, 7).exception(60)
                self.assertIn("dashboard test failure 7", str(error))
                status = self.get_json(url + "api/status")
                self.assertEqual(len(status["workers"]), 2)
                self.assertEqual([w["slots"] for w in status["workers"]], [1, 1])
                self.assertEqual(sum(w["completed"] for w in status["workers"]), 21)
                self.assertEqual(sum(w["failed"] for w in status["workers"]), 1)
                self.assertEqual((status["completed"], status["failed"], status["queued"]), (21, 1, 0))
                (client,) = [c for c in status["clients"] if c["submitted"]]
                self.assertEqual(client["completed"], 21)
                (failure,) = status["recent_failures"]
                self.assertEqual(failure["type"], "ValueError")
                self.assertEqual(failure["message"], "dashboard test failure 7")
                self.assertIn("Traceback", failure["traceback"])
                self.assertIn("fail_loudly", failure["traceback"])
                self.assertEqual(failure["stdout"], "working on 7\n")
                self.assertEqual(failure["stderr"], "giving up on 7\n")
                self.assertTrue(failure["host"])
                self.assertLess(abs(failure["time"] - time.time()), 60)

                with self.get(url + "metrics") as r:
                    self.assertTrue(r.headers["Content-Type"].startswith("text/plain; version=0.0.4"))
                    families = parse_prometheus(r.read().decode())
                self.assertEqual(total(families, "cw_jobs_completed_total"), 21)
                self.assertEqual(total(families, "cw_jobs_failed_total"), 1)
                self.assertEqual(total(families, "cw_worker_jobs_completed_total"), 21)
                self.assertEqual(total(families, "cw_workers"), 2)
                self.assertEqual(total(families, "cw_slots"), 2)
                self.assertEqual(total(families, "cw_jobs_queued"), 0)
                self.assertGreater(total(families, "cw_uptime_seconds"), 0)

        return threads.deferToThread(body)

    def test_dashboard_in_chromium(self):
        """
        In headless Chromium (driven over the DevTools protocol) the page
        loads with no console errors, lists the two workers, and its
        completed counter rises while jobs run.  A screenshot is kept in the
        test's directory (and copied to docs/dashboard.png when
        CW_UPDATE_SCREENSHOT=1).
        """
        if CHROMIUM is None:
            raise unittest.SkipTest(
                "chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)"
            )

        def body():
            procs, url = self.cluster()
            ex = ClusterExecutor(procs.address)
            try:
                ex.submit(fail_loudly, 1).exception(60)
                # About 30 s of work for two slots: it outlasts the checks below.
                futures = [ex.submit(nap, 0.02) for _ in range(3000)]
                browser = Browser(self, Path(self.mktemp()).absolute())
                # The page as a person opens it: the URL with ?token= once,
                # then the cookie it sets.
                browser.navigate(f"{url}?token={self.token}")

                def state() -> dict:
                    return browser.evaluate(
                        "(() => { const e = document.getElementById('cw-state');"
                        " return e ? Object.assign({}, e.dataset) : {polls: '0'}; })()"
                    )

                first = wait_until(
                    lambda: (s := state()) and int(s["polls"]) >= 2 and int(s["completed"]) > 0 and s,
                    timeout=30,
                    what="the page to show finished jobs",
                )
                second = wait_until(
                    lambda: (
                        (s := state())
                        and int(s["polls"]) >= int(first["polls"]) + 8
                        and int(s["completed"]) > int(first["completed"]) + 50
                        and s
                    ),
                    timeout=60,
                    what="the page's counter to rise",
                )
                self.assertFalse(all(f.done() for f in futures), "the jobs ran out before the checks")
                page_url = browser.evaluate("location.href")
                workers_text = browser.evaluate("document.getElementById('workers').innerText")
                failures_text = browser.evaluate("document.getElementById('failures').innerText")
                shot = procs.directory / "dashboard.png"
                browser.screenshot(shot)
                errors = browser.console_errors()
            finally:
                ex.shutdown(cancel_futures=True)
            self.assertEqual(errors, [])
            self.assertEqual(page_url, url)  # the token left the address bar
            for page in (first, second):
                self.assertEqual((page["errors"], page["fetchErrors"], page["workers"]), ("0", "0", "2"))
            self.assertGreater(int(second["completed"]), int(first["completed"]))
            for worker in procs.workers:
                self.assertIn(f":{worker.pid}", workers_text)
            self.assertIn("dashboard test failure 1", failures_text)
            self.assertIn("Traceback", failures_text)
            self.assertIn("working on 1", failures_text)
            self.assertIn("giving up on 1", failures_text)
            self.assertGreater(shot.stat().st_size, 10_000)
            if os.environ.get("CW_UPDATE_SCREENSHOT") == "1":
                target = Path(ROOT) / "docs" / "dashboard.png"
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(shot, target)

        return threads.deferToThread(body)
