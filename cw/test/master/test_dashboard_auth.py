"""
The dashboard's protection (L{cw.master.web}): the token on every address,
loopback included, unless C{--web-open}; the C{Host} check against DNS
rebinding; the token only ever in files no other user can read.  Real
C{twistd} masters on loopback, a Unix socket and C{cw.mp.start}.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from twisted.internet import address, reactor, threads
from twisted.trial import unittest

from cw.master import web as web
from cw.test.master.test_web import SECRET, FakeMaster, fetch
from cw.test.procs import DEADLINE, Processes, child_env, free_port, wait_until
from cw.wire.secret import load_secret


def tcp(host: str, port: int = 8494):
    return (
        address.IPv4Address("TCP", host, port) if ":" not in host else address.IPv6Address("TCP", host, port)
    )


def world_readable_with(root: Path, text: str) -> list[str]:
    """Files under C{root} that other users may read and that contain C{text}."""
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if path.stat().st_mode & stat.S_IROTH and text in path.read_text(errors="replace"):
                found.append(str(path))
    return found


def log_line(procs: Processes, pattern: str) -> re.Match:
    """Wait for the master's log to have a line matching C{pattern}."""

    def find():
        if procs.master.poll() is not None:
            raise AssertionError("master exited:\n" + procs.log_tail(procs.master))
        return re.search(pattern, Path(procs.master.log).read_text(errors="replace"), re.M)

    return wait_until(find, what=f"a log line matching {pattern!r}")


class HostCheckTests(unittest.TestCase):
    """Which C{Host} headers L{web.HostCheck} lets through."""

    def test_bound_address(self):
        """Bound to one address: that address and localhost, any port, any case."""
        check = web.HostCheck(tcp("127.0.0.1"))
        for good in (b"127.0.0.1:8494", b"127.0.0.1", b"localhost:8494", b"LocalHost.", b"localhost"):
            self.assertTrue(check(good), good)
        for bad in (b"evil.example:8494", b"127.0.0.2:8494", b"localhost.evil.example", b"", b"[::1]:8494"):
            self.assertFalse(check(bad), bad)
        self.assertTrue(check(None))  # HTTP/1.0 tools send none; browsers always do

    def test_ipv6(self):
        check = web.HostCheck(tcp("::1"))
        self.assertTrue(check(b"[::1]:8494"))
        self.assertTrue(check(b"[0:0::1]"))
        self.assertFalse(check(b"127.0.0.1:8494"))

    def test_configured_names(self):
        """C{--web-host} names are accepted, compared without case or final dot."""
        check = web.HostCheck(tcp("10.1.2.3"), ["Node12.Example.org", " ", "node12"])
        for good in (b"10.1.2.3:8494", b"node12.example.org.:8494", b"NODE12", b"localhost"):
            self.assertTrue(check(good), good)
        self.assertFalse(check(b"node13"))
        self.assertFalse(check(b""))

    def test_every_interface(self):
        """Bound to 0.0.0.0: any IP address (which DNS cannot rebind) and this host's name."""
        check = web.HostCheck(tcp("0.0.0.0"))
        for good in (b"192.0.2.7:8494", b"[2001:db8::1]:1", socket.gethostname().upper().encode()):
            self.assertTrue(check(good), good)
        self.assertFalse(check(b"evil.example"))

    def test_unix_socket(self):
        check = web.HostCheck(address.UNIXAddress(b"/run/cw/web.sock"), ["dash"])
        self.assertTrue(check(b"localhost"))
        self.assertTrue(check(b"dash"))
        self.assertFalse(check(b"127.0.0.1"))
        self.assertFalse(check(b"evil.example"))


