"""
Tests for the durable queue's pure decisions (L{cw.core.durable}): what one
commit holds, and which stored results are dropped, oldest first.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cw.core.durable import (
    DELIVERY_BYTES,
    LAZY_COMMIT,
    Batch,
    Dropped,
    ResultShelf,
    SessionRecord,
    StoredJob,
    commit_delay,
    delivery_batches,
)
from cw.core.records import Job, Outcome, Result, encode_options


class BatchTests(SynchronousTestCase):
    """The writes of one turn, committed together."""

    def test_empty(self):
        self.assertFalse(Batch())

    def test_submit_stores_and_acknowledges(self):
        batch = Batch()
        batch.submit("s", 7, [Job(7, 1, b"a"), Job(7, 2, b"b", encode_options(priority=3))])
        self.assertEqual(sorted(batch.jobs), [("s", 1), ("s", 2)])
        self.assertEqual(batch.jobs[("s", 2)].priority, 3)
        self.assertEqual(batch.acks, {7: [1, 2]})
        self.assertTrue(batch)

    def test_submitted_and_ended_in_one_batch_is_not_written(self):
        batch = Batch()
        batch.submit("s", 7, [Job(7, 1, b"a"), Job(7, 2, b"b")])
        batch.end("s", [1, 3])
        self.assertEqual(list(batch.jobs), [("s", 2)])
        self.assertEqual(batch.ended, {("s", 3)})
        # Still acknowledged: the client sent it and it was dealt with.
        self.assertEqual(batch.acks, {7: [1, 2]})

    def test_stored_result_ends_its_job(self):
        batch = Batch()
        batch.store_result("s", Result(7, 4, Outcome.OK, b"r"))
        self.assertEqual(batch.ended, {("s", 4)})
        self.assertEqual(batch.results[("s", 4)].payload, b"r")
        batch.take_results([("s", 4), ("s", 5)])
        self.assertEqual(batch.results, {})
        self.assertEqual(batch.taken, {("s", 5)})

    def test_forget_drops_pending_session_writes(self):
        batch = Batch()
        batch.session(SessionRecord("s", {"cwd": "/"}))
        batch.function("s", b"k", b"f")
        batch.function("t", b"k", b"f")
        batch.forget("s")
        self.assertEqual(batch.sessions, {})
        self.assertEqual(list(batch.functions), [("t", b"k")])
        self.assertEqual(batch.forgotten, {"s"})
        batch.session(SessionRecord("s", {}))
        self.assertEqual(batch.forgotten, set())

    def test_absorb_keeps_order_of_acks_and_writes(self):
        """
        A batch that absorbs a later one acknowledges its own jobs first;
        a job it inserts that the later one ends is not inserted; a result
        the later one takes is not written (see test_store's AbsorbTests
        for the whole against a real file).
        """
        earlier, later = Batch(), Batch()
        earlier.submit("s", 7, [Job(7, 1, b"a"), Job(7, 2, b"b")])
        earlier.store_result("s", Result(7, 5, Outcome.OK, b"r"))
        later.submit("s", 7, [Job(7, 3, b"c")])
        later.submit("s", 8, [Job(8, 9, b"d")])
        later.end("s", [1])
        later.take_results([("s", 5)])
        earlier.absorb(later)
        self.assertEqual(earlier.acks, {7: [1, 2, 3], 8: [9]})
        self.assertEqual(sorted(earlier.jobs), [("s", 2), ("s", 3), ("s", 9)])
        self.assertEqual((earlier.results, earlier.taken), ({}, {("s", 5)}))

    def test_commit_delay(self):
        """Submitted jobs are committed at once (their client waits); the rest may gather."""
        batch = Batch()
        batch.end("s", [1])
        batch.store_result("s", Result(7, 2, Outcome.OK, b"r"))
        self.assertEqual(commit_delay(batch), LAZY_COMMIT)
        batch.submit("s", 7, [Job(7, 3, b"a")])
        self.assertEqual(commit_delay(batch), 0)

    def test_stored_job_round_trip(self):
        job = Job(3, 9, b"p", b"o", b"f")
        self.assertEqual(StoredJob.of("s", job).job(5), Job(5, 9, b"p", b"o", b"f"))


class ResultShelfTests(SynchronousTestCase):
    """Results for absent clients, bounded by bytes, oldest dropped first."""

    def test_within_bound_keeps_all(self):
        shelf = ResultShelf(100)
        self.assertEqual(shelf.add("a", 1, 40), [])
        self.assertEqual(shelf.add("b", 1, 60), [])
        self.assertEqual((len(shelf), shelf.bytes), (2, 100))

    def test_over_bound_drops_oldest_first(self):
        shelf = ResultShelf(100)
        shelf.add("a", 1, 40)
        shelf.add("b", 1, 30)
        shelf.add("a", 2, 20)
        dropped = shelf.add("b", 2, 60)
        self.assertEqual(dropped, [Dropped("a", 1, 40), Dropped("b", 1, 30)])
        self.assertEqual(shelf.bytes, 80)
        self.assertEqual(shelf.dropped, 2)
        self.assertNotIn(("a", 1), shelf)
        self.assertIn(("a", 2), shelf)

    def test_result_bigger_than_bound_is_not_kept(self):
        shelf = ResultShelf(10)
        shelf.add("a", 1, 5)
        self.assertEqual(shelf.add("a", 2, 11), [Dropped("a", 1, 5), Dropped("a", 2, 11)])
        self.assertEqual((len(shelf), shelf.bytes), (0, 0))

    def test_sizes_and_remove_a_sessions_results(self):
        """A session's results are listed oldest first; they go only when removed (acknowledged)."""
        shelf = ResultShelf(1000)
        for session, seq, size in [("a", 3, 10), ("b", 1, 20), ("a", 1, 30)]:
            shelf.add(session, seq, size)
        self.assertEqual(shelf.of("a"), 2)
        self.assertEqual(shelf.sizes("a"), [(3, 10), (1, 30)])
        self.assertEqual(shelf.sizes("c"), [])
        self.assertEqual(len(shelf), 3)
        self.assertEqual(shelf.remove("a", [1, 2]), [1])
        self.assertEqual(shelf.sizes("a"), [(3, 10)])
        self.assertEqual(shelf.remove("a", [3]), [3])
        self.assertEqual((len(shelf), shelf.bytes, shelf.sessions()), (1, 20, {"b"}))

    def test_delivery_batches(self):
        """Stored results go to their client in batches of at most DELIVERY_BYTES, in order."""
        self.assertEqual(delivery_batches([]), [])
        sizes = [(1, 10), (2, 10), (3, 25), (4, 5), (5, 5)]
        self.assertEqual(delivery_batches(sizes, 20), [[1, 2], [3], [4, 5]])
        self.assertEqual(delivery_batches([(n, 1000) for n in range(3)]), [[0, 1, 2]])
        self.assertEqual(len(delivery_batches([(n, DELIVERY_BYTES // 2) for n in range(5)])), 3)

    def test_same_key_replaces(self):
        shelf = ResultShelf(100)
        shelf.add("a", 1, 40)
        shelf.add("a", 1, 50)
        self.assertEqual((len(shelf), shelf.bytes), (1, 50))
