"""
Tests for L{cw.worker.pool} and the worker's handling of jobs whose process dies:
a real L{cw.worker.service.Worker} runs jobs in real job processes (a L{JobPool} of
L{cw.worker.child.JobChild}); only its master connection is replaced by a recorder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import cloudpickle
from twisted.internet import defer, reactor
from twisted.trial import unittest

from cw.test.jobs import allocate, exit_with, segfault, sys_exit
from cw.test.procs import process_exists
from cw.wire import commands as P
from cw.wire import pickling
from cw.worker.child import JobChild
from cw.worker.pool import BatchCall, JobPool, describe_jobs
from cw.worker.service import JobStarter, Worker, job_process_env

#: Upper bound, in seconds, for a batch of jobs in these tests.
DEADLINE = 60


def pid():
    return os.getpid()


_kept = []


def grow(mib):
    """Keep C{mib} MiB alive in this process (touched, so it is resident)."""
    _kept.append(b"x" * (mib << 20))
    return os.getpid()


def sleep(seconds):
    time.sleep(seconds)
    return os.getpid()


class RecordingProtocol:
    """Stands in for the master connection: records result batches."""

    def __init__(self) -> None:
        self.results: dict[int, P.Result] = {}
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def callRemote(self, command, results):
        assert command is P.JobResults
        for result in results:
            assert result.seq not in self.results, f"result for job {result.seq} delivered twice"
            self.results[result.seq] = result
        ready = [d for count, d in self._waiters if len(self.results) >= count]
        self._waiters = [(count, d) for count, d in self._waiters if d not in ready]
        for d in ready:
            d.callback(self.results)

    def wait_for(self, count: int) -> defer.Deferred:
        d = defer.Deferred()
        self._waiters.append((count, d))
        self.callRemote(P.JobResults, [])
        return d.addTimeout(DEADLINE, reactor)


class PoolHarness:
    """
    A test case's real L{Worker} with real job processes, its master
    connection a L{RecordingProtocol} (C{self.proto}).
    """

    def make_worker(self, procs: int = 1, memory_limit: int = 0, recycle_memory: int = 0) -> Worker:
        pool = JobPool(
            JobChild,
            min=procs,
            max=procs,
            maxIdle=3600,
            recycleAfter=0,
            starter=JobStarter(job_process_env(), reactor),
            ampChildArgs=(str(memory_limit << 20),),
            max_rss=recycle_memory << 20,
            clock=reactor,
        )
        self.pids: set[int] = set()
        self.addCleanup(self._kill_leftovers)
        self.addCleanup(lambda: pool.stop().addTimeout(30, reactor))
        pool.start()
        worker = Worker(pool, procs, reactor)
        worker.proto = self.proto = RecordingProtocol()
        self.seq = 0
        return worker

    def _kill_leftovers(self):
        for child_pid in self.pids:
            if process_exists(child_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child_pid, signal.SIGKILL)

    def run_jobs(self, worker: Worker, calls, **options) -> defer.Deferred:
        """Run C{(func, *args)} calls; fire with their results in order."""
        first = self.seq + 1
        jobs = []
        for func, *args in calls:
            self.seq += 1
            payload = cloudpickle.dumps((func, tuple(args), {}))
            jobs.append(P.Job(1, self.seq, payload, P.encode_options(**options)))
        worker.enqueue(jobs)
        for link in worker.pool.processes:
            if link.pid:
                self.pids.add(link.pid)

        def collect(results):
            out = [results[s] for s in range(first, self.seq + 1)]
            for r in out:
                if r.status == P.Outcome.OK:
                    value = pickling.loads(r.payload)
                    if isinstance(value, int):
                        self.pids.add(value)
            return out

        return self.proto.wait_for(self.seq).addCallback(collect)

    @defer.inlineCallbacks
    def assert_serves_normally(self, worker, count=100):
        """The worker still runs C{count} ordinary jobs; return their pids."""
        results = yield self.run_jobs(worker, [(pid,)] * count)
        self.assertEqual({r.status for r in results}, {P.Outcome.OK})
        return {pickling.loads(r.payload) for r in results}

    @defer.inlineCallbacks
    def crash_then_serve(self, calls, **worker_options):
        worker = self.make_worker(**worker_options)
        (before,) = yield self.assert_serves_normally(worker, 1)
        (result,) = yield self.run_jobs(worker, calls)
        after = yield self.assert_serves_normally(worker)
        self.assertEqual(worker.running, 0)
        return before, result, after


class PoolTests(PoolHarness, unittest.TestCase):
    """Jobs that kill, exit, overrun or bloat their process."""

    timeout = 120

    @defer.inlineCallbacks
    def test_segfault(self):
        """A job killed by SIGSEGV reports the signal; a fresh process serves on."""
        before, result, after = yield self.crash_then_serve([(segfault,)])
        self.assertEqual(result.status, P.Outcome.CRASHED)
        report = P.read_error_report(result.payload)
        self.assertEqual(report["type"], "JobProcessDied")
        self.assertEqual(report["signal"], signal.SIGSEGV)
        self.assertIn("signal 11 (SIGSEGV)", report["message"])
        self.assertEqual(len(after), 1)
        self.assertNotIn(before, after)

    @defer.inlineCallbacks
    def test_os_exit_nonzero(self):
        """os._exit(3) reports exit code 3; a fresh process serves on."""
        before, result, after = yield self.crash_then_serve([(exit_with, 3)])
        self.assertEqual(result.status, P.Outcome.CRASHED)
        report = P.read_error_report(result.payload)
        self.assertEqual(report["exit_code"], 3)
        self.assertIn("exited with code 3", report["message"])
        self.assertNotIn(before, after)

    @defer.inlineCallbacks
    def test_os_exit_zero(self):
        """
        os._exit(0) mid-job is a crash too, and the dead process is never
        handed the next job (ampoule alone would do that and shrink the pool).
        """
        worker = self.make_worker(procs=2)
        results = yield self.run_jobs(worker, [(exit_with, 0), (exit_with, 0)] + [(pid,)] * 100)
        for result in results[:2]:
            self.assertEqual(result.status, P.Outcome.CRASHED)
            self.assertIn("exited with code 0", P.read_error_report(result.payload)["message"])
        self.assertEqual({r.status for r in results[2:]}, {P.Outcome.OK})
        pids = yield self.assert_serves_normally(worker)
        self.assertEqual(len(worker.pool.processes), 2)
        self.assertLessEqual(len(pids), 2)

    @defer.inlineCallbacks
    def test_sys_exit(self):
        """sys.exit(0) in a job is an exception; the same process serves on."""
        before, result, after = yield self.crash_then_serve([(sys_exit, 0)])
        self.assertEqual(result.status, P.Outcome.RAISED)
        self.assertEqual(P.read_error_report(result.payload)["type"], "SystemExit")
        self.assertEqual(after, {before})

    @defer.inlineCallbacks
    def test_memory_limit(self):
        """
        A job that allocates past the job processes' memory limit gets a
        MemoryError; its process is replaced (it may be damaged).
        """
        before, result, after = yield self.crash_then_serve([(allocate, 4096)], memory_limit=1024)
        self.assertEqual(result.status, P.Outcome.RAISED)
        self.assertEqual(P.read_error_report(result.payload)["type"], "MemoryError")
        self.assertEqual(len(after), 1)
        self.assertNotIn(before, after)

    @defer.inlineCallbacks
    def test_within_memory_limit(self):
        """Jobs below the memory limit run normally."""
        worker = self.make_worker(memory_limit=1024)
        (result,) = yield self.run_jobs(worker, [(allocate, 64)])
        self.assertEqual(result.status, P.Outcome.OK)

    @defer.inlineCallbacks
    def test_timeout(self):
        """A job past its timeout is killed and reported; the slot is reused."""
        worker = self.make_worker()
        started = time.monotonic()
        (result,) = yield self.run_jobs(worker, [(sleep, 3600)], timeout=0.5)
        self.assertLess(time.monotonic() - started, 30)
        self.assertEqual(result.status, P.Outcome.CRASHED)
        report = P.read_error_report(result.payload)
        self.assertEqual(report["type"], "JobTimeout")
        self.assertEqual(report["timeout"], 0.5)
        self.assertIn("timeout of 0.5 s", report["message"])
        yield self.assert_serves_normally(worker)

    @defer.inlineCallbacks
    def test_worker_default_timeout(self):
        """The worker's job_timeout applies to jobs without their own."""
        worker = self.make_worker()
        # Long enough for sleep(0) in a loaded machine's fresh job process.
        worker.job_timeout = 3
        results = yield self.run_jobs(worker, [(sleep, 3600), (sleep, 0)])
        self.assertEqual(P.read_error_report(results[0].payload)["type"], "JobTimeout")
        self.assertEqual(results[1].status, P.Outcome.OK)

    @defer.inlineCallbacks
    def test_job_timeout_overrides_default(self):
        """A job's own timeout wins over the worker's default."""
        worker = self.make_worker()
        worker.job_timeout = 0.5
        (result,) = yield self.run_jobs(worker, [(sleep, 1.5)], timeout=60)
        self.assertEqual(result.status, P.Outcome.OK)

    @defer.inlineCallbacks
    def test_malformed_timeout_ignored(self):
        """A timeout option of the wrong type falls back to the worker's default."""
        worker = self.make_worker()
        worker.job_timeout = 0.5
        payload = cloudpickle.dumps((sleep, (3600,), {}))
        self.seq += 1
        worker.enqueue([P.Job(1, self.seq, payload, b'{"timeout": "soon"}')])
        results = yield self.proto.wait_for(self.seq)
        self.assertEqual(P.read_error_report(results[self.seq].payload)["type"], "JobTimeout")

    @defer.inlineCallbacks
    def test_recycle_memory(self):
        """A process whose resident size passes the limit is replaced after its job."""
        worker = self.make_worker(recycle_memory=200)
        first = yield self.run_jobs(worker, [(grow, 10)])
        second = yield self.run_jobs(worker, [(grow, 300)])
        third = yield self.run_jobs(worker, [(pid,)])
        pids = [cloudpickle.loads(r[0].payload) for r in (first, second, third)]
        self.assertEqual(pids[0], pids[1])
        self.assertNotEqual(pids[1], pids[2])