class DefaultTokenFileTests(unittest.TestCase):
    def test_default_token_file(self):
        """
        Without C{token_file}, the token goes to C{$XDG_CACHE_HOME/cw},
        a 0700 directory, in a 0600 file named after host and port, and is
        removed when the dashboard stops.
        """
        cache = Path(self.mktemp()).absolute()
        self.patch(os, "environ", {**os.environ, "XDG_CACHE_HOME": str(cache)})
        dashboard = web.WebDashboard(FakeMaster(), "tcp:0")
        d = dashboard.start(reactor)

        def check(port):
            path = cache / "cw" / f"dashboard-{os.uname().nodename}-{port.getHost().port}.token"
            self.assertEqual(dashboard.token_file, path)
            self.assertEqual(path.read_text(), web.dashboard_token(SECRET) + "\n")
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
            self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)
            return dashboard.stop().addCallback(lambda _: self.assertFalse(path.exists()))

        return d.addCallback(check)


class RealMasterTests(unittest.TestCase):
    """A real master's dashboard, as a browser, a script or an attacker sees it."""

    timeout = 120

    def dashboard(self, *options: str) -> tuple[Processes, str, Path]:
        """A master with the dashboard on loopback: (processes, URL, token file)."""
        procs = Processes(self, self.mktemp())
        token_file = procs.directory / "private" / "web.token"
        procs.start_master(
            "--web", "tcp:0:interface=127.0.0.1", "--web-token-file", str(token_file), *options
        )
        url = log_line(procs, r"cw dashboard at (http://\S+/)").group(1)
        return procs, url, token_file

    def test_token_required_on_loopback(self):
        """
        Loopback without the token: 401; with it: 200; with a foreign
        C{Host}: 403 even with the token.  The token is in a 0600 file (in a
        0700 directory) that the log names, and in no file that other users
        may read, the master's log included.
        """

        def body():
            procs, url, token_file = self.dashboard()
            token = web.dashboard_token(load_secret())
            self.assertEqual(token_file.read_text(), token + "\n")
            self.assertEqual(stat.S_IMODE(token_file.stat().st_mode), 0o600)
            self.assertEqual(stat.S_IMODE(token_file.parent.stat().st_mode), 0o700)
            bearer = {"Authorization": f"Bearer {token}"}
            for path in ("", "api/status", "metrics"):
                self.assertEqual(fetch(url + path)[0], 401, path)
                self.assertEqual(fetch(url + path, bearer)[0], 200, path)
                self.assertEqual(fetch(url + path, {**bearer, "Host": "evil.example:8494"})[0], 403, path)
                self.assertEqual(fetch(url + f"{path}?token={token}", {"Host": "evil.example"})[0], 403)
            port = url.rsplit(":", 1)[1].rstrip("/")
            self.assertEqual(fetch(url + "api/status", {**bearer, "Host": f"localhost:{port}"})[0], 200)
            log = Path(procs.master.log).read_text()
            self.assertIn(str(token_file), log)
            self.assertNotIn(token, log)
            self.assertEqual(world_readable_with(procs.directory, token), [])

        return threads.deferToThread(body)

    def test_web_open(self):
        """C{--web-open}: 200 without the token, but a foreign C{Host} still gets 403; no token file."""

        def body():
            procs, url, token_file = self.dashboard("--web-open", "--web-host", "dash.example")
            self.assertEqual(fetch(url + "api/status")[0], 200)
            self.assertEqual(fetch(url + "api/status", {"Host": "dash.example"})[0], 200)
            self.assertEqual(fetch(url + "api/status", {"Host": "evil.example"})[0], 403)
            self.assertEqual(fetch(url, {"Host": "evil.example"})[0], 403)
            self.assertFalse(token_file.exists())
            self.assertIn("--web-open", Path(procs.master.log).read_text())

        return threads.deferToThread(body)

    def test_unix_socket_log_line_works(self):
        """
        A dashboard on a Unix socket logs a command that works as it
        stands: run through the shell, it prints the status JSON.
        """
        short = tempfile.mkdtemp(prefix="cw-web-")  # a socket path must be short
        self.addCleanup(shutil.rmtree, short, True)
        socket_path = os.path.join(short, "web.sock")

        def body():
            procs = Processes(self, self.mktemp())
            token_file = procs.directory / "web.token"
            procs.start_master("--web", f"unix:{socket_path}", "--web-token-file", str(token_file))
            command = log_line(procs, r"query it with: (curl .*)$").group(1)
            self.assertIn(f"--unix-socket {socket_path}", command)
            self.assertNotIn(token_file.read_text().strip(), command)
            done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=DEADLINE)
            self.assertEqual(done.returncode, 0, done.stderr)
            status = json.loads(done.stdout)
            self.assertEqual((status["workers"], status["queued"]), ([], 0))
            without = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", socket_path]
                + ["http://localhost/api/status"],
                capture_output=True,
                text=True,
                timeout=DEADLINE,
            )
            self.assertEqual(without.stdout, "401")

        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl is not installed")
        return threads.deferToThread(body)

    def test_token_file_unwritable(self):
        """
        A token file that cannot be written stops the master with one log
        line that names the file and the fix, rather than serving a
        dashboard nobody can open.
        """

        def body():
            procs = Processes(self, self.mktemp())
            blocker = procs.directory / "not-a-directory"
            blocker.write_text("")
            procs.master = procs.spawn(
                "master",
                ["cw-master", "--port", "tcp:0:interface=127.0.0.1", "--web", "tcp:0"]
                + ["--web-token-file", str(blocker / "web.token")],
            )
            procs.master.wait(30)
            log = Path(procs.master.log).read_text()
            self.assertIn(f"cw dashboard: cannot create dashboard token file {blocker / 'web.token'}", log)
            self.assertIn("--web-token-file", log)
            self.assertNotIn("Traceback", log)

        return threads.deferToThread(body)


