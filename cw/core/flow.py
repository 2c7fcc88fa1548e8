"""
The master's flow control towards each client, with no I/O.

The L{Scheduler} counts the room each client was given and what it sent
(L{Scheduler.held}, L{Scheduler.over_hard_limit}, L{Scheduler.take_room});
L{FlowControl} adds what the master does about it, per client:

  - A client that has used all its room holds further jobs by itself; the
    master logs that once per client (L{Throttle.first_held}).
  - A client that ignores its room and has sent more than the limits
    beyond it (so up to twice the limits queued) is no longer read from
    (L{Throttle.stop_reading}), which stalls its other commands too.
  - Once its queue has drained to half, it is given room again
    (L{Room}), and a client not read from is read again
    (L{Room.resume_reading}).
  - A client the master does not read from cannot be heard from: it is
    not taken for a silent one (L{FlowControl.excused}).

Unit-tested in L{cw.test.core.test_master_core}.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

from cw.core.scheduler import Scheduler


@dataclass(frozen=True)
class Throttle:
    """What to do about a client after it submitted jobs."""

    #: It has just used up its room for the first time: log that (once).
    first_held: bool = False
    #: It sent past its room: read nothing more from it until it has room again.
    stop_reading: bool = False


@dataclass(frozen=True)
class Room:
    """More room for a client whose queue has drained: tell it (L{P.JobRoom})."""

    client: int
    bytes: int
    jobs: int
    #: The master had stopped reading from it: read again.
    resume_reading: bool = False


class FlowControl:
    """Per-client flow-control decisions on top of a L{Scheduler}'s counts."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        #: Clients of which the master logged that they used up their room.
        self._held_logged: set[int] = set()
        #: Clients the master does not read from.
        self._not_read: set[int] = set()

    def submitted(self, client: int) -> Throttle:
        """C{client} has submitted jobs: whether to log that it is held, and to stop reading it."""
        first_held = client not in self._held_logged and self.scheduler.held(client)
        if first_held:
            self._held_logged.add(client)
        stop = client not in self._not_read and self.scheduler.over_hard_limit(client)
        if stop:
            self._not_read.add(client)
        return Throttle(first_held, stop)

    def give_room(self) -> list[Room]:
        """More room for every client whose queue has drained to half (L{Scheduler.take_room})."""
        rooms = []
        for client, more_bytes, more_jobs in self.scheduler.take_room():
            resume = client in self._not_read
            self._not_read.discard(client)
            rooms.append(Room(client, more_bytes, more_jobs, resume))
        return rooms

    def reading(self, client: int) -> bool:
        """Whether the master reads from C{client} (false once L{Throttle.stop_reading})."""
        return client not in self._not_read

    def excused(self, client: int) -> bool:
        """
        Whether C{client}'s silence is the master's doing (it does not read
        from it), so that it must not be dropped as a silent client.
        """
        return client in self._not_read

    def stop_reading(self, client: int) -> None:
        """Record that the master does not read from C{client} (as L{Throttle.stop_reading} does)."""
        self._not_read.add(client)

    def forget(self, client: int) -> None:
        """C{client} has left."""
        self._held_logged.discard(client)
        self._not_read.discard(client)


class LentBytes:
    """
    Results that workers lent to clients on their machine, by reference
    (L{cw.core.payload.ResultReference}), and that the clients have not
    released yet: bytes a client has not taken, held in a worker's memory
    instead of the master's socket buffers.  The master counts them with
    its unsent results (L{Scheduler.unsent_results}), so that a client that
    stops taking its results stops getting jobs, and is dropped after the
    read timeout, as one that stops reading them.
    """

    def __init__(self) -> None:
        #: Per client: the length of each lent result by C{(worker, seq)}.
        self._lent: dict[int, dict[tuple[int, int], int]] = {}
        #: Per client: bytes lent and not released, and bytes released in all.
        self._outstanding: dict[int, int] = {}
        self._taken: dict[int, int] = {}

    def lent(self, client: int, worker: int, seq: int, length: int) -> None:
        """Worker C{worker} lent C{client} the result of job C{seq}, of C{length} bytes."""
        results = self._lent.setdefault(client, {})
        self._outstanding[client] = self._outstanding.get(client, 0) + length - results.get((worker, seq), 0)
        results[(worker, seq)] = length

    def released(self, client: int, keys: list[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
        """
        C{client} took (or gave up) these results, by C{(worker, seq)}:
        return the keys it was lent, by worker, C{(client, seq)} as each
        worker knows them (others are dropped: nothing holds them).
        """
        results = self._lent.get(client)
        by_worker: dict[int, list[tuple[int, int]]] = {}
        if not results:
            return by_worker
        for worker, seq in keys:
            length = results.pop((worker, seq), None)
            if length is None:
                continue
            self._outstanding[client] -= length
            self._taken[client] = self._taken.get(client, 0) + length
            by_worker.setdefault(worker, []).append((client, seq))
        return by_worker

    def worker_left(self, worker: int) -> None:
        """A worker is gone, and the files it lent with it (not taken: nothing counts as read)."""
        for client, results in self._lent.items():
            for key in [key for key in results if key[0] == worker]:
                self._outstanding[client] -= results.pop(key)

    def forget(self, client: int) -> None:
        """The client left (its workers close its files)."""
        self._lent.pop(client, None)
        self._outstanding.pop(client, None)
        self._taken.pop(client, None)

    def outstanding(self, client: int) -> int:
        """Bytes lent to C{client} that it has not taken."""
        return self._outstanding.get(client, 0)

    def taken(self, client: int) -> int:
        """Bytes of lent results C{client} has taken, in all (its reading progress)."""
        return self._taken.get(client, 0)
