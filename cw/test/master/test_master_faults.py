"""
Tests for fault handling with a fake clock and fake connections: the
master's heartbeats that drop silent workers, jobs that fail once they have
been running on too many lost workers, and the worker's watchdog that drops
a master whose heartbeats stopped.  Also with these fakes: when results
leave for their client (L{DeliveryTests}).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cw.master.service import Master
from cw.wire import commands as P
from cw.worker.service import Worker


class FakeTransport:
    def __init__(self, proto) -> None:
        self.proto = proto
        self.aborted = False

    def abortConnection(self):
        self.aborted = True
        self.proto.master.worker_left(self.proto)

    loseConnection = abortConnection


class FakePeer:
    """A registered worker or client connection as the master sees it."""

    def __init__(self, master: Master, name: str) -> None:
        self.master = master
        self.peer_name = name
        self.peer_id = 0
        self.transport = FakeTransport(self)
        self.calls: list[tuple[type, dict, defer.Deferred]] = []
        self.results: list[P.Result] = []
        #: Each C{send_results}: the seqs, and whether they were to leave at once.
        self.sends: list[tuple[list[int], bool]] = []
        self.contexts_sent: set[int] = set()

    def callRemote(self, command, **kwargs):
        d = defer.Deferred()
        self.calls.append((command, kwargs, d))
        return d

    def send_jobs(self, jobs):
        self.calls.append((P.RunJobs, {"jobs": jobs}, None))

    def send_results(self, results, now=False):
        self.results.extend(results)
        self.sends.append(([result.seq for result in results], now))

    def unsent_bytes(self) -> int:
        return 0

    def sent_bytes(self) -> int:
        return 0

    def waiting_on_relay(self) -> bool:
        return False  # nothing forwarded to it (L{cw.wire.forwarding})

    def pings(self) -> list[defer.Deferred]:
        return [d for command, _, d in self.calls if command is P.Heartbeat]


class HeartbeatTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.master = Master(clock=self.clock, heartbeat=1.0, heartbeat_timeout=3.0)
        self.master.start_heartbeats()
        self.addCleanup(self.master.stop_heartbeats)

    def add_worker(self, name="w:1") -> FakePeer:
        peer = FakePeer(self.master, name)
        peer.peer_id = self.master.worker_joined(peer, 1)
        return peer

    def test_answering_worker_kept(self):
        worker = self.add_worker()
        for _ in range(10):
            self.clock.advance(1.0)
            for d in worker.pings():
                if not d.called:
                    d.callback({})
        self.assertFalse(worker.transport.aborted)
        self.assertEqual(len(worker.pings()), 10)

    def test_silent_worker_dropped_after_timeout(self):
        worker = self.add_worker()
        self.clock.advance(3.0)
        self.assertFalse(worker.transport.aborted)
        self.assertEqual(len(worker.pings()), 1, "no second ping while one is unanswered")
        self.clock.advance(1.0)
        self.assertTrue(worker.transport.aborted)
        self.assertEqual(self.master.workers, {})

    def test_results_count_as_signs_of_life(self):
        worker = self.add_worker()
        for _ in range(6):
            self.clock.advance(1.0)
            self.master.results(worker.peer_id, [])
        self.assertFalse(worker.transport.aborted)

    def test_jobs_of_silent_worker_go_elsewhere(self):
        client = FakePeer(self.master, "c:1")
        client.peer_id = self.master.client_joined(client, {"cwd": "", "path": []})
        silent = self.add_worker("silent:1")
        self.master.submit(client.peer_id, [P.Job(0, 1, b"p")])
        self.clock.advance(0)
        self.assertEqual(len([c for c in silent.calls if c[0] is P.RunJobs]), 1)
        other = self.add_worker("other:2")
        for _ in range(4):
            self.clock.advance(1.0)
            for d in other.pings():
                if not d.called:
                    d.callback({})
        self.assertTrue(silent.transport.aborted)
        self.assertFalse(other.transport.aborted)
        self.clock.advance(0)
        [(_, kwargs, _)] = [c for c in other.calls if c[0] is P.RunJobs]
        self.assertEqual([job.seq for job in kwargs["jobs"]], [1])

    def test_disabled(self):
        master = Master(clock=self.clock, heartbeat=0)
        master.start_heartbeats()
        peer = FakePeer(master, "w:1")
        peer.peer_id = master.worker_joined(peer, 1)
        self.clock.advance(1000)
        self.assertEqual(peer.pings(), [])
        self.assertFalse(peer.transport.aborted)


class DeliveryTests(SynchronousTestCase):
    """
    A client's last outstanding result leaves at once (a lone job's round
    trip waits for nothing); while it has more jobs out, results wait for
    the reactor's next turn, so that the reports of many workers read in
    one turn share a box to the client.
    """

    def test_last_result_at_once_others_on_next_turn(self):
        clock = Clock()
        master = Master(clock=clock, heartbeat=0)
        client = FakePeer(master, "c:1")
        client.peer_id = master.client_joined(client, {"cwd": "", "path": []})
        workers = []
        for i in range(3):
            worker = FakePeer(master, f"w:{i}")
            worker.peer_id = master.worker_joined(worker, 1)
            workers.append(worker)
        master.submit(client.peer_id, [P.Job(0, seq, b"p") for seq in (1, 2, 3)])
        clock.advance(0)
        for worker in workers:
            [jobs] = [kwargs["jobs"] for command, kwargs, _ in worker.calls if command is P.RunJobs]
            master.results(worker.peer_id, [P.Result(job.client, job.seq, P.Outcome.OK, b"") for job in jobs])
        self.assertEqual(client.sends, [([1], False), ([2], False), ([3], True)])
        # A lone job: its result leaves at once.
        master.submit(client.peer_id, [P.Job(0, 4, b"p")])
        clock.advance(0)
        [worker] = [w for w in workers if sum(c[0] is P.RunJobs for c in w.calls) == 2]
        master.results(worker.peer_id, [P.Result(client.peer_id, 4, P.Outcome.OK, b"")])
        self.assertEqual(client.sends[-1], ([4], True))


class DuplicateJobTests(SynchronousTestCase):
    def test_duplicate_answered_once_first_runs_on(self):
        """
        A client's second job with the seq of one still running gets one
        DuplicateJob result; the first job stays with its worker.
        """
        clock = Clock()
        master = Master(clock=clock, heartbeat=0)
        client = FakePeer(master, "c:1")
        client.peer_id = master.client_joined(client, {"cwd": "", "path": []})
        worker = FakePeer(master, "w:1")
        worker.peer_id = master.worker_joined(worker, 2)
        master.submit(client.peer_id, [P.Job(0, 1, b"p")])
        clock.advance(0)
        master.submit(client.peer_id, [P.Job(0, 1, b"q")])
        clock.advance(0)
        [result] = client.results
        self.assertEqual((result.seq, result.status), (1, P.Outcome.FAILED))
        self.assertEqual(P.read_error_report(result.payload)["type"], "DuplicateJob")
        sent = [
            job.payload
            for command, kwargs, _ in worker.calls
            if command is P.RunJobs
            for job in kwargs["jobs"]
        ]
        self.assertEqual(sent, [b"p"])


class WorkerLostTests(SynchronousTestCase):
    def test_failure_delivered_after_max_attempts(self):
        clock = Clock()
        master = Master(clock=clock, max_attempts=2, heartbeat=0)
        client = FakePeer(master, "c:1")
        client.peer_id = master.client_joined(client, {"cwd": "", "path": []})
        master.submit(client.peer_id, [P.Job(0, 7, b"p")])
        for n in range(2):
            worker = FakePeer(master, f"host{n}:{n}")
            worker.peer_id = master.worker_joined(worker, 1)
            clock.advance(0)
            worker.lost_how = "killed"
            master.worker_left(worker)
        [result] = client.results
        self.assertEqual((result.seq, result.status), (7, P.Outcome.CRASHED))
        report = P.read_error_report(result.payload)
        self.assertEqual(report["type"], "WorkerLost")
        self.assertEqual(report["hosts"], ["host0:0", "host1:1"])
        self.assertIn("host1:1 (killed)", report["message"])
        self.assertEqual(master.scheduler.queued, 0)


class MasterWatchdogTests(SynchronousTestCase):
    """A worker drops a master connection whose heartbeats stopped."""

    def setUp(self):
        self.clock = Clock()
        self.worker = Worker(None, 1, clock=self.clock)
        self.proto = FakeWorkerConnection()
        self.worker.proto = self.proto

    def beat(self, times: int, every: float) -> None:
        for _ in range(times):
            self.worker.heartbeat_received(self.proto)
            self.clock.advance(every)

    def test_not_armed_before_second_heartbeat(self):
        self.clock.advance(1000)
        self.beat(1, 1000.0)
        self.assertFalse(self.proto.transport.aborted)

    def test_steady_heartbeats_keep_connection(self):
        self.beat(100, 5.0)
        self.assertFalse(self.proto.transport.aborted)

    def test_silence_drops_connection(self):
        self.beat(3, 5.0)
        self.clock.advance(24.9)
        self.assertFalse(self.proto.transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(self.proto.transport.aborted)

    def test_slow_heartbeats_stretch_the_timeout(self):
        self.beat(5, 60.0)
        self.assertFalse(self.proto.transport.aborted)
        self.clock.advance(115)
        self.assertFalse(self.proto.transport.aborted)
        self.clock.advance(10)
        self.assertTrue(self.proto.transport.aborted)

    def test_data_from_master_counts(self):
        """A master busy sending a big box (its heartbeat queued behind it) is not silent."""
        self.beat(3, 5.0)
        for _ in range(120):
            self.clock.advance(1.0)
            self.proto.last_heard = self.clock.seconds()
        self.assertFalse(self.proto.transport.aborted)
        self.clock.advance(30.1)
        self.assertTrue(self.proto.transport.aborted)

    def test_disabled(self):
        self.worker.master_timeout = 0
        self.beat(1, 1000.0)
        self.assertFalse(self.proto.transport.aborted)

    def test_disconnect_disarms(self):
        self.beat(2, 1.0)
        self.worker.disconnected(self.proto)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FakeWorkerConnection:
    """The worker's master connection, reduced to what the watchdog touches."""

    def __init__(self) -> None:
        self.transport = self
        self.aborted = False
        self.last_heard = float("-inf")

    def abortConnection(self):
        self.aborted = True


