"""
The master's decisions, with no I/O.

L{Scheduler} holds the queue of pending jobs, the workers and their slots,
and which client owns which job.  The master's protocol objects feed it
events (a client arrived, jobs were submitted, a worker left, results came
back) and carry out what it returns (send these jobs to that worker, deliver
these results to that client).  Nothing here touches a socket, a clock or a
payload's contents, so every rule is tested directly in
L{cw.test.core.test_scheduler}.

Dispatch rules:
  - Jobs leave the queue round robin between clients with jobs queued
    (weighted), by priority then in FIFO order within a client
    (L{cw.core.fairqueue.FairQueue}): a small client is not stuck behind a big one.
  - A worker with C{slots} slots holds at most C{slots} plus its credit of
    prefetched jobs.  The credit is C{prefetch} per slot, or, once the
    worker's rate of completed jobs is known, as many jobs as it completes
    in C{horizon} seconds if that is more (up to C{MAX_CREDIT} per slot):
    a worker racing through tiny jobs holds enough of them that batches
    fill every hop, while a worker on slow jobs holds barely more than it
    runs, so it does not hoard the queue.  Free slots anywhere are filled
    before any worker gets prefetched jobs, so an idle worker is never
    starved by another's prefetch.  Prefetching also stops once a worker
    holds L{PREFETCH_BYTES} of payloads, so big jobs are not piled up
    (in memory) on one worker.
  - Many workers, short jobs: a client's jobs of one cached function (a
    I{kind}: same C{client} and C{func}) are known to be short once a
    worker reports more of them at once than it has slots: a worker
    batches jobs only once it measured them short (see
    L{cw.core.worker_state}: each batch holds at most L{BATCH_SECONDS} of
    work), so such a report bounds their time per job however long the
    hop took (L{KindTimes}; a busy master's round trips say nothing of a
    job's time, a worker's batching does).  While a kind is known short
    and was so reported within L{KIND_MEMORY}, a worker that takes one of
    its jobs into a free slot takes the next ones of that kind from the
    same client at once, as many as C{horizon} seconds hold per slot (at
    most L{MAX_CREDIT}): a box to it carries many jobs even while many
    workers are idle, where one job per connection would cost the master
    (and the worker) a box, a write and a read per job.  Every other job
    (another function, one not cached, a kind not reported batched lately)
    is spread one per free slot as above: a burst after short jobs of
    another kind, or after a quiet spell, is spread over the idle workers
    and the rest stays queued (where it can be cancelled).  A kind whose
    jobs a worker runs one by one while it holds more than its slots
    (they turned long: the report took longer than a batch and than the
    master's lag explains) is unknown again at once.  To find short kinds
    while many workers are idle (no worker would get two jobs in one box
    otherwise), a kind not known short whose jobs came back within
    C{horizon} each, as the master measures them (round trips included),
    goes two per slot: one job then waits at most that long behind
    another, where it might have gone to an idle worker.  So does a kind
    known short before a quiet spell, however long the round trips: a
    master busy with thousands of connections would otherwise spread a
    new burst of it one job to a box, and stay that busy.  (A master slowed
    down by thousands of connections measures long round trips: then the
    kind is found once more jobs are queued than workers are free, when
    the prefetch above puts two in a box, or while its round trips are no
    longer than a few of the master's lags, L{Scheduler.note_lag}: its
    results wait that long to be read whatever their run time, and spread
    one to a box over thousands of idle workers they would keep the
    master that busy; a probe makes one job wait at most that long.)
  - When a worker leaves, the jobs it held go back to the front of the queue
    in their original order.  A result from a worker that no longer holds the
    job (it left, or the job was requeued) is dropped, so each job's result is
    delivered at most once.
  - A worker gets no jobs of a client told to avoid it (L{Scheduler.avoid}:
    incompatible versions); they wait for other workers.
  - A worker that is stopping gracefully (draining) gets no more jobs; the
    unstarted jobs it returns go back to the front of the queue without
    counting an attempt.  So do the jobs it still holds when it leaves:
    they were killed by its drain timeout (or with it, if it was stopped
    outright), which says nothing against them.  One rule, whatever the
    timing: a job killed at the drain timeout that the worker hands back
    (L{return_jobs}) before its connection closes, and one it does not,
    are requeued alike (the master cannot tell a worker that drained and
    left from one lost while draining, and does not need to: a draining
    worker takes no new jobs, so a job can count no attempt this way only
    on workers already stopping).
  - When a client leaves, its queued jobs are dropped at once and results of
    its running jobs are discarded when they arrive.
  - Flow control: a client has room in the queue for C{max_queued_bytes}
    of payloads and C{max_queued_jobs} jobs, given when it registers; it
    sends only while room is left (so it overshoots by one job at most),
    and gets more once its queue, with the room it has not used yet, has
    come down to half the limits (L{Scheduler.take_room}).
  - Results a client does not read: while more than C{max_unsent_bytes}
    of results wait to be read by a client, its jobs are not dispatched;
    once it has read them down to half, they are.  A client that reads
    nothing for C{read_timeout} seconds while results wait is to be
    disconnected (L{Scheduler.unsent_results}).
  - Poison jobs: a job that was running on a worker when that worker was
    lost counts an attempt (unless the worker was draining, above).  After
    C{max_attempts} attempts (the job's own C{max_attempts} option, else
    the scheduler's) it is not requeued but fails with a C{WorkerLost}
    error report naming the hosts and how they were lost, made here
    without looking at the payload.  Which held jobs
    were running is inferred, not reported by the worker: a worker starts
    jobs in the order it was given them and reports each as it ends, so its
    C{slots} oldest held jobs are the running ones and the rest are
    prefetched, and only those count.  (A job that started while the result
    of its predecessor was on the wire is missed: an undercount, never an
    overcount.)
  - Deadlines (the master's own, whatever the worker does): a job with a
    C{timeout} option that a worker has been running (by the inference
    above) for C{timeout + deadline_grace} seconds without reporting it is
    taken back from that worker (its late result is dropped; the worker is
    told to kill it) and requeued, counting an attempt, or failed with a
    C{JobTimeout} report after C{max_attempts}.  If that worker has
    returned no result at all since the job started, it is stalled: it
    gets no more jobs and the master drops it (its other jobs go back as
    a lost worker's).  With C{stall_timeout}, a worker that holds jobs and
    returns no result for that long is stalled too, whatever its jobs'
    timeouts.  L{expire} makes these decisions for the time it is given.

  - Walltime: a worker with a known end (C{ends_at}, set by the adaptive
    pool from its launch's walltime; L{Scheduler.set_end}) is given no job
    whose expected duration is longer than what remains of its time.  A
    job's expected duration is its C{expected_duration} option, else the
    mean run time measured for its client's cached function (the jobs of
    one C{map}); a job with neither goes anywhere.  The job stays at the
    front of the queue for other workers, and that worker takes no more
    jobs in that round.  Run times are measured from the inferred start
    (below) to the result; L{job_seconds} is their moving mean over all
    jobs, which the adaptive pool counts queued work in.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

import collections
import enum
import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

from cw.core.config import MasterConfig
from cw.core.fairqueue import FairQueue
from cw.core.payload import payload_size, read_reference
from cw.core.records import (
    Job,
    Outcome,
    Output,
    Result,
    encode_options,
    error_report,
    read_options,
    valid_timeout,
)
from cw.core.resources import ALLOCATION, GPUS, Capacity, Ledger, Shape, shape_of
from cw.core.seqset import SeqSet
from cw.core.worker_state import BATCH_SECONDS
from cw.errors import ReportKind

#: The master's option defaults (C{--prefetch}, ...), which the scheduler's arguments share.
_DEFAULTS = MasterConfig()

#: Seconds over which a worker's rate of completed jobs is measured.
RATE_WINDOW = 0.1

#: Most prefetched jobs per slot that a worker's rate can earn it.
MAX_CREDIT = 256

#: A worker gets no more prefetched jobs once the payloads it holds add up
#: to this many bytes (it still gets one job per free slot, of any size).
PREFETCH_BYTES = 64 << 20

#: Seconds a kind of jobs (L{KindTimes}) stays known short after its last
#: batched report: after a quiet spell its next jobs are spread as unknown ones.
KIND_MEMORY = 1.0

#: Weight of a kind's earlier batched reports against its latest, per report.
KIND_DECAY = 0.75

#: A kind not known short is probed two to a slot while its round trips,
#: as the master measures them, are at most C{horizon} plus this many times
#: the master's lag (L{Scheduler.note_lag}): a result waits a turn or two of
#: a busy master's before it is read, and the lag is about half a turn.
LAG_ROUND_TRIPS = 4

#: Seconds in which the master's noted lag halves (L{Scheduler.note_lag}).
LAG_HALF_LIFE = 1.0


@dataclass(slots=True)
class KindTimes:
    """
    How long one client's jobs of one cached function take, per job and
    slot, as the workers' batched reports bound it (see
    L{Scheduler._time_kinds}).
    """

    #: Slot-seconds and jobs of the batched reports so far, earlier ones
    #: decayed by L{KIND_DECAY} per report.
    seconds: float = 0.0
    jobs: float = 0.0
    #: When the latest batched report came.
    heard: float = 0.0
    #: A worker ran them one by one since (L{Scheduler._time_kinds}): the
    #: kind is unknown until a batched report comes, which then counts
    #: with the earlier ones (decayed), so that it is known as before at once.
    lone: bool = False

    def add(self, seconds: float, jobs: int, now: float) -> None:
        """Count a batched report: C{jobs} jobs of this kind took at most C{seconds} slot-seconds."""
        self.seconds = self.seconds * KIND_DECAY + seconds
        self.jobs = self.jobs * KIND_DECAY + jobs
        self.heard = now

    @property
    def per_job(self) -> float:
        """Seconds a job takes, at most."""
        return self.seconds / self.jobs


class Turns:
    """
    Worker ids in turn order, each at most once: the workers that may have
    room, visited round robin by L{Scheduler.dispatch} (a worker found
    without room leaves; events that may give it room add it again), so
    that dispatching costs nothing for workers that have no room, and
    stops at the first workers that do once the queue is empty.
    """

    def __init__(self) -> None:
        self._order: collections.deque[int] = collections.deque()
        self._members: set[int] = set()

    def add(self, wid: int) -> None:
        """Add C{wid} at the end of the turns (if it is not in them)."""
        if wid not in self._members:
            self._members.add(wid)
            self._order.append(wid)

    def pop(self) -> int:
        """Take the worker whose turn it is."""
        wid = self._order.popleft()
        self._members.discard(wid)
        return wid

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, wid: int) -> bool:
        return wid in self._members


class UnknownPeer(KeyError):
    """An event named a client or worker that is not registered."""


@dataclass
class ClientRecord:
    """What the scheduler knows about one client."""

    id: int
    queued: int = 0
    running: int = 0
    submitted: int = 0
    completed: int = 0
    #: Room given to the client so far (bytes, jobs) and what it has sent
    #: (payload bytes, jobs): it may send while it has room left (see
    #: L{Scheduler.take_room}).
    granted_bytes: int = 0
    granted_jobs: int = 0
    received_bytes: int = 0
    received_jobs: int = 0
    #: Most bytes and jobs this client ever had queued at once.
    peak_queued_bytes: int = 0
    peak_queued: int = 0
    #: Bytes of results sent towards the client that it has not read yet,
    #: and the most it had read (see L{Scheduler.unsent_results}).
    unsent: int = 0
    read: int = 0
    #: When the client was last seen reading (or with nothing to read).
    last_read: float | None = None
    #: Its jobs are not dispatched until it reads its results.
    results_backed_up: bool = False
    #: Seqs of its jobs queued or held by a worker: a job with one of
    #: these seqs is a duplicate (L{Scheduler.submit}).
    live: SeqSet = field(default_factory=SeqSet)


@dataclass
class WorkerRecord:
    """
    What the scheduler knows about one worker (the master's view; the
    worker's own decisions are L{cw.core.worker_state.WorkerState}).
    """

    id: int
    slots: int
    prefetch: int
    #: How the worker is named in error reports (host:pid).
    name: str = ""
    #: Jobs this worker holds (running or prefetched), by job key, in the
    #: order they were assigned.
    held: dict[tuple[int, int], Job] = field(default_factory=dict)
    #: Bytes of the payloads in L{held}.
    held_bytes: int = 0
    #: Held jobs inferred to be running (its C{slots} oldest), by key: since
    #: when; and the deadlines of those that have a timeout.
    running_since: dict[tuple[int, int], float] = field(default_factory=dict)
    deadlines: dict[tuple[int, int], float] = field(default_factory=dict)
    #: When the worker last reported a result (of any kind), and since when
    #: it holds jobs (None: it holds none); times as given to the scheduler.
    last_result: float | None = None
    holding_since: float | None = None
    #: The worker made no progress in time (see L{Scheduler.expire}): it
    #: gets no more jobs and is to be dropped.
    stalled: bool = False
    completed: int = 0
    #: Jobs that ended in an error on this worker (raised, crashed, ...).
    failed: int = 0
    #: The worker is stopping gracefully: it gets no more jobs.
    draining: bool = False
    #: Jobs this worker completes per second (None: not measured yet), and
    #: the measurement under way: its start and the jobs completed since.
    rate: float | None = None
    window_start: float | None = None
    window_count: int = 0
    #: Prefetched jobs this worker may hold beyond its slots.
    credit: int = -1
    #: What the worker has (cores, memory, GPUs, ...; default: a core per
    #: slot) and what of it the jobs it holds took.
    resources: Capacity | None = None
    ledger: Ledger = field(init=False)
    #: The shapes of the sized jobs it holds, by key (plain jobs are not here).
    shapes: dict[tuple[int, int], Shape] = field(default_factory=dict)
    #: When this worker's walltime ends (None: no limit known); see L{Scheduler.set_end}.
    ends_at: float | None = None
    #: Clients whose jobs this worker is never given (L{Scheduler.avoid}).
    avoided: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.credit < 0:
            self.credit = self.prefetch
        if self.resources is None:
            self.resources = Capacity(cpus=self.slots)
        self.ledger = Ledger(self.resources)

    @property
    def capacity(self) -> int:
        return self.slots + self.credit

    def hold(self, job: Job) -> None:
        key = job.key
        self.held[key] = job
        self.held_bytes += payload_size(job.payload)
        shape = shape_of(job) if job.options else None
        if shape is None:
            self.ledger.plain += 1
        else:
            self.shapes[key] = shape
            self.ledger.take(key, shape)

    def stand_in(self, key: tuple[int, int], reference: bytes) -> None:
        """
        Let held job C{key} keep C{reference} (a
        L{cw.core.payload.reference} to bytes that can be had again) in
        place of its payload, so that its bytes need not be held here; it
        counts as many bytes (L{held_bytes} and the limits do not change).
        Nothing is done for a job not held, or holding a reference already.
        """
        job = self.held.get(key)
        if job is None or read_reference(job.payload) is not None:
            return
        if payload_size(reference) != payload_size(job.payload):
            raise ValueError(
                f"a stand-in for job {key}'s {payload_size(job.payload):,} bytes"
                f" stands for {payload_size(reference):,}"
            )
        job.payload = reference

    def release(self, key: tuple[int, int]) -> Job | None:
        job = self.held.pop(key, None)
        if job is not None:
            shape = self.shapes.pop(key, None) if self.shapes else None
            if shape is None:
                self.ledger.plain -= 1
            else:
                self.ledger.give_back(key, shape)
            self.held_bytes -= payload_size(job.payload)
            self.running_since.pop(key, None)
            self.deadlines.pop(key, None)
        return job

    def room(self, limit: str) -> bool:
        """Whether this worker takes another job: into a free slot, or prefetched."""
        if limit == "slots":
            return len(self.held) < self.slots
        return len(self.held) < self.capacity and self.held_bytes < PREFETCH_BYTES

    def observe(self, now: float, completed: int, horizon: float) -> None:
        """
        Count C{completed} jobs at time C{now}; at the end of each
        L{RATE_WINDOW}, update L{rate} and L{credit}.  A long quiet spell
        replaces the rate outright, so a worker that moved from tiny jobs
        to long ones loses its large credit at the next event.
        """
        if self.window_start is None:
            self.window_start = now
        self.window_count += completed
        elapsed = now - self.window_start
        if elapsed < RATE_WINDOW:
            return
        measured = self.window_count / elapsed
        if self.rate is None or elapsed > 10 * RATE_WINDOW:
            self.rate = measured
        else:
            self.rate = (self.rate + measured) / 2
        self.window_start, self.window_count = now, 0
        earned = math.ceil(self.rate * horizon)
        self.credit = max(self.prefetch, min(earned, MAX_CREDIT * self.slots))


@dataclass
class Expiry:
    """What L{Scheduler.expire} decided, for the master to carry out."""

    #: Jobs taken back from workers and requeued (each counted an attempt).
    requeued: list[Job] = field(default_factory=list)
    #: C{JobTimeout} results to deliver: jobs out of attempts.
    failed: list[Result] = field(default_factory=list)
    #: Per worker, the keys of the jobs taken back: it should kill them.
    cancel: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    #: Workers to drop (connection closed, jobs requeued), and why.
    stalled: dict[int, str] = field(default_factory=dict)
    #: Shapes newly found unschedulable, in words, to warn of once each.
    unschedulable: list[str] = field(default_factory=list)


class Unsent(str, enum.Enum):
    """What L{Scheduler.unsent_results} decided about a client's unread results."""

    #: Nothing changes.
    KEEP = ""
    #: Its results have been read down: its jobs may be dispatched again.
    RESUME = "resume"
    #: It has read nothing for too long: disconnect it.
    DROP = "drop"


class Scheduler:
    """
    Queue, slots and ownership for one master.

    @param prefetch: extra jobs a worker may hold per slot, beyond one
        running job per slot, so that it never waits on a round trip to the
        master between two short jobs.
    @param max_attempts: how many times a job may be running on a worker
        that is lost before it fails (jobs may set their own).
    @param horizon: seconds of work, at a worker's measured rate, that it
        may hold prefetched (0: only C{prefetch}).  Rates are measured only
        when L{complete} and L{dispatch} are given the time.
    @param deadline_grace: seconds past a job's own C{timeout} that a worker
        running it has to report it before it is taken back (see
        L{expire}); covers moving the job and its result, and the worker's
        own enforcement of the timeout.
    @param stall_timeout: seconds a worker holding jobs may return no
        result before it is stalled (0: no limit).  Deadlines and stalls
        are judged only for the times that L{dispatch}, L{complete} and
        L{expire} are given.
    @param reserve_after: seconds a sized job's shape may stay blocked
        (some worker could run it, none has room) before a worker is kept
        free for it (0: never; see L{_reserve}).
    @param unschedulable_timeout: seconds a shape that no connected worker
        could run may stay queued before its jobs fail (0: they wait).
    """

    def __init__(
        self,
        prefetch: int = _DEFAULTS.prefetch,
        max_attempts: int = _DEFAULTS.max_attempts,
        horizon: float = _DEFAULTS.prefetch_seconds,
        max_queued_bytes: int = _DEFAULTS.max_queued_bytes,
        max_queued_jobs: int = _DEFAULTS.max_queued_jobs,
        deadline_grace: float = _DEFAULTS.deadline_grace,
        stall_timeout: float = _DEFAULTS.stall_timeout,
        max_unsent_bytes: int = _DEFAULTS.max_unsent_bytes,
        read_timeout: float = _DEFAULTS.client_read_timeout,
        reserve_after: float = _DEFAULTS.reserve_after,
        unschedulable_timeout: float = _DEFAULTS.unschedulable_timeout,
    ) -> None:
        if reserve_after < 0 or unschedulable_timeout < 0:
            raise ValueError("reserve_after and unschedulable_timeout must be >= 0")
        self.reserve_after = reserve_after
        self.unschedulable_timeout = unschedulable_timeout
        #: Sized shapes that some worker could run, queued and started
        #: nowhere since when; the shape a worker is kept for, and which.
        self._blocked: dict[Shape, float] = {}
        self._reservation: tuple[Shape, int] | None = None
        #: Shapes no connected worker could run: since when; those warned of.
        self._infeasible: dict[Shape, float] = {}
        self._warned: set[Shape] = set()
        if max_queued_bytes < 1 or max_queued_jobs < 1:
            raise ValueError("max_queued_bytes and max_queued_jobs must be >= 1")
        if max_unsent_bytes < 1 or read_timeout <= 0:
            raise ValueError("max_unsent_bytes and read_timeout must be > 0")
        self.max_unsent_bytes = max_unsent_bytes
        self.read_timeout = read_timeout
        #: Clients whose jobs are not dispatched: their results back up.
        self._backed_up: set[int] = set()
        self.max_queued_bytes = max_queued_bytes
        self.max_queued_jobs = max_queued_jobs
        #: Clients whose queue shrank since L{take_room} last looked.
        self._shrunk: set[int] = set()
        if prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        if horizon < 0:
            raise ValueError("horizon must be >= 0")
        if deadline_grace < 0 or stall_timeout < 0:
            raise ValueError("deadline_grace and stall_timeout must be >= 0")
        self.deadline_grace = deadline_grace
        self.stall_timeout = stall_timeout
        #: Deadlines of running jobs: C{(deadline, worker, key)}, stale
        #: entries (the job ended or moved) skipped when they come up.
        self._deadlines: list[tuple[float, int, tuple[int, int]]] = []
        #: Workers whose held jobs changed since their running jobs were
        #: last tracked (see L{_track}).
        self._dirty: set[int] = set()
        self._compact_at = 1024
        self.horizon = horizon
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.prefetch = prefetch
        self.max_attempts = max_attempts
        #: For each job that outlived a lost worker: where and how, in order.
        self._losses: dict[tuple[int, int], list[str]] = {}
        self._queue = FairQueue()
        self._clients: dict[int, ClientRecord] = {}
        self._workers: dict[int, WorkerRecord] = {}
        self._next_client = 1
        self._next_worker = 1
        #: Workers that may have a free slot, and that may have room at all
        #: (a free slot or prefetch room), in turn order (see L{Turns}).
        self._free = Turns()
        self._ready = Turns()
        #: Workers visited by L{dispatch} so far: what a dispatch costs,
        #: for the tests (it does not grow with the workers that have no room).
        self.visits = 0
        self.completed = 0
        #: Moving mean of the jobs' measured run times (None: none measured
        #: yet), and the same per client and cached function.
        self.job_seconds: float | None = None
        self._func_seconds: dict[tuple[int, bytes], float] = {}
        #: How long each client's jobs of each cached function take (see
        #: the module docstring: short ones are packed).
        self._kinds: dict[tuple[int, bytes], KindTimes] = {}
        #: The master's largest lag lately and when it was noted (L{note_lag}).
        self._lag = 0.0
        self._lag_at = 0.0

    # -- clients ---------------------------------------------------------

    def add_client(self, weight: int = 1) -> int:
        """
        Register a client; return its id (never reused).  C{weight}: how
        many jobs it gets per turn when several clients have jobs queued.
        """
        cid = self._next_client
        self._next_client += 1
        self._queue.set_weight(cid, weight)
        self._clients[cid] = ClientRecord(
            cid, granted_bytes=self.max_queued_bytes, granted_jobs=self.max_queued_jobs
        )
        return cid

    def renew_room(self, client: int) -> None:
        """
        A new connection of C{client} (its session re-attached) starts with
        the full room its registration gives, whatever the jobs it already
        has queued: from now on it is given room as any client is.
        """
        state = self._client(client)
        state.granted_bytes = state.received_bytes + self.max_queued_bytes
        state.granted_jobs = state.received_jobs + self.max_queued_jobs

    def remove_client(self, client: int) -> int:
        """
        Forget a client: drop its queued jobs (returning how many) and make
        results of its running jobs undeliverable.
        """
        state = self._clients.pop(client, None)
        if state is None:
            raise UnknownPeer(client)
        self._shrunk.discard(client)
        self._backed_up.discard(client)
        for worker in self._workers.values():
            worker.avoided.discard(client)
        self._queue.forget(client)
        if self._losses:
            self._losses = {key: v for key, v in self._losses.items() if key[0] != client}
        if self._func_seconds:
            self._func_seconds = {key: v for key, v in self._func_seconds.items() if key[0] != client}
        if self._kinds:
            self._kinds = {key: v for key, v in self._kinds.items() if key[0] != client}
        return state.queued

    def has_jobs(self, client: int) -> bool:
        """Whether C{client} has jobs queued or held by workers (a client not registered has none)."""
        state = self._clients.get(client)
        return state is not None and bool(state.queued or state.running)

    def cancel(
        self, client: int, seqs: Iterable[int] | None = None
    ) -> tuple[int, dict[int, list[tuple[int, int]]]]:
        """
        Withdraw jobs of C{client} (C{seqs}, or all of them): queued ones are
        dropped, held ones are taken back from their workers at once (their
        slots are free again and a late result is ignored).  Return how many
        queued jobs were dropped and, per worker, the keys it must kill.
        """
        state = self._client(client)
        wanted = None if seqs is None else set(seqs)

        def hit(key: tuple[int, int]) -> bool:
            return key[0] == client and (wanted is None or key[1] in wanted)

        dropped = self._queue.remove(client, lambda job: hit(job.key))
        state.queued -= dropped
        if dropped:
            self._shrunk.add(client)
        kill: dict[int, list[tuple[int, int]]] = {}
        for worker in self._workers.values():
            keys = [key for key in worker.held if hit(key)]
            for key in keys:
                worker.release(key)
            if keys:
                kill[worker.id] = keys
                self._dirty.add(worker.id)
                self._wake(worker.id)
                state.running -= len(keys)
        if self._losses:
            self._losses = {key: v for key, v in self._losses.items() if not hit(key)}
        if wanted is None:
            state.live.clear()
        else:
            state.live -= wanted
        return dropped, kill

    def submit(self, client: int, jobs: Iterable[Job], refused: Iterable[Job] = ()) -> list[Result]:
        """
        Queue jobs from C{client}; each job's C{client} field is set here.
        C{refused}: jobs of the same batch that the master answered at once
        with an error; they used the client's room all the same.

        A job whose seq is that of a job of this client still queued or
        running is a duplicate (a client bug: two jobs, one key): it is not
        queued, and the returned failed results, one a duplicate, tell the
        client so.  The job already there runs on.  A client that
        reconnects resubmits its jobs with their old seqs as a new client,
        so that is not a duplicate.
        """
        state = self._client(client)
        n = size = 0
        duplicates: list[Result] = []
        for job in jobs:
            job.client = client
            if job.seq in state.live:
                state.received_jobs += 1
                size += payload_size(job.payload)
                self._shrunk.add(client)
                message = (
                    f"job {job.seq} was submitted while a job with the same number from this client"
                    " was still queued or running, so it was refused: each job needs a number of its"
                    " own (a bug in the client program; the first job runs on)"
                )
                duplicates.append(
                    Result(client, job.seq, Outcome.FAILED, error_report(ReportKind.DUPLICATE_JOB, message))
                )
                continue
            state.live.add(job.seq)
            self._queue.append(job)
            n += 1
            size += payload_size(job.payload)
        state.queued += n
        state.submitted += n
        for job in refused:
            state.received_jobs += 1
            size += payload_size(job.payload)
            self._shrunk.add(client)
        state.received_jobs += n
        state.received_bytes += size
        state.peak_queued = max(state.peak_queued, state.queued)
        state.peak_queued_bytes = max(state.peak_queued_bytes, self._queue.bytes_of(client))
        return duplicates

    # -- flow control ----------------------------------------------------
    #
    # A client may send jobs only while it has room: the master gives it
    # max_queued_bytes and max_queued_jobs when it registers, and more as
    # its jobs leave the queue.  The client stops sending once its room is
    # used up (it may overshoot by the one job that used the last of it),
    # so what reaches the master is bounded whatever the network's delay;
    # a client that ignores its room is stopped from sending at twice the
    # limits (L{over_hard_limit}).

    def _in_use(self, state: ClientRecord) -> tuple[int, int]:
        """Bytes and jobs queued, plus room given that the client has not used yet."""
        unused_bytes = max(0, state.granted_bytes - state.received_bytes)
        unused_jobs = max(0, state.granted_jobs - state.received_jobs)
        return self._queue.bytes_of(state.id) + unused_bytes, state.queued + unused_jobs

    def held(self, client: int) -> bool:
        """Whether C{client} has no room left: it holds further jobs back."""
        state = self._client(client)
        return state.granted_bytes <= state.received_bytes or state.granted_jobs <= state.received_jobs

    def take_room(self) -> list[tuple[int, int, int]]:
        """
        More room for clients whose queues shrank: C{(client, bytes, jobs)}
        for each that has come down to half its limits (in bytes or in
        jobs), enough to fill its queue to the limits again.  Recorded as
        given; the caller tells each client.
        """
        grants = []
        for cid in sorted(self._shrunk):
            state = self._clients[cid]
            in_bytes, in_jobs = self._in_use(state)
            more_bytes = max(0, self.max_queued_bytes - in_bytes)
            more_jobs = max(0, self.max_queued_jobs - in_jobs)
            if 2 * more_bytes >= self.max_queued_bytes or 2 * more_jobs >= self.max_queued_jobs:
                state.granted_bytes += more_bytes
                state.granted_jobs += more_jobs
                grants.append((cid, more_bytes, more_jobs))
        self._shrunk.clear()
        return grants

    # -- results a client does not read -----------------------------------
    #
    # The master reports, for each client, the bytes of results written
    # towards it that it has not read yet (still in the master's buffers)
    # and the running total it has read.  Over max_unsent_bytes unsent, the
    # client's jobs stay queued (they would only add results it cannot
    # take); once it has read them down to half, they go again.  A client
    # that reads nothing for read_timeout seconds while results wait is to
    # be disconnected: it is stopped (^Z) or hung, and its buffered results
    # would otherwise stay in the master's memory.

    def unsent_results(self, client: int, unsent: int, read: int, now: float) -> Unsent:
        """
        Record that C{unsent} bytes of results wait to be read by C{client},
        which has read C{read} bytes in all, at time C{now}.  Return
        L{Unsent.DROP} if it has read nothing for longer than C{read_timeout}
        while results waited, L{Unsent.RESUME} if its jobs may be dispatched
        again, else L{Unsent.KEEP}.
        """
        state = self._client(client)
        state.unsent = unsent
        if read > state.read or unsent == 0 or state.last_read is None:
            state.read = max(state.read, read)
            state.last_read = now
        elif now - state.last_read > self.read_timeout:
            return Unsent.DROP
        if unsent > self.max_unsent_bytes and not state.results_backed_up:
            state.results_backed_up = True
            self._backed_up.add(client)
        elif state.results_backed_up and 2 * unsent <= self.max_unsent_bytes:
            state.results_backed_up = False
            self._backed_up.discard(client)
            return Unsent.RESUME
        return Unsent.KEEP

    def stalled_for(self, client: int, now: float) -> float:
        """Seconds C{client} has read nothing while results waited for it (0: it reads)."""
        state = self._client(client)
        return 0.0 if state.last_read is None or not state.unsent else now - state.last_read

    def over_hard_limit(self, client: int) -> bool:
        """
        Whether C{client} has sent more than the limits beyond the room it
        was given (in bytes or in jobs), so that it has up to twice the
        limits queued: only a client that ignores its room gets there (or
        one whose single job is bigger than the limit), and the master
        stops reading from it until room is given again.  Jobs requeued
        from a lost worker do not count: they were sent within the room.
        """
        state = self._client(client)
        return (
            state.received_bytes - state.granted_bytes > self.max_queued_bytes
            or state.received_jobs - state.granted_jobs > self.max_queued_jobs
        )

    # -- workers ---------------------------------------------------------

    def add_worker(self, slots: int, name: str = "", capacity: Capacity | None = None) -> int:
        """
        Register a worker with C{slots} job slots (the most jobs it runs at
        once) and C{capacity} (default: a core per slot, nothing else);
        return its id.
        """
        if slots < 1:
            raise ValueError("a worker needs at least one slot")
        wid = self._next_worker
        self._next_worker += 1
        self._workers[wid] = WorkerRecord(
            wid, slots, self.prefetch * slots, name or f"worker {wid}", resources=capacity
        )
        self._wake(wid)
        return wid

    def avoid(self, client: int, worker: int) -> None:
        """
        Never give C{client}'s jobs to C{worker} (their versions are
        incompatible and the client asked to avoid such workers, see
        L{cw.core.versions}); its jobs wait for other workers.
        """
        self._client(client)
        self._worker(worker).avoided.add(client)

    def remove_worker(self, worker: int) -> list[Job]:
        """
        Forget a worker (see L{lose_worker}); return the jobs requeued.
        """
        return self.lose_worker(worker)[0]

    def lose_worker(self, worker: int, how: str = "lost") -> tuple[list[Job], list[Result]]:
        """
        Forget a worker.  Jobs it held go back to the front of the queue in
        their original order (those of departed clients are dropped), except
        running jobs that have now been lost C{max_attempts} times: those
        fail.  A draining worker's jobs count no attempt (see the module's
        docstring).  Return the requeued jobs and the failure results to
        deliver.

        @param how: how the worker was lost, for the error report.
        """
        state = self._workers.pop(worker, None)
        if state is None:
            raise UnknownPeer(worker)
        self._dirty.discard(worker)
        back: list[Job] = []
        failed: list[Result] = []
        for position, job in enumerate(state.held.values()):
            client = self._clients.get(job.client)
            if client is None:
                self._losses.pop(job.key, None)
                continue
            client.running -= 1
            # A stalled worker's window stopped moving when it stalled: jobs
            # behind the ones taken back from it never ran.
            if (
                not state.draining
                and position < state.slots
                and (not state.stalled or job.key in state.running_since)
            ):
                losses = self._losses.setdefault(job.key, [])
                losses.append(f"{state.name} ({how})")
                limit = self._max_attempts(job)
                if len(losses) >= limit:
                    del self._losses[job.key]
                    client.completed += 1
                    client.live.discard(job.seq)
                    self.completed += 1
                    failed.append(self._worker_lost(job, losses, limit))
                    continue
            client.queued += 1
            back.append(job)
        self._queue.push_front(back)
        return back, failed

    def return_jobs(self, worker: int, keys: Iterable[tuple[int, int]]) -> list[Job]:
        """
        C{worker} is draining (stopping gracefully): it gets no more jobs,
        and the jobs named by C{keys}, which it will not start, go back to
        the front of the queue in their original order without counting an
        attempt (they never ran).  Keys it does not hold are ignored (the
        job ended or was taken back meanwhile), as are jobs of departed
        clients.  Return the jobs requeued.
        """
        state = self._worker(worker)
        state.draining = True
        self._dirty.add(worker)
        wanted = set(keys)
        back: list[Job] = []
        for key in [key for key in state.held if key in wanted]:
            job = state.release(key)
            client = self._clients.get(job.client)
            if client is None:
                continue
            client.running -= 1
            client.queued += 1
            back.append(job)
        self._queue.push_front(back)
        return back

    def _max_attempts(self, job: Job) -> int:
        """The job's own C{max_attempts} option if valid, else the scheduler's."""
        limit = read_options(job).get("max_attempts") if job.options else None
        valid = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
        return limit if valid else self.max_attempts

    @staticmethod
    def _worker_lost(
        job: Job,
        losses: list[str],
        limit: int,
        kind: ReportKind = ReportKind.WORKER_LOST,
        what: str = "",
        **extra,
    ) -> Result:
        hosts = [loss.rsplit(" (", 1)[0] for loss in losses]
        what = what or f"the job was running on a worker that was lost {len(losses)} times"
        message = f"{what} (max_attempts={limit}), so it was given up: " + "; ".join(losses)
        report = error_report(kind, message, host=hosts[-1], hosts=hosts, attempts=len(losses), **extra)
        return Result(job.client, job.seq, Outcome.CRASHED, report)

    # -- the flow of jobs ------------------------------------------------

    def dispatch(self, now: float | None = None) -> list[tuple[int, list[Job]]]:
        """
        Take queued jobs for workers with room; return C{(worker, jobs)}
        pairs, at most one per worker.  Free slots are filled first, then
        prefetch room; workers take turns so that load spreads evenly.
        C{now} (seconds) lets workers' credit follow their rates.

        Sized jobs (see L{cw.core.resources}) go only to a free slot of a
        worker whose free capacity covers them now, never prefetched, and
        are sent with the GPU ids allocated to them.  A worker that could
        run a queued sized job gets no plain jobs prefetched, so its slots
        come free for it; one kept for a blocked shape (L{_reserve}) gets
        nothing but that shape's jobs until one starts there.
        """
        skip = self._backed_up
        if not (self._free or self._ready) or not self._dispatchable(skip):
            if now is not None:
                self._track(now)
            return []
        observe = now is not None and self.horizon
        shapes = self._queue.shape_counts() if self._queue.sized else {}
        if self._reservation and self._reservation[0] not in shapes:
            self._reservation = None  # its jobs went elsewhere, were cancelled or left
        reserved = self._reservation[1] if self._reservation else None
        placed: set[Shape] = set()
        assigned: dict[int, list[Job]] = {}
        for limit, turns in (("slots", self._free), ("capacity", self._ready)):
            # One job at a time per worker in turn, so that a short queue is
            # spread over all free workers rather than filling the first;
            # the workers in turn order (L{Turns}), each moved to the end
            # once visited, so that load spreads evenly.
            hungry = self._turns(turns, limit, now if observe else None, shapes)
            while self._dispatchable(skip):
                still = []
                for w in hungry:
                    if not self._dispatchable(skip):
                        break
                    # Clients this worker must not be given are passed over for it alone.
                    mine = (skip | w.avoided) if w.avoided else skip
                    if mine is not skip and not self._dispatchable(mine):
                        continue
                    if (
                        not self._queue.sized
                        and w.id != reserved
                        and (limit == "capacity" or w.ledger.cpus > w.ledger.plain)
                    ):
                        job, shape = self._queue.popleft(mine), None
                    else:
                        found = self._queue.pop_fitting(self._fits(w, limit), mine)
                        if found is None:
                            continue
                        job, shape = found
                    if (
                        w.ends_at is not None
                        and now is not None
                        and not self._fits_walltime(job, w.ends_at - now)
                    ):
                        self._queue.push_front([job])
                        continue
                    w.hold(job)
                    if shape is not None:
                        job = w.held[job.key] = self._allocated(job, w.ledger.given[job.key])
                        placed.add(shape)
                        if w.id == reserved:
                            self._reservation = reserved = None
                    self._assign(w, job, assigned)
                    if (
                        shape is None
                        and limit == "slots"
                        and now is not None
                        and job.func
                        and not self._queue.sized
                    ):
                        # Short jobs of its kind come along (not where a
                        # queued sized job could use the slots).
                        self._take_pack(w, job, now, assigned)
                    if w.room(limit):
                        still.append(w)
                if not still:
                    break
                hungry = still
        if shapes and now is not None:
            self._reserve(now, placed)
        self._dirty.update(assigned)
        if now is not None:
            self._track(now)
        return list(assigned.items())

    def _assign(self, w: WorkerRecord, job: Job, assigned: dict[int, list[Job]]) -> None:
        """Count C{job}, just held by C{w}, as running for its client, and add it to C{w}'s box."""
        assigned.setdefault(w.id, []).append(job)
        client = self._clients[job.client]
        client.queued -= 1
        client.running += 1
        self._shrunk.add(job.client)

    def note_lag(self, seconds: float, now: float) -> None:
        """
        The master's timers ran C{seconds} late at C{now}: its own load
        delays every round trip about that much (a busy master reads a
        result a turn or two after it came).  The largest lag lately
        counts (it halves every L{LAG_HALF_LIFE} seconds): see L{lag}.
        """
        if seconds >= self.lag(now):
            self._lag, self._lag_at = seconds, now

    def lag(self, now: float) -> float:
        """The master's lag at C{now}, as noted lately (L{note_lag}), decayed."""
        if not self._lag:
            return 0.0
        return self._lag * 0.5 ** (max(0.0, now - self._lag_at) / LAG_HALF_LIFE)

    def pack_size(self, job: Job, now: float) -> int:
        """
        How many jobs of C{job}'s kind (its client's jobs of its cached
        function) a worker may take per slot at once, at time C{now}: as
        many as C{horizon} seconds hold at their time per job (at most
        L{MAX_CREDIT}), if a batched report of them came within
        L{KIND_MEMORY}; else 2 (a probe) if they were known short before
        (at 2 per slot) or if their mean run time, as measured from the
        master (round trips included), is at most C{horizon} plus
        L{LAG_ROUND_TRIPS} times the master's lag (L{note_lag}); else 1
        (see the module docstring).
        """
        if not job.func:
            return 1
        key = (job.client, job.func)
        kind = self._kinds.get(key)
        if kind is None or kind.lone or now - kind.heard > KIND_MEMORY:
            if kind is not None and not kind.lone and kind.per_job * 2 <= self.horizon:
                # Short when last seen: probed again, however long the
                # master's round trips (it may be the busy one).
                return 2
            probe = self.horizon + LAG_ROUND_TRIPS * self.lag(now)
            return 2 if self._func_seconds.get(key, math.inf) <= probe else 1
        per_job = kind.per_job
        if per_job * 2 > self.horizon:
            return 1
        if per_job * MAX_CREDIT <= self.horizon:
            return MAX_CREDIT
        return max(1, int(self.horizon / per_job))

    def _take_pack(self, w: WorkerRecord, first: Job, now: float, assigned: dict[int, list[Job]]) -> None:
        """
        C{w} took C{first} into a free slot: give it the next queued jobs
        of the same kind (same client and function) while they are known
        to be short, up to L{pack_size} per slot.
        """
        pack = self.pack_size(first, now)
        if pack < 2:
            return
        most = w.slots * pack
        while len(w.held) < most and w.held_bytes < PREFETCH_BYTES:
            job = self._queue.pop_like(first)
            if job is None:
                return
            if w.ends_at is not None and not self._fits_walltime(job, w.ends_at - now):
                self._queue.push_front([job])
                return
            w.hold(job)
            self._assign(w, job, assigned)

    def _wake(self, wid: int) -> None:
        """Worker C{wid} may have room now (it joined, or jobs left it): give it turns."""
        self._free.add(wid)
        self._ready.add(wid)

    def _turns(
        self, turns: Turns, limit: str, now: float | None, shapes: dict[Shape, int]
    ) -> Iterable[WorkerRecord]:
        """
        The workers of C{turns} that have room by C{limit}, each once, in
        turn order, lazily: a dispatch that runs out of jobs visits no more
        of them.  Each visited worker goes to the end of its turns, or
        leaves them if it has no room (by C{limit}; draining, stalled or
        gone).  C{now}: its rate is observed first (see
        L{WorkerRecord.observe}).
        """
        for _ in range(len(turns)):
            wid = turns.pop()
            self.visits += 1
            w = self._workers.get(wid)
            if w is None or w.draining or w.stalled:
                continue
            if now is not None:
                w.observe(now, 0, self.horizon)
            if not w.room(limit):
                continue
            turns.add(wid)
            # No prefetching where a queued sized job could run.
            if limit == "capacity" and shapes and any(w.ledger.could_run(shape) for shape in shapes):
                continue
            yield w

    def _fits(self, w: WorkerRecord, limit: str) -> Callable[[Shape | None], bool]:
        """Which shapes worker C{w} takes now, into a free slot or prefetched."""
        if self._reservation and self._reservation[1] == w.id:
            wanted = self._reservation[0]
            return lambda shape: shape == wanted and limit == "slots" and w.ledger.fits(shape)
        if limit == "capacity":
            return lambda shape: shape is None
        return w.ledger.fits

    @staticmethod
    def _allocated(job: Job, gpus: tuple[str, ...]) -> Job:
        """C{job} with the GPU ids allocated to it added to its options, for the worker."""
        options = read_options(job)
        options[ALLOCATION] = {GPUS: list(gpus)}
        return Job(job.client, job.seq, job.payload, encode_options(**options), job.func)

    def _reserve(self, now: float, placed: set[Shape]) -> None:
        """
        Against starvation (as SLURM's backfill does): a sized shape that
        some worker could run but that has started nowhere for
        C{reserve_after} seconds gets a worker kept for it (the one that
        holds the fewest jobs), which takes no other job until one of that
        shape starts there.
        """
        queued = self._queue.shape_counts()
        live = [w for w in self._workers.values() if not (w.draining or w.stalled)]
        blocked = self._blocked
        for shape in list(blocked):
            if shape not in queued or shape in placed:
                del blocked[shape]
        for shape in queued:
            if shape not in blocked and any(w.ledger.could_run(shape) for w in live):
                blocked[shape] = now
        if self._reservation is not None:
            shape, wid = self._reservation
            w = self._workers.get(wid)
            if shape in blocked and w is not None and not (w.draining or w.stalled):
                return
            self._reservation = None
        if not self.reserve_after or not blocked:
            return
        shape, since = min(blocked.items(), key=lambda item: item[1])
        if now - since < self.reserve_after:
            return
        candidates = [w for w in live if w.ledger.could_run(shape)]
        if candidates:
            w = min(candidates, key=lambda w: (len(w.held), w.id))
            self._reservation = (shape, w.id)

    def unschedulable(self) -> dict[Shape, int]:
        """
        Queued sized jobs, by shape, that no connected worker could ever run
        (too big, or a tag none has).  Empty while no worker is connected:
        workers may still be starting.
        """
        live = [w for w in self._workers.values() if not (w.draining or w.stalled)]
        if not live or not self._queue.sized:
            return {}
        return {
            shape: n
            for shape, n in self._queue.shape_counts().items()
            if not any(w.ledger.could_run(shape) for w in live)
        }

    def set_end(self, worker: int, ends_at: float | None) -> None:
        """Note when C{worker}'s walltime ends (None: not known): see the module docstring."""
        state = self._workers.get(worker)
        if state is not None:
            state.ends_at = ends_at

    def expected_seconds(self, job: Job) -> float | None:
        """How long C{job} is expected to run: its option, else its map's measured mean."""
        if job.options and b"expected_duration" in job.options:
            value = read_options(job).get("expected_duration")
            if valid_timeout(value):
                return float(value)
        if job.func:
            return self._func_seconds.get((job.client, job.func))
        return None

    def _fits_walltime(self, job: Job, left: float) -> bool:
        expected = self.expected_seconds(job)
        return expected is None or expected <= left

    def _measure(self, job: Job, seconds: float) -> None:
        """Fold one job's run time into the moving means (weight 1/16 each)."""
        mean = self.job_seconds
        self.job_seconds = seconds if mean is None else mean + (seconds - mean) / 16
        if job.func:
            key = (job.client, job.func)
            mean = self._func_seconds.get(key)
            self._func_seconds[key] = seconds if mean is None else mean + (seconds - mean) / 16

    def _dispatchable(self, skip: set[int]) -> bool:
        """Whether a queued job may go, its client's results not backed up."""
        if not skip:
            return bool(self._queue)
        return self._queue.next_client(skip) is not None

    def holds(self, worker: int, key: tuple[int, int]) -> bool:
        """Whether C{worker} holds the job C{key} and its client is still here (its result is wanted)."""
        state = self._workers.get(worker)
        return state is not None and key in state.held and key[0] in self._clients

    def holding(self, worker: int, outputs: Iterable[Output]) -> list[Output]:
        """
        Of C{outputs} (what running jobs wrote, reported by C{worker}), those
        of jobs C{worker} holds whose client is still here: the ones to pass
        on.
        """
        state = self._workers.get(worker)
        if state is None:
            return []
        held = state.held
        return [output for output in outputs if output.key in held and output.client in self._clients]

    def complete(self, worker: int, results: Iterable[Result], now: float | None = None) -> list[Result]:
        """
        Record results reported by C{worker} (at time C{now}, if given, to
        measure its rate).  Return those to deliver to their clients:
        results for jobs this worker does not hold, or whose client has
        left, are dropped.
        """
        state = self._worker(worker)
        before = state.completed
        results = list(results)
        if now is not None:
            # How many results of each kind (client, cached function).
            kinds: dict[tuple[int, bytes], int] = {}
            reported = 0
            for result in results:
                job = state.held.get(result.key)
                if job is None:
                    continue
                reported += 1
                since = state.running_since.get(result.key)
                if since is not None:
                    self._measure(job, now - since)
                if job.func:
                    key = (job.client, job.func)
                    kinds[key] = kinds.get(key, 0) + 1
            if kinds:
                self._time_kinds(state, kinds, len(state.held) - reported, now)
        deliver = self._complete(state, results)
        self._wake(worker)
        if now is not None:
            if self.horizon:
                state.observe(now, state.completed - before, self.horizon)
            if results:
                state.last_result = now
            self._dirty.add(worker)
            self._track(now)
        return deliver

    def _time_kinds(
        self, state: WorkerRecord, kinds: dict[tuple[int, bytes], int], left: int, now: float
    ) -> None:
        """
        Time the kinds of jobs of one report of C{state}'s, given as
        C{kind: n} results, after which it holds C{left} jobs.  More
        results of a kind than the worker has slots were batched: they took
        at most L{BATCH_SECONDS} per slot (what a worker puts in a batch),
        and at most the time since its previous report (or since it was
        given jobs, if later); L{KindTimes} counts that.  No more than its
        slots, while it still holds more jobs than it has slots: it ran
        them one by one (they are long, or it does not know them yet), so
        the kind is unknown again until a batched report (L{KindTimes.lone}),
        if the report took longer than a batch
        holds and the master's lag explains (a job of a box that came
        before the box of those still held comes back alone, however
        short).  Otherwise the report tells nothing (a
        round trip of a lone job says nothing of its time when the master
        is busy).
        """
        starts = [t for t in (state.last_result, state.holding_since) if t is not None]
        took = now - max(starts) if starts else math.inf
        busy = took * state.slots
        # Run one by one only if it took longer than a batch would, and
        # than the master's lag explains (L{note_lag}): a lone job from a
        # box that the worker got before the box of the jobs it still holds
        # comes back alone, however short.
        crowded = left > state.slots and took > BATCH_SECONDS + LAG_ROUND_TRIPS * self.lag(now)
        for key, n in kinds.items():
            if n > state.slots:
                kind = self._kinds.get(key)
                if kind is None:
                    kind = self._kinds[key] = KindTimes()
                kind.lone = False
                kind.add(min(busy, BATCH_SECONDS * state.slots), n, now)
            elif crowded and key in self._kinds:
                self._kinds[key].lone = True

    def _complete(self, state: WorkerRecord, results: Iterable[Result]) -> list[Result]:
        deliver = []
        for result in results:
            if state.release(result.key) is None:
                continue
            if self._losses:
                self._losses.pop(result.key, None)
            state.completed += 1
            if result.status != Outcome.OK:
                state.failed += 1
            self.completed += 1
            client = self._clients.get(result.client)
            if client is None:
                continue
            client.running -= 1
            client.completed += 1
            client.live.discard(result.seq)
            deliver.append(result)
        return deliver

    # -- deadlines -------------------------------------------------------

    def _track(self, now: float) -> None:
        """
        For each worker whose held jobs changed, note which of them it now
        runs (its C{slots} oldest) from C{now} on, and the deadlines of
        those that have a timeout.
        """
        for wid in self._dirty:
            state = self._workers.get(wid)
            if state is None or state.stalled:
                continue
            if not state.held:
                state.holding_since = None
                continue
            if state.holding_since is None:
                state.holding_since = now
            for key in islice(state.held, state.slots):
                if key in state.running_since:
                    continue
                state.running_since[key] = now
                job = state.held[key]
                if not job.options:
                    continue
                timeout = read_options(job).get("timeout")
                if valid_timeout(timeout):
                    deadline = now + timeout + self.deadline_grace
                    state.deadlines[key] = deadline
                    heapq.heappush(self._deadlines, (deadline, wid, key))
        self._dirty.clear()
        if len(self._deadlines) > self._compact_at:
            # Mostly entries of jobs that ended in time: rebuild from the live ones.
            self._deadlines = [(d, w.id, k) for w in self._workers.values() for k, d in w.deadlines.items()]
            heapq.heapify(self._deadlines)
            self._compact_at = max(1024, 2 * len(self._deadlines))

    def expire(self, now: float) -> Expiry:
        """
        Enforce deadlines at time C{now} (see the module docstring): take
        back the jobs that ran past their timeout plus C{deadline_grace}
        without a result, requeueing them (an attempt each) or failing
        them with C{JobTimeout}; stall the workers that returned no result
        since such a job started, or (with C{stall_timeout}) for too long.
        A stalled worker gets no more jobs; the caller drops it, and its
        remaining jobs come back through L{lose_worker}.
        """
        self._track(now)
        out = Expiry()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, wid, key = heapq.heappop(self._deadlines)
            state = self._workers.get(wid)
            if state is None or state.stalled or state.deadlines.get(key) != deadline:
                continue  # stale: the job ended or moved, or its worker is being dropped
            start = state.running_since[key]
            job = state.release(key)
            self._dirty.add(wid)
            self._wake(wid)
            out.cancel.setdefault(wid, []).append(key)
            ran, timeout = now - start, deadline - start - self.deadline_grace
            if state.last_result is None or state.last_result < start:
                state.stalled = True
                out.stalled[wid] = (
                    f"it returned no result for {ran:.1f} s, though it was running a job with a"
                    f" timeout of {timeout:g} s (deadline grace {self.deadline_grace:g} s)"
                )
            client = self._clients.get(job.client)
            if client is None:
                continue
            client.running -= 1
            losses = self._losses.setdefault(key, [])
            losses.append(f"{state.name} (no result {ran:.1f} s after the job started)")
            limit = self._max_attempts(job)
            if len(losses) >= limit:
                del self._losses[key]
                client.completed += 1
                client.live.discard(job.seq)
                self.completed += 1
                what = (
                    f"the job has a timeout of {timeout:g} s, and {len(losses)} times its worker did not"
                    f" report it within {self.deadline_grace:g} s more (the master's --deadline-grace)"
                )
                out.failed.append(
                    self._worker_lost(job, losses, limit, ReportKind.JOB_TIMEOUT, what, timeout=timeout)
                )
                continue
            client.queued += 1
            out.requeued.append(job)
        if self.stall_timeout:
            for state in self._workers.values():
                if state.stalled or state.holding_since is None:
                    continue
                since = max(state.holding_since, state.last_result or state.holding_since)
                if now - since > self.stall_timeout:
                    state.stalled = True
                    out.stalled[state.id] = (
                        f"it held jobs and returned no result for {now - since:.1f} s"
                        f" (--stall-timeout {self.stall_timeout:g} s)"
                    )
        self._queue.push_front(out.requeued)
        self._expire_unschedulable(now, out)
        self._track(now)
        return out

    def _expire_unschedulable(self, now: float, out: Expiry) -> None:
        """
        Note the shapes no connected worker could run (a warning for each
        the first time), and fail their jobs once they have been so for
        C{unschedulable_timeout} seconds.
        """
        infeasible = self.unschedulable()
        for shape in list(self._infeasible):
            if shape not in infeasible:
                del self._infeasible[shape]
        if not infeasible:
            return
        have = "; ".join(sorted({w.resources.describe() for w in self._workers.values()}))
        expired = set()
        for shape, n in infeasible.items():
            since = self._infeasible.setdefault(shape, now)
            if shape not in self._warned:
                self._warned.add(shape)
                out.unschedulable.append(
                    f"{n} jobs ask for {shape.describe()}, which no connected worker has"
                    f" (workers have: {have}); they stay queued"
                    + (
                        f" for {self.unschedulable_timeout:g} s (--unschedulable-timeout)"
                        if self.unschedulable_timeout
                        else " until such a worker joins"
                    )
                )
            if self.unschedulable_timeout and now - since >= self.unschedulable_timeout:
                expired.add(shape)
        if not expired:
            return
        for job in self._queue.remove_shapes(expired):
            client = self._clients.get(job.client)
            if client is None:
                continue
            client.queued -= 1
            client.completed += 1
            client.live.discard(job.seq)
            self.completed += 1
            self._shrunk.add(job.client)
            shape = shape_of(job)
            message = (
                f"job {job.seq} asks for {shape.describe()}, and no connected worker had that"
                f" for {now - self._infeasible[shape]:.0f} s (the master's --unschedulable-timeout):"
                f" workers have {have}; start a worker with such --cpus/--memory/--gpus/--resource/--tag,"
                " or ask for less"
            )
            report = error_report(ReportKind.UNSCHEDULABLE, message, resources=shape.describe())
            out.failed.append(Result(job.client, job.seq, Outcome.FAILED, report))

    # -- inspection ------------------------------------------------------

    @property
    def queued(self) -> int:
        """Number of jobs waiting for a worker."""
        return len(self._queue)

    def queued_shapes(self) -> tuple[int, dict[Shape, int]]:
        """The queued jobs: how many plain ones, and the sized ones by shape (for adaptive pools)."""
        shapes = self._queue.shape_counts()
        return len(self._queue) - sum(shapes.values()), shapes

    def queued_bytes(self, client: int) -> int:
        """Bytes of the payloads of C{client}'s jobs waiting for a worker."""
        return self._queue.bytes_of(client)

    def worker(self, worker: int) -> WorkerRecord:
        return self._worker(worker)

    def workers(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def client(self, client: int) -> ClientRecord:
        return self._client(client)

    def clients(self) -> list[ClientRecord]:
        return list(self._clients.values())

    def _client(self, client: int) -> ClientRecord:
        try:
            return self._clients[client]
        except KeyError:
            raise UnknownPeer(client) from None

    def _worker(self, worker: int) -> WorkerRecord:
        try:
            return self._workers[worker]
        except KeyError:
            raise UnknownPeer(worker) from None
