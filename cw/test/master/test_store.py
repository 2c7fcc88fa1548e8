"""
Tests for the master's state file (L{cw.master.store}): batched commits,
reloading, the bound on stored results, and a file it cannot use.
"""

from __future__ import annotations

import os
import socket
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from cw.core.durable import Batch, ResultShelf, SessionRecord
from cw.core.records import Job, Outcome, Result, encode_options
from cw.errors import StateFileError
from cw.master.store import Store, locked


def crash(store: Store) -> None:
    """Let go of C{store}'s file as a killed master does: no checkpoint, no close of the log."""
    store._db.close()
    os.close(store._lock)
    store._db = store._lock = None


class StoreTests(SynchronousTestCase):
    def setUp(self):
        self.path = os.path.join(self.mktemp() + ".d", "state.db")
        os.makedirs(os.path.dirname(self.path))
        self.store = Store(self.path)
        self.addCleanup(lambda: self.store._lock is not None and crash(self.store))

    def reopen(self) -> Store:
        """A new Store on the same file, as a restarted master (the old one crashed: not closed)."""
        crash(self.store)
        self.store = Store(self.path)
        return self.store

    def test_wal_mode(self):
        mode = sqlite3.connect(self.path).execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(mode, "wal")

    def test_reload_queue_in_order(self):
        batch = Batch()
        batch.session(SessionRecord("s", {"cwd": "/tmp", "path": ["/x"]}, weight=2))
        batch.function("s", b"key", b"function")
        jobs = [Job(1, seq, b"p%d" % seq, encode_options(priority=seq % 3)) for seq in range(1, 101)]
        batch.submit("s", 1, jobs[:50])
        self.store.commit(batch)
        batch = Batch()
        batch.submit("s", 1, jobs[50:])
        batch.end("s", [1, 2])
        self.store.commit(batch)
        loaded = self.reopen().load()
        self.assertEqual(loaded.sessions, {"s": SessionRecord("s", {"cwd": "/tmp", "path": ["/x"]}, 2)})
        self.assertEqual(loaded.functions, {("s", b"key"): b"function"})
        self.assertEqual([j.seq for j in loaded.jobs], list(range(3, 101)))
        self.assertEqual([j.job(1) for j in loaded.jobs], jobs[2:])

    def test_one_transaction_per_batch(self):
        """A batch of a thousand jobs is one commit (SQLite's total_changes counts rows, not commits)."""
        commits = []
        db = self.store._db
        db.set_trace_callback(lambda sql: commits.append(sql) if sql.strip() == "COMMIT" else None)
        batch = Batch()
        batch.submit("s", 1, [Job(1, seq, b"x") for seq in range(1000)])
        self.store.commit(batch)
        self.assertEqual(commits, ["COMMIT"])
        self.assertEqual(len(self.reopen().load().jobs), 1000)

    def test_results_stored_and_taken(self):
        batch = Batch()
        batch.submit("s", 1, [Job(1, 1, b"a"), Job(1, 2, b"b")])
        self.store.commit(batch)
        batch = Batch()
        batch.store_result("s", Result(1, 2, Outcome.OK, b"value"))
        self.store.commit(batch)
        store = self.reopen()
        loaded = store.load()
        self.assertEqual([j.seq for j in loaded.jobs], [1])
        self.assertEqual(loaded.results, [("s", 2, 5)])
        [stored] = store.results_of("s", [2, 3])
        self.assertEqual((stored.seq, stored.status, stored.payload), (2, Outcome.OK, b"value"))
        batch = Batch()
        batch.take_results([("s", 2)])
        store.commit(batch)
        self.assertEqual(self.reopen().load().results, [])

    def test_bound_drops_oldest_results_from_disk(self):
        """The shelf decides, the store carries it out: what is left on disk fits the bound."""
        shelf = ResultShelf(250)
        for seq in range(1, 6):
            batch = Batch()
            batch.store_result("s", Result(1, seq, Outcome.OK, b"x" * 100))
            batch.take_results([(d.session, d.seq) for d in shelf.add("s", seq, 100)])
            self.store.commit(batch)
        self.assertEqual(self.reopen().load().results, [("s", 4, 100), ("s", 5, 100)])

    def test_forget_session(self):
        batch = Batch()
        batch.session(SessionRecord("s", {}))
        batch.session(SessionRecord("t", {}))
        batch.function("s", b"k", b"f")
        batch.submit("s", 1, [Job(1, 1, b"a")])
        batch.submit("t", 2, [Job(2, 1, b"a")])
        self.store.commit(batch)
        batch = Batch()
        batch.forget("s")
        self.store.commit(batch)
        loaded = self.reopen().load()
        self.assertEqual((list(loaded.sessions), loaded.functions), (["t"], {}))
        self.assertEqual([j.session for j in loaded.jobs], ["t"])

    def test_size_counts_the_log(self):
        batch = Batch()
        batch.submit("s", 1, [Job(1, 1, b"x" * 100_000)])
        self.store.commit(batch)
        self.assertGreater(self.store.size(), 100_000)

    def test_not_a_state_file(self):
        with open(self.path + ".bad", "wb") as f:
            f.write(b"not sqlite" * 100)
        e = self.assertRaises(StateFileError, Store, self.path + ".bad")
        self.assertIn(self.path + ".bad", str(e))

    def test_missing_directory(self):
        e = self.assertRaises(StateFileError, Store, "/nonexistent/dir/state.db")
        self.assertIn("directory", str(e))

    def test_one_master_per_file(self):
        """A second Store on a file in use is refused, naming the holder; closing frees it."""
        e = self.assertRaises(StateFileError, Store, self.path)
        self.assertIn(f"in use by another master ({socket.gethostname()}:{os.getpid()})", str(e))
        self.assertTrue(locked(self.path))
        self.store.close()
        self.assertFalse(locked(self.path))
        self.store = Store(self.path)

    def test_other_schema_refused(self):
        self.store.close()
        db = sqlite3.connect(self.path)
        db.execute("UPDATE meta SET value='99' WHERE name='schema'")
        db.commit()
        db.close()
        e = self.assertRaises(StateFileError, Store, self.path)
        self.assertIn("schema 99", str(e))
        self.store = Store(self.path + "2")


