"""
End-to-end tests of stopping and restarting (issue 4, items 6 and 8): a
worker stopped with SIGTERM drains, a master stopped with SIGTERM tells its
clients, a restarted master gets its workers back, against real
C{twistd cw-master} and C{twistd cw-worker} processes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread, ClusterExecutor, MasterUnavailable, wait_for_workers
from cw.test.e2e.test_faults_e2e import worker_pid
from cw.test.jobs import square, wait_for_file
from cw.test.procs import Processes, executor, free_port, held, wait_until


def started_then_wait(started, flag):
    """Create the file C{started}, wait for C{flag}; return the worker's pid."""
    Path(started).touch()
    return wait_for_file(flag)


#: How twistd exits after SIGTERM once its services stopped: it re-raises
#: the signal (recent Twisted) or exits with status 0.
STOPPED = (0, -signal.SIGTERM, -signal.SIGINT)


class StopTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.flag = os.path.abspath(self.mktemp())

    def release(self) -> None:
        """Let every C{wait_for_file(self.flag)} job return."""
        Path(self.flag).touch()

    def log_of(self, popen) -> str:
        return Path(popen.log).read_text(errors="replace")

    def test_worker_sigterm_drains(self):
        """
        SIGTERM on a worker running a job with three more prefetched: the
        prefetched jobs run on another worker at once, the running job's
        result still arrives, and the worker then exits, saying it drained.
        """
        return self.drain_on(signal.SIGTERM)

    def test_worker_sigint_drains(self):
        """SIGINT (^C) stops a worker as gracefully as SIGTERM."""
        return self.drain_on(signal.SIGINT)

    def drain_on(self, signum: int):
        def body():
            address = self.procs.start_master("--prefetch", "3")
            stopping = self.procs.start_worker(1)
            with executor(address) as ex:
                started_file = os.path.abspath(self.mktemp())
                running = ex.submit(started_then_wait, started_file, self.flag)
                prefetched = [ex.submit(worker_pid) for _ in range(3)]
                wait_until(lambda: held(address) == [4], what="all four jobs on the worker")
                wait_until(lambda: os.path.exists(started_file), what="the first job to start")
                other = self.procs.start_worker(1)
                stopping.send_signal(signum)
                self.assertEqual([f.result(60) for f in prefetched], [other.pid] * 3)
                self.assertFalse(running.done())
                self.release()
                self.assertEqual(running.result(60), stopping.pid)
            self.assertIn(stopping.wait(60), STOPPED)
            self.procs.workers.remove(stopping)
            log = self.log_of(stopping)
            self.assertIn("handed 3 unstarted jobs back to the master", log)
            self.assertIn("Drained (every running job finished and was reported)", log)

        return threads.deferToThread(body)

    def test_worker_drain_timeout(self):
        """
        A job still running when the drain timeout passes is killed with
        its worker's stop and runs again on another worker, counting no
        attempt (max_attempts=1: were it counted, it would fail with
        WorkerLost).
        """

        def body():
            address = self.procs.start_master()
            stopping = self.procs.start_worker(1, True, "--drain-timeout", "1")
            with executor(address) as ex:
                started_file = os.path.abspath(self.mktemp())
                future = ex.submit_with(started_then_wait, (started_file, self.flag), max_attempts=1)
                wait_until(lambda: os.path.exists(started_file), what="the job to start")
                started = time.monotonic()
                stopping.send_signal(signal.SIGTERM)
                self.assertIn(stopping.wait(60), STOPPED)
                self.assertLess(time.monotonic() - started, 20)
                self.procs.workers.remove(stopping)
                self.assertIn("the drain timeout of 1 s passed with 1 jobs running", self.log_of(stopping))
                other = self.procs.start_worker(1)
                self.release()
                self.assertEqual(future.result(60), other.pid)

        return threads.deferToThread(body)

    def test_master_sigterm_fails_clients(self):
        """
        SIGTERM on the master: a connected executor's pending futures and a
        ClientThread's wait() fail at once with MasterUnavailable saying the
        master shut down; the worker logs it and stays up.
        """

        def body():
            address = self.procs.start_master()
            worker = self.procs.start_worker(1)
            ex = ClusterExecutor(address, reconnect_timeout=0)
            client = ClientThread(None, address, reconnect_timeout=0)
            client.start()
            try:
                futures = [ex.submit(wait_for_file, self.flag) for _ in range(3)]
                client.submit("waiting", wait_for_file, self.flag)
                wait_until(lambda: sum(held(address)) == 2, what="jobs on the worker")
                started = time.monotonic()
                self.procs.master.send_signal(signal.SIGTERM)
                for future in futures:
                    error = future.exception(30)
                    self.assertIsInstance(error, MasterUnavailable)
                    self.assertIn("shut down (the master was stopped)", str(error))
                with self.assertRaises(MasterUnavailable) as caught:
                    client.wait(30)
                self.assertIn("shut down", str(caught.exception))
                self.assertLess(time.monotonic() - started, 10)
                self.assertIn(self.procs.master.wait(30), STOPPED)
                wait_until(
                    lambda: "The master is shutting down" in self.log_of(worker),
                    what="the worker to log the master's notice",
                )
                self.assertIsNone(worker.poll())
            finally:
                ex.shutdown(wait=False)
                client.close()

        return threads.deferToThread(body)

    def test_master_restart(self):
        """
        The master is killed and a new one starts on the same port: the old
        client's futures failed with a connection error, the worker rejoins
        on its own within its reconnect delay, and a new client runs jobs.
        """

        def body():
            listen = f"tcp:{free_port()}:interface=127.0.0.1"
            address = self.procs.start_master(listen=listen)
            worker = self.procs.start_worker(1)
            old = ClusterExecutor(address, reconnect_timeout=0)
            try:
                self.assertEqual(old.submit(square, 3).result(60), 9)
                pending = old.submit(wait_for_file, self.flag)
                wait_until(lambda: held(address) == [1], what="the job to reach the worker")
                self.procs.master.kill()
                self.procs.master.wait(30)
                error = pending.exception(30)
                self.assertIsInstance(error, MasterUnavailable)
                self.assertIn("lost the connection", str(error))
                self.assertRaises(MasterUnavailable, old.submit, square, 4)
            finally:
                old.shutdown(wait=False)
            self.release()
            self.assertEqual(self.procs.start_master(listen=listen), address)
            started = time.monotonic()
            self.assertEqual(wait_for_workers(1, address, timeout=30), 1)
            self.assertLess(time.monotonic() - started, 15, "rejoin took longer than the reconnect delay")
            with executor(address) as ex:
                self.assertEqual(ex.submit(worker_pid).result(60), worker.pid)
                self.assertEqual(list(ex.map(square, range(10), timeout=60)), [x * x for x in range(10)])

        return threads.deferToThread(body)

    def test_worker_started_before_master(self):
        """A worker started while no master listens joins once one does."""

        def body():
            port = free_port()
            worker = self.procs.start_worker(1, False, address=f"127.0.0.1:{port}")
            wait_until(
                lambda: "Scheduling retry" in self.log_of(worker),
                what="the worker to fail to connect once",
            )
            address = self.procs.start_master(listen=f"tcp:{port}:interface=127.0.0.1")
            self.assertEqual(wait_for_workers(1, address, timeout=30), 1)
            with executor(address) as ex:
                self.assertEqual(ex.submit(worker_pid).result(60), worker.pid)

        return threads.deferToThread(body)
