"""
Tests for L{cw.core.scheduler}: the master's queue, slots and ownership rules.
"""

from __future__ import annotations

import tracemalloc

from twisted.trial.unittest import SynchronousTestCase

from cw.core.fairqueue import FairQueue
from cw.core.payload import kept_reference, reference
from cw.core.records import (
    Job,
    Outcome,
    Output,
    Result,
    Stream,
    decode_jobs,
    encode_jobs,
    encode_options,
    read_error_report,
)
from cw.core.scheduler import BATCH_SECONDS, LAG_HALF_LIFE, Scheduler, UnknownPeer, WorkerRecord


def make_jobs(first: int, last: int) -> list[Job]:
    """Jobs with sequence numbers C{first} to C{last} inclusive, as a client sends them."""
    return [Job(0, seq, b"payload %d" % seq) for seq in range(first, last + 1)]


def result_for(job: Job, payload: bytes = b"value") -> Result:
    """The successful result a worker reports for C{job}."""
    return Result(job.client, job.seq, Outcome.OK, payload)


def seqs(jobs) -> list[int]:
    return [job.seq for job in jobs]


def assigned(dispatched) -> dict[int, list[int]]:
    """C{dispatch()}'s answer as C{{worker: [seq, ...]}}."""
    return {worker: seqs(jobs) for worker, jobs in dispatched}


class ConstructionTests(SynchronousTestCase):
    """Arguments of L{Scheduler} and L{Scheduler.add_worker} are checked."""

    def test_negative_prefetch_rejected(self):
        self.assertRaises(ValueError, Scheduler, prefetch=-1)

    def test_zero_prefetch_allowed(self):
        scheduler = Scheduler(prefetch=0)
        worker = scheduler.add_worker(2)
        self.assertEqual(scheduler.worker(worker).capacity, 2)

    def test_worker_without_slots_rejected(self):
        scheduler = Scheduler()
        self.assertRaises(ValueError, scheduler.add_worker, 0)
        self.assertRaises(ValueError, scheduler.add_worker, -3)
        self.assertEqual(scheduler.workers(), [])

    def test_capacity_is_slots_plus_prefetch_per_slot(self):
        scheduler = Scheduler(prefetch=2)
        worker = scheduler.worker(scheduler.add_worker(3))
        self.assertIsInstance(worker, WorkerRecord)
        self.assertEqual((worker.slots, worker.prefetch, worker.capacity), (3, 6, 9))

    def test_ids_are_never_reused(self):
        scheduler = Scheduler()
        first_client = scheduler.add_client()
        scheduler.remove_client(first_client)
        second_client = scheduler.add_client()
        first_worker = scheduler.add_worker(1)
        scheduler.remove_worker(first_worker)
        second_worker = scheduler.add_worker(1)
        self.assertNotEqual(first_client, second_client)
        self.assertNotEqual(first_worker, second_worker)


class UnknownPeerTests(SynchronousTestCase):
    """Events naming a client or worker that is not registered raise L{UnknownPeer}."""

    def setUp(self):
        self.scheduler = Scheduler()

    def test_is_a_key_error(self):
        self.assertTrue(issubclass(UnknownPeer, KeyError))

    def test_submit_from_unknown_client(self):
        self.assertRaises(UnknownPeer, self.scheduler.submit, 7, make_jobs(1, 1))
        self.assertEqual(self.scheduler.queued, 0)

    def test_remove_unknown_client(self):
        self.assertRaises(UnknownPeer, self.scheduler.remove_client, 7)

    def test_remove_client_twice(self):
        client = self.scheduler.add_client()
        self.scheduler.remove_client(client)
        self.assertRaises(UnknownPeer, self.scheduler.remove_client, client)
        self.assertRaises(UnknownPeer, self.scheduler.client, client)

    def test_remove_unknown_worker(self):
        self.assertRaises(UnknownPeer, self.scheduler.remove_worker, 7)

    def test_remove_worker_twice(self):
        worker = self.scheduler.add_worker(1)
        self.scheduler.remove_worker(worker)
        self.assertRaises(UnknownPeer, self.scheduler.remove_worker, worker)
        self.assertRaises(UnknownPeer, self.scheduler.worker, worker)

    def test_results_from_unknown_worker(self):
        self.assertRaises(UnknownPeer, self.scheduler.complete, 7, [])

    def test_inspect_unknown(self):
        self.assertRaises(UnknownPeer, self.scheduler.client, 1)
        self.assertRaises(UnknownPeer, self.scheduler.worker, 1)


class StandInTests(SynchronousTestCase):
    """
    L{WorkerRecord.stand_in}: a held job keeps a reference in place of its
    bytes (the master lets go of a big argument once dispatched), counted
    as the same size.
    """

    def held_job(self, payload: bytes) -> tuple[Scheduler, int, Job]:
        scheduler = Scheduler()
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        scheduler.submit(client, [Job(0, 1, payload)])
        [(wid, [job])] = scheduler.dispatch()
        self.assertEqual(wid, worker)
        return scheduler, worker, job

    def test_bytes_replaced_size_kept(self):
        scheduler, wid, job = self.held_job(b"x" * 5000)
        record = scheduler.worker(wid)
        record.stand_in(job.key, kept_reference(5000))
        self.assertEqual(record.held[job.key].payload, kept_reference(5000))
        self.assertEqual(record.held_bytes, 5000)

    def test_reference_left_as_it_is(self):
        own = reference(7, 3, 11, 5000)
        scheduler, wid, job = self.held_job(own)
        scheduler.worker(wid).stand_in(job.key, kept_reference(5000))
        self.assertEqual(scheduler.worker(wid).held[job.key].payload, own)

    def test_job_not_held_ignored(self):
        scheduler, wid, job = self.held_job(b"x" * 10)
        scheduler.worker(wid).stand_in((job.client, job.seq + 1), kept_reference(10))
        self.assertEqual(scheduler.worker(wid).held[job.key].payload, b"x" * 10)

    def test_other_size_refused(self):
        scheduler, wid, job = self.held_job(b"x" * 10)
        with self.assertRaises(ValueError):
            scheduler.worker(wid).stand_in(job.key, kept_reference(11))
        self.assertEqual(scheduler.worker(wid).held[job.key].payload, b"x" * 10)


class SubmitTests(SynchronousTestCase):
    """L{Scheduler.submit} queues jobs and stamps them with their client."""

    def test_client_field_is_set(self):
        scheduler = Scheduler()
        scheduler.add_client()
        client = scheduler.add_client()
        jobs = make_jobs(1, 3)
        scheduler.submit(client, jobs)
        self.assertEqual([job.client for job in jobs], [client] * 3)

    def test_counters(self):
        scheduler = Scheduler()
        client = scheduler.add_client()
        scheduler.submit(client, make_jobs(1, 3))
        scheduler.submit(client, iter(make_jobs(4, 5)))
        self.assertEqual(scheduler.queued, 5)
        state = scheduler.client(client)
        self.assertEqual((state.queued, state.running, state.submitted, state.completed), (5, 0, 5, 0))

    def test_nothing_to_dispatch_without_workers(self):
        scheduler = Scheduler()
        client = scheduler.add_client()
        scheduler.submit(client, make_jobs(1, 3))
        self.assertEqual(scheduler.dispatch(), [])
        self.assertEqual(scheduler.queued, 3)

    def test_nothing_to_dispatch_without_jobs(self):
        scheduler = Scheduler()
        scheduler.add_client()
        scheduler.add_worker(4)
        self.assertEqual(scheduler.dispatch(), [])


class FIFOTests(SynchronousTestCase):
    """Jobs leave the queue in the order they were submitted."""

    def test_one_worker_takes_jobs_in_order(self):
        scheduler = Scheduler(prefetch=0)
        client = scheduler.add_client()
        worker = scheduler.add_worker(4)
        scheduler.submit(client, make_jobs(1, 10))
        self.assertEqual(assigned(scheduler.dispatch()), {worker: [1, 2, 3, 4]})
        scheduler.complete(worker, [Result(client, 2, Outcome.OK, b"")])
        self.assertEqual(assigned(scheduler.dispatch()), {worker: [5]})

    def test_earliest_jobs_leave_first_across_workers(self):
        scheduler = Scheduler(prefetch=0)
        client = scheduler.add_client()
        workers = [scheduler.add_worker(1) for _ in range(3)]
        scheduler.submit(client, make_jobs(1, 9))
        taken = sorted(seq for _, jobs in scheduler.dispatch() for seq in seqs(jobs))
        self.assertEqual(taken, [1, 2, 3])
        for worker in workers:
            scheduler.complete(worker, [result_for(job) for job in scheduler.worker(worker).held.values()])
        taken = sorted(seq for _, jobs in scheduler.dispatch() for seq in seqs(jobs))
        self.assertEqual(taken, [4, 5, 6])

    def test_clients_take_turns(self):
        """Free slots go round robin between clients, each client's jobs in order."""
        scheduler = Scheduler(prefetch=0)
        first = scheduler.add_client()
        second = scheduler.add_client()
        worker = scheduler.add_worker(4)
        scheduler.submit(first, make_jobs(1, 3))
        scheduler.submit(second, make_jobs(1, 2))
        scheduler.submit(first, make_jobs(4, 4))
        [(taker, jobs)] = scheduler.dispatch()
        self.assertEqual(taker, worker)
        self.assertEqual([job.key for job in jobs], [(first, 1), (second, 1), (first, 2), (second, 2)])


class SlotTests(SynchronousTestCase):
    """A worker holds at most C{slots + prefetch} jobs."""

    def test_slots_without_prefetch(self):
        scheduler = Scheduler(prefetch=0)
        client = scheduler.add_client()
        worker = scheduler.add_worker(2)
        scheduler.submit(client, make_jobs(1, 5))
        self.assertEqual(assigned(scheduler.dispatch()), {worker: [1, 2]})
        self.assertEqual(scheduler.dispatch(), [])
        self.assertEqual(scheduler.queued, 3)

    def test_prefetch_per_slot(self):
        scheduler = Scheduler(prefetch=1)
        client = scheduler.add_client()
        worker = scheduler.add_worker(2)
        scheduler.submit(client, make_jobs(1, 10))
        self.assertEqual(assigned(scheduler.dispatch()), {worker: [1, 2, 3, 4]})
        self.assertEqual(len(scheduler.worker(worker).held), 4)
        self.assertEqual(scheduler.queued, 6)

    def test_completion_frees_room(self):
        scheduler = Scheduler(prefetch=1)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 5))
        scheduler.dispatch()
        self.assertEqual(scheduler.dispatch(), [])
        scheduler.complete(worker, [Result(client, 1, Outcome.OK, b"")])
        self.assertEqual(assigned(scheduler.dispatch()), {worker: [3]})

    def test_held_jobs_in_assignment_order(self):
        scheduler = Scheduler(prefetch=2)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 3))
        scheduler.dispatch()
        self.assertEqual(seqs(scheduler.worker(worker).held.values()), [1, 2, 3])

    def test_one_entry_per_worker(self):
        scheduler = Scheduler(prefetch=3)
        client = scheduler.add_client()
        scheduler.add_worker(2)
        scheduler.add_worker(2)
        scheduler.submit(client, make_jobs(1, 20))
        workers = [worker for worker, _ in scheduler.dispatch()]
        self.assertEqual(sorted(workers), sorted(set(workers)))
        self.assertEqual(len(workers), 2)