class TimeoutStartTests(unittest.SynchronousTestCase):
    """
    A job's timeout counts from when its job process is up (has answered
    its first box), not while the process is still starting: a job with a
    timeout is held until then.
    """

    def setUp(self):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from cw.worker.pool import ChildLink

        self.clock = Clock()
        self.link = ChildLink()
        self.link.clock = self.clock
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)

    def sent(self) -> list:
        from twisted.protocols import amp

        return amp.parseString(self.transport.value())

    def answer_first_box(self):
        from twisted.protocols import amp

        self.link.dataReceived(amp.AmpBox(_answer=self.sent()[0][b"_ask"], response=b"").serialize())

    def test_held_until_process_is_up(self):
        from ampoule.commands import Echo

        self.link.callRemote(Echo, data=b"job", _cw_call=BatchCall(timeout=1))
        self.clock.advance(10)
        self.assertIsNone(self.link.timed_out, "timed out while the process was starting")
        self.assertEqual(len(self.sent()), 1, "the job was sent before the process was up")
        self.answer_first_box()
        self.assertEqual(self.sent()[1][b"data"], b"job")
        self.clock.advance(0.9)
        self.assertIsNone(self.link.timed_out)
        self.clock.advance(0.2)
        self.assertEqual(self.link.timed_out, 1)

    def test_sent_at_once_when_up(self):
        from ampoule.commands import Echo

        self.answer_first_box()
        self.link.callRemote(Echo, data=b"job", _cw_call=BatchCall(timeout=1))
        self.assertEqual(self.sent()[1][b"data"], b"job")
        self.clock.advance(1.1)
        self.assertEqual(self.link.timed_out, 1)

    def test_held_call_fails_if_process_dies(self):
        from ampoule.commands import Echo
        from twisted.internet.error import ProcessTerminated
        from twisted.python.failure import Failure

        d = self.link.callRemote(Echo, data=b"job", _cw_call=BatchCall(timeout=1))
        self.link.connectionLost(Failure(ProcessTerminated(signal=9)))
        self.failureResultOf(d, ProcessTerminated)


