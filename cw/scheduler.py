"""
The master's decisions, with no I/O.

L{Scheduler} holds the queue of pending jobs, the workers and their slots,
and which client owns which job.  The master's protocol objects feed it
events (a client arrived, jobs were submitted, a worker left, results came
back) and carry out what it returns (send these jobs to that worker, deliver
these results to that client).  Nothing here touches a socket, a clock or a
payload's contents, so every rule is tested directly in
L{cw.test.test_scheduler}.

Dispatch rules:
  - Jobs leave the queue in FIFO order.
  - A worker with C{slots} slots holds at most C{slots + prefetch} jobs.
    Free slots anywhere are filled before any worker gets prefetched jobs, so
    an idle worker is never starved by another's prefetch.
  - When a worker leaves, the jobs it held go back to the front of the queue
    in their original order.  A result from a worker that no longer holds the
    job (it left, or the job was requeued) is dropped, so each job's result is
    delivered at most once.
  - When a client leaves, its queued jobs are dropped at once and results of
    its running jobs are discarded when they arrive.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from cw.protocol import Job, Result


class UnknownPeer(KeyError):
    """An event named a client or worker that is not registered."""


@dataclass
class ClientState:
    """What the scheduler knows about one client."""

    id: int
    queued: int = 0
    running: int = 0
    submitted: int = 0
    completed: int = 0


@dataclass
class WorkerState:
    """What the scheduler knows about one worker."""

    id: int
    slots: int
    prefetch: int
    #: Jobs this worker holds (running or prefetched), by job key, in the
    #: order they were assigned.
    held: dict[tuple[int, int], Job] = field(default_factory=dict)
    completed: int = 0

    @property
    def capacity(self) -> int:
        return self.slots + self.prefetch


class Scheduler:
    """
    Queue, slots and ownership for one master.

    @param prefetch: extra jobs a worker may hold per slot, beyond one
        running job per slot, so that it never waits on a round trip to the
        master between two short jobs.
    """

    def __init__(self, prefetch: int = 1) -> None:
        if prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        self.prefetch = prefetch
        self._queue: deque[Job] = deque()
        self._clients: dict[int, ClientState] = {}
        self._workers: dict[int, WorkerState] = {}
        self._next_client = 1
        self._next_worker = 1
        self._rotation = 0
        self.completed = 0

    # -- clients ---------------------------------------------------------

    def add_client(self) -> int:
        """Register a client; return its id (never reused)."""
        cid = self._next_client
        self._next_client += 1
        self._clients[cid] = ClientState(cid)
        return cid

    def remove_client(self, client: int) -> int:
        """
        Forget a client: drop its queued jobs (returning how many) and make
        results of its running jobs undeliverable.
        """
        state = self._clients.pop(client, None)
        if state is None:
            raise UnknownPeer(client)
        if state.queued:
            self._queue = deque(job for job in self._queue if job.client != client)
        return state.queued

    def submit(self, client: int, jobs: Iterable[Job]) -> None:
        """Queue jobs from C{client}; each job's C{client} field is set here."""
        state = self._client(client)
        n = 0
        for job in jobs:
            job.client = client
            self._queue.append(job)
            n += 1
        state.queued += n
        state.submitted += n

    # -- workers ---------------------------------------------------------

    def add_worker(self, slots: int) -> int:
        """Register a worker with C{slots} job slots; return its id."""
        if slots < 1:
            raise ValueError("a worker needs at least one slot")
        wid = self._next_worker
        self._next_worker += 1
        self._workers[wid] = WorkerState(wid, slots, self.prefetch * slots)
        return wid

    def remove_worker(self, worker: int) -> list[Job]:
        """
        Forget a worker.  Jobs it held go back to the front of the queue in
        their original order (those of departed clients are dropped); they
        are returned.
        """
        state = self._workers.pop(worker, None)
        if state is None:
            raise UnknownPeer(worker)
        back = [job for job in state.held.values() if job.client in self._clients]
        for job in back:
            client = self._clients[job.client]
            client.running -= 1
            client.queued += 1
        self._queue.extendleft(reversed(back))
        return back

    # -- the flow of jobs ------------------------------------------------

    def dispatch(self) -> list[tuple[int, list[Job]]]:
        """
        Take queued jobs for workers with room; return C{(worker, jobs)}
        pairs, at most one per worker.  Free slots are filled first, then
        prefetch room; workers take turns so that load spreads evenly.
        """
        if not self._queue or not self._workers:
            return []
        workers = list(self._workers.values())
        start = self._rotation % len(workers)
        self._rotation += 1
        workers = workers[start:] + workers[:start]
        assigned: dict[int, list[Job]] = {}
        for limit in ("slots", "capacity"):
            # One job at a time per worker in turn, so that a short queue is
            # spread over all free workers rather than filling the first.
            hungry = [w for w in workers if len(w.held) < getattr(w, limit)]
            while hungry and self._queue:
                still = []
                for w in hungry:
                    if not self._queue:
                        break
                    job = self._queue.popleft()
                    w.held[job.key] = job
                    assigned.setdefault(w.id, []).append(job)
                    client = self._clients[job.client]
                    client.queued -= 1
                    client.running += 1
                    if len(w.held) < getattr(w, limit):
                        still.append(w)
                hungry = still
        return list(assigned.items())

    def complete(self, worker: int, results: Iterable[Result]) -> list[Result]:
        """
        Record results reported by C{worker}.  Return those to deliver to
        their clients: results for jobs this worker does not hold, or whose
        client has left, are dropped.
        """
        state = self._worker(worker)
        deliver = []
        for result in results:
            if state.held.pop(result.key, None) is None:
                continue
            state.completed += 1
            self.completed += 1
            client = self._clients.get(result.client)
            if client is None:
                continue
            client.running -= 1
            client.completed += 1
            deliver.append(result)
        return deliver

    # -- inspection ------------------------------------------------------

    @property
    def queued(self) -> int:
        """Number of jobs waiting for a worker."""
        return len(self._queue)

    def worker(self, worker: int) -> WorkerState:
        return self._worker(worker)

    def workers(self) -> list[WorkerState]:
        return list(self._workers.values())

    def client(self, client: int) -> ClientState:
        return self._client(client)

    def clients(self) -> list[ClientState]:
        return list(self._clients.values())

    def _client(self, client: int) -> ClientState:
        try:
            return self._clients[client]
        except KeyError:
            raise UnknownPeer(client) from None

    def _worker(self, worker: int) -> WorkerState:
        try:
            return self._workers[worker]
        except KeyError:
            raise UnknownPeer(worker) from None