class FreeSlotsFirstTests(SynchronousTestCase):
    """Free slots on any worker are filled before any worker is given prefetched jobs."""

    def test_short_queue_goes_to_slots(self):
        scheduler = Scheduler(prefetch=1)
        client = scheduler.add_client()
        first = scheduler.add_worker(1)
        second = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 2))
        self.assertEqual(assigned(scheduler.dispatch()), {first: [1], second: [2]})

    def test_slots_before_prefetch_in_one_dispatch(self):
        scheduler = Scheduler(prefetch=1)
        client = scheduler.add_client()
        big = scheduler.add_worker(3)
        small = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 4))
        result = assigned(scheduler.dispatch())
        self.assertEqual(len(result[big]), 3)
        self.assertEqual(len(result[small]), 1)

    def idle_worker_gets_job(self, extra_turns: int) -> None:
        """
        Worker A runs one job and has prefetch room, worker B is idle; the
        next job goes to B whichever worker's turn it is to be served first.
        """
        scheduler = Scheduler(prefetch=1)
        client = scheduler.add_client()
        a = scheduler.add_worker(1)
        b = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 4))
        self.assertEqual(assigned(scheduler.dispatch()), {a: [1, 3], b: [2, 4]})
        scheduler.submit(client, make_jobs(5, 5))
        for _ in range(extra_turns):
            # Everyone is full: nothing moves, but the turn passes.
            self.assertEqual(scheduler.dispatch(), [])
        scheduler.complete(a, [Result(client, 1, Outcome.OK, b"")])
        scheduler.complete(b, [Result(client, 2, Outcome.OK, b""), Result(client, 4, Outcome.OK, b"")])
        self.assertEqual(assigned(scheduler.dispatch()), {b: [5]})

    def test_idle_worker_not_starved_by_prefetch(self):
        self.idle_worker_gets_job(extra_turns=0)

    def test_idle_worker_not_starved_by_prefetch_other_turn(self):
        self.idle_worker_gets_job(extra_turns=1)

    def test_idle_newcomer_gets_job_before_prefetch(self):
        scheduler = Scheduler(prefetch=5)
        client = scheduler.add_client()
        busy = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 1))
        scheduler.dispatch()
        newcomer = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(2, 2))
        self.assertEqual(assigned(scheduler.dispatch()), {newcomer: [2]})
        self.assertEqual(seqs(scheduler.worker(busy).held.values()), [1])


class SpreadTests(SynchronousTestCase):
    """Workers take turns, so load spreads evenly."""

    def test_short_queue_spread_over_free_workers(self):
        scheduler = Scheduler(prefetch=0)
        client = scheduler.add_client()
        workers = [scheduler.add_worker(4) for _ in range(3)]
        scheduler.submit(client, make_jobs(1, 3))
        result = assigned(scheduler.dispatch())
        self.assertEqual(sorted(result), workers)
        self.assertEqual([len(jobs) for jobs in result.values()], [1, 1, 1])

    def test_single_jobs_rotate_between_idle_workers(self):
        scheduler = Scheduler(prefetch=0)
        client = scheduler.add_client()
        workers = [scheduler.add_worker(2) for _ in range(3)]
        used = []
        for seq in range(1, 4):
            scheduler.submit(client, make_jobs(seq, seq))
            [(worker, jobs)] = scheduler.dispatch()
            used.append(worker)
            scheduler.complete(worker, [result_for(job) for job in jobs])
        self.assertEqual(sorted(used), workers)

    def test_equal_workers_get_equal_shares(self):
        scheduler = Scheduler(prefetch=1)
        client = scheduler.add_client()
        scheduler.add_worker(2)
        scheduler.add_worker(2)
        scheduler.submit(client, make_jobs(1, 6))
        self.assertEqual(sorted(len(jobs) for _, jobs in scheduler.dispatch()), [3, 3])


class WorkerLossTests(SynchronousTestCase):
    """Jobs held by a departed worker go back to the front of the queue."""

    def test_held_jobs_requeued_in_front_in_order(self):
        scheduler = Scheduler(prefetch=1)
        client = scheduler.add_client()
        lost = scheduler.add_worker(2)
        scheduler.submit(client, make_jobs(1, 6))
        self.assertEqual(assigned(scheduler.dispatch()), {lost: [1, 2, 3, 4]})
        self.assertEqual(seqs(scheduler.remove_worker(lost)), [1, 2, 3, 4])
        self.assertEqual(scheduler.queued, 6)
        replacement = scheduler.add_worker(6)
        self.assertEqual(assigned(scheduler.dispatch()), {replacement: [1, 2, 3, 4, 5, 6]})

    def test_requeued_jobs_go_before_later_submissions(self):
        scheduler = Scheduler(prefetch=0)
        client = scheduler.add_client()
        lost = scheduler.add_worker(2)
        scheduler.submit(client, make_jobs(1, 2))
        scheduler.dispatch()
        scheduler.submit(client, make_jobs(3, 4))
        scheduler.remove_worker(lost)
        replacement = scheduler.add_worker(1)
        self.assertEqual(assigned(scheduler.dispatch()), {replacement: [1]})

    def test_completed_jobs_not_requeued(self):
        scheduler = Scheduler(prefetch=1)
        client = scheduler.add_client()
        lost = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 2))
        scheduler.dispatch()
        scheduler.complete(lost, [Result(client, 1, Outcome.OK, b"")])
        self.assertEqual(seqs(scheduler.remove_worker(lost)), [2])
        self.assertEqual(scheduler.queued, 1)

    def test_counters_after_requeue(self):
        scheduler = Scheduler(prefetch=1)
        client = scheduler.add_client()
        lost = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 3))
        scheduler.dispatch()
        self.assertEqual((scheduler.client(client).queued, scheduler.client(client).running), (1, 2))
        scheduler.remove_worker(lost)
        self.assertEqual((scheduler.client(client).queued, scheduler.client(client).running), (3, 0))
        self.assertEqual(scheduler.workers(), [])

    def test_jobs_of_departed_clients_dropped(self):
        scheduler = Scheduler(prefetch=0)
        gone = scheduler.add_client()
        stays = scheduler.add_client()
        lost = scheduler.add_worker(2)
        scheduler.submit(gone, make_jobs(1, 1))
        scheduler.submit(stays, make_jobs(1, 1))
        scheduler.dispatch()
        scheduler.remove_client(gone)
        back = scheduler.remove_worker(lost)
        self.assertEqual([job.key for job in back], [(stays, 1)])
        self.assertEqual(scheduler.queued, 1)

    def test_requeued_job_result_delivered_once(self):
        scheduler = Scheduler(prefetch=0)
        client = scheduler.add_client()
        lost = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 1))
        [(_, [job])] = scheduler.dispatch()
        scheduler.remove_worker(lost)
        replacement = scheduler.add_worker(1)
        self.assertEqual(assigned(scheduler.dispatch()), {replacement: [1]})
        # The departed worker can no longer report anything.
        self.assertRaises(UnknownPeer, scheduler.complete, lost, [result_for(job)])
        self.assertEqual(scheduler.complete(replacement, [result_for(job)]), [result_for(job)])
        self.assertEqual(scheduler.complete(replacement, [result_for(job)]), [])
        self.assertEqual(scheduler.client(client).completed, 1)


class PoisonJobTests(SynchronousTestCase):
    """A job running on C{max_attempts} lost workers fails instead of being requeued."""

    def lose_running(self, scheduler, client, times, how="killed"):
        """Run job 1 on a fresh one-slot worker C{times} times, losing it each time."""
        outcomes = []
        for n in range(times):
            worker = scheduler.add_worker(1, name=f"host{n}:{100 + n}")
            self.assertEqual(seqs(scheduler.dispatch()[0][1])[0], 1)
            outcomes.append(scheduler.lose_worker(worker, how))
        return outcomes

    def test_max_attempts_validated(self):
        self.assertRaises(ValueError, Scheduler, max_attempts=0)

    def test_fails_after_max_attempts(self):
        scheduler = Scheduler(prefetch=0, max_attempts=3)
        client = scheduler.add_client()
        scheduler.submit(client, make_jobs(1, 1))
        outcomes = self.lose_running(scheduler, client, 3, how="connection lost")
        self.assertEqual([(seqs(back), failed) for back, failed in outcomes[:2]], [([1], [])] * 2)
        back, [failure] = outcomes[2]
        self.assertEqual(back, [])
        self.assertEqual((failure.client, failure.seq, failure.status), (client, 1, Outcome.CRASHED))
        report = read_error_report(failure.payload)
        self.assertEqual(report["type"], "WorkerLost")
        self.assertEqual(report["hosts"], ["host0:100", "host1:101", "host2:102"])
        self.assertEqual(report["attempts"], 3)
        self.assertIn("host2:102 (connection lost)", report["message"])
        self.assertIn("max_attempts=3", report["message"])
        self.assertEqual(scheduler.queued, 0)
        state = scheduler.client(client)
        self.assertEqual((state.queued, state.running, state.completed), (0, 0, 1))

    def test_lost_jobs_report_and_counts(self):
        """
        Two jobs lost twice on a two-slot worker both fail: each report names
        the last host and every loss in order, and both count as completed
        for the client and the scheduler.
        """
        scheduler = Scheduler(prefetch=0, max_attempts=2)
        client = scheduler.add_client()
        scheduler.submit(client, make_jobs(1, 2))
        for n in range(2):
            worker = scheduler.add_worker(2, name=f"host{n}:{100 + n}")
            self.assertEqual(seqs(scheduler.dispatch()[0][1]), [1, 2])
            back, failed = scheduler.lose_worker(worker, "killed")
        self.assertEqual((back, [r.seq for r in failed]), ([], [1, 2]))
        for result in failed:
            report = read_error_report(result.payload)
            self.assertEqual(report["host"], "host1:101")
            self.assertEqual(report["hosts"], ["host0:100", "host1:101"])
            self.assertTrue(report["message"].endswith(": host0:100 (killed); host1:101 (killed)"), report)
        self.assertEqual(scheduler.client(client).completed, 2)
        self.assertEqual(scheduler.completed, 2)

    def test_job_option_overrides_scheduler(self):
        scheduler = Scheduler(prefetch=0, max_attempts=3)
        client = scheduler.add_client()
        scheduler.submit(client, [Job(0, 1, b"p", encode_options(max_attempts=1))])
        [(back, [failure])] = self.lose_running(scheduler, client, 1)
        self.assertEqual(read_error_report(failure.payload)["attempts"], 1)

    def test_bad_job_option_ignored(self):
        scheduler = Scheduler(prefetch=0, max_attempts=2)
        client = scheduler.add_client()
        scheduler.submit(client, [Job(0, 1, b"p", b'{"max_attempts": "x"}')])
        outcomes = self.lose_running(scheduler, client, 2)
        self.assertEqual(len(outcomes[0][1]), 0)
        self.assertEqual(len(outcomes[1][1]), 1)

    def test_prefetched_jobs_do_not_count(self):
        scheduler = Scheduler(prefetch=2, max_attempts=1)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1, name="h")
        scheduler.submit(client, make_jobs(1, 3))
        scheduler.dispatch()
        back, failed = scheduler.lose_worker(worker)
        self.assertEqual(seqs(back), [2, 3])
        self.assertEqual([r.seq for r in failed], [1])

    def test_oldest_held_jobs_are_the_running_ones(self):
        scheduler = Scheduler(prefetch=1, max_attempts=1)
        client = scheduler.add_client()
        worker = scheduler.add_worker(2)
        scheduler.submit(client, make_jobs(1, 4))
        scheduler.dispatch()
        scheduler.complete(worker, [Result(client, 1, Outcome.OK, b"")])
        back, failed = scheduler.lose_worker(worker)
        self.assertEqual([r.seq for r in failed], [2, 3])
        self.assertEqual(seqs(back), [4])

    def test_success_clears_the_count(self):
        scheduler = Scheduler(prefetch=0, max_attempts=2)
        client = scheduler.add_client()
        scheduler.submit(client, make_jobs(1, 1))
        self.lose_running(scheduler, client, 1)
        worker = scheduler.add_worker(1)
        [(_, [job])] = scheduler.dispatch()
        self.assertEqual(len(scheduler.complete(worker, [result_for(job)])), 1)
        self.assertEqual(scheduler._losses, {})

    def test_departed_client_forgotten(self):
        scheduler = Scheduler(prefetch=0, max_attempts=3)
        client = scheduler.add_client()
        scheduler.submit(client, make_jobs(1, 1))
        self.lose_running(scheduler, client, 1)
        scheduler.remove_client(client)
        self.assertEqual(scheduler._losses, {})

    def test_remove_worker_still_returns_requeued(self):
        scheduler = Scheduler(prefetch=0, max_attempts=1)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 1))
        scheduler.dispatch()
        self.assertEqual(scheduler.remove_worker(worker), [])


