"""
Tests for L{cw.core.scaling}: the adaptive pool's policy, driven by a
simulated cluster in simulated time (no processes, no clock).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from twisted.trial.unittest import SynchronousTestCase

from cw.core.resources import Ledger, Shape
from cw.core.scaling import (
    Cancel,
    Drain,
    Launch,
    PoolBounds,
    PoolView,
    ScalingPolicy,
    Submit,
    Worker,
    pool_capacity,
    route_queued,
)


@dataclass
class SimLaunch:
    id: str
    submitted: float
    start_at: float
    started: float | None = None
    ends_at: float | None = None
    draining: bool = False


@dataclass
class SimWorker:
    id: int
    launch: str
    slots: int
    #: End times of the jobs it runs.
    running: list[float] = field(default_factory=list)
    idle_since: float | None = None
    draining: bool = False


class Cluster:
    """
    A batch system and a master, simulated one second at a time: launches
    wait C{queue_wait} seconds, then their worker connects; workers take
    queued jobs into free slots; a launch is killed at its walltime.  The
    policy's decisions are carried out as the scaling service would, and
    checked: only idle workers are drained or cancelled.
    """

    def __init__(self, test, bounds, queue_wait=5.0, walltime=None, slots=1):
        self.test = test
        self.policy = ScalingPolicy(bounds)
        self.now = 0.0
        self.queue_wait = queue_wait
        self.walltime = walltime
        self.slots = slots
        self.jobs: deque[float] = deque()
        self.launches: dict[str, SimLaunch] = {}
        self.workers: dict[str, SimWorker] = {}
        self.next_id = 0
        self.done = 0
        self.lost = 0
        self.durations: list[float] = []
        self.submitted = 0
        self.decisions: list[tuple[float, object]] = []
        #: Replaced launches: when the replacement was submitted, when the launch ended.
        self.replaced: dict[str, tuple[float, float | None]] = {}
        #: Per second: connected workers not draining, and launches not draining.
        self.sizes: list[int] = []
        self.launch_counts: list[int] = []

    def add_jobs(self, n: int, seconds: float) -> None:
        self.jobs.extend([seconds] * n)

    def view(self) -> PoolView:
        measured = sum(self.durations[-100:]) / len(self.durations[-100:]) if self.durations else None
        return PoolView(
            now=self.now,
            queued=len(self.jobs),
            job_seconds=measured,
            workers=tuple(
                Worker(w.id, w.launch, w.slots, len(w.running), w.idle_since, w.draining)
                for w in self.workers.values()
            ),
            launches=tuple(
                Launch(x.id, x.submitted, x.started, x.ends_at, x.draining) for x in self.launches.values()
            ),
        )

    def apply(self, decisions) -> None:
        for d in decisions:
            self.decisions.append((self.now, d))
            if isinstance(d, Submit):
                if d.replaces:
                    self.replaced[d.replaces] = (self.now, self.launches[d.replaces].ends_at)
                for _ in range(d.count):
                    self.next_id += 1
                    lid = f"j{self.next_id}"
                    self.launches[lid] = SimLaunch(lid, self.now, self.now + self.queue_wait)
                    self.submitted += 1
            elif isinstance(d, Drain):
                w = self.workers.get(d.launch)
                if not d.reason.startswith("walltime"):
                    self.test.assertTrue(w is not None and not w.running, f"drained a busy worker: {d}")
                self.launches[d.launch].draining = True
                if w is not None:
                    w.draining = True
            elif isinstance(d, Cancel):
                self.test.assertNotIn(d.launch, self.workers, f"cancelled a connected worker: {d}")
                del self.launches[d.launch]

    def tick(self, dt: float = 1.0) -> None:
        self.now += dt
        now = self.now
        for x in list(self.launches.values()):
            if x.started is None and now >= x.start_at:
                x.started = now
                if self.walltime is not None:
                    x.ends_at = now + self.walltime
                self.workers[x.id] = SimWorker(x.id.__hash__(), x.id, self.slots, idle_since=now)
            if x.ends_at is not None and now >= x.ends_at:
                w = self.workers.pop(x.id, None)
                if w is not None:
                    self.lost += len(w.running)
                del self.launches[x.id]
        for lid, w in list(self.workers.items()):
            # Jobs end; free slots take queued jobs.  Ends may fall between ticks.
            t = now - dt
            while True:
                ended = [e for e in w.running if e <= now]
                if not ended and (w.draining or len(w.running) >= w.slots or not self.jobs):
                    break
                if ended:
                    first = min(ended)
                    w.running.remove(first)
                    self.done += 1
                    t = first
                if not w.draining:
                    while len(w.running) < w.slots and self.jobs:
                        seconds = self.jobs.popleft()
                        self.durations.append(seconds)
                        w.running.append(max(t, now - dt) + seconds)
                if not ended:
                    break
            if w.running:
                w.idle_since = None
            elif w.idle_since is None:
                w.idle_since = now
            if w.draining and not w.running:
                del self.workers[lid]
                del self.launches[lid]
        self.apply(self.policy.decide(self.view()))
        self.sizes.append(sum(1 for w in self.workers.values() if not w.draining))
        self.launch_counts.append(sum(1 for x in self.launches.values() if not x.draining))

    def run(self, seconds: float, feed=None) -> None:
        for _ in range(int(seconds)):
            if feed is not None:
                feed(self)
            self.tick()


class PolicyTests(SynchronousTestCase):
    def test_burst_scales_to_max_and_back_to_min(self):
        """
        10,000 jobs of 0.1 s: the pool grows to its maximum, runs them all,
        and shrinks back to its minimum once idle for the idle timeout.
        """
        bounds = PoolBounds(min_workers=1, max_workers=8, idle_timeout=60)
        sim = Cluster(self, bounds, queue_wait=5)
        sim.run(10)
        self.assertEqual(sim.launch_counts[-1], 1)
        sim.add_jobs(10_000, 0.1)
        while sim.jobs or any(w.running for w in sim.workers.values()):
            sim.tick()
            self.assertLess(sim.now, 1000)
        finished = sim.now
        self.assertEqual(max(sim.sizes), 8)
        self.assertEqual(max(sim.launch_counts), 8)
        self.assertEqual(sim.done, 10_000)
        self.assertEqual(sim.lost, 0)
        # The last jobs ended within the last second.
        sim.run(58)
        self.assertEqual(sim.launch_counts[-1], 8, "drained before the idle timeout")
        sim.run(70)
        self.assertEqual(sim.launch_counts[-1], 1)
        self.assertEqual(len(sim.workers), 1)
        drains = [t for t, d in sim.decisions if isinstance(d, Drain)]
        self.assertEqual(len(drains), 7)
        self.assertGreaterEqual(min(drains), finished - 1 + 60)
        self.assertEqual(sim.submitted, 8)

    def test_steady_trickle_holds_a_stable_size(self):
        """
        One job of 3 s every 2 s needs two slots: the pool reaches a size
        and keeps it, with no submission or drain once it has settled.
        """
        bounds = PoolBounds(min_workers=0, max_workers=8, idle_timeout=30, horizon=5)
        sim = Cluster(self, bounds, queue_wait=3)

        def feed(sim):
            if int(sim.now) % 2 == 0:
                sim.add_jobs(1, 3.0)

        sim.run(200, feed)
        settled = len(sim.decisions)
        size = sim.launch_counts[-1]
        sim.run(600, feed)
        self.assertEqual(sim.decisions[settled:], [])
        self.assertEqual(set(sim.launch_counts[-600:]), {size})
        self.assertTrue(2 <= size <= 3, size)
        self.assertEqual(sim.lost, 0)

    def test_pending_launches_count_as_capacity(self):
        """
        Launches waiting in the batch queue are capacity on the way: a
        long queue wait does not make the pool submit again.
        """
        bounds = PoolBounds(min_workers=0, max_workers=8, idle_timeout=30)
        sim = Cluster(self, bounds, queue_wait=300)
        sim.add_jobs(5, 100.0)
        sim.run(290)
        self.assertEqual(sim.submitted, 5)
        self.assertEqual([d.count for _, d in sim.decisions if isinstance(d, Submit)], [5])

    def test_only_idle_workers_drained(self):
        """
        With one long job and nothing queued, the busy worker stays and
        the idle ones are drained after the idle timeout, one launch each.
        """
        bounds = PoolBounds(min_workers=0, max_workers=3, idle_timeout=20)
        sim = Cluster(self, bounds, queue_wait=1)
        sim.add_jobs(3, 5.0)
        sim.add_jobs(1, 500.0)
        sim.run(100)
        # Cluster.apply fails the test if a drain targets a busy worker.
        self.assertEqual(len(sim.workers), 1)
        [worker] = sim.workers.values()
        self.assertEqual(len(worker.running), 1)
        drains = [d for _, d in sim.decisions if isinstance(d, Drain)]
        self.assertEqual(len(drains), 2)
        self.assertTrue(all("idle for" in d.reason for d in drains))

    def test_no_scale_down_while_jobs_are_queued(self):
        """
        Workers idle past the idle timeout are not drained while jobs are
        queued (say, jobs the master cannot hand them yet): they are once
        the queue is empty, at once, their idle time being long past.
        """
        policy = ScalingPolicy(PoolBounds(min_workers=0, max_workers=4, idle_timeout=10))
        launches = {x: Launch(x, 0.0, 1.0) for x in "ab"}
        workers = (Worker(1, "a", 4, idle_since=1.0), Worker(2, "b", 4, idle_since=1.0))
        decided = []
        for t in range(2, 80):
            view = PoolView(
                now=float(t),
                queued=3 if t < 60 else 0,
                job_seconds=1.0,
                workers=workers,
                launches=tuple(launches.values()),
            )
            decided += [(t, d) for d in policy.decide(view)]
            for _, d in decided:
                if isinstance(d, Drain):
                    launches[d.launch] = replace(launches[d.launch], draining=True)
        kinds = sorted((t, type(d).__name__, getattr(d, "launch", None)) for t, d in decided)
        self.assertEqual(kinds, [(60, "Drain", "a"), (60, "Drain", "b")])

    def test_pending_launch_cancelled_after_the_queue_is_empty_for_the_idle_timeout(self):
        """
        A launch still pending is cancelled only once nothing has been
        queued (or running) for the idle timeout: the clock starts when
        the queue empties, not before.
        """
        policy = ScalingPolicy(PoolBounds(min_workers=0, max_workers=1, idle_timeout=10))
        launches = {"p": Launch("p", 0.0)}
        decided = []
        for t in range(1, 60):
            view = PoolView(now=float(t), queued=2 if t < 30 else 0, launches=tuple(launches.values()))
            decided += [(t, d) for d in policy.decide(view)]
            for _, d in decided:
                if isinstance(d, Cancel):
                    launches[d.launch] = replace(launches[d.launch], draining=True)
        kinds = [(t, type(d).__name__, getattr(d, "launch", None)) for t, d in decided]
        self.assertEqual(kinds, [(40, "Cancel", "p")])
        self.assertIn("no job queued or running for 10 s", decided[0][1].reason)

    def test_no_drain_below_min(self):
        bounds = PoolBounds(min_workers=2, max_workers=4, idle_timeout=5)
        sim = Cluster(self, bounds, queue_wait=1)
        sim.run(100)
        self.assertEqual(sim.launch_counts[-1], 2)
        self.assertEqual(sim.submitted, 2)
        self.assertEqual([d for _, d in sim.decisions if not isinstance(d, Submit)], [])

    def test_replacement_ahead_of_walltime(self):
        """
        Workers with a 600 s walltime serving a constant stream: each is
        replaced before its end, early enough for the queue wait seen, so
        the pool never dips and no job is lost or left to the walltime.
        """
        bounds = PoolBounds(min_workers=1, max_workers=2, idle_timeout=60, replace_lead=30, drain_lead=20)
        sim = Cluster(self, bounds, queue_wait=40, walltime=600)

        def feed(sim):
            if len(sim.jobs) < 4:
                sim.add_jobs(4, 2.0)

        sim.run(2000, feed)
        first_up = sim.sizes.index(2)
        self.assertEqual(min(sim.sizes[first_up:]), 2, "capacity dipped")
        self.assertEqual(sim.lost, 0)
        self.assertGreaterEqual(len(sim.replaced), 4)
        for submitted, ends_at in sim.replaced.values():
            # At least replace_lead plus the queue wait seen before the end.
            self.assertGreaterEqual(ends_at - submitted, 30 + 40)
        drains = [d for _, d in sim.decisions if isinstance(d, Drain)]
        self.assertTrue(drains and all(d.reason.startswith("walltime") for d in drains))

    def test_replacements_under_a_light_stream(self):
        """
        A stream that needs two slots and leaves the queue mostly empty, on
        workers with a 300 s walltime and a minimum of 2: the pool submits
        only replacements once it is up, never cancels one of them while it
        waits in the queue, and never dips.
        """
        bounds = PoolBounds(min_workers=2, max_workers=3, idle_timeout=60, replace_lead=60, drain_lead=20)
        sim = Cluster(self, bounds, queue_wait=5, walltime=300)
        sim.run(1500, lambda sim: sim.add_jobs(1, 1.5))
        self.assertEqual([d for _, d in sim.decisions if isinstance(d, Cancel)], [])
        extra = [d for t, d in sim.decisions if isinstance(d, Submit) and not d.replaces and t > 100]
        self.assertEqual(extra, [])
        first_up = sim.sizes.index(2)
        self.assertGreaterEqual(min(sim.sizes[first_up:]), 2, "capacity dipped")
        self.assertLessEqual(max(sim.launch_counts), 3 + 2)
        self.assertEqual(sim.lost, 0)
        self.assertGreaterEqual(len(sim.replaced), 8)

    def test_gives_up_on_a_long_pending_launch(self):
        bounds = PoolBounds(min_workers=0, max_workers=2, pending_timeout=100)
        sim = Cluster(self, bounds, queue_wait=10_000)
        sim.add_jobs(1, 10.0)
        sim.run(250)
        kinds = [(t, type(d).__name__, getattr(d, "retry", None)) for t, d in sim.decisions]
        self.assertEqual(
            kinds,
            [
                (1.0, "Submit", None),
                (101.0, "Cancel", True),
                (101.0, "Submit", None),
                (201.0, "Cancel", True),
                (201.0, "Submit", None),
            ],
        )
        self.assertEqual(len(sim.launches), 1)

    def test_submissions_rate_limited(self):
        bounds = PoolBounds(min_workers=0, max_workers=20, max_submit=3, submit_interval=10)
        sim = Cluster(self, bounds, queue_wait=1000)
        sim.add_jobs(100, 10.0)
        sim.run(35)
        times = [t for t, d in sim.decisions if isinstance(d, Submit) for _ in range(d.count)]
        self.assertEqual(len(times), 12)
        for t in times:
            self.assertLessEqual(sum(1 for u in times if t - 10 < u <= t), 3)

    def test_bounds_checked(self):
        self.assertRaises(ValueError, PoolBounds, min_workers=3, max_workers=2)
        self.assertRaises(ValueError, PoolBounds, max_workers=0)


GPU_JOB = Shape(gpus=1, tags=frozenset({"gpu"}))


class RouteQueuedTests(SynchronousTestCase):
    """L{route_queued}: each queued job counts toward one pool, the plainest that could run it."""

    pools = [
        ("gpu", pool_capacity(8, None, 1, ["gpu"])),
        ("cpu", pool_capacity(2, None, 0)),
        ("big", pool_capacity(16, 64 << 30, 0)),
    ]

    def test_plain_jobs_go_to_the_plainest_pool(self):
        self.assertEqual(route_queued(5, {}, self.pools), {"gpu": 0, "cpu": 5, "big": 0})

    def test_tagged_jobs_go_only_where_they_can_run(self):
        """A 1-GPU job takes a whole 8-core GPU worker: 8 slots each."""
        shares = route_queued(0, {GPU_JOB: 3, Shape(tags=frozenset({"gpu"})): 2}, self.pools)
        self.assertEqual(shares, {"gpu": 3 * 8 + 2, "cpu": 0, "big": 0})

    def test_sized_jobs_go_to_the_smallest_pool_that_fits(self):
        """
        4 cores: not the 2-core pool; the 16-core pool has fewer GPUs and
        tags than the GPU pool.  Two 4-core 32G jobs fill a 64G worker:
        each counts half its 16 slots.  A pool that does not say its
        memory counts as having enough.
        """
        shapes = {Shape(cpus=4): 3, Shape(cpus=4, memory=32 << 30): 1, Shape(memory=1 << 30): 2}
        shares = route_queued(0, shapes, self.pools)
        self.assertEqual(shares, {"gpu": 0, "cpu": 2, "big": 3 * 4 + 16 // 2})

    def test_jobs_no_pool_can_run_count_nowhere(self):
        shares = route_queued(0, {Shape(tags=frozenset({"fpga"})): 7}, self.pools)
        self.assertEqual(shares, {"gpu": 0, "cpu": 0, "big": 0})

    def test_ties_go_to_the_first_pool_given(self):
        pools = [("a", pool_capacity(1, None, 0)), ("b", pool_capacity(1, None, 0))]
        self.assertEqual(route_queued(3, {}, pools), {"a": 3, "b": 0})


class TwoPools:
    """
    Two adaptive pools in simulated time, each with its own policy and its
    share of the queue (L{route_queued}): launches connect after
    C{queue_wait} seconds as a one-slot worker of their pool; workers take
    the queued jobs they could run.
    """

    def __init__(self, test, bounds, queue_wait=3.0):
        self.test = test
        self.pools = [("gpu", pool_capacity(1, None, 1, ["gpu"])), ("cpu", pool_capacity(1, None, 0))]
        self.policies = {name: ScalingPolicy(bounds) for name, _ in self.pools}
        self.capacity = dict(self.pools)
        self.now = 0.0
        self.queue_wait = queue_wait
        self.jobs: list[tuple[Shape | None, float]] = []
        #: Per pool, launch id: [submitted, started, job end or None, draining].
        self.launches: dict[str, dict[str, list]] = {name: {} for name, _ in self.pools}
        self.submitted = {name: 0 for name, _ in self.pools}
        self.idle: dict[str, float] = {}
        self.done = 0
        self.next_id = 0

    def tick(self) -> None:
        self.now += 1
        for name, launches in self.launches.items():
            ledger = Ledger(self.capacity[name])
            for lid, x in list(launches.items()):
                if x[1] is None and self.now - x[0] >= self.queue_wait:
                    x[1] = self.now
                    self.idle[lid] = self.now
                if x[1] is None:
                    continue
                if x[2] is not None and x[2] <= self.now:
                    x[2] = None
                    self.done += 1
                    self.idle[lid] = self.now
                if x[2] is None and x[3]:
                    del launches[lid]
                    continue
                if x[2] is None and not x[3]:
                    for i, (shape, seconds) in enumerate(self.jobs):
                        if ledger.could_run(shape):
                            del self.jobs[i]
                            x[2] = self.now + seconds
                            self.idle.pop(lid, None)
                            break
        plain = sum(1 for shape, _ in self.jobs if shape is None)
        shapes: dict[Shape, int] = {}
        for shape, _ in self.jobs:
            if shape is not None:
                shapes[shape] = shapes.get(shape, 0) + 1
        shares = route_queued(plain, shapes, self.pools)
        for name, launches in self.launches.items():
            view = PoolView(
                now=self.now,
                queued=shares[name],
                job_seconds=None,
                workers=tuple(
                    Worker(hash(lid), lid, 1, int(x[2] is not None), self.idle.get(lid), x[3])
                    for lid, x in launches.items()
                    if x[1] is not None
                ),
                launches=tuple(Launch(lid, x[0], x[1], None, x[3]) for lid, x in launches.items()),
            )
            for d in self.policies[name].decide(view):
                if isinstance(d, Submit):
                    for _ in range(d.count):
                        self.next_id += 1
                        launches[f"{name}{self.next_id}"] = [self.now, None, None, False]
                        self.submitted[name] += 1
                elif isinstance(d, Drain):
                    self.test.assertIsNone(launches[d.launch][2], f"drained a busy worker: {d}")
                    launches[d.launch][3] = True
                else:
                    del launches[d.launch]

    def size(self, name: str) -> int:
        return sum(1 for x in self.launches[name].values() if not x[3])


class TwoPoolTests(SynchronousTestCase):
    """Two adaptive pools: each scales for the queued work only its workers could run."""

    bounds = PoolBounds(min_workers=0, max_workers=2, idle_timeout=10)

    def run_jobs(self, shape, count):
        sim = TwoPools(self, self.bounds)
        sim.jobs = [(shape, 4.0)] * count
        peak = {"gpu": 0, "cpu": 0}
        while sim.jobs or sim.done < count:
            sim.tick()
            for name in peak:
                peak[name] = max(peak[name], sim.size(name))
            self.assertLess(sim.now, 200)
        for _ in range(15):
            sim.tick()
        self.assertEqual(sim.done, count)
        self.assertEqual((sim.size("gpu"), sim.size("cpu")), (0, 0), "not back to zero when idle")
        return sim, peak

    def test_gpu_jobs_scale_only_the_gpu_pool(self):
        sim, peak = self.run_jobs(GPU_JOB, 10)
        self.assertEqual(peak, {"gpu": 2, "cpu": 0})
        self.assertEqual(sim.submitted["cpu"], 0)

    def test_plain_jobs_scale_only_the_cpu_pool(self):
        """A GPU worker could run them too, but they count toward the plainer pool."""
        sim, peak = self.run_jobs(None, 10)
        self.assertEqual(peak, {"gpu": 0, "cpu": 2})
        self.assertEqual(sim.submitted["gpu"], 0)
