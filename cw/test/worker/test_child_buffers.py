"""
L{cw.worker.child.run_payload} with payloads whose big buffers travel out
of band (L{cw.wire.pickling}), called in this process.
"""

from __future__ import annotations

import hashlib

from twisted.trial import unittest

from cw.core.payload import Segments
from cw.test.wire.test_pickling import BIG, needs_numpy, numpy, received
from cw.test.worker.test_child import ContextIsolation
from cw.wire import pickling
from cw.worker.child import run_payload


def fill(a):
    """Write into the argument array (as ProcessPoolExecutor allows) and return its new sum."""
    a += 1
    return int(a.sum())


class JobProcessTests(ContextIsolation, unittest.TestCase):
    """L{run_payload} loads and returns out-of-band payloads."""

    def setUp(self):
        self.isolate()

    @needs_numpy
    def test_job_writes_into_its_argument(self):
        """A job may write into its argument array (writable, as with ProcessPoolExecutor)."""
        a = numpy.ones(1 << 20)
        status, data = run_payload("", [], received(pickling.dumps(pickling.call_value(fill, (a,), {}))))
        self.assertEqual((status, pickling.loads(data)), (0, 2 << 20))
        self.assertTrue(numpy.array_equal(a, numpy.ones(1 << 20)), "the client's array changed")

    def test_big_result_not_copied(self):
        """A job's big bytes result is framed with the value's own buffer as a part."""
        blob = hashlib.sha256(b"seed").digest() * (BIG // 32)
        status, data = run_payload(
            "", [], received(pickling.dumps(pickling.call_value(lambda: blob, (), {})))
        )
        self.assertEqual(status, 0)
        self.assertIsInstance(data, Segments)
        self.assertEqual(pickling.loads(received(data)), blob)
