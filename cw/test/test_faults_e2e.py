"""
End-to-end fault tests (issue 4): jobs that crash, overrun or kill their
worker, and workers that freeze, against a real C{twistd cw-master} and real
C{twistd cw-worker} processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread, ClusterExecutor, master_status
from cw.errors import JobCrashed, JobTimeout, RemoteException, WorkerLost
from cw.test.procs import Processes, wait_until


def square(x):
    return x * x


def worker_pid(_=None):
    return os.getppid()


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)


def exit_with(code):
    os._exit(code)


def sys_exit(code):
    sys.exit(code)


def allocate(mib):
    return len(bytearray(mib << 20))


def kill_my_worker():
    """Kill the worker running this job (the job process's parent)."""
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)


def wait_for_file(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return os.getppid()


class FaultTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_crashing_jobs(self):
        """
        A segfault, os._exit(3), sys.exit(0) and an allocation past the
        worker's memory limit each give their own clear error; the same
        worker then runs 100 normal jobs.
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1, True, "--memory-limit", "1024")
            with ClusterExecutor(self.procs.address) as ex:
                error = ex.submit(segfault).exception(60)
                self.assertIsInstance(error, JobCrashed)
                self.assertIn("signal 11 (SIGSEGV)", str(error))
                self.assertIn(f"pid {worker.pid}", str(error))
                self.assertTrue(error.host)

                error = ex.submit(exit_with, 3).exception(60)
                self.assertIsInstance(error, JobCrashed)
                self.assertIn("exited with code 3", str(error))

                error = ex.submit(exit_with, 0).exception(60)
                self.assertIsInstance(error, JobCrashed)
                self.assertIn("exited with code 0", str(error))

                error = ex.submit(sys_exit, 0).exception(60)
                self.assertIsInstance(error, RemoteException)
                self.assertNotIsInstance(error, JobCrashed)
                self.assertEqual(error.type, "SystemExit")

                error = ex.submit(allocate, 4096).exception(60)
                self.assertIsInstance(error, RemoteException)
                self.assertEqual(error.type, "MemoryError")

                self.assertEqual(ex.submit(allocate, 16).result(60), 16 << 20)
                pids = set(ex.map(worker_pid, range(100), timeout=60))
            self.assertEqual(pids, {worker.pid})

        return threads.deferToThread(body)

    def test_timeouts(self):
        """
        A job past its timeout fails with JobTimeout within seconds and the
        slot is free afterwards; per job, per executor, per ClientThread and
        the worker's --job-timeout.
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1, True, "--job-timeout", "30")
            with ClusterExecutor(self.procs.address) as ex:
                started = time.monotonic()
                error = ex.submit_with(time.sleep, (3600,), timeout=1).exception(60)
                self.assertLess(time.monotonic() - started, 20)
                self.assertIsInstance(error, JobTimeout)
                self.assertIn("timeout of 1 s", str(error))
                self.assertEqual(ex.submit_with(square, (4,)).result(60), 16)
                self.assertEqual(ex.submit(worker_pid).result(60), worker.pid)
            with ClusterExecutor(self.procs.address, timeout=0.5) as ex:
                self.assertIsInstance(ex.submit(time.sleep, 3600).exception(60), JobTimeout)
                self.assertEqual(ex.submit(square, 5).result(60), 25)
            client = ClientThread(None, self.procs.address, timeout=0.5)
            client.start()
            try:
                client.submit("sleeper", time.sleep, 3600)
                with self.assertRaises(JobTimeout) as caught:
                    client.wait(60)
                self.assertEqual(caught.exception.jobid, "sleeper")
                client.submit_with("short", time.sleep, (0.1,), timeout=30)
                client.wait(60)
            finally:
                client.close()

        return threads.deferToThread(body)

    def test_worker_default_timeout(self):
        """The worker's --job-timeout applies to jobs that set none."""

        def body():
            self.procs.start_master()
            self.procs.start_worker(1, True, "--job-timeout", "1")
            with ClusterExecutor(self.procs.address) as ex:
                error = ex.submit(time.sleep, 3600).exception(60)
                self.assertIsInstance(error, JobTimeout)
                self.assertEqual(ex.submit(square, 6).result(60), 36)

        return threads.deferToThread(body)

    def test_poison_job(self):
        """
        A job that kills its worker every time fails with WorkerLost after
        the master's --max-attempts workers died running it; replacement
        workers then serve normally.
        """

        def body():
            address = self.procs.start_master("--max-attempts", "3")
            hosts = []
            with ClusterExecutor(address) as ex:
                future = None
                for _ in range(3):
                    worker = self.procs.start_worker(1)
                    hosts.append(worker.pid)
                    if future is None:
                        future = ex.submit(kill_my_worker)
                    worker.wait(60)
                    self.procs.workers.remove(worker)
                    wait_until(
                        lambda: master_status(address)["workers"] == [],
                        what="the master to notice the worker died",
                    )
                error = future.exception(60)
                self.assertIsInstance(error, WorkerLost)
                self.assertEqual(error.report["attempts"], 3)
                self.assertEqual(
                    [h.rsplit(":", 1)[1] for h in error.report["hosts"]], [str(p) for p in hosts]
                )
                self.assertIn("lost 3 times", str(error))
                self.procs.start_worker(1)
                self.assertEqual(ex.submit(square, 7).result(60), 49)

        return threads.deferToThread(body)

    def test_poison_job_per_job_limit(self):
        """A job's own max_attempts overrides the master's."""

        def body():
            address = self.procs.start_master("--max-attempts", "5")
            worker = self.procs.start_worker(1)
            with ClusterExecutor(address) as ex:
                future = ex.submit_with(kill_my_worker, max_attempts=1)
                worker.wait(60)
                self.procs.workers.remove(worker)
                error = future.exception(60)
                self.assertIsInstance(error, WorkerLost)
                self.assertEqual(error.report["attempts"], 1)

        return threads.deferToThread(body)

    def test_frozen_worker(self):
        """
        A worker that stops answering (SIGSTOP: its connection stays open)
        is declared lost within the heartbeat timeout and its job finishes
        on another worker.
        """
        flag = os.path.abspath(self.mktemp())

        def body():
            address = self.procs.start_master("--heartbeat", "0.5", "--heartbeat-timeout", "2")
            frozen = self.procs.start_worker(1)
            alive = self.procs.start_worker(1)
            with ClusterExecutor(address) as ex:
                futures = [ex.submit(wait_for_file, flag) for _ in range(2)]
                wait_until(
                    lambda: sorted(w["held"] for w in master_status(address)["workers"]) == [1, 1],
                    what="one job on each worker",
                )
                os.kill(frozen.pid, signal.SIGSTOP)
                self.addCleanup(self._resume, frozen.pid)
                started = time.monotonic()
                with open(flag, "w"):
                    pass
                pids = [f.result(60) for f in futures]
                self.assertLess(time.monotonic() - started, 30)
            self.assertEqual(pids, [alive.pid, alive.pid])

        return threads.deferToThread(body)

    def _resume(self, pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
