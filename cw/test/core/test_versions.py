"""
Tests for the compatibility of a client's and a worker's versions
(L{cw.core.versions}) and for the scheduler keeping a client's jobs off the
workers it avoids (L{cw.core.scheduler.Scheduler.avoid}).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cw.core.records import Job
from cw.core.scheduler import Scheduler
from cw.core.versions import (
    describe,
    incompatible,
    mismatch_message,
    package_differences,
    short,
    table_conflicts,
)

CLIENT = {
    "python": "3.11.7",
    "implementation": "CPython",
    "cw": "0.1.0",
    "cloudpickle": "3.1.3",
    "twisted": "26.10.0",
}


def worker(**fields: str) -> dict:
    return {**CLIENT, **fields}


class IncompatibleTests(SynchronousTestCase):
    def test_same(self):
        """Equal versions are compatible."""
        self.assertEqual(incompatible(CLIENT, worker()), [])

    def test_patch_and_other_packages(self):
        """Patch releases, cloudpickle minor versions, cw and Twisted do not decide."""
        other = worker(python="3.11.2", cloudpickle="3.0.0", cw="0.2.0", twisted="24.3.0")
        self.assertEqual(incompatible(CLIENT, other), [])

    def test_python_minor(self):
        self.assertEqual(incompatible(CLIENT, worker(python="3.12.1")), ["Python major.minor 3.11 vs 3.12"])

    def test_cloudpickle_major(self):
        self.assertEqual(incompatible(CLIENT, worker(cloudpickle="2.2.1")), ["cloudpickle major 3 vs 2"])

    def test_implementation(self):
        self.assertEqual(incompatible(CLIENT, worker(implementation="PyPy")), ["Python CPython vs PyPy"])

    def test_several(self):
        found = incompatible(CLIENT, worker(python="3.99.0", cloudpickle="9.0.0"))
        self.assertEqual(found, ["Python major.minor 3.11 vs 3.99", "cloudpickle major 3 vs 9"])

    def test_unknown(self):
        """A peer that reported nothing (an older cw) is not refused."""
        self.assertEqual(incompatible(None, CLIENT), [])
        self.assertEqual(incompatible(CLIENT, None), [])
        self.assertEqual(incompatible(CLIENT, {"python": "3.12.0"}), ["Python major.minor 3.11 vs 3.12"])

    def test_message_names_both(self):
        """The job's error names both versions, the worker and what to do."""
        message = mismatch_message(CLIENT, worker(cloudpickle="9.0.0"), "node7:123")
        self.assertIn("Python 3.11.7 (CPython), cloudpickle 3.1.3", message)
        self.assertIn("worker node7:123 runs Python 3.11.7 (CPython), cloudpickle 9.0.0", message)
        self.assertIn("version_mismatch='avoid'", message)

    def test_describe(self):
        self.assertEqual(
            describe(CLIENT),
            "Python 3.11.7, implementation CPython, cw 0.1.0, cloudpickle 3.1.3, Twisted 26.10.0",
        )
        self.assertIn("unknown", short(None))


class TableTests(SynchronousTestCase):
    def test_packages(self):
        self.assertEqual(
            package_differences({"numpy": "1.26.4", "six": None}, {"numpy": "2.0.1", "six": None}),
            ["numpy 1.26.4 vs 2.0.1"],
        )
        self.assertEqual(
            package_differences({"numpy": "1.26.4"}, {"numpy": None}), ["numpy 1.26.4 vs not installed"]
        )

    def test_conflicts(self):
        """One line per worker with a difference; compatible workers are not listed."""
        table = {
            "client": {**CLIENT, "packages": {"numpy": "2.0.1"}},
            "workers": {
                "a:1": {**CLIENT, "packages": {"numpy": "2.0.1"}},
                "b:2": worker(python="3.12.0", packages={"numpy": "2.0.1"}),
                "c:3": {**CLIENT, "packages": {"numpy": None}},
            },
        }
        self.assertEqual(
            table_conflicts(table),
            ["worker b:2: Python major.minor 3.11 vs 3.12", "worker c:3: numpy 2.0.1 vs not installed"],
        )


class AvoidTests(SynchronousTestCase):
    """A client told to avoid a worker never gets a job dispatched to it."""

    def setUp(self):
        self.s = Scheduler(prefetch=1)
        self.bad = self.s.add_worker(2, "bad")
        self.good = self.s.add_worker(1, "good")

    def test_avoided_worker_gets_none(self):
        c = self.s.add_client()
        self.s.avoid(c, self.bad)
        self.s.submit(c, [Job(0, seq, b"x") for seq in range(1, 11)])
        assigned = dict(self.s.dispatch())
        self.assertNotIn(self.bad, assigned)
        self.assertEqual([j.seq for j in assigned[self.good]], [1, 2])
        self.assertEqual(self.s.queued, 8)

    def test_other_clients_still_use_it(self):
        """The worker is avoided by one client only: another's jobs go to it."""
        c, other = self.s.add_client(), self.s.add_client()
        self.s.avoid(c, self.bad)
        self.s.submit(c, [Job(0, seq, b"x") for seq in range(1, 6)])
        self.s.submit(other, [Job(0, seq, b"x") for seq in range(1, 6)])
        assigned = dict(self.s.dispatch())
        self.assertEqual({j.client for j in assigned[self.bad]}, {other})
        self.assertEqual(len(assigned[self.bad]), 4)

    def test_forgotten_with_client(self):
        c = self.s.add_client()
        self.s.avoid(c, self.bad)
        self.s.remove_client(c)
        self.assertEqual(self.s.worker(self.bad).avoided, set())
