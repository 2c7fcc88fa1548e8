"""
L{cw.client.ClusterExecutor} held to the generic L{concurrent.futures}
contract: the checks of CPython's own executor test mixins (C{ExecutorTest},
C{WaitTests}, C{AsCompletedTests} and C{ExecutorShutdownTest} in
C{Lib/test/test_concurrent_futures/}), written again for a real local cw
cluster.  The behaviour checked is the standard library's; the only
difference allowed is that a remote executor has no pool size.  Events
that cross processes are files (L{FileEvent}); durations the originals
sleep through are events here, so no check depends on timing.

The tests share one master and two workers (three job processes), started
on first use and stopped when the test run exits (L{shared_cluster}); each
test has an executor of its own, whose jobs are stopped after the test.
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
import time
import weakref
from concurrent import futures

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import BaseClientThread, Client, ClientThread, ClusterExecutor, RemoteException, master_status
from cw.test import jobs
from cw.test.jobs import touch
from cw.test.procs import DEADLINE, abandon, in_thread, process_exists, run_script, shared_cluster, wait_until

#: How many job processes the shared cluster has.
SLOTS = 3


class FileEvent:
    """An event jobs can wait for in other processes: a file that appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def set(self) -> None:
        if not os.path.exists(self.path):
            touch(self.path)


# Futures already in a given state, made through the public API.


def pending_future() -> futures.Future:
    return futures.Future()


def running_future() -> futures.Future:
    f = futures.Future()
    f.set_running_or_notify_cancel()
    return f


def cancelled_future() -> futures.Future:
    f = futures.Future()
    f.cancel()
    return f


def cancelled_and_notified_future() -> futures.Future:
    f = cancelled_future()
    f.set_running_or_notify_cancel()
    return f


def exception_future() -> futures.Future:
    f = futures.Future()
    f.set_exception(OSError())
    return f


def successful_future() -> futures.Future:
    f = futures.Future()
    f.set_result(42)
    return f


class ContractCase(unittest.TestCase):
    """A fresh executor on the shared cluster for each test; its jobs are stopped afterwards."""

    timeout = 120

    def setUp(self):
        def connect():
            self.cluster = shared_cluster("contract", (2, 1))
            self.address = self.cluster.address
            self.executor = ClusterExecutor(self.address)

        return threads.deferToThread(connect)

    def tearDown(self):
        def stop():
            abandon(self.executor)
            # Leave the cluster idle for the next test.
            wait_until(
                lambda: (
                    (status := master_status(self.address))["queued"] == 0
                    and not any(w["held"] for w in status["workers"])
                ),
                timeout=30,
                what="the shared cluster to be idle",
            )

        return threads.deferToThread(stop)

    def event(self) -> FileEvent:
        event = FileEvent(os.path.abspath(self.mktemp()))
        self.addCleanup(event.set)
        return event