class DuplicateSeqTests(SynchronousTestCase):
    """
    A client's job whose seq is that of one of its jobs still queued or
    running is refused with a DuplicateJob result; the first job runs on.
    Once a job has ended, or after a reconnect (a new client), its seq may
    come again.
    """

    def setUp(self):
        self.s = Scheduler(prefetch=0)
        self.client = self.s.add_client()

    def assert_refused(self, results, *expected: int) -> None:
        self.assertEqual([r.seq for r in results], list(expected))
        for result in results:
            self.assertEqual((result.client, result.status), (self.client, Outcome.FAILED))
            report = read_error_report(result.payload)
            self.assertEqual(report["type"], "DuplicateJob")
            self.assertIn(f"job {result.seq} ", report["message"])

    def test_queued_duplicate_refused(self):
        self.assertEqual(self.s.submit(self.client, make_jobs(1, 2)), [])
        self.assert_refused(self.s.submit(self.client, make_jobs(2, 3)), 2)
        self.assertEqual(self.s.queued, 3)
        self.assertEqual(self.s.client(self.client).submitted, 3)

    def test_duplicate_in_one_batch_refused(self):
        self.assert_refused(self.s.submit(self.client, make_jobs(1, 2) + make_jobs(1, 1)), 1)
        self.assertEqual(self.s.queued, 2)

    def test_running_duplicate_refused(self):
        """A held job's seq is taken too; its worker's slots are not counted twice."""
        worker = self.s.add_worker(2)
        self.s.submit(self.client, make_jobs(1, 1))
        self.s.dispatch()
        self.assert_refused(self.s.submit(self.client, make_jobs(1, 1)), 1)
        self.assertEqual(self.s.dispatch(), [])
        self.assertEqual(len(self.s.worker(worker).held), 1)

    def test_refused_use_room(self):
        """Refused duplicates used the client's room, as other refused jobs do."""
        self.s.submit(self.client, make_jobs(1, 1))
        before = self.s.client(self.client).received_jobs
        self.s.submit(self.client, make_jobs(1, 1))
        self.assertEqual(self.s.client(self.client).received_jobs, before + 1)

    def test_seq_free_again_after_result(self):
        worker = self.s.add_worker(1)
        self.s.submit(self.client, make_jobs(1, 1))
        [(_, [job])] = self.s.dispatch()
        self.s.complete(worker, [result_for(job)])
        self.assertEqual(self.s.submit(self.client, make_jobs(1, 1)), [])
        self.assertEqual(self.s.queued, 1)

    def test_seq_free_again_after_cancel(self):
        self.s.add_worker(1)
        self.s.submit(self.client, make_jobs(1, 3))
        self.s.dispatch()
        self.s.cancel(self.client, [1, 2])
        self.assertEqual(self.s.submit(self.client, make_jobs(1, 2)), [])
        self.s.cancel(self.client)
        self.assertEqual(self.s.submit(self.client, make_jobs(1, 3)), [])

    def test_seq_free_again_after_failure(self):
        """A job failed by the scheduler (its worker lost too often) frees its seq."""
        s = Scheduler(prefetch=0, max_attempts=1)
        client = s.add_client()
        worker = s.add_worker(1)
        s.submit(client, make_jobs(1, 1))
        s.dispatch()
        _, failed = s.lose_worker(worker)
        self.assertEqual([r.seq for r in failed], [1])
        self.assertEqual(s.submit(client, make_jobs(1, 1)), [])

    def test_requeued_job_keeps_its_seq(self):
        """A job requeued from a lost worker is still live: its seq is still taken."""
        worker = self.s.add_worker(1)
        self.s.submit(self.client, make_jobs(1, 1))
        self.s.dispatch()
        self.s.lose_worker(worker)
        self.assert_refused(self.s.submit(self.client, make_jobs(1, 1)), 1)

    def test_reconnected_client_resubmits(self):
        """A reconnecting client is a new client: its old seqs are not duplicates."""
        self.s.submit(self.client, make_jobs(1, 3))
        self.s.remove_client(self.client)
        again = self.s.add_client()
        self.assertEqual(self.s.submit(again, make_jobs(1, 3)), [])


class DispatchCostTests(SynchronousTestCase):
    """
    What a dispatch costs (L{Scheduler.visits}: workers looked at) does not
    grow with the workers that have no job to take: a lone job among 2,000
    idle workers, or a stream of jobs through 2,000 busy ones, costs what it
    costs with 2 workers.
    """

    def visits_per_job(self, workers: int, jobs: int, queued: int) -> float:
        """
        Per job, the visits of a steady stream: C{queued} jobs queued at
        first, then each result brings one more job, dispatched with the
        time (so rates are measured).
        """
        scheduler = Scheduler(max_queued_jobs=10 * (jobs + queued))
        for _ in range(workers):
            scheduler.add_worker(1)
        client = scheduler.add_client()
        scheduler.submit(client, make_jobs(1, queued))
        now = 0.0
        held = {}
        for wid, batch in scheduler.dispatch(now):
            held.setdefault(wid, []).extend(batch)
        before = scheduler.visits
        seq = queued
        for _ in range(jobs):
            now += 0.001
            wid = next(iter(held))
            job = held[wid].pop(0)
            if not held[wid]:
                del held[wid]
            scheduler.complete(wid, [result_for(job)], now)
            seq += 1
            scheduler.submit(client, make_jobs(seq, seq))
            for w, batch in scheduler.dispatch(now):
                held.setdefault(w, []).extend(batch)
        return (scheduler.visits - before) / jobs

    def test_lone_jobs_among_idle_workers(self):
        """One job at a time: one worker looked at, with 2 workers or 2,000."""
        few = self.visits_per_job(2, 2_000, 1)
        many = self.visits_per_job(2_000, 2_000, 1)
        self.assertLessEqual(few, 2)
        self.assertLessEqual(many, few + 0.01)

    def test_stream_through_busy_workers(self):
        """A queue longer than the workers' room: each job costs a few visits, whatever their number."""
        few = self.visits_per_job(2, 5_000, 10_000)
        many = self.visits_per_job(2_000, 5_000, 10_000)
        self.assertLessEqual(few, 4)
        self.assertLessEqual(many, 4)

    def test_first_dispatch_stops_with_the_queue(self):
        """Ten jobs, 2,000 idle workers: ten workers looked at, each given one job."""
        scheduler = Scheduler()
        for _ in range(2_000):
            scheduler.add_worker(1)
        client = scheduler.add_client()
        scheduler.submit(client, make_jobs(1, 10))
        dispatched = scheduler.dispatch(0.0)
        self.assertEqual(sorted(len(jobs) for _, jobs in dispatched), [1] * 10)
        self.assertLessEqual(scheduler.visits, 11)


class BurstAfterShortJobsTests(SynchronousTestCase):
    """
    A worker that has just raced through short jobs does not take a new
    burst for itself: the next jobs may be slower, so they are spread over
    the idle workers and the rest stay queued (where C{shutdown(
    cancel_futures=True)} can still cancel them: CPython's
    C{test_cancel_futures} on a cluster whose workers ran tiny jobs before).
    """

    def test_burst_spread_after_short_jobs(self):
        for gap in (0.0, 0.05, 0.5):
            scheduler = Scheduler(prefetch=1)
            client = scheduler.add_client()
            quick = scheduler.add_worker(1)
            scheduler.submit(client, make_jobs(1001, 1002))
            [(_, jobs)] = scheduler.dispatch(1.0)
            # Both answered in one report, a millisecond after they left.
            scheduler.complete(quick, [result_for(job) for job in jobs], 1.001)
            other = scheduler.add_worker(1)
            scheduler.submit(client, make_jobs(1, 50))
            result = assigned(scheduler.dispatch(1.001 + gap))
            self.assertEqual(sorted(result), [quick, other], gap)
            self.assertLessEqual(len(result[quick]), 4, gap)
            self.assertGreaterEqual(scheduler.queued, 40, gap)


def kind_jobs(first: int, last: int, func: bytes = b"f") -> list[Job]:
    """L{make_jobs} of one cached function C{func} (one kind)."""
    return [Job(0, seq, b"payload %d" % seq, b"", func) for seq in range(first, last + 1)]


def stream(workers: int, warm: int, jobs: int, arrive: int, hop: float = 0.001, lag: float = 0.0):
    """
    C{warm} jobs of one kind queued at once, then C{jobs} more arriving
    C{arrive} at a time (as a client's boxes do, each dispatched before the
    next), through C{workers} one-slot workers that answer each box in one
    report C{hop} seconds after it was sent (tiny jobs, as
    C{bench/fake_workers.py} answers them).  C{lag}: the master notes its
    timers running that late before each dispatch (L{Scheduler.note_lag}).
    Return the scheduler and the sizes of the boxes (C{dispatch} entries)
    that the C{jobs} took.
    """
    scheduler = Scheduler(max_queued_jobs=10 * (jobs + warm))
    for _ in range(workers):
        scheduler.add_worker(1)
    client = scheduler.add_client()
    due: list[tuple[float, int, int, list[Job]]] = []
    now, order = 0.0, 0
    sizes: list[int] = []
    for first, last, step in ((1, warm, warm), (warm + 1, warm + jobs, arrive)):
        sizes = []
        seq = first
        while True:
            if seq <= last:
                scheduler.submit(client, kind_jobs(seq, min(last, seq + step - 1)))
                seq += step
            if lag:
                scheduler.note_lag(lag, now)
            for wid, batch in scheduler.dispatch(now):
                sizes.append(len(batch))
                due.append((now + hop, order, wid, batch))
                order += 1
            if not due:
                break
            due.sort()
            now = due[0][0]
            while due and due[0][0] <= now:
                _, _, wid, batch = due.pop(0)
                scheduler.complete(wid, [result_for(job) for job in batch], now)
    return scheduler, sizes


