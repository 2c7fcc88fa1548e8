"""
Tests for L{cw.wire.batching.Outbox}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cw.wire.batching import Outbox


class OutboxTests(SynchronousTestCase):
    """An L{Outbox} sends what it collected on the reactor's next turn, in batches."""

    def setUp(self):
        self.clock = Clock()
        self.sent: list[list[bytes]] = []
        self.outbox = Outbox(self.clock, self.sent.append, len, limit=10)

    def test_nothing_sent_within_the_same_turn(self):
        self.outbox.add(b"a")
        self.assertEqual(self.sent, [])
        self.assertEqual(len(self.outbox), 1)

    def test_lone_record_leaves_on_next_turn_without_delay(self):
        self.outbox.add(b"a")
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), self.clock.seconds())
        self.clock.advance(0)
        self.assertEqual(self.sent, [[b"a"]])
        self.assertEqual(len(self.outbox), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_send_now_sets_no_timer(self):
        """L{Outbox.send_now} sends at once, without setting (and cancelling) a timer."""
        timers = []
        set_timer = self.clock.callLater
        self.clock.callLater = lambda *args: timers.append(args) or set_timer(*args)
        self.outbox.send_now([b"a"])
        self.assertEqual(self.sent, [[b"a"]])
        self.assertEqual(timers, [])

    def test_send_now_after_collected(self):
        """What was collected goes first, in the same batch; no timer is left."""
        self.outbox.add(b"a")
        self.outbox.send_now([b"b", b"c"])
        self.assertEqual(self.sent, [[b"a", b"b", b"c"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_burst_shares_one_batch(self):
        for record in [b"a", b"b", b"c"]:
            self.outbox.add(record)
        self.outbox.extend([b"d", b"e"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        self.assertEqual(self.sent, [[b"a", b"b", b"c", b"d", b"e"]])

    def test_split_by_byte_limit(self):
        self.outbox.extend([b"1234", b"5678", b"90", b"abcd", b"x" * 25, b"y"])
        self.clock.advance(0)
        self.assertEqual(self.sent, [[b"1234", b"5678", b"90"], [b"abcd"], [b"x" * 25], [b"y"]])

    def test_next_turn_after_a_flush(self):
        self.outbox.add(b"a")
        self.clock.advance(0)
        self.outbox.add(b"b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        self.assertEqual(self.sent, [[b"a"], [b"b"]])

    def test_extend_with_nothing_schedules_nothing(self):
        self.outbox.extend([])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(0)
        self.assertEqual(self.sent, [])

    def test_flush_sends_now_and_cancels_the_turn(self):
        self.outbox.extend([b"a", b"b"])
        self.outbox.flush()
        self.assertEqual(self.sent, [[b"a", b"b"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(0)
        self.assertEqual(self.sent, [[b"a", b"b"]])

    def test_flush_when_empty_sends_nothing(self):
        self.outbox.flush()
        self.assertEqual(self.sent, [])

    def test_discard(self):
        self.outbox.extend([b"a", b"b"])
        self.assertEqual(self.outbox.discard(), [b"a", b"b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(0)
        self.assertEqual(self.sent, [])
        self.assertEqual(len(self.outbox), 0)

    def test_usable_after_discard(self):
        self.outbox.add(b"a")
        self.outbox.discard()
        self.outbox.add(b"b")
        self.clock.advance(0)
        self.assertEqual(self.sent, [[b"b"]])

    def test_records_added_while_sending_are_not_lost(self):
        def send(batch):
            self.sent.append(batch)
            if batch == [b"a"]:
                self.outbox.add(b"b")

        outbox = Outbox(self.clock, send, len)
        outbox.add(b"a")
        self.clock.advance(0)
        self.assertEqual(self.sent, [[b"a"], [b"b"]])
        self.assertEqual(len(outbox), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
