"""
Jobs that ask for cores, memory, GPUs and tags, against a real master and
real workers: where they run, what they see, and how unschedulable jobs
are reported.  (No GPU is needed: GPUs are ids a worker advertises, and a
job sees its own in C{CUDA_VISIBLE_DEVICES}.)
"""

from __future__ import annotations

import os

from twisted.internet import threads
from twisted.trial import unittest

from cw.cli.cw import format_status
from cw.client import master_status
from cw.errors import RemoteException
from cw.test.jobs import allocate, probe
from cw.test.procs import DEADLINE, Processes, executor, wait_until


def most_at_once(runs: list[dict]) -> int:
    """The most of C{runs} (with C{start} and C{end}) that overlapped in time."""
    events = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


class ResourceTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def in_thread(self, func):
        return threads.deferToThread(func)

    def test_gpus_tags_and_cpu_jobs(self):
        """
        A worker with --gpus 0,1 --procs 4 and one without GPUs: 40 jobs
        asking for a GPU each all run on the first, never more than two at
        once, each seeing one device of its own; plain jobs run on both; a
        tagged job only where the tag is; a job no worker could run is
        counted as unschedulable.
        """

        def body():
            self.procs.start_master()
            gpu = self.procs.start_worker(4, True, "--gpus", "0,1", "--cpus", "4", "--tag", "big")
            cpu = self.procs.start_worker(2, True, "--gpus", "0", "--cpus", "2")
            with executor(self.procs.address) as ex:
                gpu_runs = [
                    f.result(DEADLINE)
                    for f in [ex.submit_with(probe, (0.05,), resources={"gpus": 1}) for _ in range(40)]
                ]
                self.assertEqual({r["worker"] for r in gpu_runs}, {gpu.pid})
                self.assertEqual(sorted({r["cuda"] for r in gpu_runs}), ["0", "1"])
                self.assertTrue(all(r["rocr"] == r["cuda"] for r in gpu_runs))
                self.assertLessEqual(most_at_once(gpu_runs), 2)
                for device in ("0", "1"):
                    self.assertEqual(most_at_once([r for r in gpu_runs if r["cuda"] == device]), 1)

                cpu_runs = list(ex.map(probe, [0.05] * 40, timeout=DEADLINE))
                self.assertEqual({r["worker"] for r in cpu_runs}, {gpu.pid, cpu.pid})

                tagged = list(ex.map(probe, [0.02] * 10, timeout=DEADLINE, tags={"big"}))
                self.assertEqual({r["worker"] for r in tagged}, {gpu.pid})

                huge = ex.submit_with(probe, resources={"gpus": 3})
                wait_until(lambda: ex.status()["unschedulable"] == 1, what="the unschedulable count")
                status = master_status(self.procs.address)
                self.assertIn("1 unschedulable", format_status(self.procs.address, status))
                caps = {w["capacity"]["cpus"]: w["capacity"] for w in status["workers"]}
                self.assertEqual((caps[4]["gpus"], caps[4]["tags"]), (["0", "1"], ["big"]))
                self.assertEqual((caps[2]["gpus"], caps[2]["tags"]), ([], []))
                self.assertTrue(huge.cancel())

        return self.in_thread(body)

    def test_cpus_affinity_and_threads(self):
        """
        A job asking for cpus=2 sees an affinity of two cores and
        OMP_NUM_THREADS=2; one asking for one core (and memory) is pinned to
        one; a plain job keeps the worker's affinity and environment.
        """
        own = sorted(os.sched_getaffinity(0))
        if len(own) < 2:
            raise unittest.SkipTest("needs two cores")

        def body():
            self.procs.start_master()
            self.procs.start_worker(2, True, "--cpus", "2", "--gpus", "0")
            with executor(self.procs.address) as ex:
                two = ex.submit_with(probe, resources={"cpus": 2}).result(DEADLINE)
                self.assertEqual(len(two["affinity"]), 2)
                self.assertEqual((two["omp"], two["mkl"], two["openblas"]), ("2", "2", "2"))
                self.assertEqual(two["cuda"], "")
                one = ex.submit_with(probe, resources={"cpus": 1, "memory": "4G"}).result(DEADLINE)
                self.assertEqual(len(one["affinity"]), 1)
                self.assertEqual(one["omp"], "1")
                plain = ex.submit(probe).result(DEADLINE)
                self.assertEqual(plain["affinity"], own[:2] if len(own) > 2 else own)
                self.assertEqual(plain["omp"], os.environ.get("OMP_NUM_THREADS"))

        return self.in_thread(body)

    def test_env_per_job(self):
        """
        A job's env overrides what its resources set (a cpus=2 job with
        OMP_NUM_THREADS=1 sees 1) and is its alone: the next job of the
        same job process does not see it; every job of a map gets it.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(1, True, "--cpus", "2", "--gpus", "0")
            with executor(self.procs.address) as ex:
                env = {"OMP_NUM_THREADS": "1", "CW_TEST_ENV": "job"}
                sized = ex.submit_with(probe, resources={"cpus": 2}, env=env).result(DEADLINE)
                self.assertEqual((sized["omp"], sized["mkl"], sized["openblas"]), ("1", "2", "2"))
                self.assertEqual(sized["env"], "job")
                after = ex.submit(probe).result(DEADLINE)
                self.assertEqual(after["pid"], sized["pid"])
                self.assertEqual(after["omp"], os.environ.get("OMP_NUM_THREADS"))
                self.assertEqual(after["env"], os.environ.get("CW_TEST_ENV"))
                mapped = list(ex.map(probe, [0] * 5, timeout=DEADLINE, env={"CW_TEST_ENV": "map"}))
                self.assertEqual({(r["pid"], r["env"]) for r in mapped}, {(sized["pid"], "map")})
                self.assertEqual(ex.submit(probe).result(DEADLINE)["env"], os.environ.get("CW_TEST_ENV"))

        return self.in_thread(body)

    def test_memory_limit_per_job(self):
        """A job that goes past the memory it asked for fails with a MemoryError saying so."""

        def body():
            self.procs.start_master()
            self.procs.start_worker(1, True, "--memory", "4G")
            with executor(self.procs.address) as ex:
                failed = ex.submit_with(allocate, (1024,), resources={"memory": "200M"})
                error = failed.exception(DEADLINE)
                # Both a MemoryError and a RemoteException (like other typed errors).
                self.assertIsInstance(error, MemoryError)
                self.assertIsInstance(error, RemoteException)
                self.assertEqual(error.type, "MemoryError")
                self.assertIn("asked for memory=200M and went past it", str(error))
                # The limit was the job's alone: the same process runs a bigger one after.
                self.assertEqual(ex.submit(allocate, 512).result(DEADLINE), 512 << 20)
                too_big = ex.submit_with(allocate, (1,), resources={"memory": "8G"})
                wait_until(lambda: ex.status()["unschedulable"] == 1, what="the unschedulable count")
                self.assertTrue(too_big.cancel())

        return self.in_thread(body)
