"""
Property tests for L{cw.core.scheduler}: whatever the order of clients
arriving and leaving, submits, workers joining, draining, stalling and
being lost, results (late, duplicated or for jobs a worker does not hold),
cancels and deadlines, no job is lost or run twice; and with jobs that ask
for cores, GPUs, custom resources and tags (L{cw.core.resources}), no
worker is ever given more than it has.

A L{hypothesis.stateful.RuleBasedStateMachine} drives the scheduler's
public API and keeps its own model of where each job should be, built only
from what the scheduler returned.  After every step the model and the
scheduler must agree, and every job must be in exactly one place: queued
once, held by exactly one live worker, or ended (delivered once, failed
after its attempts, or cancelled).  At the end every worker finishes
everything, and every job of a client still there that was not cancelled
must have exactly one outcome.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.trial.unittest import SynchronousTestCase

from cw.core.records import Job, Outcome, Result, encode_options, read_error_report
from cw.core.resources import Capacity, allocation_of, shape_of
from cw.core.scheduler import Scheduler, UnknownPeer

#: Where a job can be, besides held by a worker (C{("held", worker)}).
QUEUED, DELIVERED, FAILED, CANCELLED, GONE = "queued", "delivered", "failed", "cancelled", "gone"

#: Seconds past a job's timeout that its worker has to report it.
GRACE = 1.0


def ok(key: tuple[int, int]) -> Result:
    """The successful result a worker reports for the job C{key}."""
    return Result(key[0], key[1], Outcome.OK, b"value")


def queued_keys(scheduler: Scheduler) -> list[tuple[int, int]]:
    """Keys of every job in the scheduler's queue, duplicates kept."""
    return [
        job.key
        for jobs in scheduler._queue._clients.values()
        for level in jobs.levels.values()
        for job in level
    ] + [
        job.key
        for jobs in scheduler._queue._clients.values()
        for shapes in jobs.sized_levels.values()
        for level in shapes.values()
        for job in level
    ]


#: What jobs may ask for (None: nothing, a plain job).
REQUESTS = [
    None,
    {"resources": {"cpus": 2}},
    {"resources": {"cpus": 3, "gpus": 1}},
    {"resources": {"gpus": 2}},
    {"resources": {"licenses": 1}},
    {"tags": ["t"]},
    {"resources": {"cpus": 2, "memory": 1 << 30}, "tags": ["t"]},
]

#: A worker that can run every request, for the end.
EVERYTHING = Capacity(4, 2 << 30, ("0", "1"), (("licenses", 2),), frozenset({"t"}))

capacities = st.builds(
    Capacity,
    cpus=st.integers(1, 4),
    memory=st.sampled_from([0, 1 << 30]),
    gpus=st.sampled_from([(), ("0",), ("0", "1"), ("a", "b", "c")]),
    custom=st.sampled_from([(), (("licenses", 1),)]),
    tags=st.sampled_from([frozenset(), frozenset({"t"})]),
)