class ShortJobPackingTests(SynchronousTestCase):
    """
    Jobs of a kind (a client's cached function) known to be short travel
    many to a box however many workers are idle; any other job is spread
    one per free slot, and what made a kind known expires.
    """

    def known(self, idle: int = 2, func: bytes = b"f"):
        """
        A scheduler (horizon 0.05 s), a client, a worker that reported two
        jobs of C{func} at once (batched: more than its one slot) a
        millisecond after it got them, C{idle} idle workers, and the time.
        """
        scheduler = Scheduler(prefetch=1, horizon=0.05)
        client = scheduler.add_client()
        quick = scheduler.add_worker(1)
        scheduler.submit(client, kind_jobs(1001, 1002, func))
        [(_, jobs)] = scheduler.dispatch(1.0)
        scheduler.complete(quick, [result_for(job) for job in jobs], 1.001)
        return scheduler, client, quick, [scheduler.add_worker(1) for _ in range(idle)], 1.001

    def test_boxes_with_many_workers_as_with_two(self):
        """
        20,000 tiny jobs arriving 300 at a time through 2,000 idle workers
        travel in boxes as large as through 2 (after jobs of their kind were
        seen batched): not one job per connection.  So they do when each
        box takes half a second to come back (a master slowed down by its
        connections: the round trip says nothing of the jobs' time).
        """
        for hop in (0.001, 0.5):
            _, few = stream(2, 5_000, 20_000, 300, hop)
            _, many = stream(2_000, 5_000, 20_000, 300, hop)
            self.assertEqual(sum(many), 20_000)
            self.assertLessEqual(len(few), 200, hop)
            self.assertLessEqual(len(many), 200, hop)

    def test_boxes_with_many_workers_on_a_lagging_master(self):
        """
        200 jobs of a kind spread over 2,000 idle workers (one to a box: it
        is never seen batched), then 20,000 more arriving 300 at a time,
        with round trips of half a second: on a master whose timers run a
        quarter of a second late (L{Scheduler.note_lag}: the round trips
        are its own lag), they are probed two to a slot, found short and
        packed, in boxes about as few as through 2 workers, and each job
        costs a fraction of a visit to a worker (L{Scheduler.visits}).
        Without the lag such round trips could be the jobs' own time: one
        to a box.
        """
        _, few = stream(2, 200, 20_000, 300, 0.5, lag=0.25)
        scheduler, many = stream(2_000, 200, 20_000, 300, 0.5, lag=0.25)
        self.assertEqual(sum(many), 20_000)
        self.assertLessEqual(len(few), 200)
        self.assertLessEqual(len(many), 400)
        self.assertLessEqual(scheduler.visits, 0.1 * 20_200)
        _, unknown = stream(2_000, 200, 2_000, 300, 0.5)
        self.assertEqual(unknown, [1] * 2_000)

    def test_lone_result_of_an_earlier_box_keeps_kind(self):
        """
        A worker gets a job of a known short kind alone, then a box of
        more, and reports the first alone while it holds the others: it
        came from the earlier box, which says nothing of the jobs' time
        when it comes back within a batch's time (or what the master's lag
        explains).  Later, it says they ran one by one: the kind is unknown
        again (probed two to a slot while its round trips are short, one
        once they are long), not known short as before a quiet spell.
        """
        self.assertLess(0.001, BATCH_SECONDS)
        for later, lag, packed in ((0.001, 0.0, 100), (0.1, 0.0, 2), (0.1, 0.05, 100), (1.0, 0.0, 1)):
            scheduler = Scheduler(prefetch=1, horizon=0.05)
            client = scheduler.add_client()
            worker = scheduler.add_worker(2)
            scheduler.submit(client, kind_jobs(1001, 1004))
            [(_, jobs)] = scheduler.dispatch(1.0)
            scheduler.complete(worker, [result_for(job) for job in jobs], 1.001)
            scheduler.submit(client, kind_jobs(1, 1))
            self.assertEqual(assigned(scheduler.dispatch(1.001)), {worker: [1]})
            scheduler.submit(client, kind_jobs(2, 10))
            self.assertEqual(assigned(scheduler.dispatch(1.001)), {worker: list(range(2, 11))})
            if lag:
                scheduler.note_lag(lag, 1.001)
            scheduler.complete(worker, [result_for(Job(client, 1, b""))], 1.001 + later)
            pack = scheduler.pack_size(Job(client, 20, b"", b"", b"f"), 1.001 + later)
            self.assertEqual(pack, packed, (later, lag))

    def test_lag_largest_lately_halves(self):
        """The master's lag: the largest noted lately, halving every L{LAG_HALF_LIFE} seconds."""
        scheduler = Scheduler()
        self.assertEqual(scheduler.lag(5.0), 0.0)
        scheduler.note_lag(0.2, 10.0)
        scheduler.note_lag(0.05, 10.5)
        self.assertAlmostEqual(scheduler.lag(10.0 + LAG_HALF_LIFE), 0.1)
        scheduler.note_lag(0.3, 12.0)
        self.assertAlmostEqual(scheduler.lag(12.0), 0.3)

    def test_known_short_kind_packed(self):
        """A burst of a known short kind: one box of horizon's worth, however many workers idle."""
        scheduler, client, quick, idle, now = self.known()
        per_job = scheduler._kinds[(client, b"f")].per_job
        self.assertLessEqual(per_job, 0.001 / 2)
        scheduler.submit(client, kind_jobs(1, 300))
        result = assigned(scheduler.dispatch(now))
        self.assertEqual(scheduler.pack_size(Job(client, 1, b"", b"", b"f"), now), 100)
        self.assertEqual(result[quick], list(range(1, 101)))
        self.assertEqual(len(result), 3)

    def test_burst_of_another_kind_spread(self):
        """
        After short jobs of one function, a burst of another is spread one
        per free slot (then the usual prefetch) and the rest stays queued:
        CPython's C{test_cancel_futures} after tiny jobs.
        """
        for func in (b"g", b""):
            scheduler, client, quick, idle, now = self.known(1)
            scheduler.submit(client, kind_jobs(1, 50, func))
            result = assigned(scheduler.dispatch(now))
            self.assertEqual(sorted(result), [quick, *idle], func)
            self.assertLessEqual(len(result[quick]), 2, func)
            self.assertGreaterEqual(scheduler.queued, 46, func)

    def test_known_kind_expires_after_quiet_spell(self):
        from cw.core.scheduler import KIND_MEMORY

        scheduler, client, quick, idle, now = self.known(1)
        scheduler.submit(client, kind_jobs(1, 50))
        result = assigned(scheduler.dispatch(now + KIND_MEMORY + 0.01))
        self.assertEqual(sorted(len(jobs) for jobs in result.values()), [2, 2])
        self.assertEqual(scheduler.queued, 46)

    def test_kind_short_before_quiet_spell_probed_despite_long_round_trips(self):
        """
        A kind reported batched (two jobs in 20 ms: short) whose round
        trips took half a second (a busy master), quiet for longer than
        L{KIND_MEMORY}: its next burst goes two per slot (probes, from
        which it is known again), not one per idle worker.  A kind never
        known short, with such round trips, still goes one per worker.
        """
        from cw.core.scheduler import KIND_MEMORY

        later = 1.5 + KIND_MEMORY + 0.01

        def burst_after_quiet_spell(first_jobs: int) -> list[int]:
            """First C{first_jobs} jobs of the kind on one worker, their
            results 0.5 s later; then 4 more workers and, after the quiet
            spell, 5 jobs: the sizes of the boxes they go in."""
            scheduler = Scheduler(prefetch=1, horizon=0.05)
            client = scheduler.add_client()
            first = scheduler.add_worker(1)
            scheduler.submit(client, kind_jobs(1, first_jobs))
            [(_, jobs)] = scheduler.dispatch(1.0)
            scheduler.complete(first, [result_for(job) for job in jobs], 1.5)
            for _ in range(4):
                scheduler.add_worker(1)
            scheduler.submit(client, kind_jobs(first_jobs + 1, first_jobs + 5))
            return sorted(len(jobs) for _, jobs in scheduler.dispatch(later))

        self.assertEqual(burst_after_quiet_spell(2), [1, 2, 2])
        # A kind only ever run one at a time, as slowly: one per worker.
        self.assertEqual(burst_after_quiet_spell(1), [1] * 5)

    def test_kind_run_one_by_one_unknown_again(self):
        """
        A worker holding more jobs of a known kind than its slots reports
        one alone: they turned long (the worker no longer batches them), so
        the next ones are spread.
        """
        scheduler, client, quick, [other], now = self.known(1)
        scheduler.submit(client, kind_jobs(1, 100))
        held = assigned(scheduler.dispatch(now))[quick]
        self.assertEqual(len(held), 100)
        scheduler.complete(quick, [result_for(Job(client, held[0], b""))], now + 0.1)
        scheduler.submit(client, kind_jobs(101, 150))
        result = assigned(scheduler.dispatch(now + 0.1))
        self.assertEqual(result, {other: [101, 102]})

    def test_kind_batched_again_known_as_before(self):
        """
        A kind run one by one (unknown again), then reported batched once
        more: its earlier reports count (decayed), so its boxes are about
        as large at once as before, not probed up again from five.
        """
        scheduler, client, quick, [], now = self.known(0)
        scheduler.submit(client, kind_jobs(1, 400))
        [(_, first)] = scheduler.dispatch(now)
        self.assertEqual(len(first), 100)
        now += 0.01
        scheduler.complete(quick, [result_for(job) for job in first], now)
        [(_, second)] = scheduler.dispatch(now)
        self.assertEqual(len(second), 256)
        scheduler.complete(quick, [result_for(second[0])], now + 0.1)  # alone: unknown again
        self.assertLessEqual(scheduler.pack_size(second[1], now + 0.1), 2)
        scheduler.complete(quick, [result_for(job) for job in second[1:3]], now + 0.2)  # batched
        self.assertGreaterEqual(scheduler.pack_size(second[3], now + 0.2), 100)

    def test_pack_holds_horizon_of_work(self):
        """Jobs that a worker batches two at a time in 20 ms: 10 ms each, 5 per box in 50 ms."""
        scheduler = Scheduler(prefetch=1, horizon=0.05)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        scheduler.submit(client, kind_jobs(1, 2))
        [(_, jobs)] = scheduler.dispatch(1.0)
        scheduler.complete(worker, [result_for(job) for job in jobs], 1.5)
        scheduler.submit(client, kind_jobs(3, 50))
        self.assertEqual(assigned(scheduler.dispatch(1.5)), {worker: list(range(3, 8))})

    def test_other_clients_keep_their_turns(self):
        """A pack takes only its client's jobs of its kind: another client's job goes to the next worker."""
        scheduler, client, quick, [other], now = self.known(1)
        second = scheduler.add_client()
        scheduler.submit(client, kind_jobs(1, 10))
        scheduler.submit(second, [Job(0, 1, b"x")])
        result = dict(scheduler.dispatch(now))
        self.assertEqual(seqs(result[quick]), list(range(1, 11)))
        self.assertEqual([(job.client, job.seq) for job in result[other]], [(second, 1)])

    def measured(self, seconds: float):
        """
        A scheduler, a client, and four idle one-slot workers, one of which
        ran one job of C{b"f"} alone, for C{seconds} (not batched: its kind
        is not known short); and the time.
        """
        scheduler = Scheduler(prefetch=1, horizon=0.05)
        client = scheduler.add_client()
        workers = [scheduler.add_worker(1) for _ in range(4)]
        scheduler.submit(client, kind_jobs(1001, 1001))
        [(worker, jobs)] = scheduler.dispatch(1.0)
        scheduler.complete(worker, [result_for(job) for job in jobs], 1.0 + seconds)
        return scheduler, client, workers, 1.0 + seconds

    def test_probe_of_quick_kind(self):
        """
        Jobs of a kind that came back quickly (but one at a time) go two per
        slot, so that a worker can report them batched, even while workers
        are idle; jobs of a kind that took longer than the horizon
        (C{--prefetch-seconds}), one per worker: four such jobs on four
        idle workers all start at once, however often they are mapped.
        """
        scheduler, client, workers, now = self.measured(0.001)
        scheduler.submit(client, kind_jobs(1, 4))
        self.assertEqual(sorted(len(jobs) for _, jobs in scheduler.dispatch(now)), [2, 2])
        scheduler, client, workers, now = self.measured(0.06)
        scheduler.submit(client, kind_jobs(1, 4))
        self.assertEqual(sorted(len(jobs) for _, jobs in scheduler.dispatch(now)), [1, 1, 1, 1])

    def test_probes_find_short_kinds_among_idle_workers(self):
        """
        With no burst that outgrows 2,000 idle workers (jobs arrive 300 at
        a time), probes find that the jobs are short: they soon travel
        many to a box.
        """
        _, sizes = stream(2_000, 0, 50_000, 300)
        self.assertLessEqual(len(sizes), 1_000)

    def test_not_while_sized_jobs_wait(self):
        """No packing while a sized job is queued: a worker's slots may be wanted for it."""
        scheduler, client, quick, [other], now = self.known(1)
        scheduler.submit(client, kind_jobs(1, 10))
        scheduler.submit(scheduler.add_client(), [Job(0, 1, b"x", encode_options(resources={"gpus": 1}))])
        self.assertEqual(sorted(len(jobs) for _, jobs in scheduler.dispatch(now)), [2, 2])

    def test_ten_thousand_workers(self):
        """10,000 workers: short jobs still travel many to a box."""
        scheduler, sizes = stream(10_000, 20_000, 50_000, 1_000)
        self.assertEqual(scheduler.completed, 70_000)
        self.assertLessEqual(len(sizes), 1_000)


