"""
C{cw doctor}: its judgments as pure functions, and the command against a
healthy local cluster, a master with another secret, no master, and
workers that cannot run this client's jobs (another cloudpickle version;
a filesystem without the client's directory).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys

from twisted.internet import threads
from twisted.trial import unittest

from cw.cli.doctor import (
    Check,
    check_secret,
    endpoint_target,
    judge_clock,
    judge_paths,
    judge_slurm,
    judge_versions,
    judge_worker_clocks,
    judge_workers,
    passed,
)
from cw.test.procs import Processes, child_env, free_port
from cw.wire.versions import TEST_HOOK, local_versions

VERSIONS = local_versions()


def report(peer: str, **fields) -> dict:
    return {"id": 1, "peer": peer, "report": {"versions": VERSIONS, "time": 100.0, **fields}}


class JudgmentTests(unittest.SynchronousTestCase):
    """Each check's verdict from what was observed."""

    def test_clock(self):
        self.assertTrue(judge_clock("c", 0.2, 0.01).ok)
        self.assertTrue(judge_clock("c", 1.5, 0.6).ok)  # within what the round trip leaves unknown
        late = judge_clock("c", -5.0, 0.01)
        self.assertFalse(late.ok)
        self.assertIn("5.0 s behind", late.message)
        self.assertIn("NTP", late.fix)

    def test_worker_clocks(self):
        check = judge_worker_clocks([report("a:1", time=100.1), report("b:2", time=107.0)], 99.9, 100.1)
        self.assertFalse(check.ok)
        self.assertIn("b:2", check.message)
        self.assertIsNone(judge_worker_clocks([{"peer": "a", "error": "x"}], 0, 1).ok)

    def test_workers(self):
        self.assertFalse(judge_workers([]).ok)
        check = judge_workers([{"slots": 2, "busy": 1}, {"slots": 1, "busy": 0}])
        self.assertEqual((check.ok, check.message), (True, "2 connected, 3 slots, 1 busy"))

    def test_versions(self):
        self.assertTrue(judge_versions(VERSIONS, [report("a:1")]).ok)
        odd = {**VERSIONS, "cloudpickle": "99.0.0"}
        check = judge_versions(VERSIONS, [report("a:1"), report("b:2", versions=odd)])
        self.assertFalse(check.ok)
        self.assertIn("b:2 runs", check.message)
        self.assertIn("cloudpickle 99.0.0", check.message)
        self.assertNotIn("a:1", check.message)
        silent = judge_versions(VERSIONS, [{"peer": "c:3", "error": "no answer: timeout"}])
        self.assertFalse(silent.ok)
        self.assertIn("c:3 (no answer: timeout)", silent.message)

    def test_paths(self):
        self.assertTrue(judge_paths("/w", [report("a:1", cwd_error=None, missing=[])]).ok)
        check = judge_paths(
            "/w",
            [report("a:1", cwd_error="no such directory here", missing=["/w/lib", "/x", "/y", "/z"])],
        )
        self.assertFalse(check.ok)
        self.assertIn("a:1 cannot enter /w (no such directory here)", check.message)
        self.assertIn("/w/lib, /x, /y and 1 more", check.message)

    def test_slurm(self):
        self.assertIsNone(judge_slurm(False, False, [], "/d").ok)
        self.assertFalse(judge_slurm(False, True, [], "/d").ok)
        jobs = [
            {"id": "12", "name": "cmaster", "state": "RUNNING"},
            {"id": "13", "name": "cworkers", "state": "PENDING"},
        ]
        check = judge_slurm(True, False, jobs, "/d")
        self.assertTrue(check.ok)
        self.assertIn("master log /d/master-12.log", check.message)
        ended = judge_slurm(
            True, False, [*jobs, {"id": "14", "name": "cworkers", "state": "NODE_FAIL"}], "/d"
        )
        self.assertFalse(ended.ok)
        self.assertIn("cworkers 14 NODE_FAIL", ended.message)
        self.assertIn("/d", ended.fix)

    def test_endpoint_target(self):
        self.assertEqual(endpoint_target("tcp:host=node1:port=5494"), ("tcp", "node1", 5494))
        self.assertEqual(endpoint_target(r"tcp:host=\:\:1:port=7"), ("tcp", "::1", 7))
        self.assertEqual(endpoint_target("tcp:node2:6000"), ("tcp", "node2", 6000))
        self.assertEqual(endpoint_target("unix:/run/cw.sock"), ("unix", "/run/cw.sock", ""))

    def test_lines(self):
        self.assertEqual(Check("x", True, "fine", "no").line(), "OK       x: fine")
        self.assertEqual(Check("x", False, "bad", "do this").line(), "PROBLEM  x: bad; do this")
        self.assertTrue(passed([Check("a", True, ""), Check("b", None, "")]))
        self.assertFalse(passed([Check("a", True, ""), Check("b", False, "")]))

    def test_secret_file(self):
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory, 0o700)
        path = os.path.join(directory, "secret")
        missing = check_secret(path, False)
        self.assertFalse(missing.ok)
        self.assertIn("does not exist", missing.message)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        self.assertTrue(check_secret(path, False).ok)
        os.chmod(path, 0o644)
        loose = check_secret(path, False)
        self.assertFalse(loose.ok)
        self.assertIn(f"chmod 600 {path}", loose.line())
        self.assertIsNone(check_secret(None, True).ok)


