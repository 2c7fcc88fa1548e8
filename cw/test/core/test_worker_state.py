"""
Tests for L{cw.core.worker_state}: the worker's batching, solo, cancel,
drain and lost-master rules, fed events directly (no sockets, no processes,
no clock).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cw.core.records import BATCH_BYTES, Job, Outcome, Result, encode_options, read_error_report
from cw.core.worker_state import (
    BATCH_JOBS,
    CancelBatch,
    Death,
    Drained,
    HandOver,
    KillRunning,
    ReturnJobs,
    SendResults,
    StartBatch,
    StartDrainTimer,
    WorkerState,
)


def jobs(first: int, last: int, **options) -> list[Job]:
    """Jobs of client 5 with sequence numbers C{first} to C{last} inclusive."""
    return [Job(5, seq, b"p", encode_options(**options)) for seq in range(first, last + 1)]


def starts(instructions) -> list[StartBatch]:
    return [i for i in instructions if isinstance(i, StartBatch)]


def seqs(start: StartBatch) -> list[int]:
    return [job.seq for job in start.jobs]


def sent(instructions) -> list[int]:
    return [r.seq for i in instructions if isinstance(i, SendResults) for r in i.results]


def ok(start: StartBatch) -> list[Result]:
    return [Result(j.client, j.seq, Outcome.OK, b"v") for j in start.jobs]


class BatchingTests(SynchronousTestCase):
    """Which jobs start next, and together."""

    def setUp(self):
        self.state = WorkerState(2, host="h")

    def arrive(self, batch: list[Job], now: float = 0.0) -> list[StartBatch]:
        self.assertEqual(self.state.jobs_arrived(batch), [])
        return starts(self.state.start_jobs(now))

    def measure(self, seconds: float) -> None:
        """Run one job that takes C{seconds}, so the job time is known."""
        [start] = self.arrive([Job(5, 0, b"p")], now=100.0)
        self.assertEqual(sent(self.state.batch_finished(start.batch, ok(start), 100.0 + seconds)), [0])

    def test_unknown_duration_one_by_one_up_to_slots(self):
        started = self.arrive(jobs(1, 10))
        self.assertEqual([seqs(s) for s in started], [[1], [2]])
        self.assertEqual((self.state.running, self.state.calls, len(self.state.queue)), (2, 2, 8))

    def test_short_jobs_batched_over_idle_processes(self):
        self.measure(0.001)
        self.assertAlmostEqual(self.state.job_seconds, 0.001)
        started = self.arrive(jobs(1, 20))
        self.assertEqual([len(s.jobs) for s in started], [10, 10])
        out = self.state.batch_finished(started[0].batch, ok(started[0]), 1.0)
        self.assertEqual(sent(out), list(range(1, 11)))

    def test_batch_holds_about_batch_seconds_of_work(self):
        self.measure(0.005)  # BATCH_SECONDS / 0.005 = 4 jobs
        self.assertEqual([len(s.jobs) for s in self.arrive(jobs(1, 20))], [4, 4])

    def test_batch_jobs_cap(self):
        self.state = WorkerState(1)
        self.measure(1e-9)
        [start] = self.arrive(jobs(1, 200))
        self.assertEqual(len(start.jobs), BATCH_JOBS)

    def test_batch_bytes_cap(self):
        self.state = WorkerState(1)
        self.measure(1e-9)
        big = [Job(5, seq, b"x" * (BATCH_BYTES // 3)) for seq in range(1, 10)]
        [start] = self.arrive(big)
        self.assertEqual(seqs(start), [1, 2])

    def test_slow_jobs_not_batched(self):
        self.measure(1.0)
        self.assertEqual([seqs(s) for s in self.arrive(jobs(1, 10))], [[1], [2]])

    def test_job_time_is_a_moving_average(self):
        self.measure(1.0)
        self.measure(0.0)
        self.assertAlmostEqual(self.state.job_seconds, 0.8)

    def test_job_with_timeout_alone_and_timed(self):
        self.measure(0.001)
        timed = Job(5, 3, b"p", encode_options(timeout=5))
        started = self.arrive([*jobs(1, 2), timed, *jobs(4, 5)])
        self.assertEqual([seqs(s) for s in started], [[1, 2], [3]])
        self.assertEqual([s.timeout for s in started], [None, 5.0])

    def test_worker_timeout_makes_every_job_solo(self):
        self.state.job_timeout = 7
        self.measure(0.001)
        started = self.arrive(jobs(1, 10))
        self.assertEqual([(seqs(s), s.timeout) for s in started], [([1], 7.0), ([2], 7.0)])

    def test_own_timeout_beats_worker_timeout(self):
        self.state.job_timeout = 7
        [start] = self.arrive([Job(5, 1, b"p", encode_options(timeout=2))])
        self.assertEqual(start.timeout, 2.0)

    def test_recycled_processes_one_by_one(self):
        self.state = WorkerState(2, recycles=True)
        self.measure(0.001)
        self.assertEqual([seqs(s) for s in self.arrive(jobs(1, 10))], [[1], [2]])

    def test_freed_slot_starts_next(self):
        first, _ = self.arrive(jobs(1, 3))
        out = self.state.batch_finished(first.batch, ok(first), 1.0)
        self.assertEqual([seqs(s) for s in starts(out)], [[3]])
        self.assertIsInstance(out[0], SendResults, "results go before the next start")


class FailureTests(SynchronousTestCase):
    """A job process that dies with a batch."""

    def setUp(self):
        self.state = WorkerState(2, host="h")
        self.state.job_seconds = 0.001
        self.state.jobs_arrived(jobs(1, 6))
        self.first, self.second = starts(self.state.start_jobs(0.0))
        self.assertEqual(seqs(self.first), [1, 2, 3])

    def test_lone_job_gets_the_report(self):
        state = WorkerState(1)
        state.jobs_arrived(jobs(1, 1))
        [start] = starts(state.start_jobs(0.0))
        out = state.batch_failed(start.batch, Death.DIED, b"report", 1.0)
        [send] = [i for i in out if isinstance(i, SendResults)]
        self.assertEqual(send.results, (Result(5, 1, Outcome.CRASHED, b"report"),))

    def test_lone_job_gets_its_last_output(self):
        """What the dead job wrote goes with its report; a larger batch's jobs run again without it."""
        state = WorkerState(1)
        state.jobs_arrived(jobs(1, 1))
        [start] = starts(state.start_jobs(0.0))
        out = state.batch_failed(start.batch, Death.TIMED_OUT, b"report", 1.0, (b"out", b"err"))
        [send] = [i for i in out if isinstance(i, SendResults)]
        self.assertEqual(send.results, (Result(5, 1, Outcome.CRASHED, b"report", b"out", b"err"),))

    def test_dead_batch_rerun_alone_at_the_front(self):
        out = self.state.batch_failed(self.first.batch, Death.DIED, b"", 1.0)
        self.assertEqual(sent(out), [])
        self.assertEqual([seqs(s) for s in starts(out)], [[1]])
        self.assertEqual([job.seq for job in self.state.queue], [2, 3])
        self.assertEqual(self.state.solo, {(5, 1), (5, 2), (5, 3)})
        [again] = starts(out)
        out = self.state.batch_finished(again.batch, ok(again), 2.0)
        self.assertEqual(sent(out), [1])
        self.assertEqual([seqs(s) for s in starts(out)], [[2]])
        self.assertNotIn((5, 1), self.state.solo)

    def test_cancel_kill_reruns_the_others_batched(self):
        [kill] = self.state.cancel([(5, 2)])
        self.assertEqual(kill, CancelBatch(self.first.batch, withdraw=False))
        out = self.state.batch_failed(self.first.batch, Death.CANCELLED, b"", 1.0)
        self.assertEqual([job.seq for job in self.state.queue], [])
        self.assertEqual([seqs(s) for s in starts(out)], [[1, 3]])
        self.assertEqual(self.state.solo, set())

    def test_whole_batch_cancelled_withdraws(self):
        self.assertEqual(
            self.state.cancel([(5, 4), (5, 5), (5, 6)]), [CancelBatch(self.second.batch, withdraw=True)]
        )

    def test_cancelled_result_not_sent(self):
        self.state.cancel([(5, 2)])
        self.assertEqual(sent(self.state.batch_finished(self.first.batch, ok(self.first), 1.0)), [1, 3])

    def test_cancel_queued_drops_it(self):
        state = WorkerState(1)
        state.jobs_arrived(jobs(1, 3))
        state.start_jobs(0.0)
        self.assertEqual(state.cancel([(5, 2)]), [])
        self.assertEqual([job.seq for job in state.queue], [3])

    def test_stopping_worker_returns_a_lone_dead_job(self):
        for draining in (False, True):
            state = WorkerState(1)
            state.jobs_arrived(jobs(1, 1))
            [start] = starts(state.start_jobs(0.0))
            if draining:
                state.drain(connected=True)
            else:
                state.terminating = True
            out = state.batch_failed(start.batch, Death.DIED, b"report", 1.0)
            self.assertEqual(out[0], ReturnJobs(((5, 1),)))
            self.assertEqual(sent(out), [])

    def test_stopping_worker_reports_a_timeout(self):
        state = WorkerState(1)
        state.terminating = True
        state.jobs_arrived(jobs(1, 1, timeout=1))
        [start] = starts(state.start_jobs(0.0))
        self.assertEqual(sent(state.batch_failed(start.batch, Death.TIMED_OUT, b"report", 1.0)), [1])

    def test_payload_over_the_limit_fails(self):
        self.state.max_payload = 1
        results = [
            Result(5, 1, Outcome.OK, b"vv"),
            Result(5, 2, Outcome.OK, b"v"),
            Result(5, 3, Outcome.OK, b""),
        ]
        [send, *_] = self.state.batch_finished(self.first.batch, results, 1.0)
        statuses = [r.status for r in send.results]
        self.assertEqual(statuses, [Outcome.FAILED, Outcome.OK, Outcome.OK])
        report = read_error_report(send.results[0].payload)
        self.assertEqual((report["type"], report["host"]), ("PayloadTooLarge", "h"))


