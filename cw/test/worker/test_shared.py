"""
Tests for L{cw.worker.shared}: big payloads between a real worker (this
process, L{PoolHarness}) and its real job processes cross through memory
files, and no file outlives its use, whatever dies when.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import signal
import subprocess
import sys
import time

import cloudpickle

try:
    import numpy
except ImportError:  # NumPy is optional (the test extra)
    numpy = None
from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial import unittest

from cw import system
from cw.core.payload import Segments
from cw.test.procs import dev_shm, memory_files, until
from cw.test.worker.test_pool import DEADLINE, PoolHarness
from cw.wire import commands as P
from cw.wire import memfile, pickling
from cw.wire.streaming import ChunkReceiver
from cw.worker import child, shared
from cw.worker.pool import BatchCall, ChildLink
from cw.worker.service import WorkerProtocol

#: Bytes of the big payloads in these tests (past L{shared.THRESHOLD}).
BIG = 3 * shared.THRESHOLD + 7


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def reverse_and_report(data):
    """C{data} reversed, with how its job process got payloads and what it holds."""
    return bytes(data[::-1]), child.stats["shared_in"], memory_files()


def report():
    """This job process's counts of shared payloads and the memory files it holds."""
    return child.stats["shared_in"], child.stats["shared_out"], memory_files()


def inspect_array(array):
    """
    Where C{array} lies (its address modulo 64), whether it is writable and
    a view of a memory file's mapping, and its sum.
    """
    mapped = False
    base = array
    while base is not None:
        mapped = mapped or isinstance(getattr(base, "obj", None), mmap.mmap)
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else None
    array[0] += 0  # raises if read-only
    return array.ctypes.data % 64, array.flags.writeable, mapped, int(array.sum())


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


class KillsOnArrival:
    """Unpickling this kills the process doing it (halfway through its payload)."""

    def __reduce__(self):
        return (kill_self, ())


def sleep_with(data, seconds):
    time.sleep(seconds)
    return len(data)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


class JobsReceiver(ChunkReceiver, amp.AMP):
    """Receives as the worker does from its master: big batches into memory files (moved by C{shift})."""

    shift = 0

    def __init__(self):
        super().__init__()
        self.boxes = []

    def assemble_in_file(self, name, first):
        lead = WorkerProtocol.assemble_in_file(self, name, first)
        return None if lead is None else lead + self.shift

    def ampBoxReceived(self, box):
        self.boxes.append(box)


def received_jobs(jobs: list, shift: int = 0) -> list:
    """C{jobs} as the worker's master connection receives them (L{JobsReceiver})."""
    box = amp.AmpBox()
    P.JobBatch().toBox(b"jobs", box, {"jobs": jobs}, None)
    receiver = JobsReceiver()
    receiver.shift = shift
    receiver.makeConnection(StringTransport())
    wire = box.serialize()
    for at in range(0, len(wire), 1 << 16):
        receiver.dataReceived(wire[at : at + (1 << 16)])
    [received] = receiver.boxes
    return P.decode_jobs(received[b"jobs"])


