"""
Tests for L{cw.core.resources} and the scheduler's resource rules: what a
job asks for, what a worker has, where a sized job may go, fairness with
mixed shapes, no starvation of a big job, and unschedulable jobs.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from cw.core.config import WorkerConfig, parse_argv
from cw.core.fairqueue import FairQueue
from cw.core.records import Job, Outcome, Result, encode_options, read_error_report
from cw.core.resources import (
    Capacity,
    Ledger,
    Shape,
    allocation_of,
    build_capacity,
    format_size,
    parse_size,
    shape_of,
)
from cw.core.scheduler import Scheduler
from cw.core.validation import (
    MAX_ENV_BYTES,
    MAX_ENV_VARIABLES,
    check_capacity,
    check_env,
    check_jobs,
    check_request,
)
from cw.core.worker_state import StartBatch, WorkerState
from cw.errors import BadCommand


def sized(seq: int, tags=(), priority=None, **resources) -> Job:
    """A job as a client sends it, asking for C{resources} and C{tags}."""
    normal, tags = check_request(resources, tags)
    return Job(
        0, seq, b"p%d" % seq, encode_options(resources=normal or None, tags=tags or None, priority=priority)
    )


def plain(seq: int) -> Job:
    return Job(0, seq, b"p%d" % seq)


def by_worker(dispatched) -> dict[int, list[int]]:
    return {worker: [job.seq for job in jobs] for worker, jobs in dispatched}


def done(scheduler: Scheduler, worker: int, jobs, now=None) -> None:
    scheduler.complete(worker, [Result(j.client, j.seq, Outcome.OK, b"") for j in jobs], now)


class SizeTests(SynchronousTestCase):
    def test_units(self):
        self.assertEqual(parse_size("16G"), 16 << 30)
        self.assertEqual(parse_size("512M"), 512 << 20)
        self.assertEqual(parse_size("1.5GiB"), 3 << 29)
        self.assertEqual(parse_size("2048"), 2048)
        self.assertEqual(parse_size(" 4 kb"), 4096)
        self.assertEqual(parse_size(123), 123)

    def test_bad_sizes(self):
        for bad in ["16Q", "G", "-1G", "1GG", "", "inf", True, 1.5, -3, None]:
            self.assertRaises(ValueError, parse_size, bad)

    def test_message_says_what_to_write(self):
        e = self.assertRaises(ValueError, parse_size, "lots")
        self.assertIn("'lots'", str(e))
        self.assertIn("16G", str(e))

    def test_format(self):
        self.assertEqual(format_size(16 << 30), "16G")
        self.assertEqual(format_size(1000), "1000")


class EnvTests(SynchronousTestCase):
    """L{check_env}: the environment variables a job asks for (C{submit_with(..., env=)})."""

    def test_normalised(self):
        self.assertEqual(check_env({"B": "2", "A": ""}), {"A": "", "B": "2"})
        self.assertEqual(list(check_env({"B": "2", "A": "1"})), ["A", "B"])
        self.assertEqual(check_env(None), {})

    def test_errors(self):
        cases = [
            ([("A", "1")], "env must be a dict"),
            ("A=1", "env must be a dict"),
            ({"A": 1}, "env values must be strings, not int"),
            ({1: "a"}, "env names must be strings"),
            ({"": "a"}, "non-empty and without '='"),
            ({"A=B": "a"}, "non-empty and without '='"),
            ({"A": "a\0b"}, "NUL"),
            ({"A\0": "a"}, "NUL"),
            ({"A": "\ud800"}, "cannot be encoded"),
            ({f"V{i}": "" for i in range(MAX_ENV_VARIABLES + 1)}, f"at most {MAX_ENV_VARIABLES} variables"),
            ({"A": "x" * MAX_ENV_BYTES}, "bytes as JSON"),
        ]
        for env, text in cases:
            e = self.assertRaises(ValueError, check_env, env)
            self.assertIn(text, str(e))

    def test_master_checks_env(self):
        """A job whose env is malformed is refused by the master (and by a worker from a master)."""
        for env in ({"A": 1}, ["A"], {"A=": "1"}):
            bad = Job(0, 1, b"", json.dumps({"env": env}).encode())
            e = self.assertRaises(BadCommand, check_jobs, [bad])
            self.assertIn("job 1: env", str(e))
        check_jobs([Job(0, 2, b"", encode_options(env={"OMP_NUM_THREADS": "1"}))])


class RequestTests(SynchronousTestCase):
    """L{check_request} normalises a job's request and names what is wrong."""

    def test_normalised(self):
        self.assertEqual(
            check_request({"cpus": 4, "memory": "16G", "gpus": 1, "licenses": 1}, {"avx512"}),
            ({"cpus": 4, "gpus": 1, "licenses": 1, "memory": 16 << 30}, ["avx512"]),
        )

    def test_defaults_dropped(self):
        self.assertEqual(check_request({"cpus": 1, "gpus": 0}, None), ({}, []))
        self.assertEqual(check_request(None, []), ({}, []))

    def test_errors(self):
        cases = [
            ({"memory": "16Q"}, None, "not a size"),
            ({"cpus": 0}, None, "at least one cpu"),
            ({"cpus": 2.5}, None, "whole number"),
            ({"gpus": -1}, None, "whole number"),
            ({"licenses": "x"}, None, "'licenses'"),
            ({"bad name": 1}, None, "'bad name'"),
            ([("cpus", 2)], None, "resources must be a dict"),
            ({}, "gpu", "tags must be a set"),
            ({}, {"a/b"}, "'a/b'"),
        ]
        for resources, tags, text in cases:
            e = self.assertRaises(ValueError, check_request, resources, tags)
            self.assertIn(text, str(e))

    def test_plain_shape(self):
        """A job asking for the defaults is plain; others have a shape."""
        self.assertIsNone(shape_of(plain(1)))
        self.assertIsNone(shape_of(Job(0, 1, b"", encode_options(timeout=3))))
        self.assertIsNone(shape_of(sized(1, cpus=1)))
        self.assertEqual(shape_of(sized(1, cpus=2)), Shape(cpus=2))
        self.assertEqual(shape_of(sized(1, tags={"gpu"}, gpus=1)), Shape(gpus=1, tags=frozenset({"gpu"})))
        self.assertEqual(shape_of(sized(1, licenses=2)), Shape(custom=(("licenses", 2),)))

    def test_master_checks_requests(self):
        bad = Job(0, 1, b"", json.dumps({"resources": {"memory": "lots"}}).encode())
        e = self.assertRaises(BadCommand, check_jobs, [bad])
        self.assertIn("job 1", str(e))
        check_jobs([sized(2, tags={"x"}, cpus=3, memory="1G")])

    def test_capacity_checked(self):
        capacity = Capacity(4, 8 << 30, ("0", "1"), (("licenses", 2),), frozenset({"gpu"}))
        self.assertEqual(check_capacity(capacity.to_json()), capacity)
        for bad in [
            [],
            {"cpus": 0},
            {"cpus": 2, "gpus": ["0", "0"]},
            {"cpus": 2, "gpus": "0,1"},
            {"cpus": 2, "custom": {"x": -1}},
            {"cpus": 2, "tags": ["a\nb"]},
            {"cpus": 2, "memory": "16G"},
        ]:
            self.assertRaises(BadCommand, check_capacity, bad)


