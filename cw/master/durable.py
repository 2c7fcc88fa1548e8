"""
The durable queue (C{cw-master --state PATH}) as the master carries it out.

L{DurableQueue} keeps the master's jobs in its state file
(L{cw.master.store.Store}) so that they survive a crash, and keeps them,
and their results, while their client is away:

  - Jobs are known by their client's session and their number in it
    (L{P.RegisterClient}'s C{session}).  A client that leaves does not take
    its jobs with it: they run, and their results wait on disk (bounded by
    C{--max-stored-results-bytes}, oldest dropped first) until a client of
    that session registers again, from the same process or another.
  - What changed in one reactor turn is committed in one transaction
    (L{cw.core.durable.Batch}); only then are the submitted jobs
    acknowledged to their clients (L{P.JobsStored}).  Commits, and reads
    of stored results, run in a thread of their own (L{StateWriter}), one
    at a time and in order: the reactor goes on answering while SQLite
    waits for the disk to sync (C{synchronous=FULL}), and what changes
    meanwhile waits for the next commit.
  - A master that starts on a state file reloads its sessions, functions
    and queue (jobs that were running go back to the queue) and the index
    of its stored results.
  - Results sent to a connected client that acknowledges them
    (L{P.TAKES_RESULTS}, L{P.ResultsTaken}) are kept, in memory, until it
    has: their jobs' rows go only then.  Those of a client that leaves
    first are stored for its session like those of an absent client; if
    the master dies first, their jobs are still in the file and run again.

The master never unpickles anything: payloads are stored as they arrived.

Layer rule (cw.master): imports cw.discovery and below; never cw.client, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cw.core.durable import Batch, ResultShelf, SessionRecord, commit_delay, delivery_batches
from cw.core.records import TAKES_RESULTS, Job, Result
from cw.errors import StateFileError
from cw.master.store import Store

log = Logger(namespace="cw.master")

#: The L{cw.master.service.Master} this queue serves (passed in, not imported).
Master = Any


class StateWriter:
    """
    Runs the state file's work (commits, reads) in one thread of its own,
    one call at a time in the order asked, and reports each outcome in the
    reactor's thread: a commit waits for the disk to sync, which may take
    long on a busy disk, and the reactor must go on answering meanwhile.

    @param reactor: delivers the outcomes (C{callFromThread}).
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Call C{function(*args)} in the writer's thread, after those asked before; fire with its outcome."""
        d = defer.Deferred()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="cw-state-writer", daemon=True)
            self._thread.start()
        self._calls.put((function, args, d))
        return d

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            function, args, d = call
            try:
                result = function(*args)
            except BaseException:
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)

    def stop(self) -> None:
        """End the thread once the calls asked so far are done (the master stops)."""
        if self._thread is not None:
            self._calls.put(None)
            self._thread.join()
            self._thread = None


