"""
Adaptive pools: when to start and stop worker jobs, with no I/O.

A pool is the set of worker jobs one launcher started for the master (local
processes, or SLURM jobs).  L{ScalingPolicy.decide} is handed a
L{PoolView} (the queue, the connected workers, the launches as the
launcher last saw them, the time) and answers with L{Submit}, L{Drain} and
L{Cancel} decisions, each with its reason; the scaling service
(L{cw.master.scaling}) carries them out.  The rules:

  - B{Scale up} when the queued work, in slot-seconds (queued jobs times
    their measured mean duration; each job a whole slot while no duration
    is measured yet), is more than the capacity not busy now will do within
    C{horizon} seconds.  Capacity counts the connected workers and the
    launches on their way (pending in SLURM's queue, or started but not yet
    connected), so a pending job is never submitted twice.  Never more
    than C{max_workers} launches (a walltime replacement may exceed it by
    the workers it replaces, briefly), never more than C{max_submit} per
    C{submit_interval} seconds.
  - B{At least C{min_workers}} launches, always.
  - B{Scale down} only workers that have held no job for C{idle_timeout}
    seconds, while nothing is queued, down to C{min_workers}: they are
    drained (L{Drain}; a draining worker hands back unstarted jobs and
    finishes running ones), never killed, at most C{max_cancel} per
    C{cancel_interval}.  Launches still pending are cancelled when nothing
    has been queued or running for C{idle_timeout}.  Scaling up needs queued work
    and scaling down needs an empty queue and idle workers, so the two
    never alternate on a steady load (hysteresis).
  - B{Pending too long}: a launch pending for C{pending_timeout} seconds
    is cancelled (L{Cancel} with C{retry}); the scale-up rule then submits
    another if the work still needs it.
  - B{Walltime}: a launch with a known end gets its replacement submitted
    C{replace_lead} seconds, plus the longest wait seen so far from a
    submission to its worker's connection, before its end (if the pool
    still needs it: work queued or held, or the pool at its minimum); at
    C{drain_lead} seconds before its end it is drained (SLURM's
    C{--signal} usually did so already).
  - B{Several pools} (C{--pool gpu:min=0,max=4,...}): each pool has its own
    policy and sees only its own workers and its share of the queue,
    L{route_queued}: every queued job counts toward exactly one pool, the
    pool with the fewest resources (GPUs, then tags, then custom
    resources, then cores, then memory; then the order given) whose
    workers could run it.  So plain jobs scale the plainest pool, a
    GPU-tagged job only a pool with GPUs and that tag; a job no pool
    could run scales none (the master reports it unschedulable).  A job
    counts as the share of a worker's slots it takes (a 1-GPU job on an
    8-core, 1-GPU worker counts 8 slots), so the pool is sized by the
    resource the job runs out first.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cw.core.resources import Capacity, Ledger, Shape

#: Default seconds a worker may stay idle before the pool drains it (C{--idle-timeout}).
IDLE_TIMEOUT = 180.0

#: Default seconds within which the pool wants queued work done ("soon").
HORIZON = 60.0

#: Default seconds a launch may wait in the batch queue before it is
#: cancelled and submitted again.
PENDING_TIMEOUT = 1800.0

#: Default seconds before a launch's walltime end at which its replacement
#: is submitted (plus the queue wait seen so far), and at which it drains.
REPLACE_LEAD = 300.0
DRAIN_LEAD = 120.0

#: Default seconds between two looks at the batch system (one C{squeue} each).
POLL_INTERVAL = 30.0

#: Recent decisions kept for the status.
HISTORY = 50


@dataclass(frozen=True)
class PoolBounds:
    """The rules' parameters (see the module docstring)."""

    min_workers: int = 0
    max_workers: int = 1
    idle_timeout: float = IDLE_TIMEOUT
    #: Slots a worker is expected to have before any has connected.
    slots: int = 1
    horizon: float = HORIZON
    pending_timeout: float = PENDING_TIMEOUT
    max_submit: int = 64
    submit_interval: float = 10.0
    max_cancel: int = 64
    cancel_interval: float = 10.0
    replace_lead: float = REPLACE_LEAD
    drain_lead: float = DRAIN_LEAD

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise ValueError(
                f"need 0 <= min_workers <= max_workers and max_workers >= 1,"
                f" not {self.min_workers} and {self.max_workers}"
            )
        if self.idle_timeout < 0 or self.horizon <= 0 or self.slots < 1:
            raise ValueError("idle_timeout must be >= 0, horizon > 0 and slots >= 1")


