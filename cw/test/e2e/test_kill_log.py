"""
End-to-end tests of what a worker's log says when it kills a job process
on purpose (a job's timeout, a job killed by its client, the drain timeout
of a stopping worker): one line in cw's words naming the job and the
reason, and no "FATAL" line from ampoule, against real C{twistd cw-master}
and C{twistd cw-worker} processes.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

from cw.core.config import STOP_BOUND
from cw.errors import JobKilled, JobTimeout
from cw.test.jobs import block_until
from cw.test.procs import DEADLINE, Processes, executor, wait_until


class DeliberateKillLogTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.flag = os.path.abspath(self.mktemp())  # never created: the jobs block until killed

    def killed_line(self, worker, number: int, reason: str) -> str:
        """Wait (bounded) for C{worker}'s log line saying it killed job C{number}'s process for C{reason}."""
        pattern = re.compile(rf"Job process \d+ killed: job #{number} of client \d+ {re.escape(reason)}")

        def found():
            text = Path(worker.log).read_text(errors="replace")
            return next((line for line in text.splitlines() if pattern.search(line)), None)

        return wait_until(found, timeout=20, what=f"a log line matching {pattern.pattern!r}")

    def assert_no_fatal(self, worker) -> None:
        log = Path(worker.log).read_text(errors="replace")
        self.assertNotIn("FATAL", log)
        self.assertNotIn("Traceback", log)

    def started(self, ex, path: str):
        """Submit a job that blocks (until killed); return its future once its job process runs it."""
        future = ex.submit(block_until, self.flag, path, 600)
        wait_until(lambda: os.path.exists(path), what="the job to start")
        return future

    def test_timed_out_and_killed(self):
        """
        A job past its timeout, and a running job that its client kills
        (C{ClusterExecutor.kill}): the worker's log names each job and why
        its process was killed, and says nothing "FATAL".
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1, True)
            with executor(self.procs.address) as ex:
                late = ex.submit_with(block_until, (self.flag, None, 600), timeout=1)
                self.assertIsInstance(late.exception(DEADLINE), JobTimeout)
                self.killed_line(worker, late.number, "ran past its timeout of 1 s")
                running = self.started(ex, os.path.abspath(self.mktemp()))
                self.assertEqual(ex.kill(running), 1)
                self.assertIsInstance(running.exception(DEADLINE), JobKilled)
                self.killed_line(worker, running.number, "was cancelled")
            self.assert_no_fatal(worker)

        return threads.deferToThread(body)

    def test_drain_timeout(self):
        """
        A stopping worker whose job outlives C{--drain-timeout}: its log
        names the job killed and why, and says nothing "FATAL".
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1, True, "--drain-timeout", "1")
            with executor(self.procs.address) as ex:
                running = self.started(ex, os.path.abspath(self.mktemp()))
                worker.send_signal(signal.SIGTERM)
                worker.wait(1 + STOP_BOUND + 5)
                self.procs.workers.remove(worker)
                self.killed_line(
                    worker, running.number, "was still running when the drain timeout (1 s) passed"
                )
                ex.kill(running)
            self.assert_no_fatal(worker)

        return threads.deferToThread(body)