def _base() -> Batch:
    """Rows already in a file: sessions s and t, a function and jobs 1-3 of each, a stored result of s."""
    batch = Batch()
    for name in ("s", "t"):
        batch.session(SessionRecord(name, {"cwd": "/"}))
        batch.function(name, b"k", b"f0")
        batch.submit(name, 1, [Job(1, seq, b"p%d" % seq) for seq in (1, 2, 3)])
    batch.store_result("s", Result(1, 9, Outcome.OK, b"r9"))
    return batch


def _scenarios():
    """Pairs of an earlier and a later batch (written after _base), one for each way their writes meet."""
    earlier, later = Batch(), Batch()  # a job inserted, then ended; one ended, then inserted again
    earlier.submit("s", 1, [Job(1, 4, b"p4")])
    earlier.end("s", [1])
    later.end("s", [4])
    later.submit("s", 1, [Job(1, 1, b"again")])
    yield earlier, later
    earlier, later = Batch(), Batch()  # a job replaced; a result stored, then taken; one taken, then stored
    earlier.submit("t", 1, [Job(1, 5, b"old")])
    earlier.store_result("t", Result(1, 2, Outcome.OK, b"r2"))
    earlier.take_results([("s", 9)])
    later.submit("t", 1, [Job(1, 5, b"new")])
    later.take_results([("t", 2)])
    later.store_result("s", Result(1, 9, Outcome.RAISED, b"again"))
    yield earlier, later
    earlier, later = Batch(), Batch()  # a session written to, then forgotten; one forgotten, then back
    earlier.function("s", b"k2", b"f2")
    earlier.submit("s", 1, [Job(1, 6, b"p6")])
    earlier.store_result("s", Result(1, 7, Outcome.OK, b"r7"))
    earlier.forget("t")
    later.forget("s")
    later.session(SessionRecord("t", {"cwd": "/t"}, 3))
    later.submit("t", 1, [Job(1, 8, b"p8")])
    yield earlier, later


class AbsorbTests(SynchronousTestCase):
    """L{Batch.absorb} against the real file: committing the merged batch is committing both, in order."""

    def store(self, name: str) -> Store:
        path = os.path.join(self.mktemp() + ".d", name)
        os.makedirs(os.path.dirname(path))
        store = Store(path)
        self.addCleanup(store.close)
        store.commit(_base())
        return store

    def test_absorbed_batch_commits_as_both(self):
        for number, (earlier, later) in enumerate(_scenarios()):
            one_by_one = self.store(f"{number}-a.db")
            one_by_one.commit(earlier)
            one_by_one.commit(later)
            merged = self.store(f"{number}-b.db")
            earlier.absorb(later)
            merged.commit(earlier)
            expected, got = one_by_one.load(), merged.load()
            self.assertEqual(
                (got.sessions, got.functions, got.jobs, sorted(got.results)),
                (expected.sessions, expected.functions, expected.jobs, sorted(expected.results)),
                f"scenario {number}",
            )
            stored = {(r.session, r.seq, r.status, r.payload) for r in merged.results_of("s", [7, 9])}
            self.assertEqual(
                stored, {(r.session, r.seq, r.status, r.payload) for r in one_by_one.results_of("s", [7, 9])}
            )