class SchedulerMachine(RuleBasedStateMachine):
    """The scheduler against a model of where each job is."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduler = Scheduler(
            prefetch=1,
            max_attempts=2,
            horizon=0,
            deadline_grace=GRACE,
            reserve_after=2,
            unschedulable_timeout=20,
        )
        self.now = 0.0
        self.clients: set[int] = set()
        self.departed: set[int] = set()
        self.workers: set[int] = set()
        self.lost: set[int] = set()
        self.next_seq = 1
        #: Every job submitted: where it is now.
        self.where: dict[tuple[int, int], tuple] = {}
        self.limits: dict[tuple[int, int], int] = {}
        #: Results (and failure reports) delivered, per job.
        self.delivered: Counter = Counter()

    # -- helpers -----------------------------------------------------------

    def held_by(self, worker: int) -> list[tuple[int, int]]:
        return [key for key, place in self.where.items() if place == ("held", worker)]

    def pick_worker(self, data) -> int:
        """A live worker, one that holds jobs if any does."""
        busy = sorted(w for w in self.workers if self.held_by(w))
        return data.draw(st.sampled_from(busy or sorted(self.workers)))

    def settle(self, key: tuple[int, int], place: str) -> None:
        """The job C{key}, held by a worker, ends in C{place}."""
        assert self.where[key][0] == "held", (key, self.where[key])
        self.where[key] = (place,)

    def taken_back(self, key: tuple[int, int]) -> None:
        """A held job was taken from its worker: its client left, or it goes back to the queue."""
        self.where[key] = (GONE,) if key[0] in self.departed else (QUEUED,)

    def deliver(self, results: list[Result], place: str) -> None:
        for result in results:
            self.delivered[result.key] += 1
            assert self.delivered[result.key] == 1, f"{result.key} delivered twice"
            assert result.client in self.clients, f"{result.key} delivered to a departed client"
            self.settle(result.key, place)

    def check_failures(self, failed: list[Result], kind: str) -> None:
        """Failure reports are for jobs out of attempts."""
        for result in failed:
            report = read_error_report(result.payload)
            assert report["type"] == kind, report
            assert report["attempts"] == self.limits[result.key], (report, self.limits[result.key])

    # -- clients -----------------------------------------------------------

    @initialize(
        clients=st.integers(1, 2), slots=st.lists(st.integers(1, 3), min_size=1, max_size=2), data=st.data()
    )
    def start(self, clients, slots, data):
        """Start with clients, workers and jobs, so that few steps reach the interesting states."""
        for _ in range(clients):
            self.add_client(1)
        for n in slots:
            self.add_worker(n)
        self.submit(data, data.draw(st.integers(1, 8)), data.draw(st.sampled_from([None, 5])), None)

    @rule(weight=st.integers(1, 3))
    def add_client(self, weight):
        self.clients.add(self.scheduler.add_client(weight))

    @precondition(lambda self: self.clients)
    @rule(
        data=st.data(),
        n=st.integers(1, 6),
        timeout=st.sampled_from([None, 5]),
        attempts=st.sampled_from([None, 1, 3]),
        request=st.sampled_from(REQUESTS),
    )
    def submit(self, data, n, timeout, attempts, request=None):
        client = data.draw(st.sampled_from(sorted(self.clients)))
        options = encode_options(timeout=timeout, max_attempts=attempts, **(request or {}))
        jobs = [Job(0, self.next_seq + i, b"p", options) for i in range(n)]
        self.next_seq += n
        self.scheduler.submit(client, jobs)
        for job in jobs:
            assert job.client == client
            self.where[job.key] = (QUEUED,)
            self.limits[job.key] = attempts or self.scheduler.max_attempts

    @precondition(lambda self: len(self.clients) > 1)
    @rule(data=st.data())
    def remove_client(self, data):
        client = data.draw(st.sampled_from(sorted(self.clients)))
        queued = [key for key, place in self.where.items() if key[0] == client and place == (QUEUED,)]
        assert self.scheduler.remove_client(client) == len(queued)
        self.clients.discard(client)
        self.departed.add(client)
        for key in queued:
            self.where[key] = (GONE,)

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def cancel(self, data):
        client = data.draw(st.sampled_from(sorted(self.clients)))
        mine = sorted(key for key in self.where if key[0] == client)
        if mine and data.draw(st.integers(0, 4)) == 0:
            seqs = None
            hit = {key for key in mine if self.where[key][0] in (QUEUED, "held")}
        else:
            picked = data.draw(st.lists(st.sampled_from(mine), max_size=4)) if mine else []
            seqs = [key[1] for key in picked] + data.draw(st.lists(st.just(10**6), max_size=1))
            hit = {key for key in picked if self.where[key][0] in (QUEUED, "held")}
        dropped, kill = self.scheduler.cancel(client, seqs)
        assert dropped == sum(1 for key in hit if self.where[key] == (QUEUED,))
        expected: dict[int, list] = {}
        for key in sorted(hit):
            if self.where[key][0] == "held":
                expected.setdefault(self.where[key][1], []).append(key)
        assert {w: sorted(keys) for w, keys in kill.items()} == expected
        for key in hit:
            self.where[key] = (CANCELLED,)

    # -- workers -----------------------------------------------------------

    @rule(slots=st.integers(1, 3), capacity=st.none() | capacities)
    def add_worker(self, slots, capacity=None):
        self.workers.add(self.scheduler.add_worker(slots, capacity=capacity))

    @precondition(lambda self: self.workers)
    @rule(data=st.data(), how=st.sampled_from(["lost", "stalled only"]))
    def lose_worker(self, data, how):
        stalled = sorted(w for w in self.workers if self.scheduler.worker(w).stalled)
        if how == "stalled only" and stalled:
            worker = stalled[0]  # the master drops a stalled worker
        else:
            worker = self.pick_worker(data)
        held = self.held_by(worker)
        back, failed = self.lose_worker_now(worker)
        live = [key for key in held if key[0] in self.clients]
        ended = [job.key for job in back] + [result.key for result in failed]
        assert sorted(ended) == sorted(live), (back, failed, held)

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def drain(self, data):
        worker = self.pick_worker(data)
        held = self.held_by(worker)
        junk = [(c, 10**6) for c in self.clients]
        keys = data.draw(st.lists(st.sampled_from(held + junk or [(0, 0)]), max_size=4))
        order = list(self.scheduler.worker(worker).held)  # the order they were assigned in
        back = self.scheduler.return_jobs(worker, keys)
        expected = [key for key in order if key in set(keys)]
        assert [job.key for job in back] == [key for key in expected if key[0] in self.clients]
        for key in expected:
            self.taken_back(key)

    @precondition(lambda self: self.workers or self.lost)
    @rule()
    def dispatch(self):
        for worker, jobs in self.scheduler.dispatch(self.now):
            assert worker in self.workers, f"job sent to lost worker {worker}"
            state = self.scheduler.worker(worker)
            assert not (state.draining or state.stalled), f"job sent to worker {worker} that takes none"
            for job in jobs:
                assert self.where[job.key] == (QUEUED,), f"{job.key} dispatched from {self.where[job.key]}"
                self.where[job.key] = ("held", worker)

    @precondition(lambda self: self.workers)
    @rule(data=st.data(), status=st.sampled_from([Outcome.OK, Outcome.RAISED]))
    def complete(self, data, status):
        """A worker reports some results: its own, duplicates, others' and unknown jobs."""
        worker = self.pick_worker(data)
        keys = data.draw(st.lists(st.sampled_from(self.held_by(worker) or [(0, 10**6)]), max_size=2))
        if data.draw(st.booleans()):
            keys += data.draw(st.lists(st.sampled_from(sorted(self.where) + [(0, 10**6)]), max_size=2))
        results = [Result(key[0], key[1], status, b"r") for key in keys]
        expected = []
        for key in keys:
            if self.where.get(key) == ("held", worker):
                if key[0] in self.clients:
                    expected.append(key)
                    self.where[key] = (DELIVERED,)
                else:
                    self.where[key] = (GONE,)
        for key in expected:
            self.where[key] = ("held", worker)
        delivered = self.scheduler.complete(worker, results, self.now)
        assert [r.key for r in delivered] == expected, ([r.key for r in delivered], expected)
        self.deliver(delivered, DELIVERED)

    @precondition(lambda self: self.lost)
    @rule(data=st.data())
    def late_result_from_lost_worker(self, data):
        worker = data.draw(st.sampled_from(sorted(self.lost)))
        keys = data.draw(st.lists(st.sampled_from(sorted(self.where) or [(0, 0)]), min_size=1, max_size=3))
        try:
            self.scheduler.complete(worker, [ok(key) for key in keys], self.now)
        except UnknownPeer:
            pass
        else:
            raise AssertionError(f"results from lost worker {worker} accepted")

    # -- time and deadlines ------------------------------------------------

    @rule(dt=st.sampled_from([0.5, 3.0, 7.0]))
    def expire(self, dt):
        self.now += dt
        held = {key: place[1] for key, place in self.where.items() if place[0] == "held"}
        out = self.scheduler.expire(self.now)
        unschedulable = [r for r in out.failed if read_error_report(r.payload)["type"] == "Unschedulable"]
        for result in unschedulable:
            assert self.where[result.key] == (QUEUED,), (result.key, self.where[result.key])
            assert self.delivered[result.key] == 0
            self.delivered[result.key] += 1
            self.where[result.key] = (FAILED,)
        out.failed = [r for r in out.failed if r not in unschedulable]
        requeued = [job.key for job in out.requeued]
        failed = [result.key for result in out.failed]
        taken = sorted(key for keys in out.cancel.values() for key in keys)
        for worker, keys in out.cancel.items():
            for key in keys:
                assert held.get(key) == worker, f"{key} taken back from {worker}, held by {held.get(key)}"
        assert sorted(requeued + failed) == [key for key in taken if key[0] in self.clients]
        for worker in out.stalled:
            assert worker in self.workers
        self.check_failures(out.failed, "JobTimeout")
        self.deliver(out.failed, FAILED)
        for key in taken:
            if self.where[key][0] == "held":
                self.taken_back(key)

    # -- invariants --------------------------------------------------------

    @invariant()
    def every_job_in_exactly_one_place(self):
        queued = queued_keys(self.scheduler)
        assert len(queued) == len(set(queued)) == self.scheduler.queued, f"queued twice: {queued}"
        holder: dict[tuple[int, int], int] = {}
        for state in self.scheduler.workers():
            assert state.id in self.workers
            for key in state.held:
                assert key not in holder, f"{key} held by workers {holder[key]} and {state.id}"
                assert key not in set(queued), f"{key} both queued and held by {state.id}"
                holder[key] = state.id
        for key, place in self.where.items():
            if place == (QUEUED,):
                assert key in queued, f"{key} lost from the queue"
            elif place[0] == "held":
                assert holder.get(key) == place[1], f"{key} held by {holder.get(key)}, not {place[1]}"
            else:
                assert key not in holder and key not in queued, f"{key} is {place} but still around"
            if place[0] in (DELIVERED, FAILED):
                assert self.delivered[key] == 1, key
            elif key[0] in self.clients:
                assert self.delivered[key] == 0, key
        assert set(queued) <= set(self.where) and set(holder) <= set(self.where)

    @invariant()
    def never_more_allocated_than_a_worker_has(self):
        """Sized jobs held by a worker fit in its capacity, with distinct GPUs of its own."""
        for state in self.scheduler.workers():
            capacity = state.resources
            shapes = [shape_of(job) for job in state.held.values()]
            sized = [(key, shape) for key, shape in zip(state.held, shapes, strict=True) if shape is not None]
            assert sum(shape.cpus for _, shape in sized) <= capacity.cpus, (capacity, sized)
            assert sum(shape.memory for _, shape in sized) <= capacity.memory, (capacity, sized)
            for name, amount in capacity.custom:
                assert sum(dict(shape.custom).get(name, 0) for _, shape in sized) <= amount
            for _, shape in sized:
                assert set(dict(shape.custom)) <= set(dict(capacity.custom)), (capacity, shape)
                assert shape.tags <= capacity.tags, (capacity, shape)
            gpus = [gpu for key, _ in sized for gpu in allocation_of(state.held[key])["gpus"]]
            assert len(gpus) == len(set(gpus)) and set(gpus) <= set(capacity.gpus), (capacity, gpus)
            assert sum(shape.gpus for _, shape in sized) == len(gpus)
            assert sorted(gpus + state.ledger.gpus) == sorted(capacity.gpus)
            assert state.ledger.plain == len(state.held) - len(sized)

    @invariant()
    def client_counters(self):
        for client in self.clients:
            state = self.scheduler.client(client)
            places = Counter(place[0] for key, place in self.where.items() if key[0] == client)
            assert (state.queued, state.running) == (places[QUEUED], places["held"]), (state, places)
            # A seq is taken (a resubmission is a duplicate) while its job is queued or held.
            live = {
                key[1]
                for key, place in self.where.items()
                if key[0] == client and place[0] in (QUEUED, "held")
            }
            assert state.live == live, (state.live, live)

    # -- the end -----------------------------------------------------------

    def teardown(self):
        """Workers finish everything: every job of a present client has one outcome, or was cancelled."""
        for worker in [w for w in sorted(self.workers) if self.scheduler.worker(w).stalled]:
            self.lose_worker_now(worker)
        self.add_worker(2, EVERYTHING)
        for _ in range(10 * len(self.where) + 10):
            if not self.scheduler.queued and not any(s.held for s in self.scheduler.workers()):
                break
            self.dispatch()
            for state in self.scheduler.workers():
                keys = list(state.held)
                delivered = self.scheduler.complete(state.id, [ok(key) for key in keys], self.now)
                self.deliver(delivered, DELIVERED)
                for key in keys:
                    if self.where[key][0] == "held":
                        self.settle(key, GONE)
            self.every_job_in_exactly_one_place()
        else:
            raise AssertionError("workers never finished the queue")
        for key, place in self.where.items():
            if key[0] in self.clients:
                assert place[0] in (DELIVERED, FAILED, CANCELLED), f"{key} ended {place}"
                assert self.delivered[key] == (place[0] != CANCELLED), (key, place)
            assert self.delivered[key] <= 1

    def lose_worker_now(self, worker: int) -> tuple[list[Job], list[Result]]:
        """Drop C{worker}, as the master does when it is lost or stalled."""
        held = self.held_by(worker)
        back, failed = self.scheduler.lose_worker(worker)
        self.workers.discard(worker)
        self.lost.add(worker)
        self.check_failures(failed, "WorkerLost")
        self.deliver(failed, FAILED)
        for key in held:
            if self.where[key][0] == "held":
                self.taken_back(key)
        return back, failed


SchedulerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
    # A failure seen once in a full run (a job "lost from the queue", not
    # reproduced since) left nothing to replay it with: print the blob
    # that @reproduce_failure takes, with the steps.
    print_blob=True,
)


class SchedulerPropertyTests(SynchronousTestCase):
    """Run L{SchedulerMachine} under trial."""

    def test_no_job_lost_or_run_twice(self):
        SchedulerMachine.TestCase("runTest").runTest()