class FakePool:
    """Job processes whose calls end when the test says so."""

    def __init__(self) -> None:
        self.calls: list[defer.Deferred] = []
        self.batches: list[list[P.Job]] = []
        self.killed = 0

    def doWork(self, command, **kwargs):
        d = defer.Deferred()
        self.calls.append(d)
        self.batches.append(list(kwargs["jobs"]))
        return d

    def kill_busy(self, why: str = "") -> int:
        killed = 0
        for d in self.calls:
            if not d.called:
                killed += 1
                d.errback(RuntimeError("killed"))
        self.killed += killed
        return killed


class FakeMasterLink:
    """The worker's master connection, recording what the worker sends."""

    def __init__(self) -> None:
        self.transport = self
        self.sent: list[tuple[type, dict]] = []

    def callRemote(self, command, **kwargs):
        self.sent.append((command, kwargs))
        return defer.succeed({})

    def abortConnection(self):
        pass

    def of(self, command) -> list[dict]:
        return [kwargs for c, kwargs in self.sent if c is command]


class DrainTests(SynchronousTestCase):
    """A stopping worker returns unstarted jobs, finishes running ones within its drain timeout."""

    def setUp(self):
        self.clock = Clock()
        self.pool = FakePool()
        self.worker = Worker(self.pool, 1, clock=self.clock)
        self.link = FakeMasterLink()
        self.worker.proto = self.link
        self.worker.enqueue([P.Job(5, seq, b"p") for seq in (1, 2, 3)])
        self.assertEqual(len(self.pool.calls), 1)

    def test_unstarted_returned_running_reported(self):
        drained = self.worker.drain(30)
        self.assertEqual(self.link.of(P.ReturnJobs), [{"keys": [(5, 2), (5, 3)]}])
        self.assertNoResult(drained)
        self.clock.advance(10)
        self.pool.calls[0].callback({"results": [P.Result(5, 1, P.Outcome.OK, b"v")]})
        self.successResultOf(drained)
        [sent] = self.link.of(P.JobResults)
        self.assertEqual([r.key for r in sent["results"]], [(5, 1)])
        self.assertEqual(len(self.pool.calls), 1, "no returned job was started")

    def test_late_jobs_returned(self):
        self.worker.drain(30)
        self.worker.enqueue([P.Job(5, 4, b"p")])
        self.assertEqual(self.link.of(P.ReturnJobs)[-1], {"keys": [(5, 4)]})
        self.assertEqual(len(self.pool.calls), 1)

    def test_timeout_kills_and_reports_nothing(self):
        drained = self.worker.drain(30)
        self.clock.advance(29)
        self.assertNoResult(drained)
        self.clock.advance(1)
        self.successResultOf(drained)
        self.assertEqual(self.pool.killed, 1)
        self.clock.advance(0)
        self.assertEqual(self.link.of(P.JobResults), [])

    def test_idle_worker_drains_at_once(self):
        self.worker.queue.clear()
        self.pool.calls[0].callback({"results": [P.Result(5, 1, P.Outcome.OK, b"v")]})
        self.successResultOf(self.worker.drain(30))
        self.assertEqual(self.link.of(P.ReturnJobs), [{"keys": []}], "the master learns it drains")

    def test_drain_twice(self):
        first, second = self.worker.drain(30), self.worker.drain(30)
        self.pool.calls[0].callback({"results": [P.Result(5, 1, P.Outcome.OK, b"v")]})
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(self.worker.drain(30))
        self.assertEqual(len(self.link.of(P.ReturnJobs)), 1)

    def test_unconnected_worker_kills_at_once(self):
        self.worker.proto = None
        self.successResultOf(self.worker.drain(30))
        self.assertEqual(self.pool.killed, 1)

    def test_lost_master_ends_drain(self):
        drained = self.worker.drain(30)
        self.worker.disconnected(self.link)
        self.successResultOf(drained)
        self.assertEqual(self.pool.killed, 1)


