"""
Job processes cannot escape (L{cw.worker.containment}): what a job starts dies
with it on a timeout, a cancel, a crash or a normal return, a job process
dies with its worker, and a worker that lost its master kills its running
jobs (with --keep-results, once it has a master again).  Real twistd
master and worker processes over TCP on loopback; every process a job
starts is found by the pid the job records, and killed in the cleanup if
it survived.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClusterExecutor
from cw.errors import JobCrashed, JobTimeout, WorkerLost
from cw.test.jobs import start_sleeps, worker_pid
from cw.test.procs import Processes, executor, process_exists, wait_until

#: Seconds within which a killed process must be gone.
GONE_WITHIN = 5


def terminated_midway() -> str:
    """
    As SLURM's walltime warning does (it signals every process of the
    job step): SIGTERM to this job process and to its worker, then finish.
    """
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(1)
    return "finished"


class ContainmentTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.record = os.path.abspath(self.mktemp())

    def recorded(self) -> dict:
        """
        Wait for the job to record its pids (see L{start_sleeps}): C{"job"},
        C{"group"} (two in its process group), C{"outside"} (two that left
        it), and C{"all"}; each is killed in the cleanup if still there.
        """
        wait_until(lambda: os.path.exists(self.record), timeout=30, what="the job to start its processes")
        with open(self.record) as f:
            pids = json.load(f)
        pids["all"] = [pids["job"], *pids["group"], *pids["outside"]]
        for pid in pids["all"]:
            self.addCleanup(kill_if_alive, pid)
        return pids

    def assertGone(self, pids: list[int], what: str) -> None:
        wait_until(
            lambda: not any(process_exists(pid) for pid in pids),
            timeout=GONE_WITHIN,
            what=f"{what} ({pids}) to be gone",
        )

    def test_timeout_kills_what_the_job_started(self):
        """
        A job with C{timeout=2} that starts C{sleep 300} processes (in its
        group, in a session of their own, daemonized) and forks, then
        hangs: C{JobTimeout} within 10 s although they hold its pipes, they
        are all gone, and the next job runs on that slot.
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                # The job process is up and warm: the timeout counts from
                # when the job reaches it.
                self.assertEqual(ex.submit(worker_pid).result(30), worker.pid)
                began = time.monotonic()
                future = ex.submit_with(start_sleeps, (self.record, "hang"), timeout=2)
                pids = self.recorded()["all"]
                self.assertIsInstance(future.exception(10), JobTimeout)
                self.assertLess(time.monotonic() - began, 10)
                self.assertGone(pids, "the job process and what it started")
                self.assertEqual(ex.submit(worker_pid).result(30), worker.pid)

        return threads.deferToThread(body)

    def test_return_kills_what_the_job_left(self):
        """
        A job that returns after starting background processes (in its
        group, in a session of their own, daemonized, forked): all are
        gone, the worker's log says so, and its job process lives on.
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                returned = ex.submit(start_sleeps, self.record).result(30)
                pids = self.recorded()
                self.assertEqual(returned["group"] + returned["outside"], pids["group"] + pids["outside"])
                self.assertGone(pids["group"] + pids["outside"], "the processes the job left")
                self.assertTrue(process_exists(pids["job"]), "the job process was killed too")
            wait_until(
                lambda: "killed 4 process(es) that job 1 of client" in self.procs.log_tail(worker, 200),
                timeout=GONE_WITHIN,
                what="the worker to log the killed leftovers",
            )

        return threads.deferToThread(body)

    def test_job_survives_sigterm_while_worker_drains(self):
        """
        SIGTERM to the job process and its worker at once (SLURM's
        --signal, scancel --signal=TERM): the job runs to its end and its
        result arrives, and the worker then exits.
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(terminated_midway).result(30), "finished")
            wait_until(lambda: worker.poll() is not None, timeout=30, what="the worker to exit")

        return threads.deferToThread(body)

    def test_kill_kills_what_the_job_started(self):
        """Killing a running job (C{ClusterExecutor.kill}) kills its process and all it started."""

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                future = ex.submit(start_sleeps, self.record, "hang")
                pids = self.recorded()["all"]
                wait_until(future.running, timeout=10, what="the future to be running")
                self.assertEqual(ex.kill(future), 1)
                self.assertGone(pids, "the job process and what it started")
                self.assertEqual(ex.submit(worker_pid).result(30), worker.pid)

        return threads.deferToThread(body)

    def test_crash_not_held_by_pipes(self):
        """
        A job process that dies by itself while a process it started in a
        session of its own holds its pipes: the crash is reported within
        10 s (the worker watches the process, not its pipes), what was left
        in its group is killed, and the slot runs the next job.  (The
        processes outside its group survive: the README says so.)
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                began = time.monotonic()
                future = ex.submit_with(start_sleeps, (self.record, "die"), max_attempts=1)
                pids = self.recorded()
                self.assertIsInstance(future.exception(10), JobCrashed)
                self.assertLess(time.monotonic() - began, 10)
                self.assertGone([pids["job"], *pids["group"]], "the job process and its group")
                self.assertEqual(ex.submit(worker_pid).result(30), worker.pid)

        return threads.deferToThread(body)

    def test_job_process_dies_with_its_worker(self):
        """
        SIGKILL a worker with a running job: its job process is gone within
        5 s, and so are the processes the job started in its group (a
        forked one included).  (Those outside its group survive: the README
        says so.)
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            ex = ClusterExecutor(self.procs.address)
            try:
                ex.submit(start_sleeps, self.record, "hang")
                pids = self.recorded()
                os.kill(worker.pid, signal.SIGKILL)
                self.assertGone([pids["job"], *pids["group"]], "the killed worker's job and its group")
            finally:
                ex.shutdown(wait=False, cancel_futures=True)

        return threads.deferToThread(body)

    def test_stopped_worker_kills_its_jobs_on_resuming(self):
        """
        A worker stopped (SIGSTOP) past the master's heartbeat timeout: the
        master gives its job up (or runs it elsewhere) while its job
        process runs on; once resumed, the worker finds its master
        connection gone, rejoins, and kills that job process with all it
        started (its result would come too late: it was given up).
        """

        def body():
            address = self.procs.start_master("--heartbeat", "0.5", "--heartbeat-timeout", "2")
            frozen = self.procs.start_worker(1)
            self.addCleanup(resume, frozen.pid)
            with executor(address) as ex:
                future = ex.submit_with(start_sleeps, (self.record, "hang"), max_attempts=1)
                pids = self.recorded()
                os.kill(frozen.pid, signal.SIGSTOP)
                self.assertIsInstance(future.exception(30), WorkerLost)
                self.assertTrue(process_exists(pids["job"]), "the job process ran on meanwhile")
                os.kill(frozen.pid, signal.SIGCONT)
                self.assertGone(pids["all"], "the resumed worker's job process and what it started")
                # It rejoins the master, its slot free.
                self.assertEqual(ex.submit(worker_pid).result(30), frozen.pid)

        return threads.deferToThread(body)


