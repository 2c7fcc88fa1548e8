"""
The function cache, end to end: C{ClusterExecutor.map} sends its function
once per connection to the master, once per worker, and each job process
unpickles it once, however many jobs use it.  Real twistd master and
worker processes over TCP on loopback.
"""

from __future__ import annotations

import collections

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread
from cw.test.jobs import child_counters
from cw.test.procs import DEADLINE, Processes, executor


def make_closure(size: int):
    """A function closing over C{size} bytes, so that its pickle is big."""
    blob = b"c" * size

    def job(i):
        pid, unpickled, jobs = child_counters()
        return pid, unpickled, jobs, len(blob) + i

    return job


def make_adder():
    """A closure adding C{state["add"]}, and that state, which the test changes between submits."""
    state = {"add": 1}

    def job(i):
        _, unpickled, _ = child_counters()
        return unpickled, i + state["add"]

    return job, state


class FunctionCacheTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_map_unpickles_function_once_per_job_process(self):
        """
        400 jobs of one 2 MB closure through map on two workers with two
        job processes each: every job gets the right answer, and each job
        process unpickled the function exactly once although most ran many
        jobs.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(2)
            self.procs.start_worker(2)
            job = make_closure(2 << 20)
            with executor(self.procs.address) as ex:
                results = list(ex.map(job, range(400), timeout=DEADLINE))
            self.assertEqual([r[3] for r in results], [(2 << 20) + i for i in range(400)])
            unpickled = collections.defaultdict(set)
            jobs = collections.Counter()
            for pid, count, _, _ in results:
                unpickled[pid].add(count)
                jobs[pid] += 1
            self.assertEqual(
                {pid: counts for pid, counts in unpickled.items()}, {pid: {1} for pid in unpickled}
            )
            self.assertGreater(max(jobs.values()), 1, "some job process ran several jobs")

        return threads.deferToThread(body)

    def test_map_chunks(self):
        """
        map(chunksize=100) of 1,000 calls of a 2 MB closure sends 10 jobs,
        whose function (the closure in its chunk runner) each job process
        unpickles once; results in order, one per item.  chunksize="auto"
        and map_unordered give the same results.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(2)
            job = make_closure(2 << 20)
            with executor(self.procs.address) as ex:
                results = list(ex.map(job, range(1000), chunksize=100, timeout=DEADLINE))
                self.assertEqual([r[3] for r in results], [(2 << 20) + i for i in range(1000)])
                self.assertEqual({r[1] for r in results}, {1})
                (client,) = ex.status()["clients"]
                self.assertEqual(client["submitted"], 10)
                self.assertEqual(
                    [r[3] for r in ex.map(job, range(2000), chunksize="auto", timeout=DEADLINE)],
                    [(2 << 20) + i for i in range(2000)],
                )
                self.assertLess(ex.status()["clients"][0]["submitted"], 10 + 200)
                self.assertEqual(
                    sorted(r[3] for r in ex.map_unordered(job, range(300), chunksize=7, buffersize=4)),
                    [(2 << 20) + i for i in range(300)],
                )

        return threads.deferToThread(body)

    def test_submit_sends_repeated_function_once(self):
        """
        submit sends a function inside its first job; once the same
        function (the same pickle) is submitted again, it is defined once
        and its jobs carry only their arguments, so the job process
        unpickles it once for all of them.  A closure whose captured value
        changes between submits is another function: its jobs use the new
        value.  ClientThread does the same.  map then reuses the definition.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            job, state = make_adder()
            with executor(self.procs.address) as ex:
                first = [ex.submit(job, i).result(DEADLINE) for i in range(5)]
                self.assertEqual([value for _, value in first], [i + 1 for i in range(5)])
                self.assertEqual([count for count, _ in first], [0, 1, 1, 1, 1])
                state["add"] = 100
                second = [ex.submit(job, i).result(DEADLINE) for i in range(5)]
                self.assertEqual([value for _, value in second], [i + 100 for i in range(5)])
                self.assertEqual([count for count, _ in second], [1, 2, 2, 2, 2])
                mapped = list(ex.map(job, range(50), timeout=DEADLINE))
                self.assertEqual({count for count, _ in mapped}, {2})
                self.assertEqual([value for _, value in mapped], [i + 100 for i in range(50)])
            state["add"] = 7
            results = {}
            client = ClientThread(lambda jobid, value: results.__setitem__(jobid, value), self.procs.address)
            try:
                for i in range(5):
                    client.submit(i, job, i)
                client.wait(timeout=DEADLINE)
            finally:
                client.close()
            self.assertEqual({i: value for i, (_, value) in results.items()}, {i: i + 7 for i in range(5)})
            # A new connection: its first job carries the function, the next ones load it once.
            self.assertEqual([results[i][0] for i in range(5)], [2, 3, 3, 3, 3])

        return threads.deferToThread(body)

    def test_two_clients_two_functions(self):
        """
        Two clients mapping different closures on one worker each get
        their own function's results (a cache keyed by client and digest).
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            small, big = make_closure(10), make_closure(20)
            with executor(self.procs.address) as a, executor(self.procs.address) as b:
                ra = a.map(small, range(100), timeout=DEADLINE)
                rb = b.map(big, range(100), timeout=DEADLINE)
                self.assertEqual([r[3] for r in ra], [10 + i for i in range(100)])
                self.assertEqual([r[3] for r in rb], [20 + i for i in range(100)])

        return threads.deferToThread(body)


class CacheMirrorTests(unittest.SynchronousTestCase):
    """
    The worker's L{ChildLink} and the L{JobChild} keep the same function
    cache, so the link never leaves out a function the child lacks, even
    when far more functions than the cache holds come and go.
    """

    def test_random_sequence_in_sync(self):
        import random

        import cloudpickle

        from cw.wire import commands as P
        from cw.worker.child import FUNCTION_CACHE, JobChild
        from cw.worker.pool import ChildLink

        link, child = ChildLink(), JobChild()
        functions = {}
        for n in range(3 * FUNCTION_CACHE):
            for client in (1, 2):
                functions[(client, b"%d" % n)] = cloudpickle.dumps(lambda x, n=n: x + n)
        keys = list(functions)
        rng = random.Random(4)
        seq = 0
        for _ in range(300):
            jobs = []
            for _ in range(rng.randint(1, 40)):
                seq += 1
                client, key = rng.choice(keys[: rng.choice([8, len(keys)])])
                jobs.append(P.Job(client, seq, cloudpickle.dumps(((seq,), {})), b"", key))
            contexts, sent = link._missing(jobs, {}, functions, 0)
            answer = child.run_batch(jobs, contexts, sent)
            for job, result in zip(jobs, answer["results"], strict=True):
                self.assertEqual(result.status, P.Outcome.OK, P.read_error_report(result.payload))
                self.assertEqual(cloudpickle.loads(result.payload), job.seq + int(job.func))
        self.assertEqual(list(link.functions.entries), list(child.functions.entries))
