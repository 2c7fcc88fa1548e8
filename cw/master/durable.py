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
    acknowledged to their clients (L{P.JobsStored}).
  - A master that starts on a state file reloads its sessions, functions
    and queue (jobs that were running go back to the queue) and the index
    of its stored results.

The master never unpickles anything: payloads are stored as they arrived.

Layer rule (cw.master): imports cw.discovery and below; never cw.client, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger

from cw.core.durable import Batch, ResultShelf, SessionRecord, commit_delay
from cw.core.records import Job, Result
from cw.errors import StateFileError
from cw.master.store import Store

log = Logger(namespace="cw.master")

#: The L{cw.master.service.Master} this queue serves (passed in, not imported).
Master = Any


class DurableQueue:
    """
    The state file of one L{Master}, and which of its clients' sessions
    are connected.  The master calls it at each event it must record.

    @param max_stored_results_bytes: bytes of results that may wait on
        disk for absent clients; past that, the oldest are dropped.
    """

    def __init__(self, master: Master, path: str, max_stored_results_bytes: int) -> None:
        self.master = master
        self.store = Store(path)
        self.shelf = ResultShelf(max_stored_results_bytes)
        self.batch = Batch()
        self._commit_call = None
        #: Each known session's client id in the scheduler (connected or away), and back.
        self.cids: dict[str, int] = {}
        self.names: dict[int, str] = {}
        #: Sessions whose client is not connected.
        self.away: set[str] = set()
        #: Per session, the numbers of its queued and running jobs.
        self.held: dict[str, set[int]] = {}
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

    def left(self, cid: int) -> bool:
        """
        The client C{cid} left.  Return whether its session is kept (its
        jobs stay, and their results wait for it); else the master forgets
        it as it does any client's.
        """
        session = self.names.get(cid)
        if session is None:
            return False
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

    def session_jobs(self, cid: int) -> tuple[list[int], list[Result]]:
        """
        The numbers of C{cid}'s session's jobs this master holds (queued,
        running, or with a result waiting), and the waiting results, read
        from disk, to send it now (their rows go).
        """
        session = self.names.get(cid)
        if session is None:
            return [], []
        waiting = self._take_results(session, cid)
        return sorted(self.held.get(session, set()).union(r.seq for r in waiting)), waiting

    def _take_results(self, session: str, cid: int) -> list[Result]:
        seqs = self.shelf.take(session)
        if not seqs:
            return []
        self.commit()  # some may still be in the batch
        results = [stored.result(cid) for stored in self.store.results_of(session, seqs)]
        self.batch.take_results([(session, seq) for seq in seqs])
        self._schedule_commit()
        log.info(
            "Session {session} is back: delivering {n:,} results that waited for it",
            session=session,
            n=len(results),
        )
        return results

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
                self.batch.end(session, [result.seq])
                send.append(result)
                continue
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
        self._schedule_commit()
        return send

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
        """Write the gathered batch in one transaction, then acknowledge its jobs."""
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()
        self._commit_call = None
        batch, self.batch = self.batch, Batch()
        if not batch:
            return
        started = time.monotonic()
        try:
            self.store.commit(batch)
        except StateFileError as e:
            # Nothing is acknowledged: the clients resubmit these jobs if
            # this master dies.  Say so once, not at every commit.
            if not self.commit_failed:
                log.error("{e}; jobs are kept in memory only until it works again", e=e)
            self.commit_failed = True
            self._requeue_writes(batch)
            return
        if self.commit_failed:
            log.info("The state file {path} is written again", path=self.store.path)
            self.commit_failed = False
        self.commits += 1
        self.commit_seconds += time.monotonic() - started
        self.master.jobs_stored(batch.acks)

    def _requeue_writes(self, batch: Batch) -> None:
        """Keep a batch that could not be committed for the next commit (acks wait too)."""
        later = self.batch
        for name in ("sessions", "functions", "jobs", "results"):
            merged = getattr(batch, name)
            merged.update(getattr(later, name))
            setattr(later, name, merged)
        later.ended |= batch.ended
        later.taken |= batch.taken
        later.forgotten |= batch.forgotten
        for cid, seqs in batch.acks.items():
            later.acks[cid] = seqs + later.acks.get(cid, [])

    def close(self) -> None:
        """Commit what is pending and close the file (the master stops)."""
        self.commit()
        self.store.close()

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
