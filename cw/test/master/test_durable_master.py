"""
The master's durable queue (L{cw.master.durable}) in process, on a real
state file and a fake clock: acknowledgements after the commit, sessions
kept while their client is away, results stored within the bound and
handed to the session's next client, resubmissions not queued twice, and
a restart on the file.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cw.core import durable
from cw.core.durable import LAZY_COMMIT
from cw.errors import StateFileError
from cw.master.durable import InlineWriter
from cw.master.service import Master
from cw.test.master.test_master_faults import FakePeer
from cw.test.master.test_store import crash
from cw.wire import commands as P

CONTEXT = {"cwd": "/", "path": []}


class HeldWriter:
    """
    A state writer whose calls run only when the test says so (a disk
    that takes its time to sync): the master's turns go on meanwhile.
    """

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, function, *args) -> defer.Deferred:
        d = defer.Deferred()
        self.calls.append((function, args, d))
        return d

    def release(self) -> None:
        """Run the oldest call waiting, and report its outcome."""
        function, args, d = self.calls.pop(0)
        defer.maybeDeferred(function, *args).chainDeferred(d)

    def stop(self) -> None:
        pass


class DurableMasterTests(SynchronousTestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "state.db")
        os.makedirs(os.path.dirname(self.path))
        self.clock = Clock()
        self.master = self.start()

    def start(self, writer=None, **options) -> Master:
        master = Master(
            clock=self.clock, heartbeat=0, state=self.path, state_writer=writer or InlineWriter(), **options
        )
        self.addCleanup(lambda: master.durable.store._lock is not None and crash(master.durable.store))
        return master

    def restart(self, writer=None, **options) -> Master:
        """A new master on the file, as after a SIGKILL (nothing closed)."""
        crash(self.master.durable.store)
        self.master = self.start(writer, **options)
        return self.master

    def client(self, session: str, master: Master | None = None, context: dict = CONTEXT) -> FakePeer:
        master = master or self.master
        peer = FakePeer(master, f"{session}:1")
        peer.session = session
        peer.peer_id = master.client_joined(peer, context, 1, session)
        master.clients[peer.peer_id] = peer
        return peer

    def worker(self, slots: int = 4) -> FakePeer:
        peer = FakePeer(self.master, "w:1")
        peer.peer_id = self.master.worker_joined(peer, slots)
        return peer

    def leave(self, peer: FakePeer) -> None:
        self.master.client_left(peer)

    def submit(self, peer: FakePeer, seqs) -> None:
        self.master.submit(peer.peer_id, [P.Job(0, seq, b"payload %d" % seq) for seq in seqs])

    def stored_acks(self, peer: FakePeer) -> list[int]:
        return [seq for command, kw, _ in peer.calls if command is P.JobsStored for _, seq in kw["keys"]]

    def stored_sent(self, peer: FakePeer) -> list[tuple[list[P.Result], defer.Deferred]]:
        """The batches of stored results sent to C{peer} (L{P.StoredResults}), with their answers to fire."""
        return [(kw["results"], d) for command, kw, d in peer.calls if command is P.StoredResults]

    def acknowledge(self, peer: FakePeer) -> list[P.Result]:
        """Answer every batch of stored results sent to C{peer} (as far as it goes); return them."""
        had = []
        while unanswered := [(r, d) for r, d in self.stored_sent(peer) if not d.called]:
            for results, d in unanswered:
                had += results
                d.callback({})
        return had

    def away_with_results(self, session: str, seqs) -> FakePeer:
        """A client of C{session} submits C{seqs} and leaves; a worker runs them: their results wait."""
        peer = self.client(session)
        self.submit(peer, seqs)
        self.clock.advance(0)
        self.leave(peer)
        worker = self.worker()
        while self.master.status()["state"]["stored_results"] < len(seqs):
            self.run_all(worker)
        self.clock.advance(LAZY_COMMIT)
        return peer

    def run_all(self, worker: FakePeer) -> list[P.Result]:
        """Answer every job the worker was sent with a result of its number."""
        self.clock.advance(0)
        jobs = [job for command, kw, _ in worker.calls if command is P.RunJobs for job in kw["jobs"]]
        worker.calls.clear()
        results = [P.Result(job.client, job.seq, P.Outcome.OK, b"r%09d" % job.seq) for job in jobs]
        self.master.results(worker.peer_id, results)
        self.clock.advance(0)
        return results

    def test_acknowledged_after_commit(self):
        """Jobs are acknowledged (JobsStored) once their turn's commit has run: one commit for two boxes."""
        peer = self.client("s")
        self.submit(peer, range(1, 4))
        self.submit(peer, range(4, 6))
        self.assertEqual(self.stored_acks(peer), [])
        self.assertEqual(self.master.durable.commits, 0)
        self.clock.advance(0)
        self.assertEqual(self.stored_acks(peer), [1, 2, 3, 4, 5])
        self.assertEqual(self.master.durable.commits, 1)
        self.assertEqual(len(self.restart().durable.store.load().jobs), 5)

    def test_commit_written_while_the_master_goes_on(self):
        """
        While a commit is being written (by the writer's thread), the
        master goes on: its jobs are not acknowledged before it is on disk;
        jobs submitted meanwhile are queued, and committed together in the
        next commit, which starts when the first is done.
        """
        writer = HeldWriter()
        self.restart(writer)
        peer = self.client("s")
        self.submit(peer, [1, 2])
        self.clock.advance(0)
        self.assertEqual(len(writer.calls), 1)  # the first commit, being written
        self.submit(peer, [3])
        self.clock.advance(0)
        self.submit(peer, [4])
        self.clock.advance(0)
        self.assertEqual(self.master.scheduler.queued, 4)
        self.assertEqual(self.master.status()["queued"], 4)
        self.assertEqual((len(writer.calls), self.stored_acks(peer)), (1, []))
        writer.release()
        self.assertEqual(self.stored_acks(peer), [1, 2])
        self.clock.advance(0)
        self.assertEqual(len(writer.calls), 1)  # the second, with 3 and 4
        self.assertEqual(self.master.durable.commits, 1)
        writer.release()
        self.assertEqual(self.stored_acks(peer), [1, 2, 3, 4])
        self.assertEqual(self.master.durable.commits, 2)
        self.assertEqual([job.seq for job in self.restart().durable.store.load().jobs], [1, 2, 3, 4])

    def test_failed_commit_kept_with_later_writes(self):
        """
        A commit that fails (a full disk) acknowledges nothing; its writes
        are kept, with those gathered while it was written on top, and
        committed, then acknowledged, when writing works again.
        """
        writer = HeldWriter()
        self.restart(writer)
        peer = self.client("s")
        store = self.master.durable.store
        commit = store.commit
        store.commit = lambda batch: (_ for _ in ()).throw(StateFileError("cannot write: disk full"))
        self.submit(peer, [1, 2, 3])
        self.clock.advance(0)
        # Gathered while the commit is written: job 1 ends, job 4 comes.
        self.master.durable.ended([P.Result(peer.peer_id, 1, P.Outcome.OK, b"r")], {peer.peer_id})
        self.submit(peer, [4])
        self.clock.advance(LAZY_COMMIT)
        writer.release()
        self.assertEqual(self.stored_acks(peer), [])
        self.assertTrue(self.master.status()["state"]["failing"])
        store.commit = commit
        self.submit(peer, [5])
        self.clock.advance(0)
        writer.release()
        self.assertEqual(self.stored_acks(peer), [1, 2, 3, 4, 5])
        self.assertFalse(self.master.status()["state"]["failing"])
        self.assertEqual([job.seq for job in self.restart().durable.store.load().jobs], [2, 3, 4, 5])

    def test_away_session_keeps_jobs_and_results(self):
        """
        A session's jobs run while its client is away; their results wait,
        and go to the session's next client, which does not get jobs it
        resubmits queued twice.
        """
        peer = self.client("s")
        self.submit(peer, range(1, 11))
        self.clock.advance(0)
        self.leave(peer)
        self.assertEqual(self.master.scheduler.queued, 10)
        worker = self.worker()
        done = self.run_all(worker)
        while len(done) < 10:
            done += self.run_all(worker)
        self.assertEqual(self.master.status()["state"]["stored_results"], 10)
        again = self.client("s")
        self.assertEqual(again.peer_id, peer.peer_id)
        self.submit(again, range(1, 11))  # resubmitted by a client after a reconnect
        self.assertEqual(self.master.scheduler.queued, 0)
        seqs = self.master.session_jobs(again.peer_id)
        self.assertEqual(seqs, list(range(1, 11)))
        self.clock.advance(0)
        self.assertEqual(
            sorted((r.seq, bytes(r.payload)) for r in self.acknowledge(again)),
            [(n, b"r%09d" % n) for n in seqs],
        )
        self.clock.advance(LAZY_COMMIT)
        self.assertEqual(self.master.status()["state"]["stored_results"], 0)
        self.assertEqual(self.restart().durable.store.load().results, [])

    def test_stored_results_go_only_once_acknowledged(self):
        """
        Results that waited for a session are deleted only once its client
        has acknowledged them: a client that drops first leaves them on
        disk (a restarted master still has them), and the next client of
        the session gets them.
        """
        self.away_with_results("s", range(1, 6))
        first = self.client("s")
        self.assertEqual(self.master.session_jobs(first.peer_id), [1, 2, 3, 4, 5])
        self.clock.advance(0)
        [(results, answer)] = self.stored_sent(first)
        self.assertEqual(sorted(r.seq for r in results), [1, 2, 3, 4, 5])
        answer.errback(ConnectionDone("the client dropped"))
        self.leave(first)
        self.clock.advance(LAZY_COMMIT)
        self.assertEqual(self.master.status()["state"]["stored_results"], 5)
        self.assertEqual(len(self.restart().durable.store.load().results), 5)
        again = self.client("s")
        self.assertEqual(self.master.session_jobs(again.peer_id), [1, 2, 3, 4, 5])
        self.clock.advance(0)
        self.assertEqual(sorted(r.seq for r in self.acknowledge(again)), [1, 2, 3, 4, 5])
        self.assertEqual(self.master.status()["state"]["stored_results"], 0)
        self.assertEqual(self.master.session_jobs(again.peer_id), [])
        self.clock.advance(LAZY_COMMIT)
        self.assertEqual(self.restart().durable.store.load().results, [])

    def test_stored_results_sent_a_batch_at_a_time(self):
        """
        Stored results go in batches of DELIVERY_BYTES, the next once the
        last is acknowledged; a drop in the middle leaves only the
        acknowledged ones delivered.
        """
        self.patch(durable, "DELIVERY_BYTES", 25)  # two results of 10 bytes a batch
        self.away_with_results("s", range(1, 6))
        peer = self.client("s")
        self.master.session_jobs(peer.peer_id)
        self.clock.advance(0)
        [(results, answer)] = self.stored_sent(peer)
        self.assertEqual([r.seq for r in results], [1, 2])
        answer.callback({})
        [_, (results, answer)] = self.stored_sent(peer)
        self.assertEqual([r.seq for r in results], [3, 4])
        self.assertEqual(self.master.status()["state"]["stored_results"], 3)
        answer.errback(ConnectionDone("the client dropped"))
        self.assertEqual(len(self.stored_sent(peer)), 2)
        self.leave(peer)
        again = self.client("s")
        self.assertEqual(self.master.session_jobs(again.peer_id), [3, 4, 5])
        self.clock.advance(0)
        self.assertEqual([r.seq for r in self.acknowledge(again)], [3, 4, 5])

    def test_stored_results_bounded_oldest_dropped(self):
        """
        Over --max-stored-results-bytes the oldest results go first; a
        session left with nothing is forgotten.
        """
        self.master = self.restart(max_stored_results_bytes=15)
        a, b = self.client("a"), self.client("b")
        self.submit(a, [1, 2])
        self.submit(b, [1])
        self.clock.advance(0)
        self.leave(a)
        self.leave(b)
        worker = self.worker(slots=1)
        for _ in range(3):  # jobs go round robin: a1, b1, a2; results of 10 bytes
            self.run_all(worker)
        state = self.master.status()["state"]
        self.assertEqual(
            (state["stored_results"], state["stored_results_bytes"], state["dropped_results"]), (1, 10, 2)
        )
        self.assertNotIn("b", self.master.durable.cids)  # nothing of it is left: forgotten
        self.assertEqual([c["session"] for c in self.master.status()["clients"]], ["a"])
        self.clock.advance(LAZY_COMMIT)
        loaded = self.restart().durable.store.load()
        self.assertEqual((loaded.results, list(loaded.sessions)), ([("a", 2, 10)], ["a"]))

    def test_restart_requeues(self):
        """A master started on the file requeues its jobs (running ones too) for their away sessions."""
        peer = self.client("s")
        self.submit(peer, range(1, 6))
        self.clock.advance(0)
        self.worker(slots=2)
        self.clock.advance(0)
        master = self.restart()
        self.assertEqual(master.scheduler.queued, 5)
        self.assertEqual(master.status()["clients"][0]["peer"], "away")
        self.assertEqual(master.status()["clients"][0]["session"], "s")

    # -- results sent to a connected client that acknowledges them (P.TAKES_RESULTS) --

    def taking(self, session: str) -> FakePeer:
        """A client of C{session} that acknowledges the results it is sent."""
        peer = self.client(session, context={**CONTEXT, P.TAKES_RESULTS: True})
        self.assertTrue(self.master.keeps_results(peer.peer_id))
        return peer

    def sent(self, peer: FakePeer, seqs) -> None:
        """Submit C{seqs} from C{peer}; a worker runs them all; their results are sent to C{peer}."""
        self.submit(peer, seqs)
        self.clock.advance(0)
        worker = self.worker()
        while len(peer.results) < len(seqs):
            self.run_all(worker)
        self.clock.advance(LAZY_COMMIT)

    def test_rows_go_once_acknowledged(self):
        """A job's row goes once its client acknowledged its result: a master dying first runs it again."""
        peer = self.taking("s")
        self.sent(peer, range(1, 6))
        self.master.results_taken(peer.peer_id, [1, 2, 3])
        self.master.results_taken(peer.peer_id, [3, 99])  # again, or unknown: nothing
        self.clock.advance(LAZY_COMMIT)
        self.assertEqual(self.master.status()["state"]["stored_results"], 0)
        self.assertEqual(sorted(job.seq for job in self.restart().durable.store.load().jobs), [4, 5])

    def test_left_before_acknowledging(self):
        """
        A client that leaves before it acknowledged results: they wait for
        its session's next client (on disk), which gets them.
        """
        peer = self.taking("s")
        self.sent(peer, range(1, 6))
        self.master.results_taken(peer.peer_id, [1, 2])
        self.leave(peer)
        self.assertEqual(self.master.status()["state"]["stored_results"], 3)
        again = self.taking("s")
        self.assertEqual(again.peer_id, peer.peer_id)
        self.assertEqual(self.master.session_jobs(again.peer_id), [3, 4, 5])
        self.clock.advance(0)
        self.assertEqual(
            sorted((r.seq, bytes(r.payload)) for r in self.acknowledge(again)),
            [(n, b"r%09d" % n) for n in (3, 4, 5)],
        )
        self.clock.advance(LAZY_COMMIT)
        loaded = self.restart().durable.store.load()
        self.assertEqual((loaded.results, loaded.jobs), ([], []))

    def test_client_that_does_not_acknowledge(self):
        """A client without L{P.TAKES_RESULTS} (an older one): its jobs' rows go as their results are sent."""
        peer = self.client("s")
        self.assertFalse(self.master.keeps_results(peer.peer_id))
        self.sent(peer, range(1, 6))
        self.leave(peer)
        self.assertEqual(self.master.status()["state"]["stored_results"], 0)
        self.clock.advance(LAZY_COMMIT)
        self.assertEqual(self.restart().durable.store.load().jobs, [])