class MasterLostTests(SynchronousTestCase):
    """The master connection is gone."""

    def test_queue_dropped_running_killed_results_not_sent(self):
        state = WorkerState(1)
        state.jobs_arrived(jobs(1, 2))
        [start] = starts(state.start_jobs(0.0))
        self.assertEqual(state.master_lost(), [KillRunning()])
        self.assertEqual(len(state.queue), 0)
        out = state.batch_failed(start.batch, Death.DIED, b"report", 1.0)
        self.assertEqual((sent(out), starts(out)), ([], []))
        self.assertEqual(state.running, 0)

    def test_idle_kills_nothing(self):
        self.assertEqual(WorkerState(1).master_lost(), [])

    def test_dead_batch_of_an_old_connection_not_rerun(self):
        state = WorkerState(1)
        state.job_seconds = 0.001
        state.jobs_arrived(jobs(1, 3))
        [start] = starts(state.start_jobs(0.0))
        state.master_lost()
        self.assertEqual(starts(state.batch_failed(start.batch, Death.DIED, b"", 1.0)), [])
        self.assertEqual(len(state.queue), 0)


class KeptResultsTests(SynchronousTestCase):
    """With C{keep_bytes}: running jobs outlive their master connection and their results are kept."""

    def lose_running(self, keep_bytes: int = 100):
        state = WorkerState(2, keep_bytes=keep_bytes)
        state.jobs_arrived(jobs(1, 3))
        started = starts(state.start_jobs(0.0))
        self.assertEqual([seqs(s) for s in started], [[1], [2]])
        self.assertEqual(state.master_lost({5: "session-a"}), [], "nothing is killed")
        self.assertEqual(len(state.queue), 0, "the unstarted job is dropped")
        self.assertEqual(state.running_orphans(), 2)
        return state, started

    def test_results_kept_with_their_session_not_sent(self):
        state, (first, second) = self.lose_running()
        out = state.batch_finished(first.batch, ok(first), 1.0)
        self.assertEqual(sent(out), [])
        self.assertIn(HandOver(), out)
        sessions, results = state.kept.take()
        self.assertEqual(sessions, ["session-a"])
        self.assertEqual([(r.client, r.seq, r.payload) for r in results], [(1, 1, b"v")])
        state.batch_finished(second.batch, ok(second), 2.0)
        self.assertEqual(state.lost_sessions, {}, "forgotten once its last job ended")

    def test_bounded_by_bytes(self):
        state, (first, second) = self.lose_running(keep_bytes=1)
        state.batch_finished(first.batch, ok(first), 1.0)
        out = state.batch_finished(second.batch, ok(second), 1.0)
        self.assertNotIn(HandOver(), out)
        self.assertEqual([r.seq for _, r in state.kept.results], [1])
        self.assertEqual(state.kept.dropped, 1)

    def test_new_connection_keys_do_not_reach_old_jobs(self):
        """The next master numbers clients afresh: its cancel of (5, 1) is not for the old job (5, 1)."""
        state, (first, _) = self.lose_running()
        self.assertEqual(state.cancel([(5, 1)]), [])
        state.batch_finished(first.batch, ok(first), 1.0)
        self.assertEqual([r.seq for _, r in state.kept.results], [1])

    def test_back_kills_the_rest_and_keeps_nothing_more(self):
        """Once a master is back, jobs of the lost connection still running are killed, results dropped."""
        state, (first, second) = self.lose_running()
        state.batch_finished(first.batch, ok(first), 1.0)
        self.assertEqual(state.master_back(), [KillRunning()])
        self.assertEqual(state.master_back(), [])
        out = state.batch_failed(second.batch, Death.CANCELLED, b"report", 2.0)
        self.assertEqual((sent(out), [r.seq for _, r in state.kept.results]), ([], [1]))
        self.assertEqual(state.running, 0)

    def test_back_with_nothing_lost(self):
        self.assertEqual(WorkerState(1, keep_bytes=100).master_back(), [])

    def test_crashed_old_job_not_returned_nor_rerun(self):
        state, (first, _) = self.lose_running()
        state.terminating = True
        out = state.batch_failed(first.batch, Death.DIED, b"report", 1.0)
        self.assertEqual([i for i in out if isinstance(i, ReturnJobs)], [])
        self.assertEqual([r.status for _, r in state.kept.results], [Outcome.CRASHED])


