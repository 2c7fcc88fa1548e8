"""
End-to-end tests: a real C{twistd cw-master} and real C{twistd cw-worker}
processes over TCP on loopback, driven by the blocking client APIs from a
thread while trial's reactor runs.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from concurrent.futures import as_completed

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread, ClusterExecutor, JobCrashed, RemoteException, SubmitError, master_status
from cw.test.jobs import square, wait_for_file, worker_pid
from cw.test.procs import DEADLINE, Processes, arguments_travel, executor, wait_until


def fail(message):
    raise ValueError(message)


class EndToEndTests(unittest.TestCase):
    """A master and workers as separate processes."""

    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def in_thread(self, func):
        return threads.deferToThread(func)

    def test_thousand_jobs_executor(self):
        """1,000 jobs through ClusterExecutor come back right and in order."""

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=2)
            self.procs.start_worker(procs=1)
            with executor(self.procs.address) as ex:
                results = list(ex.map(square, range(1000), timeout=DEADLINE))
                self.assertEqual(results, [x * x for x in range(1000)])
                status = ex.status()
            self.assertEqual(status["completed"], 1000)
            self.assertEqual(status["queued"], 0)
            self.assertEqual(sorted(w["slots"] for w in status["workers"]), [1, 2])

        return self.in_thread(body)

    def test_client_thread_callbacks(self):
        """ClientThread calls back once per job with its id and result."""

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=2)
            got = {}
            callback_threads = set()

            def callback(jobid, result):
                callback_threads.add(threading.current_thread().name)
                self.assertNotIn(jobid, got)
                got[jobid] = result

            with ClientThread(callback, self.procs.address) as client:
                for i in range(200):
                    client.submit(("job", i), square, i)
            self.assertEqual(got, {("job", i): i * i for i in range(200)})
            self.assertEqual(callback_threads, {"cw-client"})

        return self.in_thread(body)

    def test_lambda_and_closure(self):
        """Lambdas and closures over local state run remotely."""

        def body():
            self.procs.start_master()
            self.procs.start_worker()
            offset = 1000
            table = {"a": 1, "b": 2}

            def closure(key):
                return table[key] + offset

            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(lambda x: x + 1, 41).result(60), 42)
                self.assertEqual(list(ex.map(closure, ["a", "b"], timeout=DEADLINE)), [1001, 1002])

        return self.in_thread(body)

    def test_exception_with_traceback(self):
        """A job's exception comes back with its remote traceback and job id."""

        def body():
            self.procs.start_master()
            self.procs.start_worker()
            with executor(self.procs.address) as ex:
                error = ex.submit(fail, "boom 17").exception(60)
            self.assertIsInstance(error, RemoteException)
            self.assertEqual(error.type, "ValueError")
            self.assertIn("boom 17", str(error))
            self.assertIn("in fail", error.traceback)
            self.assertIn("raise ValueError(message)", error.traceback)

            got = []
            client = ClientThread(lambda j, r: got.append(j), self.procs.address)
            client.start()
            client.submit("good", square, 3)
            client.submit("bad", fail, "kaput")
            with self.assertRaises(RemoteException) as caught:
                client.wait(60)
            client.close()
            self.assertEqual(caught.exception.jobid, "bad")
            self.assertIn("kaput", str(caught.exception))
            self.assertEqual(got, ["good"])

        return self.in_thread(body)

    def test_cwd_and_sys_path(self):
        """
        A job runs in the client's working directory and imports modules
        that exist only on the client's sys.path: through submit, map
        (whose function is cached in the job process), map_unordered and
        ClientThread.
        """
        moddir = os.path.abspath(self.mktemp())
        os.makedirs(moddir)
        name = "cw_e2e_only_here_%d" % os.getpid()
        marker = name + ".txt"
        with open(os.path.join(moddir, name + ".py"), "w") as f:
            f.write(f"import os\ndef where(x=None):\n    return x, os.getcwd(), open({marker!r}).read()\n")
        with open(marker, "w") as f:
            f.write("client side")
        sys.path.insert(0, moddir)
        self.addCleanup(sys.path.remove, moddir)
        self.addCleanup(sys.modules.pop, name, None)
        where = importlib.import_module(name).where
        here = os.getcwd()

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(2)
            self.assertNotEqual(os.path.realpath(here), os.path.realpath(self.procs.directory))
            self.assertNotIn(moddir, worker.args)
            expected = [(i, here, "client side") for i in range(20)]
            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(where, "submit").result(60), ("submit", here, "client side"))
                self.assertEqual(list(ex.map(where, range(20), timeout=60)), expected)
                self.assertEqual(sorted(ex.map_unordered(where, range(20), timeout=60)), expected)
            got = {}
            with ClientThread(lambda jobid, result: got.__setitem__(jobid, result), self.procs.address) as c:
                for i in range(20):
                    c.submit(i, where, i)
                c.wait(60)
            self.assertEqual(sorted(got.values()), expected)

        return self.in_thread(body)

    def test_two_clients(self):
        """Two clients at once each get only their own results."""

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=2)
            results = {}

            def run(tag):
                got = []
                with ClientThread(lambda j, r: got.append((j, r)), self.procs.address) as c:
                    for i in range(300):
                        c.submit((tag, i), square, i)
                results[tag] = got

            threads_ = [threading.Thread(target=run, args=(t,)) for t in "AB"]
            for t in threads_:
                t.start()
            for t in threads_:
                t.join(120)
            for tag in "AB":
                self.assertEqual(sorted(results[tag]), [((tag, i), i * i) for i in range(300)])

        return self.in_thread(body)

    def test_worker_added_while_queued(self):
        """A worker that joins while jobs are queued takes some of them."""
        flag = os.path.abspath(self.mktemp())

        def body():
            self.procs.start_master()
            first = self.procs.start_worker(procs=1)
            with executor(self.procs.address) as ex:
                fs = [ex.submit(wait_for_file, flag) for _ in range(10)]
                wait_until(
                    lambda: master_status(self.procs.address)["queued"] == 8,
                    what="8 jobs queued behind the first worker's 2",
                )
                second = self.procs.start_worker(procs=1)
                with open(flag, "w"):
                    pass
                pids = [f.result(60) for f in fs]
            self.assertEqual(set(pids), {first.pid, second.pid})

        return self.in_thread(body)

    def test_worker_stopped_between_runs(self):
        """Stopping a worker between two runs leaves the other to finish."""

        def body():
            self.procs.start_master()
            first = self.procs.start_worker(procs=1)
            second = self.procs.start_worker(procs=1)
            with executor(self.procs.address) as ex:
                self.assertEqual(
                    list(ex.map(square, range(50), timeout=DEADLINE)), [x * x for x in range(50)]
                )
            self.procs.stop_worker(first)
            with executor(self.procs.address) as ex:
                fs = [ex.submit(worker_pid) for _ in range(50)]
                pids = {f.result(60) for f in as_completed(fs, 60)}
            self.assertEqual(pids, {second.pid})

        return self.in_thread(body)

    def test_unpicklable_fails_at_submit(self):
        """Submitting an unpicklable job raises in the caller, naming it."""

        def body():
            self.procs.start_master()
            self.procs.start_worker()
            lock = threading.Lock()
            with executor(self.procs.address) as ex:
                with self.assertRaises(SubmitError) as caught:
                    ex.submit(square, lock)
                self.assertIn("argument 0", str(caught.exception))
                self.assertIn("lock", str(caught.exception))
                # The executor still works afterwards.
                self.assertEqual(ex.submit(square, 5).result(60), 25)
            with ClientThread(None, self.procs.address) as client:
                with self.assertRaises(SubmitError):
                    client.submit("x", lambda: lock)

        return self.in_thread(body)

    def test_large_payloads(self):
        """Arguments and results far beyond AMP's 64 KiB value limit cross every hop."""
        arguments_travel(self)  # through the sockets, not the memory of a client on the worker's machine

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=2)
            blob = os.urandom(3 * 1024 * 1024 + 7)
            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(len, blob).result(60), len(blob))
                self.assertEqual(ex.submit(reverse_bytes, blob).result(60), blob[::-1])
                # Many medium jobs share boxes without mixing up results.
                chunks = [bytes([i]) * 70000 for i in range(20)]
                self.assertEqual(list(ex.map(reverse_bytes, chunks, timeout=DEADLINE)), chunks)

        return self.in_thread(body)


