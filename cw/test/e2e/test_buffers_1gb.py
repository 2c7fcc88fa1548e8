"""
A gigabyte each way with big buffers out of band (L{cw.wire.pickling}):
a real C{twistd cw-master} and C{cw-worker}, one job each way per test,
content-checked with CRC-32 computed in the job and at the client.  Slow
and memory-hungry (a few GB), so in a module of its own.

With NumPy, the job writes into the array it was given (writable, as with
C{ProcessPoolExecutor}) and returns it; the job process, which loads the
array as a view of the received bytes and sends it back without pickling
it into a stream, holds about one copy of it.

These tests play a client on another machine than the worker
(L{arguments_travel}), so that the gigabytes cross the sockets and the
master; the last one is the client on the worker's machine, whose
gigabytes go through memory files instead.
"""

from __future__ import annotations

import time
import zlib

from twisted.internet import threads
from twisted.logger import Logger
from twisted.trial import unittest

from cw.test.procs import (
    DEADLINE,
    Processes,
    arguments_travel,
    check_path,
    executor,
    job_processes,
    peak_rss_mib,
)

try:
    import numpy
except ImportError:  # NumPy is in the test extra; without it, its tests skip
    numpy = None

log = Logger()

GB = 1 << 30

#: Byte values flipped by the jobs (their own inverse).
FLIP = bytes(255 - i for i in range(256))


def pattern(seed: int):
    """1 GB of 8-byte words, each different (a multiplicative hash of its index): fast to make."""
    words = numpy.arange(seed, seed + GB // 8, dtype="u8")
    words *= numpy.uint64(0x9E3779B97F4A7C15)
    return words


def flip_array(a):
    """CRC-32 of the array as it arrived, then the array with every bit flipped in place."""
    crc = zlib.crc32(a)
    numpy.invert(a, out=a)
    return crc, a


def flip_bytes(data):
    """CRC-32 of the bytes as they arrived, and the bytes with every bit flipped."""
    return zlib.crc32(data), data.translate(FLIP)


class GigabyteTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def round_trip(self, body, path: str = "sockets"):
        """
        Run C{body(executor)} against a new master and worker, its client
        on another machine (C{path} C{"sockets"}) or on the worker's
        (C{"memory"}, see L{check_path}); the processes' peak memory.
        """
        if path == "sockets":
            arguments_travel(self)

        def run():
            began = time.monotonic()
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            with executor(self.procs.address) as ex:
                check_path(self, ex, path)
                body(ex)
            peaks = {"master": peak_rss_mib(self.procs.master.pid)}
            worker = self.procs.workers[0]
            peaks["worker"] = peak_rss_mib(worker.pid)
            for pid in job_processes(worker.pid):
                peaks["job process"] = peak_rss_mib(pid)
            log.info(
                "{test}: {seconds:.1f} s, peak RSS (MiB): {peaks}",
                test=self.id(),
                seconds=time.monotonic() - began,
                peaks=peaks,
            )
            return peaks

        return threads.deferToThread(run)

    def test_numpy_each_way(self):
        """
        A 1 GB array goes to a job, which checks it, flips it in place and
        returns it: both CRCs match, and the job process held about one copy.
        """
        if numpy is None:
            raise unittest.SkipTest("NumPy is not installed")

        def body(ex):
            a = pattern(18)
            crc = zlib.crc32(a)
            future = ex.submit(flip_array, a)
            crc_in_job, returned = future.result(DEADLINE * 3)
            self.assertEqual(crc_in_job, crc)
            self.assertEqual(returned.nbytes, GB)
            self.assertTrue(returned.flags.writeable)
            numpy.invert(returned, out=returned)
            self.assertEqual(zlib.crc32(returned), crc)

        def check(peaks):
            self.assertLess(peaks["job process"], (GB >> 20) * 1.5, peaks)

        return self.round_trip(body).addCallback(check)

    def bytes_each_way(self, ex, seed: int) -> None:
        """1 GB of bytes to a job, and 1 GB of other bytes back: both CRCs match."""
        data = pattern(seed).tobytes() if numpy is not None else bytes(range(256)) * (GB // 256)
        crc = zlib.crc32(data)
        crc_in_job, returned = ex.submit(flip_bytes, data).result(DEADLINE * 3)
        del data
        self.assertEqual(crc_in_job, crc)
        self.assertIs(type(returned), bytes)
        self.assertEqual(len(returned), GB)
        self.assertEqual(zlib.crc32(returned.translate(FLIP)), crc)

    def test_bytes_each_way(self):
        """
        1 GB of bytes to a job, and 1 GB of other bytes back: both CRCs
        match, and the master and the worker each held about one copy at
        most: neither keeps the argument while the result passes (the
        worker hands a lone job's argument to its job process; the master
        lets go of it once dispatched, since the client keeps it for a
        rerun).
        """

        def check(peaks):
            for role in ("master", "worker"):
                self.assertLess(peaks[role], (GB >> 20) * 1.5, peaks)

        return self.round_trip(lambda ex: self.bytes_each_way(ex, 19)).addCallback(check)

    def test_bytes_each_way_on_the_workers_machine(self):
        """
        The same for a client on the worker's machine: the argument stays
        in the client's memory (the job process maps it) and the result in
        the job process's (lent: the client maps it), so the master, which
        sees neither, stays far below a gigabyte.
        """

        def check(peaks):
            self.assertLess(peaks["master"], 256, peaks)

        return self.round_trip(lambda ex: self.bytes_each_way(ex, 20), "memory").addCallback(check)
