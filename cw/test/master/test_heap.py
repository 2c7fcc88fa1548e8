"""
Tests of L{cw.master.heap}: when the master freezes its long-lived objects
out of the garbage collector's walks, and that the objects of idle worker
connections then stay out of them.
"""

from __future__ import annotations

import gc
import os

from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from cw.master.heap import MAX_DEFER, HeapKeeper
from cw.master.service import Master
from cw.test.peers import GatedAMP, authenticated_to_master
from cw.test.procs import Processes, wait_until
from cw.wire import commands as P


class Recorder:
    """Stands for the C{gc} module: records the calls L{HeapKeeper} makes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        #: Objects frozen (the test sets it).
        self.frozen = 0

    def unfreeze(self) -> None:
        self.calls.append(("unfreeze",))

    def collect(self, generation: int = 2) -> int:
        self.calls.append(("collect", generation))
        return 0

    def freeze(self) -> None:
        self.calls.append(("freeze",))

    def get_freeze_count(self) -> int:
        return self.frozen


FULL = [("unfreeze",), ("collect", 2), ("freeze",)]
YOUNG = [("collect", 1), ("freeze",)]


class HeapKeeperTests(unittest.SynchronousTestCase):
    """When L{HeapKeeper} freezes, and how (on a Clock, with a recorder for C{gc})."""

    def setUp(self):
        self.clock = Clock()
        self.gc = Recorder()
        self.heap = HeapKeeper(self.clock, settle=2.0, collector=self.gc)

    def test_freeze_collects_everything(self):
        """L{HeapKeeper.freeze} (at start) unfreezes and collects everything, then freezes."""
        self.heap.freeze()
        self.assertEqual(self.gc.calls, FULL)
        self.assertEqual(self.heap.freezes, 1)

    def test_burst_of_joins(self):
        """Workers joining in a burst: one cheap freeze, C{settle} seconds after the first."""
        for _ in range(500):
            self.heap.joined()
            self.clock.advance(0.001)
        self.assertEqual(self.gc.calls, [])
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, YOUNG)
        self.heap.joined()
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, YOUNG + YOUNG)
        self.clock.advance(60)
        self.assertEqual(self.gc.calls, YOUNG + YOUNG)

    def test_left_collects_everything(self):
        """
        A connection frozen while it lived leaving, even in a burst of
        joins, makes the next freeze a full one: its cycles are freed.
        One that came and went between two freezes changes nothing.
        """
        epoch = self.heap.epoch()
        self.heap.joined()
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, YOUNG)
        self.gc.calls.clear()
        self.heap.left(self.heap.epoch())  # never frozen
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.heap.joined()
        self.heap.left(epoch)
        self.heap.joined()
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, YOUNG + FULL)
        self.heap.joined()
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, YOUNG + FULL + YOUNG)

    def test_full_walk_waits_for_idle(self):
        """
        A full walk that is due (a frozen connection left) waits while the
        master is busy, looking again every C{settle} seconds, at most
        L{MAX_DEFER} seconds.
        """
        busy = [True]
        self.heap.busy = lambda: busy[0]
        epoch = self.heap.epoch()
        self.heap.freeze()
        self.gc.calls.clear()
        self.heap.left(epoch)
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, YOUNG)
        busy[0] = False
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, YOUNG + YOUNG + FULL)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.gc.calls.clear()
        busy[0] = True
        self.heap.left(epoch)
        for _ in range(int(MAX_DEFER / 2.0) - 1):
            self.clock.advance(2.0)
        self.assertNotIn(("unfreeze",), self.gc.calls)
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls[-3:], FULL)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_growth_collects_everything_when_idle(self):
        """
        Once the frozen objects grew by more than a quarter since the last
        full collection, the next freeze that finds the master idle
        collects everything; past four times, the next freeze does.
        """
        busy = [False]
        self.heap.busy = lambda: busy[0]
        self.gc.frozen = 1000
        self.heap.freeze()
        self.gc.frozen = 1200
        self.heap.joined()
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, FULL + YOUNG)
        self.gc.calls.clear()
        self.gc.frozen = 1300
        busy[0] = True
        self.heap.joined()
        self.clock.advance(2.0)
        self.clock.advance(2.0)  # busy: looked at again, still busy
        self.assertEqual(self.gc.calls, YOUNG + YOUNG)
        busy[0] = False
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, YOUNG + YOUNG + YOUNG + FULL)
        self.gc.calls.clear()
        self.clock.advance(60)
        self.assertEqual(self.gc.calls, [])
        self.gc.frozen = 5201  # more than four times the 1,300 of the last full collection
        busy[0] = True
        self.heap.joined()
        self.clock.advance(2.0)
        self.assertEqual(self.gc.calls, YOUNG + FULL)

    def test_stop(self):
        """L{HeapKeeper.stop} cancels a pending freeze."""
        self.heap.joined()
        self.heap.stop()
        self.clock.advance(10)
        self.assertEqual(self.gc.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class IdleConnectionTests(unittest.SynchronousTestCase):
    """
    A real L{Master} (on a Clock) with worker connections registered in
    memory (both ends in this process), and a real L{HeapKeeper}.
    """

    #: Worker connections made.
    N = 200

    #: Tracked objects one idle worker connection may cost, both ends
    #: together (about 50 measured, with in-memory transports): a generous
    #: bound that catches, e.g., a timer or Deferred chain per connection.
    PER_CONNECTION = 250

    def setUp(self):
        self.master = Master(Clock(), secret=os.urandom(32), heartbeat=0)
        self.master.heap = HeapKeeper(self.master.clock)
        self.addCleanup(gc.unfreeze)
        self.addCleanup(self.master.heap.stop)
        self.links = []

    def connect(self, n: int) -> None:
        for _ in range(n):
            peer = GatedAMP()
            server, pump = authenticated_to_master(self.master, peer, "worker")
            d = peer.callRemote(
                P.RegisterWorker,
                version=P.PROTOCOL_VERSION,
                host="test",
                pid=os.getpid(),
                slots=1,
                capacity={"cpus": 1},
            )
            pump.flush()
            self.successResultOf(d)
            self.links.append((peer, server, pump))

    def test_connections_leaving(self):
        """
        A worker or a client that was connected during a freeze leaving
        makes the next freeze a full one; a client that came and went
        between two freezes (a status query) does not.
        """
        self.connect(1)
        _, server, pump = self.links[0]
        self.master.clock.advance(self.master.heap.settle)
        self.assertEqual(self.master.heap.freezes, 1)
        server.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.master.workers, {})
        self.assertIsNotNone(self.master.heap._due)
        self.master.clock.advance(self.master.heap.settle)
        self.assertIsNone(self.master.heap._due)
        for frozen in (False, True):
            server, pump = self.client()
            if frozen:
                self.master.heap.freeze(full=False)
            server.transport.loseConnection()
            pump.flush()
            self.assertEqual(self.master.clients, {})
            self.assertEqual(self.master.heap._due is not None, frozen)

    def client(self):
        """Register a client connection; return the master's end and the pump."""
        client = GatedAMP()
        server, pump = authenticated_to_master(self.master, client, "client")
        fields = {"version": P.PROTOCOL_VERSION, "host": "t", "pid": os.getpid(), "session": "s"}
        d = client.callRemote(P.RegisterClient, context={"cwd": "/", "path": []}, **fields)
        pump.flush()
        self.successResultOf(d)
        return server, pump

    def test_idle_connections_frozen(self):
        """
        Once the workers have joined and the heap settled, the full
        collections of the master walk none of their objects; and each
        connection costs no more than L{PER_CONNECTION} objects.
        """
        self.connect(5)  # the first connections create what every later one shares
        gc.collect()
        before = len(gc.get_objects())
        self.connect(self.N)
        gc.collect()
        grown = len(gc.get_objects()) - before
        self.assertEqual(len(self.master.workers), self.N + 5)
        self.assertLess(grown / self.N, self.PER_CONNECTION)
        self.assertGreater(grown / self.N, 10)  # the count does see the connections
        self.master.clock.advance(self.master.heap.settle)
        self.assertEqual(self.master.heap.freezes, 1)
        walked = len(gc.get_objects())  # what a full collection walks (frozen objects are not listed)
        self.assertLess(walked, self.N)


class MasterProcessTests(unittest.TestCase):
    """The C{cw-master} process keeps its heap frozen; a process embedding a L{Master} does not."""

    timeout = 120

    def test_twistd_master_freezes(self):
        """A real master freezes at start, and says so once in its log."""
        procs = Processes(self, self.mktemp())

        def body():
            procs.start_master()
            wait_until(
                lambda: "long-lived objects out of the garbage collector" in procs.master.log.read_text(),
                timeout=20,
                what="the master to freeze its heap",
            )

        return threads.deferToThread(body)

    def test_embedded_master_does_not(self):
        """A L{Master} made in this process leaves its garbage collector alone."""
        self.assertIsNone(Master(Clock(), heartbeat=0).heap)
