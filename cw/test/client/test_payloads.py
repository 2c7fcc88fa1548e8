"""
Payloads far beyond AMP's 64 KiB value limit, end to end: a real
C{twistd cw-master} and real C{twistd cw-worker} processes over TCP on
loopback, driven by the blocking client APIs from a thread while trial's
reactor runs.

What a user would notice is checked: big arguments and results arrive
whole (length and SHA-256), a big closure works for every job, tiny jobs
around a huge one each get their own result, and a payload over the
master's limit is refused with a message that names its size and the
limit, after which everything keeps working.

Nothing here is timed.  Each test logs (to trial's C{test.log}) how long
its body took and the peak RSS (C{VmHWM}) of the processes it started.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time

import cloudpickle
from twisted.internet import threads
from twisted.logger import Logger
from twisted.trial import unittest

import cw.client.session
from cw.client import ClientThread, ClusterExecutor, RemoteException, SubmitError
from cw.test.jobs import digest, payload_bytes, square, tagged_square, worker_pid
from cw.test.procs import (
    DEADLINE,
    Processes,
    arguments_travel,
    check_path,
    each_path,
    executor,
    held_client,
    job_processes,
    peak_rss_mib,
    reset_peak_rss,
    wait_until,
)

log = Logger()

MB = 1 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_digest(size: int, seed: int) -> tuple[int, str]:
    """What L{digest} answers for C{payload_bytes(size, seed)}, without keeping the bytes."""
    return size, sha256(payload_bytes(size, seed))


def stated_size(message: str) -> int:
    """The payload size a too-big message states ("... is 2,097,206 bytes, ...")."""
    match = re.search(r" is ([\d,]+) bytes", message)
    if match is None:
        raise AssertionError(f"no size in {message!r}")
    return int(match.group(1).replace(",", ""))


class PayloadTests(unittest.TestCase):
    """
    Big payloads through master, worker and job process, and (each test
    first, L{each_path}) left in the memory of a client on the workers'
    machine: what the user sees must not depend on the path.
    """

    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.began = time.monotonic()
        reset_peak_rss()
        # Registered first, so it runs last: after the processes are stopped.
        self.addCleanup(self.log_duration)

    def log_duration(self):
        log.info(
            "{test}: {seconds:.2f} s, peak RSS of the test (client) process {rss:.0f} MiB",
            test=self.id(),
            seconds=time.monotonic() - self.began,
            rss=peak_rss_mib("self") or 0,
        )

    def log_peak_rss(self) -> dict:
        """Log (and return) the peak RSS of the master, the workers and their job processes."""
        peaks = {"master": peak_rss_mib(self.procs.master.pid)}
        for n, worker in enumerate(self.procs.workers, 1):
            peaks[f"worker {n}"] = peak_rss_mib(worker.pid)
            for pid in sorted(job_processes(worker.pid)):
                peaks[f"worker {n} job process {pid}"] = peak_rss_mib(pid)
        text = ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items() if v is not None)
        log.info("{test}: peak RSS: {text}", test=self.id(), text=text)
        return peaks

    def in_thread(self, func):
        return threads.deferToThread(func)

    def test_100mb_argument(self):
        """
        A 100 MB bytes argument reaches the job whole, by either path: the
        job's length and SHA-256 of it match the client's.
        """
        size = 100 * MB

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            expected = expected_digest(size, 1)
            for path in each_path(self):
                with executor(self.procs.address) as ex:
                    check_path(self, ex, path)
                    future = ex.submit(digest, payload_bytes(size, 1))
                    self.assertEqual(future.result(DEADLINE), expected, path)
                    # The same connection, master and worker carry on.
                    self.assertEqual(ex.submit(square, 12).result(DEADLINE), 144)
            self.log_peak_rss()

        return self.in_thread(body)

    def test_100mb_result(self):
        """A job that returns 100 MB of bytes: the client gets them whole by either path (size, SHA-256)."""
        size = 100 * MB

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            expected = expected_digest(size, 2)
            for path in each_path(self):
                with executor(self.procs.address) as ex:
                    check_path(self, ex, path)
                    result = ex.submit(payload_bytes, size, 2).result(DEADLINE)
                    self.assertIsInstance(result, bytes)
                    self.assertEqual(digest(result), expected, path)
                    del result
                    self.assertEqual(ex.submit(square, 12).result(DEADLINE), 144)
            self.log_peak_rss()

        return self.in_thread(body)

    def test_5mb_closure(self):
        """
        A function that closes over 5 MB of data (bytes and a list) runs
        right in every job, on several workers and job processes, by
        either path.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=2)
            self.procs.start_worker(procs=1)
            blob = payload_bytes(4_500_000, 3)
            numbers = list(range(200_000))
            blob_hash = sha256(blob)

            def probe(i):
                return i, len(blob), blob[i * 1000 : (i + 1) * 1000], sha256(blob), sum(numbers[i:])

            self.assertGreater(len(cloudpickle.dumps(probe)), 5_000_000)
            expected = [
                (i, len(blob), blob[i * 1000 : (i + 1) * 1000], blob_hash, sum(numbers[i:]))
                for i in range(24)
            ]
            before = {}
            for path in each_path(self):
                with executor(self.procs.address) as ex:
                    check_path(self, ex, path)
                    futures = [ex.submit(probe, i) for i in range(12)]
                    mapped = list(ex.map(probe, range(12, 24), timeout=DEADLINE))
                    self.assertEqual([f.result(DEADLINE) for f in futures] + mapped, expected, path)
                    status = ex.status()
                # Every worker ran some of them: the closure reached each one.
                completed = {w["id"]: w["completed"] for w in status["workers"]}
                ran = sorted(n > before.get(w, 0) for w, n in completed.items())
                self.assertEqual(ran, [True, True], path)
                before = completed

        return self.in_thread(body)

    def test_tiny_jobs_around_huge_one(self):
        """
        2,000 tiny jobs with a 60 MB argument in the middle, from one
        client, while a second client sends 1,000 tiny jobs with a 60 MB
        result in the middle: every job gets its own, right result, by
        either path.
        """
        size = 60 * MB

        def second_client(outcome, path):
            got = {}

            def callback(jobid, result):
                if jobid == "huge":
                    result = digest(result)  # keep 60 MB no longer than needed
                got[jobid] = result

            client = ClientThread(callback, self.procs.address)
            try:
                client.start()
                check_path(self, client, path)
                for i in range(1000):
                    if i == 500:
                        client.submit("huge", payload_bytes, size, 5)
                    client.submit(("tiny", i), tagged_square, i)
                client.wait(DEADLINE)
                outcome["results"] = got
            except BaseException as e:
                outcome["error"] = e
            finally:
                client.close()

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=2)
            expected_huge_result = expected_digest(size, 5)
            expected_huge_argument = expected_digest(size, 4)
            for passes, path in enumerate(each_path(self), 1):
                huge = payload_bytes(size, 4)
                outcome = {}
                other = threading.Thread(
                    target=second_client, args=(outcome, path), name="second client", daemon=True
                )
                with executor(self.procs.address) as ex:
                    check_path(self, ex, path)
                    other.start()
                    tiny = []
                    for i in range(2000):
                        if i == 1000:
                            big = ex.submit(digest, huge)
                            huge = None
                        tiny.append(ex.submit(tagged_square, i))
                    self.assertEqual([f.result(DEADLINE) for f in tiny], [(i, i * i) for i in range(2000)])
                    other.join(DEADLINE)
                    self.assertFalse(other.is_alive(), "the second client did not finish")
                    self.assertEqual(big.result(DEADLINE), expected_huge_argument, path)
                    if "error" in outcome:
                        raise outcome["error"]
                    want = {("tiny", i): (i, i * i) for i in range(1000)}
                    want["huge"] = expected_huge_result
                    self.assertEqual(outcome["results"], want, path)
                    status = ex.status()
                self.assertEqual(status["completed"], 3002 * passes)
                self.assertEqual(status["queued"], 0)
            self.log_peak_rss()

        return self.in_thread(body)

    def test_argument_over_limit_refused(self):
        """
        With C{--max-payload} 1 MiB, a job with a 2 MB argument is refused
        at submit (both client APIs) with a message that names its size, the
        limit and the option; the client, master and worker keep working.
        """

        def body():
            self.procs.start_master("--max-payload", str(MB))
            self.procs.start_worker(procs=1)
            blob = payload_bytes(2_000_000, 6)
            with executor(self.procs.address) as ex:
                with self.assertRaises(SubmitError) as caught:
                    ex.submit(digest, blob)
                message = str(caught.exception)
                log.info("refused at submit: {message}", message=message)
                self.assertIn("over the master's limit of 1,048,576", message)
                self.assertIn("--max-payload", message)
                self.assertTrue(2_000_000 < stated_size(message) < 2_001_000, message)
                # Nothing reached the master; the executor carries on.
                self.assertEqual(ex.submit(digest, blob[:900_000]).result(DEADLINE), digest(blob[:900_000]))
                self.assertEqual(ex.status()["completed"], 1)

            results = []
            client = ClientThread(lambda jobid, result: results.append((jobid, result)), self.procs.address)
            try:
                client.start()
                with self.assertRaises(SubmitError) as caught:
                    client.submit("too big", digest, blob)
                message = str(caught.exception)
                self.assertIn("job 'too big' is ", message)
                self.assertIn("over the master's limit of 1,048,576", message)
                self.assertIn("--max-payload", message)
                client.submit("fine", square, 9)
                client.wait(DEADLINE)
                self.assertEqual(results, [("fine", 81)])
            finally:
                client.close()
            self.assertIsNone(self.procs.master.poll(), "the master exited")

        return self.in_thread(body)

    def test_result_over_limit_fails_job(self):
        """
        With C{--max-payload} 1 MiB, a job whose result is 2 MB fails with a
        PayloadTooLarge error that names the result's size and the limit; a
        result under the limit still arrives, and the same worker goes on.
        """

        def body():
            self.procs.start_master("--max-payload", str(MB))
            worker = self.procs.start_worker(procs=1)
            with executor(self.procs.address) as ex:
                error = ex.submit(payload_bytes, 2_000_000, 7).exception(DEADLINE)
                self.assertIsInstance(error, RemoteException)
                self.assertEqual(error.type, "PayloadTooLarge")
                message = str(error)
                log.info("result over the limit: {message}", message=message)
                self.assertIn("PayloadTooLarge", message)
                self.assertIn("result", message)
                self.assertIn("over the master's limit of 1,048,576", message)
                self.assertIn("--max-payload", message)
                self.assertTrue(2_000_000 < stated_size(message) < 2_001_000, message)
                # Under the limit: it arrives whole, from the same worker.
                self.assertEqual(
                    digest(ex.submit(payload_bytes, 1_000_000, 8).result(DEADLINE)),
                    expected_digest(1_000_000, 8),
                )
                self.assertEqual(ex.submit(worker_pid).result(DEADLINE), worker.pid)
                status = ex.status()
            self.assertIsNone(worker.poll(), "the worker exited")
            self.assertEqual(status["completed"], 3)
            self.assertEqual([w["failed"] for w in status["workers"]], [1])

        return self.in_thread(body)