class MasterDrainTests(SynchronousTestCase):
    """The master requeues returned jobs at once and sends a draining worker nothing more."""

    def test_returned_jobs_go_to_another_worker(self):
        clock = Clock()
        master = Master(clock=clock, heartbeat=0, prefetch=2)
        client = FakePeer(master, "c:1")
        client.peer_id = master.client_joined(client, {"cwd": "", "path": []})
        master.submit(client.peer_id, [P.Job(0, seq, b"p") for seq in (1, 2, 3)])
        draining = FakePeer(master, "draining:1")
        draining.peer_id = master.worker_joined(draining, 1)
        clock.advance(0)
        master.return_jobs(draining.peer_id, [(client.peer_id, 2), (client.peer_id, 3)])
        other = FakePeer(master, "other:2")
        other.peer_id = master.worker_joined(other, 1)
        clock.advance(0)
        [(_, kwargs, _)] = [c for c in other.calls if c[0] is P.RunJobs]
        self.assertEqual([job.seq for job in kwargs["jobs"]], [2, 3])
        self.assertEqual(len([c for c in draining.calls if c[0] is P.RunJobs]), 1)
        self.assertEqual([w["draining"] for w in master.status()["workers"]], [True, False])


class ClosingPeer(FakePeer):
    """A peer whose connection closes when the test says so, or when aborted."""

    def __init__(self, master: Master, name: str) -> None:
        super().__init__(master, name)
        self.transport = self
        self.closed = defer.Deferred()
        self.closing = self.aborted = False

    def loseConnection(self):
        self.closing = True

    def abortConnection(self):
        self.aborted = True
        if not self.closed.called:
            self.closed.callback(None)


