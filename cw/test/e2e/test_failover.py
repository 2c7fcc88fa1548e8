"""
Clients across master restarts: session identity (the master knows a
client's jobs by its session and their sequence numbers, the same on every
connection), reconnecting clients that resubmit what has no result, and
finding a master again through an address file.
"""

from __future__ import annotations

import collections
import os
import re
import threading
import time

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread, ClusterExecutor, MasterUnavailable
from cw.client.session import session_name
from cw.test.jobs import count_run_then_wait, nap_square, square
from cw.test.procs import Processes, executor, free_port, wait_until

#: Jobs in the restart tests, and when (results received) the master is killed.
JOBS = 2000
KILL_AT = JOBS // 3


class SessionNameTests(unittest.SynchronousTestCase):
    """A client's session name: given, or generated once per client object."""

    def test_generated(self):
        name = session_name(None)
        self.assertTrue(re.fullmatch(r"[0-9a-f]{32}", name), name)
        self.assertNotEqual(session_name(None), name)

    def test_given(self):
        self.assertEqual(session_name("analysis-7"), "analysis-7")

    def test_bad(self):
        for bad in ("", "x" * 129, "two\nlines", 42):
            with self.assertRaises(ValueError) as caught:
                session_name(bad)
            self.assertIn("session", str(caught.exception))

    def test_client_thread_keeps_one_before_start(self):
        client = ClientThread(None, "localhost:1")
        self.assertEqual(client.session_name, client.session_name)
        self.assertTrue(re.fullmatch(r"[0-9a-f]{32}", client.session_name))
        self.assertEqual(client.status(), {"connection": "not started", "session": client.session_name})
        self.assertEqual(ClientThread(None, "localhost:1", session="mine").session_name, "mine")


class SessionTests(unittest.TestCase):
    """The master learns each client's session at registration."""

    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_master_knows_sessions(self):
        """
        The status names each client's session: the one given, or the
        executor's generated one.
        """

        def body():
            address = self.procs.start_master()
            self.procs.start_worker(1)
            with executor(address, session="analysis-7") as named, executor(address) as other:
                self.assertEqual(named.session_name, "analysis-7")
                self.assertEqual(named.submit(square, 3).result(60), 9)
                sessions = {c["id"]: c["session"] for c in named.status()["clients"]}
                self.assertEqual(
                    sessions,
                    {named.session.client_id: "analysis-7", other.session.client_id: other.session_name},
                )

        return threads.deferToThread(body)

    def test_same_session_replaces_the_old_connection(self):
        """
        A second registration of a session still registered (a client that
        reconnected before the master noticed its old connection die)
        replaces it: the master keeps one client of that session, the new.
        The old client is told so: it fails for good rather than take the
        session back.
        """

        def body():
            address = self.procs.start_master()
            self.procs.start_worker(1)
            with executor(address, session="again") as old:
                old_id = old.session.client_id
                with executor(address, session="again") as new:
                    wait_until(
                        lambda: [c["id"] for c in new.status()["clients"]] == [new.session.client_id],
                        timeout=15,
                        what="the old connection of the session to be dropped",
                    )
                    self.assertNotEqual(new.session.client_id, old_id)
                    self.assertEqual(new.submit(square, 4).result(60), 16)
                    wait_until(
                        lambda: old.status()["connection"] == "lost",
                        timeout=10,
                        what="the old client to give up",
                    )
                    with self.assertRaises(MasterUnavailable):
                        old.submit(square, 5)
                    self.assertEqual(new.submit(square, 6).result(60), 36)

        return threads.deferToThread(body)


