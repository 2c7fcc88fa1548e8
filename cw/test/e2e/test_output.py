"""
What a job writes comes back to its client (issue 17): C{future.stdout} and
C{future.stderr}, C{RemoteException.stdout}, the third argument of
L{ClientThread} callbacks.  Against a real master and a worker with one job
process (so that consecutive jobs share it), shared by the tests of this
module.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread, ClusterExecutor, JobOutput, RemoteException
from cw.test.procs import DEADLINE, abandon, shared_cluster

MIB = 1 << 20


def three_lines():
    print("one")
    print("two", file=sys.stderr)
    print("three")
    print("four", file=sys.stderr)
    return 7


def write_a_lot(size):
    """Write C{size} bytes to stdout: numbered lines, ending with a known line."""
    line = "x" * 99 + "\n"
    out = sys.stdout
    for _ in range(size // 100 - 1):
        out.write(line)
    out.write("the last line" + " " * 86 + "\n")
    return os.getpid()


def below_python():
    """Write to fd 1 and 2 directly and through a subprocess, bypassing sys.stdout."""
    os.write(1, b"straight to fd 1\n")
    os.write(2, b"straight to fd 2\n")
    subprocess.run(["sh", "-c", "echo from a subprocess; echo its error >&2"], check=True)
    return "done"


def print_then_fail():
    print("about to divide")
    print("by zero", file=sys.stderr)
    return 1 / 0


def untidy():
    """Leave an unflushed line and a replaced sys.stdout behind."""
    sys.stdout.write("no newline, not flushed")
    sys.stdout = io.StringIO()
    print("into the job's own buffer")
    return os.getpid()


def tidy():
    print("the next job's line")
    return os.getpid()


class OutputTests(unittest.TestCase):
    """A job's output at the client, on a shared master with one one-slot worker."""

    timeout = 120

    def setUp(self):
        def connect():
            self.cluster = shared_cluster("output", (1,))
            self.executor = ClusterExecutor(self.cluster.address)

        return threads.deferToThread(connect)

    def tearDown(self):
        return threads.deferToThread(abandon, self.executor)

    def run_job(self, func, *args):
        future = self.executor.submit(func, *args)
        future.exception(DEADLINE)
        return future

    def test_lines(self):
        """A job's lines on stdout and stderr come back as future.stdout and future.stderr."""

        def body():
            future = self.run_job(three_lines)
            self.assertEqual(future.result(), 7)
            self.assertEqual(future.stdout, "one\nthree\n")
            self.assertEqual(future.stderr, "two\nfour\n")

        return threads.deferToThread(body)

    def test_bounded(self):
        """10 MB written: the last MiB comes back, after a marker saying what was cut."""

        def body():
            future = self.run_job(write_a_lot, 10_000_000)
            future.result()
            out = future.stdout
            marker, _, rest = out.partition("\n")
            cut = 10_000_000 - MIB
            self.assertEqual(marker, f"[cw: {cut} bytes of earlier output cut; the last {MIB} follow]")
            self.assertEqual(len(rest), MIB)
            self.assertTrue(rest.endswith("the last line" + " " * 86 + "\n"), rest[-200:])
            self.assertEqual(future.stderr, "")

        return threads.deferToThread(body)

    def test_file_descriptors(self):
        """Writes to fd 1 and 2 below Python, and a subprocess's output, are caught."""

        def body():
            future = self.run_job(below_python)
            self.assertEqual(future.result(), "done")
            self.assertEqual(future.stdout, "straight to fd 1\nfrom a subprocess\n")
            self.assertEqual(future.stderr, "straight to fd 2\nits error\n")

        return threads.deferToThread(body)

    def test_failure(self):
        """A failing job's RemoteException holds what it wrote before failing."""

        def body():
            future = self.run_job(print_then_fail)
            error = future.exception()
            self.assertIsInstance(error, RemoteException)
            self.assertIsInstance(error, ZeroDivisionError)
            self.assertEqual(error.stdout, "about to divide\n")
            self.assertEqual(error.stderr, "by zero\n")
            self.assertEqual(future.stdout, "about to divide\n")

        return threads.deferToThread(body)

    def test_no_leak(self):
        """
        A job that leaves output unflushed and sys.stdout replaced: its
        output is its own, the next job in the same process starts clean.
        """

        def body():
            first = self.run_job(untidy)
            second = self.run_job(tidy)
            self.assertEqual(first.result(), second.result())  # one job process
            self.assertEqual(first.stdout, "no newline, not flushed")
            self.assertEqual(second.stdout, "the next job's line\n")
            third = self.run_job(tidy)
            self.assertEqual(third.stdout, "the next job's line\n")

        return threads.deferToThread(body)

    def test_client_thread_third_argument(self):
        """
        ClientThread passes the output to callbacks that take a third
        argument; two-argument ones still work.
        """

        def body():
            address = self.cluster.address
            got = {}

            def with_output(jobid, result, output):
                got[jobid] = (result, output)

            with ClientThread(with_output, address) as client:
                client.submit("a", three_lines)
            self.assertEqual(got, {"a": (7, JobOutput("one\nthree\n", "two\nfour\n"))})

            plain = {}
            with ClientThread(lambda jobid, result: plain.update({jobid: result}), address) as client:
                client.submit("b", three_lines)
            self.assertEqual(plain, {"b": 7})

            client = ClientThread(None, address)
            with self.assertRaises(RemoteException) as caught, client:
                client.submit("c", print_then_fail)
            self.assertEqual(caught.exception.stdout, "about to divide\n")

        return threads.deferToThread(body)