def can_unshare() -> bool:
    """Whether this process may make a mount namespace (root, unshare installed)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class DoctorCommandTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def doctor(self, *args: str, cwd: str | None = None, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cw.cli", "doctor", "--timeout", "10", *args],
            capture_output=True,
            text=True,
            env=child_env(**env),
            cwd=cwd,
            timeout=120,
        )

    def lines(self, done: subprocess.CompletedProcess) -> dict[str, str]:
        """The output's lines by check name; no traceback anywhere."""
        self.assertNotIn("Traceback", done.stdout + done.stderr)
        found = {}
        for line in done.stdout.splitlines():
            state, _, rest = line.partition(" ")
            name, _, message = rest.strip().partition(": ")
            found[name] = f"{state} {message}"
        return found

    def test_healthy(self):
        """Against a healthy local cluster every check passes and doctor exits 0; --json parses."""

        def body():
            address = self.procs.start_master()
            self.procs.start_worker(procs=1)
            done = self.doctor("--master", address)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            lines = self.lines(done)
            for name in ("secret file", "master address", "master authenticates", "master clock"):
                self.assertTrue(lines[name].startswith("OK "), lines)
            for name in ("workers", "worker clocks", "worker versions", "worker paths", "probe job"):
                self.assertTrue(lines[name].startswith("OK "), lines)
            self.assertEqual(lines["SLURM"], "SKIPPED not in use (CW_BACKEND=local)")
            done = self.doctor("--master", address, "--json")
            self.assertEqual(done.returncode, 0, done.stderr)
            parsed = json.loads(done.stdout)
            self.assertTrue(parsed["ok"])
            self.assertEqual(len(parsed["checks"]), 10)
            self.assertEqual({c["ok"] for c in parsed["checks"]}, {True, None})

        return threads.deferToThread(body)

    def test_no_master(self):
        """With nothing at the address, doctor says so, skips what needs a master and exits 1."""

        def body():
            done = self.doctor("--master", f"127.0.0.1:{free_port()}")
            self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
            lines = self.lines(done)
            self.assertTrue(
                lines["master address"].startswith("PROBLEM nothing answers at 127.0.0.1:"), lines
            )
            self.assertIn("start a master", lines["master address"])
            self.assertEqual(lines["master authenticates"], "SKIPPED no master to ask")
            parsed = json.loads(self.doctor("--master", f"127.0.0.1:{free_port()}", "--json").stdout)
            self.assertFalse(parsed["ok"])

        return threads.deferToThread(body)

    def test_missing_default_secret_is_not_created(self):
        """Without the default secret file, doctor says so and does not create one by connecting."""
        config = os.path.abspath(self.mktemp())
        os.mkdir(config, 0o700)

        def body():
            address = self.procs.start_master()
            done = self.doctor("--master", address, XDG_CONFIG_HOME=config, CW_SECRET_FILE="")
            self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
            lines = self.lines(done)
            self.assertTrue(lines["secret file"].startswith("PROBLEM "), lines)
            self.assertIn("does not exist", lines["secret file"])
            self.assertTrue(lines["master address"].startswith("OK "), lines)
            self.assertEqual(lines["master authenticates"], "SKIPPED not tried without a usable secret file")
            self.assertEqual(os.listdir(config), [])

        return threads.deferToThread(body)

    def test_other_secret(self):
        """A master holding another secret: the authentication check names it and what to do."""
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory, 0o700)
        other = os.path.join(directory, "secret")
        with open(os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(32) + "\n")

        def body():
            address = self.procs.start_master()
            done = self.doctor("--master", address, "--secret-file", other)
            self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
            lines = self.lines(done)
            self.assertTrue(lines["secret file"].startswith("OK "), lines)
            self.assertTrue(lines["master address"].startswith("OK "), lines)
            self.assertTrue(lines["master authenticates"].startswith("PROBLEM "), lines)
            self.assertIn("different secrets", lines["master authenticates"])
            self.assertIn("secret file", lines["master authenticates"])

        return threads.deferToThread(body)

    def test_workers_that_cannot_run_these_jobs(self):
        """
        One worker reports another cloudpickle version (the test hook); one
        runs in a mount namespace where a tmpfs hides the directory that
        holds this client's working directory and one of its C{sys.path}
        entries (as on a machine that does not share that filesystem).
        Doctor names each problem and worker, the probe job fails, and it
        exits 1.
        """
        if not can_unshare():
            raise unittest.SkipTest("needs unshare -m (root)")
        hidden = os.path.abspath(self.mktemp())
        project = os.path.join(hidden, "project")
        library = os.path.join(project, "lib")
        os.makedirs(library)
        # The worker's own directory and code are elsewhere: only `hidden` is covered.
        cover = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{hidden}" && exec "$@"', "sh")

        def body():
            address = self.procs.start_master()
            blind = self.procs.start_worker(1, True, prefix=cover)
            odd = self.procs.start_worker(1, True, env={TEST_HOOK: json.dumps({"cloudpickle": "99.0.0"})})
            pythonpath = f"{library}{os.pathsep}{child_env()['PYTHONPATH']}"
            done = self.doctor("--master", address, cwd=project, PYTHONPATH=pythonpath)
            self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
            lines = self.lines(done)
            paths = lines["worker paths"]
            self.assertTrue(paths.startswith("PROBLEM "), lines)
            self.assertIn(f":{blind.pid} cannot enter {project} (no such directory here)", paths)
            self.assertIn(f":{blind.pid} does not see sys.path entries ", paths)
            self.assertIn(f"{library};", paths)
            self.assertNotIn(f":{odd.pid}", paths)
            versions = lines["worker versions"]
            self.assertTrue(versions.startswith("PROBLEM "), lines)
            self.assertIn(f":{odd.pid} runs", versions)
            self.assertIn("cloudpickle 99.0.0", versions)
            self.assertNotIn(f":{blind.pid}", versions)
            self.assertTrue(lines["probe job"].startswith("PROBLEM failed: "), lines)
            self.assertTrue(lines["workers"].startswith("OK 2 connected"), lines)

        return threads.deferToThread(body)
