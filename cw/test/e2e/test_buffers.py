"""
Big buffers travel out of band (L{cw.wire.pickling}), end to end: a real
C{twistd cw-master} and C{cw-worker} (shared by these tests), the blocking
client in a thread.  Every kind of buffer arrives whole, both ways; a job
may write into its argument array, and a returned array is writable at the
client, as with C{ProcessPoolExecutor}.  Each test runs twice
(L{each_path}): big arguments left in the memory of a client on the
worker's machine and big results lent from the worker's, then every byte
through the sockets.
"""

from __future__ import annotations

import array
import hashlib

from twisted.internet import threads
from twisted.trial import unittest

from cw.core.payload import OUT_OF_BAND_ABOVE
from cw.test.procs import DEADLINE, check_path, each_path, executor, shared_cluster

try:
    import numpy
except ImportError:  # NumPy is in the test extra; without it, its tests skip
    numpy = None

SIZE = 3 * OUT_OF_BAND_ABOVE + 11


def sha(data) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def describe(*args, **kwargs):
    """The type and SHA-256 of each argument, as the job sees them."""
    kinds = [(type(a).__name__, sha(a)) for a in args]
    return kinds, {k: (type(v).__name__, sha(v)) for k, v in kwargs.items()}


def make(kind: str, size: int):
    """A value of C{kind} with C{size} bytes of known content, made in the job."""
    data = bytes(i % 251 for i in range(size))
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(bytearray(data))
    if kind == "array":
        return array.array("B", data)
    if kind == "numpy":
        import numpy

        return numpy.frombuffer(bytearray(data), dtype="u1").reshape(-1, 1)
    raise ValueError(kind)


def increment(a):
    """Write into the argument array and return it with its sum."""
    a += 1
    return a, int(a.sum())


def writeable(a):
    return bool(a.flags.writeable)


class BufferTests(unittest.TestCase):
    timeout = 120

    def run_in_cluster(self, body):
        """Run C{body(executor, path)} once for each path (L{each_path})."""

        def run():
            procs = shared_cluster("buffers", slots=(1,))
            for path in each_path(self):
                with executor(procs.address) as ex:
                    check_path(self, ex, path)
                    body(ex, path)

        return threads.deferToThread(run)

    def test_every_kind_as_argument(self):
        """bytes, bytearray, memoryview, array.array (and NumPy) arguments arrive whole, as their type."""
        values = [make(kind, SIZE) for kind in ("bytes", "bytearray", "memoryview", "array")]
        if numpy is not None:
            values.append(make("numpy", SIZE))
        small = make("bytes", 100)

        def body(ex, path):
            args, kwargs = ex.submit(describe, *values, small, key=make("bytearray", SIZE)).result(DEADLINE)
            want = [(type(v).__name__, sha(v)) for v in [*values, small]]
            self.assertEqual(args, want, path)
            self.assertEqual(kwargs, {"key": ("bytearray", sha(make("bytes", SIZE)))}, path)

        return self.run_in_cluster(body)

    def test_every_kind_as_result(self):
        """A job returning each kind of big buffer: the client gets it whole, as its type."""
        kinds = ["bytes", "bytearray", "memoryview", "array"] + (["numpy"] if numpy is not None else [])

        def body(ex, path):
            for kind in kinds:
                got = ex.submit(make, kind, SIZE).result(DEADLINE)
                want = make(kind, SIZE)
                self.assertIs(type(got), type(want), (kind, path))
                self.assertEqual(sha(got), sha(want), (kind, path))
            # In a list, and deeper (where bytes travel in the pickle).
            got = ex.submit(lambda: [make("bytes", SIZE), [make("bytes", SIZE)]]).result(DEADLINE)
            self.assertEqual([sha(got[0]), sha(got[1][0])], [sha(make("bytes", SIZE))] * 2, path)

        return self.run_in_cluster(body)

    def test_numpy_writable_both_ways(self):
        """A job may write into its argument array; the array it returns is writable at the client."""
        if numpy is None:
            raise unittest.SkipTest("NumPy is not installed")
        a = numpy.arange(1 << 20, dtype="i8")

        def body(ex, path):
            returned, total = ex.submit(increment, a).result(DEADLINE)
            self.assertEqual(total, int(a.sum()) + len(a), path)
            self.assertTrue(numpy.array_equal(returned, a + 1), path)
            self.assertTrue(
                numpy.array_equal(a, numpy.arange(1 << 20)), f"the client's array changed ({path})"
            )
            self.assertTrue(returned.flags.writeable, path)
            returned[0] = -1
            self.assertTrue(ex.submit(writeable, numpy.zeros(SIZE)).result(DEADLINE), path)
            # Through map (a cached function) as well.
            self.assertEqual([t for _, t in ex.map(increment, [a, a])], [total, total], path)

        return self.run_in_cluster(body)