class QueueMemoryTests(SynchronousTestCase):
    """
    A queued job costs the master little: measured with tracemalloc, jobs
    as the master decodes them from a client's batch (the arguments of one
    cached function: a 20-byte payload and its 16-byte function key),
    queued by L{Scheduler.submit}.
    """

    def test_bytes_per_queued_job(self):
        n = 50_000
        key = bytes(range(16))
        batch = encode_jobs(Job(0, seq, b"a" * 20, b"", key) for seq in range(1, n + 1))
        scheduler = Scheduler(max_queued_jobs=2 * n)
        client = scheduler.add_client()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            jobs = decode_jobs(batch)
            self.assertEqual(scheduler.submit(client, jobs), [])
            del jobs
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertEqual(scheduler.queued, n)
        # About 161 bytes today: the job record (72), its payload (53), its
        # seq (28), the queue's slot; the function key and options shared,
        # the live seqs a bit each.  Twice a function's pickle per job, or
        # a set of live seqs, would break it.
        self.assertLess(used / n, 190)


class ResultTests(SynchronousTestCase):
    """Each job's result is delivered at most once, and only by the worker holding the job."""

    def setUp(self):
        self.scheduler = Scheduler(prefetch=0)
        self.client = self.scheduler.add_client()
        self.holder = self.scheduler.add_worker(1)
        self.other = self.scheduler.add_worker(1)
        self.scheduler.submit(self.client, make_jobs(1, 2))
        self.held = {worker: jobs[0] for worker, jobs in self.scheduler.dispatch()}

    def test_result_delivered(self):
        job = self.held[self.holder]
        result = Result(self.client, job.seq, Outcome.RAISED, b"report")
        self.assertEqual(self.scheduler.complete(self.holder, [result]), [result])

    def test_duplicate_dropped(self):
        job = self.held[self.holder]
        self.assertEqual(len(self.scheduler.complete(self.holder, [result_for(job)])), 1)
        self.assertEqual(self.scheduler.complete(self.holder, [result_for(job)]), [])

    def test_duplicate_in_one_batch_dropped(self):
        job = self.held[self.holder]
        delivered = self.scheduler.complete(self.holder, [result_for(job, b"a"), result_for(job, b"b")])
        self.assertEqual(delivered, [result_for(job, b"a")])

    def test_result_from_worker_not_holding_the_job_dropped(self):
        job = self.held[self.holder]
        self.assertEqual(self.scheduler.complete(self.other, [result_for(job)]), [])
        self.assertIn(job.key, self.scheduler.worker(self.holder).held)
        self.assertIn(self.held[self.other].key, self.scheduler.worker(self.other).held)
        self.assertEqual(self.scheduler.complete(self.holder, [result_for(job)]), [result_for(job)])

    def test_result_for_unknown_job_dropped(self):
        stray = Result(self.client, 99, Outcome.OK, b"")
        self.assertEqual(self.scheduler.complete(self.holder, [stray]), [])
        self.assertEqual(self.scheduler.completed, 0)

    def test_counters(self):
        for worker, job in self.held.items():
            self.scheduler.complete(worker, [result_for(job)])
        state = self.scheduler.client(self.client)
        self.assertEqual((state.queued, state.running, state.submitted, state.completed), (0, 0, 2, 2))
        self.assertEqual(self.scheduler.worker(self.holder).completed, 1)
        self.assertEqual(self.scheduler.worker(self.other).completed, 1)
        self.assertEqual(self.scheduler.completed, 2)

    def test_same_seq_from_two_clients_kept_apart(self):
        scheduler = Scheduler(prefetch=0)
        first = scheduler.add_client()
        second = scheduler.add_client()
        worker = scheduler.add_worker(2)
        scheduler.submit(first, make_jobs(1, 1))
        scheduler.submit(second, make_jobs(1, 1))
        [(_, jobs)] = scheduler.dispatch()
        results = [Result(job.client, job.seq, Outcome.OK, b"%d" % job.client) for job in jobs]
        self.assertEqual(scheduler.complete(worker, results), results)
        self.assertEqual(scheduler.client(first).completed, 1)
        self.assertEqual(scheduler.client(second).completed, 1)


class ClientLossTests(SynchronousTestCase):
    """A departed client's queued jobs are dropped and its results discarded."""

    def setUp(self):
        self.scheduler = Scheduler(prefetch=0)
        self.gone = self.scheduler.add_client()
        self.stays = self.scheduler.add_client()
        self.worker = self.scheduler.add_worker(1)

    def test_queued_jobs_dropped(self):
        self.scheduler.submit(self.gone, make_jobs(1, 3))
        self.scheduler.submit(self.stays, make_jobs(1, 2))
        self.assertEqual(self.scheduler.remove_client(self.gone), 3)
        self.assertEqual(self.scheduler.queued, 2)
        [(_, jobs)] = self.scheduler.dispatch()
        self.assertEqual([job.key for job in jobs], [(self.stays, 1)])

    def test_nothing_queued(self):
        self.assertEqual(self.scheduler.remove_client(self.gone), 0)
        self.assertEqual([state.id for state in self.scheduler.clients()], [self.stays])

    def test_running_job_result_discarded_and_slot_freed(self):
        self.scheduler.submit(self.gone, make_jobs(1, 2))
        self.scheduler.submit(self.stays, make_jobs(1, 1))
        [(_, [running])] = self.scheduler.dispatch()
        self.assertEqual(running.client, self.gone)
        self.assertEqual(self.scheduler.remove_client(self.gone), 1)
        # The running job still occupies its slot until its result comes back.
        self.assertEqual(self.scheduler.dispatch(), [])
        self.assertEqual(self.scheduler.complete(self.worker, [result_for(running)]), [])
        self.assertEqual(self.scheduler.worker(self.worker).held, {})
        [(_, [job])] = self.scheduler.dispatch()
        self.assertEqual(job.key, (self.stays, 1))


class InspectionTests(SynchronousTestCase):
    """The scheduler lists its peers for status reports."""

    def test_lists(self):
        scheduler = Scheduler()
        clients = [scheduler.add_client(), scheduler.add_client()]
        workers = [scheduler.add_worker(1), scheduler.add_worker(3)]
        self.assertEqual([state.id for state in scheduler.clients()], clients)
        self.assertEqual(
            [(state.id, state.slots) for state in scheduler.workers()], [(workers[0], 1), (workers[1], 3)]
        )


class CancelTests(SynchronousTestCase):
    """Withdrawing jobs: queued ones vanish, held ones are taken back from workers."""

    def setUp(self):
        self.s = Scheduler(prefetch=0)
        self.client = self.s.add_client()
        self.worker = self.s.add_worker(2)
        self.s.submit(self.client, make_jobs(1, 6))
        self.held = self.s.dispatch()
        self.other = self.s.add_client()
        self.s.submit(self.other, make_jobs(1, 3))

    def test_queued_dropped_held_returned(self):
        """Cancelling a held and a queued job: one to kill, one dropped, slot freed."""
        self.assertEqual(assigned(self.held), {self.worker: [1, 2]})
        dropped, kill = self.s.cancel(self.client, [2, 5])
        self.assertEqual(dropped, 1)
        self.assertEqual(kill, {self.worker: [(self.client, 2)]})
        self.assertEqual(self.s.client(self.client).queued, 3)
        self.assertEqual(self.s.client(self.client).running, 1)
        # The freed slot takes the next queued job, not the cancelled one.
        self.assertEqual(assigned(self.s.dispatch()), {self.worker: [3]})

    def test_running_count_after_cancel(self):
        """Cancelling one of three running jobs leaves two counted as running."""
        s = Scheduler(prefetch=0)
        client = s.add_client()
        s.add_worker(3)
        s.submit(client, make_jobs(1, 3))
        s.dispatch()
        self.assertEqual(s.client(client).running, 3)
        s.cancel(client, [2])
        self.assertEqual(s.client(client).running, 2)

    def test_late_result_of_cancelled_job_dropped(self):
        self.s.cancel(self.client, [1])
        job = self.held[0][1][0]
        self.assertEqual(self.s.complete(self.worker, [result_for(job)]), [])

    def test_cancel_all_of_one_client(self):
        """Without seqs, every job of that client goes; others' stay."""
        dropped, kill = self.s.cancel(self.client)
        self.assertEqual(dropped, 4)
        self.assertEqual(kill, {self.worker: [(self.client, 1), (self.client, 2)]})
        self.assertEqual(self.s.queued, 3)
        self.assertEqual(
            [(j.client, j.seq) for _, jobs in self.s.dispatch() for j in jobs],
            [(self.other, 1), (self.other, 2)],
        )

    def test_unknown_seqs_ignored(self):
        self.assertEqual(self.s.cancel(self.client, [99]), (0, {}))
        self.assertEqual(self.s.queued, 7)


