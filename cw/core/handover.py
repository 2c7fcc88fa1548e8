"""
Results that outlived their master: a worker keeps the results of jobs
that finish while its master is away and hands them to the next master,
which routes each to the client that resubmitted its job, matched by the
client's session and the job's sequence number (the same on every
connection of that client).

L{KeptResults} is the worker's side (bounded by bytes), L{Unclaimed} the
master's: results handed over before their client came back, kept a while
for it (bounded by bytes and by age).

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections import OrderedDict

from cw.core.records import Result

#: Seconds a master keeps a handed-over result for a client that has not
#: resubmitted its job yet: a client's default C{reconnect_timeout}.
UNCLAIMED_SECONDS = 300.0

#: Bytes of handed-over results a master keeps for clients not back yet.
UNCLAIMED_BYTES = 256 << 20


class KeptResults:
    """
    A worker's results of jobs that finished after their master connection
    was lost, each with its client's session, up to C{limit} bytes of
    payload; results past it are counted in C{dropped} and not kept (their
    clients run those jobs again).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.results: list[tuple[str, Result]] = []
        self.bytes = 0
        self.dropped = 0

    def keep(self, session: str | None, result: Result) -> bool:
        """Keep C{result} of C{session}'s job if there is room; whether it was kept."""
        size = len(result.payload)
        if session is None or self.bytes + size > self.limit:
            self.dropped += 1
            return False
        self.results.append((session, result))
        self.bytes += size
        return True

    def take(self) -> tuple[list[str], list[Result]]:
        """
        Everything kept, emptied: the sessions, and the results with each
        one's C{client} field set to its session's index in that list, plus
        one (as L{cw.wire.commands.RegisterWorker} carries them).
        """
        sessions: dict[str, int] = {}
        results = []
        for session, result in self.results:
            index = sessions.setdefault(session, len(sessions) + 1)
            results.append(Result(index, result.seq, result.status, result.payload))
        self.results = []
        self.bytes = 0
        return list(sessions), results


class Unclaimed:
    """
    Handed-over results at the master waiting for their client to resubmit
    the job, by C{(session, seq)}: at most C{limit} bytes (the oldest go
    first) for at most C{max_age} seconds.
    """

    def __init__(self, limit: int = UNCLAIMED_BYTES, max_age: float = UNCLAIMED_SECONDS) -> None:
        self.limit = limit
        self.max_age = max_age
        self._results: OrderedDict[tuple[str, int], tuple[float, Result]] = OrderedDict()
        self.bytes = 0
        #: Results dropped unclaimed (too old, or for room).
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._results)

    def add(self, session: str, result: Result, now: float) -> None:
        """Keep C{result} (its C{client} field is not used) for C{session}'s job C{result.seq}."""
        key = (session, result.seq)
        if key in self._results:
            return  # the same job's result from two workers: one is enough
        self._results[key] = (now, result)
        self.bytes += len(result.payload)
        self.expire(now)

    def take(self, session: str, seq: int) -> Result | None:
        """The result kept for C{session}'s job C{seq}, removed; None if there is none."""
        entry = self._results.pop((session, seq), None)
        if entry is None:
            return None
        self.bytes -= len(entry[1].payload)
        return entry[1]

    def expire(self, now: float) -> None:
        """Drop results older than C{max_age}, then the oldest while over C{limit} bytes."""
        while self._results:
            key, (at, result) = next(iter(self._results.items()))
            if now - at <= self.max_age and self.bytes <= self.limit:
                break
            del self._results[key]
            self.bytes -= len(result.payload)
            self.dropped += 1
