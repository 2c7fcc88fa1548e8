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
from collections.abc import Callable, Collection, Iterable, Iterator

from cw.core.payload import payload_size
from cw.core.records import Job, read_options
from cw.core.resources import Shape, shape_of


def job_priority(job: Job) -> int:
    """A job's priority from its options (default 0; higher runs first)."""
    if not job.options:
        return 0
    value = read_options(job).get("priority", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class _ClientJobs:
    """
    One client's queued jobs, by priority level: plain jobs in one queue
    per level, sized jobs (L{cw.core.resources.Shape}) in one queue per
    level and shape, so that the oldest job of a shape that fits a worker
    is found without walking past the jobs of shapes that do not.
    """

    __slots__ = ("weight", "credit", "levels", "sized_levels", "size", "sized", "bytes")

    def __init__(self, weight: int) -> None:
        self.weight = weight
        self.credit = weight
        self.levels: dict[int, deque[Job]] = {}
        self.sized_levels: dict[int, dict[Shape, deque[Job]]] = {}
        self.size = 0
        #: How many of the queued jobs are sized.
        self.sized = 0
        #: Bytes of the queued jobs' payloads.
        self.bytes = 0

    def push(self, job: Job, shape: Shape | None, front: bool = False) -> None:
        if shape is None:
            level = self.levels.setdefault(job_priority(job), deque())
        else:
            level = self.sized_levels.setdefault(job_priority(job), {}).setdefault(shape, deque())
            self.sized += 1
        if front:
            level.appendleft(job)
        else:
            level.append(job)
        self.size += 1
        self.bytes += payload_size(job.payload)

    def pop(self) -> Job:
        top = max(self.levels) if len(self.levels) > 1 else next(iter(self.levels))
        level = self.levels[top]
        job = level.popleft()
        if not level:
            del self.levels[top]
        self.size -= 1
        self.bytes -= payload_size(job.payload)
        return job

    def pop_fitting(self, fits: Callable[[Shape | None], bool]) -> tuple[Job, Shape | None] | None:
        """
        The first job, by priority and then age, whose shape C{fits} (plain
        jobs have the shape C{None}); C{None} if none does.
        """
        best = None
        if self.levels and fits(None):
            top = max(self.levels)
            best = (top, self.levels[top][0].seq, None, self.levels[top])
        for priority, shapes in self.sized_levels.items():
            if best is not None and priority < best[0]:
                continue
            for shape, level in shapes.items():
                if best is not None and (priority, -level[0].seq) <= (best[0], -best[1]):
                    continue
                if fits(shape):
                    best = (priority, level[0].seq, shape, level)
        if best is None:
            return None
        priority, _, shape, level = best
        job = level.popleft()
        if not level:
            if shape is None:
                del self.levels[priority]
            else:
                del self.sized_levels[priority][shape]
                if not self.sized_levels[priority]:
                    del self.sized_levels[priority]
        if shape is not None:
            self.sized -= 1
        self.size -= 1
        self.bytes -= payload_size(job.payload)
        return job, shape

    def shapes(self) -> Iterator[tuple[Shape, int]]:
        """The sized jobs' shapes and how many of each are queued."""
        for shapes in self.sized_levels.values():
            for shape, level in shapes.items():
                yield shape, len(level)

    def remove(self, unwanted: Callable[[Job], bool]) -> list[Job]:
        """Drop the jobs for which C{unwanted} is true; return them."""
        dropped: list[Job] = []

        def keep(level: deque[Job]) -> deque[Job]:
            kept: deque[Job] = deque()
            for job in level:
                (dropped if unwanted(job) else kept).append(job)
            return kept

        for priority in list(self.levels):
            kept = keep(self.levels[priority])
            if kept:
                self.levels[priority] = kept
            else:
                del self.levels[priority]
        for priority, shapes in list(self.sized_levels.items()):
            for shape in list(shapes):
                kept = keep(shapes[shape])
                if kept:
                    shapes[shape] = kept
                else:
                    del shapes[shape]
            if not shapes:
                del self.sized_levels[priority]
        self.size = sum(len(level) for level in self.levels.values())
        self.sized = sum(n for _, n in self.shapes())
        self.size += self.sized
        self.bytes = sum(payload_size(job.payload) for level in self.levels.values() for job in level) + sum(
            payload_size(job.payload)
            for shapes in self.sized_levels.values()
            for level in shapes.values()
            for job in level
        )
        return dropped


class FairQueue:
    """Pending jobs, handed out round robin between clients (see module docstring)."""

    def __init__(self) -> None:
        self._clients: dict[int, _ClientJobs] = {}
        #: Clients with jobs queued, in turn order; the first one's turn is now.
        self._turns: deque[int] = deque()
        self._size = 0
        #: How many queued jobs are sized (not plain).
        self.sized = 0

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
            self.sized -= jobs.sized
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
        shape = shape_of(job) if job.options else None
        jobs.push(job, shape)
        self._size += 1
        if shape is not None:
            self.sized += 1

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
            shape = shape_of(job) if job.options else None
            queue.push(job, shape, front=True)
            self._size += 1
            if shape is not None:
                self.sized += 1

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
        jobs = self._clients[client]
        if jobs.sized:
            job, shape = jobs.pop_fitting(lambda shape: True)
            self.sized -= shape is not None
        else:
            job = jobs.pop()
        self._took(client, jobs)
        return job

    def pop_like(self, job: Job) -> Job | None:
        """
        The next queued job of C{job}'s client if it is a plain job of the
        same cached function (C{func}) and its client has no sized job
        queued, taken as L{popleft} takes it (the turns move on); else
        C{None}.  For packing many short jobs into one worker's box without
        passing over other clients' turns for jobs of another kind.
        """
        jobs = self._clients.get(job.client)
        if jobs is None or not jobs.size or jobs.sized:
            return None
        levels = jobs.levels
        level = levels[max(levels)] if len(levels) > 1 else next(iter(levels.values()))
        if level[0].func != job.func:
            return None
        found = jobs.pop()
        self._took(job.client, jobs)
        return found

    def pop_fitting(
        self, fits: Callable[[Shape | None], bool], skip: Collection[int] = ()
    ) -> tuple[Job, Shape | None] | None:
        """
        The next job whose shape C{fits} (plain jobs have the shape
        C{None}), with its shape: from the first client in turn order that
        has one (by priority, then age), passing over those in C{skip}.
        Clients passed over keep their place in the turns.  C{None} if no
        queued job fits.
        """
        for client in self._turns:
            if client in skip:
                continue
            jobs = self._clients[client]
            found = jobs.pop_fitting(fits)
            if found is not None:
                if found[1] is not None:
                    self.sized -= 1
                self._took(client, jobs)
                return found
        return None

    def _took(self, client: int, jobs: _ClientJobs) -> None:
        """C{client} gave a job: move the turns on as its weight says."""
        first = client == self._turns[0]
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

    def shape_counts(self) -> dict[Shape, int]:
        """How many sized jobs of each shape are queued."""
        counts: dict[Shape, int] = {}
        if self.sized:
            for client in self._turns:
                for shape, n in self._clients[client].shapes():
                    counts[shape] = counts.get(shape, 0) + n
        return counts

    def remove_shapes(self, shapes: Collection[Shape]) -> list[Job]:
        """Drop every queued job of one of C{shapes}; return them."""
        dropped: list[Job] = []
        for client in list(self._turns):
            if self._clients[client].sized:
                dropped += self._remove(client, lambda job: shape_of(job) in shapes)
        return dropped

    def remove(self, client: int, unwanted: Callable[[Job], bool]) -> int:
        """Drop C{client}'s jobs for which C{unwanted} is true; return how many."""
        return len(self._remove(client, unwanted))

    def _remove(self, client: int, unwanted: Callable[[Job], bool]) -> list[Job]:
        jobs = self._clients.get(client)
        if jobs is None or not jobs.size:
            return []
        sized = jobs.sized
        dropped = jobs.remove(unwanted)
        self._size -= len(dropped)
        self.sized -= sized - jobs.sized
        if not jobs.size:
            self._turns.remove(client)
            jobs.credit = jobs.weight
        return dropped