class Recovery:
    """
    When results arrive, for a restart test: how many in all, and the
    first through a new connection after the master's death, to time the
    recovery.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.died: float | None = None
        self.served_again: float | None = None
        #: The client's session (L{cw.client.session.Session}), once known.
        self.session = None

    def arrived(self) -> None:
        now = time.monotonic()
        with self.lock:
            self.count += 1
            reconnected = self.session is not None and self.session.reconnects
            if self.died is not None and self.served_again is None and reconnected:
                self.served_again = now

    def report(self, testcase, what: str) -> None:
        if self.died is not None and self.served_again is not None:
            print(f"\n{what}: served again {self.served_again - self.died:.2f} s after the master died")


class RestartTests(unittest.TestCase):
    """
    The master is SIGKILLed a third of the way through 2,000 jobs of 5 ms
    and a new one starts 2 s later: every job's result arrives, right and
    exactly once, and nothing fails.
    """

    timeout = 300

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def kill_and_restart(self, recovery: Recovery, listen: str) -> None:
        """Kill the master once KILL_AT results arrived; start another on C{listen} 2 s later."""
        wait_until(lambda: recovery.count >= KILL_AT, timeout=120, what=f"{KILL_AT} results")
        self.procs.master.kill()
        recovery.died = time.monotonic()
        self.procs.master.wait(30)
        time.sleep(2)  # the scenario: the master is down for two seconds
        self.procs.start_master(listen=listen)

    def check_futures(self, futures) -> None:
        """Each future holds its job's right value within a minute in all (none failed)."""
        deadline = time.monotonic() + 60
        for i, future in enumerate(futures):
            self.assertEqual(future.result(max(0.1, deadline - time.monotonic())), i * i)

    def test_executor_rides_through_a_restart(self):
        def body():
            listen = f"tcp:{free_port()}:interface=127.0.0.1"
            address = self.procs.start_master(listen=listen)
            self.procs.start_worker(1)
            self.procs.start_worker(1)
            recovery = Recovery()
            with executor(address, reconnect_timeout=60) as ex:
                recovery.session = ex.session
                futures = [ex.submit(nap_square, i) for i in range(JOBS)]
                for future in futures:
                    future.add_done_callback(lambda _: recovery.arrived())
                self.kill_and_restart(recovery, listen)
                self.check_futures(futures)
                self.assertEqual(recovery.count, JOBS)
                self.assertEqual(ex.outstanding(), [])
                self.assertEqual(ex.session.reconnects, 1)
                self.assertGreater(ex.session.resubmitted, 0)
            recovery.report(self, "ClusterExecutor")

        return threads.deferToThread(body)

    def test_client_thread_rides_through_a_restart(self):
        def body():
            listen = f"tcp:{free_port()}:interface=127.0.0.1"
            address = self.procs.start_master(listen=listen)
            self.procs.start_worker(1)
            self.procs.start_worker(1)
            recovery = Recovery()
            calls: collections.Counter = collections.Counter()
            values = {}

            def callback(jobid, value):
                calls[jobid] += 1
                values[jobid] = value
                recovery.arrived()

            with ClientThread(callback, address, reconnect_timeout=60) as client:
                recovery.session = client.session
                for i in range(JOBS):
                    client.submit(i, nap_square, i)
                self.kill_and_restart(recovery, listen)
                self.assertIn(client.status()["connection"], ("connected", "reconnecting"))
                client.wait(60)
            self.assertEqual(values, {i: i * i for i in range(JOBS)})
            self.assertEqual(set(calls.values()), {1}, "a callback ran more than once")
            recovery.report(self, "ClientThread")

        return threads.deferToThread(body)

    def test_new_master_found_through_the_address_file(self):
        """
        The new master listens on another port: clients and workers that
        found the first through its address file (C{file:PATH}) read the
        file again and follow.
        """

        def body():
            address = self.procs.start_master()
            found_through = f"file:{self.procs.directory / 'master.address'}"
            self.procs.start_worker(1, True, address=found_through)
            self.procs.start_worker(1, True, address=found_through)
            recovery = Recovery()
            with executor(found_through, reconnect_timeout=60) as ex:
                recovery.session = ex.session
                self.assertEqual(ex.session.address, address)
                futures = [ex.submit(nap_square, i) for i in range(JOBS)]
                for future in futures:
                    future.add_done_callback(lambda _: recovery.arrived())
                self.kill_and_restart(recovery, "tcp:0:interface=127.0.0.1")
                self.assertNotEqual(self.procs.address, address)
                self.check_futures(futures)
                self.assertEqual(ex.session.address, self.procs.address)
                self.assertEqual(len(ex.status()["workers"]), 2)
            recovery.report(self, "address file, new port")

        return threads.deferToThread(body)

    def test_map_resends_its_function(self):
        """A map's function, cached per connection, is defined again on the new one."""

        def body():
            listen = f"tcp:{free_port()}:interface=127.0.0.1"
            address = self.procs.start_master(listen=listen)
            self.procs.start_worker(2)
            recovery = Recovery()
            with executor(address, reconnect_timeout=60) as ex:
                results = ex.map(nap_square, range(600), timeout=90)
                first = [next(results) for _ in range(50)]
                recovery.count = KILL_AT
                self.kill_and_restart(recovery, listen)
                self.assertEqual(first + list(results), [i * i for i in range(600)])

        return threads.deferToThread(body)


