"""
A lone job's submit is written to the master's connection by the thread
that submits it (L{cw.client.session.Session.send} with C{now}), not by the
reactor thread woken up to do it (issue 18, item 4: one thread switch less
per round trip); jobs of a burst still share boxes the reactor thread
sends; and when the caller's thread cannot write (something is buffered
ahead, or the socket takes only part), what it sent goes out through the
reactor thread in order, its MACs still in sequence.

Against a real master and worker (shared by these tests); nothing is timed.
"""

from __future__ import annotations

import os
import threading

from twisted.internet import threads
from twisted.trial import unittest

import cw.client.session
from cw.client import ClusterExecutor
from cw.test.jobs import square, touch, wait_for_file
from cw.test.procs import DEADLINE, abandon, in_thread, shared_cluster


class LoneSubmitTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        def connect():
            self.cluster = shared_cluster("lone", (1,))
            self.executor = ClusterExecutor(self.cluster.address)
            session = self.executor.session
            #: The threads each flush of the session ran in, and the boxes
            #: other threads handed to the reactor thread.
            self.flushes: list[int] = []
            self.drains = 0
            flush = session._flush

            def recording_flush(here=False):
                self.flushes.append(threading.get_ident())
                flush(here)

            session._flush = recording_flush
            proto = session.proto
            drain = proto._drain_backlog

            def recording_drain():
                self.drains += 1
                drain()

            proto._drain_backlog = recording_drain

        return threads.deferToThread(connect)

    def tearDown(self):
        return threads.deferToThread(abandon, self.executor)

    def mine(self) -> int:
        return self.flushes.count(threading.get_ident())

    @in_thread
    def test_lone_jobs_written_by_their_caller(self):
        """Each lone job is flushed and written at once by the submitting thread, none left to the reactor."""
        for i in range(20):
            self.assertEqual(self.executor.submit(square, i).result(DEADLINE), i * i)
        self.assertEqual(self.mine(), 20)
        self.assertEqual(self.drains, 0)

    @in_thread
    def test_burst_shares_boxes(self):
        """Jobs submitted while another is outstanding are left to the reactor thread, which batches them."""
        flag = os.path.abspath(self.mktemp())
        self.addCleanup(touch, flag)
        first = self.executor.submit(wait_for_file, flag)
        burst = [self.executor.submit(square, i) for i in range(200)]
        self.assertEqual(self.mine(), 1)  # the first job only: it was alone
        touch(flag)
        first.result(DEADLINE)
        self.assertEqual([f.result(DEADLINE) for f in burst], [i * i for i in range(200)])

    @in_thread
    def test_cannot_write_now(self):
        """Nothing can be written from this thread: the reactor thread sends the box, and it works."""
        self.patch(cw.client.session, "can_write_now", lambda transport: False)
        for i in range(5):
            self.assertEqual(self.executor.submit(square, i).result(DEADLINE), i * i)
        self.assertEqual(self.drains, 5)

    @in_thread
    def test_partial_writes(self):
        """
        The socket takes only the first bytes of each box: the rest goes
        through the reactor thread, ahead of anything sent after it, and
        the master accepts every box (their MACs in sequence).
        """
        real = cw.client.session.write_now
        self.patch(cw.client.session, "write_now", lambda transport, data: real(transport, data[:7]))
        for i in range(5):
            self.assertEqual(self.executor.submit(square, i).result(DEADLINE), i * i)
        self.assertEqual(self.drains, 5)
        # Boxes from both threads, interleaved, on one connection.
        futures = [self.executor.submit(square, i) for i in range(50)]
        self.assertEqual([f.result(DEADLINE) for f in futures], [i * i for i in range(50)])
        self.assertEqual(self.executor.submit(square, 3).result(DEADLINE), 9)
