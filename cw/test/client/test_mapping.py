"""
Bounded-memory map, unordered map and progress bars: L{cw.client.mapping} on its
own (with a thread pool) and through a real cluster.
"""

from __future__ import annotations

import io
import itertools
import threading
from concurrent import futures

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import RemoteException, master_status, progress
from cw.client.mapping import bounded_map
from cw.test.jobs import square
from cw.test.procs import DEADLINE, Processes, executor, rss_kib, wait_until


def fail_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x


class CountingSubmit:
    """Wraps an executor's submit and records the most jobs in flight at once."""

    def __init__(self, executor: futures.Executor) -> None:
        self.executor = executor
        self.in_flight = 0
        self.most = 0
        self.submitted = 0
        self.lock = threading.Lock()

    def __call__(self, fn, *args):
        with self.lock:
            self.in_flight += 1
            self.submitted += 1
            self.most = max(self.most, self.in_flight)
        future = self.executor.submit(fn, *args)
        return future

    def taken(self):
        with self.lock:
            self.in_flight -= 1


class BoundedMapTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.pool = futures.ThreadPoolExecutor(4)
        self.addCleanup(self.pool.shutdown)

    def test_order_and_window(self):
        """Results come in input order and at most buffersize jobs are ever in flight."""
        submit = CountingSubmit(self.pool)
        results = []
        for value in bounded_map(submit, square, (range(500),), buffersize=8):
            results.append(value)
            submit.taken()
        self.assertEqual(results, [x * x for x in range(500)])
        # The window's 8 unfinished jobs, plus the finished one being handed over.
        self.assertLessEqual(submit.most, 9)

    def test_endless_generator(self):
        """An endless iterable is fine with a buffersize; only what is taken (plus the window) runs."""
        submit = CountingSubmit(self.pool)
        results = bounded_map(submit, square, (itertools.count(),), buffersize=5)
        self.assertEqual(list(itertools.islice(results, 20)), [x * x for x in range(20)])
        results.close()
        self.assertLessEqual(submit.submitted, 25)

    def test_unordered(self):
        results = bounded_map(self.pool.submit, square, (range(100),), buffersize=7, ordered=False)
        self.assertEqual(sorted(results), [x * x for x in range(100)])

    def test_first_window_submitted_at_call(self):
        submit = CountingSubmit(self.pool)
        bounded_map(submit, square, (range(100),), buffersize=3)
        self.assertEqual(submit.submitted, 3)

    def test_failure_raises_and_cancels(self):
        """A failed job raises from the iterator; the jobs still in flight are cancelled."""
        gate = threading.Event()
        self.addCleanup(gate.set)
        submitted = []

        def submit(fn, *args):
            if args[0] > 3:
                future = futures.Future()  # never runs: stands for a queued job
            else:
                future = self.pool.submit(fn, *args)
            submitted.append(future)
            return future

        results = bounded_map(submit, fail_on_three, (range(10),), buffersize=6)
        self.assertEqual([next(results) for _ in range(3)], [0, 1, 2])
        self.assertRaises(ValueError, next, results)
        self.assertTrue(all(f.cancelled() for f in submitted[4:]))

    def test_bad_buffersize(self):
        self.assertRaises(ValueError, bounded_map, self.pool.submit, square, (range(3),), buffersize=0)

    def test_progress_bar(self):
        """The bar counts the jobs and shows failures."""
        out = io.StringIO()
        with self.assertRaises(ValueError):
            list(bounded_map(self.pool.submit, fail_on_three, (range(10),), progress={"file": out}))
        text = out.getvalue()
        self.assertIn("/10", text)
        self.assertIn("failed=1", text)

    def test_progress_helper(self):
        out = io.StringIO()
        fs = [self.pool.submit(square, x) for x in range(5)]
        self.assertEqual(sorted(f.result() for f in progress(fs, file=out)), [0, 1, 4, 9, 16])
        self.assertIn("5/5", out.getvalue())


def in_flight(address: str) -> int:
    """Jobs the master holds (queued or running) for its busiest client."""
    return max((c["queued"] + c["running"] for c in master_status(address)["clients"]), default=0)


class ClusterMapTests(unittest.TestCase):
    timeout = 300

    def test_bounded_map_flat_memory(self):
        """
        Mapping over a generator of 10 million tiny jobs with buffersize=200
        for 30,000 results keeps at most 200 jobs in flight (the master never
        holds more of them, sampled every 500 results), so the client's
        memory stays flat; results are right and in order, and leaving the
        loop early cancels the rest.
        """
        procs = Processes(self, self.mktemp())

        def body():
            procs.start_master()
            procs.start_worker(procs=2)
            most = 0
            with executor(procs.address) as ex:
                results = ex.map(square, (x for x in range(10_000_000)), buffersize=200)
                for i, value in enumerate(results):
                    self.assertEqual(value, i * i)
                    if i % 500 == 0:
                        most = max(most, in_flight(procs.address))
                    if i == 5_000:
                        start = rss_kib()
                    if i == 29_999:
                        break
                results.close()
                grown = rss_kib() - start
                self.assertLessEqual(most, 200)
                wait_until(lambda: in_flight(procs.address) == 0, timeout=10, what="the rest to be cancelled")
                # Unbounded, 25,000 more futures and payloads would be held; allow noise only.
                self.assertLess(grown, 8 * 1024, f"client RSS grew by {grown} KiB")
                self.assertEqual(
                    sorted(ex.map_unordered(square, range(300), buffersize=50, timeout=DEADLINE)),
                    [x * x for x in range(300)],
                )
                out = io.StringIO()
                with self.assertRaises(RemoteException):
                    list(ex.map(fail_on_three, range(10), progress={"file": out}, timeout=DEADLINE))
                self.assertIn("/10", out.getvalue())

        return threads.deferToThread(body)