class SharedMemoryTests(PoolHarness, unittest.TestCase):
    timeout = 120

    def setUp(self):
        if not shared.supported():
            raise unittest.SkipTest("no memfd_create or /proc here: payloads go through the pipe")
        self.shm_before = dev_shm()
        # Memory files of this whole process (trial -j runs many modules in
        # one): those of earlier tests are not this test's.
        self.files_before = memory_files()

    def make_worker(self, *args, **kwargs):
        # Added first, so run last: after the pool has stopped.
        self.addCleanup(self.files_closed)
        return super().make_worker(*args, **kwargs)

    def files_closed(self) -> defer.Deferred:
        """
        Wait until this test's memory files are closed: a job process's
        reply file is closed when its link learns the process ended (its
        C{processEnded}), which may come after the pool's stop returned,
        and would otherwise be counted by the next test in this process.
        """
        return until(
            lambda: gc.collect() >= 0 and memory_files() <= self.files_before,
            what="the test's memory files to be closed",
        )

    def forget_results(self) -> None:
        """Drop the payloads of the results received so far (their count stays)."""
        results = self.proto.results
        for seq in results:
            results[seq] = None

    def links(self, worker) -> list[ChildLink]:
        return list(worker.pool.processes)

    @defer.inlineCallbacks
    def assert_no_stray_files(self, worker):
        """
        The worker holds a memory file for each job process's reply and
        nothing else (results dropped), and nothing was left in /dev/shm.
        A job process killed meanwhile has its reply file closed when its
        end is noticed (L{ChildLink.connectionLost}): a bounded wait.
        """

        def held() -> int:
            gc.collect()
            return memory_files() - self.files_before

        def expected() -> int:
            return sum(link.reply_fd is not None for link in self.links(worker))

        try:
            yield until(lambda: held() == expected(), what="only the reply files to be open")
        except AssertionError:
            self.assertEqual(held(), expected())
        self.assertEqual(dev_shm() - self.shm_before, set())

    @defer.inlineCallbacks
    def warm(self, worker) -> int:
        """Run a job on each job process; return the number of open fds then."""
        yield self.assert_serves_normally(worker, len(self.links(worker)))
        self.forget_results()
        gc.collect()
        return open_fds()

    @defer.inlineCallbacks
    def test_big_payloads_both_ways(self):
        """
        A big argument reaches the job process through a memory file, its
        big result comes back through one, both intact; afterwards neither
        side holds a file it does not need and the worker's fd count is
        back where it was.
        """
        worker = self.make_worker()
        baseline = yield self.warm(worker)
        blob = os.urandom(BIG)
        (result,) = yield self.run_jobs(worker, [(reverse_and_report, blob)])
        self.assertEqual(result.status, P.Outcome.OK)
        self.assertIsInstance(result.payload, memoryview)
        self.assertIsInstance(result.payload.obj, mmap.mmap, "the result did not come through shared memory")
        value, shared_in, held = pickling.loads(result.payload)
        self.assertEqual(value, blob[::-1])
        self.assertEqual(shared_in, 1)
        self.assertEqual(held, 1, "the job process holds its argument's file (mapped) while it runs")
        del result, value
        self.forget_results()
        (after,) = yield self.run_jobs(worker, [(report,)])
        shared_in, shared_out, held = pickling.loads(after.payload)
        self.assertEqual((shared_in, shared_out, held), (1, 1, 0))
        self.forget_results()
        yield self.assert_no_stray_files(worker)
        self.assertEqual(open_fds(), baseline)

    @defer.inlineCallbacks
    def test_batch_of_small_and_big(self):
        """Small and big payloads in one batch each reach their job, results in order."""
        worker = self.make_worker()
        yield self.warm(worker)
        blobs = [b"small", os.urandom(BIG), b"", os.urandom(shared.THRESHOLD), b"x" * 100]
        jobs = [
            P.Job(1, 1000 + i, cloudpickle.dumps((reverse_and_report, (blob,), {})))
            for i, blob in enumerate(blobs)
        ]
        d = worker.pool.doWork(P.RunBatch, jobs=jobs, _cw_call=BatchCall()).addTimeout(DEADLINE, reactor)
        # What the answer held, not the answer (a yielded Deferred keeps its result).
        d.addCallback(
            lambda answer: [
                (
                    r.seq,
                    pickling.loads(r.payload)[0],
                    isinstance(getattr(r.payload, "obj", None), mmap.mmap),
                )
                for r in answer["results"]
            ]
        )
        results = yield d
        self.assertEqual(
            results,
            [
                (job.seq, blob[::-1], len(blob) >= shared.THRESHOLD)
                for job, blob in zip(jobs, blobs, strict=True)
            ],
        )
        yield self.assert_no_stray_files(worker)

    @defer.inlineCallbacks
    def test_arrays_aligned_and_writable(self):
        """
        A NumPy array that follows a payload of odd length in the batch's
        memory file loads aligned (at a multiple of 64 bytes) and
        writable, without a copy: a view of the mapping.
        """
        if numpy is None:
            raise unittest.SkipTest("NumPy is not installed")
        worker = self.make_worker()
        yield self.warm(worker)
        array = numpy.arange(shared.THRESHOLD // 4, dtype="u4")
        calls = [(len, os.urandom(BIG)), (inspect_array, array)]
        jobs = [
            P.Job(1, 2000 + i, pickling.dumps(pickling.call_value(f, (a,), {})))
            for i, (f, a) in enumerate(calls)
        ]
        d = worker.pool.doWork(P.RunBatch, jobs=jobs, _cw_call=BatchCall()).addTimeout(DEADLINE, reactor)
        d.addCallback(lambda answer: [pickling.loads(r.payload) for r in answer["results"]])
        results = yield d
        self.assertEqual(results, [BIG, (0, True, True, int(array.sum()))])

    def run_received(self, worker, calls, shift: int = 0) -> tuple[defer.Deferred, list, list]:
        """
        Run C{(function, argument)} calls as jobs of one batch received as
        the worker receives batches (L{received_jobs}, their lead moved by
        C{shift}): their loaded results; the jobs; the offsets at which the
        worker wrote payloads into a memory file of its own.
        """
        written = []
        write_parts = shared.write_parts
        self.patch(
            shared, "write_parts", lambda fd, parts, at=0: written.append(at) or write_parts(fd, parts, at)
        )
        options = P.encode_options(timeout=1000)  # a header of odd length before the payload
        jobs = [
            P.Job(1, 3000 + i, pickling.dumps(pickling.call_value(f, (a,), {})), options, b"")
            for i, (f, a) in enumerate(calls)
        ]
        jobs = received_jobs(jobs, shift)
        d = worker.pool.doWork(P.RunBatch, jobs=jobs, _cw_call=BatchCall()).addTimeout(DEADLINE, reactor)
        d.addCallback(lambda answer: [pickling.loads(r.payload) for r in answer["results"]])
        return d, jobs, written

    @defer.inlineCallbacks
    def test_received_file_handed_on(self):
        """
        A batch of big payloads received into a memory file (the worker's
        master connection, L{WorkerProtocol.assemble_in_file}) reaches the
        job process in that same file, not copied into one of the worker's
        own.  Its first payload starts aligned there; the second, which
        does not, is copied to the end of the same file, aligned: arrays
        load aligned.
        """
        worker = self.make_worker()
        yield self.warm(worker)
        blob = os.urandom(BIG)
        calls = [(reverse_and_report, blob), (len, os.urandom(BIG))]
        if numpy is not None:
            array = numpy.arange(shared.THRESHOLD // 4, dtype="u4")
            calls[1] = (inspect_array, array)
        d, jobs, written = self.run_received(worker, calls)
        (mapping, offset), (other, unaligned) = map(memfile.placed, [jobs[0].payload, jobs[1].payload])
        self.assertIs(other, mapping, "one file for the batch")
        self.assertEqual(offset % shared.ALIGN, 0)
        self.assertNotEqual(unaligned % shared.ALIGN, 0)
        (value, shared_in, _), second = yield d
        self.assertEqual((value, shared_in), (blob[::-1], 2))
        self.assertEqual(written, [shared.aligned(len(mapping))], "only the second, to the end of that file")
        if numpy is not None:
            self.assertEqual(second, (0, True, True, int(array.sum())))
        del jobs, mapping, other
        self.forget_results()
        yield self.assert_no_stray_files(worker)

    @defer.inlineCallbacks
    def test_received_unaligned_copied(self):
        """A received payload that does not start aligned in its file is copied to its end, aligned."""
        worker = self.make_worker()
        yield self.warm(worker)
        blob = os.urandom(BIG)
        d, jobs, written = self.run_received(worker, [(reverse_and_report, blob)], shift=1)
        mapping, offset = memfile.placed(jobs[0].payload)
        self.assertNotEqual(offset % shared.ALIGN, 0)
        [(value, shared_in, _)] = yield d
        self.assertEqual((value, shared_in, written), (blob[::-1], 1, [shared.aligned(len(mapping))]))
        del jobs, mapping
        yield self.assert_no_stray_files(worker)

    @defer.inlineCallbacks
    def test_job_process_killed_while_receiving(self):
        """
        A job process killed halfway through unpickling an argument that
        lies in shared memory: the job reports the crash, the worker goes
        on, and the memory file is gone with the call.
        """
        worker = self.make_worker()
        baseline = yield self.warm(worker)
        (victim,) = self.links(worker)
        victim_pid = victim.pid
        (result,) = yield self.run_jobs(
            worker, [(sleep_with, [os.urandom(BIG), KillsOnArrival(), b"y" * BIG], 0)]
        )
        self.assertEqual(result.status, P.Outcome.CRASHED)
        self.assertIn("SIGKILL", P.read_error_report(result.payload)["message"])
        self.forget_results()
        pids = yield self.assert_serves_normally(worker, 10)
        self.assertNotIn(victim_pid, pids)
        self.forget_results()
        yield self.assert_no_stray_files(worker)
        self.assertEqual(open_fds(), baseline)

    @defer.inlineCallbacks
    def test_job_killed_at_its_timeout(self):
        """A job killed at its timeout while its argument is mapped leaves no file behind."""
        worker = self.make_worker()
        baseline = yield self.warm(worker)
        (result,) = yield self.run_jobs(worker, [(sleep_with, os.urandom(BIG), 60)], timeout=0.5)
        self.assertEqual(result.status, P.Outcome.CRASHED)
        self.forget_results()
        yield self.assert_serves_normally(worker, 1)
        self.forget_results()
        yield self.assert_no_stray_files(worker)
        self.assertEqual(open_fds(), baseline)

    @defer.inlineCallbacks
    def test_refused_goes_through_the_pipe(self):
        """
        A job process that cannot open the worker's memory files refuses
        the call; the worker sends it again through the pipe, and from then
        on sends that process everything through the pipe.
        """
        gone = dead_pid()
        self.patch(ChildLink, "owner_pid", staticmethod(lambda: gone))
        worker = self.make_worker()
        yield self.warm(worker)
        (link,) = self.links(worker)
        blob = os.urandom(BIG)
        (result,) = yield self.run_jobs(worker, [(reverse_and_report, blob)])
        self.assertEqual(result.status, P.Outcome.OK)
        value, shared_in, held = pickling.loads(result.payload)
        self.assertEqual((value, shared_in, held), (blob[::-1], 0, 0))
        self.assertFalse(link.shares)
        self.assertNotIsInstance(getattr(result.payload, "obj", None), mmap.mmap)
        del result
        self.forget_results()
        yield until(lambda: memory_files() == self.files_before, what="no memory file to be open")

    @defer.inlineCallbacks
    def test_unsupported_goes_through_the_pipe(self):
        """Where memory files cannot be made, big payloads go through the pipe."""
        self.patch(memfile, "_supported", False)
        worker = self.make_worker()
        yield self.warm(worker)
        blob = os.urandom(BIG)
        (result,) = yield self.run_jobs(worker, [(reverse_and_report, blob)])
        value, shared_in, _ = pickling.loads(result.payload)
        self.assertEqual((value, shared_in), (blob[::-1], 0))
        self.assertEqual(memory_files(), self.files_before)


def resident_kib(view: memoryview) -> int:
    """KiB of the mapping holding C{view} (writable) that this process has resident (its smaps' Rss)."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("the mapping is not in /proc/self/smaps")


class MapPrivateTests(unittest.TestCase):
    """L{memfile.map_private}: every page mapped at once, unless told not to (a reactor thread)."""

    def test_populate_or_not(self):
        fd = shared.create()
        self.addCleanup(os.close, fd)
        shared.write_parts(fd, [os.urandom(8 << 20)])
        shared.seal(fd)
        populated = memfile.map_private(os.getpid(), fd, 8 << 20)
        lazy = memfile.map_private(os.getpid(), fd, 8 << 20, populate=False)
        if resident_kib(populated) < 4 << 10:
            raise unittest.SkipTest("this kernel cannot populate a mapping (MADV_POPULATE_READ: Linux 5.14)")
        self.assertLess(resident_kib(lazy), 1 << 10)
        self.assertEqual(bytes(lazy[:16]), bytes(populated[:16]))


class WritePartsTests(unittest.TestCase):
    """L{memfile.write_parts}: the parts, one after another; big ones' pages mapped in bulk first."""

    def test_big_parts_populated_first(self):
        populated = []
        self.patch(memfile, "populate", lambda view: populated.append(len(view)) or system.populate(view))
        fd = memfile.create()
        self.addCleanup(os.close, fd)
        big = bytes(memfile.POPULATE_ABOVE + 1)  # pages never touched
        mapping = mmap.mmap(-1, memfile.POPULATE_ABOVE)  # nor these
        self.addCleanup(mapping.close)
        small = b"x" * (memfile.POPULATE_ABOVE - 1)
        end = memfile.write_parts(fd, [small, Segments([big, b"y"]), mapping], 3)
        self.assertEqual(populated, [len(big), len(mapping)])
        self.assertEqual(end, 3 + len(small) + len(big) + 1 + len(mapping))
        self.assertEqual(os.pread(fd, end, 0), bytes(3) + small + big + b"y" + bytes(len(mapping)))


class LentResultsTests(unittest.TestCase):
    """L{shared.LentResults}: a reply file stays open while any result lent from it is not released."""

    def reply(self, *keys):
        fd = shared.create()
        shared.write_parts(fd, [b"a" * 100, b"b" * 100])
        shared.seal(fd)
        return shared.ReplyFile(fd, {key: (i * 100, 100) for i, key in enumerate(keys)})

    def test_closed_when_all_released(self):
        before = memory_files()
        lent = shared.LentResults()
        reply = self.reply((1, 1), (2, 1))
        lent.lend((1, 1), reply)
        lent.lend((2, 1), reply)
        reply.drop()  # the batch's answer was handled
        self.assertEqual(memory_files(), before + 1)
        lent.release([(1, 1), (9, 9)])
        self.assertEqual(memory_files(), before + 1)
        lent.release([(2, 1)])
        self.assertEqual((memory_files(), len(lent)), (before, 0))

    def test_forget_client_and_clear(self):
        before = memory_files()
        lent = shared.LentResults()
        first, second = self.reply((1, 1)), self.reply((2, 1))
        lent.lend((1, 1), first)
        lent.lend((2, 1), second)
        first.drop()
        second.drop()
        lent.forget_client(1)
        self.assertEqual(memory_files(), before + 1)
        lent.clear()
        self.assertEqual(memory_files(), before)

    def test_reference_maps_the_result(self):
        """A client maps exactly the result a reference names (L{memfile.map_private} with an offset)."""
        reply = self.reply((1, 1), (1, 2))
        where = reply.reference((1, 2), 5)
        self.assertEqual((where.pid, where.offset, where.length, where.worker), (os.getpid(), 100, 100, 5))
        view = memfile.map_private(where.pid, where.fd, where.length, where.inode, "worker", where.offset)
        self.assertEqual(bytes(view), b"b" * 100)
        with self.assertRaises(OSError):
            memfile.map_private(where.pid, where.fd, where.length, where.inode + 1, "worker", where.offset)
        reply.drop()
        # The mapping outlives the file's descriptor.
        self.assertEqual(bytes(view), b"b" * 100)
