"""
Tests for the master's pure decisions outside the scheduler: flow control
(L{cw.core.flow}), heartbeat bookkeeping (L{cw.core.liveness}) and which
worker is sent which context and function (L{cw.core.routing}).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cw.core.flow import FlowControl, LentBytes, Room, Throttle
from cw.core.liveness import Beat, Liveness
from cw.core.records import Job, Outcome, Result
from cw.core.routing import Routing, SendContext, SendFunction
from cw.core.scheduler import Scheduler


class FlowControlTests(SynchronousTestCase):
    """Room per client, the hard stop for one that ignores it, and reading again."""

    def setUp(self):
        self.s = Scheduler(max_queued_bytes=100, max_queued_jobs=10)
        self.flow = FlowControl(self.s)
        self.client = self.s.add_client()

    def submit(self, first: int, last: int) -> Throttle:
        self.s.submit(self.client, [Job(0, seq, b"x" * 10) for seq in range(first, last + 1)])
        return self.flow.submitted(self.client)

    def drain(self, n: int) -> None:
        worker = self.s.add_worker(n, "w")
        for _, jobs in self.s.dispatch(0.0):
            self.s.complete(worker, [Result(job.client, job.seq, Outcome.OK, b"") for job in jobs], 0.0)

    def test_within_room(self):
        self.assertEqual(self.submit(1, 5), Throttle())
        self.assertTrue(self.flow.reading(self.client))
        self.assertEqual(self.flow.give_room(), [])

    def test_held_logged_once(self):
        self.assertEqual(self.submit(1, 10), Throttle(first_held=True))
        self.assertEqual(self.submit(11, 11), Throttle(), "logged once per client")
        self.assertTrue(self.flow.reading(self.client))

    def test_room_ignored_stops_reading_until_room_given(self):
        self.submit(1, 10)
        self.assertEqual(self.submit(11, 20), Throttle())
        self.assertEqual(self.submit(21, 21), Throttle(stop_reading=True))
        self.assertFalse(self.flow.reading(self.client))
        self.assertTrue(self.flow.excused(self.client), "its silence is the master's doing")
        self.assertEqual(self.submit(22, 22), Throttle(), "stopped once")
        self.drain(22)
        [room] = self.flow.give_room()
        self.assertEqual(room, Room(self.client, 100, 10, resume_reading=True))
        self.assertTrue(self.flow.reading(self.client))
        self.assertFalse(self.flow.excused(self.client))

    def test_room_without_resume(self):
        self.submit(1, 10)
        self.drain(10)
        self.assertEqual(self.flow.give_room(), [Room(self.client, 100, 10, resume_reading=False)])

    def test_forget(self):
        self.submit(1, 21)
        self.flow.forget(self.client)
        self.assertTrue(self.flow.reading(self.client))


class LentBytesTests(SynchronousTestCase):
    """L{LentBytes}: results lent by workers count as unsent until their client takes them."""

    def test_lent_then_released(self):
        lent = LentBytes()
        lent.lent(1, 7, 10, 1000)
        lent.lent(1, 8, 11, 500)
        lent.lent(2, 7, 10, 300)
        self.assertEqual((lent.outstanding(1), lent.outstanding(2), lent.taken(1)), (1500, 300, 0))
        # Only the keys lent to this client go to their workers, as the workers know them.
        self.assertEqual(lent.released(1, [(7, 10), (7, 99), (8, 12)]), {7: [(1, 10)]})
        self.assertEqual((lent.outstanding(1), lent.taken(1)), (500, 1000))
        self.assertEqual(lent.released(1, [(7, 10)]), {})
        self.assertEqual(lent.released(3, [(7, 10)]), {})
        self.assertEqual((lent.outstanding(2), lent.taken(2)), (300, 0))

    def test_same_key_again(self):
        """A job lent again under the same key (run again) is counted once."""
        lent = LentBytes()
        lent.lent(1, 7, 10, 1000)
        lent.lent(1, 7, 10, 1000)
        self.assertEqual(lent.outstanding(1), 1000)

    def test_worker_left_and_forget(self):
        lent = LentBytes()
        lent.lent(1, 7, 10, 1000)
        lent.lent(1, 8, 11, 500)
        lent.worker_left(7)
        self.assertEqual((lent.outstanding(1), lent.taken(1)), (500, 0))
        self.assertEqual(lent.released(1, [(7, 10)]), {})
        lent.forget(1)
        self.assertEqual((lent.outstanding(1), lent.released(1, [(8, 11)])), (0, {}))


class LivenessTests(SynchronousTestCase):
    """Which peers to ping, and which are silent: time is passed in."""

    def setUp(self):
        self.live = Liveness(timeout=3.0)
        self.live.watch("a", 0.0)

    def test_invalid(self):
        self.assertRaises(ValueError, Liveness, 0)

    def test_ping_once_until_answered(self):
        self.assertEqual(self.live.beat(1.0), Beat(ping=["a"]))
        self.assertEqual(self.live.beat(2.0), Beat())
        self.live.answered("a", 2.5)
        self.assertEqual(self.live.beat(3.0), Beat(ping=["a"]))
        self.assertEqual(self.live.last_heard("a"), 2.5)

    def test_silent_past_timeout(self):
        self.live.beat(1.0)
        self.assertEqual(self.live.beat(3.0), Beat())
        self.assertEqual(self.live.beat(4.0), Beat(silent=[("a", 4.0)]))
        self.assertEqual(self.live.beat(5.0), Beat(silent=[("a", 5.0)]), "reported until forgotten")
        self.live.forget("a")
        self.assertEqual(self.live.beat(9.0), Beat())
        self.assertIsNone(self.live.last_heard("a"))

    def test_any_data_counts(self):
        self.live.beat(1.0)
        for t in range(2, 20):
            self.live.heard("a", float(t))
            self.assertEqual(self.live.beat(t + 0.5).silent, [])

    def test_unwatched_ignored(self):
        self.live.heard("b", 1.0)
        self.live.answered("b", 1.0)
        self.assertEqual(self.live.beat(1.0), Beat(ping=["a"]))

    def test_waiting_for_a_source_not_silent(self):
        """
        A peer to which a box forwarded as it arrives waits for its source
        (C{waiting}) is not silent: it counts as heard from then, and its
        silence counts again once it no longer waits.  Only peers silent
        too long are asked about.
        """
        self.live.watch("b", 0.0)
        asked = []

        def waiting(peer):
            asked.append(peer)
            return peer == "a"

        self.assertEqual(self.live.beat(1.0, waiting), Beat(ping=["a", "b"]))
        self.assertEqual(asked, [])
        self.assertEqual(self.live.beat(4.0, waiting), Beat(silent=[("b", 4.0)]))
        self.assertEqual(asked, ["a", "b"])
        self.assertEqual(self.live.last_heard("a"), 4.0)
        self.assertEqual(self.live.beat(6.0).silent, [("b", 6.0)])
        self.assertEqual(self.live.beat(7.5).silent, [("a", 3.5), ("b", 7.5)])

    def test_not_read_from_not_silent(self):
        """
        A client this side stopped reading from (flow control,
        L{FlowControl.excused}) cannot be heard: it is not silent while
        not read from, and its silence counts again once it is read.
        """
        s = Scheduler(max_queued_bytes=100, max_queued_jobs=1)
        flow = FlowControl(s)
        client = s.add_client()
        self.live.watch(client, 0.0)
        s.submit(client, [Job(0, seq, b"x") for seq in (1, 2, 3)])
        self.assertTrue(flow.submitted(client).stop_reading)
        self.live.beat(1.0, flow.excused)
        self.assertEqual(self.live.beat(4.0, flow.excused).silent, [("a", 4.0)])
        self.assertEqual(self.live.last_heard(client), 4.0)
        worker = s.add_worker(3, "w")
        for _, jobs in s.dispatch(5.0):
            s.complete(worker, [Result(job.client, job.seq, Outcome.OK, b"") for job in jobs], 5.0)
        [room] = flow.give_room()
        self.assertTrue(room.resume_reading)
        self.assertEqual(self.live.beat(7.5, flow.excused).silent, [("a", 7.5), (client, 3.5)])


class LivenessIntervalTests(SynchronousTestCase):
    """
    Heartbeats cost nothing where a peer is demonstrably alive: heard from
    within the interval, it needs no answer; one that watches this side
    itself and was also sent something needs no heartbeat at all.
    """

    def test_heard_and_sent_to_not_pinged(self):
        live = Liveness(timeout=15.0, interval=5.0, peers_watch=True)
        live.watch("a", 0.0)
        live.heard("a", 4.0)
        live.sent("a", 4.5)
        self.assertEqual(live.beat(5.0), Beat())
        self.assertFalse(live.peers["a"].pinged)

    def test_silent_pinged(self):
        live = Liveness(timeout=15.0, interval=5.0, peers_watch=True)
        live.watch("a", 0.0)
        live.sent("a", 9.0)
        self.assertEqual(live.beat(5.0), Beat(ping=["a"]), "heard only at the start, 5 s ago")

    def test_only_sent_to_pinged(self):
        live = Liveness(timeout=15.0, interval=5.0, peers_watch=True)
        live.watch("a", 0.0)
        live.sent("a", 6.0)
        self.assertEqual(live.beat(6.5), Beat(ping=["a"]))

    def test_only_heard_pinged(self):
        """Nothing went to it lately: it has no sign of this side's life but the heartbeat."""
        live = Liveness(timeout=15.0, interval=5.0, peers_watch=True)
        live.watch("a", 0.0)
        live.heard("a", 6.0)
        self.assertEqual(live.beat(6.5), Beat(ping=["a"]))

    def test_heard_peer_that_needs_arrivals_notified(self):
        """A worker's watch on the master counts heartbeats' arrivals: it gets one that asks no answer."""
        live = Liveness(timeout=15.0, interval=5.0)
        live.watch("a", 0.0)
        live.heard("a", 4.0)
        live.sent("a", 4.0)
        self.assertEqual(live.beat(5.0), Beat(notify=["a"]))
        self.assertFalse(live.peers["a"].pinged, "no answer awaited")
        self.assertEqual(live.beat(10.0), Beat(ping=["a"]), "silent 6 s: its answer is needed")

    def test_answer_needed_before_the_timeout(self):
        """
        A timeout under two intervals: a peer not asked now would be silent
        too long by the next tick, live as it is; it is asked.
        """
        for peers_watch in (False, True):
            live = Liveness(timeout=8.0, interval=5.0, peers_watch=peers_watch)
            live.watch("a", 0.0)
            live.heard("a", 2.0)
            live.sent("a", 4.0)
            self.assertEqual(live.beat(5.0), Beat(ping=["a"]))

    def test_dead_peer_still_found(self):
        """However busy it was, a peer that stops is reported once silent past the timeout."""
        live = Liveness(timeout=15.0, interval=5.0, peers_watch=True)
        live.watch("a", 0.0)
        t = 0.0
        while t < 30.0:
            t += 1.0
            live.heard("a", t)
            live.sent("a", t)
            if t % 5 == 0:
                self.assertEqual(live.beat(t), Beat())
        for tick in (35.0, 40.0, 45.0):
            live.sent("a", tick - 0.5)  # this side keeps sending to it
            self.assertEqual(live.beat(tick).silent, [])
        live.sent("a", 49.5)
        self.assertEqual(live.beat(50.0).silent, [("a", 20.0)])


