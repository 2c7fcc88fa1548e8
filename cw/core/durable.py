"""
The durable queue's decisions (C{cw-master --state}), with no I/O.

The master keeps what must survive its crash in a SQLite file
(L{cw.master.store}); this module decides what goes there and when:

  - L{Batch}: the writes gathered since the last commit (jobs submitted,
    jobs ended, results stored for absent clients, sessions and their
    functions), committed together in one transaction, never one per job:
    on the next reactor turn when it holds submitted jobs, whose clients
    wait for the acknowledgement (L{Batch.acks}), else within
    L{LAZY_COMMIT} seconds (L{commit_delay}).  A job submitted and ended
    within the same batch is not written at all.
  - L{ResultShelf}: which stored results to keep.  Results of jobs whose
    client is away wait on disk, up to C{max_bytes}; past that the oldest
    are dropped first (the caller logs each drop).  They stay until the
    session's client has acknowledged them (L{delivery_batches}): a client
    that drops before it has them gets them at its next attach.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from cw.core.fairqueue import job_priority
from cw.core.records import Job, Result, batches

#: A job or result as the store names it: the client's session and the
#: job's number in that session.
Key = tuple[str, int]


@dataclass(frozen=True)
class SessionRecord:
    """What a session needs to run its jobs while its client is away."""

    name: str
    #: The client's working directory and C{sys.path} (its registration context).
    context: dict
    weight: int = 1


@dataclass
class StoredJob:
    """A queued or running job as it is stored: opaque bytes and its session."""

    session: str
    seq: int
    payload: bytes
    options: bytes = b""
    func: bytes = b""

    @property
    def key(self) -> Key:
        return (self.session, self.seq)

    @property
    def priority(self) -> int:
        return job_priority(Job(0, self.seq, b"", self.options))

    @classmethod
    def of(cls, session: str, job: Job) -> StoredJob:
        return cls(session, job.seq, job.payload, job.options, job.func)

    def job(self, client: int) -> Job:
        """The job as the scheduler queues it, for the client id C{client}."""
        return Job(client, self.seq, self.payload, self.options, self.func)


@dataclass
class StoredResult:
    """A result waiting for its absent client."""

    session: str
    seq: int
    status: int
    payload: bytes

    @property
    def key(self) -> Key:
        return (self.session, self.seq)

    @classmethod
    def of(cls, session: str, result: Result) -> StoredResult:
        return cls(session, result.seq, result.status, result.payload)

    def result(self, client: int) -> Result:
        return Result(client, self.seq, self.status, self.payload)


@dataclass
class Batch:
    """
    The writes gathered since the last commit, to be committed in one
    transaction (L{cw.master.store.Store.commit}).
    """

    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    functions: dict[tuple[str, bytes], bytes] = field(default_factory=dict)
    jobs: dict[Key, StoredJob] = field(default_factory=dict)
    #: Jobs that ended (or were withdrawn): their rows go.
    ended: set[Key] = field(default_factory=set)
    results: dict[Key, StoredResult] = field(default_factory=dict)
    #: Stored results delivered or dropped: their rows go.
    taken: set[Key] = field(default_factory=set)
    #: Sessions with nothing left to keep: their rows go.
    forgotten: set[str] = field(default_factory=set)
    #: Per client id, the sequence numbers to acknowledge once committed.
    acks: dict[int, list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.sessions
            or self.functions
            or self.jobs
            or self.ended
            or self.results
            or self.taken
            or self.forgotten
            or self.acks
        )

    def session(self, record: SessionRecord) -> None:
        self.sessions[record.name] = record
        self.forgotten.discard(record.name)

    def function(self, session: str, key: bytes, function: bytes) -> None:
        self.functions[(session, key)] = function

    def submit(self, session: str, client: int, jobs: list[Job]) -> None:
        """Jobs accepted from C{client} of C{session}: stored, then acknowledged."""
        for job in jobs:
            stored = StoredJob.of(session, job)
            self.jobs[stored.key] = stored
            self.ended.discard(stored.key)
        self.acks.setdefault(client, []).extend(job.seq for job in jobs)

    def end(self, session: str, seqs: list[int]) -> None:
        """
        These jobs ended or were withdrawn: their rows go.  One submitted
        in this very batch is simply not written.
        """
        for seq in seqs:
            key = (session, seq)
            if self.jobs.pop(key, None) is None:
                self.ended.add(key)

    def store_result(self, session: str, result: Result) -> None:
        """Keep C{result} for its absent client (its job's row goes)."""
        self.end(session, [result.seq])
        stored = StoredResult.of(session, result)
        self.results[stored.key] = stored
        self.taken.discard(stored.key)

    def take_results(self, keys: list[Key]) -> None:
        """Stored results that were delivered or dropped: their rows go."""
        for key in keys:
            if self.results.pop(key, None) is None:
                self.taken.add(key)

    def forget(self, session: str) -> None:
        """Nothing of C{session} is left to keep: its rows go."""
        self.sessions.pop(session, None)
        self.functions = {k: v for k, v in self.functions.items() if k[0] != session}
        self.forgotten.add(session)

    def absorb(self, later: Batch) -> None:
        """
        Add the writes of C{later}, gathered after this batch's, so that
        committing this batch has the effect of committing it and then
        C{later} (a batch whose commit failed takes those gathered while
        it was being written).  The store deletes before it inserts
        (L{cw.master.store.Store.commit}): a row this batch inserts and
        C{later} deletes is not inserted; one this batch deletes and
        C{later} inserts is deleted, then inserted.  Acknowledgements keep
        their order.
        """
        for session in later.forgotten:
            self.sessions.pop(session, None)
            for table in ("functions", "jobs", "results"):
                rows = getattr(self, table)
                setattr(self, table, {k: v for k, v in rows.items() if k[0] != session})
        self.forgotten |= later.forgotten
        self.sessions.update(later.sessions)
        self.functions.update(later.functions)
        for key in later.ended:
            self.jobs.pop(key, None)
        self.ended |= later.ended
        self.jobs.update(later.jobs)
        for key in later.taken:
            self.results.pop(key, None)
        self.taken |= later.taken
        self.results.update(later.results)
        for client, seqs in later.acks.items():
            self.acks.setdefault(client, []).extend(seqs)


#: Seconds a batch that no client waits for may gather more writes before
#: it is committed (see L{commit_delay}).
LAZY_COMMIT = 0.25


def commit_delay(batch: Batch) -> float:
    """
    How long C{batch} may wait before it is committed.  Submitted jobs are
    committed on the next turn: their clients wait for the acknowledgement.
    Everything else may gather for L{LAZY_COMMIT} seconds, so that a steady
    flow of results costs a few commits a second, not one per turn: none
    of it is lost if the master dies first (a job whose end was not
    committed is still in the file, and runs again).
    """
    return 0.0 if batch.acks else LAZY_COMMIT


#: Bytes of stored results sent to a returning client in one go; their
#: rows go once the client acknowledges them, then the next go.
DELIVERY_BYTES = 16 << 20


def delivery_batches(sizes: list[tuple[int, int]], limit: int | None = None) -> list[list[int]]:
    """
    The numbers of stored results (C{(seq, size)}, oldest first) in the
    batches they are sent in: each adds up to at most C{limit} bytes
    (default L{DELIVERY_BYTES}; one larger result goes alone).  One batch
    at a time is read and in flight.
    """
    limit = DELIVERY_BYTES if limit is None else limit
    return [[seq for seq, _ in batch] for batch in batches(sizes, lambda entry: entry[1], limit)]


@dataclass(frozen=True)
class Dropped:
    """A stored result dropped to keep the shelf within its bound."""

    session: str
    seq: int
    size: int


class ResultShelf:
    """
    The index of the results waiting for absent clients, oldest first, and
    the bound on their bytes: adding one past C{max_bytes} drops the oldest
    until the rest fit (a result bigger than the bound on its own is not
    kept at all).  Sizes only; the payloads are on disk.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._sizes: OrderedDict[Key, int] = OrderedDict()
        self._per_session: Counter[str] = Counter()
        self.bytes = 0
        #: Results dropped since the start, for the status.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: Key) -> bool:
        return key in self._sizes

    def add(self, session: str, seq: int, size: int) -> list[Dropped]:
        """Shelve a result of C{size} bytes; return the results dropped for it, oldest first."""
        key = (session, seq)
        if key in self._sizes:
            self._remove(key)
        self._sizes[key] = size
        self._per_session[session] += 1
        self.bytes += size
        dropped = []
        while self.bytes > self.max_bytes:
            old_key = next(iter(self._sizes))
            dropped.append(Dropped(*old_key, self._remove(old_key)))
        self.dropped += len(dropped)
        return dropped

    def sizes(self, session: str) -> list[tuple[int, int]]:
        """The numbers and sizes of the results waiting for C{session}, oldest first."""
        if not self._per_session[session]:
            return []
        return [(seq, size) for (name, seq), size in self._sizes.items() if name == session]

    def remove(self, session: str, seqs: list[int]) -> list[int]:
        """Forget these results of C{session} (their client has them); return those that were here."""
        gone = [seq for seq in seqs if (session, seq) in self._sizes]
        for seq in gone:
            self._remove((session, seq))
        return gone

    def _remove(self, key: Key) -> int:
        size = self._sizes.pop(key)
        self.bytes -= size
        self._per_session[key[0]] -= 1
        if not self._per_session[key[0]]:
            del self._per_session[key[0]]
        return size

    def of(self, session: str) -> int:
        """How many results wait for C{session}."""
        return self._per_session[session]

    def sessions(self) -> set[str]:
        return set(self._per_session)
