"""
The master's state file (C{cw-master --state PATH}): a SQLite database, in
WAL mode, holding what must survive the master's crash: the queued and
running jobs (opaque bytes, options, priority, their client's session and
number), the sessions' contexts and cached functions, and the results that
wait for absent clients.  Payloads are stored as the bytes that arrived:
nothing is unpickled.

What is written and when is decided in L{cw.core.durable}: this module only
reads the file at start (L{Store.load}) and commits each L{Batch} in one
transaction (L{Store.commit}).  Commits are synchronous (C{synchronous=FULL}):
once one returns, its jobs are on disk, even if the machine then fails.

Layer rule (cw.master): imports cw.discovery and below; never cw.client, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field

from cw.core.durable import Batch, Key, SessionRecord, StoredJob, StoredResult
from cw.errors import StateFileError

#: Bumped when the tables change in a way an older master could misread.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    name TEXT PRIMARY KEY, context TEXT NOT NULL, weight INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS functions (
    session TEXT NOT NULL, key BLOB NOT NULL, function BLOB NOT NULL,
    PRIMARY KEY (session, key));
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, session TEXT NOT NULL, seq INTEGER NOT NULL,
    priority INTEGER NOT NULL, options BLOB NOT NULL, func BLOB NOT NULL,
    payload BLOB NOT NULL, UNIQUE (session, seq));
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY, session TEXT NOT NULL, seq INTEGER NOT NULL,
    status INTEGER NOT NULL, payload BLOB NOT NULL, UNIQUE (session, seq));
"""


@dataclass
class Loaded:
    """What a state file held when the master started."""

    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    functions: dict[tuple[str, bytes], bytes] = field(default_factory=dict)
    #: Queued and running jobs, in the order they were submitted.
    jobs: list[StoredJob] = field(default_factory=list)
    #: Stored results: C{(session, seq, size)}, oldest first.
    results: list[tuple[str, int, int]] = field(default_factory=list)


class Store:
    """
    One open state file.  C{path} is created if missing; a file written by
    another schema version is refused with L{StateFileError}, as is a file
    another master has open (L{lock}).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = lock(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise StateFileError(
                    f"the state file {path} was written by another cw version (schema {row[0]},"
                    f" this master reads {SCHEMA_VERSION}): use that version, or another --state file"
                )
        except (sqlite3.Error, StateFileError) as e:
            os.close(self._lock)
            if isinstance(e, StateFileError):
                raise
            raise StateFileError(
                f"cannot open the state file {path} ({e}): check that its directory exists and is"
                " writable, and that it is a cw state file"
            ) from None
        #: Largest payload a row can hold (SQLite's length limit).
        self.max_blob = self._db.getlimit(sqlite3.SQLITE_LIMIT_LENGTH) - 1024

    def load(self) -> Loaded:
        """Everything the file holds, for a master that starts on it."""
        db = self._db
        loaded = Loaded()
        for name, context, weight in db.execute("SELECT name, context, weight FROM sessions"):
            loaded.sessions[name] = SessionRecord(name, json.loads(context), weight)
        for session, key, function in db.execute("SELECT session, key, function FROM functions"):
            loaded.functions[(session, bytes(key))] = bytes(function)
        loaded.jobs = [
            StoredJob(session, seq, bytes(payload), bytes(options), bytes(func))
            for session, seq, options, func, payload in db.execute(
                "SELECT session, seq, options, func, payload FROM jobs ORDER BY id"
            )
        ]
        loaded.results = list(db.execute("SELECT session, seq, length(payload) FROM results ORDER BY id"))
        return loaded

    def commit(self, batch: Batch) -> None:
        """Write C{batch} in one transaction; raises L{StateFileError} if it cannot."""
        db = self._db
        try:
            db.execute("BEGIN")
            if batch.forgotten:
                names = [(name,) for name in batch.forgotten]
                for table in ("sessions", "functions", "jobs", "results"):
                    column = "name" if table == "sessions" else "session"
                    db.executemany(f"DELETE FROM {table} WHERE {column}=?", names)  # noqa: S608
            if batch.sessions:
                db.executemany(
                    "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)",
                    [(r.name, json.dumps(r.context), r.weight) for r in batch.sessions.values()],
                )
            if batch.functions:
                db.executemany(
                    "INSERT OR REPLACE INTO functions VALUES (?, ?, ?)",
                    [(s, k, f) for (s, k), f in batch.functions.items()],
                )
            if batch.ended:
                db.executemany("DELETE FROM jobs WHERE session=? AND seq=?", list(batch.ended))
            if batch.jobs:
                db.executemany(
                    "INSERT OR REPLACE INTO jobs (session, seq, priority, options, func, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (j.session, j.seq, j.priority, j.options, j.func, j.payload)
                        for j in batch.jobs.values()
                    ],
                )
            if batch.taken:
                db.executemany("DELETE FROM results WHERE session=? AND seq=?", list(batch.taken))
            if batch.results:
                db.executemany(
                    "INSERT OR REPLACE INTO results (session, seq, status, payload) VALUES (?, ?, ?, ?)",
                    [(r.session, r.seq, r.status, r.payload) for r in batch.results.values()],
                )
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StateFileError(f"cannot write the state file {self.path}: {e}") from None

    def results_of(self, session: str, seqs: list[int]) -> Iterator[StoredResult]:
        """The stored results C{seqs} of C{session}, read one by one (they may be big)."""
        for seq in seqs:
            row = self._db.execute(
                "SELECT status, payload FROM results WHERE session=? AND seq=?", (session, seq)
            ).fetchone()
            if row is not None:
                yield StoredResult(session, seq, row[0], bytes(row[1]))

    def size(self) -> int:
        """Bytes of the state file on disk, with its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(self.path + suffix).st_size
            except OSError:
                pass
        return total

    def close(self) -> None:
        """Checkpoint the write-ahead log into the file, close it and release its lock."""
        if self._lock is None:
            return
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self._db.close()
        os.close(self._lock)
        self._lock = None


def lock_path(path: str) -> str:
    """The lock file next to the state file C{path}."""
    return path + ".lock"


def lock(path: str) -> int:
    """
    Take the lock of the state file C{path} (C{flock} on C{PATH.lock},
    which holds the holder's C{host:pid}), so that two masters never write
    one file; return its descriptor (closing it releases the lock, as the
    holder's exit does).  Raises L{StateFileError} naming the holder if
    another process has it.
    """
    name = lock_path(path)
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StateFileError(
            f"cannot create the state file's lock {name} ({e.strerror}): check that its directory"
            " exists and is writable"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise StateFileError(
            f"the state file {path} is in use by another master ({holder}): stop it first, or give"
            " this master another --state file"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode(), 0)
    return fd


def locked(path: str) -> bool:
    """Whether a master holds the state file C{path} (see L{lock})."""
    try:
        os.close(lock(path))
    except StateFileError:
        return True
    return False


def session_keys(keys: list[Key]) -> dict[str, list[int]]:
    """Group store keys by session, keeping their order."""
    grouped: dict[str, list[int]] = {}
    for session, seq in keys:
        grouped.setdefault(session, []).append(seq)
    return grouped
