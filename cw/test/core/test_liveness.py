"""
Unit tests of the worker's watchdog on its master (L{cw.core.liveness.MasterWatch}):
pure, time passed in.  The master's and client's side (L{cw.core.liveness.Liveness})
is tested in L{cw.test.core.test_master_core}; the worker carrying the
watchdog out in L{cw.test.master.test_master_faults.MasterWatchdogTests}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cw.core.liveness import MasterSilent, MasterWatch, Recheck


class MasterWatchTests(SynchronousTestCase):
    def test_armed_from_the_second_heartbeat(self):
        watch = MasterWatch(30.0)
        self.assertIsNone(watch.heartbeat(100.0))
        self.assertIsNone(watch.check(1000.0, 100.0), "not armed: never silent")
        self.assertEqual(watch.heartbeat(105.0), Recheck(30.0))

    def test_timeout_is_at_least_three_intervals(self):
        watch = MasterWatch(30.0)
        watch.heartbeat(0.0)
        self.assertEqual(watch.heartbeat(60.0), Recheck(180.0))
        self.assertEqual(watch.check(240.0, 60.0), MasterSilent(180.0))

    def test_silent_past_the_timeout(self):
        watch = MasterWatch(30.0)
        watch.heartbeat(0.0)
        watch.heartbeat(5.0)
        self.assertEqual(watch.check(35.0, 5.0), MasterSilent(30.0))
        self.assertEqual(watch.check(40.0, 5.0), MasterSilent(30.0))

    def test_anything_heard_postpones(self):
        """Data from the master since its last heartbeat moves the check on."""
        watch = MasterWatch(30.0)
        watch.heartbeat(0.0)
        watch.heartbeat(5.0)
        self.assertEqual(watch.check(35.0, 25.0), Recheck(20.0))
        self.assertEqual(watch.check(55.0, 25.0), MasterSilent(30.0))

    def test_disabled(self):
        watch = MasterWatch(0)
        for now in (0.0, 5.0, 10.0):
            self.assertIsNone(watch.heartbeat(now))
        self.assertIsNone(watch.check(1000.0, 0.0))

    def test_reset_forgets_the_connection(self):
        watch = MasterWatch(30.0)
        watch.heartbeat(0.0)
        watch.heartbeat(5.0)
        watch.reset()
        self.assertIsNone(watch.check(1000.0, 5.0))
        self.assertIsNone(watch.heartbeat(1000.0), "armed again only from the second heartbeat")
