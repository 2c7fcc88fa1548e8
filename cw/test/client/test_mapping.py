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
from cw.client.mapping import AUTO_CHUNK_MAX, auto_chunksize, bounded_map, run_chunk
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


class ChunkedMapTests(unittest.SynchronousTestCase):
    """C{bounded_map(..., chunksize=N)}: calls travel and run in chunks, results come one by one."""

    def setUp(self):
        self.pool = futures.ThreadPoolExecutor(4)
        self.addCleanup(self.pool.shutdown)

    def chunked(self, **options):
        """A submit_chunk that records the chunks it was given."""
        chunks = []

        def submit_chunk(chunk):
            chunks.append(list(chunk))
            return self.pool.submit(run_chunk, options.get("fn", square), chunk)

        return chunks, submit_chunk

    def test_chunks_in_order(self):
        """N calls per job, the last chunk shorter; the results in input order, one per item."""
        chunks, submit_chunk = self.chunked()
        results = list(bounded_map(None, square, (range(250),), chunksize=100, submit_chunk=submit_chunk))
        self.assertEqual(results, [x * x for x in range(250)])
        self.assertEqual([len(c) for c in chunks], [100, 100, 50])
        self.assertEqual(chunks[1][0], (100,))

    def test_default_submit_chunk(self):
        """Without submit_chunk, any executor's submit runs the chunks (several iterables zipped)."""
        results = bounded_map(self.pool.submit, pow, (range(10), range(10)), chunksize=3)
        self.assertEqual(list(results), list(map(pow, range(10), range(10))))

    def test_buffersize_counts_chunks(self):
        """buffersize bounds the chunks in flight, as in the standard library; endless inputs work."""
        submit = CountingSubmit(self.pool)
        results = bounded_map(submit, square, (itertools.count(),), chunksize=10, buffersize=3)
        self.assertEqual(submit.submitted, 3)
        self.assertEqual(list(itertools.islice(results, 95)), [x * x for x in range(95)])
        results.close()
        self.assertLessEqual(submit.submitted, 10 + 3)

    def test_failure_at_its_item(self):
        """
        A call that raises fails at its own item: the items of its chunk
        before it are yielded first; the calls after it in its chunk are not
        made (as ProcessPoolExecutor's chunks).
        """
        calls = []

        def record(x):
            calls.append(x)
            return fail_on_three(x)

        results = bounded_map(self.pool.submit, record, (range(10),), chunksize=5)
        self.assertEqual([next(results) for _ in range(3)], [0, 1, 2])
        with self.assertRaises(ValueError) as caught:
            next(results)
        self.assertIn("three", str(caught.exception))
        self.assertRaises(StopIteration, next, results)
        self.assertNotIn(4, calls)

    def test_unordered(self):
        results = bounded_map(
            self.pool.submit, square, (range(1000),), chunksize=7, buffersize=5, ordered=False
        )
        self.assertEqual(sorted(results), [x * x for x in range(1000)])

    def test_auto(self):
        """chunksize="auto": one call first, then chunks sized from its measured duration."""
        chunks, submit_chunk = self.chunked()
        results = bounded_map(None, square, (range(5000),), chunksize="auto", submit_chunk=submit_chunk)
        self.assertEqual(list(results), [x * x for x in range(5000)])
        self.assertEqual(len(chunks[0]), 1)
        self.assertGreater(len(chunks[1]), 100, "a fast call gets big chunks")
        chunks, submit_chunk = self.chunked()
        results = bounded_map(
            None,
            square,
            (range(3000),),
            chunksize="auto",
            buffersize=2,
            ordered=False,
            submit_chunk=submit_chunk,
        )
        self.assertEqual(sorted(results), [x * x for x in range(3000)])
        self.assertEqual(len(chunks[0]), 1)
        self.assertGreater(max(len(c) for c in chunks), 100)

    def test_auto_chunksize(self):
        """About 20 ms per chunk, between 1 and AUTO_CHUNK_MAX calls."""
        self.assertEqual(auto_chunksize(0.001, 1), 20)
        self.assertEqual(auto_chunksize(0.5, 1), 1)
        self.assertEqual(auto_chunksize(0.0, 10), AUTO_CHUNK_MAX)
        self.assertEqual(auto_chunksize(1e-6 * 1000, 1000), AUTO_CHUNK_MAX)
        self.assertEqual(auto_chunksize(0.001, 0), 1)

    def test_bad_chunksize(self):
        for bad in (0, -1, 1.5, "fast", True):
            self.assertRaises(ValueError, bounded_map, self.pool.submit, square, (range(3),), chunksize=bad)

    def test_progress_counts_items(self):
        """The bar counts calls, not chunks, and each failed or unmade call of a failed chunk."""
        out = io.StringIO()
        with self.assertRaises(ValueError):
            list(
                bounded_map(
                    self.pool.submit, fail_on_three, (range(10),), chunksize=5, progress={"file": out}
                )
            )
        text = out.getvalue()
        self.assertIn("/10", text)
        self.assertIn("failed=2", text)

    def test_leaving_stops_chunks(self):
        """Closing the iterator early stops the chunks still in flight."""
        submitted = []

        def submit_chunk(chunk):
            future = futures.Future() if chunk[0][0] >= 20 else self.pool.submit(run_chunk, square, chunk)
            submitted.append(future)
            return future

        results = bounded_map(None, square, (range(100),), chunksize=10, submit_chunk=submit_chunk)
        self.assertEqual([next(results) for _ in range(15)], [x * x for x in range(15)])
        results.close()
        self.assertTrue(all(f.cancelled() for f in submitted[2:]))


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
