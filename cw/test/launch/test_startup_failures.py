"""
A master that cannot listen where it is told, on its port or its
dashboard's, stops at start-up with a log line saying why, rather than
running on without it.  Real C{twistd} processes.
"""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

from cw.test.procs import Processes

#: Seconds a master that cannot listen may take to exit.
EXIT_WITHIN = 30


class ListenFailureTests(unittest.TestCase):
    timeout = 120

    def busy_port(self) -> int:
        """A loopback TCP port that this test keeps listening on."""
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return sock.getsockname()[1]

    def exits(self, *args: str) -> str:
        """Run C{cw-master ARGS}; it must exit within L{EXIT_WITHIN} s; return its log."""
        procs = Processes(self, self.mktemp())
        master = procs.spawn("master", ["cw-master", *args])
        master.wait(EXIT_WITHIN)
        return Path(master.log).read_text()

    def test_master_port_busy(self):
        def body():
            port = self.busy_port()
            log = self.exits("--port", f"tcp:{port}:interface=127.0.0.1")
            self.assertIn(f"cw master could not listen on tcp:{port}:interface=127.0.0.1", log)

        return threads.deferToThread(body)

    def test_dashboard_port_busy(self):
        def body():
            port = self.busy_port()
            log = self.exits("--port", "tcp:0:interface=127.0.0.1", "--web", f"tcp:{port}")
            self.assertIn(f"cw dashboard could not listen on tcp:{port}:interface=127.0.0.1", log)

        return threads.deferToThread(body)