class MasterShutdownTests(SynchronousTestCase):
    """A stopping master tells clients and workers, then closes their connections."""

    def test_notice_then_close(self):
        clock = Clock()
        master = Master(clock=clock, heartbeat=0)
        client = ClosingPeer(master, "c:1")
        client.peer_id = master.client_joined(client, {"cwd": "", "path": []})
        worker = ClosingPeer(master, "w:2")
        worker.peer_id = master.worker_joined(worker, 1)
        stopped = master.shutdown("maintenance", timeout=5)
        for peer in (client, worker):
            notices = [kwargs for command, kwargs, _ in peer.calls if command is P.MasterStopping]
            self.assertEqual(notices, [{"reason": "maintenance"}])
            self.assertTrue(peer.closing)
        client.closed.callback(None)
        self.assertNoResult(stopped)
        clock.advance(5)
        self.successResultOf(stopped)
        self.assertEqual((client.aborted, worker.aborted), (False, True))


class BatchTests(SynchronousTestCase):
    """
    A worker hands short jobs to a job process in batches, and long or
    unknown ones one by one; a batch whose process dies is re-run job by job.
    """

    def setUp(self):
        self.clock = Clock()
        self.pool = FakePool()
        self.worker = Worker(self.pool, 2, clock=self.clock)
        self.link = FakeMasterLink()
        self.worker.proto = self.link

    def finish(self, n: int, seconds: float = 0.001) -> None:
        """End call C{n} after C{seconds}, every job of it succeeding."""
        self.clock.advance(seconds)
        batch = self.pool.batches[n]
        self.pool.calls[n].callback(
            {"results": [P.Result(j.client, j.seq, P.Outcome.OK, b"v") for j in batch]}
        )

    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.pool.batches]

    def sent(self) -> list[int]:
        self.clock.advance(0)
        return [r.seq for call in self.link.of(P.JobResults) for r in call["results"]]

    def test_unknown_duration_one_by_one(self):
        self.worker.enqueue([P.Job(5, seq, b"p") for seq in range(1, 11)])
        self.assertEqual(self.sizes(), [1, 1])

    def test_short_jobs_batched_over_idle_processes(self):
        self.worker.enqueue([P.Job(5, 1, b"p")])
        self.finish(0)
        self.worker.enqueue([P.Job(5, seq, b"p") for seq in range(2, 22)])
        self.assertEqual(self.sizes(), [1, 10, 10])
        self.finish(1)
        self.finish(2)
        self.assertEqual(sorted(self.sent()), list(range(1, 22)))

    def test_slow_jobs_not_batched(self):
        self.worker.enqueue([P.Job(5, 1, b"p")])
        self.finish(0, seconds=1.0)
        self.worker.enqueue([P.Job(5, seq, b"p") for seq in range(2, 12)])
        self.assertEqual(self.sizes(), [1, 1, 1])

    def test_job_with_timeout_alone(self):
        self.worker.enqueue([P.Job(5, 1, b"p")])
        self.finish(0)
        timed = P.Job(5, 3, b"p", P.encode_options(timeout=5))
        self.worker.enqueue([P.Job(5, 2, b"p"), timed, P.Job(5, 4, b"p"), P.Job(5, 5, b"p")])
        self.assertEqual([[j.seq for j in b] for b in self.pool.batches[1:]], [[2], [3]])

    def test_dead_batch_rerun_alone(self):
        self.worker.enqueue([P.Job(5, 1, b"p")])
        self.finish(0)
        self.worker.enqueue([P.Job(5, seq, b"p") for seq in range(2, 8)])
        self.assertEqual(self.sizes(), [1, 3, 3])
        self.pool.calls[1].errback(RuntimeError("the job process died"))
        # Its three jobs go back to the front, each to run alone.
        self.assertEqual([[j.seq for j in b] for b in self.pool.batches[3:]], [[2]])
        self.finish(2)
        self.finish(3)
        self.assertEqual([[j.seq for j in b] for b in self.pool.batches[4:]], [[3], [4]])
        self.finish(4)
        self.finish(5)
        self.assertEqual(sorted(self.sent()), list(range(1, 8)))

    def test_cancel_in_batch_drops_only_that_result(self):
        self.worker.enqueue([P.Job(5, 1, b"p")])
        self.finish(0)
        self.worker.enqueue([P.Job(5, seq, b"p") for seq in range(2, 6)])
        self.worker.cancel([(5, 3)])
        self.finish(1)
        self.finish(2)
        self.assertEqual(sorted(self.sent()), [1, 2, 4, 5])