class LedgerTests(SynchronousTestCase):
    def test_take_and_give_back(self):
        ledger = Ledger(Capacity(4, 10, ("0", "1", "2")))
        shape = Shape(cpus=2, memory=6, gpus=2)
        self.assertTrue(ledger.fits(shape))
        self.assertEqual(ledger.take((1, 1), shape), ("0", "1"))
        self.assertFalse(ledger.fits(shape))
        self.assertTrue(ledger.fits(Shape(cpus=2, memory=4, gpus=1)))
        ledger.take((1, 2), None)
        self.assertFalse(ledger.fits(Shape(cpus=2)))
        ledger.give_back((1, 1), shape)
        self.assertEqual(ledger.gpus, ["0", "1", "2"])
        self.assertTrue(ledger.fits(Shape(cpus=3, gpus=3)))

    def test_could_run(self):
        ledger = Ledger(Capacity(4, 0, (), (("licenses", 1),), frozenset({"a"})))
        self.assertTrue(ledger.could_run(None))
        self.assertTrue(ledger.could_run(Shape(cpus=4, tags=frozenset({"a"}), custom=(("licenses", 1),))))
        self.assertFalse(ledger.could_run(Shape(cpus=5)))
        self.assertFalse(ledger.could_run(Shape(memory=1)))
        self.assertFalse(ledger.could_run(Shape(gpus=1)))
        self.assertFalse(ledger.could_run(Shape(tags=frozenset({"b"}))))
        self.assertFalse(ledger.could_run(Shape(custom=(("licenses", 2),))))


