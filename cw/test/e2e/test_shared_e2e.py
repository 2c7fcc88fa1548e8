"""
End-to-end tests of big payloads between a worker and its job processes
through shared memory (L{cw.worker.shared}), against a real C{twistd
cw-master} and C{twistd cw-worker}: content intact both ways, tiny jobs
interleaved, and nothing left behind when the worker is killed mid-job.
"""

from __future__ import annotations

import os
import signal
import time

from twisted.internet import threads
from twisted.trial import unittest

from cw.errors import WorkerLost
from cw.system import write_atomically
from cw.test.jobs import square
from cw.test.procs import (
    DEADLINE,
    Processes,
    arguments_travel,
    dev_shm,
    executor,
    job_processes,
    mapped_memory_files,
    memory_files,
    process_exists,
    wait_until,
)
from cw.test.worker.test_shared import report
from cw.worker import shared

#: Bytes of the big payloads here: well past L{shared.THRESHOLD}.
BIG = 20 * shared.THRESHOLD + 3


def reverse(data):
    return data[::-1]


def hold(data, marker):
    """Say which process holds C{data} (in C{marker}), then keep it mapped for a minute."""
    write_atomically(marker, str(os.getpid()))
    time.sleep(60)
    return len(data)


class SharedMemoryE2ETests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        if not shared.supported():
            raise unittest.SkipTest("no memfd_create or /proc here: payloads go through the pipe")
        self.procs = Processes(self, self.mktemp())
        self.shm_before = dev_shm()
        arguments_travel(self)  # to the worker, which puts them in its own memory files

    def test_big_payloads_both_ways(self):
        """
        Big arguments and results, among tiny jobs, arrive intact, and did
        cross between worker and job process through shared memory.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            blobs = [os.urandom(BIG), os.urandom(shared.THRESHOLD), os.urandom(3 * shared.THRESHOLD)]
            with executor(self.procs.address) as ex:
                futures = []
                for blob in blobs:
                    futures.append((ex.submit(reverse, blob), blob[::-1]))
                    futures += [(ex.submit(square, i), i * i) for i in range(20)]
                for future, expected in futures:
                    self.assertEqual(future.result(DEADLINE), expected)
                shared_in, shared_out, held = ex.submit(report).result(DEADLINE)
            self.assertEqual((shared_in, shared_out, held), (len(blobs), len(blobs), 0))
            self.assertEqual(dev_shm() - self.shm_before, set())

        return threads.deferToThread(body)

    def test_worker_killed_with_payload_in_shared_memory(self):
        """
        A worker SIGKILLed while its job process has the job's argument
        mapped from the worker's memory file: the job process dies with it,
        nothing is left in /dev/shm, and the job fails as its worker lost.
        """
        marker = os.path.abspath(self.mktemp())

        def body():
            self.procs.start_master()
            worker = self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                future = ex.submit_with(hold, (os.urandom(BIG), marker), max_attempts=1)
                wait_until(lambda: os.path.exists(marker), what="the job to start")
                job_pid = int(open(marker).read())
                self.assertEqual(job_processes(worker.pid), [job_pid])
                self.assertEqual(mapped_memory_files(job_pid), 1, "the argument is not mapped")
                self.assertGreaterEqual(memory_files(worker.pid), 1, "the worker holds no memory file")
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(DEADLINE)
                self.procs.workers.remove(worker)
                wait_until(lambda: not process_exists(job_pid), what="the job process to die with its worker")
                self.assertIsInstance(future.exception(DEADLINE), WorkerLost)
            self.assertEqual(dev_shm() - self.shm_before, set())

        return threads.deferToThread(body)