class BatchCallTests(unittest.SynchronousTestCase):
    """
    A L{BatchCall} is the one object a call carries through the pool: it
    holds the call's link while the call runs, so that it can be cancelled,
    and withdraws a call that has not reached a job process.
    """

    def setUp(self):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from cw.worker.pool import ChildLink

        self.link = ChildLink()
        self.link.clock = Clock()
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)

    def sent(self) -> list:
        from twisted.protocols import amp

        return amp.parseString(self.transport.value())

    def test_withdrawn_call_never_sent(self):
        from ampoule.commands import Echo

        from cw.worker.pool import JobWithdrawn

        call = BatchCall()
        call.cancel(withdraw=True)
        self.failureResultOf(self.link.callRemote(Echo, data=b"job", _cw_call=call), JobWithdrawn)
        self.assertEqual(len(self.sent()), 1, "only the first box (is the process up?) was sent")
        self.assertFalse(self.link.cancelled, "the child itself is unharmed")

    def test_cancel_reaches_the_running_child(self):
        from ampoule.commands import Echo

        call = BatchCall()
        self.link.callRemote(Echo, data=b"job", _cw_call=call)
        self.assertIs(call.link, self.link)
        call.cancel(withdraw=False)
        self.assertTrue(self.link.cancelled)

    def test_late_cancel_spares_the_next_job(self):
        from ampoule.commands import Echo
        from twisted.protocols import amp

        call = BatchCall()
        d = self.link.callRemote(Echo, data=b"job", _cw_call=call)
        box = self.sent()[1]
        self.link.dataReceived(amp.AmpBox(_answer=box[b"_ask"], response=b"job").serialize())
        self.successResultOf(d)
        self.assertIsNone(call.link)
        call.cancel(withdraw=False)
        self.assertFalse(self.link.cancelled)

    def test_notices_expected_only_from_jobs_that_stream_output(self):
        """
        The job process's connector reads its output pipe ahead of an
        answer only for a batch with a job that streams its output (echo,
        log): no read that finds nothing after every other job's result.
        """
        self.link.dataReceived(amp_answer(self.sent()[0]))  # the process is up
        plain = P.Job(1, 1, b"p", P.encode_options(timeout=5))
        echoed = P.Job(1, 2, b"p", P.encode_options(echo=True))
        for jobs, expected in (([plain], False), ([plain, echoed], True), ([P.Job(1, 3, b"p")], False)):
            self.link.callRemote(P.RunBatch, jobs=jobs, _cw_call=BatchCall())
            self.assertIs(self.transport.notices_expected, expected, jobs)
            self.link.dataReceived(amp_answer(self.sent()[-1], results=P.encode_results([])))


def amp_answer(box, **values: bytes) -> bytes:
    """The serialized answer to C{box} (an AMP box sent), with C{values}."""
    from twisted.protocols import amp

    return amp.AmpBox(_answer=box[b"_ask"], **values).serialize()


class DescribeJobsTests(unittest.SynchronousTestCase):
    """L{describe_jobs}: how a worker's log names the jobs of a job process it killed."""

    def test_names(self):
        self.assertEqual(describe_jobs([(2, 5)]), "job #5 of client 2")
        self.assertEqual(
            describe_jobs([(2, 5), (2, 6), (3, 1)]), "jobs #5, #6 of client 2; job #1 of client 3"
        )
        self.assertEqual(
            describe_jobs([(2, i) for i in range(1, 9)]), "jobs #1, #2, #3, #4, #5 and 3 more of client 2"
        )
        self.assertEqual(describe_jobs([]), "its job")