class PlacementTests(SynchronousTestCase):
    """Sized jobs go only where free capacity covers them and the tags are."""

    def setUp(self):
        self.s = Scheduler(prefetch=0)
        self.client = self.s.add_client()

    def test_gpu_jobs_only_on_gpu_worker_and_ids_allocated(self):
        cpu = self.s.add_worker(4, "cpu", Capacity(4))
        gpu = self.s.add_worker(4, "gpu", Capacity(4, gpus=("0", "1")))
        self.s.submit(self.client, [sized(i, gpus=1) for i in range(1, 6)])
        out = dict(self.s.dispatch())
        self.assertNotIn(cpu, out)
        self.assertEqual([job.seq for job in out[gpu]], [1, 2])
        self.assertEqual([allocation_of(job)["gpus"] for job in out[gpu]], [["0"], ["1"]])
        self.assertEqual(self.s.queued, 3)
        done(self.s, gpu, out[gpu][1:])
        again = dict(self.s.dispatch())
        self.assertEqual([allocation_of(job)["gpus"] for job in again[gpu]], [["1"]])

    def test_plain_jobs_share_the_gpu_worker(self):
        cpu = self.s.add_worker(2, "cpu", Capacity(2))
        gpu = self.s.add_worker(4, "gpu", Capacity(4, gpus=("0",)))
        self.s.submit(self.client, [sized(1, gpus=1)] + [plain(i) for i in range(2, 8)])
        out = by_worker(self.s.dispatch())
        self.assertEqual(sorted(out[gpu] + out[cpu]), list(range(1, 7)))
        self.assertIn(1, out[gpu])
        self.assertEqual(len(out[cpu]), 2)

    def test_tags(self):
        a = self.s.add_worker(2, "a", Capacity(2, tags=frozenset({"avx512"})))
        b = self.s.add_worker(2, "b", Capacity(2))
        self.s.submit(self.client, [sized(i, tags={"avx512"}) for i in range(1, 5)])
        out = by_worker(self.s.dispatch())
        self.assertEqual(out, {a: [1, 2]})
        self.assertNotIn(b, out)

    def test_custom_resources(self):
        a = self.s.add_worker(4, "a", Capacity(4, custom=(("licenses", 2),)))
        self.s.add_worker(4, "b", Capacity(4))
        self.s.submit(self.client, [sized(i, licenses=1) for i in range(1, 5)])
        out = dict(self.s.dispatch())
        self.assertEqual(by_worker(out.items()), {a: [1, 2]})
        done(self.s, a, out[a][:1])
        self.assertEqual(by_worker(self.s.dispatch()), {a: [3]})

    def test_cpus_and_memory(self):
        a = self.s.add_worker(8, "a", Capacity(4, memory=16 << 30))
        self.s.submit(
            self.client, [sized(1, cpus=3), sized(2, cpus=2), sized(3, memory="10G"), sized(4, memory="10G")]
        )
        out = by_worker(self.s.dispatch())
        # 3 cpus, then 10G with one cpu; neither the 2-cpu job nor the second 10G fits.
        self.assertEqual(out, {a: [1, 3]})

    def test_plain_jobs_limited_by_cpus(self):
        """
        A worker with fewer cpus than slots is given no more plain jobs than
        cpus into its slots; more only as prefetch (which it starts as
        cores come free), and then no sized job fits.
        """
        a = self.s.add_worker(4, "a", Capacity(2))
        self.s.worker(a).credit = -4  # no prefetch room at all
        self.s.submit(self.client, [plain(i) for i in range(1, 6)] + [sized(6, licenses=0, cpus=2)])
        self.assertEqual(by_worker(self.s.dispatch()), {a: [1, 2]})

    def test_never_prefetched(self):
        """A sized job waits at the master rather than behind a worker's queue."""
        s = Scheduler(prefetch=4)
        c = s.add_client()
        a = s.add_worker(1, "a", Capacity(1))
        s.submit(c, [plain(1), sized(2, cpus=1, memory=0, licenses=0, tags={"t"})])
        s.worker(a).resources = None
        out = by_worker(s.dispatch())
        self.assertEqual(out, {a: [1]})
        self.assertEqual(s.queued, 1)
        b = s.add_worker(1, "b", Capacity(1, tags=frozenset({"t"})))
        self.assertEqual(by_worker(s.dispatch()), {b: [2]})

    def test_no_prefetch_where_sized_jobs_could_run(self):
        """A worker that could run a queued sized job is not filled with prefetched plain jobs."""
        s = Scheduler(prefetch=2)
        c = s.add_client()
        gpu = s.add_worker(1, "gpu", Capacity(2, gpus=("0",)))
        cpu = s.add_worker(1, "cpu", Capacity(1))
        s.submit(
            c, [plain(1), plain(2), sized(3, gpus=1), sized(4, gpus=1)] + [plain(i) for i in range(5, 20)]
        )
        out = by_worker(s.dispatch())
        self.assertEqual(len(out[gpu]), 1)
        self.assertEqual(len(out[cpu]), 3)

    def test_requeued_job_gets_new_allocation(self):
        a = self.s.add_worker(2, "a", Capacity(2, gpus=("7",)))
        self.s.submit(self.client, [sized(1, gpus=1)])
        self.s.dispatch()
        back = self.s.remove_worker(a)
        self.assertEqual([job.seq for job in back], [1])
        b = self.s.add_worker(2, "b", Capacity(2, gpus=("3",)))
        ((wid, jobs),) = self.s.dispatch()
        self.assertEqual((wid, allocation_of(jobs[0])["gpus"]), (b, ["3"]))
        self.assertEqual(self.s.worker(b).ledger.gpus, [])


