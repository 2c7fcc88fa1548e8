"""
End-to-end tests of stopping a worker whose job processes never answer
(stopped with SIGSTOP, or not reading their pipe): it still exits within
C{--drain-timeout} plus L{cw.core.config.STOP_BOUND} seconds, their
processes killed by PID, and the job that was running runs again on
another worker, against real C{twistd cw-master} and C{twistd cw-worker}
processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

from cw.core.config import STOP_BOUND
from cw.system import proc_stat, sigkill
from cw.test.jobs import wait_for_file
from cw.test.procs import DEADLINE, Processes, executor, job_processes, process_exists, wait_until

#: How twistd exits after SIGTERM once its services stopped (see test_stop_e2e).
STOPPED = (0, -signal.SIGTERM, -signal.SIGINT)


def big_after(flag, started, done, size):
    """
    Touch C{started}; wait for C{flag}; touch C{done}; return C{size}
    bytes (not lent: the test's worker has no machine identity).
    """
    Path(started).touch()
    wait_for_file(flag)
    Path(done).touch()
    return os.urandom(size)


def unsent_bytes(pid: int) -> int:
    """Bytes in the kernel's send queues of the TCP sockets of process C{pid} (0 if none)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                total += int(fields[4].split(":")[0], 16)
    return total


def pid_then_wait(started, flag):
    """Write this job process's pid to C{started}, wait for C{flag}; return the worker's pid."""
    Path(started + ".tmp").write_text(str(os.getpid()))
    os.rename(started + ".tmp", started)
    return wait_for_file(flag)


class HungJobProcessTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.flag = os.path.abspath(self.mktemp())

    def stop(self, pid: int) -> None:
        """SIGSTOP job process C{pid}; SIGKILL it (and its group) in cleanup, whatever happens."""
        self.addCleanup(sigkill, pid, True)
        self.addCleanup(sigkill, pid)
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: _state(pid) == "T", timeout=10, what=f"job process {pid} to stop")

    def exits_in_bound(self, worker: subprocess.Popen, signals, drain_timeout: float) -> float:
        """
        Send C{signals} to C{worker} (the second and later once it said it
        drained); check that it exits within C{drain_timeout} plus
        L{STOP_BOUND} seconds of the first; return how long it took.
        """
        started = time.monotonic()
        worker.send_signal(signals[0])
        for signum in signals[1:]:
            wait_until(
                lambda: "Drained" in Path(worker.log).read_text(errors="replace"),
                timeout=drain_timeout + STOP_BOUND,
                what="the worker to drain",
            )
            worker.send_signal(signum)
        try:
            status = worker.wait(drain_timeout + STOP_BOUND)
        except subprocess.TimeoutExpired:
            self.fail(
                f"the worker did not exit within {drain_timeout + STOP_BOUND:g} s of"
                f" {signals[0]!r}; its log:\n{self.procs.log_tail(worker)}"
            )
        took = time.monotonic() - started
        self.assertIn(status, STOPPED)
        log = Path(worker.log).read_text(errors="replace")
        self.assertNotIn("Traceback", log)
        for signum in signals[1:]:
            self.assertIn(f"Received {signum.name} while stopping", log)
        self.procs.workers.remove(worker)
        return took

    def idle_stopped(self, signals):
        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(2, True, "--drain-timeout", "1")
            children = _both_children(worker)
            for pid in children:
                self.stop(pid)
            self.exits_in_bound(worker, signals, 1)
            _all_gone(children)

        return threads.deferToThread(body)

    def test_idle_stopped_sigterm(self):
        """
        SIGTERM on a worker whose idle job processes are stopped (SIGSTOP):
        it drains at once, they never answer its request to stop, and it
        kills them and exits within the bound.
        """
        return self.idle_stopped([signal.SIGTERM])

    def test_idle_stopped_sigint(self):
        """The same with SIGINT (^C)."""
        return self.idle_stopped([signal.SIGINT])

    def test_idle_stopped_second_sigterm(self):
        """
        A second SIGTERM while it waits for its job processes changes
        nothing but a line in its log (no traceback): the same bound.
        """
        return self.idle_stopped([signal.SIGTERM, signal.SIGTERM])

    def test_idle_stopped_sigint_then_sigterm(self):
        """The same with ^C, then SIGTERM."""
        return self.idle_stopped([signal.SIGINT, signal.SIGTERM])

    def test_busy_stopped(self):
        """
        SIGTERM on a worker whose job process is stopped in the middle of a
        job, and whose other job process is stopped idle: it exits within
        the bound, and the job runs again on another worker, counting no
        attempt (max_attempts=1).
        """

        def body():
            address = self.procs.start_master()
            stopping = self.procs.start_worker(2, True, "--drain-timeout", "1")
            with executor(address) as ex:
                started_file = os.path.abspath(self.mktemp())
                future = ex.submit_with(pid_then_wait, (started_file, self.flag), max_attempts=1)
                wait_until(lambda: os.path.exists(started_file), what="the job to start")
                busy = int(Path(started_file).read_text())
                children = _both_children(stopping)
                self.assertIn(busy, children)
                for pid in children:
                    self.stop(pid)
                self.exits_in_bound(stopping, [signal.SIGTERM], 1)
                _all_gone(children)
                other = self.procs.start_worker(1)
                Path(self.flag).touch()
                self.assertEqual(future.result(60), other.pid)

        return threads.deferToThread(body)


class StoppedMasterTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_full_send_buffer(self):
        """
        SIGTERM on a worker whose master is stopped (SIGSTOP) while the
        worker has results to send (32 MB through the socket, more than its
        buffers hold): the worker cannot deliver them, and still exits
        within C{--drain-timeout} plus L{STOP_BOUND} seconds; once the
        master runs again, the jobs run again on another worker.
        """
        flag = os.path.abspath(self.mktemp())
        started = [os.path.abspath(self.mktemp()) for _ in range(2)]
        done = [os.path.abspath(self.mktemp()) for _ in range(2)]

        def body():
            address = self.procs.start_master()
            master = self.procs.master
            worker = self.procs.start_worker(
                2, True, "--drain-timeout", "1", env={"CW_MACHINE_IDENTITY": "none"}
            )
            with executor(address) as ex:
                futures = [
                    ex.submit(big_after, flag, *paths, 16 << 20) for paths in zip(started, done, strict=True)
                ]
                wait_until(lambda: all(os.path.exists(path) for path in started), what="the jobs to start")
                os.kill(master.pid, signal.SIGSTOP)
                self.addCleanup(_resume, master.pid)
                wait_until(lambda: _state(master.pid) == "T", timeout=10, what="the master to stop")
                Path(flag).touch()
                wait_until(lambda: all(os.path.exists(path) for path in done), what="the jobs to finish")
                wait_until(lambda: unsent_bytes(worker.pid) > 0, what="bytes stuck in the worker's socket")
                signalled = time.monotonic()
                worker.send_signal(signal.SIGTERM)
                bound = 1 + STOP_BOUND
                try:
                    status = worker.wait(bound)
                except subprocess.TimeoutExpired:
                    self.fail(
                        f"the worker did not exit within {bound:g} s of SIGTERM; its log:\n"
                        + self.procs.log_tail(worker)
                    )
                self.assertIn(status, STOPPED)
                self.procs.workers.remove(worker)
                log = Path(worker.log).read_text(errors="replace")
                self.assertNotIn("Traceback", log)
                self.assertIn("did not take", log)
                self.assertLess(time.monotonic() - signalled, bound)
                # The master runs the jobs again elsewhere: their results come.
                _resume(master.pid)
                self.procs.start_worker(2, True, env={"CW_MACHINE_IDENTITY": "none"})
                self.assertEqual([len(future.result(DEADLINE)) for future in futures], [16 << 20] * 2)

        return threads.deferToThread(body)


def _resume(pid: int) -> None:
    """SIGCONT process C{pid}, if it still exists."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _both_children(worker: subprocess.Popen) -> list[int]:
    """The pids of the two job processes of C{worker}, once both are up."""
    return wait_until(lambda: len(job_processes(worker.pid)) == 2 and job_processes(worker.pid))


def _all_gone(pids: list[int]) -> None:
    """Wait (10 s at most) until none of C{pids} is alive: the worker killed them."""
    wait_until(lambda: not any(process_exists(pid) for pid in pids), timeout=10, what=f"{pids} to die")


def _state(pid: int) -> str:
    """The state letter of process C{pid} (C{T}: stopped), or empty if it is gone."""
    fields = proc_stat(pid)
    return fields[0] if fields else ""
