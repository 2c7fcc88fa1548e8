"""
A result that leaves nothing queued is followed by the master's dispatch
pass at once, not on the reactor's next turn (issue 18: a lone job's round
trip waits behind no extra turn of the master's reactor); results that
leave jobs queued still share one pass per turn.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cw.master.service import Master
from cw.test.master.test_master_faults import FakePeer
from cw.wire import commands as P


class LoneResultTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.master = Master(clock=self.clock, heartbeat=0)
        self.client = FakePeer(self.master, "c:1")
        self.client.peer_id = self.master.client_joined(self.client, {"cwd": "", "path": []})
        self.worker = FakePeer(self.master, "w:1")
        self.worker.peer_id = self.master.worker_joined(self.worker, 1)

    def sent(self) -> list[int]:
        return [
            job.seq
            for command, kwargs, _ in self.worker.calls
            if command is P.RunJobs
            for job in kwargs["jobs"]
        ]

    def test_lone_result_leaves_no_timer(self):
        """The lone job's result reaches its client, and the master has nothing left to do later."""
        self.master.submit(self.client.peer_id, [P.Job(0, 1, b"p")])
        self.assertEqual(self.sent(), [1])
        self.master.results(self.worker.peer_id, [P.Result(self.client.peer_id, 1, P.Outcome.OK, b"r")])
        self.assertEqual([result.seq for result in self.client.results], [1])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.master.scheduler.queued, 0)

    def test_queued_jobs_go_on_the_next_turn(self):
        """With jobs queued, a result's dispatch waits for the turn's other results, then runs."""
        self.master.submit(self.client.peer_id, [P.Job(0, seq, b"p") for seq in range(1, 51)])
        sent = self.sent()
        self.assertTrue(self.master.scheduler.queued)
        self.master.results(self.worker.peer_id, [P.Result(self.client.peer_id, 1, P.Outcome.OK, b"r")])
        self.assertEqual(self.sent(), sent)
        self.clock.advance(0)
        self.assertGreater(len(self.sent()), len(sent))