class InlineWriter:
    """A L{StateWriter} that calls at once, in the caller's thread (for a master on a fake clock)."""

    def run(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        return defer.maybeDeferred(function, *args)

    def stop(self) -> None:
        pass


class DurableQueue:
    """
    The state file of one L{Master}, and which of its clients' sessions
    are connected.  The master calls it at each event it must record.

    @param max_stored_results_bytes: bytes of results that may wait on
        disk for absent clients; past that, the oldest are dropped.
    @param writer: runs the file's commits and reads (L{StateWriter}, or
        L{InlineWriter}); default, a L{StateWriter} on the master's clock,
        which must then be the reactor.
    """

    def __init__(
        self,
        master: Master,
        path: str,
        max_stored_results_bytes: int,
        writer: StateWriter | InlineWriter | None = None,
    ) -> None:
        self.master = master
        self.store = Store(path)
        self.shelf = ResultShelf(max_stored_results_bytes)
        self.batch = Batch()
        self.writer = writer if writer is not None else StateWriter(master.clock)
        self._commit_call = None
        #: Whether a commit is being written (one at a time).
        self._writing = False
        #: Fired when the commit being written is done (see L{flush}).
        self._written_waiters: list[defer.Deferred] = []
        #: Each known session's client id in the scheduler (connected or away), and back.
        self.cids: dict[str, int] = {}
        self.names: dict[int, str] = {}
        #: Sessions whose client is not connected.
        self.away: set[str] = set()
        #: Per session, the numbers of its queued and running jobs.
        self.held: dict[str, set[int]] = {}
        #: Connected clients that acknowledge the results they are sent
        #: (L{P.TAKES_RESULTS}), and per client, by job number, those sent
        #: and not acknowledged yet.
        self.taking: set[int] = set()
        self.unacked: dict[int, dict[int, Result]] = {}
        #: Commits made and the seconds they took, for the status.
        self.commits = 0
        self.commit_seconds = 0.0
        self.commit_failed = False

    # -- start -----------------------------------------------------------

    def reload(self) -> int:
        """
        Rebuild the master's sessions, functions and queue from the state
        file (every session is away until its client registers); return
        how many jobs were requeued.
        """
        loaded = self.store.load()
        master = self.master
        for record in loaded.sessions.values():
            cid = master.scheduler.add_client(record.weight)
            master.routing.client_joined(cid, {**record.context, "session": record.name})
            self._know(record.name, cid)
            self.away.add(record.name)
        for (session, key), function in loaded.functions.items():
            if session in self.cids:
                master.routing.define(self.cids[session], key, function)
        by_session: dict[str, list[Job]] = {}
        for stored in loaded.jobs:
            if stored.session in self.cids:
                by_session.setdefault(stored.session, []).append(stored.job(self.cids[stored.session]))
        for session, jobs in by_session.items():
            master.scheduler.submit(self.cids[session], jobs)
            self.held[session] = {job.seq for job in jobs}
        for session, seq, size in loaded.results:
            self.shelf.add(session, seq, size)
        log.info(
            "Reloaded the state file {path}: {jobs:,} jobs of {n} sessions requeued,"
            " {results:,} results ({mib:.1f} MiB) waiting for their clients",
            path=self.store.path,
            jobs=len(loaded.jobs),
            n=len(loaded.sessions),
            results=len(self.shelf),
            mib=self.shelf.bytes / (1 << 20),
        )
        return len(loaded.jobs)

    def _know(self, session: str, cid: int) -> None:
        self.cids[session] = cid
        self.names[cid] = session

    # -- clients ---------------------------------------------------------

    def client_id(self, session: str) -> int | None:
        """The client id of C{session} if it is known and away: a client of it re-attaches."""
        return self.cids.get(session) if session in self.away else None

    def joined(self, session: str, cid: int, context: dict, weight: int) -> None:
        """A client of C{session} registered as C{cid} (new, or re-attached: see L{client_id})."""
        if self.cids.get(session) != cid:
            self._know(session, cid)
            self.held.setdefault(session, set())
            self.batch.session(SessionRecord(session, context, weight))
            self._schedule_commit()
        self.away.discard(session)
        if context.get(TAKES_RESULTS):
            self.taking.add(cid)

    def acking(self, cid: int) -> bool:
        """Whether the results sent to C{cid} are kept until it acknowledges them (see L{taken})."""
        return cid in self.taking

    def taken(self, cid: int, seqs: list[int]) -> None:
        """Client C{cid} has these results (L{P.ResultsTaken}): their jobs' rows go."""
        session = self.names.get(cid)
        kept = self.unacked.get(cid)
        if session is None or not kept:
            return
        gone = [seq for seq in seqs if kept.pop(seq, None) is not None]
        if gone:
            self.batch.end(session, gone)
            self._schedule_commit()

    def left(self, cid: int) -> bool:
        """
        The client C{cid} left.  Return whether its session is kept (its
        jobs stay, and their results wait for it); else the master forgets
        it as it does any client's.
        """
        session = self.names.get(cid)
        self.taking.discard(cid)
        unacked = self.unacked.pop(cid, {})
        if session is None:
            return False
        # What it was sent and did not acknowledge waits for its session's next client.
        for result in unacked.values():
            self._store(session, result)
        if unacked:
            self._schedule_commit()
        self.away.add(session)
        return self._forget_if_done(session) is None

    def _forget_if_done(self, session: str) -> int | None:
        """Forget an away session that has nothing left (jobs, results); return its client id if it was."""
        if session not in self.away or self.held.get(session) or self.shelf.of(session):
            return None
        cid = self.cids.pop(session)
        del self.names[cid]
        self.away.discard(session)
        self.held.pop(session, None)
        self.batch.forget(session)
        self._schedule_commit()
        return cid

    def session_jobs(self, cid: int) -> list[int]:
        """
        The numbers of C{cid}'s session's jobs this master holds: queued,
        running, or with a result waiting (sent by L{deliver}).
        """
        session = self.names.get(cid)
        if session is None:
            return []
        waiting = (seq for seq, _ in self.shelf.sizes(session))
        return sorted(self.held.get(session, set()).union(waiting))

    @defer.inlineCallbacks
    def deliver(self, cid: int, send: Callable[[list[Result]], defer.Deferred]):
        """
        Send the results that waited for C{cid}'s session, read from disk
        in the writer's thread, a batch at a time (L{delivery_batches}):
        C{send} fires once the client has a batch, and only then do its
        rows go.  If C{send} fails (the client dropped), the rest stay for
        the session's next client.
        """
        session = self.names.get(cid)
        if session is None or not self.shelf.of(session):
            return
        log.info(
            "Session {session} is back: delivering {n:,} results that waited for it",
            session=session,
            n=self.shelf.of(session),
        )
        # What was gathered is written first (or, if the file cannot be
        # written, still in the batch).
        yield self.flush()
        for seqs in delivery_batches(self.shelf.sizes(session)):
            unwritten = self.batch.results
            pending = [unwritten[(session, seq)] for seq in seqs if (session, seq) in unwritten]
            on_disk = [seq for seq in seqs if (session, seq) not in unwritten]
            read = yield self.writer.run(lambda seqs=on_disk: list(self.store.results_of(session, seqs)))
            # Dropped meanwhile (the bound), or had by a client of the session since: not sent.
            stored = [r for r in (*pending, *read) if (session, r.seq) in self.shelf]
            if not stored:
                continue
            try:
                yield send([r.result(cid) for r in stored])
            except Exception as e:
                log.info(
                    "Session {session} did not take its stored results ({e}); they wait for its next client",
                    session=session,
                    e=e,
                )
                return
            gone = self.shelf.remove(session, [r.seq for r in stored])
            self.batch.take_results([(session, seq) for seq in gone])
            self._schedule_commit()

    # -- jobs ------------------------------------------------------------

    def accept(self, cid: int, jobs: list[Job]) -> list[Job]:
        """
        Record jobs submitted by C{cid}; return those to queue.  A job its
        session already has here (a client resubmitting after a reconnect)
        is not queued twice, nor is one whose result waits for it (it gets
        that).  All are acknowledged once committed.
        """
        session = self.names[cid]
        held = self.held.setdefault(session, set())
        shelf = self.shelf if self.shelf.of(session) else ()
        again = {job.seq for job in jobs if job.seq in held or (session, job.seq) in shelf}
        fresh = [job for job in jobs if job.seq not in again] if again else jobs
        held.update(job.seq for job in fresh)
        self.batch.submit(session, cid, fresh)
        self.batch.acks[cid].extend(again)
        self._schedule_commit()
        return fresh

    def too_big(self, job: Job) -> bool:
        """Whether C{job}'s payload is more than a row of the state file holds."""
        return len(job.payload) > self.store.max_blob

    def function(self, cid: int, key: bytes, function: bytes) -> None:
        session = self.names.get(cid)
        if session is not None:
            self.batch.function(session, key, function)
            self._schedule_commit()

    def withdrawn(self, cid: int, seqs: list[int]) -> None:
        """Jobs of C{cid} were cancelled: their rows go."""
        session = self.names.get(cid)
        if session is None:
            return
        held = self.held.get(session, set())
        gone = [seq for seq in seqs if seq in held]
        held.difference_update(gone)
        self.batch.end(session, gone)
        self._schedule_commit()

    def ended(self, results: list[Result], connected: set[int]) -> list[Result]:
        """
        Record results (or failures) of jobs; return those to send now, to
        C{connected} clients.  Those of away sessions are stored for them,
        within the bound (older ones dropped, with a log line).
        """
        send = []
        for result in results:
            session = self.names.get(result.client)
            if session is None:
                send.append(result)
                continue
            self.held.get(session, set()).discard(result.seq)
            if result.client in connected:
                if result.client in self.taking:
                    # Its row goes once the client has it (L{taken}).
                    self.unacked.setdefault(result.client, {})[result.seq] = result
                else:
                    self.batch.end(session, [result.seq])
                send.append(result)
                continue
            self._store(session, result)
        self._schedule_commit()
        return send

    def _store(self, session: str, result: Result) -> None:
        """Keep C{result} for C{session}'s next client, within the bound (older ones dropped, logged)."""
        self.batch.store_result(session, result)
        for dropped in self.shelf.add(session, result.seq, len(result.payload)):
            log.warn(
                "Dropped the stored result of job #{seq} of session {session} ({size:,} bytes):"
                " results waiting for absent clients exceed --max-stored-results-bytes ({bound:,})",
                seq=dropped.seq,
                session=dropped.session,
                size=dropped.size,
                bound=self.shelf.max_bytes,
            )
            self.batch.take_results([(dropped.session, dropped.seq)])
            cid = self._forget_if_done(dropped.session)
            if cid is not None:
                self.master.forget_client(cid)

    # -- commits ---------------------------------------------------------

    def _schedule_commit(self) -> None:
        """
        Commit what was gathered, once: on the next turn if a client waits
        for it (L{cw.core.durable.commit_delay}), else a little later.
        """
        delay = commit_delay(self.batch)
        call = self._commit_call
        if call is not None and call.active():
            if call.getTime() <= self.master.clock.seconds() + delay:
                return
            call.cancel()
        self._commit_call = self.master.clock.callLater(delay, self.commit)

    def commit(self) -> None:
        """
        Write the gathered batch in one transaction, in the writer's
        thread; acknowledge its jobs once it is on disk.  While a commit is
        being written, what gathers waits for the next one, which starts
        when it is done.
        """
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()
        self._commit_call = None
        if self._writing or not self.batch:
            return
        batch, self.batch = self.batch, Batch()
        self._writing = True
        started = time.monotonic()
        d = self.writer.run(self.store.commit, batch)
        d.addCallbacks(self._committed, self._not_committed, (batch, started), None, (batch,))
        d.addBoth(self._written)

    def _committed(self, _: None, batch: Batch, started: float) -> None:
        if self.commit_failed:
            log.info("The state file {path} is written again", path=self.store.path)
            self.commit_failed = False
        self.commits += 1
        self.commit_seconds += time.monotonic() - started
        self.master.jobs_stored(batch.acks)

    def _not_committed(self, failure: Failure, batch: Batch) -> None:
        # Nothing is acknowledged: the clients resubmit these jobs if this
        # master dies.  Say so once, not at every commit.
        if not self.commit_failed:
            if failure.check(StateFileError):
                log.error("{e}; jobs are kept in memory only until it works again", e=failure.value)
            else:
                log.failure("Cannot commit the state file; jobs are kept in memory only", failure)
        self.commit_failed = True
        # Kept for the next commit (acknowledgements wait too), with what
        # gathered meanwhile on top.
        batch.absorb(self.batch)
        self.batch = batch

    def _written(self, _: None) -> None:
        self._writing = False
        waiters, self._written_waiters = self._written_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self.batch and not self.commit_failed:
            # Gathered while the last commit was written; after a failure,
            # the next write tries again (as before it).
            self._schedule_commit()

    @defer.inlineCallbacks
    def flush(self):
        """
        Commit what was gathered so far; fires once that is written (or,
        if the file cannot be written, kept in the batch).
        """
        if self._writing:
            yield self._when_written()
        if self.batch:
            self.commit()
            if self._writing:
                yield self._when_written()

    def _when_written(self) -> defer.Deferred:
        waiter = defer.Deferred()
        self._written_waiters.append(waiter)
        return waiter

    def close(self) -> defer.Deferred:
        """Commit what is pending and close the file (the master stops); fires once closed."""
        d = self.flush()
        d.addBoth(lambda _: self.writer.run(self.store.close))
        d.addBoth(lambda _: self.writer.stop())
        return d

    # -- inspection ------------------------------------------------------

    def status(self) -> dict:
        return {
            "path": self.store.path,
            "bytes": self.store.size(),
            "stored_results": len(self.shelf),
            "stored_results_bytes": self.shelf.bytes,
            "max_stored_results_bytes": self.shelf.max_bytes,
            "dropped_results": self.shelf.dropped,
            "away_sessions": len(self.away),
            "commits": self.commits,
            "commit_seconds": self.commit_seconds,
            "failing": self.commit_failed,
        }