class StreamingTests(unittest.TestCase):
    """
    Payloads are streamed: a gigabyte each way crosses every hop while the
    master and the worker each hold about one copy of it, and a client
    that submits faster than the cluster takes jobs is held back rather
    than filling the master's memory.  The client plays one on another
    machine than the workers (L{arguments_travel}): the bytes must cross
    the master, not stay in the client's or the worker's memory.
    """

    timeout = 300

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        arguments_travel(self)

    def peaks(self) -> dict:
        peaks = {"master": peak_rss_mib(self.procs.master.pid)}
        for worker in self.procs.workers:
            peaks["worker"] = peak_rss_mib(worker.pid)
            for pid in sorted(job_processes(worker.pid)):
                peaks["job process"] = peak_rss_mib(pid)
        log.info("{test}: peak RSS (MiB): {peaks}", test=self.id(), peaks=peaks)
        return peaks

    def test_1gb_each_way(self):
        """
        A 1 GB argument and a 1 GB result arrive whole; the master and the
        worker never held much more than one copy of either (a job process
        holds the payload and the object made from it).
        """
        size = 1 << 30

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1)
            with executor(self.procs.address) as ex:
                blob = payload_bytes(size, 7)
                expected = (size, sha256(blob))
                future = ex.submit(digest, blob)
                del blob
                self.assertEqual(future.result(DEADLINE * 3), expected)
                result = ex.submit(payload_bytes, size, 8).result(DEADLINE * 3)
                self.assertEqual(len(result), size)
                self.assertEqual(sha256(result), expected_digest(size, 8)[1])
                del result
            peaks = self.peaks()
            one_copy = size >> 20
            self.assertLess(peaks["master"], one_copy * 1.4, peaks)
            self.assertLess(peaks["worker"], one_copy * 1.4, peaks)
            self.assertLess(peaks["job process"], one_copy * 2.4, peaks)

        return threads.deferToThread(body)

    def test_master_memory_bounded_without_workers(self):
        """
        With no worker, a client submits 960 MB of jobs to a master that
        queues at most 50 MB per client: the client sends no more than the
        room the master gave it (50 MB, overshot by at most one job), its
        submit blocks once it holds its send window of unsent jobs (80 MB
        here), its status calls still work, every job runs once a worker
        joins, and the master never held more than half of them.
        """
        size, count = 40 * MB, 24
        window = 80 * MB
        self.patch(cw.client.session, "SEND_WINDOW", window)

        def body():
            self.procs.start_master("--max-queued-bytes", str(50 * MB))
            ex = ClusterExecutor(self.procs.address)
            futures = []

            def submit_all():
                for seed in range(count):
                    futures.append(ex.submit(digest, payload_bytes(size, seed)))

            submitter = threading.Thread(target=submit_all, daemon=True)
            submitter.start()
            try:
                client = wait_until(lambda: held_client(ex), what="the master to hold the client")
                self.assertLessEqual(client["peak_queued_bytes"], 50 * MB + size, client)
                # The master has what fits in the room and the client what
                # fits in its window: submit must now block (no worker
                # takes anything), with every submitted job accounted for.
                most = 50 * MB // size + 1 + window // size + 1
                wait_until(lambda: len(futures) >= most - 1, what="the client to fill its window")
                submitter.join(2)
                self.assertTrue(submitter.is_alive(), "submit did not block")
                self.assertLessEqual(len(futures), most)
                self.assertLess(len(futures), count)
                self.procs.start_worker(procs=1)
                submitter.join(DEADLINE)
                self.assertFalse(submitter.is_alive())
                answers = [f.result(DEADLINE) for f in futures]
                client = ex.status()["clients"][0]
                self.assertLessEqual(client["peak_queued_bytes"], 50 * MB + size, client)
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
            self.assertEqual(answers, [expected_digest(size, seed) for seed in range(count)])
            peaks = self.peaks()
            self.assertLess(peaks["master"], (count * size >> 20) / 2, peaks)

        return threads.deferToThread(body)

    def test_shutdown_while_submit_blocked(self):
        """
        A submit blocked by flow control does not block shutdown: shutdown
        returns, and the blocked submit gives up with RuntimeError.
        """
        self.patch(cw.client.session, "SEND_WINDOW", 4 * MB)

        def body():
            self.procs.start_master("--max-queued-bytes", str(2 * MB))
            ex = ClusterExecutor(self.procs.address)
            outcome = []

            def submit_all():
                try:
                    for seed in range(20):
                        ex.submit(digest, payload_bytes(3 * MB, seed))
                    outcome.append("all submitted")
                except RuntimeError as e:
                    outcome.append(e)

            submitter = threading.Thread(target=submit_all, daemon=True)
            submitter.start()
            deadline = time.monotonic() + DEADLINE
            while ex.status()["queued"] < 1:
                self.assertLess(time.monotonic(), deadline, "jobs never reached the master")
                time.sleep(0.05)
            stopper = threading.Thread(target=ex.shutdown, kwargs={"wait": False, "cancel_futures": True})
            stopper.start()
            stopper.join(DEADLINE)
            self.assertFalse(stopper.is_alive(), "shutdown blocked")
            submitter.join(DEADLINE)
            self.assertFalse(submitter.is_alive(), "submit stayed blocked after shutdown")
            self.assertEqual(len(outcome), 1)
            self.assertIsInstance(outcome[0], RuntimeError)

        return threads.deferToThread(body)
