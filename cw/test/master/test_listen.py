"""
A master that cannot listen (its port, or its dashboard's, in use) or
start says so in one line and exits non-zero, as a real twistd process.
"""

from __future__ import annotations

import socket
import subprocess

from twisted.trial import unittest

from cw.test.procs import DEADLINE, Processes


class BusyPortTests(unittest.TestCase):
    def busy_port(self) -> int:
        """A loopback port this test holds open."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        return holder.getsockname()[1]

    def run_master(self, *options: str) -> tuple[int, str]:
        procs = Processes(self, self.mktemp())
        master = procs.spawn("master", ["cw-master", "--insecure", *options])
        try:
            status = master.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.fail("the master kept running:\n" + procs.log_tail(master))
        return status, master.log.read_text()

    def assert_one_line(self, status: int, log: str, address: str, option: str) -> None:
        self.assertNotEqual(status, 0, log)
        self.assertNotIn("Traceback", log)
        lines = [line for line in log.splitlines() if "could not listen" in line]
        self.assertEqual(len(lines), 1, log)
        self.assertIn(address, lines[0])
        self.assertIn("Address already in use", lines[0])
        self.assertIn(option, lines[0])

    def test_master_port_in_use(self):
        """C{--port} on a port in use: one line naming it and C{--port}, exit status 1."""
        listen = f"tcp:{self.busy_port()}:interface=127.0.0.1"
        status, log = self.run_master("--port", listen)
        self.assert_one_line(status, log, listen, "--port")
        self.assertEqual(status, 1)

    def test_dashboard_port_in_use(self):
        """C{--web} on a port in use: the same, naming C{--web}."""
        web = f"tcp:{self.busy_port()}:interface=127.0.0.1"
        status, log = self.run_master("--port", "tcp:0:interface=127.0.0.1", "--web", web)
        self.assert_one_line(status, log, web, "--web")

    def test_address_file_unwritable(self):
        """Listening, but its --address-file cannot be written: one line, exit status 1."""
        missing = self.mktemp() + "/no/such/dir/master.address"
        status, log = self.run_master("--port", "tcp:0:interface=127.0.0.1", "--address-file", missing)
        self.assertEqual(status, 1, log)
        self.assertNotIn("Traceback", log)
        [line] = [line for line in log.splitlines() if "could not start" in line]
        self.assertIn("master.address", line)