class DrainTests(SynchronousTestCase):
    """A worker that stops gracefully returns its unstarted jobs and gets no more."""

    def setUp(self):
        self.scheduler = Scheduler(prefetch=2, max_attempts=1)
        self.client = self.scheduler.add_client()
        self.worker = self.scheduler.add_worker(1, name="draining:1")
        self.scheduler.submit(self.client, make_jobs(1, 5))
        self.assertEqual(assigned(self.scheduler.dispatch()), {self.worker: [1, 2, 3]})

    def keys(self, *seqs_):
        return [(self.client, seq) for seq in seqs_]

    def test_returned_jobs_requeued_in_front_in_order(self):
        back = self.scheduler.return_jobs(self.worker, self.keys(3, 2))
        self.assertEqual(seqs(back), [2, 3])
        other = self.scheduler.add_worker(1)
        self.assertEqual(assigned(self.scheduler.dispatch()), {other: [2, 3, 4]})
        self.assertEqual(self.scheduler.queued, 1)
        self.assertEqual(list(self.scheduler.worker(self.worker).held), self.keys(1))

    def test_draining_worker_gets_no_more_jobs(self):
        self.scheduler.return_jobs(self.worker, self.keys(2, 3))
        self.assertTrue(self.scheduler.worker(self.worker).draining)
        self.assertEqual(self.scheduler.dispatch(), [])
        self.scheduler.complete(self.worker, [result_for(Job(self.client, 1, b""))])
        self.assertEqual(self.scheduler.dispatch(), [])
        self.assertEqual(self.scheduler.queued, 4)

    def test_returned_jobs_count_no_attempt(self):
        """With max_attempts=1, a returned job still runs again."""
        self.scheduler.return_jobs(self.worker, self.keys(2, 3))
        other = self.scheduler.add_worker(1)
        self.assertEqual(assigned(self.scheduler.dispatch()), {other: [2, 3, 4]})

    def test_killed_at_drain_timeout_one_rule(self):
        """
        A job killed at the drain timeout is requeued without counting an
        attempt, whether the worker handed it back before its connection
        closed or left still holding it; losses elsewhere still count.
        """
        outcomes = []
        for hands_back in (True, False):
            scheduler = Scheduler(prefetch=2, max_attempts=1)
            client = scheduler.add_client()
            worker = scheduler.add_worker(1, name="draining:1")
            scheduler.submit(client, make_jobs(1, 5))
            scheduler.dispatch()
            scheduler.return_jobs(worker, [(client, 2), (client, 3)])  # the drain: unstarted back
            if hands_back:
                scheduler.return_jobs(worker, [(client, 1)])  # killed, handed back
            _, failed = scheduler.lose_worker(worker, "its connection was lost")
            other = scheduler.add_worker(1, name="other:2")
            dispatched = assigned(scheduler.dispatch())[other]
            _, failed_later = scheduler.lose_worker(other, "killed")
            outcomes.append((seqs(failed), dispatched, seqs(failed_later)))
        self.assertEqual(outcomes[0], outcomes[1])
        self.assertEqual(outcomes[0], ([], [1, 2, 3], [1]))

    def test_counters(self):
        self.scheduler.return_jobs(self.worker, self.keys(2, 3))
        state = self.scheduler.client(self.client)
        self.assertEqual((state.queued, state.running), (4, 1))

    def test_unknown_keys_ignored(self):
        self.scheduler.complete(self.worker, [result_for(Job(self.client, 1, b""))])
        back = self.scheduler.return_jobs(self.worker, self.keys(1, 3, 99) + [(77, 2)])
        self.assertEqual(seqs(back), [3])
        self.assertEqual(seqs(self.scheduler.worker(self.worker).held.values()), [2])

    def test_jobs_of_departed_clients_dropped(self):
        self.scheduler.remove_client(self.client)
        self.assertEqual(self.scheduler.return_jobs(self.worker, self.keys(2, 3)), [])
        self.assertEqual(self.scheduler.queued, 0)

    def test_unknown_worker(self):
        self.assertRaises(UnknownPeer, self.scheduler.return_jobs, 99, [])

    def test_empty_return_only_drains(self):
        self.assertEqual(self.scheduler.return_jobs(self.worker, []), [])
        self.assertTrue(self.scheduler.worker(self.worker).draining)
        self.assertEqual(len(self.scheduler.worker(self.worker).held), 3)


class FairShareTests(SynchronousTestCase):
    """Several clients share the workers fairly, by weight and priority."""

    def drain(self, scheduler, worker, n):
        """Run n jobs through a one-slot worker; return their keys in order."""
        keys = []
        for _ in range(n):
            [(_, [job])] = scheduler.dispatch()
            keys.append(job.key)
            scheduler.complete(worker, [result_for(job)])
        return keys

    def test_small_client_not_stuck_behind_big_one(self):
        s = Scheduler(prefetch=0)
        big, small = s.add_client(), s.add_client()
        worker = s.add_worker(1)
        s.submit(big, make_jobs(1, 100_000))
        s.submit(small, make_jobs(1, 10))
        keys = self.drain(s, worker, 20)
        self.assertEqual([k for k in keys if k[0] == small], [(small, i) for i in range(1, 11)])
        self.assertEqual(s.client(big).queued, 100_000 - 10)

    def test_weights(self):
        """A client of weight 2 gets two jobs per turn."""
        s = Scheduler(prefetch=0)
        heavy, light = s.add_client(weight=2), s.add_client()
        worker = s.add_worker(1)
        s.submit(heavy, make_jobs(1, 6))
        s.submit(light, make_jobs(1, 6))
        clients = [k[0] for k in self.drain(s, worker, 9)]
        self.assertEqual(clients, [heavy, heavy, light] * 3)

    def test_priority_within_client(self):
        """Higher priority first; equal priority keeps submission order."""
        s = Scheduler(prefetch=0)
        client = s.add_client()
        worker = s.add_worker(1)
        jobs = make_jobs(1, 4)
        jobs[2].options = encode_options(priority=5)
        jobs[3].options = encode_options(priority=5)
        s.submit(client, jobs)
        self.assertEqual([k[1] for k in self.drain(s, worker, 4)], [3, 4, 1, 2])

    def test_bad_weight(self):
        self.assertRaises(ValueError, Scheduler().add_client, weight=0)

    def test_requeued_jobs_go_first(self):
        """A lost worker's jobs go back ahead of everything, theirs and others'."""
        s = Scheduler(prefetch=0)
        a, b = s.add_client(), s.add_client()
        lost = s.add_worker(1)
        s.submit(a, make_jobs(1, 3))
        s.submit(b, make_jobs(1, 3))
        [(_, [job])] = s.dispatch()
        self.assertEqual(job.key, (a, 1))
        s.remove_worker(lost)
        worker = s.add_worker(1)
        self.assertEqual(self.drain(s, worker, 3), [(a, 1), (b, 1), (a, 2)])


class CreditTests(SynchronousTestCase):
    """
    A worker's prefetch credit follows its measured rate: many jobs for a
    fast worker, barely more than its slots for a slow one.
    """

    def setUp(self):
        self.scheduler = Scheduler(prefetch=1, horizon=0.05)
        self.client = self.scheduler.add_client()
        self.worker = self.scheduler.add_worker(2)
        self.scheduler.submit(self.client, make_jobs(1, 5000))
        self.now = 100.0

    def run_for(self, seconds: float, per_second: float) -> None:
        """Complete jobs at C{per_second}, dispatching after each batch of results."""
        end = self.now + seconds
        while self.now < end:
            self.now += 0.01
            held = list(self.scheduler.worker(self.worker).held.values())
            done = held[: int(per_second * 0.01)]
            self.scheduler.complete(self.worker, [result_for(job) for job in done], self.now)
            self.scheduler.dispatch(self.now)

    def test_prefetch_until_measured(self):
        self.assertEqual(len(assigned(self.scheduler.dispatch(self.now))[self.worker]), 2 + 2)

    def test_fast_worker_earns_credit(self):
        self.scheduler.dispatch(self.now)
        self.run_for(1.0, 4000)
        state = self.scheduler.worker(self.worker)
        self.assertGreater(state.credit, 50)
        self.assertEqual(len(state.held), state.capacity)

    def test_credit_is_capped(self):
        self.scheduler.dispatch(self.now)
        self.run_for(1.0, 10**6)
        self.assertLessEqual(self.scheduler.worker(self.worker).credit, 256 * 2)

    def test_slow_worker_keeps_minimum(self):
        self.scheduler.dispatch(self.now)
        self.run_for(1.0, 10)
        self.assertEqual(self.scheduler.worker(self.worker).credit, 2)

    def test_quiet_spell_drops_credit(self):
        """A worker that moved from tiny jobs to long ones loses its credit at the next event."""
        self.scheduler.dispatch(self.now)
        self.run_for(1.0, 4000)
        self.now += 30
        self.scheduler.dispatch(self.now)
        self.assertEqual(self.scheduler.worker(self.worker).credit, 2)

    def test_no_clock_no_measurement(self):
        self.scheduler.dispatch()
        state = self.scheduler.worker(self.worker)
        self.scheduler.complete(self.worker, [result_for(job) for job in list(state.held.values())])
        self.assertIsNone(state.rate)
        self.assertEqual(state.credit, 2)

    def test_negative_horizon_rejected(self):
        self.assertRaises(ValueError, Scheduler, horizon=-1)


class PrefetchBytesTests(SynchronousTestCase):
    """Big jobs are not prefetched past L{PREFETCH_BYTES}; free slots still take any job."""

    def test_big_jobs_not_piled_up(self):
        from cw.core.scheduler import PREFETCH_BYTES

        scheduler = Scheduler(prefetch=4)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        size = PREFETCH_BYTES // 2 + 1
        scheduler.submit(client, [Job(0, seq, b"x" * size) for seq in range(1, 6)])
        # One in the slot, one prefetched: then the bytes limit is reached.
        self.assertEqual(assigned(scheduler.dispatch()), {worker: [1, 2]})
        self.assertEqual(scheduler.worker(worker).held_bytes, 2 * size)
        scheduler.complete(worker, [Result(client, 1, Outcome.OK, b"")])
        self.assertEqual(assigned(scheduler.dispatch()), {worker: [3]})
        self.assertEqual(scheduler.worker(worker).held_bytes, 2 * size)

    def test_small_jobs_prefetched(self):
        scheduler = Scheduler(prefetch=4)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 10))
        self.assertEqual(assigned(scheduler.dispatch()), {worker: [1, 2, 3, 4, 5]})


