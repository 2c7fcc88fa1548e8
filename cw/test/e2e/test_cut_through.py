"""
Cut-through forwarding (L{cw.wire.forwarding}), end to end: a real
C{twistd} master and workers on loopback, the client playing a process on
another machine.  A worker's big result goes on to its client as it
arrives at the master; a result whose box is changed in transit, or whose
worker's connection breaks mid-box, is voided on its way to the client
(never handed to the program), the job runs again, and the client gets
the right result over the connection it had; a client that leaves while
its result passes leaves the master serving others.

Faults are made by a TCP relay in this process (L{Relay}) between one
peer and the master, which changes one byte or cuts the connection once,
at a given offset of one direction's bytes: an attacker on the path, or a
link that breaks.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial import unittest

from cw.client import MasterUnavailable, master_status
from cw.test.jobs import payload_bytes, square, timed_digest
from cw.test.procs import (
    DEADLINE,
    Processes,
    arguments_travel,
    executor,
    on_another_machine,
    wait_until,
)

MB = 1 << 20
#: Seconds a stalled peer holds its bytes back: several heartbeat timeouts of the master in the stall test.
STALL = 6

#: A result far bigger than any socket buffer and the master's window.
HUGE = 200 * MB


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


class Relay:
    """
    A TCP relay from a port of this process to the master's: once, on the
    first connection whose bytes in direction C{direction} (C{"up"}: from
    the peer towards the master, C{"down"}: back) reach C{at}, it flips
    the byte there (C{fault="flip"}), closes both sides (C{"cut"}) or
    holds the rest back for L{STALL} seconds (C{"stall"}).
    Later connections pass untouched.  Closed at the test's end.
    """

    def __init__(self, testcase, master_address: str, direction: str, fault: str, at: int) -> None:
        self.upstream = int(re.search(r"port=(\d+)", master_address).group(1))
        self.master_address = master_address
        self.direction, self.fault, self.at = direction, fault, at
        #: Set once the fault happened.
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        testcase.addCleanup(self.close)

    @property
    def address(self) -> str:
        return re.sub(r"port=\d+", f"port={self.port}", self.master_address)

    def close(self) -> None:
        with self._lock:
            _drop([self.listener, *self._sockets])

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self.listener.accept()
            except OSError:
                return
            master = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._sockets += [peer, master]
            for source, sink, direction in ((peer, master, "up"), (master, peer, "down")):
                threading.Thread(
                    target=self._pump, args=(source, sink, direction, peer, master), daemon=True
                ).start()

    def _pump(self, source, sink, direction, *both) -> None:
        buffer = bytearray(1 << 18)
        seen = 0
        try:
            while True:
                n = source.recv_into(buffer)
                if not n:
                    sink.shutdown(socket.SHUT_WR)
                    return
                data = memoryview(buffer)[:n]
                if direction == self.direction and seen <= self.at < seen + n and not self.done.is_set():
                    if self.fault == "cut":
                        sink.sendall(data[: self.at - seen])
                        self.done.set()
                        _drop(both)
                        return
                    if self.fault == "stall":
                        # Hold the rest back for a while, as a stopped peer would.
                        sink.sendall(data[: self.at - seen])
                        self.done.set()
                        time.sleep(STALL)
                        data = data[self.at - seen :]
                        seen = self.at
                        n = len(data)
                    else:
                        buffer[self.at - seen] ^= 0x01
                        self.done.set()
                seen += n
                sink.sendall(data)
        except OSError:
            _drop(both)


def _drop(sockets) -> None:
    """Close both sides of a relayed connection (shut down first: that wakes a thread blocked reading)."""
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


class CutThroughCase:
    """
    What the tests of both ways share (a mixin before C{unittest.TestCase}):
    a cluster of real processes, faults on the way to its master.
    """

    timeout = 300

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def cut_through(self) -> dict:
        return master_status(self.procs.address)["cut_through"]

    def relay(self, fault: str, direction: str = "up") -> Relay:
        """A L{Relay} to this test's master, C{fault} happening 50 MB into C{direction}."""
        return Relay(self, self.procs.address, direction, fault, 50 * MB)

    def fault_on_sender(self, fault: str) -> defer.Deferred:
        """
        The big value's sender has its bytes to the master suffer C{fault}
        50 MB into it; fires with the master's log once the test's checks passed.
        """
        raise NotImplementedError

    def test_changed_byte_voided(self):
        """
        One byte of the big value changed on its way to the master (an
        attacker on the path): the master drops its sender, saying why,
        and its receiver never sees it changed (L{fault_on_sender}).
        """

        def check(master_log):
            self.assertRegex(master_log, r"dropping the connection: sent a box with a wrong MAC")

        return self.fault_on_sender("flip").addCallback(check)

    def test_cut_off_mid_value_voided(self):
        """The sender's connection breaks 50 MB into the value: the same, without an attacker."""
        return self.fault_on_sender("cut")


