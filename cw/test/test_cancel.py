"""
Cancellation against real master and worker processes: a cancelled queued
job never runs, a cancelled running job's process is killed and its slot
reused, and C{shutdown(cancel_futures=True)} withdraws everything.
"""

from __future__ import annotations

import os

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClusterExecutor, master_status
from cw.test.jobs import block_until, square, touch
from cw.test.procs import Processes, process_exists, wait_until


class CancelTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.flag = os.path.abspath(self.mktemp())
        self.addCleanup(lambda: os.path.exists(self.flag) or touch(self.flag))

    def held(self) -> int:
        return sum(w["held"] for w in master_status(self.procs.address)["workers"])

    def test_cancel_queued(self):
        """Cancelled queued jobs leave the master's queue and never run."""
        markers = [os.path.abspath(self.mktemp()) for _ in range(5)]

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            with ClusterExecutor(self.procs.address) as ex:
                blocker = ex.submit(block_until, self.flag)
                doomed = [ex.submit(touch, m) for m in markers]
                wait_until(lambda: master_status(self.procs.address)["queued"] >= 4, what="jobs queued")
                self.assertTrue(all(f.cancel() for f in doomed))
                self.assertTrue(all(f.cancelled() for f in doomed))
                wait_until(
                    lambda: master_status(self.procs.address)["queued"] == 0 and self.held() == 1,
                    what="the cancelled jobs to leave the master",
                )
                touch(self.flag)
                self.assertEqual(blocker.result(60), "released")
                # FIFO: anything not withdrawn would have run before this.
                self.assertEqual(ex.submit(square, 6).result(60), 36)
            self.assertEqual([m for m in markers if os.path.exists(m)], [])

        return threads.deferToThread(body)

    def test_cancel_running(self):
        """Cancelling a running job kills its process; the slot serves the next job."""
        started = os.path.abspath(self.mktemp())

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            with ClusterExecutor(self.procs.address) as ex:
                running = ex.submit(block_until, self.flag, started)
                wait_until(lambda: os.path.exists(started) and open(started).read(), what="the job to start")
                pid = int(open(started).read())
                self.assertTrue(running.cancel())
                wait_until(lambda: not process_exists(pid), what="the job process to be killed")
                self.assertEqual(ex.submit(square, 7).result(60), 49)
                self.assertEqual(master_status(self.procs.address)["queued"], 0)

        return threads.deferToThread(body)

    def test_shutdown_cancel_futures(self):
        """shutdown(cancel_futures=True) returns promptly and withdraws every job."""

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            ex = ClusterExecutor(self.procs.address)
            fs = [ex.submit(block_until, self.flag) for _ in range(10)]
            wait_until(lambda: master_status(self.procs.address)["queued"] >= 8, what="jobs queued")
            ex.shutdown(wait=True, cancel_futures=True)
            self.assertTrue(all(f.cancelled() for f in fs))
            wait_until(
                lambda: master_status(self.procs.address)["queued"] == 0 and self.held() == 0,
                what="the master to forget the jobs",
            )
            with ClusterExecutor(self.procs.address) as again:
                self.assertEqual(again.submit(square, 8).result(60), 64)

        return threads.deferToThread(body)
