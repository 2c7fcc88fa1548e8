"""
A client's job priorities change the order its jobs run in on a real master
and worker (C{twistd} processes), through both client APIs: the master gets
the priority from the client and its fair queue honours it.
"""

from __future__ import annotations

import os

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread, master_status
from cw.test.jobs import append_line, block_until, touch
from cw.test.procs import DEADLINE, Processes, executor, wait_until

#: Submitted in this order while the one slot is busy: default priority
#: first, then a higher one, then a lower one.
SUBMITTED = [("low-0", 0), ("low-1", 0), ("high-0", 5), ("high-1", 5), ("last-0", -1)]
#: The order they must run in: by priority, FIFO within one.
EXPECTED = ["high-0", "high-1", "low-0", "low-1", "last-0"]


class PriorityTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.flag = os.path.abspath(self.mktemp())
        self.started = os.path.abspath(self.mktemp())
        self.order = os.path.abspath(self.mktemp())
        self.addCleanup(lambda: os.path.exists(self.flag) or touch(self.flag))

    def start(self) -> str:
        """
        A master that gives its worker no prefetched jobs and a worker with
        one slot: every job waits in the master's queue until the slot is
        free, so the master alone picks the order.
        """
        address = self.procs.start_master("--prefetch", "0", "--prefetch-seconds", "0")
        self.procs.start_worker(procs=1)
        return address

    def blocker_started(self) -> None:
        """Wait until the blocker runs (only then submit the others: one burst would be ordered whole)."""
        wait_until(lambda: os.path.exists(self.started), timeout=DEADLINE, what="the blocker to start")

    def queued(self, address: str, count: int) -> None:
        """Wait until C{count} jobs are queued behind the blocker."""
        wait_until(
            lambda: master_status(address)["queued"] == count,
            timeout=DEADLINE,
            what=f"{count} jobs queued on the master",
        )

    def ran(self) -> list[str]:
        with open(self.order) as f:
            return f.read().split()

    def test_executor_priority(self):
        """ClusterExecutor.submit_with(priority=...) orders a client's queued jobs."""

        def body():
            address = self.start()
            with executor(address) as ex:
                blocker = ex.submit(block_until, self.flag, self.started)
                self.blocker_started()
                fs = [ex.submit_with(append_line, (self.order, tag), priority=p) for tag, p in SUBMITTED]
                self.queued(address, len(SUBMITTED))
                touch(self.flag)
                self.assertEqual(blocker.result(DEADLINE), "released")
                self.assertEqual([f.result(DEADLINE) for f in fs], [tag for tag, _ in SUBMITTED])
            self.assertEqual(self.ran(), EXPECTED)

        return threads.deferToThread(body)

    def test_client_thread_priority(self):
        """ClientThread.submit_with(priority=...) orders a client's queued jobs."""

        def body():
            address = self.start()
            results = {}
            client = ClientThread(lambda jobid, result: results.update({jobid: result}), address)
            client.start()
            try:
                client.submit("blocker", block_until, self.flag, self.started)
                self.blocker_started()
                for tag, p in SUBMITTED:
                    client.submit_with(tag, append_line, (self.order, tag), priority=p)
                self.queued(address, len(SUBMITTED))
                touch(self.flag)
                client.wait(DEADLINE)
            finally:
                client.close()
            self.assertEqual(results, {"blocker": "released", **{tag: tag for tag, _ in SUBMITTED}})
            self.assertEqual(self.ran(), EXPECTED)

        return threads.deferToThread(body)