class HandOverTests(SynchronousTestCase):
    """
    Results a worker kept from a lost master connection (L{Master.handed_over}):
    routed by session and sequence number, whichever comes first, the
    worker or the client's resubmission.
    """

    def setUp(self):
        self.clock = Clock()
        self.master = Master(clock=self.clock, heartbeat=0)

    def client(self, session: str) -> FakePeer:
        client = FakePeer(self.master, "c:1")
        client.session = session
        client.peer_id = self.master.client_joined(client, {"cwd": "", "path": []}, session=session)
        return client

    def worker(self, name: str = "w:1", results=None, sessions=None) -> FakePeer:
        worker = FakePeer(self.master, name)
        worker.peer_id = self.master.worker_joined(worker, 1)
        if results:
            self.master.handed_over(worker.peer_id, results, sessions)
        return worker

    def kept(self, seq: int, value: bytes = b"kept") -> P.Result:
        return P.Result(1, seq, P.Outcome.OK, value)

    def run_jobs(self, worker: FakePeer) -> list[int]:
        return [
            job.seq for command, kwargs, _ in worker.calls if command is P.RunJobs for job in kwargs["jobs"]
        ]

    def test_client_resubmitted_first(self):
        """The resubmitted job waits in the queue: the handed-over result answers it, and it never runs."""
        client = self.client("s")
        self.master.submit(client.peer_id, [P.Job(0, 3, b"p"), P.Job(0, 4, b"p")])
        self.worker("w:1", [self.kept(3)], ["s"])
        self.clock.advance(0)
        self.assertEqual(
            [(r.client, r.seq, r.payload) for r in client.results], [(client.peer_id, 3, b"kept")]
        )
        other = self.worker("w:2")
        self.clock.advance(0)
        self.assertEqual(self.run_jobs(other) + self.run_jobs(self.master.workers[1]), [4])

    def test_worker_first(self):
        """A result handed over before its client is back answers the job when it is resubmitted."""
        worker = self.worker("w:1", [self.kept(3)], ["s"])
        self.assertEqual(self.master.status()["unclaimed_results"], 1)
        client = self.client("s")
        self.master.submit(client.peer_id, [P.Job(0, 3, b"p"), P.Job(0, 4, b"p")])
        self.clock.advance(0)
        self.assertEqual([(r.seq, r.payload) for r in client.results], [(3, b"kept")])
        self.assertEqual(self.run_jobs(worker), [4])
        self.assertEqual(self.master.status()["unclaimed_results"], 0)

    def test_running_copy_is_killed(self):
        """The resubmitted copy already runs elsewhere: it is cancelled there, the kept result delivered."""
        client = self.client("s")
        busy = self.worker("w:1")
        self.master.submit(client.peer_id, [P.Job(0, 3, b"p")])
        self.clock.advance(0)
        self.assertEqual(self.run_jobs(busy), [3])
        self.master.handed_over(self.worker("w:2").peer_id, [self.kept(3)], ["s"])
        self.assertEqual([r.seq for r in client.results], [3])
        [(_, kwargs, _)] = [c for c in busy.calls if c[0] is P.CancelJobs]
        self.assertEqual(kwargs["keys"], [(client.peer_id, 3)])

    def test_other_sessions_untouched(self):
        """A result of another session's job is not given to this client (same seq, same old client id)."""
        client = self.client("s")
        self.master.submit(client.peer_id, [P.Job(0, 3, b"p")])
        worker = self.worker("w:1", [self.kept(3)], ["t"])
        self.clock.advance(0)
        self.assertEqual(client.results, [])
        self.assertEqual(self.run_jobs(worker), [3])
        self.assertEqual(self.master.status()["unclaimed_results"], 1)