class FairnessTests(SynchronousTestCase):
    def test_clients_take_turns_with_mixed_shapes(self):
        """Two clients, one with big jobs and one with small: each gets its turns."""
        s = Scheduler(prefetch=0)
        big, small = s.add_client(), s.add_client()
        w = s.add_worker(8, "w", Capacity(8))
        s.submit(big, [sized(i, cpus=2) for i in range(1, 11)])
        s.submit(small, [plain(i) for i in range(1, 11)])
        out = s.dispatch()[0][1]
        self.assertEqual(
            [(job.client, job.seq) for job in out],
            [(big, 1), (small, 1), (big, 2), (small, 2), (big, 3)],
        )
        self.assertEqual(s.worker(w).ledger.cpus - s.worker(w).ledger.plain, 0)

    def test_priority_within_client(self):
        s = Scheduler(prefetch=0)
        c = s.add_client()
        w = s.add_worker(1, "w", Capacity(4))
        s.submit(c, [sized(1, cpus=2), sized(2, cpus=2, priority=5), plain(3)])
        self.assertEqual(by_worker(s.dispatch()), {w: [2]})

    def test_smaller_job_backfills(self):
        """A job that fits goes ahead of one that does not fit now."""
        s = Scheduler(prefetch=0)
        c = s.add_client()
        w = s.add_worker(4, "w", Capacity(4))
        s.submit(c, [sized(1, cpus=3), sized(2, cpus=3), sized(3, cpus=1)])
        self.assertEqual(by_worker(s.dispatch()), {w: [1, 3]})


class StarvationTests(SynchronousTestCase):
    """A stream of small jobs does not keep a big one waiting forever."""

    def run_stream(self, reserve_after: float) -> float | None:
        s = Scheduler(prefetch=0, reserve_after=reserve_after)
        small, big = s.add_client(), s.add_client()
        w = s.add_worker(4, "w", Capacity(4))
        seq = 0

        def feed(n):
            nonlocal seq
            s.submit(small, [plain(seq + i) for i in range(1, n + 1)])
            seq += n

        feed(4)
        held = {job.seq: job for _, jobs in s.dispatch(0.0) for job in jobs}
        s.submit(big, [sized(1, cpus=4)])
        now = 0.0
        for _ in range(200):
            now += 1.0
            feed(1)
            # The oldest small job ends each second; the rest keep running.
            first = min((k for k in held if held[k].client == small), default=None)
            if first is not None:
                job = held.pop(first)
                done(s, w, [job], now)
            for _, jobs in s.dispatch(now):
                for job in jobs:
                    if job.client == big:
                        return now
                    held[job.seq] = job
        return None

    def test_big_job_starts_after_reservation(self):
        started = self.run_stream(reserve_after=5)
        self.assertIsNotNone(started)
        self.assertLess(started, 5 + 4 + 2)

    def test_starves_without_reservation(self):
        """The test above can fail: with no reservation, the big job never starts."""
        self.assertIsNone(self.run_stream(reserve_after=0))

    def test_reservation_ends_when_its_jobs_are_gone(self):
        """A worker kept for a shape whose jobs were cancelled takes other jobs again."""
        s = Scheduler(prefetch=0, reserve_after=1)
        c = s.add_client()
        a = s.add_worker(2, "a", Capacity(2))
        s.submit(c, [plain(1), plain(2), sized(3, cpus=2)])
        s.dispatch(0.0)
        s.dispatch(2.0)
        self.assertEqual(s._reservation[1], a)
        s.cancel(c, [3])
        done(s, a, s.worker(a).held.copy().values(), 3.0)
        s.submit(c, [plain(4)])
        self.assertEqual(by_worker(s.dispatch(3.0)), {a: [4]})

    def test_reservation_moves_when_worker_leaves(self):
        s = Scheduler(prefetch=0, reserve_after=1)
        c = s.add_client()
        a = s.add_worker(2, "a", Capacity(2))
        s.submit(c, [plain(1), plain(2), sized(3, cpus=2)])
        s.dispatch(0.0)
        s.dispatch(2.0)
        self.assertEqual(s._reservation[1], a)
        b = s.add_worker(2, "b", Capacity(2))
        s.remove_worker(a)
        s.submit(c, [plain(4), plain(5)])
        self.assertEqual(by_worker(s.dispatch(3.0)), {b: [1, 2]})
        self.assertEqual(s._reservation[1], b)
        done(s, b, s.worker(b).held.copy().values(), 4.0)
        self.assertEqual(by_worker(s.dispatch(4.0)), {b: [3]})
        self.assertIsNone(s._reservation)