class ReconnectWindowTests(unittest.TestCase):
    """While the master is away: status, cancelling, and giving up after the window."""

    timeout = 120

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_gives_up_after_the_window(self):
        """
        With no master back, status() says reconnecting (and why) and
        futures stay pending; after reconnect_timeout they fail with
        MasterUnavailable naming the master and what to do.  A job submitted
        meanwhile waits and fails with them; one cancelled meanwhile is
        cancelled.
        """

        def body():
            address = self.procs.start_master()
            ex = ClusterExecutor(address, reconnect_timeout=4)
            try:
                queued = ex.submit(square, 2)  # no worker: stays queued
                wait_until(lambda: ex.status()["queued"] == 1, timeout=10, what="the job to be queued")
                self.procs.master.kill()
                died = time.monotonic()
                status = wait_until(
                    lambda: (s := ex.status())["connection"] == "reconnecting" and s,
                    timeout=10,
                    what="status to say reconnecting",
                )
                self.assertIn("lost the connection", status["reason"])
                self.assertEqual(status["outstanding"], 1)
                self.assertEqual(status["session"], ex.session_name)
                later = ex.submit(square, 3)
                cancelled = ex.submit(square, 4)
                self.assertTrue(cancelled.cancel())
                self.assertFalse(queued.done())
                error = queued.exception(20)
                waited = time.monotonic() - died
                self.assertIsInstance(error, MasterUnavailable)
                self.assertIn(address, str(error))
                self.assertIn("reconnect_timeout", str(error))
                self.assertIn("Start a master", str(error))
                self.assertGreater(waited, 3.5)
                self.assertLess(waited, 10)
                self.assertIsInstance(later.exception(5), MasterUnavailable)
                self.assertEqual(ex.status()["connection"], "lost")
                self.assertRaises(MasterUnavailable, ex.submit, square, 5)
            finally:
                ex.shutdown(wait=False, cancel_futures=True)

        return threads.deferToThread(body)

    def test_zero_fails_at_once(self):
        """reconnect_timeout=0: the first loss fails every future (the old behaviour)."""

        def body():
            address = self.procs.start_master()
            ex = ClusterExecutor(address, reconnect_timeout=0)
            try:
                queued = ex.submit(square, 2)
                wait_until(lambda: ex.status()["queued"] == 1, timeout=10, what="the job to be queued")
                self.procs.master.kill()
                error = queued.exception(10)
                self.assertIsInstance(error, MasterUnavailable)
                self.assertIn("lost the connection", str(error))
            finally:
                ex.shutdown(wait=False, cancel_futures=True)

        return threads.deferToThread(body)


class HandOverTests(unittest.TestCase):
    """A worker keeps what finished while its master was away and hands it to the next."""

    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_job_finished_while_the_master_was_down_not_run_again(self):
        """
        A long job finishes while no master runs: after the restart its
        client gets the result the worker kept, and the job (whose runs
        leave marker files) ran once.
        """
        runs = os.path.abspath(self.mktemp())
        os.mkdir(runs)
        flag = os.path.abspath(self.mktemp())

        def body():
            listen = f"tcp:{free_port()}:interface=127.0.0.1"
            address = self.procs.start_master(listen=listen)
            worker = self.procs.start_worker(1)
            with executor(address, reconnect_timeout=60) as ex:
                future = ex.submit(count_run_then_wait, runs, flag, "long")
                wait_until(lambda: os.listdir(runs), timeout=30, what="the job to start")
                self.procs.master.kill()
                self.procs.master.wait(30)
                with open(flag, "w"):
                    pass  # the job finishes now, with no master
                wait_until(
                    lambda: "Keeping the results of 1 jobs" in self.procs.log_tail(worker, 100),
                    timeout=30,
                    what="the worker to keep the result",
                )
                self.procs.start_master(listen=listen)
                self.assertEqual(future.result(30), "long")
                self.assertEqual(ex.submit(square, 5).result(30), 25)
                self.assertEqual(len(os.listdir(runs)), 1, "the job ran again")
            self.assertIn("handed over 1 results", self.procs.log_tail(self.procs.master, 100))

        return threads.deferToThread(body)


class DurableRestartTests(unittest.TestCase):
    """A client riding through the restart of a master with --state resubmits only what it lost."""

    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_jobs_the_master_kept_are_not_sent_again(self):
        """
        Jobs queued on a master with --state outlive its SIGKILL: after the
        restart the client sends none of them again (the master would
        refuse them as duplicates) and every future gets its value.
        """
        state = os.path.abspath(self.mktemp())

        def body():
            listen = f"tcp:{free_port()}:interface=127.0.0.1"
            address = self.procs.start_master("--state", state, listen=listen)
            with executor(address, reconnect_timeout=60) as ex:
                futures = [ex.submit(square, i) for i in range(50)]
                ex.session.wait_stored(30)
                self.procs.master.kill()
                self.procs.master.wait(30)
                wait_until(
                    lambda: ex.status()["connection"] == "reconnecting", timeout=10, what="reconnecting"
                )
                self.procs.start_master("--state", state, listen=listen)
                wait_until(lambda: ex.session.reconnects, timeout=30, what="the client to reconnect")
                self.assertEqual(ex.session.resubmitted, 0, "jobs the master kept were sent again")
                self.procs.start_worker(1)
                deadline = time.monotonic() + 60
                for i, future in enumerate(futures):
                    self.assertEqual(future.result(max(0.1, deadline - time.monotonic())), i * i)
            self.assertNotIn("refused them", self.procs.log_tail(self.procs.master, 200))

        return threads.deferToThread(body)