@dataclass(frozen=True)
class Launch:
    """One worker job of the pool, as the launcher last saw it."""

    id: str
    #: When it was submitted, when it started running (None: pending), and
    #: when its walltime ends (None: no limit, or not known).
    submitted: float
    started: float | None = None
    ends_at: float | None = None
    #: The pool told it to drain (or cancelled it): it is on its way out.
    draining: bool = False


@dataclass(frozen=True)
class Worker:
    """One connected worker, as the master's scheduler sees it."""

    id: int
    #: The launch it belongs to (None: a worker the pool did not start).
    launch: str | None
    slots: int
    #: Jobs it holds (running or prefetched).
    held: int = 0
    #: Since when it holds no job (None: it holds some).
    idle_since: float | None = None
    draining: bool = False


@dataclass(frozen=True)
class PoolView:
    """What the policy decides from: the queue, the workers, the launches, the time."""

    now: float
    #: Jobs queued at the master (not on any worker).
    queued: int = 0
    #: Mean measured duration of a job, in seconds (None: none measured yet).
    job_seconds: float | None = None
    workers: tuple[Worker, ...] = ()
    launches: tuple[Launch, ...] = ()


@dataclass(frozen=True)
class Submit:
    """Submit C{count} new launches (one worker each)."""

    count: int
    reason: str
    #: The launch these replace ahead of its walltime, if that is why.
    replaces: str | None = None


@dataclass(frozen=True)
class Drain:
    """Drain the launch C{launch} (its worker C{worker}, if connected): it ends once drained."""

    launch: str
    reason: str
    worker: int | None = None


@dataclass(frozen=True)
class Cancel:
    """Cancel the launch C{launch}, which runs no job (pending, or never connected)."""

    launch: str
    reason: str
    #: Cancelled for having waited too long; the work may submit another.
    retry: bool = False


Decision = Submit | Drain | Cancel


@dataclass
class _Window:
    """Counts of actions over a sliding window of C{seconds}."""

    seconds: float
    events: deque = field(default_factory=deque)

    def used(self, now: float) -> int:
        while self.events and self.events[0][0] <= now - self.seconds:
            self.events.popleft()
        return sum(n for _, n in self.events)

    def add(self, now: float, n: int) -> None:
        if n:
            self.events.append((now, n))


