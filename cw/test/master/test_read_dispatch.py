"""
Tests of the master's one dispatch per read (L{cw.master.service.Master.read}):
boxes of jobs that a client's connection delivers in one read reach idle
workers in as few boxes as one box of them would, and still in that read's
turn of the reactor.  A real L{Master} on a Clock, its peers connected in
memory (L{cw.test.peers}); no process, no socket, no time passing.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.trial import unittest

from cw.client.session import client_context
from cw.master.service import DEADLINE_TICK, Master
from cw.test.peers import GatedAMP, authenticated_to_master
from cw.wire import commands as P

#: The cached function's key and bytes (the master never unpickles them).
KEY = b"k" * 16
FUNCTION = b"function bytes"


class Peer(GatedAMP):
    """A worker or client that records the jobs and results it is sent and answers anything else empty."""

    def __init__(self) -> None:
        super().__init__()
        self.boxes: list[list[P.Job]] = []
        self.results: list[P.Result] = []

    @P.RunJobs.responder
    def run_jobs(self, jobs):
        self.boxes.append(jobs)
        return {}

    @P.JobResults.responder
    def job_results(self, results):
        self.results.extend(results)
        return {}

    def locateResponder(self, name):
        responder = super().locateResponder(name)
        if responder is None and self.authenticated:
            return lambda box: defer.succeed(amp.AmpBox())
        return responder


class OneDispatchPerReadTests(unittest.SynchronousTestCase):
    """Boxes of jobs read at once, through many idle one-slot workers."""

    #: Idle workers.
    WORKERS = 50

    def setUp(self):
        self.master = Master(Clock(), secret=os.urandom(32), heartbeat=0)
        self.workers = []
        for _ in range(self.WORKERS):
            peer = Peer()
            _, pump = authenticated_to_master(self.master, peer, "worker")
            answer = peer.callRemote(
                P.RegisterWorker, version=P.PROTOCOL_VERSION, host="test", pid=os.getpid(), slots=1
            )
            pump.flush()
            self.successResultOf(answer)
            self.workers.append((peer, pump))
        self.client = Peer()
        _, self.pump = authenticated_to_master(self.master, self.client, "client")
        answer = self.client.callRemote(
            P.RegisterClient,
            version=P.PROTOCOL_VERSION,
            host="test",
            pid=os.getpid(),
            context=client_context(),
            session="test",
        )
        self.pump.flush()
        self.cid = self.successResultOf(answer)["client_id"]
        self.client.callRemote(P.DefineFunction, client=0, key=KEY, function=FUNCTION)
        self.pump.flush()
        self.seq = 0
        # From now on, a clock the pumps do not advance (they advance theirs
        # by 0 at each flush): what the master leaves for a later turn of
        # the reactor waits until the test says.
        self.clock = self.master.clock = Clock()

    def submit(self, boxes: int, per_box: int) -> None:
        """C{boxes} boxes of C{per_box} jobs of the cached function, delivered to the master in one read."""
        for _ in range(boxes):
            jobs = []
            for _ in range(per_box):
                self.seq += 1
                jobs.append(P.Job(0, self.seq, b"args %d" % self.seq, b"", KEY))
            self.client.callRemote(P.SubmitJobs, jobs=jobs)
        self.pump.flush()

    def answer(self) -> None:
        """Each worker answers the jobs it holds, each box in one report (as a batching worker does)."""
        for peer, pump in self.workers:
            boxes, peer.boxes = peer.boxes, []
            for jobs in boxes:
                results = [P.Result(job.client, job.seq, P.Outcome.OK, b"done") for job in jobs]
                peer.callRemote(P.JobResults, results=results)
            pump.flush()
        self.clock.advance(0)  # the next turn: results go to the client
        self.pump.flush()

    def boxes(self) -> list[int]:
        """The sizes of the boxes of jobs the workers were sent and have not answered."""
        for _, pump in self.workers:
            pump.flush()
        return sorted(len(jobs) for peer, _ in self.workers for jobs in peer.boxes)

    def test_boxes_read_together_dispatched_together(self):
        """
        A short kind known (its jobs reported two at a time), ten boxes of
        three of its jobs that arrive in one read go out in one box, in
        that read: not one box per worker for each box of the client's.
        """
        self.submit(1, 1)
        self.assertEqual(self.boxes(), [1])
        self.answer()
        self.submit(1, 2)  # came back at once: probed two to a slot
        self.assertEqual(self.boxes(), [2])
        self.answer()  # reported together: known short
        self.submit(10, 3)
        self.assertEqual(self.boxes(), [30])
        self.assertEqual(self.master.scheduler.queued, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.answer()
        self.assertEqual(sorted(result.seq for result in self.client.results), list(range(1, self.seq + 1)))

    def test_lone_job_leaves_in_its_read(self):
        """A lone box of jobs of a kind not known yet is spread over idle workers at once, as before."""
        self.submit(1, 5)
        self.assertEqual(self.boxes(), [1, 1, 1, 1, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LagTests(unittest.SynchronousTestCase):
    """The master tells its scheduler how late its timers run (L{cw.core.scheduler.Scheduler.note_lag})."""

    def test_late_deadline_tick_noted(self):
        clock = Clock()
        master = Master(clock, secret=os.urandom(32), heartbeat=0)
        master.start_deadlines()
        self.addCleanup(master.stop_deadlines)
        clock.advance(DEADLINE_TICK)
        self.assertEqual(master.scheduler.lag(clock.seconds()), 0.0)
        clock.advance(DEADLINE_TICK + 0.2)  # a turn of the reactor's that took 0.2 s too long
        self.assertAlmostEqual(master.scheduler.lag(clock.seconds()), 0.2)

    def test_late_running_notices_noted(self):
        """The running notices, due a few milliseconds after each dispatch, say it during a burst."""
        clock = Clock()
        master = Master(clock, secret=os.urandom(32), heartbeat=0)
        master._started_call = clock.callLater(P.RUNNING_NOTICE_DELAY, master._send_started)
        clock.advance(P.RUNNING_NOTICE_DELAY + 0.3)
        self.assertAlmostEqual(master.scheduler.lag(clock.seconds()), 0.3)
        self.assertIsNone(master._started_call)