class RoutingTests(SynchronousTestCase):
    """Contexts and functions go to each worker once, before the first job needing them."""

    def setUp(self):
        self.r = Routing(max_payload=100)
        self.r.client_joined(1, {"cwd": "/a"})
        self.r.client_joined(2, {"cwd": "/b"})
        self.r.worker_joined(10)
        self.r.worker_joined(11)

    def test_context_once_per_worker(self):
        jobs = [Job(1, 1, b""), Job(1, 2, b""), Job(2, 1, b"")]
        self.assertEqual(
            self.r.before(10, jobs), [SendContext(1, {"cwd": "/a"}), SendContext(2, {"cwd": "/b"})]
        )
        self.assertEqual(self.r.before(10, jobs), [])
        self.assertEqual(self.r.before(11, jobs[:1]), [SendContext(1, {"cwd": "/a"})])

    def test_function_once_after_context(self):
        self.assertTrue(self.r.define(1, b"k", b"f"))
        self.assertTrue(self.r.defined(1, b"k"))
        self.assertFalse(self.r.defined(2, b"k"), "functions are per client")
        jobs = [Job(1, 1, b"", func=b"k"), Job(1, 2, b"", func=b"k")]
        self.assertEqual(
            self.r.before(10, jobs), [SendContext(1, {"cwd": "/a"}), SendFunction(1, b"k", b"f")]
        )
        self.assertEqual(self.r.before(10, jobs), [])

    def test_function_over_max_payload_not_kept(self):
        self.assertFalse(self.r.define(1, b"k", b"f" * 101))
        self.assertFalse(self.r.defined(1, b"k"))

    def test_client_left(self):
        self.r.define(1, b"k", b"f")
        self.r.before(11, [Job(1, 1, b"", func=b"k")])
        self.assertEqual(self.r.client_left(1), [11], "only the worker that has its context is told")
        self.assertFalse(self.r.defined(1, b"k"))
        # A client id is not reused, but were it, nothing would be thought sent.
        self.r.client_joined(1, {"cwd": "/c"})
        self.r.define(1, b"k", b"g")
        self.assertEqual(
            self.r.before(11, [Job(1, 1, b"", func=b"k")]),
            [SendContext(1, {"cwd": "/c"}), SendFunction(1, b"k", b"g")],
        )

    def test_worker_left(self):
        self.r.before(10, [Job(1, 1, b"")])
        self.r.worker_left(10)
        self.assertEqual(self.r.client_left(1), [])