class ScalingPolicy:
    """
    The pool's decisions (see the module docstring).  It remembers only
    what the view cannot tell: recent actions (for the rate limits), which
    launches were replaced, the queue waits seen, since when the queue is
    empty, and the recent decisions with their time (L{history}).
    """

    def __init__(self, bounds: PoolBounds) -> None:
        self.bounds = bounds
        #: Workers the pool wants now (for the status).
        self.target = bounds.min_workers
        #: C{(time, decision)} of recent decisions, newest last.
        self.history: deque[tuple[float, Decision]] = deque(maxlen=HISTORY)
        self._submits = _Window(bounds.submit_interval)
        self._cancels = _Window(bounds.cancel_interval)
        #: Launches replaced ahead of their walltime: by id, the time.
        self._replaced: dict[str, float] = {}
        #: Longest wait between a launch's submission and its worker's
        #: connection seen so far, and the launches seen connected.
        self.queue_wait = 0.0
        self._joined: set[str] = set()
        #: Since when nothing is queued and no worker holds a job.
        self._empty_since: float | None = None

    def decide(self, view: PoolView) -> list[Decision]:
        """The decisions for C{view}; the caller carries them out before the next call."""
        b, now = self.bounds, view.now
        decisions: list[Decision] = []
        known = {launch.id for launch in view.launches}
        for gone in set(self._replaced) - known:
            del self._replaced[gone]
        if view.queued or any(w.held for w in view.workers):
            self._empty_since = None
        elif self._empty_since is None:
            self._empty_since = now
        workers_of: dict[str, list[Worker]] = {}
        for w in view.workers:
            if w.launch is not None:
                workers_of.setdefault(w.launch, []).append(w)
        # The wait that counts is from submission until the worker connects
        # (the batch queue, then the worker's start-up).
        waiting = []
        for launch in view.launches:
            if launch.id in workers_of:
                if launch.id not in self._joined:
                    self._joined.add(launch.id)
                    self.queue_wait = max(self.queue_wait, now - launch.submitted)
            elif not launch.draining:
                waiting.append(now - launch.submitted)
        self._joined &= known
        wait = max([self.queue_wait, *waiting])
        live = [x for x in view.launches if not x.draining]

        # Walltime: drain at the end, replace ahead of it.
        for launch in list(live):
            if launch.ends_at is None or launch.started is None:
                continue
            left = launch.ends_at - now
            if left <= b.drain_lead:
                why = f"walltime ends in {left:.0f} s"
                decisions.append(Drain(launch.id, why, self._worker(workers_of, launch)))
                live.remove(launch)
            elif launch.id not in self._replaced and left <= b.replace_lead + wait:
                busy = any(w.held for w in workers_of.get(launch.id, ()))
                if view.queued or busy or len(live) <= b.min_workers:
                    self._replaced[launch.id] = now
                    decisions.append(
                        Submit(
                            1,
                            f"replacing {launch.id} ahead of its walltime (ends in {left:.0f} s,"
                            f" queue wait seen {wait:.0f} s)",
                            replaces=launch.id,
                        )
                    )

        # Pending too long: cancel, and let the work submit another.
        for launch in list(live):
            if launch.started is None and now - launch.submitted >= b.pending_timeout:
                age = now - launch.submitted
                why = f"pending for {age:.0f} s (bound {b.pending_timeout:g} s); trying again"
                decisions.append(Cancel(launch.id, why, retry=True))
                live.remove(launch)

        # Capacity: what the pool has and what is on its way.
        staying = [x for x in live if x.id not in self._replaced]
        slots_each = self._slots_each(view)
        replacements = sum(1 for d in decisions if isinstance(d, Submit))
        capacity = replacements * slots_each
        for launch in staying:
            connected = workers_of.get(launch.id)
            if connected:
                capacity += sum(w.slots for w in connected if not w.draining)
            else:
                capacity += slots_each
        foreign = [w for w in view.workers if w.launch is None or w.launch not in known]
        capacity += sum(w.slots for w in foreign if not w.draining)
        # The jobs of workers on their way out finish there: not demand on the others.
        leaving = {x.id for x in view.launches if x.draining or x.id in self._replaced}
        busy = sum(min(w.held, w.slots) for w in view.workers if not w.draining and w.launch not in leaving)
        if view.job_seconds is None:
            wanted = view.queued
        else:
            wanted = min(view.queued, math.ceil(view.queued * view.job_seconds / b.horizon))
        demand = busy + wanted
        need = math.ceil(max(0, demand - capacity) / slots_each)
        count = len(staying) + replacements
        self.target = max(b.min_workers, min(b.max_workers, count + need))
        add = max(0, self.target - count)
        if add:
            room = max(0, b.max_submit - self._submits.used(now))
            add = min(add, room)
        if add:
            if count < b.min_workers and count + add <= b.min_workers:
                reason = f"{count} launches, fewer than --min-workers {b.min_workers}"
            else:
                work = self._work(view)
                reason = f"{view.queued} jobs queued ({work}), {capacity} slots running or on their way"
            decisions.append(Submit(add, reason))
            self._submits.add(now, add)

        # Scale down: idle workers only, drained, with an empty queue.
        if not view.queued and not add:
            quiet = self._empty_since is not None and now - self._empty_since >= b.idle_timeout
            count = len(staying) + replacements
            room = max(0, b.max_cancel - self._cancels.used(now))
            taken = 0
            for launch in sorted(staying, key=lambda x: x.submitted, reverse=True):
                if count <= b.min_workers or taken >= room:
                    break
                connected = workers_of.get(launch.id)
                if not connected:
                    # Only a launch still pending: one that started has a
                    # worker on its way, which may hold jobs before a cancel lands.
                    if quiet and launch.started is None:
                        why = f"not needed: no job queued or running for {b.idle_timeout:g} s"
                        decisions.append(Cancel(launch.id, why))
                        count -= 1
                        taken += 1
                    continue
                idle = [w.idle_since for w in connected]
                if any(s is None or now - s < b.idle_timeout for s in idle):
                    continue
                since = now - max(s for s in idle if s is not None)
                why = f"idle for {since:.0f} s (--idle-timeout {b.idle_timeout:g})"
                decisions.append(Drain(launch.id, why, connected[0].id))
                count -= 1
                taken += 1
            self._cancels.add(now, taken)
            self.target = max(b.min_workers, count)
        for decision in decisions:
            self.history.append((now, decision))
        return decisions

    @staticmethod
    def _worker(workers_of: dict[str, list[Worker]], launch: Launch) -> int | None:
        connected = workers_of.get(launch.id)
        return connected[0].id if connected else None

    def _slots_each(self, view: PoolView) -> int:
        """Slots per worker: the connected workers' mean, else the bounds' guess."""
        slots = [w.slots for w in view.workers if w.launch is not None]
        return max(1, round(sum(slots) / len(slots))) if slots else self.bounds.slots

    def _work(self, view: PoolView) -> str:
        if view.job_seconds is None:
            return "durations not measured yet"
        return f"{view.queued * view.job_seconds:.1f} slot-seconds"