class ExecutorTests(ContractCase):
    """CPython's C{ExecutorTest}."""

    @in_thread
    def test_submit(self):
        future = self.executor.submit(pow, 2, 8)
        self.assertEqual(256, future.result(DEADLINE))

    @in_thread
    def test_submit_keyword(self):
        future = self.executor.submit(jobs.mul, 2, y=8)
        self.assertEqual(16, future.result(DEADLINE))
        future = self.executor.submit(jobs.capture, 1, self=2, fn=3)
        self.assertEqual(future.result(DEADLINE), ((1,), {"self": 2, "fn": 3}))
        with self.assertRaises(TypeError):
            self.executor.submit(fn=jobs.capture, arg=1)
        with self.assertRaises(TypeError):
            self.executor.submit(arg=1)

    @in_thread
    def test_map(self):
        self.assertEqual(
            list(self.executor.map(pow, range(10), range(10))),
            list(map(pow, range(10), range(10))),
        )
        self.assertEqual(
            list(self.executor.map(pow, range(10), range(10), chunksize=3)),
            list(map(pow, range(10), range(10))),
        )

    @in_thread
    def test_map_exception(self):
        i = self.executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        self.assertEqual(i.__next__(), (0, 1))
        self.assertEqual(i.__next__(), (0, 1))
        with self.assertRaises(ZeroDivisionError):
            i.__next__()

    @in_thread
    def test_map_exception_in_chunk(self):
        """With chunks, a call that raises fails at its own item, after the items before it."""
        i = self.executor.map(divmod, [1, 1, 1, 1, 1], [2, 3, 0, 5, 6], chunksize=4)
        self.assertEqual(i.__next__(), (0, 1))
        self.assertEqual(i.__next__(), (0, 1))
        with self.assertRaises(ZeroDivisionError):
            i.__next__()
        self.assertRaises(StopIteration, i.__next__)

    @in_thread
    def test_map_timeout(self):
        """
        The iteration raises C{TimeoutError} at the first item not done
        C{timeout} seconds after the call to C{map}, once the items before
        it are yielded, and not before those seconds have passed.  On a
        loaded machine the first two jobs may take longer than the
        timeout; the check is then made again with a longer one.
        """
        for timeout in (2, 10, 40):
            event = self.event()
            results = []
            start = time.monotonic()
            # The last job gives up 20 s after the timeout (a remote
            # TimeoutError, which must not be taken for the map's own).
            calls = self.executor.map(
                jobs.wait_then, [None, None, event.path], [None] * 3, [timeout + 20] * 3, timeout=timeout
            )
            try:
                for i in calls:
                    results.append(i)
            except futures.TimeoutError as e:
                elapsed = time.monotonic() - start
                self.assertNotIsInstance(e, RemoteException)
            else:
                self.fail("expected TimeoutError")
            event.set()
            self.assertGreaterEqual(elapsed, timeout)
            self.assertLess(elapsed, timeout + DEADLINE)
            if results == [None, None]:
                return
            self.assertLess(len(results), 2)  # the first jobs were slow: try a longer timeout
        self.fail(f"the first two jobs did not finish within {timeout} s: {results}")

    @in_thread
    def test_leaving_map_kills_its_jobs(self):
        """Closing a map early kills its jobs that are running (cw's promise beyond the contract)."""
        flag = self.event()
        started = [os.path.abspath(self.mktemp()) for _ in range(SLOTS)]
        results = self.executor.map(jobs.block_until, [flag.path] * SLOTS, started)
        wait_until(
            lambda: all(os.path.exists(s) and open(s).read() for s in started), what="the jobs to start"
        )
        pids = [int(open(s).read()) for s in started]
        results.close()
        wait_until(lambda: not any(process_exists(p) for p in pids), what="the job processes to be killed")
        self.assertEqual(self.executor.outstanding(), [])

    @in_thread
    def test_shutdown_race_issue12456(self):
        self.executor.map(str, [2] * (SLOTS + 1))
        self.executor.shutdown()

    @in_thread
    def test_no_stale_references(self):
        my_object = jobs.MyObject()
        collected = threading.Event()
        my_object_callback = weakref.ref(my_object, lambda obj: collected.set())  # noqa: F841
        # Deliberately discarding the future.
        self.executor.submit(my_object.my_method)
        del my_object
        self.assertTrue(collected.wait(DEADLINE), "Stale reference not collected within timeout.")

    @in_thread
    def test_free_reference(self):
        for obj in self.executor.map(jobs.make_dummy_object, range(10)):
            wr = weakref.ref(obj)
            del obj
            gc.collect()
            self.assertIsNone(wr())


