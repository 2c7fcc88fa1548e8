"""
What a job writes comes back to its client (issue 17): C{future.stdout} and
C{future.stderr}, C{RemoteException.stdout}, the third argument of
L{ClientThread} callbacks.  Against a real master and a worker with one job
process (so that consecutive jobs share it), shared by the tests of this
module.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread, ClusterExecutor, JobCrashed, JobOutput, JobTimeout, RemoteException
from cw.test.jobs import block_until
from cw.test.procs import (
    DEADLINE,
    Processes,
    abandon,
    almost_full_tmpdir,
    can_mount,
    executor,
    process_exists,
    shared_cluster,
    wait_until,
)

MIB = 1 << 20


def output_cluster():
    """
    The shared master and one-slot worker of these tests, run as a user's
    would be: without C{PYTHONUNBUFFERED} (which CI may set), so that a job
    process's sys.stdout buffers as it does by default.
    """
    with mock.patch.dict(os.environ):
        os.environ.pop("PYTHONUNBUFFERED", None)
        return shared_cluster("output", (1,))


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


def print_then_die():
    print("about to die")
    print("dying", file=sys.stderr)
    sys.stdout.flush()
    os.kill(os.getpid(), 9)


def print_then_hang():
    print("about to hang", flush=True)
    time.sleep(60)


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
            self.cluster = output_cluster()
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

    def test_process_died(self):
        """
        A job whose process dies (killed, or past its timeout): the error
        holds what it wrote before.
        """

        def body():
            error = self.run_job(print_then_die).exception()
            self.assertIsInstance(error, JobCrashed)
            self.assertEqual((error.stdout, error.stderr), ("about to die\n", "dying\n"))
            future = self.executor.submit_with(print_then_hang, timeout=2)
            error = future.exception(DEADLINE)
            self.assertIsInstance(error, JobTimeout)
            self.assertEqual((error.stdout, error.stderr), ("about to hang\n", ""))
            # The next job in the new job process starts clean.
            self.assertEqual(self.run_job(tidy).stdout, "the next job's line\n")

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


def talk_until(flag):
    """Write a line to each stream, then wait for C{flag}; end with a line left open."""
    print("starting")
    print("warming up", file=sys.stderr)
    block_until(flag)
    sys.stdout.write("done, no newline")
    return "finished"


def log_things():
    log = logging.getLogger("cw_test_job")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning with %s", "arguments")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logging.getLogger("cw_test_job.inner").exception("it failed")
    return "logged"


def log_many(n):
    """Log C{n} records of about 100 bytes each, as fast as possible, then return."""
    log = logging.getLogger("cw_test_job")
    for i in range(n):
        log.warning("record %06d %s", i, "." * 80)
    return n


class Collector:
    """A stand-in for sys.stdout or sys.stderr that the test can wait on."""

    def __init__(self) -> None:
        self.text = ""
        self.changed = threading.Condition()

    def write(self, text: str) -> int:
        with self.changed:
            self.text += text
            self.changed.notify_all()
        return len(text)

    def flush(self) -> None:
        pass

    def wait_for(self, text: str, timeout: float = 10) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: text in self.text, timeout):
                raise AssertionError(f"{text!r} not written within {timeout} s; written: {self.text!r}")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LiveOutputTests(unittest.TestCase):
    """echo=True and forward_logging, on the same shared cluster."""

    timeout = 120

    def setUp(self):
        self.out, self.err = Collector(), Collector()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)
        self.host = socket.gethostname()

        def connect():
            self.cluster = output_cluster()

        return threads.deferToThread(connect)

    def test_echo_while_running(self):
        """
        With echo=True, a running job's lines reach this process's stdout
        and stderr, prefixed, before the job ends; the open last line
        follows with the result.
        """
        flag = os.path.abspath(self.mktemp())
        self.addCleanup(lambda: open(flag, "w").close())

        def body():
            with executor(self.cluster.address, echo=True) as ex:
                future = ex.submit(talk_until, flag)
                prefix = f"[{future._jobid} {self.host}] "
                self.out.wait_for(prefix + "starting\n")
                self.err.wait_for(prefix + "warming up\n")
                self.assertFalse(future.done())
                open(flag, "w").close()
                self.assertEqual(future.result(DEADLINE), "finished")
                self.out.wait_for(prefix + "done, no newline\n")
                self.assertEqual(self.out.text, prefix + "starting\n" + prefix + "done, no newline\n")
                self.assertEqual(future.stdout, "starting\ndone, no newline")

        return threads.deferToThread(body)

    def test_no_echo(self):
        """Without echo, nothing of a job's output is written here (nor sent while it runs)."""

        def body():
            with executor(self.cluster.address) as ex:
                notices = []
                on_output = ex.session.on_output
                ex.session.on_output = lambda host, outputs: (
                    notices.append(outputs),
                    on_output(host, outputs),
                )
                future = ex.submit(three_lines)
                self.assertEqual(future.result(DEADLINE), 7)
                echoed = ex.submit_with(three_lines, echo=True)
                echoed.result(DEADLINE)
            self.assertEqual(
                self.out.text, f"[{echoed._jobid} {self.host}] one\n[{echoed._jobid} {self.host}] three\n"
            )
            self.assertEqual([o.seq for batch in notices for o in batch], [echoed._seq, echoed._seq])

        return threads.deferToThread(body)

    def test_client_thread_echo(self):
        """ClientThread(echo=True) prefixes lines with the job's id."""

        def body():
            with ClientThread(None, self.cluster.address, echo=True) as client:
                client.submit("job-a", three_lines)
            self.assertEqual(self.out.text, f"[#job-a {self.host}] one\n[#job-a {self.host}] three\n")
            self.assertEqual(self.err.text, f"[#job-a {self.host}] two\n[#job-a {self.host}] four\n")

        return threads.deferToThread(body)

    def test_forward_logging(self):
        """
        forward_logging=INFO: the job's records at INFO and above reach this
        process's logging under cw.job.<name>, before its result; DEBUG does
        not; forward_logging=False turns it off for one job.
        """
        records = Records()
        parent = logging.getLogger("cw.job")
        self.addCleanup(parent.removeHandler, records)
        self.addCleanup(parent.setLevel, parent.level)
        parent.addHandler(records)
        parent.setLevel(logging.DEBUG)

        def body():
            with executor(self.cluster.address, forward_logging="INFO") as ex:
                future = ex.submit(log_things)
                self.assertEqual(future.result(DEADLINE), "logged")
                got = [(r.name, r.levelno, r.getMessage()) for r in records.records]
                prefix = f"[{future._jobid} {self.host}] "
                self.assertEqual(
                    got,
                    [
                        ("cw.job.cw_test_job", logging.INFO, prefix + "an info line"),
                        ("cw.job.cw_test_job", logging.WARNING, prefix + "a warning with arguments"),
                        ("cw.job.cw_test_job.inner", logging.ERROR, prefix + "it failed"),
                    ],
                )
                self.assertIn("ZeroDivisionError", records.records[-1].exc_text)
                self.assertEqual(future.stderr, "")  # forwarded, not printed
                del records.records[:]
                ex.submit_with(log_things, forward_logging=False).result(DEADLINE)
                self.assertEqual(records.records, [])

        return threads.deferToThread(body)

    def test_records_before_result(self):
        """
        Records a job logs just before it returns (megabytes: more than
        the pipe from its process holds) all arrive before its result.
        """
        records = Records()
        parent = logging.getLogger("cw.job")
        self.addCleanup(parent.removeHandler, records)
        parent.addHandler(records)

        def body():
            with executor(self.cluster.address, forward_logging=logging.WARNING) as ex:
                self.assertEqual(ex.submit(log_many, 30000).result(DEADLINE), 30000)
                self.assertEqual(len(records.records), 30000)
                self.assertIn("record 029999", records.records[-1].getMessage())

        return threads.deferToThread(body)