class UnschedulableTests(SynchronousTestCase):
    def setUp(self):
        self.s = Scheduler(unschedulable_timeout=60)
        self.c = self.s.add_client()

    def test_counted_and_warned_once(self):
        self.s.submit(self.c, [sized(i, gpus=1) for i in range(1, 4)] + [plain(4)])
        self.assertEqual(self.s.unschedulable(), {}, "no worker yet: not judged")
        self.s.add_worker(2, "a", Capacity(2))
        self.s.dispatch(0.0)
        self.assertEqual(self.s.unschedulable(), {Shape(gpus=1): 3})
        warned = self.s.expire(1.0).unschedulable
        self.assertEqual(len(warned), 1)
        self.assertIn("gpus=1", warned[0])
        self.assertIn("cpus=2", warned[0])
        self.assertEqual(self.s.expire(2.0).unschedulable, [])

    def test_fail_after_timeout(self):
        self.s.add_worker(2, "a", Capacity(2))
        self.s.submit(self.c, [sized(1, cpus=8), sized(2, cpus=2)])
        self.s.dispatch(0.0)
        self.assertEqual(self.s.expire(10.0).failed, [])
        failed = self.s.expire(70.0).failed
        self.assertEqual([r.seq for r in failed], [1])
        report = read_error_report(failed[0].payload)
        self.assertEqual(report["type"], "Unschedulable")
        self.assertIn("cpus=8", report["message"])
        self.assertIn("--cpus", report["message"])
        self.assertEqual(self.s.client(self.c).queued, 0)
        self.assertEqual(self.s.unschedulable(), {})

    def test_never_fails_by_default(self):
        s = Scheduler()
        c = s.add_client()
        s.add_worker(2, "a", Capacity(2))
        s.submit(c, [sized(1, cpus=8)])
        self.assertEqual(s.expire(1e9).failed, [])
        self.assertEqual(s.queued, 1)

    def test_schedulable_again_when_worker_joins(self):
        self.s.add_worker(2, "a", Capacity(2))
        self.s.submit(self.c, [sized(1, cpus=8)])
        self.s.expire(0.0)
        big = self.s.add_worker(8, "big", Capacity(8))
        self.assertEqual(self.s.unschedulable(), {})
        self.assertEqual(self.s.expire(100.0).failed, [])
        self.assertEqual(by_worker(self.s.dispatch(100.0)), {big: [1]})


class FairQueueShapeTests(SynchronousTestCase):
    def test_pop_fitting_by_priority_then_age(self):
        q = FairQueue()
        for job in [sized(1, cpus=2), plain(2), sized(3, cpus=4, priority=1), sized(4, cpus=2)]:
            q.append(job)
        self.assertEqual(q.shape_counts(), {Shape(cpus=2): 2, Shape(cpus=4): 1})
        small = lambda shape: shape is None or shape.cpus <= 2  # noqa: E731
        self.assertEqual(q.pop_fitting(small)[0].seq, 1)
        self.assertEqual(q.pop_fitting(small)[0].seq, 2)
        self.assertEqual(q.pop_fitting(lambda shape: True)[0].seq, 3)
        self.assertIsNone(q.pop_fitting(lambda shape: shape is None))
        self.assertEqual((len(q), q.sized), (1, 1))
        self.assertEqual(q.popleft().seq, 4)
        self.assertEqual((len(q), q.sized), (0, 0))

    def test_remove_shapes(self):
        q = FairQueue()
        for job in [sized(1, cpus=2), plain(2), sized(3, cpus=4)]:
            q.append(job)
        self.assertEqual([j.seq for j in q.remove_shapes({Shape(cpus=4)})], [3])
        self.assertEqual((len(q), q.sized), (2, 1))