class LostMasterTests(unittest.SynchronousTestCase):
    """A worker that loses its master connection kills its running jobs (without processes)."""

    def test_running_jobs_killed_queued_dropped(self):
        from twisted.internet.task import Clock

        from cw.test.master.test_master_faults import FakeMasterLink, FakePool
        from cw.wire import commands as P
        from cw.worker.service import Worker

        pool = FakePool()
        worker = Worker(pool, 1, clock=Clock(), keep_results=0)
        link = worker.proto = FakeMasterLink()
        worker.enqueue([P.Job(5, seq, b"p") for seq in (1, 2)])
        worker.disconnected(link)
        self.assertEqual(pool.killed, 1)
        self.assertEqual(len(pool.calls), 1, "the queued job was not started")
        self.assertEqual(link.of(P.JobResults), [], "no result is sent for a killed job")

    def test_running_jobs_run_on_until_a_master_is_back(self):
        """With --keep-results (the default) the running job goes on, and is killed once a master is back."""
        from twisted.internet.task import Clock

        from cw.test.master.test_master_faults import FakeMasterLink, FakePool
        from cw.wire import commands as P
        from cw.worker.service import Worker

        pool = FakePool()
        worker = Worker(pool, 1, clock=Clock())
        link = worker.proto = FakeMasterLink()
        worker.enqueue([P.Job(5, seq, b"p") for seq in (1, 2)])
        worker.disconnected(link)
        self.assertEqual(pool.killed, 0)
        self.assertEqual(len(pool.calls), 1, "the queued job was not started")
        link.getPeer = lambda: "master"
        worker.connected(link, 2)
        self.assertEqual(pool.killed, 1)


def resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def kill_if_alive(pid: int) -> None:
    """SIGKILL C{pid} if a process a test recorded is still there (cleanup)."""
    if process_exists(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