class OutputFilesTests(unittest.TestCase):
    """Where a worker's jobs' output waits: a $TMPDIR all but full, and what is left after."""

    timeout = 180

    def test_full_tmpdir_nothing_left(self):
        """
        A worker whose $TMPDIR is all but full: its job's 100 KB of output
        comes back whole; after the job, and after its process is killed
        in a job (SIGKILL), nothing is added to $TMPDIR, and the worker
        holds nothing of the dead process's output files.
        """
        if not can_mount():
            raise unittest.SkipTest("needs root and unshare to mount a small file system")

        def body():
            procs = Processes(self, self.mktemp())
            tmpdir = procs.directory / "tmp"
            tmpdir.mkdir()
            procs.start_master()
            worker = procs.start_worker(
                1, True, prefix=almost_full_tmpdir(str(tmpdir)), env={"TMPDIR": str(tmpdir)}
            )
            # The worker's view of its $TMPDIR (its own mount).
            listing = lambda: sorted(os.listdir(f"/proc/{worker.pid}/root{tmpdir}"))  # noqa: E731
            with executor(procs.address) as ex:
                future = ex.submit(write_a_lot, 100_000)
                pid = future.result(DEADLINE)
                self.assertEqual(len(future.stdout), 100_000)
                self.assertEqual(listing(), ["fill"])
                files = {file_id(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)}
                error = ex.submit(print_then_die).exception(DEADLINE)
                self.assertIsInstance(error, JobCrashed)
                self.assertEqual((error.stdout, error.stderr), ("about to die\n", "dying\n"))
                wait_until(lambda: not process_exists(pid), what="the killed job process to be gone")
                wait_until(
                    lambda: not files & held_files(worker.pid),
                    what="the worker to let go of the dead process's output files",
                )
                self.assertEqual(listing(), ["fill"])
                future = ex.submit(tidy)
                future.result(DEADLINE)
                self.assertEqual(future.stdout, "the next job's line\n")

        return threads.deferToThread(body)


def file_id(path: str) -> tuple[int, int]:
    """What tells the file at C{path} from any other: its device and inode."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def held_files(pid: int) -> set[tuple[int, int]]:
    """The files process C{pid} has open (L{file_id})."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.add(file_id(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return held
