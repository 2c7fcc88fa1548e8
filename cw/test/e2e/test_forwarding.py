"""
Huge payloads on their way through the master, end to end (real
C{twistd} master and workers on loopback): tiny jobs keep flowing while a
huge one is in transit, and a master killed while it forwards a huge
payload to a worker costs the job nothing but a second try (or, without
reconnection, fails it with an error that names it).

Nothing here is timed: progress is asserted as an order of events (on one
machine, C{time.monotonic()} is one clock for every process).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import MasterUnavailable
from cw.system import write_atomically
from cw.test.jobs import payload_bytes, square, timed_digest
from cw.test.procs import (
    DEADLINE,
    Processes,
    arguments_travel,
    executor,
    free_port,
    job_processes,
    process_exists,
    wait_until,
)

MB = 1 << 20
#: The huge payloads: far more than any socket or pipe buffer holds.
HUGE = 200 * MB


def sent_bytes(port: int) -> int:
    """
    Bytes sent so far on the established TCP connections whose local port
    is C{port} (the master's side of its connections), from C{ss}'s
    C{bytes_sent}.
    """
    out = subprocess.run(
        ["ss", "-Htin", "state", "established", "sport", "=", f":{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(n) for n in re.findall(r"\bbytes_sent:(\d+)", out))


class InterleavedTests(unittest.TestCase):
    """Many tiny jobs interleaved with huge ones, from one client."""

    timeout = 600

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        # The payloads must go through the master's sockets (not stay in the client).
        arguments_travel(self)

    def test_tiny_jobs_interleaved_with_huge_ones(self):
        """
        Two workers of one slot; one client submits tiny jobs, a 200 MB
        argument, more tiny jobs, another 200 MB argument and more tiny
        jobs.  Every job gets its own right result, and tiny jobs submitted
        after the first huge one finish before that huge job even starts
        running: they are not held behind its whole transfer (client to
        master to worker to job process).
        """

        def body():
            address = self.procs.start_master()
            self.procs.start_worker(1)
            self.procs.start_worker(1)
            done_at: dict[int, float] = {}
            lock = threading.Lock()

            def finished(i):
                def record(_):
                    with lock:
                        done_at[i] = time.monotonic()

                return record

            with executor(address) as ex:
                self.assertEqual(ex.submit(square, 2).result(DEADLINE), 4)  # warm: both connected
                tiny, huge, expected = {}, [], []
                n = 0
                for round_ in range(2):
                    for _ in range(50):
                        tiny[n] = ex.submit(square, n)
                        tiny[n].add_done_callback(finished(n))
                        n += 1
                    blob = payload_bytes(HUGE, round_)
                    expected.append((HUGE, hashlib.sha256(blob).hexdigest()))
                    huge.append((n, ex.submit(timed_digest, blob)))
                    del blob
                for _ in range(50):
                    tiny[n] = ex.submit(square, n)
                    tiny[n].add_done_callback(finished(n))
                    n += 1
                for i, future in tiny.items():
                    self.assertEqual(future.result(DEADLINE), i * i)
                starts = []
                for (_, future), (length, sha) in zip(huge, expected, strict=True):
                    start, got_length, got_sha = future.result(DEADLINE)
                    self.assertEqual((got_length, got_sha), (length, sha))
                    starts.append(start)
                after_first, first_start = huge[0][0], starts[0]
                early = [i for i in range(after_first, huge[1][0]) if done_at[i] < first_start]
                self.assertTrue(
                    early,
                    "no tiny job submitted after the first huge one finished before it started:"
                    f" tiny jobs waited for its whole transfer (done at"
                    f" {sorted(done_at[i] - first_start for i in range(after_first, huge[1][0]))[:3]} s"
                    " after it started)",
                )

        return threads.deferToThread(body)


class KilledMidForwardTests(unittest.TestCase):
    """
    The master is SIGKILLed (by PID) while it forwards a job's 200 MB
    argument to the worker: the worker has part of the box, the job has
    not started.
    """

    timeout = 300

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        # The payloads must go through the master's sockets (not stay in the client).
        arguments_travel(self)

    def kill_mid_forward(self, ex, record: str):
        """Submit the huge job; SIGKILL the master once it has sent part of it on; the future."""
        master = self.procs.master
        port = int(re.search(r"port=(\d+)", self.procs.address).group(1))
        before = sent_bytes(port)
        future = ex.submit(timed_digest, payload_bytes(HUGE, 7), record)
        sent = wait_until(
            lambda: (n := sent_bytes(port) - before) >= 20 * MB and n,
            what="the master to forward 20 MB of the job",
        )
        master.kill()
        master.wait(DEADLINE)
        self.assertLess(sent, HUGE, "the master had forwarded the whole payload before it was killed")
        self.assertFalse(os.path.exists(record), "the job ran before the master was killed")
        return future

    def test_runs_once_more_after_restart(self):
        """
        With a new master on the same address, the client reconnects and
        sends the job again: it runs once, with the whole argument.
        """

        def body():
            listen = f"tcp:{free_port()}:interface=127.0.0.1"
            address = self.procs.start_master(listen=listen)
            self.procs.start_worker(1)
            record = os.path.abspath(self.mktemp())
            with executor(address, reconnect_timeout=120) as ex:
                future = self.kill_mid_forward(ex, record)
                self.procs.start_master(listen=listen)
                _, length, sha = future.result(DEADLINE * 2)
                self.assertEqual((length, sha), (HUGE, hashlib.sha256(payload_bytes(HUGE, 7)).hexdigest()))
                with open(record) as f:
                    self.assertEqual(f.read(), "ran\n")
                self.assertEqual(ex.session.reconnects, 1)
                self.assertEqual(ex.submit(square, 5).result(DEADLINE), 25)

        return threads.deferToThread(body)

    def test_error_names_the_job_without_reconnection(self):
        """
        A client that does not reconnect (C{reconnect_timeout=0}): the
        job's future fails with L{MasterUnavailable} that names the job
        (C{#N}, its number) and the master.
        """

        def body():
            address = self.procs.start_master()
            self.procs.start_worker(1)
            record = os.path.abspath(self.mktemp())
            with executor(address, reconnect_timeout=0) as ex:
                future = self.kill_mid_forward(ex, record)
                error = future.exception(DEADLINE)
                self.assertIsInstance(error, MasterUnavailable)
                self.assertIn(address, str(error))
                self.assertIn(f"job #{future.number}: ", str(error))
            self.assertFalse(os.path.exists(record))

        return threads.deferToThread(body)


def hold_first_time(data, marker: str) -> str:
    """
    The first time (no C{marker} yet): say which process runs it, then
    wait to be killed.  Then: C{data}'s SHA-256.
    """
    if not os.path.exists(marker):
        write_atomically(marker, str(os.getpid()))
        time.sleep(60)
    return hashlib.sha256(data).hexdigest()


class LetGoTests(unittest.TestCase):
    """
    A master lets go of a big argument once a worker has it, when its
    client keeps it (C{reconnect_timeout}, on by default), and fetches it
    again from the client when the job runs again.
    """

    timeout = 300

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        arguments_travel(self)

    def rerun(self, **options):
        """
        A job with a 3 MB argument starts on one of two workers, which is
        SIGKILLed: the job runs again on the other, with the whole argument.
        """
        marker = os.path.abspath(self.mktemp())
        blob = os.urandom(3 * MB)

        def body():
            self.procs.start_master()
            workers = [self.procs.start_worker(1), self.procs.start_worker(1)]
            with executor(self.procs.address, **options) as ex:
                future = ex.submit_with(hold_first_time, (blob, marker), max_attempts=2)
                wait_until(lambda: os.path.exists(marker), what="the job to start")
                job_pid = int(open(marker).read())
                (worker,) = [w for w in workers if job_processes(w.pid) == [job_pid]]
                worker.kill()
                wait_until(lambda: not process_exists(job_pid), what="the job process to die")
                self.assertEqual(future.result(DEADLINE), hashlib.sha256(blob).hexdigest())
                self.assertEqual(ex.submit(square, 5).result(DEADLINE), 25)

        return threads.deferToThread(body)

    def test_argument_fetched_again_for_a_rerun(self):
        """The client keeps its arguments: the master let go of it, and fetches it again."""
        return self.rerun()

    def test_argument_kept_by_the_master_without_reconnection(self):
        """The client keeps no argument (C{reconnect_timeout=0}): the master keeps it."""
        return self.rerun(reconnect_timeout=0)
