"""
Limits the master keeps against peers that misbehave or overwhelm it:
malformed commands from authenticated peers (L{cw.core.validation}), descriptors
and unauthenticated connections, a client's queued jobs (bytes and count)
and its unsent results.  Pure checks are tested directly; malformed
commands against the master's protocol connected in memory; the other
promises end to end against real C{twistd} processes on loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import cloudpickle
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import connectProtocol
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.trial import unittest

from cw.client import ClusterExecutor, master_status
from cw.client.session import client_context
from cw.core import limits as core_limits
from cw.core import validation as V
from cw.master.service import Master
from cw.test.jobs import square
from cw.test.peers import authenticated_to_master
from cw.test.procs import (
    DEADLINE,
    Processes,
    arguments_travel,
    child_env,
    executor,
    held_client,
    memory_files,
    peak_rss_mib,
    reset_peak_rss,
    rss_kib,
    stop_process,
    wait_until,
)
from cw.wire import commands as P
from cw.wire import limits as L
from cw.wire.address import client_endpoint
from cw.wire.auth import AuthGate, authenticate
from cw.wire.secret import load_secret

log = Logger()

#: Seconds any single network step of these tests may take.
STEP = 15

MIB = 1 << 20


class ValidationUnitTests(unittest.SynchronousTestCase):
    """The field checks themselves."""

    def test_context(self):
        good = {"cwd": "/tmp", "path": ["", "/usr/lib"], "weight": 3, "extra": {"kept": 1}}
        self.assertEqual(V.check_context(good), 3)
        self.assertEqual(V.check_context({"cwd": "/", "path": []}), 1)
        # Directories may have any name, even one that is not valid UTF-8.
        self.assertEqual(V.check_context({"cwd": "/tmp/a\tb\udcff", "path": ["/x\ny"]}), 1)
        for bad in (
            [],
            "x",
            {"path": []},
            {"cwd": "/", "path": "/usr"},
            {"cwd": "/", "path": [1]},
            {"cwd": "/", "path": ["x" * (V.MAX_PATH + 1)]},
            {"cwd": "/", "path": [], "weight": 0},
            {"cwd": "/", "path": [], "weight": True},
            {"cwd": "/", "path": [], "weight": V.MAX_WEIGHT + 1},
            {"cwd": "", "path": []},
        ):
            self.assertRaises(V.BadCommand, V.check_context, bad)

    def test_peer(self):
        self.assertEqual(V.check_peer("node1", 42), "node1:42")
        for host, pid in (
            ("", 1),
            ("h" * 300, 1),
            ("a\nforged line", 1),
            (None, 1),
            ("h", 0),
            ("h", 1 << 40),
        ):
            self.assertRaises(V.BadCommand, V.check_peer, host, pid)

    def test_session(self):
        self.assertEqual(V.check_session("run-7"), "run-7")
        for bad in ("", "s" * (V.MAX_SESSION + 1), "a\nforged line", None, 7):
            self.assertRaises(V.BadCommand, V.check_session, bad)

    def test_jobs(self):
        V.check_jobs([P.Job(0, 1, b"p", P.encode_options(timeout=2, max_attempts=1, priority=-3))])
        V.check_jobs([P.Job(0, 1, b"p", P.encode_options(max_attempts=10**30, priority=10**30))])
        V.check_jobs([P.Job(0, 1, b"p", P.encode_options(echo=True, log=20))])
        for options in (
            b"[]",
            b"{bad",
            b'{"timeout": -1}',
            b'{"max_attempts": 0}',
            b'{"priority": "high"}',
            b'{"echo": 1}',
            b'{"log": "INFO"}',
            b'{"log": -1}',
        ):
            self.assertRaises(V.BadCommand, V.check_jobs, [P.Job(0, 1, b"p", options)])
        self.assertRaises(V.BadCommand, V.check_jobs, [P.Job(0, 0, b"p")])

    def test_outputs(self):
        ok = [P.Output(1, 1, P.Stream.STDOUT, b"x"), P.Output(1, 1, P.Stream.LOG, b"{}")]
        self.assertEqual(V.check_outputs("node7", ok), "node7")
        self.assertRaises(V.BadCommand, V.check_outputs, "node7", [P.Output(1, 1, 7, b"x")])
        for host in ("", "a\nforged line", "h" * 300):
            self.assertRaises(V.BadCommand, V.check_outputs, host, ok)

    def test_results_and_keys(self):
        V.check_results([P.Result(1, 1, P.Outcome.CRASHED, b"")])
        self.assertRaises(V.BadCommand, V.check_results, [P.Result(1, 1, 9, b"")])
        self.assertEqual(V.check_function_key(b"k"), b"k")
        self.assertRaises(V.BadCommand, V.check_function_key, b"")


class LooseSubmitJobs(amp.Command):
    """C{SubmitJobs} with its batch as raw bytes, to send a malformed one."""

    commandName = P.SubmitJobs.commandName
    arguments = [(b"jobs", amp.String())]
    requiresAnswer = False


class LooseRegisterWorker(amp.Command):
    """C{RegisterWorker} with a string for slots."""

    commandName = P.RegisterWorker.commandName
    arguments = [
        (b"version", amp.Integer()),
        (b"host", amp.Unicode()),
        (b"pid", amp.Integer()),
        (b"slots", amp.String()),
        (b"capacity", P.JSON(optional=True)),
    ]
    response = [(b"worker_id", amp.Integer())]


#: Answers to questions the master never asked (the tag is far past any
#: it has used on a new connection), and an error answer missing its fields.
UNASKED_ANSWER = amp.AmpBox(_answer=b"ffffff")
UNASKED_ERROR = amp.AmpBox(_error=b"ffffff", _error_code=b"UNKNOWN", _error_description=b"no")
BARE_ERROR = amp.AmpBox(_error=b"ffffff")


class Peer(AuthGate, amp.AMP):
    """A hand-made peer that authenticates with the real secret, then says what a test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.lost.callback(None)