class WaitTests(ContractCase):
    """CPython's C{WaitTests}."""

    @in_thread
    def test_20369(self):
        future = self.executor.submit(jobs.mul, 1, 2)
        done, not_done = futures.wait([future, future], return_when=futures.ALL_COMPLETED)
        self.assertEqual({future}, done)
        self.assertEqual(set(), not_done)

    @in_thread
    def test_first_completed(self):
        event = self.event()
        cancelled = cancelled_future()
        future1 = self.executor.submit(jobs.mul, 21, 2)
        future2 = self.executor.submit(jobs.wait_then, event.path)
        try:
            done, not_done = futures.wait([cancelled, future1, future2], return_when=futures.FIRST_COMPLETED)
            self.assertEqual({future1}, done)
            self.assertEqual({cancelled, future2}, not_done)
        finally:
            event.set()
        future2.result(DEADLINE)

    @in_thread
    def test_first_completed_some_already_completed(self):
        event = self.event()
        cancelled, successful = cancelled_and_notified_future(), successful_future()
        future1 = self.executor.submit(jobs.wait_then, event.path)
        try:
            finished, pending = futures.wait(
                [cancelled, successful, future1], return_when=futures.FIRST_COMPLETED
            )
            self.assertEqual({cancelled, successful}, finished)
            self.assertEqual({future1}, pending)
        finally:
            event.set()
        future1.result(DEADLINE)

    @in_thread
    def test_first_exception(self):
        event1, event2 = self.event(), self.event()
        try:
            future1 = self.executor.submit(jobs.mul, 2, 21)
            future2 = self.executor.submit(jobs.wait_and_raise, event1.path)
            future3 = self.executor.submit(jobs.wait_then, event2.path)

            # future1 completes before future2 finishes.
            def wait_for_future1():
                future1.result(DEADLINE)
                event1.set()

            t = threading.Thread(target=wait_for_future1)
            t.start()
            finished, pending = futures.wait(
                [future1, future2, future3], timeout=DEADLINE, return_when=futures.FIRST_EXCEPTION
            )
            self.assertEqual({future1, future2}, finished)
            self.assertEqual({future3}, pending)
            t.join(DEADLINE)
        finally:
            event1.set()
            event2.set()
        future3.result(DEADLINE)

    @in_thread
    def test_first_exception_some_already_complete(self):
        event = self.event()
        successful, cancelled = successful_future(), cancelled_future()
        notified = cancelled_and_notified_future()
        future1 = self.executor.submit(divmod, 21, 0)
        future2 = self.executor.submit(jobs.wait_then, event.path)
        try:
            finished, pending = futures.wait(
                [successful, cancelled, notified, future1, future2],
                timeout=DEADLINE,
                return_when=futures.FIRST_EXCEPTION,
            )
            self.assertEqual({successful, notified, future1}, finished)
            self.assertEqual({cancelled, future2}, pending)
        finally:
            event.set()
        future2.result(DEADLINE)

    @in_thread
    def test_first_exception_one_already_failed(self):
        event = self.event()
        failed = exception_future()
        future1 = self.executor.submit(jobs.wait_then, event.path)
        try:
            finished, pending = futures.wait([failed, future1], return_when=futures.FIRST_EXCEPTION)
            self.assertEqual({failed}, finished)
            self.assertEqual({future1}, pending)
        finally:
            event.set()
        future1.result(DEADLINE)

    @in_thread
    def test_all_completed(self):
        successful, notified, failed = (
            successful_future(),
            cancelled_and_notified_future(),
            exception_future(),
        )
        future1 = self.executor.submit(divmod, 2, 0)
        future2 = self.executor.submit(jobs.mul, 2, 21)
        finished, pending = futures.wait(
            [successful, notified, failed, future1, future2],
            timeout=DEADLINE,
            return_when=futures.ALL_COMPLETED,
        )
        self.assertEqual({successful, notified, failed, future1, future2}, finished)
        self.assertEqual(set(), pending)

    @in_thread
    def test_timeout(self):
        event = self.event()
        notified, failed, successful = (
            cancelled_and_notified_future(),
            exception_future(),
            successful_future(),
        )
        future = self.executor.submit(jobs.wait_then, event.path)
        try:
            finished, pending = futures.wait(
                [notified, failed, successful, future], timeout=0.050, return_when=futures.ALL_COMPLETED
            )
            self.assertEqual({notified, failed, successful}, finished)
            self.assertEqual({future}, pending)
        finally:
            event.set()
        future.result(DEADLINE)