class WorkerCapacityTests(SynchronousTestCase):
    """A worker's capacity from its options, with the machine's as defaults."""

    machine = Capacity(2, 8 << 30, ("3",))

    def build(self, cpus=None, memory=None, gpus=None, resources=(), tags=(), procs=1):
        return build_capacity(cpus, memory, gpus, resources, tags, procs, self.machine)

    def test_defaults_from_machine(self):
        self.assertEqual(self.build(), self.machine)

    def test_cpus_at_least_procs(self):
        self.assertEqual(self.build(procs=6).cpus, 6)
        self.assertEqual(self.build(cpus=1, procs=6).cpus, 1)

    def test_options(self):
        capacity = self.build(4, "64G", "0,1", ["licenses=2", "tokens=0.5"], ["gpu", "avx512"])
        self.assertEqual(
            capacity,
            Capacity(
                4, 64 << 30, ("0", "1"), (("licenses", 2), ("tokens", 0.5)), frozenset({"gpu", "avx512"})
            ),
        )
        self.assertEqual(self.build(gpus="3").gpus, ("0", "1", "2"))
        self.assertEqual(self.build(gpus="0").gpus, ())

    def test_bad_options(self):
        for kwargs, text in [
            ({"memory": "lots"}, "--memory"),
            ({"gpus": "0,0"}, "--gpus"),
            ({"gpus": "0,,1"}, "--gpus"),
            ({"resources": ["licenses"]}, "--resource"),
            ({"resources": ["licenses=x"]}, "--resource"),
            ({"tags": ["a b"]}, "'a b'"),
            ({"cpus": 0}, "--cpus"),
        ]:
            e = self.assertRaises(ValueError, self.build, **kwargs)
            self.assertIn(text, str(e))

    def test_repeatable_options(self):
        given, _ = parse_argv(
            WorkerConfig, ["--tag", "a", "--resource", "x=1", "--tag=b", "--gpus", "0,1"], "cw-worker"
        )
        self.assertEqual(given, {"tag": ("a", "b"), "resource": ("x=1",), "gpus": "0,1"})


class WorkerSideTests(SynchronousTestCase):
    """The worker's own rules (L{cw.core.worker_state}) for sized jobs."""

    def test_sized_job_starts_first_alone_and_pinned(self):
        state = WorkerState(4, cpus=4, cores=[0, 1, 2, 3])
        state.job_seconds = 0.001  # short jobs: plain ones are batched
        jobs = [plain(1), plain(2), sized(3, cpus=2), plain(4)]
        state.jobs_arrived([Job(1, j.seq, j.payload, j.options) for j in jobs])
        started = [i for i in state.start_jobs(0.0) if isinstance(i, StartBatch)]
        self.assertEqual([j.seq for j in started[0].jobs], [3])
        self.assertEqual(allocation_of(started[0].jobs[0])["cores"], [0, 1])
        self.assertEqual(state.cpus_used, 2 + len(started) - 1)
        second = WorkerState(4, cpus=4, cores=[0, 1, 2, 3])
        second.jobs_arrived(
            [Job(1, 1, b"", sized(1, cpus=2).options), Job(1, 2, b"", sized(2, cpus=2).options)]
        )
        a, b = second.start_jobs(0.0)
        self.assertEqual([allocation_of(x.jobs[0])["cores"] for x in (a, b)], [[0, 1], [2, 3]])
        second.batch_finished(a.batch, [], 1.0)
        self.assertEqual(second.pinned, {0: 0, 1: 0, 2: 1, 3: 1})

    def test_plain_batches_limited_by_cpus(self):
        state = WorkerState(4, cpus=2)
        state.jobs_arrived([Job(1, i, b"") for i in range(1, 6)])
        started = [i for i in state.start_jobs(0.0) if isinstance(i, StartBatch)]
        self.assertEqual(len(started), 2)
        more = state.batch_finished(started[0].batch, [Result(1, 1, Outcome.OK, b"")], 1.0)
        self.assertEqual(len([i for i in more if isinstance(i, StartBatch)]), 1)
