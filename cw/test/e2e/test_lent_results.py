"""
End-to-end tests of big results lent by reference (issue 18): a client on
its worker's machine maps the result from the worker's memory file instead
of receiving its bytes through the master, against a real C{twistd
cw-master} and C{twistd cw-worker}.  Content intact; the worker's files
closed once the client took them, or once the client is gone; a client
elsewhere, or of a master that stores results, gets the bytes; a worker
gone before the client opened its file costs the job a second run, or a
clear error.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import session as session_module
from cw.client.session import ClientProtocol
from cw.errors import WorkerLost
from cw.test.jobs import block_until
from cw.test.procs import DEADLINE, Processes, executor, memory_files, wait_until
from cw.wire import commands as P
from cw.worker import shared

try:
    import numpy
except ImportError:  # NumPy is optional (the test extra)
    numpy = None

MB = 1_000_000


def pattern(size: int, seed: int) -> bytearray:
    """C{size} bytes that differ with C{seed} and along the way (made fast, in the job)."""
    block = hashlib.sha256(b"%d" % seed).digest() * 2048  # 64 KiB
    data = bytearray(block * (size // len(block) + 1))[:size]
    data[:: 1 << 20] = bytes((seed + i) % 256 for i in range(len(data[:: 1 << 20])))
    return data


def big_bytes(size: int, seed: int):
    """A C{bytes} result of C{size}, with its digest to check it against."""
    data = bytes(pattern(size, seed))
    return data, hashlib.sha256(data).hexdigest()


def big_view(size: int, seed: int):
    """A C{memoryview} result (loaded as a view of what the client received), with its digest."""
    data = pattern(size, seed)
    return memoryview(data), hashlib.sha256(data).hexdigest()


def view_when(flag: str, size: int, seed: int):
    """L{big_view} once C{flag} exists."""
    block_until(flag, timeout=DEADLINE)
    return big_view(size, seed)


def big_array(n: int):
    """A NumPy array of C{n} float64s."""
    import numpy

    return numpy.arange(n, dtype=numpy.float64) * 0.5


def from_mapping(view) -> bool:
    """Whether C{view} (a memoryview or array) lies in a mapping of a memory file (not received bytes)."""
    base = view
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return False


def digest(view) -> str:
    return hashlib.sha256(view).hexdigest()


class LentResultsTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        if not shared.supported():
            raise unittest.SkipTest("no memfd_create or /proc here: results go through the sockets")
        self.procs = Processes(self, self.mktemp())

    def worker_files_closed(self, worker) -> None:
        """Wait until the worker holds none of its memory files (none lent, none in use)."""
        wait_until(lambda: memory_files(worker.pid) == 0, what="the worker to close its memory files")

    def test_big_results_lent(self):
        """
        50 MB and 300 MB results (bytes, a memoryview, an array) arrive
        intact through a mapping of the worker's memory file, and the
        worker closes its files once the client took them.
        """

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                data, expected = ex.submit(big_bytes, 50 * MB, 1).result(DEADLINE)
                self.assertEqual((len(data), digest(data)), (50 * MB, expected))
                view, expected = ex.submit(big_view, 300 * MB, 2).result(DEADLINE)
                self.assertEqual((len(view), digest(view)), (300 * MB, expected))
                self.assertTrue(from_mapping(view), "the result was not mapped from the worker's file")
                self.assertFalse(view.readonly)
                del view
                if numpy is not None:
                    array = ex.submit(big_array, 50 * MB // 8).result(DEADLINE)
                    self.assertTrue(numpy.array_equal(array, big_array(50 * MB // 8)))
                    self.assertTrue(from_mapping(array), "the array was not mapped from the worker's file")
                    self.assertTrue(array.flags.writeable)
                    self.assertEqual(array.ctypes.data % 64, 0)
                self.worker_files_closed(worker)

        return threads.deferToThread(body)

    def test_client_elsewhere_gets_bytes(self):
        """A client on another machine (another identity) gets the result's bytes through the master."""
        self.patch(session_module, "machine_identity", lambda: "another-machine")

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                view, expected = ex.submit(big_view, 20 * MB, 3).result(DEADLINE)
                self.assertEqual(digest(view), expected)
                self.assertFalse(from_mapping(view), "a client elsewhere got a reference")
                self.worker_files_closed(worker)

        return threads.deferToThread(body)

    def test_master_with_state_gets_bytes(self):
        """A master that may store results for absent clients (C{--state}) gets their bytes."""

        def body():
            self.procs.start_master("--state", os.path.abspath(self.mktemp()))
            self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                view, expected = ex.submit(big_view, 20 * MB, 4).result(DEADLINE)
                self.assertEqual(digest(view), expected)
                self.assertFalse(from_mapping(view), "a result that the master may store was lent")

        return threads.deferToThread(body)

    def test_client_gone_before_release(self):
        """
        A client that took a lent result but never released it (it died):
        the worker closes the file once the master forgets the client.
        """
        send = ClientProtocol.callRemote

        def no_release(proto, command, **kwargs):
            if command is P.ReleaseResults:
                return None
            return send(proto, command, **kwargs)

        self.patch(ClientProtocol, "callRemote", no_release)

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                view, expected = ex.submit(big_view, 20 * MB, 5).result(DEADLINE)
                self.assertEqual(digest(view), expected)
                self.assertTrue(from_mapping(view))
                # The worker's own mapping of the file (Python's mmap holds a
                # duplicate descriptor) goes once its answer is handled, which
                # may be just after the result reached this client.
                wait_until(lambda: memory_files(worker.pid) <= 1, what="the worker to unmap the result")
                self.assertEqual(memory_files(worker.pid), 1, "the worker does not hold the lent file")
            self.worker_files_closed(worker)
            # The client's mapping outlives the worker's file.
            self.assertEqual(digest(view), expected)

        return threads.deferToThread(body)

    def test_draining_worker_sends_bytes(self):
        """A worker that drains (it leaves soon) sends its big results' bytes: none is lent."""
        flag = os.path.abspath(self.mktemp())

        def body():
            self.procs.start_master()
            stopping = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                future = ex.submit(view_when, flag, 20 * MB, 8)
                wait_until(lambda: memory_files(stopping.pid) > 0, what="the job to start")
                stopping.send_signal(signal.SIGTERM)
                wait_until(lambda: "Draining" in Path(stopping.log).read_text(), what="the worker to drain")
                Path(flag).touch()
                view, expected = future.result(DEADLINE)
                self.assertEqual(digest(view), expected)
                self.assertFalse(from_mapping(view), "a draining worker lent a result")
            stopping.wait(DEADLINE)
            self.procs.workers.remove(stopping)

        return threads.deferToThread(body)

    def test_drained_worker_waits_for_release(self):
        """
        A worker asked to stop right after it lent a result stays until the
        client has taken it: the client must find it alive to map its file.
        """
        send = ClientProtocol.callRemote
        held: list = []

        def late_release(proto, command, **kwargs):
            if command is P.ReleaseResults:
                held.append((proto, kwargs))
                return None
            return send(proto, command, **kwargs)

        self.patch(ClientProtocol, "callRemote", late_release)

        def body():
            self.procs.start_master()
            stopping = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                view, expected = ex.submit(big_view, 20 * MB, 9).result(DEADLINE)
                self.assertTrue(from_mapping(view))
                stopping.send_signal(signal.SIGTERM)
                wait_until(
                    lambda: "for clients to take 1 results" in Path(stopping.log).read_text(),
                    what="the worker to wait for its lent result",
                )
                self.assertIsNone(stopping.poll(), "the worker left before its lent result was taken")
                proto, kwargs = held.pop()
                ex.session.reactor.callFromThread(send, proto, P.ReleaseResults, **kwargs)
                stopping.wait(DEADLINE)
                self.procs.workers.remove(stopping)
                self.assertEqual(digest(view), expected)

        return threads.deferToThread(body)

    def kill_worker_first(self, killed: list) -> None:
        """
        Make the client find the worker that lent it a result dead, as if
        the worker died between sending the reference and the client
        opening its file: kill it (SIGKILL) just before the client opens it.
        """
        take = session_module.map_private

        def killing(pid, *args, **kwargs):
            if not killed:
                worker = next(w for w in self.procs.workers if w.pid == pid)
                os.kill(pid, signal.SIGKILL)
                worker.wait(DEADLINE)
                self.procs.workers.remove(worker)
                killed.append(pid)
            return take(pid, *args, **kwargs)

        self.patch(session_module, "map_private", killing)

    def test_worker_gone_before_client_opens(self):
        """The worker that lent a result died before the client opened it: the job runs again elsewhere."""
        killed: list[int] = []
        self.kill_worker_first(killed)

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                view, expected = ex.submit(big_view, 20 * MB, 6).result(DEADLINE)
                self.assertEqual(len(killed), 1, "no worker lent the result")
                self.assertEqual(digest(view), expected)
                self.assertTrue(from_mapping(view))

        return threads.deferToThread(body)

    def test_worker_gone_without_resubmission(self):
        """
        Without resubmission (C{reconnect_timeout=0}: the client keeps no
        sent jobs), a result whose worker died before the client opened it
        fails as L{WorkerLost}, naming the job, the worker and what to do.
        """
        killed: list[int] = []
        self.kill_worker_first(killed)

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            with executor(self.procs.address, reconnect_timeout=0) as ex:
                future = ex.submit(big_view, 20 * MB, 7)
                error = future.exception(DEADLINE)
            self.assertIsInstance(error, WorkerLost)
            message = str(error)
            for part in (f"worker process {killed[0]}", os.uname().nodename, "submit the job again"):
                self.assertIn(part, message)

        return threads.deferToThread(body)