class RunningNoticeTests(SynchronousTestCase):
    """
    Clients that ask for running notices get them L{P.RUNNING_NOTICE_DELAY}
    after their jobs were handed out, in one box, and none for jobs whose
    results came first (a short lone job costs one message less).
    """

    def setUp(self):
        self.clock = Clock()
        self.master = Master(clock=self.clock, heartbeat=0)
        self.client = FakePeer(self.master, "c:1")
        self.client.peer_id = self.master.client_joined(
            self.client, {"cwd": "", "path": [], P.RUNNING_NOTICES: True}
        )
        self.worker = FakePeer(self.master, "w:1")
        self.worker.peer_id = self.master.worker_joined(self.worker, 4)

    def notices(self) -> list[list[int]]:
        return [
            [seq for _, seq in kw["keys"]] for command, kw, _ in self.client.calls if command is P.JobsStarted
        ]

    def test_notice_after_delay(self):
        self.master.submit(self.client.peer_id, [P.Job(0, 1, b"p"), P.Job(0, 2, b"q")])
        self.clock.advance(0)
        self.assertIn(P.RunJobs, [command for command, _, _ in self.worker.calls])  # handed out at once
        self.assertEqual(self.notices(), [])
        self.clock.advance(P.RUNNING_NOTICE_DELAY)
        self.assertEqual(self.notices(), [[1, 2]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_notice_for_job_whose_result_came_first(self):
        self.master.submit(self.client.peer_id, [P.Job(0, 1, b"p"), P.Job(0, 2, b"q")])
        self.clock.advance(0)
        self.master.results(self.worker.peer_id, [P.Result(self.client.peer_id, 1, P.Outcome.OK, b"r")])
        self.clock.advance(P.RUNNING_NOTICE_DELAY)
        self.assertEqual(self.notices(), [[2]])
        self.assertEqual([r.seq for r in self.client.results], [1])

    def test_no_timer_left_once_every_result_came_first(self):
        """A lone job's result before its notice is due: no notice, and no timer left to wake the master."""
        self.master.submit(self.client.peer_id, [P.Job(0, 1, b"p")])
        self.clock.advance(0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.master.results(self.worker.peer_id, [P.Result(self.client.peer_id, 1, P.Outcome.OK, b"r")])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.master.submit(self.client.peer_id, [P.Job(0, 2, b"q")])
        self.clock.advance(0)
        self.clock.advance(P.RUNNING_NOTICE_DELAY)
        self.assertEqual(self.notices(), [[2]])

    def test_no_notice_to_client_gone(self):
        self.master.submit(self.client.peer_id, [P.Job(0, 1, b"p")])
        self.clock.advance(0)
        self.master.client_left(self.client)
        self.clock.advance(P.RUNNING_NOTICE_DELAY)
        self.assertEqual(self.notices(), [])
