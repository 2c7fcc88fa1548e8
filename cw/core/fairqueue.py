"""
The master's queue of pending jobs, shared fairly between clients.

Free slots go round robin between the clients that have jobs queued, so a
client that submits ten jobs behind another's hundred thousand gets them
run at once instead of after the others.  A client's C{weight} is how many
jobs it gets per turn (default 1).  Within one client, jobs of higher
C{priority} go first, and jobs of equal priority keep their order.

Pure data structure: no I/O, no clock; L{cw.core.scheduler.Scheduler} owns one.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable

from cw.core.records import Job, read_options


def job_priority(job: Job) -> int:
    """A job's priority from its options (default 0; higher runs first)."""
    if not job.options:
        return 0
    value = read_options(job).get("priority", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class _ClientJobs:
    """One client's queued jobs, by priority level."""

    __slots__ = ("weight", "credit", "levels", "size", "bytes")

    def __init__(self, weight: int) -> None:
        self.weight = weight
        self.credit = weight
        self.levels: dict[int, deque[Job]] = {}
        self.size = 0
        #: Bytes of the queued jobs' payloads.
        self.bytes = 0

    def push(self, job: Job, front: bool = False) -> None:
        level = self.levels.setdefault(job_priority(job), deque())
        if front:
            level.appendleft(job)
        else:
            level.append(job)
        self.size += 1
        self.bytes += len(job.payload)

    def pop(self) -> Job:
        top = max(self.levels) if len(self.levels) > 1 else next(iter(self.levels))
        level = self.levels[top]
        job = level.popleft()
        if not level:
            del self.levels[top]
        self.size -= 1
        self.bytes -= len(job.payload)
        return job

    def remove(self, unwanted: Callable[[Job], bool]) -> int:
        before = self.size
        for priority in list(self.levels):
            kept = deque(job for job in self.levels[priority] if not unwanted(job))
            if kept:
                self.levels[priority] = kept
            else:
                del self.levels[priority]
        self.size = sum(len(level) for level in self.levels.values())
        self.bytes = sum(len(job.payload) for level in self.levels.values() for job in level)
        return before - self.size


class FairQueue:
    """Pending jobs, handed out round robin between clients (see module docstring)."""

    def __init__(self) -> None:
        self._clients: dict[int, _ClientJobs] = {}
        #: Clients with jobs queued, in turn order; the first one's turn is now.
        self._turns: deque[int] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def bytes_of(self, client: int) -> int:
        """Bytes of C{client}'s queued payloads."""
        jobs = self._clients.get(client)
        return 0 if jobs is None else jobs.bytes

    def set_weight(self, client: int, weight: int) -> None:
        """Give C{client} C{weight} jobs per turn (at least 1)."""
        if weight < 1:
            raise ValueError("a client's weight must be at least 1")
        jobs = self._clients.get(client)
        if jobs is None:
            self._clients[client] = _ClientJobs(weight)
        else:
            jobs.weight = jobs.credit = weight

    def forget(self, client: int) -> int:
        """Drop all of C{client}'s jobs and its weight; return how many were queued."""
        jobs = self._clients.pop(client, None)
        if jobs is None:
            return 0
        if jobs.size:
            self._turns.remove(client)
            self._size -= jobs.size
        return jobs.size

    def _jobs_of(self, client: int) -> _ClientJobs:
        jobs = self._clients.get(client)
        if jobs is None:
            jobs = self._clients[client] = _ClientJobs(1)
        return jobs

    def append(self, job: Job) -> None:
        """Queue a job behind its client's others of the same priority."""
        jobs = self._jobs_of(job.client)
        if not jobs.size:
            self._turns.append(job.client)
        jobs.push(job)
        self._size += 1

    def push_front(self, jobs: Iterable[Job]) -> None:
        """
        Put jobs back (a lost or draining worker's) ahead of everything of
        their priority, in their original order; their clients move to the
        front of the turns.
        """
        jobs = list(jobs)
        for job in reversed(jobs):
            queue = self._jobs_of(job.client)
            if not queue.size:
                self._turns.appendleft(job.client)
            elif self._turns[0] != job.client:
                self._turns.remove(job.client)
                self._turns.appendleft(job.client)
            queue.push(job, front=True)
            self._size += 1

    def next_client(self, skip: Collection[int] = ()) -> int | None:
        """The client whose turn it is, passing over those in C{skip}; None if none has jobs."""
        for client in self._turns:
            if client not in skip:
                return client
        return None

    def popleft(self, skip: Collection[int] = ()) -> Job:
        """
        The next job: from the client whose turn it is.  Clients in C{skip}
        (whose jobs are not to be dispatched now) are passed over and keep
        their place in the turns.
        """
        client = self.next_client(skip) if skip else (self._turns[0] if self._turns else None)
        if client is None:
            raise IndexError("pop from an empty FairQueue")
        first = client == self._turns[0]
        jobs = self._clients[client]
        job = jobs.pop()
        self._size -= 1
        jobs.credit -= 1
        if not jobs.size:
            if first:
                self._turns.popleft()
            else:
                self._turns.remove(client)
            jobs.credit = jobs.weight
        elif jobs.credit <= 0:
            jobs.credit = jobs.weight
            if first:
                self._turns.rotate(-1)
            else:
                self._turns.remove(client)
                self._turns.append(client)
        return job

    def remove(self, client: int, unwanted: Callable[[Job], bool]) -> int:
        """Drop C{client}'s jobs for which C{unwanted} is true; return how many."""
        jobs = self._clients.get(client)
        if jobs is None or not jobs.size:
            return 0
        dropped = jobs.remove(unwanted)
        self._size -= dropped
        if not jobs.size:
            self._turns.remove(client)
            jobs.credit = jobs.weight
        return dropped
