"""Tests for L{cw.core.handover}: the worker's kept results and the master's unclaimed ones."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cw.core.handover import KeptResults, Unclaimed
from cw.core.records import Outcome, Result


def result(seq: int, size: int = 1, client: int = 9) -> Result:
    return Result(client, seq, Outcome.OK, b"x" * size)


class KeptResultsTests(SynchronousTestCase):
    def test_take_numbers_sessions(self):
        kept = KeptResults(100)
        for session, seq in (("b", 1), ("a", 2), ("b", 3)):
            self.assertTrue(kept.keep(session, result(seq)))
        sessions, results = kept.take()
        self.assertEqual(sessions, ["b", "a"])
        self.assertEqual([(r.client, r.seq) for r in results], [(1, 1), (2, 2), (1, 3)])
        self.assertEqual((kept.results, kept.bytes), ([], 0))

    def test_bound_and_unknown_session(self):
        kept = KeptResults(10)
        self.assertTrue(kept.keep("a", result(1, 6)))
        self.assertFalse(kept.keep("a", result(2, 6)))
        self.assertFalse(kept.keep(None, result(3, 1)))
        self.assertEqual(kept.dropped, 2)


class UnclaimedTests(SynchronousTestCase):
    def test_take_once(self):
        store = Unclaimed()
        store.add("a", result(1), 0.0)
        self.assertIsNone(store.take("b", 1))
        self.assertEqual(store.take("a", 1).payload, b"x")
        self.assertIsNone(store.take("a", 1))
        self.assertEqual(store.bytes, 0)

    def test_oldest_dropped_for_room(self):
        store = Unclaimed(limit=10)
        store.add("a", result(1, 6), 0.0)
        store.add("a", result(2, 6), 1.0)
        self.assertIsNone(store.take("a", 1))
        self.assertIsNotNone(store.take("a", 2))
        self.assertEqual(store.dropped, 1)

    def test_expire_by_age(self):
        store = Unclaimed(max_age=5.0)
        store.add("a", result(1), 0.0)
        store.add("a", result(2), 4.0)
        store.expire(6.0)
        self.assertEqual(len(store), 1)
        self.assertIsNotNone(store.take("a", 2))

    def test_second_copy_ignored(self):
        store = Unclaimed()
        store.add("a", result(1, 3), 0.0)
        store.add("a", result(1, 5), 0.0)
        self.assertEqual(store.bytes, 3)
