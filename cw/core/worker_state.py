"""
The worker's decisions, with no I/O.

L{WorkerState} holds a worker's queue of jobs from the master, the batches
running in its job processes, the measured time a job takes and whether the
worker drains.  The worker's adapter (L{cw.worker.service.Worker}) feeds it
events (jobs arrived, a batch finished or its process died, a cancel, a
drain, the master connection lost) and carries out the typed instructions it
returns (L{StartBatch}, L{CancelBatch}, L{KillRunning}, L{SendResults},
L{ReturnJobs}, L{StartDrainTimer}, L{Drained}), in the style of h11 and
Dask's worker state machine.  Time is passed in; nothing here reads a clock,
touches a process or a socket, so every rule is tested directly in
L{cw.test.core.test_worker_state}.

Rules:
  - Jobs start in the order they came, at most one batch per job process
    (C{slots}).  Until jobs are known to be short (L{BATCH_SECONDS} on
    average), each goes alone; then a batch holds a share of the queue for
    each idle process, at most L{BATCH_JOBS} jobs, about L{BATCH_BYTES} and
    about L{BATCH_SECONDS} of work.
  - A job runs alone (is I{solo}) if it has a timeout (its own or the
    worker's: killing its process must not take other jobs along), if job
    processes are recycled after a number of calls, or if it is being re-run
    because its batch's process died.
  - A batch whose process died: a lone job gets a crash report, unless the
    worker is stopping and the job was neither cancelled nor timed out (it
    goes back to the master).  A larger batch's jobs that were not cancelled
    go back to the front of the queue, each to run alone (unless the
    process was killed to cancel one of them).
  - Results are sent only on the master connection (I{generation}) the
    batch started under, never for a cancelled job; a result over the
    master's payload limit becomes a C{PayloadTooLarge} failure.
  - Draining starts no more jobs: queued and later-arriving jobs go back to
    the master; the drain ends once nothing runs, at once without a master
    connection, or when its timer passes (then the running jobs are killed
    and their results not sent).
  - A lost master connection drops the queue and kills running jobs (the
    master requeues both).
  - Resources (L{cw.core.resources}): a sized job comes only when the master
    found room for it here, so it starts as soon as a job process is free,
    ahead of queued plain jobs, alone, pinned to as many of the worker's
    cores as it asked for (the least used ones; only when the worker owns
    more) and told its GPUs.  A batch of plain jobs takes one core: it
    starts only while the cores in use (its own and the sized jobs') leave
    one free.

This module must import nothing but the standard library, L{cw.core} and L{cw.errors}.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from cw.core.handover import KeptResults
from cw.core.records import (
    BATCH_BYTES,
    MAX_PAYLOAD,
    Job,
    Outcome,
    Result,
    encode_options,
    error_report,
    job_size,
    read_options,
    too_big,
    valid_timeout,
)
from cw.core.resources import ALLOCATION, Shape, shape_of
from cw.errors import ReportKind

#: Most jobs handed to one job process in one call.
BATCH_JOBS = 64

#: Jobs are batched only while they take less than this many seconds on
#: average, and a batch holds about this much work at most: slow jobs go one
#: by one, so that a draining worker can hand back the ones not started.
BATCH_SECONDS = 0.02

Key = tuple[int, int]


class Death(enum.Enum):
    """Why a job process failed a batch."""

    #: Killed to cancel a job of the batch.
    CANCELLED = "cancelled"
    #: Killed because its (lone) job ran past its timeout.
    TIMED_OUT = "timed out"
    #: Anything else: a signal, an exit, a process that never got the batch.
    DIED = "died"


# Instructions: what the adapter is to do, in the order given.


@dataclass(frozen=True)
class StartBatch:
    """Run C{jobs} in one job process; C{timeout} (seconds) only for a lone job."""

    batch: int
    jobs: tuple[Job, ...]
    timeout: float | None
    generation: int


@dataclass(frozen=True)
class CancelBatch:
    """
    Kill the process running batch C{batch} (other jobs of it run again).
    C{withdraw}: every job of the batch is cancelled, so if it has not
    reached a process yet it never must.
    """

    batch: int
    withdraw: bool


@dataclass(frozen=True)
class KillRunning:
    """Kill every job process that runs a batch; their results are not sent."""


@dataclass(frozen=True)
class SendResults:
    """Send these results to the master now."""

    results: tuple[Result, ...]


@dataclass(frozen=True)
class HandOver:
    """
    Results of jobs of a lost master connection were kept
    (L{WorkerState.kept}): hand them to the master if connected.
    """


@dataclass(frozen=True)
class ReturnJobs:
    """
    Tell the master this worker will not run these jobs and wants no more
    (sent even with no keys, so that the master learns the worker drains).
    """

    keys: tuple[Key, ...]


@dataclass(frozen=True)
class StartDrainTimer:
    """Arm the drain timeout; when it passes, feed L{WorkerState.drain_expired}."""


@dataclass(frozen=True)
class Drained:
    """The drain is over (C{how}, in words): flush results and let the worker stop."""

    how: str


Instruction = (
    StartBatch | CancelBatch | KillRunning | SendResults | HandOver | ReturnJobs | StartDrainTimer | Drained
)


@dataclass
class Batch:
    """Jobs running together in one job process."""

    jobs: tuple[Job, ...]
    generation: int
    started: float
    cancelled: set[Key] = field(default_factory=set)
    #: Cores it counts as using, and those it is pinned to.
    cpus: int = 1
    cores: tuple[int, ...] = ()


class WorkerState:
    """
    The worker's queue, running batches, job time, solo set and drain state.

    @param slots: job processes, so batches that may run at once.
    @param host: this worker's host name, for the error reports it makes.
    @param job_timeout: seconds a job may run unless it sets its own
        timeout (None: no limit).
    @param recycles: job processes are restarted after a number of calls,
        so every job goes alone (the count stays one of jobs).
    @param cpus: cores jobs may use (default: one per slot).
    @param cores: the ids of the cores this worker owns, to pin sized jobs to.
    @param keep_bytes: when the master connection is lost, let the running
        jobs finish and keep up to this many bytes of their results for the
        next master (L{kept}); 0: kill them.
    """

    def __init__(
        self,
        slots: int,
        host: str = "",
        job_timeout: float | None = None,
        recycles: bool = False,
        cpus: int | None = None,
        cores: Iterable[int] = (),
        keep_bytes: int = 0,
    ) -> None:
        self.slots = slots
        self.cpus = cpus or slots
        #: Cores counted as in use by running batches.
        self.cpus_used = 0
        self.cores = list(cores)
        #: How many running sized jobs are pinned to each core.
        self.pinned: dict[int, int] = dict.fromkeys(self.cores, 0)
        #: Sized jobs in L{queue}.
        self.queued_sized = 0
        self.host = host
        self.job_timeout = job_timeout
        self.recycles = recycles
        #: Jobs from the master not started yet, in order.
        self.queue: deque[Job] = deque()
        #: Running batches by id.
        self.batches: dict[int, Batch] = {}
        #: The batch each running job is in.
        self.running_in: dict[Key, int] = {}
        self._next_batch = 0
        #: Jobs handed to job processes and not yet ended.
        self.running = 0
        #: Jobs to run alone: their batch's job process died.
        self.solo: set[Key] = set()
        #: Average seconds a job takes in a job process, once measured.
        self.job_seconds: float | None = None
        #: Bumped on every master connection lost (and drain kill): results
        #: of batches started under an earlier one are not sent.
        self.generation = 0
        #: The master's payload limit, learnt at registration.
        self.max_payload = MAX_PAYLOAD
        #: Set once the worker drains: it starts no more jobs.
        self.draining = False
        #: Set once the drain is over (L{Drained} was given).
        self.drained = False
        #: Set the moment SIGTERM arrives (SLURM signals the job processes
        #: too): a lone job whose process dies then goes back to the master.
        self.terminating = False
        #: Results of jobs that finished after their master connection was
        #: lost, for the next master (None: such jobs are killed instead).
        self.kept: KeptResults | None = KeptResults(keep_bytes) if keep_bytes > 0 else None
        #: The session of each client, by client id, of every lost
        #: connection (by generation) whose jobs still run.
        self.lost_sessions: dict[int, dict[int, str]] = {}

    @property
    def calls(self) -> int:
        """Batches in job processes, at most one per process."""
        return len(self.batches)

    # Events.

    def jobs_arrived(self, jobs: Iterable[Job]) -> list[Instruction]:
        """
        The master sent C{jobs}: queue them (start them with L{start_jobs}),
        or, while draining (sent before the master learnt it), return them.
        """
        jobs = list(jobs)
        if self.draining:
            return [ReturnJobs(tuple(job.key for job in jobs))] if jobs else []
        self.queue.extend(jobs)
        self.queued_sized += sum(1 for job in jobs if job.options and shape_of(job) is not None)
        return []

    def start_jobs(self, now: float) -> list[Instruction]:
        """Start queued jobs in free job processes; end a drain once nothing runs."""
        out: list[Instruction] = []
        while self.queue and self.calls < self.slots:
            if self.queued_sized:
                out.append(self._start_sized(now))
            elif self.cpus_used < self.cpus:
                out.append(self._start(self._take_batch(), now))
            else:
                break
        if self.draining and not self.running:
            out += self._drained("every running job finished and was reported")
        return out

    def batch_finished(self, batch: int, results: Iterable[Result], now: float) -> list[Instruction]:
        """Batch C{batch}'s job process answered with C{results}."""
        return self._finished(batch, list(results), now)

    def batch_failed(
        self, batch: int, death: Death, report: bytes, now: float, output: tuple[bytes, bytes] = (b"", b"")
    ) -> list[Instruction]:
        """
        The job process running batch C{batch} died (or never got it) for
        C{death}; C{report} is the crash report a lone job gets, with
        C{output}, what it wrote to stdout and stderr before its process died.
        """
        running = self.batches[batch]
        jobs = running.jobs
        out: list[Instruction] = []
        results: list[Result] = []
        if len(jobs) == 1:
            if (
                (self.draining or self.terminating)
                and death is Death.DIED
                and running.generation not in self.lost_sessions
            ):
                # Its process died as this worker stops (SLURM signals every
                # process of a job): not the job's fault; the master requeues
                # it (not a job of a lost connection: no master knows it).
                out.append(ReturnJobs((jobs[0].key,)))
            else:
                results = [Result(jobs[0].client, jobs[0].seq, Outcome.CRASHED, report, *output)]
        elif running.generation == self.generation:
            again = [job for job in jobs if job.key not in running.cancelled]
            if death is not Death.CANCELLED:
                self.solo.update(job.key for job in again)
            self.queue.extendleft(reversed(again))
            self._count_sized()
        return out + self._finished(batch, results, now)

    def cancel(self, keys: Iterable[Key]) -> list[Instruction]:
        """
        Drop these jobs if queued; kill the processes of those running.  The
        master has already taken them back, so no result is sent for them.
        """
        wanted = set(keys)
        self.queue = deque(job for job in self.queue if job.key not in wanted)
        self._count_sized()
        out: list[Instruction] = []
        hit: dict[int, None] = {}
        for key in wanted:
            batch = self.running_in.get(key)
            if batch is not None:
                self.batches[batch].cancelled.add(key)
                hit[batch] = None
        for batch in hit:
            running = self.batches[batch]
            whole = running.cancelled >= {job.key for job in running.jobs}
            out.append(CancelBatch(batch, whole))
        return out

    def drain(self, connected: bool) -> list[Instruction]:
        """
        Stop gracefully: hand the unstarted jobs back to the master (when
        C{connected}), let the running ones finish.  Nothing if already
        draining.
        """
        if self.draining:
            return []
        self.draining = True
        unstarted, self.queue = self.queue, deque()
        self.queued_sized = 0
        out: list[Instruction] = []
        if connected:
            out.append(ReturnJobs(tuple(job.key for job in unstarted)))
        if not self.running:
            out += self._drained("no jobs were running")
        elif not connected:
            out += self._drained("no master connection to report results on", kill=True)
        else:
            out.append(StartDrainTimer())
        return out

    def drain_expired(self, timeout: float) -> list[Instruction]:
        """The drain timer (C{timeout} seconds) passed."""
        return self._drained(
            f"the drain timeout of {timeout:g} s passed with {self.running} jobs running;"
            " killed their processes (the master requeues those jobs)",
            kill=True,
        )

    def master_lost(self, sessions: dict[int, str] | None = None) -> list[Instruction]:
        """
        The master connection is gone: drop the queue (the master requeues
        it; the clients resubmit it to the next one).  The running jobs are
        killed rather than run twice, unless results are kept (C{keep_bytes}):
        then they run on until a master is back (L{master_back}), and the
        results of those that finish meanwhile, with their clients' session
        (C{sessions}, by client id), wait in L{kept} for it.
        """
        lost = self.generation
        self.generation += 1
        self.queue.clear()
        self.queued_sized = 0
        self.solo.clear()
        if self.draining:
            # Nothing can be reported any more; the master requeues the rest.
            return self._drained(
                f"the master connection was lost with {self.running} jobs running", kill=True
            )
        if not self.running:
            return []
        if self.kept is None:
            return [KillRunning()]
        self.lost_sessions[lost] = dict(sessions or {})
        # The next master numbers its clients afresh: its keys must not
        # reach these jobs (a cancel of its client 1's job 5 is not for this
        # connection's client 1).
        for key, batch in list(self.running_in.items()):
            if self.batches[batch].generation == lost:
                del self.running_in[key]
        return []

    def master_back(self) -> list[Instruction]:
        """
        A master connection is registered again: the results kept so far
        went to it.  Jobs of a lost connection still running are killed
        now, and their results not kept: their clients have resubmitted
        them (this master cannot know them, nor cancel them, and they would
        hold slots for its jobs).  Only jobs of lost connections can run at
        this moment, so every running job process is killed.
        """
        if not self.lost_sessions:
            return []
        self.lost_sessions.clear()
        return [KillRunning()] if self.running else []

    def running_orphans(self) -> int:
        """Jobs still running for a lost master connection (their results are kept)."""
        return sum(len(b.jobs) for b in self.batches.values() if b.generation in self.lost_sessions)

    # Decisions.

    def is_solo(self, job: Job) -> bool:
        """
        Whether C{job} must have a job process to itself: it has a timeout
        (killing its process must not take other jobs along), it is being
        re-run after a batch's process died, or job processes are recycled
        after a number of calls (which then stays a number of jobs).
        """
        if self.job_timeout or self.recycles or job.key in self.solo:
            return True
        if not job.options:
            return False
        return shape_of(job) is not None or valid_timeout(read_options(job).get("timeout"))

    def _take_batch(self) -> list[Job]:
        """
        The next jobs for one job process: a share of the queue for each
        idle process (so a lone job goes alone, with no wait, and a deep
        queue is spread over all processes), at most L{BATCH_JOBS} jobs,
        about L{BATCH_BYTES} and about L{BATCH_SECONDS} of work.  Until
        jobs are known to be short, each goes alone.
        """
        job = self.queue.popleft()
        batch = [job]
        if self.job_seconds is None or self.job_seconds > BATCH_SECONDS or self.is_solo(job):
            return batch
        share = -(-(len(self.queue) + 1) // max(1, self.slots - self.calls))
        want = min(BATCH_JOBS, share, max(1, int(BATCH_SECONDS / max(self.job_seconds, 1e-6))))
        size = job_size(job)
        while len(batch) < want and self.queue:
            job = self.queue[0]
            size += job_size(job)
            if size > BATCH_BYTES or self.is_solo(job):
                break
            batch.append(self.queue.popleft())
        return batch

    def _timeout(self, jobs: list[Job]) -> float | None:
        """Seconds a lone job may run: its own timeout, else the worker's."""
        if len(jobs) != 1:
            return None
        timeout = read_options(jobs[0]).get("timeout") if jobs[0].options else None
        if not valid_timeout(timeout):
            timeout = self.job_timeout
        return float(timeout) if timeout else None

    def _count_sized(self) -> None:
        self.queued_sized = sum(1 for job in self.queue if job.options and shape_of(job) is not None)

    def _start_sized(self, now: float) -> StartBatch:
        """
        Start the first queued sized job, alone, pinned to the least used
        of this worker's cores when it owns more than the job asked for
        (the cores go into the job's allocation, for its job process).
        """
        job, shape = next((job, shape_of(job)) for job in self.queue if job.options and shape_of(job))
        self.queue.remove(job)
        self.queued_sized -= 1
        cores: tuple[int, ...] = ()
        if len(self.cores) > shape.cpus:
            cores = tuple(sorted(sorted(self.cores, key=self.pinned.__getitem__)[: shape.cpus]))
            for core in cores:
                self.pinned[core] += 1
        options = read_options(job)
        options[ALLOCATION] = {**options.get(ALLOCATION, {}), "cores": list(cores), "cpus": shape.cpus}
        job = Job(job.client, job.seq, job.payload, encode_options(**options), job.func)
        return self._start([job], now, shape, cores)

    def _start(self, jobs: list[Job], now: float, shape: Shape | None = None, cores=()) -> StartBatch:
        batch = self._next_batch
        self._next_batch += 1
        cpus = 1 if shape is None else shape.cpus
        self.cpus_used += cpus
        # A lone job is never started again from here (L{batch_failed}): its
        # record leaves out the payload, so that once the job process has
        # it the worker holds no copy of it (a gigabyte argument is not
        # kept while its gigabyte result passes through).
        kept = tuple(jobs)
        if len(jobs) == 1:
            kept = (Job(jobs[0].client, jobs[0].seq, b"", jobs[0].options, jobs[0].func),)
        self.batches[batch] = Batch(kept, self.generation, now, cpus=cpus, cores=tuple(cores))
        for job in jobs:
            self.running_in[job.key] = batch
        self.running += len(jobs)
        return StartBatch(batch, tuple(jobs), self._timeout(jobs), self.generation)

    def _finished(self, batch: int, results: list[Result], now: float) -> list[Instruction]:
        running = self.batches.pop(batch)
        self.running -= len(running.jobs)
        self.cpus_used -= running.cpus
        for core in running.cores:
            self.pinned[core] -= 1
        if results:
            took = (now - running.started) / len(results)
            self.job_seconds = took if self.job_seconds is None else 0.8 * self.job_seconds + 0.2 * took
        for job in running.jobs:
            if self.running_in.get(job.key) == batch:
                del self.running_in[job.key]
        send = []
        kept = False
        for result in results:
            self.solo.discard(result.key)
            if result.key in running.cancelled:
                continue
            if len(result.payload) > self.max_payload:
                result = Result(
                    result.client,
                    result.seq,
                    Outcome.FAILED,
                    error_report(
                        ReportKind.PAYLOAD_TOO_LARGE,
                        too_big("the job's result", len(result.payload), self.max_payload),
                        host=self.host,
                    ),
                    result.stdout,
                    result.stderr,
                )
            if running.generation == self.generation:
                send.append(result)
            elif running.generation in self.lost_sessions and self.kept is not None:
                kept = (
                    self.kept.keep(self.lost_sessions[running.generation].get(result.client), result) or kept
                )
        if running.generation in self.lost_sessions and not any(
            b.generation == running.generation for b in self.batches.values()
        ):
            del self.lost_sessions[running.generation]
        # The job process answered for a whole batch: report it at once.
        out: list[Instruction] = [SendResults(tuple(send))]
        if kept:
            out.append(HandOver())
        return out + self.start_jobs(now)

    def _drained(self, how: str, kill: bool = False) -> list[Instruction]:
        if self.drained:
            return []
        self.drained = True
        if not kill:
            return [Drained(how)]
        self.generation += 1  # their results are not sent
        return [KillRunning(), Drained(how)]