class AsCompletedTests(ContractCase):
    """CPython's C{AsCompletedTests} (those that involve an executor)."""

    @in_thread
    def test_no_timeout(self):
        already = {cancelled_and_notified_future(), exception_future(), successful_future()}
        future1 = self.executor.submit(jobs.mul, 2, 21)
        future2 = self.executor.submit(jobs.mul, 7, 6)
        completed = set(futures.as_completed(already | {future1, future2}, timeout=DEADLINE))
        self.assertEqual(already | {future1, future2}, completed)

    @in_thread
    def test_future_times_out(self):
        """as_completed times out before its last future completes (timeout 0, then short)."""
        already = {cancelled_and_notified_future(), exception_future(), successful_future()}
        for timeout in (0, 0.100):
            event = self.event()
            completed = set()
            future = self.executor.submit(jobs.wait_then, event.path)
            try:
                for f in futures.as_completed(already | {future}, timeout):
                    completed.add(f)
            except futures.TimeoutError:
                pass
            finally:
                event.set()
            self.assertEqual(completed, already)
            future.result(DEADLINE)

    @in_thread
    def test_duplicate_futures(self):
        future1 = self.executor.submit(jobs.sleep_and_return, 0.2, None)
        completed = list(futures.as_completed(itertools.repeat(future1, 3), timeout=DEADLINE))
        self.assertEqual(len(completed), 1)