class DrainTests(SynchronousTestCase):
    """A stopping worker."""

    def setUp(self):
        self.state = WorkerState(1)
        self.state.jobs_arrived(jobs(1, 3))
        [self.start] = starts(self.state.start_jobs(0.0))

    def test_unstarted_returned_running_finish(self):
        self.assertEqual(self.state.drain(connected=True), [ReturnJobs(((5, 2), (5, 3))), StartDrainTimer()])
        out = self.state.batch_finished(self.start.batch, ok(self.start), 1.0)
        self.assertEqual(sent(out), [1])
        self.assertEqual(out[-1], Drained("every running job finished and was reported"))
        self.assertEqual(starts(out), [])

    def test_late_jobs_returned(self):
        self.state.drain(connected=True)
        self.assertEqual(self.state.jobs_arrived(jobs(4, 4)), [ReturnJobs(((5, 4),))])
        self.assertEqual(self.state.jobs_arrived([]), [])

    def test_timer_kills_and_nothing_is_sent(self):
        self.state.drain(connected=True)
        out = self.state.drain_expired(30)
        self.assertEqual([type(i) for i in out], [KillRunning, Drained])
        self.assertIn("30 s", out[1].how)
        out = self.state.batch_failed(self.start.batch, Death.DIED, b"", 31.0)
        self.assertEqual(out[0], ReturnJobs(((5, 1),)))
        self.assertEqual(sent(out), [])
        self.assertNotIn(Drained, [type(i) for i in out], "drained once")

    def test_timer_kill_of_a_batch_sends_and_reruns_nothing(self):
        state = WorkerState(2)
        state.job_seconds = 0.001
        state.jobs_arrived(jobs(1, 6))
        first, second = starts(state.start_jobs(0.0))
        state.drain(connected=True)
        state.drain_expired(30)
        # One batch's results were on their way as its process was killed.
        self.assertEqual(sent(state.batch_finished(first.batch, ok(first), 31.0)), [])
        out = state.batch_failed(second.batch, Death.DIED, b"", 31.0)
        self.assertEqual((sent(out), starts(out), len(state.queue)), ([], [], 0))

    def test_idle_drains_at_once_and_says_so(self):
        state = WorkerState(1)
        self.assertEqual(state.drain(connected=True), [ReturnJobs(()), Drained("no jobs were running")])

    def test_unconnected_kills_at_once(self):
        self.assertEqual([type(i) for i in self.state.drain(connected=False)], [KillRunning, Drained])

    def test_twice(self):
        self.state.drain(connected=True)
        self.assertEqual(self.state.drain(connected=True), [])

    def test_master_lost_ends_drain(self):
        self.state.drain(connected=True)
        self.assertEqual([type(i) for i in self.state.master_lost()], [KillRunning, Drained])
        self.assertEqual(self.state.drain_expired(30), [])