def reverse_bytes(data):
    return data[::-1]


def shout(text):
    print(text, flush=True)
    return len(text)


def shout_and_die(text):
    print(text, flush=True)
    print("and on stderr", file=sys.stderr, flush=True)
    os.kill(os.getpid(), 9)


class JobOutputTests(unittest.TestCase):
    """What a job prints is not lost."""

    timeout = 120

    def test_print_reaches_client(self):
        """A job's print() comes back to its client (see also cw.test.e2e.test_output)."""
        procs = Processes(self, self.mktemp())

        def body():
            procs.start_master()
            procs.start_worker()
            with executor(procs.address) as ex:
                future = ex.submit(shout, "hello from job 4711")
                self.assertEqual(future.result(60), 19)
                self.assertEqual(future.stdout, "hello from job 4711\n")

        return threads.deferToThread(body)

    def test_dead_job_process_output_in_worker_log(self):
        """What a job printed before its process died shows up in its worker's log."""
        procs = Processes(self, self.mktemp())

        def body():
            procs.start_master()
            worker = procs.start_worker()
            with executor(procs.address) as ex:
                error = ex.submit(shout_and_die, "last words of 4711").exception(60)
                self.assertIsInstance(error, JobCrashed)
            wait_until(
                lambda: (
                    "its job's stdout: last words of 4711" in (tail := procs.log_tail(worker, 200))
                    and "its job's stderr: and on stderr" in tail
                ),
                what="the job's output in the worker log",
            )

        return threads.deferToThread(body)


class FairShareTests(unittest.TestCase):
    """Several clients on one master share it fairly."""

    timeout = 180

    def test_small_client_not_stuck_behind_big_one(self):
        """Client B's 10 jobs finish while client A still has most of its 100,000 queued."""
        procs = Processes(self, self.mktemp())

        def body():
            procs.start_master()
            big = ClusterExecutor(procs.address)
            try:
                for i in range(100_000):
                    big.submit(square, i)
                # Workers join only once all of A's jobs wait, however slow this machine is.
                wait_until(
                    lambda: master_status(procs.address)["queued"] == 100_000,
                    what="client A's jobs to reach the master",
                )
                procs.start_worker(procs=1)
                procs.start_worker(procs=1)
                with executor(procs.address) as small:
                    self.assertEqual(list(small.map(square, range(10))), [x * x for x in range(10)])
                status = master_status(procs.address)
                (a,) = [c for c in status["clients"] if c["submitted"] == 100_000]
                self.assertGreater(a["queued"], 50_000)
            finally:
                big.shutdown(cancel_futures=True)

        return threads.deferToThread(body)