class RoomTests(SynchronousTestCase):
    """
    Flow control: a client may send only while it has room in the queue,
    in bytes and in jobs; room comes back once its queue has drained to
    half the limits.
    """

    def setUp(self):
        self.s = Scheduler(prefetch=0, max_queued_bytes=100, max_queued_jobs=10)
        self.client = self.s.add_client()

    def jobs(self, first: int, count: int, size: int) -> list[Job]:
        return [Job(0, seq, b"x" * size) for seq in range(first, first + count)]

    def test_full_room_at_start(self):
        """A new client has all the room; the first grant is its registration's."""
        self.assertFalse(self.s.held(self.client))
        self.assertEqual(self.s.take_room(), [])

    def test_held_by_bytes(self):
        self.s.submit(self.client, self.jobs(1, 2, 50))
        self.assertTrue(self.s.held(self.client))
        self.assertFalse(self.s.over_hard_limit(self.client))

    def test_held_by_count(self):
        self.s.submit(self.client, self.jobs(1, 10, 0))
        self.assertTrue(self.s.held(self.client))

    def test_reference_counts_what_it_stands_for(self):
        """
        An argument left in its client's memory uses the room of its bytes,
        not of its reference's: the client's memory is bounded as the
        master's would be.
        """
        self.s.submit(self.client, [Job(0, 1, reference(1, 2, 3, 40)), Job(0, 2, reference(1, 4, 5, 60))])
        self.assertTrue(self.s.held(self.client))
        self.assertEqual(self.s.queued_bytes(self.client), 100)

    def test_room_once_drained_to_half(self):
        """
        Room comes back when the queue drains to half, enough to fill it to
        the limit again, and is then counted as given.
        """
        self.s.submit(self.client, self.jobs(1, 10, 10))
        worker = self.s.add_worker(4)
        self.s.dispatch()
        self.assertEqual(self.s.take_room(), [], "6 of 10 jobs still queued: more than half")
        results = [result_for(job) for job in self.s.worker(worker).held.values()]
        self.s.complete(worker, results)
        self.s.dispatch()
        self.assertEqual(self.s.take_room(), [(self.client, 80, 8)])
        self.assertFalse(self.s.held(self.client))
        self.assertEqual(self.s.take_room(), [], "given once")

    def test_unused_room_counts(self):
        """Room given but not used yet counts as queued: no grant beyond the limit."""
        self.s.submit(self.client, self.jobs(1, 1, 10))
        worker = self.s.add_worker(1)
        self.s.dispatch()
        self.assertEqual(self.s.take_room(), [], "90 bytes and 9 jobs of room are unused")
        self.s.complete(worker, [result_for(job) for job in self.s.worker(worker).held.values()])
        self.assertEqual(self.s.take_room(), [])

    def test_overshoot_by_one_job(self):
        """The job that used the last room may overshoot; the next grant makes up for it."""
        self.s.submit(self.client, self.jobs(1, 1, 90))
        self.s.submit(self.client, self.jobs(2, 1, 60))
        self.assertTrue(self.s.held(self.client))
        self.assertEqual(self.s.client(self.client).peak_queued_bytes, 150)
        self.s.cancel(self.client, [1, 2])
        # Unused room: none in bytes (150 sent of 100), 8 jobs; so 100 bytes and 2 jobs more.
        self.assertEqual(self.s.take_room(), [(self.client, 100, 2)])
        self.assertFalse(self.s.held(self.client))

    def test_refused_jobs_use_room(self):
        """Jobs refused at once used the client's room; they give it back at once."""
        refused = self.jobs(1, 10, 10)
        self.s.submit(self.client, [], refused)
        self.assertTrue(self.s.held(self.client))
        self.assertEqual(self.s.take_room(), [(self.client, 100, 10)])

    def test_requeued_jobs_not_past_room(self):
        """Jobs requeued from a lost worker were sent within the room: no hard stop."""
        worker = self.s.add_worker(30)
        for first in (1, 11, 21):
            self.s.submit(self.client, self.jobs(first, 10, 0))
            self.s.dispatch()
            self.assertEqual(self.s.take_room(), [(self.client, 0, 10)])
        self.s.lose_worker(worker)
        self.assertEqual(self.s.client(self.client).queued, 30, "three times the limit")
        self.assertFalse(self.s.over_hard_limit(self.client))

    def test_hard_limit(self):
        """Past the room by more than the limits (a client that ignores it), in bytes or in jobs."""
        self.s.submit(self.client, self.jobs(1, 1, 201))
        self.assertTrue(self.s.over_hard_limit(self.client))
        other = self.s.add_client()
        self.s.submit(other, self.jobs(1, 21, 0))
        self.assertTrue(self.s.over_hard_limit(other))
        self.s.submit(other, [])
        third = self.s.add_client()
        self.s.submit(third, self.jobs(1, 20, 10))
        self.assertFalse(self.s.over_hard_limit(third))

    def test_departed_client_gets_nothing(self):
        self.s.submit(self.client, self.jobs(1, 10, 10))
        self.s.cancel(self.client)
        self.s.remove_client(self.client)
        self.assertEqual(self.s.take_room(), [])

    def test_limits_checked(self):
        self.assertRaises(ValueError, Scheduler, max_queued_bytes=0)
        self.assertRaises(ValueError, Scheduler, max_queued_jobs=0)


def timed_job(seq: int, timeout: float) -> Job:
    """A job with its own C{timeout} option."""
    return Job(0, seq, b"payload %d" % seq, encode_options(timeout=timeout))


class DeadlineTests(SynchronousTestCase):
    """
    The master's own deadlines (L{Scheduler.expire}): a job with a timeout
    that its worker does not report within timeout + grace is taken back,
    whatever the worker says later.
    """

    def setUp(self):
        self.scheduler = Scheduler(prefetch=0, max_attempts=3, deadline_grace=5)
        self.client = self.scheduler.add_client()
        self.worker = self.scheduler.add_worker(1, name="wedged:1")

    def test_grace_validated(self):
        self.assertRaises(ValueError, Scheduler, deadline_grace=-1)
        self.assertRaises(ValueError, Scheduler, stall_timeout=-1)

    def test_taken_back_at_timeout_plus_grace(self):
        """The job is requeued at its deadline, not before; its worker is told to kill it."""
        self.scheduler.submit(self.client, [timed_job(1, 10)])
        self.scheduler.dispatch(now=100.0)
        nothing = self.scheduler.expire(114.9)
        self.assertEqual(
            (nothing.requeued, nothing.failed, nothing.cancel, nothing.stalled), ([], [], {}, {})
        )
        expiry = self.scheduler.expire(115.0)
        self.assertEqual(seqs(expiry.requeued), [1])
        self.assertEqual(expiry.cancel, {self.worker: [(self.client, 1)]})
        self.assertEqual(self.scheduler.queued, 1)
        state = self.scheduler.client(self.client)
        self.assertEqual((state.queued, state.running), (1, 0))

    def test_silent_worker_stalled_and_skipped(self):
        """A worker that returned nothing since the job started is stalled: no more jobs for it."""
        self.scheduler.submit(self.client, [timed_job(1, 10)])
        self.scheduler.dispatch(now=0.0)
        expiry = self.scheduler.expire(15.0)
        self.assertIn("no result for 15.0 s", expiry.stalled[self.worker])
        self.assertTrue(self.scheduler.worker(self.worker).stalled)
        self.assertEqual(self.scheduler.dispatch(now=15.0), [])
        other = self.scheduler.add_worker(1)
        self.assertEqual(assigned(self.scheduler.dispatch(now=15.0)), {other: [1]})

    def test_late_result_dropped(self):
        self.scheduler.submit(self.client, [timed_job(1, 10)])
        [(_, [job])] = self.scheduler.dispatch(now=0.0)
        self.scheduler.expire(15.0)
        self.assertEqual(self.scheduler.complete(self.worker, [result_for(job)], now=16.0), [])

    def test_result_in_time_clears_deadline(self):
        self.scheduler.submit(self.client, [timed_job(1, 10)])
        [(_, [job])] = self.scheduler.dispatch(now=0.0)
        self.assertEqual(len(self.scheduler.complete(self.worker, [result_for(job)], now=14.0)), 1)
        expiry = self.scheduler.expire(1000.0)
        self.assertEqual((expiry.requeued, expiry.failed, expiry.stalled), ([], [], {}))

    def test_no_deadline_without_timeout(self):
        self.scheduler.submit(self.client, make_jobs(1, 1))
        self.scheduler.dispatch(now=0.0)
        expiry = self.scheduler.expire(1e9)
        self.assertEqual((expiry.requeued, expiry.stalled), ([], {}))

    def test_cancelled_job_has_no_deadline(self):
        self.scheduler.submit(self.client, [timed_job(1, 10)])
        self.scheduler.dispatch(now=0.0)
        self.scheduler.cancel(self.client, [1])
        expiry = self.scheduler.expire(100.0)
        self.assertEqual((expiry.requeued, expiry.cancel, expiry.stalled), ([], {}, {}))

    def test_prefetched_job_clock_starts_when_it_runs(self):
        """A job waiting behind another on its worker gets its time once it runs."""
        scheduler = Scheduler(prefetch=1, deadline_grace=5)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        scheduler.submit(client, [*make_jobs(1, 1), timed_job(2, 10)])
        [(_, [first, _])] = scheduler.dispatch(now=0.0)
        self.assertEqual(scheduler.expire(100.0).requeued, [])
        scheduler.complete(worker, [result_for(first)], now=100.0)
        self.assertEqual(scheduler.expire(114.9).requeued, [])
        expiry = scheduler.expire(115.0)
        self.assertEqual(seqs(expiry.requeued), [2])
        self.assertEqual(expiry.stalled, {}, "it returned a result since the job started")

    def test_worker_reporting_other_jobs_not_stalled(self):
        """One hung slot of a worker that reports other jobs costs only that job."""
        scheduler = Scheduler(prefetch=0, deadline_grace=5)
        client = scheduler.add_client()
        worker = scheduler.add_worker(2)
        scheduler.submit(client, [timed_job(1, 10), *make_jobs(2, 2)])
        scheduler.dispatch(now=0.0)
        scheduler.complete(worker, [Result(client, 2, Outcome.OK, b"")], now=3.0)
        expiry = scheduler.expire(15.0)
        self.assertEqual((seqs(expiry.requeued), expiry.stalled), ([1], {}))
        self.assertEqual(expiry.cancel, {worker: [(client, 1)]})
        self.assertEqual(assigned(scheduler.dispatch(now=15.0)), {worker: [1]})

    def test_counts_attempts_then_job_timeout(self):
        """Each expiry counts an attempt; the last fails the job with JobTimeout."""
        scheduler = Scheduler(prefetch=0, max_attempts=2, deadline_grace=5)
        client = scheduler.add_client()
        scheduler.submit(client, [timed_job(1, 10)])
        first = scheduler.add_worker(1, name="a:1")
        scheduler.dispatch(now=0.0)
        self.assertEqual(seqs(scheduler.expire(15.0).requeued), [1])
        scheduler.add_worker(1, name="b:2")
        scheduler.dispatch(now=20.0)
        expiry = scheduler.expire(35.0)
        self.assertEqual(expiry.requeued, [])
        [failure] = expiry.failed
        self.assertEqual((failure.client, failure.seq, failure.status), (client, 1, Outcome.CRASHED))
        report = read_error_report(failure.payload)
        self.assertEqual(report["type"], "JobTimeout")
        self.assertEqual(report["hosts"], ["a:1", "b:2"])
        self.assertEqual((report["attempts"], report["timeout"]), (2, 10))
        self.assertIn("max_attempts=2", report["message"])
        self.assertIn("--deadline-grace", report["message"])
        state = scheduler.client(client)
        self.assertEqual((state.queued, state.running, state.completed), (0, 0, 1))
        self.assertEqual(scheduler.queued, 0)
        scheduler.lose_worker(first)

    def test_lost_worker_and_deadline_share_attempts(self):
        scheduler = Scheduler(prefetch=0, max_attempts=2, deadline_grace=5)
        client = scheduler.add_client()
        scheduler.submit(client, [timed_job(1, 10)])
        lost = scheduler.add_worker(1, name="a:1")
        scheduler.dispatch(now=0.0)
        self.assertEqual(seqs(scheduler.lose_worker(lost, "killed")[0]), [1])
        scheduler.add_worker(1, name="b:2")
        scheduler.dispatch(now=1.0)
        [failure] = scheduler.expire(16.0).failed
        self.assertEqual(read_error_report(failure.payload)["hosts"], ["a:1", "b:2"])

    def test_stalled_worker_unstarted_jobs_do_not_count(self):
        """Jobs a stalled worker held behind the overdue one never ran: no attempt when it goes."""
        scheduler = Scheduler(prefetch=2, max_attempts=1, deadline_grace=5)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        scheduler.submit(client, [timed_job(1, 10), *make_jobs(2, 3)])
        scheduler.dispatch(now=0.0)
        expiry = scheduler.expire(15.0)
        self.assertEqual([r.seq for r in expiry.failed], [1])
        self.assertIn(worker, expiry.stalled)
        back, failed = scheduler.lose_worker(worker, "stalled")
        self.assertEqual((seqs(back), failed), ([2, 3], []))

    def test_stall_timeout(self):
        """With stall_timeout, a worker holding jobs that reports nothing for that long is stalled."""
        scheduler = Scheduler(prefetch=0, stall_timeout=60)
        client = scheduler.add_client()
        quiet = scheduler.add_worker(1)
        busy = scheduler.add_worker(1)
        idle = scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 2))
        self.assertEqual(assigned(scheduler.dispatch(now=0.0)), {quiet: [1], busy: [2]})
        for t in range(10, 100, 10):
            # Any result counts as progress, even one for a job it no longer holds.
            scheduler.complete(busy, [Result(client, 99, Outcome.OK, b"")], now=float(t))
            if t == 60:
                self.assertEqual(scheduler.expire(60.0).stalled, {})
        expiry = scheduler.expire(90.0)
        self.assertEqual(list(expiry.stalled), [quiet])
        self.assertIn("--stall-timeout 60", expiry.stalled[quiet])
        self.assertNotIn(idle, expiry.stalled)

    def test_no_stall_timeout_by_default(self):
        """Without stall_timeout, a job without a timeout may run as long as it takes."""
        self.scheduler.submit(self.client, make_jobs(1, 1))
        self.scheduler.dispatch(now=0.0)
        self.assertEqual(self.scheduler.expire(1e9).stalled, {})

    def test_deadlines_of_finished_jobs_do_not_pile_up(self):
        scheduler = Scheduler(prefetch=0, deadline_grace=5)
        client = scheduler.add_client()
        worker = scheduler.add_worker(1)
        for seq in range(1, 5001):
            scheduler.submit(client, [timed_job(seq, 60)])
            [(_, [job])] = scheduler.dispatch(now=float(seq))
            scheduler.complete(worker, [result_for(job)], now=float(seq))
        self.assertLessEqual(len(scheduler._deadlines), 2048)