class RoomIgnoringClient(Peer):
    """A client that sends jobs whatever room the master gives it, and keeps its results."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[P.Result] = []

    @P.JobResults.responder
    def job_results(self, results):
        self.results.extend(results)
        return {}

    @P.JobRoom.responder
    def job_room(self, bytes, jobs):
        return {}

    @P.Heartbeat.responder
    def heartbeat(self):
        return {}


@defer.inlineCallbacks
def authenticated_peer(address: str, role: str, kind: type[Peer] = Peer):
    """Connect a C{kind} of L{Peer} to the master at C{address} and run the handshake as C{role}."""
    peer = yield connectProtocol(client_endpoint(reactor, address), kind()).addTimeout(STEP, reactor)
    # The real handshake: it also starts the session whose MACs every later box needs.
    yield authenticate(peer, load_secret(), role, address).addTimeout(STEP, reactor)
    return peer


def ignore_answer(answer) -> None:
    """The answer to a malformed command never comes: the connection closes instead."""
    if isinstance(answer, defer.Deferred):
        answer.addErrback(lambda _: None)


def register_client(peer: Peer, **overrides) -> defer.Deferred:
    fields = {
        "version": P.PROTOCOL_VERSION,
        "host": "test",
        "pid": os.getpid(),
        "context": client_context(),
        "session": "test",
    }
    return peer.callRemote(P.RegisterClient, **{**fields, **overrides})


def register_worker(peer: Peer, **overrides) -> defer.Deferred:
    fields = {
        "version": P.PROTOCOL_VERSION,
        "host": "test",
        "pid": os.getpid(),
        "slots": 1,
        "capacity": {"cpus": 1},
    }
    return peer.callRemote(P.RegisterWorker, **{**fields, **overrides})


class ValidationTests(unittest.SynchronousTestCase):
    """
    Malformed commands from authenticated peers, against a real master
    (L{Master} and its L{MasterProtocol}, connected in memory): each ends
    its connection with one clear log line naming what was wrong and no
    unhandled error (trial fails a test that logs one), and the master
    keeps serving a legitimate client.
    """

    def setUp(self):
        self.master = Master(Clock(), secret=os.urandom(32), heartbeat=0)
        self.warnings: list[str] = []

        def observe(event):
            if event.get("log_level") is LogLevel.warn:
                self.warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def answered(self, pump, d: defer.Deferred):
        """Flush C{pump}; C{d} must have fired with an answer."""
        pump.flush()
        return self.successResultOf(d)

    def test_malformed_commands_drop_the_connection(self):
        def bad_register(role, **fields):
            register = register_client if role == "client" else register_worker
            return lambda peer, pump: register(peer, **fields)

        def after_client(send):
            def go(peer, pump):
                self.answered(pump, register_client(peer))
                return send(peer)

            return go

        def after_worker(send):
            def go(peer, pump):
                self.answered(pump, register_worker(peer))
                return send(peer)

            return go

        cases = [
            ("client", "context", bad_register("client", context=[])),
            ("client", "context", bad_register("client", context={"cwd": "/", "path": [], "weight": -1})),
            ("client", "host", bad_register("client", host="a\nCLIENT 1 connected from forged")),
            ("client", "pid", bad_register("client", pid=-5)),
            ("worker", "slots", bad_register("worker", slots=0)),
            ("worker", "capacity", bad_register("worker", capacity={"cpus": 1, "gpus": "0,1"})),
            ("worker", "capacity", bad_register("worker", capacity={"cpus": 1, "tags": ["x\nforged"]})),
            (
                "worker",
                "slots",
                lambda peer, pump: peer.callRemote(
                    LooseRegisterWorker, version=P.PROTOCOL_VERSION, host="h", pid=1, slots=b"two"
                ),
            ),
            ("worker", "registered as a client", bad_register("client")),
            ("client", "registered a second time", after_client(lambda peer: register_client(peer))),
            (
                "client",
                "truncated",
                after_client(lambda peer: peer.callRemote(LooseSubmitJobs, jobs=b"\0" * 30)),
            ),
            (
                "client",
                "timeout",
                after_client(
                    lambda peer: peer.callRemote(
                        P.SubmitJobs, jobs=[P.Job(0, 1, b"x", b'{"timeout": "soon"}')]
                    )
                ),
            ),
            (
                "client",
                "function key",
                after_client(
                    lambda peer: peer.callRemote(P.DefineFunction, client=0, key=b"", function=b"f")
                ),
            ),
            ("client", "count", after_client(lambda peer: peer.callRemote(P.AwaitWorkers, count=-1))),
            # Version reports and probes (issue 17).
            ("client", "versions", bad_register("client", versions=["3.11"])),
            ("worker", "versions", bad_register("worker", versions={"python": "3\n11"})),
            (
                "client",
                "packages",
                after_client(lambda peer: peer.callRemote(P.ProbeWorkers, packages="numpy", wait=1.0)),
            ),
            (
                "client",
                "wait",
                after_client(lambda peer: peer.callRemote(P.ProbeWorkers, packages=[], wait=-1.0)),
            ),
            # Boxes AMP itself would choke on (cw.wire.private.CheckedAnswers).
            ("client", "answers no question", after_client(lambda peer: peer.sendBox(UNASKED_ANSWER))),
            ("worker", "answers no question", after_worker(lambda peer: peer.sendBox(UNASKED_ERROR))),
            ("worker", "no error code", after_worker(lambda peer: peer.sendBox(BARE_ERROR))),
            ("client", "neither a command", lambda peer, pump: peer.sendBox(amp.AmpBox(hello=b"x"))),
            (
                "worker",
                "unknown status",
                after_worker(lambda peer: peer.callRemote(P.JobResults, results=[P.Result(1, 1, 77, b"")])),
            ),
        ]
        for role, what, send in cases:
            before = len(self.warnings)
            peer = Peer()
            server, pump = authenticated_to_master(self.master, peer, role)
            ignore_answer(send(peer, pump))
            pump.flush()
            self.assertTrue(peer.lost.called, f"the connection stayed up ({what})")
            self.assertIn("sent a malformed", server.rejected or "", what)
            self.assertIn(what, server.rejected, what)
            new = self.warnings[before:]
            lines = [line for line in new if "sent a malformed" in line]
            self.assertEqual(len(lines), 1, (what, new))
            self.assertIn(what, lines[0])
        self.assertFalse(
            [line for line in self.warnings if re.search(r"^CLIENT 1 connected from forged", line, re.M)]
        )

        # The master still serves a legitimate client.
        peer = Peer()
        _, pump = authenticated_to_master(self.master, peer, "client")
        self.assertIn("client_id", self.answered(pump, register_client(peer)))
        self.assertIn("status", self.answered(pump, peer.callRemote(P.GetStatus)))
        self.assertFalse(peer.lost.called)


class QueueLimitTests(unittest.TestCase):
    """
    A client's queue on the master is bounded in bytes and in jobs: the
    client sends only what fits in the room the master gave it (at most one
    job more), holds the rest, and every job still runs once workers drain
    the queue.
    """

    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_bytes_overshoot_bounded(self):
        """
        With a 20 MiB --max-queued-bytes and no worker, a client submits
        200 MB in 4 MiB jobs (all within its default 256 MB send window, so
        its submit returns): no more than the limit plus one job ever
        reaches the master's queue, before or after a worker joins.
        """
        arguments_travel(self)  # the jobs' bytes go to the master's queue, not references to them
        size, count, limit = 4 * MIB, 50, 20 * MIB
        job = size + 1024  # a job's payload: its argument and a little pickle

        def body():
            self.procs.start_master("--max-queued-bytes", str(limit))
            with executor(self.procs.address) as ex:
                futures = [ex.submit(len, bytes(size)) for _ in range(count)]
                client = wait_until(lambda: held_client(ex), what="the master to hold the client")
                log.info("20 MiB limit: at most {n:,} bytes queued", n=client["peak_queued_bytes"])
                self.assertLessEqual(client["peak_queued_bytes"], limit + job, client)
                self.assertLessEqual(client["queued"], limit // size + 1, client)
                self.procs.start_worker(procs=2)
                self.assertEqual([f.result(DEADLINE) for f in futures], [size] * count)
                client = ex.status()["clients"][0]
                self.assertLessEqual(client["peak_queued_bytes"], limit + job, client)
            self.assertIn("holds further jobs", self.procs.log_tail(self.procs.master, 200))

        return threads.deferToThread(body)

    @defer.inlineCallbacks
    def test_client_ignoring_its_room(self):
        """
        A client that ignores its room and sends 60 jobs in one burst to a
        master with --max-queued-jobs 10 is no longer read from once it has
        twice the limit queued (21 jobs: the master parses nothing more of
        what has arrived); once a worker drains its queue the master reads
        on, and every job runs.
        """
        limit, count = 10, 60
        yield threads.deferToThread(self.procs.start_master, "--max-queued-jobs", str(limit))
        peer = yield authenticated_peer(self.procs.address, "client", RoomIgnoringClient)
        self.addCleanup(peer.transport.loseConnection)
        answer = yield register_client(peer).addTimeout(STEP, reactor)
        self.assertEqual(answer["room_jobs"], limit)
        for n in range(1, count + 1):
            peer.callRemote(P.SubmitJobs, jobs=[P.Job(0, n, cloudpickle.dumps((square, (n,), {})))])

        def queued() -> int:
            return master_status(self.procs.address)["clients"][0]["queued"]

        def stopped_reading() -> bool:
            return "sent past its room" in self.procs.log_tail(self.procs.master, 200)

        yield threads.deferToThread(wait_until, stopped_reading, STEP, "the master to stop reading")
        self.assertEqual((yield threads.deferToThread(queued)), 2 * limit + 1)
        yield threads.deferToThread(self.procs.start_worker, 2)
        yield threads.deferToThread(
            wait_until, lambda: len(peer.results) == count, DEADLINE, "every job's result"
        )
        self.assertEqual(sorted(r.seq for r in peer.results), list(range(1, count + 1)))

    def test_cancel_held_jobs(self):
        """
        Jobs a client holds back (no room in the master's queue) are
        withdrawn by C{shutdown(cancel_futures=True)} without ever being
        sent, each in constant time: 50,000 of them within the deadline.
        """
        count = 50_000

        def body():
            self.procs.start_master("--max-queued-bytes", str(MIB))
            ex = ClusterExecutor(self.procs.address)
            try:
                futures = [ex.submit(len, bytes(1000)) for _ in range(count)]
                client = wait_until(lambda: held_client(ex), what="the master to hold the client")
                self.assertLess(client["queued"], MIB // 1000 + 1)
            finally:
                stopper = threading.Thread(
                    target=ex.shutdown, kwargs={"wait": False, "cancel_futures": True}, daemon=True
                )
                stopper.start()
                stopper.join(DEADLINE)
            self.assertFalse(stopper.is_alive(), "cancelling held jobs took too long")
            self.assertTrue(all(f.cancelled() for f in futures))

        return threads.deferToThread(body)

    def test_job_count_limit(self):
        """
        With --max-queued-jobs 20 and no worker, a client submitting 200
        tiny jobs has at most 20 queued on the master; its submit blocks
        once it holds as many unsent; all 200 complete once a worker joins.
        """
        limit, count = 20, 200

        def body():
            self.procs.start_master("--max-queued-jobs", str(limit))
            with executor(self.procs.address) as ex:
                futures = []

                def submit_all():
                    for n in range(count):
                        futures.append(ex.submit(square, n))

                submitter = threading.Thread(target=submit_all, daemon=True)
                submitter.start()
                try:
                    client = wait_until(lambda: held_client(ex), what="the master to hold the client")
                    self.assertEqual(client["queued"], limit, client)
                    wait_until(lambda: len(futures) >= 2 * limit, what="the client to fill its window")
                    submitter.join(2)
                    self.assertTrue(submitter.is_alive(), "submit did not block")
                    self.assertLessEqual(len(futures), 2 * limit + 1)
                    self.procs.start_worker(procs=2)
                    submitter.join(DEADLINE)
                    self.assertFalse(submitter.is_alive(), "submit stayed blocked")
                finally:
                    submitter.join(DEADLINE)
                self.assertEqual([f.result(DEADLINE) for f in futures], [n * n for n in range(count)])
                self.assertEqual(ex.status()["clients"][0]["peak_queued"], limit)

        return threads.deferToThread(body)


class AdmissionUnitTests(unittest.SynchronousTestCase):
    """Which waiting (unauthenticated) connections are dropped (L{cw.core.limits.Admission})."""

    def test_defaults(self):
        self.assertEqual(core_limits.default_max_pending(1024), 256)
        self.assertEqual(core_limits.default_max_pending(1 << 20), core_limits.MAX_PENDING)
        self.assertEqual(core_limits.default_max_pending(1024, 5000), 256, "never over a quarter")
        self.assertEqual(core_limits.default_max_pending(1024, 10), 10)
        self.assertEqual(core_limits.default_per_address(256), 64)
        self.assertEqual(core_limits.default_per_address(2), 1)

    def test_per_address_drops_that_address_oldest(self):
        a = core_limits.Admission(max_pending=10, per_address=2)
        self.assertEqual(a.admit("a1", "A"), [])
        self.assertEqual(a.admit("b1", "B"), [])
        self.assertEqual(a.admit("a2", "A"), [])
        dropped = a.admit("a3", "A")
        self.assertEqual([c for c, _ in dropped], ["a1"])
        self.assertIn("from one address", dropped[0][1])
        self.assertEqual(list(a), ["b1", "a2", "a3"])

    def test_total_drops_busiest_address_oldest(self):
        """Over the total, the address with most waiting loses its oldest, not the others."""
        a = core_limits.Admission(max_pending=4, per_address=3)
        for connection, address in [("b1", "B"), ("a1", "A"), ("a2", "A"), ("c1", "C")]:
            self.assertEqual(a.admit(connection, address), [])
        self.assertEqual([c for c, _ in a.admit("d1", "D")], ["a1"])
        self.assertEqual(sorted(a), ["a2", "b1", "c1", "d1"])

    def test_authenticated_leave(self):
        """A connection that authenticated or closed is forgotten and never dropped."""
        a = core_limits.Admission(max_pending=2, per_address=2)
        a.admit("a1", "A")
        a.admit("a2", "A")
        self.assertEqual(a.pop("a1"), "A")
        self.assertIsNone(a.pop("a1"))
        self.assertEqual(a.admit("a3", "A"), [])
        self.assertEqual(a.waiting_from("A"), 2)
        self.assertNotIn("a1", a)

    def test_raise_descriptor_limit(self):
        before, after = L.raise_descriptor_limit()
        self.assertGreaterEqual(after, before)
        self.assertEqual(L.descriptor_limit(), after)


class DescriptorTests(unittest.TestCase):
    """A flood of idle connections cannot use up the master's descriptors."""

    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_flood_under_1024_descriptors(self):
        """
        Master and worker raise their soft descriptor limits to the hard
        ones.  A master limited to 1024 descriptors, with 1,100 idle
        connections from one address (the test's own, 127.0.0.1), keeps
        its descriptors well below the limit and still accepts a
        legitimate client from that same address, which runs a job.
        """
        flood_size = 1100
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < flood_size + 300:
            self.fail(f"this test needs a descriptor hard limit of {flood_size + 300}, not {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, flood_size + 300), hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))

        def body():
            # Soft limits below the hard ones: master and worker raise them.
            self.procs.start_master(prefix=("prlimit", "--nofile=256:1024", "--"))
            worker = self.procs.start_worker(1, True, prefix=("prlimit", "--nofile=512:2048", "--"))
            self.assertEqual(open_files_limit(self.procs.master.pid), (1024, 1024))
            self.assertEqual(open_files_limit(worker.pid), (2048, 2048))
            self.assertIn("file descriptor limit raised from 512 to 2048", self.procs.log_tail(worker, 200))
            log = self.procs.log_tail(self.procs.master, 200)
            self.assertIn("file descriptor limit raised from 256 to 1024", log)
            self.assertIn("At most 256 connections may wait to authenticate, 64 from one address", log)
            host, port = host_port(self.procs.address)
            flood = []
            try:
                for _ in range(flood_size):
                    flood.append(socket.create_connection((host, port), timeout=STEP))
                master_fds = len(os.listdir(f"/proc/{self.procs.master.pid}/fd"))
                self.assertLess(master_fds, 1024 // 2, "the flood holds the master's descriptors")
                with executor(self.procs.address) as ex:
                    self.assertEqual(ex.submit(square, 12).result(DEADLINE), 144)
            finally:
                for sock in flood:
                    sock.close()
            log = self.procs.log_tail(self.procs.master, 5000)
            self.assertIn("waited longest", log)
            self.assertNotIn("Too many open files", log)

        return threads.deferToThread(body)


def open_files_limit(pid: int) -> tuple[int, int]:
    """The soft and hard C{RLIMIT_NOFILE} of process C{pid}."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no open files limit for {pid}")


def host_port(address: str) -> tuple[str, int]:
    """C{(host, port)} of a C{tcp:host=H:port=P} address."""
    fields = dict(part.split("=", 1) for part in address.split(":")[1:])
    return fields["host"], int(fields["port"])


#: A client process for L{UnreadResultsTests}: submits jobs with sizeable
#: results, says so, then reads them (unless it is stopped).
STOPPED_CLIENT = """
import sys
from cw.client import ClusterExecutor
from cw.test.jobs import payload_bytes

ex = ClusterExecutor(sys.argv[1])
futures = [ex.submit(payload_bytes, int(sys.argv[2]), seed) for seed in range(int(sys.argv[3]))]
print("submitted", flush=True)
for future in futures:
    future.result()
print("all results read", flush=True)
"""

#: A client that reads slowly but steadily (a small receive buffer, a
#: pause before each read is handled): it takes in one result of
#: C{sys.argv[2]} bytes over many read timeouts.
SLOW_CLIENT = """
import socket, sys, time
from twisted.internet import tcp
from cw.client import ClusterExecutor
from cw.test.jobs import payload_bytes

received = tcp.Connection._dataReceived

def slowly(self, data):
    if not getattr(self, "slowed", False):
        self.slowed = True
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
    time.sleep(0.02)
    return received(self, data)

tcp.Connection._dataReceived = slowly
ex = ClusterExecutor(sys.argv[1])
size = int(sys.argv[2])
start = time.monotonic()
assert len(ex.submit(payload_bytes, size, 1).result()) == size
print("all results read in %.1f s" % (time.monotonic() - start), flush=True)
"""


class UnreadResultsTests(unittest.TestCase):
    """
    A client that stops reading its results (^Z): the master stops
    dispatching its jobs, so its memory stays bounded, and disconnects it
    after --client-read-timeout.
    """

    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def start_client(
        self, *args: str, machine: str = "another-machine", script: str = STOPPED_CLIENT
    ) -> subprocess.Popen:
        """
        The client of C{script}, as if on another machine than the
        workers (C{machine}: its identity; C{""} for this machine's), so that
        its results come through the master.
        """
        out = self.procs.directory / "client.out"
        with open(out, "wb") as f:
            client = subprocess.Popen(
                [sys.executable, "-c", script, *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(CW_MACHINE_IDENTITY=machine),
                start_new_session=True,
            )
        client.out = out

        def stop():
            with contextlib.suppress(ProcessLookupError):
                os.kill(client.pid, signal.SIGCONT)
            stop_process(client)

        self.addCleanup(stop)
        return client

    def test_stopped_client(self):
        size, count, limit, timeout = 2 * MIB, 300, 16 * MIB, 5

        def body():
            self.procs.start_master("--max-unsent-bytes", str(limit), "--client-read-timeout", str(timeout))
            self.procs.start_worker(procs=2)
            master = self.procs.master.pid
            baseline = rss_kib(master) / 1024
            reset_peak_rss(master)
            client = self.start_client(self.procs.address, str(size), str(count))
            wait_until(lambda: b"submitted" in client.out.read_bytes(), what="the client to submit")
            os.kill(client.pid, signal.SIGSTOP)
            stopped = time.monotonic()

            def client_gone():
                clients = master_status(self.procs.address)["clients"]
                return not any(c["peer"].endswith(f":{client.pid}") for c in clients)

            wait_until(client_gone, DEADLINE, "the master to drop the stopped client")
            waited = time.monotonic() - stopped
            grown = peak_rss_mib(master) - baseline
            log.info(
                "stopped client dropped after {w:.1f} s; master RSS grew by {g:.0f} MiB", w=waited, g=grown
            )
            # What a stopped client costs: its unsent results (the limit),
            # the results of jobs that workers held when dispatch stopped
            # (a few per slot), each possibly twice while it passes through.
            self.assertLess(grown, 3 * (limit >> 20) + 48, "the master buffered the stopped client's results")
            self.assertGreater(waited, timeout - 1)
            self.assertIn(
                "read none of its results for over 5 s", self.procs.log_tail(self.procs.master, 500)
            )
            with executor(self.procs.address) as ex:
                self.assertEqual(ex.submit(square, 9).result(DEADLINE), 81)

        return threads.deferToThread(body)

    def test_slow_reader_kept(self):
        """
        A client that takes in one big result slowly but steadily, over
        many read timeouts, is not dropped: its reading progress is the
        bytes the kernel took for it, which never goes back (not even when
        the result is queued whole in the master).
        """
        size, timeout = 32 * MIB, 2

        def body():
            self.procs.start_master("--client-read-timeout", str(timeout))
            self.procs.start_worker(procs=1)
            client = self.start_client(self.procs.address, str(size), script=SLOW_CLIENT)

            def dropped() -> bool:
                return "read none of its results" in self.procs.log_tail(self.procs.master, 500)

            wait_until(
                lambda: (
                    client.poll() is not None or b"all results read" in client.out.read_bytes() or dropped()
                ),
                DEADLINE,
                "the slow client to read its result",
            )
            self.assertFalse(dropped(), "the master dropped the client while it read")
            output = client.out.read_text(errors="replace")
            log.info("slow client: {output}", output=output.strip())
            self.assertIn("all results read", output)

        return threads.deferToThread(body)

    def test_stopped_client_on_the_workers_machine(self):
        """
        A client on its workers' machine, whose results are lent to it from
        the workers' memory (they do not pass through the master): stopped,
        the results it has not taken count as unsent all the same, so the
        workers' memory files stay bounded, and the master disconnects it
        after the read timeout; then the workers close its files.
        """
        size, count, limit, timeout = 2 * MIB, 300, 16 * MIB, 5

        def body():
            self.procs.start_master("--max-unsent-bytes", str(limit), "--client-read-timeout", str(timeout))
            worker = self.procs.start_worker(procs=2)
            client = self.start_client(self.procs.address, str(size), str(count), machine="")
            wait_until(lambda: b"submitted" in client.out.read_bytes(), what="the client to submit")
            os.kill(client.pid, signal.SIGSTOP)
            held = [0]

            def client_gone():
                held[0] = max(held[0], memory_files(worker.pid))
                clients = master_status(self.procs.address)["clients"]
                return not any(c["peer"].endswith(f":{client.pid}") for c in clients)

            wait_until(client_gone, DEADLINE, "the master to drop the stopped client")
            self.assertIn(
                "read none of its results for over 5 s", self.procs.log_tail(self.procs.master, 500)
            )
            self.assertGreater(held[0], 0, "no result was lent")
            # The limit, and the jobs the workers held when dispatch stopped.
            self.assertLess(held[0] * size, 2 * limit + 8 * size, "lent results were not counted as unsent")
            wait_until(lambda: memory_files(worker.pid) == 0, what="the worker to close the client's files")

        return threads.deferToThread(body)