# --- several pools -------------------------------------------------------------


def pool_capacity(
    cpus: int | None,
    memory: int | None,
    gpus: int,
    tags: Sequence[str] = (),
    custom: Mapping[str, float] | None = None,
) -> Capacity:
    """
    What one worker of a pool will have, for L{route_queued}: C{cpus}
    cores (None: one), C{memory} bytes (None: not said, counted as
    enough, since the worker advertises its node's), C{gpus} devices.
    """
    return Capacity(
        cpus=cpus or 1,
        memory=memory if memory is not None else 2**62,
        gpus=tuple(str(i) for i in range(gpus)),
        custom=tuple(sorted((custom or {}).items())),
        tags=frozenset(tags),
    )


def _plainness(capacity: Capacity) -> tuple:
    """The order of L{route_queued}'s rule: the fewest resources first."""
    return (len(capacity.gpus), len(capacity.tags), len(capacity.custom), capacity.cpus, capacity.memory)


def _per_worker(capacity: Capacity, shape: Shape) -> int:
    """How many jobs of C{shape} one worker of C{capacity} runs at once (at least 1)."""
    counts = [capacity.cpus // max(1, shape.cpus)]
    if shape.gpus:
        counts.append(len(capacity.gpus) // shape.gpus)
    if shape.memory and capacity.memory < 2**62:
        counts.append(capacity.memory // shape.memory)
    have = dict(capacity.custom)
    counts += [int(have[name] // amount) for name, amount in shape.custom if amount > 0]
    return max(1, min(counts))


def route_queued(
    plain: int, shapes: Mapping[Shape, int], pools: Sequence[tuple[str, Capacity]]
) -> dict[str, int]:
    """
    Each pool's share of the queue, in slots (see the module docstring):
    C{plain} jobs asking for nothing and C{shapes} the sized ones queued
    (as L{cw.core.fairqueue.FairQueue.shape_counts} gives them), routed
    to C{pools} (C{(name, one worker's capacity)}, in the order given).
    Every pool is in the answer, with 0 if no queued job is its.
    """
    order = sorted(range(len(pools)), key=lambda i: (_plainness(pools[i][1]), i))
    share = {name: 0.0 for name, _ in pools}
    work: list[tuple[Shape | None, int]] = [(None, plain), *shapes.items()]
    for shape, count in work:
        if count <= 0:
            continue
        for i in order:
            name, capacity = pools[i]
            if Ledger(capacity).could_run(shape):
                slots = 1.0 if shape is None else capacity.cpus / _per_worker(capacity, shape)
                share[name] += count * slots
                break
    return {name: math.ceil(n - 1e-9) for name, n in share.items()}
