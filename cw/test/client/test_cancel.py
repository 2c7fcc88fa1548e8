"""
Cancellation against real master and worker processes: a cancelled queued
job never runs, a running job cannot be cancelled but can be killed (its
process is killed and its slot reused), and C{shutdown(cancel_futures=True)}
withdraws every job not yet running.
"""

from __future__ import annotations

import os
from concurrent.futures import CancelledError, Future

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClusterExecutor, JobKilled, master_status
from cw.test.jobs import block_until, square, touch
from cw.test.procs import Processes, abandon, executor, held, process_exists, wait_until

#: How long a cancellation or a kill may take to reach the master and the
#: worker (a deadline, so that one that does nothing fails the test quickly).
CANCEL_BOUND = 20


class CancelTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.flag = os.path.abspath(self.mktemp())
        self.addCleanup(lambda: os.path.exists(self.flag) or touch(self.flag))

    def test_cancel_queued(self):
        """
        Cancelled queued jobs leave the master's queue and never run; a
        job already handed to the worker (prefetched behind the running
        one) is running, and cannot be cancelled.
        """
        markers = [os.path.abspath(self.mktemp()) for _ in range(5)]

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            with executor(self.procs.address) as ex:
                blocker = ex.submit(block_until, self.flag)
                wait_until(blocker.running, what="the first job to be running")
                doomed = [ex.submit(touch, m) for m in markers]
                wait_until(lambda: master_status(self.procs.address)["queued"] >= 4, what="jobs queued")
                kept = [f for f in doomed if not f.cancel()]
                self.assertLessEqual(len(kept), 1)
                self.assertTrue(all(f.running() for f in kept))
                self.assertTrue(all(f.cancelled() for f in doomed if f not in kept))
                wait_until(
                    lambda: master_status(self.procs.address)["queued"] == 0,
                    timeout=CANCEL_BOUND,
                    what="the cancelled jobs to leave the master",
                )
                touch(self.flag)
                self.assertEqual(blocker.result(60), "released")
                # FIFO: anything not withdrawn would have run before this.
                self.assertEqual(ex.submit(square, 6).result(60), 36)
                ran = [m for m, f in zip(markers, doomed, strict=True) if f in kept]
                self.assertEqual([f.result(60) for f in kept], ran)
            self.assertEqual([m for m in markers if os.path.exists(m)], ran)

        return threads.deferToThread(body)

    def test_cancel_running(self):
        """
        A running job cannot be cancelled (C{cancel()} returns False, as in
        the standard library); C{kill} kills its process, its future raises
        L{JobKilled}, and the slot serves the next job.
        """
        started = os.path.abspath(self.mktemp())

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            with executor(self.procs.address) as ex:
                running = ex.submit(block_until, self.flag, started)
                wait_until(lambda: os.path.exists(started) and open(started).read(), what="the job to start")
                pid = int(open(started).read())
                self.assertTrue(running.running())
                self.assertFalse(running.cancel())
                self.assertFalse(running.cancelled())
                stranger = Future()
                self.assertEqual(ex.kill(stranger), 0)
                self.assertFalse(stranger.cancelled())
                self.assertEqual(ex.kill(running), 1)
                self.assertIsInstance(running.exception(0), JobKilled)
                self.assertIsInstance(running.exception(0), CancelledError)
                wait_until(
                    lambda: not process_exists(pid), timeout=CANCEL_BOUND, what="the job process to be killed"
                )
                self.assertEqual(ex.submit(square, 7).result(60), 49)
                self.assertEqual(master_status(self.procs.address)["queued"], 0)
                self.assertEqual(ex.kill(running), 0)

        return threads.deferToThread(body)

    def test_shutdown_cancel_futures(self):
        """
        shutdown(cancel_futures=True) withdraws every job not yet running;
        the running ones finish (here: once released).
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            ex = ClusterExecutor(self.procs.address)
            try:
                fs = [ex.submit(block_until, self.flag) for _ in range(10)]
                wait_until(lambda: master_status(self.procs.address)["queued"] >= 8, what="jobs queued")
                ex.shutdown(wait=False, cancel_futures=True)
                cancelled = [f for f in fs if f.cancelled()]
                self.assertGreaterEqual(len(cancelled), 8)
                wait_until(
                    lambda: master_status(self.procs.address)["queued"] == 0,
                    timeout=CANCEL_BOUND,
                    what="the master to forget the queued jobs",
                )
                touch(self.flag)
                others = [f for f in fs if not f.cancelled()]
                self.assertEqual([f.result(60) for f in others], ["released"] * len(others))
                wait_until(lambda: held(self.procs.address) == [0], what="the worker to finish")
            except BaseException:
                abandon(ex)
                raise
            with executor(self.procs.address) as again:
                self.assertEqual(again.submit(square, 8).result(60), 64)

        return threads.deferToThread(body)
