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
import gc
import hashlib
import os

from twisted.internet import threads
from twisted.trial import unittest

from cw.core.payload import OUT_OF_BAND_ABOVE
from cw.test.procs import DEADLINE, check_path, each_path, executor, memory_files, shared_cluster

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


def seeded(kind: str, size: int, seed: int):
    """A value of C{kind} with C{size} bytes that differ for each C{seed}."""
    import random

    data = random.Random(seed).randbytes(size)
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    import numpy

    return numpy.frombuffer(bytearray(data), dtype="u1")


def answer_with(arg, kind: str, size: int, seed: int):
    """The SHA-256 of C{arg} as the job sees it, and a new value of C{kind} (L{seeded})."""
    return sha(arg), seeded(kind, size, seed)


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

    def test_big_values_queued_while_more_pass(self):
        """
        Big arguments queued (at the master, when they travel: their
        buffers in use there) while big results and other arguments pass
        through the master, which assembles those in the memory of earlier
        values that nothing uses any more (L{cw.wire.streaming.SpareBuffers}):
        every job sees its argument as sent, every result arrives as made.
        """
        kinds = ["bytes", "bytearray"] + (["numpy"] if numpy is not None else [])
        size = 3 << 20

        def body(ex, path):
            for round in range(2):
                seeds = range(round * 8, round * 8 + 8)
                futures = []
                for seed in seeds:
                    kind = kinds[seed % len(kinds)]
                    futures.append(
                        ex.submit(answer_with, seeded(kind, size + seed, seed), kind, size - seed, seed + 100)
                    )
                for seed, future in zip(seeds, futures, strict=True):
                    kind = kinds[seed % len(kinds)]
                    seen, made = future.result(DEADLINE)
                    self.assertEqual(seen, sha(seeded(kind, size + seed, seed)), (kind, seed, path))
                    expected = sha(seeded(kind, size - seed, seed + 100))
                    self.assertEqual(sha(made), expected, (kind, seed, path))

        return self.run_in_cluster(body)

    def test_big_results_kept_while_more_arrive(self):
        """
        Big results (which the client assembles in the memory of earlier
        ones once nothing uses that: L{cw.wire.streaming.SpareBuffers})
        arrive whole, and those kept stay as they arrived while more
        arrive (some in reused memory) and after their client is closed;
        no descriptor or memory file is left once they are dropped.
        """
        kinds = ["bytes", "bytearray"] + (["numpy"] if numpy is not None else [])
        size = 3 << 20
        fds = []

        def body(ex, path):
            kept = []
            for seed in range(12):
                kind = kinds[seed % len(kinds)]
                got = ex.submit(seeded, kind, size, seed).result(DEADLINE)
                self.assertIs(type(got), type(seeded(kind, 16, 0)), (kind, path))
                self.assertEqual(sha(got), sha(seeded(kind, size, seed)), (kind, seed, path))
                if seed % 4 == 2:  # some kept (one of each kind), the others dropped at once
                    kept.append((kind, seed, got))
                del got
            for kind, seed, got in kept:
                self.assertEqual(sha(got), sha(seeded(kind, size, seed)), (kind, seed, path))
            return kept

        def run():
            procs = shared_cluster("buffers", slots=(1,))
            for path in each_path(self):
                fds.append(len(os.listdir("/proc/self/fd")))  # the second time, the client's reactor runs
                with executor(procs.address) as ex:
                    check_path(self, ex, path)
                    kept = body(ex, path)
                for kind, seed, got in kept:
                    self.assertEqual(sha(got), sha(seeded(kind, size, seed)), f"{kind} after close ({path})")
                if numpy is not None:
                    [array] = [got for kind, _, got in kept if kind == "numpy"]
                    array[:] = 7  # writable, and its own
                del kept, got
            gc.collect()
            self.assertEqual(memory_files(), 0)
            self.assertLessEqual(len(os.listdir("/proc/self/fd")), fds[-1])

        return threads.deferToThread(run)