class ShutdownTests(ContractCase):
    """CPython's C{ExecutorShutdownTest}, and what cw's shutdown promises beyond it."""

    def script(self, source: str):
        """Run a client program against the shared cluster; it gets the address as argv[1]."""
        return run_script(self, source, self.address)

    @in_thread
    def test_run_after_shutdown(self):
        self.executor.shutdown()
        self.assertRaises(RuntimeError, self.executor.submit, pow, 2, 5)

    @in_thread
    def test_interpreter_shutdown(self):
        """A program that ends without shutdown() waits for its pending jobs."""
        done = self.script(
            """
            import sys
            from cw.client import ClusterExecutor
            from cw.test.jobs import sleep_and_return

            t = ClusterExecutor(sys.argv[1])
            f = t.submit(sleep_and_return, 1.0, "apple")
            f.add_done_callback(lambda f: print(f.result(), flush=True))
            """
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, "")
        self.assertEqual(done.stdout.strip(), "apple")

    @in_thread
    def test_submit_after_interpreter_shutdown(self):
        done = self.script(
            """
            import atexit, sys

            @atexit.register
            def run_last():
                try:
                    t.submit(id, None)
                except RuntimeError:
                    print("runtime-error")
                    raise

            from cw.client import ClusterExecutor

            t = ClusterExecutor(sys.argv[1])
            t.submit(id, 42).result(60)
            """
        )
        self.assertIn("RuntimeError: cannot schedule new futures", done.stderr)
        self.assertEqual(done.stdout.strip(), "runtime-error")

    @in_thread
    def test_hang_issue12364(self):
        fs = [self.executor.submit(time.sleep, 0.01) for _ in range(50)]
        self.executor.shutdown()
        for f in fs:
            f.result(DEADLINE)

    @in_thread
    def test_cancel_futures(self):
        fs = [self.executor.submit(time.sleep, 0.1) for _ in range(50)]
        # A thread pool starts its first job at once; a cluster, a moment later.
        wait_until(fs[0].running, what="the first job to be running")
        self.executor.shutdown(cancel_futures=True)
        # Some were cancelled (not all: some were running), the rest finished.
        cancelled = [f for f in fs if f.cancelled()]
        self.assertGreater(len(cancelled), 20)
        others = [f for f in fs if not f.cancelled()]
        for f in others:
            self.assertTrue(f.done(), msg=f"{f._state=}")
            self.assertIsNone(f.exception())
        self.assertGreater(len(others), 0)

    @in_thread
    def test_hang_gh83386(self):
        """shutdown(wait=False) with a running job: the program still waits for it at exit."""
        done = self.script(
            """
            import sys
            from cw.client import ClusterExecutor
            from cw.test.jobs import sleep_and_return

            t = ClusterExecutor(sys.argv[1])
            f = t.submit(sleep_and_return, 1.0, "apple")
            f.add_done_callback(lambda f: print(f.result(), flush=True))
            t.shutdown(wait=False)
            """
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, "")
        self.assertEqual(done.stdout.strip(), "apple")

    @in_thread
    def test_hang_gh94440(self):
        """shutdown(wait=True) does not hang after a future was submitted and cancelled at once."""
        self.executor.submit(int).result(DEADLINE)
        self.executor.submit(int).cancel()
        t = threading.Thread(target=self.executor.shutdown, daemon=True)
        t.start()
        t.join(10)
        self.assertFalse(t.is_alive(), "shutdown(wait=True) hung")

    @in_thread
    def test_cancel_futures_wait_false(self):
        """shutdown(wait=False, cancel_futures=True): the program exits without waiting."""
        done = self.script(
            """
            import sys
            from cw.client import ClusterExecutor
            from cw.test.jobs import sleep_and_return

            t = ClusterExecutor(sys.argv[1])
            f = t.submit(sleep_and_return, 0.1, "apple")
            f.add_done_callback(lambda f: f.cancelled() or print(f.result(), flush=True))
            t.shutdown(wait=False, cancel_futures=True)
            """
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, "")
        self.assertIn(done.stdout.strip(), ["apple", ""])

    @in_thread
    def test_exit_does_not_wait_after_cancel_futures(self):
        """
        After shutdown(wait=False, cancel_futures=True) the program does not
        wait at exit even for a running job (here one that would block for
        two minutes); the master kills that job once the client is gone.
        """
        record = os.path.abspath(self.mktemp())
        done = run_script(
            self,
            """
            import os, sys, time
            from cw.client import ClusterExecutor
            from cw.test.jobs import block_until

            t = ClusterExecutor(sys.argv[1])
            f = t.submit(block_until, sys.argv[2] + ".never", sys.argv[2], 120)
            # Running in its job process, not only handed to a worker: the
            # master may kill it before it starts.  And running to the
            # client too (f.running()): the master's notice of it may come
            # after the job process started (RUNNING_NOTICE_DELAY).
            deadline = time.monotonic() + 60
            while not (os.path.exists(sys.argv[2]) and open(sys.argv[2]).read() and f.running()):
                assert time.monotonic() < deadline, "the job never started"
                time.sleep(0.01)
            t.shutdown(wait=False, cancel_futures=True)
            print("exiting", flush=True)
            """,
            self.address,
            record,
            timeout=DEADLINE,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), "exiting")
        wait_until(lambda: os.path.exists(record) and open(record).read(), what="the job to have started")
        pid = int(open(record).read())
        wait_until(lambda: not process_exists(pid), what="the abandoned job to be killed")

    @in_thread
    def test_shutdown_no_wait_leaves_jobs_running(self):
        """
        shutdown(wait=False) returns at once; the running job goes on, its
        future completes later, and the connection closes after that.
        """
        event = self.event()
        future = self.executor.submit(jobs.wait_then, event.path, "done")
        wait_until(future.running, what="the job to be handed to a worker")
        started = time.monotonic()
        self.executor.shutdown(wait=False)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertFalse(future.done())
        self.assertTrue(self.connected())
        event.set()
        self.assertEqual(future.result(DEADLINE), "done")
        wait_until(lambda: not self.connected(), what="the connection to close once idle")

    def connected(self) -> bool:
        """Whether the master still has this test's executor as a client."""
        cid = self.executor.session.client_id
        return any(c["id"] == cid for c in master_status(self.address)["clients"])

    @in_thread
    def test_running_means_handed_to_a_worker(self):
        """
        A future is running once the master has handed its job to a worker
        (to run, or prefetched), and then it cannot be cancelled; one still
        queued on the master is pending and can be.
        """
        event = self.event()
        fs = [self.executor.submit(jobs.wait_then, event.path) for _ in range(SLOTS + 20)]
        cid = self.executor.session.client_id

        def settled():
            (client,) = [c for c in master_status(self.address)["clients"] if c["id"] == cid]
            running = sum(f.running() for f in fs)
            return client["queued"] + client["running"] == len(fs) and client["running"] == running

        wait_until(settled, what="the client to know which jobs the master handed out")
        running = [f for f in fs if f.running()]
        self.assertGreaterEqual(len(running), SLOTS)
        self.assertFalse(any(f.cancel() for f in running))
        self.assertTrue(all(f.cancel() for f in fs if f not in running))
        event.set()
        self.assertEqual([f.result(DEADLINE) for f in running], [None] * len(running))