class ResultCutThroughTests(CutThroughCase, unittest.TestCase):
    """A worker's big result on its way through the master to a client on another machine."""

    def setUp(self):
        super().setUp()
        arguments_travel(self)

    def test_passed_on_as_it_arrives(self):
        """
        A 200 MB result reaches its client whole and unchanged, passed on
        by the master as it arrived (counted in its status); tiny jobs
        submitted around it all get their own results.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            self.procs.start_worker(1)
            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(square, 2).result(DEADLINE), 4)
                tiny = {i: ex.submit(square, i) for i in range(100)}
                huge = ex.submit(payload_bytes, HUGE, 5)
                tiny.update({i: ex.submit(square, i) for i in range(100, 300)})
                for i, future in tiny.items():
                    self.assertEqual(future.result(DEADLINE), i * i)
                self.assertEqual(sha(huge.result(DEADLINE)), sha(payload_bytes(HUGE, 5)))
            self.assertEqual(self.cut_through(), {"results": 1, "arguments": 0, "voided": 0})

        return threads.deferToThread(body)

    def fault_on_sender(self, fault: str) -> defer.Deferred:
        """
        A worker whose bytes to the master suffer C{fault} 50 MB into its
        200 MB result: the client, which got part of the result passed on,
        discards it, and gets the right result from the job's next run
        over the connection it had; the master voided one result.
        """

        def body():
            self.procs.start_master()
            relay = self.relay(fault)
            self.procs.start_worker(1, True, address=relay.address)
            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(square, 3).result(DEADLINE), 9)
                huge = ex.submit(payload_bytes, HUGE, 6)
                self.assertEqual(sha(huge.result(DEADLINE * 2)), sha(payload_bytes(HUGE, 6)))
                self.assertTrue(relay.done.is_set(), "the fault never happened")
                self.assertEqual(ex.session.reconnects, 0)
                self.assertEqual(ex.submit(square, 4).result(DEADLINE), 16)
            self.assertEqual(self.cut_through(), {"results": 1, "arguments": 0, "voided": 1})
            return Path(self.procs.master.log).read_text(errors="replace")

        return threads.deferToThread(body)

    def test_slow_result_drops_no_client(self):
        """
        The worker stalls 50 MB into its result (its bytes held back for
        6 s; the master's client timeout is 1.5 s): the client, whose
        heartbeats wait behind the result the master is passing on, is not
        taken for a silent one, and gets the result over the same connection.
        """

        def body():
            self.procs.start_master(
                "--heartbeat", "0.5", "--heartbeat-timeout", "60", "--client-timeout", "1.5"
            )
            relay = self.relay("stall")
            self.procs.start_worker(1, True, address=relay.address)
            with executor(self.procs.address) as ex:
                huge = ex.submit(payload_bytes, HUGE, 12)
                self.assertEqual(sha(huge.result(DEADLINE * 2)), sha(payload_bytes(HUGE, 12)))
                self.assertTrue(relay.done.is_set(), "the stall never happened")
                self.assertEqual(ex.session.reconnects, 0)
            self.assertEqual(self.cut_through()["results"], 1)
            self.assertNotIn("gave no sign of life", self.procs.log_tail(self.procs.master, 200))

        return threads.deferToThread(body)

    def test_client_gone_mid_result(self):
        """
        A client whose connection breaks while its 200 MB result passes:
        its future fails (it does not reconnect); the master reads the
        worker again and serves another client's big result whole.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            relay = self.relay("cut", "down")
            with executor(relay.address, reconnect_timeout=0) as gone:
                self.assertEqual(gone.submit(square, 5).result(DEADLINE), 25)
                error = gone.submit(payload_bytes, HUGE, 7).exception(DEADLINE)
                self.assertIsInstance(error, MasterUnavailable)
            with executor(self.procs.address) as ex:
                self.assertEqual(
                    sha(ex.submit(payload_bytes, HUGE, 8).result(DEADLINE)), sha(payload_bytes(HUGE, 8))
                )
            wait_until(lambda: self.cut_through()["results"] == 2, what="the master to count both results")

        return threads.deferToThread(body)


class ArgumentCutThroughTests(CutThroughCase, unittest.TestCase):
    """
    A client's big argument, asked for by the master once its job is
    handed to a worker on another machine, on its way through the master.
    """

    def test_passed_on_as_it_arrives(self):
        """
        A 200 MB argument reaches its job whole and unchanged, passed on by
        the master as it arrived; tiny jobs around it get their own results.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            self.procs.start_worker(1)
            on_another_machine(self)
            with executor(self.procs.address) as ex:
                self.assertTrue(ex.session.references, "the client does not keep its big arguments")
                self.assertEqual(ex.submit(square, 2).result(DEADLINE), 4)
                tiny = {i: ex.submit(square, i) for i in range(100)}
                blob = payload_bytes(HUGE, 9)
                record = os.path.abspath(self.mktemp())
                huge = ex.submit(timed_digest, blob, record)
                tiny.update({i: ex.submit(square, i) for i in range(100, 300)})
                for i, future in tiny.items():
                    self.assertEqual(future.result(DEADLINE), i * i)
                self.assertEqual(huge.result(DEADLINE)[1:], (HUGE, sha(blob)))
                self.assertEqual(ex.submit(square, 5).result(DEADLINE), 25)
            with open(record) as f:
                self.assertEqual(f.read(), "ran\n")
            self.assertEqual(self.cut_through(), {"results": 0, "arguments": 1, "voided": 0})

        return threads.deferToThread(body)

    def fault_on_sender(self, fault: str) -> defer.Deferred:
        """
        A client whose bytes to the master suffer C{fault} 50 MB into the
        200 MB argument it was asked for: the worker, which got part of it
        passed on, discards it and keeps its connection; the job runs once,
        with the whole argument, after the client reconnected.
        """

        def body():
            self.procs.start_master()
            self.procs.start_worker(1)
            worker = master_status(self.procs.address)["workers"][0]["id"]
            on_another_machine(self)
            relay = self.relay(fault)
            record = os.path.abspath(self.mktemp())
            with executor(relay.address, reconnect_timeout=120) as ex:
                self.assertEqual(ex.submit(square, 3).result(DEADLINE), 9)
                blob = payload_bytes(HUGE, 10)
                future = ex.submit(timed_digest, blob, record)
                self.assertEqual(future.result(DEADLINE * 2)[1:], (HUGE, sha(blob)))
                self.assertTrue(relay.done.is_set(), "the fault never happened")
                self.assertEqual(ex.session.reconnects, 1)
            with open(record) as f:
                self.assertEqual(f.read(), "ran\n")
            status = master_status(self.procs.address)
            self.assertEqual(
                [w["id"] for w in status["workers"]], [worker], "the worker's connection was lost"
            )
            # (Its next run's argument may go whole: the voided box may still be
            # on its way to the worker when it comes.)
            self.assertEqual(status["cut_through"]["voided"], 1)
            self.assertIn(
                "discarded a box its sender voided", self.procs.log_tail(self.procs.workers[0], 200)
            )
            return self.procs.log_tail(self.procs.master, 200)

        return threads.deferToThread(body)

    def test_slow_argument_drops_no_worker(self):
        """
        The client stalls 50 MB into the argument (its bytes held back for
        6 s; the master's heartbeat timeout is 1.5 s): the worker, whose
        heartbeats wait behind the argument the master is passing on, is not
        taken for a silent one; the job runs once with the whole argument.
        """

        def body():
            self.procs.start_master("--heartbeat", "0.5", "--heartbeat-timeout", "1.5")
            self.procs.start_worker(1)
            worker = master_status(self.procs.address)["workers"][0]["id"]
            on_another_machine(self)
            relay = self.relay("stall")
            record = os.path.abspath(self.mktemp())
            with executor(relay.address) as ex:
                blob = payload_bytes(HUGE, 11)
                future = ex.submit(timed_digest, blob, record)
                self.assertEqual(future.result(DEADLINE * 2)[1:], (HUGE, sha(blob)))
                self.assertTrue(relay.done.is_set(), "the stall never happened")
            with open(record) as f:
                self.assertEqual(f.read(), "ran\n")
            status = master_status(self.procs.address)
            self.assertEqual([w["id"] for w in status["workers"]], [worker], "the worker was dropped")
            self.assertEqual(status["cut_through"]["arguments"], 1)

        return threads.deferToThread(body)
