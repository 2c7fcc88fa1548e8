"""
Tests for L{cw.master.pool}'s pieces that need no processes: the SLURM
launcher's reading of squeue and its back-off, and the scaling loop's view
of a master (idle times, launches), with a fake clock.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest

from cw.core.resources import Shape
from cw.core.scaling import Drain, Launch, PoolBounds, Submit
from cw.errors import SlurmError
from cw.master import pool


class FakeSlurm(pool.SlurmLauncher):
    """A SlurmLauncher whose commands are answered by C{answer(args)}, taking C{delay} seconds."""

    def __init__(self, clock, answer, delay=0.0):
        super().__init__(clock, "#!/bin/bash\n", "/nonexistent", poll_interval=30)
        self.answer = answer
        self.delay = delay
        self.commands = []

    def _run(self, args, input=None):
        self.commands.append(args)
        self.calls[args[0]] = self.calls.get(args[0], 0) + 1
        self.reactor.advance(self.delay)
        try:
            return defer.succeed(self.answer(args))
        except SlurmError as e:
            return defer.fail(e)

    def _record(self):
        pass


class SlurmLauncherTests(unittest.TestCase):
    def test_times(self):
        self.assertEqual(pool.parse_slurm_time("1-02:03:04"), 93784)
        self.assertEqual(pool.parse_slurm_time("05:06"), 306)
        self.assertEqual(pool.parse_slurm_time("1:00:00"), 3600)
        self.assertIsNone(pool.parse_slurm_time("UNLIMITED"))
        self.assertEqual(pool.array_ids("12", 3), ["12_0", "12_1", "12_2"])
        self.assertEqual(pool.array_ids("12", 1), ["12"])

    def test_submit_an_array_and_poll_once(self):
        """N launches are one sbatch --array; one squeue (-r, -j the jobs) reports on all of them."""
        clock = task.Clock()
        clock.advance(1000)
        lines = "7_0|RUNNING|2026-11-30T10:00:00|10:00\n7_1|PENDING|N/A|20:00\n99|RUNNING|N/A|1:00\n"
        slurm = FakeSlurm(clock, lambda args: "7\n" if args[0] == "sbatch" else lines)
        ids = self.successResultOf(slurm.submit(3))
        self.assertEqual(ids, ["7_0", "7_1", "7_2"])
        self.assertEqual(slurm.commands[0], ["sbatch", "--parsable", "--array=0-2"])
        seen = self.successResultOf(slurm.poll(ids))
        self.assertEqual(slurm.commands[1][:5], ["squeue", "-h", "-r", "-j", "7"])
        self.assertEqual(sorted(seen), ["7_0", "7_1"])
        self.assertIsNone(seen["7_1"].started)
        self.assertEqual(seen["7_0"].ends_at, 1600.0)
        self.assertIsNotNone(seen["7_0"].started)
        # 7_2 is gone: forgotten.
        self.assertEqual(sorted(slurm.submitted), ["7_0", "7_1"])

    def test_back_off(self):
        """After an error or a slow answer the interval doubles (up to a bound); a prompt answer resets it."""
        clock = task.Clock()
        answers = []

        def answer(args):
            outcome = answers.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        slurm = FakeSlurm(clock, answer)

        def poll():
            # Once the interval has passed: within it, the last answer serves.
            clock.advance(slurm.poll_interval)
            return slurm.poll(["1"])

        answers.append(SlurmError("squeue failed (exit 1): slurm_load_jobs error: Socket timed out"))
        self.failureResultOf(poll(), SlurmError)
        self.assertEqual(slurm.poll_interval, 60)
        answers.append(SlurmError("again"))
        self.failureResultOf(poll(), SlurmError)
        self.assertEqual(slurm.poll_interval, 120)
        slurm.delay = 15
        answers.append("")
        self.successResultOf(poll())
        self.assertEqual(slurm.poll_interval, 240)
        for _ in range(5):
            answers.append(SlurmError("down"))
            self.failureResultOf(poll(), SlurmError)
        self.assertEqual(slurm.poll_interval, pool.MAX_BACKOFF)
        slurm.delay = 0
        answers.append("")
        self.successResultOf(poll())
        self.assertEqual(slurm.poll_interval, 30)

    def test_pools_share_one_squeue(self):
        """
        Launchers sharing a L{pool.SqueuePoller} (the pools of one master,
        or of 'cw-slurm adapt') make one squeue per interval for all their
        jobs: a pool polling within the interval gets the last answer, its
        jobs submitted since then are pending until the next look, and a
        job the answer lacks is gone.
        """
        clock = task.Clock()
        clock.advance(1000)
        poller = pool.SqueuePoller(clock)
        lines = {"text": "7|RUNNING|2026-11-30T10:00:00|10:00\n8|PENDING|N/A|20:00\n"}  # no 9 yet
        commands = []
        jobs = iter(["7", "8", "9"])

        def answer(args):
            commands.append(args)
            return next(jobs) + "\n" if args[0] == "sbatch" else lines["text"]

        a, b = (FakeSlurm(clock, answer) for _ in range(2))
        for launcher in (a, b):
            launcher.poller = poller
            poller.launchers.append(launcher)
        self.assertEqual(self.successResultOf(a.submit(1)), ["7"])
        self.assertEqual(self.successResultOf(b.submit(1)), ["8"])
        seen_a = self.successResultOf(a.poll(["7"]))
        self.assertEqual(commands[-1][:5], ["squeue", "-h", "-r", "-j", "7,8"])
        clock.advance(1)
        self.assertEqual(self.successResultOf(b.submit(1)), ["9"])
        seen_b = self.successResultOf(b.poll(["8", "9"]))
        squeues = [c for c in commands if c[0] == "squeue"]
        self.assertEqual(len(squeues), 1)
        self.assertEqual((a.calls["squeue"], b.calls["squeue"]), (1, 0))
        self.assertIsNotNone(seen_a["7"].started)
        self.assertIsNone(seen_b["8"].started)
        self.assertIsNone(seen_b["9"].started)  # submitted after that look: pending
        self.assertEqual(b.answered_at, 1000)
        clock.advance(30)
        seen_b = self.successResultOf(b.poll(["8", "9"]))
        self.assertEqual(len([c for c in commands if c[0] == "squeue"]), 2)
        self.assertEqual(commands[-1][4], "7,8,9")
        self.assertEqual(sorted(seen_b), ["8"])  # 9 is not in squeue: gone
        self.assertEqual(sorted(b.submitted), ["8"])
        self.successResultOf(a.poll(["7"]))
        self.assertEqual(len([c for c in commands if c[0] == "squeue"]), 2)


class SlurmAdoptionTests(unittest.TestCase):
    def test_replacement_adopts_recorded_jobs(self):
        """
        A master started after another (replaced, or crashed) adopts the
        worker jobs its pool's record lists: they are its launches (the
        loop's too, from its start), the record stays merged as it submits
        more, and a job squeue no longer lists leaves the record.
        """
        clock = task.Clock()
        clock.advance(50)
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "pool-jobs-gpu.json").write_text(json.dumps({"workers": ["5_0", "6"]}))
        lines = {"text": "6|RUNNING|2026-11-30T10:00:00|10:00\n"}

        class Recording(FakeSlurm):
            _record = pool.SlurmLauncher._record

        slurm = Recording(clock, lambda args: "9\n" if args[0] == "sbatch" else lines["text"])
        slurm.directory, slurm.record = directory, "pool-jobs-gpu.json"
        service = pool.PoolService(FakeSource(), slurm, PoolBounds(max_workers=4), clock, name="gpu")
        service.start()
        # The first round looked at once, at both: 5_0 is gone, 6 runs.
        self.assertEqual(slurm.commands[0][:5], ["squeue", "-h", "-r", "-j", "5,6"])
        self.assertEqual(list(service.launches), ["6"])
        self.assertIsNotNone(service.launches["6"].started)
        self.successResultOf(slurm.submit(1))
        recorded = json.loads((directory / "pool-jobs-gpu.json").read_text())["workers"]
        self.assertEqual(recorded, ["6", "9"])
        self.successResultOf(service.stop())


class FakeLauncher:
    """An IWorkerLauncher that records what it is asked, its launches pending until started."""

    poll_interval = 5.0

    def __init__(self, clock):
        self.clock = clock
        self.launches = {}
        self.drained = []
        self.polls = 0
        self.n = 0

    def submit(self, count):
        ids = []
        for _ in range(count):
            self.n += 1
            ids.append(f"L{self.n}")
            self.launches[ids[-1]] = Launch(ids[-1], self.clock.seconds())
        return defer.succeed(ids)

    def drain(self, ids):
        self.drained += ids
        return defer.succeed(None)

    cancel = drain

    def poll(self, ids):
        self.polls += 1
        return defer.succeed({i: self.launches[i] for i in ids if i in self.launches})

    def stop(self):
        return defer.succeed(None)


class FakeSource:
    def __init__(self):
        self.queued = 0
        self.workers = []
        self.stopped = []

    def snapshot(self):
        return defer.succeed((self.queued, None, list(self.workers)))

    def set_end(self, worker, ends_at):
        pass

    def stop_dispatch(self, worker):
        self.stopped.append(worker)

    def workers_of(self, launch):
        return [w[0] for w in self.workers if w[1] == launch]


class PoolServiceTests(unittest.TestCase):
    def test_loop(self):
        """
        The loop polls the launcher once per its interval at most, submits
        for queued work, counts a worker idle from its last completion, and
        drains it (dispatch stopped first) after the idle timeout.
        """
        clock = task.Clock()
        source = FakeSource()
        launcher = FakeLauncher(clock)
        service = pool.PoolService(source, launcher, PoolBounds(max_workers=2, idle_timeout=10), clock)
        service.start()
        source.queued = 1
        clock.advance(1)
        self.assertEqual(list(service.launches), ["L1"])
        self.assertIsInstance(service.policy.history[-1][1], Submit)
        launcher.launches["L1"] = Launch("L1", 1.0, started=2.0)
        source.queued = 0
        source.workers = [(1, "L1", 1, 1, 0, False)]
        for _ in range(20):
            clock.advance(1)
        self.assertLessEqual(launcher.polls, 21 / launcher.poll_interval + 1)
        self.assertEqual(launcher.drained, [])
        source.workers = [(1, "L1", 1, 0, 1, False)]  # finished its job: idle from t=22
        for _ in range(10):
            clock.advance(1)
        self.assertEqual(launcher.drained, [])
        clock.advance(1)
        self.assertEqual(launcher.drained, ["L1"])
        self.assertEqual(source.stopped, [1])
        self.assertIsInstance(service.policy.history[-1][1], Drain)
        status = service.status()
        self.assertEqual((status["draining"], status["running"]), (1, 0))
        self.successResultOf(service.stop())


class FakeMaster:
    """What L{pool.PoolShare} reads: a snapshot and the queued jobs by shape."""

    def __init__(self, plain, shapes, workers):
        self.plain, self.shapes, self.workers = plain, shapes, workers

    def snapshot(self):
        return defer.succeed((self.plain + sum(self.shapes.values()), 2.0, self.workers))

    def queued_shapes(self):
        return self.plain, self.shapes


class SeveralPoolsTests(unittest.TestCase):
    def test_each_pool_sees_its_share_and_its_workers(self):
        """
        A pool file with several pools: one L{pool.PoolService} each, named,
        each reading its share of the queue and only its own workers.
        """
        data = {
            "launcher": "slurm",
            "directory": "/nonexistent",
            "pools": [
                {"name": "cpu", "script": "c", "max_workers": 2, "capacity": {"cpus": 1}},
                {"name": "gpu", "script": "g", "max_workers": 3, "capacity": {"cpus": 8, "gpus": ["0"]}},
            ],
        }
        self.assertEqual([p["name"] for p in pool.pools_in(data)], ["cpu", "gpu"])
        gpu_job = Shape(gpus=1)
        workers = [(1, "11", 1, 0, 0, False), (2, "22", 8, 1, 0, False), (3, None, 4, 0, 0, False)]
        source = FakeMaster(5, {gpu_job: 2}, workers)
        made = []
        services = pool.start_pools(
            data, source, lambda d: made.append(d["script"]) or d["name"], task.Clock()
        )
        self.assertEqual(made, ["c", "g"])
        cpu, gpu = services
        self.assertEqual((cpu.name, gpu.name), ("cpu", "gpu"))
        self.assertEqual((cpu.policy.bounds.max_workers, gpu.policy.bounds.max_workers), (2, 3))
        cpu.launches["11"] = Launch("11", 0.0)
        gpu.launches["22"] = Launch("22", 0.0)
        queued, _, seen = self.successResultOf(cpu.source.snapshot())
        self.assertEqual((queued, [w[0] for w in seen]), (5, [1]))
        queued, _, seen = self.successResultOf(gpu.source.snapshot())
        self.assertEqual((queued, [w[0] for w in seen]), (2 * 8, [2]))
        self.assertEqual(gpu.status()["name"], "gpu")

    def test_pools_from_a_status(self):
        """
        The pools of 'cw-slurm adapt' read the master's status (its queued
        jobs by shape included): one status per round serves them all, and
        each pool gets its share of the queue and its own workers.
        """
        clock = task.Clock()
        gpu_job = Shape(cpus=2, gpus=1, tags=frozenset({"gpu"}))
        status = {
            "queued": 7,
            "job_seconds": 2.0,
            "queued_shapes": [{**gpu_job.to_json(), "count": 2}],
            "workers": [
                {"id": 1, "launch": "11", "slots": 1, "held": 0, "completed": 3, "draining": False},
                {"id": 2, "launch": "22", "slots": 8, "held": 1, "completed": 0, "draining": False},
            ],
        }
        asked = []
        source = pool.StatusSource(lambda: asked.append(1) or defer.succeed(status), clock)
        data = {
            "launcher": "slurm",
            "directory": "/nonexistent",
            "pools": [
                {"name": "cpu", "script": "c", "max_workers": 2, "capacity": {"cpus": 1}},
                {
                    "name": "gpu",
                    "script": "g",
                    "max_workers": 3,
                    "capacity": {"cpus": 8, "gpus": ["0"], "tags": ["gpu"]},
                },
            ],
        }
        cpu, gpu = pool.start_pools(data, source, lambda d: d["name"], clock)
        cpu.launches["11"] = Launch("11", 0.0)
        gpu.launches["22"] = Launch("22", 0.0)
        queued, seconds, seen = self.successResultOf(cpu.source.snapshot())
        self.assertEqual((queued, seconds, [w[0] for w in seen]), (5, 2.0, [1]))
        queued, _, seen = self.successResultOf(gpu.source.snapshot())
        self.assertEqual((queued, [w[0] for w in seen]), (2 * 8, [2]))
        self.assertEqual(len(asked), 1)
        clock.advance(1)
        self.successResultOf(gpu.source.snapshot())
        self.assertEqual(len(asked), 2)
        self.assertEqual(Shape.from_json(gpu_job.to_json()), gpu_job)

    def test_one_pool_is_unnamed(self):
        data = {"launcher": "slurm", "script": "s", "directory": "/nonexistent", "max_workers": 2}
        (only,) = pool.start_pools(data, FakeMaster(0, {}, []), lambda d: None, task.Clock())
        self.assertIsNone(only.name)
        self.assertEqual(only.status()["name"], None)