class TypedExceptionTests(ContractCase):
    """A job's exception is raised in the client as its own class and as RemoteException."""

    def assertFromJob(self, error: BaseException, cls: type) -> None:
        self.assertIsInstance(error, cls)
        self.assertIsInstance(error, RemoteException)
        self.assertEqual(error.type, cls.__name__)
        self.assertIsNone(error.fallback)
        self.assertIsInstance(error.pid, int)
        self.assertTrue(error.host)
        self.assertIn(f"{cls.__name__}:", error.traceback)

    @in_thread
    def test_builtin_types(self):
        error = self.executor.submit(divmod, 1, 0).exception(DEADLINE)
        self.assertFromJob(error, ZeroDivisionError)
        try:
            self.executor.submit(divmod, 1, 0).result(DEADLINE)
        except ZeroDivisionError as e:
            self.assertIn("remote traceback", str(e))
        missing = os.path.abspath(self.mktemp())
        error = self.executor.submit(open, missing).exception(DEADLINE)
        self.assertFromJob(error, FileNotFoundError)
        self.assertEqual((error.errno, error.filename), (2, missing))
        error = self.executor.submit(int, "x").exception(DEADLINE)
        self.assertFromJob(error, ValueError)
        self.assertEqual(error.args, ("invalid literal for int() with base 10: 'x'",))

    @in_thread
    def test_required_constructor_arguments(self):
        """An exception whose __init__ needs more than its args is rebuilt without calling it."""
        error = self.executor.submit(jobs.raise_needs_two, 1, "b").exception(DEADLINE)
        self.assertFromJob(error, jobs.NeedsTwo)
        self.assertEqual((error.a, error.b, error.args), (1, "b", ("1 and b",)))
        self.assertIs(type(error), type(self.executor.submit(jobs.raise_needs_two, 3, 4).exception(DEADLINE)))

    @in_thread
    def test_class_unknown_to_the_client(self):
        """An exception class only the job process can import: a plain RemoteException saying why."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        error = self.executor.submit(jobs.raise_from_private_module, directory).exception(DEADLINE)
        self.assertIs(type(error), RemoteException)
        self.assertEqual(error.type, "PrivateError")
        self.assertIn("cannot be unpickled in the client", error.fallback)
        self.assertIn("No module named", error.fallback)
        self.assertIn("only the worker knows this class", str(error))
        self.assertIn("raised as RemoteException, not as PrivateError", str(error))

    @in_thread
    def test_class_that_cannot_be_subclassed(self):
        error = self.executor.submit(jobs.raise_no_subclasses).exception(DEADLINE)
        self.assertIs(type(error), RemoteException)
        self.assertIn("cannot be subclassed", error.fallback)
        self.assertIn("NoSubclasses cannot be subclassed", error.fallback)

    @in_thread
    def test_not_an_exception(self):
        """SystemExit and the like are not raised in the client as such."""
        error = self.executor.submit(jobs.sys_exit, 3).exception(DEADLINE)
        self.assertIs(type(error), RemoteException)
        self.assertEqual(error.type, "SystemExit")
        self.assertIn("not an Exception", error.fallback)

    @in_thread
    def test_client_thread_wait(self):
        """ClientThread.wait() raises the same typed exception."""
        with self.assertRaises(ZeroDivisionError) as caught:
            with ClientThread(None, self.address) as client:
                client.submit("j1", divmod, 1, 0)
        self.assertFromJob(caught.exception, ZeroDivisionError)
        self.assertEqual(caught.exception.jobid, "j1")

    @in_thread
    def test_client_thread_asks_no_running_notices(self):
        """
        A ClientThread is a layer over an executor that does not ask the
        master for JobsStarted notices (it never shows a running job; a
        throughput choice), where a ClusterExecutor does.
        """
        with ClientThread(None, self.address) as client:
            self.assertIsNone(client.session.on_started)
        self.assertIsNotNone(self.executor.session.on_started)

    @in_thread
    def test_outstanding(self):
        """outstanding() lists the futures not done yet, in the order submitted."""
        flag = self.event()
        blocked = [self.executor.submit(jobs.block_until, flag.path) for _ in range(2)]
        self.assertEqual(self.executor.submit(pow, 2, 5).result(DEADLINE), 32)
        self.assertEqual(self.executor.outstanding(), blocked)
        self.assertEqual(self.executor.kill(*self.executor.outstanding()), 2)
        self.assertEqual(self.executor.outstanding(), [])

    @in_thread
    def test_outstanding_leaves_out_a_job_just_finished(self):
        """
        A future whose result was just set is not outstanding, even in the
        moment before the executor forgets it (a caller woken by its result
        may ask at once).
        """
        seen = []
        jobs_table = self.executor._jobs
        forget = jobs_table.forget

        def forget_and_look(seq):
            seen.append(self.executor.outstanding())
            return forget(seq)

        jobs_table.forget = forget_and_look
        self.addCleanup(setattr, jobs_table, "forget", forget)
        future = self.executor.submit(pow, 2, 5)
        self.assertEqual(future.result(DEADLINE), 32)
        wait_until(lambda: seen, what="the executor to forget the job")
        self.assertEqual(seen, [[]])

    @in_thread
    def test_class_defined_in_main(self):
        """A client program's own exception class travels by value and is caught by name."""
        done = run_script(
            self,
            """
            import sys
            from cw.client import ClusterExecutor, RemoteException

            class Mine(Exception):
                def __init__(self, code):
                    super().__init__(f"code {code}")
                    self.code = code

            def job():
                raise Mine(7)

            with ClusterExecutor(sys.argv[1]) as ex:
                try:
                    ex.submit(job).result(60)
                except Mine as e:
                    assert isinstance(e, RemoteException), type(e).__mro__
                    print("caught", e.code, e.args[0], type(e).__name__)
            """,
            self.address,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), "caught 7 code 7 RemoteException(__main__.Mine)")


class OriginalClientTests(ContractCase):
    """The original's lower-level client classes, kept: Client and BaseClientThread."""

    @in_thread
    def test_base_client_thread(self):
        """
        BaseClientThread calls back with (jobid, success, result) for every
        job, failures included (and wait() does not raise them again);
        start_job submits, stop disconnects, connection_ready runs once.
        """
        got = {}
        ready = []

        class Thread(BaseClientThread):
            def connection_ready(self):
                ready.append(self.session.client_id)

        client = Thread(lambda jobid, ok, result: got.setdefault(jobid, (ok, result)), self.address)
        self.assertIsInstance(client, Client)
        client.start()
        try:
            client.start_job("good", pow, 2, 5)
            client.start_job("bad", divmod, 1, 0)
            client.wait(DEADLINE)
        finally:
            client.stop()
        self.assertEqual(len(ready), 1)
        self.assertEqual(got["good"], (True, 32))
        self.assertFalse(got["bad"][0])
        self.assertIsInstance(got["bad"][1], ZeroDivisionError)
        self.assertIsInstance(got["bad"][1], RemoteException)
