"""
Clients across master restarts: session identity (the master knows a
client's jobs by its session and their sequence numbers, the same on every
connection).
"""

from __future__ import annotations

import re

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread
from cw.client.session import session_name
from cw.test.jobs import square
from cw.test.procs import Processes, executor, wait_until


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

        return threads.deferToThread(body)