# Property: across any sequence of events, no job runs twice at once, no
# result is sent twice or for a cancelled job, and every job that arrived
# ends accounted for.

events = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(1, 5), st.booleans()),
        st.tuples(st.just("finish"), st.integers(0, 7)),
        st.tuples(st.just("fail"), st.integers(0, 7), st.sampled_from(list(Death))),
        st.tuples(st.just("cancel"), st.integers(0, 40)),
        st.tuples(st.just("drain")),
        st.tuples(st.just("expire")),
        st.tuples(st.just("lost")),
        st.tuples(st.just("terminate")),
        st.tuples(st.just("measure"), st.sampled_from([0.0001, 0.001, 0.05])),
    ),
    max_size=60,
)


class Model:
    """Runs a L{WorkerState} as the worker would, checking what it says."""

    def __init__(self, test: SynchronousTestCase, slots: int) -> None:
        self.test = test
        self.state = WorkerState(slots, host="h")
        self.now = 0.0
        self.step = 0.001
        self.seq = 0
        self.arrived: set = set()
        self.running: dict[int, StartBatch] = {}
        self.results: dict = {}
        self.cancelled: set = set()
        self.returned: set = set()
        #: Jobs the master took back itself (connection lost, worker left).
        self.taken_back: set = set()
        self.connected = True

    def held(self) -> set:
        return {job.key for job in self.state.queue} | {
            job.key for start in self.running.values() for job in start.jobs
        }

    def carry_out(self, instructions) -> None:
        for i in instructions:
            if isinstance(i, StartBatch):
                for job in i.jobs:
                    key = job.key
                    self.test.assertIn(key, self.arrived)
                    self.test.assertNotIn(key, self.results, "started after its result was sent")
                    self.test.assertNotIn(key, self.cancelled, "started after it was cancelled")
                    self.test.assertNotIn(key, self.returned, "started after it was returned")
                    for other in self.running.values():
                        self.test.assertNotIn(key, [j.key for j in other.jobs], "started twice")
                self.running[i.batch] = i
            elif isinstance(i, SendResults):
                for r in i.results:
                    self.test.assertNotIn(r.key, self.results, "result sent twice")
                    self.test.assertNotIn(r.key, self.cancelled, "result of a cancelled job sent")
                    self.results[r.key] = r
            elif isinstance(i, ReturnJobs):
                self.returned.update(i.keys)
            elif isinstance(i, CancelBatch):
                if i.batch in self.running:
                    self.fail(i.batch, Death.CANCELLED)
            elif isinstance(i, KillRunning):
                # Only on a lost connection or as a drain ends: the master
                # takes back what this worker held.
                self.taken_back |= self.held()
                for batch in list(self.running):
                    if batch in self.running:
                        self.fail(batch, Death.DIED)
            elif isinstance(i, Drained):
                self.taken_back |= self.held()  # the worker leaves

    def fail(self, batch: int, death: Death) -> None:
        del self.running[batch]
        self.carry_out(self.state.batch_failed(batch, death, b"report", self.now))

    def finish(self, batch: int) -> None:
        start = self.running.pop(batch)
        self.carry_out(self.state.batch_finished(batch, ok(start), self.now))

    def run(self, event) -> None:
        self.now += self.step
        kind = event[0]
        if kind == "arrive":
            new = []
            for _ in range(event[1]):
                self.seq += 1
                new.append(Job(5, self.seq, b"p", encode_options(timeout=5) if event[2] else b""))
            self.arrived.update(job.key for job in new)
            self.connected = True  # (again, after a lost connection)
            self.carry_out(self.state.jobs_arrived(new))
            self.carry_out(self.state.start_jobs(self.now))
        elif kind in ("finish", "fail") and self.running:
            batch = sorted(self.running)[event[1] % len(self.running)]
            if kind == "finish":
                self.finish(batch)
            else:
                self.fail(batch, event[2])
        elif kind == "cancel" and self.seq:
            key = (5, 1 + event[1] % self.seq)
            if key in self.results or key in self.returned:
                return  # the master no longer holds it for this worker
            self.cancelled.add(key)
            self.carry_out(self.state.cancel([key]))
        elif kind == "drain":
            self.carry_out(self.state.drain(connected=self.connected))
        elif kind == "expire" and self.state.draining:
            self.carry_out(self.state.drain_expired(30))
        elif kind == "lost":
            self.taken_back |= self.held()
            self.connected = False
            self.carry_out(self.state.master_lost())
        elif kind == "terminate":
            self.state.terminating = True
        elif kind == "measure":
            self.step = event[1]

    def settle(self) -> None:
        """Let every running batch finish; check nothing is left or lost."""
        for _ in range(10_000):
            if not self.running:
                break
            self.now += self.step
            self.finish(min(self.running))
        self.test.assertEqual(self.running, {})
        self.test.assertEqual((self.state.running, self.state.calls), (0, 0))
        self.test.assertEqual(self.state.running_in, {})
        if not self.state.drained:
            self.test.assertEqual(len(self.state.queue), 0)
        accounted = set(self.results) | self.cancelled | self.returned | self.taken_back
        self.test.assertEqual(self.arrived - accounted, set(), "jobs lost")


class PropertyTests(SynchronousTestCase):
    """Any sequence of arrivals, finishes, deaths, cancels, drains and losses."""

    @settings(max_examples=300, deadline=None)
    @given(events, st.integers(1, 3))
    def test_no_job_started_twice_or_lost(self, sequence, slots):
        model = Model(self, slots)
        for event in sequence:
            model.run(event)
        model.settle()
