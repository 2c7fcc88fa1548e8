"""C{cw status} against a real master with workers and a queue."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

from twisted.internet import threads
from twisted.trial import unittest

from cw.cli.cw import format_status
from cw.client import ClusterExecutor
from cw.test.jobs import block_until, touch
from cw.test.procs import Processes, child_env, free_port, wait_until


def fail():
    raise RuntimeError("counted")


class StatusCommandTests(unittest.TestCase):
    timeout = 120

    def cw(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cw.cli", *args],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        )

    def status(self, address: str) -> dict:
        done = self.cw("status", "--master", address, "--json")
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout)

    def test_status_counts(self):
        """
        With two one-slot workers busy and jobs queued, C{cw status --json}
        reports the workers, what is busy, the queue per client, finished
        and failed jobs and a rate; the text form shows the same.
        """
        procs = Processes(self, self.mktemp())
        flag = os.path.abspath(self.mktemp())
        self.addCleanup(lambda: os.path.exists(flag) or touch(flag))

        def body():
            address = procs.start_master()
            procs.start_worker(procs=1)
            procs.start_worker(procs=1)
            ex = ClusterExecutor(address)
            try:
                ex.submit(fail).exception(60)
                fs = [ex.submit(block_until, flag) for _ in range(10)]
                # Two running, two prefetched (one per slot), six queued.
                wait_until(lambda: self.status(address)["queued"] == 6, what="six jobs queued")
                status = self.status(address)
                self.assertEqual(len(status["workers"]), 2)
                self.assertEqual([w["slots"] for w in status["workers"]], [1, 1])
                self.assertEqual([w["busy"] for w in status["workers"]], [1, 1])
                self.assertEqual(sum(w["failed"] for w in status["workers"]), 1)
                # cw status itself is connected as a client, with nothing submitted.
                (client,) = [c for c in status["clients"] if c["submitted"]]
                self.assertEqual((client["queued"], client["running"]), (6, 4))
                self.assertEqual(status["master"], address)
                text = self.cw("status", "--master", address).stdout
                self.assertIn("6 queued", text)
                self.assertIn("2 (2 slots, 2 busy)", text)
                touch(flag)
                self.assertEqual({f.result(60) for f in fs}, {"released"})
                status = self.status(address)
                self.assertEqual(status["completed"], 11)
                self.assertGreater(status["rate"], 0)
            finally:
                touch(flag)  # never leave the blocked jobs waiting
                ex.shutdown()

        return threads.deferToThread(body)

    def test_no_master(self):
        """With no master to ask, cw status says so and exits 1."""

        def body():
            done = self.cw("status", "--master", f"127.0.0.1:{free_port()}", "--timeout", "0.5")
            self.assertEqual(done.returncode, 1)
            self.assertIn("cw status: no cw master answers", done.stderr)

        return threads.deferToThread(body)

    def test_wrong_secret_one_line(self):
        """
        C{cw status} with a secret the master does not hold says so in one
        line, with no traceback (L{cw.errors.AuthenticationFailed} is a
        L{cw.errors.CWError}, which every command line catches).
        """
        procs = Processes(self, self.mktemp())
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory, 0o700)
        other = os.path.join(directory, "secret")
        with open(os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(32) + "\n")

        def body():
            address = procs.start_master()
            done = self.cw("status", "--master", address, "--secret-file", other)
            self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
            lines = (done.stdout + done.stderr).strip().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith("cw status: "), lines)

        return threads.deferToThread(body)


class FormatStatusTests(unittest.SynchronousTestCase):
    def test_unclaimed_results(self):
        """Results workers handed over for clients not back yet are shown with the clients."""
        text = format_status("m", {"clients": [], "unclaimed_results": 2, "unclaimed_bytes": 1500})
        self.assertIn("clients  0; 2 results (1,500 bytes) kept for clients not back yet", text)
        self.assertNotIn("kept for clients", format_status("m", {"clients": []}))
