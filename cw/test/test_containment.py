"""
Job processes cannot escape (L{cw.containment}): what a job starts dies
with it on a timeout, a cancel, a crash or a normal return, a job process
dies with its worker, and a worker that lost its master kills its running
jobs.  Real twistd master and worker processes over TCP on loopback; every
process a job starts is found by the pid the job records, and killed in
the cleanup if it survived.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClusterExecutor, master_status
from cw.errors import JobCrashed, JobTimeout
from cw.test.jobs import block_until, start_sleeps, touch, worker_pid
from cw.test.procs import Processes, executor, process_exists, wait_until

#: Seconds within which a killed process must be gone.
GONE_WITHIN = 5


class ContainmentTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.record = os.path.abspath(self.mktemp())

    def recorded(self) -> list[int]:
        """
        Wait for the job to record its pids: C{[job process, sleep, sleep in
        its own session, daemonized sleep]} (see L{start_sleeps}).
        """
        wait_until(lambda: os.path.exists(self.record), timeout=30, what="the job to start its sleeps")
        pids = [int(p) for p in open(self.record).read().split()]
        for pid in pids:
            self.addCleanup(kill_if_alive, pid)
        return pids

    def assertGone(self, pids: list[int], what: str) -> None:
        wait_until(
            lambda: not any(process_exists(pid) for pid in pids),
            timeout=GONE_WITHIN,
            what=f"{what} ({pids}) to be gone",
        )

    def test_timeout_kills_what_the_job_started(self):
        """
        A job with C{timeout=2} that starts three C{sleep 300} (in its
        group, in a session of their own, daemonized) and hangs:
        C{JobTimeout} within 10 s although the sleeps hold its pipes, the
        sleeps are gone, and the next job runs on that slot.
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                began = time.monotonic()
                future = ex.submit_with(start_sleeps, (self.record, "hang"), timeout=2)
                pids = self.recorded()
                self.assertIsInstance(future.exception(10), JobTimeout)
                self.assertLess(time.monotonic() - began, 10)
                self.assertGone(pids, "the job process and its sleeps")
                self.assertEqual(ex.submit(worker_pid).result(30), worker.pid)

        return threads.deferToThread(body)

    def test_return_kills_what_the_job_left(self):
        """
        A job that returns after starting three background sleeps (in its
        group, in a session of their own, daemonized): all are gone, and its
        job process lives on.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                sleeps = ex.submit(start_sleeps, self.record).result(30)
                job, *recorded = self.recorded()
                self.assertEqual(sleeps, recorded)
                self.assertGone(sleeps, "the sleeps the job left")
                self.assertTrue(process_exists(job), "the job process was killed too")

        return threads.deferToThread(body)

    def test_cancel_kills_what_the_job_started(self):
        """Cancelling a running job kills its process and all its sleeps."""

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                future = ex.submit(start_sleeps, self.record, "hang")
                pids = self.recorded()
                self.assertTrue(future.cancel())
                self.assertGone(pids, "the job process and its sleeps")
                self.assertEqual(ex.submit(worker_pid).result(30), worker.pid)

        return threads.deferToThread(body)

    def test_crash_not_held_by_pipes(self):
        """
        A job process that dies by itself while a process it started in a
        session of its own holds its pipes: the crash is reported within
        10 s (the worker watches the process, not its pipes), what was left
        in its group is killed, and the slot runs the next job.  (The
        sleeps outside its group survive: the README says so.)
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                began = time.monotonic()
                future = ex.submit_with(start_sleeps, (self.record, "die"), max_attempts=1)
                job, in_group, _, _ = self.recorded()
                self.assertIsInstance(future.exception(10), JobCrashed)
                self.assertLess(time.monotonic() - began, 10)
                self.assertGone([job, in_group], "the job process and the sleep in its group")
                self.assertEqual(ex.submit(worker_pid).result(30), worker.pid)

        return threads.deferToThread(body)

    def test_job_process_dies_with_its_worker(self):
        """SIGKILL a worker with a running job: its job process is gone within 5 s."""
        flag = os.path.abspath(self.mktemp())
        self.addCleanup(lambda: os.path.exists(flag) or touch(flag))

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            ex = ClusterExecutor(self.procs.address)
            try:
                ex.submit(block_until, flag, self.record)
                job = self.recorded()[0]
                os.kill(worker.pid, signal.SIGKILL)
                self.assertGone([job], "the job process of the killed worker")
            finally:
                ex.shutdown(wait=False, cancel_futures=True)

        return threads.deferToThread(body)

    def test_stopped_worker_kills_its_jobs_on_resuming(self):
        """
        A worker stopped (SIGSTOP) past the master's heartbeat timeout: the
        master runs its job elsewhere; once resumed, the worker finds its
        master connection gone and kills the job process it still runs.
        """
        flag = os.path.abspath(self.mktemp())
        self.addCleanup(lambda: os.path.exists(flag) or touch(flag))

        def body():
            address = self.procs.start_master("--heartbeat", "0.5", "--heartbeat-timeout", "2")
            frozen = self.procs.start_worker(1)
            self.addCleanup(resume, frozen.pid)
            with executor(address) as ex:
                future = ex.submit(block_until, flag, self.record)
                job = self.recorded()[0]
                os.kill(frozen.pid, signal.SIGSTOP)
                wait_until(
                    lambda: master_status(address)["workers"] == [],
                    timeout=30,
                    what="the master to drop the stopped worker",
                )
                self.assertTrue(process_exists(job), "the job process ran on while its worker was stopped")
                os.kill(frozen.pid, signal.SIGCONT)
                self.assertGone([job], "the resumed worker's job process")
                alive = self.procs.start_worker(1)
                touch(flag)
                self.assertEqual(future.result(60), "released")
                self.assertEqual(ex.submit(worker_pid).result(30), alive.pid)

        return threads.deferToThread(body)


def resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def kill_if_alive(pid: int) -> None:
    """SIGKILL C{pid} if a process a test recorded is still there (cleanup)."""
    if process_exists(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