class LocalClusterTests(unittest.TestCase):
    timeout = 120

    def test_mp_start_keeps_token_private(self):
        """
        C{cw.mp.start} with C{--web}: the run directory is 0700, the token
        goes to its default file (0600) under C{$XDG_CACHE_HOME/cw}, and no
        file other users may read (C{master.log} included) holds the token.
        """
        cache = Path(self.mktemp()).absolute()
        cache.mkdir()
        script = textwrap.dedent(
            """
            import json, sys, time
            from pathlib import Path
            import cw.mp as mp

            port = int(sys.argv[1])
            mp.start(0, port=port, master_options=["--web", "tcp:0"])
            try:
                log = mp.run_dir(port) / "master.log"
                deadline = time.monotonic() + 60
                while "cw dashboard" not in log.read_text():
                    assert time.monotonic() < deadline, "no dashboard line in " + str(log)
                    time.sleep(0.05)
                cache = Path(sys.argv[2])
                files = {str(p): [p.stat().st_mode, p.read_text(errors="replace")]
                         for p in cache.rglob("*") if p.is_file()}
                print(json.dumps({"run_dir": str(mp.run_dir(port)),
                                  "run_dir_mode": mp.run_dir(port).stat().st_mode, "files": files}))
            finally:
                mp.stop(port=port)
            """
        )

        def body():
            done = subprocess.run(
                [sys.executable, "-c", script, str(free_port()), str(cache)],
                capture_output=True,
                text=True,
                env=child_env(XDG_CACHE_HOME=str(cache)),
                timeout=DEADLINE * 2,
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            return json.loads(done.stdout)

        def check(report):
            token = web.dashboard_token(load_secret())
            self.assertTrue(report["run_dir"].startswith(str(cache / "cw")))
            self.assertEqual(stat.S_IMODE(report["run_dir_mode"]), 0o700)
            holding = {path: mode for path, (mode, text) in report["files"].items() if token in text}
            (token_file,) = holding
            self.assertTrue(Path(token_file).name.startswith(f"dashboard-{os.uname().nodename}-"))
            self.assertEqual(stat.S_IMODE(holding[token_file]), 0o600)
            self.assertIn(f"{report['run_dir']}/master.log", report["files"])
            log = report["files"][f"{report['run_dir']}/master.log"][1]
            self.assertIn(token_file, log)

        return threads.deferToThread(body).addCallback(check)
