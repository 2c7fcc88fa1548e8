"""
End-to-end fault tests (issue 4): jobs that crash, overrun or kill their
worker, and workers that freeze, against a real C{twistd cw-master} and real
C{twistd cw-worker} processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import wait as futures_wait

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread, master_status
from cw.errors import JobCrashed, JobTimeout, RemoteException, WorkerLost
from cw.test.jobs import (
    allocate,
    exit_with,
    kill_myself,
    segfault,
    square,
    sys_exit,
    wait_for_file,
    worker_pid,
)
from cw.test.procs import DEADLINE, Processes, child_env, executor, stop_process, wait_until


def kill_my_worker():
    """Kill the worker running this job (the job process's parent), then exit."""
    parent = os.getppid()
    os.kill(parent, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(1)


def short_job(x):
    """Take 1 to 5 ms; return C{x}."""
    time.sleep(0.001 * (1 + x % 5))
    return x


#: The --heartbeat-timeout of the tests of quiet workers, and the slack they
#: allow on top of it (for the poll and a busy 2-core machine).
HEARTBEAT_TIMEOUT = 2
LOST_MARGIN = 2.5


class FaultTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_crashing_jobs(self):
        """
        A segfault, a SIGKILL, os._exit(3), os._exit(0), sys.exit(0) and an
        allocation past the worker's memory limit each give their own clear
        error; the same worker then runs 100 normal jobs.
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1, True, "--memory-limit", "1024")
            with executor(self.procs.address) as ex:
                error = ex.submit(segfault).exception(60)
                self.assertIsInstance(error, JobCrashed)
                self.assertIn("signal 11 (SIGSEGV)", str(error))
                self.assertIn(f"pid {worker.pid}", str(error))
                self.assertTrue(error.host)

                error = ex.submit(kill_myself).exception(60)
                self.assertIsInstance(error, JobCrashed)
                self.assertIn("signal 9 (SIGKILL)", str(error))
                self.assertIn("out-of-memory killer", str(error))

                error = ex.submit(exit_with, 3).exception(60)
                self.assertIsInstance(error, JobCrashed)
                self.assertIn("exited with code 3", str(error))

                error = ex.submit(exit_with, 0).exception(60)
                self.assertIsInstance(error, JobCrashed)
                self.assertIn("exited with code 0", str(error))

                error = ex.submit(sys_exit, 0).exception(60)
                self.assertIsInstance(error, RemoteException)
                self.assertNotIsInstance(error, JobCrashed)
                self.assertEqual(error.type, "SystemExit")

                error = ex.submit(allocate, 4096).exception(60)
                self.assertIsInstance(error, RemoteException)
                self.assertEqual(error.type, "MemoryError")

                self.assertEqual(ex.submit(allocate, 16).result(60), 16 << 20)
                pids = set(ex.map(worker_pid, range(100), timeout=60))
            self.assertEqual(pids, {worker.pid})

        return threads.deferToThread(body)

    def test_timeouts(self):
        """
        A job past its timeout fails with JobTimeout within seconds and the
        slot is free afterwards; per job, per executor, per ClientThread and
        the worker's --job-timeout.
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1, True, "--job-timeout", "30")
            with executor(self.procs.address) as ex:
                started = time.monotonic()
                error = ex.submit_with(time.sleep, (3600,), timeout=1).exception(60)
                self.assertLess(time.monotonic() - started, 20)
                self.assertIsInstance(error, JobTimeout)
                self.assertIn("timeout of 1 s", str(error))
                self.assertEqual(ex.submit_with(square, (4,)).result(60), 16)
                self.assertEqual(ex.submit(worker_pid).result(60), worker.pid)
            with executor(self.procs.address, timeout=0.5) as ex:
                self.assertIsInstance(ex.submit(time.sleep, 3600).exception(60), JobTimeout)
                self.assertEqual(ex.submit(square, 5).result(60), 25)
            client = ClientThread(None, self.procs.address, timeout=0.5)
            client.start()
            try:
                client.submit("sleeper", time.sleep, 3600)
                with self.assertRaises(JobTimeout) as caught:
                    client.wait(60)
                self.assertEqual(caught.exception.jobid, "sleeper")
                client.submit_with("short", time.sleep, (0.1,), timeout=30)
                client.wait(60)
            finally:
                client.close()

        return threads.deferToThread(body)

    def test_worker_default_timeout(self):
        """The worker's --job-timeout applies to jobs that set none."""

        def body():
            self.procs.start_master()
            self.procs.start_worker(1, True, "--job-timeout", "1")
            with executor(self.procs.address) as ex:
                error = ex.submit(time.sleep, 3600).exception(60)
                self.assertIsInstance(error, JobTimeout)
                self.assertEqual(ex.submit(square, 6).result(60), 36)

        return threads.deferToThread(body)

    def test_poison_job(self):
        """
        A job that kills its worker every time fails with WorkerLost after
        the master's --max-attempts workers died running it; replacement
        workers then serve normally.
        """

        def body():
            address = self.procs.start_master("--max-attempts", "3")
            hosts = []
            with executor(address) as ex:
                future = None
                for _ in range(3):
                    worker = self.procs.start_worker(1)
                    hosts.append(worker.pid)
                    if future is None:
                        future = ex.submit(kill_my_worker)
                    worker.wait(60)
                    self.procs.workers.remove(worker)
                    wait_until(
                        lambda: master_status(address)["workers"] == [],
                        what="the master to notice the worker died",
                    )
                error = future.exception(60)
                self.assertIsInstance(error, WorkerLost)
                self.assertEqual(error.report["attempts"], 3)
                self.assertEqual(
                    [h.rsplit(":", 1)[1] for h in error.report["hosts"]], [str(p) for p in hosts]
                )
                self.assertIn("lost 3 times", str(error))
                self.procs.start_worker(1)
                self.assertEqual(ex.submit(square, 7).result(60), 49)

        return threads.deferToThread(body)

    def test_poison_job_per_job_limit(self):
        """A job's own max_attempts overrides the master's."""

        def body():
            address = self.procs.start_master("--max-attempts", "5")
            worker = self.procs.start_worker(1)
            with executor(address) as ex:
                future = ex.submit_with(kill_my_worker, max_attempts=1)
                worker.wait(60)
                self.procs.workers.remove(worker)
                error = future.exception(60)
                self.assertIsInstance(error, WorkerLost)
                self.assertEqual(error.report["attempts"], 1)

        return threads.deferToThread(body)

    def test_frozen_worker(self):
        """
        A worker that stops answering (SIGSTOP: its connection stays open)
        is declared lost within the heartbeat timeout and its job finishes
        on another worker.
        """
        flag = os.path.abspath(self.mktemp())

        def body():
            address = self.procs.start_master(
                "--heartbeat", "0.5", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)
            )
            frozen = self.procs.start_worker(1)
            alive = self.procs.start_worker(1)
            with executor(address) as ex:
                futures = [ex.submit(wait_for_file, flag) for _ in range(2)]
                wait_until(
                    lambda: sorted(w["held"] for w in master_status(address)["workers"]) == [1, 1],
                    what="one job on each worker",
                )
                os.kill(frozen.pid, signal.SIGSTOP)
                self.addCleanup(self._resume, frozen.pid)
                self.assert_lost_in_time(address)
                with open(flag, "w"):
                    pass
                pids = [f.result(30) for f in futures]
            self.assertEqual(pids, [alive.pid, alive.pid])

        return threads.deferToThread(body)

    def test_busy_worker_stopped(self):
        """
        A worker busy with a stream of jobs, so heard from all the time and
        sent heartbeats that ask no answer (L{cw.core.liveness.Liveness}),
        that stops (SIGSTOP) while the master keeps sending it jobs is
        still declared lost within the heartbeat timeout and a period, and
        every job finishes on the other worker.
        """

        def body():
            address = self.procs.start_master(
                "--heartbeat", "0.5", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)
            )
            busy = self.procs.start_worker(1)
            self.procs.start_worker(1)
            stop = threading.Event()
            submitted = []
            with executor(address) as ex:

                def feed():
                    while not stop.is_set():
                        batch = [ex.submit(square, n) for n in range(20)]
                        submitted.extend(batch)
                        futures_wait(batch, timeout=30)

                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
                try:
                    started = time.monotonic()
                    # Several heartbeat periods of traffic both ways.
                    wait_until(
                        lambda: (
                            time.monotonic() - started > 2.0
                            and [w["completed"] > 20 for w in master_status(address)["workers"]]
                            == [True, True]
                        ),
                        what="both workers busy for a few heartbeats",
                    )
                    os.kill(busy.pid, signal.SIGSTOP)
                    self.addCleanup(self._resume, busy.pid)
                    self.assert_lost_in_time(address)
                finally:
                    stop.set()
                    feeder.join(60)
                results = [f.result(60) for f in list(submitted)]
            self.assertEqual(len(results), len(submitted))

        return threads.deferToThread(body)

    def test_chaos(self):
        """
        10,000 jobs of 1-5 ms while a worker is killed with SIGKILL each time
        another eighth of the results has come (on progress, not on a
        clock, so that a loaded machine does not kill replacements before
        they serve) and a replacement started: every future resolves with
        the right value, and the master delivered each result once.
        """
        count = 10_000
        step = count // 8

        def body():
            address = self.procs.start_master("--max-attempts", "1000")
            for _ in range(3):
                self.procs.start_worker(2)
            progress = threading.Condition()
            done = [0]
            stop = threading.Event()
            killed = []
            stalled = []

            def arrived(future):
                with progress:
                    done[0] += 1
                    progress.notify_all()

            def reach(n):
                """Wait until C{n} results came or the run stopped; False after C{DEADLINE} s without."""
                with progress:
                    return progress.wait_for(lambda: stop.is_set() or done[0] >= n, DEADLINE)

            def killer():
                target = step
                while target < count:
                    if not reach(target):
                        stalled.append(f"{done[0]} results, then none more within {DEADLINE} s")
                        return
                    if stop.is_set():
                        return
                    victim = self.procs.workers[0]
                    os.kill(victim.pid, signal.SIGKILL)
                    victim.wait(30)
                    self.procs.workers.remove(victim)
                    killed.append(victim.pid)
                    self.procs.start_worker(2, False)
                    target = done[0] + step

            thread = threading.Thread(target=killer, name="chaos")
            with executor(address) as ex:
                futures = [ex.submit(short_job, i) for i in range(count)]
                for f in futures:
                    f.add_done_callback(arrived)
                thread.start()
                try:
                    values = [f.result(120) for f in futures]
                finally:
                    stop.set()
                    with progress:
                        progress.notify_all()
                    thread.join(60)
                status = ex.status()
            self.assertEqual(stalled, [])
            self.assertEqual(values, list(range(count)))
            self.assertEqual(status["completed"], count)
            self.assertGreaterEqual(len(killed), 2, "the run ended before two workers were killed")

        return threads.deferToThread(body)

    def test_half_open_link(self):
        """
        A worker in its own network namespace whose link goes down (its TCP
        connection stays open, half-open, on the master's side) is declared
        lost within the heartbeat timeout and its job finishes elsewhere.
        Needs root and iproute2; CI runs it.
        """
        flag = os.path.abspath(self.mktemp())
        net = NetworkNamespace(self)

        def body():
            address = self.procs.start_master(
                "--heartbeat",
                "0.5",
                "--heartbeat-timeout",
                str(HEARTBEAT_TIMEOUT),
                listen=f"tcp:0:interface={net.host_ip}",
            )
            cut_off = self.procs.start_worker(1, prefix=net.prefix)
            alive = self.procs.start_worker(1)
            with executor(address) as ex:
                self.assertEqual(ex.submit(square, 3).result(60), 9)
                futures = [ex.submit(wait_for_file, flag) for _ in range(2)]
                wait_until(
                    lambda: sorted(w["held"] for w in master_status(address)["workers"]) == [1, 1],
                    what="one job on each worker",
                )
                net.cut()
                self.assert_lost_in_time(address)
                with open(flag, "w"):
                    pass
                pids = [f.result(30) for f in futures]
            self.assertEqual(pids, [alive.pid, alive.pid])
            self.assertNotEqual(cut_off.pid, alive.pid)

        return threads.deferToThread(body)

    def assert_lost_in_time(self, address: str) -> None:
        """
        Of two workers of the master at C{address}, started with
        C{--heartbeat 0.5 --heartbeat-timeout 2}, one has just gone quiet:
        the master drops it within the heartbeat timeout (2 s) plus one
        heartbeat period and a margin for a loaded machine.
        """
        started = time.monotonic()
        wait_until(
            lambda: len(master_status(address)["workers"]) == 1,
            timeout=30,
            what="the master to declare the quiet worker lost",
        )
        self.assertLess(time.monotonic() - started, HEARTBEAT_TIMEOUT + 0.5 + LOST_MARGIN)

    def _resume(self, pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


class NetworkNamespace:
    """
    A network namespace joined to this one by a veth pair, removed in the
    test's cleanup.  Skips the test when not root (the README allows that);
    as root, a missing C{ip} or a failing C{ip} command fails the test.
    """

    def __init__(self, testcase: unittest.TestCase) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to create a network namespace (CI runs as root)")
        if shutil.which("ip") is None:
            raise AssertionError("needs iproute2's ip command (apt-get install iproute2; .ci/run does)")
        tag = os.getpid() % 100000
        self.name = f"cwtest{tag}"
        self.host_side, self.ns_side = f"cwv{tag}a", f"cwv{tag}b"
        subnet = f"10.{200 + tag % 50}.{tag // 50 % 256}"
        self.host_ip, self.ns_ip = f"{subnet}.1", f"{subnet}.2"
        self.prefix = ("ip", "netns", "exec", self.name)
        testcase.addCleanup(self.remove)
        try:
            self.run("ip", "netns", "add", self.name)
            self.run("ip", "link", "add", self.host_side, "type", "veth", "peer", "name", self.ns_side)
            self.run("ip", "link", "set", self.ns_side, "netns", self.name)
            self.run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_side)
            self.run("ip", "link", "set", self.host_side, "up")
            self.run(*self.prefix, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_side)
            self.run(*self.prefix, "ip", "link", "set", self.ns_side, "up")
            self.run(*self.prefix, "ip", "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            raise AssertionError(f"cannot set up a network namespace: {e}: {e.stderr!r}") from None

    @staticmethod
    def run(*command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, timeout=30)

    def cut(self) -> None:
        """Take the namespace's end of the link down: packets stop, nothing closes."""
        self.run(*self.prefix, "ip", "link", "set", self.ns_side, "down")

    def blackhole(self) -> None:
        """
        Drop every packet between the two ends, silently, both ways (routes
        of type blackhole): as when a cable is pulled far away, both
        kernels keep their routes and sending still succeeds locally.
        """
        self.run("ip", "route", "add", "blackhole", f"{self.ns_ip}/32")
        self.run(*self.prefix, "ip", "route", "add", "blackhole", f"{self.host_ip}/32")

    def remove(self) -> None:
        for command in (
            ("ip", "netns", "del", self.name),
            ("ip", "link", "del", self.host_side),
            ("ip", "route", "del", "blackhole", f"{self.ns_ip}/32"),
        ):
            subprocess.run(command, capture_output=True, timeout=30)


#: A margin on top of the README's bounds for a link that goes quiet, for
#: polling and a busy 2-core machine.
QUIET_MARGIN = 5

#: A client run in the namespace (master_timeout from argv[2]): submits a
#: job that stays queued (the master has no workers), says so, then reports
#: when and how it failed.
QUIET_CLIENT = """
import json, sys, time
from cw.client import ClusterExecutor
from cw.test.jobs import square

ex = ClusterExecutor(sys.argv[1], master_timeout=float(sys.argv[2]), reconnect_timeout=0)
future = ex.submit(square, 3)
print("queued", flush=True)
error = future.exception(120)
print(json.dumps({"at": time.monotonic(), "type": type(error).__name__, "message": str(error)}), flush=True)
ex.shutdown(wait=False)
"""


class QuietLinkTests(unittest.TestCase):
    """
    A client link that goes quiet without closing (every packet dropped,
    as when a cable is pulled far away: no FIN, no RST) is noticed by both
    ends within the bounds the README gives.  Needs root and iproute2; CI
    runs them.
    """

    timeout = 120

    def cut_client_off(self, master_options: list[str], master_timeout: float) -> tuple[float, dict | None]:
        """
        Start a master (no workers) and, in a network namespace, a client
        with a job queued; drop every packet between them.  Return how many
        seconds after the cut the master forgot the client (and its job),
        and the client's report (its error and when, or None if it had
        not failed by then).
        """
        net = NetworkNamespace(self)
        procs = Processes(self, self.mktemp())
        address = procs.start_master(*master_options, listen=f"tcp:0:interface={net.host_ip}")
        errors = procs.directory / "client.err"
        with open(errors, "w") as stderr:
            client = subprocess.Popen(
                [*net.prefix, sys.executable, "-c", QUIET_CLIENT, address, str(master_timeout)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=child_env(),
                start_new_session=True,
            )
        self.addCleanup(stop_process, client)
        # The client prints at once; a deadline all the same, should it hang.
        timer = threading.Timer(DEADLINE, client.kill)
        timer.start()
        line = client.stdout.readline()
        timer.cancel()
        self.assertEqual(line.strip(), "queued", errors.read_text())
        wait_until(lambda: master_status(address)["queued"] == 1, timeout=10, what="the job queued")
        net.blackhole()
        cut = time.monotonic()
        # (master_status is itself a client, one that submits nothing.)
        wait_until(
            lambda: not [c for c in master_status(address)["clients"] if c["submitted"]],
            timeout=DEADLINE,
            what="the master to forget the quiet client",
        )
        master_noticed = time.monotonic() - cut
        self.assertEqual(master_status(address)["queued"], 0)
        report = None
        if master_timeout:
            out, _ = client.communicate(timeout=DEADLINE)
            self.assertTrue(out.strip(), errors.read_text())
            report = json.loads(out.strip().splitlines()[-1])
            report["after"] = report["at"] - cut
        return master_noticed, report

    def test_heartbeats(self):
        """
        With heartbeats (cw-master --heartbeat 1 --client-timeout 4, a
        client's master_timeout=4): the master drops the client within its
        client timeout plus one heartbeat, and the client fails its futures
        with MasterUnavailable within master_timeout and a quarter.
        """

        def body():
            master_noticed, report = self.cut_client_off(["--heartbeat", "1", "--client-timeout", "4"], 4)
            self.assertLess(master_noticed, 4 + 1 + QUIET_MARGIN)
            self.assertEqual(report["type"], "MasterUnavailable", report)
            self.assertIn("no sign of life", report["message"])
            self.assertLess(report["after"], 4 * 1.25 + QUIET_MARGIN)

        return threads.deferToThread(body)

    def test_keepalive(self):
        """
        With the master's heartbeats off (cw-master --heartbeat 0) and the
        client's too (master_timeout=0), TCP keepalive (probes after 10 s
        idle, every 5 s, three tries) closes the master's end within about
        25 s.
        """

        def body():
            master_noticed, _ = self.cut_client_off(["--heartbeat", "0"], 0)
            self.assertLess(master_noticed, 10 + 3 * 5 + QUIET_MARGIN)

        return threads.deferToThread(body)