class UnsentResultsTests(SynchronousTestCase):
    """
    A client that does not read its results: its jobs stop being
    dispatched over the limit of unsent bytes and go again once it has read
    them down to half; one that reads nothing for the timeout is dropped.
    """

    def setUp(self):
        self.s = Scheduler(prefetch=0, max_unsent_bytes=100, read_timeout=10)
        self.slow = self.s.add_client()
        self.other = self.s.add_client()
        self.s.submit(self.slow, make_jobs(1, 4))
        self.s.submit(self.other, make_jobs(1, 4))

    def dispatched_clients(self) -> list[int]:
        return [job.client for _, jobs in self.s.dispatch() for job in jobs]

    def test_backed_up_client_not_dispatched(self):
        self.assertEqual(self.s.unsent_results(self.slow, 101, 0, 0.0), "")
        self.s.add_worker(3)
        self.assertEqual(self.dispatched_clients(), [self.other] * 3)
        self.assertEqual(self.s.client(self.slow).queued, 4)

    def test_only_backed_up_clients_queued(self):
        """Nothing to dispatch when every client with jobs queued is backed up."""
        self.s.unsent_results(self.slow, 101, 0, 0.0)
        self.s.cancel(self.other)
        self.s.add_worker(3)
        self.assertEqual(self.s.dispatch(), [])

    def test_at_limit_still_dispatched(self):
        self.assertEqual(self.s.unsent_results(self.slow, 100, 0, 0.0), "")
        self.s.add_worker(2)
        self.assertEqual(sorted(self.dispatched_clients()), sorted([self.slow, self.other]))

    def test_resumes_at_half(self):
        self.s.unsent_results(self.slow, 200, 0, 0.0)
        self.assertEqual(self.s.unsent_results(self.slow, 60, 140, 1.0), "", "over half")
        self.assertEqual(self.s.unsent_results(self.slow, 50, 150, 2.0), "resume")
        self.s.add_worker(2)
        self.assertEqual(sorted(self.dispatched_clients()), sorted([self.slow, self.other]))

    def test_fair_turns_kept(self):
        """A client passed over keeps its turn for when it reads again."""
        self.s.unsent_results(self.slow, 200, 0, 0.0)
        worker = self.s.add_worker(1)
        self.assertEqual(self.dispatched_clients(), [self.other])
        self.s.unsent_results(self.slow, 0, 200, 1.0)
        self.s.complete(worker, [result_for(job) for job in self.s.worker(worker).held.values()])
        self.assertEqual(self.dispatched_clients(), [self.slow])

    def test_drop_after_timeout_without_reading(self):
        self.s.unsent_results(self.slow, 50, 10, 0.0)
        self.assertEqual(self.s.unsent_results(self.slow, 50, 10, 1.0), "")
        self.assertEqual(self.s.unsent_results(self.slow, 80, 10, 9.5), "")
        self.assertEqual(self.s.stalled_for(self.slow, 9.5), 9.5)
        self.assertEqual(self.s.unsent_results(self.slow, 80, 10, 10.5), "drop")

    def test_reading_resets_the_timeout(self):
        self.s.unsent_results(self.slow, 50, 10, 0.0)
        self.s.unsent_results(self.slow, 50, 10, 5.0)
        self.s.unsent_results(self.slow, 90, 11, 9.0)
        self.assertEqual(self.s.unsent_results(self.slow, 90, 11, 18.5), "")
        self.assertEqual(self.s.unsent_results(self.slow, 90, 11, 19.5), "drop", "stalled since 9.0")

    def test_nothing_unsent_never_stalls(self):
        for second in range(100):
            self.assertEqual(self.s.unsent_results(self.slow, 0, 10, float(second)), "")
        self.assertEqual(self.s.stalled_for(self.slow, 100.0), 0.0)

    def test_departed_client_forgotten(self):
        self.s.unsent_results(self.slow, 200, 0, 0.0)
        self.s.remove_client(self.slow)
        self.s.cancel(self.other)
        self.s.submit(self.other, make_jobs(5, 5))
        self.s.add_worker(1)
        self.assertEqual(self.dispatched_clients(), [self.other])

    def test_limits_checked(self):
        self.assertRaises(ValueError, Scheduler, max_unsent_bytes=0)
        self.assertRaises(ValueError, Scheduler, read_timeout=0)


class FairQueueTurnTests(SynchronousTestCase):
    """The fair queue's turns, with more than two clients and with clients passed over."""

    def queue(self, counts: dict[int, int]) -> FairQueue:
        queue = FairQueue()
        for client, count in counts.items():
            for seq in range(1, count + 1):
                queue.append(Job(client, seq, b""))
        return queue

    def test_round_robin_three_clients(self):
        """Three clients of equal weight take turns in the order they arrived."""
        queue = self.queue({1: 2, 2: 2, 3: 2})
        self.assertEqual([queue.popleft().client for _ in range(6)], [1, 2, 3, 1, 2, 3])
        self.assertRaises(IndexError, queue.popleft)

    def test_passed_over_client_keeps_turn(self):
        """
        A client passed over keeps its place; a client emptied out of turn
        leaves the turns, and the others go on in order.
        """
        queue = self.queue({1: 2, 2: 1, 3: 2})
        self.assertEqual(queue.popleft(skip={1}).client, 2)
        self.assertEqual([queue.popleft().client for _ in range(4)], [1, 3, 1, 3])
        self.assertEqual(len(queue), 0)


class WalltimeTests(SynchronousTestCase):
    """
    A worker whose walltime ends soon is given no job expected to run
    longer than what remains; run times are measured per map.
    """

    def setUp(self):
        self.scheduler = Scheduler(prefetch=0)
        self.client = self.scheduler.add_client()

    def submit(self, seq: int, func: bytes = b"", **options) -> None:
        self.scheduler.submit(self.client, [Job(0, seq, b"p", encode_options(**options), func)])

    def test_expected_duration_longer_than_walltime_left(self):
        ending = self.scheduler.add_worker(1)
        self.scheduler.set_end(ending, 100.0)
        self.submit(1, expected_duration=60)
        self.assertEqual(self.scheduler.dispatch(now=50.0), [])
        self.assertEqual(self.scheduler.queued, 1)
        fresh = self.scheduler.add_worker(1)
        self.assertEqual(assigned(self.scheduler.dispatch(now=50.0)), {fresh: [1]})

    def test_expected_duration_that_fits(self):
        ending = self.scheduler.add_worker(1)
        self.scheduler.set_end(ending, 100.0)
        self.submit(1, expected_duration=40)
        self.assertEqual(assigned(self.scheduler.dispatch(now=50.0)), {ending: [1]})

    def test_unknown_duration_goes_anywhere(self):
        ending = self.scheduler.add_worker(1)
        self.scheduler.set_end(ending, 1.0)
        self.submit(1)
        self.assertEqual(assigned(self.scheduler.dispatch(now=0.5)), {ending: [1]})

    def test_map_durations_measured(self):
        """Jobs of one cached function: their measured run time is what the next ones expect."""
        worker = self.scheduler.add_worker(1)
        self.submit(1, func=b"f")
        [(_, [job])] = self.scheduler.dispatch(now=10.0)
        self.scheduler.complete(worker, [result_for(job)], now=40.0)
        self.assertEqual(self.scheduler.job_seconds, 30.0)
        self.assertEqual(self.scheduler.expected_seconds(Job(self.client, 2, b"p", b"", b"f")), 30.0)
        self.assertIsNone(self.scheduler.expected_seconds(Job(self.client, 2, b"p", b"", b"g")))
        self.scheduler.set_end(worker, 60.0)
        self.submit(2, func=b"f")
        self.submit(3, func=b"g")
        self.assertEqual(self.scheduler.dispatch(now=40.0), [])
        self.scheduler.set_end(worker, None)
        self.assertEqual(assigned(self.scheduler.dispatch(now=40.0))[worker][0], 2)


class OutputRoutingTests(SynchronousTestCase):
    """L{Scheduler.holding}: what running jobs wrote goes on only for jobs the reporting worker holds."""

    def dispatched(self):
        """
        A scheduler, two clients with a job each and the two workers these
        jobs went to: C{(scheduler, client, other, first, second)}.
        """
        scheduler = Scheduler(prefetch=0)
        client, other = scheduler.add_client(), scheduler.add_client()
        first, second = scheduler.add_worker(1), scheduler.add_worker(1)
        scheduler.submit(client, make_jobs(1, 1))
        scheduler.submit(other, make_jobs(1, 1))
        self.assertEqual(assigned(scheduler.dispatch()), {first: [1], second: [1]})
        return scheduler, client, other, first, second

    def test_only_held_jobs_of_present_clients(self):
        scheduler, client, other, first, second = self.dispatched()
        mine = Output(client, 1, Stream.STDOUT, b"x")
        theirs = Output(other, 1, Stream.STDOUT, b"y")
        self.assertEqual(
            scheduler.holding(first, [mine, theirs, Output(client, 2, Stream.STDOUT, b"z")]), [mine]
        )
        self.assertEqual(scheduler.holding(second, [mine, theirs]), [theirs])
        self.assertEqual(scheduler.holding(99, [mine]), [])
        scheduler.remove_client(other)
        self.assertEqual(scheduler.holding(second, [theirs]), [])
        scheduler.complete(first, [Result(client, 1, Outcome.OK, b"")])
        self.assertEqual(scheduler.holding(first, [mine]), [])

    def test_holds(self):
        """L{Scheduler.holds}: a result is wanted from the worker holding its job, its client here."""
        scheduler, client, other, first, second = self.dispatched()
        self.assertTrue(scheduler.holds(first, (client, 1)))
        self.assertFalse(scheduler.holds(second, (client, 1)))
        self.assertFalse(scheduler.holds(first, (client, 2)))
        self.assertFalse(scheduler.holds(99, (client, 1)))
        scheduler.remove_client(other)
        self.assertFalse(scheduler.holds(second, (other, 1)))
        scheduler.complete(first, [Result(client, 1, Outcome.OK, b"")])
        self.assertFalse(scheduler.holds(first, (client, 1)))
