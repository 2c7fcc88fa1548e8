"""
End-to-end tests of big job arguments left in the client's memory
(L{cw.client.arguments}), against a real C{twistd cw-master} and
C{twistd cw-worker}s over real sockets: a job process on the client's
machine maps the client's memory file (the master never receives the
bytes); a worker playing another machine (C{CW_MACHINE_IDENTITY}) gets
them fetched from the client by the master; files are closed once results
arrive; a job process killed while it has the argument mapped leaves
nothing behind and the job runs again; an argument the client no longer
holds fails its job with a clear error.
"""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import time

try:
    import numpy
except ImportError:  # NumPy is optional (the test extra)
    numpy = None
from twisted.internet import threads
from twisted.trial import unittest

from cw.client.arguments import REFERENCE_ABOVE
from cw.errors import JobCrashed, ReportKind
from cw.system import write_atomically
from cw.test.procs import (
    DEADLINE,
    Processes,
    dev_shm,
    executor,
    free_port,
    job_processes,
    mapped_memory_files,
    memory_files,
    peak_rss_mib,
    process_exists,
    reset_peak_rss,
    wait_until,
)
from cw.wire import memfile
from cw.worker import child

MiB = 1 << 20


def digest(data) -> tuple[str, int]:
    """C{data}'s SHA-256 and how many arguments this job process mapped from clients' memory."""
    return hashlib.sha256(data).hexdigest(), child.stats["referenced_in"]


def array_digest(array) -> tuple[str, int]:
    """C{array}'s SHA-256, and how many arguments its job process mapped from clients' memory."""
    return hashlib.sha256(array.data).hexdigest(), child.stats["referenced_in"]


def hold_once(data, marker: str):
    """
    The first time (no C{marker} yet): say which process runs it, then keep
    C{data} mapped until killed.  Then: C{data}'s digest.
    """
    if not os.path.exists(marker):
        write_atomically(marker, str(os.getpid()))
        time.sleep(60)
    return digest(data)


def mapping_process(data) -> tuple[int, int]:
    """This job process's pid and how many memory files it has mapped (C{data}'s)."""
    return os.getpid(), mapped_memory_files(os.getpid())


def wait_for(marker: str) -> bool:
    """Block until C{marker} exists (a job that keeps a worker busy)."""
    while not os.path.exists(marker):
        time.sleep(0.01)
    return True


def client_memory_files() -> int:
    """cw's memory files this process (the client) holds."""
    return memory_files()


def files_closed(ex, before: int) -> None:
    """
    Wait until the client holds no argument file any more: they are closed
    just after their results are handed on (not before: the results need
    not wait for it), so a bounded wait.  C{before}: the memory files this
    process held when the test started (trial -j runs many modules in one
    process: those of earlier tests are not this test's).
    """
    wait_until(
        # (gc: a live mapping of a memory file, a Python mmap, holds a
        # duplicate of its descriptor until it is collected.)
        lambda: (
            not ex.session.arguments.descriptors() and gc.collect() >= 0 and client_memory_files() <= before
        ),
        what="the client's argument files to close",
    )


class LocalArgumentTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        if not memfile.supported():
            raise unittest.SkipTest("no memfd_create or /proc here: arguments travel through sockets")
        self.procs = Processes(self, self.mktemp())
        self.shm_before = dev_shm()
        self.files_before = client_memory_files()

    def test_big_argument_stays_in_the_client(self):
        """
        A 50 MB argument reaches a job process on the client's machine
        through the client's memory file: intact, mapped from the client
        (not sent), the master's memory does not grow by it, and the file
        is closed once the result arrives.
        """
        blob = os.urandom(50 * MiB)

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            master = self.procs.master.pid
            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(len, b"warm").result(DEADLINE), 4)
                reset_peak_rss(master)
                before = peak_rss_mib(master)
                self.assertTrue(ex.session.references, "the master allowed no references")
                value, referenced = ex.submit(digest, blob).result(DEADLINE)
                self.assertEqual(value, hashlib.sha256(blob).hexdigest())
                grown = peak_rss_mib(master) - before
                self.assertLess(grown, 20, f"the master's peak memory grew by {grown:.1f} MiB")
                self.assertEqual(referenced, 1, "the job process did not map the client's file")
                files_closed(ex, self.files_before)
            self.assertEqual(dev_shm() - self.shm_before, set())

        return threads.deferToThread(body)

    def test_argument_unmapped_after_the_job(self):
        """
        The job process has its argument mapped while the job runs, and
        unmaps it once it has answered (just after: the answer does not
        wait for it).
        """
        blob = os.urandom(5 * MiB)

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                pid, mapped = ex.submit(mapping_process, blob).result(DEADLINE)
                self.assertGreaterEqual(mapped, 1, "the argument was not mapped")
                wait_until(lambda: mapped_memory_files(pid) == 0, what="the job process to unmap it")
                files_closed(ex, self.files_before)

        return threads.deferToThread(body)

    def test_many_arrays(self):
        """1,000 NumPy arrays just over the threshold, on two workers, arrive intact."""
        if numpy is None:
            raise unittest.SkipTest("NumPy is not installed (the test extra)")
        rng = numpy.random.default_rng(18)
        count = REFERENCE_ABOVE // 8 + 1000
        arrays = [rng.random(count) for _ in range(1000)]

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                futures = [ex.submit(array_digest, array) for array in arrays]
                for array, future in zip(arrays, futures, strict=True):
                    value, referenced = future.result(DEADLINE)
                    self.assertEqual(value, hashlib.sha256(array.data).hexdigest())
                    self.assertGreater(referenced, 0, "an array did not go by reference")
                files_closed(ex, self.files_before)

        return threads.deferToThread(body)

    def test_worker_elsewhere_gets_the_bytes(self):
        """
        A worker on another machine (as far as the identities go) cannot
        open the client's file: the master fetches the bytes from the
        client and sends them inline; the job succeeds.
        """
        blob = os.urandom(5 * MiB + 1)

        def body():
            self.procs.start_master()
            self.procs.start_worker(1, env={"CW_MACHINE_IDENTITY": "another-machine"})
            with executor(self.procs.address) as ex:
                value, referenced = ex.submit(digest, blob).result(DEADLINE)
                self.assertEqual(value, hashlib.sha256(blob).hexdigest())
                self.assertEqual(referenced, 0)
                files_closed(ex, self.files_before)

        return threads.deferToThread(body)

    def _kill_while_mapped(self, kill_worker: bool, check) -> None:
        """
        Start a job whose argument lies in the client's memory on one of
        two workers, and SIGKILL its job process (or its worker) while it
        has the argument mapped; then C{check(executor, future, argument)}.
        """
        marker = os.path.abspath(self.mktemp())
        blob = os.urandom(3 * MiB)
        self.procs.start_master()
        workers = [self.procs.start_worker(1), self.procs.start_worker(1)]
        with executor(self.procs.address) as ex:
            future = ex.submit_with(hold_once, (blob, marker), max_attempts=2)
            wait_until(lambda: os.path.exists(marker), what="the job to start")
            job_pid = int(open(marker).read())
            (worker,) = [w for w in workers if job_processes(w.pid) == [job_pid]]
            self.assertGreaterEqual(mapped_memory_files(job_pid), 1, "the argument is not mapped")
            os.kill(worker.pid if kill_worker else job_pid, signal.SIGKILL)
            wait_until(lambda: not process_exists(job_pid), what="the job process to die")
            check(ex, future, blob)

    def test_job_process_killed_with_argument_mapped(self):
        """
        A job process SIGKILLed while it has its argument mapped from the
        client's file: the job fails as its process died, nothing is left
        in /dev/shm and the client's file is closed.
        """

        def check(ex, future, _):
            self.assertIsInstance(future.exception(DEADLINE), JobCrashed)
            files_closed(ex, self.files_before)
            self.assertEqual(dev_shm() - self.shm_before, set())

        return threads.deferToThread(self._kill_while_mapped, False, check)

    def test_worker_killed_with_argument_mapped(self):
        """
        The worker of a job process that has its argument mapped is
        SIGKILLed: the job runs again on the other worker, from the same
        file of the client (still held), and succeeds; then the file is
        closed and nothing is left in /dev/shm.
        """

        def check(ex, future, blob):
            value, referenced = future.result(DEADLINE)
            self.assertEqual(value, hashlib.sha256(blob).hexdigest())
            self.assertEqual(referenced, 1)
            files_closed(ex, self.files_before)
            self.assertEqual(dev_shm() - self.shm_before, set())

        return threads.deferToThread(self._kill_while_mapped, True, check)

    def _argument_gone(self, env: dict | None):
        """A job whose argument the client closed before it ran fails, naming it and saying why."""
        marker = os.path.abspath(self.mktemp())

        def body():
            # No prefetch: the job waits in the master's queue until the first one ends.
            self.procs.start_master("--prefetch", "0", "--prefetch-seconds", "0")
            self.procs.start_worker(1, env=env)
            with executor(self.procs.address) as ex:
                busy = ex.submit(wait_for, marker)
                future = ex.submit(digest, os.urandom(REFERENCE_ABOVE))
                wait_until(lambda: ex.session.arguments.descriptors(), what="the argument's file")
                (seq,) = list(ex.session.arguments._files)
                ex.session.arguments.close([seq])
                write_atomically(marker, "go")
                self.assertTrue(busy.result(DEADLINE))
                error = future.exception(DEADLINE)
                self.assertEqual(error.type, ReportKind.ARGUMENT_UNAVAILABLE, error)
                self.assertIn(f"job {seq}", str(error))
                self.assertEqual(ex.submit(len, b"on").result(DEADLINE), 2)

        return threads.deferToThread(body)

    def test_argument_gone_on_this_machine(self):
        """The job process cannot open the client's closed file: the job fails clearly."""
        return self._argument_gone(None)

    def test_argument_gone_for_another_machine(self):
        """The client cannot send the bytes of a closed file: the job fails clearly."""
        return self._argument_gone({"CW_MACHINE_IDENTITY": "another-machine"})

    def test_durable_master_takes_no_references(self):
        """A master with --state keeps jobs beyond their client: arguments travel as bytes."""
        state = os.path.abspath(self.mktemp())
        blob = os.urandom(REFERENCE_ABOVE + 1)

        def body():
            self.procs.start_master("--state", state)
            self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                self.assertFalse(ex.session.references)
                value, referenced = ex.submit(digest, blob).result(DEADLINE)
                self.assertEqual((value, referenced), (hashlib.sha256(blob).hexdigest(), 0))

        return threads.deferToThread(body)

    def test_cancelled_job_closes_its_file(self):
        """A queued job cancelled by its client: its argument's file is closed at once."""
        marker = os.path.abspath(self.mktemp())

        def body():
            self.procs.start_master("--prefetch", "0", "--prefetch-seconds", "0")
            self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                busy = ex.submit(wait_for, marker)
                future = ex.submit(digest, os.urandom(REFERENCE_ABOVE))
                wait_until(lambda: ex.session.arguments.descriptors(), what="the argument's file")
                self.assertTrue(future.cancel())
                self.assertEqual(ex.session.arguments.descriptors(), [])
                write_atomically(marker, "go")
                self.assertTrue(busy.result(DEADLINE))
                self.assertLessEqual(client_memory_files(), self.files_before)

        return threads.deferToThread(body)

    def test_map_in_chunks(self):
        """map(chunksize=N) sends chunks of big arguments by reference too; results right and in order."""
        blobs = [os.urandom(REFERENCE_ABOVE // 2 + i) for i in range(9)]

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                got = list(ex.map(digest, blobs, chunksize=3, timeout=DEADLINE))
                self.assertEqual([value for value, _ in got], [hashlib.sha256(b).hexdigest() for b in blobs])
                self.assertGreater(got[-1][1], 0, "no chunk went by reference")
                wait_until(lambda: not ex.session.arguments.descriptors(), what="the files to close")

        return threads.deferToThread(body)

    def _restart(self, *options: str):
        """
        Jobs whose arguments lie in the client wait in a master that is
        SIGKILLed and started again (with C{options}): the client resends
        them (as references, or as bytes to a master that takes none) and
        every result comes right; its files are closed after.
        """
        blobs = [os.urandom(REFERENCE_ABOVE + i) for i in range(5)]

        def body():
            listen = f"tcp:{free_port()}:interface=127.0.0.1"
            address = self.procs.start_master(listen=listen)
            with executor(address, reconnect_timeout=60) as ex:
                futures = [ex.submit(digest, blob) for blob in blobs]
                self.assertEqual(len(ex.session.arguments.descriptors()), len(blobs))
                self.procs.master.kill()
                self.procs.master.wait(30)
                wait_until(
                    lambda: ex.status()["connection"] == "reconnecting", timeout=10, what="reconnecting"
                )
                self.procs.start_master(*options, listen=listen)
                wait_until(lambda: ex.session.reconnects, timeout=30, what="the client to reconnect")
                self.assertEqual(ex.session.references, not options)
                if options:
                    self.assertEqual(ex.session.arguments.descriptors(), [], "the bytes were not taken back")
                self.procs.start_worker(1)
                for blob, future in zip(blobs, futures, strict=True):
                    value, _ = future.result(DEADLINE)
                    self.assertEqual(value, hashlib.sha256(blob).hexdigest())
                files_closed(ex, self.files_before)

        return threads.deferToThread(body)

    def test_master_restarted(self):
        """A master that takes references again: the client resends the references."""
        return self._restart()

    def test_master_replaced_by_one_with_state(self):
        """A new master with --state takes no references: the client sends the bytes instead."""
        return self._restart("--state", os.path.abspath(self.mktemp()))
